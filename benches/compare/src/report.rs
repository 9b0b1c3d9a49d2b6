//! BENCHMARKS.md from one run's figures: the machine, the versions, the command, the targets of
//! issue 6 met or not, and a table per workload with the ratio tapeline / best peer of the same
//! durability tier and what limited each figure (`usage.rs`). Whatever the old file holds below [`KEEP`] is carried over unchanged (the
//! storage-layer results of `cargo bench --bench storage`).

use crate::servers::{Programs, System, Tier};
use crate::workloads::{Latency, LatencyResult, LatencySpec, PublishResult, PublishSpec};
use crate::{Args, Measured, Results};
use std::fmt::Write;

/// The line below which BENCHMARKS.md is written by hand.
pub const KEEP: &str = "<!-- Everything below is kept by benches/compare.sh. -->";

/// How the *limit* cells are read; the thresholds are in `usage.rs`.
const LIMITS: &str = "Every figure also says what limited it, read from the kernel's counters over its measured phase: how busy the machine's 2 cores were (and how that splits into the server's and the load generator's cores, and the server's busiest thread), the share of CPU time the cores sat idle waiting for the disk, and the bytes through loopback. The limit is **CPU** when the cores were at least 85% busy; otherwise **one thread** when one server thread was busy at least 85% of the time (a single-threaded stage set the pace); otherwise **disk wait** when they waited on the disk at least 10% of the time (fsync); otherwise **offered rate** for figures that send at a given rate (live latency, handoff), and **round trips** for figures that send as fast as acks allow (the client waits on acks: latency-bound). The network here is loopback: it moves bytes by CPU copies, so a network limit shows as CPU; its MB/s are given so that they can be compared with a real link.";

/// The whole report.
pub fn markdown(args: &Args, programs: &Programs, results: &Results) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Measured, never asserted by tests. Everything above the line at the end of the comparison is \
         written by `benches/compare.sh` from one run: each figure comes from a fresh server on loopback \
         with an empty data dir, the systems one after the other for each workload, on the same machine."
    );
    let _ = writeln!(w, "\n## Machine and versions\n");
    for (what, value) in machine(programs, &results.revision) {
        let _ = writeln!(w, "- {what}: {value}");
    }
    let _ = writeln!(w, "\n## Command\n\n```\nbenches/compare.sh\n```\n");
    let _ = writeln!(w, "which ran\n\n```\n{}\n```\n", command_line(args));
    let _ = writeln!(
        w,
        "The load generator (`benches/compare`, the `tapeline-bench` package) runs in one process on the \
         same 2 cores as the server under test; so every figure includes the client's own CPU, the same \
         way for every system. Records are 256 B unless a table says otherwise; every payload carries the \
         moment it was scheduled to be sent and a sequence number: latency is measured from the scheduled \
         moment (a stalled publisher cannot hide it) and every subscriber checks for gaps and duplicates."
    );
    let _ = writeln!(w, "\n### Durability tiers: compare only within one\n");
    let _ = writeln!(w, "- **fsync**: acknowledged after the record was forced to disk; survives a power cut. tapeline `--fsync always`, Redis `appendonly yes` + `appendfsync always`.");
    let _ = writeln!(w, "- **written**: acknowledged once the server has written it; forced to disk later. tapeline `--fsync interval=1000` and Redis `appendfsync everysec` (lose at most about a second on a power cut); NATS JetStream 2.9 with file storage (writes to its files before the ack, but its fsync runs on its own schedule, every 2 minutes by default: the weakest of the three).");
    let _ = writeln!(w, "\nDrivers: tapeline's own client (`PublishStream` with idempotent batches; `Subscribe`); Redis via the `redis` crate on a multiplexed connection (XADD pipelines; XREAD COUNT 10000 BLOCK 100 for replay and live tail alike); NATS via `async-nats` (JetStream async publish with a window of acks; an ordered pull consumer).");

    let _ = writeln!(w, "\n### What limited each figure\n");
    let _ = writeln!(w, "{}", LIMITS);

    targets(w, results);
    publish(w, results);
    latency(w, results);
    replay(w, results);
    handoff(w, results);
    readers(w, results);

    let _ = writeln!(w, "\n{KEEP}\n");
    let old = std::fs::read_to_string(&args.markdown).unwrap_or_default();
    if let Some((_, kept)) = old.split_once(KEEP) {
        md.push_str(kept.trim_start_matches('\n'));
    }
    md
}

fn machine(programs: &Programs, revision: &str) -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).map(|m| m.trim().to_string());
    vec![
        ("CPU", format!("{} × {}", cores, model.unwrap_or_default())),
        ("memory", memory.unwrap_or_default()),
        ("kernel", run("uname", &["-sr"])),
        (
            "disk under the data dirs",
            run("sh", &["-c", "df -h --output=source,fstype,size \"${TMPDIR:-/tmp}\" | tail -1"]),
        ),
        ("date", run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
        (
            "tapeline",
            format!(
                "{} ({})",
                run(programs.tapeline.to_str().unwrap_or("tapeline"), &["--version"]),
                revision
            ),
        ),
        ("rustc", run("rustc", &["--version"])),
        ("Redis", run(programs.redis.to_str().unwrap_or("redis-server"), &["--version"])),
        ("NATS", run(programs.nats.to_str().unwrap_or("nats-server"), &["--version"])),
    ]
}

/// The commit measured, taken when the run starts (the report it writes makes the tree dirty).
pub fn revision() -> String {
    run("git", &["describe", "--always", "--dirty"])
}

fn run(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("({program}: {e})"))
}

fn command_line(args: &Args) -> String {
    format!(
        "tapeline-bench --systems {} --workloads {} --sizes {} --publish-seconds {} --rates {} --latency-seconds {} --replay-records {} --handoff-records {} --readers {} --readers-preload {}",
        args.systems.join(","),
        args.workloads.join(","),
        args.sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        args.publish_seconds,
        args.rates.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        args.latency_seconds,
        args.replay_records,
        args.handoff_records,
        args.readers,
        args.readers_preload,
    )
}

fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// tapeline's figure over the best peer's in the same tier (`higher` = bigger is better).
fn ratio<S, R>(
    figures: &[&Measured<S, R>],
    value: impl Fn(&R) -> f64,
    higher: bool,
) -> Vec<(Tier, Option<f64>)> {
    let mut out = Vec::new();
    for tier in [Tier::Fsync, Tier::Written] {
        let of = |tapeline: bool| {
            figures
                .iter()
                .filter(|m| m.system.tier() == tier && m.system.is_tapeline() == tapeline)
                .filter_map(|m| m.outcome.as_ref().ok().map(&value))
                .fold(None, |best: Option<f64>, v| {
                    Some(best.map_or(v, |b| if higher == (v > b) { v } else { b }))
                })
        };
        if let (Some(t), Some(p)) = (of(true), of(false)) {
            out.push((tier, Some(if p > 0.0 { t / p } else { f64::INFINITY })));
        } else if figures.iter().any(|m| m.system.tier() == tier) {
            out.push((tier, None));
        }
    }
    out
}

fn ratio_cells(ratios: &[(Tier, Option<f64>)]) -> String {
    let mut cells = Vec::new();
    for tier in [Tier::Fsync, Tier::Written] {
        let cell = ratios
            .iter()
            .find(|(t, _)| *t == tier)
            .and_then(|(_, r)| *r)
            .map_or("–".to_string(), |r| format!("**{r:.2}×**"));
        cells.push(cell);
    }
    cells.join(" | ")
}

fn systems_in<S, R>(figures: &[Measured<S, R>]) -> Vec<System> {
    let mut systems: Vec<System> = Vec::new();
    for m in figures {
        if !systems.contains(&m.system) {
            systems.push(m.system);
        }
    }
    systems
}

fn header(w: &mut String, first: &[&str], systems: &[System], ratios: bool) {
    let mut cols: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    cols.extend(systems.iter().map(|s| s.name().to_string()));
    if ratios {
        cols.push("tapeline / best peer, fsync tier".into());
        cols.push("tapeline / best peer, written tier".into());
    }
    let _ = writeln!(w, "| {} |", cols.join(" | "));
    let _ = writeln!(w, "|{}", " ---: |".repeat(cols.len()));
}

fn cell<S, R>(figure: Option<&&Measured<S, R>>, show: impl Fn(&R) -> String) -> String {
    match figure.map(|m| &m.outcome) {
        Some(Ok(r)) => show(r),
        Some(Err(e)) => format!("failed: {}", e.replace('|', "/").chars().take(80).collect::<String>()),
        None => "–".into(),
    }
}

fn publish(w: &mut String, results: &Results) {
    if results.publish.is_empty() {
        return;
    }
    let _ = writeln!(w, "\n## Publish throughput\n");
    let _ = writeln!(w, "Records/s acknowledged, as fast as acks allow. Each connection keeps a window of batches in flight: 16 batches of 64 records (tapeline: one `PublishRequest` each; Redis: a pipeline of 64 XADDs; NATS: 64 async publishes), or, in the unbatched rows, 64 single records. Batches go round-robin over the streams. Redis is loaded twice: by the Rust driver the other workloads use, and by its own C load generator, `redis-benchmark` (XADD of a payload of the same size, `-P` as many commands in flight per connection as the window holds records, random keys among the streams); the best peer is the higher of all. Higher is better; the last two columns are tapeline / the best peer of that tier.\n");
    let table = |w: &mut String, show: &dyn Fn(&Measured<PublishSpec, PublishResult>) -> String, ratios| {
        keyed_table(
            w,
            &results.publish,
            &["size", "streams", "conns", "batch"],
            |s| (s.size, s.streams, s.connections, s.batch),
            |s| {
                vec![
                    format!("{} B", s.size),
                    s.streams.to_string(),
                    s.connections.to_string(),
                    s.batch.to_string(),
                ]
            },
            show,
            ratios,
        )
    };
    let speed = |row: &[&Measured<PublishSpec, PublishResult>]| {
        ratio_cells(&ratio(row, |r| r.records_per_second, true))
    };
    table(
        w,
        &|m| {
            cell(Some(&m), |r| {
                format!("{} ({:.0} MB/s)", thousands(r.records_per_second), r.megabytes_per_second)
            })
        },
        Some(&speed),
    );
    let _ = writeln!(w, "\nAck latency p99 of the same runs (from a batch's sending to its ack):\n");
    table(w, &|m| cell(Some(&m), |r| micros(r.ack.p99_us)), None);
    let _ = writeln!(w, "\nWhat limited each figure (see *What limited each figure* above):\n");
    table(w, &|m| cell(Some(&m), |r| r.usage.cell(false)), None);
}

/// The cells a table row adds from all its figures (the ratio columns).
type RowCells<'a, S, R> = &'a dyn Fn(&[&Measured<S, R>]) -> String;

/// A table with a row per distinct key of `figures` (in the order first seen) and a column per
/// system: `key_cells` name the row, `show` fills each system's cell ("–" where a system has no
/// figure), and `ratios`, when given, adds the columns tapeline / best peer from the row.
fn keyed_table<S, R, K: PartialEq>(
    w: &mut String,
    figures: &[Measured<S, R>],
    first: &[&str],
    key: impl Fn(&S) -> K,
    key_cells: impl Fn(&S) -> Vec<String>,
    show: &dyn Fn(&Measured<S, R>) -> String,
    ratios: Option<RowCells<S, R>>,
) {
    let systems = systems_in(figures);
    header(w, first, &systems, ratios.is_some());
    let mut seen: Vec<K> = Vec::new();
    for m in figures {
        let k = key(&m.spec);
        if seen.contains(&k) {
            continue;
        }
        let row: Vec<&Measured<S, R>> = figures.iter().filter(|x| key(&x.spec) == k).collect();
        seen.push(k);
        let mut cells = key_cells(&m.spec);
        for system in &systems {
            cells.push(row.iter().find(|x| x.system == *system).map_or("–".into(), |f| show(f)));
        }
        if let Some(ratios) = ratios {
            cells.push(ratios(&row));
        }
        let _ = writeln!(w, "| {} |", cells.join(" | "));
    }
}

fn latency_cell(l: &Latency) -> String {
    format!("{} / {} / {} / {}", micros(l.p50_us), micros(l.p99_us), micros(l.p999_us), micros(l.max_us))
}

fn latency(w: &mut String, results: &Results) {
    if results.latency.is_empty() {
        return;
    }
    let _ = writeln!(w, "\n## Live end-to-end latency\n");
    let _ = writeln!(w, "One publisher sends 256 B records open-loop at a fixed rate (every millisecond, the records due go out as one batch); each subscriber has its own connection and follows the stream from now. p50 / p99 / p99.9 / max from each record's scheduled moment to its arrival, all subscribers together. Lower is better; the ratio columns compare p99.\n");
    let table = |w: &mut String, show: &dyn Fn(&Measured<LatencySpec, LatencyResult>) -> String, ratios| {
        keyed_table(
            w,
            &results.latency,
            &["rate", "subscribers"],
            |s| (s.rate, s.subscribers),
            |s| vec![format!("{}/s", thousands(s.rate as f64)), s.subscribers.to_string()],
            show,
            ratios,
        )
    };
    let p99 = |row: &[&Measured<LatencySpec, LatencyResult>]| {
        ratio_cells(&ratio(row, |r| r.end_to_end.p99_us as f64, false))
    };
    table(
        w,
        &|m| {
            cell(Some(&m), |r| {
                let mut c = latency_cell(&r.end_to_end);
                if r.missing > 0 || r.duplicates > 0 || r.incomplete_subscribers > 0 {
                    let _ = write!(
                        c,
                        " — {} missing, {} duplicates, {} subscribers incomplete",
                        r.missing, r.duplicates, r.incomplete_subscribers
                    );
                }
                c
            })
        },
        Some(&p99),
    );
    let _ = writeln!(w, "\nEvery record reached every subscriber exactly once unless a cell says otherwise. Peak server memory in these runs:\n");
    table(w, &|m| mib(m.peak_rss_bytes), None);
    let _ = writeln!(w, "\nWhat limited each figure, from the first record sent to the last received (see *What limited each figure* above):\n");
    table(w, &|m| cell(Some(&m), |r| r.usage.cell(true)), None);
}

fn replay(w: &mut String, results: &Results) {
    let Some(first) = results.replay.first() else { return };
    let _ = writeln!(w, "\n## Replay\n");
    let _ = writeln!(w, "{} records of 256 B are loaded through one connection (batches of 1,000, 16 in flight), then one subscriber reads them all from the beginning, then from the moment the middle record was sent, each time to the last record. Reading does not depend on the fsync policy, so one configuration per broker. Redis holds its streams in memory; tapeline and NATS read their files (through the page cache: the machine has the memory to hold them). Time to first record includes connecting.\n", thousands(first.spec as f64));
    let columns = [
        "from the beginning: records/s",
        "MB/s",
        "first record",
        "from the middle: records",
        "records/s",
        "first record",
        "exact",
        "loaded at",
        "disk / logical bytes",
        "peak RSS loaded",
        "peak RSS after the reads",
        "open with its index",
        "open rebuilding its index (peak RSS)",
        "limit: loading",
        "limit: from the beginning",
        "limit: from the middle",
    ];
    per_system(w, &results.replay, &columns, |m, r| {
        vec![
            thousands(r.from_beginning.records_per_second),
            format!("{:.0}", r.from_beginning.megabytes_per_second),
            format!("{:.1} ms", r.from_beginning.first_record_ms),
            thousands(r.from_middle.records as f64),
            thousands(r.from_middle.records_per_second),
            format!("{:.1} ms", r.from_middle.first_record_ms),
            (if r.from_beginning.exact && r.from_middle.exact { "yes" } else { "**no**" }).into(),
            format!("{} records/s", thousands(r.load_records_per_second)),
            format!("{:.2}", r.disk_per_logical_byte),
            mib(r.peak_rss_loaded_bytes),
            mib(r.peak_rss_bytes),
            r.open_ms.map_or("–".into(), |ms| format!("{:.2} s", ms / 1000.0)),
            r.open_rebuild_ms
                .map_or("–".into(), |ms| format!("{:.1} s ({})", ms / 1000.0, mib(m.peak_rss_bytes))),
            r.load_usage.cell(false),
            r.from_beginning.usage.cell(false),
            r.from_middle.usage.cell(false),
        ]
    });
    if let Some((tapeline, peer)) = replay_speeds(results) {
        let _ = writeln!(w, "\ntapeline / faster peer, from the beginning: **{:.2}×**.", tapeline / peer);
    }
}

/// Records/s from the beginning of tapeline and of the faster peer, when both were measured.
fn replay_speeds(results: &Results) -> Option<(f64, f64)> {
    let speed = |tapeline: bool| {
        results
            .replay
            .iter()
            .filter(|m| m.system.is_tapeline() == tapeline)
            .filter_map(|m| m.outcome.as_ref().ok().map(|r| r.from_beginning.records_per_second))
            .reduce(f64::max)
    };
    Some((speed(true)?, speed(false)?))
}

fn handoff(w: &mut String, results: &Results) {
    let Some(first) = results.handoff.first() else { return };
    let _ = writeln!(w, "\n## Replay-to-live handoff under load\n");
    let _ = writeln!(w, "{} records of 256 B are stored; then one publisher sends 10,000 records/s open-loop for 10 s, and after 3.3 s a subscriber starts from the beginning: it must receive every record once, in order, replay then live (Redis: the client's XREAD loop from 0; NATS: an ordered consumer). Publish ack p99 is from each batch's scheduled moment, before the subscriber started and after.\n", thousands(first.spec as f64));
    let columns = [
        "received",
        "missing",
        "duplicates",
        "caught up after",
        "publish ack p99 before",
        "publish ack p99 during",
        "peak RSS",
        "limit",
    ];
    per_system(w, &results.handoff, &columns, |m, r| {
        vec![
            thousands(r.received as f64),
            r.missing.to_string(),
            r.duplicates.to_string(),
            if r.caught_up_after_ms.is_finite() {
                format!("{:.0} ms", r.caught_up_after_ms)
            } else {
                "not before the end".into()
            },
            micros(r.publish_ack_before.p99_us),
            micros(r.publish_ack_during.p99_us),
            mib(m.peak_rss_bytes),
            r.usage.cell(true),
        ]
    });
}

fn readers(w: &mut String, results: &Results) {
    let Some(first) = results.readers.first() else { return };
    let spec = &first.spec;
    let _ = writeln!(w, "\n## Many readers\n");
    let _ = writeln!(w, "{} records of {} B are stored; then {} subscribers (a connection each) start from the beginning at once while one publisher sends {} records/s open-loop for {} s: each must receive every record once, in order. Most of them lag behind the live tail most of the time: the figure is the server's memory with many lagging readers (tapeline only: the target is tapeline's).\n", thousands(spec.preload as f64), spec.size, thousands(spec.readers as f64), thousands(spec.rate as f64), spec.duration.as_secs());
    let columns = [
        "records each",
        "incomplete",
        "missing",
        "duplicates",
        "slowest reader done after",
        "publish ack p99",
        "peak RSS",
        "limit",
    ];
    per_system(w, &results.readers, &columns, |m, r| {
        vec![
            thousands(r.expected as f64),
            r.incomplete_readers.to_string(),
            r.missing.to_string(),
            r.duplicates.to_string(),
            format!("{:.1} s", r.slowest_ms / 1000.0),
            micros(r.publish_ack.p99_us),
            mib(m.peak_rss_bytes),
            r.usage.cell(true),
        ]
    });
}

/// A table with a row per figure: the system, then `cells` of what it measured; a figure that
/// failed says why instead.
fn per_system<S, R>(
    w: &mut String,
    figures: &[Measured<S, R>],
    columns: &[&str],
    cells: impl Fn(&Measured<S, R>, &R) -> Vec<String>,
) {
    let _ = writeln!(w, "| system | {} |", columns.join(" | "));
    let _ = writeln!(w, "|{}", " ---: |".repeat(columns.len() + 1));
    for m in figures {
        let row = match &m.outcome {
            Ok(r) => cells(m, r),
            Err(e) => {
                let mut row = vec![format!("failed: {}", e.replace('|', "/"))];
                row.resize(columns.len(), String::new());
                row
            }
        };
        let _ = writeln!(w, "| {} | {} |", m.system.name(), row.join(" | "));
    }
}

/// The targets of issue 6, each with what was measured.
fn targets(w: &mut String, results: &Results) {
    let _ = writeln!(w, "\n## Targets (256 B records)\n");
    let _ = writeln!(w, "| target | measured | met |");
    let _ = writeln!(w, "| --- | --- | :---: |");
    let yes = |b: bool| if b { "yes" } else { "**no**" };

    // Durable publish against Redis, every 256 B configuration.
    let rows: Vec<_> = results.publish.iter().filter(|m| m.spec.size == 256).collect();
    if !rows.is_empty() {
        let mut keys: Vec<_> =
            rows.iter().map(|m| (m.spec.streams, m.spec.connections, m.spec.batch)).collect();
        keys.dedup();
        let rate = |system: System, key| {
            rows.iter()
                .find(|m| m.system == system && (m.spec.streams, m.spec.connections, m.spec.batch) == key)
                .and_then(|m| m.outcome.as_ref().ok().map(|r| r.records_per_second))
        };
        // Redis's better figure of a tier: its Rust driver's or redis-benchmark's.
        let best = |a: System, b: System, key| match (rate(a, key), rate(b, key)) {
            (Some(x), Some(y)) => Some(x.max(y)),
            (x, y) => x.or(y),
        };
        let (mut batched, mut unbatched) = (Vec::new(), Vec::new());
        let (mut batched_met, mut unbatched_met) = (true, true);
        for key in keys {
            let Some(t) = rate(System::TapelineAlways, key) else { continue };
            let always = best(System::RedisAlways, System::RedisBenchAlways, key);
            let everysec = best(System::RedisEverysec, System::RedisBenchEverysec, key);
            let (Some(a), Some(e)) = (always, everysec) else { continue };
            let line = format!(
                "{} streams, {} conns, batch {}: {:.2}× always, {:.2}× everysec",
                key.0,
                key.1,
                key.2,
                t / a,
                t / e
            );
            if key.2 > 1 {
                batched_met &= t >= 2.0 * a && t >= e;
                batched.push(line);
            } else {
                unbatched_met &= t >= a;
                unbatched.push(line);
            }
        }
        if !batched.is_empty() {
            let _ = writeln!(
                w,
                "| durable publish, batched: ≥ 2× Redis `always` and ≥ Redis `everysec` (each the higher of its two figures) | {} | {} |",
                batched.join("; "),
                yes(batched_met)
            );
        }
        if !unbatched.is_empty() {
            let _ = writeln!(
                w,
                "| durable publish, unbatched: ≥ Redis `always` (the higher of its two figures) | {} | {} |",
                unbatched.join("; "),
                yes(unbatched_met)
            );
        }
    }
    if let Some((rate, peer)) = replay_speeds(results) {
        let _ = writeln!(
            w,
            "| replay ≥ 1 M records/s to one subscriber | {} records/s | {} |",
            thousands(rate),
            yes(rate >= 1e6)
        );
        let _ = writeln!(
            w,
            "| replay ≥ 3× the faster peer | {:.2}× | {} |",
            rate / peer,
            yes(rate >= 3.0 * peer)
        );
    }
    for subscribers in [1, 100] {
        let at: Vec<_> = results
            .latency
            .iter()
            .filter(|m| m.spec.rate == 10_000 && m.spec.subscribers == subscribers)
            .collect();
        let p99 = |s: System| {
            at.iter()
                .find(|m| m.system == s)
                .and_then(|m| m.outcome.as_ref().ok())
                .map(|r| r.end_to_end.p99_us)
        };
        for (t, r) in
            [(System::TapelineAlways, System::RedisAlways), (System::TapelineInterval, System::RedisEverysec)]
        {
            if let (Some(a), Some(b)) = (p99(t), p99(r)) {
                let _ = writeln!(
                    w,
                    "| live p99 at 10k/s, {subscribers} subscriber(s), ≤ Redis XREAD BLOCK ({:?} tier) | {} vs {} | {} |",
                    t.tier(),
                    micros(a),
                    micros(b),
                    yes(a <= b)
                );
            }
        }
    }
    for m in results
        .latency
        .iter()
        .filter(|m| m.spec.rate == 10_000 && m.spec.subscribers == 100 && m.system.is_tapeline())
    {
        if let Ok(r) = &m.outcome {
            let fine = r.incomplete_subscribers == 0
                && r.missing == 0
                && r.duplicates == 0
                && r.end_to_end.max_us < 1_000_000;
            let _ = writeln!(
                w,
                "| 100 subscribers at 10k/s: none behind (max < 1 s), none loses ({}) | max {}, {} missing, {} duplicates, {} incomplete | {} |",
                m.system.name(),
                micros(r.end_to_end.max_us),
                r.missing,
                r.duplicates,
                r.incomplete_subscribers,
                yes(fine)
            );
        }
    }
    let peak = results
        .publish
        .iter()
        .map(|m| (m.system, m.peak_rss_bytes))
        .chain(results.latency.iter().map(|m| (m.system, m.peak_rss_bytes)))
        .chain(results.replay.iter().map(|m| (m.system, m.peak_rss_bytes)))
        .chain(results.handoff.iter().map(|m| (m.system, m.peak_rss_bytes)))
        .chain(results.readers.iter().map(|m| (m.system, m.peak_rss_bytes)))
        .filter(|(s, _)| s.is_tapeline())
        .map(|(_, b)| b)
        .max();
    if let Some(peak) = peak {
        let _ = writeln!(
            w,
            "| peak RSS < 256 MB, whatever the log's size | {} (largest of every tapeline figure) | {} |",
            mib(peak),
            yes(peak < 256_000_000)
        );
    }
    for m in &results.readers {
        let Ok(r) = &m.outcome else { continue };
        let _ = writeln!(
            w,
            "| {} readers replaying while records arrive: peak RSS < 256 MB, every reader exact ({}) | {}, {} incomplete, {} missing, {} duplicates | {} |",
            thousands(m.spec.readers as f64),
            m.system.name(),
            mib(m.peak_rss_bytes),
            r.incomplete_readers,
            r.missing,
            r.duplicates,
            yes(m.peak_rss_bytes < 256_000_000 && r.incomplete_readers == 0 && r.duplicates == 0)
        );
    }
    if let Some(t) =
        results.replay.iter().find(|m| m.system.is_tapeline()).and_then(|m| m.outcome.as_ref().ok())
    {
        let _ = writeln!(
            w,
            "| disk ≤ 1.5× logical bytes | {:.2}× after loading {} records | {} |",
            t.disk_per_logical_byte,
            thousands(t.records as f64),
            yes(t.disk_per_logical_byte <= 1.5)
        );
    }
}
