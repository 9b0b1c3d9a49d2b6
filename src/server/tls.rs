//! The server's TLS: its certificate and key, and for mutual TLS the CA of client certificates,
//! read from PEM files at start and again on SIGHUP. A reload changes what new connections get;
//! open connections (and their subscriptions) keep the session they have.

use crate::config::Tls;
use crate::error::{Error, Result};
use std::sync::{Arc, RwLock};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Accepts TLS connections with the certificate read last.
pub struct Acceptor {
    files: Tls,
    current: RwLock<tokio_rustls::TlsAcceptor>,
}

impl Acceptor {
    /// Reads the files; fails naming the file and what is wrong with it.
    pub fn load(files: &Tls) -> Result<Arc<Acceptor>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(files)?));
        Ok(Arc::new(Acceptor { files: files.clone(), current: RwLock::new(acceptor) }))
    }

    /// Reads the files again; on failure the previous certificate stays in use.
    pub fn reload(&self) -> Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&self.files)?));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
        Ok(())
    }

    /// The acceptor for a new connection.
    pub fn current(&self) -> tokio_rustls::TlsAcceptor {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn unreadable(what: &str, path: &std::path::Path, detail: impl std::fmt::Display) -> Error {
    Error::Unsafe(format!("cannot use {what} {}: {detail}", path.display()))
}

/// The certificates of a PEM file.
fn certificates(what: &str, path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| unreadable(what, path, e))?;
    if certs.is_empty() {
        return Err(unreadable(what, path, "it holds no PEM certificate"));
    }
    Ok(certs)
}

fn server_config(files: &Tls) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("the TLS certificate", &files.cert)?;
    crate::config::check_private(&files.key, "the TLS key")?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| unreadable("the TLS key", &files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates("the client CA", path)? {
                roots.add(cert).map_err(|e| unreadable("the client CA", path, e))?;
            }
            // Optional at the TLS level: a client may authenticate with a token instead; the
            // service refuses a call that has neither.
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| unreadable("the client CA", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| unreadable("the TLS certificate and key", &files.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The principal a verified client certificate names: its subject's common name.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}
