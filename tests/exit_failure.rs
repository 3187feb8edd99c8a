//! Exits that are down, slow, refusing or behind an untrusted origin: each
//! gets a 502 naming the exit and the cause, and a cookie pinned to a dead
//! exit is never sent through another one. An origin too slow to answer
//! gets a 504 naming the timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::origin::reported_peer;
use support::{Jar, Origin, Proxy, Setup, TestExit};
use tokio::net::TcpListener;

/// A loopback port that refuses connections, and the socket that keeps it
/// so for as long as it is held: bound, never listening. (A port merely
/// found free can be handed to another test's listener meanwhile, which
/// then answers as the "dead" exit.)
fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

#[tokio::test]
async fn an_exit_that_is_down_gets_502_naming_it() {
    let origin = Origin::start().await;
    let (_closed, port) = closed_port();
    let config = [("deadexit".to_string(), format!("http://127.0.0.1:{port}"))];
    let proxy = Proxy::start(&config, &origin, |_| {}).await;

    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(error.starts_with("exit-unreachable:"), "{error}");
    assert!(error.contains("exit deadexit"), "{error}");
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    // The client connection survives the failure.
    let again = conn.get("/", &[]).await;
    assert_eq!(again.status, 502);
}

#[tokio::test]
async fn an_exit_that_never_answers_times_out_with_502() {
    let origin = Origin::start().await;
    // Accepts connections and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let config = [("mute".to_string(), format!("http://{addr}"))];
    let proxy = Proxy::start(&config, &origin, |c| {
        c.timeouts.connect = Duration::from_millis(300);
    })
    .await;

    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(
        error.starts_with("exit-timeout:") && error.contains("exit mute"),
        "{error}"
    );
    hold.abort();
}

#[tokio::test]
async fn an_exit_refusing_connect_is_reported_with_its_status() {
    let origin = Origin::start().await;
    let guarded = TestExit::start_with_auth("127.0.0.2", Some("scraper:s3cret")).await;
    let config = [
        ("noauth".to_string(), guarded.url()),
        (
            "withauth".to_string(),
            format!("http://scraper:s3cret@{}", guarded.addr),
        ),
    ];
    let proxy = Proxy::start(&config, &origin, |_| {}).await;

    let mut statuses = Vec::new();
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    for _ in 0..2 {
        let reply = conn.get("/", &[]).await;
        statuses.push((reply.status.as_u16(), reply.pinproxy_error()));
    }
    statuses.sort();
    assert_eq!(
        statuses[0].0, 200,
        "credentials from the URL reach the exit"
    );
    assert_eq!(statuses[1].0, 502);
    let error = statuses[1].1.clone().unwrap();
    assert!(
        error.starts_with("exit-refused:")
            && error.contains("exit noauth")
            && error.contains("407"),
        "{error}"
    );
    assert!(!error.contains("s3cret"));
    let auths: Vec<_> = guarded
        .connects()
        .into_iter()
        .filter_map(|c| c.proxy_authorization)
        .collect();
    assert_eq!(auths, ["Basic c2NyYXBlcjpzM2NyZXQ="]);
}

#[tokio::test]
async fn an_untrusted_origin_certificate_is_an_upstream_tls_502() {
    let s = Setup::start_with(1, |c| c.upstream_ca.clear()).await;
    let (origin, proxy) = (&s.origin, &s.proxy);

    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(
        error.starts_with("upstream-tls:") && error.contains("exit exit1"),
        "{error}"
    );
    assert!(error.contains("localhost"), "{error}");
}

#[tokio::test]
async fn a_cookie_pinned_to_a_dead_exit_never_leaves_through_another() {
    let s = Setup::start(3).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let running = &s.exits;

    let mut jar = Jar::default();
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let peer = reported_peer(&conn.get_with_jar("/login", &mut jar).await.body).unwrap();
    let dead = running.iter().position(|e| e.source == peer).unwrap();
    running[dead].kill();
    let seen_before = origin.seen().len();

    for _ in 0..6 {
        let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
        let reply = conn.get_with_jar("/page", &mut jar).await;
        assert_eq!(reply.status, 502);
        let error = reply.pinproxy_error().unwrap();
        assert!(error.contains(&format!("exit exit{}", dead + 1)), "{error}");
    }
    assert_eq!(
        origin.seen().len(),
        seen_before,
        "the pinned cookie went out elsewhere"
    );
    // Cookie-less traffic carries on through the live exits.
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let mut ok = 0;
    for _ in 0..3 {
        if conn.get("/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 2);
    assert!(origin.leaks().is_empty());
}

/// Two exits that die after two failures, on `clock`, with the sweep
/// out of the way.
async fn quick_to_die(clock: pinproxy::clock::Clock) -> Setup {
    Setup::builder()
        .exits(2)
        .clock(clock)
        .config(|c| {
            c.health.unhealthy_after = 1;
            c.health.dead_after = 2;
            c.identities.sweep_interval = Duration::from_secs(3600);
        })
        .start()
        .await
}

/// Logs in on `s`, runs `before_the_death`, kills the identity's exit and
/// sends its cookie until the exit is dead (each answered 502); answers
/// the death the store holds for that exit, if any.
async fn death_of_the_identitys_exit(s: &Setup, before_the_death: impl FnOnce()) -> Option<u64> {
    use pinproxy::store::PinStore as _;
    let (mut jar, peer) = s.login("/login").await;
    let dead = s.exit_of(peer);
    before_the_death();
    s.exits[dead].kill();
    for _ in 0..3 {
        let reply = s.get("/page", &mut jar).await;
        assert_eq!(reply.status, 502, "{}", reply.body);
    }
    let id = format!("exit{}", dead + 1);
    let deaths = s
        .proxy
        .daemon
        .pipeline()
        .router
        .store()
        .exit_deaths()
        .await
        .unwrap();
    deaths
        .iter()
        .find(|(exit, _)| exit.as_str() == id)
        .map(|d| d.1)
}

/// An exit's death is stored as it happens, not at the next sweep: a crash
/// right after it does not bring the identities made before it back.
#[tokio::test]
async fn an_exits_death_is_stored_as_it_happens() {
    let s = quick_to_die(pinproxy::clock::Clock::system()).await;
    let died = death_of_the_identitys_exit(&s, || {}).await;
    assert!(died.is_some(), "the exit died, and the store has no death");
    s.stop().await;
}

/// A wall clock stepped back after an identity was founded (an NTP
/// correction) does not date its exit's death before the identity: the
/// death is dated no earlier than the identities the process has seen on
/// the exit, so the identity still retires with it (and stays retired
/// when the exit comes back).
#[tokio::test]
async fn a_clock_stepped_back_never_dates_a_death_before_its_identities() {
    let clock = pinproxy::clock::Clock::manual();
    let s = quick_to_die(clock.clone()).await;
    let founded = clock.now_ms();
    let died = death_of_the_identitys_exit(&s, || clock.step_back(Duration::from_secs(3600))).await;
    assert!(
        died.is_some_and(|at| at >= founded),
        "died at {died:?}, before its identity, founded at {founded}"
    );
    s.stop().await;
}

/// A death health probes find is stored as it happens too.
#[tokio::test]
async fn an_exits_death_found_by_probes_is_stored_as_it_happens() {
    use pinproxy::store::PinStore as _;
    let s = Setup::builder()
        .exits(2)
        .probe_health(2)
        .config(|c| c.identities.sweep_interval = Duration::from_secs(3600))
        .start()
        .await;
    s.exits[0].kill();
    let router = s.proxy.daemon.pipeline().router.clone();
    let mut deaths = Vec::new();
    // Probes run every 50 ms: two failures make the exit dead.
    for _ in 0..200 {
        deaths = router.store().exit_deaths().await.unwrap();
        if !deaths.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        deaths.iter().any(|(exit, _)| exit.as_str() == "exit1"),
        "exit1 died, and the store has {deaths:?}"
    );
    s.stop().await;
}

/// Every request asks whether an unhealthy exit is due for a trial probe:
/// while every exit is healthy the answer costs no clock read, and an
/// unhealthy one is offered once per trial interval.
#[test]
fn an_unhealthy_exit_is_offered_for_trial_once_per_interval() {
    use pinproxy::exits::ExitSet;
    use std::cell::Cell;
    let exits = ExitSet::new(
        vec![
            support::routing_only_exit("steady", "direct://127.0.0.2"),
            support::routing_only_exit("flaky", "direct://127.0.0.3"),
        ],
        Some(60_000),
    );
    let reads = Cell::new(0);
    let at = |ms: u64| {
        let reads = &reads;
        move || {
            reads.set(reads.get() + 1);
            ms
        }
    };
    assert!(exits.due_for_trial(at(1_000_000)).is_none());
    assert_eq!(reads.get(), 0, "the clock was read with every exit healthy");

    let flaky = exits
        .iter()
        .find(|e| e.id().to_string() == "flaky")
        .unwrap();
    flaky.health.failure(1_000_000);
    let due = exits
        .due_for_trial(at(1_000_000))
        .map(|e| e.id().to_string());
    assert_eq!(due.as_deref(), Some("flaky"));
    assert_eq!(reads.get(), 1, "one read for one request");
    // Claimed: not again within the interval, again after it.
    assert!(exits.due_for_trial(at(1_030_000)).is_none());
    let due = exits
        .due_for_trial(at(1_060_000))
        .map(|e| e.id().to_string());
    assert_eq!(due.as_deref(), Some("flaky"));
}

#[tokio::test]
async fn a_direct_exit_reports_an_unreachable_origin() {
    let origin = Origin::start().await;
    let (_closed, port) = closed_port();
    let config = [("local".to_string(), "direct://127.0.0.5".to_string())];
    let proxy = Proxy::start(&config, &origin, |_| {}).await;

    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 200, "direct exits work: {}", reply.body);
    assert_eq!(
        reported_peer(&reply.body),
        Some("127.0.0.5".parse().unwrap())
    );

    let mut conn = proxy.client.tunnel("127.0.0.1", port).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(
        error.starts_with("origin-unreachable:") && error.contains("exit local"),
        "{error}"
    );
}

#[tokio::test]
async fn an_origin_slow_to_answer_times_out_with_504_and_the_connection_carries_on() {
    let origin = Origin::start().await;
    let config = [("local".to_string(), "direct://127.0.0.6".to_string())];
    let proxy = Proxy::start(&config, &origin, |c| {
        c.timeouts.response_head = Duration::from_secs(2);
    })
    .await;

    // One client connection: each of its requests has its own deadline,
    // before and after one passed. (The margins leave room for a new
    // upstream connection on a loaded machine.)
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    for round in 0..2 {
        let quick = conn.get("/pause?head_ms=50", &[]).await;
        assert_eq!(quick.status, 200, "round {round}: {}", quick.body);
        let late = conn.get("/pause?head_ms=5000", &[]).await;
        assert_eq!(late.status, 504, "round {round}: {}", late.body);
        let error = late.pinproxy_error().unwrap();
        assert!(
            error.starts_with("origin-timeout:") && error.contains("timeouts.response_head"),
            "round {round}: {error}"
        );
        // Well inside the timeout, though the last one fired.
        let again = conn.get("/pause?head_ms=300", &[]).await;
        assert_eq!(again.status, 200, "round {round}: {}", again.body);
    }
}
