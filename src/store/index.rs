//! The index: sled 0.34 in `<data dir>/index/`, derived from the log of record and rebuilt from
//! it whenever it is behind, inconsistent or missing.
//!
//! sled 0.34's `flush()` only calls `sync_file_range` (seen with strace): it neither flushes the
//! drive's cache nor makes the file's growth durable, so nothing acknowledged may depend on it.
//! Nothing does: an ack waits for the log's sync only. The index is written after the record it
//! derives from, each record's changes in one `apply_batch` together with "applied through record
//! N" ([`Applied`]), and made durable in the background ([`Index::persist`]: sled's flush, then an
//! fsync of its files). Whatever a crash leaves of it, the log says what it must hold: at open,
//! the records after N are applied again, and an index that claims a record the log does not hold
//! is rebuilt (see `recovery.rs`).
//!
//! Keys of the one tree `index` (integers big-endian in keys, so that they sort by value):
//! ```text
//! 'p' | stream id u32 | first tick u64  → pointer: file u32 | offset u64 | len u32 | seq u64 | crc u32
//! 'c' | stream name                     → the stream as a `Define` record holds it
//! 't' | stream id u32                   → what retention removed: floor | through | records | bytes
//! 'q' | producer id                     → the producer's state (`producers.rs`)
//! 'm' | "applied" / "server_id" / "next_id" / "checkpoint" (the file of the newest checkpoint)
//! ```
//! A pointer's `crc` covers its key and fields, so a pointer stored under another key, or damaged,
//! is never followed; `seq` is the record that wrote the chunk there.

use super::commit::{self, Body, Defined, Fixed, Removed};
use super::files::{Location, RecordAt};
use super::le::{Put, Reader};
use crate::error::{Error, Result};
use crate::types::{StreamId, StreamMeta, Tick};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The directory under the data dir.
pub const DIR: &str = "index";

const POINTER: u8 = b'p';
const CATALOG: u8 = b'c';
const REMOVED: u8 = b't';
const PRODUCER: u8 = b'q';
const APPLIED: &[u8] = b"mapplied";
const SERVER_ID: &[u8] = b"mserver_id";
const NEXT_ID: &[u8] = b"mnext_id";
const CHECKPOINT: &[u8] = b"mcheckpoint";

/// Where a chunk is, as the index keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    pub at: Location,
    /// The record that wrote the chunk there.
    pub seq: u64,
}

impl Pointer {
    fn encode(&self, key: &[u8]) -> [u8; 28] {
        let mut v = Vec::with_capacity(28);
        v.put_u32(self.at.file);
        v.put_u64(self.at.offset);
        v.put_u32(self.at.len);
        v.put_u64(self.seq);
        let mut crc = crc32fast::Hasher::new();
        crc.update(key);
        crc.update(&v);
        v.put_u32(crc.finalize());
        v.try_into().unwrap_or([0; 28])
    }

    /// The pointer stored under `key`, or why it cannot be followed.
    pub fn decode(key: &[u8], value: &[u8]) -> std::result::Result<Pointer, String> {
        if value.len() != 28 {
            return Err(format!("a chunk pointer of {} bytes (28 expected)", value.len()));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(key);
        crc.update(&value[..24]);
        let mut r = Reader(value);
        let (file, offset, len, seq, stored) = (r.u32()?, r.u64()?, r.u32()?, r.u64()?, r.u32()?);
        if crc.finalize() != stored {
            return Err(
                "the index's pointer to the chunk fails its CRC (damaged, or stored under another key)"
                    .into(),
            );
        }
        Ok(Pointer { at: Location { file, offset, len }, seq })
    }
}

/// The key of stream `id`'s chunk starting at `tick`.
pub fn pointer_key(id: StreamId, tick: Tick) -> [u8; 13] {
    let mut k = [POINTER; 13];
    k[1..5].copy_from_slice(&id.0.to_be_bytes());
    k[5..].copy_from_slice(&tick.0.to_be_bytes());
    k
}

/// The stream and first tick of a pointer key.
pub fn key_parts(key: &[u8]) -> (StreamId, Tick) {
    let id = key.get(1..5).and_then(|b| b.try_into().ok()).map_or(0, u32::from_be_bytes);
    let tick = key.get(5..13).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
    (StreamId(id), Tick(tick))
}

fn catalog_key(name: &str) -> Vec<u8> {
    [&[CATALOG][..], name.as_bytes()].concat()
}

fn removed_key(id: StreamId) -> [u8; 5] {
    let mut k = [REMOVED; 5];
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
}

fn producer_key(id: &str) -> Vec<u8> {
    [&[PRODUCER][..], id.as_bytes()].concat()
}

/// How far the index has applied the log: record `seq`, which lies at `at` and whose CRC is `crc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub at: RecordAt,
    pub crc: u32,
    /// The record's flags (`commit::FLAG_SYNCED`).
    pub flags: u16,
    /// The record's clock.
    pub clock: Tick,
}

impl Applied {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48);
        v.put_u64(self.seq);
        v.put_u32(self.at.file);
        v.put_u64(self.at.start);
        v.put_u64(self.at.end);
        v.put_u32(self.crc);
        v.put_u16(self.flags);
        v.put_u64(self.clock.0);
        let crc = crc32fast::hash(&v);
        v.put_u32(crc);
        v
    }

    fn decode(value: &[u8]) -> std::result::Result<Applied, String> {
        let Some((body, crc)) = value.split_last_chunk::<4>() else { return Err("too short".into()) };
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err("fails its CRC".into());
        }
        let mut r = Reader(body);
        let (seq, file, start, end, crc, flags, clock) =
            (r.u64()?, r.u32()?, r.u64()?, r.u64()?, r.u32()?, r.u16()?, r.u64()?);
        r.end()?;
        Ok(Applied { seq, at: RecordAt { file, start, end }, crc, flags, clock: Tick(clock) })
    }
}

/// What applying a record changed among the pointers, for the chunk files' accounting.
#[derive(Debug, Default)]
pub struct Changed {
    /// Chunks the index now points to.
    pub added: Vec<Location>,
    /// Chunks it no longer points to (removed, or replaced by a moved copy).
    pub released: Vec<Location>,
}

/// One catalog entry with what retention removed of the stream.
pub type Entry = (Defined, Removed);

/// A record written to the log, as the index applies it.
#[derive(Debug, Clone)]
pub struct Written {
    pub fixed: Fixed,
    pub body: Body,
    pub at: RecordAt,
    pub crc: u32,
    /// Where its data starts, from the start of the record.
    pub data_offset: u64,
}

impl Written {
    /// The pointers of the chunks it holds.
    pub fn pointers(&self) -> Vec<(StreamId, Tick, Pointer)> {
        let mut offset = self.at.start + self.data_offset;
        let mut out = Vec::with_capacity(self.body.chunks().len());
        for chunk in self.body.chunks() {
            let at = Location { file: self.at.file, offset, len: chunk.len };
            out.push((chunk.stream, chunk.first, Pointer { at, seq: self.fixed.seq }));
            offset += u64::from(chunk.len);
        }
        out
    }
}

/// The index of one data dir.
pub struct Index {
    dir: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
}

impl Index {
    /// Opens (or creates) the index in `data_dir`, with `cache_bytes` of sled's page cache.
    pub fn open(data_dir: &Path, cache_bytes: u64) -> Result<Index> {
        Index::open_dir(&data_dir.join(DIR), cache_bytes)
    }

    /// Opens the index in `data_dir` that this process has just closed: sled lets go of its
    /// lock on its files in the background, so a lock still held is waited for (a while).
    pub fn reopen(data_dir: &Path, cache_bytes: u64) -> Result<Index> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Index::open(data_dir, cache_bytes) {
                Err(err) if is_locked(&err) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                opened => return opened,
            }
        }
    }

    /// Opens (or creates) an index in the directory `dir`.
    pub fn open_dir(dir: &Path, cache_bytes: u64) -> Result<Index> {
        let dir = dir.to_path_buf();
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(cache_bytes)
            // Flushed by `persist`, in the background.
            .flush_every_ms(None)
            .open()
            .map_err(|err| Error::Open { path: dir.clone(), cause: open_failure(&err) })?;
        let tree = db.open_tree("index")?;
        Ok(Index { dir, db, tree })
    }

    /// Deletes the index of `data_dir` (before a rebuild).
    pub fn remove(data_dir: &Path) -> Result<()> {
        Index::remove_dir(&data_dir.join(DIR))
    }

    /// Deletes the index in the directory `dir`.
    pub fn remove_dir(dir: &Path) -> Result<()> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => dir.parent().map_or(Ok(()), super::files::sync_dir),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { context: format!("removing {}", dir.display()), source }),
        }
    }

    /// How far the log was applied; `None` for an index that was never completed.
    pub fn applied(&self) -> Result<Option<Applied>> {
        match self.tree.get(APPLIED)? {
            None => Ok(None),
            Some(v) => Applied::decode(&v)
                .map(Some)
                .map_err(|detail| Error::Internal(format!("the index's applied mark is damaged: {detail}"))),
        }
    }

    /// The broker's identity, once a checkpoint was applied.
    pub fn server_id(&self) -> Result<Option<String>> {
        Ok(self.tree.get(SERVER_ID)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The file holding the newest checkpoint applied.
    pub fn checkpoint_file(&self) -> Result<Option<u32>> {
        let stored = self.tree.get(CHECKPOINT)?;
        Ok(stored.and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok()).map(u32::from_le_bytes))
    }

    /// The id the next new stream takes.
    pub fn next_id(&self) -> Result<u32> {
        let stored = self.tree.get(NEXT_ID)?;
        Ok(stored.and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok()).map_or(0, u32::from_le_bytes))
    }

    /// Applies one record of the log (`fixed` and `body`, written at `at`, with CRC `crc`, its
    /// data starting `data_offset` bytes into it) in one atomic batch together with the applied
    /// mark. `producers` are the states of the producers the record touched, as they are after it
    /// (`None`: forgotten). Applying a record twice changes nothing the second time.
    pub fn apply(
        &self,
        fixed: &Fixed,
        body: &Body,
        at: RecordAt,
        crc: u32,
        data_offset: u64,
        producers: &[(Arc<str>, Option<Vec<u8>>)],
    ) -> Result<Changed> {
        let record = Written { fixed: *fixed, body: body.clone(), at, crc, data_offset };
        self.apply_all(std::slice::from_ref(&record), producers)
    }

    /// Applies records of the log in order, in one atomic batch together with the applied mark
    /// (the last record's): many appends at once cost sled one batch. Only the first record may
    /// remove or replace pointers (a trim, delete, move or checkpoint reads sled to know which);
    /// the writer applies those alone. `producers` are the states of the producers the records
    /// touched, as they are after the last.
    pub fn apply_all(
        &self,
        records: &[Written],
        producers: &[(Arc<str>, Option<Vec<u8>>)],
    ) -> Result<Changed> {
        let Some(last) = records.last() else { return Ok(Changed::default()) };
        let mut batch = sled::Batch::default();
        let mut changed = Changed::default();
        // Read only when a record can raise it: most records create no stream.
        let creates = records.iter().any(|r| match &r.body {
            Body::Append { created, .. } => !created.is_empty(),
            Body::Define { .. } | Body::Checkpoint(_) => true,
            _ => false,
        });
        let mut next_id = if creates { self.next_id()? } else { 0 };
        for record in records {
            self.add_to(&mut batch, &mut changed, &mut next_id, record)?;
        }
        for (id, state) in producers {
            match state {
                Some(state) => batch.insert(producer_key(id), state.clone()),
                None => batch.remove(producer_key(id)),
            }
        }
        if creates {
            batch.insert(NEXT_ID, &next_id.to_le_bytes()[..]);
        }
        let applied = Applied {
            seq: last.fixed.seq,
            at: last.at,
            crc: last.crc,
            flags: last.fixed.flags,
            clock: last.fixed.clock,
        };
        batch.insert(APPLIED, applied.encode());
        self.tree.apply_batch(batch)?;
        Ok(changed)
    }

    /// Adds what one record changes to `batch`.
    fn add_to(
        &self,
        batch: &mut sled::Batch,
        changed: &mut Changed,
        next_id: &mut u32,
        record: &Written,
    ) -> Result<()> {
        let Written { fixed, body, at, data_offset, .. } = record;
        let mut offset = at.start + data_offset;
        // Only a move replaces chunks: an append's keys are new (ticks only grow).
        let moves = matches!(body, Body::Move { .. });
        for chunk in body.chunks() {
            let key = pointer_key(chunk.stream, chunk.first);
            let pointer = Pointer { at: Location { file: at.file, offset, len: chunk.len }, seq: fixed.seq };
            if moves {
                if let Some(old) = self.tree.get(key)? {
                    changed.released.extend(Pointer::decode(&key, &old).ok().map(|p| p.at));
                }
            }
            batch.insert(&key[..], &pointer.encode(&key)[..]);
            changed.added.push(pointer.at);
            offset += u64::from(chunk.len);
        }
        match body {
            Body::Append { created, .. } => {
                for (id, name, tick) in created {
                    let defined =
                        Defined { id: *id, name: name.clone(), created: *tick, meta: StreamMeta::default() };
                    batch.insert(catalog_key(name), catalog_value(&defined));
                    *next_id = (*next_id).max(id.0.saturating_add(1));
                }
            }
            Body::Define { stream, .. } => {
                batch.insert(catalog_key(&stream.name), catalog_value(stream));
                *next_id = (*next_id).max(stream.id.0.saturating_add(1));
            }
            Body::Delete { id, name } => {
                batch.remove(catalog_key(name));
                batch.remove(&removed_key(*id)[..]);
                self.remove_pointers(batch, changed, *id, Tick(u64::MAX))?;
            }
            Body::Trim { id, removed } => {
                batch.insert(&removed_key(*id)[..], removed_value(removed));
                self.remove_pointers(batch, changed, *id, Tick(removed.floor.0.saturating_sub(1)))?;
            }
            Body::Move { .. } | Body::Clock => {}
            Body::Checkpoint(c) => {
                for prefix in [CATALOG, REMOVED, PRODUCER] {
                    for entry in self.tree.scan_prefix([prefix]) {
                        batch.remove(entry?.0);
                    }
                }
                for (stream, removed) in &c.streams {
                    batch.insert(catalog_key(&stream.name), catalog_value(stream));
                    batch.insert(&removed_key(stream.id)[..], removed_value(removed));
                }
                for (id, state) in &c.producers {
                    batch.insert(producer_key(id), state.clone());
                }
                batch.insert(SERVER_ID, c.server_id.as_bytes());
                batch.insert(CHECKPOINT, &at.file.to_le_bytes()[..]);
                *next_id = (*next_id).max(c.next_id);
            }
        }
        Ok(())
    }

    /// Adds to `batch` the removal of stream `id`'s pointers with a first tick up to `upto`.
    fn remove_pointers(
        &self,
        batch: &mut sled::Batch,
        changed: &mut Changed,
        id: StreamId,
        upto: Tick,
    ) -> Result<()> {
        for entry in self.tree.range(pointer_key(id, Tick(0))..=pointer_key(id, upto)) {
            let (key, value) = entry?;
            changed.released.extend(Pointer::decode(&key, &value).ok().map(|p| p.at));
            batch.remove(key);
        }
        Ok(())
    }

    /// Removes the pointers of streams the catalog does not hold and those below a stream's
    /// floor: what records lost with deleted chunk files removed (a checkpoint stands for them).
    /// Returns how many went.
    pub fn prune(&self) -> Result<usize> {
        let entries = self.catalog()?;
        let floors: std::collections::HashMap<StreamId, Tick> =
            entries.iter().map(|(d, removed)| (d.id, removed.floor)).collect();
        let mut batch = sled::Batch::default();
        let mut pruned = 0;
        for entry in self.tree.scan_prefix([POINTER]) {
            let (key, _) = entry?;
            let (id, tick) = key_parts(&key);
            if floors.get(&id).is_none_or(|floor| tick < *floor) {
                batch.remove(key);
                pruned += 1;
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(pruned)
    }

    /// Every stream of the catalog, with what retention removed of it. A malformed entry is
    /// skipped with an error in the log (a rebuild restores it).
    pub fn catalog(&self) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for entry in self.tree.scan_prefix([CATALOG]) {
            let (key, value) = entry?;
            let name: Arc<str> = Arc::from(String::from_utf8_lossy(&key[1..]).as_ref());
            let defined = match decode_catalog(&name, &value) {
                Ok(defined) => defined,
                Err(detail) => {
                    tracing::error!(stream = %name, %detail, "a catalog entry of the index is damaged; skipped");
                    continue;
                }
            };
            let removed = match self.tree.get(removed_key(defined.id))? {
                None => Removed::default(),
                Some(v) => decode_removed(&v).unwrap_or_else(|detail| {
                    tracing::error!(stream = %name, %detail, "what retention removed of a stream is unreadable in the index");
                    Removed::default()
                }),
            };
            entries.push((defined, removed));
        }
        Ok(entries)
    }

    /// Every idempotent producer's stored state.
    pub fn producers(&self) -> Result<Vec<(Arc<str>, sled::IVec)>> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix([PRODUCER]) {
            let (key, value) = entry?;
            out.push((Arc::from(String::from_utf8_lossy(&key[1..]).as_ref()), value));
        }
        Ok(out)
    }

    /// The pointers of stream `id` with a first tick in `from..=upto`, in order.
    pub fn range(
        &self,
        id: StreamId,
        from: Tick,
        upto: Tick,
    ) -> impl DoubleEndedIterator<Item = Result<(Tick, Pointer)>> {
        self.tree.range(pointer_key(id, from)..=pointer_key(id, upto)).map(decode_entry)
    }

    /// The pointer of stream `id`'s chunk that starts at or before `tick`, the last such.
    pub fn at_or_before(&self, id: StreamId, tick: Tick) -> Result<Option<(Tick, Pointer)>> {
        self.range(id, Tick(0), tick).next_back().transpose()
    }

    /// The pointer under stream `id`'s key `tick`, if any.
    pub fn get(&self, id: StreamId, tick: Tick) -> Result<Option<Pointer>> {
        let key = pointer_key(id, tick);
        match self.tree.get(key)? {
            None => Ok(None),
            Some(v) => Pointer::decode(&key, &v).map(Some).map_err(|detail| damaged(id, tick, detail)),
        }
    }

    /// Every pointer, in key order.
    pub fn pointers(&self) -> impl Iterator<Item = Result<(StreamId, Tick, Pointer)>> {
        self.tree.scan_prefix([POINTER]).map(|entry| {
            let (key, value) = entry?;
            let (id, tick) = key_parts(&key);
            let pointer = Pointer::decode(&key, &value).map_err(|detail| damaged(id, tick, detail))?;
            Ok((id, tick, pointer))
        })
    }

    /// Whether every entry reads back as what this build writes: an index with one that does not
    /// (damaged, or written by another build) is rebuilt rather than trusted entry by entry.
    pub fn is_sound(&self) -> bool {
        for entry in self.tree.iter() {
            let Ok((key, value)) = entry else {
                tracing::warn!("the index cannot be read through");
                return false;
            };
            if let Some(detail) = unsound(&key, &value) {
                tracing::warn!(key = %String::from_utf8_lossy(&key), %detail, "an entry of the index does not read back");
                return false;
            }
        }
        true
    }

    /// Bytes sled's files take.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    /// Makes what was applied durable: sled's flush, then an fsync of its files and directory
    /// (sled's flush alone does not reach the disk's cache). Blocking.
    pub fn persist(&self) -> Result<()> {
        self.db.flush()?;
        // sled keeps large values in files of `blobs/`.
        let blobs = self.dir.join("blobs");
        let mut paths = vec![self.dir.join("db"), self.dir.join("conf")];
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            paths.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        }
        for path in &paths {
            match std::fs::File::open(path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io { context: format!("syncing {}", path.display()), source })
                }
            }
        }
        if blobs.is_dir() {
            super::files::sync_dir(&blobs)?;
        }
        super::files::sync_dir(&self.dir)
    }
}

fn decode_entry(entry: sled::Result<(sled::IVec, sled::IVec)>) -> Result<(Tick, Pointer)> {
    let (key, value) = entry?;
    let (id, tick) = key_parts(&key);
    let pointer = Pointer::decode(&key, &value).map_err(|detail| damaged(id, tick, detail))?;
    Ok((tick, pointer))
}

/// A pointer that cannot be followed: the chunk it names is lost to readers until a rebuild.
fn damaged(id: StreamId, tick: Tick, detail: String) -> Error {
    Error::DamagedPointer { stream: id.0, tick, detail }
}

fn catalog_value(d: &Defined) -> Vec<u8> {
    let mut v = Vec::new();
    commit::put_defined(&mut v, d);
    v
}

/// The catalog entry stored under `name`.
fn decode_catalog(name: &str, value: &[u8]) -> std::result::Result<Defined, String> {
    let mut r = Reader(value);
    let defined = commit::get_defined(&mut r)?;
    r.end()?;
    if defined.name.as_ref() != name {
        return Err(format!("a catalog entry for {:?} stored under {name:?}", defined.name));
    }
    Ok(defined)
}

fn removed_value(removed: &Removed) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    commit::put_removed(&mut v, removed);
    v
}

fn decode_removed(value: &[u8]) -> std::result::Result<Removed, String> {
    let mut r = Reader(value);
    let removed = commit::get_removed(&mut r)?;
    r.end()?;
    Ok(removed)
}

/// Why the entry `key` → `value` is not one this build wrote (`None`: it is).
fn unsound(key: &[u8], value: &[u8]) -> Option<String> {
    let four = |v: &[u8]| if v.len() == 4 { Ok(()) } else { Err(format!("{} bytes (4 expected)", v.len())) };
    let checked = match key {
        [POINTER, ..] if key.len() == 13 => Pointer::decode(key, value).map(drop),
        [CATALOG, name @ ..] => std::str::from_utf8(name)
            .map_err(|e| e.to_string())
            .and_then(|name| decode_catalog(name, value).map(drop)),
        [REMOVED, ..] if key.len() == 5 => decode_removed(value).map(drop),
        [PRODUCER, ..] => super::producers::decode(value).map(drop),
        APPLIED => Applied::decode(value).map(drop),
        SERVER_ID => std::str::from_utf8(value).map(drop).map_err(|e| e.to_string()),
        NEXT_ID | CHECKPOINT => four(value),
        _ => Err("a key this build does not write".into()),
    };
    checked.err()
}

/// Why sled could not open the index, with what to do about it.
fn open_failure(err: &sled::Error) -> String {
    match err {
        // sled reports a held lock only in the message of an `Other` I/O error.
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            "another process holds its lock (is another tapeline serving it?)".into()
        }
        _ => format!("the index (sled) cannot be opened: {err}"),
    }
}

/// Whether opening failed because another process holds the data dir.
pub fn is_locked(err: &Error) -> bool {
    matches!(err, Error::Open { cause, .. } if cause.contains("holds its lock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commit::{ChunkEntry, Kind};

    fn fixed(kind: Kind, seq: u64) -> Fixed {
        Fixed { kind, flags: 0, seq, prev_crc: 0, clock: Tick(seq), meta_len: 0, data_len: 0 }
    }

    #[test]
    fn records_apply_idempotently_and_say_what_they_released() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let chunks = vec![
            ChunkEntry { stream: StreamId(0), first: Tick(10), len: 100 },
            ChunkEntry { stream: StreamId(0), first: Tick(20), len: 50 },
        ];
        let append =
            Body::Append { created: vec![(StreamId(0), Arc::from("s"), Tick(10))], tags: Vec::new(), chunks };
        let at = RecordAt { file: 3, start: 24, end: 500 };
        let changed = index.apply(&fixed(Kind::Append, 1), &append, at, 7, 60, &[]).unwrap();
        assert_eq!(
            changed.added,
            vec![Location { file: 3, offset: 84, len: 100 }, Location { file: 3, offset: 184, len: 50 }]
        );
        index.apply(&fixed(Kind::Append, 1), &append, at, 7, 60, &[]).unwrap();
        assert_eq!(index.pointers().count(), 2, "applied twice: the same pointers");
        let moved = Body::Move { chunks: vec![ChunkEntry { stream: StreamId(0), first: Tick(20), len: 50 }] };
        let elsewhere = RecordAt { file: 4, start: 24, end: 200 };
        let changed_by_move = index.apply(&fixed(Kind::Move, 2), &moved, elsewhere, 8, 60, &[]).unwrap();
        assert_eq!(changed_by_move.released, vec![Location { file: 3, offset: 184, len: 50 }]);
        assert_eq!(changed_by_move.added, vec![Location { file: 4, offset: 84, len: 50 }]);
        assert_eq!(index.applied().unwrap().unwrap().seq, 2);
        assert_eq!(index.next_id().unwrap(), 1);
        assert_eq!(index.catalog().unwrap()[0].0.name.as_ref(), "s");

        let removed = Removed { floor: Tick(20), through: Some(Tick(15)), records: 3, bytes: 30 };
        let trim = Body::Trim { id: StreamId(0), removed };
        let changed = index.apply(&fixed(Kind::Trim, 3), &trim, at, 8, 0, &[]).unwrap();
        assert_eq!(changed.released, vec![Location { file: 3, offset: 84, len: 100 }]);
        assert_eq!(index.range(StreamId(0), Tick(0), Tick(u64::MAX)).count(), 1);
        assert_eq!(index.catalog().unwrap()[0].1, removed);

        let delete = Body::Delete { id: StreamId(0), name: Arc::from("s") };
        index.apply(&fixed(Kind::Delete, 4), &delete, at, 9, 0, &[]).unwrap();
        assert!(index.catalog().unwrap().is_empty());
        assert_eq!(index.pointers().count(), 0);
        assert_eq!(index.next_id().unwrap(), 1, "a deleted stream's id is not used again");
    }

    #[test]
    fn a_pointer_under_another_key_or_damaged_is_refused() {
        let key = pointer_key(StreamId(1), Tick(5));
        let value = Pointer { at: Location { file: 1, offset: 2, len: 3 }, seq: 4 }.encode(&key);
        assert!(Pointer::decode(&key, &value).is_ok());
        assert!(Pointer::decode(&pointer_key(StreamId(1), Tick(6)), &value).is_err());
        for i in 0..value.len() {
            let mut bad = value;
            bad[i] ^= 1;
            assert!(Pointer::decode(&key, &bad).is_err(), "flip at {i}");
        }
    }
}
