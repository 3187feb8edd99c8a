//! The router: a request's credentials decide its identity, exit and lane.
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

use std::sync::Arc;

use smallvec::SmallVec;

use super::policy::{ConflictPolicy, Policies, RetirePolicy};
use super::{lifecycle, Router};
use crate::credential::{Credential, PinKey};
use crate::exits::scope::ExitScope;
use crate::exits::sessions::AnonymousSession;
use crate::exits::{Exit, ExitSet};
use crate::fault::{Blame, Fault};
use crate::fingerprint::Fingerprint;
use crate::identity::{ExitId, Identity, IdentityId, Pin, RetireReason, Retirement, SessionId};
use crate::metrics::Policy;
use crate::store::{Binding, Bindings, Founding, PinStore as _, StoreError, StoreErrorKind};
use crate::upstream::Lane;

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
    /// The identity, if the request has one (the store's reading, shared).
    pub identity: Option<Arc<Identity>>,
    /// For rotated traffic: the anonymous session used (an identity created
    /// from the response inherits it).
    pub anonymous: Option<AnonymousSession>,
    /// Why.
    pub reason: Reason,
    /// Credentials to remove from the request before it leaves.
    pub strip: Vec<Credential>,
}

/// An identity read again ([`Router::reread`]).
#[derive(Debug)]
pub enum Reread {
    /// Live: its record now.
    Live(Arc<Identity>),
    /// Retired meanwhile, or forgotten.
    Retired(RetireReason),
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
pub enum RouteError {
    /// Credentials of different identities (reject policy).
    #[error("credentials belong to different identities: {}", describe_conflict(.0))]
    Conflict(Vec<(Credential, IdentityId, ExitId)>),
    /// Credentials of retired identities (fail policy).
    #[error("{}", describe_retired(.0))]
    Retired(Vec<DeadCredential>),
    /// Every exit is dead or drained (each exit's state, in words).
    #[error("no exit is available: every exit this request may use is dead or drained ({0})")]
    NoExit(String),
    /// The identity's exit is not configured here (another replica's).
    #[error("identity {identity} is bound to exit {exit}, which this pinproxy does not have")]
    ExitMissing {
        /// The identity.
        identity: IdentityId,
        /// Its exit.
        exit: ExitId,
    },
    /// The identity is on an exit the client's user may not use (client
    /// authentication): refused, never moved.
    #[error(
        "identity {identity} is on exit {exit}, which user {user} may not use (its exits: {allowed})"
    )]
    ExitNotAllowed {
        /// The user.
        user: String,
        /// The identity.
        identity: IdentityId,
        /// Its exit.
        exit: ExitId,
        /// The exits the user may use, in words.
        allowed: String,
    },
    /// The request started before a reload changed its identity's exit's
    /// route, and the identity was founded on another route than the one
    /// the request would leave by (the route in force, most likely): the
    /// request is not sent, and the identity is left to be judged by the
    /// configuration in force.
    #[error(
        "identity {identity} was founded on another route of exit {exit} than the one this \
         request would leave by: a reload changed the exit's route while the request was on its \
         way, and it was not sent"
    )]
    ExitReloaded {
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

impl Blame for RouteError {
    fn fault(&self) -> Fault {
        match self {
            RouteError::Conflict(_) | RouteError::ExitNotAllowed { .. } => Fault::Client,
            RouteError::Retired(_)
            | RouteError::NoExit(_)
            | RouteError::ExitMissing { .. }
            | RouteError::ExitReloaded { .. } => Fault::Exit,
            RouteError::Store(e) => e.fault(),
        }
    }
}

impl Router {
    /// Chooses where a request carrying `credentials` goes (see the module
    /// docs). A new identity records the fingerprint `fingerprint` makes
    /// (called only then: most requests belong to an identity already).
    pub async fn route(
        &self,
        exits: &ExitSet,
        credentials: &[Credential],
        fingerprint: impl FnOnce() -> Fingerprint,
    ) -> Result<Route, RouteError> {
        self.route_within(exits, &ExitScope::all(), credentials, fingerprint)
            .await
    }

    /// [`Router::route`] for a client limited to the exits of `scope`:
    /// rotation and new identities stay within them, and an identity on
    /// another exit is refused ([`RouteError::ExitNotAllowed`]) before any
    /// new credential joins it.
    pub async fn route_within(
        &self,
        exits: &ExitSet,
        scope: &ExitScope,
        credentials: &[Credential],
        fingerprint: impl FnOnce() -> Fingerprint,
    ) -> Result<Route, RouteError> {
        let now = self.clock.now_ms();
        let policies = self.policies.load_full();
        if credentials.is_empty() {
            return self.rotate(exits, scope, now, Vec::new());
        }
        // Key order makes concurrent multi-credential pinning deterministic.
        // The lists, the store's answer included, live on the stack for up
        // to four credentials (a pin hit allocates only the identity the
        // store read).
        let mut credentials: SmallVec<[&Credential; 4]> = credentials.iter().collect();
        credentials.sort_by_key(|c| c.key);
        let keys: SmallVec<[PinKey; 4]> = credentials.iter().map(|c| c.key).collect();
        let mut bindings = Bindings::new();
        // A write below decided on this lookup is refused if the store
        // notices a loss meanwhile (`Store::unchanged_since`).
        let losses = self.store.losses_noticed();
        self.store.lookup_into(&keys, &mut bindings).await?;

        let mut live: Live<'_> = SmallVec::new();
        let mut dead: Vec<DeadCredential> = Vec::new();
        let mut unknown: SmallVec<[&Credential; 4]> = SmallVec::new();
        let mut ended = Ended::new();
        for (credential, binding) in credentials.iter().copied().zip(bindings.drain(..)) {
            // A request's cookies usually share one identity: its exit and
            // lifetimes are judged once.
            let judged = |id: IdentityId| live.iter().any(|(_, i)| i.id == id);
            match self
                .classify(
                    exits, &policies, credential, binding, now, judged, &mut ended,
                )
                .await?
            {
                Standing::Unknown => unknown.push(credential),
                Standing::Live(identity) => live.push((credential, identity)),
                Standing::Dead(d) => dead.push(d),
                Standing::Reloaded(identity, exit) => {
                    return Err(RouteError::ExitReloaded { identity, exit })
                }
            }
        }

        // An identity this request read as retired or forgotten through one
        // credential is not gone on as through another (a reading older
        // than the retirement, from the Redis hit cache): its credentials
        // are all dead. A cookie's own expiry is the cookie's alone.
        if !dead.is_empty() {
            let gone: SmallVec<[(IdentityId, RetireReason); 2]> = dead
                .iter()
                .filter(|d| d.reason != RetireReason::CookieExpired)
                .filter_map(|d| Some((d.identity?, d.reason.clone())))
                .collect();
            live.retain(|(credential, identity)| {
                let Some((_, reason)) = gone.iter().find(|(id, _)| *id == identity.id) else {
                    return true;
                };
                dead.push(DeadCredential {
                    credential: (*credential).clone(),
                    identity: Some(identity.id),
                    exit: Some(identity.exit.clone()),
                    reason: reason.clone(),
                });
                false
            });
        }
        let mut strip = Vec::new();
        if !dead.is_empty() {
            match policies.retire {
                RetirePolicy::Fail => return Err(RouteError::Retired(dead)),
                RetirePolicy::Strip => strip.extend(dead.into_iter().map(|d| d.credential)),
            }
        }

        let identity = self.one_identity(policies.conflict, &mut live, &mut strip)?;
        match identity {
            Some(identity) => {
                allowed(scope, &identity)?;
                self.join(exits, &identity, &unknown, now, losses).await?;
                self.pinned_route(exits, identity, Reason::Pinned, strip)
            }
            None if unknown.is_empty() => self.rotate(exits, scope, now, strip),
            None => {
                let fingerprint = fingerprint();
                let new = New {
                    unknown: &unknown,
                    fingerprint: &fingerprint,
                    losses,
                };
                self.create(exits, scope, new, now, strip).await
            }
        }
    }

    /// Reads `identity` again for a request routed to it before a wait (its
    /// line in pacing, up to `identities.queue_timeout`): a retirement
    /// decided or stored meanwhile, or its record as it stands now (its
    /// first egress address may have been recorded since). Found through
    /// the request's `credentials`; when none of them leads to it any
    /// longer, it cannot be vouched for and counts as forgotten. Found
    /// live, it is judged again on `exits` (the request's) as at routing:
    /// its sticky window, its lifetimes or its exit's health may have ended
    /// during the wait, and it then retires before anything is sent.
    pub async fn reread(
        &self,
        exits: &ExitSet,
        identity: &Identity,
        credentials: &[Credential],
    ) -> Result<Reread, StoreError> {
        if let Some(reason) = self.pending_retirement(identity.id) {
            return Ok(Reread::Retired(reason));
        }
        let keys: SmallVec<[PinKey; 4]> = credentials.iter().map(|c| c.key).collect();
        let mut bindings = Bindings::new();
        self.store.lookup_into(&keys, &mut bindings).await?;
        let found = bindings
            .drain(..)
            .flatten()
            .find(|binding| binding.pin.identity == identity.id);
        let now = match found.and_then(|binding| binding.identity) {
            None => return Ok(Reread::Retired(RetireReason::Forgotten)),
            Some(now) => now,
        };
        if let Some(retired) = &now.retired {
            return Ok(Reread::Retired(retired.reason.clone()));
        }
        let policies = self.policies.load();
        if let Some(reason) = self
            .retire_if_ended(exits, &now, &policies, self.clock.now_ms())
            .await?
        {
            return Ok(Reread::Retired(reason));
        }
        Ok(Reread::Live(now))
    }

    /// Retires `identity` if [`Router::end_due`] says it cannot continue
    /// at `now`; answers why.
    async fn retire_if_ended(
        &self,
        exits: &ExitSet,
        identity: &Identity,
        policies: &Policies,
        now: u64,
    ) -> Result<Option<RetireReason>, StoreError> {
        let Some(reason) = self.end_due(identity, exits, policies, now) else {
            return Ok(None);
        };
        self.retire(exits, identity, reason.clone()).await?;
        Ok(Some(reason))
    }

    /// Where a credential stands: unknown, live, or dead (and why). An
    /// identity this request found at its end is retired once and noted in
    /// `ended`, so that its other credentials (read before the retirement)
    /// are dead for the same reason without retiring it again.
    #[allow(clippy::too_many_arguments)]
    async fn classify(
        &self,
        exits: &ExitSet,
        policies: &Policies,
        credential: &Credential,
        binding: Option<Binding>,
        now: u64,
        judged: impl Fn(IdentityId) -> bool,
        ended: &mut Ended,
    ) -> Result<Standing, StoreError> {
        let Some(Binding { pin, identity }) = binding else {
            return Ok(Standing::Unknown);
        };
        let dead = |identity: Option<&Identity>, reason| {
            Standing::Dead(DeadCredential {
                credential: credential.clone(),
                identity: identity.map(|i| i.id).or(Some(pin.identity)),
                exit: identity.map(|i| i.exit.clone()),
                reason,
            })
        };
        let Some(identity) = identity else {
            return Ok(dead(None, RetireReason::Forgotten));
        };
        if let Some(retired) = &identity.retired {
            return Ok(dead(Some(&identity), retired.reason.clone()));
        }
        if let Some(reason) = self.pending_retirement(identity.id) {
            return Ok(dead(Some(&identity), reason));
        }
        if pin.expired(now) {
            return Ok(dead(Some(&identity), RetireReason::CookieExpired));
        }
        // Already found live for another credential of this request: its
        // exit and lifetimes were judged a moment ago (only its last use can
        // have moved since, which makes it no more idle).
        if judged(identity.id) {
            return Ok(Standing::Live(identity));
        }
        if let Some((_, reason)) = ended.iter().find(|(id, _)| *id == identity.id) {
            return Ok(dead(Some(&identity), reason.clone()));
        }
        if lifecycle::founded_past_a_reload(&identity, exits) {
            return Ok(Standing::Reloaded(identity.id, identity.exit.clone()));
        }
        if let Some(reason) = self
            .retire_if_ended(exits, &identity, policies, now)
            .await?
        {
            ended.push((identity.id, reason.clone()));
            return Ok(dead(Some(&identity), reason));
        }
        // The binding's own copy: a pin hit clones no identity.
        Ok(Standing::Live(identity))
    }

    /// Reduces the live identities of a request to at most one, by the
    /// conflict policy.
    fn one_identity(
        &self,
        policy: ConflictPolicy,
        live: &mut Live<'_>,
        strip: &mut Vec<Credential>,
    ) -> Result<Option<Arc<Identity>>, RouteError> {
        let Some(oldest_at) = live
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, i))| (i.created_ms, i.id))
            .map(|(at, _)| at)
        else {
            return Ok(None);
        };
        let oldest_id = live.get(oldest_at).map(|(_, i)| i.id);
        if live.iter().all(|(_, i)| Some(i.id) == oldest_id) {
            // One identity (the usual case): taken out of the list, which
            // is borrowed rather than moved.
            return Ok((oldest_at < live.len()).then(|| live.swap_remove(oldest_at).1));
        }
        let Some(oldest) = live.get(oldest_at).map(|(_, i)| i.clone()) else {
            return Ok(None);
        };
        self.metrics
            .conflicts
            .get_or_create(&Policy {
                policy: policy.label(),
            })
            .inc();
        match policy {
            ConflictPolicy::Reject => Err(RouteError::Conflict(
                live.drain(..)
                    .map(|(c, i)| (c.clone(), i.id, i.exit.clone()))
                    .collect(),
            )),
            ConflictPolicy::Oldest => {
                for (credential, identity) in live.drain(..) {
                    if identity.id != oldest.id {
                        tracing::info!(%credential, identity = %identity.id, kept = %oldest.id, "conflict: stripping the newer identity's credential");
                        strip.push(credential.clone());
                    }
                }
                Ok(Some(oldest))
            }
        }
    }

    /// What a pin write of `identity` (on `exits`) decided on a lookup made
    /// when the store's loss count read `losses` answered: a loss that
    /// came to light in its round trip (its reply, or the store's own
    /// watch) or since the lookup (`Store::unchanged_since`) makes its
    /// pins suspect. The identity retires (`store-lost`: Redis holds its
    /// pins, and a retry would find them live) and the request is refused;
    /// not when the answer shows that none of its pins was written
    /// (`wrote`: they were all others' already), but a failed write cannot
    /// say, and retires it.
    async fn unless_lost_while_writing<T>(
        &self,
        exits: &ExitSet,
        identity: &Identity,
        losses: u64,
        written: Result<T, StoreError>,
        wrote: impl FnOnce(&T) -> bool,
    ) -> Result<T, RouteError> {
        let lost = match written {
            Err(e) if e.kind == StoreErrorKind::Lost => e,
            Err(e) => return Err(e.into()),
            Ok(written) => match self.store.unchanged_since(losses) {
                Ok(()) => return Ok(written),
                Err(lost) if !wrote(&written) => return Err(lost.into()),
                Err(lost) => lost,
            },
        };
        let exit = exits.get(&identity.exit).map(|exit| &**exit);
        self.retire_written_in_a_loss(exit, identity).await;
        Err(lost.into())
    }

    /// Pins a request's new credentials to its identity; `losses` is the
    /// store's loss count when they were looked up.
    async fn join(
        &self,
        exits: &ExitSet,
        identity: &Identity,
        unknown: &[&Credential],
        now: u64,
        losses: u64,
    ) -> Result<(), RouteError> {
        if unknown.is_empty() {
            return Ok(());
        }
        self.store.unchanged_since(losses)?;
        let pins: Vec<(PinKey, Pin)> = unknown
            .iter()
            .map(|c| (c.key, Pin::new(identity.id, c, now, None)))
            .collect();
        let written = self.store.pin_all_if_absent(&pins).await;
        let winners = self
            .unless_lost_while_writing(exits, identity, losses, written, |winners| {
                winners.iter().any(|b| b.pin.identity == identity.id)
            })
            .await?;
        check_joined(identity, unknown, winners)
    }

    /// Creates an identity for credentials seen for the first time. If
    /// another request pinned the first of them meanwhile, follows it.
    async fn create(
        &self,
        exits: &ExitSet,
        scope: &ExitScope,
        new: New<'_>,
        now: u64,
        strip: Vec<Credential>,
    ) -> Result<Route, RouteError> {
        let New {
            unknown,
            fingerprint,
            losses,
        } = new;
        self.store.unchanged_since(losses)?;
        let exit = exits
            .pick_within(now, scope)
            .ok_or_else(|| RouteError::NoExit(exits.unavailable_within(scope)))?;
        // Its session's start on the clock its sticky window is judged by.
        let mut candidate = Identity::new(
            exit.id().clone(),
            SessionId(rand::random()),
            self.retirement_now(),
            Arc::new(fingerprint.clone()),
            now,
        );
        candidate.route = exit.founding_route();
        exit.health.note_identity(candidate.created_ms, now);
        // The identity and all its pins in one store step (one round trip
        // to Redis); the first credential decides who founds it.
        let pins: Vec<(PinKey, Pin)> = unknown
            .iter()
            .map(|c| (c.key, Pin::new(candidate.id, c, now, None)))
            .collect();
        let written = self.store.found_identity(&candidate, &pins).await;
        let winner = match self
            .unless_lost_while_writing(exits, &candidate, losses, written, |founding| {
                matches!(founding, Founding::Founded(_))
            })
            .await?
        {
            Founding::Founded(winners) => {
                if let Some(first) = unknown.first() {
                    self.metrics.identity_created(&candidate.exit, "request");
                    tracing::info!(identity = %candidate.id, exit = %candidate.exit, credential = %first, "new identity");
                    // Founded on an exit a reload has just replaced with
                    // another route under its id, or removed (this request
                    // started before): it retires at once, before its
                    // credential leaves through either route.
                    if let Some(reason) = exit.left_behind() {
                        let retirement = Retirement {
                            reason: reason.clone(),
                            at_ms: self.retirement_now(),
                        };
                        self.store.retire(candidate.id, &retirement).await?;
                        let _ = self.count_retired(&candidate, &retirement.reason);
                        return Err(RouteError::Retired(vec![DeadCredential {
                            credential: (*first).clone(),
                            identity: Some(candidate.id),
                            exit: Some(candidate.exit.clone()),
                            reason,
                        }]));
                    }
                }
                check_joined(&candidate, unknown, winners)?;
                return self.pinned_route(exits, Arc::new(candidate), Reason::NewIdentity, strip);
            }
            Founding::Lost(winner) => winner,
        };
        let (first, rest) = match unknown.split_first() {
            Some(split) => split,
            None => return Err(RouteError::Store(unexpected_founding())),
        };
        let identity = match winner.identity {
            Some(w) if w.retired.is_none() => w,
            other => {
                // The winner is already gone: fail closed.
                return Err(RouteError::Retired(vec![DeadCredential {
                    credential: (*first).clone(),
                    identity: Some(winner.pin.identity),
                    exit: other.as_ref().map(|i| i.exit.clone()),
                    reason: other
                        .and_then(|i| i.retired.as_ref().map(|r| r.reason.clone()))
                        .unwrap_or(RetireReason::Forgotten),
                }]));
            }
        };
        // Another request founded it first, maybe on an exit not ours, or
        // on another route under our exit's id (a replica not yet given a
        // route change, a request on an exit a reload replaced): judged as
        // a pin hit is, before the credential follows it.
        let retired = |reason: RetireReason| {
            RouteError::Retired(vec![DeadCredential {
                credential: (*first).clone(),
                identity: Some(identity.id),
                exit: Some(identity.exit.clone()),
                reason,
            }])
        };
        if let Some(reason) = self.pending_retirement(identity.id) {
            return Err(retired(reason));
        }
        if lifecycle::founded_past_a_reload(&identity, exits) {
            return Err(RouteError::ExitReloaded {
                identity: identity.id,
                exit: identity.exit.clone(),
            });
        }
        let policies = self.policies.load();
        if let Some(reason) = self
            .retire_if_ended(exits, &identity, &policies, now)
            .await?
        {
            return Err(retired(reason));
        }
        allowed(scope, &identity)?;
        self.join(exits, &identity, rest, now, losses).await?;
        self.pinned_route(exits, identity, Reason::Pinned, strip)
    }

    fn pinned_route(
        &self,
        exits: &ExitSet,
        identity: Arc<Identity>,
        reason: Reason,
        strip: Vec<Credential>,
    ) -> Result<Route, RouteError> {
        let Some(exit) = exits.get(&identity.exit) else {
            return Err(RouteError::ExitMissing {
                identity: identity.id,
                exit: identity.exit.clone(),
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
        scope: &ExitScope,
        now: u64,
        strip: Vec<Credential>,
    ) -> Result<Route, RouteError> {
        let exit = exits
            .pick_within(now, scope)
            .ok_or_else(|| RouteError::NoExit(exits.unavailable_within(scope)))?;
        // Sessions that end are dated, and their age judged, as
        // identities' are (two clock readings: only for those).
        let dated = if exit.sessions.expire() {
            self.retirement_now()
        } else {
            now
        };
        let session = exit.sessions.next(dated);
        Ok(Route {
            exit: exit.clone(),
            lane: Lane::anonymous(session.session),
            identity: None,
            anonymous: Some(session),
            reason: Reason::Rotated,
            strip,
        })
    }
}

/// A request's credentials no identity holds, about to found one.
struct New<'a> {
    /// The credentials, in key order.
    unknown: &'a [&'a Credential],
    /// The fingerprint the new identity records.
    fingerprint: &'a Fingerprint,
    /// The store's loss count when they were looked up.
    losses: u64,
}

/// Fails with a conflict when any of `credentials` was pinned to another
/// identity (between our lookup and our pin) instead of `identity`.
fn check_joined(
    identity: &Identity,
    credentials: &[&Credential],
    winners: Vec<Binding>,
) -> Result<(), RouteError> {
    // One answer per credential, or the store answered something else: a
    // credential without its answer would go unpinned.
    if winners.len() != credentials.len() {
        return Err(RouteError::Store(StoreError::new(
            StoreErrorKind::Protocol,
            "the store answered another number of pins than it was given",
        )));
    }
    for (credential, winner) in credentials.iter().zip(winners) {
        // Joined to an identity the store now holds retired (retired
        // meanwhile, by another request or replica): the request does not
        // go on as it.
        if let Some(retired) = winner
            .identity
            .as_ref()
            .filter(|i| i.id == identity.id)
            .and_then(|i| i.retired.as_ref())
        {
            return Err(RouteError::Retired(vec![DeadCredential {
                credential: (*credential).clone(),
                identity: Some(identity.id),
                exit: Some(identity.exit.clone()),
                reason: retired.reason.clone(),
            }]));
        }
        if winner.pin.identity != identity.id {
            let other = winner
                .identity
                .map(|i| i.exit.clone())
                .unwrap_or_else(|| identity.exit.clone());
            return Err(RouteError::Conflict(vec![
                ((*credential).clone(), winner.pin.identity, other),
                ((*credential).clone(), identity.id, identity.exit.clone()),
            ]));
        }
    }
    Ok(())
}

/// A store that reports a lost founding of an identity that had no pins.
fn unexpected_founding() -> StoreError {
    StoreError::new(
        StoreErrorKind::Protocol,
        "the store reports a lost founding for an identity without credentials",
    )
}

/// Refuses an identity on an exit outside `scope`.
fn allowed(scope: &ExitScope, identity: &Identity) -> Result<(), RouteError> {
    if scope.allows(&identity.exit) {
        return Ok(());
    }
    Err(RouteError::ExitNotAllowed {
        user: scope.user().unwrap_or("-").to_owned(),
        identity: identity.id,
        exit: identity.exit.clone(),
        allowed: scope.describe(),
    })
}

/// The live credentials of a request and their identities (on the stack
/// for up to four, like the request's other lists).
type Live<'a> = SmallVec<[(&'a Credential, Arc<Identity>); 4]>;

/// Identities one request found at their end (and retired), with why.
type Ended = SmallVec<[(IdentityId, RetireReason); 1]>;

enum Standing {
    Unknown,
    Live(Arc<Identity>),
    Dead(DeadCredential),
    /// Founded on another route of its exit than the request's set has
    /// (see [`lifecycle::founded_past_a_reload`]).
    Reloaded(IdentityId, ExitId),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::PinHasher;

    /// Credentials joined to an identity the store answers as retired
    /// (retired meanwhile) do not let the request go on as it; an answer
    /// with another number of pins than given is an error, not a partial
    /// join.
    #[test]
    fn a_join_answered_with_a_retired_identity_or_too_few_pins_fails() {
        let fingerprint = Fingerprint::of_user_agent("agent");
        let identity = Identity::new(ExitId::new("e1"), SessionId(1), 5, fingerprint, 5);
        let cookie =
            Credential::cookie("datadome", PinHasher::new([1; 32]).cookie("datadome", "v"));
        let answer = |identity: &Identity| Binding {
            pin: Pin::new(identity.id, &cookie, 5, None),
            identity: Some(Arc::new(identity.clone())),
        };
        assert!(check_joined(&identity, &[&cookie], vec![answer(&identity)]).is_ok());

        let mut retired = identity.clone();
        retired.retired = Some(Retirement {
            reason: RetireReason::Evicted,
            at_ms: 6,
        });
        match check_joined(&identity, &[&cookie], vec![answer(&retired)]) {
            Err(RouteError::Retired(dead)) => assert_eq!(dead[0].reason, RetireReason::Evicted),
            other => panic!("{other:?}"),
        }
        match check_joined(&identity, &[&cookie], Vec::new()) {
            Err(RouteError::Store(e)) => assert_eq!(e.kind, StoreErrorKind::Protocol),
            other => panic!("{other:?}"),
        }
    }
}
