//! The settings file (TOML): its shape, its documented default, and how it becomes a [`Config`].
//! A flag given on the command line wins over the file, the file over the default.

use super::{
    check_private, Access, Config, DataDir, Grants, Limits, Mirror, Notice, Retention, Rule, Tls,
    CHECK_EVERY, VOLATILE_MAX_TOTAL_BYTES,
};
use crate::error::{Error, Result};
use crate::types::{Pattern, Policy};
use std::path::PathBuf;
use std::time::Duration;

/// The settings file (`serve --config FILE`): every key is optional; a flag given on the command
/// line wins over the file, the file over the default. Unknown keys are refused, so a typo is not
/// silently ignored.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<String>,
    /// The admin listener: /metrics, /healthz, /readyz and the status page (off when unset).
    pub admin_listen: Option<String>,
    pub data: Option<PathBuf>,
    pub volatile: Option<bool>,
    pub fsync: Option<String>,
    pub heartbeat: Option<String>,
    #[serde(default, deserialize_with = "size")]
    pub cache_bytes: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub chunk_file_bytes: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub max_disk_bytes: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub min_free_disk_bytes: Option<u64>,
    #[serde(default)]
    pub limits: FileLimits,
    /// Relay mode: one table per upstream.
    #[serde(default)]
    pub mirror: Vec<FileMirror>,
    /// The message `Hello` gives clients older than a recommended version.
    pub notice: Option<Notice>,
    #[serde(default)]
    pub retention: FileRetention,
    /// The server's certificate: clients connect over TLS.
    pub tls: Option<FileTls>,
    #[serde(default)]
    pub auth: FileAuth,
    /// Serve a non-loopback address without TLS and authentication, knowingly.
    pub insecure: Option<bool>,
}

/// The `[tls]` table.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The `[auth]` table.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    /// The token file (`tapeline token create NAME --tokens FILE`).
    pub tokens: Option<PathBuf>,
    /// `[[auth.principal]]` tables.
    #[serde(default)]
    pub principal: Vec<FilePrincipal>,
}

/// One `[[auth.principal]]` table: a token's name or a client certificate's common name, and the
/// stream patterns it may act on.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePrincipal {
    pub name: String,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub admin: Vec<String>,
}

/// The `[retention]` table of the settings file.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetention {
    pub max_age: Option<String>,
    #[serde(default, deserialize_with = "size")]
    pub max_bytes: Option<u64>,
    pub max_records: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub max_total_bytes: Option<u64>,
    pub check_every: Option<String>,
    /// `[[retention.rule]]` tables: limits for some streams.
    #[serde(default)]
    pub rule: Vec<FileRetentionRule>,
}

/// One `[[retention.rule]]` table.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetentionRule {
    pub streams: Vec<String>,
    pub max_age: Option<String>,
    #[serde(default, deserialize_with = "size")]
    pub max_bytes: Option<u64>,
    pub max_records: Option<u64>,
}

/// A duration of the settings file, such as `500ms`, `5s`, `7d`.
fn duration(key: &'static str, text: &str) -> Result<Duration> {
    humantime::parse_duration(text).map_err(|_| Error::Config {
        key,
        value: text.to_string(),
        expected: "a duration such as 500ms, 5s, 1m, 12h or 7d",
    })
}

/// The `[limits]` table of the settings file.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    #[serde(default, deserialize_with = "size")]
    pub max_record_bytes: Option<usize>,
    #[serde(default, deserialize_with = "size")]
    pub max_batch_bytes: Option<usize>,
    pub max_batch_records: Option<usize>,
    #[serde(default, deserialize_with = "size")]
    pub max_header_bytes: Option<usize>,
    pub max_producers: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub max_streams: Option<usize>,
    pub max_connections: Option<usize>,
    #[serde(default, deserialize_with = "size")]
    pub subscribe_bytes_per_second: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub max_subscribe_bytes_per_second: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub publish_bytes_per_second: Option<u64>,
    pub rate_window: Option<String>,
    pub max_lag: Option<String>,
    pub max_selectors: Option<usize>,
    pub max_calls_per_connection: Option<usize>,
    pub keepalive: Option<String>,
    pub handshake_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    #[serde(default, deserialize_with = "size")]
    pub max_pending_bytes: Option<usize>,
    pub pending_wait: Option<String>,
    pub catalog_changes_per_second: Option<u64>,
}

/// One `[[mirror]]` table of the settings file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMirror {
    pub upstream: String,
    pub streams: Vec<String>,
    pub from: Option<String>,
    /// For an https:// upstream: the CA that signs its certificate (the system's roots when
    /// absent), and this relay's client certificate and key.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The link's bearer token at the upstream; the settings file must then be private.
    pub token: Option<String>,
}

/// The settings file with every default, each explained: what `tapeline config` prints.
pub const DEFAULT_FILE: &str = r#"# tapeline settings (TOML). Start the broker with: tapeline serve --config tapeline.toml
# Every key is optional: a missing key takes the default shown here, and a flag given to
# `tapeline serve` (or its TAPELINE_... environment variable) wins over the file. Sizes are bytes
# or a string with a unit: "256MiB", "1.5GiB", "10MB".

# Address to listen on (port 0 picks a free one).
listen = "127.0.0.1:7411"
# The admin listener, plain HTTP: Prometheus metrics at /metrics, /healthz, /readyz, and a status
# page at / (off unless set; an address other than loopback needs insecure = true).
# admin_listen = "127.0.0.1:7412"
# Data directory.
data = "tapeline-data"
# true: keep the log in a temporary directory, removed at exit (data is then ignored).
volatile = false
# When a batch is flushed and acknowledged: "always" (ack after fsync), "interval=MS", "never".
fsync = "always"
# Silence after which a subscriber gets a heartbeat ("500ms", "5s", "1m").
heartbeat = "5s"
# Bytes of the storage engine's page cache.
cache_bytes = "256MiB"
# Chunk files are started afresh past this many bytes; retention frees disk a file at a time.
chunk_file_bytes = "16MiB"
# The most the data dir may take, in bytes; publishing is refused beyond it. No limit when absent.
# max_disk_bytes = "10GiB"
# Free disk space kept in reserve, in bytes; publishing is refused rather than eat into it.
min_free_disk_bytes = "64MiB"

[limits]
# Largest payload of one record, in bytes.
max_record_bytes = "4MiB"
# Largest sum of payloads and headers in one batch, in bytes.
max_batch_bytes = "16MiB"
# Most records in one batch.
max_batch_records = 65536
# Largest sum of header keys and values of one record, in bytes.
max_header_bytes = "16KiB"
# Idempotent producers remembered; beyond it the least recently used one is forgotten.
max_producers = 10000
# Subscriptions running at once, streams in the store, client connections at once: beyond them
# the call is refused with RESOURCE_EXHAUSTED naming the limit.
max_subscriptions = 10000
max_streams = 1000000
max_connections = 10000
# Quotas in bytes per second (payloads, headers and stream names), averaged over rate_window;
# nothing is dropped, delivery or reading waits. No limit when absent.
# The quota of a subscription that asks for none, and the most one may ask for:
# subscribe_bytes_per_second = "1MiB"
# max_subscribe_bytes_per_second = "100MiB"
# Each client connection's publishing (slowed through HTTP/2 flow control):
# publish_bytes_per_second = "10MiB"
rate_window = "5s"
# How far behind the live tail a subscription may fall before its slow_consumer policy
# (latest: skip ahead with a gap event; disconnect: end, to resume) applies.
max_lag = "10s"
# Streams or patterns one subscription may name.
max_selectors = 1024
# Calls open at once on one client connection; beyond it a call is refused naming this limit.
max_calls_per_connection = 256
# After this much silence on a connection the broker pings the peer over HTTP/2 and closes the
# connection if no answer comes within as long again, freeing what a vanished peer held.
keepalive = "20s"
# A new connection is closed unless its first call starts within this (TLS handshake, HTTP/2
# preface, the call's headers); a connection with no call for idle_timeout is closed.
handshake_timeout = "10s"
idle_timeout = "5m"
# Bytes of published batches received and not yet committed, across all clients: a batch that
# would pass it waits up to pending_wait for room, then is refused (RESOURCE_EXHAUSTED).
max_pending_bytes = "256MiB"
pending_wait = "10s"
# Stream creations, updates, seals and deletions by clients per second (bursts of a second's
# worth): each is a record on the writer that commits every publish, synced with the next group.
catalog_changes_per_second = 100

# What `Hello` tells clients older than a recommended version (the CLI prints it).
# [notice]
# recommended_version = "0.2.0"
# text = "tapeline 0.2 resumes across relays; please upgrade"
# url = "https://example.org/tapeline/releases"

# What is kept. A stream keeps records younger than max_age, at most max_bytes of payload and at
# most max_records records; whole chunks are removed from the front, never a stream's newest
# one. A subscriber whose range was removed gets a Truncated event and continues from the
# earliest record kept. Nothing is removed when no limit is set (the default), except in a
# --volatile store, which keeps at most 1 GiB of payload unless max_total_bytes says otherwise.
[retention]
# max_age = "7d"
# max_bytes = 10737418240
# max_records = 100000000
# Payload bytes the whole store keeps at most, oldest records first across streams.
# max_total_bytes = 53687091200
# How often the trimmer looks.
check_every = "1s"

# Limits for some streams (the first rule that matches wins; limits it leaves out come from
# [retention]).
# [[retention.rule]]
# streams = ["sensors/raw/**"]
# max_age = "1h"

# Relay mode: copy the streams matching `streams` from `upstream` (another tapeline), read-only
# here. `from` is where copying starts the first time: "beginning", "now" or "-DURATION" ("-10m").
# [[mirror]]
# upstream = "http://10.0.0.5:7411"
# streams = ["sensors/**"]
# from = "beginning"
# An https:// upstream: the CA that signs its certificate (default: the system's roots), this
# relay's client certificate, or a token (then this file must not be readable by others).
# ca = "upstream-ca.pem"
# cert = "relay.pem"
# key = "relay.key"
# token = "tlt_..."

# Listening on an address other than loopback needs TLS and authentication, or insecure = true.
# insecure = false

# TLS: the server's certificate chain and key (PEM), reloaded on SIGHUP without dropping
# connections; client_ca turns on mutual TLS (a certificate's common name is its principal).
# [tls]
# cert = "server.pem"
# key = "server.key"
# client_ca = "clients-ca.pem"

# Authentication and permissions. With a token file or a client CA, every call needs a principal:
# a bearer token's name (`tapeline token create NAME --tokens FILE`) or a client certificate's
# common name. A principal may do what its table grants, per stream pattern: publish, subscribe
# (read and list), admin (create, update, seal, delete, list).
# [auth]
# tokens = "tokens"
# [[auth.principal]]
# name = "sensor-1"
# publish = ["plant/sensor-1/**"]
# [[auth.principal]]
# name = "relay-east"
# subscribe = ["plant/**"]
"#;

/// A size in the settings: a number of bytes, or a string with a unit (`"256MiB"`, `"1.5GiB"`).
fn size<'de, D, T>(deserializer: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Size;
    impl serde::de::Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size: bytes (1048576) or a string with a unit (\"256MiB\", \"1.5GiB\", \"10MB\")")
        }
        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> std::result::Result<u64, E> {
            Ok(bytes)
        }
        fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> std::result::Result<u64, E> {
            u64::try_from(bytes).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(bytes), &self))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> std::result::Result<u64, E> {
            crate::types::parse_size(text).map_err(E::custom)
        }
    }
    struct Optional;
    impl<'de> serde::de::Visitor<'de> for Optional {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            Size.expecting(f)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Option<u64>, D::Error> {
            d.deserialize_any(Size).map(Some)
        }
        fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Option<u64>, E> {
            Ok(None)
        }
    }
    let Some(bytes) = deserializer.deserialize_option(Optional)? else { return Ok(None) };
    T::try_from(bytes).map(Some).map_err(|_| serde::de::Error::custom(format!("{bytes} bytes is too large")))
}

impl File {
    /// These settings with every key that `over` sets taken from `over` (its mirrors are added to
    /// these).
    pub fn overridden_by(self, over: File) -> File {
        File {
            listen: over.listen.or(self.listen),
            admin_listen: over.admin_listen.or(self.admin_listen),
            // A data dir given on the command line means a data dir, whatever the file says.
            volatile: if over.data.is_some() { Some(false) } else { over.volatile.or(self.volatile) },
            data: over.data.or(self.data),
            fsync: over.fsync.or(self.fsync),
            heartbeat: over.heartbeat.or(self.heartbeat),
            cache_bytes: over.cache_bytes.or(self.cache_bytes),
            chunk_file_bytes: over.chunk_file_bytes.or(self.chunk_file_bytes),
            max_disk_bytes: over.max_disk_bytes.or(self.max_disk_bytes),
            min_free_disk_bytes: over.min_free_disk_bytes.or(self.min_free_disk_bytes),
            limits: FileLimits {
                max_record_bytes: over.limits.max_record_bytes.or(self.limits.max_record_bytes),
                max_batch_bytes: over.limits.max_batch_bytes.or(self.limits.max_batch_bytes),
                max_batch_records: over.limits.max_batch_records.or(self.limits.max_batch_records),
                max_header_bytes: over.limits.max_header_bytes.or(self.limits.max_header_bytes),
                max_producers: over.limits.max_producers.or(self.limits.max_producers),
                max_subscriptions: over.limits.max_subscriptions.or(self.limits.max_subscriptions),
                max_streams: over.limits.max_streams.or(self.limits.max_streams),
                max_connections: over.limits.max_connections.or(self.limits.max_connections),
                subscribe_bytes_per_second: over
                    .limits
                    .subscribe_bytes_per_second
                    .or(self.limits.subscribe_bytes_per_second),
                max_subscribe_bytes_per_second: over
                    .limits
                    .max_subscribe_bytes_per_second
                    .or(self.limits.max_subscribe_bytes_per_second),
                publish_bytes_per_second: over
                    .limits
                    .publish_bytes_per_second
                    .or(self.limits.publish_bytes_per_second),
                rate_window: over.limits.rate_window.or(self.limits.rate_window),
                max_lag: over.limits.max_lag.or(self.limits.max_lag),
                max_selectors: over.limits.max_selectors.or(self.limits.max_selectors),
                max_calls_per_connection: over
                    .limits
                    .max_calls_per_connection
                    .or(self.limits.max_calls_per_connection),
                keepalive: over.limits.keepalive.or(self.limits.keepalive),
                handshake_timeout: over.limits.handshake_timeout.or(self.limits.handshake_timeout),
                idle_timeout: over.limits.idle_timeout.or(self.limits.idle_timeout),
                max_pending_bytes: over.limits.max_pending_bytes.or(self.limits.max_pending_bytes),
                pending_wait: over.limits.pending_wait.or(self.limits.pending_wait),
                catalog_changes_per_second: over
                    .limits
                    .catalog_changes_per_second
                    .or(self.limits.catalog_changes_per_second),
            },
            mirror: self.mirror.into_iter().chain(over.mirror).collect(),
            notice: over.notice.or(self.notice),
            retention: FileRetention {
                max_age: over.retention.max_age.or(self.retention.max_age),
                max_bytes: over.retention.max_bytes.or(self.retention.max_bytes),
                max_records: over.retention.max_records.or(self.retention.max_records),
                max_total_bytes: over.retention.max_total_bytes.or(self.retention.max_total_bytes),
                check_every: over.retention.check_every.or(self.retention.check_every),
                rule: self.retention.rule.into_iter().chain(over.retention.rule).collect(),
            },
            tls: over.tls.or(self.tls),
            auth: FileAuth {
                tokens: over.auth.tokens.or(self.auth.tokens),
                principal: self.auth.principal.into_iter().chain(over.auth.principal).collect(),
            },
            insecure: over.insecure.or(self.insecure),
        }
    }

    /// Reads and parses a settings file; a mistake is reported with its line, the value and what
    /// was expected.
    pub fn load(path: &std::path::Path) -> Result<File> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("cannot read the settings file {}", path.display()),
            source,
        })?;
        let file =
            File::parse(&text).map_err(|detail| Error::ConfigFile { path: path.to_path_buf(), detail })?;
        if file.mirror.iter().any(|m| m.token.is_some()) {
            check_private(path, "the settings file (it holds a relay's token)")?;
        }
        Ok(file)
    }

    /// Parses the text of a settings file.
    pub fn parse(text: &str) -> std::result::Result<File, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            // One line: where, the line as written (the key and its value), and what was wrong.
            let Some(span) = e.span().filter(|s| s.start <= text.len()) else {
                return e.message().to_string();
            };
            let number = text[..span.start].matches('\n').count() + 1;
            let line = text.lines().nth(number - 1).unwrap_or("").trim();
            format!("line {number}, `{line}`: {}", e.message())
        })
    }

    /// The broker settings the file gives, defaults elsewhere.
    pub fn config(&self) -> Result<Config> {
        let default = Config::default();
        let limits = Limits {
            max_record_bytes: self.limits.max_record_bytes.unwrap_or(default.limits.max_record_bytes),
            max_batch_bytes: self.limits.max_batch_bytes.unwrap_or(default.limits.max_batch_bytes),
            max_batch_records: self.limits.max_batch_records.unwrap_or(default.limits.max_batch_records),
            max_header_bytes: self.limits.max_header_bytes.unwrap_or(default.limits.max_header_bytes),
            max_producers: self.limits.max_producers.unwrap_or(default.limits.max_producers),
            max_subscriptions: self.limits.max_subscriptions.unwrap_or(default.limits.max_subscriptions),
            max_streams: self.limits.max_streams.unwrap_or(default.limits.max_streams),
            max_connections: self.limits.max_connections.unwrap_or(default.limits.max_connections),
            subscribe_bytes_per_second: self.limits.subscribe_bytes_per_second,
            max_subscribe_bytes_per_second: self.limits.max_subscribe_bytes_per_second,
            publish_bytes_per_second: self.limits.publish_bytes_per_second,
            rate_window: match &self.limits.rate_window {
                Some(text) => duration("limits.rate_window", text)?,
                None => default.limits.rate_window,
            },
            max_lag: match &self.limits.max_lag {
                Some(text) => duration("limits.max_lag", text)?,
                None => default.limits.max_lag,
            },
            max_selectors: self.limits.max_selectors.unwrap_or(default.limits.max_selectors),
            max_calls_per_connection: self
                .limits
                .max_calls_per_connection
                .unwrap_or(default.limits.max_calls_per_connection),
            keepalive: match &self.limits.keepalive {
                Some(text) => duration("limits.keepalive", text)?,
                None => default.limits.keepalive,
            },
            handshake_timeout: match &self.limits.handshake_timeout {
                Some(text) => duration("limits.handshake_timeout", text)?,
                None => default.limits.handshake_timeout,
            },
            idle_timeout: match &self.limits.idle_timeout {
                Some(text) => duration("limits.idle_timeout", text)?,
                None => default.limits.idle_timeout,
            },
            max_pending_bytes: self.limits.max_pending_bytes.unwrap_or(default.limits.max_pending_bytes),
            pending_wait: match &self.limits.pending_wait {
                Some(text) => duration("limits.pending_wait", text)?,
                None => default.limits.pending_wait,
            },
            catalog_changes_per_second: self
                .limits
                .catalog_changes_per_second
                .unwrap_or(default.limits.catalog_changes_per_second),
        };
        let heartbeat = match &self.heartbeat {
            Some(text) => duration("heartbeat", text)?,
            None => default.heartbeat,
        };
        let mut mirrors = Vec::with_capacity(self.mirror.len());
        for m in &self.mirror {
            mirrors.push(Mirror {
                upstream: m.upstream.clone(),
                patterns: m.streams.clone(),
                from: m.from.as_deref().unwrap_or("beginning").parse()?,
                credentials: crate::client::Credentials::from_files(
                    m.ca.as_deref(),
                    m.cert.as_deref(),
                    m.key.as_deref(),
                    m.token.clone(),
                )?,
            });
        }
        let data = match (self.volatile, &self.data) {
            (Some(true), _) => DataDir::Volatile,
            (_, Some(path)) => DataDir::Path(path.clone()),
            _ => default.data,
        };
        let r = &self.retention;
        let mut rules = Vec::with_capacity(r.rule.len());
        for rule in &r.rule {
            rules.push(Rule {
                streams: rule.streams.iter().map(|p| Pattern::parse(p)).collect::<Result<_, _>>()?,
                policy: Policy {
                    max_age: rule
                        .max_age
                        .as_deref()
                        .map(|a| duration("retention.rule.max_age", a))
                        .transpose()?,
                    max_bytes: rule.max_bytes,
                    max_records: rule.max_records,
                },
            });
        }
        let retention = Retention {
            default: Policy {
                max_age: r.max_age.as_deref().map(|a| duration("retention.max_age", a)).transpose()?,
                max_bytes: r.max_bytes,
                max_records: r.max_records,
            },
            rules,
            // A volatile store must never fill the disk.
            max_total_bytes: r
                .max_total_bytes
                .or((data == DataDir::Volatile).then_some(VOLATILE_MAX_TOTAL_BYTES)),
            check_every: match &r.check_every {
                Some(text) => duration("retention.check_every", text)?,
                None => CHECK_EVERY,
            },
            // Relay mode's copies are known to the broker, from the mirrors.
            copied: Vec::new(),
        };
        Ok(Config {
            data,
            fsync: self.fsync.as_deref().map(str::parse).transpose()?.unwrap_or(default.fsync),
            limits,
            heartbeat,
            cache_bytes: self.cache_bytes.unwrap_or(default.cache_bytes),
            chunk_file_bytes: self.chunk_file_bytes.unwrap_or(default.chunk_file_bytes),
            max_disk_bytes: self.max_disk_bytes,
            min_free_disk_bytes: self.min_free_disk_bytes.unwrap_or(default.min_free_disk_bytes),
            mirrors,
            notice: self.notice.clone(),
            retention,
            tls: self.tls.as_ref().map(|t| Tls {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: t.client_ca.clone(),
            }),
            access: self.access()?,
            insecure: self.insecure.unwrap_or(false),
        })
    }

    /// The `[auth]` table as grants by principal.
    fn access(&self) -> Result<Access> {
        let patterns =
            |list: &[String]| list.iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>();
        let mut principals = std::collections::HashMap::new();
        for p in &self.auth.principal {
            let grants = Grants {
                publish: patterns(&p.publish)?,
                subscribe: patterns(&p.subscribe)?,
                admin: patterns(&p.admin)?,
            };
            if principals.insert(p.name.clone(), grants).is_some() {
                return Err(Error::Config {
                    key: "auth.principal.name",
                    value: p.name.clone(),
                    expected: "one [[auth.principal]] table per name",
                });
            }
        }
        Ok(Access { tokens: self.auth.tokens.clone(), principals })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataDir;

    #[test]
    fn the_default_file_gives_the_defaults() {
        let file = File::parse(DEFAULT_FILE).unwrap();
        assert_eq!(file.listen.as_deref(), Some("127.0.0.1:7411"));
        let config = file.config().unwrap();
        let default = Config::default();
        assert_eq!(config.data, default.data);
        assert_eq!(config.fsync, default.fsync);
        assert_eq!(config.limits, default.limits);
        assert_eq!(config.heartbeat, default.heartbeat);
        assert_eq!(config.cache_bytes, default.cache_bytes);
        assert_eq!(config.chunk_file_bytes, default.chunk_file_bytes);
        assert_eq!(config.max_disk_bytes, default.max_disk_bytes);
        assert_eq!(config.min_free_disk_bytes, default.min_free_disk_bytes);
        assert!(config.mirrors.is_empty());
    }

    #[test]
    fn a_bad_file_names_the_key_the_value_and_what_was_expected() {
        let err = File::parse("[limits]\nmax_record_bytes = \"big\"\n").unwrap_err();
        assert!(
            err.contains("max_record_bytes") && err.contains("big") && err.contains("give bytes"),
            "{err}"
        );
        let err = File::parse("listen = \"x\"\nfsnyc = \"always\"\n").unwrap_err();
        assert!(err.contains("fsnyc") && err.contains("unknown field"), "{err}");
        let err = File::parse("fsync = \"sometimes\"").unwrap().config().unwrap_err().to_string();
        assert!(err.contains("fsync") && err.contains("sometimes") && err.contains("interval=MS"), "{err}");
        let err = File::parse("heartbeat = \"soon\"").unwrap().config().unwrap_err().to_string();
        assert!(err.contains("heartbeat") && err.contains("soon"), "{err}");
        let err = File::parse("chunk_file_bytes = 4096").unwrap().config().unwrap().validate();
        let err = err.unwrap_err().to_string();
        assert!(err.contains("chunk_file_bytes") && err.contains("4096") && err.contains("1 MiB"), "{err}");
        let file =
            File::parse("[[mirror]]\nupstream = \"http://a:1\"\nstreams = [\"s/**\"]\nfrom = \"now\"\n")
                .unwrap();
        let mirrors = file.config().unwrap().mirrors;
        assert_eq!(mirrors.len(), 1);
        assert_eq!(mirrors[0].from, crate::config::MirrorFrom::Now);
    }

    #[test]
    fn a_volatile_store_is_bounded_unless_told_otherwise() {
        let volatile = File::parse("volatile = true").unwrap().config().unwrap();
        assert_eq!(volatile.retention.max_total_bytes, Some(VOLATILE_MAX_TOTAL_BYTES));
        let chosen =
            File::parse("volatile = true\n[retention]\nmax_total_bytes = 1000\n").unwrap().config().unwrap();
        assert_eq!(chosen.retention.max_total_bytes, Some(1000));
        let durable = File::parse("data = \"d\"").unwrap().config().unwrap();
        assert_eq!(durable.retention.max_total_bytes, None);
        let err = File::parse("[retention]\nmax_age = \"soon\"\n").unwrap().config().unwrap_err().to_string();
        assert!(err.contains("retention.max_age") && err.contains("soon"), "{err}");
        let err = File::parse("[limits]\nmax_lag = \"0ms\"\nrate_window = \"1ms\"\n")
            .unwrap()
            .config()
            .unwrap()
            .validate();
        assert!(err.unwrap_err().to_string().contains("rate_window"));
    }

    #[test]
    fn sizes_are_bytes_or_a_number_with_a_unit() {
        let file = File::parse("max_disk_bytes = \"20GiB\"\nmin_free_disk_bytes = 1048576\n[limits]\nmax_record_bytes = \"8MiB\"\n").unwrap();
        let config = file.config().unwrap();
        assert_eq!(config.max_disk_bytes, Some(20 << 30));
        assert_eq!(config.min_free_disk_bytes, 1 << 20);
        assert_eq!(config.limits.max_record_bytes, 8 << 20);
        let err = File::parse("max_disk_bytes = \"20 parsecs\"\n").unwrap_err();
        assert!(err.contains("20 parsecs") && err.contains("256MiB"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = File::parse("listen = \"1.2.3.4:5\"\nvolatile = true\n[limits]\nmax_record_bytes = 10\nmax_batch_bytes = 100\n").unwrap();
        let flags = File {
            data: Some(PathBuf::from("d")),
            limits: FileLimits { max_record_bytes: Some(20), ..Default::default() },
            ..File::default()
        };
        let merged = file.overridden_by(flags);
        assert_eq!(merged.listen.as_deref(), Some("1.2.3.4:5"));
        let config = merged.config().unwrap();
        assert_eq!(config.data, DataDir::Path(PathBuf::from("d")));
        assert_eq!(config.limits.max_record_bytes, 20);
        assert_eq!(config.limits.max_batch_bytes, 100);
    }
}
