//! The gRPC layer: translates protobuf to domain types and back, and `Error` to `Status`, in one
//! place. No rule lives here; the generated code stays in `pb`, which clients (the CLI, tests,
//! other programs) use as the wire API.

use crate::broker::{Batch, Broker, Incoming, SubscribeRequest};
use crate::codec;
use crate::config::Limits;
use crate::connections::Connections;
use crate::error::Error;
use crate::record::{StreamInfo, StreamMeta};
use crate::relay::UpstreamStatus;
use crate::retention::Policy;
use crate::store::Appended;
use crate::subscription::{Event, SlowConsumer, Start};
use crate::wire;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::debug;

/// The generated protocol types, client and server.
pub mod pb {
    tonic::include_proto!("tapeline.v1");

    /// The encoded descriptors of the protocol, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tapeline_descriptor");
}

/// The generated server: the messages of [`pb`], except that it sends
/// [`crate::wire::SubscribeResponse`] (see `build.rs`).
pub mod serve {
    include!(concat!(env!("OUT_DIR"), "/server/tapeline.v1.rs"));
}

/// Batches of one `PublishStream` that may wait for their ack at once; past this the server stops
/// reading the client's stream, and HTTP/2 flow control slows the client.
const PUBLISH_WINDOW: usize = 64;

/// The one mapping from a domain error to a gRPC status.
pub fn status(err: &Error) -> Status {
    let code = match err {
        Error::InvalidName { .. }
        | Error::InvalidPattern { .. }
        | Error::InvalidArgument(_)
        | Error::EndBeforeStart { .. } => Code::InvalidArgument,
        Error::RecordTooLarge { .. }
        | Error::HeadersTooLarge { .. }
        | Error::BatchTooLarge { .. }
        | Error::BatchTooHeavy { .. }
        | Error::SlowConsumer { .. }
        | Error::TooMany { .. }
        | Error::DiskFull { .. }
        | Error::NoRoom { .. } => Code::ResourceExhausted,
        Error::TickNotAfter { .. }
        | Error::TickAhead { .. }
        | Error::UnsupportedProtocol { .. }
        | Error::SequenceNotAfter { .. }
        | Error::Mirrored { .. } => Code::FailedPrecondition,
        Error::SequenceReused { .. } | Error::StreamExists { .. } => Code::AlreadyExists,
        Error::UnknownStream(_) => Code::NotFound,
        Error::DataLoss { .. } | Error::DamagedPointer { .. } => Code::DataLoss,
        Error::ShuttingDown | Error::LogFailed { .. } => Code::Unavailable,
        Error::Storage(_)
        | Error::Open { .. }
        | Error::Io { .. }
        | Error::Config { .. }
        | Error::ConfigFile { .. }
        | Error::Remote { .. }
        | Error::Internal(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

/// The `tapeline.v1.Tapeline` service, ready to be added to a tonic server. Every call on a
/// connection accepted over `max_connections` is refused.
pub fn service(
    broker: Arc<Broker>,
    limits: &Limits,
    connections: Arc<Connections>,
) -> InterceptedService<
    serve::tapeline_server::TapelineServer<Service>,
    impl tonic::service::Interceptor + Clone,
> {
    codec::admit(limits);
    let server = serve::tapeline_server::TapelineServer::new(Service { broker })
        .max_decoding_message_size(limits.max_message_bytes())
        .max_encoding_message_size(usize::MAX);
    InterceptedService::new(server, move |request: Request<()>| {
        connections.check(request.remote_addr()).map_err(|e| status(&e))?;
        Ok(request)
    })
}

/// Implements the generated service trait on top of the broker.
pub struct Service {
    broker: Arc<Broker>,
}

fn batch(req: pb::PublishRequest, from: Option<std::net::SocketAddr>) -> Batch {
    Batch { records: incoming(req.records), producer_id: req.producer_id, sequence: req.sequence, from }
}

/// Records of the wire as the broker takes them.
pub fn incoming(records: Vec<pb::Record>) -> Vec<Incoming> {
    records
        .into_iter()
        .map(|r| Incoming {
            stream: r.stream,
            tick: r.tick,
            origin_time: r.origin_time,
            headers: r.headers.into_iter().collect(),
            payload: r.payload,
            crc32: r.crc32,
        })
        .collect()
}

fn retention(p: &Policy) -> pb::Retention {
    pb::Retention {
        max_age_ms: p.max_age.map_or(0, |a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
        max_bytes: p.max_bytes.unwrap_or(0),
        max_records: p.max_records.unwrap_or(0),
    }
}

fn policy(r: Option<pb::Retention>) -> Policy {
    let r = r.unwrap_or_default();
    Policy {
        max_age: (r.max_age_ms > 0).then(|| Duration::from_millis(r.max_age_ms)),
        max_bytes: (r.max_bytes > 0).then_some(r.max_bytes),
        max_records: (r.max_records > 0).then_some(r.max_records),
    }
}

/// A stream as the API shows it; `effective` is the retention that applies, when known.
fn stream_info(s: StreamInfo, upstream: Option<UpstreamStatus>, effective: Option<Policy>) -> pb::StreamInfo {
    let (records_per_second, bytes_per_second) = s.recent.at(crate::record::Tick::now());
    pb::StreamInfo {
        content_type: s.meta.content_type.clone(),
        schema_version: s.meta.schema_version.clone(),
        description: s.meta.description.clone(),
        retention: Some(retention(&s.meta.retention)),
        effective_retention: effective.as_ref().map(retention),
        records_per_second,
        bytes_per_second,
        name: s.name.to_string(),
        records: s.records,
        bytes: s.bytes,
        first_tick: s.first_tick.map_or(0, |t| t.0),
        last_tick: s.last_tick.map_or(0, |t| t.0),
        created_tick: s.created_tick.0,
        upstream: upstream.as_ref().map(|u| u.upstream.clone()).unwrap_or_default(),
        upstream_status: upstream.map(upstream_status),
    }
}

fn upstream_status(u: UpstreamStatus) -> pb::UpstreamStatus {
    pb::UpstreamStatus {
        upstream: u.upstream,
        connected: u.connected,
        lag: u64::try_from(u.lag.as_nanos()).unwrap_or(u64::MAX),
        detail: u.detail,
    }
}

fn event(e: Event) -> wire::SubscribeResponse {
    use pb::subscribe_response::Event as E;
    let event = match e {
        Event::Records { records, complete_to } => {
            return wire::SubscribeResponse::Records(wire::RecordBatch::new(records, complete_to.0))
        }
        Event::CaughtUp(tick) => E::CaughtUp(pb::CaughtUp { tick: tick.0 }),
        Event::Heartbeat { tail, server_time, upstreams } => E::Heartbeat(pb::Heartbeat {
            tail_tick: tail.0,
            server_time: server_time.0,
            upstreams: upstreams.into_iter().map(upstream_status).collect(),
        }),
        Event::StreamAdded(info) => {
            E::StreamAdded(pb::StreamAdded { stream: Some(stream_info(info, None, None)) })
        }
        Event::Upstream(u) => E::UpstreamStatus(upstream_status(u)),
        Event::Truncated { stream, requested, through, earliest } => E::Truncated(pb::Truncated {
            stream: stream.to_string(),
            requested: requested.0,
            earliest_available: earliest.map_or(0, |t| t.0),
            through: through.0,
        }),
        Event::StreamChanged { info, deleted } => {
            E::StreamChanged(pb::StreamChanged { stream: Some(stream_info(info, None, None)), deleted })
        }
        Event::Gap { stream, records, from, to } => {
            E::Gap(pb::Gap { stream: stream.to_string(), records, from_tick: from.0, to_tick: to.0 })
        }
    };
    wire::SubscribeResponse::Other(Box::new(pb::SubscribeResponse { event: Some(event) }))
}

fn ack(batch_id: u64, result: Result<Appended, Error>) -> pb::PublishAck {
    match result {
        Ok(a) => pb::PublishAck {
            batch_id,
            ticks: a.ticks.into_iter().map(|t| t.0).collect(),
            error: None,
            duplicate: a.duplicate,
        },
        Err(err) => {
            let status = status(&err);
            let error = pb::BatchError { code: status.code() as i32, message: status.message().to_string() };
            pb::PublishAck { batch_id, ticks: Vec::new(), error: Some(error), duplicate: false }
        }
    }
}

/// One `PublishStream` call. Its response stream does the work: hyper polls it in the call's own
/// task, so a batch is read, submitted and acknowledged there, without a task and a channel of
/// its own between the request and the acks (one wake-up less each way per batch).
struct PublishFlow {
    from: Option<std::net::SocketAddr>,
    requests: Streaming<pb::PublishRequest>,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    /// Batches submitted and not yet answered, oldest first: acks go out in submission order.
    in_flight: FuturesOrdered<BoxFuture<'static, (u64, Result<Appended, Error>)>>,
    reading: bool,
    /// How the stream ends once every batch handed in is answered: OK when the client closed its
    /// side, its own error when the request stream broke, UNAVAILABLE when the broker stopped
    /// reading because it is shutting down.
    ending: Option<Status>,
}

impl PublishFlow {
    /// Reads and submits batches until the oldest one is answered; returns its ack, or `None`
    /// once the client's side is over and every batch is answered.
    ///
    /// Reading stops while the response is not polled (the client does not take its acks) or
    /// `PUBLISH_WINDOW` batches wait: the client is then slowed by HTTP/2 flow control.
    async fn next_ack(&mut self) -> Option<pb::PublishAck> {
        loop {
            if !self.reading && self.in_flight.is_empty() {
                return None;
            }
            tokio::select! {
                biased;
                Some((batch_id, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    return Some(ack(batch_id, result));
                }
                _ = self.shutdown.cancelled(), if self.reading => {
                    self.reading = false;
                    self.ending = Some(status(&Error::ShuttingDown));
                }
                next = self.requests.message(), if self.reading && self.in_flight.len() < PUBLISH_WINDOW => match next {
                    Ok(Some(req)) => {
                        // Submitted in order, so batches of one stream commit in order.
                        let batch_id = req.batch_id;
                        let submitted = self.broker.submit(batch(req, self.from)).await;
                        self.in_flight.push_back(Box::pin(async move {
                            match submitted {
                                Ok(answer) => (batch_id, answer.await),
                                Err(err) => (batch_id, Err(err)),
                            }
                        }));
                    }
                    Ok(None) => self.reading = false,
                    Err(broken) => {
                        debug!(status = %broken, "publish stream broken by the client");
                        self.reading = false;
                        self.ending = Some(broken);
                    }
                },
            }
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl serve::tapeline_server::Tapeline for Service {
    async fn hello(&self, request: Request<pb::HelloRequest>) -> Result<Response<pb::HelloResponse>, Status> {
        let req = request.into_inner();
        debug!(client = %req.client_name, version = %req.client_version, id = %req.client_id, "hello");
        let info = self.broker.hello(req.protocol_version, &req.client_version).map_err(|e| status(&e))?;
        Ok(Response::new(pb::HelloResponse {
            server_id: info.server_id,
            server_version: info.server_version.to_string(),
            protocol_versions: info.protocol_versions,
            protocol_version: info.protocol_version,
            tail_tick: info.tail_tick.0,
            notice: info.notice.map(|n| pb::Notice {
                recommended_version: n.recommended_version,
                text: n.text,
                url: n.url,
            }),
        }))
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishAck>, Status> {
        let from = request.remote_addr();
        let req = request.into_inner();
        let batch_id = req.batch_id;
        let appended = self.broker.publish(batch(req, from)).await.map_err(|e| status(&e))?;
        Ok(Response::new(ack(batch_id, Ok(appended))))
    }

    type PublishStreamStream = BoxStream<pb::PublishAck>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let flow = PublishFlow {
            from: request.remote_addr(),
            requests: request.into_inner(),
            shutdown: self.broker.shutdown_token(),
            broker: self.broker.clone(),
            in_flight: FuturesOrdered::new(),
            reading: true,
            ending: None,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(Some(flow), |flow| async move {
            let mut flow = flow?;
            match flow.next_ack().await {
                Some(ack) => Some((Ok(ack), Some(flow))),
                None => flow.ending.take().map(|ending| (Err(ending), None)),
            }
        }))))
    }

    type SubscribeStream = BoxStream<wire::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        use pb::subscribe_request::Start as S;
        let req = request.into_inner();
        let start = match req.start {
            None | Some(S::Beginning(_)) => Start::Beginning,
            Some(S::Now(_)) => Start::Now,
            Some(S::At(t)) => Start::At(crate::record::Tick(t)),
            Some(S::After(t)) => Start::After(crate::record::Tick(t)),
        };
        let events = self
            .broker
            .subscribe(SubscribeRequest {
                streams: req.streams,
                start,
                resume: req.resume.into_iter().collect(),
                end: req.end,
                heartbeat: (req.heartbeat_ms > 0).then(|| Duration::from_millis(req.heartbeat_ms.into())),
                pace: req.pace,
                max_bytes_per_second: (req.max_bytes_per_second > 0).then_some(req.max_bytes_per_second),
                rate_window: (req.rate_window_ms > 0)
                    .then(|| Duration::from_millis(req.rate_window_ms.into())),
                slow: match pb::SlowConsumer::try_from(req.slow_consumer) {
                    Ok(pb::SlowConsumer::CatchUp) => SlowConsumer::CatchUp,
                    Ok(pb::SlowConsumer::Latest) => SlowConsumer::Latest,
                    Ok(pb::SlowConsumer::Disconnect) => SlowConsumer::Disconnect,
                    Err(_) => {
                        return Err(status(&Error::InvalidArgument(format!(
                            "slow_consumer {} is not one of CATCH_UP (0), LATEST (1), DISCONNECT (2)",
                            req.slow_consumer
                        ))))
                    }
                },
                max_lag: (req.max_lag_ms > 0).then(|| Duration::from_millis(req.max_lag_ms.into())),
            })
            .map_err(|e| status(&e))?;
        let stream = events.map(|e| e.map(event).map_err(|e| status(&e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_streams(
        &self,
        request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        let req = request.into_inner();
        let pattern = (!req.pattern.is_empty()).then_some(req.pattern.as_str());
        let streams = self.broker.streams(pattern).map_err(|e| status(&e))?;
        let streams = streams
            .into_iter()
            .map(|info| {
                let upstream = self.broker.upstream_of(&info.name);
                let effective = self.broker.retention_of(&info);
                stream_info(info, upstream, Some(effective))
            })
            .collect();
        Ok(Response::new(pb::ListStreamsResponse { streams }))
    }

    async fn describe_stream(
        &self,
        request: Request<pb::DescribeStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let info = self.broker.stream(&request.into_inner().stream).map_err(|e| status(&e))?;
        let upstream = self.broker.upstream_of(&info.name);
        let effective = self.broker.retention_of(&info);
        Ok(Response::new(stream_info(info, upstream, Some(effective))))
    }

    async fn create_stream(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let req = request.into_inner();
        let meta = StreamMeta {
            content_type: req.content_type,
            schema_version: req.schema_version,
            description: req.description,
            retention: policy(req.retention),
        };
        let info = self.broker.create_stream(&req.stream, meta, req.update).await.map_err(|e| status(&e))?;
        let effective = self.broker.retention_of(&info);
        Ok(Response::new(stream_info(info, None, Some(effective))))
    }

    async fn delete_stream(
        &self,
        request: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let info = self.broker.delete_stream(&request.into_inner().stream).await.map_err(|e| status(&e))?;
        Ok(Response::new(stream_info(info, None, None)))
    }
}
