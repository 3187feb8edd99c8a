//! `socks5://[user:pass@]host:port`: a SOCKS5 proxy, asked for the origin
//! by name so the exit resolves it (DNS never leaks from this machine),
//! with RFC 1929 user/password authentication when credentials are given.
//!
//! The handshake (RFC 1928) is written here rather than taken from a crate
//! because of what it must offer: exactly one authentication method. The
//! crate pinproxy used first offered "no authentication" beside the user
//! name and password, so a server that lets this machine in without them
//! (an allow-listed source address) picked "none", never received the
//! `{session}` user name, and the identity's sticky session was silently
//! lost: its IP could change while its cookies stayed pinned to the exit.
//! Offering only the method the URL asks for, an exit either takes the
//! credentials or refuses the tunnel. Owning the handshake also lets every
//! failure be placed where it belongs: a server that does not speak SOCKS5,
//! closes mid-handshake or chooses a method it was not offered is the
//! exit's fault and counts against it; a failure reply for the target is
//! not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{DialContext, ProxyAddress, ProxyAuth};
use crate::net::HostPort;
use crate::upstream::error::{ConnectError, Stage};

/// The protocol version byte of every SOCKS5 message.
const VERSION: u8 = 0x05;
/// The method "no authentication required".
const NO_AUTH: u8 = 0x00;
/// The method "user name and password" (RFC 1929).
const USER_PASSWORD: u8 = 0x02;
/// The server's answer "none of the methods offered is acceptable".
const NO_ACCEPTABLE: u8 = 0xff;
/// The RFC 1929 sub-negotiation's version byte.
const AUTH_VERSION: u8 = 0x01;
/// The `CONNECT` command.
const CONNECT: u8 = 0x01;
/// Address types.
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// The longest user name, password or host name a SOCKS5 message can
/// carry (one length byte).
pub const MAX_FIELD: usize = 255;

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
        let mut tcp = ctx.dial_proxy(&self.0.proxy).await?;
        let bound =
            tokio::time::timeout_at(ctx.deadline, handshake(&mut tcp, target, ctx.credentials))
                .await
                .map_err(|_| ctx.timed_out(Stage::ExitReply))?
                .map_err(|e| e.into_connect_error(target))?;
        let reported = bound.filter(|_| ctx.socks_reply_is_egress);
        Ok((tcp, reported))
    }
}

/// What went wrong in a SOCKS5 handshake, by whose fault.
#[derive(Debug, PartialEq, Eq)]
enum HandshakeError {
    /// The exit did not keep to SOCKS5: not SOCKS5 at all, closed the
    /// connection, chose a method it was not offered, or cannot do what
    /// every tunnel asks (`CONNECT`, an address by name). The exit's fault.
    Protocol(String),
    /// It closed, or the connection failed, once the `CONNECT` was sent:
    /// the exit's fault, or the origin's (an exit that could not reach it
    /// may close instead of answering).
    ClosedAfterConnect(String),
    /// Authentication failed or was asked for without credentials in the
    /// URL. The exit's (or its URL's) fault.
    Auth(String),
    /// The exit answered the `CONNECT` with a failure: about the target,
    /// not the exit.
    Refused(String),
}

impl HandshakeError {
    fn into_connect_error(self, target: &HostPort) -> ConnectError {
        let (auth, reason) = match self {
            HandshakeError::Protocol(reason) => {
                return ConnectError::ExitSocksProtocol {
                    reason,
                    after_connect: false,
                }
            }
            HandshakeError::ClosedAfterConnect(reason) => {
                return ConnectError::ExitSocksProtocol {
                    reason,
                    after_connect: true,
                }
            }
            HandshakeError::Auth(reason) => (true, reason),
            HandshakeError::Refused(reason) => (false, reason),
        };
        ConnectError::ExitSocks {
            target: target.clone(),
            auth,
            reason,
        }
    }
}

/// How an I/O failure during the handshake is told.
const CONNECTION_FAILED: &str = "connection failed during the handshake";

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> HandshakeError {
        HandshakeError::Protocol(format!("{CONNECTION_FAILED}: {e}"))
    }
}

/// Runs the handshake on `io`: one method offered (user/password when
/// there are credentials, else none), the sub-negotiation, and `CONNECT`
/// for `target` by name. Reads exactly the server's messages, so bytes
/// that follow the reply stay for the tunnel. Returns the reply's bound
/// address, if it states one.
async fn handshake<S>(
    io: &mut S,
    target: &HostPort,
    credentials: Option<&ProxyAuth>,
) -> Result<Option<IpAddr>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Everything is checked before a byte is sent.
    let connect = connect_request(target)?;
    let offered = match credentials {
        Some(c) => {
            check_credentials(c).map_err(HandshakeError::Auth)?;
            USER_PASSWORD
        }
        None => NO_AUTH,
    };
    io.write_all(&[VERSION, 1, offered]).await?;
    let mut choice = [0u8; 2];
    io.read_exact(&mut choice).await?;
    if choice[0] != VERSION {
        return Err(HandshakeError::Protocol(format!(
            "the exit's answer is not SOCKS5 (it begins {:#04x} {:#04x})",
            choice[0], choice[1]
        )));
    }
    match (choice[1], credentials) {
        (chosen, _) if chosen == NO_ACCEPTABLE => {
            return Err(HandshakeError::Auth(match credentials {
                Some(_) => "the exit does not take a user name and password".into(),
                None => "the exit wants credentials and its URL has none".into(),
            }))
        }
        (chosen, Some(c)) if chosen == USER_PASSWORD => authenticate(io, c).await?,
        (chosen, None) if chosen == NO_AUTH => {}
        (chosen, None) if chosen == USER_PASSWORD => {
            return Err(HandshakeError::Auth(
                "the exit wants a user name and password and its URL has none".into(),
            ))
        }
        (chosen, Some(_)) if chosen == NO_AUTH => {
            // Going on would lose the credentials, and with them the
            // identity's `{session}`: the exit could give it any IP.
            return Err(HandshakeError::Protocol(
                "the exit chose no authentication although only user/password was offered \
                 (the user name, and any {session} in it, would never reach it)"
                    .into(),
            ));
        }
        (chosen, _) => {
            return Err(HandshakeError::Protocol(format!(
                "the exit chose authentication method {chosen:#04x}, which was not offered"
            )))
        }
    }
    io.write_all(&connect).await?;
    read_reply(io).await.map_err(|e| match e {
        HandshakeError::Protocol(reason) if reason.starts_with(CONNECTION_FAILED) => {
            HandshakeError::ClosedAfterConnect(reason)
        }
        other => other,
    })
}

/// Whether `c` fits RFC 1929's fields: a user name of 1 to 255 bytes and a
/// password of at most 255 (an empty one is sent empty, as curl does).
pub fn check_credentials(c: &ProxyAuth) -> Result<(), String> {
    if c.user.is_empty() || c.user.len() > MAX_FIELD {
        return Err(format!(
            "a SOCKS5 user name must be 1 to {MAX_FIELD} bytes; this one is {} \
             (with its {{session}} filled in)",
            c.user.len()
        ));
    }
    if c.password.len() > MAX_FIELD {
        return Err(format!(
            "a SOCKS5 password must be at most {MAX_FIELD} bytes; this one is {}",
            c.password.len()
        ));
    }
    Ok(())
}

/// The RFC 1929 sub-negotiation.
async fn authenticate<S>(io: &mut S, c: &ProxyAuth) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut message = Vec::with_capacity(3 + c.user.len() + c.password.len());
    message.extend_from_slice(&[AUTH_VERSION, c.user.len() as u8]);
    message.extend_from_slice(c.user.as_bytes());
    message.push(c.password.len() as u8);
    message.extend_from_slice(c.password.as_bytes());
    io.write_all(&message).await?;
    let mut status = [0u8; 2];
    io.read_exact(&mut status).await?;
    // Only the status byte is judged: some servers answer with version 5
    // here, and a wrong version byte does not make a success a refusal.
    if status[1] != 0 {
        return Err(HandshakeError::Auth(format!(
            "the exit refused the user name and password (status {})",
            status[1]
        )));
    }
    Ok(())
}

/// `CONNECT` for `target`: an IP literal as an address, a name as a name,
/// so the exit resolves it.
fn connect_request(target: &HostPort) -> Result<Vec<u8>, HandshakeError> {
    let host = crate::net::unbracket(&target.host);
    let mut request = vec![VERSION, CONNECT, 0];
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        request.push(ATYP_IPV4);
        request.extend_from_slice(&ip.octets());
    } else if let Ok(ip) = host.parse::<Ipv6Addr>() {
        request.push(ATYP_IPV6);
        request.extend_from_slice(&ip.octets());
    } else if host.is_empty() || host.len() > MAX_FIELD {
        // The client's target, not the exit's fault.
        return Err(HandshakeError::Refused(format!(
            "a host name of {} bytes cannot be asked for over SOCKS5 (1 to {MAX_FIELD})",
            host.len()
        )));
    } else {
        request.push(ATYP_DOMAIN);
        request.push(host.len() as u8);
        request.extend_from_slice(host.as_bytes());
    }
    request.extend_from_slice(&target.port.to_be_bytes());
    Ok(request)
}

/// Reads the reply to `CONNECT`, exactly: its head, then the bound address
/// its type announces. A failure code is the target's refusal, but the one
/// that says the exit cannot `CONNECT` at all.
async fn read_reply<S>(io: &mut S) -> Result<Option<IpAddr>, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let mut head = [0u8; 4];
    io.read_exact(&mut head).await?;
    let [version, reply, _reserved, address_type] = head;
    if version != VERSION {
        return Err(HandshakeError::Protocol(format!(
            "the reply to CONNECT is not SOCKS5 (version byte {version:#04x})"
        )));
    }
    match reply {
        0 => {}
        // The exit cannot do what every tunnel asks of it (a `CONNECT`):
        // its fault, whatever the origin. "Address type not supported" is
        // not counted: servers also answer it for a name that resolves
        // only to a family the exit's host lacks (microsocks turns
        // `EAFNOSUPPORT` into it), which is about the target.
        0x07 => return Err(HandshakeError::Protocol(reply_text(reply))),
        _ => return Err(HandshakeError::Refused(reply_text(reply))),
    }
    let bound = match address_type {
        ATYP_IPV4 => {
            let mut rest = [0u8; 4 + 2];
            io.read_exact(&mut rest).await?;
            Some(IpAddr::from([rest[0], rest[1], rest[2], rest[3]]))
        }
        ATYP_IPV6 => {
            let mut rest = [0u8; 16 + 2];
            io.read_exact(&mut rest).await?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&rest[..16]);
            Some(IpAddr::from(octets))
        }
        ATYP_DOMAIN => {
            let mut len = [0u8; 1];
            io.read_exact(&mut len).await?;
            let mut rest = vec![0u8; usize::from(len[0]) + 2];
            io.read_exact(&mut rest).await?;
            None
        }
        other => {
            return Err(HandshakeError::Protocol(format!(
                "the reply to CONNECT has an unknown address type {other:#04x}"
            )))
        }
    };
    // `0.0.0.0` or `::` states nothing (microsocks answers so).
    Ok(bound.filter(|ip| !ip.is_unspecified()))
}

/// RFC 1928's words for a reply code.
fn reply_text(code: u8) -> String {
    let text = match code {
        0x01 => "general SOCKS server failure",
        0x02 => "connection not allowed by ruleset",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "an unassigned reply code",
    };
    format!("{text} (reply {code:#04x})")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tokio::io::duplex;

    fn credentials() -> ProxyAuth {
        ProxyAuth {
            user: "cust-session-0123456789abcdef".into(),
            password: "pw".into(),
        }
    }

    /// Runs the handshake against a server that reads `expect` (each
    /// message in turn) and answers `answers` after each; returns the
    /// handshake's result and what the server received.
    async fn against(
        target: &str,
        credentials: Option<ProxyAuth>,
        script: Vec<(usize, Vec<u8>)>,
    ) -> (Result<Option<IpAddr>, HandshakeError>, Vec<u8>) {
        let (mut client, mut server) = duplex(4096);
        let target = HostPort::parse(target).unwrap();
        let server = tokio::spawn(async move {
            let mut received = Vec::new();
            for (read, answer) in script {
                let mut buf = vec![0u8; read];
                if server.read_exact(&mut buf).await.is_err() {
                    break;
                }
                received.extend_from_slice(&buf);
                server.write_all(&answer).await.unwrap();
            }
            received
        });
        let result = handshake(&mut client, &target, credentials.as_ref()).await;
        drop(client);
        (result, server.await.unwrap())
    }

    fn connect_reply() -> Vec<u8> {
        vec![5, 0, 0, 1, 127, 0, 0, 3, 0x1f, 0x90]
    }

    #[tokio::test]
    async fn credentials_offer_only_user_password_and_reach_the_exit() {
        let user = credentials().user;
        let auth_len = 3 + user.len() + 2;
        let connect_len = 4 + 1 + "origin.example".len() + 2;
        let (result, received) = against(
            "origin.example:443",
            Some(credentials()),
            vec![
                (3, vec![5, 2]),
                (auth_len, vec![1, 0]),
                (connect_len, connect_reply()),
            ],
        )
        .await;
        assert_eq!(result, Ok(Some("127.0.0.3".parse().unwrap())));
        assert_eq!(&received[..3], &[5, 1, 2], "one method offered");
        assert_eq!(received[3..5], [1, user.len() as u8]);
        assert_eq!(&received[5..5 + user.len()], user.as_bytes());
        let connect = &received[3 + auth_len..];
        assert_eq!(&connect[..5], &[5, 1, 0, 3, 14], "asked for by name");
        assert_eq!(&connect[5..19], b"origin.example");
        assert_eq!(&connect[19..], &443u16.to_be_bytes());
    }

    /// A server that picks "no authentication" when only user/password was
    /// offered would never see the `{session}`: refused, as the exit's
    /// protocol fault, and the `CONNECT` is never sent.
    #[tokio::test]
    async fn an_exit_choosing_no_authentication_over_credentials_is_refused() {
        let (result, received) = against(
            "origin.example:443",
            Some(credentials()),
            vec![(3, vec![5, 0]), (64, connect_reply())],
        )
        .await;
        assert!(
            matches!(&result, Err(HandshakeError::Protocol(m)) if m.contains("no authentication")),
            "{result:?}"
        );
        assert_eq!(received, vec![5, 1, 2], "nothing after the greeting");
    }

    #[tokio::test]
    async fn without_credentials_only_no_authentication_is_offered() {
        let (result, received) = against(
            "[2001:db8::7]:8443",
            None,
            vec![(3, vec![5, 0]), (4 + 16 + 2, connect_reply())],
        )
        .await;
        assert_eq!(result, Ok(Some("127.0.0.3".parse().unwrap())));
        assert_eq!(&received[..3], &[5, 1, 0]);
        assert_eq!(
            &received[3..7],
            &[5, 1, 0, 4],
            "an IPv6 literal as an address"
        );
        let (result, _) = against("origin.example:443", None, vec![(3, vec![5, 2])]).await;
        assert!(matches!(result, Err(HandshakeError::Auth(_))), "{result:?}");
        let (result, _) = against("origin.example:443", None, vec![(3, vec![5, 0xff])]).await;
        assert!(matches!(result, Err(HandshakeError::Auth(_))), "{result:?}");
    }

    /// What is not SOCKS5, or stops halfway, is the exit's fault; a failure
    /// reply is the target's.
    #[tokio::test]
    async fn failures_are_placed_where_they_belong() {
        let http = b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec();
        let (result, _) = against("origin.example:443", None, vec![(3, http)]).await;
        assert!(
            matches!(result, Err(HandshakeError::Protocol(_))),
            "{result:?}"
        );
        // Closed after the greeting.
        let (result, _) = against("origin.example:443", None, vec![]).await;
        assert!(
            matches!(result, Err(HandshakeError::Protocol(_))),
            "{result:?}"
        );
        let (result, _) = against(
            "origin.example:443",
            Some(credentials()),
            vec![
                (3, vec![5, 2]),
                (3 + credentials().user.len() + 2, vec![1, 1]),
            ],
        )
        .await;
        assert!(matches!(result, Err(HandshakeError::Auth(_))), "{result:?}");
        let (result, _) = against(
            "origin.example:443",
            None,
            vec![(3, vec![5, 0]), (21, vec![5, 4, 0, 1, 0, 0, 0, 0, 0, 0])],
        )
        .await;
        assert_eq!(
            result,
            Err(HandshakeError::Refused(
                "host unreachable (reply 0x04)".into()
            ))
        );
        let (result, _) = against(
            "origin.example:443",
            None,
            vec![(3, vec![5, 0]), (21, vec![5, 0, 0, 9])],
        )
        .await;
        assert!(
            matches!(result, Err(HandshakeError::Protocol(_))),
            "{result:?}"
        );
        // A CONNECT it cannot make is the exit's own; an address type it
        // refuses may be about the target (a name with IPv6 addresses only,
        // an exit without IPv6).
        let reply = |code| vec![(3, vec![5, 0]), (21, vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0])];
        let (result, _) = against("origin.example:443", None, reply(7)).await;
        assert!(
            matches!(result, Err(HandshakeError::Protocol(_))),
            "{result:?}"
        );
        let (result, _) = against("origin.example:443", None, reply(8)).await;
        assert!(
            matches!(result, Err(HandshakeError::Refused(_))),
            "{result:?}"
        );
        // Closed once the CONNECT went: perhaps the origin's doing.
        let (result, _) = against(
            "origin.example:443",
            None,
            vec![(3, vec![5, 0]), (21, vec![])],
        )
        .await;
        assert!(
            matches!(result, Err(HandshakeError::ClosedAfterConnect(_))),
            "{result:?}"
        );
        let doubtful = result
            .unwrap_err()
            .into_connect_error(&HostPort::new("o", 1));
        assert!(doubtful.is_exit_fault() && doubtful.may_be_the_origins());
        // A bound name, or an unspecified address, states nothing.
        let mut named = vec![5, 0, 0, 3, 4];
        named.extend_from_slice(b"exit\x1f\x90");
        let (result, _) = against(
            "origin.example:443",
            None,
            vec![(3, vec![5, 0]), (21, named)],
        )
        .await;
        assert_eq!(result, Ok(None));
        let unspecified = vec![5, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let (result, _) = against(
            "origin.example:443",
            None,
            vec![(3, vec![5, 0]), (21, unspecified)],
        )
        .await;
        assert_eq!(result, Ok(None));
    }

    /// The reply is read exactly: bytes the origin sent right behind it
    /// stay on the stream for the tunnel.
    #[tokio::test]
    async fn bytes_after_the_reply_stay_for_the_tunnel() {
        let (mut client, mut server) = duplex(4096);
        let target = HostPort::parse("origin.example:25").unwrap();
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 3];
            server.read_exact(&mut buf).await.unwrap();
            server.write_all(&[5, 0]).await.unwrap();
            let mut buf = [0u8; 21];
            server.read_exact(&mut buf).await.unwrap();
            let mut reply = connect_reply();
            reply.extend_from_slice(b"220 banner\r\n");
            server.write_all(&reply).await.unwrap();
            server
        });
        handshake(&mut client, &target, None).await.unwrap();
        let _server = server.await.unwrap();
        let mut banner = [0u8; 12];
        client.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 banner\r\n");
    }

    #[test]
    fn fields_over_a_length_byte_are_refused_before_sending() {
        let long = ProxyAuth {
            user: "u".repeat(256),
            password: String::new(),
        };
        assert!(check_credentials(&long).is_err());
        let empty_user = ProxyAuth {
            user: String::new(),
            password: "pw".into(),
        };
        assert!(check_credentials(&empty_user).is_err());
        let empty_password = ProxyAuth {
            user: "u".into(),
            password: String::new(),
        };
        assert_eq!(check_credentials(&empty_password), Ok(()));
        let long_host = HostPort::new(&"a".repeat(256), 443);
        assert!(matches!(
            connect_request(&long_host),
            Err(HandshakeError::Refused(_))
        ));
    }
}
