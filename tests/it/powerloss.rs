//! The power-loss suite, through the real binary: the crash suite's load and checks
//! (`crash.rs`), but each crash is a power cut on a simulated disk (`common/powercut.rs`), where
//! only what was fsynced survives: a write only flushed (sled's `flush` is `sync_file_range`) or a
//! file whose directory was never synced is gone, and a torn cut keeps part of the unsynced writes.
//!
//! Publishers stream acknowledged, idempotent batches over several streams under
//! `--fsync always`, a client creates, changes and deletes streams meanwhile, a subscriber
//! follows them, retention runs every 20 ms, and chunk files of
//! 1 MiB (the smallest) rotate; one stream goes quiet after the first quarter of the run, so its
//! last chunk keeps an old file sparse and compaction moves it. Then the power goes: SIGKILL, the
//! disk rolled back to what was durable, the broker started again on it. Some cuts land while
//! the broker opens its data dir (killed 0–50 ms after it starts, before it is ready), some while
//! it shuts down after SIGTERM. After every restart, as in the crash suite:
//! - every acknowledged record is present exactly once, in order, with its tick and payload,
//!   unless retention removed it from the front;
//! - a batch in flight at the cut is retried with its producer id and sequence: it is answered
//!   as a duplicate, with its ticks, exactly when it had been stored, and never half of it;
//! - the subscriber's records are a prefix of the log, and at the end, resuming from its
//!   positions gets exactly the rest;
//! - every acknowledged catalog change is there (a change in flight at the cut is there or not);
//! - the broker starts: refusing to (an error at open) is a failure.
//!
//! CI runs `CI_CUTS`; `cargo test --test it powerloss:: -- --ignored --nocapture` runs `LONG_CUTS`.
//! A failure stops the run at once; with `POWERLOSS_CONTINUE=1` every broken property is counted
//! and the run goes on (after a refusal to start, on an emptied data dir, the world taking the
//! log as it is), so a run tells how often each one breaks.

use crate::support::powercut::PowerCutFs;
use crate::support::*;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tapeline::protocol::pb;

const CI_CUTS: usize = 20;
const LONG_CUTS: usize = 300;
const PUBLISHERS: usize = 3;
const STREAMS: usize = 4;
/// Records each stream keeps (retention's `max_records`).
const KEPT: usize = 1500;
/// The streams the catalog client creates, changes and deletes, and how long it waits between
/// changes (keeping it under the broker's `catalog_changes_per_second`).
const CATALOG_STREAMS: usize = 6;
const CATALOG_PACE: Duration = Duration::from_millis(15);
/// The stream publisher 0 also writes to during the first quarter of the run, then never again.
const QUIET: &str = "power/quiet";

/// The broker's settings file: small chunk files, and retention that runs often.
fn settings() -> String {
    format!("chunk_file_bytes = 1048576\n[retention]\nmax_records = {KEPT}\ncheck_every = \"20ms\"\n")
}

/// Whether a broken property is counted rather than failing the test at once.
fn continuing() -> bool {
    std::env::var("POWERLOSS_CONTINUE").is_ok_and(|v| v == "1")
}

/// Everything the test knows, carried across restarts.
#[derive(Default)]
struct World {
    /// Every acknowledged record: (stream, tick) → payload.
    acked: BTreeMap<(String, u64), String>,
    /// Per publisher: the last sequence used and the batch sent but not yet acknowledged.
    publishers: Vec<Publisher>,
    /// The live subscriber's per-stream positions and what it received, in order, per stream.
    positions: HashMap<String, u64>,
    received: BTreeMap<String, Vec<(u64, String)>>,
    /// Whether publisher 0 still writes to the quiet stream.
    quiet: bool,
    /// The catalog streams as acknowledged: the description of the last create or update, none
    /// after a delete; and the change sent and not acknowledged (the stream, what it would be).
    catalog: BTreeMap<String, Option<String>>,
    catalog_in_flight: Option<(String, Option<String>)>,
    catalog_changes: u64,
    /// The cut being run, and what the last cut did (for a failure's report).
    cut: usize,
    last_cut: String,
    /// Counts for the report.
    batches: u64,
    records: u64,
    retried: u64,
    duplicates: u64,
    torn: u64,
    during_recovery: u64,
    during_shutdown: u64,
    compactions: u64,
    /// Acknowledged records retention removed, as of the last check, and the checks that saw
    /// the number grow.
    removed: usize,
    removals_seen: u64,
    /// Each retry after a restart, for a failure's report.
    retries: Vec<String>,
    /// Every damage reads reported (stream and cause), so that each is counted once.
    damaged: std::collections::HashSet<String>,
    /// Under `POWERLOSS_CONTINUE`: every broken property, as (cut, kind, detail), and the
    /// starts over on an emptied data dir after a refusal to start.
    violations: Vec<(usize, &'static str, String)>,
    started_over: u64,
}

#[derive(Default, Clone)]
struct Publisher {
    sequence: u64,
    in_flight: Option<pb::PublishRequest>,
}

type Shared = Arc<Mutex<World>>;

fn lock(world: &Shared) -> std::sync::MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

/// A property broke: fails the test, or under `POWERLOSS_CONTINUE` is counted. Returns so that
/// the caller can bring the world in line with the log and go on.
fn violated(world: &Shared, kind: &'static str, detail: String) {
    let cut = lock(world).cut;
    let last_cut = lock(world).last_cut.clone();
    if !continuing() {
        panic!("cut {cut}: {kind}: {detail}\n(the cut before this start: {last_cut})");
    }
    eprintln!("VIOLATION at cut {cut}: {kind}: {detail}\n  (the cut before: {last_cut})");
    lock(world).violations.push((cut, kind, detail));
}

/// A new batch of publisher `n`: 1 to 20 records over one or two streams (and the quiet one,
/// while it is not), payloads naming it and long enough to fill chunk files quickly.
fn new_batch(n: usize, sequence: u64, quiet: bool) -> pb::PublishRequest {
    let mut rng = rand::rng();
    let size = rng.random_range(1..=20);
    let records = (0..size)
        .map(|i| {
            let stream = match i {
                0 if n == 0 && quiet => QUIET.to_string(),
                _ => format!("power/s{}", (n + i % 2 * rng.random_range(0..STREAMS)) % STREAMS),
            };
            record(&stream, format!("p{n}:{sequence}:{i}:{}", "x".repeat(rng.random_range(0..600))))
        })
        .collect();
    pb::PublishRequest { records, batch_id: sequence, producer_id: format!("publisher-{n}"), sequence }
}

/// Sends one batch and records its ack. `Err` when the broker did not answer.
async fn send(
    world: &Shared,
    client: &mut TapelineClient,
    n: usize,
    batch: pb::PublishRequest,
) -> Result<(), ()> {
    lock(world).publishers[n].in_flight = Some(batch.clone());
    let ack = client.publish(batch.clone()).await.map_err(|_| ())?.into_inner();
    if ack.error.is_some() || ack.ticks.len() != batch.records.len() {
        violated(world, "publish refused", format!("p{n}:{}: {ack:?}", batch.sequence));
        return Err(());
    }
    let mut reused = Vec::new();
    {
        let mut w = lock(world);
        w.publishers[n].in_flight = None;
        w.batches += 1;
        w.duplicates += u64::from(ack.duplicate);
        if !ack.duplicate {
            w.records += batch.records.len() as u64;
        }
        for (r, tick) in batch.records.into_iter().zip(ack.ticks) {
            let payload = String::from_utf8(r.payload.to_vec()).unwrap();
            match w.acked.insert((r.stream.clone(), tick), payload.clone()) {
                None => {}
                // A duplicate ack repeats the ticks of the first one, with the same payloads.
                Some(before) if ack.duplicate && before == payload => {}
                Some(before) => {
                    reused.push(format!("{} tick {tick}: {before:.24} then {payload:.24}", r.stream))
                }
            }
        }
    }
    if !reused.is_empty() {
        violated(world, "tick reused", reused.join("; "));
    }
    Ok(())
}

/// Publishes new batches until the broker stops answering.
async fn publish_until_cut(world: Shared, url: String, n: usize) {
    let Ok(mut client) = tapeline::client::connect(&url).await else { return };
    loop {
        let (sequence, quiet) = {
            let mut w = lock(&world);
            w.publishers[n].sequence += 1;
            (w.publishers[n].sequence, w.quiet)
        };
        if send(&world, &mut client, n, new_batch(n, sequence, quiet)).await.is_err() {
            return;
        }
    }
}

/// Creates, changes and deletes the catalog streams until the broker stops answering.
async fn change_catalog_until_cut(world: Shared, url: String) {
    let Ok(mut client) = tapeline::client::connect(&url).await else { return };
    loop {
        let (stream, next) = {
            let mut rng = rand::rng();
            let mut w = lock(&world);
            let stream = format!("power/catalog/{}", rng.random_range(0..CATALOG_STREAMS));
            let exists = w.catalog.get(&stream).is_some_and(Option::is_some);
            let next = (!exists || rng.random_bool(0.6)).then(|| format!("version {}", w.catalog_changes));
            w.catalog_in_flight = Some((stream.clone(), next.clone()));
            (stream, next)
        };
        let answered = match &next {
            Some(description) => {
                let request = pb::CreateStreamRequest {
                    stream: stream.clone(),
                    description: description.clone(),
                    update: true,
                    ..Default::default()
                };
                client.create_stream(request).await.map(|_| ())
            }
            None => {
                client.delete_stream(pb::DeleteStreamRequest { stream: stream.clone() }).await.map(|_| ())
            }
        };
        if answered.is_err() {
            return;
        }
        {
            let mut w = lock(&world);
            w.catalog.insert(stream, next);
            w.catalog_in_flight = None;
            w.catalog_changes += 1;
        }
        tokio::time::sleep(CATALOG_PACE).await;
    }
}

/// After a restart: every acknowledged catalog change is there, and the one in flight at the cut
/// is there or not. The world takes what is found.
async fn check_catalog(world: &Shared, client: &mut TapelineClient) {
    let (catalog, in_flight) = {
        let mut w = lock(world);
        (w.catalog.clone(), w.catalog_in_flight.take())
    };
    let names: std::collections::BTreeSet<String> =
        catalog.keys().cloned().chain(in_flight.iter().map(|(s, _)| s.clone())).collect();
    for stream in names {
        let found = match client.describe_stream(pb::DescribeStreamRequest { stream: stream.clone() }).await {
            Ok(info) => Some(info.into_inner().description),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => {
                violated(world, "describe failed", format!("{stream}: {status}"));
                continue;
            }
        };
        let acked = catalog.get(&stream).cloned().flatten();
        let sent = in_flight.as_ref().filter(|(s, _)| *s == stream).map(|(_, next)| next);
        if found != acked && sent != Some(&found) {
            let detail = format!("{stream}: acknowledged {acked:?}, in flight {sent:?}, found {found:?}");
            violated(world, "acknowledged catalog change lost", detail);
        }
        lock(world).catalog.insert(stream, found);
    }
}

/// Follows `power/**` from the subscriber's positions until the broker stops answering.
async fn subscribe_until_cut(world: Shared, url: String) {
    let Ok(mut client) = tapeline::client::connect(&url).await else { return };
    let resume = lock(&world).positions.clone();
    let request = pb::SubscribeRequest { resume, ..request(&["power/**"], beginning()) };
    let Ok(response) = client.subscribe(request).await else { return };
    let mut stream = response.into_inner();
    while let Ok(Some(message)) = stream.message().await {
        if let Some(pb::subscribe_response::Event::Records(batch)) = message.event {
            let mut w = lock(&world);
            for r in batch.records {
                w.positions.insert(r.stream.clone(), r.tick);
                let payload = String::from_utf8(r.payload.to_vec()).unwrap();
                w.received.entry(r.stream).or_default().push((r.tick, payload));
            }
        }
    }
}

/// The records under `power/**` after `resume` (per stream; the others from the beginning) up to
/// `tail`, in delivery order. A damaged range ends a read with `DATA_LOSS` naming it: the read
/// resumes after it, and each range not seen before is a violation. Any other error is one too,
/// and ends the read.
async fn read(
    world: &Shared,
    url: &str,
    mut resume: HashMap<String, u64>,
    tail: u64,
) -> Vec<(String, u64, String)> {
    let mut client = client(url).await;
    let mut got = Vec::new();
    let mut damaged = Vec::new();
    loop {
        let request =
            pb::SubscribeRequest { resume: resume.clone(), end: tail, ..request(&["power/**"], beginning()) };
        let mut sub = Sub::open(&mut client, request).await;
        let status = loop {
            match sub.next_result().await {
                Ok(Some(events)) => {
                    for (stream, tick, payload) in records(&events) {
                        resume.insert(stream.clone(), tick);
                        got.push((stream, tick, payload));
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        let Some(status) = status else { break };
        match damaged_range(&status) {
            // Each range moves the read forward, so this ends.
            Some((stream, to, cause)) if resume.get(&stream).is_none_or(|&at| at < to) => {
                damaged.push(format!("{stream}: {cause}"));
                resume.insert(stream, to);
            }
            _ => {
                violated(world, "read failed", format!("reading the log to tick {tail}: {status}"));
                break;
            }
        }
    }
    let new: Vec<String> = {
        let mut w = lock(world);
        damaged.into_iter().filter(|d| w.damaged.insert(d.clone())).collect()
    };
    if !new.is_empty() {
        violated(world, "damaged ranges (DATA_LOSS)", new.join("; "));
    }
    got
}

/// The stream, last tick and cause a `DATA_LOSS` status names: "stored data of stream "S" is
/// corrupt in ticks A..=B: CAUSE". (A read resumed inside a range names the rest of it: the
/// stream and the cause tell one damage from another.)
fn damaged_range(status: &tonic::Status) -> Option<(String, u64, String)> {
    if status.code() != tonic::Code::DataLoss {
        return None;
    }
    let message = status.message();
    let stream = message.split('"').nth(1)?.to_string();
    let (ticks, cause) = message.split_once("in ticks ")?.1.split_once(": ")?;
    Some((stream, ticks.split_once("..=")?.1.parse().ok()?, cause.to_string()))
}

/// Everything stored under `power/**`, by (stream, tick), read from the beginning to the tail.
async fn stored(world: &Shared, url: &str) -> BTreeMap<(String, u64), String> {
    let tail = client(url).await.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    let mut log = BTreeMap::new();
    if tail == 0 {
        return log;
    }
    let mut twice = Vec::new();
    for (stream, tick, payload) in read(world, url, HashMap::new(), tail).await {
        if log.insert((stream.clone(), tick), payload).is_some() {
            twice.push(format!("{stream} tick {tick}"));
        }
    }
    if !twice.is_empty() {
        violated(world, "delivered twice", twice.join(", "));
    }
    log
}

/// After a restart: retries every batch that was in flight, then checks the log against all
/// that was ever acknowledged, and that the subscriber's records are exactly the log's prefix.
async fn check(world: &Shared, url: &str) -> usize {
    let mut client = client(url).await;
    check_catalog(world, &mut client).await;
    let in_flight: Vec<(usize, pb::PublishRequest)> = lock(world)
        .publishers
        .iter()
        .enumerate()
        .filter_map(|(n, p)| p.in_flight.clone().map(|b| (n, b)))
        .collect();
    // Where each stored payload is, to tell what a retry must be answered.
    let before: HashMap<String, (String, u64)> =
        stored(world, url).await.into_iter().map(|((s, t), p)| (p, (s, t))).collect();
    for (n, batch) in in_flight {
        lock(world).retried += 1;
        let sequence = batch.sequence;
        let present = batch
            .records
            .iter()
            .filter(|r| before.contains_key(std::str::from_utf8(&r.payload).unwrap()))
            .count();
        if present != 0 && present != batch.records.len() {
            let detail = format!(
                "p{n}:{sequence}: {present} of {} records of an unacknowledged batch were recovered",
                batch.records.len()
            );
            violated(world, "half a batch stored", detail);
        }
        let duplicates = lock(world).duplicates;
        if send(world, &mut client, n, batch).await.is_err() {
            violated(world, "retry not answered", format!("p{n}:{sequence}"));
            continue;
        }
        let duplicate = lock(world).duplicates > duplicates;
        if duplicate != (present > 0) {
            let detail = format!(
                "p{n}:{sequence}: the batch {} stored before its retry, and the retry was answered as {}",
                if present > 0 { "was" } else { "was not" },
                if duplicate { "a duplicate" } else { "new" }
            );
            violated(world, "retry answered wrongly", detail);
        }
        lock(world)
            .retries
            .push(format!("p{n}:{sequence} {}", if duplicate { "was stored" } else { "appended now" }));
    }
    let log = stored(world, url).await;
    // Retention removed the records of each stream before its first stored one. It never removes
    // a stream's last chunk, so a stream the cut emptied lost everything, even if a retry has
    // just appended to it again: retention removed nothing of it.
    let survived: std::collections::HashSet<&str> = before.values().map(|(s, _)| s.as_str()).collect();
    let mut first: HashMap<String, u64> = HashMap::new();
    for (stream, tick) in log.keys().filter(|(s, _)| survived.contains(s.as_str())) {
        first.entry(stream.clone()).or_insert(*tick);
    }
    let kept = |stream: &str, tick: u64| first.get(stream).is_none_or(|&f| tick >= f);
    let (acked, mismatch) = {
        let mut w = lock(world);
        let removed = w.acked.keys().filter(|(s, t)| !kept(s, *t)).count();
        if removed > w.removed {
            w.removals_seen += 1;
            w.removed = removed;
        }
        let acked: BTreeMap<(String, u64), String> =
            w.acked.iter().filter(|((s, t), _)| kept(s, *t)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let retries = &w.retries[w.retries.len().saturating_sub(10)..];
        (acked.len(), (log != acked).then(|| differences(&log, &acked, retries)))
    };
    if let Some((kind, detail)) = mismatch {
        violated(
            world,
            kind,
            format!("log ({}) != acknowledged and not removed by retention ({acked}): {detail}", log.len()),
        );
        // Going on (`POWERLOSS_CONTINUE`): what is stored now is what later checks expect.
        lock(world).acked = log.clone();
    }
    // The subscriber got a prefix of each stream: whole batches, in order, nothing the log lacks.
    let mut ahead = Vec::new();
    for (stream, got) in &mut lock(world).received {
        got.retain(|(t, _)| kept(stream, *t));
        let expected: Vec<(u64, String)> = log
            .range((stream.clone(), 0)..=(stream.clone(), u64::MAX))
            .map(|((_, t), p)| (*t, p.clone()))
            .collect();
        let prefix = got.len() <= expected.len() && got[..] == expected[..got.len()];
        if !prefix {
            let first_wrong = got.iter().zip(&expected).position(|(g, e)| g != e).unwrap_or(expected.len());
            let wrong = got.get(first_wrong).map(|(t, p)| format!("tick {t} {p:.24}"));
            ahead.push(format!(
                "{stream}: got {} records, the log holds {}; first not in the log: {wrong:?}",
                got.len(),
                expected.len()
            ));
            // Going on: the subscriber's view becomes the log's, up to where it got.
            let last = got.last().map_or(0, |(t, _)| *t);
            *got = expected.into_iter().take_while(|(t, _)| *t <= last).collect();
        }
    }
    if !ahead.is_empty() {
        violated(world, "subscriber got records the log lacks", ahead.join("; "));
    }
    log.len()
}

/// What tells the log from what was acknowledged: the kind of violation and its details.
fn differences(
    log: &BTreeMap<(String, u64), String>,
    acked: &BTreeMap<(String, u64), String>,
    retries: &[String],
) -> (&'static str, String) {
    let missing: Vec<_> = acked.keys().filter(|k| !log.contains_key(*k)).collect();
    let extra: Vec<_> = log
        .iter()
        .filter(|(k, _)| !acked.contains_key(*k))
        .map(|((s, t), p)| (s, t, &p[..p.len().min(24)]))
        .collect();
    let changed: Vec<_> =
        log.iter().filter(|(k, v)| acked.get(*k).is_some_and(|a| a != *v)).take(5).collect();
    let kind = if !missing.is_empty() {
        "acknowledged records lost"
    } else if !changed.is_empty() {
        "records changed"
    } else {
        "records never acknowledged"
    };
    let detail = format!(
        "{} missing {:?}, {} not acknowledged {:?}, changed {changed:?}; last retries {retries:?}",
        missing.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        &extra[..extra.len().min(10)],
    );
    (kind, detail)
}

/// The broker's arguments on `data`, with the settings file `settings`.
fn serve_args<'a>(data: &'a str, settings: &'a str) -> [&'a str; 9] {
    ["serve", "--listen", "127.0.0.1:0", "--data", data, "--fsync", "always", "--config", settings]
}

/// Starts the broker, ready to serve. A refusal to start is a violation; going on, the broker
/// starts over on an emptied data dir (what the suite then finds follows from cuts of a broker
/// running as it would, not from a repair no operator would make).
fn start(world: &Shared, args: &[&str], data: &Path, log: PathBuf) -> Serve {
    let err = match Serve::try_spawn(args, log.clone()) {
        Ok(serve) => return serve,
        Err(err) => err,
    };
    // The binary's own last word is its error (`tapeline: ...`).
    let line = err.lines().rev().find(|l| l.starts_with("tapeline: ")).unwrap_or(&err).to_string();
    violated(world, "refused to start", line);
    std::fs::remove_dir_all(data).expect("empty the data dir");
    std::fs::create_dir(data).expect("create the data dir");
    let mountpoint = data.parent().expect("the mount point");
    std::fs::File::open(mountpoint).and_then(|d| d.sync_all()).expect("sync the mount point");
    lock(world).started_over += 1;
    Serve::spawn(args, log.with_extension("started-over.log"))
}

fn cuts(n: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Off the simulated disk: the settings, the broker's logs (one per start) and the mount point.
    let dir = tempfile::tempdir().unwrap();
    let settings_file = dir.path().join("tapeline.toml");
    std::fs::write(&settings_file, settings()).unwrap();
    let settings = settings_file.to_str().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mountpoint = dir.path().join("disk");
    std::fs::create_dir(&mountpoint).unwrap();
    let mut disk = PowerCutFs::mount(&mountpoint);
    // The data dir exists before the broker first starts, durably, as an operator makes it: the
    // broker would create it, but never syncs the directory above it, so the first cut would
    // take everything.
    let data = mountpoint.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::File::open(&mountpoint).and_then(|d| d.sync_all()).unwrap();
    let data_arg = data.to_str().unwrap();
    let args = serve_args(data_arg, settings);
    // Kept for a post-mortem when the suite fails (dropped before the disk is unmounted).
    let keep = KeepOnPanic { data: data.clone(), logs: logs.clone() };
    let world: Shared = Arc::new(Mutex::new(World {
        publishers: vec![Publisher::default(); PUBLISHERS],
        ..World::default()
    }));
    let mut rng = rand::rng();
    let began = std::time::Instant::now();
    for cut in 0..n {
        let log = logs.join(format!("serve-{cut:04}.log"));
        {
            let mut w = lock(&world);
            w.cut = cut;
            w.quiet = cut < n / 4;
        }
        let batches = lock(&world).batches;
        let when = if rng.random_bool(0.2) {
            // During recovery: killed before it is ready, before or while it opens the data dir.
            let mut serve = Serve::launch(&args, log.clone());
            let after = rng.random_range(0..=50);
            std::thread::sleep(Duration::from_millis(after));
            serve.child.kill().unwrap();
            serve.child.wait().unwrap();
            lock(&world).during_recovery += 1;
            format!("during recovery, {after} ms after the start")
        } else {
            let mut serve = start(&world, &args, &data, log.clone());
            let url = serve.url.clone();
            runtime.block_on(check(&world, &url));
            let mut tasks = Vec::new();
            for p in 0..PUBLISHERS {
                tasks.push(runtime.spawn(publish_until_cut(world.clone(), url.clone(), p)));
            }
            tasks.push(runtime.spawn(subscribe_until_cut(world.clone(), url.clone())));
            tasks.push(runtime.spawn(change_catalog_until_cut(world.clone(), url.clone())));
            let load = rng.random_range(30..300);
            std::thread::sleep(Duration::from_millis(load));
            let mut when = format!("after {load} ms of load");
            if rng.random_bool(0.2) {
                // During shutdown: SIGTERM, then the cut while it drains.
                let pid = serve.child.id().to_string();
                std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
                let draining = rng.random_range(0..30);
                std::thread::sleep(Duration::from_millis(draining));
                lock(&world).during_shutdown += 1;
                // Whether its final flush was done tells what the cut could take.
                let exited = matches!(serve.child.try_wait(), Ok(Some(_)));
                let how = if exited { "it had exited" } else { "still running" };
                when += &format!(", during shutdown ({draining} ms after SIGTERM, {how})");
            }
            serve.child.kill().unwrap();
            serve.child.wait().unwrap();
            runtime.block_on(async {
                for task in tasks {
                    tokio::time::timeout(WAIT, task).await.expect("clients notice the cut").unwrap();
                }
            });
            when
        };
        let compactions = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("chunks moved out of sparse chunk files")
            .count();
        // The broker has exited: nothing holds a file on the disk.
        let report = disk.power_cut(rng.random_bool(0.5));
        let mut w = lock(&world);
        w.last_cut = format!("{when}, {} batches acknowledged: {report}", w.batches - batches);
        eprintln!("cut {cut}: {}", w.last_cut);
        w.compactions += compactions as u64;
        w.torn += u64::from(report.torn);
        if cut % 20 == 19 {
            eprintln!("after {} cuts: {} records acknowledged, {:?}", cut + 1, w.records, began.elapsed());
        }
    }
    // The last restart: everything checks, and the subscriber resumes to exactly the log.
    lock(&world).cut = n;
    let serve = start(&world, &args, &data, logs.join("serve-last.log"));
    let total = runtime.block_on(async {
        let total = check(&world, &serve.url).await;
        let tail =
            client(&serve.url).await.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
        let resume = lock(&world).positions.clone();
        let rest = read(&world, &serve.url, resume, tail).await;
        // (The trimmer may have removed more since `check`: compare with the log as it is now.)
        let log = stored(&world, &serve.url).await;
        let received = {
            let mut w = lock(&world);
            for (stream, tick, payload) in rest {
                w.received.entry(stream).or_default().push((tick, payload));
            }
            let delivered: std::collections::HashSet<(&str, u64)> = w
                .received
                .iter()
                .flat_map(|(s, got)| got.iter().map(move |(t, _)| (s.as_str(), *t)))
                .collect();
            log.keys().filter(|(stream, tick)| delivered.contains(&(stream.as_str(), *tick))).count()
        };
        if received != log.len() {
            let detail = format!("{received} of the {} records stored were delivered", log.len());
            violated(&world, "resuming did not give exactly the rest", detail);
        }
        total
    });
    // Chunk files are numbered from 0 in the order they were started.
    let files: Vec<u32> = std::fs::read_dir(data.join(tapeline::store::layout::LOG_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".tpc")?.parse().ok())
        .collect();
    let started = files.iter().max().map_or(0, |newest| newest + 1);
    let w = lock(&world);
    eprintln!(
        "power-loss suite: {n} cuts ({} torn, {} during recovery, {} during shutdown) in {:?}; {} batches acknowledged ({} retried after a cut, {} of them already stored), {} records, {} catalog changes; retention removed the oldest {} (its front moved in {} checks); {started} chunk files started ({} left), {} compactions of sparse ones; {total} records stored at the end",
        w.torn,
        w.during_recovery,
        w.during_shutdown,
        began.elapsed(),
        w.batches,
        w.retried,
        w.duplicates,
        w.records,
        w.catalog_changes,
        w.removed,
        w.removals_seen,
        files.len(),
        w.compactions,
    );
    if !w.violations.is_empty() {
        let mut kinds: BTreeMap<&str, (usize, std::collections::BTreeSet<usize>)> = BTreeMap::new();
        for (cut, kind, _) in &w.violations {
            let entry = kinds.entry(kind).or_default();
            entry.0 += 1;
            entry.1.insert(*cut);
        }
        let cuts: std::collections::BTreeSet<usize> = w.violations.iter().map(|v| v.0).collect();
        let by_kind: Vec<String> =
            kinds.iter().map(|(k, (count, at))| format!("{k}: {count} (after {} cuts)", at.len())).collect();
        panic!(
            "{} violations, after {} of the {n} cuts (and the final start): {}; started over on an emptied data dir {} times",
            w.violations.len(),
            cuts.len(),
            by_kind.join("; "),
            w.started_over
        );
    }
    assert!(w.removals_seen > 0, "retention removed nothing: the suite did not cut during removals");
    assert!(w.catalog_changes > 0, "no catalog change was acknowledged");
    assert!(started > 1, "no chunk file was started: the suite did not cut around rotations");
    if n >= LONG_CUTS {
        assert!(w.compactions > 0, "nothing was compacted: the suite did not cut around compactions");
    }
    drop(serve);
    drop(keep);
}

/// Copies the data dir off the simulated disk, and the broker's logs, aside (named in the output)
/// if the test is panicking, and prints the tail of the last log.
struct KeepOnPanic {
    data: PathBuf,
    logs: PathBuf,
}

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let to = std::env::temp_dir().join(format!("tapeline-powerloss-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&to);
        for from in [&self.data, &self.logs] {
            let _ = std::process::Command::new("cp").arg("-r").arg(from).arg(&to).status();
        }
        eprintln!("data dir and broker logs kept in {}", to.display());
        let mut logs: Vec<PathBuf> =
            std::fs::read_dir(&self.logs).into_iter().flatten().flatten().map(|e| e.path()).collect();
        logs.sort();
        // `serve-last.log` sorts after the numbered ones.
        for log in logs.iter().rev().take(2).rev() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- the tail of {} ---\n{}",
                log.display(),
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
    }
}

type TapelineClient = tapeline::client::Client;

#[test]
fn acknowledged_records_survive_power_cuts() {
    cuts(CI_CUTS);
}

#[test]
#[ignore = "long: at least 300 power cuts, several minutes"]
fn acknowledged_records_survive_a_long_run_of_power_cuts() {
    cuts(LONG_CUTS);
}

/// sled's lock (`flock`, which the kernel keeps for a FUSE filesystem that does not implement
/// locks) still keeps a second broker off a data dir on the simulated disk.
#[test]
fn a_second_broker_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("disk");
    std::fs::create_dir(&mountpoint).unwrap();
    let disk = PowerCutFs::mount(&mountpoint);
    let data = disk.path().join("data");
    let args = ["serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()];
    let first = Serve::spawn(&args, dir.path().join("first.log"));
    let second = Serve::try_spawn(&args, dir.path().join("second.log"));
    let err = second.expect_err("a second broker on the same data dir is refused");
    assert!(err.contains("another process holds its lock"), "{err}");
    let tail = tokio::runtime::Runtime::new().unwrap().block_on(async {
        client(&first.url).await.hello(pb::HelloRequest::default()).await.map(|h| h.into_inner().tail_tick)
    });
    assert!(tail.is_ok(), "the first broker still serves: {tail:?}");
    drop(first);
}
