//! The clock across restarts: a tick the broker promised — a record's, or the tail of a heartbeat
//! on an idle broker, which tells subscribers that nothing at or below it will ever be appended —
//! stays promised after a crash and a restart with the wall clock set back. The real binary is
//! restarted under `faketime` (Debian's libfaketime, installed by `.ci/run`), its wall clock an
//! hour behind: the ticks it assigns must still lie above everything promised before.

use crate::support::*;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use tapeline::protocol::pb;

/// Debian's libfaketime, preloaded to move the broker's wall clock (not its monotonic clock).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `tapeline serve` on `data` with its wall clock `offset` away (faketime's syntax, e.g. "-1h"),
/// heartbeats every 100 ms; killed on drop.
fn serve_at(data: &Path, offset: &str) -> Serve {
    assert!(Path::new(FAKETIME).exists(), "{FAKETIME} is missing: install Debian's faketime package");
    let log_path = data.with_extension(format!("serve{offset}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--heartbeat", "100ms", "--data", data.to_str().unwrap()])
        .env("LD_PRELOAD", FAKETIME)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("tapeline listening on ").unwrap_or_else(|| panic!("{line:?}"));
    Serve::started(child, format!("http://{addr}"), log_path)
}

/// The tail of the first heartbeat above `above` on a subscription to `stream`.
async fn heartbeat_above(url: &str, stream: &str, above: u64) -> u64 {
    let mut client = client(url).await;
    let mut sub =
        Sub::open(&mut client, pb::SubscribeRequest { heartbeat_ms: 100, ..request(&[stream], now()) }).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(std::time::Instant::now() < deadline, "no heartbeat's tail rose above {above}");
        for event in sub.next().await.expect("the subscription goes on") {
            if let Seen::Heartbeat { tail_tick } = event {
                if tail_tick > above {
                    return tail_tick;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_clock_set_back_across_a_restart_never_assigns_a_promised_tick_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = serve_at(&data, "+0");
    let mut c = client(&serve.url).await;
    let first = publish(&mut c, "s", &["before"]).await[0];
    // An idle broker: the heartbeats' tails follow its clock, a second past the record.
    let promised = heartbeat_above(&serve.url, "s", first + 1_000_000_000).await;
    drop(c);
    // A crash (SIGKILL, no shutdown), then a restart an hour in the past.
    drop(serve);
    let serve = serve_at(&data, "-1h");
    let mut c = client(&serve.url).await;
    let tail = c.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    assert!(tail >= promised, "Hello's tail {tail} went back below the promised {promised}");
    let after = publish(&mut c, "s", &["after"]).await[0];
    assert!(
        after > promised,
        "tick {after} assigned after the restart is not above the tail {promised} promised before it (the first record was {first})"
    );
    let again = heartbeat_above(&serve.url, "s", 0).await;
    assert!(again >= after, "a heartbeat's tail {again} went back below {after}");
    // Every record once, in order, with its tick.
    let mut sub =
        Sub::open(&mut c, pb::SubscribeRequest { end: after, ..request(&["s"], beginning()) }).await;
    let got = records(&sub.until_end().await);
    assert_eq!(got, vec![("s".into(), first, "before".into()), ("s".into(), after, "after".into())]);
}
