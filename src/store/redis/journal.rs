//! Each replica's own record of the pins and identities it saw in Redis,
//! on its disk: what the fleet writes back when Redis forgets.
//!
//! The journal is the embedded durable store (a redb file in the data
//! directory, `journal.redb`), fed with every binding this replica makes or
//! reads: a new pin is in the journal, fsynced, before its response is
//! released, like a pin of the embedded store. It holds hashes only, and
//! is swept like any store, so it is bounded by the pins' own lifetimes.
//!
//! A journal write that fails is logged, and the journal then records
//! nothing more (its writer stops, as the embedded store's does). What
//! needed the write fails with it (a new pin's answer is withheld, as when
//! Redis refuses the pin), and so does one the disk does not confirm in
//! time (a hung disk also fails the replica's readiness). The replica
//! fails closed from then on: a pin it could not journal would be
//! missing from a restore after a Redis loss, and founded anew on any exit.
//! It refuses requests that need the store (`503 store-unavailable`, naming
//! the journal's file) and its readiness fails, until it is restarted once
//! the disk is fixed; the other replicas serve meanwhile.

use std::net::IpAddr;
use std::path::Path;

use crate::credential::PinKey;
use crate::identity::{Identity, IdentityId, Pin, Retirement};
use crate::store::durable::{DurableStore, OpenError};
use crate::store::{Binding, Bindings, Expiry, Listing, PinStore as _, StoreError};

/// File name of the journal in the data directory.
pub const JOURNAL_FILE: &str = "journal.redb";

/// A replica's journal.
#[derive(Debug)]
pub struct Journal {
    store: DurableStore,
    /// Its file, for messages.
    path: std::path::PathBuf,
}

fn logged<T>(result: Result<T, StoreError>, what: &str) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not journal {what}: a restore after a Redis loss would miss it");
    }
}

impl Journal {
    /// Opens (or creates) the journal in `data_dir`. Blocking.
    pub fn open(data_dir: &Path) -> Result<Journal, OpenError> {
        let path = data_dir.join(JOURNAL_FILE);
        Ok(Journal {
            store: DurableStore::open(&path)?,
            path,
        })
    }

    /// The cookie names of the pins the journal holds: those this replica
    /// made or read (see `MemoryStore::held_cookie_names`).
    pub fn held_cookie_names(&self) -> Vec<std::sync::Arc<str>> {
        self.store.held_cookie_names()
    }

    /// The tracked-cookie patterns this replica's pins were keyed under,
    /// as the journal recorded them (see
    /// [`DurableStore::tracking_on_record`]).
    pub fn tracking_on_record(&self) -> Option<Vec<String>> {
        self.store.tracking_on_record()
    }

    /// Records the tracked-cookie patterns this replica keys pins under
    /// from now on (see [`DurableStore::record_tracking`]).
    pub async fn record_tracking(&self, patterns: &[Box<str>]) -> Result<(), StoreError> {
        self.store.record_tracking(patterns).await
    }

    /// Why the journal records nothing more, once a write of it failed
    /// (see the module documentation): its file and the failure.
    pub fn write_failure(&self) -> Option<String> {
        self.store.write_failure().map(|failure| {
            format!(
                "its journal {} could not be written ({failure})",
                self.path.display()
            )
        })
    }

    /// `result` of journaling `what`, a failure said and named by the
    /// journal's file: what needed it must not go on as if a restore could
    /// bring it back (a pin's answer is withheld, as when Redis refuses
    /// it), and the replica refuses what needs the store from then on.
    fn needed<T>(&self, result: Result<T, StoreError>, what: &str) -> Result<T, StoreError> {
        result.map_err(|e| {
            tracing::warn!(error = %e, "could not journal {what}: a restore after a Redis loss would miss it");
            StoreError::new(
                e.kind,
                format!("its journal {} could not record {what} ({})", self.path.display(), e.detail),
            )
        })
    }

    /// Records `bindings` (pins and their identities) the journal does not
    /// hold yet, durably; fails when it cannot (see [`Journal::needed`]).
    pub async fn bindings(&self, bindings: &[(PinKey, &Binding)]) -> Result<(), StoreError> {
        let keys: Vec<PinKey> = bindings.iter().map(|(key, _)| *key).collect();
        let known = self.needed(self.store.lookup(&keys).await, "a pin")?;
        let mut pins = Vec::with_capacity(bindings.len());
        for (index, (key, binding)) in bindings.iter().enumerate() {
            if known.get(index).is_some_and(Option::is_some) {
                continue;
            }
            if let Some(identity) = &binding.identity {
                self.needed(self.store.create_identity(identity).await, "an identity")?;
            }
            pins.push((*key, binding.pin.clone()));
        }
        if !pins.is_empty() {
            self.needed(self.store.pin_all_if_absent(&pins).await, "a pin")?;
        }
        Ok(())
    }

    /// Whether the journal's writer and disk answer (readiness): a disk
    /// that hangs fails it as a failed write does.
    pub async fn check_writes(&self) -> Result<(), StoreError> {
        self.needed(self.store.check_writes().await, "anything")
    }

    /// Whether the journal holds identity `id`.
    pub fn holds(&self, id: IdentityId) -> bool {
        self.store.holds_identity(id)
    }

    /// The retirement the journal holds for identity `id`, if any.
    pub fn retirement(&self, id: IdentityId) -> Option<Retirement> {
        self.store.retirement(id)
    }

    /// Records a new identity; fails when it cannot.
    pub async fn identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.needed(self.store.create_identity(identity).await, "an identity")
    }

    /// Forgets an identity that lost its race.
    pub async fn discard(&self, id: IdentityId) {
        logged(
            self.store.discard_identity(id).await,
            "a discarded identity",
        );
    }

    /// Records a use (lazily written) and the egress address it revealed.
    pub async fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) {
        logged(
            self.store.touch(id, now_ms, requests, worked, egress).await,
            "a use",
        );
    }

    /// Records an egress address; fails when it cannot.
    pub async fn egress(&self, id: IdentityId, ip: IpAddr) -> Result<(), StoreError> {
        self.needed(
            self.store.record_egress(id, ip).await.map(|_| ()),
            "an egress address",
        )
    }

    /// Records a pin's later expiry (see `PinStore::extend_pin`), so that
    /// a restore brings the pin back as it is; fails when it cannot.
    pub async fn extend_pin(
        &self,
        key: PinKey,
        pinned: &Pin,
        expires_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        self.needed(
            self.store.extend_pin(key, pinned, expires_ms).await,
            "a pin's later expiry",
        )
    }

    /// Records a retirement.
    pub async fn retire(&self, id: IdentityId, retirement: &Retirement) {
        logged(self.store.retire(id, retirement).await, "a retirement");
    }

    /// What the journal knows of `keys`.
    pub async fn lookup(&self, keys: &[PinKey]) -> Result<Bindings, StoreError> {
        self.store.lookup(keys).await
    }

    /// Everything the journal holds.
    pub async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        self.store.list().await
    }

    /// Forgets what has expired (as the store it mirrors does).
    pub async fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &Expiry<'_>,
    ) -> Result<(), StoreError> {
        self.store
            .sweep(now_ms, keep_retired_ms, expiry)
            .await
            .map(|_| ())
    }

    /// Flushes and closes the journal.
    pub async fn close(&self) {
        self.store.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A pin of a new identity on exit `e1`, in session `session`.
    fn binding_of(session: u64) -> Binding {
        use crate::credential::PinKind;
        use crate::identity::{ExitId, SessionId};
        let fingerprint = Arc::new(crate::fingerprint::Fingerprint::default());
        let identity = Identity::new(ExitId::new("e1"), SessionId(session), 5, fingerprint, 5);
        Binding {
            pin: Pin {
                identity: identity.id,
                kind: PinKind::Cookie,
                name: Arc::from("datadome"),
                created_ms: 5,
                expires_ms: None,
            },
            identity: Some(Arc::new(identity)),
        }
    }

    /// A journal whose disk fails says so, naming its file: the replica
    /// then refuses what needs the store (`Store::refusal`) and its
    /// readiness fails, rather than failing lookups one by one under the
    /// embedded store's name.
    #[tokio::test]
    async fn a_journal_that_cannot_write_says_so_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.write_failure(), None);
        let binding = binding_of(1);
        journal.store.fail_writes_for_tests();
        // The pin that met the failure is refused too, not only the ones
        // after it: its answer must not go on unjournaled.
        let refused = journal
            .bindings(&[(PinKey::from_bytes([1; 16]), &binding)])
            .await
            .unwrap_err();
        assert!(refused.detail.contains(JOURNAL_FILE), "{refused}");
        // The writer stops on its failure (bounded wait).
        for _ in 0..500 {
            if journal.write_failure().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let failure = journal.write_failure().expect("the failure is kept");
        assert!(failure.contains(JOURNAL_FILE), "{failure}");
    }

    /// A journal whose disk hangs refuses the pin waiting for it, naming
    /// its file, and fails its check (readiness), until the disk answers.
    #[tokio::test]
    async fn a_journal_whose_disk_hangs_refuses_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.check_writes().await.unwrap();
        let binding = binding_of(1);
        journal
            .store
            .stall_writes_for_tests(true, std::time::Duration::from_millis(200));
        let refused = journal
            .bindings(&[(PinKey::from_bytes([2; 16]), &binding)])
            .await
            .unwrap_err();
        assert_eq!(
            refused.kind,
            crate::store::StoreErrorKind::Stalled,
            "{refused}"
        );
        assert!(refused.detail.contains(JOURNAL_FILE), "{refused}");
        let check = journal.check_writes().await.unwrap_err();
        assert_eq!(check.kind, crate::store::StoreErrorKind::Stalled, "{check}");
        journal
            .store
            .stall_writes_for_tests(false, std::time::Duration::from_secs(30));
        journal.check_writes().await.unwrap();
    }
}
