//! A young or empty broker: one that never stored a record answers with the present, and a bounded
//! read over nothing ends at once.

use crate::support::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tapeline::protocol::pb;

/// The wall clock as a tick.
fn now() -> u64 {
    tapeline::types::Tick::now().0
}

/// `Hello.tail_tick`, a subscription's `CaughtUp` and its first heartbeat on a broker that never
/// stored a record are the clock's value, not 0: a client's first resume point means what it says.
#[tokio::test]
async fn an_empty_broker_tells_the_present() {
    let (_dir, _server, mut client) = started().await;
    let before = now();
    let hello = client.hello(pb::HelloRequest::default()).await.unwrap().into_inner();
    assert!(
        hello.tail_tick >= before - 1_000_000_000 && hello.tail_tick <= now(),
        "Hello.tail_tick {} is not the clock's value (about {before})",
        hello.tail_tick
    );

    let mut req = request(&["nothing/**"], beginning());
    req.heartbeat_ms = 100;
    let mut sub = Sub::open(&mut client, req).await;
    let (records, caught_up) = sub.until_caught_up().await;
    assert!(records.is_empty(), "{records:?}");
    assert!(caught_up >= hello.tail_tick, "CaughtUp {caught_up} is behind Hello's tail {}", hello.tail_tick);
    let heartbeat = loop {
        let events = sub.next().await.expect("the subscription goes on");
        if let Some(tail) = events.iter().find_map(|e| match e {
            Seen::Heartbeat { tail_tick } => Some(*tail_tick),
            _ => None,
        }) {
            break tail;
        }
    };
    assert!(heartbeat >= caught_up && heartbeat > 0, "first heartbeat {heartbeat}, CaughtUp {caught_up}");
}

/// `tail --to now` over streams that do not exist ends at once with nothing and exit 0 (it used to
/// resume forever: the tail of an empty broker was 0, and a bounded read to 0 never ended).
#[test]
fn a_bounded_read_over_nothing_ends_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &[]);
    let url = format!("http://{}", serve.addr());
    let mut child = Command::new(BIN)
        .args(["tail", "x/**", "--to", "now", "--server", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("tail --to now did not end: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stderr.is_empty(), "no resumes, no warnings: {}", String::from_utf8_lossy(&out.stderr));
    serve.terminate();
}

/// A store-wide bound holds at write time, not only at the trimmer's next tick: 50 MB published
/// as fast as 4 connections can into a store bounded to 8 MiB (the trimmer's timer set to an
/// hour) never holds more than the bound plus what the publishers hand in while a pass runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_wide_bound_holds_at_write_time() {
    const BOUND: u64 = 8 << 20;
    const TOLERANCE: u64 = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.retention.max_total_bytes = Some(BOUND);
    config.retention.check_every = Duration::from_secs(3600);
    let server = TestServer::start_with(config).await;
    let payload = "x".repeat(4096);
    let mut publishers = Vec::new();
    for p in 0..4 {
        let mut client = server.client().await;
        let payload = payload.clone();
        publishers.push(tokio::spawn(async move {
            // 4 × 48 batches of 64 records of 4 KiB: 48 MiB in all.
            for b in 0..48 {
                let records =
                    (0..64).map(|_| record(&format!("bound/s{}", (p + b) % 2), payload.clone())).collect();
                publish_records(&mut client, records).await;
            }
        }));
    }
    let mut watcher = server.client().await;
    let mut most = 0;
    while !publishers.iter().all(|p| p.is_finished()) {
        let held: u64 = stored_streams(&mut watcher).await.iter().map(|s| s.bytes).sum();
        most = most.max(held);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for p in publishers {
        p.await.unwrap();
    }
    let held: u64 = stored_streams(&mut watcher).await.iter().map(|s| s.bytes).sum();
    most = most.max(held);
    println!("held at most {most} bytes under a bound of {BOUND}");
    assert!(
        most <= BOUND + TOLERANCE,
        "the store held {most} bytes, over its bound of {BOUND} by more than {TOLERANCE}"
    );
    server.stop().await;
}
