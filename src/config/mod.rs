//! Settings of a broker as data, their defaults and their validation; the settings file is read in
//! [`file`], relays' mirrors are in [`mirror`], retention's settings in [`retention`].

mod access;
mod file;
mod mirror;
mod retention;
mod tokens;

pub use access::{check_private, Access, Grants, Tls};
pub use file::{
    File, FileAuth, FileLimits, FileMirror, FilePrincipal, FileRetention, FileRetentionRule, FileTls,
    DEFAULT_FILE,
};
pub use mirror::{Mirror, MirrorFrom};
pub use retention::{validate_policy, Retention, Rule, CHECK_EVERY, VOLATILE_MAX_TOTAL_BYTES};
pub use tokens::Tokens;

use crate::error::{Error, Result};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where the log lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// A directory that survives restarts.
    Path(PathBuf),
    /// A temporary store, removed when the broker stops.
    Volatile,
}

/// When an appended batch is forced to disk, and so when it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Ack a batch only after the group commit that holds it was flushed (the default).
    Always,
    /// Ack at once; flush in the background every interval.
    Interval(Duration),
    /// Ack at once; never flush except at shutdown.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Config {
            key: "fsync",
            value: s.to_string(),
            expected: "always, never or interval=MS with MS a whole number of milliseconds above 0",
        };
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let ms = s.strip_prefix("interval=").ok_or_else(bad)?;
                let ms: u64 = ms.parse().map_err(|_| bad())?;
                if ms == 0 {
                    return Err(bad());
                }
                Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

/// A chunk file is closed, and a new one started, once it holds this many bytes (the default of
/// `chunk_file_bytes`).
pub const CHUNK_FILE_BYTES: u64 = 16 << 20;
/// The largest batch the broker can be configured to take.
const MAX_BATCH_BYTES: usize = 1 << 30;
/// Protobuf framing of one record besides its payload and header text: the stream name (at most
/// 255 bytes), ticks, CRC and the tags and lengths of every field and map entry.
const MAX_RECORD_FRAMING: usize = 512;

/// Sizes the broker refuses to exceed, so that one client cannot exhaust memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one record.
    pub max_record_bytes: usize,
    /// Largest sum of payloads and headers in one batch.
    pub max_batch_bytes: usize,
    /// Most records in one batch.
    pub max_batch_records: usize,
    /// Largest sum of header keys and values of one record.
    pub max_header_bytes: usize,
    /// Idempotent producers remembered; beyond it the least recently used one is forgotten.
    pub max_producers: usize,
    /// Subscriptions running at once; beyond it `Subscribe` is refused.
    pub max_subscriptions: usize,
    /// Streams the store holds; a batch that would create more is refused.
    pub max_streams: usize,
    /// Client connections at once; calls on connections beyond it are refused.
    pub max_connections: usize,
    /// The quota of a subscription that asks for none (record bytes per second).
    pub subscribe_bytes_per_second: Option<u64>,
    /// The most a subscription may ask for.
    pub max_subscribe_bytes_per_second: Option<u64>,
    /// The quota of each client connection for publishing.
    pub publish_bytes_per_second: Option<u64>,
    /// The window quotas are averaged over.
    pub rate_window: Duration,
    /// How far behind the live tail a subscription may fall before its slow-consumer policy
    /// applies, unless it asks for another limit.
    pub max_lag: Duration,
    /// Streams or patterns one subscription may name.
    pub max_selectors: usize,
    /// Calls open at once on one client connection (subscriptions and publish streams last).
    pub max_calls_per_connection: usize,
    /// After this much silence on a connection the server sends an HTTP/2 ping, and closes the
    /// connection when no answer comes within as long again: a peer that vanished (a cut cable,
    /// a powered-off sensor) frees its connection and subscription slots.
    pub keepalive: Duration,
    /// A new connection is closed unless its first call starts within this (TLS handshake, HTTP/2
    /// preface and the call's headers).
    pub handshake_timeout: Duration,
    /// A connection with no call open, and none started, for this long is closed.
    pub idle_timeout: Duration,
    /// Bytes of published batches decoded and not yet committed, across all clients; a batch
    /// that would pass it waits for room, up to `pending_wait`, then is refused.
    pub max_pending_bytes: usize,
    pub pending_wait: Duration,
    /// Stream creations, updates, seals and deletions by clients per second (bursts of a
    /// second's worth); beyond it they are refused.
    pub catalog_changes_per_second: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: 4 << 20,
            max_batch_bytes: 16 << 20,
            max_batch_records: 65_536,
            max_header_bytes: 16 << 10,
            max_producers: 10_000,
            max_subscriptions: 10_000,
            max_streams: 1_000_000,
            max_connections: 10_000,
            subscribe_bytes_per_second: None,
            max_subscribe_bytes_per_second: None,
            publish_bytes_per_second: None,
            rate_window: Duration::from_secs(5),
            max_lag: Duration::from_secs(10),
            max_selectors: 1024,
            max_calls_per_connection: 256,
            keepalive: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_pending_bytes: 256 << 20,
            pending_wait: Duration::from_secs(10),
            catalog_changes_per_second: 100,
        }
    }
}

impl Limits {
    /// The largest gRPC message the server must accept: a full batch (payloads and headers) plus
    /// the framing of each record (stream name, ticks, map entries).
    pub fn max_message_bytes(&self) -> usize {
        let framing = self.max_batch_records.saturating_mul(MAX_RECORD_FRAMING);
        self.max_batch_bytes.saturating_add(framing).saturating_add(1 << 20)
    }

    /// Checks that the limits are usable together.
    pub fn validate(&self) -> Result<()> {
        // A record must fit in one message of any tapeline client (a relay is one).
        if self.max_record_bytes == 0 || self.max_record_bytes > crate::protocol::MAX_MESSAGE - (1 << 20) {
            return Err(Error::Config {
                key: "max_record_bytes",
                value: self.max_record_bytes.to_string(),
                expected: "a size from 1 byte to 255 MiB",
            });
        }
        if self.max_batch_records == 0 {
            return Err(Error::Config {
                key: "max_batch_records",
                value: self.max_batch_records.to_string(),
                expected: "at least 1",
            });
        }
        if self.max_header_bytes > usize::from(u16::MAX) {
            return Err(Error::Config {
                key: "max_header_bytes",
                value: self.max_header_bytes.to_string(),
                expected:
                    "a size of at most 65535 bytes (a header's key and value are stored with 16-bit lengths)",
            });
        }
        if self.max_batch_bytes > MAX_BATCH_BYTES {
            return Err(Error::Config {
                key: "max_batch_bytes",
                value: self.max_batch_bytes.to_string(),
                expected: "a size of at most 1 GiB",
            });
        }
        if self.max_producers == 0 {
            return Err(Error::Config {
                key: "max_producers",
                value: self.max_producers.to_string(),
                expected: "at least 1",
            });
        }
        if self.catalog_changes_per_second == 0 {
            return Err(Error::Config {
                key: "catalog_changes_per_second",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        for (key, value) in [
            ("max_subscriptions", self.max_subscriptions),
            ("max_streams", self.max_streams),
            ("max_connections", self.max_connections),
        ] {
            if value == 0 {
                return Err(Error::Config { key, value: "0".into(), expected: "at least 1" });
            }
        }
        for (key, value) in [
            ("subscribe_bytes_per_second", self.subscribe_bytes_per_second),
            ("max_subscribe_bytes_per_second", self.max_subscribe_bytes_per_second),
            ("publish_bytes_per_second", self.publish_bytes_per_second),
        ] {
            if value == Some(0) {
                return Err(Error::Config {
                    key,
                    value: "0".into(),
                    expected: "a rate of at least 1 byte per second (leave it out for no limit)",
                });
            }
        }
        if self.rate_window < Duration::from_millis(10) || self.rate_window > Duration::from_secs(3600) {
            return Err(Error::Config {
                key: "rate_window",
                value: format!("{:?}", self.rate_window),
                expected: "a duration from 10ms to 1h",
            });
        }
        if self.max_pending_bytes < self.max_batch_bytes {
            return Err(Error::Config {
                key: "max_pending_bytes",
                value: self.max_pending_bytes.to_string(),
                expected: "at least max_batch_bytes (a whole batch must fit)",
            });
        }
        if self.max_batch_bytes < self.max_record_bytes {
            return Err(Error::Config {
                key: "max_batch_bytes",
                value: self.max_batch_bytes.to_string(),
                expected: "at least max_record_bytes",
            });
        }
        Ok(())
    }
}

/// Everything a broker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the log lives.
    pub data: DataDir,
    /// When batches are flushed and acknowledged.
    pub fsync: FsyncPolicy,
    /// Request size limits.
    pub limits: Limits,
    /// How long a subscription may be silent before the server sends a heartbeat.
    pub heartbeat: Duration,
    /// Bytes of sled page cache.
    pub cache_bytes: u64,
    /// A chunk file is closed, and the next one started, past this many bytes (`store/files.rs`).
    pub chunk_file_bytes: u64,
    /// The most the data dir may take on disk; publishing is refused beyond it.
    pub max_disk_bytes: Option<u64>,
    /// Free disk space kept in reserve; publishing is refused when a batch would eat into it.
    pub min_free_disk_bytes: u64,
    /// Relay mode: the upstreams whose streams this broker copies (read-only here).
    pub mirrors: Vec<Mirror>,
    /// What `Hello` tells clients older than a recommended version.
    pub notice: Option<Notice>,
    /// What is kept of each stream, and of the whole store.
    pub retention: Retention,
    /// The server's certificate: clients connect over TLS.
    pub tls: Option<Tls>,
    /// How clients authenticate, and what each may do.
    pub access: Access,
    /// Serve a non-loopback address without TLS and authentication, knowingly.
    pub insecure: bool,
}

/// The operator's message to clients older than `recommended_version` (a dotted version such as
/// `0.3.0`), sent in their `Hello` answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notice {
    pub recommended_version: String,
    pub text: String,
    #[serde(default)]
    pub url: String,
}

impl Notice {
    /// Whether a client of `version` is older than the recommended one. Versions compare by
    /// their dotted numbers (`0.10.0` > `0.9.2`; a suffix such as `-rc1` is ignored); a client
    /// that gives no version, or one that cannot be read, is told too.
    pub fn applies_to(&self, version: &str) -> bool {
        match (numbers(version), numbers(&self.recommended_version)) {
            (Some(client), Some(recommended)) => client < recommended,
            _ => true,
        }
    }
}

/// The dotted numbers of a version, padded to three: `1.2` → [1, 2, 0].
fn numbers(version: &str) -> Option<Vec<u64>> {
    let core = version.trim().trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok()).collect::<Option<Vec<_>>>()?;
    if parts.is_empty() {
        return None;
    }
    parts.resize(parts.len().max(3), 0);
    Some(parts)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: DataDir::Path(PathBuf::from("tapeline-data")),
            fsync: FsyncPolicy::Always,
            limits: Limits::default(),
            heartbeat: Duration::from_secs(5),
            cache_bytes: 256 << 20,
            chunk_file_bytes: CHUNK_FILE_BYTES,
            max_disk_bytes: None,
            min_free_disk_bytes: 64 << 20,
            mirrors: Vec::new(),
            notice: None,
            retention: Retention::default(),
            tls: None,
            access: Access::default(),
            insecure: false,
        }
    }
}

impl Config {
    /// Refuses to serve an address other than loopback without TLS and authentication, unless
    /// `insecure` says so.
    pub fn check_exposure(&self, addr: std::net::SocketAddr) -> Result<()> {
        let protected = self.tls.is_some() && self.access.required(self.tls.as_ref());
        if addr.ip().is_loopback() || protected || self.insecure {
            return Ok(());
        }
        Err(Error::Unsafe(format!(
            "{addr} is reachable from other hosts, and without TLS and authentication anyone who reaches it may read, publish and delete every stream: give a certificate (--tls-cert/--tls-key or [tls]) and a token file or client CA ([auth] tokens, --tls-client-ca), or pass --insecure (insecure = true) to serve it open knowingly"
        )))
    }

    /// Refuses an admin listener (plain HTTP, no authentication: it shows stream names, peers and
    /// principals) on an address other than loopback, unless `insecure` says so.
    pub fn check_admin_exposure(&self, addr: std::net::SocketAddr) -> Result<()> {
        if addr.ip().is_loopback() || self.insecure {
            return Ok(());
        }
        Err(Error::Unsafe(format!(
            "the admin listener {addr} is reachable from other hosts, and it has no TLS or authentication: anyone who reaches it sees every stream's name, the clients' addresses and principals. Listen on loopback (--admin-listen 127.0.0.1:7412) behind a proxy that authenticates, or pass --insecure (insecure = true) to expose it knowingly"
        )))
    }

    /// Checks the settings together.
    pub fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        if self.heartbeat < Duration::from_millis(100) || self.heartbeat > Duration::from_secs(86_400) {
            return Err(Error::Config {
                key: "heartbeat",
                value: format!("{:?}", self.heartbeat),
                expected: "a duration from 100 ms to 24 h",
            });
        }
        if !(1 << 20..=1 << 30).contains(&self.chunk_file_bytes) {
            return Err(Error::Config {
                key: "chunk_file_bytes",
                value: self.chunk_file_bytes.to_string(),
                expected: "from 1048576 (1 MiB) to 1073741824 (1 GiB)",
            });
        }
        for mirror in &self.mirrors {
            mirror.validate()?;
        }
        self.retention.validate()?;
        self.access.validate(self.tls.as_ref())?;
        if let Some(notice) = &self.notice {
            if numbers(&notice.recommended_version).is_none() {
                return Err(Error::Config {
                    key: "notice.recommended_version",
                    value: notice.recommended_version.clone(),
                    expected: "a dotted version such as 0.3.0",
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policies_parse() {
        assert_eq!("always".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Always);
        assert_eq!("never".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Never);
        assert_eq!(
            "interval=25".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Interval(Duration::from_millis(25))
        );
        let err = "sometimes".parse::<FsyncPolicy>().unwrap_err().to_string();
        assert!(err.contains("fsync") && err.contains("sometimes") && err.contains("interval=MS"), "{err}");
        assert!("interval=0".parse::<FsyncPolicy>().is_err());
    }
}
