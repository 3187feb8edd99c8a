//! Sticky upstream sessions: the `{session}` placeholder in an exit's URL
//! reaches the exit as one stable session name per identity, and when the
//! exit's sticky window ends the identity retires instead of following the
//! provider to a new address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashSet;

use pinproxy::clock::Clock;
use support::{error_of, Setup, TestExitSpec, MINUTE};

#[tokio::test]
async fn the_session_placeholder_reaches_the_exit_as_one_stable_name_per_identity() {
    let s = Setup::builder()
        .exit(TestExitSpec::plain("127.0.0.2").id("gate").with_sessions())
        .start()
        .await;
    let mut names = Vec::new();
    for _ in 0..2 {
        let key = format!("user{}", names.len());
        for _ in 0..3 {
            // Fresh client tunnels; the pool may reuse its upstream tunnel.
            let reply = s
                .get_with("/", &[("x-pinproxy-session", key.as_str())])
                .await;
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
        s.exits[0].close_tunnels();
        let reply = s
            .get_with("/", &[("x-pinproxy-session", key.as_str())])
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
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

/// An identity founded by an answer's cookies takes the anonymous session
/// that carried the answer for its own: cookie-less traffic moves to a
/// fresh session, so neither the identity's session (its address at a
/// provider) nor the connection its first answer came on carries another
/// visitor's requests.
#[tokio::test]
async fn an_identity_founded_by_an_answer_keeps_its_session_to_itself() {
    let s = Setup::builder()
        .exit(TestExitSpec::plain("127.0.0.2").id("gate").with_sessions())
        .config(|c| c.exits[0].anonymous_sessions = 1)
        .start()
        .await;
    let _first = s.login("/login").await;
    let _second = s.login("/login").await;
    s.get_with("/anonymous", &[]).await;

    let listed = s.proxy.daemon.admin().identities(false).await.unwrap();
    let sessions: HashSet<String> = listed.iter().map(|v| v.session.clone()).collect();
    assert_eq!(sessions.len(), 2, "one session each: {listed:?}");
    let seen = s.origin.seen();
    let connection = |path: &str| {
        seen.iter()
            .filter(|r| r.path == path)
            .map(|r| r.peer_port)
            .collect::<Vec<_>>()
    };
    let (logins, after) = (connection("/login"), connection("/anonymous"));
    assert_eq!(logins.len(), 2);
    assert_ne!(
        logins[0], logins[1],
        "each founding answer on its own connection"
    );
    assert!(!logins.contains(&after[0]), "{logins:?} {after:?}");
    // The cookie-less request went out on a session no identity holds.
    let last = s.exits[0].connects().last().unwrap().user.clone().unwrap();
    assert!(
        !sessions
            .iter()
            .any(|session| last.ends_with(session.as_str())),
        "{last} is an identity's session"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_sticky_window_retires_an_identity_instead_of_following_the_new_ip() {
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(2)
        .clock(clock.clone())
        .config(|c| {
            for exit in &mut c.exits {
                exit.sticky_ttl = Some(10 * MINUTE);
            }
        })
        .start()
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

/// Ages are judged on the clock stamps are made with: after a wall clock
/// is stepped back (an NTP correction), an identity founded then lives its
/// whole sticky window and idle time, not one shortened by the step.
#[tokio::test]
async fn an_identity_founded_after_the_clock_stepped_back_lives_its_window() {
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(1)
        .clock(clock.clone())
        .config(|c| c.exits[0].sticky_ttl = Some(10 * MINUTE))
        .start()
        .await;
    clock.advance(MINUTE);
    clock.step_back(60 * MINUTE);
    let (mut jar, peer) = s.login("/login").await;
    clock.advance(5 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer)),
        "{}",
        reply.body
    );
    s.stop().await;
}
