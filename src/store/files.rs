//! Chunk files: the log of record on disk, a sequence of commit records (see `commit.rs`) in
//! append-only files `<data dir>/log/<id>.tpc`, ids increasing.
//!
//! The writer appends each record to the newest file (the active one) and starts a new file
//! before a record would take it past `chunk_file_bytes`. A file is deleted once no pointer in the
//! index refers to it any more (retention removed or deleted every chunk in it, or compaction
//! moved the few left to the active file) and a checkpoint after it is durable.
//!
//! Invariants:
//! - Only the writer thread appends, rotates and deletes; readers only `pread`, through an
//!   `Arc<File>` that stays readable after a deletion unlinks the file.
//! - A file is synced before the next one is started, and a new file's name is made durable (its
//!   directory synced) before any record in it is acknowledged: only the active file can have a
//!   torn tail.
//! - A failed write is undone (the file cut back to where the record started) before the next
//!   record is written, so a refused record leaves no bytes behind.
//! - A file name is never used twice: a new file takes an id above every file that exists and
//!   every file the index refers to.

use super::chunk::ChunkError;
use super::commit::{Encoded, FileHeader, FILE_HEADER_LEN};
use crate::error::{Error, Result};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Records' bytes are gathered into writes of up to this many bytes; larger chunks are written as
/// they are, so no commit-sized buffer is ever allocated (the allocator would keep it).
const WRITE_BUFFER: usize = 256 << 10;
/// The directory under the data dir.
pub const DIR: &str = "log";
const SUFFIX: &str = "tpc";

/// Where a chunk's bytes are: file id, offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub file: u32,
    pub offset: u64,
    pub len: u32,
}

/// Where a record was written: its file, and its first and past-the-end offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAt {
    pub file: u32,
    pub start: u64,
    pub end: u64,
}

/// The path of chunk file `id` of the data dir `data_dir`.
pub fn path_in(data_dir: &Path, id: u32) -> PathBuf {
    data_dir.join(DIR).join(format!("{id:010}.{SUFFIX}"))
}

fn io_error(context: &str, path: &Path, source: io::Error) -> Error {
    Error::Io { context: format!("{context} {}", path.display()), source }
}

/// Makes the entries of directory `dir` durable (a file created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("syncing the directory", dir, e))
}

/// The chunk files of a data dir, for reading; shared by the log, its readers and the writer.
pub struct ChunkFiles {
    dir: PathBuf,
    files: RwLock<BTreeMap<u32, Arc<File>>>,
    /// Per file, the bytes of the chunks the index points to (kept by the writer).
    live: Mutex<HashMap<u32, u64>>,
    /// Files compaction gave up on (a chunk in them is damaged): never offered again.
    stuck: Mutex<HashSet<u32>>,
}

impl ChunkFiles {
    /// Opens every chunk file of `data_dir` (none when it has no log directory).
    pub fn open(data_dir: &Path) -> Result<Arc<ChunkFiles>> {
        ChunkFiles::open_dir(&data_dir.join(DIR))
    }

    /// Opens every chunk file in `dir` (none when it does not exist).
    pub fn open_dir(dir: &Path) -> Result<Arc<ChunkFiles>> {
        let dir = dir.to_path_buf();
        let mut files = BTreeMap::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
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
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("listing", &dir, err)),
        }
        Ok(Arc::new(ChunkFiles {
            dir,
            files: RwLock::new(files),
            live: Mutex::default(),
            stuck: Mutex::default(),
        }))
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of file `id`.
    pub fn path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:010}.{SUFFIX}"))
    }

    fn read_files(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<File>>> {
        self.files.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_files(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, Arc<File>>> {
        self.files.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every file's id, in order.
    pub fn ids(&self) -> Vec<u32> {
        self.read_files().keys().copied().collect()
    }

    /// File `id`, if it exists.
    pub fn file(&self, id: u32) -> Option<Arc<File>> {
        self.read_files().get(&id).cloned()
    }

    /// Bytes every chunk file takes.
    pub fn total_bytes(&self) -> u64 {
        let files: Vec<Arc<File>> = self.read_files().values().cloned().collect();
        files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
    }

    /// The bytes at `at`. A chunk that cannot be read is reported like one that does not decode.
    pub fn read(&self, at: Location) -> std::result::Result<Bytes, ChunkError> {
        let Some(file) = self.file(at.file) else {
            let detail = format!("chunk file {} is missing", self.path(at.file).display());
            return Err(ChunkError { good: 0, detail });
        };
        let mut buf = vec![0u8; at.len as usize];
        file.read_exact_at(&mut buf, at.offset).map_err(|err| ChunkError {
            good: 0,
            detail: format!(
                "cannot read {} bytes at offset {} of {}: {err}",
                at.len,
                at.offset,
                self.path(at.file).display()
            ),
        })?;
        Ok(Bytes::from(buf))
    }

    /// Creates file `id` with its header and makes it and its name durable. A file left by an
    /// earlier attempt under that name (a failed rotation) is replaced.
    fn create(&self, id: u32, first_seq: u64, salt: u32) -> Result<Arc<File>> {
        let path = self.path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        let written = file
            .write_all_at(&FileHeader { file: id, first_seq, salt }.encode(), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error("writing the header of", &path, e))
            .and_then(|()| sync_dir(&self.dir));
        if let Err(err) = written {
            // Not a file of the log: gone, so that its name can be tried again.
            let _ = std::fs::remove_file(&path);
            return Err(err);
        }
        let file = Arc::new(file);
        self.write_files().insert(id, file.clone());
        Ok(file)
    }

    /// Forgets file `id`, removed by recovery.
    pub fn forget(&self, id: u32) {
        self.write_files().remove(&id);
    }

    /// Makes the newest file's bytes durable (the flusher's part under `fsync = interval`: the
    /// writer syncs a file itself before starting the next).
    pub fn sync_newest(&self) -> io::Result<()> {
        let newest = self.read_files().iter().next_back().map(|(_, f)| f.clone());
        match newest {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Deletes file `id`; readers holding it keep reading until they let go.
    fn remove(&self, id: u32) -> io::Result<()> {
        self.write_files().remove(&id);
        std::fs::remove_file(self.path(id))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A file worth compacting: not the active (newest) one, still referred to, but by less than
    /// a quarter of its bytes (retention removed the rest around a few chunks, such as the last
    /// chunk of a stream that went quiet). Moving those chunks to the active file lets it be
    /// deleted, for at most a quarter of a file's writes.
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
}

/// How far the active file is durable, and the chain at that point: what a failed sync rolls
/// back to.
#[derive(Debug, Clone, Copy)]
struct Synced {
    len: u64,
    next_seq: u64,
    prev_crc: u32,
}

/// The writer's side: appends records to the active file, and counts, per file, the bytes the
/// index still refers to, so that a file nothing refers to can be deleted.
pub struct Appender {
    files: Arc<ChunkFiles>,
    id: u32,
    file: Arc<File>,
    len: u64,
    /// The active file is closed past this many bytes.
    file_bytes: u64,
    /// The sequence number of the next record, and the CRC of the last one (the chain).
    next_seq: u64,
    prev_crc: u32,
    /// The log's salt (`commit.rs`).
    salt: u32,
    synced: Synced,
    /// Gathers small pieces into one write; kept between records.
    buf: Vec<u8>,
}

impl Appender {
    /// An appender after the record that ends at `len` in file `id`, whose successor is `next_seq`
    /// and whose CRC is `prev_crc`: where recovery found the log's end. Everything up to there is
    /// taken as durable (recovery synced what it kept).
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        files: Arc<ChunkFiles>,
        id: u32,
        len: u64,
        next_seq: u64,
        prev_crc: u32,
        salt: u32,
        file_bytes: u64,
    ) -> Result<Appender> {
        let file =
            files.file(id).ok_or_else(|| Error::Internal(format!("chunk file {id} to resume is missing")))?;
        let synced = Synced { len, next_seq, prev_crc };
        Ok(Appender { files, id, file, len, file_bytes, next_seq, prev_crc, salt, synced, buf: Vec::new() })
    }

    /// The appender of a new log: file `id` created, empty, starting with record `next_seq`.
    pub fn create(
        files: Arc<ChunkFiles>,
        id: u32,
        next_seq: u64,
        prev_crc: u32,
        salt: u32,
        file_bytes: u64,
    ) -> Result<Appender> {
        std::fs::create_dir_all(files.dir()).map_err(|e| io_error("creating", files.dir(), e))?;
        let file = files.create(id, next_seq, salt)?;
        let len = FILE_HEADER_LEN;
        let synced = Synced { len, next_seq, prev_crc };
        Ok(Appender { files, id, file, len, file_bytes, next_seq, prev_crc, salt, synced, buf: Vec::new() })
    }

    /// The sequence number the next record must carry, and the CRC it chains to.
    pub fn chain(&self) -> (u64, u32) {
        (self.next_seq, self.prev_crc)
    }

    /// The log's salt, which every record's CRCs start from.
    pub fn salt(&self) -> u32 {
        self.salt
    }

    /// Appends a record whose data is `data`. Starts a new file first when the record would take
    /// the active one past its size (syncing the active one). On failure nothing of the record
    /// stays in the file and the chain is unchanged.
    pub fn append<C: AsRef<[u8]>>(&mut self, record: &Encoded, data: &[C]) -> Result<RecordAt> {
        debug_assert_eq!((record.fixed.seq, record.fixed.prev_crc), (self.next_seq, self.prev_crc));
        if self.len > FILE_HEADER_LEN && self.len + record.record_len() > self.file_bytes {
            // A failed sync of the full file is not a full disk to refuse and go on from: what
            // it held may be lost (see `writer.rs`).
            self.sync().map_err(|err| Error::LogFailed { cause: err.to_string() })?;
            self.start_after(self.id, record.fixed.seq)?;
        }
        let start = self.len;
        if let Err(err) = self.write_record(record, data) {
            // A failed write (a full disk) may have left part of the record: cut it off, so the
            // next record follows the last whole one.
            match self.file.set_len(start) {
                Ok(()) => self.len = start,
                Err(cut) => {
                    return Err(Error::Internal(format!(
                        "{err}; and cutting the partial record off {} failed: {cut}",
                        self.files.path(self.id).display()
                    )))
                }
            }
            return Err(err);
        }
        self.next_seq += 1;
        self.prev_crc = record.crc;
        Ok(RecordAt { file: self.id, start, end: self.len })
    }

    fn write_record<C: AsRef<[u8]>>(&mut self, record: &Encoded, data: &[C]) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&record.head);
        let mut written = Ok(());
        for piece in data.iter().map(|d| d.as_ref()) {
            if written.is_err() {
                break;
            }
            if !buf.is_empty() && buf.len() + piece.len() > WRITE_BUFFER {
                written = self.write(&buf);
                buf.clear();
            }
            if piece.len() >= WRITE_BUFFER {
                written = written.and_then(|()| self.write(piece));
            } else {
                buf.extend_from_slice(piece);
            }
        }
        buf.extend_from_slice(&record.crc.to_le_bytes());
        let written = written.and_then(|()| self.write(&buf));
        buf.clear();
        self.buf = buf;
        written
    }

    /// Writes `bytes` at the end of the active file.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, self.len)
            .map_err(|e| io_error("writing", &self.files.path(self.id), e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Whether everything appended is durable.
    pub fn is_synced(&self) -> bool {
        self.synced.len == self.len && self.synced.next_seq == self.next_seq
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> Result<()> {
        if !self.is_synced() {
            let began = std::time::Instant::now();
            self.file.sync_data().map_err(|e| io_error("syncing", &self.files.path(self.id), e))?;
            metrics::histogram!("tapeline_fsync_seconds").record(began.elapsed());
            self.synced = Synced { len: self.len, next_seq: self.next_seq, prev_crc: self.prev_crc };
        }
        Ok(())
    }

    /// After a failed sync: cuts the active file back to what the last sync made durable and
    /// syncs that, so that the file holds exactly what was durable before. The records written
    /// since are forgotten (their chain too); the caller must not have acknowledged any of them.
    pub fn roll_back(&mut self) -> Result<()> {
        let Synced { len, next_seq, prev_crc } = self.synced;
        self.file
            .set_len(len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_error("cutting back", &self.files.path(self.id), e))?;
        (self.len, self.next_seq, self.prev_crc) = (len, next_seq, prev_crc);
        Ok(())
    }

    /// Counts a pointer found in the index at open, or written since.
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
    /// deletes them with [`Appender::delete`] once that is safe.
    pub fn unreferenced(&self) -> Vec<u32> {
        let ids = self.files.ids();
        let live = self.files.live();
        ids.into_iter().filter(|id| *id != self.id && live.get(id) == Some(&0)).collect()
    }

    /// Counts the files no pointer refers to (after the pointers were counted at open), the
    /// active one excepted, as holding nothing, so that [`Appender::unreferenced`] offers them:
    /// their chunks were all removed or moved, and only their deletion was put off (a crash, or
    /// a full disk that had no room for the checkpoint first). Returns them.
    pub fn adopt_unreferenced(&mut self) -> Vec<u32> {
        let ids = self.files.ids();
        let mut live = self.files.live();
        let adopted: Vec<u32> =
            ids.into_iter().filter(|id| *id != self.id && !live.contains_key(id)).collect();
        for id in &adopted {
            live.insert(*id, 0);
        }
        adopted
    }

    /// Starts a new active file after file `after` (files up to it exist, or are not to be
    /// appended to), whose first record will be `first_seq`. The active file is synced first.
    pub fn start_after(&mut self, after: u32, first_seq: u64) -> Result<()> {
        self.sync()?;
        let id = after.max(self.id) + 1;
        let file = self.files.create(id, first_seq, self.salt)?;
        (self.id, self.file, self.len) = (id, file, FILE_HEADER_LEN);
        self.synced = Synced { len: self.len, next_seq: self.next_seq, prev_crc: self.prev_crc };
        Ok(())
    }

    /// Deletes files (see [`Appender::unreferenced`]) and makes that durable.
    pub fn delete(&mut self, ids: &[u32]) {
        for &id in ids {
            self.files.live().remove(&id);
            match self.files.remove(id) {
                Ok(()) => tracing::debug!(file = id, "chunk file deleted"),
                Err(err) => tracing::warn!(file = id, cause = %err, "cannot delete a chunk file"),
            }
        }
        if !ids.is_empty() {
            if let Err(err) = sync_dir(self.files.dir()) {
                tracing::warn!(cause = %err, "cannot sync the chunk files' directory after deleting");
            }
        }
    }

    /// The chunk files, for reading.
    pub fn files(&self) -> &ChunkFiles {
        &self.files
    }

    /// The active file's id and length.
    pub fn position(&self) -> (u32, u64) {
        (self.id, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commit::{self, Body, ChunkEntry};
    use crate::types::{StreamId, Tick};

    fn record(appender: &Appender, chunks: &[&[u8]]) -> Encoded {
        let (seq, prev) = appender.chain();
        let entries = chunks
            .iter()
            .map(|c| ChunkEntry { stream: StreamId(1), first: Tick(seq), len: c.len() as u32 })
            .collect();
        let body = Body::Append { created: Vec::new(), tags: Vec::new(), chunks: entries };
        Encoded::new(&body, appender.salt(), seq, prev, Tick(seq), 0, chunks)
    }

    #[test]
    fn records_chain_rotate_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(dir.path()).unwrap();
        let mut app = Appender::create(files.clone(), 0, 1, 0, 9, 1 << 20).unwrap();
        let big = vec![7u8; 600 << 10];
        let mut at = Vec::new();
        for chunks in [&[&b"one"[..], b"two"][..], &[&big[..]], &[&big[..]], &[b"next"]] {
            let rec = record(&app, chunks);
            let written = app.append(&rec, chunks).unwrap();
            let bytes = files
                .read(Location {
                    file: written.file,
                    offset: written.start,
                    len: (written.end - written.start) as u32,
                })
                .unwrap();
            let (fixed, _) = commit::check(&bytes, 9).unwrap();
            at.push((written, fixed.seq));
        }
        assert_eq!(
            at.iter().map(|(w, _)| w.file).collect::<Vec<_>>(),
            vec![0, 0, 1, 1],
            "a full file is followed by a new one"
        );
        assert_eq!(at.iter().map(|(_, s)| *s).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        let header =
            FileHeader::decode(&files.read(Location { file: 1, offset: 0, len: 28 }).unwrap()).unwrap();
        assert_eq!(header, FileHeader { file: 1, first_seq: 3, salt: 9 });
        app.sync().unwrap();
        assert!(app.is_synced());
    }

    #[test]
    fn a_roll_back_forgets_what_was_not_synced() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(dir.path()).unwrap();
        let mut app = Appender::create(files.clone(), 0, 1, 0, 9, 1 << 20).unwrap();
        let rec = record(&app, &[b"kept"]);
        app.append(&rec, &[b"kept"]).unwrap();
        app.sync().unwrap();
        let kept = (app.position(), app.chain());
        let rec = record(&app, &[b"lost"]);
        app.append(&rec, &[b"lost"]).unwrap();
        app.roll_back().unwrap();
        assert_eq!((app.position(), app.chain()), kept);
        assert_eq!(std::fs::metadata(files.path(0)).unwrap().len(), kept.0 .1);
    }

    #[test]
    fn files_no_pointer_refers_to_are_offered_for_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(dir.path()).unwrap();
        let mut app = Appender::create(files.clone(), 0, 1, 0, 9, 1 << 20).unwrap();
        let at = Location { file: 0, offset: 28, len: 10 };
        app.counted(at);
        app.start_after(0, 1).unwrap();
        assert!(app.unreferenced().is_empty());
        app.released(at);
        assert_eq!(app.unreferenced(), vec![0]);
        let held = files.file(0).unwrap();
        app.delete(&[0]);
        assert!(files.read(at).unwrap_err().detail.contains("missing"));
        assert!(!files.path(0).exists());
        // A reader that took the file before the deletion still reads it.
        let mut buf = [0u8; 4];
        held.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"TPLF");
    }
}
