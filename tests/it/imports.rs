//! Imports keep the "delivered up to" promise (issue 19): a record with an explicit tick at or
//! below the broker's clock goes only into a stream created for an import, which no subscription
//! sees until it is sealed; sealing announces it with `stream_added` and its tick range, and the
//! import is then delivered whole, to a live subscriber and to a client resuming after a tail it
//! was given before the seal (across a restart); a replay of the same interval gives the same
//! records per stream as the live delivery.

use crate::support::*;
use std::time::Duration;
use tapeline::protocol::pb;
use tapeline::types::Tick;
use tonic::Code;

const SECOND: u64 = 1_000_000_000;

fn at(stream: &str, tick: u64, payload: &str) -> pb::Record {
    pb::Record { tick, ..record(stream, payload) }
}

async fn refused(client: &mut Client, records: Vec<pb::Record>) -> tonic::Status {
    let request = pb::PublishRequest { records, ..Default::default() };
    client.publish(request).await.expect_err("the batch is refused")
}

type Client = tapeline::client::Client;

fn names(list: &[pb::StreamInfo]) -> Vec<(String, bool)> {
    list.iter().map(|s| (s.name.clone(), s.importing)).collect()
}

/// The next message of a subscription, whatever it is.
async fn message(sub: &mut Sub) -> pb::subscribe_response::Event {
    let message = tokio::time::timeout(Duration::from_secs(30), sub.stream.message())
        .await
        .expect("a message within 30 s")
        .expect("no error status")
        .expect("the subscription goes on");
    message.event.expect("an event")
}

/// What a subscription delivered, message by message, as the test compares it.
#[derive(Debug, Default)]
struct Delivered {
    /// Records and `stream_added` events, in order: `stream payload` or `added stream first..last (n)`.
    seen: Vec<String>,
    /// Every batch's `complete_to`, in order.
    complete_to: Vec<u64>,
    /// The last heartbeat's tail.
    tail: u64,
}

impl Delivered {
    fn take(&mut self, event: pb::subscribe_response::Event) {
        use pb::subscribe_response::Event;
        match event {
            Event::Records(batch) => {
                self.complete_to.push(batch.complete_to);
                for r in batch.records {
                    self.seen.push(format!("{} {}", r.stream, String::from_utf8_lossy(&r.payload)));
                }
            }
            Event::StreamAdded(added) => {
                let s = added.stream.unwrap_or_default();
                self.seen.push(format!("added {} {}..{} ({})", s.name, s.first_tick, s.last_tick, s.records));
            }
            Event::Heartbeat(h) => self.tail = h.tail_tick,
            _ => {}
        }
    }

    /// Reads until a heartbeat whose tail is past `tick`.
    async fn until_tail_past(&mut self, sub: &mut Sub, tick: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.tail <= tick {
            assert!(tokio::time::Instant::now() < deadline, "no heartbeat past {tick}: {self:?}");
            self.take(message(sub).await);
        }
    }

    /// Reads until the record with `payload` arrived.
    async fn until_record(&mut self, sub: &mut Sub, payload: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.seen.iter().any(|s| s.ends_with(&format!(" {payload}"))) {
            assert!(tokio::time::Instant::now() < deadline, "no record {payload}: {self:?}");
            self.take(message(sub).await);
        }
    }

    /// The records of `stream` in order, without the events.
    fn of(&self, stream: &str) -> Vec<String> {
        self.seen.iter().filter(|s| s.starts_with(&format!("{stream} "))).cloned().collect()
    }
}

fn server_config(dir: &std::path::Path) -> tapeline::config::Config {
    tapeline::config::Config { heartbeat: Duration::from_millis(100), ..config(dir) }
}

fn watch(start: pb::subscribe_request::Start) -> pb::SubscribeRequest {
    pb::SubscribeRequest { heartbeat_ms: 100, ..request(&["imp/**"], start) }
}

#[tokio::test]
async fn an_old_tick_goes_only_into_a_stream_being_imported() {
    let (_dir, _server, mut client) = started().await;
    let live = publish(&mut client, "imp/live", &["a"]).await[0];

    // Into a new stream: refused, naming the rule, both ticks and the way to import; nothing made.
    let old = live - 3 * SECOND;
    let status = refused(&mut client, vec![at("imp/new", old, "x")]).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
    for words in [&format!("explicit tick {old} for stream \"imp/new\""), "broker's newest tick", "import"] {
        assert!(status.message().contains(words), "{:?} lacks {words:?}", status.message());
    }
    // Into an existing stream, above its own last tick but not after another stream's.
    let other = publish(&mut client, "imp/other", &["o"]).await[0];
    let status = refused(&mut client, vec![at("imp/live", live + 1, "late")]).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains(&format!("newest tick {other}")), "{}", status.message());
    assert_eq!(
        names(&stored_streams(&mut client).await),
        [("imp/live".into(), false), ("imp/other".into(), false)]
    );

    // A stream that exists cannot become an import.
    let existing = pb::CreateStreamRequest { stream: "imp/live".into(), import: true, ..Default::default() };
    let status = client.create_stream(existing).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("\"imp/live\"") && status.message().contains("only a new stream"));

    // An import takes old ticks; it is listed as such, and no subscription sees it.
    import(&mut client, "imp/new").await;
    assert_eq!(publish_records(&mut client, vec![at("imp/new", old, "x")]).await, [old]);
    let listed = stored_streams(&mut client).await;
    assert!(listed.iter().any(|s| s.name == "imp/new" && s.importing && s.records == 1), "{listed:?}");
    let mut sub = Sub::open(&mut client, request_all()).await;
    let (events, _) = sub.until_caught_up().await;
    assert_eq!(payloads(&events), ["a", "o"], "{events:?}");

    // Sealed: created now, seen; from now on its records follow the rule of every visible stream.
    let sealed = seal(&mut client, "imp/new").await;
    assert!(!sealed.importing && sealed.created_tick > other && sealed.first_tick == old, "{sealed:?}");
    // The seal is a point every later tail covers: a client resuming after the first tail given
    // since is not given the import again.
    let mut sub = Sub::open(&mut client, request(&["imp/**"], now())).await;
    let (_, tail) = sub.until_caught_up().await;
    assert!(tail >= sealed.created_tick, "a tail {tail} below the seal at {}", sealed.created_tick);
    let mut resumed =
        Sub::open(&mut client, request(&["imp/**"], pb::subscribe_request::Start::After(tail))).await;
    let (events, _) = resumed.until_caught_up().await;
    assert!(records(&events).is_empty(), "{events:?}");
    let status = refused(&mut client, vec![at("imp/new", old + 1, "y")]).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("broker's newest tick"), "{}", status.message());
    // Sealing again (a retry) answers the same; an unknown stream is NOT_FOUND.
    assert_eq!(seal(&mut client, "imp/new").await.created_tick, sealed.created_tick);
    let status =
        client.seal_stream(pb::SealStreamRequest { stream: "imp/nothing".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

fn request_all() -> pb::SubscribeRequest {
    request(&["**"], beginning())
}

/// The case: a live subscriber was told by heartbeats that everything up to a tail past
/// the import's ticks was delivered. It sees nothing of the import until the seal, then
/// `stream_added` with the range and the import's records; `complete_to` never goes back. A replay
/// of the same interval afterwards gives the same records per stream.
#[tokio::test]
async fn a_live_subscriber_is_told_of_a_sealed_import_and_gets_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(server_config(dir.path())).await;
    let mut client = server.client().await;
    publish(&mut client, "imp/live", &["before"]).await;
    let start = Tick::now().0;
    let mut sub = Sub::open(&mut client, watch(pb::subscribe_request::Start::At(start))).await;
    let mut live = Delivered::default();
    publish(&mut client, "imp/live", &["a"]).await;

    import(&mut client, "imp/new").await;
    let base = Tick::now().0 - 3 * SECOND;
    let ticks = [base, base + SECOND, base + 2 * SECOND];
    let records = ticks.iter().enumerate().map(|(i, &t)| at("imp/new", t, &format!("i{i}"))).collect();
    assert_eq!(publish_records(&mut client, records).await, ticks);
    live.until_tail_past(&mut sub, ticks[2]).await;
    assert_eq!(live.seen, ["imp/live a"], "nothing of the import before its seal");

    publish(&mut client, "imp/live", &["b"]).await;
    seal(&mut client, "imp/new").await;
    let end = publish(&mut client, "imp/live", &["c"]).await[0];
    live.until_record(&mut sub, "c").await;
    let added = format!("added imp/new {}..{} (3)", ticks[0], ticks[2]);
    assert_eq!(
        live.seen,
        ["imp/live a", "imp/live b", &added, "imp/new i0", "imp/new i1", "imp/new i2", "imp/live c"]
    );
    assert!(
        live.complete_to.windows(2).all(|w| w[0] <= w[1]),
        "complete_to went back: {:?}",
        live.complete_to
    );

    // The same interval replayed: told first (the import lies before the start), same records.
    let mut replay = Sub::open(
        &mut client,
        pb::SubscribeRequest { end, ..watch(pb::subscribe_request::Start::At(start)) },
    )
    .await;
    let mut again = Delivered::default();
    loop {
        let message =
            tokio::time::timeout(Duration::from_secs(30), replay.stream.message()).await.unwrap().unwrap();
        match message.and_then(|m| m.event) {
            Some(event) => again.take(event),
            None => break,
        }
    }
    assert_eq!(again.seen.first(), Some(&added), "{again:?}");
    for stream in ["imp/live", "imp/new"] {
        assert_eq!(again.of(stream), live.of(stream), "{stream}");
    }
    server.stop().await;
}

/// A client that was given a tail past the import's ticks before the seal, and resumes after it
/// (here after a restart of the broker, which keeps the import hidden until sealed), is told of
/// the import and gets every record of it.
#[tokio::test]
async fn a_client_resuming_after_a_tail_it_was_given_gets_an_import_sealed_since() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(server_config(dir.path())).await;
    let mut client = server.client().await;
    publish(&mut client, "imp/live", &["a"]).await;
    import(&mut client, "imp/new").await;
    let base = Tick::now().0 - 2 * SECOND;
    let records = vec![at("imp/new", base, "i0"), at("imp/new", base + SECOND, "i1")];
    publish_records(&mut client, records).await;
    let mut sub = Sub::open(&mut client, watch(now())).await;
    let mut first = Delivered::default();
    first.until_tail_past(&mut sub, base + SECOND).await;
    let tail = first.tail;
    assert!(first.seen.is_empty(), "{first:?}");
    drop(sub);
    server.stop().await;

    let server = TestServer::start_with(server_config(dir.path())).await;
    let mut client = server.client().await;
    let listed = stored_streams(&mut client).await;
    assert!(listed.iter().any(|s| s.name == "imp/new" && s.importing), "still importing: {listed:?}");
    seal(&mut client, "imp/new").await;
    let mut resumed = Sub::open(&mut client, watch(pb::subscribe_request::Start::After(tail))).await;
    let mut after = Delivered::default();
    after.until_record(&mut resumed, "i1").await;
    assert_eq!(
        after.seen,
        [format!("added imp/new {base}..{} (2)", base + SECOND), "imp/new i0".into(), "imp/new i1".into()]
    );
    server.stop().await;
}
