//! The workloads, each on a fresh server: publish throughput, live end-to-end latency, replay
//! throughput and the replay-to-live handoff.
//!
//! Every payload starts with the moment its record was *scheduled* to be sent and a sequence
//! number. Latency is measured from the scheduled moment, so a stall of the publisher (or the
//! broker holding it back) counts against the latency instead of hiding it; the sequence numbers
//! show gaps and duplicates.

use crate::drivers::{self, Publisher, Start, DRAIN};
use crate::servers::{Server, Target};
use crate::usage::{Meter, Usage};
use anyhow::{bail, Result};
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio::time::Instant;

static EPOCH: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

/// Nanoseconds on this process's monotonic clock: what payloads carry.
fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// Random bytes that payloads are cut from: payloads that compress would flatter a store that
/// compresses (Redis compresses its RDB files).
static NOISE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    // xorshift64: enough to defeat compression, no dependency.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    (0..(1 << 20) + 8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
});

/// A payload of `size` bytes (at least 16, at most 8 KiB) stamped with its scheduled moment and
/// sequence number; the rest is random.
fn payload(size: usize, scheduled_ns: u64, seq: u64) -> Bytes {
    let size = size.clamp(16, 8192);
    let at = (seq.wrapping_mul(7919) % (1 << 20)) as usize;
    let mut bytes = NOISE[at..at + size].to_vec();
    bytes[..8].copy_from_slice(&scheduled_ns.to_le_bytes());
    bytes[8..16].copy_from_slice(&seq.to_le_bytes());
    Bytes::from(bytes)
}

/// The scheduled moment and sequence number of a payload.
fn stamp(payload: &[u8]) -> (u64, u64) {
    let word = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().unwrap_or_default());
    if payload.len() < 16 {
        return (0, u64::MAX);
    }
    (word(0), word(8))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of a histogram of microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl From<&Histogram<u64>> for Latency {
    fn from(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

fn record_us(h: &mut Histogram<u64>, nanos: u64) {
    h.saturating_record((nanos / 1000).max(1));
}

/// Follows the sequence numbers a subscriber sees, expecting `from`, `from + 1`, ….
#[derive(Debug, Clone, Default)]
struct Order {
    next: Option<u64>,
    received: u64,
    missing: u64,
    duplicates: u64,
}

impl Order {
    fn observe(&mut self, seq: u64) {
        self.received += 1;
        match self.next {
            Some(next) if seq < next => self.duplicates += 1,
            Some(next) => {
                self.missing += seq - next;
                self.next = Some(seq + 1);
            }
            None => self.next = Some(seq + 1),
        }
    }
}

/// Publish throughput: what is asked.
#[derive(Debug, Clone, Serialize)]
pub struct PublishSpec {
    pub size: usize,
    pub streams: usize,
    pub connections: usize,
    /// Records per batch (tapeline), per pipeline (Redis), per group of async publishes (NATS).
    pub batch: usize,
    /// Batches in flight per connection.
    pub window: usize,
    pub duration: Duration,
}

/// Publish throughput: what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct PublishResult {
    pub records_per_second: f64,
    pub megabytes_per_second: f64,
    /// From a batch's sending to its ack.
    pub ack: Latency,
    pub usage: Usage,
}

/// Publishes as fast as acknowledgements allow, `spec.connections` connections each keeping
/// `spec.window` batches in flight, spreading batches over `spec.streams` streams.
pub async fn publish(server: &Server, spec: &PublishSpec) -> Result<PublishResult> {
    if server.target.system.publishes_only() {
        return publish_with_redis_benchmark(server, spec).await;
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(spec.connections + 1));
    let mut tasks = Vec::new();
    for connection in 0..spec.connections {
        let mut publisher = Publisher::connect(&server.target, spec.window, spec.batch).await?;
        let barrier = barrier.clone();
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let end = Instant::now() + spec.duration;
            let mut acks = histogram();
            let mut in_flight = FuturesOrdered::new();
            let mut acked = 0u64;
            let mut turn = connection;
            let mut seq = 0u64;
            while Instant::now() < end {
                let payloads: Vec<Bytes> = (0..spec.batch)
                    .map(|_| {
                        seq += 1;
                        payload(spec.size, 0, seq)
                    })
                    .collect();
                let sent = now_ns();
                let acked_future = publisher.send(turn % spec.streams, payloads).await?;
                turn += spec.connections;
                in_flight.push_back(acked_future.map(move |r| (r, sent)));
                while in_flight.len() >= spec.window {
                    let (result, sent): (Result<()>, u64) = in_flight.next().await.expect("not empty");
                    result?;
                    record_us(&mut acks, now_ns() - sent);
                    acked += spec.batch as u64;
                }
            }
            while let Some((result, sent)) = in_flight.next().await {
                result?;
                record_us(&mut acks, now_ns() - sent);
                acked += spec.batch as u64;
            }
            anyhow::Ok((acked, acks))
        }));
    }
    let meter = Meter::start(server.pid());
    barrier.wait().await;
    let started = Instant::now();
    let mut acked = 0;
    let mut acks = histogram();
    for task in tasks {
        let (n, h) = task.await??;
        acked += n;
        acks.add(&h)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(PublishResult {
        records_per_second: acked as f64 / seconds,
        megabytes_per_second: (acked * spec.size as u64) as f64 / seconds / 1e6,
        ack: Latency::from(&acks),
        usage: meter.stop(),
    })
}

/// Publish throughput through `redis-benchmark`, Redis's own C load generator: XADD of a payload
/// of the same size, `spec.connections` connections each keeping `window × batch` commands in
/// flight (`-P`), random keys among `spec.streams` streams. It runs a number of commands, not a
/// time: a short run first sizes the measured one to about `spec.duration`.
async fn publish_with_redis_benchmark(server: &Server, spec: &PublishSpec) -> Result<PublishResult> {
    let pipeline = spec.window * spec.batch;
    // Printable, since it is an argument; as long as the other drivers' payloads.
    let payload: String = NOISE[..spec.size].iter().map(|b| char::from(b'a' + b % 26)).collect();
    let run = async |commands: usize| -> Result<(f64, f64)> {
        let mut command = tokio::process::Command::new(server.redis_benchmark());
        command.args(["-h", "127.0.0.1", "-p", &server.port().to_string(), "--csv"]);
        command.args([
            "-c",
            &spec.connections.to_string(),
            "-P",
            &pipeline.to_string(),
            "-n",
            &commands.to_string(),
        ]);
        let key = if spec.streams > 1 {
            command.args(["-r", &spec.streams.to_string()]);
            "bench:__rand_int__"
        } else {
            "bench:0"
        };
        command.args(["XADD", key, "*", "d", &payload]);
        let out = command.output().await?;
        if !out.status.success() {
            bail!("redis-benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
        // "p99_latency_ms","max_latency_ms"`, then one row.
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let row = text.lines().last().unwrap_or_default();
        let fields: Vec<f64> =
            row.rsplit("\",\"").take(7).filter_map(|f| f.trim_matches('"').parse().ok()).collect();
        let (Some(p99_ms), Some(rps)) = (fields.get(1), fields.get(6)) else {
            bail!("cannot read redis-benchmark's output {text:?}");
        };
        Ok((*rps, *p99_ms))
    };
    let (rough, _) = run(pipeline * spec.connections * 50).await?;
    let commands = ((rough * spec.duration.as_secs_f64()) as usize).max(pipeline * spec.connections);
    let meter = Meter::start(server.pid());
    let (rps, p99_ms) = run(commands).await?;
    let p99_us = (p99_ms * 1000.0) as u64;
    Ok(PublishResult {
        records_per_second: rps,
        megabytes_per_second: rps * spec.size as f64 / 1e6,
        ack: Latency { count: commands as u64, p99_us, ..Latency::default() },
        usage: meter.stop(),
    })
}

/// Sends `total` records to stream 0 at `rate` per second from sequence number `first_seq`,
/// open loop: every millisecond, the records whose moment has come go out as one batch. Returns
/// the ack latency (from each batch's first scheduled moment) of batches scheduled before
/// `split` and of those after.
async fn open_loop(
    server: &Server,
    rate: u64,
    total: u64,
    first_seq: u64,
    size: usize,
    split: Option<u64>,
) -> Result<(Histogram<u64>, Histogram<u64>)> {
    let mut publisher = Publisher::connect(&server.target, 128, 64).await?;
    let start = now_ns() + 1_000_000;
    let moment = |i: u64| start + i * 1_000_000_000 / rate;
    let mut in_flight = FuturesOrdered::new();
    let (mut before, mut after) = (histogram(), histogram());
    let note =
        |result: Result<()>, scheduled: u64, before: &mut Histogram<u64>, after: &mut Histogram<u64>| {
            result?;
            let h = if split.is_some_and(|s| scheduled >= s) { after } else { before };
            record_us(h, now_ns().saturating_sub(scheduled));
            anyhow::Ok(())
        };
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total {
        tick.tick().await;
        let now = now_ns();
        let due =
            if now < start { 0 } else { ((now - start) as u128 * rate as u128 / 1_000_000_000) as u64 + 1 };
        let due = due.min(total);
        if due > sent {
            let payloads = (sent..due).map(|i| payload(size, moment(i), first_seq + i)).collect();
            let scheduled = moment(sent);
            let acked = publisher.send(0, payloads).await?;
            in_flight.push_back(acked.map(move |r| (r, scheduled)));
            sent = due;
        }
        while let Some(Some((result, scheduled))) = in_flight.next().now_or_never() {
            note(result, scheduled, &mut before, &mut after)?;
        }
    }
    while let Some((result, scheduled)) = in_flight.next().await {
        note(result, scheduled, &mut before, &mut after)?;
    }
    Ok((before, after))
}

/// Live latency: what is asked.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySpec {
    pub rate: u64,
    pub subscribers: usize,
    pub size: usize,
    pub duration: Duration,
}

/// Live latency: what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    /// From each record's scheduled moment to its arrival, all subscribers together.
    pub end_to_end: Latency,
    /// The worst subscriber's p99.
    pub worst_subscriber_p99_us: u64,
    pub published: u64,
    /// Subscribers that had not received every record 10 s after the last was published.
    pub incomplete_subscribers: usize,
    pub missing: u64,
    pub duplicates: u64,
    pub publish_ack: Latency,
    /// From the first record sent to the last one received.
    pub usage: Usage,
}

/// `spec.subscribers` subscribers (a connection each) follow stream 0 from now while one
/// publisher sends at `spec.rate`.
pub async fn latency(server: &Server, spec: &LatencySpec) -> Result<LatencyResult> {
    let total = spec.rate * spec.duration.as_secs().max(1);
    let deadline = Instant::now() + spec.duration + DRAIN + Duration::from_secs(5);
    let mut tasks = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..spec.subscribers {
        let (ready, is_ready) = oneshot::channel();
        waits.push(is_ready);
        tasks.push(tokio::spawn(follow(server.target.clone(), deadline, total, ready)));
    }
    // Publish once every subscription is in place (a failed one reports its error below).
    for wait in waits {
        let _ = wait.await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let meter = Meter::start(server.pid());
    let (publish_ack, _) = open_loop(server, spec.rate, total, 0, spec.size, None).await?;
    let mut all = histogram();
    let mut result = LatencyResult {
        end_to_end: Latency::default(),
        worst_subscriber_p99_us: 0,
        published: total,
        incomplete_subscribers: 0,
        missing: 0,
        duplicates: 0,
        publish_ack: Latency::from(&publish_ack),
        usage: Usage::default(),
    };
    for task in tasks {
        let (order, h) = task.await??;
        all.add(&h)?;
        result.worst_subscriber_p99_us = result.worst_subscriber_p99_us.max(h.value_at_quantile(0.99));
        let unique = order.received - order.duplicates;
        if unique < total {
            result.incomplete_subscribers += 1;
        }
        result.missing += total.saturating_sub(unique);
        result.duplicates += order.duplicates;
    }
    result.end_to_end = Latency::from(&all);
    result.usage = meter.stop();
    Ok(result)
}

/// Follows stream 0 from now until `total` records arrived, recording each one's latency and
/// order.
async fn follow(
    target: Target,
    deadline: Instant,
    total: u64,
    ready: oneshot::Sender<()>,
) -> Result<(Order, Histogram<u64>)> {
    let mut order = Order::default();
    let mut latency = histogram();
    drivers::subscribe(&target, 0, Start::Now, ready, deadline, |p| {
        let (scheduled, seq) = stamp(p);
        record_us(&mut latency, now_ns().saturating_sub(scheduled));
        order.observe(seq);
        order.received < total
    })
    .await?;
    Ok((order, latency))
}

/// Appends `records` records of `size` bytes to stream 0, sequence numbers from 0, through one
/// connection (so the stream holds them in sequence order). Returns the records/s and the moment
/// the record in the middle was sent.
async fn load(server: &Server, records: u64, size: usize) -> Result<(f64, SystemTime)> {
    const BATCH: u64 = 1000;
    const WINDOW: usize = 16;
    let mut publisher = Publisher::connect(&server.target, WINDOW, BATCH as usize).await?;
    let mut in_flight = FuturesOrdered::new();
    let started = Instant::now();
    let mut middle = SystemTime::now();
    let mut seq = 0;
    while seq < records {
        let end = (seq + BATCH).min(records);
        if seq <= records / 2 && records / 2 < end {
            middle = SystemTime::now();
        }
        let payloads = (seq..end).map(|i| payload(size, now_ns(), i)).collect();
        in_flight.push_back(publisher.send(0, payloads).await?);
        seq = end;
        while in_flight.len() >= WINDOW {
            in_flight.next().await.expect("not empty")?;
        }
    }
    while let Some(result) = in_flight.next().await {
        result?;
    }
    Ok((records as f64 / started.elapsed().as_secs_f64(), middle))
}

/// Replay: what was measured for one reader.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayRead {
    pub records: u64,
    pub first_record_ms: f64,
    pub records_per_second: f64,
    pub megabytes_per_second: f64,
    /// Every record once, in order, through the last one.
    pub exact: bool,
    pub usage: Usage,
}

/// Replay: what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayResult {
    pub records: u64,
    pub size: usize,
    pub load_records_per_second: f64,
    pub load_usage: Usage,
    pub from_beginning: ReplayRead,
    pub from_middle: ReplayRead,
    /// Bytes on disk after loading, per byte of payload.
    pub disk_per_logical_byte: f64,
    /// The server's peak resident memory once loaded, before the reads.
    pub peak_rss_loaded_bytes: u64,
    /// The same after the reads.
    pub peak_rss_bytes: u64,
    /// tapeline: how long opening the loaded data dir took (a clean stop, then a start, until it
    /// answers), and the same with its index deleted: a rebuild from the chunk files.
    pub open_ms: Option<f64>,
    pub open_rebuild_ms: Option<f64>,
}

/// Loads `records` records, then reads them all from the beginning, then from the moment the
/// middle one was sent, each time until the last.
pub async fn replay(server: &mut Server, records: u64, size: usize) -> Result<ReplayResult> {
    let meter = Meter::start(server.pid());
    let (load_rate, middle) = load(server, records, size).await?;
    let load_usage = meter.stop();
    // Let interval fsyncs and background flushes land before measuring the disk.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let disk = server.disk_bytes() as f64 / (records * size as u64) as f64;
    let peak_rss_loaded_bytes = server.peak_rss();
    let from_beginning = read_all(server, Start::Beginning, records, size).await?;
    let from_middle = read_all(server, Start::Time(middle), records, size).await?;
    let peak_rss_bytes = server.peak_rss();
    // tapeline: how long an open of this data dir takes, with its index, and rebuilding it.
    let (mut open_ms, mut open_rebuild_ms) = (None, None);
    if server.target.system.is_tapeline() {
        open_ms = Some(server.restart(|_| Ok(())).await?.as_secs_f64() * 1000.0);
        let rebuilt = server.restart(|data| Ok(std::fs::remove_dir_all(data.join("index"))?)).await?;
        open_rebuild_ms = Some(rebuilt.as_secs_f64() * 1000.0);
    }
    Ok(ReplayResult {
        records,
        size,
        load_records_per_second: load_rate,
        load_usage,
        from_beginning,
        from_middle,
        disk_per_logical_byte: disk,
        peak_rss_loaded_bytes,
        peak_rss_bytes,
        open_ms,
        open_rebuild_ms,
    })
}

/// Reads stream 0 from `start` until the record with sequence number `records - 1`.
async fn read_all(server: &Server, start: Start, records: u64, size: usize) -> Result<ReplayRead> {
    let last = records - 1;
    let began = Instant::now();
    let mut first = None;
    let mut order = Order::default();
    let mut seen_last = false;
    let (ready, _) = oneshot::channel();
    let meter = Meter::start(server.pid());
    drivers::subscribe(&server.target, 0, start, ready, began + Duration::from_secs(900), |p| {
        first.get_or_insert_with(Instant::now);
        let (_, seq) = stamp(p);
        order.observe(seq);
        seen_last = seq == last;
        !seen_last
    })
    .await?;
    let seconds = began.elapsed().as_secs_f64();
    if order.received == 0 {
        bail!("{}: the replay delivered nothing", server.target.system.name());
    }
    Ok(ReplayRead {
        records: order.received,
        first_record_ms: first.map_or(0.0, |f| (f - began).as_secs_f64() * 1000.0),
        records_per_second: order.received as f64 / seconds,
        megabytes_per_second: (order.received * size as u64) as f64 / seconds / 1e6,
        exact: seen_last && order.missing == 0 && order.duplicates == 0,
        usage: meter.stop(),
    })
}

/// Handoff: what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct HandoffResult {
    pub preloaded: u64,
    pub live: u64,
    pub rate: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// From the subscription's start to the first live record arriving within 100 ms of its moment.
    pub caught_up_after_ms: f64,
    /// Publish ack latency before the subscriber started, and while it replayed and followed.
    pub publish_ack_before: Latency,
    pub publish_ack_during: Latency,
    /// While publishing live, the subscriber replaying then following.
    pub usage: Usage,
}

/// Preloads `preload` records, publishes live at `rate` for `duration`, and a third of the way in
/// starts a subscriber from the beginning that must receive every record once, in order.
pub async fn handoff(
    server: &Server,
    preload: u64,
    rate: u64,
    size: usize,
    duration: Duration,
) -> Result<HandoffResult> {
    load(server, preload, size).await?;
    let meter = Meter::start(server.pid());
    let live = rate * duration.as_secs().max(1);
    let total = preload + live;
    let subscribe_at = now_ns() + duration.as_nanos() as u64 / 3;
    let deadline = Instant::now() + duration + DRAIN + Duration::from_secs(60);
    let target = server.target.clone();
    let reader = tokio::spawn(async move {
        let wait = subscribe_at.saturating_sub(now_ns());
        tokio::time::sleep(Duration::from_nanos(wait)).await;
        let began = now_ns();
        let mut order = Order::default();
        let mut caught_up = None;
        let (ready, _) = oneshot::channel();
        drivers::subscribe(&target, 0, Start::Beginning, ready, deadline, |p| {
            let (scheduled, seq) = stamp(p);
            order.observe(seq);
            if caught_up.is_none() && seq >= preload && now_ns().saturating_sub(scheduled) < 100_000_000 {
                caught_up = Some(now_ns() - began);
            }
            order.received < total && seq + 1 < total
        })
        .await?;
        anyhow::Ok((order, caught_up))
    });
    let (before, during) = open_loop(server, rate, live, preload, size, Some(subscribe_at)).await?;
    let (order, caught_up) = reader.await??;
    let usage = meter.stop();
    let unique = order.received - order.duplicates;
    Ok(HandoffResult {
        preloaded: preload,
        live,
        rate,
        received: order.received,
        // Gaps inside what arrived and whatever never arrived after it.
        missing: total.saturating_sub(unique),
        duplicates: order.duplicates,
        caught_up_after_ms: caught_up.map_or(f64::NAN, |n| n as f64 / 1e6),
        publish_ack_before: Latency::from(&before),
        publish_ack_during: Latency::from(&during),
        usage,
    })
}

/// Many readers: what is asked.
#[derive(Debug, Clone, Serialize)]
pub struct ReadersSpec {
    /// Subscribers, a connection each, all starting from the beginning at once.
    pub readers: usize,
    /// Records stored before they start.
    pub preload: u64,
    /// Records per second published while they read, for `duration`.
    pub rate: u64,
    pub duration: Duration,
    pub size: usize,
}

/// Many readers: what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReadersResult {
    /// Records each reader must receive.
    pub expected: u64,
    /// Readers that did not receive every record once by the deadline.
    pub incomplete_readers: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// From the start to the last record of the slowest reader.
    pub slowest_ms: f64,
    /// Publish ack p99 while they read.
    pub publish_ack: Latency,
    pub usage: Usage,
}

/// Preloads `spec.preload` records, then `spec.readers` subscribers start from the beginning at
/// once while one publisher sends at `spec.rate` for `spec.duration`: each must receive every
/// record once, in order. Most of them lag behind the tail for most of the figure, which is what
/// it measures: the server's memory with many lagging readers.
pub async fn readers(server: &Server, spec: &ReadersSpec) -> Result<ReadersResult> {
    load(server, spec.preload, spec.size).await?;
    let live = spec.rate * spec.duration.as_secs().max(1);
    let total = spec.preload + live;
    let deadline = Instant::now() + spec.duration + DRAIN + Duration::from_secs(120);
    let meter = Meter::start(server.pid());
    let began = Instant::now();
    let mut tasks = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..spec.readers {
        let target = server.target.clone();
        let (ready, is_ready) = oneshot::channel();
        waits.push(is_ready);
        tasks.push(tokio::spawn(async move {
            let mut order = Order::default();
            drivers::subscribe(&target, 0, Start::Beginning, ready, deadline, |p| {
                order.observe(stamp(p).1);
                order.received < total && stamp(p).1 + 1 < total
            })
            .await?;
            anyhow::Ok((order, began.elapsed()))
        }));
    }
    for wait in waits {
        let _ = wait.await;
    }
    let (publish_ack, _) = open_loop(server, spec.rate, live, spec.preload, spec.size, None).await?;
    let mut result = ReadersResult {
        expected: total,
        incomplete_readers: 0,
        missing: 0,
        duplicates: 0,
        slowest_ms: 0.0,
        publish_ack: Latency::from(&publish_ack),
        usage: Usage::default(),
    };
    for task in tasks {
        let (order, took) = task.await??;
        let unique = order.received - order.duplicates;
        if unique < total {
            result.incomplete_readers += 1;
        }
        result.missing += total.saturating_sub(unique);
        result.duplicates += order.duplicates;
        result.slowest_ms = result.slowest_ms.max(took.as_secs_f64() * 1000.0);
    }
    result.usage = meter.stop();
    Ok(result)
}
