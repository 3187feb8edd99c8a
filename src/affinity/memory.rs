//! The in-process pin store: two sharded concurrent maps (pins and
//! identities). Pins die with the process; the durable store keeps its
//! working set in one of these.

use std::net::IpAddr;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::{Binding, Counts, Listing, PinStore, StoreError, Swept};
use crate::cookies::PinKey;
use crate::identity::{Identity, IdentityId, Pin, RetireReason, Retirement};

/// Pins and identities held in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    pins: DashMap<PinKey, Pin>,
    identities: DashMap<IdentityId, Identity>,
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

    /// Inserts an identity as it is (loading a durable store).
    pub fn insert_identity(&self, identity: Identity) {
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
        self.identities.insert(identity.id, identity.clone());
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
        let mut swept = Swept::default();
        self.identities
            .retain(|_, identity| match &identity.retired {
                Some(r) if r.at_ms.saturating_add(keep_retired_ms) <= now_ms => {
                    swept.identities += 1;
                    false
                }
                Some(_) => true,
                None => {
                    if let Some(reason) = expiry(identity) {
                        identity.retired = Some(Retirement {
                            reason,
                            at_ms: now_ms,
                        });
                        swept.retired += 1;
                    }
                    true
                }
            });
        self.pins.retain(|_, pin| {
            let keep = self.identities.contains_key(&pin.identity)
                && pin
                    .expires_ms
                    .is_none_or(|at| at.saturating_add(keep_retired_ms) > now_ms);
            if !keep {
                swept.pins += 1;
            }
            keep
        });
        Ok(swept)
    }
}
