//! Replay, then live: one task per subscription that turns the log into a stream of events.
//!
//! The task keeps, per selected stream, a cursor: the last tick it read. It always reads from the
//! log, in whole chunks, records with `cursor < tick <= bound`, where the bound is the watermark of
//! the latest commit it has heard of (and never past the stream's last committed tick); it merges
//! the streams by `(tick, stream)`. A commit
//! notification only marks streams dirty and raises the bound, so the live tail and the replay are
//! the same code: there is no hand-over between two paths, and so no gap and no duplicate.
//!
//! Invariants:
//! - Memory is bounded whatever the lag: read windows of at most 65,536 records over all streams
//!   (each ending on a chunk boundary), one batch being built, an outbox of at most 8 events and
//!   256 KiB of record batches, and the bounded commit broadcast; with many subscriptions, the
//!   window, the batch and the outbox shrink to each one's share of one budget (`Share`). A subscriber that falls further
//!   behind than the broadcast holds is told so (`Lagged`) and simply marks every stream dirty:
//!   it reads storage.
//! - Sending waits for the client (the outgoing channel is bounded); publishers never wait for a
//!   subscriber, because the commit broadcast never blocks its sender.
//! - `CaughtUp` is sent exactly once, after every record up to the watermark seen at registration
//!   was delivered.
//! - A subscription with an `end` finishes once the watermark reaches it; when the wall clock has
//!   passed `end` with nothing published, it asks the log to advance, and that commit arrives after
//!   every earlier one, so no record at or below `end` is skipped.
//! - Paced delivery (a speed factor `f`): with `B` the tick of the first record delivered and `I`
//!   the moment it was delivered, record `r` is delivered no earlier than `I + (r.tick - B) / f`,
//!   in the replay and live alike. A record not yet due waits where it already is (in its read
//!   window), so pacing holds nothing more in memory; the batch before it is sent first, so nothing
//!   due waits behind it; the wait ends at once when the client goes away or the broker shuts
//!   down, and sends heartbeats while it lasts.

use super::link::{self, Link};
use super::quota::{Rate, Window};
use crate::error::{Error, Result};
use crate::store::{Commit, Log, Truncation};
use crate::types::Pattern;
use crate::types::UpstreamStatus;
use crate::types::{Record, Stored, StreamId, StreamInfo, Tick};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Records read from storage per stream at a time, at most, and bytes of chunks: large records
/// fill a read by their size long before their count.
const READ_WINDOW: usize = 1024;
const READ_BYTES: usize = 1 << 20;
const MIN_READ_BYTES: usize = 64 << 10;
/// Records a subscription reads ahead over all its streams (each read still ends on a chunk
/// boundary).
const READ_BUDGET: usize = 65_536;
/// A record batch is sent when it holds this many records or weighs this much (see `weight`).
/// Why 64 KiB: a lagging subscriber holds a batch being built, the batches in its outbox, and
/// what tonic and h2 buffer of the batches taken, all in units of a batch; tonic's buffer of a
/// call also keeps room for the largest message it ever encoded until the call ends. So the batch's
/// weight sets a lagging subscriber's memory; 64 KiB still replays as fast as 128 KiB did
/// (BENCHMARKS.md, "Smaller subscription batches" and "Many readers").
const BATCH_RECORDS: usize = 1024;
const BATCH_BYTES: usize = 64 << 10;
/// Events waiting for the client.
const OUTBOX: usize = 8;
/// What the record batches waiting for the client may weigh together (see `weight`): room for
/// many small batches at the live tail, but for only two full ones when a subscriber lags, since
/// a lagging subscriber's outbox is always full.
const OUTBOX_BYTES: usize = 256 << 10;
/// What the read windows, batches and outboxes of all subscriptions may take together, about:
/// each subscription gets an equal share, up to the full sizes above. A few subscriptions read
/// in full steps; a thousand lagging ones take small steps instead of most of a megabyte each.
const SHARED_BUDGET: usize = 48 << 20;
/// What one lagging subscription holds at the full sizes (about 0.65 MiB measured with 1,000
/// readers, BENCHMARKS.md).
const FULL_SHARE: usize = 640 << 10;
/// The smallest steps a share goes down to.
const MIN_WINDOW: usize = 16;
const MIN_BATCH_BYTES: usize = 16 << 10;
const MIN_OUTBOX_BYTES: usize = 32 << 10;

/// One subscription's place among the broker's subscriptions, for its share of
/// [`SHARED_BUDGET`]; leaving (dropping it) gives the share back to the others.
pub struct Share(Arc<std::sync::atomic::AtomicUsize>);

impl Share {
    /// Counts one more subscription among `active`.
    pub fn join(active: &Arc<std::sync::atomic::AtomicUsize>) -> Share {
        active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Share(active.clone())
    }

    /// `full` scaled to this subscription's share now, at least `min`.
    fn of(&self, full: usize, min: usize) -> usize {
        let n = self.0.load(std::sync::atomic::Ordering::Relaxed).max(1);
        let scale = (SHARED_BUDGET as f64 / n as f64 / FULL_SHARE as f64).min(1.0);
        ((full as f64 * scale) as usize).clamp(min, full)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where a subscription starts, for streams the resume map does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first stored record.
    Beginning,
    /// The first record appended after the subscription was registered.
    Now,
    /// The first record with this tick or later.
    At(Tick),
    /// The first record after this tick.
    After(Tick),
}

/// A validated subscription request.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Names or patterns.
    pub selectors: Vec<Pattern>,
    pub start: Start,
    /// Per stream name, the last tick the client already has.
    pub resume: HashMap<String, Tick>,
    /// Last tick to deliver, inclusive.
    pub end: Option<Tick>,
    /// Silence after which a heartbeat is sent.
    pub heartbeat: Duration,
    /// On a relay, its upstream links: their state goes into heartbeats, and a link going down
    /// or coming back is sent as an event.
    pub links: Option<watch::Receiver<Vec<Link>>>,
    /// Paced delivery: the speed factor (1 = the original timing of the ticks), finite and above
    /// 0; `None` delivers as fast as the client reads.
    pub pace: Option<f64>,
    /// The most record bytes (payloads, headers and stream names) delivered per second, averaged
    /// over the rate's window.
    pub rate: Option<Rate>,
    /// What happens when the subscription, once live, falls more than `max_lag` behind the tail.
    pub slow: SlowConsumer,
    pub max_lag: Duration,
    /// The streams the client may read; `None` for all.
    pub readable: Option<Vec<Pattern>>,
}

/// What a live subscription does when it falls more than its `max_lag` behind the tail (in ticks,
/// between the newest committed record and the last one delivered). A paced subscription is
/// behind on purpose and never counts as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowConsumer {
    /// Lag, and read what is behind from storage.
    #[default]
    CatchUp,
    /// Skip to the newest records, telling what was skipped (`Gap`).
    Latest,
    /// End with a status the client resumes from.
    Disconnect,
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Records in `(tick, stream)` order.
    Records {
        records: Vec<Record>,
        /// Every record of the subscription up to this tick has now been delivered.
        complete_to: Tick,
    },
    /// Every record up to this tick was delivered; what follows is live.
    CaughtUp(Tick),
    /// Nothing happened for the heartbeat interval; on a relay, with the state of its upstreams.
    Heartbeat { tail: Tick, server_time: Tick, upstreams: Vec<UpstreamStatus> },
    /// A stream matching the subscription appeared.
    StreamAdded(StreamInfo),
    /// On a relay: an upstream link's state at the start of the subscription, and whenever it
    /// goes down or comes back.
    Upstream(UpstreamStatus),
    /// Retention removed part of the range asked for: the stream continues after `through`.
    /// Sent before the stream's next record.
    Truncated { stream: Arc<str>, requested: Tick, through: Tick, earliest: Option<Tick> },
    /// A selected stream's metadata changed, or it was deleted (`deleted`).
    StreamChanged { info: StreamInfo, deleted: bool },
    /// A slow subscriber under `SlowConsumer::Latest` skipped `records` records of a stream, with
    /// ticks from `from` to `to`; the stream continues after `to`.
    Gap { stream: Arc<str>, records: u64, from: Tick, to: Tick },
}

struct Cursor {
    info: StreamInfo,
    /// Last tick read from storage (and, once `buffer` is empty, delivered).
    pos: Option<Tick>,
    /// Records read but not yet delivered.
    buffer: VecDeque<Stored>,
    /// The chunks `buffer` points into; replaced by each read, which only happens when `buffer`
    /// is empty.
    chunks: Vec<Bytes>,
    /// The last read stopped at its window: more may be stored below the bound.
    more: bool,
    /// A commit touched this stream since the last drain.
    dirty: bool,
    /// Retention removed part of what this cursor was to read: told before its next record.
    truncated: Option<Truncation>,
    /// The last tick delivered (or the start position).
    delivered: Option<Tick>,
}

/// What a subscriber receives, in order. Ends after an `Err` (the subscription failed or the
/// broker is shutting down) or, for a bounded subscription, after its last record.
pub struct Events {
    inner: mpsc::Receiver<Outgoing>,
    /// Why the subscription ended, when its outbox had no room to say it in order (a client that
    /// stopped reading): it goes out before what waits in the outbox.
    abort: Option<oneshot::Receiver<Error>>,
}

impl futures::Stream for Events {
    type Item = Result<Event>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;
        if let Some(abort) = &mut self.abort {
            match std::pin::Pin::new(abort).poll(cx) {
                Poll::Ready(Ok(err)) => {
                    self.inner.close();
                    self.abort = None;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Err(_)) => self.abort = None,
                Poll::Pending => {}
            }
        }
        // The event's room in the outbox is freed here, as it leaves it.
        self.inner.poll_recv(cx).map(|outgoing| outgoing.map(|o| o.event))
    }
}

/// An event in the outbox, holding its room there.
struct Outgoing {
    event: Result<Event>,
    _room: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn failed(err: Error) -> Self {
        Outgoing { event: Err(err), _room: None }
    }
}

/// Why the pump stopped early.
enum Stop {
    /// The client went away, or the broker is shutting down (already told to the client).
    Gone,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Stop::Failed(err)
    }
}

/// When each record of a paced subscription is due.
#[derive(Debug)]
struct Pacing {
    /// Recorded time per real time: 2 plays twice as fast.
    factor: f64,
    /// The tick of the first record delivered and when it was: the origin every later record's
    /// due time is measured from, so lateness in one wait never accumulates into the next.
    base: Option<(Tick, Instant)>,
}

impl Pacing {
    /// When the record with `tick` is due. The first call fixes the base, so its record is due at
    /// once. A tick below the base (a record imported into another stream after later ones were
    /// delivered) is due at once too.
    fn due(&mut self, tick: Tick, now: Instant) -> Instant {
        let (base_tick, base_at) = *self.base.get_or_insert((tick, now));
        let recorded = tick.0.saturating_sub(base_tick.0) as f64 / 1e9;
        // A tiny factor can ask for a wait no `Duration` or `Instant` holds: wait "forever".
        let wait = Duration::try_from_secs_f64(recorded / self.factor).unwrap_or(Duration::MAX);
        base_at.checked_add(wait).unwrap_or_else(|| later(wait))
    }
}

struct Pump {
    log: Arc<Log>,
    spec: Spec,
    cursors: Vec<Cursor>,
    /// Position of each tracked stream in `cursors`.
    index: HashMap<StreamId, usize>,
    out: mpsc::Sender<Outgoing>,
    /// The room left in the outbox, in weighed bytes (`OUTBOX_BYTES`).
    room: Arc<Semaphore>,
    shutdown: CancellationToken,
    pending: Vec<Record>,
    /// What `pending` weighs (see `weight`).
    pending_bytes: usize,
    /// A batch is sent once it weighs this much: `BATCH_BYTES`, or under a quota a sixteenth of
    /// its window, so that the measured rate follows the quota closely.
    batch_bytes: usize,
    /// `batch_bytes`, or less when the subscription's share is smaller (set at each batch sent).
    batch_limit: usize,
    heartbeat_at: Instant,
    /// On a relay, the tick every upstream had confirmed when the commits applied so far were
    /// read: no completeness claim goes past it.
    cap: Option<Tick>,
    /// Set when the subscription asked for paced delivery.
    pacing: Option<Pacing>,
    /// What went out within the quota's window, when the subscription has a quota.
    quota: Option<Window>,
    /// Past `CaughtUp`: the slow-consumer policy applies.
    live: bool,
    /// The tick of the last record sent.
    last_sent: Tick,
    /// Imports sealed after the start that hold records at or before it: told before the replay.
    announce: Vec<StreamInfo>,
    /// Holds one of the broker's subscription slots while the pump runs.
    _slot: OwnedSemaphorePermit,
    /// Its share of the memory of all subscriptions.
    share: Share,
    /// Its entry in the registry of running subscriptions.
    progress: super::registry::Entry,
}

/// Registers the subscription now and spawns its pump on `tasks`. The receiver ends after an
/// `Err` (the subscription failed or the broker is shutting down) or, for a bounded subscription,
/// after its last record.
pub fn spawn(
    log: Arc<Log>,
    spec: Spec,
    shutdown: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
    slot: OwnedSemaphorePermit,
    share: Share,
    progress: super::registry::Entry,
) -> Events {
    let (out, events) = mpsc::channel(OUTBOX);
    let snapshot = log.snapshot();
    let batch_bytes =
        spec.rate.map_or(BATCH_BYTES, |r| (r.budget() / 16).clamp(1, BATCH_BYTES as u64) as usize);
    let mut pump = Pump {
        log,
        cursors: Vec::new(),
        index: HashMap::new(),
        out,
        room: Arc::new(Semaphore::new(OUTBOX_BYTES)),
        shutdown,
        pending: Vec::new(),
        pending_bytes: 0,
        batch_bytes,
        batch_limit: batch_bytes,
        heartbeat_at: later(spec.heartbeat),
        cap: None,
        pacing: spec.pace.map(|factor| Pacing { factor, base: None }),
        quota: spec.rate.map(Window::new),
        live: false,
        last_sent: Tick(0),
        announce: Vec::new(),
        _slot: slot,
        share,
        progress,
        spec,
    };
    for info in snapshot.streams {
        if pump.selects(&info) {
            let pos = match pump.spec.start {
                Start::Now => info.last_tick,
                _ => pump.start_of(&info),
            };
            // An import sealed after the start is read whole, also its records at or before the
            // start: the client is told first, with the stream's range.
            let start = match pump.spec.start {
                Start::Now => None,
                _ => pump.start_pos().filter(|_| !pump.spec.resume.contains_key(&*info.name)),
            };
            if start.is_some_and(|start| info.created_tick > start && info.first_tick <= Some(start)) {
                pump.announce.push(info.clone());
            }
            pump.track(info, pos);
        }
    }
    let registered = snapshot.watermark;
    let commits = snapshot.commits;
    let (abort, aborted) = oneshot::channel();
    tasks.spawn(async move {
        let ran = pump.run(registered, commits).await;
        let progress = pump.progress.progress();
        let why = match &ran {
            Ok(()) => "its end was delivered".to_string(),
            Err(Stop::Gone) => "the client went away".to_string(),
            Err(Stop::Failed(err)) => err.to_string(),
        };
        info!(subscription = progress.id, peer = %progress.client.peer, records = progress.seen().records, "subscription ended: {why}");
        match ran {
            Ok(()) | Err(Stop::Gone) => {}
            Err(Stop::Failed(err)) => {
                debug!(cause = %err, "subscription failed");
                // What was read before the failure is intact: deliver it first, unless the client
                // stopped reading (then it resumes from what it did read).
                let reading = !matches!(err, Error::SlowConsumer { .. });
                if reading {
                    let _ = tokio::time::timeout(Duration::from_secs(2), pump.flush()).await;
                }
                // Tell the client why: in order when there is room, else ahead of the outbox.
                let wait = if reading { Duration::from_secs(2) } else { Duration::ZERO };
                match tokio::time::timeout(wait, pump.out.reserve()).await {
                    Ok(Ok(room)) => room.send(Outgoing::failed(err)),
                    _ => {
                        let _ = abort.send(err);
                    }
                }
            }
        }
    });
    Events { inner: events, abort: Some(aborted) }
}

/// The state of each upstream link now, marking the links as seen.
fn statuses(links: &mut watch::Receiver<Vec<Link>>) -> Vec<UpstreamStatus> {
    let now = Tick::now();
    links.borrow_and_update().iter().map(|l| l.status(now)).collect()
}

/// The next queued commit, if any.
fn try_next(
    commits: &mut broadcast::Receiver<Commit>,
) -> Option<std::result::Result<Commit, broadcast::error::RecvError>> {
    match commits.try_recv() {
        Err(broadcast::error::TryRecvError::Empty) | Err(broadcast::error::TryRecvError::Closed) => None,
        Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(broadcast::error::RecvError::Lagged(n))),
        Ok(c) => Some(Ok(c)),
    }
}

/// How far the clock may be advanced without records: the wall clock on an origin; on a relay the
/// tick up to which every upstream confirmed this relay has everything (none before that is known).
fn advance_cap(links: &Option<watch::Receiver<Vec<Link>>>) -> Option<Tick> {
    match links {
        None => Some(Tick::now()),
        Some(links) => link::confirmed(&links.borrow()),
    }
}

/// Resolves when the links change; never on an origin.
async fn changed(links: &mut Option<watch::Receiver<Vec<Link>>>) -> Result<(), watch::error::RecvError> {
    match links {
        Some(links) => links.changed().await,
        None => std::future::pending().await,
    }
}

/// `now + wait`, or a year from now when that would overflow.
fn later(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait).unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

impl Pump {
    /// Whether the subscription reads `stream`: it matches, the client may read it, and it is not
    /// being imported.
    fn selects(&self, stream: &StreamInfo) -> bool {
        !stream.meta.importing
            && self.spec.selectors.iter().any(|p| p.matches(&stream.name))
            && self.spec.readable.as_ref().is_none_or(|r| r.iter().any(|p| p.matches(&stream.name)))
    }

    /// The position a stream starts from, unless the resume map names it. Under `Now`, streams
    /// that exist at registration start at their last tick; streams created later from their
    /// first record.
    fn start_pos(&self) -> Option<Tick> {
        match self.spec.start {
            Start::Beginning | Start::Now => None,
            Start::At(t) => t.0.checked_sub(1).map(Tick).filter(|t| t.0 > 0),
            Start::After(t) => Some(t),
        }
    }

    /// Where `stream` starts, unless the resume map names it: a stream that became visible after
    /// the start (an import sealed since) is read from its first record, since none of its records
    /// could be delivered at their ticks. (Any other stream created since has only later records.)
    fn start_of(&self, stream: &StreamInfo) -> Option<Tick> {
        self.start_pos().filter(|&start| stream.created_tick <= start)
    }

    fn track(&mut self, mut info: StreamInfo, pos: Option<Tick>) {
        let pos = self.spec.resume.get(&*info.name).copied().or(pos);
        // A name of its own: every delivered record holds a reference to it, and a count shared
        // by all subscribers of the stream would bounce between cores at each record.
        info.name = Arc::from(&*info.name);
        self.index.insert(info.id, self.cursors.len());
        self.cursors.push(Cursor {
            info,
            pos,
            buffer: VecDeque::new(),
            chunks: Vec::new(),
            more: false,
            dirty: true,
            truncated: None,
            delivered: pos,
        });
    }

    /// The largest tick this subscription may deliver now.
    fn bound(&self, watermark: Tick) -> Tick {
        self.spec.end.map_or(watermark, |end| end.min(watermark))
    }

    /// The tick up to which everything of this subscription was delivered, given that
    /// everything up to `delivered` was drained: on a relay no further than every upstream
    /// confirmed (with several upstreams, one may be behind the others).
    fn complete(&self, delivered: Tick) -> Tick {
        match (&self.spec.links, self.cap) {
            (None, _) => delivered,
            (Some(_), cap) => cap.map_or(Tick(0), |c| c.min(delivered)),
        }
    }

    fn ended(&self, watermark: Tick) -> bool {
        self.spec.end.is_some_and(|end| self.complete(watermark) >= end)
    }

    async fn run(&mut self, registered: Tick, mut commits: broadcast::Receiver<Commit>) -> Result<(), Stop> {
        let mut watermark = registered;
        // On a relay: where the upstream links stand, before anything else.
        let mut links = self.spec.links.clone();
        let mut connected: Vec<bool> = Vec::new();
        if let Some(links) = &mut links {
            for status in statuses(links) {
                connected.push(status.connected);
                self.send(Event::Upstream(status)).await?;
            }
        }
        for info in std::mem::take(&mut self.announce) {
            self.send(Event::StreamAdded(info)).await?;
        }
        // An origin idle for longer than a heartbeat (or that never stored a record) first lets
        // its clock reach now, so that the replay's `CaughtUp` and the first heartbeat name the
        // present rather than a tick long past (or 0).
        if self.spec.links.is_none()
            && Tick::now().0.saturating_sub(watermark.0) > crate::types::nanos(self.spec.heartbeat)
        {
            self.log.advance(Tick::now()).await?;
            self.catch_up(&mut commits, None, &mut watermark).await?;
        }
        // Replay: everything up to the tail as it was at registration. On a relay the cap is read
        // first: whatever it confirms was committed (and so is in the snapshot) before.
        self.cap = advance_cap(&self.spec.links);
        self.drain(self.bound(watermark)).await?;
        self.send(Event::CaughtUp(self.complete(self.bound(watermark)))).await?;
        self.live = true;
        self.progress.caught_up();
        // Live: each commit marks streams dirty and raises the bound.
        loop {
            // Everything up to the watermark went out: the status page shows no lag while the
            // subscription waits for the next commit.
            self.progress.delivered(self.complete(self.bound(watermark)));
            if let Some(end) = self.spec.end.filter(|_| self.ended(watermark)) {
                // The last message says the end was reached, so a client can tell a finished
                // subscription from a connection closed early.
                let now = Tick::now();
                let upstreams = self.upstreams(now);
                self.send(Event::Heartbeat { tail: end, server_time: now, upstreams }).await?;
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.shutting_down().await,
                _ = self.out.closed() => return Err(Stop::Gone),
                commit = commits.recv() => {
                    self.catch_up(&mut commits, Some(commit), &mut watermark).await?;
                }
                _ = tokio::time::sleep_until(self.end_passes_at()), if self.spec.end.is_some() && links.is_none() => {
                    // The wall clock passed the end but the watermark has not (nothing was
                    // published): have the writer raise it. Its commit arrives after the commits
                    // of every batch queued before, and the branch above applies them all in
                    // order, so no stream's committed tick is stale when the end is reached.
                    // (A relay raises it as its upstreams confirm: the branch below.)
                    if let Some(end) = self.spec.end.filter(|&end| self.log.watermark() < end) {
                        self.log.advance(end).await?;
                    }
                }
                changed = changed(&mut links) => {
                    if changed.is_err() {
                        // The relay is shutting down: the shutdown branch follows.
                        links = None;
                        continue;
                    }
                    let Some(receiver) = &mut links else { continue };
                    let now = statuses(receiver);
                    connected.resize(now.len(), false);
                    for (i, status) in now.into_iter().enumerate() {
                        if status.connected != connected[i] {
                            connected[i] = status.connected;
                            self.send(Event::Upstream(status)).await?;
                        }
                    }
                    // What the upstreams confirmed may have moved: deliver what it covers, and
                    // once the end has passed, let the clock follow the confirmations up to it.
                    self.catch_up(&mut commits, None, &mut watermark).await?;
                    if let (Some(end), Some(cap)) = (self.spec.end, self.cap) {
                        let to = end.min(cap);
                        if Tick::now() > end && self.log.watermark() < to {
                            self.log.advance(to).await?;
                        }
                    }
                }
                _ = tokio::time::sleep_until(self.heartbeat_at) => {
                    self.catch_up(&mut commits, None, &mut watermark).await?;
                    let now = Tick::now();
                    let upstreams = self.upstreams(now);
                    let tail = self.complete(watermark);
                    self.send(Event::Heartbeat { tail, server_time: now, upstreams }).await?;
                    // Let time pass for every reader while nothing is published, so that a
                    // heartbeat's tail (everything up to it was delivered) stays recent.
                    if let Some(cap) = advance_cap(&self.spec.links) {
                        self.log.advance_lazily(cap, self.spec.heartbeat / 2).await?;
                    }
                }
            }
        }
    }

    /// Reads the cap, then applies every commit already queued (`first` included) and delivers
    /// what they make readable. The order matters on a relay: an upstream's confirmation is
    /// recorded after the commit of what it confirms, so a cap read first never covers a commit
    /// that is not applied yet.
    async fn catch_up(
        &mut self,
        commits: &mut broadcast::Receiver<Commit>,
        first: Option<std::result::Result<Commit, broadcast::error::RecvError>>,
        watermark: &mut Tick,
    ) -> Result<(), Stop> {
        self.cap = advance_cap(&self.spec.links);
        let mut next = first.or_else(|| try_next(commits));
        while let Some(commit) = next.take() {
            match commit {
                Ok(commit) => {
                    // A catalog change goes out after the records committed before it, so the
                    // events and the records arrive in the order they happened (a relay copies
                    // them in that order).
                    if !commit.added.is_empty() || !commit.changed.is_empty() {
                        self.drain(self.bound(*watermark)).await?;
                    }
                    *watermark = (*watermark).max(commit.watermark);
                    self.apply(&commit).await?;
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    debug!(missed, "subscriber lagged; rescanning streams");
                    *watermark = (*watermark).max(self.log.watermark());
                    self.rescan().await?;
                }
                Err(broadcast::error::RecvError::Closed) => return self.shutting_down().await,
            }
            next = try_next(commits);
        }
        self.drain(self.bound(*watermark)).await
    }

    /// When the wall clock passes the subscription's end: at once if it has.
    fn end_passes_at(&self) -> Instant {
        let end = self.spec.end.unwrap_or(Tick::MAX);
        let wait = Duration::from_nanos(end.0.saturating_sub(Tick::now().0)) + Duration::from_millis(1);
        later(wait)
    }

    async fn shutting_down(&mut self) -> Result<(), Stop> {
        // Tell the client to resume elsewhere or later; do not wait long for a stalled one.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.out.send(Outgoing::failed(Error::ShuttingDown)),
        )
        .await;
        Err(Stop::Gone)
    }

    /// Marks the streams of a commit dirty and starts tracking new streams that match.
    async fn apply(&mut self, commit: &Commit) -> Result<(), Stop> {
        for info in commit.added.iter() {
            if !self.index.contains_key(&info.id) && self.selects(info) {
                let pos = self.start_of(info);
                self.send(Event::StreamAdded(info.clone())).await?;
                self.track(info.clone(), pos);
            }
        }
        for (info, deleted) in commit.changed.iter() {
            if self.selects(info) {
                if let Some(&i) = self.index.get(&info.id) {
                    if *deleted {
                        self.forget(i);
                    } else {
                        self.cursors[i].info.meta = info.meta.clone();
                    }
                }
                self.send(Event::StreamChanged { info: info.clone(), deleted: *deleted }).await?;
            }
        }
        for (id, last) in commit.streams.iter() {
            if let Some(&i) = self.index.get(id) {
                let cursor = &mut self.cursors[i];
                cursor.info.last_tick = cursor.info.last_tick.max(Some(*last));
                cursor.dirty = true;
            }
        }
        Ok(())
    }

    /// Stops reading cursor `i`'s stream, deleted: nothing is left to read, and a stream created
    /// later under the name is new.
    fn forget(&mut self, i: usize) {
        let cursor = &mut self.cursors[i];
        self.index.remove(&cursor.info.id);
        cursor.buffer.clear();
        cursor.chunks = Vec::new();
        cursor.more = false;
        cursor.info.last_tick = None;
    }

    /// After missing commits: every stream may have changed, been deleted, or be new; what the
    /// missed commits would have told is told now.
    async fn rescan(&mut self) -> Result<(), Stop> {
        let streams = self.log.streams();
        let present: std::collections::HashSet<StreamId> = streams.iter().map(|s| s.id).collect();
        let gone: Vec<usize> =
            self.index.iter().filter(|(id, _)| !present.contains(id)).map(|(_, &i)| i).collect();
        for i in gone {
            let info = self.cursors[i].info.clone();
            self.forget(i);
            self.send(Event::StreamChanged { info, deleted: true }).await?;
        }
        for info in streams {
            if let Some(&i) = self.index.get(&info.id) {
                let cursor = &mut self.cursors[i];
                cursor.info.last_tick = cursor.info.last_tick.max(info.last_tick);
                if cursor.info.meta != info.meta {
                    cursor.info.meta = info.meta.clone();
                    self.send(Event::StreamChanged { info, deleted: false }).await?;
                }
            } else if self.selects(&info) {
                let pos = self.start_of(&info);
                self.send(Event::StreamAdded(info.clone())).await?;
                self.track(info, pos);
            }
        }
        for cursor in &mut self.cursors {
            cursor.dirty = true;
        }
        Ok(())
    }

    /// Delivers every record of the dirty streams up to `bound`, merged by `(tick, stream)`.
    async fn drain(&mut self, bound: Tick) -> Result<(), Stop> {
        let mut heads = BinaryHeap::new();
        for i in 0..self.cursors.len() {
            if self.cursors[i].dirty {
                self.cursors[i].dirty = false;
                self.cursors[i].more = true;
                self.refill(i, bound).await?;
            }
            if let Some(head) = self.head(i) {
                heads.push(head);
            }
        }
        while let Some(Reverse((_, _, i))) = heads.pop() {
            loop {
                self.announce_truncation(i).await?;
                if let Some(record) = self.cursors[i].buffer.pop_front() {
                    let cursor = &mut self.cursors[i];
                    cursor.delivered = Some(record.tick);
                    let record = record.named(&cursor.info.name, &cursor.chunks);
                    self.push(record).await?;
                }
                if self.cursors[i].buffer.is_empty() {
                    // Release the chunks as soon as nothing points into them.
                    self.cursors[i].chunks = Vec::new();
                    if self.cursors[i].more {
                        self.refill(i, bound).await?;
                    }
                }
                // While no other stream has a record waiting, this one's go out in a row.
                if !heads.is_empty() || self.cursors[i].buffer.is_empty() {
                    break;
                }
            }
            if let Some(head) = self.head(i) {
                heads.push(head);
            }
        }
        self.flush().await
    }

    /// The merge key of cursor `i`'s next record: `(tick, stream name)`.
    fn head(&self, i: usize) -> Option<Reverse<(Tick, Arc<str>, usize)>> {
        let cursor = &self.cursors[i];
        cursor.buffer.front().map(|r| Reverse((r.tick, cursor.info.name.clone(), i)))
    }

    /// Reads the next window of cursor `i` up to `bound`. Only reads into an empty buffer, so the
    /// buffer never points into chunks of two reads.
    async fn refill(&mut self, i: usize, bound: Tick) -> Result<(), Stop> {
        let cursor = &self.cursors[i];
        if !cursor.buffer.is_empty() {
            return Ok(());
        }
        // Never past the stream's last committed tick: a chunk with explicit ticks below the
        // watermark is visible in sled while its commit is still being flushed.
        let upto = match cursor.info.last_tick {
            Some(last) => last.min(bound),
            None => Tick(0),
        };
        if upto.0 == 0 || cursor.pos.is_some_and(|p| p >= upto) {
            self.cursors[i].more = false;
            return Ok(());
        }
        // Many streams share one budget, so a `**` subscription stays bounded.
        let window =
            (READ_BUDGET / self.cursors.len().max(1)).clamp(16, self.share.of(READ_WINDOW, MIN_WINDOW));
        // A window can come back empty yet incomplete: its records were all removed by retention
        // while it was read. Read on (each read starts after the removed range), so a stream is
        // never left behind with more to read and nothing buffered.
        loop {
            let cursor = &self.cursors[i];
            let log = self.log.clone();
            let info = cursor.info.clone();
            let after = cursor.pos;
            let bytes = self.share.of(READ_BYTES, MIN_READ_BYTES);
            let read = tokio::task::spawn_blocking(move || log.read(&info, after, upto, window, bytes))
                .await
                .map_err(|e| Error::Internal(format!("read task failed: {e}")))??;
            let cursor = &mut self.cursors[i];
            let truncated = read.truncated.is_some();
            if let Some(truncation) = read.truncated {
                // What was removed counts as read: the next read starts after it.
                cursor.pos = cursor.pos.max(Some(truncation.through));
                cursor.truncated = Some(truncation);
            }
            if let Some(last) = read.records.last() {
                cursor.pos = Some(last.tick);
            }
            cursor.more = !read.complete && cursor.pos.is_none_or(|p| p < upto);
            // The buffer is empty here: it takes the read's own vector, sized to this read, so a
            // subscription whose share shrank does not keep the room a larger read once took.
            cursor.buffer = VecDeque::from(read.records);
            cursor.chunks = read.chunks;
            if !cursor.buffer.is_empty() || !cursor.more || !truncated {
                break;
            }
        }
        let cursor = &self.cursors[i];
        if cursor.buffer.is_empty() {
            // No record of this stream to put the event before: it goes now.
            self.announce_truncation(i).await?;
        }
        Ok(())
    }

    /// Tells the client that retention removed part of cursor `i`'s range, once, after every
    /// record before it was sent.
    async fn announce_truncation(&mut self, i: usize) -> Result<(), Stop> {
        let Some(t) = self.cursors[i].truncated.take() else { return Ok(()) };
        self.flush().await?;
        let stream = self.cursors[i].info.name.clone();
        debug!(%stream, requested = %t.requested, through = %t.through, "range truncated by retention");
        self.send(Event::Truncated {
            stream,
            requested: t.requested,
            through: t.through,
            earliest: t.earliest,
        })
        .await
    }

    async fn push(&mut self, record: Record) -> Result<(), Stop> {
        if let Some(pacing) = &mut self.pacing {
            let now = Instant::now();
            let due = pacing.due(record.tick, now);
            if due > now {
                // What is due goes out now rather than waiting behind this record.
                self.flush().await?;
                self.wait_until(due, record.tick).await?;
            }
        }
        self.pending_bytes += weight(&record) as usize;
        self.pending.push(record);
        if self.pending.len() >= BATCH_RECORDS || self.pending_bytes >= self.batch_limit {
            self.flush().await?;
        }
        Ok(())
    }

    /// Waits until a paced record (of tick `next`) is due, unless the client goes away or the
    /// broker shuts down first; a long wait is not silence, so it keeps the heartbeats going.
    /// Their tail is just below `next`: everything before it was delivered, nothing after.
    async fn wait_until(&mut self, due: Instant, next: Tick) -> Result<(), Stop> {
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.shutting_down().await,
                _ = self.out.closed() => return Err(Stop::Gone),
                _ = tokio::time::sleep_until(due) => return Ok(()),
                _ = tokio::time::sleep_until(self.heartbeat_at) => {
                    let now = Tick::now();
                    let upstreams = self.upstreams(now);
                    let tail = self.complete(Tick(next.0 - 1));
                    self.send(Event::Heartbeat { tail, server_time: now, upstreams }).await?;
                }
            }
        }
    }

    /// The state of each upstream link at `now` (empty on an origin).
    fn upstreams(&self, now: Tick) -> Vec<UpstreamStatus> {
        self.spec
            .links
            .as_ref()
            .map(|l| l.borrow().iter().map(|l| l.status(now)).collect())
            .unwrap_or_default()
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Under a quota, the batch waits until it may go (heartbeats meanwhile), then counts.
        let due = self.quota.as_ref().map(|quota| quota.due(Instant::now()));
        if let Some(due) = due.filter(|&due| due > Instant::now()) {
            self.wait_until(due, self.pending[0].tick).await?;
        }
        if let Some(quota) = &mut self.quota {
            quota.record(self.pending_bytes as u64, Instant::now());
        }
        self.batch_limit = self.batch_bytes.min(self.share.of(BATCH_BYTES, MIN_BATCH_BYTES));
        // The next batch is likely as long as this one: no regrowing it record by record.
        let next = Vec::with_capacity(self.pending.len());
        let batch = std::mem::replace(&mut self.pending, next);
        let weight = std::mem::take(&mut self.pending_bytes);
        let last = batch.last().map_or(Tick(0), |r| r.tick);
        let count = batch.len() as u64;
        // Never back: an import sealed just now comes in below what was already complete, and
        // its `StreamAdded` (with its range) told the client so.
        let complete_to = self.complete(last.max(self.last_sent));
        self.send_weighing(Event::Records { records: batch, complete_to }, weight).await?;
        self.last_sent = self.last_sent.max(last);
        self.progress.sent(count, weight as u64, self.last_sent);
        self.keep_up().await
    }

    /// After a live batch went out: applies the slow-consumer policy when the subscription is more
    /// than `max_lag` behind the tail.
    async fn keep_up(&mut self) -> Result<(), Stop> {
        if !self.live || self.spec.slow == SlowConsumer::CatchUp || self.pacing.is_some() {
            return Ok(());
        }
        let tail = self.bound(self.log.watermark());
        let lag = Duration::from_nanos(tail.0.saturating_sub(self.last_sent.0));
        if lag <= self.spec.max_lag {
            return Ok(());
        }
        match self.spec.slow {
            SlowConsumer::CatchUp => Ok(()),
            SlowConsumer::Disconnect => self.lagging(),
            SlowConsumer::Latest => self.skip_to(tail).await,
        }
    }

    /// Under DISCONNECT: ends the subscription when it is more than `max_lag` behind the tail.
    fn lagging(&self) -> Result<(), Stop> {
        let tail = self.bound(self.log.watermark());
        let lag = Duration::from_nanos(tail.0.saturating_sub(self.last_sent.0));
        if lag <= self.spec.max_lag {
            return Ok(());
        }
        debug!(?lag, "slow subscriber disconnected");
        Err(Stop::Failed(Error::SlowConsumer { lag, max_lag: self.spec.max_lag, last: self.last_sent }))
    }

    /// Skips every stream to its newest record at or below `tail`, telling the client what was
    /// skipped (`Gap`, counted from the chunks' running totals: two chunk reads per stream).
    async fn skip_to(&mut self, tail: Tick) -> Result<(), Stop> {
        for i in 0..self.cursors.len() {
            let cursor = &self.cursors[i];
            let Some(info) = self.log.stream(&cursor.info.name).filter(|s| s.id == cursor.info.id) else {
                continue;
            };
            let Some(to) = info.last_tick.map(|last| last.min(tail)) else { continue };
            let from = cursor.delivered;
            if from >= Some(to) {
                continue;
            }
            let log = self.log.clone();
            let records = tokio::task::spawn_blocking(move || -> Result<u64> {
                Ok(log.count_through(&info, Some(to))?.saturating_sub(log.count_through(&info, from)?))
            })
            .await
            .map_err(|e| Error::Internal(format!("count task failed: {e}")))??;
            let cursor = &mut self.cursors[i];
            cursor.buffer.clear();
            cursor.chunks = Vec::new();
            cursor.truncated = None;
            cursor.more = false;
            cursor.pos = Some(to);
            cursor.delivered = Some(to);
            if records > 0 {
                let stream = cursor.info.name.clone();
                let from = Tick(from.map_or(0, |f| f.0 + 1));
                debug!(%stream, records, %from, %to, "slow subscriber skipped to the newest records");
                self.send(Event::Gap { stream, records, from, to }).await?;
            }
        }
        self.last_sent = self.last_sent.max(tail);
        self.progress.delivered(self.last_sent);
        Ok(())
    }

    async fn send(&mut self, event: Event) -> Result<(), Stop> {
        self.send_weighing(event, 0).await
    }

    /// Sends an event that weighs `weight` bytes against the outbox's room, once there is room.
    /// (A batch heavier than the whole outbox waits for all of it.)
    async fn send_weighing(&mut self, event: Event, weight: usize) -> Result<(), Stop> {
        // Weighed up so that the outbox holds only this subscription's share of its full size.
        let capacity = self.share.of(OUTBOX_BYTES, MIN_OUTBOX_BYTES);
        let take = (weight.saturating_mul(OUTBOX_BYTES) / capacity).min(OUTBOX_BYTES) as u32;
        // A client that stopped reading leaves this waiting for room: under DISCONNECT the lag is
        // looked at meanwhile, so the policy applies even though nothing goes out.
        let policed = self.live && self.spec.slow == SlowConsumer::Disconnect && self.pacing.is_none();
        let every = (self.spec.max_lag / 4).max(Duration::from_millis(10));
        let mut look = policed.then(|| Box::pin(tokio::time::sleep(every)));
        let room = self.room.clone().acquire_many_owned(take);
        tokio::pin!(room);
        let outgoing = loop {
            tokio::select! {
                room = &mut room => break Outgoing { event: Ok(event), _room: room.ok() },
                _ = self.out.closed() => return Err(Stop::Gone),
                _ = self.shutdown.cancelled() => return self.shutting_down().await,
                () = ticked(&mut look, every) => self.lagging()?,
            }
        };
        let stopping = {
            let sent = self.out.send(outgoing);
            tokio::pin!(sent);
            loop {
                tokio::select! {
                    sent = &mut sent => {
                        sent.map_err(|_| Stop::Gone)?;
                        break false;
                    }
                    _ = self.shutdown.cancelled() => break true,
                    () = ticked(&mut look, every) => self.lagging()?,
                }
            }
        };
        if stopping {
            return self.shutting_down().await;
        }
        self.heartbeat_at = later(self.spec.heartbeat);
        Ok(())
    }
}

/// Resolves each time `look` passes, restarting it `every` later; never when there is none.
async fn ticked(look: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>, every: Duration) {
    match look {
        Some(sleep) => {
            sleep.as_mut().await;
            sleep.as_mut().reset(Instant::now() + every);
        }
        None => std::future::pending().await,
    }
}

/// What a record weighs against a quota: its payload, headers and stream name, and its other
/// fields.
fn weight(record: &Record) -> u64 {
    let headers: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (record.payload.len() + headers + record.stream.len() + 32) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_records_are_due_after_their_recorded_offset_over_the_factor() {
        let start = Instant::now();
        let mut pacing = Pacing { factor: 2.0, base: None };
        assert_eq!(pacing.due(Tick(5_000_000_000), start), start, "the first record is due at once");
        // Later calls measure from the first record, whenever they are made.
        let later_call = start + Duration::from_secs(7);
        assert_eq!(pacing.due(Tick(6_000_000_000), later_call), start + Duration::from_millis(500));
        assert_eq!(
            pacing.due(Tick(4_000_000_000), later_call),
            start,
            "a tick below the base is due at once"
        );
        let mut original = Pacing { factor: 1.0, base: None };
        original.due(Tick(1), start);
        assert_eq!(original.due(Tick(1 + 250_000_000), start), start + Duration::from_millis(250));
    }

    #[test]
    fn a_wait_too_long_to_represent_is_far_away_not_a_panic() {
        let start = Instant::now();
        let mut crawl = Pacing { factor: 1e-300, base: None };
        crawl.due(Tick(1), start);
        assert!(crawl.due(Tick::MAX, start) > start + Duration::from_secs(300 * 86_400));
    }
}
