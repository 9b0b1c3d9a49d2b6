//! A full disk, for real (issue 17, item 5): the broker's data dir on a small ext4 filesystem of
//! its own (a loop device) that publishers, retention, compaction and another tenant's ballast
//! file fill, and on the power-cut filesystem (`common/powercut.rs`) made to fail `fdatasync`.
//! What is attacked:
//! - the disk budget (`max_disk_bytes`, `min_free_disk_bytes`) refuses publishing under load with
//!   RESOURCE_EXHAUSTED naming the rule, while subscribers keep being served, retention and
//!   compaction run, and nothing acknowledged is lost; publishing resumes once there is room;
//! - a write that meets ENOSPC anyway (no reserve, the budget's figures stale) is undone and
//!   refused with RESOURCE_EXHAUSTED and leaves no partial record; the writer goes on; retention's
//!   and compaction's records and the checkpoint before a deletion meet the full disk without
//!   stopping it, and catch up once there is room, all on the same running broker;
//! - a failed `fdatasync`: ENOSPC refuses the batch and the broker goes on, EIO stops the log
//!   taking writes (UNAVAILABLE); in no case is a record acknowledged that was not synced.
//!
//! Each case ends with a restart (after a power cut, on the power-cut filesystem) that holds
//! exactly what was acknowledged, and `tapeline verify` finding the log clean.
//!
//! The loop devices and the FUSE mounts need root (as CI runs; `.ci/run` installs e2fsprogs and
//! mount): nothing here is skipped.

use crate::support::powercut::{Mounted, PowerCutFs};
use crate::support::*;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tapeline::config::Config;
use tapeline::protocol::pb;
use tonic::Code;

type TapelineClient = tapeline::client::Client;

const MIB: u64 = 1 << 20;
/// How often the broker's disk budget reads the real figures at most (`store/space.rs`).
const BUDGET_REFRESH: Duration = Duration::from_millis(500);

/// Publishes 64 KiB batches into `stream` until one is refused; returns the acknowledged
/// payloads and the refusal.
async fn fill_until_refused(url: &str, stream: &str) -> (Vec<String>, tonic::Status) {
    let mut client = client(url).await;
    let mut acked = Vec::new();
    for i in 0.. {
        let payloads: Vec<String> = (0..16).map(|j| format!("{i}:{j}:{}", "d".repeat(4000))).collect();
        let records = payloads.iter().map(|p| record(stream, p.as_str())).collect();
        match client.publish(pb::PublishRequest { records, ..Default::default() }).await {
            Ok(_) => acked.extend(payloads),
            Err(status) => return (acked, status),
        }
        assert!(i < 100_000, "never refused");
    }
    unreachable!()
}

/// Everything in `stream`, read from the beginning to the tail.
async fn everything(url: &str, stream: &str) -> Vec<String> {
    let mut client = client(url).await;
    let tail = client.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    let mut sub =
        Sub::open(&mut client, pb::SubscribeRequest { end: tail, ..request(&[stream], beginning()) }).await;
    payloads(&sub.until_end().await)
}

/// Publishes one small record, retrying while the budget is still exhausted (it is read again
/// at most every 500 ms).
async fn publishes_again(url: &str) -> u64 {
    let mut client = client(url).await;
    for _ in 0..50 {
        match client
            .publish(pb::PublishRequest { records: vec![record("after", "ok")], ..Default::default() })
            .await
        {
            Ok(ack) => return ack.into_inner().ticks[0],
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("publishing did not resume");
}

#[tokio::test]
async fn the_configured_limit_refuses_publishing_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 24u64 << 20;
    let server = TestServer::start_with(Config { max_disk_bytes: Some(limit), ..config(dir.path()) }).await;
    // A subscriber following live while the disk fills.
    let mut follower = client(&server.url()).await;
    let mut live = Sub::open(&mut follower, request(&["big"], beginning())).await;
    let (acked, refusal) = fill_until_refused(&server.url(), "big").await;
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains(&format!("at most {limit} bytes (max_disk_bytes)")), "{refusal:?}");
    assert!(!acked.is_empty());
    assert_eq!(payloads(&live.take_records(acked.len()).await), acked, "subscribers keep being served");
    assert_eq!(everything(&server.url(), "big").await, acked, "nothing acknowledged is harmed");
    server.stop().await;

    // Room again (here: a higher limit): publishing works, and everything is still there.
    let server =
        TestServer::start_with(Config { max_disk_bytes: Some(limit * 4), ..config(dir.path()) }).await;
    publishes_again(&server.url()).await;
    assert_eq!(everything(&server.url(), "big").await, acked);
    server.stop().await;
}

/// Runs `program` with `args`; panics naming the command and what it said when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let command = format!("`{program} {}`", args.join(" "));
    let out =
        Command::new(program).args(args).output().unwrap_or_else(|err| panic!("cannot run {command}: {err}"));
    if !out.status.success() {
        panic!(
            "{command} failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small ext4 filesystem of its own: a sparse image in a temp dir, attached to a loop device
/// and mounted; unmounted and detached on drop, also when the test panics.
struct Ext4 {
    mount: PathBuf,
    /// The loop device, once attached.
    device: Option<String>,
    mounted: bool,
    /// Holds the image and the mount point; removed once the drop has unmounted.
    _dir: tempfile::TempDir,
}

impl Ext4 {
    /// The block size: a file's last block has room for small records when the disk is full.
    const BLOCK: u64 = 4096;

    /// A new, empty filesystem of `mib` MiB. No block is reserved for root (the tests run as
    /// root): the free space the broker reads is all there is.
    fn new(mib: u64) -> Ext4 {
        let dir = tempfile::tempdir().expect("a temp dir for the image");
        let image = dir.path().join("ext4.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib * MIB))
            .unwrap_or_else(|err| panic!("cannot create the image {}: {err}", image.display()));
        let image = image.to_str().expect("a UTF-8 temp path").to_string();
        run("mkfs.ext4", &["-q", "-F", "-m", "0", "-b", &Ext4::BLOCK.to_string(), &image]);
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("create the mount point");
        let mut fs = Ext4 { mount, device: None, mounted: false, _dir: dir };
        let device = run("losetup", &["--find", "--show", &image]).trim().to_string();
        fs.device = Some(device.clone());
        run("mount", &["-t", "ext4", &device, fs.mount.to_str().expect("a UTF-8 temp path")]);
        fs.mounted = true;
        fs
    }

    fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Panicking in a drop while the test panics would abort the whole binary: only report.
        let report = |problem: String| {
            if std::thread::panicking() {
                eprintln!("{problem}");
            } else {
                panic!("{problem}");
            }
        };
        if self.mounted {
            let mount = self.mount.to_str().unwrap_or_default();
            let out = Command::new("umount").arg(mount).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                // A file is still open there (a broker a failing test left running): detached
                // now, unmounted by the kernel once it is closed.
                let lazy = Command::new("umount").args(["-l", mount]).output();
                let said = |o: &std::io::Result<std::process::Output>| match o {
                    Ok(o) => format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim()),
                    Err(err) => err.to_string(),
                };
                report(format!("cannot unmount {mount} ({}); lazily: {}", said(&out), said(&lazy)));
            }
        }
        if let Some(device) = &self.device {
            // After a lazy unmount, the device is detached once the kernel lets go of it.
            let out = Command::new("losetup").args(["-d", device]).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                report(format!("cannot detach the loop device {device}: {out:?}"));
            }
        }
    }
}

/// Another tenant's file on the filesystem: grows (allocated with `fallocate`) until at most
/// `leave` bytes are free; removing it frees them again.
fn fill(ballast: &Path, leave: u64) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ballast)
        .unwrap_or_else(|err| panic!("cannot open the ballast {}: {err}", ballast.display()));
    let dir = ballast.parent().expect("the ballast's directory");
    loop {
        let free = fs4::available_space(dir).expect("statvfs of the small filesystem");
        if free <= leave {
            return;
        }
        // The ballast's extent tree takes blocks too: ask for less until something fits.
        let mut want = free - leave;
        loop {
            let len = file.metadata().expect("the ballast's size").len();
            // SAFETY: a plain syscall on an open descriptor; no memory is shared with it.
            let ret = unsafe { libc::fallocate(file.as_raw_fd(), 0, len as i64, want as i64) };
            if ret == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "fallocate of the ballast: {err}");
            if want <= Ext4::BLOCK {
                return;
            }
            want /= 2;
        }
    }
}

/// The chunk files of the data dir `data`, in order.
fn chunk_files(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join(tapeline::store::layout::LOG_DIR))
        .expect("the data dir's log")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tpc"))
        .collect();
    files.sort();
    files
}

/// Bytes the chunk files of the data dir `data` take.
fn log_bytes(data: &Path) -> u64 {
    chunk_files(data).iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
}

/// `tapeline verify` on a stopped broker's data dir finds nothing damaged and no torn tail: the
/// log's files end on a whole record.
fn verify_clean(data: &Path) {
    let out = Command::new(BIN).args(["verify", "--data"]).arg(data).output().expect("run tapeline verify");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(": 0 damaged ranges") && !report.contains("note:"),
        "tapeline verify: {}\n{report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A settings file in `dir` (off the small disk).
fn settings(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("tapeline.toml");
    std::fs::write(&path, text).expect("write the settings file");
    path
}

/// Starts `tapeline serve --fsync always` on `data` with `extra` arguments, its log `name`.log in
/// `logs` (off the disk under test, where it could not be written).
fn serve(data: &Path, extra: &[&str], logs: &Path, name: &str) -> Serve {
    let mut args =
        vec!["serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap(), "--fsync", "always"];
    args.extend_from_slice(extra);
    Serve::spawn(&args, logs.join(format!("{name}.log")))
}

/// Stops the broker with SIGTERM; it must exit cleanly.
fn stop(serve: Serve) {
    let log = serve.log_path.clone();
    let (clean, _) = serve.terminate();
    assert!(clean, "the broker did not stop cleanly:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

/// Whether the broker logged a line holding every one of `words`.
fn logged(serve: &Serve, words: &[&str]) -> bool {
    serve.log().lines().any(|line| words.iter().all(|w| line.contains(w)))
}

/// How many lines the broker logged holding every one of `words`.
fn logged_count(serve: &Serve, words: &[&str]) -> usize {
    serve.log().lines().filter(|line| words.iter().all(|w| line.contains(w))).count()
}

/// Records by (stream, tick): their payloads.
type Acked = BTreeMap<(String, u64), String>;

/// A payload of `len` bytes that names `what`, so that a record read back is told from another.
fn payload(what: &str, len: usize) -> String {
    let mut p = format!("{what}:");
    p.extend(std::iter::repeat_n('x', len.saturating_sub(p.len())));
    p
}

/// Publishes one batch of `payloads` into `stream`; records the ack in `acked`.
async fn publish_into(
    client: &mut TapelineClient,
    acked: &mut Acked,
    stream: &str,
    payloads: Vec<String>,
) -> Result<(), tonic::Status> {
    let records = payloads.iter().map(|p| record(stream, p.as_str())).collect();
    let ack = client.publish(pb::PublishRequest { records, ..Default::default() }).await?.into_inner();
    assert_eq!(ack.ticks.len(), payloads.len(), "one tick per record");
    for (tick, payload) in ack.ticks.into_iter().zip(payloads) {
        acked.insert((stream.to_string(), tick), payload);
    }
    Ok(())
}

/// Everything stored in the streams matching `patterns`, read from the beginning to the tail.
async fn stored(url: &str, patterns: &[&str]) -> Acked {
    let mut client = client(url).await;
    let tail = client.hello(pb::HelloRequest::default()).await.expect("hello").into_inner().tail_tick;
    let request = pb::SubscribeRequest { end: tail, ..request(patterns, beginning()) };
    let mut sub = Sub::open(&mut client, request).await;
    records(&sub.until_end().await).into_iter().map(|(s, t, p)| ((s, t), p)).collect()
}

/// Those of `records` whose stream `keep` takes.
fn only(records: &Acked, keep: impl Fn(&str) -> bool) -> Acked {
    records.iter().filter(|((s, _), _)| keep(s)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// What is stored is what was acknowledged: exactly, in the streams retention keeps whole; in
/// `trimmed`, whose front retention removes, a part of it up to the end.
fn check_stored(stored: &Acked, acked: &Acked, trimmed: &str) {
    let (got, want) = (only(stored, |s| s != trimmed), only(acked, |s| s != trimmed));
    if got != want {
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
        panic!(
            "{} records stored, {} acknowledged: missing {missing:?}, never acknowledged {extra:?}",
            got.len(),
            want.len()
        );
    }
    let got: Vec<_> = stored.iter().filter(|((s, _), _)| s == trimmed).collect();
    let want: Vec<_> = acked.iter().filter(|((s, _), _)| s == trimmed).collect();
    assert!(
        !got.is_empty() && want.ends_with(&got),
        "{trimmed}: the {} records stored are not the last of the {} acknowledged",
        got.len(),
        want.len()
    );
}

/// A bounded wait that polls: fails the test, naming what it waited for, after `WAIT`.
struct Deadline(Instant);

impl Deadline {
    fn start() -> Deadline {
        Deadline(Instant::now())
    }

    /// Lets a moment pass before the next look, or gives up.
    async fn next(&self, what: &str) {
        assert!(self.0.elapsed() < WAIT, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stream `name` as `ListStreams` shows it.
async fn stream_info(client: &mut TapelineClient, name: &str) -> pb::StreamInfo {
    stored_streams(client).await.into_iter().find(|s| s.name == name).expect("the stream is listed")
}

/// Streams with long names: the checkpoint written before a chunk file is deleted (which lists
/// every stream) needs more room than the end of a block leaves.
async fn long_named_streams(client: &mut TapelineClient, acked: &mut Acked) {
    for i in 0..48 {
        let stream = format!("pad/{i:02}-{}", "n".repeat(200));
        publish_into(client, acked, &stream, vec![payload("pad", 16)]).await.unwrap();
    }
}

/// Publishers of the load.
const PUBLISHERS: usize = 3;
/// Batches each publisher sends before it writes its kept stream too: the first chunk files
/// hold only churn and the quiet stream.
const WARM_UP: usize = 16;
/// Records `churn` keeps (`max_records`).
const CHURN_KEPT: u64 = 64;

/// Publisher `n` of the load: per batch, 2 × 16 KiB into `churn` (retention keeps its last
/// records) and, after the first `WARM_UP` batches, 2 × 16 KiB into its own kept stream;
/// publisher 0 also writes the quiet stream in its first batches, whose chunks retention leaves
/// alone in an early chunk file, for compaction to move. Publishes until a batch is refused;
/// returns what was acknowledged and the refusal.
async fn load(url: String, n: usize) -> (Acked, tonic::Status) {
    let mut client = client(&url).await;
    let mut acked = Acked::new();
    for i in 0.. {
        let mut batch: Vec<(String, String)> =
            (0..2).map(|j| ("churn".to_string(), payload(&format!("churn:{n}:{i}:{j}"), 16 << 10))).collect();
        if i >= WARM_UP {
            batch.extend(
                (0..2).map(|j| (format!("kept/{n}"), payload(&format!("kept:{n}:{i}:{j}"), 16 << 10))),
            );
        }
        if n == 0 && i < 4 {
            batch.push(("quiet".to_string(), payload(&format!("quiet:{i}"), 8 << 10)));
        }
        let records = batch.iter().map(|(s, p)| record(s, p.as_str())).collect();
        let ack = match client.publish(pb::PublishRequest { records, ..Default::default() }).await {
            Ok(ack) => ack.into_inner(),
            Err(status) => return (acked, status),
        };
        for ((stream, payload), tick) in batch.into_iter().zip(ack.ticks) {
            acked.insert((stream, tick), payload);
        }
        assert!(i < 100_000, "publisher {n} was never refused");
    }
    unreachable!()
}

/// The budget under load, on a real small filesystem: another tenant's ballast leaves 16 MiB
/// beside the 16 MiB reserve; publishers fill it while a subscriber follows, retention trims and
/// compaction moves chunks. Each publisher is refused in the end with RESOURCE_EXHAUSTED naming
/// the reserve; the subscriber has everything; nothing acknowledged is lost; with the ballast
/// gone, the same broker takes batches again; and after a restart everything is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_refuses_publishing_under_load_and_harms_nothing() {
    let disk = Ext4::new(64);
    let data = disk.path().join("data");
    let ballast = disk.path().join("ballast");
    let aside = tempfile::tempdir().unwrap();
    let reserve = 16 * MIB;
    let settings = settings(
        aside.path(),
        &format!(
            "chunk_file_bytes = 1048576\nmin_free_disk_bytes = {reserve}\n[retention]\ncheck_every = \"20ms\"\n\
             [[retention.rule]]\nstreams = [\"churn\"]\nmax_records = {CHURN_KEPT}\n"
        ),
    );
    let settings = settings.to_str().unwrap();
    let broker = serve(&data, &["--config", settings], aside.path(), "serve");
    let url = broker.url.clone();
    fill(&ballast, reserve + 16 * MIB);

    let mut follower = client(&url).await;
    let mut live = Sub::open(&mut follower, request(&["kept/**", "quiet"], beginning())).await;
    let publishers: Vec<_> = (0..PUBLISHERS).map(|n| tokio::spawn(load(url.clone(), n))).collect();
    let mut acked = Acked::new();
    for publisher in publishers {
        let (got, refusal) = tokio::time::timeout(WAIT, publisher).await.expect("refused in time").unwrap();
        assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
        assert!(
            refusal
                .message()
                .contains(&format!("{reserve} bytes must stay free on the disk (min_free_disk_bytes)")),
            "{refusal:?}"
        );
        acked.extend(got);
    }
    let followed = only(&acked, |s| s != "churn");
    assert!(
        followed.keys().any(|(s, _)| s.starts_with("kept/")),
        "the disk filled before any record was kept"
    );
    let seen: Acked =
        records(&live.take_records(followed.len()).await).into_iter().map(|(s, t, p)| ((s, t), p)).collect();
    assert_eq!(seen, followed, "the subscriber keeps being served");
    check_stored(&stored(&url, &["**"]).await, &acked, "churn");
    // Retention and compaction ran under the load.
    let waiting = Deadline::start();
    while !logged(&broker, &["chunks moved out of sparse chunk files"]) {
        waiting.next("compaction moved chunks out of a sparse chunk file").await;
    }
    assert!(logged(&broker, &["retention removed chunks"]));
    // The budget refused before any write met the full disk.
    assert!(!logged(&broker, &["No space left on device"]), "{}", broker.log());

    // The other tenant leaves: the same broker takes batches again.
    std::fs::remove_file(&ballast).unwrap();
    let mut publisher = client(&url).await;
    let waiting = Deadline::start();
    while let Err(status) =
        publish_into(&mut publisher, &mut acked, "kept/after", vec![payload("after", 16 << 10)]).await
    {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        waiting.next("publishing resumes").await;
    }
    let mut seen = records(&live.take_records(1).await);
    assert_eq!(seen.pop().map(|(s, _, _)| s).as_deref(), Some("kept/after"), "and the subscriber follows");
    stop(broker);
    verify_clean(&data);

    let broker = serve(&data, &["--config", settings], aside.path(), "restarted");
    check_stored(&stored(&broker.url, &["**"]).await, &acked, "churn");
    stop(broker);
}

/// The real ENOSPC, with the budget out of the way: no reserve, and its figures stale (it reads
/// the free space at most every 500 ms; the disk is filled right after it did). The write that
/// meets the full disk is undone and refused; the later ones are refused too, the writer never
/// stopped; retention and compaction meet the full disk and fail their passes without stopping
/// it; once the ballast is gone, publishing resumes and retention catches up, all on the same
/// running broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_meets_a_full_disk_is_undone_and_the_broker_goes_on() {
    let disk = Ext4::new(64);
    let data = disk.path().join("data");
    let ballast = disk.path().join("ballast");
    let aside = tempfile::tempdir().unwrap();
    // The aged stream's records are due for removal a while after they are published: by then
    // the disk is full.
    let settings = settings(
        aside.path(),
        "chunk_file_bytes = 1048576\nmin_free_disk_bytes = 0\n[retention]\ncheck_every = \"20ms\"\n\
         [[retention.rule]]\nstreams = [\"aged\"]\nmax_age = \"3s\"\n",
    );
    let settings = settings.to_str().unwrap();
    let broker = serve(&data, &["--config", settings], aside.path(), "serve");
    let url = broker.url.clone();
    let mut publisher = client(&url).await;
    let mut acked = Acked::new();

    // The quiet stream's one chunk stays behind in the first file, which compaction must empty
    // once retention removed the aged records around it.
    publish_into(&mut publisher, &mut acked, "quiet", vec![payload("quiet", 32 << 10)]).await.unwrap();
    for i in 0..14 {
        let batch = (0..16).map(|j| payload(&format!("aged:{i}:{j}"), 16 << 10)).collect();
        publish_into(&mut publisher, &mut acked, "aged", batch).await.unwrap();
    }
    let aged_first = acked.keys().find(|(s, _)| s == "aged").unwrap().1;
    long_named_streams(&mut publisher, &mut acked).await;

    // The budget reads the figures with the disk nearly empty; the disk fills at once; the next
    // batch, admitted on those figures, meets ENOSPC half way through its record.
    let big = |n: usize| (0..4).map(|j| payload(&format!("big:{n}:{j}"), 512 << 10)).collect::<Vec<_>>();
    let mut refusal = None;
    for attempt in 0..5 {
        let _ = std::fs::remove_file(&ballast);
        publish_into(&mut publisher, &mut acked, "probe", vec![payload("probe", 8)]).await.unwrap();
        tokio::time::sleep(BUDGET_REFRESH + Duration::from_millis(50)).await;
        // The budget reads the figures for this one.
        publish_into(&mut publisher, &mut acked, "probe", vec![payload("probe", 8)]).await.unwrap();
        fill(&ballast, 256 << 10);
        let before = log_bytes(&data);
        let status = publish_into(&mut publisher, &mut acked, "big", big(attempt))
            .await
            .expect_err("2 MiB do not fit in 256 KiB");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        if status.message().contains("the disk budget is exhausted") {
            // The budget read the figures again in between (a slow machine): once more.
            continue;
        }
        // Nothing of the record is left: at most the header of the file it started.
        let after = log_bytes(&data);
        assert!(after <= before + 28, "the refused write left {} bytes in the log", after - before);
        refusal = Some(status);
        break;
    }
    let refusal = refusal.expect("in five attempts, no batch admitted on stale figures met ENOSPC");
    assert!(
        refusal.message().contains("the disk is full") && refusal.message().contains("the write was undone"),
        "{refusal:?}"
    );

    // Full to the last block. The writer goes on: every batch is refused, whether the write meets
    // the full disk or the budget has read the figures again (and refuses before writing).
    fill(&ballast, 0);
    let waiting = Deadline::start();
    loop {
        let batch = vec![payload("more", 256 << 10)];
        let status = publish_into(&mut publisher, &mut acked, "big", batch).await.expect_err("a full disk");
        assert_eq!(status.code(), Code::ResourceExhausted, "the writer goes on: {status:?}");
        if status.message().contains("0 bytes must stay free on the disk (min_free_disk_bytes)") {
            break;
        }
        waiting.next("the budget reads the full disk").await;
    }
    // Retention's records, compaction's and the checkpoint before a deletion meet the full disk,
    // pass after pass (for a second or so: the index is flushed meanwhile).
    let waiting = Deadline::start();
    while logged_count(&broker, &["retention pass failed", "the disk is full"]) < 50 {
        waiting.next("retention passes met the full disk").await;
    }
    assert!(!logged(&broker, &["the log takes no more writes"]), "the writer stopped:\n{}", broker.log());
    let status = publish_into(&mut publisher, &mut acked, "big", vec![payload("still", 256 << 10)])
        .await
        .expect_err("a full disk");
    assert_eq!(status.code(), Code::ResourceExhausted, "the writer goes on: {status:?}");
    // Readers are served all along.
    check_stored(&stored(&url, &["**"]).await, &acked, "aged");
    let full = log_bytes(&data);

    // Room again: retention catches up and publishing resumes, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let mut lister = client(&url).await;
    let waiting = Deadline::start();
    while stream_info(&mut lister, "aged").await.first_tick <= aged_first {
        waiting.next("retention removed the aged records").await;
    }
    let waiting = Deadline::start();
    while log_bytes(&data) >= full / 2 {
        waiting.next("the chunk files retention emptied are deleted").await;
    }
    let waiting = Deadline::start();
    while let Err(status) = publish_into(&mut publisher, &mut acked, "big", big(99)).await {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        waiting.next("publishing resumes").await;
    }
    stop(broker);
    verify_clean(&data);

    let broker = serve(&data, &["--config", settings], aside.path(), "restarted");
    check_stored(&stored(&broker.url, &["**"]).await, &acked, "aged");
    stop(broker);
}

/// The checkpoint that must be written before a chunk file is deleted meets the full disk while
/// the small records removing the chunks (`Trim`) still fit in the end of the active file's last
/// block: retention removes the aged records, and their files stay. Once there is room, a later
/// pass deletes them, on an idle broker: nothing else may be needed to get the room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_files_a_full_disk_kept_from_deletion_are_deleted_once_there_is_room() {
    let disk = Ext4::new(64);
    let data = disk.path().join("data");
    let ballast = disk.path().join("ballast");
    let aside = tempfile::tempdir().unwrap();
    let settings = settings(
        aside.path(),
        "chunk_file_bytes = 1048576\nmin_free_disk_bytes = 0\n[retention]\ncheck_every = \"20ms\"\n\
         [[retention.rule]]\nstreams = [\"aged\"]\nmax_age = \"2s\"\n",
    );
    let broker = serve(&data, &["--config", settings.to_str().unwrap()], aside.path(), "serve");
    let url = broker.url.clone();
    let mut publisher = client(&url).await;
    let mut acked = Acked::new();
    // One record per chunk (a chunk is sealed at 64 KiB), four files of them.
    for i in 0..14 {
        let batch = (0..4).map(|j| payload(&format!("aged:{i}:{j}"), 64 << 10)).collect();
        publish_into(&mut publisher, &mut acked, "aged", batch).await.unwrap();
    }
    // In the active file, which is never compacted.
    long_named_streams(&mut publisher, &mut acked).await;
    // Half a block or more left at the end of the active file: room for a few dozen `Trim`s.
    let active = chunk_files(&data).pop().unwrap();
    while active.metadata().unwrap().len() % Ext4::BLOCK > Ext4::BLOCK / 2 {
        publish_into(&mut publisher, &mut acked, "pad/00", vec![payload("tail", 40)]).await.unwrap();
    }
    fill(&ballast, 0);

    // Every aged record but the last chunk's is removed, and the files they were in stay.
    let mut lister = client(&url).await;
    let waiting = Deadline::start();
    while stream_info(&mut lister, "aged").await.records > 1 {
        waiting.next("retention removed the aged records").await;
    }
    assert!(logged(&broker, &["chunk files not deleted yet", "No space left on device"]), "{}", broker.log());
    let full = log_bytes(&data);
    assert!(full > 3 * MIB, "the emptied chunk files were deleted on a full disk ({full} bytes left)");

    std::fs::remove_file(&ballast).unwrap();
    let waiting = Deadline::start();
    while log_bytes(&data) > full / 2 {
        waiting.next("the chunk files retention emptied are deleted").await;
    }
    stop(broker);
    verify_clean(&data);
}

/// A broker under `--fsync always` on a new power-cut filesystem mounted in `dir`, its data dir
/// made durable first (as an operator makes it).
fn on_powercut_disk(dir: &Path) -> (Mounted, PathBuf) {
    let mountpoint = dir.join("disk");
    std::fs::create_dir(&mountpoint).unwrap();
    let disk = PowerCutFs::mount(&mountpoint);
    let data = mountpoint.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::File::open(&mountpoint).and_then(|d| d.sync_all()).unwrap();
    (disk, data)
}

/// A few batches over two streams, all acknowledged.
async fn some_batches(url: &str, acked: &mut Acked, what: &str) {
    let mut client = client(url).await;
    for i in 0..4 {
        let stream = format!("s{}", i % 2);
        let batch = (0..8).map(|j| payload(&format!("{what}:{i}:{j}"), 2000)).collect();
        publish_into(&mut client, acked, &stream, batch).await.unwrap();
    }
}

/// Publishes a batch into each of `streams` at once, each on its own connection (so that some
/// share a group commit); returns each one's outcome, what was acknowledged recorded in `acked`.
async fn at_once(
    url: &str,
    acked: &mut Acked,
    streams: &[&str],
    what: &str,
) -> Vec<Result<(), tonic::Status>> {
    let tasks: Vec<_> = streams
        .iter()
        .map(|stream| {
            let (url, stream, what) = (url.to_string(), stream.to_string(), what.to_string());
            tokio::spawn(async move {
                let mut client = client(&url).await;
                let mut got = Acked::new();
                let batch = (0..8).map(|j| payload(&format!("{what}:{stream}:{j}"), 2000)).collect();
                let outcome = publish_into(&mut client, &mut got, &stream, batch).await;
                (got, outcome)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        let (got, outcome) = tokio::time::timeout(WAIT, task).await.expect("answered in time").unwrap();
        acked.extend(got);
        outcomes.push(outcome);
    }
    outcomes
}

/// EIO on the `fdatasync` of a publish: that publish is refused with UNAVAILABLE saying the log
/// takes no more writes, and so is every write after it (those of its group commit too); nothing
/// of them is acknowledged or read; after a power cut and a restart, every record acknowledged
/// before is there and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_fdatasync_stops_the_log_taking_writes_and_acknowledges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut disk, data) = on_powercut_disk(dir.path());
    let broker = serve(&data, &[], dir.path(), "serve");
    let mut acked = Acked::new();
    some_batches(&broker.url, &mut acked, "before").await;

    disk.fail_fsyncs(libc::EIO, 1);
    let mut refused = Acked::new();
    for round in ["failed", "later"] {
        for outcome in at_once(&broker.url, &mut refused, &["s0", "s1", "new", "other"], round).await {
            let status = outcome.expect_err("nothing is acknowledged after a failed sync");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("the log takes no more writes"), "{status:?}");
            assert!(status.message().contains("Input/output error"), "the cause is named: {status:?}");
        }
    }
    assert!(refused.is_empty());
    assert_eq!(disk.failed_fsyncs(), 1, "a publish's sync met the failure");
    let mut admin = client(&broker.url).await;
    let created = admin
        .create_stream(pb::CreateStreamRequest { stream: "created".into(), ..Default::default() })
        .await
        .expect_err("no write of any kind");
    assert_eq!(created.code(), Code::Unavailable, "{created:?}");
    assert_eq!(stored(&broker.url, &["**"]).await, acked, "readers are served what was acknowledged");

    // The power goes; the broker starts again on what the disk kept.
    drop(broker);
    disk.power_cut(true);
    let broker = serve(&data, &[], dir.path(), "restarted");
    assert_eq!(stored(&broker.url, &["**"]).await, acked, "exactly what was acknowledged");
    let names: Vec<String> =
        stored_streams(&mut client(&broker.url).await).await.into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s0", "s1"], "no stream of a refused batch was created");
    some_batches(&broker.url, &mut acked, "after").await;
    stop(broker);
    verify_clean(&data);
    drop(disk);
}

/// ENOSPC on the `fdatasync` of a publish: the batches of that group commit are refused with
/// RESOURCE_EXHAUSTED, the broker goes on and acknowledges the next ones without a restart; after
/// a power cut and a restart, the acknowledged records are exactly there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_fdatasync_refuses_the_batch_and_the_broker_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut disk, data) = on_powercut_disk(dir.path());
    let broker = serve(&data, &[], dir.path(), "serve");
    let mut acked = Acked::new();
    some_batches(&broker.url, &mut acked, "before").await;

    disk.fail_fsyncs(libc::ENOSPC, 1);
    let outcomes = at_once(&broker.url, &mut acked, &["s0", "s1", "new", "other"], "during").await;
    assert_eq!(disk.failed_fsyncs(), 1, "a publish's sync met the failure");
    let refused: Vec<tonic::Status> = outcomes.into_iter().filter_map(Result::err).collect();
    assert!(!refused.is_empty(), "the batches whose sync failed were acknowledged");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("the disk is full")
                && status.message().contains("the write was undone"),
            "{status:?}"
        );
    }
    assert_eq!(stored(&broker.url, &["**"]).await, acked, "nothing of the refused batches is read");
    // The same broker takes the next ones, into the streams whose creation was refused too.
    for outcome in at_once(&broker.url, &mut acked, &["s0", "new", "other"], "after").await {
        outcome.expect("the broker goes on");
    }
    assert_eq!(stored(&broker.url, &["**"]).await, acked);

    drop(broker);
    disk.power_cut(true);
    let broker = serve(&data, &[], dir.path(), "restarted");
    assert_eq!(stored(&broker.url, &["**"]).await, acked, "exactly what was acknowledged");
    stop(broker);
    verify_clean(&data);
    drop(disk);
}
