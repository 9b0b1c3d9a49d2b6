//! The tapeline service: translates protobuf to domain types and back, and `Error` to `Status`, in
//! one place. No rule lives here.

use super::auth::{principal, Auth};
use super::connections::{Call, Connections};
use super::incoming::peer;
use super::publish::{self, ack, batch, BoxStream};
use super::status::status;
use crate::broker::registry::Client;
use crate::broker::subscription::{Event, SlowConsumer, Start};
use crate::broker::{Broker, SubscribeRequest};
use crate::config::Limits;
use crate::error::Error;
use crate::protocol::{codec, pb, serve, wire};
use crate::types::{Action, Pattern, StreamMeta};
use futures::stream::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

/// The `tapeline.v1.Tapeline` service, ready to be added to a tonic server. Every call is counted
/// on its connection (refused on one accepted over `max_connections`) and authenticated.
pub fn service(
    broker: Arc<Broker>,
    limits: &Limits,
    connections: Arc<Connections>,
    auth: Arc<Auth>,
) -> InterceptedService<
    serve::tapeline_server::TapelineServer<Service>,
    impl tonic::service::Interceptor + Clone,
> {
    codec::admit(limits.max_batch_records, limits.max_message_bytes());
    let server = serve::tapeline_server::TapelineServer::new(Service { broker })
        .max_decoding_message_size(limits.max_message_bytes())
        .max_encoding_message_size(usize::MAX);
    InterceptedService::new(server, move |mut request: Request<()>| {
        let peer = peer(&request).cloned();
        // Counted until the call's request is dropped, or, for a streaming call, its responses.
        if let Some(peer) = &peer {
            let call = connections.call(&peer.connection).map_err(|e| status(&e))?;
            request.extensions_mut().insert(Arc::new(call));
        }
        let principal = auth.authenticate(request.metadata(), peer.as_ref()).map_err(|e| status(&e))?;
        request.extensions_mut().insert(principal);
        Ok(request)
    })
}

/// The call count of a request (see [`Connections::call`]), to keep while its responses go out.
fn counted<T>(request: &Request<T>) -> Option<Arc<Call>> {
    request.extensions().get::<Arc<Call>>().cloned()
}

/// Implements the generated service trait on top of the broker.
pub struct Service {
    broker: Arc<Broker>,
}

fn event(e: Event) -> wire::SubscribeResponse {
    use pb::subscribe_response::Event as E;
    let event = match e {
        Event::Records { records, complete_to } => {
            metrics::counter!("tapeline_records_out_total").increment(records.len() as u64);
            let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
            metrics::counter!("tapeline_bytes_out_total").increment(bytes as u64);
            return wire::SubscribeResponse::Records(wire::RecordBatch::new(records, complete_to.0));
        }
        Event::CaughtUp(tick) => E::CaughtUp(pb::CaughtUp { tick: tick.0 }),
        Event::Heartbeat { tail, server_time, upstreams } => E::Heartbeat(pb::Heartbeat {
            tail_tick: tail.0,
            server_time: server_time.0,
            upstreams: upstreams.into_iter().map(Into::into).collect(),
        }),
        Event::StreamAdded(info) => {
            E::StreamAdded(pb::StreamAdded { stream: Some(pb::StreamInfo::new(info, None, None)) })
        }
        Event::Upstream(u) => E::UpstreamStatus(u.into()),
        Event::Truncated { stream, requested, through, earliest } => E::Truncated(pb::Truncated {
            stream: stream.to_string(),
            requested: requested.0,
            earliest_available: earliest.map_or(0, |t| t.0),
            through: through.0,
        }),
        Event::StreamChanged { info, deleted } => E::StreamChanged(pb::StreamChanged {
            stream: Some(pb::StreamInfo::new(info, None, None)),
            deleted,
        }),
        Event::Gap { stream, records, from, to } => {
            E::Gap(pb::Gap { stream: stream.to_string(), records, from_tick: from.0, to_tick: to.0 })
        }
    };
    wire::SubscribeResponse::Other(Box::new(pb::SubscribeResponse { event: Some(event) }))
}

#[tonic::async_trait]
impl serve::tapeline_server::Tapeline for Service {
    async fn hello(&self, request: Request<pb::HelloRequest>) -> Result<Response<pb::HelloResponse>, Status> {
        let who = principal(&request);
        let addr = peer(&request).and_then(|p| p.addr);
        let req = request.into_inner();
        // The client's declared name, version and id, bound to who it proved to be.
        info!(principal = %who.name, client = %req.client_name, version = %req.client_version, id = %req.client_id, peer = ?addr, "hello");
        let info =
            self.broker.hello(req.protocol_version, &req.client_version).await.map_err(|e| status(&e))?;
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
            principal: who.name.clone(),
        }))
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishAck>, Status> {
        let from = peer(&request).and_then(|p| p.addr);
        let who = principal(&request);
        let req = request.into_inner();
        who.require_all(Action::Publish, req.records.iter().map(|r| r.stream.as_str()))
            .map_err(|e| status(&e))?;
        let batch_id = req.batch_id;
        let began = std::time::Instant::now();
        let appended = self.broker.publish(batch(req, from)).await.map_err(|e| status(&e))?;
        metrics::histogram!("tapeline_ack_seconds").record(began.elapsed());
        Ok(Response::new(ack(batch_id, Ok(appended))))
    }

    type PublishStreamStream = BoxStream<pb::PublishAck>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let call = counted(&request);
        let who = principal(&request);
        let acks = publish::acks(self.broker.clone(), who, request);
        // The closure owns the call's count: it ends with the stream of acks.
        Ok(Response::new(Box::pin(acks.inspect(move |_| {
            let _counted = &call;
        }))))
    }

    type SubscribeStream = BoxStream<wire::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        use pb::subscribe_request::Start as S;
        let call = counted(&request);
        let who = principal(&request);
        let peer = peer(&request).and_then(|p| p.addr).map(|a| a.to_string()).unwrap_or_default();
        let req = request.into_inner();
        // A stream named exactly must be readable; a pattern silently selects only what is.
        who.require_all(
            Action::Subscribe,
            req.streams
                .iter()
                .filter(|s| Pattern::parse(s).is_ok_and(|p| p.exact().is_some()))
                .map(String::as_str),
        )
        .map_err(|e| status(&e))?;
        let start = match req.start {
            None | Some(S::Beginning(_)) => Start::Beginning,
            Some(S::Now(_)) => Start::Now,
            Some(S::At(t)) => Start::At(crate::types::Tick(t)),
            Some(S::After(t)) => Start::After(crate::types::Tick(t)),
        };
        let events = self
            .broker
            .subscribe(SubscribeRequest {
                streams: req.streams,
                start,
                resume: req.resume.into_iter().collect(),
                end: (req.end != 0).then_some(req.end),
                heartbeat: (req.heartbeat_ms > 0).then(|| Duration::from_millis(req.heartbeat_ms.into())),
                pace: req.pace,
                max_bytes_per_second: (req.max_bytes_per_second > 0).then_some(req.max_bytes_per_second),
                rate_window: (req.rate_window_ms > 0)
                    .then(|| Duration::from_millis(req.rate_window_ms.into())),
                slow: match pb::SlowConsumer::try_from(req.slow_consumer) {
                    Ok(pb::SlowConsumer::Unspecified | pb::SlowConsumer::CatchUp) => SlowConsumer::CatchUp,
                    Ok(pb::SlowConsumer::Latest) => SlowConsumer::Latest,
                    Ok(pb::SlowConsumer::Disconnect) => SlowConsumer::Disconnect,
                    Err(_) => {
                        return Err(status(&Error::InvalidArgument(format!(
                            "slow_consumer {} is not one of SLOW_CONSUMER_UNSPECIFIED (0, catch up), SLOW_CONSUMER_LATEST (1), SLOW_CONSUMER_DISCONNECT (2), SLOW_CONSUMER_CATCH_UP (3)",
                            req.slow_consumer
                        ))))
                    }
                },
                max_lag: (req.max_lag_ms > 0).then(|| Duration::from_millis(req.max_lag_ms.into())),
                readable: who.readable(),
                client: Client { peer, principal: who.name.to_string() },
            })
            .map_err(|e| status(&e))?;
        let stream = events.map(move |e| {
            let _counted = &call;
            e.map(event).map_err(|e| status(&e))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_streams(
        &self,
        request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        let who = principal(&request);
        let req = request.into_inner();
        let pattern = (!req.pattern.is_empty()).then_some(req.pattern.as_str());
        let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let visible = |name: &str| who.may(Action::Subscribe, name) || who.may(Action::Admin, name);
        let (streams, next) = self
            .broker
            .streams_page(pattern, after, req.page_size as usize, visible)
            .map_err(|e| status(&e))?;
        let streams = streams
            .into_iter()
            .map(|info| {
                let upstream = self.broker.upstream_of(&info.name);
                let effective = self.broker.retention_of(&info);
                pb::StreamInfo::new(info, upstream, Some(effective))
            })
            .collect();
        Ok(Response::new(pb::ListStreamsResponse { streams, next_page_token: next.unwrap_or_default() }))
    }

    async fn describe_stream(
        &self,
        request: Request<pb::DescribeStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let who = principal(&request);
        let stream = request.into_inner().stream;
        if !who.may(Action::Admin, &stream) {
            who.require(Action::Subscribe, &stream).map_err(|e| status(&e))?;
        }
        let info = self.broker.stream(&stream).map_err(|e| status(&e))?;
        let upstream = self.broker.upstream_of(&info.name);
        let effective = self.broker.retention_of(&info);
        Ok(Response::new(pb::StreamInfo::new(info, upstream, Some(effective))))
    }

    async fn create_stream(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let who = principal(&request);
        let req = request.into_inner();
        who.require(Action::Admin, &req.stream).map_err(|e| status(&e))?;
        let meta = StreamMeta {
            content_type: req.content_type,
            schema_version: req.schema_version,
            description: req.description,
            retention: req.retention.unwrap_or_default().into(),
            importing: req.import,
        };
        let info = self.broker.create_stream(&req.stream, meta, req.update).await.map_err(|e| status(&e))?;
        let effective = self.broker.retention_of(&info);
        Ok(Response::new(pb::StreamInfo::new(info, None, Some(effective))))
    }

    async fn seal_stream(
        &self,
        request: Request<pb::SealStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let who = principal(&request);
        let stream = request.into_inner().stream;
        who.require(Action::Admin, &stream).map_err(|e| status(&e))?;
        let info = self.broker.seal_stream(&stream).await.map_err(|e| status(&e))?;
        let effective = self.broker.retention_of(&info);
        Ok(Response::new(pb::StreamInfo::new(info, None, Some(effective))))
    }

    async fn delete_stream(
        &self,
        request: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let who = principal(&request);
        let stream = request.into_inner().stream;
        who.require(Action::Admin, &stream).map_err(|e| status(&e))?;
        let info = self.broker.delete_stream(&stream).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::StreamInfo::new(info, None, None)))
    }
}
