//! Opening a data dir: the index is brought up to the log of record, then the in-memory state is
//! read from the index.
//!
//! The procedure, each step safe to repeat if a crash interrupts it:
//! 1. The data dir's lock is taken for the life of the broker (`<data>/lock`): nothing below may
//!    run twice at once. The newest chunk file is synced: a broker killed before its sync leaves
//!    written bytes in the kernel's cache, and nothing is built on them before they are durable.
//! 2. The index says it applied the log through record N, at a position, with a CRC. If the log
//!    holds that very record there and every entry of the index reads back, the records after it
//!    are applied again, in order (a record applied twice changes nothing the second time).
//! 3. Otherwise (no index, one sled cannot open, one without a mark, one with an entry that does
//!    not read back, one whose mark the log does not hold) the index is rebuilt from the log alone
//!    into `index.rebuild/` and renamed into place: every record from the oldest file on; a
//!    checkpoint replaces the catalog and producers found so far (the records of deleted files are
//!    summarised by a checkpoint written before the deletion). The old index stays until the new
//!    one is complete.
//! 4. Either way, the pointers of streams that are gone or of chunks retention removed are then
//!    pruned (a replay may have met a checkpoint).
//! 5. Applying stops at the end of the log. A record whose fixed part checks out has a known
//!    extent: nothing inside it is ever taken for a record. A record that does not check out
//!    (short, failing a CRC, or not chained to its predecessor by sequence number and CRC) is a
//!    torn tail when it is in the newest file and no whole record follows it: the file is cut there
//!    (said in the log; under `fsync = always` a torn record was never acknowledged). Anywhere
//!    else it is damage: what can be read of it is applied, reads report the rest as `DATA_LOSS`,
//!    and nothing is cut (an older file was synced before the next was started).
//! 6. An index whose mark names a record written under `fsync = always` (so synced before it was
//!    applied) that the log does not hold means the chunk files lost acknowledged records: the
//!    broker refuses to serve and says how to go on, rather than serve a log with a silent hole.
//!    Under `interval` or `never` that is what a crash may do: the index is rebuilt. A log written
//!    by a newer build, or one with files but no readable record, is refused too: nothing of it is
//!    cut or deleted.

use super::commit::{self, Body, Checkpoint, Encoded, HeaderError, FILE_HEADER_LEN};
use super::files::{self, Appender, ChunkFiles, Location};
use super::index::{Applied, Index};
use super::producers::{self, Producers};
use super::walk::{Scanned, Step, Walk};
use super::{chunk, upgrade};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::types::{Recent, StreamInfo, Tick, Trimmed};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use tracing::{debug, error, info, warn};

/// The lock file in the data dir.
const LOCK: &str = "lock";

/// What opening a data dir recovered.
pub struct Recovered {
    pub index: Index,
    pub chunks: Arc<ChunkFiles>,
    pub appender: Appender,
    pub streams: HashMap<Arc<str>, StreamInfo>,
    pub producers: Producers,
    /// The highest tick ever promised: no tick at or below it may be assigned.
    pub clock: Tick,
    pub next_id: u32,
    pub server_id: String,
    /// The file of the newest checkpoint.
    pub checkpoint_file: u32,
    /// The data dir's lock, held as long as this is.
    pub lock: File,
}

/// Opens (or creates) the log in `path`.
pub fn open(path: &Path, config: &Config) -> Result<Recovered> {
    create_dir(path)?;
    let lock = lock(path)?;
    upgrade::if_needed(path)?;
    create_dir(&path.join(files::DIR))?;
    let chunks = ChunkFiles::open(path)?;
    let salt = log_salt(path, &chunks)?;
    chunks
        .sync_newest()
        .map_err(|source| Error::Io { context: "syncing the newest chunk file".into(), source })?;
    let (index, applied) = open_index(path, config.cache_bytes)?;
    let mut producers = Producers::default();
    let sound = match (salt, &applied) {
        (Some(salt), Some(applied)) => holds(&chunks, applied, salt)? && index.is_sound(),
        _ => false,
    };
    let (index, replayed, salt) = match (salt, applied) {
        (Some(salt), Some(applied)) if sound => {
            restore_producers(&index, &mut producers)?;
            let from = Cursor {
                file: applied.at.file,
                offset: applied.at.end,
                chain: Some((applied.seq + 1, applied.crc)),
            };
            let mut replayed = replay(&chunks, &index, &mut producers, from, salt)?;
            replayed.clock = replayed.clock.max(applied.clock);
            if let Some(torn) = &replayed.torn {
                torn.cut(&chunks)?;
            }
            if replayed.applied > 0 {
                info!(
                    records = replayed.applied,
                    "the index was behind the log: commit records applied again"
                );
            }
            (index, replayed, salt)
        }
        (salt, applied) => {
            // Closed: the rebuild replaces it, or leaves it as it is when it refuses the log.
            drop(index);
            rebuild(path, &chunks, config, &mut producers, applied, salt)?
        }
    };
    let pruned = index.prune()?;
    if pruned > 0 {
        debug!(pointers = pruned, "pointers of removed chunks and deleted streams pruned");
    }
    let Some(end) = replayed.end else {
        return Err(Error::Internal("the log has no record after a rebuild".into()));
    };
    let mut appender = Appender::resume(
        chunks.clone(),
        end.file,
        end.len,
        end.chain.0,
        end.chain.1,
        salt,
        config.chunk_file_bytes,
    )?;
    let whole = count_pointers(&index, &chunks, &mut appender)? && replayed.damaged.is_empty();
    let (streams, last) = read_streams(&index, &chunks)?;
    if whole {
        let emptied = appender.adopt_unreferenced();
        if !emptied.is_empty() {
            info!(files = ?emptied, "chunk files that hold no chunk any more (their deletion was put off): deleted once a checkpoint after them is written");
        }
    } else {
        warn!(
            "the log or the index is damaged: chunk files no chunk refers to are kept for `tapeline recover`"
        );
    }
    let clock = replayed.clock.max(last.unwrap_or_default());
    let server_id = match index.server_id()? {
        Some(id) => id,
        None => {
            warn!("the log holds no checkpoint with the broker's identity: a new one is made");
            Checkpoint::new_server_id()
        }
    };
    let checkpoint_file = index.checkpoint_file()?.unwrap_or(0);
    let next_id = index.next_id()?;
    // The index as recovered is made durable now: a crash during the next run replays only what
    // that run adds.
    index.persist()?;
    info!(path = %path.display(), streams = streams.len(), producers = producers.len(), tail_tick = %clock, "log opened");
    Ok(Recovered {
        index,
        chunks,
        appender,
        streams,
        producers,
        clock,
        next_id,
        server_id,
        checkpoint_file,
        lock,
    })
}

/// Creates `dir` if it does not exist, making its name durable.
fn create_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|source| Error::Io { context: format!("creating {}", dir.display()), source })?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => files::sync_dir(parent),
        _ => Ok(()),
    }
}

/// Takes the data dir's lock, or says who holds it.
pub(super) fn lock(path: &Path) -> Result<File> {
    let lock_path = path.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| Error::Io { context: format!("opening {}", lock_path.display()), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Open {
            path: path.to_path_buf(),
            cause: "another process holds its lock (is another tapeline serving it?)".into(),
        }),
        Err(std::fs::TryLockError::Error(source)) => {
            Err(Error::Io { context: format!("locking {}", lock_path.display()), source })
        }
    }
}

/// The log's salt, from the first chunk file with a whole header (`None`: no file has one). A
/// file of a newer build's format refuses the open.
pub(super) fn log_salt(path: &Path, chunks: &ChunkFiles) -> Result<Option<u32>> {
    let mut salt = None;
    for id in chunks.ids() {
        let Some(file) = chunks.file(id) else { continue };
        let mut walk = Walk::new(&file, id, 0).map_err(|e| read_error(chunks, id, e))?;
        match walk.header().map_err(|e| read_error(chunks, id, e))? {
            Ok(header) => {
                salt.get_or_insert(header.salt);
            }
            Err(HeaderError::Format(format)) => {
                return Err(Error::Open {
                    path: path.to_path_buf(),
                    cause: format!(
                        "{} was written by a newer build of tapeline (file format {format}): serve it with that build",
                        chunks.path(id).display()
                    ),
                })
            }
            Err(HeaderError::Damaged(_)) => {}
        }
    }
    Ok(salt)
}

/// Opens the index and reads its mark; an index sled cannot open, or whose mark is unreadable, is
/// deleted (to be rebuilt).
fn open_index(path: &Path, cache_bytes: u64) -> Result<(Index, Option<Applied>)> {
    let opened = Index::open(path, cache_bytes).and_then(|index| {
        let applied = index.applied()?;
        Ok((index, applied))
    });
    match opened {
        Ok(opened) => Ok(opened),
        Err(err) => {
            warn!(cause = %err, "the index cannot be read: it is rebuilt from the chunk files");
            Index::remove(path)?;
            Ok((Index::open(path, cache_bytes)?, None))
        }
    }
}

/// Whether the log holds the record the index's mark names, where it says.
pub(super) fn holds(chunks: &ChunkFiles, applied: &Applied, salt: u32) -> Result<bool> {
    let len = applied.at.end.saturating_sub(applied.at.start);
    if chunks.file(applied.at.file).is_none() || len < commit::OVERHEAD || len > u64::from(u32::MAX) {
        return Ok(false);
    }
    let at = Location { file: applied.at.file, offset: applied.at.start, len: len as u32 };
    let Ok(bytes) = chunks.read(at) else { return Ok(false) };
    Ok(commit::check(&bytes, salt).is_ok_and(|(fixed, _)| fixed.seq == applied.seq)
        && bytes[bytes.len() - 4..] == applied.crc.to_le_bytes())
}

fn restore_producers(index: &Index, producers: &mut Producers) -> Result<()> {
    for (id, value) in index.producers()? {
        // The index was found sound: every state reads back.
        if let Ok(state) = producers::decode(&value) {
            producers.restore(id, state);
        }
    }
    Ok(())
}

/// Where a rebuild builds the new index, renamed into place once it is complete.
const REBUILD_DIR: &str = "index.rebuild";

/// Applies the whole log to a new index, which then replaces the old one. `applied` is the old
/// index's mark, if it had one: when it names a synced record the log no longer holds,
/// acknowledged records are missing and the open is refused, leaving the data dir as it was.
/// Returns the index, what was replayed, and the log's salt (a new log's when there is none).
fn rebuild(
    path: &Path,
    chunks: &Arc<ChunkFiles>,
    config: &Config,
    producers: &mut Producers,
    applied: Option<Applied>,
    salt: Option<u32>,
) -> Result<(Index, Replayed, u32)> {
    let began = std::time::Instant::now();
    let staging = path.join(REBUILD_DIR);
    Index::remove_dir(&staging)?;
    let index = Index::open_dir(&staging, config.cache_bytes)?;
    let first = chunks.ids().first().copied();
    let mut replayed = match (first, salt) {
        (Some(file), Some(salt)) => {
            replay(chunks, &index, producers, Cursor { file, offset: 0, chain: None }, salt)?
        }
        _ => Replayed::default(),
    };
    let refuse = |err: Error| -> Result<(Index, Replayed, u32)> {
        Index::remove_dir(&staging)?;
        Err(err)
    };
    if let Some(applied) = applied {
        let end_seq = replayed.last_seq();
        if end_seq < applied.seq {
            if applied.flags & commit::FLAG_SYNCED != 0 {
                drop(index);
                return refuse(lost_records(path, end_seq, &applied));
            }
            warn!(
                from = end_seq + 1,
                to = applied.seq,
                "commit records acknowledged under fsync=interval or never were lost in a crash before their sync"
            );
        }
    }
    let new_log = replayed.end.is_none();
    if new_log && chunks.ids().len() > 1 {
        drop(index);
        return refuse(Error::Open {
            path: path.to_path_buf(),
            cause: "its chunk files hold no readable commit record: nothing was changed. \
                    `tapeline recover --data DIR --into NEW_DIR` copies whatever chunks it finds in them"
                .into(),
        });
    }
    // Only now, once the log is known to be served: nothing is cut off a log that is refused.
    if let Some(torn) = &replayed.torn {
        torn.cut(chunks)?;
    }
    let salt = match salt {
        Some(salt) if !new_log => salt,
        _ => {
            // A new data dir (or one whose only file was torn before its first record): a log
            // that starts with a checkpoint naming the broker.
            for id in chunks.ids() {
                remove_file(chunks, id);
            }
            let salt = rand::random::<u32>();
            let mut appender = Appender::create(chunks.clone(), 0, 1, 0, salt, config.chunk_file_bytes)?;
            let body = Body::Checkpoint(Checkpoint {
                server_id: Checkpoint::new_server_id(),
                ..Checkpoint::default()
            });
            let record = Encoded::new(&body, salt, 1, 0, Tick(0), commit::FLAG_SYNCED, &[] as &[&[u8]]);
            let at = appender.append(&record, &[] as &[&[u8]])?;
            appender.sync()?;
            index.apply(&record.fixed, &body, at, record.crc, record.data_offset(), &[])?;
            replayed.end = Some(End { file: 0, len: at.end, chain: (2, record.crc) });
            salt
        }
    };
    if !new_log {
        info!(records = replayed.applied, took = ?began.elapsed(), "the index was rebuilt from the chunk files");
    }
    index.persist()?;
    drop(index);
    Index::remove(path)?;
    let dir = path.join(super::index::DIR);
    std::fs::rename(&staging, &dir).map_err(|source| Error::Io {
        context: format!("moving the rebuilt index to {}", dir.display()),
        source,
    })?;
    files::sync_dir(path)?;
    Ok((Index::reopen(path, config.cache_bytes)?, replayed, salt))
}

fn lost_records(path: &Path, end_seq: u64, applied: &Applied) -> Error {
    Error::Open {
        path: path.to_path_buf(),
        cause: format!(
            "the index says commit records up to {} were written and synced (ticks up to {}), but the chunk files \
             hold them only up to record {end_seq}: acknowledged records are missing (chunk files damaged, \
             truncated or deleted, or a disk that does not keep what it synced). Nothing was served. \
             `tapeline verify --data DIR` lists the damage; `tapeline recover --data DIR --into NEW_DIR` copies \
             every readable record into a new data dir; to serve what the chunk files still hold as it is, \
             delete DIR/{}, and the index is rebuilt from them",
            applied.seq,
            applied.clock,
            super::index::DIR
        ),
    }
}

/// Where a replay starts: after the record that ends at `offset` in `file` (`chain`: the sequence
/// number and previous CRC the next record must carry), or at the start of `file` (`offset` 0).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    file: u32,
    offset: u64,
    chain: Option<(u64, u32)>,
}

/// Where the log ends: file, length, and the chain the next record continues.
#[derive(Debug, Clone, Copy)]
pub(super) struct End {
    file: u32,
    len: u64,
    chain: (u64, u32),
}

/// What a replay did.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    end: Option<End>,
    clock: Tick,
    pub applied: usize,
    /// Stretches of the log that do not check out and are not a torn tail: damage.
    pub damaged: Vec<String>,
    /// A torn tail: what follows the last whole record, cut off by [`Torn::cut`].
    pub torn: Option<Torn>,
}

/// A torn tail: file `file` (the newest) from offset `at` on (below the header: the whole file).
#[derive(Debug)]
pub(super) struct Torn {
    file: u32,
    at: u64,
    pub detail: String,
}

impl Torn {
    /// Cuts the torn tail off, so that the next record follows the last whole one.
    fn cut(&self, chunks: &ChunkFiles) -> Result<()> {
        warn!(detail = %self.detail, "a torn tail after the last whole commit record was dropped (written, never synced, so never acknowledged under fsync=always)");
        if self.at < FILE_HEADER_LEN {
            remove_file(chunks, self.file);
            return files::sync_dir(chunks.dir());
        }
        if let Some(file) = chunks.file(self.file) {
            let path = chunks.path(self.file);
            file.set_len(self.at).and_then(|()| file.sync_data()).map_err(|source| Error::Io {
                context: format!("cutting the torn tail of {}", path.display()),
                source,
            })?;
        }
        Ok(())
    }
}

impl Replayed {
    /// The sequence number of the last record of the log (0: none).
    pub fn last_seq(&self) -> u64 {
        self.end.map_or(0, |e| e.chain.0.saturating_sub(1))
    }
}

/// Applies the whole log to `index` (a new, empty one) without changing the data dir: what
/// `tapeline verify` checks the log with.
pub(super) fn replay_readonly(chunks: &ChunkFiles, index: &Index, data_dir: &Path) -> Result<Replayed> {
    let Some(file) = chunks.ids().first().copied() else { return Ok(Replayed::default()) };
    let Some(salt) = log_salt(data_dir, chunks)? else {
        let mut nothing = Replayed::default();
        nothing.damaged.push("no chunk file has a readable header".into());
        return Ok(nothing);
    };
    let replayed =
        replay(chunks, index, &mut Producers::default(), Cursor { file, offset: 0, chain: None }, salt)?;
    index.prune()?;
    Ok(replayed)
}

/// Applies the records of the log from `from` on to `index`, keeping `producers` up to date.
/// Reports damage and a torn tail; changes nothing in the files.
fn replay(
    chunks: &ChunkFiles,
    index: &Index,
    producers: &mut Producers,
    from: Cursor,
    salt: u32,
) -> Result<Replayed> {
    let mut done = Replayed::default();
    let newest = chunks.ids().last().copied();
    let ids: Vec<u32> = chunks.ids().into_iter().filter(|id| *id >= from.file).collect();
    let mut chain = from.chain;
    // The newest file header read, for a log whose newest file holds no record yet.
    let mut newest_header = None;
    // Records skipped with a missing file, not yet stood for by a checkpoint.
    let mut gap = None;
    let mut at = from.offset;
    let mut i = 0;
    'files: while i < ids.len() {
        let id = ids[i];
        let is_newest = Some(id) == newest;
        let Some(file) = chunks.file(id) else { break };
        let mut walk = Walk::new(&file, id, salt).map_err(|e| read_error(chunks, id, e))?;
        if at == 0 {
            match walk.header().map_err(|e| read_error(chunks, id, e))? {
                Ok(header) => {
                    if chain.is_some_and(|(next, _)| next != header.first_seq) {
                        // The records between lie in a deleted file: a checkpoint after them
                        // must stand for them.
                        debug!(
                            file = id,
                            first = header.first_seq,
                            "records of a deleted chunk file skipped"
                        );
                        gap.get_or_insert(id);
                        chain = None;
                    }
                    newest_header = Some((id, header.first_seq));
                }
                Err(err) => {
                    let detail = err.to_string();
                    if is_newest && find_whole(chunks, &ids[i..], 0, 0, salt)?.is_none() {
                        let detail = format!(
                            "{} holds no whole header or record (created just before a crash; {detail})",
                            chunks.path(id).display()
                        );
                        done.torn = Some(Torn { file: id, at: 0, detail });
                        break;
                    }
                    done.damaged.push(format!(
                        "{}: the file's header is damaged ({detail})",
                        chunks.path(id).display()
                    ));
                    error!(file = id, %detail, "a chunk file's header is damaged; its records are read");
                }
            }
            at = FILE_HEADER_LEN;
        }
        walk.seek(at);
        at = 0;
        let mut next = i + 1;
        loop {
            let step = walk.next_step().map_err(|e| read_error(chunks, id, e))?;
            // Where the bad stretch starts, where a search for what follows it may start (past a
            // record whose extent is known), the sequence number that would follow, why, and
            // what of the record can still be applied.
            let (bad_at, search_from, min_seq, detail, readable) = match step {
                Step::End => break,
                Step::Record(r) => {
                    let chained =
                        chain.is_none_or(|(seq, crc)| r.fixed.seq == seq && r.fixed.prev_crc == crc);
                    if let Some(body) = r.whole().filter(|_| chained) {
                        apply(index, producers, &r, body)?;
                        done.applied += 1;
                        done.clock = done.clock.max(r.fixed.clock);
                        if matches!(body, Body::Checkpoint(_)) {
                            gap = None;
                        }
                        chain = Some((r.fixed.seq + 1, r.stored_crc));
                        continue;
                    }
                    let detail = match (&r.body, r.intact, chained) {
                        (_, true, false) => {
                            "a whole record that does not follow its predecessor (stale bytes)".to_string()
                        }
                        (Err(detail), _, _) => detail.clone(),
                        _ => "the record fails its CRC".to_string(),
                    };
                    let min_seq = if chained { r.fixed.seq + 1 } else { chain.map_or(0, |(seq, _)| seq) };
                    // A chained record's extent is its own: nothing inside it is searched. A stale
                    // one may hide the start of the next record.
                    let (start, search_from) = (r.at.start, if chained { r.at.end } else { r.at.start + 1 });
                    let readable = Some(r).filter(|r| chained && r.body.is_ok());
                    (start, search_from, min_seq, detail, readable)
                }
                Step::Bad { at, detail } => (at, at + 1, chain.map_or(0, |(seq, _)| seq), detail, None),
            };
            let found = find_whole(chunks, &ids[i..], search_from, min_seq, salt)?;
            if found.is_none() && is_newest {
                let detail = format!(
                    "{} ends with {} bytes after its last whole commit record, at offset {bad_at} ({detail}): a write never completed",
                    chunks.path(id).display(),
                    walk.len().saturating_sub(bad_at)
                );
                done.torn = Some(Torn { file: id, at: bad_at, detail });
                break 'files;
            }
            let to = match &found {
                Some((j, f)) => format!("{} offset {}", chunks.path(ids[i + j]).display(), f.at.start),
                None => "the end of the file".to_string(),
            };
            done.damaged
                .push(format!("{} from offset {bad_at} to {to}: {detail}", chunks.path(id).display()));
            error!(file = id, offset = bad_at, to = %to, %detail, "commit records are damaged; reads of their chunks report DATA_LOSS");
            if let Some(r) = readable {
                // Only the data is damaged: its chunks are indexed, and reads check each.
                if let Ok(body) = &r.body {
                    apply(index, producers, &r, body)?;
                    done.applied += 1;
                }
            }
            match found {
                // An older file was synced whole before the next was started: what follows the
                // damage in it is lost, the next file goes on.
                None => {
                    chain = None;
                    break;
                }
                Some((j, found)) => {
                    chain = Some((found.fixed.seq, found.fixed.prev_crc));
                    if j == 0 {
                        walk.seek(found.at.start);
                    } else {
                        next = i + j;
                        at = found.at.start;
                        break;
                    }
                }
            }
        }
        i = next;
    }
    if let Some(file) = gap {
        let detail = format!(
            "records before {} are missing (a chunk file gone) and no checkpoint after them stands for them: streams, removals or producers they held are lost",
            chunks.path(file).display()
        );
        error!(%detail, "the log is damaged");
        done.damaged.push(detail);
    }
    // The log ends at the end of its newest file once a torn tail is cut off.
    let kept: Vec<u32> = chunks
        .ids()
        .into_iter()
        .filter(|id| done.torn.as_ref().is_none_or(|t| !(t.file == *id && t.at < FILE_HEADER_LEN)))
        .collect();
    if let Some(newest) = kept.last().copied() {
        let len = match &done.torn {
            Some(t) if t.file == newest => t.at,
            _ => chunks.file(newest).and_then(|f| f.metadata().ok()).map_or(0, |m| m.len()),
        };
        let chain = chain.or(newest_header.filter(|(id, _)| *id == newest).map(|(_, first)| (first, 0)));
        if let Some(chain) = chain.filter(|_| len >= FILE_HEADER_LEN) {
            done.end = Some(End { file: newest, len, chain });
        }
    }
    Ok(done)
}

/// Applies one whole record (or one whose data only is damaged) to the index.
fn apply(index: &Index, producers: &mut Producers, r: &Scanned, body: &Body) -> Result<()> {
    let mut touched = BTreeSet::new();
    match body {
        Body::Append { tags, .. } => {
            for (tag, ticks) in tags {
                producers.recall(tag, ticks, r.fixed.clock);
                touched.insert(tag.producer.clone());
            }
            for id in &touched {
                producers.touch(id, r.fixed.clock);
            }
        }
        Body::Checkpoint(c) => {
            producers.clear();
            for (id, state) in &c.producers {
                match producers::decode(state) {
                    Ok(state) => producers.restore(id.clone(), state),
                    Err(detail) => {
                        error!(producer = %id, %detail, "a producer's state in a checkpoint is damaged; dropped")
                    }
                }
            }
        }
        _ => {}
    }
    let writes: Vec<(Arc<str>, Option<Vec<u8>>)> = touched
        .into_iter()
        .map(|id| {
            let state = producers.encode(&id);
            (id, state)
        })
        .collect();
    index.apply(&r.fixed, body, r.at, r.stored_crc, r.data_offset(), &writes)?;
    Ok(())
}

/// The first whole record of the log with a sequence number of at least `min_seq`, at or after
/// offset `from` of the first of `ids`, or anywhere in the later ones: with its index in `ids`.
fn find_whole(
    chunks: &ChunkFiles,
    ids: &[u32],
    from: u64,
    min_seq: u64,
    salt: u32,
) -> Result<Option<(usize, Scanned)>> {
    for (j, id) in ids.iter().enumerate() {
        let Some(file) = chunks.file(*id) else { continue };
        let mut walk = Walk::new(&file, *id, salt).map_err(|e| read_error(chunks, *id, e))?;
        let start = if j == 0 { from } else { FILE_HEADER_LEN };
        if let Some(found) = walk.find_whole(start, min_seq).map_err(|e| read_error(chunks, *id, e))? {
            return Ok(Some((j, found)));
        }
    }
    Ok(None)
}

fn remove_file(chunks: &ChunkFiles, id: u32) {
    let path = chunks.path(id);
    if let Err(err) = std::fs::remove_file(&path) {
        warn!(path = %path.display(), cause = %err, "cannot remove a chunk file");
    }
    chunks.forget(id);
}

fn read_error(chunks: &ChunkFiles, id: u32, source: std::io::Error) -> Error {
    Error::Io { context: format!("reading {}", chunks.path(id).display()), source }
}

/// Counts, per chunk file, the bytes the index's pointers refer to (so that a file nothing refers
/// to any more can be deleted). Pointers into a file that is missing or too short are chunks lost
/// to damage: reads report them; new files are started after every file referred to, so that
/// their chunks never land where an old pointer points. Returns whether every pointer was found
/// whole in its file.
fn count_pointers(index: &Index, chunks: &ChunkFiles, appender: &mut Appender) -> Result<bool> {
    let (active, _) = appender.position();
    let mut highest = active;
    let mut lost = 0u64;
    let lens: HashMap<u32, u64> = chunks
        .ids()
        .into_iter()
        .filter_map(|id| Some((id, chunks.file(id)?.metadata().ok()?.len())))
        .collect();
    for entry in index.pointers() {
        let Ok((_, _, pointer)) = entry else {
            lost += 1;
            continue;
        };
        let at = pointer.at;
        highest = highest.max(at.file);
        match lens.get(&at.file) {
            Some(len) if at.offset + u64::from(at.len) <= *len => appender.counted(at),
            _ => lost += 1,
        }
    }
    if lost > 0 {
        warn!(
            chunks = lost,
            "the index points to chunks missing from the chunk files: reads of them report DATA_LOSS"
        );
    }
    if highest > active {
        warn!(
            highest,
            active, "chunks are referred to past the newest chunk file; new chunks go to a new file"
        );
        let (next, _) = appender.chain();
        appender.start_after(highest, next)?;
    }
    Ok(lost == 0)
}

/// Every stream by name.
type Streams = HashMap<Arc<str>, StreamInfo>;

/// Every stream's state from the index: counters from its first and last chunk (each chunk
/// counts what its stream held before it), the last tick from the last chunk. Returns the newest
/// record tick too.
fn read_streams(index: &Index, chunks: &ChunkFiles) -> Result<(Streams, Option<Tick>)> {
    let mut streams = HashMap::new();
    let mut newest = None;
    for (defined, removed) in index.catalog()? {
        let mut info = StreamInfo {
            name: defined.name.clone(),
            id: defined.id,
            records: 0,
            bytes: 0,
            first_tick: None,
            last_tick: None,
            created_tick: defined.created,
            trimmed: Trimmed { records: removed.records, bytes: removed.bytes, through: removed.through },
            meta: Arc::new(defined.meta),
            recent: Recent::default(),
        };
        let first = index.range(defined.id, Tick(0), Tick(u64::MAX)).next().transpose();
        let last = index.range(defined.id, Tick(0), Tick(u64::MAX)).next_back().transpose();
        if let (Ok(Some((first_tick, first))), Ok(Some((last_tick, last)))) = (first, last) {
            let head = chunks
                .read(Location { len: first.at.len.min(chunk::MAX_HEADER_BYTES), ..first.at })
                .and_then(|head| chunk::header(&head))
                .unwrap_or_default();
            let (last_head, last_records) = match chunks.read(last.at).and_then(|value| chunk::decode(&value))
            {
                Ok(decoded) => decoded,
                Err(err) => {
                    // Keep the broker available; the damaged range is reported when read.
                    error!(stream = %defined.name, tick = %last_tick, detail = %err.detail, "the stream's last chunk is damaged");
                    (chunk::ChunkHeader::default(), Vec::new())
                }
            };
            let last_bytes: u64 = last_records.iter().map(|r| (r.payload.end - r.payload.start) as u64).sum();
            info.first_tick = Some(first_tick);
            info.last_tick = Some(last_records.last().map_or(last_tick, |r| r.tick));
            info.records =
                (last_head.records_before + last_records.len() as u64).saturating_sub(head.records_before);
            info.bytes = (last_head.bytes_before + last_bytes).saturating_sub(head.bytes_before);
            info.trimmed.records = head.records_before;
            info.trimmed.bytes = head.bytes_before;
            newest = newest.max(info.last_tick);
        }
        debug!(stream = %info.name, records = info.records, "stream recovered");
        streams.insert(info.name.clone(), info);
    }
    Ok((streams, newest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataDir, FsyncPolicy};
    use crate::store::Log;
    use crate::types::NewRecord;
    use crate::types::StreamName;
    use bytes::Bytes;

    fn config(dir: &Path) -> Config {
        Config { data: DataDir::Path(dir.to_path_buf()), fsync: FsyncPolicy::Always, ..Config::default() }
    }

    fn batch(payloads: &[&str]) -> Vec<NewRecord> {
        payloads
            .iter()
            .map(|p| NewRecord {
                stream: StreamName::parse("s").unwrap(),
                tick: None,
                origin_time: None,
                headers: Vec::new(),
                payload: Bytes::copy_from_slice(p.as_bytes()),
                crc32: crc32fast::hash(p.as_bytes()),
            })
            .collect()
    }

    /// Three batches in a new data dir; returns the log file and where each batch's record ends.
    async fn three_batches(dir: &Path) -> (std::path::PathBuf, Vec<u64>) {
        let log = Log::open(&config(dir)).unwrap();
        let file = files::path_in(dir, 0);
        let mut ends = Vec::new();
        for payloads in [["a1", "a2"], ["b1", "b2"], ["c1", "c2"]] {
            log.append(batch(&payloads)).await.unwrap();
            ends.push(std::fs::metadata(&file).unwrap().len());
        }
        log.close().await.unwrap();
        (file, ends)
    }

    /// Every payload of stream `s`.
    fn payloads(log: &Log) -> Vec<String> {
        let Some(info) = log.stream("s") else { return Vec::new() };
        let read = log.read(&info, None, Tick::MAX, 1000, usize::MAX).unwrap();
        read.records
            .into_iter()
            .map(|r| String::from_utf8_lossy(&read.chunks[r.chunk as usize][r.payload]).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_log_goes_on_after_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let (file, ends) = three_batches(dir.path()).await;
        // The index lost (a rebuild reads the whole log), and half of the last record written.
        Index::remove(dir.path()).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(ends[1] + (ends[2] - ends[1]) / 2).unwrap();
        let log = Log::open(&config(dir.path())).unwrap();
        assert_eq!(payloads(&log), ["a1", "a2", "b1", "b2"]);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), ends[1], "cut after the last whole record");
        log.append(batch(&["d1"])).await.unwrap();
        log.close().await.unwrap();
        drop(log);
        let log = Log::open(&config(dir.path())).unwrap();
        assert_eq!(payloads(&log), ["a1", "a2", "b1", "b2", "d1"], "the chain goes on from the cut");
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_stale_record_after_the_end_is_not_taken_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (file, ends) = three_batches(dir.path()).await;
        Index::remove(dir.path()).unwrap();
        // A whole, valid copy of the first batch's record after the last one: its sequence
        // number and chain do not follow.
        let bytes = std::fs::read(&file).unwrap();
        let (header, first_end) = (FILE_HEADER_LEN as usize, ends[0] as usize);
        // The first batch's record follows the new log's checkpoint: the last magic before its end.
        let first =
            bytes[header..first_end].windows(4).rposition(|w| w == commit::RECORD_MAGIC).unwrap() + header;
        let mut grown = bytes.clone();
        grown.extend_from_slice(&bytes[first..first_end]);
        std::fs::write(&file, grown).unwrap();
        let log = Log::open(&config(dir.path())).unwrap();
        assert_eq!(payloads(&log), ["a1", "a2", "b1", "b2", "c1", "c2"], "nothing twice");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), ends[2]);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn damage_followed_by_whole_records_is_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (file, ends) = three_batches(dir.path()).await;
        Index::remove(dir.path()).unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes[..ends[1] as usize].windows(2).rposition(|w| w == b"b2").unwrap();
        bytes[at] ^= 0x20;
        std::fs::write(&file, &bytes).unwrap();
        let log = Log::open(&config(dir.path())).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), ends[2], "nothing cut");
        let info = log.stream("s").unwrap();
        let err = log.read(&info, None, Tick::MAX, 1000, usize::MAX).map(|r| r.records.len());
        // The first read delivers the intact chunk before the damage; the next reports it.
        assert_eq!(err.ok(), Some(2));
        let after_a = log.read(&info, None, Tick::MAX, 1000, usize::MAX).unwrap().records[1].tick;
        let damaged = log
            .read(&info, Some(after_a), Tick::MAX, 1000, usize::MAX)
            .err()
            .expect("the damaged chunk is reported");
        assert!(matches!(damaged, Error::DataLoss { .. }), "{damaged}");
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_index_that_claims_a_synced_record_the_log_lost_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (file, ends) = three_batches(dir.path()).await;
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(ends[1]).unwrap();
        for _ in 0..2 {
            let err = Log::open(&config(dir.path())).err().expect("refused");
            assert!(err.to_string().contains("acknowledged records are missing"), "{err}");
        }
        // Under fsync=interval the same loss is what a crash may do: the index is rebuilt.
        let dir = tempfile::tempdir().unwrap();
        let interval =
            Config { fsync: FsyncPolicy::Interval(std::time::Duration::from_secs(1)), ..config(dir.path()) };
        let log = Log::open(&interval).unwrap();
        log.append(batch(&["a"])).await.unwrap();
        let end = std::fs::metadata(files::path_in(dir.path(), 0)).unwrap().len();
        log.append(batch(&["b"])).await.unwrap();
        log.close().await.unwrap();
        drop(log);
        std::fs::OpenOptions::new()
            .write(true)
            .open(files::path_in(dir.path(), 0))
            .unwrap()
            .set_len(end)
            .unwrap();
        let log = Log::open(&interval).unwrap();
        assert_eq!(payloads(&log), ["a"]);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_record_forged_in_a_payload_is_never_taken_for_one_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        // A publisher's payload holding a whole record, as it would be without the log's salt
        // (which a client never sees): a stream "forged" created by record 1000.
        let created = vec![(crate::types::StreamId(99), Arc::from("forged"), Tick(1))];
        let body = Body::Append { created, tags: Vec::new(), chunks: Vec::new() };
        let fake = Encoded::new(&body, 0, 1000, 0, Tick(1), 0, &[] as &[&[u8]]);
        let mut forged = fake.head.clone();
        forged.extend_from_slice(&fake.crc.to_le_bytes());
        let log = Log::open(&config(dir.path())).unwrap();
        log.append(batch(&["a"])).await.unwrap();
        let file = files::path_in(dir.path(), 0);
        let before = std::fs::metadata(&file).unwrap().len();
        let mut records = batch(&["b"]);
        records[0].payload = Bytes::from(forged.clone());
        records[0].crc32 = crc32fast::hash(&forged);
        log.append(records).await.unwrap();
        log.close().await.unwrap();
        drop(log);
        // The record holding it torn in its fixed part, and the index lost: the search for the
        // next whole record walks through the payload.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[before as usize + 10] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        Index::remove(dir.path()).unwrap();
        let log = Log::open(&config(dir.path())).unwrap();
        assert!(log.stream("forged").is_none(), "the forged record was applied");
        assert_eq!(payloads(&log), ["a"]);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), before, "cut as a torn tail");
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_index_entry_that_does_not_read_back_gets_the_index_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        three_batches(dir.path()).await;
        {
            let db = sled::open(dir.path().join(super::super::index::DIR)).unwrap();
            let tree = db.open_tree("index").unwrap();
            let (key, _) = tree.scan_prefix(b"c").next().unwrap().unwrap();
            tree.insert(key, &b"garbage"[..]).unwrap();
            db.flush().unwrap();
        }
        let index = Index::reopen(dir.path(), 1 << 20).unwrap();
        assert!(!index.is_sound());
        drop(index);
        let log = Log::open(&config(dir.path())).unwrap();
        assert_eq!(payloads(&log), ["a1", "a2", "b1", "b2", "c1", "c2"], "the stream is back");
        log.close().await.unwrap();
        drop(log);
        assert!(Index::reopen(dir.path(), 1 << 20).unwrap().is_sound());
    }

    #[tokio::test]
    async fn a_data_dir_is_opened_by_one_broker_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&config(dir.path())).unwrap();
        let err = Log::open(&config(dir.path())).err().expect("refused while the first is open");
        assert!(err.to_string().contains("another process holds its lock"), "{err}");
        log.close().await.unwrap();
        drop(log);
        Log::open(&config(dir.path())).unwrap().close().await.unwrap();
    }
}
