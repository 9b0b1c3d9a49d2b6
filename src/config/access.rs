//! Who may connect and what each may do: the server's TLS files, and the principals (a token's
//! name or a client certificate's common name) with their permissions per stream pattern. The
//! tokens themselves are in [`super::tokens`].

use crate::error::{Error, Result};
use crate::types::{Action, Pattern};
use std::collections::HashMap;
use std::path::PathBuf;

/// The server's certificate and key (PEM), and the CA that signs client certificates for mutual
/// TLS. Read at start and again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The streams a principal may act on, per action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub publish: Vec<Pattern>,
    pub subscribe: Vec<Pattern>,
    pub admin: Vec<Pattern>,
}

impl Grants {
    /// The patterns of `action`.
    pub fn patterns(&self, action: Action) -> &[Pattern] {
        match action {
            Action::Publish => &self.publish,
            Action::Subscribe => &self.subscribe,
            Action::Admin => &self.admin,
        }
    }

    /// Whether `action` is allowed on `stream`.
    pub fn allows(&self, action: Action, stream: &str) -> bool {
        self.patterns(action).iter().any(|p| p.matches(stream))
    }
}

/// How clients authenticate, and each principal's grants. Authentication is on when a token file
/// or a client CA is set; then every call of the tapeline service needs a principal, and a
/// principal without a table may do nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The file of token digests (`tapeline token create`).
    pub tokens: Option<PathBuf>,
    /// Grants by principal name.
    pub principals: HashMap<String, Grants>,
}

impl Access {
    /// Whether calls must authenticate, given the TLS settings.
    pub fn required(&self, tls: Option<&Tls>) -> bool {
        self.tokens.is_some() || tls.is_some_and(|t| t.client_ca.is_some())
    }

    /// Checks that principals can authenticate at all.
    pub fn validate(&self, tls: Option<&Tls>) -> Result<()> {
        if !self.principals.is_empty() && !self.required(tls) {
            return Err(Error::Config {
                key: "auth.principal",
                value: self.principals.keys().cloned().collect::<Vec<_>>().join(", "),
                expected: "a way for them to authenticate: auth.tokens (a token file) or tls.client_ca (client certificates)",
            });
        }
        if let Some(tls) = tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if path.as_os_str().is_empty() {
                    return Err(Error::Config { key, value: String::new(), expected: "a PEM file" });
                }
            }
        }
        Ok(())
    }
}

/// Refuses a file holding secrets (token digests, a private key, a relay's token) that users
/// other than its owner and group can read or write.
#[cfg(unix)]
pub fn check_private(path: &std::path::Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|source| Error::Io { context: format!("cannot read {what} {}", path.display()), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(Error::Unsafe(format!(
            "{what} {} has mode {mode:03o}: others may read or change it; make it private with `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Other systems have no mode bits to check.
#[cfg(not(unix))]
pub fn check_private(_path: &std::path::Path, _what: &str) -> Result<()> {
    Ok(())
}
