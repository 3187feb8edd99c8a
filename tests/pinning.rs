//! The heart of pinproxy: every tracked cookie leaves only through the exit
//! that first saw it, while cookie-less traffic rotates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use pinproxy::store::PinStore as _;
use support::origin::{assert_carried, reported_peer};
use support::{Jar, Setup};

#[tokio::test]
async fn login_then_requests_stay_on_the_earning_exit() {
    let s = Setup::start(3).await;
    let (mut jar, earned_from) = s.login("/login").await;
    assert!(jar.get("datadome").is_some());
    for _ in 0..20 {
        // A fresh tunnel each time: nothing but the pin keeps the exit.
        let reply = s.get("/page", &mut jar).await;
        assert_carried(&reply, "datadome", earned_from);
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn cookieless_requests_rotate_over_all_exits_even_on_one_connection() {
    let s = Setup::start(3).await;
    let mut conn = s
        .proxy
        .client
        .tunnel("localhost", s.origin.https.port())
        .await;
    let mut peers = HashSet::new();
    for _ in 0..9 {
        peers.insert(Setup::peer(&conn.get("/", &[]).await).unwrap());
    }
    let expected: HashSet<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(
        peers, expected,
        "one client connection, requests through every exit"
    );
    s.stop().await;
}

/// Many clients, each with its own jar, some on fresh tunnels, some on
/// keep-alive tunnels, some plain HTTP, through three exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_never_present_a_cookie_from_the_wrong_ip() {
    let s = Setup::start(3).await;
    let mut tasks = Vec::new();
    for client_no in 0..24usize {
        let client = s.proxy.client.clone();
        let https_port = s.origin.https.port();
        let http_port = s.origin.http.port();
        tasks.push(tokio::spawn(async move {
            let mut jar = Jar::default();
            let mut keepalive = match client_no % 3 {
                0 => None,
                1 => Some(client.tunnel("localhost", https_port).await),
                _ => Some(client.plain("localhost", http_port).await),
            };
            let mut peers = HashSet::new();
            for step in 0..12 {
                let path = match step {
                    0 => "/login",
                    6 => "/rotate",
                    _ => "/page",
                };
                let reply = match keepalive.as_mut() {
                    Some(conn) => conn.get_with_jar(path, &mut jar).await,
                    None => {
                        let mut conn = client.tunnel("localhost", https_port).await;
                        conn.get_with_jar(path, &mut jar).await
                    }
                };
                assert_eq!(
                    reply.status, 200,
                    "client {client_no} step {step}: {}",
                    reply.body
                );
                peers.insert(reported_peer(&reply.body).unwrap());
            }
            assert_eq!(peers.len(), 1, "client {client_no} changed exit: {peers:?}");
        }));
    }
    let mut cookieless = Vec::new();
    for _ in 0..30 {
        let client = s.proxy.client.clone();
        let port = s.origin.https.port();
        cookieless.push(tokio::spawn(async move {
            let mut conn = client.tunnel("localhost", port).await;
            reported_peer(&conn.get("/", &[]).await.body).unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut spread: HashMap<IpAddr, usize> = HashMap::new();
    for task in cookieless {
        *spread.entry(task.await.unwrap()).or_default() += 1;
    }

    assert_eq!(
        s.origin.leaks(),
        vec![],
        "cookies presented from a wrong IP"
    );
    assert_eq!(
        s.origin.forwarded_header_hits(),
        vec![],
        "forwarding headers reached the origin"
    );
    assert_eq!(
        spread.len(),
        3,
        "cookie-less requests use every exit: {spread:?}"
    );
    s.stop().await;
}

/// Every racer has its tunnel open before any sends, so the requests meet
/// in the founding (how often they do is up to the scheduler: a round
/// whose requests happen to run one after another shows nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_racing_with_one_unseen_cookie_all_take_one_exit() {
    let s = Setup::start(3).await;
    for round in 0..5 {
        let cookie = format!("datadome=never-seen-{round}-{}", rand::random::<u64>());
        let mut racers = Vec::new();
        let start = Arc::new(tokio::sync::Barrier::new(24));
        for _ in 0..24 {
            let client = s.proxy.client.clone();
            let port = s.origin.https.port();
            let (cookie, start) = (cookie.clone(), start.clone());
            racers.push(tokio::spawn(async move {
                let mut conn = client.tunnel("localhost", port).await;
                tokio::time::timeout(Duration::from_secs(60), start.wait())
                    .await
                    .expect("a racer never reached the start");
                let reply = conn.get("/", &[("cookie", cookie.as_str())]).await;
                reported_peer(&reply.body).unwrap()
            }));
        }
        let mut peers = HashSet::new();
        for racer in racers {
            peers.insert(racer.await.unwrap());
        }
        assert_eq!(
            peers.len(),
            1,
            "round {round}: one cookie went out through {peers:?}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_rotated_cookie_inherits_its_exit() {
    let s = Setup::start(3).await;
    let mut jar = Jar::default();
    let mut conn = s
        .proxy
        .client
        .tunnel("localhost", s.origin.https.port())
        .await;
    let peer = Setup::peer(&conn.get_with_jar("/login", &mut jar).await).unwrap();
    let first = jar.get("datadome").unwrap().to_owned();
    conn.get_with_jar("/rotate", &mut jar).await;
    let rotated = jar.get("datadome").unwrap().to_owned();
    assert_ne!(first, rotated);

    // The pin was learnt from Set-Cookie, on the exit that carried it.
    let pipeline = s.proxy.daemon.pipeline();
    let key = pipeline.hasher.cookie("datadome", &rotated);
    let pins = pipeline.router.store().lookup(&[key]).await.unwrap();
    let exit = s.exits.iter().position(|e| e.source == peer).unwrap();
    assert_eq!(
        pins[0]
            .as_ref()
            .and_then(|b| b.identity.as_ref())
            .map(|i| i.exit.to_string()),
        Some(format!("exit{}", exit + 1))
    );

    // A client holding only the rotated value goes to the same exit.
    for _ in 0..6 {
        let mut only_rotated = Jar::default();
        only_rotated.set("datadome", &rotated);
        assert_carried(&s.get("/page", &mut only_rotated).await, "datadome", peer);
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// A cookie sent in another spelling a server reads alike (its name in
/// another case, as nginx matches names; its value in quotes, which Go and
/// Node strip; its name as PHP reads it; its value's `%XX` escapes,
/// which PHP and Node decode) is the same credential: it
/// leaves through the exit the cookie was earned on, never founds an
/// identity on another.
#[tokio::test]
async fn other_spellings_of_a_cookie_keep_to_its_exit() {
    let s = Setup::start(3).await;
    let (jar, peer) = s.login("/login").await;
    let token = jar.get("datadome").unwrap().to_owned();
    for (name, value) in [
        ("DataDome", token.clone()),
        ("DATADOME", token.clone()),
        ("datadome", format!("\"{token}\"")),
        ("Datadome", format!("\"{token}\"")),
        // As PHP reads names: `%64atadome` was `$_COOKIE['datadome']`.
        ("%64atadome", token.clone()),
        // Its value's escapes decoded, as PHP and Node read values.
        ("datadome", token.replace('~', "%7E")),
    ] {
        for _ in 0..3 {
            let mut respelt = Jar::default();
            respelt.set(name, &value);
            let reply = s.get("/page", &mut respelt).await;
            assert_eq!(Setup::peer(&reply), Some(peer), "{name}={value}");
            // Delivered as spelt (the origin signs only `datadome`).
            let seen = s.origin.seen();
            let cookie = seen.last().unwrap().header("cookie").join("; ");
            assert!(
                cookie.contains(&format!("{name}={value}")),
                "{name}={value} did not arrive: {cookie:?}"
            );
        }
    }

    // A pin made before keys were canonical has the key of the spelling
    // it was seen in: a request in that spelling finds it by that key.
    let pipeline = s.proxy.daemon.pipeline();
    let store = pipeline.router.store();
    let found = store
        .lookup(&[pipeline.hasher.cookie("datadome", &token)])
        .await
        .unwrap();
    let binding = found[0].clone().unwrap();
    let older = "OlderSpelling-7f3a";
    let pin = pinproxy::identity::Pin {
        name: "DataDome".into(),
        ..binding.pin
    };
    store
        .pin_if_absent(pipeline.hasher.cookie("DataDome", older), &pin)
        .await
        .unwrap();
    for _ in 0..3 {
        let mut old_jar = Jar::default();
        old_jar.set("DataDome", older);
        let reply = s.get("/page", &mut old_jar).await;
        assert_eq!(Setup::peer(&reply), Some(peer));
    }
    s.stop().await;
}

/// A tunnel remembers the credentials of its last `Cookie` header: a
/// client whose header changes from request to request on one keep-alive
/// connection must still be routed by what each request carries.
#[tokio::test]
async fn one_connection_switching_cookies_follows_each_requests_own_pin() {
    let s = Setup::start(3).await;
    let (jar_a, exit_a) = s.login("/login").await;
    // Cookie-less logins rotate over the exits: one lands elsewhere.
    let mut other = None;
    for _ in 0..12 {
        let (jar, exit) = s.login("/login").await;
        if exit != exit_a {
            other = Some((jar, exit));
            break;
        }
    }
    let (jar_b, exit_b) = other.expect("a login on another exit within 12");
    let header_a = format!("datadome={}", jar_a.get("datadome").unwrap());
    let header_b = format!("datadome={}", jar_b.get("datadome").unwrap());

    let mut conn = s
        .proxy
        .client
        .tunnel("localhost", s.origin.https.port())
        .await;
    // Repeats (recalled) and switches (read afresh), on one connection.
    for (header, exit) in [
        (&header_a, exit_a),
        (&header_a, exit_a),
        (&header_b, exit_b),
        (&header_b, exit_b),
        (&header_a, exit_a),
        (&header_b, exit_b),
        (&header_a, exit_a),
    ] {
        let reply = conn.get("/page", &[("cookie", header)]).await;
        assert_carried(&reply, "datadome", exit);
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn cookies_in_several_headers_with_odd_spacing_are_all_read() {
    let s = Setup::start(3).await;
    let (jar, peer) = s.login("/login").await;
    let second = format!(
        "  _ga=1 ;datadome={} ;; theme=dark",
        jar.get("datadome").unwrap()
    );
    for _ in 0..6 {
        let mut conn = s
            .proxy
            .client
            .tunnel("localhost", s.origin.https.port())
            .await;
        let request = conn
            .request("GET", "/page")
            .header("cookie", "lang=en")
            .header("cookie", second.as_str())
            .body(Default::default())
            .unwrap();
        let reply = conn.send(request).await.unwrap();
        assert_carried(&reply, "datadome", peer);
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn datadome_header_carriers_count_as_the_cookie() {
    let s = Setup::start(3).await;
    // X-Set-Cookie pins like Set-Cookie; X-DataDome-ClientID routes like the cookie.
    let reply = s.get("/x-set-cookie", &mut Jar::default()).await;
    let peer = Setup::peer(&reply).unwrap();
    let carried = reply.headers["x-set-cookie"].to_str().unwrap();
    let token = carried
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("datadome=")
        .unwrap();

    let as_cookie = format!("datadome={token}");
    for round in 0..6 {
        let header = if round % 2 == 0 {
            ("x-datadome-clientid", token)
        } else {
            ("cookie", as_cookie.as_str())
        };
        let mut conn = s
            .proxy
            .client
            .tunnel("localhost", s.origin.https.port())
            .await;
        let reply = conn.get("/page", &[header]).await;
        assert_carried(&reply, "datadome", peer);
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// Other vendors' SDK token headers (PerimeterX's `X-PX-AUTHORIZATION`,
/// Kasada's `x-kpsdk-ct`) are credentials too: the exit that first carried
/// a token carries it after, on every new connection.
#[tokio::test]
async fn sdk_token_headers_keep_to_the_exit_that_first_carried_them() {
    let s = Setup::start(3).await;
    for (header, token) in [
        ("x-px-authorization", "3:px-token-of-this-test"),
        ("x-kpsdk-ct", "kasada-token-of-this-test"),
    ] {
        let mut first = None;
        for _ in 0..6 {
            let mut conn = s
                .proxy
                .client
                .tunnel("localhost", s.origin.https.port())
                .await;
            let reply = conn.get("/page", &[(header, token)]).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let peer = Setup::peer(&reply);
            assert!(peer.is_some(), "{header}");
            assert_eq!(*first.get_or_insert(peer), peer, "{header}");
        }
    }
    // Pinned whatever track_cookies says, so no change of it leaves them
    // untracked: a reload (and a restart) goes through.
    s.proxy
        .daemon
        .reload_with(&s.proxy.config)
        .await
        .expect("a reload with token pins held");
    s.stop().await;
}

#[tokio::test]
async fn plain_http_requests_are_pinned_like_tunnelled_ones() {
    let s = Setup::start(3).await;
    let mut jar = Jar::default();
    let port = s.origin.http.port();
    let mut conn = s.proxy.client.plain("localhost", port).await;
    let peer = Setup::peer(&conn.get_with_jar("/login", &mut jar).await).unwrap();
    for _ in 0..6 {
        let mut conn = s.proxy.client.plain("localhost", port).await;
        assert_carried(
            &conn.get_with_jar("/page", &mut jar).await,
            "datadome",
            peer,
        );
    }
    // The same cookie over HTTPS follows the same pin.
    assert_carried(&s.get("/page", &mut jar).await, "datadome", peer);
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn extra_tracked_cookie_patterns_are_pinned_and_others_rotate() {
    let s = Setup::start_with(3, |c| c.track_cookies = vec!["session_*".into()]).await;
    let (mut jar, peer) = s.login("/login?name=session_abc").await;
    for _ in 0..6 {
        assert_carried(&s.get("/page", &mut jar).await, "session_abc", peer);
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;

    // Without the pattern the same cookie is ordinary traffic: it rotates,
    // and this origin catches it coming from other addresses.
    let s = Setup::start(3).await;
    let mut conn = s
        .proxy
        .client
        .tunnel("localhost", s.origin.https.port())
        .await;
    let mut jar = Jar::default();
    conn.get_with_jar("/login?name=session_abc", &mut jar).await;
    for _ in 0..3 {
        conn.get_with_jar("/page", &mut jar).await;
    }
    assert!(
        !s.origin.leaks().is_empty(),
        "an untracked cookie should rotate"
    );
    s.stop().await;
}
