//! An I/O stream with bytes already read from it put back in front.
//!
//! The tunnel handler reads the first bytes of a CONNECT tunnel to tell TLS
//! from plain HTTP; whichever protocol then takes the stream must see them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with `prefix` read before it.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
    /// A read error met while topping up the read that returned the last of
    /// `prefix`: that read succeeded, so the error waits for the next one.
    deferred: Option<io::Error>,
}

impl<T> Rewind<T> {
    /// Puts `prefix` back in front of `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Rewind<T> {
        Rewind {
            prefix,
            inner,
            deferred: None,
        }
    }

    /// The bytes not yet read again.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The bytes not yet read again, and the stream after them.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Err(e));
        }
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.has_remaining() {
                return Poll::Ready(Ok(()));
            }
            // An emptied `Bytes` still holds its allocation: release it,
            // the stream may stay open (and idle) for a long time.
            this.prefix = Bytes::new();
            // Top the read up with what the stream already has. A reader
            // handed only the prefix (one byte, after the tunnel's first
            // byte was peeked) must read again for the rest of its message,
            // and hyper grows its read buffer to twice its size when that
            // second read finds it already holding a byte: 8 KiB more per
            // connection for as long as it lives.
            if buf.remaining() > 0 {
                if let Poll::Ready(Err(e)) = Pin::new(&mut this.inner).poll_read(cx, buf) {
                    this.deferred = Some(e);
                }
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_comes_first() {
        let inner: &[u8] = b" world";
        let mut r = Rewind::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn the_read_that_empties_the_prefix_carries_on_into_the_stream() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"ET / HTTP/1.1\r\n").await.unwrap();
        let mut r = Rewind::new(Bytes::from_static(b"G"), server);
        let mut buf = [0u8; 64];
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn the_read_that_empties_the_prefix_returns_at_once_when_the_stream_has_nothing() {
        let (_client, server) = tokio::io::duplex(64);
        let mut r = Rewind::new(Bytes::from_static(b"G"), server);
        let mut buf = [0u8; 64];
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"G");
    }

    /// Fails every read.
    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
        }
    }

    #[tokio::test]
    async fn an_error_met_while_topping_up_comes_with_the_next_read() {
        let mut r = Rewind::new(Bytes::from_static(b"G"), Failing);
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).await.unwrap(), 1);
        let e = r.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
