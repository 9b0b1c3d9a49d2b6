//! The store: the log of record in chunk files, and its index in sled.
//!
//! Every change is a commit record appended to the chunk files (`commit.rs`, `files.rs`) by one
//! writer thread (`writer.rs`); an ack waits for exactly one `fdatasync` of the chunk file (plus
//! its directory when a file is created), never for sled. The index (`index.rs`) derives from the
//! records and is rebuilt from them whenever it is behind or missing (`recovery.rs`). Reads find
//! chunks through the index and check everything they get (`read.rs`).
//!
//! Files, one concern each:
//! - `commit`: the commit record format; `walk`: reading a chunk file record by record;
//! - `files`: appending, rotating, reading and deleting chunk files;
//! - `chunk`: the codec of a chunk (many records of one stream);
//! - `index`: sled, the index; `view`: it with the group commits not applied to it yet;
//!   `applier`: applying them in the background; `recovery`: opening a data dir, replay and
//!   rebuild;
//! - `writer`: group commit and every other write; `producers`: idempotent producers' memory;
//! - `read`: reads and their checks; `tail_cache`: the newest chunks, decoded once;
//! - `retention`: planning removals and compaction; `space`: the disk budget;
//! - `integrity`: offline `verify` and `recover`; `upgrade`: data dirs of earlier builds.

mod applier;
mod chunk;
mod commit;
mod files;
mod index;
mod integrity;
mod le;
mod producers;
mod read;
mod recovery;
mod retention;
mod space;
mod tail_cache;
mod trimmer;
mod upgrade;
mod view;
mod walk;
mod writer;

pub use chunk::ChunkEncoder;
pub use integrity::{recover, verify, Damage, Recovered, Report};
pub(crate) use producers::BatchTag;
pub use read::{ReadBatch, Truncation};
pub use retention::{Keep, Move, TrimPlan};
pub(crate) use trimmer::spawn as spawn_trimmer;
pub use writer::MAX_TICK_AHEAD;

/// The data dir's layout, as operators and tools see it: the log's chunk files under `log/`, the
/// index under `index/` (which may be deleted with the broker stopped: it is rebuilt).
pub mod layout {
    pub use super::files::{path_in as chunk_file, DIR as LOG_DIR};
    pub use super::index::DIR as INDEX_DIR;
}

use crate::config::{Config, DataDir, FsyncPolicy};
use crate::error::{Error, Result};
use crate::types::{NewRecord, StreamInfo, StreamMeta, Tick};
use files::ChunkFiles;
use index::Index;
use space::Space;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tail_cache::TailCache;
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::error;
use view::View;

/// Batches waiting for the writer; publishers wait (backpressure) when it is full.
const WRITER_QUEUE: usize = 1024;
/// Commits a subscriber may fall behind before it is told to rescan (it then reads storage).
const COMMIT_BROADCAST: usize = 4096;
/// Trimmer passes a publish waits for at most when the store is over its bound, and how long each.
const ROOM_PASSES: usize = 3;
const ROOM_WAIT: Duration = Duration::from_secs(2);
/// How often the flusher makes the index durable: at most this much of the log is applied again
/// after a crash.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// An appended batch, as acknowledged to its publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The tick of each record, in the batch's order.
    pub ticks: Vec<Tick>,
    /// The batch is a retry of an idempotent batch appended before: nothing was appended now.
    pub duplicate: bool,
}

/// What one commit changed, as told to subscribers.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Every record with a tick up to this one is readable.
    pub watermark: Tick,
    /// Streams that received records, each with its last committed tick.
    pub streams: Arc<[(crate::types::StreamId, Tick)]>,
    /// Streams created by this commit.
    pub added: Arc<[StreamInfo]>,
    /// Streams whose metadata changed, or that were deleted (`true`).
    pub changed: Arc<[(StreamInfo, bool)]>,
}

/// A consistent view taken when a subscription registers.
pub struct Snapshot {
    /// Every stream at that moment.
    pub streams: Vec<StreamInfo>,
    /// The latest committed tick at that moment.
    pub watermark: Tick,
    /// Every commit after that moment.
    pub commits: broadcast::Receiver<Commit>,
}

/// Who a batch comes from, which decides two rules.
#[derive(Debug, Clone)]
pub enum Source {
    /// A publisher; idempotent when tagged. Explicit ticks may be at most a minute ahead of this
    /// broker's clock, so one publisher cannot drag the clock far ahead for everyone.
    Publisher(Option<BatchTag>),
    /// A relay's upstream: the ticks are the origin's, kept unchanged whatever this broker's
    /// clock says (they still must increase per stream).
    Upstream,
}

impl Source {
    fn tag(&self) -> Option<&BatchTag> {
        match self {
            Source::Publisher(tag) => tag.as_ref(),
            Source::Upstream => None,
        }
    }
}

/// The catalog as readers see it.
struct Shared {
    streams: BTreeMap<Arc<str>, StreamInfo>,
    watermark: Tick,
    /// Payload bytes of every stream together (what the store-wide bound counts).
    bytes: u64,
}

impl Shared {
    fn new(streams: BTreeMap<Arc<str>, StreamInfo>, watermark: Tick) -> Shared {
        let bytes = streams.values().map(|s| s.bytes).sum();
        Shared { streams, watermark, bytes }
    }

    /// Publishes a stream as it is now.
    fn put(&mut self, info: StreamInfo) {
        self.bytes += info.bytes;
        if let Some(old) = self.streams.insert(info.name.clone(), info) {
            self.bytes -= old.bytes;
        }
    }

    /// Forgets a deleted stream.
    fn remove(&mut self, name: &str) {
        if let Some(old) = self.streams.remove(name) {
            self.bytes -= old.bytes;
        }
    }
}

/// How publishers and the trimmer keep a store-wide bound at write time: a publish that would pass
/// it wakes the trimmer and waits for its pass to end.
#[derive(Default)]
pub(crate) struct Room {
    /// Set when a publisher wants a pass now.
    wanted: tokio::sync::Notify,
    /// Passes finished so far.
    passes: tokio::sync::watch::Sender<u64>,
}

impl Room {
    /// Waits until the trimmer wants to run (its timer aside).
    pub(crate) async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// Says that a pass ended.
    pub(crate) fn passed(&self) {
        self.passes.send_modify(|n| *n += 1);
    }
}

/// Where the writer sends a batch's ticks, or why it was refused.
type Reply = oneshot::Sender<Result<Appended>>;

/// A batch accepted into the current group, waiting for the commit to finish.
struct Accepted {
    ticks: Vec<Tick>,
    duplicate: bool,
    reply: Reply,
}

enum Command {
    Append {
        records: Vec<NewRecord>,
        source: Source,
        reply: Reply,
        _queued: OwnedSemaphorePermit,
    },
    /// Create a stream with metadata, or change an existing stream's metadata when `update`.
    Define {
        name: crate::types::StreamName,
        meta: StreamMeta,
        update: bool,
        /// The creation tick a new stream takes (a relay's copy takes its upstream's), else now.
        created: Option<Tick>,
        reply: oneshot::Sender<Result<StreamInfo>>,
    },
    /// End a stream's import: subscriptions see it from now on.
    Seal {
        name: String,
        reply: oneshot::Sender<Result<StreamInfo>>,
    },
    /// Delete a stream and every record of it.
    Delete {
        name: String,
        reply: oneshot::Sender<Result<StreamInfo>>,
    },
    /// Carry out a removal planned by the trimmer.
    Trim {
        plan: TrimPlan,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Move chunks out of a sparse chunk file; answers how many moved.
    Compact {
        moves: Vec<Move>,
        reply: oneshot::Sender<Result<usize>>,
    },
    /// Delete the chunk files nothing refers to any more, if that was put off.
    Release {
        reply: oneshot::Sender<()>,
    },
    /// Raise the clock to `to` (at most now) and publish the watermark, so that time passes for
    /// readers even when nothing is published; answers the new watermark.
    Advance {
        to: Tick,
        reply: oneshot::Sender<Tick>,
    },
    /// Answered with the final flush's outcome.
    Stop {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The memory a queued batch holds, for the queue and group budgets: payloads, headers, and a
/// fixed cost per record.
fn held_bytes(records: &[NewRecord]) -> usize {
    records
        .iter()
        .map(|r| r.payload.len() + r.headers.iter().map(|(k, v)| k.len() + v.len() + 48).sum::<usize>() + 128)
        .sum()
}

/// The log. Shared by reference; reads may run on any thread.
pub struct Log {
    /// The index, with the appends not applied to it yet.
    view: Arc<View>,
    /// Where the chunks' bytes are.
    chunks: Arc<ChunkFiles>,
    /// The newest chunks, decoded once for every subscriber at the tail.
    tail: TailCache,
    shared: Arc<RwLock<Shared>>,
    commits: broadcast::Sender<Commit>,
    writer: mpsc::Sender<Command>,
    /// Bytes of batches queued for the writer, in KiB permits (`limits.max_pending_bytes`):
    /// publishers wait for room up to `limits.pending_wait`, then are refused. A batch larger than
    /// the whole budget is let through alone.
    queue_budget: Arc<Semaphore>,
    queue_kib: u64,
    queue_wait: std::time::Duration,
    /// The store-wide bound on payload bytes, if any, and how publishers make room under it.
    max_total_bytes: Option<u64>,
    room: Room,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    server_id: String,
    /// The highest tick an advance was asked for, to let one serve many (`advance_lazily`).
    advance_asked: AtomicU64,
    /// The flusher thread and what stops it: dropping the sender.
    flusher: Mutex<Option<Flusher>>,
    /// Set by the writer or the flusher when a write, sync or index update failed.
    failure: Arc<std::sync::OnceLock<String>>,
    /// The data dir's lock: no other process opens it while the log lives.
    _lock: std::fs::File,
    /// Keeps a volatile store's directory alive as long as the log.
    _temp_dir: Option<tempfile::TempDir>,
}

impl Log {
    /// Opens (or creates) the log described by `config` and starts its writer thread.
    pub fn open(config: &Config) -> Result<Log> {
        let (path, temp_dir) = match &config.data {
            DataDir::Path(p) => (p.clone(), None),
            DataDir::Volatile => {
                let dir = tempfile::Builder::new()
                    .prefix("tapeline-volatile-")
                    .tempdir()
                    .map_err(|source| Error::Io { context: "creating the volatile store".into(), source })?;
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        let recovered = recovery::open(&path, config)?;
        let index = Arc::new(recovered.index);
        let chunks = recovered.chunks;
        let watermark = recovered.clock;
        let shared = Arc::new(RwLock::new(Shared::new(
            recovered.streams.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            watermark,
        )));
        let (commits, _) = broadcast::channel(COMMIT_BROADCAST);
        let (writer, inbox) = mpsc::channel(WRITER_QUEUE);
        let flush_failed = Arc::new(std::sync::OnceLock::new());
        let flusher = start_flusher(index.clone(), chunks.clone(), config.fsync, flush_failed.clone())?;
        let view = Arc::new(View::new(index.clone()));
        let state = writer::Writer {
            view: view.clone(),
            applier: applier::Applier::start(view.clone())?,
            appender: recovered.appender,
            fsync: config.fsync,
            streams: recovered.streams,
            clock: watermark,
            written_clock: watermark,
            next_id: recovered.next_id,
            producers: recovered.producers,
            max_producers: config.limits.max_producers,
            max_streams: config.limits.max_streams,
            space: Space::new(
                index.clone(),
                chunks.clone(),
                path.clone(),
                config.max_disk_bytes,
                config.min_free_disk_bytes,
            ),
            server_id: recovered.server_id.clone(),
            checkpoint_file: recovered.checkpoint_file,
            failed: None,
            flush_failed: flush_failed.clone(),
            shared: shared.clone(),
            commits: commits.clone(),
            unsynced: Vec::new(),
            unsynced_since: None,
            timer: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|source| Error::Io { context: "starting the writer's timer".into(), source })?,
        };
        let writer_thread = std::thread::Builder::new()
            .name("tapeline-writer".into())
            .spawn(move || state.run(inbox))
            .map_err(|source| Error::Io { context: "starting the writer thread".into(), source })?;
        Ok(Log {
            view,
            chunks,
            tail: TailCache::default(),
            shared,
            commits,
            writer,
            queue_budget: Arc::new(Semaphore::new(config.limits.max_pending_bytes / 1024)),
            queue_kib: (config.limits.max_pending_bytes / 1024) as u64,
            queue_wait: config.limits.pending_wait,
            max_total_bytes: config.retention.max_total_bytes,
            room: Room::default(),
            writer_thread: Mutex::new(Some(writer_thread)),
            server_id: recovered.server_id,
            advance_asked: AtomicU64::new(0),
            flusher: Mutex::new(Some(flusher)),
            failure: flush_failed,
            _lock: recovered.lock,
            _temp_dir: temp_dir,
        })
    }

    /// The random identity created with the data dir.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Queues a batch for the writer; the returned receiver yields its ticks once it is committed.
    /// Batches are committed in the order they are queued. A tagged batch is idempotent: a retry
    /// of one already appended is answered with its ticks and appends nothing.
    /// Publishers wait here while the writer is behind by more than the queue budget.
    pub async fn submit(
        &self,
        records: Vec<NewRecord>,
        source: Source,
    ) -> Result<oneshot::Receiver<Result<Appended>>> {
        let bytes = held_bytes(&records);
        self.make_room(bytes as u64).await;
        let kib = u32::try_from((bytes.div_ceil(1024) as u64).min(self.queue_kib)).unwrap_or(u32::MAX);
        let waited =
            tokio::time::timeout(self.queue_wait, self.queue_budget.clone().acquire_many_owned(kib)).await;
        let queued = match waited {
            Ok(queued) => queued.map_err(|_| Error::ShuttingDown)?,
            Err(_) => {
                return Err(Error::TooMany {
                    what: "bytes of batches waiting for the writer",
                    limit: (self.queue_kib << 10) as usize,
                    setting: "limits.max_pending_bytes",
                    hint: "the broker takes writes slower than they arrive (limits.pending_wait passed); retry later",
                })
            }
        };
        let (reply, answer) = oneshot::channel();
        let command = Command::Append { records, source, reply, _queued: queued };
        self.writer.send(command).await.map_err(|_| Error::ShuttingDown)?;
        Ok(answer)
    }

    /// Under a store-wide bound: while what is stored and queued, with `bytes` more, would pass it,
    /// wakes the trimmer and waits for the end of its pass (at most [`ROOM_PASSES`] passes, each
    /// at most [`ROOM_WAIT`], and none after a pass that removed nothing: the streams' newest
    /// chunks are never removed, and without a trimmer nothing would ever make room). So the bound holds at write time, not only at the trimmer's
    /// next tick: the store passes it by at most what publishers hand in while a pass runs.
    async fn make_room(&self, bytes: u64) {
        let Some(bound) = self.max_total_bytes else { return };
        let mut passes = self.room.passes.subscribe();
        let mut before = u64::MAX;
        for _ in 0..ROOM_PASSES {
            let queued = self.queue_kib.saturating_sub(self.queue_budget.available_permits() as u64) << 10;
            let stored = self.read_shared().bytes;
            // Under the bound, or the last pass removed nothing (what is left cannot go).
            if stored + queued + bytes <= bound || stored >= before {
                return;
            }
            before = stored;
            passes.mark_unchanged();
            self.room.wanted.notify_one();
            if tokio::time::timeout(ROOM_WAIT, passes.changed()).await.is_err() {
                return;
            }
        }
    }

    /// How the trimmer learns that publishers wait for room.
    pub(crate) fn room(&self) -> &Room {
        &self.room
    }

    /// Why the log takes no more writes, once a write, sync or index update failed (a restart
    /// recovers).
    pub fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    /// Bytes of chunk files on disk (the log and what it holds), without the index.
    pub fn disk_bytes(&self) -> u64 {
        self.chunks.total_bytes()
    }

    /// Payload bytes stored in every stream together.
    pub fn stored_bytes(&self) -> u64 {
        self.read_shared().bytes
    }

    /// Raises the broker's clock to `to` (at most the wall clock) and publishes the new watermark
    /// (after every batch queued before this call). Lets a reader learn that time passed with
    /// nothing published: no record will ever be appended at or below the returned tick (explicit
    /// ticks aside, which must be above their stream's last tick), also after a restart: the
    /// clock is written to the log before it is published. A relay passes the tick its upstream
    /// confirmed, never more: its own clock says nothing of what the upstream holds.
    pub async fn advance(&self, to: Tick) -> Result<Tick> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command::Advance { to, reply }).await.map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)
    }

    /// Like [`Log::advance`], but skipped when an advance to within `slack` of `to` was already
    /// asked for: many subscriptions' heartbeats fire together, and one advance serves them all.
    pub async fn advance_lazily(&self, to: Tick, slack: Duration) -> Result<()> {
        let slack = crate::types::nanos(slack);
        let asked = self.advance_asked.load(Ordering::Relaxed);
        if asked.saturating_add(slack) >= to.0 || self.watermark().0.saturating_add(slack) >= to.0 {
            return Ok(());
        }
        if self.advance_asked.compare_exchange(asked, to.0, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            // Another subscription asked at the same moment.
            return Ok(());
        }
        self.advance(to).await.map(|_| ())
    }

    /// Appends a batch atomically and returns the assigned ticks once it is committed.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Tick>> {
        let appended =
            self.submit(records, Source::Publisher(None)).await?.await.map_err(|_| Error::ShuttingDown)??;
        Ok(appended.ticks)
    }

    /// The latest committed tick.
    pub fn watermark(&self) -> Tick {
        self.read_shared().watermark
    }

    /// Every stream, in name order.
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.read_shared().streams.values().cloned().collect()
    }

    /// Up to `limit` of the streams `keep` selects, in name order, after the stream named `after`;
    /// and whether more follow.
    pub fn streams_page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&StreamInfo) -> bool,
    ) -> (Vec<StreamInfo>, bool) {
        use std::ops::Bound;
        let shared = self.read_shared();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut selected =
            shared.streams.range::<str, _>((from, Bound::Unbounded)).map(|(_, s)| s).filter(|s| keep(s));
        let page: Vec<StreamInfo> = selected.by_ref().take(limit).cloned().collect();
        let more = selected.next().is_some();
        (page, more)
    }

    /// One stream, if it exists.
    pub fn stream(&self, name: &str) -> Option<StreamInfo> {
        self.read_shared().streams.get(name).cloned()
    }

    /// The catalog and watermark, together with a receiver of every later commit.
    pub fn snapshot(&self) -> Snapshot {
        let shared = self.read_shared();
        Snapshot {
            streams: shared.streams.values().cloned().collect(),
            watermark: shared.watermark,
            commits: self.commits.subscribe(),
        }
    }

    fn read_shared(&self) -> std::sync::RwLockReadGuard<'_, Shared> {
        // A poisoned lock means a panic elsewhere; the data itself is still consistent.
        self.shared.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes everything written so far durable: the newest chunk file, then the index.
    pub async fn flush(&self) -> Result<()> {
        let (index, chunks) = (self.view.index().clone(), self.chunks.clone());
        tokio::task::spawn_blocking(move || {
            chunks
                .sync_newest()
                .map_err(|source| Error::Io { context: "syncing the chunk files".into(), source })?;
            index.persist()
        })
        .await
        .map_err(|err| Error::Internal(format!("flush task failed: {err}")))?
    }

    /// Creates `name` with `meta` (created at `created`, else now); an existing stream keeps its
    /// records and gets `meta` when `update` (with the same metadata it is left as it is).
    /// Returns the stream as it is now.
    pub async fn define(
        &self,
        name: crate::types::StreamName,
        meta: StreamMeta,
        update: bool,
        created: Option<Tick>,
    ) -> Result<StreamInfo> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Command::Define { name, meta, update, created, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Ends the import of stream `name` (created with `meta.importing`): it takes a new creation
    /// tick, the broker's next, and subscriptions are told of it as of a stream created then. A
    /// stream not being imported is answered as it is.
    pub async fn seal(&self, name: &str) -> Result<StreamInfo> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Command::Seal { name: name.to_string(), reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Deletes the stream `name` and every record of it; returns what it was.
    pub async fn delete(&self, name: &str) -> Result<StreamInfo> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Command::Delete { name: name.to_string(), reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Has the writer move planned chunks to the active chunk file (each unless it was removed or
    /// moved since); returns how many moved.
    pub async fn compact(&self, moves: Vec<Move>) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command::Compact { moves, reply }).await.map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Has the writer delete the chunk files nothing refers to any more, whose deletion was put
    /// off (a full disk had no room for the checkpoint that must come first).
    pub async fn release(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command::Release { reply }).await.map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)
    }

    /// Has the writer carry out a planned removal (skipped when the stream changed under it).
    pub async fn trim(&self, plan: TrimPlan) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command::Trim { plan, reply }).await.map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Stops the writer after every queued batch is committed, then the flusher, then flushes.
    /// Idempotent.
    pub async fn close(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        let mut stopped = Ok(());
        if self.writer.send(Command::Stop { reply }).await.is_ok() {
            stopped = done.await.unwrap_or(Ok(()));
        }
        let handle = self.writer_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // Joined, so that nothing holds the data dir once `close` returns.
        let flusher = self.flusher.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((stop, handle)) = flusher {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        stopped.and(self.flush().await)
    }
}

/// The flusher thread, and the sender whose drop stops it.
type Flusher = (std::sync::mpsc::Sender<()>, JoinHandle<()>);

/// Starts the thread that makes the index durable every [`PERSIST_EVERY`] and, under
/// `fsync = interval`, syncs the chunk files every interval first (acks do not wait for it then).
/// A failed sync of the chunk files stops the writer taking writes: after a failed fsync the
/// kernel may have dropped the dirty pages, so what was written since the last sync may be lost.
fn start_flusher(
    index: Arc<Index>,
    chunks: Arc<ChunkFiles>,
    fsync: FsyncPolicy,
    failed: Arc<std::sync::OnceLock<String>>,
) -> Result<Flusher> {
    let every = match fsync {
        FsyncPolicy::Interval(every) => every.min(PERSIST_EVERY),
        FsyncPolicy::Always | FsyncPolicy::Never => PERSIST_EVERY,
    };
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("tapeline-flusher".into())
        .spawn(move || {
            let mut persisted = std::time::Instant::now();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if let FsyncPolicy::Interval(_) = fsync {
                    if let Err(err) = chunks.sync_newest() {
                        let cause = format!("syncing the chunk files failed: {err}");
                        error!(%cause, "the periodic sync failed; the log takes no more writes");
                        let _ = failed.set(cause);
                        return;
                    }
                }
                if persisted.elapsed() >= PERSIST_EVERY {
                    persisted = std::time::Instant::now();
                    if let Err(err) = index.persist() {
                        // Only the index: a restart applies the log again.
                        tracing::warn!(cause = %err, "making the index durable failed");
                    }
                }
            }
        })
        .map_err(|source| Error::Io { context: "starting the flusher thread".into(), source })?;
    Ok((stop, handle))
}
