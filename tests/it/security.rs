//! Safe on a network: TLS (trust, plaintext refused, expired certificates, reload on SIGHUP),
//! authentication by token or client certificate, the permission matrix, a relay over TLS with a
//! principal of its own, and the refusal to serve a non-loopback address unprotected.

use crate::support::pki::{write_private, Ca, Issued};
use crate::support::*;
use std::collections::HashMap;
use tapeline::client::{self, Client, Credentials};
use tapeline::config::{Access, Grants, Tls, Tokens};
use tapeline::protocol::pb;
use tapeline::types::Pattern;
use tonic::Code;

fn https(addr: impl std::fmt::Display) -> String {
    format!("https://{addr}")
}

fn trusting(ca: &Ca) -> Credentials {
    Credentials { ca: Some(ca.pem.clone().into_bytes()), ..Credentials::default() }
}

fn with_cert(ca: &Ca, issued: &Issued) -> Credentials {
    Credentials {
        identity: Some((std::fs::read(&issued.cert).unwrap(), std::fs::read(&issued.key).unwrap())),
        ..trusting(ca)
    }
}

fn with_token(ca: &Ca, token: &str) -> Credentials {
    Credentials { token: Some(token.to_string()), ..trusting(ca) }
}

/// A client, or why it could not connect or say hello (a handshake refused late, as TLS 1.3
/// does with a client certificate, shows on the first call).
async fn hello(url: &str, credentials: &Credentials) -> Result<(Client, pb::HelloResponse), String> {
    let mut c = client::connect_with(url, credentials).await.map_err(|e| e.to_string())?;
    let answer =
        c.hello(pb::HelloRequest::default()).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok((c, answer.into_inner()))
}

fn tls(server: &Issued, client_ca: Option<&Ca>) -> Option<Tls> {
    Some(Tls { cert: server.cert.clone(), key: server.key.clone(), client_ca: client_ca.map(Ca::cert_path) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_only_clients_that_trust_it_and_speak_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let other = Ca::new(dir.path(), "other");
    let server_cert = ca.issue("server", "localhost", false);
    let server = TestServer::start_with(tapeline::config::Config {
        tls: tls(&server_cert, None),
        ..config(&dir.path().join("data"))
    })
    .await;
    let url = https(server.addr);

    // Trusting its CA: the whole path works over TLS.
    let (mut c, answer) = hello(&url, &trusting(&ca)).await.expect("a client trusting the CA is served");
    assert_eq!(answer.principal, "", "no authentication configured");
    let ticks = publish(&mut c, "s", &["over", "tls"]).await;
    let mut sub =
        Sub::open(&mut c, pb::SubscribeRequest { end: ticks[1], ..request(&["s"], beginning()) }).await;
    assert_eq!(payloads(&sub.until_end().await), ["over", "tls"]);

    // Trusting another CA: refused at the handshake.
    let err = hello(&url, &trusting(&other)).await.expect_err("a client trusting another CA is refused");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // The system's roots do not know the test CA either.
    let err = hello(&url, &Credentials::default()).await.expect_err("unknown issuer");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Plaintext HTTP/2 to the TLS port: no call goes through.
    let plain = format!("http://{}", server.addr);
    let err = hello(&plain, &Credentials::default()).await.expect_err("a plaintext client is refused");
    assert!(!err.is_empty());

    // A CA for a plaintext URL is a mistake the client names.
    let err = hello(&plain, &trusting(&ca)).await.err().unwrap();
    assert!(err.contains("https://"), "{err}");
    server.stop().await;

    // A server whose certificate expired is refused by the client.
    let expired = ca.issue("expired-server", "localhost", true);
    let server = TestServer::start_with(tapeline::config::Config {
        tls: tls(&expired, None),
        ..config(&dir.path().join("data2"))
    })
    .await;
    let err =
        hello(&https(server.addr), &trusting(&ca)).await.expect_err("an expired certificate is refused");
    assert!(err.to_lowercase().contains("expired"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_or_token_file_others_can_read_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server_cert = ca.issue("server", "localhost", false);
    std::fs::set_permissions(&server_cert.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let settings =
        tapeline::config::Config { tls: tls(&server_cert, None), ..config(&dir.path().join("data")) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tapeline::server::run(settings, listener, async {}).await.unwrap_err().to_string();
    assert!(err.contains("644") && err.contains("chmod 600") && err.contains("server.key"), "{err}");

    let tokens = dir.path().join("tokens");
    Tokens::create(&tokens, "a").unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o640)).unwrap();
    Tokens::load(&tokens).expect("readable by its group is allowed");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o604)).unwrap();
    let settings = tapeline::config::Config {
        access: Access { tokens: Some(tokens.clone()), principals: HashMap::new() },
        ..config(&dir.path().join("data3"))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tapeline::server::run(settings, listener, async {}).await.unwrap_err().to_string();
    assert!(err.contains("token file") && err.contains("604") && err.contains("chmod 600"), "{err}");
}

/// What a principal may do in the matrix: one of the three permissions, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Publish,
    Subscribe,
    Admin,
    Nothing,
}

struct Who {
    name: String,
    grant: Grant,
    credentials: Credentials,
}

/// The expected outcome of an action: allowed, denied, or not authenticated.
fn expected(who: Option<&Who>, allowed: &[Grant]) -> Code {
    match who {
        None => Code::Unauthenticated,
        Some(w) if allowed.contains(&w.grant) => Code::Ok,
        Some(_) => Code::PermissionDenied,
    }
}

fn code<T>(result: &Result<T, tonic::Status>) -> Code {
    result.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permission_matrix_holds_for_tokens_client_certificates_and_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let clients_ca = Ca::new(dir.path(), "clients");
    let server_cert = ca.issue("server", "localhost", false);
    let tokens = dir.path().join("tokens");
    let everything = vec![Pattern::parse("p/**").unwrap()];
    let mut principals = HashMap::new();
    let mut people = Vec::new();
    for (grant, suffix) in [
        (Grant::Publish, "publish"),
        (Grant::Subscribe, "subscribe"),
        (Grant::Admin, "admin"),
        (Grant::Nothing, "nothing"),
    ] {
        let grants = match grant {
            Grant::Publish => Grants { publish: everything.clone(), ..Grants::default() },
            Grant::Subscribe => Grants { subscribe: everything.clone(), ..Grants::default() },
            Grant::Admin => Grants { admin: everything.clone(), ..Grants::default() },
            // Permissions on other streams only.
            Grant::Nothing => Grants {
                publish: vec![Pattern::parse("q/**").unwrap()],
                subscribe: vec![Pattern::parse("q/**").unwrap()],
                admin: vec![Pattern::parse("q/**").unwrap()],
            },
        };
        let token_name = format!("tok-{suffix}");
        let token = Tokens::create(&tokens, &token_name).unwrap();
        principals.insert(token_name.clone(), grants.clone());
        people.push(Who { name: token_name, grant, credentials: with_token(&ca, &token) });
        let cert_name = format!("cert-{suffix}");
        let issued = clients_ca.issue(&cert_name, &cert_name, false);
        principals.insert(cert_name.clone(), grants);
        people.push(Who { name: cert_name, grant, credentials: with_cert(&ca, &issued) });
    }
    // A valid token whose principal has no table at all: known, allowed nothing.
    let stranger = Tokens::create(&tokens, "tok-stranger").unwrap();
    people.push(Who {
        name: "tok-stranger".into(),
        grant: Grant::Nothing,
        credentials: with_token(&ca, &stranger),
    });
    let server = TestServer::start_with(tapeline::config::Config {
        tls: tls(&server_cert, Some(&clients_ca)),
        access: Access { tokens: Some(tokens.clone()), principals },
        ..config(&dir.path().join("data"))
    })
    .await;
    let url = https(server.addr);
    let publisher = &people[0].credentials;
    let admin = &people[4].credentials;
    let (mut owner, _) = hello(&url, publisher).await.unwrap();
    let first = publish(&mut owner, "p/s", &["kept"]).await[0];

    let anonymous = trusting(&ca);
    let mut cases: Vec<Option<&Who>> = people.iter().map(Some).collect();
    cases.push(None);
    let mut checked = 0;
    for who in cases {
        let creds = who.map_or(&anonymous, |w| &w.credentials);
        let label = who.map_or("anonymous".to_string(), |w| w.name.clone());
        let mut c = client::connect_with(&url, creds).await.unwrap_or_else(|e| panic!("{label}: {e}"));
        let check = |action: &str, got: Code, want: Code| {
            assert_eq!(got, want, "{label}: {action}");
        };

        // Hello: any authenticated principal, bound to its name.
        let answer = c.hello(pb::HelloRequest::default()).await;
        check("hello", code(&answer), if who.is_some() { Code::Ok } else { Code::Unauthenticated });
        if let (Ok(answer), Some(w)) = (answer, who) {
            assert_eq!(answer.into_inner().principal, w.name);
        }

        // Publish, unary and streamed.
        let batch =
            pb::PublishRequest { records: vec![record("p/s", format!("by {label}"))], ..Default::default() };
        let unary = c.publish(batch.clone()).await;
        check("publish", code(&unary), expected(who, &[Grant::Publish]));
        if let Err(status) = &unary {
            if status.code() == Code::PermissionDenied {
                let m = status.message();
                assert!(m.contains(&label) && m.contains("publish") && m.contains("p/s"), "{m}");
            }
        }
        let streamed = c.publish_stream(futures::stream::iter([batch])).await;
        let acked = match streamed {
            Ok(acks) => {
                let ack = acks.into_inner().message().await.expect("an ack").expect("an ack");
                ack.error.map_or(Code::Ok, |e| Code::from(e.code))
            }
            Err(status) => status.code(),
        };
        check("publish stream", acked, expected(who, &[Grant::Publish]));

        // Subscribe to the stream by name: refused unless readable.
        let exact = c.subscribe(pb::SubscribeRequest { end: first, ..request(&["p/s"], beginning()) }).await;
        check("subscribe by name", code(&exact), expected(who, &[Grant::Subscribe]));
        if let Ok(response) = exact {
            let mut sub = Sub { stream: response.into_inner() };
            assert_eq!(payloads(&sub.until_end().await), ["kept"]);
        }
        // Subscribe by pattern: allowed, and silently only what it may read.
        let by_pattern =
            c.subscribe(pb::SubscribeRequest { end: first, ..request(&["**"], beginning()) }).await;
        check(
            "subscribe by pattern",
            code(&by_pattern),
            expected(who, &[Grant::Subscribe, Grant::Publish, Grant::Admin, Grant::Nothing]),
        );
        if let Ok(response) = by_pattern {
            let mut sub = Sub { stream: response.into_inner() };
            let seen = payloads(&sub.until_end().await);
            let want: &[&str] =
                if who.is_some_and(|w| w.grant == Grant::Subscribe) { &["kept"] } else { &[] };
            assert_eq!(seen, want, "{label}: subscribe by pattern");
        }

        // List and describe: what it may read or administer.
        let listed = c.list_streams(pb::ListStreamsRequest::default()).await;
        check(
            "list",
            code(&listed),
            expected(who, &[Grant::Subscribe, Grant::Publish, Grant::Admin, Grant::Nothing]),
        );
        if let Ok(listed) = listed {
            let names: Vec<String> = listed.into_inner().streams.into_iter().map(|s| s.name).collect();
            let sees = who.is_some_and(|w| matches!(w.grant, Grant::Subscribe | Grant::Admin));
            if sees {
                assert!(
                    names.contains(&"p/s".to_string()) && names.iter().all(|n| n.starts_with("p/")),
                    "{label}: {names:?}"
                );
            } else {
                assert!(names.is_empty(), "{label} may read or administer nothing here: {names:?}");
            }
        }
        let described = c.describe_stream(pb::DescribeStreamRequest { stream: "p/s".into() }).await;
        check("describe", code(&described), expected(who, &[Grant::Subscribe, Grant::Admin]));

        // Create, seal, delete: admin.
        let create =
            |stream: String, import: bool| pb::CreateStreamRequest { stream, import, ..Default::default() };
        let created = c.create_stream(create(format!("p/new-{label}"), false)).await;
        check("create", code(&created), expected(who, &[Grant::Admin]));
        let update = pb::CreateStreamRequest {
            stream: "p/s".into(),
            update: true,
            description: "mine".into(),
            ..Default::default()
        };
        check("update", code(&c.create_stream(update).await), expected(who, &[Grant::Admin]));
        let importing = format!("p/import-{label}");
        let (mut adm, _) = hello(&url, admin).await.unwrap();
        adm.create_stream(create(importing.clone(), true)).await.unwrap();
        let sealed = c.seal_stream(pb::SealStreamRequest { stream: importing }).await;
        check("seal", code(&sealed), expected(who, &[Grant::Admin]));
        let doomed = format!("p/doomed-{label}");
        adm.create_stream(create(doomed.clone(), false)).await.unwrap();
        let deleted = c.delete_stream(pb::DeleteStreamRequest { stream: doomed }).await;
        check("delete", code(&deleted), expected(who, &[Grant::Admin]));
        checked += 1;
    }
    assert_eq!(checked, 10);

    // An unknown token, and a client certificate of another CA, are refused.
    let err = hello(&url, &with_token(&ca, "tlt_not-a-token")).await.err().unwrap();
    assert!(err.starts_with("Unauthenticated") && err.contains("not known"), "{err}");
    let foreign = Ca::new(dir.path(), "foreign").issue("foreign", "tok-admin", false);
    assert!(hello(&url, &with_cert(&ca, &foreign)).await.is_err(), "a certificate of another CA");
    let expired = clients_ca.issue("expired-client", "cert-admin", true);
    assert!(hello(&url, &with_cert(&ca, &expired)).await.is_err(), "an expired client certificate");

    // What was stored survived every refusal: one record by the publishers, their own.
    let (mut reader, _) = hello(&url, &people[2].credentials).await.unwrap();
    let tail = reader.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    let mut all =
        Sub::open(&mut reader, pb::SubscribeRequest { end: tail, ..request(&["p/s"], beginning()) }).await;
    let stored = payloads(&all.until_end().await);
    assert_eq!(stored, ["kept", "by tok-publish", "by tok-publish", "by cert-publish", "by cert-publish"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_copies_over_tls_as_its_own_principal_only_what_it_may_read() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let clients = Ca::new(dir.path(), "clients");
    let origin_cert = ca.issue("origin", "localhost", false);
    let relay_cert = clients.issue("relay", "relay-east", false);
    let tokens = dir.path().join("tokens");
    let producer = Tokens::create(&tokens, "producer").unwrap();
    let origin_settings = dir.path().join("origin.toml");
    write_private(
        &origin_settings,
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n[auth]\ntokens = {:?}\n\
             [[auth.principal]]\nname = \"producer\"\npublish = [\"**\"]\nsubscribe = [\"**\"]\n\
             [[auth.principal]]\nname = \"relay-east\"\nsubscribe = [\"s/**\"]\n",
            origin_cert.cert,
            origin_cert.key,
            clients.cert_path(),
            tokens
        ),
    );
    let origin = Serve::start(&dir.path().join("origin"), &["--config", origin_settings.to_str().unwrap()]);
    let origin_url = https(origin.addr());
    let (mut c, _) = hello(&origin_url, &with_token(&ca, &producer)).await.unwrap();
    publish(&mut c, "s/a", &["one"]).await;
    publish(&mut c, "t/b", &["secret"]).await;

    let relay = Serve::start(
        &dir.path().join("relay"),
        &[
            "--upstream",
            &origin_url,
            "--mirror",
            "**",
            "--upstream-ca",
            ca.cert_path().to_str().unwrap(),
            "--upstream-cert",
            relay_cert.cert.to_str().unwrap(),
            "--upstream-key",
            relay_cert.key.to_str().unwrap(),
        ],
    );
    let mut r = client(&relay.url).await;
    let ticks = publish(&mut c, "s/a", &["two"]).await;
    let mut sub = Sub::open(&mut r, request(&["**"], beginning())).await;
    let seen = sub.take_records(2).await;
    assert_eq!(
        records(&seen).iter().map(|(s, _, p)| format!("{s}:{p}")).collect::<Vec<_>>(),
        ["s/a:one", "s/a:two"]
    );
    assert_eq!(records(&seen)[1].1, ticks[0], "ticks kept");
    let names: Vec<String> = stored_streams(&mut r).await.into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s/a"], "t/b is not readable by the relay's principal");
    assert!(origin.log().contains("relay-east"), "the origin logs the relay's principal:\n{}", origin.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_other_hosts_unprotected_is_refused_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("refused.log");
    let err = Serve::try_spawn(&["serve", "--listen", "0.0.0.0:0", "--volatile"], log).expect_err("refused");
    assert!(
        err.contains("refusing to start") && err.contains("--insecure") && err.contains("--tls-cert"),
        "{err}"
    );
    // TLS alone is not enough: anyone could still publish and delete.
    let ca = Ca::new(dir.path(), "ca");
    let cert = ca.issue("server", "localhost", false);
    let (c, k) = (cert.cert.to_str().unwrap(), cert.key.to_str().unwrap());
    let log = dir.path().join("tls-only.log");
    let err = Serve::try_spawn(
        &["serve", "--listen", "0.0.0.0:0", "--volatile", "--tls-cert", c, "--tls-key", k],
        log,
    )
    .expect_err("refused");
    assert!(err.contains("refusing to start"), "{err}");
    // Knowingly open, or protected: it starts.
    let open = Serve::spawn(
        &["serve", "--listen", "0.0.0.0:0", "--volatile", "--insecure"],
        dir.path().join("open.log"),
    );
    drop(open);
    let client_ca = ca.cert_path();
    let protected = Serve::spawn(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--volatile",
            "--tls-cert",
            c,
            "--tls-key",
            k,
            "--tls-client-ca",
            client_ca.to_str().unwrap(),
        ],
        dir.path().join("protected.log"),
    );
    drop(protected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_tokens_without_dropping_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new(dir.path(), "old");
    let new_ca = Ca::new(dir.path(), "new");
    let old = old_ca.issue("old-server", "localhost", false);
    let new = new_ca.issue("new-server", "localhost", false);
    let live_cert = dir.path().join("server.pem");
    let live_key = dir.path().join("server.key");
    let install = |issued: &Issued| {
        std::fs::copy(&issued.cert, &live_cert).unwrap();
        write_private(&live_key, &std::fs::read_to_string(&issued.key).unwrap());
    };
    install(&old);
    let tokens = dir.path().join("tokens");
    let first = Tokens::create(&tokens, "app").unwrap();
    let settings_path = dir.path().join("settings.toml");
    write_private(
        &settings_path,
        &format!(
            "[tls]\ncert = {live_cert:?}\nkey = {live_key:?}\n[auth]\ntokens = {tokens:?}\n\
             [[auth.principal]]\nname = \"app\"\npublish = [\"**\"]\nsubscribe = [\"**\"]\n\
             [[auth.principal]]\nname = \"app2\"\npublish = [\"**\"]\n"
        ),
    );
    let serve = Serve::start(&dir.path().join("data"), &["--config", settings_path.to_str().unwrap()]);
    let url = https(serve.addr());
    let (mut c, _) = hello(&url, &with_token(&old_ca, &first)).await.unwrap();
    let mut sub = Sub::open(&mut c, request(&["s"], now())).await;

    install(&new);
    let second = Tokens::create(&tokens, "app2").unwrap();
    let pid = serve.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let reloaded = tokio::time::timeout(WAIT, async {
        while !serve.log().contains("TLS certificate reloaded") || !serve.log().contains("tokens reloaded") {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reloaded.is_ok(), "no reload logged:\n{}", serve.log());

    // New connections get the new certificate; the new token is known.
    let err = hello(&url, &with_token(&old_ca, &first)).await.expect_err("the old CA no longer verifies it");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let (mut fresh, answer) =
        hello(&url, &with_token(&new_ca, &second)).await.expect("the new token over the new certificate");
    assert_eq!(answer.principal, "app2");
    // The subscriber connected before the reload still gets what is published after it.
    publish(&mut fresh, "s", &["after reload"]).await;
    assert_eq!(payloads(&sub.take_records(1).await), ["after reload"]);

    // A broken file on reload keeps the previous one.
    std::fs::write(&live_cert, "not a certificate").unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let kept = tokio::time::timeout(WAIT, async {
        while !serve.log().contains("the previous one stays") {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(kept.is_ok(), "{}", serve.log());
    hello(&url, &with_token(&new_ca, &second)).await.expect("still served with the certificate read before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_tokens_and_uses_them_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server_cert = ca.issue("server", "localhost", false);
    let tokens = dir.path().join("tokens");
    let made = std::process::Command::new(BIN)
        .args(["token", "create", "ops", "--tokens", tokens.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let token = String::from_utf8(made.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("tlt_"), "{token}");
    assert!(String::from_utf8_lossy(&made.stderr).contains("only this once"));
    let settings_path = dir.path().join("settings.toml");
    write_private(
        &settings_path,
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n[auth]\ntokens = {tokens:?}\n[[auth.principal]]\nname = \"ops\"\nadmin = [\"**\"]\nsubscribe = [\"**\"]\n",
            server_cert.cert, server_cert.key
        ),
    );
    let serve = Serve::start(&dir.path().join("data"), &["--config", settings_path.to_str().unwrap()]);
    let url = https(serve.addr());
    let cli = |args: &[&str], token: Option<&str>| {
        let mut command = std::process::Command::new(BIN);
        command.args(args).args(["--server", &url, "--ca", ca.cert_path().to_str().unwrap()]);
        command.env_remove("TAPELINE_TOKEN");
        if let Some(token) = token {
            command.env("TAPELINE_TOKEN", token);
        }
        command.output().unwrap()
    };
    let info = cli(&["info"], Some(&token));
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    assert!(String::from_utf8_lossy(&info.stdout).contains("principal       ops"));
    let created = cli(&["create", "x/y"], Some(&token));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let refused = cli(&["create", "x/z"], None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Unauthenticated") && stderr.contains("TAPELINE_TOKEN"), "{stderr}");
    // A plaintext URL for a TLS server: the error says what is likely wrong.
    let plain = url.replace("https://", "http://");
    let wrong = std::process::Command::new(BIN).args(["info", "--server", &plain]).output().unwrap();
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("use https://"), "{stderr}");
}
