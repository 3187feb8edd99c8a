//! Identity lifetimes: an identity retires when it sits idle too long (the
//! global idle timeout, or a shorter one of its exit), when it outlives its
//! maximum lifetime, and a pin learnt from Set-Cookie ends with its cookie.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use pinproxy::clock::Clock;
use support::{error_of, Setup, MINUTE};

#[tokio::test]
async fn idle_and_old_identities_expire() {
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(2)
        .clock(clock.clone())
        .config(|c| {
            c.identities.idle_timeout = 5 * MINUTE;
            c.identities.max_lifetime = 30 * MINUTE;
        })
        .start()
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
    let s = Setup::builder()
        .exits(2)
        .clock(clock.clone())
        .config(|c| c.identities.idle_timeout = 24 * 60 * MINUTE)
        .start()
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

/// An origin that sets a pinned value again with a later expiry (a
/// sliding session) has the client keep it longer: the pin lives as long.
#[tokio::test]
async fn a_cookie_set_again_with_a_later_expiry_keeps_its_pin_as_long() {
    let clock = Clock::manual();
    let s = Setup::start_clocked(2, clock.clone(), |c| {
        c.identities.idle_timeout = 24 * 60 * MINUTE;
    })
    .await;
    let (mut jar, peer) = s.login("/login").await;
    let token = jar.get("datadome").unwrap().to_owned();
    clock.advance(50 * MINUTE);
    let reply = s.get("/refresh", &mut jar).await;
    assert_eq!(reply.status, 200);
    assert_eq!(jar.get("datadome"), Some(token.as_str()), "the same value");
    // Past the first expiry, within the second.
    clock.advance(20 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer)),
        "{}",
        error_of(&reply)
    );
    // And past the second.
    clock.advance(45 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert!(
        error_of(&reply).contains("cookie-expired"),
        "{}",
        error_of(&reply)
    );
    s.stop().await;
}

#[tokio::test]
async fn an_exit_can_shorten_the_idle_timeout_of_its_identities() {
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(1)
        .clock(clock.clone())
        .config(|c| c.exits[0].idle_timeout = Some(2 * MINUTE))
        .start()
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

#[tokio::test]
async fn an_expired_identity_is_retired_once_whatever_its_cookie_count() {
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(2)
        .clock(clock.clone())
        .config(|c| c.identities.idle_timeout = 5 * MINUTE)
        .start()
        .await;
    // One identity holding three tracked cookies.
    let (mut jar, peer) = s.login("/login").await;
    for name in ["cf_clearance", "_abck"] {
        let reply = s.get(&format!("/login?name={name}"), &mut jar).await;
        assert_eq!(
            (reply.status.as_u16(), Setup::peer(&reply)),
            (200, Some(peer))
        );
    }
    clock.advance(6 * MINUTE);
    // All three come back on one request: the store read them all before
    // the first was found idle, and each used to retire the identity again.
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 502);
    assert!(
        error_of(&reply).contains("idle-expired"),
        "{}",
        error_of(&reply)
    );
    let metrics = s.proxy.daemon.admin().metrics.encode();
    let retired = support::retirements_counted(&metrics);
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert!(
        retired[0].ends_with("reason=\"idle-expired\"} 1"),
        "{retired:?}"
    );
    s.stop().await;
}

/// A sweep judges identities by the exits in force when it began: one
/// founded while it runs (here: at the same instant), on an exit a reload
/// has just added, is not retired as `exit-removed` by the sweep's older
/// set; it routes to its exit afterwards.
#[tokio::test]
async fn a_sweep_does_not_retire_an_identity_founded_on_an_exit_added_meanwhile() {
    use pinproxy::credential::PinHasher;
    use pinproxy::exits::ExitSet;

    let clock = Clock::manual();
    let hasher = PinHasher::new([7; 32]);
    let before = ExitSet::new(
        vec![support::routing_only_exit("old", "direct://127.0.0.2")],
        None,
    );
    let after = ExitSet::new(
        vec![support::routing_only_exit("added", "direct://127.0.0.3")],
        None,
    );
    pinproxy::exits::routes::found_on(&before, &hasher);
    pinproxy::exits::routes::found_on(&after, &hasher);
    let router = support::memory_router(clock.clone(), false);
    let credential =
        |name: &str| pinproxy::proxy::credentials::session_key::credential(&hasher, None, name);
    let (earlier, key) = (credential("earlier"), credential("k"));
    // One identity on the added exit a minute before the sweep, one at
    // its start.
    let route = |key: pinproxy::credential::Credential| {
        let (router, after) = (&router, &after);
        async move { router.route(after, &[key], Default::default).await }
    };
    route(earlier.clone()).await.unwrap();
    clock.advance(std::time::Duration::from_secs(60));
    let founded = route(key.clone()).await.unwrap();
    assert_eq!(founded.exit.id().to_string(), "added");

    router.sweep(&before).await.unwrap();
    let routed = route(key.clone())
        .await
        .expect("the identity lives on its exit");
    assert_eq!(routed.exit.id().to_string(), "added");
    assert_eq!(
        routed.identity.map(|i| i.id),
        founded.identity.map(|i| i.id)
    );
    // The one founded before the sweep began is judged by its set, as
    // before.
    let error = route(earlier.clone()).await.unwrap_err();
    assert!(format!("{error:?}").contains("ExitRemoved"), "{error:?}");
}
