//! Exits: the upstream routes a request can leave through.
//!
//! An exit is named by a stable [`ExitId`] (pins refer to it), reached
//! according to its [`ExitKind`] and tuned by its [`ExitOptions`]. At run
//! time an [`Exit`] adds its connection pools, its [`health`] and its
//! anonymous upstream [`sessions`]; the [`ExitSet`] picks exits for traffic
//! that no pin decides ([`select`]).
//!
//! Invariant: credentials in an exit URL never appear in `Debug` or
//! `Display` output; use [`ExitSpec::redacted_url`] when showing an exit.

pub mod health;
pub mod select;
pub mod sessions;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::upstream::ExitClient;
use health::{Health, HealthState};
use sessions::AnonymousSessions;

/// The placeholder in an exit's credentials that is replaced by an
/// identity's upstream session id.
pub const SESSION_PLACEHOLDER: &str = "{session}";

/// The stable name of an exit.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitId(Arc<str>);

impl ExitId {
    /// Wraps a validated id.
    pub fn new(id: &str) -> ExitId {
        ExitId(Arc::from(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ExitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for ExitId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ExitId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ExitId, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(ExitId::new(&text))
    }
}

/// Basic credentials for an upstream proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name, percent-decoded.
    pub user: String,
    /// Password, percent-decoded.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.user)
    }
}

impl Credentials {
    /// Whether the credentials carry a `{session}` placeholder.
    pub fn has_session_placeholder(&self) -> bool {
        self.user.contains(SESSION_PLACEHOLDER) || self.password.contains(SESSION_PLACEHOLDER)
    }

    /// The credentials with `{session}` replaced by `session`.
    pub fn with_session(&self, session: &str) -> Credentials {
        Credentials {
            user: self.user.replace(SESSION_PLACEHOLDER, session),
            password: self.password.replace(SESSION_PLACEHOLDER, session),
        }
    }

    /// The `Proxy-Authorization` value for these credentials.
    pub fn basic_header(&self) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        let mut value = HeaderValue::from_str(&format!("Basic {token}"))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        value.set_sensitive(true);
        value
    }
}

/// A host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl HostPort {
    /// The host as written in a URI authority: IPv6 literals in brackets.
    pub fn bracketed_host(host: &str) -> String {
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How an exit is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Egress straight from this machine, optionally from a given local
    /// source address (`direct://` or `direct://SOURCE_IP`).
    Direct {
        /// Local address to bind outgoing connections to.
        source: Option<IpAddr>,
    },
    /// An HTTP proxy reached with CONNECT (`http://[user:pass@]host:port`).
    HttpConnect {
        /// The proxy's address.
        proxy: HostPort,
        /// Basic credentials sent as `Proxy-Authorization`.
        auth: Option<Credentials>,
    },
    /// A SOCKS5 proxy (`socks5://[user:pass@]host:port`); the exit resolves
    /// origin names itself.
    Socks5 {
        /// The proxy's address.
        proxy: HostPort,
        /// Username/password authentication (RFC 1929).
        auth: Option<Credentials>,
    },
}

impl ExitKind {
    /// The proxy's credentials, if it is a proxy and has any.
    pub fn credentials(&self) -> Option<&Credentials> {
        match self {
            ExitKind::HttpConnect { auth, .. } | ExitKind::Socks5 { auth, .. } => auth.as_ref(),
            ExitKind::Direct { .. } => None,
        }
    }
}

/// Per-exit settings beyond its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitOptions {
    /// Share of new identities and rotated traffic (1-1000).
    pub weight: u32,
    /// The provider's sticky-session window: an identity older than this
    /// (counted from its upstream session's start) is retired.
    pub sticky_ttl: Option<Duration>,
    /// CONNECT answer header in which the exit states the tunnel's egress
    /// address (e.g. `X-Exit-IP`).
    pub exit_ip_header: Option<HeaderName>,
    /// An IP-echo URL fetched through the exit to learn its egress address
    /// when it states none.
    pub ip_echo: Option<EchoTarget>,
    /// Idle timeout for identities on this exit (overrides the global one).
    pub idle_timeout: Option<Duration>,
    /// Maximum lifetime of identities on this exit (overrides the global one).
    pub max_lifetime: Option<Duration>,
    /// How many upstream sessions cookie-less traffic rotates over on an
    /// exit with a `{session}` placeholder.
    pub anonymous_sessions: usize,
    /// SOCKS5 exits: take the address in the CONNECT reply (BND.ADDR) as the
    /// tunnel's egress address (true of servers that report their outgoing
    /// socket, such as microsocks; not of NATed gateways).
    pub socks_reply_is_egress: bool,
}

impl Default for ExitOptions {
    fn default() -> Self {
        ExitOptions {
            weight: 1,
            sticky_ttl: None,
            exit_ip_header: None,
            ip_echo: None,
            idle_timeout: None,
            max_lifetime: None,
            anonymous_sessions: 8,
            socks_reply_is_egress: false,
        }
    }
}

/// Where an IP-echo probe goes: a URL answering with the caller's address
/// as its whole body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoTarget {
    /// Whether to use TLS.
    pub https: bool,
    /// Host and port.
    pub authority: HostPort,
    /// Path and query.
    pub path: String,
}

impl EchoTarget {
    /// Parses `http://host[:port]/path` or `https://...`.
    pub fn parse(url: &str) -> Result<EchoTarget, ExitUrlError> {
        let bad = || ExitUrlError::Address(format!("ip_echo must be an http(s) URL, not {url:?}"));
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        Ok(EchoTarget {
            https,
            authority: HostPort {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
                port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            },
            path: uri
                .path_and_query()
                .map_or("/".to_owned(), |p| p.to_string()),
        })
    }
}

/// A configured exit: its id, how to reach it and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitSpec {
    /// Stable id.
    pub id: ExitId,
    /// Route.
    pub kind: ExitKind,
    /// Options.
    pub options: ExitOptions,
}

/// A malformed exit URL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExitUrlError {
    /// No `scheme://`.
    #[error("expected scheme://..., e.g. http://user:pass@proxy.example:8080")]
    NoScheme,
    /// A scheme pinproxy cannot use.
    #[error("unsupported scheme {0:?}: use http://, socks5:// or direct://")]
    Scheme(String),
    /// Host or port missing or invalid.
    #[error("{0}")]
    Address(String),
}

impl ExitSpec {
    /// The exit used when none is configured: direct egress, id `direct`.
    pub fn builtin_direct() -> ExitSpec {
        ExitSpec {
            id: ExitId::new("direct"),
            kind: ExitKind::Direct { source: None },
            options: ExitOptions::default(),
        }
    }

    /// Parses an exit URL for the exit named `id`.
    pub fn parse(id: &str, url: &str) -> Result<ExitSpec, ExitUrlError> {
        let (scheme, rest) = url.split_once("://").ok_or(ExitUrlError::NoScheme)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(ExitUrlError::Address(
                "an exit URL has no path, query or fragment".into(),
            ));
        }
        // The password may itself contain '@', so the host starts after the last one.
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "http" => ExitKind::HttpConnect {
                proxy: parse_host_port(hostport)?,
                auth: userinfo.map(parse_userinfo).transpose()?,
            },
            // socks5h is curl's name for remote resolution, which pinproxy always does.
            "socks5" | "socks5h" => ExitKind::Socks5 {
                proxy: parse_host_port(hostport)?,
                auth: userinfo.map(parse_userinfo).transpose()?,
            },
            "direct" => {
                if userinfo.is_some() {
                    return Err(ExitUrlError::Address(
                        "a direct:// exit takes no credentials".into(),
                    ));
                }
                let source = if hostport.is_empty() {
                    None
                } else {
                    let ip = hostport.trim_start_matches('[').trim_end_matches(']');
                    Some(ip.parse::<IpAddr>().map_err(|_| {
                        ExitUrlError::Address(format!(
                            "direct://SOURCE_IP needs a local IP address, not {hostport:?}"
                        ))
                    })?)
                };
                ExitKind::Direct { source }
            }
            other => return Err(ExitUrlError::Scheme(other.to_owned())),
        };
        Ok(ExitSpec {
            id: ExitId::new(id),
            kind,
            options: ExitOptions::default(),
        })
    }

    /// The id a URL gets when none is given: its `host:port` (or
    /// `direct`/`direct-IP`), which stays the same when exits are reordered.
    pub fn default_id(url: &str) -> Result<String, ExitUrlError> {
        let spec = ExitSpec::parse("unnamed", url)?;
        Ok(match spec.kind {
            ExitKind::Direct { source: None } => "direct".to_owned(),
            ExitKind::Direct { source: Some(ip) } => format!("direct-{ip}"),
            ExitKind::HttpConnect { proxy, .. } | ExitKind::Socks5 { proxy, .. } => {
                proxy.to_string()
            }
        })
    }

    /// Whether the exit's credentials carry a `{session}` placeholder.
    pub fn has_session_placeholder(&self) -> bool {
        self.kind
            .credentials()
            .is_some_and(Credentials::has_session_placeholder)
    }

    /// The URL without credentials, for logs and messages.
    pub fn redacted_url(&self) -> String {
        match &self.kind {
            ExitKind::Direct { source: None } => "direct://".to_owned(),
            ExitKind::Direct { source: Some(ip) } => format!("direct://{ip}"),
            ExitKind::HttpConnect { proxy, auth } => match auth {
                Some(c) => format!("http://{}:***@{proxy}", c.user),
                None => format!("http://{proxy}"),
            },
            ExitKind::Socks5 { proxy, auth } => match auth {
                Some(c) => format!("socks5://{}:***@{proxy}", c.user),
                None => format!("socks5://{proxy}"),
            },
        }
    }
}

/// A configured exit ready for traffic.
#[derive(Debug)]
pub struct Exit {
    /// What was configured.
    pub spec: ExitSpec,
    /// The exit's connection pools.
    pub client: ExitClient,
    /// Its health.
    pub health: Health,
    /// The upstream sessions cookie-less traffic uses.
    pub sessions: AnonymousSessions,
}

impl Exit {
    /// The exit's id.
    pub fn id(&self) -> &ExitId {
        &self.spec.id
    }
}

/// All configured exits, by id and in weighted rotation.
#[derive(Debug)]
pub struct ExitSet {
    exits: Vec<Arc<Exit>>,
    by_id: HashMap<ExitId, usize>,
    rotation: select::Rotation,
    /// Without probes, unhealthy exits get one trial probe this often.
    trial_interval_ms: Option<u64>,
}

impl ExitSet {
    /// A set of exits (at least one; configuration validation ensures it).
    /// `trial_interval_ms` enables trial probes of unhealthy exits.
    pub fn new(exits: Vec<Exit>, trial_interval_ms: Option<u64>) -> ExitSet {
        let weights: Vec<u32> = exits.iter().map(|e| e.spec.options.weight).collect();
        let exits: Vec<Arc<Exit>> = exits.into_iter().map(Arc::new).collect();
        let by_id = exits
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id().clone(), i))
            .collect();
        ExitSet {
            exits,
            by_id,
            rotation: select::Rotation::new(&weights),
            trial_interval_ms,
        }
    }

    /// The exit with this id, if configured.
    pub fn get(&self, id: &ExitId) -> Option<&Arc<Exit>> {
        self.by_id.get(id).map(|&i| &self.exits[i])
    }

    /// The next exit in weighted rotation that is healthy; if none is, an
    /// unhealthy one; never a dead one. `None` when every exit is dead.
    pub fn pick(&self, now_ms: u64) -> Option<&Arc<Exit>> {
        let _ = now_ms;
        let mut fallback = None;
        for index in self.rotation.cycle() {
            let exit = &self.exits[index];
            match exit.health.state() {
                HealthState::Healthy => return Some(exit),
                HealthState::Unhealthy if fallback.is_none() => fallback = Some(exit),
                _ => {}
            }
        }
        fallback
    }

    /// An exit that is not healthy and is due for a trial (at most one per
    /// exit every trial interval; only when no probes are configured). The
    /// caller probes it in the background, towards the origin of the request
    /// at hand, so the trial never costs a client request.
    pub fn due_for_trial(&self, now_ms: u64) -> Option<&Arc<Exit>> {
        let interval = self.trial_interval_ms?;
        self.exits.iter().find(|e| {
            e.health.state() != HealthState::Healthy && e.health.claim_trial(now_ms, interval)
        })
    }

    /// All exits, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Exit>> {
        self.exits.iter()
    }
}

fn parse_userinfo(userinfo: &str) -> Result<Credentials, ExitUrlError> {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| {
                ExitUrlError::Address("credentials are not valid UTF-8 once percent-decoded".into())
            })
    };
    Ok(Credentials {
        user: decode(user)?,
        password: decode(password)?,
    })
}

fn parse_host_port(text: &str) -> Result<HostPort, ExitUrlError> {
    let bad = |why: &str| ExitUrlError::Address(format!("{why} in {text:?}"));
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if host.is_empty() || host.contains(['[', ']', ' ']) {
        return Err(bad("missing or invalid host"));
    }
    let port = port
        .ok_or_else(|| bad("missing port"))?
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("invalid port"))?;
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_exit_with_credentials() {
        let spec = ExitSpec::parse("e1", "http://us%40er:p@ss:w@proxy.example:3128").unwrap();
        assert!(!spec.has_session_placeholder());
        let ExitKind::HttpConnect { proxy, auth } = &spec.kind else {
            panic!("expected http exit");
        };
        assert_eq!(proxy.to_string(), "proxy.example:3128");
        let auth = auth.as_ref().unwrap();
        assert_eq!(auth.user, "us@er");
        assert_eq!(auth.password, "p@ss:w");
        assert_eq!(spec.redacted_url(), "http://us@er:***@proxy.example:3128");
        assert!(!format!("{spec:?}").contains("p@ss"));
    }

    #[test]
    fn parses_ipv6_and_direct() {
        let spec = ExitSpec::parse("e", "http://[::1]:8080/").unwrap();
        assert_eq!(
            spec.kind,
            ExitKind::HttpConnect {
                proxy: HostPort {
                    host: "::1".into(),
                    port: 8080
                },
                auth: None
            }
        );
        assert_eq!(
            ExitSpec::parse("d", "direct://127.0.0.2").unwrap().kind,
            ExitKind::Direct {
                source: Some("127.0.0.2".parse().unwrap())
            }
        );
        assert_eq!(
            ExitSpec::parse("d", "direct://").unwrap().kind,
            ExitKind::Direct { source: None }
        );
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "proxy:8080",
            "ftp://proxy:21",
            "http://proxy",
            "http://proxy:0",
            "http://proxy:99999",
            "http://:8080",
            "http://proxy:8080/path",
            "direct://not-an-ip",
            "direct://u:p@127.0.0.1",
        ] {
            assert!(ExitSpec::parse("x", url).is_err(), "{url} should fail");
        }
    }

    #[test]
    fn default_ids_ignore_credentials() {
        assert_eq!(
            ExitSpec::default_id("http://u:p@10.0.0.1:3128").unwrap(),
            "10.0.0.1:3128"
        );
        assert_eq!(ExitSpec::default_id("direct://").unwrap(), "direct");
        assert_eq!(
            ExitSpec::default_id("direct://127.0.0.3").unwrap(),
            "direct-127.0.0.3"
        );
    }

    #[test]
    fn session_placeholders_are_filled() {
        let spec = ExitSpec::parse(
            "g",
            "http://customer-acme-session-{session}:pw@gate.example:7000",
        )
        .unwrap();
        assert!(spec.has_session_placeholder());
        let ExitKind::HttpConnect {
            auth: Some(creds), ..
        } = &spec.kind
        else {
            panic!("expected credentials");
        };
        assert_eq!(creds.with_session("abc").user, "customer-acme-session-abc");
        assert_eq!(
            spec.redacted_url(),
            "http://customer-acme-session-{session}:***@gate.example:7000"
        );
    }

    #[test]
    fn echo_targets() {
        let e = EchoTarget::parse("http://127.0.0.1:9000/ip?x=1").unwrap();
        assert_eq!(
            (e.https, e.authority.port, e.path.as_str()),
            (false, 9000, "/ip?x=1")
        );
        assert_eq!(
            EchoTarget::parse("https://echo.example")
                .unwrap()
                .authority
                .port,
            443
        );
        assert!(EchoTarget::parse("ftp://x/").is_err());
    }

    #[test]
    fn basic_header_is_sensitive() {
        let c = Credentials {
            user: "a".into(),
            password: "b".into(),
        };
        let h = c.basic_header();
        assert_eq!(h.to_str().unwrap(), "Basic YTpi");
        assert!(h.is_sensitive());
    }
}
