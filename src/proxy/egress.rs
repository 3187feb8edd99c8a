//! Pipeline stage 6, egress: the header policy, deciding what may leave.
//!
//! Before a request leaves, every header that could reveal the scraper's own
//! address or the proxy chain is removed, and so are the hop-by-hop headers
//! of the client connection. pinproxy adds none of them back: the origin
//! never learns the client's address from pinproxy.
//!
//! On the way back, only the hop-by-hop headers of the origin connection are
//! removed; `Set-Cookie` and everything else pass untouched.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt as _;

use crate::body::{self, Body};
use crate::fingerprint::header_order::{self, rename, retain};

/// A list of header names, and a `match` over the same names: looking a
/// name up is then one comparison of lengths and a few of bytes, where a
/// scan of the list compared it with every entry (this runs for every
/// header of every request and response).
macro_rules! name_list {
    ($(#[$doc:meta])* $vis:vis $list:ident, $is_in:ident: [$($name:literal),* $(,)?]) => {
        $(#[$doc])*
        $vis const $list: &[&str] = &[$($name),*];

        /// Whether `name` (lower case, as header names are kept) is in the list.
        fn $is_in(name: &str) -> bool {
            matches!(name, $($name)|*)
        }
    };
}

name_list! {
    /// Headers that carry a client address or describe the proxy chain.
    /// Removed from every request, whoever set them.
    pub FORWARDING_HEADERS, is_forwarding: [
        "forwarded",
        "forwarded-for",
        "x-forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-server",
        "x-real-ip",
        "true-client-ip",
        "client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-forwarded-scheme",
        "x-original-forwarded-for",
        "proxy-client-ip",
        "wl-proxy-client-ip",
        "x-proxyuser-ip",
        "x-envoy-external-address",
        "via",
    ]
}

name_list! {
    /// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy-only ones.
    /// (`Trailer` is end-to-end since RFC 7230, and HTTP/1.1 servers only
    /// send the trailer fields it declares, so it stays.)
    pub HOP_BY_HOP, is_hop_by_hop: [
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ]
}

/// Headers addressed to pinproxy itself (`X-Pinproxy-Session`, ...) start
/// with this and never leave.
pub const PINPROXY_PREFIX: &str = "x-pinproxy-";

/// Removes the forwarding, hop-by-hop and pinproxy headers from a request
/// about to leave through an exit. The remaining headers keep their order.
///
/// A `Connection` that only says `keep-alive` or `close` stays where the
/// client put it: to the origin, pinproxy's hop is the client's hop, and a
/// client that sends it directly sends it here too (Python requests does).
/// One that names other headers goes, with them. So does a
/// `Transfer-Encoding: chunked` stay (the body goes on chunked, and hyper
/// would otherwise add its own at the end of the head); an HTTP/2 origin
/// never sees it (the pool drops what HTTP/2 forbids).
pub fn sanitize_request(headers: &mut HeaderMap) {
    sanitize(headers, false);
}

/// As [`sanitize_request`], for an HTTP/1.1 WebSocket upgrade passed on as
/// one: its `Connection` and `Upgrade` headers are the upgrade's own and
/// stay where the client put them, as it wrote them (`keep-alive, Upgrade`
/// from Firefox, `Upgrade` from Chromium); anything else `Connection`
/// names still goes.
pub fn sanitize_upgrade_request(headers: &mut HeaderMap) {
    sanitize(headers, true);
}

fn sanitize(headers: &mut HeaderMap, upgrade: bool) {
    // Nearly every request carries nothing to remove (an HTTP/2 request
    // never holds a hop-by-hop header): one pass over its names says so.
    // `Connection` is hop-by-hop itself, so without one there is no list
    // of names to read either, and the map is not asked for it.
    if !headers
        .keys()
        .any(|name| leaves_no_request(name.as_str()) || name == header::TRAILER)
    {
        return;
    }
    let connection = ConnectionHeader::of(headers);
    // `TE: trailers` says the client takes trailers; pinproxy relays them,
    // so it may say the same to the origin, with the `Connection: TE` that
    // declares it (RFC 9110 §10.1.4) where the client sent one: kept when
    // it names nothing else, else both go.
    let te_is_trailers = {
        let mut values = headers.get_all(header::TE).iter();
        values
            .next()
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
            && values.next().is_none()
    };
    let te_listed = connection.listed.contains(&header::TE);
    let te_connection = connection.only_te && te_is_trailers;
    if headers.contains_key(header::TRAILER) {
        header_order::rewrite(headers, |name, value| {
            if name == header::TRAILER {
                declared_trailers(value)
            } else {
                Some(value)
            }
        });
    }
    retain(headers, |name, value| {
        let te_trailers = name == header::TE
            && value.as_bytes().eq_ignore_ascii_case(b"trailers")
            && (!te_listed || te_connection);
        // A chunked body is passed on chunked: the client's own
        // `Transfer-Encoding: chunked` (the front door lets no other
        // through) stays where it put it, as it wrote it, rather than
        // hyper adding one at the end of the head.
        let chunked =
            name == header::TRANSFER_ENCODING && value.as_bytes().eq_ignore_ascii_case(b"chunked");
        let kept_connection =
            (connection.only_options || te_connection || upgrade) && name == header::CONNECTION;
        let kept_upgrade = upgrade && name == header::UPGRADE;
        te_trailers
            || chunked
            || kept_connection
            || kept_upgrade
            || !(leaves_no_request(name.as_str()) || connection.listed.contains(name))
    });
}

/// A plain request to a proxy (absolute-form) carries `Proxy-Connection:
/// keep-alive` where its client writes `Connection: keep-alive` to an
/// origin (Chromium does, for every `http://` URL it sends through a
/// proxy): to the origin it goes as that `Connection`, where the client
/// put it. Only a lone value of `keep-alive` or `close` in Chromium's lower
/// case, and only where the client sent no `Connection` of its own; else it
/// goes, as hop-by-hop. (curl writes `Proxy-Connection: Keep-Alive` to a
/// proxy and no `Connection` to an origin: renamed, it would show a header
/// no curl sends.)
pub fn proxy_connection_as_connection(headers: &mut HeaderMap) {
    // A look over the names, not a hash of this one: most requests hold
    // none.
    if !super::credentials::holds_custom(headers, &PROXY_CONNECTION) {
        return;
    }
    let mut values = headers.get_all(PROXY_CONNECTION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return;
    };
    let plain = value.as_bytes() == b"keep-alive" || value.as_bytes() == b"close";
    if plain && !headers.contains_key(header::CONNECTION) {
        rename(headers, &PROXY_CONNECTION, &header::CONNECTION);
    }
}

/// `Proxy-Connection` (no RFC's, every proxy's).
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes from a request's trailers what [`sanitize_request`] removes
/// from its head (forwarding, hop-by-hop and pinproxy's headers), and any
/// `Cookie` or `X-DataDome-ClientID`: no stage reads a trailer, so a
/// credential there would leave unpinned. The rest keep their order.
pub fn sanitize_request_trailers(trailers: &mut HeaderMap) {
    remove_where(trailers, |name| {
        leaves_no_request(name.as_str())
            || name == header::COOKIE
            || super::credentials::cookies::carries_token(name)
    });
}

/// A `Trailer` value without the names of the fields a request's
/// trailers lose ([`sanitize_request_trailers`]): announced, they would
/// tell the origin of pinproxy (`X-Pinproxy-Session`) or of a forwarding
/// field it never gets. The value as sent when it names none of them;
/// `None` when it names nothing else.
fn declared_trailers(value: HeaderValue) -> Option<HeaderValue> {
    let goes = |name: &[u8]| {
        HeaderName::from_bytes(name).is_ok_and(|name| {
            leaves_no_request(name.as_str())
                || name == header::COOKIE
                || super::credentials::cookies::carries_token(&name)
        })
    };
    let names = || {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|name| !name.is_empty())
    };
    if !names().any(goes) {
        return Some(value);
    }
    let kept: Vec<&[u8]> = names().filter(|name| !goes(name)).collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&kept.join(&b", "[..])).ok()
}

/// Removes the headers `goes` names; the rest keep their order.
fn remove_where(headers: &mut HeaderMap, goes: impl Fn(&HeaderName) -> bool) {
    if headers.keys().any(&goes) {
        retain(headers, |name, _| !goes(name));
    }
}

/// `body`, streamed, with `sanitize` applied to its trailers.
fn with_trailers_sanitized<B>(body: B, sanitize: fn(&mut HeaderMap)) -> Body
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<body::BoxError>,
{
    body::boxed(body.map_frame(move |frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            sanitize(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }))
}

/// A client's request body as it goes upstream: streamed, its trailers
/// (chunked HTTP/1.1 or HTTP/2) sanitised like its head.
pub fn request_body(incoming: hyper::body::Incoming) -> Body {
    with_trailers_sanitized(incoming, sanitize_request_trailers)
}

/// Whether a header named `name` is removed from every request whatever
/// it says (hop-by-hop, forwarding, pinproxy's own); `TE: trailers`,
/// `Transfer-Encoding: chunked` and an options-only `Connection` are the
/// exceptions [`sanitize_request`] keeps.
fn leaves_no_request(name: &str) -> bool {
    is_hop_by_hop(name) || is_forwarding(name) || name.starts_with(PINPROXY_PREFIX)
}

/// Removes the hop-by-hop headers of the origin connection from a response.
/// The remaining headers keep their order.
pub fn sanitize_response(headers: &mut HeaderMap) {
    // As for requests: without a hop-by-hop name (`Connection` among them)
    // there is nothing to remove and no list to read.
    if !headers.keys().any(|name| is_hop_by_hop(name.as_str())) {
        return;
    }
    let listed = ConnectionHeader::of(headers).listed;
    retain(headers, |name, _| {
        !(is_hop_by_hop(name.as_str()) || listed.contains(name))
    });
}

/// Removes from a response's trailers what [`sanitize_response`] removes
/// from its head (hop-by-hop headers) and any `Set-Cookie`, `X-Set-Cookie`
/// or token answer (`TOKEN_ANSWERS`): capture reads the head only, so a
/// cookie or token set in a trailer would reach the client unpinned. The
/// rest keep their order.
pub fn sanitize_response_trailers(trailers: &mut HeaderMap) {
    remove_where(trailers, |name| {
        is_hop_by_hop(name.as_str())
            || name == header::SET_COOKIE
            || name == super::credentials::cookies::X_SET_COOKIE
            || super::credentials::cookies::TOKEN_ANSWERS.contains(name)
    });
}

/// An origin's response body as it goes to the client, its trailers
/// sanitised ([`sanitize_response_trailers`]). A body that can carry none
/// (HTTP/1.1 without `Transfer-Encoding`: its length is known, or it ends
/// with the connection) goes as it is, with no step per frame.
pub fn response_body(body: Body, head: &http::response::Parts) -> Body {
    if head.version < http::Version::HTTP_2 && !head.headers.contains_key(header::TRANSFER_ENCODING)
    {
        return body;
    }
    with_trailers_sanitized(body, sanitize_response_trailers)
}

/// What a message's `Connection` header says, read in one lookup.
struct ConnectionHeader {
    /// The header names it lists: hop-by-hop too (its `keep-alive` and
    /// `close` tokens are options, not header names).
    listed: Vec<HeaderName>,
    /// Whether it says nothing but `keep-alive` or `close` (or is absent).
    only_options: bool,
    /// Whether it names nothing but `TE`, besides those options.
    only_te: bool,
}

impl ConnectionHeader {
    fn of(headers: &HeaderMap) -> ConnectionHeader {
        let mut listed = Vec::new();
        let mut only_options = true;
        let mut only_te = true;
        for value in headers.get_all(header::CONNECTION) {
            let Ok(text) = value.to_str() else {
                only_options = false;
                only_te = false;
                continue;
            };
            for token in text.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("close") {
                    continue;
                }
                only_options = false;
                only_te &= token.eq_ignore_ascii_case("te");
                // Only names the message carries matter, each once: a list
                // of a hundred thousand tokens costs a lookup each, not an
                // allocation each and a comparison with every header.
                let known = listed
                    .iter()
                    .any(|name: &HeaderName| name.as_str().eq_ignore_ascii_case(token));
                if known || !headers.contains_key(token) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    listed.push(name);
                }
            }
        }
        ConnectionHeader {
            listed,
            only_options,
            only_te: only_te && !only_options,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lone `Proxy-Connection: keep-alive` or `close` becomes the
    /// `Connection` in its place; beside a `Connection`, or saying more, it
    /// stays a proxy's header, which sanitizing drops.
    #[test]
    fn proxy_connection_becomes_connection_in_its_place() {
        let of = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, http::HeaderValue::from_static(v));
            }
            proxy_connection_as_connection(&mut h);
            sanitize_request(&mut h);
            h.iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            of(&[
                ("host", "a"),
                ("proxy-connection", "keep-alive"),
                ("accept", "*/*")
            ]),
            ["host: a", "connection: keep-alive", "accept: */*"]
        );
        assert_eq!(
            of(&[("host", "a"), ("proxy-connection", "close")]),
            ["host: a", "connection: close"]
        );
        // curl's spelling: curl sends no `Connection` to an origin.
        assert_eq!(
            of(&[("host", "a"), ("proxy-connection", "Keep-Alive")]),
            ["host: a"]
        );
        for other in [
            &[("proxy-connection", "keep-alive"), ("connection", "close")][..],
            &[
                ("proxy-connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
            ][..],
            &[
                ("proxy-connection", "keep-alive"),
                ("proxy-connection", "keep-alive"),
            ][..],
        ] {
            assert!(
                of(other).iter().all(|h| !h.starts_with("proxy-connection")
                    && !h.starts_with("connection: keep-alive")),
                "{other:?}: {:?}",
                of(other)
            );
        }
    }
    use http::HeaderValue;

    #[test]
    fn a_connection_header_lists_each_present_name_once() {
        let mut tokens = vec!["a"; 100_000];
        tokens.extend(["X-Drop", "keep-alive", "x-drop", "absent"]);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("x-drop", HeaderValue::from_static("1"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_str(&tokens.join(", ")).unwrap(),
        );
        let connection = ConnectionHeader::of(&headers);
        assert_eq!(connection.listed, ["x-drop"]);
        assert!(!connection.only_options);
        sanitize_response(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn each_match_holds_exactly_its_list() {
        let listed = FORWARDING_HEADERS.iter().chain(HOP_BY_HOP);
        let others = [
            "host",
            "x-forwarded",
            "x-forwarded-fo",
            "vias",
            "t",
            "cookie",
            "",
        ];
        for name in listed.chain(&others) {
            assert_eq!(
                is_forwarding(name),
                FORWARDING_HEADERS.contains(name),
                "{name}"
            );
            assert_eq!(is_hop_by_hop(name), HOP_BY_HOP.contains(name), "{name}");
        }
    }

    #[test]
    fn request_leaves_without_forwarding_or_hop_headers() {
        let mut h = HeaderMap::new();
        for name in FORWARDING_HEADERS {
            h.insert(*name, HeaderValue::from_static("10.1.2.3"));
        }
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eDp5"),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-pinproxy-session", HeaderValue::from_static("k"));
        h.insert("cookie", HeaderValue::from_static("a=b"));
        h.insert("user-agent", HeaderValue::from_static("ua"));
        sanitize_request(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["cookie", "user-agent"], "order is kept");
    }

    #[test]
    fn a_request_with_nothing_to_remove_leaves_as_it_came() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("user-agent", "u"),
            ("cookie", "a=1"),
            ("accept", "*/*"),
            ("cookie", "b=2"),
            ("x-pinproxy", "not the prefix"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        let before = headers.clone();
        sanitize_request(&mut headers);
        let pairs = |h: &HeaderMap| -> Vec<(String, Vec<u8>)> {
            h.iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect()
        };
        assert_eq!(pairs(&headers), pairs(&before));
    }

    #[test]
    fn a_plain_keep_alive_stays_where_the_client_put_it() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.test"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        sanitize_request(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "connection", "accept"]);
    }

    #[test]
    fn an_upgrade_keeps_its_own_hop_headers_and_drops_the_rest() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.test"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade, X-Hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        let mut plain = h.clone();
        sanitize_upgrade_request(&mut h);
        let left: Vec<_> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            left,
            [
                ("host", "a.test"),
                ("upgrade", "websocket"),
                ("connection", "keep-alive, Upgrade, X-Hop"),
                ("sec-websocket-key", "k"),
            ]
        );
        // Any other request loses both.
        sanitize_request(&mut plain);
        let left: Vec<_> = plain.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "sec-websocket-key"]);
    }

    #[test]
    fn te_trailers_and_trailer_are_end_to_end() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("trailer", HeaderValue::from_static("x-checksum"));
        sanitize_request(&mut h);
        assert_eq!(h.len(), 2);
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        sanitize_request(&mut h);
        assert!(h.get("te").is_none(), "other TE values are hop-by-hop");
    }

    /// `TE: trailers` goes with the `Connection: TE` that declares it, or
    /// not at all: never one without the other (RFC 9110 §10.1.4).
    #[test]
    fn te_trailers_keeps_the_connection_option_that_declares_it() {
        let sanitized = |connection: &'static str, te: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("a.test"));
            h.insert("connection", HeaderValue::from_static(connection));
            h.insert("te", HeaderValue::from_static(te));
            h.insert("x-hop", HeaderValue::from_static("1"));
            sanitize_request(&mut h);
            h.iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            sanitized("TE", "trailers"),
            ["host: a.test", "connection: TE", "te: trailers", "x-hop: 1"]
        );
        assert_eq!(
            sanitized("keep-alive, TE", "trailers"),
            [
                "host: a.test",
                "connection: keep-alive, TE",
                "te: trailers",
                "x-hop: 1"
            ]
        );
        // Naming another header too: that header, the option and TE go.
        assert_eq!(sanitized("TE, x-hop", "trailers"), ["host: a.test"]);
        // A TE other than trailers is the hop's own: both go.
        assert_eq!(sanitized("TE", "gzip"), ["host: a.test", "x-hop: 1"]);
    }

    #[test]
    fn response_keeps_set_cookie() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        sanitize_response(&mut h);
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        assert_eq!(h.len(), 2);
    }
}
