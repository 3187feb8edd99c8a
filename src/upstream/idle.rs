//! The idle connections of one exit, kept within bounds across its lanes.
//!
//! Each lane (an identity, an anonymous session) pools its own connections,
//! so an exit holds one idle connection per recently active identity. A
//! fleet that churns identities (fresh jars every few pages) leaves many
//! behind, each an open tunnel through the exit's proxy, and providers (or
//! a tinyproxy's `MaxClients`) limit those: new tunnels then wait until the
//! old ones time out. The sweeper closes idle HTTP/1.1 connections once
//! they are past `timeouts.pool_idle` (on time, not at the lane's next
//! use) and, beyond `limits.max_idle_per_exit`, the longest idle first, as
//! a browser closes idle sockets under pressure. Each sweep also ages the
//! exit's lanes (see [`super::lanes`]): unused ones are dropped. It runs
//! beside the request path, never on it: requests take no exit-wide lock.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::lanes::Lanes;

/// How often an exit's idle connections are checked: the cap is exceeded
/// for at most this long.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The sweeper of one exit; stops when the last clone of its exit client
/// is dropped (an exit removed by a reload).
#[derive(Debug)]
pub(super) struct Sweeper(Option<JoinHandle<()>>);

impl Sweeper {
    /// Starts sweeping `pools` every [`SWEEP_INTERVAL`], keeping at most
    /// `max_idle` idle connections; inert outside a Tokio runtime (a
    /// client built to validate a configuration).
    pub(super) fn start(pools: Arc<Lanes>, max_idle: usize) -> Sweeper {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Sweeper(None);
        };
        Sweeper(Some(runtime.spawn(async move {
            let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut idle_since = Vec::new();
            loop {
                ticks.tick().await;
                sweep(&pools, max_idle, Instant::now(), &mut idle_since);
            }
        })))
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// One sweep: expired connections closed everywhere, then the longest idle
/// beyond `max_idle`. Returns how many were closed for the cap.
fn sweep(pools: &Lanes, max_idle: usize, now: Instant, idle_since: &mut Vec<Instant>) -> usize {
    idle_since.clear();
    pools.age();
    let lanes = pools.snapshot();
    for lane in &lanes {
        lane.expire_idle(now, idle_since);
    }
    let Some(excess) = idle_since.len().checked_sub(max_idle).filter(|n| *n > 0) else {
        return 0;
    };
    // The excess-th oldest time: closing everything idle since then or
    // earlier closes the excess (a few more on equal instants).
    let (_, cutoff, _) = idle_since.select_nth_unstable(excess - 1);
    let cutoff = *cutoff;
    lanes.iter().map(|lane| lane.close_idle_since(cutoff)).sum()
}
