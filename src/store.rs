//! The pin store: where pins and identities live, behind one interface.
//!
//! [`PinStore`] is what routing needs from a store; [`Store`] is the
//! configured one: [`memory`] (in-process, nothing survives a restart),
//! [`durable`] (the default: an embedded redb file, every routing decision
//! on disk before its response is released) or [`redis`] (shared by a
//! fleet). [`transfer`] moves pins between stores; [`bench`](mod@bench) measures one.
//!
//! Invariant: [`PinStore::pin_if_absent`] is atomic, so the first pin of a
//! credential wins everywhere, and a pin never points to another identity
//! once written. A store that cannot answer says so ([`StoreError`]) and
//! the caller fails closed.

pub mod bench;
pub mod durable;
pub mod memory;
pub mod pinnable;
pub mod redis;
pub mod transfer;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::credential::PinKey;
use crate::fault::{Blame, Fault};
use crate::identity::{ExitId, Identity, IdentityId, Pin, Retirement};

/// What went wrong in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store cannot be reached (Redis down, timed out).
    Unreachable,
    /// The store was closed or its writer stopped.
    Closed,
    /// A write failed; the store refuses new pins until restarted.
    WriteFailed,
    /// A record could not be decoded.
    Corrupt,
    /// The store answered something pinproxy did not expect.
    Protocol,
    /// The shared store holds another pin-hashing key than this replica
    /// hashes with; it refuses every request until restarted.
    KeyConflict,
    /// The answer itself showed that the shared store lost data: nothing
    /// decided from it is used (the restore runs meanwhile).
    Lost,
    /// The embedded store's disk has not confirmed a write in time.
    Stalled,
    /// A pin of a cookie name the configuration no longer tracks (a
    /// reload dropped it while the request was on its way) was refused:
    /// see [`pinnable`].
    Untracked,
}

impl StoreErrorKind {
    fn describe(self) -> &'static str {
        match self {
            StoreErrorKind::Unreachable => "unreachable",
            StoreErrorKind::Closed => "closed",
            StoreErrorKind::WriteFailed => "write failed",
            StoreErrorKind::Corrupt => "corrupt record",
            StoreErrorKind::Protocol => "unexpected answer",
            StoreErrorKind::KeyConflict => "pin-hashing key conflict",
            StoreErrorKind::Lost => "lost data",
            StoreErrorKind::Stalled => "disk stalled",
            StoreErrorKind::Untracked => "refused a pin",
        }
    }
}

/// The pin store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("pin store {}: {detail}", .kind.describe())]
pub struct StoreError {
    /// What kind of failure.
    pub kind: StoreErrorKind,
    /// What happened, for the log and the error answer.
    pub detail: String,
}

impl StoreError {
    /// A failure of `kind`.
    pub fn new(kind: StoreErrorKind, detail: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            detail: detail.into(),
        }
    }
}

impl Blame for StoreError {
    fn fault(&self) -> Fault {
        Fault::Store
    }
}

/// What to do while the store cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unavailable {
    /// Refuse everything.
    #[default]
    FailClosed,
    /// Forward requests without credentials.
    FailOpen,
}

/// A pin and the identity it points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The pin.
    pub pin: Pin,
    /// Its identity, unless the record is gone. Shared: a request's
    /// credentials usually share one identity, and the reading travels from
    /// the store through routing into the request's route and its capture
    /// without a copy of the record (a large one) at each step.
    pub identity: Option<Arc<Identity>>,
}

/// Whether a cookie expiring at `set` (`None`: a session cookie, which
/// expires last) outlives one expiring at `pinned`: when
/// [`PinStore::extend_pin`] moves a pin.
pub fn expires_later(set: Option<u64>, pinned: Option<u64>) -> bool {
    match (set, pinned) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(set), Some(pinned)) => set > pinned,
    }
}

/// The answer of [`PinStore::lookup`]: one entry per key asked, in order.
/// Held inline for up to four keys (a request carries a few tracked
/// cookies), so that answering a pin hit does not allocate.
pub type Bindings = SmallVec<[Option<Binding>; 4]>;

/// What a sweep asks of each live identity: whether it has ended, and the
/// retirement to record if so, dated by the caller (a sweep judges ages by
/// the wall clock, but dates what it retires no earlier than time really
/// elapsed: see `Router::retirement_now`).
pub type Expiry<'a> = dyn Fn(&Identity) -> Option<Retirement> + Sync + 'a;

/// What [`PinStore::found_identity`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Founding {
    /// The identity is stored; the binding in force for each pin, in order
    /// (the first is always the new identity's).
    Founded(Vec<Binding>),
    /// The first pin was someone else's: nothing was stored; its binding.
    Lost(Binding),
}

/// An identity and its pins, for listings.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The identity.
    pub identity: Identity,
    /// Its pins.
    pub pins: Vec<(PinKey, Pin)>,
}

/// How much a store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Pins.
    pub pins: u64,
    /// Identities (live and retired).
    pub identities: u64,
    /// Retired identities still remembered.
    pub retired: u64,
}

/// What a sweep removed or retired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Pins forgotten.
    pub pins: u64,
    /// Retired identities forgotten.
    pub identities: u64,
    /// Identities retired because they expired.
    pub retired: u64,
}

/// Where pins and identities live. [`PinStore::pin_if_absent`] must be
/// atomic: of two concurrent calls for one key exactly one pin is stored and
/// both callers learn it.
pub trait PinStore: Send + Sync {
    /// The bindings of `keys`, in order (`None` where a key is not pinned).
    fn lookup(&self, keys: &[PinKey]) -> impl Future<Output = Result<Bindings, StoreError>> + Send {
        async move {
            let mut found = Bindings::new();
            self.lookup_into(keys, &mut found).await?;
            Ok(found)
        }
    }

    /// [`PinStore::lookup`] into `found` (empty): the request path's way,
    /// which keeps the answer where its caller holds it instead of copying
    /// it out through each layer of stores.
    fn lookup_into(
        &self,
        keys: &[PinKey],
        found: &mut Bindings,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores a new identity (not yet reachable: no pin points to it).
    fn create_identity(
        &self,
        identity: &Identity,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes an identity that never got a pin (it lost a race).
    fn discard_identity(
        &self,
        id: IdentityId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores `pin` for `key` unless `key` is pinned already; returns the
    /// binding in force afterwards (the new one, or the earlier winner).
    fn pin_if_absent(
        &self,
        key: PinKey,
        pin: &Pin,
    ) -> impl Future<Output = Result<Binding, StoreError>> + Send;

    /// [`PinStore::pin_if_absent`] for each of `pins`, in order, each atomic
    /// on its own; returns the binding in force for each. A store may share
    /// one durable write among them (a request that brings several new
    /// cookies should not wait for one flush per cookie).
    fn pin_all_if_absent(
        &self,
        pins: &[(PinKey, Pin)],
    ) -> impl Future<Output = Result<Vec<Binding>, StoreError>> + Send {
        async move {
            let mut bindings = Vec::with_capacity(pins.len());
            for (key, pin) in pins {
                bindings.push(self.pin_if_absent(*key, pin).await?);
            }
            Ok(bindings)
        }
    }

    /// Founds a new identity on the credentials that brought it: unless
    /// the first of `pins` is pinned already, stores `identity` and every
    /// one of `pins` not pinned yet, and returns the binding in force for
    /// each ([`Founding::Founded`]); otherwise stores nothing and returns
    /// the first pin's winner ([`Founding::Lost`]). A remote store does it
    /// in one round trip; the identity is never reachable before it is
    /// stored.
    fn found_identity(
        &self,
        identity: &Identity,
        pins: &[(PinKey, Pin)],
    ) -> impl Future<Output = Result<Founding, StoreError>> + Send {
        async move {
            self.create_identity(identity).await?;
            let Some(((first_key, first_pin), rest)) = pins.split_first() else {
                return Ok(Founding::Founded(Vec::new()));
            };
            let first = self.pin_if_absent(*first_key, first_pin).await?;
            if first.pin.identity != identity.id {
                self.discard_identity(identity.id).await?;
                return Ok(Founding::Lost(first));
            }
            let mut bindings = Vec::with_capacity(pins.len());
            bindings.push(first);
            if !rest.is_empty() {
                bindings.extend(self.pin_all_if_absent(rest).await?);
            }
            Ok(Founding::Founded(bindings))
        }
    }

    /// Records a use of identity `id` at `now_ms`: `requests` requests (none
    /// for an open WebSocket or tunnel that kept it in use), whether one got
    /// a 2xx answer and, when given, the egress address its exit revealed
    /// unless one is recorded (as [`PinStore::record_egress`]). A store may
    /// write it later, off the request path: it only informs.
    fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records the identity's egress address unless one is recorded; returns
    /// the recorded one.
    fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> impl Future<Output = Result<Option<IpAddr>, StoreError>> + Send;

    /// Moves the cookie expiry of pin `key` to `expires_ms` (`None`: a
    /// session cookie, no expiry) when `pinned`, as read, is still its pin
    /// and expires sooner: an origin that sets a pinned value again with a
    /// later expiry (a sliding session) has the client keep it longer, and
    /// the pin must not expire first. Nothing else of a pin ever changes.
    fn extend_pin(
        &self,
        key: PinKey,
        pinned: &Pin,
        expires_ms: Option<u64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Identity `id` as the store holds it now; `None` when it holds none
    /// (never stored, forgotten long after its retirement, or lost).
    fn read_identity(
        &self,
        id: IdentityId,
    ) -> impl Future<Output = Result<Option<Identity>, StoreError>> + Send;

    /// Retires an identity (the first retirement stands).
    fn retire(
        &self,
        id: IdentityId,
        retirement: &Retirement,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every identity with its pins.
    fn list(&self) -> impl Future<Output = Result<Vec<Listing>, StoreError>> + Send;

    /// How much the store holds.
    fn count(&self) -> impl Future<Output = Result<Counts, StoreError>> + Send;

    /// Retires identities `expiry` says have ended (as it dates them), and
    /// forgets retired identities and expired pins older than
    /// `keep_retired_ms`.
    fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &Expiry<'_>,
    ) -> impl Future<Output = Result<Swept, StoreError>> + Send;

    /// Records that an exit died at `at_ms` (the latest death counts).
    fn record_exit_death(
        &self,
        exit: &ExitId,
        at_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The recorded exit deaths.
    fn exit_deaths(&self) -> impl Future<Output = Result<Vec<(ExitId, u64)>, StoreError>> + Send;
}

/// The tracked-cookie patterns (`CookiePolicy::patterns`) as a store
/// records them: joined by spaces, which no pattern holds.
pub fn patterns_line(patterns: &[impl AsRef<str>]) -> String {
    patterns
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The patterns a [`patterns_line`] holds (runs of blanks read as one).
pub fn patterns_of_line(line: &str) -> Vec<String> {
    line.split(' ')
        .filter(|pattern| !pattern.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The patterns of `these` that `those` lacks (what two records differ
/// by, for a message).
pub fn patterns_only_in(these: &[String], those: &[String]) -> Vec<String> {
    these
        .iter()
        .filter(|pattern| !those.contains(pattern))
        .cloned()
        .collect()
}

/// The configured pin store.
// One per daemon, never moved around: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Store {
    /// In-process only; pins die with the process.
    Memory(memory::MemoryStore),
    /// The embedded durable store (the default).
    Durable(durable::DurableStore),
    /// Redis, shared by a fleet.
    Redis(redis::RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Memory($store) => $call.await,
            Store::Durable($store) => $call.await,
            // Boxed: the Redis futures are several KiB, and unboxed they
            // would size (and be copied with) every request's future,
            // whichever store it uses.
            Store::Redis($store) => Box::pin($call).await,
        }
    };
}

impl Store {
    /// The latest time a record the store loaded at start was stamped
    /// with, for a store that loads from its own file (the embedded one):
    /// about when the process that wrote it stopped.
    pub fn newest_loaded_ms(&self) -> Option<u64> {
        match self {
            Store::Durable(store) => Some(store.newest_loaded_ms()),
            Store::Memory(_) | Store::Redis(_) => None,
        }
    }

    /// The distinct cookie names the store holds pins for, where it can
    /// tell without a scan of a shared server: the embedded and memory
    /// stores, and for Redis those of the pins this replica made or read
    /// (its journal; `None` without one: the command-line tools).
    pub fn held_cookie_names(&self) -> Option<Vec<Arc<str>>> {
        match self {
            Store::Memory(store) => Some(store.held_cookie_names()),
            Store::Durable(store) => Some(store.held_cookie_names()),
            Store::Redis(store) => store.held_cookie_names(),
        }
    }

    /// The tracked-cookie patterns the pins held were keyed under, where
    /// the store records them across runs (the embedded store, a Redis
    /// replica's journal; see
    /// [`durable::DurableStore::tracking_on_record`]).
    pub fn tracking_on_record(&self) -> Option<Vec<String>> {
        match self {
            Store::Durable(store) => store.tracking_on_record(),
            Store::Redis(store) => store.tracking_on_record(),
            Store::Memory(_) => None,
        }
    }

    /// Records the tracked-cookie patterns (`CookiePolicy::patterns`) pins
    /// are keyed under from now on, where the store keeps them across
    /// runs: the embedded store, a Redis replica's journal (a memory store
    /// forgets its pins; the fleet's record is [`Store::claim_fleet_tracking`]'s).
    pub async fn record_tracking(&self, patterns: &[Box<str>]) -> Result<(), StoreError> {
        match self {
            Store::Durable(store) => store.record_tracking(patterns).await,
            Store::Redis(store) => store.record_tracking(patterns).await,
            Store::Memory(_) => Ok(()),
        }
    }

    /// The tracked-cookie patterns the store records its pins were keyed
    /// under: the embedded store's (or a Redis replica's journal's) and,
    /// from a command-line tool on Redis, the fleet's.
    pub async fn keying_on_record(&self) -> Result<Option<Vec<String>>, StoreError> {
        match self.tracking_on_record() {
            Some(patterns) => Ok(Some(patterns)),
            None => self.fleet_tracking().await,
        }
    }

    /// Whether the store may hold pins: any it lists, or for Redis, which
    /// cannot list the fleet's, any written since the namespace's history
    /// began (its write sequence).
    pub async fn may_hold_pins(&self) -> Result<bool, StoreError> {
        match self {
            Store::Redis(store) => store.wrote_pins().await,
            Store::Memory(_) | Store::Durable(_) => {
                Ok(!self.held_cookie_names().unwrap_or_default().is_empty())
            }
        }
    }

    /// The tracked-cookie patterns a replica of a shared store's fleet
    /// last put in force (see [`redis::RedisStore::fleet_tracking`]);
    /// `None` for a store of this process alone.
    pub async fn fleet_tracking(&self) -> Result<Option<Vec<String>>, StoreError> {
        match self {
            Store::Redis(store) => store.fleet_tracking().await,
            Store::Memory(_) | Store::Durable(_) => Ok(None),
        }
    }

    /// Records `patterns` as the fleet's tracked cookies if the record is
    /// still `judged` (see [`redis::RedisStore::record_fleet_tracking`]);
    /// nothing to do for a store of this process alone.
    pub async fn claim_fleet_tracking(
        &self,
        judged: Option<&[String]>,
        patterns: &[Box<str>],
    ) -> Result<Option<Vec<String>>, StoreError> {
        match self {
            Store::Redis(store) => store.record_fleet_tracking(judged, patterns).await,
            Store::Memory(_) | Store::Durable(_) => Ok(None),
        }
    }

    /// Flushes and closes the store (durable writes finish first).
    pub async fn close(&self) {
        match self {
            Store::Durable(store) => store.close().await,
            Store::Redis(store) => store.close().await,
            Store::Memory(_) => {}
        }
    }

    /// How many data losses the store has noticed since it opened (Redis
    /// only; always 0 for the others): a pin write decided on a lookup made
    /// before the count moved is not made (see `Router::route_within`).
    pub fn losses_noticed(&self) -> u64 {
        match self {
            Store::Redis(store) => store.losses_noticed(),
            Store::Memory(_) | Store::Durable(_) => 0,
        }
    }

    /// Refuses a pin write decided on a lookup made when
    /// [`Store::losses_noticed`] read `seen`, once a loss has been noticed
    /// since: that lookup may have missed a pin the store lost and has not
    /// written back yet, and a write on its strength would pin the
    /// credential anew on an exit chosen now. (Lookups made since are
    /// answered under the quarantine: a credential Redis does not know is
    /// restored from the journal or answered as lost.)
    pub fn unchanged_since(&self, seen: u64) -> Result<(), StoreError> {
        if self.losses_noticed() == seen {
            return Ok(());
        }
        Err(StoreError::new(
            StoreErrorKind::Lost,
            "Redis was seen to lose data after this request's credentials were looked up, so \
             none is pinned on that reading",
        ))
    }

    /// The last data loss the store was seen to suffer (Redis only).
    pub fn loss_report(&self) -> Option<redis::LossReport> {
        match self {
            Store::Redis(store) => store.loss_report(),
            Store::Memory(_) | Store::Durable(_) => None,
        }
    }

    /// `memory`, `embedded` or `redis`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Durable(_) => "embedded",
            Store::Redis(_) => "redis",
        }
    }

    /// Whether the store answers and records: Redis reachable, the embedded
    /// store's writer still writing (see [`Store::unavailable_because`]).
    pub fn available(&self) -> bool {
        match self {
            Store::Redis(store) => store.is_available() && store.journal_failure().is_none(),
            Store::Durable(store) => store.write_failure().is_none(),
            Store::Memory(_) => true,
        }
    }

    /// Why the store is not [`available`], for readiness and the admin
    /// pages: `None` while it is.
    ///
    /// [`available`]: Store::available
    pub fn unavailable_because(&self) -> Option<String> {
        match self {
            Store::Durable(store) => store.write_failure().map(|failure| {
                format!(
                    "a write failed ({failure}); it records nothing more, so new pins are \
                     refused until pinproxy restarts once the disk is fixed"
                )
            }),
            Store::Redis(store) => match store.journal_failure() {
                Some(failure) => Some(journal_refusal(failure)),
                None if store.is_available() => None,
                None => Some("it is not answering".to_owned()),
            },
            _ if self.available() => None,
            _ => Some("it is not answering".to_owned()),
        }
    }

    /// A live check that the store answers (readiness): a round trip to
    /// Redis (and a write of nothing to a replica's journal); for the
    /// embedded store, a write of nothing that its disk confirms, as a
    /// pin's must be.
    pub async fn answers(&self) -> Result<(), StoreError> {
        match self {
            Store::Durable(store) => store.check_writes().await,
            // A replica's journal answers too: a hung disk under it
            // withholds every new pin's answer for the confirm limit.
            Store::Redis(store) => {
                store.journal_answers().await?;
                self.exit_deaths().await.map(drop)
            }
            Store::Memory(_) => self.exit_deaths().await.map(drop),
        }
    }

    /// Why every request that needs the store is refused before it is
    /// routed: `None` unless Redis is out of reach. (An embedded store
    /// whose writer stopped still answers what it holds; each change it can
    /// no longer record fails on its own, `WriteFailed`.)
    pub fn refusal(&self) -> Option<StoreError> {
        let Store::Redis(store) = self else {
            return None;
        };
        if let Some(failure) = store.journal_failure() {
            return Some(StoreError::new(
                StoreErrorKind::WriteFailed,
                journal_refusal(failure),
            ));
        }
        if store.is_available() {
            return None;
        }
        Some(match store.key_conflict() {
            Some(conflict) => StoreError::new(StoreErrorKind::KeyConflict, conflict.to_owned()),
            None => StoreError::new(StoreErrorKind::Unreachable, "it is not answering"),
        })
    }
}

/// What a Redis replica whose journal stopped says: `failure` (see
/// `redis::journal`), and why that stops it.
fn journal_refusal(failure: String) -> String {
    format!(
        "{failure}: a pin it could not journal would be missing from a restore after a Redis \
         loss, so this replica refuses what needs the store until it restarts once the disk is \
         fixed"
    )
}

impl PinStore for Store {
    async fn lookup_into(&self, keys: &[PinKey], found: &mut Bindings) -> Result<(), StoreError> {
        dispatch!(self, s => s.lookup_into(keys, found))
    }
    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_identity(identity))
    }
    async fn discard_identity(&self, id: IdentityId) -> Result<(), StoreError> {
        dispatch!(self, s => s.discard_identity(id))
    }
    async fn pin_if_absent(&self, key: PinKey, pin: &Pin) -> Result<Binding, StoreError> {
        dispatch!(self, s => s.pin_if_absent(key, pin))
    }
    async fn pin_all_if_absent(&self, pins: &[(PinKey, Pin)]) -> Result<Vec<Binding>, StoreError> {
        dispatch!(self, s => s.pin_all_if_absent(pins))
    }
    async fn found_identity(
        &self,
        identity: &Identity,
        pins: &[(PinKey, Pin)],
    ) -> Result<Founding, StoreError> {
        dispatch!(self, s => s.found_identity(identity, pins))
    }
    async fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.touch(id, now_ms, requests, worked, egress))
    }
    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        dispatch!(self, s => s.record_egress(id, ip))
    }
    async fn extend_pin(
        &self,
        key: PinKey,
        pinned: &Pin,
        expires_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.extend_pin(key, pinned, expires_ms))
    }
    async fn read_identity(&self, id: IdentityId) -> Result<Option<Identity>, StoreError> {
        dispatch!(self, s => s.read_identity(id))
    }
    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        dispatch!(self, s => s.retire(id, retirement))
    }
    async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        dispatch!(self, s => s.list())
    }
    async fn count(&self) -> Result<Counts, StoreError> {
        dispatch!(self, s => s.count())
    }
    async fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &Expiry<'_>,
    ) -> Result<Swept, StoreError> {
        dispatch!(self, s => s.sweep(now_ms, keep_retired_ms, expiry))
    }
    async fn record_exit_death(&self, exit: &ExitId, at_ms: u64) -> Result<(), StoreError> {
        dispatch!(self, s => s.record_exit_death(exit, at_ms))
    }
    async fn exit_deaths(&self) -> Result<Vec<(ExitId, u64)>, StoreError> {
        dispatch!(self, s => s.exit_deaths())
    }
}

/// The configured store with every operation timed
/// (`pinproxy_store_op_seconds{store, op}`). What routing holds; it
/// dereferences to the [`Store`] for everything that is not an operation.
#[derive(Debug)]
pub struct TimedStore {
    store: Store,
    timers: StoreTimers,
    /// The cookie names pin writes are judged by.
    pinnable: pinnable::PinnableNames,
}

/// One histogram per operation, resolved once.
#[derive(Debug)]
struct StoreTimers {
    lookup: Histogram,
    create: Histogram,
    discard: Histogram,
    pin: Histogram,
    pin_all: Histogram,
    found: Histogram,
    touch: Histogram,
    record_egress: Histogram,
    read_identity: Histogram,
    extend_pin: Histogram,
    retire: Histogram,
    list: Histogram,
    count: Histogram,
    sweep: Histogram,
    record_exit_death: Histogram,
    exit_deaths: Histogram,
}

impl TimedStore {
    /// `store`, timed into `metrics`.
    pub fn new(store: Store, metrics: &crate::metrics::Metrics) -> TimedStore {
        let kind = store.kind();
        let timer = |op| metrics.store_timer(kind, op);
        let timers = StoreTimers {
            lookup: timer("lookup"),
            create: timer("create"),
            discard: timer("discard"),
            pin: timer("pin"),
            pin_all: timer("pin-all"),
            found: timer("found-identity"),
            touch: timer("touch"),
            record_egress: timer("record-egress"),
            read_identity: timer("read-identity"),
            extend_pin: timer("extend-pin"),
            retire: timer("retire"),
            list: timer("list"),
            count: timer("count"),
            sweep: timer("sweep"),
            record_exit_death: timer("record-exit-death"),
            exit_deaths: timer("exit-deaths"),
        };
        TimedStore {
            store,
            timers,
            pinnable: pinnable::PinnableNames::default(),
        }
    }

    /// The cookie names new pins may be made of (see [`pinnable`]).
    pub fn pinnable(&self) -> &pinnable::PinnableNames {
        &self.pinnable
    }

    /// The store itself.
    pub fn inner(&self) -> &Store {
        &self.store
    }
}

impl std::ops::Deref for TimedStore {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

/// Awaits `operation` where it stands, observing how long it took in
/// `histogram`. A macro, not a function: a future passed to an async
/// function is moved into that function's own future, a copy of a few
/// hundred bytes on every lookup and touch.
macro_rules! timed {
    ($histogram:expr, $operation:expr $(,)?) => {{
        let started = std::time::Instant::now();
        let result = $operation.await;
        $histogram.observe(started.elapsed().as_secs_f64());
        result
    }};
}

impl PinStore for TimedStore {
    async fn lookup_into(&self, keys: &[PinKey], found: &mut Bindings) -> Result<(), StoreError> {
        timed!(self.timers.lookup, self.store.lookup_into(keys, found))
    }
    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        timed!(self.timers.create, self.store.create_identity(identity))
    }
    async fn discard_identity(&self, id: IdentityId) -> Result<(), StoreError> {
        timed!(self.timers.discard, self.store.discard_identity(id))
    }
    // The three pin writes hold the names' gate to their end.
    async fn pin_if_absent(&self, key: PinKey, pin: &Pin) -> Result<Binding, StoreError> {
        let _admitted = self.pinnable.admit([(&key, pin)]).await?;
        timed!(self.timers.pin, self.store.pin_if_absent(key, pin))
    }
    async fn pin_all_if_absent(&self, pins: &[(PinKey, Pin)]) -> Result<Vec<Binding>, StoreError> {
        let _admitted = self
            .pinnable
            .admit(pins.iter().map(|(k, p)| (k, p)))
            .await?;
        timed!(self.timers.pin_all, self.store.pin_all_if_absent(pins))
    }
    async fn found_identity(
        &self,
        identity: &Identity,
        pins: &[(PinKey, Pin)],
    ) -> Result<Founding, StoreError> {
        let _admitted = self
            .pinnable
            .admit(pins.iter().map(|(k, p)| (k, p)))
            .await?;
        timed!(self.timers.found, self.store.found_identity(identity, pins))
    }
    async fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) -> Result<(), StoreError> {
        timed!(
            self.timers.touch,
            self.store.touch(id, now_ms, requests, worked, egress),
        )
    }
    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        timed!(self.timers.record_egress, self.store.record_egress(id, ip))
    }
    async fn extend_pin(
        &self,
        key: PinKey,
        pinned: &Pin,
        expires_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        timed!(
            self.timers.extend_pin,
            self.store.extend_pin(key, pinned, expires_ms)
        )
    }
    async fn read_identity(&self, id: IdentityId) -> Result<Option<Identity>, StoreError> {
        timed!(self.timers.read_identity, self.store.read_identity(id))
    }
    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        timed!(self.timers.retire, self.store.retire(id, retirement))
    }
    async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        timed!(self.timers.list, self.store.list())
    }
    async fn count(&self) -> Result<Counts, StoreError> {
        timed!(self.timers.count, self.store.count())
    }
    async fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &Expiry<'_>,
    ) -> Result<Swept, StoreError> {
        // The retirements it decides are counted by the caller's `expiry`
        // (routing's, which counts each identity once).
        timed!(
            self.timers.sweep,
            self.store.sweep(now_ms, keep_retired_ms, expiry),
        )
    }
    async fn record_exit_death(&self, exit: &ExitId, at_ms: u64) -> Result<(), StoreError> {
        timed!(
            self.timers.record_exit_death,
            self.store.record_exit_death(exit, at_ms),
        )
    }
    async fn exit_deaths(&self) -> Result<Vec<(ExitId, u64)>, StoreError> {
        timed!(self.timers.exit_deaths, self.store.exit_deaths())
    }
}
