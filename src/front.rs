//! The front door: client connections, CONNECT tunnels and what is served
//! inside them.
//!
//! - [`listener`]: accepts connections, answers plain proxy requests and
//!   CONNECT;
//! - [`client_stream`]: a client's connection holding its place among the
//!   connection limits, whatever it becomes (tunnel, WebSocket relay);
//! - [`tunnel`]: a CONNECT tunnel pinproxy opens (TLS terminated with the
//!   host's leaf, HTTP/1.1 or HTTP/2 inside), every request through the
//!   pipeline;
//! - [`passthrough`]: a CONNECT tunnel pinproxy does not open
//!   (`mitm.exclude`), relayed raw through the exit routing chose;
//! - [`fingerprint`]: the client's ClientHello and HTTP/2 preface, read as
//!   they pass;
//! - [`rewind`]: a stream with bytes put back in front;
//! - [`queue_room`]: where rustls' plaintext queue goes in a tunnel, so
//!   that it keeps no page of a request's buffers resident.
//!
//! - [`framing`]: every HTTP/1 request head checked before hyper reads it
//!   (smuggling refused);
//! - [`limits`]: per-client-address connections and request rate.
//!
//! Limits: at most `limits.max_connections` client connections are served
//! at once (more wait in the kernel's queue); a request head gets
//! `timeouts.header_read` from its first byte, an idle connection
//! `timeouts.client_idle`; oversized heads are refused with 431.

pub mod client_stream;
pub mod fingerprint;
pub mod gate;
pub mod framing;
pub mod h2_idle;
pub mod limits;
pub mod listener;
pub mod passthrough;
pub mod queue_room;
pub mod rewind;
pub mod tunnel;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use tokio_util::sync::CancellationToken;

use crate::mitm::Mitm;
use crate::net::tasks::ConnectionTasks;
use crate::proxy::Pipeline;

pub use listener::accept_loop;

/// hyper's own limit on header fields when none is set (its
/// `DEFAULT_MAX_HEADERS`).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Limits and timeouts of client connections (from `limits.*` and
/// `timeouts.*`).
#[derive(Debug, Clone)]
pub struct FrontSettings {
    /// Most client connections served at once.
    pub max_connections: usize,
    /// Largest request header section accepted, in bytes.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Time a client has to send a header section once its first byte
    /// arrived (enforced by [`framing::RequestGuard`]).
    pub header_read: Duration,
    /// How long an HTTP/1 connection may hold no exchange and send nothing
    /// (enforced by [`framing::RequestGuard`]).
    pub client_idle: Duration,
    /// Time a client has to finish its TLS handshake inside a tunnel.
    pub tls_handshake: Duration,
}

/// What every client connection shares.
#[derive(Debug)]
pub struct Frontend {
    /// The request spine in force: each request takes it once, at its
    /// start, and keeps it (a reload swaps in a new one).
    pub pipeline: ArcSwap<Pipeline>,
    /// TLS interception.
    pub mitm: Mitm,
    /// Limits and timeouts of client connections.
    pub settings: FrontSettings,
    /// Per-client-address connection and request-rate limits.
    pub clients: std::sync::Arc<limits::ClientLimits>,
    /// Cancelled when the daemon stops.
    pub shutdown: CancellationToken,
    /// Every connection and tunnel task, so shutdown can wait for them
    /// (and drop what is left after its grace period).
    pub tasks: ConnectionTasks,
}

impl Frontend {
    /// The HTTP/1 server settings used for client connections and for the
    /// connections inside tunnels.
    pub fn http1(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        // pinproxy answers oversized header sections itself (431 with an
        // explanation) up to four times the limit; beyond that hyper's own
        // 431 keeps memory bounded.
        let hard_limit = self.settings.max_header_bytes.saturating_mul(4);
        builder
            // The guard keeps both head and idle limits (see `framing`):
            // hyper's timer would cost an allocation and a timer per request.
            .header_read_timeout(None)
            .max_header_size(hard_limit)
            .max_buf_size(hard_limit.max(8192) + 8192)
            .preserve_header_case(true)
            // The origin's answer goes back with the headers it has: no
            // `Date` added to one whose origin sent none.
            .auto_date_header(false)
            .keep_alive(true);
        // hyper parses into an uninitialised inline array of its default
        // size, but fills a heap array of any size set here on every
        // request: set it only when it differs (same limit, same 431).
        if self.settings.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            builder.max_headers(self.settings.max_headers);
        }
        builder
    }
}

/// The future `build` makes, boxed. The box is allocated before the future
/// is made, so the compiler builds the future in it: `Box::pin(future)`
/// builds it on the stack and copies its whole size in, about 8 KB for a
/// request's pipeline, though only the few hundred bytes it captures are
/// set yet. Every request's service future is boxed this way (in release
/// builds: callgrind counts no such copy), and so are a tunnel's
/// per-connection stages.
pub(crate) fn boxed_in_place<F: Future>(build: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), build()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_future_boxed_in_place_runs_as_built() {
        let held = String::from("abc");
        let large = [7u8; 4096];
        let future = boxed_in_place(move || async move {
            tokio::task::yield_now().await;
            held.len() + usize::from(large[4095])
        });
        assert_eq!(future.await, 10);
    }
}
