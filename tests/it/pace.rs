//! Paced replay: with a pace, each record arrives its recorded offset from the first record, over
//! the factor, after the first one (within 10%), in the replay and then live; a long paced wait
//! sends heartbeats and ends at shutdown; a pace that is not a speed factor is refused.
//!
//! Only the promised pacing is measured, never how fast the broker is: every expected time is a
//! lower bound the broker must wait for, with room above it for a loaded machine.

use crate::support::*;
use std::time::Duration;
use tapeline::protocol::pb;
use tapeline::types::Tick;
use tokio::time::Instant;
use tonic::Code;

const MS: u64 = 1_000_000;

/// The gaps between the records of the recorded session, in ms: bursts of 1 ms, pauses of 190 ms;
/// 2,427 ms in all, over 36 records.
const GAPS_MS: [u64; 35] = [
    40, 1, 120, 15, 190, 60, 5, 80, 150, 30, 1, 2, 110, 70, 45, 170, 20, 90, 10, 130, 55, 3, 100, 180, 25,
    65, 140, 8, 85, 35, 160, 50, 12, 75, 95,
];

/// Lateness allowed to every record besides the 10%: scheduling and loopback, which matter only
/// for records a few ms after the first. Up to 33 ms was seen on this 2-core machine with both
/// cores busy elsewhere; CI machines may be slower still.
const SLACK: Duration = Duration::from_millis(150);

/// Publishes the recorded session with explicit ticks over two streams, ending 50 ms ago; returns
/// its ticks.
async fn record_session(client: &mut tapeline::client::Client) -> Vec<u64> {
    let span: u64 = GAPS_MS.iter().sum::<u64>() * MS;
    let first = Tick::now().0 - span - 50 * MS;
    let ticks: Vec<u64> = std::iter::once(first)
        .chain(GAPS_MS.iter().scan(first, |tick, gap| {
            *tick += gap * MS;
            Some(*tick)
        }))
        .collect();
    let records = ticks
        .iter()
        .enumerate()
        .map(|(i, &tick)| {
            let stream = if i % 3 == 0 { "session/b" } else { "session/a" };
            pb::Record { tick, ..record(stream, format!("{i}")) }
        })
        .collect();
    assert_eq!(import_records(client, records).await, ticks, "the explicit ticks were kept");
    ticks
}

/// Reads `n` records, each with the moment its message arrived.
async fn arrivals(sub: &mut Sub, n: usize) -> Vec<(u64, Instant)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let batch = sub.next().await.expect("the subscription ended early");
        let at = Instant::now();
        seen.extend(records(&batch).into_iter().map(|(_, tick, _)| (tick, at)));
    }
    seen
}

/// How far each arrival is from `first` (the first record's tick and arrival) plus its recorded
/// offset over `factor`; fails when one is early or late by more than 10% of its offset plus
/// `SLACK`. Returns the smallest and largest error in ms (early is negative).
fn check_pacing(first: (u64, Instant), arrivals: &[(u64, Instant)], factor: f64) -> (f64, f64) {
    let (base_tick, base_at) = first;
    let (mut earliest, mut latest) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(tick, at) in arrivals {
        let expected = Duration::from_secs_f64((tick - base_tick) as f64 / 1e9 / factor);
        let actual = at - base_at;
        let error = actual.as_secs_f64() * 1e3 - expected.as_secs_f64() * 1e3;
        let allowed = expected / 10 + SLACK;
        assert!(
            actual + allowed >= expected && actual <= expected + allowed,
            "tick {tick} arrived {actual:?} after the first record, expected {expected:?} ± {allowed:?} at pace {factor}"
        );
        earliest = earliest.min(error);
        latest = latest.max(error);
    }
    (earliest, latest)
}

/// Replays the recorded session at `factor` and checks its timing; then publishes a live record
/// and checks it arrives by the same rule, measured from the same first record.
async fn paced_replay_then_live(factor: f64) {
    let (_dir, _server, mut client) = started().await;
    let ticks = record_session(&mut client).await;
    let mut sub = Sub::open(
        &mut client,
        pb::SubscribeRequest { pace: factor, ..request(&["session/**"], beginning()) },
    )
    .await;
    let replay = arrivals(&mut sub, ticks.len()).await;
    assert_eq!(replay.iter().map(|(t, _)| *t).collect::<Vec<_>>(), ticks, "every record once, in order");
    // The moment the replay began, as the arrivals imply it: the first record's own arrival may
    // have been delayed by scheduling, which would make every later one look early.
    let began = replay
        .iter()
        .map(|&(tick, at)| at - Duration::from_secs_f64((tick - ticks[0]) as f64 / 1e9 / factor))
        .min()
        .unwrap();
    let first = (ticks[0], began);
    let (early, late) = check_pacing(first, &replay, factor);

    // The whole run, without the slack: within 10% of the recorded span over the factor.
    let run = replay[replay.len() - 1].1 - first.1;
    let span = Duration::from_secs_f64((ticks[ticks.len() - 1] - ticks[0]) as f64 / 1e9 / factor);
    assert!(
        run.abs_diff(span) <= span / 10,
        "the replay took {run:?}, expected {span:?} ± 10% at pace {factor}"
    );

    let (events, _) = sub.until_caught_up().await;
    assert!(records(&events).is_empty(), "nothing after the replay before CaughtUp: {events:?}");
    // Live, by the same rule: the session started 2.5 s before the replay did, so at pace 1 the
    // live record keeps that offset, and at pace 2 it halves what is left of it.
    let live = publish(&mut client, "session/a", &["live"]).await[0];
    let arrived = arrivals(&mut sub, 1).await;
    assert_eq!(arrived[0].0, live);
    let (live_error, _) = check_pacing(first, &arrived, factor);
    let live_offset = arrived[0].1 - first.1;
    eprintln!(
        "pace {factor}: {} records over {span:?} arrived in {run:?}; errors from {early:.1} ms to {late:.1} ms; live record after {live_offset:?}, error {live_error:.1} ms",
        ticks.len()
    );
}

// Its own threads for the client: its arrival times should not wait for the server's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_pace_replays_the_recorded_timing_then_continues_live() {
    paced_replay_then_live(1.0).await;
}

// Its own threads for the client: its arrival times should not wait for the server's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_pace_replays_in_half_the_time_then_continues_live() {
    paced_replay_then_live(2.0).await;
}

/// Publishes two records a minute apart, the second already in the past, subscribes to them at the
/// original pace and reads the first: the subscription is then waiting a minute for the second.
async fn waiting_a_minute(server: &TestServer) -> Sub {
    let mut client = server.client().await;
    let now = Tick::now().0;
    let old = [now - 61_000 * MS, now - 1_000 * MS];
    import_records(&mut client, old.iter().map(|&tick| pb::Record { tick, ..record("s", "x") }).collect())
        .await;
    let mut sub =
        Sub::open(&mut client, pb::SubscribeRequest { pace: 1.0, ..request(&["s"], beginning()) }).await;
    assert_eq!(records(&sub.take_records(1).await)[0].1, old[0]);
    sub
}

#[tokio::test]
async fn a_long_paced_wait_sends_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = Duration::from_millis(100);
    let server = TestServer::start_with(tapeline::config::Config { heartbeat, ..config(dir.path()) }).await;
    let mut sub = waiting_a_minute(&server).await;
    for _ in 0..2 {
        // Far below the minute the wait lasts, so a silent wait fails here rather than at its end.
        let quiet = tokio::time::timeout(heartbeat * 20, sub.next())
            .await
            .expect("a heartbeat during the wait")
            .expect("the subscription goes on");
        assert!(matches!(quiet[..], [Seen::Heartbeat { .. }]), "the wait is not silence: {quiet:?}");
    }
}

#[tokio::test]
async fn a_long_paced_wait_ends_at_shutdown() {
    // The test servers' heartbeat is 30 s: no heartbeat wakes the wait up before shutdown does.
    let (_dir, server, _client) = started().await;
    let mut sub = waiting_a_minute(&server).await;
    let began = std::time::Instant::now();
    server.stop().await;
    // The broker gives up on subscription tasks after 10 s: well under it means the wait ended
    // at the signal.
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the paced wait held up shutdown for {:?}",
        began.elapsed()
    );
    let ending = sub.next_result().await;
    assert_eq!(ending.expect_err("the subscription ends with a status").code(), Code::Unavailable);
}

#[tokio::test]
async fn a_pace_that_is_not_a_speed_factor_is_refused_naming_it() {
    let (_dir, _server, mut client) = started().await;
    for (pace, shown) in [(-1.5, "-1.5"), (f64::NAN, "NaN"), (f64::INFINITY, "inf"), (1e7, "10000000")] {
        let refused = client
            .subscribe(pb::SubscribeRequest { pace, ..request(&["s"], beginning()) })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains(&format!("pace {shown} is not a speed factor"))
                && refused.message().contains("at most 1000000"),
            "{refused:?}"
        );
    }
}
