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
//! [`cookies::CookieMemo`] holds a copy of its last request's `Cookie`
//! fields, which nothing outside this stage can read, print or store); a
//! header that cannot be read fails the request (it might hide a tracked
//! cookie), it is never skipped. Nothing is changed on the request here.

pub mod cookies;
pub mod session_key;

use http::{HeaderMap, HeaderName};

use super::ProxyError;
use crate::credential::{Credential, PinHasher};
use cookies::{CookieMemo, CookiePolicy};

/// The credentials of a request: its session key first (the credential
/// of its tunnel's, `tunnel_key`, made at the tunnel's CONNECT, unless the
/// request names its own; `user`'s own when client authentication names
/// one), then its tracked cookies in the order
/// first seen (through the connection's `memo` when it has one).
pub fn of_request(
    headers: &HeaderMap,
    tunnel_key: Option<&Credential>,
    user: Option<&str>,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    memo: Option<&CookieMemo>,
) -> Result<Vec<Credential>, ProxyError> {
    let key = match session_key::of_request(headers)? {
        Some(own) => Some(session_key::credential(hasher, user, &own)),
        None => tunnel_key.cloned(),
    };
    // One vector for all: the session key goes in front of the cookies'.
    let mut credentials = cookies::tracked_in_request_with(headers, policy, hasher, memo)?;
    if let Some(key) = key {
        credentials.insert(0, key);
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

/// Maps with more names than this are asked by hash (see [`holds_custom`]).
const SCAN_NAMES_UP_TO: usize = 64;

/// Whether `headers` holds `name`, one the `http` crate has no constant for
/// (`X-Pinproxy-Session`, DataDome's carriers). Asking the map hashes such a
/// name byte by byte, about 250 instructions for one of these, on every
/// request or response, nearly all of which hold none of them; comparing
/// it with a message's few dozen names costs a fraction of that. A name the
/// crate knows differs from it in its kind alone, without its text being
/// looked up; another is compared by length first.
pub(crate) fn holds_custom(headers: &HeaderMap, name: &HeaderName) -> bool {
    holds_any_custom(headers, std::slice::from_ref(name))
}

/// Whether `headers` holds any of `names` ([`holds_custom`]'s kind), in
/// one look over its names.
pub(crate) fn holds_any_custom(headers: &HeaderMap, names: &[HeaderName]) -> bool {
    if headers.keys_len() > SCAN_NAMES_UP_TO {
        return names.iter().any(|name| headers.contains_key(name));
    }
    headers.keys().any(|held| names.contains(held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_requests_own_key_wins_over_its_tunnels() {
        let (policy, hasher) = (
            CookiePolicy::with_extra(&[]).unwrap(),
            PinHasher::new([7; 32]),
        );
        // What a tunnel whose CONNECT named key `t` holds, for `user`.
        let tunnel = |user: Option<&str>| session_key::credential(&hasher, user, "t");
        let read = |headers: &HeaderMap, user: Option<&str>| {
            of_request(headers, Some(&tunnel(user)), user, &policy, &hasher, None).unwrap()
        };
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, HeaderValue::from_static("datadome=v"));
        for user in [None, Some("alice")] {
            let found = read(&headers, user);
            assert_eq!(found.len(), 2);
            assert_eq!(found[0], session_key::credential(&hasher, user, "t"));
        }
        // The request's own `Proxy-Authorization` names a session: it wins;
        // one that names none leaves the tunnel's.
        let basic = |user_pass: &str| {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(user_pass);
            HeaderValue::from_str(&format!("Basic {token}")).unwrap()
        };
        headers.insert(http::header::PROXY_AUTHORIZATION, basic("bob:pw"));
        assert_eq!(
            read(&headers, None)[0],
            session_key::credential(&hasher, None, "t")
        );
        headers.insert(http::header::PROXY_AUTHORIZATION, basic("session-auth:pw"));
        assert_eq!(
            read(&headers, None)[0],
            session_key::credential(&hasher, None, "auth")
        );
        // `X-Pinproxy-Session` wins over both.
        headers.insert(
            &session_key::X_PINPROXY_SESSION,
            HeaderValue::from_static("own"),
        );
        let found = read(&headers, Some("alice"));
        assert_eq!(
            found[0],
            session_key::credential(&hasher, Some("alice"), "own")
        );
        assert_eq!(found.len(), 2);
        // A key that cannot be used fails the request, tunnel or not, and
        // is what the request is refused for when a cookie cannot be read
        // either.
        headers.insert(
            &session_key::X_PINPROXY_SESSION,
            HeaderValue::from_static(""),
        );
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("a=1, datadome=v"),
        );
        let refused = of_request(&headers, Some(&tunnel(None)), None, &policy, &hasher, None);
        assert!(
            matches!(refused, Err(ProxyError::SessionKey(_))),
            "{refused:?}"
        );
    }

    #[test]
    fn a_custom_name_is_found_by_scan_and_by_hash_alike() {
        let wanted = HeaderName::from_static("x-pinproxy-session");
        // Same length, other name; a standard name; then the one wanted.
        let mut headers = HeaderMap::new();
        for name in ["x-pinproxy-sessiom", "user-agent", "sec-ch-ua"] {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static("v"));
        }
        assert!(!holds_custom(&headers, &wanted));
        headers.append(wanted.clone(), HeaderValue::from_static("k"));
        assert!(holds_custom(&headers, &wanted));

        // Past the scan's limit, the map is asked instead, with the same answer.
        let mut many = HeaderMap::new();
        for i in 0..=SCAN_NAMES_UP_TO {
            let name = HeaderName::from_bytes(format!("x-filler-{i}").as_bytes());
            many.append(
                name.unwrap_or(HeaderName::from_static("x-filler")),
                HeaderValue::from_static("v"),
            );
        }
        assert!(many.keys_len() > SCAN_NAMES_UP_TO);
        assert!(!holds_custom(&many, &wanted));
        many.append(wanted.clone(), HeaderValue::from_static("k"));
        assert!(holds_custom(&many, &wanted));
    }
}
