//! Wall-clock time for pins and identities, in milliseconds since the Unix
//! epoch. Pins outlive the process, so their times are wall-clock; tests
//! swap in a [`Clock::manual`] clock and advance it instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the current time.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stands still at the current time until advanced.
    pub fn manual() -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(system_ms()))),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(ms) => ms.load(Ordering::Relaxed),
            None => system_ms(),
        }
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(ms) = &self.manual {
            ms.fetch_add(duration_ms(by), Ordering::Relaxed);
        }
    }
}

/// How far the wall clock may run ahead of the time elapsed since it was
/// first read before [`Unhurried`] holds it back: the two drift a little
/// (NTP slews both), and a sweep's decisions are a minute apart anyway.
const UNHURRIED_SLACK_MS: u64 = 60_000;

/// Wall-clock time for decisions that forget (the sweep deleting what was
/// retired long enough, and pins past their cookie's expiry), held back to
/// the time that really elapsed since it was first read.
///
/// A wall clock stepped forward (a bad NTP source, a host set by hand)
/// would make the sweep forget retired credentials, and the pins of
/// cookies still valid, before their time; once forgotten, such a cookie
/// is founded anew on whichever exit its next request gets, and leaves
/// from another address than the one it was pinned to. Retiring on a
/// stepped clock only fails closed, so only forgetting is held back: by the
/// monotonic clock's reading (which no step moves) since the first call.
/// A step back is taken as it is (it only forgets later). Time a suspended
/// host slept is not counted either: forgetting waits that long more, in
/// the safe direction. A step made while the process was not running
/// cannot be told from the time it was down.
#[derive(Debug, Default)]
pub struct Unhurried {
    anchor: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    /// The lead last reported as news by [`Unhurried::ahead_ms`].
    said: AtomicU64,
}

impl Unhurried {
    /// `clock`'s time, held back to the first reading plus the time elapsed
    /// since (a manual clock, which tests advance on purpose, as it is).
    pub fn now_ms(&self, clock: &Clock) -> u64 {
        let wall = clock.now_ms();
        if clock.manual.is_some() {
            return wall;
        }
        let mut anchor = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        let (since_wall, since) = *anchor.get_or_insert((wall, std::time::Instant::now()));
        held_back(wall, since_wall, duration_ms(since.elapsed()))
    }

    /// How far `clock` reads ahead of [`Unhurried::now_ms`] at `wall` (a
    /// reading of `clock` just taken), and whether that is news: more than
    /// the slack away from the lead last reported as news, so that a caller
    /// says a step once, not at every reading while it lasts.
    pub fn ahead_ms(&self, clock: &Clock, wall: u64) -> (u64, bool) {
        let ahead = wall.saturating_sub(self.now_ms(clock));
        let said = self.said.load(Ordering::Relaxed);
        let news = ahead.abs_diff(said) > UNHURRIED_SLACK_MS;
        if news {
            self.said.store(ahead, Ordering::Relaxed);
        }
        (ahead, news)
    }
}

/// `wall`, at most `elapsed_ms` (plus the slack) past `since_wall`.
fn held_back(wall: u64, since_wall: u64, elapsed_ms: u64) -> u64 {
    wall.min(
        since_wall
            .saturating_add(elapsed_ms)
            .saturating_add(UNHURRIED_SLACK_MS),
    )
}

/// A duration in whole milliseconds, saturating.
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgetting_time_never_runs_ahead_of_the_time_elapsed() {
        const DAY: u64 = 86_400_000;
        let start = 1_700_000_000_000;
        // In step, or a little ahead: as it is.
        assert_eq!(held_back(start + DAY, start, DAY), start + DAY);
        assert_eq!(
            held_back(start + DAY + 30_000, start, DAY),
            start + DAY + 30_000
        );
        // Stepped forward 40 days an hour after the first reading: held
        // to the hour (and the slack).
        let hour = 3_600_000;
        assert_eq!(
            held_back(start + 40 * DAY, start, hour),
            start + hour + UNHURRIED_SLACK_MS
        );
        // Stepped back: as it is.
        assert_eq!(held_back(start - DAY, start, hour), start - DAY);
        // The system clock reads close to itself right away.
        let system = Clock::system();
        let unhurried = Unhurried::default();
        let first = unhurried.now_ms(&system);
        assert!(first.abs_diff(system.now_ms()) < 1_000);
        // A manual clock, advanced by tests, is never held back.
        let manual = Clock::manual();
        let before = unhurried.now_ms(&manual);
        manual.advance(Duration::from_secs(40 * 86_400));
        assert_eq!(unhurried.now_ms(&manual), before + 40 * DAY);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = Clock::manual();
        let start = clock.now_ms();
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now_ms(), start + 90_000);
    }
}
