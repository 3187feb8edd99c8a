//! `socks5://[user:pass@]host:port`: a SOCKS5 proxy, asked for the origin
//! by name so the exit resolves it (DNS never leaks from this machine),
//! with RFC 1929 user/password authentication when credentials are given.

use std::net::IpAddr;

use tokio::net::TcpStream;

use super::{DialContext, ProxyAddress};
use crate::net::HostPort;
use crate::upstream::error::{ConnectError, Stage};

/// A SOCKS5 exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socks5(pub ProxyAddress);

impl Socks5 {
    /// The proxy's address and credentials.
    pub fn proxy(&self) -> Option<&ProxyAddress> {
        Some(&self.0)
    }

    /// `socks5://user:***@host:port`.
    pub fn redacted_url(&self) -> String {
        self.0.redacted_url("socks5")
    }

    /// Connects to the proxy and asks it for `target`. Returns the reply's
    /// bound address when the exit is set up to report its egress address
    /// that way (servers that report their outgoing socket, such as Dante).
    pub async fn open(
        &self,
        ctx: &DialContext<'_>,
        target: &HostPort,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        let tcp = ctx.dial_proxy(&self.0.proxy).await?;
        let destination = (&*target.host, target.port);
        let handshake = async {
            match ctx.credentials {
                Some(c) => {
                    tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(
                        tcp,
                        destination,
                        &c.user,
                        &c.password,
                    )
                    .await
                }
                None => tokio_socks::tcp::Socks5Stream::connect_with_socket(tcp, destination).await,
            }
        };
        let stream = tokio::time::timeout_at(ctx.deadline, handshake)
            .await
            .map_err(|_| ctx.timed_out(Stage::ExitReply))?
            .map_err(|e| ConnectError::ExitSocks {
                target: target.clone(),
                // Credentials refused, or an exit that asks for a method
                // the URL gives none for (a password it does not have: the
                // SOCKS 407): the exit's fault, not the origin's.
                auth: matches!(
                    e,
                    tokio_socks::Error::PasswordAuthFailure(_)
                        | tokio_socks::Error::NoAcceptableAuthMethods
                        | tokio_socks::Error::UnknownAuthMethod
                ),
                reason: e.to_string(),
            })?;
        let bound = match stream.target_addr() {
            tokio_socks::TargetAddr::Ip(addr) if !addr.ip().is_unspecified() => Some(addr.ip()),
            _ => None,
        };
        let reported = bound.filter(|_| ctx.socks_reply_is_egress);
        Ok((stream.into_inner(), reported))
    }
}
