//! The in-process pin store: sharded concurrent maps of pins and identities
//! (no global lock). On its own, pins die with the process; the durable
//! store keeps its working set in one of these.
//!
//! Records are kept compact, because a million pins must fit in a few
//! hundred megabytes: exit ids and cookie names are interned (a fleet has
//! few of each; names no pin refers to any more are let go of at the
//! sweep) and referred to by small indexes, equal fingerprints are
//! shared (see [`SharedFingerprints`]), and the rarely set retirement is
//! boxed. [`Identity`] and [`Pin`] are rebuilt from these on the way out.

use std::collections::HashSet;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::{Binding, Bindings, Counts, Expiry, Listing, PinStore, StoreError, Swept};
use crate::credential::PinKind;
use crate::credential::{PinKey, RandomKeys};
use crate::fingerprint::Fingerprint;
use crate::identity::{ExitId, FoundingRoute, Identity, IdentityId, Pin, Retirement, SessionId};

/// Values interned first, read without a lock: every pin hit reads a
/// cookie name and an exit back, and a fleet has few of each, while a
/// map's read lock is a write both cores make to one line.
const UNLOCKED_VALUES: usize = 256;

/// Values stored once and referred to by index.
///
/// Cookie names are interned as sent when a pattern matches them (the
/// default `incap_ses_*` and `_px*` among them), so an origin that keeps
/// inventing names would grow an interner that never forgot. Values past
/// the unlocked ones are therefore let go of once no record refers to them
/// (see [`Interner::prune`]), and their indexes are handed out again only
/// when free.
#[derive(Debug)]
struct Interner<T: Eq + Hash + Clone> {
    /// Keyed by the values (names a client may spell): SipHash.
    ids: DashMap<T, u32>,
    /// The first [`UNLOCKED_VALUES`] values, by index, each set once and
    /// kept for the life of the process.
    first: Box<[OnceLock<T>]>,
    /// The values after those, keyed by the indexes this interner hands
    /// out, which no client chooses: a fast hasher.
    rest: DashMap<u32, T, foldhash::fast::RandomState>,
    /// Indexes handed out so far; past `u32`'s range they cycle through
    /// the `rest` indexes again, skipping those still held.
    next: AtomicU64,
}

impl<T: Eq + Hash + Clone> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            ids: DashMap::new(),
            first: (0..UNLOCKED_VALUES).map(|_| OnceLock::new()).collect(),
            rest: DashMap::default(),
            next: AtomicU64::new(0),
        }
    }
}

impl<T: Eq + Hash + Clone> Interner<T> {
    /// The index of `value`, interned now if it is new.
    ///
    /// A caller that stores the index in a record must call this under the
    /// lock of the map that will hold the record (see
    /// [`MemoryStore::pin_record`]): that is what lets a prune see every
    /// index handed out before it began.
    fn intern(&self, value: &T) -> u32 {
        if let Some(id) = self.ids.get(value) {
            return *id;
        }
        // The entry lock makes concurrent first sights agree on one index,
        // and holds readers of the index off until the value is in place.
        *self
            .ids
            .entry(value.clone())
            .or_insert_with(|| self.allocate(value))
    }

    /// A new index for `value`, with the value in place behind it.
    fn allocate(&self, value: &T) -> u32 {
        let cycle = u64::from(u32::MAX) - UNLOCKED_VALUES as u64;
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            if let Some(slot) = self.first.get(n as usize) {
                // The counter never comes back below the unlocked ones, so
                // this slot was never set.
                drop(slot.set(value.clone()));
                return n as u32;
            }
            // Past them, indexes cycle (after four billion names) and one
            // still held is skipped. This ends: the held values are far
            // fewer than the indexes, since each costs memory.
            let offset = (n - UNLOCKED_VALUES as u64) % cycle;
            let id = UNLOCKED_VALUES as u32 + offset as u32;
            if let Entry::Vacant(slot) = self.rest.entry(id) {
                slot.insert(value.clone());
                return id;
            }
        }
    }

    fn get(&self, id: u32) -> Option<T> {
        match self.first.get(id as usize) {
            Some(slot) => slot.get().cloned(),
            None => self.rest.get(&id).map(|v| v.clone()),
        }
    }

    /// Lets go of the values past the unlocked ones whose indexes `held`
    /// does not report, in two steps a prune apart; returns how many
    /// values went.
    ///
    /// `held` must say whether any record refers to an index, as read after
    /// the previous prune ended. The first prune that finds an index unused
    /// stops handing it out (a new sight of its value gets a new index);
    /// the next one, if the index is still unused, lets the value go. An
    /// index read before the first step was read under the lock of the
    /// record's map and is in that map before the lock is released (see
    /// [`Interner::intern`]), so the reading that decides the second step
    /// sees it.
    fn prune(&self, held: impl Fn(u32) -> bool) -> usize {
        if self.rest.is_empty() {
            return 0;
        }
        // Read first, changed after: `intern` locks `ids` then `rest`, so
        // this never holds a lock of one while taking the other's.
        let unused: Vec<(u32, T)> = self
            .rest
            .iter()
            .filter(|entry| !held(*entry.key()))
            .map(|entry| (*entry.key(), entry.value().clone()))
            .collect();
        let mut released = 0;
        for (id, value) in unused {
            let handed_out = self.ids.remove_if(&value, |_, current| *current == id);
            if handed_out.is_none() && self.rest.remove(&id).is_some() {
                released += 1;
            }
        }
        released
    }

    /// Values held past the unlocked ones.
    #[cfg(test)]
    fn held_past_unlocked(&self) -> usize {
        self.rest.len()
    }
}

/// One shared value per distinct fingerprint of the identities held, so a
/// fleet of equal clients keeps one copy, not one per identity.
///
/// Unlike exit ids and cookie names, fingerprints keep coming: a fleet that
/// gives each identity a `User-Agent` or `Accept-Language` of its own (as
/// scrapers commonly do) founds every identity with a fingerprint of its
/// own, about 2 KB with the ClientHello it holds. So identities hold their
/// fingerprint themselves, and this set only finds an equal one to share:
/// [`SharedFingerprints::prune`] lets go of those no identity holds any
/// more, and memory follows the identities alive rather than all there ever
/// were.
#[derive(Debug, Default)]
struct SharedFingerprints {
    /// Keyed by the values (a client shapes them): SipHash.
    values: DashMap<Arc<Fingerprint>, ()>,
}

impl SharedFingerprints {
    /// The shared value equal to `fingerprint` (it becomes the shared one
    /// when none is held).
    fn share(&self, fingerprint: &Arc<Fingerprint>) -> Arc<Fingerprint> {
        // The clone is taken under the shard's lock, which `prune` needs to
        // drop an entry: a value handed out here is never one being let go.
        if let Some(shared) = self.values.get(fingerprint) {
            return shared.key().clone();
        }
        self.values
            .entry(fingerprint.clone())
            .or_insert(())
            .key()
            .clone()
    }

    /// Lets go of the values only this set holds (no identity, nor anything
    /// read from one, refers to them); returns how many.
    fn prune(&self) -> usize {
        let before = self.values.len();
        self.values.retain(|value, ()| Arc::strong_count(value) > 1);
        before.saturating_sub(self.values.len())
    }

    /// Distinct fingerprints held.
    fn len(&self) -> usize {
        self.values.len()
    }
}

/// A pin as held in memory.
#[derive(Clone, Debug)]
struct PinRecord {
    identity: u64,
    created_ms: u64,
    /// 0: no expiry.
    expires_ms: u64,
    name: u32,
    session_key: bool,
}

/// An identity as held in memory.
#[derive(Clone, Debug)]
struct IdentityRecord {
    session: u64,
    session_started_ms: u64,
    created_ms: u64,
    last_used_ms: u64,
    retired: Option<Box<Retirement>>,
    egress_ip: Option<IpAddr>,
    requests: u32,
    /// Shared with every identity whose fingerprint is equal.
    fingerprint: Arc<Fingerprint>,
    exit: u32,
    /// Its founding route, interned: an exit's routes are few.
    route: u32,
    worked: bool,
    /// Touched since a durable store last wrote it (see
    /// [`MemoryStore::touch_unwritten`]).
    unwritten: bool,
}

/// Pins and identities held in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    // Keys are random (see `RandomKeys`): no second hash per lookup.
    pins: DashMap<PinKey, PinRecord, RandomKeys>,
    identities: DashMap<IdentityId, IdentityRecord, RandomKeys>,
    exits: Interner<ExitId>,
    /// Identities' founding routes: a handful per exit (one per route it
    /// ever had), never let go of.
    routes: Interner<Option<FoundingRoute>>,
    names: Interner<Arc<str>>,
    fingerprints: SharedFingerprints,
    exit_deaths: DashMap<ExitId, u64>,
    /// Held through a sweep: the names' prune relies on its reading of the
    /// pins coming after the previous prune (see [`Interner::prune`]).
    sweeping: Mutex<()>,
    /// The latest time a record loaded from disk was stamped with (0:
    /// nothing loaded).
    newest_loaded_ms: AtomicU64,
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
    /// Distinct fingerprints let go of: no identity held refers to them.
    pub released_fingerprints: usize,
    /// Interned cookie names let go of: no pin held refers to them.
    pub released_names: usize,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// An empty store with room for this many pins and identities (loading
    /// a durable store: no rehashing on the way).
    pub fn with_capacity(pins: usize, identities: usize) -> MemoryStore {
        MemoryStore {
            pins: DashMap::with_capacity_and_hasher(pins, RandomKeys),
            identities: DashMap::with_capacity_and_hasher(identities, RandomKeys),
            ..MemoryStore::default()
        }
    }

    /// The latest time a record loaded from disk was stamped with (its
    /// creation, last use or retirement; 0: nothing loaded): about when
    /// the process that wrote the store stopped.
    pub fn newest_loaded_ms(&self) -> u64 {
        self.newest_loaded_ms.load(Ordering::Relaxed)
    }

    /// Records [`MemoryStore::newest_loaded_ms`] (loading a store).
    pub(crate) fn set_newest_loaded_ms(&self, ms: u64) {
        self.newest_loaded_ms.store(ms, Ordering::Relaxed);
    }

    /// The record of `pin`; called under the lock of the entry it goes in
    /// (see [`Interner::intern`]).
    fn pin_record(&self, pin: &Pin) -> PinRecord {
        PinRecord {
            identity: pin.identity.0,
            created_ms: pin.created_ms,
            expires_ms: pin.expires_ms.unwrap_or(0),
            name: self.names.intern(&pin.name),
            session_key: pin.kind == PinKind::SessionKey,
        }
    }

    fn to_pin(&self, record: &PinRecord) -> Pin {
        Pin {
            identity: IdentityId(record.identity),
            kind: if record.session_key {
                PinKind::SessionKey
            } else {
                PinKind::Cookie
            },
            name: self
                .names
                .get(record.name)
                .unwrap_or_else(|| Arc::from("?")),
            created_ms: record.created_ms,
            expires_ms: (record.expires_ms != 0).then_some(record.expires_ms),
        }
    }

    fn identity_record(&self, identity: &Identity) -> IdentityRecord {
        IdentityRecord {
            session: identity.session.0,
            session_started_ms: identity.session_started_ms,
            created_ms: identity.created_ms,
            last_used_ms: identity.last_used_ms,
            retired: identity.retired.clone().map(Box::new),
            egress_ip: identity.egress_ip,
            requests: u32::try_from(identity.requests).unwrap_or(u32::MAX),
            fingerprint: self.fingerprints.share(&identity.fingerprint),
            exit: self.exits.intern(&identity.exit),
            route: self.routes.intern(&identity.route),
            worked: identity.worked,
            unwritten: false,
        }
    }

    fn to_identity(&self, id: IdentityId, record: &IdentityRecord) -> Identity {
        Identity {
            id,
            exit: self
                .exits
                .get(record.exit)
                .unwrap_or_else(|| ExitId::new("?")),
            session: SessionId(record.session),
            session_started_ms: record.session_started_ms,
            created_ms: record.created_ms,
            egress_ip: record.egress_ip,
            fingerprint: record.fingerprint.clone(),
            last_used_ms: record.last_used_ms,
            requests: u64::from(record.requests),
            worked: record.worked,
            retired: record.retired.as_deref().cloned(),
            // An index never handed out cannot be read here; were it, the
            // identity would carry no route and the book would judge it.
            route: self.routes.get(record.route).flatten(),
        }
    }

    /// Inserts an identity as it is (loading a durable store).
    pub fn insert_identity(&self, identity: &Identity) {
        self.identities
            .insert(identity.id, self.identity_record(identity));
    }

    /// Inserts a pin as it is (loading a durable store).
    pub fn insert_pin(&self, key: PinKey, pin: &Pin) {
        // The entry first: its name is interned under the entry's lock.
        let entry = self.pins.entry(key);
        entry.insert(self.pin_record(pin));
    }

    /// The identity with this id.
    pub fn identity(&self, id: IdentityId) -> Option<Identity> {
        self.identities.get(&id).map(|r| self.to_identity(id, &r))
    }

    /// Whether identity `id` is held.
    pub fn holds_identity(&self, id: IdentityId) -> bool {
        self.identities.contains_key(&id)
    }

    /// The retirement of identity `id`, if it is held and retired.
    pub fn retirement(&self, id: IdentityId) -> Option<Retirement> {
        self.identities.get(&id)?.retired.as_deref().cloned()
    }

    /// Records a use of identity `id`, as [`PinStore::touch`] does; true
    /// when this is its first since [`MemoryStore::identity_to_write`] read
    /// it (or ever). A durable store that writes touched identities lazily
    /// thus queues one once per write, not once per request.
    pub fn touch_unwritten(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) -> bool {
        let Some(mut record) = self.identities.get_mut(&id) else {
            return false;
        };
        // An answer that arrives after a retirement is no use of the
        // identity (a Redis restore judges an idle one's idleness again
        // from its last use).
        if record.retired.is_none() {
            record.last_used_ms = record.last_used_ms.max(now_ms);
        }
        record.requests = record.requests.saturating_add(requests);
        record.worked |= worked;
        if let Some(ip) = egress {
            record.egress_ip.get_or_insert(ip);
        }
        !std::mem::replace(&mut record.unwritten, true)
    }

    /// The identity with this id, as it is to be written: under the same
    /// lock, it counts as written, so the next touch is news again (a touch
    /// before this read is in what it returns).
    pub fn identity_to_write(&self, id: IdentityId) -> Option<Identity> {
        self.identities.get_mut(&id).map(|mut record| {
            record.unwritten = false;
            self.to_identity(id, &record)
        })
    }

    /// The pin of `key`.
    pub fn pin(&self, key: &PinKey) -> Option<Pin> {
        self.pins.get(key).map(|p| self.to_pin(&p))
    }

    /// Pins and identities held.
    pub fn sizes(&self) -> (usize, usize) {
        (self.pins.len(), self.identities.len())
    }

    /// The distinct cookie names the pins held were made for (session-key
    /// pins name no cookie). Walks every pin: for start and reload.
    pub fn held_cookie_names(&self) -> Vec<Arc<str>> {
        let ids: HashSet<u32> = self
            .pins
            .iter()
            .filter(|pin| !pin.session_key)
            .map(|pin| pin.name)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.names.get(id))
            .collect()
    }

    /// Distinct fingerprints held for the identities (and for values read
    /// from them still in use; a sweep lets go of the rest).
    pub fn distinct_fingerprints(&self) -> usize {
        self.fingerprints.len()
    }

    /// Sweeps like [`PinStore::sweep`] and says what changed.
    pub fn sweep_collect(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &Expiry<'_>,
    ) -> SweepChanges {
        let _sweeping = self
            .sweeping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut changes = SweepChanges::default();
        self.identities.retain(|id, record| match &record.retired {
            Some(r) if r.at_ms.saturating_add(keep_retired_ms) <= now_ms => {
                changes.removed_identities.push(*id);
                false
            }
            Some(_) => true,
            None => {
                if let Some(retirement) = expiry(&self.to_identity(*id, record)) {
                    record.retired = Some(Box::new(retirement));
                    changes.retired.push(*id);
                }
                true
            }
        });
        // The names the pins kept refer to, past the unlocked ones (a fleet
        // whose names all fit there collects none).
        let mut names_held = HashSet::new();
        self.pins.retain(|key, pin| {
            let keep = self.identities.contains_key(&IdentityId(pin.identity))
                && (pin.expires_ms == 0 || pin.expires_ms.saturating_add(keep_retired_ms) > now_ms);
            if !keep {
                changes.removed_pins.push(*key);
            } else if pin.name as usize >= UNLOCKED_VALUES {
                names_held.insert(pin.name);
            }
            keep
        });
        // After the identities and pins: those just forgotten let go of
        // their fingerprints and names.
        changes.released_fingerprints = self.fingerprints.prune();
        changes.released_names = self.names.prune(|id| names_held.contains(&id));
        changes
    }

    /// Records an exit's death time (keeps the latest).
    pub fn set_exit_death(&self, exit: &ExitId, at_ms: u64) {
        let mut entry = self.exit_deaths.entry(exit.clone()).or_insert(0);
        *entry = (*entry).max(at_ms);
    }
}

impl PinStore for MemoryStore {
    async fn lookup_into(
        &self,
        keys: &[PinKey],
        bindings: &mut Bindings,
    ) -> Result<(), StoreError> {
        // A request's credentials usually share one identity: read it once
        // and hand the later pins the same reading.
        bindings.reserve(keys.len());
        for key in keys {
            let binding = self.pins.get(key).map(|record| {
                let pin = self.to_pin(&record);
                let identity = match bindings
                    .iter()
                    .flatten()
                    .find(|b| b.pin.identity == pin.identity)
                {
                    Some(earlier) => earlier.identity.clone(),
                    None => self.identity(pin.identity).map(Arc::new),
                };
                Binding { pin, identity }
            });
            bindings.push(binding);
        }
        Ok(())
    }

    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        // A new identity's id is random and unheard of. One that is known
        // comes from an import (`pinproxy store import`) and is merged as
        // the Redis store merges it: the record stands, so do its first
        // retirement and its first egress address, and the latest use
        // wins; an older export never brings back an identity that was
        // evicted or invalidated since.
        // Merged under the entry's lock: a retirement, a use or an egress
        // address recorded meanwhile by a request (the Redis store's
        // journal merges every identity it is handed) is never written
        // over. (The interning below takes the exits' and fingerprints'
        // locks under this one, in the order the sweep takes them.)
        match self.identities.entry(identity.id) {
            Entry::Vacant(slot) => {
                slot.insert(self.identity_record(identity));
            }
            Entry::Occupied(mut slot) => {
                let known = slot.get_mut();
                if known.retired.is_none() {
                    known.retired = identity.retired.clone().map(Box::new);
                }
                known.egress_ip = known.egress_ip.or(identity.egress_ip);
                known.last_used_ms = known.last_used_ms.max(identity.last_used_ms);
                // A record written without its founding route (by a
                // release that did not know it) takes the one it is
                // handed: one more check, never one less.
                if identity.route.is_some() && self.routes.get(known.route).flatten().is_none() {
                    known.route = self.routes.intern(&identity.route);
                }
            }
        }
        Ok(())
    }

    async fn discard_identity(&self, id: IdentityId) -> Result<(), StoreError> {
        self.identities.remove(&id);
        Ok(())
    }

    async fn pin_if_absent(&self, key: PinKey, pin: &Pin) -> Result<Binding, StoreError> {
        // The entry holds the shard's write lock, so check-and-insert is
        // atomic; the name is interned and read back under it.
        let pin = match self.pins.entry(key) {
            Entry::Occupied(existing) => self.to_pin(existing.get()),
            Entry::Vacant(slot) => self.to_pin(&slot.insert(self.pin_record(pin))),
        };
        let identity = self.identity(pin.identity).map(Arc::new);
        Ok(Binding { pin, identity })
    }

    async fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        requests: u32,
        worked: bool,
        egress: Option<IpAddr>,
    ) -> Result<(), StoreError> {
        self.touch_unwritten(id, now_ms, requests, worked, egress);
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
            .map(|mut record| *record.egress_ip.get_or_insert(ip)))
    }

    async fn extend_pin(
        &self,
        key: PinKey,
        pinned: &Pin,
        expires_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        if let Some(mut record) = self.pins.get_mut(&key) {
            let held = (record.expires_ms != 0).then_some(record.expires_ms);
            if record.identity == pinned.identity.0 && super::expires_later(expires_ms, held) {
                record.expires_ms = expires_ms.unwrap_or(0);
            }
        }
        Ok(())
    }

    async fn read_identity(&self, id: IdentityId) -> Result<Option<Identity>, StoreError> {
        Ok(self.identity(id))
    }

    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        if let Some(mut record) = self.identities.get_mut(&id) {
            // The first retirement stands: its reason is the real one.
            record
                .retired
                .get_or_insert_with(|| Box::new(retirement.clone()));
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        let mut listings: Vec<Listing> = self
            .identities
            .iter()
            .map(|r| Listing {
                identity: self.to_identity(*r.key(), r.value()),
                pins: Vec::new(),
            })
            .collect();
        let index: std::collections::HashMap<IdentityId, usize> = listings
            .iter()
            .enumerate()
            .map(|(n, l)| (l.identity.id, n))
            .collect();
        for pin in self.pins.iter() {
            if let Some(&n) = index.get(&IdentityId(pin.identity)) {
                listings[n]
                    .pins
                    .push((*pin.key(), self.to_pin(pin.value())));
            }
        }
        Ok(listings)
    }

    async fn count(&self) -> Result<Counts, StoreError> {
        let retired = self
            .identities
            .iter()
            .filter(|r| r.retired.is_some())
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
        expiry: &Expiry<'_>,
    ) -> Result<Swept, StoreError> {
        let changes = self.sweep_collect(now_ms, keep_retired_ms, expiry);
        Ok(Swept {
            pins: changes.removed_pins.len() as u64,
            identities: changes.removed_identities.len() as u64,
            retired: changes.retired.len() as u64,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::RetireReason;
    use crate::identity::SessionId;

    fn with_agent(agent: &str) -> Identity {
        let fingerprint = Fingerprint::of_user_agent(agent);
        Identity::new(ExitId::new("e1"), SessionId(1), 10, fingerprint, 10)
    }

    /// An identity's founding route is kept with it, and a record that has
    /// none (written by a release without routes) takes the one a merge
    /// brings; one that has its own keeps it.
    #[tokio::test]
    async fn the_founding_route_is_kept_and_a_merge_only_adds_it() {
        use crate::identity::{FoundingRoute, RouteHash};
        let store = MemoryStore::new();
        let route = |n| {
            Some(FoundingRoute {
                route: RouteHash(n),
                face: RouteHash(n + 1),
            })
        };
        let mut routed = with_agent("a");
        routed.route = route(10);
        let unrouted = with_agent("b");
        for identity in [&routed, &unrouted] {
            store.create_identity(identity).await.unwrap();
        }
        for (identity, merged, want) in [(&routed, 20, 10), (&unrouted, 30, 30)] {
            assert_eq!(store.identity(identity.id).unwrap().route, identity.route);
            let mut again = identity.clone();
            again.route = route(merged);
            store.create_identity(&again).await.unwrap();
            assert_eq!(store.identity(identity.id).unwrap().route, route(want));
        }
    }

    /// The Redis store's journal merges every identity it is handed while
    /// requests retire identities: a retirement made between the merge's
    /// reading and its writing was lost (a race; the rounds make it show).
    #[test]
    fn a_merge_never_undoes_a_retirement_made_meanwhile() {
        use crate::identity::{RetireReason, Retirement};
        const ROUNDS: usize = 20_000;
        fn run<F: std::future::Future>(future: F) -> F::Output {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(future)
        }
        let store = Arc::new(MemoryStore::new());
        let identities: Vec<Identity> = (0..ROUNDS).map(|_| with_agent("agent/1")).collect();
        run(async {
            for identity in &identities {
                store.create_identity(identity).await.unwrap();
            }
        });
        let retirement = Retirement {
            reason: RetireReason::Evicted,
            at_ms: 20,
        };
        let retiring = {
            let (store, ids) = (
                store.clone(),
                identities.iter().map(|i| i.id).collect::<Vec<_>>(),
            );
            std::thread::spawn(move || {
                run(async {
                    for id in ids {
                        store.retire(id, &retirement).await.unwrap();
                    }
                })
            })
        };
        run(async {
            for identity in &identities {
                store.create_identity(identity).await.unwrap();
            }
        });
        retiring.join().unwrap();
        let live = identities
            .iter()
            .filter(|i| store.identity(i.id).is_some_and(|i| i.retired.is_none()))
            .count();
        assert_eq!(live, 0, "retirements undone by a merge");
    }

    #[tokio::test]
    async fn equal_fingerprints_are_shared_and_let_go_of_with_their_identities() {
        let store = MemoryStore::new();
        // Two clients with equal fingerprints, each read afresh (as two
        // connections' are), and a third that differs.
        let first = with_agent("agent/1");
        let second = with_agent("agent/1");
        let third = with_agent("agent/2");
        for identity in [&first, &second, &third] {
            store
                .create_identity(identity)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let read = |id| {
            store
                .identity(id)
                .unwrap_or_else(|| panic!("identity {id} is held"))
                .fingerprint
        };
        assert!(
            Arc::ptr_eq(&read(first.id), &read(second.id)),
            "equal: one value"
        );
        assert!(!Arc::ptr_eq(&read(first.id), &read(third.id)));
        assert_eq!(read(third.id), third.fingerprint);
        assert_eq!(store.distinct_fingerprints(), 2);
        // What the test built holds its values too: only the ids go on.
        let ids = (first.id, second.id, third.id);
        drop((first, second, third));
        let (first, second, third) = ids;

        // Retired and past their keep: the sweep forgets the first two
        // identities and lets go of their fingerprint, not of the third's.
        let evicted = Retirement {
            reason: RetireReason::Evicted,
            at_ms: 20,
        };
        for id in [first, second] {
            store
                .retire(id, &evicted)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let swept = store.sweep_collect(1_000, 100, &|_| None);
        assert_eq!(swept.removed_identities.len(), 2);
        assert_eq!(swept.released_fingerprints, 1);
        assert_eq!(store.distinct_fingerprints(), 1);
        assert_eq!(read(third).get("user-agent"), Some("agent/2"));

        // A value read from an identity and still in use is kept until the
        // sweep after its last use.
        let in_use = read(third);
        store
            .retire(third, &evicted)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            store
                .sweep_collect(1_000, 100, &|_| None)
                .released_fingerprints,
            0
        );
        assert_eq!(store.distinct_fingerprints(), 1);
        drop(in_use);
        assert_eq!(
            store
                .sweep_collect(1_000, 100, &|_| None)
                .released_fingerprints,
            1
        );
        assert_eq!(store.distinct_fingerprints(), 0);
    }

    #[test]
    fn interned_values_read_back_by_index_past_the_unlocked_ones() {
        let interner: Interner<Arc<str>> = Interner::default();
        let values: Vec<Arc<str>> = (0..UNLOCKED_VALUES + 44)
            .map(|i| Arc::from(format!("cookie{i}")))
            .collect();
        let ids: Vec<u32> = values.iter().map(|v| interner.intern(v)).collect();
        for (value, id) in values.iter().zip(&ids) {
            assert_eq!(
                interner.intern(value),
                *id,
                "a second sight keeps its index"
            );
            assert_eq!(interner.get(*id).as_deref(), Some(&**value));
        }
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), values.len());
        assert_eq!(interner.get(u32::MAX), None);
    }

    /// A key the store's hasher spreads (it reads the key's own bytes).
    fn key(n: u64) -> PinKey {
        let mixed = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1;
        PinKey::from_bytes(mixed.to_le_bytes())
    }

    fn cookie_pin(identity: IdentityId, name: &str, expires_ms: Option<u64>) -> Pin {
        Pin {
            identity,
            kind: PinKind::Cookie,
            name: Arc::from(name),
            created_ms: 10,
            expires_ms,
        }
    }

    #[tokio::test]
    async fn names_an_origin_keeps_inventing_are_let_go_of_with_their_pins() {
        let store = MemoryStore::new();
        let identity = with_agent("agent/1");
        store
            .create_identity(&identity)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // A fleet's own names fill the unlocked slots and stay for good.
        for n in 0..UNLOCKED_VALUES as u64 {
            let pin = cookie_pin(identity.id, &format!("fleet{n}"), None);
            store.insert_pin(key(n), &pin);
        }
        // Then an origin sets a new name on every response (`_px<random>`
        // matches a default pattern and is pinned as sent); each cookie
        // expires at 20, and one that does not is kept.
        let invented = 500u64;
        for n in 0..invented {
            let pin = cookie_pin(identity.id, &format!("_px{n}"), Some(20));
            store
                .pin_if_absent(key(1_000 + n), &pin)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let kept = cookie_pin(identity.id, "_pxkept", None);
        let bound = store
            .pin_if_absent(key(5_000), &kept)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&*bound.pin.name, "_pxkept");
        assert_eq!(store.names.held_past_unlocked(), invented as usize + 1);

        // The first sweep forgets the expired pins and stops handing their
        // names' indexes out; the second lets the names go.
        let first = store.sweep_collect(1_000, 100, &|_| None);
        assert_eq!(first.removed_pins.len(), invented as usize);
        assert_eq!(first.released_names, 0);
        assert_eq!(store.names.held_past_unlocked(), invented as usize + 1);
        let second = store.sweep_collect(1_000, 100, &|_| None);
        assert_eq!(second.released_names, invented as usize);
        assert_eq!(store.names.held_past_unlocked(), 1, "only the kept pin's");

        // What is held reads back whole, the fleet's names and the kept one.
        let read = |n| store.pin(&key(n)).map(|pin| pin.name.to_string());
        assert_eq!(read(7).as_deref(), Some("fleet7"));
        assert_eq!(read(5_000).as_deref(), Some("_pxkept"));
        assert_eq!(read(1_000), None);
        for _ in 0..3 {
            assert_eq!(store.sweep_collect(1_000, 100, &|_| None).released_names, 0);
        }
        assert_eq!(read(5_000).as_deref(), Some("_pxkept"));

        // A name seen again after it went is interned afresh.
        let again = cookie_pin(identity.id, "_px3", None);
        let bound = store
            .pin_if_absent(key(6_000), &again)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&*bound.pin.name, "_px3");
        assert_eq!(read(6_000).as_deref(), Some("_px3"));
    }

    #[test]
    fn a_name_pinned_while_its_index_is_let_go_of_reads_back_whole() {
        // Two threads pin cookies whose names come and go (most expire at
        // once) while a third sweeps without pause: every pin held must
        // read back the name it was pinned with.
        let store = MemoryStore::new();
        let identity = with_agent("agent/1");
        store.insert_identity(&identity);
        for n in 0..UNLOCKED_VALUES as u64 {
            store.insert_pin(key(n), &cookie_pin(identity.id, &format!("fleet{n}"), None));
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        let kept: Vec<Vec<(PinKey, String)>> = std::thread::scope(|scope| {
            let pinners: Vec<_> = (0..2u64)
                .map(|thread| {
                    let (store, identity) = (&store, identity.id);
                    scope.spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap_or_else(|e| panic!("{e}"));
                        let mut kept = Vec::new();
                        for n in 0..4_000u64 {
                            let name = format!("_px{}", n % 37);
                            let keep = n % 5 == 0;
                            let pin = cookie_pin(identity, &name, (!keep).then_some(20));
                            let key = key(10_000 + thread * 100_000 + n);
                            let bound = runtime
                                .block_on(store.pin_if_absent(key, &pin))
                                .unwrap_or_else(|e| panic!("{e}"));
                            assert_eq!(*bound.pin.name, *name);
                            if keep {
                                kept.push((key, name));
                            }
                        }
                        kept
                    })
                })
                .collect();
            let sweeper = scope.spawn(|| {
                let mut sweeps = 0;
                while !done.load(Ordering::Relaxed) && sweeps < 100_000 {
                    store.sweep_collect(1_000, 100, &|_| None);
                    sweeps += 1;
                }
            });
            let joined: Vec<_> = pinners.into_iter().map(|pinner| pinner.join()).collect();
            // The sweeper stops before any failure is reported.
            done.store(true, Ordering::Relaxed);
            drop(sweeper.join());
            joined
                .into_iter()
                .map(|kept| kept.unwrap_or_else(|_| panic!("a pinner failed")))
                .collect()
        });
        for (key, name) in kept.iter().flatten() {
            let pin = store.pin(key).unwrap_or_else(|| panic!("{name} is held"));
            assert_eq!(*pin.name, **name);
        }
        // Once nothing refers to the expired ones, two sweeps leave only
        // the names the kept pins refer to. (One name may be under several
        // indexes: a prune that found an index unused stops handing it
        // out, and a pin that took it just before is then kept under it
        // while the name's next sight gets a new one; how many such
        // indexes the race leaves depends on the threads' timing.)
        store.sweep_collect(1_000, 100, &|_| None);
        store.sweep_collect(1_000, 100, &|_| None);
        let referred: HashSet<u32> = store
            .pins
            .iter()
            .map(|pin| pin.name)
            .filter(|&name| name as usize >= UNLOCKED_VALUES)
            .collect();
        assert!(referred.len() <= kept.iter().flatten().count());
        assert_eq!(store.names.held_past_unlocked(), referred.len());
    }

    #[test]
    fn indexes_past_the_range_come_round_and_skip_those_held() {
        let interner: Interner<Arc<str>> = Interner::default();
        let held: Arc<str> = Arc::from("held");
        let held_id = interner.intern(&held);
        assert_eq!(held_id, 0);
        for n in 1..UNLOCKED_VALUES {
            interner.intern(&Arc::from(format!("fleet{n}")));
        }
        let late: Arc<str> = Arc::from("late");
        let late_id = interner.intern(&late);
        assert_eq!(late_id as usize, UNLOCKED_VALUES);
        // Four billion names later, the counter comes round: the next
        // index is the first past the unlocked ones, which `late` holds.
        interner.next.store(u64::from(u32::MAX), Ordering::Relaxed);
        let round: Arc<str> = Arc::from("round");
        let round_id = interner.intern(&round);
        assert_eq!(round_id, late_id + 1, "the held index is skipped");
        assert_eq!(interner.get(late_id).as_deref(), Some("late"));
        assert_eq!(interner.get(round_id).as_deref(), Some("round"));
        assert_eq!(interner.get(held_id).as_deref(), Some("held"));
    }
}
