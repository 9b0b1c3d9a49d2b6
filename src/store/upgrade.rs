//! Data dirs of earlier builds, upgraded in place at their first open.
//!
//! Before the log of record, a data dir kept sled at its root: tree `records` mapped each chunk's
//! key to the chunk itself or to a 20-byte pointer into `chunks/<id>.tpc` (plus producers' state
//! under `u32::MAX` and retention marks under `u32::MAX - 1`), tree `catalog` the streams, tree
//! `meta` the broker's identity. The upgrade reads all of it and writes a new log: a checkpoint
//! (identity, catalog, what retention removed, producers' state), then every chunk, re-encoded with
//! its stream's id, in `Move` records. The new log is built under `upgrade.tmp/` and renamed into
//! place when complete and synced; only then are the old files deleted. A crash before the rename
//! leaves the old data dir as it was (the upgrade starts again); after it, the next open finishes
//! the clean-up. The index is then built from the new log like any missing index.

use super::chunk::{self, ChunkEncoder};
use super::commit::{Body, Checkpoint, ChunkEntry, Defined, Encoded, FileHeader, Removed, FILE_HEADER_LEN};
use super::files::{self, Appender, ChunkFiles, Location};
use super::producers;
use crate::config::CHUNK_FILE_BYTES;
use crate::error::{Error, Result};
use crate::types::{StreamId, StreamMeta, Tick};
use std::path::Path;
use std::sync::Arc;
use tracing::{error, info, warn};

/// Where the new log is built.
const STAGING: &str = "upgrade.tmp";
/// Files and directories of the earlier format, deleted once the new log is in place.
const OLD: &[&str] =
    &["conf", "db", "blobs", "chunks", "tapeline.acknowledged", "tapeline.preserved-blobs", STAGING];
/// Key prefixes of the earlier `records` tree.
const PRODUCER_PREFIX: [u8; 4] = u32::MAX.to_be_bytes();
const TRIM_PREFIX: [u8; 4] = (u32::MAX - 1).to_be_bytes();
/// Chunk bytes gathered into one record of the new log at most.
const RECORD_BYTES: usize = 1 << 20;

/// Upgrades the data dir at `path` if an earlier build wrote it; finishes an upgrade a crash
/// interrupted after its new log was in place.
pub fn if_needed(path: &Path) -> Result<()> {
    let old = path.join("conf").exists() && path.join("db").exists();
    let has_log = std::fs::read_dir(path.join(files::DIR)).is_ok_and(|mut d| d.next().is_some());
    if has_log {
        if OLD.iter().any(|name| path.join(name).exists()) {
            // Only files of an earlier build next to a log this build wrote are deleted.
            check_log(path)?;
            clean_up(path)?;
        }
        return Ok(());
    }
    if !old {
        return Ok(());
    }
    let began = std::time::Instant::now();
    info!(path = %path.display(), "a data dir of an earlier build: writing its log of record");
    let staging = path.join(STAGING);
    remove(&staging)?;
    let (streams, records) = write_log(path, &staging)?;
    std::fs::rename(staging.join(files::DIR), path.join(files::DIR)).map_err(|source| Error::Io {
        context: format!("moving the new log into {}", path.display()),
        source,
    })?;
    files::sync_dir(path)?;
    clean_up(path)?;
    info!(streams, records, took = ?began.elapsed(), "data dir upgraded");
    Ok(())
}

fn remove(path: &Path) -> Result<()> {
    let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match removed {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io { context: format!("removing {}", path.display()), source }),
    }
}

/// Whether the log in `path` is one an upgrade put in place: its first file starts with a whole
/// header. Otherwise the files of the earlier format are not touched.
fn check_log(path: &Path) -> Result<()> {
    let first = files::path_in(path, 0);
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    let read = std::fs::File::open(&first).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header));
    match read.map_err(|e| e.to_string()).and_then(|()| FileHeader::decode(&header).map_err(|e| e.to_string())) {
        Ok(_) => Ok(()),
        Err(detail) => Err(Error::Open {
            path: path.to_path_buf(),
            cause: format!(
                "it holds both the files of an earlier build (conf, db, chunks) and a log whose first file {} \
                 cannot be read ({detail}): nothing was changed; move one of them away",
                first.display()
            ),
        }),
    }
}

/// Deletes the files of the earlier format.
fn clean_up(path: &Path) -> Result<()> {
    for name in OLD {
        remove(&path.join(name))?;
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                remove(&entry.path())?;
            }
        }
    }
    files::sync_dir(path)
}

/// sled's settings for an earlier data dir: the segment size it was created with (sled refuses
/// to open a data dir with another).
fn old_sled(path: &Path) -> Result<sled::Db> {
    let persisted = std::fs::read(path.join("conf")).ok().and_then(|conf| {
        String::from_utf8_lossy(&conf)
            .lines()
            .find_map(|line| line.strip_prefix("segment_size:")?.trim().parse::<usize>().ok())
    });
    let mut config = sled::Config::new().path(path).flush_every_ms(None);
    if let Some(size) = persisted {
        config = config.segment_size(size);
    }
    config.open().map_err(|err| Error::Open {
        path: path.to_path_buf(),
        cause: format!(
            "a data dir of an earlier build whose storage engine cannot open it ({err}): \
             `tapeline recover --data DIR --into NEW_DIR` copies every readable record into a new data dir"
        ),
    })
}

/// An earlier chunk pointer: `"TPLP" | file u32 | offset u64 | len u32`.
fn old_pointer(value: &[u8]) -> Option<Location> {
    if value.len() != 20 || &value[..4] != b"TPLP" {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(value[i..i + 4].try_into().unwrap_or_default());
    let offset = u64::from_le_bytes(value[8..16].try_into().unwrap_or_default());
    Some(Location { file: u32_at(4), offset, len: u32_at(16) })
}

/// Writes the new log of the earlier data dir `path` under `staging`; returns how many streams
/// and records it holds.
fn write_log(path: &Path, staging: &Path) -> Result<(usize, u64)> {
    let db = old_sled(path)?;
    let records = db.open_tree("records")?;
    let catalog = db.open_tree("catalog")?;
    let meta = db.open_tree("meta")?;
    let old_chunks = ChunkFiles::open_dir(&path.join("chunks"))?;
    let server_id = match meta.get("server_id")? {
        Some(v) => String::from_utf8_lossy(&v).into_owned(),
        None => super::commit::Checkpoint::new_server_id(),
    };
    // The catalog, with what retention removed and each stream's first chunk's counters.
    let mut streams = Vec::new();
    for entry in catalog.iter() {
        let (name, value) = entry?;
        let name: Arc<str> = Arc::from(String::from_utf8_lossy(&name).as_ref());
        if value.len() < 12 {
            error!(stream = %name, "a catalog entry of the earlier data dir is malformed; the stream is skipped");
            continue;
        }
        let id = StreamId(u32::from_le_bytes(value[..4].try_into().unwrap_or_default()));
        let created = Tick(u64::from_le_bytes(value[4..12].try_into().unwrap_or_default()));
        let meta: StreamMeta = match &value[12..] {
            [] => StreamMeta::default(),
            json => serde_json::from_slice(json).unwrap_or_else(|err| {
                error!(stream = %name, cause = %err, "stream metadata is unreadable; defaults used");
                StreamMeta::default()
            }),
        };
        let mut trim_key = TRIM_PREFIX.to_vec();
        trim_key.extend_from_slice(&id.0.to_be_bytes());
        let through = records
            .get(trim_key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(|b| Tick(u64::from_le_bytes(b)));
        streams.push((Defined { id, name, created, meta }, through));
    }
    let mut producers = Vec::new();
    for entry in records.scan_prefix(PRODUCER_PREFIX) {
        let (key, value) = entry?;
        let id: Arc<str> = Arc::from(String::from_utf8_lossy(&key[4..]).as_ref());
        match producers::decode(&value) {
            Ok(_) => producers.push((id, value.to_vec())),
            Err(detail) => warn!(producer = %id, %detail, "a producer's state is damaged; not carried over"),
        }
    }
    let next_id = streams.iter().map(|(d, _)| d.id.0.saturating_add(1)).max().unwrap_or(0);
    let mark = std::fs::read(path.join("tapeline.acknowledged"))
        .ok()
        .and_then(|b| b.get(..8).map(|t| u64::from_le_bytes(t.try_into().unwrap_or_default())));

    let new_chunks = ChunkFiles::open(staging)?;
    let mut appender = Appender::create(new_chunks, 0, 1, 0, rand::random::<u32>(), CHUNK_FILE_BYTES)?;
    // The checkpoint needs each stream's removed counters: those of its first chunk.
    let mut removed = Vec::new();
    for (defined, through) in &streams {
        let mut first = records.scan_prefix(defined.id.0.to_be_bytes());
        let head = match first.next() {
            Some(Ok((key, value))) => {
                let tick = Tick(key_tick(&key));
                load(&old_chunks, &value).ok().and_then(|v| chunk::header(&v).ok()).map(|h| (tick, h))
            }
            _ => None,
        };
        let floor = if through.is_some() { head.map_or(Tick(0), |(tick, _)| tick) } else { Tick(0) };
        let (records_before, bytes_before) = head.map_or((0, 0), |(_, h)| (h.records_before, h.bytes_before));
        removed.push(Removed { floor, through: *through, records: records_before, bytes: bytes_before });
    }
    let checkpoint = Checkpoint {
        server_id,
        next_id,
        streams: streams.iter().map(|(d, _)| d.clone()).zip(removed).collect(),
        producers,
    };
    let mut clock = Tick(mark.unwrap_or(0));
    let mut batch: Vec<(ChunkEntry, Vec<u8>)> = Vec::new();
    let mut total = 0u64;
    write(&mut appender, &Body::Checkpoint(checkpoint), &[], clock)?;
    for (defined, _) in &streams {
        for entry in records.scan_prefix(defined.id.0.to_be_bytes()) {
            let (key, value) = entry?;
            let first = Tick(key_tick(&key));
            let decoded = load(&old_chunks, &value).and_then(|v| chunk::decode(&v).map(|d| (v, d)));
            let (value, (head, stored)) = match decoded {
                Ok(decoded) => decoded,
                Err(err) => {
                    // Left out: reads of the new log report the gap it leaves as DATA_LOSS.
                    error!(stream = %defined.name, tick = %first, detail = %err.detail, "a damaged chunk of the earlier data dir is not carried over");
                    continue;
                }
            };
            let mut encoder =
                ChunkEncoder::new(&defined.name, defined.id, head.records_before, head.bytes_before);
            for r in &stored {
                encoder.push(r.tick, r.origin_time, &r.headers, &value[r.payload.clone()], r.crc32);
                clock = clock.max(r.tick);
            }
            total += stored.len() as u64;
            let bytes = encoder.finish();
            batch.push((ChunkEntry { stream: defined.id, first, len: bytes.len() as u32 }, bytes));
            if batch.iter().map(|(_, b)| b.len()).sum::<usize>() >= RECORD_BYTES {
                flush(&mut appender, &mut batch, clock)?;
            }
        }
    }
    flush(&mut appender, &mut batch, clock)?;
    // A clock record last: the highest tick ever acknowledged stays promised.
    write(&mut appender, &Body::Clock, &[], clock)?;
    appender.sync()?;
    files::sync_dir(staging)?;
    Ok((streams.len(), total))
}

/// The tick of an earlier `records` key: `stream id u32 | tick u64`, big-endian.
fn key_tick(key: &[u8]) -> u64 {
    key.get(4..12).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

/// An earlier chunk: the sled value itself, or where its pointer says.
fn load(old_chunks: &ChunkFiles, value: &[u8]) -> std::result::Result<bytes::Bytes, chunk::ChunkError> {
    match old_pointer(value) {
        Some(at) => old_chunks.read(at),
        None => Ok(bytes::Bytes::copy_from_slice(value)),
    }
}

fn write(appender: &mut Appender, body: &Body, data: &[Vec<u8>], clock: Tick) -> Result<()> {
    let (seq, prev) = appender.chain();
    let record = Encoded::new(body, appender.salt(), seq, prev, clock, super::commit::FLAG_SYNCED, data);
    appender.append(&record, data)?;
    Ok(())
}

fn flush(appender: &mut Appender, batch: &mut Vec<(ChunkEntry, Vec<u8>)>, clock: Tick) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let (entries, data): (Vec<ChunkEntry>, Vec<Vec<u8>>) = std::mem::take(batch).into_iter().unzip();
    write(appender, &Body::Move { chunks: entries }, &data, clock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_of_this_build_is_left_alone_and_leftovers_of_an_upgrade_go() {
        let dir = tempfile::tempdir().unwrap();
        if_needed(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a new data dir: nothing to do");
        // An upgrade that crashed after its log was moved into place, before the clean-up.
        std::fs::create_dir_all(dir.path().join(files::DIR)).unwrap();
        let header = FileHeader { file: 0, first_seq: 1, salt: 7 }.encode();
        std::fs::write(files::path_in(dir.path(), 0), header).unwrap();
        for old in ["conf", "db", "tapeline.acknowledged", "snap.0000000000000287"] {
            std::fs::write(dir.path().join(old), b"old").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("chunks")).unwrap();
        if_needed(dir.path()).unwrap();
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec![files::DIR.to_string()]);
    }

    #[test]
    fn old_files_next_to_a_log_this_build_did_not_write_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(files::DIR)).unwrap();
        std::fs::write(files::path_in(dir.path(), 0), b"not a log").unwrap();
        for old in ["conf", "db"] {
            std::fs::write(dir.path().join(old), b"old").unwrap();
        }
        let err = if_needed(dir.path()).unwrap_err().to_string();
        assert!(err.contains("nothing was changed"), "{err}");
        assert!(dir.path().join("conf").exists() && dir.path().join("db").exists());
    }
}
