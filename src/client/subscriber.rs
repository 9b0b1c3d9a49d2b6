//! The [`Subscriber`]: a subscription that resumes where its deliveries end, at any endpoint of
//! the same origin.

use super::{connect_with, remote, transient, Backoff, Credentials, Error, Record, Result};
use crate::protocol::pb;
use pb::subscribe_request::Start;
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Endpoint;
use tonic::{Code, Status, Streaming};
use tracing::{debug, warn};

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
    /// TLS trust, client certificate and token, the same at every endpoint.
    pub credentials: Credentials,
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
            credentials: Credentials::default(),
        }
    }
}

/// What a [`Subscriber`] hands the application, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Records in `(tick, stream)` order, each delivered once across reconnections.
    Records(Vec<Record>),
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
                // Nothing is left to ask for (after the first connection: before it, the server
                // judges the request and ends an empty interval at once).
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
            end: self.options.end.unwrap_or(0),
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
        let mut client = connect_with(endpoint, &self.options.credentials)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
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
                    fresh.push(Record::from(record));
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
                // A stream that appears later is read from where the subscription started, or
                // whole when it became visible after that (an import sealed since), and a
                // reconnection resumes it from there, not from what was seen of other streams.
                let start = match self.options.start {
                    Start::After(t) => t,
                    Start::At(t) => t.saturating_sub(1),
                    Start::Beginning(_) | Start::Now(_) => 0,
                };
                let floor = if info.created_tick <= start { start } else { 0 };
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
