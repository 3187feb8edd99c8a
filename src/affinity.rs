//! Pipeline stage 4: decide which identity (and so which exit, upstream
//! session and egress address) a request belongs to, and the pin store that
//! makes the decision stick.
//!
//! Input: the request's credentials (tracked cookies and session key) and
//! its fingerprint. Output: a [`Route`], or an error that stops the request.
//!
//! Rules, in order:
//! - no credential: the next healthy exit in weighted rotation, on one of
//!   its anonymous sessions; no identity;
//! - a credential of a retired identity (or an expired cookie): by the
//!   retire policy, `fail` the request (502 `identity-retired`) or `strip`
//!   the credential and carry on without it;
//! - an identity that can no longer continue on its exit (exit gone or dead,
//!   sticky window over, idle or too old) is retired here, then as above;
//! - credentials of two live identities: by the conflict policy, `reject`
//!   (409) or keep the `oldest` identity and strip the others' credentials;
//! - one live identity: its exit and lane; new credentials join it;
//! - only unknown credentials: a new identity on the next healthy exit, all
//!   of them pinned to it with atomic pin-if-absent in key order, so two
//!   requests racing with the same new credential end on one identity.
//!
//! Invariant: a credential's identity never changes and an identity's exit
//! and upstream session never change. Nothing here moves a session; it can
//! only be retired.

pub mod bench;
pub mod durable;
pub mod memory;
pub mod redis;
pub mod transfer;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::cookies::{Credential, PinKey, SetTrackedCookie};
use crate::exits::health::HealthState;
use crate::exits::sessions::AnonymousSession;
use crate::exits::{Exit, ExitId, ExitSet};
use crate::fingerprint::Fingerprint;
use crate::identity::{Identity, IdentityId, Pin, PinKind, RetireReason, Retirement, SessionId};
use crate::metrics::{Metrics, Policy};
use crate::upstream::{Lane, PoolKey};

/// The pin store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("pin store unavailable: {0}")]
pub struct StoreError(pub String);

/// A pin and the identity it points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The pin.
    pub pin: Pin,
    /// Its identity, unless the record is gone.
    pub identity: Option<Identity>,
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
    fn lookup(
        &self,
        keys: &[PinKey],
    ) -> impl Future<Output = Result<Vec<Option<Binding>>, StoreError>> + Send;

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

    /// Records a request of identity `id` at `now_ms` (and whether it got a
    /// 2xx answer).
    fn touch(
        &self,
        id: IdentityId,
        now_ms: u64,
        worked: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records the identity's egress address unless one is recorded; returns
    /// the recorded one.
    fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> impl Future<Output = Result<Option<IpAddr>, StoreError>> + Send;

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

    /// Retires identities `expiry` says have ended, and forgets retired
    /// identities and expired pins older than `keep_retired_ms`.
    fn sweep(
        &self,
        now_ms: u64,
        keep_retired_ms: u64,
        expiry: &(dyn Fn(&Identity) -> Option<RetireReason> + Sync),
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
            Store::Redis($store) => $call.await,
        }
    };
}

impl Store {
    /// Flushes and closes the store (durable writes finish first).
    pub async fn close(&self) {
        if let Store::Durable(store) = self {
            store.close().await;
        }
    }

    /// Whether the store is answering (only a remote store can be down).
    pub fn available(&self) -> bool {
        match self {
            Store::Redis(store) => store.is_available(),
            Store::Memory(_) | Store::Durable(_) => true,
        }
    }
}

impl PinStore for Store {
    async fn lookup(&self, keys: &[PinKey]) -> Result<Vec<Option<Binding>>, StoreError> {
        dispatch!(self, s => s.lookup(keys))
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
    async fn touch(&self, id: IdentityId, now_ms: u64, worked: bool) -> Result<(), StoreError> {
        dispatch!(self, s => s.touch(id, now_ms, worked))
    }
    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        dispatch!(self, s => s.record_egress(id, ip))
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
        expiry: &(dyn Fn(&Identity) -> Option<RetireReason> + Sync),
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

/// What happens to requests carrying a retired identity's credentials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetirePolicy {
    /// Answer 502 `identity-retired` until the client drops them.
    #[default]
    Fail,
    /// Remove them; the request goes out as a new, unpinned client.
    Strip,
}

/// What happens to requests carrying credentials of several identities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Answer 409 `pin-conflict`.
    #[default]
    Reject,
    /// Keep the identity created first; strip the other credentials.
    Oldest,
}

impl ConflictPolicy {
    fn label(self) -> &'static str {
        match self {
            ConflictPolicy::Reject => "reject",
            ConflictPolicy::Oldest => "oldest",
        }
    }
}

/// Identity lifetimes and policies.
#[derive(Clone, Debug)]
pub struct Policies {
    /// Retired credentials.
    pub retire: RetirePolicy,
    /// Credentials of several identities.
    pub conflict: ConflictPolicy,
    /// Idle timeout (exits may override).
    pub idle_timeout_ms: u64,
    /// Maximum lifetime (exits may override).
    pub max_lifetime_ms: u64,
    /// How long retired credentials are remembered.
    pub keep_retired_ms: u64,
}

/// Why a request was sent where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No live credential: rotation.
    Rotated,
    /// An existing identity.
    Pinned,
    /// A new identity, created for this request's credentials.
    NewIdentity,
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub struct Route {
    /// The exit.
    pub exit: Arc<Exit>,
    /// The pool partition on it.
    pub lane: Lane,
    /// The identity, if the request has one.
    pub identity: Option<Identity>,
    /// For rotated traffic: the anonymous session used (an identity created
    /// from the response inherits it).
    pub anonymous: Option<AnonymousSession>,
    /// Why.
    pub reason: Reason,
    /// Credentials to remove from the request before it leaves.
    pub strip: Vec<Credential>,
}

/// A credential that cannot be used, and why.
#[derive(Debug, Clone)]
pub struct DeadCredential {
    /// The credential.
    pub credential: Credential,
    /// Its identity, if known.
    pub identity: Option<IdentityId>,
    /// That identity's exit, if known.
    pub exit: Option<ExitId>,
    /// Why it is dead.
    pub reason: RetireReason,
}

/// A request that cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// Credentials of different identities (reject policy).
    #[error("credentials belong to different identities: {}", describe_conflict(.0))]
    Conflict(Vec<(Credential, IdentityId, ExitId)>),
    /// Credentials of retired identities (fail policy).
    #[error("{}", describe_retired(.0))]
    Retired(Vec<DeadCredential>),
    /// Every exit is dead.
    #[error("no exit is available: every exit is dead")]
    NoExit,
    /// The identity's exit is not configured here (another replica's).
    #[error("identity {identity} is bound to exit {exit}, which this pinproxy does not have")]
    ExitMissing {
        /// The identity.
        identity: IdentityId,
        /// Its exit.
        exit: ExitId,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe_conflict(pins: &[(Credential, IdentityId, ExitId)]) -> String {
    pins.iter()
        .map(|(credential, identity, exit)| {
            format!("{credential} -> identity {identity} on exit {exit}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_retired(dead: &[DeadCredential]) -> String {
    dead.iter()
        .map(|d| match (&d.identity, &d.exit) {
            (Some(id), Some(exit)) => format!(
                "{} belongs to identity {id} on exit {exit}, retired: {}",
                d.credential, d.reason
            ),
            _ => format!("{} is retired: {}", d.credential, d.reason),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Routes requests by their identities.
#[derive(Debug)]
pub struct Affinity {
    store: Store,
    clock: Clock,
    policies: Policies,
    metrics: Arc<Metrics>,
    /// Retirements decided where no await is possible (a body scan), not yet
    /// in the store: routing honours them at once.
    pending: dashmap::DashMap<IdentityId, RetireReason>,
}

impl Affinity {
    /// Routing over `store`.
    pub fn new(store: Store, clock: Clock, policies: Policies, metrics: Arc<Metrics>) -> Affinity {
        Affinity {
            store,
            clock,
            policies,
            metrics,
            pending: dashmap::DashMap::new(),
        }
    }

    /// The pin store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The policies.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Chooses where a request carrying `credentials` goes (see the module
    /// docs). A new identity records its fingerprint from `headers`.
    pub async fn route(
        &self,
        exits: &ExitSet,
        credentials: &[Credential],
        headers: &http::HeaderMap,
    ) -> Result<Route, AffinityError> {
        let now = self.clock.now_ms();
        if credentials.is_empty() {
            return self.rotate(exits, now, Vec::new());
        }
        // Key order makes concurrent multi-credential pinning deterministic.
        let mut credentials: Vec<&Credential> = credentials.iter().collect();
        credentials.sort_by_key(|c| c.key);
        let keys: Vec<PinKey> = credentials.iter().map(|c| c.key).collect();
        let bindings = self.store.lookup(&keys).await?;

        let mut live: Vec<(&Credential, Identity)> = Vec::new();
        let mut dead: Vec<DeadCredential> = Vec::new();
        let mut unknown: Vec<&Credential> = Vec::new();
        for (credential, binding) in credentials.iter().copied().zip(bindings) {
            match self.classify(exits, credential, binding, now).await? {
                Standing::Unknown => unknown.push(credential),
                Standing::Live(identity) => live.push((credential, identity)),
                Standing::Dead(d) => dead.push(d),
            }
        }

        let mut strip = Vec::new();
        if !dead.is_empty() {
            match self.policies.retire {
                RetirePolicy::Fail => return Err(AffinityError::Retired(dead)),
                RetirePolicy::Strip => strip.extend(dead.into_iter().map(|d| d.credential)),
            }
        }

        let identity = self.one_identity(live, &mut strip)?;
        match identity {
            Some(identity) => {
                self.join(&identity, &unknown, now).await?;
                self.pinned_route(exits, identity, Reason::Pinned, strip)
            }
            None if unknown.is_empty() => self.rotate(exits, now, strip),
            None => {
                // Read only here: most requests belong to an identity already.
                let fingerprint = Fingerprint::of(headers);
                self.create(exits, &unknown, &fingerprint, now, strip).await
            }
        }
    }

    /// Where a credential stands: unknown, live, or dead (and why).
    async fn classify(
        &self,
        exits: &ExitSet,
        credential: &Credential,
        binding: Option<Binding>,
        now: u64,
    ) -> Result<Standing, StoreError> {
        let Some(binding) = binding else {
            return Ok(Standing::Unknown);
        };
        let dead = |identity: Option<&Identity>, reason| {
            Standing::Dead(DeadCredential {
                credential: credential.clone(),
                identity: identity.map(|i| i.id).or(Some(binding.pin.identity)),
                exit: identity.map(|i| i.exit.clone()),
                reason,
            })
        };
        let Some(identity) = &binding.identity else {
            return Ok(dead(None, RetireReason::Forgotten));
        };
        if let Some(retired) = &identity.retired {
            return Ok(dead(Some(identity), retired.reason.clone()));
        }
        if let Some(reason) = self.pending.get(&identity.id) {
            return Ok(dead(Some(identity), reason.clone()));
        }
        if binding.pin.expired(now) {
            return Ok(dead(Some(identity), RetireReason::CookieExpired));
        }
        if let Some(reason) = ends(identity, exits, &self.policies, now) {
            self.retire(exits, identity, reason.clone()).await?;
            return Ok(dead(Some(identity), reason));
        }
        Ok(Standing::Live(identity.clone()))
    }

    /// Reduces the live identities of a request to at most one, by the
    /// conflict policy.
    fn one_identity(
        &self,
        live: Vec<(&Credential, Identity)>,
        strip: &mut Vec<Credential>,
    ) -> Result<Option<Identity>, AffinityError> {
        let Some(oldest) = live
            .iter()
            .map(|(_, i)| i)
            .min_by_key(|i| (i.created_ms, i.id))
            .cloned()
        else {
            return Ok(None);
        };
        if live.iter().all(|(_, i)| i.id == oldest.id) {
            return Ok(Some(oldest));
        }
        let policy = self.policies.conflict;
        self.metrics
            .conflicts
            .get_or_create(&Policy {
                policy: policy.label(),
            })
            .inc();
        match policy {
            ConflictPolicy::Reject => Err(AffinityError::Conflict(
                live.into_iter()
                    .map(|(c, i)| (c.clone(), i.id, i.exit))
                    .collect(),
            )),
            ConflictPolicy::Oldest => {
                for (credential, identity) in live {
                    if identity.id != oldest.id {
                        tracing::info!(%credential, identity = %identity.id, kept = %oldest.id, "conflict: stripping the newer identity's credential");
                        strip.push(credential.clone());
                    }
                }
                Ok(Some(oldest))
            }
        }
    }

    /// Pins a request's new credentials to its identity.
    async fn join(
        &self,
        identity: &Identity,
        unknown: &[&Credential],
        now: u64,
    ) -> Result<(), AffinityError> {
        if unknown.is_empty() {
            return Ok(());
        }
        let pins: Vec<(PinKey, Pin)> = unknown
            .iter()
            .map(|c| (c.key, pin_for(identity.id, c, now, None)))
            .collect();
        let winners = self.store.pin_all_if_absent(&pins).await?;
        for (credential, winner) in unknown.iter().zip(winners) {
            if winner.pin.identity != identity.id {
                // Pinned to another identity between our lookup and now.
                let other = winner
                    .identity
                    .map(|i| i.exit)
                    .unwrap_or_else(|| identity.exit.clone());
                return Err(AffinityError::Conflict(vec![
                    ((*credential).clone(), winner.pin.identity, other),
                    ((*credential).clone(), identity.id, identity.exit.clone()),
                ]));
            }
        }
        Ok(())
    }

    /// Creates an identity for credentials seen for the first time. If
    /// another request pinned the first of them meanwhile, follows it.
    async fn create(
        &self,
        exits: &ExitSet,
        unknown: &[&Credential],
        fingerprint: &Fingerprint,
        now: u64,
        strip: Vec<Credential>,
    ) -> Result<Route, AffinityError> {
        let exit = exits.pick(now).ok_or(AffinityError::NoExit)?;
        let candidate = Identity::new(
            exit.id().clone(),
            SessionId(rand::random()),
            now,
            Arc::new(fingerprint.clone()),
            now,
        );
        self.store.create_identity(&candidate).await?;
        let (first, rest) = match unknown.split_first() {
            Some(split) => split,
            None => return self.pinned_route(exits, candidate, Reason::NewIdentity, strip),
        };
        let winner = self
            .store
            .pin_if_absent(first.key, &pin_for(candidate.id, first, now, None))
            .await?;
        let (identity, reason) = if winner.pin.identity == candidate.id {
            self.metrics.identities_created.inc();
            tracing::info!(identity = %candidate.id, exit = %candidate.exit, credential = %first, "new identity");
            (candidate, Reason::NewIdentity)
        } else {
            self.store.discard_identity(candidate.id).await?;
            match winner.identity {
                Some(w) if w.retired.is_none() => (w, Reason::Pinned),
                other => {
                    // The winner is already gone: fail closed.
                    return Err(AffinityError::Retired(vec![DeadCredential {
                        credential: (*first).clone(),
                        identity: Some(winner.pin.identity),
                        exit: other.as_ref().map(|i| i.exit.clone()),
                        reason: other
                            .and_then(|i| i.retired.map(|r| r.reason))
                            .unwrap_or(RetireReason::Forgotten),
                    }]));
                }
            }
        };
        self.join(&identity, rest, now).await?;
        self.pinned_route(exits, identity, reason, strip)
    }

    fn pinned_route(
        &self,
        exits: &ExitSet,
        identity: Identity,
        reason: Reason,
        strip: Vec<Credential>,
    ) -> Result<Route, AffinityError> {
        let Some(exit) = exits.get(&identity.exit) else {
            return Err(AffinityError::ExitMissing {
                identity: identity.id,
                exit: identity.exit,
            });
        };
        Ok(Route {
            exit: exit.clone(),
            lane: Lane::identity(&identity),
            identity: Some(identity),
            anonymous: None,
            reason,
            strip,
        })
    }

    fn rotate(
        &self,
        exits: &ExitSet,
        now: u64,
        strip: Vec<Credential>,
    ) -> Result<Route, AffinityError> {
        let exit = exits.pick(now).ok_or(AffinityError::NoExit)?;
        let session = exit.sessions.next(now);
        Ok(Route {
            exit: exit.clone(),
            lane: Lane::anonymous(session),
            identity: None,
            anonymous: Some(session),
            reason: Reason::Rotated,
            strip,
        })
    }

    /// Retires an identity: recorded in the store, its connections dropped,
    /// counted.
    pub async fn retire(
        &self,
        exits: &ExitSet,
        identity: &Identity,
        reason: RetireReason,
    ) -> Result<(), StoreError> {
        let retirement = Retirement {
            reason: reason.clone(),
            at_ms: self.clock.now_ms(),
        };
        self.store.retire(identity.id, &retirement).await?;
        if let Some(exit) = exits.get(&identity.exit) {
            exit.client.forget(PoolKey::Identity(identity.id));
        }
        self.metrics.retired(reason.label());
        tracing::warn!(identity = %identity.id, exit = %identity.exit, %reason, "identity retired");
        Ok(())
    }

    /// Retires an identity from code that cannot wait: routing sees the
    /// retirement at once, the store gets it in the background.
    pub fn retire_soon(
        self: &Arc<Self>,
        exits: Arc<ExitSet>,
        identity: Identity,
        reason: RetireReason,
    ) {
        self.pending.insert(identity.id, reason.clone());
        let affinity = self.clone();
        tokio::spawn(async move {
            match affinity.retire(&exits, &identity, reason).await {
                Ok(()) => {
                    affinity.pending.remove(&identity.id);
                }
                // Left pending: routing keeps honouring it in this process.
                Err(e) => {
                    tracing::warn!(error = %e, identity = %identity.id, "could not store a retirement")
                }
            }
        });
    }

    /// Pins the tracked cookies a response sets to the request's identity;
    /// a request without one founds an identity on the exit and anonymous
    /// session that carried the response. Returns the identity the
    /// response belongs to. A value already pinned elsewhere keeps its first
    /// pin (pins never move).
    pub async fn learn(
        &self,
        route: &Route,
        set: &[SetTrackedCookie],
        fingerprint: &Fingerprint,
        egress_ip: Option<IpAddr>,
    ) -> Result<Option<Identity>, StoreError> {
        let now = self.clock.now_ms();
        let live: Vec<&SetTrackedCookie> = set.iter().filter(|c| !c.deletes).collect();
        if live.is_empty() {
            return Ok(route.identity.clone());
        }
        let (identity, is_new) = match &route.identity {
            Some(identity) => (identity.clone(), false),
            None => {
                let session = route.anonymous.unwrap_or(AnonymousSession {
                    session: route.lane.session,
                    started_ms: now,
                });
                let mut identity = Identity::new(
                    route.exit.id().clone(),
                    session.session,
                    session.started_ms,
                    Arc::new(fingerprint.clone()),
                    now,
                );
                identity.egress_ip = egress_ip;
                self.store.create_identity(&identity).await?;
                (identity, true)
            }
        };
        let mut pinned_any = false;
        let pins: Vec<(PinKey, Pin)> = live
            .iter()
            .map(|c| {
                let pin = pin_for(identity.id, &c.cookie, now, c.expires_ms);
                (c.cookie.key, pin)
            })
            .collect();
        let winners = self.store.pin_all_if_absent(&pins).await?;
        for (cookie, winner) in live.iter().zip(winners) {
            if winner.pin.identity == identity.id {
                pinned_any = true;
                tracing::debug!(cookie = %cookie.cookie, identity = %identity.id, "pinned from Set-Cookie");
            } else {
                // An origin handing out a value already pinned elsewhere (a
                // shared or replayed token): the first pin stands.
                tracing::warn!(
                    cookie = %cookie.cookie, identity = %identity.id, pinned_to = %winner.pin.identity,
                    "origin set a cookie value already pinned to another identity; keeping the first pin"
                );
            }
        }
        if is_new {
            if pinned_any {
                self.metrics.identities_created.inc();
                tracing::info!(identity = %identity.id, exit = %identity.exit, "new identity from Set-Cookie");
            } else {
                self.store.discard_identity(identity.id).await?;
                return Ok(None);
            }
        }
        Ok(Some(identity))
    }

    /// Records a request of `identity` and what it learnt about its tunnel.
    pub async fn record_use(
        &self,
        identity: &Identity,
        worked: bool,
        egress_ip: Option<IpAddr>,
    ) -> Result<(), StoreError> {
        self.store
            .touch(identity.id, self.clock.now_ms(), worked)
            .await?;
        if let (None, Some(ip)) = (identity.egress_ip, egress_ip) {
            self.store.record_egress(identity.id, ip).await?;
        }
        Ok(())
    }

    /// Shares exit deaths both ways: deaths this process saw go to the store,
    /// deaths the store knows (from before a restart, or from another
    /// replica) apply here, so identities created before them retire.
    pub async fn sync_exit_deaths(&self, exits: &ExitSet) -> Result<(), StoreError> {
        let known = self.store.exit_deaths().await?;
        for exit in exits.iter() {
            let stored = known
                .iter()
                .find(|(id, _)| id == exit.id())
                .map(|(_, at)| *at);
            match (exit.health.died_at_ms(), stored) {
                (Some(here), stored) if stored.is_none_or(|s| s < here) => {
                    self.store.record_exit_death(exit.id(), here).await?;
                }
                (_, Some(stored)) => exit.health.restore_died_at(stored),
                _ => {}
            }
        }
        Ok(())
    }

    /// Retires expired identities and forgets what has been retired long
    /// enough.
    pub async fn sweep(&self, exits: &ExitSet) -> Result<Swept, StoreError> {
        let now = self.clock.now_ms();
        let policies = &self.policies;
        let expiry = |identity: &Identity| ends(identity, exits, policies, now);
        let swept = self
            .store
            .sweep(now, policies.keep_retired_ms, &expiry)
            .await?;
        if swept != Swept::default() {
            tracing::debug!(?swept, "swept the pin store");
        }
        Ok(swept)
    }
}

enum Standing {
    Unknown,
    Live(Identity),
    Dead(DeadCredential),
}

fn pin_for(
    identity: IdentityId,
    credential: &Credential,
    now: u64,
    expires_ms: Option<u64>,
) -> Pin {
    Pin {
        identity,
        kind: credential.kind,
        name: Arc::from(credential.name.as_str()),
        created_ms: now,
        expires_ms: if credential.kind == PinKind::Cookie {
            expires_ms
        } else {
            None
        },
    }
}

/// Why `identity` cannot continue on its exit at `now`, if it cannot.
pub fn ends(
    identity: &Identity,
    exits: &ExitSet,
    policies: &Policies,
    now: u64,
) -> Option<RetireReason> {
    let Some(exit) = exits.get(&identity.exit) else {
        return Some(RetireReason::ExitRemoved);
    };
    if exit.health.state() == HealthState::Dead
        || exit
            .health
            .died_at_ms()
            .is_some_and(|died| died >= identity.created_ms)
    {
        return Some(RetireReason::ExitDown);
    }
    let options = &exit.spec.options;
    let elapsed = |since: u64| now.saturating_sub(since);
    if let Some(ttl) = options.sticky_ttl {
        if elapsed(identity.session_started_ms) >= crate::clock::duration_ms(ttl) {
            return Some(RetireReason::StickyExpired);
        }
    }
    let idle = options
        .idle_timeout
        .map_or(policies.idle_timeout_ms, crate::clock::duration_ms);
    if elapsed(identity.last_used_ms) >= idle {
        return Some(RetireReason::IdleExpired);
    }
    let lifetime = options
        .max_lifetime
        .map_or(policies.max_lifetime_ms, crate::clock::duration_ms);
    if elapsed(identity.created_ms) >= lifetime {
        return Some(RetireReason::LifetimeExpired);
    }
    None
}
