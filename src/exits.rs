//! Exits: the upstream routes a request can leave through.
//!
//! An exit is named by a stable [`ExitId`] (pins
//! refer to it), described by its [`ExitSpec`] ([`spec`]: the URL, the
//! kind, the options). At run time an [`Exit`] adds its connection pools,
//! its [`health`], its anonymous upstream [`sessions`] and whether an
//! operator [`drain`]ed it; the [`ExitSet`] picks exits for traffic that no
//! pin decides ([`select`]). A reload swaps the whole set ([`LiveExits`]);
//! an exit that stays (same id) keeps its drain state, and its health and
//! pools when its route did not change ([`ExitBuild::set`]).
//!
//! Invariant: credentials in an exit URL never appear in `Debug` or
//! `Display` output; use [`ExitSpec::redacted_url`] when showing an exit.

pub mod drain;
pub mod health;
pub mod routes;
pub mod scope;
pub mod select;
pub mod sessions;
pub mod spec;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::clock::{duration_ms, Clock};
use crate::identity::{ExitId, FoundingRoute, RetireReason, RouteHash};
use crate::metrics::{ExitInstruments, Metrics};
use crate::net::HostPort;
use crate::upstream::tls::UpstreamTls;
use crate::upstream::{ExitClient, PoolSettings};
use health::{Health, HealthState, Thresholds};
use sessions::AnonymousSessions;

pub use spec::{ExitOptions, ExitSpec, ExitUrlError};

/// A configured exit ready for traffic.
#[derive(Debug)]
pub struct Exit {
    /// What was configured.
    pub spec: ExitSpec,
    /// The exit's connection pools.
    pub client: ExitClient,
    /// Its health (shared with the exit that replaces it on a reload).
    pub health: Arc<Health>,
    /// The upstream sessions cookie-less traffic uses.
    pub sessions: Arc<AnonymousSessions>,
    /// Drained by an operator: no new identities, no rotated traffic.
    /// Shared with the exit that replaces it on a reload.
    drained: Arc<AtomicBool>,
    /// When its route last changed under its id (Unix ms, 0: never; see
    /// [`routes`]): identities founded before then retire. Set from the
    /// book of routes at every start and reload.
    route_changed_ms: AtomicU64,
    /// This exit (this object, not its id) was replaced by a reload that
    /// changed the route under its id, kept or not (see [`Exit::replaced`]).
    replaced: AtomicBool,
    /// Replaced by a change that does not keep its identities; requests
    /// that started before still run on it (see [`Exit::superseded`]).
    superseded: AtomicBool,
    /// Removed by a reload (the store not shared): its identities retire
    /// (see [`Exit::left_behind`]).
    removed: AtomicBool,
    /// The route identities founded on it carry (see [`routes`]): set once
    /// the pin key is known, before the exit takes traffic.
    founding_route: OnceLock<FoundingRoute>,
    /// The routes whose identities continue on this exit's (see
    /// [`Exit::vouches_for`]): set with its founding route.
    kept_routes: OnceLock<Box<[RouteHash]>>,
    /// Its metrics, found once in the daemon's [`Metrics`] (see
    /// [`Exit::instruments`]).
    instruments: OnceLock<Arc<ExitInstruments>>,
}

impl Exit {
    /// An exit, not drained.
    pub fn new(
        spec: ExitSpec,
        client: ExitClient,
        health: Health,
        sessions: AnonymousSessions,
    ) -> Exit {
        Exit {
            spec,
            client,
            health: Arc::new(health),
            sessions: Arc::new(sessions),
            drained: Arc::default(),
            route_changed_ms: AtomicU64::new(0),
            replaced: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            founding_route: OnceLock::new(),
            kept_routes: OnceLock::new(),
            instruments: OnceLock::new(),
        }
    }

    /// Whether a reload replaced this exit with one of another route under
    /// its id. A request that started before runs on to its end here, and
    /// an identity it founds after the change was dated is founded on the
    /// old route: it retires at once (`exit-changed`), or its next request
    /// would leave through the new route.
    fn superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// Why an identity founded on this exit by a request that started
    /// before a reload retires at once: the reload replaced its route by a
    /// change that does not keep identities (`exit-changed`: the cookie
    /// was earned on the old route, and the identity's next request would
    /// leave through the new one), or removed it (`exit-removed`, the store
    /// not shared: its identities retire, and this one would be refused
    /// from its next request on).
    pub fn left_behind(&self) -> Option<RetireReason> {
        if self.superseded() {
            Some(RetireReason::ExitChanged)
        } else if self.removed.load(Ordering::Acquire) {
            Some(RetireReason::ExitRemoved)
        } else {
            None
        }
    }

    /// Marks this exit as removed by a reload, the store not shared: the
    /// lanes of its identities are retired, those made later too (their
    /// requests still under way write nothing more; the sweep retires the
    /// identities themselves), and an identity founded on it after this
    /// retires at once ([`Exit::left_behind`]).
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
        self.client
            .retire_all_identities(&RetireReason::ExitRemoved);
    }

    /// Whether a reload replaced this exit with one of another route under
    /// its id, whether the change keeps its identities or not: an identity
    /// founded on another route than this exit's is not this exit's to
    /// judge (see `routing::lifecycle::founded_past_a_reload`).
    pub fn replaced(&self) -> bool {
        self.replaced.load(Ordering::Acquire)
    }

    /// Marks this exit as replaced by another route under its id, by a
    /// change that keeps its identities or not ([`Exit::replaced`],
    /// [`Exit::superseded`]).
    pub fn mark_replaced(&self, kept: bool) {
        self.superseded.store(!kept, Ordering::Release);
        self.replaced.store(true, Ordering::Release);
    }

    /// Undoes [`Exit::mark_replaced`] (a reload refused): the exit is in
    /// force again.
    pub fn unmark_replaced(&self) {
        self.replaced.store(false, Ordering::Release);
        self.superseded.store(false, Ordering::Release);
    }

    /// When its route last changed under its id, if it did (see [`routes`]).
    pub fn route_changed_ms(&self) -> Option<u64> {
        match self.route_changed_ms.load(Ordering::Acquire) {
            0 => None,
            at => Some(at),
        }
    }

    /// Records that its route changed at `at_ms` (the latest change stands).
    pub fn mark_route_changed(&self, at_ms: u64) {
        self.route_changed_ms.fetch_max(at_ms, Ordering::AcqRel);
    }

    /// The route an identity founded on it now is founded on (`None`
    /// before [`routes::found_on`] gave it one).
    pub fn founding_route(&self) -> Option<FoundingRoute> {
        self.founding_route.get().copied()
    }

    /// Gives it its founding route; the first one given stands (an exit's
    /// spec, and so its route, never changes).
    pub fn set_founding_route(&self, route: FoundingRoute) {
        let _ = self.founding_route.set(route);
    }

    /// Whether identities founded on `route` continue on this exit, whose
    /// route is another: it keeps its identities across route changes
    /// (`keep_identities_on_route_change`) and the book of routes saw kept
    /// changes lead from `route` to its own (see [`routes`]). An exit never
    /// given its kept routes vouches for none.
    pub fn vouches_for(&self, route: RouteHash) -> bool {
        self.spec.options.keep_identities_on_route_change
            && self
                .kept_routes
                .get()
                .is_some_and(|kept| kept.contains(&route))
    }

    /// Gives it the routes its identities are kept from; the first given
    /// stand (they change only with its route, and so with the exit).
    pub fn set_kept_routes(&self, routes: Box<[RouteHash]>) {
        let _ = self.kept_routes.set(routes);
    }

    /// The exit's metrics in `metrics`, looked up by id on the first call
    /// only (an exit belongs to one daemon, so `metrics` is always the
    /// same). A rebuilt exit of the same id finds the same instruments.
    pub fn instruments(&self, metrics: &Metrics) -> Arc<ExitInstruments> {
        self.instruments
            .get_or_init(|| metrics.exit(self.id()))
            .clone()
    }

    /// The exit's id.
    pub fn id(&self) -> &ExitId {
        &self.spec.id
    }

    /// Whether an operator drained it.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Drains (`true`) or undrains it; returns whether that changed anything.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::AcqRel) != drained
    }

    /// Whether it may take new identities and rotated traffic now (healthy
    /// and not drained).
    pub fn ready(&self) -> bool {
        !self.drained() && self.health.state() == HealthState::Healthy
    }

    /// Its state in words: `healthy`, `unhealthy` or `dead`, and `drained`.
    pub fn describe(&self) -> String {
        let health = format!("{:?}", self.health.state()).to_ascii_lowercase();
        match self.drained() {
            true => format!("{health}, drained"),
            false => health,
        }
    }
}

/// All configured exits, by id and in weighted rotation.
#[derive(Debug)]
pub struct ExitSet {
    exits: Vec<Arc<Exit>>,
    /// foldhash rather than SipHash: looked up on every pinned request
    /// (the ids come from the configuration, not from clients).
    by_id: HashMap<ExitId, usize, foldhash::fast::RandomState>,
    rotation: select::Rotation,
    /// Without probes, unhealthy exits get one trial probe this often.
    trial_interval_ms: Option<u64>,
}

impl ExitSet {
    /// A set of exits (at least one; configuration validation ensures it).
    /// `trial_interval_ms` enables trial probes of unhealthy exits.
    pub fn new(exits: Vec<Exit>, trial_interval_ms: Option<u64>) -> ExitSet {
        ExitSet::of(exits.into_iter().map(Arc::new).collect(), trial_interval_ms)
    }

    /// [`ExitSet::new`] of exits already shared (a reload keeps some).
    pub fn of(exits: Vec<Arc<Exit>>, trial_interval_ms: Option<u64>) -> ExitSet {
        let weights: Vec<u32> = exits.iter().map(|e| e.spec.options.weight).collect();
        let by_id = exits
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id().clone(), i))
            .collect();
        ExitSet {
            exits,
            by_id,
            rotation: select::Rotation::new(&weights),
            trial_interval_ms,
        }
    }

    /// The exit with this id, if configured.
    pub fn get(&self, id: &ExitId) -> Option<&Arc<Exit>> {
        self.by_id.get(id).map(|&i| &self.exits[i])
    }

    /// The next exit in weighted rotation that is healthy; if none is, an
    /// unhealthy one; never a dead or drained one. `None` when every exit
    /// is dead or drained ([`ExitSet::unavailable`] says which).
    pub fn pick(&self, now_ms: u64) -> Option<&Arc<Exit>> {
        self.pick_within(now_ms, &scope::ExitScope::all())
    }

    /// [`ExitSet::pick`] among the exits `scope` allows (a user's exits).
    pub fn pick_within(&self, now_ms: u64, scope: &scope::ExitScope) -> Option<&Arc<Exit>> {
        let _ = now_ms;
        let mut fallback = None;
        for index in self.rotation.cycle() {
            let exit = &self.exits[index];
            if exit.drained() || !scope.allows(exit.id()) {
                continue;
            }
            match exit.health.state() {
                HealthState::Healthy => return Some(exit),
                HealthState::Unhealthy if fallback.is_none() => fallback = Some(exit),
                _ => {}
            }
        }
        fallback
    }

    /// Why no exit takes new traffic: each exit with its state
    /// (`res1 dead, res2 healthy, drained`).
    pub fn unavailable(&self) -> String {
        self.unavailable_within(&scope::ExitScope::all())
    }

    /// Why no exit `scope` allows takes new traffic: each of them with its
    /// state, and the user the scope limits (`user alice may use res2:
    /// res2 dead`). Exits outside the scope are left out: healthy ones
    /// would read as a contradiction.
    pub fn unavailable_within(&self, scope: &scope::ExitScope) -> String {
        let states = self
            .exits
            .iter()
            .filter(|e| scope.allows(e.id()))
            .map(|e| format!("{} {}", e.id(), e.describe()))
            .collect::<Vec<_>>()
            .join("; ");
        let states = match states.is_empty() {
            true => "none of them is configured".to_owned(),
            false => states,
        };
        match (scope.user(), scope.exits()) {
            (Some(user), Some(_)) => format!(
                "user {user} may use only {} ([[auth.users]] exits): {states}",
                scope.describe()
            ),
            _ => states,
        }
    }

    /// Whether some exit is healthy and not drained (readiness).
    pub fn any_ready(&self) -> bool {
        self.exits.iter().any(|e| e.ready())
    }

    /// An exit that is not healthy and is due for a trial (at most one per
    /// exit every trial interval; only when no probes are configured). The
    /// caller probes it in the background, towards the origin of the request
    /// at hand, so the trial never costs a client request.
    ///
    /// The clock (`now_ms`) is read only once an exit is not healthy: every
    /// request asks, and nearly always every exit is.
    pub fn due_for_trial(&self, now_ms: impl FnOnce() -> u64) -> Option<&Arc<Exit>> {
        let interval = self.trial_interval_ms?;
        let now_ms = std::cell::LazyCell::new(now_ms);
        self.exits.iter().find(|e| {
            e.health.state() != HealthState::Healthy && e.health.claim_trial(*now_ms, interval)
        })
    }

    /// All exits, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Exit>> {
        self.exits.iter()
    }

    /// The ids of the drained exits.
    pub fn drained(&self) -> Vec<String> {
        self.exits
            .iter()
            .filter(|e| e.drained())
            .map(|e| e.id().to_string())
            .collect()
    }
}

/// The exits in force. A reload replaces the whole set at once; a request
/// takes one snapshot (through its pipeline) and keeps it to the end, so an
/// exit removed meanwhile still carries the requests that were routed to it.
#[derive(Debug)]
pub struct LiveExits(ArcSwap<ExitSet>);

impl LiveExits {
    /// Starts with `set`.
    pub fn new(set: Arc<ExitSet>) -> LiveExits {
        LiveExits(ArcSwap::new(set))
    }

    /// The set in force now.
    pub fn load(&self) -> Arc<ExitSet> {
        self.0.load_full()
    }

    /// Puts `set` in force.
    pub fn store(&self, set: Arc<ExitSet>) {
        self.0.store(set);
    }

    /// The exits in force now, in configuration order (a snapshot).
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Exit>> {
        self.load().exits.clone().into_iter()
    }

    /// The exit with this id now, if configured.
    pub fn get(&self, id: &ExitId) -> Option<Arc<Exit>> {
        self.load().get(id).cloned()
    }
}

/// What every exit is built with: the settings exits share.
#[derive(Clone, Debug)]
pub struct ExitBuild {
    /// TLS towards origins.
    pub tls: UpstreamTls,
    /// Pool sizes and timeouts.
    pub pool: PoolSettings,
    /// Health thresholds.
    pub thresholds: Thresholds,
    /// Without probes: how often an unhealthy exit gets a trial.
    pub trial_interval_ms: Option<u64>,
}

impl ExitBuild {
    /// A fresh exit for `spec`, created at `now_ms`.
    pub fn exit(&self, spec: &ExitSpec, now_ms: u64) -> Exit {
        Exit::new(
            spec.clone(),
            ExitClient::new(spec.route(), self.tls.clone(), &self.pool),
            Health::new(self.thresholds),
            self.sessions(spec, now_ms),
        )
    }

    fn sessions(&self, spec: &ExitSpec, now_ms: u64) -> AnonymousSessions {
        let (count, ttl) = session_shape(spec);
        AnonymousSessions::new(count, ttl, now_ms)
    }

    /// Gives the exits of `set` (this build's, now in force) this build's
    /// health thresholds. Not done as the set is built: an exit that stays
    /// shares its health with the exit in force, and a reload refused
    /// after the set was built (the book of routes not written) would have
    /// left the exits in force judged by the refused file's thresholds.
    pub fn put_in_force(&self, set: &ExitSet) {
        for exit in set.iter() {
            exit.health.set_thresholds(self.thresholds);
        }
    }

    /// The exits `specs` describe. An exit of `previous` with the same id
    /// keeps its drain state, and its health while its URL and credentials
    /// are the same; unchanged, it is kept whole; its pools are kept while
    /// its route and `self` (TLS, pool settings) are the same as
    /// `previous_build` (`None`: the TLS trust changed), its anonymous
    /// sessions while their shape is the same.
    pub fn set(
        &self,
        specs: &[ExitSpec],
        previous: &ExitSet,
        previous_build: Option<&ExitBuild>,
        now_ms: u64,
    ) -> ExitSet {
        let same_pools = previous_build.is_some_and(|p| same_pool_settings(&p.pool, &self.pool));
        let exits = specs
            .iter()
            .map(|spec| {
                let Some(old) = previous.get(&spec.id) else {
                    return Arc::new(self.exit(spec, now_ms));
                };
                // (Its health, shared, takes the new thresholds once the set
                // is in force: `ExitBuild::put_in_force`.)
                if same_pools && old.spec == *spec {
                    return old.clone();
                }
                let client = if same_pools && old.spec.route() == spec.route() {
                    old.client.clone()
                } else {
                    // Requests routed before the reload still hold the old
                    // client's pools: it shares its retirements with them.
                    ExitClient::succeeding(&old.client, spec.route(), self.tls.clone(), &self.pool)
                };
                let sessions = if session_shape(&old.spec) == session_shape(spec) {
                    old.sessions.clone()
                } else {
                    Arc::new(self.sessions(spec, now_ms))
                };
                // Another route (URL or credentials) is another proxy: its
                // health starts afresh (the old one is let go once the new
                // set is in force, see `Health::let_go`). Other options (the
                // egress checks, the fingerprint) keep it.
                let health = if old.spec.route_key() == spec.route_key() {
                    old.health.clone()
                } else {
                    Arc::new(Health::new(self.thresholds))
                };
                Arc::new(Exit {
                    spec: spec.clone(),
                    client,
                    health,
                    sessions,
                    drained: old.drained.clone(),
                    route_changed_ms: AtomicU64::new(0),
                    replaced: AtomicBool::new(false),
                    superseded: AtomicBool::new(false),
                    removed: AtomicBool::new(false),
                    // Its spec changed: given its own by `routes::found_on`
                    // and `RoutePlan::vouch`.
                    founding_route: OnceLock::new(),
                    kept_routes: OnceLock::new(),
                    instruments: old.instruments.clone(),
                })
            })
            .collect();
        ExitSet::of(exits, self.trial_interval_ms)
    }
}

/// How many anonymous sessions an exit rotates over, and for how long each.
fn session_shape(spec: &ExitSpec) -> (usize, Option<u64>) {
    let count = if spec.has_session_placeholder() {
        spec.options.anonymous_sessions
    } else {
        1
    };
    (count, spec.options.sticky_ttl.map(duration_ms))
}

fn same_pool_settings(a: &PoolSettings, b: &PoolSettings) -> bool {
    a.connect_timeout == b.connect_timeout
        && a.response_head_timeout == b.response_head_timeout
        && a.idle_timeout == b.idle_timeout
        && a.max_idle_per_origin == b.max_idle_per_origin
        && a.max_idle_per_exit == b.max_idle_per_exit
}

/// Probes one exit every `interval` (the first time at once).
pub async fn probe_loop(
    exit: Arc<Exit>,
    target: HostPort,
    interval: Duration,
    clock: Clock,
    shutdown: CancellationToken,
) {
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = exit.client.probe(&target, crate::upstream::dial::Lookup::Exit) => outcome,
        };
        let change = match &outcome {
            Ok(()) => exit.health.success(),
            Err(error) => {
                tracing::debug!(exit = %exit.id(), %error, "health probe failed");
                exit.health.failure(clock.now_ms())
            }
        };
        if let Some(state) = change {
            tracing::warn!(exit = %exit.id(), ?state, "exit health changed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
