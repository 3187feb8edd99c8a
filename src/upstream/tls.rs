//! TLS towards origins, behind one interface: [`UpstreamTls::connect`]
//! takes a connected transport and returns an encrypted [`TlsConn`] that
//! says which protocol the origin chose. No TLS library's types leave this
//! module, so a second stack (one that can say what a browser says) is one
//! more file here and no change to callers.
//!
//! Trust: the public web roots compiled into pinproxy, plus the PEM files
//! given with `--upstream-ca`.

mod rustls_stack;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use rustls_stack::TlsSetupError;

/// ALPN protocols offered to origins by clients that speak HTTP/1.1 only.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN protocols offered to origins when the client offered HTTP/2.
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The upstream TLS client, shared by every exit (cheap to clone).
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    rustls: Arc<rustls_stack::RustlsClient>,
}

impl UpstreamTls {
    /// A client trusting the public web roots plus `extra_ca_files`.
    /// Blocking (reads files): call it off the async runtime.
    pub fn new(
        provider: Arc<::rustls::crypto::CryptoProvider>,
        extra_ca_files: &[PathBuf],
    ) -> Result<UpstreamTls, TlsSetupError> {
        Ok(UpstreamTls {
            rustls: Arc::new(rustls_stack::RustlsClient::new(provider, extra_ca_files)?),
        })
    }

    /// Runs the TLS handshake with `host` over `transport`, offering HTTP/2
    /// when `h2` (the origin is offered what the client offered pinproxy).
    pub async fn connect<T>(&self, host: &str, transport: T, h2: bool) -> io::Result<TlsConn>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.rustls.connect(host, transport, h2).await
    }
}

/// A byte stream a TLS connection can be read and written through.
pub trait TlsIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TlsIo for T {}

/// An established TLS connection to an origin, whichever stack made it.
pub struct TlsConn {
    io: Box<dyn TlsIo>,
    h2: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("h2", &self.h2).finish()
    }
}

impl TlsConn {
    /// Wraps a stack's stream; `h2` says whether the origin chose HTTP/2.
    pub fn new(io: Box<dyn TlsIo>, h2: bool) -> TlsConn {
        TlsConn { io, h2 }
    }

    /// Whether the origin chose HTTP/2 by ALPN.
    pub fn negotiated_h2(&self) -> bool {
        self.h2
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
