//! Graceful shutdown under load, through the real binary: SIGTERM while 4 publishers and 50
//! subscribers are active. The broker exits 0 within 5 seconds, every acknowledged record is on
//! disk exactly once, every client ends with a status it can resume from, and resuming gives
//! exactly the rest.

use crate::support::*;
use std::collections::HashMap;
use std::time::Duration;
use tapeline::protocol::pb;
use tokio::sync::watch;
use tonic::Code;

const PUBLISHERS: usize = 4;
const SUBSCRIBERS: usize = 50;

/// What one publisher had acknowledged: (stream, tick, payload).
type Acked = Vec<(String, u64, String)>;

/// Publishes numbered batches of 10 into `load/p{n}` until the broker refuses; returns what was
/// acknowledged and the status that ended it.
async fn publisher(url: String, n: usize, started: watch::Sender<usize>) -> (Acked, tonic::Status) {
    let mut client = client(&url).await;
    let stream = format!("load/p{n}");
    let mut acked = Vec::new();
    for batch in 0u64.. {
        let records: Vec<pb::Record> = (0..10).map(|i| record(&stream, format!("{n}:{batch}:{i}"))).collect();
        match client
            .publish(pb::PublishRequest { records: records.clone(), batch_id: batch, ..Default::default() })
            .await
        {
            Ok(ack) => {
                for (r, tick) in records.into_iter().zip(ack.into_inner().ticks) {
                    acked.push((r.stream, tick, String::from_utf8(r.payload.to_vec()).unwrap()));
                }
                started.send_modify(|count| *count += 1);
            }
            Err(status) => return (acked, status),
        }
    }
    unreachable!()
}

/// Follows `load/*` from the beginning until the stream ends; returns what it received and the
/// status it ended with (`None` for a clean end, which must not happen here).
async fn subscriber(url: String) -> (Vec<(String, u64, String)>, Option<tonic::Status>) {
    let mut client = client(&url).await;
    let mut sub = Sub::open(&mut client, request(&["load/*"], beginning())).await;
    let mut got = Vec::new();
    loop {
        match sub.next_result().await {
            Ok(Some(events)) => got.extend(records(&events)),
            Ok(None) => return (got, None),
            Err(status) => return (got, Some(status)),
        }
    }
}

/// A status a client can resume from: the broker's own `UNAVAILABLE` ("reconnect and resume"),
/// or the connection closing under a request that was never answered (reported by the client's
/// transport, never sent by the broker). Anything else, and a clean end, fails the test.
fn resumable(status: &tonic::Status) -> bool {
    let transport = std::error::Error::source(status)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    status.code() == Code::Unavailable
        || (transport && matches!(status.code(), Code::Cancelled | Code::Unknown))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = Serve::start(&data, &[]);
    let url = serve.url.clone();

    let subscribers: Vec<_> = (0..SUBSCRIBERS).map(|_| tokio::spawn(subscriber(url.clone()))).collect();
    let (started, mut progress) = watch::channel(0usize);
    let publishers: Vec<_> =
        (0..PUBLISHERS).map(|n| tokio::spawn(publisher(url.clone(), n, started.clone()))).collect();
    // Under load: wait until the publishers together had 200 batches acknowledged.
    tokio::time::timeout(WAIT, progress.wait_for(|&count| count >= 200)).await.unwrap().unwrap();

    let (clean, took) = tokio::task::spawn_blocking(move || serve.terminate()).await.unwrap();
    assert!(clean, "serve exits 0 on SIGTERM");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");

    // Every client ends with a status that says: reconnect and resume.
    let mut acked: Acked = Vec::new();
    for p in publishers {
        let (records, status) = tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
        assert!(resumable(&status), "publisher ended with {status:?}");
        acked.extend(records);
    }
    let mut received = Vec::new();
    for s in subscribers {
        let (records, status) = tokio::time::timeout(WAIT, s).await.unwrap().unwrap();
        let status = status.expect("a subscription never ends cleanly when the broker stops");
        assert!(resumable(&status), "subscriber ended with {status:?}");
        received.push(records);
    }

    // After a restart on the same data dir, every acknowledged record is there exactly once.
    let serve = Serve::start(&data, &[]);
    let mut client = client(&serve.url).await;
    let mut all = Sub::open(&mut client, request(&["load/*"], beginning())).await;
    let stored = records(&all.until_caught_up().await.0);
    let mut seen = HashMap::new();
    for (stream, tick, payload) in &stored {
        assert!(
            seen.insert((stream.clone(), *tick), payload.clone()).is_none(),
            "stored twice: {stream}@{tick}"
        );
    }
    for (stream, tick, payload) in &acked {
        assert_eq!(
            seen.get(&(stream.clone(), *tick)),
            Some(payload),
            "acknowledged {stream}@{tick} lost or changed"
        );
    }
    // An unacknowledged batch (in flight at SIGTERM) is all there or not there at all.
    let mut per_batch: HashMap<String, usize> = HashMap::new();
    for (_, _, payload) in &stored {
        let batch = payload.rsplit_once(':').unwrap().0.to_string();
        *per_batch.entry(batch).or_default() += 1;
    }
    assert!(per_batch.values().all(|&n| n == 10), "a batch was stored in part");

    // What each subscriber received is exactly the start of the stored log, and resuming from its
    // last positions gives exactly the rest (checked for a few of them).
    for got in &received {
        assert_eq!(got[..], stored[..got.len()], "a subscriber saw something else than the log");
    }
    for got in received.iter().step_by(10) {
        let mut last = HashMap::new();
        for (stream, tick, _) in got {
            last.insert(stream.clone(), *tick);
        }
        let mut req = request(&["load/*"], beginning());
        req.resume = last;
        let mut resumed = Sub::open(&mut client, req).await;
        let rest = records(&resumed.until_caught_up().await.0);
        let mut stitched = got.clone();
        stitched.extend(rest);
        assert_eq!(stitched, stored, "delivered + resumed is the whole log, nothing twice");
    }
}
