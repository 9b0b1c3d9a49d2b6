//! `/metrics`: what the broker records as it goes (through the `metrics` facade: records in and
//! out, commit groups, fsyncs, acks, refusals, retention), and the state of the moment (streams,
//! subscriptions, relay links, connections, disk), set when scraped. Rendered in Prometheus'
//! text format by `metrics-exporter-prometheus`.

use super::Admin;
use crate::types::Tick;
use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use std::sync::OnceLock;
use std::time::Duration;

/// At most this many streams get series of their own (the busiest, then by name); the rest are
/// counted in `tapeline_streams` only, so a broker of 100,000 streams stays scrapable.
const MAX_STREAM_SERIES: usize = 100;

/// A series not set for this long is dropped: a stream deleted, or no longer among the busiest.
/// Every state series is set again at each scrape.
const STALE: Duration = Duration::from_secs(300);

/// Seconds, for latencies from 100 µs to 2.5 s.
const SECONDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Batches per commit group.
const BATCHES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's metrics recorder (once: a process serving several brokers, as the
/// tests do, shares its counters). Without it every recording is a no-op costing a load and a
/// branch, so a broker without the admin listener pays nothing.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("tapeline_commit_group_batches".into()), BATCHES)
                })
                // Only gauges, set at each scrape, go stale: counters and histograms are cumulative.
                .map(|b| b.idle_timeout(MetricKindMask::GAUGE, Some(STALE)).build_recorder());
            let recorder = match recorder {
                Ok(recorder) => recorder,
                Err(err) => {
                    tracing::warn!(%err, "metrics are off: the recorder could not be built");
                    return None;
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("metrics are off: another recorder is installed");
                return None;
            }
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_counter!("tapeline_records_in_total", "Records appended by publishers and relay copies.");
    describe_counter!("tapeline_bytes_in_total", Unit::Bytes, "Payload bytes appended.");
    describe_counter!("tapeline_records_out_total", "Records delivered to subscribers.");
    describe_counter!("tapeline_bytes_out_total", Unit::Bytes, "Record bytes delivered to subscribers.");
    describe_histogram!("tapeline_commit_group_batches", "Batches written together by one group commit.");
    describe_histogram!("tapeline_fsync_seconds", Unit::Seconds, "Time of each fsync of the log.");
    describe_histogram!(
        "tapeline_ack_seconds",
        Unit::Seconds,
        "From a publish's arrival to its ack (durable under the fsync policy)."
    );
    describe_counter!("tapeline_refusals_total", "Calls refused, by gRPC code and reason.");
    describe_counter!("tapeline_retention_removed_records_total", "Records removed by retention.");
    describe_gauge!("tapeline_streams", "Streams in the catalog.");
    describe_gauge!("tapeline_stream_records", "Records stored, per stream (the busiest 100).");
    describe_gauge!(
        "tapeline_stream_bytes",
        Unit::Bytes,
        "Payload bytes stored, per stream (the busiest 100)."
    );
    describe_gauge!("tapeline_stream_records_per_second", "Records appended per second lately, per stream.");
    describe_gauge!("tapeline_subscriptions", "Subscriptions running, by state (replaying, live).");
    describe_gauge!(
        "tapeline_subscription_lag_max_seconds",
        Unit::Seconds,
        "How far the most lagging live subscription is behind the tail."
    );
    describe_gauge!("tapeline_relay_link_up", "1 when a relay's upstream link is whole up to the origin.");
    describe_gauge!(
        "tapeline_relay_link_lag_seconds",
        Unit::Seconds,
        "How far a relay's copy may be behind its origin."
    );
    describe_gauge!("tapeline_connections", "Client connections open.");
    describe_gauge!("tapeline_disk_used_bytes", Unit::Bytes, "Bytes of chunk files on disk.");
    describe_gauge!(
        "tapeline_disk_budget_bytes",
        Unit::Bytes,
        "The disk budget (max_disk_bytes); absent when none."
    );
    describe_gauge!(
        "tapeline_tail_tick_seconds",
        Unit::Seconds,
        "The newest committed tick, as seconds since the epoch."
    );
}

/// The text of a scrape: the state of the moment set, then everything rendered.
pub fn render(admin: &Admin) -> String {
    let Some(handle) = install() else {
        return "# metrics are off: see the broker's log\n".into();
    };
    let broker = &admin.broker;
    let now = Tick::now();
    let mut streams: Vec<_> = broker.all_streams().into_iter().map(|s| (s.recent.at(now).0, s)).collect();
    gauge!("tapeline_streams").set(streams.len() as f64);
    streams.sort_by(|(a_rate, a), (b_rate, b)| b_rate.total_cmp(a_rate).then_with(|| a.name.cmp(&b.name)));
    for (rate, s) in streams.iter().take(MAX_STREAM_SERIES) {
        let name = s.name.to_string();
        gauge!("tapeline_stream_records", "stream" => name.clone()).set(s.records as f64);
        gauge!("tapeline_stream_bytes", "stream" => name.clone()).set(s.bytes as f64);
        gauge!("tapeline_stream_records_per_second", "stream" => name).set(*rate);
    }
    let tail = broker.tail();
    let (mut replaying, mut live, mut lag) = (0u64, 0u64, Duration::ZERO);
    for progress in broker.subscriptions() {
        let seen = progress.seen();
        if seen.live {
            live += 1;
            lag = lag.max(behind(tail, seen.last_sent));
        } else {
            replaying += 1;
        }
    }
    gauge!("tapeline_subscriptions", "state" => "replaying").set(replaying as f64);
    gauge!("tapeline_subscriptions", "state" => "live").set(live as f64);
    gauge!("tapeline_subscription_lag_max_seconds").set(lag.as_secs_f64());
    for link in broker.link_statuses() {
        gauge!("tapeline_relay_link_up", "upstream" => link.upstream.clone())
            .set(f64::from(u8::from(link.connected)));
        gauge!("tapeline_relay_link_lag_seconds", "upstream" => link.upstream).set(link.lag.as_secs_f64());
    }
    gauge!("tapeline_connections").set(admin.connections.open() as f64);
    gauge!("tapeline_disk_used_bytes").set(broker.log().disk_bytes() as f64);
    if let Some(budget) = admin.disk_budget {
        gauge!("tapeline_disk_budget_bytes").set(budget as f64);
    }
    gauge!("tapeline_tail_tick_seconds").set(tail.0 as f64 / 1e9);
    handle.run_upkeep();
    handle.render()
}

/// How far `delivered` is behind `tail`.
pub fn behind(tail: Tick, delivered: Tick) -> Duration {
    Duration::from_nanos(tail.0.saturating_sub(delivered.0))
}
