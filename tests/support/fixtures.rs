//! Fixture loading shared by the integration tests.

use std::path::PathBuf;

/// Every TLS fixture and the JA4 its client is known to produce (measured on
/// the capture machine with FoxIO's tools, see README.md).
pub const TLS_FIXTURES: &[(&str, &str)] = &[
    ("chromium_1", "t13d1517h2_8daaf6152771_cb7bf5808d99"),
    ("chromium_2", "t13d1517h2_8daaf6152771_cb7bf5808d99"),
    ("curl_h2", "t13d3112h2_e8f1e7e78f70_b26ce05bbdd6"),
    ("curl_h1", "t13d3112h1_e8f1e7e78f70_b26ce05bbdd6"),
    ("python_requests", "t13d1812h1_85036bcba153_b26ce05bbdd6"),
    ("rustls", "t13d1011h2_61a7ad8aa9b6_0d308c48d2a3"),
    // No published value: these pin this crate's own output.
    ("python_ssl", "t13d181100_85036bcba153_d41ae481755e"),
    (
        "python_requests_debian",
        "t13d4312h1_c7886603b240_b26ce05bbdd6",
    ),
];

/// The HTTP/2 opening fixtures and their Akamai fingerprints.
pub const H2_FIXTURES: &[(&str, &str)] = &[
    (
        "chromium_h2",
        "1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p",
    ),
    ("curl_h2c", "3:100;4:33554432;2:0|33488897|0|m,p,s,a"),
    ("curl_h2_tls", "3:100;4:33554432;2:0|33488897|0|m,p,s,a"),
    (
        "hyper_h2c",
        "2:0;4:2097152;5:16384;6:16384|5177345|0|m,s,a,p",
    ),
];

/// The bytes of `tests/fixtures/NAME.hex` (hex, whitespace ignored).
pub fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "hello",
        name,
    ]
    .iter()
    .collect::<PathBuf>()
    .with_extension("hex");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let hex: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert_eq!(
        hex.len() % 2,
        0,
        "{}: odd number of hex digits",
        path.display()
    );
    hex.chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).unwrap();
            u8::from_str_radix(s, 16).unwrap()
        })
        .collect()
}

/// Rewraps a single-record hello into records whose fragments have the
/// given lengths (the last takes the rest).
pub fn refragment(records: &[u8], lengths: &[usize]) -> Vec<u8> {
    assert_eq!(records[0], 22);
    let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
    let message = &records[5..5 + len];
    let mut out = Vec::new();
    let mut rest = message;
    for &n in lengths {
        let (head, tail) = rest.split_at(n);
        push_record(&mut out, head);
        rest = tail;
    }
    if !rest.is_empty() {
        push_record(&mut out, rest);
    }
    out
}

fn push_record(out: &mut Vec<u8>, fragment: &[u8]) {
    out.extend_from_slice(&[22, 3, 1]);
    out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
    out.extend_from_slice(fragment);
}
