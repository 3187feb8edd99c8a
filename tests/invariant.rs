//! The invariant, as a property: over random interleavings of requests,
//! responses that set cookies, exit failures and recoveries, time passing,
//! sweeps and retirements, under every retire and conflict policy, a
//! credential is never sent (nor earned) through two different
//! (exit, upstream session) pairs.
//!
//! This drives the real router (`Affinity`) and exits in process, without
//! sockets: routing decisions are what the invariant is about.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pinproxy::clock::Clock;
use pinproxy::credential::PinKind;
use pinproxy::credential::{Credential, PinHasher, PinKey};
use pinproxy::exits::health::{Health, Thresholds};
use pinproxy::exits::sessions::AnonymousSessions;
use pinproxy::exits::{Exit, ExitSet, ExitSpec};
use pinproxy::fingerprint::Fingerprint;
use pinproxy::identity::ExitId;
use pinproxy::identity::{RetireReason, SessionId};
use pinproxy::metrics::Metrics;
use pinproxy::proxy::capture::learn;
use pinproxy::proxy::credentials::cookies::SetTrackedCookie;
use pinproxy::routing::{ConflictPolicy, Policies, RetirePolicy, Route, Router};
use pinproxy::store::memory::MemoryStore;
use pinproxy::store::Store;
use pinproxy::upstream::ExitClient;
use proptest::prelude::*;
use tokio_util::task::TaskTracker;

const EXITS: usize = 3;
const COOKIES: u8 = 10;
const KEYS: u8 = 3;
const THRESHOLDS: Thresholds = Thresholds {
    unhealthy_after: 1,
    dead_after: 2,
    healthy_after: 1,
};

#[derive(Clone, Debug)]
enum Op {
    /// A request with these cookies, session key and user agent.
    Request {
        cookies: Vec<u8>,
        key: Option<u8>,
        agent: u8,
    },
    /// The last routed request's response sets this cookie: a value of
    /// its own (`fresh`, as an origin mints one), or the one requests of
    /// this cookie carry now (an origin refreshing it, or a value pinned
    /// elsewhere reaching this identity).
    Respond {
        cookie: u8,
        fresh: bool,
        max_age_min: Option<u8>,
    },
    /// An exit dies (health checks declare it dead).
    ExitDies(usize),
    /// An exit comes back.
    ExitRecovers(usize),
    /// Time passes.
    Advance(u16),
    /// The background sweep runs.
    Sweep,
    /// The origin invalidates the last routed request's identity.
    Invalidate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::collection::vec(0..COOKIES, 0..4), prop::option::of(0..KEYS), 0..2u8)
            .prop_map(|(cookies, key, agent)| Op::Request { cookies, key, agent }),
        3 => (0..COOKIES, any::<bool>(), prop::option::of(1..90u8))
            .prop_map(|(cookie, fresh, max_age_min)| Op::Respond { cookie, fresh, max_age_min }),
        1 => (0..EXITS).prop_map(Op::ExitDies),
        1 => (0..EXITS).prop_map(Op::ExitRecovers),
        2 => (0..40u16).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
        1 => Just(Op::Invalidate),
    ]
}

fn exit_set(now_ms: u64) -> ExitSet {
    let tls = pinproxy::upstream::tls::UpstreamTls::new(pinproxy::daemon::crypto_provider(), &[])
        .unwrap();
    let pool = crate::support::routing_only_pool();
    // One exit with a sticky upstream session per identity, two plain ones.
    let urls = [
        "http://cust-session-{session}:pw@127.0.0.1:9",
        "http://127.0.0.1:9",
        "direct://127.0.0.4",
    ];
    let exits = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let mut spec = ExitSpec::parse(&format!("e{i}"), url).unwrap();
            if i == 0 {
                spec.options.sticky_ttl = Some(Duration::from_secs(20 * 60));
            }
            let anonymous = if spec.has_session_placeholder() { 4 } else { 1 };
            Exit::new(
                spec.clone(),
                ExitClient::new(spec.route(), tls.clone(), &pool),
                Health::new(THRESHOLDS),
                AnonymousSessions::new(
                    anonymous,
                    spec.options.sticky_ttl.map(|d| d.as_millis() as u64),
                    now_ms,
                ),
            )
        })
        .collect();
    ExitSet::new(exits, None)
}

const NAMES: [&str; 3] = ["datadome", "cf_clearance", "_abck"];

/// Cookie `n`'s value of generation `k` (a fresh value per `Set-Cookie`
/// that mints one).
fn cookie(hasher: &PinHasher, n: u8, k: u32) -> (Credential, String) {
    let name = NAMES[usize::from(n) % NAMES.len()];
    let value = format!("value-{n}-{k}");
    (
        Credential {
            kind: PinKind::Cookie,
            name: name.into(),
            key: hasher.cookie(name, &value),
        },
        value,
    )
}

/// Where each credential has been sent or earned.
#[derive(Default)]
struct Ledger {
    seen: HashMap<PinKey, (ExitId, SessionId)>,
    /// What a case exercised: a property that held only because nothing
    /// was ever sent twice would prove nothing.
    coverage: Coverage,
}

/// Counts of what the cases exercised (see [`Ledger::coverage`]).
#[derive(Default, Debug, Clone, Copy)]
struct Coverage {
    /// Requests routed, and refused.
    routed: u64,
    refused: u64,
    /// Credentials sent again after being sent or earned before: the
    /// records the invariant is checked on.
    repeats: u64,
    /// Fresh values earned on a response, checked against its route.
    earned: u64,
}

impl Coverage {
    fn add(&mut self, other: Coverage) {
        self.routed += other.routed;
        self.refused += other.refused;
        self.repeats += other.repeats;
        self.earned += other.earned;
    }
}

impl Ledger {
    fn record(
        &mut self,
        credential: &Credential,
        route: &Route,
        what: &str,
    ) -> Result<(), TestCaseError> {
        let here = (route.exit.id().clone(), route.lane.session);
        if let Some(before) = self.seen.get(&credential.key) {
            self.coverage.repeats += 1;
            prop_assert_eq!(
                before,
                &here,
                "{} {} went out through {:?} after {:?}",
                what,
                credential,
                here,
                before
            );
        }
        self.seen.insert(credential.key, here);
        Ok(())
    }
}

async fn run(
    ops: Vec<Op>,
    retire: RetirePolicy,
    conflict: ConflictPolicy,
) -> Result<Coverage, TestCaseError> {
    let clock = Clock::manual();
    let exits = Arc::new(exit_set(clock.now_ms()));
    let router = Router::new(
        Store::Memory(MemoryStore::new()),
        clock.clone(),
        Policies {
            retire,
            conflict,
            idle_timeout_ms: 30 * 60_000,
            max_lifetime_ms: 120 * 60_000,
            // Retired credentials are remembered far longer than a case runs.
            keep_retired_ms: 10 * 365 * 24 * 3_600_000,
            shared_store: false,
        },
        Arc::new(Metrics::new()),
        TaskTracker::new(),
    );
    let hasher = PinHasher::new([9; 32]);
    let mut ledger = Ledger::default();
    let mut last: Option<(Route, Fingerprint)> = None;
    // Each cookie's current value, by generation.
    let mut generation = [0u32; COOKIES as usize];

    for op in ops {
        match op {
            Op::Request {
                cookies,
                key,
                agent,
            } => {
                let mut credentials: Vec<Credential> = key
                    .map(|k| {
                        pinproxy::proxy::credentials::session_key::credential(
                            &hasher,
                            None,
                            &format!("key{k}"),
                        )
                    })
                    .into_iter()
                    .collect();
                for n in cookies {
                    let (c, _) = cookie(&hasher, n, generation[usize::from(n)]);
                    if !credentials.iter().any(|x| x.key == c.key) {
                        credentials.push(c);
                    }
                }
                let mut headers = http::HeaderMap::new();
                headers.insert(
                    "user-agent",
                    http::HeaderValue::from_static(["UA-A", "UA-B"][usize::from(agent)]),
                );
                let fingerprint = Fingerprint::of(&headers);
                match router
                    .route(&exits, &credentials, || Fingerprint::of(&headers))
                    .await
                {
                    Ok(route) => {
                        ledger.coverage.routed += 1;
                        for credential in credentials
                            .iter()
                            .filter(|c| !route.strip.iter().any(|s| s.key == c.key))
                        {
                            ledger.record(credential, &route, "sent")?;
                        }
                        last = Some((route, fingerprint));
                    }
                    Err(_) => {
                        ledger.coverage.refused += 1;
                        last = None;
                    }
                }
            }
            Op::Respond {
                cookie: n,
                fresh,
                max_age_min,
            } => {
                let Some((route, fingerprint)) = &last else {
                    continue;
                };
                if fresh {
                    generation[usize::from(n)] += 1;
                }
                let (credential, _) = cookie(&hasher, n, generation[usize::from(n)]);
                let set = SetTrackedCookie {
                    cookie: credential.clone(),
                    deletes: false,
                    expires_ms: max_age_min.map(|m| clock.now_ms() + u64::from(m) * 60_000),
                    also: false,
                };
                let identity = learn(&router, route, &[set], fingerprint, None, None)
                    .await
                    .unwrap();
                if let Some(identity) = identity {
                    let binding =
                        pinproxy::store::PinStore::lookup(router.store(), &[credential.key])
                            .await
                            .unwrap();
                    let pinned_to = binding[0].as_ref().map(|b| b.pin.identity);
                    if fresh {
                        // A value never seen before was earned through this
                        // response's route, whatever it is pinned to: a pin
                        // to an identity elsewhere shows when it is next sent.
                        prop_assert!(pinned_to.is_some(), "a fresh {} was not pinned", credential);
                        ledger.record(&credential, route, "earned")?;
                        ledger.coverage.earned += 1;
                    } else if pinned_to == Some(identity.id) {
                        // A value requests carried before: earned here only
                        // if it is pinned to this response's identity now.
                        ledger.record(&credential, route, "earned")?;
                    }
                    // Later requests of this identity use its lane.
                    let mut route = route.clone();
                    if route.identity.is_none() {
                        route.lane = pinproxy::upstream::Lane::identity(&identity);
                        route.identity = Some(identity);
                    }
                    last = Some((route, fingerprint.clone()));
                }
            }
            Op::ExitDies(i) => {
                let exit = exits.iter().nth(i).unwrap();
                for _ in 0..THRESHOLDS.dead_after {
                    exit.health.failure(clock.now_ms());
                }
            }
            Op::ExitRecovers(i) => {
                let exit = exits.iter().nth(i).unwrap();
                for _ in 0..THRESHOLDS.healthy_after {
                    exit.health.success();
                }
            }
            Op::Advance(minutes) => clock.advance(Duration::from_secs(u64::from(minutes) * 60)),
            Op::Sweep => {
                router.sweep(&exits).await.unwrap();
            }
            Op::Invalidate => {
                if let Some((
                    Route {
                        identity: Some(identity),
                        ..
                    },
                    _,
                )) = &last
                {
                    router
                        .retire(
                            &exits,
                            identity,
                            RetireReason::Invalidated {
                                rule: "test".into(),
                            },
                        )
                        .await
                        .unwrap();
                }
            }
        }
    }
    Ok(ledger.coverage)
}

/// The property over 300 random cases (`PROPTEST_CASES` to change), and a
/// floor on what they exercised: a router that refused or stripped every
/// credential it had seen before would never send one twice.
#[test]
fn a_credential_never_leaves_through_two_exit_session_pairs() {
    use proptest::test_runner::{Config, TestRunner};
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    // Failing cases are kept beside this file, as `proptest!` keeps them.
    let mut runner = TestRunner::new(Config {
        cases,
        source_file: Some(file!()),
        ..Config::default()
    });
    let totals = std::sync::Mutex::new(Coverage::default());
    let strategy = (
        prop::collection::vec(op(), 1..120),
        any::<bool>(),
        any::<bool>(),
    );
    let outcome = runner.run(&strategy, |(ops, strip, oldest)| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let retire = if strip {
            RetirePolicy::Strip
        } else {
            RetirePolicy::Fail
        };
        let conflict = if oldest {
            ConflictPolicy::Oldest
        } else {
            ConflictPolicy::Reject
        };
        let coverage = runtime.block_on(run(ops, retire, conflict))?;
        totals.lock().unwrap().add(coverage);
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    let totals = *totals.lock().unwrap();
    eprintln!("{cases} cases exercised {totals:?}");
    // About four of each a case at 300 cases; a few cases may show none.
    let floor = u64::from(cases);
    assert!(
        cases < 100 || (totals.repeats >= floor && totals.earned >= floor),
        "the cases sent too few credentials twice, or earned too few: {totals:?}"
    );
}
