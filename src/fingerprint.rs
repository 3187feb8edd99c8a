//! Shared vocabulary: a client's fingerprint, what an identity records of
//! the client that founded it, and the parsers that read it off the first
//! bytes a client sends.
//!
//! An anti-bot edge judges an identity by its TLS ClientHello (JA4), its
//! HTTP/2 preface (SETTINGS, window, priority, pseudo-header order) and its
//! headers as much as by its IP and cookies. [`Fingerprint`] holds all
//! three: the header values (`User-Agent`, client hints, language;
//! [`headers`]), the parsed ClientHello ([`client_hello`], JA4 in [`ja4`])
//! and the HTTP/2 fingerprint ([`h2_preface`]). [`h1_order`] reads an
//! HTTP/1.1 head's header names in order and case; [`hpack`] reads an
//! HTTP/2 header block's names, and how its encoder represented each field.
//!
//! Invariants of every parser here (their input is untrusted): no input
//! makes one panic, loop or allocate without bound (64 KiB limits, checked
//! lengths, no indexing or unchecked arithmetic outside tests); nothing
//! secret or per-connection random is kept (no TLS random, session id,
//! key shares, PSK identities, tickets, ECH payloads, HTTP header values
//! of the h2 preface).

pub mod client_hello;
pub mod h1_order;
pub mod h2_preface;
pub mod header_order;
pub mod headers;
pub mod hpack;
pub mod ja4;
pub mod live_hellos;
pub mod profile;
mod reader;

use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, OnceLock};

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use client_hello::ClientHello;
use h2_preface::H2Fingerprint;
pub use headers::{FingerprintPolicy, HeaderValues, HeldValues, FINGERPRINT_HEADERS};
use live_hellos::LiveHellos;

/// How far an incremental parser has got with the bytes seen so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress<E> {
    /// The bytes so far are a valid beginning; read more and ask again.
    NeedMore,
    /// The awaited message is complete. `consumed` says how many bytes of the
    /// input it took: for [`client_hello::handshake_len_needed`], counted from
    /// the start of the buffer (whole TLS records); for
    /// [`h2_preface::H2PrefaceParser::feed`], counted from the start of the
    /// chunk passed to that call (0 when it was already complete).
    Complete {
        /// Bytes of the input that belong to the message.
        consumed: usize,
    },
    /// The bytes are not what was expected, or exceed a limit; reading more
    /// will not help.
    Failed(E),
}

/// What an identity records of the client that founded it: the header
/// values, and, where pinproxy terminated the client's TLS, its ClientHello
/// and (for HTTP/2 clients) its connection preface. Immutable once made;
/// shared behind `Arc`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint {
    /// `User-Agent`, client hints and `Accept-Language`.
    pub headers: HeaderValues,
    /// The client's ClientHello, without its SNI (the upstream names the
    /// origin it dials) and without anything per-connection.
    #[serde(default)]
    pub tls: Option<Arc<ClientHello>>,
    /// The client's HTTP/2 preface, for HTTP/2 clients.
    #[serde(default)]
    pub h2: Option<Arc<H2Fingerprint>>,
}

/// The layout records had before the TLS and HTTP/2 parts existed; stores
/// written by earlier versions hold it.
#[derive(Deserialize)]
struct LegacyFingerprint {
    values: HeaderValues,
}

impl Fingerprint {
    /// A fingerprint of `User-Agent: agent` alone, in a value of its own
    /// (tests of what keeps and shares fingerprints).
    #[cfg(test)]
    pub(crate) fn of_user_agent(agent: &str) -> Arc<Fingerprint> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_str(agent).unwrap_or_else(|e| panic!("{e}")),
        );
        Arc::new(Fingerprint::of(&headers))
    }

    /// The header part of a request's fingerprint, nothing else.
    pub fn of(headers: &HeaderMap) -> Fingerprint {
        Fingerprint {
            headers: HeaderValues::of(headers),
            tls: None,
            h2: None,
        }
    }

    /// The fingerprint of a request of the client connection `client`.
    pub fn of_request(headers: &HeaderMap, client: &ClientConnection) -> Fingerprint {
        Fingerprint {
            headers: HeaderValues::of(headers),
            tls: client.hello.clone(),
            h2: client.h2(),
        }
    }

    /// The recorded value of header `name`, if it was present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The headers of `headers` that differ from the recording (see
    /// [`HeaderValues::drifted`]).
    pub fn drifted(&self, headers: &HeaderMap) -> Vec<&'static str> {
        self.headers.drifted(headers)
    }

    /// Rewrites the fingerprint headers of `headers` to the recording.
    pub fn restore(&self, headers: &mut HeaderMap) {
        self.headers.restore(headers)
    }

    /// The JA4 of the recorded ClientHello, if one was recorded.
    pub fn ja4(&self) -> Option<String> {
        self.tls.as_deref().map(ja4::ja4)
    }

    /// The Akamai form of the recorded HTTP/2 preface, if one was recorded.
    pub fn akamai(&self) -> Option<String> {
        self.h2.as_deref().map(H2Fingerprint::akamai)
    }

    /// Makes a stored hello fresh and anonymous again, so that a recording
    /// made before that view dropped something drawn per connection (the
    /// ECH GREASE length) compares equal to its client's hellos now. Every
    /// decoder of stored identities calls it.
    pub(crate) fn renew_stored_hello(&mut self) {
        if let Some(hello) = self.tls.take() {
            self.tls = Some(Arc::new(Arc::unwrap_or_clone(hello).fresh_and_anonymous()));
        }
    }

    /// Decodes a stored fingerprint (postcard), in the current layout or
    /// the header-only one of stores written before TLS fingerprints (see
    /// [`Fingerprint::renew_stored_hello`]).
    pub fn decode(bytes: &[u8]) -> Result<Fingerprint, postcard::Error> {
        match postcard::from_bytes::<Fingerprint>(bytes) {
            Ok(mut fingerprint) => {
                fingerprint.renew_stored_hello();
                Ok(fingerprint)
            }
            Err(current) => match postcard::from_bytes::<LegacyFingerprint>(bytes) {
                Ok(legacy) => Ok(Fingerprint {
                    headers: legacy.values,
                    tls: None,
                    h2: None,
                }),
                Err(_) => Err(current),
            },
        }
    }
}

/// A request's fingerprint as it came, held for an identity its response
/// may found: the header values stay the request's own until
/// [`RequestFingerprint::record`] copies them, so the requests that found
/// nothing (nearly all of them) cost no allocation for it.
#[derive(Clone, Debug, Default)]
pub struct RequestFingerprint {
    headers: HeldValues,
    tls: Option<Arc<ClientHello>>,
    h2: Option<Arc<H2Fingerprint>>,
}

impl RequestFingerprint {
    /// The fingerprint of a request of the client connection `client`.
    pub fn of_request(headers: &HeaderMap, client: &ClientConnection) -> RequestFingerprint {
        RequestFingerprint {
            headers: HeldValues::of(headers),
            tls: client.hello.clone(),
            h2: client.h2(),
        }
    }

    /// What an identity records: [`Fingerprint::of_request`] of the request
    /// as it was when held.
    pub fn record(&self) -> Fingerprint {
        Fingerprint {
            headers: self.headers.record(),
            tls: self.tls.clone(),
            h2: self.h2.clone(),
        }
    }
}

/// What pinproxy learnt about a client connection when it terminated it:
/// shared by every request on the connection.
#[derive(Debug, Default)]
pub struct ClientConnection {
    /// The ClientHello (as [`ClientHello::fresh_and_anonymous`] makes it),
    /// when the client spoke TLS.
    pub hello: Option<Arc<ClientHello>>,
    /// The HTTP/2 preface, once read (HTTP/2 connections only).
    pub preface: OnceLock<Arc<H2Fingerprint>>,
    /// What the connection presents upstream, and its pool key; made at
    /// its first request (the HTTP/2 preface is read by then).
    presented: OnceLock<(Arc<Fingerprint>, u64)>,
    /// The first recorded ClientHello found equal to this connection's
    /// (see [`ClientConnection::hello_matches`]); held, so that no other
    /// hello can take its address.
    equal_hello: OnceLock<Arc<ClientHello>>,
}

impl ClientConnection {
    /// The record of a TLS client connection that sent `hello`, shared
    /// with the live connections that sent an equal one (see
    /// [`live_hellos`]). What is recorded is the client's, not the site's or
    /// the connection's: see [`ClientHello::fresh_and_anonymous`]. A
    /// connection that turns out to speak HTTP/2 takes its own copy
    /// ([`ClientConnection::for_h2`]).
    pub fn tls(hello: ClientHello, live: &LiveHellos) -> Arc<ClientConnection> {
        live.share(hello.fresh_and_anonymous())
    }

    fn with_hello(hello: Arc<ClientHello>) -> ClientConnection {
        ClientConnection {
            hello: Some(hello),
            ..ClientConnection::default()
        }
    }

    /// A record of its own for an HTTP/2 connection that sent this
    /// connection's hello: the preface it will record is the connection's,
    /// so it cannot go in a record that equal hellos share.
    pub fn for_h2(&self) -> ClientConnection {
        ClientConnection {
            hello: self.hello.clone(),
            ..ClientConnection::default()
        }
    }

    /// Whether this connection's ClientHello equals `recorded` (false
    /// without one). The store shares one recording among identities whose
    /// fingerprints are equal, so a connection's requests keep meeting the
    /// same `recorded`: the field-by-field comparison runs once per
    /// connection, later ones compare pointers.
    pub fn hello_matches(&self, recorded: &Arc<ClientHello>) -> bool {
        let Some(hello) = &self.hello else {
            return false;
        };
        let seen = |known: &Arc<ClientHello>| Arc::ptr_eq(known, recorded);
        if seen(hello) || self.equal_hello.get().is_some_and(seen) {
            return true;
        }
        if **hello == **recorded {
            let _ = self.equal_hello.set(recorded.clone());
            return true;
        }
        // Two hellos of one client that differ only where the connection
        // decides. Whether OpenSSL pads depends on the hello's length, so
        // on the host name's; whether SNI is sent, on whether the host is a
        // name (pinproxy presumes it for an address since it records what
        // goes to names, an earlier release did not). And a client offers
        // HTTP/1.1 alone where a connection is for nothing else (Chromium's
        // WebSocket tunnels): its hello then equals its full one said so.
        // Not the other way round: a recording that offers HTTP/1.1 alone
        // makes every connection of the identity offer it, so a client that
        // offers more does not present itself there, and that is drift.
        let (hello, recorded_now) = (placeless(hello), placeless(recorded));
        let equal = *hello == *recorded_now
            || recorded_now
                .http1_only_view()
                .is_some_and(|view| view == *hello);
        if equal {
            let _ = self.equal_hello.set(recorded.clone());
        }
        equal
    }

    fn presentation(&self) -> &(Arc<Fingerprint>, u64) {
        self.presented.get_or_init(|| {
            let fingerprint = Fingerprint {
                headers: HeaderValues::default(),
                tls: self.hello.clone(),
                h2: self.h2(),
            };
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            fingerprint.hash(&mut hasher);
            (Arc::new(fingerprint), hasher.finish())
        })
    }

    /// Whether the client spoke TLS to pinproxy (its ClientHello was read).
    pub fn has_hello(&self) -> bool {
        self.hello.is_some()
    }

    /// The TLS and HTTP/2 parts of the client's fingerprint, which its
    /// cookie-less requests present upstream.
    pub fn presented(&self) -> Arc<Fingerprint> {
        self.presentation().0.clone()
    }

    /// A key that differs between clients that present differently.
    pub fn key(&self) -> u64 {
        self.presentation().1
    }

    /// The HTTP/2 preface, if the connection is HTTP/2 and it has been read.
    pub fn h2(&self) -> Option<Arc<H2Fingerprint>> {
        self.preface.get().cloned()
    }
}

/// `hello` without what says where it went rather than who sent it (its
/// padding and SNI extensions), for comparing two hellos of one client
/// (see [`ClientConnection::hello_matches`]).
fn placeless(hello: &ClientHello) -> std::borrow::Cow<'_, ClientHello> {
    use client_hello::ext;
    let placed = |kind| kind == ext::PADDING || kind == ext::SERVER_NAME;
    if !hello.extensions.iter().any(|e| placed(e.kind)) {
        return std::borrow::Cow::Borrowed(hello);
    }
    let mut plain = hello.clone();
    plain.extensions.retain(|e| !placed(e.kind));
    plain.padding_len = None;
    plain.server_name = None;
    std::borrow::Cow::Owned(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_matches_equal_hellos_and_not_others() {
        let Some(chrome) = profile::chrome_hello() else {
            panic!("the built-in Chrome hello parses");
        };
        let connection = ClientConnection::tls((*chrome).clone(), &LiveHellos::default());
        // Equal content under another pointer: compared, then remembered.
        let recorded = Arc::new((*chrome).clone().fresh_and_anonymous());
        assert!(!connection
            .hello
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(h, &recorded)));
        assert!(connection.hello_matches(&recorded));
        assert!(connection.hello_matches(&recorded), "remembered");
        assert!(connection
            .equal_hello
            .get()
            .is_some_and(|seen| Arc::ptr_eq(seen, &recorded)));
        // A different hello never matches, before or after.
        let mut other = (*recorded).clone();
        other.cipher_suites.reverse();
        let other = Arc::new(other);
        assert!(!connection.hello_matches(&other));
        assert!(!connection.hello_matches(&other));
        assert!(connection.hello_matches(&recorded));
        // Without a hello of its own (plain HTTP), nothing matches.
        assert!(!ClientConnection::default().hello_matches(&recorded));
    }

    /// Two handshakes of one Chromium differ in the ECH GREASE payload's
    /// length (218 and 282 bytes in the fixtures): the same client, so the
    /// same recording, and no drift. A recording stored before the length
    /// was dropped matches too, once read back.
    #[test]
    fn one_chromium_matches_itself_whatever_its_ech_grease_length() {
        use client_hello::fixture;
        let (first, second) = (fixture("chromium_1"), fixture("chromium_2"));
        let ech_len = |hello: &ClientHello| {
            hello
                .extensions
                .iter()
                .find(|e| e.kind == client_hello::ext::ECH)
                .map(|e| e.len)
        };
        assert_ne!(ech_len(&first), ech_len(&second), "the fixtures differ");
        let recorded = Arc::new(first.clone().fresh_and_anonymous());
        let connection = ClientConnection::tls(second, &LiveHellos::default());
        assert!(connection.hello_matches(&recorded));
        // As a store written before kept it: the length in the recording.
        let mut old = (*recorded).clone();
        for extension in &mut old.extensions {
            if extension.kind == client_hello::ext::ECH {
                extension.len = ech_len(&first).unwrap_or_default();
            }
        }
        let stored = Fingerprint {
            headers: HeaderValues::default(),
            tls: Some(Arc::new(old)),
            h2: None,
        };
        let bytes = postcard::to_allocvec(&stored).unwrap();
        let read = Fingerprint::decode(&bytes).unwrap();
        assert!(connection.hello_matches(read.tls.as_ref().unwrap()));
    }

    /// Chromium's WebSocket tunnels offer HTTP/1.1 alone, and so no ALPS:
    /// the same client as its pages'; another client offering HTTP/1.1
    /// alone is not.
    #[test]
    fn a_hello_for_http1_alone_matches_its_clients_full_one() {
        use client_hello::fixture;
        use client_hello::{ext, Occasion};
        let full = fixture("chromium_1").fresh_and_anonymous();
        let websocket = full.http1_only_view().unwrap();
        assert_eq!(websocket.alpn, Some(vec![b"http/1.1".to_vec()]));
        assert!(!websocket.has_extension(ext::ALPS) && !websocket.has_extension(ext::ALPS_OLD));
        assert!(
            ja4::ja4(&websocket).starts_with("t13d1516h1_"),
            "{}",
            ja4::ja4(&websocket)
        );
        assert_eq!(
            ja4::ja4(&full.on(Occasion {
                http1_only: true,
                to_address: false
            })),
            ja4::ja4(&websocket)
        );
        let live = LiveHellos::default();
        let ws = ClientConnection::tls(websocket.clone(), &live);
        assert!(ws.hello_matches(&Arc::new(full.clone())));
        // Not the other way round: a recording offering HTTP/1.1 alone has
        // the identity's connections offer it, which the page's does not.
        let page = ClientConnection::tls(fixture("chromium_2"), &live);
        assert!(!page.hello_matches(&Arc::new(websocket.clone())));
        let mut other = websocket;
        other.cipher_suites.reverse();
        let other = ClientConnection::tls(other, &live);
        assert!(!other.hello_matches(&Arc::new(full.clone())));
        assert!(full.http1_only_view().unwrap().http1_only_view().is_none());
    }

    /// OpenSSL pads a hello only when its length calls for it, so a long
    /// host name leaves the padding out: the same client all the same.
    #[test]
    fn padding_present_or_not_is_the_same_client() {
        use client_hello::ext;
        use client_hello::fixture;
        let padded = fixture("curl_h2");
        assert!(padded.has_extension(ext::PADDING));
        let recorded = Arc::new(padded.clone().fresh_and_anonymous());
        let mut unpadded = padded;
        unpadded.extensions.retain(|e| e.kind != ext::PADDING);
        unpadded.padding_len = None;
        let live = LiveHellos::default();
        assert!(ClientConnection::tls(unpadded, &live).hello_matches(&recorded));
        let mut other = (*recorded).clone();
        other.extensions.retain(|e| e.kind != ext::PADDING);
        other.cipher_suites.reverse();
        assert!(!ClientConnection::tls(other, &live).hello_matches(&recorded));
    }

    /// No client sends SNI to an address: its hello there is recorded as
    /// the one it sends to names, and said to an address without SNI.
    #[test]
    fn a_hello_to_an_address_is_recorded_as_to_a_name() {
        use client_hello::fixture;
        use client_hello::{ext, Occasion};
        let named = fixture("curl_h2").fresh_and_anonymous();
        let mut to_address = fixture("curl_h2");
        to_address.extensions.retain(|e| e.kind != ext::SERVER_NAME);
        to_address.server_name = None;
        to_address.presume_sni_for_names();
        assert_eq!(to_address.clone().fresh_and_anonymous(), named);
        // Recorded on an address by an earlier release (no SNI presumed),
        // the same client still matches it, to names and to addresses.
        let mut earlier = named.clone();
        earlier.extensions.retain(|e| e.kind != ext::SERVER_NAME);
        let earlier = Arc::new(earlier);
        let live = LiveHellos::default();
        assert!(ClientConnection::tls(fixture("curl_h2"), &live).hello_matches(&earlier));
        assert!(ClientConnection::tls(to_address, &live).hello_matches(&earlier));
        let said = named.on(Occasion {
            http1_only: false,
            to_address: true,
        });
        assert!(!said.has_extension(ext::SERVER_NAME));
        assert!(ja4::ja4(&said).starts_with("t13i"), "{}", ja4::ja4(&said));
        assert!(ja4::ja4(&named).starts_with("t13d"));
    }

    #[test]
    fn a_held_request_fingerprint_records_what_of_request_makes() {
        let Some(chrome) = profile::chrome_hello() else {
            panic!("the built-in Chrome hello parses");
        };
        let connection = ClientConnection::tls((*chrome).clone(), &LiveHellos::default());
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", http::HeaderValue::from_static("Chrome/156"));
        headers.insert("sec-ch-ua-mobile", http::HeaderValue::from_static("?0"));
        let held = RequestFingerprint::of_request(&headers, &connection);
        let recorded = held.record();
        assert_eq!(recorded, Fingerprint::of_request(&headers, &connection));
        assert!(recorded.tls.is_some());
        assert_eq!(recorded.get("user-agent"), Some("Chrome/156"));
        assert_eq!(
            RequestFingerprint::default().record(),
            Fingerprint::default()
        );
    }
}
