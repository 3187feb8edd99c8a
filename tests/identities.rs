//! Identities: one jar, one exit (and upstream session), one egress address,
//! one fingerprint, from the first request to retirement. Nothing ever moves
//! an identity to another exit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use pinproxy::clock::Clock;
use pinproxy::exits::health::HealthState;
use pinproxy::fingerprint::FingerprintPolicy;
use pinproxy::routing::{ConflictPolicy, RetirePolicy};
use support::exit::Gateway;
use support::{Jar, Origin, Proxy, Setup, TestExit};

const MINUTE: Duration = Duration::from_secs(60);

fn error_of(reply: &support::Reply) -> String {
    reply.pinproxy_error().unwrap_or_default()
}

#[tokio::test]
async fn a_session_key_binds_a_cookieless_login_and_everything_after_to_one_exit() {
    let s = Setup::start(3).await;
    let port = s.origin.https.port();
    let mut jar = Jar::default();

    // A login POST before any cookie exists, named by its session key.
    let mut conn = s.proxy.client.tunnel("localhost", port).await;
    let request = conn
        .request("POST", "/login")
        .header("x-pinproxy-session", "user42")
        .body(Full::new(Bytes::from_static(b"user=42&pw=x")))
        .unwrap();
    let login = conn.send(request).await.unwrap();
    jar.store(&login.headers);
    let peer = Setup::peer(&login).unwrap();

    // The same key by header, by CONNECT Proxy-Authorization (both forms),
    // with and without the cookie: always the same exit.
    for round in 0..9 {
        let reply = match round % 3 {
            0 => {
                let mut conn = s.proxy.client.tunnel("localhost", port).await;
                let cookie = jar.header().unwrap();
                conn.get(
                    "/page",
                    &[("x-pinproxy-session", "user42"), ("cookie", &cookie)],
                )
                .await
            }
            1 => {
                let mut conn = s
                    .proxy
                    .client
                    .tunnel_as("session-user42", "localhost", port)
                    .await;
                conn.get("/page", &[]).await
            }
            _ => {
                let mut conn = s
                    .proxy
                    .client
                    .tunnel_as("scraper-session-user42", "localhost", port)
                    .await;
                conn.get_with_jar("/page", &mut jar).await
            }
        };
        assert_eq!(reply.status, 200, "round {round}: {}", reply.body);
        assert_eq!(Setup::peer(&reply), Some(peer), "round {round}");
    }
    for seen in s.origin.seen() {
        assert!(
            seen.header("x-pinproxy-session").is_empty(),
            "session key leaked"
        );
        assert!(
            seen.header("proxy-authorization").is_empty(),
            "proxy credentials leaked"
        );
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_session_key_and_a_cookie_of_another_identity_conflict() {
    let s = Setup::start(3).await;
    let (cookie_jar, cookie_peer) = s.login("/login").await;
    // Pin a session key until it lands on another exit.
    let mut key = None;
    for n in 0..12 {
        let name = format!("k{n}");
        let reply = s
            .get_with("/", &[("x-pinproxy-session", name.as_str())])
            .await;
        if Setup::peer(&reply) != Some(cookie_peer) {
            key = Some(name);
            break;
        }
    }
    let key = key.expect("a key on another exit");
    let cookie = cookie_jar.header().unwrap();
    let reply = s
        .get_with(
            "/page",
            &[
                ("x-pinproxy-session", key.as_str()),
                ("cookie", cookie.as_str()),
            ],
        )
        .await;
    assert_eq!(reply.status, 409);
    let error = error_of(&reply);
    assert!(
        error.starts_with("pin-conflict:")
            && error.contains("session-key#")
            && error.contains("datadome#"),
        "{error}"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_oldest_policy_keeps_the_first_identity_and_strips_the_other_cookies() {
    let s = Setup::start_with(3, |c| c.identities.conflict_policy = ConflictPolicy::Oldest).await;
    let (older, older_peer) = s.login("/login?name=datadome").await;
    let mut newer = None;
    for _ in 0..10 {
        let (jar, peer) = s.login("/login?name=cf_clearance").await;
        if peer != older_peer {
            newer = Some(jar);
            break;
        }
    }
    let newer = newer.expect("a second exit");
    let cookie = format!(
        "datadome={}; cf_clearance={}",
        older.get("datadome").unwrap(),
        newer.get("cf_clearance").unwrap()
    );
    let reply = s.get_with("/page", &[("cookie", cookie.as_str())]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(Setup::peer(&reply), Some(older_peer));
    let last = s.origin.seen().pop().unwrap();
    let sent = last.header("cookie").join("; ");
    assert!(
        sent.contains("datadome=") && !sent.contains("cf_clearance"),
        "{sent}"
    );
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// Logs in until every exit holds an identity; returns (jar, exit index).
async fn one_identity_per_exit(s: &Setup) -> Vec<(Jar, usize)> {
    let mut jars = Vec::new();
    let mut covered = HashSet::new();
    for _ in 0..30 {
        let (jar, peer) = s.login("/login").await;
        let exit = s.exit_of(peer);
        covered.insert(exit);
        jars.push((jar, exit));
        if covered.len() == s.exits.len() && jars.len() >= 2 * s.exits.len() {
            break;
        }
    }
    assert_eq!(covered.len(), s.exits.len(), "rotation reaches every exit");
    jars
}

async fn wait_for_state(s: &Setup, exit: usize, want: HealthState) {
    let id = pinproxy::identity::ExitId::new(&format!("exit{}", exit + 1));
    let exits = &s.proxy.daemon.pipeline().exits;
    let mut changes = exits.get(&id).unwrap().health.subscribe();
    tokio::time::timeout(
        Duration::from_secs(20),
        changes.wait_for(|state| *state == want),
    )
    .await
    .expect("the exit reaches the expected state")
    .unwrap();
}

/// Health probes every 50 ms against the test origin.
fn probing(c: &mut pinproxy::Config, origin_port: u16) {
    c.health.probe_target = Some(format!("localhost:{origin_port}"));
    c.health.interval = Duration::from_millis(50);
    c.health.unhealthy_after = 1;
    c.health.dead_after = 3;
}

async fn exit_killed_mid_run(policy: RetirePolicy) {
    let origin = Origin::start().await;
    let (exits, config) = support::exits(3).await;
    let port = origin.https.port();
    let proxy = Proxy::start(&config, &origin, |c| {
        probing(c, port);
        c.identities.retire_policy = policy;
    })
    .await;
    let s = Setup {
        origin,
        exits,
        proxy,
    };
    let jars = one_identity_per_exit(&s).await;
    let dead = jars[0].1;
    s.exits[dead].kill();
    wait_for_state(&s, dead, HealthState::Dead).await;

    for (mut jar, exit) in jars {
        let before = s.origin.seen().len();
        let reply = s.get("/page", &mut jar).await;
        if exit == dead {
            match policy {
                RetirePolicy::Fail => {
                    assert_eq!(reply.status, 502);
                    let error = error_of(&reply);
                    assert!(
                        error.starts_with("identity-retired:") && error.contains("exit-down"),
                        "{error}"
                    );
                    assert_eq!(
                        s.origin.seen().len(),
                        before,
                        "nothing of a retired identity leaves"
                    );
                }
                RetirePolicy::Strip => {
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    let last = s.origin.seen().pop().unwrap();
                    assert!(last.tokens.is_empty(), "the retired cookie was stripped");
                    assert!(last
                        .header("cookie")
                        .iter()
                        .all(|c| !c.contains("datadome")));
                }
            }
        } else {
            assert_eq!(reply.status, 200, "other identities are unaffected");
            assert_eq!(Setup::peer(&reply).map(|p| s.exit_of(p)), Some(exit));
        }
    }
    assert!(
        s.origin.leaks().is_empty(),
        "a cookie left through another exit"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_killed_mid_run_retires_its_identities_and_fails_them() {
    exit_killed_mid_run(RetirePolicy::Fail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_killed_mid_run_retires_its_identities_and_strips_them() {
    exit_killed_mid_run(RetirePolicy::Strip).await;
}

#[tokio::test]
async fn the_sticky_window_retires_an_identity_instead_of_following_the_new_ip() {
    let clock = Clock::manual();
    let s = Setup::start_clocked(2, clock.clone(), |c| {
        for exit in &mut c.exits {
            exit.sticky_ttl = Some(10 * MINUTE);
        }
    })
    .await;
    let (mut jar, peer) = s.login("/login").await;
    clock.advance(9 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer))
    );
    clock.advance(2 * MINUTE);
    let seen = s.origin.seen().len();
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 502);
    assert!(
        error_of(&reply).contains("sticky-expired"),
        "{}",
        error_of(&reply)
    );
    assert_eq!(s.origin.seen().len(), seen);
    s.stop().await;
}

#[tokio::test]
async fn idle_and_old_identities_expire() {
    let clock = Clock::manual();
    let s = Setup::start_clocked(2, clock.clone(), |c| {
        c.identities.idle_timeout = 5 * MINUTE;
        c.identities.max_lifetime = 30 * MINUTE;
    })
    .await;
    let (mut idle, _) = s.login("/login").await;
    let (mut busy, busy_peer) = s.login("/login").await;
    for _ in 0..7 {
        clock.advance(4 * MINUTE);
        let reply = s.get("/page", &mut busy).await;
        assert_eq!(
            (reply.status.as_u16(), Setup::peer(&reply)),
            (200, Some(busy_peer))
        );
    }
    // 28 minutes without a request.
    let reply = s.get("/page", &mut idle).await;
    assert_eq!(reply.status, 502);
    assert!(
        error_of(&reply).contains("idle-expired"),
        "{}",
        error_of(&reply)
    );
    // Used every 4 minutes, but older than its lifetime at 32 minutes.
    clock.advance(4 * MINUTE);
    let reply = s.get("/page", &mut busy).await;
    assert!(
        error_of(&reply).contains("lifetime-expired"),
        "{}",
        error_of(&reply)
    );
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_set_cookie_pin_never_outlives_the_cookie() {
    let clock = Clock::manual();
    let s = Setup::start_clocked(2, clock.clone(), |c| {
        c.identities.idle_timeout = 24 * 60 * MINUTE
    })
    .await;
    // The origin's cookies carry Max-Age=3600.
    let (mut jar, peer) = s.login("/login").await;
    clock.advance(59 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer))
    );
    clock.advance(2 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 502);
    assert!(
        error_of(&reply).contains("cookie-expired"),
        "{}",
        error_of(&reply)
    );
    s.stop().await;
}

async fn invalidated_by(path: &str, reason: &str) {
    let s = Setup::start(3).await;
    let (mut jar, _) = s.login("/login").await;
    let verdict = s.get(path, &mut jar).await;
    assert!(
        verdict.status.is_client_error(),
        "{path} is an anti-bot verdict"
    );
    assert!(
        verdict.pinproxy_error().is_none(),
        "the origin's answer passes untouched"
    );
    let seen = s.origin.seen().len();
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 502, "{path}: {}", reply.body);
    let error = error_of(&reply);
    assert!(
        error.starts_with("identity-retired:") && error.contains(reason),
        "{path}: {error}"
    );
    assert_eq!(s.origin.seen().len(), seen, "nothing more of it leaves");
    let metrics = s.proxy.daemon.admin().metrics.encode();
    assert!(metrics.contains(&format!("rule=\"{reason}\"")), "{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn a_datadome_challenge_page_retires_the_identity() {
    invalidated_by("/challenge", "datadome-challenge").await;
}

#[tokio::test]
async fn a_datadome_hard_block_retires_the_identity() {
    invalidated_by("/blocked", "datadome-hard-block").await;
}

#[tokio::test]
async fn a_cloudflare_challenge_retires_the_identity() {
    invalidated_by("/cf-challenge", "cloudflare-challenge").await;
}

#[tokio::test]
async fn a_401_after_the_session_worked_retires_the_identity() {
    invalidated_by("/unauthorized", "unauthorized-after-success").await;
}

#[tokio::test]
async fn ordinary_errors_do_not_retire() {
    let s = Setup::start(2).await;
    // A 401 before anything worked is a login prompt, and a bare 403 is not
    // an anti-bot verdict.
    let reply = s
        .get_with("/unauthorized", &[("x-pinproxy-session", "fresh")])
        .await;
    assert_eq!(reply.status, 401);
    let reply = s.get_with("/", &[("x-pinproxy-session", "fresh")]).await;
    assert_eq!(reply.status, 200);
    let (mut jar, peer) = s.login("/login").await;
    assert_eq!(s.get("/forbidden", &mut jar).await.status, 403);
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer))
    );
    s.stop().await;
}

async fn drift_under(policy: FingerprintPolicy) -> (Setup, Jar, support::Reply) {
    let s = Setup::start_with(2, |c| c.identities.fingerprint_policy = policy).await;
    let mut jar = Jar::default();
    let mut conn = s
        .proxy
        .client
        .tunnel("localhost", s.origin.https.port())
        .await;
    let login = conn
        .get(
            "/login",
            &[("user-agent", "Chrome/156"), ("accept-language", "en-GB")],
        )
        .await;
    jar.store(&login.headers);
    let cookie = jar.header().unwrap();
    let reply = conn
        .get(
            "/page",
            &[
                ("user-agent", "Firefox/140"),
                ("accept-language", "en-GB"),
                ("cookie", &cookie),
            ],
        )
        .await;
    (s, jar, reply)
}

#[tokio::test]
async fn user_agent_drift_is_counted_under_warn() {
    let (s, _, reply) = drift_under(FingerprintPolicy::Warn).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        s.origin.seen().pop().unwrap().header("user-agent"),
        ["Firefox/140"]
    );
    let metrics = s.proxy.daemon.admin().metrics.encode();
    assert!(
        metrics.contains("pinproxy_fingerprint_drift_total{policy=\"warn\"} 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn user_agent_drift_is_refused_under_reject() {
    let (s, _, reply) = drift_under(FingerprintPolicy::Reject).await;
    assert_eq!(reply.status, 409);
    let error = error_of(&reply);
    assert!(
        error.starts_with("fingerprint-drift:") && error.contains("user-agent"),
        "{error}"
    );
    assert_eq!(
        s.origin.seen().len(),
        1,
        "only the login reached the origin"
    );
    s.stop().await;
}

#[tokio::test]
async fn user_agent_drift_is_rewritten_under_restore() {
    let (s, _, reply) = drift_under(FingerprintPolicy::Restore).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        s.origin.seen().pop().unwrap().header("user-agent"),
        ["Chrome/156"]
    );
    s.stop().await;
}

#[tokio::test]
async fn the_session_placeholder_reaches_the_exit_as_one_stable_name_per_identity() {
    let origin = Origin::start().await;
    let exit = TestExit::start_with_auth("127.0.0.2", None).await;
    let url = format!("http://customer-acme-session-{{session}}:pw@{}", exit.addr);
    let proxy = Proxy::start(&[("gate".into(), url)], &origin, |_| {}).await;
    let s = Setup {
        origin,
        exits: vec![exit],
        proxy,
    };
    let mut names = Vec::new();
    for _ in 0..2 {
        let key = format!("user{}", names.len());
        for _ in 0..3 {
            // Fresh client tunnels; the pool may reuse its upstream tunnel.
            s.get_with("/", &[("x-pinproxy-session", key.as_str())])
                .await;
        }
        s.exits[0].close_tunnels();
        s.get_with("/", &[("x-pinproxy-session", key.as_str())])
            .await;
        let users: HashSet<String> = s.exits[0]
            .connects()
            .into_iter()
            .filter_map(|c| c.user)
            .filter(|u| !names.contains(u))
            .collect();
        assert_eq!(users.len(), 1, "one identity, one session name: {users:?}");
        let user = users.into_iter().next().unwrap();
        let session = user.strip_prefix("customer-acme-session-").unwrap();
        assert_eq!(session.len(), 16, "{user}");
        assert!(session.bytes().all(|b| b.is_ascii_hexdigit()));
        names.push(user);
    }
    assert_ne!(names[0], names[1]);
    // The listing shows the same session ids.
    let listed = s.proxy.daemon.admin().identities(false).await.unwrap();
    for name in &names {
        assert!(
            listed.iter().any(|v| name.ends_with(&v.session)),
            "{name} not in {listed:?}"
        );
    }
    s.stop().await;
}

async fn gateway_setup(gateway: Gateway) -> Setup {
    let origin = Origin::start().await;
    let exit = TestExit::start_gateway(gateway).await;
    let url = format!("http://customer-acme-session-{{session}}:pw@{}", exit.addr);
    let proxy = Proxy::start(&[("gate".into(), url)], &origin, |c| {
        c.exits[0].exit_ip_header = Some("X-Exit-IP".into());
    })
    .await;
    Setup {
        origin,
        exits: vec![exit],
        proxy,
    }
}

#[tokio::test]
async fn exit_ip_drift_after_an_idle_pause_retires_the_identity_before_its_cookie_leaves() {
    let idle = Duration::from_millis(300);
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
    let seen = s.origin.seen().len();
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    let error = error_of(&reply);
    assert!(
        error.starts_with("identity-retired:") && error.contains("exit-ip-drift"),
        "{error}"
    );
    assert_eq!(
        s.origin.seen().len(),
        seen,
        "not one byte of the request left from the new address"
    );
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
                        error_of(&reply).contains("identity-retired"),
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

#[tokio::test]
async fn an_ip_echo_probe_catches_a_moved_session_on_exits_that_state_nothing() {
    let origin = Origin::start().await;
    let gateway = Gateway::new(&["127.0.0.2", "127.0.0.3"], None, 0.0, 7);
    let exit = TestExit::start_gateway(gateway).await;
    let url = format!("http://customer-acme-session-{{session}}:pw@{}", exit.addr);
    let echo = format!("http://localhost:{}/ip", origin.http.port());
    let proxy = Proxy::start(&[("gate".into(), url)], &origin, |c| {
        c.exits[0].ip_echo = Some(echo);
    })
    .await;
    let s = Setup {
        origin,
        exits: vec![exit],
        proxy,
    };
    let (mut jar, peer) = s.login("/login").await;
    assert_eq!(Setup::peer(&s.get("/page", &mut jar).await), Some(peer));
    s.exits[0].gateway.as_ref().unwrap().move_all();
    s.exits[0].close_tunnels();
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 502);
    assert!(
        error_of(&reply).contains("exit-ip-drift"),
        "{}",
        error_of(&reply)
    );
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn weights_shape_rotation_and_unhealthy_exits_get_no_new_identities() {
    let s = Setup::start_with(3, |c| {
        c.exits[0].weight = 3;
        c.health.retry_interval = Duration::from_secs(3600);
    })
    .await;
    let mut counts = [0usize; 3];
    let mut conn = s
        .proxy
        .client
        .tunnel("localhost", s.origin.https.port())
        .await;
    for _ in 0..25 {
        let peer = Setup::peer(&conn.get("/", &[]).await).unwrap();
        counts[s.exit_of(peer)] += 1;
    }
    assert_eq!(counts, [15, 5, 5], "weights 3:1:1");

    // Passive failures make exit2 unhealthy; new identities avoid it.
    s.exits[1].kill();
    for _ in 0..20 {
        let _ = conn.get("/", &[]).await;
        let state = s
            .proxy
            .daemon
            .pipeline()
            .exits
            .get(&pinproxy::identity::ExitId::new("exit2"))
            .unwrap()
            .health
            .state();
        if state != HealthState::Healthy {
            break;
        }
    }
    for _ in 0..10 {
        let (_, peer) = s.login("/login").await;
        assert_ne!(
            s.exit_of(peer),
            1,
            "a new identity landed on an unhealthy exit"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn identities_are_listed_by_the_pins_command_and_counted_in_metrics() {
    let s = Setup::start(2).await;
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
    assert!(
        metrics.contains("pinproxy_identities_created_total 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn retired_credentials_are_never_pinned_anew_under_strip() {
    let clock = Clock::manual();
    let s = Setup::start_clocked(3, clock.clone(), |c| {
        c.identities.retire_policy = RetirePolicy::Strip;
        c.identities.idle_timeout = 5 * MINUTE;
    })
    .await;
    let (mut jar, _) = s.login("/login").await;
    let token = jar.get("datadome").unwrap().to_owned();
    clock.advance(6 * MINUTE);
    // Every later request goes out without the retired cookie, through
    // whichever exit rotation picks: the cookie itself never leaves again.
    let mut peers: HashSet<IpAddr> = HashSet::new();
    for _ in 0..6 {
        let mut only_old = Jar::default();
        only_old.set("datadome", &token);
        let reply = s.get("/page", &mut only_old).await;
        assert_eq!(reply.status, 200);
        peers.insert(Setup::peer(&reply).unwrap());
        assert!(s.origin.seen().pop().unwrap().tokens.is_empty());
    }
    assert!(peers.len() > 1, "stripped traffic rotates");
    assert!(s.origin.leaks().is_empty());
    let _ = &mut jar;
    s.stop().await;
}

#[tokio::test]
async fn an_exit_can_shorten_the_idle_timeout_of_its_identities() {
    let clock = Clock::manual();
    let s = Setup::start_clocked(1, clock.clone(), |c| {
        c.exits[0].idle_timeout = Some(2 * MINUTE);
    })
    .await;
    let (mut jar, _) = s.login("/login").await;
    clock.advance(MINUTE);
    assert_eq!(s.get("/page", &mut jar).await.status, 200);
    clock.advance(3 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert!(
        error_of(&reply).contains("idle-expired"),
        "{}",
        error_of(&reply)
    );
    s.stop().await;
}
