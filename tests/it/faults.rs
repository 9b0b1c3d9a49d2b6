//! Network faults: every client talks to the broker through a proxy that cuts each connection
//! after a random lifetime and delays or stalls its traffic at random. Idempotent publishers
//! retry until every batch is acknowledged (one on `Publish`, one pipelining on
//! `PublishStream`); subscribers resume from their positions after every failure. In the end the
//! log holds exactly the published batches, each once, and every subscriber saw exactly the log.

use crate::support::*;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tapeline::protocol::pb;

const BATCHES: u64 = 150;
const SUBSCRIBERS: usize = 3;

fn faults() -> Faults {
    Faults {
        // Shorter than the paced PublishStream (150 batches, 4 ms apart): it is always cut.
        lifetime: (Duration::from_millis(150), Duration::from_millis(600)),
        delay_chance: 0.2,
        delay: (Duration::from_millis(1), Duration::from_millis(20)),
        stall_chance: 0.02,
        stall: (Duration::from_millis(100), Duration::from_millis(700)),
    }
}

/// What the publishers had acknowledged: (stream, tick) → payload.
type Acked = Arc<Mutex<BTreeMap<(String, u64), String>>>;

fn batch(producer: &str, sequence: u64) -> pb::PublishRequest {
    let records = (0..1 + sequence % 5)
        .map(|i| record(&format!("net/{}", (sequence + i) % 3), format!("{producer}:{sequence}:{i}")))
        .collect();
    pb::PublishRequest { records, batch_id: sequence, producer_id: producer.into(), sequence }
}

fn note(acked: &Acked, request: &pb::PublishRequest, ack: &pb::PublishAck) {
    assert!(ack.error.is_none(), "{ack:?}");
    let mut acked = acked.lock().unwrap();
    for (r, tick) in request.records.iter().zip(&ack.ticks) {
        let payload = String::from_utf8(r.payload.to_vec()).unwrap();
        if let Some(before) = acked.insert((r.stream.clone(), *tick), payload.clone()) {
            assert_eq!(before, payload, "a retry was acknowledged with another batch's tick");
        }
    }
}

async fn connect(url: &str) -> Option<tapeline::client::Client> {
    tapeline::client::connect(url).await.ok()
}

/// Sends every batch with `Publish`, retrying each until it is acknowledged.
async fn unary_publisher(url: String, acked: Acked) -> u64 {
    let mut retries = 0;
    let mut client = None;
    for sequence in 1..=BATCHES {
        let request = batch("unary", sequence);
        loop {
            if client.is_none() {
                client = connect(&url).await;
            }
            let Some(c) = client.as_mut() else { continue };
            match c.publish(request.clone()).await {
                Ok(ack) => {
                    note(&acked, &request, &ack.into_inner());
                    break;
                }
                Err(_) => {
                    retries += 1;
                    client = None;
                }
            }
        }
    }
    retries
}

/// Pipelines every batch on `PublishStream`; after a failure, sends again every batch not yet
/// acknowledged, on a new stream.
async fn streaming_publisher(url: String, acked: Acked) -> u64 {
    let mut unacked: VecDeque<pb::PublishRequest> = (1..=BATCHES).map(|s| batch("piped", s)).collect();
    let mut retries = 0;
    while !unacked.is_empty() {
        let Some(mut client) = connect(&url).await else { continue };
        let sent: Vec<pb::PublishRequest> = unacked.iter().cloned().collect();
        // Paced, so that connections are cut with batches in flight.
        let paced = futures::stream::iter(sent).then(|b| async {
            tokio::time::sleep(Duration::from_millis(4)).await;
            b
        });
        let Ok(response) = client.publish_stream(paced).await else {
            retries += 1;
            continue;
        };
        let mut acks = response.into_inner();
        while let Some(Ok(ack)) = acks.next().await {
            let request = unacked.pop_front().expect("an ack per batch");
            assert_eq!(ack.batch_id, request.batch_id, "acks come in order");
            note(&acked, &request, &ack);
        }
        if !unacked.is_empty() {
            retries += 1;
        }
    }
    retries
}

/// Follows `net/**`, resuming from its positions after every failure, until it has `total`
/// records (once known); returns them per stream, in order, and its reconnections.
async fn subscriber(url: String, total: Arc<AtomicUsize>) -> (BTreeMap<String, Vec<(u64, String)>>, u64) {
    let mut got: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let mut positions: HashMap<String, u64> = HashMap::new();
    let mut reconnects = 0;
    loop {
        let count: usize = got.values().map(Vec::len).sum();
        if count == total.load(Ordering::SeqCst) {
            return (got, reconnects);
        }
        let Some(mut client) = connect(&url).await else { continue };
        let request = pb::SubscribeRequest { resume: positions.clone(), ..request(&["net/**"], beginning()) };
        let Ok(response) = client.subscribe(request).await else { continue };
        let mut events = response.into_inner();
        loop {
            let message = tokio::time::timeout(Duration::from_millis(500), events.message()).await;
            let Ok(Ok(Some(message))) = message else { break };
            if let Some(pb::subscribe_response::Event::Records(batch)) = message.event {
                for r in batch.records {
                    let last = positions.insert(r.stream.clone(), r.tick);
                    assert!(
                        last.is_none_or(|last| last < r.tick),
                        "{} tick {} after {last:?}",
                        r.stream,
                        r.tick
                    );
                    got.entry(r.stream)
                        .or_default()
                        .push((r.tick, String::from_utf8(r.payload.to_vec()).unwrap()));
                }
            }
            if got.values().map(Vec::len).sum::<usize>() == total.load(Ordering::SeqCst) {
                return (got, reconnects);
            }
        }
        reconnects += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_publishers_and_resuming_subscribers_end_with_exactly_the_published_sequence() {
    let (_dir, server, _) = started().await;
    let proxy = Proxy::faulty(server.addr, faults()).await;
    let acked: Acked = Arc::default();
    let total = Arc::new(AtomicUsize::new(usize::MAX));
    let subscribers: Vec<_> =
        (0..SUBSCRIBERS).map(|_| tokio::spawn(subscriber(proxy.url(), total.clone()))).collect();
    let unary = tokio::spawn(unary_publisher(proxy.url(), acked.clone()));
    let piped = tokio::spawn(streaming_publisher(proxy.url(), acked.clone()));
    let (unary, piped) = tokio::time::timeout(WAIT, async { (unary.await.unwrap(), piped.await.unwrap()) })
        .await
        .expect("the publishers finish despite the faults");

    // Exactly the published batches, each once: every payload of every batch, no other.
    let acked = acked.lock().unwrap().clone();
    let mut published: Vec<String> = Vec::new();
    for producer in ["unary", "piped"] {
        for s in 1..=BATCHES {
            published.extend(
                batch(producer, s).records.iter().map(|r| String::from_utf8(r.payload.to_vec()).unwrap()),
            );
        }
    }
    let mut stored_payloads: Vec<String> = acked.values().cloned().collect();
    stored_payloads.sort();
    published.sort();
    assert_eq!(stored_payloads, published, "each batch acknowledged once, with one set of ticks");

    // The log, read directly, is exactly what was acknowledged.
    let mut direct = client(&server.url()).await;
    let tail = *acked.keys().map(|(_, t)| t).max().unwrap();
    let mut sub =
        Sub::open(&mut direct, pb::SubscribeRequest { end: tail, ..request(&["net/**"], beginning()) }).await;
    let log: BTreeMap<(String, u64), String> =
        records(&sub.until_end().await).into_iter().map(|(s, t, p)| ((s, t), p)).collect();
    assert_eq!(log, acked);

    total.store(log.len(), Ordering::SeqCst);
    let mut reconnects = Vec::new();
    for subscriber in subscribers {
        let (got, n) = tokio::time::timeout(WAIT, subscriber).await.expect("subscribers catch up").unwrap();
        reconnects.push(n);
        let flat: BTreeMap<(String, u64), String> =
            got.into_iter().flat_map(|(s, v)| v.into_iter().map(move |(t, p)| ((s.clone(), t), p))).collect();
        assert_eq!(flat, log, "a resuming subscriber saw exactly the log");
    }
    eprintln!(
        "{} records; publisher retries: unary {unary}, piped {piped}; subscriber reconnections {reconnects:?}",
        log.len()
    );
    assert!(unary > 0 && piped > 0 && reconnects.iter().all(|&n| n > 0), "the faults happened");
}
