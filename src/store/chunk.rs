//! The chunk codec: many records of one stream packed into one value, the unit of reading.
//!
//! Layout (integers little-endian):
//! ```text
//! header : magic "TPLC" | version u8 | count u32 | records_before u64 | bytes_before u64
//!          | stream_id u32 (version 4) | name_len u8 | stream name | header_crc u32
//! record : record_crc u32 | tick u64 | origin_time u64 (0 = none) | payload_len u32
//!          | payload_crc u32 | n_headers u16
//!          | n_headers × (key_len u16 | key | value_len u16 | value) | payload
//! trailer: trailer_len u32 | trailer | trailer_crc u32          (version 3 only)
//! ```
//! This build writes version 4, whose header names the stream by id too, so that a read can check
//! that the chunk it got is the one its key names (stream and first tick). Versions 2 and 3 come
//! from data dirs of earlier builds (read when they are upgraded, and by `tapeline recover`); a
//! version 3 chunk carries after its records a trailer of batch tags that is skipped here.
//! The magic and the stream name make a chunk recognisable on its own: `tapeline recover` finds
//! chunks by scanning raw files (see [`scan`]).
//! `records_before`/`bytes_before` count what the stream held before this chunk, so a stream's
//! totals follow from its first and last chunk alone (recovery never scans the log).
//! `record_crc` is the CRC32 of everything after it up to the end of the payload: one pass over
//! contiguous bytes checks the whole record, including `payload_crc`, the CRC32 of the payload
//! alone that clients receive (computed once, when the batch was checked). Every record a read
//! walks over is checked, so a damaged tick or length can never steer a read, and nothing that
//! fails a check is ever returned as a record.

use crate::types::{Stored, StreamId, Tick};

/// Marks the start of every chunk, so that chunks can be found in raw bytes.
pub const MAGIC: &[u8; 4] = b"TPLC";
/// The version this build writes.
const VERSION: u8 = 4;
/// Versions of earlier builds: without the stream id; 3 with a trailer.
const VERSION_2: u8 = 2;
const VERSION_TRAILER: u8 = 3;
/// Where the counters end: the stream id (version 4) or the name's length follows.
const COUNTERS_END: usize = 4 + 1 + 4 + 8 + 8;
/// The most bytes a header takes (a name of 255 bytes): reading this many is enough for
/// [`header`].
pub const MAX_HEADER_BYTES: u32 = (COUNTERS_END + 4 + 1 + 255 + 4) as u32;

/// Where the stream name starts in a chunk of `version`.
fn name_at(version: u8) -> usize {
    if version == VERSION {
        COUNTERS_END + 4 + 1
    } else {
        COUNTERS_END + 1
    }
}

/// Counters of a chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkHeader {
    /// Records in this chunk.
    pub count: u32,
    /// Records of the stream stored before this chunk.
    pub records_before: u64,
    /// Payload bytes of the stream stored before this chunk.
    pub bytes_before: u64,
    /// The stream's id (version 4; `None` in chunks of earlier builds).
    pub stream: Option<StreamId>,
    /// Length of the stream name stored in the header.
    pub name_len: u8,
    /// A trailer follows the records (version 3).
    pub trailer: bool,
}

impl ChunkHeader {
    /// Bytes the header takes, name and CRC included.
    pub fn encoded_len(&self) -> usize {
        self.name_at() + usize::from(self.name_len) + 4
    }

    fn name_at(&self) -> usize {
        COUNTERS_END + if self.stream.is_some() { 4 } else { 0 } + 1
    }
}

/// Why a chunk could not be decoded. `good` records before the damage were intact.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkError {
    /// Records decoded and verified before the damage.
    pub good: usize,
    /// What was wrong, for the operator.
    pub detail: String,
}

/// Builds one chunk value.
pub struct ChunkEncoder {
    buf: Vec<u8>,
    count: u32,
    bytes: u64,
    last_tick: Tick,
    header_len: usize,
}

impl ChunkEncoder {
    /// Starts a chunk of `stream` (at most 255 bytes, as the naming rule ensures) whose id is
    /// `id`, which already holds `records_before` records and `bytes_before` payload bytes.
    pub fn new(stream: &str, id: StreamId, records_before: u64, bytes_before: u64) -> ChunkEncoder {
        let name = &stream.as_bytes()[..stream.len().min(255)];
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(MAGIC);
        buf.push(VERSION);
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&records_before.to_le_bytes());
        buf.extend_from_slice(&bytes_before.to_le_bytes());
        buf.extend_from_slice(&id.0.to_le_bytes());
        buf.push(name.len() as u8);
        buf.extend_from_slice(name);
        buf.extend_from_slice(&0u32.to_le_bytes());
        let header_len = name_at(VERSION) + name.len() + 4;
        ChunkEncoder { buf, count: 0, bytes: 0, last_tick: Tick(0), header_len }
    }

    /// Appends one record; `payload_crc` is the CRC32 of `payload`, computed once by the caller.
    pub fn push(
        &mut self,
        tick: Tick,
        origin_time: Option<u64>,
        headers: &[(String, String)],
        payload: &[u8],
        payload_crc: u32,
    ) {
        let crc_at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(&tick.0.to_le_bytes());
        self.buf.extend_from_slice(&origin_time.unwrap_or(0).to_le_bytes());
        self.buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&payload_crc.to_le_bytes());
        self.buf.extend_from_slice(&(headers.len() as u16).to_le_bytes());
        for (k, v) in headers {
            self.buf.extend_from_slice(&(k.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(k.as_bytes());
            self.buf.extend_from_slice(&(v.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(v.as_bytes());
        }
        self.buf.extend_from_slice(payload);
        let record_crc = crc32fast::hash(&self.buf[crc_at + 4..]);
        self.buf[crc_at..crc_at + 4].copy_from_slice(&record_crc.to_le_bytes());
        self.count += 1;
        self.bytes += payload.len() as u64;
        self.last_tick = tick;
    }

    /// Records pushed so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Payload bytes pushed so far.
    pub fn payload_bytes(&self) -> u64 {
        self.bytes
    }

    /// Encoded size so far.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// The tick of the last record pushed.
    pub fn last_tick(&self) -> Tick {
        self.last_tick
    }

    /// Seals the header and returns the value.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[5..9].copy_from_slice(&self.count.to_le_bytes());
        let crc_at = self.header_len - 4;
        let crc = crc32fast::hash(&self.buf[..crc_at]);
        self.buf[crc_at..self.header_len].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Reads and checks a chunk's header.
pub fn header(value: &[u8]) -> Result<ChunkHeader, ChunkError> {
    let bad = |detail: String| ChunkError { good: 0, detail };
    let short = || bad(format!("chunk of {} bytes is shorter than its header", value.len()));
    if value.len() < COUNTERS_END + 1 + 4 {
        return Err(short());
    }
    if &value[..4] != MAGIC {
        return Err(bad("chunk does not start with the chunk magic".to_string()));
    }
    let version = value[4];
    if ![VERSION, VERSION_2, VERSION_TRAILER].contains(&version) {
        return Err(bad(format!(
            "chunk format version {version} is unknown (this build reads {VERSION_2} to {VERSION})"
        )));
    }
    let name_at = name_at(version);
    let name_len = *value.get(name_at - 1).ok_or_else(short)?;
    let crc_at = name_at + usize::from(name_len);
    let Some(stored) = value.get(crc_at..crc_at + 4) else { return Err(short()) };
    if crc32fast::hash(&value[..crc_at]) != u32::from_le_bytes(stored.try_into().unwrap_or_default()) {
        return Err(bad("chunk header fails its CRC".to_string()));
    }
    let u64_at = |i: usize| u64::from_le_bytes(value[i..i + 8].try_into().unwrap_or_default());
    let stream = (version == VERSION).then(|| {
        StreamId(u32::from_le_bytes(value[COUNTERS_END..COUNTERS_END + 4].try_into().unwrap_or_default()))
    });
    Ok(ChunkHeader {
        count: u32::from_le_bytes(value[5..9].try_into().unwrap_or_default()),
        records_before: u64_at(9),
        bytes_before: u64_at(17),
        stream,
        name_len,
        trailer: version == VERSION_TRAILER,
    })
}

/// The stream name a chunk's (checked) header carries.
pub fn stream_name<'a>(value: &'a [u8], head: &ChunkHeader) -> &'a [u8] {
    &value[head.name_at()..head.name_at() + usize::from(head.name_len)]
}

/// A chunk found in raw bytes by [`scan`].
#[derive(Debug)]
pub struct Found {
    /// Where the chunk starts in the scanned bytes.
    pub offset: usize,
    /// The stream name from its header.
    pub stream: String,
    /// Its verified records (payloads located in the scanned bytes, shifted by `offset`); all of
    /// them, or those before the damage when `damage` is set.
    pub records: Vec<Stored>,
    /// Why the rest of the chunk could not be read, if it could not.
    pub damage: Option<String>,
}

/// Finds every chunk whose header checks out in arbitrary bytes (a raw file of the storage
/// engine), with the records that verify. Used when the engine itself cannot open its files:
/// values are stored contiguously, so a chunk is found wherever a copy of it lies. The same
/// chunk may be found more than once (old copies); the caller deduplicates.
pub fn scan(bytes: &[u8]) -> Vec<Found> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(pos) = bytes[at..].windows(4).position(|w| w == MAGIC) {
        let offset = at + pos;
        at = offset + 1;
        let Ok(head) = header(&bytes[offset..]) else { continue };
        let value = &bytes[offset..];
        let mut records = Vec::new();
        let (end, damage) = match walk(value, 0, Tick(0), Tick(u64::MAX), &mut records) {
            // A damaged trailer leaves the records whole: scan on after them.
            Ok((span, end)) if span.head.trailer => {
                (trailer_at(value, end).map_or(end, |(_, end)| end), None)
            }
            Ok((_, end)) => (end, None),
            Err(err) => (head.encoded_len(), Some(err.detail)),
        };
        let stream = String::from_utf8_lossy(stream_name(value, &head)).into_owned();
        for r in &mut records {
            r.payload = r.payload.start + offset..r.payload.end + offset;
        }
        found.push(Found { offset, stream, records, damage });
        at = offset + end.max(1);
    }
    found
}

/// Decodes and verifies every record of a chunk (as chunk 0).
pub fn decode(value: &[u8]) -> Result<(ChunkHeader, Vec<Stored>), ChunkError> {
    let mut records = Vec::new();
    let span = decode_into(value, 0, Tick(0), Tick(u64::MAX), &mut records)?;
    Ok((span.head, records))
}

/// What a decode found besides the records it kept: the header, and the ticks of the chunk's
/// first and last records (whatever range was asked for), which a read checks against the key it
/// looked the chunk up by and against the next chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub head: ChunkHeader,
    pub first: Option<Tick>,
    pub last: Option<Tick>,
}

/// Appends to `out` the records of a chunk with `from <= tick <= upto`, verified, their payloads
/// located in `value`, which the caller calls chunk `index`. On damage, `out` keeps the good
/// records before it.
pub fn decode_into(
    value: &[u8],
    index: u32,
    from: Tick,
    upto: Tick,
    out: &mut Vec<Stored>,
) -> Result<Span, ChunkError> {
    let (span, records_end) = walk(value, index, from, upto, out)?;
    let head = span.head;
    // The trailer (version 3) is not record data: a damaged trailer leaves the records served.
    let end = if head.trailer {
        trailer_at(value, records_end).map_or(value.len(), |(_, end)| end)
    } else {
        records_end
    };
    if end != value.len() {
        let detail = format!("{} stray bytes after the last record", value.len() - end);
        return Err(ChunkError { good: head.count as usize, detail });
    }
    Ok(span)
}

/// Checks the trailer that starts at `at`; returns where its bytes lie and where the chunk ends.
fn trailer_at(value: &[u8], at: usize) -> Result<(std::ops::Range<usize>, usize), String> {
    let past_end = || "the trailer runs past the end of the chunk".to_string();
    let len = value.get(at..at + 4).ok_or_else(past_end)?;
    let start = at + 4;
    let end = start.saturating_add(u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize);
    let stored = value.get(end..end.saturating_add(4)).ok_or_else(past_end)?;
    if crc32fast::hash(&value[at..end]) != u32::from_le_bytes(stored.try_into().unwrap_or_default()) {
        return Err("the trailer fails its CRC".to_string());
    }
    Ok((start..end, end + 4))
}

/// Decodes the records of the chunk at the start of `value`, which may continue past its end;
/// returns the header and where the records end (where a version 3 chunk's trailer starts).
fn walk(
    value: &[u8],
    index: u32,
    from: Tick,
    upto: Tick,
    out: &mut Vec<Stored>,
) -> Result<(Span, usize), ChunkError> {
    let head = header(value)?;
    let (mut first, mut last) = (None, None);
    // The count is not trusted for the allocation: at most what the bytes could hold, and no
    // more than a full chunk (a raw scan hands in a long window after a forged header).
    out.reserve((head.count as usize).min(value.len() / FIXED_LEN).min(4096));
    let mut pos = head.encoded_len();
    for good in 0..head.count as usize {
        let fail = |detail: String| ChunkError { good, detail };
        let Some(fixed) = value.get(pos..pos + FIXED_LEN) else {
            return Err(fail(format!("record {good} runs past the end of the chunk at byte {pos}")));
        };
        let record_crc = u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
        let tick = Tick(u64::from_le_bytes(fixed[4..12].try_into().unwrap_or_default()));
        let origin_time = u64::from_le_bytes(fixed[12..20].try_into().unwrap_or_default());
        let payload_len = u32::from_le_bytes(fixed[20..24].try_into().unwrap_or_default()) as usize;
        let payload_crc = u32::from_le_bytes(fixed[24..28].try_into().unwrap_or_default());
        let n_headers = u16::from_le_bytes([fixed[28], fixed[29]]);
        let record_start = pos + 4;
        pos += FIXED_LEN;
        // Lengths are used before the CRC is checked; each step is bounds-checked.
        let headers_start = pos;
        for _ in 0..usize::from(n_headers) * 2 {
            let len = value.get(pos..pos + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
            pos = match len {
                Some(len) if pos + 2 + len <= value.len() => pos + 2 + len,
                _ => return Err(fail(format!("headers of record {good} run past the end of the chunk"))),
            };
        }
        let payload_end = pos + payload_len;
        if payload_end > value.len() {
            return Err(fail(format!("payload of record {good} runs past the end of the chunk")));
        }
        if crc32fast::hash(&value[record_start..payload_end]) != record_crc {
            return Err(fail(format!("record {good} (tick {tick}?) fails its CRC")));
        }
        first.get_or_insert(tick);
        last = Some(tick);
        if tick >= from && tick <= upto {
            let headers = if n_headers == 0 { Vec::new() } else { read_headers(&value[headers_start..pos]) };
            let origin_time = (origin_time != 0).then_some(origin_time);
            let payload = pos..payload_end;
            out.push(Stored { tick, origin_time, headers, chunk: index, payload, crc32: payload_crc });
        }
        pos = payload_end;
    }
    Ok((Span { head, first, last }, pos))
}

/// The fixed part of a record: meta_crc, tick, origin_time, payload_len, payload_crc, n_headers.
const FIXED_LEN: usize = 4 + 8 + 8 + 4 + 4 + 2;

/// Reads header pairs whose bounds and CRC were already checked.
fn read_headers(mut bytes: &[u8]) -> Vec<(String, String)> {
    let mut texts = Vec::new();
    while bytes.len() >= 2 {
        let len = u16::from_le_bytes([bytes[0], bytes[1]]) as usize;
        texts.push(String::from_utf8_lossy(&bytes[2..2 + len]).into_owned());
        bytes = &bytes[2 + len..];
    }
    let mut texts = texts.into_iter();
    let mut headers = Vec::new();
    while let (Some(key), Some(value)) = (texts.next(), texts.next()) {
        headers.push((key, value));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sample() -> Vec<u8> {
        let mut enc = ChunkEncoder::new("s", StreamId(3), 10, 1000);
        enc.push(Tick(5), None, &[], b"hello", crc32fast::hash(b"hello"));
        let headers = vec![("k".to_string(), "v".to_string())];
        enc.push(Tick(7), Some(42), &headers, b"", crc32fast::hash(b""));
        enc.finish()
    }

    /// The sample as an earlier build wrote it: version 2 (no stream id), or version 3 with a
    /// trailer after the records.
    fn legacy(trailer: &[u8]) -> Vec<u8> {
        let mut v = sample();
        v.drain(COUNTERS_END..COUNTERS_END + 4);
        v[4] = if trailer.is_empty() { VERSION_2 } else { VERSION_TRAILER };
        let crc_at = name_at(VERSION_2) + 1;
        let crc = crc32fast::hash(&v[..crc_at]);
        v[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        if !trailer.is_empty() {
            let at = v.len();
            v.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
            v.extend_from_slice(trailer);
            let crc = crc32fast::hash(&v[at..]);
            v.extend_from_slice(&crc.to_le_bytes());
        }
        v
    }

    #[test]
    fn chunks_of_earlier_builds_read_the_same_and_a_trailer_is_skipped() {
        let (head, records) = decode(&sample()).unwrap();
        assert_eq!(head.stream, Some(StreamId(3)));
        for old in [legacy(b""), legacy(b"batch tags")] {
            let (old_head, old_records) = decode(&old).unwrap();
            assert_eq!(old_head.stream, None);
            assert_eq!((old_head.count, old_head.records_before, old_head.bytes_before), (2, 10, 1000));
            assert_eq!(stream_name(&old, &old_head), b"s");
            let payloads =
                |v: &[u8], r: &[Stored]| r.iter().map(|r| v[r.payload.clone()].to_vec()).collect::<Vec<_>>();
            assert_eq!(payloads(&old, &old_records), payloads(&sample(), &records));
        }
        // A raw scan steps over a trailer to what follows.
        let mut raw = legacy(b"batch tags");
        let next = raw.len();
        raw.extend_from_slice(&sample());
        let found = scan(&raw);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|f| f.damage.is_none() && f.records.len() == 2));
        assert_eq!(found[1].offset, next);
    }

    #[test]
    fn round_trip() {
        let value = Bytes::from(sample());
        let (head, records) = decode(&value).unwrap();
        assert_eq!(
            head,
            ChunkHeader {
                count: 2,
                records_before: 10,
                bytes_before: 1000,
                stream: Some(StreamId(3)),
                name_len: 1,
                trailer: false
            }
        );
        assert_eq!(stream_name(&value, &head), b"s");
        assert_eq!(records[0].tick, Tick(5));
        assert_eq!(&value[records[0].payload.clone()], b"hello");
        assert_eq!(records[0].origin_time, None);
        assert_eq!(records[1].origin_time, Some(42));
        assert_eq!(records[1].headers, vec![("k".to_string(), "v".to_string())]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i}");
        }
    }

    #[test]
    fn scan_finds_whole_and_damaged_chunks_among_other_bytes() {
        let chunk = sample();
        let mut raw = b"sled page bytes TPLC not a header".to_vec();
        raw.extend_from_slice(&chunk);
        raw.extend_from_slice(b"more bytes");
        let cut_at = raw.len();
        raw.extend_from_slice(&chunk[..chunk.len() - 3]);
        let found = scan(&raw);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].stream, "s");
        assert_eq!(found[0].records.len(), 2);
        assert!(found[0].damage.is_none());
        assert_eq!(&raw[found[0].records[0].payload.clone()], b"hello");
        assert_eq!(found[1].offset, cut_at);
        assert_eq!(found[1].records.len(), 1, "the record before the cut is readable");
        assert!(found[1].damage.is_some());
    }

    #[test]
    fn truncation_is_detected_and_good_prefix_counted() {
        let good = sample();
        for len in 0..good.len() {
            let err = decode(&Bytes::copy_from_slice(&good[..len])).unwrap_err();
            assert!(err.good <= 1, "{err:?}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// A record to encode: tick step, origin time, headers, payload.
        type Input = (u64, Option<u64>, Vec<(String, String)>, Vec<u8>);

        fn input() -> impl Strategy<Value = Input> {
            (
                1u64..1_000_000,
                proptest::option::of(1u64..u64::MAX),
                vec(("[a-z]{0,8}", "\\PC{0,12}"), 0..3),
                vec(any::<u8>(), 0..300),
            )
        }

        fn encode(inputs: &[Input]) -> (Vec<u8>, Vec<Tick>) {
            let mut enc = ChunkEncoder::new("a/b", StreamId(1), 7, 70);
            let mut tick = 0;
            let mut ticks = Vec::new();
            for (step, origin, headers, payload) in inputs {
                tick += step;
                enc.push(Tick(tick), *origin, headers, payload, crc32fast::hash(payload));
                ticks.push(Tick(tick));
            }
            (enc.finish(), ticks)
        }

        /// Checks that `got` (decoded from `value`) equals the first records of `inputs`.
        fn same_prefix(
            inputs: &[Input],
            ticks: &[Tick],
            value: &[u8],
            got: &[Stored],
        ) -> Result<(), TestCaseError> {
            prop_assert!(got.len() <= inputs.len());
            for (i, record) in got.iter().enumerate() {
                let (_, origin, headers, payload) = &inputs[i];
                prop_assert_eq!(record.tick, ticks[i]);
                prop_assert_eq!(record.origin_time, *origin);
                prop_assert_eq!(&record.headers, headers);
                prop_assert_eq!(&value[record.payload.clone()], &payload[..]);
                prop_assert_eq!(record.crc32, crc32fast::hash(payload));
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_records_round_trip(inputs in vec(input(), 1..40)) {
                let (value, ticks) = encode(&inputs);
                let (head, got) = decode(&value).map_err(|e| TestCaseError::fail(e.detail))?;
                prop_assert_eq!(head, ChunkHeader { count: inputs.len() as u32, records_before: 7, bytes_before: 70, stream: Some(StreamId(1)), name_len: 3, trailer: false });
                prop_assert_eq!(got.len(), inputs.len());
                same_prefix(&inputs, &ticks, &value, &got)?;
                // A tick range returns exactly the records inside it.
                let (from, upto) = (ticks[ticks.len() / 3], ticks[2 * ticks.len() / 3]);
                let mut ranged = Vec::new();
                decode_into(&value, 0, from, upto, &mut ranged).map_err(|e| TestCaseError::fail(e.detail))?;
                let wanted: Vec<Tick> = ticks.iter().copied().filter(|t| *t >= from && *t <= upto).collect();
                prop_assert_eq!(ranged.iter().map(|r| r.tick).collect::<Vec<_>>(), wanted);
            }

            /// Damage (flipped bytes, a cut) never panics the decoder and never yields a record
            /// that differs from what was stored: either the whole chunk decodes unchanged (the
            /// damage was nowhere) or decoding fails, keeping only records before the damage.
            #[test]
            fn damage_is_never_served(
                inputs in vec(input(), 1..20),
                flips in vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
                cut in proptest::option::of(any::<prop::sample::Index>()),
            ) {
                let (good, ticks) = encode(&inputs);
                let mut bad = good.clone();
                for (at, mask) in &flips {
                    let i = at.index(bad.len());
                    bad[i] ^= mask;
                }
                if let Some(at) = cut {
                    bad.truncate(at.index(bad.len()));
                }
                let mut got = Vec::new();
                match decode_into(&bad, 0, Tick(0), Tick(u64::MAX), &mut got) {
                    Ok(_) => {
                        prop_assert_eq!(&bad, &good, "damage went unnoticed");
                        same_prefix(&inputs, &ticks, &bad, &got)?;
                    }
                    Err(err) => {
                        prop_assert!(bad != good, "intact chunk refused: {}", err.detail);
                        same_prefix(&inputs, &ticks, &bad, &got)?;
                    }
                }
            }

            /// Arbitrary bytes never panic the decoder.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
                let _ = decode(&bytes);
            }
        }
    }
}
