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
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

/// A client of one server.
pub type Client = pb::tapeline_client::TapelineClient<InterceptedService<Channel, Bearer>>;

/// How a client proves who it is and whom it trusts: for `https://` URLs the CA that signs the
/// server's certificate (the system's roots when none is given) and a client certificate for
/// mutual TLS; for any URL a bearer token.
#[derive(Clone, Default)]
pub struct Credentials {
    /// PEM certificates of the CAs trusted to sign the server's certificate.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and private key presented to the server (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// A token from `tapeline token create`, sent as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    // Never prints the token or the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl Credentials {
    /// Reads the files a command line names: a CA, a certificate and its key, and a token.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
        token: Option<String>,
    ) -> Result<Credentials> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::Remote {
                action: "read credentials",
                detail: format!("cannot read {}: {e}", path.display()),
                code: None,
            })
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(Error::Remote {
                    action: "read credentials",
                    detail: "a client certificate needs its key: give both --cert and --key".into(),
                    code: None,
                })
            }
        };
        Ok(Credentials { ca: ca.map(read).transpose()?, identity, token })
    }
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<Arc<MetadataValue<Ascii>>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", MetadataValue::clone(value));
        }
        Ok(request)
    }
}

/// Silence after which the client pings the server, and how long it waits for the answer.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Connects to a server without credentials and returns a client that accepts large batches.
pub async fn connect(server: &str) -> Result<Client> {
    connect_with(server, &Credentials::default()).await
}

/// Connects to a server with `credentials` and returns a client that accepts large batches.
pub async fn connect_with(server: &str, credentials: &Credentials) -> Result<Client> {
    let refused = |detail: String| Error::Remote {
        action: "connect",
        detail: format!("cannot reach {server}: {detail}"),
        code: None,
    };
    let mut endpoint = Endpoint::from_shared(server.to_string()).map_err(|e| refused(chain(&e)))?;
    if server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &credentials.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &credentials.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| refused(chain(&e)))?;
    } else if credentials.ca.is_some() || credentials.identity.is_some() {
        return Err(refused(
            "a CA or client certificate was given for a plaintext http:// URL; use https://".into(),
        ));
    }
    let bearer = match &credentials.token {
        Some(token) => {
            let value =
                format!("Bearer {token}").parse::<MetadataValue<Ascii>>().map_err(|_| Error::Remote {
                    action: "read credentials",
                    detail: "the token has characters a header cannot carry (tokens are printable ASCII)"
                        .into(),
                    code: None,
                })?;
            Bearer(Some(Arc::new(value)))
        }
        None => Bearer(None),
    };
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
    Ok(pb::tapeline_client::TapelineClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Every stream `ListStreams` shows (matching `pattern`, when not empty), page by page.
pub async fn list_streams(client: &mut Client, pattern: &str) -> Result<Vec<pb::StreamInfo>> {
    let mut streams = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListStreamsRequest { pattern: pattern.to_string(), page_size: 0, page_token };
        let page = client.list_streams(request).await.map_err(|s| remote("list streams", &s))?.into_inner();
        streams.extend(page.streams);
        if page.next_page_token.is_empty() {
            return Ok(streams);
        }
        page_token = page.next_page_token;
    }
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
    Error::Remote {
        action,
        detail: format!("{:?}: {}", status.code(), status.message()),
        code: Some(status.code()),
    }
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
