//! Pipeline stage 1, target: the origin a request names, from its
//! absolute-form target (plain proxy requests) or from the CONNECT tunnel
//! it arrived in. Nothing is changed on the request; a target pinproxy
//! cannot use is answered 400.
//!
//! Inside a tunnel the destination is always the tunnel's CONNECT target,
//! whatever the request line says: the client chose it when it opened the
//! tunnel, and the leaf certificate was minted for it.
//!
//! A target that is pinproxy itself (its proxy listener or admin endpoint,
//! by IP literal or `localhost` name) is refused with 403 `proxy-loop`
//! ([`refuse_own`]): the request would loop, or hand a client the admin
//! endpoint. Names that resolve there are refused by the direct exit after
//! resolution (`upstream::dial::guard`).

use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Uri};

use super::credentials::cookies::CookieMemo;
use super::ProxyError;
use crate::credential::Credential;
use crate::exits::scope::ExitScope;
use crate::fingerprint::ClientConnection;
use crate::metrics::site::SiteSlot;
use crate::net::{default_port, HostPort};
use crate::upstream::dial::guard::AddressGuard;
use crate::upstream::Origin;

/// Who sent a request, as client authentication (stage 0,
/// [`super::auth`]) admitted it: the user, if users are configured, and the
/// exits it may use. A plain request carries it in its extensions; a
/// tunnel's requests inherit the CONNECT's.
#[derive(Debug, Clone, Default)]
pub struct Principal {
    /// The authenticated user; `None` without client authentication.
    pub user: Option<Arc<str>>,
    /// The exits its requests may leave through.
    pub exits: ExitScope,
    /// Which gate admitted it ([`super::auth::Auth::confirm`]: a tunnel
    /// outlives a reload, its requests do not outlive its user).
    pub admitted_by: u64,
    /// Which of the user's passwords it was admitted with (an id of the
    /// configured hash).
    pub password: u64,
}

/// The CONNECT tunnel a request arrived in.
#[derive(Clone)]
pub struct Tunnel {
    /// The CONNECT target.
    pub authority: HostPort,
    /// Whether pinproxy terminated TLS in the tunnel (otherwise plain HTTP
    /// runs inside it).
    pub tls: bool,
    /// The credential of the session key named by the CONNECT
    /// (`X-Pinproxy-Session` or `Proxy-Authorization`), made once for every
    /// request inside that names none of its own; the key itself is not
    /// kept.
    pub session_key: Option<Credential>,
    /// Whether the client offered HTTP/2 in its TLS handshake (the origin
    /// is offered the same).
    pub client_offers_h2: bool,
    /// Whether the client offered pinproxy a TLS session to resume (its
    /// ClientHello carried a pre_shared_key): it is a client that resumes,
    /// so its identity's connections may too (see `upstream::Lane`).
    pub client_resumes: bool,
    /// The client's fingerprint, as read off the tunnel's first bytes.
    pub client: Arc<ClientConnection>,
    /// Who opened the tunnel (client authentication of the CONNECT).
    pub principal: Principal,
    /// The metrics site of the tunnel's host, once found.
    pub site: SiteSlot,
    /// The credentials of the tunnel's last request's `Cookie` fields
    /// (emptied when an HTTP/1.1 connection parks).
    pub cookie_memo: CookieMemo,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("authority", &self.authority)
            .field("tls", &self.tls)
            .field(
                "session_key",
                &self.session_key.as_ref().map(|_| "<redacted>"),
            )
            .field("client_offers_h2", &self.client_offers_h2)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

/// The origin a request is for.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Origin host and port.
    pub origin: HostPort,
    /// Path and query to request.
    pub path_and_query: PathAndQuery,
}

impl Target {
    /// Works out the origin of `request`, arriving in `tunnel` (if any).
    pub fn of<B>(request: &Request<B>, tunnel: Option<&Tunnel>) -> Result<Target, ProxyError> {
        let uri = request.uri();
        let path_and_query = match uri.path_and_query() {
            Some(p) if p.as_str().starts_with('/') => p.clone(),
            // The server as a whole (RFC 9110 §9.3.7), not the resource `/`.
            // (An absolute-form `OPTIONS http://a.test`, which a proxy
            // should forward as `*` too, goes as `/`: the http crate reads
            // it as `http://a.test/`.)
            Some(p) if request.method() == http::Method::OPTIONS && p.as_str() == "*" => p.clone(),
            // `http://a.test?x=1`: the empty path is `/`, and the query
            // stays (RFC 9112 §3.2.1).
            Some(p) if p.as_str().starts_with('?') => {
                PathAndQuery::try_from(format!("/{}", p.as_str()))
                    .map_err(|_| ProxyError::BadRequest("the request target's query".into()))?
            }
            _ => PathAndQuery::from_static("/"),
        };
        if let Some(tunnel) = tunnel {
            return Ok(Target {
                scheme: if tunnel.tls {
                    Scheme::HTTPS
                } else {
                    Scheme::HTTP
                },
                origin: tunnel.authority.clone(),
                path_and_query,
            });
        }
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            Some(s) => {
                return Err(ProxyError::BadRequest(format!(
                    "unsupported scheme {s:?} in the request target"
                )))
            }
            None => {
                // Not quoted: a path and query may carry a token, and the
                // error is logged (at debug).
                return Err(ProxyError::BadRequest(
                    "a target without a host (GET /path) is not a proxy request: pinproxy is a \
                     forward proxy and needs absolute-form targets (GET http://host/path) or \
                     CONNECT"
                        .into(),
                ));
            }
        };
        let origin = HostPort::from_uri(uri, default_port(scheme == Scheme::HTTPS))
            .map_err(|e| ProxyError::BadRequest(format!("the request target: {e}")))?;
        Ok(Target {
            scheme,
            origin,
            path_and_query,
        })
    }

    /// The origin the upstream pool is asked for.
    pub fn upstream_origin(&self) -> Origin {
        Origin {
            https: self.scheme == Scheme::HTTPS,
            target: self.origin.clone(),
        }
    }

    /// The `Host` header for this origin (port omitted when default).
    pub fn host_header(&self) -> Result<HeaderValue, ProxyError> {
        let text = self.authority();
        HeaderValue::from_str(&text)
            .map_err(|_| ProxyError::BadRequest(format!("invalid host {text:?}")))
    }
}

impl Target {
    /// The origin's authority, its port left out when it is the scheme's
    /// default.
    fn authority(&self) -> String {
        self.origin
            .authority(default_port(self.scheme == Scheme::HTTPS))
    }
}

/// Refuses `origin` when it is pinproxy's own proxy listener or admin
/// endpoint (an IP literal or a `localhost` name; see [`AddressGuard`]).
pub fn refuse_own(origin: &HostPort, guard: &AddressGuard) -> Result<(), ProxyError> {
    match guard.own_target(&origin.host, origin.port) {
        Some(listener) => Err(ProxyError::Loop {
            target: origin.clone(),
            listener,
        }),
        None => Ok(()),
    }
}

/// Parses a CONNECT request's authority-form target (`host:port`).
pub fn connect_authority(uri: &Uri) -> Result<HostPort, ProxyError> {
    let bad = || ProxyError::BadRequest(format!("CONNECT needs a host:port target, not {uri:?}"));
    let authority = uri.authority().ok_or_else(bad)?;
    if uri.scheme().is_some() {
        return Err(bad());
    }
    // The same parser as every other host:port, so a text the URI grammar
    // lets through (`4[::1]:844`) cannot become a host nothing else accepts.
    HostPort::parse(authority.as_str()).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    /// A TLS tunnel to `host:port`, its client offering HTTP/1.1 only.
    fn tunnel_to(host: &str, port: u16) -> Tunnel {
        Tunnel {
            authority: HostPort::new(host, port),
            tls: true,
            session_key: None,
            client_offers_h2: false,
            client_resumes: false,
            client: Arc::default(),
            principal: Principal::default(),
            site: SiteSlot::default(),
            cookie_memo: CookieMemo::default(),
        }
    }

    #[test]
    fn absolute_form_targets() {
        let t = Target::of(&req("http://Example.com/a?b=1"), None).unwrap();
        assert_eq!(t.origin.to_string(), "Example.com:80");
        assert_eq!(
            t.upstream_origin(),
            Origin {
                https: false,
                target: HostPort::new("Example.com", 80)
            }
        );
        assert_eq!(t.path_and_query, "/a?b=1");
        assert_eq!(t.host_header().unwrap(), "Example.com");
        let t = Target::of(&req("http://example.com?b=1"), None).unwrap();
        assert_eq!(
            t.path_and_query, "/?b=1",
            "a query without a path keeps its query"
        );
        let t = Target::of(&req("https://[::1]:8443/"), None).unwrap();
        assert_eq!(&*t.origin.host, "::1");
        assert_eq!(t.host_header().unwrap(), "[::1]:8443");
    }

    /// `OPTIONS *` asks about the server as a whole: it goes on as `*`,
    /// never as `/` (a resource of its own).
    #[test]
    fn options_for_the_whole_server_goes_on_as_an_asterisk() {
        let options = |uri: &str| Request::options(uri).body(()).unwrap();
        let tunnel = tunnel_to("a.test", 443);
        let t = Target::of(&options("*"), Some(&tunnel)).unwrap();
        assert_eq!(t.path_and_query, "*");
        assert_eq!(Uri::from(t.path_and_query).to_string(), "*");
        let t = Target::of(&options("/x"), Some(&tunnel)).unwrap();
        assert_eq!(t.path_and_query, "/x");
    }

    #[test]
    fn origin_form_outside_a_tunnel_is_refused() {
        assert!(Target::of(&req("/path"), None).is_err());
        assert!(Target::of(&req("ftp://x/"), None).is_err());
    }

    #[test]
    fn tunnel_decides_the_origin() {
        let tunnel = tunnel_to("a.test", 443);
        let t = Target::of(&req("/x"), Some(&tunnel)).unwrap();
        let origin = t.upstream_origin();
        assert!(origin.https);
        assert_eq!(origin.target.to_string(), "a.test:443");
        assert_eq!(t.path_and_query, "/x");
    }

    #[test]
    fn connect_targets() {
        let ok = |s: &str| connect_authority(&s.parse().unwrap());
        assert_eq!(ok("a.test:443").unwrap().to_string(), "a.test:443");
        assert_eq!(&*ok("[::1]:443").unwrap().host, "::1");
        assert!(ok("a.test").is_err());
        assert!(ok("a.test:0").is_err());
        assert!(ok("u@a.test:443").is_err());
        // Found by the `hosts` fuzz target: the URI grammar accepts it.
        assert!(ok("4[::1]:844").is_err());
    }

    #[test]
    fn own_listeners_are_refused() {
        let guard = AddressGuard::default();
        guard.set_proxy("127.0.0.1:8080".parse().unwrap());
        let own = HostPort::new("localhost", 8080);
        let error = refuse_own(&own, &guard).unwrap_err();
        assert_eq!(error.code(), "proxy-loop");
        assert_eq!(error.status(), http::StatusCode::FORBIDDEN);
        assert!(refuse_own(&HostPort::new("localhost", 8443), &guard).is_ok());
    }
}
