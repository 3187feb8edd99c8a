//! Session keys: a client may name its identity, so one identity spans the
//! requests made before any cookie exists (a login POST) and after.
//!
//! Forms: the user name of `Proxy-Authorization: Basic` as `session-KEY` or
//! `NAME-session-KEY` (what scrapers already send to commercial providers),
//! or the header `X-Pinproxy-Session: KEY`. The header wins over the user
//! name; a request inside a tunnel inherits the key of its `CONNECT`. Both
//! are removed before egress (stage 6, `proxy::egress`).
//!
//! With client authentication on (`[[auth.users]]`), `NAME-session-KEY`
//! authenticates as user NAME and names session KEY, and every session key
//! is the user's own: the same KEY named by two users is two identities.

use std::sync::{Arc, LazyLock};

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
    /// More than one `X-Pinproxy-Session` header: which session the request
    /// belongs to is the client's to say once.
    #[error("the request carries more than one X-Pinproxy-Session header; send one")]
    Repeated,
    /// `Proxy-Authorization: Basic` whose token is not base64, or whose
    /// user name is not UTF-8: it may name a session key nobody can read.
    #[error("the Proxy-Authorization header's Basic credentials are not base64 of a UTF-8 user name, so pinproxy cannot tell which session they name")]
    Unreadable,
}

/// The user name and password of a `Proxy-Authorization: Basic` value.
/// `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Basic {
    /// The user name (`NAME`, `session-KEY` or `NAME-session-KEY`).
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Basic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Basic({:?}, <redacted>)", self.user_part())
    }
}

impl Basic {
    /// Decodes a `Proxy-Authorization` value; `None` unless it is Basic
    /// credentials in base64 of UTF-8 `user:password`.
    pub fn decode(value: &HeaderValue) -> Option<Basic> {
        let text = value.to_str().ok()?;
        let (scheme, token) = text.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':').unwrap_or((text.as_str(), ""));
        Some(Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The user the user name names (`NAME` of `NAME` or
    /// `NAME-session-KEY`; none for `session-KEY`).
    pub fn user_part(&self) -> Option<&str> {
        split_user_name(&self.user).0
    }

    /// The session key the user name names, unchecked.
    pub fn session_part(&self) -> Option<&str> {
        split_user_name(&self.user).1
    }
}

/// Splits a Basic user name into the user it names and the session key:
/// `session-KEY` → (none, KEY), `NAME-session-KEY` → (NAME, KEY), `NAME` →
/// (NAME, none).
pub fn split_user_name(user: &str) -> (Option<&str>, Option<&str>) {
    if let Some(key) = user.strip_prefix("session-") {
        return (None, Some(key));
    }
    match user.split_once("-session-") {
        Some((name, key)) => (Some(name), Some(key)),
        None => (Some(user), None),
    }
}

/// The session key in a `Proxy-Authorization` value, if its user name has
/// one. Anything else (other schemes, other user names) is not a session key.
/// Only the user name is read: a password in another encoding (`curl -U`
/// with a Latin-1 one) is not pinproxy's business here. A token that is not
/// base64, or a user name that is not UTF-8, is refused rather than read
/// as naming no session: the request would rotate away from its session's
/// exit.
pub fn from_proxy_authorization(value: &HeaderValue) -> Result<Option<String>, SessionKeyError> {
    let Some(user) = basic_user(value)? else {
        return Ok(None);
    };
    match split_user_name(&user).1 {
        Some(key) => validate(key).map(Some),
        None => Ok(None),
    }
}

/// The user name of `Basic` credentials; `None` for another scheme.
fn basic_user(value: &HeaderValue) -> Result<Option<String>, SessionKeyError> {
    let mut words = value
        .as_bytes()
        .split(u8::is_ascii_whitespace)
        .filter(|word| !word.is_empty());
    match words.next() {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"basic") => {}
        _ => return Ok(None),
    }
    let token = words.next().unwrap_or_default();
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
    ];
    let decoded = engines
        .iter()
        .find_map(|engine| engine.decode(token).ok())
        .ok_or(SessionKeyError::Unreadable)?;
    let user = decoded.split(|b| *b == b':').next().unwrap_or_default();
    let user = std::str::from_utf8(user).map_err(|_| SessionKeyError::Unreadable)?;
    Ok(Some(user.to_owned()))
}

fn validate(key: &str) -> Result<String, SessionKeyError> {
    if key.is_empty() || key.len() > MAX_SESSION_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SessionKeyError::Malformed);
    }
    Ok(key.to_owned())
}

/// The session key a request names itself: its `X-Pinproxy-Session`
/// header, else its own `Proxy-Authorization` (a request inside a tunnel
/// that names none has its tunnel's: `proxy::target::Tunnel::session_key`).
pub fn of_request(headers: &HeaderMap) -> Result<Option<String>, SessionKeyError> {
    let named = super::holds_custom(headers, &X_PINPROXY_SESSION)
        .then(|| {
            let mut values = headers.get_all(&X_PINPROXY_SESSION).iter();
            values.next().map(|first| (first, values.next().is_some()))
        })
        .flatten();
    if let Some((value, repeated)) = named {
        if repeated {
            return Err(SessionKeyError::Repeated);
        }
        let text = value.to_str().map_err(|_| SessionKeyError::Malformed)?;
        return validate(text.trim()).map(Some);
    }
    match headers.get(http::header::PROXY_AUTHORIZATION) {
        Some(value) => from_proxy_authorization(value),
        None => Ok(None),
    }
}

/// The credential a session key pins. With client authentication the key
/// is `user`'s own (user names hold no `:`, so `user:key` is unambiguous);
/// without, keys are shared by every client, as before authentication
/// existed, so their pins stay valid.
pub fn credential(hasher: &PinHasher, user: Option<&str>, key: &str) -> Credential {
    let key = match user {
        Some(user) => hasher.session_key(&format!("{user}:{key}")),
        None => hasher.session_key(key),
    };
    Credential {
        kind: PinKind::SessionKey,
        name: SESSION_KEY_NAME.clone(),
        key,
    }
}

/// The name every session key's credential carries, shared.
static SESSION_KEY_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("session-key"));

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
        // Basic credentials nobody can read might name a session.
        let encoded = |bytes: &[u8]| {
            let token = base64::engine::general_purpose::STANDARD.encode(bytes);
            HeaderValue::from_str(&format!("Basic {token}")).unwrap()
        };
        assert_eq!(
            from_proxy_authorization(&encoded(b"session-\xff:x")),
            Err(SessionKeyError::Unreadable)
        );
        assert_eq!(
            from_proxy_authorization(&HeaderValue::from_static("basic !!!")),
            Err(SessionKeyError::Unreadable)
        );
        // The password is not read: any encoding will do.
        assert_eq!(
            from_proxy_authorization(&encoded(b"session-k:p\xe4ss")),
            Ok(Some("k".into()))
        );
        // Unpadded base64, and a tab after the scheme.
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode("session-k2:x");
        let unpadded = HeaderValue::from_str(&format!("Basic\t{unpadded}")).unwrap();
        assert_eq!(from_proxy_authorization(&unpadded), Ok(Some("k2".into())));
    }

    #[test]
    fn basic_credentials_split_into_user_and_session() {
        let b = Basic::decode(&basic("alice-session-k1:p:w")).unwrap();
        assert_eq!(
            (b.user_part(), b.session_part()),
            (Some("alice"), Some("k1"))
        );
        assert_eq!(b.password, "p:w");
        assert!(!format!("{b:?}").contains("p:w"));
        let b = Basic::decode(&basic("alice:pw")).unwrap();
        assert_eq!((b.user_part(), b.session_part()), (Some("alice"), None));
        let b = Basic::decode(&basic("session-k:")).unwrap();
        assert_eq!((b.user_part(), b.session_part()), (None, Some("k")));
        assert!(Basic::decode(&HeaderValue::from_static("Basic !!!")).is_none());
        assert!(Basic::decode(&HeaderValue::from_static("Digest x")).is_none());
        let lower = HeaderValue::from_str(&format!(
            "basic {}",
            base64::engine::general_purpose::STANDARD.encode("u:p")
        ))
        .unwrap();
        assert_eq!(Basic::decode(&lower).unwrap().user, "u");
    }

    #[test]
    fn a_users_session_keys_are_its_own() {
        let hasher = PinHasher::new([7; 32]);
        let shared = credential(&hasher, None, "k").key;
        let alice = credential(&hasher, Some("alice"), "k").key;
        let bob = credential(&hasher, Some("bob"), "k").key;
        assert_ne!(alice, bob);
        assert_ne!(alice, shared);
    }

    #[test]
    fn header_wins_then_own_auth() {
        let mut h = HeaderMap::new();
        assert_eq!(of_request(&h).unwrap(), None);
        h.insert(http::header::PROXY_AUTHORIZATION, basic("session-auth:x"));
        assert_eq!(of_request(&h).unwrap(), Some("auth".into()));
        h.insert(&X_PINPROXY_SESSION, HeaderValue::from_static(" hdr "));
        assert_eq!(of_request(&h).unwrap(), Some("hdr".into()));
        h.insert(&X_PINPROXY_SESSION, HeaderValue::from_static(""));
        assert!(of_request(&h).is_err());
        h.insert(&X_PINPROXY_SESSION, HeaderValue::from_static("one"));
        h.append(&X_PINPROXY_SESSION, HeaderValue::from_static("two"));
        assert!(matches!(of_request(&h), Err(SessionKeyError::Repeated)));
    }
}
