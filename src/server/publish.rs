//! The `PublishStream` driver: reads a client's batches, hands them to the broker in order, and
//! answers each with its ack, in submission order.

use super::auth::Principal;
use super::incoming::peer;
use super::status::status;
use crate::broker::{Batch, Broker};
use crate::error::Error;
use crate::protocol::{pb, PUBLISH_WINDOW};
use crate::store::Appended;
use crate::types::Action;
use futures::future::BoxFuture;
use futures::stream::Stream;
use futures::stream::{FuturesOrdered, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, Streaming};
use tracing::debug;

/// A response stream of the service.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub fn ack(batch_id: u64, result: Result<Appended, Error>) -> pb::PublishAck {
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

/// The acks of one `PublishStream` call, in the order its batches were sent.
pub fn acks(
    broker: Arc<Broker>,
    who: Arc<Principal>,
    request: Request<Streaming<pb::PublishRequest>>,
) -> BoxStream<pb::PublishAck> {
    let flow = PublishFlow {
        from: peer(&request).and_then(|p| p.addr),
        who,
        requests: request.into_inner(),
        shutdown: broker.shutdown_token(),
        broker,
        in_flight: FuturesOrdered::new(),
        reading: true,
        ending: None,
    };
    Box::pin(futures::stream::unfold(Some(flow), |flow| async move {
        let mut flow = flow?;
        match flow.next_ack().await {
            Some(ack) => Some((Ok(ack), Some(flow))),
            None => flow.ending.take().map(|ending| (Err(ending), None)),
        }
    }))
}

/// A publish request as the broker takes it.
pub fn batch(req: pb::PublishRequest, from: Option<std::net::SocketAddr>) -> Batch {
    Batch {
        records: req.records.into_iter().map(Into::into).collect(),
        producer_id: req.producer_id,
        sequence: req.sequence,
        from,
    }
}

/// One `PublishStream` call. Its response stream does the work: hyper polls it in the call's own
/// task, so a batch is read, submitted and acknowledged there, without a task and a channel of
/// its own between the request and the acks (one wake-up less each way per batch).
struct PublishFlow {
    from: Option<std::net::SocketAddr>,
    /// Whose batches these are: each is refused unless it may publish to every stream of it.
    who: Arc<Principal>,
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
                        let began = std::time::Instant::now();
                        let submitted = match self.who.require_all(Action::Publish, req.records.iter().map(|r| r.stream.as_str())) {
                            Ok(()) => self.broker.submit(batch(req, self.from)).await,
                            Err(denied) => Err(denied),
                        };
                        self.in_flight.push_back(Box::pin(async move {
                            match submitted {
                                Ok(answer) => {
                                    let answer = answer.await;
                                    if answer.is_ok() {
                                        metrics::histogram!("tapeline_ack_seconds").record(began.elapsed());
                                    }
                                    (batch_id, answer)
                                }
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
