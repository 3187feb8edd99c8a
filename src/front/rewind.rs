//! An I/O stream with bytes already read from it put back in front.
//!
//! The tunnel handler reads the first bytes of a CONNECT tunnel to tell TLS
//! from plain HTTP; whichever protocol then takes the stream must see them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
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

impl<T> Rewind<Rewind<T>> {
    /// One layer instead of two: this prefix, then what is left of the
    /// inner one, in front of the stream. Each layer is a copy of every
    /// read for as long as the stream lives.
    pub fn flatten(self) -> Rewind<T> {
        let Rewind {
            prefix: outer,
            inner,
            deferred,
        } = self;
        let prefix = if inner.prefix.is_empty() {
            outer
        } else if outer.is_empty() {
            inner.prefix
        } else {
            let mut both = BytesMut::with_capacity(outer.len() + inner.prefix.len());
            both.extend_from_slice(&outer);
            both.extend_from_slice(&inner.prefix);
            both.freeze()
        };
        Rewind {
            prefix,
            inner: inner.inner,
            // At most one is set: an error is kept only once its layer's
            // prefix is read, and the outer layer meets the inner one's
            // as it reads.
            deferred: deferred.or(inner.deferred),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
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
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Err(e));
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

    #[tokio::test]
    async fn a_flattened_rewind_reads_both_prefixes_in_order() {
        let inner: &[u8] = b" stream";
        let layered = Rewind::new(
            Bytes::from_static(b"outer"),
            Rewind::new(Bytes::from_static(b" inner"), inner),
        );
        let mut out = String::new();
        layered.flatten().read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "outer inner stream");

        // A byte peeked off a rewound stream and put back: one prefix.
        let mut rewound = Rewind::new(Bytes::from_static(b"ab"), inner);
        let mut one = [0u8; 1];
        rewound.read_exact(&mut one).await.unwrap();
        let flat = Rewind::new(Bytes::copy_from_slice(&one), rewound).flatten();
        assert_eq!(flat.prefix(), b"ab");
    }

    #[tokio::test]
    async fn a_flattened_rewind_keeps_a_deferred_error_after_its_bytes() {
        let mut inner = Rewind::new(Bytes::from_static(b"G"), Failing);
        let mut buf = [0u8; 64];
        assert_eq!(inner.read(&mut buf).await.unwrap(), 1);
        let mut flat = Rewind::new(Bytes::from_static(b"G"), inner).flatten();
        assert_eq!(flat.read(&mut buf).await.unwrap(), 1);
        let e = flat.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
