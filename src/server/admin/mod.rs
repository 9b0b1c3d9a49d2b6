//! The admin listener (`--admin-listen`): Prometheus metrics at `/metrics`, `/healthz` and
//! `/readyz`, and a status page for people at `/`. Plain HTTP/1, on loopback unless the operator
//! says `--insecure`; it only reads the broker's state.

mod metrics;
mod page;

use super::connections::Connections;
use crate::broker::Broker;
use crate::error::{Error, Result};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use metrics::install as install_recorder;

/// What the admin listener shows: the broker, and what the server knows of itself.
pub struct Admin {
    broker: Arc<Broker>,
    connections: Arc<Connections>,
    started: Instant,
    /// The gRPC address and how it is protected, for the page's header.
    listen: SocketAddr,
    tls: bool,
    authenticated: bool,
    /// The disk budget (`max_disk_bytes`), when there is one.
    disk_budget: Option<u64>,
}

impl Admin {
    pub fn new(
        broker: Arc<Broker>,
        connections: Arc<Connections>,
        listen: SocketAddr,
        tls: bool,
        authenticated: bool,
        disk_budget: Option<u64>,
    ) -> Admin {
        Admin { broker, connections, started: Instant::now(), listen, tls, authenticated, disk_budget }
    }

    /// Why the broker is not ready to serve, if it is not: its log takes no writes, or a relay
    /// link is down.
    fn unready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(cause) = self.broker.log().failure() {
            reasons.push(format!("the log takes no writes: {cause}"));
        }
        for status in self.broker.link_statuses() {
            if !status.connected {
                reasons.push(format!("relay link to {} is down: {}", status.upstream, status.detail));
            }
        }
        reasons
    }
}

/// Serves the admin listener on `listener` until `token` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, token: CancellationToken) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Io { context: "reading the admin address".into(), source })?;
    let app = axum::Router::new()
        .route("/", get(status_page))
        .route("/status", get(status_fragment))
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(admin);
    info!(%addr, "admin listener: /metrics, /healthz, /readyz, status page at /");
    let served = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned()).await;
    if let Err(err) = &served {
        warn!(%err, "the admin listener failed");
    }
    served.map_err(|source| Error::Io { context: "serving the admin listener".into(), source })
}

type State = axum::extract::State<Arc<Admin>>;

async fn status_page(axum::extract::State(admin): State) -> Html<String> {
    Html(page::page(&admin))
}

async fn status_fragment(axum::extract::State(admin): State) -> Html<String> {
    Html(page::fragment(&admin))
}

async fn scrape(axum::extract::State(admin): State) -> Response {
    let text = metrics::render(&admin);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn ready(axum::extract::State(admin): State) -> Response {
    let reasons = admin.unready();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))).into_response()
    }
}
