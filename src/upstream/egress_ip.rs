//! Learning and checking the address a tunnel leaves from.
//!
//! Every new tunnel learns its egress address where it can: the local
//! address for direct exits, the exit's `exit_ip_header` in its CONNECT
//! answer, the SOCKS5 reply, or an IP-echo probe through the exit. On an
//! identity's lane the first address is recorded and every later tunnel
//! must match it before any request is written to it; otherwise the tunnel
//! is refused ([`ConnectError::ExitIpDrift`]) and the identity retires.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::HeaderName;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::dial::{Dialer, ExitKind};
use super::error::{ConnectError, Stage};
use super::tls::Stack;
use crate::net::{default_port, HostPort};

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
    /// Parses `http://host[:port]/path` or `https://...`; the error says
    /// what is wrong.
    pub fn parse(url: &str) -> Result<EchoTarget, String> {
        let bad = || format!("ip_echo must be an http(s) URL, not {url:?}");
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        let authority = HostPort::from_uri(&uri, default_port(https)).map_err(|_| bad())?;
        Ok(EchoTarget {
            https,
            authority,
            path: uri
                .path_and_query()
                .map_or("/".to_owned(), |p| p.to_string()),
        })
    }
}

/// How an exit's tunnels reveal their egress address (per exit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressCheck {
    /// CONNECT answer header stating the egress address.
    pub header: Option<HeaderName>,
    /// IP-echo URL fetched through the exit when no header says it.
    pub echo: Option<EchoTarget>,
}

/// How a lane learns and checks the egress address of its tunnels.
#[derive(Clone, Debug, Default)]
pub struct IpCheck {
    /// CONNECT answer header stating the egress address.
    pub header: Option<HeaderName>,
    /// IP-echo URL fetched through the exit when no header says it.
    pub echo: Option<EchoTarget>,
    /// For an identity's lane: the address every tunnel must leave from,
    /// set by the first tunnel when the identity has none recorded yet.
    pub pinned: Option<Arc<OnceLock<IpAddr>>>,
}

impl Dialer {
    /// On an identity's lane, holds its tunnels to `expected` (the address
    /// the identity's record holds): a lane none of whose tunnels has
    /// stated one yet takes it (its new tunnels are checked against it),
    /// and a lane whose first tunnel stated another (made before the
    /// record knew its address) answers `ExitIpDrift` before the request
    /// is written to any of its connections (the send path then retires
    /// the identity, and its lanes go with it).
    pub(crate) fn hold_to(&self, expected: IpAddr) -> Result<(), ConnectError> {
        match &self.ip_check.pinned {
            Some(pinned) => hold(pinned, expected),
            None => Ok(()),
        }
    }

    /// Whether a connection another lane of this exit and session opened,
    /// which left from `egress` (`None`: unknown), may carry this lane's
    /// requests (see `LanePool::hand_over`): on an identity's lane, only
    /// one from the address the lane holds, or, when the lane holds none
    /// and the exit states no address in any way, one from an unknown
    /// address. Stricter than a new tunnel's check (which may take the
    /// lane's first address from the tunnel, or probe for it), and it
    /// changes nothing.
    pub(crate) fn admits(&self, egress: Option<IpAddr>) -> bool {
        admitted(&self.ip_check, self.socks_reply_is_egress, egress)
    }

    /// Learns the tunnel's egress address and, on an identity's lane,
    /// refuses a tunnel that leaves from another address than the first.
    pub(crate) async fn check_egress(
        &self,
        reported: Option<IpAddr>,
        deadline: Instant,
    ) -> Result<Option<IpAddr>, ConnectError> {
        let check = &self.ip_check;
        let observed = match (reported, &check.echo, &check.pinned) {
            (Some(ip), _, _) => Some(ip),
            (None, Some(echo), Some(_)) => Some(self.echo_probe(echo, deadline).await?),
            // Cookie-less traffic's tunnel: its address is the one an
            // identity founded by an answer on it earned its cookies from,
            // and is checked against from then on; without it, the
            // identity's first own tunnel would set whatever address the
            // session had moved to by then. Best effort: a probe that fails
            // costs the cookie-less request nothing (the address stays
            // unknown, as before the probe), and it may take half the time
            // left at most, so that the tunnel's own TLS handshake still
            // has the rest.
            (None, Some(echo), None) => {
                let now = Instant::now();
                let half = now + deadline.saturating_duration_since(now) / 2;
                self.echo_probe(echo, half).await.ok()
            }
            _ => None,
        };
        let Some(pinned) = &check.pinned else {
            return Ok(observed);
        };
        match observed {
            Some(observed) => {
                let expected = *pinned.get_or_init(|| observed);
                if expected != observed {
                    return Err(ConnectError::ExitIpDrift { expected, observed });
                }
            }
            // The exit promised to state its address and did not: this
            // tunnel cannot be trusted with an identity.
            None if check.header.is_some() => {
                return Err(ConnectError::ExitIpUnknown(format!(
                    "the CONNECT answer has no {} header",
                    check.header.as_ref().map_or("", |h| h.as_str())
                )))
            }
            // Likewise a SOCKS5 exit set up to state its address in its
            // reply, whose reply stated none (`0.0.0.0`, `::` or a name).
            None if self.socks_reply_is_egress && matches!(self.kind, ExitKind::Socks5(_)) => {
                return Err(ConnectError::ExitIpUnknown(
                    "the SOCKS5 reply states no usable address (0.0.0.0, :: or a name), and \
                     socks_reply_is_egress promises one: set it only for servers that report \
                     their outgoing socket (Dante does, microsocks does not), or use ip_echo"
                        .into(),
                ))
            }
            // The identity's address is known, but this exit no longer
            // states one (its exit_ip_header, ip_echo or
            // socks_reply_is_egress was taken away): the tunnel cannot be
            // checked, and the identity is not sent through it blindly.
            None if pinned.get().is_some() => {
                return Err(ConnectError::ExitIpUnknown(format!(
                    "the identity left from {} before, and the exit states no address for this \
                     tunnel to check it against (no exit_ip_header or ip_echo configured now, or a \
                     SOCKS reply without a usable address); if the exit can no longer state \
                     addresses, evict the identity",
                    pinned.get().map_or_else(String::new, ToString::to_string)
                )))
            }
            None => {}
        }
        Ok(observed)
    }

    /// Fetches the IP-echo URL through the exit (same credentials, so the
    /// same upstream session) and parses the body as an address. A probe on
    /// another connection cannot prove the address of this one; it only
    /// catches a session that moved.
    async fn echo_probe(
        &self,
        echo: &EchoTarget,
        deadline: Instant,
    ) -> Result<IpAddr, ConnectError> {
        let unknown = |why: String| ConnectError::ExitIpUnknown(format!("IP-echo probe: {why}"));
        let (tcp, _) = self.open_transport(&echo.authority, deadline).await?;
        let fetch = async {
            let io: Box<dyn IoStream> = if echo.https {
                Box::new(
                    self.tls
                        .connect(&echo.authority.host, tcp, Stack::Rustls { h2: false })
                        .await
                        .map_err(|e| e.to_string())?,
                )
            } else {
                Box::new(tcp)
            };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let request = http::Request::get(echo.path.as_str())
                .header(http::header::HOST, echo.authority.to_string())
                .header(http::header::CONNECTION, "close")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            let body = Limited::new(response.into_body(), 1024)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let text = String::from_utf8_lossy(&body);
            text.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("the body {:?} is not an IP address", text.trim()))
        };
        tokio::time::timeout_at(deadline, fetch)
            .await
            .map_err(|_| self.context(deadline).timed_out(Stage::ExitReply))?
            .map_err(unknown)
    }
}

/// A byte stream the IP-echo probe can speak HTTP over.
trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

/// Whether a lane checked by `check` (whose exit's SOCKS replies state
/// addresses: `socks_states`) admits a connection from `egress` (see
/// [`Dialer::admits`]).
fn admitted(check: &IpCheck, socks_states: bool, egress: Option<IpAddr>) -> bool {
    match (&check.pinned, egress) {
        (None, _) => true,
        (Some(pinned), Some(egress)) => pinned.get() == Some(&egress),
        (Some(pinned), None) => {
            pinned.get().is_none()
                && check.header.is_none()
                && check.echo.is_none()
                && !socks_states
        }
    }
}

/// Holds a lane's address cell `pinned` to `expected`: set when empty, an
/// error when it holds another.
fn hold(pinned: &OnceLock<IpAddr>, expected: IpAddr) -> Result<(), ConnectError> {
    let held = *pinned.get_or_init(|| expected);
    if held != expected {
        return Err(ConnectError::ExitIpDrift {
            expected,
            observed: held,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_from_another_lane_is_admitted_only_from_the_lanes_address() {
        let (held, other) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3]));
        let lane = |pinned: Option<IpAddr>| IpCheck {
            pinned: Some(Arc::new(pinned.map_or_else(OnceLock::new, OnceLock::from))),
            ..IpCheck::default()
        };
        // Cookie-less lanes take any.
        assert!(admitted(&IpCheck::default(), false, Some(other)));
        // An identity's: its address only, and it is not taken from the
        // connection.
        assert!(admitted(&lane(Some(held)), false, Some(held)));
        assert!(!admitted(&lane(Some(held)), false, Some(other)));
        assert!(!admitted(&lane(Some(held)), false, None));
        let unset = lane(None);
        assert!(!admitted(&unset, false, Some(held)));
        assert!(unset.pinned.as_ref().is_some_and(|p| p.get().is_none()));
        // An unknown address, only where the exit states none in any way.
        assert!(admitted(&unset, false, None));
        assert!(!admitted(&unset, true, None));
        let header = IpCheck {
            header: Some(HeaderName::from_static("x-exit-ip")),
            ..lane(None)
        };
        assert!(!admitted(&header, false, None));
        let echo = IpCheck {
            echo: Some(EchoTarget::parse("http://127.0.0.1:9/ip").unwrap()),
            ..lane(None)
        };
        assert!(!admitted(&echo, false, None));
    }

    #[test]
    fn a_lane_is_held_to_its_identitys_recorded_address() {
        let (recorded, other) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3]));
        // A lane none of whose tunnels stated an address takes the record's.
        let empty = OnceLock::new();
        assert!(hold(&empty, recorded).is_ok());
        assert_eq!(empty.get(), Some(&recorded));
        assert!(hold(&empty, recorded).is_ok());
        // One whose first tunnel left from elsewhere is refused.
        let elsewhere = OnceLock::from(other);
        match hold(&elsewhere, recorded) {
            Err(ConnectError::ExitIpDrift { expected, observed }) => {
                assert_eq!((expected, observed), (recorded, other));
            }
            wrong => panic!("{wrong:?}"),
        }
    }
}
