//! The `tapeline` command line: clap definitions, `serve`, and the client commands.

use crate::client::{self, connect, Delivery, PublishOptions, Publisher, SubscribeOptions, Subscriber};
use crate::config;
use crate::error::{Error, Result};
use crate::grpc::pb;
use crate::record::Tick;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// `publish` sends a batch when it holds this many lines or bytes, or when stdin has no more now.
const PUBLISH_BATCH_LINES: usize = 1000;
const PUBLISH_BATCH_BYTES: usize = 1 << 20;

/// tapeline: a persistent-log store-and-forward broker.
#[derive(Debug, Parser)]
#[command(name = "tapeline", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Publish each line of standard input as one record of STREAM.
    Publish(PublishArgs),
    /// Print records of the streams matching PATTERN..., replayed then live.
    Tail(TailArgs),
    /// List the streams of a server: a table, or JSON for scripts.
    Streams(StreamsArgs),
    /// Create a stream with its metadata and retention (or change them with --update).
    Create(CreateArgs),
    /// Delete a stream and every record of it.
    Delete(DeleteArgs),
    /// Show a server's identity, version and protocol versions.
    Info(ServerArg),
    /// Print a settings file with every default, each explained (for `serve --config`).
    Config,
    /// Check every stored record of a data dir (no broker may be serving it). Exits 0 when all
    /// is intact, 2 when damage was found, naming each damaged stream and tick range.
    Verify(VerifyArgs),
    /// Copy every readable record of a damaged data dir into a new one (no broker may be
    /// serving it); works even when the storage engine cannot open the old one.
    Recover(RecoverArgs),
}

/// Flags of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The data dir to check.
    #[arg(long)]
    pub data: PathBuf,
}

/// Flags of `recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The damaged data dir; only read.
    #[arg(long)]
    pub data: PathBuf,
    /// A new data dir to create (it must not exist or be empty).
    #[arg(long)]
    pub into: PathBuf,
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Settings file (TOML; `tapeline config` prints one with every default). Flags win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed)
    /// [default: 127.0.0.1:7411].
    #[arg(long)]
    pub listen: Option<String>,
    /// Data directory [default: tapeline-data].
    #[arg(long, conflicts_with = "volatile")]
    pub data: Option<PathBuf>,
    /// Keep the log in a temporary store, removed at exit.
    #[arg(long)]
    pub volatile: bool,
    /// When a batch is forced to disk before it is acknowledged: always, interval=MS or never
    /// [default: always].
    #[arg(long)]
    pub fsync: Option<String>,
    /// Largest payload of one record, in bytes [default: 4 MiB].
    #[arg(long)]
    pub max_record_bytes: Option<usize>,
    /// Largest sum of payloads and headers in one batch, in bytes [default: 16 MiB].
    #[arg(long)]
    pub max_batch_bytes: Option<usize>,
    /// Silence after which a subscriber gets a heartbeat, e.g. 5s, 500ms [default: 5s].
    #[arg(long)]
    pub heartbeat: Option<String>,
    /// The most bytes the data dir may take; publishing is refused beyond (RESOURCE_EXHAUSTED).
    #[arg(long)]
    pub max_disk_bytes: Option<u64>,
    /// Free disk space kept in reserve; publishing is refused when a batch would eat into it
    /// [default: 64 MiB].
    #[arg(long)]
    pub min_free_disk_bytes: Option<u64>,
    /// Relay mode: the tapeline to copy streams from (an origin or another relay). Several
    /// upstreams: `[[mirror]]` tables in the settings file.
    #[arg(long, requires = "mirror")]
    pub upstream: Option<String>,
    /// A stream name or pattern to copy from the upstream (repeat for several); read-only here.
    #[arg(long, requires = "upstream")]
    pub mirror: Vec<String>,
    /// Where mirroring starts the first time: beginning, now or -DURATION (e.g. -10m). Afterwards
    /// the relay resumes from what it stored [default: beginning].
    #[arg(long, allow_hyphen_values = true, requires = "upstream")]
    pub mirror_from: Option<String>,
    /// Retention: each stream keeps records younger than this, e.g. 7d, 12h (rules for some
    /// streams: `[[retention.rule]]` in the settings file) [default: forever].
    #[arg(long)]
    pub retention_max_age: Option<String>,
    /// Retention: each stream keeps at most this many payload bytes [default: no limit].
    #[arg(long)]
    pub retention_max_bytes: Option<u64>,
    /// Retention: each stream keeps at most this many records [default: no limit].
    #[arg(long)]
    pub retention_max_records: Option<u64>,
    /// Retention: the whole store keeps at most this many payload bytes, oldest records first
    /// [default: no limit; 1 GiB with --volatile].
    #[arg(long)]
    pub retention_max_total_bytes: Option<u64>,
}

impl ServeArgs {
    /// The flags as settings that win over the file's.
    fn settings(&self) -> config::File {
        config::File {
            listen: self.listen.clone(),
            data: self.data.clone(),
            volatile: self.volatile.then_some(true),
            fsync: self.fsync.clone(),
            heartbeat: self.heartbeat.clone(),
            cache_bytes: None,
            chunk_file_bytes: None,
            max_disk_bytes: self.max_disk_bytes,
            min_free_disk_bytes: self.min_free_disk_bytes,
            limits: config::FileLimits {
                max_record_bytes: self.max_record_bytes,
                max_batch_bytes: self.max_batch_bytes,
                ..Default::default()
            },
            mirror: match &self.upstream {
                Some(upstream) => vec![config::FileMirror {
                    upstream: upstream.clone(),
                    streams: self.mirror.clone(),
                    from: self.mirror_from.clone(),
                }],
                None => Vec::new(),
            },
            notice: None,
            retention: config::FileRetention {
                max_age: self.retention_max_age.clone(),
                max_bytes: self.retention_max_bytes,
                max_records: self.retention_max_records,
                max_total_bytes: self.retention_max_total_bytes,
                ..Default::default()
            },
        }
    }
}

/// The server a client command talks to.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:7411")]
    pub server: String,
}

/// Flags of `streams`.
#[derive(Debug, Args)]
pub struct StreamsArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Output: table (for people) or json (one array, for scripts).
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// Flags of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The stream's name.
    pub stream: String,
    #[command(flatten)]
    pub server: ServerArg,
    /// The payloads' type, e.g. application/json or "application/x-protobuf; messageType=pkg.Msg".
    #[arg(long, default_value = "")]
    pub content_type: String,
    #[arg(long, default_value = "")]
    pub schema_version: String,
    #[arg(long, default_value = "")]
    pub description: String,
    /// The stream keeps records younger than this (e.g. 7d) [default: the server's].
    #[arg(long)]
    pub max_age: Option<String>,
    /// The stream keeps at most this many payload bytes [default: the server's].
    #[arg(long)]
    pub max_bytes: Option<u64>,
    /// The stream keeps at most this many records [default: the server's].
    #[arg(long)]
    pub max_records: Option<u64>,
    /// Change the metadata of an existing stream (its records stay).
    #[arg(long)]
    pub update: bool,
}

/// Flags of `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The stream to delete.
    pub stream: String,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Flags of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Stream to publish into; created on first publish.
    pub stream: String,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Flags of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Stream names or patterns (`*` one segment, trailing `**` any number).
    #[arg(required = true)]
    pub patterns: Vec<String>,
    /// Server URL; repeat to give servers of the same origin (the origin, its relays) to fail
    /// over between: positions are valid at each.
    #[arg(long = "server", default_value = "http://127.0.0.1:7411")]
    pub servers: Vec<String>,
    /// Start: beginning, now, a tick, -DURATION (e.g. -5m) or an RFC 3339 time. Default: beginning.
    #[arg(long, allow_hyphen_values = true, conflicts_with = "after")]
    pub from: Option<String>,
    /// Start strictly after this tick (to resume: the last tick you printed).
    #[arg(long)]
    pub after: Option<u64>,
    /// Stop after this point (inclusive): now, a tick or an RFC 3339 time.
    #[arg(long)]
    pub to: Option<String>,
    /// Stop after this many records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Output: json (one object per line) or raw (the payload and a newline).
    #[arg(long, default_value = "json", value_parser = ["json", "raw"])]
    pub output: String,
    /// Delivery speed: instant, original (the recorded timing of the ticks) or a factor such as
    /// 2x or 0.5x; the replay then continues live at the same pace.
    #[arg(long, default_value = "instant")]
    pub pace: String,
    /// Receive at most this many record bytes per second, averaged over the server's window
    /// [default: the server's quota, if any].
    #[arg(long)]
    pub max_bytes_per_second: Option<u64>,
    /// When this tail cannot keep up with the live streams: catch-up (lag, and read from
    /// storage), latest (skip to the newest records; a line says what was skipped) or disconnect
    /// (and resume).
    #[arg(long, default_value = "catch-up", value_parser = ["catch-up", "latest", "disconnect"])]
    pub slow_consumer: String,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Publish(args) => publish(args).await,
        Command::Tail(args) => tail(args).await,
        Command::Streams(args) => streams(args).await,
        Command::Create(args) => create(args).await,
        Command::Delete(args) => delete(args).await,
        Command::Info(args) => info(args).await,
        Command::Config => {
            print!("{}", config::DEFAULT_FILE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => verify(args),
        Command::Recover(args) => recover(args).await,
    }
}

fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let report = crate::store::integrity::verify(&args.data)?;
    println!(
        "verified {} commit records, {} streams, {} chunks, {} intact records: {} damaged ranges",
        report.commit_records,
        report.streams,
        report.chunks,
        report.records,
        report.damage.len() + report.log_damage.len()
    );
    for damage in &report.log_damage {
        println!("damaged: {damage}");
    }
    for damage in &report.damage {
        println!("damaged: {damage}");
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

async fn recover(args: RecoverArgs) -> Result<ExitCode> {
    let done = crate::store::integrity::recover(&args.data, &args.into).await?;
    println!(
        "recovered {} records of {} streams into {} ({}); {} damaged ranges skipped",
        done.records,
        done.streams,
        args.into.display(),
        if done.through_log {
            "found by scanning its files, with the streams' metadata from its log"
        } else {
            "found by scanning its files; its log could not be read, so streams get default metadata"
        },
        done.damage.len()
    );
    for damage in &done.damage {
        println!("skipped: {damage}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let file = match &args.config {
        Some(path) => config::File::load(path)?,
        None => config::File::default(),
    };
    let settings = file.overridden_by(args.settings());
    let config = settings.config()?;
    config.validate()?;
    let listen = settings.listen.unwrap_or_else(|| "127.0.0.1:7411".to_string());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| Error::Io { context: format!("cannot listen on {listen}"), source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Io { context: "reading the listen address".into(), source })?;
    // The log opens (and recovers) before the ready line, so a bad or locked data dir is
    // reported instead of it.
    let server = crate::server::Server::open(config)?;
    // The one line a script waits for: where the broker listens.
    println!("tapeline listening on {addr}");
    let _ = std::io::stdout().flush();
    server.serve(listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn remote(action: &'static str, status: tonic::Status) -> Error {
    client::remote(action, &status)
}

async fn publish(args: PublishArgs) -> Result<ExitCode> {
    crate::names::StreamName::parse(&args.stream)?;
    // Fail at once, with one clear line, when the server cannot be reached at all.
    greet(&args.server.server).await?;
    let mut publisher = Publisher::start(PublishOptions::new(args.server.server.clone()));
    let batches = publisher.batches().expect("a new publisher takes batches");
    publisher.finish();
    let stream = args.stream.clone();
    // Reads stdin and sends batches from its own task, while this one takes the acks: whatever
    // lines are already there go out together, up to the batch limits, so an interactive line
    // goes out at once and a pipe goes out in large batches.
    let sender = tokio::spawn(async move {
        let (lines_tx, mut lines) = mpsc::channel::<Vec<u8>>(PUBLISH_BATCH_LINES);
        let read = tokio::spawn(async move {
            let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
            loop {
                let mut line = Vec::new();
                match stdin.read_until(b'\n', &mut line).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        if line.last() == Some(&b'\n') {
                            line.pop();
                            if line.last() == Some(&b'\r') {
                                line.pop();
                            }
                        }
                        if lines_tx.send(line).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(source) => {
                        return Err(Error::Io { context: "reading standard input".into(), source })
                    }
                }
            }
        });
        let mut sent = 0u64;
        while let Some(first) = lines.recv().await {
            let mut bytes = first.len();
            let mut batch = vec![first];
            while batch.len() < PUBLISH_BATCH_LINES && bytes < PUBLISH_BATCH_BYTES {
                match lines.try_recv() {
                    Ok(line) => {
                        bytes += line.len();
                        batch.push(line);
                    }
                    Err(_) => break,
                }
            }
            sent += batch.len() as u64;
            let records = batch
                .into_iter()
                .map(|payload| pb::Record {
                    stream: stream.clone(),
                    payload: payload.into(),
                    ..Default::default()
                })
                .collect();
            batches.send(records).await?;
        }
        match read.await {
            Ok(result) => result.map(|()| sent),
            Err(e) => Err(Error::Internal(format!("stdin reader failed: {e}"))),
        }
    });
    let (mut acked, mut first, mut last) = (0u64, None, None);
    let mut failure = None;
    while let Some(ack) = publisher.ack().await {
        match ack {
            Ok(ack) => {
                acked += ack.ticks.len() as u64;
                first = first.or(ack.ticks.first().copied());
                last = ack.ticks.last().copied().or(last);
            }
            Err(err) => {
                // Send nothing more; the batches already sent are still answered and counted.
                sender.abort();
                failure.get_or_insert(err.to_string());
            }
        }
    }
    let sent = match sender.await {
        Ok(Ok(sent)) => Some(sent),
        // Stopped because of the refusal reported below, or aborted for it.
        Ok(Err(_)) | Err(_) if failure.is_some() => None,
        Ok(Err(err)) => return Err(err),
        Err(e) => return Err(Error::Internal(format!("the publishing task failed: {e}"))),
    };
    let range = match (first, last) {
        (Some(a), Some(b)) => format!(", ticks {a}..{b}"),
        _ => String::new(),
    };
    let noun = if acked == 1 { "record" } else { "records" };
    eprintln!("published {acked} {noun} to {}{range}", args.stream);
    if let Some(failure) = failure {
        eprintln!("tapeline: {failure}");
        return Ok(ExitCode::FAILURE);
    }
    if sent != Some(acked) {
        eprintln!("tapeline: {} records were read but only {acked} acknowledged", sent.unwrap_or(0));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses a point in time given as a tick or an RFC 3339 time.
fn parse_point(flag: &'static str, value: &str) -> Result<Tick> {
    if let Ok(tick) = value.parse::<u64>() {
        return Ok(Tick(tick));
    }
    let time = humantime::parse_rfc3339_weak(value).map_err(|_| Error::Config {
        key: flag,
        value: value.to_string(),
        expected: "beginning, now, a tick (nanoseconds since the epoch), -DURATION such as -5m, or an RFC 3339 time",
    })?;
    let ns = time.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    Ok(Tick(ns))
}

/// Parses `--pace`: `instant` is `None`; `original` is 1; `FACTORx` or a bare number is that
/// factor, which must be finite and above 0 (the server checks its upper bound).
pub fn parse_pace(value: &str) -> Result<Option<f64>> {
    let factor = match value {
        "instant" => return Ok(None),
        "original" => Ok(1.0),
        v => v.strip_suffix('x').unwrap_or(v).parse::<f64>(),
    };
    match factor {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(Some(f)),
        _ => Err(Error::Config {
            key: "--pace",
            value: value.to_string(),
            expected: "instant, original, or a speed factor above 0 such as 2x, 0.5x or 3",
        }),
    }
}

fn parse_from(value: &str) -> Result<pb::subscribe_request::Start> {
    use pb::subscribe_request::Start;
    Ok(match value {
        "beginning" => Start::Beginning(pb::Beginning {}),
        "now" => Start::Now(pb::Now {}),
        v if v.starts_with('-') => {
            let ago = humantime::parse_duration(&v[1..]).map_err(|_| Error::Config {
                key: "--from",
                value: v.to_string(),
                expected: "a duration such as -30s, -5m or -2h",
            })?;
            Start::At(Tick(Tick::now().0.saturating_sub(ago.as_nanos() as u64)).0)
        }
        v => Start::At(parse_point("--from", v)?.0),
    })
}

async fn tail(args: TailArgs) -> Result<ExitCode> {
    use pb::subscribe_request::Start;
    let pace = parse_pace(&args.pace)?.unwrap_or(0.0);
    let start = match (&args.from, args.after) {
        (Some(from), _) => parse_from(from)?,
        (None, Some(after)) => Start::After(after),
        (None, None) => Start::Beginning(pb::Beginning {}),
    };
    let end = match args.to.as_deref() {
        // Says hello for the operator's notice; a server that is down now is waited for below.
        None => match greet(&args.servers[0]).await {
            Err(Error::Remote { action: "connect", .. }) => None,
            Err(err) => return Err(err),
            Ok(_) => None,
        },
        // "now" is the server's latest committed tick: exact, whatever the clocks say.
        Some("now") => Some(greet(&args.servers[0]).await?.tail_tick),
        Some(v) => Some(parse_point("--to", v)?.0),
    };
    if args.limit == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    // `--after T --to now` when T is already the tail: there is nothing to print, not an error.
    if let (Some("now"), Some(end), Start::After(after)) = (args.to.as_deref(), end, &start) {
        if end <= *after {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let options = SubscribeOptions {
        endpoints: args.servers.clone(),
        end,
        pace,
        max_bytes_per_second: args.max_bytes_per_second.unwrap_or(0),
        slow_consumer: match args.slow_consumer.as_str() {
            "latest" => pb::SlowConsumer::Latest,
            "disconnect" => pb::SlowConsumer::Disconnect,
            _ => pb::SlowConsumer::CatchUp,
        },
        ..SubscribeOptions::new(String::new(), args.patterns, start)
    };
    let mut subscriber = Subscriber::new(options)?;
    let raw = args.output == "raw";
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        let records = match subscriber.next().await {
            None => return Ok(ExitCode::SUCCESS),
            Some(Err(err)) => {
                eprintln!("tapeline: {err}");
                return Ok(ExitCode::FAILURE);
            }
            Some(Ok(Delivery::Records(records))) => records,
            Some(Ok(Delivery::Disconnected { endpoint, cause, retry_in })) => {
                eprintln!("tapeline: lost {endpoint} ({cause}); resuming in {retry_in:.1?}");
                continue;
            }
            Some(Ok(Delivery::Upstream(u))) => {
                if u.connected {
                    eprintln!("tapeline: the server's upstream {} is connected", u.upstream);
                } else {
                    eprintln!("tapeline: the server's upstream {} is down: {}", u.upstream, u.detail);
                }
                continue;
            }
            Some(Ok(Delivery::Gap(g))) => {
                eprintln!(
                    "tapeline: {}: skipped {} records (ticks {} to {}) to keep up with the live tail",
                    g.stream, g.records, g.from_tick, g.to_tick
                );
                continue;
            }
            Some(Ok(Delivery::Truncated(t))) => {
                eprintln!(
                    "tapeline: {}: records up to tick {} were removed by retention; continuing from tick {}",
                    t.stream, t.through, t.earliest_available
                );
                continue;
            }
            Some(Ok(_)) => continue,
        };
        let mut out = stdout.lock();
        for record in records {
            let written = if raw {
                out.write_all(&record.payload).and_then(|()| out.write_all(b"\n"))
            } else {
                writeln!(out, "{}", json_line(&record))
            };
            if written.is_err() {
                // The reader went away (e.g. `| head`): nothing left to do.
                return Ok(ExitCode::SUCCESS);
            }
            printed += 1;
            if args.limit == Some(printed) {
                let _ = out.flush();
                return Ok(ExitCode::SUCCESS);
            }
        }
        if out.flush().is_err() {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// One record as a JSON line: `{"stream":…,"tick":…,"payload":…}`, the payload as a string when it
/// is UTF-8 and as `payload_base64` otherwise; `origin_time` and `headers` when present.
pub fn json_line(record: &pb::Record) -> String {
    use base64::Engine;
    let text = |s: &str| serde_json::Value::from(s).to_string();
    let mut line = format!("{{\"stream\":{},\"tick\":{}", text(&record.stream), record.tick);
    if record.origin_time != 0 {
        line.push_str(&format!(",\"origin_time\":{}", record.origin_time));
    }
    if !record.headers.is_empty() {
        let headers: std::collections::BTreeMap<_, _> = record.headers.iter().collect();
        line.push_str(&format!(",\"headers\":{}", serde_json::to_string(&headers).unwrap_or_default()));
    }
    match std::str::from_utf8(&record.payload) {
        Ok(s) => line.push_str(&format!(",\"payload\":{}}}", text(s))),
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(&record.payload);
            line.push_str(&format!(",\"payload_base64\":\"{encoded}\"}}"));
        }
    }
    line
}

/// A stream as `streams --output json`, `create` and `delete` print it.
fn stream_json(s: &pb::StreamInfo) -> serde_json::Value {
    let retention = |r: &Option<pb::Retention>| {
        let r = r.unwrap_or_default();
        serde_json::json!({"max_age_ms": r.max_age_ms, "max_bytes": r.max_bytes, "max_records": r.max_records})
    };
    serde_json::json!({
        "stream": s.name,
        "records": s.records,
        "bytes": s.bytes,
        "first_tick": s.first_tick,
        "last_tick": s.last_tick,
        "created_tick": s.created_tick,
        "content_type": s.content_type,
        "schema_version": s.schema_version,
        "description": s.description,
        "retention": retention(&s.retention),
        "effective_retention": retention(&s.effective_retention),
        "records_per_second": s.records_per_second,
        "bytes_per_second": s.bytes_per_second,
        "upstream": s.upstream,
    })
}

/// Retention in a few characters: `7d/10GiB/-` (age, bytes, records; `-` for no limit).
fn retention_text(r: &Option<pb::Retention>) -> String {
    let r = r.unwrap_or_default();
    let age = match r.max_age_ms {
        0 => "-".to_string(),
        ms => humantime::format_duration(Duration::from_millis(ms)).to_string(),
    };
    let number = |n: u64| if n == 0 { "-".to_string() } else { n.to_string() };
    format!("{age}/{}/{}", number(r.max_bytes), number(r.max_records))
}

async fn create(args: CreateArgs) -> Result<ExitCode> {
    greet(&args.server.server).await?;
    let max_age = match &args.max_age {
        Some(text) => humantime::parse_duration(text).map_err(|_| Error::Config {
            key: "--max-age",
            value: text.clone(),
            expected: "a duration such as 90s, 12h or 7d",
        })?,
        None => Duration::ZERO,
    };
    let request = pb::CreateStreamRequest {
        stream: args.stream,
        content_type: args.content_type,
        schema_version: args.schema_version,
        description: args.description,
        retention: Some(pb::Retention {
            max_age_ms: u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
            max_bytes: args.max_bytes.unwrap_or(0),
            max_records: args.max_records.unwrap_or(0),
        }),
        update: args.update,
    };
    let mut client = connect(&args.server.server).await?;
    let info = client.create_stream(request).await.map_err(|s| remote("create", s))?.into_inner();
    println!("{}", stream_json(&info));
    Ok(ExitCode::SUCCESS)
}

async fn delete(args: DeleteArgs) -> Result<ExitCode> {
    greet(&args.server.server).await?;
    let mut client = connect(&args.server.server).await?;
    let request = pb::DeleteStreamRequest { stream: args.stream };
    let info = client.delete_stream(request).await.map_err(|s| remote("delete", s))?.into_inner();
    println!("{}", stream_json(&info));
    Ok(ExitCode::SUCCESS)
}

async fn streams(args: StreamsArgs) -> Result<ExitCode> {
    let server = &args.server.server;
    greet(server).await?;
    let mut client = connect(server).await?;
    let list = client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .map_err(|s| remote("streams", s))?
        .into_inner();
    if args.output == "json" {
        let all: Vec<serde_json::Value> = list.streams.iter().map(stream_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return Ok(ExitCode::SUCCESS);
    }
    let width = list.streams.iter().map(|s| s.name.len()).max().unwrap_or(4).max(6);
    // A relay also shows where each mirrored stream comes from and how fresh it is.
    let relay = list.streams.iter().any(|s| !s.upstream.is_empty());
    let mut header = format!(
        "{:<width$}  {:>10}  {:>12}  {:>20}  {:>20}  {:>9}  {:<16}  {}",
        "STREAM", "RECORDS", "BYTES", "FIRST_TICK", "LAST_TICK", "RECORDS/S", "RETENTION", "TYPE"
    );
    if relay {
        header.push_str("  UPSTREAM  LAG");
    }
    println!("{header}");
    for s in list.streams {
        let mut line = format!(
            "{:<width$}  {:>10}  {:>12}  {:>20}  {:>20}  {:>9.1}  {:<16}  {}",
            s.name,
            s.records,
            s.bytes,
            s.first_tick,
            s.last_tick,
            s.records_per_second,
            retention_text(&s.effective_retention),
            if s.content_type.is_empty() { "-" } else { &s.content_type }
        );
        if let Some(status) = s.upstream_status.filter(|_| relay) {
            let lag = Duration::from_millis(status.lag / 1_000_000);
            let state = if status.connected { String::new() } else { format!(" (down: {})", status.detail) };
            line.push_str(&format!("  {}  {}{state}", s.upstream, humantime::format_duration(lag)));
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Says hello as this CLI (its protocol and version) and prints the operator's notice if the
/// server has one for this version. Fails with one clear line when the server cannot be reached
/// or does not speak this protocol.
async fn greet(server: &str) -> Result<pb::HelloResponse> {
    let mut client = connect(server).await?;
    let hello = pb::HelloRequest {
        protocol_version: crate::broker::PROTOCOL_VERSIONS[crate::broker::PROTOCOL_VERSIONS.len() - 1],
        client_name: "tapeline-cli".into(),
        client_version: env!("CARGO_PKG_VERSION").into(),
        client_id: String::new(),
    };
    let answer = client.hello(hello).await.map_err(|s| remote("hello", s))?.into_inner();
    if let Some(notice) = &answer.notice {
        let url = if notice.url.is_empty() { String::new() } else { format!(" ({})", notice.url) };
        eprintln!(
            "tapeline: notice from {server}: {}{url} [this is tapeline {}; {} is recommended]",
            notice.text,
            env!("CARGO_PKG_VERSION"),
            notice.recommended_version
        );
    }
    Ok(answer)
}

async fn info(args: ServerArg) -> Result<ExitCode> {
    let info = greet(&args.server).await?;
    println!("server          {}", args.server);
    println!("server id       {}", info.server_id);
    println!("version         {}", info.server_version);
    println!("protocol        {} (supported: {:?})", info.protocol_version, info.protocol_versions);
    println!("tail tick       {}", info.tail_tick);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines() {
        let record =
            pb::Record { stream: "a/b".into(), tick: 7, payload: "hi \"x\"".into(), ..Default::default() };
        assert_eq!(json_line(&record), r#"{"stream":"a/b","tick":7,"payload":"hi \"x\""}"#);
        let record =
            pb::Record { stream: "a".into(), tick: 1, payload: vec![0xff, 0].into(), ..Default::default() };
        assert_eq!(json_line(&record), r#"{"stream":"a","tick":1,"payload_base64":"/wA="}"#);
    }

    #[test]
    fn points_in_time() {
        assert_eq!(parse_point("--to", "42").unwrap(), Tick(42));
        assert_eq!(parse_point("--to", "1970-01-01T00:00:01Z").unwrap(), Tick(1_000_000_000));
        let err = parse_point("--to", "yesterday").unwrap_err().to_string();
        assert!(err.contains("--to") && err.contains("yesterday"), "{err}");
        assert!(matches!(parse_from("-5m").unwrap(), pb::subscribe_request::Start::At(_)));
    }

    #[test]
    fn paces() {
        assert_eq!(parse_pace("instant").unwrap(), None);
        assert_eq!(parse_pace("original").unwrap(), Some(1.0));
        assert_eq!(parse_pace("2x").unwrap(), Some(2.0));
        assert_eq!(parse_pace("0.5x").unwrap(), Some(0.5));
        assert_eq!(parse_pace("3").unwrap(), Some(3.0));
        for bad in ["fast", "0x", "-2x", "x", "NaNx", "infx", "2xx", ""] {
            let err = parse_pace(bad).unwrap_err().to_string();
            assert!(
                err.contains("--pace") && err.contains(&format!("{bad:?}")) && err.contains("such as 2x"),
                "{bad}: {err}"
            );
        }
    }
}
