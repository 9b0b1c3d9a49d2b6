//! The hostile-clients suite (issue 20, part 5): a broker (the real binary) under one attack at a
//! time, while a well-behaved publisher and subscriber keep going (the last attack is an upstream
//! feeding a relay records it cannot take, with a pair that publishes upstream and reads at the
//! relay). For each attack: their
//! publish-to-delivery latency before and during it, the broker's peak resident memory (VmHWM,
//! reset before each attack) and, after it, every record the publisher had acknowledged read back
//! intact. Ignored in the plain `cargo test` (its latencies mean something only when nothing else
//! runs); `.ci/run` runs it alone: `cargo test --test it siege -- --ignored --test-threads=1`.

use crate::support::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapeline::protocol::pb;
use tokio::sync::watch;
use tonic::Code;

/// How long latency is sampled before an attack and during it.
const BEFORE: Duration = Duration::from_secs(2);
const DURING: Duration = Duration::from_secs(3);
/// The broker's peak resident memory under any attack stays below this.
const RSS_BOUND_MIB: u64 = 512;

fn wall_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// The well-behaved pair: one record every 10 ms, published one call at a time, and a live
/// subscriber measuring each record's latency from its sending.
struct Pair {
    samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
    acked: Arc<Mutex<Vec<u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
    stream: &'static str,
}

impl Pair {
    /// Publishes to `stream` at `publish` and reads it live at `read` (the same broker, or a
    /// relay of it).
    async fn start(publish: &str, read: &str, stream: &'static str) -> Pair {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = watch::channel(false);
        let mut reader = client(read).await;
        let mut sub = Sub::open(&mut reader, request(&[stream], now())).await;
        let seen = samples.clone();
        tokio::spawn(async move {
            while let Ok(Some(events)) = sub.next_result().await {
                for event in events {
                    if let Seen::Record { payload, .. } = event {
                        let sent: u64 = payload.parse().unwrap_or(0);
                        let latency = Duration::from_nanos(wall_nanos().saturating_sub(sent));
                        seen.lock().unwrap().push((Instant::now(), latency));
                    }
                }
            }
        });
        let mut writer = client(publish).await;
        let (ticks, failed) = (acked.clone(), errors.clone());
        tokio::spawn(async move {
            while !*stopped.borrow() {
                let batch = pb::PublishRequest {
                    records: vec![record(stream, wall_nanos().to_string())],
                    ..Default::default()
                };
                match writer.publish(batch).await {
                    Ok(ack) => ticks.lock().unwrap().extend(ack.into_inner().ticks),
                    Err(status) => {
                        failed.lock().unwrap().push(format!("{:?}: {}", status.code(), status.message()))
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Pair { samples, acked, errors, stop, stream }
    }

    /// Median and 99th percentile of the latencies sampled from `from` for `span`.
    async fn latency(&self, span: Duration) -> (Duration, Duration, usize) {
        let from = Instant::now();
        tokio::time::sleep(span).await;
        let mut window: Vec<Duration> =
            self.samples.lock().unwrap().iter().filter(|(at, _)| *at >= from).map(|(_, l)| *l).collect();
        assert!(window.len() > 10, "the well-behaved subscriber got {} records in {span:?}", window.len());
        window.sort();
        let at = |q: f64| window[((window.len() - 1) as f64 * q) as usize];
        (at(0.5), at(0.99), window.len())
    }

    /// Every acknowledged record, read back by a bounded subscription from the beginning.
    async fn intact(&self, url: &str) {
        let acked = self.acked.lock().unwrap().clone();
        let Some(&last) = acked.last() else { panic!("nothing was acknowledged") };
        let mut c = client(url).await;
        let mut sub =
            Sub::open(&mut c, pb::SubscribeRequest { end: last, ..request(&[self.stream], beginning()) })
                .await;
        let read: Vec<u64> = records(&sub.until_end().await).iter().map(|r| r.1).collect();
        assert_eq!(read, acked, "every acknowledged record of the well-behaved publisher, once, in order");
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "the well-behaved publisher was refused: {errors:?}");
    }
}

/// The broker's peak resident memory since the last reset, in MiB.
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the broker's VmHWM");
}

/// One attack's figures.
struct Figures {
    attack: &'static str,
    before: (Duration, Duration, usize),
    during: (Duration, Duration, usize),
    peak_mib: u64,
    detail: String,
}

/// Runs `attack` (which starts, returns a stopper, and is stopped after the measurement) and
/// checks the pair kept working.
/// `serve` is the broker whose memory is measured and where the pair's records are read back.
async fn siege<F, Fut, S, SFut>(serve: &Serve, pair: &Pair, attack: &'static str, start: F) -> Figures
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = S>,
    S: FnOnce() -> SFut,
    SFut: std::future::Future<Output = String>,
{
    let pid = serve.child.id();
    let before = pair.latency(BEFORE).await;
    reset_peak(pid);
    let stop = start().await;
    let during = pair.latency(DURING).await;
    let peak_mib = peak_mib(pid);
    let detail = stop().await;
    pair.intact(&serve.url).await;
    let figures = Figures { attack, before, during, peak_mib, detail };
    eprintln!(
        "| {} | {:.1} ms / {:.1} ms | {:.1} ms / {:.1} ms | {} MiB | {} |",
        figures.attack,
        ms(before.0),
        ms(before.1),
        ms(during.0),
        ms(during.1),
        peak_mib,
        figures.detail
    );
    figures
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures latency: run alone, as .ci/run does"]
async fn a_well_behaved_pair_keeps_working_through_every_attack() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &[]);
    let url = serve.url.clone();
    let addr: std::net::SocketAddr = serve.addr().parse().unwrap();
    let pair = Pair::start(&url, &url, "calm/s").await;
    // Settle: the pair's first records, connections warm.
    pair.latency(Duration::from_secs(1)).await;
    eprintln!("| attack | pair latency before, p50 / p99 | during, p50 / p99 | broker peak RSS | what the attack got |");
    eprintln!("| --- | ---: | ---: | ---: | --- |");
    let mut all = Vec::new();

    // 1. Ten thousand connections that send nothing.
    all.push(
        siege(&serve, &pair, "10,000 connections that send nothing", || async move {
            let mut sockets = Vec::with_capacity(10_000);
            for _ in 0..10_000 {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => sockets.push(s),
                    Err(err) => panic!("connection {} refused: {err}", sockets.len()),
                }
            }
            move || async move {
                // Closed by the broker after handshake_timeout (10 s): read until they end.
                let began = Instant::now();
                let mut closed = 0;
                for mut s in sockets {
                    use tokio::io::AsyncReadExt;
                    // The broker's HTTP/2 settings come first; then the end.
                    let mut buf = [0u8; 256];
                    let left = Duration::from_secs(30).saturating_sub(began.elapsed());
                    let ended = tokio::time::timeout(left, async {
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    if ended.is_ok() {
                        closed += 1;
                    }
                }
                format!(
                    "{closed} of 10,000 closed by the broker {:.1} s later",
                    began.elapsed().as_secs_f64()
                )
            }
        })
        .await,
    );

    // 2. A thousand calls on one connection.
    all.push(
        siege(&serve, &pair, "1,000 calls opened on one connection", || {
            let url = url.clone();
            async move {
                let one = client(&url).await;
                let mut calls = Vec::new();
                for i in 0..1000 {
                    let mut c = one.clone();
                    calls.push(tokio::spawn(async move {
                        let r = c.subscribe(request(&[&format!("idle/{i}")], now())).await;
                        match r {
                            Ok(stream) => {
                                // Held open until the task is aborted.
                                let _keep = stream;
                                std::future::pending::<Code>().await
                            }
                            Err(status) => status.code(),
                        }
                    }));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                move || async move {
                    let mut refused = 0;
                    let mut held = 0;
                    for call in calls {
                        if call.is_finished() {
                            if call.await.unwrap() == Code::ResourceExhausted {
                                refused += 1;
                            }
                        } else {
                            held += 1;
                            call.abort();
                        }
                    }
                    format!("{held} held open, {refused} refused (RESOURCE_EXHAUSTED, max_calls_per_connection 256) or waiting for a stream")
                }
            }
        })
        .await,
    );

    // 3. Subscribers that never read, from the beginning of 32 MiB.
    let mut loader = client(&url).await;
    let chunk = "x".repeat(256 << 10);
    for _ in 0..128 {
        publish(&mut loader, "heavy/s", &[chunk.as_str()]).await;
    }
    all.push(
        siege(&serve, &pair, "200 subscribers that never read (32 MiB behind)", || {
            let url = url.clone();
            async move {
                let mut stalled = Vec::new();
                for _ in 0..200 {
                    let mut c = narrow_client(&url).await;
                    let stream = c.subscribe(request(&["heavy/s"], beginning())).await.unwrap().into_inner();
                    stalled.push((c, stream));
                }
                move || async move {
                    let n = stalled.len();
                    drop(stalled);
                    format!("{n} subscriptions held, none read")
                }
            }
        })
        .await,
    );

    // 4. Producers with pathological explicit ticks.
    let mut admin = client(&url).await;
    for p in 0..4 {
        import(&mut admin, &format!("weird/{p}")).await;
    }
    all.push(
        siege(&serve, &pair, "4 producers of 10 batches/s, 1,000 scattered explicit ticks each", || {
            let url = url.clone();
            async move {
                let (stop, stopped) = watch::channel(false);
                let mut tasks = Vec::new();
                for p in 0..4u64 {
                    let url = url.clone();
                    let stopped = stopped.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut c = client(&url).await;
                        let mut sent = 0u64;
                        let mut tick = 1_000_000_000u64;
                        while !*stopped.borrow() {
                            let records = (0..1000)
                                .map(|_| {
                                    tick += 2 + (tick % 7);
                                    pb::Record { tick, ..record(&format!("weird/{p}"), "w") }
                                })
                                .collect();
                            let batch = pb::PublishRequest {
                                records,
                                producer_id: format!("weird-{p}"),
                                sequence: sent + 1,
                                ..Default::default()
                            };
                            if c.publish(batch).await.is_ok() {
                                sent += 1;
                            }
                            // Ten batches a second each: the attack is the scatter, not the volume
                            // (a volume is what publish_bytes_per_second limits).
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        sent
                    }));
                }
                move || async move {
                    stop.send(true).unwrap();
                    let mut batches = 0;
                    for t in tasks {
                        batches += t.await.unwrap();
                    }
                    format!(
                        "{batches} batches appended ({} records, each producer's state at most 64 KiB)",
                        batches * 1000
                    )
                }
            }
        })
        .await,
    );

    // 5. A flood of CreateStream and DeleteStream.
    all.push(
        siege(&serve, &pair, "a flood of CreateStream/DeleteStream from 4 clients", || {
            let url = url.clone();
            async move {
                let (stop, stopped) = watch::channel(false);
                let mut tasks = Vec::new();
                for t in 0..4 {
                    let url = url.clone();
                    let stopped = stopped.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut c = client(&url).await;
                        let (mut done, mut refused) = (0u64, 0u64);
                        let mut i = 0;
                        while !*stopped.borrow() {
                            i += 1;
                            let stream = format!("flood/{t}/{i}");
                            let create =
                                pb::CreateStreamRequest { stream: stream.clone(), ..Default::default() };
                            match c.create_stream(create).await {
                                Ok(_) => done += 1,
                                Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
                                Err(s) => panic!("{s:?}"),
                            }
                            match c.delete_stream(pb::DeleteStreamRequest { stream }).await {
                                Ok(_) => done += 1,
                                Err(s) if matches!(s.code(), Code::ResourceExhausted | Code::NotFound) => {
                                    refused += 1
                                }
                                Err(s) => panic!("{s:?}"),
                            }
                        }
                        (done, refused)
                    }));
                }
                move || async move {
                    stop.send(true).unwrap();
                    let (mut done, mut refused) = (0, 0);
                    for t in tasks {
                        let (d, r) = t.await.unwrap();
                        done += d;
                        refused += r;
                    }
                    format!("{done} changes made, {refused} refused (catalog_changes_per_second 100)")
                }
            }
        })
        .await,
    );

    // 6. An upstream that feeds a relay records it cannot take (over the relay's 64 KiB record
    // limit), while a pair publishes to the upstream and reads from the relay.
    let relay = Serve::start(
        &dir.path().join("relay"),
        &[
            "--upstream",
            &url,
            "--mirror",
            "relayed/**",
            "--max-record-bytes",
            "65536",
            "--heartbeat",
            "300ms",
        ],
    );
    let through = Pair::start(&url, &relay.url, "relayed/calm").await;
    through.latency(Duration::from_secs(1)).await;
    all.push(
        siege(
            &relay,
            &through,
            "an upstream sending a relay records over its limits (128 KiB, 40/s)",
            || {
                let url = url.clone();
                async move {
                    let (stop, stopped) = watch::channel(false);
                    let flood = tokio::spawn(async move {
                        let mut c = client(&url).await;
                        let junk = "j".repeat(128 << 10);
                        let mut sent = 0u64;
                        while !*stopped.borrow() {
                            publish(&mut c, "relayed/junk", &[junk.as_str()]).await;
                            sent += 1;
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        sent
                    });
                    move || async move {
                        stop.send(true).unwrap();
                        let sent = flood.await.unwrap();
                        format!(
                            "{sent} records the relay cannot take: each skipped (logged once a second with a count), the copy went on"
                        )
                    }
                }
            },
        )
        .await,
    );
    // Logged at most once a second, each line counting the skips it stands for.
    let log = relay.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("skipped a record the upstream sent")).collect();
    let counted = |l: &str| l.split("unlogged=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok();
    let skipped: u64 = lines.iter().map(|l| 1 + counted(l).unwrap_or(0)).sum();
    assert!(
        skipped > 10 && lines.len() <= 8,
        "the relay logged {} lines for {skipped} skipped records:\n{log}",
        lines.len()
    );
    through.stop.send(true).unwrap();

    pair.stop.send(true).unwrap();
    for f in &all {
        let (normal, under) = (f.before.0, f.during.0);
        // Twice the normal median, and never less than a millisecond of room: the pair's median
        // is well under a millisecond on loopback.
        let bound = (normal * 2).max(normal + Duration::from_millis(1));
        assert!(under <= bound, "{}: the pair's median latency went from {normal:?} to {under:?}", f.attack);
        assert!(f.peak_mib < RSS_BOUND_MIB, "{}: the broker's peak RSS was {} MiB", f.attack, f.peak_mib);
    }
}
