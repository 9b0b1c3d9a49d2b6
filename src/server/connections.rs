//! The connection limits. `limits.max_connections`: a connection accepted while the limit is
//! reached is still served at the HTTP/2 level, but every call on it is refused with
//! `RESOURCE_EXHAUSTED` naming the limit: the client learns why, instead of seeing a socket
//! closed without a word. After [`GRACE`] the server closes it, so it does not hold a place, and
//! a client that reconnects while fewer connections are open is served.
//! `limits.max_calls_per_connection`: calls open at once on one connection.
//! `limits.handshake_timeout` and `limits.idle_timeout`: a connection whose first call does not
//! start in time (a stalled TLS handshake, a client that sent only the HTTP/2 preface), or that
//! has no call for a while, reads as closed, which ends it.

use crate::error::{Error, Result};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// How long a connection over the limit stays open to be told why, before it is closed.
pub const GRACE: Duration = Duration::from_secs(1);

/// The open connections and the calls open on each.
#[derive(Debug)]
pub struct Connections {
    limit: usize,
    open: AtomicUsize,
    calls_limit: usize,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

/// What is known of one connection while it is open; each call reaches it through its `Peer`.
#[derive(Debug, Default)]
pub struct Connection {
    /// Accepted over `max_connections`: its calls are refused.
    over: bool,
    /// Calls open now.
    calls: AtomicUsize,
    /// Calls started since it was accepted.
    started: AtomicU64,
}

/// One call counted against its connection's `limits.max_calls_per_connection` while it lives.
#[derive(Debug)]
pub struct Call {
    connection: Arc<Connection>,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.connection.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connections {
    /// Allows `limits.max_connections` connections at once, `max_calls_per_connection` calls at
    /// once on each, and closes those without calls after the timeouts.
    pub fn new(limits: &crate::config::Limits) -> Arc<Connections> {
        Arc::new(Connections {
            limit: limits.max_connections,
            open: AtomicUsize::new(0),
            calls_limit: limits.max_calls_per_connection,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a call on `connection`: refused when it was accepted over `max_connections`, or has
    /// `max_calls_per_connection` calls open already.
    pub fn call(&self, connection: &Arc<Connection>) -> Result<Call> {
        if connection.over {
            return Err(Error::TooMany {
                what: "client connections at once",
                limit: self.limit,
                setting: "limits.max_connections",
                hint: "close idle connections or reuse one, then reconnect",
            });
        }
        connection.started.fetch_add(1, Ordering::SeqCst);
        if connection.calls.fetch_add(1, Ordering::SeqCst) >= self.calls_limit {
            connection.calls.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::TooMany {
                what: "calls at once on one connection",
                limit: self.calls_limit,
                setting: "limits.max_calls_per_connection",
                hint: "end calls you no longer need, or open another connection",
            });
        }
        Ok(Call { connection: connection.clone() })
    }

    /// Counts an accepted connection (marking it when it is over the limit) until it is dropped.
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Counted {
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        let peer = stream.peer_addr().ok();
        let over = open > self.limit;
        if over {
            tracing::warn!(
                ?peer,
                limit = self.limit,
                "connection over max_connections: its calls are refused"
            );
        }
        tracing::info!(?peer, open, "connection opened");
        let connection = Arc::new(Connection { over, ..Connection::default() });
        let first = if over { GRACE } else { self.handshake_timeout };
        Counted {
            stream,
            connections: self.clone(),
            peer,
            connection,
            deadline: Box::pin(tokio::time::sleep(first)),
            seen: 0,
        }
    }
}

/// An accepted connection, counted while it lives.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    connections: Arc<Connections>,
    peer: Option<SocketAddr>,
    connection: Arc<Connection>,
    /// When the connection is looked at next: closed unless a call is open or started since.
    deadline: Pin<Box<Sleep>>,
    /// Calls started when it was last looked at.
    seen: u64,
}

impl Counted {
    /// The address of the peer.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// What its calls are counted on.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// Whether the connection should end now: past its deadline with no call open or started
    /// since the last look (or accepted over the limit).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.deadline.as_mut().poll(cx).is_ready() {
            let started = self.connection.started.load(Ordering::SeqCst);
            let busy = self.connection.calls.load(Ordering::SeqCst) > 0 || started != self.seen;
            if self.connection.over || !busy {
                tracing::debug!(peer = ?self.peer, calls = started, "closing a connection without calls");
                return true;
            }
            self.seen = started;
            let next = Instant::now() + self.connections.idle_timeout;
            self.deadline.as_mut().reset(next);
        }
        false
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::SeqCst);
        let calls = self.connection.started.load(Ordering::SeqCst);
        tracing::info!(peer = ?self.peer, calls, "connection closed");
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            // End of stream: the server closes the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
