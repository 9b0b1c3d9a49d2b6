//! The index as readers see it: sled's pointers, and those of commit records written but not yet
//! applied to sled.
//!
//! Why: applying each group commit to sled on its own took sled's batch machinery (two
//! synchronous writes of its log buffers per `apply_batch`) into every commit; the applier thread
//! now applies many commits in one batch (`applier.rs`), and the pointers of the commits not
//! applied yet are kept here, in memory, so that a reader finds every committed chunk at once.
//!
//! Invariants:
//! - A pointer is added here before its commit is published, and removed only once it is in
//!   sled: a reader that reads this overlay first and sled second never misses a chunk that moves
//!   from one to the other in between.
//! - Only group commits wait to be applied (their keys are new): every other record is applied to
//!   sled at once, after the commits before it, so the overlay never holds a pointer sled would
//!   remove or replace.
//! - Bounded by the applier's queue, and by what it applies at a time.

use super::index::{Index, Pointer};
use crate::error::Result;
use crate::types::{StreamId, Tick};
use std::collections::BTreeMap;
use std::iter::Peekable;
use std::sync::{Arc, RwLock};

/// sled's pointers with the overlay of those not applied yet.
pub struct View {
    index: Arc<Index>,
    overlay: RwLock<BTreeMap<(u32, u64), Pointer>>,
}

impl View {
    pub fn new(index: Arc<Index>) -> View {
        View { index, overlay: RwLock::default() }
    }

    /// The index itself.
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// Adds the pointer of a chunk written but not applied to sled yet.
    pub fn add(&self, id: StreamId, tick: Tick, pointer: Pointer) {
        self.overlay.write().unwrap_or_else(|e| e.into_inner()).insert((id.0, tick.0), pointer);
    }

    /// Forgets pointers now in sled (each unless it changed since).
    pub fn applied(&self, pointers: &[(StreamId, Tick, Pointer)]) {
        let mut overlay = self.overlay.write().unwrap_or_else(|e| e.into_inner());
        for (id, tick, pointer) in pointers {
            if overlay.get(&(id.0, tick.0)) == Some(pointer) {
                overlay.remove(&(id.0, tick.0));
            }
        }
    }

    /// Pointers waiting to be applied.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.overlay.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn overlay_range(&self, id: StreamId, from: Tick, upto: Tick) -> Vec<(Tick, Pointer)> {
        let overlay = self.overlay.read().unwrap_or_else(|e| e.into_inner());
        overlay.range((id.0, from.0)..=(id.0, upto.0)).map(|(&(_, t), p)| (Tick(t), *p)).collect()
    }

    /// The pointers of stream `id` with a first tick in `from..=upto`, in order. The overlay is
    /// read first (see the module's invariants).
    pub fn range(
        &self,
        id: StreamId,
        from: Tick,
        upto: Tick,
    ) -> Merged<impl Iterator<Item = Result<(Tick, Pointer)>>> {
        let overlay = self.overlay_range(id, from, upto);
        Merged { sled: self.index.range(id, from, upto).peekable(), overlay: overlay.into_iter().peekable() }
    }

    /// The pointer of stream `id`'s chunk that starts at or before `tick`, the last such.
    pub fn at_or_before(&self, id: StreamId, tick: Tick) -> Result<Option<(Tick, Pointer)>> {
        let overlay = self.overlay_range(id, Tick(0), tick).pop();
        let sled = self.index.at_or_before(id, tick)?;
        Ok(match (overlay, sled) {
            (Some(o), Some(s)) if s.0 > o.0 => Some(s),
            (Some(o), _) => Some(o),
            (None, s) => s,
        })
    }

    /// The pointer of stream `id`'s first chunk starting after `tick`.
    pub fn after(&self, id: StreamId, tick: Tick) -> Result<Option<(Tick, Pointer)>> {
        if tick == Tick(u64::MAX) {
            return Ok(None);
        }
        self.range(id, Tick(tick.0 + 1), Tick(u64::MAX)).next().transpose()
    }

    /// The pointer under stream `id`'s key `tick`, if any.
    pub fn get(&self, id: StreamId, tick: Tick) -> Result<Option<Pointer>> {
        let overlay = self.overlay.read().unwrap_or_else(|e| e.into_inner()).get(&(id.0, tick.0)).copied();
        match overlay {
            Some(pointer) => Ok(Some(pointer)),
            None => self.index.get(id, tick),
        }
    }

    /// Every pointer once: a snapshot of the overlay, then sled's but those the snapshot holds
    /// (for compaction's plan, which only looks for the chunks of older files: the order does not
    /// matter, and a commit added after the snapshot is in the active file).
    pub fn all(&self) -> impl Iterator<Item = Result<(StreamId, Tick, Pointer)>> + '_ {
        let overlay: BTreeMap<(u32, u64), Pointer> =
            self.overlay.read().unwrap_or_else(|e| e.into_inner()).clone();
        let snapshot: Vec<(StreamId, Tick, Pointer)> =
            overlay.iter().map(|(&(id, t), p)| (StreamId(id), Tick(t), *p)).collect();
        let sled = self.index.pointers().filter(move |entry| {
            // Already given: applied to sled since the snapshot.
            !matches!(entry, Ok((id, t, _)) if overlay.contains_key(&(id.0, t.0)))
        });
        snapshot.into_iter().map(Ok).chain(sled)
    }
}

/// sled's pointers of a range merged with the overlay's, in key order; the overlay's wins on a
/// key that is in both.
pub struct Merged<I: Iterator<Item = Result<(Tick, Pointer)>>> {
    sled: Peekable<I>,
    overlay: Peekable<std::vec::IntoIter<(Tick, Pointer)>>,
}

impl<I: Iterator<Item = Result<(Tick, Pointer)>>> Iterator for Merged<I> {
    type Item = Result<(Tick, Pointer)>;

    fn next(&mut self) -> Option<Self::Item> {
        let next_overlay = self.overlay.peek().map(|(t, _)| *t);
        match (self.sled.peek(), next_overlay) {
            (None, None) => None,
            (None, Some(_)) => self.overlay.next().map(Ok),
            (Some(Err(_)), _) => self.sled.next(),
            (Some(Ok((s, _))), Some(o)) if o <= *s => {
                if *s == o {
                    self.sled.next();
                }
                self.overlay.next().map(Ok)
            }
            (Some(Ok(_)), _) => self.sled.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::files::Location;

    fn pointer(file: u32) -> Pointer {
        Pointer { at: Location { file, offset: 24, len: 10 }, seq: 1 }
    }

    #[test]
    fn reads_merge_sled_and_the_overlay_in_key_order() {
        use crate::store::commit::{Body, ChunkEntry, Fixed, Kind};
        use crate::store::files::RecordAt;
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(dir.path(), 1 << 20).unwrap());
        // In sled: stream 1's chunks at 10 and 20 (in file 1).
        let chunks = vec![
            ChunkEntry { stream: StreamId(1), first: Tick(10), len: 10 },
            ChunkEntry { stream: StreamId(1), first: Tick(20), len: 10 },
        ];
        let body = Body::Append { created: Vec::new(), tags: Vec::new(), chunks };
        let fixed = Fixed {
            kind: Kind::Append,
            flags: 0,
            seq: 1,
            prev_crc: 0,
            clock: Tick(20),
            meta_len: 0,
            data_len: 20,
        };
        index.apply(&fixed, &body, RecordAt { file: 1, start: 0, end: 100 }, 0, 4, &[]).unwrap();
        let view = View::new(index);
        // Not applied yet: 20 again (the same key: the overlay's wins) and 40; another stream's 30.
        view.add(StreamId(1), Tick(20), pointer(2));
        view.add(StreamId(1), Tick(40), pointer(4));
        view.add(StreamId(2), Tick(30), pointer(9));
        let files = |v: &View| {
            v.range(StreamId(1), Tick(0), Tick::MAX)
                .map(|e| e.unwrap())
                .map(|(t, p)| (t.0, p.at.file))
                .collect::<Vec<_>>()
        };
        assert_eq!(files(&view), vec![(10, 1), (20, 2), (40, 4)]);
        assert_eq!(view.at_or_before(StreamId(1), Tick(19)).unwrap().map(|(t, _)| t), Some(Tick(10)));
        assert_eq!(view.at_or_before(StreamId(1), Tick(39)).unwrap().map(|(t, _)| t), Some(Tick(20)));
        assert_eq!(view.after(StreamId(1), Tick(20)).unwrap().map(|(t, _)| t), Some(Tick(40)));
        assert_eq!(view.get(StreamId(2), Tick(30)).unwrap(), Some(pointer(9)));
        assert_eq!(view.get(StreamId(1), Tick(10)).unwrap().map(|p| p.at.file), Some(1));
        assert_eq!(view.all().count(), 4, "the key in both counts once");
        view.applied(&[(StreamId(1), Tick(40), pointer(4)), (StreamId(1), Tick(20), pointer(5))]);
        assert_eq!(view.waiting(), 2, "a pointer that changed since is kept");
    }
}
