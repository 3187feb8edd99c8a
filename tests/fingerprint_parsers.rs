//! The fingerprint parsers on real captures and on hostile bytes: JA4 of
//! each client's captured ClientHello against the value known for it, the
//! HTTP/2 openings against their Akamai fingerprints, reassembly of hellos
//! split across records and reads, and no panic on arbitrary or mutated
//! input. Fixtures are in tests/fixtures/hello (see its README).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::fixtures;

use fixtures::{fixture, refragment, H2_FIXTURES, TLS_FIXTURES};
use pinproxy::fingerprint::client_hello::{self, ext, ClientHello, ParseError, SessionTicket};
use pinproxy::fingerprint::{h1_order, h2_preface, ja4, Progress};
use proptest::prelude::*;

// ---- fixtures
fn hello(name: &str) -> ClientHello {
    client_hello::parse(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn ja4_of_every_fixture() {
    for (name, want) in TLS_FIXTURES {
        let bytes = fixture(name);
        assert_eq!(
            client_hello::handshake_len_needed(&bytes),
            Progress::Complete {
                consumed: bytes.len()
            },
            "{name}"
        );
        assert_eq!(ja4::ja4(&hello(name)), *want, "{name}");
    }
}

#[test]
fn chromium_permutes_extensions_and_ja4_does_not_care() {
    let (a, b) = (hello("chromium_1"), hello("chromium_2"));
    let order = |h: &ClientHello| h.extension_types().collect::<Vec<_>>();
    assert_ne!(
        order(&a),
        order(&b),
        "two connections, two extension orders"
    );
    let mut sorted_a = order(&a);
    let mut sorted_b = order(&b);
    sorted_a.retain(|t| !client_hello::is_grease(*t));
    sorted_b.retain(|t| !client_hello::is_grease(*t));
    sorted_a.sort_unstable();
    sorted_b.sort_unstable();
    assert_eq!(sorted_a, sorted_b, "same set of extensions");
    assert_eq!(ja4::ja4(&a), ja4::ja4(&b));
    assert_eq!(ja4::ja4_r(&a), ja4::ja4_r(&b));
    assert_ne!(ja4::ja4_ro(&a), ja4::ja4_ro(&b));
    assert_eq!(ja4::ja3n(&a), ja4::ja3n(&b));
    assert_ne!(ja4::ja3(&a), ja4::ja3(&b));
}

#[test]
fn chromium_views_and_grease() {
    let h = hello("chromium_1");
    assert_eq!(h.legacy_version, 0x0303);
    assert_eq!(h.session_id_len, 32);
    assert_eq!(h.compression_methods, [0]);
    assert_eq!(h.server_name.as_deref(), Some("x.example"));
    assert_eq!(h.alpn, Some(vec![b"h2".to_vec(), b"http/1.1".to_vec()]));
    assert!(h.malformed_extensions.is_empty());

    // BoringSSL GREASEs the first cipher, the first and last extensions
    // (before permutation, so anywhere now), the first group and key share,
    // the first supported version and (Chromium 156) the first signature
    // algorithm.
    let g = h.grease_positions();
    assert!(h.greases());
    assert_eq!(g.cipher_suites, [0]);
    assert_eq!(g.extensions.len(), 2);
    assert_eq!(g.supported_groups, [0]);
    assert_eq!(g.key_share_groups, [0]);
    assert_eq!(g.supported_versions, [0]);
    assert_eq!(g.signature_algorithms, [0]);
    // ML-DSA first, then the classic list.
    assert_eq!(
        h.signature_algorithms.as_deref().unwrap()[1..5],
        [0x0904, 0x0905, 0x0906, 0x0403]
    );

    // X25519MLKEM768 first after GREASE, then X25519.
    let groups = h.supported_groups.as_deref().unwrap();
    assert_eq!(&groups[1..], [0x11ec, 0x001d, 0x0017, 0x0018]);
    assert_eq!(
        h.key_share_groups.as_deref().unwrap()[1..],
        [0x11ec, 0x001d]
    );
    assert_eq!(
        h.supported_versions.as_deref().unwrap()[1..],
        [0x0304, 0x0303]
    );
    assert_eq!(h.psk_key_exchange_modes, Some(vec![1]));
    assert_eq!(h.compress_certificate, Some(vec![2])); // brotli
    assert_eq!(h.alps.len(), 1);
    assert_eq!(h.alps[0].codepoint, ext::ALPS);
    assert_eq!(h.alps[0].protocols, [b"h2".to_vec()]);
    assert!(h.status_request());
    assert!(h.signed_certificate_timestamp());
    assert!(h.ech());
    assert!(h.extended_master_secret());
    assert!(h.renegotiation_info());
    assert!(!h.encrypt_then_mac());
    assert!(!h.post_handshake_auth());
    assert!(!h.pre_shared_key());
    assert_eq!(h.session_ticket(), SessionTicket::Empty);
    assert_eq!(h.ec_point_formats, Some(vec![0]));
    assert_eq!(h.padding_len, None);
    assert_eq!(h.record_size_limit, None);
}

#[test]
fn openssl_views() {
    let h = hello("curl_h2");
    assert!(!h.greases());
    assert_eq!(h.server_name.as_deref(), Some("x.example"));
    assert_eq!(h.alpn, Some(vec![b"h2".to_vec(), b"http/1.1".to_vec()]));
    assert_eq!(h.ec_point_formats, Some(vec![0, 1, 2]));
    assert!(h.encrypt_then_mac());
    assert!(h.post_handshake_auth());
    assert!(h.extended_master_secret());
    assert!(!h.ech());
    // OpenSSL pads its hello to 512 bytes.
    assert!(h.padding_len.is_some());
    assert_eq!(h.key_share_groups, Some(vec![0x001d]));
    assert_eq!(h.session_ticket(), SessionTicket::Absent);
    let py = hello("python_ssl");
    assert_eq!(py.alpn, None);
    assert_eq!(py.session_ticket(), SessionTicket::Empty);
}

#[test]
fn rustls_views() {
    let h = hello("rustls");
    assert!(!h.greases());
    assert_eq!(h.server_name.as_deref(), Some("x.example"));
    assert_eq!(h.cipher_suites.last(), Some(&0x00ff));
    assert!(!h.has_extension(ext::RENEGOTIATION_INFO));
}

#[test]
fn secrets_are_not_kept_and_serde_round_trips() {
    for (name, _) in TLS_FIXTURES {
        let bytes = fixture(name);
        let h = hello(name);
        for e in &h.extensions {
            let secret = matches!(
                e.kind,
                ext::KEY_SHARE
                    | ext::PRE_SHARED_KEY
                    | ext::SESSION_TICKET
                    | ext::COOKIE
                    | ext::ECH
                    | ext::PADDING
            );
            assert_eq!(
                e.data.is_none(),
                secret,
                "{name}: extension {:#06x}",
                e.kind
            );
        }
        // The client random is bytes 11..43 of the first record; it must
        // not appear anywhere in what is stored.
        let random = &bytes[11..43];
        let stored = postcard_like(&h);
        assert!(
            !stored.windows(8).any(|w| random.windows(8).any(|r| r == w)),
            "{name}: part of the random is stored"
        );
        let json = serde_json::to_string(&h).unwrap();
        let back: ClientHello = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
    }
}

/// Every byte the stored form holds, in a flat buffer: the raw extension
/// payloads and the byte lists (the other fields are small integers).
fn postcard_like(h: &ClientHello) -> Vec<u8> {
    let mut out = Vec::new();
    for e in &h.extensions {
        if let Some(d) = &e.data {
            out.extend_from_slice(d);
        }
    }
    for p in h.alpn.iter().flatten() {
        out.extend_from_slice(p);
    }
    out
}

#[test]
fn h2_openings() {
    for (name, want) in H2_FIXTURES {
        let bytes = fixture(name);
        let fp = h2_preface::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(fp.akamai(), *want, "{name}");
        // Fed in 7-byte chunks, it completes at the same place.
        let mut parser = h2_preface::H2PrefaceParser::new();
        let mut fed = 0;
        for chunk in bytes.chunks(7) {
            match parser.feed(chunk) {
                Progress::NeedMore => fed += chunk.len(),
                Progress::Complete { consumed } => {
                    fed += consumed;
                    break;
                }
                Progress::Failed(e) => panic!("{name}: {e}"),
            }
        }
        assert_eq!(
            fed,
            bytes.len(),
            "{name}: the capture ends with the HEADERS"
        );
        assert_eq!(parser.fingerprint(), Some(&fp));
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(
            serde_json::from_str::<h2_preface::H2Fingerprint>(&json).unwrap(),
            fp
        );
    }
}

#[test]
fn chromium_h2_request() {
    let fp = h2_preface::parse(&fixture("chromium_h2")).unwrap();
    assert_eq!(
        fp.headers_priority,
        Some(h2_preface::Priority {
            stream_id: 1,
            exclusive: true,
            depends_on: 0,
            weight: 256
        })
    );
    assert_eq!(
        fp.header_order.first().map(String::as_str),
        Some("sec-ch-ua")
    );
    assert!(fp.header_order.iter().any(|h| h == "user-agent"));
    assert_eq!(fp.header_order.last().map(String::as_str), Some("priority"));
    let curl = h2_preface::parse(&fixture("curl_h2c")).unwrap();
    assert_eq!(curl.header_order, ["user-agent", "accept"]);
    assert_eq!(curl.headers_priority, None);
}

// ---- reassembly
/// Feeds `bytes` one byte at a time as a reader would; returns the length
/// at which the hello was reported complete.
fn complete_at(bytes: &[u8]) -> usize {
    for n in 0..=bytes.len() {
        match client_hello::handshake_len_needed(&bytes[..n]) {
            Progress::NeedMore => {}
            Progress::Complete { consumed } => {
                assert_eq!(consumed, n, "complete exactly when the last record is");
                return n;
            }
            Progress::Failed(e) => panic!("failed after {n} bytes: {e}"),
        }
    }
    panic!("never complete");
}

#[test]
fn two_records_byte_by_byte() {
    let single = fixture("chromium_1");
    let want = client_hello::parse(&single).unwrap();
    // Split in the middle of the extensions.
    let split = refragment(&single, &[1000]);
    assert_eq!(split.len(), single.len() + 5);
    assert_eq!(complete_at(&split), split.len());
    assert_eq!(client_hello::parse(&split).unwrap(), want);
    assert_eq!(
        ja4::ja4(&client_hello::parse(&split).unwrap()),
        "t13d1517h2_8daaf6152771_cb7bf5808d99"
    );
}

#[test]
fn handshake_header_split_across_records() {
    let single = fixture("curl_h2");
    let want = client_hello::parse(&single).unwrap();
    for lengths in [&[1][..], &[2], &[3], &[1, 1, 1], &[4], &[2, 300]] {
        let split = refragment(&single, lengths);
        assert_eq!(complete_at(&split), split.len(), "{lengths:?}");
        assert_eq!(client_hello::parse(&split).unwrap(), want, "{lengths:?}");
    }
}

#[test]
fn bytes_after_the_hello_are_not_part_of_it() {
    let mut bytes = fixture("rustls");
    let len = bytes.len();
    // 0-RTT application data in the same segment.
    bytes.extend_from_slice(&[23, 3, 3, 0, 2, 0xde, 0xad]);
    assert_eq!(
        client_hello::handshake_len_needed(&bytes),
        Progress::Complete { consumed: len }
    );
    assert_eq!(
        client_hello::parse(&bytes).unwrap(),
        client_hello::parse(&bytes[..len]).unwrap()
    );
}

#[test]
fn truncated_hello() {
    let bytes = fixture("python_requests");
    for n in [0, 1, 5, 6, 9, 100, bytes.len() - 1] {
        assert_eq!(
            client_hello::parse(&bytes[..n]),
            Err(ParseError::Truncated),
            "{n}"
        );
    }
}

// ---- no_panic
/// A fixture with a few random edits: byte overwrites, a truncation, an
/// insertion.
fn mutated(names: &'static [(&'static str, &'static str)]) -> impl Strategy<Value = Vec<u8>> {
    (
        0..names.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..16),
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(which, edits, cut, do_cut, insert, insert_at)| {
            let mut bytes = fixture(names[which].0);
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if !insert.is_empty() {
                let i = insert_at.index(bytes.len());
                bytes.splice(i..i, insert);
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

/// Everything the crate derives from a hello, to make sure none of it panics.
fn exercise_hello(bytes: &[u8]) {
    let progress = client_hello::handshake_len_needed(bytes);
    let parsed = client_hello::parse(bytes);
    match (&progress, &parsed) {
        (Progress::NeedMore, r) => assert_eq!(r, &Err(ParseError::Truncated)),
        (Progress::Failed(e), r) => assert_eq!(r.as_ref().err(), Some(e)),
        (Progress::Complete { consumed }, r) => {
            assert!(*consumed <= bytes.len());
            assert_ne!(r.as_ref().err(), Some(&ParseError::Truncated));
        }
    }
    if let Ok(h) = parsed {
        let _ = (
            ja4::ja4(&h),
            ja4::ja4_r(&h),
            ja4::ja4_o(&h),
            ja4::ja4_ro(&h),
        );
        let _ = (ja4::ja3(&h), ja4::ja3n(&h), h.grease_positions());
        assert!(ja4::ja4(&h).is_ascii());
    }
}

/// Feeds `bytes` to the h2 parser in chunks of the given sizes and checks
/// the outcome matches the one-shot parse.
fn exercise_h2(bytes: &[u8], chunk: usize) {
    let whole = h2_preface::parse(bytes);
    let mut parser = h2_preface::H2PrefaceParser::new();
    let mut last = Progress::NeedMore;
    for piece in bytes.chunks(chunk.max(1)) {
        last = parser.feed(piece);
        if !matches!(last, Progress::NeedMore) {
            break;
        }
    }
    match last {
        Progress::NeedMore => assert_eq!(whole, Err(h2_preface::H2Error::Truncated)),
        Progress::Complete { .. } => {
            assert_eq!(parser.fingerprint(), whole.as_ref().ok());
            let _ = whole.map(|fp| fp.akamai());
        }
        Progress::Failed(e) => assert_eq!(whole, Err(e)),
    }
}

/// 1024 cases per property, or `PROPTEST_CASES` for a longer run.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 1024;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn hello_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        exercise_hello(&bytes);
    }

    #[test]
    fn hello_plausible_header_random_body(
        body in prop::collection::vec(any::<u8>(), 0..600),
        declared in any::<u16>(),
    ) {
        // A valid record and handshake header in front of random bytes, so
        // the body parser is reached.
        let len = u16::try_from(body.len() + 4).unwrap();
        let mut bytes = vec![22, 3, 1];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&declared.to_be_bytes());
        bytes.extend_from_slice(&body);
        exercise_hello(&bytes);
    }

    #[test]
    fn hello_mutated_fixtures(bytes in mutated(TLS_FIXTURES)) {
        exercise_hello(&bytes);
    }

    #[test]
    fn h2_arbitrary_bytes(
        tail in prop::collection::vec(any::<u8>(), 0..400),
        with_preface in any::<bool>(),
        chunk in 1usize..64,
    ) {
        let mut bytes = if with_preface { h2_preface::PREFACE.to_vec() } else { Vec::new() };
        bytes.extend_from_slice(&tail);
        exercise_h2(&bytes, chunk);
    }

    #[test]
    fn h2_mutated_fixtures(bytes in mutated(H2_FIXTURES), chunk in 1usize..600) {
        exercise_h2(&bytes, chunk);
    }

    #[test]
    fn h1_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = h1_order::header_names(&bytes);
    }
}
