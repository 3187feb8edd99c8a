//! Shared vocabulary: host-and-port addresses, parsed and printed in one
//! place.
//!
//! Hosts are kept without the brackets of IPv6 literals; they are added
//! back only when an address is written into an authority (`[::1]:443`).
//! Every parser here refuses port 0, empty hosts and addresses that name a
//! host in a form only some resolvers read (see [`host_problem`]), so no
//! later stage has to check again.

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

/// The longest DNS name, in bytes, without a final dot (RFC 1035 §2.3.4).
const MAX_HOST_LEN: usize = 253;

/// `host` without the brackets of an IPv6 literal.
pub fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Why `host` (without brackets; `bracketed` when it was written in them)
/// cannot name a host, if it cannot:
///
/// - empty, or holding a character no host holds (a `*` too: a leaf
///   certificate minted for `*.example` would be a wildcard);
/// - longer than a DNS name may be (253 bytes, a final dot aside): a
///   CONNECT to a host of 60 KB made a leaf certificate, cached, and a
///   metrics label of that size;
/// - in brackets but not an IPv6 address, or with a zone (`[::1%lo]`): a
///   zone names an interface of the machine that dials, which for a target
///   sent on to a proxy exit is the exit's, where no check of pinproxy's
///   reaches (an exit given by a link-local address with a zone is not
///   supported either);
/// - an IPv6 address out of brackets (`2001:db8::1`, where the last group
///   would read as the port);
/// - ending in a number but not a dotted-quad IPv4 address: `2130706433`,
///   `127.1`, `0x7f.0.0.1` and `0177.0.0.1` are all 127.0.0.1 to the
///   resolvers of C libraries and to browsers' URL parsers, but not to
///   Rust's, so a proxy exit would reach an address none of pinproxy's
///   checks saw (its own admin endpoint, through an exit on its host). No
///   top-level domain is a number, so no name is refused by this.
fn host_problem(host: &str, bracketed: bool) -> Option<&'static str> {
    if host.is_empty() || host.contains(['[', ']', ' ', '/', '@', '%', '*']) {
        return Some("missing or invalid host");
    }
    if host.strip_suffix('.').unwrap_or(host).len() > MAX_HOST_LEN {
        return Some("a host name is at most 253 bytes long");
    }
    if bracketed {
        return match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => None,
            Err(_) => Some("not an IPv6 address in brackets"),
        };
    }
    if host.contains(':') {
        return Some("an IPv6 address must be written in brackets");
    }
    let last = host
        .strip_suffix('.')
        .unwrap_or(host)
        .rsplit('.')
        .next()
        .unwrap_or(host);
    let numeric = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()));
    if (numeric || hex) && host.parse::<std::net::Ipv4Addr>().is_err() {
        return Some(
            "a numeric host must be an IPv4 address written as four decimal numbers (a.b.c.d)",
        );
    }
    None
}

/// `host:port` or `[v6]:port` split into its host (checked by
/// [`host_problem`], brackets removed) and its port's text, if any.
fn split_authority(text: &str) -> Result<(&str, Option<&str>), &'static str> {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or("unclosed '['")?;
            (host, after.strip_prefix(':'))
        }
        None => match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        },
    };
    match host_problem(host, text.starts_with('[')) {
        Some(reason) => Err(reason),
        None => Ok((host, port)),
    }
}

/// A port: 1-65535, in decimal digits only.
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|port| *port != 0)
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
        let (host, port) = split_authority(text).map_err(bad)?;
        let port = parse_port(port.ok_or_else(|| bad("missing port"))?)
            .ok_or_else(|| bad("invalid port"))?;
        Ok(HostPort::new(host, port))
    }

    /// The host and port of an absolute URI, `default_port` when it names
    /// none (or an empty one, `http://host:/`, which RFC 3986 reads as the
    /// default). Refuses a URI without a host, a host [`host_problem`]
    /// refuses, and a port that is not 1-65535 (`:99999`, `:8o`, `:0`),
    /// which the `http` crate lets through and reads as no port at all.
    pub fn from_uri(uri: &Uri, default_port: u16) -> Result<HostPort, AddressError> {
        let Some(authority) = uri.authority() else {
            return Err(AddressError {
                text: uri.path().to_owned(),
                reason: "missing host",
            });
        };
        // After the user information, which the crate keeps in the
        // authority (a password may hold ':'), and which no error shows.
        let text = authority.as_str();
        let text = text.rsplit_once('@').map_or(text, |(_, after)| after);
        let bad = |reason| AddressError {
            text: text.to_owned(),
            reason,
        };
        let (host, port) = split_authority(text).map_err(bad)?;
        let port = match port {
            None | Some("") => default_port,
            Some(port) => parse_port(port).ok_or_else(|| bad("invalid port"))?,
        };
        Ok(HostPort::new(host, port))
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
            "proxy:+80",
            // Numeric hosts other than a dotted quad, which C resolvers
            // read as 127.0.0.1, and IPv6 written so that its last group
            // reads as a port, or with a zone.
            "2130706433:80",
            "127.1:80",
            "0x7f.0.0.1:80",
            "0177.0.0.1:80",
            "127.0.0.1.:80",
            "a.0x7f000001:80",
            "2001:db8::1",
            "[::1%lo]:80",
            "[::1%25lo]:80",
            "[example.com]:80",
            "*.example.com:443",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad} should fail");
        }
        let longest = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(longest.len(), 253);
        assert!(HostPort::parse(&format!("{longest}:443")).is_ok());
        assert!(HostPort::parse(&format!("{longest}.:443")).is_ok());
        assert!(HostPort::parse(&format!("{longest}e:443")).is_err());
        for good in [
            "127.0.0.1:80",
            "a1.example:80",
            "0xcafe.example:80",
            "x.y2:1",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(HostPort::parse(good).is_ok(), "{good} should parse");
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
        let from = |text: &str| HostPort::from_uri(&text.parse().unwrap(), 443);
        assert_eq!(from("https://[::1]/x"), Ok(HostPort::new("::1", 443)));
        assert_eq!(from("https://a.test:/x"), Ok(HostPort::new("a.test", 443)));
        assert_eq!(
            from("https://u:p:w@a.test:8443/"),
            Ok(HostPort::new("a.test", 8443))
        );
        assert_eq!(from("https://[::1]:8443/"), Ok(HostPort::new("::1", 8443)));
        assert!(from("/x").is_err());
        // The `http` crate reads these ports as none at all.
        for bad in [
            "http://a.test:99999/",
            "http://a.test:0/",
            "http://a.test:8o/",
            "http://2130706433:8080/",
            "http://0x7f.1/",
        ] {
            assert!(from(bad).is_err(), "{bad} should fail");
        }
    }
}
