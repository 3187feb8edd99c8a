//! Built-in browser profiles, for `upstream.fingerprint = "chrome"`: what a
//! current Chrome sends, recorded from Debian's Chromium 156 on a fresh
//! profile (its ClientHello and its HTTP/2 connection preface, as captured
//! in tests/fixtures/hello). JA4 `t13d1517h2_8daaf6152771_cb7bf5808d99`,
//! Akamai `1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p`.

use std::sync::{Arc, LazyLock};

use super::client_hello::{self, ClientHello};
use super::h2_preface::{self, H2Fingerprint};

/// The Chrome profile's ClientHello (hex of the TLS records).
const CHROME_HELLO: &str = include_str!("profiles/chrome_156_hello.hex");
/// The Chrome profile's HTTP/2 opening (hex of the decrypted bytes).
const CHROME_H2: &str = include_str!("profiles/chrome_156_h2.hex");

/// A browser profile: its ClientHello and HTTP/2 preface.
type Profile = (Option<Arc<ClientHello>>, Option<Arc<H2Fingerprint>>);

static CHROME: LazyLock<Profile> = LazyLock::new(|| {
    let hello = unhex(CHROME_HELLO)
        .and_then(|bytes| client_hello::parse(&bytes).ok())
        .map(|hello| Arc::new(hello.fresh_and_anonymous()));
    let h2 = unhex(CHROME_H2)
        .and_then(|bytes| h2_preface::parse(&bytes).ok())
        .map(Arc::new);
    if hello.is_none() || h2.is_none() {
        tracing::error!(
            "the built-in Chrome profile does not parse; chrome mode falls back to rustls"
        );
    }
    (hello, h2)
});

/// The Chrome profile's ClientHello.
pub fn chrome_hello() -> Option<Arc<ClientHello>> {
    CHROME.0.clone()
}

/// The Chrome profile's HTTP/2 preface.
pub fn chrome_h2() -> Option<Arc<H2Fingerprint>> {
    CHROME.1.clone()
}

/// What the Chrome profile is, as text that changes whenever its
/// ClientHello or HTTP/2 opening does (a hash of both): identities founded
/// in chrome mode are founded on this face, and a release that brings
/// another profile retires them instead of showing the origin another
/// browser under their cookies.
pub fn chrome_profile_id() -> String {
    // The bytes, not the text: a checkout with other line endings or
    // spacing is the same profile.
    let mut hasher = blake3::Hasher::new();
    for part in [CHROME_HELLO, CHROME_H2] {
        let bytes = unhex(part).unwrap_or_default();
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    hasher.finalize().to_hex()[..16].to_owned()
}

/// Bytes from hex text (whitespace ignored).
fn unhex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::ja4;

    #[test]
    fn the_chrome_profile_is_chrome_156() {
        let hello = chrome_hello().unwrap();
        assert_eq!(ja4::ja4(&hello), "t13d1517h2_8daaf6152771_cb7bf5808d99");
        assert_eq!(
            chrome_h2().unwrap().akamai(),
            "1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p"
        );
    }
}
