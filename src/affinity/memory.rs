//! The in-process pin store: a sharded concurrent map. Pins die with the
//! process; the durable store builds on it.

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::{Pin, PinStore, StoreError};
use crate::cookies::PinKey;

/// Pins held in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    pins: DashMap<PinKey, Pin>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl PinStore for MemoryStore {
    async fn lookup(&self, keys: &[PinKey]) -> Result<Vec<Option<Pin>>, StoreError> {
        Ok(keys
            .iter()
            .map(|k| self.pins.get(k).map(|p| p.clone()))
            .collect())
    }

    async fn pin_if_absent(&self, key: PinKey, pin: Pin) -> Result<Pin, StoreError> {
        // The entry holds the shard's write lock, so check-and-insert is atomic.
        Ok(match self.pins.entry(key) {
            Entry::Occupied(existing) => existing.get().clone(),
            Entry::Vacant(slot) => slot.insert(pin).clone(),
        })
    }

    async fn count(&self) -> Result<u64, StoreError> {
        Ok(self.pins.len() as u64)
    }
}
