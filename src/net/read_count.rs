//! A stream whose reads are counted: how the idle limits (an HTTP/2 client
//! connection's, a relay's) tell activity from silence. A read costs one
//! relaxed increment; a timer elsewhere compares the count a limit apart,
//! so no timer is reset per read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where a [`ReadCounted`] stream counts its reads.
pub trait ReadCounter {
    /// The count of reads that brought bytes.
    fn reads(&self) -> &AtomicU64;
}

impl ReadCounter for &AtomicU64 {
    fn reads(&self) -> &AtomicU64 {
        self
    }
}

/// `io`, with every read that brings bytes counted in `counter` (writes
/// pass through uncounted).
#[derive(Debug)]
pub struct ReadCounted<T, C> {
    io: T,
    counter: C,
}

impl<T, C> ReadCounted<T, C> {
    /// `io`, its reads counted in `counter`.
    pub fn new(io: T, counter: C) -> ReadCounted<T, C> {
        ReadCounted { io, counter }
    }
}

impl<T: AsyncRead + Unpin, C: ReadCounter + Unpin> AsyncRead for ReadCounted<T, C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.counter.reads().fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin, C: Unpin> AsyncWrite for ReadCounted<T, C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_that_bring_bytes_are_counted_and_writes_are_not() {
        let count = AtomicU64::new(0);
        let (near, mut far) = duplex(64);
        let mut counted = ReadCounted::new(near, &count);
        counted.write_all(b"out").await.unwrap();
        let mut got = [0u8; 3];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 0, "a write is not a read");
        far.write_all(b"in").await.unwrap();
        let mut got = [0u8; 2];
        counted.read_exact(&mut got).await.unwrap();
        assert!(count.load(Ordering::Relaxed) >= 1);
        drop(far);
        let before = count.load(Ordering::Relaxed);
        assert_eq!(counted.read(&mut got).await.unwrap(), 0);
        assert_eq!(count.load(Ordering::Relaxed), before, "end of stream");
    }
}
