//! Opening a connection to an origin through one exit.
//!
//! [`ExitConnector`] is the connector of one exit's connection pool: given an
//! origin URI it opens the transport the exit's kind calls for (a direct TCP
//! connection, or a CONNECT tunnel through an HTTP proxy), then TLS for
//! `https` origins. Every stage runs under one deadline, and every failure
//! says which stage failed, so the client learns whether the exit or the
//! origin is at fault.
//!
//! Plain-HTTP origins are reached with CONNECT too (to port 80): inside a
//! tunnel the exit cannot add `Via` or `X-Forwarded-For` headers of its own.
//!
//! Every new tunnel learns its egress address where it can: the local
//! address for direct exits, the exit's `exit_ip_header` in its CONNECT
//! answer, or an IP-echo probe through the exit. On an identity's lane the
//! first address is recorded and every later tunnel must match it before
//! any request is written to it (see [`IpCheck`]).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::tls;
use crate::exits::{Credentials, EchoTarget, ExitId, ExitKind, HostPort};

/// Largest CONNECT answer header section read from an exit.
const MAX_CONNECT_REPLY: usize = 16 * 1024;

/// What failed while reaching an origin through an exit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The exit's proxy could not be reached.
    #[error("cannot reach the exit's proxy at {proxy}: {source}")]
    ExitUnreachable {
        /// The proxy address.
        proxy: HostPort,
        /// Why.
        source: Arc<io::Error>,
    },
    /// The exit answered CONNECT with a non-2xx status.
    #[error("the exit refused CONNECT {target}: {status} {reason}")]
    ExitRefused {
        /// The origin asked for.
        target: HostPort,
        /// The exit's status code.
        status: u16,
        /// The exit's reason phrase.
        reason: String,
    },
    /// The exit's answer was not valid HTTP.
    #[error("the exit's answer to CONNECT is not valid HTTP: {0}")]
    ExitProtocol(String),
    /// A stage ran past the connect deadline.
    #[error("timed out after {after:?} {stage}")]
    Timeout {
        /// What was being waited for.
        stage: Stage,
        /// The deadline.
        after: Duration,
    },
    /// The origin's name could not be resolved (direct exits).
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The origin host.
        host: String,
        /// Why.
        source: Arc<io::Error>,
    },
    /// The origin refused or could not be reached (direct exits).
    #[error("cannot connect to {target}: {source}")]
    OriginUnreachable {
        /// The origin.
        target: HostPort,
        /// Why.
        source: Arc<io::Error>,
    },
    /// The TLS handshake with the origin failed.
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        /// The origin host.
        host: String,
        /// Why.
        source: Arc<io::Error>,
    },
    /// The pool asked for a URI pinproxy cannot dial.
    #[error("cannot dial {0}")]
    BadTarget(String),
    /// A new tunnel of an identity left from another address than the
    /// identity's first one.
    #[error("the new tunnel leaves from {observed}, but the identity was created on {expected}")]
    ExitIpDrift {
        /// The identity's address.
        expected: IpAddr,
        /// The new tunnel's address.
        observed: IpAddr,
    },
    /// A SOCKS5 exit refused or failed the connection.
    #[error("the SOCKS5 exit could not connect to {target}: {reason}")]
    ExitSocks {
        /// The origin asked for.
        target: HostPort,
        /// Whether authentication failed (the exit's fault, not the origin's).
        auth: bool,
        /// What the exit said.
        reason: String,
    },
    /// The exit is set up to report its egress address but this tunnel's
    /// could not be learnt, so it cannot be trusted with an identity.
    #[error("cannot learn the tunnel's egress address: {0}")]
    ExitIpUnknown(String),
}

/// The connect stage a timeout hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TCP connection to the exit's proxy.
    ExitConnect,
    /// The exit's answer to CONNECT.
    ExitReply,
    /// TCP connection to the origin (direct exits).
    OriginConnect,
    /// TLS handshake with the origin.
    TlsHandshake,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::ExitConnect => "connecting to the exit's proxy",
            Stage::ExitReply => "waiting for the exit's answer to CONNECT",
            Stage::OriginConnect => "connecting to the origin",
            Stage::TlsHandshake => "in the TLS handshake with the origin",
        })
    }
}

impl ConnectError {
    /// Whether the exit itself (not the origin) is to blame.
    pub fn is_exit_fault(&self) -> bool {
        match self {
            ConnectError::ExitUnreachable { .. } | ConnectError::ExitProtocol(_) => true,
            ConnectError::ExitSocks { auth, .. } => *auth,
            ConnectError::Timeout { stage, .. } => {
                matches!(stage, Stage::ExitConnect | Stage::ExitReply)
            }
            _ => false,
        }
    }
}

/// Facts about an upstream connection, attached to every response it carries.
#[derive(Clone, Debug)]
pub struct TunnelInfo {
    /// The exit the connection goes through.
    pub exit: ExitId,
    /// The address the tunnel leaves from, where known.
    pub egress_ip: Option<IpAddr>,
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

/// Everything needed to open tunnels through one exit for one lane.
#[derive(Debug)]
pub struct Dialer {
    /// The exit.
    pub exit: ExitId,
    /// How it is reached.
    pub kind: ExitKind,
    /// The exit's credentials, with the lane's session filled in.
    pub credentials: Option<Credentials>,
    /// SOCKS5 exits: the reply's bound address is the egress address.
    pub socks_reply_is_egress: bool,
    /// TLS settings for origins.
    pub tls: Arc<ClientConfig>,
    /// Deadline for a whole connect.
    pub timeout: Duration,
    /// Egress address checks.
    pub ip_check: IpCheck,
}

/// Opens connections to origins through one exit, for one lane.
#[derive(Clone, Debug)]
pub struct ExitConnector {
    inner: Arc<Dialer>,
}

impl ExitConnector {
    /// A connector dialling as `dialer` says.
    pub fn new(dialer: Dialer) -> Self {
        ExitConnector {
            inner: Arc::new(dialer),
        }
    }
}

impl ExitConnector {
    /// The dialler behind this connector.
    pub fn dialer(&self) -> &Dialer {
        &self.inner
    }
}

impl tower_service::Service<Uri> for ExitConnector {
    type Response = UpstreamConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.connect(uri).await })
    }
}

impl Dialer {
    async fn connect(&self, uri: Uri) -> Result<UpstreamConn, ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| ConnectError::BadTarget(uri.to_string()))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = HostPort { host, port };

        let (tcp, reported) = self.open_transport(&target, deadline).await?;
        let egress_ip = self.check_egress(reported, deadline).await?;
        let info = TunnelInfo {
            exit: self.exit.clone(),
            egress_ip,
        };
        if !https {
            return Ok(UpstreamConn {
                io: UpstreamIo::Plain(TokioIo::new(tcp)),
                info,
            });
        }
        let handshake = tls::handshake(self.tls.clone(), &target.host, tcp);
        let tls = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| self.timed_out(Stage::TlsHandshake))?
            .map_err(|source| ConnectError::Tls {
                host: target.host.clone(),
                source: Arc::new(source),
            })?;
        Ok(UpstreamConn {
            io: UpstreamIo::Tls(Box::new(TokioIo::new(tls))),
            info,
        })
    }

    /// Opens a raw tunnel to `target` through the exit; also returns the
    /// egress address the transport itself reveals, if any.
    async fn open_transport(
        &self,
        target: &HostPort,
        deadline: Instant,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        match &self.kind {
            ExitKind::Direct { source } => {
                let tcp = self.dial(target, *source, deadline).await?;
                let local = tcp.local_addr().ok().map(|a| a.ip());
                Ok((tcp, local))
            }
            ExitKind::HttpConnect { proxy, .. } => {
                let mut tcp = self.dial_proxy(proxy, deadline).await?;
                let reported = self.http_connect(&mut tcp, target, deadline).await?;
                Ok((tcp, reported))
            }
            ExitKind::Socks5 { proxy, .. } => {
                let tcp = self.dial_proxy(proxy, deadline).await?;
                self.socks_connect(tcp, target, deadline).await
            }
        }
    }

    /// Asks a SOCKS5 exit for a connection to `target`, by name (the exit
    /// resolves it). Returns the reply's bound address when the exit is set
    /// up to report its egress address that way.
    async fn socks_connect(
        &self,
        tcp: TcpStream,
        target: &HostPort,
        deadline: Instant,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        let destination = (target.host.as_str(), target.port);
        let handshake = async {
            match &self.credentials {
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
        let stream = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| self.timed_out(Stage::ExitReply))?
            .map_err(|e| ConnectError::ExitSocks {
                target: target.clone(),
                auth: matches!(
                    e,
                    tokio_socks::Error::PasswordAuthFailure(_)
                        | tokio_socks::Error::NoAcceptableAuthMethods
                ),
                reason: e.to_string(),
            })?;
        let bound = match stream.target_addr() {
            tokio_socks::TargetAddr::Ip(addr) if !addr.ip().is_unspecified() => Some(addr.ip()),
            _ => None,
        };
        let reported = bound.filter(|_| self.socks_reply_is_egress);
        Ok((stream.into_inner(), reported))
    }

    /// Learns the tunnel's egress address and, on an identity's lane,
    /// refuses a tunnel that leaves from another address than the first.
    async fn check_egress(
        &self,
        reported: Option<IpAddr>,
        deadline: Instant,
    ) -> Result<Option<IpAddr>, ConnectError> {
        let check = &self.ip_check;
        let observed = match (reported, &check.echo, &check.pinned) {
            (Some(ip), _, _) => Some(ip),
            // The probe costs a second tunnel: only identities need it.
            (None, Some(echo), Some(_)) => Some(self.echo_probe(echo, deadline).await?),
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
                    tls::handshake(self.tls.clone(), &echo.authority.host, tcp)
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
            .map_err(|_| self.timed_out(Stage::ExitReply))?
            .map_err(unknown)
    }

    /// Opens a raw tunnel to `target` through the exit, its egress address
    /// checked as for any tunnel of the lane (passthrough).
    pub async fn raw_tunnel(
        &self,
        target: &HostPort,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let (tcp, reported) = self.open_transport(target, deadline).await?;
        let egress = self.check_egress(reported, deadline).await?;
        Ok((tcp, egress))
    }

    /// Opens and drops a tunnel to `target`: the health probe.
    pub async fn probe(&self, target: &HostPort) -> Result<(), ConnectError> {
        let deadline = Instant::now() + self.timeout;
        self.open_transport(target, deadline).await.map(|_| ())
    }

    fn timed_out(&self, stage: Stage) -> ConnectError {
        ConnectError::Timeout {
            stage,
            after: self.timeout,
        }
    }

    /// Connects straight to the origin, from `source` when given.
    async fn dial(
        &self,
        target: &HostPort,
        source: Option<IpAddr>,
        deadline: Instant,
    ) -> Result<TcpStream, ConnectError> {
        let addrs = tokio::time::timeout_at(deadline, resolve(&target.host, target.port))
            .await
            .map_err(|_| self.timed_out(Stage::OriginConnect))?
            .map_err(|source| ConnectError::Resolve {
                host: target.host.clone(),
                source: Arc::new(source),
            })?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no usable address");
        for addr in addrs {
            if source.is_some_and(|s| s.is_ipv4() != addr.is_ipv4()) {
                continue;
            }
            match tokio::time::timeout_at(deadline, connect_from(addr, source)).await {
                Err(_) => return Err(self.timed_out(Stage::OriginConnect)),
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => last = e,
            }
        }
        Err(ConnectError::OriginUnreachable {
            target: target.clone(),
            source: Arc::new(last),
        })
    }

    async fn dial_proxy(
        &self,
        proxy: &HostPort,
        deadline: Instant,
    ) -> Result<TcpStream, ConnectError> {
        let unreachable = |source| ConnectError::ExitUnreachable {
            proxy: proxy.clone(),
            source: Arc::new(source),
        };
        let addrs = tokio::time::timeout_at(deadline, resolve(&proxy.host, proxy.port))
            .await
            .map_err(|_| self.timed_out(Stage::ExitConnect))?
            .map_err(unreachable)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match tokio::time::timeout_at(deadline, connect_from(addr, None)).await {
                Err(_) => return Err(self.timed_out(Stage::ExitConnect)),
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => last = e,
            }
        }
        Err(unreachable(last))
    }

    /// Sends CONNECT for `target` and reads the exit's answer; returns the
    /// egress address the answer states, if the exit is set up to state one.
    async fn http_connect(
        &self,
        tcp: &mut TcpStream,
        target: &HostPort,
        deadline: Instant,
    ) -> Result<Option<IpAddr>, ConnectError> {
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
        if let Some(auth) = self.credentials.as_ref().map(Credentials::basic_header) {
            request.extend_from_slice(b"Proxy-Authorization: ");
            request.extend_from_slice(auth.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let exchange = async {
            tcp.write_all(&request).await?;
            read_connect_reply(tcp, self.ip_check.header.as_ref()).await
        };
        let (status, reason, stated_ip) = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| self.timed_out(Stage::ExitReply))?
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => ConnectError::ExitProtocol(e.to_string()),
                _ => ConnectError::ExitProtocol(format!("connection failed: {e}")),
            })?;
        if (200..300).contains(&status) {
            Ok(stated_ip)
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
/// in `ip_header`. Nothing may follow the head: in a fresh tunnel the client
/// speaks first (TLS or HTTP), so extra bytes mean a broken exit.
async fn read_connect_reply(
    tcp: &mut TcpStream,
    ip_header: Option<&HeaderName>,
) -> io::Result<(u16, String, Option<IpAddr>)> {
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the exit closed the connection before answering",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut reply = httparse::Response::new(&mut headers);
        match reply.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if len != buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the exit sent data after its CONNECT answer before the client spoke",
                    ));
                }
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
                return Ok((status, reason, stated_ip));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_CONNECT_REPLY => continue,
            Ok(httparse::Status::Partial) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the CONNECT answer header is too large",
                ))
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}

async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    Ok(tokio::net::lookup_host((host, port)).await?.collect())
}

async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A byte stream the IP-echo probe can speak HTTP over.
trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

/// The byte stream of an upstream connection.
enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// An upstream connection, as handed to the pool.
pub struct UpstreamConn {
    io: UpstreamIo,
    info: TunnelInfo,
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        let connected = Connected::new().extra(self.info.clone());
        match &self.io {
            UpstreamIo::Tls(tls) if tls.inner().get_ref().1.alpn_protocol() == Some(b"h2") => {
                connected.negotiated_h2()
            }
            _ => connected,
        }
    }
}

impl hyper::rt::Read for UpstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}
