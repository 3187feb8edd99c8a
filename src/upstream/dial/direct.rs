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
use super::{connect_from, resolve, DialContext, ProxyAddress};
use crate::net::HostPort;
use crate::upstream::error::{ConnectError, Stage};

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
        let addrs = tokio::time::timeout_at(ctx.deadline, resolve(&target.host, target.port))
            .await
            .map_err(|_| ctx.timed_out(Stage::OriginConnect))?
            .map_err(|source| ConnectError::Resolve {
                host: target.host.to_string(),
                source: Arc::new(source),
            })?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no usable address");
        let mut refused = None;
        for addr in addrs {
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
