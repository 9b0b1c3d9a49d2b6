//! Damaged storage: real data files are damaged (a flipped byte, a truncated log, a corrupt
//! snapshot), then the broker must serve DATA_LOSS naming the range instead of garbage, keep the
//! rest readable, and `tapeline verify` / `tapeline recover` must report and rescue what is left.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tapeline::grpc::pb;
use tonic::Code;

/// A payload unique to (stream, i), long enough that chunks go to sled's blob files.
fn payload(stream: &str, i: usize) -> String {
    format!("<{stream}-{i:06}>").repeat(64)
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

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Flips one byte in every stored copy of `needle`; returns how many copies were damaged.
fn flip_everywhere(dir: &Path, needle: &[u8]) -> usize {
    let mut flipped = 0;
    for file in files(dir) {
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

/// Every record of `stream` in `from..` until the status that ends the subscription (or
/// everything up to `end`).
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
    request.end = Some(end);
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

/// The `A..=B` range a DATA_LOSS message names.
fn named_range(message: &str) -> (u64, u64) {
    let rest = &message[message.find("ticks ").expect("a tick range") + 6..];
    let range: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '=').collect();
    let (a, b) = range.split_once("..=").expect("A..=B");
    (a.parse().unwrap(), b.parse().unwrap())
}

/// Whether a payload's bytes are still somewhere in the files of `data` (read once, now).
fn surviving(data: &Path) -> impl Fn(&str) -> bool {
    // As text, to search with std's fast substring search (payloads are ASCII; the lossy
    // conversion only touches other bytes).
    let files: Vec<String> = files(data)
        .iter()
        .map(|f| String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned())
        .collect();
    move |p: &str| files.iter().any(|text| text.contains(p))
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

/// A flipped byte in data written since sled last opened: at open, sled takes the damaged blob
/// for a torn write and silently rolls its log back to before it, dropping later blobs and the
/// tail of its log. The acknowledged-tick mark turns that into a refusal naming the lost ticks;
/// recover gets back every record whose bytes survive (the dropped blobs are preserved), all but
/// the damaged record and the rest of its chunk.
/// The sled value that points to the chunk holding `needle`.
fn pointer_to(data: &Path, needle: &[u8]) -> Vec<u8> {
    let db = tapeline::storage::engine_config(data).flush_every_ms(None).open().unwrap();
    let chunks = tapeline::chunk_files::ChunkFiles::open_readonly(data).unwrap();
    let (_, pointer) = db
        .open_tree("records")
        .unwrap()
        .iter()
        .map(Result::unwrap)
        .find(|(_, v)| chunks.load(v.clone()).is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle)))
        .expect("the chunk holding the payload");
    pointer.to_vec()
}

/// sled's log cut short before the pointer to a chunk: sled recovers its log up to the cut,
/// losing the pointers written after it. The broker refuses to serve what would be a
/// silent loss of acknowledged records; `verify` says so; `recover` finds every chunk in the
/// chunk files, whose bytes were never touched, and copies every record.
#[tokio::test]
async fn a_log_rolled_back_by_sled_is_refused_and_recovered_from_the_chunk_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Small chunk files, so that the pointers lost span whole files: they must not be deleted.
    let config = tapeline::config::Config { chunk_file_bytes: 1 << 20, ..config(&data) };
    let server = TestServer::start_with(config).await;
    let s = fill(&server.url(), "s", 12, 300).await;
    let t = fill(&server.url(), "t", 1, 100).await;
    server.stop().await;
    let chunk_files = std::fs::read_dir(data.join(tapeline::chunk_files::DIR)).unwrap().count();
    assert!(chunk_files >= 3, "{chunk_files} chunk files: one wholly after the cut, besides the newest");
    let last = *t.keys().last().unwrap();
    // sled's log loses its tail from the first copy of the pointer on, as if the disk had
    // dropped writes it acknowledged.
    let pointer = pointer_to(&data, s.values().nth(450).unwrap().as_bytes());
    let log = std::fs::read(data.join("db")).unwrap();
    let at = log.windows(pointer.len()).position(|w| w == pointer).expect("the pointer is in sled's log");
    std::fs::OpenOptions::new().write(true).open(data.join("db")).unwrap().set_len(at as u64).unwrap();
    // Its snapshot would point past the cut: sled then rebuilds its state from the log alone.
    for snapshot in
        files(&data).into_iter().filter(|f| f.file_name().unwrap().to_string_lossy().starts_with("snap."))
    {
        std::fs::remove_file(snapshot).unwrap();
    }

    let why = refused_serve(&data);
    assert!(why.contains(&format!("but ticks up to {last} were acknowledged")), "{why}");
    assert!(why.contains("tapeline recover --data DIR --into NEW_DIR"), "{why}");
    // Refused again on the next try: nothing was quietly accepted.
    assert_eq!(refused_serve(&data), why);

    let out = tapeline(&["verify", "--data", data.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{report}{}", text(&out.stderr));
    assert!(report.contains(&format!("..={last}: acknowledged but missing from the log")), "{report}");

    let new = dir.path().join("new");
    let out = tapeline(&["recover", "--data", data.to_str().unwrap(), "--into", new.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let server = TestServer::start(&new).await;
    for (name, stream) in [("s", &s), ("t", &t)] {
        let (copied, status) = read(&server.url(), name, None, last).await;
        assert!(status.is_none(), "{status:?}");
        let copied: BTreeMap<u64, String> = copied.into_iter().collect();
        assert_eq!(copied.len(), stream.len(), "every record of {name}");
        assert!(copied == *stream, "every record of {name} as published");
    }
    server.stop().await;
    let out = tapeline(&["verify", "--data", new.to_str().unwrap()]);
    assert!(out.status.success(), "the recovered dir verifies clean: {}", text(&out.stdout));
}

/// A chunk damaged in its chunk file (a bit flipped on disk, or written wrong), where sled's
/// checksums do not reach: the chunk's own CRCs catch it. The subscriber gets DATA_LOSS naming the range
/// and never a damaged record; resuming after the range gives the rest; other streams are whole;
/// verify names the same range.
#[tokio::test]
async fn a_damaged_page_is_data_loss_for_its_range_and_the_rest_stays_readable() {
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
    // Chunks live in the chunk files, where sled's checksums do not reach.
    let chunk_files = data.join(tapeline::chunk_files::DIR);
    assert_eq!(flip_everywhere(&chunk_files, victim_payload.as_bytes()), 1, "one copy of the payload");

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
    eprintln!("damaged range {from}..={to}: {} of {} records of s", s.range(from..=to).count(), s.len());
    server.stop().await;

    let out = tapeline(&["verify", "--data", data.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{report}{}", text(&out.stderr));
    assert!(report.contains(&format!("damaged: stream \"s\" ticks {from}..={to}")), "{report}");
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

#[tokio::test]
async fn a_data_dir_sled_cannot_open_is_refused_clearly_and_recover_scans_its_files() {
    for damage in ["truncated log", "corrupt snapshot"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = TestServer::start(&data).await;
        let mut all = BTreeMap::new();
        for stream in ["a", "b/c"] {
            for (tick, p) in fill(&server.url(), stream, 4, 200).await {
                all.insert((stream.to_string(), tick), p);
            }
        }
        server.stop().await;
        match damage {
            "truncated log" => {
                let db = data.join("db");
                let len = std::fs::metadata(&db).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len / 2).unwrap();
            }
            _ => {
                // A clean restart first, so that sled has written its snapshot file.
                TestServer::start(&data).await.stop().await;
                let snap = files(&data).into_iter().find(|f| f.to_string_lossy().contains("snap.")).unwrap();
                let mut bytes = std::fs::read(&snap).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0xff;
                std::fs::write(&snap, bytes).unwrap();
            }
        }

        // The broker refuses to start with one clear line saying what to run.
        let why = refused_serve(&data);
        assert!(why.contains("tapeline recover --data DIR --into NEW_DIR"), "{damage}: {why}");
        eprintln!("{damage}: {why}");
        let out = tapeline(&["verify", "--data", data.to_str().unwrap()]);
        assert!(!out.status.success(), "{damage}: {}", text(&out.stdout));

        // Every record whose bytes are still in the files comes back, unchanged.
        let present = surviving(&data);
        let expected: BTreeMap<(String, u64), String> =
            all.iter().filter(|(_, p)| present(p)).map(|(k, p)| (k.clone(), p.clone())).collect();
        assert!(!expected.is_empty());
        let new = dir.path().join("new");
        let out = tapeline(&["recover", "--data", data.to_str().unwrap(), "--into", new.to_str().unwrap()]);
        let said = text(&out.stdout);
        assert!(out.status.success(), "{damage}: {said}{}", text(&out.stderr));
        assert!(said.contains(&format!("recovered {} records", expected.len())), "{damage}: {said}");
        let server = TestServer::start(&new).await;
        let mut copied = BTreeMap::new();
        let last = all.keys().map(|(_, t)| *t).max().unwrap();
        for stream in ["a", "b/c"] {
            let (got, status) = read(&server.url(), stream, None, last).await;
            assert!(status.is_none(), "{status:?}");
            copied.extend(got.into_iter().map(|(t, p)| ((stream.to_string(), t), p)));
        }
        server.stop().await;
        assert_eq!(copied, expected, "{damage}");
        eprintln!("{damage}: {} of {} records recovered", expected.len(), all.len());
    }
}

/// Data dirs created before tapeline chose its own sled segment size (sled's default, 512 KiB)
/// still open, keep their records, and take new ones: sled refuses to open a data dir with another
/// segment size than the one it was created with.
#[tokio::test]
async fn a_data_dir_created_with_sleds_default_segment_size_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(sled::Config::new().path(&data).flush_every_ms(None).open().unwrap());
    let conf = || String::from_utf8_lossy(&std::fs::read(data.join("conf")).unwrap()).into_owned();
    assert!(conf().contains("segment_size: 524288"), "{}", conf());
    let server = TestServer::start(&data).await;
    let before = fill(&server.url(), "old", 2, 50).await;
    server.stop().await;
    let server = TestServer::start(&data).await;
    let last = *before.keys().last().unwrap();
    let (read_back, status) = read(&server.url(), "old", None, last).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(read_back.into_iter().collect::<BTreeMap<_, _>>(), before);
    server.stop().await;
    assert!(conf().contains("segment_size: 524288"));
    // A new data dir gets tapeline's own size.
    let fresh = dir.path().join("fresh");
    TestServer::start(&fresh).await.stop().await;
    assert!(String::from_utf8_lossy(&std::fs::read(fresh.join("conf")).unwrap())
        .contains("segment_size: 8388608"));
}

/// A data dir written before chunk files keeps its chunks in sled. It is made here from a new one
/// by putting every chunk back into sled under its key, as older builds stored it. It must open
/// as it is, serve every record, take new ones (into chunk files) after them, and verify clean.
#[tokio::test]
async fn a_data_dir_from_before_chunk_files_opens_and_grows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data).await;
    let mut stored = fill(&server.url(), "old", 3, 200).await;
    server.stop().await;
    {
        let db = tapeline::storage::engine_config(&data).flush_every_ms(None).open().unwrap();
        let chunks = tapeline::chunk_files::ChunkFiles::open_readonly(&data).unwrap();
        let records = db.open_tree("records").unwrap();
        let mut inlined = 0;
        for entry in records.range(..[0xff_u8, 0xff, 0xff, 0xfe]) {
            let (key, pointer) = entry.unwrap();
            let chunk = chunks.load(pointer).unwrap();
            records.insert(key, chunk.as_ref()).unwrap();
            inlined += 1;
        }
        assert!(inlined >= 3, "{inlined} chunks");
        db.open_tree("meta").unwrap().remove(tapeline::storage::SYNCED_KEY).unwrap();
        db.flush().unwrap();
    }
    std::fs::remove_dir_all(data.join(tapeline::chunk_files::DIR)).unwrap();

    let server = TestServer::start(&data).await;
    stored.extend(fill(&server.url(), "old", 1, 200).await);
    let last = *stored.keys().last().unwrap();
    let (read_back, status) = read(&server.url(), "old", None, last).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(read_back.into_iter().collect::<BTreeMap<_, _>>(), stored);
    server.stop().await;
    assert!(data.join(tapeline::chunk_files::DIR).exists(), "new chunks went to chunk files");
    let out = tapeline(&["verify", "--data", data.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{} intact records", stored.len())), "{}", text(&out.stdout));
}

/// A chunk file gone (deleted by hand, or lost with its disk) while sled still points into it:
/// the broker opens, reads of its chunks are `DATA_LOSS` naming their range, new chunks go to a
/// new file (never under the lost file's name, where the old pointers would find them), and the
/// records published after it are served.
#[tokio::test]
async fn a_lost_chunk_file_is_data_loss_and_its_name_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data).await;
    let before = fill(&server.url(), "s", 2, 50).await;
    server.stop().await;
    let lost = tapeline::chunk_files::path_in(&data, 0);
    std::fs::remove_file(&lost).unwrap();

    let server = TestServer::start(&data).await;
    let after = fill(&server.url(), "s", 1, 10).await;
    let reused = std::fs::metadata(&lost).map_or(0, |m| m.len());
    assert_eq!(reused, 0, "nothing is written under the lost file's name");
    assert!(tapeline::chunk_files::path_in(&data, 1).exists(), "new chunks go to the next file");
    let last = *after.keys().last().unwrap();
    // Each lost chunk is its own DATA_LOSS range; a subscriber resumes after each.
    let (mut served, mut lost_ranges, mut resume) = (BTreeMap::new(), Vec::new(), None);
    loop {
        let (got, status) = read(&server.url(), "s", resume, last).await;
        served.extend(got);
        let Some(status) = status else { break };
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");
        let (from, to) = named_range(status.message());
        lost_ranges.push((from, to));
        resume = Some(to);
    }
    assert_eq!(served, after, "exactly the records published after the loss");
    assert!(
        before.keys().all(|t| lost_ranges.iter().any(|(from, to)| (from..=to).contains(&t))),
        "every lost record lies in a range named: {lost_ranges:?}"
    );
    server.stop().await;
}
