//! Chunk files: where the bytes of chunks live. sled keeps, under each chunk's key, only its
//! location (a 20-byte pointer), so sled's page cache holds keys and pointers, never payloads.
//!
//! Why: sled 0.34's cache evicts only when one of its 256 shards has queued 64 accesses, so pages
//! read once by a replay stay in memory whatever `cache_capacity` says (1.8 GiB after reading 10
//! million records), and its log-structured segments are cleaned only below half live, so a store
//! took up to twice its logical bytes. Chunks in plain append-only files are read with `pread`
//! (the kernel's page cache, not the broker's heap, holds them) and take their own size on disk.
//!
//! Layout: `<data dir>/chunks/<id>.tpc`, ids increasing; the writer appends chunks to the newest
//! file (the active one) and starts a new one past [`FILE_BYTES`]. A file is deleted once no
//! pointer in sled refers to it any more (retention removed or deleted every chunk in it, or
//! compaction moved the few left to the active file: see `ChunkFiles::sparse`).
//!
//! Invariants:
//! - Only the writer thread appends, rotates and deletes; readers only `pread`, through an
//!   `Arc<File>` that stays readable after a deletion unlinks the file.
//! - Under `fsync=always` a chunk's bytes are synced before its pointer is written to sled, so a
//!   stored pointer always finds its bytes. Under `interval`, the flusher syncs the chunk files
//!   before sled; a crash may still leave pointers to bytes the disk never received, all of them
//!   in the newest file past the last sync noted: recovery drops those (see
//!   `storage::count_chunks`), as it would drop records sled had not flushed.
//! - A file is synced before a new one is started, so only the active file can have a torn tail.
//! - A file is deleted only after the removal of its last pointer is durable in sled, and never a
//!   file no pointer referred to when the log was opened (sled may have lost its pointers).

use crate::chunk::ChunkError;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// A chunk file is closed, and a new one started, once it holds this many bytes (by default:
/// `chunk_file_bytes`).
pub const FILE_BYTES: u64 = 16 << 20;
/// Chunks smaller than this are gathered into writes of up to this many bytes.
const WRITE_BUFFER: usize = 256 << 10;
/// Starts a pointer value in sled; a chunk stored inline (before chunk files) starts with
/// `chunk::MAGIC` instead.
const POINTER_MAGIC: &[u8; 4] = b"TPLP";
/// How far the chunk files are durable: every file before `file`, and `file` up to `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub file: u32,
    pub len: u64,
}

impl Position {
    /// As stored in sled: `file u32 | len u64`, little-endian.
    pub fn encode(&self) -> [u8; 12] {
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&self.file.to_le_bytes());
        v[4..].copy_from_slice(&self.len.to_le_bytes());
        v
    }

    pub fn decode(value: &[u8]) -> Option<Position> {
        let value: [u8; 12] = value.try_into().ok()?;
        let file = u32::from_le_bytes(value[..4].try_into().ok()?);
        Some(Position { file, len: u64::from_le_bytes(value[4..].try_into().ok()?) })
    }

    /// Whether the bytes at `at` were durable when this position was taken.
    pub fn covers(&self, at: Location) -> bool {
        at.file < self.file || (at.file == self.file && at.offset + u64::from(at.len) <= self.len)
    }
}

/// The directory under the data dir.
pub const DIR: &str = "chunks";
const SUFFIX: &str = "tpc";

/// Where a chunk's bytes are: file id, offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub file: u32,
    pub offset: u64,
    pub len: u32,
}

impl Location {
    /// The pointer value stored in sled: `"TPLP" | file u32 | offset u64 | len u32`, little-endian.
    pub fn encode(&self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..4].copy_from_slice(POINTER_MAGIC);
        v[4..8].copy_from_slice(&self.file.to_le_bytes());
        v[8..16].copy_from_slice(&self.offset.to_le_bytes());
        v[16..20].copy_from_slice(&self.len.to_le_bytes());
        v
    }

    /// The location a sled value points to; `None` when the value is a chunk stored inline.
    pub fn decode(value: &[u8]) -> Option<Location> {
        if value.len() != 20 || &value[..4] != POINTER_MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(value[i..i + 4].try_into().unwrap_or_default());
        let offset = u64::from_le_bytes(value[8..16].try_into().unwrap_or_default());
        Some(Location { file: u32_at(4), offset, len: u32_at(16) })
    }
}

fn file_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.{SUFFIX}"))
}

/// The path of chunk file `id` of the data dir `data_dir`.
pub fn path_in(data_dir: &Path, id: u32) -> PathBuf {
    file_path(&data_dir.join(DIR), id)
}

fn chunk_error(detail: String) -> ChunkError {
    ChunkError { good: 0, detail }
}

fn io_error(context: &str, path: &Path, source: io::Error) -> crate::error::Error {
    crate::error::Error::Io { context: format!("{context} {}", path.display()), source }
}

/// The chunk files of a data dir, for reading; shared by the log, its readers and the writer.
pub struct ChunkFiles {
    dir: PathBuf,
    files: RwLock<BTreeMap<u32, Arc<File>>>,
    /// Per file, the bytes of the chunks sled points to (kept by the writer).
    live: Mutex<HashMap<u32, u64>>,
    /// Files compaction gave up on (a chunk in them is damaged): never offered again.
    stuck: Mutex<std::collections::HashSet<u32>>,
}

impl ChunkFiles {
    /// Opens the chunk files under `data_dir` for reading only (`tapeline verify`); a data dir
    /// without chunk files has none.
    pub fn open_readonly(data_dir: &Path) -> crate::error::Result<Arc<ChunkFiles>> {
        let dir = data_dir.join(DIR);
        let mut files = BTreeMap::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Ok(Arc::new(ChunkFiles {
                    dir,
                    files: RwLock::new(files),
                    live: Mutex::default(),
                    stuck: Mutex::default(),
                }))
            }
            Err(err) => return Err(io_error("listing", &dir, err)),
        };
        for entry in entries {
            let path = entry.map_err(|e| io_error("listing", &dir, e))?.path();
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(&format!(".{SUFFIX}")))
                .and_then(|n| n.parse::<u32>().ok());
            let Some(id) = id else { continue };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_error("opening", &path, e))?;
            files.insert(id, Arc::new(file));
        }
        Ok(Arc::new(ChunkFiles {
            dir,
            files: RwLock::new(files),
            live: Mutex::default(),
            stuck: Mutex::default(),
        }))
    }

    /// Opens the chunk files under `data_dir` (creating the directory) and the active file for
    /// appending: the newest, or a new one; a file is closed past `file_bytes`.
    pub fn open(data_dir: &Path, file_bytes: u64) -> crate::error::Result<(Arc<ChunkFiles>, Appender)> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io_error("creating", &dir, e))?;
        let shared = ChunkFiles::open_readonly(data_dir)?;
        let (id, file, len) = match shared.newest() {
            Some((id, file)) => {
                let len = file.metadata().map_err(|e| io_error("reading", &shared.path(id), e))?.len();
                (id, file, len)
            }
            None => {
                let (id, file) = shared.create(0)?;
                (id, file, 0)
            }
        };
        // Dirty: a broker killed before its last sync leaves bytes in the kernel's cache only;
        // the first sync must cover them before a mark says they are durable.
        let appender =
            Appender { files: shared.clone(), id, file, len, file_bytes, dirty: true, buf: Vec::new() };
        Ok((shared, appender))
    }

    fn path(&self, id: u32) -> PathBuf {
        file_path(&self.dir, id)
    }

    fn newest(&self) -> Option<(u32, Arc<File>)> {
        self.read_files().iter().next_back().map(|(id, f)| (*id, f.clone()))
    }

    fn read_files(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<File>>> {
        self.files.read().unwrap_or_else(|e| e.into_inner())
    }

    fn create(&self, id: u32) -> crate::error::Result<(u32, Arc<File>)> {
        let path = self.path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        // The new name must survive a crash before any pointer into it is written.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io_error("syncing", &self.dir, e))?;
        let file = Arc::new(file);
        self.files.write().unwrap_or_else(|e| e.into_inner()).insert(id, file.clone());
        Ok((id, file))
    }

    /// Bytes every chunk file takes.
    pub fn total_bytes(&self) -> u64 {
        let files: Vec<Arc<File>> = self.read_files().values().cloned().collect();
        files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
    }

    /// The chunk stored under a sled value: read from its file when the value is a pointer,
    /// the value itself when the chunk is stored inline. A chunk that cannot be read is reported
    /// like one that does not decode.
    pub fn load(&self, value: sled::IVec) -> Result<Bytes, ChunkError> {
        let Some(at) = Location::decode(&value) else {
            // Shares sled's buffer: payloads handed out are slices of it, never copies.
            return Ok(Bytes::from_owner(value));
        };
        self.read(at)
    }

    /// The first `max` bytes of the chunk stored under a sled value (at most): enough for its
    /// header, without reading its records.
    pub fn load_head(&self, value: sled::IVec, max: u32) -> Result<Bytes, ChunkError> {
        match Location::decode(&value) {
            Some(at) => self.read(Location { len: at.len.min(max), ..at }),
            None => Ok(Bytes::from_owner(value)),
        }
    }

    /// The bytes at `at`.
    pub fn read(&self, at: Location) -> Result<Bytes, ChunkError> {
        let file = self.read_files().get(&at.file).cloned();
        let Some(file) = file else {
            return Err(chunk_error(format!("chunk file {} is missing", self.path(at.file).display())));
        };
        let mut buf = vec![0u8; at.len as usize];
        file.read_exact_at(&mut buf, at.offset).map_err(|err| {
            chunk_error(format!(
                "cannot read {} bytes at offset {} of {}: {err}",
                at.len,
                at.offset,
                self.path(at.file).display()
            ))
        })?;
        Ok(Bytes::from(buf))
    }

    /// Makes the active file's bytes durable (the flusher's and `Log::flush`'s part); returns
    /// how far every chunk file is durable now.
    pub fn sync(&self) -> io::Result<Option<Position>> {
        let Some((id, file)) = self.newest() else { return Ok(None) };
        // Read before syncing: whatever the writer appends meanwhile is not covered.
        let len = file.metadata()?.len();
        file.sync_data()?;
        Ok(Some(Position { file: id, len }))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A file worth compacting: not the active one, still referred to, but by less than a quarter
    /// of its bytes (retention removed the rest around a few chunks, such as the last chunk of a
    /// stream that went quiet). Moving those chunks to the active file lets it be deleted, for at
    /// most a quarter of a file's writes.
    pub fn sparse(&self) -> Option<u32> {
        let files: Vec<(u32, Arc<File>)> = self.read_files().iter().map(|(id, f)| (*id, f.clone())).collect();
        let (_, older) = files.split_last()?;
        let live = self.live();
        let stuck = self.stuck.lock().unwrap_or_else(|e| e.into_inner());
        older.iter().filter(|(id, _)| !stuck.contains(id)).find_map(|(id, file)| {
            let held = live.get(id).copied().unwrap_or(0);
            let len = file.metadata().ok()?.len();
            (held > 0 && held < len / 4).then_some(*id)
        })
    }

    /// Compaction cannot move every chunk out of file `id`: do not offer it again.
    pub fn give_up(&self, id: u32) {
        self.stuck.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    /// Deletes file `id`; readers holding it keep reading until they let go.
    fn remove(&self, id: u32) -> io::Result<()> {
        self.files.write().unwrap_or_else(|e| e.into_inner()).remove(&id);
        std::fs::remove_file(self.path(id))
    }
}

/// The writer's side: appends to the active file and counts, per file, the bytes pointers still
/// refer to, so that a file nothing refers to can be deleted.
pub struct Appender {
    files: Arc<ChunkFiles>,
    id: u32,
    file: Arc<File>,
    len: u64,
    /// The active file is closed past this many bytes.
    file_bytes: u64,
    /// Appended since the last sync.
    dirty: bool,
    /// Gathers small chunks into one write; kept between commits.
    buf: Vec<u8>,
}

impl Appender {
    /// Appends `chunks`, in order, and returns where each went. Starts a new file first when
    /// the active one is full (syncing it, so that only the active file can have a torn tail).
    pub fn append<C: AsRef<[u8]>>(&mut self, chunks: &[C]) -> crate::error::Result<Vec<Location>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        if self.len >= self.file_bytes {
            self.start_after(self.id)?;
        }
        // Small chunks are gathered into one write; large ones are written as they are, so no
        // commit-sized buffer is ever allocated (the allocator would keep it).
        let mut at = Vec::with_capacity(chunks.len());
        let mut buf = std::mem::take(&mut self.buf);
        let start = self.len;
        for c in chunks {
            let c = c.as_ref();
            at.push(Location { file: self.id, offset: self.len + buf.len() as u64, len: c.len() as u32 });
            if !buf.is_empty() && buf.len() + c.len() > WRITE_BUFFER {
                self.write(&buf)?;
                buf.clear();
            }
            if c.len() >= WRITE_BUFFER {
                self.write(c)?;
            } else {
                buf.extend_from_slice(c);
            }
        }
        if !buf.is_empty() {
            self.write(&buf)?;
            buf.clear();
        }
        self.buf = buf;
        *self.files.live().entry(self.id).or_default() += self.len - start;
        Ok(at)
    }

    /// Writes `bytes` at the end of the active file.
    fn write(&mut self, bytes: &[u8]) -> crate::error::Result<()> {
        self.file
            .write_all_at(bytes, self.len)
            .map_err(|e| io_error("writing", &self.files.path(self.id), e))?;
        self.len += bytes.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> crate::error::Result<()> {
        if self.dirty {
            self.file.sync_data().map_err(|e| io_error("syncing", &self.files.path(self.id), e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Counts a pointer found in sled at recovery.
    pub fn counted(&mut self, at: Location) {
        *self.files.live().entry(at.file).or_default() += u64::from(at.len);
    }

    /// A pointer to `at` was removed or replaced.
    pub fn released(&mut self, at: Location) {
        if let Some(live) = self.files.live().get_mut(&at.file) {
            *live = live.saturating_sub(u64::from(at.len));
        }
    }

    /// Files that pointers referred to and no longer do, the active one excepted. The caller
    /// deletes them with [`Appender::delete`] once the removal of their pointers is durable. A
    /// file no pointer referred to when the log was opened is never offered: sled may have lost
    /// its pointers (a rollback), and `tapeline recover` would find its chunks.
    pub fn unreferenced(&self) -> Vec<u32> {
        let ids: Vec<u32> = self.files.read_files().keys().copied().collect();
        let live = self.files.live();
        ids.into_iter().filter(|id| *id != self.id && live.get(id) == Some(&0)).collect()
    }

    /// Files no pointer refers to (after the pointers were counted at open), the active one
    /// excepted: kept, and said, since only an operator can tell whether they are needed.
    pub fn orphans(&self) -> Vec<u32> {
        let ids: Vec<u32> = self.files.read_files().keys().copied().collect();
        let live = self.files.live();
        ids.into_iter().filter(|id| *id != self.id && !live.contains_key(id)).collect()
    }

    /// Starts a new active file after file `id` (files up to it are missing, or are not to be
    /// appended to).
    pub fn start_after(&mut self, id: u32) -> crate::error::Result<()> {
        self.sync()?;
        let (id, file) = self.files.create(id + 1)?;
        (self.id, self.file, self.len) = (id, file, 0);
        Ok(())
    }

    /// Deletes files (see [`Appender::unreferenced`]).
    pub fn delete(&mut self, ids: &[u32]) {
        for &id in ids {
            self.files.live().remove(&id);
            match self.files.remove(id) {
                Ok(()) => tracing::debug!(file = id, "chunk file deleted"),
                Err(err) => tracing::warn!(file = id, cause = %err, "cannot delete a chunk file"),
            }
        }
    }

    /// The chunk files, for reading.
    pub fn files(&self) -> &ChunkFiles {
        &self.files
    }

    /// The end of what was appended.
    pub fn position(&self) -> Position {
        Position { file: self.id, len: self.len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_round_trip_and_chunks_are_not_pointers() {
        let at = Location { file: 7, offset: 1 << 40, len: 65_536 };
        assert_eq!(Location::decode(&at.encode()), Some(at));
        let mut chunk = crate::chunk::ChunkEncoder::new("s", 0, 0);
        chunk.push(crate::record::Tick(1), None, &[], b"0123456789abcdef", 0);
        assert_eq!(Location::decode(&chunk.finish()), None);
    }

    #[test]
    fn appends_read_back_rotate_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (files, mut app) = ChunkFiles::open(dir.path(), FILE_BYTES).unwrap();
        let big = vec![7u8; (FILE_BYTES / 2 + 1) as usize];
        let a = app.append(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        assert_eq!(files.read(a[1]).unwrap().as_ref(), b"two");
        let b = app.append(&[&big[..]]).unwrap();
        let c = app.append(&[&big[..]]).unwrap();
        let d = app.append(&[b"next file".to_vec()]).unwrap();
        assert_eq!((a[0].file, c[0].file, d[0].file), (0, 0, 1), "a full file is followed by a new one");
        assert_eq!(files.read(d[0]).unwrap().as_ref(), b"next file");
        // Reopened, the newest file is the active one, appended after its end.
        drop((files, app));
        let (files, mut app) = ChunkFiles::open(dir.path(), FILE_BYTES).unwrap();
        let e = app.append(&[b"again".to_vec()]).unwrap();
        assert_eq!(e[0], Location { file: 1, offset: 9, len: 5 });
        for at in a.iter().chain(&b).chain(&c) {
            app.counted(*at);
        }
        app.counted(d[0]);
        assert!(app.unreferenced().is_empty());
        for at in a.iter().chain(&b).chain(&c) {
            app.released(*at);
        }
        assert_eq!(app.unreferenced(), vec![0]);
        let held = files.read_files().get(&0).cloned().unwrap();
        app.delete(&[0]);
        assert!(files.read(b[0]).unwrap_err().detail.contains("missing"));
        assert!(!dir.path().join(DIR).join("0000000000.tpc").exists());
        // A reader that took the file before the deletion still reads it.
        let mut buf = [0u8; 3];
        held.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"one");
        assert!(files
            .read(Location { file: 1, offset: 1 << 20, len: 4 })
            .unwrap_err()
            .detail
            .contains("cannot read"));
    }
}
