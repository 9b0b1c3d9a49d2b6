//! Authentication and permissions at the service's door: every call of the tapeline service gets
//! a [`Principal`] (from its bearer token or its verified client certificate), and each method
//! asks it whether it may act on a stream. Denials are logged and named in the status.

use super::incoming::Peer;
use crate::config::{Access, Grants, Tokens};
use crate::error::{Error, Result};
use crate::types::Action;
use crate::types::Pattern;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tonic::metadata::MetadataMap;
use tonic::Request;
use tracing::warn;

/// Who a call acts as, and what it may do.
#[derive(Debug)]
pub struct Principal {
    /// Empty when the server does not authenticate.
    pub name: String,
    /// `None`: everything (the server does not authenticate).
    grants: Option<Arc<Grants>>,
    peer: Option<std::net::SocketAddr>,
}

impl Principal {
    /// Refuses `action` on `stream` unless granted.
    pub fn require(&self, action: Action, stream: &str) -> Result<()> {
        if self.may(action, stream) {
            return Ok(());
        }
        warn!(principal = %self.name, %action, stream, peer = ?self.peer, "permission denied");
        Err(Error::PermissionDenied { principal: self.name.clone(), action, stream: stream.to_string() })
    }

    /// Refuses `action` unless granted on every one of `streams`.
    pub fn require_all<'a>(&self, action: Action, streams: impl IntoIterator<Item = &'a str>) -> Result<()> {
        if self.grants.is_none() {
            return Ok(());
        }
        let mut last = None;
        for stream in streams {
            if last != Some(stream) {
                self.require(action, stream)?;
                last = Some(stream);
            }
        }
        Ok(())
    }

    /// Whether `action` on `stream` is granted.
    pub fn may(&self, action: Action, stream: &str) -> bool {
        self.grants.as_ref().is_none_or(|g| g.allows(action, stream))
    }

    /// The streams it may read, as patterns; `None` for all.
    pub fn readable(&self) -> Option<Vec<Pattern>> {
        self.grants.as_ref().map(|g| g.subscribe.clone())
    }
}

/// The principal of a call (set by [`Auth::authenticate`] in the service's interceptor).
pub fn principal<T>(request: &Request<T>) -> Arc<Principal> {
    request.extensions().get::<Arc<Principal>>().cloned().unwrap_or_else(|| {
        // Only a call that skipped the interceptor, which does not happen: it may do nothing.
        Arc::new(Principal { name: "(none)".into(), grants: Some(Arc::default()), peer: None })
    })
}

/// The server's authentication: off, or tokens and/or client certificates.
pub struct Auth {
    required: bool,
    /// The principal of every call when the server does not authenticate.
    open: Arc<Principal>,
    tokens_file: Option<PathBuf>,
    tokens: RwLock<Arc<Tokens>>,
    grants: HashMap<String, Arc<Grants>>,
}

impl Auth {
    /// Reads the token file, if any.
    pub fn new(access: &Access, required: bool) -> Result<Arc<Auth>> {
        let tokens = match &access.tokens {
            Some(path) => Tokens::load(path)?,
            None => Tokens::default(),
        };
        Ok(Arc::new(Auth {
            required,
            open: Arc::new(Principal { name: String::new(), grants: None, peer: None }),
            tokens_file: access.tokens.clone(),
            tokens: RwLock::new(Arc::new(tokens)),
            grants: access.principals.iter().map(|(name, g)| (name.clone(), Arc::new(g.clone()))).collect(),
        }))
    }

    /// Reads the token file again (SIGHUP); on failure the tokens read before stay.
    pub fn reload(&self) -> Result<()> {
        if let Some(path) = &self.tokens_file {
            let tokens = Tokens::load(path)?;
            *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        }
        Ok(())
    }

    /// The principal of a call: its bearer token's name, else its client certificate's common
    /// name. Refused when the server authenticates and the call has neither, or an unknown token.
    pub fn authenticate(&self, metadata: &MetadataMap, peer: Option<&Peer>) -> Result<Arc<Principal>> {
        if !self.required {
            return Ok(self.open.clone());
        }
        let addr = peer.and_then(|p| p.addr);
        let refuse = |detail: String| {
            warn!(peer = ?addr, %detail, "unauthenticated call refused");
            Error::Unauthenticated { detail }
        };
        let name = match metadata.get("authorization") {
            Some(value) => {
                let value = value.to_str().unwrap_or("");
                let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or_else(|| {
                    refuse("the authorization header is not `Bearer TOKEN`".into())
                })?;
                let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner()).clone();
                match tokens.name_of(token.trim()) {
                    Some(name) => name.to_string(),
                    None => return Err(refuse("the bearer token is not known to this server (revoked, mistyped, or made for another server)".into())),
                }
            }
            None => match peer.and_then(|p| p.certificate.as_deref()) {
                Some(name) => name.to_string(),
                None => {
                    return Err(refuse(
                        "this server needs a bearer token (--token or TAPELINE_TOKEN; header `authorization: Bearer TOKEN`) or a client certificate signed by its client CA".into(),
                    ))
                }
            },
        };
        // A principal without a table is known but may do nothing.
        let grants = self.grants.get(&name).cloned().unwrap_or_default();
        Ok(Arc::new(Principal { name, grants: Some(grants), peer: addr }))
    }
}
