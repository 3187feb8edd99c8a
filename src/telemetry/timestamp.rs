//! A log line's timestamp: the text `tracing-subscriber`'s default timer
//! writes (RFC 3339 in UTC with microseconds, `2026-11-30T13:21:40.123456Z`),
//! with the date and time of day formatted once per second per thread.
//!
//! Why: the default timer converts the clock to a calendar date and
//! formats seven numbers through `core::fmt` on every line, about 2,300
//! instructions, most of a busy proxy's per-request logging cost after the
//! fields. Within one second only the microseconds change.

use std::cell::Cell;
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
    /// The last second this thread formatted, and its prefix.
    static LAST_SECOND: Cell<Option<(u64, SecondPrefix)>> = const { Cell::new(None) };
}

impl FormatTime for LineTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let Ok(since_epoch) = SystemTime::now().duration_since(UNIX_EPOCH) else {
            // A clock before 1970: the default timer's text for it.
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        };
        let second = since_epoch.as_secs();
        let prefix = match LAST_SECOND.with(Cell::get) {
            Some((cached, prefix)) if cached == second => prefix,
            _ => match second_prefix(second) {
                Some(prefix) => {
                    LAST_SECOND.with(|last| last.set(Some((second, prefix))));
                    prefix
                }
                // Past year 9999: the default timer writes those.
                None => return tracing_subscriber::fmt::time::SystemTime.format_time(w),
            },
        };
        let mut text = [0u8; 27];
        text[..20].copy_from_slice(&prefix);
        write_digits(&mut text[20..26], since_epoch.subsec_micros());
        text[26] = b'Z';
        // Only ASCII was written.
        w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
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
