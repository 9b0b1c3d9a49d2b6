//! The newest chunks, read once and shared by every subscriber at the live tail.
//!
//! Why: each commit writes a new chunk per stream, and every subscriber following that stream
//! reads it: with 100 subscribers, the same few kilobytes were read from the chunk file,
//! CRC-checked and decoded 100 times. A chunk read whole whose last record is at most [`RECENT`]
//! older than its stream's newest is kept here, verified and decoded, and the other readers take
//! its records from here. (A replay of older records does not churn it.)
//!
//! Invariants:
//! - Keyed by the chunk's location (file, offset, length). Chunk files are append-only and a
//!   file's name is never reused, so a location always names the same bytes; a chunk moved by
//!   compaction has a new pointer. Removal needs no invalidation: readers find chunks through
//!   the index first and filter what retention removed after the read (`Log::read`).
//! - Only chunks that decoded whole and verified are kept.
//! - Bounded: at most [`MAX_CHUNKS`] chunks and [`MAX_BYTES`] of chunk bytes and decoded
//!   records together (a chunk of tiny records decodes to more than its own size); the oldest
//!   entry goes first.

use super::chunk::Span;
use super::files::Location;
use crate::types::{Stored, Tick};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// How far behind its stream's newest record a chunk may end and still be kept: subscribers
/// that lag by up to this much share it too.
pub const RECENT: Tick = Tick(10_000_000_000);
/// Chunks kept, at most: with a commit a millisecond, about four seconds of one stream.
const MAX_CHUNKS: usize = 4096;
/// Bytes kept (see [`Decoded::size`]), at most.
const MAX_BYTES: usize = 16 << 20;

/// A chunk's bytes and every record in it (their `chunk` index is 0).
#[derive(Debug)]
pub struct Decoded {
    pub value: Bytes,
    pub records: Vec<Stored>,
    /// Its header and first and last ticks, which every read checks.
    pub span: Span,
}

impl Decoded {
    /// What it holds in memory: its bytes and its records (their headers are in `value` too,
    /// and are counted there once).
    pub fn size(&self) -> usize {
        self.value.len() + self.records.len() * std::mem::size_of::<Stored>()
    }

    /// Appends the records with `from <= tick <= upto` to `out`, as records of the read's chunk
    /// `index`.
    pub fn copy_into(&self, index: u32, from: Tick, upto: Tick, out: &mut Vec<Stored>) {
        let start = self.records.partition_point(|r| r.tick < from);
        let end = self.records.partition_point(|r| r.tick <= upto).max(start);
        out.reserve(end - start);
        for r in &self.records[start..end] {
            out.push(Stored { chunk: index, ..r.clone() });
        }
    }
}

/// The cache; shared by the log's readers.
#[derive(Debug, Default)]
pub struct TailCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    chunks: HashMap<Location, Arc<Decoded>>,
    /// Locations in the order they were kept.
    order: VecDeque<Location>,
    bytes: usize,
}

impl TailCache {
    /// The chunk at `at`, if it is kept.
    pub fn get(&self, at: &Location) -> Option<Arc<Decoded>> {
        self.lock().chunks.get(at).cloned()
    }

    /// Keeps a verified chunk, making room by letting the oldest go.
    pub fn insert(&self, at: Location, chunk: Arc<Decoded>) {
        let mut inner = self.lock();
        let size = chunk.size();
        if inner.chunks.contains_key(&at) || size > MAX_BYTES {
            return;
        }
        while inner.order.len() >= MAX_CHUNKS || inner.bytes + size > MAX_BYTES {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(gone) = inner.chunks.remove(&oldest) {
                inner.bytes -= gone.size();
            }
        }
        inner.bytes += size;
        inner.order.push_back(at);
        inner.chunks.insert(at, chunk);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves a consistent map: it is only ever
        // changed by the few lines of `insert`.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Location {
        Location { file: 0, offset: n, len: 1 }
    }

    fn chunk(first: u64, n: u64, bytes: usize) -> Arc<Decoded> {
        let records = (first..first + n)
            .map(|t| Stored {
                tick: Tick(t),
                origin_time: None,
                headers: Vec::new(),
                chunk: 0,
                payload: 0..0,
                crc32: 0,
            })
            .collect();
        Arc::new(Decoded { value: Bytes::from(vec![0u8; bytes]), records, span: Span::default() })
    }

    #[test]
    fn a_range_of_a_kept_chunk_is_copied_with_the_read_s_chunk_index() {
        let cache = TailCache::default();
        cache.insert(at(1), chunk(10, 5, 100));
        let mut out = Vec::new();
        cache.get(&at(1)).expect("kept").copy_into(3, Tick(11), Tick(13), &mut out);
        assert_eq!(out.iter().map(|r| r.tick.0).collect::<Vec<_>>(), vec![11, 12, 13]);
        assert!(out.iter().all(|r| r.chunk == 3));
        assert!(cache.get(&at(2)).is_none());
    }

    #[test]
    fn the_oldest_chunks_go_first_when_bytes_or_count_run_out() {
        let cache = TailCache::default();
        let half = MAX_BYTES / 2 - 1024;
        cache.insert(at(10), chunk(1, 1, half));
        cache.insert(at(11), chunk(2, 1, half));
        cache.insert(at(12), chunk(3, 1, half));
        assert!(cache.get(&at(10)).is_none(), "the oldest went to make room");
        assert!(cache.get(&at(11)).is_some() && cache.get(&at(12)).is_some());
        // A chunk of tiny records: few bytes, but its decoded records take half the room.
        let records = (MAX_BYTES / 2) / std::mem::size_of::<Stored>();
        cache.insert(at(13), chunk(4, records as u64, 1));
        assert!(cache.get(&at(11)).is_none(), "its decoded records count too");
        assert!(cache.get(&at(12)).is_some() && cache.get(&at(13)).is_some());
        for i in 0..MAX_CHUNKS + 1 {
            cache.insert(at(100 + i as u64), chunk(10, 1, 1));
        }
        let inner = cache.lock();
        assert_eq!(inner.chunks.len(), MAX_CHUNKS);
        assert_eq!(inner.order.len(), MAX_CHUNKS);
        assert!(inner.chunks.contains_key(&at(100 + MAX_CHUNKS as u64)));
        assert!(inner.bytes <= MAX_BYTES);
    }
}
