//! The lanes of identities retired lately, for every client an exit has
//! had.
//!
//! A reload gives an exit a new client when its pool settings, its CA or
//! its egress checks change, and may keep its identities; requests routed
//! before the reload still hold the old client's pools. A retirement
//! decided through either client must stop a request holding either: once
//! an identity retires, no request of it writes a byte, whichever client's
//! pool it waits on. So the clients of one exit share one record of its
//! retired lanes and know each other's lanes.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::lanes::Lanes;
use super::{Forgotten, LaneHasher, PoolId, PoolKey};
use crate::identity::RetireReason;

/// How long a retired identity's lane is remembered: longer than a request
/// takes from its routing to its connection.
const KEPT: Duration = Duration::from_secs(600);

/// Past this many remembered retired lanes, those older than [`KEPT`] are
/// forgotten at the next retirement (see [`RetiredLanes::prune`]).
const PRUNED_PAST: usize = 1024;

/// The retired lanes of one exit, shared by its clients (see the module
/// docs).
#[derive(Debug)]
pub(super) struct RetiredLanes {
    /// Lanes retired lately, why and when: a pool made for one after its
    /// retirement (by a request routed before it) is born retired.
    lanes: DashMap<PoolKey, (RetireReason, Instant), LaneHasher>,
    /// When the remembered lanes were last pruned, and how many of them the
    /// next prune waits for (see [`RetiredLanes::prune`]).
    pruned: Mutex<(Instant, usize)>,
    /// The lane maps of the exit's clients, while they live.
    clients: Mutex<Vec<Weak<Lanes>>>,
    /// Every identity of the exit retired, whether its lane exists yet or
    /// not (a reload removed the exit: see [`RetiredLanes::retire_all`]).
    all_identities: std::sync::OnceLock<RetireReason>,
}

impl Default for RetiredLanes {
    fn default() -> Self {
        RetiredLanes {
            lanes: DashMap::default(),
            pruned: Mutex::new((Instant::now(), PRUNED_PAST)),
            clients: Mutex::new(Vec::new()),
            all_identities: std::sync::OnceLock::new(),
        }
    }
}

impl RetiredLanes {
    /// Counts `pools` (a new client's) among the exit's clients; clients
    /// that are gone are let go.
    pub(super) fn register(&self, pools: &Arc<Lanes>) {
        let mut clients = self.clients();
        clients.retain(|client| client.strong_count() > 0);
        clients.push(Arc::downgrade(pools));
    }

    /// Why lane `key` retired, if it did lately (or with every identity of
    /// the exit).
    pub(super) fn reason(&self, key: &PoolKey) -> Option<RetireReason> {
        if let (PoolKey::Identity(_), Some(reason)) = (key, self.all_identities.get()) {
            return Some(reason.clone());
        }
        self.lanes.get(key).map(|retired| retired.0.clone())
    }

    /// Retires every identity of the exit for good, for `reason` (a reload
    /// removed it): the lanes that exist as
    /// [`RetiredLanes::retire_every_identity`] does, and any made later
    /// for one (by a request routed on the set before the reload) is born
    /// retired, whether or not its identity had a lane before.
    pub(super) fn retire_all(&self, reason: &RetireReason) {
        let _ = self.all_identities.set(reason.clone());
        self.retire_every_identity(reason);
    }

    /// Retires `lanes` in every client of the exit: their pools are
    /// dropped and marked (a request still holding one writes nothing), and
    /// a pool made for one afterwards is born retired.
    pub(super) fn retire(&self, lanes: &[Forgotten]) {
        // Remembered before the pools go, so that a pool made meanwhile is
        // found by one or the other.
        let now = Instant::now();
        self.prune(now);
        for lane in lanes {
            self.lanes.insert(lane.key, (lane.reason.clone(), now));
        }
        let clients: Vec<Arc<Lanes>> = self.clients().iter().filter_map(Weak::upgrade).collect();
        for pools in clients {
            retire_in(&pools, lanes);
        }
    }

    /// Retires the lane of every identity the exit's clients hold now, for
    /// `reason` (the exit died, and identities founded before a death
    /// retire): as [`RetiredLanes::retire`] does for each.
    pub(super) fn retire_every_identity(&self, reason: &RetireReason) {
        let now = Instant::now();
        self.prune(now);
        let clients: Vec<Arc<Lanes>> = self.clients().iter().filter_map(Weak::upgrade).collect();
        let identity = |id: &PoolId| matches!(id.key, PoolKey::Identity(_));
        for pools in &clients {
            for (id, pool) in pools.remove_every(identity) {
                self.lanes.insert(id.key, (reason.clone(), now));
                pool.retire(reason.clone());
            }
        }
        // A pool made for one of them meanwhile, before it was remembered.
        for pools in &clients {
            let remembered = |id: &PoolId| identity(id) && self.lanes.contains_key(&id.key);
            for (_, pool) in pools.remove_every(remembered) {
                pool.retire(reason.clone());
            }
        }
    }

    /// Forgets the retired lanes remembered longer than [`KEPT`] once there
    /// are [`PRUNED_PAST`] of them, then again each time their number has
    /// doubled since the last prune, or that long after it: a burst of
    /// retirements (a sweep's) walks the map a few times, not once per
    /// retirement, and what it left is let go with the next retirement
    /// once it is old.
    fn prune(&self, now: Instant) {
        // One prune at a time; a retirement meanwhile does not wait for it.
        let mut pruned = match self.pruned.try_lock() {
            Ok(pruned) => pruned,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let (last, at_len) = *pruned;
        let len = self.lanes.len();
        let due = len >= at_len || (len >= PRUNED_PAST && now.duration_since(last) >= KEPT);
        if !due {
            return;
        }
        self.lanes
            .retain(|_, (_, at)| now.duration_since(*at) < KEPT);
        *pruned = (now, (self.lanes.len() * 2).max(PRUNED_PAST));
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Lanes>>> {
        // Every change is one push or retain: a panic cannot leave it
        // inconsistent.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drops and marks the pools of `lanes` in one client's `pools`: one walk
/// of its lanes for all those kept per presentation.
fn retire_in(pools: &Lanes, lanes: &[Forgotten]) {
    let walked: std::collections::HashMap<PoolKey, &RetireReason, LaneHasher> = lanes
        .iter()
        .filter(|lane| lane.every_presentation)
        .map(|lane| (lane.key, &lane.reason))
        .collect();
    if !walked.is_empty() {
        for (id, pool) in pools.remove_every(|id| walked.contains_key(&id.key)) {
            if let Some(reason) = walked.get(&id.key) {
                pool.retire((*reason).clone());
            }
        }
    }
    for lane in lanes.iter().filter(|lane| !lane.every_presentation) {
        for h2 in [false, true] {
            let id = PoolId {
                key: lane.key,
                fingerprint: 0,
                h2,
            };
            if let Some(pool) = pools.remove(&id) {
                pool.retire(lane.reason.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SessionId;

    /// Retired all at once (a removed exit), an identity that never had a
    /// lane is retired too; cookie-less lanes are not.
    #[test]
    fn retiring_all_reaches_identities_without_a_lane_yet() {
        let retired = RetiredLanes::default();
        let identity = PoolKey::Identity(crate::identity::IdentityId(7));
        assert!(retired.reason(&identity).is_none());
        retired.retire_all(&RetireReason::ExitRemoved);
        assert_eq!(retired.reason(&identity), Some(RetireReason::ExitRemoved));
        assert!(retired.reason(&PoolKey::Anonymous(SessionId(1))).is_none());
    }

    /// Thousands retired one after another: the remembered lanes are
    /// pruned only when they have doubled since the last prune, and once
    /// they are old the next retirement lets them go, however far the next
    /// doubling is.
    #[test]
    fn a_burst_of_retirements_prunes_a_few_times_not_once_each() {
        let retired = RetiredLanes::default();
        for n in 0..5_000u64 {
            retired.retire(&[Forgotten {
                key: PoolKey::Anonymous(SessionId(n)),
                every_presentation: false,
                reason: RetireReason::Evicted,
            }]);
        }
        assert_eq!(retired.lanes.len(), 5_000);
        let next_prune = retired.pruned.lock().unwrap().1;
        assert!(
            next_prune > 5_000 && next_prune <= 2 * 5_000,
            "{next_prune}"
        );
        retired.prune(Instant::now() + KEPT);
        assert_eq!(retired.lanes.len(), 0);
    }
}
