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

    /// `span` before this tick (0 at the earliest).
    pub fn minus(self, span: std::time::Duration) -> Tick {
        Tick(self.0.saturating_sub(nanos(span)))
    }
}

/// A duration in nanoseconds, as ticks count them (saturating).
pub fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
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

/// A record as a publisher sends it, before any rule was checked.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub stream: String,
    /// 0 lets the broker assign the tick.
    pub tick: u64,
    /// 0 when the producer gave none.
    pub origin_time: u64,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    /// The producer's CRC32 of the payload, checked when present.
    pub crc32: Option<u32>,
}

impl From<Record> for Incoming {
    /// A delivered record to be stored again as it is (what a relay does).
    fn from(r: Record) -> Incoming {
        Incoming {
            stream: r.stream.to_string(),
            tick: r.tick.0,
            origin_time: r.origin_time.unwrap_or(0),
            headers: r.headers,
            payload: r.payload,
            crc32: Some(r.crc32),
        }
    }
}

/// A record as a publisher hands it in, checked, before the broker assigned its tick.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub stream: super::StreamName,
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
    /// What the stream holds and how long it keeps it, as `CreateStream` set it.
    pub meta: Arc<StreamMeta>,
    /// How fast records arrived lately.
    pub recent: Recent,
}

/// A stream's metadata: set by `CreateStream` (a stream created by its first publish has the
/// defaults), stored in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StreamMeta {
    /// The payloads' type, e.g. `application/json` or `application/x-protobuf; messageType=pkg.Msg`.
    pub content_type: String,
    pub schema_version: String,
    pub description: String,
    /// The stream's own retention; limits it leaves unset come from the server's rules.
    pub retention: super::Policy,
    /// Being imported: its records may have explicit ticks at or below the broker's clock, and no
    /// subscription sees it until it is sealed (which clears this).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub importing: bool,
}

/// The recent arrival rate of a stream: an exponentially weighted average over about
/// [`Recent::TAU`], updated at each commit and decayed when read.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Recent {
    records_per_second: f64,
    bytes_per_second: f64,
    /// When it was last updated (0: never).
    at: Tick,
}

impl Recent {
    /// The averaging time, in seconds.
    pub const TAU: f64 = 10.0;

    fn decay(&self, now: Tick) -> f64 {
        let elapsed = now.0.saturating_sub(self.at.0) as f64 / 1e9;
        (-elapsed / Self::TAU).exp()
    }

    /// Counts `records` of `bytes` arriving at `now`.
    pub fn arrived(&mut self, records: u64, bytes: u64, now: Tick) {
        let decay = if self.at.0 == 0 { 0.0 } else { self.decay(now) };
        self.records_per_second = self.records_per_second * decay + records as f64 / Self::TAU;
        self.bytes_per_second = self.bytes_per_second * decay + bytes as f64 / Self::TAU;
        self.at = now.max(self.at);
    }

    /// Records and payload bytes per second at `now`.
    pub fn at(&self, now: Tick) -> (f64, f64) {
        let decay = self.decay(now);
        (self.records_per_second * decay, self.bytes_per_second * decay)
    }
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
