//! Quotas, slow consumers and server limits on a running broker: a quota-limited replay follows
//! its rate; a subscriber that stops reading is handled by its policy (catch up, skip with a
//! `gap`, or disconnect to resume) while a fast subscriber and the publisher go on; a publishing
//! connection over its quota is slowed, never dropped; subscriptions, streams and connections over
//! their limits get statuses that name the limit.

use crate::support::*;
use std::time::{Duration, Instant};
use tapeline::config::{Config, Limits};
use tapeline::protocol::pb;
use tonic::Code;

const KIB: usize = 1024;

/// What the server weighs a record at against a quota: payload, stream name and 32 bytes.
fn weight(stream: &str, payload: usize) -> u64 {
    (payload + stream.len() + 32) as u64
}

fn limited(dir: &std::path::Path, limits: Limits) -> Config {
    Config { limits, ..config(dir) }
}

#[tokio::test]
async fn a_quota_limited_replay_follows_its_rate_within_ten_percent() {
    let (_dir, server, mut client) = started().await;
    let payload = "q".repeat(KIB);
    for _ in 0..25 {
        publish(&mut client, "quota/s", &[payload.as_str(); 100]).await;
    }
    let rate = 1_000_000u64;
    let window = Duration::from_millis(500);
    let request = pb::SubscribeRequest {
        max_bytes_per_second: rate,
        rate_window_ms: window.as_millis() as u32,
        ..request(&["quota/s"], beginning())
    };
    let mut sub = Sub::open(&mut client, request).await;
    let mut arrivals: Vec<(Instant, u64)> = Vec::new();
    let mut received = 0;
    while received < 2500 {
        let events = sub.next().await.expect("the replay goes on");
        let records = records(&events);
        received += records.len();
        let bytes = records.iter().map(|(s, _, p)| weight(s, p.len())).sum();
        if bytes > 0 {
            arrivals.push((Instant::now(), bytes));
        }
    }
    // Any window's worth of arrivals holds at most the quota's worth (10% for the burst the quota
    // allows, a sixteenth of a window, and timing noise).
    let budget = rate as f64 * window.as_secs_f64();
    for (i, &(at, _)) in arrivals.iter().enumerate() {
        let in_window: u64 =
            arrivals[..=i].iter().filter(|(t, _)| at.duration_since(*t) < window).map(|(_, b)| b).sum();
        assert!(
            in_window as f64 <= budget * 1.1,
            "{in_window} bytes within {window:?}; arrivals (ms, bytes): {:?}",
            arrivals
                .iter()
                .map(|(t, b)| (t.duration_since(arrivals[0].0).as_millis(), *b))
                .collect::<Vec<_>>()
        );
    }
    // After the first window (which holds the burst), the rate is the quota's within 10%.
    let start = arrivals[0].0 + window;
    let end = arrivals.last().unwrap().0;
    let after: u64 = arrivals.iter().filter(|(t, _)| *t > start).map(|(_, b)| b).sum();
    let measured = after as f64 / end.duration_since(start).as_secs_f64();
    eprintln!("quota {rate} B/s over {window:?}: measured {measured:.0} B/s after the first window");
    assert!(
        (measured - rate as f64).abs() <= rate as f64 * 0.1,
        "measured {measured:.0} B/s for a quota of {rate}"
    );
    drop(server);
}

/// Publishes batches of 20 records of 1 KiB into `stream` every 10 ms until `stop`; returns the
/// ticks in order.
async fn publish_steadily(
    url: String,
    stream: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<u64> {
    let mut client = client(&url).await;
    let payload = "p".repeat(KIB);
    let mut ticks = Vec::new();
    while !*stop.borrow() {
        ticks.extend(publish(&mut client, stream, &[payload.as_str(); 20]).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ticks
}

/// A fast subscriber, a publisher, and a subscriber that stops reading for 1.5 s (its max_lag is
/// 300 ms) under `policy`. Returns what the slow one saw until the publisher stopped and the
/// published ticks; checks that the fast one received everything in order.
async fn slow_consumer(
    policy: pb::SlowConsumer,
) -> (Vec<Seen>, Option<tonic::Status>, Vec<u64>, TestServer, tempfile::TempDir) {
    let (dir, server, client) = started().await;
    let stream = "slow/s";
    let mut fast = Sub::open(&mut client.clone(), request(&[stream], now())).await;
    let slow_request =
        pb::SubscribeRequest { slow_consumer: policy.into(), max_lag_ms: 300, ..request(&[stream], now()) };
    let mut slow_client = narrow_client(&server.url()).await;
    let mut slow = Sub::open(&mut slow_client, slow_request).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_steadily(server.url(), stream, stopped));
    // The slow subscriber reads a little, stops reading for 1.5 s, then reads everything.
    let mut seen = slow.take_records(20).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read_until = Instant::now() + Duration::from_millis(1500);
    let mut status = None;
    while Instant::now() < read_until {
        match tokio::time::timeout(Duration::from_millis(100), slow.next_result()).await {
            Ok(Ok(Some(events))) => seen.extend(events),
            Ok(Ok(None)) => break,
            Ok(Err(s)) => {
                status = Some(s);
                break;
            }
            Err(_) => {}
        }
    }
    stop.send(true).unwrap();
    let published = publisher.await.unwrap();
    let got: Vec<u64> = records(&fast.take_records(published.len()).await).iter().map(|r| r.1).collect();
    assert_eq!(got, published, "the fast subscriber got everything, in order");
    (seen, status, published, server, dir)
}

#[tokio::test]
async fn a_slow_consumer_under_latest_skips_with_a_gap_that_accounts_for_every_record() {
    let (seen, status, published, _server, _dir) = slow_consumer(pb::SlowConsumer::Latest).await;
    assert!(status.is_none(), "{status:?}");
    let mut gaps = Vec::new();
    let mut ticks = Vec::new();
    for event in seen {
        match event {
            Seen::Record { tick, .. } => ticks.push(tick),
            Seen::Gap { records, from, to, .. } => gaps.push((records, from, to)),
            _ => {}
        }
    }
    assert!(!gaps.is_empty(), "no gap after falling 1.5 s behind with max_lag 300 ms");
    // Every record up to the last one seen was either delivered or counted in a gap, once.
    let last = *ticks.last().unwrap();
    let upto: Vec<u64> = published.iter().copied().filter(|&t| t <= last).collect();
    let skipped: u64 = gaps.iter().map(|g| g.0).sum();
    assert_eq!(
        ticks.len() as u64 + skipped,
        upto.len() as u64,
        "delivered {} + skipped {skipped}",
        ticks.len()
    );
    for (records, from, to) in &gaps {
        let inside = upto.iter().filter(|&&t| t >= *from && t <= *to).count() as u64;
        assert_eq!(inside, *records, "the gap {from}..={to} counts exactly the records in it");
        assert!(!ticks.iter().any(|t| t >= from && t <= to), "nothing in a gap is delivered");
    }
    assert!(ticks.windows(2).all(|w| w[0] < w[1]), "in order, no duplicate");
}

#[tokio::test]
async fn a_slow_consumer_under_disconnect_gets_a_status_it_resumes_from_exactly() {
    let (seen, status, published, server, _dir) = slow_consumer(pb::SlowConsumer::Disconnect).await;
    let status = status.expect("the slow subscriber is disconnected");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_lag") && status.message().contains("resume after tick"),
        "{}",
        status.message()
    );
    let mut ticks: Vec<u64> = records(&seen).iter().map(|r| r.1).collect();
    let mut client = server.client().await;
    let mut resume = request(&[], beginning());
    resume.streams = vec!["slow/s".into()];
    resume.resume.insert("slow/s".into(), *ticks.last().unwrap());
    resume.end = *published.last().unwrap();
    let mut sub = Sub::open(&mut client, resume).await;
    ticks.extend(records(&sub.until_end().await).iter().map(|r| r.1));
    assert_eq!(ticks, published, "resuming after the status gives exactly the rest");
}

/// A subscriber under DISCONNECT that stops reading altogether, so that the server's send to it
/// blocks: the policy still applies within its max_lag (its subscription slot is free again), and
/// the status reaches it ahead of what waited in the outbox.
#[tokio::test]
async fn a_subscriber_that_never_reads_is_disconnected_while_its_send_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_subscriptions: 1, ..Limits::default() };
    let server = TestServer::start_with(limited(dir.path(), limits)).await;
    let stream = "blocked/s";
    let mut stalled_client = narrow_client(&server.url()).await;
    let request_of = |policy: pb::SlowConsumer| pb::SubscribeRequest {
        slow_consumer: policy.into(),
        max_lag_ms: 300,
        ..request(&[stream], now())
    };
    let mut stalled = Sub::open(&mut stalled_client, request_of(pb::SlowConsumer::Disconnect)).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_steadily(server.url(), stream, stopped));
    stalled.take_records(20).await;
    // From now on nothing is read: the server's outbox and HTTP/2 buffers fill, its send blocks.
    let began = Instant::now();
    let mut probe = server.client().await;
    loop {
        match probe.subscribe(request_of(pb::SlowConsumer::CatchUp)).await {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "the subscriber that never reads still holds the only subscription slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the blocked subscriber's slot was free after {:?} (max_lag 300 ms)", began.elapsed());
    stop.send(true).unwrap();
    publisher.await.unwrap();
    // Reading again, the client finds why it was ended.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        assert!(Instant::now() < deadline, "no status after the disconnection");
        match stalled.next_result().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_lag"), "{}", status.message());
}

#[tokio::test]
async fn a_slow_consumer_under_catch_up_lags_and_gets_everything() {
    let (seen, status, published, server, _dir) = slow_consumer(pb::SlowConsumer::CatchUp).await;
    assert!(status.is_none(), "{status:?}");
    assert!(!seen.iter().any(|e| matches!(e, Seen::Gap { .. })));
    let mut ticks: Vec<u64> = records(&seen).iter().map(|r| r.1).collect();
    let mut client = server.client().await;
    let mut rest =
        pb::SubscribeRequest { end: *published.last().unwrap(), ..request(&["slow/s"], beginning()) };
    rest.resume.insert("slow/s".into(), *ticks.last().unwrap());
    ticks.extend(records(&Sub::open(&mut client, rest).await.until_end().await).iter().map(|r| r.1));
    assert_eq!(ticks, published);
}

#[tokio::test]
async fn a_publishing_connection_over_its_quota_is_slowed_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let rate = 200_000u64;
    let limits = Limits {
        publish_bytes_per_second: Some(rate),
        rate_window: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = TestServer::start_with(limited(dir.path(), limits)).await;
    let mut client = server.client().await;
    let payload = "w".repeat(KIB);
    let began = Instant::now();
    let mut acked = 0;
    for _ in 0..60 {
        acked += publish(&mut client, "pq/s", &[payload.as_str(); 10]).await.len();
    }
    let elapsed = began.elapsed();
    assert_eq!(acked, 600, "every record was acknowledged: slowed, never dropped");
    // 60 batches of about 10.4 KB: one window's worth (100 KB) goes at once, the rest at the rate.
    let total = 60 * 10 * weight("pq/s", KIB);
    let measured = (total as f64 - rate as f64 * 0.5) / elapsed.as_secs_f64();
    eprintln!("publish quota {rate} B/s: measured {measured:.0} B/s after the first window");
    assert!(measured <= rate as f64 * 1.1, "{measured:.0} B/s through a connection limited to {rate}");
    // Another connection has its own quota.
    let mut other = server.client().await;
    assert_eq!(publish(&mut other, "pq/t", &[payload.as_str(); 10]).await.len(), 10);
}

#[tokio::test]
async fn subscriptions_streams_and_connections_over_their_limits_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_subscriptions: 2, max_streams: 3, max_connections: 3, ..Limits::default() };
    let server = TestServer::start_with(limited(dir.path(), limits)).await;
    let mut client = server.client().await;

    let first = Sub::open(&mut client, request(&["l/**"], now())).await;
    let _second = Sub::open(&mut client, request(&["l/**"], now())).await;
    let refused = client.subscribe(request(&["l/**"], now())).await.expect_err("a third subscription");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("limits.max_subscriptions") && refused.message().contains('2'),
        "{}",
        refused.message()
    );
    drop(first);
    let deadline = Instant::now() + WAIT;
    while client.subscribe(request(&["l/**"], now())).await.is_err() {
        assert!(Instant::now() < deadline, "the slot of a closed subscription never came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for s in ["l/a", "l/b", "l/c"] {
        publish(&mut client, s, &["x"]).await;
    }
    let refused = client
        .publish(pb::PublishRequest { records: vec![record("l/d", "x")], ..Default::default() })
        .await
        .expect_err("a fourth stream");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("limits.max_streams") && refused.message().contains('3'),
        "{}",
        refused.message()
    );
    publish(&mut client, "l/a", &["still taken"]).await;

    // `client` holds one connection; two more fit, the fourth is refused on every call.
    let mut second = server.client().await;
    let mut third = server.client().await;
    publish(&mut second, "l/a", &["x"]).await;
    publish(&mut third, "l/a", &["x"]).await;
    let mut fourth = server.client().await;
    let refused = fourth.hello(pb::HelloRequest::default()).await.expect_err("a fourth connection");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("limits.max_connections"), "{}", refused.message());
    drop((second, fourth));
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = server.client().await;
        if again.hello(pb::HelloRequest::default()).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "a closed connection's place never came back");
        // Closed before the next try, and given time to be seen closed: a refused connection
        // still counts while it is open.
        drop(again);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
