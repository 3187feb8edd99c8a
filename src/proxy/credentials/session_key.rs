//! Session keys: a client may name its identity, so one identity spans the
//! requests made before any cookie exists (a login POST) and after.
//!
//! Forms: the user name of `Proxy-Authorization: Basic` as `session-KEY` or
//! `NAME-session-KEY` (what scrapers already send to commercial providers),
//! or the header `X-Pinproxy-Session: KEY`. The header wins over the user
//! name; a request inside a tunnel inherits the key of its `CONNECT`. Both
//! are removed before egress (stage 6, `proxy::egress`).

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::credential::{Credential, PinHasher, PinKind};

/// The request header naming a session key.
pub static X_PINPROXY_SESSION: HeaderName = HeaderName::from_static("x-pinproxy-session");

/// Longest session key accepted.
pub const MAX_SESSION_KEY: usize = 256;

/// A session key that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionKeyError {
    /// Empty, too long, or not visible ASCII.
    #[error("the session key must be 1-{MAX_SESSION_KEY} visible ASCII characters")]
    Malformed,
}

/// The session key in a `Proxy-Authorization` value, if its user name has
/// one. Anything else (other schemes, other user names) is not a session key.
pub fn from_proxy_authorization(value: &HeaderValue) -> Result<Option<String>, SessionKeyError> {
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Basic ")) else {
        return Ok(None);
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(token.trim()) else {
        return Ok(None);
    };
    let Ok(text) = String::from_utf8(decoded) else {
        return Ok(None);
    };
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    let key = match user.strip_prefix("session-") {
        Some(key) => key,
        None => match user.split_once("-session-") {
            Some((_, key)) => key,
            None => return Ok(None),
        },
    };
    validate(key).map(Some)
}

fn validate(key: &str) -> Result<String, SessionKeyError> {
    if key.is_empty() || key.len() > MAX_SESSION_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SessionKeyError::Malformed);
    }
    Ok(key.to_owned())
}

/// The session key of a request: its `X-Pinproxy-Session` header, else its
/// own `Proxy-Authorization`, else the one its tunnel was opened with.
pub fn of_request(
    headers: &HeaderMap,
    tunnel_key: Option<&str>,
) -> Result<Option<String>, SessionKeyError> {
    if let Some(value) = headers.get(&X_PINPROXY_SESSION) {
        let text = value.to_str().map_err(|_| SessionKeyError::Malformed)?;
        return validate(text.trim()).map(Some);
    }
    if let Some(value) = headers.get(http::header::PROXY_AUTHORIZATION) {
        if let Some(key) = from_proxy_authorization(value)? {
            return Ok(Some(key));
        }
    }
    Ok(tunnel_key.map(str::to_owned))
}

/// The credential a session key pins.
pub fn credential(hasher: &PinHasher, key: &str) -> Credential {
    Credential {
        kind: PinKind::SessionKey,
        name: "session-key".to_owned(),
        key: hasher.session_key(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD.encode(user_pass);
        HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    #[test]
    fn user_name_forms() {
        assert_eq!(
            from_proxy_authorization(&basic("session-abc:x")).unwrap(),
            Some("abc".into())
        );
        assert_eq!(
            from_proxy_authorization(&basic("customer-acme-session-a-1:pw")).unwrap(),
            Some("a-1".into())
        );
        assert_eq!(from_proxy_authorization(&basic("alice:pw")).unwrap(), None);
        assert_eq!(
            from_proxy_authorization(&HeaderValue::from_static("Bearer x")).unwrap(),
            None
        );
        assert!(from_proxy_authorization(&basic("session-:pw")).is_err());
    }

    #[test]
    fn header_wins_then_own_auth_then_tunnel() {
        let mut h = HeaderMap::new();
        assert_eq!(of_request(&h, Some("t")).unwrap(), Some("t".into()));
        h.insert(http::header::PROXY_AUTHORIZATION, basic("session-auth:x"));
        assert_eq!(of_request(&h, Some("t")).unwrap(), Some("auth".into()));
        h.insert(&X_PINPROXY_SESSION, HeaderValue::from_static(" hdr "));
        assert_eq!(of_request(&h, Some("t")).unwrap(), Some("hdr".into()));
        h.insert(&X_PINPROXY_SESSION, HeaderValue::from_static(""));
        assert!(of_request(&h, None).is_err());
    }
}
