//! The sled log: chunk keys, the catalog, group commit, recovery and reads.
//!
//! Layout in sled: tree `records` maps `(stream_id u32 BE, first_tick u64 BE)` to where the chunk
//! (see `chunk.rs`) is in the chunk files (see `chunk_files.rs`), or, for a chunk written before
//! chunk files existed, to the chunk itself; keys starting with `u32::MAX` (never a stream id)
//! hold idempotent producers' state (see `producers.rs`), in the same tree as the records it
//! describes so that both can be written in one atomic batch; keys starting with `u32::MAX - 1`
//! hold, per stream, the tick of the last record retention removed, written in the same atomic
//! batch as the removal; tree `catalog` maps a stream name to its id and creation tick; tree
//! `meta` holds the broker's identity and how far the chunk files were synced ([`SYNCED_KEY`]).
//!
//! Invariants:
//! - One writer thread assigns every tick and is the only one that writes `records` and `catalog`.
//!   A tick is `max(now, clock + 1)` with one clock for the whole broker, so ticks are unique and
//!   strictly increasing within a stream; an explicit tick must be above its stream's last tick.
//! - Group commit: the writer takes every pending batch, appends their chunks to the active chunk
//!   file (syncing it under `fsync=always`, so that a stored pointer finds its bytes), writes the
//!   pointers atomically (one `apply_batch` of pointers and producer state when the group made
//!   several chunks; when it made one, one `insert` of its pointer, the chunk's trailer holding
//!   the tags of its idempotent batches, then the producer state, which recovery catches up from
//!   the last chunks' trailers), flushes once (under `fsync=always`), then publishes the new
//!   state and acknowledges each batch. A refused batch is dropped before anything is written,
//!   so it leaves nothing behind. A batch that would pass the disk budget (`space.rs`) is refused
//!   the same way, so sled never meets a full disk.
//! - A retried idempotent batch (same producer and sequence) is answered with the ticks it was
//!   given the first time and appends nothing. A failed write or flush stops the writer
//!   taking writes (fail-stop) until a restart recovers from what is stored.
//! - Each commit carries the watermark and every touched stream's last committed tick; `advance`
//!   publishes an empty commit with the clock raised to now, so readers learn that time passed.
//! - The in-memory catalog and the commit broadcast change under one lock, and only after the data
//!   is readable (and durable under `always`): a reader that sees a watermark can read every record
//!   up to it, and a subscriber that snapshots the catalog receives every later commit.
//! - Recovery reads the catalog, every pointer (to count what each chunk file holds, and to drop
//!   the pointers past the last sync whose bytes a crash lost), and, per stream, only its first and
//!   last chunk and its retention mark.
//! - A chunk file is deleted once no pointer refers to it and that is durable; compaction moves
//!   the few chunks left in a mostly emptied file (`ChunkFiles::sparse`) to the active one first.
//! - Retention removes whole chunks from the front of a stream, never its last chunk (which keeps
//!   the stream's last tick and counters across restarts). The trimmer plans a removal from
//!   what it reads; the writer carries it out: it publishes the stream's new first tick and
//!   `trimmed.through` before deleting, so a read that missed a deleted chunk finds the mark when
//!   it looks afterwards and reports `Truncated` instead of a silent gap.

use crate::chunk::{self, ChunkEncoder, ChunkError};
use crate::chunk_files::{Appender, ChunkFiles, Location, Position};
use crate::config::{Config, DataDir, FsyncPolicy};
use crate::error::{Error, Result};
use crate::guard::{self, Mark};
use crate::producers::{self, BatchTag, Producers, Seen};
use crate::record::{NewRecord, Recent, Stored, StreamId, StreamInfo, StreamMeta, Tick, Trimmed};
use crate::space::Space;
use crate::tail_cache::{self, Decoded, TailCache};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

/// A chunk is sealed when it reaches this many encoded bytes or records.
///
/// 64 KiB keeps a leaf of sled's tree (up to 16 values) below sled's blob threshold (a quarter of
/// [`SEGMENT_BYTES`]): sled then writes chunks into its log segments, whose space it reuses once
/// retention removed them. Larger values go to blob files, which sled frees only as log segments
/// fill up: with 1 MiB chunks, a store of 16 KiB records bounded to 128 MiB grew past 4.6 GiB
/// (README, *Retention*).
const CHUNK_MAX_BYTES: usize = 64 << 10;
/// sled's log segment size for a new data dir (sled's default is 512 KiB); an existing data dir
/// keeps the size it was created with, as sled requires.
const SEGMENT_BYTES: usize = 8 << 20;
const CHUNK_MAX_RECORDS: u32 = 4096;
/// One group commit gathers at most this many payload bytes.
const GROUP_MAX_BYTES: usize = 32 << 20;
/// Batches waiting for the writer; publishers wait (backpressure) when it is full.
const WRITER_QUEUE: usize = 1024;
/// Payload bytes queued for the writer at most (in KiB permits); publishers wait beyond it. A
/// batch larger than the whole budget is let through alone.
const WRITER_QUEUE_KIB: u32 = 256 << 10;
/// How far ahead of the broker's wall clock an explicit tick may be. Explicit ticks move the
/// broker-wide clock, so a tick far in the future would shift every later tick.
pub const MAX_TICK_AHEAD: Tick = Tick(60_000_000_000);
/// Commits a subscriber may fall behind before it is told to rescan (it then reads storage).
const COMMIT_BROADCAST: usize = 4096;

/// Key in the `meta` tree of how far the chunk files were synced (a [`Position`]): a pointer past
/// it may point to bytes a crash lost (see `count_chunks`). Written after each sync.
pub const SYNCED_KEY: &str = "chunks_synced";

/// Key prefix of producer state in the records tree; stream ids stay below it.
pub(crate) const PRODUCER_PREFIX: [u8; 4] = u32::MAX.to_be_bytes();
/// Key prefix of retention marks in the records tree (the lowest reserved prefix).
pub(crate) const TRIM_PREFIX: [u8; 4] = (u32::MAX - 1).to_be_bytes();

/// An appended batch, as acknowledged to its publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The tick of each record, in the batch's order.
    pub ticks: Vec<Tick>,
    /// The batch is a retry of an idempotent batch appended before: nothing was appended now.
    pub duplicate: bool,
}

/// What one group commit changed, as told to subscribers.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Every record with a tick up to this one is readable.
    pub watermark: Tick,
    /// Streams that received records, each with its last committed tick.
    pub streams: Arc<[(StreamId, Tick)]>,
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

/// The result of one read: records in tick order, the chunks their payloads lie in, and whether
/// the read stopped at its bound.
pub struct ReadBatch {
    pub records: Vec<Stored>,
    /// The chunk values the records point into (`Stored::chunk` indexes this).
    pub chunks: Vec<Bytes>,
    /// `false` when the read stopped because of its record limit: there may be more.
    pub complete: bool,
    /// Retention removed part of the range asked for.
    pub truncated: Option<Truncation>,
}

/// Part of a read's range was removed by retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    /// The first tick the read asked for (0: the beginning).
    pub requested: Tick,
    /// Every record up to this tick is gone; the reader continues after it.
    pub through: Tick,
    /// The stream's earliest record still stored.
    pub earliest: Option<Tick>,
}

/// What retention keeps of one stream; a chunk is removed when any rule asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keep {
    /// Records with a tick below this one are removed.
    pub below: Option<Tick>,
    /// The stream keeps at most this many payload bytes / records.
    pub max_bytes: Option<u64>,
    pub max_records: Option<u64>,
    /// Past the first chunk, only chunks wholly below this tick are removed (the store-wide bound
    /// takes the oldest records first, across streams).
    pub only_below: Option<Tick>,
}

/// A removal planned by the trimmer: the first chunks of one stream, up to the chunk that starts
/// at `first`, which becomes the stream's first chunk.
#[derive(Debug, Clone)]
pub struct TrimPlan {
    pub stream: Arc<str>,
    pub id: StreamId,
    /// The keys of the chunks to remove, in order.
    pub delete: Vec<sled::IVec>,
    /// The first tick of the first chunk kept.
    pub first: Tick,
    /// The tick of the last record removed.
    pub through: Tick,
    /// The counters of the first chunk kept: what the stream held before it, since its creation.
    pub records_before: u64,
    pub bytes_before: u64,
}

/// The catalog as readers see it.
struct Shared {
    streams: BTreeMap<Arc<str>, StreamInfo>,
    watermark: Tick,
}

/// Where the writer sends a batch's ticks, or why it was refused.
type Reply = oneshot::Sender<Result<Appended>>;

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

enum Command {
    Append {
        records: Vec<NewRecord>,
        source: Source,
        reply: Reply,
        _queued: OwnedSemaphorePermit,
    },
    /// Create a stream with metadata, or change an existing stream's metadata when `update`.
    Define {
        name: crate::names::StreamName,
        meta: StreamMeta,
        update: bool,
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
    /// Move chunks (key, pointer as planned) out of a sparse chunk file; answers how many moved.
    Compact {
        moves: Vec<(sled::IVec, sled::IVec)>,
        reply: oneshot::Sender<Result<usize>>,
    },
    /// Raise the clock to `to` (at most now) and publish the watermark, so that time passes for
    /// readers even when nothing is published; answers the new watermark.
    Advance {
        to: Tick,
        reply: oneshot::Sender<Tick>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// The sled-backed log. Shared by reference; reads may run on any thread.
pub struct Log {
    db: sled::Db,
    records: sled::Tree,
    /// Where the chunks' bytes are.
    chunks: Arc<ChunkFiles>,
    /// The newest chunks, decoded once for every subscriber at the tail.
    tail: TailCache,
    /// sled's `meta` tree (see [`SYNCED_KEY`]).
    meta: sled::Tree,
    shared: Arc<RwLock<Shared>>,
    commits: broadcast::Sender<Commit>,
    writer: mpsc::Sender<Command>,
    /// Payload bytes (KiB) that may wait for the writer.
    queue_budget: Arc<Semaphore>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    server_id: String,
    /// The highest tick an advance was asked for, to let one serve many (`advance_lazily`).
    advance_asked: std::sync::atomic::AtomicU64,
    /// The flusher thread (`fsync=interval`) and what stops it: dropping the sender.
    flusher: Mutex<Option<Flusher>>,
    /// Keeps a volatile store's directory alive as long as the log.
    _temp_dir: Option<tempfile::TempDir>,
}

/// sled's settings for the data dir `dir`: the segment size it was created with (sled refuses to
/// open a data dir with another), [`SEGMENT_BYTES`] for a new one. Everything that opens a data
/// dir with sled goes through here.
pub fn engine_config(dir: &std::path::Path) -> sled::Config {
    // sled's `conf` is `key: value` lines followed by a binary CRC.
    let persisted = std::fs::read(dir.join("conf")).ok().and_then(|conf| {
        String::from_utf8_lossy(&conf)
            .lines()
            .find_map(|line| line.strip_prefix("segment_size:")?.trim().parse::<usize>().ok())
    });
    sled::Config::new().path(dir).segment_size(persisted.unwrap_or(SEGMENT_BYTES))
}

/// The records-tree key of a stream's chunk starting at `tick`.
pub(crate) fn key(id: StreamId, tick: Tick) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&id.0.to_be_bytes());
    k[4..].copy_from_slice(&tick.0.to_be_bytes());
    k
}

/// The first tick of the chunk stored under a records-tree key.
pub(crate) fn key_tick(k: &[u8]) -> Tick {
    Tick(u64::from_be_bytes(k[4..12].try_into().unwrap_or_default()))
}

/// The records-tree key of a stream's retention mark.
fn trim_key(id: StreamId) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&TRIM_PREFIX);
    k[4..].copy_from_slice(&id.0.to_be_bytes());
    k
}

fn producer_key(id: &str) -> Vec<u8> {
    [&PRODUCER_PREFIX[..], id.as_bytes()].concat()
}

/// A catalog value: `id u32 LE | created_tick u64 LE`, then the metadata as JSON unless it is
/// the default (so catalogs written before metadata existed read the same).
fn catalog_value(id: StreamId, created: Tick, meta: &StreamMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&id.0.to_le_bytes());
    v.extend_from_slice(&created.0.to_le_bytes());
    if *meta != StreamMeta::default() {
        v.extend(serde_json::to_vec(meta).unwrap_or_default());
    }
    v
}

impl Log {
    /// Opens (or creates) the log described by `config` and starts its writer thread.
    pub fn open(config: &Config) -> Result<Log> {
        let fsync = config.fsync;
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
        // Read before sled opens: sled may roll its log back while opening (see guard.rs).
        let mark = if temp_dir.is_none() { guard::read_mark(&path)? } else { None };
        if mark.is_some() {
            guard::preserve_blobs(&path)?;
        }
        let db = engine_config(&path)
            .cache_capacity(config.cache_bytes)
            // The flusher below syncs the chunk files before sled (`chunk_files.rs`).
            .flush_every_ms(None)
            .open()
            .map_err(|err| Error::Open { path: path.clone(), cause: open_failure(&err) })?;
        let records = db.open_tree("records")?;
        let catalog = db.open_tree("catalog")?;
        let meta = db.open_tree("meta")?;
        let server_id = match meta.get("server_id")? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let id = format!("{:016x}", rand::random::<u64>());
                meta.insert("server_id", id.as_bytes())?;
                db.flush()?;
                id
            }
        };

        let (chunks, mut appender) = ChunkFiles::open(&path, config.chunk_file_bytes)?;
        let synced = meta.get(SYNCED_KEY)?.and_then(|v| Position::decode(&v));
        // Nothing is changed before the rollback check below: a refused log stays as it is for
        // `tapeline recover`.
        let unwritten = count_chunks(&records, &chunks, &mut appender, synced)?;
        let (streams, damaged_tail, trailers) = recover(&records, &catalog, &chunks, &unwritten.keys)?;
        let (mut producers, caught_up) = recover_producers(&records, trailers)?;
        let last = streams.values().filter_map(|s| s.last_tick).max();
        // A corrupt last chunk hides its stream's true last tick: the check would be a guess.
        // A mark of 0 acknowledges nothing (every stream was deleted).
        if let Some(mark) = mark.filter(|m| !damaged_tail && m.0 > 0) {
            if last.is_none_or(|last| last < mark) {
                error!(path = %path.display(), recovered = ?last, acknowledged = %mark, "the storage engine rolled its log back");
                return Err(guard::rolled_back(&path, last, mark));
            }
            guard::release_blobs(&path);
        }
        drop_unwritten(&records, &unwritten)?;
        if let Some(from) = unwritten.from {
            forget_producers_from(&records, &mut producers, from)?;
        }
        let orphans = appender.orphans();
        if !orphans.is_empty() {
            warn!(files = ?orphans, "chunk files no chunk refers to (a crash before their deletion, or pointers sled lost): kept for `tapeline recover`; delete them once not needed");
        }
        store_caught_up(&records, &producers, caught_up)?;
        let watermark = last.unwrap_or_default();
        let next_id = streams.values().map(|s| s.id.0 + 1).max().unwrap_or(0);
        info!(path = %path.display(), streams = streams.len(), producers = producers.len(), tail_tick = %watermark, "log opened");

        let shared = Arc::new(RwLock::new(Shared {
            streams: streams.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            watermark,
        }));
        let (commits, _) = broadcast::channel(COMMIT_BROADCAST);
        let (writer, inbox) = mpsc::channel(WRITER_QUEUE);
        let flush_failed = Arc::new(std::sync::OnceLock::new());
        let flusher = match fsync {
            FsyncPolicy::Interval(every) => {
                Some(start_flusher(db.clone(), meta.clone(), chunks.clone(), every, flush_failed.clone())?)
            }
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        let state = Writer {
            db: db.clone(),
            records: records.clone(),
            appender,
            meta: meta.clone(),
            catalog,
            fsync,
            streams,
            clock: watermark,
            next_id,
            producers,
            max_producers: config.limits.max_producers,
            max_streams: config.limits.max_streams,
            mark: temp_dir.is_none().then(|| Mark::new(path.clone(), last.unwrap_or_default())),
            flush_failed,
            space: Space::new(
                db.clone(),
                chunks.clone(),
                path.clone(),
                config.max_disk_bytes,
                config.min_free_disk_bytes,
            ),
            failed: None,
            shared: shared.clone(),
            commits: commits.clone(),
        };
        let writer_thread = std::thread::Builder::new()
            .name("tapeline-writer".into())
            .spawn(move || state.run(inbox))
            .map_err(|source| Error::Io { context: "starting the writer thread".into(), source })?;
        Ok(Log {
            db,
            records,
            chunks,
            tail: TailCache::default(),
            meta,
            shared,
            commits,
            writer,
            queue_budget: Arc::new(Semaphore::new(WRITER_QUEUE_KIB as usize)),
            writer_thread: Mutex::new(Some(writer_thread)),
            server_id,
            advance_asked: std::sync::atomic::AtomicU64::new(0),
            flusher: Mutex::new(flusher),
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
        let kib = (bytes.div_ceil(1024) as u64).min(u64::from(WRITER_QUEUE_KIB)) as u32;
        let queued =
            self.queue_budget.clone().acquire_many_owned(kib).await.map_err(|_| Error::ShuttingDown)?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Append { records, source, reply, _queued: queued };
        self.writer.send(command).await.map_err(|_| Error::ShuttingDown)?;
        Ok(answer)
    }

    /// Raises the broker's clock to `to` (at most the wall clock) and publishes the new watermark
    /// (after every batch queued before this call). Lets a reader learn that time passed with
    /// nothing published: no record will ever be appended at or below the returned tick (explicit
    /// ticks aside, which must be above their stream's last tick). A relay passes the tick its
    /// upstream confirmed, never more: its own clock says nothing of what the upstream holds.
    pub async fn advance(&self, to: Tick) -> Result<Tick> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command::Advance { to, reply }).await.map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)
    }

    /// Like [`Log::advance`], but skipped when an advance to within `slack` of `to` was already
    /// asked for: many subscriptions' heartbeats fire together, and one advance serves them all.
    pub async fn advance_lazily(&self, to: Tick, slack: std::time::Duration) -> Result<()> {
        let slack = u64::try_from(slack.as_nanos()).unwrap_or(u64::MAX);
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

    /// Reads records of one stream with `after < tick <= upto`, in tick order, whole chunks at a
    /// time, stopping after the chunk that reaches `max_records`. Every record's CRC is checked;
    /// a damaged chunk is an `Error::DataLoss` naming its tick range. When retention removed part
    /// of the range, the batch says so (`truncated`) and holds only records after the removed
    /// ones. Blocking.
    pub fn read(
        &self,
        stream: &StreamInfo,
        after: Option<Tick>,
        upto: Tick,
        max_records: usize,
    ) -> Result<ReadBatch> {
        let mut batch = self.read_chunks(stream, after, upto, max_records)?;
        // Looked up after the scan: a removal is published before its chunks are deleted, so a
        // scan that missed a deleted chunk finds the mark here.
        let (through, earliest) = match self.read_shared().streams.get(&stream.name) {
            Some(now) if now.id == stream.id => (now.trimmed.through, now.first_tick),
            _ => (None, None),
        };
        let requested = after.map_or(Tick(0), |t| Tick(t.0.saturating_add(1)));
        if let Some(through) = through.filter(|&through| requested <= through && requested <= upto) {
            batch.records.retain(|r| r.tick > through);
            batch.truncated = Some(Truncation { requested, through, earliest });
        }
        Ok(batch)
    }

    fn read_chunks(
        &self,
        stream: &StreamInfo,
        after: Option<Tick>,
        upto: Tick,
        max_records: usize,
    ) -> Result<ReadBatch> {
        let id = stream.id;
        let first_wanted = match after {
            None => Tick(0),
            Some(t) if t >= upto => {
                return Ok(ReadBatch {
                    records: Vec::new(),
                    chunks: Vec::new(),
                    complete: true,
                    truncated: None,
                })
            }
            Some(t) => Tick(t.0 + 1),
        };
        // The chunk that holds `first_wanted` may start before it: begin at the last chunk that
        // starts at or before it.
        let start = match self.records.range(key(id, Tick(0))..=key(id, first_wanted)).next_back() {
            Some(Ok(entry)) => entry.0,
            Some(Err(sled::Error::Corruption { .. })) => {
                return Err(self.damaged_page(stream, first_wanted, upto))
            }
            Some(Err(err)) => return Err(err.into()),
            None => key(id, first_wanted).as_ref().into(),
        };
        let end: sled::IVec = key(id, upto).as_ref().into();
        let mut records = Vec::new();
        let mut chunks = Vec::new();
        for entry in self.records.range(start..=end) {
            let (k, v) = match entry {
                Ok(entry) => entry,
                Err(sled::Error::Corruption { .. }) if !records.is_empty() => {
                    // Deliver what was read; the next read starts at the damage and reports it.
                    return Ok(ReadBatch { records, chunks, complete: false, truncated: None });
                }
                Err(sled::Error::Corruption { .. }) => {
                    return Err(self.damaged_page(stream, first_wanted, upto))
                }
                Err(err) => return Err(err.into()),
            };
            let index = chunks.len() as u32;
            // The newest chunks: read and verified once for every subscriber at the tail.
            let value = if let Some(kept) = self.tail.get(&v) {
                kept.copy_into(index, first_wanted, upto, &mut records);
                kept.value.clone()
            } else {
                let before = records.len();
                let pointer = v.clone();
                // A chunk whose bytes cannot be read is damaged like one that does not decode.
                let loaded = match self.load_current(&k, v) {
                    Ok(Some(value)) => Ok(value),
                    // Removed by retention since the scan read its key: `read` reports the removal.
                    Ok(None) => continue,
                    Err(err) => Err(err),
                };
                let decoded = match &loaded {
                    Ok(value) => chunk::decode_into(value, index, first_wanted, upto, &mut records),
                    Err(err) => Err(err.clone()),
                };
                let head = match decoded {
                    Ok(head) => head,
                    Err(err) => {
                        if !records.is_empty() {
                            // Deliver the intact records first (those before the damage included); the
                            // next read starts at the damage and reports it.
                            chunks.push(loaded.unwrap_or_default());
                            return Ok(ReadBatch { records, chunks, complete: false, truncated: None });
                        }
                        let from = key_tick(&k).max(first_wanted);
                        // Up to the stream's next chunk, wherever it lies (not bounded by this read).
                        let after = key(id, Tick(key_tick(&k).0.saturating_add(1)));
                        let to = match self.records.range(after..=key(id, Tick::MAX)).next() {
                            Some(Ok((next, _))) => Tick(key_tick(&next).0.saturating_sub(1)),
                            _ => stream.last_tick.unwrap_or(from).max(from),
                        };
                        error!(stream = %stream.name, from = %from, to = %to, detail = %err.detail, "corrupt chunk");
                        return Err(Error::DataLoss {
                            stream: stream.name.to_string(),
                            from,
                            to,
                            detail: err.detail,
                        });
                    }
                };
                let value = loaded.unwrap_or_default();
                // A whole chunk near the stream's tail is what the other subscribers following the
                // stream read next, even those a little behind. (Inline chunks, from before chunk
                // files, have no pointer.)
                let whole = head.count as usize == records.len() - before;
                let recent = match (records.last(), stream.last_tick) {
                    (Some(r), Some(last)) => r.tick.0.saturating_add(tail_cache::RECENT.0) >= last.0,
                    _ => false,
                };
                if whole && recent && Location::decode(&pointer).is_some() {
                    let kept = records[before..].iter().map(|r| Stored { chunk: 0, ..r.clone() }).collect();
                    self.tail.insert(&pointer, Arc::new(Decoded { value: value.clone(), records: kept }));
                }
                value
            };
            chunks.push(value);
            if records.last().is_some_and(|r| r.tick >= upto) {
                return Ok(ReadBatch { records, chunks, complete: true, truncated: None });
            }
            if records.len() >= max_records {
                return Ok(ReadBatch { records, chunks, complete: false, truncated: None });
            }
        }
        Ok(ReadBatch { records, chunks, complete: true, truncated: None })
    }

    /// The error for a stream whose stored pages sled reports corrupt from `from` on: names the
    /// range up to the first key that reads again (found by bisection), so that a subscriber can
    /// resume after it and the rest of the stream stays readable.
    fn damaged_page(&self, stream: &StreamInfo, from: Tick, upto: Tick) -> Error {
        let last = stream.last_tick.unwrap_or(upto).max(upto);
        let to = readable_after(&self.records, stream.id, from, last)
            .map_or(last, |t| Tick(t.0.saturating_sub(1)));
        error!(stream = %stream.name, from = %from, to = %to, "storage engine reports a corrupt page");
        Error::DataLoss {
            stream: stream.name.to_string(),
            from,
            to,
            detail: "the storage engine reports a corrupt page".into(),
        }
    }

    /// Plans the removal of `stream`'s oldest chunks that `keep` asks for, at most `max_chunks`
    /// of them; `None` when nothing is to be removed. Reads only (the chunks it may remove and
    /// the first one it keeps), so it runs beside the writer. Blocking.
    pub fn plan_trim(&self, stream: &StreamInfo, keep: &Keep, max_chunks: usize) -> Result<Option<TrimPlan>> {
        // Counters since the stream's creation: what it held before a chunk, and in all.
        let end_records = stream.trimmed.records + stream.records;
        let end_bytes = stream.trimmed.bytes + stream.bytes;
        let mut chunks = self.records.scan_prefix(stream.id.0.to_be_bytes());
        let Some(first) = chunks.next() else { return Ok(None) };
        let (mut key_now, mut value_now) = first?;
        let mut head_now = self.header(stream, &key_now, &value_now)?;
        let mut delete = Vec::new();
        let mut last_deleted = None;
        // The last chunk is never removed: the loop only removes a chunk that has a successor.
        for next in chunks {
            let (key_next, value_next) = next?;
            let head_next = self.header(stream, &key_next, &value_next)?;
            // Every record of a chunk lies below the first tick of the next one.
            let below = key_tick(&key_next);
            let old = keep.below.is_some_and(|b| below <= b);
            let over =
                keep.max_records.is_some_and(|m| end_records.saturating_sub(head_now.records_before) > m)
                    || keep.max_bytes.is_some_and(|m| end_bytes.saturating_sub(head_now.bytes_before) > m);
            let in_order = delete.is_empty() || keep.only_below.is_none_or(|b| below <= b);
            if !(old || over) || !in_order || delete.len() >= max_chunks {
                break;
            }
            delete.push(key_now);
            last_deleted = Some(value_now);
            (key_now, value_now, head_now) = (key_next, value_next, head_next);
        }
        let Some(last_deleted) = last_deleted else { return Ok(None) };
        let first = key_tick(&key_now);
        // The exact last tick removed, so that a reader resuming right after it is not told of a
        // removal; a damaged chunk falls back to the tick before the next chunk.
        let through = self
            .chunks
            .load(last_deleted)
            .ok()
            .and_then(|value| chunk::decode(&value).ok())
            .and_then(|(_, records)| records.last().map(|r| r.tick))
            .unwrap_or(Tick(first.0.saturating_sub(1)));
        Ok(Some(TrimPlan {
            stream: stream.name.clone(),
            id: stream.id,
            delete,
            first,
            through,
            records_before: head_now.records_before,
            bytes_before: head_now.bytes_before,
        }))
    }

    /// The chunk stored under `key` (all of it), whose value was `value` when a scan read it.
    fn load_current(&self, key: &[u8], value: sled::IVec) -> std::result::Result<Option<Bytes>, ChunkError> {
        self.load_current_with(key, value, |v| self.chunks.load(v))
    }

    /// What `load` reads of the chunk under `key`, whose value was `value` when a scan read it.
    /// When its bytes cannot be read, looks again: retention may have removed the chunk since
    /// (`None`), or compaction moved it, and the file it was in may be gone.
    fn load_current_with(
        &self,
        key: &[u8],
        value: sled::IVec,
        load: impl Fn(sled::IVec) -> std::result::Result<Bytes, ChunkError>,
    ) -> std::result::Result<Option<Bytes>, ChunkError> {
        match load(value.clone()) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) => match self.records.get(key) {
                Ok(None) => Ok(None),
                Ok(Some(now)) if now != value => load(now).map(Some),
                _ => Err(err),
            },
        }
    }

    /// The header of the chunk stored under `key`, reading only its first bytes.
    fn header(&self, stream: &StreamInfo, key: &[u8], value: &sled::IVec) -> Result<chunk::ChunkHeader> {
        match self
            .load_current_with(key, value.clone(), |v| self.chunks.load_head(v, chunk::MAX_HEADER_BYTES))
        {
            Ok(Some(head)) => chunk::header(&head).map_err(|_| bad_header(stream, key)),
            _ => Err(bad_header(stream, key)),
        }
    }

    /// How many records `stream` has had with a tick at or below `tick` since it was created
    /// (those retention removed included): the running total of the chunk holding `tick` plus
    /// its records up to it. Reads one chunk. Blocking.
    pub fn count_through(&self, stream: &StreamInfo, tick: Option<Tick>) -> Result<u64> {
        let Some(tick) = tick else { return Ok(0) };
        let Some(entry) = self.records.range(key(stream.id, Tick(0))..=key(stream.id, tick)).next_back()
        else {
            // Before the first chunk kept: only removed records lie there.
            return Ok(stream.trimmed.records);
        };
        let (k, v) = entry?;
        let loaded = match self.load_current(&k, v) {
            Ok(Some(value)) => Ok(value),
            // Retention removed that chunk meanwhile: every record up to `tick` is gone, and the
            // stream's removed count now includes them (approximately: the chunk's later ones too).
            Ok(None) => {
                let now = self.read_shared().streams.get(&stream.name).map(|s| s.trimmed.records);
                return Ok(now.unwrap_or(stream.trimmed.records));
            }
            Err(err) => Err(err),
        };
        let (head, records) = loaded.and_then(|v| chunk::decode(&v)).map_err(|err| Error::DataLoss {
            stream: stream.name.to_string(),
            from: key_tick(&k),
            to: tick,
            detail: err.detail,
        })?;
        Ok(head.records_before + records.iter().filter(|r| r.tick <= tick).count() as u64)
    }

    /// Makes everything written so far durable: the chunk files, then sled.
    pub async fn flush(&self) -> Result<()> {
        let (db, meta, chunks) = (self.db.clone(), self.meta.clone(), self.chunks.clone());
        tokio::task::spawn_blocking(move || flush_all(&db, &meta, &chunks))
            .await
            .map_err(|err| Error::Internal(format!("flush task failed: {err}")))?
    }

    /// Creates `name` with `meta`; an existing stream keeps its records and gets `meta` when
    /// `update` (with the same metadata it is left as it is). Returns the stream as it is now.
    pub async fn define(
        &self,
        name: crate::names::StreamName,
        meta: StreamMeta,
        update: bool,
    ) -> Result<StreamInfo> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Command::Define { name, meta, update, reply })
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

    /// The chunks a sparse chunk file still holds (see `ChunkFiles::sparse`), at most `max`, as
    /// (key, pointer): what [`Log::compact`] moves. Scans every pointer, beside the writer.
    /// Blocking.
    pub fn plan_compaction(&self, max: usize) -> Result<Vec<(sled::IVec, sled::IVec)>> {
        let Some(file) = self.chunks.sparse() else { return Ok(Vec::new()) };
        let mut moves = Vec::new();
        for entry in self.records.range(..TRIM_PREFIX) {
            let (k, v) = entry?;
            if Location::decode(&v).is_some_and(|at| at.file == file) {
                moves.push((k, v));
                if moves.len() >= max {
                    break;
                }
            }
        }
        if moves.is_empty() {
            // Counted as held, yet nothing points there: leave it to the next restart's count.
            self.chunks.give_up(file);
        }
        Ok(moves)
    }

    /// Has the writer move planned chunks to the active chunk file (each unless it was removed or
    /// moved since); returns how many moved.
    pub async fn compact(&self, moves: Vec<(sled::IVec, sled::IVec)>) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command::Compact { moves, reply }).await.map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
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
        if self.writer.send(Command::Stop { reply }).await.is_ok() {
            let _ = done.await;
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
        self.flush().await
    }
}

fn bad_header(stream: &StreamInfo, key: &[u8]) -> Error {
    Error::DataLoss {
        stream: stream.name.to_string(),
        from: key_tick(key),
        to: key_tick(key),
        detail: "a chunk header is unreadable; retention stops before it".into(),
    }
}

/// Why sled could not open a data dir, with what to do about it.
fn open_failure(err: &sled::Error) -> String {
    match err {
        // sled reports a held lock only in the message of an `Other` I/O error.
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            "another process holds its lock (is another tapeline serving it?)".into()
        }
        sled::Error::Corruption { .. } => format!(
            "the storage engine finds it corrupt ({err}); `tapeline verify --data DIR` tells what is damaged and \
             `tapeline recover --data DIR --into NEW_DIR` copies every readable record into a new data dir"
        ),
        _ => format!("storage error: {err}"),
    }
}

/// The memory a queued batch holds, for the queue and group budgets: payloads, headers, and a
/// fixed cost per record.
fn held_bytes(records: &[NewRecord]) -> usize {
    records
        .iter()
        .map(|r| r.payload.len() + r.headers.iter().map(|(k, v)| k.len() + v.len() + 48).sum::<usize>() + 128)
        .sum()
}

/// One catalog entry, as `read_catalog` returns it.
pub(crate) type CatalogEntry = (Arc<str>, StreamId, Tick, StreamMeta);

/// Every catalog entry: stream name, id, creation tick and metadata. A malformed entry is skipped
/// with an error in the log; unreadable metadata is replaced by the defaults, with an error.
pub(crate) fn read_catalog(catalog: &sled::Tree) -> Result<Vec<CatalogEntry>> {
    let mut entries = Vec::new();
    for entry in catalog.iter() {
        let (name, value) = entry?;
        let name: Arc<str> = Arc::from(String::from_utf8_lossy(&name).as_ref());
        if value.len() < 12 {
            error!(stream = %name, "catalog entry has a bad length; stream skipped");
            continue;
        }
        let id = StreamId(u32::from_le_bytes(value[..4].try_into().unwrap_or_default()));
        let created_tick = Tick(u64::from_le_bytes(value[4..12].try_into().unwrap_or_default()));
        let meta = match &value[12..] {
            [] => StreamMeta::default(),
            json => serde_json::from_slice(json).unwrap_or_else(|err| {
                error!(stream = %name, cause = %err, "stream metadata is unreadable; defaults used");
                StreamMeta::default()
            }),
        };
        entries.push((name, id, created_tick, meta));
    }
    Ok(entries)
}

/// Where sled's pages of a stream read again after a page it reports corrupt, whose keys start
/// at or after `from`: the first readable key's tick at or before `upto`, if any. Reads fail
/// for every start inside the damaged page and succeed past it, so bisection finds the edge.
pub(crate) fn readable_after(records: &sled::Tree, id: StreamId, from: Tick, upto: Tick) -> Option<Tick> {
    let end = key(id, upto);
    let readable = |t: u64| records.range(key(id, Tick(t)).as_ref()..=end.as_ref()).next();
    let (mut bad, mut good) = (from.0, upto.0.max(from.0).saturating_add(1));
    while good - bad > 1 {
        let mid = bad + (good - bad) / 2;
        match readable(mid) {
            Some(Err(_)) => bad = mid,
            _ => good = mid,
        }
    }
    match readable(good) {
        Some(Ok((k, _))) => Some(key_tick(&k)),
        _ => None,
    }
}

/// The trailers of streams' last chunks, each with the chunk's last tick.
type Trailers = Vec<(Tick, Bytes)>;

/// Rebuilds every stream's counters from the catalog and each stream's first and last chunk.
/// Also says whether some stream's last chunk is damaged (its true last tick is then unknown),
/// and returns the last chunks' trailers (the tags of their batches, for `recover_producers`).
fn recover(
    records: &sled::Tree,
    catalog: &sled::Tree,
    chunks: &ChunkFiles,
    unwritten: &std::collections::HashSet<sled::IVec>,
) -> Result<(HashMap<Arc<str>, StreamInfo>, bool, Trailers)> {
    let mut streams = HashMap::new();
    let mut damaged_tail = false;
    let mut trailers = Trailers::new();
    for (name, id, created_tick, meta) in read_catalog(catalog)? {
        let mut info = StreamInfo {
            name: name.clone(),
            id,
            records: 0,
            bytes: 0,
            first_tick: None,
            last_tick: None,
            created_tick,
            trimmed: Trimmed::default(),
            meta: Arc::new(meta),
            recent: Recent::default(),
        };
        let prefix = id.0.to_be_bytes();
        // Chunks found unwritten are the newest of their streams: skipped from the end.
        let written = |entry: &sled::Result<(sled::IVec, sled::IVec)>| !matches!(entry, Ok((k, _)) if unwritten.contains(k));
        if let (Some(first), Some(last)) = (
            records.scan_prefix(prefix).next().filter(written),
            records.scan_prefix(prefix).rev().find(written),
        ) {
            let (first_key, first_value) = first?;
            let (last_key, last_value) = last?;
            let first_head = chunks
                .load_head(first_value, chunk::MAX_HEADER_BYTES)
                .and_then(|head| chunk::header(&head))
                .unwrap_or_default();
            let loaded = chunks.load(last_value);
            let last_value = loaded.clone().unwrap_or_default();
            let (last_head, last_records) = match loaded.and_then(|value| chunk::decode(&value)) {
                Ok(decoded) => decoded,
                Err(err) => {
                    // Keep the broker available; the damaged range is reported when read.
                    error!(stream = %name, tick = %key_tick(&last_key), detail = %err.detail, "last chunk is corrupt");
                    damaged_tail = true;
                    (chunk::header(&last_value).unwrap_or_default(), Vec::new())
                }
            };
            let last_bytes: u64 = last_records.iter().map(|r| r.payload.len() as u64).sum();
            info.first_tick = Some(key_tick(&first_key));
            info.last_tick = Some(last_records.last().map_or(key_tick(&last_key), |r| r.tick));
            match chunk::trailer(&last_value, &last_head, &last_records) {
                Ok([]) => {}
                Ok(trailer) => {
                    trailers.push((info.last_tick.unwrap_or_default(), last_value.slice_ref(trailer)))
                }
                // The records were read; only the memory of their producers is lost.
                Err(err) if !last_records.is_empty() => {
                    error!(stream = %name, tick = %key_tick(&last_key), detail = %err.detail, "batch tags of the last chunk are damaged: a retry of its batches may be appended again")
                }
                // The chunk itself is damaged: reported above.
                Err(_) => {}
            }
            info.records = (last_head.records_before + last_records.len() as u64)
                .saturating_sub(first_head.records_before);
            info.bytes = (last_head.bytes_before + last_bytes).saturating_sub(first_head.bytes_before);
            info.trimmed.records = first_head.records_before;
            info.trimmed.bytes = first_head.bytes_before;
            if let Some(mark) = records.get(trim_key(id))? {
                info.trimmed.through =
                    <[u8; 8]>::try_from(mark.as_ref()).ok().map(|b| Tick(u64::from_le_bytes(b)));
            }
        }
        debug!(stream = %name, records = info.records, "stream recovered");
        streams.insert(name, info);
    }
    Ok((streams, damaged_tail, trailers))
}

/// Chunks a crash left without their bytes (see `count_chunks`): their keys, removed only once
/// the open goes ahead, and the lowest first tick among them.
#[derive(Default)]
struct Unwritten {
    keys: std::collections::HashSet<sled::IVec>,
    from: Option<Tick>,
}

/// Counts, per chunk file, the bytes sled's pointers refer to (so that a file nothing refers to
/// any more can be deleted), and finds the chunks a crash left without their bytes: unless
/// `fsync=always`, sled may have stored a pointer whose bytes never reached the disk. Only chunks
/// of the newest file (older ones were synced before it was started) past the last sync noted
/// (`synced`) can be such, so only those are read and checked, in the order they were written;
/// from the first that fails, every later one goes too, so that what is kept is a prefix of the
/// commits and no stream has a gap. A damaged chunk before the sync is kept: reads report it as
/// `DATA_LOSS`. Changes nothing in sled: the caller drops the chunks found (`drop_unwritten`)
/// only once it decided to serve this log.
fn count_chunks(
    records: &sled::Tree,
    chunks: &ChunkFiles,
    appender: &mut Appender,
    synced: Option<Position>,
) -> Result<Unwritten> {
    let newest = appender.position();
    let mut unsynced = Vec::new();
    let mut highest = newest.file;
    // A pointer into a file past the newest, or past the newest file's end: that file is
    // missing or shorter than what was written to it.
    let mut lost = false;
    for entry in records.range(..TRIM_PREFIX) {
        let (k, v) = entry?;
        let Some(at) = Location::decode(&v) else { continue };
        highest = highest.max(at.file);
        lost |=
            at.file > newest.file || (at.file == newest.file && at.offset + u64::from(at.len) > newest.len);
        if at.file >= newest.file && !synced.is_some_and(|synced| synced.covers(at)) {
            unsynced.push((at, k));
        } else {
            appender.counted(at);
        }
    }
    if lost {
        // New chunks must not land where old pointers point: they go to a new file after every
        // file referred to. Reads of the old pointers report the loss (or, for chunks a crash
        // left unwritten, recovery drops them below).
        warn!(
            highest,
            newest = newest.file,
            "chunks are referred to past the end of the chunk files; new chunks go to a new file"
        );
        appender.start_after(highest)?;
    }
    unsynced.sort_by_key(|(at, _)| (at.file, at.offset));
    let intact = |at: Location| chunks.read(at).and_then(|bytes| chunk::decode(&bytes).map(|_| ()));
    let cut = unsynced.iter().position(|(at, _)| intact(*at).is_err()).unwrap_or(unsynced.len());
    let mut unwritten = Unwritten::default();
    for (i, (at, k)) in unsynced.into_iter().enumerate() {
        if i < cut {
            appender.counted(at);
            continue;
        }
        warn!(stream_id = u32::from_be_bytes(k[..4].try_into().unwrap_or_default()), tick = %key_tick(&k), file = at.file, offset = at.offset, "chunk written after the last sync and not (or not wholly) on disk: dropped with every later one");
        unwritten.from = Some(unwritten.from.map_or(key_tick(&k), |from| from.min(key_tick(&k))));
        unwritten.keys.insert(k);
    }
    Ok(unwritten)
}

/// Removes the pointers of the chunks `count_chunks` found unwritten, and makes that durable
/// before anything is appended where they point.
fn drop_unwritten(records: &sled::Tree, unwritten: &Unwritten) -> Result<()> {
    if unwritten.keys.is_empty() {
        return Ok(());
    }
    for k in &unwritten.keys {
        records.remove(k)?;
    }
    records.flush()?;
    Ok(())
}

/// Forgets the producers' batches whose records recovery dropped (`count_chunks`), and stores
/// what is left of their state at once.
fn forget_producers_from(records: &sled::Tree, producers: &mut Producers, from: Tick) -> Result<()> {
    for id in producers.forget_from(from) {
        warn!(producer = %id, from = %from, "batches lost in a crash forgotten: their retries are appended again");
        match producers.encode(&id) {
            Some(state) => records.insert(producer_key(&id), state)?,
            None => records.remove(producer_key(&id))?,
        };
    }
    records.flush()?;
    Ok(())
}

/// Under `fsync=interval`, makes the log durable every `every`: the chunk files first, then sled,
/// so that sled's pointers reach the disk after the bytes they point to. The thread stops when
/// the returned sender is dropped, with the log.
/// Syncs the chunk files, notes how far ([`SYNCED_KEY`]), then flushes sled: the order that
/// keeps sled's pointers from reaching the disk before the bytes they point to. Blocking.
fn flush_all(db: &sled::Db, meta: &sled::Tree, chunks: &ChunkFiles) -> Result<()> {
    let synced =
        chunks.sync().map_err(|source| Error::Io { context: "syncing the chunk files".into(), source })?;
    if let Some(at) = synced {
        meta.insert(SYNCED_KEY, &at.encode())?;
    }
    db.flush()?;
    Ok(())
}

/// The flusher thread, and the sender whose drop stops it.
type Flusher = (std::sync::mpsc::Sender<()>, JoinHandle<()>);

fn start_flusher(
    db: sled::Db,
    meta: sled::Tree,
    chunks: Arc<ChunkFiles>,
    every: std::time::Duration,
    failed: Arc<std::sync::OnceLock<String>>,
) -> Result<Flusher> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("tapeline-flusher".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if let Err(err) = flush_all(&db, &meta, &chunks) {
                    let cause = err.to_string();
                    // After a failed fsync the kernel may drop the dirty pages: what was written
                    // since the last sync may be lost. Stop, as the writer does on a failed write.
                    error!(%cause, "the periodic flush failed; the log takes no more writes");
                    let _ = failed.set(cause);
                    return;
                }
            }
        })
        .map_err(|source| Error::Io { context: "starting the flusher thread".into(), source })?;
    Ok((stop, handle))
}

/// Reads back every idempotent producer's state. A damaged entry is dropped with an error in the
/// log: that producer's retries are then treated as new batches. Then catches the state up
/// from the tags in streams' last chunks, oldest first: a crash between a single-chunk commit
/// and the state stored after it leaves the state one commit behind. Returns the producers
/// caught up, whose state is to be stored (`store_caught_up`).
fn recover_producers(records: &sled::Tree, mut trailers: Trailers) -> Result<(Producers, Vec<Arc<str>>)> {
    let mut producers = Producers::default();
    for entry in records.scan_prefix(PRODUCER_PREFIX) {
        let (k, v) = entry?;
        let id = String::from_utf8_lossy(&k[PRODUCER_PREFIX.len()..]).into_owned();
        match producers::decode(&v) {
            Ok(state) => producers.restore(Arc::from(id), state),
            Err(detail) => error!(producer = %id, %detail, "stored producer state is corrupt; dropped"),
        }
    }
    trailers.sort_by_key(|(tick, _)| *tick);
    // Caught-up producers count as used now: they were active up to the crash, whatever ticks
    // (explicit ones may be old) their records carry.
    let now = Tick::now();
    let mut caught_up = Vec::new();
    for (tick, trailer) in trailers {
        match producers::decode_tags(&trailer) {
            Ok(tags) => {
                for (tag, ticks) in tags {
                    if producers.recall(&tag, &ticks, now) {
                        info!(producer = %tag.producer, sequence = tag.sequence, "producer state caught up from the log");
                        caught_up.push(tag.producer);
                    }
                }
            }
            Err(detail) => error!(tick = %tick, %detail, "batch tags in a chunk are corrupt; ignored"),
        }
    }
    Ok((producers, caught_up))
}

/// Stores the state of producers caught up from the log at once: a later chunk of the same stream
/// would no longer carry their tags.
fn store_caught_up(records: &sled::Tree, producers: &Producers, caught_up: Vec<Arc<str>>) -> Result<()> {
    if caught_up.is_empty() {
        return Ok(());
    }
    for id in caught_up {
        if let Some(state) = producers.encode(&id) {
            records.insert(producer_key(&id), state)?;
        }
    }
    records.flush()?;
    Ok(())
}

/// The single writer: owns tick assignment and every write.
struct Writer {
    db: sled::Db,
    records: sled::Tree,
    /// Appends chunks' bytes; counts what each chunk file still holds.
    appender: Appender,
    /// sled's `meta` tree, where the writer notes how far the chunk files are synced.
    meta: sled::Tree,
    catalog: sled::Tree,
    fsync: FsyncPolicy,
    /// The authoritative state of every stream; `shared` is a copy published after each commit.
    streams: HashMap<Arc<str>, StreamInfo>,
    /// The last tick assigned, for the whole broker.
    clock: Tick,
    next_id: u32,
    /// Idempotent producers' recent batches.
    producers: Producers,
    max_producers: usize,
    /// Streams the store may hold.
    max_streams: usize,
    /// Refuses batches before they could fill the disk.
    space: Space,
    /// The acknowledged-tick mark beside sled (none for a volatile store).
    mark: Option<Mark>,
    /// Set when a write or flush failed: every later append is refused with this cause.
    failed: Option<String>,
    /// Set by the flusher thread when a periodic flush failed (taken into `failed`).
    flush_failed: Arc<std::sync::OnceLock<String>>,
    shared: Arc<RwLock<Shared>>,
    commits: broadcast::Sender<Commit>,
}

/// A batch accepted into the current group, waiting for the commit to finish.
struct Accepted {
    ticks: Vec<Tick>,
    duplicate: bool,
    reply: Reply,
}

impl Writer {
    fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let mut stop = None;
        while stop.is_none() {
            let Some(first) = inbox.blocking_recv() else { break };
            // Gather every append already waiting; any other command waits for the group.
            let mut group = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            let mut then = None;
            while let Some(command) = next.take() {
                match command {
                    Command::Append { records, source, reply, _queued } => {
                        bytes += held_bytes(&records);
                        group.push((records, source, reply));
                    }
                    other => {
                        then = Some(other);
                        break;
                    }
                }
                if bytes < GROUP_MAX_BYTES {
                    next = inbox.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            match then {
                Some(Command::Advance { to, reply }) => {
                    let _ = reply.send(self.advance(to));
                }
                Some(Command::Trim { plan, reply }) => {
                    let _ = reply.send(self.trim(plan));
                }
                Some(Command::Compact { moves, reply }) => {
                    let _ = reply.send(self.compact(moves));
                }
                Some(Command::Define { name, meta, update, reply }) => {
                    let _ = reply.send(self.define(name, meta, update));
                }
                Some(Command::Delete { name, reply }) => {
                    let _ = reply.send(self.delete(&name));
                }
                Some(Command::Stop { reply }) => stop = Some(reply),
                Some(Command::Append { .. }) | None => {}
            }
        }
        match self.sync_chunks().and_then(|()| Ok(self.db.flush()?)) {
            Ok(_) => {
                if let Some(mark) = self.mark.as_mut().filter(|_| self.failed.is_none()) {
                    // Everything is durable now, whatever the fsync policy (unless a write
                    // failed: the in-memory state may then be ahead of what is stored).
                    mark.acknowledged(
                        self.streams.values().filter_map(|s| s.last_tick).max().unwrap_or_default(),
                    );
                    mark.flush();
                }
            }
            Err(err) => error!(cause = %err, "final flush failed"),
        }
        info!("writer stopped");
        if let Some(reply) = stop {
            let _ = reply.send(());
        }
    }

    /// Raises the clock to `to` (at most now) and publishes the watermark in an empty commit (also
    /// when it did not move, so that a reader waiting for it can rely on receiving it).
    fn advance(&mut self, to: Tick) -> Tick {
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        if self.failed.is_none() {
            self.clock = self.clock.max(to.min(Tick::now()));
            shared.watermark = shared.watermark.max(self.clock);
        }
        let commit = Commit {
            watermark: shared.watermark,
            streams: Arc::new([]),
            added: Arc::new([]),
            changed: Arc::new([]),
        };
        let _ = self.commits.send(commit);
        shared.watermark
    }

    /// See [`Log::define`].
    fn define(
        &mut self,
        name: crate::names::StreamName,
        meta: StreamMeta,
        update: bool,
    ) -> Result<StreamInfo> {
        if let Some(cause) = &self.failed {
            return Err(Error::LogFailed { cause: cause.clone() });
        }
        let (info, created) = match self.streams.get(name.as_str()) {
            Some(info) if *info.meta == meta => return Ok(info.clone()),
            Some(_) if !update => return Err(Error::StreamExists { stream: name.to_string() }),
            Some(info) => (StreamInfo { meta: Arc::new(meta), ..info.clone() }, false),
            None => {
                if self.streams.len() >= self.max_streams || self.next_id >= u32::MAX - 1 {
                    return Err(Error::TooMany {
                        what: "streams",
                        limit: self.max_streams,
                        setting: "limits.max_streams",
                        hint: "delete streams or raise the limit",
                    });
                }
                let now = Tick::now().max(Tick(self.clock.0 + 1));
                let info = StreamInfo {
                    name: name.shared(),
                    id: StreamId(self.next_id),
                    records: 0,
                    bytes: 0,
                    first_tick: None,
                    last_tick: None,
                    created_tick: now,
                    trimmed: Trimmed::default(),
                    meta: Arc::new(meta),
                    recent: Recent::default(),
                };
                (info, true)
            }
        };
        let written = self
            .catalog
            .insert(name.as_str().as_bytes(), catalog_value(info.id, info.created_tick, &info.meta))
            .and_then(|_| self.db.flush().map(|_| ()));
        if let Err(err) = written {
            error!(cause = %err, stream = %name, "writing the catalog failed; the log takes no more writes");
            self.failed = Some(err.to_string());
            return Err(err.into());
        }
        if created {
            self.next_id += 1;
            info!(stream = %name, id = info.id.0, "stream created");
        } else {
            info!(stream = %name, "stream metadata changed");
        }
        self.streams.insert(info.name.clone(), info.clone());
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        shared.streams.insert(info.name.clone(), info.clone());
        let mut commit = Commit {
            watermark: shared.watermark,
            streams: Arc::new([]),
            added: Arc::new([]),
            changed: Arc::new([]),
        };
        if created {
            commit.added = Arc::new([info.clone()]);
        } else {
            commit.changed = Arc::new([(info.clone(), false)]);
        }
        let _ = self.commits.send(commit);
        Ok(info)
    }

    /// See [`Log::delete`]. The records go first, then the catalog entry: a crash between leaves
    /// an empty stream, never chunks without a stream (whose id a new stream could take).
    fn delete(&mut self, name: &str) -> Result<StreamInfo> {
        if let Some(cause) = &self.failed {
            return Err(Error::LogFailed { cause: cause.clone() });
        }
        let Some(info) = self.streams.get(name).cloned() else {
            return Err(Error::UnknownStream(name.to_string()));
        };
        if let Some(mark) = &mut self.mark {
            let newest = self.streams.values().filter(|s| s.id != info.id).filter_map(|s| s.last_tick).max();
            mark.lower(newest.unwrap_or_default());
        }
        let mut batch = sled::Batch::default();
        let mut freed = Vec::new();
        for entry in self.records.scan_prefix(info.id.0.to_be_bytes()) {
            let (k, v) = entry?;
            freed.extend(Location::decode(&v));
            batch.remove(k);
        }
        batch.remove(trim_key(info.id).as_ref());
        let written = self
            .records
            .apply_batch(batch)
            .and_then(|()| self.catalog.remove(name.as_bytes()).map(|_| ()))
            .and_then(|()| self.db.flush().map(|_| ()))
            .map_err(Error::from)
            .and_then(|()| self.release(&freed));
        if let Err(err) = written {
            error!(cause = %err, stream = %name, "deleting a stream failed; the log takes no more writes");
            self.failed = Some(err.to_string());
            return Err(err);
        }
        info!(stream = %name, records = info.records, "stream deleted");
        self.streams.remove(name);
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        shared.streams.remove(name);
        let changed: Arc<[(StreamInfo, bool)]> = Arc::new([(info.clone(), true)]);
        let _ = self.commits.send(Commit {
            watermark: shared.watermark,
            streams: Arc::new([]),
            added: Arc::new([]),
            changed,
        });
        Ok(info)
    }

    /// Removes the chunks of a plan, unless the stream changed since it was planned (it can only
    /// have grown, or been trimmed by an earlier plan).
    fn trim(&mut self, plan: TrimPlan) -> Result<()> {
        if let Some(cause) = &self.failed {
            return Err(Error::LogFailed { cause: cause.clone() });
        }
        let Some(stream) = self.streams.get_mut(&plan.stream).filter(|s| s.id == plan.id) else {
            return Ok(());
        };
        // Stale: an earlier removal already went past it. The writer only appends, so the chunk
        // the plan keeps is still there and not after the last tick.
        if stream.first_tick.is_none_or(|f| f >= plan.first)
            || stream.last_tick.is_none_or(|l| l < plan.first)
        {
            return Ok(());
        }
        let (records, bytes) = (stream.trimmed.records + stream.records, stream.trimmed.bytes + stream.bytes);
        stream.trimmed =
            Trimmed { records: plan.records_before, bytes: plan.bytes_before, through: Some(plan.through) };
        stream.records = records.saturating_sub(plan.records_before);
        stream.bytes = bytes.saturating_sub(plan.bytes_before);
        stream.first_tick = Some(plan.first);
        // Published before the chunks go: see `Log::read`.
        self.shared
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .streams
            .insert(stream.name.clone(), stream.clone());
        let mut batch = sled::Batch::default();
        // Where the chunks are now (compaction may have moved one since the plan was made).
        let mut freed = Vec::new();
        for k in &plan.delete {
            match self.records.get(k) {
                Ok(value) => freed.extend(value.and_then(|v| Location::decode(&v))),
                Err(err) => return Err(err.into()),
            }
            batch.remove(k.clone());
        }
        batch.insert(trim_key(plan.id).as_ref(), plan.through.0.to_le_bytes().as_ref());
        if let Err(err) =
            self.records.apply_batch(batch).map_err(Error::from).and_then(|()| self.release(&freed))
        {
            error!(cause = %err, stream = %plan.stream, "removing chunks failed; the log takes no more writes");
            self.failed = Some(err.to_string());
            return Err(err);
        }
        debug!(stream = %plan.stream, chunks = plan.delete.len(), through = %plan.through, "chunks removed");
        Ok(())
    }

    /// Syncs the chunk files and notes how far they are durable (flushed with sled's next flush).
    fn sync_chunks(&mut self) -> Result<()> {
        self.appender.sync()?;
        self.meta.insert(SYNCED_KEY, &self.appender.position().encode())?;
        Ok(())
    }

    /// Counts chunks whose pointers were removed or replaced, and deletes the chunk files no
    /// pointer refers to any more, once that is durable: the chunk files (where moved chunks
    /// went), then sled.
    fn release(&mut self, freed: &[Location]) -> Result<()> {
        for at in freed {
            self.appender.released(*at);
        }
        let unreferenced = self.appender.unreferenced();
        if !unreferenced.is_empty() {
            self.sync_chunks()?;
            self.db.flush()?;
            self.appender.delete(&unreferenced);
        }
        Ok(())
    }

    /// Moves chunks to the active chunk file so that the sparse file they were in can go.
    fn compact(&mut self, moves: Vec<(sled::IVec, sled::IVec)>) -> Result<usize> {
        if let Some(cause) = &self.failed {
            return Err(Error::LogFailed { cause: cause.clone() });
        }
        let (mut keys, mut from, mut chunks) = (Vec::new(), Vec::new(), Vec::new());
        for (k, v) in moves {
            // Only what the plan saw: a chunk removed or moved since stays as it is.
            if self.records.get(&k)?.as_ref() != Some(&v) {
                continue;
            }
            let Some(at) = Location::decode(&v) else { continue };
            match self.appender.files().read(at).and_then(|bytes| chunk::decode(&bytes).map(|_| bytes)) {
                Ok(bytes) => {
                    keys.push(k);
                    from.push(at);
                    chunks.push(bytes);
                }
                Err(err) => {
                    // A damaged chunk stays where it is, for reads to report and `recover` to
                    // rescue what it can; its file is not offered again.
                    warn!(file = at.file, tick = %key_tick(&k), detail = %err.detail, "damaged chunk left in place by compaction");
                    self.appender.files().give_up(at.file);
                }
            }
        }
        if keys.is_empty() {
            return Ok(0);
        }
        // The moved bytes are synced before any pointer to them is written, whatever the fsync
        // policy: the old copy goes once the new pointers are durable.
        let moved = self.appender.append(&chunks).and_then(|to| {
            self.sync_chunks()?;
            for (k, at) in keys.iter().zip(&to) {
                self.records.insert(k, &at.encode()[..])?;
            }
            self.release(&from)
        });
        if let Err(err) = moved {
            error!(cause = %err, "moving chunks failed; the log takes no more writes");
            self.failed = Some(err.to_string());
            return Err(err);
        }
        debug!(chunks = keys.len(), "chunks moved out of a sparse chunk file");
        Ok(keys.len())
    }

    /// Checks a batch and assigns its ticks without changing any state; `upstream` ticks are not
    /// held to this broker's clock.
    fn assign(&self, records: &[NewRecord], now: Tick, upstream: bool) -> Result<Vec<Tick>> {
        let mut clock = self.clock;
        let mut last: HashMap<&str, Tick> = HashMap::new();
        let mut ticks = Vec::with_capacity(records.len());
        let mut created = 0u64;
        for record in records {
            let name = record.stream.as_str();
            let stream_last = match last.get(name) {
                Some(t) => Some(*t),
                None => self.streams.get(name).and_then(|s| s.last_tick),
            };
            if !self.streams.contains_key(name) && !last.contains_key(name) {
                created += 1;
                if self.streams.len() as u64 + created > self.max_streams as u64 {
                    return Err(Error::TooMany {
                        what: "streams",
                        limit: self.max_streams,
                        setting: "limits.max_streams",
                        hint: "publish into existing streams, or raise the limit",
                    });
                }
                // Ids at and above TRIM_PREFIX's are reserved.
                if u64::from(self.next_id) + created >= u64::from(u32::MAX - 1) {
                    return Err(Error::Internal(format!("no stream id is left for stream {name:?}")));
                }
            }
            let tick = match record.tick {
                Some(tick) => {
                    if let Some(last) = stream_last.filter(|&last| tick <= last) {
                        return Err(Error::TickNotAfter { stream: name.to_string(), tick, last });
                    }
                    let limit = Tick(now.0 + MAX_TICK_AHEAD.0);
                    if tick > limit && !upstream {
                        return Err(Error::TickAhead { stream: name.to_string(), tick, limit });
                    }
                    tick
                }
                None => Tick(now.0.max(clock.0 + 1)),
            };
            clock = clock.max(tick);
            last.insert(name, tick);
            ticks.push(tick);
        }
        Ok(ticks)
    }

    fn commit(&mut self, group: Vec<(Vec<NewRecord>, Source, Reply)>) {
        if self.failed.is_none() {
            self.failed = self.flush_failed.get().cloned();
        }
        if let Some(cause) = &self.failed {
            for (_, _, reply) in group {
                let _ = reply.send(Err(Error::LogFailed { cause: cause.clone() }));
            }
            return;
        }
        let now = Tick::now();
        let mut added: Vec<StreamInfo> = Vec::new();
        // Per stream: its name, the first tick of the open chunk, and the chunk.
        let mut open: HashMap<StreamId, (Arc<str>, Tick, ChunkEncoder)> = HashMap::new();
        // Chunks sealed because they were full; the open ones join them at the end.
        let mut sealed: Vec<([u8; 12], Vec<u8>)> = Vec::new();
        let mut catalog_batch = sled::Batch::default();
        let mut accepted = Vec::with_capacity(group.len());
        // Producers whose state changed (to store) or who were forgotten (to delete).
        let mut producers_touched: Vec<Arc<str>> = Vec::new();
        let mut producers_forgotten: Vec<Arc<str>> = Vec::new();
        // Appended tagged batches, with their index in `accepted`: a chunk's trailer.
        let mut tagged: Vec<(BatchTag, usize)> = Vec::new();
        // Records and payload bytes per stream, for the streams' recent rates.
        let mut arrivals: HashMap<Arc<str>, (u64, u64)> = HashMap::new();

        for (records, source, reply) in group {
            let tag = source.tag();
            // A retry is answered before any other rule: it was checked when first appended.
            let seen = tag.map(|tag| self.producers.check(tag)).transpose();
            if let Ok(Some(Seen::Duplicate(ticks))) = seen {
                debug!(producer = ?tag.map(|t| &t.producer), "retried batch acknowledged again");
                accepted.push(Accepted { ticks, duplicate: true, reply });
                continue;
            }
            let ticks = seen
                .and_then(|_| self.assign(&records, now, matches!(source, Source::Upstream)))
                .and_then(|ticks| self.space.admit(held_bytes(&records)).map(|()| ticks));
            let ticks = match ticks {
                Ok(ticks) => ticks,
                Err(err) => {
                    debug!(cause = %err, "batch refused");
                    let _ = reply.send(Err(err));
                    continue;
                }
            };
            if let Some(tag) = tag {
                if let Some(forgotten) = self.producers.remember(tag, &ticks, now, self.max_producers) {
                    warn!(producer = %forgotten, limit = self.max_producers, "least recently used producer forgotten");
                    producers_forgotten.push(forgotten);
                }
                producers_touched.push(tag.producer.clone());
                tagged.push((tag.clone(), accepted.len()));
            }
            for (record, &tick) in records.iter().zip(&ticks) {
                let name = record.stream.as_str();
                if !self.streams.contains_key(name) {
                    let info = StreamInfo {
                        name: record.stream.shared(),
                        id: StreamId(self.next_id),
                        records: 0,
                        bytes: 0,
                        first_tick: None,
                        last_tick: None,
                        created_tick: tick,
                        trimmed: Trimmed::default(),
                        meta: Arc::default(),
                        recent: Recent::default(),
                    };
                    self.next_id += 1;
                    catalog_batch.insert(name.as_bytes(), catalog_value(info.id, tick, &info.meta));
                    info!(stream = %name, id = info.id.0, "stream created");
                    added.push(info.clone());
                    self.streams.insert(info.name.clone(), info);
                }
                let Some(stream) = self.streams.get_mut(name) else { continue };
                let (_, first, encoder) =
                    open.entry(stream.id).or_insert_with(|| (stream.name.clone(), tick, chunk_after(stream)));
                if encoder.encoded_len() >= CHUNK_MAX_BYTES || encoder.count() >= CHUNK_MAX_RECORDS {
                    let full = std::mem::replace(encoder, chunk_after(stream));
                    sealed.push((key(stream.id, *first), full.finish()));
                    *first = tick;
                }
                encoder.push(tick, record.origin_time, &record.headers, &record.payload, record.crc32);
                let arrived = arrivals.entry(stream.name.clone()).or_default();
                arrived.0 += 1;
                arrived.1 += record.payload.len() as u64;
                stream.records += 1;
                stream.bytes += record.payload.len() as u64;
                stream.first_tick.get_or_insert(tick);
                stream.last_tick = Some(tick);
                self.clock = self.clock.max(tick);
            }
            accepted.push(Accepted { ticks, duplicate: false, reply });
        }
        if accepted.is_empty() {
            return;
        }
        // From the final state: a producer forgotten and then touched again in the same group
        // is stored, one touched and then forgotten is removed.
        producers_touched.extend(producers_forgotten);
        producers_touched.sort();
        producers_touched.dedup();
        let producer_writes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            producers_touched.iter().map(|id| (producer_key(id), self.producers.encode(id))).collect();
        let mut touched: Vec<(StreamId, Arc<str>)> = Vec::with_capacity(open.len());
        // A commit of one chunk carries its batches' tags, so that the producers' state can be
        // stored after it rather than in one sled batch with it (see `write_records`).
        let single = sealed.is_empty() && open.len() == 1;
        let mut chunks = sealed;
        for (id, (name, first, encoder)) in open {
            touched.push((id, name));
            let value = if single && !tagged.is_empty() {
                encoder.finish_with(&producers::encode_tags(
                    tagged.iter().map(|(tag, i)| (tag, accepted[*i].ticks.as_slice())),
                ))
            } else {
                encoder.finish()
            };
            chunks.push((key(id, first), value));
        }

        // The chunks' bytes go to the chunk files first (synced under `always`), so that a
        // pointer sled stores finds its bytes; sled gets the pointers (`chunk_files.rs`).
        let (keys, values): (Vec<[u8; 12]>, Vec<Vec<u8>>) = chunks.into_iter().unzip();
        let located = self.appender.append(&values).and_then(|at| match self.fsync {
            FsyncPolicy::Always => self.sync_chunks().map(|()| at),
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => Ok(at),
        });
        // The catalog goes first: sled recovers a prefix of the writes, so a chunk is never
        // recovered without its stream. One chunk is a single insert, atomic by itself and much
        // cheaper than a batch (sled writes and syncs its log buffers twice to pin a batch);
        // the producers' state follows it, and what a crash between the two loses, recovery
        // reads back from the chunk's trailer. Several chunks need a batch to be atomic.
        let write_catalog =
            || if added.is_empty() { Ok(()) } else { self.catalog.apply_batch(catalog_batch) };
        let write_records = |at: Vec<Location>| {
            let pointers: Vec<([u8; 12], Vec<u8>)> =
                keys.into_iter().zip(at.iter().map(|at| at.encode().to_vec())).collect();
            match <[_; 1]>::try_from(pointers) {
                Ok([(k, v)]) => {
                    self.records.insert(k, v)?;
                    for (k, v) in producer_writes {
                        match v {
                            Some(v) => self.records.insert(k, v)?,
                            None => self.records.remove(k)?,
                        };
                    }
                    Ok(())
                }
                Err(pointers) if pointers.is_empty() => Ok(()),
                Err(pointers) => self.records.apply_batch(records_batch(pointers, producer_writes)),
            }
        };
        let written = located.and_then(|at| {
            write_catalog()
                .and_then(|()| write_records(at))
                .and_then(|()| match self.fsync {
                    FsyncPolicy::Always => self.db.flush().map(|_| ()),
                    FsyncPolicy::Interval(_) | FsyncPolicy::Never => Ok(()),
                })
                .map_err(Error::from)
        });
        if let Err(err) = written {
            // What reached sled is unknown now: stop taking writes rather than risk a log whose
            // acknowledged state and stored state differ. A restart recovers from what is stored.
            error!(cause = %err, batches = accepted.len(), "group commit failed; the log takes no more writes");
            self.failed = Some(err.to_string());
            for a in accepted {
                let _ = a.reply.send(Err(Error::LogFailed { cause: err.to_string() }));
            }
            return;
        }

        {
            let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
            for (_, name) in &touched {
                if let Some(info) = self.streams.get_mut(name) {
                    let (records, bytes) = arrivals.get(name).copied().unwrap_or_default();
                    info.recent.arrived(records, bytes, now);
                    shared.streams.insert(name.clone(), info.clone());
                }
            }
            shared.watermark = shared.watermark.max(self.clock);
            let commit = Commit {
                watermark: shared.watermark,
                streams: touched
                    .iter()
                    .map(|(id, name)| {
                        (*id, self.streams.get(name).and_then(|s| s.last_tick).unwrap_or_default())
                    })
                    .collect(),
                changed: Arc::new([]),
                added: added
                    .iter()
                    .map(|a| self.streams.get(&a.name).cloned().unwrap_or_else(|| a.clone()))
                    .collect(),
            };
            // No receiver is fine: nobody subscribes.
            let _ = self.commits.send(commit);
        }
        // Under fsync=always the commit is durable now; otherwise the mark may run ahead of a
        // crash's loss by the flush interval, which a restart would wrongly call a rollback.
        // The clock also moves without records (`advance`): the mark takes record ticks only.
        let newest = accepted.iter().filter(|a| !a.duplicate).filter_map(|a| a.ticks.iter().max()).max();
        if let (Some(mark), FsyncPolicy::Always, Some(&newest)) = (&mut self.mark, self.fsync, newest) {
            mark.acknowledged(newest);
        }
        for a in accepted {
            let _ = a.reply.send(Ok(Appended { ticks: a.ticks, duplicate: a.duplicate }));
        }
    }
}

/// A new chunk for what `stream` holds now: its counters count from the stream's creation.
fn chunk_after(stream: &StreamInfo) -> ChunkEncoder {
    ChunkEncoder::new(
        &stream.name,
        stream.trimmed.records + stream.records,
        stream.trimmed.bytes + stream.bytes,
    )
}

/// One atomic sled batch of chunks and producer state (`None` deletes a producer's state).
fn records_batch(
    chunks: Vec<([u8; 12], Vec<u8>)>,
    producers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (k, v) in chunks {
        batch.insert(k.as_ref(), v);
    }
    for (k, v) in producers {
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
    batch
}
