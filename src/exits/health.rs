//! Exit health: healthy, unhealthy or dead, with hysteresis.
//!
//! Evidence comes from periodic probes (a CONNECT through the exit to the
//! configured probe target) and from real traffic (only failures that are
//! the exit's own fault count). `unhealthy_after` consecutive failures make
//! a healthy exit unhealthy; `dead_after` make it dead; `healthy_after`
//! consecutive successes bring it back. An exit that died remembers when:
//! identities created before that moment are retired, because after an
//! outage the exit's address can no longer be trusted to be the same.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

/// How far past now an identity's creation may be noted (see
/// [`Health::note_identity`]): as far as replicas' clocks may differ.
const NOTED_AHEAD_MS: u64 = 5_000;

/// An exit's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthState {
    /// Takes new identities and rotated traffic.
    Healthy,
    /// Skipped for new identities and rotation while a healthy exit exists;
    /// its identities carry on.
    Unhealthy,
    /// Its identities are retired; it only gets probes and trial requests.
    Dead,
}

impl HealthState {
    fn from_u8(v: u8) -> HealthState {
        match v {
            0 => HealthState::Healthy,
            1 => HealthState::Unhealthy,
            _ => HealthState::Dead,
        }
    }

    /// Gauge value: 0 healthy, 1 unhealthy, 2 dead.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Thresholds for state changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive failures that make a healthy exit unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive failures that make an exit dead.
    pub dead_after: u32,
    /// Consecutive successes that make an exit healthy again.
    pub healthy_after: u32,
}

/// One exit's health.
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    failures: AtomicU32,
    /// When the exit last died (Unix ms), 0 if never.
    died_at_ms: AtomicU64,
    /// The latest creation time of an identity of the exit this process
    /// has founded or judged (see [`Health::note_identity`]).
    latest_identity_ms: AtomicU64,
    /// When a trial request was last let through while not healthy.
    last_trial_ms: AtomicU64,
    /// Serialises state changes (per exit, never held across an await).
    /// The thresholds live under the same lock: a reload may change them.
    transition: Mutex<Counters>,
    changes: watch::Sender<HealthState>,
    /// A reload replaced the route this health describes (see
    /// [`Health::let_go`]).
    let_go: AtomicBool,
    /// Deaths this process found (not those read back from the store),
    /// and how many of them were acted on (see [`Health::claim_deaths`]).
    deaths_found: AtomicU64,
    deaths_acted_on: AtomicU64,
}

#[derive(Debug)]
struct Counters {
    failures: u32,
    successes: u32,
    thresholds: Thresholds,
}

impl Health {
    /// A healthy exit.
    pub fn new(thresholds: Thresholds) -> Health {
        Health {
            state: AtomicU8::new(HealthState::Healthy as u8),
            failures: AtomicU32::new(0),
            died_at_ms: AtomicU64::new(0),
            latest_identity_ms: AtomicU64::new(0),
            last_trial_ms: AtomicU64::new(0),
            transition: Mutex::new(Counters {
                failures: 0,
                successes: 0,
                thresholds,
            }),
            changes: watch::channel(HealthState::Healthy).0,
            let_go: AtomicBool::new(false),
            deaths_found: AtomicU64::new(0),
            deaths_acted_on: AtomicU64::new(0),
        }
    }

    /// Whether deaths this process found (a probe, a request, a trial)
    /// wait to be acted on, claimed at once: true for one caller per death,
    /// whichever task asks (the watchers of a reload's old and new loops
    /// overlap, and a death found while one ended is the next one's). A
    /// death read back from the store (another replica's, or an earlier
    /// run's) is not among them: the identities it ends are judged one by
    /// one as they are routed, since some were founded after it.
    pub fn claim_deaths(&self) -> bool {
        let found = self.deaths_found.load(Ordering::Acquire);
        // Raised, never lowered: a watcher that read an older count cannot
        // take back a claim a later reader made.
        self.deaths_acted_on.fetch_max(found, Ordering::AcqRel) < found
    }

    /// A reload replaced the exit's route under its id, and the exit now in
    /// force has a health of its own: what requests that started on the old
    /// route still report here changes nothing. Their failures would
    /// otherwise kill the new route (a route is often changed because the
    /// old one fails) and date a death that retires the identities founded
    /// on it.
    pub fn let_go(&self) {
        self.let_go.store(true, Ordering::Release);
    }

    fn is_let_go(&self) -> bool {
        self.let_go.load(Ordering::Acquire)
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        HealthState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// When the exit last died, if ever.
    pub fn died_at_ms(&self) -> Option<u64> {
        match self.died_at_ms.load(Ordering::Acquire) {
            0 => None,
            at => Some(at),
        }
    }

    /// Notes an identity of the exit created at `created_ms` (founded here,
    /// or judged at a use). A death is dated no earlier than the latest
    /// noted: identities are retired by comparing their creation with the
    /// death, and a wall clock stepped back since one was created (or
    /// another replica's clock reading ahead) would otherwise date the
    /// death before it, and it would outlive its exit's death.
    ///
    /// A creation time past `now_ms` by more than replicas' clocks differ
    /// is taken as that far only: a replica whose clock is hours ahead
    /// would otherwise date a death hours ahead, stored and shared, and
    /// every identity founded on the exit until then would retire with it.
    pub fn note_identity(&self, created_ms: u64, now_ms: u64) {
        let created_ms = created_ms.min(now_ms.saturating_add(NOTED_AHEAD_MS));
        if created_ms > self.latest_identity_ms.load(Ordering::Relaxed) {
            self.latest_identity_ms
                .fetch_max(created_ms, Ordering::AcqRel);
        }
    }

    /// Restores a death time remembered from before a restart.
    pub fn restore_died_at(&self, at_ms: u64) {
        self.died_at_ms.fetch_max(at_ms, Ordering::AcqRel);
    }

    /// Takes new thresholds (a reload); they apply from the next probe or
    /// request on, the counts so far are kept.
    pub fn set_thresholds(&self, thresholds: Thresholds) {
        self.transition
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .thresholds = thresholds;
    }

    /// State changes, for waiting on them.
    pub fn subscribe(&self) -> watch::Receiver<HealthState> {
        self.changes.subscribe()
    }

    /// Records a success (probe or request). Returns the new state if it changed.
    pub fn success(&self) -> Option<HealthState> {
        // Fast path for the common case: healthy and nothing to reset.
        if self.state() == HealthState::Healthy && self.failures.load(Ordering::Relaxed) == 0
            || self.is_let_go()
        {
            return None;
        }
        let mut counters = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        counters.failures = 0;
        self.failures.store(0, Ordering::Relaxed);
        counters.successes = counters.successes.saturating_add(1);
        if self.state() != HealthState::Healthy
            && counters.successes >= counters.thresholds.healthy_after
        {
            return Some(self.set(HealthState::Healthy, 0));
        }
        None
    }

    /// Records a failure that is the exit's fault. Returns the new state if
    /// it changed.
    pub fn failure(&self, now_ms: u64) -> Option<HealthState> {
        if self.is_let_go() {
            return None;
        }
        let mut counters = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        counters.successes = 0;
        counters.failures = counters.failures.saturating_add(1);
        self.failures.store(counters.failures, Ordering::Relaxed);
        let state = self.state();
        if state != HealthState::Dead && counters.failures >= counters.thresholds.dead_after {
            return Some(self.set(HealthState::Dead, now_ms));
        }
        if state == HealthState::Healthy && counters.failures >= counters.thresholds.unhealthy_after
        {
            return Some(self.set(HealthState::Unhealthy, now_ms));
        }
        None
    }

    /// Records a failure that may be the origin's rather than the exit's:
    /// an exit that does not answer a `CONNECT` in time may be waiting on an
    /// origin that never answers it, and a client may aim at such an origin
    /// at will. It may make the exit unhealthy (no new identities, no
    /// rotated traffic, trials), never dead: a death retires every identity
    /// of the exit, which only failures that are surely the exit's (and
    /// health probes) may do. Returns the new state if it changed.
    pub fn doubtful_failure(&self, now_ms: u64) -> Option<HealthState> {
        if self.is_let_go() {
            return None;
        }
        let mut counters = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        counters.successes = 0;
        let below_dead = counters.thresholds.dead_after.saturating_sub(1);
        counters.failures = counters
            .failures
            .saturating_add(1)
            .min(below_dead.max(counters.failures));
        self.failures.store(counters.failures, Ordering::Relaxed);
        if self.state() == HealthState::Healthy
            && counters.failures >= counters.thresholds.unhealthy_after
        {
            return Some(self.set(HealthState::Unhealthy, now_ms));
        }
        None
    }

    fn set(&self, state: HealthState, now_ms: u64) -> HealthState {
        if state == HealthState::Dead {
            let latest = self.latest_identity_ms.load(Ordering::Acquire);
            self.died_at_ms
                .fetch_max(now_ms.max(latest).max(1), Ordering::AcqRel);
            // Counted once dated: a watcher that claims it finds its time.
            self.deaths_found.fetch_add(1, Ordering::AcqRel);
        }
        self.state.store(state as u8, Ordering::Release);
        self.changes.send_replace(state);
        state
    }

    /// Claims a trial request for an exit that is not healthy, at most one
    /// per `interval_ms`: without probes, trials are how it can recover.
    pub fn claim_trial(&self, now_ms: u64, interval_ms: u64) -> bool {
        let last = self.last_trial_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= interval_ms
            && self
                .last_trial_ms
                .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A death this process found is claimed once, whichever watcher asks;
    /// one read back from the store is never claimed (its identities are
    /// judged one by one: some were founded after it).
    #[test]
    fn a_found_death_is_claimed_once_and_a_restored_one_never() {
        let h = health();
        h.restore_died_at(1_000);
        assert!(!h.claim_deaths());
        for at in 2_000..2_010 {
            if h.failure(at) == Some(HealthState::Dead) {
                break;
            }
        }
        assert_eq!(h.state(), HealthState::Dead);
        assert!(h.claim_deaths());
        assert!(!h.claim_deaths(), "claimed twice");
    }

    fn health() -> Health {
        Health::new(Thresholds {
            unhealthy_after: 2,
            dead_after: 4,
            healthy_after: 2,
        })
    }

    /// A health let go (its route replaced by a reload) takes no report:
    /// failures neither change its state nor date a death, and successes
    /// change nothing either.
    #[test]
    fn a_health_let_go_takes_no_report() {
        let h = health();
        assert_eq!(h.failure(10), None);
        h.let_go();
        for at in 11..20 {
            assert_eq!(h.failure(at), None);
            assert_eq!(h.doubtful_failure(at), None);
        }
        assert_eq!(h.success(), None);
        assert_eq!(h.state(), HealthState::Healthy);
        assert_eq!(h.died_at_ms(), None);
    }

    /// Failures that may be an origin's make an exit unhealthy but never
    /// dead, however many come at once; one that is surely the exit's
    /// still can.
    #[test]
    fn doubtful_failures_never_kill_an_exit() {
        let h = health();
        assert_eq!(h.doubtful_failure(10), None);
        assert_eq!(h.doubtful_failure(11), Some(HealthState::Unhealthy));
        for at in 12..100 {
            assert_eq!(h.doubtful_failure(at), None);
        }
        assert_eq!(h.state(), HealthState::Unhealthy);
        assert_eq!(h.died_at_ms(), None);
        assert_eq!(h.failure(100), Some(HealthState::Dead));
    }

    /// A wall clock stepped back after an identity of the exit was created
    /// must not date the exit's death before it: it would outlive the
    /// death. The death is dated no earlier than the latest identity noted.
    #[test]
    fn a_death_is_dated_no_earlier_than_the_identities_noted() {
        let h = health();
        h.note_identity(5_000, 1_000);
        h.note_identity(4_000, 1_000);
        for _ in 0..4 {
            h.failure(1_000);
        }
        assert_eq!(h.state(), HealthState::Dead);
        assert_eq!(h.died_at_ms(), Some(5_000));
        // On a clock that reads later, as it reads.
        let h = health();
        h.note_identity(5_000, 1_000);
        for _ in 0..4 {
            h.failure(9_000);
        }
        assert_eq!(h.died_at_ms(), Some(9_000));
        // A creation far ahead of now (a replica's clock hours ahead) moves
        // the death a few seconds at most.
        let h = health();
        h.note_identity(7_200_000, 1_000);
        for _ in 0..4 {
            h.failure(1_000);
        }
        assert_eq!(h.died_at_ms(), Some(1_000 + NOTED_AHEAD_MS));
    }

    #[test]
    fn hysteresis_both_ways() {
        let h = health();
        assert_eq!(h.failure(10), None);
        assert_eq!(h.failure(11), Some(HealthState::Unhealthy));
        // One success is not enough to come back, and resets the failures.
        assert_eq!(h.success(), None);
        assert_eq!(h.failure(12), None);
        assert_eq!(h.failure(13), None);
        assert_eq!(h.failure(14), None);
        assert_eq!(h.failure(15), Some(HealthState::Dead));
        assert_eq!(h.died_at_ms(), Some(15));
        assert_eq!(h.success(), None);
        assert_eq!(h.success(), Some(HealthState::Healthy));
        assert_eq!(h.died_at_ms(), Some(15), "the death is remembered");
    }

    #[test]
    fn trials_are_rationed() {
        let h = health();
        assert!(h.claim_trial(10_000, 1_000));
        assert!(!h.claim_trial(10_500, 1_000));
        assert!(h.claim_trial(11_000, 1_000));
    }
}
