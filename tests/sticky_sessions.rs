//! Sticky upstream sessions: the `{session}` placeholder in an exit's URL
//! reaches the exit as one stable session name per identity, and when the
//! exit's sticky window ends the identity retires instead of following the
//! provider to a new address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashSet;

use pinproxy::clock::Clock;
use support::{error_of, Jar, Setup, TestExitSpec, MINUTE};

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
    let s = one_anonymous_session().await;
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

/// An identity founded by an answer goes on with the connection that
/// carried it, as a browser goes on with the connection its cookies came
/// on: its next requests take that connection (HTTP/1.1: once the answer
/// has been read), not a new one with a handshake of its own from the
/// same address right after. An HTTP/1.1 connection only when it was
/// dialled for the founding request: one that carried other cookie-less
/// requests first (the lane serves every client with the same
/// ClientHello) goes to nobody (it closes). An HTTP/2 connection goes to
/// the first identity founded on it, and no cookie-less request takes it
/// after.
#[tokio::test]
async fn an_identity_goes_on_with_the_connection_its_cookies_came_on() {
    let s = one_anonymous_session().await;
    let port = s.origin.https.port();
    let connection_of = |path: &str| {
        let seen = s.origin.seen();
        let of: Vec<u16> = seen
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.peer_port)
            .collect();
        assert_eq!(of.len(), 1, "{path}: {of:?}");
        of[0]
    };

    // Dialled for the login: the identity's from its answer on.
    let (mut jar, _) = s.login("/login?visit=1").await;
    assert_eq!(s.get("/page?n=1", &mut jar).await.status, 200);
    assert_eq!(s.get("/page?n=2", &mut jar).await.status, 200);
    let first = connection_of("/login?visit=1");
    assert_eq!(connection_of("/page?n=1"), first);
    assert_eq!(connection_of("/page?n=2"), first);

    // A cookie-less request first, then a login on its connection (one
    // anonymous session, so one lane): the identity does not take it.
    s.get_with("/anonymous", &[]).await;
    let (mut jar, _) = s.login("/login?visit=2").await;
    assert_eq!(connection_of("/login?visit=2"), connection_of("/anonymous"));
    assert_eq!(s.get("/page?n=3", &mut jar).await.status, 200);
    let second = connection_of("/page?n=3");
    assert_ne!(second, connection_of("/login?visit=2"));
    assert_ne!(second, first);

    // HTTP/2, after a cookie-less request on the lane's connection: the
    // identity founded on it goes on with it; cookie-less traffic goes on
    // with a fresh session (so another connection).
    let mut h2 = s.proxy.client.tunnel_h2("localhost", port).await;
    assert_eq!(h2.get("/anonymous?h2=1", &[]).await.status, 200);
    let login = h2.get("/login?visit=3", &[]).await;
    assert_eq!(login.status, 200, "{}", login.body);
    let mut jar = Jar::default();
    jar.store(&login.headers);
    let cookie = jar.header().unwrap();
    let page = h2.get("/page?n=4", &[("cookie", &cookie)]).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(h2.get("/anonymous?h2=2", &[]).await.status, 200);
    let h2_login = connection_of("/login?visit=3");
    assert_eq!(connection_of("/anonymous?h2=1"), h2_login);
    assert_eq!(connection_of("/page?n=4"), h2_login);
    assert_ne!(connection_of("/anonymous?h2=2"), h2_login);
    let versions: Vec<http::Version> = s
        .origin
        .seen()
        .iter()
        .filter(|r| {
            r.path.starts_with("/anonymous?h2=")
                || r.path == "/login?visit=3"
                || r.path == "/page?n=4"
        })
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, [http::Version::HTTP_2; 4]);
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// The peer ports `s`'s origin saw requests for `path` come from.
fn ports_of(s: &Setup, path: &str) -> Vec<u16> {
    let seen = s.origin.seen();
    seen.iter()
        .filter(|r| r.path == path)
        .map(|r| r.peer_port)
        .collect()
}

/// One exit filling `{session}`, whose cookie-less traffic has a single
/// anonymous session (so one lane).
async fn one_anonymous_session() -> Setup {
    Setup::builder()
        .exit(TestExitSpec::plain("127.0.0.2").id("gate").with_sessions())
        .config(|c| c.exits[0].anonymous_sessions = 1)
        .start()
        .await
}

/// Runs `a` and `b`, requests for `/login?held=1&who=a` and `...who=b`,
/// together, and lets the origin answer them once both have arrived: two
/// answers that found identities at the same moment.
async fn both_at_once<A: std::future::Future, B: std::future::Future>(
    s: &Setup,
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    let (a, b, ()) = tokio::join!(a, b, async {
        s.origin.wait_for("/login?held=1&who=a").await;
        s.origin.wait_for("/login?held=1&who=b").await;
        s.origin.release_held(2);
    });
    (a, b)
}

/// Two answers on one cookie-less lane found two identities at once, on
/// two HTTP/1.1 connections dialled for them: the first identity goes on
/// with its login's connection, and the other's login connection, which
/// the origin linked to that other identity when it set its cookie there,
/// serves nobody after (it closes; it went back to the cookie-less lane
/// before). A cookie-less lane's connection whose answer founded an
/// identity without being dialled for it closes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_an_identity_was_founded_on_serves_no_one_else_after() {
    let s = one_anonymous_session().await;
    let exit = &s.exits[0];
    let (a, b) = both_at_once(
        &s,
        s.login("/login?held=1&who=a"),
        s.login("/login?held=1&who=b"),
    )
    .await;
    let (mut jar_a, mut jar_b) = (a.0, b.0);
    assert_ne!(jar_a.header(), jar_b.header());
    let login_a = ports_of(&s, "/login?held=1&who=a");
    let login_b = ports_of(&s, "/login?held=1&who=b");
    assert_eq!((login_a.len(), login_b.len()), (1, 1));
    assert_ne!(login_a, login_b, "each login had a connection of its own");
    // The heir's connection stays open, idle in its identity's lane; the
    // other one closes.
    exit.assert_open_tunnels_fall_to(1).await;
    assert_eq!(exit.open_tunnels(), 1);

    for n in 1..=2 {
        assert_eq!(s.get(&format!("/page?a={n}"), &mut jar_a).await.status, 200);
        assert_eq!(s.get(&format!("/page?b={n}"), &mut jar_b).await.status, 200);
    }
    let pages_a: HashSet<u16> = (1..=2)
        .flat_map(|n| ports_of(&s, &format!("/page?a={n}")))
        .collect();
    let pages_b: HashSet<u16> = (1..=2)
        .flat_map(|n| ports_of(&s, &format!("/page?b={n}")))
        .collect();
    assert_eq!(
        (pages_a.len(), pages_b.len()),
        (1, 1),
        "{pages_a:?} {pages_b:?}"
    );
    assert!(pages_a.is_disjoint(&pages_b));
    // Exactly one identity went on with its login's connection; the other
    // dialled one of its own.
    let went_on = [(&pages_a, login_a[0]), (&pages_b, login_b[0])]
        .iter()
        .filter(|(pages, login)| pages.contains(login))
        .count();
    assert_eq!(
        went_on, 1,
        "a {login_a:?} {pages_a:?}, b {login_b:?} {pages_b:?}"
    );

    // A cookie-less request, then a login on its connection (not dialled
    // for it): the connection closes once the login's answer has been read.
    exit.close_tunnels();
    exit.assert_open_tunnels_fall_to(0).await;
    assert_eq!(s.get_with("/anonymous", &[]).await.status, 200);
    let (_jar, _) = s.login("/login?visit=reused").await;
    assert_eq!(
        ports_of(&s, "/anonymous"),
        ports_of(&s, "/login?visit=reused"),
        "the login took the cookie-less connection"
    );
    exit.assert_open_tunnels_fall_to(0).await;
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// A cookie-less HTTP/2 connection whose answer set a tracked cookie
/// serves no other visitor after, also when the answer founded nothing
/// (its value was pinned already, or the answer was refused: the origin
/// still linked the connection to whoever holds the cookie). Over HTTP/1.1
/// such a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_a_cookie_was_set_on_serves_no_one_after_a_founding_that_failed() {
    let s = one_anonymous_session().await;
    let port = s.origin.https.port();
    let mut h2 = s.proxy.client.tunnel_h2("localhost", port).await;
    // Founds an identity on `_px3_0=v`, which takes its connection.
    assert_eq!(h2.get("/set-many?n=1&visit=1", &[]).await.status, 200);
    // The same value again: pinned already, so nothing is founded.
    assert_eq!(h2.get("/set-many?n=1&visit=2", &[]).await.status, 200);
    let set_on = ports_of(&s, "/set-many?n=1&visit=2");
    assert_eq!(set_on.len(), 1);
    assert_eq!(h2.get("/anonymous?after=1", &[]).await.status, 200);
    let after = ports_of(&s, "/anonymous?after=1");
    assert_eq!(after.len(), 1);
    assert_ne!(
        after, set_on,
        "a cookie-less request took the connection a cookie was set on"
    );
    // An answer refused for a tracked name too long to pin: the same.
    let refused = h2.get("/set-many?n=1&name_len=2000&visit=3", &[]).await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    let refused_on = ports_of(&s, "/set-many?n=1&name_len=2000&visit=3");
    assert_eq!(h2.get("/anonymous?after=2", &[]).await.status, 200);
    let after = ports_of(&s, "/anonymous?after=2");
    assert_eq!(after.len(), 1);
    assert_ne!(
        after, refused_on,
        "a cookie-less request took the connection a refused answer set a cookie on"
    );
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// Two answers on one cookie-less HTTP/2 connection found two identities
/// at once: the connection goes to exactly one of them; the other's
/// requests, and cookie-less ones, take other connections, and no later
/// connection is shared by the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identities_founded_on_one_http2_connection_never_share_one_after() {
    let s = one_anonymous_session().await;
    let port = s.origin.https.port();
    // Two client tunnels of one client: one cookie-less lane, so one
    // upstream HTTP/2 connection.
    let mut h2a = s.proxy.client.tunnel_h2("localhost", port).await;
    let mut h2b = s.proxy.client.tunnel_h2("localhost", port).await;
    assert_eq!(h2a.get("/anonymous?warm=1", &[]).await.status, 200);
    assert_eq!(h2b.get("/anonymous?warm=2", &[]).await.status, 200);
    let warm = [
        ports_of(&s, "/anonymous?warm=1"),
        ports_of(&s, "/anonymous?warm=2"),
    ];
    assert_eq!(warm[0], warm[1], "one upstream connection");
    let shared = warm[0][0];

    let (login_a, login_b) = both_at_once(
        &s,
        h2a.get("/login?held=1&who=a", &[]),
        h2b.get("/login?held=1&who=b", &[]),
    )
    .await;
    let jar = |login: &support::Reply| {
        assert_eq!(login.status, 200, "{}", login.body);
        let mut jar = Jar::default();
        jar.store(&login.headers);
        jar.header().unwrap()
    };
    let (cookie_a, cookie_b) = (jar(&login_a), jar(&login_b));
    assert_ne!(cookie_a, cookie_b);
    assert_eq!(ports_of(&s, "/login?held=1&who=a"), [shared]);
    assert_eq!(ports_of(&s, "/login?held=1&who=b"), [shared]);

    for n in 1..=2 {
        let page = h2a
            .get(&format!("/page?a={n}"), &[("cookie", &cookie_a)])
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let page = h2b
            .get(&format!("/page?b={n}"), &[("cookie", &cookie_b)])
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
    }
    let pages = |who: &str| -> HashSet<u16> {
        (1..=2)
            .flat_map(|n| ports_of(&s, &format!("/page?{who}={n}")))
            .collect()
    };
    let (pages_a, pages_b) = (pages("a"), pages("b"));
    assert_eq!(
        (pages_a.len(), pages_b.len()),
        (1, 1),
        "{pages_a:?} {pages_b:?}"
    );
    assert!(pages_a.is_disjoint(&pages_b), "{pages_a:?} {pages_b:?}");
    assert!(
        pages_a.contains(&shared) != pages_b.contains(&shared),
        "exactly one identity goes on with the connection: {shared} {pages_a:?} {pages_b:?}"
    );
    assert_eq!(h2a.get("/anonymous?after=1", &[]).await.status, 200);
    let after = ports_of(&s, "/anonymous?after=1");
    assert_eq!(after.len(), 1);
    assert!(
        after[0] != shared && !pages_a.contains(&after[0]) && !pages_b.contains(&after[0]),
        "{after:?}"
    );
    // Founded together on one anonymous session, the two share it (both
    // cookies were earned from its address).
    let listed = s.proxy.daemon.admin().identities(false).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].session, listed[1].session, "{listed:?}");
    assert!(s.origin.leaks().is_empty());
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

/// A wall clock stepped back (an NTP correction of a clock that read
/// ahead, a VM resumed) does not lengthen the sticky window of an identity
/// founded before the step: the provider's session ends by real time, and
/// may move to another address then.
#[tokio::test]
async fn a_clock_stepped_back_does_not_lengthen_a_window_begun_before_it() {
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(1)
        .clock(clock.clone())
        .config(|c| c.exits[0].sticky_ttl = Some(10 * MINUTE))
        .start()
        .await;
    let (mut jar, _) = s.login("/login").await;
    clock.advance(5 * MINUTE);
    clock.step_back(60 * MINUTE);
    clock.advance(6 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status.as_u16(), 502, "{}", reply.body);
    assert!(reply.body.contains("sticky-expired"), "{}", reply.body);
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
