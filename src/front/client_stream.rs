//! A client's TCP connection together with its place among the connection
//! limits.
//!
//! An open client connection counts against `limits.max_connections` and
//! against its address's `limits.max_connections_per_client` until it is
//! closed, whatever it has become: a connection serving proxy requests, a
//! tunnel (MITM or passed through), or a WebSocket relay that outlives the
//! task that served it. The place therefore lives in the stream: whoever
//! holds the socket holds the place, and it is given back when the socket
//! is dropped. No hand-over from the serving task to a tunnel or a relay
//! has to carry it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::limits;

/// A client connection's place: one of `limits.max_connections` and one of
/// its address's `limits.max_connections_per_client`, both given back when
/// it is dropped.
#[derive(Debug)]
pub struct Place {
    _slot: OwnedSemaphorePermit,
    _client: limits::ClientConnection,
}

impl Place {
    /// The place made of a connection slot and the client address's count.
    pub fn new(slot: OwnedSemaphorePermit, client: limits::ClientConnection) -> Place {
        Place {
            _slot: slot,
            _client: client,
        }
    }
}

/// A client's TCP connection, holding its [`Place`] for as long as it is
/// open; reads and writes go straight to the socket.
#[derive(Debug)]
pub struct ClientStream {
    tcp: TcpStream,
    _place: Place,
}

impl ClientStream {
    /// `tcp`, holding `place` until it is dropped.
    pub fn new(tcp: TcpStream, place: Place) -> ClientStream {
        ClientStream { tcp, _place: place }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
