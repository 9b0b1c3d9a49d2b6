//! Accepting connections: each is counted ([`Connections`]), and with TLS its handshake runs in a
//! task of its own, so a slow or silent client never holds up the next accept. What a call
//! learns of its connection is a [`Peer`].

use super::connections::{Connection, Connections, Counted};
use super::tls::{common_name, Acceptor};
use futures::Stream;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::Request;
use tracing::{debug, warn};

/// Connections handed to the server and not yet taken: beyond it accepting waits.
const QUEUE: usize = 1024;

/// Who is at the other end of a call's connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// What the call is counted on (`Connections::call`).
    pub connection: Arc<Connection>,
    /// The common name of the client certificate the TLS handshake verified.
    pub certificate: Option<Arc<str>>,
}

/// The [`Peer`] of a request.
pub fn peer<T>(request: &Request<T>) -> Option<&Peer> {
    request.extensions().get::<Peer>()
}

/// An accepted connection, plain or TLS.
pub enum Io {
    Plain(Counted),
    Tls(Box<tokio_rustls::server::TlsStream<Counted>>, Option<Arc<str>>),
}

/// The connections accepted on `listener` until `shutdown`, through `tls` when given.
pub fn incoming(
    listener: TcpListener,
    connections: Arc<Connections>,
    tls: Option<Arc<Acceptor>>,
    shutdown: CancellationToken,
) -> impl Stream<Item = io::Result<Io>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // the listener itself is fine.
                    warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let counted = connections.admit(stream);
            match &tls {
                None => {
                    if tx.send(Ok(Io::Plain(counted))).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let acceptor = acceptor.current();
                    let tx = tx.clone();
                    // Bounded in time by the connection's handshake timeout, which ends the
                    // stream under it.
                    tokio::spawn(async move {
                        let peer = counted.peer();
                        match acceptor.accept(counted).await {
                            Ok(stream) => {
                                let name = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(common_name);
                                let _ = tx.send(Ok(Io::Tls(Box::new(stream), name.map(Arc::from)))).await;
                            }
                            Err(err) => debug!(?peer, %err, "TLS handshake failed"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

impl Connected for Io {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        match self {
            Io::Plain(counted) => {
                Peer { addr: counted.peer(), connection: counted.connection().clone(), certificate: None }
            }
            Io::Tls(stream, name) => {
                let counted = stream.get_ref().0;
                Peer {
                    addr: counted.peer(),
                    connection: counted.connection().clone(),
                    certificate: name.clone(),
                }
            }
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
