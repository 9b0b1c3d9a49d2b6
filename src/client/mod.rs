//! The client library, which depends only on the protocol and types layers: a [`Subscriber`] that never loses its place, and a [`Publisher`] that never
//! appends a batch twice. The CLI's `tail` and `publish` and the relay are built on them.
//!
//! A subscriber keeps, per stream, the last tick it delivered, plus the highest tick up to which
//! it has seen everything (as the server says it: a batch's `complete_to`, `CaughtUp`, heartbeats).
//! After any failure it reconnects, to the next of its endpoints, with exponential backoff and
//! jitter, and resumes with `resume` = those positions and `after` = that tick for streams it has
//! not seen yet. Ticks are assigned by the origin and kept by every relay, so the positions are
//! valid at any endpoint that serves the same origin: switching endpoints gives no gap and no
//! duplicate.
//!
//! A publisher pipelines batches over one `PublishStream` with a bounded window. Every batch carries
//! the producer id and a sequence number; after a failure it reconnects and sends the unacknowledged
//! batches again, in order, and the broker acknowledges those it had already appended with the
//! ticks it gave them the first time.

mod error;
mod publisher;
mod subscriber;

pub use crate::types::{Incoming, Record};
pub use error::{Error, Result};
pub use publisher::{Ack, Batches, PublishOptions, Publisher};
pub use subscriber::{Delivery, SubscribeOptions, Subscriber};

use crate::protocol::{pb, CONNECTION_WINDOW, FRAME_SIZE, MAX_MESSAGE, STREAM_WINDOW};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// A client of one server.
pub type Client = pb::tapeline_client::TapelineClient<Channel>;

/// Silence after which the client pings the server, and how long it waits for the answer.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Connects to a server and returns a client that accepts large batches.
pub async fn connect(server: &str) -> Result<Client> {
    let refused = |detail: String| Error::Remote {
        action: "connect",
        detail: format!("cannot reach {server}: {detail}"),
    };
    let endpoint = Endpoint::from_shared(server.to_string()).map_err(|e| refused(chain(&e)))?;
    let channel = endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .connect_timeout(Duration::from_secs(5))
        // A server that vanished without closing (a cut link) is found by pings, also while no
        // call is open: the call fails and a subscriber resumes elsewhere or later.
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| refused(chain(&e)))?;
    Ok(Client::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
}

/// An error and its sources, on one line: transport errors hide the useful part in the chain.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A gRPC status as an error of `action`.
pub fn remote(action: &'static str, status: &Status) -> Error {
    Error::Remote { action, detail: format!("{:?}: {}", status.code(), status.message()) }
}

/// Whether a status may go away by itself (retry later or elsewhere) rather than name a mistake
/// in the request that a retry would repeat.
pub(crate) fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// Exponential backoff with jitter between reconnection attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The wait after the first failure.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

impl Backoff {
    /// The wait after `failures` consecutive failures (from 1): doubling from `initial` up to `max`,
    /// then a random point in its upper half, so clients cut at once do not return at once.
    pub fn delay(&self, failures: u32) -> Duration {
        let doubled = self.initial.saturating_mul(1 << failures.saturating_sub(1).min(20));
        let ceiling = doubled.min(self.max);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rand::random::<f64>())
    }
}
