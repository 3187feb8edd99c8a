//! A log line's timestamp: the text `tracing-subscriber`'s default timer
//! writes (RFC 3339 in UTC with microseconds, `2026-11-30T13:21:40.123456Z`),
//! with the date and time of day formatted once per second per thread.
//!
//! Why: the default timer converts the clock to a calendar date and
//! formats seven numbers through `core::fmt` on every line, about 2,300
//! instructions, most of a busy proxy's per-request logging cost after the
//! fields. Within one second only the microseconds change.

use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// The timer of pinproxy's log lines (see the module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct LineTime;

/// `YYYY-MM-DDTHH:MM:SS.`: the part of a timestamp that changes once a
/// second.
type SecondPrefix = [u8; 20];

thread_local! {
    /// The last second this thread formatted, and its prefix as text
    /// (checked as UTF-8 once a second, not on every line; the `String` is
    /// reused, so a new second allocates nothing).
    static LAST_SECOND: RefCell<(Option<u64>, String)> = const { RefCell::new((None, String::new())) };
}

impl LineTime {
    /// Writes the timestamp of now to `out`, as [`FormatTime::format_time`]
    /// does (the access line calls this on its `String`, without the
    /// layers' `dyn` writer).
    pub(super) fn write(self, out: &mut impl fmt::Write) -> fmt::Result {
        match write_now(out) {
            Some(written) => written,
            // A clock before 1970 or past year 9999: the default timer's
            // text for it.
            None => {
                let mut text = String::new();
                tracing_subscriber::fmt::time::SystemTime
                    .format_time(&mut Writer::new(&mut text))?;
                out.write_str(&text)
            }
        }
    }
}

impl FormatTime for LineTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        self.write(w)
    }
}

/// Writes the timestamp of now, unless the clock is outside the years
/// this formats (nothing is written then).
fn write_now(out: &mut impl fmt::Write) -> Option<fmt::Result> {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let second = since_epoch.as_secs();
    // `1dddddd`: the microseconds zero-padded to six digits, after a `1`
    // (itoa's text needs no UTF-8 check).
    let mut buffer = itoa::Buffer::new();
    let micros = buffer.format(1_000_000 + since_epoch.subsec_micros());
    let micros = micros.get(1..)?;
    // Neither the thread's end nor a re-entered borrow fails the line: it
    // takes the default timer's text then.
    let written = LAST_SECOND.try_with(|last| {
        let mut last = last.try_borrow_mut().ok()?;
        let (cached, prefix) = &mut *last;
        if *cached != Some(second) {
            *cached = None;
            let text = second_prefix(second)?;
            prefix.clear();
            prefix.push_str(std::str::from_utf8(&text).ok()?);
            *cached = Some(second);
        }
        Some(
            out.write_str(prefix)
                .and_then(|()| out.write_str(micros))
                .and_then(|()| out.write_char('Z')),
        )
    });
    written.ok().flatten()
}

/// The prefix of the second `unix_seconds`, for years 0 to 9999.
fn second_prefix(unix_seconds: u64) -> Option<SecondPrefix> {
    let seconds = i64::try_from(unix_seconds).ok()?;
    let at = time::OffsetDateTime::from_unix_timestamp(seconds).ok()?;
    let year = u32::try_from(at.year()).ok().filter(|y| *y <= 9999)?;
    let mut prefix = *b"0000-00-00T00:00:00.";
    write_digits(&mut prefix[0..4], year);
    write_digits(&mut prefix[5..7], u32::from(u8::from(at.month())));
    write_digits(&mut prefix[8..10], u32::from(at.day()));
    write_digits(&mut prefix[11..13], u32::from(at.hour()));
    write_digits(&mut prefix[14..16], u32::from(at.minute()));
    write_digits(&mut prefix[17..19], u32::from(at.second()));
    Some(prefix)
}

/// Writes `value` in decimal into all of `out`, zero-padded (the highest
/// digits are dropped if it does not fit).
fn write_digits(out: &mut [u8], mut value: u32) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(timer: &impl FormatTime) -> String {
        let mut text = String::new();
        let _ = timer.format_time(&mut Writer::new(&mut text));
        text
    }

    #[test]
    fn writes_what_the_default_timer_writes() {
        // The two readings may straddle a second; a few tries settle it.
        for _ in 0..5 {
            let ours = format(&LineTime);
            let theirs = format(&tracing_subscriber::fmt::time::SystemTime);
            assert_eq!(ours.len(), theirs.len(), "{ours} vs {theirs}");
            if ours[..19] == theirs[..19] {
                assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.');
                assert!(ours[20..26].bytes().all(|b| b.is_ascii_digit()));
                return;
            }
        }
        panic!("the timers never agreed on the second");
    }

    #[test]
    fn formats_known_seconds() {
        assert_eq!(
            &second_prefix(0).unwrap_or_default(),
            b"1970-01-01T00:00:00."
        );
        // 2026-11-30T13:21:40Z
        assert_eq!(
            &second_prefix(1_796_044_900).unwrap_or_default(),
            b"2026-11-30T13:21:40."
        );
        // The last second of 9999 still fits; the next year does not.
        assert_eq!(
            &second_prefix(253_402_300_799).unwrap_or_default(),
            b"9999-12-31T23:59:59."
        );
        assert_eq!(second_prefix(253_402_300_800), None);
    }
}
