//! The storage layer alone: append 256-byte records in batches of 1, 16 and 256 under
//! `fsync=always`, and a full scan; each beside a bare file loop doing the least work that does
//! the same, measured in the same run: the batch's bytes appended and one `fdatasync` per batch
//! for appends; for the scan, the file read in 1 MiB pieces, checking each record's CRC.
//! `cargo bench --bench storage`; figures go to BENCHMARKS.md.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;
use tapeline::config::{Config, DataDir, FsyncPolicy};
use tapeline::store::Log;
use tapeline::types::StreamName;
use tapeline::types::{NewRecord, Tick};

const RECORD_BYTES: usize = 256;
const CACHE: u64 = 256 << 20;

fn open(dir: &std::path::Path, fsync: FsyncPolicy) -> Log {
    Log::open(&Config { data: DataDir::Path(dir.into()), fsync, cache_bytes: CACHE, ..Config::default() })
        .unwrap()
}

fn records(n: usize) -> Vec<NewRecord> {
    let stream = StreamName::parse("bench/stream").unwrap();
    let payload = Bytes::from(vec![0x5a; RECORD_BYTES]);
    let crc32 = crc32fast::hash(&payload);
    (0..n)
        .map(|_| NewRecord {
            stream: stream.clone(),
            tick: None,
            origin_time: None,
            headers: Vec::new(),
            payload: payload.clone(),
            crc32,
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("append_fsync_always");
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for batch in [1usize, 16, 256] {
        group.throughput(Throughput::Elements(batch as u64));

        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), FsyncPolicy::Always);
        let batch_records = records(batch);
        group.bench_with_input(BenchmarkId::new("tapeline", batch), &batch, |b, _| {
            b.iter(|| rt.block_on(log.append(batch_records.clone())).unwrap())
        });
        rt.block_on(log.close()).unwrap();

        // The reference: the same records packed, appended to a file, then one fdatasync.
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("bare")).unwrap();
        let payload = vec![0x5a; RECORD_BYTES];
        let (mut tick, mut len) = (0u64, 0u64);
        group.bench_with_input(BenchmarkId::new("bare_file", batch), &batch, |b, &batch| {
            b.iter(|| {
                let mut value = Vec::with_capacity(batch * (RECORD_BYTES + 16));
                for _ in 0..batch {
                    tick += 1;
                    value.extend_from_slice(&tick.to_le_bytes());
                    value.extend_from_slice(&(RECORD_BYTES as u32).to_le_bytes());
                    value.extend_from_slice(&payload);
                    value.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                }
                file.write_all_at(&value, len).unwrap();
                len += value.len() as u64;
                file.sync_data().unwrap();
            })
        });
    }
    group.finish();

    // Group commit: 64 publishers with one record each in flight at once share one flush.
    let mut group = c.benchmark_group("append_fsync_always_concurrent");
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(64));
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path(), FsyncPolicy::Always));
    let one = records(1);
    group.bench_function("tapeline_64_publishers_batch_1", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let log = log.clone();
                        let one = one.clone();
                        tokio::spawn(async move { log.append(one).await.unwrap() })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    });
    rt.block_on(log.close()).unwrap();
    group.finish();
}

fn scan(c: &mut Criterion) {
    const TOTAL: usize = 200_000;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), FsyncPolicy::Never);
    let batch = records(256);
    rt.block_on(async {
        for _ in 0..TOTAL / 256 {
            log.append(batch.clone()).await.unwrap();
        }
    });
    let info = log.stream("bench/stream").unwrap();
    let stored = info.records as usize;

    let mut group = c.benchmark_group("scan");
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(stored as u64));
    // As a subscriber reads: windows of 1,024 records, every CRC checked.
    group.bench_function("tapeline", |b| {
        b.iter(|| {
            let mut after = None;
            let mut seen = 0;
            loop {
                let read = log.read(&info, after, Tick::MAX, 1024, usize::MAX).unwrap();
                seen += read.records.len();
                after = read.records.last().map(|r| r.tick).or(after);
                if read.complete {
                    break;
                }
            }
            assert_eq!(seen, stored);
        })
    });
    rt.block_on(log.close()).unwrap();

    // The reference: the same records in a file, each framed as `tick | len | payload | crc32`,
    // read back in 1 MiB pieces by walking every record and checking its CRC (the one piece of
    // work every read must do) but building no record values.
    let bare_dir = tempfile::tempdir().unwrap();
    let path = bare_dir.path().join("bare");
    let payload = vec![0x5a; RECORD_BYTES];
    let mut bytes = Vec::with_capacity(TOTAL * (RECORD_BYTES + 16));
    for tick in 1..=(TOTAL / 256 * 256) as u64 {
        bytes.extend_from_slice(&tick.to_le_bytes());
        bytes.extend_from_slice(&(RECORD_BYTES as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    }
    std::fs::write(&path, &bytes).unwrap();
    drop(bytes);
    let file = std::fs::File::open(&path).unwrap();
    let file_len = file.metadata().unwrap().len() as usize;
    let piece = (1 << 20) / (RECORD_BYTES + 16) * (RECORD_BYTES + 16);
    group.bench_function("bare_file", |b| {
        b.iter(|| {
            let mut seen = 0;
            let mut buf = vec![0u8; piece];
            let mut at = 0;
            while at < file_len {
                let n = piece.min(file_len - at);
                file.read_exact_at(&mut buf[..n], at as u64).unwrap();
                let mut pos = 0;
                while pos < n {
                    let len = u32::from_le_bytes(buf[pos + 8..pos + 12].try_into().unwrap()) as usize;
                    let payload = &buf[pos + 12..pos + 12 + len];
                    let crc = u32::from_le_bytes(buf[pos + 12 + len..pos + 16 + len].try_into().unwrap());
                    assert_eq!(crc32fast::hash(payload), crc);
                    pos += 16 + len;
                    seen += 1;
                }
                at += n;
            }
            assert_eq!(seen, stored);
        })
    });
    group.finish();
}

/// The chunk encoder alone: the CPU cost a writer pays per record.
fn encode(c: &mut Criterion) {
    let payload = vec![0x5a; RECORD_BYTES];
    let crc32 = crc32fast::hash(&payload);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(256));
    group.bench_function("chunk_256_records", |b| {
        b.iter(|| {
            let mut encoder = tapeline::store::ChunkEncoder::new("bench", tapeline::types::StreamId(0), 0, 0);
            for tick in 1..=256 {
                encoder.push(Tick(tick), None, &[], &payload, crc32);
            }
            encoder.finish()
        })
    });
    group.finish();
}

criterion_group!(benches, append, scan, encode);
criterion_main!(benches);
