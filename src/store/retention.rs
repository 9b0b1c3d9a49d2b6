//! Planning what retention removes and what compaction moves: reads only, beside the writer,
//! which then carries a plan out (`writer.rs`: a `Trim` or `Move` commit record).
//!
//! Retention removes whole chunks from the front of a stream, never its last chunk (which keeps
//! the stream's last tick and counters across restarts). Compaction moves the few chunks left in
//! a mostly emptied file (`ChunkFiles::sparse`) to the active one, so the file can be deleted.

use super::chunk::{self, ChunkHeader};
use super::files::Location;
use super::Log;
use crate::error::{Error, Result};
use crate::types::{StreamId, StreamInfo, Tick};
use std::sync::Arc;

/// What retention keeps of one stream; a chunk is removed when any rule asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keep {
    /// Records with a tick below this one are removed.
    pub below: Option<Tick>,
    /// The stream keeps at most this many payload bytes / records.
    pub max_bytes: Option<u64>,
    pub max_records: Option<u64>,
    /// Past the first chunk, only chunks wholly below this tick are removed (the store-wide bound
    /// takes the oldest records first, across streams).
    pub only_below: Option<Tick>,
}

/// A removal planned by the trimmer: the first chunks of one stream, up to the chunk that starts
/// at `first`, which becomes the stream's first chunk.
#[derive(Debug, Clone)]
pub struct TrimPlan {
    pub stream: Arc<str>,
    pub id: StreamId,
    /// How many chunks go.
    pub chunks: usize,
    /// The first tick of the first chunk kept.
    pub first: Tick,
    /// The tick of the last record removed.
    pub through: Tick,
    /// The counters of the first chunk kept: what the stream held before it, since its creation.
    pub records_before: u64,
    pub bytes_before: u64,
}

/// A chunk compaction moves: its stream, first tick, and where it is now.
pub type Move = (StreamId, Tick, Location);

impl Log {
    /// Plans the removal of `stream`'s oldest chunks that `keep` asks for, at most `max_chunks`
    /// of them; `None` when nothing is to be removed. Reads only (the headers of the chunks it
    /// may remove and of the first one it keeps). Blocking.
    pub fn plan_trim(&self, stream: &StreamInfo, keep: &Keep, max_chunks: usize) -> Result<Option<TrimPlan>> {
        // Counters since the stream's creation: what it held before a chunk, and in all.
        let end_records = stream.trimmed.records + stream.records;
        let end_bytes = stream.trimmed.bytes + stream.bytes;
        let mut chunks = self.view.range(stream.id, Tick(0), Tick(u64::MAX));
        let Some(first) = chunks.next() else { return Ok(None) };
        let (mut key_now, mut at_now) = first.map(|(tick, p)| (tick, p.at))?;
        let mut head_now = self.header(stream, key_now, at_now)?;
        let mut removed = 0;
        let mut last_removed = None;
        // The last chunk is never removed: the loop only removes a chunk that has a successor.
        for next in chunks {
            let (key_next, at_next) = next.map(|(tick, p)| (tick, p.at))?;
            let head_next = self.header(stream, key_next, at_next)?;
            // Every record of a chunk lies below the first tick of the next one.
            let below = key_next;
            let old = keep.below.is_some_and(|b| below <= b);
            let over =
                keep.max_records.is_some_and(|m| end_records.saturating_sub(head_now.records_before) > m)
                    || keep.max_bytes.is_some_and(|m| end_bytes.saturating_sub(head_now.bytes_before) > m);
            let in_order = removed == 0 || keep.only_below.is_none_or(|b| below <= b);
            if !(old || over) || !in_order || removed >= max_chunks {
                break;
            }
            removed += 1;
            last_removed = Some(at_now);
            (key_now, at_now, head_now) = (key_next, at_next, head_next);
        }
        let Some(last_removed) = last_removed else { return Ok(None) };
        // The exact last tick removed, so that a reader resuming right after it is not told of a
        // removal; a damaged chunk falls back to the tick before the next chunk.
        let through = self
            .chunks
            .read(last_removed)
            .ok()
            .and_then(|value| chunk::decode(&value).ok())
            .and_then(|(_, records)| records.last().map(|r| r.tick))
            .unwrap_or(Tick(key_now.0.saturating_sub(1)));
        Ok(Some(TrimPlan {
            stream: stream.name.clone(),
            id: stream.id,
            chunks: removed,
            first: key_now,
            through,
            records_before: head_now.records_before,
            bytes_before: head_now.bytes_before,
        }))
    }

    /// The header of the chunk at `at`, stream `stream`'s chunk at tick `key`, reading only its
    /// first bytes.
    fn header(&self, stream: &StreamInfo, key: Tick, at: Location) -> Result<ChunkHeader> {
        let head = Location { len: at.len.min(chunk::MAX_HEADER_BYTES), ..at };
        self.chunks.read(head).and_then(|bytes| chunk::header(&bytes)).map_err(|_| Error::DataLoss {
            stream: stream.name.to_string(),
            from: key,
            to: key,
            detail: "a chunk header is unreadable; retention stops before it".into(),
        })
    }

    /// The chunks a sparse chunk file still holds (see `ChunkFiles::sparse`), at most `max`: what
    /// [`Log::compact`] moves. Scans every pointer, beside the writer. Blocking.
    pub fn plan_compaction(&self, max: usize) -> Result<Vec<Move>> {
        let Some(file) = self.chunks.sparse() else { return Ok(Vec::new()) };
        let mut moves = Vec::new();
        for entry in self.view.all() {
            let Ok((id, tick, pointer)) = entry else { continue };
            if pointer.at.file == file {
                moves.push((id, tick, pointer.at));
                if moves.len() >= max {
                    break;
                }
            }
        }
        if moves.is_empty() {
            // Counted as held, yet nothing points there: leave it to the next restart's count.
            self.chunks.give_up(file);
        }
        Ok(moves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DataDir, FsyncPolicy};
    use crate::types::NewRecord;
    use crate::types::StreamName;
    use bytes::Bytes;

    fn one(payload: &str) -> Vec<NewRecord> {
        vec![NewRecord {
            stream: StreamName::parse("s").unwrap(),
            tick: None,
            origin_time: None,
            headers: Vec::new(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            crc32: crc32fast::hash(payload.as_bytes()),
        }]
    }

    #[tokio::test]
    async fn a_plan_removes_the_oldest_chunks_the_limits_ask_for_and_never_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            Config { data: DataDir::Path(dir.path().into()), fsync: FsyncPolicy::Never, ..Config::default() };
        let log = Log::open(&config).unwrap();
        let mut ticks = Vec::new();
        for p in ["a", "bb", "ccc", "dddd"] {
            // One commit each: one chunk each.
            ticks.extend(log.append(one(p)).await.unwrap());
        }
        let stream = log.stream("s").unwrap();
        let keep_two = Keep { max_records: Some(2), ..Keep::default() };
        let plan = log.plan_trim(&stream, &keep_two, 100).unwrap().unwrap();
        assert_eq!((plan.chunks, plan.first, plan.through), (2, ticks[2], ticks[1]));
        assert_eq!((plan.records_before, plan.bytes_before), (2, 3));
        assert!(
            log.plan_trim(&stream, &keep_two, 1).unwrap().is_some_and(|p| p.chunks == 1),
            "at most max_chunks"
        );
        let everything_old = Keep { below: Some(Tick::MAX), ..Keep::default() };
        let plan = log.plan_trim(&stream, &everything_old, 100).unwrap().unwrap();
        assert_eq!(plan.first, ticks[3], "the last chunk stays");
        let in_order = Keep { max_records: Some(1), only_below: Some(ticks[2]), ..Keep::default() };
        assert_eq!(log.plan_trim(&stream, &in_order, 100).unwrap().unwrap().first, ticks[2]);
        assert!(log.plan_trim(&stream, &Keep::default(), 100).unwrap().is_none());
        log.trim(log.plan_trim(&stream, &keep_two, 100).unwrap().unwrap()).await.unwrap();
        let trimmed = log.stream("s").unwrap();
        assert_eq!(
            (trimmed.records, trimmed.first_tick, trimmed.trimmed.through),
            (2, Some(ticks[2]), Some(ticks[1]))
        );
        log.close().await.unwrap();
    }
}
