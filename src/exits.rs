//! Exits: the upstream routes a request can leave through.
//!
//! An exit is named by a stable [`ExitId`](crate::identity::ExitId) (pins
//! refer to it), described by its [`ExitSpec`] ([`spec`]: the URL, the
//! kind, the options). At run time an [`Exit`] adds its connection pools,
//! its [`health`] and its anonymous upstream [`sessions`]; the [`ExitSet`]
//! picks exits for traffic that no pin decides ([`select`]).
//!
//! Invariant: credentials in an exit URL never appear in `Debug` or
//! `Display` output; use [`ExitSpec::redacted_url`] when showing an exit.

pub mod health;
pub mod select;
pub mod sessions;
pub mod spec;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::identity::ExitId;
use crate::net::HostPort;
use crate::upstream::ExitClient;
use health::{Health, HealthState};
use sessions::AnonymousSessions;

pub use spec::{ExitOptions, ExitSpec, ExitUrlError};

/// A configured exit ready for traffic.
#[derive(Debug)]
pub struct Exit {
    /// What was configured.
    pub spec: ExitSpec,
    /// The exit's connection pools.
    pub client: ExitClient,
    /// Its health.
    pub health: Health,
    /// The upstream sessions cookie-less traffic uses.
    pub sessions: AnonymousSessions,
}

impl Exit {
    /// The exit's id.
    pub fn id(&self) -> &ExitId {
        &self.spec.id
    }
}

/// All configured exits, by id and in weighted rotation.
#[derive(Debug)]
pub struct ExitSet {
    exits: Vec<Arc<Exit>>,
    by_id: HashMap<ExitId, usize>,
    rotation: select::Rotation,
    /// Without probes, unhealthy exits get one trial probe this often.
    trial_interval_ms: Option<u64>,
}

impl ExitSet {
    /// A set of exits (at least one; configuration validation ensures it).
    /// `trial_interval_ms` enables trial probes of unhealthy exits.
    pub fn new(exits: Vec<Exit>, trial_interval_ms: Option<u64>) -> ExitSet {
        let weights: Vec<u32> = exits.iter().map(|e| e.spec.options.weight).collect();
        let exits: Vec<Arc<Exit>> = exits.into_iter().map(Arc::new).collect();
        let by_id = exits
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id().clone(), i))
            .collect();
        ExitSet {
            exits,
            by_id,
            rotation: select::Rotation::new(&weights),
            trial_interval_ms,
        }
    }

    /// The exit with this id, if configured.
    pub fn get(&self, id: &ExitId) -> Option<&Arc<Exit>> {
        self.by_id.get(id).map(|&i| &self.exits[i])
    }

    /// The next exit in weighted rotation that is healthy; if none is, an
    /// unhealthy one; never a dead one. `None` when every exit is dead.
    pub fn pick(&self, now_ms: u64) -> Option<&Arc<Exit>> {
        let _ = now_ms;
        let mut fallback = None;
        for index in self.rotation.cycle() {
            let exit = &self.exits[index];
            match exit.health.state() {
                HealthState::Healthy => return Some(exit),
                HealthState::Unhealthy if fallback.is_none() => fallback = Some(exit),
                _ => {}
            }
        }
        fallback
    }

    /// An exit that is not healthy and is due for a trial (at most one per
    /// exit every trial interval; only when no probes are configured). The
    /// caller probes it in the background, towards the origin of the request
    /// at hand, so the trial never costs a client request.
    pub fn due_for_trial(&self, now_ms: u64) -> Option<&Arc<Exit>> {
        let interval = self.trial_interval_ms?;
        self.exits.iter().find(|e| {
            e.health.state() != HealthState::Healthy && e.health.claim_trial(now_ms, interval)
        })
    }

    /// All exits, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Exit>> {
        self.exits.iter()
    }
}

/// Probes one exit every `interval` (the first time at once).
pub async fn probe_loop(
    exit: Arc<Exit>,
    target: HostPort,
    interval: Duration,
    clock: Clock,
    shutdown: CancellationToken,
) {
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = exit.client.probe(&target) => outcome,
        };
        let change = match &outcome {
            Ok(()) => exit.health.success(),
            Err(error) => {
                tracing::debug!(exit = %exit.id(), %error, "health probe failed");
                exit.health.failure(clock.now_ms())
            }
        };
        if let Some(state) = change {
            tracing::warn!(exit = %exit.id(), ?state, "exit health changed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
