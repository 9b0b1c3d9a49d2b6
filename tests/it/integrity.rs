//! Damaged storage: real data files are damaged (a flipped byte, chunks swapped, a lost pointer,
//! a lost chunk file, an index cut short, corrupt or deleted), then the broker must serve
//! DATA_LOSS naming the range instead of garbage, keep the rest readable, rebuild what can be
//! rebuilt, refuse to serve a log that lost acknowledged records, and `tapeline verify` /
//! `tapeline recover` must report and rescue what is left. Also: a data dir of the previous
//! format is upgraded in place.

use crate::support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tapeline::protocol::pb;
use tapeline::store::layout;
use tapeline::types::Tick;
use tonic::Code;

/// A payload unique to (stream, i).
fn payload(stream: &str, i: usize) -> String {
    format!("<{stream}-{i:06}>").repeat(8)
}

/// Publishes `batches` batches of `per_batch` records into `stream`; returns tick → payload.
async fn fill(url: &str, stream: &str, batches: usize, per_batch: usize) -> BTreeMap<u64, String> {
    let mut client = client(url).await;
    let mut stored = BTreeMap::new();
    for b in 0..batches {
        let payloads: Vec<String> = (0..per_batch).map(|i| payload(stream, b * per_batch + i)).collect();
        let records = payloads.iter().map(|p| record(stream, p.as_str())).collect();
        let ticks = publish_records(&mut client, records).await;
        stored.extend(ticks.into_iter().zip(payloads));
    }
    stored
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Flips one byte in every stored copy of `needle` under `dir`; returns how many copies were
/// damaged.
fn flip_everywhere(dir: &Path, needle: &[u8]) -> usize {
    let mut flipped = 0;
    for file in files_under(dir) {
        let mut bytes = std::fs::read(&file).unwrap();
        let mut at = 0;
        let mut changed = false;
        while let Some(pos) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
            bytes[at + pos + needle.len() / 2] ^= 0x20;
            at += pos + needle.len();
            changed = true;
            flipped += 1;
        }
        if changed {
            std::fs::write(&file, bytes).unwrap();
        }
    }
    flipped
}

/// Every record of `stream` after `after` (or from the beginning) up to `end`, until the status
/// that ends the subscription.
async fn read(
    url: &str,
    stream: &str,
    after: Option<u64>,
    end: u64,
) -> (Vec<(u64, String)>, Option<tonic::Status>) {
    let mut client = client(url).await;
    let start = match after {
        Some(t) => pb::subscribe_request::Start::After(t),
        None => beginning(),
    };
    let mut request = request(&[stream], start);
    request.end = end;
    let mut sub = Sub::open(&mut client, request).await;
    let mut got = Vec::new();
    loop {
        match sub.next_result().await {
            Ok(Some(events)) => got.extend(records(&events).into_iter().map(|(_, t, p)| (t, p))),
            Ok(None) => return (got, None),
            Err(status) => return (got, Some(status)),
        }
    }
}

/// Reads `stream` whole, resuming after each DATA_LOSS range: what was served, and the ranges.
async fn read_around_damage(
    url: &str,
    stream: &str,
    end: u64,
) -> (BTreeMap<u64, String>, Vec<(u64, u64, String)>) {
    let (mut served, mut lost, mut resume) = (BTreeMap::new(), Vec::new(), None);
    for _ in 0..1000 {
        let (got, status) = read(url, stream, resume, end).await;
        served.extend(got);
        let Some(status) = status else { return (served, lost) };
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");
        assert!(status.message().contains(&format!("stream {stream:?}")), "{status:?}");
        let (from, to) = named_range(status.message());
        lost.push((from, to, status.message().to_string()));
        resume = Some(to);
    }
    panic!("more than 1000 damaged ranges");
}

/// The `A..=B` range a DATA_LOSS message names.
fn named_range(message: &str) -> (u64, u64) {
    let rest = &message[message.find("ticks ").expect("a tick range") + 6..];
    let range: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '=').collect();
    let (a, b) = range.split_once("..=").expect("A..=B");
    (a.parse().unwrap(), b.parse().unwrap())
}

fn tapeline(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `tapeline serve` on `data` and expects it to refuse: returns its one line of error.
fn refused_serve(data: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started on a damaged data dir instead of refusing");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(text(&out.stdout).is_empty(), "nothing claims to listen");
    assert!(!err.contains("panicked"), "{err}");
    err.lines().rfind(|l| l.starts_with("tapeline: ")).expect("one line saying why").to_string()
}

/// Every entry of the data dir's index, as raw keys and values (the broker stopped).
fn index_entries(data: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let db = sled::Config::new().path(data.join(layout::INDEX_DIR)).open().unwrap();
    let tree = db.open_tree("index").unwrap();
    tree.iter().map(|e| e.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

/// Where a chunk is, as an index pointer says: chunk file, offset, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    file: u32,
    offset: u64,
    len: u32,
}

/// The index key of stream `id`'s chunk starting at `tick` (ARCHITECTURE.md: `p`, the stream id
/// and the tick, big-endian so that keys sort by tick).
fn pointer_key(id: u32, tick: Tick) -> [u8; 13] {
    let mut key = [b'p'; 13];
    key[1..5].copy_from_slice(&id.to_be_bytes());
    key[5..].copy_from_slice(&tick.0.to_be_bytes());
    key
}

/// The pointers of stream `id` in the data dir's index (the broker stopped): first tick and
/// location, read from sled's tree as ARCHITECTURE.md lays them out (file u32, offset u64,
/// length u32, sequence u64, CRC u32, little-endian).
fn pointers(data: &Path, id: u32) -> Vec<(Tick, Location)> {
    let prefix = pointer_key(id, Tick(0))[..5].to_vec();
    let le = |bytes: &[u8]| bytes.iter().rev().fold(0u64, |n, b| (n << 8) | u64::from(*b));
    index_entries(data)
        .into_iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .map(|(key, value)| {
            let tick = Tick(u64::from_be_bytes(key[5..13].try_into().unwrap()));
            let at = Location {
                file: le(&value[0..4]) as u32,
                offset: le(&value[4..12]),
                len: le(&value[12..16]) as u32,
            };
            (tick, at)
        })
        .collect()
}

fn tagged(producer: &str, sequence: u64, records: Vec<pb::Record>) -> pb::PublishRequest {
    pb::PublishRequest { records, batch_id: sequence, producer_id: producer.into(), sequence }
}

/// Deleting the index entirely (or damaging sled's files so that it cannot open them) costs
/// nothing: the index is rebuilt from the chunk files, entry for entry what it was: the catalog
/// with metadata, what retention removed, the producers' memory, every pointer. Every record is
/// served as before.
#[tokio::test]
async fn the_index_is_rebuilt_from_the_chunk_files_entry_for_entry() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = tapeline::types::Policy { max_records: Some(300), ..Default::default() };
    let retention = tapeline::config::Retention {
        rules: vec![tapeline::config::Rule {
            streams: vec![tapeline::types::Pattern::parse("kept/**").unwrap()],
            policy,
        }],
        check_every: std::time::Duration::from_millis(20),
        ..Default::default()
    };
    // Small files, so that retention deletes some (a checkpoint stands for their records).
    let config = tapeline::config::Config { chunk_file_bytes: 1 << 20, retention, ..config(&data) };
    let server = TestServer::start_with(config.clone()).await;
    let mut c = server.client().await;
    c.create_stream(pb::CreateStreamRequest {
        stream: "meta/s".into(),
        content_type: "application/json".into(),
        description: "with metadata".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = Vec::new();
    for seq in 1..=5 {
        let batch = tagged("prod", seq, vec![record("meta/s", format!("{{\"n\":{seq}}}")), record("t", "x")]);
        acks.push((batch.clone(), c.publish(batch).await.unwrap().into_inner()));
    }
    fill(&server.url(), "kept/a", 240, 100).await;
    fill(&server.url(), "gone", 2, 10).await;
    c.delete_stream(pb::DeleteStreamRequest { stream: "gone".into() }).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Retention done: the first chunk file deleted, the stream down to its limit.
    loop {
        let kept = stored_streams(&mut c).await.into_iter().find(|s| s.name == "kept/a").map(|s| s.records);
        if !layout::chunk_file(&data, 0).exists() && kept == Some(300) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "retention never deleted the first chunk file");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let listed = stored_streams(&mut c).await;
    let tail = c.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    let mut everything = BTreeMap::new();
    for s in &listed {
        let (got, status) = read(&server.url(), &s.name, None, tail).await;
        assert!(status.is_none(), "{status:?}");
        everything.insert(s.name.clone(), got);
    }
    server.stop().await;
    let before = index_entries(&data);
    assert!(before.len() > 15, "{} index entries", before.len());

    for damage in ["deleted", "log cut short", "snapshot corrupt"] {
        let index_dir = data.join(layout::INDEX_DIR);
        match damage {
            "deleted" => std::fs::remove_dir_all(&index_dir).unwrap(),
            "log cut short" => {
                let db = index_dir.join("db");
                let len = std::fs::metadata(&db).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len / 3).unwrap();
            }
            _ => {
                let snap =
                    files_under(&index_dir).into_iter().find(|f| f.to_string_lossy().contains("snap."));
                let snap = snap.expect("sled wrote a snapshot at the last clean stop");
                let mut bytes = std::fs::read(&snap).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0xff;
                std::fs::write(&snap, bytes).unwrap();
            }
        }
        let server = TestServer::start_with(config.clone()).await;
        let mut c = server.client().await;
        assert_eq!(stored_streams(&mut c).await, listed, "{damage}: the same streams, counts and metadata");
        for (name, expected) in &everything {
            let (got, status) = read(&server.url(), name, None, tail).await;
            assert!(status.is_none(), "{damage}: {status:?}");
            assert_eq!(&got, expected, "{damage}: {name} served as before");
        }
        for (batch, ack) in &acks {
            let again = c.publish(batch.clone()).await.unwrap().into_inner();
            assert!(
                again.duplicate && again.ticks == ack.ticks,
                "{damage}: the producer's memory is back: {again:?}"
            );
        }
        server.stop().await;
        if damage == "deleted" {
            let after = index_entries(&data);
            let differ: Vec<_> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .map(|k| String::from_utf8_lossy(&k[..k.len().min(12)]).into_owned())
                .collect();
            assert!(differ.is_empty(), "the rebuilt index differs at {} keys: {differ:?}", differ.len());
        }
    }
}

/// A chunk damaged in its chunk file (a bit flipped on disk, or written wrong): the chunk's own
/// CRCs catch it. The subscriber gets DATA_LOSS naming the range and never a damaged record;
/// resuming after the range gives the rest; other streams are whole; verify names the same range.
#[tokio::test]
async fn a_damaged_chunk_is_data_loss_for_its_range_and_the_rest_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data).await;
    let mut s = BTreeMap::new();
    let mut t = BTreeMap::new();
    for _ in 0..40 {
        s.extend(fill_small(&server.url(), "s", 20).await);
        t.extend(fill_small(&server.url(), "t", 5).await);
    }
    server.stop().await;
    let (&victim, victim_payload) = s.iter().nth(s.len() / 2).unwrap();
    assert_eq!(
        flip_everywhere(&data.join(layout::LOG_DIR), victim_payload.as_bytes()),
        1,
        "one copy of the payload"
    );

    let server = TestServer::start(&data).await;
    let last = *s.keys().last().unwrap().max(t.keys().last().unwrap());
    let (before, status) = read(&server.url(), "s", None, last).await;
    let status = status.expect("the damage ends the subscription");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("stream \"s\""), "{status:?}");
    let (from, to) = named_range(status.message());
    assert!(from <= victim && victim <= to, "{from}..={to} holds the damaged tick {victim}");
    let prefix: Vec<(u64, String)> = s.range(..from).map(|(t, p)| (*t, p.clone())).collect();
    assert_eq!(before, prefix, "nothing damaged was served");
    let (after, status) = read(&server.url(), "s", Some(to), last).await;
    let rest: Vec<(u64, String)> = s.range(to + 1..).map(|(t, p)| (*t, p.clone())).collect();
    assert!(status.is_none(), "{status:?}");
    assert_eq!(after, rest);
    let (other, status) = read(&server.url(), "t", None, last).await;
    assert!(status.is_none() && other.len() == t.len(), "the other stream is whole");
    server.stop().await;

    let out = tapeline(&["verify", "--data", data.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{report}{}", text(&out.stderr));
    assert!(report.contains(&format!("damaged: stream \"s\" ticks {from}..={to}")), "{report}");
    assert!(report.contains("damaged: commit records"), "the commit record's CRC fails too: {report}");
}

/// Publishes `n` small records into `stream` in one batch; returns tick → payload.
async fn fill_small(url: &str, stream: &str, n: usize) -> BTreeMap<u64, String> {
    let mut client = client(url).await;
    let payloads: Vec<String> = (0..n).map(|i| format!("[{stream}-{}-{i:04}]", rand_tag())).collect();
    let ticks =
        publish_records(&mut client, payloads.iter().map(|p| record(stream, p.as_str())).collect()).await;
    ticks.into_iter().zip(payloads).collect()
}

/// A value unique within the test run, so each payload is found once in the files.
fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The index points a key to the wrong chunk, or lost a pointer: every read checks that a chunk
/// is the one its key names (stream id and first tick in its header) and that it follows the
/// chunk before it (the records it counts before it), so neither is ever served as good data or
/// passes as a silent gap: each is DATA_LOSS naming its range, and the rest stays readable. A
/// pointer stored under another key fails its own CRC: the index is rebuilt at the next open.
#[tokio::test]
async fn a_misdirected_chunk_or_a_lost_pointer_is_data_loss_never_wrong_data() {
    for damage in [
        "chunks swapped in the file",
        "a pointer to another chunk",
        "a middle pointer deleted",
        "pointers swapped in the index",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = TestServer::start(&data).await;
        // Ten chunks of the same length: ten batches of equally long records.
        let s = fill(&server.url(), "s", 10, 20).await;
        server.stop().await;
        let chunks = pointers(&data, 0);
        assert_eq!(chunks.len(), 10);
        let ((first_a, a), (first_b, b)) = (chunks[3], chunks[6]);
        assert_eq!(a.len, b.len, "equally long chunks");
        match damage {
            "chunks swapped in the file" => {
                let path = layout::chunk_file(&data, a.file);
                let mut bytes = std::fs::read(&path).unwrap();
                let (ra, rb) = (
                    a.offset as usize..(a.offset + u64::from(a.len)) as usize,
                    b.offset as usize..(b.offset + u64::from(b.len)) as usize,
                );
                let chunk_a = bytes[ra.clone()].to_vec();
                let chunk_b = bytes[rb.clone()].to_vec();
                bytes[ra].copy_from_slice(&chunk_b);
                bytes[rb].copy_from_slice(&chunk_a);
                std::fs::write(&path, bytes).unwrap();
            }
            _ => {
                let db = sled::Config::new().path(data.join(layout::INDEX_DIR)).open().unwrap();
                let tree = db.open_tree("index").unwrap();
                let (key_a, key_b) = (pointer_key(0, first_a), pointer_key(0, first_b));
                if damage == "a middle pointer deleted" {
                    tree.remove(key_a).unwrap().expect("the pointer was there");
                } else if damage == "a pointer to another chunk" {
                    // Whole and checking out under its key (as a bug could write it), but to b.
                    let value_b = tree.get(key_b).unwrap().unwrap();
                    let mut crc = crc32fast::Hasher::new();
                    crc.update(&key_a);
                    crc.update(&value_b[..24]);
                    let mut value = value_b[..24].to_vec();
                    value.extend_from_slice(&crc.finalize().to_le_bytes());
                    tree.insert(key_a, value).unwrap();
                } else {
                    let (value_a, value_b) =
                        (tree.get(key_a).unwrap().unwrap(), tree.get(key_b).unwrap().unwrap());
                    tree.insert(key_a, value_b).unwrap();
                    tree.insert(key_b, value_a).unwrap();
                }
                db.flush().unwrap();
            }
        }
        let server = TestServer::start(&data).await;
        let last = *s.keys().last().unwrap();
        let (served, lost) = read_around_damage(&server.url(), "s", last).await;
        server.stop().await;
        if damage == "pointers swapped in the index" {
            assert!(
                lost.is_empty() && served == s,
                "{damage}: the index was rebuilt, nothing lost: {lost:?}"
            );
            continue;
        }
        assert!(!lost.is_empty(), "{damage}: the damage was reported");
        for (tick, p) in &served {
            assert_eq!(s.get(tick), Some(p), "{damage}: only what was stored is served, at its tick");
        }
        let missing: Vec<u64> = s.keys().filter(|t| !served.contains_key(t)).copied().collect();
        assert!(
            missing.iter().all(|t| lost.iter().any(|(from, to, _)| (from..=to).contains(&t))),
            "{damage}: every record not served lies in a range named: {lost:?}"
        );
        let chunk_a: Vec<u64> =
            s.keys().filter(|t| **t >= first_a.0 && **t < chunks[4].0 .0).copied().collect();
        assert!(
            chunk_a.iter().all(|t| !served.contains_key(t)),
            "{damage}: the chunk at {first_a} is not served"
        );
        eprintln!(
            "{damage}: {} of {} records served; damage named: {:?}",
            served.len(),
            s.len(),
            lost.iter().map(|l| &l.2).collect::<Vec<_>>()
        );
    }
}

/// Records acknowledged under `fsync = always` that the chunk files no longer hold (a log file
/// cut short, as damage or a disk that loses what it synced would leave it): the index still
/// says they were written, so the broker refuses to serve rather than serve a silent hole, says
/// which records and how to go on, and refuses again next time; verify says the same. Deleting
/// the index serves what the log still holds; recover copies it.
#[tokio::test]
async fn a_log_that_lost_acknowledged_records_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data).await;
    let kept = fill(&server.url(), "s", 3, 10).await;
    let file = layout::chunk_file(&data, 0);
    let len = std::fs::metadata(&file).unwrap().len();
    fill(&server.url(), "s", 2, 10).await;
    server.stop().await;
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len).unwrap();

    let why = refused_serve(&data);
    assert!(why.contains("acknowledged records are missing"), "{why}");
    assert!(why.contains("tapeline recover --data DIR --into NEW_DIR"), "{why}");
    assert_eq!(refused_serve(&data), why, "refused again: nothing was quietly accepted");
    let out = tapeline(&["verify", "--data", data.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{report}{}", text(&out.stderr));
    assert!(report.contains("acknowledged records are missing"), "{report}");

    let new = dir.path().join("new");
    let out = tapeline(&["recover", "--data", data.to_str().unwrap(), "--into", new.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let server = TestServer::start(&new).await;
    let last = *kept.keys().last().unwrap();
    let (copied, status) = read(&server.url(), "s", None, last).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(copied.into_iter().collect::<BTreeMap<_, _>>(), kept);
    server.stop().await;

    std::fs::remove_dir_all(data.join(layout::INDEX_DIR)).unwrap();
    let server = TestServer::start(&data).await;
    let (served, status) = read(&server.url(), "s", None, last).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(served.into_iter().collect::<BTreeMap<_, _>>(), kept, "what the log still holds");
    server.stop().await;
}

/// A chunk file gone (deleted by hand, or lost with its disk) while the index points into it:
/// the broker opens, reads of its chunks are `DATA_LOSS` naming their range, new chunks go to a
/// new file (never under a lost file's name, where the old pointers would find them), and the
/// records published after it are served.
#[tokio::test]
async fn a_lost_chunk_file_is_data_loss_and_its_name_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = tapeline::config::Config { chunk_file_bytes: 1 << 20, ..config(&data) };
    let server = TestServer::start_with(config.clone()).await;
    let before = fill(&server.url(), "s", 240, 100).await;
    server.stop().await;
    assert!(layout::chunk_file(&data, 2).exists(), "at least three chunk files");
    let lost = layout::chunk_file(&data, 0);
    std::fs::remove_file(&lost).unwrap();

    let server = TestServer::start_with(config).await;
    let after = fill(&server.url(), "s", 1, 10).await;
    assert!(!lost.exists(), "nothing is written under the lost file's name");
    let last = *after.keys().last().unwrap();
    let (served, lost_ranges) = read_around_damage(&server.url(), "s", last).await;
    server.stop().await;
    let expected: BTreeMap<u64, String> = before
        .iter()
        .chain(&after)
        .filter(|(t, _)| !lost_ranges.iter().any(|(from, to, _)| (from..=to).contains(t)))
        .map(|(t, p)| (*t, p.clone()))
        .collect();
    assert_eq!(served, expected, "every record outside the lost ranges");
    assert!(after.keys().all(|t| served.contains_key(t)), "the records published after the loss");
    assert!(served.len() < before.len() + after.len(), "the lost file's records are reported, not served");
}

/// A data dir written by the previous build (sled at its root holding the catalog, the
/// producers' memory and pointers into `chunks/`, or the chunks themselves in older data dirs)
/// is upgraded at its first open: every record at its tick, the streams' metadata, what
/// retention removed, the producers' memory; the old files are gone and it verifies clean.
#[tokio::test]
async fn a_data_dir_of_the_previous_format_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2.tar.gz");
    let untar = Command::new("tar").arg("xzf").arg(&fixture).arg("-C").arg(dir.path()).status().unwrap();
    assert!(untar.success());
    for name in ["chunk-files", "inline"] {
        let data = dir.path().join(name);
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(format!("{name}.json"))).unwrap()).unwrap();
        let server = TestServer::start(&data).await;
        let mut c = server.client().await;
        let mut want: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();
        for (key, payload) in expected["records"].as_object().unwrap() {
            let (stream, tick) = key.rsplit_once(' ').unwrap();
            want.entry(stream.to_string())
                .or_default()
                .insert(tick.parse().unwrap(), payload.as_str().unwrap().to_string());
        }
        for (stream, records) in &want {
            let last = *records.keys().last().unwrap();
            let (got, status) = read(&server.url(), stream, None, last).await;
            assert!(status.is_none(), "{name} {stream}: {status:?}");
            let got: BTreeMap<u64, String> = got.into_iter().collect();
            if *stream == "meta/s" {
                // Its own retention keeps an hour: once the fixture is older, it keeps its last
                // chunk (a batch of 5) and what came after the removed ones.
                let first = *got.keys().next().expect("the last chunk is never removed");
                let kept: BTreeMap<u64, String> =
                    records.range(first..).map(|(t, p)| (*t, p.clone())).collect();
                assert!(got == kept && got.len() >= 5, "{name} {stream}: {got:?}");
            } else {
                assert_eq!(&got, records, "{name} {stream}");
            }
        }
        if let Some(streams) = expected["streams"].as_array() {
            let listed = stored_streams(&mut c).await;
            for s in streams {
                let got = listed
                    .iter()
                    .find(|l| l.name == s["name"].as_str().unwrap())
                    .expect("the stream is listed");
                if got.name != "meta/s" {
                    assert_eq!(got.records, s["records"].as_u64().unwrap(), "{}", got.name);
                    assert_eq!(got.first_tick, s["first_tick"].as_u64().unwrap(), "{}", got.name);
                }
                assert_eq!(got.last_tick, s["last_tick"].as_u64().unwrap(), "{}", got.name);
                assert_eq!(got.content_type, s["content_type"].as_str().unwrap(), "{}", got.name);
                assert_eq!(got.description, s["description"].as_str().unwrap(), "{}", got.name);
            }
            assert!(!listed.iter().any(|l| l.name == "gone"), "a deleted stream stays deleted");
            for ack in expected["prod_acks"].as_array().unwrap() {
                let seq = ack["sequence"].as_u64().unwrap();
                let batch = tagged(
                    "prod",
                    seq,
                    vec![
                        record("a", format!("a{seq}")),
                        record("b", format!("b{seq}")),
                        record("a", format!("a{seq}'")),
                    ],
                );
                let again = c.publish(batch).await.unwrap().into_inner();
                let ticks: Vec<u64> =
                    ack["ticks"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
                assert!(again.duplicate && again.ticks == ticks, "the producer's memory is kept: {again:?}");
            }
            // What retention removed is still known: a read from the beginning is told.
            let trimmed = listed.iter().find(|l| l.name == "trimmed/x").unwrap();
            let mut sub = Sub::open(
                &mut c,
                pb::SubscribeRequest { end: trimmed.last_tick, ..request(&["trimmed/x"], beginning()) },
            )
            .await;
            let events = sub.until_end().await;
            assert!(events.iter().any(|e| matches!(e, Seen::Truncated { .. })), "{events:?}");
        }
        let fresh = publish(&mut c, "new", &["after the upgrade"]).await;
        assert!(fresh[0] > 0);
        server.stop().await;
        for old in ["conf", "db", "chunks", "tapeline.acknowledged"] {
            assert!(!data.join(old).exists(), "{name}: {old} was removed");
        }
        let out = tapeline(&["verify", "--data", data.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}{}", text(&out.stdout), text(&out.stderr));
    }
}

/// A broker killed while it rebuilds its index (the longest part of an open) leaves a data dir
/// the next open recovers from: the rebuild starts again, and every record is served.
#[tokio::test]
async fn a_crash_during_recovery_leaves_a_data_dir_the_next_open_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = tapeline::config::Config { chunk_file_bytes: 1 << 20, ..config(&data) };
    let server = TestServer::start_with(config.clone()).await;
    let mut all = BTreeMap::new();
    for stream in ["a", "b"] {
        all.insert(stream, fill(&server.url(), stream, 200, 50).await);
    }
    server.stop().await;
    std::fs::remove_dir_all(data.join(layout::INDEX_DIR)).unwrap();
    // How long an open with a rebuild takes, to kill within it.
    let began = std::time::Instant::now();
    let full = Serve::start(&data, &[]);
    let open_time = began.elapsed();
    drop(full);
    std::fs::remove_dir_all(data.join(layout::INDEX_DIR)).unwrap();
    for i in 0..8u32 {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(open_time * i / 8);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let server = TestServer::start_with(config).await;
    for (stream, records) in &all {
        let last = *records.keys().last().unwrap();
        let (got, status) = read(&server.url(), stream, None, last).await;
        assert!(status.is_none(), "{status:?}");
        assert_eq!(&got.into_iter().collect::<BTreeMap<_, _>>(), records, "{stream}");
    }
    server.stop().await;
    eprintln!(
        "an open that rebuilds the index of {} records took {open_time:?}",
        all.values().map(|r| r.len()).sum::<usize>()
    );
}
