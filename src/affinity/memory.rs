//! The in-process pin store: sharded concurrent maps of pins and identities
//! (no global lock). On its own, pins die with the process; the durable
//! store keeps its working set in one of these.
//!
//! Fingerprints are interned: a fleet has few distinct browsers, and an
//! identity then costs a pointer instead of five header strings.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::{DashMap, DashSet};

use super::{Binding, Counts, Listing, PinStore, StoreError, Swept};
use crate::cookies::PinKey;
use crate::exits::ExitId;
use crate::fingerprint::Fingerprint;
use crate::identity::{Identity, IdentityId, Pin, RetireReason, Retirement};

/// Pins and identities held in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    pins: DashMap<PinKey, Pin>,
    identities: DashMap<IdentityId, Identity>,
    fingerprints: DashSet<Arc<Fingerprint>>,
    exit_deaths: DashMap<ExitId, u64>,
}

/// What a sweep changed, for stores that mirror it elsewhere.
#[derive(Debug, Default)]
pub struct SweepChanges {
    /// Pins forgotten.
    pub removed_pins: Vec<PinKey>,
    /// Identities forgotten.
    pub removed_identities: Vec<IdentityId>,
    /// Identities retired because they expired.
    pub retired: Vec<IdentityId>,
}

impl SweepChanges {
    fn counts(&self) -> Swept {
        Swept {
            pins: self.removed_pins.len() as u64,
            identities: self.removed_identities.len() as u64,
            retired: self.retired.len() as u64,
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn binding(&self, pin: Pin) -> Binding {
        let identity = self.identities.get(&pin.identity).map(|i| i.clone());
        Binding { pin, identity }
    }

    fn intern(&self, fingerprint: &Arc<Fingerprint>) -> Arc<Fingerprint> {
        if let Some(known) = self.fingerprints.get(fingerprint) {
            return known.clone();
        }
        self.fingerprints.insert(fingerprint.clone());
        fingerprint.clone()
    }

    /// Inserts an identity as it is (loading a durable store).
    pub fn insert_identity(&self, mut identity: Identity) {
        identity.fingerprint = self.intern(&identity.fingerprint);
        self.identities.insert(identity.id, identity);
    }

    /// Inserts a pin as it is (loading a durable store).
    pub fn insert_pin(&self, key: PinKey, pin: Pin) {
        self.pins.insert(key, pin);
    }

    /// The identity with this id.
    pub fn identity(&self, id: IdentityId) -> Option<Identity> {
        self.identities.get(&id).map(|i| i.clone())
    }

    /// The pin of `key`.
    pub fn pin(&self, key: &PinKey) -> Option<Pin> {
        self.pins.get(key).map(|p| p.clone())
    }

    /// Pins and identities held.
    pub fn sizes(&self) -> (usize, usize) {
        (self.pins.len(), self.identities.len())
    }

    /// Sweeps like [`PinStore::sweep`] and says what changed.
    pub fn sweep_collect(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &(dyn Fn(&Identity) -> Option<RetireReason> + Sync),
    ) -> SweepChanges {
        let mut changes = SweepChanges::default();
        self.identities
            .retain(|id, identity| match &identity.retired {
                Some(r) if r.at_ms.saturating_add(keep_retired_ms) <= now_ms => {
                    changes.removed_identities.push(*id);
                    false
                }
                Some(_) => true,
                None => {
                    if let Some(reason) = expiry(identity) {
                        identity.retired = Some(Retirement {
                            reason,
                            at_ms: now_ms,
                        });
                        changes.retired.push(*id);
                    }
                    true
                }
            });
        self.pins.retain(|key, pin| {
            let keep = self.identities.contains_key(&pin.identity)
                && pin
                    .expires_ms
                    .is_none_or(|at| at.saturating_add(keep_retired_ms) > now_ms);
            if !keep {
                changes.removed_pins.push(*key);
            }
            keep
        });
        changes
    }

    /// Records an exit's death time (keeps the latest).
    pub fn set_exit_death(&self, exit: &ExitId, at_ms: u64) {
        let mut entry = self.exit_deaths.entry(exit.clone()).or_insert(0);
        *entry = (*entry).max(at_ms);
    }
}

impl PinStore for MemoryStore {
    async fn lookup(&self, keys: &[PinKey]) -> Result<Vec<Option<Binding>>, StoreError> {
        Ok(keys
            .iter()
            .map(|k| self.pins.get(k).map(|p| p.clone()))
            .map(|pin| pin.map(|p| self.binding(p)))
            .collect())
    }

    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.insert_identity(identity.clone());
        Ok(())
    }

    async fn discard_identity(&self, id: IdentityId) -> Result<(), StoreError> {
        self.identities.remove(&id);
        Ok(())
    }

    async fn pin_if_absent(&self, key: PinKey, pin: &Pin) -> Result<Binding, StoreError> {
        // The entry holds the shard's write lock, so check-and-insert is atomic.
        let pin = match self.pins.entry(key) {
            Entry::Occupied(existing) => existing.get().clone(),
            Entry::Vacant(slot) => slot.insert(pin.clone()).clone(),
        };
        Ok(self.binding(pin))
    }

    async fn touch(&self, id: IdentityId, now_ms: u64, worked: bool) -> Result<(), StoreError> {
        if let Some(mut identity) = self.identities.get_mut(&id) {
            identity.last_used_ms = identity.last_used_ms.max(now_ms);
            identity.requests += 1;
            identity.worked |= worked;
        }
        Ok(())
    }

    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        Ok(self
            .identities
            .get_mut(&id)
            .map(|mut identity| *identity.egress_ip.get_or_insert(ip)))
    }

    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        if let Some(mut identity) = self.identities.get_mut(&id) {
            // The first retirement stands: its reason is the real one.
            identity.retired.get_or_insert_with(|| retirement.clone());
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        let mut listings: Vec<Listing> = self
            .identities
            .iter()
            .map(|i| Listing {
                identity: i.clone(),
                pins: Vec::new(),
            })
            .collect();
        let index: std::collections::HashMap<IdentityId, usize> = listings
            .iter()
            .enumerate()
            .map(|(n, l)| (l.identity.id, n))
            .collect();
        for pin in self.pins.iter() {
            if let Some(&n) = index.get(&pin.identity) {
                listings[n].pins.push((*pin.key(), pin.value().clone()));
            }
        }
        Ok(listings)
    }

    async fn count(&self) -> Result<Counts, StoreError> {
        let retired = self
            .identities
            .iter()
            .filter(|i| i.retired.is_some())
            .count() as u64;
        Ok(Counts {
            pins: self.pins.len() as u64,
            identities: self.identities.len() as u64,
            retired,
        })
    }

    async fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &(dyn Fn(&Identity) -> Option<RetireReason> + Sync),
    ) -> Result<Swept, StoreError> {
        Ok(self.sweep_collect(now_ms, keep_retired_ms, expiry).counts())
    }

    async fn record_exit_death(&self, exit: &ExitId, at_ms: u64) -> Result<(), StoreError> {
        self.set_exit_death(exit, at_ms);
        Ok(())
    }

    async fn exit_deaths(&self) -> Result<Vec<(ExitId, u64)>, StoreError> {
        Ok(self
            .exit_deaths
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect())
    }
}
