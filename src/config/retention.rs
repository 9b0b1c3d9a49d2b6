//! Retention settings: the server's default policy, per-pattern rules and the store-wide bound,
//! and the checks of every policy (the server's and a stream's own).
//!
//! A stream keeps records younger than `max_age`, at most `max_bytes` of payload and at most
//! `max_records` records; a store-wide `max_total_bytes` (the default bound of a `--volatile`
//! store) takes the oldest records first, across streams. Rules give patterns of streams their own
//! limits; the defaults apply to the rest. The store's trimmer applies them.

use crate::error::{Error, Result};
use crate::types::{Pattern, Policy, StreamInfo};
use std::time::Duration;

/// The store-wide bound of a `--volatile` store when none is configured.
pub const VOLATILE_MAX_TOTAL_BYTES: u64 = 1 << 30;
/// How often the trimmer looks when not configured.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Checks a policy's limits (`key` names where they were set).
pub fn validate_policy(policy: &Policy, key: &'static str) -> Result<()> {
    if policy.max_age.is_some_and(|a| a < Duration::from_millis(1)) {
        return Err(Error::Config {
            key,
            value: "max_age = 0".into(),
            expected: "a duration of at least 1ms",
        });
    }
    if policy.max_bytes == Some(0) || policy.max_records == Some(0) {
        return Err(Error::Config {
            key,
            value: format!("{policy:?}"),
            expected: "max_bytes and max_records of at least 1 (leave a limit out to keep everything)",
        });
    }
    Ok(())
}

/// Limits for the streams matching any of `streams` (parsed when the settings are read).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub streams: Vec<Pattern>,
    pub policy: Policy,
}

/// Every retention setting of a broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// For streams no rule matches, and the limits a matching rule leaves unset.
    pub default: Policy,
    /// The first rule whose patterns match a stream applies to it.
    pub rules: Vec<Rule>,
    /// Payload bytes the whole store keeps at most.
    pub max_total_bytes: Option<u64>,
    pub check_every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            default: Policy::default(),
            rules: Vec::new(),
            max_total_bytes: None,
            check_every: CHECK_EVERY,
        }
    }
}

impl Retention {
    /// Checks every limit and pattern.
    pub fn validate(&self) -> Result<()> {
        validate_policy(&self.default, "retention")?;
        for rule in &self.rules {
            validate_policy(&rule.policy, "retention.rule")?;
            if rule.streams.is_empty() {
                return Err(Error::Config {
                    key: "retention.rule.streams",
                    value: "[]".into(),
                    expected: "at least one stream name or pattern",
                });
            }
        }
        if self.max_total_bytes == Some(0) {
            return Err(Error::Config {
                key: "retention.max_total_bytes",
                value: "0".into(),
                expected: "at least 1 (leave it out to keep everything)",
            });
        }
        if self.check_every < Duration::from_millis(10) || self.check_every > Duration::from_secs(3600) {
            return Err(Error::Config {
                key: "retention.check_every",
                value: format!("{:?}", self.check_every),
                expected: "a duration from 10ms to 1h",
            });
        }
        Ok(())
    }

    /// The server's policy for `stream`, with the stream's own limits over it.
    pub fn policy_of(&self, stream: &StreamInfo) -> Policy {
        let rule = self.rules.iter().find(|rule| rule.streams.iter().any(|p| p.matches(&stream.name)));
        let server = match rule {
            Some(rule) => self.default.overridden_by(rule.policy),
            None => self.default,
        };
        server.overridden_by(stream.meta.retention)
    }
}
