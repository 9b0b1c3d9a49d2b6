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
    /// Relay mode: the streams copied from an upstream. A copy keeps its origin's own limits,
    /// and a rule of this broker that matches it overrides them.
    pub copied: Vec<Pattern>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            default: Policy::default(),
            rules: Vec::new(),
            max_total_bytes: None,
            check_every: CHECK_EVERY,
            copied: Vec::new(),
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

    /// The server's policy for `stream`, with the stream's own limits over it; for a relay's copy,
    /// the stream's own limits over the defaults and a matching rule over both.
    pub fn policy_of(&self, stream: &StreamInfo) -> Policy {
        let rule = self.rules.iter().find(|rule| rule.streams.iter().any(|p| p.matches(&stream.name)));
        if self.copied.iter().any(|p| p.matches(&stream.name)) {
            let origin = self.default.overridden_by(stream.meta.retention);
            return rule.map_or(origin, |rule| origin.overridden_by(rule.policy));
        }
        let server = match rule {
            Some(rule) => self.default.overridden_by(rule.policy),
            None => self.default,
        };
        server.overridden_by(stream.meta.retention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Recent, StreamId, StreamMeta, Tick, Trimmed};
    use std::sync::Arc;

    fn stream(name: &str, own: Policy) -> StreamInfo {
        StreamInfo {
            name: Arc::from(name),
            id: StreamId(0),
            records: 0,
            bytes: 0,
            first_tick: None,
            last_tick: None,
            created_tick: Tick(1),
            trimmed: Trimmed::default(),
            meta: Arc::new(StreamMeta { retention: own, ..StreamMeta::default() }),
            recent: Recent::default(),
        }
    }

    #[test]
    fn a_copy_keeps_its_origins_limits_unless_a_rule_overrides_them() {
        let hour = Policy { max_age: Some(Duration::from_secs(3600)), ..Policy::default() };
        let second = Policy { max_age: Some(Duration::from_secs(1)), ..Policy::default() };
        let retention = Retention {
            default: Policy { max_bytes: Some(100), ..Policy::default() },
            rules: vec![Rule { streams: vec![Pattern::parse("r/keep/**").unwrap()], policy: second }],
            copied: vec![Pattern::parse("r/**").unwrap()],
            ..Retention::default()
        };
        // A copy: the origin's own limit, the defaults where it sets none.
        assert_eq!(retention.policy_of(&stream("r/a", hour)), Policy { max_bytes: Some(100), ..hour });
        // A copy a rule of this broker matches: the rule wins over the origin's limit.
        assert_eq!(retention.policy_of(&stream("r/keep/a", hour)), Policy { max_bytes: Some(100), ..second });
        // A stream of this broker: its own limit wins over the rule.
        let local = Retention { copied: Vec::new(), ..retention };
        assert_eq!(local.policy_of(&stream("r/keep/a", hour)), Policy { max_bytes: Some(100), ..hour });
    }
}
