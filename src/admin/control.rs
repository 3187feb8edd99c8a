//! Operating a running daemon from the admin endpoint: the routes that
//! change something, and readiness.
//!
//! - `POST /reload`: re-read the configuration (the same file and flags the
//!   daemon started from) and apply it; 400 with the reason when it does not
//!   validate (the configuration in force stays);
//! - `POST /exits/ID/drain`, `POST /exits/ID/undrain`: stop (or resume)
//!   new identities and rotated traffic on an exit; its identities carry on;
//! - `DELETE /identities/ID`, `DELETE /pins/NAME%23HASH`: retire an
//!   identity by hand (reason `evicted`), the second one by a credential it
//!   holds (`NAME#HASH` as `/identities` shows it, `#` written `%23`);
//! - `GET /readyz`: 200 when the pin store answers and some exit is healthy
//!   and not drained, else 503 with the reason.
//!
//! Changes are POST or DELETE only, and a request a browser sent from
//! another site (its `Origin` is not this endpoint) is refused, so a web
//! page cannot drive them through the operator's browser.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::{json, text, Admin};
use crate::body::Body;
use crate::credential::PinKey;
use crate::exits::drain::DrainBook;
use crate::identity::{IdentityId, RetireReason};
use crate::store::{Listing, PinStore as _};

/// How long readiness waits for the pin store to answer.
const STORE_CHECK: Duration = Duration::from_secs(2);

/// Re-reads the configuration and applies it; the error says why the new
/// configuration was refused.
pub type Reload = Arc<dyn Fn() -> BoxFuture<'static, Result<ReloadReport, String>> + Send + Sync>;

/// What the operations routes need beyond the listings.
pub struct Control {
    /// `POST /reload`.
    pub reload: Reload,
    /// Where drained exits are remembered across restarts.
    pub drains: Arc<DrainBook>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// What a reload changed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadReport {
    /// Exits added.
    pub added: Vec<String>,
    /// Exits removed (their identities retire, `exit-removed`; on a shared
    /// Redis store they are refused here, `exit-missing`, and left alive).
    pub removed: Vec<String>,
    /// Exits whose URL or options changed.
    pub changed: Vec<String>,
    /// Keys whose new value needs a restart (kept as they were).
    pub restart_needed: Vec<&'static str>,
}

/// An identity retired by hand, as answered.
#[derive(Debug, Serialize)]
struct Evicted {
    identity: String,
    exit: String,
    reason: &'static str,
    credentials: Vec<String>,
}

/// Answers the operations routes; `None` for any other request.
pub(super) async fn handle<B>(admin: &Admin, request: &Request<B>) -> Option<Response<Body>> {
    let path = request.uri().path();
    let method = request.method();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (allowed, route) = match segments.as_slice() {
        ["readyz"] => (Method::GET, Route::Ready),
        ["reload"] => (Method::POST, Route::Reload),
        ["exits", id, "drain"] => (Method::POST, Route::Drain(id, true)),
        ["exits", id, "undrain"] => (Method::POST, Route::Drain(id, false)),
        ["identities", id] => (Method::DELETE, Route::EvictIdentity(id)),
        ["pins", credential] => (Method::DELETE, Route::EvictPin(credential)),
        _ => return None,
    };
    if method != allowed {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path}: {allowed} only\n"),
        );
        if let Ok(value) = http::HeaderValue::from_str(allowed.as_str()) {
            response.headers_mut().insert(http::header::ALLOW, value);
        }
        return Some(response);
    }
    if method != Method::GET {
        if let Some(refused) = cross_site(request) {
            return Some(refused);
        }
    }
    Some(match route {
        Route::Ready => ready(admin).await,
        Route::Reload => match (admin.control.reload)().await {
            Ok(report) => json(&report),
            Err(reason) => text(
                StatusCode::BAD_REQUEST,
                format!("reload refused, the configuration in force stays: {reason}\n"),
            ),
        },
        Route::Drain(id, drained) => drain(admin, id, drained).await,
        Route::EvictIdentity(id) => evict_identity(admin, id).await,
        Route::EvictPin(credential) => evict_pin(admin, credential).await,
    })
}

enum Route<'a> {
    Ready,
    Reload,
    Drain(&'a str, bool),
    EvictIdentity(&'a str),
    EvictPin(&'a str),
}

/// Whether `host` (a `Host` header: a name, and a port unless it is the
/// scheme's, as a browser sends `Host: 127.0.0.1` to an endpoint on port
/// 80) names this machine's loopback: `localhost` or a loopback address.
fn names_loopback(host: &str) -> bool {
    // A `Host` with user information is no browser's; `Authority` would
    // read past it.
    if host.contains('@') {
        return false;
    }
    let Ok(authority) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    // What follows the host (`Authority` takes any text after a colon),
    // empty or a port.
    let after = host.get(authority.host().len()..).unwrap_or_default();
    if let Some(port) = after.strip_prefix(':') {
        if port.parse::<u16>().is_err() {
            return false;
        }
    } else if !after.is_empty() {
        return false;
    }
    // Brackets hold an IPv6 address, nothing else.
    let hostname = match authority.host().strip_prefix('[') {
        Some(inner) => match inner.strip_suffix(']') {
            Some(address) if address.parse::<std::net::Ipv6Addr>().is_ok() => address,
            _ => return false,
        },
        None => authority.host(),
    };
    hostname.eq_ignore_ascii_case("localhost")
        || hostname
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// On an endpoint that listens on loopback, refuses a request whose `Host`
/// names something else: a page whose name was rebound to 127.0.0.1 (DNS
/// rebinding) would otherwise read the listings a browser on this machine
/// can reach. A request without `Host` (not a browser's) passes.
pub(super) fn foreign_host<B>(request: &Request<B>) -> Option<Response<Body>> {
    // What another site's page makes a browser send on its own (an
    // `<img>` or an `<iframe>` pointed at a listing, say, dozens of them):
    // nothing it could read, but a walk of the store each. Following a
    // link to the endpoint (a top-level navigation) is the user's doing.
    let header = |name: &str| request.headers().get(name).map(|v| v.as_bytes());
    if header("sec-fetch-site") == Some(b"cross-site")
        && (header("sec-fetch-mode") != Some(b"navigate")
            || header("sec-fetch-dest").is_some_and(|dest| dest != b"document"))
    {
        return Some(text(
            StatusCode::FORBIDDEN,
            "this admin endpoint answers no request another site's page makes\n".into(),
        ));
    }
    let host = request.headers().get(http::header::HOST)?;
    if host.to_str().is_ok_and(names_loopback) {
        return None;
    }
    Some(text(
        StatusCode::FORBIDDEN,
        "this admin endpoint answers only requests addressed to it by a loopback address or \
         localhost (the Host header names another host: a DNS-rebound page?)\n"
            .into(),
    ))
}

/// Refuses a change a browser sent on behalf of another site: a request
/// with an `Origin` must come from this endpoint itself, named by a
/// loopback address or `localhost` (a DNS-rebound name is refused too).
fn cross_site<B>(request: &Request<B>) -> Option<Response<Body>> {
    let origin = request.headers().get(http::header::ORIGIN)?;
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if names_loopback(host) && origin.to_str().ok() == Some(format!("http://{host}").as_str()) {
        return None;
    }
    Some(text(
        StatusCode::FORBIDDEN,
        "changes are refused from another site's page (Origin does not match this endpoint)\n"
            .into(),
    ))
}

/// `GET /readyz`.
async fn ready(admin: &Admin) -> Response<Body> {
    let store = admin.router.store();
    let answers = match store.unavailable_because() {
        None => match tokio::time::timeout(STORE_CHECK, store.answers()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {STORE_CHECK:?}")),
        },
        Some(why) => Err(why),
    };
    if let Err(why) = answers {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the pin store ({}): {why}\n", store.kind()),
        );
    }
    let exits = admin.exits.load();
    if !exits.any_ready() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no exit is healthy and undrained ({})\n",
                exits.unavailable()
            ),
        );
    }
    text(StatusCode::OK, "ready\n".into())
}

/// `POST /exits/ID/drain` and `/undrain`.
async fn drain(admin: &Admin, id: &str, drained: bool) -> Response<Body> {
    let exits = admin.exits.load();
    let Some(exit) = exits.iter().find(|e| e.id().as_str() == id) else {
        return not_found(format!("no exit {id:?} is configured"));
    };
    if exit.set_drained(drained) {
        let verb = if drained { "drained" } else { "undrained" };
        tracing::warn!(exit = %exit.id(), "exit {verb} by the operator");
    }
    // Applied here whatever the book says; the answer says whether a
    // restart will remember it. (Each replica drains its own exits.)
    let persisted = match admin.control.drains.write(&admin.exits).await {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(error = %e, "could not remember the drained exits; a restart will forget them");
            Some(format!(
                "applied, but not written to the data directory ({e}): a restart will forget it"
            ))
        }
    };
    let mut answer = serde_json::json!({
        "exit": exit.id().to_string(),
        "drained": exit.drained(),
        "state": exit.describe(),
        "persisted": persisted.is_none(),
    });
    if let Some(warning) = persisted {
        answer["warning"] = warning.into();
    }
    json(&answer)
}

/// `DELETE /identities/ID`.
async fn evict_identity(admin: &Admin, id: &str) -> Response<Body> {
    let Ok(id) = u64::from_str_radix(id, 16).map(IdentityId) else {
        return bad_request(format!(
            "{id:?} is not an identity id (16 hex digits, as /identities lists them)"
        ));
    };
    match find(admin, move |listing| listing.identity.id == id).await {
        Ok(found) => evict(admin, found).await,
        Err(response) => response,
    }
}

/// `DELETE /pins/NAME%23HASH`: the identity holding that credential.
async fn evict_pin(admin: &Admin, credential: &str) -> Response<Body> {
    let decoded = percent_encoding::percent_decode_str(credential).decode_utf8_lossy();
    let Some((name, hash)) = decoded
        .rsplit_once('#')
        .filter(|(name, hash)| !name.is_empty() && (8..=32).contains(&hash.len()))
        .filter(|(_, hash)| hash.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return bad_request(format!(
            "{decoded:?}: expected NAME#HASH as /identities lists credentials (at least 8 hex \
             digits of the hash), with # written %23 in the URL"
        ));
    };
    let hash = hash.to_ascii_lowercase();
    let holds = {
        let (name, hash) = (name.to_owned(), hash.clone());
        move |listing: &Listing| {
            listing
                .pins
                .iter()
                .any(|(key, pin)| *pin.name == *name && key.to_hex().starts_with(&hash))
        }
    };
    if let Some(key) = full_key(&hash) {
        // The whole hash: one lookup instead of a walk over the store.
        match admin.router.store().lookup(&[key]).await {
            Ok(bindings) => match bindings.into_iter().flatten().next() {
                Some(binding) if &*binding.pin.name == name => match binding.identity {
                    Some(identity) => {
                        let id = identity.id;
                        return match find(admin, move |l| l.identity.id == id).await {
                            Ok(found) => evict(admin, found).await,
                            Err(response) => response,
                        };
                    }
                    None => return not_found(format!("{name}#{hash}'s identity is forgotten")),
                },
                _ => return not_found(format!("no credential {name}#{hash} is pinned")),
            },
            Err(e) => return unavailable(e.to_string()),
        }
    }
    match find(admin, holds).await {
        Ok(found) => evict(admin, found).await,
        Err(response) => response,
    }
}

fn full_key(hash: &str) -> Option<PinKey> {
    if hash.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hash.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(PinKey::from_bytes(bytes))
}

/// The one identity `matches` picks out of the store's listing (walked
/// whole: an operator's action, not the request path), on the blocking
/// pool: a store of a million identities takes seconds to walk, which no
/// runtime thread serving the proxy should spend.
async fn find(
    admin: &Admin,
    matches: impl Fn(&Listing) -> bool + Send + 'static,
) -> Result<Listing, Response<Body>> {
    let router = admin.router.clone();
    let runtime = tokio::runtime::Handle::current();
    let walked = admin
        .walks
        .run(move || {
            runtime.block_on(async {
                let listings = router.store().list().await?;
                Ok::<_, crate::store::StoreError>(
                    listings
                        .into_iter()
                        .filter(|l| matches(l))
                        .collect::<Vec<Listing>>(),
                )
            })
        })
        .await;
    let mut found = match walked {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Err(unavailable(e.to_string())),
        Err(e) => return Err(unavailable(e)),
    };
    match found.len() {
        0 => Err(not_found("no such identity or credential".into())),
        1 => Ok(found.remove(0)),
        _ => Err(text(
            StatusCode::CONFLICT,
            format!(
                "the hash is ambiguous: it matches identities {}; give more of it\n",
                found
                    .iter()
                    .map(|l| l.identity.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

async fn evict(admin: &Admin, listing: Listing) -> Response<Body> {
    let Listing { identity, pins } = listing;
    if let Some(retired) = &identity.retired {
        return text(
            StatusCode::CONFLICT,
            format!(
                "identity {} on exit {} is already retired: {}\n",
                identity.id, identity.exit, retired.reason
            ),
        );
    }
    let exits = admin.exits.load();
    if let Err(e) = admin
        .router
        .retire_to_the_end(exits, identity.clone(), RetireReason::Evicted)
        .await
    {
        return unavailable(format!(
            "{e}: identity {} is retired on this replica and the store is asked again in the \
             background; until it takes it, the other replicas (and this one after a restart) \
             see the identity live",
            identity.id
        ));
    }
    json(&Evicted {
        identity: identity.id.to_string(),
        exit: identity.exit.to_string(),
        reason: RetireReason::Evicted.label(),
        credentials: pins
            .iter()
            .map(|(key, pin)| format!("{}#{key}", pin.name))
            .collect(),
    })
}

fn not_found(why: String) -> Response<Body> {
    text(StatusCode::NOT_FOUND, format!("{why}\n"))
}

fn bad_request(why: String) -> Response<Body> {
    text(StatusCode::BAD_REQUEST, format!("{why}\n"))
}

fn unavailable(why: String) -> Response<Body> {
    text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_hash_is_a_key() {
        let key = PinKey::from_bytes([0xab; 16]);
        assert_eq!(full_key(&key.to_hex()), Some(key));
        assert_eq!(full_key("abcd1234"), None);
    }

    /// Another site's page gets no answer from the endpoint but for a
    /// top-level navigation (a link the user follows): no `<img>`, no
    /// `<iframe>`, each of which would cost a listing.
    #[test]
    fn another_sites_page_gets_only_top_level_navigations() {
        let request = |mode: &str, dest: &str| {
            Request::get("/identities?all=1")
                .header("host", "127.0.0.1:8081")
                .header("sec-fetch-site", "cross-site")
                .header("sec-fetch-mode", mode)
                .header("sec-fetch-dest", dest)
                .body(())
                .unwrap()
        };
        assert!(foreign_host(&request("navigate", "document")).is_none());
        assert!(foreign_host(&request("navigate", "iframe")).is_some());
        assert!(foreign_host(&request("no-cors", "image")).is_some());
    }

    #[test]
    fn a_loopback_host_is_known_with_or_without_its_port() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:8081",
            "localhost",
            "LOCALHOST:80",
            "[::1]",
            "[::1]:8081",
        ] {
            assert!(names_loopback(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8081",
            "127.0.0.1.evil.example",
            "evil@127.0.0.1",
            "",
            "[::1",
            "10.0.0.1:80",
            "[localhost]",
            "localhost:abc",
        ] {
            assert!(!names_loopback(host), "{host}");
        }
    }

    #[test]
    fn changes_from_another_site_are_refused() {
        let request = |origin: Option<&str>, host: &str| {
            let mut builder = Request::post("/reload").header("host", host);
            if let Some(origin) = origin {
                builder = builder.header("origin", origin);
            }
            builder.body(()).unwrap()
        };
        assert!(cross_site(&request(None, "127.0.0.1:8081")).is_none());
        assert!(cross_site(&request(Some("http://127.0.0.1:8081"), "127.0.0.1:8081")).is_none());
        assert!(cross_site(&request(Some("https://evil.example"), "127.0.0.1:8081")).is_some());
        // DNS rebinding: the page and the Host agree, but the name is not local.
        assert!(cross_site(&request(
            Some("http://evil.example:8081"),
            "evil.example:8081"
        ))
        .is_some());
    }
}
