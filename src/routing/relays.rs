//! The WebSockets and passed-through tunnels open for identities: a relay
//! is a use of its identity for as long as bytes move through it, and it
//! ends when its identity is retired.
//!
//! A relay carries bytes pinproxy does not read, on its identity's exit, so
//! no request of it ever reaches routing again. Without this, an identity
//! busy on a WebSocket (a live feed, a chat) and sending no other request
//! would look idle and be retired for it while in use, and a retired
//! identity's relays would run on after its retirement (an operator's
//! eviction included) for as long as their peers kept them open.
//!
//! - A retirement decided in this process ([`Router::retire`],
//!   [`Router::retire_soon`]: an origin's verdict, an eviction, an address
//!   drift; the sweep's with a memory or embedded store) ends its
//!   identity's relays at once ([`OpenRelays::end`]).
//! - Every other one (another replica's, or an end Redis leaves to the
//!   identity's next use) is found by the relay's own check, made when it
//!   opens and then every quarter of its identity's idle timeout (at most
//!   [`CHECK_EVERY_MAX`] apart), which also records the use when bytes
//!   moved since the last one. A reload has every relay check again at
//!   once ([`Router::relays_reloaded`]): with a shorter idle timeout, uses
//!   recorded at checks spaced by the old one would reach the store too
//!   late for other replicas, which judge the identity by them.
//! - Idleness of an identity with a relay open here is the relay's own
//!   check's to find ([`Router::end_due`]): only the relay knows whether
//!   bytes moved since the use it last recorded.
//!
//! A store that cannot answer a check ends nothing: the relay stays on its
//! identity's exit, which is all the pinning invariant asks of it. One that
//! holds no record of the identity (a Redis loss before its restore) has
//! the relay judge the identity as read when it opened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::lifecycle::{ends, idle_timeout_ms, Moment};
use super::Router;
use crate::credential::RandomKeys;
use crate::exits::{ExitSet, LiveExits};
use crate::identity::{Identity, IdentityId, RetireReason};
use crate::store::PinStore as _;

/// The longest time between two checks of a relay's identity: how long a
/// retirement decided elsewhere (another replica) may take to end it.
pub const CHECK_EVERY_MAX: Duration = Duration::from_secs(30);

/// The shortest time between two checks (an idle timeout of a second or
/// less would otherwise have every relay read the store continuously).
const CHECK_EVERY_MIN: Duration = Duration::from_millis(100);

/// The relays open per identity, and what ends them.
#[derive(Debug, Default)]
pub struct OpenRelays {
    open: Arc<dashmap::DashMap<IdentityId, Open, RandomKeys>>,
    /// Wakes every relay waiting for its next check (a reload).
    reloaded: tokio::sync::Notify,
}

/// One identity's open relays: how many, and the end they share.
#[derive(Debug)]
struct Open {
    relays: usize,
    end: Arc<End>,
}

/// The end of an identity's relays, once decided.
#[derive(Debug, Default)]
struct End {
    ended: CancellationToken,
    reason: OnceLock<RetireReason>,
}

impl OpenRelays {
    /// Counts a relay of `id` open until the returned hold is dropped.
    fn hold(&self, id: IdentityId) -> RelayHold {
        let end = {
            let mut open = self.open.entry(id).or_insert_with(|| Open {
                relays: 0,
                end: Arc::default(),
            });
            open.relays += 1;
            open.end.clone()
        };
        RelayHold {
            id,
            end,
            open: self.open.clone(),
        }
    }

    /// Whether a relay of `id` is open (and not ended).
    pub fn is_open(&self, id: IdentityId) -> bool {
        self.open.contains_key(&id)
    }

    /// Ends the open relays of `id`, retired for `reason`. A relay that
    /// opens afterwards finds the retirement at its first check.
    pub fn end(&self, id: IdentityId, reason: &RetireReason) {
        if let Some((_, open)) = self.open.remove(&id) {
            let _ = open.end.reason.set(reason.clone());
            open.end.ended.cancel();
        }
    }
}

/// One open relay of an identity (see [`OpenRelays::hold`]).
#[derive(Debug)]
struct RelayHold {
    id: IdentityId,
    end: Arc<End>,
    open: Arc<dashmap::DashMap<IdentityId, Open, RandomKeys>>,
}

impl RelayHold {
    /// Once the identity's relays are ended: why.
    async fn ended(&self) -> RetireReason {
        self.end.ended.cancelled().await;
        // Set before the token is cancelled (`OpenRelays::end`).
        self.end
            .reason
            .get()
            .cloned()
            .unwrap_or(RetireReason::Evicted)
    }
}

impl Drop for RelayHold {
    fn drop(&mut self) {
        // Only the entry this hold counted in: after an end, a new one may
        // stand for relays opened since.
        self.open.remove_if_mut(&self.id, |_, open| {
            if Arc::ptr_eq(&open.end, &self.end) {
                open.relays = open.relays.saturating_sub(1);
            }
            open.relays == 0
        });
    }
}

impl Router {
    /// Has every open relay check its identity again now, by the exits and
    /// policies in force: called once a reload has put them in force.
    pub fn relays_reloaded(&self) {
        self.relays.reloaded.notify_waiters();
    }

    /// Holds `identity` in use for as long as a relay of it runs, and
    /// returns once the identity is retired (why): the relay is then
    /// closed. `reads` counts the relay's reads that brought bytes: when it
    /// moved since the last check, the check records a use (no request) of
    /// the identity first. Judged on the exits in force at each check (a
    /// reload's, not the relay's pipeline's).
    pub async fn hold_in_use(
        self: &Arc<Self>,
        exits: &LiveExits,
        identity: &Identity,
        reads: &AtomicU64,
    ) -> RetireReason {
        let hold = self.relays.hold(identity.id);
        let mut seen = reads.load(Ordering::Relaxed);
        // The relay's own last use: the request that opened it, then each
        // use it records. A store that writes uses later (Redis gathers
        // them for a moment) may not show it yet, and an identity judged
        // by what the store shows would be found idle right after a use.
        let mut used_ms = self.clock.now_ms();
        loop {
            // Made before the check reads the exits and policies, a
            // `Notified` hears a reload from then on (even unpolled): a
            // reload while the check runs has the relay check again at once.
            let reloaded = self.relays.reloaded.notified();
            let exits = exits.load();
            match self.standing(&exits, identity, used_ms).await {
                Ok(Standing::Retired(reason)) => {
                    // Found (another replica's, or stored by a task of
                    // this one's): its other relays and its connections
                    // here end too.
                    self.end_here(&exits, identity, &reason);
                    return reason;
                }
                Ok(Standing::Ends(now, reason)) => {
                    // In a task of its own: the relay may end while the
                    // store takes it, and the verdict must not be lost.
                    self.retire_settled(exits, now, reason.clone()).await;
                    return reason;
                }
                Ok(Standing::Unrecorded(reason)) => return reason,
                Ok(Standing::Live) => {}
                Err(e) => tracing::debug!(
                    error = %e, identity = %identity.id,
                    "could not read a relay's identity; it stays open"
                ),
            }
            let every = check_every(idle_timeout_ms(identity, &exits, &self.policies()));
            drop(exits);
            tokio::select! {
                reason = hold.ended() => return reason,
                () = tokio::time::sleep(every) => {}
                () = reloaded => {}
            }
            let now = reads.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                used_ms = self.clock.now_ms();
                if let Err(e) = self.store.touch(identity.id, used_ms, 0, false, None).await {
                    tracing::debug!(
                        error = %e, identity = %identity.id,
                        "could not record a relay's use of its identity"
                    );
                }
            }
        }
    }

    /// How `opened` (a relay's identity, as read when the relay opened)
    /// stands for the relay, last used at `used_ms`: retired (decided here
    /// or stored), ending now (what [`super::lifecycle::ends`] finds: the
    /// plain judgement, idleness included, never [`Router::end_due`], which
    /// leaves idleness to this check), or
    /// live. An identity the store does not hold (a Redis loss not yet
    /// restored, keys Redis evicted) is judged as it was read when the
    /// relay opened, but for idleness: nothing is stored for it, and its
    /// lifetimes and its exit's health still bound the relay.
    async fn standing(
        &self,
        exits: &ExitSet,
        opened: &Identity,
        used_ms: u64,
    ) -> Result<Standing, crate::store::StoreError> {
        if let Some(reason) = self.pending_retirement(opened.id) {
            return Ok(Standing::Retired(reason));
        }
        let read = self.store.read_identity(opened.id).await?;
        let recorded = read.is_some();
        let mut identity = match read {
            Some(now) => now,
            None => opened.clone(),
        };
        if let Some(retired) = identity.retired.as_ref().filter(|_| recorded) {
            return Ok(Standing::Retired(retired.reason.clone()));
        }
        identity.last_used_ms = identity.last_used_ms.max(used_ms);
        let policies = self.policies();
        // With a shared store an identity whose exit this replica lacks is
        // left to the replicas that have it (see `lifecycle::ends`), but
        // this relay runs through this replica's exit, which a reload
        // removed: it closes, as the exit's requests here are refused.
        if policies.shared_store && exits.get(&identity.exit).is_none() {
            return Ok(Standing::Unrecorded(RetireReason::ExitRemoved));
        }
        let steady = || self.retirement_now();
        let moment = Moment {
            wall_ms: self.clock.now_ms(),
            steady: &steady,
        };
        Ok(match ends(&identity, exits, &policies, moment) {
            None => Standing::Live,
            Some(reason) if recorded => Standing::Ends(identity, reason),
            // Not for idleness without the record: the identity may be
            // busy through other replicas, which this one cannot see
            // (as the Redis journal never retires for idleness).
            Some(RetireReason::IdleExpired) => Standing::Live,
            Some(reason) => Standing::Unrecorded(reason),
        })
    }
}

/// How a relay's identity stands (see [`Router::hold_in_use`]).
#[derive(Debug)]
enum Standing {
    /// Retired, for this reason.
    Retired(RetireReason),
    /// Ending now (as read, its last use the relay's where later), for this
    /// reason: to be retired.
    Ends(Identity, RetireReason),
    /// Not in the store, and ended as read when the relay opened: this
    /// relay closes, nothing is stored or ended beside it (a restore may
    /// bring back a record that others' uses kept live).
    Unrecorded(RetireReason),
    /// Live.
    Live,
}

/// A relay's identity, with what holds it in use (see
/// [`Router::hold_in_use`]).
#[derive(Clone, Debug)]
pub struct RelayOwner {
    /// Routing, whose store records the uses.
    pub router: Arc<Router>,
    /// The exits in force (swapped by reloads).
    pub exits: Arc<LiveExits>,
    /// The identity.
    pub identity: Arc<Identity>,
}

/// Holds `owner`'s identity in use while a relay of `what` (a WebSocket, a
/// passed-through tunnel) runs and returns once the identity is retired,
/// saying so: the relay's end (see `net::relay::relay`). Without an owner
/// (traffic of no identity), never returns.
pub async fn until_retired(owner: Option<RelayOwner>, reads: &AtomicU64, what: &'static str) {
    let Some(owner) = owner else {
        return std::future::pending().await;
    };
    let identity = &owner.identity;
    let reason = owner
        .router
        .hold_in_use(&owner.exits, identity, reads)
        .await;
    tracing::info!(
        identity = %identity.id, exit = %identity.exit, %reason, relay = what,
        "closing a relay of a retired identity"
    );
}

/// How often a relay of an identity whose idle timeout is `idle_ms` checks
/// it: four times per idle timeout, so that its uses keep it from idling
/// out, within [`CHECK_EVERY_MIN`] and [`CHECK_EVERY_MAX`].
fn check_every(idle_ms: u64) -> Duration {
    (Duration::from_millis(idle_ms) / 4).clamp(CHECK_EVERY_MIN, CHECK_EVERY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_come_four_times_per_idle_timeout_within_bounds() {
        assert_eq!(check_every(2_000), Duration::from_millis(500));
        assert_eq!(check_every(3_600_000), CHECK_EVERY_MAX);
        assert_eq!(check_every(0), CHECK_EVERY_MIN);
    }

    #[tokio::test]
    async fn an_end_reaches_every_relay_of_the_identity_and_no_other() {
        let relays = OpenRelays::default();
        let (one, other) = (IdentityId::random(), IdentityId::random());
        let (first, second, elsewhere) = (relays.hold(one), relays.hold(one), relays.hold(other));
        relays.end(one, &RetireReason::Evicted);
        assert_eq!(first.ended().await, RetireReason::Evicted);
        assert_eq!(second.ended().await, RetireReason::Evicted);
        assert!(!elsewhere.end.ended.is_cancelled());
        // A relay opened after the end counts anew; the ended ones leaving
        // do not take it off.
        let later = relays.hold(one);
        drop((first, second));
        assert!(!later.end.ended.is_cancelled());
        assert_eq!(relays.open.len(), 2);
        drop((later, elsewhere));
        assert_eq!(relays.open.len(), 0, "nothing kept once every relay closed");
    }
}
