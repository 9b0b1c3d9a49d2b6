//! The version handshake (issue 5, item 4): `Hello` answers with the server's identity and the
//! protocol versions it speaks, refuses an unsupported one naming what is supported, and carries
//! the operator's notice to clients older than a recommended version (the CLI prints it); and a
//! client built against the first protocol release (older message shapes, without any field added
//! since) still publishes and subscribes against the current server.

use crate::support::*;
use tapeline::protocol::pb;
use tonic::Code;

const NOTICE: &str = "[notice]\nrecommended_version = \"99.0.0\"\ntext = \"please upgrade\"\nurl = \"https://example.org/tapeline\"\n";

fn serve_with_notice(dir: &tempfile::TempDir) -> Serve {
    let settings = dir.path().join("tapeline.toml");
    std::fs::write(&settings, NOTICE).unwrap();
    Serve::start(&dir.path().join("data"), &["--config", settings.to_str().unwrap()])
}

#[tokio::test]
async fn hello_names_the_server_refuses_unknown_protocols_and_tells_old_clients() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve_with_notice(&dir);
    let mut c = client(&serve.url).await;
    let hello = |version: &str, protocol: u32| pb::HelloRequest {
        protocol_version: protocol,
        client_name: "test".into(),
        client_version: version.into(),
        client_id: "t-1".into(),
    };
    let old = c.hello(hello("0.0.1", 1)).await.unwrap().into_inner();
    assert!(!old.server_id.is_empty() && !old.server_version.is_empty());
    assert_eq!(old.protocol_versions, vec![1]);
    assert_eq!(old.protocol_version, 1);
    let notice = old.notice.expect("an older client is told");
    assert_eq!(notice.recommended_version, "99.0.0");
    assert_eq!(notice.text, "please upgrade");
    assert_eq!(notice.url, "https://example.org/tapeline");
    // Versions compare by number, not as text; a client that gives none is told too.
    assert!(c.hello(hello("99.0.0", 1)).await.unwrap().into_inner().notice.is_none());
    assert!(c.hello(hello("100.0", 0)).await.unwrap().into_inner().notice.is_none());
    assert!(c.hello(hello("9.10.0", 0)).await.unwrap().into_inner().notice.is_some());
    assert!(c.hello(hello("", 0)).await.unwrap().into_inner().notice.is_some());

    let refused = c.hello(hello("0.0.1", 7)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains('7') && refused.message().contains("[1]"), "{refused:?}");
}

#[test]
fn the_cli_prints_the_operators_notice() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve_with_notice(&dir);
    for command in ["info", "streams"] {
        let out = std::process::Command::new(BIN).args([command, "--server", &serve.url]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command}: {err}");
        assert!(
            err.contains("please upgrade")
                && err.contains("https://example.org/tapeline")
                && err.contains("99.0.0"),
            "{command}: {err}"
        );
    }
}

/// The first release's shapes: only the fields that existed then.
mod v1 {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Record {
        #[prost(string, tag = "1")]
        pub stream: String,
        #[prost(uint64, tag = "2")]
        pub tick: u64,
        #[prost(bytes = "vec", tag = "5")]
        pub payload: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PublishRequest {
        #[prost(message, repeated, tag = "1")]
        pub records: Vec<Record>,
        #[prost(uint64, tag = "2")]
        pub batch_id: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PublishAck {
        #[prost(uint64, tag = "1")]
        pub batch_id: u64,
        #[prost(uint64, repeated, tag = "2")]
        pub ticks: Vec<u64>,
    }
    /// `after` was one member of the `start` oneof: on the wire, just field 5.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubscribeRequest {
        #[prost(string, repeated, tag = "1")]
        pub streams: Vec<String>,
        #[prost(uint64, optional, tag = "5")]
        pub after: Option<u64>,
        #[prost(uint64, optional, tag = "7")]
        pub end: Option<u64>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RecordBatch {
        #[prost(message, repeated, tag = "1")]
        pub records: Vec<Record>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CaughtUp {
        #[prost(uint64, tag = "1")]
        pub tick: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubscribeResponse {
        #[prost(message, optional, tag = "1")]
        pub records: Option<RecordBatch>,
        #[prost(message, optional, tag = "2")]
        pub caught_up: Option<CaughtUp>,
    }
}

#[tokio::test]
async fn a_client_of_the_first_protocol_release_still_works() {
    use tonic::codegen::http::uri::PathAndQuery;
    let dir = tempfile::tempdir().unwrap();
    let serve = serve_with_notice(&dir);
    let channel =
        tonic::transport::Endpoint::from_shared(serve.url.clone()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);

    grpc.ready().await.unwrap();
    let records = (0..3)
        .map(|i| v1::Record { stream: "old/s".into(), tick: 0, payload: format!("r{i}").into_bytes() })
        .collect();
    let ack: v1::PublishAck = grpc
        .unary(
            tonic::Request::new(v1::PublishRequest { records, batch_id: 9 }),
            PathAndQuery::from_static("/tapeline.v1.Tapeline/Publish"),
            tonic_prost::ProstCodec::<v1::PublishRequest, v1::PublishAck>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.batch_id, 9);
    assert_eq!(ack.ticks.len(), 3);

    grpc.ready().await.unwrap();
    let request =
        v1::SubscribeRequest { streams: vec!["old/**".into()], after: Some(0), end: Some(ack.ticks[2]) };
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(request),
            PathAndQuery::from_static("/tapeline.v1.Tapeline/Subscribe"),
            tonic_prost::ProstCodec::<v1::SubscribeRequest, v1::SubscribeResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    // Newer fields and events (complete_to, heartbeats' upstreams, the final heartbeat) are
    // skipped by the old decoder; what it knows is unchanged.
    let mut got = Vec::new();
    let mut caught_up = None;
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(batch) = message.records {
            got.extend(batch.records.into_iter().map(|r| (r.stream, r.tick, r.payload)));
        }
        if let Some(c) = message.caught_up {
            caught_up = Some(c.tick);
        }
    }
    let want: Vec<_> =
        (0..3).map(|i| ("old/s".to_string(), ack.ticks[i], format!("r{i}").into_bytes())).collect();
    assert_eq!(got, want);
    assert_eq!(caught_up, Some(ack.ticks[2]));
}
