//! Pipeline stage 4, route: decide which identity (and so which exit,
//! upstream session and egress address) a request belongs to, and keep
//! identities' lives in order.
//!
//! - [`router`]: a request's credentials → a [`Route`] (an existing
//!   identity, a new one, or rotation for cookie-less traffic), or an error
//!   that stops the request;
//! - [`lifecycle`]: retirement (by rule, by expiry, by exit death), sweeping,
//!   and sharing exit deaths through the store;
//! - [`policy`]: the retire and conflict policies and lifetimes.
//!
//! Invariant: a credential's identity never changes and an identity's exit
//! and upstream session never change. Nothing here moves a session; it can
//! only be retired.

pub mod lifecycle;
pub mod policy;
pub mod router;

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::identity::{IdentityId, RetireReason};
use crate::metrics::Metrics;
use crate::store::Store;

pub use lifecycle::ends;
pub use policy::{ConflictPolicy, Policies, RetirePolicy};
pub use router::{DeadCredential, Reason, Route, RouteError};

/// Routes requests by their identities.
#[derive(Debug)]
pub struct Router {
    store: Store,
    clock: Clock,
    policies: Policies,
    metrics: Arc<Metrics>,
    /// Retirements decided where no await is possible (a body scan), not yet
    /// in the store: routing honours them at once.
    pending: dashmap::DashMap<IdentityId, RetireReason>,
    /// Background work that changes identities (retirements decided where
    /// no await is possible), awaited at shutdown so none is lost.
    tasks: TaskTracker,
    /// The JA4 each live identity's upstream connections were last seen to
    /// send (measured off the wire; kept in memory only).
    sent_ja4: dashmap::DashMap<IdentityId, Arc<str>>,
}

impl Router {
    /// Routing over `store`; background work goes to `tasks`.
    pub fn new(
        store: Store,
        clock: Clock,
        policies: Policies,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Router {
        Router {
            store,
            clock,
            policies,
            metrics,
            pending: dashmap::DashMap::new(),
            tasks,
            sent_ja4: dashmap::DashMap::new(),
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

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Records the JA4 an identity's upstream connection sent; true when it
    /// is the first seen for the identity (or another than before).
    pub fn observe_sent_ja4(&self, id: IdentityId, ja4: &Arc<str>) -> bool {
        match self.sent_ja4.insert(id, ja4.clone()) {
            Some(before) => before != *ja4,
            None => true,
        }
    }

    /// The JA4 an identity's upstream connections were last seen to send.
    pub fn sent_ja4(&self, id: IdentityId) -> Option<Arc<str>> {
        self.sent_ja4.get(&id).map(|j| j.clone())
    }

    /// The retirement decided for `id` but not yet stored, if any.
    pub(crate) fn pending_retirement(&self, id: IdentityId) -> Option<RetireReason> {
        self.pending.get(&id).map(|r| r.clone())
    }
}
