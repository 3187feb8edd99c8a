//! Capturing the client's fingerprint as its bytes arrive, without changing
//! a byte of what the TLS and HTTP servers then read:
//!
//! - [`read_client_hello`]: the raw ClientHello, read off the tunnel until
//!   the whole handshake message is in (a browser's hello with
//!   post-quantum key shares is about 2 KB and often spans several TCP
//!   segments), parsed, and put back in front of the stream for rustls;
//! - [`PrefaceRecorder`]: the HTTP/2 connection preface (SETTINGS, window,
//!   priorities, pseudo-header order), fed to the parser as hyper reads the
//!   decrypted stream, up to the first request's header block.
//!
//! A client whose bytes cannot be parsed is still served (its connection
//! just has no fingerprint); a client that sends more than the parsers'
//! limits (64 KiB) before its first request is not fingerprinted either.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::rewind::Rewind;
use crate::fingerprint::client_hello::{self, ClientHello};
use crate::fingerprint::h2_preface::H2PrefaceParser;
use crate::fingerprint::{ClientConnection, Progress};

/// How a ClientHello read ended.
#[derive(Debug)]
pub enum HelloRead {
    /// The whole hello: parsed (or not, if it could not be).
    Hello(Option<Box<ClientHello>>),
    /// The client closed or the read failed before the hello was complete.
    Closed,
}

/// Reads from `io` until the whole ClientHello is in, then returns the
/// stream with every byte read put back in front, and the parsed hello.
pub async fn read_client_hello<T>(mut io: T) -> (Rewind<T>, HelloRead)
where
    T: AsyncRead + Unpin,
{
    let mut buffer = Vec::with_capacity(2048);
    let outcome = loop {
        match client_hello::handshake_len_needed(&buffer) {
            Progress::Complete { consumed } => {
                let records = buffer.get(..consumed).unwrap_or(&buffer);
                break match client_hello::parse(records) {
                    Ok(hello) => HelloRead::Hello(Some(Box::new(hello))),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot parse the client's ClientHello");
                        HelloRead::Hello(None)
                    }
                };
            }
            Progress::Failed(e) => {
                // Not a hello pinproxy understands: rustls will say more.
                tracing::debug!(error = %e, "not a ClientHello pinproxy can read");
                break HelloRead::Hello(None);
            }
            Progress::NeedMore => {}
        }
        // Read straight into the buffer's spare room: a chunk array here
        // would sit in every tunnel task's state for the tunnel's lifetime.
        buffer.reserve(2048);
        match io.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => break HelloRead::Closed,
            Ok(_) => {}
        }
    };
    (Rewind::new(Bytes::from(buffer), io), outcome)
}

/// A stream that shows the HTTP/2 preface the client sends to a parser as
/// it is read, and records the fingerprint on the client's connection once
/// the first request's headers are in. Afterwards it only passes bytes
/// through (the parser and its buffer are dropped).
pub struct PrefaceRecorder<T> {
    inner: T,
    parser: Option<Box<H2PrefaceParser>>,
    client: Arc<ClientConnection>,
}

impl<T> PrefaceRecorder<T> {
    /// Records the preface read through `inner` into `client`.
    pub fn new(inner: T, client: Arc<ClientConnection>) -> PrefaceRecorder<T> {
        PrefaceRecorder {
            inner,
            parser: Some(Box::default()),
            client,
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        let Some(parser) = self.parser.as_mut() else {
            return;
        };
        match parser.feed(bytes) {
            Progress::NeedMore => {}
            Progress::Complete { .. } => {
                if let Some(parser) = self.parser.take() {
                    if let Some(fingerprint) = parser.into_fingerprint() {
                        let _ = self.client.preface.set(Arc::new(fingerprint));
                    }
                }
            }
            Progress::Failed(e) => {
                tracing::debug!(error = %e, "cannot read the client's HTTP/2 preface");
                self.parser = None;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefaceRecorder<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.parser.is_some() {
            if let Some(new) = buf.filled().get(before..) {
                this.observe(new);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefaceRecorder<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
