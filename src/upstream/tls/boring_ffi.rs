//! The BoringSSL calls a browser-shaped ClientHello needs and the safe
//! `boring` binding does not wrap: which groups get key shares, ALPS (with
//! the client's codepoint and settings), the trust-anchor ids Chrome asks
//! for, and offering a kept session (the binding marks it `unsafe`). This is the only `unsafe` code in pinproxy; each call passes
//! a live `SSL*` owned by the `SslRef` it borrows and slices that outlive
//! the call (BoringSSL copies what it keeps).
#![allow(unsafe_code)]

use boring::ssl::{ConnectConfiguration, SslRef, SslSessionRef};
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

/// Offers `session` in the handshake `config` will run
/// (`SSL_set_session`; a configuration has not begun its handshake, which
/// BoringSSL requires): the connection resumes it if the server accepts,
/// else runs a full handshake. BoringSSL does not offer a session whose
/// lifetime has passed or whose version the connection does not enable.
/// The caller passes only a session received on a connection of
/// `config`'s own `SSL_CTX` (what the binding's `SslRef::set_session` asks
/// of its callers), or parsed from one's serialization with
/// `SslSession::from_der`, which gives it the default X.509 method and no
/// buffer pool: those of every connector pinproxy prepares
/// (`SslMethod::tls()`, no pool set).
pub fn offer_session(
    config: &mut ConnectConfiguration,
    session: &SslSessionRef,
) -> Result<(), Refused> {
    let ssl: &mut SslRef = config;
    // SAFETY: both pointers are live for the call (borrowed); BoringSSL
    // takes its own reference to the session.
    let result = unsafe { boring_sys::SSL_set_session(ssl.as_ptr(), session.as_ptr()) };
    check(result, "the session to resume")
}

/// Whether `session` may be offered once only (a TLS 1.3 ticket: offering
/// it twice would let the origin link the two connections by it, and
/// servers may refuse a ticket seen before).
pub fn single_use(session: &SslSessionRef) -> bool {
    // SAFETY: `session` is a live SSL_SESSION*; the call only reads it.
    unsafe { boring_sys::SSL_SESSION_should_be_single_use(session.as_ptr()) != 0 }
}
