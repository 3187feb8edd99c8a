//! Conflicts: a request whose credentials belong to identities on different
//! exits (two cookies, or a session key and a cookie) gets a 409 naming them
//! and never leaves, unless the `oldest` policy keeps the first identity and
//! strips the other cookies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::net::IpAddr;

use pinproxy::routing::ConflictPolicy;
use support::{error_of, Jar, Setup};

/// Logs in with fresh jars until a `datadome` and a `cf_clearance` cookie
/// are pinned to two different exits: the `datadome` jar, its exit address,
/// and the `cf_clearance` jar.
async fn jars_on_two_exits(s: &Setup) -> (Jar, IpAddr, Jar) {
    let (first, first_peer) = s.login("/login?name=datadome").await;
    for _ in 0..10 {
        let (second, peer) = s.login("/login?name=cf_clearance").await;
        if peer != first_peer {
            return (first, first_peer, second);
        }
    }
    panic!("rotation never reached a second exit");
}

#[tokio::test]
async fn cookies_pinned_to_different_exits_get_409_naming_them() {
    let s = Setup::start(3).await;
    let (a, _, b) = jars_on_two_exits(&s).await;
    let seen_before = s.origin.seen().len();

    let cookie = format!(
        "datadome={}; cf_clearance={}",
        a.get("datadome").unwrap(),
        b.get("cf_clearance").unwrap()
    );
    let mut conn = s.tunnel().await;
    let reply = conn.get("/page", &[("cookie", cookie.as_str())]).await;

    assert_eq!(reply.status, 409);
    let error = reply.pinproxy_error().expect("X-Pinproxy-Error");
    assert!(error.starts_with("pin-conflict:"), "{error}");
    assert!(
        error.contains("datadome#") && error.contains("cf_clearance#"),
        "{error}"
    );
    let named = ["exit1", "exit2", "exit3"]
        .into_iter()
        .filter(|id| error.contains(&format!("exit {id}")))
        .count();
    assert_eq!(named, 2, "both exits named: {error}");
    assert!(
        !error.contains(a.get("datadome").unwrap()),
        "raw value leaked into the error"
    );
    assert!(reply.body.contains("pinproxy:"));
    assert_eq!(
        s.origin.seen().len(),
        seen_before,
        "a conflicting request must not leave"
    );
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
    let s = Setup::builder()
        .exits(3)
        .config(|c| c.identities.conflict_policy = ConflictPolicy::Oldest)
        .start()
        .await;
    let (older, older_peer, newer) = jars_on_two_exits(&s).await;
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
