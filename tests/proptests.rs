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
        now in any::<u64>(),
    ) {
        let request = fuzzing::headers(
            cookies.iter().map(|c| ("cookie", c.as_slice()))
                .chain(std::iter::once(("x-datadome-clientid", client_id.as_slice()))),
        );
        let response = fuzzing::headers(
            sets.iter().map(|s| ("set-cookie", s.as_slice()))
                .chain(sets.iter().map(|s| ("x-set-cookie", s.as_slice()))),
        );
        let _ = fuzzing::cookies(request, &response, now);
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
