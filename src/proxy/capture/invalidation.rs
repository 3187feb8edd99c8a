//! Recognising an origin's "this session is over" answers: challenge pages,
//! hard blocks, a 401 after the session worked.
//!
//! A rule matches a response status, optionally a header, optionally one of
//! several body markers, and optionally only once the identity has had a
//! 2xx answer. Status and header are judged on the response head; body
//! markers are looked for in the first `scan_limit` bytes of the decoded
//! body (gzip, deflate and br are decoded for the scan only) as it streams
//! to the client, which is never delayed: the identity is retired as soon
//! as a marker shows up, and its next request sees the retirement.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Frame, SizeHint};
use memchr::memmem;
use serde::Deserialize;

use crate::body::{Body, BoxError};
use crate::net::tasks::ConnectionTasks;

/// One invalidation rule, as configured.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InvalidationRule {
    /// Name, used as the retirement reason and metric label.
    pub name: String,
    /// Statuses the rule applies to.
    pub status: Vec<u16>,
    /// A header that must be present: `name` or `name: substring`
    /// (case-insensitive).
    #[serde(default)]
    pub header: Option<String>,
    /// Body markers: any one of them must appear in the scanned window.
    #[serde(default)]
    pub body: Vec<String>,
    /// Only once the identity has had a 2xx answer.
    #[serde(default)]
    pub after_success: bool,
}

/// The default rules: DataDome's hard block and challenge page, Cloudflare's
/// challenge, and a 401 after the session worked.
pub fn default_rules() -> Vec<InvalidationRule> {
    let rule = |name: &str, status: &[u16], header: Option<&str>, body: &[&str], after_success| {
        InvalidationRule {
            name: name.to_owned(),
            status: status.to_vec(),
            header: header.map(str::to_owned),
            body: body.iter().map(|s| (*s).to_owned()).collect(),
            after_success,
        }
    };
    vec![
        // The dd object of a hard block carries t:'bv'; its iframe URL t=bv.
        rule(
            "datadome-hard-block",
            &[403],
            None,
            &["'t':'bv'", "\"t\":\"bv\"", "t=bv"],
            false,
        ),
        rule(
            "datadome-challenge",
            &[403],
            None,
            &["captcha-delivery.com"],
            false,
        ),
        rule(
            "cloudflare-challenge",
            &[403, 429, 503],
            Some("cf-mitigated: challenge"),
            &[],
            false,
        ),
        rule(
            "cloudflare-challenge-page",
            &[403, 429, 503],
            None,
            &["/cdn-cgi/challenge-platform/"],
            false,
        ),
        rule("unauthorized-after-success", &[401], None, &[], true),
    ]
}

/// What the head of a response says.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not an invalidation.
    Clean,
    /// An invalidation, by this rule.
    Invalidated(String),
    /// An invalidation if the body shows one of these (rule, markers).
    ScanBody(Vec<(String, Vec<String>)>),
}

/// The configured rules.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<InvalidationRule>,
    /// Every status some rule names, so that an answer with any other (a
    /// 2xx, nearly always) is judged clean without visiting the rules.
    statuses: std::collections::BTreeSet<u16>,
    /// Bytes of decoded body scanned for markers.
    pub scan_limit: usize,
}

impl Rules {
    /// Rules scanning at most `scan_limit` body bytes.
    pub fn new(rules: Vec<InvalidationRule>, scan_limit: usize) -> Rules {
        let statuses = rules
            .iter()
            .flat_map(|r| r.status.iter().copied())
            .collect();
        Rules {
            rules,
            statuses,
            scan_limit,
        }
    }

    /// Judges a response head for an identity that has (or has not) `worked`.
    pub fn judge(&self, status: StatusCode, headers: &HeaderMap, worked: bool) -> Verdict {
        if !self.statuses.contains(&status.as_u16()) {
            return Verdict::Clean;
        }
        let mut scan = Vec::new();
        for rule in &self.rules {
            if !rule.status.contains(&status.as_u16())
                || (rule.after_success && !worked)
                || !rule
                    .header
                    .as_deref()
                    .is_none_or(|h| header_matches(headers, h))
            {
                continue;
            }
            if rule.body.is_empty() {
                return Verdict::Invalidated(rule.name.clone());
            }
            scan.push((rule.name.clone(), rule.body.clone()));
        }
        if scan.is_empty() {
            Verdict::Clean
        } else {
            Verdict::ScanBody(scan)
        }
    }
}

fn header_matches(headers: &HeaderMap, spec: &str) -> bool {
    let (name, needle) = match spec.split_once(':') {
        Some((n, v)) => (n.trim(), Some(v.trim().to_ascii_lowercase())),
        None => (spec.trim(), None),
    };
    headers.get_all(name).iter().any(|value| match &needle {
        None => true,
        Some(needle) => String::from_utf8_lossy(value.as_bytes())
            .to_ascii_lowercase()
            .contains(needle.as_str()),
    })
}

/// The decoded bytes scanned so far: a writer that takes what fits under
/// the scan limit and refuses the rest. The decoders write into it, so a
/// small compressed body that inflates to gigabytes (a decompression bomb)
/// costs at most the limit plus the decoder's own buffer.
struct Window {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Window {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.limit - self.bytes.len();
        if room == 0 && !data.is_empty() {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let taken = data.len().min(room);
        let needed = self.bytes.len() + taken;
        if needed > self.bytes.capacity() {
            // Doubling, but never past the limit.
            let grown = needed.max(self.bytes.capacity() * 2).min(self.limit);
            self.bytes.reserve_exact(grown - self.bytes.len());
        }
        self.bytes.extend_from_slice(&data[..taken]);
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decodes a body's content coding into its [`Window`].
enum Decoder {
    Identity(Window),
    Gzip(Box<flate2::write::GzDecoder<Window>>),
    Deflate(Box<flate2::write::ZlibDecoder<Window>>),
    Brotli(Box<BrotliScan>),
    Zstd(Box<ZstdScan>),
}

/// The largest zstd window a scanned frame may ask for: what Chromium
/// decodes (RFC 9659 asks HTTP decoders for at least 8 MiB), so no page a
/// browser can read is missed. The decoder allocates the window a frame
/// declares (or the frame's size, when smaller and declared), only for an
/// answer a rule scans, and frees it when the scan ends.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Scans at once whose decoder holds memory the origin chooses (zstd, a
/// window up to 8 MiB; brotli, a window up to 8 MiB, allocated whole as
/// soon as its first block is read, and Huffman tables of some megabytes):
/// past this many, an answer passes unscanned (warned).
const WIDE_SCANS_MAX: usize = 16;

/// Scans running that hold such a window (see [`WIDE_SCANS_MAX`]).
static WIDE_SCANS: AtomicUsize = AtomicUsize::new(0);

/// A place among at most so many scans of a kind (those holding wide
/// windows, those read on in the background), counted in a static and
/// given back when dropped.
struct Place(&'static AtomicUsize);

impl Place {
    /// A place among the at most `max` that `running` counts, if one is
    /// free.
    fn take(running: &'static AtomicUsize, max: usize) -> Option<Place> {
        running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < max).then_some(taken + 1)
            })
            .ok()
            .map(|_| Place(running))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of the [`WIDE_SCANS_MAX`] scans (given back with its decoder).
fn wide_place() -> Option<Place> {
    Place::take(&WIDE_SCANS, WIDE_SCANS_MAX)
}

/// A zstd decoder into its window, and its place among the scans.
struct ZstdScan {
    decoder: zstd::stream::write::Decoder<'static, Window>,
    _slot: Place,
}

/// A brotli decoder into its window, and its place among the scans: every
/// one takes one, whatever its window (a header of a few bytes can also
/// ask for hundreds of Huffman tables, some megabytes).
struct BrotliScan {
    decoder: brotli_decompressor::DecompressorWriter<Window>,
    /// Whether the stream's window size was read (its first byte).
    checked: bool,
    _slot: Place,
}

/// The largest brotli window a scanned stream may ask for: 8 MiB, as for
/// zstd. The decoder allocates the whole window (and fills it, a copy of
/// a few bytes can ask for 16 MiB of text) as soon as it reads the first
/// block; a stream asking for 16 MiB passes unscanned (warned).
const BROTLI_WINDOW_BITS_MAX: u32 = 23;

/// The window size, in bits, a brotli stream's first byte declares (RFC
/// 7932, 9.1); `None` for the large-window extension, which HTTP does not
/// use.
fn brotli_window_bits(first: u8) -> Option<u32> {
    if first & 1 == 0 {
        return Some(16);
    }
    match (first >> 1) & 7 {
        0 => match (first >> 4) & 7 {
            0 => Some(17),
            1 => None,
            m => Some(8 + u32::from(m)),
        },
        n => Some(17 + u32::from(n)),
    }
}

/// How much decoded text the brotli writer hands over per call.
const BROTLI_CHUNK: usize = 4096;

impl Decoder {
    /// A decoder for the response's coding into a window of `limit` bytes;
    /// `None` for codings that cannot be scanned.
    fn for_encoding(headers: &HeaderMap, limit: usize) -> Option<Decoder> {
        let coding = headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        let window = Window {
            bytes: Vec::new(),
            limit,
        };
        match coding.as_deref() {
            None | Some("") | Some("identity") => Some(Decoder::Identity(window)),
            Some("gzip") | Some("x-gzip") => Some(Decoder::Gzip(Box::new(
                flate2::write::GzDecoder::new(window),
            ))),
            Some("deflate") => Some(Decoder::Deflate(Box::new(flate2::write::ZlibDecoder::new(
                window,
            )))),
            Some("br") => Some(Decoder::Brotli(Box::new(BrotliScan {
                _slot: wide_place()?,
                checked: false,
                decoder: brotli_decompressor::DecompressorWriter::new(window, BROTLI_CHUNK),
            }))),
            Some("zstd") => {
                let slot = wide_place()?;
                let mut decoder = zstd::stream::write::Decoder::new(window).ok()?;
                decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).ok()?;
                Some(Decoder::Zstd(Box::new(ZstdScan {
                    decoder,
                    _slot: slot,
                })))
            }
            // Unknown or stacked codings cannot be scanned.
            Some(_) => None,
        }
    }

    /// Decodes `chunk` into the window, as far as it fits. An error means
    /// the window is full or the body cannot be decoded: either way the
    /// scan ends with what the window holds.
    fn feed(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        fn decode<W: std::io::Write>(decoder: &mut W, chunk: &[u8]) -> std::io::Result<()> {
            decoder.write_all(chunk)?;
            // What the decoder holds back until more input comes.
            decoder.flush()
        }
        match self {
            Decoder::Identity(window) => window.write_all(chunk),
            Decoder::Gzip(d) => decode(d.as_mut(), chunk),
            Decoder::Deflate(d) => decode(d.as_mut(), chunk),
            Decoder::Brotli(d) => {
                if !d.checked {
                    let Some(&first) = chunk.first() else {
                        return Ok(());
                    };
                    let bits = brotli_window_bits(first);
                    if bits.is_none_or(|bits| bits > BROTLI_WINDOW_BITS_MAX) {
                        if unscanned_warning_due() {
                            tracing::warn!(
                                window_bits = ?bits,
                                "an answer the invalidation rules would scan is brotli with a window over 8 MiB; it passes unscanned (said at most once a minute)"
                            );
                        }
                        return Err(std::io::Error::other("brotli window over 8 MiB"));
                    }
                    d.checked = true;
                }
                decode(&mut d.decoder, chunk)?;
                // The writer hands over at most a chunk of decoded text per
                // call, and holds the rest in its ring buffer until the
                // stream ends: drained here, as far as the window has room,
                // so that a marker is seen with the frame that carries it
                // (and a body cut before its end is scanned all the same).
                let room = d.decoder.get_ref().limit;
                for _ in 0..room / BROTLI_CHUNK + 2 {
                    let before = d.decoder.get_ref().bytes.len();
                    // Nothing to write: the call only pushes out text.
                    let _pushed_only = d.decoder.write(&[])?;
                    let after = d.decoder.get_ref().bytes.len();
                    if after == before || after >= room {
                        break;
                    }
                }
                Ok(())
            }
            Decoder::Zstd(d) => decode(&mut d.decoder, chunk),
        }
    }

    fn window(&self) -> &Window {
        match self {
            Decoder::Identity(window) => window,
            Decoder::Gzip(d) => d.get_ref(),
            Decoder::Deflate(d) => d.get_ref(),
            Decoder::Brotli(d) => d.decoder.get_ref(),
            Decoder::Zstd(d) => d.decoder.get_ref(),
        }
    }
}

/// Whether a minute has passed since the last warning about an answer
/// passed unscanned (and this call is the one to warn).
fn unscanned_warning_due() -> bool {
    static UNSCANNED: crate::telemetry::now_and_then::NowAndThen =
        crate::telemetry::now_and_then::NowAndThen::every(60);
    UNSCANNED.due()
}

/// Looks for markers in the first bytes of a body as it passes.
struct Scanner {
    /// Each rule's name and its markers' searchers.
    rules: Vec<(String, Vec<memmem::Finder<'static>>)>,
    /// Length of the longest marker: a new chunk is searched together with
    /// the bytes before it that a marker may straddle.
    longest: usize,
    /// `None` once the scan is over (a marker found, the limit reached, a
    /// body that cannot be decoded, its answer abandoned), which also
    /// frees the window (and a zstd or brotli scan's place). Shared with
    /// the answer's abandonment hook ([`Scan::on_abandon`]), which ends
    /// the scan from outside: a body hyper no longer polls (its client
    /// stalled) would otherwise hold its decoder, up to 8 MiB of window,
    /// until the client reads again or goes.
    decoder: Arc<Mutex<Option<Decoder>>>,
    on_match: Option<Box<dyn FnOnce(String) + Send + Sync>>,
    /// Held until the scan's verdict (the request's pacing slot: the
    /// identity's next request waits for it).
    hold: Option<std::sync::Arc<dyn Send + Sync>>,
}

impl Scanner {
    fn new(
        rules: Vec<(String, Vec<String>)>,
        decoder: Decoder,
        on_match: Box<dyn FnOnce(String) + Send + Sync>,
    ) -> Scanner {
        let rules: Vec<(String, Vec<memmem::Finder<'static>>)> = rules
            .into_iter()
            .map(|(rule, markers)| {
                let finders = markers
                    .iter()
                    // An empty marker would match any body.
                    .filter(|m| !m.is_empty())
                    .map(|m| memmem::Finder::new(m.as_bytes()).into_owned())
                    .collect();
                (rule, finders)
            })
            .collect();
        let longest = rules
            .iter()
            .flat_map(|(_, finders)| finders.iter().map(|f| f.needle().len()))
            .max()
            .unwrap_or(0);
        Scanner {
            rules,
            longest,
            decoder: Arc::new(Mutex::new(Some(decoder))),
            on_match: Some(on_match),
            hold: None,
        }
    }

    /// Ends the scan: the window and the decoder go, and what was held
    /// until the verdict is let go of.
    fn end(&mut self) {
        *lock(&self.decoder) = None;
        self.hold = None;
    }

    /// Whether the scan is still on.
    fn scanning(&self) -> bool {
        lock(&self.decoder).is_some()
    }

    /// A scanner whose scan is over (what a dropped body leaves behind).
    fn finished() -> Scanner {
        Scanner {
            rules: Vec::new(),
            longest: 0,
            decoder: Arc::new(Mutex::new(None)),
            on_match: None,
            hold: None,
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        let (found, over) = {
            let mut decoder = lock(&self.decoder);
            let Some(decoder) = decoder.as_mut() else {
                return;
            };
            let before = decoder.window().bytes.len();
            let fed = decoder.feed(chunk);
            let window = decoder.window();
            // Only the new bytes and the few before them a marker may
            // straddle: searching the whole window on every chunk made a
            // body sent one byte per chunk cost time quadratic in the scan
            // limit.
            let fresh = &window.bytes[before.saturating_sub(self.longest.saturating_sub(1))..];
            let found = self
                .rules
                .iter()
                .find(|(_, finders)| finders.iter().any(|f| f.find(fresh).is_some()));
            let over = fed.is_err() || window.bytes.len() >= window.limit;
            (found.map(|(rule, _)| rule.clone()), over)
        };
        if let Some(rule) = found {
            if let Some(on_match) = self.on_match.take() {
                on_match(rule);
            }
            self.end();
        } else if over {
            self.end();
        }
    }
}

/// A scan of an answer's body for invalidation markers, begun at its head
/// ([`Scan::begin`]) and put over its body ([`Scan::over`]).
pub struct Scan {
    scanner: Scanner,
}

impl Scan {
    /// A scan of the body of an answer with `headers` that calls
    /// `on_match` (once) with the matching rule's name; `None` for codings
    /// pinproxy cannot decode (the body passes unscanned, warned).
    pub fn begin(
        headers: &HeaderMap,
        rules: Vec<(String, Vec<String>)>,
        limit: usize,
        on_match: impl FnOnce(String) + Send + Sync + 'static,
        hold: Option<std::sync::Arc<dyn Send + Sync>>,
    ) -> Option<Scan> {
        let Some(decoder) = Decoder::for_encoding(headers, limit) else {
            // A challenge page here would not retire its identity: worth
            // seeing, at most once a minute (an origin chooses the coding).
            if unscanned_warning_due() {
                tracing::warn!(
                    coding = ?headers.get(http::header::CONTENT_ENCODING),
                    "an answer the invalidation rules would scan is in a content coding pinproxy cannot decode (or too many zstd and brotli scans run at once); it passes unscanned (said at most once a minute)"
                );
            }
            return None;
        };
        let mut scanner = Scanner::new(rules, decoder, Box::new(on_match));
        scanner.hold = hold;
        Some(Scan { scanner })
    }

    /// What ends the scan if the answer is abandoned for its client: its
    /// decoder and window go, with a zstd or brotli scan's place among the
    /// [`WIDE_SCANS_MAX`] (see [`Scanner::decoder`]).
    pub fn on_abandon(&self) -> ScanAbandon {
        ScanAbandon(Arc::downgrade(&self.scanner.decoder))
    }

    /// `body`, scanned as it passes. A body dropped before its scan ended
    /// (its client left) is read on as a task of `tasks` (see `Drop for
    /// ScanningBody`), which shutdown waits for, then aborts.
    pub fn over(self, body: Body, tasks: &ConnectionTasks) -> Body {
        http_body_util::BodyExt::boxed(ScanningBody {
            inner: body,
            scanner: self.scanner,
            tasks: tasks.clone(),
            lifetime: Box::pin(tokio::time::sleep(SCAN_LIFETIME)),
        })
    }
}

/// Ends a scan from outside (see [`Scan::on_abandon`]).
pub struct ScanAbandon(std::sync::Weak<Mutex<Option<Decoder>>>);

impl ScanAbandon {
    /// Ends the scan, if it is still on.
    pub fn end(&self) {
        if let Some(decoder) = self.0.upgrade() {
            // Dropped outside the lock.
            let ended = lock(&decoder).take();
            drop(ended);
        }
    }
}

/// The decoder cell, whatever a panic elsewhere left in it.
fn lock(decoder: &Mutex<Option<Decoder>>) -> std::sync::MutexGuard<'_, Option<Decoder>> {
    decoder
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`Scan::begin`] and [`Scan::over`] in one: `body` scanned, or as it is
/// when it cannot be (for a body nothing abandons).
pub fn scanning(
    body: Body,
    headers: &HeaderMap,
    rules: Vec<(String, Vec<String>)>,
    limit: usize,
    tasks: &ConnectionTasks,
    on_match: impl FnOnce(String) + Send + Sync + 'static,
    hold: Option<std::sync::Arc<dyn Send + Sync>>,
) -> Body {
    match Scan::begin(headers, rules, limit, on_match, hold) {
        Some(scan) => scan.over(body, tasks),
        None => body,
    }
}

struct ScanningBody {
    inner: Body,
    scanner: Scanner,
    /// Where a scan read on after the body was dropped runs.
    tasks: ConnectionTasks,
    /// When the scan ends, whatever the body does (see [`SCAN_LIFETIME`]).
    lifetime: Pin<Box<tokio::time::Sleep>>,
}

/// How long a scan may run from the answer's head: a body that stalls
/// would otherwise hold its decoder (and, for zstd and brotli, one of the
/// [`WIDE_SCANS_MAX`]) for as long as the origin keeps it open, so that a
/// site holding them all had other sites' challenges pass unscanned. A
/// challenge page comes at once.
const SCAN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a body whose client left is read on for its scan (see
/// `Drop for ScanningBody`).
const SCAN_AFTER_CLIENT_LEFT: std::time::Duration = std::time::Duration::from_secs(10);

/// Scans read on at once after their clients left (see `Drop for
/// ScanningBody`). Each holds its decoder, its window (up to
/// `invalidation.scan_limit`) and its upstream stream for up to
/// [`SCAN_AFTER_CLIENT_LEFT`], none of it counted by a connection limit:
/// a client resetting every stream after the head of a stalled 403 would
/// otherwise grow them with its request rate. Past this many, a scan ends
/// with its client (warned).
const BACKGROUND_SCANS_MAX: usize = 256;

/// Scans read on after their clients left (see [`BACKGROUND_SCANS_MAX`]).
static BACKGROUND_SCANS: AtomicUsize = AtomicUsize::new(0);

/// Whether to warn of a scan ended with its client: at most once a minute.
fn unfinished_warning_due() -> bool {
    static UNFINISHED: crate::telemetry::now_and_then::NowAndThen =
        crate::telemetry::now_and_then::NowAndThen::every(60);
    UNFINISHED.due()
}

/// A client that stops reading (it closed, or reset its stream, after the
/// head: scrapers often drop a 403 unread) drops the body before the
/// marker's frame came: the origin's verdict is still read, in the
/// background, up to the scan's limit and for at most
/// [`SCAN_AFTER_CLIENT_LEFT`], so that the identity retires whether or not
/// its client read the page (unless [`BACKGROUND_SCANS_MAX`] are read so
/// already).
impl Drop for ScanningBody {
    fn drop(&mut self) {
        let over = !self.scanner.scanning() || self.scanner.on_match.is_none();
        if over || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let Some(slot) = Place::take(&BACKGROUND_SCANS, BACKGROUND_SCANS_MAX) else {
            if unfinished_warning_due() {
                tracing::warn!(
                    max = BACKGROUND_SCANS_MAX,
                    "answers scanned for the invalidation rules whose clients left are read on in \
                     the background, and that many are already: this one's scan ends unread, so \
                     a challenge in it would not retire its identity (said at most once a minute)"
                );
            }
            return;
        };
        let inner = std::mem::replace(&mut self.inner, crate::body::empty());
        let scanner = std::mem::replace(&mut self.scanner, Scanner::finished());
        self.tasks.spawn(scan_to_the_end(inner, scanner, slot));
    }
}

/// Reads `inner` through `scanner` until the scan is over, the body ends
/// or [`SCAN_AFTER_CLIENT_LEFT`] has passed; `_slot` is its place among the
/// background scans.
async fn scan_to_the_end(mut inner: Body, mut scanner: Scanner, _slot: Place) {
    use http_body_util::BodyExt as _;
    let reading = async {
        while scanner.scanning() {
            match inner.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        scanner.feed(data);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(SCAN_AFTER_CLIENT_LEFT, reading).await;
}

impl http_body::Body for ScanningBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.scanner.scanning()
            && std::future::Future::poll(this.lifetime.as_mut(), cx).is_ready()
        {
            this.scanner.end();
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.scanner.feed(data);
                }
            }
            // The body ended (or failed): nothing more to scan, and
            // nothing to read on once it is dropped.
            Poll::Ready(_) => this.scanner.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};

    fn rules() -> Rules {
        Rules::new(default_rules(), 64 * 1024)
    }

    #[test]
    fn heads_are_judged() {
        let mut h = HeaderMap::new();
        assert_eq!(rules().judge(StatusCode::OK, &h, true), Verdict::Clean);
        assert_eq!(
            rules().judge(StatusCode::UNAUTHORIZED, &h, false),
            Verdict::Clean
        );
        assert_eq!(
            rules().judge(StatusCode::UNAUTHORIZED, &h, true),
            Verdict::Invalidated("unauthorized-after-success".into())
        );
        h.insert("cf-mitigated", HeaderValue::from_static("Challenge"));
        assert_eq!(
            rules().judge(StatusCode::FORBIDDEN, &HeaderMap::new(), false),
            Verdict::ScanBody(vec![
                (
                    "datadome-hard-block".into(),
                    vec!["'t':'bv'".into(), "\"t\":\"bv\"".into(), "t=bv".into()]
                ),
                (
                    "datadome-challenge".into(),
                    vec!["captcha-delivery.com".into()]
                ),
                (
                    "cloudflare-challenge-page".into(),
                    vec!["/cdn-cgi/challenge-platform/".into()]
                ),
            ])
        );
        assert_eq!(
            rules().judge(StatusCode::FORBIDDEN, &h, false),
            Verdict::Invalidated("cloudflare-challenge".into())
        );
    }

    #[test]
    fn a_status_only_some_rule_names_is_judged_by_that_rule() {
        let mut own = default_rules();
        own.push(InvalidationRule {
            name: "soft-block".into(),
            status: vec![202],
            header: None,
            body: Vec::new(),
            after_success: false,
        });
        let rules = Rules::new(own, 1024);
        let none = HeaderMap::new();
        assert_eq!(
            rules.judge(StatusCode::ACCEPTED, &none, false),
            Verdict::Invalidated("soft-block".into())
        );
        assert_eq!(rules.judge(StatusCode::OK, &none, true), Verdict::Clean);
        assert_eq!(
            Rules::new(Vec::new(), 1024).judge(StatusCode::FORBIDDEN, &none, true),
            Verdict::Clean
        );
    }

    async fn scan(body: Vec<u8>, encoding: Option<&'static str>) -> Option<String> {
        let mut headers = HeaderMap::new();
        if let Some(e) = encoding {
            headers.insert("content-encoding", HeaderValue::from_static(e));
        }
        let Verdict::ScanBody(rules) = rules().judge(StatusCode::FORBIDDEN, &headers, false) else {
            panic!("expected a scan");
        };
        let found = Arc::new(Mutex::new(None));
        let sink = found.clone();
        // Split the body so markers may straddle frames.
        let (a, b) = body.split_at(body.len() / 2);
        let stream = futures_like_body(vec![a.to_vec(), b.to_vec()]);
        let scanned = scanning(
            stream,
            &headers,
            rules,
            64 * 1024,
            &ConnectionTasks::new(),
            move |rule| {
                *sink.lock().unwrap() = Some(rule);
            },
            None,
        );
        let collected = scanned.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), body.len(), "the body passes unchanged");
        let result = found.lock().unwrap().clone();
        result
    }

    fn futures_like_body(chunks: Vec<Vec<u8>>) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from(c))))
            .collect();
        http_body_util::StreamBody::new(tokio_stream_iter(frames)).boxed()
    }

    fn tokio_stream_iter<T: Unpin>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Unpin {
        struct Iter<T>(std::vec::IntoIter<T>);
        impl<T: Unpin> futures_core::Stream for Iter<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<T>> {
                Poll::Ready(self.0.next())
            }
        }
        Iter(items.into_iter())
    }

    const DATADOME_BLOCK: &str = "<html><script>var dd={'rt':'c','cid':'x','t':'bv','host':'geo.captcha-delivery.com'}</script></html>";

    #[tokio::test]
    async fn markers_are_found_in_plain_and_compressed_bodies() {
        assert_eq!(
            scan(DATADOME_BLOCK.into(), None).await.as_deref(),
            Some("datadome-hard-block")
        );
        let fe = DATADOME_BLOCK.replace("'bv'", "'fe'");
        assert_eq!(
            scan(fe.clone().into(), None).await.as_deref(),
            Some("datadome-challenge")
        );
        assert_eq!(scan(b"<html>forbidden</html>".to_vec(), None).await, None);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(fe.as_bytes()).unwrap();
        assert_eq!(
            scan(gz.finish().unwrap(), Some("gzip")).await.as_deref(),
            Some("datadome-challenge")
        );

        let mut br = Vec::new();
        {
            let mut w = brotli_compress(&mut br);
            w.write_all(DATADOME_BLOCK.as_bytes()).unwrap();
        }
        assert_eq!(
            scan(br, Some("br")).await.as_deref(),
            Some("datadome-hard-block")
        );

        let page = format!("{}{fe}", "<!-- padding -->".repeat(400));
        let zstd = zstd::stream::encode_all(page.as_bytes(), 3).unwrap();
        assert_eq!(
            scan(zstd, Some("zstd")).await.as_deref(),
            Some("datadome-challenge"),
            "Chromium asks for zstd, and CDNs answer challenges in it"
        );
    }

    /// A body dropped before its marker came (its client left after the
    /// head) is read on in the background, and its marker still found.
    #[tokio::test]
    async fn a_body_whose_client_left_is_still_scanned() {
        let _alone = BACKGROUND_TESTS.lock().await;
        let (feed, mut scanned, found_rx) = fed_scan(None, None);
        feed.send(Bytes::from_static(b"<html>")).unwrap();
        assert!(scanned.frame().await.is_some());
        // The client leaves: hyper drops the body. The rest comes after.
        drop(scanned);
        feed.send(Bytes::from(DATADOME_BLOCK)).unwrap();
        let found = tokio::time::timeout(std::time::Duration::from_secs(10), found_rx).await;
        assert_eq!(
            found.ok().and_then(Result::ok).as_deref(),
            Some("datadome-hard-block")
        );
    }

    /// An answer abandoned for its client ends its scan from outside: the
    /// decoder (and a zstd or brotli scan's place) goes while the scanning
    /// body lives on where hyper keeps it, whose frames then pass
    /// unscanned.
    #[tokio::test]
    async fn an_abandoned_answer_ends_its_scan() {
        for coding in [None, Some("gzip"), Some("br"), Some("zstd")] {
            let (feed, fed) = tokio::sync::mpsc::unbounded_channel();
            let mut headers = HeaderMap::new();
            if let Some(coding) = coding {
                headers.insert("content-encoding", HeaderValue::from_static(coding));
            }
            let Verdict::ScanBody(rules) = rules().judge(StatusCode::FORBIDDEN, &headers, false)
            else {
                panic!("expected a scan");
            };
            let (found_tx, mut found_rx) = tokio::sync::oneshot::channel();
            let scan = Scan::begin(
                &headers,
                rules,
                64 << 10,
                move |rule| {
                    let _ = found_tx.send(rule);
                },
                None,
            )
            .expect("a scan");
            let abandon = scan.on_abandon();
            let mut scanned = scan.over(Fed(fed).boxed(), &ConnectionTasks::new());
            abandon.end();
            // Plain text: an ended scan does not decode what comes.
            feed.send(Bytes::from(DATADOME_BLOCK)).unwrap();
            assert!(
                scanned.frame().await.is_some(),
                "{coding:?}: the body goes on"
            );
            drop(feed);
            assert!(scanned.frame().await.is_none());
            drop(scanned);
            assert!(
                matches!(
                    found_rx.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed)
                ),
                "{coding:?}: scanned after its abandonment"
            );
        }
    }

    /// Held by the tests that read scans on in the background: the cap's
    /// test takes every place, which would leave the other's scan unread.
    static BACKGROUND_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Scans read on after their clients left are capped: past the cap a
    /// dropped body's scan ends with it, and its stream and decoder go.
    #[tokio::test]
    async fn scans_read_on_after_their_clients_left_are_capped() {
        let _alone = BACKGROUND_TESTS.lock().await;
        let tasks = ConnectionTasks::new();
        let mut feeds = Vec::new();
        for _ in 0..BACKGROUND_SCANS_MAX + 40 {
            let (feed, scanned, _found) = fed_scan_on(Some("gzip"), None, &tasks);
            feeds.push(feed);
            drop(scanned);
        }
        // Other tests of this binary may hold a few places meanwhile (not
        // the one that reads on in the background).
        let reading = tasks.len();
        assert!(
            (BACKGROUND_SCANS_MAX - 8..=BACKGROUND_SCANS_MAX).contains(&reading),
            "{reading} scans read on"
        );
        // The bodies end: their places come back.
        drop(feeds);
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !tasks.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the background scans end with their bodies");
        let (_feed, scanned, _found) = fed_scan_on(Some("gzip"), None, &tasks);
        drop(scanned);
        assert_eq!(tasks.len(), 1, "a place is free again");
    }

    /// A zstd body is decoded whatever its pieces: one byte at a time, and
    /// cut inside its header and its blocks.
    #[tokio::test]
    async fn a_zstd_body_is_scanned_in_any_pieces() {
        let page = format!("{}{DATADOME_BLOCK}", "<p>filler</p>".repeat(2000));
        let zstd = zstd::stream::encode_all(page.as_bytes(), 3).unwrap();
        let scan_zstd = |chunks: Vec<Vec<u8>>| async move {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::CONTENT_ENCODING, "zstd".parse().unwrap());
            let Verdict::ScanBody(rules) = rules().judge(StatusCode::FORBIDDEN, &headers, false)
            else {
                panic!("expected a scan");
            };
            let found = Arc::new(Mutex::new(None));
            let sink = found.clone();
            let scanned = scanning(
                futures_like_body(chunks),
                &headers,
                rules,
                64 << 10,
                &ConnectionTasks::new(),
                move |rule| {
                    *sink.lock().unwrap() = Some(rule);
                },
                None,
            );
            scanned.collect().await.unwrap();
            let result = found.lock().unwrap().clone();
            result
        };
        let bytewise: Vec<Vec<u8>> = zstd.iter().map(|b| vec![*b]).collect();
        assert_eq!(
            scan_zstd(bytewise).await.as_deref(),
            Some("datadome-hard-block")
        );
        for cut in [5, 17, 19, zstd.len() / 2] {
            let (head, tail) = zstd.split_at(cut);
            assert_eq!(
                scan_zstd(vec![head.to_vec(), tail.to_vec()])
                    .await
                    .as_deref(),
                Some("datadome-hard-block"),
                "cut at {cut}"
            );
        }
        // Damaged input ends the scan, and the body still passes whole.
        assert_eq!(scan_zstd(vec![vec![0x28, 0xb5, 0x2f, 0xfd]; 8]).await, None);
    }

    /// Scans `chunks` as the frames of a 403 with the default rules and a
    /// scan limit of `limit`: the rule found, if any.
    async fn scan_frames(chunks: Vec<Vec<u8>>, limit: usize) -> Option<String> {
        let headers = HeaderMap::new();
        let Verdict::ScanBody(rules) = rules().judge(StatusCode::FORBIDDEN, &headers, false) else {
            panic!("expected a scan");
        };
        let found = Arc::new(Mutex::new(None));
        let sink = found.clone();
        let sent: usize = chunks.iter().map(Vec::len).sum();
        let scanned = scanning(
            futures_like_body(chunks),
            &headers,
            rules,
            limit,
            &ConnectionTasks::new(),
            move |rule| {
                *sink.lock().unwrap() = Some(rule);
            },
            None,
        );
        let collected = scanned.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), sent, "the body passes unchanged");
        let result = found.lock().unwrap().clone();
        result
    }

    fn bytewise(text: &str) -> Vec<Vec<u8>> {
        text.bytes().map(|b| vec![b]).collect()
    }

    #[tokio::test]
    async fn a_marker_is_found_across_any_split_and_only_inside_the_limit() {
        let page = format!("{}{DATADOME_BLOCK}", " ".repeat(1000));
        let at = page.find("'t':'bv'").unwrap();
        let end = at + "'t':'bv'".len();
        // One byte per frame: every marker straddles frames.
        assert_eq!(
            scan_frames(bytewise(&page), 64 * 1024).await.as_deref(),
            Some("datadome-hard-block")
        );
        // Every split of the page in two.
        for split in (0..page.len()).step_by(7) {
            let (a, b) = page.as_bytes().split_at(split);
            assert_eq!(
                scan_frames(vec![a.to_vec(), b.to_vec()], 64 * 1024)
                    .await
                    .as_deref(),
                Some("datadome-hard-block"),
                "split at {split}"
            );
        }
        // A window that ends one byte short of the marker's end, then one
        // that ends with it: the page's other marker (`captcha-delivery.com`,
        // later) is past the window both times.
        assert_eq!(scan_frames(bytewise(&page), end - 1).await, None);
        assert_eq!(
            scan_frames(bytewise(&page), end).await.as_deref(),
            Some("datadome-hard-block")
        );
        assert_eq!(scan_frames(vec![page.into_bytes()], 0).await, None);
    }

    #[tokio::test]
    async fn an_empty_marker_matches_nothing_and_a_corrupt_body_ends_the_scan() {
        let headers = HeaderMap::new();
        let empty = vec![("empty".to_owned(), vec![String::new()])];
        let found = Arc::new(Mutex::new(None::<String>));
        let sink = found.clone();
        let scanned = scanning(
            futures_like_body(vec![b"anything".to_vec()]),
            &headers,
            empty,
            1024,
            &ConnectionTasks::new(),
            move |rule| *sink.lock().unwrap() = Some(rule),
            None,
        );
        scanned.collect().await.unwrap();
        assert_eq!(*found.lock().unwrap(), None);

        // Not gzip at all: the body passes, nothing is found.
        let mut headers = HeaderMap::new();
        headers.insert("content-encoding", HeaderValue::from_static("gzip"));
        let Verdict::ScanBody(rules) = rules().judge(StatusCode::FORBIDDEN, &headers, false) else {
            panic!("expected a scan");
        };
        let sink = found.clone();
        let body = DATADOME_BLOCK.as_bytes().to_vec();
        let scanned = scanning(
            futures_like_body(vec![body.clone()]),
            &headers,
            rules,
            1024,
            &ConnectionTasks::new(),
            move |rule| *sink.lock().unwrap() = Some(rule),
            None,
        );
        assert_eq!(scanned.collect().await.unwrap().to_bytes(), body);
        assert_eq!(*found.lock().unwrap(), None);
    }

    /// A brotli stream with uncompressed meta-blocks: enough to exercise the
    /// decoder without a compressor dependency.
    fn brotli_compress(out: &mut Vec<u8>) -> impl std::io::Write + '_ {
        struct Raw<'a>(&'a mut Vec<u8>, Vec<u8>);
        impl std::io::Write for Raw<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl Drop for Raw<'_> {
            fn drop(&mut self) {
                *self.0 = brotli_uncompressed(&self.1);
            }
        }
        Raw(out, Vec::new())
    }

    /// Encodes `data` as one uncompressed brotli meta-block (RFC 7932 §9.2):
    /// WBITS=16, MLEN, ISUNCOMPRESSED, the bytes, then an empty last block.
    fn brotli_uncompressed(data: &[u8]) -> Vec<u8> {
        assert!(!data.is_empty() && data.len() <= 1 << 16);
        let mut bits = BitWriter::default();
        bits.put(0, 1); // WBITS = 16
        bits.put(0, 1); // ISLAST = 0
        bits.put(0, 2); // MNIBBLES = 4
        bits.put((data.len() - 1) as u64, 16); // MLEN - 1
        bits.put(1, 1); // ISUNCOMPRESSED
        let mut out = bits.finish();
        out.extend_from_slice(data);
        let mut last = BitWriter::default();
        last.put(1, 1); // ISLAST
        last.put(1, 1); // ISLASTEMPTY
        out.extend_from_slice(&last.finish());
        out
    }

    /// Frames as a test sends them, the body open until the sender goes.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);
    impl http_body::Body for Fed {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    /// A scan of a 403 in `coding` fed through a channel: the sender, the
    /// scanned body, and where its verdict comes.
    fn fed_scan(
        coding: Option<&'static str>,
        hold: Option<Arc<dyn Send + Sync>>,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        Body,
        tokio::sync::oneshot::Receiver<String>,
    ) {
        fed_scan_on(coding, hold, &ConnectionTasks::new())
    }

    /// [`fed_scan`], read on after a drop as a task of `tasks`.
    fn fed_scan_on(
        coding: Option<&'static str>,
        hold: Option<Arc<dyn Send + Sync>>,
        tasks: &ConnectionTasks,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        Body,
        tokio::sync::oneshot::Receiver<String>,
    ) {
        let (feed, fed) = tokio::sync::mpsc::unbounded_channel();
        let mut headers = HeaderMap::new();
        if let Some(coding) = coding {
            headers.insert("content-encoding", HeaderValue::from_static(coding));
        }
        let Verdict::ScanBody(rules) = rules().judge(StatusCode::FORBIDDEN, &headers, false) else {
            panic!("expected a scan");
        };
        let (found_tx, found_rx) = tokio::sync::oneshot::channel();
        let scanned = scanning(
            Fed(fed).boxed(),
            &headers,
            rules,
            64 << 10,
            tasks,
            move |rule| {
                let _ = found_tx.send(rule);
            },
            hold,
        );
        (feed, scanned, found_rx)
    }

    /// The brotli writer hands over a chunk of text per call: a marker 12
    /// KiB into the page is seen with the frame that carries it, before
    /// the stream's end (which a cut body never sends).
    #[tokio::test]
    async fn a_brotli_marker_is_seen_with_its_frame() {
        let page = format!(
            "{}{DATADOME_BLOCK}{}",
            "<p>filler</p>".repeat(1000),
            "<p>after</p>".repeat(400)
        );
        let br = brotli_uncompressed(page.as_bytes());
        let (feed, mut scanned, mut found) = fed_scan(Some("br"), None);
        feed.send(Bytes::copy_from_slice(&br[..br.len() - 3000]))
            .unwrap();
        assert!(scanned.frame().await.is_some());
        assert_eq!(found.try_recv().as_deref(), Ok("datadome-hard-block"));
    }

    /// A brotli stream asking for a 16 MiB window, which the decoder would
    /// allocate (and fill) whole at its first block, is not decoded.
    #[tokio::test]
    async fn a_brotli_window_over_8_mib_is_not_decoded() {
        assert_eq!(brotli_window_bits(0b0000_0000), Some(16));
        assert_eq!(brotli_window_bits(0b0000_1011), Some(22));
        assert_eq!(brotli_window_bits(0b0000_1101), Some(23));
        assert_eq!(brotli_window_bits(0b0000_1111), Some(24));
        assert_eq!(brotli_window_bits(0b0000_0001), Some(17));
        assert_eq!(brotli_window_bits(0b0011_0001), Some(11));
        assert_eq!(brotli_window_bits(0b0001_0001), None, "large window");
        let mut bits = BitWriter::default();
        bits.put(1, 1);
        bits.put(7, 3); // WBITS = 24
        bits.put(0, 1); // ISLAST = 0
        bits.put(0, 2); // MNIBBLES = 4
        bits.put(1023, 16); // MLEN - 1
        bits.put(1, 1); // ISUNCOMPRESSED
        let mut stream = bits.finish();
        stream.extend_from_slice(DATADOME_BLOCK.as_bytes());
        let (feed, mut scanned, mut found) = fed_scan(Some("br"), None);
        feed.send(Bytes::from(stream.clone())).unwrap();
        assert!(scanned.frame().await.is_some());
        assert!(found.try_recv().is_err(), "not decoded, so not found");
        // The same stream with a 4 MiB window is scanned.
        stream[0] = (stream[0] & !0b1110) | (5 << 1);
        let (feed, mut scanned, mut found) = fed_scan(Some("br"), None);
        feed.send(Bytes::from(stream)).unwrap();
        assert!(scanned.frame().await.is_some());
        assert_eq!(found.try_recv().as_deref(), Ok("datadome-hard-block"));
    }

    /// A scanned answer holds what it is given (its request's pacing slot)
    /// until its verdict, through a client that left before the marker
    /// came; a stalled one lets it go after the scan's lifetime.
    #[tokio::test(start_paused = true)]
    async fn a_scan_holds_its_request_until_the_verdict() {
        let hold: Arc<dyn Send + Sync> = Arc::new(());
        let weak = Arc::downgrade(&hold);
        let (feed, mut scanned, found) = fed_scan(None, Some(hold));
        feed.send(Bytes::from_static(b"<html>")).unwrap();
        assert!(scanned.frame().await.is_some());
        drop(scanned);
        tokio::task::yield_now().await;
        assert!(weak.upgrade().is_some(), "held by the scan read on");
        feed.send(Bytes::from(DATADOME_BLOCK)).unwrap();
        assert_eq!(found.await.as_deref(), Ok("datadome-hard-block"));
        assert!(weak.upgrade().is_none(), "let go of at the verdict");

        let hold: Arc<dyn Send + Sync> = Arc::new(());
        let weak = Arc::downgrade(&hold);
        let (_feed, mut scanned, _found) = fed_scan(None, Some(hold));
        let stalled = tokio::time::timeout(SCAN_LIFETIME * 2, scanned.frame()).await;
        assert!(stalled.is_err(), "the origin never sends");
        assert!(weak.upgrade().is_none(), "let go of at the scan's lifetime");
    }

    #[derive(Default)]
    struct BitWriter {
        bytes: Vec<u8>,
        used: u32,
    }

    impl BitWriter {
        fn put(&mut self, value: u64, count: u32) {
            for i in 0..count {
                if self.used.is_multiple_of(8) {
                    self.bytes.push(0);
                }
                let bit = ((value >> i) & 1) as u8;
                let last = self.bytes.len() - 1;
                self.bytes[last] |= bit << (self.used % 8);
                self.used += 1;
            }
        }
        fn finish(self) -> Vec<u8> {
            self.bytes
        }
    }
}
