//! Invalidation: an anti-bot verdict (DataDome challenge or hard block,
//! Cloudflare challenge, a 401 after the session worked) passes to the client
//! untouched and retires the identity; ordinary errors do not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use support::{error_of, Setup};

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

/// A verdict met by a burst of one identity's requests (a page's
/// resources, all sent before the first answer came back) retires the
/// identity once: one retirement counted, however many requests found it.
#[tokio::test]
async fn a_verdict_on_a_burst_of_requests_counts_one_retirement() {
    let s = Setup::start(2).await;
    let (jar, _) = s.login("/login").await;
    let burst = 4;
    let requests = (0..burst).map(|_| {
        let (s, mut jar) = (&s, jar.clone());
        async move { s.get("/held-challenge", &mut jar).await }
    });
    let release = async {
        s.origin.wait_for_many("/held-challenge", burst).await;
        s.origin.release_held(burst);
    };
    let (verdicts, ()) = tokio::join!(futures_util::future::join_all(requests), release);
    for verdict in &verdicts {
        assert_eq!(verdict.status, 403, "{}", verdict.body);
    }
    let metrics = s.proxy.daemon.admin().metrics.clone();
    // The stop waits for the retirements' stores, which count them.
    s.stop().await;
    let text = metrics.encode();
    let invalidations: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("pinproxy_invalidations_total{"))
        .collect();
    assert!(
        invalidations
            .iter()
            .any(|l| l.ends_with(&format!("}} {burst}"))),
        "every verdict is counted: {invalidations:?}"
    );
    let retired = support::retirements_counted(&text);
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert!(
        retired[0].ends_with("reason=\"invalidated\"} 1"),
        "{retired:?}"
    );
}

#[tokio::test]
async fn a_datadome_hard_block_retires_the_identity() {
    invalidated_by("/blocked", "datadome-hard-block").await;
}

#[tokio::test]
async fn a_challenge_trickled_one_byte_per_chunk_is_found_past_60k_of_padding() {
    // Every chunk is searched with only the bytes before it a marker may
    // straddle: searching the whole window again on every chunk took a
    // release build a minute of CPU for such a page.
    invalidated_by("/challenge-dripped?pad=60000", "datadome-challenge").await;
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
