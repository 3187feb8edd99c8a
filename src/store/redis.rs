//! The Redis pin store, for a fleet of replicas that must agree on every pin.
//!
//! Keys (all under the configured namespace `NS`; in a Redis Cluster `NS`
//! is written `{NS}`, a hash tag that puts every key in one slot, see
//! [`link`]):
//! - `NS:hash-key`: the pin-hashing key every replica uses (the first
//!   replica's key wins, `SET NX`), so the same cookie hashes alike everywhere;
//! - `NS:pin:HASH`: one pin; the value starts with the 16 hex digits of its
//!   identity, then the pin record. Written with `SET NX PX`, so pin-if-absent
//!   is atomic on the server and the first pin wins across replicas;
//! - `NS:id:IDENTITY`: a hash: `rec` (the identity as created), `last`,
//!   `reqs`, `worked`, `egress`, `retired` (the mutable parts);
//! - `NS:exit-deaths`: a hash of exit id → when it last died;
//! - `NS:epoch`, `NS:seq`: the namespace's generation (see [`generation`]);
//!   `NS:founding`, for a few seconds after an epoch was founded where there
//!   was none (see [`recovery`]).
//!
//! A lookup is one round trip (a script reads the pins and their identities),
//! and so is a request's set of new pins, together with the identity they
//! found when they are a new client's first (the `FOUND` script); a
//! replica answers pins it looked up moments ago from memory ([`cache`]).
//! Every key expires (`PX`): pins and identities after the longest identity
//! lifetime plus the time retired credentials are remembered; a retired
//! identity after the remembering time. The server must not evict keys early (`maxmemory-policy
//! noeviction`); pinproxy warns at start if it may. Retirement is shared by
//! the identity record, so a credential retired on one replica is not
//! pinned anew on another.
//!
//! When Redis cannot answer, commands fail within a second and the store is
//! marked unavailable until a background check succeeds again; the
//! pipeline then refuses requests (fail closed). With Sentinel
//! ([`link`]), the check also follows the primary through a failover.
//!
//! When Redis forgets (a wipe, a failover to a replica that missed writes),
//! every replica notices at its next round trip ([`generation`]), writes
//! back what its [`journal`] holds, and for `store.loss_quarantine` answers
//! a credential Redis does not know as retired (`store-lost`) instead of
//! pinning it anew ([`recovery`]).

pub mod generation;
pub mod journal;
pub mod link;
mod cache;
mod codec;
mod eviction;
mod recovery;
mod scripts;
mod server_clock;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use tokio_util::task::TaskTracker;

use super::{
    Binding, Bindings, Counts, Expiry, Founding, Listing, PinStore, StoreError, StoreErrorKind,
};
use crate::credential::{PinKey, RandomKeys};
use crate::identity::{ExitId, Identity, IdentityId, Pin, RetireReason, Retirement};
use crate::metrics::Metrics;
use cache::HitCache;
use codec::{
    bulk, corrupt, decode_binding, decode_identity, encode_address, encode_pin, generation_reply,
    parse_hex16, unexpected, GenerationReply,
};
use generation::{Generation, Loss, Observation, OwnWrites, Snapshot};
use journal::Journal;
use link::{Link, Target};

pub use recovery::LossReport;

/// How often the background check runs.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long the fleet's quarantine lasts after a pin-hashing key conflict:
/// until an operator ends it (ten years stands for that).
const KEY_CONFLICT_QUARANTINE_MS: u64 = 10 * 365 * 86_400_000;
/// How many keys a listing reads per pipelined round trip.
const LIST_BATCH: usize = 512;
/// How long a touch waits for more requests of its identity before it is
/// written: one write per busy identity per interval instead of one per
/// request. Last-use times lag by at most this much.
const TOUCH_COALESCE: Duration = Duration::from_millis(250);
/// How often, at most, the generation is saved to its file.
const SAVE_EVERY: u32 = 10;

/// What a script does with this replica's own write count (see
/// `generation`): nothing, reads it, or increments it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counting {
    None,
    Read,
    Write,
}

/// How long a new pin may wait for replicas to acknowledge it.
#[derive(Debug, Clone, Copy)]
pub struct WaitFor {
    /// Replicas that must acknowledge each new pin (Redis `WAIT`).
    pub replicas: u32,
    /// How long to wait for them before failing the request.
    pub timeout: Duration,
}

/// Everything the Redis store is set up with.
#[derive(Debug)]
pub struct RedisSettings {
    /// `redis://...`, `rediss://...` or `redis+sentinel://...`.
    pub url: String,
    /// Prefix of every key.
    pub namespace: String,
    /// Lifetime of pins and live identities, in ms.
    pub pin_ttl_ms: u64,
    /// How long retired identities are remembered, in ms.
    pub keep_retired_ms: u64,
    /// How long unknown credentials are treated as lost after a loss, in ms.
    pub quarantine_ms: u64,
    /// Replicas that must acknowledge each new pin, if any.
    pub wait: Option<WaitFor>,
    /// How long a pin hit may be answered from this replica's cache
    /// (zero: every lookup asks Redis); see [`cache`].
    pub hit_cache: Duration,
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    link: Link,
    namespace: String,
    /// What every key starts with: the namespace, hash-tagged in a cluster.
    prefix: String,
    /// Lifetime of pins and live identities, in ms.
    pin_ttl_ms: u64,
    /// How long retired identities are remembered, in ms.
    keep_retired_ms: u64,
    /// Writes sent off the request path (touches, restores), awaited at
    /// shutdown.
    tasks: TaskTracker,
    generation: Generation,
    /// The epoch in force, as text (only read when it must be replaced).
    epoch: Mutex<Option<String>>,
    /// This replica's journal (`None` for the command-line tools).
    journal: Option<Journal>,
    /// The fleet's pin-hashing key, once agreed (written back after a loss).
    hash_key: Mutex<Option<[u8; 32]>>,
    /// Set when, after a loss, Redis holds another pin-hashing key than the
    /// one this replica hashes with: what it says. Every command is refused
    /// from then on (see [`RedisStore::key_conflict`]). Set once, read by
    /// every request: no lock.
    key_conflict: OnceLock<String>,
    quarantine_ms: u64,
    wait: Option<WaitFor>,
    metrics: Arc<Metrics>,
    /// When the quarantine after a loss ends, of this replica's own and the
    /// fleet's (`NS:quarantine-until`) the later, on the monotonic clock
    /// ([`Clock::elapsed_ms`]; 0: none): a wall clock stepped forward does
    /// not end it. (The report says it as the wall clock reads it.)
    ///
    /// [`Clock::elapsed_ms`]: crate::clock::Clock::elapsed_ms
    quarantine_until_steady_ms: AtomicU64,
    /// Whether Redis's clock was last found apart from this one's (see
    /// `RedisStore::check_clock`).
    clock_apart: AtomicBool,
    /// A restore is running.
    recovering: AtomicBool,
    /// The losses this replica has noticed, and the fleet's quarantines it
    /// joined, since it opened (see [`RedisStore::losses_noticed`]).
    losses_noticed: AtomicU64,
    /// The hash of the epoch the running restore writes under, once it has
    /// taken one (0: no restore, or it has not reached its writes yet).
    restore_epoch: AtomicU64,
    /// A loss seen while a restore ran that the restore may not cover: it
    /// runs again when it ends (see [`RedisStore::on_loss`]).
    lost_again: Mutex<Option<(Loss, Option<String>)>>,
    /// The server's eviction count, as last read.
    evictions: eviction::EvictionWatch,
    /// Redis's clock as `INFO` shows it (see `server_clock`).
    clock_jumps: server_clock::JumpWatch,
    report: Mutex<Option<LossReport>>,
    /// Touches waiting to be written, per identity (see [`TOUCH_COALESCE`]).
    touches: dashmap::DashMap<IdentityId, PendingTouch, RandomKeys>,
    /// Pin hits answered without a round trip (`None`: disabled).
    cache: Option<HitCache>,
    /// Where retirements are published (`NS:retired`), for the caches.
    retired_channel: String,
    /// This process's own pin-write count (`NS:writer:ID`, see
    /// `generation`).
    writer_key: String,
    lookup: Script,
    pin_all_if_absent: Script,
    found: Script,
    retire: Script,
    exit_death: Script,
    check: Script,
    new_epoch: Script,
    quarantine: Script,
    write_identity: Script,
    touch: Script,
    record_egress: Script,
    extend_pin: Script,
}

/// The touches of one identity not yet written.
#[derive(Debug, Clone, Copy)]
struct PendingTouch {
    /// The latest use (Unix ms).
    last_ms: u64,
    /// Requests since the last write.
    requests: u64,
    /// Whether any of them worked (a 2xx).
    worked: bool,
    /// The egress address one of them revealed, to record unless one is.
    egress: Option<IpAddr>,
}

impl PendingTouch {
    fn add(&mut self, now_ms: u64, requests: u32, worked: bool, egress: Option<IpAddr>) {
        self.last_ms = self.last_ms.max(now_ms);
        self.requests = self.requests.saturating_add(u64::from(requests));
        self.worked |= worked;
        self.egress = self.egress.or(egress);
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.inner.namespace)
            .field("link", &self.inner.link)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects lazily (the daemon starts even while Redis is down, and
    /// refuses requests until it answers). `journal` and the generation
    /// file (`generation_file`) are this replica's; the command-line tools
    /// pass neither. Writes sent off the request path run on `tasks`.
    pub fn connect(
        settings: RedisSettings,
        journal: Option<Journal>,
        generation_file: Option<&std::path::Path>,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Result<RedisStore, StoreError> {
        let prefix = key_prefix(&settings.url, &settings.namespace);
        let link = Link::new(
            Target::parse(&settings.url, &format!("{prefix}:epoch"))?,
            settings.wait.map(|w| w.timeout),
        )?;
        let cache = (!settings.hit_cache.is_zero())
            .then(|| HitCache::new(settings.hit_cache, settings.pin_ttl_ms));
        let generation =
            Generation::load(generation_file, &settings.namespace, settings.pin_ttl_ms)
                .map_err(codec::corrupt)?;
        let store = RedisStore {
            inner: Arc::new(Inner {
                cache,
                retired_channel: format!("{prefix}:retired"),
                writer_key: format!("{prefix}:writer:{:016x}", generation.writer_id()),
                link,
                generation,
                namespace: settings.namespace,
                prefix,
                pin_ttl_ms: settings.pin_ttl_ms,
                keep_retired_ms: settings.keep_retired_ms,
                tasks,
                epoch: Mutex::new(None),
                journal,
                hash_key: Mutex::new(None),
                key_conflict: OnceLock::new(),
                quarantine_ms: settings.quarantine_ms,
                wait: settings.wait,
                metrics,
                quarantine_until_steady_ms: AtomicU64::new(0),
                clock_apart: AtomicBool::new(false),
                recovering: AtomicBool::new(false),
                losses_noticed: AtomicU64::new(0),
                restore_epoch: AtomicU64::new(0),
                lost_again: Mutex::new(None),
                evictions: eviction::EvictionWatch::default(),
                clock_jumps: server_clock::JumpWatch::default(),
                report: Mutex::new(None),
                touches: dashmap::DashMap::default(),
                lookup: Script::new(scripts::LOOKUP),
                pin_all_if_absent: Script::new(scripts::PIN_ALL_IF_ABSENT),
                found: Script::new(scripts::FOUND),
                retire: Script::new(scripts::RETIRE),
                exit_death: Script::new(scripts::EXIT_DEATH),
                check: Script::new(scripts::GENERATION),
                new_epoch: Script::new(scripts::NEW_EPOCH),
                quarantine: Script::new(scripts::QUARANTINE),
                write_identity: Script::new(scripts::WRITE_IDENTITY),
                touch: Script::new(scripts::TOUCH),
                record_egress: Script::new(scripts::RECORD_EGRESS),
                extend_pin: Script::new(scripts::EXTEND_PIN),
            }),
        };
        tokio::spawn(check_loop(Arc::downgrade(&store.inner)));
        if store.inner.cache.is_some() {
            tokio::spawn(cache::keep_subscribed(Arc::downgrade(&store.inner)));
        }
        Ok(store)
    }

    /// Whether the last command (or check) succeeded, and the replica may
    /// use the store at all (no [`RedisStore::key_conflict`]).
    pub fn is_available(&self) -> bool {
        self.inner.link.is_available() && self.key_conflict().is_none()
    }

    /// The cookie names of the pins this replica's journal holds (those it
    /// made or read; `None` without a journal): Redis itself is not
    /// walked, since it holds the whole fleet's pins and lists none of
    /// them cheaply.
    pub fn held_cookie_names(&self) -> Option<Vec<Arc<str>>> {
        self.inner.journal.as_ref().map(Journal::held_cookie_names)
    }

    /// The tracked-cookie patterns this replica's journal records its pins
    /// were keyed under.
    pub fn tracking_on_record(&self) -> Option<Vec<String>> {
        self.inner
            .journal
            .as_ref()
            .and_then(Journal::tracking_on_record)
    }

    /// Records in this replica's journal (if it keeps one) the
    /// tracked-cookie patterns it keys pins under from now on.
    pub async fn record_tracking(&self, patterns: &[Box<str>]) -> Result<(), StoreError> {
        match &self.inner.journal {
            Some(journal) => journal.record_tracking(patterns).await,
            None => Ok(()),
        }
    }

    /// Why this replica's journal records nothing more, if a write of it
    /// failed: the replica then refuses what needs the store (see
    /// `journal`).
    pub fn journal_failure(&self) -> Option<String> {
        self.inner.journal.as_ref().and_then(Journal::write_failure)
    }

    /// Whether this replica's journal (if it keeps one) takes writes now:
    /// a disk that hangs fails it (readiness).
    pub async fn journal_answers(&self) -> Result<(), StoreError> {
        match &self.inner.journal {
            Some(journal) => journal.check_writes().await,
            None => Ok(()),
        }
    }

    /// Why this replica refuses every command, if it does: after a loss,
    /// Redis came to hold another pin-hashing key than the one this replica
    /// hashes cookies with. The two keys give one cookie two pin keys, so
    /// this replica and the replicas hashing with the other key could each
    /// pin it to its own exit; refusing is the only safe answer until an
    /// operator puts the fleet's key back and restarts.
    pub fn key_conflict(&self) -> Option<&str> {
        self.inner.key_conflict.get().map(String::as_str)
    }

    /// The connection for a command, unless the replica refuses them all.
    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.refuse_on_key_conflict()?;
        self.inner.link.connection()
    }

    fn refuse_on_key_conflict(&self) -> Result<(), StoreError> {
        match self.key_conflict() {
            Some(conflict) => Err(StoreError::new(StoreErrorKind::KeyConflict, conflict)),
            None => Ok(()),
        }
    }

    fn note<T>(&self, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        self.inner.link.note(result)
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.inner.prefix)
    }

    fn identity_key(&self, id: IdentityId) -> String {
        self.key("id", &id.to_string())
    }

    fn pin_key(&self, key: &PinKey) -> String {
        self.key("pin", &key.to_hex())
    }

    fn identity_prefix(&self) -> String {
        format!("{}:id:", self.inner.prefix)
    }

    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.inner.prefix)
    }

    fn seq_key(&self) -> String {
        format!("{}:seq", self.inner.prefix)
    }

    /// Runs a generation-reporting script (see `scripts`) and checks the
    /// generation it reports; returns the script's own result, which is
    /// not used when the reply shows a loss (see [`RedisStore::settle`]).
    async fn run_script(
        &self,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
        counting: Counting,
    ) -> Result<Value, StoreError> {
        let (result, loss) = self.invoke_script(script, keys, args, counting).await?;
        match loss {
            None => Ok(result),
            Some(loss) => Err(lost_in_reply(&loss)),
        }
    }

    /// Checks the namespace's generation (at start and in the background):
    /// a loss it shows starts the recovery, and is no failure of the check.
    async fn check_generation(&self) -> Result<(), StoreError> {
        self.invoke_script(&self.inner.check, &[], &[], Counting::Read)
            .await
            .map(drop)
    }

    /// [`RedisStore::run_script`], answering the loss the reply showed
    /// beside the result instead of failing on it.
    async fn invoke_script(
        &self,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
        counting: Counting,
    ) -> Result<(Value, Option<Loss>), StoreError> {
        let mut invocation = script.prepare_invoke();
        invocation.key(self.epoch_key()).key(self.seq_key());
        for key in keys {
            invocation.key(key);
        }
        if counting != Counting::None {
            invocation.key(&self.inner.writer_key);
        }
        for arg in args {
            invocation.arg(arg.as_slice());
        }
        let mut connection = self.connection()?;
        let sent = self.inner.generation.snapshot();
        let recovering = self.inner.recovering.load(Ordering::Acquire);
        let reply: Value = self.note(invocation.invoke_async(&mut connection).await)?;
        let reply = generation_reply(reply)?;
        let loss = self.settle(sent, &reply, counting).filter(|_| !recovering);
        Ok((reply.result, loss))
    }

    /// Checks a script's reply for a loss (see `generation`), starting the
    /// recovery on one. A reply to a command sent before this replica's
    /// recovery began that shows a loss is not used for routing, whatever
    /// it says: a lookup in it may miss a lost pin, and a pin it wrote may
    /// be a lost one founded anew (which the restore finds in conflict).
    /// Commands sent once the recovery began are answered under its
    /// quarantine (a credential Redis does not know is not pinned anew),
    /// and the recovery's own writes are among them.
    fn settle(&self, sent: Snapshot, reply: &GenerationReply, counting: Counting) -> Option<Loss> {
        let epoch = reply.epoch.as_deref();
        let lost = self.observe(sent, epoch, reply.seq);
        let lost_own = self.observe_own(sent, epoch, reply.writes, counting);
        lost.or(lost_own)
    }

    /// Checks this replica's own write count in a reply (see `generation`):
    /// fewer than it had been answered for starts a recovery.
    fn observe_own(
        &self,
        sent: Snapshot,
        epoch: Option<&str>,
        writes: Option<u64>,
        counting: Counting,
    ) -> Option<Loss> {
        let own = match (counting, writes) {
            (Counting::Read, Some(count)) => OwnWrites::Read(count),
            (Counting::Write, Some(count)) => OwnWrites::Written(count),
            _ => return None,
        };
        match self
            .inner
            .generation
            .observe_own(sent, own, recovery::now_ms())
        {
            Observation::Lost(loss) => {
                self.on_loss(loss.clone(), epoch.map(str::to_owned), Some(sent.epoch()));
                Some(loss)
            }
            _ => None,
        }
    }

    /// Checks a reply's generation against what had been seen when its
    /// command left (`sent`): a loss starts a recovery.
    fn observe(&self, sent: Snapshot, epoch: Option<&str>, seq: u64) -> Option<Loss> {
        match self.inner.generation.observe(sent, epoch, seq) {
            Observation::Consistent => {
                if let Some(epoch) = epoch {
                    let mut known = self.inner.epoch.lock().unwrap_or_else(|e| e.into_inner());
                    if known.as_deref() != Some(epoch) {
                        *known = Some(epoch.to_owned());
                    }
                }
            }
            // A namespace nobody has used: its epoch is written at start.
            Observation::Fresh => {}
            Observation::Lost(loss) => {
                self.on_loss(loss.clone(), epoch.map(str::to_owned), Some(sent.epoch()));
                return Some(loss);
            }
        }
        None
    }

    /// The fleet's pin-hashing key, which a replica hashes cookies with
    /// from its start: `local` unless another replica set one first.
    /// `Offer::Kept` is the fleet's key as a replica kept it (offered back
    /// after a wipe); `Offer::New` is a key of the caller's own, which
    /// becomes the fleet's only on a namespace no pin was ever written to
    /// (see [`RedisStore::found_hash_key`]).
    pub async fn shared_hash_key(
        &self,
        local: [u8; 32],
        offer: KeyOffer,
    ) -> Result<[u8; 32], StoreError> {
        let shared = match offer {
            KeyOffer::Kept => self.set_hash_key_unless_set(local).await?,
            KeyOffer::New => self.found_hash_key(local).await?,
        };
        *self
            .inner
            .hash_key
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(shared);
        Ok(shared)
    }

    /// The fleet's pin-hashing key if one is set; sets none. For the
    /// command-line tools: a tool run on a store that has just lost its data
    /// must not make its own key the fleet's, which the running replicas
    /// would not hash with.
    pub async fn existing_hash_key(&self) -> Result<Option<[u8; 32]>, StoreError> {
        let key = self.hash_key_key();
        let mut connection = self.connection()?;
        let stored: Option<Vec<u8>> = self.note(connection.get(&key).await)?;
        stored.map(|bytes| hash_key_of(&key, &bytes)).transpose()
    }

    /// After a loss: writes back the key this replica hashes with
    /// (`in_use`), unless another was set first; if another was, every
    /// command is refused from now on ([`RedisStore::key_conflict`]).
    pub(super) async fn reassert_hash_key(&self, in_use: [u8; 32]) -> Result<(), StoreError> {
        let shared = self.set_hash_key_unless_set(in_use).await?;
        if shared == in_use {
            return Ok(());
        }
        let conflict = format!(
            "Redis holds pin-hashing key {} but this replica hashes cookies with {}: it was set \
             after Redis lost its data, by a replica started without the fleet's key or by a \
             `pinproxy store` command. With two keys one cookie could be pinned to two exits, \
             so this replica refuses every request until restarted, and the fleet stays in \
             quarantine (credentials Redis does not know are answered as lost) until an \
             operator acts. Put key {} back into `{}` (it is the `fleet-pin-key` file in this \
             replica's data directory), delete `{}`, then restart every replica",
            key_id(&shared),
            key_id(&in_use),
            key_id(&in_use),
            self.hash_key_key(),
            self.quarantine_key(),
        );
        tracing::error!("{conflict}");
        // The replicas hashing with the other key cannot find what this
        // replica's journal holds (its restore stops here): once their
        // quarantine ended they would pin those cookies anew, on exits
        // chosen then. The fleet's quarantine lasts until an operator
        // ends it (before this replica refuses every command).
        if let Err(e) = self.share_quarantine(KEY_CONFLICT_QUARANTINE_MS).await {
            tracing::error!(error = %e, "could not write the fleet's quarantine after the key conflict");
        }
        let conflict = self.inner.key_conflict.get_or_init(|| conflict);
        Err(StoreError::new(
            StoreErrorKind::KeyConflict,
            conflict.as_str(),
        ))
    }

    /// `local` as the fleet's key where none is set and no pin was ever
    /// written; returns the key in force. A namespace holding pins but no
    /// key (the key was deleted, or pins were imported by a tool that did
    /// not set it) is refused: hashing with a new key would miss every pin
    /// and let each cookie be pinned anew, on any exit.
    async fn found_hash_key(&self, local: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let key = self.hash_key_key();
        let mut connection = self.connection()?;
        let held: Option<Vec<u8>> = self.note(
            Script::new(scripts::FOUND_HASH_KEY)
                .key(&key)
                .key(self.seq_key())
                .arg(&local[..])
                .invoke_async(&mut connection)
                .await,
        )?;
        match held {
            Some(bytes) => hash_key_of(&key, &bytes),
            None => Err(StoreError::new(
                StoreErrorKind::KeyConflict,
                format!(
                    "Redis holds pins under `{}` but no pin-hashing key (`{key}`): it was \
                     deleted, or the pins were imported by a tool that did not set it. A new \
                     key would miss every pin and let each cookie be pinned anew on any exit. \
                     Put back the key the pins were made with: copy it (the `fleet-pin-key` \
                     in a replica's data directory, or the `pin-key` of the data directory an \
                     export came from) into this data directory as `fleet-pin-key`, mode \
                     0600, and start again",
                    self.inner.prefix
                ),
            )),
        }
    }

    /// For `pinproxy store import`: makes `local`, the key the export's
    /// pins were checked against, the namespace's key where none is set
    /// (else the first replica to start would set its own, and every
    /// imported pin would be missed); refused if another key is in force.
    pub async fn claim_hash_key(&self, local: [u8; 32]) -> Result<(), StoreError> {
        let held = self.found_hash_key(local).await?;
        if held == local {
            return Ok(());
        }
        Err(StoreError::new(
            StoreErrorKind::KeyConflict,
            format!(
                "Redis now holds pin-hashing key {} and the export was checked against {}: \
                 another replica or tool set it meanwhile; run the import again",
                key_id(&held),
                key_id(&local)
            ),
        ))
    }

    /// `SET NX` of `local` as the fleet's key; returns the key in force.
    async fn set_hash_key_unless_set(&self, local: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let key = self.hash_key_key();
        let mut connection = self.connection()?;
        let _: Option<String> = self.note(
            redis::cmd("SET")
                .arg(&key)
                .arg(&local[..])
                .arg("NX")
                .query_async(&mut connection)
                .await,
        )?;
        let stored: Vec<u8> = self.note(connection.get(&key).await)?;
        hash_key_of(&key, &stored)
    }

    fn hash_key_key(&self) -> String {
        format!("{}:hash-key", self.inner.prefix)
    }

    /// `NS:tracked-cookies`: the tracked-cookie patterns a replica of the
    /// fleet last put in force (see [`RedisStore::fleet_tracking`]).
    fn fleet_tracking_key(&self) -> String {
        format!("{}:tracked-cookies", self.inner.prefix)
    }

    /// The tracked-cookie patterns (`CookiePolicy::patterns`) a replica of
    /// the fleet last put in force, at its start or a reload; `None` where
    /// none has yet. Redis cannot list the names of the fleet's pins, so a
    /// replica judges a change of its own against these.
    pub async fn fleet_tracking(&self) -> Result<Option<Vec<String>>, StoreError> {
        let key = self.fleet_tracking_key();
        let mut connection = self.connection()?;
        let line: Option<String> = self.note(connection.get(&key).await)?;
        Ok(line.as_deref().map(super::patterns_of_line))
    }

    /// Whether pins were written in the namespace since its history began
    /// (its write sequence moved).
    pub async fn wrote_pins(&self) -> Result<bool, StoreError> {
        let key = self.seq_key();
        let mut connection = self.connection()?;
        let seq: Option<u64> = self.note(connection.get(&key).await)?;
        Ok(seq.unwrap_or(0) > 0)
    }

    /// After a loss: `patterns`, this replica's, as the fleet's tracked
    /// cookies unless another replica's restore put its own back first
    /// (best effort: the pins matter more, and are restored whatever this
    /// says).
    pub(super) async fn restore_fleet_tracking(&self, patterns: &[String]) {
        let key = self.fleet_tracking_key();
        let restored = async {
            let mut connection = self.connection()?;
            self.note(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(super::patterns_line(patterns))
                    .arg("NX")
                    .query_async::<Option<String>>(&mut connection)
                    .await,
            )
        };
        if let Err(e) = restored.await {
            tracing::warn!(error = %e, "could not put the fleet's tracked cookies back after the loss");
        }
    }

    /// Records `patterns` as those the fleet's pins are keyed under from
    /// now on (see [`RedisStore::fleet_tracking`]), provided the record is
    /// still `judged` (`None`: absent), the one a change was judged
    /// against; else writes nothing and answers the record now, for the
    /// change to be judged again (two replicas that judged one record at
    /// once must not both go through).
    pub async fn record_fleet_tracking(
        &self,
        judged: Option<&[String]>,
        patterns: &[Box<str>],
    ) -> Result<Option<Vec<String>>, StoreError> {
        let key = self.fleet_tracking_key();
        let mut connection = self.connection()?;
        let now: Option<String> = self.note(
            Script::new(scripts::SET_IF_STILL)
                .key(&key)
                .arg(judged.map(super::patterns_line).unwrap_or_default())
                .arg(super::patterns_line(patterns))
                .invoke_async(&mut connection)
                .await,
        )?;
        Ok(now.as_deref().map(super::patterns_of_line))
    }

    /// `NS:quarantine-until`: the fleet's quarantine after a loss (see
    /// `recovery`).
    fn quarantine_key(&self) -> String {
        format!("{}:quarantine-until", self.inner.prefix)
    }

    /// Finds the primary (with Sentinel) and checks the namespace's
    /// generation: a new namespace gets its epoch; one that forgot what
    /// this replica saw before starts a recovery.
    pub async fn start(&self) -> Result<(), StoreError> {
        // Asked before the check, which adopts the generation it finds
        // (and may start a restore of its own, which sets the mark).
        let had_history = self.inner.generation.knows_history();
        let restore_was_pending = self.inner.generation.restore_pending();
        self.inner.link.find_primary().await?;
        self.check_generation().await?;
        if !had_history {
            // Founds the generation if Redis holds none.
            self.replace_epoch(None).await?;
            self.wait_out_founding().await?;
        }
        // A restore this replica did not live to finish: the history it
        // saved looks whole, but the journal is not all written back.
        if restore_was_pending && !self.inner.recovering.load(Ordering::Acquire) {
            self.on_loss(Loss::RestoreUnfinished, None, None);
        }
        // A replica that starts (or restarts) while the fleet is still in
        // quarantine after a loss has not seen the loss itself, and must
        // not pin anew what another replica lost.
        self.join_quarantine().await
    }

    /// Checks the server once it answers: refuses a Redis older than
    /// [`eviction::MIN_VERSION`] (the scripts need it, and an older one would fail
    /// only when a loss is being restored, the worst time), warns when it
    /// may evict pinproxy's keys before they expire, and takes the baseline
    /// of its eviction count (see `eviction`).
    pub async fn check_server(&self) -> Result<(), StoreError> {
        let mut connection = self.connection()?;
        let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut connection)
            .await;
        if let Ok(pair) = policy {
            if let Some(policy) = pair.get(1).filter(|p| p.as_str() != "noeviction") {
                tracing::warn!(
                    %policy,
                    "Redis may evict pins under memory pressure; every eviction is then taken as a \
                     loss (restore and quarantine). Set maxmemory-policy noeviction (or give Redis room)."
                );
            }
        }
        let min_replicas: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("min-replicas-to-write")
            .query_async(&mut connection)
            .await;
        let min_replicas = min_replicas
            .ok()
            .and_then(|pair| pair.get(1)?.parse::<u64>().ok());
        // The baselines of the eviction count and the clock, and whether
        // they can be read.
        let (info, clocks) = read_info(&mut connection).await;
        let replicas = info
            .as_deref()
            .ok()
            .and_then(|info| info_field(info, "connected_slaves"));
        if self.inner.wait.is_none()
            && split_brain_possible(self.inner.link.fails_over(), replicas, min_replicas)
        {
            tracing::warn!(
                "Redis can fail over here, and no new pin waits for a Redis replica \
                 (store.wait_replicas = 0): a network partition that leaves the old primary \
                 taking writes lets replicas of pinproxy on either side pin one new cookie to \
                 two exits until it heals (the loss is seen then). store.wait_replicas = 1, or \
                 min-replicas-to-write 1 on the primary, narrows that to a primary cut off \
                 with a replica of its own (or, for min-replicas-to-write, to \
                 min-replicas-max-lag)"
            );
        }
        match info {
            Ok(info) => {
                if let Some(reading) = clocks.of(&info) {
                    if let Some(by_ms) = self.inner.clock_jumps.observe(reading) {
                        self.on_clock_jump(by_ms);
                    }
                }
                if !self.inner.evictions.baseline(&info) {
                    tracing::warn!(
                        "Redis's INFO names no run_id or evicted_keys: pins it evicts under \
                         memory pressure would go unnoticed (set maxmemory-policy noeviction)"
                    );
                }
                eviction::check_version(&info)?;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read Redis's INFO: pins it evicts under memory pressure would go unnoticed, \
                 and its version is not checked (grant the user +info, and set \
                 maxmemory-policy noeviction)"
            ),
        }
        Ok(())
    }

    /// Reads the server's eviction count (see `eviction`) and its clock
    /// (see `server_clock`): keys evicted since the last reading are a
    /// loss, and so is a jump of its clock that may have expired pins of
    /// live identities. An `INFO` the server refuses is only logged (at
    /// debug: a user without the right is warned of at start, by
    /// [`RedisStore::check_server`]).
    async fn check_info(&self) {
        let Ok(mut connection) = self.connection() else {
            return;
        };
        let (info, clocks) = read_info(&mut connection).await;
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read Redis's eviction count");
                return;
            }
        };
        if let Some(keys) = self.inner.evictions.observe(&info) {
            self.on_loss(Loss::Evicted { keys }, None, None);
        }
        if let Some(reading) = clocks.of(&info) {
            if let Some(by_ms) = self.inner.clock_jumps.observe(reading) {
                self.on_clock_jump(by_ms);
            }
        }
    }

    /// Redis's clock jumped `by_ms` forward: every key with less time to
    /// live than that expired at once. Pins outlive their identities by
    /// `identities.remember_retired`, so a jump past half of that (a margin
    /// for replicas configured otherwise) may have taken pins of live
    /// identities, and is a loss; a shorter one is said.
    fn on_clock_jump(&self, by_ms: u64) {
        if by_ms > self.inner.keep_retired_ms / 2 {
            self.on_loss(Loss::ClockJumped { by_ms }, None, None);
            return;
        }
        tracing::warn!(
            jumped_ms = by_ms,
            "Redis's clock jumped ahead: keys it holds expired that much early (retired \
             credentials are remembered that much less); synchronise its clock (NTP)"
        );
    }

    /// Saves what this replica has seen of the namespace's history (`now`:
    /// even if it has not changed), off the runtime's threads: the file is
    /// written and synced.
    async fn save_generation(&self, now: bool) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.generation.save(now)).await;
    }

    /// Flushes and closes the journal.
    pub async fn close(&self) {
        self.save_generation(true).await;
        if let Some(journal) = &self.inner.journal {
            journal.close().await;
        }
    }

    /// Runs a pin-writing script followed by `WAIT`, in one pipeline on
    /// the acknowledged-writes connection, so that `WAIT` counts this very
    /// write; answers its result, and beside it the error to fail closed
    /// with when fewer than `wait.replicas` replicas acknowledged it in
    /// time. The pins stay written: a retry finds them.
    async fn run_acknowledged(
        &self,
        wait: WaitFor,
        mut connection: ConnectionManager,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<(Value, Option<StoreError>), StoreError> {
        let millis = u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX);
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha
            .arg(script.get_hash())
            .arg(keys.len() + 3)
            .arg(self.epoch_key())
            .arg(self.seq_key())
            .arg(keys)
            .arg(&self.inner.writer_key);
        for arg in args {
            evalsha.arg(arg.as_slice());
        }
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha)
            .add_command(redis::cmd("WAIT").arg(wait.replicas).arg(millis).clone());
        let sent = self.inner.generation.snapshot();
        let recovering = self.inner.recovering.load(Ordering::Acquire);
        let mut outcome: redis::RedisResult<(Value, u64)> = pipe.query_async(&mut connection).await;
        if matches!(&outcome, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            self.note(script.load_async(&mut connection).await)?;
            outcome = pipe.query_async(&mut connection).await;
        }
        let (reply, acked) = self.note(outcome)?;
        let reply = generation_reply(reply)?;
        if let Some(loss) = self
            .settle(sent, &reply, Counting::Write)
            .filter(|_| !recovering)
        {
            return Err(lost_in_reply(&loss));
        }
        let result = reply.result;
        if acked < u64::from(wait.replicas) {
            self.inner.metrics.store_wait_timeouts.inc();
            let short = StoreError::new(
                StoreErrorKind::Unreachable,
                format!(
                    "only {acked} of {} Redis replicas acknowledged the write within {:?}; \
                     refusing what depends on it rather than risk losing it in a failover \
                     (store.wait_replicas)",
                    wait.replicas, wait.timeout
                ),
            );
            return Ok((result, Some(short)));
        }
        Ok((result, None))
    }

    /// Decodes a pin script's rows.
    fn decode_rows(rows: &Value) -> Result<Vec<Option<Binding>>, StoreError> {
        let Value::Array(rows) = rows else {
            return Err(unexpected("unexpected lookup reply"));
        };
        rows.iter()
            .map(|row| match row {
                Value::Array(parts) => {
                    let (pin, fields) = match parts.as_slice() {
                        [pin, fields] | [_, pin, fields] => (pin, fields),
                        _ => return Err(unexpected("unexpected pin row")),
                    };
                    let pin = bulk(pin).ok_or_else(|| unexpected("pin is not a string"))?;
                    decode_binding(pin, fields).map(Some)
                }
                // Lua's `false`, as RESP2 and RESP3 carry it: no pin. Any
                // other shape is no answer at all, never "no pin" (which
                // would let the cookie be pinned anew).
                Value::Nil | Value::Boolean(false) => Ok(None),
                _ => Err(unexpected("unexpected pin row")),
            })
            .collect()
    }

    /// [`RedisStore::decode_rows`] of a reply that must hold a row for each
    /// of `expected` pins.
    fn decode_rows_of(rows: &Value, expected: usize) -> Result<Vec<Option<Binding>>, StoreError> {
        let decoded = RedisStore::decode_rows(rows)?;
        if decoded.len() != expected {
            return Err(unexpected(
                "a pin script answered another number of rows than pins",
            ));
        }
        Ok(decoded)
    }

    /// `pin` as its key holds it: expiring (as routing reads it) no
    /// later than its creation plus the longest identity lifetime this
    /// process was started with. Redis deletes the key that long plus
    /// `identities.remember_retired` after its creation, by the lifetimes in
    /// force then; an identity allowed to live longer by a later reload or
    /// restart (a raised `max_lifetime`) would otherwise outlive its pin,
    /// and its cookie, unknown once Redis let it go, could be pinned anew
    /// on another exit. Capped, the pin is seen to expire while Redis still
    /// holds it, and its identity retires (`cookie-expired`) instead.
    fn expiring_pin<'p>(&self, pin: &'p Pin) -> std::borrow::Cow<'p, Pin> {
        let longest_ms = self
            .inner
            .pin_ttl_ms
            .saturating_sub(self.inner.keep_retired_ms);
        let cap = pin.created_ms.saturating_add(longest_ms);
        if pin.expires_ms.is_some_and(|at| at <= cap) {
            return std::borrow::Cow::Borrowed(pin);
        }
        std::borrow::Cow::Owned(Pin {
            expires_ms: Some(cap),
            ..pin.clone()
        })
    }

    /// `written`, a request's pin write begun when
    /// [`RedisStore::losses_noticed`] read `before`, unless a loss was
    /// noticed meanwhile. Its reply may have shown that loss (a reply to a
    /// command sent during a restore is otherwise no error: lookups are
    /// answered under the quarantine, which writes are not), or the loss
    /// came to light another way while it was in flight (an eviction
    /// count, the fleet's quarantine, another command's reply): either way
    /// it may have pinned anew a credential Redis lost, whose pin the
    /// restore has not written back yet, so it is not used. (What it wrote
    /// stays in Redis, where a retry would find it live: its caller
    /// retires the identity it wrote for, on this `Lost` as on the one of a
    /// reply that showed the loss; see `Router::retire_written_in_a_loss`.)
    fn unless_lost_meanwhile<T>(
        &self,
        before: u64,
        written: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let written = written?;
        if self.losses_noticed() == before {
            return Ok(written);
        }
        Err(StoreError::new(
            StoreErrorKind::Lost,
            "Redis was seen to lose data while this pin was written, so it is not used",
        ))
    }

    /// Pins each of `pins` unless pinned, in one round trip (followed by
    /// `WAIT` with `store.wait_replicas`; no journal: the caller writes it).
    async fn pin_all_raw(&self, pins: &[(PinKey, Pin)]) -> Result<Vec<Binding>, StoreError> {
        let keys: Vec<String> = pins.iter().map(|(key, _)| self.pin_key(key)).collect();
        let mut args = vec![
            self.inner.pin_ttl_ms.to_string().into_bytes(),
            self.identity_prefix().into_bytes(),
        ];
        for (_, pin) in pins {
            args.push(encode_pin(&self.expiring_pin(pin))?);
        }
        let result = self
            .run_pin_script(&self.inner.pin_all_if_absent, &keys, &args)
            .await?;
        RedisStore::decode_pinned(&result, pins.len())
    }

    /// Runs a script that writes pins: followed by `WAIT` when
    /// `store.wait_replicas` asks for it, and failing when too few
    /// replicas acknowledged it.
    async fn run_pin_script(
        &self,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<Value, StoreError> {
        self.refuse_on_key_conflict()?;
        match self.run_waited(script, keys, args).await? {
            (_, Some(short)) => Err(short),
            (result, None) => Ok(result),
        }
    }

    /// Runs a script that writes, followed by `WAIT` when
    /// `store.wait_replicas` asks for it; answers its result, and beside
    /// it the error of too few replicas acknowledging it (it is written on
    /// the primary all the same).
    async fn run_waited(
        &self,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<(Value, Option<StoreError>), StoreError> {
        match (self.inner.wait, self.inner.link.acknowledged_connection()?) {
            (Some(wait), Some(connection)) => {
                self.run_acknowledged(wait, connection, script, keys, args)
                    .await
            }
            _ => Ok((
                self.run_script(script, keys, args, Counting::Write).await?,
                None,
            )),
        }
    }

    /// Decodes a pin-writing script's rows, one binding per pin.
    fn decode_pinned(rows: &Value, expected: usize) -> Result<Vec<Binding>, StoreError> {
        RedisStore::decode_rows_of(rows, expected)?
            .into_iter()
            .map(|b| b.ok_or_else(|| unexpected("a pin vanished")))
            .collect()
    }

    /// Founds `identity` on `pins` in one round trip (the `FOUND` script);
    /// no journal: the caller writes it.
    async fn found_raw(
        &self,
        identity: &Identity,
        pins: &[(PinKey, Pin)],
    ) -> Result<Founding, StoreError> {
        let mut keys = Vec::with_capacity(pins.len() + 1);
        keys.push(self.identity_key(identity.id));
        keys.extend(pins.iter().map(|(key, _)| self.pin_key(key)));
        let mut args = vec![
            self.inner.pin_ttl_ms.to_string().into_bytes(),
            self.identity_prefix().into_bytes(),
            postcard::to_stdvec(identity).map_err(corrupt)?,
            identity.last_used_ms.to_string().into_bytes(),
            encode_address(identity.egress_ip),
        ];
        for (_, pin) in pins {
            args.push(encode_pin(&self.expiring_pin(pin))?);
        }
        let reply = self.run_pin_script(&self.inner.found, &keys, &args).await?;
        let Value::Array(parts) = &reply else {
            return Err(unexpected("unexpected found-identity reply"));
        };
        let (founded, rows) = match parts.as_slice() {
            [Value::Int(founded), rows] => (*founded == 1, rows),
            _ => return Err(unexpected("unexpected found-identity reply")),
        };
        let rows_expected = if founded { pins.len() } else { 1 };
        let mut bindings = RedisStore::decode_pinned(rows, rows_expected)?;
        if founded {
            return Ok(Founding::Founded(bindings));
        }
        match bindings.pop() {
            Some(winner) if bindings.is_empty() => Ok(Founding::Lost(winner)),
            _ => Err(unexpected("unexpected found-identity reply")),
        }
    }

    /// Looks `keys` up in Redis (one round trip); caches what it finds
    /// when the lookup left under cache subscription `ticket`.
    async fn fetch(
        &self,
        keys: &[PinKey],
        ticket: Option<u64>,
    ) -> Result<Vec<Option<Binding>>, StoreError> {
        // What the journal held before Redis is asked: a pin or retirement
        // journaled by then was in Redis by then (the journal writes after
        // Redis did).
        let journaled = match &self.inner.journal {
            Some(journal) => Some(journal.lookup(keys).await?),
            None => None,
        };
        let redis_keys: Vec<String> = keys.iter().map(|key| self.pin_key(key)).collect();
        let args = [self.identity_prefix().into_bytes()];
        let result = self
            .run_script(&self.inner.lookup, &redis_keys, &args, Counting::Read)
            .await?;
        let mut bindings = RedisStore::decode_rows_of(&result, keys.len())?;
        if let (Some(journal), Some(journaled)) = (&self.inner.journal, &journaled) {
            keep_journaled_retirements(journaled, &mut bindings, |id| journal.retirement(id));
        }
        if let (Some(cache), Some(ticket)) = (&self.inner.cache, ticket) {
            let now = recovery::now_ms();
            for (key, binding) in keys.iter().zip(&bindings) {
                if let Some(binding) = binding {
                    cache.put(ticket, *key, binding, now);
                }
            }
        }
        if self.quarantined() {
            self.quarantine(keys, &mut bindings).await?;
        } else if journaled.is_some_and(|j| self.lost_though_journaled(&j, &bindings)) {
            self.on_loss(Loss::JournaledPinGone, None, None);
            self.quarantine(keys, &mut bindings).await?;
        }
        if let Some(journal) = &self.inner.journal {
            let found: Vec<(PinKey, &Binding)> = keys
                .iter()
                .zip(&bindings)
                .filter_map(|(key, b)| b.as_ref().map(|b| (*key, b)))
                .collect();
            journal.bindings(&found).await?;
        }
        Ok(bindings)
    }

    /// Whether Redis answered without a pin (`bindings`) that this
    /// replica's journal held before the lookup left (`journaled`) and
    /// that was made less than half the pins' time to live ago: Redis
    /// cannot have let it expire and nothing deletes pins, so Redis lost
    /// it. The generation checks catch a loss at the next round trip, but
    /// not one that predates the history this replica saved last (a
    /// `kill -9` together with a failover that lost its newest pins):
    /// without this, such a pin would be made anew on an exit chosen now.
    /// (Half: a margin for replicas configured with other lifetimes.)
    fn lost_though_journaled(&self, journaled: &Bindings, bindings: &[Option<Binding>]) -> bool {
        let young_since = recovery::now_ms().saturating_sub(self.inner.pin_ttl_ms / 2);
        journaled.iter().zip(bindings).any(|(journaled, answered)| {
            answered.is_none()
                && journaled
                    .as_ref()
                    .is_some_and(|j| j.pin.created_ms > young_since)
        })
    }

    /// Writes an identity record (as created, plus its mutable parts),
    /// merged with what the server holds (see `scripts::WRITE_IDENTITY`:
    /// after a loss every replica's journal writes it back, in any order).
    async fn write_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let retired = match &identity.retired {
            Some(retired) => postcard::to_stdvec(retired).map_err(corrupt)?,
            None => Vec::new(),
        };
        let args = [
            postcard::to_stdvec(identity).map_err(corrupt)?,
            identity.last_used_ms.to_string().into_bytes(),
            retired,
            encode_address(identity.egress_ip),
            self.inner.pin_ttl_ms.to_string().into_bytes(),
            self.inner.keep_retired_ms.to_string().into_bytes(),
            self.inner.retired_channel.clone().into_bytes(),
            identity.id.to_string().into_bytes(),
        ];
        let key = [self.identity_key(identity.id)];
        self.run_script(&self.inner.write_identity, &key, &args, Counting::None)
            .await
            .map(|_| ())
    }
}

/// What every key of `namespace` starts with: in a Redis Cluster the
/// namespace as a hash tag (`{NS}`), so all its keys share one slot.
fn key_prefix(url: &str, namespace: &str) -> String {
    if url.starts_with("redis+cluster://") {
        format!("{{{namespace}}}")
    } else {
        namespace.to_owned()
    }
}

/// The error for a reply that showed a loss: its result is not used.
fn lost_in_reply(loss: &Loss) -> StoreError {
    StoreError::new(
        StoreErrorKind::Lost,
        format!("Redis's answer shows it lost data ({loss})"),
    )
}

/// Whose key a replica offers as the fleet's pin-hashing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOffer {
    /// The fleet's key as this replica kept it (`DATA_DIR/fleet-pin-key`).
    Kept,
    /// A key of this replica's own.
    New,
}

/// The 32-byte pin-hashing key Redis holds under `name`.
fn hash_key_of(name: &str, stored: &[u8]) -> Result<[u8; 32], StoreError> {
    stored
        .try_into()
        .map_err(|_| corrupt(format!("{name} does not hold a 32-byte key")))
}

/// How logs and errors name a pin-hashing key: the first 8 hex digits of
/// its BLAKE3 hash (the key is a secret: it would let anyone who reads the
/// store link pins to cookie values).
pub fn key_id(key: &[u8; 32]) -> String {
    blake3::hash(key).to_hex()[..8].to_owned()
}

/// Takes the retirements this replica's journal holds onto the identities
/// Redis answered live (`bindings`): those of the pins it journaled
/// (`journaled`, read before Redis was asked), and, for a pin it never saw
/// (a value another replica pinned to an identity this one retired), the
/// identity's own (`journal_retirement`, by id). Redis is written before
/// the journal, so a live answer there means Redis lost the retirement (a
/// failover): until the restore writes it back, or when the loss goes
/// unseen, the identity must not be used again. Only retirements that are
/// decided once and stored are taken (see [`decided_once`]); the others
/// are judged again at every use.
fn keep_journaled_retirements(
    journaled: &Bindings,
    bindings: &mut [Option<Binding>],
    journal_retirement: impl Fn(IdentityId) -> Option<Retirement>,
) {
    for (journaled, answered) in journaled.iter().zip(bindings.iter_mut()) {
        let Some(identity) = answered.as_mut().and_then(|a| a.identity.as_mut()) else {
            continue;
        };
        if identity.retired.is_some() {
            continue;
        }
        let by_pin = journaled
            .as_ref()
            .and_then(|j| j.identity.as_ref())
            .filter(|j| j.id == identity.id);
        let retired = match by_pin {
            Some(journaled) => journaled.retired.clone(),
            None => journal_retirement(identity.id),
        };
        if let Some(retired) = retired.filter(|r| decided_once(&r.reason)) {
            Arc::make_mut(identity).retired = Some(retired);
        }
    }
}

/// Whether a retirement for `reason` is decided once, from what was seen
/// (an origin's invalidation, an address that moved, an operator, a loss),
/// and then only known from the store. The rest (lifetimes, idleness, an
/// exit's death, removal or route change) every use judges again from the
/// identity and the configuration, and the journal's own sweep records
/// them where Redis never did: taken over, they would outlive a reload
/// that lengthened a lifetime, on this replica alone.
fn decided_once(reason: &RetireReason) -> bool {
    matches!(
        reason,
        RetireReason::Invalidated { .. }
            | RetireReason::ExitIpDrift { .. }
            | RetireReason::Evicted
            | RetireReason::StoreLost
    )
}

/// Whether a network partition may leave two primaries taking pins at
/// once, each side's replicas of pinproxy unaware of the other's until it
/// heals: Redis fails over (`fails_over`: Sentinel or a cluster; or the
/// primary has `replicas`, which an outside tool may promote) and its
/// primary goes on taking writes without one (`min-replicas-to-write`
/// 0, or unreadable). The caller asks only when no new pin waits for a
/// replica (`store.wait_replicas` 0).
fn split_brain_possible(
    fails_over: bool,
    replicas: Option<u64>,
    min_replicas: Option<u64>,
) -> bool {
    (fails_over || replicas.is_some_and(|n| n > 0)) && min_replicas.unwrap_or(0) == 0
}

/// The number `INFO` gives for `field` (`field:N` on a line of its own).
fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.parse().ok())
}

/// `INFO`, and its round trip on the boot clock.
async fn read_info(
    connection: &mut ConnectionManager,
) -> (redis::RedisResult<String>, server_clock::RoundTrip) {
    let sent_ms = server_clock::boot_ms();
    let info = redis::cmd("INFO").query_async(connection).await;
    let round_trip = server_clock::RoundTrip {
        sent_ms,
        answered_ms: server_clock::boot_ms(),
    };
    (info, round_trip)
}

/// Every how many background checks the clocks are compared (about every
/// minute, the first time at once).
const CLOCK_CHECK_EVERY: u32 = 120;

impl RedisStore {
    /// Compares Redis's clock with this replica's (`TIME`): replicas judge
    /// what others stamped (identities' ages, exit deaths) and Redis
    /// expires keys by its own clock, so clocks that read apart shift
    /// those judgements. Exported as a gauge, and said when it passes
    /// [`server_clock::SAID_MS`] (once, until it comes back within).
    async fn check_clock(&self) {
        let Ok(mut connection) = self.connection() else {
            return;
        };
        let clock = crate::clock::Clock::system();
        let sent = clock.now_ms();
        let time: redis::RedisResult<(u64, u64)> =
            redis::cmd("TIME").query_async(&mut connection).await;
        let answered = clock.now_ms();
        let Ok((seconds, micros)) = time else {
            return;
        };
        let server = seconds.saturating_mul(1000).saturating_add(micros / 1000);
        let offset = server_clock::offset_ms(server, sent, answered);
        self.inner.metrics.store_clock_offset_ms.set(offset);
        let apart = offset.unsigned_abs() > server_clock::SAID_MS;
        if apart != self.inner.clock_apart.swap(apart, Ordering::Relaxed) {
            if apart {
                tracing::warn!(
                    offset_ms = offset,
                    "Redis's clock and this replica's read apart by more than 5 s: exit deaths, \
                     sticky windows and identities' ages are judged across replicas' clocks, and \
                     Redis expires keys by its own; synchronise the clocks (NTP)"
                );
            } else {
                tracing::info!(
                    offset_ms = offset,
                    "Redis's clock and this replica's agree again"
                );
            }
        }
    }
}

/// Checks the link and the generation until the store is dropped.
async fn check_loop(inner: Weak<Inner>) {
    let mut rounds = 0u32;
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        let Some(inner) = inner.upgrade() else { return };
        let store = RedisStore { inner };
        rounds = rounds.wrapping_add(1);
        let was = store.is_available();
        if !was || rounds.is_multiple_of(20) {
            if let Err(e) = store.inner.link.find_primary().await {
                tracing::debug!(error = %e, "cannot ask the sentinels for the primary");
            }
        }
        store.check_info().await;
        if rounds % CLOCK_CHECK_EVERY == 1 {
            store.check_clock().await;
        }
        match store.check_generation().await {
            Ok(_) => {
                if !was {
                    tracing::info!("redis pin store reachable again");
                }
                if let Err(e) = store.check_fleet_quarantine().await {
                    tracing::debug!(error = %e, "cannot read the fleet's quarantine");
                }
            }
            Err(e) => {
                store.inner.link.lost();
                if was {
                    tracing::warn!(error = %e, "redis pin store unreachable");
                }
            }
        }
        if rounds.is_multiple_of(SAVE_EVERY) {
            store.save_generation(false).await;
        }
    }
}

impl PinStore for RedisStore {
    async fn lookup_into(&self, keys: &[PinKey], found: &mut Bindings) -> Result<(), StoreError> {
        let Some(cache) = &self.inner.cache else {
            found.extend(self.fetch(keys, None).await?);
            return Ok(());
        };
        let now = recovery::now_ms();
        let start = found.len();
        found.extend(keys.iter().map(|key| cache.get(key, now)));
        let hits = found[start..].iter().filter(|b| b.is_some()).count();
        self.inner.metrics.store_cache_hits.inc_by(hits as u64);
        if hits == keys.len() {
            return Ok(());
        }
        let missing: Vec<PinKey> = keys
            .iter()
            .zip(&found[start..])
            .filter(|(_, b)| b.is_none())
            .map(|(key, _)| *key)
            .collect();
        let mut fetched = self.fetch(&missing, cache.ticket()).await?.into_iter();
        // The misses, in order, from what Redis answered.
        for slot in found[start..].iter_mut().filter(|b| b.is_none()) {
            *slot = fetched.next().flatten();
        }
        Ok(())
    }

    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.write_identity(identity).await?;
        if let Some(journal) = &self.inner.journal {
            journal.identity(identity).await?;
        }
        Ok(())
    }

    async fn discard_identity(&self, id: IdentityId) -> Result<(), StoreError> {
        let mut connection = self.connection()?;
        self.note(connection.del::<_, ()>(self.identity_key(id)).await)?;
        if let Some(journal) = &self.inner.journal {
            journal.discard(id).await;
        }
        Ok(())
    }

    async fn pin_if_absent(&self, key: PinKey, pin: &Pin) -> Result<Binding, StoreError> {
        self.pin_all_if_absent(&[(key, pin.clone())])
            .await?
            .pop()
            .ok_or_else(|| unexpected("a pin vanished"))
    }

    async fn pin_all_if_absent(&self, pins: &[(PinKey, Pin)]) -> Result<Vec<Binding>, StoreError> {
        let before = self.losses_noticed();
        let written = self.pin_all_raw(pins).await;
        let bindings = self.unless_lost_meanwhile(before, written)?;
        if let Some(journal) = &self.inner.journal {
            let made: Vec<(PinKey, &Binding)> = pins
                .iter()
                .zip(&bindings)
                .map(|((key, _), binding)| (*key, binding))
                .collect();
            journal.bindings(&made).await?;
        }
        Ok(bindings)
    }

    async fn found_identity(
        &self,
        identity: &Identity,
        pins: &[(PinKey, Pin)],
    ) -> Result<Founding, StoreError> {
        let before = self.losses_noticed();
        let written = self.found_raw(identity, pins).await;
        let founding = self.unless_lost_meanwhile(before, written)?;
        if let Some(journal) = &self.inner.journal {
            match &founding {
                Founding::Founded(bindings) => {
                    journal.identity(identity).await?;
                    let made: Vec<(PinKey, &Binding)> = pins
                        .iter()
                        .zip(bindings)
                        .map(|((key, _), binding)| (*key, binding))
                        .collect();
                    journal.bindings(&made).await?;
                }
                Founding::Lost(winner) => {
                    if let Some((key, _)) = pins.first() {
                        journal.bindings(&[(*key, winner)]).await?;
                    }
                }
            }
        }
        Ok(founding)
    }

    async fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) -> Result<(), StoreError> {
        // Best effort and off the response path: a lost touch only makes an
        // identity look idle earlier. Touches of one identity within
        // TOUCH_COALESCE become one write (the request count summed).
        match self.inner.touches.entry(id) {
            dashmap::Entry::Occupied(mut pending) => {
                pending.get_mut().add(now_ms, requests, worked, egress);
                return Ok(());
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(PendingTouch {
                    last_ms: now_ms,
                    requests: u64::from(requests),
                    worked,
                    egress,
                });
            }
        }
        let store = self.clone();
        self.inner.tasks.spawn(async move {
            tokio::time::sleep(TOUCH_COALESCE).await;
            let Some((_, touch)) = store.inner.touches.remove(&id) else {
                return;
            };
            let args = [
                touch.last_ms.to_string().into_bytes(),
                touch.requests.to_string().into_bytes(),
                if touch.worked {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                },
                encode_address(touch.egress),
            ];
            let key = [store.identity_key(id)];
            let _ = store
                .run_script(&store.inner.touch, &key, &args, Counting::None)
                .await;
            if let Some(journal) = &store.inner.journal {
                journal
                    .touch(
                        id,
                        touch.last_ms,
                        u32::try_from(touch.requests).unwrap_or(u32::MAX),
                        touch.worked,
                        touch.egress,
                    )
                    .await;
            }
        });
        Ok(())
    }

    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        let key = [self.identity_key(id)];
        // Cached readings without the address would let a new tunnel go
        // unchecked: stale here at once, on other replicas when the
        // script's message arrives.
        if let Some(cache) = &self.inner.cache {
            cache.stale(id);
        }
        let recorded = self
            .run_script(
                &self.inner.record_egress,
                &key,
                &[
                    ip.to_string().into_bytes(),
                    self.inner.pin_ttl_ms.to_string().into_bytes(),
                    self.inner.retired_channel.clone().into_bytes(),
                    id.to_string().into_bytes(),
                ],
                Counting::Write,
            )
            .await?;
        if let Some(journal) = &self.inner.journal {
            journal.egress(id, ip).await?;
        }
        Ok(bulk(&recorded).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()))
    }

    async fn extend_pin(
        &self,
        key: PinKey,
        pinned: &Pin,
        expires_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        let asked = Pin {
            expires_ms,
            ..pinned.clone()
        };
        let extended = self.expiring_pin(&asked);
        // Later than the pin held, after this process's cap (a replica
        // started with shorter lifetimes must not shorten it).
        if !super::expires_later(extended.expires_ms, pinned.expires_ms) {
            return Ok(());
        }
        // The key must outlive the new expiry by the time retired
        // credentials are remembered, as when the pin was written; if its
        // time to live (set with the lifetimes of whoever wrote it) is too
        // short, the pin keeps its expiry.
        let until = extended
            .expires_ms
            .map_or(u64::MAX, |at| at.saturating_add(self.inner.keep_retired_ms));
        // Acknowledged by the replicas `store.wait_replicas` asks for, as a
        // new pin is: a failover must not bring back the earlier expiry.
        let reply = self
            .run_pin_script(
                &self.inner.extend_pin,
                &[self.pin_key(&key)],
                &[
                    encode_pin(pinned)?,
                    encode_pin(&extended)?,
                    until.to_string().into_bytes(),
                    recovery::now_ms().to_string().into_bytes(),
                ],
            )
            .await?;
        if let Some(cache) = &self.inner.cache {
            cache.forget(&key);
        }
        if let (Some(journal), Value::Int(1)) = (&self.inner.journal, &reply) {
            // Logged, not refused: the answer that extends the pin has
            // been acted on by the origin, and a restore without the later
            // expiry only ends the pin sooner (Redis's key keeps its time
            // to live either way), never moves it.
            let _ = journal.extend_pin(key, pinned, extended.expires_ms).await;
        }
        Ok(())
    }

    async fn read_identity(&self, id: IdentityId) -> Result<Option<Identity>, StoreError> {
        let mut connection = self.connection()?;
        let fields: Value = self.note(connection.hgetall(self.identity_key(id)).await)?;
        decode_identity(&fields)
    }

    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        let key = self.identity_key(id);
        let record = postcard::to_stdvec(retirement).map_err(corrupt)?;
        // The first retirement stands; the record then lives as long as
        // retired credentials are remembered. Every replica's hit cache
        // stops answering for it (the script publishes it).
        // A journal that does not hold the identity (retired by hand here,
        // served by other replicas) is given it as Redis holds it, so that
        // a restore after a loss writes the retirement back.
        let unjournaled = self
            .inner
            .journal
            .as_ref()
            .is_some_and(|journal| !journal.holds(id));
        let args = [
            record,
            self.inner.keep_retired_ms.to_string().into_bytes(),
            self.inner.retired_channel.clone().into_bytes(),
            id.to_string().into_bytes(),
            self.inner.pin_ttl_ms.to_string().into_bytes(),
            if unjournaled {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
        ];
        if let Some(cache) = &self.inner.cache {
            cache.stale(id);
        }
        // Acknowledged by `store.wait_replicas` replicas, as a new pin is:
        // a failover that lost it would bring the identity back live on
        // every replica whose journal does not hold it. Journaled once
        // Redis took it, acknowledged or not: one too few replicas hold is
        // the one a failover loses.
        let (held, short) = self.run_waited(&self.inner.retire, &[key], &args).await?;
        if let Some(journal) = &self.inner.journal {
            if !unjournaled {
                journal.retire(id, retirement).await;
            } else {
                match codec::decode_identity(&held) {
                    Ok(Some(mut identity)) => {
                        identity.retired.get_or_insert_with(|| retirement.clone());
                        // Retired in Redis all the same; a journal that
                        // cannot record it has said so, and the replica
                        // refuses from then on.
                        let _ = journal.identity(&identity).await;
                    }
                    // Retired in Redis all the same: only the journal's
                    // copy is missing.
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        error = %e, identity = %id,
                        "a retired identity's record does not read: not journaled"
                    ),
                }
            }
        }
        match short {
            Some(short) => Err(short),
            None => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        let mut connection = self.connection()?;
        let pattern = format!("{}:id:*", self.inner.prefix);
        let ids: Vec<String> = self.note(scan(&mut connection, &pattern).await)?;
        let mut listings = Vec::new();
        // Read in pipelined batches: a round trip per key made a listing of
        // a million pins take minutes.
        for batch in ids.chunks(LIST_BATCH) {
            let mut pipe = redis::pipe();
            for key in batch {
                pipe.hgetall(key);
            }
            let records: Vec<Value> = self.note(pipe.query_async(&mut connection).await)?;
            for fields in &records {
                if let Some(identity) = decode_identity(fields)? {
                    listings.push(Listing {
                        identity,
                        pins: Vec::new(),
                    });
                }
            }
        }
        // Each pin goes to its identity's listing by an index: a search of
        // the listings per pin is quadratic (a million pins of a quarter
        // million identities).
        let by_identity: std::collections::HashMap<IdentityId, usize> = listings
            .iter()
            .enumerate()
            .map(|(index, listing)| (listing.identity.id, index))
            .collect();
        let pattern = format!("{}:pin:*", self.inner.prefix);
        let pins: Vec<String> = self.note(scan(&mut connection, &pattern).await)?;
        for batch in pins.chunks(LIST_BATCH) {
            let mut pipe = redis::pipe();
            for key in batch {
                pipe.get(key);
            }
            // Decoded batch by batch: the raw values of a million pins
            // held at once would be a hundred megabytes more.
            let values: Vec<Option<Vec<u8>>> =
                self.note(pipe.query_async(&mut connection).await)?;
            for (key, value) in batch.iter().zip(values) {
                let Some(hex) = key.rsplit(':').next() else {
                    continue;
                };
                // Gone since the scan (expired).
                let Some(value) = value else { continue };
                let binding = decode_binding(&value, &Value::Nil)?;
                let Some(bytes) = parse_hex16(hex) else {
                    continue;
                };
                // A pin whose identity's record is gone (it answers
                // `forgotten`) is left out, as is one whose identity was
                // written after the scan of identities: a listing of a
                // live Redis is not a point-in-time copy.
                if let Some(listing) = by_identity
                    .get(&binding.pin.identity)
                    .and_then(|&index| listings.get_mut(index))
                {
                    listing.pins.push((PinKey::from_bytes(bytes), binding.pin));
                }
            }
        }
        Ok(listings)
    }

    async fn count(&self) -> Result<Counts, StoreError> {
        let listings = self.list().await?;
        Ok(Counts {
            pins: listings.iter().map(|l| l.pins.len() as u64).sum(),
            identities: listings.len() as u64,
            retired: listings
                .iter()
                .filter(|l| l.identity.retired.is_some())
                .count() as u64,
        })
    }

    async fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &Expiry<'_>,
    ) -> Result<super::Swept, StoreError> {
        // Keys expire on the server; expired identities are retired when
        // next used (every replica applies the same rules). The journal
        // forgets what has expired. It sees only this replica's uses, so
        // it never retires for idleness: an identity idle here may be busy
        // through other replicas, and what the journal says is what a
        // restore writes back. Idleness is judged from Redis, which every
        // replica's uses reach.
        if let Some(journal) = &self.inner.journal {
            let expiry = |identity: &Identity| {
                expiry(identity).filter(|retired| retired.reason != RetireReason::IdleExpired)
            };
            journal.sweep(now_ms, keep_retired_ms, &expiry).await?;
        }
        Ok(super::Swept::default())
    }

    async fn record_exit_death(&self, exit: &ExitId, at_ms: u64) -> Result<(), StoreError> {
        let keys = [format!("{}:exit-deaths", self.inner.prefix)];
        let args = [
            exit.as_str().as_bytes().to_vec(),
            at_ms.to_string().into_bytes(),
        ];
        self.run_script(&self.inner.exit_death, &keys, &args, Counting::None)
            .await
            .map(|_| ())
    }

    async fn exit_deaths(&self) -> Result<Vec<(ExitId, u64)>, StoreError> {
        let mut connection = self.connection()?;
        let deaths: Vec<(String, u64)> = self.note(
            connection
                .hgetall(format!("{}:exit-deaths", self.inner.prefix))
                .await,
        )?;
        Ok(deaths
            .into_iter()
            .map(|(e, at)| (ExitId::new(&e), at))
            .collect())
    }
}

async fn scan(
    connection: &mut ConnectionManager,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    // `SCAN` may return a key more than once (the table rehashed during the
    // walk, which a live fleet's expiries cause): each is listed once.
    let mut keys = std::collections::HashSet::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys.into_iter().collect());
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition can leave two primaries taking pins when Redis fails
    /// over (Sentinel, a cluster, or a primary with replicas) and its
    /// primary takes writes without a replica.
    #[test]
    fn a_failing_over_redis_without_min_replicas_can_split() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n";
        assert_eq!(info_field(info, "connected_slaves"), Some(2));
        assert_eq!(info_field(info, "connected"), None);
        assert!(split_brain_possible(true, Some(0), Some(0)));
        assert!(split_brain_possible(false, Some(2), None));
        assert!(!split_brain_possible(false, Some(2), Some(1)));
        assert!(!split_brain_possible(true, None, Some(1)));
        assert!(!split_brain_possible(false, Some(0), Some(0)));
        assert!(!split_brain_possible(false, None, None));
    }

    /// A pin script's row is a pin, or Lua's `false` (no pin); any other
    /// shape, or another number of rows than pins, is no answer at all,
    /// never "no pin" (which would let the cookie be pinned anew).
    /// The exit comes from the identity's record: a record that names
    /// another identity than its pin is corrupt, never taken.
    #[test]
    fn a_record_of_another_identity_is_corrupt() {
        use crate::credential::PinKind;
        use crate::identity::{ExitId, SessionId};
        let fingerprint = Arc::new(crate::fingerprint::Fingerprint::default());
        let a = Identity::new(ExitId::new("e1"), SessionId(1), 5, fingerprint.clone(), 5);
        let b = Identity::new(ExitId::new("e2"), SessionId(2), 5, fingerprint, 5);
        let pin = Pin {
            identity: a.id,
            kind: PinKind::Cookie,
            name: Arc::from("datadome"),
            created_ms: 5,
            expires_ms: None,
        };
        let fields = |who: &Identity| {
            Value::Array(vec![
                Value::BulkString(b"rec".to_vec()),
                Value::BulkString(postcard::to_stdvec(who).unwrap_or_default()),
            ])
        };
        let encoded = encode_pin(&pin).unwrap_or_default();
        let own = decode_binding(&encoded, &fields(&a));
        assert!(own.is_ok_and(|b| b.identity.is_some_and(|i| i.exit == a.exit)));
        let other = decode_binding(&encoded, &fields(&b));
        assert!(other.is_err_and(|e| e.kind == StoreErrorKind::Corrupt));
    }

    #[test]
    fn only_false_is_no_pin() {
        let rows = |row: Value| Value::Array(vec![row]);
        for absent in [Value::Nil, Value::Boolean(false)] {
            let decoded = RedisStore::decode_rows_of(&rows(absent), 1);
            assert!(matches!(decoded.as_deref(), Ok([None])), "{decoded:?}");
        }
        for odd in [Value::Int(0), Value::Okay, Value::Boolean(true)] {
            let decoded = RedisStore::decode_rows_of(&rows(odd.clone()), 1);
            assert!(decoded.is_err(), "{odd:?}: {decoded:?}");
        }
        let decoded = RedisStore::decode_rows_of(&rows(Value::Nil), 2);
        assert!(decoded.is_err(), "one row for two pins: {decoded:?}");
    }

    /// An identity this replica's journal holds retired is never taken as
    /// live from Redis (which lost the retirement), for a retirement that
    /// is decided once; a pin now naming another identity is left as Redis
    /// says.
    #[test]
    fn journaled_retirements_outlive_redis_losing_them() {
        use crate::credential::PinKind;
        use crate::identity::{ExitId, SessionId};
        let fingerprint = Arc::new(crate::fingerprint::Fingerprint::default());
        let binding = |identity: &Identity| Binding {
            pin: Pin {
                identity: identity.id,
                kind: PinKind::Cookie,
                name: Arc::from("datadome"),
                created_ms: 5,
                expires_ms: None,
            },
            identity: Some(Arc::new(identity.clone())),
        };
        let retired = |identity: &Identity, reason| {
            let mut identity = identity.clone();
            identity.retired = Some(Retirement { reason, at_ms: 9 });
            identity
        };
        let live: Vec<Identity> = (0..3)
            .map(|n| Identity::new(ExitId::new("e1"), SessionId(n), 5, fingerprint.clone(), 5))
            .collect();
        let other = Identity::new(ExitId::new("e2"), SessionId(7), 5, fingerprint, 5);
        let journaled: Bindings = [
            Some(binding(&retired(&live[0], RetireReason::Evicted))),
            Some(binding(&retired(&live[1], RetireReason::LifetimeExpired))),
            Some(binding(&retired(&live[2], RetireReason::Evicted))),
            None,
        ]
        .into_iter()
        .collect();
        let mut answered = vec![
            Some(binding(&live[0])),
            Some(binding(&live[1])),
            Some(binding(&other)),
            Some(binding(&other)),
        ];
        keep_journaled_retirements(&journaled, &mut answered, |_| None);
        let reason = |n: usize| {
            answered[n]
                .as_ref()
                .and_then(|b| b.identity.as_ref())
                .and_then(|i| i.retired.as_ref())
                .map(|r| r.reason.clone())
        };
        assert_eq!(reason(0), Some(RetireReason::Evicted));
        assert_eq!(reason(1), None, "lifetimes are judged again at every use");
        assert_eq!(reason(2), None, "the pin names another identity now");
        assert_eq!(reason(3), None);
    }
}
