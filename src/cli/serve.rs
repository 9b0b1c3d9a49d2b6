//! `serve`: the broker, until SIGINT or SIGTERM.

use super::ServeArgs;
use std::io::Write;
use std::process::ExitCode;
use tapeline::config;
use tapeline::{Error, Result};

pub async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let file = match &args.config {
        Some(path) => config::File::load(path)?,
        None => config::File::default(),
    };
    let settings = file.overridden_by(args.settings());
    // Checked once, when the broker opens with it.
    let config = settings.config()?;
    let listen = settings.listen.unwrap_or_else(|| "127.0.0.1:7411".to_string());
    let listener = listen_on(&listen)
        .await
        .map_err(|source| Error::Io { context: format!("cannot listen on {listen}"), source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Io { context: "reading the listen address".into(), source })?;
    config.check_exposure(addr)?;
    let admin = match &settings.admin_listen {
        Some(admin) => {
            let listener = listen_on(admin).await.map_err(|source| Error::Io {
                context: format!("cannot listen on {admin} (--admin-listen)"),
                source,
            })?;
            let addr = listener
                .local_addr()
                .map_err(|source| Error::Io { context: "reading the admin listen address".into(), source })?;
            config.check_admin_exposure(addr)?;
            Some((listener, addr))
        }
        None => None,
    };
    // The log opens (and recovers) before the ready line, so a bad or locked data dir is
    // reported instead of it.
    let mut server = tapeline::server::Server::open(config)?;
    // The one line a script waits for: where the broker listens. (The admin listener's follows.)
    println!("tapeline listening on {addr}");
    if let Some((listener, addr)) = admin {
        server = server.with_admin(listener);
        println!("tapeline admin on http://{addr}/");
    }
    let _ = std::io::stdout().flush();
    server.serve(listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Connections the kernel queues for the broker to accept (it caps this at `net.core.somaxconn`).
/// When a relay or a network comes back, a thousand clients reconnect at once; with the usual
/// 1,024 the kernel fell back to SYN cookies and some of them were reset (BENCHMARKS.md, "Many
/// readers").
const BACKLOG: u32 = 4096;

/// Listens on the first address `listen` resolves to that can be bound.
async fn listen_on(listen: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut failed = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket =
            if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As std's bind does: a restarted broker takes its port back at once.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(BACKLOG),
            Err(err) => failed = Some(err),
        }
    }
    Err(failed.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolves to nothing")
    }))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
