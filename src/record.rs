//! Ticks, stream ids and records: the values that cross module borders.

use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, assigned by the origin broker. Unique on an origin and
/// strictly increasing within a stream. 0 means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tick(pub u64);

impl Tick {
    /// The largest tick a record may carry: ticks must fit an `i64` so every language can hold them.
    pub const MAX: Tick = Tick(i64::MAX as u64);

    /// The wall clock as a tick.
    pub fn now() -> Tick {
        let ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Tick(ns.min(Tick::MAX.0 as u128) as u64)
    }
}

impl fmt::Display for Tick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The storage's short name for a stream, used in record keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u32);

/// A record as the broker stores and delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Stream name, shared by all records of the stream.
    pub stream: Arc<str>,
    pub tick: Tick,
    /// The producer's clock, if it gave one.
    pub origin_time: Option<u64>,
    /// Small string map; sorted by key so that equal maps encode equally.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    /// CRC32 of the payload.
    pub crc32: u32,
}

/// A record as a log read returns it: verified, with its payload located in its chunk rather than
/// cut out of it. A read is always of one stream and hands out whole chunks, so neither the stream
/// name nor a payload handle is repeated per record; the reader attaches both when it delivers
/// (`named`), and only for what it delivers.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub tick: Tick,
    /// The producer's clock, if it gave one.
    pub origin_time: Option<u64>,
    /// Small string map, sorted by key.
    pub headers: Vec<(String, String)>,
    /// Which chunk of the read holds the payload.
    pub chunk: u32,
    /// Where the payload lies in that chunk.
    pub payload: std::ops::Range<usize>,
    /// CRC32 of the payload.
    pub crc32: u32,
}

impl Stored {
    /// The record with its stream's name and its payload (a slice of its chunk among the read's
    /// `chunks`, not a copy), as delivered to subscribers.
    pub fn named(self, stream: &Arc<str>, chunks: &[Bytes]) -> Record {
        Record {
            stream: stream.clone(),
            tick: self.tick,
            origin_time: self.origin_time,
            headers: self.headers,
            payload: chunks[self.chunk as usize].slice(self.payload),
            crc32: self.crc32,
        }
    }
}

/// A record as a publisher hands it in, before the broker assigned its tick.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub stream: crate::names::StreamName,
    /// An explicit tick (importing a recorded session), or `None` to let the broker assign one.
    pub tick: Option<Tick>,
    pub origin_time: Option<u64>,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    /// CRC32 of the payload, computed once when the batch was checked.
    pub crc32: u32,
}

/// What the catalog knows about a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    pub name: Arc<str>,
    pub id: StreamId,
    /// Records and payload bytes stored.
    pub records: u64,
    pub bytes: u64,
    /// `None` while the stream is empty.
    pub first_tick: Option<Tick>,
    pub last_tick: Option<Tick>,
    /// The broker's tick when the stream was created.
    pub created_tick: Tick,
    /// What retention removed from the front of the stream.
    pub trimmed: Trimmed,
}

/// What retention removed from the front of a stream, counted since the stream was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmed {
    /// Records and payload bytes removed.
    pub records: u64,
    pub bytes: u64,
    /// The tick of the last record removed: a read that asks for anything at or below it is told
    /// that part of its range is gone (`Truncated`).
    pub through: Option<Tick>,
}
