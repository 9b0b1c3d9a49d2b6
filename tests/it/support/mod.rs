//! Test helpers: a real broker on 127.0.0.1:0 with a temp data dir, a gRPC client, a TCP proxy
//! that can cut connections, and small publish/subscribe helpers. Every wait is bounded, so a
//! broken broker fails a test instead of hanging it.
#![allow(dead_code)]

pub mod pki;
pub mod powercut;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tapeline::config::{Config, DataDir, FsyncPolicy};
use tapeline::protocol::pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// A broker running inside the test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub data: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<tapeline::Result<()>>>,
}

/// The settings tests use unless they say otherwise.
pub fn config(data: &Path) -> Config {
    Config {
        data: DataDir::Path(data.to_path_buf()),
        fsync: FsyncPolicy::Always,
        heartbeat: Duration::from_secs(30),
        cache_bytes: 64 << 20,
        ..Config::default()
    }
}

impl TestServer {
    /// Starts a broker on `data` with the default test settings.
    pub async fn start(data: &Path) -> TestServer {
        TestServer::start_with(config(data)).await
    }

    /// Starts a broker with `config`. The listener is bound before the server task starts, so
    /// clients may connect at once.
    pub async fn start_with(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let data = match &config.data {
            DataDir::Path(p) => p.clone(),
            DataDir::Volatile => PathBuf::new(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = tapeline::server::run(config, listener, async move {
                let _ = stopped.await;
            })
            .await;
            // A broker that cannot start shows only as a refused connection: say why.
            if let Err(err) = &result {
                eprintln!("the test server on {addr} stopped: {err}");
            }
            result
        });
        TestServer { addr, data, stop: Some(stop), task: Some(task) }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new client on its own connection.
    pub async fn client(&self) -> tapeline::client::Client {
        client(&self.url()).await
    }

    /// Shuts the broker down the way SIGTERM does and waits until its log is closed.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(WAIT, task).await.expect("server stops in time");
            result.expect("server task").expect("server ran cleanly");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A broker on a new temp dir (kept alive by the returned `TempDir`) and a client of it.
pub async fn started() -> (tempfile::TempDir, TestServer, tapeline::client::Client) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(dir.path()).await;
    let client = server.client().await;
    (dir, server, client)
}

/// A client on its own connection to `url`.
pub async fn client(url: &str) -> tapeline::client::Client {
    tapeline::client::connect(url).await.expect("connect to the test server")
}

/// A client whose HTTP/2 windows are the protocol's smallest (64 KiB), so that what it does not
/// read stays at the server, where the slow-consumer policy and the memory bounds see it (a
/// client with large windows holds it in its own buffers).
pub async fn narrow_client(url: &str) -> tapeline::client::Client {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect to the test server");
    pb::tapeline_client::TapelineClient::with_interceptor(channel, tapeline::client::Bearer::default())
}

/// One record of `stream` with a payload.
pub fn record(stream: &str, payload: impl Into<Vec<u8>>) -> pb::Record {
    pb::Record { stream: stream.to_string(), payload: payload.into().into(), ..Default::default() }
}

/// Publishes one batch of `payloads` into `stream`; returns the ticks.
pub async fn publish(client: &mut tapeline::client::Client, stream: &str, payloads: &[&str]) -> Vec<u64> {
    let records = payloads.iter().map(|p| record(stream, *p)).collect();
    publish_records(client, records).await
}

/// Publishes one batch; returns the ticks.
pub async fn publish_records(client: &mut tapeline::client::Client, records: Vec<pb::Record>) -> Vec<u64> {
    let ack = client
        .publish(pb::PublishRequest { records, batch_id: 0, ..Default::default() })
        .await
        .expect("publish")
        .into_inner();
    ack.ticks
}

/// Creates `stream` for an import: explicit ticks in the past are accepted, and no subscriber
/// sees it until [`seal`].
pub async fn import(client: &mut tapeline::client::Client, stream: &str) {
    let request = pb::CreateStreamRequest { stream: stream.into(), import: true, ..Default::default() };
    let info = client.create_stream(request).await.expect("create an import").into_inner();
    assert!(info.importing, "{info:?}");
}

/// Ends the import of `stream`; returns it as it is now.
pub async fn seal(client: &mut tapeline::client::Client, stream: &str) -> pb::StreamInfo {
    let info = client.seal_stream(pb::SealStreamRequest { stream: stream.into() }).await.expect("seal");
    info.into_inner()
}

/// Imports `records` into their streams (created for the import) and seals them; returns the ticks.
pub async fn import_records(client: &mut tapeline::client::Client, records: Vec<pb::Record>) -> Vec<u64> {
    let mut streams: Vec<String> = records.iter().map(|r| r.stream.clone()).collect();
    streams.sort();
    streams.dedup();
    for stream in &streams {
        import(client, stream).await;
    }
    let ticks = publish_records(client, records).await;
    for stream in &streams {
        seal(client, stream).await;
    }
    ticks
}

/// What a subscriber saw, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Record {
        stream: String,
        tick: u64,
        payload: String,
    },
    CaughtUp(u64),
    Heartbeat {
        tail_tick: u64,
    },
    StreamAdded(String),
    /// A relay's upstream link: its URL and whether it is connected.
    Upstream {
        upstream: String,
        connected: bool,
    },
    /// A stream's metadata changed (its content type shown), or it was deleted.
    StreamChanged {
        stream: String,
        content_type: String,
        deleted: bool,
    },
    /// A slow subscriber skipped `records` records with ticks `from..=to`.
    Gap {
        stream: String,
        records: u64,
        from: u64,
        to: u64,
    },
    /// Retention removed the stream's records up to `through`.
    Truncated {
        stream: String,
        requested: u64,
        through: u64,
        earliest: u64,
    },
}

/// A subscription being read by a test.
pub struct Sub {
    pub stream: tonic::Streaming<pb::SubscribeResponse>,
}

impl Sub {
    /// Opens a subscription.
    pub async fn open(client: &mut tapeline::client::Client, request: pb::SubscribeRequest) -> Sub {
        let stream = client.subscribe(request).await.expect("subscribe").into_inner();
        Sub { stream }
    }

    /// The next events of one message; `None` when the server ended the stream cleanly.
    pub async fn next(&mut self) -> Option<Vec<Seen>> {
        self.next_by(tokio::time::Instant::now() + WAIT, "an event").await
    }

    /// Like `next`, failing the test at `deadline`: loops that read many messages share one
    /// deadline, so heartbeats cannot keep a test waiting for a record that never comes.
    async fn next_by(&mut self, deadline: tokio::time::Instant, waiting_for: &str) -> Option<Vec<Seen>> {
        let message = tokio::time::timeout_at(deadline, self.stream.message())
            .await
            .unwrap_or_else(|_| panic!("gave up waiting for {waiting_for}"))
            .expect("no error status");
        message.map(seen)
    }

    /// The next message, or the status the stream ended with.
    pub async fn next_result(&mut self) -> Result<Option<Vec<Seen>>, tonic::Status> {
        let message =
            tokio::time::timeout(WAIT, self.stream.message()).await.expect("an event within the wait");
        message.map(|m| m.map(seen))
    }

    /// Reads until `n` records arrived; returns every event seen on the way.
    pub async fn take_records(&mut self, n: usize) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut events = Vec::new();
        let mut count = 0;
        while count < n {
            let waiting_for = format!("record {} of {n}", count + 1);
            let batch = self.next_by(deadline, &waiting_for).await.expect("the subscription ended early");
            count += batch.iter().filter(|s| matches!(s, Seen::Record { .. })).count();
            events.extend(batch);
        }
        events
    }

    /// Reads until the stream ends cleanly; returns every event.
    pub async fn until_end(&mut self) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut events = Vec::new();
        while let Some(batch) = self.next_by(deadline, "the end of the subscription").await {
            events.extend(batch);
        }
        events
    }

    /// Reads until `CaughtUp`; returns the events before it and its tick.
    pub async fn until_caught_up(&mut self) -> (Vec<Seen>, u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut events = Vec::new();
        loop {
            let batch =
                self.next_by(deadline, "CaughtUp").await.expect("the subscription ended before CaughtUp");
            for event in batch {
                if let Seen::CaughtUp(tick) = event {
                    return (events, tick);
                }
                events.push(event);
            }
        }
    }
}

fn seen(message: pb::SubscribeResponse) -> Vec<Seen> {
    use pb::subscribe_response::Event;
    match message.event {
        Some(Event::Records(batch)) => batch
            .records
            .into_iter()
            .map(|r| {
                assert_eq!(
                    r.crc32,
                    Some(crc32fast::hash(&r.payload)),
                    "every delivered record carries its CRC"
                );
                Seen::Record {
                    stream: r.stream,
                    tick: r.tick,
                    payload: String::from_utf8_lossy(&r.payload).into(),
                }
            })
            .collect(),
        Some(Event::CaughtUp(c)) => vec![Seen::CaughtUp(c.tick)],
        Some(Event::Heartbeat(h)) => vec![Seen::Heartbeat { tail_tick: h.tail_tick }],
        Some(Event::StreamAdded(a)) => vec![Seen::StreamAdded(a.stream.map(|s| s.name).unwrap_or_default())],
        Some(Event::UpstreamStatus(u)) => {
            vec![Seen::Upstream { upstream: u.upstream, connected: u.connected }]
        }
        Some(Event::StreamChanged(c)) => {
            let info = c.stream.unwrap_or_default();
            vec![Seen::StreamChanged {
                stream: info.name,
                content_type: info.content_type,
                deleted: c.deleted,
            }]
        }
        Some(Event::Gap(g)) => {
            vec![Seen::Gap { stream: g.stream, records: g.records, from: g.from_tick, to: g.to_tick }]
        }
        Some(Event::Truncated(t)) => vec![Seen::Truncated {
            stream: t.stream,
            requested: t.requested,
            through: t.through,
            earliest: t.earliest_available,
        }],
        None => vec![],
    }
}

/// Only the records of a list of events, as (stream, tick, payload).
pub fn records(events: &[Seen]) -> Vec<(String, u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Seen::Record { stream, tick, payload } => Some((stream.clone(), *tick, payload.clone())),
            _ => None,
        })
        .collect()
}

/// Only the payloads of a list of events.
pub fn payloads(events: &[Seen]) -> Vec<String> {
    records(events).into_iter().map(|(_, _, p)| p).collect()
}

/// A subscription request for `streams` from `start`.
pub fn request(streams: &[&str], start: pb::subscribe_request::Start) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        streams: streams.iter().map(|s| s.to_string()).collect(),
        start: Some(start),
        resume: Default::default(),
        ..Default::default()
    }
}

/// The `BEGINNING` start.
pub fn beginning() -> pb::subscribe_request::Start {
    pb::subscribe_request::Start::Beginning(pb::Beginning {})
}

/// The `NOW` start.
pub fn now() -> pb::subscribe_request::Start {
    pb::subscribe_request::Start::Now(pb::Now {})
}

/// How a faulty proxy misbehaves; durations are picked uniformly in each range.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// How long a connection lives before it is cut.
    pub lifetime: (Duration, Duration),
    /// Chance that a chunk is delayed, and by how much.
    pub delay_chance: f64,
    pub delay: (Duration, Duration),
    /// Chance that a chunk stalls the connection, and for how long.
    pub stall_chance: f64,
    pub stall: (Duration, Duration),
}

impl Faults {
    fn pick(&self, (low, high): (Duration, Duration)) -> Duration {
        use rand::Rng;
        rand::rng().random_range(low..=high)
    }

    /// Copies `from` to `to`, chunk by chunk, delaying and stalling at random.
    async fn pipe(&self, mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
        use rand::Rng;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (delayed, stalled) = {
                let mut rng = rand::rng();
                (rng.random_bool(self.delay_chance), rng.random_bool(self.stall_chance))
            };
            if stalled {
                tokio::time::sleep(self.pick(self.stall)).await;
            } else if delayed {
                tokio::time::sleep(self.pick(self.delay)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// A TCP proxy in front of a broker whose connections a test can cut at once.
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<new port> to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let handle = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(handle);
            }
        });
        Proxy { addr, connections, accept }
    }

    /// Starts forwarding 127.0.0.1:<new port> to `target` through a network that misbehaves at
    /// random: every connection is cut after a random lifetime, and each chunk it carries may be
    /// delayed a little or stalled for a long while first.
    pub async fn faulty(target: SocketAddr, faults: Faults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let handle = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let lifetime = faults.pick(faults.lifetime);
                    let (client_read, client_write) = inbound.into_split();
                    let (server_read, server_write) = outbound.into_split();
                    // Returning drops both sockets: the connection is cut in both directions.
                    tokio::select! {
                        _ = tokio::time::sleep(lifetime) => {}
                        _ = faults.pipe(client_read, server_write) => {}
                        _ = faults.pipe(server_read, client_write) => {}
                    }
                });
                tracked.lock().unwrap().push(handle);
            }
        });
        Proxy { addr, connections, accept }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every open connection, as a network fault would.
    pub fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The `tapeline` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_tapeline");

/// A `tapeline serve` process: killed on drop, its log printed if the test failed.
#[derive(Debug)]
pub struct Serve {
    pub child: std::process::Child,
    pub url: String,
    /// The admin listener's URL (`http://host:port/`), when it was asked for.
    pub admin: Option<String>,
    admin_asked: bool,
    pub log_path: PathBuf,
}

impl Serve {
    /// Starts `tapeline serve --listen 127.0.0.1:0 --data DATA EXTRA...`.
    pub fn start(data: &Path, extra: &[&str]) -> Serve {
        Serve::start_at(data, "127.0.0.1:0", extra)
    }

    /// Starts on `listen`: a restart where the clients expect the broker (`serve.addr()`).
    pub fn start_at(data: &Path, listen: &str, extra: &[&str]) -> Serve {
        let data_arg = data.to_str().expect("a UTF-8 temp path");
        let mut args = vec!["serve", "--listen", listen, "--data", data_arg];
        args.extend_from_slice(extra);
        Serve::spawn(&args, data.with_extension("serve.log"))
    }

    /// Starts the binary with `args`, its standard error to `log_path`, and waits for the ready
    /// line that names the bound address (no sleeping).
    pub fn spawn(args: &[&str], log_path: PathBuf) -> Serve {
        Serve::try_spawn(args, log_path).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Like `spawn`, but a binary that ends without its ready line (a broker refusing to start)
    /// is an `Err` saying why: its first line and its log.
    pub fn try_spawn(args: &[&str], log_path: PathBuf) -> Result<Serve, String> {
        let mut serve = Serve::launch(args, log_path);
        serve.ready()?;
        Ok(serve)
    }

    /// A broker a test started by itself (under other environment variables), ready at `url`.
    pub fn started(child: std::process::Child, url: String, log_path: PathBuf) -> Serve {
        Serve { child, url, admin: None, admin_asked: false, log_path }
    }

    /// Starts the binary without waiting for anything: a test that kills it while it starts.
    /// `url` stays empty.
    pub fn launch(args: &[&str], log_path: PathBuf) -> Serve {
        let log = std::fs::File::create(&log_path).expect("create the serve log");
        let child = std::process::Command::new(BIN)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start tapeline serve");
        let admin_asked = args.contains(&"--admin-listen");
        Serve { child, url: String::new(), admin: None, admin_asked, log_path }
    }

    /// Waits (at most `WAIT`) for the ready line and takes the address from it (and the admin
    /// listener's from the line after it, when it was asked for).
    fn ready(&mut self) -> Result<(), String> {
        use std::io::BufRead;
        let stdout = self.child.stdout.take().expect("stdout");
        let (line_read, reading) = std::sync::mpsc::channel();
        // A thread, so that the wait is bounded: a broker that hangs while it opens its data dir
        // fails the test; the thread ends when the broker is killed and its stdout closes.
        std::thread::spawn(move || {
            let mut stdout = std::io::BufReader::new(stdout);
            for _ in 0..2 {
                let mut line = String::new();
                let _ = stdout.read_line(&mut line);
                if line_read.send(line).is_err() {
                    return;
                }
            }
        });
        let line = reading.recv_timeout(WAIT).unwrap_or_default();
        match line.trim().strip_prefix("tapeline listening on ") {
            Some(addr) => {
                self.url = format!("http://{addr}");
                if self.admin_asked {
                    let line = reading.recv_timeout(WAIT).unwrap_or_default();
                    self.admin = line.trim().strip_prefix("tapeline admin on ").map(str::to_string);
                }
                Ok(())
            }
            None => {
                // Killed if it hangs, reaped if it exited: either way its log is complete then.
                let _ = self.child.kill();
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(format!("unexpected first line {line:?} ({status}); the serve log:\n{}", self.log()))
            }
        }
    }

    /// The address it listens on, `host:port`.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it was clean and how long it took.
    pub fn terminate(mut self) -> (bool, Duration) {
        let began = std::time::Instant::now();
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(status.success());
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.success(), began.elapsed());
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "serve did not exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tapeline serve log ---\n{}", self.log());
        }
    }
}

/// Every stream as `ListStreams` shows it, without the recent rate (which moves with time): what
/// is stored, to compare before and after something.
pub async fn stored_streams(client: &mut tapeline::client::Client) -> Vec<pb::StreamInfo> {
    let listed = tapeline::client::list_streams(client, "").await.expect("list streams");
    listed
        .into_iter()
        .map(|s| pb::StreamInfo { records_per_second: 0.0, bytes_per_second: 0.0, ..s })
        .collect()
}
