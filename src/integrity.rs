//! Offline checks of a data dir: `tapeline verify` (is every stored record intact?) and
//! `tapeline recover` (copy every readable record into a new data dir).
//!
//! Both run while no broker serves the data dir (sled's lock enforces it). `verify` reads every
//! chunk through sled and checks every record's CRC, that chunks follow each other (each chunk's
//! `records_before` is what the chunks before it hold, so a lost chunk shows), that ticks
//! increase, and that the log reaches the acknowledged-tick mark (`guard.rs`). `recover` first
//! scans sled's raw files for chunks (see `chunk::scan`; before sled opens, since opening may
//! delete blobs), then reads through sled when sled can open the dir, and keeps every record
//! whose CRC checks, from either. Recovered records keep their ticks, origin times and headers.

use crate::chunk;
use crate::chunk_files::ChunkFiles;
use crate::config::{Config, DataDir, FsyncPolicy};
use crate::error::{Error, Result};
use crate::guard;
use crate::names::StreamName;
use crate::record::{NewRecord, StreamId, Tick};
use crate::storage::{self, Log};
use bytes::Bytes;
use std::collections::BTreeMap;
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
    pub damage: Vec<Damage>,
}

fn open_sled(dir: &Path) -> Result<sled::Db> {
    if !dir.join("conf").exists() && !dir.join("db").exists() {
        return Err(Error::Open { path: dir.to_path_buf(), cause: "it holds no tapeline data".into() });
    }
    storage::engine_config(dir).open().map_err(|err| Error::Open {
        path: dir.to_path_buf(),
        cause: match err {
            sled::Error::Corruption { .. } => format!(
                "the storage engine finds it corrupt ({err}); `tapeline recover --data DIR --into NEW_DIR` \
                 copies every readable record out"
            ),
            _ => format!("storage error: {err}"),
        },
    })
}

/// Checks every record of the data dir in `dir`.
pub fn verify(dir: &Path) -> Result<Report> {
    let mark = guard::read_mark(dir)?;
    // Opening may make sled delete blobs it takes for torn writes: keep them for recover.
    guard::preserve_blobs(dir)?;
    let db = open_sled(dir)?;
    let records = db.open_tree("records")?;
    let catalog = db.open_tree("catalog")?;
    let chunks = ChunkFiles::open_readonly(dir)?;
    let mut report = Report::default();
    let mut known = std::collections::HashSet::new();
    let mut newest: Option<Tick> = None;
    for (name, id, _, _) in storage::read_catalog(&catalog)? {
        report.streams += 1;
        known.insert(id);
        read_stream(&records, &chunks, &name, id, &mut report, |_, good| {
            newest = newest.max(good.last().map(|r| r.tick));
        });
    }
    if let Some(mark) = mark.filter(|&mark| newest.is_none_or(|n| n < mark)) {
        report.damage.push(Damage {
            stream: "*".into(),
            from: newest.map_or(Tick(1), |t| Tick(t.0 + 1)),
            to: mark,
            detail: "acknowledged but missing from the log: the storage engine rolled its log back".into(),
        });
    }
    // Chunks of no stream in the catalog mean a lost catalog entry.
    let mut orphans: BTreeMap<StreamId, (Tick, Tick)> = BTreeMap::new();
    for entry in records.range(..storage::TRIM_PREFIX.as_slice()) {
        let Ok((k, _)) = entry else { continue };
        let id = StreamId(u32::from_be_bytes(k[..4].try_into().unwrap_or_default()));
        if !known.contains(&id) {
            let tick = storage::key_tick(&k);
            let range = orphans.entry(id).or_insert((tick, tick));
            range.1 = tick;
        }
    }
    for (id, (from, to)) in orphans {
        report.damage.push(Damage {
            stream: format!("#{}", id.0),
            from,
            to,
            detail: "chunks of a stream missing from the catalog".into(),
        });
    }
    Ok(report)
}

/// Reads every chunk of one stream in key order, checking each record, the chunks' continuity
/// and tick order; hands each intact chunk's value and records to `keep`, and adds every damaged
/// range to the report.
fn read_stream(
    records: &sled::Tree,
    chunks: &ChunkFiles,
    name: &str,
    id: StreamId,
    report: &mut Report,
    mut keep: impl FnMut(&Bytes, Vec<crate::record::Stored>),
) {
    let damage = |from: Tick, to: Tick, detail: String| Damage { stream: name.to_string(), from, to, detail };
    let mut next_from = Tick(0);
    // (records the stream held before the next chunk, the last tick read)
    let mut expected: Option<(u64, Tick)> = None;
    loop {
        let mut iter = records.range(storage::key(id, next_from)..=storage::key(id, Tick(u64::MAX)));
        let mut resumed_at = None;
        for entry in iter.by_ref() {
            let (k, v) = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    let last = Tick(u64::MAX);
                    let after = storage::readable_after(records, id, next_from, last);
                    let to = after.map_or(last, |t| Tick(t.0.saturating_sub(1)));
                    report.damage.push(damage(next_from, to, format!("the storage engine reports: {err}")));
                    expected = None;
                    resumed_at = after;
                    break;
                }
            };
            let first = storage::key_tick(&k);
            next_from = Tick(first.0.saturating_add(1));
            report.chunks += 1;
            let mut good = Vec::new();
            // A chunk whose bytes cannot be read is damaged like one that does not decode.
            let (value, decoded) = match chunks.load(v) {
                Ok(value) => {
                    let decoded = chunk::decode_into(&value, 0, Tick(0), Tick(u64::MAX), &mut good);
                    (value, decoded)
                }
                Err(err) => (Bytes::new(), Err(err)),
            };
            let last_good = good.last().map(|r| r.tick);
            report.records += good.len() as u64;
            match decoded {
                Ok(head) => {
                    if let Some((records_before, last_tick)) = expected {
                        if head.records_before != records_before {
                            report.damage.push(damage(
                                Tick(last_tick.0 + 1),
                                Tick(first.0.saturating_sub(1)),
                                format!(
                                    "{} records are missing between chunks (the chunk at {first} follows {records_before} records but says {})",
                                    head.records_before.abs_diff(records_before),
                                    head.records_before
                                ),
                            ));
                        }
                    }
                    if good.first().map(|r| r.tick) != Some(first) {
                        report.damage.push(damage(
                            first,
                            last_good.unwrap_or(first),
                            "chunk key and first tick differ".into(),
                        ));
                    } else if good.windows(2).any(|w| w[0].tick >= w[1].tick)
                        || expected.is_some_and(|(_, last)| first <= last)
                    {
                        report.damage.push(damage(
                            first,
                            last_good.unwrap_or(first),
                            "ticks do not increase".into(),
                        ));
                    }
                    expected =
                        Some((head.records_before + u64::from(head.count), last_good.unwrap_or(first)));
                    keep(&value, good);
                }
                Err(err) => {
                    let from = last_good.map_or(first, |t| Tick(t.0 + 1));
                    // The damage reaches up to the next chunk.
                    let to = match records
                        .range(storage::key(id, next_from)..=storage::key(id, Tick(u64::MAX)))
                        .next()
                    {
                        Some(Ok((next, _))) => Tick(storage::key_tick(&next).0.saturating_sub(1)),
                        _ => Tick(u64::MAX),
                    };
                    report.damage.push(damage(from, to, err.detail));
                    expected = None;
                    keep(&value, good);
                }
            }
        }
        match resumed_at {
            Some(t) => next_from = t,
            None => break,
        }
    }
}

/// What `recover` did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Whether sled could open the source (its raw files are always scanned too).
    pub through_sled: bool,
    pub streams: usize,
    pub records: u64,
    /// What could not be read.
    pub damage: Vec<Damage>,
}

/// Copies every readable record of the data dir `from` into a new data dir `into`.
pub async fn recover(from: &Path, into: &Path) -> Result<Recovered> {
    if into.exists() && std::fs::read_dir(into).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::InvalidArgument(format!(
            "--into {} exists and is not empty: recover writes a new data dir and never overwrites one",
            into.display()
        )));
    }
    // Per stream, every readable record by tick: later copies of a record are the same record.
    let mut found: BTreeMap<String, BTreeMap<Tick, NewRecordParts>> = BTreeMap::new();
    let mut result = Recovered::default();
    // The raw files first: opening with sled may delete blobs it takes for torn writes.
    for file in files(from)? {
        scan_file(&file, &mut found)?;
    }
    match open_sled(from) {
        Ok(db) => {
            result.through_sled = true;
            let records = db.open_tree("records")?;
            let catalog = db.open_tree("catalog")?;
            let chunks = ChunkFiles::open_readonly(from)?;
            let mut report = Report::default();
            for (name, id, _, _) in storage::read_catalog(&catalog)? {
                let stream = found.entry(name.to_string()).or_default();
                read_stream(&records, &chunks, &name, id, &mut report, |value, good| {
                    for r in good {
                        stream.insert(r.tick, parts(value, r));
                    }
                });
            }
            result.damage = report.damage;
        }
        Err(err) => {
            tracing::warn!(cause = %err, "sled cannot open the data dir; only its raw files were read");
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

/// Copies the payload, so that the scanned window or chunk it lies in can be freed.
fn parts(value: &Bytes, r: crate::record::Stored) -> NewRecordParts {
    NewRecordParts {
        origin_time: r.origin_time,
        headers: r.headers,
        payload: Bytes::copy_from_slice(&value[r.payload]),
    }
}

/// Every file under `dir`, recursively (sled keeps large values under `blobs/`).
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
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
