//! Pipeline stage 4, route: decide which identity (and so which exit,
//! upstream session and egress address) a request belongs to, and keep
//! identities' lives in order.
//!
//! - [`router`]: a request's credentials → a [`Route`] (an existing
//!   identity, a new one, or rotation for cookie-less traffic), or an error
//!   that stops the request;
//! - [`lifecycle`]: retirement (by rule, by expiry, by exit death), sweeping,
//!   and sharing exit deaths through the store;
//! - [`policy`]: the retire and conflict policies and lifetimes;
//! - [`relays`]: the WebSockets and passed-through tunnels open for an
//!   identity, kept as its use and ended with it.
//!
//! Invariant: a credential's identity never changes and an identity's exit
//! and upstream session never change. Nothing here moves a session; it can
//! only be retired.

pub mod lifecycle;
pub mod policy;
pub mod relays;
pub mod router;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, Unhurried};
use crate::credential::RandomKeys;
use crate::identity::{IdentityId, RetireReason};
use crate::metrics::Metrics;
use crate::store::{Store, TimedStore};

pub use policy::{ConflictPolicy, Policies, RetirePolicy};
pub use router::{DeadCredential, Reason, Reread, Route, RouteError};

/// Routes requests by their identities.
#[derive(Debug)]
pub struct Router {
    /// The pin store, every operation timed.
    store: TimedStore,
    clock: Clock,
    /// Swapped whole by a reload; a routing decision reads them once.
    policies: ArcSwap<Policies>,
    metrics: Arc<Metrics>,
    /// Retirements decided where no await is possible (a body scan), not yet
    /// in the store: routing honours them at once.
    pending: PendingRetirements,
    /// Background work that changes identities (retirements decided where
    /// no await is possible), awaited at shutdown so none is lost.
    tasks: TaskTracker,
    /// The JA4 each live identity's upstream connections were last seen to
    /// send (measured off the wire; kept in memory only), and when. An
    /// identity's entry goes with its retirement here, or with the sweep
    /// once it has been unseen longer than any idle timeout (an identity
    /// the sweep retired, or one that expired in Redis).
    sent_ja4: dashmap::DashMap<IdentityId, SentJa4, RandomKeys>,
    /// The time the sweep forgets by, and the time identities age by
    /// (see [`Unhurried`]).
    steady: Unhurried,
    /// The WebSockets and passed-through tunnels open per identity.
    relays: relays::OpenRelays,
    /// The retirements counted lately (once per identity).
    counted: lifecycle::CountedRetirements,
}

/// The JA4 an identity's upstream connection sent, and when last seen.
#[derive(Debug)]
struct SentJa4 {
    ja4: Arc<str>,
    seen_ms: std::sync::atomic::AtomicU64,
}

impl Router {
    /// Routing over `store`; background work goes to `tasks`.
    pub fn new(
        store: Store,
        clock: Clock,
        policies: Policies,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Router {
        // Anchored at the start, or at the latest time the store's records
        // were stamped with if earlier (see `Unhurried::since`).
        let steady = Unhurried::since(&clock, store.newest_loaded_ms().filter(|&ms| ms > 0));
        Router {
            store: TimedStore::new(store, &metrics),
            clock,
            policies: ArcSwap::from_pointee(policies),
            metrics,
            pending: PendingRetirements::default(),
            tasks,
            sent_ja4: dashmap::DashMap::default(),
            steady,
            relays: relays::OpenRelays::default(),
            counted: lifecycle::CountedRetirements::default(),
        }
    }

    /// The pin store (timed; dereferences to the [`Store`]).
    pub fn store(&self) -> &TimedStore {
        &self.store
    }

    /// The time a retirement decided on a request is dated with: the
    /// clock's, never earlier than the time elapsed since the start (see
    /// [`Unhurried::at_least_ms`]). A wall clock stepped back (and
    /// corrected later) would otherwise date it early, and it would be
    /// forgotten that much early. Sticky sessions are stamped, and their
    /// ages judged, by it too (see `lifecycle::Moment`): a provider's
    /// session ends by real time, whatever the wall clock says. (Other ages
    /// are judged, and everything else is stamped, by the clock itself:
    /// judged by one clock and stamped by another, every age would read the
    /// step too old.)
    pub fn retirement_now(&self) -> u64 {
        self.steady.at_least_ms(&self.clock)
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The policies in force.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.load_full()
    }

    /// Puts new policies in force (a reload); decisions already under way
    /// finish with the ones they started with.
    pub fn set_policies(&self, policies: Policies) {
        self.policies.store(Arc::new(policies));
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Records the JA4 an identity's upstream connection sent at `now_ms`;
    /// true when it is the first seen for the identity (or another than
    /// before).
    pub fn observe_sent_ja4(&self, id: IdentityId, ja4: &Arc<str>, now_ms: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        // Nearly every request of an identity sends what the last one did:
        // a shared read, instead of a write lock on the shard and a swap of
        // equal values. The answer still comes from the insert when it
        // differs, so two requests racing with a new one report it once.
        if let Some(before) = self.sent_ja4.get(&id) {
            if *before.ja4 == **ja4 {
                before.seen_ms.store(now_ms, Relaxed);
                return false;
            }
        }
        let seen = SentJa4 {
            ja4: ja4.clone(),
            seen_ms: now_ms.into(),
        };
        match self.sent_ja4.insert(id, seen) {
            Some(before) => before.ja4 != *ja4,
            None => true,
        }
    }

    /// The JA4 an identity's upstream connections were last seen to send.
    pub fn sent_ja4(&self, id: IdentityId) -> Option<Arc<str>> {
        self.sent_ja4.get(&id).map(|seen| seen.ja4.clone())
    }

    /// Forgets the sent JA4 of identities unseen for `unseen_ms` at `now_ms`:
    /// longer than any idle timeout, they are retired or about to be.
    fn forget_sent_ja4_unseen(&self, now_ms: u64, unseen_ms: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sent_ja4
            .retain(|_, seen| now_ms.saturating_sub(seen.seen_ms.load(Relaxed)) < unseen_ms);
    }

    /// The retirement decided for `id` but not yet stored, if any.
    pub(crate) fn pending_retirement(&self, id: IdentityId) -> Option<RetireReason> {
        self.pending.get(id)
    }
}

/// Retirements decided but not yet stored, with a count that lets every
/// request with credentials skip the map while there are none (nearly
/// always): asked per credential, the map's shard lock is a write both
/// cores would make to one cache line.
#[derive(Debug, Default)]
struct PendingRetirements {
    map: dashmap::DashMap<IdentityId, RetireReason, RandomKeys>,
    /// At least the number of entries: raised before an entry goes in and
    /// lowered after one comes out, so a reader that finds zero could not
    /// have found an entry either.
    count: AtomicUsize,
}

impl PendingRetirements {
    fn insert(&self, id: IdentityId, reason: RetireReason) {
        self.count.fetch_add(1, Ordering::SeqCst);
        if self.map.insert(id, reason).is_some() {
            // A second decision for one identity replaced the first.
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn remove(&self, id: IdentityId) {
        if self.map.remove(&id).is_some() {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn get(&self, id: IdentityId) -> Option<RetireReason> {
        if self.count.load(Ordering::SeqCst) == 0 {
            return None;
        }
        self.map.get(&id).map(|r| r.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn router() -> Router {
        Router::new(
            Store::Memory(MemoryStore::new()),
            Clock::manual(),
            Policies {
                retire: RetirePolicy::Fail,
                conflict: ConflictPolicy::Reject,
                idle_timeout_ms: 60_000,
                max_lifetime_ms: 60_000,
                keep_retired_ms: 60_000,
                shared_store: false,
            },
            Arc::new(Metrics::new()),
            TaskTracker::new(),
        )
    }

    #[test]
    fn a_sent_ja4_is_news_when_first_seen_or_changed_only() {
        let router = router();
        let (one, other) = (IdentityId::random(), IdentityId::random());
        let a: Arc<str> = Arc::from("t13d1516h2_8daaf6152771_02713d6af862");
        let b: Arc<str> = Arc::from("t13d1517h2_8daaf6152771_b0da82dd1658");
        assert!(router.observe_sent_ja4(one, &a, 0));
        // The same text in another allocation is not news either.
        assert!(!router.observe_sent_ja4(one, &Arc::from(&*a), 0));
        assert!(!router.observe_sent_ja4(one, &a, 0));
        assert!(router.observe_sent_ja4(other, &a, 0), "per identity");
        assert!(router.observe_sent_ja4(one, &b, 0));
        assert!(!router.observe_sent_ja4(one, &b, 0));
        assert_eq!(router.sent_ja4(one).as_deref(), Some(&*b));
    }

    #[tokio::test]
    async fn the_sweep_forgets_sent_ja4s_unseen_past_every_idle_timeout() {
        let router = router();
        let exits = crate::exits::ExitSet::new(Vec::new(), None);
        let (seen, unseen) = (IdentityId::random(), IdentityId::random());
        let ja4: Arc<str> = Arc::from("t13d1516h2_8daaf6152771_02713d6af862");
        router.observe_sent_ja4(seen, &ja4, 0);
        router.observe_sent_ja4(unseen, &ja4, 0);
        router.clock().advance(std::time::Duration::from_secs(45));
        // Seen again: its time moves, though the JA4 is no news.
        assert!(!router.observe_sent_ja4(seen, &ja4, router.clock().now_ms()));
        router.clock().advance(std::time::Duration::from_secs(15));
        // 60 s (the idle timeout) unseen: gone; 15 s: kept.
        router.sweep(&exits).await.unwrap();
        assert_eq!(router.sent_ja4(unseen), None);
        assert_eq!(router.sent_ja4(seen).as_deref(), Some(&*ja4));
        assert!(router.observe_sent_ja4(unseen, &ja4, router.clock().now_ms()));
    }

    /// An identity founded after the sweep read its exits (on an exit a
    /// reload added meanwhile, which that set lacks) is not retired by the
    /// sweep as `exit-removed`.
    #[tokio::test]
    async fn the_sweep_leaves_identities_founded_after_it_read_its_exits() {
        let router = router();
        let exits = crate::exits::ExitSet::new(Vec::new(), None);
        let read_ms = router.clock().now_ms();
        router.clock().advance(std::time::Duration::from_millis(5));
        let (identity, _) = pinned_identity(&**router.store(), router.clock().now_ms()).await;
        router.clock().advance(std::time::Duration::from_millis(5));
        router.sweep_set_read_at(&exits, read_ms).await.unwrap();
        let read = crate::store::PinStore::read_identity(&**router.store(), identity.id)
            .await
            .unwrap();
        assert!(read.is_some_and(|i| i.retired.is_none()));
        // Judged by a set read after its founding, it is retired.
        router.sweep(&exits).await.unwrap();
        let read = crate::store::PinStore::read_identity(&**router.store(), identity.id)
            .await
            .unwrap();
        assert!(read.is_some_and(|i| i.retired.is_some()));
    }

    /// Writes to `store` an identity on exit `e1` created at `now` with one
    /// `datadome` pin; answers both.
    async fn pinned_identity(
        store: &impl crate::store::PinStore,
        now: u64,
    ) -> (crate::identity::Identity, crate::credential::Credential) {
        use crate::credential::{Credential, PinHasher};
        use crate::fingerprint::Fingerprint;
        use crate::identity::{ExitId, Identity, Pin, SessionId};
        let fingerprint = Fingerprint::of_user_agent("agent");
        let identity = Identity::new(ExitId::new("e1"), SessionId(1), now, fingerprint, now);
        let cookie =
            Credential::cookie("datadome", PinHasher::new([3; 32]).cookie("datadome", "v"));
        store.create_identity(&identity).await.unwrap();
        store
            .pin_if_absent(cookie.key, &Pin::new(identity.id, &cookie, now, None))
            .await
            .unwrap();
        (identity, cookie)
    }

    /// [`pinned_identity`], retired (evicted) at `now`; answers the pin's
    /// credential.
    async fn retired_pin(
        store: &impl crate::store::PinStore,
        now: u64,
    ) -> crate::credential::Credential {
        use crate::identity::Retirement;
        let (identity, cookie) = pinned_identity(store, now).await;
        let retirement = Retirement {
            reason: RetireReason::Evicted,
            at_ms: now,
        };
        store.retire(identity.id, &retirement).await.unwrap();
        cookie
    }

    /// A wall clock stepped forward past `remember_retired` does not make
    /// the sweep forget a retired identity's pins (its cookie would then be
    /// founded anew on any exit); the time that really elapses does.
    #[tokio::test]
    async fn a_clock_stepped_forward_forgets_nothing_early() {
        use crate::store::PinStore as _;
        let router = router();
        let clock = router.clock().clone();
        let store = router.store();
        let cookie = retired_pin(&**store, clock.now_ms()).await;
        let exits = crate::exits::ExitSet::new(Vec::new(), None);
        let held = || async { store.lookup(&[cookie.key]).await.unwrap()[0].is_some() };

        // `remember_retired` is 60 s: a step of ten days forgets nothing.
        clock.step(std::time::Duration::from_secs(10 * 86_400));
        router.sweep(&exits).await.unwrap();
        assert!(held().await, "forgotten on a stepped clock");
        clock.advance(std::time::Duration::from_secs(30));
        router.sweep(&exits).await.unwrap();
        assert!(held().await, "forgotten 30 s after its retirement");
        // 60 s really elapsed (and the few seconds' slack): forgotten.
        clock.advance(std::time::Duration::from_secs(36));
        router.sweep(&exits).await.unwrap();
        assert!(!held().await, "kept past remember_retired");
    }

    /// A wall clock stepped forward while the process was down cannot be
    /// told from the time it was down: forgetting counts from the latest
    /// time the embedded store's records were stamped with, so a retired
    /// identity's pin is not forgotten at the first sweep after the start.
    #[tokio::test]
    async fn time_the_process_was_down_does_not_count_towards_forgetting() {
        use crate::store::durable::DurableStore;
        use crate::store::PinStore as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.redb");
        let clock = Clock::manual();
        let now = clock.now_ms();
        let cookie = {
            let store = DurableStore::open(&path).unwrap();
            let cookie = retired_pin(&store, now).await;
            store.close().await;
            cookie
        };
        // Down while the clock stepped ten days forward (`remember_retired`
        // is 60 s here).
        clock.step(std::time::Duration::from_secs(10 * 86_400));
        let store = Store::Durable(DurableStore::open(&path).unwrap());
        assert_eq!(store.newest_loaded_ms(), Some(now));
        let router = Router::new(
            store,
            clock.clone(),
            router().policies().as_ref().clone(),
            Arc::new(Metrics::new()),
            TaskTracker::new(),
        );
        let exits = crate::exits::ExitSet::new(Vec::new(), None);
        let held = || async { router.store().lookup(&[cookie.key]).await.unwrap()[0].is_some() };
        router.sweep(&exits).await.unwrap();
        assert!(held().await, "forgotten at the first sweep after the start");
        clock.advance(std::time::Duration::from_secs(66));
        router.sweep(&exits).await.unwrap();
        assert!(!held().await, "kept past remember_retired");
        router.store().close().await;
    }

    /// A retirement made after the wall clock stepped back is dated no
    /// earlier than the time elapsed since the start: dated by the stepped
    /// clock, it would be forgotten that much early once the clock is
    /// corrected.
    #[tokio::test]
    async fn a_retirement_is_not_dated_back_by_a_clock_stepped_back() {
        let router = router();
        let clock = router.clock().clone();
        let start = clock.now_ms();
        let (identity, _) = pinned_identity(&**router.store(), start).await;
        clock.advance(std::time::Duration::from_secs(60));
        clock.step_back(std::time::Duration::from_secs(3600));
        let exits = crate::exits::ExitSet::new(Vec::new(), None);
        router
            .retire(&exits, &identity, RetireReason::Evicted)
            .await
            .unwrap();
        let Store::Memory(memory) = &**router.store() else {
            unreachable!()
        };
        let at = memory.identity(identity.id).unwrap().retired.unwrap().at_ms;
        assert_eq!(at, start + 60_000);
    }

    /// The same for the sweep's own retirements (an identity of an exit no
    /// longer configured, here): dated by a clock stepped back, one would
    /// be forgotten, its pins with it, as soon as the step is corrected.
    #[tokio::test]
    async fn a_sweep_does_not_date_retirements_back_by_a_clock_stepped_back() {
        use crate::store::PinStore as _;
        let router = router();
        let clock = router.clock().clone();
        let start = clock.now_ms();
        let store = router.store();
        let (_, cookie) = pinned_identity(&**store, start).await;
        let exits = crate::exits::ExitSet::new(Vec::new(), None);
        clock.advance(std::time::Duration::from_secs(60));
        clock.step_back(std::time::Duration::from_secs(3600));
        router.sweep(&exits).await.unwrap();
        let found = store.lookup(&[cookie.key]).await.unwrap();
        let retired = found[0]
            .as_ref()
            .and_then(|b| b.identity.as_ref())
            .and_then(|i| i.retired.clone())
            .expect("the sweep retired it");
        assert_eq!(retired.at_ms, start + 60_000);
        // Corrected: `remember_retired` (60 s) has not passed since.
        clock.step(std::time::Duration::from_secs(3600));
        router.sweep(&exits).await.unwrap();
        assert!(
            store.lookup(&[cookie.key]).await.unwrap()[0].is_some(),
            "forgotten as soon as the clock was corrected"
        );
    }

    #[test]
    fn a_pending_retirement_is_found_until_removed_however_often_decided() {
        let pending = PendingRetirements::default();
        let (one, other) = (IdentityId::random(), IdentityId::random());
        assert_eq!(pending.get(one), None);
        pending.insert(one, RetireReason::IdleExpired);
        // Decided twice: one entry, and its removal leaves none behind.
        pending.insert(one, RetireReason::LifetimeExpired);
        pending.insert(other, RetireReason::IdleExpired);
        assert_eq!(pending.get(one), Some(RetireReason::LifetimeExpired));
        pending.remove(one);
        assert_eq!(pending.get(one), None);
        assert_eq!(pending.get(other), Some(RetireReason::IdleExpired));
        pending.remove(other);
        pending.remove(other);
        assert_eq!(pending.count.load(Ordering::SeqCst), 0);
        // Nothing pending: the map is not asked at all.
        pending.map.insert(one, RetireReason::IdleExpired);
        assert_eq!(pending.get(one), None);
    }
}
