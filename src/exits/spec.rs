//! Exit specifications: an exit URL parsed into its id, kind and options.
//!
//! `http://[user:pass@]host:port`, `socks5://[user:pass@]host:port` and
//! `direct://[SOURCE_IP]` are understood; each scheme is one arm of
//! [`ExitSpec::parse`], and the kinds themselves live in
//! [`upstream::dial`](crate::upstream::dial).

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use percent_encoding::percent_decode_str;

use crate::identity::ExitId;
use crate::net::{unbracket, HostPort};
use crate::upstream::dial::direct::Direct;
use crate::upstream::dial::http_connect::HttpConnect;
use crate::upstream::dial::socks5::Socks5;
use crate::upstream::dial::{ExitKind, ProxyAddress, ProxyAuth};
use crate::upstream::egress_ip::{EchoTarget, EgressCheck};
use crate::upstream::{ExitRoute, FingerprintMode};

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
    /// Whose TLS ClientHello and HTTP/2 preface the exit's connections
    /// present: the client's (`mirror`), Chrome's, or rustls's.
    pub fingerprint: FingerprintMode,
    /// SOCKS5 exits: take the address in the CONNECT reply (BND.ADDR) as the
    /// tunnel's egress address (true of servers that report their outgoing
    /// socket, such as microsocks; not of NATed gateways).
    pub socks_reply_is_egress: bool,
    /// Keep the exit's identities when its URL or credentials change under
    /// its id: the operator vouches that the new route leaves from the same
    /// IPs (a renamed gateway, a rotated password). Off, they retire
    /// (`exit-changed`), as they do at a change of the fingerprint mode
    /// either way; see `exits::routes`.
    pub keep_identities_on_route_change: bool,
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
            fingerprint: FingerprintMode::default(),
            keep_identities_on_route_change: false,
        }
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
    /// What decides where the exit's traffic leaves from, as a short hash
    /// (a credential must not be kept in the clear): the URL with its
    /// credentials (a provider may put the country or the session in the
    /// user name or the password). Two specs with one key reach the same
    /// IPs, as far as pinproxy can tell; see `exits::routes`, which keeps
    /// the fingerprint mode beside it.
    pub fn route_key(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"pinproxy exit route v2\n");
        hasher.update(self.kind.redacted_url().as_bytes());
        hasher.update(b"\n");
        if let Some(credentials) = self.kind.credentials() {
            hasher.update(credentials.password.as_bytes());
        }
        hasher.finalize().to_hex()[..32].to_owned()
    }

    /// The exit used when none is configured: direct egress, id `direct`.
    pub fn builtin_direct() -> ExitSpec {
        ExitSpec {
            id: ExitId::new("direct"),
            kind: ExitKind::Direct(Direct::default()),
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
        // One arm per exit kind (see upstream::dial).
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "http" => ExitKind::HttpConnect(HttpConnect(proxy_address(userinfo, hostport)?)),
            // socks5h is curl's name for remote resolution, which pinproxy always does.
            "socks5" | "socks5h" => ExitKind::Socks5(Socks5(socks_address(userinfo, hostport)?)),
            "direct" => ExitKind::Direct(direct_exit(userinfo, hostport)?),
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
        Ok(ExitSpec::parse("unnamed", url)?.kind.default_id())
    }

    /// Whether the exit's credentials carry a `{session}` placeholder.
    pub fn has_session_placeholder(&self) -> bool {
        self.kind
            .credentials()
            .is_some_and(ProxyAuth::has_session_placeholder)
    }

    /// The URL without credentials, for logs and messages.
    pub fn redacted_url(&self) -> String {
        self.kind.redacted_url()
    }

    /// The URL without the user name either: what proxy clients are shown
    /// (error answers go to every client, and a provider's account is
    /// often named by the user name of its gateway URL; the operator's
    /// logs and admin endpoint keep `user:***`).
    pub fn public_url(&self) -> String {
        self.kind.public_url()
    }

    /// What the exit's connection pools dial.
    pub fn route(&self) -> ExitRoute {
        ExitRoute {
            id: self.id.clone(),
            kind: self.kind.clone(),
            egress: EgressCheck {
                header: self.options.exit_ip_header.clone(),
                echo: self.options.ip_echo.clone(),
            },
            socks_reply_is_egress: self.options.socks_reply_is_egress,
            fingerprint: self.options.fingerprint,
        }
    }
}
fn parse_userinfo(userinfo: &str) -> Result<ProxyAuth, ExitUrlError> {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| {
                ExitUrlError::Address("credentials are not valid UTF-8 once percent-decoded".into())
            })
    };
    Ok(ProxyAuth {
        user: decode(user)?,
        password: decode(password)?,
    })
}

/// The address and credentials of an `http://` or `socks5://` exit.
fn proxy_address(userinfo: Option<&str>, hostport: &str) -> Result<ProxyAddress, ExitUrlError> {
    // Credentials without their `@` (`user:pass:host:port`) would be quoted
    // in the error, which goes to the log and to `POST /reload`'s answer.
    let looks_like_credentials = userinfo.is_none()
        && !hostport.starts_with('[')
        && hostport.bytes().filter(|b| *b == b':').count() > 1;
    if looks_like_credentials {
        return Err(ExitUrlError::Address(
            "the exit's host:port holds more than one ':' (credentials without their '@'?; \
             the text is not quoted, since it may hold a password)"
                .into(),
        ));
    }
    let proxy = HostPort::parse(hostport).map_err(|e| {
        // After an '@' the text may be the end of a password that held an
        // unencoded '@'; without one, `user:pass` with the host forgotten.
        let may_hold_credentials = userinfo.is_some() || hostport.contains(':');
        ExitUrlError::Address(if may_hold_credentials {
            format!(
                "{} in the exit's host:port (not quoted: it may hold a password; \
                 percent-encode an '@' in the password as %40)",
                e.reason
            )
        } else {
            e.to_string()
        })
    })?;
    Ok(ProxyAddress {
        proxy,
        auth: userinfo.map(parse_userinfo).transpose()?,
    })
}

/// A `socks5://` exit's address, its credentials checked against what a
/// SOCKS5 message can carry once an identity's `{session}` is filled in
/// (16 hex digits): refused here rather than on every connection.
fn socks_address(userinfo: Option<&str>, hostport: &str) -> Result<ProxyAddress, ExitUrlError> {
    let address = proxy_address(userinfo, hostport)?;
    if let Some(auth) = &address.auth {
        let filled = auth.with_session(&crate::identity::SessionId(0).to_string());
        crate::upstream::dial::socks5::check_credentials(&filled).map_err(ExitUrlError::Address)?;
    }
    Ok(address)
}

/// A `direct://` or `direct://SOURCE_IP` exit.
fn direct_exit(userinfo: Option<&str>, hostport: &str) -> Result<Direct, ExitUrlError> {
    if userinfo.is_some() {
        return Err(ExitUrlError::Address(
            "a direct:// exit takes no credentials".into(),
        ));
    }
    if hostport.is_empty() {
        return Ok(Direct { source: None });
    }
    let source = unbracket(hostport).parse::<IpAddr>().map_err(|_| {
        ExitUrlError::Address(format!(
            "direct://SOURCE_IP needs a local IP address, not {hostport:?}"
        ))
    })?;
    Ok(Direct {
        source: Some(source),
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Credentials that lost their `@` are refused without being quoted:
    /// the error reaches the log and `POST /reload`'s answer. An IPv6
    /// exit's colons are no such thing.
    #[test]
    fn a_url_with_credentials_but_no_at_is_refused_without_quoting_them() {
        for url in [
            "http://user:S3cret:gate.example:7000",
            "socks5://user:S3cret:gate.example:1080",
        ] {
            let error = ExitSpec::parse("a", url).unwrap_err().to_string();
            assert!(!error.contains("S3cret"), "{error}");
            assert!(error.contains("more than one ':'"), "{error}");
        }
        assert!(ExitSpec::parse("a", "http://[::1]:7000").is_ok());
        assert!(ExitSpec::parse("a", "http://user:pw@[::1]:7000").is_ok());
    }

    /// A host:port that may be (the end of) a password is not quoted
    /// either: `user:pass` with the host forgotten, or a password whose
    /// unencoded '@' made its end read as the host.
    #[test]
    fn host_port_errors_that_may_hold_a_password_do_not_quote_it() {
        for url in ["http://user:S3cret", "socks5://user:p@S3cret"] {
            let error = ExitSpec::parse("a", url).unwrap_err().to_string();
            assert!(!error.contains("S3cret"), "{error}");
            assert!(error.contains("not quoted"), "{error}");
        }
        let error = ExitSpec::parse("a", "http://gate.example")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("gate.example"),
            "a plain host is quoted: {error}"
        );
    }

    /// A SOCKS5 user name must fit its length byte once an identity's
    /// session (16 hex digits) fills `{session}`, and may not be empty.
    #[test]
    fn socks5_credentials_must_fit_the_protocol() {
        let long = format!("socks5://{}-{{session}}:pw@s.example:1080", "u".repeat(239));
        let error = ExitSpec::parse("a", &long).unwrap_err().to_string();
        assert!(error.contains("1 to 255 bytes"), "{error}");
        let fits = format!("socks5://{}-{{session}}:pw@s.example:1080", "u".repeat(238));
        assert!(ExitSpec::parse("a", &fits).is_ok());
        assert!(ExitSpec::parse("a", "socks5://:pw@s.example:1080").is_err());
        assert!(ExitSpec::parse("a", "socks5://user@s.example:1080").is_ok());
        // HTTP exits have no such limit.
        assert!(ExitSpec::parse("a", &long.replace("socks5", "http")).is_ok());
    }

    /// What proxy clients are shown of an exit: no credentials, the user
    /// name neither, whatever it holds once decoded.
    #[test]
    fn error_answers_name_an_exit_without_its_user() {
        for (url, shown) in [
            (
                "http://customer-acme-session-1:pw@gate.example:7000",
                "http://gate.example:7000",
            ),
            (
                "socks5://us%40er:pw@s.example:1080",
                "socks5://s.example:1080",
            ),
            ("http://gate.example:7000", "http://gate.example:7000"),
            ("direct://127.0.0.2", "direct://127.0.0.2"),
            (
                "http://acme%2Fzone%3Ax%40y:pw@gate.example:7000",
                "http://gate.example:7000",
            ),
        ] {
            let spec = ExitSpec::parse("e1", url).unwrap();
            assert_eq!(spec.public_url(), shown, "{url}");
        }
    }

    #[test]
    fn parses_http_exit_with_credentials() {
        let spec = ExitSpec::parse("e1", "http://us%40er:p@ss:w@proxy.example:3128").unwrap();
        assert!(!spec.has_session_placeholder());
        let ExitKind::HttpConnect(HttpConnect(ProxyAddress { proxy, auth })) = &spec.kind else {
            panic!("expected http exit");
        };
        assert_eq!(proxy.to_string(), "proxy.example:3128");
        let auth = auth.as_ref().unwrap();
        assert_eq!(auth.user, "us@er");
        assert_eq!(auth.password, "p@ss:w");
        assert_eq!(spec.redacted_url(), "http://us@er:***@proxy.example:3128");
        assert_eq!(spec.public_url(), "http://proxy.example:3128");
        assert!(!format!("{spec:?}").contains("p@ss"));
    }

    #[test]
    fn parses_ipv6_and_direct() {
        let spec = ExitSpec::parse("e", "http://[::1]:8080/").unwrap();
        assert_eq!(
            spec.kind,
            ExitKind::HttpConnect(HttpConnect(ProxyAddress {
                proxy: HostPort::new("::1", 8080),
                auth: None
            }))
        );
        assert_eq!(
            ExitSpec::parse("d", "direct://127.0.0.2").unwrap().kind,
            ExitKind::Direct(Direct {
                source: Some("127.0.0.2".parse().unwrap())
            })
        );
        assert_eq!(
            ExitSpec::parse("d", "direct://").unwrap().kind,
            ExitKind::Direct(Direct { source: None })
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
        let Some(creds) = spec.kind.credentials() else {
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
        let c = ProxyAuth {
            user: "a".into(),
            password: "b".into(),
        };
        let h = c.basic_header();
        assert_eq!(h.to_str().unwrap(), "Basic YTpi");
        assert!(h.is_sensitive());
    }
}
