//! Observing pinproxy: the `pins` command lists identities by exit and
//! hashed credential (never a raw value); the metrics answer which exit and
//! which site burn identities, with bounded labels and no secret in them;
//! the access log (text or JSON) has one line per request with names and
//! hashes only, and can be turned off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::procs::{Lines, PinproxyProcess};
use support::{admin, Jar, Origin, ProxyClient, Setup, TestExit, TestExitSpec};

/// Values that must never show up in metrics or logs.
const EXIT_PASSWORD: &str = "ExitPassw0rd-4412";
const COOKIE_VALUES: [&str; 4] = [
    "DdValueAlpha-9f1e",
    "DdValueBravo-27c4",
    "DdValueCharlie-b1a0",
    "ClearanceDelta-6e3d",
];

#[tokio::test]
async fn identities_are_listed_by_the_pins_command_and_counted_in_metrics() {
    let s = Setup::builder().exits(2).start().await;
    let (jar, peer) = s.login("/login").await;
    let admin = s.proxy.daemon.admin_addr().unwrap();
    let bin = env!("CARGO_BIN_EXE_pinproxy");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["pins", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8(output.stdout).unwrap();
    let exit = format!("exit{}", s.exit_of(peer) + 1);
    assert!(
        table.contains(&exit) && table.contains("datadome#"),
        "{table}"
    );
    assert!(
        !table.contains(jar.get("datadome").unwrap()),
        "raw cookie value in the listing"
    );

    let json = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["pins", "--json", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let line = String::from_utf8(json.stdout).unwrap();
    let view: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(view["exit"], exit);
    assert_eq!(view["requests"], 1);

    let metrics = s.proxy.daemon.admin().metrics.encode();
    let created =
        format!("pinproxy_identities_created_total{{exit=\"{exit}\",reason=\"set-cookie\"}} 1");
    assert!(metrics.contains(&created), "{metrics}");
    s.stop().await;
}

/// What the store holds is counted for capacity planning: every value an
/// origin reissues is one more pin of its identity, and a retired
/// identity's pins stay, remembered, until `remember_retired` is over.
#[tokio::test]
async fn the_store_is_counted_by_the_state_of_its_identities() {
    let s = Setup::builder().exits(1).start().await;
    let (mut jar, _) = s.login("/login").await;
    for _ in 0..2 {
        assert_eq!(s.get("/rotate", &mut jar).await.status, 200);
    }
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let text = admin::get(addr, "/metrics").await;
    for (series, count) in [
        ("pinproxy_store_pins{state=\"active\"}", 3.0),
        ("pinproxy_store_pins{state=\"retired\"}", 0.0),
        ("pinproxy_store_identities{state=\"active\"}", 1.0),
        ("pinproxy_store_identities{state=\"retired\"}", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(count), "{series} in\n{text}");
    }

    // An invalidation retires the identity with its three values. The
    // listing is retaken at most every 2 s: wait (bounded) for one that
    // has the retirement.
    assert_eq!(s.get("/challenge", &mut jar).await.status, 403);
    let held =
        |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["held"].clone();
    let mut store = held(&admin::get(addr, "/store").await);
    for _ in 0..100 {
        if store["retired_identities"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        store = held(&admin::get(addr, "/store").await);
    }
    assert_eq!(
        store,
        serde_json::json!({
            "active_pins": 0,
            "retired_pins": 3,
            "active_identities": 0,
            "retired_identities": 1,
        })
    );
    let text = admin::get(addr, "/metrics").await;
    assert_eq!(
        sample(&text, "pinproxy_store_pins{state=\"retired\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pinproxy_store_identities{state=\"active\"}"),
        Some(0.0),
        "{text}"
    );
    s.stop().await;
}

/// The value of the sample `series` (name and labels exactly as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Asserts the sample `series` is present and at least `min`.
fn assert_at_least(text: &str, series: &str, min: f64) {
    match sample(text, series) {
        Some(v) if v >= min => {}
        other => panic!("{series} is {other:?}, expected at least {min}, in\n{text}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_which_exit_and_site_burn_identities_without_secrets() {
    let s = Setup::builder()
        .exit(TestExitSpec::with_auth(
            "127.0.0.2",
            &format!("exituser:{EXIT_PASSWORD}"),
        ))
        .exits(1)
        .config(|c| c.metrics.max_sites = 2)
        .start()
        .await;
    let https = s.origin.https.port();
    let client = &s.proxy.client;

    // Four new identities from request cookies; rotation spreads them over
    // both exits. Site 1: localhost.
    let mut jars = Vec::new();
    for (n, value) in COOKIE_VALUES.iter().enumerate() {
        let mut jar = Jar::default();
        let name = if n == 3 { "cf_clearance" } else { "datadome" };
        jar.set(name, value);
        let reply = s.get("/page", &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        jars.push(jar);
    }
    // Pin hits, and answers of every class.
    for path in ["/page", "/status?code=302", "/status?code=404"] {
        s.get(path, &mut jars[0]).await;
    }
    // Site 2, plain HTTP, rotated: labelled by its registrable domain.
    let mut plain = client
        .plain("www.shop.example.co.uk", s.origin.http.port())
        .await;
    assert_eq!(plain.get("/page?q=secret-query", &[]).await.status, 200);
    // Site 3 is beyond max_sites = 2: it folds into `other`.
    let mut third = client.tunnel("origin.test", https).await;
    assert_eq!(third.get("/page", &[]).await.status, 200);
    // An invalidation retires identity 1; its cookie is then refused.
    let challenge = s.get("/challenge", &mut jars[1]).await;
    assert_eq!(challenge.status, 403);
    let retired = s.get("/page", &mut jars[1]).await;
    assert_eq!(retired.status, 502, "{}", retired.body);
    // Cookies of two identities in one request: a conflict.
    let mut both = Jar::default();
    both.set("datadome", COOKIE_VALUES[2]);
    both.set("cf_clearance", COOKIE_VALUES[3]);
    assert_eq!(s.get("/page", &mut both).await.status, 409);

    // The invalidation's retirement is stored in the background, and
    // counted just after the store has it: wait (bounded) for the count,
    // not for the store (a scrape between the two missed it once).
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let retired_counted = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("pinproxy_identities_retired_total{")
                && l.contains("reason=\"invalidated\"}")
        })
    };
    let mut text = admin::get(addr, "/metrics").await;
    for _ in 0..100 {
        if retired_counted(&text) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = admin::get(addr, "/metrics").await;
    }

    for exit in ["exit1", "exit2"] {
        assert_at_least(
            &text,
            &format!(
                "pinproxy_exit_requests_total{{exit=\"{exit}\",site=\"localhost\",status=\"2xx\"}}"
            ),
            1.0,
        );
        assert_at_least(
            &text,
            &format!("pinproxy_identities_created_total{{exit=\"{exit}\",reason=\"request\"}}"),
            1.0,
        );
        assert_at_least(
            &text,
            &format!("pinproxy_pin_decisions_total{{exit=\"{exit}\",decision=\"new\"}}"),
            1.0,
        );
        assert_at_least(
            &text,
            &format!("pinproxy_identities_alive{{exit=\"{exit}\"}}"),
            1.0,
        );
        assert_at_least(
            &text,
            &format!("pinproxy_upstream_connect_seconds_count{{exit=\"{exit}\"}}"),
            1.0,
        );
        assert_at_least(
            &text,
            &format!("pinproxy_upstream_tls_handshake_seconds_count{{exit=\"{exit}\"}}"),
            1.0,
        );
        assert_at_least(
            &text,
            &format!("pinproxy_upstream_ttfb_seconds_count{{exit=\"{exit}\"}}"),
            1.0,
        );
    }
    let alive: f64 = ["exit1", "exit2"]
        .iter()
        .map(|e| sample(&text, &format!("pinproxy_identities_alive{{exit=\"{e}\"}}")).unwrap())
        .sum();
    assert_eq!(alive, 3.0, "four identities, one invalidated:\n{text}");
    for series in [
        "status=\"3xx\"}",
        "status=\"4xx\"}",
        "site=\"example.co.uk\",status=\"2xx\"}",
        "site=\"other\",status=\"2xx\"}",
        "exit=\"none\",site=\"localhost\",status=\"pinproxy-error\"}",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("pinproxy_exit_requests_total{") && l.contains(series)),
            "no request series with {series} in\n{text}"
        );
    }
    for decision in ["hit", "rotated", "retired"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("pinproxy_pin_decisions_total{")
                    && l.contains(&format!("decision=\"{decision}\""))),
            "no {decision} decision in\n{text}"
        );
    }
    assert_at_least(
        &text,
        "pinproxy_pin_decisions_total{exit=\"none\",decision=\"conflict\"}",
        1.0,
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("pinproxy_invalidations_total{")
                && l.contains("site=\"localhost\",rule=\"datadome-challenge\"}")),
        "{text}"
    );
    assert!(retired_counted(&text), "{text}");
    assert_at_least(&text, "pinproxy_cert_mint_seconds_count", 2.0);
    assert_at_least(&text, "pinproxy_cert_cache_entries", 2.0);
    assert_at_least(
        &text,
        "pinproxy_store_op_seconds_count{store=\"embedded\",op=\"lookup\"}",
        1.0,
    );
    assert_at_least(
        &text,
        "pinproxy_store_op_seconds_count{store=\"embedded\",op=\"found-identity\"}",
        1.0,
    );

    // Bounded and clean: no third site, no host beyond its registrable
    // domain, no path or query, no URL, no cookie value, no credential.
    for forbidden in COOKIE_VALUES.iter().copied().chain([
        EXIT_PASSWORD,
        "exituser",
        "origin.test",
        "www.shop",
        "/page",
        "secret-query",
        "/challenge",
        "://",
    ]) {
        assert!(
            !text.contains(forbidden),
            "{forbidden:?} in the metrics:\n{text}"
        );
    }
    s.stop().await;
}

/// The access lines among `lines` (JSON objects with the access target).
fn access_lines(lines: &Lines) -> Vec<serde_json::Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "pinproxy::access")
        .collect()
}

/// Waits (bounded) until `check` holds for the lines printed so far.
async fn wait_for_lines(lines: &Lines, what: &str, check: impl Fn(&[String]) -> bool) {
    for _ in 0..200 {
        if check(&lines.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: {:#?}", lines.lock().unwrap());
}

/// Starts the real binary with two exits (one with a password) and
/// `extra` flags, logging at info into the returned lines.
async fn logging_proxy(
    origin: &Origin,
    extra: &[&str],
) -> (PinproxyProcess, Lines, [TestExit; 2], tempfile::TempDir) {
    let guarded =
        TestExit::start_with_auth("127.0.0.2", Some(&format!("exituser:{EXIT_PASSWORD}"))).await;
    let open = TestExit::start("127.0.0.3").await;
    let mut args = support::process_args(
        origin,
        &[
            (
                "guarded".to_owned(),
                format!("http://exituser:{EXIT_PASSWORD}@{}", guarded.addr),
            ),
            ("open".to_owned(), open.url()),
        ],
    );
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let data_dir = tempfile::tempdir().unwrap();
    let lines: Lines = Default::default();
    let proxy =
        PinproxyProcess::start_logging(data_dir.path(), &args, "info", Some(lines.clone())).await;
    (proxy, lines, [guarded, open], data_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_and_hold_names_and_hashes_only() {
    let origin = Origin::start().await;
    let (proxy, lines, _exits, _dir) = logging_proxy(&origin, &["--log-format", "json"]).await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let https = origin.https.port();

    // A new identity, then a pin hit on it, then a cookie-less request.
    let mut jar = Jar::default();
    jar.set("datadome", COOKIE_VALUES[0]);
    for _ in 0..2 {
        let mut conn = client.tunnel("localhost", https).await;
        assert_eq!(
            conn.get_with_jar("/page?token=q1", &mut jar).await.status,
            200
        );
    }
    let mut conn = client.tunnel("localhost", https).await;
    assert_eq!(conn.get("/status?code=404", &[]).await.status, 404);
    wait_for_lines(&lines, "three access lines", |lines| {
        lines
            .iter()
            .filter(|l| l.contains("pinproxy::access"))
            .count()
            >= 3
    })
    .await;

    // Every line is JSON (but the start-up banner, printed before logging).
    for line in lines.lock().unwrap().iter() {
        let banner = line.starts_with("pinproxy listening on") || line.starts_with("  ");
        assert!(
            banner || serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
        for forbidden in [COOKIE_VALUES[0], EXIT_PASSWORD, "token=q1"] {
            assert!(!line.contains(forbidden), "{forbidden:?} logged: {line}");
        }
    }
    let access = access_lines(&lines);
    let decisions: Vec<&str> = access
        .iter()
        .map(|l| l["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["new", "hit", "rotated"], "{access:#?}");
    let first = &access[0];
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["status"], 200);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["origin"], format!("localhost:{https}"));
    assert_eq!(first["site"], "localhost");
    assert_eq!(first["cookies"], "datadome");
    assert!(
        first["exit"] == "guarded" || first["exit"] == "open",
        "{first}"
    );
    assert_eq!(
        first["identity"], access[1]["identity"],
        "the hit is the same identity"
    );
    assert!(first["identity"].as_str().is_some_and(|i| !i.is_empty()));
    for field in ["total_ms", "connect_ms", "tls_ms", "ttfb_ms"] {
        assert!(first[field].as_f64().is_some(), "{field} in {first}");
    }
    // The hit went on the first request's pooled connection: no connect
    // or TLS time of its own.
    assert!(
        access[1].get("connect_ms").is_none() && access[1].get("tls_ms").is_none(),
        "{}",
        access[1]
    );
    assert!(access[1]["ttfb_ms"].as_f64().is_some(), "{}", access[1]);
    let third = &access[2];
    assert_eq!(third["status"], 404);
    assert!(
        third.get("identity").is_none() && third.get("cookies").is_none(),
        "{third}"
    );
    // The identity founded by the request is reported as new, at info.
    assert!(lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("\"new identity\"") && l.contains("datadome#")));
}

/// Sends `GET path` (with a tracked cookie) over HTTP/1.1 in a tunnel to
/// `origin`, waits until it has arrived there, and closes the connection
/// before the answer.
async fn leave_before_the_answer(client: &ProxyClient, ca_pem: &str, origin: &Origin, path: &str) {
    let https = origin.https.port();
    let (tcp, head) = client.raw_connect(&format!("localhost:{https}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let config = support::client::trusting(ca_pem);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{https}\r\nCookie: datadome={}\r\n\r\n",
        COOKIE_VALUES[0]
    );
    tokio::io::AsyncWriteExt::write_all(&mut tls, request.as_bytes())
        .await
        .unwrap();
    origin.wait_for(path).await;
    drop(tls);
}

/// A request whose client left is counted as such, in a status class of
/// its own: not as one of pinproxy's errors on its exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_left_is_counted_apart_from_pinproxys_errors() {
    let s = Setup::builder().exits(1).start().await;
    let ca = s.proxy.daemon.ca_cert_pem().to_owned();
    leave_before_the_answer(&s.proxy.client, &ca, &s.origin, "/held?counted").await;
    let counted = |metrics: &str| {
        metrics.contains("pinproxy_requests_total{outcome=\"client-gone\"} 1")
            && metrics.lines().any(|l| {
                l.starts_with("pinproxy_exit_requests_total{")
                    && l.contains("status=\"client-gone\"")
                    && l.ends_with(" 1")
            })
    };
    // Counted as the request's future is dropped, after the close reaches
    // pinproxy: bounded wait (10 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut metrics = s.proxy.daemon.admin().metrics.encode();
    while !counted(&metrics) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = s.proxy.daemon.admin().metrics.encode();
    }
    assert!(counted(&metrics), "{metrics}");
    assert!(!metrics.contains("status=\"pinproxy-error\""), "{metrics}");
    s.stop().await;
}

/// A request whose client leaves before the answer (a closed connection
/// over HTTP/1.1, a reset stream over HTTP/2) still gets its access line:
/// status 499, error `client-gone`, its exit and cookie names as far as
/// they were known. Without it, a scraper's own timeouts left no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_left_before_the_answer_is_logged_as_client_gone() {
    let origin = Origin::start().await;
    let (proxy, lines, _exits, _dir) = logging_proxy(&origin, &["--log-format", "json"]).await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let https = origin.https.port();

    // HTTP/1.1: the request reaches the origin, which holds its answer;
    // the client closes its connection.
    leave_before_the_answer(&client, &proxy.ca_pem(), &origin, "/held?via=h1").await;

    // HTTP/2: the client resets the stream.
    let mut h2 = client.tunnel_h2("localhost", https).await;
    let request = http::Request::get(format!("https://localhost:{https}/held?via=h2"))
        .body(http_body_util::Full::default())
        .unwrap();
    let pending = h2.sender().send_request(request);
    let pending = tokio::spawn(pending);
    origin.wait_for("/held?via=h2").await;
    pending.abort();

    wait_for_lines(&lines, "two client-gone access lines", |lines| {
        lines
            .iter()
            .filter(|l| l.contains("pinproxy::access") && l.contains("client-gone"))
            .count()
            >= 2
    })
    .await;
    let gone: Vec<serde_json::Value> = access_lines(&lines)
        .into_iter()
        .filter(|l| l["error"] == "client-gone")
        .collect();
    assert_eq!(gone.len(), 2, "{gone:#?}");
    for line in &gone {
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["origin"], format!("localhost:{https}"), "{line}");
        assert!(line["exit"].as_str().is_some(), "{line}");
    }
    assert!(gone.iter().any(|l| l["cookies"] == "datadome"), "{gone:#?}");
    for line in lines.lock().unwrap().iter() {
        assert!(
            !line.contains(COOKIE_VALUES[0]),
            "a cookie value logged: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_writes_no_access_line() {
    let origin = Origin::start().await;
    let (proxy, lines, _exits, _dir) =
        logging_proxy(&origin, &["--log-format", "json", "--access-log", "off"]).await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    // Two new identities: the second's "new identity" line is written
    // after the first request's access line would have been.
    for value in &COOKIE_VALUES[..2] {
        let mut jar = Jar::default();
        jar.set("datadome", value);
        let mut conn = client.tunnel("localhost", origin.https.port()).await;
        assert_eq!(conn.get_with_jar("/page", &mut jar).await.status, 200);
    }
    wait_for_lines(&lines, "two new identities logged", |lines| {
        lines
            .iter()
            .filter(|l| l.contains("\"new identity\""))
            .count()
            >= 2
    })
    .await;
    assert!(access_lines(&lines).is_empty());
    assert!(!lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("pinproxy::access")));
}

/// Logs are written by a thread of their own: a stderr consumer that stops
/// reading (a stalled log shipper; the pipe holds 64 KiB, about 250 access
/// lines) does not stop requests. Before, the request threads wrote stderr
/// themselves and blocked on the full pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_does_not_stop_the_proxy() {
    let origin = Origin::start().await;
    let exit = TestExit::start("127.0.0.2").await;
    let args = support::process_args(&origin, &[("e".to_owned(), exit.url())]);
    let dir = tempfile::tempdir().unwrap();
    let (proxy, _unread) = PinproxyProcess::start_unread(dir.path(), &args, "info").await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let mut conn = client.tunnel("localhost", origin.https.port()).await;
    for n in 0..2_000 {
        let reply = tokio::time::timeout(Duration::from_secs(10), conn.get("/", &[]))
            .await
            .unwrap_or_else(|_| panic!("request {n} unanswered while nobody reads the log"));
        assert_eq!(reply.status, 200);
    }
}

/// A ClientHello pinproxy cannot read (here, 300 cipher suites, past what
/// it parses) would leave its tunnel presenting pinproxy's own TLS
/// fingerprint upstream: it is counted, never silent.
#[tokio::test]
async fn a_client_hello_pinproxy_cannot_read_is_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::builder().exits(1).start().await;
    let target = format!("localhost:{}", s.origin.https.port());
    let (mut tunnel, head) = s.proxy.client.raw_connect(&target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]);
    body.push(0); // no session id
    let suites: Vec<u8> = (0..300u16).flat_map(|_| [0x13, 0x01]).collect();
    body.extend((suites.len() as u16).to_be_bytes());
    body.extend(&suites);
    body.extend([1, 0]); // null compression
    body.extend([0, 0]); // no extensions
    let mut handshake = vec![1, 0];
    handshake.extend((body.len() as u16).to_be_bytes());
    handshake.extend(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(&handshake);
    tunnel.write_all(&record).await.unwrap();
    // Whatever rustls answers, the read of the hello is done by then.
    let mut answer = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read(&mut answer)).await;

    let addr = s.proxy.daemon.admin_addr().unwrap();
    let text = admin::get(addr, "/metrics").await;
    let series = "pinproxy_fingerprint_gaps_total{kind=\"unread-hello\"}";
    assert_eq!(sample(&text, series), Some(1.0), "{series} in\n{text}");
    s.stop().await;
}

/// A reload that removes an exit removes its gauges too: kept, they would
/// report the identities and state of an exit long gone for the daemon's
/// life, and a dashboard summing them would count them.
#[tokio::test]
async fn a_removed_exit_leaves_no_gauges_behind() {
    let s = Setup::start(2).await;
    s.login("/login").await;
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let text = admin::get(addr, "/metrics").await;
    for exit in ["exit1", "exit2"] {
        for gauge in ["pinproxy_identities_alive", "pinproxy_exit_state"] {
            let series = format!("{gauge}{{exit=\"{exit}\"}}");
            assert!(
                sample(&text, &series).is_some(),
                "{series} missing:\n{text}"
            );
        }
    }
    let mut config = s.proxy.config.clone();
    config.exits.truncate(1);
    s.proxy.daemon.reload_with(&config).await.unwrap();
    let text = admin::get(addr, "/metrics").await;
    for gauge in ["pinproxy_identities_alive", "pinproxy_exit_state"] {
        let kept = format!("{gauge}{{exit=\"exit1\"}}");
        let gone = format!("{gauge}{{exit=\"exit2\"}}");
        assert!(sample(&text, &kept).is_some(), "{kept} missing:\n{text}");
        assert!(sample(&text, &gone).is_none(), "{gone} stayed:\n{text}");
    }
}
