//! A BoringSSL stream that does not call `SSL_read` when the read could
//! only find nothing.
//!
//! hyper polls its connection's read side whenever the connection task
//! wakes: to send a request on a pooled connection, as the response body is
//! taken, as the connection goes back to the pool. Most of those polls find
//! nothing to read. Through BoringSSL each one is a whole `SSL_read`: the
//! error queue cleared, the record layer consulted, the transport asked,
//! and the "would block" turned into an error and back (about 1,000
//! instructions), where rustls answers from its own state. A keep-alive
//! request made almost six such calls, almost five of them empty
//! (callgrind: 5.76 and 4.76 per request; 2.0 and 1.0 through the gate).
//!
//! [`ReadGate`] asks first what is cheap to know: whether BoringSSL holds
//! any byte it could return or process ([`boring_ffi::has_pending`]), and,
//! if not, whether the transport has been signalled readable since its
//! last read ran dry ([`ReadReady`]). Only then does it call `SSL_read`.
//! When the transport is not readable the read is pending exactly as
//! `SSL_read` would have left it, with the task's waker registered with the
//! same transport for the same direction.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_boring::SslStream;

use super::boring_ffi;
use super::tap::HelloTap;

/// A transport that can tell, without reading, that a read would find
/// nothing yet.
pub trait ReadReady {
    /// Pending (with the waker registered for the next readable event)
    /// when a read would be pending; ready when it may find bytes, the end
    /// of the stream or an error.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl<T: ReadReady> ReadReady for HelloTap<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().poll_read_ready(cx)
    }
}

/// A BoringSSL stream (`S`: an [`SslStream`]) whose reads skip `SSL_read`
/// when it could only find nothing (see the module documentation).
pub struct ReadGate<S> {
    inner: S,
}

impl<S> ReadGate<S> {
    /// Gates reads of `stream`.
    pub fn new(stream: S) -> ReadGate<S> {
        ReadGate { inner: stream }
    }
}

impl<T> AsyncRead for ReadGate<SslStream<T>>
where
    T: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &mut self.get_mut().inner;
        let dry = !boring_ffi::has_pending(stream.ssl())
            && stream.get_ref().poll_read_ready(cx).is_pending();
        if dry {
            return Poll::Pending;
        }
        Pin::new(stream).poll_read(cx, buf)
    }
}

/// Writes go through BoringSSL, except flushes: `SslStream`'s flush only
/// flushes the transport (BoringSSL hands each record to the transport as
/// it is written and keeps nothing a flush would push), but through
/// `tokio_boring` it clones the task's waker into the stream and drops it
/// again around the call. hyper flushes after every write, so the gate asks
/// the transport itself.
impl<T> AsyncWrite for ReadGate<SslStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.get_mut()).poll_flush(cx)
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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;
    use crate::upstream::tls::boring_stack::BoringClient;
    use crate::upstream::tls::tests::{acceptor, fixture, pki};
    use crate::upstream::tls::Shape;

    /// A TCP stream that counts the reads and flushes asked of it, can be
    /// made to say it is not readable whatever it holds, and can hold its
    /// flushes pending.
    struct Counted<T> {
        inner: T,
        reads: Arc<AtomicUsize>,
        dry: Arc<AtomicBool>,
        flushes: Arc<AtomicUsize>,
        flush_held: Arc<AtomicBool>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.reads.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut this.inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.flushes.fetch_add(1, Ordering::Relaxed);
            if this.flush_held.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            Pin::new(&mut this.inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    impl<T: ReadReady> ReadReady for Counted<T> {
        fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.dry.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            self.inner.poll_read_ready(cx)
        }
    }

    /// Within a bound, so that a read the gate wrongly holds back fails the
    /// test instead of hanging it.
    async fn read_exactly(conn: &mut (impl AsyncRead + Unpin), len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        match tokio::time::timeout(Duration::from_secs(20), conn.read_exact(&mut got)).await {
            Ok(Ok(_)) => got,
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => panic!("no bytes within 20 s"),
        }
    }

    /// One poll for a single byte (`None` at the end of the stream).
    fn poll_one_byte(
        conn: &mut (impl AsyncRead + Unpin),
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<u8>>> {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(conn)
            .poll_read(cx, &mut buf)
            .map_ok(|()| buf.filled().first().copied())
    }

    /// BoringSSL against a rustls server over real TCP: bytes BoringSSL
    /// already holds are read without the socket being readable, idle polls
    /// do not reach the socket, and the next bytes wake the reader.
    #[tokio::test]
    async fn reads_reach_boringssl_only_when_something_can_come() {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap_or_else(|e| panic!("{e}"));
        let client = BoringClient::new(&[ca_file]).unwrap_or_else(|e| panic!("{e}"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let acceptor = acceptor(&pki, false);
        let (more, more_wanted) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            tls.write_all(b"0123456789").await?;
            tls.flush().await?;
            let _ = more_wanted.await;
            tls.write_all(b"later").await?;
            tls.flush().await?;
            // Open until the client has read (it leaves without a
            // close_notify: the end is an error here, and no matter).
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            Ok::<(), io::Error>(())
        });

        let reads = Arc::new(AtomicUsize::new(0));
        let dry = Arc::new(AtomicBool::new(false));
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let flushes = Arc::new(AtomicUsize::new(0));
        let flush_held = Arc::new(AtomicBool::new(false));
        let transport = Counted {
            inner: tcp,
            reads: reads.clone(),
            dry: dry.clone(),
            flushes: flushes.clone(),
            flush_held: flush_held.clone(),
        };
        let hello = fixture("chromium_1");
        let shape = Shape {
            hello: &hello,
            http1_only: true,
            alps_settings: &[],
            sessions: None,
        };
        let (mut conn, _) = client
            .connect("localhost", transport, shape)
            .await
            .unwrap_or_else(|e| panic!("{e}"));

        // One record, read a byte at a time: all but the first byte come
        // from BoringSSL's buffer, even with the socket saying nothing can
        // come.
        let mut got = read_exactly(&mut conn, 1).await;
        dry.store(true, Ordering::Relaxed);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 1..10 {
            match poll_one_byte(&mut conn, &mut cx) {
                Poll::Ready(Ok(byte)) => got.extend(byte),
                polled => panic!("{polled:?}"),
            }
        }
        assert_eq!(got, b"0123456789");
        dry.store(false, Ordering::Relaxed);

        // Idle: twenty polls ask the socket at most for the read that finds
        // it dry (and one more each for a late session ticket); without
        // the gate every poll is an `SSL_read` that asks it.
        let before = reads.load(Ordering::Relaxed);
        for _ in 0..20 {
            assert!(poll_one_byte(&mut conn, &mut cx).is_pending());
        }
        let asked = reads.load(Ordering::Relaxed) - before;
        assert!(asked <= 3, "20 idle polls asked the socket {asked} times");

        // The next bytes wake the reader. Their record (header and body)
        // comes in one socket read, short of the read-ahead, so the socket
        // is known to be dry and the next poll does not ask it again.
        let _ = more.send(());
        let before = reads.load(Ordering::Relaxed);
        assert_eq!(read_exactly(&mut conn, 5).await, b"later");
        let record_reads = reads.load(Ordering::Relaxed) - before;
        assert!(poll_one_byte(&mut conn, &mut cx).is_pending());
        let asked = reads.load(Ordering::Relaxed) - before;
        assert_eq!(
            (record_reads, asked),
            (1, 1),
            "socket reads for one record, and with the idle poll after it"
        );

        // A flush is the transport's, answered as the transport answers it.
        assert!(matches!(
            Pin::new(&mut conn).poll_write(&mut cx, b"ping"),
            Poll::Ready(Ok(4))
        ));
        let before = flushes.load(Ordering::Relaxed);
        flush_held.store(true, Ordering::Relaxed);
        assert!(Pin::new(&mut conn).poll_flush(&mut cx).is_pending());
        flush_held.store(false, Ordering::Relaxed);
        assert!(matches!(
            Pin::new(&mut conn).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(flushes.load(Ordering::Relaxed) - before, 2);
        drop(conn);
        let served = server.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(served.is_ok(), "{served:?}");
    }
}
