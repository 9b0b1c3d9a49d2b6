//! Settings of a broker, their defaults and their validation.

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: 4 << 20,
            max_batch_bytes: 16 << 20,
            max_batch_records: 65_536,
            max_header_bytes: 16 << 10,
            max_producers: 10_000,
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
        if self.max_record_bytes == 0 || self.max_record_bytes > u32::MAX as usize {
            return Err(Error::Config {
                key: "max_record_bytes",
                value: self.max_record_bytes.to_string(),
                expected: "a size from 1 byte to 4 GiB",
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
    /// The most the data dir may take on disk; publishing is refused beyond it.
    pub max_disk_bytes: Option<u64>,
    /// Free disk space kept in reserve; publishing is refused when a batch would eat into it.
    pub min_free_disk_bytes: u64,
    /// Relay mode: the upstreams whose streams this broker copies (read-only here).
    pub mirrors: Vec<crate::relay::Mirror>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: DataDir::Path(PathBuf::from("tapeline-data")),
            fsync: FsyncPolicy::Always,
            limits: Limits::default(),
            heartbeat: Duration::from_secs(5),
            cache_bytes: 256 << 20,
            max_disk_bytes: None,
            min_free_disk_bytes: 64 << 20,
            mirrors: Vec::new(),
        }
    }
}

impl Config {
    /// Checks the settings together.
    pub fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        if self.heartbeat.is_zero() || self.heartbeat > Duration::from_secs(86_400) {
            return Err(Error::Config {
                key: "heartbeat",
                value: format!("{:?}", self.heartbeat),
                expected: "a duration above 0 and at most 24 h",
            });
        }
        for mirror in &self.mirrors {
            mirror.validate()?;
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
