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
//! second with the eviction count. Each reading is set against this
//! machine's boot clock (`CLOCK_BOOTTIME`: it counts a suspended machine's
//! sleep, and never steps as a wall clock does, so a step of the clock
//! Redis and this replica share is seen too), before the `INFO` was sent
//! and after its answer came. The server's time moving on by more than
//! that clock could have between two readings (from the first's sending to
//! the second's answer, so that a replica stalled while a reading was in
//! flight never reads as a jump) is a jump by the difference.

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

/// This machine's boot clock, in ms (see the module's doc).
pub(super) fn boot_ms() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let millis = u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000;
    seconds.saturating_mul(1000).saturating_add(millis)
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

/// The boot clock (ms) before an `INFO` was sent and after its answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct RoundTrip {
    /// Before it was sent.
    pub sent_ms: u64,
    /// After its answer came.
    pub answered_ms: u64,
}

impl RoundTrip {
    /// The reading of `info` (an `INFO` answer) this round trip brought, if
    /// it holds the server's time.
    pub(super) fn of(self, info: &str) -> Option<Reading> {
        Some(Reading {
            server_ms: server_time_ms(info)?,
            round_trip: self,
        })
    }
}

/// One reading: the server's time, and the round trip that read it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reading {
    /// The server's wall clock.
    pub server_ms: u64,
    /// When it was read, on the boot clock.
    pub round_trip: RoundTrip,
}

/// The last reading, to measure the next against.
#[derive(Debug, Default)]
pub(super) struct JumpWatch {
    last: Mutex<Option<Reading>>,
}

impl JumpWatch {
    /// Takes `now`; answers how far the server's clock jumped forward since
    /// the last reading, if by more than [`SAID_MS`]. The time that passed
    /// here is taken at its most (from the last reading's sending to this
    /// one's answer), so a jump is never overstated.
    pub(super) fn observe(&self, now: Reading) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let jumped = last.and_then(|before| {
            let server = now.server_ms.checked_sub(before.server_ms)?;
            let here = now
                .round_trip
                .answered_ms
                .saturating_sub(before.round_trip.sent_ms);
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

    /// A jump is the server's time moving on further than this machine's
    /// boot clock could have between the readings: not a pause of the
    /// server (both move alike), not this machine's sleep (the boot clock
    /// counts it), not a stall of this replica while a reading was in
    /// flight, and not a small step.
    #[test]
    fn only_the_servers_clock_moving_past_the_boot_clock_is_a_jump() {
        let watch = JumpWatch::default();
        let at = |server_ms, sent_ms, answered_ms| Reading {
            server_ms,
            round_trip: RoundTrip {
                sent_ms,
                answered_ms,
            },
        };
        let base = 1_800_000_000_000;
        assert_eq!(watch.observe(at(base, 0, 1)), None, "the first reading");
        assert_eq!(watch.observe(at(base + 500, 500, 501)), None);
        // The server stopped for a minute, then went on: both moved alike.
        assert_eq!(watch.observe(at(base + 60_500, 60_500, 60_501)), None);
        // This machine slept an hour: its boot clock counted it.
        assert_eq!(
            watch.observe(at(base + 3_660_500, 3_660_500, 3_660_501)),
            None
        );
        // This replica stalled 20 s while a reading was in flight (Redis
        // answered at once): no jump, now nor at the next reading.
        assert_eq!(
            watch.observe(at(base + 3_661_000, 3_661_000, 3_681_000)),
            None
        );
        assert_eq!(
            watch.observe(at(base + 3_681_500, 3_681_500, 3_681_501)),
            None
        );
        // Redis's clock jumps two days ahead (an NTP step of a clock this
        // replica may share: its boot clock does not step).
        assert_eq!(
            watch.observe(at(base + 3_682_000 + 172_800_000, 3_682_000, 3_682_001)),
            Some(172_799_999)
        );
        // A jump back is no loss (keys live longer), nor a small step.
        assert_eq!(watch.observe(at(base, 3_682_500, 3_682_501)), None);
        assert_eq!(watch.observe(at(base + 4_500, 3_683_000, 3_683_001)), None);
    }

    #[test]
    fn the_boot_clock_moves_on() {
        let before = boot_ms();
        assert!(before > 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(boot_ms() >= before + 20);
    }
}
