//! The single writer thread: assigns every tick, writes every commit record, applies it to the
//! index, then publishes it and answers.
//!
//! Invariants:
//! - Ticks are `max(now, clock + 1)` with one clock for the whole broker, so they are unique and
//!   strictly increasing within a stream; an explicit tick must be above its stream's last tick.
//!   The clock never goes back: every record carries it, and raising it with nothing published
//!   (`advance`) writes a `Clock` record, synced before the new watermark is published.
//! - Group commit: every batch waiting is checked, then all the accepted ones are written as one
//!   commit record, synced once (`fsync = always`), applied to the index, published, and answered.
//!   A refused batch is dropped before anything is written, so it leaves nothing behind; so is a
//!   group whose write or sync met a full disk (the file is cut back and nothing of the group is
//!   kept in memory): publishing resumes once there is room. Any other failure to write or sync
//!   stops the writer taking writes (fail-stop) until a restart recovers from the log.
//! - A catalog change (define, seal, delete) is written without a sync of its own: it waits at
//!   most [`CATALOG_SYNC_WAIT`] for a sync that covers it (a group commit's, or any other
//!   record's), else the writer syncs it alone; only then is it announced and answered, before
//!   anything written after it is. A sync that fails while changes wait stops the writer (they
//!   are already in the index). So a flood of catalog changes adds writes to group commits, not
//!   syncs in front of them.
//! - Nothing of the index is on the ack path: the ack follows the log's sync. A group commit's
//!   pointers go to the view's overlay before it is published, and the applier thread applies it
//!   to sled with others (`applier.rs`); every other record is applied by the writer itself, after
//!   the applier has applied everything before it. The index's own durability is the flusher's
//!   business (`index.rs`).
//! - The in-memory catalog and the commit broadcast change under one lock, and only after the
//!   record is applied to the index: a reader that sees a watermark can read every record up to
//!   it, and a subscriber that snapshots the catalog receives every later commit.
//! - A chunk file is deleted only after no pointer refers to it, the records that removed its
//!   chunks are durable, and a checkpoint written after it is durable.

use super::applier::{Applier, ProducerStates};
use super::chunk::ChunkEncoder;
use super::commit::{self, Body, Checkpoint, ChunkEntry, Defined, Encoded, Removed};
use super::files::{Appender, Location};
use super::index::Written;
use super::producers::{BatchTag, Producer, Producers, Seen};
use super::retention::TrimPlan;
use super::space::Space;
use super::view::View;
use super::{held_bytes, Accepted, Appended, Command, Commit, Reply, Shared, Source};
use crate::config::FsyncPolicy;
use crate::error::{Error, Result};
use crate::types::StreamName;
use crate::types::{NewRecord, Recent, StreamId, StreamInfo, StreamMeta, Tick, Trimmed};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// A chunk is sealed when it reaches this many encoded bytes or records.
const CHUNK_MAX_BYTES: usize = 64 << 10;
const CHUNK_MAX_RECORDS: u32 = 4096;
/// One group commit gathers at most this many payload bytes.
const GROUP_MAX_BYTES: usize = 32 << 20;
/// A group commit with at least this many chunks and new streams is applied to the index by the
/// writer itself, before it is published, rather than by the applier: handing over only pays for
/// small commits, which would each cost sled a batch, and large commits waiting for the applier
/// made sled hold much more memory (commit bad0dce).
const APPLY_AT_ONCE: usize = 256;
/// How long a catalog change written under `fsync = always` waits for a sync that covers it (see
/// the invariants above) before the writer syncs it alone.
const CATALOG_SYNC_WAIT: std::time::Duration = std::time::Duration::from_millis(10);
/// Catalog changes waiting for a sync: more are synced at once.
const CATALOG_WAITING_MAX: usize = 256;
/// How far ahead of the broker's wall clock an explicit tick may be. Explicit ticks move the
/// broker-wide clock, so a tick far in the future would shift every later tick.
pub const MAX_TICK_AHEAD: Tick = Tick(60_000_000_000);

/// What the writer owns.
pub(super) struct Writer {
    /// The index, with the pointers of the appends not applied to it yet.
    pub view: Arc<View>,
    /// Applies group commits to the index in the background.
    pub applier: Applier,
    /// Appends records to the chunk files; counts what each file still holds.
    pub appender: Appender,
    pub fsync: FsyncPolicy,
    /// The authoritative state of every stream; `shared` is a copy published after each commit.
    pub streams: HashMap<Arc<str>, StreamInfo>,
    /// The highest tick assigned or promised, for the whole broker.
    pub clock: Tick,
    /// The clock of the last record written: a promise beyond it needs a `Clock` record first.
    pub written_clock: Tick,
    pub next_id: u32,
    /// Idempotent producers' recent batches.
    pub producers: Producers,
    pub max_producers: usize,
    /// Streams the store may hold.
    pub max_streams: usize,
    /// Refuses batches before they could fill the disk.
    pub space: Space,
    pub server_id: String,
    /// The file of the newest checkpoint: a file at or after it may be deleted only once a newer
    /// checkpoint is written.
    pub checkpoint_file: u32,
    /// Set when a write, sync or index update failed: every later write is refused with this
    /// cause.
    pub failed: Option<String>,
    /// Set by the flusher thread when a periodic sync failed (taken into `failed`), and by the
    /// writer when it fails: what `Log::failure` tells.
    pub flush_failed: Arc<std::sync::OnceLock<String>>,
    pub shared: Arc<RwLock<Shared>>,
    pub commits: broadcast::Sender<Commit>,
    /// Catalog changes written and not yet synced, oldest first, and when the first was written.
    pub unsynced: Vec<Unsynced>,
    pub unsynced_since: Option<std::time::Instant>,
    /// Times the wait for the next command while catalog changes wait for a sync.
    pub timer: tokio::runtime::Runtime,
}

/// A catalog change in the log, not synced yet: announced and answered once it is.
pub(super) struct Unsynced {
    info: StreamInfo,
    /// What readers are told: (created, deleted); none when nothing changed (an answer that must
    /// not come before the changes written ahead of it).
    announce: Option<(bool, bool)>,
    /// The watermark as of the change: everything up to it was published when it was written.
    watermark: Tick,
    reply: oneshot::Sender<Result<StreamInfo>>,
}

/// What a catalog command did.
enum Catalog {
    Unchanged(StreamInfo),
    Changed { info: StreamInfo, created: bool, deleted: bool },
}

/// Why a record was not written.
enum NotWritten {
    /// The disk is full: nothing of the record is in the log, and the writer goes on.
    Refused(Error),
    /// Anything else: the writer takes no more writes.
    Failed(Error),
}

impl NotWritten {
    fn into_error(self) -> Error {
        match self {
            NotWritten::Refused(err) | NotWritten::Failed(err) => err,
        }
    }
}

/// Whether an error is the disk (or the user's quota) being full.
fn disk_full(err: &Error) -> bool {
    matches!(err, Error::Io { source, .. }
        if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
}

impl Writer {
    pub fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        // Files recovery found emptied, whose deletion a crash or a full disk put off.
        self.release(&[]);
        let mut stop = None;
        while stop.is_none() {
            let Some(first) = self.next(&mut inbox) else { break };
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
                Some(Command::Define { name, meta, update, created, reply }) => {
                    let done = self.checked().and_then(|()| self.define(name, meta, update, created));
                    self.hold(done, reply);
                }
                Some(Command::Seal { name, reply }) => {
                    let done = self.checked().and_then(|()| self.seal(&name));
                    self.hold(done, reply);
                }
                Some(Command::Delete { name, reply }) => {
                    let done = self.checked().and_then(|()| self.delete(&name));
                    self.hold(done, reply);
                }
                Some(other) => {
                    self.settle();
                    match other {
                        Command::Advance { to, reply } => {
                            let _ = reply.send(self.advance(to));
                        }
                        Command::Trim { plan, reply } => {
                            let _ = reply.send(self.checked().and_then(|()| self.trim(plan)));
                        }
                        Command::Compact { moves, reply } => {
                            let _ = reply.send(self.checked().and_then(|()| self.compact(moves)));
                        }
                        Command::Release { reply } => {
                            if self.checked().is_ok() {
                                self.release(&[]);
                            }
                            let _ = reply.send(());
                        }
                        Command::Stop { reply } => stop = Some(reply),
                        Command::Append { .. }
                        | Command::Define { .. }
                        | Command::Seal { .. }
                        | Command::Delete { .. } => {}
                    }
                }
                None => {}
            }
        }
        self.settle();
        let applied = self.applier.drain();
        let flushed = applied.and_then(|()| self.appender.sync()).and_then(|()| self.view.index().persist());
        if let Err(err) = &flushed {
            error!(cause = %err, "final flush failed");
        }
        info!("writer stopped");
        if let Some(reply) = stop {
            let _ = reply.send(flushed);
        }
    }

    /// The next command. While catalog changes wait for a sync, waits no longer than they may,
    /// and syncs them when the time is up or nothing else is coming.
    fn next(&mut self, inbox: &mut mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            let Some(since) = self.unsynced_since else { return inbox.blocking_recv() };
            let left = CATALOG_SYNC_WAIT.saturating_sub(since.elapsed());
            // Commands that sync nothing (refused or retried batches) must not keep the changes
            // waiting past their time.
            if left.is_zero() {
                self.settle();
                continue;
            }
            // (The timer exists only inside the runtime: the timeout is made there.)
            match self.timer.block_on(async { tokio::time::timeout(left, inbox.recv()).await }) {
                Ok(command) => return command,
                Err(_) => self.settle(),
            }
        }
    }

    /// Answers a catalog command: a change waits for a sync (see [`Writer::settle`]), and so
    /// does an answer behind one.
    fn hold(&mut self, done: Result<Catalog>, reply: oneshot::Sender<Result<StreamInfo>>) {
        let (info, announce) = match done {
            Ok(Catalog::Changed { info, created, deleted }) => (info, Some((created, deleted))),
            Ok(Catalog::Unchanged(info)) if !self.unsynced.is_empty() => (info, None),
            answer => {
                let _ = reply.send(answer.map(|done| match done {
                    Catalog::Unchanged(info) | Catalog::Changed { info, .. } => info,
                }));
                return;
            }
        };
        // The watermark the change may announce is the one as of the change: later records of a
        // group being committed are not published yet when it is announced.
        let watermark = self.clock.min(self.written_clock);
        self.unsynced.push(Unsynced { info, announce, watermark, reply });
        self.unsynced_since.get_or_insert_with(std::time::Instant::now);
        if !matches!(self.fsync, FsyncPolicy::Always) || self.unsynced.len() >= CATALOG_WAITING_MAX {
            self.settle();
        }
    }

    /// Syncs the catalog changes written since the last sync (under `fsync = always`), then
    /// announces and answers them, in order.
    fn settle(&mut self) {
        if self.unsynced.is_empty() {
            return;
        }
        self.unsynced_since = None;
        if matches!(self.fsync, FsyncPolicy::Always) && self.failed.is_none() {
            if let Err(err) = self.appender.sync() {
                // They are in the index already: only a restart can tell what the log kept.
                self.fail(&err, "syncing the log failed");
            }
        }
        let failed = self.failed.clone();
        for change in std::mem::take(&mut self.unsynced) {
            let answer = match &failed {
                Some(cause) => Err(Error::LogFailed { cause: cause.clone() }),
                None => {
                    if let Some((created, deleted)) = change.announce {
                        self.publish_change(&change.info, created, deleted, change.watermark);
                    }
                    Ok(change.info)
                }
            };
            let _ = change.reply.send(answer);
        }
    }

    /// Refuses anything once a write failed (or the flusher's sync, or the applier, did).
    fn checked(&mut self) -> Result<()> {
        if self.failed.is_none() {
            self.failed = self.flush_failed.get().cloned();
        }
        if self.failed.is_none() {
            if let Err(err) = self.applier.checked() {
                // Through `fail`, so that `Log::failure` (and `/readyz`) tell it too.
                self.fail(&err, "updating the index failed");
            }
        }
        match &self.failed {
            Some(cause) => Err(Error::LogFailed { cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Stops taking writes.
    fn fail(&mut self, err: &Error, what: &str) {
        error!(cause = %err, "{what}; the log takes no more writes");
        self.failed.get_or_insert_with(|| err.to_string());
        let _ = self.flush_failed.set(format!("{what}: {err}"));
    }

    /// Writes a record other than an append (syncing it under `fsync = always` when `sync`) and
    /// applies it to the index, after the appends before it. Counts the chunks it adds, and
    /// returns those it releases.
    fn write<C: AsRef<[u8]>>(
        &mut self,
        body: &Body,
        data: &[C],
        sync: bool,
    ) -> std::result::Result<Vec<Location>, NotWritten> {
        self.drain_applier()?;
        let written = self.append(body, data, sync)?;
        self.apply(&written, &[]).map(|changed| changed.released)
    }

    /// Applies a record to the index on this thread; counts the chunks it adds.
    fn apply(
        &mut self,
        written: &Written,
        producers: &[(Arc<str>, Option<Vec<u8>>)],
    ) -> std::result::Result<super::index::Changed, NotWritten> {
        let changed =
            self.view.index().apply_all(std::slice::from_ref(written), producers).map_err(|err| {
                // The record is in the log: a restart applies it again.
                self.fail(&err, "updating the index failed");
                NotWritten::Failed(err)
            })?;
        for at in &changed.added {
            self.appender.counted(*at);
        }
        Ok(changed)
    }

    /// Waits until the applier applied every group commit handed over.
    fn drain_applier(&mut self) -> std::result::Result<(), NotWritten> {
        self.applier.drain().map_err(|err| {
            self.fail(&err, "updating the index failed");
            NotWritten::Failed(err)
        })
    }

    /// Writes a group commit's record (syncing it under `fsync = always`); its pointers go to the
    /// view's overlay and the applier applies it, with the states of the producers it touched; a
    /// large one is applied here (see [`APPLY_AT_ONCE`]). Once the record is written, the group
    /// is committed whatever happens to the index: a failure to apply it stops the writer (a
    /// restart applies it again), and its pointers stay in the overlay meanwhile.
    fn write_append(
        &mut self,
        body: Body,
        data: &[Vec<u8>],
        producers: ProducerStates,
    ) -> std::result::Result<(), NotWritten> {
        let written = self.append(&body, data, true)?;
        let large = written.body.chunks().len() + body_created(&written.body).len() >= APPLY_AT_ONCE;
        if large && self.drain_applier().is_ok() && self.apply(&written, &producers).is_ok() {
            return Ok(());
        }
        for (id, tick, pointer) in written.pointers() {
            self.view.add(id, tick, pointer);
            self.appender.counted(pointer.at);
        }
        if self.failed.is_none() {
            if let Err(err) = self.applier.apply(written, producers) {
                self.fail(&err, "updating the index failed");
            }
        }
        Ok(())
    }

    /// Appends a record to the log and syncs it under `fsync = always` when `sync` (the flag in
    /// the record says whether it was). A full disk is undone and refused, unless records written
    /// before it without a sync (catalog changes) were cut off with it; any other failure stops
    /// the writer.
    fn append<C: AsRef<[u8]>>(
        &mut self,
        body: &Body,
        data: &[C],
        sync: bool,
    ) -> std::result::Result<Written, NotWritten> {
        // Whether everything before this record is durable: a failed sync then cuts off only it.
        let clean = self.appender.is_synced();
        let (seq, prev) = self.appender.chain();
        let always = sync && matches!(self.fsync, FsyncPolicy::Always);
        let flags = if always { commit::FLAG_SYNCED } else { 0 };
        let record = Encoded::new(body, self.appender.salt(), seq, prev, self.clock, flags, data);
        let at = match self.appender.append(&record, data) {
            Ok(at) => at,
            Err(err) if disk_full(&err) => return Err(NotWritten::Refused(err)),
            Err(err) => {
                self.fail(&err, "writing to the log failed");
                return Err(NotWritten::Failed(err));
            }
        };
        if always {
            if let Err(err) = self.appender.sync() {
                // After a failed sync the kernel may have dropped the written pages: cut the
                // file back to its last sync (nothing since was acknowledged) and sync that.
                let undone = self.appender.roll_back();
                return match undone {
                    // Anything written unsynced before it (a catalog change, held or still being
                    // made) was cut off too, and is in the index already: only a restart can tell.
                    Ok(()) if disk_full(&err) && clean => Err(NotWritten::Refused(err)),
                    Ok(()) => {
                        self.fail(&err, "syncing the log failed (the unsynced record was cut off)");
                        Err(NotWritten::Failed(err))
                    }
                    Err(cut) => {
                        self.fail(&cut, "syncing the log failed, and so did cutting the record off");
                        Err(NotWritten::Failed(err))
                    }
                };
            }
        }
        self.written_clock = self.written_clock.max(self.clock);
        Ok(Written {
            fixed: record.fixed,
            body: body.clone(),
            crc: record.crc,
            at,
            data_offset: record.data_offset(),
        })
    }

    /// The refusal a client sees for a record the disk had no room for.
    fn refusal(err: &Error) -> Error {
        Error::NoRoom { cause: err.to_string() }
    }

    /// Raises the clock to `to` (at most now) and publishes the watermark in an empty commit (also
    /// when it did not move, so that a reader waiting for it can rely on receiving it). A clock
    /// raised past what the log holds is written first (a `Clock` record), so that no restart
    /// assigns a tick at or below a tail already promised.
    fn advance(&mut self, to: Tick) -> Tick {
        if self.checked().is_ok() {
            let raised = self.clock.max(to.min(Tick::now()));
            let before = self.clock;
            self.clock = raised;
            if raised > self.written_clock && self.write(&Body::Clock, &[] as &[&[u8]], true).is_err() {
                // Not promised: the watermark stays where the log says.
                self.clock = before;
            }
        }
        self.settle();
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        shared.watermark = shared.watermark.max(self.clock.min(self.written_clock));
        let commit = Commit {
            watermark: shared.watermark,
            streams: Arc::new([]),
            added: Arc::new([]),
            changed: Arc::new([]),
        };
        let _ = self.commits.send(commit);
        shared.watermark
    }

    /// Publishes a stream created or changed (`deleted`: removed) to readers, with the watermark
    /// as of the change.
    fn publish_change(&mut self, info: &StreamInfo, created: bool, deleted: bool, watermark: Tick) {
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        // The change's own tick (a creation or a seal) is in the log and every record below it
        // was published: readers learn it is complete, as after `advance`. Otherwise a tail given
        // just after a seal could lie below it, and a client resuming there would be given the
        // import whole again.
        shared.watermark = shared.watermark.max(watermark);
        if deleted {
            shared.remove(&info.name);
        } else {
            shared.put(info.clone());
        }
        let mut commit = Commit {
            watermark: shared.watermark,
            streams: Arc::new([]),
            added: Arc::new([]),
            changed: Arc::new([]),
        };
        if created {
            commit.added = Arc::new([info.clone()]);
        } else {
            commit.changed = Arc::new([(info.clone(), deleted)]);
        }
        let _ = self.commits.send(commit);
    }

    /// See `Log::define`.
    fn define(
        &mut self,
        name: StreamName,
        mut meta: StreamMeta,
        update: bool,
        at: Option<Tick>,
    ) -> Result<Catalog> {
        if let Some(info) = self.streams.get(name.as_str()) {
            if meta.importing && !info.meta.importing {
                return Err(Error::NotImportable { stream: name.to_string() });
            }
            // Changing an import's metadata does not seal it.
            meta.importing = info.meta.importing;
        }
        let (info, created) = match self.streams.get(name.as_str()) {
            Some(info) if *info.meta == meta => return Ok(Catalog::Unchanged(info.clone())),
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
                let now = at.unwrap_or_else(|| Tick::now().max(Tick(self.clock.0 + 1)));
                let info = new_stream(name.shared(), StreamId(self.next_id), now, meta);
                (info, true)
            }
        };
        self.write_define(&info, created)?;
        if created {
            self.next_id += 1;
            info!(stream = %name, id = info.id.0, "stream created");
        } else {
            info!(stream = %name, "stream metadata changed");
        }
        self.streams.insert(info.name.clone(), info.clone());
        Ok(Catalog::Changed { info, created, deleted: false })
    }

    /// Writes a stream's catalog entry (`created`: a new stream), raising the clock to its
    /// creation tick.
    fn write_define(&mut self, info: &StreamInfo, created: bool) -> Result<()> {
        let clock_before = self.clock;
        self.clock = self.clock.max(info.created_tick);
        let defined = Defined {
            id: info.id,
            name: info.name.clone(),
            created: info.created_tick,
            meta: (*info.meta).clone(),
        };
        if let Err(not) = self.write(&Body::Define { stream: defined, created }, &[] as &[&[u8]], false) {
            // Not written: nothing was promised.
            self.clock = clock_before;
            return Err(self.refused_or(not));
        }
        Ok(())
    }

    /// See `Log::seal`. The stream is announced as created at the seal's tick: above everything
    /// promised so far, so every subscription learns of it in order with the records.
    fn seal(&mut self, name: &str) -> Result<Catalog> {
        let Some(info) = self.streams.get(name).cloned() else {
            return Err(Error::UnknownStream(name.to_string()));
        };
        if !info.meta.importing {
            return Ok(Catalog::Unchanged(info));
        }
        let sealed = StreamInfo {
            created_tick: Tick::now().max(Tick(self.clock.0 + 1)),
            meta: Arc::new(StreamMeta { importing: false, ..(*info.meta).clone() }),
            ..info
        };
        self.write_define(&sealed, false)?;
        info!(stream = %name, records = sealed.records, first = ?sealed.first_tick, last = ?sealed.last_tick, "import sealed");
        self.streams.insert(sealed.name.clone(), sealed.clone());
        Ok(Catalog::Changed { info: sealed, created: true, deleted: false })
    }

    /// A write's failure as the caller sees it.
    fn refused_or(&self, not: NotWritten) -> Error {
        match not {
            NotWritten::Refused(err) => Self::refusal(&err),
            NotWritten::Failed(err) => Error::LogFailed { cause: err.to_string() },
        }
    }

    /// See `Log::delete`.
    fn delete(&mut self, name: &str) -> Result<Catalog> {
        let Some(info) = self.streams.get(name).cloned() else {
            return Err(Error::UnknownStream(name.to_string()));
        };
        let freed = self
            .write(&Body::Delete { id: info.id, name: info.name.clone() }, &[] as &[&[u8]], false)
            .map_err(|e| self.refused_or(e))?;
        info!(stream = %name, records = info.records, "stream deleted");
        self.streams.remove(name);
        self.release(&freed);
        Ok(Catalog::Changed { info, created: false, deleted: true })
    }

    /// Removes the chunks of a plan, unless the stream changed since it was planned (it can only
    /// have grown, or been trimmed by an earlier plan).
    fn trim(&mut self, plan: TrimPlan) -> Result<()> {
        let Some(stream) = self.streams.get(&plan.stream).filter(|s| s.id == plan.id).cloned() else {
            return Ok(());
        };
        // Stale: an earlier removal already went past it. The writer only appends, so the chunk
        // the plan keeps is still there and not after the last tick.
        if stream.first_tick.is_none_or(|f| f >= plan.first)
            || stream.last_tick.is_none_or(|l| l < plan.first)
        {
            return Ok(());
        }
        let removed = Removed {
            floor: plan.first,
            through: Some(plan.through),
            records: plan.records_before,
            bytes: plan.bytes_before,
        };
        // The record first: what it removes is gone for a restart too. Readers find the removed
        // range published before the pointers go (see `Log::read`).
        self.drain_applier().map_err(|e| self.refused_or(e))?;
        let written = self
            .append(&Body::Trim { id: plan.id, removed }, &[] as &[&[u8]], true)
            .map_err(|e| self.refused_or(e))?;
        let (records, bytes) = (stream.trimmed.records + stream.records, stream.trimmed.bytes + stream.bytes);
        let mut stream = stream;
        metrics::counter!("tapeline_retention_removed_records_total")
            .increment(plan.records_before.saturating_sub(stream.trimmed.records));
        stream.trimmed =
            Trimmed { records: plan.records_before, bytes: plan.bytes_before, through: Some(plan.through) };
        stream.records = records.saturating_sub(plan.records_before);
        stream.bytes = bytes.saturating_sub(plan.bytes_before);
        stream.first_tick = Some(plan.first);
        self.streams.insert(stream.name.clone(), stream.clone());
        self.shared.write().unwrap_or_else(|e| e.into_inner()).put(stream);
        let changed = self
            .view
            .index()
            .apply_all(std::slice::from_ref(&written), &[])
            .inspect_err(|err| self.fail(err, "updating the index failed"))?;
        debug!(stream = %plan.stream, chunks = changed.released.len(), through = %plan.through, "chunks removed");
        self.release(&changed.released);
        Ok(())
    }

    /// Moves chunks to the active chunk file so that the sparse file they were in can go.
    fn compact(&mut self, mut moves: Vec<(StreamId, Tick, Location)>) -> Result<usize> {
        // A chunk once: the plan may have met a pointer twice, in the overlay and in sled.
        moves.sort_by_key(|(id, first, _)| (*id, *first));
        moves.dedup_by_key(|(id, first, _)| (*id, *first));
        let mut entries = Vec::new();
        let mut chunks = Vec::new();
        for (id, first, at) in moves {
            // Only what the plan saw: a chunk removed or moved since stays as it is.
            if self.view.get(id, first)?.map(|p| p.at) != Some(at) {
                continue;
            }
            match self.appender.files().read(at).and_then(|bytes| super::chunk::decode(&bytes).map(|_| bytes))
            {
                Ok(bytes) => {
                    entries.push(ChunkEntry { stream: id, first, len: at.len });
                    chunks.push(bytes);
                }
                Err(err) => {
                    // A damaged chunk stays where it is, for reads to report and `recover` to
                    // rescue what it can; its file is not offered again.
                    warn!(file = at.file, tick = %first, detail = %err.detail, "damaged chunk left in place by compaction");
                    self.appender.files().give_up(at.file);
                }
            }
        }
        if entries.is_empty() {
            return Ok(0);
        }
        let moved = entries.len();
        let freed =
            self.write(&Body::Move { chunks: entries }, &chunks, true).map_err(|e| self.refused_or(e))?;
        debug!(chunks = moved, "chunks moved out of a sparse chunk file");
        self.release(&freed);
        Ok(moved)
    }

    /// Counts chunks the index no longer points to, and deletes the chunk files nothing refers
    /// to any more, once that is safe: a checkpoint written after them, and every record up to
    /// it synced. When that fails (a full disk), the files stay until a later release (the
    /// retention task asks for one every pass).
    fn release(&mut self, freed: &[Location]) {
        for at in freed {
            self.appender.released(*at);
        }
        let unreferenced = self.appender.unreferenced();
        let Some(&newest) = unreferenced.iter().max() else { return };
        let checkpoint =
            if newest >= self.checkpoint_file { self.write_checkpoint().map(Some) } else { Ok(None) };
        let checkpoint = match checkpoint {
            Ok(checkpoint) => checkpoint,
            // Kept for now (a full disk; any other failure stopped the writer): the next release
            // tries again.
            Err(err) => {
                warn!(cause = %err, files = ?unreferenced, "chunk files not deleted yet");
                return;
            }
        };
        if let Err(err) = self.appender.sync() {
            // The kernel may have dropped what was written since the last sync.
            self.fail(&err, "syncing the log failed");
            return;
        }
        if let Some(file) = checkpoint {
            self.checkpoint_file = file;
            debug!(file, "checkpoint written");
        }
        self.appender.delete(&unreferenced);
    }

    /// Writes a checkpoint of everything but the chunks (see `commit::Checkpoint`); returns the
    /// file it is in.
    fn write_checkpoint(&mut self) -> Result<u32> {
        let mut streams: Vec<(Defined, Removed)> = self
            .streams
            .values()
            .map(|s| {
                let defined = Defined {
                    id: s.id,
                    name: s.name.clone(),
                    created: s.created_tick,
                    meta: (*s.meta).clone(),
                };
                let floor =
                    if s.trimmed.through.is_some() { s.first_tick.unwrap_or_default() } else { Tick(0) };
                let removed = Removed {
                    floor,
                    through: s.trimmed.through,
                    records: s.trimmed.records,
                    bytes: s.trimmed.bytes,
                };
                (defined, removed)
            })
            .collect();
        streams.sort_by_key(|(d, _)| d.id);
        let producers = self
            .producers
            .ids()
            .into_iter()
            .filter_map(|id| self.producers.encode(&id).map(|state| (id, state)))
            .collect();
        let body = Body::Checkpoint(Checkpoint {
            server_id: self.server_id.clone(),
            next_id: self.next_id,
            streams,
            producers,
        });
        self.write(&body, &[] as &[&[u8]], true).map_err(NotWritten::into_error)?;
        Ok(self.appender.position().0)
    }

    /// The stream `name` as the group sees it so far.
    fn stream<'a>(
        &'a self,
        touched: &'a HashMap<Arc<str>, StreamInfo>,
        name: &str,
    ) -> Option<&'a StreamInfo> {
        touched.get(name).or_else(|| self.streams.get(name))
    }

    /// Checks a batch and assigns its ticks without changing any state; `upstream` ticks are not
    /// held to this broker's clock.
    fn assign(
        &self,
        touched: &HashMap<Arc<str>, StreamInfo>,
        clock: Tick,
        next_id: u32,
        records: &[NewRecord],
        now: Tick,
        upstream: bool,
    ) -> Result<Vec<Tick>> {
        let mut clock = clock;
        let mut last: HashMap<&str, Tick> = HashMap::new();
        let mut ticks = Vec::with_capacity(records.len());
        let known = self.streams.len() + touched.keys().filter(|k| !self.streams.contains_key(*k)).count();
        let mut created = 0u64;
        for record in records {
            let name = record.stream.as_str();
            let existing = self.stream(touched, name);
            let stream_last = match last.get(name) {
                Some(t) => Some(*t),
                None => existing.and_then(|s| s.last_tick),
            };
            if existing.is_none() && !last.contains_key(name) {
                created += 1;
                if known as u64 + created > self.max_streams as u64 {
                    return Err(Error::TooMany {
                        what: "streams",
                        limit: self.max_streams,
                        setting: "limits.max_streams",
                        hint: "publish into existing streams, or raise the limit",
                    });
                }
                if u64::from(next_id) + created >= u64::from(u32::MAX - 1) {
                    return Err(Error::Internal(format!("no stream id is left for stream {name:?}")));
                }
            }
            let tick = match record.tick {
                Some(tick) => {
                    if let Some(last) = stream_last.filter(|&last| tick <= last) {
                        return Err(Error::TickNotAfter { stream: name.to_string(), tick, last });
                    }
                    // Subscribers may have been told that everything up to the clock was
                    // delivered: only a stream they cannot see yet takes a tick below it. (A
                    // relay's copies take their upstream's ticks, which kept that promise there.)
                    let hidden = existing.is_some_and(|s| s.meta.importing);
                    if tick <= clock && !hidden && !upstream {
                        return Err(Error::TickNotAfterClock { stream: name.to_string(), tick, clock });
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
        if let Err(err) = self.checked() {
            for (_, _, reply) in group {
                let _ = reply.send(Err(Error::LogFailed { cause: err.to_string() }));
            }
            return;
        }
        let now = Tick::now();
        // Everything the group changes, kept aside until its record is written: a group the disk
        // has no room for changes nothing.
        let (clock_before, next_id_before) = (self.clock, self.next_id);
        let mut clock = self.clock;
        let mut next_id = self.next_id;
        let mut touched: HashMap<Arc<str>, StreamInfo> = HashMap::new();
        let mut created: Vec<(StreamId, Arc<str>, Tick)> = Vec::new();
        // Per stream: the first tick of the open chunk, and the chunk.
        let mut open: HashMap<StreamId, (Tick, ChunkEncoder)> = HashMap::new();
        // Chunks in the order they were sealed; the open ones join them at the end.
        let mut chunks: Vec<(ChunkEntry, Vec<u8>)> = Vec::new();
        let mut accepted: Vec<Accepted> = Vec::with_capacity(group.len());
        let mut tags: Vec<(BatchTag, Vec<Tick>)> = Vec::new();
        // Producers whose memory the group changed, and what it was before (to undo a group the
        // disk had no room for); those the LRU forgot.
        let mut undo: Vec<(Arc<str>, Option<Producer>)> = Vec::new();
        let mut forgotten: Vec<Arc<str>> = Vec::new();
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
            let upstream = matches!(source, Source::Upstream);
            let ticks = seen
                .and_then(|_| self.assign(&touched, clock, next_id, &records, now, upstream))
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
                if !undo.iter().any(|(id, _)| *id == tag.producer) {
                    undo.push((tag.producer.clone(), self.producers.get(&tag.producer).cloned()));
                }
                if let Some((id, state)) = self.producers.remember(tag, &ticks, now, self.max_producers) {
                    warn!(producer = %id, limit = self.max_producers, "least recently used producer forgotten");
                    if !undo.iter().any(|(undone, _)| *undone == id) {
                        undo.push((id.clone(), Some(state)));
                    }
                    forgotten.push(id);
                }
                tags.push((tag.clone(), ticks.clone()));
            }
            for (record, &tick) in records.iter().zip(&ticks) {
                let name = record.stream.as_str();
                if self.stream(&touched, name).is_none() {
                    let info =
                        new_stream(record.stream.shared(), StreamId(next_id), tick, StreamMeta::default());
                    next_id += 1;
                    created.push((info.id, info.name.clone(), tick));
                    touched.insert(info.name.clone(), info);
                }
                if !touched.contains_key(name) {
                    if let Some(info) = self.streams.get(name) {
                        touched.insert(info.name.clone(), info.clone());
                    }
                }
                let Some(stream) = touched.get_mut(name) else { continue };
                let (first, encoder) = open.entry(stream.id).or_insert_with(|| (tick, chunk_after(stream)));
                if encoder.encoded_len() >= CHUNK_MAX_BYTES || encoder.count() >= CHUNK_MAX_RECORDS {
                    let full = std::mem::replace(encoder, chunk_after(stream));
                    let value = full.finish();
                    chunks.push((
                        ChunkEntry { stream: stream.id, first: *first, len: value.len() as u32 },
                        value,
                    ));
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
                clock = clock.max(tick);
            }
            accepted.push(Accepted { ticks, duplicate: false, reply });
        }
        if accepted.iter().all(|a| a.duplicate) {
            for a in accepted {
                let _ = a.reply.send(Ok(Appended { ticks: a.ticks, duplicate: true }));
            }
            return;
        }
        let mut streams_in_commit: Vec<(StreamId, Arc<str>)> = Vec::with_capacity(open.len());
        let mut opened: Vec<(StreamId, Tick, ChunkEncoder)> =
            open.into_iter().map(|(id, (first, e))| (id, first, e)).collect();
        opened.sort_by_key(|(id, _, _)| *id);
        for (id, first, encoder) in opened {
            let value = encoder.finish();
            chunks.push((ChunkEntry { stream: id, first, len: value.len() as u32 }, value));
        }
        for (name, info) in &touched {
            streams_in_commit.push((info.id, name.clone()));
        }
        for (id, _) in &tags {
            self.producers.touch(&id.producer, clock);
        }
        let (entries, values): (Vec<ChunkEntry>, Vec<Vec<u8>>) = chunks.into_iter().unzip();
        let body = Body::Append { created, tags, chunks: entries };

        self.clock = clock;
        self.next_id = next_id;
        let created_names: Vec<(StreamId, Arc<str>)> =
            body_created(&body).iter().map(|(id, name, _)| (*id, name.clone())).collect();
        // The states of the producers the group changed, or the LRU forgot (none: removed).
        let mut producer_ids: Vec<Arc<str>> = forgotten;
        if let Body::Append { tags, .. } = &body {
            producer_ids.extend(tags.iter().map(|(tag, _)| tag.producer.clone()));
        }
        producer_ids.sort();
        producer_ids.dedup();
        let producers = producer_ids
            .into_iter()
            .map(|id| {
                let state = self.producers.encode(&id);
                (id, state)
            })
            .collect();
        let written = self.write_append(body, &values, producers);
        drop(values);
        if let Err(not) = written {
            // Nothing of the group is kept: the clock, the new streams' ids and the producers'
            // memory go back to what they were.
            (self.clock, self.next_id) = (clock_before, next_id_before);
            for (id, before) in undo.into_iter().rev() {
                match before {
                    Some(state) => self.producers.restore(id, state),
                    None => self.producers.forget(&id),
                }
            }
            if let NotWritten::Refused(err) = &not {
                warn!(cause = %err, batches = accepted.len(), "a group commit met a full disk: refused, nothing written");
            }
            for a in accepted {
                let _ = a.reply.send(Err(match &not {
                    NotWritten::Refused(err) => Self::refusal(err),
                    NotWritten::Failed(err) => Error::LogFailed { cause: err.to_string() },
                }));
            }
            return;
        }
        for (id, name) in created_names {
            info!(stream = %name, id = id.0, "stream created");
        }
        // The catalog changes this group's sync covered go first.
        self.settle();

        {
            let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
            let mut added = Vec::new();
            for (name, mut info) in touched {
                let (records, bytes) = arrivals.get(&name).copied().unwrap_or_default();
                info.recent.arrived(records, bytes, now);
                if !self.streams.contains_key(&name) {
                    added.push(info.clone());
                }
                shared.put(info.clone());
                self.streams.insert(name, info);
            }
            shared.watermark = shared.watermark.max(self.clock);
            let commit = Commit {
                watermark: shared.watermark,
                streams: streams_in_commit
                    .iter()
                    .map(|(id, name)| {
                        (*id, self.streams.get(name).and_then(|s| s.last_tick).unwrap_or_default())
                    })
                    .collect(),
                changed: Arc::new([]),
                added: added.into(),
            };
            // No receiver is fine: nobody subscribes.
            let _ = self.commits.send(commit);
        }
        metrics::histogram!("tapeline_commit_group_batches").record(accepted.len() as f64);
        let (records, bytes) =
            arrivals.values().fold((0, 0), |(r, b), (records, bytes)| (r + records, b + bytes));
        metrics::counter!("tapeline_records_in_total").increment(records);
        metrics::counter!("tapeline_bytes_in_total").increment(bytes);
        for a in accepted {
            let _ = a.reply.send(Ok(Appended { ticks: a.ticks, duplicate: a.duplicate }));
        }
    }
}

fn body_created(body: &Body) -> &[(StreamId, Arc<str>, Tick)] {
    match body {
        Body::Append { created, .. } => created,
        _ => &[],
    }
}

/// A stream that holds nothing yet.
fn new_stream(name: Arc<str>, id: StreamId, created: Tick, meta: StreamMeta) -> StreamInfo {
    StreamInfo {
        name,
        id,
        records: 0,
        bytes: 0,
        first_tick: None,
        last_tick: None,
        created_tick: created,
        trimmed: Trimmed::default(),
        meta: Arc::new(meta),
        recent: Recent::default(),
    }
}

/// A new chunk for what `stream` holds now: its counters count from the stream's creation.
fn chunk_after(stream: &StreamInfo) -> ChunkEncoder {
    ChunkEncoder::new(
        &stream.name,
        stream.id,
        stream.trimmed.records + stream.records,
        stream.trimmed.bytes + stream.bytes,
    )
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, DataDir, FsyncPolicy};
    use crate::store::{files, Log};
    use crate::types::StreamName;
    use crate::types::{NewRecord, Tick};
    use bytes::Bytes;

    fn config(dir: &std::path::Path) -> Config {
        Config { data: DataDir::Path(dir.into()), fsync: FsyncPolicy::Always, ..Config::default() }
    }

    fn one(stream: &str, tick: Option<Tick>) -> Vec<NewRecord> {
        vec![NewRecord {
            stream: StreamName::parse(stream).unwrap(),
            tick,
            origin_time: None,
            headers: Vec::new(),
            payload: Bytes::from_static(b"x"),
            crc32: crc32fast::hash(b"x"),
        }]
    }

    #[tokio::test]
    async fn an_advanced_clock_is_written_before_it_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&config(dir.path())).unwrap();
        let first = log.append(one("s", None)).await.unwrap()[0];
        let len = std::fs::metadata(files::path_in(dir.path(), 0)).unwrap().len();
        let promised = log.advance(Tick(first.0 + 1_000_000)).await.unwrap();
        assert!(promised > first);
        assert!(std::fs::metadata(files::path_in(dir.path(), 0)).unwrap().len() > len, "a clock record");
        // Promised once: the same advance writes nothing more.
        let len = std::fs::metadata(files::path_in(dir.path(), 0)).unwrap().len();
        log.advance(promised).await.unwrap();
        assert_eq!(std::fs::metadata(files::path_in(dir.path(), 0)).unwrap().len(), len);
        log.close().await.unwrap();
        drop(log);
        let log = Log::open(&config(dir.path())).unwrap();
        assert!(log.watermark() >= promised, "the promise survives a restart");
        let next = log.append(one("s", None)).await.unwrap()[0];
        assert!(next > promised);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_batch_leaves_nothing_and_the_rest_of_its_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&config(dir.path())).unwrap();
        let first = log.append(one("s", None)).await.unwrap()[0];
        let len = std::fs::metadata(files::path_in(dir.path(), 0)).unwrap().len();
        // Queued together: an explicit tick not after the stream's last, then a good batch.
        let bad = log.submit(one("s", Some(first)), super::Source::Publisher(None)).await.unwrap();
        let good = log.submit(one("t", None), super::Source::Publisher(None)).await.unwrap();
        let err = bad.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("is not after the stream's last tick"), "{err}");
        let good = good.await.unwrap().unwrap();
        assert!(good.ticks[0] > first);
        assert_eq!(log.stream("s").unwrap().records, 1, "nothing of the refused batch");
        assert!(std::fs::metadata(files::path_in(dir.path(), 0)).unwrap().len() > len);
        log.close().await.unwrap();
    }
}
