//! Commit records: the unit of the log of record.
//!
//! Every change to the store is one commit record appended to the chunk files (see `files.rs`):
//! a group commit of batches (`Append`, holding the chunks themselves), a stream's definition,
//! deletion or removal from the front (`Define`, `Delete`, `Trim`), chunks moved out of a sparse
//! file (`Move`), the clock raised with nothing published (`Clock`), and a summary of everything
//! but the chunks (`Checkpoint`). The index (sled) is derived from these records and can be
//! rebuilt from them alone.
//!
//! Layout (integers little-endian):
//! ```text
//! file   : header (28 B) | record | record | ...
//! header : magic "TPLF" | format u8 | 3 × 0 | file id u32 | first seq u64 | salt u32 | crc u32
//! record : fixed (40 B) | meta | meta_crc u32 | data | record_crc u32
//! fixed  : magic "TPLR" | format u8 | kind u8 | flags u16 | seq u64 | prev_crc u32 | clock u64
//!          | meta_len u32 | data_len u32 | fixed_crc u32
//! ```
//! `fixed_crc` covers the 36 bytes before it, `meta_crc` the meta, `record_crc` everything from
//! the magic to the end of the data. `fixed_crc` and `record_crc` start from the log's salt, a
//! random number made with the log and kept in every file's header, never shown to a client:
//! bytes a publisher put in a payload can be a whole record to the eye, but never one that
//! checks out, so recovery cannot be steered by them. `seq` grows by one from record to record across files, and
//! `prev_crc` is the previous record's `record_crc`, so the chain of records is checked link by
//! link: a stale record (an older copy left in a reused block, or a record of another log) cannot
//! pass for the next one. `clock` is the highest tick the broker may have promised once the record
//! is durable (a record's ticks, or a heartbeat's tail): a restart never assigns a tick at or
//! below it. The meta of an `Append` or `Move` ends with the chunk directory (stream id, first
//! tick and length of each chunk); the data is the chunks, one after the other, so a chunk's
//! location in its file follows from the record's position.
//!
//! A record is read in three steps, each checked on its own: the fixed part (so that a damaged
//! length never steers a read), the meta (so that the chunks of a record whose data was damaged
//! can still be indexed, and reads report the damage), then the data against `record_crc`.

use super::le::{Put, Reader};
use super::producers::{self, BatchTag};
use crate::types::{StreamId, StreamMeta, Tick};
use std::sync::Arc;

/// Starts every chunk file.
pub const FILE_MAGIC: &[u8; 4] = b"TPLF";
/// Starts every commit record.
pub const RECORD_MAGIC: &[u8; 4] = b"TPLR";
/// The format of files and records this build writes and reads.
const FORMAT: u8 = 1;
/// Bytes of a file's header.
pub const FILE_HEADER_LEN: u64 = 28;
/// Bytes of a record's fixed part.
pub const FIXED_LEN: usize = 40;
/// Bytes a record takes besides its meta and data: the fixed part and two CRCs.
pub const OVERHEAD: u64 = FIXED_LEN as u64 + 8;

/// Set in `flags` when the record was synced before anything it holds was acknowledged
/// (`fsync = always`): such a record can only be missing from the log through damage.
pub const FLAG_SYNCED: u16 = 1;

/// The header of a chunk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// The file's own id, as in its name: a file copied under another name does not pass.
    pub file: u32,
    /// The sequence number of the file's first record.
    pub first_seq: u64,
    /// The log's salt (the same in every file of a log).
    pub salt: u32,
}

/// Why a file header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Damaged, or not a header at all.
    Damaged(String),
    /// A whole header of a format this build does not know: a newer build wrote it.
    Format(u8),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Damaged(detail) => f.write_str(detail),
            HeaderError::Format(format) => {
                write!(f, "file format {format} is unknown (this build reads {FORMAT})")
            }
        }
    }
}

/// A CRC32 hasher that starts from the log's salt.
pub fn salted(salt: u32) -> crc32fast::Hasher {
    crc32fast::Hasher::new_with_initial(salt)
}

impl FileHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN as usize] {
        let mut v = Vec::with_capacity(FILE_HEADER_LEN as usize);
        v.extend_from_slice(FILE_MAGIC);
        v.extend_from_slice(&[FORMAT, 0, 0, 0]);
        v.put_u32(self.file);
        v.put_u64(self.first_seq);
        v.put_u32(self.salt);
        let crc = crc32fast::hash(&v);
        v.put_u32(crc);
        v.try_into().unwrap_or([0; FILE_HEADER_LEN as usize])
    }

    pub fn decode(bytes: &[u8]) -> Result<FileHeader, HeaderError> {
        let Some(bytes) = bytes.get(..FILE_HEADER_LEN as usize) else {
            return Err(HeaderError::Damaged(format!(
                "{} bytes are shorter than a file header",
                bytes.len()
            )));
        };
        if &bytes[..4] != FILE_MAGIC {
            return Err(HeaderError::Damaged("the file does not start with the chunk file magic".into()));
        }
        let mut r = Reader(&bytes[8..]);
        let fields = (|| Ok::<_, String>((r.u32()?, r.u64()?, r.u32()?, r.u32()?)))();
        let (file, first_seq, salt, crc) = fields.map_err(HeaderError::Damaged)?;
        if crc32fast::hash(&bytes[..FILE_HEADER_LEN as usize - 4]) != crc {
            return Err(HeaderError::Damaged("the file header fails its CRC".into()));
        }
        if bytes[4] != FORMAT {
            return Err(HeaderError::Format(bytes[4]));
        }
        Ok(FileHeader { file, first_seq, salt })
    }
}

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Append = 1,
    Define = 2,
    Delete = 3,
    Trim = 4,
    Move = 5,
    Clock = 6,
    Checkpoint = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Append,
            2 => Kind::Define,
            3 => Kind::Delete,
            4 => Kind::Trim,
            5 => Kind::Move,
            6 => Kind::Clock,
            7 => Kind::Checkpoint,
            _ => return None,
        })
    }
}

/// A record's fixed part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    pub kind: Kind,
    pub flags: u16,
    pub seq: u64,
    pub prev_crc: u32,
    pub clock: Tick,
    pub meta_len: u32,
    pub data_len: u32,
}

impl Fixed {
    pub fn encode(&self, salt: u32) -> [u8; FIXED_LEN] {
        let mut v = Vec::with_capacity(FIXED_LEN);
        v.extend_from_slice(RECORD_MAGIC);
        v.put_u8(FORMAT);
        v.put_u8(self.kind as u8);
        v.put_u16(self.flags);
        v.put_u64(self.seq);
        v.put_u32(self.prev_crc);
        v.put_u64(self.clock.0);
        v.put_u32(self.meta_len);
        v.put_u32(self.data_len);
        let mut crc = salted(salt);
        crc.update(&v);
        v.put_u32(crc.finalize());
        v.try_into().unwrap_or([0; FIXED_LEN])
    }

    /// The fixed part of a record of the log whose salt is `salt`, or why it is none.
    pub fn decode(bytes: &[u8], salt: u32) -> Result<Fixed, String> {
        let Some(bytes) = bytes.get(..FIXED_LEN) else {
            return Err(format!("{} bytes are shorter than a record's fixed part", bytes.len()));
        };
        if &bytes[..4] != RECORD_MAGIC {
            return Err("no record magic".into());
        }
        let mut r = Reader(&bytes[4..]);
        let (format, kind, flags, seq, prev_crc, clock, meta_len, data_len, crc) =
            (r.u8()?, r.u8()?, r.u16()?, r.u64()?, r.u32()?, r.u64()?, r.u32()?, r.u32()?, r.u32()?);
        let mut expected = salted(salt);
        expected.update(&bytes[..FIXED_LEN - 4]);
        if expected.finalize() != crc {
            return Err("the record's fixed part fails its CRC".into());
        }
        if format != FORMAT {
            return Err(format!("record format {format} is unknown (this build reads {FORMAT})"));
        }
        let kind = Kind::from_u8(kind).ok_or_else(|| format!("record kind {kind} is unknown"))?;
        Ok(Fixed { kind, flags, seq, prev_crc, clock: Tick(clock), meta_len, data_len })
    }

    /// Bytes from the start of the meta to the start of the data.
    pub fn meta_span(&self) -> u64 {
        u64::from(self.meta_len) + 4
    }

    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        OVERHEAD + u64::from(self.meta_len) + u64::from(self.data_len)
    }
}

/// A chunk in a record's data: its key and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub stream: StreamId,
    pub first: Tick,
    pub len: u32,
}

/// A stream as the catalog knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Defined {
    pub id: StreamId,
    pub name: Arc<str>,
    pub created: Tick,
    pub meta: StreamMeta,
}

/// What retention removed from the front of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Removed {
    /// Chunks with a first tick below this one are gone (0: none was removed).
    pub floor: Tick,
    /// The tick of the last record removed.
    pub through: Option<Tick>,
    /// Records and payload bytes removed, since the stream was created.
    pub records: u64,
    pub bytes: u64,
}

/// A summary of everything the log holds but the chunks. Written before a chunk file is deleted,
/// so that the records lost with the file are never needed again: a rebuild of the index starts
/// from the newest checkpoint and takes only the chunks of the older records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checkpoint {
    pub server_id: String,
    pub next_id: u32,
    pub streams: Vec<(Defined, Removed)>,
    /// Each idempotent producer's state, as `producers::Producers::encode` writes it.
    pub producers: Vec<(Arc<str>, Vec<u8>)>,
}

impl Checkpoint {
    /// A new random identity for a broker whose data dir has none yet.
    pub fn new_server_id() -> String {
        format!("{:016x}", rand::random::<u64>())
    }
}

/// What a record says, besides its data.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A group commit: the streams it created, its idempotent batches, and its chunks.
    Append {
        created: Vec<(StreamId, Arc<str>, Tick)>,
        tags: Vec<(BatchTag, Vec<Tick>)>,
        chunks: Vec<ChunkEntry>,
    },
    /// A stream created with metadata, or its metadata changed (`created` false).
    Define {
        stream: Defined,
        created: bool,
    },
    /// A stream and every record of it deleted.
    Delete {
        id: StreamId,
        name: Arc<str>,
    },
    /// The oldest chunks of a stream removed: every chunk below `removed.floor`.
    Trim {
        id: StreamId,
        removed: Removed,
    },
    /// Chunks copied out of a sparse file; the copies replace the originals.
    Move {
        chunks: Vec<ChunkEntry>,
    },
    /// The clock raised to the record's `clock` with nothing published.
    Clock,
    Checkpoint(Checkpoint),
}

impl Body {
    pub fn kind(&self) -> Kind {
        match self {
            Body::Append { .. } => Kind::Append,
            Body::Define { .. } => Kind::Define,
            Body::Delete { .. } => Kind::Delete,
            Body::Trim { .. } => Kind::Trim,
            Body::Move { .. } => Kind::Move,
            Body::Clock => Kind::Clock,
            Body::Checkpoint(_) => Kind::Checkpoint,
        }
    }

    /// The chunk directory of the record's data (empty for records without chunks).
    pub fn chunks(&self) -> &[ChunkEntry] {
        match self {
            Body::Append { chunks, .. } | Body::Move { chunks } => chunks,
            _ => &[],
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Body::Append { created, tags, chunks } => {
                v.put_u32(created.len() as u32);
                for (id, name, tick) in created {
                    v.put_u32(id.0);
                    v.put_u64(tick.0);
                    v.put_short(name.as_bytes());
                }
                v.put_long(&producers::encode_tags(tags.iter().map(|(tag, ticks)| (tag, ticks.as_slice()))));
                put_chunks(&mut v, chunks);
            }
            Body::Define { stream, created } => {
                put_defined(&mut v, stream);
                v.put_u8(u8::from(*created));
            }
            Body::Delete { id, name } => {
                v.put_u32(id.0);
                v.put_short(name.as_bytes());
            }
            Body::Trim { id, removed } => {
                v.put_u32(id.0);
                put_removed(&mut v, removed);
            }
            Body::Move { chunks } => put_chunks(&mut v, chunks),
            Body::Clock => {}
            Body::Checkpoint(c) => {
                v.put_short(c.server_id.as_bytes());
                v.put_u32(c.next_id);
                v.put_u32(c.streams.len() as u32);
                for (stream, removed) in &c.streams {
                    put_defined(&mut v, stream);
                    put_removed(&mut v, removed);
                }
                v.put_u32(c.producers.len() as u32);
                for (id, state) in &c.producers {
                    v.put_short(id.as_bytes());
                    v.put_long(state);
                }
            }
        }
        v
    }

    /// Reads the meta of a record of `kind`.
    pub fn decode(kind: Kind, meta: &[u8]) -> Result<Body, String> {
        let mut r = Reader(meta);
        let body = match kind {
            Kind::Append => {
                let n = r.u32()?;
                let mut created = Vec::new();
                for _ in 0..n {
                    let (id, tick, name) = (StreamId(r.u32()?), Tick(r.u64()?), r.short_text()?);
                    created.push((id, Arc::from(name), tick));
                }
                let tags = producers::decode_tags(r.long()?)?;
                Body::Append { created, tags, chunks: get_chunks(&mut r)? }
            }
            Kind::Define => {
                let stream = get_defined(&mut r)?;
                Body::Define { stream, created: r.u8()? != 0 }
            }
            Kind::Delete => Body::Delete { id: StreamId(r.u32()?), name: Arc::from(r.short_text()?) },
            Kind::Trim => Body::Trim { id: StreamId(r.u32()?), removed: get_removed(&mut r)? },
            Kind::Move => Body::Move { chunks: get_chunks(&mut r)? },
            Kind::Clock => Body::Clock,
            Kind::Checkpoint => {
                let server_id = String::from_utf8_lossy(r.short()?).into_owned();
                let next_id = r.u32()?;
                let mut streams = Vec::new();
                for _ in 0..r.u32()? {
                    streams.push((get_defined(&mut r)?, get_removed(&mut r)?));
                }
                let mut producers = Vec::new();
                for _ in 0..r.u32()? {
                    let id = Arc::from(r.short_text()?);
                    producers.push((id, r.long()?.to_vec()));
                }
                Body::Checkpoint(Checkpoint { server_id, next_id, streams, producers })
            }
        };
        r.end()?;
        Ok(body)
    }
}

fn put_chunks(v: &mut Vec<u8>, chunks: &[ChunkEntry]) {
    v.put_u32(chunks.len() as u32);
    for c in chunks {
        v.put_u32(c.stream.0);
        v.put_u64(c.first.0);
        v.put_u32(c.len);
    }
}

fn get_chunks(r: &mut Reader) -> Result<Vec<ChunkEntry>, String> {
    let n = r.u32()?;
    // Not trusted for the allocation: each entry takes 16 bytes of what is left.
    let mut chunks = Vec::with_capacity((n as usize).min(r.remaining() / 16));
    for _ in 0..n {
        chunks.push(ChunkEntry { stream: StreamId(r.u32()?), first: Tick(r.u64()?), len: r.u32()? });
    }
    Ok(chunks)
}

pub(super) fn put_defined(v: &mut Vec<u8>, d: &Defined) {
    v.put_u32(d.id.0);
    v.put_u64(d.created.0);
    v.put_short(d.name.as_bytes());
    let meta = if d.meta == StreamMeta::default() {
        Vec::new()
    } else {
        serde_json::to_vec(&d.meta).unwrap_or_default()
    };
    v.put_long(&meta);
}

pub(super) fn get_defined(r: &mut Reader) -> Result<Defined, String> {
    let (id, created, name) = (StreamId(r.u32()?), Tick(r.u64()?), Arc::from(r.short_text()?));
    let meta = match r.long()? {
        [] => StreamMeta::default(),
        json => serde_json::from_slice(json).map_err(|e| format!("stream metadata is unreadable: {e}"))?,
    };
    Ok(Defined { id, name, created, meta })
}

pub(super) fn put_removed(v: &mut Vec<u8>, removed: &Removed) {
    v.put_u64(removed.floor.0);
    v.put_u64(removed.through.map_or(0, |t| t.0));
    v.put_u64(removed.records);
    v.put_u64(removed.bytes);
}

pub(super) fn get_removed(r: &mut Reader) -> Result<Removed, String> {
    let (floor, through, records, bytes) = (Tick(r.u64()?), r.u64()?, r.u64()?, r.u64()?);
    Ok(Removed { floor, through: (through != 0).then_some(Tick(through)), records, bytes })
}

/// A record ready to be written: `head` (fixed part, meta, meta CRC), then the data (the chunks
/// the caller holds, in the directory's order), then `crc`.
#[derive(Debug)]
pub struct Encoded {
    pub head: Vec<u8>,
    pub crc: u32,
    pub fixed: Fixed,
}

impl Encoded {
    /// Encodes a record of the log whose salt is `salt`, with sequence number `seq` after a
    /// record whose CRC was `prev_crc`; its data is `data`, whose lengths must be the directory's.
    #[allow(clippy::too_many_arguments)]
    pub fn new<D: AsRef<[u8]>>(
        body: &Body,
        salt: u32,
        seq: u64,
        prev_crc: u32,
        clock: Tick,
        flags: u16,
        data: &[D],
    ) -> Encoded {
        let meta = body.encode();
        let data_len: usize = data.iter().map(|d| d.as_ref().len()).sum();
        let fixed = Fixed {
            kind: body.kind(),
            flags,
            seq,
            prev_crc,
            clock,
            meta_len: meta.len() as u32,
            data_len: data_len as u32,
        };
        let mut head = Vec::with_capacity(FIXED_LEN + meta.len() + 4);
        head.extend_from_slice(&fixed.encode(salt));
        head.extend_from_slice(&meta);
        head.put_u32(crc32fast::hash(&meta));
        let mut hasher = salted(salt);
        hasher.update(&head);
        for d in data {
            hasher.update(d.as_ref());
        }
        Encoded { crc: hasher.finalize(), head, fixed }
    }

    /// Bytes the record takes.
    pub fn record_len(&self) -> u64 {
        self.fixed.record_len()
    }

    /// Where the data starts, from the start of the record.
    pub fn data_offset(&self) -> u64 {
        self.head.len() as u64
    }
}

/// Checks a record's meta against its CRC and reads it.
pub fn read_meta(fixed: &Fixed, meta_and_crc: &[u8]) -> Result<Body, String> {
    let Some((meta, crc)) = meta_and_crc.split_last_chunk::<4>() else {
        return Err("the meta ends early".into());
    };
    if meta.len() != fixed.meta_len as usize {
        return Err("the meta ends early".into());
    }
    if crc32fast::hash(meta) != u32::from_le_bytes(*crc) {
        return Err("the record's meta fails its CRC".into());
    }
    let body = Body::decode(fixed.kind, meta)?;
    let data_len: u64 = body.chunks().iter().map(|c| u64::from(c.len)).sum();
    if data_len != u64::from(fixed.data_len) {
        return Err(format!(
            "the chunk directory covers {data_len} bytes of a {}-byte data part",
            fixed.data_len
        ));
    }
    Ok(body)
}

/// Checks a whole record of the log whose salt is `salt`, held in memory (`bytes` starts with its
/// fixed part); returns its fixed part and body, or why it does not pass.
pub fn check(bytes: &[u8], salt: u32) -> Result<(Fixed, Body), String> {
    let fixed = Fixed::decode(bytes, salt)?;
    let len = fixed.record_len();
    if (bytes.len() as u64) < len {
        return Err(format!("the record runs past the end ({len} bytes, {} there)", bytes.len()));
    }
    let len = len as usize;
    let body = read_meta(&fixed, &bytes[FIXED_LEN..FIXED_LEN + fixed.meta_span() as usize])?;
    let stored = u32::from_le_bytes(bytes[len - 4..len].try_into().unwrap_or_default());
    let mut crc = salted(salt);
    crc.update(&bytes[..len - 4]);
    if crc.finalize() != stored {
        return Err("the record fails its CRC".into());
    }
    Ok((fixed, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_bodies() -> Vec<Body> {
        let tag = BatchTag { producer: Arc::from("p"), sequence: 3, digest: 9 };
        let meta = StreamMeta { content_type: "application/json".into(), ..StreamMeta::default() };
        let defined = Defined { id: StreamId(4), name: Arc::from("a/b"), created: Tick(7), meta };
        let removed = Removed { floor: Tick(100), through: Some(Tick(99)), records: 5, bytes: 50 };
        vec![
            Body::Append {
                created: vec![(StreamId(4), Arc::from("a/b"), Tick(7))],
                tags: vec![(tag, vec![Tick(7), Tick(8)])],
                chunks: vec![
                    ChunkEntry { stream: StreamId(4), first: Tick(7), len: 3 },
                    ChunkEntry { stream: StreamId(5), first: Tick(8), len: 2 },
                ],
            },
            Body::Define { stream: defined.clone(), created: true },
            Body::Delete { id: StreamId(4), name: Arc::from("a/b") },
            Body::Trim { id: StreamId(4), removed },
            Body::Move { chunks: vec![ChunkEntry { stream: StreamId(4), first: Tick(7), len: 5 }] },
            Body::Clock,
            Body::Checkpoint(Checkpoint {
                server_id: "abc".into(),
                next_id: 6,
                streams: vec![(defined, removed)],
                producers: vec![(Arc::from("p"), vec![1, 2, 3])],
            }),
        ]
    }

    fn bytes_of(e: &Encoded, data: &[&[u8]]) -> Vec<u8> {
        let mut v = e.head.clone();
        for d in data {
            v.extend_from_slice(d);
        }
        v.put_u32(e.crc);
        v
    }

    #[test]
    fn every_body_round_trips() {
        for body in sample_bodies() {
            let data: Vec<&[u8]> = match body.kind() {
                Kind::Append => vec![b"abc", b"de"],
                Kind::Move => vec![b"abcde"],
                _ => vec![],
            };
            let encoded = Encoded::new(&body, 77, 42, 0xdead_beef, Tick(1000), FLAG_SYNCED, &data);
            let bytes = bytes_of(&encoded, &data);
            assert_eq!(bytes.len() as u64, encoded.record_len());
            let (fixed, read) = check(&bytes, 77).unwrap();
            assert!(check(&bytes, 78).is_err(), "a record of another log does not pass");
            assert_eq!(read, body);
            assert_eq!(
                (fixed.seq, fixed.prev_crc, fixed.clock, fixed.flags),
                (42, 0xdead_beef, Tick(1000), FLAG_SYNCED)
            );
            assert_eq!(&bytes[encoded.data_offset() as usize..][..data.concat().len()], &data.concat()[..]);
        }
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let body = &sample_bodies()[0];
        let data: [&[u8]; 2] = [b"abc", b"de"];
        let good = bytes_of(&Encoded::new(body, 5, 1, 2, Tick(3), 0, &data), &data);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(check(&bad, 5).is_err(), "flip at {i}");
        }
        for cut in 0..good.len() {
            assert!(check(&good[..cut], 5).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_file_header_names_its_file() {
        let header = FileHeader { file: 7, first_seq: 99, salt: 3 };
        let bytes = header.encode();
        assert_eq!(FileHeader::decode(&bytes), Ok(header));
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert!(FileHeader::decode(&bad).is_err(), "flip at {i}");
        }
        // A newer format, whole: said apart from damage.
        let mut newer = bytes;
        newer[4] = FORMAT + 1;
        let crc = crc32fast::hash(&newer[..FILE_HEADER_LEN as usize - 4]);
        newer[FILE_HEADER_LEN as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FileHeader::decode(&newer), Err(HeaderError::Format(FORMAT + 1)));
    }
}
