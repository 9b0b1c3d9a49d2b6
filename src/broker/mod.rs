//! The domain: publish, subscribe and the catalog, with every rule a request must follow.
//! No gRPC type appears here; `grpc.rs` translates to and from these types.

pub mod link;
pub mod quota;
pub mod registry;
pub mod subscription;
pub mod throttle;

use crate::config::{Config, Limits, Mirror};
use crate::error::{Error, Result};
use crate::protocol::codec::TooLarge;
use crate::protocol::PROTOCOL_VERSIONS;
use crate::store::{Appended, BatchTag, Log, Source};
use crate::types::{
    nanos, Incoming, NewRecord, Pattern, StreamInfo, StreamMeta, StreamName, Tick, UpstreamStatus,
};
use link::Link;
use quota::{PerConnection, Rate};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use subscription::{Events, SlowConsumer, Spec, Start};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The shortest heartbeat interval a client may ask for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// How long `close` waits for subscription tasks.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most streams one `ListStreams` answer holds: a page of them is a few MiB at most.
pub const MAX_LIST_PAGE: usize = 10_000;

/// How far ahead of this broker's clock an upstream's tick may be: clocks of an origin and its
/// relays differ, but a record an hour ahead would drag this broker's clock with it.
const MAX_UPSTREAM_AHEAD: Duration = Duration::from_secs(3600);

/// Records an upstream sent that this relay cannot take are logged at most once a second.
static SKIPPED: throttle::Throttle = throttle::Throttle::new(Duration::from_secs(1));

/// The fastest pace a subscription may ask for. Far beyond any useful replay speed; it keeps the
/// delay arithmetic well inside `f64` and `Duration`.
pub const MAX_PACE: f64 = 1e6;

/// A batch as a publisher sends it.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub records: Vec<Incoming>,
    /// Makes the batch idempotent together with `sequence`; empty for a plain batch.
    pub producer_id: String,
    /// The producer's sequence number of this batch; 0 for a plain batch.
    pub sequence: u64,
    /// The client connection it came on, for the per-connection publish quota.
    pub from: Option<std::net::SocketAddr>,
}

impl From<Vec<Incoming>> for Batch {
    fn from(records: Vec<Incoming>) -> Batch {
        Batch { records, ..Batch::default() }
    }
}

/// A subscription as a client asks for it, before any rule was checked.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub streams: Vec<String>,
    pub start: Start,
    pub resume: HashMap<String, u64>,
    pub end: Option<u64>,
    /// The client's heartbeat interval, instead of the server's.
    pub heartbeat: Option<Duration>,
    /// 0 for instant delivery; otherwise the speed factor of paced delivery (1 = the original
    /// timing of the ticks).
    pub pace: f64,
    /// The client's quota, instead of the server's default (never above its ceiling).
    pub max_bytes_per_second: Option<u64>,
    pub rate_window: Option<Duration>,
    pub slow: SlowConsumer,
    /// The client's lag limit, instead of the server's.
    pub max_lag: Option<Duration>,
    /// The streams the client may read (a subscription by pattern silently selects only those);
    /// `None` for all.
    pub readable: Option<Vec<Pattern>>,
    /// Who asks, for the status page.
    pub client: registry::Client,
}

/// Who this server is, for `Hello`.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub server_id: String,
    pub server_version: &'static str,
    pub protocol_versions: Vec<u32>,
    pub protocol_version: u32,
    pub tail_tick: Tick,
    /// The operator's message, for a client older than the recommended version.
    pub notice: Option<crate::config::Notice>,
}

/// The broker: the log plus the rules, and the tasks serving subscribers.
pub struct Broker {
    log: Arc<Log>,
    limits: Limits,
    heartbeat: Duration,
    /// Cancelled when the server shuts down; every subscription watches it.
    shutdown: CancellationToken,
    /// Every subscription task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// What `Hello` tells clients older than a recommended version.
    notice: Option<crate::config::Notice>,
    /// Relay mode: each upstream with its parsed patterns.
    mirrors: Vec<(Mirror, Vec<Pattern>)>,
    /// The state of each upstream link (same order as `mirrors`); subscriptions watch it.
    links: watch::Sender<Vec<Link>>,
    /// One permit per subscription that may run at once (`max_subscriptions`).
    subscription_slots: Arc<Semaphore>,
    /// Subscriptions running now: each takes an equal share of their memory budget.
    subscriptions: Arc<std::sync::atomic::AtomicUsize>,
    /// The same, as the status page shows them.
    registry: Arc<registry::Registry>,
    /// Each client connection's publish quota, when there is one.
    publish_quota: PerConnection,
    /// Catalog changes by clients (`limits.catalog_changes_per_second`).
    catalog_rate: std::sync::Mutex<quota::Window>,
    /// The server's retention settings, to tell a stream's effective retention.
    retention: crate::config::Retention,
}

impl Broker {
    /// Opens the log described by `config`; `shutdown` stops every subscription.
    pub fn open(config: &Config, shutdown: CancellationToken) -> Result<Broker> {
        config.validate()?;
        let log = Log::open(config)?;
        let mut mirrors = Vec::with_capacity(config.mirrors.len());
        for mirror in &config.mirrors {
            let patterns =
                mirror.patterns.iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>()?;
            mirrors.push((mirror.clone(), patterns));
        }
        let mut links: Vec<Link> = config.mirrors.iter().map(|m| Link::new(&m.upstream)).collect();
        // What is stored of each upstream is a prefix of what it sent: confirmed up to its newest.
        for info in log.streams() {
            let index = mirrors.iter().position(|(_, patterns): &(Mirror, Vec<Pattern>)| {
                patterns.iter().any(|p| p.matches(&info.name))
            });
            if let (Some(index), Some(last)) = (index, info.last_tick) {
                let link = &mut links[index];
                link.confirmed = Some(link.confirmed.map_or(last, |c| c.max(last)));
            }
        }
        let retention = crate::config::Retention {
            copied: mirrors.iter().flat_map(|(_, patterns)| patterns.clone()).collect(),
            ..config.retention.clone()
        };
        Ok(Broker {
            log: Arc::new(log),
            limits: config.limits,
            heartbeat: config.heartbeat,
            shutdown,
            tasks: TaskTracker::new(),
            mirrors,
            links: watch::Sender::new(links),
            notice: config.notice.clone(),
            subscription_slots: Arc::new(Semaphore::new(config.limits.max_subscriptions)),
            subscriptions: Arc::default(),
            registry: Arc::default(),
            publish_quota: PerConnection::default(),
            // A window of 16 s: the burst (a sixteenth of it) is one second's worth.
            catalog_rate: std::sync::Mutex::new(quota::Window::new(Rate {
                bytes_per_second: config.limits.catalog_changes_per_second,
                window: Duration::from_secs(16),
            })),
            retention,
        })
    }

    /// Checks a batch and queues it for the writer, in call order. The returned future yields
    /// the assigned ticks once the batch is durable under the fsync policy.
    pub async fn submit(&self, batch: Batch) -> Result<impl Future<Output = Result<Appended>>> {
        let records = self.check(batch.records)?;
        // Over its connection's quota, a publisher waits here: the call (or the publish stream)
        // reads nothing more meanwhile, so HTTP/2 flow control slows the client. Nothing is dropped.
        if let (Some(bytes_per_second), Some(from)) = (self.limits.publish_bytes_per_second, batch.from) {
            let rate = Rate { bytes_per_second, window: self.limits.rate_window };
            let bytes = records.iter().map(|r| r.payload.len() + r.stream.as_str().len() + 32).sum::<usize>();
            self.publish_quota.window(from, rate).lock().await.take(bytes as u64).await;
        }
        // A relay has one writer, its relay task. A record published into a mirrored stream would
        // be missing upstream and at every other relay and could take a tick the upstream uses
        // later; one of a stream of its own would get a tick from this broker's clock, ahead of
        // what the upstream confirmed, and break the promise that everything up to the watermark
        // (the tail in heartbeats, `CaughtUp` and `Hello`) was delivered.
        if let Some(record) = records.first() {
            self.refuse_on_relay(record.stream.as_str())?;
        }
        let tag = match (batch.producer_id.is_empty(), batch.sequence) {
            (true, 0) => None,
            (false, sequence) => Some(BatchTag::new(&batch.producer_id, sequence, &records)?),
            (true, sequence) => {
                return Err(Error::InvalidArgument(format!(
                    "batch has sequence {sequence} but no producer id: an idempotent batch needs both"
                )))
            }
        };
        let answer = self.log.submit(records, Source::Publisher(tag)).await?;
        Ok(async move { answer.await.map_err(|_| Error::ShuttingDown)? })
    }

    /// Stores records received from an upstream, ticks unchanged (relay mode); returns once they
    /// are durable.
    pub async fn mirror(&self, records: Vec<Incoming>) -> Result<()> {
        // What the upstream sends is checked like a publish, record by record: a record this
        // broker cannot take (over its limits, a tick not after what it holds of the stream, or far
        // in the future) is reported and skipped, so one bad record never stops the copy.
        let mut names = HashMap::new();
        let mut last: HashMap<String, Option<Tick>> = HashMap::new();
        let ahead = Tick(Tick::now().0.saturating_add(nanos(MAX_UPSTREAM_AHEAD)));
        let mut kept = Vec::with_capacity(records.len());
        for r in records {
            let (stream, tick) = (r.stream.clone(), r.tick);
            let checked = self.check_record(r, &mut names).and_then(|record| {
                let held = *last
                    .entry(stream.clone())
                    .or_insert_with(|| self.log.stream(&stream).and_then(|s| s.last_tick));
                match record.tick {
                    None => Err(Error::InvalidArgument("the upstream sent a record without a tick".into())),
                    Some(t) if held.is_some_and(|h| t <= h) => {
                        Err(Error::TickNotAfter { stream: stream.clone(), tick: t, last: held.unwrap_or(t) })
                    }
                    Some(t) if t > ahead => {
                        Err(Error::TickAhead { stream: stream.clone(), tick: t, limit: ahead })
                    }
                    Some(_) => Ok(record),
                }
            });
            match checked {
                Ok(record) => {
                    last.insert(stream, record.tick);
                    kept.push(record);
                }
                Err(err) => {
                    if let Some(unlogged) = SKIPPED.due("upstream record") {
                        warn!(%stream, tick, %err, unlogged, "skipped a record the upstream sent");
                    }
                }
            }
        }
        // In batches this broker's own limits allow.
        let size =
            |r: &NewRecord| r.payload.len() + r.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let (mut batch, mut bytes) = (Vec::new(), 0);
        for record in kept {
            let n = size(&record);
            if !batch.is_empty()
                && (batch.len() >= self.limits.max_batch_records || bytes + n > self.limits.max_batch_bytes)
            {
                self.store_copies(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
            bytes += n;
            batch.push(record);
        }
        if !batch.is_empty() {
            self.store_copies(batch).await?;
        }
        Ok(())
    }

    /// Stores checked copies of upstream records; returns once they are durable.
    async fn store_copies(&self, records: Vec<NewRecord>) -> Result<()> {
        let answer = self.log.submit(records, Source::Upstream).await?;
        answer.await.map_err(|_| Error::ShuttingDown)?.map(drop)
    }

    /// Relay mode: makes this broker's copy of `name` (mirror `index`'s) match its upstream's
    /// catalog entry: created with the upstream's creation tick and metadata, or its metadata
    /// updated; a copy older than the upstream's stream (the upstream deleted it and created it
    /// again) is deleted first, so the copy never holds what the upstream deleted. Returns whether
    /// it was.
    pub async fn mirror_define(
        &self,
        index: usize,
        name: &str,
        meta: StreamMeta,
        created: Tick,
    ) -> Result<bool> {
        if self.mirror_of(name) != Some(index) {
            return Ok(false);
        }
        let stream = StreamName::parse(name)?;
        let again = self.log.stream(name).is_some_and(|copy| created > copy.created_tick);
        if again {
            self.mirror_delete(index, name, None).await?;
        }
        self.log.define(stream, meta, true, Some(created)).await?;
        Ok(again)
    }

    /// Relay mode: deletes this broker's copy of `name`, as its upstream did; its subscribers are
    /// told. A copy that is not there is not an error, nor one newer than the stream the upstream
    /// deleted (created at `created`: an upstream that is behind replays old deletions).
    pub async fn mirror_delete(&self, index: usize, name: &str, created: Option<Tick>) -> Result<()> {
        if self.mirror_of(name) != Some(index) {
            return Ok(());
        }
        let newer = |copy: &StreamInfo| created.is_some_and(|c| copy.created_tick > c);
        if self.log.stream(name).is_some_and(|copy| newer(&copy)) {
            return Ok(());
        }
        match self.log.delete(name).await {
            Ok(_) | Err(Error::UnknownStream(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The retention settings, with relay mode's copies named.
    pub fn retention(&self) -> &crate::config::Retention {
        &self.retention
    }

    /// The upstreams this broker mirrors.
    pub fn mirrors(&self) -> Vec<Mirror> {
        self.mirrors.iter().map(|(m, _)| m.clone()).collect()
    }

    /// The number of the mirror that copies `stream`, if one does.
    pub fn mirror_of(&self, stream: &str) -> Option<usize> {
        self.mirrors.iter().position(|(_, patterns)| patterns.iter().any(|p| p.matches(stream)))
    }

    /// Changes what is known of mirror `index`'s link; subscriptions see the change.
    pub fn update_link(&self, index: usize, change: impl FnOnce(&mut Link)) {
        self.links.send_modify(|links| {
            if let Some(link) = links.get_mut(index) {
                let was = link.connected;
                change(link);
                if link.connected && !was {
                    info!(upstream = %link.upstream, "relay link up");
                }
            }
        });
    }

    /// The tick up to which everything is committed here: the watermark, and on a relay no more
    /// than every upstream confirmed.
    pub fn tail(&self) -> Tick {
        let watermark = self.log.watermark();
        if self.mirrors.is_empty() {
            return watermark;
        }
        link::confirmed(&self.links.borrow()).map_or(Tick(0), |c| c.min(watermark))
    }

    /// The tail as [`Broker::tail`], after an origin's clock was let reach the wall clock when it
    /// lagged it by more than [`MIN_HEARTBEAT`]: a broker that stored nothing yet, or nothing
    /// lately, answers with the present rather than 0 or a tick long past.
    pub async fn current_tail(&self) -> Result<Tick> {
        let now = Tick::now();
        if self.mirrors.is_empty()
            && self.log.watermark().0.saturating_add(crate::types::nanos(MIN_HEARTBEAT)) < now.0
        {
            self.log.advance(now).await?;
        }
        Ok(self.tail())
    }

    /// What is known of mirror `index`'s link.
    pub fn link(&self, index: usize) -> Option<Link> {
        self.links.borrow().get(index).cloned()
    }

    /// The upstream `stream` is mirrored from and that link's state now.
    pub fn upstream_of(&self, stream: &str) -> Option<UpstreamStatus> {
        let index = self.mirror_of(stream)?;
        self.links.borrow().get(index).map(|l| l.status(Tick::now()))
    }

    /// The subscriptions running now, oldest first.
    pub fn subscriptions(&self) -> Vec<Arc<registry::Progress>> {
        self.registry.running()
    }

    /// The state of every upstream link now (none on an origin).
    pub fn link_statuses(&self) -> Vec<UpstreamStatus> {
        let now = Tick::now();
        self.links.borrow().iter().map(|l| l.status(now)).collect()
    }

    /// The log, for the background tasks that work on it directly (the retention trimmer).
    pub fn log(&self) -> Arc<Log> {
        self.log.clone()
    }

    /// Every stream, as the log knows them.
    pub fn all_streams(&self) -> Vec<StreamInfo> {
        self.log.streams()
    }

    /// Appends a batch atomically; returns its ticks once durable.
    pub async fn publish(&self, batch: impl Into<Batch>) -> Result<Appended> {
        self.submit(batch.into()).await?.await
    }

    fn check(&self, batch: Vec<Incoming>) -> Result<Vec<NewRecord>> {
        let limits = &self.limits;
        if batch.is_empty() {
            return Err(Error::InvalidArgument("a batch must hold at least one record".into()));
        }
        if batch.len() > limits.max_batch_records {
            return Err(Error::Batch(TooLarge::Count {
                what: "records",
                value: batch.len(),
                limit: limits.max_batch_records,
                setting: "max_batch_records",
            }));
        }
        // Headers count with payloads: both are what the batch makes the broker hold and store.
        let total: usize = batch
            .iter()
            .map(|r| r.payload.len() + r.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>())
            .sum();
        if total > limits.max_batch_bytes {
            return Err(Error::Batch(TooLarge::Count {
                what: "bytes",
                value: total,
                limit: limits.max_batch_bytes,
                setting: "max_batch_bytes",
            }));
        }
        let mut names: HashMap<String, StreamName> = HashMap::new();
        batch.into_iter().map(|r| self.check_record(r, &mut names)).collect()
    }

    /// Checks one record of a batch against the limits (`names`: the names parsed so far).
    fn check_record(&self, r: Incoming, names: &mut HashMap<String, StreamName>) -> Result<NewRecord> {
        let stream = match names.get(&r.stream) {
            Some(name) => name.clone(),
            None => {
                let name = StreamName::parse(&r.stream)?;
                names.insert(r.stream.clone(), name.clone());
                name
            }
        };
        let limits = &self.limits;
        if r.payload.len() > limits.max_record_bytes {
            return Err(Error::RecordTooLarge {
                stream: r.stream,
                size: r.payload.len(),
                limit: limits.max_record_bytes,
            });
        }
        let header_bytes: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if header_bytes > limits.max_header_bytes || r.headers.len() > usize::from(u16::MAX) {
            return Err(Error::HeadersTooLarge {
                stream: r.stream,
                count: r.headers.len(),
                size: header_bytes,
                limit: limits.max_header_bytes,
            });
        }
        if r.tick > Tick::MAX.0 {
            return Err(Error::InvalidArgument(format!(
                "explicit tick {} for stream {:?} is above the largest tick {}: ticks must fit a signed 64-bit integer",
                r.tick,
                r.stream,
                Tick::MAX
            )));
        }
        let crc32 = crc32fast::hash(&r.payload);
        if let Some(given) = r.crc32.filter(|&given| given != crc32) {
            return Err(Error::InvalidArgument(format!(
                "record of stream {:?} carries crc32 {given:#010x} but its payload's CRC32 is {crc32:#010x}: the payload was damaged on the way",
                r.stream
            )));
        }
        let mut headers = r.headers;
        headers.sort();
        Ok(NewRecord {
            stream,
            tick: (r.tick != 0).then_some(Tick(r.tick)),
            origin_time: (r.origin_time != 0).then_some(r.origin_time),
            headers,
            payload: r.payload,
            crc32,
        })
    }

    /// Starts a subscription: replay of the asked interval, then the live tail.
    pub fn subscribe(&self, request: SubscribeRequest) -> Result<Events> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if request.streams.is_empty() {
            return Err(Error::InvalidArgument(
                "a subscription must name at least one stream or pattern".into(),
            ));
        }
        if request.streams.len() > self.limits.max_selectors {
            return Err(Error::TooMany {
                what: "streams or patterns in one subscription",
                limit: self.limits.max_selectors,
                setting: "limits.max_selectors",
                hint: "select the streams with fewer patterns (`sensors/**`), or subscribe more than once",
            });
        }
        // One position per stream the client has seen: never more than the store can hold.
        if request.resume.len() > self.limits.max_streams {
            return Err(Error::TooMany {
                what: "streams in one subscription's resume map",
                limit: self.limits.max_streams,
                setting: "limits.max_streams",
                hint: "resume names each stream once, with the last tick received from it",
            });
        }
        let selectors = request.streams.iter().map(|s| Pattern::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let mut resume = HashMap::with_capacity(request.resume.len());
        for (name, tick) in request.resume {
            StreamName::parse(&name)?;
            if !selectors.iter().any(|p| p.matches(&name)) {
                return Err(Error::InvalidArgument(format!(
                    "resume names stream {name:?}, which none of the subscription's streams or patterns selects"
                )));
            }
            resume.insert(name, Tick(tick));
        }
        // NaN fails every comparison, so it is caught by `is_finite` and never reaches the pump.
        if !request.pace.is_finite() || request.pace < 0.0 || request.pace > MAX_PACE {
            return Err(Error::InvalidArgument(format!(
                "pace {} is not a speed factor: pace must be 0 (instant) or a finite factor above 0 and at most {MAX_PACE} (1 = the original timing)",
                request.pace
            )));
        }
        let limits = &self.limits;
        let bytes_per_second = match (
            request.max_bytes_per_second.or(limits.subscribe_bytes_per_second),
            limits.max_subscribe_bytes_per_second,
        ) {
            (Some(asked), Some(ceiling)) => Some(asked.min(ceiling)),
            (asked, ceiling) => asked.or(ceiling),
        };
        let rate_window = request.rate_window.unwrap_or(limits.rate_window);
        if rate_window < Duration::from_millis(10) || rate_window > Duration::from_secs(3600) {
            return Err(Error::InvalidArgument(format!(
                "rate window of {rate_window:?} is out of range: it must be from 10 ms to 1 h"
            )));
        }
        let slot = self.subscription_slots.clone().try_acquire_owned().map_err(|_| Error::TooMany {
            what: "subscriptions at once",
            limit: limits.max_subscriptions,
            setting: "limits.max_subscriptions",
            hint: "retry later, or end subscriptions you no longer read",
        })?;
        let spec = Spec {
            selectors,
            start: request.start,
            resume,
            end: request.end.map(Tick),
            heartbeat: request.heartbeat.map_or(self.heartbeat, |h| h.max(MIN_HEARTBEAT)),
            links: (!self.mirrors.is_empty()).then(|| self.links.subscribe()),
            pace: (request.pace > 0.0).then_some(request.pace),
            rate: bytes_per_second.map(|bytes_per_second| Rate { bytes_per_second, window: rate_window }),
            slow: request.slow,
            max_lag: request.max_lag.unwrap_or(limits.max_lag),
            readable: request.readable,
        };
        let share = subscription::Share::join(&self.subscriptions);
        let progress = self.registry.enter(request.client, request.streams, spec.slow);
        let entered = progress.progress();
        info!(
            subscription = entered.id,
            peer = %entered.client.peer,
            principal = %entered.client.principal,
            streams = %entered.selection_text(),
            start = ?spec.start,
            resume = spec.resume.len(),
            "subscription started"
        );
        Ok(subscription::spawn(
            self.log.clone(),
            spec,
            self.shutdown.clone(),
            &self.tasks,
            slot,
            share,
            progress,
        ))
    }

    /// A page of `ListStreams`: up to `size` (at most [`MAX_LIST_PAGE`]) streams matching
    /// `pattern` that `visible` lets the caller see, in name order, after `after`; and the name to
    /// continue after, when more follow.
    pub fn streams_page(
        &self,
        pattern: Option<&str>,
        after: Option<&str>,
        size: usize,
        visible: impl Fn(&str) -> bool,
    ) -> Result<(Vec<StreamInfo>, Option<String>)> {
        let pattern = pattern.map(Pattern::parse).transpose()?;
        let size = if size == 0 { MAX_LIST_PAGE } else { size.min(MAX_LIST_PAGE) };
        let (page, more) = self.log.streams_page(after, size, |s| {
            pattern.as_ref().is_none_or(|p| p.matches(&s.name)) && visible(&s.name)
        });
        let next = if more { page.last().map(|s| s.name.to_string()) } else { None };
        Ok((page, next))
    }

    /// Creates a stream with metadata, or changes an existing one's when `update` (see
    /// [`Log::define`]). A relay refuses: its streams are its upstream's.
    pub async fn create_stream(&self, name: &str, meta: StreamMeta, update: bool) -> Result<StreamInfo> {
        let name = StreamName::parse(name)?;
        self.refuse_on_relay(name.as_str())?;
        for (field, value, limit) in [
            ("content_type", &meta.content_type, 255),
            ("schema_version", &meta.schema_version, 255),
            ("description", &meta.description, 4096),
        ] {
            if value.len() > limit || value.chars().any(char::is_control) {
                return Err(Error::InvalidArgument(format!(
                    "{field} of stream {name} is invalid: it must be at most {limit} bytes without control characters"
                )));
            }
        }
        crate::config::validate_policy(&meta.retention, "CreateStream retention")?;
        self.catalog_change()?;
        self.log.define(name, meta, update, None).await
    }

    /// Ends the import of a stream created with `importing` (see [`Log::seal`]). A relay refuses.
    pub async fn seal_stream(&self, name: &str) -> Result<StreamInfo> {
        StreamName::parse(name)?;
        self.refuse_on_relay(name)?;
        self.catalog_change()?;
        self.log.seal(name).await
    }

    /// Deletes a stream and every record of it. A relay refuses.
    pub async fn delete_stream(&self, name: &str) -> Result<StreamInfo> {
        StreamName::parse(name)?;
        self.refuse_on_relay(name)?;
        self.catalog_change()?;
        self.log.delete(name).await
    }

    /// Counts one client's catalog change against `limits.catalog_changes_per_second` (bursts of
    /// a second's worth): each is a record the one writer that also commits every publish must
    /// write and sync (with the next group commit), so a flood of them is refused rather than
    /// queued.
    fn catalog_change(&self) -> Result<()> {
        let now = tokio::time::Instant::now();
        let mut rate = self.catalog_rate.lock().unwrap_or_else(|e| e.into_inner());
        if rate.due(now) > now {
            return Err(Error::TooMany {
                what: "stream creations, updates, seals and deletions per second",
                limit: usize::try_from(self.limits.catalog_changes_per_second).unwrap_or(usize::MAX),
                setting: "limits.catalog_changes_per_second",
                hint: "retry in a moment",
            });
        }
        rate.record(1, now);
        Ok(())
    }

    /// On a relay, every write is refused, naming the upstream `stream` comes from (or the first).
    fn refuse_on_relay(&self, stream: &str) -> Result<()> {
        match (self.mirror_of(stream), self.mirrors.first()) {
            (_, None) => Ok(()),
            (index, Some((first, _))) => Err(Error::Mirrored {
                stream: stream.to_string(),
                upstream: index.map_or(&first.upstream, |i| &self.mirrors[i].0.upstream).clone(),
            }),
        }
    }

    /// The retention that applies to a stream: its own limits over the server's.
    pub fn retention_of(&self, stream: &StreamInfo) -> crate::types::Policy {
        self.retention.policy_of(stream)
    }

    /// One stream.
    pub fn stream(&self, name: &str) -> Result<StreamInfo> {
        StreamName::parse(name)?;
        self.log.stream(name).ok_or_else(|| Error::UnknownStream(name.to_string()))
    }

    /// Answers a client's hello: refuses a protocol version this server does not speak, and
    /// adds the operator's notice for a client older than the recommended version.
    pub async fn hello(&self, protocol_version: u32, client_version: &str) -> Result<ServerInfo> {
        let current = PROTOCOL_VERSIONS[PROTOCOL_VERSIONS.len() - 1];
        let chosen = match protocol_version {
            0 => current,
            v if PROTOCOL_VERSIONS.contains(&v) => v,
            v => {
                return Err(Error::UnsupportedProtocol { version: v, supported: PROTOCOL_VERSIONS.to_vec() })
            }
        };
        Ok(ServerInfo {
            server_id: self.log.server_id().to_string(),
            server_version: env!("CARGO_PKG_VERSION"),
            protocol_versions: PROTOCOL_VERSIONS.to_vec(),
            protocol_version: chosen,
            tail_tick: self.current_tail().await?,
            notice: self.notice.clone().filter(|n| n.applies_to(client_version)),
        })
    }

    /// The broker's shutdown signal.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for every subscription to end, then commits what is queued and flushes the log.
    /// Call after the shutdown token was cancelled.
    pub async fn close(&self) -> Result<()> {
        self.tasks.close();
        // Subscription tasks end within seconds of the shutdown signal; never hang on one.
        if tokio::time::timeout(CLOSE_TIMEOUT, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                tasks = self.tasks.len(),
                "subscriptions did not end in time; closing the log anyway"
            );
        }
        self.log.close().await?;
        info!("broker closed");
        Ok(())
    }
}
