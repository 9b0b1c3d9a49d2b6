//! Idempotent publishing: what the broker remembers of each producer, so that a retried batch
//! whose ack was lost is acknowledged again with the same ticks instead of being appended twice.
//!
//! A producer tags each batch with its id and a sequence number that increases from batch to
//! batch (gaps are allowed: a refused batch leaves one). Per producer the broker remembers the
//! last [`WINDOW`] batches it appended: sequence, a digest of the content, and the ticks. A
//! batch's tag is written in the same commit record as its records ([`encode_tags`], see
//! `commit.rs`), so after a crash a batch and the memory of it are both in the log or both absent;
//! the index keeps each producer's state as of the record it has applied, and recovery replays
//! the tags of the records after it ([`Producers::recall`]).
//!
//! Value layout (little-endian): `last_used u64 | n u16 | n × (sequence u64 | digest u32 |
//! n_runs u32 | n_runs × (first_tick u64 | count u32)) | crc u32`. Ticks are kept as runs of
//! consecutive ticks: a batch of broker-assigned ticks is one run, whatever its size.

use super::le::{Put, Reader};
use crate::error::{Error, Result};
use crate::types::{NewRecord, Tick};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Batches remembered per producer (the protocol's window).
pub const WINDOW: usize = crate::protocol::PRODUCER_WINDOW;

/// Longest producer id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// The most a producer's remembered batches take, stored: the state is rewritten with each of
/// its commits. Batches of consecutive ticks take 28 bytes each; a producer whose explicit ticks
/// are scattered has fewer of its last batches remembered, and a single batch too scattered to
/// fit is remembered without its ticks.
pub const MAX_STATE_BYTES: usize = 64 << 10;

/// The idempotence tag of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTag {
    /// Chosen by the producer; stable across its retries and reconnections.
    pub producer: Arc<str>,
    /// Increases from batch to batch; never 0.
    pub sequence: u64,
    /// Digest of the batch's content, to tell a retry from a reused sequence number.
    pub digest: u32,
}

impl BatchTag {
    /// Checks the producer id and sequence, and digests the batch.
    pub fn new(producer: &str, sequence: u64, records: &[NewRecord]) -> Result<BatchTag> {
        if producer.is_empty() || producer.len() > MAX_ID_BYTES || producer.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "producer id {:?} is invalid: it must be 1 to {MAX_ID_BYTES} bytes without control characters",
                truncated(producer)
            )));
        }
        if sequence == 0 {
            return Err(Error::InvalidArgument(format!(
                "producer {producer:?} sent sequence 0: sequences of an idempotent producer start at 1"
            )));
        }
        let mut hasher = crc32fast::Hasher::new();
        for r in records {
            hasher.update(r.stream.as_str().as_bytes());
            hasher.update(&[0]);
            hasher.update(&r.tick.map_or(0, |t| t.0).to_le_bytes());
            hasher.update(&r.origin_time.unwrap_or(0).to_le_bytes());
            hasher.update(&r.crc32.to_le_bytes());
            for (k, v) in &r.headers {
                hasher.update(k.as_bytes());
                hasher.update(&[0]);
                hasher.update(v.as_bytes());
                hasher.update(&[0]);
            }
        }
        Ok(BatchTag { producer: Arc::from(producer), sequence, digest: hasher.finalize() })
    }
}

fn truncated(s: &str) -> &str {
    let mut end = s.len().min(MAX_ID_BYTES + 8);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One remembered batch.
#[derive(Debug, Clone, PartialEq)]
struct Remembered {
    sequence: u64,
    digest: u32,
    /// The batch's ticks as runs of consecutive ticks: (first, count).
    runs: Vec<(u64, u32)>,
}

impl Remembered {
    /// Appends `sequence u64 | digest u32 | n_runs u32 | n_runs × (first_tick u64 | count u32)`.
    fn write(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.sequence.to_le_bytes());
        v.extend_from_slice(&self.digest.to_le_bytes());
        v.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for (first, count) in &self.runs {
            v.extend_from_slice(&first.to_le_bytes());
            v.extend_from_slice(&count.to_le_bytes());
        }
    }

    /// What it takes stored.
    fn size(&self) -> usize {
        16 + 12 * self.runs.len()
    }

    fn ticks(&self) -> Vec<Tick> {
        self.runs
            .iter()
            .flat_map(|&(first, count)| (first..first.saturating_add(u64::from(count))).map(Tick))
            .collect()
    }
}

fn runs(ticks: &[Tick]) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for t in ticks {
        match runs.last_mut() {
            Some((first, count))
                if first.checked_add(u64::from(*count)) == Some(t.0) && *count < u32::MAX =>
            {
                *count += 1
            }
            _ => runs.push((t.0, 1)),
        }
    }
    runs
}

/// What the broker remembers of one producer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Producer {
    /// The most recent appended batches, oldest first.
    batches: VecDeque<Remembered>,
    /// When the producer last appended (the broker's tick), to forget the least recent first.
    last_used: Tick,
}

/// What a tagged batch is, given what the producer appended before.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// Not appended before: append it.
    New,
    /// Appended before with these ticks: acknowledge again, append nothing.
    Duplicate(Vec<Tick>),
}

/// Every producer the broker remembers. Owned by the writer thread.
#[derive(Debug, Default)]
pub struct Producers {
    map: HashMap<Arc<str>, Producer>,
}

impl Producers {
    /// Decides whether a tagged batch is new or a retry of an appended one.
    pub fn check(&self, tag: &BatchTag) -> Result<Seen> {
        let Some(producer) = self.map.get(&tag.producer) else { return Ok(Seen::New) };
        let Some(last) = producer.batches.back() else { return Ok(Seen::New) };
        if tag.sequence > last.sequence {
            return Ok(Seen::New);
        }
        match producer.batches.iter().find(|b| b.sequence == tag.sequence) {
            Some(b) if b.digest == tag.digest && b.runs.is_empty() => {
                Err(Error::TicksForgotten { producer: tag.producer.to_string(), sequence: tag.sequence })
            }
            Some(b) if b.digest == tag.digest => Ok(Seen::Duplicate(b.ticks())),
            Some(_) => {
                Err(Error::SequenceReused { producer: tag.producer.to_string(), sequence: tag.sequence })
            }
            None => Err(Error::SequenceNotAfter {
                producer: tag.producer.to_string(),
                sequence: tag.sequence,
                last: last.sequence,
                window: WINDOW,
            }),
        }
    }

    /// Remembers an appended batch. When more than `max` producers are remembered, forgets the
    /// least recently used one and returns it (its stored state must be removed).
    pub fn remember(
        &mut self,
        tag: &BatchTag,
        ticks: &[Tick],
        now: Tick,
        max: usize,
    ) -> Option<(Arc<str>, Producer)> {
        let producer = self.map.entry(tag.producer.clone()).or_default();
        producer.last_used = now;
        let mut remembered = Remembered { sequence: tag.sequence, digest: tag.digest, runs: runs(ticks) };
        if remembered.size() > MAX_STATE_BYTES {
            remembered.runs = Vec::new();
        }
        producer.batches.push_back(remembered);
        let mut size: usize = producer.batches.iter().map(Remembered::size).sum();
        while producer.batches.len() > WINDOW || size > MAX_STATE_BYTES {
            let Some(oldest) = producer.batches.pop_front() else { break };
            size -= oldest.size();
        }
        if self.map.len() <= max {
            return None;
        }
        // Never the producer just remembered, whatever the clocks say.
        let oldest = self
            .map
            .iter()
            .filter(|(id, _)| **id != tag.producer)
            .min_by_key(|(_, p)| p.last_used)
            .map(|(id, _)| id.clone())?;
        let state = self.map.remove(&oldest)?;
        Some((oldest, state))
    }

    /// What is remembered of producer `id`.
    pub fn get(&self, id: &str) -> Option<&Producer> {
        self.map.get(id)
    }

    /// Marks a producer as used at `now` (the clock of the commit record holding its batch, so
    /// that replaying the log remembers the same order of use).
    pub fn touch(&mut self, id: &str, now: Tick) {
        if let Some(p) = self.map.get_mut(id) {
            p.last_used = now;
        }
    }

    /// Forgets one producer.
    pub fn forget(&mut self, id: &str) {
        self.map.remove(id);
    }

    /// Every producer remembered.
    pub fn ids(&self) -> Vec<Arc<str>> {
        self.map.keys().cloned().collect()
    }

    /// Forgets every producer (a checkpoint replaces them all).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Producers remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Restores a producer read back from storage.
    pub fn restore(&mut self, id: Arc<str>, producer: Producer) {
        self.map.insert(id, producer);
    }

    /// The stored form of a producer's state.
    pub fn encode(&self, id: &str) -> Option<Vec<u8>> {
        let p = self.map.get(id)?;
        let mut v = Vec::with_capacity(16 + p.batches.len() * 32);
        v.extend_from_slice(&p.last_used.0.to_le_bytes());
        v.extend_from_slice(&(p.batches.len() as u16).to_le_bytes());
        for b in &p.batches {
            b.write(&mut v);
        }
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        Some(v)
    }
}

/// The tags of a commit's idempotent batches with their ticks, in commit order, as a commit
/// record carries them. Layout (little-endian): `n u32 | n × (id_len u8 | id | sequence u64 |
/// digest u32 | n_runs u32 | n_runs × (first_tick u64 | count u32))`.
pub fn encode_tags<'a>(tags: impl Iterator<Item = (&'a BatchTag, &'a [Tick])>) -> Vec<u8> {
    let mut v = vec![0; 4];
    let mut n: u32 = 0;
    for (tag, ticks) in tags {
        // Producer ids are at most MAX_ID_BYTES (checked in BatchTag::new).
        v.put_short(tag.producer.as_bytes());
        Remembered { sequence: tag.sequence, digest: tag.digest, runs: runs(ticks) }.write(&mut v);
        n += 1;
    }
    v[..4].copy_from_slice(&n.to_le_bytes());
    v
}

/// Reads tags written by [`encode_tags`].
pub fn decode_tags(bytes: &[u8]) -> std::result::Result<Vec<(BatchTag, Vec<Tick>)>, String> {
    let mut r = Reader(bytes);
    let n = r.u32()?;
    let mut tags = Vec::with_capacity((n as usize).min(r.remaining() / 17));
    for _ in 0..n {
        let producer: Arc<str> = Arc::from(String::from_utf8_lossy(r.short()?).as_ref());
        let batch = remembered(&mut r)?;
        let tag = BatchTag { producer, sequence: batch.sequence, digest: batch.digest };
        tags.push((tag, batch.ticks()));
    }
    r.end()?;
    Ok(tags)
}

impl Producers {
    /// Remembers, while recovering, a batch found in a commit record, unless the stored state
    /// already knows it (or knows later batches beyond it). Returns whether it was new. No
    /// producer is forgotten here: the limit applies again from the next append.
    pub fn recall(&mut self, tag: &BatchTag, ticks: &[Tick], now: Tick) -> bool {
        if !matches!(self.check(tag), Ok(Seen::New)) {
            return false;
        }
        self.remember(tag, ticks, now, usize::MAX);
        true
    }
}

/// Reads a producer's stored state back; the error says what is wrong with it.
pub fn decode(value: &[u8]) -> std::result::Result<Producer, String> {
    let Some((body, crc)) = value.split_last_chunk::<4>() else {
        return Err(format!("state of {} bytes is too short", value.len()));
    };
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return Err("state fails its CRC".into());
    }
    let mut r = Reader(body);
    let last_used = Tick(r.u64()?);
    let n = r.u16()?;
    let mut batches = VecDeque::with_capacity(usize::from(n));
    for _ in 0..n {
        batches.push_back(remembered(&mut r)?);
    }
    r.end()?;
    Ok(Producer { batches, last_used })
}

/// One batch as [`Remembered::write`] wrote it.
fn remembered(r: &mut Reader) -> std::result::Result<Remembered, String> {
    let sequence = r.u64()?;
    let digest = r.u32()?;
    let n_runs = r.u32()?;
    let mut runs = Vec::with_capacity((n_runs as usize).min(r.remaining() / 12));
    for _ in 0..n_runs {
        let (first, count) = (r.u64()?, r.u32()?);
        if first.checked_add(u64::from(count)).is_none() {
            return Err(format!("a run of {count} ticks from {first} runs past the last tick"));
        }
        runs.push((first, count));
    }
    Ok(Remembered { sequence, digest, runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(sequence: u64, digest: u32) -> BatchTag {
        BatchTag { producer: Arc::from("p"), sequence, digest }
    }

    #[test]
    fn retries_are_recognised_and_reuse_refused() {
        let mut p = Producers::default();
        assert_eq!(p.check(&tag(1, 7)).unwrap(), Seen::New);
        p.remember(&tag(1, 7), &[Tick(10), Tick(11), Tick(20)], Tick(1), 10);
        assert_eq!(p.check(&tag(1, 7)).unwrap(), Seen::Duplicate(vec![Tick(10), Tick(11), Tick(20)]));
        assert!(matches!(p.check(&tag(1, 8)), Err(Error::SequenceReused { sequence: 1, .. })));
        assert_eq!(p.check(&tag(5, 1)).unwrap(), Seen::New, "gaps are allowed");
        p.remember(&tag(5, 1), &[Tick(30)], Tick(2), 10);
        assert!(matches!(p.check(&tag(3, 1)), Err(Error::SequenceNotAfter { last: 5, .. })));
    }

    #[test]
    fn only_the_window_is_remembered_and_state_round_trips() {
        let mut p = Producers::default();
        for s in 1..=(WINDOW as u64 + 10) {
            p.remember(&tag(s, s as u32), &[Tick(s * 100), Tick(s * 100 + 1)], Tick(s), 10);
        }
        assert!(matches!(p.check(&tag(10, 10)), Err(Error::SequenceNotAfter { .. })));
        assert_eq!(p.check(&tag(11, 11)).unwrap(), Seen::Duplicate(vec![Tick(1100), Tick(1101)]));
        let stored = p.encode("p").unwrap();
        assert_eq!(decode(&stored).unwrap(), p.map["p"]);
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn a_producer_of_scattered_ticks_is_remembered_within_its_bound() {
        let mut p = Producers::default();
        // 128 batches of 100 ticks, none consecutive: 1,216 bytes each stored.
        for s in 1..=(WINDOW as u64) {
            let ticks: Vec<Tick> = (0..100).map(|i| Tick(s * 1_000_000 + i * 2)).collect();
            p.remember(&tag(s, s as u32), &ticks, Tick(s), 10);
        }
        let stored = p.encode("p").unwrap().len();
        assert!(stored <= MAX_STATE_BYTES + 16, "{stored} bytes stored");
        let kept = p.map["p"].batches.len();
        assert!((50..WINDOW).contains(&kept), "{kept} batches kept");
        let newest: Vec<Tick> = (0..100).map(|i| Tick(WINDOW as u64 * 1_000_000 + i * 2)).collect();
        assert_eq!(p.check(&tag(WINDOW as u64, WINDOW as u32)).unwrap(), Seen::Duplicate(newest));
        assert!(
            matches!(p.check(&tag(1, 1)), Err(Error::SequenceNotAfter { .. })),
            "the oldest are forgotten"
        );

        // One batch too scattered to fit: remembered without its ticks, so a retry is still
        // never appended twice.
        let scattered: Vec<Tick> = (0..10_000).map(|i| Tick((1 << 40) | (i * 2))).collect();
        p.remember(&tag(1000, 5), &scattered, Tick(1000), 10);
        assert!(p.encode("p").unwrap().len() <= MAX_STATE_BYTES + 16);
        assert!(matches!(p.check(&tag(1000, 5)), Err(Error::TicksForgotten { sequence: 1000, .. })));
        assert_eq!(decode(&p.encode("p").unwrap()).unwrap(), p.map["p"]);
    }

    #[test]
    fn least_recently_used_producer_is_forgotten_beyond_the_limit() {
        let mut p = Producers::default();
        let named = |id: &str| BatchTag { producer: Arc::from(id), sequence: 1, digest: 0 };
        assert_eq!(p.remember(&named("a"), &[Tick(1)], Tick(1), 2), None);
        assert_eq!(p.remember(&named("b"), &[Tick(2)], Tick(2), 2), None);
        assert_eq!(p.remember(&named("c"), &[Tick(3)], Tick(3), 2).map(|(id, _)| id).as_deref(), Some("a"));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn tags_round_trip_and_are_recalled_once() {
        let a = tag(3, 9);
        let b = BatchTag { producer: Arc::from("other"), sequence: 1, digest: 2 };
        let ticks_a = [Tick(100), Tick(101), Tick(105)];
        let ticks_b = [Tick(106)];
        let bytes = encode_tags([(&a, &ticks_a[..]), (&b, &ticks_b[..])].into_iter());
        let tags = decode_tags(&bytes).unwrap();
        assert_eq!(tags, vec![(a.clone(), ticks_a.to_vec()), (b.clone(), ticks_b.to_vec())]);
        assert!(decode_tags(&bytes[..bytes.len() - 1]).is_err());

        // The stored state is one commit behind: the trailer's batch is recalled; a batch the
        // state already holds, or one older than what it holds, is not.
        let mut p = Producers::default();
        p.remember(&tag(2, 1), &[Tick(50)], Tick(50), 10);
        assert!(p.recall(&a, &ticks_a, Tick(105)));
        assert_eq!(p.check(&a).unwrap(), Seen::Duplicate(ticks_a.to_vec()));
        assert!(!p.recall(&a, &ticks_a, Tick(105)));
        assert!(!p.recall(&tag(1, 1), &[Tick(10)], Tick(10)));
        assert_eq!(p.check(&tag(2, 1)).unwrap(), Seen::Duplicate(vec![Tick(50)]));
    }
}
