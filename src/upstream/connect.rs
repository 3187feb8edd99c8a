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

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::tls;
use crate::exits::{ExitId, ExitKind, HostPort};

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
}

/// Opens connections to origins through one exit.
#[derive(Clone)]
pub struct ExitConnector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    exit: ExitId,
    kind: ExitKind,
    proxy_auth: Option<HeaderValue>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl ExitConnector {
    /// A connector for the exit `exit` of kind `kind`.
    pub fn new(exit: ExitId, kind: ExitKind, tls: Arc<ClientConfig>, timeout: Duration) -> Self {
        let proxy_auth = match &kind {
            ExitKind::HttpConnect {
                auth: Some(creds), ..
            } => Some(creds.basic_header()),
            _ => None,
        };
        ExitConnector {
            inner: Arc::new(ConnectorInner {
                exit,
                kind,
                proxy_auth,
                tls,
                timeout,
            }),
        }
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

impl ConnectorInner {
    async fn connect(&self, uri: Uri) -> Result<UpstreamConn, ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| ConnectError::BadTarget(uri.to_string()))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = HostPort { host, port };

        let tcp = match &self.kind {
            ExitKind::Direct { source } => self.dial(&target, *source, deadline).await?,
            ExitKind::HttpConnect { proxy, .. } => {
                let mut tcp = self.dial_proxy(proxy, deadline).await?;
                self.http_connect(&mut tcp, &target, deadline).await?;
                tcp
            }
        };
        let info = TunnelInfo {
            exit: self.exit.clone(),
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

    /// Sends CONNECT for `target` and reads the exit's answer.
    async fn http_connect(
        &self,
        tcp: &mut TcpStream,
        target: &HostPort,
        deadline: Instant,
    ) -> Result<(), ConnectError> {
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
        if let Some(auth) = &self.proxy_auth {
            request.extend_from_slice(b"Proxy-Authorization: ");
            request.extend_from_slice(auth.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let exchange = async {
            tcp.write_all(&request).await?;
            read_connect_reply(tcp).await
        };
        let (status, reason) = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| self.timed_out(Stage::ExitReply))?
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => ConnectError::ExitProtocol(e.to_string()),
                _ => ConnectError::ExitProtocol(format!("connection failed: {e}")),
            })?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(ConnectError::ExitRefused {
                target: target.clone(),
                status,
                reason,
            })
        }
    }
}

/// Reads a CONNECT answer head. Nothing may follow it: in a fresh tunnel the
/// client speaks first (TLS or HTTP), so extra bytes mean a broken exit.
async fn read_connect_reply(tcp: &mut TcpStream) -> io::Result<(u16, String)> {
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
                return Ok((status, reason));
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
        Connected::new().extra(self.info.clone())
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
