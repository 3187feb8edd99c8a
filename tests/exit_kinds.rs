//! Every kind of exit keeps cookies on their IP: SOCKS5 (a real microsocks,
//! remote name resolution, with and without authentication) and direct
//! egress from one local address, end to end against the IP-binding origin.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use pinproxy::exits::health::HealthState;
use support::origin::reported_peer;
use support::procs::Microsocks;
use support::{Jar, Origin, Proxy, ProxyClient, Setup, TestExitSpec};

/// Many clients with their own jars, then cookie-less traffic: 0 leaks,
/// every client on one exit, rotation over all of them.
async fn no_leaks_through(exits: &[(String, String)], addresses: usize) {
    let origin = Origin::start().await;
    let proxy = Proxy::start(exits, &origin, |_| {}).await;
    let port = origin.https.port();
    let mut tasks = Vec::new();
    for client_no in 0..12 {
        let client: ProxyClient = proxy.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut jar = Jar::default();
            let mut peers = HashSet::new();
            for step in 0..8 {
                let path = match step {
                    0 => "/login",
                    4 => "/rotate",
                    _ => "/page",
                };
                let reply = client
                    .try_get("localhost", port, path, &mut jar)
                    .await
                    .unwrap();
                assert_eq!(
                    reply.status, 200,
                    "client {client_no} step {step}: {}",
                    reply.body
                );
                peers.insert(reported_peer(&reply.body).unwrap());
            }
            assert_eq!(peers.len(), 1, "client {client_no} moved: {peers:?}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut spread: HashMap<IpAddr, usize> = HashMap::new();
    let mut conn = proxy.client.tunnel("localhost", port).await;
    for _ in 0..(3 * addresses) {
        *spread
            .entry(reported_peer(&conn.get("/", &[]).await.body).unwrap())
            .or_default() += 1;
    }
    assert_eq!(origin.leaks(), vec![]);
    assert_eq!(spread.len(), addresses, "{spread:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socks5_exits_keep_every_cookie_on_its_ip() {
    let credentials = Some(("scraper", "s3cret"));
    let socks = [
        Microsocks::start("127.0.0.2", None).await,
        Microsocks::start("127.0.0.3", credentials).await,
        Microsocks::start("127.0.0.4", None).await,
    ];
    let exits: Vec<(String, String)> = socks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("socks{i}"),
                s.url(if i == 1 { credentials } else { None }),
            )
        })
        .collect();
    no_leaks_through(&exits, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_exits_from_local_addresses_keep_every_cookie_on_its_ip() {
    let exits: Vec<(String, String)> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .enumerate()
        .map(|(i, ip)| (format!("local{i}"), format!("direct://{ip}")))
        .collect();
    no_leaks_through(&exits, 3).await;
}

#[tokio::test]
async fn a_socks5_exit_refusing_credentials_is_named_in_a_502() {
    let origin = Origin::start().await;
    let socks = Microsocks::start("127.0.0.2", Some(("scraper", "s3cret"))).await;
    let exits = [("guarded".to_string(), socks.url(Some(("scraper", "wrong"))))];
    let proxy = Proxy::start(&exits, &origin, |_| {}).await;
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(
        error.starts_with("exit-refused:") && error.contains("exit guarded"),
        "{error}"
    );
    assert!(
        !error.contains("wrong"),
        "credentials leaked into the error: {error}"
    );
    proxy.stop().await;
}

/// A SOCKS5 exit that asks for credentials its URL does not give is the
/// exit's fault, as an HTTP exit's 407 is: it counts against the exit,
/// which turns unhealthy.
#[tokio::test]
async fn a_socks5_exit_wanting_credentials_its_url_lacks_counts_against_it() {
    let origin = Origin::start().await;
    let socks = Microsocks::start("127.0.0.2", Some(("scraper", "s3cret"))).await;
    let exits = [("guarded".to_string(), socks.url(None))];
    let proxy = Proxy::start(&exits, &origin, |c| c.health.unhealthy_after = 1).await;
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(error.contains("exit guarded"), "{error}");
    let exit = proxy.daemon.exits().iter().next().unwrap().clone();
    assert_eq!(
        exit.health.state(),
        pinproxy::exits::health::HealthState::Unhealthy
    );
    proxy.stop().await;
}

#[tokio::test]
async fn health_probes_work_for_every_exit_kind() {
    let socks = Microsocks::start("127.0.0.2", None).await;
    let s = Setup::builder()
        .exit_url("socks", socks.url(None))
        .exit(TestExitSpec::plain("127.0.0.3").id("http"))
        .exit_url("local", "direct://127.0.0.4")
        // Nothing listens here: its probes fail.
        .exit_url(
            "gone",
            format!("socks5://127.0.0.1:{}", support::procs::free_port()),
        )
        .probe_health(2)
        .start()
        .await;
    s.proxy
        .wait_for_health(
            "gone",
            HealthState::Dead,
            Duration::from_secs(10),
            "the dead exit's probes fail",
        )
        .await;
    for id in ["socks", "http", "local"] {
        assert_eq!(s.proxy.health(id), HealthState::Healthy, "{id}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_socks5_reply_can_state_the_egress_address() {
    let origin = Origin::start().await;
    let socks = support::procs::Dante::start("127.0.0.3").await;
    let exits = [("dante".to_string(), socks.url())];
    let proxy = Proxy::start(&exits, &origin, |c| c.exits[0].socks_reply_is_egress = true).await;
    let mut jar = Jar::default();
    let reply = proxy
        .client
        .try_get("localhost", origin.https.port(), "/login", &mut jar)
        .await
        .unwrap();
    assert_eq!(
        reported_peer(&reply.body),
        Some("127.0.0.3".parse().unwrap())
    );
    let listed = proxy.daemon.admin().identities(false).await.unwrap();
    assert_eq!(
        listed[0].egress_ip.as_deref(),
        Some("127.0.0.3"),
        "{listed:?}"
    );
    proxy.stop().await;
}

/// A `socks5://` URL that points at something else (here an HTTP server's
/// `400`) is the exit's protocol fault: it counts against the exit, and
/// the client is told the exit, not the origin, is at fault.
#[tokio::test]
async fn a_socks5_exit_that_does_not_speak_socks5_counts_against_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = tokio::spawn(async move {
        // Bounded: the test makes one request.
        for _ in 0..4 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut greeting = [0u8; 3];
            let _ = socket.read_exact(&mut greeting).await;
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let exits = [("notsocks".to_string(), format!("socks5://127.0.0.2:{port}"))];
    let proxy = Proxy::start(&exits, &origin, |c| c.health.unhealthy_after = 1).await;
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(
        error.starts_with("exit-protocol:") && error.contains("exit notsocks"),
        "{error}"
    );
    let exit = proxy.daemon.exits().iter().next().unwrap().clone();
    assert_eq!(exit.health.state(), HealthState::Unhealthy);
    assert_eq!(origin.leaks(), vec![]);
    proxy.stop().await;
    fake.abort();
}

/// `socks_reply_is_egress` promises the reply states the tunnel's address:
/// an identity's tunnel whose reply states none (microsocks answers
/// `0.0.0.0`) is refused as `exit-ip-unknown`, as an `exit_ip_header`
/// missing from a CONNECT answer is, instead of going out unchecked.
#[tokio::test]
async fn a_socks5_reply_promised_to_state_the_egress_but_stating_none_is_refused() {
    let origin = Origin::start().await;
    let socks = Microsocks::start("127.0.0.2", None).await;
    let exits = [("micro".to_string(), socks.url(None))];
    let proxy = Proxy::start(&exits, &origin, |c| c.exits[0].socks_reply_is_egress = true).await;
    let mut jar = Jar::default();
    let login = proxy
        .client
        .try_get("localhost", origin.https.port(), "/login", &mut jar)
        .await
        .unwrap();
    assert_eq!(login.status, 200, "cookie-less traffic is not checked");
    let reply = proxy
        .client
        .try_get("localhost", origin.https.port(), "/page", &mut jar)
        .await
        .unwrap();
    assert_eq!(reply.status, 502, "{}", reply.body);
    let error = reply.pinproxy_error().unwrap();
    assert!(error.starts_with("exit-ip-unknown:"), "{error}");
    assert_eq!(origin.leaks(), vec![]);
    proxy.stop().await;
}
