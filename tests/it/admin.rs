//! The admin listener (`--admin-listen`), through the real binary: Prometheus metrics that count
//! what happened, health and readiness (a relay is not ready while its upstream is down), the
//! status page read by a real headless browser (Debian's chromium, which `.ci/run` installs; its
//! screenshot is kept in `target/tmp/status-page.png`), the refusal of an exposed admin address,
//! and JSON logs.

use crate::support::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tapeline::protocol::pb;

/// A GET of `path` on `admin` (`http://host:port/`): the status code and the body.
fn get(admin: &str, path: &str) -> (u16, String) {
    let host = admin.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(host).expect("connect to the admin listener");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a whole response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers, then a body");
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    (code, body.to_string())
}

/// The value of the series `series` (its name and labels, exactly as rendered) in a scrape.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Loads `url` in headless chromium with `args` and lets its scripts run for 4 s of virtual time;
/// returns what chromium printed.
fn browse(url: &str, args: &[String]) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (installed by .ci/run: apt-get install chromium)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 50 ms until it holds, for at most `WAIT`.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let began = Instant::now();
    while !check() {
        assert!(began.elapsed() < WAIT, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_a_live_status_page_show_what_happens() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &["--admin-listen", "127.0.0.1:0"]);
    let admin = serve.admin.clone().expect("the admin line before the ready line");
    assert_eq!(get(&admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(&admin, "/readyz"), (200, "ready\n".into()));

    // Traffic: 30 records in two streams, a live subscriber, one refused call.
    let mut c = client(&serve.url).await;
    for i in 0..10 {
        publish(&mut c, "plant/press-1", &[&format!("a{i}"), &format!("b{i}")]).await;
        publish(&mut c, "plant/oven", &[&format!("c{i}")]).await;
    }
    let mut sub = Sub::open(&mut c, request(&["plant/**"], beginning())).await;
    sub.until_caught_up().await;
    let refused = c.publish(pb::PublishRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let (code, scrape) = tokio::task::spawn_blocking({
        let admin = admin.clone();
        move || get(&admin, "/metrics")
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    let expect = |series: &str, wanted: f64| {
        assert_eq!(value(&scrape, series), Some(wanted), "{series} in:\n{scrape}");
    };
    expect("tapeline_records_in_total", 30.0);
    expect("tapeline_records_out_total", 30.0);
    expect("tapeline_stream_records{stream=\"plant/press-1\"}", 20.0);
    expect("tapeline_stream_records{stream=\"plant/oven\"}", 10.0);
    expect("tapeline_streams", 2.0);
    expect("tapeline_subscriptions{state=\"live\"}", 1.0);
    expect("tapeline_connections", 1.0);
    expect("tapeline_refusals_total{code=\"InvalidArgument\",reason=\"invalid_argument\"}", 1.0);
    expect("tapeline_commit_group_batches_count", 20.0);
    expect("tapeline_ack_seconds_count", 20.0);
    assert!(value(&scrape, "tapeline_fsync_seconds_count").is_some_and(|n| n >= 20.0), "{scrape}");
    assert!(scrape.contains("# HELP tapeline_fsync_seconds"), "{scrape}");
    assert!(value(&scrape, "tapeline_disk_used_bytes").is_some_and(|b| b > 0.0), "{scrape}");

    // The page, as a browser shows it once its script has refreshed it a few times.
    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let page = admin.clone();
    let dom = tokio::task::spawn_blocking(move || browse(&page, &["--dump-dom".to_string()])).await.unwrap();
    let refreshes: u32 = dom
        .split("data-refreshes=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .expect("the body's refresh count");
    assert!(refreshes >= 2, "the page refreshed itself {refreshes} times");
    for shown in ["plant/press-1", "plant/oven", "Streams (2)", "Subscriptions (1)", "plant/**", ">live<"] {
        assert!(dom.contains(shown), "the page shows {shown:?}:\n{dom}");
    }
    // Each stream's row with its record count, and the subscription's count of records sent.
    for row in ["plant/oven<td class=\"n\">10<", "plant/press-1<td class=\"n\">20<", ">30 records, "] {
        assert!(dom.replace("</td>", "").contains(row), "the page shows {row:?}:\n{dom}");
    }
    let server_id = c.hello(pb::HelloRequest::default()).await.unwrap().into_inner().server_id;
    assert!(dom.contains(&server_id), "the page names the server {server_id}");
    let shot = png.clone();
    tokio::task::spawn_blocking(move || {
        browse(&admin, &[format!("--screenshot={}", shot.display()), "--window-size=1400,900".to_string()])
    })
    .await
    .unwrap();
    assert!(std::fs::metadata(&png).is_ok_and(|m| m.len() > 10_000), "a screenshot in {}", png.display());
    eprintln!("status page screenshot: {}", png.display());
    drop(sub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_is_ready_only_while_its_upstream_link_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut origin = Serve::start(&dir.path().join("origin"), &[]);
    let relay = Serve::start(
        &dir.path().join("relay"),
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &origin.url,
            "--mirror",
            "r/**",
            "--heartbeat",
            "300ms",
        ],
    );
    let admin = relay.admin.clone().unwrap();
    tokio::task::spawn_blocking(move || {
        eventually("the relay to be ready", || get(&admin, "/readyz").0 == 200);
        let _ = origin.child.kill();
        let _ = origin.child.wait();
        eventually("the relay to be unready", || get(&admin, "/readyz").0 == 503);
        let (_, why) = get(&admin, "/readyz");
        assert!(why.contains("relay link to http://") && why.contains("is down"), "{why}");
        assert_eq!(get(&admin, "/healthz").0, 200, "alive all the same");
        let (_, scrape) = get(&admin, "/metrics");
        let up = format!("tapeline_relay_link_up{{upstream=\"{}\"}}", origin.url);
        assert_eq!(value(&scrape, &up), Some(0.0), "{scrape}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_reachable_from_other_hosts_is_refused_and_logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(BIN)
        .args(["serve", "--data", data.to_str().unwrap(), "--admin-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin listener") && err.contains("--insecure"), "{err}");

    // JSON logs, with a line for each connection, subscription and (rate-limited) refusal.
    let serve = Serve::start(&data, &["--log-format", "json"]);
    let cli = |args: &[&str], input: &str| {
        let mut child = std::process::Command::new(BIN)
            .args(args)
            .args(["--server", &serve.url])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait().unwrap()
    };
    assert!(cli(&["publish", "logs/s"], "a\nb\n").success());
    assert!(cli(&["tail", "logs/**", "--to", "now"], "").success());
    // 50 refusals of one kind at once are one line; the next, a second later, counts them.
    let mut c = client(&serve.url).await;
    for _ in 0..50 {
        c.publish(pb::PublishRequest::default()).await.unwrap_err();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.publish(pb::PublishRequest::default()).await.unwrap_err();
    drop(c);
    let (clean, _) = tokio::task::block_in_place(|| serve.terminate());
    assert!(clean);
    let log = std::fs::read_to_string(dir.path().join("data.serve.log")).unwrap();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()), "{log}");
    let said = |start: &str| {
        lines.iter().filter(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with(start))).count()
    };
    assert_eq!(said("serving"), 1, "{log}");
    assert!(said("connection opened") >= 3 && said("connection closed") >= 3, "{log}");
    assert_eq!(said("subscription started"), 1, "{log}");
    assert_eq!(said("subscription ended: its end was delivered"), 1, "{log}");
    let refused: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("refused: ")))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert_eq!(refused[0]["fields"]["reason"], "invalid_argument");
    assert_eq!(refused[1]["fields"]["unlogged"], 49, "{log}");
}
