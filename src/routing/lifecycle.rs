//! The lives of identities: retirement (by an origin's answer, by expiry,
//! by exit death or drift), the periodic sweep, and exit deaths shared
//! through the store so every replica and every restart honours them.
//!
//! Invariant: retirement is the only way an identity ends, and it is
//! remembered: a retired identity's credentials are never pinned again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::policy::Policies;
use super::Router;
use crate::credential::RandomKeys;
use crate::exits::health::HealthState;
use crate::exits::{Exit, ExitOptions, ExitSet, LiveExits};
use crate::identity::{ExitId, Identity, IdentityId, RetireReason, Retirement};
use crate::store::{PinStore as _, StoreError, Swept};
use crate::upstream::{Forgotten, PoolKey};

/// Takes a retirement out of the pending ones when dropped.
struct Unpend<'a>(&'a super::PendingRetirements, IdentityId);

impl Drop for Unpend<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// How many times a retirement the store refused is tried (about ten
/// minutes in all, see [`RETIRE_RETRY_MAX`]).
const RETIRE_ATTEMPTS: u32 = 25;
/// The longest wait between two of those tries.
const RETIRE_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a wait between two tries looks for a shutdown.
const RETIRE_RETRY_STEP: Duration = Duration::from_millis(250);

impl Router {
    /// Retires an identity: its connections dropped and its relays closed,
    /// recorded in the store, counted. Pending (honoured by routing here)
    /// while the store takes it; a store that refuses it leaves it to the
    /// caller.
    pub async fn retire(
        &self,
        exits: &ExitSet,
        identity: &Identity,
        reason: RetireReason,
    ) -> Result<(), StoreError> {
        // Before the store takes it (which may take a while, or fail):
        // requests of the identity still on their way write nothing, its
        // relays close, and one that opens meanwhile (its first check reads
        // the store before the write lands) finds it pending.
        self.pending.insert(identity.id, reason.clone());
        // Stored or refused, it is pending no more (nor if the caller goes
        // away meanwhile): refused, the caller says so (a request fails,
        // and the next one of the identity decides again and tries the
        // store again), or hands it to the background.
        let _unpend = Unpend(&self.pending, identity.id);
        self.end_here(exits, identity, &reason);
        self.store_retirement(identity, reason).await
    }

    /// [`Router::retire`] in a task of the router's own, awaited for its
    /// outcome: a caller that goes away meanwhile (an operator's client
    /// hanging up while the store takes an eviction) cannot cut it between
    /// ending the identity here and storing its retirement, which would
    /// leave it ended in this process and live in the store.
    pub async fn retire_to_the_end(
        self: &Arc<Self>,
        exits: Arc<ExitSet>,
        identity: Identity,
        reason: RetireReason,
    ) -> Result<(), StoreError> {
        let router = self.clone();
        let retiring = self.tasks.spawn(async move {
            let stored = router.retire(&exits, &identity, reason.clone()).await;
            if stored.is_err() {
                // Honoured here meanwhile (pending), tried again until
                // stored, as a retirement decided in the background is.
                router.pending.insert(identity.id, reason.clone());
                router.store_in_background(exits, identity, reason);
            }
            stored
        });
        retiring.await.unwrap_or_else(|cut| {
            Err(StoreError::new(
                crate::store::StoreErrorKind::Closed,
                format!("the retirement's task ended early: {cut}"),
            ))
        })
    }

    /// Stores the retirement of `identity` for `reason` (ended here
    /// already), then counts and logs it.
    async fn store_retirement(
        &self,
        identity: &Identity,
        reason: RetireReason,
    ) -> Result<(), StoreError> {
        let retirement = Retirement {
            reason,
            at_ms: self.retirement_now(),
        };
        self.store.retire(identity.id, &retirement).await?;
        self.sent_ja4.remove(&identity.id);
        if self.count_retired(identity, &retirement.reason) {
            let reason = &retirement.reason;
            tracing::warn!(identity = %identity.id, exit = %identity.exit, %reason, "identity retired");
        }
        Ok(())
    }

    /// Counts the retirement of `identity` for `reason`, once the store
    /// holds it: once per identity in this process (answers whether this
    /// was the first time). Several requests of one identity may find its
    /// end at once (a burst of challenges to a page's resources), and each
    /// asks the store (the first retirement stands there), but it is one
    /// identity retired. (The sweep counts its own without remembering
    /// them: it may retire a million at once.)
    pub(crate) fn count_retired(&self, identity: &Identity, reason: &RetireReason) -> bool {
        let first = self.counted.first(identity.id);
        if first {
            self.metrics.retired(&identity.exit, reason.label());
        }
        first
    }

    /// Retires an identity whatever becomes of the caller, and waits for
    /// it: the store write runs in a task of its own, since a request
    /// dropped while Redis answers (its client gone) would drop the command
    /// unsent, or its journal write after Redis took it, and the origin's
    /// verdict would be lost. A store that fails gets it in the background
    /// (as [`Router::retire_soon`] does; honoured by this process
    /// meanwhile).
    pub async fn retire_settled(
        self: &Arc<Self>,
        exits: Arc<ExitSet>,
        identity: Identity,
        reason: RetireReason,
    ) {
        // Pending until stored (see `retire`).
        self.pending.insert(identity.id, reason.clone());
        self.end_here(&exits, &identity, &reason);
        let router = self.clone();
        let stored = self.tasks.spawn(async move {
            match router.store_retirement(&identity, reason.clone()).await {
                Ok(()) => router.pending.remove(identity.id),
                Err(e) => {
                    tracing::warn!(error = %e, identity = %identity.id, "could not store a retirement yet; retrying in the background");
                    router.store_in_background(exits, identity, reason);
                }
            }
        });
        // A task that panicked has logged why; one cut at shutdown is the
        // store closing.
        let _ = stored.await;
    }

    /// Retires an identity from code that cannot wait: routing sees the
    /// retirement at once, the store gets it in the background.
    pub fn retire_soon(
        self: &Arc<Self>,
        exits: Arc<ExitSet>,
        identity: Identity,
        reason: RetireReason,
    ) {
        self.pending.insert(identity.id, reason.clone());
        self.end_here(&exits, &identity, &reason);
        self.store_in_background(exits, identity, reason);
    }

    /// Retires `identity` (on `exit`, where it is configured), whose pins a
    /// write put in the store as a loss of the store's data came to light
    /// (the write failed `Lost`, or `Store::unchanged_since` refused after
    /// it): they stay in Redis, where a retry would find them live, and
    /// may hold a credential the loss took from another identity. Ended
    /// here at once (its requests on their way write nothing, its relays
    /// close) and honoured by routing until the store takes it; stored
    /// now, or left to this process alone when the store refuses, as it
    /// may right after a failover.
    pub(crate) async fn retire_written_in_a_loss(&self, exit: Option<&Exit>, identity: &Identity) {
        let reason = RetireReason::StoreLost;
        self.pending.insert(identity.id, reason.clone());
        if let Some(exit) = exit {
            exit.client.forget(
                PoolKey::Identity(identity.id),
                identity.fingerprint.tls.is_none(),
                &reason,
            );
        }
        self.relays.end(identity.id, &reason);
        match self.store_retirement(identity, reason).await {
            Ok(()) => self.pending.remove(identity.id),
            Err(e) => tracing::warn!(
                error = %e, identity = %identity.id,
                "could not store the retirement of an identity whose pins were written as the pin \
                 store lost data; only this process honours it until it restarts"
            ),
        }
    }

    /// Stores a retirement decided here (pending, and ended here) in the
    /// background. A store that fails (Redis out of reach or refusing
    /// writes, a disk that stalls) is asked again, further apart each
    /// time: until it is stored, only this process honours the retirement,
    /// and a restart or another replica would take the identity as live.
    fn store_in_background(
        self: &Arc<Self>,
        exits: Arc<ExitSet>,
        identity: Identity,
        reason: RetireReason,
    ) {
        let router = self.clone();
        self.tasks.spawn(async move {
            let mut wait = Duration::from_millis(500);
            for attempt in 1..=RETIRE_ATTEMPTS {
                // Ended again before each try: a pool or a relay opened
                // meanwhile (by a request routed before the decision) goes
                // too.
                router.end_here(&exits, &identity, &reason);
                match router.store_retirement(&identity, reason.clone()).await {
                    Ok(()) => {
                        router.pending.remove(identity.id);
                        return;
                    }
                    // At shutdown, one try: the store closes next.
                    Err(e) if attempt < RETIRE_ATTEMPTS && !router.tasks.is_closed() => {
                        tracing::warn!(
                            error = %e, identity = %identity.id, attempt,
                            "could not store a retirement; trying again"
                        );
                        // Cut short by a shutdown, which waits for this
                        // task: one last try then.
                        let until = tokio::time::Instant::now() + wait;
                        while tokio::time::Instant::now() < until && !router.tasks.is_closed() {
                            tokio::time::sleep(RETIRE_RETRY_STEP.min(wait)).await;
                        }
                        wait = (wait * 2).min(RETIRE_RETRY_MAX);
                    }
                    // Left pending: routing keeps honouring it in this process.
                    Err(e) => {
                        tracing::error!(
                            error = %e, identity = %identity.id,
                            "could not store a retirement; only this process honours it until it \
                             restarts"
                        );
                        return;
                    }
                }
            }
        });
    }

    /// Shares exit deaths both ways: deaths this process saw go to the store,
    /// deaths the store knows (from before a restart, or from another
    /// replica) apply here, so identities created before them retire.
    pub async fn sync_exit_deaths(&self, exits: &ExitSet) -> Result<(), StoreError> {
        let known = self.store.exit_deaths().await?;
        for exit in exits.iter() {
            let stored = known
                .iter()
                .find(|(id, _)| id == exit.id())
                .map(|(_, at)| *at);
            match (exit.health.died_at_ms(), stored) {
                (Some(here), stored) if stored.is_none_or(|s| s < here) => {
                    self.store.record_exit_death(exit.id(), here).await?;
                }
                (_, Some(stored)) => exit.health.restore_died_at(stored),
                _ => {}
            }
        }
        Ok(())
    }

    /// Retires expired identities and forgets what has been retired long
    /// enough.
    pub async fn sweep(&self, exits: &ExitSet) -> Result<Swept, StoreError> {
        self.sweep_set_read_at(exits, self.clock.now_ms()).await
    }

    /// [`Router::sweep`], `exits` having been read at `read_ms`: an
    /// identity founded since then, perhaps on an exit a reload added or
    /// re-routed, is not judged by this older set.
    pub async fn sweep_set_read_at(
        &self,
        exits: &ExitSet,
        read_ms: u64,
    ) -> Result<Swept, StoreError> {
        let now = self.clock.now_ms();
        let policies = self.policies.load_full();
        // Judged by the wall clock, dated no earlier than time really
        // elapsed: a retirement dated on a clock stepped back would be
        // forgotten that much early once it is corrected, its pins with it,
        // and its cookie pinned anew on any exit.
        let dated = self.retirement_now();
        // What the sweep decides, to end the identities' connections and
        // relays: a memory or embedded store retires every identity its
        // sweep is told to. A shared store (Redis) retires nothing in the
        // sweep (its journal alone is swept): its ends are found at the
        // identities' next use, and by their relays' own checks.
        // Kept per exit as decided: a sweep may retire a million at once.
        let decided: std::sync::Mutex<HashMap<ExitId, Vec<Forgotten>>> = Default::default();
        let expiry = |identity: &Identity| {
            let reason = self.end_due(identity, exits, &policies, now)?;
            // Founded while this sweep runs, perhaps on an exit a reload
            // added or re-routed meanwhile: its exit is judged by the exits
            // in force at its next use or the next sweep, not by this
            // sweep's older set (which would retire it for good as
            // `exit-removed`, `exit-changed`, or `exit-down` for a route
            // replaced while it failed). A creation time further
            // ahead is a wall clock stepped back since, judged as usual.
            let exit_level = matches!(
                reason,
                RetireReason::ExitRemoved | RetireReason::ExitChanged | RetireReason::ExitDown
            );
            let founded_meanwhile = (read_ms.min(now)..=now.saturating_add(SWEEP_FOUNDINGS_MS))
                .contains(&identity.created_ms);
            if exit_level && founded_meanwhile {
                return None;
            }
            if !policies.shared_store {
                // Not remembered as counted: a sweep may retire a million.
                self.metrics.retired(&identity.exit, reason.label());
                decided
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(identity.exit.clone())
                    .or_default()
                    .push(Forgotten {
                        key: PoolKey::Identity(identity.id),
                        every_presentation: identity.fingerprint.tls.is_none(),
                        reason: reason.clone(),
                    });
            }
            Some(Retirement {
                reason,
                at_ms: dated,
            })
        };
        // Retiring goes by the wall clock (on a clock stepped forward it
        // only retires early), forgetting by the time that really elapsed:
        // kept longer by as much as the wall clock is ahead of it.
        let (ahead, news) = self.steady.ahead_ms(&self.clock, now);
        if news {
            // Time the process was down counts here too (see
            // `Unhurried::since`): a day or more is worth a warning.
            if ahead >= 86_400_000 {
                tracing::warn!(
                    ahead_ms = ahead,
                    "the wall clock reads ahead of the time elapsed since the store's last \
                     record (a long stop, or a clock stepped forward): retired credentials and \
                     expired cookies' pins are forgotten that much later"
                );
            } else {
                tracing::info!(
                    ahead_ms = ahead,
                    "forgetting counts from the store's last record: retired credentials and \
                     expired cookies' pins are forgotten that much later"
                );
            }
        }
        let swept = self
            .store
            .sweep(now, policies.keep_retired_ms.saturating_add(ahead), &expiry)
            .await;
        // Even when the sweep failed to store them (the embedded store's
        // writer, which then refuses every write until a restart): they are
        // retired in its memory, which routing reads, and the first sweep
        // after the restart decides them again.
        let decided = decided
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.end_swept(exits, decided);
        let swept = swept?;
        if swept != Swept::default() {
            tracing::debug!(?swept, "swept the pin store");
        }
        // The sweep retires without `retire` (and Redis expires identities
        // by itself): their sent JA4s go once unseen past every idle timeout.
        let longest_idle = exits
            .iter()
            .filter_map(|exit| exit.spec.options.idle_timeout)
            .map(crate::clock::duration_ms)
            .fold(policies.idle_timeout_ms, u64::max);
        self.forget_sent_ja4_unseen(now, longest_idle);
        Ok(swept)
    }

    /// Ends the pooled connections and the relays of the identities the
    /// sweep retired: each exit's lanes dropped in one go (a sweep may
    /// retire thousands at once, after a long stop or an exit's death).
    fn end_swept(&self, exits: &ExitSet, decided: HashMap<ExitId, Vec<Forgotten>>) {
        for (exit, lanes) in decided {
            for lane in &lanes {
                if let PoolKey::Identity(id) = lane.key {
                    self.relays.end(id, &lane.reason);
                }
            }
            if let Some(exit) = exits.get(&exit) {
                exit.client.forget_many(&lanes);
            }
        }
    }

    /// Why `identity` cannot continue on its exit at `now` (see [`ends`]),
    /// as this process judges it: an identity with a relay open here is
    /// idle only by that relay's own check. The relay knows whether bytes
    /// moved since its last recorded use; the store may not show that use
    /// yet (the relay records it at checks a quarter of the idle timeout
    /// apart, up to 30 s, and only from the exits and policies in force at
    /// its last check). So a silent relay keeps its identity from idling
    /// out here until its next check, which retires it; a request of the
    /// identity meanwhile is served and is a use. Its lifetimes, its
    /// sticky window, its exit's health, presence and route still end it
    /// here.
    pub(crate) fn end_due(
        &self,
        identity: &Identity,
        exits: &ExitSet,
        policies: &Policies,
        now: u64,
    ) -> Option<RetireReason> {
        let steady = || self.retirement_now();
        let moment = Moment {
            wall_ms: now,
            steady: &steady,
        };
        match ends(identity, exits, policies, moment) {
            Some(RetireReason::IdleExpired) if self.relays.is_open(identity.id) => {
                let in_use = Identity {
                    last_used_ms: now,
                    ..identity.clone()
                };
                ends(&in_use, exits, policies, moment)
            }
            other => other,
        }
    }

    /// Ends what `identity`, retired for `reason`, has open in this
    /// process: its connection pools on its exit are dropped, marked
    /// retired (a request of it that was routed before and still holds one,
    /// waiting for a connection, writes nothing), and its relays close.
    pub(super) fn end_here(&self, exits: &ExitSet, identity: &Identity, reason: &RetireReason) {
        if let Some(exit) = exits.get(&identity.exit) {
            exit.client.forget(
                PoolKey::Identity(identity.id),
                identity.fingerprint.tls.is_none(),
                reason,
            );
        }
        self.relays.end(identity.id, reason);
    }
}

/// How long after a sweep began an identity may be founded while it runs,
/// at most (see `Router::sweep`): a creation time further ahead of the
/// sweep's clock reading is a wall clock stepped back.
const SWEEP_FOUNDINGS_MS: u64 = 60_000;

/// How long a counted retirement is remembered (see
/// [`CountedRetirements`]): far longer than the requests that found one
/// identity's end together take to store it.
const COUNTED_KEPT: Duration = Duration::from_secs(600);

/// Past this many remembered retirements, those older than
/// [`COUNTED_KEPT`] are forgotten (then again each time their number has
/// doubled).
const COUNTED_PRUNED_PAST: usize = 1024;

/// The identities whose retirement this process counted lately (see
/// [`Router::count_retired`]).
#[derive(Debug)]
pub(super) struct CountedRetirements {
    counted: dashmap::DashMap<IdentityId, std::time::Instant, RandomKeys>,
    /// How many remembered retirements the next prune waits for.
    prune_at: AtomicUsize,
}

impl Default for CountedRetirements {
    fn default() -> CountedRetirements {
        CountedRetirements {
            counted: dashmap::DashMap::default(),
            prune_at: AtomicUsize::new(COUNTED_PRUNED_PAST),
        }
    }
}

impl CountedRetirements {
    /// Whether the retirement of `id` is counted now for the first time.
    fn first(&self, id: IdentityId) -> bool {
        let now = std::time::Instant::now();
        if self.counted.len() >= self.prune_at.load(Ordering::Relaxed) {
            self.counted
                .retain(|_, at| now.duration_since(*at) < COUNTED_KEPT);
            let next = (self.counted.len() * 2).max(COUNTED_PRUNED_PAST);
            self.prune_at.store(next, Ordering::Relaxed);
        }
        self.counted.insert(id, now).is_none()
    }
}

/// How far apart replicas' clocks may read (see `ends`): identities
/// founded this soon after their exit's death retire with it (an exit back
/// this soon after dying is rare, and retiring is the safe side), and a
/// sticky window ends this much early.
const CLOCK_SKEW_MS: u64 = 5_000;

/// A time to judge identities at.
#[derive(Clone, Copy)]
pub struct Moment<'a> {
    /// The clock's reading: the ages of what it stamps (idleness,
    /// lifetimes; their stamps are made by replicas' clocks).
    pub wall_ms: u64,
    /// Reads the same, never earlier than the time elapsed since the start
    /// ([`Router::retirement_now`]): the age of a sticky session, which
    /// is stamped by it (`Identity::session_started_ms`). The provider's
    /// session ends by real time, so a wall clock stepped back must not
    /// lengthen it. Read only for an exit with a sticky window: it costs
    /// two clock readings.
    pub steady: &'a (dyn Fn() -> u64 + Sync),
}

impl Moment<'_> {
    /// The steady reading (see [`Moment::steady`]).
    fn steady_ms(&self) -> u64 {
        (self.steady)().max(self.wall_ms)
    }
}

/// Why `identity` cannot continue on its exit at `moment`, if it cannot.
pub fn ends(
    identity: &Identity,
    exits: &ExitSet,
    policies: &Policies,
    moment: Moment,
) -> Option<RetireReason> {
    let now = moment.wall_ms;
    let Some(exit) = exits.get(&identity.exit) else {
        // Another replica may have the exit: this one cannot tell an exit
        // removed from one it never had, so it leaves the identity to them
        // (its requests here get `exit-missing`), but for its lifetimes.
        if policies.shared_store {
            return lifetimes_end(identity, None, policies, now);
        }
        return Some(RetireReason::ExitRemoved);
    };
    exit.health.note_identity(identity.created_ms, now);
    // Founded up to a few seconds after the death counts as before it: an
    // identity founded on a replica whose clock reads ahead of the one
    // that dated the death would otherwise outlive it.
    if exit.health.state() == HealthState::Dead
        || exit
            .health
            .died_at_ms()
            .is_some_and(|died| died.saturating_add(CLOCK_SKEW_MS) >= identity.created_ms)
    {
        return Some(RetireReason::ExitDown);
    }
    // The date judges only an identity that carries no route (founded
    // before identities did): one that does is judged by its route, which
    // no clock stepped back makes look older than the change.
    if exit
        .route_changed_ms()
        .is_some_and(|changed| identity.route.is_none() && changed >= identity.created_ms)
        || left_its_route(identity, exit)
    {
        return Some(RetireReason::ExitChanged);
    }
    let options = &exit.spec.options;
    if let Some(ttl) = options.sticky_ttl {
        // A few seconds early (a quarter of a short window at most): the
        // session may have been started on a replica whose clock reads
        // behind this one's.
        let ttl = crate::clock::duration_ms(ttl);
        let age = moment
            .steady_ms()
            .saturating_sub(identity.session_started_ms)
            .saturating_add(CLOCK_SKEW_MS.min(ttl / 4));
        if age >= ttl {
            return Some(RetireReason::StickyExpired);
        }
    }
    lifetimes_end(identity, Some(options), policies, now)
}

/// Whether `identity`, judged by `exits` (a request's, read before a
/// reload), left the route of the exit `exits` holds ([`left_its_route`]),
/// that exit having been replaced by the reload (see `Exit::replaced`; a
/// kept change or not): it was most likely founded on the route in force,
/// after the reload. That exit can neither judge it (it would retire an
/// identity the configuration in force carries) nor carry it (through the
/// old route): the request is refused, and the identity's next request is
/// judged by the configuration in force.
pub(super) fn founded_past_a_reload(identity: &Identity, exits: &ExitSet) -> bool {
    exits
        .get(&identity.exit)
        .is_some_and(|exit| exit.replaced() && left_its_route(identity, exit))
}

/// Whether `identity` was founded on another route than `exit` has now
/// (see `exits::routes`): another address or credentials, unless the exit
/// keeps its identities across a change the book saw lead from that route
/// ([`Exit::vouches_for`]), or another face, which it never keeps them
/// across. An identity that carries no route (founded before identities
/// did) is judged by the book of routes alone; an exit without one (never
/// given it: a defect) cannot vouch for any route.
fn left_its_route(identity: &Identity, exit: &Exit) -> bool {
    let Some(founded) = identity.route else {
        return false;
    };
    let Some(now) = exit.founding_route() else {
        return true;
    };
    founded.face != now.face || (founded.route != now.route && !exit.vouches_for(founded.route))
}

/// Whether `identity` has been idle or alive too long at `now`, by its
/// exit's `options` where known, else by the policies.
fn lifetimes_end(
    identity: &Identity,
    options: Option<&ExitOptions>,
    policies: &Policies,
    now: u64,
) -> Option<RetireReason> {
    let elapsed = |since: u64| now.saturating_sub(since);
    if elapsed(identity.last_used_ms) >= idle_ms(options, policies) {
        return Some(RetireReason::IdleExpired);
    }
    let lifetime = options
        .and_then(|o| o.max_lifetime)
        .map_or(policies.max_lifetime_ms, crate::clock::duration_ms);
    if elapsed(identity.created_ms) >= lifetime {
        return Some(RetireReason::LifetimeExpired);
    }
    None
}

/// The idle timeout of `identity`: its exit's where set, else the
/// policies'.
pub(super) fn idle_timeout_ms(identity: &Identity, exits: &ExitSet, policies: &Policies) -> u64 {
    idle_ms(
        exits.get(&identity.exit).map(|exit| &exit.spec.options),
        policies,
    )
}

/// The idle timeout of an exit with `options` (where known), else the
/// policies'.
fn idle_ms(options: Option<&ExitOptions>, policies: &Policies) -> u64 {
    options
        .and_then(|o| o.idle_timeout)
        .map_or(policies.idle_timeout_ms, crate::clock::duration_ms)
}

/// Acts on `exit`'s deaths as they happen, whoever found them (a probe, a
/// request, a trial), until `shutdown`. Its identities retire (`exit-down`:
/// they were founded before the death), and at once on every path: their
/// requests still under way write nothing more (after an outage the exit
/// may leave from another address), and their WebSockets and
/// passed-through tunnels check their identity now rather than at their
/// next check. And the death is stored: the sweep would store it within
/// its interval, and a crash in between would forget it, so the
/// identities made before it came back. Deaths are claimed off the
/// health's count of those this process found (`Health::claim_deaths`):
/// one that a quick recovery hid from the notice still counts, one found
/// while a reload replaced this task is the next one's, and a death read
/// back from the store is not acted on here (some of the exit's identities
/// were founded after it: each is judged as it is routed).
pub async fn on_exit_deaths(router: Arc<Router>, exit: Arc<Exit>, shutdown: CancellationToken) {
    let mut changes = exit.health.subscribe();
    loop {
        if exit.health.claim_deaths() {
            exit.client.retire_identities(&RetireReason::ExitDown);
            router.relays_reloaded();
            if let Some(at_ms) = exit.health.died_at_ms() {
                if let Err(e) = router.store.record_exit_death(exit.id(), at_ms).await {
                    tracing::warn!(error = %e, exit = %exit.id(), "could not store the exit's death");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        changes.borrow_and_update();
    }
}

/// Retires expired identities (and those of exits no longer configured),
/// forgets old ones and shares exit deaths with the store, every
/// `interval`; with `at_once`, the first time right away (after a reload
/// that removed exits). The exits are read afresh each time.
pub async fn sweep_loop(
    router: Arc<Router>,
    exits: Arc<LiveExits>,
    interval: Duration,
    at_once: bool,
    shutdown: CancellationToken,
) {
    let mut wait = !at_once;
    loop {
        if wait {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
        wait = true;
        // The clock first: what is founded after the set is read is not
        // judged by it (see `Router::sweep_set_read_at`).
        let read_ms = router.clock().now_ms();
        sweep_once(&router, exits.load(), read_ms).await;
    }
}

/// One round of [`sweep_loop`], `exits` read at `read_ms`. The sweep walks
/// every record, so it runs on a blocking thread, not a runtime worker.
pub async fn sweep_once(router: &Arc<Router>, exits: Arc<ExitSet>, read_ms: u64) {
    if let Err(e) = router.sync_exit_deaths(&exits).await {
        tracing::warn!(error = %e, "sharing exit deaths with the store failed");
    }
    let router = router.clone();
    let runtime = tokio::runtime::Handle::current();
    let swept = tokio::task::spawn_blocking(move || {
        runtime.block_on(router.sweep_set_read_at(&exits, read_ms))
    })
    .await;
    match swept {
        Ok(Err(e)) => tracing::warn!(error = %e, "sweeping the pin store failed"),
        Err(e) => tracing::warn!(error = %e, "the sweep task failed"),
        Ok(Ok(_)) => {}
    }
}
