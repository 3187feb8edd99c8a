//! Shared test harness: pinproxy started in-process on 127.0.0.1:0 with test
//! origins and exits on loopback ([`Setup::builder`], in `setup`), a client
//! that goes through the proxy, real third-party programs (`procs`), and
//! helpers several test files share.
#![allow(dead_code, unused_imports)]

pub mod admin;
pub mod allocations;
pub mod browser;
pub mod client;
pub mod devtools;
pub mod exit;
pub mod fixtures;
pub mod fingerprint_origin;
pub mod firefox;
pub mod origin;
pub mod procs;
pub mod raw_origin;
pub mod redis_group;
pub mod setup;

use std::time::Duration;

pub use client::{Conn, Jar, ProxyClient, Reply};
pub use exit::TestExit;
pub use origin::Origin;
pub use setup::{exits, Env, Proxy, Setup, SetupBuilder, TestExitSpec, SESSION_CREDENTIALS};

/// A minute, for tests that move a manual clock.
pub const MINUTE: Duration = Duration::from_secs(60);

/// The `X-Pinproxy-Error` of a reply, or "" without one.
pub fn error_of(reply: &Reply) -> String {
    reply.pinproxy_error().unwrap_or_default()
}

/// Asserts that `daemon` counted no fingerprint drift and no fingerprint
/// mismatch (what an identity's connections sent against its client's).
pub fn assert_no_fingerprint_drift(daemon: &pinproxy::daemon::Daemon) {
    let metrics = daemon.admin().metrics.encode();
    for counter in [
        "pinproxy_fingerprint_drift_total{",
        "pinproxy_fingerprint_mismatches_total{",
    ] {
        assert!(!metrics.contains(counter), "{counter}: {metrics}");
    }
}

/// The `pinproxy_identities_retired_total` lines of a metrics text.
pub fn retirements_counted(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("pinproxy_identities_retired_total{"))
        .collect()
}

/// Command-line arguments giving a pinproxy process `origin`'s CA and these
/// `(id, url)` exits.
pub fn process_args(origin: &Origin, exits: &[(String, String)]) -> Vec<String> {
    let mut args = vec![
        "--upstream-ca".to_owned(),
        origin.pki.ca_file.display().to_string(),
    ];
    for (id, url) in exits {
        args.push("--exit".into());
        args.push(format!("{id}={url}"));
    }
    args
}

/// A router over a fresh in-memory store at `clock`, with the default
/// policies' lifetimes (30 min idle, 2 h at most) and `shared_store` as
/// given, for tests that route in process.
pub fn memory_router(
    clock: pinproxy::clock::Clock,
    shared_store: bool,
) -> pinproxy::routing::Router {
    use pinproxy::routing::{Policies, Router};
    use pinproxy::store::{memory::MemoryStore, Store};
    Router::new(
        Store::Memory(MemoryStore::new()),
        clock,
        Policies {
            retire: Default::default(),
            conflict: Default::default(),
            idle_timeout_ms: 30 * 60_000,
            max_lifetime_ms: 120 * 60_000,
            keep_retired_ms: 24 * 3_600_000,
            shared_store,
        },
        std::sync::Arc::new(pinproxy::metrics::Metrics::new()),
        tokio_util::task::TaskTracker::new(),
    )
}

/// An exit `id` at `url` for tests that route to it in process and never
/// send through it (pool: [`routing_only_pool`]); unhealthy after one
/// failure, dead after two.
pub fn routing_only_exit(id: &str, url: &str) -> pinproxy::exits::Exit {
    use pinproxy::exits::health::{Health, Thresholds};
    use pinproxy::exits::sessions::AnonymousSessions;
    use pinproxy::exits::{Exit, ExitSpec};
    let tls = pinproxy::upstream::tls::UpstreamTls::new(pinproxy::daemon::crypto_provider(), &[])
        .unwrap();
    let spec = ExitSpec::parse(id, url).unwrap();
    Exit::new(
        spec.clone(),
        pinproxy::upstream::ExitClient::new(spec.route(), tls, &routing_only_pool()),
        Health::new(Thresholds {
            unhealthy_after: 1,
            dead_after: 2,
            healthy_after: 1,
        }),
        AnonymousSessions::new(1, None, 0),
    )
}

/// Pool settings for exits that tests route to in process and never send
/// through: short timeouts, one idle connection.
pub fn routing_only_pool() -> pinproxy::upstream::PoolSettings {
    pinproxy::upstream::PoolSettings {
        connect_timeout: Duration::from_secs(1),
        response_head_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        max_idle_per_origin: 1,
        max_idle_per_exit: 1,
        guard: Default::default(),
        parked: Default::default(),
        replayed: Default::default(),
        unread: Default::default(),
    }
}
