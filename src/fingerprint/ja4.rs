//! JA4 TLS client fingerprints (FoxIO's specification,
//! `technical_details/JA4.md` in github.com/FoxIO-LLC/ja4), and JA3.
//!
//! Input: a parsed [`ClientHello`]. Output: text fingerprints:
//!
//! - [`ja4`]: `t13d1516h2_8daaf6152771_e5627efa2ab1`, the hashed form with
//!   cipher and extension lists sorted (stable under Chrome's per-connection
//!   extension permutation);
//! - [`ja4_r`]: the same with the lists in clear, for debugging;
//! - [`ja4_o`], [`ja4_ro`]: hashed and raw with the lists in wire order
//!   (SNI and ALPN then stay in the extension list, as the spec says);
//! - [`ja3`], [`ja3n`], [`ja3_string`]: JA3 (MD5 of the classic string) and
//!   its variant with sorted extensions.
//!
//! Invariants: GREASE values (RFC 8701) are ignored everywhere; every output
//! is ASCII and of bounded length; no function here fails or panics, since
//! any [`ClientHello`] that parsed has something to fingerprint.
//!
//! Choices where the spec leaves room (all moot for real clients):
//! - the version comes from supported_versions' highest non-GREASE value;
//!   when that extension is absent, undecodable or lists only GREASE, from
//!   `legacy_version`;
//! - the "first ALPN value" is the first non-GREASE one;
//! - a first ALPN value whose first or last byte is not ASCII alphanumeric
//!   is shown by the first and last characters of its hex form, as the spec
//!   says (`0xAB 0xCD` → `ad`). FoxIO's own Python and Rust tools print `99`
//!   for non-ASCII bytes instead, so their output differs on such hellos.

use std::fmt::Write as _;

use md5::Md5;
use sha2::{Digest as _, Sha256};

use super::client_hello::{ext, is_grease, is_grease_alpn, ClientHello};

/// Value of a hash part that has nothing to hash.
const EMPTY_HASH: &str = "000000000000";

/// JA4 with sorted lists, hashed: `t13d1516h2_8daaf6152771_e5627efa2ab1`.
pub fn ja4(hello: &ClientHello) -> String {
    Parts::of(hello, Order::Sorted).hashed()
}

/// JA4_r: like [`ja4`] with the sorted lists in clear.
pub fn ja4_r(hello: &ClientHello) -> String {
    Parts::of(hello, Order::Sorted).raw()
}

/// JA4_o: like [`ja4`] with the lists in wire order (SNI and ALPN kept).
pub fn ja4_o(hello: &ClientHello) -> String {
    Parts::of(hello, Order::Original).hashed()
}

/// JA4_ro: like [`ja4_r`] with the lists in wire order (SNI and ALPN kept).
pub fn ja4_ro(hello: &ClientHello) -> String {
    Parts::of(hello, Order::Original).raw()
}

/// Whether the lists keep wire order (JA4_o) or are sorted (JA4).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Sorted,
    Original,
}

/// The three parts of a JA4, before hashing.
struct Parts {
    /// `t13d1516h2`.
    a: String,
    /// Cipher suites as 4-digit hex, GREASE removed.
    ciphers: Vec<u16>,
    /// Extension types, GREASE removed (and, when sorted, SNI and ALPN).
    extensions: Vec<u16>,
    /// signature_algorithms in wire order, GREASE removed.
    sigalgs: Vec<u16>,
}

impl Parts {
    fn of(hello: &ClientHello, order: Order) -> Parts {
        let mut ciphers: Vec<u16> = non_grease(&hello.cipher_suites);
        let mut extensions: Vec<u16> = hello.extension_types().filter(|t| !is_grease(*t)).collect();
        // Counted before SNI and ALPN leave the list: the spec counts them.
        let a = format!(
            "t{version}{sni}{ciphers:02}{extensions:02}{alpn}",
            version = version_code(hello),
            sni = if hello.has_extension(ext::SERVER_NAME) {
                'd'
            } else {
                'i'
            },
            ciphers = ciphers.len().min(99),
            extensions = extensions.len().min(99),
            alpn = alpn_chars(hello),
        );
        if order == Order::Sorted {
            // SNI and ALPN are already in part a; leaving them out keeps part
            // c the same whether the client goes to a name or an address.
            extensions.retain(|t| *t != ext::SERVER_NAME && *t != ext::ALPN);
            ciphers.sort_unstable();
            extensions.sort_unstable();
        }
        Parts {
            a,
            ciphers,
            extensions,
            sigalgs: non_grease(hello.signature_algorithms.as_deref().unwrap_or_default()),
        }
    }

    /// Part c before hashing: extensions, then `_` and the signature
    /// algorithms when there are any.
    fn c_raw(&self) -> String {
        let mut c = hex_list(&self.extensions);
        if !self.sigalgs.is_empty() {
            c.push('_');
            c.push_str(&hex_list(&self.sigalgs));
        }
        c
    }

    fn hashed(&self) -> String {
        let b = if self.ciphers.is_empty() {
            EMPTY_HASH.to_owned()
        } else {
            sha256_12(&hex_list(&self.ciphers))
        };
        let c = if self.extensions.is_empty() {
            EMPTY_HASH.to_owned()
        } else {
            sha256_12(&self.c_raw())
        };
        format!("{}_{b}_{c}", self.a)
    }

    fn raw(&self) -> String {
        format!("{}_{}_{}", self.a, hex_list(&self.ciphers), self.c_raw())
    }
}

/// The values of `list` that are not GREASE, in order.
fn non_grease(list: &[u16]) -> Vec<u16> {
    list.iter().copied().filter(|v| !is_grease(*v)).collect()
}

/// `0a0a,1301,...`: 4-digit lower-case hex, comma separated.
fn hex_list(list: &[u16]) -> String {
    let mut out = String::with_capacity(list.len().saturating_mul(5));
    for (i, v) in list.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "{v:04x}");
    }
    out
}

/// The first 12 lower-case hex digits of SHA-256 of `text`.
fn sha256_12(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(12);
    for byte in digest.iter().take(6) {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// The 2-character TLS version of part a.
fn version_code(hello: &ClientHello) -> &'static str {
    let from_extension = hello
        .supported_versions
        .as_deref()
        .filter(|_| hello.has_extension(ext::SUPPORTED_VERSIONS))
        .and_then(|versions| versions.iter().copied().filter(|v| !is_grease(*v)).max());
    match from_extension.unwrap_or(hello.legacy_version) {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        0x0002 => "s2",
        0xfeff => "d1",
        0xfefd => "d2",
        0xfefc => "d3",
        _ => "00",
    }
}

/// The 2 characters of part a for the first ALPN value.
fn alpn_chars(hello: &ClientHello) -> String {
    let first = hello
        .alpn
        .as_deref()
        .and_then(|protocols| protocols.iter().find(|p| !is_grease_alpn(p)));
    let Some(value) = first else {
        return "00".to_owned();
    };
    let (Some(&head), Some(&tail)) = (value.first(), value.last()) else {
        return "00".to_owned();
    };
    if head.is_ascii_alphanumeric() && tail.is_ascii_alphanumeric() {
        return [char::from(head), char::from(tail)].iter().collect();
    }
    // First and last characters of the value's hex form: the high nibble of
    // its first byte and the low nibble of its last.
    let hex = |nibble: u8| char::from_digit(u32::from(nibble), 16).unwrap_or('0');
    [hex(head >> 4), hex(tail & 0x0f)].iter().collect()
}

/// The classic JA3 string:
/// `SSLVersion,Ciphers,Extensions,EllipticCurves,EllipticCurvePointFormats`,
/// decimal values joined by `-`, GREASE removed, lists in wire order.
pub fn ja3_string(hello: &ClientHello) -> String {
    ja3_text(hello, Order::Original)
}

/// JA3: lower-case hex MD5 of [`ja3_string`].
pub fn ja3(hello: &ClientHello) -> String {
    md5_hex(&ja3_text(hello, Order::Original))
}

/// JA3N: JA3 with the extension list sorted, so that it is stable under
/// Chrome's extension permutation.
pub fn ja3n(hello: &ClientHello) -> String {
    md5_hex(&ja3_text(hello, Order::Sorted))
}

fn ja3_text(hello: &ClientHello, order: Order) -> String {
    let mut extensions: Vec<u16> = hello.extension_types().filter(|t| !is_grease(*t)).collect();
    if order == Order::Sorted {
        extensions.sort_unstable();
    }
    let groups = non_grease(hello.supported_groups.as_deref().unwrap_or_default());
    let formats: Vec<u16> = hello
        .ec_point_formats
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|f| u16::from(*f))
        .collect();
    format!(
        "{},{},{},{},{}",
        hello.legacy_version,
        dec_list(&non_grease(&hello.cipher_suites)),
        dec_list(&extensions),
        dec_list(&groups),
        dec_list(&formats),
    )
}

/// `4865-4866-...`: decimal, dash separated.
fn dec_list(list: &[u16]) -> String {
    let mut out = String::with_capacity(list.len().saturating_mul(6));
    for (i, v) in list.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        let _ = write!(out, "{v}");
    }
    out
}

/// Lower-case hex MD5 of `text`.
fn md5_hex(text: &str) -> String {
    let digest = Md5::digest(text.as_bytes());
    let mut out = String::with_capacity(32);
    for byte in digest.iter() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello with only the fields JA4 reads set.
    fn hello(ciphers: &[u16], exts: &[u16], sigalgs: &[u16], alpn: Option<&[u8]>) -> ClientHello {
        ClientHello {
            legacy_version: 0x0303,
            session_id_len: 32,
            cipher_suites: ciphers.to_vec(),
            compression_methods: vec![0],
            extensions: exts
                .iter()
                .map(|&kind| crate::fingerprint::client_hello::Extension {
                    kind,
                    len: 0,
                    data: Some(Vec::new()),
                })
                .collect(),
            malformed_extensions: Vec::new(),
            server_name: None,
            supported_groups: None,
            key_share_groups: None,
            signature_algorithms: Some(sigalgs.to_vec()),
            alpn: alpn.map(|a| vec![a.to_vec()]),
            supported_versions: Some(vec![0x0304, 0x0303]),
            psk_key_exchange_modes: None,
            compress_certificate: None,
            alps: Vec::new(),
            record_size_limit: None,
            ec_point_formats: None,
            padding_len: None,
            delegated_credentials: None,
        }
    }

    /// The worked example of JA4.md.
    fn spec_example() -> ClientHello {
        hello(
            &[
                0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
                0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
            ],
            &[
                0x001b, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002d, 0x000d, 0x0005, 0x0023,
                0x0012, 0x002b, 0xff01, 0x000b, 0x000a, 0x0015,
            ],
            &[
                0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
            ],
            Some(b"h2"),
        )
    }

    #[test]
    fn spec_worked_example() {
        let h = spec_example();
        assert_eq!(ja4(&h), "t13d1516h2_8daaf6152771_e5627efa2ab1");
        assert_eq!(
            ja4_r(&h),
            "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,0501,0806,0601"
        );
        assert_eq!(
            ja4_ro(&h),
            "t13d1516h2_1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,0035_001b,0000,0033,0010,4469,0017,002d,000d,0005,0023,0012,002b,ff01,000b,000a,0015_0403,0804,0401,0503,0805,0501,0806,0601"
        );
        assert_eq!(ja4_o(&h), "t13d1516h2_acb858a92679_18f69afefd3d");
    }

    #[test]
    fn spec_hash_without_sigalgs() {
        // JA4.md: the extension list alone hashes to 6d807ffa2a79.
        let mut h = spec_example();
        h.signature_algorithms = None;
        assert!(ja4(&h).ends_with("_6d807ffa2a79"));
    }

    #[test]
    fn grease_is_ignored_everywhere() {
        let mut h = spec_example();
        let plain = ja4(&h);
        h.cipher_suites.insert(0, 0x3a3a);
        h.extensions.insert(
            0,
            crate::fingerprint::client_hello::Extension {
                kind: 0xdada,
                len: 0,
                data: Some(Vec::new()),
            },
        );
        h.signature_algorithms = h.signature_algorithms.map(|mut s| {
            s.insert(3, 0x1a1a);
            s
        });
        h.supported_versions = Some(vec![0x7a7a, 0x0304, 0x0303]);
        h.alpn = Some(vec![b"\x5a\x5a".to_vec(), b"h2".to_vec()]);
        assert_eq!(ja4(&h), plain);
    }

    #[test]
    fn empty_parts_are_zeros() {
        let h = hello(&[], &[], &[], None);
        assert_eq!(ja4(&h), "t12i000000_000000000000_000000000000");
        // Only SNI and ALPN: counted in a, absent from c.
        let h = hello(&[0x1301], &[0x0000, 0x0010], &[], Some(b"http/1.1"));
        assert_eq!(&ja4(&h)[..10], "t12d0102h1");
        assert!(ja4(&h).ends_with("_000000000000"));
    }

    #[test]
    fn counts_cap_at_99() {
        let ciphers: Vec<u16> = (1..=150).collect();
        let exts: Vec<u16> = (100..=250).collect();
        let h = hello(&ciphers, &exts, &[], None);
        assert_eq!(&ja4(&h)[..10], "t12i999900");
    }

    #[test]
    fn version_codes() {
        let mut h = spec_example();
        assert_eq!(version_code(&h), "13");
        h.extensions.retain(|e| e.kind != ext::SUPPORTED_VERSIONS);
        assert_eq!(version_code(&h), "12");
        for (v, code) in [
            (0x0302, "11"),
            (0x0301, "10"),
            (0x0300, "s3"),
            (0x0002, "s2"),
            (0x7f1c, "00"),
        ] {
            h.legacy_version = v;
            assert_eq!(version_code(&h), code);
        }
    }

    #[test]
    fn alpn_rules_of_the_spec() {
        let cases: &[(&[u8], &str)] = &[
            (b"h2", "h2"),
            (b"http/1.1", "h1"),
            (b"h", "hh"),
            (b"", "00"),
            (&[0xab], "ab"),
            (&[0x20], "20"),
            (&[0xab, 0xcd], "ad"),
            (&[0x20, 0x61], "21"),
            (&[0x30, 0xab], "3b"),
            (&[0x61, 0x20], "60"),
            (&[0x30, 0x31, 0xab, 0xcd], "3d"),
            (&[0x30, 0xab, 0xcd, 0x31], "01"),
        ];
        for (value, want) in cases {
            let h = hello(&[0x1301], &[0x0010], &[], Some(value));
            assert_eq!(alpn_chars(&h), *want, "ALPN {value:02x?}");
        }
        let h = hello(&[0x1301], &[], &[], None);
        assert_eq!(alpn_chars(&h), "00");
    }

    #[test]
    fn ja3_of_a_small_hello() {
        let mut h = hello(&[0x0a0a, 0x1301, 0xc02f], &[0x2a2a, 0, 10, 11], &[], None);
        h.supported_groups = Some(vec![0x4a4a, 29, 23]);
        h.ec_point_formats = Some(vec![0]);
        assert_eq!(ja3_string(&h), "771,4865-49199,0-10-11,29-23,0");
        // md5 of that string, computed with Python's hashlib.
        assert_eq!(ja3(&h), "bca193bf3b6d2156cfbe0e6b4b306d3e");
    }
}
