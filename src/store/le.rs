//! Little-endian writing and bounds-checked reading of the store's binary formats (commit
//! records, index values, producer state). A reader never panics and never reads past its slice:
//! every format is read from disk, where any byte may be damaged.

/// Appends little-endian integers and length-prefixed bytes to a buffer.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    /// `len u8 | bytes`; `bytes` is at most 255 bytes (stream names, producer ids).
    fn put_short(&mut self, bytes: &[u8]);
    /// `len u32 | bytes`.
    fn put_long(&mut self, bytes: &[u8]);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_short(&mut self, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(255)];
        self.push(bytes.len() as u8);
        self.extend_from_slice(bytes);
    }
    fn put_long(&mut self, bytes: &[u8]) {
        self.put_u32(bytes.len() as u32);
        self.extend_from_slice(bytes);
    }
}

/// Reads little-endian integers from a slice, failing instead of reading past its end.
pub struct Reader<'a>(pub &'a [u8]);

/// Why a value could not be read.
pub type Malformed = String;

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let Some((head, rest)) = self.0.split_first_chunk::<N>() else {
            return Err(format!("ends early: {N} bytes wanted, {} left", self.0.len()));
        };
        self.0 = rest;
        Ok(*head)
    }
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        self.take::<1>().map(|[b]| b)
    }
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        self.take().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        self.take().map(u32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        self.take().map(u64::from_le_bytes)
    }
    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(format!("ends early: {n} bytes wanted, {} left", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    /// Bytes written by [`Put::put_short`].
    pub fn short(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u8()?;
        self.bytes(usize::from(n))
    }
    /// Bytes written by [`Put::put_long`].
    pub fn long(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u32()?;
        self.bytes(n as usize)
    }
    /// A text written by `put_short`, checked to be UTF-8.
    pub fn short_text(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.short()?).map_err(|_| "a name is not UTF-8".to_string())
    }
    /// Fails unless every byte was read.
    pub fn end(&self) -> Result<(), Malformed> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} stray bytes at the end", self.0.len()))
        }
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_short_input_fails() {
        let mut v = Vec::new();
        v.put_u8(1);
        v.put_u16(2);
        v.put_u32(3);
        v.put_u64(4);
        v.put_short(b"name");
        v.put_long(b"long value");
        let mut r = Reader(&v);
        assert_eq!((r.u8(), r.u16(), r.u32(), r.u64()), (Ok(1), Ok(2), Ok(3), Ok(4)));
        assert_eq!(r.short_text(), Ok("name"));
        assert_eq!(r.long(), Ok(&b"long value"[..]));
        assert!(r.end().is_ok());
        for cut in 0..v.len() {
            let mut r = Reader(&v[..cut]);
            let read = (|| {
                r.u8()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.short()?;
                r.long()
            })();
            assert!(read.is_err(), "cut at {cut}");
        }
    }
}
