//! `direct://[SOURCE_IP]`: egress straight from this machine, optionally
//! from one of its local addresses (multi-IP hosts). The origin's name is
//! resolved here, and the socket itself is the egress address.
//!
//! Every resolved address is checked against the SSRF guard
//! ([`super::guard`]: `upstream.deny_ranges` and pinproxy's own listeners)
//! before anything is sent to it; a name whose every address is refused
//! fails with `address-denied` (or `proxy-loop`), and nothing is dialled.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::guard::Forbidden;
use super::{connect_from, resolve, resolve_exit, DialContext, Lookup, ProxyAddress};
use crate::net::HostPort;
use crate::upstream::error::{ConnectError, Stage};

/// `addrs` in their order, those of `egress`'s family (IPv4 or IPv6) first:
/// a host with both leaves from one address of each, and an identity
/// whose tunnels left from one of them keeps it wherever the origin has an
/// address of its family (the resolver may list the other family first for
/// some names, and the tunnel would then leave from the identity's other
/// address: a drift, which retires it).
fn in_family_first(
    addrs: impl IntoIterator<Item = std::net::SocketAddr>,
    egress: Option<IpAddr>,
) -> Vec<std::net::SocketAddr> {
    let mut addrs: Vec<_> = addrs.into_iter().collect();
    if let Some(egress) = egress {
        // Stable: the resolver's order within each family.
        addrs.sort_by_key(|addr| addr.is_ipv4() != egress.is_ipv4());
    }
    addrs
}

/// A direct exit.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Direct {
    /// Local address to bind outgoing connections to.
    pub source: Option<IpAddr>,
}

impl Direct {
    /// A direct exit goes through no proxy.
    pub fn proxy(&self) -> Option<&ProxyAddress> {
        None
    }

    /// `direct://` or `direct://SOURCE_IP`.
    pub fn redacted_url(&self) -> String {
        match self.source {
            None => "direct://".to_owned(),
            Some(ip) => format!("direct://{ip}"),
        }
    }

    /// `direct` or `direct-SOURCE_IP`.
    pub fn default_id(&self) -> String {
        match self.source {
            None => "direct".to_owned(),
            Some(ip) => format!("direct-{ip}"),
        }
    }

    /// Connects straight to the origin; the local address is the egress.
    pub async fn open(
        &self,
        ctx: &DialContext<'_>,
        target: &HostPort,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        let lookup = match ctx.lookup {
            Lookup::Origin => {
                tokio::time::timeout_at(ctx.deadline, resolve(&target.host, target.port)).await
            }
            // A health probe's target, the operator's name.
            Lookup::Exit => resolve_exit(&target.host, target.port, ctx.deadline).await,
        };
        let addrs = lookup
            .map_err(|_| ctx.timed_out(Stage::OriginConnect))?
            .map_err(|source| ConnectError::Resolve {
                host: target.host.to_string(),
                source: Arc::new(source),
            })?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no usable address");
        let mut refused = None;
        for addr in in_family_first(addrs, ctx.egress) {
            if self.source.is_some_and(|s| s.is_ipv4() != addr.is_ipv4()) {
                continue;
            }
            if let Err(refusal) = ctx.guard.check(addr) {
                tracing::debug!(origin = %target, %addr, %refusal, "address refused");
                refused.get_or_insert((addr, refusal));
                continue;
            }
            match tokio::time::timeout_at(ctx.deadline, connect_from(addr, self.source)).await {
                Err(_) => return Err(ctx.timed_out(Stage::OriginConnect)),
                Ok(Ok(tcp)) => {
                    let local = tcp.local_addr().ok().map(|a| a.ip());
                    return Ok((tcp, local));
                }
                Ok(Err(e)) => last = e,
            }
        }
        if let Some((addr, refusal)) = refused {
            return Err(ConnectError::Forbidden(Box::new(Forbidden {
                target: target.clone(),
                addr,
                refusal,
            })));
        }
        Err(ConnectError::OriginUnreachable {
            target: target.clone(),
            source: Arc::new(last),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identitys_family_is_dialled_first() {
        let v6: std::net::SocketAddr = "[2001:db8::5]:443".parse().unwrap();
        let v6b: std::net::SocketAddr = "[2001:db8::6]:443".parse().unwrap();
        let v4: std::net::SocketAddr = "192.0.2.5:443".parse().unwrap();
        let v4b: std::net::SocketAddr = "192.0.2.6:443".parse().unwrap();
        let resolved = [v6, v4, v6b, v4b];
        let ipv4_egress = Some("198.51.100.1".parse().unwrap());
        let ipv6_egress = Some("2001:db8::1".parse().unwrap());
        assert_eq!(in_family_first(resolved, ipv4_egress), [v4, v4b, v6, v6b]);
        assert_eq!(in_family_first(resolved, ipv6_egress), [v6, v6b, v4, v4b]);
        assert_eq!(in_family_first(resolved, None), resolved);
    }
}
