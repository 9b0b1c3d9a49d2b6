//! The chunk codec: many records of one stream packed into one sled value.
//!
//! Layout (integers little-endian):
//! ```text
//! header : version u8 | count u32 | records_before u64 | bytes_before u64 | header_crc u32
//! record : tick u64 | origin_time u64 (0 = none) | n_headers u16
//!          | n_headers × (key_len u16 | key | value_len u16 | value)
//!          | payload_len u32 | payload | payload_crc u32 | record_crc u32
//! ```
//! `records_before`/`bytes_before` count what the stream held before this chunk, so a stream's
//! totals follow from its first and last chunk alone (recovery never scans the log).
//! `payload_crc` is the CRC32 of the payload, the value clients see; `record_crc` is the CRC32 of the
//! record's metadata followed by `payload_crc`, so every stored byte is covered while the payload is
//! hashed only once. Nothing that fails a check is ever returned as a record.

use crate::record::{Record, Tick};
use bytes::Bytes;
use std::sync::Arc;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4 + 8 + 8 + 4;

/// Counters of a chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkHeader {
    /// Records in this chunk.
    pub count: u32,
    /// Records of the stream stored before this chunk.
    pub records_before: u64,
    /// Payload bytes of the stream stored before this chunk.
    pub bytes_before: u64,
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
}

impl ChunkEncoder {
    /// Starts a chunk for a stream that already holds `records_before` records and
    /// `bytes_before` payload bytes.
    pub fn new(records_before: u64, bytes_before: u64) -> ChunkEncoder {
        let mut buf = Vec::with_capacity(4096);
        buf.push(VERSION);
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&records_before.to_le_bytes());
        buf.extend_from_slice(&bytes_before.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        ChunkEncoder { buf, count: 0, bytes: 0, last_tick: Tick(0) }
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
        let start = self.buf.len();
        self.buf.extend_from_slice(&tick.0.to_le_bytes());
        self.buf.extend_from_slice(&origin_time.unwrap_or(0).to_le_bytes());
        self.buf.extend_from_slice(&(headers.len() as u16).to_le_bytes());
        for (k, v) in headers {
            self.buf.extend_from_slice(&(k.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(k.as_bytes());
            self.buf.extend_from_slice(&(v.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(v.as_bytes());
        }
        self.buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&self.buf[start..]);
        hasher.update(&payload_crc.to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.extend_from_slice(&payload_crc.to_le_bytes());
        self.buf.extend_from_slice(&hasher.finalize().to_le_bytes());
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
        self.buf[1..5].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[..HEADER_LEN - 4]);
        self.buf[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Reads and checks a chunk's header.
pub fn header(value: &[u8]) -> Result<ChunkHeader, ChunkError> {
    let bad = |detail: String| ChunkError { good: 0, detail };
    if value.len() < HEADER_LEN {
        return Err(bad(format!("chunk of {} bytes is shorter than its header", value.len())));
    }
    let stored = u32::from_le_bytes(value[HEADER_LEN - 4..HEADER_LEN].try_into().unwrap_or_default());
    if crc32fast::hash(&value[..HEADER_LEN - 4]) != stored {
        return Err(bad("chunk header fails its CRC".to_string()));
    }
    if value[0] != VERSION {
        return Err(bad(format!("chunk format version {} is unknown", value[0])));
    }
    Ok(ChunkHeader {
        count: u32::from_le_bytes(value[1..5].try_into().unwrap_or_default()),
        records_before: u64::from_le_bytes(value[5..13].try_into().unwrap_or_default()),
        bytes_before: u64::from_le_bytes(value[13..21].try_into().unwrap_or_default()),
    })
}

/// Decodes and verifies every record of a chunk. Payloads are slices of `value`, not copies.
pub fn decode(value: &Bytes, stream: &Arc<str>) -> Result<(ChunkHeader, Vec<Record>), ChunkError> {
    let head = header(value)?;
    let mut records = Vec::with_capacity(head.count as usize);
    let mut reader = Reader { buf: value, pos: HEADER_LEN };
    for _ in 0..head.count {
        match reader.record(stream) {
            Ok(record) => records.push(record),
            Err(detail) => return Err(ChunkError { good: records.len(), detail }),
        }
    }
    if reader.pos != value.len() {
        let detail = format!("{} stray bytes after the last record", value.len() - reader.pos);
        return Err(ChunkError { good: records.len(), detail });
    }
    Ok((head, records))
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        let end = end.ok_or_else(|| format!("record runs past the end of the chunk at byte {}", self.pos))?;
        let range = self.pos..end;
        self.pos = end;
        Ok(range)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let r = self.take(2)?;
        Ok(u16::from_le_bytes([self.buf[r.start], self.buf[r.start + 1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let r = self.take(4)?;
        Ok(u32::from_le_bytes(self.buf[r].try_into().unwrap_or_default()))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let r = self.take(8)?;
        Ok(u64::from_le_bytes(self.buf[r].try_into().unwrap_or_default()))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u16()? as usize;
        let r = self.take(len)?;
        String::from_utf8(self.buf[r].to_vec()).map_err(|_| "header is not UTF-8".to_string())
    }

    fn record(&mut self, stream: &Arc<str>) -> Result<Record, String> {
        let start = self.pos;
        let tick = Tick(self.u64()?);
        let origin_time = Some(self.u64()?).filter(|&t| t != 0);
        let n_headers = self.u16()?;
        let mut headers = Vec::with_capacity(n_headers as usize);
        for _ in 0..n_headers {
            headers.push((self.string()?, self.string()?));
        }
        let payload_len = self.u32()? as usize;
        let meta_end = self.pos;
        let payload = self.take(payload_len)?;
        let payload_crc = self.u32()?;
        let record_crc = self.u32()?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&self.buf[start..meta_end]);
        hasher.update(&payload_crc.to_le_bytes());
        if hasher.finalize() != record_crc {
            return Err(format!("record at tick {tick} fails its CRC"));
        }
        let payload = self.buf.slice(payload);
        if crc32fast::hash(&payload) != payload_crc {
            return Err(format!("payload of the record at tick {tick} fails its CRC"));
        }
        Ok(Record { stream: stream.clone(), tick, origin_time, headers, payload, crc32: payload_crc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut enc = ChunkEncoder::new(10, 1000);
        enc.push(Tick(5), None, &[], b"hello", crc32fast::hash(b"hello"));
        let headers = vec![("k".to_string(), "v".to_string())];
        enc.push(Tick(7), Some(42), &headers, b"", crc32fast::hash(b""));
        enc.finish()
    }

    #[test]
    fn round_trip() {
        let value = Bytes::from(sample());
        let (head, records) = decode(&value, &Arc::from("s")).unwrap();
        assert_eq!(head, ChunkHeader { count: 2, records_before: 10, bytes_before: 1000 });
        assert_eq!(records[0].tick, Tick(5));
        assert_eq!(&records[0].payload[..], b"hello");
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
            let bad = Bytes::from(bad);
            match decode(&bad, &Arc::from("s")) {
                Err(_) => {}
                Ok((_, records)) => panic!("flip at byte {i} went unnoticed: {records:?}"),
            }
        }
    }

    #[test]
    fn truncation_is_detected_and_good_prefix_counted() {
        let good = sample();
        for len in 0..good.len() {
            let err = decode(&Bytes::copy_from_slice(&good[..len]), &Arc::from("s")).unwrap_err();
            assert!(err.good <= 1, "{err:?}");
        }
    }
}
