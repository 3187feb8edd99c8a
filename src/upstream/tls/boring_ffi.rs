//! The four BoringSSL calls a browser-shaped ClientHello needs and the safe
//! `boring` binding does not wrap: which groups get key shares, ALPS (with
//! the client's codepoint and settings) and the trust-anchor ids Chrome
//! asks for. This is the only `unsafe` code in pinproxy; each call passes
//! a live `SSL*` owned by the `SslRef` it borrows and slices that outlive
//! the call (BoringSSL copies what it keeps).
#![allow(unsafe_code)]

use boring::ssl::SslRef;
use foreign_types::ForeignTypeRef as _;

/// BoringSSL refused a setting.
#[derive(Debug, thiserror::Error)]
#[error("BoringSSL refused {0}")]
pub struct Refused(pub &'static str);

fn check(result: std::os::raw::c_int, what: &'static str) -> Result<(), Refused> {
    if result == 1 {
        Ok(())
    } else {
        Err(Refused(what))
    }
}

/// Sends key shares for exactly `groups`, in order (each must be in the
/// supported groups list).
pub fn set_client_key_shares(ssl: &mut SslRef, groups: &[u16]) -> Result<(), Refused> {
    // SAFETY: `ssl` is a valid SSL*; `groups` is valid for `groups.len()`
    // u16s for the duration of the call and BoringSSL copies it.
    let result = unsafe {
        boring_sys::SSL_set1_client_key_shares(ssl.as_ptr(), groups.as_ptr(), groups.len())
    };
    check(result, "the key share groups")
}

/// Offers ALPS for `protocol` with `settings` (sent encrypted after the
/// hello), under the new codepoint (17613) or the old one (17513).
pub fn add_application_settings(
    ssl: &mut SslRef,
    protocol: &[u8],
    settings: &[u8],
    new_codepoint: bool,
) -> Result<(), Refused> {
    // SAFETY: `ssl` is a valid SSL*; both slices are valid for their
    // lengths during the call and BoringSSL copies them.
    let result = unsafe {
        boring_sys::SSL_add_application_settings(
            ssl.as_ptr(),
            protocol.as_ptr(),
            protocol.len(),
            settings.as_ptr(),
            settings.len(),
        )
    };
    check(result, "the ALPS settings")?;
    // SAFETY: `ssl` is a valid SSL*.
    unsafe { boring_sys::SSL_set_alps_use_new_codepoint(ssl.as_ptr(), i32::from(new_codepoint)) };
    Ok(())
}

/// Asks for the trust anchors `ids` (the trust_anchors extension's body
/// without its length prefix, as the client sent it).
pub fn set_requested_trust_anchors(ssl: &mut SslRef, ids: &[u8]) -> Result<(), Refused> {
    // SAFETY: `ssl` is a valid SSL*; `ids` is valid for its length during
    // the call and BoringSSL copies it.
    let result = unsafe {
        boring_sys::SSL_set1_requested_trust_anchors(ssl.as_ptr(), ids.as_ptr(), ids.len())
    };
    check(result, "the requested trust anchors")
}

/// Whether `ssl` holds bytes a read would return or process without asking
/// its transport: decrypted plaintext, or received bytes not yet processed
/// (a record, or part of one).
pub fn has_pending(ssl: &SslRef) -> bool {
    // SAFETY: `ssl` is a valid SSL*; the call only reads its buffers' state.
    unsafe { boring_sys::SSL_has_pending(ssl.as_ptr()) != 0 }
}
