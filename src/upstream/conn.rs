//! One new connection to an origin through one exit, for one lane: the
//! transport through the exit, its egress address checked, then TLS for
//! `https` origins with the lane's ClientHello. The connection carries the
//! facts about its tunnel ([`TunnelInfo`]) to every response on it.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::dial::Dialer;
use super::error::{ConnectError, Stage};
use super::tls::{Gap, SessionSlot, Shape, Stack, TlsConn};
use crate::fingerprint::client_hello::Occasion;
use crate::fingerprint::ja4;
use crate::identity::ExitId;
use crate::net::HostPort;

/// Facts about an upstream connection, attached to every response it carries.
#[derive(Debug)]
pub struct TunnelInfo {
    /// The exit the connection goes through.
    pub exit: ExitId,
    /// The address the tunnel leaves from, where known.
    pub egress_ip: Option<IpAddr>,
    /// The JA4 of the ClientHello that left (TLS connections).
    pub sent_ja4: Option<Arc<str>>,
    /// What of the client's ClientHello the stack could not say.
    pub gaps: Arc<[Gap]>,
    /// What the connection was for, where that changes what a client's
    /// hello says (an address, HTTP/1.1 alone): the identity's recorded
    /// hello said on this occasion is what [`TunnelInfo::sent_ja4`] is
    /// compared with.
    pub occasion: Occasion,
    /// How long the connection took to open.
    pub timings: ConnectTimings,
    /// Where the connection keeps the TLS sessions its origin issues (see
    /// `tls::SessionSlot`): its identity's, or on a cookie-less lane one of
    /// its own, which the identity an answer on it founds takes over.
    pub(crate) sessions: Option<Arc<SessionSlot>>,
    /// An answer on it founded an identity (see [`TunnelInfo::founded_one`]).
    founded: AtomicBool,
}

impl TunnelInfo {
    /// An answer on this connection (a cookie-less lane's) set a tracked
    /// cookie, founding an identity: the origin linked the connection to
    /// whoever holds the cookie when it set it there, so no other visitor's
    /// request may take it again (it goes to the identity, or closes).
    pub(crate) fn note_founding(&self) {
        self.founded.store(true, Ordering::Release);
    }

    /// Whether an answer on this connection founded an identity (see
    /// [`TunnelInfo::note_founding`]).
    pub(crate) fn founded_one(&self) -> bool {
        self.founded.load(Ordering::Acquire)
    }
}

/// An origin's answer, with what is known of the connection that carried
/// it. Handed beside the response rather than in its extensions: a type
/// map on every response cost an allocation and a hash per entry, and the
/// client-facing response never needed them.
#[derive(Debug)]
pub struct Answered<B> {
    /// The response head; its body streams.
    pub response: Response<B>,
    /// The connection that carried it (shared by its responses).
    pub tunnel: Arc<TunnelInfo>,
    /// Whether the request opened that connection (its
    /// [`TunnelInfo::timings`] are then this request's to count).
    pub new_connection: bool,
}

/// How long a connection took to open, measured once when it was dialled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectTimings {
    /// The transport through the exit: TCP to it and its CONNECT / SOCKS
    /// answer (TCP to the origin for a direct exit).
    pub transport: Duration,
    /// The TLS handshake with the origin (`https` only).
    pub tls: Option<Duration>,
    /// That handshake resumed a session (see `tls::SessionSlot`).
    pub tls_resumed: bool,
}

/// The byte stream of an upstream connection.
pub enum UpstreamIo {
    /// Plain HTTP (inside a tunnel through the exit).
    Plain(TcpStream),
    /// TLS to the origin.
    Tls(Box<TlsConn>),
}

impl std::fmt::Debug for UpstreamIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamIo::Plain(_) => f.write_str("UpstreamIo::Plain"),
            UpstreamIo::Tls(tls) => write!(f, "UpstreamIo::Tls({tls:?})"),
        }
    }
}

impl UpstreamIo {
    /// Whether the origin chose HTTP/2.
    pub fn negotiated_h2(&self) -> bool {
        matches!(self, UpstreamIo::Tls(tls) if tls.negotiated_h2())
    }
}

impl Dialer {
    /// Opens a connection to `target`: the transport through the exit, its
    /// egress address checked, then TLS (when `https`) shaped by `shape`,
    /// or by rustls when there is none.
    pub async fn connect(
        &self,
        target: &HostPort,
        https: bool,
        shape: Option<Shape<'_>>,
    ) -> Result<(UpstreamIo, TunnelInfo), ConnectError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let (tcp, reported) = self.open_transport(target, deadline).await?;
        let transport = started.elapsed();
        let egress_ip = self.check_egress(reported, deadline).await?;
        let mut info = TunnelInfo {
            exit: self.exit.clone(),
            egress_ip,
            sent_ja4: None,
            gaps: Arc::new([]),
            occasion: Occasion::default(),
            timings: ConnectTimings {
                transport,
                tls: None,
                tls_resumed: false,
            },
            sessions: None,
            founded: AtomicBool::new(false),
        };
        if !https {
            return Ok((UpstreamIo::Plain(tcp), info));
        }
        let stack = match shape {
            Some(shape) => {
                info.sessions = shape.sessions.cloned();
                info.occasion = Occasion {
                    http1_only: shape.http1_only,
                    to_address: target.host.parse::<IpAddr>().is_ok(),
                };
                Stack::Shaped(shape)
            }
            None => Stack::Rustls { h2: self.h2 },
        };
        let tls_started = Instant::now();
        let handshake = self.tls.connect(&target.host, tcp, stack);
        let tls = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| self.context(deadline).timed_out(Stage::TlsHandshake))?
            .map_err(|source| ConnectError::Tls {
                host: target.host.to_string(),
                source: Arc::new(source),
            })?;
        info.timings.tls = Some(tls_started.elapsed());
        info.timings.tls_resumed = tls.resumed();
        // A resumed hello is compared as the client's fresh one: what
        // resuming adds (pre_shared_key, early_data) says which session,
        // not which client.
        info.sent_ja4 = tls
            .sent_hello()
            .map(|hello| Arc::from(ja4::ja4(&hello.without_resumption())));
        info.gaps = tls.gaps().clone();
        Ok((UpstreamIo::Tls(Box::new(tls)), info))
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }
}
