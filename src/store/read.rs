//! Reads: records of one stream in a tick range, found through the index and checked.
//!
//! Every read checks what it got before it hands out a record:
//! - the pointer's own CRC (a damaged index entry is never followed);
//! - the chunk's header and every record's CRC (`chunk.rs`);
//! - that the chunk is the one its key names: the stream id in its header and its first record's
//!   tick (a pointer to another chunk, valid as it may be, is caught);
//! - continuity with the previous chunk of the read: a chunk counts the records its stream held
//!   before it, so a chunk whose pointer was lost shows as records missing between two chunks.
//!
//! A failed check is `DATA_LOSS` naming the stream and the tick range that cannot be read; the
//! intact records before it are delivered first, and a reader resuming after the range gets the
//! rest. Never wrong data, never a silent gap.

use super::chunk::{self, ChunkError, Span};
use super::files::Location;
use super::index::Pointer;
use super::tail_cache::{self, Decoded};
use super::Log;
use crate::error::{Error, Result};
use crate::types::{Stored, StreamId, StreamInfo, Tick};
use bytes::Bytes;
use std::sync::Arc;
use tracing::error;

/// The result of one read: records in tick order, the chunks their payloads lie in, and whether
/// the read stopped at its bound.
pub struct ReadBatch {
    pub records: Vec<Stored>,
    /// The chunk values the records point into (`Stored::chunk` indexes this).
    pub chunks: Vec<Bytes>,
    /// `false` when the read stopped because of its record limit: there may be more.
    pub complete: bool,
    /// Retention removed part of the range asked for.
    pub truncated: Option<Truncation>,
}

/// Part of a read's range was removed by retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    /// The first tick the read asked for (0: the beginning).
    pub requested: Tick,
    /// Every record up to this tick is gone; the reader continues after it.
    pub through: Tick,
    /// The stream's earliest record still stored.
    pub earliest: Option<Tick>,
}

/// The previous chunk of a read, for the continuity check.
#[derive(Debug, Clone, Copy)]
struct Previous {
    /// Records the stream held before the next chunk.
    records: u64,
    last: Tick,
}

impl Log {
    /// Reads records of one stream with `after < tick <= upto`, in tick order, whole chunks at a
    /// time, stopping after the chunk that reaches `max_records` records or `max_bytes` bytes of
    /// chunks. Everything read is checked (see
    /// the module's doc); a failed check is an `Error::DataLoss` naming its tick range. When
    /// retention removed part of the range, the batch says so (`truncated`) and holds only
    /// records after the removed ones. Blocking.
    pub fn read(
        &self,
        stream: &StreamInfo,
        after: Option<Tick>,
        upto: Tick,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch> {
        let read = self.read_chunks(stream, after, upto, max_records, max_bytes);
        // Looked up after the scan: a removal is published before its pointers are removed, so a
        // scan that missed a removed chunk finds the mark here.
        let (through, earliest) = match self.read_shared().streams.get(&stream.name) {
            Some(now) if now.id == stream.id => (now.trimmed.through, now.first_tick),
            _ => (None, None),
        };
        let mut batch = match read {
            // Chunks retention removed while the scan read them: a removal, not a loss.
            Err(Error::DataLoss { to, .. }) if through.is_some_and(|through| to <= through) => {
                ReadBatch { records: Vec::new(), chunks: Vec::new(), complete: false, truncated: None }
            }
            read => read?,
        };
        let requested = after.map_or(Tick(0), |t| Tick(t.0.saturating_add(1)));
        if let Some(through) = through.filter(|&through| requested <= through && requested <= upto) {
            batch.records.retain(|r| r.tick > through);
            batch.truncated = Some(Truncation { requested, through, earliest });
        }
        Ok(batch)
    }

    fn read_chunks(
        &self,
        stream: &StreamInfo,
        after: Option<Tick>,
        upto: Tick,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch> {
        let id = stream.id;
        let mut bytes = 0;
        let mut batch =
            ReadBatch { records: Vec::new(), chunks: Vec::new(), complete: true, truncated: None };
        let first_wanted = match after {
            None => Tick(0),
            Some(t) if t >= upto => return Ok(batch),
            Some(t) => Tick(t.0 + 1),
        };
        // The chunk that holds `first_wanted` may start before it: begin at the last chunk that
        // starts at or before it.
        let start = match self.view.at_or_before(id, first_wanted) {
            Ok(Some((tick, _))) => tick,
            Ok(None) => first_wanted,
            Err(err) => return Err(self.unreadable(stream, first_wanted, first_wanted, err.to_string())),
        };
        let mut previous: Option<Previous> = None;
        for entry in self.view.range(id, start, upto) {
            let (key, pointer) = match entry {
                Ok(entry) => entry,
                Err(Error::DamagedPointer { tick, detail, .. }) => {
                    let detail = format!("{detail}: the index (rebuilt when DATA_DIR/index is deleted with the broker stopped)");
                    return self.stop_at(batch, stream, first_wanted, tick, detail);
                }
                Err(err) => return Err(self.unreadable(stream, first_wanted, upto, err.to_string())),
            };
            let index = batch.chunks.len() as u32;
            let before = batch.records.len();
            let (value, span) = match self.tail.get(&pointer.at) {
                // The newest chunks: read and verified once for every subscriber at the tail.
                Some(kept) => {
                    kept.copy_into(index, first_wanted, upto, &mut batch.records);
                    (kept.value.clone(), kept.span)
                }
                None => match self.load(id, key, pointer) {
                    // Removed by retention since the scan read its key: `read` reports the removal,
                    // and the next chunk does not follow the previous one.
                    Ok(None) => {
                        previous = None;
                        continue;
                    }
                    Ok(Some(value)) => {
                        match chunk::decode_into(&value, index, first_wanted, upto, &mut batch.records) {
                            Ok(span) => {
                                self.keep_if_recent(
                                    stream,
                                    pointer.at,
                                    &value,
                                    &batch.records[before..],
                                    span,
                                );
                                (value, span)
                            }
                            Err(err) => {
                                batch.records.truncate(before);
                                return self.stop_at(batch, stream, first_wanted, key, err.detail);
                            }
                        }
                    }
                    Err(err) => return self.stop_at(batch, stream, first_wanted, key, err.detail),
                },
            };
            if let Err(detail) = check(id, key, &span) {
                batch.records.truncate(before);
                return self.stop_at(batch, stream, first_wanted, key, detail);
            }
            if let Some(prev) = previous {
                if span.head.records_before != prev.records {
                    batch.records.truncate(before);
                    let missing = span.head.records_before.abs_diff(prev.records);
                    let detail = format!(
                        "{missing} records are missing between two chunks (the chunk at tick {key} follows {} records of the stream but counts {} before it): a chunk's pointer was lost",
                        prev.records, span.head.records_before
                    );
                    let to = Tick(key.0.saturating_sub(1));
                    return self.lost(batch, stream, Tick(prev.last.0 + 1).max(first_wanted), to, detail);
                }
            }
            previous = Some(Previous {
                records: span.head.records_before + u64::from(span.head.count),
                last: span.last.unwrap_or(key),
            });
            // Only chunks that gave records count: the first chunk may hold only records before
            // the range, and a read must not stop before its first record.
            if batch.records.len() > before {
                bytes += value.len();
            }
            batch.chunks.push(value);
            if batch.records.last().is_some_and(|r| r.tick >= upto) {
                return Ok(batch);
            }
            if batch.records.len() >= max_records || bytes >= max_bytes {
                batch.complete = false;
                return Ok(batch);
            }
        }
        Ok(batch)
    }

    /// The bytes of the chunk `pointer` names under stream `id`'s key `key`. When they cannot be
    /// read, looks again: retention may have removed the chunk since (`None`), or compaction
    /// moved it, and the file it was in may be gone.
    fn load(
        &self,
        id: StreamId,
        key: Tick,
        pointer: Pointer,
    ) -> std::result::Result<Option<Bytes>, ChunkError> {
        match self.chunks.read(pointer.at) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) => match self.view.get(id, key) {
                Ok(None) => Ok(None),
                Ok(Some(now)) if now.at != pointer.at => self.chunks.read(now.at).map(Some),
                _ => Err(err),
            },
        }
    }

    /// Keeps a whole chunk near its stream's tail in the tail cache: it is what the other
    /// subscribers following the stream read next, even those a little behind.
    fn keep_if_recent(&self, stream: &StreamInfo, at: Location, value: &Bytes, read: &[Stored], span: Span) {
        let whole = span.head.count as usize == read.len();
        let recent = match (read.last(), stream.last_tick) {
            (Some(r), Some(last)) => r.tick.0.saturating_add(tail_cache::RECENT.0) >= last.0,
            _ => false,
        };
        if whole && recent {
            let kept = read.iter().map(|r| Stored { chunk: 0, ..r.clone() }).collect();
            self.tail.insert(at, Arc::new(Decoded { value: value.clone(), records: kept, span }));
        }
    }

    /// Ends a read at an unreadable chunk under key `key` (0: not known): the records before it
    /// are delivered first (the next read starts at the damage and reports it); with none, the
    /// damage is the answer, from the chunk's key to the next chunk.
    fn stop_at(
        &self,
        batch: ReadBatch,
        stream: &StreamInfo,
        first_wanted: Tick,
        key: Tick,
        detail: String,
    ) -> Result<ReadBatch> {
        let from = key.max(first_wanted);
        let to = match self.view.after(stream.id, key) {
            Ok(Some((next, _))) => Tick(next.0.saturating_sub(1)),
            _ => stream.last_tick.unwrap_or(from).max(from),
        };
        self.lost(batch, stream, from, to, detail)
    }

    /// Ends a read at the lost range `from..=to`, delivering the records before it first.
    fn lost(
        &self,
        mut batch: ReadBatch,
        stream: &StreamInfo,
        from: Tick,
        to: Tick,
        detail: String,
    ) -> Result<ReadBatch> {
        if !batch.records.is_empty() {
            batch.complete = false;
            return Ok(batch);
        }
        Err(self.unreadable(stream, from, to, detail))
    }

    fn unreadable(&self, stream: &StreamInfo, from: Tick, to: Tick, detail: String) -> Error {
        error!(stream = %stream.name, %from, %to, %detail, "stored data cannot be read");
        Error::DataLoss { stream: stream.name.to_string(), from, to, detail }
    }

    /// How many records `stream` has had with a tick at or below `tick` since it was created
    /// (those retention removed included): the running total of the chunk holding `tick` plus
    /// its records up to it. Reads one chunk. Blocking.
    pub fn count_through(&self, stream: &StreamInfo, tick: Option<Tick>) -> Result<u64> {
        let Some(tick) = tick else { return Ok(0) };
        let Some((key, pointer)) = self.view.at_or_before(stream.id, tick)? else {
            // Before the first chunk kept: only removed records lie there.
            return Ok(stream.trimmed.records);
        };
        let value = match self.load(stream.id, key, pointer) {
            Ok(Some(value)) => Ok(value),
            // Retention removed that chunk meanwhile: every record up to `tick` is gone, and the
            // stream's removed count now includes them (approximately: the chunk's later ones too).
            Ok(None) => {
                let now = self.read_shared().streams.get(&stream.name).map(|s| s.trimmed.records);
                return Ok(now.unwrap_or(stream.trimmed.records));
            }
            Err(err) => Err(err),
        };
        let (head, records) = value.and_then(|v| chunk::decode(&v)).map_err(|err| Error::DataLoss {
            stream: stream.name.to_string(),
            from: key,
            to: tick,
            detail: err.detail,
        })?;
        Ok(head.records_before + records.iter().filter(|r| r.tick <= tick).count() as u64)
    }
}

/// Whether a chunk read under stream `id`'s key `key` is that chunk.
fn check(id: StreamId, key: Tick, span: &Span) -> std::result::Result<(), String> {
    if span.head.stream != Some(id) {
        let found = span.head.stream.map_or("no stream id".to_string(), |s| format!("stream #{}", s.0));
        return Err(format!("the index points stream #{}'s chunk at tick {key} to a chunk of {found}", id.0));
    }
    if span.first != Some(key) {
        let found = span.first.map_or("no record".to_string(), |t| format!("tick {t}"));
        return Err(format!("the index points the chunk at tick {key} to a chunk starting at {found}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::chunk::ChunkHeader;

    fn span(stream: Option<u32>, first: u64) -> Span {
        let head = ChunkHeader { stream: stream.map(StreamId), count: 1, ..ChunkHeader::default() };
        Span { head, first: Some(Tick(first)), last: Some(Tick(first)) }
    }

    #[test]
    fn a_chunk_passes_only_under_the_key_that_names_it() {
        assert!(check(StreamId(1), Tick(10), &span(Some(1), 10)).is_ok());
        let other_stream = check(StreamId(1), Tick(10), &span(Some(2), 10)).unwrap_err();
        assert!(other_stream.contains("to a chunk of stream #2"), "{other_stream}");
        let other_tick = check(StreamId(1), Tick(10), &span(Some(1), 11)).unwrap_err();
        assert!(other_tick.contains("to a chunk starting at tick 11"), "{other_tick}");
        let unnamed = check(StreamId(1), Tick(10), &span(None, 10)).unwrap_err();
        assert!(unnamed.contains("no stream id"), "{unnamed}");
    }
}
