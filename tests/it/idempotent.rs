//! Idempotent publishing: a retried batch (same producer id and sequence) is acknowledged again
//! with the same ticks and appended once, on `Publish` and `PublishStream`, across restarts; a
//! reused or stale sequence gets a status naming the rule.

use crate::support::*;
use futures::StreamExt;
use tapeline::protocol::pb;
use tonic::Code;

fn tagged(producer: &str, sequence: u64, records: Vec<pb::Record>) -> pb::PublishRequest {
    pb::PublishRequest { records, batch_id: sequence, producer_id: producer.into(), sequence }
}

/// Every record of `stream` from the beginning up to the current tail.
async fn stored(client: &mut tapeline::client::Client, stream: &str) -> Vec<String> {
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
    let acks = |client: &mut tapeline::client::Client, batches: Vec<pb::PublishRequest>| {
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
async fn producer_state_the_index_lost_is_rebuilt_from_the_log() {
    // A batch's tag is in the same commit record as its records: an index that lost the
    // producers' state (here: deleted whole, with the broker stopped) gets it back from the log,
    // so the retries a producer sends after a crash are still answered, not appended.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    let first_batch = tagged("solo", 1, vec![record("s", "a")]);
    let first = client.publish(first_batch.clone()).await.unwrap().into_inner();
    let second_batch = tagged("solo", 2, vec![record("s", "b"), record("t", "c")]);
    let second = client.publish(second_batch.clone()).await.unwrap().into_inner();
    server.stop().await;
    std::fs::remove_dir_all(dir.path().join(tapeline::store::layout::INDEX_DIR)).unwrap();

    let server = TestServer::start(dir.path()).await;
    let mut client = server.client().await;
    for (batch, ack) in [(second_batch, &second), (first_batch, &first)] {
        let again = client.publish(batch).await.unwrap().into_inner();
        assert!(again.duplicate && again.ticks == ack.ticks, "{again:?}");
    }
    let next = client.publish(tagged("solo", 3, vec![record("s", "d")])).await.unwrap().into_inner();
    assert!(!next.duplicate);
    assert_eq!(stored(&mut client, "s").await, ["a", "b", "d"]);
}

/// Under `fsync = interval` a crash can lose the log's newest records while the index, made
/// durable on its own schedule, already applied them. The index then claims records the log does
/// not hold: it is rebuilt from the log, and the producers' memory with it, so the lost batch's
/// retry is appended again rather than acknowledged as stored.
#[tokio::test]
async fn a_batch_a_crash_lost_under_interval_is_forgotten_and_its_retry_appended() {
    let dir = tempfile::tempdir().unwrap();
    let config = tapeline::config::Config {
        fsync: tapeline::config::FsyncPolicy::Interval(std::time::Duration::from_millis(50)),
        ..config(dir.path())
    };
    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    let first = client.publish(tagged("p", 1, vec![record("s", "a")])).await.unwrap().into_inner();
    let file = tapeline::store::layout::chunk_file(dir.path(), 0);
    let before = std::fs::metadata(&file).unwrap().len();
    let second_batch = tagged("p", 2, vec![record("s", "b"), record("s", "c")]);
    client.publish(second_batch.clone()).await.unwrap();
    server.stop().await;
    // As the crash would leave it: the second batch's record never reached the disk.
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(before).unwrap();

    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    assert_eq!(stored(&mut client, "s").await, ["a"]);
    let again = client.publish(second_batch).await.unwrap().into_inner();
    assert!(!again.duplicate, "the lost batch is appended again: {again:?}");
    let older = client.publish(tagged("p", 1, vec![record("s", "a")])).await.unwrap().into_inner();
    assert!(older.duplicate && older.ticks == first.ticks, "{older:?}");
    assert_eq!(stored(&mut client, "s").await, ["a", "b", "c"]);
}
