//! Offline checks of a data dir: `tapeline verify` (is everything stored intact?) and
//! `tapeline recover` (copy every readable record into a new data dir).
//!
//! Both run while no broker serves the data dir (the index's lock enforces it) and change
//! nothing in it. `verify` walks the whole log of record (every commit record's CRCs and chain),
//! builds the index from it in a temporary directory exactly as a rebuild would, then reads every
//! chunk that index points to, checking each record's CRC, that each chunk is the one its key
//! names, that chunks follow each other (each counts the records before it, so a lost chunk
//! shows) and that ticks increase; and it checks that the data dir's own index claims no record
//! the log does not hold. `recover` scans every file of the data dir for chunks (each carries a
//! magic, its stream's name and CRCs, so it is recognisable in raw bytes, also in the files of
//! earlier builds) and keeps every record whose CRC checks, with the streams' metadata where the
//! log still says it.

use super::chunk;
use super::commit;
use super::files::{self, ChunkFiles};
use super::index::{self, Index};
use super::recovery;
use super::Log;
use crate::config::{Config, DataDir, FsyncPolicy};
use crate::error::{Error, Result};
use crate::types::StreamName;
use crate::types::{NewRecord, StreamMeta, Tick};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A damaged range of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub stream: String,
    pub from: Tick,
    pub to: Tick,
    pub detail: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream {:?} ticks {}..={}: {}", self.stream, self.from, self.to, self.detail)
    }
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub streams: usize,
    pub chunks: u64,
    /// Records verified intact.
    pub records: u64,
    /// Commit records of the log.
    pub commit_records: usize,
    /// Damaged ranges of streams.
    pub damage: Vec<Damage>,
    /// Damaged stretches of the log itself, and index claims the log does not hold.
    pub log_damage: Vec<String>,
    /// What is not damage but worth saying (a torn tail, dropped at the next open).
    pub notes: Vec<String>,
}

impl Report {
    /// Whether nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.log_damage.is_empty()
    }
}

/// Fails unless `dir` holds a data dir of this build (an earlier build's is upgraded by the
/// first `serve`).
fn check_data_dir(dir: &Path) -> Result<()> {
    if dir.join("conf").exists() && !dir.join(files::DIR).exists() {
        return Err(Error::Open {
            path: dir.to_path_buf(),
            cause: "a data dir of an earlier build: `tapeline serve` upgrades it when it first opens it (or \
                    `tapeline recover --data DIR --into NEW_DIR` copies every readable record out)"
                .into(),
        });
    }
    if !dir.join(files::DIR).exists() {
        return Err(Error::Open { path: dir.to_path_buf(), cause: "it holds no tapeline data".into() });
    }
    Ok(())
}

/// Checks everything stored in the data dir `dir`.
pub fn verify(dir: &Path) -> Result<Report> {
    check_data_dir(dir)?;
    let _lock = recovery::lock(dir)?;
    // Held to the end: no broker may serve the dir meanwhile. An index sled cannot open is
    // rebuilt by the next open; it says nothing about the records.
    let held = match Index::open(dir, 1 << 20) {
        Ok(index) => Some(index),
        Err(err) if index::is_locked(&err) => return Err(err),
        Err(_) => None,
    };
    let chunks = ChunkFiles::open(dir)?;
    let temp =
        tempfile::tempdir().map_err(|source| Error::Io { context: "creating a temp dir".into(), source })?;
    let rebuilt = Index::open(temp.path(), 64 << 20)?;
    let replayed = recovery::replay_readonly(&chunks, &rebuilt, dir)?;
    let salt = recovery::log_salt(dir, &chunks)?;
    let mut report = Report { commit_records: replayed.applied, ..Report::default() };
    report.log_damage.extend(replayed.damaged.iter().map(|d| format!("commit records {d}")));
    report.notes.extend(replayed.torn.as_ref().map(|t| t.detail.clone()));
    if let Some(applied) = held.as_ref().and_then(|index| index.applied().ok().flatten()) {
        let synced = applied.flags & commit::FLAG_SYNCED != 0;
        let holds = match salt {
            Some(salt) => recovery::holds(&chunks, &applied, salt)?,
            None => false,
        };
        if synced && replayed.last_seq() < applied.seq && !holds {
            report.log_damage.push(format!(
                "the index says commit records up to {} (ticks up to {}) were written and synced; the chunk files hold them up to record {}: acknowledged records are missing",
                applied.seq,
                applied.clock,
                replayed.last_seq()
            ));
        }
    }
    for (defined, _) in rebuilt.catalog()? {
        report.streams += 1;
        read_stream(&rebuilt, &chunks, &defined.name, defined.id, &mut report, |_, _| {});
    }
    Ok(report)
}

/// Reads every chunk of one stream in key order, checking each record, that each chunk is the
/// one its key names, the chunks' continuity and tick order; hands each intact chunk's value and
/// records to `keep`, and adds every damaged range to the report.
fn read_stream(
    index: &Index,
    chunks: &ChunkFiles,
    name: &str,
    id: crate::types::StreamId,
    report: &mut Report,
    mut keep: impl FnMut(&Bytes, Vec<crate::types::Stored>),
) {
    let damage = |from: Tick, to: Tick, detail: String| Damage { stream: name.to_string(), from, to, detail };
    let pointers: Vec<_> = index.range(id, Tick(0), Tick(u64::MAX)).collect();
    // (records the stream held before the next chunk, the last tick read)
    let mut expected: Option<(u64, Tick)> = None;
    for (i, entry) in pointers.iter().enumerate() {
        let next_key = pointers[i + 1..].iter().find_map(|p| p.as_ref().ok().map(|(t, _)| *t));
        let to = next_key.map_or(Tick(u64::MAX), |t| Tick(t.0.saturating_sub(1)));
        let (key, pointer) = match entry {
            Ok(entry) => *entry,
            Err(err) => {
                report.damage.push(damage(Tick(0), to, err.to_string()));
                expected = None;
                continue;
            }
        };
        report.chunks += 1;
        let mut good = Vec::new();
        let (value, decoded) = match chunks.read(pointer.at) {
            Ok(value) => {
                let decoded = chunk::decode_into(&value, 0, Tick(0), Tick(u64::MAX), &mut good);
                (value, decoded)
            }
            Err(err) => (Bytes::new(), Err(err)),
        };
        report.records += good.len() as u64;
        let last_good = good.last().map(|r| r.tick);
        match decoded {
            Ok(span) => {
                if let Some((records_before, last_tick)) = expected {
                    if span.head.records_before != records_before {
                        report.damage.push(damage(
                            Tick(last_tick.0 + 1),
                            Tick(key.0.saturating_sub(1)),
                            format!(
                                "{} records are missing between chunks (the chunk at {key} follows {records_before} records but says {})",
                                span.head.records_before.abs_diff(records_before),
                                span.head.records_before
                            ),
                        ));
                    }
                }
                if span.head.stream != Some(id) || span.first != Some(key) {
                    report.damage.push(damage(key, to, "the chunk is not the one its key names".into()));
                } else if good.windows(2).any(|w| w[0].tick >= w[1].tick)
                    || expected.is_some_and(|(_, last)| key <= last)
                {
                    report.damage.push(damage(key, last_good.unwrap_or(key), "ticks do not increase".into()));
                }
                expected =
                    Some((span.head.records_before + u64::from(span.head.count), last_good.unwrap_or(key)));
                keep(&value, good);
            }
            Err(err) => {
                let from = last_good.map_or(key, |t| Tick(t.0 + 1));
                report.damage.push(damage(from, to, err.detail));
                expected = None;
                keep(&value, good);
            }
        }
    }
}

/// What `recover` did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Whether the log could be walked for the streams' metadata (chunks are always found by
    /// scanning the files).
    pub through_log: bool,
    pub streams: usize,
    pub records: u64,
    /// Damaged stretches of the log met while reading the metadata.
    pub damage: Vec<String>,
}

/// Copies every readable record of the data dir `from` into a new data dir `into`.
pub async fn recover(from: &Path, into: &Path) -> Result<Recovered> {
    if into.exists() && std::fs::read_dir(into).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::InvalidArgument(format!(
            "--into {} exists and is not empty: recover writes a new data dir and never overwrites one",
            into.display()
        )));
    }
    let mut result = Recovered::default();
    // Per stream, every readable record by tick: later copies of a record are the same record.
    let mut found: BTreeMap<String, BTreeMap<Tick, NewRecordParts>> = BTreeMap::new();
    for file in all_files(from)? {
        scan_file(&file, &mut found)?;
    }
    let mut metadata: HashMap<String, StreamMeta> = HashMap::new();
    if from.join(files::DIR).exists() {
        let chunks = ChunkFiles::open(from)?;
        let temp = tempfile::tempdir()
            .map_err(|source| Error::Io { context: "creating a temp dir".into(), source })?;
        let rebuilt = Index::open(temp.path(), 64 << 20)?;
        match recovery::replay_readonly(&chunks, &rebuilt, from)
            .and_then(|replayed| Ok((replayed, rebuilt.catalog()?)))
        {
            Ok((replayed, catalog)) => {
                result.through_log = true;
                result.damage = replayed.damaged;
                for (defined, _) in catalog {
                    metadata.insert(defined.name.to_string(), defined.meta);
                }
            }
            Err(err) => {
                tracing::warn!(cause = %err, "the log cannot be walked: streams get default metadata")
            }
        }
    }

    let config =
        Config { data: DataDir::Path(into.to_path_buf()), fsync: FsyncPolicy::Never, ..Config::default() };
    let log = Log::open(&config)?;
    for (name, records) in found {
        if records.is_empty() {
            continue;
        }
        let stream = StreamName::parse(&name)?;
        if let Some(meta) = metadata.remove(&name).filter(|m| *m != StreamMeta::default()) {
            log.define(stream.clone(), meta, true, None).await?;
        }
        result.streams += 1;
        let mut batch = Vec::new();
        for (tick, p) in records {
            batch.push(NewRecord {
                stream: stream.clone(),
                tick: Some(tick),
                origin_time: p.origin_time,
                headers: p.headers,
                crc32: crc32fast::hash(&p.payload),
                payload: p.payload,
            });
            if batch.len() == 4096 {
                result.records += log.append(std::mem::take(&mut batch)).await?.len() as u64;
            }
        }
        if !batch.is_empty() {
            result.records += log.append(batch).await?.len() as u64;
        }
    }
    log.close().await?;
    Ok(result)
}

/// Bytes of a raw file scanned at once, and how much consecutive windows overlap: a chunk
/// longer than the overlap (possible only with records near `max_record_bytes` above 16 MiB)
/// is found only when it lies within one window.
const SCAN_WINDOW: u64 = 128 << 20;
const SCAN_OVERLAP: u64 = 16 << 20;

/// Adds every verified record of the chunks found in one raw file to `found`, reading the file
/// in overlapping windows so that memory stays bounded whatever its size.
fn scan_file(file: &Path, found: &mut BTreeMap<String, BTreeMap<Tick, NewRecordParts>>) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |source| Error::Io { context: format!("reading {}", file.display()), source };
    let mut f = std::fs::File::open(file).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut at = 0;
    loop {
        let mut window = Vec::new();
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        f.by_ref().take(SCAN_WINDOW).read_to_end(&mut window).map_err(io)?;
        let bytes = Bytes::from(window);
        for chunk in chunk::scan(&bytes) {
            if StreamName::parse(&chunk.stream).is_err() {
                continue;
            }
            if let Some(damage) = &chunk.damage {
                tracing::warn!(file = %file.display(), offset = at + chunk.offset as u64, stream = %chunk.stream, %damage, "a damaged chunk: its records before the damage are kept");
            }
            let stream = found.entry(chunk.stream).or_default();
            for r in chunk.records {
                stream.entry(r.tick).or_insert_with(|| parts(&bytes, r));
            }
        }
        if at + SCAN_WINDOW >= len {
            return Ok(());
        }
        at += SCAN_WINDOW - SCAN_OVERLAP;
    }
}

/// The parts of a record to append again.
struct NewRecordParts {
    origin_time: Option<u64>,
    headers: Vec<(String, String)>,
    payload: Bytes,
}

/// Copies the payload, so that the scanned window it lies in can be freed.
fn parts(value: &Bytes, r: crate::types::Stored) -> NewRecordParts {
    NewRecordParts {
        origin_time: r.origin_time,
        headers: r.headers,
        payload: Bytes::copy_from_slice(&value[r.payload]),
    }
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|source| Error::Io { context: format!("reading directory {}", d.display()), source })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_clean_log_verifies_clean_and_counts_what_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data: DataDir::Path(dir.path().into()), ..Config::default() };
        let log = Log::open(&config).unwrap();
        let records: Vec<NewRecord> = (0..3)
            .map(|i| NewRecord {
                stream: StreamName::parse("s").unwrap(),
                tick: None,
                origin_time: None,
                headers: Vec::new(),
                payload: Bytes::from(format!("{i}")),
                crc32: crc32fast::hash(format!("{i}").as_bytes()),
            })
            .collect();
        log.append(records).await.unwrap();
        log.close().await.unwrap();
        drop(log);
        let report = verify(dir.path()).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!((report.streams, report.chunks, report.records, report.commit_records), (1, 1, 3, 2));
        let empty = tempfile::tempdir().unwrap();
        let err = verify(empty.path()).unwrap_err().to_string();
        assert!(err.contains("holds no tapeline data"), "{err}");
    }
}
