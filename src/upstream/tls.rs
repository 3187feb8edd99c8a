//! TLS towards origins, behind one interface: [`UpstreamTls::connect`]
//! takes a connected transport and returns an encrypted [`TlsConn`] that
//! says which protocol the origin chose. No TLS library's types leave this
//! module, so a second stack (one that can say what a browser says) is one
//! more file here and no change to callers.
//!
//! Trust: the public web roots compiled into pinproxy, plus the PEM files
//! given with `--upstream-ca`.

pub mod boring_stack;
mod boring_ffi;
mod rustls_stack;
pub mod tap;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::fingerprint::client_hello::ClientHello;
pub use boring_stack::{Gap, Shape};

/// The upstream trust store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// An `--upstream-ca` file could not be read or holds no certificate.
    #[error("upstream CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls rejected the configuration.
    #[error("upstream TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    /// BoringSSL rejected the configuration.
    #[error("upstream TLS settings (BoringSSL): {0}")]
    Boring(String),
}

/// Which stack makes a connection, and what its ClientHello says.
#[derive(Debug, Clone, Copy)]
pub enum Stack<'a> {
    /// rustls, offering `h2` or not: pinproxy's own hello.
    Rustls {
        /// Offer `h2, http/1.1` (else `http/1.1`).
        h2: bool,
    },
    /// BoringSSL, shaped like a client's (or a browser profile's) hello.
    Boring(Shape<'a>),
}

/// ALPN protocols offered to origins by clients that speak HTTP/1.1 only.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN protocols offered to origins when the client offered HTTP/2.
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The upstream TLS client, shared by every exit (cheap to clone).
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    rustls: Arc<rustls_stack::RustlsClient>,
    boring: Arc<boring_stack::BoringClient>,
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
            boring: Arc::new(boring_stack::BoringClient::new(extra_ca_files)?),
        })
    }

    /// Runs the TLS handshake with `host` over `transport`, with the stack
    /// and ClientHello `stack` says.
    pub async fn connect<T>(
        &self,
        host: &str,
        transport: T,
        stack: Stack<'_>,
    ) -> io::Result<TlsConn>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match stack {
            Stack::Rustls { h2 } => self.rustls.connect(host, transport, h2).await,
            Stack::Boring(shape) => {
                let (conn, gaps) = self.boring.connect(host, transport, shape).await?;
                Ok(conn.with_gaps(gaps))
            }
        }
    }
}

/// A byte stream a TLS connection can be read and written through.
pub trait TlsIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TlsIo for T {}

/// An established TLS connection to an origin, whichever stack made it.
pub struct TlsConn {
    io: Box<dyn TlsIo>,
    h2: bool,
    sent: Option<Box<ClientHello>>,
    gaps: Arc<[Gap]>,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("h2", &self.h2).finish()
    }
}

impl TlsConn {
    /// Wraps a stack's stream; `h2` says whether the origin chose HTTP/2.
    pub fn new(io: Box<dyn TlsIo>, h2: bool) -> TlsConn {
        TlsConn {
            io,
            h2,
            sent: None,
            gaps: Arc::new([]),
        }
    }

    /// Records the ClientHello that really left (read off the wire).
    pub fn with_sent_hello(mut self, hello: Option<ClientHello>) -> TlsConn {
        self.sent = hello.map(Box::new);
        self
    }

    /// Records what the stack could not mirror.
    pub fn with_gaps(mut self, gaps: Arc<[Gap]>) -> TlsConn {
        self.gaps = gaps;
        self
    }

    /// Whether the origin chose HTTP/2 by ALPN.
    pub fn negotiated_h2(&self) -> bool {
        self.h2
    }

    /// The ClientHello that left, as read off the wire.
    pub fn sent_hello(&self) -> Option<&ClientHello> {
        self.sent.as_deref()
    }

    /// What of the client's hello could not be said.
    pub fn gaps(&self) -> &Arc<[Gap]> {
        &self.gaps
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
