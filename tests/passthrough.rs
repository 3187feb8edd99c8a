//! Hosts excluded from interception are tunnelled raw: the client talks TLS
//! with the origin itself, through one exit for the tunnel's whole life.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use support::origin::reported_peer;
use support::{Origin, Proxy, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `Proxy-Authorization` naming `user`, as a header line.
fn basic(user: &str) -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:x"));
    format!("Proxy-Authorization: Basic {token}\r\n")
}

/// Opens a CONNECT to `origin.test` (resolved by the test exits), with the
/// header line `auth` if given, then TLS trusting only the origin's own CA.
async fn raw_tls(
    proxy: &Proxy,
    origin: &Origin,
    auth: Option<String>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let target = format!("origin.test:{}", origin.https.port());
    let mut tcp = tokio::net::TcpStream::connect(proxy.daemon.local_addr())
        .await
        .unwrap();
    let auth = auth.unwrap_or_default();
    tcp.write_all(
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: raw/1\r\n{auth}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = support::client::read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Only the origin's CA: a pinproxy leaf would be refused.
    let config = support::client::trusting(&origin.pki.ca_pem);
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("origin.test").unwrap(), tcp)
        .await
        .expect("the origin's own certificate, not a pinproxy leaf")
}

/// [`raw_tls`], then a GET of `/`. Returns the reported peer.
async fn raw_get(proxy: &Proxy, origin: &Origin, auth: Option<String>) -> std::net::IpAddr {
    let target = format!("origin.test:{}", origin.https.port());
    let mut tls = raw_tls(proxy, origin, auth).await;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.ok();
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    reported_peer(body).unwrap_or_else(|| panic!("no body in {reply:?}"))
}

/// A TLS handshake naming `sni`, trusting `ca_pem` only, through a CONNECT
/// to `connect`: whether it completed.
async fn handshake_through(proxy: &Proxy, connect: &str, sni: &str, ca_pem: &str) -> bool {
    let (tcp, head) = proxy.client.raw_connect(connect).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let config = support::client::trusting(ca_pem);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = connector.connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp);
    tokio::time::timeout(Duration::from_secs(20), handshake)
        .await
        .expect("the handshake ends one way or the other")
        .is_ok()
}

/// How many requests pinproxy counted with `outcome`.
fn outcomes(proxy: &Proxy, outcome: &str) -> u64 {
    let metrics = proxy.daemon.admin().metrics.encode();
    let line = format!("pinproxy_requests_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Interception is decided on the CONNECT host; a TLS hello naming another
/// host is judged too, and a disagreement fails closed. Under
/// `mitm.include`, a tunnel to a passed-through host whose hello names an
/// included one would carry its cookies out unread, through any exit: it
/// is closed before the hello goes on. Under `mitm.exclude`, a tunnel to
/// an intercepted host whose hello names an excluded one would have
/// pinproxy mint a leaf for, and read, a host it was told to leave alone:
/// its handshake is refused.
#[tokio::test]
async fn a_tls_name_the_mitm_policy_judges_otherwise_than_the_connect_host_is_refused() {
    let included = Setup::builder()
        .exits(2)
        .config(|c| c.mitm.include = vec!["origin.test".into()])
        .start()
        .await;
    let port = included.origin.https.port();
    let origin_ca = included.origin.pki.ca_pem.clone();
    assert!(
        !handshake_through(
            &included.proxy,
            &format!("localhost:{port}"),
            "origin.test",
            &origin_ca
        )
        .await,
        "a passed-through tunnel carried TLS for an intercepted host"
    );
    // The same names agreeing still pass through.
    assert!(
        handshake_through(
            &included.proxy,
            &format!("localhost:{port}"),
            "localhost",
            &origin_ca
        )
        .await
    );
    // Counted as what they were: one refused, one passed through.
    assert_eq!(outcomes(&included.proxy, "tunnel-refused"), 1);
    assert_eq!(outcomes(&included.proxy, "passthrough"), 1);
    // Plain HTTP is judged by the host its request names, as TLS by its
    // hello's: a listed host's cookies never go on unread.
    let http = included.origin.http.port();
    let plain = |host: &'static str| {
        let proxy = &included.proxy;
        async move {
            let (mut tcp, head) = proxy.client.raw_connect(&format!("localhost:{http}")).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let request = format!(
                "GET /plain-in-tunnel HTTP/1.1\r\nHost: {host}:{http}\r\nCookie: datadome=T\r\nConnection: close\r\n\r\n"
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut reply = String::new();
            tokio::time::timeout(Duration::from_secs(20), tcp.read_to_string(&mut reply))
                .await
                .expect("the tunnel answers or closes")
                .ok();
            reply
        }
    };
    let refused = plain("origin.test").await;
    assert!(refused.is_empty(), "{refused}");
    assert!(
        !included
            .origin
            .seen()
            .iter()
            .any(|seen| seen.path == "/plain-in-tunnel"),
        "a plain request naming an intercepted host went on"
    );
    let passed = plain("localhost").await;
    assert!(passed.starts_with("HTTP/1.1 200"), "{passed}");
    assert_eq!(outcomes(&included.proxy, "tunnel-refused"), 2);
    included.stop().await;

    let excluded = Setup::builder()
        .exits(1)
        .config(|c| c.mitm.exclude = vec!["origin.test".into(), "127.0.0.1".into()])
        .start()
        .await;
    let port = excluded.origin.https.port();
    let pinproxy_ca = excluded.proxy.daemon.ca_cert_pem().to_owned();
    assert!(
        !handshake_through(
            &excluded.proxy,
            &format!("localhost:{port}"),
            "origin.test",
            &pinproxy_ca
        )
        .await,
        "pinproxy opened TLS for an excluded host"
    );
    assert!(
        handshake_through(
            &excluded.proxy,
            &format!("localhost:{port}"),
            "localhost",
            &pinproxy_ca
        )
        .await
    );
    // Under `exclude` alone, what the operator listed (here an address)
    // is left alone whatever name its TLS gives.
    let origin_ca = excluded.origin.pki.ca_pem.clone();
    assert!(
        handshake_through(
            &excluded.proxy,
            &format!("127.0.0.1:{port}"),
            "localhost",
            &origin_ca
        )
        .await,
        "an excluded address's tunnel was second-guessed by its TLS"
    );
    assert_eq!(outcomes(&excluded.proxy, "tunnel-refused"), 1);
    excluded.stop().await;
}

#[tokio::test]
async fn an_excluded_host_is_tunnelled_raw_and_a_session_key_keeps_its_exit() {
    let s = Setup::builder()
        .exits(3)
        .config(|c| c.mitm.exclude = vec!["*.test".into()])
        .start()
        .await;
    let (origin, proxy) = (&s.origin, &s.proxy);

    // Without a session key: rotation, tunnel by tunnel.
    let mut rotated = HashSet::new();
    for _ in 0..6 {
        rotated.insert(raw_get(proxy, origin, None).await);
    }
    assert_eq!(rotated.len(), 3, "{rotated:?}");

    // With one: always the key's exit.
    let first = raw_get(proxy, origin, Some(basic("session-bank-user"))).await;
    for _ in 0..5 {
        assert_eq!(
            raw_get(proxy, origin, Some(basic("scraper-session-bank-user"))).await,
            first
        );
    }
    // Named in `X-Pinproxy-Session` on the CONNECT, as on a request.
    let named = || Some("X-Pinproxy-Session: bank-user\r\n".to_owned());
    assert_eq!(raw_get(proxy, origin, named()).await, first);
    for _ in 0..5 {
        assert_eq!(raw_get(proxy, origin, named()).await, first);
    }
    // Nothing was intercepted: the origin saw no request from pinproxy's pipeline.
    assert!(origin
        .seen()
        .iter()
        .all(|s| s.header("user-agent").is_empty()));
    s.stop().await;
}

#[tokio::test]
async fn include_limits_interception_to_the_listed_hosts() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| c.mitm.include = vec!["localhost".into()])
        .start()
        .await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    // origin.test is not included: raw.
    raw_get(proxy, origin, None).await;
    // localhost is: intercepted as usual.
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    assert_eq!(conn.get("/", &[]).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_tunnel_still_open_when_the_grace_period_ends_is_closed_by_the_shutdown() {
    let s = one_exit_passing_test_hosts_through().await;
    let (mut sender, conn, host) = passed_through_http1(&s).await;
    get_root(&mut sender, &host, "the tunnel carries a request").await;
    let mut stopping = s.begin_shutdown(Duration::from_millis(300));
    // The client keeps its tunnel open past the grace period; the origin
    // and the exit stay up (held by `stopping`), so only the shutdown can
    // end the relay, as when pinproxy runs inside another program.
    assert!(
        !stopping.still_waiting_after(Duration::from_secs(10)).await,
        "the shutdown did not end after its grace period"
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "the tunnel outlived the shutdown: its relay was still running 5 s after it returned"
    );
    drop(sender);
}

/// pinproxy with one exit, passing `*.test` hosts through untouched.
async fn one_exit_passing_test_hosts_through() -> Setup {
    Setup::builder()
        .exits(1)
        .config(|c| c.mitm.exclude = vec!["*.test".into()])
        .start()
        .await
}

/// An HTTP/1.1 connection over a tunnel pinproxy passes through to the
/// origin (as `origin.test`), its task, and the `Host` to send on it.
async fn passed_through_http1(
    s: &Setup,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
    String,
) {
    let tls = raw_tls(&s.proxy, &s.origin, None).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    let host = format!("origin.test:{}", s.origin.https.port());
    (sender, tokio::spawn(conn), host)
}

/// `GET /` on a passed-through tunnel's connection, answered `200`
/// (`what` says why it must be).
async fn get_root(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    host: &str,
    what: &str,
) {
    use http_body_util::BodyExt;
    let request = http::Request::get("/")
        .header("host", host)
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.expect(what);
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
}

#[tokio::test]
async fn a_passed_through_tunnel_is_closed_once_nothing_moves_for_relay_idle() {
    let limit = Duration::from_millis(600);
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.mitm.exclude = vec!["*.test".into()];
            c.timeouts.relay_idle = limit;
        })
        .start()
        .await;
    let (mut sender, conn, host) = passed_through_http1(&s).await;
    // Busy for twice the limit, a request every 200 ms on the one
    // connection: the tunnel stays open.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        get_root(&mut sender, &host, "an active tunnel stays open").await;
    }
    let last = Instant::now();
    // Then quiet: the tunnel is closed under the client (a bounded wait
    // for the connection to end).
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let quiet = last.elapsed();
    assert!(ended.is_ok(), "the quiet tunnel was still open after 10 s");
    assert!(
        // The relay counts from the last byte it moved, a moment before
        // the client read it and took the time.
        quiet + Duration::from_millis(100) >= limit && quiet < Duration::from_secs(3),
        "closed {quiet:?} after its last byte (relay_idle {limit:?})"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_open_passed_through_tunnel_holds_the_shutdown_like_a_request_in_flight() {
    let s = one_exit_passing_test_hosts_through().await;
    let (mut sender, conn, host) = passed_through_http1(&s).await;
    let mut stopping = s.begin_shutdown(Duration::from_secs(30));
    // The tunnel carries on within the grace period.
    for _ in 0..3 {
        get_root(
            &mut sender,
            &host,
            "the tunnel outlives the shutdown's start",
        )
        .await;
    }
    assert!(
        stopping.still_waiting_after(Duration::from_secs(2)).await,
        "the shutdown ended with a tunnel still open"
    );
    // Once the client closes its connection, nothing holds the shutdown.
    drop(sender);
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the client's connection ended")
        .unwrap()
        .unwrap();
    stopping
        .ends_within(Duration::from_secs(10), "with the tunnel closed")
        .await;
}

/// Evicts the one identity `s` holds, on its admin endpoint.
async fn evict_the_only_identity(s: &Setup) {
    let admin = s.proxy.daemon.admin_addr().unwrap();
    let body = support::admin::get(admin, "/identities?all=1").await;
    let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(views.len(), 1, "{body}");
    let id = views[0]["identity"].as_str().unwrap();
    let reply = support::admin::request(admin, "DELETE", &format!("/identities/{id}")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// A passed-through tunnel of a session key's identity ends with it: an
/// operator's eviction closes it at once, though its TLS session is open
/// and idle far short of `timeouts.relay_idle`.
#[tokio::test]
async fn a_passed_through_tunnel_closes_when_its_identity_is_evicted() {
    let s = Setup::builder()
        .exits(2)
        .config(|c| c.mitm.exclude = vec!["*.test".into()])
        .start()
        .await;
    let mut tls = raw_tls(&s.proxy, &s.origin, Some(basic("session-feed"))).await;
    evict_the_only_identity(&s).await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        end.is_ok(),
        "the tunnel of an evicted identity was still open after 5 s"
    );
    assert!(
        rest.is_empty(),
        "{} bytes came after the eviction",
        rest.len()
    );
    s.stop().await;
}

/// A passed-through tunnel whose client has not spoken yet (its first
/// words are read to be judged against `mitm.include`, for up to
/// `timeouts.relay_idle`) ends when its identity retires meanwhile, so
/// nothing its client sends after can go on (before, the wait went on and
/// the first words were relayed when they came).
#[tokio::test]
async fn a_passed_through_tunnel_not_yet_spoken_in_closes_when_its_identity_is_evicted() {
    let s = Setup::builder()
        .exits(2)
        .config(|c| c.mitm.include = vec!["intercepted.test".into()])
        .start()
        .await;
    let target = format!("origin.test:{}", s.origin.https.port());
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.daemon.local_addr())
        .await
        .unwrap();
    let auth = basic("session-silent");
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let head = support::client::read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    evict_the_only_identity(&s).await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        end.is_ok(),
        "the silent tunnel of an evicted identity was still open after 5 s"
    );
    assert!(
        rest.is_empty(),
        "{} bytes came after the eviction",
        rest.len()
    );
    s.stop().await;
}

/// Tunnels refused for what their client sends (a TLS name the mitm
/// policy or the CA's name constraints treat otherwise than the CONNECT
/// host) are counted each, and warned of once: a client repeating one
/// wrote a warning (or, outside the CA's constraints, an error) per
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_refused_for_what_their_client_sends_are_warned_of_once() {
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = support::process_args(&origin, &exits);
    let config = dir.path().join("pinproxy.toml");
    std::fs::write(
        &config,
        "[mitm]\nexclude = [\"passed.test\"]\n[ca]\npermitted_domains = [\"localhost\", \"passed.test\"]\n",
    )
    .unwrap();
    args.extend(["--config".to_owned(), config.display().to_string()]);
    let lines = support::procs::Lines::default();
    let proxy = support::procs::PinproxyProcess::start_with_admin_logging(
        dir.path(),
        &args,
        "warn",
        lines.clone(),
    )
    .await;
    let client = support::ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let port = origin.https.port();
    let config = Arc::new(support::client::trusting(&proxy.ca_pem()));
    for sni in ["passed.test", "outside.test"] {
        for _ in 0..5 {
            let (tcp, head) = client.raw_connect(&format!("localhost:{port}")).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let handshake = tokio_rustls::TlsConnector::from(config.clone())
                .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp);
            let done = tokio::time::timeout(Duration::from_secs(20), handshake)
                .await
                .expect("the handshake ends one way or the other");
            assert!(done.is_err(), "a tunnel naming {sni} was opened");
        }
    }
    let metrics = proxy.admin_get("/metrics").await;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pinproxy_requests_total{outcome=\"tunnel-refused\"} "))
        .map_or(0, |v| v.trim().parse::<u64>().unwrap());
    assert_eq!(refused, 10, "each refusal is counted");
    let lines = lines.lock().unwrap().clone();
    let said: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("refused a tunnel") || l.contains("cannot serve TLS"))
        .collect();
    assert_eq!(said.len(), 2, "one warning per cause: {said:#?}");
    assert!(said.iter().all(|l| l.contains("WARN")), "{said:#?}");
    proxy.kill9().await;
}
