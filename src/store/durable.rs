//! The embedded durable store, pinproxy's default: pins and identities in a
//! redb file under DATA_DIR, with the whole working set in memory.
//!
//! Reads come from memory. Writes update memory and are queued to one
//! writer thread, which applies everything queued in one transaction and
//! commits it with fsync (group commit: concurrent requests share a flush).
//! A write that decides routing (a new pin, an identity's egress address, a
//! retirement) is awaited until it is on disk, so a response never reaches
//! the client before the pin it depends on would survive `kill -9`; a lookup
//! that returns a record still in flight waits for it the same way. Request
//! counts and last-use times are written lazily (at most every 500 ms,
//! without fsync): losing them to a crash only makes an identity look idle
//! earlier.
//!
//! redb was chosen over fjall by measurement (see README): steadier commit
//! latency at the small group sizes a proxy produces, and a start-up load of
//! a million records several times faster.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use dashmap::{DashMap, DashSet};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::memory::MemoryStore;
use super::{Binding, Counts, Listing, PinStore, StoreError, StoreErrorKind, Swept};
use crate::credential::PinKey;
use crate::fingerprint::Fingerprint;
use crate::identity::{ExitId, Identity, IdentityId, Pin, RetireReason, Retirement, SessionId};

/// File name of the store in the data directory.
pub const STORE_FILE: &str = "pins.redb";

const IDENTITIES: TableDefinition<u64, &[u8]> = TableDefinition::new("identities");
const FINGERPRINTS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("fingerprints");
const PINS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("pins");
const EXIT_DEATHS: TableDefinition<&str, u64> = TableDefinition::new("exit_deaths");

/// redb's page cache: writes touch a few pages each; reads come from memory.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// An identity on disk: like [`Identity`], with its fingerprint stored once
/// in its own table and referred to by hash.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredIdentity {
    exit: ExitId,
    session: SessionId,
    session_started_ms: u64,
    created_ms: u64,
    last_used_ms: u64,
    requests: u64,
    worked: bool,
    egress_ip: Option<IpAddr>,
    retired: Option<Retirement>,
    fingerprint: [u8; 16],
}

fn fingerprint_hash(fingerprint: &Fingerprint) -> Result<([u8; 16], Vec<u8>), String> {
    let bytes = postcard::to_stdvec(fingerprint).map_err(|e| e.to_string())?;
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&blake3::hash(&bytes).as_bytes()[..16]);
    Ok((hash, bytes))
}
/// How often lazily written state (touches) is flushed when idle.
const LAZY_FLUSH: Duration = Duration::from_millis(500);
/// Most writes applied in one transaction.
const MAX_GROUP: usize = 8192;

/// One queued change. The writer persists the record's current state in
/// memory (or deletes it if it is gone), so repeated changes coalesce.
#[derive(Debug)]
enum Change {
    Identity(IdentityId),
    Pin(PinKey),
    ExitDeath(ExitId, u64),
    Compact,
    /// Write what is queued, then stop.
    Close,
}

#[derive(Debug)]
struct Queued {
    seq: u64,
    change: Change,
}

/// What the writer has made durable.
#[derive(Clone, Debug, Default)]
struct Committed {
    seq: u64,
    failure: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    memory: MemoryStore,
    /// Records whose latest change is not on disk yet, with its sequence.
    pending_pins: DashMap<PinKey, u64>,
    pending_identities: DashMap<IdentityId, u64>,
    /// Identities whose lazily written state changed.
    dirty: DashSet<IdentityId>,
}

/// The durable store.
#[derive(Debug)]
pub struct DurableStore {
    shared: Arc<Shared>,
    /// To the writer thread. Not behind a lock: requests on every core
    /// queue their pins here at once.
    queue: mpsc::Sender<Queued>,
    next_seq: AtomicU64,
    committed: watch::Receiver<Committed>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
}

/// The store file could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds it.
    #[error("the pin store {0} is in use by another pinproxy; stop it first")]
    InUse(PathBuf),
    /// redb refused it.
    #[error("pin store {path}: {reason}")]
    Database {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn db_error(path: &Path, e: impl std::fmt::Display) -> OpenError {
    OpenError::Database {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

impl DurableStore {
    /// Opens (or creates) the store at `path` and loads it into memory.
    /// Blocking: call it off the async runtime.
    pub fn open(path: &Path) -> Result<DurableStore, OpenError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse(path.to_owned()),
                other => db_error(path, other),
            })?;
        let memory = load(&db).map_err(|e| db_error(path, e))?;
        let shared = Arc::new(Shared {
            memory,
            ..Shared::default()
        });
        let (pins, identities) = shared.memory.sizes();
        tracing::info!(path = %path.display(), pins, identities, "pin store loaded");

        let (queue, receiver) = mpsc::channel();
        let (committed_tx, committed) = watch::channel(Committed::default());
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("pin-store-writer".into())
            .spawn(move || write_loop(db, writer_shared, receiver, committed_tx))
            .map_err(|e| db_error(path, e))?;
        Ok(DurableStore {
            shared,
            queue,
            next_seq: AtomicU64::new(1),
            committed,
            writer: Mutex::new(Some(writer)),
            path: path.to_owned(),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes a sequence number for a change and marks its record in flight,
    /// before memory changes, so no reader can see the new state and take
    /// it for durable.
    fn reserve(&self, change: &Change) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mark = |s: &mut u64| *s = (*s).max(seq);
        match change {
            Change::Identity(id) => {
                self.shared
                    .pending_identities
                    .entry(*id)
                    .and_modify(mark)
                    .or_insert(seq);
            }
            Change::Pin(key) => {
                self.shared
                    .pending_pins
                    .entry(*key)
                    .and_modify(mark)
                    .or_insert(seq);
            }
            Change::ExitDeath(..) | Change::Compact | Change::Close => {}
        }
        seq
    }

    /// Queues a reserved change for the writer.
    fn send(&self, seq: u64, change: Change) -> Result<u64, StoreError> {
        // Fails once the writer has stopped (closed, or a write failed).
        self.queue
            .send(Queued { seq, change })
            .map(|()| seq)
            .map_err(|_| StoreError::new(StoreErrorKind::Closed, "the embedded store is closed"))
    }

    fn enqueue(&self, change: Change) -> Result<u64, StoreError> {
        let seq = self.reserve(&change);
        self.send(seq, change)
    }

    /// Waits until everything up to `seq` is on disk.
    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut committed = self.committed.clone();
        let state = committed
            .wait_for(|c| c.seq >= seq || c.failure.is_some())
            .await
            .map_err(|_| {
                StoreError::new(
                    StoreErrorKind::Closed,
                    "the embedded store's writer stopped",
                )
            })?;
        match &state.failure {
            Some(failure) => Err(StoreError::new(
                StoreErrorKind::WriteFailed,
                failure.clone(),
            )),
            None => Ok(()),
        }
    }

    /// Waits until the records a lookup returned are on disk, if any is
    /// still in flight (rare: written moments ago by another request).
    async fn settle(
        &self,
        bindings: &[Option<Binding>],
        keys: &[PinKey],
    ) -> Result<(), StoreError> {
        let mut wait = 0;
        for (key, binding) in keys.iter().zip(bindings) {
            let Some(binding) = binding else { continue };
            if let Some(seq) = self.shared.pending_pins.get(key) {
                wait = wait.max(*seq);
            }
            if let Some(seq) = self.shared.pending_identities.get(&binding.pin.identity) {
                wait = wait.max(*seq);
            }
        }
        if wait > 0 {
            self.durable(wait).await?;
        }
        Ok(())
    }

    /// Asks the writer to write what is queued and stop; later writes fail.
    fn stop_writer(&self) {
        // An error means the writer is gone already.
        let _ = self.queue.send(Queued {
            seq: 0,
            change: Change::Close,
        });
    }

    /// Flushes everything and stops the writer (the store is unusable after).
    pub async fn close(&self) {
        self.stop_writer();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

impl Drop for DurableStore {
    fn drop(&mut self) {
        // The writer flushes what is queued and exits on its own.
        self.stop_writer();
    }
}

/// Loads every record into memory.
fn load(db: &Database) -> Result<MemoryStore, String> {
    use redb::ReadableTableMetadata as _;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    // Create the tables on first start.
    {
        txn.open_table(IDENTITIES).map_err(|e| e.to_string())?;
        txn.open_table(PINS).map_err(|e| e.to_string())?;
        txn.open_table(FINGERPRINTS).map_err(|e| e.to_string())?;
        txn.open_table(EXIT_DEATHS).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())?;
    let read = db.begin_read().map_err(|e| e.to_string())?;
    let identities = read.open_table(IDENTITIES).map_err(|e| e.to_string())?;
    let pins = read.open_table(PINS).map_err(|e| e.to_string())?;
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let memory = MemoryStore::with_capacity(
        size(pins.len().map_err(|e| e.to_string())?),
        size(identities.len().map_err(|e| e.to_string())?),
    );
    let mut fingerprints = std::collections::HashMap::new();
    let table = read.open_table(FINGERPRINTS).map_err(|e| e.to_string())?;
    for row in table.iter().map_err(|e| e.to_string())? {
        let (hash, value) = row.map_err(|e| e.to_string())?;
        let fingerprint: Fingerprint =
            postcard::from_bytes(value.value()).map_err(|e| format!("corrupt fingerprint: {e}"))?;
        fingerprints.insert(*hash.value(), Arc::new(fingerprint));
    }
    for row in identities.iter().map_err(|e| e.to_string())? {
        let (id, value) = row.map_err(|e| e.to_string())?;
        let stored: StoredIdentity =
            postcard::from_bytes(value.value()).map_err(|e| format!("corrupt identity: {e}"))?;
        memory.insert_identity(&Identity {
            id: IdentityId(id.value()),
            exit: stored.exit,
            session: stored.session,
            session_started_ms: stored.session_started_ms,
            created_ms: stored.created_ms,
            egress_ip: stored.egress_ip,
            fingerprint: fingerprints
                .get(&stored.fingerprint)
                .cloned()
                .unwrap_or_default(),
            last_used_ms: stored.last_used_ms,
            requests: stored.requests,
            worked: stored.worked,
            retired: stored.retired,
        });
    }
    for row in pins.iter().map_err(|e| e.to_string())? {
        let (key, value) = row.map_err(|e| e.to_string())?;
        let pin: Pin =
            postcard::from_bytes(value.value()).map_err(|e| format!("corrupt pin: {e}"))?;
        memory.insert_pin(PinKey::from_bytes(*key.value()), &pin);
    }
    let deaths = read.open_table(EXIT_DEATHS).map_err(|e| e.to_string())?;
    for row in deaths.iter().map_err(|e| e.to_string())? {
        let (exit, at) = row.map_err(|e| e.to_string())?;
        memory.set_exit_death(&ExitId::new(exit.value()), at.value());
    }
    Ok(memory)
}

/// The writer thread: waits for changes, applies every queued one in one
/// transaction, commits, then tells the waiters.
fn write_loop(
    mut db: Database,
    shared: Arc<Shared>,
    queue: mpsc::Receiver<Queued>,
    committed: watch::Sender<Committed>,
) {
    let mut open = true;
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
        match apply(&db, &shared, &group, &dirty, durable) {
            Ok(()) => {
                if let Some(seq) = group.iter().map(|q| q.seq).max() {
                    shared.pending_pins.retain(|_, s| *s > seq);
                    shared.pending_identities.retain(|_, s| *s > seq);
                    committed.send_modify(|c| c.seq = c.seq.max(seq));
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
            match shared.memory.identity(id) {
                Some(identity) => {
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
                    let stored = StoredIdentity {
                        exit: identity.exit,
                        session: identity.session,
                        session_started_ms: identity.session_started_ms,
                        created_ms: identity.created_ms,
                        last_used_ms: identity.last_used_ms,
                        requests: identity.requests,
                        worked: identity.worked,
                        egress_ip: identity.egress_ip,
                        retired: identity.retired,
                        fingerprint: hash,
                    };
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

impl PinStore for DurableStore {
    async fn lookup(&self, keys: &[PinKey]) -> Result<Vec<Option<Binding>>, StoreError> {
        let bindings = self.shared.memory.lookup(keys).await?;
        self.settle(&bindings, keys).await?;
        Ok(bindings)
    }

    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let change = Change::Identity(identity.id);
        let seq = self.reserve(&change);
        self.shared.memory.create_identity(identity).await?;
        // Not awaited: an identity is unreachable until a pin points to it,
        // and that pin's commit comes later in the same order.
        self.send(seq, change)?;
        Ok(())
    }

    async fn discard_identity(&self, id: IdentityId) -> Result<(), StoreError> {
        self.shared.memory.discard_identity(id).await?;
        self.enqueue(Change::Identity(id))?;
        Ok(())
    }

    async fn pin_if_absent(&self, key: PinKey, pin: &Pin) -> Result<Binding, StoreError> {
        self.pin_all_if_absent(&[(key, pin.clone())])
            .await?
            .pop()
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Protocol,
                    "the pin vanished after it was written",
                )
            })
    }

    async fn pin_all_if_absent(&self, pins: &[(PinKey, Pin)]) -> Result<Vec<Binding>, StoreError> {
        let keys: Vec<PinKey> = pins.iter().map(|(key, _)| *key).collect();
        let found = self.shared.memory.lookup(&keys).await?;
        let mut bindings = Vec::with_capacity(pins.len());
        let mut last_seq = 0;
        for ((key, pin), existing) in pins.iter().zip(&found) {
            // Already pinned (an origin re-setting the same value, say): no write.
            if let Some(binding) = existing {
                bindings.push(binding.clone());
                continue;
            }
            let change = Change::Pin(*key);
            let seq = self.reserve(&change);
            bindings.push(self.shared.memory.pin_if_absent(*key, pin).await?);
            // Whether this request won or lost the race, the commit of `seq`
            // writes the pin now in memory: the one in force.
            self.send(seq, change)?;
            last_seq = seq;
        }
        // Pins found may still be on their way to disk; one wait covers
        // them and every pin queued above (they share a commit).
        self.settle(&found, &keys).await?;
        if last_seq > 0 {
            self.durable(last_seq).await?;
        }
        Ok(bindings)
    }

    async fn touch(&self, id: IdentityId, now_ms: u64, worked: bool) -> Result<(), StoreError> {
        self.shared.memory.touch(id, now_ms, worked).await?;
        self.shared.dirty.insert(id);
        Ok(())
    }

    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        let change = Change::Identity(id);
        let seq = self.reserve(&change);
        let recorded = self.shared.memory.record_egress(id, ip).await?;
        self.send(seq, change)?;
        self.durable(seq).await?;
        Ok(recorded)
    }

    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        let change = Change::Identity(id);
        let seq = self.reserve(&change);
        self.shared.memory.retire(id, retirement).await?;
        self.send(seq, change)?;
        self.durable(seq).await
    }

    async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        self.shared.memory.list().await
    }

    async fn count(&self) -> Result<Counts, StoreError> {
        self.shared.memory.count().await
    }

    async fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &(dyn Fn(&Identity) -> Option<RetireReason> + Sync),
    ) -> Result<Swept, StoreError> {
        let before = self.shared.memory.sizes();
        let changes = self
            .shared
            .memory
            .sweep_collect(now_ms, keep_retired_ms, expiry);
        for id in changes.retired.iter().chain(&changes.removed_identities) {
            self.enqueue(Change::Identity(*id))?;
        }
        for key in &changes.removed_pins {
            self.enqueue(Change::Pin(*key))?;
        }
        let removed = changes.removed_pins.len() + changes.removed_identities.len();
        // Give the space back once a sizeable share of the file is free.
        if removed > 1000 && removed * 4 > before.0 + before.1 {
            self.enqueue(Change::Compact)?;
        }
        Ok(Swept {
            pins: changes.removed_pins.len() as u64,
            identities: changes.removed_identities.len() as u64,
            retired: changes.retired.len() as u64,
        })
    }

    async fn record_exit_death(&self, exit: &ExitId, at_ms: u64) -> Result<(), StoreError> {
        self.shared.memory.set_exit_death(exit, at_ms);
        self.enqueue(Change::ExitDeath(exit.clone(), at_ms))?;
        Ok(())
    }

    async fn exit_deaths(&self) -> Result<Vec<(ExitId, u64)>, StoreError> {
        self.shared.memory.exit_deaths().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::PinKind;
    use crate::fingerprint::Fingerprint;
    use crate::identity::{ExitId, SessionId};

    fn identity(now: u64) -> Identity {
        Identity::new(
            ExitId::new("e1"),
            SessionId(7),
            now,
            Arc::new(Fingerprint::default()),
            now,
        )
    }

    fn pin(identity: &Identity) -> Pin {
        Pin {
            identity: identity.id,
            kind: PinKind::Cookie,
            name: Arc::from("datadome"),
            created_ms: 1,
            expires_ms: Some(99),
        }
    }

    #[tokio::test]
    async fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let key = PinKey::from_bytes([3; 16]);
        let ident = identity(1000);
        {
            let store = DurableStore::open(&path).unwrap();
            store.create_identity(&ident).await.unwrap();
            store.pin_if_absent(key, &pin(&ident)).await.unwrap();
            store.touch(ident.id, 2000, true).await.unwrap();
            store
                .record_exit_death(&ExitId::new("e2"), 1500)
                .await
                .unwrap();
            store
                .retire(
                    ident.id,
                    &Retirement {
                        reason: RetireReason::Manual,
                        at_ms: 3000,
                    },
                )
                .await
                .unwrap();
            store.close().await;
        }
        let store = DurableStore::open(&path).unwrap();
        let found = store.lookup(&[key]).await.unwrap();
        let binding = found[0].clone().unwrap();
        assert_eq!(binding.pin, pin(&ident));
        let loaded = binding.identity.unwrap();
        assert_eq!(loaded.last_used_ms, 2000);
        assert!(loaded.worked);
        assert_eq!(loaded.retired.unwrap().reason, RetireReason::Manual);
        assert_eq!(
            store.exit_deaths().await.unwrap(),
            vec![(ExitId::new("e2"), 1500)]
        );
    }

    #[tokio::test]
    async fn closing_releases_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        DurableStore::open(&path).unwrap().close().await;
        assert!(DurableStore::open(&path).is_ok());
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let _first = DurableStore::open(&path).unwrap();
        assert!(matches!(
            DurableStore::open(&path),
            Err(OpenError::InUse(_))
        ));
    }
}
