//! Entry points for the fuzz targets (`fuzz/`) and the property tests
//! (`tests/proptests.rs`): each takes arbitrary bytes or text, drives one
//! parser the way a client, origin or config file can, and returns what it
//! made of it, so the caller can check properties. Not an API: hidden from
//! the documentation and free to change.
//!
//! The parsers themselves must never panic, whatever the input: that is
//! what the fuzzers look for. The functions here add no checks of their
//! own (`src` denies panics); the targets and tests assert.

use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};

use crate::config::Config;
use crate::credential::PinHasher;
use crate::fingerprint::{client_hello, h2_preface};
use crate::mitm::leaf::LeafName;
use crate::net::HostPort;
use crate::proxy::credentials::cookies::{self, CookiePolicy};
use crate::proxy::target::{self, Target};
use crate::upstream::framing::{FramingError, Scanner, Side};

/// A fixed pin-hashing key, so results repeat across runs.
fn hasher() -> PinHasher {
    PinHasher::new([7; 32])
}

/// Headers from `(name, value)` pairs, skipping pairs that are not valid
/// header fields (hyper would have refused them before pinproxy saw them).
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// What the cookie stages made of a request's and a response's headers.
#[derive(Debug, Default)]
pub struct Cookies {
    /// Tracked cookies found in the request (`Ok`), or why it is refused.
    pub request: Option<Vec<String>>,
    /// Tracked cookies the response sets.
    pub set: Vec<String>,
    /// The request's `Cookie` headers after stripping every tracked cookie
    /// found.
    pub stripped: Vec<String>,
    /// The request's token headers (`X-DataDome-ClientID`, the SDK token
    /// headers) left after stripping, as (name, value).
    pub tokens: Vec<(String, String)>,
}

/// Runs cookie extraction on `request` headers, Set-Cookie extraction on
/// `response` headers, and strips every tracked cookie found from the
/// request.
pub fn cookies(mut request: HeaderMap, response: &HeaderMap, now_ms: u64) -> Cookies {
    let Some(policy) = policy() else {
        return Cookies::default();
    };
    let hasher = hasher();
    let found = cookies::tracked_in_request(&request, &policy, &hasher).ok();
    let set = cookies::tracked_in_response(response, &policy, &hasher, || now_ms)
        .into_iter()
        .map(|c| c.cookie.to_string())
        .collect();
    if let Ok(found) = cookies::tracked_in_request(&request, &policy, &hasher) {
        let keys: Vec<_> = found.iter().map(|c| c.key).collect();
        cookies::strip_from_request(&mut request, &policy, &hasher, &keys);
    }
    let stripped = request
        .get_all(http::header::COOKIE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let tokens = request
        .iter()
        .filter(|(name, _)| cookies::carries_token(name))
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();
    Cookies {
        request: found.map(|f| f.iter().map(|c| c.to_string()).collect()),
        set,
        stripped,
        tokens,
    }
}

/// The default tracked set plus `session_*`.
fn policy() -> Option<CookiePolicy> {
    CookiePolicy::with_extra(&["session_*".to_owned()]).ok()
}

/// Whether `name` is tracked (the default set plus `session_*`).
pub fn is_tracked(name: &str) -> bool {
    policy().is_some_and(|p| p.is_tracked(name))
}

/// What the host parsers made of one text.
#[derive(Debug, Default)]
pub struct Hosts {
    /// `HostPort::parse`.
    pub host_port: Option<HostPort>,
    /// The CONNECT target parsed from a request line's authority-form.
    pub connect: Option<HostPort>,
    /// The origin of an absolute-form request target.
    pub absolute: Option<HostPort>,
    /// The leaf certificate name for the text as an SNI or CONNECT host.
    pub leaf: Option<String>,
}

/// Runs every host normalisation on `text`: `host:port` parsing, CONNECT
/// authority-form, absolute-form targets and the leaf name for an SNI.
pub fn hosts(text: &str) -> Hosts {
    let host_port = HostPort::parse(text).ok();
    let connect = text
        .parse::<Uri>()
        .ok()
        .and_then(|uri| target::connect_authority(&uri).ok());
    let absolute = Request::get(text)
        .body(())
        .ok()
        .and_then(|request| Target::of(&request, None).ok())
        .map(|target| target.origin);
    let leaf = Some(format!("{:?}", LeafName::from_host(text)));
    Hosts {
        host_port,
        connect,
        absolute,
        leaf,
    }
}

/// Parses a ClientHello from TLS records, and the same bytes as a bare
/// handshake message; returns the JA4-relevant summary when one parses.
pub fn client_hello(bytes: &[u8]) -> Option<String> {
    let _ = client_hello::handshake_len_needed(bytes);
    let _ = client_hello::parse_handshake(bytes);
    client_hello::parse(bytes).ok().map(|hello| {
        let _ = hello.grease_positions();
        let _ = hello.session_ticket();
        format!("{:?}", hello.fresh_and_anonymous())
    })
}

/// Parses an HTTP/2 client preface at once and fed in `split`-byte pieces;
/// returns the Akamai fingerprint of each way.
pub fn h2_preface(bytes: &[u8], split: usize) -> (Option<String>, Option<String>) {
    let whole = h2_preface::parse(bytes).ok().map(|f| f.akamai());
    let mut parser = h2_preface::H2PrefaceParser::new();
    for piece in bytes.chunks(split.max(1)) {
        let _ = parser.feed(piece);
    }
    let fed = parser.into_fingerprint().map(|f| f.akamai());
    (whole, fed)
}

/// Parses TOML as pinproxy's configuration and validates it (`Ok(())`
/// when both pass). Validation reads no file and binds nothing.
pub fn config(text: &str) -> Result<(), String> {
    let config = Config::from_toml(text).map_err(|e| e.to_string())?;
    config.validate().map(|_| ()).map_err(|e| e.to_string())
}

/// Scans `bytes` as HTTP/1 requests (or responses), all at once and in
/// `split`-byte pieces; returns the heads found and the refusal of each
/// way.
pub fn framing(bytes: &[u8], response: bool, split: usize) -> [(usize, Option<FramingError>); 2] {
    let side = if response {
        Side::Response
    } else {
        Side::Request
    };
    let mut whole = Scanner::new(side, 64 * 1024);
    let mut heads = 0;
    let error = whole.scan(bytes, |_| heads += 1).err();
    let mut pieces = Scanner::new(side, 64 * 1024);
    let mut piece_heads = 0;
    let mut piece_error = None;
    for piece in bytes.chunks(split.max(1)) {
        if let Err(e) = pieces.scan(piece, |_| piece_heads += 1) {
            piece_error = Some(e);
            break;
        }
    }
    [(heads, error), (piece_heads, piece_error)]
}
