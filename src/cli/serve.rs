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
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| Error::Io { context: format!("cannot listen on {listen}"), source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Io { context: "reading the listen address".into(), source })?;
    // The log opens (and recovers) before the ready line, so a bad or locked data dir is
    // reported instead of it.
    let server = tapeline::server::Server::open(config)?;
    // The one line a script waits for: where the broker listens.
    println!("tapeline listening on {addr}");
    let _ = std::io::stdout().flush();
    server.serve(listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
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
