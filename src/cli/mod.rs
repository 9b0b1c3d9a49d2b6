//! The `tapeline` command line: the clap definitions and the dispatch. `serve` is in [`serve`],
//! the offline commands (`verify`, `recover`) in [`offline`], the client commands in [`commands`],
//! and how they print records and streams in [`output`].

mod commands;
mod offline;
mod output;
mod progress;
mod serve;

use commands::{create, delete, info, publish, seal, streams, tail};
use offline::{recover, verify};
use serve::serve;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tapeline::config;
use tapeline::Result;

/// Exit codes, the same for every command (2, a wrong command line, is clap's own).
pub mod exit {
    /// Something else failed (a file, the disk, a bug).
    pub const FAILED: u8 = 1;
    /// The server could not be reached, or went away.
    pub const UNREACHABLE: u8 = 3;
    /// The server answered with a refusal (the line says why).
    pub const REFUSED: u8 = 4;
    /// `verify` found damage.
    pub const DAMAGE: u8 = 5;
}

const EXIT_CODES: &str = "Exit codes: 0 done; 1 failed; 2 bad usage; 3 the server could not be reached; \
4 the server refused (the line says why); 5 `verify` found damage.";

/// The exit code of an error a command ends with.
pub fn exit_code(err: &tapeline::Error) -> ExitCode {
    use tonic::Code;
    ExitCode::from(match err {
        tapeline::Error::Remote {
            code: Some(Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled),
            ..
        }
        | tapeline::Error::Remote { action: "connect", code: None, .. } => exit::UNREACHABLE,
        tapeline::Error::Remote { code: Some(_), .. } => exit::REFUSED,
        _ => exit::FAILED,
    })
}

/// tapeline: a persistent-log store-and-forward broker.
#[derive(Debug, Parser)]
#[command(name = "tapeline", version, about, propagate_version = true, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    #[command(after_help = "Examples:
  tapeline serve                                   # 127.0.0.1:7411, data in ./tapeline-data
  tapeline serve -l 127.0.0.1:7411 -d /var/lib/tapeline --admin-listen 127.0.0.1:7412
  tapeline serve --volatile --fsync never          # a scratch broker for tests
  tapeline serve --upstream http://origin:7411 --mirror 'plant/**'   # a relay
  tapeline config > tapeline.toml && tapeline serve -c tapeline.toml")]
    Serve(Box<ServeArgs>),
    /// Publish each line of standard input as one record of STREAM.
    #[command(after_help = "Examples:
  echo 21.5 | tapeline publish sensors/room1/temp
  tapeline publish sensors/room1/temp -s broker:7411 < readings.txt
  tapeline publish sensors/imu --header unit=g --producer-id imu-7 < samples.txt   # re-runs append nothing twice
  tapeline tail 'plant/**' --to now > export.jsonl
  tapeline publish --input json -s other:7411 < export.jsonl        # import, streams and payloads kept")]
    Publish(PublishArgs),
    /// Print records of the streams matching PATTERN..., replayed then live.
    #[command(after_help = "Examples:
  tapeline tail 'sensors/**'                       # everything, then live
  tapeline tail sensors/room1/temp -f -5m          # the last five minutes, then live
  tapeline tail 'sensors/**' -t now > export.jsonl # everything so far, then exit
  last=$(tapeline tail sensors/room1/temp -n 10 | tail -n 1 | jq -r .tick)
  tapeline tail sensors/room1/temp --after \"$last\" -t now   # exactly the rest
  tapeline tail 'plant/**' -s relay-a:7411 -s relay-b:7411      # fail over between relays")]
    Tail(TailArgs),
    /// List the streams of a server: a table, or JSON for scripts.
    #[command(after_help = "Examples:
  tapeline streams
  tapeline streams -s broker:7411 -o json | jq -r '.[].stream'")]
    Streams(StreamsArgs),
    /// Create a stream with its metadata and retention (or change them with --update).
    Create(CreateArgs),
    /// Delete a stream and every record of it.
    Delete(DeleteArgs),
    /// End the import of a stream created with --import: subscribers see it from now on.
    Seal(SealArgs),
    /// Show a server's identity, version and protocol versions, and who you are to it.
    Info(ServerArg),
    /// Manage bearer tokens.
    Token(TokenArgs),
    /// Print a settings file with every default, each explained (for `serve --config`).
    Config,
    /// Check every stored record of a data dir (no broker may be serving it). Exits 0 when all
    /// is intact, 5 when damage was found, naming each damaged stream and tick range.
    Verify(VerifyArgs),
    /// Copy every readable record of a damaged data dir into a new one (no broker may be
    /// serving it); works even when the storage engine cannot open the old one.
    Recover(RecoverArgs),
    /// Print a shell completion script: `tapeline completions bash > /etc/bash_completion.d/tapeline`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
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
    #[arg(short, long, env = "TAPELINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed)
    /// [default: 127.0.0.1:7411].
    #[arg(short, long, env = "TAPELINE_LISTEN")]
    pub listen: Option<String>,
    /// The admin listener (plain HTTP): Prometheus metrics at /metrics, /healthz, /readyz, and a
    /// status page at / [default: off; e.g. 127.0.0.1:7412].
    #[arg(long, env = "TAPELINE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// How the broker logs to stderr: text (for people) or json (one object per line, for log
    /// collectors).
    #[arg(long, env = "TAPELINE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Data directory [default: tapeline-data].
    #[arg(short, long, conflicts_with = "volatile", env = "TAPELINE_DATA")]
    pub data: Option<PathBuf>,
    /// Keep the log in a temporary store, removed at exit.
    #[arg(long, env = "TAPELINE_VOLATILE")]
    pub volatile: bool,
    /// When a batch is forced to disk before it is acknowledged: always, interval=MS or never
    /// [default: always].
    #[arg(long, env = "TAPELINE_FSYNC")]
    pub fsync: Option<String>,
    /// Largest payload of one record, in bytes [default: 4 MiB].
    #[arg(long, env = "TAPELINE_MAX_RECORD_BYTES", value_parser = size_usize)]
    pub max_record_bytes: Option<usize>,
    /// Largest sum of payloads and headers in one batch, in bytes [default: 16 MiB].
    #[arg(long, env = "TAPELINE_MAX_BATCH_BYTES", value_parser = size_usize)]
    pub max_batch_bytes: Option<usize>,
    /// Silence after which a subscriber gets a heartbeat, e.g. 5s, 500ms [default: 5s].
    #[arg(long, env = "TAPELINE_HEARTBEAT")]
    pub heartbeat: Option<String>,
    /// The most bytes the data dir may take; publishing is refused beyond (RESOURCE_EXHAUSTED).
    #[arg(long, env = "TAPELINE_MAX_DISK_BYTES", value_parser = size)]
    pub max_disk_bytes: Option<u64>,
    /// Free disk space kept in reserve; publishing is refused when a batch would eat into it
    /// [default: 64 MiB].
    #[arg(long, env = "TAPELINE_MIN_FREE_DISK_BYTES", value_parser = size)]
    pub min_free_disk_bytes: Option<u64>,
    /// Relay mode: the tapeline to copy streams from (an origin or another relay). Several
    /// upstreams: `[[mirror]]` tables in the settings file.
    #[arg(long, requires = "mirror", env = "TAPELINE_UPSTREAM")]
    pub upstream: Option<String>,
    /// A stream name or pattern to copy from the upstream (repeat for several); read-only here.
    #[arg(long, requires = "upstream", env = "TAPELINE_MIRROR", value_delimiter = ',')]
    pub mirror: Vec<String>,
    /// Where mirroring starts the first time: beginning, now or -DURATION (e.g. -10m). Afterwards
    /// the relay resumes from what it stored [default: beginning].
    #[arg(long, allow_hyphen_values = true, requires = "upstream", env = "TAPELINE_MIRROR_FROM")]
    pub mirror_from: Option<String>,
    /// TLS: the server's certificate chain (PEM); needs --tls-key. Reloaded on SIGHUP.
    #[arg(long, requires = "tls_key", env = "TAPELINE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the server's private key (PEM).
    #[arg(long, requires = "tls_cert", env = "TAPELINE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA that signs client certificates (a certificate's common name is its
    /// principal).
    #[arg(long, requires = "tls_cert", env = "TAPELINE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve an address other than loopback without TLS and authentication: anyone who reaches
    /// the port may read, publish and delete.
    #[arg(long, env = "TAPELINE_INSECURE")]
    pub insecure: bool,
    /// Relay mode over TLS: the CA that signs the upstream's certificate [default: the system's
    /// roots].
    #[arg(long, requires = "upstream", env = "TAPELINE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Relay mode: this relay's client certificate at the upstream (PEM); needs --upstream-key.
    #[arg(long, requires = "upstream_key", env = "TAPELINE_UPSTREAM_CERT")]
    pub upstream_cert: Option<PathBuf>,
    /// Relay mode: the client certificate's private key (PEM).
    #[arg(long, requires = "upstream_cert", env = "TAPELINE_UPSTREAM_KEY")]
    pub upstream_key: Option<PathBuf>,
    /// Relay mode: this relay's bearer token at the upstream.
    #[arg(long, env = "TAPELINE_UPSTREAM_TOKEN", hide_env_values = true, requires = "upstream")]
    pub upstream_token: Option<String>,
    /// Retention: each stream keeps records younger than this, e.g. 7d, 12h (rules for some
    /// streams: `[[retention.rule]]` in the settings file) [default: forever].
    #[arg(long, env = "TAPELINE_RETENTION_MAX_AGE")]
    pub retention_max_age: Option<String>,
    /// Retention: each stream keeps at most this many payload bytes [default: no limit].
    #[arg(long, env = "TAPELINE_RETENTION_MAX_BYTES", value_parser = size)]
    pub retention_max_bytes: Option<u64>,
    /// Retention: each stream keeps at most this many records [default: no limit].
    #[arg(long, env = "TAPELINE_RETENTION_MAX_RECORDS")]
    pub retention_max_records: Option<u64>,
    /// Retention: the whole store keeps at most this many payload bytes, oldest records first
    /// [default: no limit; 1 GiB with --volatile].
    #[arg(long, env = "TAPELINE_RETENTION_MAX_TOTAL_BYTES", value_parser = size)]
    pub retention_max_total_bytes: Option<u64>,
}

impl ServeArgs {
    /// The flags as settings that win over the file's.
    fn settings(&self) -> config::File {
        config::File {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
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
                    ca: self.upstream_ca.clone(),
                    cert: self.upstream_cert.clone(),
                    key: self.upstream_key.clone(),
                    token: self.upstream_token.clone(),
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
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(config::FileTls {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                }),
                _ => None,
            },
            auth: config::FileAuth::default(),
            insecure: self.insecure.then_some(true),
        }
    }
}

/// The server a client command talks to.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// Server: host:port or a URL (https:// for TLS).
    #[arg(short, long, env = "TAPELINE_SERVER", default_value = "http://127.0.0.1:7411", value_parser = server_url)]
    pub server: String,
    #[command(flatten)]
    pub credentials: CredentialArgs,
}

/// A size in bytes, or with a unit: `256MiB`, `1.5GiB`, `10MB`.
fn size(value: &str) -> std::result::Result<u64, String> {
    tapeline::types::parse_size(value)
}

fn size_usize(value: &str) -> std::result::Result<usize, String> {
    size(value).and_then(|n| usize::try_from(n).map_err(|_| format!("{value:?} is too large")))
}

/// A server given as `host:port` is `http://host:port`; a URL stays as it is.
fn server_url(value: &str) -> std::result::Result<String, String> {
    if value.contains("://") {
        return Ok(value.to_string());
    }
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(format!("http://{value}")),
        _ => Err(format!("{value:?} is not a server: give host:port (127.0.0.1:7411) or a URL (https://broker.example:7411)")),
    }
}

/// How a client command authenticates, and whom it trusts.
#[derive(Debug, Args)]
pub struct CredentialArgs {
    /// Bearer token from `tapeline token create`.
    #[arg(long, env = "TAPELINE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signs the server's certificate [default: the system's roots].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --key.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl CredentialArgs {
    /// The files read.
    pub fn read(&self) -> Result<tapeline::client::Credentials> {
        Ok(tapeline::client::Credentials::from_files(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
            self.token.clone(),
        )?)
    }
}

/// Flags of `token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub action: TokenAction,
}

/// What `token` does.
#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Make a new bearer token for principal NAME: its digest is appended to the token file
    /// (created private when missing) and the token is printed once, to be given to the client.
    Create {
        /// The principal's name, as its [[auth.principal]] table names it.
        name: String,
        /// The token file, as [auth] tokens names it.
        #[arg(long)]
        tokens: PathBuf,
    },
}

/// Flags of `streams`.
#[derive(Debug, Args)]
pub struct StreamsArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Output: table (for people) or json (one array, for scripts).
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
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
    #[arg(long, value_parser = size)]
    pub max_bytes: Option<u64>,
    /// The stream keeps at most this many records [default: the server's].
    #[arg(long)]
    pub max_records: Option<u64>,
    /// Change the metadata of an existing stream (its records stay).
    #[arg(long)]
    pub update: bool,
    /// Create a new stream for importing a recorded session (explicit ticks in the past);
    /// subscribers see it once `seal` ends the import.
    #[arg(long)]
    pub import: bool,
}

/// Flags of `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The stream to delete.
    pub stream: String,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Flags of `seal`.
#[derive(Debug, Args)]
pub struct SealArgs {
    /// The stream being imported.
    pub stream: String,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Flags of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Stream to publish into; created on first publish. With --input json, each line names its
    /// own stream, and STREAM (if given) replaces it.
    #[arg(required_unless_present = "input")]
    pub stream: Option<String>,
    #[command(flatten)]
    pub server: ServerArg,
    /// What a line of standard input is: text (the line is the payload) or json (a line as
    /// `tail --output json` prints it: stream, payload or payload_base64, headers, origin_time;
    /// its tick with --keep-ticks).
    #[arg(short, long, value_parser = ["text", "json"])]
    pub input: Option<String>,
    /// With --input json, store each record at its tick (into a stream made with `create
    /// --import`, or above the broker's newest tick), so the copy has the original's ticks.
    #[arg(long)]
    pub keep_ticks: bool,
    /// A header for every record: KEY=VALUE (repeat for several).
    #[arg(short = 'H', long = "header", value_parser = header)]
    pub headers: Vec<(String, String)>,
    /// Publish as this producer, batch by batch with sequence numbers counted from the input's
    /// start: running the same input again appends nothing twice (for inputs of up to 128
    /// batches of 1,000 lines; past that the broker has forgotten the first and refuses them).
    #[arg(long)]
    pub producer_id: Option<String>,
}

/// `KEY=VALUE`.
fn header(value: &str) -> std::result::Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{value:?} is not a header: give KEY=VALUE")),
    }
}

/// Flags of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Stream names or patterns (`*` one segment, trailing `**` any number).
    #[arg(required = true)]
    pub patterns: Vec<String>,
    /// Server: host:port or a URL (https:// for TLS); repeat to give servers of the same origin
    /// (the origin, its relays) to fail over between: positions are valid at each.
    #[arg(short, long = "server", env = "TAPELINE_SERVER", value_delimiter = ',',
          default_value = "http://127.0.0.1:7411", value_parser = server_url)]
    pub servers: Vec<String>,
    #[command(flatten)]
    pub credentials: CredentialArgs,
    /// Start: beginning, now, a tick, -DURATION (e.g. -5m) or an RFC 3339 time. Default: beginning.
    #[arg(short, long, allow_hyphen_values = true, conflicts_with = "after")]
    pub from: Option<String>,
    /// Start strictly after this tick (to resume: the last tick you printed).
    #[arg(long)]
    pub after: Option<u64>,
    /// Stop after this point (inclusive): now, a tick or an RFC 3339 time.
    #[arg(short, long)]
    pub to: Option<String>,
    /// Stop after this many records.
    #[arg(short = 'n', long)]
    pub limit: Option<u64>,
    /// Output: json (one object per line) or raw (the payload and a newline).
    #[arg(short, long, default_value = "json", value_parser = ["json", "raw"])]
    pub output: String,
    /// Delivery speed: instant, original (the recorded timing of the ticks) or a factor such as
    /// 2x or 0.5x; the replay then continues live at the same pace.
    #[arg(long, default_value = "instant")]
    pub pace: String,
    /// Receive at most this many record bytes per second, averaged over the server's window
    /// [default: the server's quota, if any].
    #[arg(long, value_parser = size)]
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
        Command::Serve(args) => serve(*args).await,
        Command::Publish(args) => publish(args).await,
        Command::Tail(args) => tail(args).await,
        Command::Streams(args) => streams(args).await,
        Command::Create(args) => create(args).await,
        Command::Delete(args) => delete(args).await,
        Command::Seal(args) => seal(args).await,
        Command::Info(args) => info(args).await,
        Command::Token(args) => match args.action {
            TokenAction::Create { name, tokens } => {
                let token = config::Tokens::create(&tokens, &name)?;
                println!("{token}");
                eprintln!(
                    "tapeline: token for {name:?} added to {}; it is shown only this once. Give it to the client (--token or TAPELINE_TOKEN) and grant {name:?} permissions in an [[auth.principal]] table.",
                    tokens.display()
                );
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Config => {
            print!("{}", config::DEFAULT_FILE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => verify(args),
        Command::Recover(args) => recover(args).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "tapeline", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}
