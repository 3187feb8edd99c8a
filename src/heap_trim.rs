//! Giving freed heap back to the operating system after connections park.
//!
//! A parked tunnel frees hyper's buffers (about 20 KiB each, see
//! `front::framing`), but glibc's allocator keeps memory freed in the middle
//! of its heaps for reuse, so a burst of tunnels that go idle together
//! leaves the process's RSS at its peak. `malloc_trim(0)` returns every
//! whole free page of every arena. It walks the heaps, so it runs on a
//! blocking thread, at most once per [`PERIOD`], and only after enough
//! connections parked (`pinproxy_client_connections_parked_total`) to have
//! freed a megabyte or so.
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

/// Trims every [`PERIOD`] once `parked` (the daemon's count of parked
/// connections) has grown by [`WORTH_TRIMMING`] since the last trim, until
/// `shutdown`.
pub async fn trim_loop(parked: Counter, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmed_at = parked.get();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = parked.get();
        if now.saturating_sub(trimmed_at) < WORTH_TRIMMING {
            continue;
        }
        trimmed_at = now;
        if tokio::task::spawn_blocking(trim).await.is_err() {
            tracing::debug!("the heap trim did not finish");
        }
    }
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
