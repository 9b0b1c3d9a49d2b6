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
//! The task also keeps its [`Link`](crate::broker::link::Link): whether the upstream is reachable, up to which tick the
//! upstream confirmed this relay has everything (records and heartbeats), and what the upstream
//! reported of its own links, so health and lag travel down a chain of relays.

use crate::broker::Broker;
use crate::client::{Backoff, Delivery, SubscribeOptions, Subscriber};
use crate::config::{Mirror, MirrorFrom};
use crate::error::Error;
use crate::protocol::pb;
use crate::types::{Tick, UpstreamStatus};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often a relay asks its upstream for a heartbeat: the resolution of its lag when quiet.
const UPSTREAM_HEARTBEAT: Duration = Duration::from_secs(1);

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
    let (positions, newest_stored) = stored_positions(broker, index, mirror.from);
    // What the upstream confirmed in this process (its tail in heartbeats and `CaughtUp`) was all
    // stored: resuming after it is exact too, and keeps a `now` mirror from restarting at "now".
    let confirmed = broker.link(index).and_then(|l| l.confirmed).map(|t| t.0);
    let newest = newest_stored.max(confirmed);
    let start = match mirror.from {
        MirrorFrom::Beginning => pb::subscribe_request::Start::Beginning(pb::Beginning {}),
        MirrorFrom::Now => pb::subscribe_request::Start::Now(pb::Now {}),
        MirrorFrom::Ago(span) => pb::subscribe_request::Start::At(Tick::now().minus(span).0),
    };
    let options = SubscribeOptions {
        heartbeat: UPSTREAM_HEARTBEAT,
        credentials: mirror.credentials.clone(),
        ..SubscribeOptions::new(mirror.upstream.clone(), mirror.patterns.clone(), start)
    };
    info!(upstream = %mirror.upstream, streams = positions.len(), after = ?newest, "mirroring");
    let mut upstream = match Subscriber::new(options) {
        Ok(s) => s.resume_from(positions, newest),
        Err(err) => return err.into(),
    };
    loop {
        let delivery = match upstream.next().await {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => return err.into(),
            None => return Error::Internal("the upstream subscription ended".into()),
        };
        match delivery {
            Delivery::Records(mut records) => {
                let Some(last) = records.last().map(|r| r.tick) else { continue };
                // A stream matched by several mirrors belongs to the first: the others skip it.
                records.retain(|r| broker.mirror_of(&r.stream) == Some(index));
                if !records.is_empty() {
                    if let Err(err) = broker.mirror(records.into_iter().map(Into::into).collect()).await {
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
                let beyond: Vec<UpstreamStatus> = heartbeat.upstreams.into_iter().map(Into::into).collect();
                let upstream_lag = beyond.iter().map(|b| b.lag).max().unwrap_or_default();
                let lag_ns = crate::types::nanos(upstream_lag);
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
                let reported: UpstreamStatus = reported.into();
                match link.beyond.iter_mut().find(|b| b.upstream == reported.upstream) {
                    Some(known) => *known = reported,
                    None => link.beyond.push(reported),
                }
            }),
            Delivery::Connected { endpoint } => {
                info!(upstream = %endpoint, "upstream connected");
                // The catalog as it is now: what changed while this relay was away (streams
                // deleted, created again, their metadata) was never sent as events. Whatever
                // changes after the subscription's start also comes as events, in order.
                if let Err(err) = reconcile(broker, index, mirror, &endpoint).await {
                    return err;
                }
            }
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
            Delivery::StreamAdded(info) => {
                if let Err(err) = define(broker, index, &info).await {
                    return err;
                }
            }
            Delivery::StreamChanged(change) => {
                let Some(info) = change.stream else { continue };
                let done = if change.deleted {
                    broker.mirror_delete(index, &info.name, Some(Tick(info.created_tick))).await
                } else {
                    define(broker, index, &info).await
                };
                if let Err(err) = done {
                    return Error::Internal(format!("cannot copy the catalog of {}: {err}", info.name));
                }
            }
        }
    }
}

/// Defines this relay's copy of a stream as the upstream describes it.
async fn define(broker: &Broker, index: usize, info: &pb::StreamInfo) -> Result<(), Error> {
    let again = broker.mirror_define(index, &info.name, info.into(), Tick(info.created_tick)).await?;
    if again {
        // The subscription's position for the stream is the old copy's: start over from what
        // is stored now, so the new stream is read from its start.
        return Err(Error::Internal(format!(
            "the upstream created {} again: the copy was deleted and is copied anew",
            info.name
        )));
    }
    Ok(())
}

/// Makes this relay's catalog of `mirror` the upstream's: every upstream stream it selects defined
/// with the upstream's metadata, and every copy the upstream no longer has deleted.
async fn reconcile(broker: &Broker, index: usize, mirror: &Mirror, endpoint: &str) -> Result<(), Error> {
    let mut client = crate::client::connect_with(endpoint, &mirror.credentials).await?;
    // An upstream that has not caught up (a relay still copying, or one whose data dir was
    // replaced) lacks streams it never deleted: only a copy the upstream's tail covers is known to
    // be gone from it. (The tail first: a stream it covers that the list then lacks was deleted.)
    let hello =
        pb::HelloRequest { protocol_version: crate::protocol::PROTOCOL_VERSION, ..Default::default() };
    let tail =
        client.hello(hello).await.map_err(|s| crate::client::remote("hello", &s))?.into_inner().tail_tick;
    let mut upstream = HashMap::new();
    for pattern in &mirror.patterns {
        let listed = crate::client::list_streams(&mut client, pattern).await?;
        // An import is not copied until sealed: the subscription tells of it then.
        for info in listed.into_iter().filter(|s| !s.importing) {
            upstream.insert(info.name.clone(), info);
        }
    }
    for copy in broker.all_streams() {
        let covered = copy.last_tick.unwrap_or(copy.created_tick).0 <= tail;
        if broker.mirror_of(&copy.name) == Some(index) && covered && !upstream.contains_key(&*copy.name) {
            info!(stream = %copy.name, "the upstream deleted the stream: so does the copy");
            broker.mirror_delete(index, &copy.name, None).await?;
        }
    }
    for info in upstream.values() {
        define(broker, index, info).await?;
    }
    Ok(())
}

/// Per mirrored stream its last stored tick, and the newest of them: the mirror resumes there.
/// A copy with no record yet (its metadata came first) is read from the upstream's beginning in
/// a `beginning` mirror; in a `now` or `-DURATION` mirror it resumes after the newest stored
/// tick like a stream never seen (its history was not asked for).
fn stored_positions(broker: &Broker, index: usize, from: MirrorFrom) -> (HashMap<String, u64>, Option<u64>) {
    let mut positions = HashMap::new();
    let mut newest = None;
    for info in broker.all_streams().into_iter().filter(|s| broker.mirror_of(&s.name) == Some(index)) {
        let position = match (info.last_tick, from) {
            (Some(last), _) => {
                newest = newest.max(Some(last.0));
                last.0
            }
            (None, MirrorFrom::Beginning) => 0,
            (None, _) => continue,
        };
        positions.insert(info.name.to_string(), position);
    }
    (positions, newest)
}

/// Starts one task per mirror of the broker's configuration.
pub fn spawn_all(broker: &Arc<Broker>, shutdown: &CancellationToken, tasks: &tokio_util::task::TaskTracker) {
    for (index, mirror) in broker.mirrors().iter().cloned().enumerate() {
        tasks.spawn(run(broker.clone(), index, mirror, shutdown.clone()));
    }
}
