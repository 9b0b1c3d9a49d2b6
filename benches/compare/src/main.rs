//! `tapeline-bench`: tapeline side by side with Redis Streams and NATS JetStream, each started
//! fresh on loopback for every figure, driven the same way by their own Rust drivers, in the same
//! run. Writes the figures as JSON and as BENCHMARKS.md. `benches/compare.sh` installs the peers
//! and runs it.

mod drivers;
mod report;
mod servers;
mod usage;
mod workloads;

use anyhow::Result;
use clap::Parser;
use serde::Serialize;
use servers::{Programs, Server, System};
use std::path::PathBuf;
use std::time::Duration;
use workloads::{LatencySpec, PublishSpec, ReadersSpec};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "tapeline next to Redis Streams and NATS JetStream, same machine, same run")]
pub struct Args {
    /// The tapeline binary to serve (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/tapeline")]
    pub tapeline: PathBuf,
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Redis's own load generator, for the publish figures of the redis-bench-* systems.
    #[arg(long, default_value = "redis-benchmark")]
    pub redis_benchmark: PathBuf,
    #[arg(long, default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// Systems to measure, comma-separated: tapeline-always, tapeline-interval, redis-always,
    /// redis-everysec, nats, redis-bench-always, redis-bench-everysec (Redis loaded by
    /// `redis-benchmark`: publish throughput only), and tapeline-tls (tapeline-interval over TLS).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tapeline-always,redis-always,redis-bench-always,tapeline-interval,redis-everysec,redis-bench-everysec,nats,tapeline-tls"
    )]
    pub systems: Vec<String>,
    /// Workloads, comma-separated: publish, latency, replay, handoff.
    #[arg(long, value_delimiter = ',', default_value = "publish,latency,replay,handoff,readers")]
    pub workloads: Vec<String>,
    /// Record sizes for publish throughput, in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,256,1024,4096")]
    pub sizes: Vec<usize>,
    /// Seconds each publish-throughput figure runs.
    #[arg(long, default_value_t = 3)]
    pub publish_seconds: u64,
    /// Rates for live latency, records/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub rates: Vec<u64>,
    /// Seconds each live-latency figure publishes.
    #[arg(long, default_value_t = 5)]
    pub latency_seconds: u64,
    /// Records loaded, then replayed (256 B each).
    #[arg(long, default_value_t = 10_000_000)]
    pub replay_records: u64,
    /// Records stored before the handoff subscriber starts.
    #[arg(long, default_value_t = 1_000_000)]
    pub handoff_records: u64,
    /// Subscribers of the many-readers figure (tapeline only).
    #[arg(long, default_value_t = 1000)]
    pub readers: usize,
    /// Records stored before the many readers start.
    #[arg(long, default_value_t = 20_000)]
    pub readers_preload: u64,
    /// Where data dirs go (each removed after its figure).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Write every figure here as JSON.
    #[arg(long, default_value = "target/bench/results.json")]
    pub json: PathBuf,
    /// Write the report here.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub markdown: PathBuf,
}

/// One figure: what was asked of which system, and what came out (or why nothing did).
#[derive(Debug, Clone, Serialize)]
pub struct Measured<S, R> {
    pub spec: S,
    pub system: System,
    pub outcome: Result<R, String>,
    /// The server's peak resident memory during this figure.
    pub peak_rss_bytes: u64,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// `git describe` of the code measured.
    pub revision: String,
    pub publish: Vec<Measured<PublishSpec, workloads::PublishResult>>,
    pub latency: Vec<Measured<LatencySpec, workloads::LatencyResult>>,
    pub replay: Vec<Measured<u64, workloads::ReplayResult>>,
    pub handoff: Vec<Measured<u64, workloads::HandoffResult>>,
    pub readers: Vec<Measured<ReadersSpec, workloads::ReadersResult>>,
}

/// Runs `work` against a fresh server of each system; a figure that takes longer than `limit`
/// fails with that (a peer that stalls must not stop the run).
async fn each<S: Clone, R, F>(
    systems: &[System],
    programs: &Programs,
    scratch: &std::path::Path,
    spec: &S,
    label: &str,
    limit: Duration,
    mut work: F,
) -> Result<Vec<Measured<S, R>>>
where
    F: AsyncFnMut(&mut Server) -> Result<R>,
{
    let mut out = Vec::new();
    for &system in systems {
        let mut server = Server::start(system, programs, scratch).await?;
        let measured = async {
            drivers::prepare(&server.target).await?;
            work(&mut server).await
        };
        let outcome = match tokio::time::timeout(limit, measured).await {
            Ok(outcome) => outcome.map_err(|e| format!("{e:#}")),
            Err(_) => Err(format!("did not finish within {} s", limit.as_secs())),
        };
        match &outcome {
            Ok(_) => eprintln!("  {label} · {}: done", system.name()),
            Err(e) => eprintln!("  {label} · {}: FAILED: {e}", system.name()),
        }
        let peak_rss_bytes = server.peak_rss();
        server.stop().await;
        out.push(Measured { spec: spec.clone(), system, outcome, peak_rss_bytes });
    }
    Ok(out)
}

const MINUTE: Duration = Duration::from_secs(60);

/// Writes what was measured so far: a later stall or crash loses nothing.
fn write(args: &Args, programs: &Programs, results: &Results) -> Result<()> {
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(results)?)?;
    std::fs::write(&args.markdown, report::markdown(args, programs, results))?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let systems = args.systems.iter().map(|s| System::parse(s)).collect::<Result<Vec<_>>>()?;
    let programs = Programs {
        tapeline: args.tapeline.clone(),
        redis: args.redis_server.clone(),
        redis_benchmark: args.redis_benchmark.clone(),
        nats: args.nats_server.clone(),
    };
    // `redis-benchmark` only publishes: the other workloads read.
    let readers: Vec<System> = systems.iter().copied().filter(|s| !s.publishes_only()).collect();
    let scratch = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let wants = |w: &str| args.workloads.iter().any(|x| x == w);
    let mut results = Results { revision: report::revision(), ..Results::default() };

    if wants("publish") {
        let mut specs = Vec::new();
        for &size in &args.sizes {
            for streams in [1, 100] {
                for connections in [1, 16] {
                    specs.push((size, streams, connections, 64, 16));
                }
            }
        }
        // Unbatched: one record per batch, pipelined.
        specs.push((256, 1, 1, 1, 64));
        specs.push((256, 1, 16, 1, 64));
        for (size, streams, connections, batch, window) in specs {
            let spec = PublishSpec {
                size,
                streams,
                connections,
                batch,
                window,
                duration: Duration::from_secs(args.publish_seconds),
            };
            let label = format!("publish {size} B, {streams} streams, {connections} conn, batch {batch}");
            eprintln!("{label}");
            let figures =
                each(&systems, &programs, &scratch, &spec, &label, MINUTE, async |s: &mut Server| {
                    workloads::publish(s, &spec).await
                })
                .await?;
            results.publish.extend(figures);
            write(&args, &programs, &results)?;
        }
    }
    if wants("latency") {
        for &rate in &args.rates {
            for subscribers in [1, 100] {
                let spec = LatencySpec {
                    rate,
                    subscribers,
                    size: 256,
                    duration: Duration::from_secs(args.latency_seconds),
                };
                let label = format!("latency {rate}/s, {subscribers} subscribers");
                eprintln!("{label}");
                let figures =
                    each(&readers, &programs, &scratch, &spec, &label, MINUTE, async |s: &mut Server| {
                        workloads::latency(s, &spec).await
                    })
                    .await?;
                results.latency.extend(figures);
                write(&args, &programs, &results)?;
            }
        }
    }
    if wants("replay") {
        // Reading does not depend on when writes are forced to disk: one system per broker.
        let readers: Vec<System> = readers
            .iter()
            .copied()
            .filter(|s| !matches!(s, System::TapelineAlways | System::RedisAlways))
            .collect();
        let n = args.replay_records;
        let label = format!("replay {n} records");
        eprintln!("{label}");
        let figures = each(&readers, &programs, &scratch, &n, &label, 25 * MINUTE, async |s: &mut Server| {
            workloads::replay(s, n, 256).await
        })
        .await?;
        results.replay.extend(figures);
        write(&args, &programs, &results)?;
    }
    if wants("handoff") {
        let n = args.handoff_records;
        let label = format!("handoff after {n} records");
        eprintln!("{label}");
        let figures = each(&readers, &programs, &scratch, &n, &label, 3 * MINUTE, async |s: &mut Server| {
            workloads::handoff(s, n, 10_000, 256, Duration::from_secs(10)).await
        })
        .await?;
        results.handoff.extend(figures);
        write(&args, &programs, &results)?;
    }
    if wants("readers") {
        // The server's memory with many lagging readers: tapeline's target, one tapeline system.
        let tapeline: Vec<System> =
            readers.iter().copied().filter(|s| *s == System::TapelineInterval).collect();
        let spec = ReadersSpec {
            readers: args.readers,
            preload: args.readers_preload,
            rate: 2_000,
            duration: Duration::from_secs(10),
            size: 256,
        };
        let label = format!("{} readers", spec.readers);
        eprintln!("{label}");
        let figures =
            each(&tapeline, &programs, &scratch, &spec, &label, 5 * MINUTE, async |s: &mut Server| {
                workloads::readers(s, &spec).await
            })
            .await?;
        results.readers.extend(figures);
        write(&args, &programs, &results)?;
    }

    write(&args, &programs, &results)?;
    eprintln!("wrote {} and {}", args.json.display(), args.markdown.display());
    Ok(())
}
