//! An exit's lanes: one connection pool per [`PoolId`], found on every
//! request, aged and bounded beside the request path.
//!
//! A request finds its lane with one shard read of a concurrent map and
//! marks it used with a relaxed store of the current sweep number. The
//! sweeper (see [`super::idle`]) advances that number once a second and
//! drops lanes unused for longer than their time to idle, then, past
//! [`Lanes::capacity`], the least recently used ones. A dropped lane's
//! connections close once the requests still holding the lane finish; its
//! next request starts a new one.
//!
//! Why not a cache crate: the one used before spent about 1,300
//! instructions per lookup (frequency sketch, access-order queues, its
//! housekeeping) to answer the same question with more precision than a
//! lane's idle time of tens of seconds needs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use super::idle::SWEEP_INTERVAL;
use super::pool::LanePool;
use super::{LaneHasher, PoolId};

/// The lanes of one exit, each a `P` (a [`LanePool`]).
pub(super) struct Lanes<P = LanePool> {
    map: DashMap<PoolId, Slot<P>, LaneHasher>,
    /// Sweeps so far: the clock lanes age by.
    sweeps: AtomicU32,
    /// Sweeps a lane may go unused before it is dropped.
    idle_sweeps: u32,
    /// Most lanes kept after a sweep.
    capacity: usize,
}

/// A lane and the sweep in which it was last used.
struct Slot<P> {
    pool: Arc<P>,
    used: AtomicU32,
}

impl<P> Lanes<P> {
    /// Lanes dropped once unused for `time_to_idle` (rounded up to whole
    /// sweeps), at most `capacity` of them kept after each sweep.
    pub(super) fn new(time_to_idle: Duration, capacity: usize) -> Lanes<P> {
        let sweeps = time_to_idle
            .as_millis()
            .div_ceil(SWEEP_INTERVAL.as_millis().max(1));
        Lanes {
            map: DashMap::with_hasher(LaneHasher::default()),
            sweeps: AtomicU32::new(0),
            idle_sweeps: u32::try_from(sweeps).unwrap_or(u32::MAX).max(1),
            capacity,
        }
    }

    /// The lane `id`, made by `make` if there is none; marked used.
    pub(super) fn get_or_make(&self, id: PoolId, make: impl FnOnce() -> P) -> Arc<P> {
        let now = self.sweeps.load(Ordering::Relaxed);
        if let Some(slot) = self.map.get(&id) {
            // Written only when it changes: a lane in use by every request
            // is not a cache line bounced between cores on each of them.
            if slot.used.load(Ordering::Relaxed) != now {
                slot.used.store(now, Ordering::Relaxed);
            }
            return slot.pool.clone();
        }
        self.map
            .entry(id)
            .or_insert_with(|| Slot {
                pool: Arc::new(make()),
                used: AtomicU32::new(now),
            })
            .pool
            .clone()
    }

    /// The lane `id`, if there is one (not marked used).
    pub(super) fn get(&self, id: &PoolId) -> Option<Arc<P>> {
        self.map.get(id).map(|slot| slot.pool.clone())
    }

    /// Drops the lane `id`, if there is one.
    pub(super) fn remove(&self, id: &PoolId) -> Option<Arc<P>> {
        self.map.remove(id).map(|(_, slot)| slot.pool)
    }

    /// Drops every lane whose id `matches`; answers them.
    pub(super) fn remove_every(&self, matches: impl Fn(&PoolId) -> bool) -> Vec<(PoolId, Arc<P>)> {
        let mut removed = Vec::new();
        self.map.retain(|id, slot| {
            let keep = !matches(id);
            if !keep {
                removed.push((*id, slot.pool.clone()));
            }
            keep
        });
        removed
    }

    /// Number of lanes.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Every lane, copied out of the map: what is done with them (closing
    /// connections) then holds no lock a request making a lane would wait
    /// for.
    pub(super) fn snapshot(&self) -> Vec<Arc<P>> {
        self.map.iter().map(|slot| slot.pool.clone()).collect()
    }

    /// One sweep's ageing: the clock advances, lanes unused for their time
    /// to idle go, then the least recently used beyond the capacity.
    /// Returns how many lanes were dropped.
    pub(super) fn age(&self) -> usize {
        let now = self.sweeps.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let age = |slot: &Slot<P>| now.wrapping_sub(slot.used.load(Ordering::Relaxed));
        let mut ages: Vec<(u32, PoolId)> = self
            .map
            .iter()
            .map(|slot| (age(slot.value()), *slot.key()))
            .collect();
        let mut dropped = Vec::new();
        // Unused for their time to idle, unless used again since they were
        // read (a request between the two).
        ages.retain(|(lane_age, id)| {
            if *lane_age <= self.idle_sweeps {
                return true;
            }
            match self
                .map
                .remove_if(id, |_, slot| age(slot) > self.idle_sweeps)
            {
                Some(removed) => {
                    dropped.push(removed);
                    false
                }
                None => true,
            }
        });
        if let Some(excess) = ages.len().checked_sub(self.capacity).filter(|n| *n > 0) {
            // The `excess` oldest first.
            ages.select_nth_unstable_by_key(excess - 1, |(lane_age, _)| {
                std::cmp::Reverse(*lane_age)
            });
            dropped.extend(
                ages[..excess]
                    .iter()
                    .filter_map(|(_, id)| self.map.remove(id)),
            );
        }
        // Dropped here, outside every shard lock: closing a lane's idle
        // connections must not hold up requests looking up their lanes.
        let count = dropped.len();
        drop(dropped);
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::PoolKey;

    fn id(n: u64) -> PoolId {
        PoolId {
            key: PoolKey::Identity(crate::identity::IdentityId(n)),
            fingerprint: 0,
            h2: false,
        }
    }

    fn lanes(time_to_idle: Duration, capacity: usize) -> Lanes<()> {
        Lanes::new(time_to_idle, capacity)
    }

    #[test]
    fn a_lane_is_made_once_and_found_after() {
        let lanes = lanes(Duration::from_secs(10), 8);
        let first = lanes.get_or_make(id(1), || ());
        let again = lanes.get_or_make(id(1), || unreachable!("made twice"));
        assert!(Arc::ptr_eq(&first, &again));
        let other = lanes.get_or_make(id(2), || ());
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(lanes.len(), 2);
        lanes.remove(&id(1));
        assert_eq!(lanes.len(), 1);
    }

    /// An identity's lanes per client fingerprint all go with it.
    #[test]
    fn every_lane_of_a_key_can_be_dropped() {
        let lanes = lanes(Duration::from_secs(10), 8);
        for (n, fingerprint) in [(1, 0), (1, 7), (1, 9), (2, 7)] {
            let id = PoolId {
                fingerprint,
                ..id(n)
            };
            lanes.get_or_make(id, || ());
        }
        lanes.remove_every(|lane| lane.key == id(1).key);
        assert_eq!(lanes.len(), 1);
        assert!(lanes.map.contains_key(&PoolId {
            fingerprint: 7,
            ..id(2)
        }));
    }

    #[test]
    fn unused_lanes_go_after_their_time_to_idle_and_used_ones_stay() {
        // Three seconds: three sweeps.
        let lanes = lanes(Duration::from_millis(2_500), 8);
        lanes.get_or_make(id(1), || ());
        lanes.get_or_make(id(2), || ());
        for _ in 0..3 {
            assert_eq!(lanes.age(), 0);
            lanes.get_or_make(id(2), || ());
        }
        assert_eq!(lanes.age(), 1, "the fourth sweep drops the unused lane");
        assert_eq!(lanes.len(), 1);
        let kept = lanes.get_or_make(id(2), || unreachable!("the used lane was dropped"));
        drop(kept);
    }

    #[test]
    fn past_capacity_the_least_recently_used_go_first() {
        let lanes = lanes(Duration::from_secs(60), 2);
        lanes.get_or_make(id(1), || ());
        lanes.age();
        lanes.get_or_make(id(2), || ());
        lanes.age();
        lanes.get_or_make(id(3), || ());
        lanes.get_or_make(id(1), || ());
        // 2 is now the least recently used.
        assert_eq!(lanes.age(), 1);
        assert_eq!(lanes.len(), 2);
        lanes.get_or_make(id(1), || unreachable!("1 was used last"));
        lanes.get_or_make(id(3), || unreachable!("3 was used last"));
    }
}
