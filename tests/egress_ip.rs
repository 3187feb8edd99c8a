//! Egress IP drift: when a provider moves an upstream session to a new
//! address (after an idle pause, or at random), pinproxy learns it from the
//! exit's answer or an IP-echo probe and retires the identity before any of
//! its cookies leave from the new address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::exit::Gateway;
use support::{error_of, Jar, Setup, TestExitSpec};

/// `gateway` as pinproxy's one exit, one upstream session per identity.
fn gate(gateway: Gateway) -> TestExitSpec {
    TestExitSpec::gateway(gateway).id("gate").with_sessions()
}

/// pinproxy over `gateway`, reading each tunnel's egress address from the
/// gateway's `X-Exit-IP` answer header.
async fn gateway_setup(gateway: Gateway) -> Setup {
    Setup::builder()
        .exit(gate(gateway))
        .config(|c| c.exits[0].exit_ip_header = Some("X-Exit-IP".into()))
        .start()
        .await
}

#[tokio::test]
async fn exit_ip_drift_after_an_idle_pause_retires_the_identity_before_its_cookie_leaves() {
    // Long enough that the login's tunnel and the first page's (a TLS
    // handshake and a durable pin between them) fall within it on a loaded
    // machine.
    let idle = Duration::from_secs(2);
    let s = gateway_setup(Gateway::new(
        &["127.0.0.2", "127.0.0.3", "127.0.0.4"],
        Some(idle),
        0.0,
        1,
    ))
    .await;
    let (mut jar, peer) = s.login("/login").await;
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer))
    );

    // The provider lets the session sit idle past its window and closes the
    // idle tunnels; the next tunnel of the same session name leaves from a
    // new address. (Waiting is the behaviour under test: provider idle time.)
    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    s.exits[0].close_tunnels();
    // Not one byte of the request left from the new address.
    refused_before_it_leaves(&s, &mut jar, "identity-retired:", "exit-ip-drift").await;
    // Still retired afterwards.
    assert_eq!(s.get("/page", &mut jar).await.status, 502);
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_session_moves_never_let_a_cookie_out_from_a_new_address() {
    let s = gateway_setup(Gateway::new(
        &[
            "127.0.0.2",
            "127.0.0.3",
            "127.0.0.4",
            "127.0.0.5",
            "127.0.0.6",
        ],
        None,
        0.3,
        42,
    ))
    .await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(s.login("/login").await.0);
    }
    let mut retired = 0;
    for round in 0..8 {
        // Providers drop idle tunnels at will: every round needs new ones.
        s.exits[0].close_tunnels();
        for jar in clients.iter_mut() {
            let reply = s.get("/page", jar).await;
            match reply.status.as_u16() {
                200 => {}
                502 => {
                    assert!(
                        error_of(&reply).contains("identity-retired")
                            && error_of(&reply).contains("exit-ip-drift"),
                        "round {round}: {}",
                        error_of(&reply)
                    );
                    retired += 1;
                }
                other => panic!("round {round}: unexpected {other}: {}", reply.body),
            }
        }
    }
    assert!(retired > 0, "random moves should retire some identities");
    assert_eq!(
        s.origin.leaks(),
        vec![],
        "a cookie left from an address it was not earned on"
    );
    s.stop().await;
}

/// One gateway exit whose sessions move between two addresses it never
/// states, with the origin's `/ip` as its IP-echo URL.
async fn echo_gateway_setup() -> Setup {
    let gateway = Gateway::new(&["127.0.0.2", "127.0.0.3"], None, 0.0, 7);
    Setup::builder()
        .exit(gate(gateway))
        .config_with(|c, env| {
            let echo = format!("http://localhost:{}/ip", env.origin.http.port());
            c.exits[0].ip_echo = Some(echo);
        })
        .start()
        .await
}

/// Moves every session to another address and closes the tunnels: the
/// next request of `jar`'s identity retires it (`exit-ip-drift`), and its
/// cookie never leaves from the new address.
async fn a_moved_session_is_caught(s: &Setup, jar: &mut Jar) {
    s.exits[0].gateway.as_ref().unwrap().move_all();
    s.exits[0].close_tunnels();
    let reply = s.get("/page", jar).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert!(
        error_of(&reply).contains("exit-ip-drift"),
        "{}",
        error_of(&reply)
    );
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

#[tokio::test]
async fn an_ip_echo_probe_catches_a_moved_session_on_exits_that_state_nothing() {
    let s = echo_gateway_setup().await;
    let (mut jar, peer) = s.login("/login").await;
    assert_eq!(Setup::peer(&s.get("/page", &mut jar).await), Some(peer));
    a_moved_session_is_caught(&s, &mut jar).await;
    s.stop().await;
}

/// An identity founded by an answer's cookies on an exit that states no
/// address has the address of the tunnel that carried the answer (probed
/// when that tunnel opened): a session that moves before the identity's
/// first own tunnel is caught, not taken as the identity's first address.
#[tokio::test]
async fn an_ip_echo_probe_catches_a_session_that_moved_before_the_identitys_first_tunnel() {
    let s = echo_gateway_setup().await;
    let (mut jar, _) = s.login("/login").await;
    a_moved_session_is_caught(&s, &mut jar).await;
    s.stop().await;
}

/// The probe of a cookie-less tunnel is best effort: an IP-echo service
/// that never answers costs the request at most half its connect time, and
/// never the request itself.
#[tokio::test]
async fn a_silent_ip_echo_service_costs_cookie_less_requests_nothing() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    // Accepts, holds every connection, answers nothing; counts them.
    let (accepted, mut probed) = tokio::sync::watch::channel(0usize);
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
            accepted.send_replace(held.len());
        }
    });
    let gateway = Gateway::new(&["127.0.0.2"], None, 0.0, 7);
    // The probe may hold the request half of this: the rest is the margin
    // a loaded machine needs.
    let connect = Duration::from_secs(6);
    let s = Setup::builder()
        .exit(gate(gateway))
        .config(move |c| {
            c.exits[0].ip_echo = Some(format!("http://127.0.0.1:{silent_port}/ip"));
            c.timeouts.connect = connect;
        })
        .start()
        .await;
    let started = std::time::Instant::now();
    let reply = s.get_with("/anonymous", &[]).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Not a timing of pinproxy: a request that waited for the probe's whole
    // connect time would take at least that long.
    assert!(
        took < connect,
        "the request waited {took:?} on a silent IP-echo service"
    );
    tokio::time::timeout(Duration::from_secs(30), probed.wait_for(|n| *n >= 1))
        .await
        .expect("the IP-echo service was never asked")
        .unwrap();
    s.stop().await;
    holder.abort();
}

/// Two tunnels of one identity (its HTTP/1.1 and its HTTP/2 connection)
/// that open before either has recorded the identity's address, and leave
/// from two addresses: the identity has been seen from both, and it retires
/// rather than go on from two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_whose_first_tunnels_leave_from_two_addresses_retires() {
    // Every new tunnel of a session moves it to the next address.
    let s = gateway_setup(Gateway::new(&["127.0.0.2", "127.0.0.3"], None, 1.0, 3)).await;
    let key = "two-tunnels";
    let port = s.origin.https.port();
    let mut h1 = s.proxy.client.tunnel("localhost", port).await;
    let mut h2 = s.proxy.client.tunnel_h2("localhost", port).await;
    // The first request founds the identity and is held at the origin...
    let held = tokio::spawn(async move { h1.get("/held", &[("x-pinproxy-session", key)]).await });
    s.origin.wait_for("/held").await;
    assert_eq!(
        s.origin.seen().len(),
        1,
        "the first request reached the origin"
    );
    // ...while the second opens the identity's HTTP/2 connection.
    let second = h2.get("/page", &[("x-pinproxy-session", key)]).await;
    s.origin.release_held(1);
    let first = held.await.unwrap();
    assert_eq!((first.status.as_u16(), second.status.as_u16()), (200, 200));
    let peers: std::collections::HashSet<_> = s.origin.seen().iter().map(|r| r.peer).collect();
    assert_eq!(peers.len(), 2, "the two tunnels left from two addresses");

    let after = s.get_with("/page", &[("x-pinproxy-session", key)]).await;
    assert_eq!(after.status, 502, "{}", after.body);
    let error = error_of(&after);
    assert!(
        error.starts_with("identity-retired:") && error.contains("exit-ip-drift"),
        "{error}"
    );
    s.stop().await;
}

/// An identity whose address is recorded is never sent through a tunnel
/// that cannot be checked against it: a reload that takes the exit's
/// `exit_ip_header` away (the route is the same, so the identity stays)
/// leaves its next tunnel unchecked, and the request is refused rather
/// than sent from wherever the session moved meanwhile.
#[tokio::test]
async fn a_recorded_address_is_still_required_when_the_exit_stops_stating_one() {
    let s = gateway_setup(Gateway::new(&["127.0.0.2", "127.0.0.3"], None, 0.0, 1)).await;
    let (mut jar, peer) = s.login("/login").await;
    let page = s.get("/page", &mut jar).await;
    assert_eq!(
        (page.status.as_u16(), Setup::peer(&page)),
        (200, Some(peer))
    );
    let mut config = s.proxy.config.clone();
    config.exits[0].exit_ip_header = None;
    s.proxy.daemon.reload_with(&config).await.unwrap();
    s.exits[0].gateway.as_ref().unwrap().move_all();
    s.exits[0].close_tunnels();
    refused_before_it_leaves(&s, &mut jar, "exit-ip-unknown:", "states no address").await;
}

/// `jar`'s next page is refused (`502`, an error starting with `code` and
/// saying `says`) without reaching the origin, and nothing leaked.
async fn refused_before_it_leaves(s: &Setup, jar: &mut Jar, code: &str, says: &str) {
    let seen = s.origin.seen().len();
    let reply = s.get("/page", jar).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    let error = error_of(&reply);
    assert!(error.starts_with(code) && error.contains(says), "{error}");
    assert_eq!(s.origin.seen().len(), seen, "the cookie never left");
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}
