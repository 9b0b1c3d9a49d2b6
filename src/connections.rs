//! The connection limit (`limits.max_connections`). A connection accepted while the limit is
//! reached is still served at the HTTP/2 level, but every call on it is refused with
//! `RESOURCE_EXHAUSTED` naming the limit: the client learns why, instead of seeing a socket
//! closed without a word. Once it reconnects while fewer connections are open, it is served.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The open connections, and those over the limit.
#[derive(Debug)]
pub struct Connections {
    limit: usize,
    open: AtomicUsize,
    over: Mutex<HashSet<SocketAddr>>,
}

impl Connections {
    /// Allows `limit` connections at once.
    pub fn new(limit: usize) -> Arc<Connections> {
        Arc::new(Connections { limit, open: AtomicUsize::new(0), over: Mutex::new(HashSet::new()) })
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
        Counted { stream, connections: self.clone(), over }
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
