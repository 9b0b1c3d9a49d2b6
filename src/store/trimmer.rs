//! The trimmer: the background task that removes what retention does not keep.
//!
//! It wakes every `check_every`. It removes whole chunks from the front of a stream (so a stream
//! holds at most what a size limit allows, up to a chunk less, and records a little older than
//! `max_age` until the chunk after theirs starts past it); it never removes a stream's last chunk.
//! It plans each removal by reading, beside the writer, and hands the writer only the deletion, at
//! most [`SLICE`] chunks at a time, so publishers and subscribers are never held behind a long
//! trim. A subscriber whose range was removed is told (`Truncated`) and continues from the earliest
//! record still stored.

use super::{Keep, Log};
use crate::config::Retention;
use crate::error::{Error, Result};
use crate::types::{Policy, StreamInfo, Tick};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Chunks removed per writer command at most.
pub const SLICE: usize = 256;

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
                // A publisher would pass the store-wide bound: a pass now, not at the next tick.
                _ = log.room().wanted() => {}
            }
            match pass(&log, &retention, &token).await {
                Ok(0) => {}
                Ok(chunks) => info!(chunks, "retention removed chunks"),
                // The next pass tries again; a failed write has stopped the log anyway.
                Err(err) => warn!(cause = %err, "retention pass failed"),
            }
            log.room().passed();
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
            removed += trim(log, &stream, keep(&policy, now), token).await?;
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

/// What the trimmer keeps of a stream under `policy` at `now`.
fn keep(policy: &Policy, now: Tick) -> Keep {
    Keep {
        below: policy.max_age.map(|age| now.minus(age)),
        max_bytes: policy.max_bytes,
        max_records: policy.max_records,
        only_below: None,
    }
}
