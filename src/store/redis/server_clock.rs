//! Redis's clock, as the replicas see it.
//!
//! Redis expires keys by its own wall clock: every key's end is an
//! absolute time on it, and replicas of Redis expire by theirs after a
//! failover. A clock that jumps forward (an NTP step, a failover to a
//! primary whose clock reads ahead) ends every key whose time to live was
//! shorter than the jump at once. A pin outlives its identity's longest
//! lifetime by `identities.remember_retired`, so a jump shorter than that
//! only shortens how long retired credentials are remembered; a longer
//! one can take the pins of live identities, whose cookies would then be
//! pinned anew through whichever exit rotation picks, while the namespace's
//! history (which has no time to live) looks whole.
//!
//! So replicas watch the clock in what they already read: `INFO` carries
//! the server's time (`server_time_usec`, Redis 6.2 on), read every half
//! second with the eviction count. A reading whose server time moved on by
//! more than both of this replica's clocks did since the last (the
//! monotonic one, and the wall clock, which a suspended machine's monotonic
//! clock falls behind) jumped by the difference.

use std::sync::Mutex;

/// How far Redis's clock and a replica's may read apart, or Redis's jump
/// forward, before it is said: deaths and sticky windows allow replicas'
/// clocks 5 s (see `routing::lifecycle`), and Redis expires keys by its
/// own.
pub(super) const SAID_MS: u64 = 5_000;

/// How far `server_ms` (Redis's `TIME`, read between `sent_ms` and
/// `answered_ms` on this replica's clock) reads ahead of this clock,
/// taking the reading at the middle of the round trip.
pub(super) fn offset_ms(server_ms: u64, sent_ms: u64, answered_ms: u64) -> i64 {
    let middle = sent_ms / 2 + answered_ms / 2;
    i64::try_from(server_ms).unwrap_or(i64::MAX) - i64::try_from(middle).unwrap_or(i64::MAX)
}

/// The server's time in an `INFO` answer, in Unix ms.
pub(super) fn server_time_ms(info: &str) -> Option<u64> {
    let micros: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("server_time_usec:"))?
        .trim()
        .parse()
        .ok()?;
    Some(micros / 1000)
}

/// One reading: the server's time, and this replica's two clocks (ms)
/// taken at the middle of the round trip that read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reading {
    /// The server's wall clock.
    pub server_ms: u64,
    /// This replica's monotonic clock.
    pub steady_ms: u64,
    /// This replica's wall clock.
    pub wall_ms: u64,
}

/// This replica's clocks when a reading was taken (ms).
#[derive(Debug, Clone, Copy)]
pub(super) struct Clocks {
    /// The monotonic clock.
    pub steady_ms: u64,
    /// The wall clock.
    pub wall_ms: u64,
}

impl Clocks {
    /// The reading of `info` (an `INFO` answer) taken at these clocks, if
    /// it holds the server's time.
    pub(super) fn of(self, info: &str) -> Option<Reading> {
        Some(Reading {
            server_ms: server_time_ms(info)?,
            steady_ms: self.steady_ms,
            wall_ms: self.wall_ms,
        })
    }
}

/// The last reading, to measure the next against.
#[derive(Debug, Default)]
pub(super) struct JumpWatch {
    last: Mutex<Option<Reading>>,
}

impl JumpWatch {
    /// Takes `now`; answers how far the server's clock jumped forward since
    /// the last reading, if by more than [`SAID_MS`].
    pub(super) fn observe(&self, now: Reading) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let jumped = last.and_then(|before| {
            let server = now.server_ms.checked_sub(before.server_ms)?;
            let here = now
                .steady_ms
                .saturating_sub(before.steady_ms)
                .max(now.wall_ms.saturating_sub(before.wall_ms));
            Some(server.saturating_sub(here)).filter(|jump| *jump > SAID_MS)
        });
        *last = Some(now);
        jumped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's reading is taken at the middle of the round trip: a server
    /// 3 s ahead reads +3,000 whatever the round trip took; one behind,
    /// negative.
    #[test]
    fn the_clock_offset_is_read_at_the_middle_of_the_round_trip() {
        let sent = 1_800_000_000_000;
        assert_eq!(offset_ms(sent + 3_050, sent, sent + 100), 3_000);
        assert_eq!(offset_ms(sent + 50, sent, sent + 100), 0);
        assert_eq!(offset_ms(sent - 9_950, sent, sent + 100), -10_000);
    }

    #[test]
    fn the_servers_time_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nserver_time_usec:1800000000123456\r\n";
        assert_eq!(server_time_ms(info), Some(1_800_000_000_123));
        assert_eq!(server_time_ms("# Server\r\nredis_version:6.0.0\r\n"), None);
    }

    /// A jump is the server's time moving on past both of this replica's
    /// clocks: not a pause of the server (all move alike), not this
    /// machine's suspension (its wall clock moved on too), and not a step
    /// of this replica's own wall clock.
    #[test]
    fn only_the_servers_clock_moving_past_both_of_ours_is_a_jump() {
        let watch = JumpWatch::default();
        let at = |server_ms, steady_ms, wall_ms| Reading {
            server_ms,
            steady_ms,
            wall_ms,
        };
        let base = 1_800_000_000_000;
        assert_eq!(watch.observe(at(base, 0, base)), None, "the first reading");
        assert_eq!(watch.observe(at(base + 500, 500, base + 500)), None);
        // The server stopped for a minute, then went on: all moved alike.
        assert_eq!(
            watch.observe(at(base + 60_500, 60_500, base + 60_500)),
            None
        );
        // This machine slept an hour: its monotonic clock stood still.
        assert_eq!(
            watch.observe(at(base + 3_660_500, 61_000, base + 3_660_500)),
            None
        );
        // This replica's wall clock stepped back a day: not Redis's doing.
        assert_eq!(
            watch.observe(at(base + 3_661_000, 61_500, base - 86_400_000)),
            None
        );
        // Redis's clock jumps two days ahead.
        assert_eq!(
            watch.observe(at(
                base + 3_661_500 + 172_800_000,
                62_000,
                base - 86_399_500
            )),
            Some(172_800_000)
        );
        // A jump back is no loss (keys live longer), nor a small step.
        assert_eq!(watch.observe(at(base, 62_500, base - 86_399_000)), None);
        assert_eq!(
            watch.observe(at(base + 4_500, 63_000, base - 86_398_500)),
            None
        );
    }
}
