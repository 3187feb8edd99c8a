//! Pipeline stage 2: decide which exit a request leaves through, and the pin
//! store that makes the decision stick.
//!
//! Input: the request's tracked cookies. Output: a [`Route`] (an exit and why
//! it was chosen) or an error that stops the request.
//!
//! Rules:
//! - no tracked cookie: the next exit in rotation;
//! - tracked cookies, one or more already pinned, all to the same exit: that
//!   exit, and any unpinned cookie of the request joins it;
//! - tracked cookies pinned to different exits: [`AffinityError::Conflict`],
//!   never a guess;
//! - tracked cookies, none pinned: the next exit in rotation, and every
//!   cookie is pinned to it. Pins are made with an atomic pin-if-absent, in
//!   key order, so two requests racing with the same unseen cookie end on one
//!   exit: the first pin wins and the loser follows it.
//!
//! Invariant: a pin never moves. A pinned exit that is no longer configured
//! fails the request ([`AffinityError::PinnedExitMissing`]).

pub mod memory;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cookies::{PinKey, SetTrackedCookie, TrackedCookie};
use crate::exits::{Exit, ExitId, ExitSet};

/// What a pin records: the exit a cookie value belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The exit.
    pub exit: ExitId,
    /// When the pin was made, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl Pin {
    /// A pin to `exit` made now.
    pub fn now(exit: ExitId) -> Pin {
        Pin {
            exit,
            created_ms: unix_ms(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The pin store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("pin store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where pins live. Implementations must make [`PinStore::pin_if_absent`]
/// atomic: of two concurrent calls for one key, exactly one pin is stored and
/// both callers learn it.
pub trait PinStore: Send + Sync {
    /// The pins of `keys`, in order (`None` where a key is not pinned).
    fn lookup(
        &self,
        keys: &[PinKey],
    ) -> impl Future<Output = Result<Vec<Option<Pin>>, StoreError>> + Send;

    /// Stores `pin` for `key` unless `key` is pinned already; returns the pin
    /// in force afterwards (the new one, or the earlier one that won).
    fn pin_if_absent(
        &self,
        key: PinKey,
        pin: Pin,
    ) -> impl Future<Output = Result<Pin, StoreError>> + Send;

    /// Number of pins stored.
    fn count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The configured pin store.
#[derive(Debug)]
pub enum Store {
    /// In-process only; pins die with the process.
    Memory(memory::MemoryStore),
}

impl PinStore for Store {
    async fn lookup(&self, keys: &[PinKey]) -> Result<Vec<Option<Pin>>, StoreError> {
        match self {
            Store::Memory(s) => s.lookup(keys).await,
        }
    }

    async fn pin_if_absent(&self, key: PinKey, pin: Pin) -> Result<Pin, StoreError> {
        match self {
            Store::Memory(s) => s.pin_if_absent(key, pin).await,
        }
    }

    async fn count(&self) -> Result<u64, StoreError> {
        match self {
            Store::Memory(s) => s.count().await,
        }
    }
}

/// Why a request was sent where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No tracked cookie: rotation.
    Rotated,
    /// A tracked cookie was pinned to this exit already.
    Pinned,
    /// Tracked cookies seen for the first time were pinned to this exit.
    NewPin,
}

/// The exit chosen for a request.
#[derive(Debug, Clone)]
pub struct Route {
    /// The exit.
    pub exit: Arc<Exit>,
    /// Why.
    pub reason: Reason,
}

/// A request that cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// The request's tracked cookies are pinned to different exits.
    #[error("tracked cookies are pinned to different exits: {}", describe_conflict(.0))]
    Conflict(Vec<(TrackedCookie, ExitId)>),
    /// A cookie is pinned to an exit that is not configured any more.
    #[error(
        "cookie {cookie} is pinned to exit {exit}, which is not configured; pinproxy will not \
         send it through another exit"
    )]
    PinnedExitMissing {
        /// The cookie.
        cookie: TrackedCookie,
        /// Its exit.
        exit: ExitId,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe_conflict(pins: &[(TrackedCookie, ExitId)]) -> String {
    pins.iter()
        .map(|(cookie, exit)| format!("{cookie} -> exit {exit}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Routes requests by their pins.
#[derive(Debug)]
pub struct Affinity {
    store: Store,
}

impl Affinity {
    /// Routing over `store`.
    pub fn new(store: Store) -> Affinity {
        Affinity { store }
    }

    /// The pin store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Chooses the exit for a request carrying `cookies` (see the module docs).
    pub async fn route(
        &self,
        exits: &ExitSet,
        cookies: &[TrackedCookie],
    ) -> Result<Route, AffinityError> {
        if cookies.is_empty() {
            return Ok(Route {
                exit: exits.next_in_rotation().clone(),
                reason: Reason::Rotated,
            });
        }
        // Key order makes concurrent multi-cookie pinning deterministic.
        let mut cookies: Vec<&TrackedCookie> = cookies.iter().collect();
        cookies.sort_by_key(|c| c.key);
        let keys: Vec<PinKey> = cookies.iter().map(|c| c.key).collect();
        let pins = self.store.lookup(&keys).await?;

        let mut pinned: Vec<(TrackedCookie, ExitId)> = Vec::new();
        for (cookie, pin) in cookies.iter().zip(&pins) {
            if let Some(pin) = pin {
                pinned.push(((*cookie).clone(), pin.exit.clone()));
            }
        }
        let (exit, reason) = match pinned.first() {
            Some((_, first)) => {
                if pinned.iter().any(|(_, e)| e != first) {
                    return Err(AffinityError::Conflict(pinned));
                }
                (first.clone(), Reason::Pinned)
            }
            None => (exits.next_in_rotation().id().clone(), Reason::NewPin),
        };

        // Pin whatever is not pinned yet. The first pin-if-absent may lose a
        // race; then the winner's exit is the one everything follows.
        let mut exit = exit;
        let mut settled = pinned;
        for (cookie, pin) in cookies.iter().zip(&pins) {
            if pin.is_some() {
                continue;
            }
            let winner = self
                .store
                .pin_if_absent(cookie.key, Pin::now(exit.clone()))
                .await?;
            if winner.exit != exit {
                if settled.is_empty() {
                    exit = winner.exit.clone();
                } else {
                    settled.push(((*cookie).clone(), winner.exit));
                    return Err(AffinityError::Conflict(settled));
                }
            }
            settled.push(((*cookie).clone(), winner.exit));
        }

        match exits.get(&exit) {
            Some(found) => Ok(Route {
                exit: found.clone(),
                reason,
            }),
            None => Err(AffinityError::PinnedExitMissing {
                cookie: settled
                    .into_iter()
                    .next()
                    .map(|(c, _)| c)
                    .unwrap_or_else(|| (*cookies[0]).clone()),
                exit,
            }),
        }
    }

    /// Pins the tracked cookies a response sets to the exit that carried
    /// it. A rotated cookie value thus inherits its exit. A value already
    /// pinned elsewhere keeps its first pin (pins never move); that is
    /// returned so the caller can report it.
    pub async fn learn(
        &self,
        exit: &ExitId,
        set: &[SetTrackedCookie],
    ) -> Result<Vec<(TrackedCookie, ExitId)>, StoreError> {
        let mut kept_elsewhere = Vec::new();
        for cookie in set.iter().filter(|c| !c.deletes) {
            let winner = self
                .store
                .pin_if_absent(cookie.cookie.key, Pin::now(exit.clone()))
                .await?;
            if &winner.exit != exit {
                kept_elsewhere.push((cookie.cookie.clone(), winner.exit));
            }
        }
        Ok(kept_elsewhere)
    }
}
