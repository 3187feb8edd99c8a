//! The embedded store's writer thread: it takes queued changes, applies
//! everything queued in one redb transaction and commits it with fsync
//! (group commit: concurrent requests share a flush), then tells the
//! waiters what is durable. Lazily written state (touches) is flushed
//! without fsync when nothing else is queued.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use redb::{Database, ReadableTable};
use tokio::sync::watch;

use super::codec::{fingerprint_hash, StoredIdentity, EXIT_DEATHS, FINGERPRINTS, IDENTITIES, PINS};
use super::{Change, Committed, Queued, Shared};
use crate::fingerprint::Fingerprint;
use crate::identity::IdentityId;

/// The content hashes of fingerprints already in the fingerprints table,
/// by the address of their shared value. An identity is rewritten on every
/// lazy flush after a request (its last use changed) while its fingerprint
/// never changes: hashing it means serialising its whole ClientHello, and
/// the memory store hands out one shared value per distinct fingerprint.
/// The entry keeps its value alive, so no other fingerprint can come to
/// live at its address.
#[derive(Default)]
struct KnownFingerprints(HashMap<usize, (Arc<Fingerprint>, [u8; 16])>);

impl KnownFingerprints {
    fn get(&self, fingerprint: &Arc<Fingerprint>) -> Option<[u8; 16]> {
        self.0
            .get(&(Arc::as_ptr(fingerprint) as usize))
            .map(|(_, hash)| *hash)
    }

    fn insert(&mut self, fingerprint: &Arc<Fingerprint>, hash: [u8; 16]) {
        self.0.insert(
            Arc::as_ptr(fingerprint) as usize,
            (fingerprint.clone(), hash),
        );
    }
}

/// Which changes are on disk, by number: every one up to `through`, and
/// those in `ahead`, committed while an earlier one was still on its way.
/// Changes are numbered before memory changes and queued after, so two
/// requests can queue theirs in the opposite order; a change is durable for
/// its waiters only once every earlier one is too.
#[derive(Debug, Default)]
struct Done {
    through: u64,
    ahead: BTreeSet<u64>,
}

impl Done {
    /// Records the numbers of a committed transaction's changes; returns
    /// the number every change up to which is now on disk.
    fn record(&mut self, seqs: impl IntoIterator<Item = u64>) -> u64 {
        for seq in seqs {
            if seq > self.through {
                self.ahead.insert(seq);
            }
        }
        while self.ahead.remove(&(self.through + 1)) {
            self.through += 1;
        }
        self.through
    }
}

/// How often lazily written state (touches) is flushed when idle.
pub(super) const LAZY_FLUSH: Duration = Duration::from_millis(500);
/// Most writes applied in one transaction.
const MAX_GROUP: usize = 8192;

/// The writer thread: waits for changes, applies every queued one in one
/// transaction, commits, then tells the waiters.
pub(super) fn write_loop(
    mut db: Database,
    shared: Arc<Shared>,
    queue: mpsc::Receiver<Queued>,
    committed: watch::Sender<Committed>,
) {
    let mut open = true;
    let mut known = KnownFingerprints::default();
    let mut done = Done::default();
    while open {
        let mut group = Vec::new();
        match queue.recv_timeout(LAZY_FLUSH) {
            Ok(first) => group.push(first),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
        }
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let dirty: Vec<IdentityId> = shared.dirty.iter().map(|id| *id).collect();
        for id in &dirty {
            shared.dirty.remove(id);
        }
        if group.is_empty() && dirty.is_empty() {
            continue;
        }
        let compact = group.iter().any(|q| matches!(q.change, Change::Compact));
        if group.iter().any(|q| matches!(q.change, Change::Close)) {
            open = false;
        }
        // Lazily written state alone does not need a flush.
        let durable = !group.is_empty();
        match apply(&db, &shared, &group, &dirty, durable, &mut known) {
            Ok(()) => {
                let before = done.through;
                // `Close` carries no number.
                let through = done.record(group.iter().map(|q| q.seq).filter(|seq| *seq > 0));
                if through > before {
                    shared.pending_pins.retain(|_, s| *s > through);
                    shared.pending_identities.retain(|_, s| *s > through);
                }
                if durable {
                    shared.durable_through.store(through, Ordering::Release);
                    committed.send_modify(|c| {
                        c.seq = through;
                        c.commits += 1;
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "pin store write failed; refusing new pins until restart");
                committed.send_modify(|c| c.failure = Some(e));
                return;
            }
        }
        if compact {
            match db.compact() {
                Ok(_) => tracing::info!("pin store compacted"),
                Err(e) => tracing::warn!(error = %e, "pin store compaction failed"),
            }
        }
    }
}

fn apply(
    db: &Database,
    shared: &Shared,
    group: &[Queued],
    dirty: &[IdentityId],
    durable: bool,
    known: &mut KnownFingerprints,
) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    let durability = if durable {
        redb::Durability::Immediate
    } else {
        redb::Durability::None
    };
    txn.set_durability(durability).map_err(|e| e.to_string())?;
    {
        let mut identities = txn.open_table(IDENTITIES).map_err(|e| e.to_string())?;
        let mut pins = txn.open_table(PINS).map_err(|e| e.to_string())?;
        let mut fingerprints = txn.open_table(FINGERPRINTS).map_err(|e| e.to_string())?;
        let mut deaths = txn.open_table(EXIT_DEATHS).map_err(|e| e.to_string())?;
        let mut put_identity = |id: IdentityId| -> Result<(), String> {
            match shared.memory.identity_to_write(id) {
                Some(identity) => {
                    let hash = match known.get(&identity.fingerprint) {
                        Some(hash) => hash,
                        None => {
                            let (hash, fingerprint) = fingerprint_hash(&identity.fingerprint)?;
                            if fingerprints
                                .get(&hash)
                                .map_err(|e| e.to_string())?
                                .is_none()
                            {
                                fingerprints
                                    .insert(&hash, fingerprint.as_slice())
                                    .map_err(|e| e.to_string())?;
                            }
                            known.insert(&identity.fingerprint, hash);
                            hash
                        }
                    };
                    let stored = StoredIdentity::of(identity, hash);
                    let bytes = postcard::to_stdvec(&stored).map_err(|e| e.to_string())?;
                    identities
                        .insert(id.0, bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                None => {
                    identities.remove(id.0).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        };
        for id in dirty {
            put_identity(*id)?;
        }
        for queued in group {
            match &queued.change {
                Change::Identity(id) => put_identity(*id)?,
                Change::Pin(key) => match shared.memory.pin(key) {
                    Some(pin) => {
                        let bytes = postcard::to_stdvec(&pin).map_err(|e| e.to_string())?;
                        pins.insert(key.as_bytes(), bytes.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    None => {
                        pins.remove(key.as_bytes()).map_err(|e| e.to_string())?;
                    }
                },
                Change::ExitDeath(exit, at) => {
                    deaths
                        .insert(exit.as_str(), at)
                        .map_err(|e| e.to_string())?;
                }
                Change::Compact | Change::Close => {}
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_through_only_what_has_nothing_missing_before_it() {
        let mut done = Done::default();
        assert_eq!(done.record([2]), 0);
        assert_eq!(done.record([5, 3]), 0);
        assert_eq!(done.record([1]), 3);
        assert_eq!(done.record([]), 3);
        assert_eq!(done.record([4]), 5);
        // A number seen again (a retried change) changes nothing.
        assert_eq!(done.record([2, 6]), 6);
        assert!(done.ahead.is_empty());
    }
}
