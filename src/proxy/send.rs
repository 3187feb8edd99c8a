//! Pipeline stage 7, send: the request leaves through the route's exit, on
//! the route's lane, and the exit's health and the identity's standing
//! learn what happened.
//!
//! A failure that is the exit's fault counts against its health; a new
//! tunnel of an identity that left from another address than the
//! identity's first retires the identity (`exit-ip-drift`) and nothing is
//! written to that tunnel. An unhealthy exit is tried now and then in the
//! background (without health probes), never with a client's request.

use std::time::{Duration, Instant};

use http::Request;

use super::target::Target;
use super::{Pipeline, ProxyError};
use crate::body::Body;
use crate::exits::health::HealthState;
use crate::identity::RetireReason;
use crate::metrics::{ExitLabel, UpstreamTimings};
use crate::routing::{Reason, Route};
use crate::store::PinStore as _;
use crate::upstream::{Answered, ConnectError, Origin, UpstreamBody, UpstreamError};

/// The timings of an answer that took `elapsed` from the hand-over to the
/// pool: a new connection's open (transport, TLS) is its own, the rest is
/// time to the first byte of the answer.
fn split_timings<B>(answered: &Answered<B>, elapsed: Duration) -> UpstreamTimings {
    if !answered.new_connection {
        return UpstreamTimings {
            connect: None,
            tls: None,
            tls_resumed: false,
            ttfb: Some(elapsed),
        };
    }
    let opened = answered.tunnel.timings;
    UpstreamTimings {
        connect: Some(opened.transport),
        tls: opened.tls,
        tls_resumed: opened.tls_resumed,
        ttfb: Some(
            elapsed
                .saturating_sub(opened.transport)
                .saturating_sub(opened.tls.unwrap_or_default()),
        ),
    }
}

impl Pipeline {
    /// Sends through the route's exit, keeping the exit's health and the
    /// identity's standing up to date with what happened. Returns the answer
    /// and how long it took upstream.
    pub(crate) async fn send(
        &self,
        route: &Route,
        origin: &Origin,
        request: Request<Body>,
    ) -> Result<(Answered<UpstreamBody>, UpstreamTimings), ProxyError> {
        let exit = &route.exit;
        let started = Instant::now();
        match exit
            .client
            .send(&route.lane, origin, request, started)
            .await
        {
            Ok(answered) => {
                let timings = split_timings(&answered, started.elapsed());
                exit.health.success();
                if route.reason == Reason::NewIdentity {
                    tracing::debug!("first request of a new identity forwarded");
                }
                Ok((answered, timings))
            }
            Err(error) => Err(self.upstream_failed(route, error).await),
        }
    }

    /// Sends a WebSocket upgrade through the route's exit on a connection of
    /// its own, accounting for failures as [`Pipeline::send`] does.
    pub(crate) async fn send_upgrade(
        &self,
        route: &Route,
        origin: &Origin,
        request: Request<Body>,
    ) -> Result<Answered<hyper::body::Incoming>, ProxyError> {
        let exit = &route.exit;
        match exit.client.send_upgrade(&route.lane, origin, request).await {
            Ok(answered) => {
                exit.health.success();
                Ok(answered)
            }
            Err(error) => Err(self.upstream_failed(route, error).await),
        }
    }

    /// Accounts for a failure to reach the origin through `route`: the
    /// exit's health, and retirement of an identity whose tunnel drifted to
    /// another address. Returns the answer for the client.
    pub(crate) async fn upstream_failed(&self, route: &Route, error: UpstreamError) -> ProxyError {
        let exit = &route.exit;
        if let (UpstreamError::IdentityRetired(reason), Some(identity)) = (&error, &route.identity)
        {
            return ProxyError::IdentityRetired {
                identity: identity.id,
                exit: identity.exit.clone(),
                reason: reason.clone(),
            };
        }
        if error.counts_against_exit() {
            self.metrics
                .exit_failures
                .get_or_create(&ExitLabel {
                    exit: exit.id().to_string(),
                })
                .inc();
            let now_ms = self.router.clock().now_ms();
            let change = if error.may_be_the_origins() {
                exit.health.doubtful_failure(now_ms)
            } else {
                exit.health.failure(now_ms)
            };
            if let Some(state) = change {
                tracing::warn!(exit = %exit.id(), ?state, "exit health changed");
            }
            // A death is stored as it happens (the sweep would store it
            // within a minute): after a crash the identities made before
            // it must still retire, not come back on a fresh health.
            if let (Some(HealthState::Dead), Some(died_at)) = (change, exit.health.died_at_ms()) {
                if let Err(e) = self
                    .router
                    .store()
                    .record_exit_death(exit.id(), died_at)
                    .await
                {
                    tracing::warn!(error = %e, exit = %exit.id(), "could not store the exit's death");
                }
            }
        }
        let drifted = match (&error, &route.identity) {
            (
                UpstreamError::Connect(ConnectError::ExitIpDrift { expected, observed }),
                Some(identity),
            ) => Some((identity, *expected, *observed)),
            _ => None,
        };
        let Some((identity, expected, observed)) = drifted else {
            return ProxyError::upstream(exit, error);
        };
        let reason = RetireReason::ExitIpDrift { expected, observed };
        // As for an invalidation: a store that cannot take the retirement
        // now gets it in the background, and this process honours it
        // meanwhile (answering the store's error alone lost the drift, and
        // left the identity to dial again).
        self.router
            .retire_settled(self.exits.clone(), (**identity).clone(), reason.clone())
            .await;
        ProxyError::IdentityRetired {
            identity: identity.id,
            exit: identity.exit.clone(),
            reason,
        }
    }

    /// Without health probes, an exit that is not healthy is tried now and
    /// then in the background, towards the origin of the request at hand.
    pub(crate) fn trial_unhealthy_exit(&self, target: &Target) {
        let clock = self.router.clock();
        let Some(exit) = self.exits.due_for_trial(|| clock.now_ms()) else {
            return;
        };
        let exit = exit.clone();
        let origin = target.origin.clone();
        let clock = self.router.clock().clone();
        self.tasks.spawn(async move {
            // The origin is a client's choice: only what is surely the
            // exit's fault counts in full, and an origin's own failure (a
            // name that does not resolve, a refused port) not at all.
            let change = match exit
                .client
                .probe(&origin, crate::upstream::dial::Lookup::Origin)
                .await
            {
                Ok(()) => exit.health.success(),
                Err(e) if e.is_exit_fault() && !e.may_be_the_origins() => {
                    exit.health.failure(clock.now_ms())
                }
                Err(e) if e.is_exit_fault() => exit.health.doubtful_failure(clock.now_ms()),
                Err(_) => None,
            };
            if let Some(state) = change {
                tracing::warn!(exit = %exit.id(), ?state, "exit health changed");
            }
        });
    }
}
