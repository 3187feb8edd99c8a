//! What really left: the ClientHello a TLS stack wrote, read off the wire
//! by the same parser that reads the client's, so the JA4 pinproxy reports
//! for an upstream connection is measured, not assumed.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::fingerprint::client_hello::{self, ClientHello};
use crate::fingerprint::Progress;

/// The ClientHello a connection sent, once it has been written.
pub type SentHello = Arc<Mutex<Option<ClientHello>>>;

/// A transport that keeps the bytes written to it until they hold a whole
/// ClientHello, parses it into [`SentHello`], and from then on passes bytes
/// through without keeping any.
pub struct HelloTap<T> {
    inner: T,
    written: Option<Vec<u8>>,
    sent: SentHello,
}

impl<T> HelloTap<T> {
    /// Taps `inner`; the hello will be in `sent`.
    pub fn new(inner: T, sent: SentHello) -> HelloTap<T> {
        HelloTap {
            inner,
            written: Some(Vec::with_capacity(2048)),
            sent,
        }
    }

    /// The tapped transport.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn observe(&mut self, bytes: &[u8]) {
        let Some(written) = self.written.as_mut() else {
            return;
        };
        written.extend_from_slice(bytes);
        match client_hello::handshake_len_needed(written) {
            Progress::NeedMore => {}
            Progress::Complete { consumed } => {
                let hello = written
                    .get(..consumed)
                    .and_then(|records| client_hello::parse(records).ok());
                if let Ok(mut sent) = self.sent.lock() {
                    *sent = hello;
                }
                self.written = None;
            }
            Progress::Failed(_) => self.written = None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HelloTap<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HelloTap<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            if this.written.is_some() {
                this.observe(buf.get(..*n).unwrap_or_default());
            }
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
