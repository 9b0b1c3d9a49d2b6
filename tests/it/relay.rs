//! Relays and resumable clients (issue 4), with real `tapeline serve` processes on loopback:
//! a relay that starts late ends identical to its origin; a chain origin → relay → relay serves 50
//! resuming subscribers exactly while each process is killed and restarted in turn; a subscriber
//! fails over between two relays mid-stream; upstream health reaches the subscribers of a relay.

use crate::support::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tapeline::client::{self, Delivery, PublishOptions, Publisher, SubscribeOptions, Subscriber};
use tapeline::protocol::pb;
use tonic::Code;

/// How long a test waits for copies and subscribers to converge before failing.
const CONVERGE: Duration = Duration::from_secs(60);

/// One broker process that can be killed and restarted on the same address and data dir.
struct Node {
    data: std::path::PathBuf,
    addr: String,
    extra: Vec<String>,
    serve: Option<Serve>,
}

impl Node {
    fn start(dir: &tempfile::TempDir, name: &str, extra: &[&str]) -> Node {
        let data = dir.path().join(name);
        let serve = Serve::start(&data, extra);
        let addr = serve.addr().to_string();
        Node { data, addr, extra: extra.iter().map(|s| s.to_string()).collect(), serve: Some(serve) }
    }

    /// A relay of `upstream` mirroring `r/**`.
    fn relay(dir: &tempfile::TempDir, name: &str, upstream: &Node, from: &str) -> Node {
        let url = upstream.url();
        Node::start(
            dir,
            name,
            &["--upstream", &url, "--mirror", "r/**", "--mirror-from", from, "--heartbeat", "300ms"],
        )
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        if let Some(mut serve) = self.serve.take() {
            // Waiting for a process blocks: let the runtime move other tasks off this thread.
            tokio::task::block_in_place(|| {
                serve.child.kill().unwrap();
                serve.child.wait().unwrap();
            });
        }
    }

    fn restart(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let serve = tokio::task::block_in_place(|| Serve::start_at(&self.data, &self.addr, &extra));
        self.serve = Some(serve);
    }
}

fn rec(stream: &str, payload: String) -> client::Incoming {
    client::Incoming {
        stream: stream.into(),
        payload: payload.into_bytes().into(),
        origin_time: 42,
        headers: vec![("k".to_string(), "v".to_string())],
        ..Default::default()
    }
}

/// Everything stored under `r/**` at `url`, read by a bounded subscription to its tail.
async fn everything(url: &str) -> Vec<client::Record> {
    let mut c = client::connect(url).await.unwrap();
    let tail = c.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    read_to(url, tail).await
}

/// `r/**` at `url` from the beginning up to `end`, by a bounded subscription.
async fn read_to(url: &str, end: u64) -> Vec<client::Record> {
    let mut options = SubscribeOptions::new(url, vec!["r/**".into()], beginning());
    options.end = Some(end);
    let mut sub = Subscriber::new(options).unwrap();
    let mut out = Vec::new();
    while let Some(delivery) = sub.next().await {
        if let Delivery::Records(records) = delivery.unwrap() {
            out.extend(records);
        }
    }
    assert_eq!(sub.duplicates_dropped(), 0, "{url} delivered a record twice");
    out
}

/// Waits until `url` holds exactly the records of `expected` (stream, tick, payload, headers,
/// origin time and CRC), checked record by record.
async fn converges(url: &str, expected: &[client::Record]) {
    let began = std::time::Instant::now();
    loop {
        let got = everything(url).await;
        if got == expected {
            return;
        }
        if began.elapsed() > CONVERGE {
            let first_difference = got.iter().zip(expected).position(|(a, b)| a != b);
            panic!(
                "{url} holds {} records, the origin {}; first difference at {first_difference:?}",
                got.len(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes `batches` batches of 5 records over three streams through a retrying publisher;
/// returns how many records were acknowledged.
async fn publish(url: String, first: usize, batches: usize, pause: Duration) -> usize {
    let mut publisher = Publisher::start(PublishOptions::new(url));
    let mut acked = 0;
    for b in first..first + batches {
        let records = (0..5).map(|i| rec(&format!("r/s{}", (b + i) % 3), format!("b{b}-{i}"))).collect();
        publisher.send(records).await.unwrap();
        while let Ok(Some(ack)) = tokio::time::timeout(Duration::from_millis(1), publisher.ack()).await {
            acked += ack.unwrap().ticks.len();
        }
        tokio::time::sleep(pause).await;
    }
    publisher.finish();
    while let Some(ack) = publisher.ack().await {
        let ack = ack.unwrap();
        assert!(!ack.ticks.is_empty());
        acked += ack.ticks.len();
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_late_from_the_beginning_ends_identical_and_is_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Node::start(&dir, "origin", &[]);
    // Not mirrored: a stream outside the relay's pattern stays at the origin.
    let mut c = client::connect(&origin.url()).await.unwrap();
    c.publish(pb::PublishRequest { records: vec![rec("other", "x".into()).into()], ..Default::default() })
        .await
        .unwrap();
    assert_eq!(publish(origin.url(), 0, 200, Duration::ZERO).await, 1000);

    let relay = Node::relay(&dir, "relay", &origin, "beginning");
    // Live records while the relay copies the past.
    assert_eq!(publish(origin.url(), 200, 50, Duration::from_millis(5)).await, 250);
    let expected = everything(&origin.url()).await;
    assert_eq!(expected.len(), 1250);
    converges(&relay.url(), &expected).await;

    // Mirrored streams are read-only at the relay, naming the upstream.
    let mut r = client::connect(&relay.url()).await.unwrap();
    let refused = r
        .publish(pb::PublishRequest { records: vec![rec("r/s0", "no".into()).into()], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&origin.url()) && refused.message().contains("r/s0"), "{refused:?}");
    // So are streams outside the mirror: a relay's clock must not run ahead of its upstream.
    let refused = r
        .publish(pb::PublishRequest {
            records: vec![rec("local", "mine".into()).into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // The listing names the upstream and a fresh, connected link.
    let listed = r.list_streams(pb::ListStreamsRequest::default()).await.unwrap().into_inner();
    let s0 = listed.streams.iter().find(|s| s.name == "r/s0").unwrap();
    assert_eq!(s0.upstream, origin.url());
    let link = s0.upstream_status.clone().unwrap();
    assert!(link.connected, "{link:?}");
    assert!(link.lag < 5_000_000_000, "lag {} ns", link.lag);
    assert!(!listed.streams.iter().any(|s| s.name == "other"), "only the mirrored pattern is copied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_serves_fifty_subscribers_exactly_while_each_process_is_killed_in_turn() {
    const SUBSCRIBERS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let mut origin = Node::start(&dir, "origin", &["--heartbeat", "300ms"]);
    let mut relay1 = Node::relay(&dir, "relay1", &origin, "beginning");
    let mut relay2 = Node::relay(&dir, "relay2", &relay1, "beginning");
    let urls = [origin.url(), relay1.url(), relay2.url()];

    // Subscribers spread over the three servers, each collecting until told the total.
    let total = Arc::new(AtomicUsize::new(usize::MAX));
    let mut subscribers = Vec::new();
    for n in 0..SUBSCRIBERS {
        let url = urls[n % 3].clone();
        let total = total.clone();
        subscribers.push(tokio::spawn(async move {
            let mut options = SubscribeOptions::new(url.clone(), vec!["r/**".into()], beginning());
            options.heartbeat = Duration::from_millis(500);
            options.backoff.max = Duration::from_millis(500);
            let mut sub = Subscriber::new(options).unwrap();
            let mut got: Vec<client::Record> = Vec::new();
            let began = std::time::Instant::now();
            while got.len() < total.load(Ordering::SeqCst) {
                assert!(began.elapsed() < CONVERGE * 2, "subscriber {n} at {url} stuck at {}", got.len());
                match tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
                    Ok(Some(Ok(Delivery::Records(records)))) => got.extend(records),
                    Ok(Some(Ok(_))) | Err(_) => {}
                    Ok(other) => panic!("subscriber {n} at {url}: {other:?}"),
                }
            }
            assert_eq!(sub.duplicates_dropped(), 0, "subscriber {n} at {url} was sent a record twice");
            (n, got)
        }));
    }

    // The publisher runs all along; each process is killed and restarted in turn under it.
    let publisher = tokio::spawn(publish(origin.url(), 0, 300, Duration::from_millis(10)));
    for node in [&mut origin, &mut relay1, &mut relay2] {
        tokio::time::sleep(Duration::from_millis(600)).await;
        node.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.restart();
    }
    let acked = publisher.await.unwrap();
    assert_eq!(acked, 1500);
    let expected = everything(&origin.url()).await;
    assert_eq!(expected.len(), acked, "the origin holds every acknowledged record once");
    total.store(expected.len(), Ordering::SeqCst);
    for relay in [&relay1, &relay2] {
        converges(&relay.url(), &expected).await;
    }
    for subscriber in subscribers {
        let (n, got) = subscriber.await.unwrap();
        assert_eq!(got.len(), expected.len(), "subscriber {n}");
        assert!(got == expected, "subscriber {n} got exactly the published sequence");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_fails_over_between_relays_and_sees_upstream_health() {
    let dir = tempfile::tempdir().unwrap();
    let mut origin = Node::start(&dir, "origin", &[]);
    let mut relay_a = Node::relay(&dir, "a", &origin, "beginning");
    let relay_b = Node::relay(&dir, "b", &origin, "beginning");
    assert_eq!(publish(origin.url(), 0, 40, Duration::ZERO).await, 200);

    let mut options = SubscribeOptions::new(relay_a.url(), vec!["r/**".into()], beginning());
    options.endpoints.push(relay_b.url());
    options.heartbeat = Duration::from_millis(300);
    let mut sub = Subscriber::new(options).unwrap();
    let seen = Arc::new(Mutex::new((
        Vec::<client::Record>::new(),
        Vec::<String>::new(),
        Vec::<pb::UpstreamStatus>::new(),
    )));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(delivery) = sub.next().await {
                let mut seen = seen.lock().unwrap();
                match delivery.unwrap() {
                    Delivery::Records(records) => seen.0.extend(records),
                    Delivery::Connected { endpoint } => seen.1.push(endpoint),
                    Delivery::Upstream(status) => seen.2.push(status),
                    Delivery::Heartbeat(h) => seen.2.extend(h.upstreams),
                    _ => {}
                }
            }
        })
    };
    let publisher = tokio::spawn(publish(origin.url(), 40, 100, Duration::from_millis(5)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay_a.kill();
    assert_eq!(publisher.await.unwrap(), 500);

    // The origin goes away: the relay's subscribers are told, then told again when it is back.
    seen.lock().unwrap().2.clear();
    origin.kill();
    let began = std::time::Instant::now();
    while !seen.lock().unwrap().2.iter().any(|s| !s.connected) {
        assert!(began.elapsed() < CONVERGE, "no UpstreamStatus down event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down = seen.lock().unwrap().2.iter().find(|s| !s.connected).cloned().unwrap();
    assert_eq!(down.upstream, origin.url());
    assert!(!down.detail.is_empty());
    origin.restart();
    let expected = everything(&origin.url()).await;
    assert_eq!(expected.len(), 700);
    let began = std::time::Instant::now();
    loop {
        {
            let seen = seen.lock().unwrap();
            let back = seen.2.iter().rposition(|s| s.connected) > seen.2.iter().rposition(|s| !s.connected);
            if seen.0.len() >= expected.len() && back {
                break;
            }
        }
        assert!(began.elapsed() < CONVERGE, "failover did not converge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.abort();
    let seen = seen.lock().unwrap();
    assert!(seen.0 == expected, "exactly the published sequence across the failover");
    assert_eq!(seen.1.first(), Some(&relay_a.url()));
    assert!(seen.1.contains(&relay_b.url()), "failed over to B: {:?}", seen.1);
}

/// The session so far from a relay (bounded at a tick) and the live feed from the origin (after
/// that tick) stitch into exactly the origin's sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_so_far_from_a_relay_stitches_exactly_to_the_live_feed_of_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Node::start(&dir, "origin", &[]);
    let relay = Node::relay(&dir, "relay", &origin, "beginning");
    assert_eq!(publish(origin.url(), 0, 60, Duration::ZERO).await, 300);
    let so_far = everything(&origin.url()).await;
    converges(&relay.url(), &so_far).await;
    let seam = so_far.last().unwrap().tick.0;

    // Live from the origin, strictly after the seam, while more is published.
    let live = {
        let mut options = SubscribeOptions::new(
            origin.url(),
            vec!["r/**".into()],
            pb::subscribe_request::Start::After(seam),
        );
        options.heartbeat = Duration::from_millis(300);
        // Read as a `Stream`, the form for code built on stream combinators.
        let mut sub = Box::pin(Subscriber::new(options).unwrap().into_stream());
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut got = Vec::new();
            while got.len() < 250 {
                match tokio::time::timeout(CONVERGE, sub.next()).await.expect("the live feed goes on") {
                    Some(Ok(Delivery::Records(records))) => got.extend(records),
                    Some(Ok(_)) => {}
                    other => panic!("{other:?}"),
                }
            }
            got
        })
    };
    assert_eq!(publish(origin.url(), 60, 50, Duration::from_millis(2)).await, 250);
    // The history, bounded at the seam, from the relay.
    let mut stitched = read_to(&relay.url(), seam).await;
    stitched.extend(live.await.unwrap());
    assert!(stitched == everything(&origin.url()).await, "relay history + origin live = the origin");
}

/// Health travels down a chain: when the origin goes away, a subscriber of the second relay is
/// told its link is down, naming the origin, and told again when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_outage_reaches_the_subscribers_of_a_second_relay() {
    let dir = tempfile::tempdir().unwrap();
    let mut origin = Node::start(&dir, "origin", &[]);
    let relay1 = Node::relay(&dir, "relay1", &origin, "beginning");
    let relay2 = Node::relay(&dir, "relay2", &relay1, "beginning");
    let mut options = SubscribeOptions::new(relay2.url(), vec!["r/**".into()], beginning());
    options.heartbeat = Duration::from_millis(300);
    let mut sub = Subscriber::new(options).unwrap();
    // Waits for the first Upstream status with `connected == want`, from events or heartbeats.
    let mut status = async |want: bool| {
        let began = std::time::Instant::now();
        loop {
            assert!(began.elapsed() < CONVERGE, "no upstream status with connected = {want}");
            let statuses = match tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
                Ok(Some(Ok(Delivery::Upstream(s)))) => vec![s],
                Ok(Some(Ok(Delivery::Heartbeat(h)))) => h.upstreams,
                _ => continue,
            };
            if let Some(s) = statuses.into_iter().find(|s| s.connected == want) {
                return s;
            }
        }
    };
    let up = status(true).await;
    assert_eq!(up.upstream, relay1.url());
    origin.kill();
    let down = status(false).await;
    assert_eq!(down.upstream, relay1.url(), "the link of relay2 is named");
    assert!(down.detail.contains(&origin.url()), "and the broken link beyond it: {}", down.detail);
    origin.restart();
    let back = status(true).await;
    assert!(back.detail.is_empty(), "{back:?}");
}

/// A bounded read from a relay that is still copying ends only once it delivered everything up
/// to its end: the relay's clock is never advanced past what its upstream confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_read_from_a_relay_still_copying_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Node::start(&dir, "origin", &[]);
    assert_eq!(publish(origin.url(), 0, 2_000, Duration::ZERO).await, 10_000);
    let expected = everything(&origin.url()).await;
    let end = expected.last().unwrap().tick.0;
    let relay = Node::relay(&dir, "relay", &origin, "beginning");
    // At once, while the relay copies; then again a little later.
    for _ in 0..2 {
        let got = read_to(&relay.url(), end).await;
        assert_eq!(got.len(), expected.len(), "the bounded read ended early");
        assert!(got == expected);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay of two independent origins (a settings file with two `[[mirror]]` tables) copies both
/// exactly; with one origin down, the other's records still flow live, the relay's tail stops at
/// what the stopped one confirmed, and a bounded read waits for it instead of ending early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_of_two_origins_copies_both_and_its_tail_waits_for_the_slower() {
    let dir = tempfile::tempdir().unwrap();
    let mut one = Node::start(&dir, "one", &[]);
    let two = Node::start(&dir, "two", &[]);
    let settings = dir.path().join("relay.toml");
    std::fs::write(
        &settings,
        format!(
            "heartbeat = \"300ms\"\n[[mirror]]\nupstream = \"{}\"\nstreams = [\"r/s0\", \"r/s1\"]\n[[mirror]]\nupstream = \"{}\"\nstreams = [\"r/**\"]\n",
            one.url(),
            two.url()
        ),
    )
    .unwrap();
    let relay = Node::start(&dir, "relay", &["--config", settings.to_str().unwrap()]);
    // Origin one publishes r/s0 and r/s1; origin two r/s2 (and r/s0, which the relay takes from
    // the first mirror only: a stream belongs to the first mirror that names it).
    let mut c1 = client::connect(&one.url()).await.unwrap();
    let mut c2 = client::connect(&two.url()).await.unwrap();
    for i in 0..50 {
        let a = vec![rec("r/s0", format!("one-{i}")), rec("r/s1", format!("one-{i}"))];
        c1.publish(pb::PublishRequest {
            records: a.into_iter().map(Into::into).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        let b = vec![rec("r/s2", format!("two-{i}")), rec("r/s0", format!("not-copied-{i}"))];
        c2.publish(pb::PublishRequest {
            records: b.into_iter().map(Into::into).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let by_stream = |records: Vec<client::Record>| {
        let mut map: std::collections::BTreeMap<String, Vec<(u64, Vec<u8>)>> = Default::default();
        for r in records {
            map.entry(r.stream.to_string()).or_default().push((r.tick.0, r.payload.to_vec()));
        }
        map
    };
    let mut expected = by_stream(everything(&one.url()).await);
    let from_two = by_stream(everything(&two.url()).await);
    expected.insert("r/s2".into(), from_two["r/s2"].clone());
    let began = std::time::Instant::now();
    loop {
        let got = by_stream(everything(&relay.url()).await);
        if got == expected {
            break;
        }
        assert!(began.elapsed() < CONVERGE, "the relay holds {:?} streams", got.keys());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Origin one stops: the relay's tail stays at what one confirmed, two's records still flow.
    one.kill();
    // Everything one confirmed, it confirmed before this moment (same clock: one machine).
    let stopped =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut r = client::connect(&relay.url()).await.unwrap();
    let mut options = SubscribeOptions::new(
        relay.url(),
        vec!["r/s2".into()],
        pb::subscribe_request::Start::Now(pb::Now {}),
    );
    options.heartbeat = Duration::from_millis(300);
    let mut live = Subscriber::new(options).unwrap();
    loop {
        match tokio::time::timeout(CONVERGE, live.next()).await.expect("CaughtUp arrives") {
            Some(Ok(Delivery::CaughtUp(_))) => break,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    c2.publish(pb::PublishRequest {
        records: vec![rec("r/s2", "two-live".into()).into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let got = loop {
        match tokio::time::timeout(CONVERGE, live.next()).await.expect("two's record arrives") {
            Some(Ok(Delivery::Records(records))) => break records,
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(got[0].payload, "two-live".as_bytes());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let tail = r.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
        assert!(tail <= stopped, "the tail passed what the stopped upstream confirmed: {tail} > {stopped}");
    }
    assert!(got[0].tick.0 > stopped, "two's newest record is above the tail while one is down");

    // A bounded read up to two's newest record does not end while one cannot confirm it.
    let mut options = SubscribeOptions::new(relay.url(), vec!["r/**".into()], beginning());
    options.end = Some(got[0].tick.0);
    let mut bounded = Subscriber::new(options).unwrap();
    let mut read = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(delivery) = bounded.next().await {
            if let Delivery::Records(records) = delivery.unwrap() {
                read.extend(records);
            }
        }
    })
    .await;
    assert!(ended.is_err(), "a bounded read ended before every upstream confirmed its end");
    // Once the stopped origin is back, the same read ends, complete.
    one.restart();
    let ended = tokio::time::timeout(CONVERGE, async {
        while let Some(delivery) = bounded.next().await {
            if let Delivery::Records(records) = delivery.unwrap() {
                read.extend(records);
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the bounded read ends once every upstream confirmed its end");
    let mut want = by_stream(everything(&one.url()).await);
    want.insert("r/s2".into(), by_stream(everything(&two.url()).await)["r/s2"].clone());
    want.values_mut().for_each(|v| v.retain(|(tick, _)| *tick <= got[0].tick.0));
    assert_eq!(by_stream(read), want, "exactly every record up to the end, from both upstreams");
    assert_eq!(bounded.duplicates_dropped(), 0);
}

/// A stream of the catalog as compared between copies: everything but the rates and the relay's
/// own upstream fields.
fn catalog_entry(s: &pb::StreamInfo) -> String {
    format!(
        "{} type={:?} schema={:?} description={:?} own={:?} effective={:?} created={} records={} ticks={}..{}",
        s.name,
        s.content_type,
        s.schema_version,
        s.description,
        s.retention,
        s.effective_retention,
        s.created_tick,
        s.records,
        s.first_tick,
        s.last_tick
    )
}

/// Waits until `relay` lists exactly the streams `origin` lists, entry for entry, and holds
/// exactly its records.
async fn same_catalog(origin: &str, relay: &str) {
    let began = std::time::Instant::now();
    loop {
        let want: Vec<String> =
            stored_streams(&mut client(origin).await).await.iter().map(catalog_entry).collect();
        let got: Vec<String> =
            stored_streams(&mut client(relay).await).await.iter().map(catalog_entry).collect();
        if got == want && everything(relay).await == everything(origin).await {
            return;
        }
        assert!(began.elapsed() < CONVERGE, "{relay} lists\n{got:#?}\nthe origin\n{want:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn define(
    stream: &str,
    content_type: &str,
    description: &str,
    max_age_ms: u64,
    update: bool,
) -> pb::CreateStreamRequest {
    pb::CreateStreamRequest {
        stream: stream.into(),
        content_type: content_type.into(),
        schema_version: "7".into(),
        description: description.into(),
        retention: Some(pb::Retention { max_age_ms, ..Default::default() }),
        update,
        import: false,
    }
}

/// origin → first → second, each relay mirroring `r/**` from the beginning.
fn chain(dir: &tempfile::TempDir) -> (Node, Node, Node) {
    let origin = Node::start(dir, "origin", &[]);
    let first = Node::relay(dir, "first", &origin, "beginning");
    let second = Node::relay(dir, "second", &first, "beginning");
    (origin, first, second)
}

/// The catalog events and records a subscriber sees until the record `last`.
async fn catalog_and_records_until(sub: &mut Sub, last: &str) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let events = sub.next().await.expect("the subscription goes on");
        for event in events {
            match &event {
                Seen::Record { payload, .. } if payload == last => {
                    seen.push(event);
                    return seen;
                }
                Seen::Record { .. } | Seen::StreamAdded(_) | Seen::StreamChanged { .. } => seen.push(event),
                _ => {}
            }
        }
    }
}

/// Metadata, a stream's own retention, updates, a deletion and a stream created again under the
/// same name travel down origin → relay → relay in order with the records: the last relay's
/// subscribers see the same `stream_added` and `stream_changed` events as the origin's, and its
/// copy never holds a record the origin deleted, also when the relay was down while it happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_copies_the_catalog_deletions_and_streams_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, first, mut second) = chain(&dir);
    let mut o = client::connect(&origin.url()).await.unwrap();
    let watch = pb::SubscribeRequest { heartbeat_ms: 200, ..request(&["r/**"], beginning()) };
    let mut on_origin = Sub::open(&mut o, watch.clone()).await;
    let mut on_relay = Sub::open(&mut client::connect(&second.url()).await.unwrap(), watch).await;
    // The chain is live before the catalog changes, so the changes travel as events.
    crate::support::publish(&mut o, "r/warm", &["warm"]).await;
    catalog_and_records_until(&mut on_origin, "warm").await;
    catalog_and_records_until(&mut on_relay, "warm").await;

    o.create_stream(define("r/cat", "application/json", "with metadata", 3_600_000, false)).await.unwrap();
    crate::support::publish(&mut o, "r/cat", &["m0", "m1"]).await;
    o.create_stream(define("r/cat", "text/csv", "changed", 7_200_000, true)).await.unwrap();
    crate::support::publish(&mut o, "r/cat", &["m2"]).await;
    o.delete_stream(pb::DeleteStreamRequest { stream: "r/cat".into() }).await.unwrap();
    crate::support::publish(&mut o, "r/cat", &["reborn"]).await;
    let on_origin = catalog_and_records_until(&mut on_origin, "reborn").await;
    let on_relay = catalog_and_records_until(&mut on_relay, "reborn").await;
    // The same catalog events, in the same order. (Records are compared by what is stored: a
    // subscriber that had not read a record before its stream was deleted never gets it, on the
    // origin as on a relay.)
    let catalog = |seen: &[Seen]| -> Vec<Seen> {
        seen.iter().filter(|e| !matches!(e, Seen::Record { .. })).cloned().collect()
    };
    assert!(
        on_origin.iter().any(|e| matches!(e, Seen::StreamChanged { deleted: true, .. })),
        "{on_origin:?}"
    );
    assert_eq!(
        catalog(&on_relay),
        catalog(&on_origin),
        "the last relay's subscriber saw other catalog events than the origin's"
    );
    // Nothing of the deleted stream after its deletion was told.
    let told = on_relay.iter().position(|e| matches!(e, Seen::StreamChanged { deleted: true, .. })).unwrap();
    assert!(
        on_relay[told..]
            .iter()
            .all(|e| !matches!(e, Seen::Record { payload, .. } if payload.starts_with('m'))),
        "{on_relay:?}"
    );
    same_catalog(&origin.url(), &second.url()).await;

    // While the last relay is down: the stream is deleted and created again with other metadata,
    // and a stream with metadata only appears. Its restart finds the catalog as it is now.
    second.kill();
    o.delete_stream(pb::DeleteStreamRequest { stream: "r/cat".into() }).await.unwrap();
    o.create_stream(define("r/cat", "text/plain", "again", 60_000, false)).await.unwrap();
    crate::support::publish(&mut o, "r/cat", &["third"]).await;
    o.create_stream(define("r/empty", "application/x-empty", "metadata only", 1_000, false)).await.unwrap();
    o.delete_stream(pb::DeleteStreamRequest { stream: "r/warm".into() }).await.unwrap();
    second.restart();
    same_catalog(&origin.url(), &first.url()).await;
    same_catalog(&origin.url(), &second.url()).await;
}

/// An import on the origin reaches a chain once sealed, and only then: the last relay's live
/// subscriber is told with `stream_added` and gets the import whole, and a relay that was down
/// while another import was sealed copies that one whole when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_copies_an_import_once_sealed_and_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, first, mut second) = chain(&dir);
    let mut o = client::connect(&origin.url()).await.unwrap();
    let watch = pb::SubscribeRequest { heartbeat_ms: 200, ..request(&["r/**"], beginning()) };
    let mut on_relay = Sub::open(&mut client::connect(&second.url()).await.unwrap(), watch).await;
    crate::support::publish(&mut o, "r/warm", &["warm"]).await;
    catalog_and_records_until(&mut on_relay, "warm").await;
    let shown = |seen: Vec<Seen>| -> Vec<String> {
        seen.into_iter()
            .map(|e| match e {
                Seen::Record { stream, payload, .. } => format!("{stream} {payload}"),
                other => format!("{other:?}"),
            })
            .collect()
    };
    let old = |stream: &str, seconds_ago: u64, payload: &str| pb::Record {
        tick: tapeline::types::Tick::now().0 - seconds_ago * 1_000_000_000,
        ..record(stream, payload)
    };

    import(&mut o, "r/imp").await;
    publish_records(&mut o, vec![old("r/imp", 5, "i0"), old("r/imp", 4, "i1")]).await;
    crate::support::publish(&mut o, "r/warm", &["w1"]).await;
    // Copied past the import's ticks, without the import: no relay has it.
    assert_eq!(shown(catalog_and_records_until(&mut on_relay, "w1").await), ["r/warm w1"]);
    for relay in [&first, &second] {
        let listed = stored_streams(&mut client(&relay.url()).await).await;
        assert!(listed.iter().all(|s| s.name != "r/imp"), "{listed:?}");
    }
    seal(&mut o, "r/imp").await;
    assert_eq!(
        shown(catalog_and_records_until(&mut on_relay, "i1").await),
        ["StreamAdded(\"r/imp\")", "r/imp i0", "r/imp i1"]
    );
    same_catalog(&origin.url(), &second.url()).await;

    // The last relay is down while a second import is sealed.
    second.kill();
    import(&mut o, "r/imp2").await;
    publish_records(&mut o, vec![old("r/imp2", 3, "j0"), old("r/imp2", 2, "j1")]).await;
    seal(&mut o, "r/imp2").await;
    second.restart();
    same_catalog(&origin.url(), &first.url()).await;
    same_catalog(&origin.url(), &second.url()).await;
}

/// A relay validates what its upstream sends: a record over the relay's own limits (here an
/// upstream that takes 2 MiB records, a relay that takes 1 MiB) is reported and skipped, and the
/// records after it are copied, instead of the copy failing and retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_skips_and_reports_a_record_over_its_limits_and_copies_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Node::start(&dir, "origin", &["--max-record-bytes", "4194304"]);
    let mut publisher = Publisher::start(PublishOptions::new(origin.url()));
    let batches = publisher.batches().unwrap();
    let big =
        client::Incoming { stream: "r/s".into(), payload: vec![7u8; 2 << 20].into(), ..Default::default() };
    for batch in [vec![rec("r/s", "before".into())], vec![big], vec![rec("r/s", "after".into())]] {
        batches.send(batch).await.unwrap();
        publisher.ack().await.unwrap().unwrap();
    }
    drop(batches);
    let relay = Node::start(
        &dir,
        "relay",
        &[
            "--upstream",
            &origin.url(),
            "--mirror",
            "r/**",
            "--max-record-bytes",
            "1048576",
            "--heartbeat",
            "300ms",
        ],
    );
    // Copied: the two records around the one skipped (a relay with nothing yet has tail 0, so
    // wait for the copy before reading it).
    let mut r = client::connect(&relay.url()).await.unwrap();
    let began = std::time::Instant::now();
    while !stored_streams(&mut r).await.iter().any(|s| s.name == "r/s" && s.records == 2) {
        assert!(began.elapsed() < WAIT, "not copied:\n{}", relay.serve.as_ref().unwrap().log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let copied: Vec<String> = everything(&relay.url())
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(copied, ["before", "after"]);
    let log = relay.serve.as_ref().unwrap().log();
    assert!(log.contains("skipped a record the upstream sent") && log.contains("max_record_bytes"), "{log}");
    assert_eq!(log.matches("mirroring stopped").count(), 0, "the copy never failed:\n{log}");
}
