//! Tracked cookies: find the anti-bot session cookies on a request or a
//! response and turn each into a [`PinKey`].
//!
//! Input: request headers (`Cookie`, `X-DataDome-ClientID`) or response
//! headers (`Set-Cookie`, `X-Set-Cookie`). Output: the tracked cookies, each
//! as its name plus the keyed hash of `name=value`.
//!
//! Invariants: a raw cookie value never leaves this module; everything
//! downstream (pins, logs, errors, metrics) sees only the [`PinKey`]. A
//! `Cookie` header that cannot be read is an error, never skipped, because it
//! might hide a tracked cookie.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cookie::Cookie;
use http::header::GetAll;
use http::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

use crate::credential::{Credential, PinHasher, PinKey};
use crate::fingerprint::header_order;

/// The cookies every deployment tracks: the trust cookies of the big anti-bot
/// vendors (DataDome, Cloudflare, Akamai, PerimeterX/HUMAN, Imperva/Incapsula,
/// Kasada). Patterns may end in `*`.
pub const DEFAULT_TRACKED: &[&str] = &[
    "datadome",
    "cf_clearance",
    "__cf_bm",
    "_abck",
    "bm_sz",
    "ak_bmsc",
    "_px*",
    "reese84",
    "incap_ses_*",
    "KP_UIDz",
];

/// DataDome's cookie name. The `X-DataDome-ClientID` request header and the
/// `X-Set-Cookie` response header carry the same token for clients without a
/// cookie jar, so they hash as this cookie.
pub const DATADOME: &str = "datadome";

/// Request header in which DataDome's mobile SDKs send the `datadome` token.
pub static X_DATADOME_CLIENTID: HeaderName = HeaderName::from_static("x-datadome-clientid");
/// Response header in which DataDome returns a refreshed token to such clients.
pub static X_SET_COOKIE: HeaderName = HeaderName::from_static("x-set-cookie");

/// Request headers in which other vendors' mobile SDKs carry their session
/// token instead of a cookie, each a credential of its own: PerimeterX/
/// HUMAN's `X-PX-AUTHORIZATION` (`3:` and the `_px3` token; a bare `1`,
/// `2` or `3` is a status the SDK sends instead, with the token, if any,
/// in `X-PX-ORIGINAL-TOKEN`: the same credential) and Kasada's `x-kpsdk-ct`
/// (its client token, which its answers return in the same header,
/// [`TOKEN_ANSWERS`]). A token is bound to the IP it was earned from, as a
/// cookie is. Named as [`token_name`] says.
pub static TOKEN_CARRIERS: [HeaderName; 3] = [
    HeaderName::from_static("x-px-authorization"),
    HeaderName::from_static("x-px-original-token"),
    HeaderName::from_static("x-kpsdk-ct"),
];

/// The credential a token carrier's value is, if it is one: named as the
/// header that carries it first (PerimeterX's two headers carry one
/// token), the value trimmed. A value empty once unquoted is none (every
/// client sending it would share it); so is a PerimeterX value that is not
/// `VERSION:TOKEN` (a bare status such as `3`).
fn token_name<'v>(carrier: &HeaderName, value: &'v str) -> Option<(&'static str, &'v str)> {
    let value = value.trim();
    if unquote(value).is_empty() {
        return None;
    }
    if carrier.as_str().starts_with("x-px-") {
        let (version, token) = value.split_once(':')?;
        let version_ok = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit());
        return (version_ok && !token.trim().is_empty()).then_some((PX_TOKEN, value));
    }
    Some((KASADA_TOKEN, value))
}

/// The name PerimeterX's token is pinned under (see [`token_name`]).
const PX_TOKEN: &str = "x-px-authorization";
/// The name Kasada's token is pinned under (see [`token_name`]); its
/// answers return it in the header of that name ([`TOKEN_ANSWERS`]).
const KASADA_TOKEN: &str = "x-kpsdk-ct";

/// Whether pins of `name` are made whatever the tracking policy says: the
/// names of tokens carried in headers ([`TOKEN_CARRIERS`], named as
/// [`token_name`] names them), which no `track_cookies` entry matches.
pub fn pinned_whatever_tracked(name: &str) -> bool {
    name == PX_TOKEN || name == KASADA_TOKEN
}

/// Response headers that hand a client a token it sends back in the
/// request header of the same name ([`TOKEN_CARRIERS`]).
pub static TOKEN_ANSWERS: [HeaderName; 1] = [HeaderName::from_static("x-kpsdk-ct")];

/// Every request header that carries a token: `X-DataDome-ClientID` and
/// [`TOKEN_CARRIERS`].
static REQUEST_TOKEN_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("x-datadome-clientid"),
    HeaderName::from_static("x-px-authorization"),
    HeaderName::from_static("x-px-original-token"),
    HeaderName::from_static("x-kpsdk-ct"),
];

/// Every response header that hands out a token: `X-Set-Cookie` and
/// [`TOKEN_ANSWERS`].
static RESPONSE_TOKEN_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-set-cookie"),
    HeaderName::from_static("x-kpsdk-ct"),
];

/// Whether `name` is a request header carrying a session token: a
/// [`TOKEN_CARRIERS`] one, or `X-DataDome-ClientID`.
pub fn carries_token(name: &HeaderName) -> bool {
    REQUEST_TOKEN_HEADERS.contains(name)
}

/// A tracked-cookie pattern that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("tracked-cookie pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pattern: String,
    reason: String,
}

/// Which cookie names are tracked. Matching ignores ASCII case: tracking a
/// cookie too many costs some rotation, tracking one too few leaks it.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    /// Which policy this is, for a [`CookieMemo`]: no two policies built in
    /// one process share it (a clone, which tracks the same names, does).
    id: u64,
    /// Looked up with every cookie name of every request; the map is fixed
    /// at start, so a client's names cannot grow collisions in it and the
    /// faster foldhash will do where SipHash guards maps clients fill.
    /// Keyed by the name lowercased; the value is the name as the policy
    /// spells it (its canonical spelling), shared with the credentials of
    /// names sent so.
    exact: HashMap<Box<str>, Arc<str>, foldhash::fast::RandomState>,
    globs: Vec<Glob>,
    /// The patterns it was built from, in order (the defaults first): what
    /// a store records of the keying its pins were made under.
    patterns: Arc<[Box<str>]>,
}

/// How tracked-name globs match: ignoring ASCII case, `/` and `.` being
/// ordinary characters.
const CASE_INSENSITIVE: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: false,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

/// A tracked-name pattern with wildcards, and its literal beginning.
#[derive(Debug, Clone)]
struct Glob {
    /// What a name must begin with (ignoring ASCII case) to match: the
    /// pattern's text before its first wildcard. Checked first, since most
    /// names of a browser's `Cookie` header are tracked by no pattern and
    /// the glob matcher costs about 200 instructions a name.
    prefix: Box<str>,
    pattern: glob::Pattern,
}

impl Glob {
    fn new(pattern: &str) -> Result<Glob, glob::PatternError> {
        let literal = pattern.find(['*', '?', '[']).unwrap_or(pattern.len());
        Ok(Glob {
            prefix: pattern.get(..literal).unwrap_or_default().into(),
            pattern: glob::Pattern::new(pattern)?,
        })
    }

    /// Whether `name` matches, ignoring ASCII case as the glob crate does
    /// (it compares other characters exactly, as the byte comparison of the
    /// prefix does).
    fn matches(&self, name: &str) -> bool {
        let prefix = self.prefix.as_bytes();
        name.as_bytes()
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
            && self.pattern.matches_with(name, CASE_INSENSITIVE)
    }
}

impl CookiePolicy {
    /// The default set plus `extra` patterns (names or globs).
    pub fn with_extra(extra: &[String]) -> Result<CookiePolicy, PatternError> {
        CookiePolicy::of_patterns(
            DEFAULT_TRACKED
                .iter()
                .copied()
                .chain(extra.iter().map(String::as_str)),
        )
    }

    /// Exactly `patterns` (names or globs), the defaults only if among
    /// them: a policy as [`CookiePolicy::patterns`] recorded it.
    pub fn of_patterns<'p>(
        patterns: impl IntoIterator<Item = &'p str>,
    ) -> Result<CookiePolicy, PatternError> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut policy = CookiePolicy {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            exact: HashMap::default(),
            globs: Vec::new(),
            patterns: Arc::from([]),
        };
        let mut all = Vec::new();
        for pattern in patterns {
            policy.add(pattern)?;
            all.push(Box::from(pattern));
        }
        policy.patterns = all.into();
        Ok(policy)
    }

    /// The patterns this policy was built from, in order, the defaults
    /// first. None holds whitespace ([`CookiePolicy::with_extra`] refuses
    /// it), so a line of them joined by spaces reads back as they were.
    pub fn patterns(&self) -> &[Box<str>] {
        &self.patterns
    }

    fn add(&mut self, pattern: &str) -> Result<(), PatternError> {
        let error = |reason: &str| PatternError {
            pattern: pattern.to_owned(),
            reason: reason.to_owned(),
        };
        if pattern.is_empty()
            || pattern
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b == b'=' || b == b';')
        {
            return Err(error(
                "must be a non-empty cookie name without spaces, '=' or ';'",
            ));
        }
        if pattern.contains(['*', '?', '[']) {
            let glob = Glob::new(pattern).map_err(|e| error(&e.to_string()))?;
            self.globs.push(glob);
        } else {
            // The first spelling of a name stands.
            self.exact
                .entry(pattern.to_ascii_lowercase().into())
                .or_insert_with(|| Arc::from(pattern));
        }
        Ok(())
    }

    /// Whether this policy pins and finds every cookie `old` did by the
    /// same keys, judged by the patterns alone (conservatively: `false`
    /// may be wrong, `true` is not): each exact name of `old` spelt alike
    /// here (an exact name's keys are hashed in the policy's spelling), no
    /// exact name here that `old` tracked otherwise, the same globs.
    pub fn keys_alike(&self, old: &CookiePolicy) -> bool {
        self.keeps_exact_names_of(old, false) && old.globs_among(self) && self.globs_among(old)
    }

    /// Whether this policy pins and finds every cookie `old` did by the
    /// same keys, and may track more (judged as [`CookiePolicy::keys_alike`]
    /// judges, but for globs added here, and for exact names added here in
    /// lower case that an old glob covered: a glob added only adds a key a
    /// name is looked up by, an exact name taking precedence over it, and
    /// a glob keys its match lowercased, as such an exact name is keyed).
    pub fn keeps_keys_of(&self, old: &CookiePolicy) -> bool {
        self.keeps_exact_names_of(old, true) && old.globs_among(self)
    }

    /// Whether each exact name of `old` is spelt alike here, and each
    /// exact name here that `old` tracked was an exact name of it spelt
    /// alike or, `if_covered_alike`, one in lower case an old glob covered
    /// and whose pins each policy finds of the other.
    fn keeps_exact_names_of(&self, old: &CookiePolicy, if_covered_alike: bool) -> bool {
        old.exact
            .iter()
            .all(|(lowered, spelt)| self.exact.get(lowered) == Some(spelt))
            && self.exact.iter().all(|(lowered, spelt)| {
                old.exact.get(lowered) == Some(spelt)
                    || match old.tracked(spelt) {
                        None => true,
                        Some(Tracked::Pattern { .. }) if if_covered_alike => {
                            **lowered == **spelt
                                && self.finds_pins_of(old, spelt)
                                && old.finds_pins_of(self, spelt)
                        }
                        Some(_) => false,
                    }
            })
    }

    /// Whether every glob of this policy is one of `other`'s.
    fn globs_among(&self, other: &CookiePolicy) -> bool {
        self.globs.iter().all(|ours| {
            other
                .globs
                .iter()
                .any(|theirs| ours.pattern.as_str() == theirs.pattern.as_str())
        })
    }

    /// Whether a pin `old` made of a cookie named `name` (a pin's name:
    /// the cookie's name as sent) is found under this policy, whatever its
    /// value: some key an answer setting it was pinned by under `old` is
    /// one a request carrying it is looked up by here. Not if this policy
    /// does not track the name; if `old` did not either, whether this
    /// policy tracks it.
    pub fn finds_pins_of(&self, old: &CookiePolicy, name: &str) -> bool {
        let Some(now) = self.tracked(name) else {
            return false;
        };
        let Some(then) = old.tracked(name) else {
            return true;
        };
        // Keys depend on the value through its quotes and escapes only
        // (the key of the name as sent hashes the value as sent, quotes
        // and all; the others its canonical reading): a value of each
        // form, and any hashing key, compare the names' keying.
        let probe = PinHasher::new([0x5a; 32]);
        ["v", "\"v\"", "%76", "\"%76\""].into_iter().all(|value| {
            let looked_up: SmallVec<[PinKey; 4]> = now.keys(&probe, name, value).all().collect();
            then.keys(&probe, name, value)
                .set()
                .any(|key| looked_up.contains(&key))
        })
    }

    /// Whether cookies with this name are pinned.
    pub fn is_tracked(&self, name: &str) -> bool {
        self.tracked(name).is_some()
    }

    /// Whether cookies with this name are pinned, and how the name matched.
    fn tracked(&self, name: &str) -> Option<Tracked<'_>> {
        // Exact names are keyed lowercased.
        let exact = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.exact_ignoring_case(name)
        } else {
            self.exact.get(name)
        };
        if let Some(spelt) = exact {
            return Some(Tracked::Exact(spelt));
        }
        if self.globs.iter().any(|glob| glob.matches(name)) {
            // Keyed by the pattern's match, as it always was; and by the
            // name as PHP reads it too, when that is tracked
            // (`incap_ses_1.2`, PHP's `incap_ses_1_2`).
            let php = self.tracked_as_php_reads(name).and_then(|read| match read {
                Tracked::Exact(spelt) => Some(PhpReading::Exact(spelt)),
                Tracked::PhpPattern { decoded } => Some(PhpReading::Pattern { decoded }),
                Tracked::Pattern { .. } => None,
            });
            return Some(Tracked::Pattern { php });
        }
        self.tracked_as_php_reads(name)
    }

    /// Whether a cookie name PHP reads as a tracked one is tracked
    /// ([`php_name`]): `.px3` is `$_COOKIE['_px3']`, `%64atadome` was
    /// `$_COOKIE['datadome']`. A PHP-side enforcer (PerimeterX's PHP SDK,
    /// DataDome's PHP module) reads the credential under such a name; the
    /// cost elsewhere is over-tracking a cookie nothing reads.
    fn tracked_as_php_reads(&self, name: &str) -> Option<Tracked<'_>> {
        // Most names PHP reads as sent: no room to clear for them.
        if !name.bytes().any(|b| matches!(b, b'.' | b' ' | b'%' | b'+')) {
            return None;
        }
        let mut room = [0u8; 64];
        [false, true].into_iter().find_map(|decoded| {
            let read = php_name(name, decoded, &mut room)?;
            if let Some(spelt) = self.exact_ignoring_case(&read) {
                return Some(Tracked::Exact(spelt));
            }
            self.globs
                .iter()
                .any(|glob| glob.matches(&read))
                .then_some(Tracked::PhpPattern { decoded })
        })
    }

    /// The exact tracked name `name`, which has capitals, is in lower case:
    /// lowered on the stack when it is no longer than a cookie name usually
    /// is.
    fn exact_ignoring_case(&self, name: &str) -> Option<&Arc<str>> {
        let mut lowered = [0u8; 64];
        if let Some(copy) = lowered.get_mut(..name.len()) {
            copy.copy_from_slice(name.as_bytes());
            copy.make_ascii_lowercase();
            // Lowering ASCII letters keeps UTF-8 valid.
            if let Ok(lowered) = std::str::from_utf8(copy) {
                return self.exact.get(lowered);
            }
        }
        self.exact.get(name.to_ascii_lowercase().as_str())
    }
}

/// How a tracked name matched.
#[derive(Debug, Clone, Copy)]
enum Tracked<'a> {
    /// An exact name, in any case: the policy's spelling of it.
    Exact(&'a Arc<str>),
    /// A pattern, matching the name as sent.
    Pattern {
        /// The name as PHP reads it is tracked too, so: the cookie is also
        /// known by that reading's canonical key.
        php: Option<PhpReading<'a>>,
    },
    /// A pattern, matched by the name as PHP reads it ([`php_name`], with
    /// `decoded` as it was).
    PhpPattern {
        /// The name was percent-decoded.
        decoded: bool,
    },
}

/// How the name a pattern matched as sent is tracked as PHP reads it.
#[derive(Debug, Clone, Copy)]
enum PhpReading<'a> {
    /// As an exact name: the policy's spelling of it.
    Exact(&'a Arc<str>),
    /// As a pattern's match ([`php_name`], with `decoded` as it was).
    Pattern {
        /// The name was percent-decoded.
        decoded: bool,
    },
}

/// A cookie name as PHP reads it, when that differs from the name: `.` and
/// ` ` are `_` in every version (as in every request variable's name), and
/// with `decoded` the name is first percent-decoded, `+` as a space (PHP
/// before 8.1.11 and 8.0.24, HHVM and some Lua parsers decode names). Made
/// in `room` when it fits (most names do: no allocation on the request
/// path); `None` as well when the reading is not text, which no tracked
/// name is.
fn php_name<'r>(name: &str, decoded: bool, room: &'r mut [u8; 64]) -> Option<Cow<'r, str>> {
    let special = |b: u8| matches!(b, b'.' | b' ') || (decoded && matches!(b, b'%' | b'+'));
    if !name.bytes().any(special) {
        return None;
    }
    let underscored = |b: u8| if b == b'.' || b == b' ' { b'_' } else { b };
    let read = if decoded {
        let mut spaced = [0u8; 64];
        let plus_as_space = |b: u8| if b == b'+' { b' ' } else { b };
        let input = fill(name.bytes().map(plus_as_space), name.len(), &mut spaced);
        // Decoding never lengthens: it fits wherever its input did.
        let length = input.len();
        fill(
            percent_encoding::percent_decode(&input).map(underscored),
            length,
            room,
        )
    } else {
        fill(name.bytes().map(underscored), name.len(), room)
    };
    let read = match read {
        Cow::Borrowed(bytes) => Cow::Borrowed(std::str::from_utf8(bytes).ok()?),
        Cow::Owned(bytes) => Cow::Owned(String::from_utf8(bytes).ok()?),
    };
    (*read != *name).then_some(read)
}

/// `bytes` (at most `most` of them) in `room` when they fit, else on the
/// heap.
fn fill<'r>(bytes: impl Iterator<Item = u8>, most: usize, room: &'r mut [u8; 64]) -> Cow<'r, [u8]> {
    if most > room.len() {
        return Cow::Owned(bytes.collect());
    }
    let mut length = 0;
    for (slot, byte) in room.iter_mut().zip(bytes) {
        *slot = byte;
        length += 1;
    }
    Cow::Borrowed(room.get(..length).unwrap_or_default())
}

impl Tracked<'_> {
    /// The credential's name for a cookie named `sent`: the policy's copy
    /// when it is spelt so, else the name as sent.
    fn name(self, sent: &str) -> Arc<str> {
        match self {
            Tracked::Exact(spelt) if **spelt == *sent => Arc::clone(spelt),
            _ => Arc::from(sent),
        }
    }

    /// The keys a tracked cookie `name=value` is known by. First the key of
    /// its canonical spelling, which every spelling a server reads as the
    /// same cookie shares: the name as the policy spells it (a pattern's
    /// match lowercased: nginx, among others, matches cookie names ignoring
    /// case; a name PHP reads as a tracked one, as PHP reads it), and the
    /// value without one pair of surrounding double quotes
    /// (which Go's and Node's parsers strip, and which a jar may drop or
    /// add). Then, only when the cookie was sent in another spelling, the
    /// key of that spelling as it is, by which the pins made before keys
    /// were canonical are found: a request carrying both finds its pin by
    /// either, and joins it.
    fn keys(self, hasher: &PinHasher, name: &str, value: &str) -> Keys {
        let read = canonical_value(value);
        let named = |value: &str| match self {
            Tracked::Exact(spelt) => hasher.cookie(spelt, value),
            Tracked::Pattern { .. } if name.bytes().any(|b| b.is_ascii_uppercase()) => {
                hasher.cookie(&name.to_ascii_lowercase(), value)
            }
            Tracked::Pattern { .. } => hasher.cookie(name, value),
            Tracked::PhpPattern { decoded } => php_pattern_key(hasher, name, decoded, value),
        };
        let canonical = named(&read);
        let as_sent = match self {
            Tracked::Exact(spelt) => **spelt == *name,
            Tracked::Pattern { .. } => !name.bytes().any(|b| b.is_ascii_uppercase()),
            Tracked::PhpPattern { .. } => false,
        } && *read == *value;
        let php = match self {
            Tracked::Pattern {
                php: Some(PhpReading::Exact(spelt)),
            } => Some(hasher.cookie(spelt, &read)),
            Tracked::Pattern {
                php: Some(PhpReading::Pattern { decoded }),
            } => Some(php_pattern_key(hasher, name, decoded, &read)),
            _ => None,
        };
        // Keys were canonical before escapes were decoded: a pin made then
        // is under the canonical name with the value as sent, unquoted.
        let unquoted = unquote(value);
        let undecoded = (*read != *unquoted).then(|| named(unquoted));
        Keys {
            canonical,
            as_sent: (!as_sent).then(|| hasher.cookie(name, value)),
            undecoded,
            php,
        }
    }
}

/// The canonical key of `name=value` for a pattern that matched `name` as
/// PHP reads it (`decoded` as it was): that reading, lowercased.
fn php_pattern_key(hasher: &PinHasher, name: &str, decoded: bool, value: &str) -> PinKey {
    let mut room = [0u8; 64];
    let php = php_name(name, decoded, &mut room).unwrap_or(Cow::Borrowed(name));
    hasher.cookie(&php.to_ascii_lowercase(), value)
}

/// The keys a tracked cookie is known by (see [`Tracked::keys`]).
#[derive(Debug, Clone, Copy)]
struct Keys {
    /// Its canonical spelling's, which every spelling shares.
    canonical: PinKey,
    /// Its spelling's as sent, when that is not the canonical one.
    as_sent: Option<PinKey>,
    /// The canonical name's with the value's escapes as sent, when they
    /// decode (the canonical key before escapes were decoded).
    undecoded: Option<PinKey>,
    /// The canonical key of the name as PHP reads it, for a name a pattern
    /// matched as sent whose PHP reading is tracked too.
    php: Option<PinKey>,
}

impl Keys {
    /// Every key, the canonical one first; each once.
    fn all(self) -> impl Iterator<Item = PinKey> {
        let mut keys: [Option<PinKey>; 4] = [Some(self.canonical), None, None, None];
        for (slot, key) in [self.as_sent, self.undecoded, self.php]
            .into_iter()
            .enumerate()
        {
            if let Some(key) = key.filter(|key| !keys.contains(&Some(*key))) {
                if let Some(free) = keys.get_mut(slot + 1) {
                    *free = Some(key);
                }
            }
        }
        keys.into_iter().flatten()
    }

    /// What a response that sets the cookie pins it by: its canonical key;
    /// the one it had before escapes were decoded (which a replica of an
    /// earlier release, still reading the store during a rolling upgrade,
    /// looks it up by); and its name's PHP reading's (which a request that
    /// spells it as PHP reads it is known by).
    fn set(self) -> impl Iterator<Item = PinKey> {
        Keys {
            as_sent: None,
            ..self
        }
        .all()
    }
}

/// A cookie value as the servers that read it most loosely read it: without
/// one pair of surrounding double quotes ([`unquote`]) and with its `%XX`
/// escapes decoded (PHP url-decodes every cookie value, Node's `cookie`
/// one that holds a `%`), so `datadome=%54` is `datadome=T` to them. An
/// escape that does not decode, or decodes to what is not UTF-8, is read
/// as written.
fn canonical_value(value: &str) -> Cow<'_, str> {
    let unquoted = unquote(value);
    if !unquoted.contains('%') {
        return Cow::Borrowed(unquoted);
    }
    match percent_encoding::percent_decode_str(unquoted).decode_utf8() {
        Ok(decoded) => decoded,
        Err(_) => Cow::Borrowed(unquoted),
    }
}

/// `value` without one pair of surrounding double quotes (RFC 6265's
/// quoted cookie-value), as servers that strip them read it.
fn unquote(value: &str) -> &str {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner,
        None => value,
    }
}

/// A tracked cookie set by a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetTrackedCookie {
    /// The cookie.
    pub cookie: Credential,
    /// The response deletes the cookie (`Max-Age` ≤ 0 or `Expires` in the
    /// past, as every common client reads them) instead of setting it.
    pub deletes: bool,
    /// When the cookie expires, in Unix milliseconds, as the client that
    /// keeps it longest reads the line (`Max-Age` wins over `Expires`, as
    /// in RFC 6265); `None` for session cookies.
    pub expires_ms: Option<u64>,
    /// Another key of the cookie before it in the list, not a cookie of
    /// its own (limits count cookies).
    pub also: bool,
}

/// Most tracked cookies (distinct name and value pairs) one request may
/// carry. A browser keeps at most about 180 cookies per site, so even a
/// policy that tracks every name (`track_cookies = ["*"]`) stays under it;
/// every tracked cookie becomes a pin, kept for its lifetime, so a request
/// with thousands would be thousands of pins, and finding repeats among
/// them costs time in their square.
pub const MAX_TRACKED_PER_REQUEST: usize = 256;

/// Most tracked cookies one response may set (deletions aside): each
/// becomes a pin, as on a request, and the answer itself is refused past
/// it (the client must never hold a tracked cookie that was not pinned).
pub const MAX_TRACKED_PER_RESPONSE: usize = 256;

/// Longest tracked cookie name, in bytes. A name matched by a pattern
/// (`_px*`, `incap_ses_*`) is kept as sent, in every pin, log line and
/// store row; real ones are a few dozen bytes.
pub const MAX_TRACKED_NAME: usize = 1024;

/// A request whose cookies cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CookieError {
    /// A `Cookie` header with bytes that are not UTF-8.
    #[error("a Cookie header is not valid UTF-8, so pinproxy cannot tell whether it carries a tracked cookie")]
    NotUtf8,
    /// A token header (`X-DataDome-ClientID`, [`TOKEN_CARRIERS`]) that is
    /// not visible ASCII; the header's name.
    #[error("the {0} header is not visible ASCII")]
    BadTokenHeader(&'static str),
    /// More tracked cookies than [`MAX_TRACKED_PER_REQUEST`].
    #[error("the request carries more than {MAX_TRACKED_PER_REQUEST} tracked cookies; pinproxy pins at most that many per request and forwarded none of them")]
    TooMany,
    /// A tracked cookie after a comma, a space or a tab inside a `Cookie`
    /// pair.
    #[error("a Cookie header holds a tracked cookie after a comma, a space or a tab inside another pair (as in `a=1, datadome=...` or `a=1 datadome=...`), which a server may read as a pair of its own; pinproxy cannot tell how the origin would read it and forwarded none of the request")]
    HiddenPair,
    /// A tracked cookie's name longer than [`MAX_TRACKED_NAME`].
    #[error("a tracked cookie's name is {len} bytes long; pinproxy tracks names of at most {MAX_TRACKED_NAME} bytes and forwarded none of the request's cookies")]
    NameTooLong {
        /// The name's length in bytes.
        len: usize,
    },
}

/// Collects every tracked cookie of a request, from all `Cookie` headers and
/// `X-DataDome-ClientID`, each key once, in the order first seen.
pub fn tracked_in_request(
    headers: &HeaderMap,
    policy: &CookiePolicy,
    hasher: &PinHasher,
) -> Result<Vec<Credential>, CookieError> {
    tracked_in_request_with(headers, policy, hasher, None)
}

/// [`tracked_in_request`] for a request of a connection whose `memo`
/// remembers the credentials of its last `Cookie` fields: a request with
/// the same fields, byte for byte and in the same order, under the same
/// policy, takes them from there instead of reading and hashing its cookies
/// again. (Over HTTP/2 a browser sends a field per cookie, the crumbs of
/// RFC 9113 §8.2.3, the same ones request after request.)
pub fn tracked_in_request_with(
    headers: &HeaderMap,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    memo: Option<&CookieMemo>,
) -> Result<Vec<Credential>, CookieError> {
    // Looked up once: most requests (every cookie-less one) take the
    // fallback below, which walks the same headers again.
    let cookie_headers = headers.get_all(http::header::COOKIE);
    // Distinct cookies found (a list may hold more keys: a cookie sent in
    // another spelling is known by two); a recalled list's count is the
    // one its reading found.
    let mut cookies = 0;
    let read = |cookies: &mut usize| {
        cookie_headers.iter().try_fold(Vec::new(), |found, header| {
            in_cookie_header(header, policy, hasher, found, cookies)
        })
    };
    let mut found = match memo {
        Some(memo) if cookie_headers.iter().next().is_some() => {
            match memo.recall(policy, &cookie_headers) {
                Some((found, counted)) => {
                    cookies = counted;
                    found
                }
                None => {
                    let found = read(&mut cookies)?;
                    memo.remember(policy, &cookie_headers, &found, cookies);
                    found
                }
            }
        }
        _ => read(&mut cookies)?,
    };
    // One look over the names for every token header: most requests
    // carry none.
    if !super::holds_any_custom(headers, &REQUEST_TOKEN_HEADERS) {
        return Ok(found);
    }
    for header in headers.get_all(&X_DATADOME_CLIENTID) {
        let value = header
            .to_str()
            .map_err(|_| CookieError::BadTokenHeader("X-DataDome-ClientID"))?
            .trim();
        if !unquote(value).is_empty() {
            // Hashed as the cookie whether or not the policy tracks it.
            let tracked = policy
                .tracked(DATADOME)
                .unwrap_or(Tracked::Pattern { php: None });
            push_new(&mut found, &mut cookies, hasher, DATADOME, tracked, value)?;
        }
    }
    for carrier in &TOKEN_CARRIERS {
        for header in headers.get_all(carrier) {
            let value = header
                .to_str()
                .map_err(|_| CookieError::BadTokenHeader(carrier.as_str()))?;
            if let Some((name, token)) = token_name(carrier, value) {
                let tracked = Tracked::Pattern { php: None };
                push_new(&mut found, &mut cookies, hasher, name, tracked, token)?;
            }
        }
    }
    Ok(found)
}

/// Adds the tracked cookies of one `Cookie` header to `found`.
fn in_cookie_header(
    header: &HeaderValue,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    mut found: Vec<Credential>,
    cookies: &mut usize,
) -> Result<Vec<Credential>, CookieError> {
    let text = std::str::from_utf8(header.as_bytes()).map_err(|_| CookieError::NotUtf8)?;
    if has_inner_break(text) && hides_tracked(text, policy) {
        return Err(CookieError::HiddenPair);
    }
    for (name, tracked, value) in tracked_pairs(text, policy) {
        push_new(&mut found, cookies, hasher, name, tracked, value)?;
        // A value a server reads only in part is known by that part too,
        // so that a pin of `T` keeps `datadome=T, a=1` on `T`'s exit.
        // (Refusing it would lock out a client whose origin set such a
        // value, which capture pins as set.)
        for shorter in shorter_readings(value) {
            push_new(&mut found, cookies, hasher, name, tracked, shorter)?;
        }
    }
    Ok(found)
}

/// The shorter values servers read a tracked `value` as, each trimmed,
/// non-empty and distinct: up to its first comma (two `Cookie` lines
/// folded the other way round, `datadome=T, a=1`, split on commas), up to
/// its first space or tab (lua-resty-cookie, DataDome's Lua modules and
/// Python's `SimpleCookie` end a value at a blank) and up to its first
/// `$` (DataDome's modules). Most values hold none of these.
fn shorter_readings(value: &str) -> SmallVec<[&str; 3]> {
    let mut shorter = SmallVec::new();
    let bytes = value.as_bytes();
    let comma = memchr::memchr(b',', bytes);
    let blank = memchr::memchr2(b' ', b'\t', bytes);
    let dollar = memchr::memchr(b'$', bytes);
    for cut in [comma, blank, dollar].into_iter().flatten() {
        // Before an ASCII byte: a char boundary.
        let Some(before) = value.get(..cut).map(str::trim_end) else {
            continue;
        };
        if !unquote(before).is_empty() && !shorter.contains(&before) {
            shorter.push(before);
        }
    }
    shorter
}

/// Adds cookie `name` with `value` to `found` by each key it is known by
/// ([`Tracked::keys`]) that is not there, counting it in `cookies` (the
/// distinct cookies found); refuses a name or a count past the limits.
fn push_new(
    found: &mut Vec<Credential>,
    cookies: &mut usize,
    hasher: &PinHasher,
    name: &str,
    tracked: Tracked<'_>,
    value: &str,
) -> Result<(), CookieError> {
    if name.len() > MAX_TRACKED_NAME {
        return Err(CookieError::NameTooLong { len: name.len() });
    }
    let keys = tracked.keys(hasher, name, value);
    // One name for every key: a name not spelt as the policy spells it is
    // a copy, made once.
    let mut shown: Option<Arc<str>> = None;
    let mut counted = false;
    for key in keys.all() {
        if !found.iter().any(|c| c.key == key) {
            // Cookies count against the limit, not the keys they are known
            // by (the list holds at most four times the limit): once, at
            // the first key of theirs the list did not hold.
            if !counted {
                if *cookies == MAX_TRACKED_PER_REQUEST {
                    return Err(CookieError::TooMany);
                }
                *cookies += 1;
                counted = true;
            }
            let shown = shown.get_or_insert_with(|| tracked.name(name));
            found.push(Credential::cookie(Arc::clone(shown), key));
        }
    }
    Ok(())
}

/// The most bytes of `Cookie` fields a [`CookieMemo`] keeps (their bytes
/// and a separator after each): a browser's are usually well under it;
/// longer ones are read afresh on every request.
pub const MEMO_MAX_HEADER: usize = 4096;

/// The most credentials a [`CookieMemo`] keeps with them (a browser sends a
/// few tracked cookies): fields holding more are read afresh on every
/// request, so that what a memo keeps stays within a few KiB.
pub const MEMO_MAX_CREDENTIALS: usize = 16;

/// A connection's memory of its last request's `Cookie` fields and the
/// credentials read from them. A browser sends the same header (over
/// HTTP/2, the same crumbs) on request after request of one connection
/// until a cookie changes, and reading it costs some 600 instructions a
/// pair (most of them names nobody tracks) plus a keyed hash per tracked
/// cookie. What is remembered is a copy of the fields' bytes (never a
/// reference into the request's buffer, which would keep it alive) and the
/// pin keys, never a value on its own: at most [`MEMO_MAX_HEADER`] bytes
/// and [`MEMO_MAX_CREDENTIALS`] credentials. An HTTP/1.1 connection's memo
/// is emptied when the connection parks ([`CookieMemo::forget`]); an
/// HTTP/2 connection's lives as long as the connection (whose own header
/// tables take as much).
///
/// A recall needs the very bytes, split into the same fields in the same
/// order, the same policy and the same hasher (a connection only ever meets
/// the process's one hasher): the answer is then the one reading the fields
/// would give.
#[derive(Default)]
pub struct CookieMemo(Mutex<Option<Box<Remembered>>>);

/// Says whether it remembers fields, never the fields: their bytes are
/// cookie values.
impl std::fmt::Debug for CookieMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let remembers = self.0.lock().map(|memo| memo.is_some()).unwrap_or(false);
        f.debug_struct("CookieMemo")
            .field("remembers", &remembers)
            .finish()
    }
}

/// What a [`CookieMemo`] holds.
struct Remembered {
    /// [`CookiePolicy::id`] of the policy that read the fields.
    policy: u64,
    /// The fields, byte for byte, each followed by [`FIELD_END`].
    fields: Box<[u8]>,
    /// Their tracked cookies' credentials, as read.
    found: Vec<Credential>,
    /// How many distinct cookies the reading counted (the limit's count:
    /// `found` may hold two keys for one cookie).
    cookies: usize,
}

/// A clone remembers nothing: a memo is one connection's.
impl Clone for CookieMemo {
    fn clone(&self) -> CookieMemo {
        CookieMemo::default()
    }
}

/// What ends each field in [`Remembered::fields`]: a byte no header value
/// pinproxy is given holds (HTTP/1.1 heads are parsed by `httparse`, which
/// takes tab, visible ASCII, space and bytes from 0x80 in a value; HTTP/2's
/// by `h2`, whose values pass `HeaderValue::from_bytes`, which refuses a
/// line feed), so fields split otherwise (`a=1; b=2` against `a=1;` and
/// ` b=2`) never compare equal.
const FIELD_END: u8 = b'\n';

impl CookieMemo {
    /// The credentials of `fields` under `policy`, and the count of
    /// cookies they hold, if they are the fields remembered.
    fn recall(
        &self,
        policy: &CookiePolicy,
        fields: &GetAll<'_, HeaderValue>,
    ) -> Option<(Vec<Credential>, usize)> {
        let memo = self.0.lock().ok()?;
        let remembered = memo.as_ref()?;
        if remembered.policy != policy.id {
            return None;
        }
        let mut rest = &remembered.fields[..];
        for field in fields.iter() {
            rest = rest
                .strip_prefix(field.as_bytes())?
                .strip_prefix(&[FIELD_END])?;
        }
        rest.is_empty()
            .then(|| (remembered.found.clone(), remembered.cookies))
    }

    /// Remembers `found` (`cookies` distinct cookies) as the credentials
    /// of `fields` under `policy` (unless they hold more than
    /// [`MEMO_MAX_HEADER`] bytes or [`MEMO_MAX_CREDENTIALS`] credentials).
    fn remember(
        &self,
        policy: &CookiePolicy,
        fields: &GetAll<'_, HeaderValue>,
        found: &[Credential],
        cookies: usize,
    ) {
        let Ok(mut memo) = self.0.lock() else {
            return;
        };
        let len: usize = fields.iter().map(|field| field.len() + 1).sum();
        *memo = (len <= MEMO_MAX_HEADER && found.len() <= MEMO_MAX_CREDENTIALS).then(|| {
            let mut bytes = Vec::with_capacity(len);
            for field in fields.iter() {
                bytes.extend_from_slice(field.as_bytes());
                bytes.push(FIELD_END);
            }
            Box::new(Remembered {
                policy: policy.id,
                fields: bytes.into_boxed_slice(),
                found: found.to_vec(),
                cookies,
            })
        });
    }

    /// Forgets what it remembered (the connection parked).
    pub fn forget(&self) {
        if let Ok(mut memo) = self.0.lock() {
            *memo = None;
        }
    }
}

/// The tracked pairs of one `Cookie` header, name and value, as
/// `Cookie::split_parse` finds them (the tests hold the two together).
///
/// A pair of a `Cookie` header has no attributes, and the crate reads it as
/// the text before its first `=` and the text after, each trimmed (`str::
/// trim`), refusing a pair without `=` or with an empty name; pairs nobody
/// tracks are stepped over before anything else. Split here rather than by
/// `Cookie::parse`, which set up a general search for `;` and for `=` and
/// built a whole cookie for each tracked pair: about 700 instructions a
/// pair, against about 100 (callgrind, two tracked cookies per request).
/// `Set-Cookie`, whose attributes matter, is still read by the crate.
fn tracked_pairs<'a>(
    text: &'a str,
    policy: &'a CookiePolicy,
) -> impl Iterator<Item = (&'a str, Tracked<'a>, &'a str)> + 'a {
    pieces(text, b';').filter_map(|pair| {
        let (name, value) = split_pair(pair)?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let tracked = policy.tracked(name)?;
        let value = value.trim();
        // An empty value carries nothing of a session, and would be one
        // credential shared by every client that sends it (`datadome=`,
        // what a jar keeps after some deletions): not a credential, as an
        // empty `X-DataDome-ClientID` is not, and as a `Set-Cookie` with
        // one deletes.
        if unquote(value).is_empty() {
            return None;
        }
        Some((name, tracked, value))
    })
}

/// Whether a pair of `text` holds, after a comma, a space or a tab inside
/// it, what reads as a tracked cookie: `a=1, datadome=T` (two `Cookie`
/// lines folded with a comma, which some servers split as two pairs) or
/// `a=1 datadome=T` and `lang datadome=T` (lua-resty-cookie, DataDome's own
/// Lua modules and Python's `SimpleCookie` start a pair after a blank). A
/// cookie's value may hold none of these (RFC 6265 §4.1.1), so this is
/// folding or a broken jar; either way pinproxy cannot tell how the origin
/// will read it.
fn hides_tracked(text: &str, policy: &CookiePolicy) -> bool {
    let tracked = |part: &str| {
        split_pair(part).is_some_and(|(name, _)| {
            let name = name.trim();
            !name.is_empty() && policy.is_tracked(name)
        })
    };
    pieces(text, b';').any(|pair| {
        let pair = pair.trim();
        pieces_at_every_break(pair).skip(1).any(tracked)
            || (blank_beside_eq(pair) && inner_pieces(pair).skip(1).any(tracked))
    })
}

/// Whether `text` holds a comma, or a space or tab inside a pair (between
/// two bytes that are neither blanks nor `;`): only then can a pair hide
/// another ([`hides_tracked`]). The blanks of browsers' `"; "` separators
/// are not inside a pair, so their headers skip the second look.
fn has_inner_break(text: &str) -> bool {
    let bytes = text.as_bytes();
    if memchr::memchr(b',', bytes).is_some() {
        return true;
    }
    // Each run of blanks once, by the bytes either side of it.
    let mut blanks = memchr::memchr2_iter(b' ', b'\t', bytes).peekable();
    while let Some(start) = blanks.next() {
        let mut end = start;
        while blanks.next_if_eq(&(end + 1)).is_some() {
            end += 1;
        }
        let before = start.checked_sub(1).and_then(|at| bytes.get(at));
        let after = bytes.get(end + 1);
        if before.is_some_and(|b| *b != b';') && after.is_some_and(|b| *b != b';') {
            return true;
        }
    }
    false
}

/// The pieces of a `Cookie` pair between commas, spaces and tabs, but
/// for blanks beside an `=`: Python's `SimpleCookie` reads `name = value`
/// as one pair, so `a=1 datadome =T` hides `datadome=T` from a reading that
/// split at every blank ([`pieces_at_every_break`], which is
/// lua-resty-cookie's: it reads `x= datadome=T` as two pairs, where this
/// one sees one). A pair hides a tracked one if either reading finds it.
fn inner_pieces(pair: &str) -> impl Iterator<Item = &str> {
    split_at_each(pair, inner_break)
}

/// Whether a blank stands beside an `=` in `text`: only then do
/// [`inner_pieces`] and [`pieces_at_every_break`] read it apart.
fn blank_beside_eq(text: &str) -> bool {
    let bytes = text.as_bytes();
    let blank = |at: Option<&u8>| matches!(at, Some(b' ' | b'\t'));
    memchr::memchr_iter(b'=', bytes)
        .any(|at| blank(at.checked_sub(1).and_then(|i| bytes.get(i))) || blank(bytes.get(at + 1)))
}

/// The pieces of a `Cookie` pair between every comma, space and tab.
fn pieces_at_every_break(pair: &str) -> impl Iterator<Item = &str> {
    split_at_each(pair, |bytes| memchr::memchr3(b',', b' ', b'\t', bytes))
}

/// Where the first piece of `bytes` ends ([`inner_pieces`]): at a comma,
/// or at a run of blanks with no `=` either side of it.
fn inner_break(bytes: &[u8]) -> Option<usize> {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let mut from = 0;
    loop {
        let at = from + memchr::memchr3(b',', b' ', b'\t', bytes.get(from..)?)?;
        if bytes.get(at) == Some(&b',') {
            return Some(at);
        }
        let run = bytes.get(at..)?.iter().take_while(|b| blank(b)).count();
        let after_eq = at.checked_sub(1).and_then(|i| bytes.get(i)) == Some(&b'=');
        if !after_eq && bytes.get(at + run) != Some(&b'=') {
            return Some(at);
        }
        from = at + run;
    }
}

/// A `Cookie` pair's text before its first `=` and after it (untrimmed);
/// `None` without `=`.
fn split_pair(pair: &str) -> Option<(&str, &str)> {
    let at = memchr::memchr(b'=', pair.as_bytes())?;
    // Either side of an ASCII byte: char boundaries.
    Some((pair.get(..at)?, pair.get(at + 1..)?))
}

/// The pieces of `text` between the ASCII `separator`s, as `str::split`
/// gives them, found with the memchr crate: core's search, which
/// `str::split` uses, set up its word-wise scan for every short piece
/// (about 1,100 instructions for a header of three pairs), and a plain byte
/// loop cost four instructions a byte of a browser's long header.
fn pieces(text: &str, separator: u8) -> impl Iterator<Item = &str> {
    split_at_each(text, move |bytes| memchr::memchr(separator, bytes))
}

/// The pieces of `text` between the ASCII bytes `find` finds (the first
/// one in the bytes it is given).
fn split_at_each(text: &str, find: impl Fn(&[u8]) -> Option<usize>) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match find(current.as_bytes()) {
            // Both halves start or end at an ASCII byte: char boundaries.
            Some(at) => {
                rest = current.get(at + 1..);
                current.get(..at)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// Collects the tracked cookies a response sets, from `Set-Cookie` and
/// DataDome's `X-Set-Cookie`. Lines with no `name=value` pair are skipped:
/// the client will not store them either. Bytes that are not UTF-8 do not
/// make a line unreadable: clients keep a cookie whose attributes hold
/// such bytes (Python's and curl's jars read header lines as Latin-1), so
/// the line is read with them replaced. A value that holds such bytes
/// comes back in a `Cookie` header that is refused as unreadable.
pub fn tracked_in_response(
    headers: &HeaderMap,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    now_ms: impl FnOnce() -> u64,
) -> Vec<SetTrackedCookie> {
    // The clock is read for the first tracked cookie only: most responses
    // set none, and a clock read costs about a hundred instructions.
    let now_ms = std::cell::LazyCell::new(now_ms);
    let origin_now_ms = std::cell::LazyCell::new(|| origin_date_ms(headers));
    let mut found = Vec::new();
    // One look over the names for every token header: most answers carry
    // none.
    let tokens = super::holds_any_custom(headers, &RESPONSE_TOKEN_HEADERS);
    let carriers = tokens.then(|| headers.get_all(&X_SET_COOKIE));
    for (header, is_datadome_carrier) in headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .map(|h| (h, false))
        .chain(carriers.into_iter().flatten().map(|h| (h, true)))
    {
        let text = String::from_utf8_lossy(header.as_bytes());
        let text = &*text;
        let parsed = match Cookie::parse(text) {
            Ok(c) => c,
            // DataDome's carrier may hold the bare token rather than a
            // `datadome=...` line.
            Err(_) if is_datadome_carrier && !text.trim().is_empty() => Cookie::new(
                DATADOME,
                text.split(';').next().unwrap_or("").trim().to_owned(),
            ),
            // A cookie without a name (`=datadome=T`): browsers keep it and
            // send its value back alone, which reads as `datadome=T`.
            Err(_) => match text.trim_start().strip_prefix('=').map(Cookie::parse) {
                Some(Ok(c)) => c,
                _ => continue,
            },
        };
        let hidden = set_but_hidden(text, policy);
        let Some(tracked) = policy.tracked(parsed.name()) else {
            if hidden.is_empty() {
                continue;
            }
            let expires_ms = cookie_expiry_ms(&parsed, text, *now_ms, *origin_now_ms).0;
            for (name, tracked, value) in hidden {
                for (i, key) in tracked.keys(hasher, name, value).set().enumerate() {
                    found.push(SetTrackedCookie {
                        cookie: Credential::cookie(tracked.name(name), key),
                        deletes: false,
                        expires_ms,
                        also: i > 0,
                    });
                }
            }
            continue;
        };
        let now_ms = *now_ms;
        let (expires_ms, expired) = cookie_expiry_ms(&parsed, text, now_ms, *origin_now_ms);
        let deletes = expired || unquote(parsed.value()).is_empty();
        // Pinned by its canonical key (and the one it had before escapes
        // were decoded): a request that sends it in another spelling
        // carries that key too.
        let keys = tracked.keys(hasher, parsed.name(), parsed.value());
        for (i, key) in keys.set().enumerate() {
            found.push(SetTrackedCookie {
                cookie: Credential::cookie(tracked.name(parsed.name()), key),
                deletes,
                expires_ms,
                also: i > 0,
            });
        }
        for (name, tracked, value) in hidden {
            let mut first = true;
            for key in tracked.keys(hasher, name, value).set() {
                if !keys.set().any(|set| set == key) {
                    found.push(SetTrackedCookie {
                        cookie: Credential::cookie(tracked.name(name), key),
                        deletes: false,
                        expires_ms,
                        also: !std::mem::take(&mut first),
                    });
                }
            }
        }
    }
    // A token a vendor's answer hands its SDK in a header of its own, which
    // the SDK sends back in the request header of that name.
    for answer in TOKEN_ANSWERS.iter().filter(|_| tokens) {
        for header in headers.get_all(answer) {
            let Some((name, token)) = header.to_str().ok().and_then(|v| token_name(answer, v))
            else {
                continue;
            };
            // Keyed as the request header's token is read.
            let keys = Tracked::Pattern { php: None }.keys(hasher, name, token);
            for (i, key) in keys.set().enumerate() {
                found.push(SetTrackedCookie {
                    cookie: Credential::cookie(name, key),
                    deletes: false,
                    expires_ms: None,
                    also: i > 0,
                });
            }
        }
    }
    found
}

/// The tracked `name=value` pairs of a `Set-Cookie` line other than its
/// cookie: after a `;`, a comma or a blank (`a=1; datadome=T; Path=/`,
/// `a=1 datadome=T`). Browsers, Go, curl and `http.cookiejar` keep only
/// the line's first pair; a jar loaded by Python's `SimpleCookie` (aiohttp's
/// was) keeps each such pair as a cookie of its own, and sends it back. So
/// each is pinned as the line sets it, never taken as a deletion: pinning
/// one that no client keeps costs nothing.
fn set_but_hidden<'a>(
    text: &'a str,
    policy: &'a CookiePolicy,
) -> Vec<(&'a str, Tracked<'a>, &'a str)> {
    // Both readings of each piece (see `inner_pieces`), each pair once (a
    // set of what was taken: an origin's line may hold thousands).
    let mut found: Vec<(&str, Tracked<'_>, &str)> = Vec::new();
    let mut taken: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
    for (i, piece) in pieces(text, b';').enumerate() {
        let first = usize::from(i == 0);
        // The second reading differs only where a blank touches an `=`.
        let second = blank_beside_eq(piece).then(|| inner_pieces(piece).skip(first));
        let parts = pieces_at_every_break(piece)
            .skip(first)
            .chain(second.into_iter().flatten());
        for part in parts {
            let Some((name, value)) = split_pair(part) else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            // The attributes a line is made of are no one's cookie.
            if ATTRIBUTES.iter().any(|a| a.eq_ignore_ascii_case(name)) || unquote(value).is_empty()
            {
                continue;
            }
            let Some(tracked) = policy.tracked(name) else {
                continue;
            };
            if taken.insert((name, value)) {
                found.push((name, tracked, value));
            }
        }
    }
    found
}

/// The `Set-Cookie` attributes that take a value.
const ATTRIBUTES: [&str; 10] = [
    "path",
    "domain",
    "expires",
    "max-age",
    "samesite",
    "priority",
    "version",
    "comment",
    "commenturl",
    "port",
];

/// Removes from a request the tracked cookies whose keys are in `strip`
/// (from every `Cookie` header, and the token headers: `X-DataDome-ClientID`
/// and [`TOKEN_CARRIERS`]); every other cookie stays as sent.
pub fn strip_from_request(
    headers: &mut HeaderMap,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    strip: &[PinKey],
) {
    if strip.is_empty() {
        return;
    }
    // By either key a cookie is known by (a credential read by one of them
    // is stripped in every spelling).
    let known_by = |tracked: Tracked<'_>, name: &str, value: &str| {
        tracked
            .keys(hasher, name, value)
            .all()
            .any(|key| strip.contains(&key))
    };
    // By any value it was read as, the shorter ones too (a credential read
    // as `T` from `datadome=T, x=1` goes with its pair).
    let stripped = |name: &str, value: &str| {
        policy.tracked(name).is_some_and(|tracked| {
            known_by(tracked, name, value)
                || shorter_readings(value)
                    .into_iter()
                    .any(|shorter| known_by(tracked, name, shorter))
        })
    };
    // In place: the `Cookie` header keeps its position among the others.
    header_order::rewrite(headers, |name, value| {
        if name == X_DATADOME_CLIENTID {
            // Every value is a credential of its own (reading takes them
            // all), so each is judged, not just the first.
            let id = value.to_str().ok()?.trim();
            let tracked = policy
                .tracked(DATADOME)
                .unwrap_or(Tracked::Pattern { php: None });
            return (!known_by(tracked, DATADOME, id)).then_some(value);
        }
        if let Some(carrier) = TOKEN_CARRIERS.iter().find(|carrier| *carrier == name) {
            let Some((name, token)) = token_name(carrier, value.to_str().ok()?) else {
                return Some(value);
            };
            let tracked = Tracked::Pattern { php: None };
            return (!known_by(tracked, name, token)).then_some(value);
        }
        if name != http::header::COOKIE {
            return Some(value);
        }
        // A header that is not text cannot be checked: it does not leave.
        let text = std::str::from_utf8(value.as_bytes()).ok()?;
        let strips = |pair: &str| {
            split_pair(pair).is_some_and(|(name, value)| stripped(name.trim(), value.trim()))
        };
        // A header with nothing to strip leaves as sent, byte for byte.
        if !pieces(text, b';').any(strips) {
            return Some(value);
        }
        let kept: Vec<&str> = text
            .split(';')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .filter(|pair| !strips(pair))
            .collect();
        if kept.is_empty() {
            None
        } else {
            http::HeaderValue::from_str(&kept.join("; ")).ok()
        }
    });
}

/// How far before now an `Expires` must lie to be taken for a deletion
/// when the response says nothing of the origin's clock (no `Date`): the
/// usual deletion names 1970; a time closer than this may be a clock that
/// reads ahead.
const SURELY_PAST_MS: u64 = 24 * 3_600_000;

/// When a set cookie expires, in Unix milliseconds on pinproxy's clock
/// (`None` for a session cookie), and whether it is being deleted. `line`
/// is the `Set-Cookie` line `cookie` was read from.
///
/// Clients do not all read a line alike, and the cookie must stay pinned
/// for as long as any of them keeps it: a line is a deletion only when
/// every reading deletes it, and is otherwise pinned for the longest any
/// reading keeps it (the session being longest). Besides browsers'
/// ([`browsers_expiry_ms`]): a `Max-Age` browsers ignore that Go, Python
/// or curl read as a lifetime (`+86400`, `"86400"`, `86400s`); an
/// `Expires` Go's client cannot read, which it keeps for the session; and
/// a positive `Max-Age` with a leading zero, which Go ignores; an
/// `Expires` before 1970, which Python and curl keep for the session; and a
/// line with two `Max-Age` or two `Expires` attributes that differ (clients
/// differ on which counts), all taken as the session.
fn cookie_expiry_ms(
    cookie: &Cookie<'_>,
    line: &str,
    now_ms: u64,
    origin_now_ms: Option<u64>,
) -> (Option<u64>, bool) {
    let max_age = max_age_seconds(line);
    let browsers = browsers_expiry_ms(cookie, max_age, now_ms, origin_now_ms);
    // The lifetimes of the other readings that keep the cookie.
    let mut kept: SmallVec<[Option<u64>; 2]> = SmallVec::new();
    if let Some(seconds) = lenient_max_age_seconds(line) {
        kept.push(Some(now_ms.saturating_add(seconds.saturating_mul(1000))));
    }
    if attributes_disagree(line) {
        kept.push(None);
    }
    if max_age.is_none() && cookie.expires().is_some() && !go_reads_expires(line) {
        kept.push(None);
    }
    // A positive `Max-Age` with a leading zero, which Go ignores (it then
    // reads `Expires`, or keeps the cookie for the session).
    if max_age_values(line)
        .any(|value| value.starts_with('0') && value.bytes().any(|b| (b'1'..=b'9').contains(&b)))
    {
        kept.push(None);
    }
    // An `Expires` before 1970, which Python's jar and curl take for a
    // session cookie.
    if max_age.is_none()
        && cookie
            .expires_datetime()
            .is_some_and(|at| at.unix_timestamp() < 0)
    {
        kept.push(None);
    }
    if kept.is_empty() {
        return browsers;
    }
    let (browsers_end, browsers_delete) = browsers;
    let longest = kept
        .into_iter()
        .chain((!browsers_delete).then_some(browsers_end))
        .reduce(|a, b| a.zip(b).map(|(a, b)| a.max(b)))
        .flatten();
    (longest, false)
}

/// Whether a line's `Max-Age` attributes differ, or its `Expires`
/// attributes do, a value that no client reads and a valueless attribute
/// included: clients differ on which of several counts. Browsers take the
/// last of each name whatever its value, and one they cannot read sends
/// them to `Expires`, or to the session (`Max-Age=0; Max-Age=x` is kept
/// by Chromium and Firefox, where Go, Python and curl delete it).
fn attributes_disagree(line: &str) -> bool {
    fn differ<T: PartialEq>(mut values: impl Iterator<Item = T>) -> bool {
        let first = values.next();
        values.any(|value| Some(value) != first)
    }
    differ(max_age_values(line)) || differ(attribute_values(line, "expires"))
}

/// [`cookie_expiry_ms`] as browsers read a line whose `Max-Age` they read
/// as `max_age` ([`max_age_seconds`]): `Max-Age` wins over `Expires` (RFC
/// 6265 §5.3).
///
/// `Expires` is a time on the origin's clock, which the client reads on
/// its own. Where the response says what the origin's clock read
/// (`origin_now_ms`, its `Date`), the cookie is a deletion only when past
/// on both that clock and this one, and is pinned at least as long after
/// now as it lives after that: a clock that reads ahead of the origin's by
/// more than a short cookie's life (`__cf_bm`'s 30 minutes) would
/// otherwise take the cookie for a deletion, leave it unpinned while the
/// client keeps it, and let its next request found it on any exit.
/// Without `Date`, only a time well past is a deletion; one just past is
/// pinned as expired (its next request is refused, `cookie-expired`,
/// rather than founded anew).
fn browsers_expiry_ms(
    cookie: &Cookie<'_>,
    max_age: Option<i64>,
    now_ms: u64,
    origin_now_ms: Option<u64>,
) -> (Option<u64>, bool) {
    if let Some(seconds) = max_age {
        let at = now_ms.saturating_add_signed(seconds.saturating_mul(1000));
        return (Some(at), at <= now_ms);
    }
    let Some(at) = cookie.expires_datetime() else {
        return (None, false);
    };
    let at_ms = u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    match origin_now_ms {
        // A deletion only when past on both clocks (the client judges by
        // its own, which this one stands for); otherwise pinned until the
        // later of the two readings, never before the client drops it.
        Some(origin_now) => {
            let left = i64::try_from(at_ms).unwrap_or(i64::MAX)
                - i64::try_from(origin_now).unwrap_or(i64::MAX);
            let translated = now_ms.saturating_add_signed(left);
            let deleted = at_ms <= origin_now && at_ms <= now_ms;
            (Some(translated.max(at_ms)), deleted)
        }
        None => (Some(at_ms), at_ms.saturating_add(SURELY_PAST_MS) <= now_ms),
    }
}

/// What the origin's clock read when it answered: the response's `Date`,
/// in Unix milliseconds (`None` without a readable one).
fn origin_date_ms(headers: &HeaderMap) -> Option<u64> {
    let date = headers.get(http::header::DATE)?.to_str().ok()?;
    let at = httpdate::parse_http_date(date).ok()?;
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// The `Max-Age` of a `Set-Cookie` line in seconds, as browsers read it:
/// the last attribute whose value is an optional `-` and then digits
/// (RFC 6265bis §5.6.2); one that is not (`Max-Age=-`, `Max-Age=1h`) is
/// ignored. The cookie crate reads `-` alone as zero, a deletion, where a
/// browser keeps the cookie: pinproxy would then leave unpinned a cookie
/// the client holds. Digits past the range saturate.
fn max_age_seconds(line: &str) -> Option<i64> {
    max_age_values(line)
        .filter_map(|value| {
            let (negative, digits) = match value.strip_prefix('-') {
                Some(digits) => (true, digits),
                None => (false, value),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let magnitude = digits.parse::<i64>().unwrap_or(i64::MAX);
            Some(if negative { -magnitude } else { magnitude })
        })
        .last()
}

/// The values of a `Set-Cookie` line's `Max-Age` attributes, trimmed.
fn max_age_values(line: &str) -> impl Iterator<Item = &str> {
    attribute_values(line, "max-age")
}

/// The values of a `Set-Cookie` line's attributes named `wanted` (in any
/// case), trimmed, in order; an attribute without `=` has the empty value
/// (browsers record it so: a valueless `Max-Age` or `Expires` last in a
/// line makes them ignore the earlier ones).
fn attribute_values<'a>(line: &'a str, wanted: &'a str) -> impl Iterator<Item = &'a str> {
    pieces(line, b';').skip(1).filter_map(move |attribute| {
        let (name, value) = split_pair(attribute).unwrap_or((attribute, ""));
        name.trim()
            .eq_ignore_ascii_case(wanted)
            .then(|| value.trim())
    })
}

/// The positive lifetime some client reads in a `Max-Age` that
/// [`max_age_seconds`] (and browsers) ignore: Go's and Python's integer
/// parsing take a leading `+`, curl's also skips a leading `"` and stops at
/// the first byte that is not a digit. `None` when no such value reads as
/// more than zero seconds.
fn lenient_max_age_seconds(line: &str) -> Option<u64> {
    max_age_values(line)
        .filter_map(lenient_seconds)
        .filter_map(|seconds| u64::try_from(seconds).ok().filter(|s| *s > 0))
        .last()
}

/// A `Max-Age` value as the most lenient client reads it: a leading `"`
/// skipped (curl), a sign (`+` too: Go's and Python's integer parsing),
/// then the digits up to the first byte that is not one (curl); digits past
/// the range saturate (curl). `None` without a digit.
fn lenient_seconds(value: &str) -> Option<i64> {
    let value = value.strip_prefix('"').unwrap_or(value);
    let (negative, value) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value.strip_prefix('+').unwrap_or(value)),
    };
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let magnitude = value.get(..digits).filter(|d| !d.is_empty())?;
    let magnitude = magnitude.parse::<i64>().unwrap_or(i64::MAX);
    Some(if negative { -magnitude } else { magnitude })
}

/// Whether Go's client (net/http) reads the (last) `Expires` attribute of
/// a `Set-Cookie` line: only as RFC 1123 (`Thu, 01 Jan 1970 00:00:00 GMT`)
/// or with dashes (`Thu, 01-Jan-1970 00:00:00 GMT`); it keeps a cookie whose
/// `Expires` it cannot read for the session.
fn go_reads_expires(line: &str) -> bool {
    let Some(value) = attribute_values(line, "expires").last() else {
        return false;
    };
    let b = value.as_bytes();
    let letters = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|s| s.iter().all(u8::is_ascii_alphabetic))
    };
    let digits = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let separator = b.get(7).copied().filter(|c| *c == b' ' || *c == b'-');
    letters(0..3)
        && at(3, b',')
        && at(4, b' ')
        && digits(5..7)
        && separator.is_some_and(|sep| at(7, sep) && at(11, sep))
        && letters(8..11)
        && digits(12..16)
        && at(16, b' ')
        && digits(17..19)
        && at(19, b':')
        && digits(20..22)
        && at(22, b':')
        && digits(23..25)
        && at(25, b' ')
        && letters(26..b.len())
        && b.len() >= 29
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy() -> CookiePolicy {
        CookiePolicy::with_extra(&["session_*".into()]).unwrap()
    }

    fn hasher() -> PinHasher {
        PinHasher::new([7; 32])
    }

    /// The pairs `Cookie::split_parse` finds whose name is tracked and whose
    /// value is not empty: what [`tracked_pairs`] must find.
    fn reference(text: &str, policy: &CookiePolicy) -> Vec<(String, String)> {
        Cookie::split_parse(text)
            .flatten()
            .filter(|pair| policy.is_tracked(pair.name()))
            .filter(|pair| !pair.value().is_empty() && pair.value() != "\"\"")
            .map(|pair| (pair.name().to_owned(), pair.value().to_owned()))
            .collect()
    }

    fn prefiltered(text: &str, policy: &CookiePolicy) -> Vec<(String, String)> {
        tracked_pairs(text, policy)
            .map(|(name, _, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    #[test]
    fn tracked_pairs_are_the_crates_tracked_pairs() {
        let p = policy();
        for text in [
            "datadome=a; _ga=GA1.1; cf_clearance=b",
            " datadome = a b ;cf_clearance=\"q\";;  ; =x; datadome; DataDome=c",
            "_ga=1;\tsession_x = y= z ;session_=;incap_ses_1_2=v;px3=no",
            "=datadome; datadome==; ;datadome=;__cf_bm=\u{a0}v\u{a0}",
            "",
            ";;;",
        ] {
            assert_eq!(prefiltered(text, &p), reference(text, &p), "{text:?}");
        }
        // And only the tracked pairs come out.
        assert_eq!(
            prefiltered("_ga=1; _gid=2; datadome=3", &p),
            vec![("datadome".to_owned(), "3".to_owned())]
        );
    }

    #[test]
    fn a_request_carries_at_most_256_tracked_cookies_with_names_of_1024_bytes() {
        let (p, h) = (policy(), hasher());
        let read = |cookie: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("cookie", HeaderValue::from_str(cookie).unwrap());
            tracked_in_request(&headers, &p, &h)
        };
        let jar = |n: usize| {
            (0..n)
                .map(|i| format!("session_{i}=v; _ga=x"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        assert_eq!(
            read(&jar(MAX_TRACKED_PER_REQUEST)).unwrap().len(),
            MAX_TRACKED_PER_REQUEST
        );
        // Repeats and untracked names do not count.
        let repeated = format!("{}; session_0=v; _gid=1", jar(MAX_TRACKED_PER_REQUEST));
        assert_eq!(read(&repeated).unwrap().len(), MAX_TRACKED_PER_REQUEST);
        assert!(matches!(
            read(&jar(MAX_TRACKED_PER_REQUEST + 1)),
            Err(CookieError::TooMany)
        ));
        // A cookie in another spelling is one cookie, known by two keys.
        let respelt = (0..MAX_TRACKED_PER_REQUEST)
            .map(|i| format!("Session_{i}=v"))
            .collect::<Vec<_>>()
            .join("; ");
        assert_eq!(read(&respelt).unwrap().len(), 2 * MAX_TRACKED_PER_REQUEST);
        // X-DataDome-ClientID counts as the cookie it carries.
        let mut headers = HeaderMap::new();
        headers.insert(
            "cookie",
            HeaderValue::from_str(&jar(MAX_TRACKED_PER_REQUEST)).unwrap(),
        );
        headers.insert("x-datadome-clientid", HeaderValue::from_static("abc"));
        assert!(matches!(
            tracked_in_request(&headers, &p, &h),
            Err(CookieError::TooMany)
        ));

        let longest = format!(
            "session_{}",
            "x".repeat(MAX_TRACKED_NAME - "session_".len())
        );
        assert_eq!(read(&format!("{longest}=v")).unwrap().len(), 1);
        assert!(matches!(
            read(&format!("{longest}x=v")),
            Err(CookieError::NameTooLong { len: 1025 })
        ));
        // An untracked name of any length is not the tracker's business.
        let untracked = format!("u{}=v; datadome=1", "x".repeat(4096));
        assert_eq!(read(&untracked).unwrap().len(), 1);
    }

    #[test]
    fn pieces_are_what_split_gives() {
        for text in ["", ";", "a", "a;b", ";a;;b;", "é;ü=ß;", "a=b=c"] {
            for separator in [b';', b'='] {
                let ours: Vec<&str> = pieces(text, separator).collect();
                let std: Vec<&str> = text.split(char::from(separator)).collect();
                assert_eq!(ours, std, "{text:?}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn tracked_pairs_match_the_crate_on_any_header(
            text in "[a-e_ =;\"\t\u{a0}]{0,40}|(datadome|cf_clearance|session_a|_ga|x)(=[a-z ]{0,4})?(; ?(datadome|cf_clearance|_ga|=)[=a-z ]{0,5}){0,5}"
        ) {
            let p = CookiePolicy::with_extra(&["session_*".into(), "a*".into(), "b".into()]).unwrap();
            proptest::prop_assert_eq!(prefiltered(&text, &p), reference(&text, &p));
        }

        /// Whatever a connection sent before, its memo gives each request
        /// the credentials reading that request afresh gives.
        #[test]
        fn a_memo_answers_as_reading_afresh(
            requests in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        "(datadome|DataDome|cf_clearance|_ga|session_a|SESSION_B)=\"?[ab,]{0,2}\"?(; datadome=a)?",
                        0..4,
                    ),
                    proptest::option::of("[ab]{1,2}"),
                    proptest::bool::ANY,
                ),
                1..12,
            )
        ) {
            let (p, h) = (policy(), hasher());
            let memo = CookieMemo::default();
            for (cookie_headers, client_id, idle) in requests {
                let mut headers = HeaderMap::new();
                for text in &cookie_headers {
                    headers.append(http::header::COOKIE, HeaderValue::from_str(text).unwrap());
                }
                if let Some(id) = client_id {
                    headers.insert(&X_DATADOME_CLIENTID, HeaderValue::from_str(&id).unwrap());
                }
                // The same credentials, or the same refusal.
                let afresh = tracked_in_request(&headers, &p, &h).map_err(|e| e.to_string());
                let remembered = tracked_in_request_with(&headers, &p, &h, Some(&memo))
                    .map_err(|e| e.to_string());
                proptest::prop_assert_eq!(remembered, afresh);
                if idle {
                    memo.forget();
                }
            }
        }
    }

    fn cookie_request(texts: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for text in texts {
            headers.append(http::header::COOKIE, HeaderValue::from_str(text).unwrap());
        }
        headers
    }

    /// What `memo` recalls for a request with `texts` as its `Cookie` fields.
    fn recalled(memo: &CookieMemo, p: &CookiePolicy, texts: &[&str]) -> Option<Vec<Credential>> {
        memo.recall(p, &cookie_request(texts).get_all(http::header::COOKIE))
            .map(|(found, _)| found)
    }

    #[test]
    fn a_memo_recalls_only_the_same_header_under_the_same_policy() {
        let (p, h) = (policy(), hasher());
        let memo = CookieMemo::default();
        let read = |text: &str| {
            tracked_in_request_with(&cookie_request(&[text]), &p, &h, Some(&memo)).unwrap()
        };
        let header = "_ga=1; datadome=v1; cf_clearance=c";
        let first = read(header);
        assert_eq!(first.len(), 2);
        assert_eq!(recalled(&memo, &p, &[header]), Some(first.clone()));
        // One byte off: not recalled, and read afresh.
        let changed = "_ga=1; datadome=v2; cf_clearance=c";
        assert_eq!(recalled(&memo, &p, &[changed]), None);
        let second = read(changed);
        assert_ne!(second[0].key, first[0].key);
        assert_eq!(second[1].key, first[1].key);
        assert_eq!(recalled(&memo, &p, &[changed]), Some(second));
        // Another policy, even one tracking the same names, reads afresh.
        let other = policy();
        assert_eq!(recalled(&memo, &other, &[changed]), None);
        // A policy's clone is the same policy.
        assert!(recalled(&memo, &p.clone(), &[changed]).is_some());
        memo.forget();
        assert_eq!(recalled(&memo, &p, &[changed]), None);
    }

    #[test]
    fn a_memo_recalls_crumbs_only_split_as_remembered() {
        let (p, h) = (policy(), hasher());
        let memo = CookieMemo::default();
        // A browser's crumbs over HTTP/2: a field per cookie.
        let crumbs = ["_ga=1", "datadome=v1", "cf_clearance=c"];
        let read = |texts: &[&str]| {
            tracked_in_request_with(&cookie_request(texts), &p, &h, Some(&memo)).unwrap()
        };
        let found = read(&crumbs);
        assert_eq!(
            found,
            tracked_in_request(&cookie_request(&crumbs), &p, &h).unwrap()
        );
        assert_eq!(found.len(), 2);
        assert_eq!(recalled(&memo, &p, &crumbs), Some(found.clone()));
        // The same bytes in other fields, fewer fields, more, or the same
        // fields in another order: read afresh.
        for other in [
            &["_ga=1datadome=v1", "cf_clearance=c"][..],
            &["_ga=1", "datadome=v1cf_clearance=c"],
            &["_ga=1", "datadome=v1"],
            &["_ga=1", "datadome=v1", "cf_clearance=c", "a=b"],
            &["_ga=1", "datadome=v1", "cf_clearance=c", ""],
            &["datadome=v1", "_ga=1", "cf_clearance=c"],
            &["_ga=1; datadome=v1; cf_clearance=c"],
        ] {
            assert_eq!(recalled(&memo, &p, other), None, "{other:?}");
        }
        // A field's value changed: read afresh, and that is remembered.
        let changed = ["_ga=1", "datadome=v2", "cf_clearance=c"];
        let second = read(&changed);
        assert_ne!(second[0].key, found[0].key);
        assert_eq!(recalled(&memo, &p, &changed), Some(second));
        assert_eq!(recalled(&memo, &p, &crumbs), None);
    }

    #[test]
    fn a_recall_counts_cookies_as_their_reading_did() {
        let (p, h) = (policy(), hasher());
        let memo = CookieMemo::default();
        // Two cookies in other spellings: each known by two keys.
        let crumbs = ["DataDome=v", "cf_clearance=\"c\""];
        let found = tracked_in_request_with(&cookie_request(&crumbs), &p, &h, Some(&memo)).unwrap();
        assert_eq!(found.len(), 4);
        let fields = cookie_request(&crumbs);
        let recalled = memo.recall(&p, &fields.get_all(http::header::COOKIE));
        assert_eq!(
            recalled.map(|(found, cookies)| (found.len(), cookies)),
            Some((4, 2))
        );
    }

    #[test]
    fn a_memo_keeps_no_long_header() {
        let (p, h) = (policy(), hasher());
        let memo = CookieMemo::default();
        let long = format!("datadome=v; _ga={}", "x".repeat(MEMO_MAX_HEADER));
        let found =
            tracked_in_request_with(&cookie_request(&[&long]), &p, &h, Some(&memo)).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(recalled(&memo, &p, &[&long]), None);
        // Nor crumbs longer in all than it keeps.
        let crumb = format!("_ga={}", "x".repeat(MEMO_MAX_HEADER / 2));
        let crumbs = ["datadome=v", crumb.as_str(), crumb.as_str()];
        let found = tracked_in_request_with(&cookie_request(&crumbs), &p, &h, Some(&memo)).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(recalled(&memo, &p, &crumbs), None);
        // Nor more credentials than it keeps.
        let many: Vec<String> = (0..=MEMO_MAX_CREDENTIALS)
            .map(|i| format!("session_{i}=v"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let found = tracked_in_request_with(&cookie_request(&many), &p, &h, Some(&memo)).unwrap();
        assert_eq!(found.len(), MEMO_MAX_CREDENTIALS + 1);
        assert_eq!(recalled(&memo, &p, &many), None);
        // Crumbs within both are kept.
        let two = ["datadome=v", "cf_clearance=c"];
        let found = tracked_in_request_with(&cookie_request(&two), &p, &h, Some(&memo)).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(recalled(&memo, &p, &two), Some(found));
    }

    #[test]
    fn a_memo_never_shows_the_header_it_remembers() {
        let memo = CookieMemo::default();
        let headers = cookie_request(&["datadome=SECRETVALUE"]);
        tracked_in_request_with(&headers, &policy(), &hasher(), Some(&memo)).unwrap();
        let shown = format!("{memo:?}");
        assert_eq!(shown, "CookieMemo { remembers: true }");
        assert!(!shown.contains("SECRETVALUE"));
    }

    #[test]
    fn policies_key_alike_only_with_the_same_spellings_and_globs() {
        let policy = |extra: &[&str]| {
            CookiePolicy::with_extra(&extra.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
        };
        let old = policy(&["session_*", "Sid"]);
        assert!(old.keys_alike(&old));
        assert!(policy(&["Sid", "session_*", "more"]).keys_alike(&old));
        assert!(!policy(&["sid", "session_*"]).keys_alike(&old), "respelt");
        assert!(!policy(&["session_*"]).keys_alike(&old), "Sid dropped");
        assert!(!policy(&["Sid"]).keys_alike(&old), "the glob dropped");
        assert!(
            !policy(&["Sid", "session_*", "x*"]).keys_alike(&old),
            "a glob added"
        );
        assert!(!policy(&["s*"]).keys_alike(&policy(&["sid"])));
        // An exact name the old globs covered is keyed otherwise now.
        assert!(!policy(&["session_*", "Sid", "session_a"]).keys_alike(&old));
    }

    /// A policy that adds names or globs to another keeps its keys (a
    /// fleet's record is judged so); one that drops or respells any does
    /// not. Whenever it says so, every name the old policy tracks is found
    /// by the real keying too, PHP's readings included.
    #[test]
    fn a_policy_that_only_adds_keeps_the_keys_of_the_one_before() {
        let policy = |extra: &[&str]| {
            CookiePolicy::with_extra(&extra.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
        };
        let olds = [
            policy(&["session_*", "Sid"]),
            policy(&["foo_bar"]),
            policy(&["foo*", "foo_bar"]),
            policy(&[]),
            policy(&["session_*", "Sid", "session_id"]),
        ];
        let news = [
            policy(&["Sid", "session_*", "x*"]),
            policy(&["session_*", "Sid", "more"]),
            policy(&["foo_bar", "foo*"]),
            policy(&["foo*", "foo_bar", "foo.*", "s*"]),
            policy(&["foo.*"]),
            policy(&["sid", "session_*"]),
            policy(&["session_*"]),
            policy(&["session_*", "Sid", "session_id"]),
            policy(&["session_*", "Sid", "session_id", "session.x"]),
        ];
        assert!(news[0].keeps_keys_of(&olds[0]), "a glob added");
        assert!(
            news[1].keeps_keys_of(&olds[0]),
            "a name no glob covered added"
        );
        assert!(
            policy(&["session_*", "Sid", "session_id"]).keeps_keys_of(&olds[0]),
            "a name a glob covered added in lower case"
        );
        assert!(
            !policy(&["session_*", "Sid", "Session_id"]).keeps_keys_of(&olds[0]),
            "a name a glob covered added with capitals: keyed otherwise"
        );
        assert!(!news[0].keys_alike(&olds[0]));
        assert!(news[2].keeps_keys_of(&olds[1]), "a glob added");
        assert!(
            !news[4].keeps_keys_of(&olds[2]),
            "a glob and a name dropped"
        );
        assert!(!news[5].keeps_keys_of(&olds[0]), "respelt");
        assert!(!news[6].keeps_keys_of(&olds[0]), "dropped");
        let names = [
            "Sid",
            "sid",
            "session_a",
            "foo.bar",
            "foo_bar",
            "foo bar",
            "xyz",
            "datadome",
            "_px3",
            "s.id",
            "session_id",
            "Session_ID",
            "session.id",
            "session%5Fid",
            "session.x",
            "session_x",
        ];
        for old in &olds {
            for new in news.iter().filter(|new| new.keeps_keys_of(old)) {
                for name in names.iter().filter(|name| old.is_tracked(name)) {
                    assert!(
                        new.finds_pins_of(old, name),
                        "{name}: {:?} after {:?}",
                        new.patterns(),
                        old.patterns()
                    );
                }
            }
        }
    }

    /// A pin is found under a new policy only if some key it was pinned by
    /// is one the new policy looks the cookie up by: an exact name respelt,
    /// or covered by a pattern instead, keys it otherwise.
    #[test]
    fn pins_are_found_across_policies_only_when_keyed_alike() {
        let policy = |extra: &[&str]| {
            CookiePolicy::with_extra(&extra.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
        };
        let (sid, upper, glob) = (policy(&["sid"]), policy(&["Sid"]), policy(&["s*"]));
        assert!(upper.finds_pins_of(&upper, "Sid"));
        assert!(upper.finds_pins_of(&upper, "SID"));
        assert!(
            !upper.finds_pins_of(&sid, "Sid"),
            "respelt: keyed by Sid now"
        );
        assert!(
            !glob.finds_pins_of(&upper, "sid"),
            "a pattern keys it lowercased"
        );
        // The key of the spelling as sent hashes the value as sent: a
        // quoted value's pin (hashed unquoted) is not found by it.
        assert!(!glob.finds_pins_of(&upper, "Sid"));
        assert!(!upper.finds_pins_of(&sid, "sid"));
        assert!(glob.finds_pins_of(&sid, "sid"), "lowercased either way");
        assert!(!policy(&[]).finds_pins_of(&sid, "sid"), "dropped");
        assert!(sid.finds_pins_of(&policy(&[]), "sid"), "not pinned before");
        assert!(sid.finds_pins_of(&sid, "datadome"), "the default set");
    }

    /// `finds_pins_of` says "found" only where the real keying agrees:
    /// what an answer setting the cookie pins under the old policy meets
    /// what a request carrying it back is looked up by under the new one,
    /// for plain, quoted and escaped values.
    #[test]
    fn found_pins_are_found_by_the_real_keys() {
        let policy = |extra: &[&str]| {
            CookiePolicy::with_extra(&extra.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
        };
        let h = hasher();
        let policies = [
            policy(&["sid"]),
            policy(&["Sid"]),
            policy(&["s*"]),
            policy(&["S*"]),
            policy(&["sid", "s*"]),
            policy(&["a_b"]),
            policy(&["a.b"]),
        ];
        for old in &policies {
            for new in &policies {
                for name in ["sid", "Sid", "SID", "a.b", "a_b"] {
                    if !new.finds_pins_of(old, name) || old.tracked(name).is_none() {
                        continue;
                    }
                    for value in ["v", "\"YWJj==\"", "a%2Fb", "\"x%41\""] {
                        let mut answer = HeaderMap::new();
                        answer.insert(
                            http::header::SET_COOKIE,
                            HeaderValue::from_str(&format!("{name}={value}")).unwrap(),
                        );
                        let pinned: Vec<PinKey> = tracked_in_response(&answer, old, &h, || 0)
                            .iter()
                            .map(|set| set.cookie.key)
                            .collect();
                        let request = cookie_request(&[&format!("{name}={value}")]);
                        let looked_up: Vec<PinKey> = tracked_in_request(&request, new, &h)
                            .unwrap()
                            .iter()
                            .map(|c| c.key)
                            .collect();
                        assert!(
                            pinned.iter().any(|key| looked_up.contains(key)),
                            "{name}={value}: said found from {old:?} to {new:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_recalled_header_still_reads_the_client_id_header() {
        let (p, h) = (policy(), hasher());
        let memo = CookieMemo::default();
        let mut headers = cookie_request(&["cf_clearance=c"]);
        tracked_in_request_with(&headers, &p, &h, Some(&memo)).unwrap();
        headers.insert(&X_DATADOME_CLIENTID, HeaderValue::from_static("token"));
        let found = tracked_in_request_with(&headers, &p, &h, Some(&memo)).unwrap();
        assert_eq!(found, tracked_in_request(&headers, &p, &h).unwrap());
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].key, h.cookie(DATADOME, "token"));
        // The memo holds the `Cookie` header's credentials alone.
        assert_eq!(
            recalled(&memo, &p, &["cf_clearance=c"]).map(|f| f.len()),
            Some(1)
        );
    }

    #[test]
    fn default_set_and_globs_match() {
        let p = policy();
        for name in [
            "datadome",
            "DataDome",
            "cf_clearance",
            "__cf_bm",
            "_abck",
            "_px3",
            "_pxvid",
            "incap_ses_123_456",
            "KP_UIDz",
            "session_x",
        ] {
            assert!(p.is_tracked(name), "{name} should be tracked");
        }
        for name in ["sid", "_ga", "incap_visid", "px3", "session"] {
            assert!(!p.is_tracked(name), "{name} should not be tracked");
        }
    }

    #[test]
    fn a_glob_matches_what_the_glob_crate_matches() {
        let patterns = [
            "incap_ses_*",
            "_px*",
            "KP_UID*",
            "a?c*",
            "[xy]*",
            "*",
            "é*x",
            "ab[c]",
        ];
        let names = [
            "incap_ses_1_2",
            "INCAP_SES_",
            "incap_se",
            "_px3",
            "_PX",
            "_p",
            "kp_uidz",
            "KP_UID",
            "abc",
            "aXcd",
            "ac",
            "x",
            "Y1",
            "z",
            "",
            "éx",
            "Éx",
            "ÉX",
            "abc",
            "ABC",
            "abd",
        ];
        for pattern in patterns {
            let ours = Glob::new(pattern).unwrap();
            let theirs = glob::Pattern::new(pattern).unwrap();
            for name in names {
                assert_eq!(
                    ours.matches(name),
                    theirs.matches_with(name, CASE_INSENSITIVE),
                    "{pattern} {name}"
                );
            }
        }
    }

    #[test]
    fn bad_patterns_are_rejected() {
        assert!(CookiePolicy::with_extra(&["".into()]).is_err());
        assert!(CookiePolicy::with_extra(&["a b".into()]).is_err());
        assert!(CookiePolicy::with_extra(&["a[".into()]).is_err());
    }

    #[test]
    fn several_cookie_headers_and_odd_spacing() {
        let mut headers = HeaderMap::new();
        headers.append(
            "cookie",
            HeaderValue::from_static("a=1;datadome=tok1 ;  _ga=x"),
        );
        headers.append(
            "cookie",
            HeaderValue::from_static("  cf_clearance=cf ;;junk; _px3=p"),
        );
        headers.append("cookie", HeaderValue::from_static("datadome=tok1"));
        let found = tracked_in_request(&headers, &policy(), &hasher()).unwrap();
        let names: Vec<_> = found.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["datadome", "cf_clearance", "_px3"]);
        assert_eq!(found[0].key, hasher().cookie("datadome", "tok1"));
    }

    #[test]
    fn stripping_removes_only_the_named_credentials() {
        let mut headers = HeaderMap::new();
        headers.append(
            "cookie",
            HeaderValue::from_static("a=1; datadome=old; _abck=x"),
        );
        headers.append("cookie", HeaderValue::from_static("datadome=old"));
        headers.insert(&X_DATADOME_CLIENTID, HeaderValue::from_static("old"));
        let h = hasher();
        strip_from_request(&mut headers, &policy(), &h, &[h.cookie("datadome", "old")]);
        let cookies: Vec<_> = headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; _abck=x"]);
        assert!(headers.get(&X_DATADOME_CLIENTID).is_none());
    }

    /// Every `X-DataDome-ClientID` value is a credential of its own: a
    /// stripped one leaves from none of the positions, whatever comes
    /// before it, and the others stay in order.
    #[test]
    fn stripping_judges_every_client_id_header() {
        let h = hasher();
        for first in ["keep", "", " "] {
            let mut headers = HeaderMap::new();
            headers.append(&X_DATADOME_CLIENTID, HeaderValue::from_str(first).unwrap());
            headers.append(&X_DATADOME_CLIENTID, HeaderValue::from_static("gone"));
            headers.append(&X_DATADOME_CLIENTID, HeaderValue::from_static("also-kept"));
            headers.append(&X_DATADOME_CLIENTID, HeaderValue::from_static(" gone "));
            strip_from_request(&mut headers, &policy(), &h, &[h.cookie("datadome", "gone")]);
            let left: Vec<_> = headers.get_all(&X_DATADOME_CLIENTID).iter().collect();
            assert_eq!(left, [first, "also-kept"]);
        }
    }

    #[test]
    fn clientid_header_counts_as_datadome_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_DATADOME_CLIENTID, HeaderValue::from_static("tok1"));
        let found = tracked_in_request(&headers, &policy(), &hasher()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, hasher().cookie("datadome", "tok1"));
        // Same token as cookie and as header: one key.
        headers.insert("cookie", HeaderValue::from_static("datadome=tok1"));
        assert_eq!(
            tracked_in_request(&headers, &policy(), &hasher())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn non_utf8_cookie_header_fails_closed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "cookie",
            HeaderValue::from_bytes(b"datadome=\xff\xfe").unwrap(),
        );
        assert!(matches!(
            tracked_in_request(&headers, &policy(), &hasher()),
            Err(CookieError::NotUtf8)
        ));
    }

    /// `datadome=` carries nothing, and as a credential would be one every
    /// client shares: not a credential.
    #[test]
    fn an_empty_value_is_no_credential() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "cookie",
            HeaderValue::from_static("datadome=; cf_clearance=\"\"; _abck= ; __cf_bm=v"),
        );
        let found = tracked_in_request(&headers, &policy(), &hasher()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, hasher().cookie("__cf_bm", "v"));
    }

    /// A tracked cookie after a comma (two `Cookie` lines folded with one)
    /// is refused: a server may read it as a pair of its own. A comma in an
    /// untracked value, or before an untracked name, is not pinproxy's
    /// business.
    #[test]
    fn a_tracked_cookie_after_a_comma_is_refused() {
        let read = read_cookie;
        for folded in [
            "a=1, datadome=T",
            "a=1,datadome=T; b=2",
            "a=1, x=2, cf_clearance=c",
        ] {
            assert!(
                matches!(read(folded), Err(CookieError::HiddenPair)),
                "{folded}"
            );
        }
        assert_eq!(read("a=1,2; datadome=T").unwrap().len(), 1);
        assert_eq!(read("a=1, b=2; datadome=T").unwrap().len(), 1);
    }

    /// A tracked cookie after a blank inside another pair is refused as one
    /// after a comma is: lua-resty-cookie, DataDome's own Lua modules and
    /// Python's `SimpleCookie` read `a=1 datadome=T` and `lang datadome=T`
    /// as holding `datadome=T`, which would otherwise leave unpinned. Blanks
    /// around `=` and `;`, and in untracked values, are no such pair.
    /// Only a comma, or a blank between two bytes of one pair, sends a
    /// header to the second look for hidden pairs.
    #[test]
    fn only_blanks_inside_a_pair_count_as_breaks() {
        for plain in ["a=1; b=2", " a=1 ;  b=2 ", "a=1;\tb=2", "a=1", ""] {
            assert!(!has_inner_break(plain), "{plain:?}");
        }
        for inner in [
            "a=1 b=2",
            "a=1  \t b=2; c=3",
            "a=1, b=2",
            "x; lang  datadome=T",
        ] {
            assert!(has_inner_break(inner), "{inner:?}");
        }
        // Linear in the header: a long run of blanks is looked at once.
        let long = format!("a=1;{}b=2", " ".repeat(65_000));
        assert!(!has_inner_break(&long));
        let long = format!("a=1{}b=2", "\t".repeat(65_000));
        assert!(has_inner_break(&long));
    }

    #[test]
    fn a_tracked_cookie_after_a_blank_inside_a_pair_is_refused() {
        let read = read_cookie;
        for hidden in [
            "lang datadome=T",
            "=x datadome=T",
            "a=1 datadome=T",
            "a=1\tdatadome=T",
            "a=x$ datadome=T; b=2",
            "datadome=T cf_clearance=c",
            // `SimpleCookie` takes blanks beside `=` into the pair;
            // lua-resty-cookie ends an empty value at a blank.
            "a=1 datadome =T",
            "x= datadome=T",
            "a=1 b= datadome=T",
            "a=1, datadome = T",
            "a=1\tdatadome\t=\tT",
        ] {
            assert!(
                matches!(read(hidden), Err(CookieError::HiddenPair)),
                "{hidden}: {:?}",
                read(hidden)
            );
        }
        let h = hasher();
        for plain in [
            "datadome = T",
            " datadome=T ;  a=1 ",
            "a=hello world; datadome=T",
            "a=1 b=2;\tdatadome=T",
        ] {
            let found = read(plain).unwrap();
            assert_eq!(found.len(), 1, "{plain}");
            assert_eq!(found[0].key, h.cookie("datadome", "T"), "{plain}");
        }
    }

    /// A tracked value a server reads only up to a blank or a `$`
    /// (`datadome=T x=1`: lua-resty-cookie and `SimpleCookie` read `T`,
    /// DataDome's modules read `T` of `T$x`) is known by that part too, so
    /// that `T`'s pin decides its exit.
    #[test]
    fn a_tracked_value_a_server_cuts_short_is_known_by_its_short_form_too() {
        let keys = request_keys;
        let h = hasher();
        assert_eq!(
            keys("datadome=T x=1"),
            [h.cookie("datadome", "T x=1"), h.cookie("datadome", "T")]
        );
        assert_eq!(
            keys("datadome=T\tx"),
            [h.cookie("datadome", "T\tx"), h.cookie("datadome", "T")]
        );
        assert_eq!(
            keys("datadome=T$x"),
            [h.cookie("datadome", "T$x"), h.cookie("datadome", "T")]
        );
        // Each cut once, in the value's order of readings.
        assert_eq!(
            keys("datadome=T$x y,z"),
            [
                h.cookie("datadome", "T$x y,z"),
                h.cookie("datadome", "T$x y"),
                h.cookie("datadome", "T$x"),
                h.cookie("datadome", "T"),
            ]
        );
    }

    /// A credential read from a shorter form of a value (`T` of
    /// `datadome=T, x=1`) is stripped with its pair; a header holding
    /// nothing to strip leaves byte for byte, whatever its spacing.
    #[test]
    fn stripping_finds_a_value_by_its_shorter_forms_and_leaves_other_headers_as_sent() {
        let h = hasher();
        for sent in ["datadome=T, x=1; _ga=1", "datadome=T x=1; _ga=1"] {
            let mut headers = HeaderMap::new();
            headers.append("cookie", HeaderValue::from_static(sent));
            headers.append("cookie", HeaderValue::from_static("a=1;b=2 ;  c=3"));
            let read = tracked_in_request(&headers, &policy(), &h).unwrap();
            assert!(read.iter().any(|c| c.key == h.cookie("datadome", "T")));
            strip_from_request(&mut headers, &policy(), &h, &[h.cookie("datadome", "T")]);
            let cookies: Vec<_> = headers.get_all("cookie").iter().collect();
            assert_eq!(cookies, ["_ga=1", "a=1;b=2 ;  c=3"], "{sent}");
        }
    }

    /// A tracked value with a comma (`datadome=T, a=1`, folded the other
    /// way round) is known by what a comma-splitting server reads too, `T`,
    /// so that `T`'s pin decides its exit; a value nobody pinned as written
    /// would otherwise found an identity on any exit.
    #[test]
    fn a_tracked_value_with_a_comma_is_known_by_what_precedes_it_too() {
        let keys = request_keys;
        let h = hasher();
        // And by `T,`, what a server that ends a value at a blank reads.
        assert_eq!(
            keys("datadome=T, a=1"),
            [
                h.cookie("datadome", "T, a=1"),
                h.cookie("datadome", "T"),
                h.cookie("datadome", "T,")
            ]
        );
        assert_eq!(
            keys("x=1; cf_clearance=c,y=2"),
            [
                h.cookie("cf_clearance", "c,y=2"),
                h.cookie("cf_clearance", "c")
            ]
        );
        assert_eq!(
            keys("datadome=T,"),
            [h.cookie("datadome", "T,"), h.cookie("datadome", "T")]
        );
        assert_eq!(keys("datadome=,x"), [h.cookie("datadome", ",x")]);
    }

    /// A cookie without a name (`=datadome=T`) is kept by browsers and sent
    /// back as `datadome=T`: it is pinned as that.
    #[test]
    fn a_nameless_set_cookie_is_pinned_as_the_cookie_it_reads_as() {
        let mut headers = HeaderMap::new();
        headers.append(
            "set-cookie",
            HeaderValue::from_static("=datadome=T; Max-Age=3600; Path=/"),
        );
        let found = tracked_in_response(&headers, &policy(), &hasher(), || 1_000);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].cookie.key, hasher().cookie("datadome", "T"));
        assert!(!found[0].deletes);
    }

    /// `Expires` is on the origin's clock: read against the response's
    /// `Date`, a cookie set for 30 minutes is pinned for 30 minutes from
    /// now even when this clock reads 45 minutes ahead (read against it,
    /// the cookie was taken for a deletion and left unpinned while the
    /// client kept it). Without `Date`, only a time well past deletes; one
    /// just past is pinned, expired.
    #[test]
    fn expires_is_read_on_the_origins_clock() {
        let minute = 60_000;
        // Origin's now: 2027-01-15 08:00:00 UTC.
        let origin_now = 1_800_000_000_000;
        assert_eq!(
            httpdate::fmt_http_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(origin_now)
            ),
            "Fri, 15 Jan 2027 08:00:00 GMT"
        );
        let set = |line: &'static str, date: Option<&'static str>, now: u64| {
            let mut headers = HeaderMap::new();
            headers.append("set-cookie", HeaderValue::from_static(line));
            if let Some(date) = date {
                headers.append("date", HeaderValue::from_static(date));
            }
            let found = tracked_in_response(&headers, &policy(), &hasher(), || now);
            (found[0].expires_ms, found[0].deletes)
        };
        let date = Some("Fri, 15 Jan 2027 08:00:00 GMT");
        let half_hour = "__cf_bm=v; Expires=Fri, 15 Jan 2027 08:30:00 GMT";
        let ahead = origin_now + 45 * minute;
        assert_eq!(
            set(half_hour, date, ahead),
            (Some(ahead + 30 * minute), false)
        );
        assert_eq!(
            set(half_hour, date, origin_now),
            (Some(origin_now + 30 * minute), false)
        );
        // At or before the origin's now: a deletion where this clock agrees;
        // where it reads behind, the client (on a clock like this one) keeps
        // the cookie 45 minutes more: pinned that long.
        let gone = "__cf_bm=v; Expires=Fri, 15 Jan 2027 08:00:00 GMT";
        assert!(set(gone, date, origin_now).1);
        assert!(set(gone, date, ahead).1);
        let behind = origin_now - 45 * minute;
        assert_eq!(set(gone, date, behind), (Some(origin_now), false));
        // Pinned until the later reading: the origin's (translated) here.
        assert_eq!(
            set(half_hour, date, behind),
            (Some(origin_now + 30 * minute), false)
        );
        // No `Date`: read on this clock; just past is pinned, expired.
        let at = origin_now + 30 * minute;
        assert_eq!(set(half_hour, None, ahead), (Some(at), false));
        let old = "__cf_bm=v; Expires=Thu, 01 Jan 1970 00:00:00 GMT";
        assert!(set(old, None, ahead).1);
        assert!(set(old, date, ahead).1);
        // An unreadable `Date` is no `Date`.
        assert_eq!(set(half_hour, Some("soon"), ahead), (Some(at), false));
    }

    #[test]
    fn a_response_without_tracked_cookies_reads_no_clock() {
        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("theme=dark"));
        let found = tracked_in_response(&headers, &policy(), &hasher(), || {
            panic!("the clock was read for a response without tracked cookies")
        });
        assert!(found.is_empty());
        assert!(
            tracked_in_response(&HeaderMap::new(), &policy(), &hasher(), || panic!()).is_empty()
        );
    }

    #[test]
    fn set_cookie_and_x_set_cookie() {
        let mut headers = HeaderMap::new();
        headers.append(
            "set-cookie",
            HeaderValue::from_static("datadome=new; Max-Age=31536000; Path=/; Secure"),
        );
        headers.append("set-cookie", HeaderValue::from_static("_ga=1"));
        headers.append(
            "set-cookie",
            HeaderValue::from_static("_abck=gone; Max-Age=0"),
        );
        headers.append(
            "set-cookie",
            HeaderValue::from_static("bm_sz=old; Expires=Thu, 01 Jan 1970 00:00:00 GMT"),
        );
        headers.append(
            "x-set-cookie",
            HeaderValue::from_static("datadome=carried; Max-Age=60"),
        );
        let now = 1_800_000_000_000;
        // The clock is read once, for the first tracked cookie.
        let reads = std::cell::Cell::new(0);
        let found = tracked_in_response(&headers, &policy(), &hasher(), || {
            reads.set(reads.get() + 1);
            now
        });
        assert_eq!(reads.get(), 1);
        assert_eq!(found[0].expires_ms, Some(now + 31_536_000_000));
        assert_eq!(found[3].expires_ms, Some(now + 60_000));
        let summary: Vec<_> = found.iter().map(|s| (&*s.cookie.name, s.deletes)).collect();
        assert_eq!(
            summary,
            [
                ("datadome", false),
                ("_abck", true),
                ("bm_sz", true),
                ("datadome", false)
            ]
        );
        assert_eq!(found[3].cookie.key, hasher().cookie("datadome", "carried"));
    }

    /// A line with bytes that are not UTF-8 in an attribute still sets its
    /// cookie in the client's jar, so it is pinned.
    #[test]
    fn a_set_cookie_with_other_bytes_in_an_attribute_is_pinned() {
        let mut headers = HeaderMap::new();
        headers.append(
            "set-cookie",
            HeaderValue::from_bytes(b"datadome=T; Path=/; x=caf\xe9").unwrap(),
        );
        let found = tracked_in_response(&headers, &policy(), &hasher(), || 1_000);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].cookie.key, hasher().cookie("datadome", "T"));
        assert!(!found[0].deletes);
    }

    /// `Max-Age` is read as browsers read it: an attribute whose value is
    /// not an optional `-` and digits is ignored (and one of several that
    /// differ keeps the cookie for the session).
    #[test]
    fn a_max_age_browsers_ignore_is_no_deletion() {
        let now = 1_800_000_000_000;
        let read = |line| set_cookie_read_at(line, now);
        assert_eq!(read("datadome=T; Max-Age=-"), (false, None));
        // curl reads the leading digits, a second; browsers keep it for
        // the session, longer.
        assert_eq!(read("datadome=T; Max-Age=1h"), (false, None));
        // Chromium takes the last `Max-Age`, cannot read it and keeps the
        // cookie for the session.
        assert_eq!(read("datadome=T; Max-Age=60; Max-Age=-"), (false, None));
        assert_eq!(read("datadome=T; max-age = -5"), (true, Some(now - 5_000)));
        assert_eq!(read("datadome=T; Max-Age=0"), (true, Some(now)));
        let (deletes, far) = read("datadome=T; Max-Age=99999999999999999999999");
        assert!(!deletes && far > Some(now + 1000 * 365 * 86_400_000));
    }

    /// A line is a deletion only when every common client takes it for
    /// one. A `Max-Age` browsers ignore but Go, Python or curl read as a
    /// lifetime (`+86400`, `"86400"`) keeps the cookie in those clients'
    /// jars whatever `Expires` says, and an `Expires` Go cannot read keeps
    /// it there for the session: such a cookie is pinned, so that its next
    /// request keeps to its exit instead of founding it anew on any.
    #[test]
    fn a_line_some_client_keeps_the_cookie_for_is_no_deletion() {
        let now = 1_800_000_000_000;
        let read = |line| set_cookie_read_at(line, now);
        let day = Some(now + 86_400_000);
        for kept in [
            "datadome=T; Max-Age=+86400; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            "datadome=T; Max-Age=\"86400\"; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
        ] {
            assert_eq!(read(kept), (false, day), "{kept}");
        }
        for session in [
            "datadome=T; Expires=Thursday, 01-Jan-70 00:00:00 GMT",
            "datadome=T; Expires=Thu Jan  1 00:00:00 1970",
            // Two of one attribute: clients take different ones.
            "datadome=T; Max-Age=0; Max-Age=+86400",
            "datadome=T; Max-Age=86400; Max-Age=0",
            "datadome=T; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Expires=junk",
            // The last of each name counts for browsers, whatever its
            // value: one they cannot read, an empty one or none at all
            // sends them to `Expires`, or keeps the cookie for the session.
            "datadome=T; Max-Age=0; Max-Age=x",
            "datadome=T; Max-Age=0; Max-Age=",
            "datadome=T; Max-Age=0; Max-Age",
            "datadome=T; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Expires",
            // Go ignores a leading zero; Python and curl keep a pre-1970
            // `Expires` for the session.
            "datadome=T; Max-Age=086400",
            "datadome=T; Expires=Wed, 31 Dec 1969 00:00:00 GMT",
        ] {
            assert_eq!(read(session), (false, None), "{session}");
        }
        // A lenient reading never shortens what browsers keep.
        assert_eq!(
            read("datadome=T; Max-Age=+60; Expires=Wed, 01 Jan 2031 00:00:00 GMT"),
            (false, Some(1_924_992_000_000))
        );
        assert!(
            !read("datadome=T; Max-Age=+99999999999999999999999; Expires=Thu, 01 Jan 1970 00:00:00 GMT").0
        );
        // What every client deletes is still a deletion.
        for deleted in [
            "datadome=T; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            "datadome=T; Path=/; expires=Thu, 01-Jan-1970 00:00:01 GMT",
            "datadome=T; Max-Age=+0; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            "datadome=T; Max-Age=0",
        ] {
            assert!(read(deleted).0, "{deleted}");
        }
    }

    /// The tracked cookies of a request whose one `Cookie` header is `text`.
    fn read_cookie(text: &str) -> Result<Vec<Credential>, CookieError> {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", HeaderValue::from_str(text).unwrap());
        tracked_in_request(&headers, &policy(), &hasher())
    }

    /// Whether the one tracked cookie a `Set-Cookie` `line` read at `now`
    /// sets is a deletion, and its expiry.
    fn set_cookie_read_at(line: &str, now: u64) -> (bool, Option<u64>) {
        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_str(line).unwrap());
        let found = tracked_in_response(&headers, &policy(), &hasher(), || now);
        (found[0].deletes, found[0].expires_ms)
    }

    /// The keys of a request's `Cookie` header.
    fn request_keys(cookie: &str) -> Vec<PinKey> {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", HeaderValue::from_str(cookie).unwrap());
        tracked_in_request(&headers, &policy(), &hasher())
            .unwrap()
            .iter()
            .map(|c| c.key)
            .collect()
    }

    /// Spellings a server reads as one cookie (the name in another case,
    /// the value in quotes) share its canonical key, first; a spelling
    /// other than the canonical one also carries its own key, by which
    /// pins made before keys were canonical are found.
    #[test]
    fn spellings_a_server_reads_alike_share_one_key() {
        let h = hasher();
        let canonical = h.cookie("datadome", "T");
        assert_eq!(request_keys("datadome=T"), [canonical]);
        assert_eq!(
            request_keys("DataDome=T"),
            [canonical, h.cookie("DataDome", "T")]
        );
        assert_eq!(
            request_keys("datadome=\"T\""),
            [canonical, h.cookie("datadome", "\"T\"")]
        );
        // The policy's own spelling is the canonical one.
        let kasada = h.cookie("KP_UIDz", "v");
        assert_eq!(request_keys("KP_UIDz=v"), [kasada]);
        assert_eq!(
            request_keys("kp_uidz=v"),
            [kasada, h.cookie("kp_uidz", "v")]
        );
        // A pattern's match is canonical lowercased.
        assert_eq!(request_keys("_px3=v"), [h.cookie("_px3", "v")]);
        assert_eq!(
            request_keys("_PX3=v"),
            [h.cookie("_px3", "v"), h.cookie("_PX3", "v")]
        );
        // An empty value in quotes is no credential either.
        assert!(request_keys("datadome=\"\"").is_empty());
        // `%XX` escapes, which PHP and Node decode.
        assert_eq!(
            request_keys("datadome=%54"),
            [canonical, h.cookie("datadome", "%54")]
        );
        // Quoted or in another case, it is also known by the key it had
        // before escapes were decoded (pins made by earlier releases).
        assert_eq!(
            request_keys("datadome=\"%54\""),
            [
                canonical,
                h.cookie("datadome", "\"%54\""),
                h.cookie("datadome", "%54")
            ]
        );
        assert_eq!(
            request_keys("DataDome=a%41"),
            [
                h.cookie("datadome", "aA"),
                h.cookie("DataDome", "a%41"),
                h.cookie("datadome", "a%41")
            ]
        );
        // One that does not decode to text is read as written.
        assert_eq!(request_keys("datadome=%zz"), [h.cookie("datadome", "%zz")]);
        assert_eq!(request_keys("datadome=%ff"), [h.cookie("datadome", "%ff")]);
        // Names PHP reads as tracked ones: `.` and ` ` as `_`, and
        // percent-decoded (`+` a space) as older PHP reads them.
        for (sent, read) in [
            (".px3", "_px3"),
            ("cf.clearance", "cf_clearance"),
            (".abck", "_abck"),
            ("bm.sz", "bm_sz"),
            ("KP.UIDz", "KP_UIDz"),
            ("%64atadome", "datadome"),
            ("%5Fabck", "_abck"),
            ("incap.ses.1.2", "incap_ses_1_2"),
            ("incap+ses_1_2", "incap_ses_1_2"),
        ] {
            assert_eq!(
                request_keys(&format!("{sent}=v")),
                [h.cookie(read, "v"), h.cookie(sent, "v")],
                "{sent}"
            );
        }
        // A name a pattern matches as sent is keyed by that match, as it
        // always was, and by its PHP reading's key too.
        assert_eq!(
            request_keys("incap_ses_1.2=v"),
            [
                h.cookie("incap_ses_1.2", "v"),
                h.cookie("incap_ses_1_2", "v")
            ]
        );
        // Names PHP reads as untracked ones stay untracked.
        for sent in ["a.b", "AMCV_8F99%40AdobeOrg", "x+y", "%zz"] {
            assert!(request_keys(&format!("{sent}=v")).is_empty(), "{sent}");
        }

        // What a response sets is pinned by the canonical key alone.
        for line in [
            "datadome=T",
            "DataDome=T; Path=/",
            "datadome=\"T\"",
            "datadome=%54",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("set-cookie", HeaderValue::from_static(line));
            let set: Vec<PinKey> = tracked_in_response(&headers, &policy(), &h, || 1)
                .iter()
                .map(|s| s.cookie.key)
                .collect();
            // With escapes, also by the key earlier releases look it up by.
            let mut expected = vec![canonical];
            if line.contains('%') {
                expected.push(h.cookie("datadome", "%54"));
            }
            assert_eq!(set, expected, "{line}");
        }
    }

    /// The one-look lists hold every token header.
    #[test]
    fn the_token_header_lists_are_whole() {
        let request: Vec<&HeaderName> = std::iter::once(&X_DATADOME_CLIENTID)
            .chain(&TOKEN_CARRIERS)
            .collect();
        assert_eq!(request, REQUEST_TOKEN_HEADERS.iter().collect::<Vec<_>>());
        let response: Vec<&HeaderName> = std::iter::once(&X_SET_COOKIE)
            .chain(&TOKEN_ANSWERS)
            .collect();
        assert_eq!(response, RESPONSE_TOKEN_HEADERS.iter().collect::<Vec<_>>());
    }

    /// SDK token headers are credentials named as the header; a token a
    /// vendor's answer hands out is pinned by the key its request header
    /// is read by; stripping takes the header out.
    #[test]
    fn sdk_token_headers_are_credentials() {
        let h = hasher();
        let mut headers = HeaderMap::new();
        headers.insert("x-px-authorization", HeaderValue::from_static("3:tok"));
        headers.insert("x-kpsdk-ct", HeaderValue::from_static(" kt "));
        headers.insert("user-agent", HeaderValue::from_static("app"));
        // PerimeterX's statuses and an empty token are no credentials; the
        // token beside a status is PerimeterX's one credential.
        for (header, value, read) in [
            ("x-px-authorization", "3", None),
            ("x-px-authorization", "1", None),
            ("x-px-authorization", "3:", None),
            ("x-kpsdk-ct", "\"\"", None),
            ("x-px-original-token", "3:tok", Some("x-px-authorization")),
        ] {
            let mut alone = HeaderMap::new();
            alone.insert(header, HeaderValue::from_static(value));
            let names: Vec<String> = tracked_in_request(&alone, &policy(), &h)
                .unwrap()
                .iter()
                .map(|c| c.name.to_string())
                .collect();
            assert_eq!(
                names,
                read.into_iter().collect::<Vec<_>>(),
                "{header}: {value}"
            );
        }
        let read: Vec<(String, PinKey)> = tracked_in_request(&headers, &policy(), &h)
            .unwrap()
            .into_iter()
            .map(|c| (c.name.to_string(), c.key))
            .collect();
        let px = h.cookie("x-px-authorization", "3:tok");
        let kasada = h.cookie("x-kpsdk-ct", "kt");
        assert_eq!(
            read,
            [
                ("x-px-authorization".to_owned(), px),
                ("x-kpsdk-ct".to_owned(), kasada)
            ]
        );
        let mut answer = HeaderMap::new();
        answer.insert("x-kpsdk-ct", HeaderValue::from_static("kt"));
        let set = tracked_in_response(&answer, &policy(), &h, || 1);
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].cookie.key, kasada);
        strip_from_request(&mut headers, &policy(), &h, &[px]);
        let left: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-kpsdk-ct", "user-agent"]);
    }

    /// Every cookie counts against the limit once, even one whose canonical
    /// key is another cookie's other key (`_px0=%2576` reads `%76`, which
    /// `_px0=%76` was sent as).
    #[test]
    fn each_cookie_counts_once_against_the_limit() {
        let pairs: Vec<String> = (0..=MAX_TRACKED_PER_REQUEST / 2)
            .map(|i| format!("_px{i}=%76; _px{i}=%2576"))
            .collect();
        let mut headers = HeaderMap::new();
        headers.insert("cookie", HeaderValue::from_str(&pairs.join("; ")).unwrap());
        assert!(matches!(
            tracked_in_request(&headers, &policy(), &hasher()),
            Err(CookieError::TooMany)
        ));
    }

    /// A tracked pair a `Set-Cookie` line holds after its cookie (which
    /// `SimpleCookie` jars keep as a cookie of its own) is pinned as set,
    /// never taken for a deletion; the line's attributes are no one's.
    #[test]
    fn tracked_pairs_hidden_in_a_set_cookie_line_are_pinned() {
        let h = hasher();
        let set = |line: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("set-cookie", HeaderValue::from_static(line));
            tracked_in_response(&headers, &policy(), &h, || 1)
                .into_iter()
                .map(|s| (s.cookie.key, s.deletes))
                .collect::<Vec<_>>()
        };
        let t = h.cookie("datadome", "T");
        for line in [
            "a=1; datadome=T; Path=/",
            "a=1 datadome=T",
            "a=1, datadome=T; Path=/",
            "a=1;datadome=\"T\"",
            "sid=x; datadome =T; Path=/",
            "a=1 datadome =T",
            "sid= datadome=T",
        ] {
            assert_eq!(set(line), [(t, false)], "{line}");
        }
        assert_eq!(
            set("datadome=T; datadome=U; Max-Age=0"),
            [(t, true), (h.cookie("datadome", "U"), false)]
        );
        assert_eq!(set("datadome=T; Path=/; datadome=T"), [(t, false)]);
        for line in [
            "a=1; Path=/; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Priority=High",
            "a=1; datadome=; Path=/",
        ] {
            assert!(set(line).is_empty(), "{line}");
        }
        // RFC 2109's attributes are no one's cookie either, whatever the
        // policy tracks.
        let everything = CookiePolicy::with_extra(&["*".to_owned()]).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "set-cookie",
            HeaderValue::from_static("JSESSIONID=x; Version=1; Comment=c; Port=80; Path=/"),
        );
        let set = tracked_in_response(&headers, &everything, &h, || 1);
        assert_eq!(set.len(), 1, "{set:?}");
        assert_eq!(set[0].cookie.key, h.cookie("jsessionid", "x"));
    }

    /// A stripped credential goes in every spelling.
    #[test]
    fn stripping_finds_every_spelling() {
        let h = hasher();
        for cookie in ["DataDome=T; a=1", "datadome=\"T\"; a=1", "datadome=T; a=1"] {
            let mut headers = HeaderMap::new();
            headers.insert("cookie", HeaderValue::from_static(cookie));
            strip_from_request(&mut headers, &policy(), &h, &[h.cookie("datadome", "T")]);
            assert_eq!(headers["cookie"], "a=1", "{cookie}");
        }
        // By the key a pin made before keys were canonical has.
        let mut headers = HeaderMap::new();
        headers.insert("cookie", HeaderValue::from_static("DataDome=T; a=1"));
        strip_from_request(&mut headers, &policy(), &h, &[h.cookie("DataDome", "T")]);
        assert_eq!(headers["cookie"], "a=1");
    }
}
