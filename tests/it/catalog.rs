//! The stream catalog: `CreateStream` with metadata and retention, changes and deletions told to
//! pattern subscribers, metadata surviving restarts, the recent rate, and the CLI's `create`,
//! `streams --output json` and `delete`.

use crate::support::*;
use std::time::Duration;
use tapeline::protocol::pb;
use tonic::Code;

fn create(stream: &str, content_type: &str) -> pb::CreateStreamRequest {
    pb::CreateStreamRequest {
        stream: stream.into(),
        content_type: content_type.into(),
        schema_version: "3".into(),
        description: "engine telemetry".into(),
        retention: Some(pb::Retention { max_age_ms: 3_600_000, ..Default::default() }),
        update: false,
        import: false,
    }
}

/// The next `n` events that are not heartbeats or `CaughtUp` (failing after `WAIT`).
async fn events(sub: &mut Sub, n: usize) -> Vec<Seen> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    while seen.len() < n {
        let batch = tokio::time::timeout_at(deadline, sub.next()).await.expect("events in time");
        let batch = batch.expect("the subscription goes on");
        seen.extend(batch.into_iter().filter(|e| !matches!(e, Seen::Heartbeat { .. } | Seen::CaughtUp(_))));
    }
    seen
}

#[tokio::test]
async fn metadata_is_set_changed_told_and_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let mut watcher = Sub::open(&mut client.clone(), request(&["cat/**"], now())).await;

    let info = client.create_stream(create("cat/engine", "application/json")).await.unwrap().into_inner();
    assert_eq!((info.content_type.as_str(), info.schema_version.as_str()), ("application/json", "3"));
    assert_eq!(info.retention.unwrap().max_age_ms, 3_600_000);
    assert_eq!(info.effective_retention.unwrap().max_age_ms, 3_600_000, "the stream's own limit applies");
    assert_eq!(events(&mut watcher, 1).await, [Seen::StreamAdded("cat/engine".into())]);

    // The same again is fine; other metadata needs `update`.
    client.create_stream(create("cat/engine", "application/json")).await.expect("idempotent");
    let refused = client.create_stream(create("cat/engine", "text/csv")).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert!(
        refused.message().contains("cat/engine") && refused.message().contains("update"),
        "{}",
        refused.message()
    );

    let ticks = publish(&mut client, "cat/engine", &["{\"rpm\":900}", "{\"rpm\":950}"]).await;
    let changed = client
        .create_stream(pb::CreateStreamRequest { update: true, ..create("cat/engine", "text/csv") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((changed.content_type.as_str(), changed.records), ("text/csv", 2), "the records stay");
    // The watcher sees the records, then the change.
    let seen = events(&mut watcher, 3).await;
    assert!(
        matches!(&seen[2], Seen::StreamChanged { stream, content_type, deleted: false } if stream == "cat/engine" && content_type == "text/csv"),
        "{seen:?}"
    );

    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let again = client
        .describe_stream(pb::DescribeStreamRequest { stream: "cat/engine".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            again.content_type.as_str(),
            again.schema_version.as_str(),
            again.description.as_str(),
            again.last_tick
        ),
        ("text/csv", "3", "engine telemetry", ticks[1])
    );
    assert_eq!(again.retention.unwrap().max_age_ms, 3_600_000);
}

#[tokio::test]
async fn a_deleted_stream_is_gone_told_and_a_new_one_may_take_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    publish(&mut client, "del/a", &["one", "two"]).await;
    publish(&mut client, "del/b", &["kept"]).await;
    let mut watcher = Sub::open(&mut client.clone(), request(&["del/**"], beginning())).await;
    watcher.take_records(3).await;

    let gone =
        client.delete_stream(pb::DeleteStreamRequest { stream: "del/a".into() }).await.unwrap().into_inner();
    assert_eq!(gone.records, 2);
    let seen = events(&mut watcher, 1).await;
    assert!(
        matches!(&seen[..], [Seen::StreamChanged { stream, deleted: true, .. }] if stream == "del/a"),
        "{seen:?}"
    );
    let missing =
        client.describe_stream(pb::DescribeStreamRequest { stream: "del/a".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing = client.delete_stream(pb::DeleteStreamRequest { stream: "del/a".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // A new stream under the name starts empty; the watcher is told and gets its record.
    let tick = publish(&mut client, "del/a", &["fresh"]).await[0];
    let seen = events(&mut watcher, 2).await;
    assert_eq!(seen[0], Seen::StreamAdded("del/a".into()));
    assert!(matches!(seen[1], Seen::Record { tick: t, .. } if t == tick), "{seen:?}");

    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let mut all =
        Sub::open(&mut client, pb::SubscribeRequest { end: tick, ..request(&["del/**"], beginning()) }).await;
    let payloads = payloads(&all.until_end().await);
    assert_eq!(payloads, ["kept", "fresh"], "nothing of the deleted stream comes back after a restart");
    server.stop().await;
    let out = std::process::Command::new(BIN).args(["verify", "--data"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "the data dir verifies clean: {}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn a_streams_own_retention_and_recent_rate_show_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let config = tapeline::config::Config {
        retention: tapeline::config::Retention {
            check_every: Duration::from_millis(20),
            ..Default::default()
        },
        ..config(dir.path())
    };
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let request = pb::CreateStreamRequest {
        retention: Some(pb::Retention { max_records: 50, ..Default::default() }),
        ..create("own/s", "")
    };
    client.create_stream(request).await.unwrap();
    for _ in 0..20 {
        publish(&mut client, "own/s", &["r"; 10]).await;
        publish(&mut client, "own/other", &["r"; 10]).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = client
            .describe_stream(pb::DescribeStreamRequest { stream: "own/s".into() })
            .await
            .unwrap()
            .into_inner();
        if info.records <= 50 {
            assert!(info.records > 40, "{info:?}");
            // 200 records within the last moment: about 200 / 10 s.
            assert!(info.records_per_second > 5.0 && info.records_per_second < 25.0, "{info:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's own max_records never applied: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = client
        .describe_stream(pb::DescribeStreamRequest { stream: "own/other".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.records, 200, "other streams keep the server's retention (everything)");
}

#[tokio::test]
async fn the_cli_creates_lists_as_json_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &[]);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).args(["--server", &serve.url]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let created = cli(&[
        "create",
        "cli/imu",
        "--content-type",
        "application/x-protobuf; messageType=imu.Sample",
        "--max-age",
        "2h",
    ]);
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["retention"]["max_age_ms"], 7_200_000);
    let listed: serde_json::Value = serde_json::from_str(&cli(&["streams", "--output", "json"])).unwrap();
    assert_eq!(listed[0]["stream"], "cli/imu");
    assert_eq!(listed[0]["content_type"], "application/x-protobuf; messageType=imu.Sample");
    let table = cli(&["streams"]);
    assert!(
        table.contains("RETENTION") && table.contains("2h/-/-") && table.contains("messageType=imu.Sample"),
        "{table}"
    );
    let deleted: serde_json::Value = serde_json::from_str(&cli(&["delete", "cli/imu"])).unwrap();
    assert_eq!(deleted["stream"], "cli/imu");
    let listed: serde_json::Value = serde_json::from_str(&cli(&["streams", "--output", "json"])).unwrap();
    assert_eq!(listed, serde_json::json!([]));
    // An import: listed as such until sealed.
    let created: serde_json::Value =
        serde_json::from_str(&cli(&["create", "cli/session", "--import"])).unwrap();
    assert_eq!(created["importing"], true);
    assert!(cli(&["streams"]).contains("cli/session (importing)"));
    let sealed: serde_json::Value = serde_json::from_str(&cli(&["seal", "cli/session"])).unwrap();
    assert_eq!(sealed["importing"], false);
    let table = cli(&["streams"]);
    assert!(table.contains("cli/session") && !table.contains("importing"), "{table}");
}

/// Deleting the stream that held the newest acknowledged record, or every stream, must not look
/// like a rolled-back log at the next start (the acknowledged-tick mark goes down with it).
#[tokio::test]
async fn deleting_the_newest_records_is_not_a_rollback_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let older = publish(&mut client, "mark/older", &["1"]).await[0];
    publish(&mut client, "mark/newer", &["2"]).await;
    // Past the mark's write interval, so the mark holds the newest tick.
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(&mut client, "mark/newer", &["3"]).await;
    client.delete_stream(pb::DeleteStreamRequest { stream: "mark/newer".into() }).await.unwrap();
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let info =
        client.describe_stream(pb::DescribeStreamRequest { stream: "mark/older".into() }).await.unwrap();
    assert_eq!(info.into_inner().last_tick, older);
    client.delete_stream(pb::DeleteStreamRequest { stream: "mark/older".into() }).await.unwrap();
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    assert!(stored_streams(&mut server.client().await).await.is_empty());
    server.stop().await;
}

/// Catalog events arrive in the order they happened relative to the records, also when the
/// subscription takes many commits at once (here: while a paced delivery waits for its next
/// record): records published before a metadata change come before its `stream_changed`.
#[tokio::test]
async fn catalog_events_keep_their_place_among_the_records() {
    let (_dir, _server, mut client) = started().await;
    client.create_stream(create("order/s", "text/plain")).await.unwrap();
    let mut paced = request(&["order/**"], beginning());
    paced.pace = 1.0;
    let mut sub = Sub::open(&mut client, paced).await;
    sub.until_caught_up().await;
    // Two records 1.5 s apart: the paced delivery waits between them while the next commits
    // happen, then takes them all at once.
    let now = tapeline::types::Tick::now().0;
    let early = |tick, payload: &str| pb::Record { tick, ..record("order/s", payload) };
    publish_records(&mut client, vec![early(now, "r1"), early(now + 1_500_000_000, "r2")]).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    publish(&mut client, "order/s", &["m0", "m1"]).await;
    client
        .create_stream(pb::CreateStreamRequest { update: true, ..create("order/s", "text/csv") })
        .await
        .unwrap();
    publish(&mut client, "order/s", &["m2"]).await;
    let seen: Vec<String> = events(&mut sub, 6)
        .await
        .into_iter()
        .map(|e| match e {
            Seen::Record { payload, .. } => payload,
            Seen::StreamChanged { content_type, .. } => format!("changed to {content_type}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(seen, ["r1", "r2", "m0", "m1", "changed to text/csv", "m2"]);
}

/// A subscriber that fell further behind than the commit broadcast holds (it did not read while
/// more than 4,096 commits happened) is told what the missed commits would have told: a stream
/// deleted, another's metadata changed, a new stream; and it still gets every record once.
#[tokio::test]
async fn a_lagging_subscriber_is_told_the_catalog_changes_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        tapeline::config::Config { fsync: tapeline::config::FsyncPolicy::Never, ..config(dir.path()) };
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    client.create_stream(create("lag/gone", "text/plain")).await.unwrap();
    client.create_stream(create("lag/meta", "text/plain")).await.unwrap();
    publish(&mut client, "lag/busy", &["first"]).await;
    let mut sub = Sub::open(&mut client, request(&["lag/**"], beginning())).await;
    sub.until_caught_up().await;
    // Not read meanwhile: once HTTP/2's windows (4 MiB) and the outbox are full, its pump stops
    // taking commits. The catalog changes happen then, and more than the broadcast holds (4,096
    // commits) after them, so only a rescan can tell them.
    const BEFORE: usize = 1_500;
    const COMMITS: usize = BEFORE + 4_200;
    let filler = "x".repeat(4000);
    for i in 0..BEFORE {
        publish(&mut client, "lag/busy", &[&format!("{i} {filler}")]).await;
    }
    client.delete_stream(pb::DeleteStreamRequest { stream: "lag/gone".into() }).await.unwrap();
    client
        .create_stream(pb::CreateStreamRequest { update: true, ..create("lag/meta", "text/csv") })
        .await
        .unwrap();
    publish(&mut client, "lag/new", &["new"]).await;
    for i in BEFORE..COMMITS {
        publish(&mut client, "lag/busy", &[&format!("{i} {filler}")]).await;
    }
    publish(&mut client, "lag/new", &["last"]).await;

    let mut seen = Vec::new();
    while !seen.iter().any(|e| matches!(e, Seen::Record { payload, .. } if payload == "last")) {
        seen.extend(sub.next().await.expect("the subscription goes on"));
    }
    let busy: Vec<String> = records(&seen)
        .into_iter()
        .filter(|r| r.0 == "lag/busy")
        .map(|r| r.2.split(' ').next().unwrap_or_default().to_string())
        .collect();
    let expected: Vec<String> = (0..COMMITS).map(|i| i.to_string()).collect();
    assert_eq!(busy, expected, "every record once, in order");
    let told: Vec<&Seen> =
        seen.iter().filter(|e| !matches!(e, Seen::Record { .. } | Seen::Heartbeat { .. })).collect();
    let deleted =
        Seen::StreamChanged { stream: "lag/gone".into(), content_type: "text/plain".into(), deleted: true };
    let changed =
        Seen::StreamChanged { stream: "lag/meta".into(), content_type: "text/csv".into(), deleted: false };
    assert!(told.contains(&&deleted), "{told:?}");
    assert!(told.contains(&&changed), "{told:?}");
    assert!(told.contains(&&Seen::StreamAdded("lag/new".into())), "{told:?}");
    server.stop().await;
}
