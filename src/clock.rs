//! Wall-clock time for pins and identities, in milliseconds since the Unix
//! epoch. Pins outlive the process, so their times are wall-clock; tests
//! swap in a [`Clock::manual`] clock and advance it instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the current time.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

/// A manual clock's readings.
#[derive(Debug)]
struct Manual {
    /// Its wall-clock time.
    wall: AtomicU64,
    /// The time it was advanced by in all (not counting steps).
    elapsed: AtomicU64,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stands still at the current time until advanced.
    pub fn manual() -> Clock {
        Clock {
            manual: Some(Arc::new(Manual {
                wall: AtomicU64::new(system_ms()),
                elapsed: AtomicU64::new(0),
            })),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(manual) => manual.wall.load(Ordering::Relaxed),
            None => system_ms(),
        }
    }

    /// Milliseconds elapsed since an arbitrary point before the first call,
    /// by a clock no step of the wall clock moves (the monotonic clock; a
    /// manual clock's advances).
    pub fn elapsed_ms(&self) -> u64 {
        static START: std::sync::LazyLock<std::time::Instant> =
            std::sync::LazyLock::new(std::time::Instant::now);
        match &self.manual {
            Some(manual) => manual.elapsed.load(Ordering::Relaxed),
            None => duration_ms(START.elapsed()),
        }
    }

    /// Moves a manual clock forward, time elapsing (no effect on the
    /// system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            manual.wall.fetch_add(duration_ms(by), Ordering::Relaxed);
            manual.elapsed.fetch_add(duration_ms(by), Ordering::Relaxed);
        }
    }

    /// Steps a manual clock's wall-clock time forward with no time elapsing,
    /// as a bad NTP step does (no effect on the system clock).
    pub fn step(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            manual.wall.fetch_add(duration_ms(by), Ordering::Relaxed);
        }
    }

    /// Steps a manual clock's wall-clock time back, as a correction of a
    /// clock that read ahead does (no effect on the system clock).
    pub fn step_back(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            let by = duration_ms(by);
            let _ = manual
                .wall
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ms| {
                    Some(ms.saturating_sub(by))
                });
        }
    }
}

/// How far the wall clock may run ahead of the time elapsed since it was
/// first read before [`Unhurried`] holds it back: NTP slews both alike, so
/// they part by steps alone, and a step of a few seconds is no news.
const UNHURRIED_SLACK_MS: u64 = 5_000;

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
    /// The first reading: the wall clock's, and [`Clock::elapsed_ms`].
    anchor: std::sync::OnceLock<(u64, u64)>,
    /// The same for [`Unhurried::at_least_ms`] (see [`Unhurried::since`]).
    floor: std::sync::OnceLock<(u64, u64)>,
    /// The lead last reported as news by [`Unhurried::ahead_ms`].
    said: AtomicU64,
}

impl Unhurried {
    /// One whose first reading is `clock`'s now, taken with `since_ms`, the
    /// latest time a store loaded at start was stamped with. Forgetting
    /// counts from the earlier of the two: a wall clock stepped forward
    /// while the process was down cannot be told from the time it was
    /// down, so that time does not count towards forgetting (what was
    /// retired is remembered that much longer). [`Unhurried::at_least_ms`]
    /// counts from the later: a clock stepped back while it was down reads
    /// before what the store already holds.
    pub fn since(clock: &Clock, since_ms: Option<u64>) -> Unhurried {
        let unhurried = Unhurried::default();
        let (wall, elapsed) = (clock.now_ms(), clock.elapsed_ms());
        let since = since_ms.unwrap_or(wall);
        let _ = unhurried.anchor.set((since.min(wall), elapsed));
        let _ = unhurried.floor.set((since.max(wall), elapsed));
        unhurried
    }

    /// `clock`'s time, held back to the first reading plus the time elapsed
    /// since.
    pub fn now_ms(&self, clock: &Clock) -> u64 {
        let (wall, elapsed) = (clock.now_ms(), clock.elapsed_ms());
        let (since_wall, since) = *self.anchor.get_or_init(|| (wall, elapsed));
        held_back(wall, since_wall, elapsed.saturating_sub(since))
    }

    /// `clock`'s time, but never earlier than the first reading plus the
    /// time elapsed since: for dating what must not be dated early (a
    /// retirement, forgotten that much early once a clock stepped back is
    /// corrected). Not for judging ages against stamps the clock made:
    /// after a step back they would all read the step too old.
    pub fn at_least_ms(&self, clock: &Clock) -> u64 {
        let (wall, elapsed) = (clock.now_ms(), clock.elapsed_ms());
        let (since_wall, since) = *self.floor.get_or_init(|| (wall, elapsed));
        wall.max(since_wall.saturating_add(elapsed.saturating_sub(since)))
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
            held_back(start + DAY + 3_000, start, DAY),
            start + DAY + 3_000
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
        let first = Unhurried::default().now_ms(&system);
        assert!(first.abs_diff(system.now_ms()) < 1_000);
        // A manual clock: advanced, as it is; stepped, held back.
        let manual = Clock::manual();
        let unhurried = Unhurried::default();
        let before = unhurried.now_ms(&manual);
        manual.advance(Duration::from_secs(40 * 86_400));
        assert_eq!(unhurried.now_ms(&manual), before + 40 * DAY);
        manual.step(Duration::from_secs(40 * 86_400));
        assert_eq!(manual.now_ms(), before + 80 * DAY);
        assert_eq!(
            unhurried.now_ms(&manual),
            before + 40 * DAY + UNHURRIED_SLACK_MS
        );
        assert_eq!(
            unhurried.ahead_ms(&manual, manual.now_ms()),
            (40 * DAY - UNHURRIED_SLACK_MS, true)
        );
        assert!(!unhurried.ahead_ms(&manual, manual.now_ms()).1, "said once");
        // Stepped back: dating goes on at the time elapsed.
        let manual = Clock::manual();
        let unhurried = Unhurried::default();
        let first = unhurried.at_least_ms(&manual);
        manual.advance(Duration::from_secs(60));
        manual.step_back(Duration::from_secs(3600));
        assert_eq!(unhurried.at_least_ms(&manual), first + 60_000);
        manual.step(Duration::from_secs(7200));
        assert_eq!(unhurried.at_least_ms(&manual), manual.now_ms());
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = Clock::manual();
        let start = clock.now_ms();
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now_ms(), start + 90_000);
    }
}
