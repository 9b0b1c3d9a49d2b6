//! The client commands: `publish`, `tail`, `streams`, `create`, `delete`, `info`.

use super::output::{json_line, retention_text, stream_json};
use super::{CreateArgs, DeleteArgs, PublishArgs, SealArgs, ServerArg, StreamsArgs, TailArgs};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use tapeline::client::{
    self, connect_with, Credentials, Delivery, PublishOptions, Publisher, SubscribeOptions, Subscriber,
};
use tapeline::protocol::pb;
use tapeline::types::Tick;
use tapeline::{Error, Result};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// `publish` sends a batch when it holds this many lines or bytes, or when stdin has no more now.
const PUBLISH_BATCH_LINES: usize = 1000;
const PUBLISH_BATCH_BYTES: usize = 1 << 20;

fn remote(action: &'static str, status: tonic::Status) -> Error {
    client::remote(action, &status).into()
}

pub async fn publish(args: PublishArgs) -> Result<ExitCode> {
    if let Some(stream) = &args.stream {
        tapeline::types::StreamName::parse(stream)?;
    }
    let json = args.input.as_deref() == Some("json");
    if args.keep_ticks && !json {
        return Err(Error::InvalidArgument("--keep-ticks keeps the ticks of --input json lines".into()));
    }
    // Fail at once, with one clear line, when the server cannot be reached at all.
    let credentials = args.server.credentials.read()?;
    greet(&args.server.server, &credentials).await?;
    let mut options = PublishOptions { credentials, ..PublishOptions::new(args.server.server.clone()) };
    // Batches cut by their content alone, numbered from the input's start: a re-run of the same
    // input sends the same batches with the same sequences.
    let counted = args.producer_id.is_some();
    if let Some(producer) = &args.producer_id {
        options.producer_id = producer.clone();
        options.first_sequence = 0;
        options.counted_sequences = true;
    }
    let mut publisher = Publisher::start(options);
    let batches = publisher.batches().expect("a new publisher takes batches");
    publisher.finish();
    let line_to_record = LineToRecord {
        stream: args.stream.clone(),
        json,
        keep_ticks: args.keep_ticks,
        headers: args.headers.clone(),
    };
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
                let next = if counted { lines.recv().await } else { lines.try_recv().ok() };
                let Some(line) = next else { break };
                bytes += line.len();
                batch.push(line);
            }
            let records = batch
                .into_iter()
                .enumerate()
                .map(|(i, line)| line_to_record.record(line, sent + i as u64 + 1))
                .collect::<Result<Vec<_>>>()?;
            sent += records.len() as u64;
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
                failure.get_or_insert(Error::from(err));
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
    let to = args.stream.as_deref().unwrap_or("the streams the lines name");
    eprintln!("published {acked} {noun} to {to}{range}");
    if let Some(failure) = failure {
        eprintln!("tapeline: {failure}");
        return Ok(super::exit_code(&failure));
    }
    if sent != Some(acked) {
        eprintln!("tapeline: {} records were read but only {acked} acknowledged", sent.unwrap_or(0));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// How `publish` makes a record of a line of its input.
struct LineToRecord {
    /// The stream of every record (with JSON input, instead of the line's own).
    stream: Option<String>,
    /// Lines are JSON as `tail --output json` prints them; otherwise each line is a payload.
    json: bool,
    keep_ticks: bool,
    headers: Vec<(String, String)>,
}

impl LineToRecord {
    /// The record of line number `number` (from 1).
    fn record(&self, line: Vec<u8>, number: u64) -> Result<client::Incoming> {
        let mut record = if self.json {
            self.parse(&line)
                .map_err(|why| Error::InvalidArgument(format!("line {number} of the input: {why}")))?
        } else {
            client::Incoming { payload: line.into(), ..Default::default() }
        };
        if let Some(stream) = &self.stream {
            record.stream = stream.clone();
        }
        record.headers.extend(self.headers.iter().cloned());
        Ok(record)
    }

    /// A line of `tail --output json`: ticks and times as strings of digits or as numbers.
    fn parse(&self, line: &[u8]) -> std::result::Result<client::Incoming, String> {
        use base64::Engine;
        let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| format!("not JSON ({e})"))?;
        let number = |key: &str| -> std::result::Result<u64, String> {
            match &value[key] {
                serde_json::Value::Null => Ok(0),
                serde_json::Value::String(s) => s.parse().map_err(|_| format!("{key} {s:?} is not a number")),
                v => v.as_u64().ok_or_else(|| format!("{key} {v} is not a whole number")),
            }
        };
        let stream = match (&value["stream"], &self.stream) {
            (serde_json::Value::String(s), _) => s.clone(),
            (_, Some(_)) => String::new(),
            _ => return Err("it has no \"stream\"".into()),
        };
        let payload = match (&value["payload"], &value["payload_base64"]) {
            (serde_json::Value::String(text), _) => text.clone().into_bytes(),
            (_, serde_json::Value::String(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("payload_base64 is not base64 ({e})"))?,
            _ => return Err("it has neither \"payload\" nor \"payload_base64\"".into()),
        };
        let tick = if self.keep_ticks { number("tick")? } else { 0 };
        if self.keep_ticks && tick == 0 {
            return Err("it has no \"tick\" to keep".into());
        }
        let headers = match &value["headers"] {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Object(map) => map
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect::<Option<Vec<_>>>()
                .ok_or("a header's value is not a string")?,
            _ => return Err("\"headers\" is not an object".into()),
        };
        Ok(client::Incoming {
            stream,
            tick,
            origin_time: number("origin_time")?,
            headers,
            payload: payload.into(),
            crc32: None,
        })
    }
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
            Start::At(Tick::now().minus(ago).0)
        }
        v => Start::At(parse_point("--from", v)?.0),
    })
}

pub async fn tail(args: TailArgs) -> Result<ExitCode> {
    use pb::subscribe_request::Start;
    let pace = parse_pace(&args.pace)?.unwrap_or(0.0);
    let start = match (&args.from, args.after) {
        (Some(from), _) => parse_from(from)?,
        (None, Some(after)) => Start::After(after),
        (None, None) => Start::Beginning(pb::Beginning {}),
    };
    let credentials = args.credentials.read()?;
    let end = match args.to.as_deref() {
        // Says hello for the operator's notice; a server that is down now is waited for below.
        None => match greet(&args.servers[0], &credentials).await {
            Err(Error::Remote { action: "connect", .. }) => None,
            Err(err) => return Err(err),
            Ok(_) => None,
        },
        // "now" is the server's latest committed tick: exact, whatever the clocks say.
        Some("now") => Some(greet(&args.servers[0], &credentials).await?.tail_tick),
        Some(v) => Some(parse_point("--to", v)?.0),
    };
    // The server ends an empty interval at once; asked for by hand, an end before the start is
    // a mistake to point out.
    let before = match (&start, end) {
        (Start::At(at), Some(end)) if end < *at => Some(format!("--from {at}")),
        (Start::After(after), Some(end)) if end < *after => Some(format!("--after {after}")),
        _ => None,
    };
    if let (Some(start), Some(end)) = (before, end) {
        return Err(Error::InvalidArgument(format!(
            "--to {end} is before the start ({start}): nothing lies between them"
        )));
    }
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
            // Not set means catch up, also to servers older than SLOW_CONSUMER_CATCH_UP.
            _ => pb::SlowConsumer::Unspecified,
        },
        credentials,
        ..SubscribeOptions::new(String::new(), args.patterns, start)
    };
    let mut subscriber = Subscriber::new(options)?;
    let raw = args.output == "raw";
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let mut progress = super::progress::Replay::start(end.is_some());
    loop {
        let records = match subscriber.next().await {
            None => return Ok(ExitCode::SUCCESS),
            Some(Err(err)) => {
                let err = Error::from(err);
                progress.say(&format!("tapeline: {err}"));
                return Ok(super::exit_code(&err));
            }
            Some(Ok(Delivery::Records(records))) => records,
            Some(Ok(Delivery::CaughtUp(_))) => {
                progress.caught_up();
                continue;
            }
            Some(Ok(Delivery::Disconnected { endpoint, cause, retry_in })) => {
                progress.say(&format!("tapeline: lost {endpoint} ({cause}); resuming in {retry_in:.1?}"));
                continue;
            }
            Some(Ok(Delivery::Upstream(u))) => {
                progress.say(&if u.connected {
                    format!("tapeline: the server's upstream {} is connected", u.upstream)
                } else {
                    format!("tapeline: the server's upstream {} is down: {}", u.upstream, u.detail)
                });
                continue;
            }
            Some(Ok(Delivery::Gap(g))) => {
                progress.say(&format!(
                    "tapeline: {}: skipped {} records (ticks {} to {}) to keep up with the live tail",
                    g.stream, g.records, g.from_tick, g.to_tick
                ));
                continue;
            }
            Some(Ok(Delivery::Truncated(t))) => {
                progress.say(&format!(
                    "tapeline: {}: records up to tick {} were removed by retention; continuing from tick {}",
                    t.stream, t.through, t.earliest_available
                ));
                continue;
            }
            Some(Ok(_)) => continue,
        };
        progress.printed(records.len() as u64, records.last().map_or(0, |r| r.tick.0));
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

pub async fn create(args: CreateArgs) -> Result<ExitCode> {
    let credentials = args.server.credentials.read()?;
    greet(&args.server.server, &credentials).await?;
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
        import: args.import,
    };
    let mut client = connect_with(&args.server.server, &credentials).await?;
    let info = client.create_stream(request).await.map_err(|s| remote("create", s))?.into_inner();
    println!("{}", stream_json(&info));
    Ok(ExitCode::SUCCESS)
}

pub async fn delete(args: DeleteArgs) -> Result<ExitCode> {
    let credentials = args.server.credentials.read()?;
    greet(&args.server.server, &credentials).await?;
    let mut client = connect_with(&args.server.server, &credentials).await?;
    let request = pb::DeleteStreamRequest { stream: args.stream };
    let info = client.delete_stream(request).await.map_err(|s| remote("delete", s))?.into_inner();
    println!("{}", stream_json(&info));
    Ok(ExitCode::SUCCESS)
}

pub async fn seal(args: SealArgs) -> Result<ExitCode> {
    let credentials = args.server.credentials.read()?;
    greet(&args.server.server, &credentials).await?;
    let mut client = connect_with(&args.server.server, &credentials).await?;
    let request = pb::SealStreamRequest { stream: args.stream };
    let info = client.seal_stream(request).await.map_err(|s| remote("seal", s))?.into_inner();
    println!("{}", stream_json(&info));
    Ok(ExitCode::SUCCESS)
}

pub async fn streams(args: StreamsArgs) -> Result<ExitCode> {
    let server = &args.server.server;
    let credentials = args.server.credentials.read()?;
    greet(server, &credentials).await?;
    let mut client = connect_with(server, &credentials).await?;
    let list = pb::ListStreamsResponse {
        streams: client::list_streams(&mut client, "").await?,
        next_page_token: String::new(),
    };
    if args.output == "json" {
        let all: Vec<serde_json::Value> = list.streams.iter().map(stream_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return Ok(ExitCode::SUCCESS);
    }
    let width = list
        .streams
        .iter()
        .map(|s| s.name.len() + if s.importing { 12 } else { 0 })
        .max()
        .unwrap_or(4)
        .max(6);
    // A relay also shows where each mirrored stream comes from and how fresh it is.
    let relay = list.streams.iter().any(|s| !s.upstream.is_empty());
    // For people: sizes in binary units and the records' ages; `--output json` stays exact.
    let now = Tick::now();
    let age = |tick: u64| match tick {
        0 => "-".to_string(),
        t => tapeline::types::human_duration(Duration::from_nanos(now.0.saturating_sub(t))) + " ago",
    };
    let mut header = format!(
        "{:<width$}  {:>10}  {:>9}  {:>14}  {:>14}  {:>9}  {:<16}  {}",
        "STREAM", "RECORDS", "SIZE", "FIRST", "LAST", "RECORDS/S", "RETENTION", "TYPE"
    );
    if relay {
        header.push_str("  UPSTREAM  LAG");
    }
    println!("{header}");
    for s in list.streams {
        // A relay's copy keeps its origin's limits unless a rule of the relay overrides them.
        let mut retention = retention_text(&s.effective_retention);
        if !s.upstream.is_empty() && s.retention != s.effective_retention {
            retention.push_str(&format!(" (origin: {})", retention_text(&s.retention)));
        }
        // An import in progress is listed, but no subscriber sees it yet.
        let name = if s.importing { format!("{} (importing)", s.name) } else { s.name.clone() };
        let mut line = format!(
            "{:<width$}  {:>10}  {:>9}  {:>14}  {:>14}  {:>9.1}  {:<16}  {}",
            name,
            s.records,
            tapeline::types::human_bytes(s.bytes),
            age(s.first_tick),
            age(s.last_tick),
            s.records_per_second,
            retention,
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
async fn greet(server: &str, credentials: &Credentials) -> Result<pb::HelloResponse> {
    let mut client = connect_with(server, credentials).await?;
    let hello = pb::HelloRequest {
        protocol_version: tapeline::protocol::PROTOCOL_VERSIONS
            [tapeline::protocol::PROTOCOL_VERSIONS.len() - 1],
        client_name: "tapeline-cli".into(),
        client_version: env!("CARGO_PKG_VERSION").into(),
        client_id: String::new(),
    };
    let answer = client.hello(hello).await.map_err(|s| {
        // A plaintext client at a TLS port sees only a broken transport: say what it likely is.
        use tonic::Code;
        let broken = matches!(s.code(), Code::Unknown | Code::Internal | Code::Unavailable | Code::Cancelled);
        if broken && server.starts_with("http://") {
            let hint = format!("{} (if the server uses TLS, use https://)", s.message());
            return remote("hello", tonic::Status::new(s.code(), hint));
        }
        remote("hello", s)
    })?;
    let answer = answer.into_inner();
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

pub async fn info(args: ServerArg) -> Result<ExitCode> {
    let info = greet(&args.server, &args.credentials.read()?).await?;
    println!("server          {}", args.server);
    println!("server id       {}", info.server_id);
    println!("version         {}", info.server_version);
    println!("protocol        {} (supported: {:?})", info.protocol_version, info.protocol_versions);
    println!("tail tick       {}", info.tail_tick);
    if !info.principal.is_empty() {
        println!("principal       {}", info.principal);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

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
