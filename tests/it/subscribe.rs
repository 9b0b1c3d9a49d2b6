//! Replay then live: starts, bounds, ordering, events, fan-out and resume, through the gRPC client
//! against a real broker.

use crate::support::*;
use rand::Rng;
use std::collections::HashMap;
use std::time::Duration;
use tapeline::protocol::pb;
use tapeline::protocol::pb::subscribe_request::Start;

#[tokio::test]
async fn replays_from_the_beginning_then_follows_live() {
    let (_dir, _server, mut client) = started().await;
    publish(&mut client, "s", &["a", "b"]).await;
    publish(&mut client, "s", &["c"]).await;

    let mut sub = Sub::open(&mut client, request(&["s"], beginning())).await;
    let (before, caught_up) = sub.until_caught_up().await;
    assert_eq!(payloads(&before), ["a", "b", "c"]);
    assert_eq!(caught_up, records(&before)[2].1, "CaughtUp names the tail tick");

    publish(&mut client, "s", &["d", "e"]).await;
    assert_eq!(payloads(&sub.take_records(2).await), ["d", "e"]);
}

#[tokio::test]
async fn now_delivers_only_what_is_appended_after_subscribing() {
    let (_dir, _server, mut client) = started().await;
    publish(&mut client, "s", &["old"]).await;

    let mut sub = Sub::open(&mut client, request(&["s", "t"], now())).await;
    let (before, _) = sub.until_caught_up().await;
    assert!(records(&before).is_empty(), "{before:?}");
    publish(&mut client, "s", &["new"]).await;
    publish(&mut client, "t", &["fresh stream"]).await;
    let events = sub.take_records(2).await;
    assert_eq!(payloads(&events), ["new", "fresh stream"]);
}

#[tokio::test]
async fn at_is_inclusive_and_after_is_exclusive() {
    let (_dir, _server, mut client) = started().await;
    let ticks = publish(&mut client, "s", &["0", "1", "2", "3", "4"]).await;

    let mut at = Sub::open(&mut client, request(&["s"], Start::At(ticks[2]))).await;
    assert_eq!(payloads(&at.until_caught_up().await.0), ["2", "3", "4"]);
    let mut after = Sub::open(&mut client, request(&["s"], Start::After(ticks[2]))).await;
    assert_eq!(payloads(&after.until_caught_up().await.0), ["3", "4"]);
    // A tick between two records starts at the next one.
    let mut between = Sub::open(&mut client, request(&["s"], Start::At(ticks[4] + 1))).await;
    assert!(records(&between.until_caught_up().await.0).is_empty());
    // The extremes of the tick range are positions like any other.
    let mut at_zero = Sub::open(&mut client, request(&["s"], Start::At(0))).await;
    assert_eq!(payloads(&at_zero.until_caught_up().await.0).len(), 5);
    let mut after_max = Sub::open(&mut client, request(&["s"], Start::After(u64::MAX))).await;
    assert!(records(&after_max.until_caught_up().await.0).is_empty());
    let mut resume_max = request(&["s"], beginning());
    resume_max.resume.insert("s".into(), u64::MAX);
    let mut resumed = Sub::open(&mut client, resume_max).await;
    assert!(records(&resumed.until_caught_up().await.0).is_empty());
}

#[tokio::test]
async fn a_bounded_interval_ends_by_itself() {
    let (_dir, _server, mut client) = started().await;
    let ticks = publish(&mut client, "s", &["0", "1", "2", "3", "4"]).await;

    let mut req = request(&["s"], Start::At(ticks[1]));
    req.end = ticks[3];
    let mut sub = Sub::open(&mut client, req).await;
    let events = sub.until_end().await;
    assert_eq!(payloads(&events), ["1", "2", "3"]);
    assert_eq!(events.iter().filter(|e| matches!(e, Seen::CaughtUp(_))).count(), 1);

    // An end in the future: live records up to it are delivered, then the stream ends by itself
    // once the end has passed, and records published after it are not delivered.
    let end = tapeline::types::Tick::now().0 + 400_000_000;
    let mut req = request(&["s"], Start::After(ticks[4]));
    req.end = end;
    let mut live = Sub::open(&mut client, req).await;
    live.until_caught_up().await;
    publish(&mut client, "s", &["5"]).await;
    let events = live.until_end().await;
    let late = publish(&mut client, "s", &["6"]).await;
    assert!(late[0] > end);
    assert_eq!(payloads(&events), ["5"]);
}

/// One rule for an interval with nothing in it, however it is asked for: it ends at once with no
/// records and a last heartbeat at its end, never an error. And `end = 0` is no end (0 always
/// means "not set").
#[tokio::test]
async fn an_empty_interval_ends_at_once_however_it_is_asked_for() {
    let (_dir, _server, mut client) = started().await;
    let ticks = publish(&mut client, "s", &["0", "1", "2"]).await;
    let mut resumed = request(&["s"], beginning());
    resumed.resume.insert("s".into(), ticks[1]);
    let cases = [
        ("after t, end t", request(&["s"], Start::After(ticks[1])), ticks[1]),
        ("at t, end below t", request(&["s"], Start::At(ticks[2])), ticks[1]),
        ("resume after t, end t", resumed, ticks[1]),
    ];
    for (what, mut req, end) in cases {
        req.end = end;
        let events = Sub::open(&mut client, req).await.until_end().await;
        assert!(records(&events).is_empty(), "{what}: {events:?}");
        let last = events.last();
        let at_end = matches!(last, Some(Seen::Heartbeat { tail_tick }) if *tail_tick == end);
        assert!(at_end, "{what}: ends with a heartbeat at {end}: {last:?}");
    }
    // end = 0 is not set: the subscription replays, then follows live.
    let mut req = request(&["s"], beginning());
    req.end = 0;
    let mut live = Sub::open(&mut client, req).await;
    assert_eq!(payloads(&live.until_caught_up().await.0), ["0", "1", "2"]);
    publish(&mut client, "s", &["3"]).await;
    assert_eq!(payloads(&live.take_records(1).await), ["3"]);
}

#[tokio::test]
async fn an_end_ends_the_subscription_even_when_nothing_more_is_published() {
    let (_dir, _server, mut client) = started().await;
    let ticks = publish(&mut client, "s", &["a", "b"]).await;

    // An end between the last record and now: the broker is idle, the interval is complete.
    let mut req = request(&["s"], beginning());
    req.end = ticks[1] + 1;
    assert_eq!(payloads(&Sub::open(&mut client, req).await.until_end().await), ["a", "b"]);

    // An end 300 ms ahead: the subscription waits for it to pass, then ends on its own.
    let mut req = request(&["s", "quiet"], beginning());
    req.end = tapeline::types::Tick::now().0 + 300_000_000;
    let mut sub = Sub::open(&mut client, req).await;
    publish(&mut client, "s", &["c"]).await;
    assert_eq!(payloads(&sub.until_end().await), ["a", "b", "c"]);
}

#[tokio::test]
async fn several_streams_and_patterns_arrive_in_tick_then_stream_order() {
    let (_dir, _server, mut client) = started().await;
    // Interleave appends across streams, some in one batch (same commit).
    let mut expected = Vec::new();
    for round in 0..50 {
        let mut batch = vec![
            record("sensors/imu/accel", format!("a{round}")),
            record("sensors/imu/gyro", format!("g{round}")),
            record("other", format!("o{round}")),
        ];
        if round % 3 == 0 {
            batch.push(record("sensors/gps", format!("p{round}")));
        }
        let ticks = publish_records(&mut client, batch.clone()).await;
        for (r, t) in batch.iter().zip(ticks) {
            if r.stream != "other" {
                expected.push((r.stream.clone(), t, String::from_utf8(r.payload.to_vec()).unwrap()));
            }
        }
    }
    let mut sub = Sub::open(&mut client, request(&["sensors/imu/*", "sensors/gps"], beginning())).await;
    let (events, _) = sub.until_caught_up().await;
    let got = records(&events);
    let mut sorted = expected.clone();
    sorted.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    assert_eq!(got, sorted);

    // `**` selects every depth; new streams appear as StreamAdded, then their records.
    let mut all = Sub::open(&mut client, request(&["sensors/**"], now())).await;
    all.until_caught_up().await;
    publish_records(&mut client, vec![record("sensors/new/deep/x", "n1"), record("sensors/imu/accel", "a")])
        .await;
    let events = all.take_records(2).await;
    assert!(events.contains(&Seen::StreamAdded("sensors/new/deep/x".into())), "{events:?}");
    let got = records(&events);
    assert!(got.windows(2).all(|w| (w[0].1, &w[0].0) < (w[1].1, &w[1].0)), "{got:?}");
}

#[tokio::test]
async fn caught_up_comes_once_also_for_empty_and_unknown_streams() {
    let (_dir, _server, mut client) = started().await;
    let mut sub = Sub::open(&mut client, request(&["does/not/exist/yet"], beginning())).await;
    let (before, _) = sub.until_caught_up().await;
    assert!(before.is_empty());
    publish(&mut client, "does/not/exist/yet", &["first"]).await;
    let events = sub.take_records(1).await;
    assert_eq!(events[0], Seen::StreamAdded("does/not/exist/yet".into()));
    assert_eq!(payloads(&events), ["first"]);
    assert!(!events.iter().any(|e| matches!(e, Seen::CaughtUp(_))), "CaughtUp only once");
}

#[tokio::test]
async fn heartbeats_tell_a_quiet_stream_from_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.heartbeat = Duration::from_millis(100);
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let ticks = publish(&mut client, "busy", &["x"]).await;
    let mut sub = Sub::open(&mut client, request(&["quiet"], beginning())).await;
    sub.until_caught_up().await;
    let events = sub.next().await.unwrap();
    assert_eq!(events, vec![Seen::Heartbeat { tail_tick: ticks[0] }]);
}

/// The fan-out test of the issue: one publisher writes 100,000 numbered records while 20
/// subscribers join from the beginning at random moments; each sees every record exactly once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_subscribers_joining_at_random_moments_see_every_record_once_in_order() {
    const TOTAL: usize = 100_000;
    const BATCH: usize = 100;
    const SUBSCRIBERS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let url = server.url();

    let mut join_points: Vec<usize> =
        (0..SUBSCRIBERS).map(|_| rand::rng().random_range(0..TOTAL / BATCH)).collect();
    join_points.sort();
    let mut subscribers = Vec::new();
    let mut publisher = client(&url).await;
    let mut next_join = 0;
    for b in 0..TOTAL / BATCH {
        while next_join < SUBSCRIBERS && join_points[next_join] == b {
            let url = url.clone();
            subscribers.push(tokio::spawn(tokio::time::timeout(WAIT, async move {
                let mut client = client(&url).await;
                let mut sub = Sub::open(&mut client, request(&["numbers"], beginning())).await;
                let mut expect = 0usize;
                let mut caught_up = 0;
                while expect < TOTAL {
                    for event in sub.next().await.expect("subscription ended early") {
                        match event {
                            Seen::Record { payload, .. } => {
                                assert_eq!(
                                    payload,
                                    expect.to_string(),
                                    "record out of order, repeated or missing"
                                );
                                expect += 1;
                            }
                            Seen::CaughtUp(_) => caught_up += 1,
                            _ => {}
                        }
                    }
                }
                assert_eq!(caught_up, 1);
                expect
            })));
            next_join += 1;
        }
        let records = (b * BATCH..(b + 1) * BATCH).map(|i| record("numbers", i.to_string())).collect();
        publish_records(&mut publisher, records).await;
    }
    for subscriber in subscribers {
        assert_eq!(subscriber.await.unwrap().expect("a subscriber got every record in time"), TOTAL);
    }
}

#[tokio::test]
async fn a_cut_subscriber_resumes_with_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let proxy = Proxy::start(server.addr).await;
    let mut publisher = server.client().await;
    for i in 0..10 {
        let batch: Vec<String> = (0..10).map(|j| format!("a{}", i * 10 + j)).collect();
        publish(&mut publisher, "a", &batch.iter().map(String::as_str).collect::<Vec<_>>()).await;
        publish(&mut publisher, "b", &[&format!("b{i}")]).await;
    }

    let mut through_proxy = client(&proxy.url()).await;
    let mut sub = Sub::open(&mut through_proxy, request(&["a", "b"], beginning())).await;
    let mut delivered = records(&sub.take_records(30).await);
    proxy.cut();
    // The cut ends the subscription with an error; whatever arrived before it counts as delivered.
    while let Ok(Some(more)) = sub.next_result().await {
        delivered.extend(records(&more));
    }
    let mut last: HashMap<String, u64> = HashMap::new();
    for (stream, tick, _) in &delivered {
        last.insert(stream.clone(), *tick);
    }
    // Records appended while disconnected are part of "the rest".
    publish(&mut publisher, "a", &["a-late"]).await;
    publish(&mut publisher, "b", &["b-late"]).await;

    let mut req = request(&["a", "b"], beginning());
    req.resume = last.clone();
    let mut resumed = Sub::open(&mut publisher, req).await;
    let rest = records(&resumed.until_caught_up().await.0);
    for (stream, tick, _) in &rest {
        assert!(*tick > last[stream], "resume repeated {stream}@{tick}");
    }
    assert_eq!(rest[rest.len() - 2..].iter().map(|r| r.2.as_str()).collect::<Vec<_>>(), ["a-late", "b-late"]);

    // Exactly the rest: what was delivered plus what came after the resume is the whole log.
    let mut full = Sub::open(&mut publisher, request(&["a", "b"], beginning())).await;
    let everything = records(&full.until_caught_up().await.0);
    let mut stitched = delivered;
    stitched.extend(rest);
    stitched.sort_by(|x, y| (x.1, &x.0).cmp(&(y.1, &y.0)));
    assert_eq!(stitched, everything);
}

#[tokio::test]
async fn resume_rules_are_checked() {
    let (_dir, _server, mut client) = started().await;
    let mut req = request(&["a"], beginning());
    req.resume.insert("b".into(), 5);
    let err = client.subscribe(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("\"b\""), "{}", err.message());
}

#[tokio::test]
async fn a_subscriber_that_falls_far_behind_still_gets_everything_and_publishers_do_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    // No fsync, so that 5,000 sequential publishes (5,000 separate commits) are quick.
    let mut config = config(dir.path());
    config.fsync = tapeline::config::FsyncPolicy::Never;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    // A subscriber that does not read while 6,000 commits happen: more than the commit broadcast
    // holds (4,096), so it is told it lagged and must rescan storage.
    let mut slow = Sub::open(&mut client, request(&["early", "s"], beginning())).await;
    let mut publisher = server.client().await;
    // 8 KiB payloads: far more than HTTP/2 windows and the outbox can hold, so the subscription's
    // task really is stuck waiting for its client.
    let padding = "x".repeat(8192);
    let mut expected = Vec::new();
    // Every publish is acknowledged while the subscriber has not read a single message.
    for i in 0..6_000 {
        if i == 1_000 {
            // Commits of a stream that gets no later commit, made while the subscriber is stuck:
            // they fall out of the broadcast, and only the rescan after `Lagged` finds them.
            for j in 0..10 {
                publish(&mut publisher, "early", &[&format!("early {j}")]).await;
                expected.push(format!("early {j}"));
            }
        }
        let payload = format!("{i}-{padding}");
        expected.push(payload.clone());
        let ack = publisher.publish(pb::PublishRequest {
            records: vec![record("s", payload)],
            batch_id: i,
            ..Default::default()
        });
        assert_eq!(ack.await.unwrap().into_inner().ticks.len(), 1);
    }
    let events = slow.take_records(expected.len()).await;
    assert_eq!(payloads(&events), expected);
}

/// Reads are bounded in bytes as well as records: a stream of records larger than a read's byte
/// bound, between small ones, replays whole from the beginning and from after every record
/// (a read that starts inside a large record's chunk must still reach the next record).
#[tokio::test]
async fn large_records_replay_whole_from_anywhere() {
    let (_dir, _server, mut client) = started().await;
    let big = "L".repeat(1536 << 10);
    let mut ticks = Vec::new();
    let mut expected = Vec::new();
    for i in 0..6 {
        let payload = if i % 2 == 1 { format!("{i}{big}") } else { format!("{i}") };
        ticks.extend(publish(&mut client, "large/s", &[payload.as_str()]).await);
        expected.push(payload);
    }
    let end = *ticks.last().unwrap();
    for from in 0..ticks.len() {
        let start =
            if from == 0 { beginning() } else { pb::subscribe_request::Start::After(ticks[from - 1]) };
        let mut sub =
            Sub::open(&mut client, pb::SubscribeRequest { end, ..request(&["large/s"], start) }).await;
        let got = payloads(&sub.until_end().await);
        assert_eq!(got.len(), ticks.len() - from, "from record {from}");
        assert!(got == expected[from..], "from record {from}: the records differ");
    }
}
