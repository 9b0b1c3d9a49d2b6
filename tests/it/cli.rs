//! The command line end to end, through the real `tapeline` binary: serve, publish, tail, streams,
//! info, bad input, and shutdown on SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{Serve, BIN};

/// Runs `tapeline ARGS` with `stdin`, returning its output.
fn run(args: &[&str], stdin: &[u8]) -> Output {
    run_with(args, stdin, &[])
}

/// Runs `tapeline ARGS` with `stdin` and the environment variables `env`.
fn run_with(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failed command says one clear line and never panics.
fn assert_one_clear_line(out: &Output, words: &[&str]) {
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for word in words {
        assert!(err.contains(word), "{err:?} lacks {word:?}");
    }
}

#[test]
fn publish_lines_then_tail_them_back_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &[]);
    let url = serve.url.as_str();

    let out = run(&["publish", "sensors/temp", "--server", url], b"21.5\n{\"c\": 22}\r\n\xff\xfe\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("published 3 records to sensors/temp, ticks "),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["publish", "sensors/hum", "--server", url], b"40\n");
    assert!(out.status.success());

    let out = run(&["tail", "sensors/**", "--server", url, "--to", "now"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["stream"], "sensors/temp");
    assert_eq!(lines[0]["payload"], "21.5");
    assert_eq!(lines[1]["payload"], "{\"c\": 22}", "CRLF is stripped, JSON stays a string");
    assert_eq!(lines[2]["payload_base64"], "//4=", "non-UTF-8 payloads are base64");
    assert_eq!(lines[3]["stream"], "sensors/hum");
    let ticks: Vec<u64> = lines.iter().map(|l| l["tick"].as_str().unwrap().parse().unwrap()).collect();
    assert!(ticks.windows(2).all(|w| w[0] < w[1]));

    // --limit, --after, --output raw.
    let out = run(&["tail", "sensors/temp", "--server", url, "--limit", "2", "--output", "raw"], b"");
    assert_eq!(text(&out.stdout), "21.5\n{\"c\": 22}\n");
    let after = ticks[0].to_string();
    let out = run(
        &["tail", "sensors/temp", "--server", url, "--after", &after, "--limit", "1", "--output", "raw"],
        b"",
    );
    assert_eq!(text(&out.stdout), "{\"c\": 22}\n");
    let to = ticks[1].to_string();
    let out = run(
        &["tail", "sensors/temp", "--server", url, "--from", &after, "--to", &to, "--output", "raw"],
        b"",
    );
    assert_eq!(text(&out.stdout), "21.5\n{\"c\": 22}\n");
    let out = run(
        &["tail", "sensors/temp", "--server", url, "--from", "-1h", "--to", "now", "--output", "raw"],
        b"",
    );
    assert_eq!(text(&out.stdout).lines().count(), 3);

    // Already at the tail: nothing more to print, and that is not an error.
    let last = ticks[3].to_string();
    let out = run(&["tail", "sensors/**", "--server", url, "--after", &last, "--to", "now"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    // An end between the last record and now ends by itself although nothing more is published.
    let between = (ticks[3] + 1).to_string();
    let out = run(&["tail", "sensors/**", "--server", url, "--to", &between, "--output", "raw"], b"");
    assert_eq!(text(&out.stdout).lines().count(), 4);

    let out = run(&["streams", "--server", url], b"");
    let table = text(&out.stdout);
    assert!(table.contains("sensors/temp") && table.contains("sensors/hum"), "{table}");
    let out = run(&["info", "--server", url], b"");
    assert!(text(&out.stdout).contains("protocol        1"), "{}", text(&out.stdout));
}

#[test]
fn tail_follows_live_and_serve_shuts_down_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = Serve::start(&data, &[]);
    let url = serve.url.clone();
    let out = run(&["publish", "live", "--server", &url], b"before\n");
    assert!(out.status.success());

    let mut tail = Command::new(BIN)
        .args(["tail", "live", "--server", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tail_out = BufReader::new(tail.stdout.take().unwrap());
    let mut line = String::new();
    tail_out.read_line(&mut line).unwrap();
    assert!(line.contains("\"before\""), "{line}");
    let out = run(&["publish", "live", "--server", &url], b"during\n");
    assert!(out.status.success());
    line.clear();
    tail_out.read_line(&mut line).unwrap();
    assert!(line.contains("\"during\""), "{line}");

    let addr = serve.addr().to_string();
    let (clean, took) = serve.terminate();
    assert!(clean, "serve exits 0 on SIGTERM");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The live tail says, in one line, that it lost the broker and will resume, and keeps going.
    let mut tail_err = BufReader::new(tail.stderr.take().unwrap());
    let mut err = String::new();
    tail_err.read_line(&mut err).unwrap();
    assert!(
        err.contains("Unavailable") && err.contains("shutting down") && err.contains("resuming"),
        "{err}"
    );
    assert!(tail.try_wait().unwrap().is_none(), "the tail keeps running");

    // Restarted where the tail expects it: the tail continues with what follows, nothing twice.
    let serve = Serve::start_at(&data, &addr, &[]);
    let out = run(&["publish", "live", "--server", &serve.url], b"after\n");
    assert!(out.status.success());
    line.clear();
    tail_out.read_line(&mut line).unwrap();
    assert!(line.contains("\"after\""), "{line}");
    tail.kill().unwrap();
    tail.wait().unwrap();

    // Everything acknowledged is there.
    let out = run(&["tail", "live", "--server", &serve.url, "--to", "now", "--output", "raw"], b"");
    assert_eq!(text(&out.stdout), "before\nduring\nafter\n");
}

/// The README's resume example: the last tick seen, taken with `jq -r .tick`, then `--after` it.
/// Ticks are printed as strings because they pass 2^53: read as a JSON number (jq 1.6,
/// JavaScript), a tick is rounded to a multiple of 256, and a resume after it skips or repeats
/// records of a batch, whose ticks are 1 ns apart.
#[test]
fn resuming_after_a_tick_taken_with_jq_gets_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &[]);
    let url = serve.url.as_str();
    let lines: String = (0..1000).map(|i| format!("{i}\n")).collect();
    let out = run(&["publish", "sensors/room1/temp", "--server", url], lines.as_bytes());
    assert!(out.status.success(), "{}", text(&out.stderr));

    let shell = |script: &str| {
        let out = Command::new("sh")
            .args(["-c", script])
            .env(
                "PATH",
                format!("{}:{}", Path::new(BIN).parent().unwrap().display(), std::env::var("PATH").unwrap()),
            )
            .env("TAPELINE_TEST_URL", url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    // As the README says, with a disconnect after 500 records.
    let last = shell(
        "tapeline tail sensors/room1/temp --server \"$TAPELINE_TEST_URL\" --limit 500 | tail -n 1 | jq -r .tick",
    );
    let last = last.trim();
    let rest = shell(&format!(
        "tapeline tail sensors/room1/temp --server \"$TAPELINE_TEST_URL\" --after {last} --to now --output raw"
    ));
    let expected: String = (500..1000).map(|i| format!("{i}\n")).collect();
    assert_eq!(rest, expected, "resuming after {last} gives exactly the rest");

    // Why a string: the same tick read as a number, as jq 1.6 reads one, is another tick.
    let all = shell("tapeline tail sensors/room1/temp --server \"$TAPELINE_TEST_URL\" --to now");
    let ticks: Vec<u64> = all
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["tick"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    let exact = *ticks.iter().skip(500).find(|t| (**t as f64) as u64 != **t).unwrap();
    let rounded = (exact as f64) as u64;
    let seen = ticks.iter().position(|t| *t == exact).unwrap() + 1;
    let after = format!("--after {rounded}");
    let resumed = shell(&format!(
        "tapeline tail sensors/room1/temp --server \"$TAPELINE_TEST_URL\" {after} --to now --output raw"
    ));
    let got = resumed.lines().count();
    assert_ne!(got, 1000 - seen, "a rounded tick ({exact} read as {rounded}) resumes elsewhere");
    eprintln!(
        "after {seen} records, tick {exact} read as a number is {rounded}: {got} records follow it, not {}",
        1000 - seen
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &["--max-record-bytes", "10"]);
    let url = serve.url.as_str();

    let out = run(&["publish", "bad//name", "--server", url], b"x\n");
    assert_one_clear_line(&out, &["invalid stream name", "bad//name"]);
    let out = run(&["publish", "s", "--server", url], b"short\nthis line is over ten bytes\n");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("over the limit of 10 bytes") && !err.contains("panicked"), "{err}");
    let out = run(&["tail", "a/**/b", "--server", url, "--to", "now"], b"");
    assert_one_clear_line(&out, &["invalid pattern", "a/**/b"]);
    let out = run(&["tail", "s", "--server", url, "--from", "yesterday"], b"");
    assert_one_clear_line(&out, &["--from", "yesterday"]);
    let out = run(&["tail", "s", "--server", url, "--after", "100", "--to", "50"], b"");
    assert_one_clear_line(&out, &["--to 50", "before", "--after 100"]);
    let out = run(&["streams", "--server", "http://127.0.0.1:1"], b"");
    assert_one_clear_line(&out, &["127.0.0.1:1"]);

    // A data dir in use by another broker: refused before anything listens.
    let data = dir.path().join("data");
    let out = run(&["serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()], b"");
    assert_one_clear_line(&out, &["cannot open the data dir", "another process holds its lock"]);
    assert_eq!(text(&out.stdout), "", "nothing claims to listen");

    let out = run(&["serve", "--fsync", "sometimes", "--volatile"], b"");
    assert_one_clear_line(&out, &["fsync", "sometimes", "interval=MS"]);
    let busy = serve.url.trim_start_matches("http://").to_string();
    let out = run(&["serve", "--listen", &busy, "--volatile"], b"");
    assert_one_clear_line(&out, &["cannot listen on", &busy]);
}

#[test]
fn volatile_serve_keeps_nothing_on_disk_after_exit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let serve = Serve::spawn(&["serve", "--listen", "127.0.0.1:0", "--volatile"], log);
    let out = run(&["publish", "v", "--server", &serve.url], b"1\n2\n");
    assert!(out.status.success());
    let out = run(&["tail", "v", "--server", &serve.url, "--to", "now", "--output", "raw"], b"");
    assert_eq!(text(&out.stdout), "1\n2\n");
    // The log names the temporary store; it is gone once the broker exited.
    let logged = serve.log();
    let store =
        logged.split("path=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap().to_string();
    assert!(Path::new(&store).exists(), "{store}");
    let (clean, _) = serve.terminate();
    assert!(clean);
    assert!(!Path::new(&store).exists(), "{store} was left behind");
}

#[test]
fn a_settings_file_configures_serve_and_a_bad_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // The printed default file is a valid settings file; edited, it configures the broker.
    let out = run(&["config"], b"");
    assert!(out.status.success());
    let default = text(&out.stdout);
    assert!(default.contains("max_record_bytes = \"4MiB\""), "{default}");
    let data = dir.path().join("data");
    let file = dir.path().join("tapeline.toml");
    let edited = default
        .replace("listen = \"127.0.0.1:7411\"", "listen = \"127.0.0.1:0\"")
        .replace("data = \"tapeline-data\"", &format!("data = {:?}", data.to_str().unwrap()))
        .replace("max_record_bytes = \"4MiB\"", "max_record_bytes = 10");
    std::fs::write(&file, edited).unwrap();
    let serve = Serve::spawn(&["serve", "--config", file.to_str().unwrap()], dir.path().join("serve.log"));
    let out = run(&["publish", "s", "--server", &serve.url], b"this line is over ten bytes\n");
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("over the limit of 10 bytes"), "{err}");
    assert!(data.exists(), "the data dir of the file is used");
    drop(serve);
    // A flag wins over the file.
    let serve = Serve::spawn(
        &["serve", "--config", file.to_str().unwrap(), "--max-record-bytes", "100"],
        dir.path().join("serve.log"),
    );
    let out = run(&["publish", "s", "--server", &serve.url], b"this line is over ten bytes\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop(serve);

    // A mistake names the key, the value and what was expected, in one line, before anything listens.
    std::fs::write(&file, "[limits]\nmax_record_bytes = true\n").unwrap();
    let out = run(&["serve", "--config", file.to_str().unwrap()], b"");
    assert_one_clear_line(&out, &["max_record_bytes", "true", "256MiB"]);
    std::fs::write(&file, "fsnyc = \"always\"\n").unwrap();
    let out = run(&["serve", "--config", file.to_str().unwrap()], b"");
    assert_one_clear_line(&out, &["fsnyc", "unknown field"]);
    std::fs::write(&file, "fsync = \"sometimes\"\n").unwrap();
    let out = run(&["serve", "--config", file.to_str().unwrap()], b"");
    assert_one_clear_line(&out, &["fsync", "sometimes", "interval=MS"]);
}

/// `tail --output json` exports, `publish --input json` imports: streams, payloads (text and
/// binary), headers and origin times come over whole; with `--producer-id` a second run of the
/// same export appends nothing; with `--keep-ticks` into an import the copy has the original's
/// ticks. The server comes from TAPELINE_SERVER as host:port.
#[test]
fn an_exported_stream_imports_whole_and_a_rerun_appends_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Serve::start(&dir.path().join("origin"), &[]);
    let copy = Serve::start(&dir.path().join("copy"), &[]);
    let at = |serve: &Serve, args: &[&str], stdin: &[u8]| {
        let out = run_with(args, stdin, &[("TAPELINE_SERVER", serve.addr())]);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        out
    };
    at(
        &origin,
        &["publish", "plant/oven", "-H", "unit=C", "--header", "site=north"],
        b"180\n181\n\xff\xfe\n",
    );
    at(&origin, &["publish", "plant/press"], b"41.5\n");
    let export = at(&origin, &["tail", "plant/**", "-t", "now"], b"").stdout;
    let lines = |out: &[u8]| -> Vec<serde_json::Value> {
        text(out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let original = lines(&export);
    assert_eq!(original.len(), 4);
    assert_eq!(original[0]["headers"], serde_json::json!({"site": "north", "unit": "C"}));

    let first = at(&copy, &["publish", "--input", "json", "--producer-id", "import-1"], &export);
    assert!(text(&first.stderr).contains("published 4 records"), "{}", text(&first.stderr));
    let again = at(&copy, &["publish", "--input", "json", "--producer-id", "import-1"], &export);
    assert!(
        text(&again.stderr).contains("published 4 records"),
        "acknowledged again: {}",
        text(&again.stderr)
    );
    let copied = lines(&at(&copy, &["tail", "plant/**", "-t", "now"], b"").stdout);
    let without_ticks = |records: &[serde_json::Value]| -> Vec<serde_json::Value> {
        records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut().unwrap().remove("tick");
                r
            })
            .collect()
    };
    assert_eq!(without_ticks(&copied), without_ticks(&original), "the same records, once each");

    // Into an import, keeping the ticks: the copy is the original, tick for tick.
    let same = Serve::start(&dir.path().join("same"), &[]);
    for stream in ["plant/oven", "plant/press"] {
        at(&same, &["create", stream, "--import"], b"");
    }
    at(&same, &["publish", "--input", "json", "--keep-ticks"], &export);
    for stream in ["plant/oven", "plant/press"] {
        at(&same, &["seal", stream], b"");
    }
    assert_eq!(lines(&at(&same, &["tail", "plant/**", "-t", "now"], b"").stdout), original);

    // A line that is not a record is refused naming it, and nothing of its batch is stored.
    let mut child = Command::new(BIN)
        .args(["publish", "--input", "json", "-s", copy.addr()])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"stream\":\"plant/x\",\"payload\":\"ok\"}\n{\"stream\":\"plant/x\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_one_clear_line(&out, &["line 2", "payload"]);
}

/// Exit codes say what went wrong: 2 usage, 3 unreachable, 4 refused by the server, and
/// `completions` prints a script for the shell.
#[test]
fn exit_codes_tell_usage_unreachable_and_refused_apart() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &[]);
    let code = |args: &[&str]| run(args, b"").status.code();
    assert_eq!(code(&["tail", "s", "--no-such-flag"]), Some(2));
    assert_eq!(code(&["streams", "-s", "127.0.0.1:1"]), Some(3));
    assert_eq!(code(&["create", "s", "-s", serve.addr(), "--description", "a"]), Some(0));
    assert_eq!(code(&["create", "s", "-s", serve.addr(), "--description", "b"]), Some(4), "ALREADY_EXISTS");
    let script = run(&["completions", "bash"], b"");
    assert!(script.status.success() && text(&script.stdout).contains("_tapeline()"));
}

/// On a terminal (a pseudo-terminal from `script`), `tail` shows its replay's progress on
/// standard error and one line when it caught up; into a pipe, nothing but the records.
#[test]
fn tail_shows_progress_and_caught_up_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"), &[]);
    let lines: String = (0..20_000).map(|i| format!("{i}\n")).collect();
    assert!(run(&["publish", "big/s", "-s", serve.addr()], lines.as_bytes()).status.success());
    let tail = format!("{BIN} tail 'big/**' -s {} -t now > /dev/null", serve.addr());
    let out =
        Command::new("script").args(["-qec", &tail, "/dev/null"]).output().expect("script (util-linux)");
    let terminal = text(&out.stdout);
    assert!(terminal.contains("caught up: 20000 records replayed in"), "{terminal}");
    let piped = run(&["tail", "big/**", "-s", serve.addr(), "-t", "now"], b"");
    assert_eq!(text(&piped.stdout).lines().count(), 20_000);
    assert_eq!(text(&piped.stderr), "", "nothing but the records when not at a terminal");
}
