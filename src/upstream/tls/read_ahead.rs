//! The transport below BoringSSL, read ahead so that a small record costs
//! one `recvfrom`.
//!
//! BoringSSL reads a record in two exact reads: its five-byte header, then
//! its body. An exact read never comes back short, and a short read is how
//! tokio learns that a socket is drained; so after every record the next
//! read went to the kernel and failed with `EAGAIN` (strace over 20,000
//! keep-alive requests: 4.0 `recvfrom` per request in `mirror` mode, 2.0
//! with rustls, which reads ahead by itself). [`ReadAhead`] reads up to
//! [`READ_AHEAD`] bytes at once and serves BoringSSL's reads from them, so
//! a small record arrives with its header in one call that leaves the
//! socket known to be dry. A read of at least [`READ_AHEAD`] bytes with
//! nothing held goes straight to the transport: a long record costs no
//! copy.
//!
//! The buffer is allocated for each fill and freed as soon as it is
//! drained, so an idle upstream connection (a pool holds hundreds) keeps no
//! read-ahead memory: a buffer kept for the connection's life added about
//! 5 KiB of RSS to each idle connection, parked ones included, since
//! glibc does not give back a 4 KiB hole among long-lived allocations.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::read_gate::ReadReady;
use crate::upstream::framing::delegate_write;

/// Bytes read from the transport at once (a read asking for at least this
/// much bypasses the buffer).
pub const READ_AHEAD: usize = 4096;

/// A transport read ahead by up to [`READ_AHEAD`] bytes (see the module
/// documentation).
pub struct ReadAhead<T> {
    inner: T,
    /// Bytes read and not yet taken; no allocation whenever it is empty.
    held: BytesMut,
}

impl<T> ReadAhead<T> {
    /// Reads `inner` ahead.
    pub fn new(inner: T) -> ReadAhead<T> {
        ReadAhead {
            inner,
            held: BytesMut::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            if buf.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Not zeroed (a fresh 4 KiB memset per record cost about 4,000
            // instructions); a pending or failed read frees it again, so an
            // idle connection whose socket was not known to be dry holds
            // nothing either.
            let mut held = BytesMut::with_capacity(READ_AHEAD);
            ready!(poll_read_buf(Pin::new(&mut this.inner), cx, &mut held))?;
            this.held = held;
        }
        let take = buf.remaining().min(this.held.len());
        if let Some(bytes) = this.held.get(..take) {
            buf.put_slice(bytes);
            this.held.advance(take);
        }
        if this.held.is_empty() {
            this.held = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

delegate_write!(ReadAhead);

/// Bytes held are ready; else the transport says.
impl<T: ReadReady> ReadReady for ReadAhead<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.held.is_empty() {
            self.inner.poll_read_ready(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    /// Reads `source` through a read-ahead in reads of the given sizes
    /// (cycled), counting the reads that reached the source.
    fn read_through(source: &[u8], sizes: &[usize]) -> (Vec<u8>, usize) {
        struct Counted<'a>(&'a [u8], usize);
        impl AsyncRead for Counted<'_> {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let this = self.get_mut();
                this.1 += 1;
                Pin::new(&mut this.0).poll_read(cx, buf)
            }
        }
        let mut ahead = ReadAhead::new(Counted(source, 0));
        let mut cx = Context::from_waker(Waker::noop());
        let mut got = Vec::new();
        for size in sizes.iter().cycle().take(100_000) {
            let mut chunk = vec![0; *size];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut ahead).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
                Poll::Ready(Ok(())) => got.extend_from_slice(buf.filled()),
                other => panic!("{other:?}"),
            }
        }
        (got, ahead.inner.1)
    }

    #[test]
    fn every_byte_arrives_once_in_order_whatever_the_read_sizes() {
        let source: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for sizes in [
            &[5, 1200][..],
            &[1],
            &[READ_AHEAD - 1],
            &[READ_AHEAD],
            &[5, 16_384],
            &[3, 4_000, 9_000, 17],
        ] {
            let (got, _) = read_through(&source, sizes);
            assert!(got == source, "read sizes {sizes:?}");
        }
    }

    #[test]
    fn small_reads_share_one_transport_read_and_large_ones_bypass() {
        // A record header and a 1,200-byte body, as BoringSSL asks for
        // them: one transport read, then the one that finds the end.
        let record = vec![9u8; 1205];
        assert_eq!(read_through(&record, &[5, 1200]), (record.clone(), 2));
        // Reads of the buffer's size or more go to the transport as asked.
        let long = vec![7u8; 5 * READ_AHEAD];
        let (got, reads) = read_through(&long, &[READ_AHEAD]);
        assert_eq!((got.len(), reads), (long.len(), 6));
    }

    #[test]
    fn the_buffer_lives_only_while_it_holds_bytes() {
        let source = [1u8, 2, 3, 4];
        let mut ahead = ReadAhead::new(&source[..]);
        assert_eq!(ahead.held.capacity(), 0, "nothing allocated before a read");
        let mut cx = Context::from_waker(Waker::noop());
        let mut two = [0u8; 2];
        let mut buf = ReadBuf::new(&mut two);
        assert!(Pin::new(&mut ahead).poll_read(&mut cx, &mut buf).is_ready());
        assert_eq!(buf.filled(), [1, 2]);
        assert_eq!(&ahead.held[..], [3, 4], "two bytes still held");
        let mut buf = ReadBuf::new(&mut two);
        assert!(Pin::new(&mut ahead).poll_read(&mut cx, &mut buf).is_ready());
        assert_eq!(buf.filled(), [3, 4]);
        assert_eq!(ahead.held.capacity(), 0, "drained: the buffer is freed");
    }
}
