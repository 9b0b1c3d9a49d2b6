//! Guards against sled losing acknowledged data silently when it opens a damaged data dir.
//!
//! sled 0.34 treats a damaged blob or a cut log as a write torn by a crash: at open it rolls its
//! log back to before the damage, deletes the blob files written after it, and opens without an
//! error (seen in `tests/integrity.rs`: one flipped byte in one blob lost every later batch).
//! Two defences, both outside sled:
//! - the *mark*: a small file beside sled holding the highest tick ever acknowledged, rewritten
//!   (write, fsync, rename) by the writer at most every [`MARK_EVERY`] and at close. After open,
//!   a log whose last tick is below the mark was rolled back: the broker refuses to serve it and
//!   says which ticks are missing, instead of serving a log with a hole;
//! - *preserved blobs*: before open, every blob file is hard-linked into [`PRESERVED`] (no copy),
//!   so the blobs sled deletes survive for `tapeline recover`; after a clean open the links go.
//!
//! The mark lags the log: it is rewritten with a commit at least `MARK_EVERY` after the last
//! rewrite (so after a burst it waits for the next commit or the close), and under the `interval`
//! and `never` fsync policies only at a clean close. A rollback within that lag goes unreported:
//! it looks like the crash itself. Small chunks live inline in sled's log file, whose tail sled
//! overwrites while rolling back: those are gone, and the refusal names the ticks concerned.

use crate::error::{Error, Result};
use crate::record::Tick;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the writer rewrites the mark at most.
pub const MARK_EVERY: Duration = Duration::from_millis(200);
/// The mark's file name in the data dir.
pub const MARK_FILE: &str = "tapeline.acknowledged";
/// Where blob files are preserved while sled opens.
pub const PRESERVED: &str = "tapeline.preserved-blobs";

/// Reads the mark of the data dir `dir`: `None` when there is none (a new or older data dir).
pub fn read_mark(dir: &Path) -> Result<Option<Tick>> {
    let path = dir.join(MARK_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Io { context: format!("reading {}", path.display()), source }),
    };
    match bytes.split_first_chunk::<8>() {
        Some((tick, crc)) if crc == crc32fast::hash(tick).to_le_bytes() => {
            Ok(Some(Tick(u64::from_le_bytes(*tick))))
        }
        // A damaged mark proves nothing either way; say so and carry on.
        _ => {
            tracing::warn!(path = %path.display(), "the acknowledged-tick mark is damaged; ignored");
            Ok(None)
        }
    }
}

/// Writes the mark durably: a new file, fsynced, renamed over the old one, directory fsynced.
fn write_mark(dir: &Path, tick: Tick) -> std::io::Result<()> {
    let tmp = dir.join(format!("{MARK_FILE}.tmp"));
    let mut file = fs::File::create(&tmp)?;
    let bytes = tick.0.to_le_bytes();
    file.write_all(&bytes)?;
    file.write_all(&crc32fast::hash(&bytes).to_le_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(MARK_FILE))?;
    fs::File::open(dir)?.sync_all()
}

/// The writer's side of the mark.
pub struct Mark {
    dir: PathBuf,
    written: Tick,
    pending: Tick,
    at: Instant,
}

impl Mark {
    /// A mark for `dir` that last held `written`.
    pub fn new(dir: PathBuf, written: Tick) -> Mark {
        Mark { dir, written, pending: written, at: Instant::now() }
    }

    /// Records that ticks up to `tick` are acknowledged; rewrites the file when due.
    pub fn acknowledged(&mut self, tick: Tick) {
        self.pending = self.pending.max(tick);
        if self.at.elapsed() >= MARK_EVERY {
            self.flush();
        }
    }

    /// Lowers the mark to `tick` at once (deleting a stream can remove the newest acknowledged
    /// record, which must not then look like a rollback). Called before the deletion, so that a
    /// crash in between leaves a mark below the data, never above it.
    pub fn lower(&mut self, tick: Tick) {
        if tick >= self.written && tick >= self.pending {
            return;
        }
        self.pending = tick;
        self.at = Instant::now();
        match write_mark(&self.dir, tick) {
            Ok(()) => self.written = tick,
            Err(err) => tracing::warn!(cause = %err, "cannot write the acknowledged-tick mark"),
        }
    }

    /// Rewrites the file if it is behind.
    pub fn flush(&mut self) {
        if self.pending <= self.written {
            return;
        }
        self.at = Instant::now();
        match write_mark(&self.dir, self.pending) {
            Ok(()) => self.written = self.pending,
            Err(err) => tracing::warn!(cause = %err, "cannot write the acknowledged-tick mark"),
        }
    }
}

/// Hard-links every blob file of `dir` into [`PRESERVED`]. Links kept from an earlier open that
/// found a rollback stay: they may hold the only copy of what sled deleted then.
pub fn preserve_blobs(dir: &Path) -> Result<()> {
    let io = |context: String| move |source| Error::Io { context, source };
    let Ok(entries) = fs::read_dir(dir.join("blobs")) else { return Ok(()) };
    let keep = dir.join(PRESERVED);
    fs::create_dir_all(&keep).map_err(io(format!("creating {}", keep.display())))?;
    for entry in entries.flatten() {
        let target = keep.join(entry.file_name());
        if !target.exists() {
            fs::hard_link(entry.path(), &target).map_err(io(format!("linking {}", target.display())))?;
        }
    }
    Ok(())
}

/// Drops the preserved links after a clean open.
pub fn release_blobs(dir: &Path) {
    let keep = dir.join(PRESERVED);
    if let Err(err) = fs::remove_dir_all(&keep) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(cause = %err, path = %keep.display(), "cannot remove preserved blob links");
        }
    }
}

/// The error for a log that sled rolled back below the mark.
pub fn rolled_back(dir: &Path, recovered: Option<Tick>, mark: Tick) -> Error {
    let from = recovered.map_or(Tick(1), |t| Tick(t.0 + 1));
    Error::Open {
        path: dir.to_path_buf(),
        cause: format!(
            "the storage engine recovered its log only up to tick {}, but ticks up to {mark} were acknowledged: \
             ticks {from}..={mark} are lost or damaged (sled rolls its log back at a damaged blob or a cut file, \
             and overwrites the tail of its log while doing so). Nothing was served. The blobs sled dropped are \
             kept in {PRESERVED}; \
             `tapeline verify --data DIR` lists the damage and `tapeline recover --data DIR --into NEW_DIR` \
             copies every readable record into a new data dir to serve instead",
            recovered.map_or("0 (empty)".to_string(), |t| t.to_string())
        ),
    }
}
