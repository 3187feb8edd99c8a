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

mod codec;
mod writer;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use dashmap::{DashMap, DashSet};
use redb::Database;

use codec::FingerprintRefs;
use tokio::sync::watch;

use super::memory::MemoryStore;
use super::{
    Binding, Bindings, Counts, Expiry, Listing, PinStore, StoreError, StoreErrorKind, Swept,
};
use crate::credential::{PinHasher, PinKey, RandomKeys};
use crate::identity::{ExitId, Identity, IdentityId, Pin, Retirement};

/// File name of the store in the data directory.
pub const STORE_FILE: &str = "pins.redb";

/// Beside a store opened with [`DurableStore::open_keyed`], the file that
/// says a store was made there (`pins.redb.made`): a start that finds the
/// store gone but this file present refuses ([`OpenError::Vanished`]).
pub const MADE_SUFFIX: &str = ".made";

/// The [`MADE_SUFFIX`] file of the store at `path`.
pub fn made_marker(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(MADE_SUFFIX);
    path.with_file_name(name)
}

/// How a `.made` marker names the store made there.
const MARKED_ID: &str = "store id: ";

/// The store id a `.made` marker names, if it names one (markers written
/// before stores had ids do not).
fn marked_store_id(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(MARKED_ID))
        .map(|id| id.trim().to_owned())
}

/// redb's page cache: writes touch a few pages each; reads come from memory.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// One queued change. The writer persists the record's current state in
/// memory (or deletes it if it is gone), so repeated changes coalesce.
#[derive(Debug)]
enum Change {
    Identity(IdentityId),
    Pin(PinKey),
    ExitDeath(ExitId, u64),
    /// The tracked-cookie patterns pins are keyed under from now on, as
    /// [`codec::TRACKED_COOKIES`] records them.
    Tracking(Box<str>),
    Compact,
    /// Nothing to write: numbered and committed like a change, so that
    /// waiting for it shows the writer and the disk answer (readiness).
    Barrier,
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
    /// Every change numbered up to this one is on disk. Not merely the
    /// highest committed: changes are numbered before memory changes and
    /// queued after, so they reach the writer out of order, and a change
    /// committed early must not vouch for an earlier one still on its way.
    seq: u64,
    /// Transactions committed so far (what a test waits on).
    commits: u64,
    failure: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    memory: MemoryStore,
    /// Records whose latest change is not on disk yet, with its sequence.
    /// (Keys are random, see `RandomKeys`: no second hash per lookup.)
    pending_pins: DashMap<PinKey, u64, RandomKeys>,
    pending_identities: DashMap<IdentityId, u64, RandomKeys>,
    /// Identities whose lazily written state changed.
    dirty: DashSet<IdentityId, RandomKeys>,
    /// [`Committed::seq`], for the writer to publish and a lookup to read
    /// without the watch channel's lock: while it has reached every number
    /// handed out, nothing is in flight and a lookup need not look for its
    /// records among the pending ones.
    durable_through: AtomicU64,
    /// Set once the writer stopped on a failed write ([`Committed::failure`]
    /// says why): read on every request by a Redis replica's journal
    /// check, without the watch channel's lock.
    failed: std::sync::atomic::AtomicBool,
    /// Makes every write fail (tests of what follows a failed write).
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicBool,
    /// Holds the writer before each write (tests of a disk that hangs).
    #[cfg(test)]
    stall_writes: std::sync::atomic::AtomicBool,
}

/// A change numbered (its record marked in flight) and not queued yet.
/// Queued when dropped unqueued: a number never queued would hold every
/// later one back from counting as durable (see [`Committed`]), so it is
/// queued whatever becomes of the request that took it (an error, a future
/// dropped mid-way). The writer writes the record's state in memory, which
/// is right whether or not the change was made.
struct Reserved<'a> {
    store: &'a DurableStore,
    seq: u64,
    change: Option<Change>,
}

impl Reserved<'_> {
    /// Queues the change; returns its number.
    fn send(mut self) -> Result<u64, StoreError> {
        match self.change.take() {
            Some(change) => self.store.send(self.seq, change),
            // Only `send` and `drop` take the change, and each runs once.
            None => Ok(self.seq),
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(change) = self.change.take() {
            // Fails only once the writer has stopped: nothing waits then.
            let _ = self.store.send(self.seq, change);
        }
    }
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
    /// How long a request waits for the disk to confirm a write it needs
    /// ([`CONFIRM_LIMIT`]).
    confirm_limit: Duration,
    /// The tracked-cookie patterns the file records (see
    /// [`DurableStore::tracking_on_record`]).
    tracking_on_record: Mutex<Option<Vec<String>>>,
}

/// How long a request waits for the disk to confirm the write of a pin or
/// identity it needs before it is refused (`Stalled`): a hung disk (a stuck
/// network mount, a dying drive) or a long compaction fails requests with
/// its reason instead of holding them until the clients give up.
const CONFIRM_LIMIT: Duration = Duration::from_secs(30);

/// The store file could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds it.
    #[error("the pin store {0} is in use by another pinproxy; stop it first")]
    InUse(PathBuf),
    /// The store records another pin key than the data directory's.
    #[error("the pin store {path} holds pins hashed with pin key {recorded}, but the data directory's pin-key is key {found}; a foreign key would make every stored cookie look new and send it through any exit: restore the pin-key file that belongs with this store (or move {path} and its .made file aside to start with no pins)")]
    ForeignPinKey {
        /// The store file.
        path: PathBuf,
        /// The key id it records.
        recorded: String,
        /// The key id of the key found.
        found: String,
    },
    /// The pin key is missing, and the store needs it.
    #[error("{key} is missing, but the pin store {path} holds {pins} pins and {identities} identities hashed with a pin key{}; a new key would make every stored cookie look new and send it through any exit: restore {key} from a backup of the data directory (or move {path} and its .made file aside to start with no pins)", recorded.as_deref().map(|id| format!(" (key {id})")).unwrap_or_default())]
    PinKeyMissing {
        /// The missing key file.
        key: PathBuf,
        /// The store file.
        path: PathBuf,
        /// The key id the store records.
        recorded: Option<String>,
        /// Pins the store holds.
        pins: usize,
        /// Identities the store holds.
        identities: usize,
    },
    /// The store is gone from where one was made.
    #[error("the pin store {path} is missing, but {marker} says one was made here: started empty, every cookie pinned before would look new and could leave through any exit; restore {path} from a backup (or delete {marker} to start with no pins)")]
    Vanished {
        /// The store file.
        path: PathBuf,
        /// The file saying a store was made there.
        marker: PathBuf,
    },
    /// The store's file is not the store made there: emptied, or another
    /// store put in its place.
    #[error("the pin store {path} is not the one {marker} says was made here ({why}): started on it, every cookie pinned before would look new and could leave through any exit; restore {path} from a backup (or delete {marker} to start on this file)")]
    Replaced {
        /// The store file.
        path: PathBuf,
        /// The file saying which store was made there.
        marker: PathBuf,
        /// How it differs.
        why: String,
    },
    /// The pin key file could not be read or created.
    #[error("pin key {key}: {source}")]
    PinKey {
        /// The key file.
        key: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// redb refused it.
    #[error("pin store {path}: {reason}")]
    Database {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What a store file says of the pin key its pins were hashed with, for
/// [`DurableStore::open_keyed`] to choose the key by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOnFile {
    /// The key id the store records (`PinHasher::key_id`); `None` for a
    /// new store, or one written before the id was recorded.
    pub key_id: Option<String>,
    /// Pins the store holds.
    pub pins: usize,
    /// Identities the store holds.
    pub identities: usize,
}

impl KeyOnFile {
    /// Whether another key would orphan something: the store holds
    /// records (an empty one takes whichever key it is opened with).
    pub fn needs_its_key(&self) -> bool {
        self.pins > 0 || self.identities > 0
    }
}

fn db_error(path: &Path, e: impl std::fmt::Display) -> OpenError {
    OpenError::Database {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

impl DurableStore {
    /// Whether identity `id` is held (from memory: no disk read).
    pub fn holds_identity(&self, id: IdentityId) -> bool {
        self.shared.memory.holds_identity(id)
    }

    /// The retirement of identity `id`, if it is held and retired (from
    /// memory: no disk read).
    pub fn retirement(&self, id: IdentityId) -> Option<Retirement> {
        self.shared.memory.retirement(id)
    }

    /// Opens (or creates) the store at `path` and loads it into memory,
    /// with no regard to the pin key (a journal, a test). Blocking: call it
    /// off the async runtime.
    pub fn open(path: &Path) -> Result<DurableStore, OpenError> {
        let (db, memory, fingerprint_refs) = DurableStore::load(path)?;
        DurableStore::start(path, db, memory, fingerprint_refs)
    }

    /// See [`MemoryStore::held_cookie_names`].
    pub fn held_cookie_names(&self) -> Vec<Arc<str>> {
        self.shared.memory.held_cookie_names()
    }

    /// Opens (or creates) the store at `path` bound to the pin key its pins
    /// are hashed with: `key` chooses the hasher from what the file says
    /// ([`KeyOnFile`]: loading the key file, or creating a key only where
    /// nothing needs the old one), and the store refuses a hasher whose key
    /// is not the one it records. A store without a record (new, or written
    /// before the key was recorded) records the hasher's. Blocking: call it
    /// off the async runtime.
    ///
    /// A store it makes is marked as made ([`made_marker`]); one marked but
    /// missing is refused rather than made anew (a file deleted or moved,
    /// a backup restored without it): started empty, every cookie pinned
    /// before would look new and could be founded on any exit.
    pub fn open_keyed(
        path: &Path,
        key: impl FnOnce(&KeyOnFile) -> Result<PinHasher, OpenError>,
    ) -> Result<(DurableStore, PinHasher), OpenError> {
        let marker = made_marker(path);
        let exists = |file: &Path| file.try_exists().map_err(|e| db_error(file, e));
        let marked = exists(&marker)?;
        let replaced = |why: String| OpenError::Replaced {
            path: path.to_owned(),
            marker: marker.clone(),
            why,
        };
        if marked && !exists(path)? {
            return Err(OpenError::Vanished {
                path: path.to_owned(),
                marker,
            });
        }
        // redb makes a new store in an empty file: a file truncated (or a
        // copy that failed before its first byte) would start with no pins.
        if marked
            && std::fs::metadata(path)
                .map_err(|e| db_error(path, e))?
                .len()
                == 0
        {
            return Err(replaced("the file is empty".into()));
        }
        let (db, memory, fingerprint_refs) = DurableStore::load(path)?;
        let store_id = codec::recorded_store_id(&db).map_err(|e| db_error(path, e))?;
        let made_as = if marked {
            let text = std::fs::read_to_string(&marker).map_err(|e| db_error(&marker, e))?;
            marked_store_id(&text)
        } else {
            None
        };
        match (made_as, store_id) {
            (Some(made), Some(found)) if made == found => {}
            (Some(made), found) => {
                return Err(replaced(format!(
                    "the store made here is {made}, this file is {}",
                    found.as_deref().unwrap_or("a store without an id")
                )))
            }
            // Not marked yet (new, or made before marks), or marked before
            // stores had ids: the store gets an id (recorded first: a crash
            // before the mark leaves a store without its mark, as before
            // marks, never a mark the store does not match), and the mark.
            (None, found) => {
                let id = match found {
                    Some(id) => id,
                    None => {
                        let id = format!("{:032x}", rand::random::<u128>());
                        codec::record_store_id(&db, &id).map_err(|e| db_error(path, e))?;
                        id
                    }
                };
                let text = format!(
                    "{} was made here: while this file exists, pinproxy refuses to start \
                     without it, or with another store in its place (restore it from a \
                     backup, or delete this file to start with no pins).\n{MARKED_ID}{id}\n",
                    path.display()
                );
                crate::fsutil::replace_private(&marker, text.as_bytes())
                    .map_err(|e| db_error(&marker, e))?;
            }
        }
        let (pins, identities) = memory.sizes();
        let on_file = KeyOnFile {
            key_id: codec::recorded_key_id(&db).map_err(|e| db_error(path, e))?,
            pins,
            identities,
        };
        let hasher = key(&on_file)?;
        let key_id = hasher.key_id();
        match on_file.key_id {
            Some(recorded) if recorded == key_id => {}
            Some(recorded) if on_file.needs_its_key() => {
                return Err(OpenError::ForeignPinKey {
                    path: path.to_owned(),
                    recorded,
                    found: key_id,
                })
            }
            // New, emptied, or written before the key was recorded.
            _ => codec::record_key_id(&db, &key_id).map_err(|e| db_error(path, e))?,
        }
        Ok((
            DurableStore::start(path, db, memory, fingerprint_refs)?,
            hasher,
        ))
    }

    /// Opens the file and loads its records.
    fn load(path: &Path) -> Result<(Database, MemoryStore, FingerprintRefs), OpenError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse(path.to_owned()),
                other => db_error(path, other),
            })?;
        let (memory, fingerprint_refs) = codec::load(&db, crate::clock::Clock::system().now_ms())
            .map_err(|e| db_error(path, e))?;
        Ok((db, memory, fingerprint_refs))
    }

    /// Starts the writer of a loaded store.
    fn start(
        path: &Path,
        db: Database,
        memory: MemoryStore,
        fingerprint_refs: FingerprintRefs,
    ) -> Result<DurableStore, OpenError> {
        let shared = Arc::new(Shared {
            memory,
            ..Shared::default()
        });
        let (pins, identities) = shared.memory.sizes();
        tracing::info!(path = %path.display(), pins, identities, "pin store loaded");
        let tracking_on_record = codec::recorded_tracking(&db).map_err(|e| db_error(path, e))?;

        let (queue, receiver) = mpsc::channel();
        let (committed_tx, committed) = watch::channel(Committed::default());
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("pin-store-writer".into())
            .spawn(move || {
                writer::write_loop(db, writer_shared, fingerprint_refs, receiver, committed_tx)
            })
            .map_err(|e| db_error(path, e))?;
        Ok(DurableStore {
            shared,
            queue,
            next_seq: AtomicU64::new(1),
            committed,
            writer: Mutex::new(Some(writer)),
            path: path.to_owned(),
            confirm_limit: CONFIRM_LIMIT,
            tracking_on_record: Mutex::new(tracking_on_record),
        })
    }

    /// The tracked-cookie patterns (`CookiePolicy::patterns`) the store's
    /// pins were keyed under, as last recorded; `None` for a store that
    /// never recorded any (new, or written before they were recorded).
    pub fn tracking_on_record(&self) -> Option<Vec<String>> {
        self.tracking_on_record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records `patterns` as those the store's pins are keyed under from
    /// now on, durably before it returns.
    pub async fn record_tracking(&self, patterns: &[Box<str>]) -> Result<(), StoreError> {
        let seq = self.enqueue(Change::Tracking(
            super::patterns_line(patterns).into_boxed_str(),
        ))?;
        self.durable(seq).await?;
        *self
            .tracking_on_record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(patterns.iter().map(|p| p.to_string()).collect());
        Ok(())
    }

    /// The latest time a record loaded at open was stamped with (see
    /// [`MemoryStore::newest_loaded_ms`]).
    pub fn newest_loaded_ms(&self) -> u64 {
        self.shared.memory.newest_loaded_ms()
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes a sequence number for a change and marks its record in flight,
    /// before memory changes, so no reader can see the new state and take
    /// it for durable. The change is queued by [`Reserved::send`], or when
    /// the reservation is dropped.
    fn reserve(&self, change: Change) -> Reserved<'_> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mark = |s: &mut u64| *s = (*s).max(seq);
        match &change {
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
            Change::ExitDeath(..)
            | Change::Tracking(_)
            | Change::Compact
            | Change::Barrier
            | Change::Close => {}
        }
        Reserved {
            store: self,
            seq,
            change: Some(change),
        }
    }

    /// Queues a reserved change for the writer.
    fn send(&self, seq: u64, change: Change) -> Result<u64, StoreError> {
        // Fails once the writer has stopped (closed, or a write failed).
        self.queue
            .send(Queued { seq, change })
            .map(|()| seq)
            .map_err(|_| match self.write_failure() {
                Some(failure) => StoreError::new(StoreErrorKind::WriteFailed, failure),
                None => StoreError::new(StoreErrorKind::Closed, "the embedded store is closed"),
            })
    }

    /// Why the writer stopped, if a write failed: it writes nothing more,
    /// so every change from then on (a new pin, a retirement) is refused
    /// until pinproxy restarts; what is on disk is still answered.
    pub fn write_failure(&self) -> Option<String> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return None;
        }
        self.committed.borrow().failure.clone()
    }

    /// Makes every later write fail, as a full disk would (tests of the
    /// stores built on this one).
    #[cfg(test)]
    pub(crate) fn fail_writes_for_tests(&self) {
        self.shared
            .fail_writes
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes the disk hang (`true`) or answer again, and bounds the wait
    /// for it at `confirm_limit` (tests of the stores built on this one).
    #[cfg(test)]
    pub(crate) fn stall_writes_for_tests(&mut self, stalled: bool, confirm_limit: Duration) {
        self.confirm_limit = confirm_limit;
        self.shared.stall_writes.store(stalled, Ordering::Relaxed);
    }

    fn enqueue(&self, change: Change) -> Result<u64, StoreError> {
        self.reserve(change).send()
    }

    /// Waits until everything up to `seq` is on disk (at most the confirm
    /// limit).
    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut committed = self.committed.clone();
        let waited = tokio::time::timeout(self.confirm_limit, async {
            committed
                .wait_for(|c| c.seq >= seq || c.failure.is_some())
                .await
                .map(|state| state.failure.clone())
        })
        .await;
        match waited {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(failure))) => Err(StoreError::new(StoreErrorKind::WriteFailed, failure)),
            Ok(Err(_)) => Err(StoreError::new(
                StoreErrorKind::Closed,
                "the embedded store's writer stopped",
            )),
            Err(_) => Err(StoreError::new(
                StoreErrorKind::Stalled,
                format!(
                    "the disk has not confirmed a write within {:?} ({})",
                    self.confirm_limit,
                    self.path.display()
                ),
            )),
        }
    }

    /// Whether the writer and the disk answer: a write of nothing, waited
    /// for like a pin's (readiness).
    pub async fn check_writes(&self) -> Result<(), StoreError> {
        let seq = self.enqueue(Change::Barrier)?;
        self.durable(seq).await
    }

    /// Waits until the records a lookup returned are on disk, if any is
    /// still in flight (rare: written moments ago by another request).
    async fn settle(
        &self,
        bindings: &[Option<Binding>],
        keys: &[PinKey],
    ) -> Result<(), StoreError> {
        // Nothing in flight, the usual case: every number handed out is on
        // disk. Read after the lookup, so this covers what it returned: a
        // change is numbered before memory changes (see `reserve`), and the
        // map's lock orders that memory change before our read of it.
        let issued = self.next_seq.load(Ordering::Acquire).saturating_sub(1);
        if issued <= self.shared.durable_through.load(Ordering::Acquire) {
            return Ok(());
        }
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

impl PinStore for DurableStore {
    async fn lookup_into(&self, keys: &[PinKey], found: &mut Bindings) -> Result<(), StoreError> {
        let start = found.len();
        self.shared.memory.lookup_into(keys, found).await?;
        self.settle(&found[start..], keys).await
    }

    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let reserved = self.reserve(Change::Identity(identity.id));
        let created = self.shared.memory.create_identity(identity).await;
        // Queued whatever memory said (see `Reserved`). Not awaited: an
        // identity is unreachable until a pin points to it, and that pin's
        // number is higher, so its wait covers this one.
        reserved.send()?;
        created
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
            let reserved = self.reserve(Change::Pin(*key));
            let pinned = self.shared.memory.pin_if_absent(*key, pin).await;
            // Whether this request won or lost the race, the commit writes
            // the pin now in memory: the one in force. (Queued even if
            // memory failed, see `Reserved`.)
            last_seq = reserved.send()?;
            bindings.push(pinned?);
        }
        // Pins found may still be on their way to disk; one wait covers
        // them and every pin queued above (durable up to a number means
        // durable up to it, see `Committed`).
        self.settle(&found, &keys).await?;
        if last_seq > 0 {
            self.durable(last_seq).await?;
        }
        Ok(bindings)
    }

    async fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) -> Result<(), StoreError> {
        // Queued for the next lazy write once, not on every request: the
        // set's insert takes a shard's write lock.
        if self
            .shared
            .memory
            .touch_unwritten(id, now_ms, requests, worked, egress)
        {
            self.shared.dirty.insert(id);
        }
        Ok(())
    }

    async fn extend_pin(
        &self,
        key: PinKey,
        pinned: &Pin,
        expires_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        let reserved = self.reserve(Change::Pin(key));
        let extended = self.shared.memory.extend_pin(key, pinned, expires_ms).await;
        let seq = reserved.send()?;
        extended?;
        // Durable before the answer that set it goes on: a pin that fell
        // back to its old expiry after a crash would refuse a cookie its
        // client holds (fail closed, but for nothing).
        self.durable(seq).await
    }

    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        let reserved = self.reserve(Change::Identity(id));
        let recorded = self.shared.memory.record_egress(id, ip).await;
        let seq = reserved.send()?;
        let recorded = recorded?;
        self.durable(seq).await?;
        Ok(recorded)
    }

    async fn read_identity(&self, id: IdentityId) -> Result<Option<Identity>, StoreError> {
        Ok(self.shared.memory.identity(id))
    }

    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        let reserved = self.reserve(Change::Identity(id));
        let retired = self.shared.memory.retire(id, retirement).await;
        let seq = reserved.send()?;
        retired?;
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
        expiry: &Expiry<'_>,
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

    /// Durable before it answers, as every routing decision is: a death
    /// forgotten in a crash would bring back the identities made before it.
    async fn record_exit_death(&self, exit: &ExitId, at_ms: u64) -> Result<(), StoreError> {
        self.shared.memory.set_exit_death(exit, at_ms);
        let seq = self.enqueue(Change::ExitDeath(exit.clone(), at_ms))?;
        self.durable(seq).await
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
    use crate::identity::RetireReason;
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

    /// What a request does between numbering its pin and queueing it.
    async fn pinned_in_memory(store: &DurableStore, key: PinKey, ident: &Identity) {
        store
            .shared
            .memory
            .pin_if_absent(key, &pin(ident))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let key = PinKey::from_bytes([3; 16]);
        let ident = identity(1000);
        {
            let store = DurableStore::open(&path).unwrap();
            assert_eq!(store.tracking_on_record(), None, "a new store");
            store
                .record_tracking(&["datadome".into(), "_px*".into()])
                .await
                .unwrap();
            store.create_identity(&ident).await.unwrap();
            store.pin_if_absent(key, &pin(&ident)).await.unwrap();
            store.touch(ident.id, 2000, 1, true, None).await.unwrap();
            store
                .record_exit_death(&ExitId::new("e2"), 1500)
                .await
                .unwrap();
            // An older death recorded later (an import of an older
            // export) changes nothing.
            store
                .record_exit_death(&ExitId::new("e2"), 1200)
                .await
                .unwrap();
            store
                .retire(
                    ident.id,
                    &Retirement {
                        reason: RetireReason::Evicted,
                        at_ms: 3000,
                    },
                )
                .await
                .unwrap();
            store.close().await;
        }
        let store = DurableStore::open(&path).unwrap();
        assert_eq!(
            store.tracking_on_record(),
            Some(vec!["datadome".to_owned(), "_px*".to_owned()])
        );
        let found = store.lookup(&[key]).await.unwrap();
        let binding = found[0].clone().unwrap();
        assert_eq!(binding.pin, pin(&ident));
        let loaded = binding.identity.unwrap();
        assert_eq!(loaded.last_used_ms, 2000);
        assert!(loaded.worked);
        assert_eq!(
            loaded.retired.as_ref().unwrap().reason,
            RetireReason::Evicted
        );
        assert_eq!(
            store.exit_deaths().await.unwrap(),
            vec![(ExitId::new("e2"), 1500)]
        );
    }

    /// After a failed write the writer stops: every change from then on is
    /// refused as a failed write (with the cause, never "shutting down"),
    /// the store reports itself unavailable (readiness), and what it holds
    /// on disk is still answered, since requests are not refused blindly.
    #[tokio::test]
    async fn a_failed_write_is_said_and_seen_by_readiness() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(&dir.path().join(STORE_FILE)).unwrap();
        let ident = identity(1000);
        let (kept, first, second) = (
            PinKey::from_bytes([1; 16]),
            PinKey::from_bytes([2; 16]),
            PinKey::from_bytes([3; 16]),
        );
        store.create_identity(&ident).await.unwrap();
        store.pin_if_absent(kept, &pin(&ident)).await.unwrap();
        let store = crate::store::Store::Durable(store);
        assert!(store.available());
        assert!(store.unavailable_because().is_none());

        let crate::store::Store::Durable(durable) = &store else {
            unreachable!()
        };
        durable.shared.fail_writes.store(true, Ordering::Relaxed);
        let stopped = || {
            durable
                .writer
                .lock()
                .unwrap()
                .as_ref()
                .is_none_or(|w| w.is_finished())
        };
        for key in [first, second] {
            let refused = store.pin_if_absent(key, &pin(&ident)).await.unwrap_err();
            assert_eq!(refused.kind, StoreErrorKind::WriteFailed, "{refused}");
            assert!(refused.to_string().contains("injected"), "{refused}");
            // The second is refused by a writer gone (bounded wait).
            for _ in 0..500 {
                if stopped() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(stopped());
        }
        assert!(!store.available());
        let why = store.unavailable_because().unwrap();
        assert!(why.contains("injected") && why.contains("restart"), "{why}");
        assert!(
            store.refusal().is_none(),
            "requests are not refused blindly"
        );
        let found = store.lookup(&[kept]).await.unwrap();
        assert_eq!(found[0].as_ref().map(|b| b.pin.identity), Some(ident.id));
        // An exit's death is refused as surely: answered stored, it could
        // be forgotten in a crash, and the identities made before it would
        // come back.
        let refused = store
            .record_exit_death(&ExitId::new("e1"), 30)
            .await
            .unwrap_err();
        assert_eq!(refused.kind, StoreErrorKind::WriteFailed, "{refused}");
    }

    /// A disk that hangs fails the requests waiting for it, with its
    /// reason, instead of holding them; readiness sees it; once the disk
    /// answers, what was written meanwhile is there.
    #[tokio::test]
    async fn a_hung_disk_is_said_and_seen_by_readiness() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DurableStore::open(&dir.path().join(STORE_FILE)).unwrap();
        store.confirm_limit = std::time::Duration::from_millis(300);
        let ident = identity(1000);
        let (kept, waited) = (PinKey::from_bytes([1; 16]), PinKey::from_bytes([2; 16]));
        store.create_identity(&ident).await.unwrap();
        store.pin_if_absent(kept, &pin(&ident)).await.unwrap();
        let store = crate::store::Store::Durable(store);
        store.answers().await.unwrap();

        let crate::store::Store::Durable(durable) = &store else {
            unreachable!()
        };
        durable.shared.stall_writes.store(true, Ordering::Relaxed);
        let refused = store.pin_if_absent(waited, &pin(&ident)).await.unwrap_err();
        assert_eq!(refused.kind, StoreErrorKind::Stalled, "{refused}");
        assert!(refused.to_string().contains("not confirmed"), "{refused}");
        // A lookup of the pin in flight waits for the disk too.
        let refused = store.lookup(&[waited]).await.unwrap_err();
        assert_eq!(refused.kind, StoreErrorKind::Stalled, "{refused}");
        assert_eq!(
            store.answers().await.unwrap_err().kind,
            StoreErrorKind::Stalled
        );

        durable.shared.stall_writes.store(false, Ordering::Relaxed);
        store.answers().await.unwrap();
        let found = store.lookup(&[kept, waited]).await.unwrap();
        assert!(found
            .iter()
            .all(|b| b.as_ref().map(|b| b.pin.identity) == Some(ident.id)));
    }

    /// A store made here and gone (deleted, moved, left out of a restored
    /// backup) is refused, not made anew empty (its cookies would look new
    /// and could be founded on any exit); with its mark deleted too, it is
    /// made anew.
    #[tokio::test]
    async fn a_store_gone_from_where_it_was_made_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let hasher = PinHasher::new([1; 32]);
        let open = || {
            let hasher = hasher.clone();
            DurableStore::open_keyed(&path, move |_| Ok(hasher))
        };
        let (store, _) = open().unwrap();
        store.create_identity(&identity(1000)).await.unwrap();
        store.close().await;
        let marker = made_marker(&path);
        assert_eq!(marker, dir.path().join("pins.redb.made"));
        assert!(marker.exists());

        // A store that was there before marks existed gets its mark.
        std::fs::remove_file(&marker).unwrap();
        open().unwrap().0.close().await;
        assert!(marker.exists());

        std::fs::remove_file(&path).unwrap();
        let refused = open().unwrap_err();
        assert!(matches!(refused, OpenError::Vanished { .. }), "{refused}");
        let said = refused.to_string();
        assert!(
            said.contains("pins.redb is missing") && said.contains("pins.redb.made"),
            "{said}"
        );
        assert!(!path.exists(), "nothing made in its place");

        std::fs::remove_file(&marker).unwrap();
        let (store, _) = open().unwrap();
        assert_eq!(store.shared.memory.sizes(), (0, 0));
        store.close().await;
    }

    /// A file emptied (a truncation, a copy that failed before its first
    /// byte) or swapped for another store is not the store made there:
    /// refused, as a missing one is. A mark written before stores had ids
    /// takes the store's id.
    #[tokio::test]
    async fn a_store_emptied_or_swapped_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let hasher = PinHasher::new([1; 32]);
        let open_at = |path: &Path| {
            let hasher = hasher.clone();
            DurableStore::open_keyed(path, move |_| Ok(hasher))
        };
        let (store, _) = open_at(&path).unwrap();
        store.create_identity(&identity(1000)).await.unwrap();
        store.close().await;
        let marker = made_marker(&path);
        let saved = std::fs::read(&path).unwrap();

        std::fs::File::create(&path).unwrap();
        let refused = open_at(&path).unwrap_err();
        assert!(
            matches!(&refused, OpenError::Replaced { why, .. } if why.contains("empty")),
            "{refused}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it was");

        let other_dir = tempfile::tempdir().unwrap();
        let other = other_dir.path().join(STORE_FILE);
        open_at(&other).unwrap().0.close().await;
        std::fs::copy(&other, &path).unwrap();
        let refused = open_at(&path).unwrap_err();
        assert!(matches!(refused, OpenError::Replaced { .. }), "{refused}");

        std::fs::write(&path, &saved).unwrap();
        let (store, _) = open_at(&path).unwrap();
        assert_eq!(store.shared.memory.sizes().1, 1, "its own store opens");
        store.close().await;

        // A mark from before store ids names none: the store's id is
        // written into it, and from then on only that store opens.
        let text = std::fs::read_to_string(&marker).unwrap();
        let id = marked_store_id(&text).unwrap();
        std::fs::write(&marker, "made before ids\n").unwrap();
        open_at(&path).unwrap().0.close().await;
        assert_eq!(
            marked_store_id(&std::fs::read_to_string(&marker).unwrap()),
            Some(id)
        );
    }

    /// A store records the pin key its pins are hashed with: written
    /// before the record existed, it takes the key it is opened with; with
    /// records, it refuses another; empty, it takes whichever it is given.
    #[tokio::test]
    async fn a_store_keeps_to_the_pin_key_of_its_pins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let (first, second) = (PinHasher::new([1; 32]), PinHasher::new([2; 32]));
        let keyed = |hasher: &PinHasher| {
            let hasher = hasher.clone();
            DurableStore::open_keyed(&path, move |_| Ok(hasher))
        };
        {
            // Written before the key was recorded.
            let store = DurableStore::open(&path).unwrap();
            let ident = identity(1000);
            store.create_identity(&ident).await.unwrap();
            store.close().await;
        }
        let mut seen = None;
        let (store, _) = DurableStore::open_keyed(&path, |on_file| {
            seen = Some(on_file.clone());
            Ok(first.clone())
        })
        .unwrap();
        assert_eq!(
            seen,
            Some(KeyOnFile {
                key_id: None,
                pins: 0,
                identities: 1
            })
        );
        store.close().await;
        let refused = keyed(&second).unwrap_err();
        assert!(
            matches!(&refused, OpenError::ForeignPinKey { recorded, found, .. }
                if *recorded == first.key_id() && *found == second.key_id()),
            "{refused}"
        );
        keyed(&first).unwrap().0.close().await;

        let emptied = dir.path().join("empty.redb");
        let open_empty = |hasher: &PinHasher| {
            let hasher = hasher.clone();
            DurableStore::open_keyed(&emptied, move |_| Ok(hasher))
        };
        open_empty(&first).unwrap().0.close().await;
        open_empty(&second).unwrap().0.close().await;
        let mut on_file = None;
        DurableStore::open_keyed(&emptied, |found| {
            on_file = Some(found.key_id.clone());
            Ok(second.clone())
        })
        .unwrap()
        .0
        .close()
        .await;
        assert_eq!(on_file, Some(Some(second.key_id())));
    }

    /// Rows of the fingerprints table (the store closed).
    fn stored_fingerprints(path: &Path) -> u64 {
        use redb::{ReadableDatabase as _, ReadableTableMetadata as _};
        let db = Database::open(path).unwrap();
        let read = db.begin_read().unwrap();
        read.open_table(codec::FINGERPRINTS).unwrap().len().unwrap()
    }

    fn with_agent(agent: &str) -> Identity {
        let fingerprint = Fingerprint::of_user_agent(agent);
        Identity::new(ExitId::new("e1"), SessionId(7), 10, fingerprint, 10)
    }

    async fn retire_and_sweep(store: &DurableStore, ids: &[IdentityId]) -> Swept {
        let evicted = Retirement {
            reason: RetireReason::Evicted,
            at_ms: 20,
        };
        for id in ids {
            store.retire(*id, &evicted).await.unwrap();
        }
        store.sweep(1_000, 100, &|_| None).await.unwrap()
    }

    #[tokio::test]
    async fn a_fingerprint_is_kept_while_an_identity_refers_to_it_and_no_longer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        // Two clients with equal fingerprints and one that differs.
        let (first, second, third) = (
            with_agent("agent/1"),
            with_agent("agent/1"),
            with_agent("agent/2"),
        );
        {
            let store = DurableStore::open(&path).unwrap();
            for identity in [&first, &second, &third] {
                store.create_identity(identity).await.unwrap();
                store.touch(identity.id, 50, 1, true, None).await.unwrap();
            }
            store.close().await;
        }
        assert_eq!(stored_fingerprints(&path), 2, "equal fingerprints: one row");

        // One of the two sharing a fingerprint goes: the row stays.
        {
            let store = DurableStore::open(&path).unwrap();
            assert_eq!(retire_and_sweep(&store, &[first.id]).await.identities, 1);
            store.close().await;
        }
        assert_eq!(stored_fingerprints(&path), 2);

        // The other goes too: its row goes with it, in memory and on disk.
        {
            let store = DurableStore::open(&path).unwrap();
            assert_eq!(store.shared.memory.distinct_fingerprints(), 2);
            assert_eq!(retire_and_sweep(&store, &[second.id]).await.identities, 1);
            assert_eq!(store.shared.memory.distinct_fingerprints(), 1);
            store.close().await;
        }
        assert_eq!(stored_fingerprints(&path), 1);
        let store = DurableStore::open(&path).unwrap();
        let loaded = store.shared.memory.identity(third.id).unwrap();
        assert_eq!(
            loaded.fingerprint, third.fingerprint,
            "the third's is whole"
        );
        drop(loaded);
        assert_eq!(retire_and_sweep(&store, &[third.id]).await.identities, 1);
        store.close().await;
        drop(store);
        assert_eq!(stored_fingerprints(&path), 0);

        // A row no identity refers to (left by a version that kept them
        // all) is deleted when the store opens.
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let (hash, bytes) = codec::fingerprint_hash(&third.fingerprint).unwrap();
            txn.open_table(codec::FINGERPRINTS)
                .unwrap()
                .insert(&hash, bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        assert_eq!(stored_fingerprints(&path), 1);
        DurableStore::open(&path).unwrap().close().await;
        assert_eq!(stored_fingerprints(&path), 0);
    }

    /// An identity whose fingerprint's row is missing from the file cannot
    /// be shown with the face it was founded with: it loads retired
    /// (`store-lost`), its cookies refused rather than sent with another
    /// face; one retired already keeps its reason, and the others are
    /// untouched.
    #[tokio::test]
    async fn an_identity_whose_fingerprint_is_missing_loads_retired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let (faceless, retired, whole) = (with_agent("a"), with_agent("a"), with_agent("b"));
        {
            let store = DurableStore::open(&path).unwrap();
            for ident in [&faceless, &retired, &whole] {
                store.create_identity(ident).await.unwrap();
            }
            let evicted = Retirement {
                reason: RetireReason::Evicted,
                at_ms: 20,
            };
            store.retire(retired.id, &evicted).await.unwrap();
            store.close().await;
        }
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let (hash, _) = codec::fingerprint_hash(&faceless.fingerprint).unwrap();
            {
                let mut table = txn.open_table(codec::FINGERPRINTS).unwrap();
                assert!(table.remove(&hash).unwrap().is_some());
            }
            txn.commit().unwrap();
        }
        let store = DurableStore::open(&path).unwrap();
        let reason = |id| {
            store
                .shared
                .memory
                .identity(id)
                .unwrap()
                .retired
                .map(|r| r.reason)
        };
        assert_eq!(reason(faceless.id), Some(RetireReason::StoreLost));
        assert_eq!(reason(retired.id), Some(RetireReason::Evicted));
        assert_eq!(reason(whole.id), None);
        // A new identity of the same client brings the row back (the
        // faceless ones still count as references to it), so it keeps its
        // face across the next start.
        let newcomer = with_agent("a");
        store.create_identity(&newcomer).await.unwrap();
        store.close().await;
        let store = DurableStore::open(&path).unwrap();
        let newcomer = store.shared.memory.identity(newcomer.id).unwrap();
        assert_eq!(newcomer.retired.map(|r| r.reason), None);
        assert_eq!(newcomer.fingerprint.get("user-agent"), Some("a"));
        store.close().await;
    }

    #[tokio::test]
    async fn a_touch_after_a_write_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let ident = identity(1000);
        {
            let store = DurableStore::open(&path).unwrap();
            store.create_identity(&ident).await.unwrap();
            store.touch(ident.id, 2000, 1, false, None).await.unwrap();
            store.touch(ident.id, 2500, 1, false, None).await.unwrap();
            // A durable change: its transaction writes the touched identity
            // too, which then counts as written.
            let seq = store
                .enqueue(Change::ExitDeath(ExitId::new("e2"), 1500))
                .unwrap();
            store.durable(seq).await.unwrap();
            assert!(store.shared.dirty.is_empty());
            // So this touch must queue it again.
            store.touch(ident.id, 3000, 1, true, None).await.unwrap();
            assert!(store.shared.dirty.contains(&ident.id));
            store.close().await;
        }
        let store = DurableStore::open(&path).unwrap();
        let loaded = store.shared.memory.identity(ident.id).unwrap();
        assert_eq!(
            (loaded.last_used_ms, loaded.requests, loaded.worked),
            (3000, 3, true)
        );
    }

    #[tokio::test]
    async fn a_change_committed_early_does_not_vouch_for_an_earlier_one_on_its_way() {
        use futures_util::FutureExt as _;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let ident = identity(1000);
        let (first, second) = (PinKey::from_bytes([1; 16]), PinKey::from_bytes([2; 16]));
        {
            let store = DurableStore::open(&path).unwrap();
            store.create_identity(&ident).await.unwrap();
            store
                .durable(store.next_seq.load(Ordering::Relaxed) - 1)
                .await
                .unwrap();
            let mut committed = store.committed.clone();
            let commits = committed.borrow().commits;

            // Two requests pin at once. The first numbers its change and
            // updates memory; the second does the same and queues its change
            // before the first queues its own.
            let early = store.reserve(Change::Pin(first));
            pinned_in_memory(&store, first, &ident).await;
            let late = store.reserve(Change::Pin(second));
            pinned_in_memory(&store, second, &ident).await;
            let early_seq = early.seq;
            let late_seq = late.send().unwrap();
            let through = committed
                .wait_for(|c| c.commits > commits)
                .await
                .unwrap()
                .seq;
            assert!(
                through < early_seq,
                "durable through {through} while change {early_seq} is still queued"
            );
            // Neither pin counts as durable yet: a lookup of either waits.
            assert!(store.lookup(&[second]).now_or_never().is_none());
            assert!(store.lookup(&[first]).now_or_never().is_none());

            early.send().unwrap();
            store.durable(late_seq).await.unwrap();
            assert!(store.lookup(&[first, second]).now_or_never().is_some());
            store.close().await;
        }
        let store = DurableStore::open(&path).unwrap();
        let found = store.lookup(&[first, second]).await.unwrap();
        assert!(found.iter().all(Option::is_some));
    }

    #[tokio::test]
    async fn a_numbered_change_is_queued_even_if_its_request_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(&dir.path().join(STORE_FILE)).unwrap();
        let ident = identity(1000);
        let key = PinKey::from_bytes([4; 16]);
        let reserved = store.reserve(Change::Pin(key));
        let seq = reserved.seq;
        pinned_in_memory(&store, key, &ident).await;
        // The request's future is dropped before it queues its change.
        drop(reserved);
        // A later change counts as durable once it is: the number dropped
        // does not hold it back. (The timeout turns a hang into a failure.)
        let later = store
            .reserve(Change::Pin(PinKey::from_bytes([5; 16])))
            .send()
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), store.durable(later))
            .await
            .expect("a dropped reservation held later changes back")
            .unwrap();
        assert!(store.committed.borrow().seq >= seq);
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
