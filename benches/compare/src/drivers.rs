//! The same two operations on each broker, through the driver its users would pick: publish a
//! batch of records to a stream and learn when it is acknowledged; read a stream from a start,
//! replay then live.
//!
//! Stream `i` is tapeline stream `bench/i`, Redis key `bench:i` and NATS subject `bench.i` (all in
//! one JetStream stream, `BENCH`).

use crate::servers::{System, Target};
use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tapeline::protocol::pb;
use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};

/// Where a subscription starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The first record stored.
    Beginning,
    /// The next record appended.
    Now,
    /// The first record stored at or after this time.
    Time(SystemTime),
}

/// Completes when the batch it was returned for is acknowledged.
pub type Acked = BoxFuture<'static, Result<()>>;

/// Prepares a fresh server for the workloads (NATS needs its JetStream stream defined).
pub async fn prepare(server: &Target) -> Result<()> {
    if server.system == System::NatsFile {
        let js = jetstream::new(async_nats::connect(&server.url).await?);
        js.create_stream(jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the JetStream stream: {e}"))?;
    }
    Ok(())
}

/// One publishing connection.
pub enum Publisher {
    /// tapeline's own pipelining client (`PublishStream`, idempotent batches). Acks come back in
    /// order; `pending` holds who waits for each.
    Tapeline {
        batches: tapeline::client::Batches,
        pending: Arc<Mutex<VecDeque<oneshot::Sender<Result<()>>>>>,
    },
    /// One multiplexed connection: every pipeline in flight shares it.
    Redis(redis::aio::MultiplexedConnection),
    /// JetStream async publish: each message's ack is awaited separately.
    Nats(jetstream::Context),
}

impl Publisher {
    /// Opens a connection that keeps at most `window` batches of `batch` records in flight (the
    /// caller bounds Redis's pipelines itself).
    pub async fn connect(server: &Target, window: usize, batch: usize) -> Result<Publisher> {
        Ok(match server.system {
            System::TapelineAlways
            | System::TapelineInterval
            | System::TapelineTls
            | System::TapelineMetrics => {
                let mut options = tapeline::client::PublishOptions::new(&server.url);
                options.credentials = server.credentials.clone();
                options.window = window;
                let mut publisher = tapeline::client::Publisher::start(options);
                let batches = publisher.batches().context("a new publisher has a handle")?;
                // The input ends when `batches` is dropped.
                publisher.finish();
                let pending: Arc<Mutex<VecDeque<oneshot::Sender<Result<()>>>>> = Arc::default();
                let waiting = pending.clone();
                tokio::spawn(async move {
                    while let Some(ack) = publisher.ack().await {
                        let Some(tx) = waiting.lock().unwrap().pop_front() else { break };
                        let _ = tx.send(ack.map(drop).map_err(|e| anyhow!("tapeline refused a batch: {e}")));
                    }
                });
                Publisher::Tapeline { batches, pending }
            }
            System::RedisAlways
            | System::RedisEverysec
            | System::RedisBenchAlways
            | System::RedisBenchEverysec => Publisher::Redis(redis_connection(&server.url).await?),
            System::NatsFile => {
                let client = async_nats::connect(&server.url).await?;
                Publisher::Nats(
                    jetstream::ContextBuilder::new().max_ack_inflight((window * batch).max(1)).build(client),
                )
            }
        })
    }

    /// Sends `payloads` as records of stream `stream`: one batch (tapeline), one pipeline of XADDs
    /// (Redis) or one async publish each (NATS). Returns once sent; the future completes at the
    /// acknowledgement of all of them.
    pub async fn send(&mut self, stream: usize, payloads: Vec<Bytes>) -> Result<Acked> {
        match self {
            Publisher::Tapeline { batches, pending } => {
                let name = format!("bench/{stream}");
                let records = payloads
                    .into_iter()
                    .map(|payload| tapeline::client::Incoming {
                        stream: name.clone(),
                        payload,
                        ..Default::default()
                    })
                    .collect();
                let (tx, rx) = oneshot::channel();
                pending.lock().unwrap().push_back(tx);
                batches.send(records).await.map_err(|e| anyhow!("{e}"))?;
                Ok(async move { rx.await.map_err(|_| anyhow!("the tapeline publisher stopped"))? }.boxed())
            }
            Publisher::Redis(connection) => {
                let key = format!("bench:{stream}");
                let mut pipe = redis::pipe();
                for payload in &payloads {
                    pipe.cmd("XADD").arg(&key).arg("*").arg("d").arg(payload.as_ref()).ignore();
                }
                let mut connection = connection.clone();
                Ok(async move { pipe.query_async::<()>(&mut connection).await.context("XADD") }.boxed())
            }
            Publisher::Nats(js) => {
                let subject = format!("bench.{stream}");
                let mut acks = Vec::with_capacity(payloads.len());
                for payload in payloads {
                    acks.push(
                        js.publish(subject.clone(), payload).await.map_err(|e| anyhow!("publish: {e}"))?,
                    );
                }
                Ok(async move {
                    for ack in acks {
                        ack.await.map_err(|e| anyhow!("JetStream ack: {e}"))?;
                    }
                    Ok(())
                }
                .boxed())
            }
        }
    }
}

async fn redis_connection(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    // No response timeout: under `appendfsync always` a deep pipeline can wait longer than the
    // driver's default half second, and that is what is being measured.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(redis::Client::open(url)?.get_multiplexed_async_connection_with_config(&config).await?)
}

/// Reads stream `stream` from `start`, replay then live, on a connection of its own, and calls
/// `on` with each record's payload until it returns false or `deadline` passes. `ready` is told
/// once the subscription is in place (records appended after that will be delivered).
pub async fn subscribe(
    server: &Target,
    stream: usize,
    start: Start,
    ready: oneshot::Sender<()>,
    deadline: Instant,
    mut on: impl FnMut(&[u8]) -> bool + Send,
) -> Result<()> {
    match server.system {
        System::TapelineAlways | System::TapelineInterval | System::TapelineTls | System::TapelineMetrics => {
            use pb::subscribe_request::Start as S;
            let mut client = tapeline::client::connect_with(&server.url, &server.credentials)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let start = match start {
                Start::Beginning => S::Beginning(pb::Beginning {}),
                Start::Now => S::Now(pb::Now {}),
                Start::Time(t) => S::At(nanos(t)),
            };
            let request = pb::SubscribeRequest {
                streams: vec![format!("bench/{stream}")],
                start: Some(start),
                ..Default::default()
            };
            let mut responses = client.subscribe(request).await?.into_inner();
            let _ = ready.send(());
            while let Ok(message) = timeout_at(deadline, responses.message()).await {
                let Some(message) = message? else { return Ok(()) };
                if let Some(pb::subscribe_response::Event::Records(batch)) = message.event {
                    for record in &batch.records {
                        if !on(&record.payload) {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        }
        System::RedisAlways
        | System::RedisEverysec
        | System::RedisBenchAlways
        | System::RedisBenchEverysec => {
            let key = format!("bench:{stream}");
            let mut connection = redis_connection(&server.url).await?;
            // XREAD returns entries after an id: the id to start after.
            let mut last = match start {
                Start::Beginning => "0-0".to_string(),
                Start::Now => {
                    let newest: redis::Value = redis::cmd("XREVRANGE")
                        .arg(&key)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut connection)
                        .await?;
                    let mut id = "0-0".to_string();
                    each_entry(&newest, |entry_id, _| {
                        id = entry_id.to_string();
                        true
                    })?;
                    id
                }
                Start::Time(t) => format!("{}-{}", nanos(t) / 1_000_000 - 1, u64::MAX),
            };
            let _ = ready.send(());
            while Instant::now() < deadline {
                let reply: redis::Value = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(10_000)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(&mut connection)
                    .await
                    .context("XREAD")?;
                let redis::Value::Array(streams) = reply else { continue };
                for entries in streams {
                    let redis::Value::Array(parts) = entries else { bail!("XREAD: unexpected reply shape") };
                    let Some(entries) = parts.get(1) else { bail!("XREAD: a stream without entries") };
                    let mut go_on = true;
                    each_entry(entries, |id, payload| {
                        last.clear();
                        last.push_str(id);
                        go_on = on(payload);
                        go_on
                    })?;
                    if !go_on {
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        System::NatsFile => {
            use jetstream::consumer::DeliverPolicy;
            let js = jetstream::new(async_nats::connect(&server.url).await?);
            let bench = js.get_stream("BENCH").await.map_err(|e| anyhow!("{e}"))?;
            let deliver_policy = match start {
                Start::Beginning => DeliverPolicy::All,
                Start::Now => DeliverPolicy::New,
                Start::Time(t) => DeliverPolicy::ByStartTime {
                    start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos(t)))?,
                },
            };
            let consumer = bench
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: format!("bench.{stream}"),
                    deliver_policy,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("ordered consumer: {e}"))?;
            let mut messages = consumer.messages().await.map_err(|e| anyhow!("{e}"))?;
            let _ = ready.send(());
            while let Ok(message) = timeout_at(deadline, messages.next()).await {
                let Some(message) = message else { return Ok(()) };
                let message = message.map_err(|e| anyhow!("ordered consumer: {e}"))?;
                if !on(&message.payload) {
                    return Ok(());
                }
            }
            Ok(())
        }
    }
}

/// Calls `on(id, payload)` for each entry of an XRANGE/XREAD entry list (`[[id, [field, value]]]`)
/// until it returns false.
fn each_entry(entries: &redis::Value, mut on: impl FnMut(&str, &[u8]) -> bool) -> Result<()> {
    let redis::Value::Array(entries) = entries else { return Ok(()) };
    for entry in entries {
        let redis::Value::Array(entry) = entry else { bail!("an entry is not an array") };
        let [redis::Value::BulkString(id), redis::Value::Array(fields)] = entry.as_slice() else {
            bail!("an entry is not [id, fields]")
        };
        let Some(redis::Value::BulkString(payload)) = fields.get(1) else {
            bail!("an entry without a value")
        };
        if !on(std::str::from_utf8(id)?, payload) {
            break;
        }
    }
    Ok(())
}

/// Nanoseconds since the Unix epoch.
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How long a subscriber waits for the rest after the publisher stopped.
pub const DRAIN: Duration = Duration::from_secs(10);
