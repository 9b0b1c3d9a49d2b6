//! The [`Publisher`]: pipelined batches over one `PublishStream`, sent again after a failure under
//! the same producer id and sequence, so the broker appends each once.

use super::{connect_with, remote, transient, Backoff, Credentials, Error, Incoming, Result};
use crate::protocol::pb;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tracing::warn;

/// What a [`Publisher`] is asked for.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The server that stores the streams (an origin; a relay refuses mirrored streams).
    pub endpoint: String,
    /// Identifies this producer to the broker across reconnections. Reuse it across restarts of the
    /// producer only together with sequence numbers that keep increasing (the default start does).
    pub producer_id: String,
    /// Sequence numbers are above this one, and at least the wall clock in microseconds, so that
    /// they keep increasing across restarts of a producer that keeps its id.
    pub first_sequence: u64,
    /// Number batches `first_sequence + 1, + 2, …` without the wall clock: the same input, cut
    /// into the same batches, gets the same sequences when it is published again, and the broker
    /// appends none of it twice (while it remembers them: a producer's last 128 batches).
    pub counted_sequences: bool,
    /// Batches sent and not yet acknowledged, at most; at most 128, the batches the broker
    /// remembers of a producer (a larger window could resend a batch it no longer recognises).
    pub window: usize,
    /// A connection with batches in flight and no ack for this long counts as failed.
    pub ack_timeout: Duration,
    pub backoff: Backoff,
    /// TLS trust, client certificate and token.
    pub credentials: Credentials,
}

impl PublishOptions {
    /// Options for `endpoint` with a fresh random producer id whose sequence starts at the current
    /// time in microseconds, so it keeps increasing even if the id is reused after a restart.
    pub fn new(endpoint: impl Into<String>) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        PublishOptions {
            endpoint: endpoint.into(),
            producer_id: format!("tapeline-{:016x}", rand::random::<u64>()),
            first_sequence: u64::try_from(now.as_micros()).unwrap_or(1).max(1),
            counted_sequences: false,
            window: 64,
            ack_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            credentials: Credentials::default(),
        }
    }
}

/// The broker's answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The batch's sequence number (also its `batch_id`).
    pub sequence: u64,
    /// The tick of each record, in the order they were sent.
    pub ticks: Vec<u64>,
    /// The batch had been appended before (its first ack was lost); these are its ticks from then.
    pub duplicate: bool,
}

/// A pipelining, retrying publisher: see the module documentation. Batches go in through
/// [`Publisher::send`] (or a [`Batches`] handle); their acks come out of [`Publisher::ack`] in the
/// same order. Read the acks while sending (from another task when the sending may block): the
/// publisher stops taking batches while acks wait unread.
pub struct Publisher {
    batches: Option<Batches>,
    acks: mpsc::Receiver<Result<Ack>>,
}

/// A handle that sends batches into a [`Publisher`]; the input ends when the publisher was
/// finished and every handle dropped.
#[derive(Debug, Clone)]
pub struct Batches(mpsc::Sender<Vec<Incoming>>);

impl Batches {
    /// Queues a batch; waits while the window is full. Fails only if the publisher has stopped.
    pub async fn send(&self, records: Vec<Incoming>) -> Result<()> {
        self.0.send(records).await.map_err(|_| Error::Remote {
            action: "publish",
            detail: "the publisher has stopped".into(),
            code: None,
        })
    }
}

impl Publisher {
    /// Starts the publisher's task (it connects at once and reconnects as needed).
    pub fn start(mut options: PublishOptions) -> Publisher {
        options.window = options.window.clamp(1, crate::protocol::PRODUCER_WINDOW);
        let window = options.window;
        let (batches, input) = mpsc::channel(window);
        let (acks_tx, acks) = mpsc::channel(window);
        tokio::spawn(
            Pipeline { options, input: Some(input), acks: acks_tx, in_flight: VecDeque::new() }.run(),
        );
        Publisher { batches: Some(Batches(batches)), acks }
    }

    /// Queues a batch; waits while the window is full. Fails only if the publisher has stopped
    /// or was finished.
    pub async fn send(&self, records: Vec<Incoming>) -> Result<()> {
        match &self.batches {
            Some(batches) => batches.send(records).await,
            None => Err(Error::Remote {
                action: "publish",
                detail: "the publisher was finished".into(),
                code: None,
            }),
        }
    }

    /// A handle to send batches from another task.
    pub fn batches(&self) -> Option<Batches> {
        self.batches.clone()
    }

    /// No more batches: the acks end after the last one's.
    pub fn finish(&mut self) {
        self.batches = None;
    }

    /// The next ack, in sending order; `Err` for a batch the broker refused (the others go on);
    /// `None` once every batch was answered after [`Publisher::finish`].
    pub async fn ack(&mut self) -> Option<Result<Ack>> {
        self.acks.recv().await
    }
}

/// The task behind a [`Publisher`].
struct Pipeline {
    options: PublishOptions,
    /// `None` once the application finished.
    input: Option<mpsc::Receiver<Vec<Incoming>>>,
    acks: mpsc::Sender<Result<Ack>>,
    /// Sent and not yet acknowledged, in order.
    in_flight: VecDeque<pb::PublishRequest>,
}

impl Pipeline {
    async fn run(mut self) {
        let mut sequence = self.options.first_sequence;
        let mut failures = 0u32;
        loop {
            match self.connection(&mut sequence, &mut failures).await {
                Ok(()) => return,
                // On the stream itself (a batch's own refusal comes in its ack), too large a
                // message is not going to pass on a retry.
                Err(status) if transient(status.code()) && status.code() != Code::ResourceExhausted => {
                    failures += 1;
                    let wait = self.options.backoff.delay(failures);
                    warn!(endpoint = %self.options.endpoint, cause = %status.message(), in_flight = self.in_flight.len(), ?wait, "publishing interrupted; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(status) => {
                    // The stream itself was refused: every batch in flight fails with it.
                    for batch in self.in_flight.drain(..) {
                        let _ = self.acks.send(Err(refused(batch.sequence, &status))).await;
                    }
                    let _ = self.acks.send(Err(remote("publish", &status))).await;
                    return;
                }
            }
        }
    }

    /// One `PublishStream`: sends the batches in flight again, then new ones, until every batch
    /// was answered after the input ended (`Ok`) or the connection failed.
    async fn connection(
        &mut self,
        sequence: &mut u64,
        failures: &mut u32,
    ) -> std::result::Result<(), Status> {
        if self.input.is_none() && self.in_flight.is_empty() {
            return Ok(());
        }
        let mut client = connect_with(&self.options.endpoint, &self.options.credentials)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(self.options.window.max(1) + 1);
        for batch in &self.in_flight {
            let _ = tx.try_send(batch.clone());
        }
        let mut tx = if self.input.is_some() { Some(tx) } else { None };
        let mut acks = client.publish_stream(ReceiverStream::new(rx)).await?.into_inner();
        loop {
            let room = self.in_flight.len() < self.options.window.max(1);
            tokio::select! {
                ack = tokio::time::timeout(self.options.ack_timeout, acks.message()), if !self.in_flight.is_empty() || tx.is_none() => {
                    let ack = match ack {
                        Ok(ack) => ack?,
                        Err(_) => return Err(Status::unavailable(format!("no ack for {:?}", self.options.ack_timeout))),
                    };
                    let Some(ack) = ack else {
                        return if self.in_flight.is_empty() && self.input.is_none() {
                            Ok(())
                        } else {
                            Err(Status::unavailable("the server ended the publish stream"))
                        };
                    };
                    *failures = 0;
                    if self.in_flight.front().is_none_or(|b| b.batch_id != ack.batch_id) {
                        return Err(Status::internal(format!("ack for batch {} out of order", ack.batch_id)));
                    }
                    let Some(batch) = self.in_flight.pop_front() else { continue };
                    let answer = match ack.error {
                        Some(err) => Err(refused(batch.sequence, &Status::new(Code::from(err.code), err.message))),
                        None => Ok(Ack { sequence: batch.sequence, ticks: ack.ticks, duplicate: ack.duplicate }),
                    };
                    if self.acks.send(answer).await.is_err() {
                        return Ok(());
                    }
                }
                batch = recv(&mut self.input), if room && tx.is_some() => {
                    let Some(records) = batch else {
                        // No more input: ending the stream lets the server answer what is left.
                        self.input = None;
                        tx = None;
                        continue;
                    };
                    *sequence += 1;
                    if !self.options.counted_sequences {
                        *sequence = (*sequence).max(micros_now());
                    }
                    let request = pb::PublishRequest {
                        records: records.into_iter().map(Into::into).collect(),
                        batch_id: *sequence,
                        producer_id: self.options.producer_id.clone(),
                        sequence: *sequence,
                    };
                    self.in_flight.push_back(request.clone());
                    if let Some(tx) = &tx {
                        if tx.send(request).await.is_err() {
                            return Err(Status::unavailable("the publish stream closed"));
                        }
                    }
                }
            }
        }
    }
}

/// The next batch, or `None` when the input ended (or was already gone).
async fn recv(input: &mut Option<mpsc::Receiver<Vec<Incoming>>>) -> Option<Vec<Incoming>> {
    match input {
        Some(input) => input.recv().await,
        None => None,
    }
}

fn micros_now() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_micros()).unwrap_or(0)
}

fn refused(sequence: u64, status: &Status) -> Error {
    Error::Remote {
        action: "publish",
        detail: format!("batch {sequence} refused: {:?}: {}", status.code(), status.message()),
        code: Some(status.code()),
    }
}
