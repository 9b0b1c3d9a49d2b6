//! Wires the broker, the gRPC services and shutdown together.
//!
//! Shutdown has one path: the `shutdown` future resolves → the root token is cancelled → the
//! server stops accepting, subscriptions end with `UNAVAILABLE` (resume later), publish streams
//! finish the batches they already handed in, relay tasks stop copying → the broker waits for its
//! tasks, commits what is queued and flushes the log last.

mod admin;
mod auth;
mod connections;
mod incoming;
mod memory;
mod publish;
mod service;
mod status;
mod tls;

use crate::broker::Broker;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::protocol::{pb, serve};
use service::Service;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long connections may take to finish after shutdown began before they are dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves on `listener` until `shutdown` resolves, then shuts down cleanly.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
    Server::open(config)?.serve(listener, shutdown).await
}

/// On SIGHUP, reads the TLS certificate and the token file again (what fails to read is reported
/// and the previous one kept); open connections keep their session.
async fn reload_on_hangup(
    acceptor: Option<Arc<tls::Acceptor>>,
    auth: Arc<auth::Auth>,
    token: CancellationToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else { return };
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = hangups.recv() => {}
            }
            if let Some(acceptor) = &acceptor {
                match acceptor.reload() {
                    Ok(()) => info!("SIGHUP: TLS certificate reloaded"),
                    Err(err) => {
                        warn!(%err, "SIGHUP: the TLS certificate was not reloaded; the previous one stays")
                    }
                }
            }
            match auth.reload() {
                Ok(()) => info!("SIGHUP: tokens reloaded"),
                Err(err) => warn!(%err, "SIGHUP: the token file was not reloaded; the previous tokens stay"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (acceptor, auth);
        token.cancelled().await;
    }
}

/// A broker whose log is open, ready to serve.
pub struct Server {
    config: Config,
    broker: Arc<Broker>,
    /// The root of shutdown: every subscription and publish stream watches it.
    token: CancellationToken,
    acceptor: Option<Arc<tls::Acceptor>>,
    auth: Arc<auth::Auth>,
    /// The admin listener's socket, when there is one.
    admin: Option<TcpListener>,
}

impl Server {
    /// Opens the log (recovering it), so that a bad or locked data dir fails before anything
    /// listens.
    pub fn open(config: Config) -> Result<Server> {
        // The certificate and the tokens first: a mistake in them is reported before the log is
        // opened.
        let acceptor = config.tls.as_ref().map(tls::Acceptor::load).transpose()?;
        let auth = auth::Auth::new(&config.access, config.access.required(config.tls.as_ref()))?;
        let token = CancellationToken::new();
        let broker = Arc::new(Broker::open(&config, token.clone())?);
        Ok(Server { config, broker, token, acceptor, auth, admin: None })
    }

    /// Serves the admin listener (metrics, health, the status page) on `listener` too.
    pub fn with_admin(self, listener: TcpListener) -> Server {
        Server { admin: Some(listener), ..self }
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down cleanly.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
        serve(self, listener, shutdown).await
    }
}

async fn serve(server: Server, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
    let Server { config, broker, token, acceptor, auth, admin } = server;
    let addr = listener.local_addr().map(|addr| (addr, config.check_exposure(addr)));
    let addr = match addr {
        Ok((addr, Ok(()))) => addr,
        Ok((_, Err(refused))) => {
            broker.close().await?;
            return Err(refused);
        }
        Err(source) => {
            broker.close().await?;
            return Err(Error::Io { context: "reading the listen address".into(), source });
        }
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<serve::tapeline_server::TapelineServer<Service>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("building server reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("building server reflection: {e}")))?;

    let connections = connections::Connections::new(&config.limits);
    // Installed before anything is recorded: a broker without the admin listener records nothing.
    if admin.is_some() {
        admin::install_recorder();
    }
    let admin = admin.map(|listener| {
        let authenticated = config.access.required(config.tls.as_ref());
        let state = admin::Admin::new(
            broker.clone(),
            connections.clone(),
            addr,
            acceptor.is_some(),
            authenticated,
            config.max_disk_bytes,
        );
        (listener, Arc::new(state))
    });
    let incoming = incoming::incoming(listener, connections.clone(), acceptor.clone(), token.clone());
    let serve = tonic::transport::Server::builder()
        // HTTP/2's default 64 KiB windows let a batch of a few hundred KB cross only after
        // round trips of WINDOW_UPDATEs; larger windows and frames let a publish or a replay
        // batch go in one go.
        .initial_stream_window_size(crate::protocol::STREAM_WINDOW)
        .initial_connection_window_size(crate::protocol::CONNECTION_WINDOW)
        .max_frame_size(crate::protocol::FRAME_SIZE)
        // A request's headers are small; h2's default allows 16 MiB of them.
        .http2_max_header_list_size(crate::protocol::MAX_HEADER_LIST)
        // A peer that vanished without closing (a cut link, a powered-off sensor) is found by
        // pings and its connection closed, which ends its calls and frees their slots.
        .http2_keepalive_interval(Some(config.limits.keepalive))
        .http2_keepalive_timeout(Some(config.limits.keepalive))
        // Calls past `max_calls_per_connection` are refused with a status naming it; HTTP/2's own
        // limit, a little higher, stops a client that opens streams faster than it is told.
        .max_concurrent_streams(Some(
            u32::try_from(config.limits.max_calls_per_connection.saturating_add(16)).unwrap_or(u32::MAX),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service::service(broker.clone(), &config.limits, connections, auth.clone()))
        .serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned());
    info!(%addr, tls = acceptor.is_some(), authenticated = config.access.required(config.tls.as_ref()), "serving");
    // Relay mode: one task per upstream; the retention trimmer; giving freed memory back. All
    // stopped by the same token as everything else.
    let background = tokio_util::task::TaskTracker::new();
    crate::relay::spawn_all(&broker, &token, &background);
    crate::store::spawn_trimmer(broker.log(), broker.retention().clone(), token.clone(), &background);
    memory::spawn(token.clone(), &background);
    if let Some((listener, state)) = admin {
        let token = token.clone();
        background.spawn(async move {
            let _ = admin::serve(listener, state, token).await;
        });
    }
    background.spawn(reload_on_hangup(acceptor, auth, token.clone()));
    background.close();

    tokio::pin!(serve);
    let served = tokio::select! {
        served = &mut serve => served,
        () = shutdown => {
            info!("shutting down");
            let began = Instant::now();
            token.cancel();
            health.set_not_serving::<serve::tapeline_server::TapelineServer<Service>>().await;
            let served = match tokio::time::timeout(DRAIN_TIMEOUT, &mut serve).await {
                Ok(served) => served,
                Err(_) => {
                    warn!(timeout = ?DRAIN_TIMEOUT, "connections did not finish in time; dropping them");
                    Ok(())
                }
            };
            info!(took = ?began.elapsed(), "connections closed");
            served
        }
    };
    token.cancel();
    background.wait().await;
    let closed = broker.close().await;
    served.map_err(|e| Error::Internal(format!("gRPC server failed: {e}")))?;
    closed
}
