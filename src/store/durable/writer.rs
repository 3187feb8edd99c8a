//! The embedded store's writer thread: it takes queued changes, applies
//! everything queued in one redb transaction and commits it with fsync
//! (group commit: concurrent requests share a flush), then tells the
//! waiters what is durable. Lazily written state (touches) is flushed
//! without fsync when nothing else is queued.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use redb::{Database, ReadableTable};
use tokio::sync::watch;

use super::codec::{
    fingerprint_hash, stored_fingerprint, FingerprintRefs, StoredIdentity, EXIT_DEATHS,
    FINGERPRINTS, IDENTITIES, META, PINS, TRACKED_COOKIES,
};
use super::{Change, Committed, Queued, Shared};
use crate::fingerprint::Fingerprint;
use crate::identity::IdentityId;

/// The content hashes of fingerprints already in the fingerprints table,
/// by the address of their shared value. An identity is rewritten on every
/// lazy flush after a request (its last use changed) while its fingerprint
/// never changes: hashing it means serialising its whole ClientHello, and
/// the memory store hands out one shared value per distinct fingerprint.
///
/// An entry holds its value weakly: the memory store lets go of a
/// fingerprint once no identity holds it, and this cache must not keep it
/// (a fleet that gives each identity a `User-Agent` of its own brings a new
/// one with every identity). The weak reference keeps the value's
/// allocation, so no other fingerprint can come to live at its address
/// while the entry exists; entries whose value is gone are dropped as the
/// cache grows.
#[derive(Default)]
struct KnownFingerprints {
    by_address: HashMap<usize, (Weak<Fingerprint>, [u8; 16])>,
    /// Entries after the last clean-up: the next comes at twice as many.
    kept: usize,
}

impl KnownFingerprints {
    fn get(&self, fingerprint: &Arc<Fingerprint>) -> Option<[u8; 16]> {
        self.by_address
            .get(&(Arc::as_ptr(fingerprint) as usize))
            .map(|(_, hash)| *hash)
    }

    fn insert(&mut self, fingerprint: &Arc<Fingerprint>, hash: [u8; 16]) {
        if self.by_address.len() >= self.kept.saturating_mul(2).max(64) {
            self.by_address
                .retain(|_, (value, _)| value.strong_count() > 0);
            self.kept = self.by_address.len();
        }
        self.by_address.insert(
            Arc::as_ptr(fingerprint) as usize,
            (Arc::downgrade(fingerprint), hash),
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
    mut refs: FingerprintRefs,
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
        let mut fingerprints = Fingerprints {
            known: &mut known,
            refs: &mut refs,
        };
        #[cfg(test)]
        for _ in 0..10_000 {
            if !shared.stall_writes.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        #[cfg(test)]
        let written = if shared.fail_writes.load(Ordering::Relaxed) {
            Err("injected write failure".to_owned())
        } else {
            apply(&db, &shared, &group, &dirty, durable, &mut fingerprints)
        };
        #[cfg(not(test))]
        let written = apply(&db, &shared, &group, &dirty, durable, &mut fingerprints);
        match written {
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
                shared.failed.store(true, Ordering::Release);
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

/// What the writer knows of the stored fingerprints.
struct Fingerprints<'a> {
    known: &'a mut KnownFingerprints,
    refs: &'a mut FingerprintRefs,
}

fn apply(
    db: &Database,
    shared: &Shared,
    group: &[Queued],
    dirty: &[IdentityId],
    durable: bool,
    Fingerprints { known, refs }: &mut Fingerprints<'_>,
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
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let mut put_identity = |id: IdentityId| -> Result<(), String> {
            let Some(identity) = shared.memory.identity_to_write(id) else {
                let removed = identities.remove(id.0).map_err(|e| e.to_string())?;
                if let Some(hash) = removed.and_then(|old| stored_fingerprint(old.value())) {
                    if refs.remove(hash) {
                        fingerprints.remove(&hash).map_err(|e| e.to_string())?;
                    }
                }
                return Ok(());
            };
            let fingerprint = identity.fingerprint.clone();
            let (hash, encoded) = match known.get(&fingerprint) {
                Some(hash) => (hash, None),
                None => {
                    let (hash, encoded) = fingerprint_hash(&fingerprint)?;
                    known.insert(&fingerprint, hash);
                    (hash, Some(encoded))
                }
            };
            let stored = StoredIdentity::of(identity, hash);
            let bytes = postcard::to_stdvec(&stored).map_err(|e| e.to_string())?;
            let replaced = identities
                .insert(id.0, bytes.as_slice())
                .map_err(|e| e.to_string())?
                .map(|old| stored_fingerprint(old.value()));
            // An identity's fingerprint never changes: rewriting it (its
            // last use, after requests) leaves the counts as they are.
            if replaced == Some(Some(hash)) {
                return Ok(());
            }
            // The row is written when missing: with its first identity on
            // disk (the hash may come from the cache, the row gone with the
            // last identity before), or after a start that found identities
            // referring to a row gone from the file (a damaged file): they
            // still count, so an identity of the same client brings it back.
            refs.add(hash);
            if fingerprints
                .get(&hash)
                .map_err(|e| e.to_string())?
                .is_none()
            {
                let encoded = match encoded {
                    Some(encoded) => encoded,
                    None => fingerprint_hash(&fingerprint)?.1,
                };
                fingerprints
                    .insert(&hash, encoded.as_slice())
                    .map_err(|e| e.to_string())?;
            }
            if let Some(Some(old)) = replaced {
                if refs.remove(old) {
                    fingerprints.remove(&old).map_err(|e| e.to_string())?;
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
                    // The latest death, as memory keeps it: an older one
                    // recorded later (an import of an older export) must
                    // not undo it at the next start.
                    let stored = deaths
                        .get(exit.as_str())
                        .map_err(|e| e.to_string())?
                        .map(|value| value.value());
                    let latest = stored.map_or(*at, |stored| stored.max(*at));
                    deaths
                        .insert(exit.as_str(), latest)
                        .map_err(|e| e.to_string())?;
                }
                Change::Tracking(patterns) => {
                    meta.insert(TRACKED_COOKIES, &**patterns)
                        .map_err(|e| e.to_string())?;
                }
                Change::Compact | Change::Barrier | Change::Close => {}
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
