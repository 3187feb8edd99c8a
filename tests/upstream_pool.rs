//! The idle upstream connections of an exit stay within
//! `limits.max_idle_per_exit`: identities that churn (a fresh jar every few
//! pages) must not hold open tunnels through the exit's proxy until they
//! time out, since providers limit those. The longest idle close first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::Setup;
use tokio::time::Instant;

/// One exit whose idle connections are capped at `cap` and never time out.
async fn capped(cap: usize) -> Setup {
    Setup::builder()
        .http1_only_origin()
        .exits(1)
        .config(|c| {
            c.limits.max_idle_per_exit = cap;
            c.timeouts.pool_idle = Duration::from_secs(600);
        })
        .start()
        .await
}

/// Waits (at most 10 s) for `exit`'s open tunnels to fall to `cap`.
async fn assert_tunnels_fall_to(exit: &support::TestExit, cap: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while exit.open_tunnels() > cap && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        exit.open_tunnels() <= cap,
        "{} tunnels open",
        exit.open_tunnels()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_keeps_at_most_max_idle_connections_closing_the_longest_idle() {
    const CAP: usize = 3;
    let s = capped(CAP).await;
    let exit = &s.exits[0];

    // Ten identities, each with a connection of its own left idle.
    let mut jars = Vec::new();
    for _ in 0..10 {
        let (mut jar, _) = s.login("/login").await;
        assert_eq!(s.get("/", &mut jar).await.status, 200);
        jars.push(jar);
    }
    assert!(
        exit.open_tunnels() > CAP,
        "each identity opened its own tunnel"
    );

    // The sweeper (once a second) closes the excess.
    assert_tunnels_fall_to(exit, CAP).await;

    // The newest identity's connection was the last to go idle: it is kept
    // and reused, no new CONNECT.
    let connects = exit.connects().len();
    let newest = jars.last_mut().unwrap();
    let reply = s.tunnel().await.get_with_jar("/", newest).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        exit.connects().len(),
        connects,
        "the newest idle connection was reused"
    );
    s.stop().await;
}

/// Connections in steady use stay open whatever the cap: at a sweep most
/// of them are idle for a moment between requests, and closing one would
/// only make its identity open another tunnel (and TLS handshake) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reused_within_the_last_second_are_not_closed_for_the_cap() {
    const CAP: usize = 1;
    const IDENTITIES: usize = 3;
    let s = capped(CAP).await;
    let exit = &s.exits[0];
    let mut jars = Vec::new();
    for _ in 0..IDENTITIES {
        let (mut jar, _) = s.login("/login").await;
        assert_eq!(s.get("/", &mut jar).await.status, 200);
        jars.push(jar);
    }
    let connects = exit.connects().len();

    // One request at a time, round robin: at any sweep at least two of the
    // three connections are idle, over the cap, and each was used within
    // the last few milliseconds. The sweeper runs once a second, so 2.5 s
    // of traffic spans at least two sweeps.
    let until = Instant::now() + Duration::from_millis(2_500);
    let mut sent = 0;
    while Instant::now() < until && sent < 5_000 {
        let jar = &mut jars[sent % IDENTITIES];
        assert_eq!(s.get("/", jar).await.status, 200);
        sent += 1;
    }
    assert!(sent >= 2 * IDENTITIES, "{sent} requests");
    assert_eq!(
        exit.connects().len(),
        connects,
        "no identity had to open a new tunnel while its connection was in use"
    );

    // Left idle, the excess goes as before.
    assert_tunnels_fall_to(exit, CAP).await;
    s.stop().await;
}
