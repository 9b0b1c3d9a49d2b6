//! The brokers under test: each started fresh, on loopback, with its own temporary data dir, and
//! killed when dropped. Also what each used: peak resident memory and bytes on disk.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// One broker set up the way a figure is measured. Compare only within a [`Tier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum System {
    /// `tapeline serve --fsync always`: acknowledged after fsync.
    TapelineAlways,
    /// `tapeline serve --fsync interval=1000`: acknowledged when written, fsync every second.
    TapelineInterval,
    /// Redis Streams, `appendonly yes`, `appendfsync always`.
    RedisAlways,
    /// Redis Streams, `appendonly yes`, `appendfsync everysec`.
    RedisEverysec,
    /// NATS JetStream, file storage (the server's own flushing; no fsync before the ack).
    NatsFile,
    /// Redis `appendfsync always` loaded by Redis's own C load generator, `redis-benchmark`
    /// (publish throughput only): the fastest client Redis has, so that the comparison does not
    /// rest on the Rust driver alone.
    RedisBenchAlways,
    /// The same with `appendfsync everysec`.
    RedisBenchEverysec,
    /// `tapeline serve --fsync interval=1000` over TLS (a made-up CA), clients over `https://`:
    /// what encryption costs, beside `TapelineInterval`.
    TapelineTls,
    /// `TapelineInterval` with its admin listener on and `/metrics` scraped every second: what
    /// metrics cost (not in the default list: `--systems tapeline-interval,tapeline-metrics`).
    TapelineMetrics,
}

/// How much an acknowledged record survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Tier {
    /// Acknowledged after it was forced to disk: survives a power cut.
    Fsync,
    /// Acknowledged when the server wrote it; forced to disk later (within about a second for
    /// tapeline and Redis): survives a crash of the server process, not of the machine.
    Written,
}

impl System {
    /// Every system, in table order.
    pub const ALL: [System; 9] = [
        System::TapelineAlways,
        System::RedisAlways,
        System::RedisBenchAlways,
        System::TapelineInterval,
        System::RedisEverysec,
        System::RedisBenchEverysec,
        System::NatsFile,
        System::TapelineTls,
        System::TapelineMetrics,
    ];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            System::TapelineAlways => "tapeline fsync=always",
            System::TapelineInterval => "tapeline fsync=interval=1000",
            System::RedisAlways => "redis appendfsync always",
            System::RedisEverysec => "redis appendfsync everysec",
            System::NatsFile => "nats jetstream file",
            System::RedisBenchAlways => "redis always, redis-benchmark",
            System::RedisBenchEverysec => "redis everysec, redis-benchmark",
            System::TapelineTls => "tapeline fsync=interval=1000, TLS",
            System::TapelineMetrics => "tapeline fsync=interval=1000, /metrics scraped every 1 s",
        }
    }

    /// The short name for `--systems`.
    pub fn key(self) -> &'static str {
        match self {
            System::TapelineAlways => "tapeline-always",
            System::TapelineInterval => "tapeline-interval",
            System::RedisAlways => "redis-always",
            System::RedisEverysec => "redis-everysec",
            System::NatsFile => "nats",
            System::RedisBenchAlways => "redis-bench-always",
            System::RedisBenchEverysec => "redis-bench-everysec",
            System::TapelineTls => "tapeline-tls",
            System::TapelineMetrics => "tapeline-metrics",
        }
    }

    /// The durability tier of its acknowledgements.
    pub fn tier(self) -> Tier {
        match self {
            System::TapelineAlways | System::RedisAlways | System::RedisBenchAlways => Tier::Fsync,
            _ => Tier::Written,
        }
    }

    /// Whether it is tapeline (the ratio is tapeline / best peer).
    pub fn is_tapeline(self) -> bool {
        matches!(
            self,
            System::TapelineAlways | System::TapelineInterval | System::TapelineTls | System::TapelineMetrics
        )
    }

    /// Whether it is loaded by `redis-benchmark`, which only publishes.
    pub fn publishes_only(self) -> bool {
        matches!(self, System::RedisBenchAlways | System::RedisBenchEverysec)
    }

    /// Parses a key of [`System::key`].
    pub fn parse(key: &str) -> Result<System> {
        System::ALL.into_iter().find(|s| s.key() == key).with_context(|| {
            let keys: Vec<_> = System::ALL.iter().map(|s| s.key()).collect();
            format!("unknown system {key:?}: expected one of {}", keys.join(", "))
        })
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    pub tapeline: PathBuf,
    pub redis: PathBuf,
    pub redis_benchmark: PathBuf,
    pub nats: PathBuf,
}

/// Where a running broker answers.
#[derive(Debug, Clone)]
pub struct Target {
    pub system: System,
    /// `http://127.0.0.1:P` for tapeline (`https://` over TLS), `redis://127.0.0.1:P` or
    /// `nats://127.0.0.1:P`.
    pub url: String,
    /// For tapeline over TLS: the CA its clients trust.
    pub credentials: tapeline::client::Credentials,
}

/// A running broker; killed when dropped.
pub struct Server {
    pub target: Target,
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    programs: Programs,
    /// The certificate and key of a server over TLS.
    tls: Option<tempfile::TempDir>,
    /// `TapelineMetrics`: its admin port, and the task scraping it (stopped when dropped).
    admin: Option<(u16, Scraper)>,
}

/// Scrapes `/metrics` every second until dropped; counts the scrapes that answered.
pub struct Scraper {
    task: tokio::task::JoinHandle<()>,
    scrapes: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.task.abort();
        let scrapes = self.scrapes.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("  /metrics answered {scrapes} scrapes (one a second)");
    }
}

impl Scraper {
    fn start(port: u16) -> Scraper {
        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = scrapes.clone();
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { continue };
                let request = format!("GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
                let mut body = Vec::new();
                let answered = tcp.write_all(request.as_bytes()).await.is_ok()
                    && tcp.read_to_end(&mut body).await.is_ok();
                if answered && (body.starts_with(b"HTTP/1.0 200") || body.starts_with(b"HTTP/1.1 200")) {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        Scraper { task, scrapes }
    }
}

impl Server {
    /// Starts `system` on a free loopback port with an empty data dir under `scratch`, and waits
    /// until it answers.
    pub async fn start(system: System, programs: &Programs, scratch: &Path) -> Result<Server> {
        let dir = tempfile::Builder::new().prefix(system.key()).tempdir_in(scratch)?;
        let port = free_port()?;
        let (tls, credentials) = match system {
            System::TapelineTls => {
                let (tls, ca) = certificate(scratch)?;
                (Some(tls), tapeline::client::Credentials { ca: Some(ca), ..Default::default() })
            }
            _ => (None, Default::default()),
        };
        let admin_port = (system == System::TapelineMetrics).then(free_port).transpose()?;
        let (child, url) =
            spawn(system, programs, dir.path(), port, tls.as_ref().map(|t| t.path()), admin_port)?;
        let target = Target { system, url, credentials };
        let admin = admin_port.map(|p| (p, Scraper::start(p)));
        let server = Server { target, child, dir, port, programs: programs.clone(), tls, admin };
        server.wait_ready(port).await?;
        Ok(server)
    }

    /// Stops the server cleanly (SIGTERM, waiting for its exit) and starts it again on the same
    /// data dir, `before` run in between; returns how long the start took, until it answers.
    pub async fn restart(&mut self, before: impl FnOnce(&Path) -> Result<()>) -> Result<Duration> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        tokio::time::timeout(Duration::from_secs(120), self.child.wait()).await??;
        before(self.dir.path())?;
        let began = Instant::now();
        let tls = self.tls.as_ref().map(|t| t.path());
        let admin_port = self.admin.as_ref().map(|(p, _)| *p);
        let (child, _) =
            spawn(self.target.system, &self.programs, self.dir.path(), self.port, tls, admin_port)?;
        self.child = child;
        self.wait_ready(self.port).await?;
        Ok(began.elapsed())
    }

    /// Where `redis-benchmark` is.
    pub fn redis_benchmark(&self) -> &Path {
        &self.programs.redis_benchmark
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    async fn wait_ready(&self, port: u16) -> Result<()> {
        // Long enough for an open that rebuilds the index of a large data dir.
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() && self.answers().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("{} did not listen on port {port} within 600 s", self.target.system.name())
    }

    /// Whether the server answers a request: tapeline binds its port before it opens its log, so
    /// only an answer to `Hello` says the log is open.
    async fn answers(&self) -> bool {
        if !self.target.system.is_tapeline() {
            return true;
        }
        let hello = async {
            let mut client =
                tapeline::client::connect_with(&self.target.url, &self.target.credentials).await.ok()?;
            client.hello(tapeline::protocol::pb::HelloRequest::default()).await.ok()
        };
        matches!(tokio::time::timeout(Duration::from_secs(600), hello).await, Ok(Some(_)))
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The most resident memory the server process has used so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let Some(pid) = self.pid() else { return 0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Bytes the data dir takes on disk (allocated blocks, as `du` counts them).
    pub fn disk_bytes(&self) -> u64 {
        disk_usage(self.dir.path())
    }

    /// Stops the server (SIGKILL: the figures are taken before).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A certificate for 127.0.0.1 signed by a new CA, written to a new directory under `scratch`
/// (`server.pem`, `server.key`); returns it and the CA's certificate (PEM).
fn certificate(scratch: &Path) -> Result<(tempfile::TempDir, Vec<u8>)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("tls").tempdir_in(scratch)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let cert = params.signed_by(&key, &Issuer::new(ca_params, ca_key))?;
    std::fs::write(dir.path().join("server.pem"), cert.pem())?;
    let key_path = dir.path().join("server.key");
    std::fs::write(&key_path, key.serialize_pem())?;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    Ok((dir, ca.pem().into_bytes()))
}

/// Starts the program of `system` on `port` with the data dir `data` (and the certificate in
/// `tls` for tapeline over TLS, and the admin listener on `admin` for `TapelineMetrics`).
fn spawn(
    system: System,
    programs: &Programs,
    data: &Path,
    port: u16,
    tls: Option<&Path>,
    admin: Option<u16>,
) -> Result<(Child, String)> {
    let (mut command, url) = match system {
        System::TapelineAlways | System::TapelineInterval | System::TapelineMetrics => {
            let fsync = if system == System::TapelineAlways { "always" } else { "interval=1000" };
            let mut c = Command::new(&programs.tapeline);
            c.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--fsync", fsync])
                .arg("--data")
                .arg(data);
            if let Some(admin) = admin {
                c.args(["--admin-listen", &format!("127.0.0.1:{admin}")]);
            }
            c.env("TAPELINE_LOG", "warn");
            (c, format!("http://127.0.0.1:{port}"))
        }
        System::TapelineTls => {
            let tls = tls.context("tapeline over TLS needs its certificate")?;
            let mut c = Command::new(&programs.tapeline);
            c.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--fsync", "interval=1000"])
                .arg("--data")
                .arg(data)
                .arg("--tls-cert")
                .arg(tls.join("server.pem"))
                .arg("--tls-key")
                .arg(tls.join("server.key"));
            c.env("TAPELINE_LOG", "warn");
            (c, format!("https://127.0.0.1:{port}"))
        }
        System::RedisAlways
        | System::RedisEverysec
        | System::RedisBenchAlways
        | System::RedisBenchEverysec => {
            let always = matches!(system, System::RedisAlways | System::RedisBenchAlways);
            let fsync = if always { "always" } else { "everysec" };
            let mut c = Command::new(&programs.redis);
            c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes"])
                .args(["--appendfsync", fsync, "--save", "", "--protected-mode", "no", "--daemonize", "no"])
                .args(["--loglevel", "warning"])
                .arg("--dir")
                .arg(data);
            (c, format!("redis://127.0.0.1:{port}"))
        }
        System::NatsFile => {
            let mut c = Command::new(&programs.nats);
            c.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-l", "/dev/null", "-sd"]).arg(data);
            (c, format!("nats://127.0.0.1:{port}"))
        }
    };
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
    let child = command.spawn().with_context(|| format!("cannot start {}", system.name()))?;
    Ok((child, url))
}

fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let children = std::fs::read_dir(path).into_iter().flatten().flatten();
    own + children.map(|e| disk_usage(&e.path())).sum::<u64>()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
