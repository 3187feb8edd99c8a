//! An upstream connection as hyper's pool sees it: [`ExitConnector`] dials
//! through one exit for one lane (transport, egress check, then TLS for
//! `https` origins), and [`UpstreamConn`] carries the facts about the
//! tunnel ([`TunnelInfo`]) to every response it carries.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::dial::Dialer;
use super::error::{ConnectError, Stage};
use super::tls::TlsConn;
use crate::identity::ExitId;
use crate::net::{default_port, HostPort};

/// Facts about an upstream connection, attached to every response it carries.
#[derive(Clone, Debug)]
pub struct TunnelInfo {
    /// The exit the connection goes through.
    pub exit: ExitId,
    /// The address the tunnel leaves from, where known.
    pub egress_ip: Option<IpAddr>,
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
    /// Opens a connection to the origin `uri` names: the transport through
    /// the exit, its egress address checked, then TLS for `https`.
    async fn connect(&self, uri: Uri) -> Result<UpstreamConn, ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let target = HostPort::from_uri(&uri, default_port(https))
            .ok_or_else(|| ConnectError::BadTarget(uri.to_string()))?;

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
        let handshake = self.tls.connect(&target.host, tcp, self.h2);
        let tls = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| self.context(deadline).timed_out(Stage::TlsHandshake))?
            .map_err(|source| ConnectError::Tls {
                host: target.host.clone(),
                source: Arc::new(source),
            })?;
        Ok(UpstreamConn {
            io: UpstreamIo::Tls(Box::new(TokioIo::new(tls))),
            info,
        })
    }
}

/// The byte stream of an upstream connection.
enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsConn>>),
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
            UpstreamIo::Tls(tls) if tls.inner().negotiated_h2() => connected.negotiated_h2(),
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
