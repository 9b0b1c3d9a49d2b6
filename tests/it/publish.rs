//! Publishing: acks, atomic batches, pipelined streams, every refusal with its status and
//! sentence, and durability across a restart.

use crate::support::*;
use futures::StreamExt;
use tapeline::config::Limits;
use tapeline::protocol::pb;
use tonic::Code;

#[tokio::test]
async fn ticks_are_unique_and_increasing_across_streams() {
    let (_dir, _server, mut client) = started().await;
    let mut all = Vec::new();
    for i in 0..20 {
        let ticks = publish_records(
            &mut client,
            vec![record("a", format!("{i}")), record("b", format!("{i}")), record("a", format!("{i}+"))],
        )
        .await;
        assert_eq!(ticks.len(), 3);
        all.extend(ticks);
    }
    assert!(all.windows(2).all(|w| w[0] < w[1]), "one broker-wide clock: {all:?}");
}

#[tokio::test]
async fn publish_stream_pipelines_batches_and_acks_each_in_order() {
    let (_dir, _server, mut client) = started().await;
    let requests: Vec<pb::PublishRequest> = (0..500u64)
        .map(|i| pb::PublishRequest {
            records: (0..10).map(|j| record("piped", format!("{}", i * 10 + j))).collect(),
            batch_id: i + 1,
            ..Default::default()
        })
        .collect();
    let acks: Vec<pb::PublishAck> = client
        .publish_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .map(|a| a.expect("ack"))
        .collect()
        .await;
    assert_eq!(acks.iter().map(|a| a.batch_id).collect::<Vec<_>>(), (1..=500).collect::<Vec<_>>());
    let ticks: Vec<u64> = acks.iter().flat_map(|a| a.ticks.clone()).collect();
    assert_eq!(ticks.len(), 5000);
    assert!(ticks.windows(2).all(|w| w[0] < w[1]), "batches commit in the order they were sent");

    let mut sub = Sub::open(&mut client, request(&["piped"], beginning())).await;
    let got = payloads(&sub.until_caught_up().await.0);
    assert_eq!(got, (0..5000).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_refused_batch_in_a_publish_stream_is_answered_and_the_stream_goes_on() {
    let (_dir, _server, mut client) = started().await;
    let requests = vec![
        pb::PublishRequest { records: vec![record("ok", "1")], batch_id: 1, ..Default::default() },
        pb::PublishRequest {
            records: vec![record("ok", "x"), record("bad//name", "2")],
            batch_id: 2,
            ..Default::default()
        },
        pb::PublishRequest { records: vec![record("ok", "3")], batch_id: 3, ..Default::default() },
    ];
    let acks: Vec<pb::PublishAck> = client
        .publish_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .map(|a| a.unwrap())
        .collect()
        .await;
    assert_eq!(acks.len(), 3);
    assert!(acks[0].error.is_none() && acks[2].error.is_none());
    let error = acks[1].error.as_ref().expect("batch 2 refused");
    assert_eq!(error.code, Code::InvalidArgument as i32);
    assert!(error.message.contains("bad//name"), "{}", error.message);
    let mut sub = Sub::open(&mut client, request(&["ok"], beginning())).await;
    assert_eq!(payloads(&sub.until_caught_up().await.0), ["1", "3"], "nothing of the refused batch");
}

/// Asserts that `records` is refused with `code` and a message containing every one of `words`,
/// and that nothing of it was stored.
async fn refused(server: &TestServer, records: Vec<pb::Record>, code: Code, words: &[&str]) {
    let mut client = server.client().await;
    let before = stored_streams(&mut client).await;
    let status =
        client.publish(pb::PublishRequest { records, batch_id: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(status.code(), code, "{}", status.message());
    for word in words {
        assert!(status.message().contains(word), "{:?} lacks {word:?}", status.message());
    }
    let after = stored_streams(&mut client).await;
    assert_eq!(before, after, "a refused batch leaves nothing behind");
}

#[tokio::test]
async fn bad_batches_get_a_clear_status_and_leave_nothing_behind() {
    let (_dir, server, mut client) = started().await;
    let ticks = publish(&mut client, "s", &["first"]).await;

    // Names.
    for bad in ["", "a//b", "/a", "a b", "sensors/*", &"x".repeat(256)] {
        refused(
            &server,
            vec![record("s", "ok"), record(bad, "x")],
            Code::InvalidArgument,
            &["invalid stream name"],
        )
        .await;
    }
    // Sizes.
    let limits = Limits::default();
    let huge = vec![0u8; limits.max_record_bytes + 1];
    refused(
        &server,
        vec![record("s", "ok"), record("s", huge)],
        Code::ResourceExhausted,
        &["4194304", "max_record_bytes"],
    )
    .await;
    let many: Vec<pb::Record> = (0..limits.max_batch_records + 1).map(|_| record("s", "")).collect();
    refused(&server, many, Code::ResourceExhausted, &["65537", "65536", "max_batch_records"]).await;
    let big: Vec<pb::Record> = (0..5).map(|_| record("s", vec![0u8; 4 << 20])).collect();
    refused(&server, big, Code::ResourceExhausted, &["max_batch_bytes"]).await;
    // Explicit ticks.
    let mut stale = record("s", "stale");
    stale.tick = ticks[0];
    refused(
        &server,
        vec![record("new/stream", "x"), stale],
        Code::FailedPrecondition,
        &[&ticks[0].to_string(), "last tick", "\"s\""],
    )
    .await;
    import(&mut client, "imported").await;
    let mut out_of_order = vec![record("imported", "a"), record("imported", "b")];
    out_of_order[0].tick = 2000;
    out_of_order[1].tick = 1000;
    refused(&server, out_of_order, Code::FailedPrecondition, &["1000", "2000"]).await;
    let mut ahead = record("s", "x");
    ahead.tick = tapeline::types::Tick::now().0 + 3_600_000_000_000;
    refused(&server, vec![ahead], Code::FailedPrecondition, &["ahead of the broker's clock"]).await;
    let mut too_far = record("s", "x");
    too_far.tick = u64::MAX;
    refused(&server, vec![too_far], Code::InvalidArgument, &[&u64::MAX.to_string()]).await;
    // Headers.
    let mut headed = record("s", "x");
    headed.headers.insert("k".into(), "v".repeat(limits.max_header_bytes));
    refused(&server, vec![headed], Code::ResourceExhausted, &["headers", "max_header_bytes"]).await;
    // A payload damaged on the way.
    let mut damaged = record("s", "payload");
    damaged.crc32 = Some(crc32fast::hash(b"other"));
    refused(&server, vec![damaged], Code::InvalidArgument, &["CRC32"]).await;
    // An empty batch.
    refused(&server, vec![], Code::InvalidArgument, &["at least one record"]).await;

    let mut sub = Sub::open(&mut client, request(&["**"], beginning())).await;
    assert_eq!(payloads(&sub.until_caught_up().await.0), ["first"]);
}

#[tokio::test]
async fn explicit_ticks_import_a_recorded_session() {
    let (_dir, _server, mut client) = started().await;
    let recorded: Vec<pb::Record> = (1..=3)
        .map(|i| {
            let mut r = record("session/lap", format!("lap {i}"));
            r.tick = 1_000_000_000 * i;
            r.origin_time = 5 + i;
            r.headers.insert("driver".into(), "44".into());
            r
        })
        .collect();
    assert_eq!(import_records(&mut client, recorded).await, [1_000_000_000, 2_000_000_000, 3_000_000_000]);
    let sub = Sub::open(&mut client, request(&["session/lap"], beginning())).await;
    let mut stream = sub.stream;
    let message = stream.message().await.unwrap().unwrap();
    let Some(pb::subscribe_response::Event::Records(batch)) = message.event else { panic!("records first") };
    assert_eq!(batch.records.len(), 3);
    assert_eq!(batch.records[1].origin_time, 7);
    assert_eq!(batch.records[1].headers.get("driver").map(String::as_str), Some("44"));
    assert_eq!(batch.records[1].crc32, Some(crc32fast::hash(b"lap 2")));
}

#[tokio::test]
async fn bad_subscriptions_get_a_clear_status() {
    let (_dir, _server, mut client) = started().await;
    for (pattern, words) in [("a/**/b", "last segment"), ("a//b", "must not be empty"), ("a/b*", "a/b*")] {
        let status = client.subscribe(request(&[pattern], beginning())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(words) && status.message().contains("invalid pattern"),
            "{}",
            status.message()
        );
    }
    let status = client.subscribe(request(&[], beginning())).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// The broker stops reading an open `PublishStream` at shutdown, answers what it took, and ends
/// the stream with UNAVAILABLE, without waiting for the client to close its side.
#[tokio::test]
async fn an_open_publish_stream_is_answered_and_ended_unavailable_at_shutdown() {
    let (dir, server, mut client) = started().await;
    let (requests, input) = tokio::sync::mpsc::channel(4);
    let mut acks =
        client.publish_stream(tokio_stream::wrappers::ReceiverStream::new(input)).await.unwrap().into_inner();
    let batch = |id: u64| pb::PublishRequest {
        records: vec![record("open", format!("batch {id}"))],
        batch_id: id,
        ..Default::default()
    };
    requests.send(batch(1)).await.unwrap();
    assert_eq!(acks.message().await.unwrap().expect("an ack").batch_id, 1);

    let stopping = tokio::spawn(server.stop());
    let ending = tokio::time::timeout(std::time::Duration::from_secs(10), acks.message())
        .await
        .expect("the stream ends while the client keeps its side open")
        .expect_err("the stream ends with a status");
    assert_eq!(ending.code(), Code::Unavailable, "{ending}");
    assert!(ending.message().contains("shutting down"), "{ending}");
    stopping.await.unwrap();
    drop(requests);

    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let mut sub = Sub::open(&mut client, request(&["open"], beginning())).await;
    assert_eq!(payloads(&sub.until_caught_up().await.0), ["batch 1"]);
}

#[tokio::test]
async fn a_restarted_broker_serves_every_acknowledged_record() {
    let (dir, server, mut client) = started().await;
    let mut acked = Vec::new();
    for i in 0..50 {
        let batch: Vec<pb::Record> =
            (0..20).map(|j| record(if j % 2 == 0 { "even" } else { "odd" }, format!("{i}.{j}"))).collect();
        let ticks = publish_records(&mut client, batch.clone()).await;
        acked.extend(
            batch
                .into_iter()
                .zip(ticks)
                .map(|(r, t)| (r.stream, t, String::from_utf8(r.payload.to_vec()).unwrap())),
        );
    }
    let info_before = stored_streams(&mut client).await;
    let id_before = client.hello(pb::HelloRequest::default()).await.unwrap().into_inner().server_id;
    drop(client);
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let mut sub = Sub::open(&mut client, request(&["even", "odd"], beginning())).await;
    assert_eq!(records(&sub.until_caught_up().await.0), acked);
    let info_after = stored_streams(&mut client).await;
    assert_eq!(info_before, info_after, "counters are recovered exactly");
    assert_eq!(info_after[0].records, 500);
    assert_eq!(client.hello(pb::HelloRequest::default()).await.unwrap().into_inner().server_id, id_before);
    // New ticks continue after the recovered ones.
    let next = publish(&mut client, "even", &["after restart"]).await;
    assert!(next[0] > acked.last().unwrap().1);
}

#[tokio::test]
async fn large_batches_are_split_into_chunks_and_read_back_whole() {
    let (dir, server, mut client) = started().await;
    // 20,000 records in one batch: several chunks (4,096 records each), one atomic commit.
    let batch: Vec<pb::Record> = (0..20_000).map(|i| record("big", format!("{i}"))).collect();
    let ticks = publish_records(&mut client, batch).await;
    assert_eq!(ticks.len(), 20_000);
    // Start in the middle of a chunk.
    let mut sub =
        Sub::open(&mut client, request(&["big"], pb::subscribe_request::Start::At(ticks[5_000]))).await;
    let got = payloads(&sub.until_caught_up().await.0);
    assert_eq!(got, (5_000..20_000).map(|i| i.to_string()).collect::<Vec<_>>());
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let info = client
        .describe_stream(pb::DescribeStreamRequest { stream: "big".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.records, info.first_tick, info.last_tick), (20_000, ticks[0], ticks[19_999]));
}

#[tokio::test]
async fn hello_health_and_reflection_answer() {
    let (_dir, server, mut client) = started().await;
    let hello = client
        .hello(pb::HelloRequest { protocol_version: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hello.protocol_versions, [1]);
    assert_eq!(hello.server_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.server_id.len(), 16);
    let status =
        client.hello(pb::HelloRequest { protocol_version: 99, ..Default::default() }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("99") && status.message().contains("[1]"), "{}", status.message());
    let status =
        client.describe_stream(pb::DescribeStreamRequest { stream: "nope".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest { service: "tapeline.v1.Tapeline".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers =
        reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"tapeline.v1.Tapeline".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

#[tokio::test]
async fn every_fsync_policy_acknowledges_and_keeps_records_across_a_clean_restart() {
    for policy in ["interval=5", "never", "always"] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.fsync = policy.parse().unwrap();
        let server = TestServer::start_with(config.clone()).await;
        let mut client = server.client().await;
        for i in 0..10 {
            publish(&mut client, "p", &[&i.to_string()]).await;
        }
        drop(client);
        server.stop().await;
        let server = TestServer::start_with(config).await;
        let mut client = server.client().await;
        let mut sub = Sub::open(&mut client, request(&["p"], beginning())).await;
        let got = payloads(&sub.until_caught_up().await.0);
        assert_eq!(got, (0..10).map(|i| i.to_string()).collect::<Vec<_>>(), "{policy}");
    }
}
