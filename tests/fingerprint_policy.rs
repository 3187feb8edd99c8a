//! The fingerprint policy: an identity keeps the request fingerprint (user
//! agent, languages) it started with, and drift is counted (`warn`), refused
//! (`reject`) or rewritten back (`restore`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use pinproxy::fingerprint::FingerprintPolicy;
use support::{error_of, Jar, Setup};

async fn drift_under(policy: FingerprintPolicy) -> (Setup, Jar, support::Reply) {
    let s = Setup::builder()
        .exits(2)
        .config(|c| c.identities.fingerprint_policy = policy)
        .start()
        .await;
    let mut jar = Jar::default();
    let mut conn = s.tunnel().await;
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
