//! A warning said at most once a period, where each occurrence is counted
//! (a metric) but a line for each would flood the log: an origin or a
//! client chooses how often they come.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lets one caller a period through (see the module docs). Usable as a
/// `static`.
#[derive(Debug)]
pub struct NowAndThen {
    /// When a caller was last let through, in seconds of the wall clock.
    last_s: AtomicU64,
    period_s: u64,
}

impl NowAndThen {
    /// One caller every `period_s` seconds.
    pub const fn every(period_s: u64) -> NowAndThen {
        NowAndThen {
            last_s: AtomicU64::new(0),
            period_s,
        }
    }

    /// Whether this call is the one to warn: a period has passed since the
    /// last one let through.
    pub fn due(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let last = self.last_s.load(Ordering::Relaxed);
        now.saturating_sub(last) >= self.period_s
            && self
                .last_s
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_a_period_is_let_through() {
        let warn = NowAndThen::every(60);
        assert!(warn.due());
        assert!(!warn.due());
        assert!(!warn.due());
    }
}
