//! How a text log line writes an event's fields: `message name=value ...`,
//! the same text `tracing-subscriber`'s default field formatter writes
//! (strings quoted and escaped, display values bare, field names italic
//! and `=` dimmed on a terminal, control characters in the message
//! escaped), at a fraction of its cost.
//!
//! Why hand-written: the access line is written once per request, and the
//! default formatter spent about 11,000 instructions on its fields (ANSI
//! styling applied through `Display` even with colours off, every number
//! and string through `Debug`, milliseconds through float formatting), a
//! tenth of a request's whole cost. Here the common cases take a direct
//! path and anything unusual falls back to the same `Debug` output.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// The text format's field formatter (see the module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct LineFields;

impl<'a> MakeVisitor<Writer<'a>> for LineFields {
    type Visitor = LineVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> LineVisitor<'a> {
        LineVisitor {
            writer: target,
            first: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's fields.
#[derive(Debug)]
pub struct LineVisitor<'a> {
    writer: Writer<'a>,
    /// Nothing written yet (no separating space).
    first: bool,
    result: fmt::Result,
}

impl LineVisitor<'_> {
    /// Writes the separator and `name=` for a field that is not the
    /// message; false once writing has failed.
    fn begin(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let separator = if self.first { "" } else { " " };
        self.first = false;
        // `write_str` pieces rather than `write!`: this runs for every
        // field of every access line.
        let (before, after) = if self.writer.has_ansi_escapes() {
            ("\x1b[3m", "\x1b[0m\x1b[2m=\x1b[0m")
        } else {
            ("", "=")
        };
        self.result = [separator, before, name, after]
            .into_iter()
            .try_for_each(|piece| self.writer.write_str(piece));
        self.result.is_ok()
    }

    /// Writes the message, escaping control characters (a message may
    /// carry text from a client; it must not drive the terminal).
    fn message(&mut self, text: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = self
            .writer
            .write_str(separator)
            .and_then(|()| Escaping(&mut self.writer).write_fmt(text));
    }

    fn finish_with(&mut self, result: fmt::Result) {
        self.result = result;
    }
}

impl Visit for LineVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.message(format_args!("{value}"));
        }
        if self.begin(field) {
            let result = if value.bytes().all(plain_in_quotes) {
                ["\"", value, "\""]
                    .into_iter()
                    .try_for_each(|piece| self.writer.write_str(piece))
            } else {
                write!(self.writer, "{value:?}")
            };
            self.finish_with(result);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.begin(field) {
            let result = write_u64(&mut self.writer, value);
            self.finish_with(result);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.begin(field) {
            let sign = if value < 0 { "-" } else { "" };
            let result = self
                .writer
                .write_str(sign)
                .and_then(|()| write_u64(&mut self.writer, value.unsigned_abs()));
            self.finish_with(result);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.begin(field) {
            let result = self.writer.write_str(if value { "true" } else { "false" });
            self.finish_with(result);
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.begin(field) {
            let result = match thousandths(value) {
                Some(thousandths) => write_thousandths(&mut self.writer, thousandths),
                None => write!(self.writer, "{value:?}"),
            };
            self.finish_with(result);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            return self.message(format_args!("{value:?}"));
        }
        if self.begin(field) {
            // A `%` field's Display may carry a client's or an origin's
            // text (a cookie name): escaped as the message is.
            let result = Escaping(&mut self.writer).write_fmt(format_args!("{value:?}"));
            self.finish_with(result);
        }
    }
}

impl VisitOutput<fmt::Result> for LineVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for LineVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Whether `byte` is written as itself inside a `Debug`-quoted string.
pub(super) fn plain_in_quotes(byte: u8) -> bool {
    (0x20..0x7f).contains(&byte) && byte != b'"' && byte != b'\\'
}

/// Writes through to a line, control characters as `\u{..}` escapes.
struct Escaping<'w, 'a>(&'w mut Writer<'a>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // C0 controls and DEL are single bytes, every C1 control starts
        // with 0xC2 (which also starts other characters: they only take
        // the slower path).
        if !text.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
            return self.0.write_str(text);
        }
        for c in text.chars() {
            if c.is_control() {
                write!(self.0, "{}", c.escape_unicode())?;
            } else {
                self.0.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Writes `value` in decimal.
pub(super) fn write_u64(writer: &mut impl fmt::Write, value: u64) -> fmt::Result {
    writer.write_str(itoa::Buffer::new().format(value))
}

/// `value` as a whole number of thousandths, when it is one (durations in
/// milliseconds with microsecond precision always are) and small enough
/// that the decimal below is its shortest exact form.
pub(super) fn thousandths(value: f64) -> Option<u64> {
    if !(0.0..1e12).contains(&value) {
        return None;
    }
    let scaled = (value * 1000.0).round();
    // `as` is exact here: `scaled` is a whole number below 2^53.
    (scaled / 1000.0 == value).then_some(scaled as u64)
}

/// Writes `thousandths / 1000` as `Debug` writes that float: the shortest
/// decimal, with at least one digit after the point (`2.0`, `1.5`, `0.125`).
pub(super) fn write_thousandths(writer: &mut impl fmt::Write, thousandths: u64) -> fmt::Result {
    write_u64(writer, thousandths / 1000)?;
    // The fraction's digits without their trailing zeros, at least one:
    // `1000 + fraction` written by `itoa` is `1` and then exactly the three
    // digits, so they come as a `str` without a UTF-8 check (about 100
    // instructions) or a `char` written at a time, and a line carries up to
    // four of these.
    let fraction = thousandths % 1000;
    let kept = if fraction.is_multiple_of(100) {
        1
    } else if fraction.is_multiple_of(10) {
        2
    } else {
        3
    };
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(1000 + fraction);
    writer.write_char('.')?;
    writer.write_str(digits.get(1..=kept).unwrap_or("0"))
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::fmt::format::DefaultFields;
    use tracing_subscriber::fmt::FormatFields as _;

    use super::*;

    /// What `fields` formats `event`'s fields as, via both formatters.
    fn both(event: impl Fn()) -> (String, String) {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt as _;

        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let mut ours = String::new();
                let mut theirs = String::new();
                let _ = LineFields.format_fields(Writer::new(&mut ours), event);
                let _ = DefaultFields::new().format_fields(Writer::new(&mut theirs), event);
                if let Ok(mut lines) = self.0.lock() {
                    lines.push(ours);
                    lines.push(theirs);
                }
            }
        }
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        tracing::subscriber::with_default(subscriber, event);
        let lines = capture.0.lock().map(|l| l.clone()).unwrap_or_default();
        (
            lines.first().cloned().unwrap_or_default(),
            lines.get(1).cloned().unwrap_or_default(),
        )
    }

    #[test]
    fn fields_read_as_the_default_formatter_writes_them() {
        let samples: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| {
                tracing::info!(
                    method = %"GET",
                    site = "example.com",
                    exit = Some("exit1"),
                    status = 200u16,
                    error = Option::<&str>::None,
                    total_ms = 12.345,
                    connect_ms = 2.0,
                    tls_ms = 0.5,
                    ttfb_ms = 0.001,
                    "request"
                )
            }),
            Box::new(|| {
                tracing::info!(
                    odd = "a \"quoted\"\tvalue\u{1b}[31m",
                    n = -42i64,
                    yes = true,
                    "x"
                )
            }),
            Box::new(|| {
                tracing::info!(
                    big = 1e15,
                    tiny = 0.0001,
                    third = 1.0 / 3.0,
                    zero = 0.0,
                    "floats"
                )
            }),
            Box::new(|| tracing::info!(r#type = "raw", "message with {} args", 2)),
            Box::new(|| tracing::info!("plain message")),
        ];
        for sample in samples {
            let (ours, theirs) = both(sample);
            assert!(!theirs.is_empty());
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn thousandths_and_integers_read_as_debug_writes_them() {
        let wide = (0..=3_000).chain([9_999, 10_000, 123_456_789, 999_999_999_999]);
        for thousandths in wide {
            let mut ours = String::new();
            assert!(write_thousandths(&mut ours, thousandths).is_ok());
            assert_eq!(ours, format!("{:?}", thousandths as f64 / 1000.0));
            let mut integer = String::new();
            assert!(write_u64(&mut integer, thousandths).is_ok());
            assert_eq!(integer, thousandths.to_string());
        }
        // The widest count fits the buffer (no float writes it exactly).
        let mut widest = String::new();
        assert!(write_thousandths(&mut widest, u64::MAX).is_ok());
        assert_eq!(widest, "18446744073709551.615");
    }

    #[test]
    fn control_characters_in_the_message_are_escaped() {
        let (ours, _) = both(|| tracing::info!("client sent {}", "\u{1b}[2Jbye"));
        assert!(!ours.contains('\u{1b}'), "{ours:?}");
        assert!(ours.contains("bye"));
    }

    /// A `%` field's Display may carry a client's text (a cookie name with
    /// a C1 control, which header parsing lets through): escaped too.
    #[test]
    fn control_characters_in_display_fields_are_escaped() {
        let (ours, _) = both(|| tracing::info!(cookie = %"_px\u{9b}2Jx", "seen"));
        assert!(!ours.contains('\u{9b}'), "{ours:?}");
        assert!(ours.contains("cookie=_px\\u{9b}2Jx"), "{ours:?}");
    }
}
