//! Pipeline stage 3, credentials: what on a request says which identity it
//! belongs to, turned into pin keys at once.
//!
//! - [`session_key`]: the identity a client named (`X-Pinproxy-Session`, or
//!   the user name of `Proxy-Authorization`, on the request or on its
//!   tunnel's CONNECT);
//! - [`cookies`]: the tracked anti-bot cookies of every `Cookie` header and
//!   DataDome's `X-DataDome-ClientID` carrier.
//!
//! Invariant: raw values never leave this stage (a tunnel's
//! [`cookies::CookieMemo`] holds a copy of its last `Cookie` header while
//! its connection is busy, which nothing outside this stage can read, print
//! or store); a header that cannot be read fails the request (it might hide
//! a tracked cookie), it is never skipped. Nothing is changed on the
//! request here.

pub mod cookies;
pub mod session_key;

use http::HeaderMap;

use super::ProxyError;
use crate::credential::{Credential, PinHasher};
use cookies::{CookieMemo, CookiePolicy};

/// The credentials of a request: its session key first (the tunnel's,
/// `tunnel_key`, unless the request names its own; `user`'s own when
/// client authentication names one), then its tracked cookies in the order
/// first seen (through the connection's `memo` when it has one).
pub fn of_request(
    headers: &HeaderMap,
    tunnel_key: Option<&str>,
    user: Option<&str>,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    memo: Option<&CookieMemo>,
) -> Result<Vec<Credential>, ProxyError> {
    let key = session_key::of_request(headers, tunnel_key)?;
    // One vector for all: the session key goes in front of the cookies'.
    let mut credentials = cookies::tracked_in_request_with(headers, policy, hasher, memo)?;
    if let Some(key) = key {
        credentials.insert(0, session_key::credential(hasher, user, &key));
    }
    Ok(credentials)
}

/// The credentials of a CONNECT that pinproxy does not open (passthrough):
/// only the session key it names (`user`'s own, as for requests), since
/// nothing inside can be read.
pub fn of_connect(
    session_key: Option<&str>,
    user: Option<&str>,
    hasher: &PinHasher,
) -> Vec<Credential> {
    session_key
        .map(|key| session_key::credential(hasher, user, key))
        .into_iter()
        .collect()
}
