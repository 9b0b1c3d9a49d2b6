//! Walking the commit records of one chunk file in order, checking each: what recovery replays
//! and `tapeline verify` checks.
//!
//! Each step reads a record's fixed part, its meta and its data through a window of the file
//! (one `pread` per window rather than three per record), and says how much of the record checks
//! out: a fixed part that fails its CRC tells nothing (not even the record's length), a meta that
//! fails tells the length but not the chunks, and data that fails `record_crc` leaves the
//! chunk directory usable (each chunk has its own CRCs, which reads check).

use super::commit::{self, Body, FileHeader, Fixed, HeaderError, FILE_HEADER_LEN, FIXED_LEN, RECORD_MAGIC};
use super::files::RecordAt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Bytes read from the file at once.
const WINDOW: usize = 1 << 20;

/// A record whose fixed part checks out.
#[derive(Debug)]
pub struct Scanned {
    pub fixed: Fixed,
    /// The meta, or why it does not check out.
    pub body: Result<Body, String>,
    pub at: RecordAt,
    /// `record_crc` as stored at the record's end.
    pub stored_crc: u32,
    /// Whether the whole record matches `record_crc`.
    pub intact: bool,
}

impl Scanned {
    /// Where the data starts, from the start of the record.
    pub fn data_offset(&self) -> u64 {
        FIXED_LEN as u64 + self.fixed.meta_span()
    }

    /// The record's body if the whole record checks out.
    pub fn whole(&self) -> Option<&Body> {
        self.body.as_ref().ok().filter(|_| self.intact)
    }
}

/// One step of a walk.
#[derive(Debug)]
pub enum Step {
    /// A record (see [`Scanned`] for how much of it checks out); the walk goes on after it.
    Record(Scanned),
    /// The file ends here, after a whole record (or its header).
    End,
    /// Nothing at this offset is a record: a torn write, or damage. The walk stops.
    Bad { at: u64, detail: String },
}

/// A walk over one file.
pub struct Walk<'a> {
    file: &'a File,
    id: u32,
    /// The log's salt, which the records' CRCs start from.
    salt: u32,
    len: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl<'a> Walk<'a> {
    /// A walk of file `id` of the log whose salt is `salt`, from its first record.
    pub fn new(file: &'a File, id: u32, salt: u32) -> io::Result<Walk<'a>> {
        let len = file.metadata()?.len();
        Ok(Walk { file, id, salt, len, pos: FILE_HEADER_LEN, buf: Vec::new(), buf_at: 0 })
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Continues from `pos` (the end of a record applied before).
    pub fn seek(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// The file's header, checked against the file's id.
    pub fn header(&mut self) -> io::Result<Result<FileHeader, HeaderError>> {
        let bytes = self.bytes(0, FILE_HEADER_LEN as usize)?;
        Ok(FileHeader::decode(&bytes).and_then(|h| {
            if h.file == self.id {
                Ok(h)
            } else {
                let detail =
                    format!("the file's header names file {}: a file copied under another name", h.file);
                Err(HeaderError::Damaged(detail))
            }
        }))
    }

    /// `len` bytes at `at` (fewer at the end of the file), read through the window.
    fn window(&mut self, at: u64, len: usize) -> io::Result<&[u8]> {
        if at >= self.len {
            return Ok(&[]);
        }
        let end = (at + len as u64).min(self.len);
        if at < self.buf_at || end > self.buf_at + self.buf.len() as u64 {
            let want = (self.len - at).min(WINDOW.max(len) as u64) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, at)?;
            self.buf_at = at;
        }
        let from = (at - self.buf_at) as usize;
        Ok(&self.buf[from..from + (end - at) as usize])
    }

    /// The same, copied out of the window.
    fn bytes(&mut self, at: u64, len: usize) -> io::Result<Vec<u8>> {
        self.window(at, len).map(<[u8]>::to_vec)
    }

    /// Feeds `len` bytes at `at` to `hasher`, a window at a time.
    fn hash(&mut self, hasher: &mut crc32fast::Hasher, mut at: u64, len: u64) -> io::Result<()> {
        let end = at + len;
        while at < end {
            let n = (end - at).min(WINDOW as u64) as usize;
            hasher.update(self.window(at, n)?);
            at += n as u64;
        }
        Ok(())
    }

    /// Reads the record at the walk's position.
    pub fn next_step(&mut self) -> io::Result<Step> {
        let at = self.pos;
        if at >= self.len {
            return Ok(Step::End);
        }
        match self.record_at(at)? {
            Ok(scanned) => {
                self.pos = scanned.at.end;
                Ok(Step::Record(scanned))
            }
            Err(detail) => Ok(Step::Bad { at, detail }),
        }
    }

    /// The record at `at`, or why there is none.
    fn record_at(&mut self, at: u64) -> io::Result<Result<Scanned, String>> {
        let fixed_bytes = self.bytes(at, FIXED_LEN)?;
        let fixed = match Fixed::decode(&fixed_bytes, self.salt) {
            Ok(fixed) => fixed,
            Err(detail) => return Ok(Err(detail)),
        };
        let end = at + fixed.record_len();
        if end > self.len {
            return Ok(Err(format!(
                "a record of {} bytes runs past the end of the file",
                fixed.record_len()
            )));
        }
        let meta = self.bytes(at + FIXED_LEN as u64, fixed.meta_span() as usize)?;
        let body = commit::read_meta(&fixed, &meta);
        let mut hasher = commit::salted(self.salt);
        hasher.update(&fixed_bytes);
        hasher.update(&meta);
        let data_at = at + FIXED_LEN as u64 + fixed.meta_span();
        self.hash(&mut hasher, data_at, u64::from(fixed.data_len))?;
        let stored = self.bytes(end - 4, 4)?;
        let stored_crc = u32::from_le_bytes(stored.try_into().unwrap_or_default());
        let intact = hasher.finalize() == stored_crc;
        let at = RecordAt { file: self.id, start: at, end };
        Ok(Ok(Scanned { fixed, body, at, stored_crc, intact }))
    }

    /// The first whole record at or after `from` whose sequence number is at least `min_seq`:
    /// whether a bad stretch is followed by good records (damage) or by nothing (a torn tail).
    /// Only records of this log pass (their CRCs start from its salt), whatever the bytes hold.
    pub fn find_whole(&mut self, from: u64, min_seq: u64) -> io::Result<Option<Scanned>> {
        let mut at = from.max(FILE_HEADER_LEN);
        while at + FIXED_LEN as u64 <= self.len {
            let n = ((self.len - at) as usize).min(WINDOW);
            let window = self.window(at, n)?;
            let Some(found) = window.windows(4).position(|w| w == RECORD_MAGIC) else {
                // The magic may straddle two windows.
                at += (n as u64).saturating_sub(3).max(1);
                continue;
            };
            let candidate = at + found as u64;
            // The fixed part first, from the window: most candidates fail it, cheaply.
            let salt = self.salt;
            let fixed = self.window(candidate, FIXED_LEN).map(|b| Fixed::decode(b, salt))?;
            if fixed.is_ok_and(|f| f.seq >= min_seq) {
                if let Ok(scanned) = self.record_at(candidate)? {
                    if scanned.intact && scanned.body.is_ok() {
                        return Ok(Some(scanned));
                    }
                }
            }
            at = candidate + 1;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commit::{ChunkEntry, Encoded};
    use crate::store::files::{Appender, ChunkFiles};
    use crate::types::{StreamId, Tick};

    fn write(app: &mut Appender, data: &[u8]) {
        let (seq, prev) = app.chain();
        let chunks = vec![ChunkEntry { stream: StreamId(0), first: Tick(seq), len: data.len() as u32 }];
        let body = Body::Append { created: Vec::new(), tags: Vec::new(), chunks };
        app.append(&Encoded::new(&body, app.salt(), seq, prev, Tick(seq), 0, &[data]), &[data]).unwrap();
    }

    #[test]
    fn a_walk_reads_every_record_and_tells_damage_from_a_torn_end() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(dir.path()).unwrap();
        let mut app = Appender::create(files.clone(), 0, 1, 0, 5, 1 << 30).unwrap();
        let big = vec![9u8; 3 * WINDOW];
        for data in [&b"first"[..], &big, b"third", b"fourth"] {
            write(&mut app, data);
        }
        let file = files.file(0).unwrap();
        let mut walk = Walk::new(&file, 0, 5).unwrap();
        assert_eq!(walk.header().unwrap().unwrap().first_seq, 1);
        let mut records = Vec::new();
        while let Step::Record(r) = walk.next_step().unwrap() {
            assert!(r.intact && r.body.is_ok());
            records.push(r);
        }
        assert_eq!(records.iter().map(|r| r.fixed.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);

        // A byte of the third record's data damaged: its meta still reads, the fourth follows.
        let third = records[2].at;
        file.write_all_at(b"X", third.end - 6).unwrap();
        let mut walk = Walk::new(&file, 0, 5).unwrap();
        walk.seek(third.start);
        let Step::Record(r) = walk.next_step().unwrap() else { panic!() };
        assert!(!r.intact && r.body.is_ok());
        assert_eq!(walk.find_whole(third.start + 1, 4).unwrap().unwrap().fixed.seq, 4);

        // The last record cut short: nothing whole follows it.
        let fourth = records[3].at;
        file.set_len(fourth.end - 3).unwrap();
        let mut walk = Walk::new(&file, 0, 5).unwrap();
        walk.seek(fourth.start);
        assert!(matches!(walk.next_step().unwrap(), Step::Bad { .. }));
        assert!(walk.find_whole(fourth.start, 4).unwrap().is_none());
    }
}
