//! Relay mode: copies the streams matching some patterns from an upstream tapeline into this one,
//! ticks and records unchanged, and serves them like any other stream.
//!
//! One task per upstream. It subscribes with the client library's [`Subscriber`] (which reconnects
//! with backoff by itself) and stores each received batch through the broker before it reads the
//! next, so what is stored is always a prefix of the upstream's delivery order. Whenever storing
//! fails, or the task starts, it rebuilds its positions from what is stored: per mirrored stream
//! its last tick, and for streams it has never seen, the newest tick it stored. Since the upstream
//! delivers in `(tick, stream)` order, that resumes with no gap and no duplicate.
//!
//! The task also keeps its [`Link`]: whether the upstream is reachable, up to which tick the
//! upstream confirmed this relay has everything (records and heartbeats), and what the upstream
//! reported of its own links, so health and lag travel down a chain of relays.

use crate::broker::Broker;
use crate::client::{Backoff, Delivery, SubscribeOptions, Subscriber};
use crate::error::{Error, Result};
use crate::grpc::{self, pb};
use crate::names::Pattern;
use crate::record::Tick;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often a relay asks its upstream for a heartbeat: the resolution of its lag when quiet.
const UPSTREAM_HEARTBEAT: Duration = Duration::from_secs(1);

/// Where a mirror starts the first time; afterwards it resumes from what it stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorFrom {
    /// Everything the upstream has.
    Beginning,
    /// What the upstream appends from now on.
    Now,
    /// What the upstream appended in this last span of time, then live.
    Ago(Duration),
}

impl std::str::FromStr for MirrorFrom {
    type Err = Error;

    fn from_str(value: &str) -> Result<MirrorFrom> {
        let wrong = || Error::Config {
            key: "mirror-from",
            value: value.to_string(),
            expected: "beginning, now, or -DURATION such as -10m",
        };
        match value {
            "beginning" => Ok(MirrorFrom::Beginning),
            "now" => Ok(MirrorFrom::Now),
            v => {
                let span = v.strip_prefix('-').ok_or_else(wrong)?;
                humantime::parse_duration(span).map(MirrorFrom::Ago).map_err(|_| wrong())
            }
        }
    }
}

/// One upstream and the streams copied from it.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// The upstream's URL (an origin or another relay).
    pub upstream: String,
    /// Names or patterns of the mirrored streams.
    pub patterns: Vec<String>,
    pub from: MirrorFrom,
}

impl Mirror {
    /// Checks the URL and the patterns.
    pub fn validate(&self) -> Result<()> {
        tonic::transport::Endpoint::from_shared(self.upstream.clone()).map_err(|_| Error::Config {
            key: "upstream",
            value: self.upstream.clone(),
            expected: "a URL such as http://10.0.0.5:7411",
        })?;
        if self.patterns.is_empty() {
            return Err(Error::Config {
                key: "mirror",
                value: String::new(),
                expected:
                    "at least one stream name or pattern to mirror from the upstream (--mirror PATTERN)",
            });
        }
        for pattern in &self.patterns {
            Pattern::parse(pattern)?;
        }
        Ok(())
    }
}

/// The state of one upstream link as subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStatus {
    pub upstream: String,
    /// This relay reaches the upstream, and the upstream reaches the origin.
    pub connected: bool,
    /// How far behind the origin this relay's copy may be.
    pub lag: Duration,
    /// Why the link is down; empty when connected.
    pub detail: String,
}

/// What a relay knows of one link; its status is computed from it at any moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub upstream: String,
    /// This relay's subscription to the upstream is up.
    pub connected: bool,
    /// Why it is not.
    pub detail: String,
    /// Everything the upstream holds up to this tick is stored here: the last stored record's
    /// tick, or the tail of an upstream heartbeat or `CaughtUp` that arrived after everything
    /// before it was stored. A relay's clock may be advanced this far and no further.
    pub confirmed: Option<Tick>,
    /// This relay's copy was current as of this time (by the origin's clock): a stored record's
    /// tick, or an upstream heartbeat's time less the upstream's own lag.
    pub fresh: Option<Tick>,
    /// The upstream's own links, as it last reported them (empty for an origin).
    pub beyond: Vec<UpstreamStatus>,
}

impl Link {
    /// A link not connected yet.
    pub fn new(upstream: &str) -> Link {
        Link {
            upstream: upstream.to_string(),
            connected: false,
            detail: "not connected yet".into(),
            confirmed: None,
            fresh: None,
            beyond: Vec::new(),
        }
    }

    /// The link's status at `now`: the lag is the time since the copy was last known current; a
    /// link is connected only if every link up to the origin is.
    pub fn status(&self, now: Tick) -> UpstreamStatus {
        let lag = match self.fresh {
            Some(fresh) => Duration::from_nanos(now.0.saturating_sub(fresh.0)),
            // Never confirmed: as stale as can be told.
            None => Duration::from_nanos(now.0),
        };
        let broken = self.beyond.iter().find(|b| !b.connected);
        let detail = if !self.connected {
            self.detail.clone()
        } else if let Some(b) = broken {
            format!("{} reports its upstream {} down: {}", self.upstream, b.upstream, b.detail)
        } else {
            String::new()
        };
        UpstreamStatus {
            upstream: self.upstream.clone(),
            connected: self.connected && broken.is_none(),
            lag,
            detail,
        }
    }

    /// Something arrived: the link is up (only now, not at connection time, so a relay that
    /// cannot store what it receives does not flap between up and down).
    fn heard(&mut self) {
        self.connected = true;
        self.detail.clear();
    }

    fn confirm(&mut self, tick: Tick) {
        self.confirmed = Some(self.confirmed.map_or(tick, |c| c.max(tick)));
    }

    fn fresh_at(&mut self, tick: Tick) {
        self.fresh = Some(self.fresh.map_or(tick, |f| f.max(tick)));
    }
}

/// The tick every link confirmed: how far a relay's tail may go (`None` before all confirmed).
pub fn confirmed(links: &[Link]) -> Option<Tick> {
    links.iter().map(|l| l.confirmed).min().flatten()
}

/// Copies `mirror` (the broker's mirror number `index`) until `shutdown`.
pub async fn run(broker: Arc<Broker>, index: usize, mirror: Mirror, shutdown: CancellationToken) {
    let backoff = Backoff::default();
    let mut failures = 0;
    loop {
        let mut stored = false;
        let cause = tokio::select! {
            _ = shutdown.cancelled() => return,
            cause = copy(&broker, index, &mirror, &mut stored) => cause,
        };
        // Backoff grows only while no progress is made.
        failures = if stored { 1 } else { failures + 1 };
        let wait = backoff.delay(failures);
        warn!(upstream = %mirror.upstream, %cause, ?wait, "mirroring stopped; resuming from what is stored");
        broker.update_link(index, |link| {
            link.connected = false;
            link.detail = cause.to_string();
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Subscribes from what is stored and stores what arrives, until something fails.
async fn copy(broker: &Broker, index: usize, mirror: &Mirror, stored: &mut bool) -> Error {
    let (positions, newest_stored) = stored_positions(broker, index);
    // What the upstream confirmed in this process (its tail in heartbeats and `CaughtUp`) was all
    // stored: resuming after it is exact too, and keeps a `now` mirror from restarting at "now".
    let confirmed = broker.link(index).and_then(|l| l.confirmed).map(|t| t.0);
    let newest = newest_stored.max(confirmed);
    let start = match mirror.from {
        MirrorFrom::Beginning => pb::subscribe_request::Start::Beginning(pb::Beginning {}),
        MirrorFrom::Now => pb::subscribe_request::Start::Now(pb::Now {}),
        MirrorFrom::Ago(span) => pb::subscribe_request::Start::At(
            Tick::now().0.saturating_sub(u64::try_from(span.as_nanos()).unwrap_or(u64::MAX)),
        ),
    };
    let options = SubscribeOptions {
        heartbeat: UPSTREAM_HEARTBEAT,
        ..SubscribeOptions::new(mirror.upstream.clone(), mirror.patterns.clone(), start)
    };
    info!(upstream = %mirror.upstream, streams = positions.len(), after = ?newest, "mirroring");
    let mut upstream = match Subscriber::new(options) {
        Ok(s) => s.resume_from(positions, newest),
        Err(err) => return err,
    };
    loop {
        let delivery = match upstream.next().await {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => return err,
            None => return Error::Internal("the upstream subscription ended".into()),
        };
        match delivery {
            Delivery::Records(mut records) => {
                let Some(last) = records.last().map(|r| Tick(r.tick)) else { continue };
                // A stream matched by several mirrors belongs to the first: the others skip it.
                records.retain(|r| broker.mirror_of(&r.stream) == Some(index));
                if !records.is_empty() {
                    if let Err(err) = broker.mirror(grpc::incoming(records)).await {
                        return Error::Internal(format!("cannot store what the upstream sends: {err}"));
                    }
                }
                *stored = true;
                broker.update_link(index, |link| {
                    link.heard();
                    // What the upstream says is complete (not the ticks: an upstream relay of
                    // several origins may send records past what a slower one confirmed).
                    if let Some(complete) = upstream.seen_up_to().filter(|&t| t > 0) {
                        link.confirm(Tick(complete));
                    }
                    link.fresh_at(last);
                });
            }
            Delivery::Heartbeat(heartbeat) => broker.update_link(index, |link| {
                link.heard();
                if heartbeat.tail_tick > 0 {
                    link.confirm(Tick(heartbeat.tail_tick));
                }
                let beyond: Vec<UpstreamStatus> = heartbeat.upstreams.into_iter().map(status).collect();
                let upstream_lag = beyond.iter().map(|b| b.lag).max().unwrap_or_default();
                let lag_ns = u64::try_from(upstream_lag.as_nanos()).unwrap_or(u64::MAX);
                link.fresh_at(Tick(heartbeat.server_time.saturating_sub(lag_ns)));
                link.beyond = beyond;
            }),
            Delivery::CaughtUp(tick) => broker.update_link(index, |link| {
                link.heard();
                if tick > 0 {
                    link.confirm(Tick(tick));
                }
            }),
            Delivery::Upstream(reported) => broker.update_link(index, |link| {
                link.heard();
                let reported = status(reported);
                match link.beyond.iter_mut().find(|b| b.upstream == reported.upstream) {
                    Some(known) => *known = reported,
                    None => link.beyond.push(reported),
                }
            }),
            Delivery::Connected { endpoint } => info!(upstream = %endpoint, "upstream connected"),
            Delivery::Disconnected { endpoint, cause, retry_in } => {
                warn!(upstream = %endpoint, %cause, ?retry_in, "upstream link down");
                broker.update_link(index, |link| {
                    link.connected = false;
                    link.detail = cause;
                });
            }
            Delivery::Truncated(t) => {
                // The upstream's retention removed records before they were copied: nothing can
                // bring them back; copying goes on after them.
                warn!(stream = %t.stream, requested = t.requested, through = t.through, "the upstream removed records before they were copied");
            }
            Delivery::Gap(g) => {
                // Never asked for (the relay's subscription catches up), but said if it comes.
                warn!(stream = %g.stream, records = g.records, "the upstream skipped records");
            }
            Delivery::StreamAdded(_) | Delivery::StreamChanged(_) => {}
        }
    }
}

/// Per mirrored stream its last stored tick, and the newest of them: the mirror resumes there.
fn stored_positions(broker: &Broker, index: usize) -> (HashMap<String, u64>, Option<u64>) {
    let mut positions = HashMap::new();
    for info in broker.all_streams() {
        if let Some(last) = info.last_tick.filter(|_| broker.mirror_of(&info.name) == Some(index)) {
            positions.insert(info.name.to_string(), last.0);
        }
    }
    let newest = positions.values().copied().max();
    (positions, newest)
}

fn status(s: pb::UpstreamStatus) -> UpstreamStatus {
    UpstreamStatus {
        upstream: s.upstream,
        connected: s.connected,
        lag: Duration::from_nanos(s.lag),
        detail: s.detail,
    }
}

/// Starts one task per mirror of the broker's configuration.
pub fn spawn_all(broker: &Arc<Broker>, shutdown: &CancellationToken, tasks: &tokio_util::task::TaskTracker) {
    for (index, mirror) in broker.mirrors().iter().cloned().enumerate() {
        tasks.spawn(run(broker.clone(), index, mirror, shutdown.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_parses_and_names_the_rule() {
        assert_eq!("beginning".parse::<MirrorFrom>().unwrap(), MirrorFrom::Beginning);
        assert_eq!("now".parse::<MirrorFrom>().unwrap(), MirrorFrom::Now);
        assert_eq!("-10m".parse::<MirrorFrom>().unwrap(), MirrorFrom::Ago(Duration::from_secs(600)));
        let err = "yesterday".parse::<MirrorFrom>().unwrap_err().to_string();
        assert!(err.contains("mirror-from") && err.contains("yesterday"), "{err}");
    }

    #[test]
    fn health_and_lag_travel_down() {
        let mut link = Link::new("http://a");
        link.connected = true;
        link.fresh = Some(Tick(500));
        link.beyond = vec![UpstreamStatus {
            upstream: "http://origin".into(),
            connected: false,
            lag: Duration::from_nanos(500),
            detail: "refused".into(),
        }];
        let status = link.status(Tick(3_000));
        assert!(!status.connected);
        assert_eq!(status.lag, Duration::from_nanos(2_500));
        assert!(
            status.detail.contains("http://origin") && status.detail.contains("refused"),
            "{}",
            status.detail
        );
        link.beyond[0].connected = true;
        assert!(link.status(Tick(3_000)).connected);
    }
}
