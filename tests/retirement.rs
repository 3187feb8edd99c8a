//! Retirement under each retire policy: an exit lost mid-run retires its
//! identities, whose requests then fail (`fail`) or leave without their
//! cookies (`strip`), and a retired credential is never pinned anew. Nothing
//! ever moves an identity to another exit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use pinproxy::clock::Clock;
use pinproxy::exits::health::HealthState;
use pinproxy::routing::RetirePolicy;
use support::{error_of, Jar, Setup, MINUTE};

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

async fn exit_killed_mid_run(policy: RetirePolicy) {
    let s = Setup::builder()
        .exits(3)
        .probe_health(3)
        .config(|c| c.identities.retire_policy = policy)
        .start()
        .await;
    let jars = one_identity_per_exit(&s).await;
    let dead = jars[0].1;
    s.exits[dead].kill();
    s.proxy
        .wait_for_health(
            &format!("exit{}", dead + 1),
            HealthState::Dead,
            Duration::from_secs(20),
            "the exit reaches the expected state",
        )
        .await;

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
async fn retired_credentials_are_never_pinned_anew_under_strip() {
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(3)
        .clock(clock.clone())
        .config(|c| {
            c.identities.retire_policy = RetirePolicy::Strip;
            c.identities.idle_timeout = 5 * MINUTE;
        })
        .start()
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
