//! The disk budget: refuses a write before it could fill the disk or pass `max_disk_bytes`.
//!
//! A write that meets a full disk anyway is undone and refused (`writer.rs`), but the index
//! (sled) needs room too, and a broker that keeps a reserve never gets there: each batch is
//! admitted against the free space (keeping `min_free_disk_bytes` in reserve) and the configured
//! maximum.
//! Both figures are read from the filesystem at most once per [`REFRESH`] and, in between,
//! lowered by an estimate of what was written, so a burst cannot overshoot by more than the
//! reserve. Once space is freed, the next reading admits batches again.

use super::files::ChunkFiles;
use super::index::Index;
use crate::error::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the real figures are read.
pub const REFRESH: Duration = Duration::from_millis(500);

/// What the log writes per payload byte at most (the chunk files, with each record's framing,
/// and the index), used to estimate growth between two readings, where overestimating only
/// refuses a burst a little early.
const AMPLIFICATION: u64 = 2;

/// The writer's view of the disk.
pub struct Space {
    index: Arc<Index>,
    chunks: Arc<ChunkFiles>,
    dir: PathBuf,
    max_disk_bytes: Option<u64>,
    min_free_bytes: u64,
    /// Bytes the data dir takes and bytes free, as last read, less the estimate since.
    used: u64,
    free: u64,
    read_at: Option<Instant>,
}

impl Space {
    /// A budget for the log in `dir`.
    pub fn new(
        index: Arc<Index>,
        chunks: Arc<ChunkFiles>,
        dir: PathBuf,
        max_disk_bytes: Option<u64>,
        min_free_bytes: u64,
    ) -> Space {
        Space { index, chunks, dir, max_disk_bytes, min_free_bytes, used: 0, free: u64::MAX, read_at: None }
    }

    fn refresh(&mut self) {
        if self.read_at.is_some_and(|at| at.elapsed() < REFRESH) {
            return;
        }
        self.read_at = Some(Instant::now());
        match self.index.size_on_disk() {
            Ok(used) => self.used = used + self.chunks.total_bytes(),
            Err(err) => tracing::warn!(cause = %err, "cannot read the data dir's size"),
        }
        match fs4::available_space(&self.dir) {
            Ok(free) => self.free = free,
            Err(err) => {
                tracing::warn!(cause = %err, dir = %self.dir.display(), "cannot read the free disk space")
            }
        }
    }

    /// Admits a batch of about `bytes` payload bytes, or says which limit it would pass.
    pub fn admit(&mut self, bytes: usize) -> Result<()> {
        self.refresh();
        let growth = (bytes as u64).saturating_mul(AMPLIFICATION);
        if let Some(limit) = self.max_disk_bytes {
            if self.used.saturating_add(growth) > limit {
                return Err(Error::DiskFull {
                    used: self.used,
                    free: self.free,
                    needed: growth,
                    rule: format!("the data dir may take at most {limit} bytes (max_disk_bytes)"),
                });
            }
        }
        if growth > self.free || self.free - growth < self.min_free_bytes {
            return Err(Error::DiskFull {
                used: self.used,
                free: self.free,
                needed: growth,
                rule: format!(
                    "{} bytes must stay free on the disk (min_free_disk_bytes)",
                    self.min_free_bytes
                ),
            });
        }
        self.used = self.used.saturating_add(growth);
        self.free = self.free.saturating_sub(growth);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_refused_before_it_would_pass_a_limit_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(dir.path(), 1 << 20).unwrap());
        let chunks = ChunkFiles::open(dir.path()).unwrap();
        let mut space = Space::new(index.clone(), chunks.clone(), dir.path().into(), Some(64 << 20), 0);
        space.admit(1 << 20).unwrap();
        let err = space.admit(64 << 20).unwrap_err().to_string();
        assert!(err.contains("at most 67108864 bytes (max_disk_bytes)"), "{err}");
        // The estimate counts what was admitted since the last reading.
        let mut space = Space::new(index.clone(), chunks.clone(), dir.path().into(), Some(8 << 20), 0);
        let admitted = (0..10).take_while(|_| space.admit(1 << 20).is_ok()).count();
        assert!((1..=4).contains(&admitted), "{admitted} MiB admitted, each counting twice against 8 MiB");
        let free = fs4::available_space(dir.path()).unwrap();
        let mut space = Space::new(index, chunks, dir.path().into(), None, free);
        let err = space.admit(1).unwrap_err().to_string();
        assert!(err.contains("must stay free on the disk (min_free_disk_bytes)"), "{err}");
    }
}
