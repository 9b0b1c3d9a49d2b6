//! The client library: a [`Subscriber`] that never loses its place, and a [`Publisher`] that never
//! appends a batch twice. The CLI's `tail` and `publish` and the relay are built on them.
//!
//! A subscriber keeps, per stream, the last tick it delivered, plus the highest tick up to which
//! it has seen everything (as the server says it: a batch's `complete_to`, `CaughtUp`, heartbeats).
//! After any failure it reconnects, to the next of its endpoints, with exponential backoff and
//! jitter, and resumes with `resume` = those positions and `after` = that tick for streams it has
//! not seen yet. Ticks are assigned by the origin and kept by every relay, so the positions are
//! valid at any endpoint that serves the same origin: switching endpoints gives no gap and no
//! duplicate.
//!
//! A publisher pipelines batches over one `PublishStream` with a bounded window. Every batch carries
//! the producer id and a sequence number; after a failure it reconnects and sends the unacknowledged
//! batches again, in order, and the broker acknowledges those it had already appended with the
//! ticks it gave them the first time.

use crate::error::{Error, Result};
use crate::grpc::pb;
use pb::subscribe_request::Start;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{debug, warn};

/// Largest message a client sends or accepts: a batch can carry a record of any size the server
/// allows.
pub const MAX_MESSAGE: usize = 256 << 20;

/// HTTP/2 flow-control window of one call, in bytes, on both sides: room for a whole batch of
/// records (a subscription sends about 128 KiB at once, or one larger record) instead of h2's
/// default 64 KiB.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window of a whole connection, in bytes: several calls at full speed.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame each side accepts: fewer frames per batch than h2's default 16 KiB.
pub const FRAME_SIZE: u32 = 1 << 20;

/// A client of one server.
pub type Client = pb::tapeline_client::TapelineClient<Channel>;

/// Connects to a server and returns a client that accepts large batches.
pub async fn connect(server: &str) -> Result<Client> {
    let refused = |detail: String| Error::Remote {
        action: "connect",
        detail: format!("cannot reach {server}: {detail}"),
    };
    let endpoint = Endpoint::from_shared(server.to_string()).map_err(|e| refused(chain(&e)))?;
    let channel = endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| refused(chain(&e)))?;
    Ok(Client::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
}

/// An error and its sources, on one line: transport errors hide the useful part in the chain.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A gRPC status as an error of `action`.
pub fn remote(action: &'static str, status: &Status) -> Error {
    Error::Remote { action, detail: format!("{:?}: {}", status.code(), status.message()) }
}

/// Whether a status may go away by itself (retry later or elsewhere) rather than name a mistake
/// in the request that a retry would repeat.
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// Exponential backoff with jitter between reconnection attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The wait after the first failure.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

impl Backoff {
    /// The wait after `failures` consecutive failures (from 1): doubling from `initial` up to `max`,
    /// then a random point in its upper half, so clients cut at once do not return at once.
    pub fn delay(&self, failures: u32) -> Duration {
        let doubled = self.initial.saturating_mul(1 << failures.saturating_sub(1).min(20));
        let ceiling = doubled.min(self.max);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rand::random::<f64>())
    }
}

/// What a [`Subscriber`] is asked for.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Servers of the same origin (the origin and its relays), tried in turn.
    pub endpoints: Vec<String>,
    /// Stream names or patterns.
    pub streams: Vec<String>,
    /// Where streams start before anything was delivered.
    pub start: Start,
    /// Last tick to deliver (inclusive); `None` follows the live tail.
    pub end: Option<u64>,
    /// Heartbeat interval to ask the server for; silence of three intervals counts as a failure.
    pub heartbeat: Duration,
    /// Paced delivery: 0 = as fast as possible, otherwise the speed factor of the recorded timing
    /// (1 = original). After a reconnection the pacing starts again from the next record.
    pub pace: f64,
    /// Record bytes per second at most (0 = the server's default quota).
    pub max_bytes_per_second: u64,
    /// What the server does when this subscriber falls behind the live tail (a `Disconnect`
    /// failure is resumed from like any other).
    pub slow_consumer: pb::SlowConsumer,
    pub backoff: Backoff,
}

impl SubscribeOptions {
    /// A live subscription to `streams` on `endpoint` from `start`, with default timing.
    pub fn new(endpoint: impl Into<String>, streams: Vec<String>, start: Start) -> Self {
        SubscribeOptions {
            endpoints: vec![endpoint.into()],
            streams,
            start,
            end: None,
            heartbeat: Duration::from_secs(2),
            pace: 0.0,
            max_bytes_per_second: 0,
            slow_consumer: pb::SlowConsumer::CatchUp,
            backoff: Backoff::default(),
        }
    }
}

/// What a [`Subscriber`] hands the application, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Records in `(tick, stream)` order, each delivered once across reconnections.
    Records(Vec<pb::Record>),
    /// The replay reached the tail of the server it came from.
    CaughtUp(u64),
    Heartbeat(pb::Heartbeat),
    StreamAdded(pb::StreamInfo),
    /// A relay's upstream link changed.
    Upstream(pb::UpstreamStatus),
    /// Retention removed part of a stream's range before it could be delivered; the stream goes
    /// on after `through`.
    Truncated(pb::Truncated),
    /// A selected stream's metadata changed, or it was deleted.
    StreamChanged(pb::StreamChanged),
    /// The server skipped records because this subscriber was too slow (`SlowConsumer::Latest`).
    Gap(pb::Gap),
    /// Subscribed at `endpoint` (first time or after a failure).
    Connected {
        endpoint: String,
    },
    /// The subscription at `endpoint` failed; the next attempt is in `retry_in`.
    Disconnected {
        endpoint: String,
        cause: String,
        retry_in: Duration,
    },
}

/// A subscription that survives failures: see the module documentation.
pub struct Subscriber {
    options: SubscribeOptions,
    /// Last tick delivered per stream.
    positions: HashMap<String, u64>,
    /// Every record up to this tick was delivered (or does not exist).
    seen_up_to: Option<u64>,
    /// Index of the endpoint in use or to try next.
    current: usize,
    /// Consecutive failures without a message in between.
    failures: u32,
    /// Records a server delivered again at or before their stream's position, dropped here.
    duplicates: u64,
    /// A subscription was opened at least once.
    opened: bool,
    wait: Option<Duration>,
    stream: Option<Streaming<pb::SubscribeResponse>>,
    finished: bool,
}

impl Subscriber {
    /// A subscriber that connects on the first call to [`Subscriber::next`].
    pub fn new(options: SubscribeOptions) -> Result<Subscriber> {
        if options.endpoints.is_empty() {
            return Err(Error::InvalidArgument("a subscriber needs at least one endpoint".into()));
        }
        for endpoint in &options.endpoints {
            Endpoint::from_shared(endpoint.clone()).map_err(|_| {
                Error::InvalidArgument(format!(
                    "endpoint {endpoint:?} is not a URL such as http://127.0.0.1:7411"
                ))
            })?;
        }
        // What lies before the start counts as seen: a reconnection never asks for it.
        let seen_up_to = match options.start {
            Start::After(t) => Some(t),
            Start::At(t) => t.checked_sub(1).filter(|&t| t > 0),
            Start::Beginning(_) | Start::Now(_) => None,
        };
        Ok(Subscriber {
            options,
            positions: HashMap::new(),
            seen_up_to,
            current: 0,
            failures: 0,
            duplicates: 0,
            opened: false,
            wait: None,
            stream: None,
            finished: false,
        })
    }

    /// Starts from known positions, e.g. those of another subscriber of the same origin.
    pub fn resume_from(mut self, positions: HashMap<String, u64>, seen_up_to: Option<u64>) -> Subscriber {
        self.positions = positions;
        self.seen_up_to = seen_up_to;
        self
    }

    /// Records a server delivered twice, which this subscriber dropped (0 unless a server broke
    /// its promise).
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates
    }

    /// The last tick delivered per stream.
    pub fn positions(&self) -> &HashMap<String, u64> {
        &self.positions
    }

    /// The tick up to which everything was delivered.
    pub fn seen_up_to(&self) -> Option<u64> {
        self.seen_up_to
    }

    /// The endpoint in use (or to be tried next).
    pub fn endpoint(&self) -> &str {
        &self.options.endpoints[self.current]
    }

    /// The deliveries as a `Stream`, for code built on stream combinators.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Delivery>> {
        futures::stream::unfold(self, |mut subscriber| async move {
            let next = subscriber.next().await?;
            Some((next, subscriber))
        })
    }

    /// The next delivery; `None` once a bounded subscription delivered its end. An `Err` is final:
    /// the request itself was refused (a retry would repeat the refusal).
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(wait) = self.wait.take() {
                tokio::time::sleep(wait).await;
            }
            let endpoint = self.endpoint().to_string();
            let silence = self.heartbeat() * 3 + Duration::from_secs(1);
            let Some(stream) = self.stream.as_mut() else {
                // Nothing is left to ask for; before the first connection the server judges the
                // request instead (an `end` before the start is a mistake to report).
                let done =
                    self.options.end.is_some_and(|end| self.seen_up_to.is_some_and(|seen| seen >= end));
                if done && self.opened {
                    self.finished = true;
                    return None;
                }
                match self.open(&endpoint).await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.opened = true;
                        return Some(Ok(Delivery::Connected { endpoint }));
                    }
                    Err(status) => match self.failed(&endpoint, &status) {
                        Some(delivery) => return Some(Ok(delivery)),
                        None => return Some(Err(remote("subscribe", &status))),
                    },
                }
            };
            let message = match tokio::time::timeout(silence, stream.message()).await {
                Ok(message) => message,
                Err(_) => Err(Status::unavailable(format!("no message for {silence:?}"))),
            };
            match message {
                Ok(Some(response)) => {
                    if let Some(delivery) = self.absorb(response) {
                        // Progress (not a relay's opening status) ends a run of failures.
                        if matches!(
                            delivery,
                            Delivery::Records(_) | Delivery::CaughtUp(_) | Delivery::Heartbeat(_)
                        ) {
                            self.failures = 0;
                        }
                        return Some(Ok(delivery));
                    }
                }
                // A bounded subscription's last message confirms its end; a stream closed before
                // that was cut short (e.g. the server's final error was lost) and resumes.
                Ok(None) if self.options.end.is_some_and(|end| self.seen_up_to.is_some_and(|s| s >= end)) => {
                    self.finished = true;
                    return None;
                }
                Ok(None) => {
                    let status = Status::unavailable("the server ended the subscription");
                    return self.failed(&endpoint, &status).map(Ok);
                }
                Err(status) => match self.failed(&endpoint, &status) {
                    Some(delivery) => return Some(Ok(delivery)),
                    None => return Some(Err(remote("subscribe", &status))),
                },
            }
        }
    }

    /// After a failure: the `Disconnected` delivery and the next attempt, or `None` when the
    /// failure is final.
    fn failed(&mut self, endpoint: &str, status: &Status) -> Option<Delivery> {
        self.stream = None;
        let endpoints = self.options.endpoints.len();
        // Damaged data at one server may be whole at another.
        let retry = transient(status.code()) || (status.code() == Code::DataLoss && endpoints > 1);
        if !retry {
            self.finished = true;
            return None;
        }
        self.failures += 1;
        self.current = (self.current + 1) % endpoints;
        // The other endpoints are tried at once; backoff starts once each has failed.
        let rounds = self.failures.saturating_sub(endpoints as u32 - 1);
        let retry_in = if rounds == 0 { Duration::ZERO } else { self.options.backoff.delay(rounds) };
        self.wait = Some(retry_in);
        let cause = format!("{:?}: {}", status.code(), status.message());
        debug!(%endpoint, %cause, ?retry_in, "subscription lost");
        Some(Delivery::Disconnected { endpoint: endpoint.to_string(), cause, retry_in })
    }

    /// The request that continues exactly where the deliveries so far end.
    pub fn request(&self) -> pb::SubscribeRequest {
        let start = match self.seen_up_to {
            Some(tick) => Start::After(tick),
            None => self.options.start,
        };
        pb::SubscribeRequest {
            streams: self.options.streams.clone(),
            start: Some(start),
            resume: self.positions.clone(),
            end: self.options.end,
            heartbeat_ms: u32::try_from(self.heartbeat().as_millis()).unwrap_or(u32::MAX),
            pace: self.options.pace,
            max_bytes_per_second: self.options.max_bytes_per_second,
            slow_consumer: self.options.slow_consumer.into(),
            ..Default::default()
        }
    }

    /// The heartbeat interval asked for; the server does not go below 100 ms.
    fn heartbeat(&self) -> Duration {
        self.options.heartbeat.max(Duration::from_millis(100))
    }

    async fn open(&self, endpoint: &str) -> std::result::Result<Streaming<pb::SubscribeResponse>, Status> {
        let mut client = connect(endpoint).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(client.subscribe(self.request()).await?.into_inner())
    }

    /// Updates the positions from one response; `None` for responses the application need not see.
    fn absorb(&mut self, response: pb::SubscribeResponse) -> Option<Delivery> {
        use pb::subscribe_response::Event;
        let seen = |tick: u64, seen_up_to: &mut Option<u64>| {
            *seen_up_to = Some(seen_up_to.map_or(tick, |s| s.max(tick)));
        };
        Some(match response.event? {
            Event::Records(batch) => {
                let mut fresh = Vec::with_capacity(batch.records.len());
                for record in batch.records {
                    // A record at or before its stream's position was delivered already: possible
                    // only if a server broke its promise, and never handed on twice.
                    if self.positions.get(&record.stream).is_some_and(|&p| record.tick <= p) {
                        warn!(stream = %record.stream, tick = record.tick, "record delivered twice by the server; dropped");
                        self.duplicates += 1;
                        continue;
                    }
                    self.positions.insert(record.stream.clone(), record.tick);
                    fresh.push(record);
                }
                // Only the server knows how far the delivery is complete (a relay of several
                // upstreams may send records past what a slower one confirmed): not the ticks.
                if batch.complete_to > 0 {
                    seen(batch.complete_to, &mut self.seen_up_to);
                }
                Delivery::Records(fresh)
            }
            Event::CaughtUp(c) => {
                if c.tick > 0 {
                    seen(c.tick, &mut self.seen_up_to);
                }
                Delivery::CaughtUp(c.tick)
            }
            Event::Heartbeat(h) => {
                if h.tail_tick > 0 {
                    seen(h.tail_tick, &mut self.seen_up_to);
                }
                Delivery::Heartbeat(h)
            }
            Event::StreamAdded(a) => {
                let info = a.stream.unwrap_or_default();
                // A stream that appears later starts where the subscription started, and a
                // reconnection resumes it from there: records given explicit ticks below what was
                // seen (an imported session) are not skipped.
                let floor = match self.options.start {
                    Start::After(t) => t,
                    Start::At(t) => t.saturating_sub(1),
                    Start::Beginning(_) | Start::Now(_) => 0,
                };
                self.positions.entry(info.name.clone()).or_insert(floor);
                Delivery::StreamAdded(info)
            }
            Event::UpstreamStatus(u) => Delivery::Upstream(u),
            Event::StreamChanged(c) => Delivery::StreamChanged(c),
            Event::Gap(g) => {
                // Skipped on purpose: a reconnection goes on after it too.
                let position = self.positions.entry(g.stream.clone()).or_insert(g.to_tick);
                *position = (*position).max(g.to_tick);
                Delivery::Gap(g)
            }
            Event::Truncated(t) => {
                // What was removed is behind the stream now: a reconnection resumes after it.
                let position = self.positions.entry(t.stream.clone()).or_insert(t.through);
                *position = (*position).max(t.through);
                Delivery::Truncated(t)
            }
        })
    }
}

/// What a [`Publisher`] is asked for.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The server that stores the streams (an origin; a relay refuses mirrored streams).
    pub endpoint: String,
    /// Identifies this producer to the broker across reconnections. Reuse it across restarts of the
    /// producer only together with sequence numbers that keep increasing (the default start does).
    pub producer_id: String,
    /// Sequence numbers are above this one, and at least the wall clock in microseconds, so that
    /// they keep increasing across restarts of a producer that keeps its id.
    pub first_sequence: u64,
    /// Batches sent and not yet acknowledged, at most; at most 128, the batches the broker
    /// remembers of a producer (a larger window could resend a batch it no longer recognises).
    pub window: usize,
    /// A connection with batches in flight and no ack for this long counts as failed.
    pub ack_timeout: Duration,
    pub backoff: Backoff,
}

impl PublishOptions {
    /// Options for `endpoint` with a fresh random producer id whose sequence starts at the current
    /// time in microseconds, so it keeps increasing even if the id is reused after a restart.
    pub fn new(endpoint: impl Into<String>) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        PublishOptions {
            endpoint: endpoint.into(),
            producer_id: format!("tapeline-{:016x}", rand::random::<u64>()),
            first_sequence: u64::try_from(now.as_micros()).unwrap_or(1).max(1),
            window: 64,
            ack_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
        }
    }
}

/// The broker's answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The batch's sequence number (also its `batch_id`).
    pub sequence: u64,
    /// The tick of each record, in the order they were sent.
    pub ticks: Vec<u64>,
    /// The batch had been appended before (its first ack was lost); these are its ticks from then.
    pub duplicate: bool,
}

/// A pipelining, retrying publisher: see the module documentation. Batches go in through
/// [`Publisher::send`] (or a [`Batches`] handle); their acks come out of [`Publisher::ack`] in the
/// same order. Read the acks while sending (from another task when the sending may block): the
/// publisher stops taking batches while acks wait unread.
pub struct Publisher {
    batches: Option<Batches>,
    acks: mpsc::Receiver<Result<Ack>>,
}

/// A handle that sends batches into a [`Publisher`]; the input ends when the publisher was
/// finished and every handle dropped.
#[derive(Debug, Clone)]
pub struct Batches(mpsc::Sender<Vec<pb::Record>>);

impl Batches {
    /// Queues a batch; waits while the window is full. Fails only if the publisher has stopped.
    pub async fn send(&self, records: Vec<pb::Record>) -> Result<()> {
        self.0
            .send(records)
            .await
            .map_err(|_| Error::Remote { action: "publish", detail: "the publisher has stopped".into() })
    }
}

impl Publisher {
    /// Starts the publisher's task (it connects at once and reconnects as needed).
    pub fn start(mut options: PublishOptions) -> Publisher {
        options.window = options.window.clamp(1, crate::store::producers::WINDOW);
        let window = options.window;
        let (batches, input) = mpsc::channel(window);
        let (acks_tx, acks) = mpsc::channel(window);
        tokio::spawn(
            Pipeline { options, input: Some(input), acks: acks_tx, in_flight: VecDeque::new() }.run(),
        );
        Publisher { batches: Some(Batches(batches)), acks }
    }

    /// Queues a batch; waits while the window is full. Fails only if the publisher has stopped
    /// or was finished.
    pub async fn send(&self, records: Vec<pb::Record>) -> Result<()> {
        match &self.batches {
            Some(batches) => batches.send(records).await,
            None => Err(Error::Remote { action: "publish", detail: "the publisher was finished".into() }),
        }
    }

    /// A handle to send batches from another task.
    pub fn batches(&self) -> Option<Batches> {
        self.batches.clone()
    }

    /// No more batches: the acks end after the last one's.
    pub fn finish(&mut self) {
        self.batches = None;
    }

    /// The next ack, in sending order; `Err` for a batch the broker refused (the others go on);
    /// `None` once every batch was answered after [`Publisher::finish`].
    pub async fn ack(&mut self) -> Option<Result<Ack>> {
        self.acks.recv().await
    }
}

/// The task behind a [`Publisher`].
struct Pipeline {
    options: PublishOptions,
    /// `None` once the application finished.
    input: Option<mpsc::Receiver<Vec<pb::Record>>>,
    acks: mpsc::Sender<Result<Ack>>,
    /// Sent and not yet acknowledged, in order.
    in_flight: VecDeque<pb::PublishRequest>,
}

impl Pipeline {
    async fn run(mut self) {
        let mut sequence = self.options.first_sequence;
        let mut failures = 0u32;
        loop {
            match self.connection(&mut sequence, &mut failures).await {
                Ok(()) => return,
                // On the stream itself (a batch's own refusal comes in its ack), too large a
                // message is not going to pass on a retry.
                Err(status) if transient(status.code()) && status.code() != Code::ResourceExhausted => {
                    failures += 1;
                    let wait = self.options.backoff.delay(failures);
                    warn!(endpoint = %self.options.endpoint, cause = %status.message(), in_flight = self.in_flight.len(), ?wait, "publishing interrupted; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(status) => {
                    // The stream itself was refused: every batch in flight fails with it.
                    for batch in self.in_flight.drain(..) {
                        let _ = self.acks.send(Err(refused(batch.sequence, &status))).await;
                    }
                    let _ = self.acks.send(Err(remote("publish", &status))).await;
                    return;
                }
            }
        }
    }

    /// One `PublishStream`: sends the batches in flight again, then new ones, until every batch
    /// was answered after the input ended (`Ok`) or the connection failed.
    async fn connection(
        &mut self,
        sequence: &mut u64,
        failures: &mut u32,
    ) -> std::result::Result<(), Status> {
        if self.input.is_none() && self.in_flight.is_empty() {
            return Ok(());
        }
        let mut client =
            connect(&self.options.endpoint).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(self.options.window.max(1) + 1);
        for batch in &self.in_flight {
            let _ = tx.try_send(batch.clone());
        }
        let mut tx = if self.input.is_some() { Some(tx) } else { None };
        let mut acks = client.publish_stream(ReceiverStream::new(rx)).await?.into_inner();
        loop {
            let room = self.in_flight.len() < self.options.window.max(1);
            tokio::select! {
                ack = tokio::time::timeout(self.options.ack_timeout, acks.message()), if !self.in_flight.is_empty() || tx.is_none() => {
                    let ack = match ack {
                        Ok(ack) => ack?,
                        Err(_) => return Err(Status::unavailable(format!("no ack for {:?}", self.options.ack_timeout))),
                    };
                    let Some(ack) = ack else {
                        return if self.in_flight.is_empty() && self.input.is_none() {
                            Ok(())
                        } else {
                            Err(Status::unavailable("the server ended the publish stream"))
                        };
                    };
                    *failures = 0;
                    if self.in_flight.front().is_none_or(|b| b.batch_id != ack.batch_id) {
                        return Err(Status::internal(format!("ack for batch {} out of order", ack.batch_id)));
                    }
                    let Some(batch) = self.in_flight.pop_front() else { continue };
                    let answer = match ack.error {
                        Some(err) => Err(refused(batch.sequence, &Status::new(Code::from(err.code), err.message))),
                        None => Ok(Ack { sequence: batch.sequence, ticks: ack.ticks, duplicate: ack.duplicate }),
                    };
                    if self.acks.send(answer).await.is_err() {
                        return Ok(());
                    }
                }
                batch = recv(&mut self.input), if room && tx.is_some() => {
                    let Some(records) = batch else {
                        // No more input: ending the stream lets the server answer what is left.
                        self.input = None;
                        tx = None;
                        continue;
                    };
                    *sequence = (*sequence + 1).max(micros_now());
                    let request = pb::PublishRequest {
                        records,
                        batch_id: *sequence,
                        producer_id: self.options.producer_id.clone(),
                        sequence: *sequence,
                    };
                    self.in_flight.push_back(request.clone());
                    if let Some(tx) = &tx {
                        if tx.send(request).await.is_err() {
                            return Err(Status::unavailable("the publish stream closed"));
                        }
                    }
                }
            }
        }
    }
}

/// The next batch, or `None` when the input ended (or was already gone).
async fn recv(input: &mut Option<mpsc::Receiver<Vec<pb::Record>>>) -> Option<Vec<pb::Record>> {
    match input {
        Some(input) => input.recv().await,
        None => None,
    }
}

fn micros_now() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_micros()).unwrap_or(0)
}

fn refused(sequence: u64, status: &Status) -> Error {
    Error::Remote {
        action: "publish",
        detail: format!("batch {sequence} refused: {:?}: {}", status.code(), status.message()),
    }
}
