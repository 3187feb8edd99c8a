//! Where pinproxy refuses to connect (SSRF guards).
//!
//! - **Its own listeners.** A request aimed at pinproxy's own proxy or
//!   admin address would loop back into it (or hand a remote client the
//!   admin endpoint): refused before anything is dialled, for IP literals
//!   and `localhost` names at the target stage ([`AddressGuard::own_target`])
//!   and, for the direct exit, for every address a name resolves to.
//! - **Its pin store.** A client that reached the Redis server pinproxy
//!   keeps its pins in could rewrite any pin (send a cookie through any
//!   exit) or wipe them: its configured addresses (a name among them
//!   resolved at start) are refused like the listeners. A Sentinel's
//!   primary, learnt while running, and a cluster's nodes beyond those
//!   listed are not known here: list their network in `deny_ranges`.
//! - **Denied ranges** (`upstream.deny_ranges`, default link-local
//!   `169.254.0.0/16` (with the cloud metadata address 169.254.169.254) and
//!   `fe80::/10`): the direct exit checks every address it resolved before
//!   connecting to it, so a name that resolves to a denied address (DNS
//!   rebinding) is refused as surely as the literal. Loopback is allowed
//!   unless listed.
//!
//! Exits that are proxies resolve names themselves: what their side can
//! reach is theirs to guard.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use ipnet::IpNet;

/// The default `upstream.deny_ranges`: link-local IPv4 (with the cloud
/// metadata address 169.254.169.254) and link-local IPv6.
pub const DEFAULT_DENY_RANGES: &[&str] = &["169.254.0.0/16", "fe80::/10"];

/// Which of pinproxy's own addresses a target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnListener {
    /// The proxy listener.
    Proxy,
    /// The admin endpoint.
    Admin,
    /// The server of its pin store (Redis).
    Store,
}

impl fmt::Display for OwnListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OwnListener::Proxy => "pinproxy's own proxy listener (forwarding there would loop)",
            OwnListener::Admin => "pinproxy's own admin endpoint (forwarding there would loop)",
            OwnListener::Store => {
                "the server of pinproxy's pin store (a client reaching it could rewrite any pin)"
            }
        })
    }
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It is one of pinproxy's own listeners (a loop).
    Own(OwnListener),
    /// It is in a denied range.
    Denied(IpNet),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Own(listener) => write!(f, "it is {listener}"),
            Refusal::Denied(range) => write!(f, "upstream.deny_ranges denies {range}"),
        }
    }
}

/// An origin the direct exit refused to connect to, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{target} resolves to {addr}, which pinproxy will not connect to: {refusal}")]
pub struct Forbidden {
    /// The origin asked for.
    pub target: crate::net::HostPort,
    /// The address it resolved to.
    pub addr: SocketAddr,
    /// Why it is refused.
    pub refusal: Refusal,
}

/// The addresses pinproxy refuses to connect to. One per daemon; its own
/// addresses are filled in once the listeners are bound.
#[derive(Debug, Default)]
pub struct AddressGuard {
    deny: Vec<IpNet>,
    proxy: OnceLock<SocketAddr>,
    admin: OnceLock<SocketAddr>,
    store: OnceLock<Vec<SocketAddr>>,
}

impl AddressGuard {
    /// A guard refusing `deny` (and, once known, the own listeners).
    pub fn new(deny: Vec<IpNet>) -> AddressGuard {
        AddressGuard {
            deny,
            ..AddressGuard::default()
        }
    }

    /// Records the proxy listener's bound address.
    pub fn set_proxy(&self, addr: SocketAddr) {
        let _ = self.proxy.set(addr);
    }

    /// Records the admin endpoint's bound address.
    pub fn set_admin(&self, addr: SocketAddr) {
        let _ = self.admin.set(addr);
    }

    /// Records the addresses of the pin store's servers (Redis).
    pub fn set_store(&self, addrs: Vec<SocketAddr>) {
        let _ = self.store.set(addrs);
    }

    /// The denied ranges.
    pub fn deny_ranges(&self) -> &[IpNet] {
        &self.deny
    }

    /// Which own listener `host:port` names, judged without DNS: IP
    /// literals, and `localhost` names (which resolve to loopback). Other
    /// names are checked after resolution, where pinproxy resolves them.
    pub fn own_target(&self, host: &str, port: u16) -> Option<OwnListener> {
        let host = crate::net::unbracket(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.own(SocketAddr::new(ip, port));
        }
        // No allocation: this runs for every plain request.
        let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
        let suffix = b".localhost";
        let localhost = host.eq_ignore_ascii_case(b"localhost")
            || (host.len() > suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix));
        if localhost {
            let loopbacks = [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ];
            return loopbacks
                .into_iter()
                .find_map(|ip| self.own(SocketAddr::new(ip, port)));
        }
        None
    }

    /// Whether the direct exit may connect to `addr` (resolved).
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refusal> {
        if let Some(listener) = self.own(addr) {
            return Err(Refusal::Own(listener));
        }
        let ip = addr.ip().to_canonical();
        match self.deny.iter().find(|range| range.contains(&ip)) {
            Some(range) => Err(Refusal::Denied(*range)),
            None => Ok(()),
        }
    }

    fn own(&self, target: SocketAddr) -> Option<OwnListener> {
        let listener = [
            (self.proxy.get(), OwnListener::Proxy),
            (self.admin.get(), OwnListener::Admin),
        ]
        .into_iter()
        .find_map(|(own, listener)| own.filter(|own| reaches(**own, target)).map(|_| listener));
        let store = || {
            self.store
                .get()
                .is_some_and(|servers| {
                    servers
                        .iter()
                        .any(|server| reaches(*server, target) || same_host(*server, target))
                })
                .then_some(OwnListener::Store)
        };
        listener.or_else(store)
    }
}

/// Parses `upstream.deny_ranges` entries: CIDR ranges, or single addresses.
pub fn parse_ranges(ranges: &[String]) -> Result<Vec<IpNet>, String> {
    ranges
        .iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    format!(
                        "upstream.deny_ranges: {text:?} is not an address range \
                         (write 169.254.0.0/16, fe80::/10 or a single address)"
                    )
                })
        })
        .collect()
}

/// Whether connecting to `target` reaches the listener bound to `own`.
fn reaches(own: SocketAddr, target: SocketAddr) -> bool {
    if own.port() != target.port() {
        return false;
    }
    // Connecting to 0.0.0.0 or :: reaches this host.
    let target_ip = match target.ip().to_canonical() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let own_ip = own.ip().to_canonical();
    if own_ip.is_unspecified() {
        // A wildcard listener answers on every local address (an IPv6
        // wildcard also takes IPv4 unless the socket is v6-only).
        let family_matches = own_ip.is_ipv6() || target_ip.is_ipv4();
        return family_matches && is_local(target_ip);
    }
    own_ip == target_ip
}

/// Whether `target` is the port of `server`, a server on this host, at
/// another of the host's addresses. How it is bound is not known here
/// (Redis binds `127.0.0.1` and `::1` by default; a published container
/// port answers on every address): each local address may reach it.
fn same_host(server: SocketAddr, target: SocketAddr) -> bool {
    if server.port() != target.port() || !is_local(server.ip().to_canonical()) {
        return false;
    }
    let target_ip = target.ip().to_canonical();
    target_ip.is_unspecified() || is_local(target_ip)
}

/// Whether `ip` is an address of this host: loopback, or one a socket can
/// be bound to (which only a local address can).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> AddressGuard {
        let ranges: Vec<String> = DEFAULT_DENY_RANGES.iter().map(|s| s.to_string()).collect();
        AddressGuard::new(parse_ranges(&ranges).unwrap())
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// The default policy, judged without any socket: link-local and the
    /// metadata address are refused, loopback and public addresses are not.
    #[test]
    fn default_ranges_deny_link_local_and_metadata() {
        let g = guard();
        for denied in [
            "169.254.169.254:80",
            "169.254.0.1:443",
            "[fe80::1]:80",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert!(
                matches!(g.check(addr(denied)), Err(Refusal::Denied(_))),
                "{denied}"
            );
        }
        for allowed in [
            "127.0.0.1:80",
            "[::1]:443",
            "93.184.216.34:443",
            "10.0.0.1:80",
        ] {
            assert_eq!(g.check(addr(allowed)), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn ranges_parse_cidrs_and_single_addresses() {
        let ranges = parse_ranges(&["127.0.0.9".into(), "10.1.2.3/8".into()]).unwrap();
        assert_eq!(ranges[0].to_string(), "127.0.0.9/32");
        assert_eq!(ranges[1].to_string(), "10.0.0.0/8");
        assert!(parse_ranges(&["nonsense".into()]).is_err());
    }

    #[test]
    fn own_listeners_are_recognised_by_literal_and_localhost() {
        let g = guard();
        assert_eq!(g.own_target("127.0.0.1", 8080), None, "not bound yet");
        g.set_proxy(addr("127.0.0.1:8080"));
        g.set_admin(addr("127.0.0.1:8081"));
        assert_eq!(g.own_target("127.0.0.1", 8080), Some(OwnListener::Proxy));
        assert_eq!(g.own_target("localhost", 8081), Some(OwnListener::Admin));
        assert_eq!(g.own_target("LOCALHOST.", 8080), Some(OwnListener::Proxy));
        assert_eq!(g.own_target("a.localhost", 8080), Some(OwnListener::Proxy));
        assert_eq!(g.own_target("0.0.0.0", 8080), Some(OwnListener::Proxy));
        assert_eq!(g.own_target("127.0.0.2", 8080), None);
        assert_eq!(g.own_target("127.0.0.1", 8082), None);
        assert_eq!(
            g.own_target("example.com", 8080),
            None,
            "names wait for DNS"
        );
        assert_eq!(
            g.check(addr("127.0.0.1:8081")),
            Err(Refusal::Own(OwnListener::Admin))
        );
    }

    /// The pin store's server is refused like the listeners: a client
    /// that reached it could rewrite any pin.
    #[test]
    fn the_pin_stores_servers_are_refused() {
        let g = guard();
        g.set_store(vec![addr("127.0.0.1:6379"), addr("[::1]:6379")]);
        assert_eq!(g.own_target("127.0.0.1", 6379), Some(OwnListener::Store));
        assert_eq!(g.own_target("localhost", 6379), Some(OwnListener::Store));
        assert_eq!(
            g.own_target("[::ffff:127.0.0.1]", 6379),
            Some(OwnListener::Store)
        );
        assert_eq!(g.own_target("0.0.0.0", 6379), Some(OwnListener::Store));
        assert_eq!(g.own_target("127.0.0.1", 6380), None);
        assert_eq!(
            g.check(addr("[::1]:6379")),
            Err(Refusal::Own(OwnListener::Store))
        );
        assert_eq!(g.check(addr("10.0.0.5:6379")), Ok(()));
        // A local server may answer on every local address, whichever the
        // URL names.
        let g = guard();
        g.set_store(vec![addr("127.0.0.1:6379")]);
        for other in ["::1", "::", "127.0.0.2", "0.0.0.0"] {
            assert_eq!(
                g.own_target(other, 6379),
                Some(OwnListener::Store),
                "{other}"
            );
        }
        assert_eq!(
            g.check(addr("[::1]:6379")),
            Err(Refusal::Own(OwnListener::Store))
        );
        // TEST-NET-3 is never this host's.
        assert_eq!(g.check(addr("203.0.113.7:6379")), Ok(()));
        // A server elsewhere is refused at its own address only.
        let g = guard();
        g.set_store(vec![addr("203.0.113.9:6379")]);
        assert_eq!(g.own_target("127.0.0.1", 6379), None);
    }

    #[test]
    fn wildcard_listeners_answer_on_every_local_address() {
        let g = AddressGuard::default();
        g.set_proxy(addr("0.0.0.0:8080"));
        assert_eq!(g.own_target("127.0.0.5", 8080), Some(OwnListener::Proxy));
        assert_eq!(g.own_target("[::1]", 8080), None, "an IPv4 wildcard");
        // TEST-NET-3 is never assigned to this host.
        assert_eq!(g.own_target("203.0.113.7", 8080), None);
    }
}
