//! The access line: one per request, target [`ACCESS_TARGET`] at `info`.
//!
//! Written one of two ways, with the same text:
//! - **directly**, once [`install`] has been called by [`super::init`]: the
//!   line is formatted straight into a thread-local buffer and handed to
//!   the log writer thread, as the `fmt` layer would, without a `tracing`
//!   event. This is the path of every line a running daemon writes in
//!   JSON, or in text without colours (not a terminal) and outside any
//!   enabled span.
//! - **as a `tracing` event** otherwise (colours, an enabled span whose
//!   context a text line prints, or a subscriber of someone else's, as in
//!   tests), through whatever subscriber is installed.
//!
//! Why two: dispatching the event cost about 7,400 instructions per
//! request, most of it visiting a dozen fields through `dyn` calls and
//! writing them piece by piece into the layer's buffer: a tenth of what the
//! whole proxied request costs. The direct path knows its fields and their
//! kinds. Tests below hold its output byte for byte to what the
//! `tracing-subscriber` layers [`super::init`] installs write for the same
//! event.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use http::Method;

use super::fields::{plain_in_quotes, write_thousandths};
use super::line_writer::LineWriter;
use super::timestamp::LineTime;
use super::{LogFormat, ACCESS_TARGET};
use crate::credential::Credential;
use crate::identity::IdentityId;
use crate::net::HostPort;

/// What one access line says (see `proxy::access`): never a cookie value,
/// a credential, a path or a query.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    /// The request's method.
    pub method: &'a Method,
    /// The origin, host and port.
    pub origin: Option<&'a HostPort>,
    /// The origin's site label.
    pub site: Option<&'a str>,
    /// The exit's id.
    pub exit: Option<&'a str>,
    /// The identity routed to or founded.
    pub identity: Option<IdentityId>,
    /// The tracked credentials (their names are written).
    pub credentials: &'a [Credential],
    /// How routing decided.
    pub decision: Option<&'a str>,
    /// The status answered.
    pub status: u16,
    /// pinproxy's error code, when it answered with an error.
    pub error: Option<&'a str>,
    /// Microseconds from the request's arrival to its answer's head
    /// (written as milliseconds, `total_ms`).
    pub total_us: u64,
    /// Microseconds spent opening the upstream connection (`connect_ms`).
    pub connect_us: Option<u64>,
    /// Microseconds spent on the upstream TLS handshake (`tls_ms`).
    pub tls_us: Option<u64>,
    /// Microseconds from the request written upstream to the answer's head
    /// (`ttfb_ms`).
    pub ttfb_us: Option<u64>,
}

/// A field's name, as each format writes it before the value: one piece
/// to copy rather than three (this runs for every field of every line).
struct Key {
    /// ` name=`
    text: &'static str,
    /// `,"name":`
    json: &'static str,
}

/// The [`Key`] of the field `name` (a literal).
macro_rules! key {
    ($name:literal) => {
        Key {
            text: concat!(" ", $name, "="),
            json: concat!(",\"", $name, "\":"),
        }
    };
}
/// Whether access lines are written (the filter lets the target through).
pub fn enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

impl AccessLine<'_> {
    /// Writes the line: the caller has found access lines [`enabled`]
    /// (`proxy::access` asks once per request).
    pub fn write(&self) {
        match SINK.get() {
            // A text line prints the spans it is written in; the direct
            // path leaves those to the layer.
            Some(sink) if sink.style == Style::Json || tracing::Span::current().is_none() => {
                sink.write(self)
            }
            _ => self.emit(),
        }
    }

    /// The line as a `tracing` event, for whichever subscriber is installed.
    fn emit(&self) {
        tracing::info!(
            target: ACCESS_TARGET,
            method = %self.method,
            origin = self.origin.map(tracing::field::display),
            site = self.site,
            exit = self.exit,
            identity = self.identity.map(tracing::field::display),
            cookies = (!self.credentials.is_empty())
                .then(|| tracing::field::display(Names(self.credentials))),
            decision = self.decision,
            status = self.status,
            error = self.error,
            total_ms = millis(self.total_us),
            connect_ms = self.connect_us.map(millis),
            tls_ms = self.tls_us.map(millis),
            ttfb_ms = self.ttfb_us.map(millis),
            "request"
        );
    }

    /// The line's fields after the message, in the event's order, each
    /// written by `format`.
    ///
    /// Inlined, with `format`'s [`FieldFormat::field`], into every field:
    /// there the key is a constant and the value's kind is known, so each
    /// field compiles to its own code, its key a few stores. Through one
    /// shared, out-of-line writer, every field paid a call, a match on its
    /// kind and a `memcpy` call for its key.
    #[inline(always)]
    fn fields(&self, format: &mut impl FieldFormat) {
        format.field(
            &key!("method"),
            Value::Bare(Bare::Text(self.method.as_str())),
        );
        if let Some(origin) = self.origin {
            format.field(&key!("origin"), Value::Bare(Bare::Origin(origin)));
        }
        if let Some(site) = self.site {
            format.field(&key!("site"), Value::Quoted(site));
        }
        if let Some(exit) = self.exit {
            format.field(&key!("exit"), Value::Quoted(exit));
        }
        if let Some(identity) = self.identity {
            format.field(&key!("identity"), Value::Bare(Bare::Identity(identity)));
        }
        if !self.credentials.is_empty() {
            format.field(&key!("cookies"), Value::Bare(Bare::Names(self.credentials)));
        }
        if let Some(decision) = self.decision {
            format.field(&key!("decision"), Value::Quoted(decision));
        }
        format.field(&key!("status"), Value::Number(u64::from(self.status)));
        if let Some(error) = self.error {
            format.field(&key!("error"), Value::Quoted(error));
        }
        format.field(&key!("total_ms"), Value::Micros(self.total_us));
        if let Some(us) = self.connect_us {
            format.field(&key!("connect_ms"), Value::Micros(us));
        }
        if let Some(us) = self.tls_us {
            format.field(&key!("tls_ms"), Value::Micros(us));
        }
        if let Some(us) = self.ttfb_us {
            format.field(&key!("ttfb_ms"), Value::Micros(us));
        }
    }

    /// The line as the text layer writes it (without colours, outside any
    /// span), after its timestamp.
    fn text(&self, out: &mut String) {
        // The timestamp's separator, then the level padded to five.
        out.push_str("  INFO ");
        out.push_str(ACCESS_TARGET);
        out.push_str(": request");
        self.fields(&mut TextFields(out));
        out.push('\n');
    }

    /// The line as the JSON layer writes it, after `{"timestamp":"…"`.
    fn json(&self, out: &mut String) {
        out.push_str(",\"level\":\"INFO\",\"message\":\"request\"");
        self.fields(&mut JsonFields(out));
        out.push_str(",\"target\":\"");
        out.push_str(ACCESS_TARGET);
        out.push_str("\"}\n");
    }
}

/// How one format writes a field: its key, then its value. Writing into a
/// `String` cannot fail, so neither can a field.
trait FieldFormat {
    /// Writes the field `key` with `value`.
    fn field(&mut self, key: &Key, value: Value<'_>);
}

/// Fields as the text layer writes them.
struct TextFields<'o>(&'o mut String);

impl FieldFormat for TextFields<'_> {
    #[inline(always)]
    fn field(&mut self, key: &Key, value: Value<'_>) {
        let out = &mut *self.0;
        out.push_str(key.text);
        match value {
            // Cookie names are the only bare values a client or an origin
            // writes (a method is a token, an origin a parsed host).
            Value::Bare(names @ Bare::Names(_)) => {
                let start = out.len();
                names.write(out);
                escape_controls(out, start);
            }
            Value::Bare(bare) => bare.write(out),
            Value::Quoted(text) if text.bytes().all(plain_in_quotes) => quoted(out, text),
            Value::Quoted(text) => {
                let _ = write!(out, "{text:?}");
            }
            Value::Number(n) => push_u64(out, n),
            Value::Micros(us) if us <= EXACT_MICROS => push_thousandths(out, us),
            Value::Micros(us) => {
                let _ = write!(out, "{:?}", millis(us));
            }
        }
    }
}

/// Fields as the JSON layer writes them.
struct JsonFields<'o>(&'o mut String);

impl FieldFormat for JsonFields<'_> {
    #[inline(always)]
    fn field(&mut self, key: &Key, value: Value<'_>) {
        let out = &mut *self.0;
        out.push_str(key.json);
        match value {
            Value::Bare(Bare::Text(text)) | Value::Quoted(text) => json_string(out, text),
            Value::Bare(bare) => {
                // Written in place; escaped afterwards in the rare case it
                // needs it.
                let start = out.len();
                out.push('"');
                bare.write(out);
                if out[start + 1..].bytes().all(plain_in_quotes) {
                    return out.push('"');
                }
                let text = out.split_off(start + 1);
                out.truncate(start);
                json_string(out, &text);
            }
            Value::Number(n) => push_u64(out, n),
            Value::Micros(us) if us <= EXACT_MICROS => push_thousandths(out, us),
            // A float serde_json writes as a number, `null` if not finite
            // (these are finite: a count of microseconds over 1000).
            Value::Micros(us) => match serde_json::to_string(&millis(us)) {
                Ok(number) => out.push_str(&number),
                Err(_) => out.push_str("null"),
            },
        }
    }
}

/// A field's value, by how it is written.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// A `Display` value: bare in text, a string in JSON.
    Bare(Bare<'a>),
    /// A string: quoted and escaped as `Debug` does in text, a string in JSON.
    Quoted(&'a str),
    /// An integer.
    Number(u64),
    /// Microseconds, written as milliseconds (as `Debug` writes the float
    /// `us / 1000`).
    Micros(u64),
}

/// The largest count of microseconds whose milliseconds `Debug` writes as
/// the thousandths themselves: up to it, the decimal has at most 15
/// significant digits, which a float tells apart from every other such
/// decimal, so the float's shortest form is that decimal. Durations are
/// far below it; larger counts take the float's own text.
const EXACT_MICROS: u64 = 999_999_999_999_999;

/// Microseconds as the float of milliseconds the `tracing` event carries.
fn millis(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The `Display` values of the line.
#[derive(Clone, Copy)]
enum Bare<'a> {
    Text(&'a str),
    Origin(&'a HostPort),
    Identity(IdentityId),
    Names(&'a [Credential]),
}

impl Bare<'_> {
    /// Writes the value as its `Display` writes it (the tests hold them to
    /// it), without the formatting machinery.
    #[inline(always)]
    fn write(self, out: &mut String) {
        match self {
            Bare::Text(text) => out.push_str(text),
            Bare::Origin(origin) => {
                let bracket = origin.host.contains(':');
                if bracket {
                    out.push('[');
                }
                out.push_str(&origin.host);
                out.push_str(if bracket { "]:" } else { ":" });
                push_u64(out, u64::from(origin.port));
            }
            Bare::Identity(identity) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                // Into an array, then pushed once: sixteen `String::push`
                // calls each checked the capacity and encoded a char.
                let mut digits = [0u8; 16];
                for (n, digit) in digits.iter_mut().rev().enumerate() {
                    *digit = HEX[(identity.0 >> (n * 4)) as usize & 0xf];
                }
                // Always ASCII.
                if let Ok(digits) = std::str::from_utf8(&digits) {
                    out.push_str(digits);
                }
            }
            Bare::Names(credentials) => {
                for (n, credential) in credentials.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(&credential.name);
                }
            }
        }
    }
}

/// The names of credentials, comma-separated (a session key shows as
/// `session-key`), for the `tracing` event.
struct Names<'a>(&'a [Credential]);

impl fmt::Display for Names<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, credential) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            f.write_str(&credential.name)?;
        }
        Ok(())
    }
}

/// Escapes, as the text layer does, the control characters of what was
/// written to `out` from `start` on: a bare value may be a client's or an
/// origin's text (a cookie name: C1 controls get through header parsing),
/// which must not drive a terminal. (JSON lines carry them as JSON does.)
fn escape_controls(out: &mut String, start: usize) {
    let Some(written) = out.get(start..) else {
        return;
    };
    // The front door lets no C0 control but a tab into a header, so names
    // that are ASCII without a tab hold none; `is_ascii` and the tab's
    // `memchr` are word-at-a-time, and this runs for every access line
    // with cookies.
    if written.is_ascii() && !written.as_bytes().contains(&b'\t') {
        return;
    }
    let escaped: String = written
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    out.truncate(start);
    out.push_str(&escaped);
}

/// Writes `text` between double quotes, as it is (nothing in it needs an
/// escape).
fn quoted(out: &mut String, text: &str) {
    out.push('"');
    out.push_str(text);
    out.push('"');
}

/// Writes `text` as a JSON string, escaped as `serde_json` escapes it.
fn json_string(out: &mut String, text: &str) {
    if text.bytes().all(plain_in_quotes) {
        return quoted(out, text);
    }
    // Serialising a string cannot fail.
    if let Ok(escaped) = serde_json::to_string(text) {
        out.push_str(&escaped);
    }
}

/// Writes `value` in decimal.
fn push_u64(out: &mut String, value: u64) {
    out.push_str(itoa::Buffer::new().format(value));
}

/// Writes `thousandths / 1000` as [`write_thousandths`] does.
fn push_thousandths(out: &mut String, thousandths: u64) {
    // Writing into a `String` cannot fail.
    let _ = write_thousandths(out, thousandths);
}

/// How the installed layer writes lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Text,
    Json,
}

/// Where directly written lines go.
struct Sink {
    writer: LineWriter,
    style: Style,
}

static SINK: OnceLock<Sink> = OnceLock::new();

thread_local! {
    /// The line being written (kept between lines, as the `fmt` layer
    /// keeps its own).
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Lets access lines be written directly to `writer`, the writer of the
/// layer [`super::init`] installed for `format`. Lines with colours are
/// left to the layer.
pub(super) fn install(writer: LineWriter, format: LogFormat, ansi: bool) {
    let style = match format {
        LogFormat::Json => Style::Json,
        LogFormat::Text if !ansi => Style::Text,
        LogFormat::Text => return,
    };
    let _ = SINK.set(Sink { writer, style });
}

impl Sink {
    fn write(&self, line: &AccessLine<'_>) {
        let _ = LINE.try_with(|buffer| {
            let Ok(mut buffer) = buffer.try_borrow_mut() else {
                // Re-entered (a `Display` that logs): the event path.
                return line.emit();
            };
            buffer.clear();
            format_line(line, self.style, &mut buffer);
            // Lossy like every other line: a writer thread that fell
            // behind drops lines rather than stopping requests.
            self.writer.line(buffer.as_bytes());
            // A line once much longer than usual is not kept.
            if buffer.capacity() > 4096 {
                *buffer = String::new();
            }
        });
    }
}

/// Formats `line` into `out` as a layer of `style` would.
fn format_line(line: &AccessLine<'_>, style: Style, out: &mut String) {
    // Room for a typical line, so that it grows at most once.
    out.reserve(320);
    match style {
        Style::Text => {
            timestamp(out);
            line.text(out);
        }
        Style::Json => {
            out.push_str("{\"timestamp\":\"");
            timestamp(out);
            out.push('"');
            line.json(out);
        }
    }
}

/// The line's timestamp, as the layers write it.
fn timestamp(out: &mut String) {
    if LineTime.write(out).is_err() {
        out.push_str("<unknown time>");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::super::{json_layer, text_layer};
    use super::*;
    use crate::credential::PinKey;

    /// What a layer of `style`, as [`super::super::init`] builds it, writes
    /// for `line`'s event, and what the direct path writes; timestamps cut.
    fn both(line: &AccessLine<'_>, style: Style) -> (String, String) {
        let written = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = written.clone();
        let make = move || Capture(sink.clone());
        match style {
            Style::Text => {
                let subscriber = tracing_subscriber::registry().with(text_layer(make, false));
                tracing::subscriber::with_default(subscriber, || line.emit());
            }
            Style::Json => {
                let subscriber = tracing_subscriber::registry().with(json_layer(make));
                tracing::subscriber::with_default(subscriber, || line.emit());
            }
        }
        let theirs = String::from_utf8(written.lock().map(|w| w.clone()).unwrap_or_default())
            .unwrap_or_default();
        let mut ours = String::new();
        format_line(line, style, &mut ours);
        (cut_timestamp(&ours, style), cut_timestamp(&theirs, style))
    }

    fn cut_timestamp(line: &str, style: Style) -> String {
        match style {
            Style::Text => line.split_once(' ').map(|(_, rest)| rest).unwrap_or(""),
            Style::Json => line.split_once("Z\"").map(|(_, rest)| rest).unwrap_or(""),
        }
        .to_owned()
    }

    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut written) = self.0.lock() {
                written.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn credential(name: &str) -> Credential {
        Credential::cookie(name, PinKey::from_bytes([7; 16]))
    }

    #[test]
    fn direct_lines_read_as_the_layers_write_them() {
        let origin = HostPort::new("shop.example", 443);
        let ipv6 = HostPort::new("::1", 8443);
        let get = Method::GET;
        let odd = Method::from_bytes(b"PURGE").unwrap_or(Method::GET);
        let two = [credential("datadome"), credential("cf_clearance")];
        let one = [credential("_abck")];
        let full = AccessLine {
            method: &get,
            origin: Some(&origin),
            site: Some("example"),
            exit: Some("exit-1"),
            identity: Some(IdentityId(0x0123_4567_89ab_cdef)),
            credentials: &two,
            decision: Some("hit"),
            status: 200,
            error: None,
            total_us: 12_345,
            connect_us: Some(2_000),
            tls_us: Some(500),
            ttfb_us: Some(1),
        };
        let bare = AccessLine {
            method: &odd,
            origin: None,
            site: None,
            exit: None,
            identity: None,
            credentials: &[],
            decision: None,
            status: 502,
            error: Some("exit_unreachable"),
            total_us: 0,
            connect_us: None,
            tls_us: None,
            ttfb_us: None,
        };
        let unusual = AccessLine {
            origin: Some(&ipv6),
            site: Some("quote\"d\\ and\ttab \u{1b}[31m é"),
            exit: Some("ex\"it"),
            credentials: &one,
            total_us: EXACT_MICROS,
            connect_us: Some(EXACT_MICROS + 1),
            tls_us: Some(123_456_789_001),
            ttfb_us: Some(u64::MAX),
            ..full
        };
        // A cookie name JSON must escape (the direct path escapes a bare
        // value after writing it in place).
        // ...and one with a C1 control (header parsing lets it through),
        // which a text line writes escaped.
        let odd_names = [
            credential("a\\b"),
            credential("c\"d"),
            credential("_px\u{9b}2J"),
        ];
        let escaped = AccessLine {
            credentials: &odd_names,
            ..bare
        };
        for line in [full, bare, unusual, escaped] {
            for style in [Style::Text, Style::Json] {
                let (ours, theirs) = both(&line, style);
                assert!(theirs.len() > 20, "{style:?}: {theirs:?}");
                assert_eq!(ours, theirs, "{style:?}");
                if style == Style::Text {
                    assert!(!ours.contains('\u{9b}'), "{ours:?}");
                }
            }
        }
    }

    #[test]
    fn json_lines_parse_and_carry_no_absent_field() {
        let get = Method::GET;
        let line = AccessLine {
            method: &get,
            origin: None,
            site: Some("example"),
            exit: None,
            identity: None,
            credentials: &[],
            decision: Some("rotated"),
            status: 404,
            error: None,
            total_us: 3_250,
            connect_us: None,
            tls_us: None,
            ttfb_us: Some(1_500),
        };
        let mut text = String::new();
        format_line(&line, Style::Json, &mut text);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(value["status"], 404);
        assert_eq!(value["ttfb_ms"], 1.5);
        assert_eq!(value["target"], ACCESS_TARGET);
        assert!(value.get("exit").is_none() && value.get("cookies").is_none());
    }
}
