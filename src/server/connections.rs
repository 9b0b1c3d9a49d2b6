//! The connection limit (`limits.max_connections`). A connection accepted while the limit is
//! reached is still served at the HTTP/2 level, but every call on it is refused with
//! `RESOURCE_EXHAUSTED` naming the limit: the client learns why, instead of seeing a socket
//! closed without a word. After [`GRACE`] the server closes it, so it does not hold a place, and
//! a client that reconnects while fewer connections are open is served.

use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a connection over the limit stays open to be told why, before it is closed.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The open connections, those over the limit, and the calls open on each.
#[derive(Debug)]
pub struct Connections {
    limit: usize,
    open: AtomicUsize,
    over: Mutex<HashSet<SocketAddr>>,
    calls_limit: usize,
    calls: Mutex<HashMap<SocketAddr, usize>>,
}

/// One call counted against its connection's `limits.max_calls_per_connection` while it lives.
#[derive(Debug)]
pub struct Call {
    connections: Arc<Connections>,
    peer: SocketAddr,
}

impl Drop for Call {
    fn drop(&mut self) {
        let mut calls = self.connections.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = calls.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                calls.remove(&self.peer);
            }
        }
    }
}

impl Connections {
    /// Allows `limit` connections at once, and `calls_limit` calls at once on each.
    pub fn new(limit: usize, calls_limit: usize) -> Arc<Connections> {
        Arc::new(Connections {
            limit,
            open: AtomicUsize::new(0),
            over: Mutex::new(HashSet::new()),
            calls_limit,
            calls: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a call on the connection of `peer`, refused when that connection has
    /// `calls_limit` open already.
    pub fn call(self: &Arc<Self>, peer: Option<SocketAddr>) -> Result<Option<Call>> {
        let Some(peer) = peer else { return Ok(None) };
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let open = calls.entry(peer).or_insert(0);
        if *open >= self.calls_limit {
            return Err(Error::TooMany {
                what: "calls at once on one connection",
                limit: self.calls_limit,
                setting: "limits.max_calls_per_connection",
                hint: "end calls you no longer need, or open another connection",
            });
        }
        *open += 1;
        Ok(Some(Call { connections: self.clone(), peer }))
    }

    /// Counts an accepted connection (marking it when it is over the limit) until it is dropped.
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Counted {
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        let over = match stream.peer_addr() {
            Ok(peer) if open > self.limit => {
                tracing::warn!(%peer, limit = self.limit, "connection over max_connections: its calls are refused");
                self.over.lock().unwrap_or_else(|e| e.into_inner()).insert(peer);
                Some(peer)
            }
            _ => None,
        };
        let closing = over.map(|_| Box::pin(tokio::time::sleep(GRACE)));
        Counted { stream, connections: self.clone(), over, closing }
    }

    /// Refuses a call made on a connection accepted over the limit.
    pub fn check(&self, peer: Option<SocketAddr>) -> Result<()> {
        let over = peer.is_some_and(|p| self.over.lock().unwrap_or_else(|e| e.into_inner()).contains(&p));
        if over {
            return Err(Error::TooMany {
                what: "client connections at once",
                limit: self.limit,
                setting: "limits.max_connections",
                hint: "close idle connections or reuse one, then reconnect",
            });
        }
        Ok(())
    }
}

/// An accepted connection, counted while it lives.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    connections: Arc<Connections>,
    /// Its peer, when it was accepted over the limit.
    over: Option<SocketAddr>,
    /// For a connection over the limit: when it reads as closed.
    closing: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::SeqCst);
        if let Some(peer) = self.over {
            self.connections.over.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer);
        }
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(closing) = &mut self.closing {
            if closing.as_mut().poll(cx).is_ready() {
                // End of stream: the server closes the connection.
                return Poll::Ready(Ok(()));
            }
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
