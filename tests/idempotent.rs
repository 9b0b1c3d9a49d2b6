//! Idempotent publishing: a retried batch (same producer id and sequence) is acknowledged again
//! with the same ticks and appended once, on `Publish` and `PublishStream`, across restarts; a
//! reused or stale sequence gets a status naming the rule.

mod common;

use common::*;
use futures::StreamExt;
use tapeline::grpc::pb;
use tapeline::grpc::pb::tapeline_client::TapelineClient;
use tonic::Code;

fn tagged(producer: &str, sequence: u64, records: Vec<pb::Record>) -> pb::PublishRequest {
    pb::PublishRequest { records, batch_id: sequence, producer_id: producer.into(), sequence }
}

/// Every record of `stream` from the beginning up to the current tail.
async fn stored(client: &mut TapelineClient<tonic::transport::Channel>, stream: &str) -> Vec<String> {
    let mut sub = Sub::open(client, request(&[stream], beginning())).await;
    payloads(&sub.until_caught_up().await.0)
}

#[tokio::test]
async fn a_retried_batch_is_acknowledged_again_and_appended_once() {
    let (_dir, _server, mut client) = started().await;
    let batch = tagged("sensor-1", 1, vec![record("s", "a"), record("s", "b")]);
    let first = client.publish(batch.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let again = client.publish(batch.clone()).await.unwrap().into_inner();
    assert_eq!(again.ticks, first.ticks, "same ticks as the first time");
    assert!(again.duplicate);
    // A later batch is new; a retry of the first is still recognised after it.
    let second = client.publish(tagged("sensor-1", 2, vec![record("s", "c")])).await.unwrap().into_inner();
    assert!(!second.duplicate && second.ticks[0] > first.ticks[1]);
    assert_eq!(client.publish(batch).await.unwrap().into_inner().ticks, first.ticks);
    // Another producer's sequence 1 is its own.
    let other = client.publish(tagged("sensor-2", 1, vec![record("s", "a")])).await.unwrap().into_inner();
    assert!(!other.duplicate);
    assert_eq!(stored(&mut client, "s").await, ["a", "b", "c", "a"]);
}

#[tokio::test]
async fn reused_stale_and_half_tagged_sequences_are_refused() {
    let (_dir, _server, mut client) = started().await;
    for s in [1, 2, 5] {
        client.publish(tagged("p", s, vec![record("s", format!("{s}"))])).await.unwrap();
    }
    let reused = client.publish(tagged("p", 2, vec![record("s", "other")])).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert!(reused
        .message()
        .contains("sequence 2 of producer \"p\" was already appended with different content"));
    // 3 was never appended (a gap): it is not after 5, so it would reorder the producer's batches.
    let stale = client.publish(tagged("p", 3, vec![record("s", "3")])).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale
        .message()
        .contains("sequence 3 of producer \"p\" is not after its last appended sequence 5"));
    let half = pb::PublishRequest { records: vec![record("s", "x")], sequence: 9, ..Default::default() };
    let half = client.publish(half).await.unwrap_err();
    assert_eq!(half.code(), Code::InvalidArgument);
    assert!(half.message().contains("sequence 9 but no producer id"), "{half:?}");
    let zero = client.publish(tagged("p", 0, vec![record("s", "x")])).await.unwrap_err();
    assert_eq!(zero.code(), Code::InvalidArgument);
    assert!(zero.message().contains("sequences of an idempotent producer start at 1"), "{zero:?}");
    let long = client.publish(tagged(&"p".repeat(200), 1, vec![record("s", "x")])).await.unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    assert!(long.message().contains("must be 1 to 128 bytes"), "{long:?}");
    assert_eq!(stored(&mut client, "s").await, ["1", "2", "5"], "nothing refused was stored");
}

#[tokio::test]
async fn a_whole_pipelined_window_resent_is_answered_from_memory_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let batches: Vec<pb::PublishRequest> = (1..=100u64)
        .map(|s| tagged("pipe", s, vec![record("p", format!("{s}")), record("q", "x")]))
        .collect();
    let acks = |client: &mut TapelineClient<tonic::transport::Channel>, batches: Vec<pb::PublishRequest>| {
        let mut client = client.clone();
        async move {
            let acks = client.publish_stream(tokio_stream::iter(batches)).await.unwrap().into_inner();
            acks.map(|a| a.unwrap()).collect::<Vec<pb::PublishAck>>().await
        }
    };
    let first = acks(&mut client, batches.clone()).await;
    assert!(first.iter().all(|a| a.error.is_none() && !a.duplicate));
    server.stop().await;

    // The producer state is stored with the records: a restarted broker still knows the last
    // 128 batches.
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let mut resent = batches[..].to_vec();
    resent.push(tagged("pipe", 101, vec![record("p", "101")]));
    let again = acks(&mut client, resent).await;
    for (a, b) in first.iter().zip(&again) {
        assert_eq!((a.batch_id, &a.ticks), (b.batch_id, &b.ticks));
        assert!(b.duplicate && b.error.is_none(), "{b:?}");
    }
    assert!(!again[100].duplicate && again[100].error.is_none());
    let expected: Vec<String> = (1..=101).map(|s| s.to_string()).collect();
    assert_eq!(stored(&mut client, "p").await, expected);
}

#[tokio::test]
async fn producer_state_lost_after_a_single_chunk_commit_is_caught_up_from_the_log() {
    // A commit of one chunk stores the chunk, then the producer's state: a crash between the two
    // leaves the stored state one batch behind. Recovery reads the batch's tag back from the
    // chunk, so the retry the producer sends after the crash is still answered, not appended.
    let dir = tempfile::tempdir().unwrap();
    let state_key = [&[0xff_u8; 4][..], b"solo"].concat();
    let stored_state = || {
        let db = tapeline::storage::engine_config(dir.path()).open().unwrap();
        let value = db.open_tree("records").unwrap().get(&state_key).unwrap().unwrap();
        value.to_vec()
    };
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let first = client.publish(tagged("solo", 1, vec![record("s", "a")])).await.unwrap().into_inner();
    server.stop().await;
    let after_first = stored_state();

    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let second_batch = tagged("solo", 2, vec![record("s", "b"), record("s", "c")]);
    let second = client.publish(second_batch.clone()).await.unwrap().into_inner();
    server.stop().await;
    // The crash: the second batch's chunk is stored, its producer state is not.
    assert_ne!(stored_state(), after_first);
    {
        let db = tapeline::storage::engine_config(dir.path()).open().unwrap();
        db.open_tree("records").unwrap().insert(&state_key, after_first.clone()).unwrap();
        db.flush().unwrap();
    }

    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let again = client.publish(second_batch).await.unwrap().into_inner();
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.ticks, second.ticks);
    let older = client.publish(tagged("solo", 1, vec![record("s", "a")])).await.unwrap().into_inner();
    assert!(older.duplicate && older.ticks == first.ticks, "{older:?}");
    assert_eq!(stored(&mut client, "s").await, ["a", "b", "c"]);
    // The caught-up state was stored at once: later chunks of the stream will not carry the tag.
    server.stop().await;
    assert_ne!(stored_state(), after_first);

    // A producer whose state was never stored: its first batch, which also created its stream.
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let fresh = tagged("fresh", 1, vec![record("t", "x")]);
    let first_fresh = client.publish(fresh.clone()).await.unwrap().into_inner();
    server.stop().await;
    {
        let db = tapeline::storage::engine_config(dir.path()).open().unwrap();
        let records = db.open_tree("records").unwrap();
        assert!(records.remove([&[0xff_u8; 4][..], b"fresh"].concat()).unwrap().is_some());
        db.flush().unwrap();
    }
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let again = client.publish(fresh).await.unwrap().into_inner();
    assert!(again.duplicate && again.ticks == first_fresh.ticks, "{again:?}");
    assert_eq!(stored(&mut client, "t").await, ["x"]);
}

#[tokio::test]
async fn a_damaged_trailer_loses_only_the_memory_of_its_batches() {
    // The tags ride after the records, under their own CRC: damage there leaves every record
    // served and the stream's counts whole; only a retry of those batches is no longer known.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    client.publish(tagged("solo", 1, vec![record("s", "a"), record("s", "b")])).await.unwrap();
    server.stop().await;
    {
        let db = tapeline::storage::engine_config(dir.path()).flush_every_ms(None).open().unwrap();
        let (_, pointer) = db.open_tree("records").unwrap().iter().next().unwrap().unwrap();
        let at = tapeline::chunk_files::Location::decode(&pointer).expect("a pointer into a chunk file");
        let path = tapeline::chunk_files::path_in(dir.path(), at.file);
        let mut bytes = std::fs::read(&path).unwrap();
        let chunk = &mut bytes[at.offset as usize..(at.offset + u64::from(at.len)) as usize];
        assert_eq!(chunk[4], 3, "a chunk with a trailer");
        *chunk.last_mut().unwrap() ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    }
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    assert_eq!(stored(&mut client, "s").await, ["a", "b"]);
    let info = client.list_streams(pb::ListStreamsRequest::default()).await.unwrap().into_inner();
    assert_eq!(info.streams.iter().find(|s| s.name == "s").map(|s| s.records), Some(2));
    let next = client.publish(tagged("solo", 2, vec![record("s", "c")])).await.unwrap().into_inner();
    assert!(!next.duplicate);
    assert_eq!(stored(&mut client, "s").await, ["a", "b", "c"]);
}

/// A crash under `fsync=interval` can leave sled holding pointers to chunk bytes the disk never
/// received. Recovery drops those chunks (only past the last sync it noted) and forgets the
/// batches they held, so that their retries are appended again rather than acknowledged as stored.
#[tokio::test]
async fn chunks_a_crash_left_unwritten_are_dropped_and_their_batches_forgotten() {
    use tapeline::chunk_files::{path_in, Location, Position};
    let dir = tempfile::tempdir().unwrap();
    let config = tapeline::config::Config {
        fsync: tapeline::config::FsyncPolicy::Interval(std::time::Duration::from_millis(50)),
        ..config(dir.path())
    };
    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    let first = client.publish(tagged("p", 1, vec![record("s", "a")])).await.unwrap().into_inner();
    let second_batch = tagged("p", 2, vec![record("s", "b"), record("s", "c")]);
    client.publish(second_batch.clone()).await.unwrap();
    server.stop().await;
    {
        // As the crash would leave it: the second chunk's bytes never reached the disk, the last
        // sync noted covers the first chunk only, and the acknowledged-tick mark (written at a
        // clean stop, or after fsyncs) is older.
        let db = tapeline::storage::engine_config(dir.path()).flush_every_ms(None).open().unwrap();
        let pointers: Vec<Location> = db
            .open_tree("records")
            .unwrap()
            .range(..[0xff_u8, 0xff, 0xff, 0xfe])
            .map(|entry| Location::decode(&entry.unwrap().1).expect("a pointer"))
            .collect();
        assert_eq!(pointers.len(), 2, "one chunk per commit");
        let (kept, lost) = (pointers[0], pointers[1]);
        let file = std::fs::OpenOptions::new().write(true).open(path_in(dir.path(), lost.file)).unwrap();
        file.set_len(lost.offset).unwrap();
        let synced = Position { file: kept.file, len: kept.offset + u64::from(kept.len) };
        db.open_tree("meta").unwrap().insert(tapeline::storage::SYNCED_KEY, &synced.encode()).unwrap();
        db.flush().unwrap();
        std::fs::remove_file(dir.path().join(tapeline::guard::MARK_FILE)).unwrap();
    }
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    assert_eq!(stored(&mut client, "s").await, ["a"]);
    let again = client.publish(second_batch).await.unwrap().into_inner();
    assert!(!again.duplicate, "the lost batch is appended again: {again:?}");
    let older = client.publish(tagged("p", 1, vec![record("s", "a")])).await.unwrap().into_inner();
    assert!(older.duplicate && older.ticks == first.ticks, "{older:?}");
    assert_eq!(stored(&mut client, "s").await, ["a", "b", "c"]);
}
