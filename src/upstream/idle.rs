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

/// How often an exit's idle connections are checked, and how long one must
/// have been idle to count toward the cap: the cap is exceeded for at most
/// twice this long.
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
/// beyond `max_idle`, counting only connections idle for a whole
/// [`SWEEP_INTERVAL`]. Returns how many were closed for the cap.
///
/// Why not every idle one: under steady load each client's connection is
/// idle for a moment between its requests, so a sweep finds most of them
/// idle at once. Closing one used a millisecond ago saves no tunnel at the
/// exit (its lane opens another at once, with a full TLS handshake) and
/// churns the exit's connections; one unused for a second is surplus.
fn sweep(pools: &Lanes, max_idle: usize, now: Instant, idle_since: &mut Vec<Instant>) -> usize {
    idle_since.clear();
    pools.age();
    let lanes = pools.snapshot();
    for lane in &lanes {
        lane.expire_idle(now, idle_since);
    }
    // Before `now` by a whole interval (the runtime started earlier than
    // that, or nothing is old enough yet).
    let Some(in_use_after) = now.checked_sub(SWEEP_INTERVAL) else {
        return 0;
    };
    idle_since.retain(|since| *since <= in_use_after);
    let Some(excess) = idle_since.len().checked_sub(max_idle).filter(|n| *n > 0) else {
        return 0;
    };
    // The excess-th oldest time: closing everything idle since then or
    // earlier closes the excess (a few more on equal instants).
    let (_, cutoff, _) = idle_since.select_nth_unstable(excess - 1);
    let cutoff = *cutoff;
    lanes.iter().map(|lane| lane.close_idle_since(cutoff)).sum()
}
