//! Property tests of the parsers a client, origin or config file can feed
//! (the CI-sized counterparts of the cargo-fuzz targets in `fuzz/`): no
//! panic on arbitrary input, and round trips where one exists.
//!
//! Case counts are bounded (`PROPTEST_CASES` overrides) so the suite stays
//! fast; the fuzz targets run the same entry points for hours.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pinproxy::fuzzing;
use pinproxy::net::HostPort;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        ..ProptestConfig::default()
    }
}

/// Cookie names: tracked ones, untracked ones, odd ones.
fn cookie_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("datadome".to_owned()),
        Just("cf_clearance".to_owned()),
        Just("_abck".to_owned()),
        Just("_px3".to_owned()),
        Just("session_x".to_owned()),
        "[a-z_]{1,8}",
        "[ -~]{0,6}",
    ]
}

fn cookie_value() -> impl Strategy<Value = String> {
    prop_oneof!["[A-Za-z0-9~._-]{0,12}", "[ -~]{0,10}"]
}

proptest! {
    #![proptest_config(config())]

    /// Cookie and Set-Cookie extraction never panic, whatever the bytes.
    #[test]
    fn cookie_parsers_take_any_bytes(
        cookies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
        sets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 0..4),
        client_id in proptest::collection::vec(any::<u8>(), 0..24),
        px in proptest::collection::vec(any::<u8>(), 0..24),
        now in any::<u64>(),
    ) {
        let request = fuzzing::headers(
            cookies.iter().map(|c| ("cookie", c.as_slice()))
                .chain(std::iter::once(("x-datadome-clientid", client_id.as_slice())))
                .chain(std::iter::once(("x-px-authorization", px.as_slice())))
                .chain(std::iter::once(("x-kpsdk-ct", px.as_slice()))),
        );
        let response = fuzzing::headers(
            sets.iter().map(|s| ("set-cookie", s.as_slice()))
                .chain(sets.iter().map(|s| ("x-set-cookie", s.as_slice()))),
        );
        let _ = fuzzing::cookies(request, &response, now);
    }

    /// Stripping every token found leaves no token header that is one:
    /// what is left (a PerimeterX status, an empty value) reads as none.
    #[test]
    fn stripping_leaves_no_token(
        token in "[ -~]{0,16}",
        status in prop_oneof![Just(""), Just("3:"), Just("1"), Just("3")],
    ) {
        let px = format!("{status}{token}");
        let request = fuzzing::headers([
            ("x-px-authorization", px.as_bytes()),
            ("x-px-original-token", token.as_bytes()),
            ("x-kpsdk-ct", token.as_bytes()),
            ("x-datadome-clientid", token.as_bytes()),
        ]);
        let out = fuzzing::cookies(request, &http::HeaderMap::new(), 1);
        if out.request.is_some() {
            let left = fuzzing::headers(out.tokens.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
            let again = fuzzing::cookies(left, &http::HeaderMap::new(), 1);
            prop_assert_eq!(again.request, Some(Vec::new()), "{:?}", out.tokens);
        }
    }

    /// Stripping the tracked cookies keeps every untracked cookie, in
    /// order, and leaves no tracked one.
    #[test]
    fn stripping_keeps_untracked_cookies_in_order(
        pairs in proptest::collection::vec((cookie_name(), cookie_value()), 0..8),
    ) {
        // Only well-formed pairs: what a browser sends.
        let pairs: Vec<(String, String)> = pairs
            .into_iter()
            .filter(|(n, v)| {
                !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_graphic() && !b";=,\"".contains(&b))
                    && v.bytes().all(|b| b.is_ascii_graphic() && !b";,\" ".contains(&b))
            })
            .collect();
        let header = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; ");
        let request = fuzzing::headers([("cookie", header.as_bytes())]);
        let out = fuzzing::cookies(request, &http::HeaderMap::new(), 0);
        let kept: Vec<String> = out
            .stripped
            .iter()
            .flat_map(|h| h.split("; ").map(str::to_owned).collect::<Vec<_>>())
            .filter(|p| !p.is_empty())
            .collect();
        let expected: Vec<String> = pairs
            .iter()
            // An empty value is no credential, and stays.
            .filter(|(n, v)| !fuzzing::is_tracked(n) || v.is_empty())
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        prop_assert_eq!(kept, expected);
    }

    /// Host normalisation never panics on any text.
    #[test]
    fn host_parsers_take_any_text(text in "\\PC{0,40}") {
        let _ = fuzzing::hosts(&text);
    }

    /// Host normalisation on host-like text.
    #[test]
    fn host_parsers_take_host_like_text(text in "[\\[\\]a-z0-9.:@/%-]{0,30}") {
        let _ = fuzzing::hosts(&text);
    }

    /// `host:port` prints back to what parses to the same address.
    #[test]
    fn host_port_round_trips(text in "(\\[[0-9a-f:]{1,20}\\]|[a-z0-9.-]{1,20}|[0-9a-f:]{2,20}):[0-9]{1,5}") {
        if let Ok(parsed) = HostPort::parse(&text) {
            let printed = parsed.to_string();
            prop_assert_eq!(HostPort::parse(&printed), Ok(parsed.clone()), "{} -> {}", text, printed);
        }
    }

    /// Any parsed address prints to something that parses back to it.
    #[test]
    fn any_parsed_host_port_round_trips(text in "\\PC{0,30}") {
        if let Ok(parsed) = HostPort::parse(&text) {
            let printed = parsed.to_string();
            prop_assert_eq!(HostPort::parse(&printed), Ok(parsed.clone()), "{:?} -> {:?}", text, printed);
        }
    }

    /// The ClientHello parser takes any bytes, and any bytes behind a
    /// plausible record header.
    #[test]
    fn client_hello_parser_takes_any_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        framed in any::<bool>(),
    ) {
        let bytes = if framed {
            let len = body.len() + 4;
            let mut v = vec![0x16, 0x03, 0x01, (len >> 8) as u8, len as u8, 0x01, 0, (body.len() >> 8) as u8, body.len() as u8];
            v.extend_from_slice(&body);
            v
        } else {
            body
        };
        let _ = fuzzing::client_hello(&bytes);
    }

    /// The HTTP/2 preface parser takes any bytes, whole or in pieces, and
    /// agrees with itself either way.
    #[test]
    fn h2_preface_parser_takes_any_bytes(
        tail in proptest::collection::vec(any::<u8>(), 0..256),
        split in 1usize..32,
    ) {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend_from_slice(&tail);
        let (whole, fed) = fuzzing::h2_preface(&bytes, split);
        prop_assert_eq!(whole, fed);
    }

    /// Configuration parsing and validation never panic on any text.
    #[test]
    fn config_takes_any_text(text in "\\PC{0,200}") {
        let _ = fuzzing::config(&text);
    }

    /// ... nor on TOML-shaped text naming real sections and keys.
    #[test]
    fn config_takes_toml_shaped_text(
        section in prop_oneof![Just("limits"), Just("timeouts"), Just("identities"), Just("store"), Just("health"), Just("mitm")],
        key in prop_oneof![Just("max_connections"), Just("header_read"), Just("min_interval"), Just("url"), Just("interval"), Just("exclude"), Just("max_in_flight")],
        value in prop_oneof![Just("0".to_owned()), Just("\"1s\"".to_owned()), Just("[\"*\"]".to_owned()), "-?[0-9]{1,22}", "\"[ -~]{0,12}\""],
    ) {
        let _ = fuzzing::config(&format!("[{section}]\n{key} = {value}\n"));
    }

    /// The framing scanner takes any bytes and reads them the same whole
    /// or in pieces (it is fed whatever each read returns).
    #[test]
    fn framing_scanner_is_split_invariant(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        response in any::<bool>(),
        split in 1usize..16,
    ) {
        let [whole, pieces] = fuzzing::framing(&bytes, response, split);
        prop_assert_eq!(whole, pieces);
    }

    /// ... also on HTTP-shaped input, where the interesting states are.
    #[test]
    fn framing_scanner_on_http_shaped_input(
        parts in proptest::collection::vec(prop_oneof![
            Just("GET / HTTP/1.1\r\n"), Just("HTTP/1.1 200 OK\r\n"), Just("Content-Length: 3\r\n"),
            Just("Transfer-Encoding: chunked\r\n"), Just("\r\n"), Just("\n"), Just("\r"), Just(" x"),
            Just("3\r\nabc\r\n"), Just("0\r\n\r\n"), Just("X: y\r\n"), Just("abc"), Just(";e=1"),
        ], 0..24),
        response in any::<bool>(),
        split in 1usize..8,
    ) {
        let bytes = parts.concat().into_bytes();
        let [whole, pieces] = fuzzing::framing(&bytes, response, split);
        prop_assert_eq!(whole, pieces);
    }
}

// ------------------------------------------------ the upstream HPACK encoder

/// Header names the upstream encoder treats differently: ones the `http2`
/// crate left out of its table before pinproxy's patch, a browser's usual
/// ones and one of its own.
fn h2_field_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("cookie"),
        Just("authorization"),
        Just("if-none-match"),
        Just("content-length"),
        Just("user-agent"),
        Just("accept"),
        Just("x-scraper-tag"),
    ]
}

/// Values from empty to larger than a small table; visible ASCII and
/// spaces inside, as a `HeaderValue` holds them.
fn h2_field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[!-~]([ -~]{0,30}[!-~])?",
        1 => Just(String::new()),
        1 => "[a-z0-9]{200,2000}",
    ]
}

/// One request: its method, path and fields, names repeated as a
/// browser's cookie crumbs are.
type H2Request = (&'static str, String, Vec<(&'static str, String)>);

/// A `Cookie` header as clients write one: pairs joined by `"; "` (or
/// `";"`, or `";  "`), sometimes with spaces at its ends.
fn h2_cookie_header() -> impl Strategy<Value = String> {
    (
        prop::collection::vec("[a-z_]{1,8}=[A-Za-z0-9]{0,24}", 1..5),
        prop_oneof![Just("; "), Just(";"), Just(";  ")],
        prop_oneof![Just(""), Just(" ")],
    )
        .prop_map(|(pairs, separator, end)| format!("{end}{}{end}", pairs.join(separator)))
}

fn h2_request() -> impl Strategy<Value = H2Request> {
    (
        prop_oneof![Just("GET"), Just("POST"), Just("PUT")],
        prop_oneof![Just("/".to_owned()), "/[a-z0-9/?=&]{0,40}"],
        prop::collection::vec(
            prop_oneof![
                3 => (h2_field_name(), h2_field_value()),
                1 => h2_cookie_header().prop_map(|value| ("cookie", value)),
            ],
            0..12,
        ),
    )
}

/// Encodes `requests` on one connection with the `http2` crate's codec (the
/// encoder pinproxy's upstream HTTP/2 connections use) making `policy`'s
/// choices, after the origin set the table to `table_size`; returns each
/// request's header block.
fn encode_h2_blocks(
    policy: http2::HpackPolicy,
    table_size: usize,
    requests: &[H2Request],
) -> Vec<Vec<u8>> {
    use http2::frame::{Headers, Pseudo, StreamId};
    use std::future::poll_fn;
    use tokio::io::AsyncReadExt;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wire = runtime.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(64 << 20);
        let mut codec: http2::Codec<_, bytes::Bytes> = http2::Codec::new(ours);
        codec.set_hpack_policy(policy);
        codec.set_send_header_table_size(table_size);
        for (n, (method, path, fields)) in requests.iter().enumerate() {
            let uri: http::Uri = format!("https://origin.test{path}").parse().unwrap();
            let method: http::Method = method.parse().unwrap();
            let mut map = http::HeaderMap::new();
            for (name, value) in fields {
                map.append(*name, http::HeaderValue::from_str(value).unwrap());
            }
            let id = StreamId::from(u32::try_from(2 * n + 1).unwrap());
            let mut headers = Headers::new(id, Pseudo::request(method, uri, None), map);
            headers.set_end_headers();
            poll_fn(|cx| codec.poll_ready(cx)).await.unwrap();
            codec.buffer(headers.into()).unwrap();
            poll_fn(|cx| codec.flush(cx)).await.unwrap();
        }
        drop(codec);
        let mut wire = Vec::new();
        theirs.read_to_end(&mut wire).await.unwrap();
        wire
    });
    // HEADERS (1) and CONTINUATION (9) frames, gathered into blocks.
    let mut blocks = Vec::new();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let mut payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match kind {
            1 => {
                if flags & 0x8 != 0 {
                    let pad = usize::from(payload[0]);
                    payload = &payload[1..payload.len() - pad];
                }
                if flags & 0x20 != 0 {
                    payload = &payload[5..];
                }
                blocks.push(payload.to_vec());
            }
            9 => blocks.last_mut().unwrap().extend_from_slice(payload),
            _ => {}
        }
    }
    blocks
}

/// The fields `name: value` goes out as under `policy`: a cookie split
/// into crumbs by Chromium (the value's ends trimmed of spaces and tabs, a
/// crumb at each `;`, one space after it dropped) and Firefox (a crumb at
/// each `"; "`) and Go (a crumb before each `;`, the spaces after it
/// skipped, an empty last one left out), any other field, and any cookie
/// under nghttp2, whole.
fn h2_crumbs(policy: http2::HpackPolicy, name: &str, value: &str) -> Vec<String> {
    use http2::HpackPolicy::{Chromium, Firefox, Go, Nghttp2};
    match (policy, name) {
        (Chromium, "cookie") => {
            let trimmed = value.trim_matches([' ', '\t']);
            trimmed
                .split(';')
                .enumerate()
                .map(|(n, crumb)| match n {
                    0 => crumb.to_owned(),
                    _ => crumb.strip_prefix(' ').unwrap_or(crumb).to_owned(),
                })
                .collect()
        }
        (Firefox, "cookie") => value.split("; ").map(str::to_owned).collect(),
        (Go, "cookie") if value.contains(';') => {
            let mut crumbs: Vec<String> = value
                .split(';')
                .enumerate()
                .map(|(n, crumb)| match n {
                    0 => crumb.to_owned(),
                    _ => crumb.trim_start_matches(' ').to_owned(),
                })
                .collect();
            if crumbs.last().is_some_and(String::is_empty) {
                crumbs.pop();
            }
            crumbs
        }
        (Chromium | Firefox | Go | Nghttp2, _) => vec![value.to_owned()],
    }
}

/// The representations `policy` allows for the field `name: value` in a
/// table of `table_size` bytes (RFC 7541 section 6; `Indexed` and
/// `Incremental` both mean "in the table": the first time it is added, then
/// referred to), and whether its value literal must be Huffman-coded.
fn h2_expected(
    policy: http2::HpackPolicy,
    table_size: usize,
    name: &str,
    value: &[u8],
) -> (
    Vec<pinproxy::fingerprint::hpack::Representation>,
    Option<bool>,
) {
    use http2::HpackPolicy::{Chromium, Firefox, Go, Nghttp2};
    use pinproxy::fingerprint::hpack::{huffman_len, Representation::*};

    // nghttp2 and Go keep their own table at 4,096 bytes at most.
    let table_size = match policy {
        Nghttp2 | Go => table_size.min(4096),
        Chromium | Firefox => table_size,
    };
    let size = 32 + name.len() + value.len();
    let static_exact = matches!(
        (name, value),
        (":method", b"GET") | (":method", b"POST") | (":path", b"/") | (":scheme", b"https")
    );
    let in_table = vec![Indexed, Incremental];
    let never = matches!(policy, Firefox | Nghttp2)
        && (name == "authorization" || (name == "cookie" && value.len() < 20));
    let allowed = if never {
        vec![NeverIndexed]
    } else {
        match policy {
            Chromium if static_exact => vec![Indexed],
            Chromium if name.starts_with(':') && name != ":authority" => vec![WithoutIndexing],
            Chromium if size <= table_size => in_table,
            Firefox if name == ":path" => vec![WithoutIndexing],
            Firefox if static_exact => vec![Indexed],
            Firefox if size > table_size / 2 || table_size < 128 => vec![WithoutIndexing],
            Nghttp2 if static_exact => vec![Indexed],
            Nghttp2 if name == ":path" || name == "content-length" || name == "if-none-match" => {
                vec![WithoutIndexing]
            }
            Nghttp2 if size * 4 > table_size * 3 => vec![WithoutIndexing],
            Go if static_exact => vec![Indexed],
            Go if size <= table_size => in_table,
            Chromium | Go => vec![WithoutIndexing],
            Firefox | Nghttp2 => in_table,
        }
    };
    let huffman = match policy {
        Firefox => true,
        Chromium | Nghttp2 | Go => huffman_len(value) < value.len(),
    };
    (allowed, Some(huffman))
}

proptest! {
    #![proptest_config(config())]

    /// pinproxy's upstream HPACK encoder (the `http2` crate as patched in
    /// vendor/http2) round-trips any request through an independent
    /// decoder, whatever the table size the origin set, and makes the
    /// choices of the family it speaks for: how a cookie is split into
    /// crumbs, which fields are indexed (each value of a repeated name as
    /// the first), which are literals and which are never-indexed, and
    /// which strings are Huffman-coded.
    #[test]
    fn the_upstream_hpack_encoder_makes_its_familys_choices_and_round_trips(
        policy in prop_oneof![
            Just(http2::HpackPolicy::Chromium),
            Just(http2::HpackPolicy::Firefox),
            Just(http2::HpackPolicy::Nghttp2),
            Just(http2::HpackPolicy::Go),
        ],
        table_size in prop_oneof![Just(4096usize), 0usize..600, 600usize..8000],
        requests in prop::collection::vec(h2_request(), 1..6),
    ) {
        use pinproxy::fingerprint::hpack::{BlockReader, Representation};

        let blocks = encode_h2_blocks(policy, table_size, &requests);
        prop_assert_eq!(blocks.len(), requests.len());
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(table_size.max(4096));
        let mut reader = BlockReader::new();
        for ((method, _, fields), block) in requests.iter().zip(&blocks) {
            let decoded = decoder.decode(block).unwrap();
            // The map groups values by name, in the order names first came.
            let mut expected: Vec<(String, String)> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (name, _) in fields {
                if seen.insert(*name) {
                    for (n, v) in fields.iter().filter(|(n, _)| n == name) {
                        for value in h2_crumbs(policy, n, v) {
                            expected.push(((*n).to_owned(), value));
                        }
                    }
                }
            }
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let regular: Vec<(String, String)> = decoded
                .iter()
                .filter(|(n, _)| !n.starts_with(b":"))
                .map(|(n, v)| (text(n), text(v)))
                .collect();
            prop_assert_eq!(&regular, &expected);
            prop_assert!(decoded.iter().any(|(n, v)| n == b":method" && v == method.as_bytes()));

            let represented: Vec<_> = reader
                .read(block)
                .unwrap()
                .into_iter()
                .filter(|f| f.representation != Representation::SizeUpdate)
                .collect();
            prop_assert_eq!(represented.len(), decoded.len());
            for (field, (name, value)) in represented.iter().zip(&decoded) {
                let (allowed, huffman) = h2_expected(policy, table_size, &field.name, value);
                prop_assert!(
                    allowed.contains(&field.representation),
                    "{:?}: {} ({} bytes, table {}): {:?}, not one of {:?}",
                    policy, text(name), value.len(), table_size, field.representation, allowed
                );
                if field.representation != Representation::Indexed {
                    prop_assert_eq!(
                        field.huffman, huffman,
                        "{:?}: {} = {:?}: Huffman", policy, text(name), text(value)
                    );
                }
            }
        }
    }
}
