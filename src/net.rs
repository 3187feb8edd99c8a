//! Shared vocabulary: host-and-port addresses, parsed and printed in one
//! place.
//!
//! Hosts are kept without the brackets of IPv6 literals; they are added
//! back only when an address is written into an authority (`[::1]:443`).
//! Every parser here refuses port 0 and empty hosts, so no later stage has
//! to check again.

use std::fmt;
use std::sync::Arc;

use http::Uri;

pub mod read_count;
pub mod relay;
pub mod streams;
pub mod tasks;

/// A host and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP literal (without brackets). Shared: a request's
    /// target is cloned several times on its way (routing, the pool's lane,
    /// the connection given back), and a clone should not allocate.
    pub host: Arc<str>,
    /// Port.
    pub port: u16,
}

/// An address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} in {text:?}")]
pub struct AddressError {
    /// What was parsed.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// `host` without the brackets of an IPv6 literal.
pub fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The default port of `http` (80) or `https` (443).
pub fn default_port(https: bool) -> u16 {
    if https {
        443
    } else {
        80
    }
}

impl HostPort {
    /// An address from a host (brackets, if any, are removed) and a port.
    pub fn new(host: &str, port: u16) -> HostPort {
        HostPort {
            host: Arc::from(unbracket(host)),
            port,
        }
    }

    /// Parses `host:port` or `[v6]:port`; the port is required and not 0.
    pub fn parse(text: &str) -> Result<HostPort, AddressError> {
        let bad = |reason| AddressError {
            text: text.to_owned(),
            reason,
        };
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            (host, after.strip_prefix(':'))
        } else {
            match text.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (text, None),
            }
        };
        if host.is_empty() || host.contains(['[', ']', ' ', '/', '@']) {
            return Err(bad("missing or invalid host"));
        }
        let port = port
            .ok_or_else(|| bad("missing port"))?
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("invalid port"))?;
        Ok(HostPort::new(host, port))
    }

    /// The host and port of an absolute URI, `default_port` when it names
    /// none; `None` without a host.
    pub fn from_uri(uri: &Uri, default_port: u16) -> Option<HostPort> {
        let host = uri.host().filter(|h| !h.is_empty())?;
        Some(HostPort::new(host, uri.port_u16().unwrap_or(default_port)))
    }

    /// The host as written in a URI authority: IPv6 literals in brackets.
    pub fn bracketed_host(host: &str) -> String {
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        }
    }

    /// The authority as a browser writes it (`:authority`, `Host`): the
    /// port is left out when it is `default_port`.
    pub fn authority(&self, default_port: u16) -> String {
        if self.port == default_port {
            HostPort::bracketed_host(&self.host)
        } else {
            self.to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_literals() {
        assert_eq!(
            HostPort::parse("proxy.example:3128").unwrap(),
            HostPort::new("proxy.example", 3128)
        );
        let v6 = HostPort::parse("[::1]:8080").unwrap();
        assert_eq!(&*v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:8080");
        for bad in [
            "proxy",
            "proxy:0",
            "proxy:99999",
            ":80",
            "[::1",
            "a b:1",
            "u@h:1",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn authorities_omit_default_ports() {
        assert_eq!(HostPort::new("a.test", 443).authority(443), "a.test");
        assert_eq!(HostPort::new("[::1]", 443).authority(443), "[::1]");
        assert_eq!(HostPort::new("::1", 8443).authority(443), "[::1]:8443");
    }

    #[test]
    fn from_uris() {
        let uri: Uri = "https://[::1]/x".parse().unwrap();
        assert_eq!(
            HostPort::from_uri(&uri, 443),
            Some(HostPort::new("::1", 443))
        );
        let uri: Uri = "/x".parse().unwrap();
        assert_eq!(HostPort::from_uri(&uri, 443), None);
    }
}
