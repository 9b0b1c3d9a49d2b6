//! Retention: what the broker keeps of each stream, and the background trimmer that removes the
//! rest.
//!
//! A stream keeps records younger than `max_age`, at most `max_bytes` of payload and at most
//! `max_records` records; a store-wide `max_total_bytes` (the default bound of a `--volatile`
//! store) takes the oldest records first, across streams. Rules give patterns of streams their own
//! limits; the defaults apply to the rest.
//!
//! The trimmer wakes every `check_every`. It removes whole chunks from the front of a stream (so a
//! stream holds at most what a size limit allows, up to a chunk less, and records a little older
//! than `max_age` until the chunk after theirs starts past it); it never removes a stream's last
//! chunk. It plans each removal by reading, beside the writer, and hands the writer only the
//! deletion, at most [`SLICE`] chunks at a time, so publishers and subscribers are never held
//! behind a long trim. A subscriber whose range was removed is told (`Truncated`) and continues
//! from the earliest record still stored.

use crate::error::{Error, Result};
use crate::names::Pattern;
use crate::record::{StreamInfo, Tick};
use crate::store::{Keep, Log};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Chunks removed per writer command at most.
pub const SLICE: usize = 256;
/// The store-wide bound of a `--volatile` store when none is configured.
pub const VOLATILE_MAX_TOTAL_BYTES: u64 = 1 << 30;
/// How often the trimmer looks when not configured.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What one stream keeps; an unset limit does not limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Policy {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub max_records: Option<u64>,
}

impl Policy {
    /// This policy with every limit `over` sets taken from `over`.
    pub fn overridden_by(self, over: Policy) -> Policy {
        Policy {
            max_age: over.max_age.or(self.max_age),
            max_bytes: over.max_bytes.or(self.max_bytes),
            max_records: over.max_records.or(self.max_records),
        }
    }

    /// Whether it keeps everything.
    pub fn keeps_everything(&self) -> bool {
        *self == Policy::default()
    }

    /// Checks the limits (`key` names where they were set).
    pub fn validate(&self, key: &'static str) -> Result<()> {
        if self.max_age.is_some_and(|a| a < Duration::from_millis(1)) {
            return Err(Error::Config {
                key,
                value: "max_age = 0".into(),
                expected: "a duration of at least 1ms",
            });
        }
        if self.max_bytes == Some(0) || self.max_records == Some(0) {
            return Err(Error::Config {
                key,
                value: format!("{self:?}"),
                expected: "max_bytes and max_records of at least 1 (leave a limit out to keep everything)",
            });
        }
        Ok(())
    }

    /// What the trimmer keeps of a stream at `now`.
    fn keep(&self, now: Tick) -> Keep {
        Keep {
            below: self
                .max_age
                .map(|age| Tick(now.0.saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX)))),
            max_bytes: self.max_bytes,
            max_records: self.max_records,
            only_below: None,
        }
    }
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
        self.default.validate("retention")?;
        for rule in &self.rules {
            rule.policy.validate("retention.rule")?;
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

/// Starts the trimmer; it stops when `token` is cancelled. (It runs even when the server keeps
/// everything: a stream may have limits of its own.)
pub fn spawn(log: Arc<Log>, retention: Retention, token: CancellationToken, tasks: &TaskTracker) {
    tasks.spawn(async move {
        let mut ticks = tokio::time::interval(retention.check_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match pass(&log, &retention, &token).await {
                Ok(0) => {}
                Ok(chunks) => info!(chunks, "retention removed chunks"),
                // The next pass tries again; a failed write has stopped the log anyway.
                Err(err) => warn!(cause = %err, "retention pass failed"),
            }
        }
    });
}

/// One pass over every stream; returns the chunks removed.
pub async fn pass(log: &Arc<Log>, retention: &Retention, token: &CancellationToken) -> Result<usize> {
    let now = Tick::now();
    let mut removed = 0;
    for stream in log.streams() {
        let policy = retention.policy_of(&stream);
        if !policy.keeps_everything() {
            removed += trim(log, &stream, policy.keep(now), token).await?;
        }
    }
    if let Some(total) = retention.max_total_bytes {
        removed += bound_total(log, total, token).await?;
    }
    if removed > 0 {
        // Makes the removals durable.
        log.flush().await?;
    }
    // Deletions a full disk put off.
    log.release().await?;
    let moved = compact(log, token).await?;
    if moved > 0 {
        info!(chunks = moved, "chunks moved out of sparse chunk files");
    }
    Ok(removed)
}

/// Moves the chunks left in sparse chunk files to the active one, a slice at a time, so those
/// files can be deleted (a quiet stream's last chunk would otherwise keep a whole file).
async fn compact(log: &Arc<Log>, token: &CancellationToken) -> Result<usize> {
    let mut moved = 0;
    while !token.is_cancelled() {
        let reader = log.clone();
        let moves = tokio::task::spawn_blocking(move || reader.plan_compaction(SLICE))
            .await
            .map_err(|e| Error::Internal(format!("compaction task failed: {e}")))??;
        if moves.is_empty() {
            break;
        }
        let done = log.compact(moves).await?;
        moved += done;
        if done == 0 {
            break;
        }
    }
    Ok(moved)
}

/// Removes the oldest records across streams until the store holds at most `total` payload bytes
/// (or only streams' last chunks are left).
async fn bound_total(log: &Arc<Log>, total: u64, token: &CancellationToken) -> Result<usize> {
    let mut removed = 0;
    while !token.is_cancelled() {
        let mut streams: Vec<StreamInfo> =
            log.streams().into_iter().filter(|s| s.first_tick.is_some()).collect();
        let held: u64 = streams.iter().map(|s| s.bytes).sum();
        if held <= total {
            break;
        }
        streams.sort_by_key(|s| s.first_tick);
        let mut progress = 0;
        for (i, oldest) in streams.iter().enumerate() {
            // From the oldest stream, up to the next stream's first record (or the excess).
            let keep = Keep {
                max_bytes: Some(oldest.bytes.saturating_sub(held - total)),
                only_below: streams.get(i + 1).and_then(|s| s.first_tick),
                ..Keep::default()
            };
            progress = trim(log, oldest, keep, token).await?;
            if progress > 0 {
                break;
            }
        }
        if progress == 0 {
            break;
        }
        removed += progress;
    }
    Ok(removed)
}

/// Removes what `keep` asks of one stream, a slice at a time.
async fn trim(log: &Arc<Log>, stream: &StreamInfo, keep: Keep, token: &CancellationToken) -> Result<usize> {
    let mut removed = 0;
    while !token.is_cancelled() {
        let Some(info) = log.stream(&stream.name).filter(|s| s.id == stream.id) else { break };
        let reader = log.clone();
        let plan = tokio::task::spawn_blocking(move || reader.plan_trim(&info, &keep, SLICE))
            .await
            .map_err(|e| Error::Internal(format!("retention task failed: {e}")))??;
        let Some(plan) = plan else { break };
        let chunks = plan.chunks;
        log.trim(plan).await?;
        removed += chunks;
        if chunks < SLICE {
            break;
        }
    }
    Ok(removed)
}
