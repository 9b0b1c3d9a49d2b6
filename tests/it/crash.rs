//! The crash suite, through the real binary: publishers stream acknowledged, idempotent batches
//! over several streams while the broker is killed with SIGKILL at random moments (most often in
//! the middle of group commits, sometimes just after SIGTERM, during shutdown), then restarted on
//! the same data dir, again and again. After every restart:
//! - every acknowledged record is present exactly once, in order, with its tick and payload;
//! - a batch that was in flight at the kill is retried with its producer id and sequence: it is
//!   then acknowledged exactly once, with the ticks it got if it had been stored (never half of
//!   it), so the log must equal exactly the set of batches ever sent;
//! - a subscriber that resumes with its last positions gets exactly the rest.
//!
//! Retention runs all the while (each stream keeps at most its newest `KEPT` records, checked every
//! 20 ms), so kills also land in the middle of removals. Retention removes only from
//! the front: of each stream, every acknowledged record from the first one stored on is present,
//! and those before it are gone.
//!
//! CI runs `CI_CYCLES`; `cargo test --test it crash:: -- --ignored --nocapture` runs `LONG_CYCLES` and
//! prints the counts (the README's guarantees section quotes a run).

use crate::support::*;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tapeline::protocol::pb;

const CI_CYCLES: usize = 20;
const LONG_CYCLES: usize = 300;
const PUBLISHERS: usize = 3;
const STREAMS: usize = 4;
/// Records each stream keeps (retention's `max_records`).
const KEPT: usize = 1500;

/// The broker's settings file: retention that runs often.
fn settings() -> String {
    format!("[retention]\nmax_records = {KEPT}\ncheck_every = \"20ms\"\n")
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
    /// Counts for the report.
    batches: u64,
    retried: u64,
    duplicates: u64,
    during_shutdown: u64,
    /// Acknowledged records retention removed, as of the last check, and the checks that saw
    /// the number grow.
    removed: usize,
    removals_seen: u64,
    /// Each retry after a restart, for a failure's report.
    retries: Vec<String>,
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

/// A new batch of publisher `n`: 1 to 20 records over one or two streams, payloads naming it.
fn new_batch(n: usize, sequence: u64) -> pb::PublishRequest {
    let mut rng = rand::rng();
    let size = rng.random_range(1..=20);
    let records = (0..size)
        .map(|i| {
            let stream = format!("crash/s{}", (n + i % 2 * rng.random_range(0..STREAMS)) % STREAMS);
            record(&stream, format!("p{n}:{sequence}:{i}:{}", "x".repeat(rng.random_range(0..200))))
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
    assert!(ack.error.is_none(), "{ack:?}");
    assert_eq!(ack.ticks.len(), batch.records.len());
    let mut w = lock(world);
    w.publishers[n].in_flight = None;
    w.batches += 1;
    w.duplicates += u64::from(ack.duplicate);
    for (r, tick) in batch.records.into_iter().zip(ack.ticks) {
        let payload = String::from_utf8(r.payload.to_vec()).unwrap();
        match w.acked.insert((r.stream.clone(), tick), payload.clone()) {
            None => {}
            // A duplicate ack repeats the ticks of the first one, with the same payloads.
            Some(before) => assert!(ack.duplicate && before == payload, "tick {tick} of {} reused", r.stream),
        }
    }
    Ok(())
}

/// Publishes new batches until the broker stops answering.
async fn publish_until_killed(world: Shared, url: String, n: usize) {
    let Ok(mut client) = tapeline::client::connect(&url).await else { return };
    loop {
        let sequence = {
            let mut w = lock(&world);
            w.publishers[n].sequence += 1;
            w.publishers[n].sequence
        };
        if send(&world, &mut client, n, new_batch(n, sequence)).await.is_err() {
            return;
        }
    }
}

/// Follows `crash/**` from the subscriber's positions until the broker stops answering.
async fn subscribe_until_killed(world: Shared, url: String) {
    let Ok(mut client) = tapeline::client::connect(&url).await else { return };
    let resume = lock(&world).positions.clone();
    let request = pb::SubscribeRequest { resume, ..request(&["crash/**"], beginning()) };
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

/// Everything stored under `crash/**`, by (stream, tick), read from the beginning to the tail.
async fn stored(url: &str) -> BTreeMap<(String, u64), String> {
    let mut client = client(url).await;
    let tail = client.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    let mut log = BTreeMap::new();
    if tail == 0 {
        return log;
    }
    let mut sub =
        Sub::open(&mut client, pb::SubscribeRequest { end: tail, ..request(&["crash/**"], beginning()) })
            .await;
    for (stream, tick, payload) in records(&sub.until_end().await) {
        let again = log.insert((stream.clone(), tick), payload);
        assert!(again.is_none(), "{stream} tick {tick} delivered twice");
    }
    log
}

/// After a restart: retries every batch that was in flight, then checks the log against all
/// that was ever acknowledged, and that the subscriber's records are exactly the log's prefix.
async fn check(world: &Shared, url: &str) -> usize {
    let mut client = client(url).await;
    let in_flight: Vec<(usize, pb::PublishRequest)> = lock(world)
        .publishers
        .iter()
        .enumerate()
        .filter_map(|(n, p)| p.in_flight.clone().map(|b| (n, b)))
        .collect();
    // Where each stored payload is, to tell what a retry must be answered.
    let before: HashMap<String, (String, u64)> =
        stored(url).await.into_iter().map(|((s, t), p)| (p, (s, t))).collect();
    for (n, batch) in in_flight {
        lock(world).retried += 1;
        let sequence = batch.sequence;
        let present = batch
            .records
            .iter()
            .filter(|r| before.contains_key(std::str::from_utf8(&r.payload).unwrap()))
            .count();
        assert!(
            present == 0 || present == batch.records.len(),
            "p{n}:{sequence}: {present} of {} records of an unacknowledged batch were recovered",
            batch.records.len()
        );
        let duplicates = lock(world).duplicates;
        send(world, &mut client, n, batch).await.expect("a retry after restart is answered");
        let duplicate = lock(world).duplicates > duplicates;
        assert_eq!(
            duplicate,
            present > 0,
            "p{n}:{sequence}: the batch {} stored before its retry, and the retry was answered as {}",
            if present > 0 { "was" } else { "was not" },
            if duplicate { "a duplicate" } else { "new" }
        );
        lock(world)
            .retries
            .push(format!("p{n}:{sequence} {}", if duplicate { "was stored" } else { "appended now" }));
    }
    let log = stored(url).await;
    let mut w = lock(world);
    // Retention removed the records of each stream before its first stored one.
    let mut first: HashMap<String, u64> = HashMap::new();
    for (stream, tick) in log.keys() {
        first.entry(stream.clone()).or_insert(*tick);
    }
    let kept = |stream: &str, tick: u64| first.get(stream).is_none_or(|&f| tick >= f);
    let removed = w.acked.keys().filter(|(s, t)| !kept(s, *t)).count();
    if removed > w.removed {
        w.removals_seen += 1;
        w.removed = removed;
    }
    let acked: BTreeMap<(String, u64), String> =
        w.acked.iter().filter(|((s, t), _)| kept(s, *t)).map(|(k, v)| (k.clone(), v.clone())).collect();
    if log != acked {
        let w = (&acked, &w.retries);
        let missing: Vec<_> = w.0.keys().filter(|k| !log.contains_key(*k)).take(5).collect();
        let extra: Vec<_> = log
            .iter()
            .filter(|(k, _)| !w.0.contains_key(*k))
            .map(|((s, t), p)| (s, t, &p[..p.len().min(24)]))
            .take(30)
            .collect();
        let changed: Vec<_> =
            log.iter().filter(|(k, v)| w.0.get(*k).is_some_and(|a| a != *v)).take(5).collect();
        panic!(
            "log ({}) != acknowledged and not removed by retention ({}): missing {missing:?}, not acknowledged {extra:?}, changed {changed:?}; last retries {:?}",
            log.len(),
            w.0.len(),
            &w.1[w.1.len().saturating_sub(10)..]
        );
    }
    // Every batch is whole: its records are the batch's records (checked by payload names).
    for (stream, got) in &w.received {
        let got: Vec<(u64, String)> = got.iter().filter(|(t, _)| kept(stream, *t)).cloned().collect();
        let expected: Vec<(u64, String)> = log
            .range((stream.clone(), 0)..=(stream.clone(), u64::MAX))
            .map(|((_, t), p)| (*t, p.clone()))
            .collect();
        assert!(got.len() <= expected.len(), "{stream}: the subscriber got more than the log holds");
        assert_eq!(got[..], expected[..got.len()], "{stream}: the subscriber's records are the log's prefix");
    }
    log.len()
}

fn cycles(n: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let settings_file = dir.path().join("tapeline.toml");
    std::fs::write(&settings_file, settings()).unwrap();
    let settings = settings_file.to_str().unwrap();
    // Kept for a post-mortem when the suite fails.
    let keep = KeepOnPanic(data.clone());
    let world: Shared = Arc::new(Mutex::new(World {
        publishers: vec![Publisher::default(); PUBLISHERS],
        ..World::default()
    }));
    let mut rng = rand::rng();
    let began = std::time::Instant::now();
    for cycle in 0..n {
        let serve = Serve::start(&data, &["--fsync", "always", "--config", settings]);
        let url = serve.url.clone();
        runtime.block_on(check(&world, &url));
        let mut tasks = Vec::new();
        for p in 0..PUBLISHERS {
            tasks.push(runtime.spawn(publish_until_killed(world.clone(), url.clone(), p)));
        }
        tasks.push(runtime.spawn(subscribe_until_killed(world.clone(), url.clone())));
        std::thread::sleep(Duration::from_millis(rng.random_range(30..300)));
        let mut serve = serve;
        if rng.random_bool(0.2) {
            // During shutdown: SIGTERM, then SIGKILL while it drains.
            let pid = serve.child.id().to_string();
            std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
            lock(&world).during_shutdown += 1;
        }
        serve.child.kill().unwrap();
        serve.child.wait().unwrap();
        runtime.block_on(async {
            for task in tasks {
                tokio::time::timeout(WAIT, task).await.expect("clients notice the kill").unwrap();
            }
        });
        if cycle % 20 == 19 {
            let w = lock(&world);
            eprintln!("cycle {}: {} records acknowledged, {:?}", cycle + 1, w.acked.len(), began.elapsed());
        }
    }
    // The last restart: everything checks, and the subscriber resumes to exactly the log.
    let serve = Serve::start(&data, &["--fsync", "always", "--config", settings]);
    let total = runtime.block_on(async {
        let total = check(&world, &serve.url).await;
        let tail =
            client(&serve.url).await.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
        let resume = lock(&world).positions.clone();
        let mut c = client(&serve.url).await;
        let request = pb::SubscribeRequest { resume, end: tail, ..request(&["crash/**"], beginning()) };
        let mut sub = Sub::open(&mut c, request).await;
        let rest = records(&sub.until_end().await);
        // (The trimmer may have removed more since `check`: compare with the log as it is now.)
        let log = stored(&serve.url).await;
        let mut w = lock(&world);
        for (stream, tick, payload) in rest {
            w.received.entry(stream).or_default().push((tick, payload));
        }
        let delivered: std::collections::HashSet<(&str, u64)> =
            w.received.iter().flat_map(|(s, got)| got.iter().map(move |(t, _)| (s.as_str(), *t))).collect();
        let received =
            log.keys().filter(|(stream, tick)| delivered.contains(&(stream.as_str(), *tick))).count();
        assert_eq!(received, log.len(), "resuming gave exactly the rest");
        assert!(log.len() <= total);
        log.len()
    });
    let w = lock(&world);
    eprintln!(
        "crash suite: {n} SIGKILL cycles ({} during shutdown) in {:?}; {} batches acknowledged ({} retried after a kill, {} of them already stored), {} records; retention removed the oldest {} (its front moved in {} cycles); the {total} kept are present exactly once",
        w.during_shutdown,
        began.elapsed(),
        w.batches,
        w.retried,
        w.duplicates,
        w.acked.len(),
        w.removed,
        w.removals_seen
    );
    assert!(w.removals_seen > 0, "retention removed nothing: the suite did not test kills during removals");
    drop(serve);
    drop(keep);
}

/// Copies the data dir aside (named in the output) if the test is panicking.
struct KeepOnPanic(std::path::PathBuf);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let to = std::env::temp_dir().join(format!("tapeline-crash-{}", std::process::id()));
            let _ = std::process::Command::new("cp").arg("-r").arg(&self.0).arg(&to).status();
            eprintln!("data dir kept in {}", to.display());
        }
    }
}

type TapelineClient = tapeline::client::Client;

#[test]
fn acknowledged_records_survive_sigkill_cycles() {
    cycles(CI_CYCLES);
}

#[test]
#[ignore = "long: at least 300 SIGKILL cycles, several minutes"]
fn acknowledged_records_survive_a_long_run_of_sigkill_cycles() {
    cycles(LONG_CYCLES);
}
