//! `http://[user:pass@]host:port`: an HTTP proxy asked for a tunnel with
//! `CONNECT`, Basic credentials in `Proxy-Authorization`. Plain-HTTP
//! origins are reached with CONNECT too (to port 80): inside a tunnel the
//! exit cannot add `Via` or `X-Forwarded-For` headers of its own.

use std::io;
use std::net::IpAddr;

use http::HeaderName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{DialContext, ProxyAddress, ProxyAuth};
use crate::net::HostPort;
use crate::upstream::error::{ConnectError, Stage};

/// Largest CONNECT answer header section read from an exit.
const MAX_CONNECT_REPLY: usize = 16 * 1024;

/// An HTTP CONNECT exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConnect(pub ProxyAddress);

impl HttpConnect {
    /// The proxy's address and credentials.
    pub fn proxy(&self) -> Option<&ProxyAddress> {
        Some(&self.0)
    }

    /// `http://user:***@host:port`.
    pub fn redacted_url(&self) -> String {
        self.0.redacted_url("http")
    }

    /// Connects to the proxy and sends CONNECT for `target`; returns the
    /// egress address the answer states, if the exit is set up to state one.
    pub async fn open(
        &self,
        ctx: &DialContext<'_>,
        target: &HostPort,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        let mut tcp = ctx.dial_proxy(&self.0.proxy).await?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
        if let Some(auth) = ctx.credentials.map(ProxyAuth::basic_header) {
            request.extend_from_slice(b"Proxy-Authorization: ");
            request.extend_from_slice(auth.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let exchange = async {
            tcp.write_all(&request).await?;
            read_connect_reply(&mut tcp, ctx.ip_header).await
        };
        let (status, reason, stated_ip) = tokio::time::timeout_at(ctx.deadline, exchange)
            .await
            .map_err(|_| ctx.timed_out(Stage::ExitReply))?
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => ConnectError::ExitProtocol(e.to_string()),
                _ => ConnectError::ExitProtocol(format!("connection failed: {e}")),
            })?;
        if (200..300).contains(&status) {
            Ok((tcp, stated_ip))
        } else {
            Err(ConnectError::ExitRefused {
                target: target.clone(),
                status,
                reason,
            })
        }
    }
}

/// Reads a CONNECT answer head: its status, reason and the address stated
/// in `ip_header`. Exactly the head is taken off the socket (what follows
/// is peeked at, never read): after a `200`, bytes that came with the head
/// are the tunnel's (an origin that speaks first, such as SSH or SMTP, may
/// have its banner arrive with it), and after a refusal they are its error
/// page, which says nothing against the exit the status does not.
async fn read_connect_reply(
    tcp: &mut TcpStream,
    ip_header: Option<&HeaderName>,
) -> io::Result<(u16, String, Option<IpAddr>)> {
    // The head so far: it ends in none of it yet.
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        // Waits for bytes, and leaves them on the socket.
        let n = tcp.peek(&mut chunk).await?;
        let Some(peeked) = chunk.get(..n).filter(|p| !p.is_empty()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the exit closed the connection before answering",
            ));
        };
        // The head so far with the peeked bytes: they are taken off the
        // socket below, all of them or those that end the head.
        let taken = head.len();
        head.extend_from_slice(peeked);
        // A head ends with a line feed: without a new one there is nothing
        // new to parse (an exit answering a byte at a time would otherwise
        // have the whole head parsed again for every byte).
        let parsed = if memchr::memchr(b'\n', peeked).is_some() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut reply = httparse::Response::new(&mut headers);
            match reply.parse(&head) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = reply.code.unwrap_or(0);
                    let reason = reply.reason.unwrap_or("").to_owned();
                    let stated_ip = ip_header.and_then(|name| {
                        reply
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name.as_str()))
                            .and_then(|h| std::str::from_utf8(h.value).ok())
                            .and_then(|v| v.trim().parse::<IpAddr>().ok())
                    });
                    Some((len, (status, reason, stated_ip)))
                }
                Ok(httparse::Status::Partial) => None,
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        } else {
            None
        };
        if let Some((len, answer)) = parsed {
            // The rest of the head, and not a byte more.
            let mut rest = vec![0u8; len.saturating_sub(taken)];
            tcp.read_exact(&mut rest).await?;
            return Ok(answer);
        }
        if head.len() >= MAX_CONNECT_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the CONNECT answer header is too large",
            ));
        }
        // All of it is head (already in `head`): taken off, so that the
        // next peek waits for more.
        if let Some(peeked) = chunk.get_mut(..n) {
            tcp.read_exact(peeked).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The answer `read_connect_reply` reads from an exit that writes
    /// `reply` in pieces of `piece` bytes.
    async fn reply_in_pieces(
        reply: Vec<u8>,
        piece: usize,
    ) -> io::Result<(u16, String, Option<IpAddr>)> {
        reply_and_after(reply, piece, 0)
            .await
            .map(|(answer, _)| answer)
    }

    /// [`reply_in_pieces`], and then the `after` bytes the socket holds
    /// past the answer's head.
    async fn reply_and_after(
        reply: Vec<u8>,
        piece: usize,
        after: usize,
    ) -> io::Result<((u16, String, Option<IpAddr>), Vec<u8>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let exit = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            for part in reply.chunks(piece) {
                socket.write_all(part).await?;
                socket.flush().await?;
            }
            // Held open until the reader is done with it.
            let mut rest = Vec::new();
            socket.read_to_end(&mut rest).await.map(drop)
        });
        let mut tcp = TcpStream::connect(addr).await?;
        let header = HeaderName::from_static("x-exit-ip");
        let read = read_connect_reply(&mut tcp, Some(&header)).await;
        let mut rest = vec![0u8; after];
        if read.is_ok() {
            tcp.read_exact(&mut rest).await?;
        }
        drop(tcp);
        let _ = exit.await;
        read.map(|answer| (answer, rest))
    }

    /// A refusal with an error page (Squid writes one with every refusal)
    /// is the refusal: its page says nothing against the exit. It used to
    /// be taken for a broken exit, and counted against its health.
    #[tokio::test]
    async fn a_refusal_with_a_page_is_read_as_the_refusal() {
        let reply = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n\
                      Content-Length: 9\r\n\r\n<html/>\r\n"
            .to_vec();
        for piece in [1, 7, 4096] {
            let (status, reason, _) = reply_in_pieces(reply.clone(), piece).await.unwrap();
            assert_eq!((status, reason.as_str()), (503, "Service Unavailable"));
        }
    }

    /// Bytes that came with a `200` are the tunnel's: they stay on the
    /// socket, as an origin's banner (SSH, SMTP) must reach its client.
    #[tokio::test]
    async fn bytes_after_an_accepted_connect_stay_for_the_tunnel() {
        let banner = b"SSH-2.0-x\r\n";
        let mut reply = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
        reply.extend_from_slice(banner);
        for piece in [1, 5, 4096] {
            let ((status, _, _), after) = reply_and_after(reply.clone(), piece, banner.len())
                .await
                .unwrap();
            assert_eq!((status, after.as_slice()), (200, &banner[..]));
        }
    }

    #[tokio::test]
    async fn an_answer_written_a_byte_at_a_time_is_read_whole() {
        let reply = b"HTTP/1.1 200 Connection established\r\nX-Exit-IP: 127.0.0.9\r\n\r\n".to_vec();
        let (status, reason, ip) = reply_in_pieces(reply, 1).await.unwrap();
        assert_eq!(
            (status, reason.as_str(), ip),
            (200, "Connection established", "127.0.0.9".parse().ok())
        );
    }

    #[tokio::test]
    async fn an_answer_with_no_line_end_is_refused_at_the_bound() {
        let mut reply = b"HTTP/1.1 200 ".to_vec();
        reply.resize(MAX_CONNECT_REPLY + 1024, b'o');
        let error = reply_in_pieces(reply, 1024).await.unwrap_err();
        assert_eq!(error.to_string(), "the CONNECT answer header is too large");
    }
}
