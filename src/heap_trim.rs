//! Giving freed heap back to the operating system after connections park.
//!
//! A parked tunnel or upstream connection frees hyper's buffers (about
//! 20 KiB each, see `front::framing` and `upstream::pool`), but glibc's
//! allocator keeps memory freed in the middle of its heaps for reuse, so a
//! burst of connections that go idle together leaves the process's RSS at
//! its peak. `malloc_trim(0)` returns every whole free page of every arena.
//! It walks the heaps, so it runs on a blocking thread, at most once per
//! [`PERIOD`], and only after enough connections parked
//! (`pinproxy_client_connections_parked_total` and
//! `pinproxy_upstream_connections_parked_total`) to have freed a megabyte or
//! so, or once parking has stopped with parks not yet trimmed after (a small
//! fleet's tunnels, or the tail of a burst).
//!
//! Other C libraries (musl, other systems) have no `malloc_trim`; there the
//! trimmer does nothing.
#![allow(unsafe_code)]

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

/// How often the trimmer looks.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Parks since the last trim that make a trim worth its walk (64 parked
/// connections free about 1.3 MiB).
const WORTH_TRIMMING: u64 = 64;

/// Trims every [`PERIOD`] when `parked` (the daemon's counts of parked
/// connections) says it is worth it (see [`worth_trimming`]), until
/// `shutdown`.
pub async fn trim_loop<const N: usize>(parked: [Counter; N], shutdown: CancellationToken) {
    let parks = || parked.iter().map(Counter::get).sum::<u64>();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmed_at = parks();
    let mut looked_at = trimmed_at;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = parks();
        let worth = worth_trimming(trimmed_at, looked_at, now);
        looked_at = now;
        if !worth {
            continue;
        }
        trimmed_at = now;
        if tokio::task::spawn_blocking(trim).await.is_err() {
            tracing::debug!("the heap trim did not finish");
        }
    }
}

/// Whether to trim, given the parks counted at the last trim, at the
/// previous look and now: after [`WORTH_TRIMMING`] parks, or once a period
/// passed without a park while some parked since the last trim (otherwise
/// fewer than that would never be given back).
fn worth_trimming(trimmed_at: u64, looked_at: u64, now: u64) -> bool {
    let since_trim = now.saturating_sub(trimmed_at);
    since_trim >= WORTH_TRIMMING || (since_trim > 0 && now == looked_at)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: malloc_trim takes no pointer and only returns free pages of the
    // allocator's own heaps; it is thread-safe (it locks each arena).
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_many_parks_or_once_parking_stops() {
        // Nothing parked since the last trim: nothing to give back.
        assert!(!worth_trimming(10, 10, 10));
        // A burst under way: wait for it.
        assert!(!worth_trimming(10, 10, 40));
        assert!(!worth_trimming(10, 40, 60));
        // Enough parks for a trim even while they continue.
        assert!(worth_trimming(10, 40, 10 + WORTH_TRIMMING));
        // A few parks, then a quiet period: their buffers go back too.
        assert!(worth_trimming(10, 13, 13));
    }
}
