//! Request heads that cannot be smuggled through: every HTTP/1.1 client
//! connection (plain proxy connections and the decrypted stream of a MITM
//! tunnel) is read through a [`RequestGuard`], which scans each request
//! head as its bytes pass on their way to hyper.
//!
//! Why an adapter and not hyper: hyper's parser refuses some ambiguous
//! heads itself (obs-fold, bare CR, NUL, differing `Content-Length`s,
//! `Content-Length` lists) but normalises others: `Content-Length` with
//! `Transfer-Encoding: chunked` is accepted and re-framed as chunked,
//! `gzip, chunked` counts as chunked, bare-LF lines are accepted, and a
//! repeated `Transfer-Encoding` is forwarded. hyper offers no hook on the
//! raw head, so the guard reads the same bytes before hyper does, with the
//! shared [`Scanner`] (a few bytes of state, no copy of the head), bounded
//! by hyper's own head limit.
//!
//! Why verdicts and not errors: hyper may read ahead (pipelined requests),
//! so the guard can see a bad head while an earlier response is still
//! being written; failing the read there would cut that response. Instead
//! the guard keeps a per-connection ledger: how many heads passed, and the
//! first refusal. The service takes one verdict per request, in order
//! ([`Verdicts::take`]); a refused head is answered `400 bad-request` with
//! `Connection: close` (so hyper closes the connection and reads nothing
//! more of it) and never reaches the pipeline. After a refusal nothing on
//! the connection is scanned or trusted again.
//!
//! Every head of a keep-alive connection is scanned: the scanner follows
//! each message's validated framing (`Content-Length`, chunked) to the next
//! head. When the connection turns into something else (a CONNECT answered
//! 2xx, a `101 Switching Protocols`), the service tells the guard
//! ([`Verdicts::after_response`]) and the rest passes unscanned.
//!
//! The guard also bounds how long a head may take once its first byte has
//! arrived (`timeouts.header_read`): a slowloris client is cut off then,
//! whatever the idle limit. And it keeps the idle limit
//! (`timeouts.client_idle`): a connection that holds no exchange and has
//! sent nothing for that long is ended as if the client had closed it.
//! hyper has a timer of its own for this, but it allocates, arms and
//! cancels it for every request. The guard's check is a timer armed once
//! per check period (a quarter of the limit, or the park period), and a
//! request only counts as activity: the limit holds to within one period.
//!
//! Parking: hyper keeps an 8 KiB read and an 8 KiB write buffer (and its
//! connection state) for as long as a connection lives, and offers no way to
//! release them between requests; fleets keep thousands of keep-alive
//! tunnels idle. A tunnel's guard may therefore *park* its connection once
//! the client has sent nothing for a whole check period ([`Park::after`])
//! and the connection holds nothing: every head that passed has been
//! answered to the end of its body ([`Answer`]), every response byte has
//! been flushed, no head has begun and the client has nothing more to read.
//! The guard then tells hyper the client closed (which hyper, idle, takes
//! as a graceful end), does not shut the stream down, and hands it back when
//! hyper drops it; the tunnel waits for the client's next byte without any
//! buffer and serves it with a new hyper connection. Any other state keeps
//! the connection as it is: parking never ends an exchange.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::Frontend;
use crate::body::{Body, BoxError};
use crate::proxy::ProxyError;
use crate::upstream::framing::{FramingError, Scanner, Side};

/// What the guard knows about the heads it has read.
#[derive(Debug, Default)]
struct Ledger {
    /// Heads scanned and found unambiguous, not yet taken by the service.
    passed: u32,
    /// The first refusal, once seen.
    refused: Option<FramingError>,
    /// The connection carries a tunnel or another protocol now.
    opaque: bool,
    /// Heads that passed, in all.
    heads: u64,
    /// Responses hyper is done with (its body written to the end, or
    /// dropped), in all.
    answered: u64,
}

impl Ledger {
    /// Whether the connection holds no exchange: every head that passed was
    /// taken by the service and answered, and it is still HTTP/1.
    fn settled(&self) -> bool {
        self.passed == 0 && self.heads == self.answered && !self.opaque && self.refused.is_none()
    }
}

/// The service's side of a guarded connection: one verdict per request.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<Mutex<Ledger>>);

impl Verdicts {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // Every update is a single field assignment: a poisoned lock still
        // holds a consistent ledger.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict on the request hyper has just handed over (heads are
    /// judged in the order hyper parses them). Fails closed: a request the
    /// guard did not see pass is refused.
    pub fn take(&self) -> Result<(), FramingError> {
        let mut ledger = self.ledger();
        if ledger.passed > 0 {
            ledger.passed -= 1;
            return Ok(());
        }
        Err(ledger.refused.unwrap_or(FramingError::Unverified))
    }

    /// Counts a response hyper is done with (see [`Answer`]).
    fn answered(&self) {
        let mut ledger = self.ledger();
        ledger.answered = ledger.answered.saturating_add(1);
    }

    /// Called with each response: a 2xx answer to CONNECT and a 101 turn
    /// the connection into a tunnel, so the guard stops scanning it.
    pub fn after_response(&self, method: &Method, status: StatusCode) {
        let tunnel = (method == Method::CONNECT && status.is_success())
            || status == StatusCode::SWITCHING_PROTOCOLS;
        if tunnel {
            self.ledger().opaque = true;
        }
    }
}

/// `inner`, for the requests of a guarded connection: a request whose head
/// was refused is answered [`refusal`] and never reaches `inner`; a
/// response that opens a tunnel stops the guard's scanning. Every response
/// body is an [`Answer`], so the guard knows when the connection is idle.
pub fn guarded<S>(
    verdicts: Verdicts,
    inner: S,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Answer>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Answer>, Infallible>> + Send,
> + Clone
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone,
    S::Future: Send,
{
    service_fn(move |request: Request<Incoming>| {
        let method = request.method().clone();
        let verdicts = verdicts.clone();
        let served = match verdicts.take() {
            Ok(()) => Ok(inner.call(request)),
            Err(error) => Err(error),
        };
        async move {
            let response = match served {
                Ok(future) => match future.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
                Err(error) => {
                    tracing::debug!(%error, "refused a request head");
                    refusal(error)
                }
            };
            verdicts.after_response(&method, response.status());
            Ok(response.map(|body| Answer { body, verdicts }))
        }
    })
}

/// A response body that counts itself answered in its connection's ledger
/// when hyper is done with it (written to its end, or dropped on an error).
pub struct Answer {
    body: Body,
    verdicts: Verdicts,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.verdicts.answered();
    }
}

/// Guards a client connection of `frontend`: heads bounded like hyper's
/// (so hyper's own 431 comes first), `timeouts.header_read` from a head's
/// first byte, `timeouts.client_idle` while idle.
pub fn guard<T>(frontend: &Frontend, io: T) -> (RequestGuard<T>, Verdicts) {
    let hyper_limit = frontend.settings.max_header_bytes.saturating_mul(4);
    let head_limit = hyper_limit.max(8192).saturating_add(8192);
    let settings = &frontend.settings;
    RequestGuard::new(io, head_limit, settings.header_read, settings.client_idle)
}

/// How a guarded connection parks (see the module documentation).
#[derive(Debug)]
pub struct Park<T> {
    /// The check period: a connection parks at the first check that finds
    /// no byte from the client since the one before, and nothing open.
    pub after: Duration,
    /// Where the stream goes once hyper lets go of the parked connection.
    pub back: oneshot::Sender<T>,
}

/// The answer to a refused head: `400 bad-request` saying why, and
/// `Connection: close`: nothing after it on the connection is read.
pub fn refusal(error: FramingError) -> Response<Body> {
    let mut response = ProxyError::AmbiguousFraming(error.to_string()).to_response();
    response
        .headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A client connection read through the request-head scanner.
#[derive(Debug)]
pub struct RequestGuard<T> {
    /// The stream; taken only when it is handed back parked, on drop.
    inner: Option<T>,
    scanner: Scanner,
    verdicts: Verdicts,
    header_read: Duration,
    /// The idle limit (`timeouts.client_idle`).
    idle: Duration,
    /// Armed while a head is being received (allocated on first use and
    /// reset for each head that spans reads); while the connection is
    /// idle, it times the idle check instead.
    deadline: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Whether every byte hyper wrote has been flushed through.
    flushed: bool,
    /// Set when the connection may park.
    park: Option<Park<T>>,
    /// The idle check is timed (the deadline is its, not a head's).
    idle_armed: bool,
    /// How long the checks have found the connection quiet, in a row.
    quiet_for: Duration,
    /// Reads that brought bytes, counted; the idle check compares it with
    /// the count when it was armed instead of resetting a timer per request.
    activity: u32,
    /// `activity` when the idle check was armed.
    activity_armed: u32,
    /// hyper was told the client closed (the connection parked, or was
    /// idle too long): every later read ends the same way.
    ended: bool,
    /// The connection parked: the stream goes back on drop.
    parked: bool,
}

/// What an idle check found.
#[derive(Debug, PartialEq, Eq)]
enum Idle {
    /// Not idle, or not for long enough: go on waiting.
    Wait,
    /// Quiet for the park period: park.
    Park,
    /// Quiet for the idle limit: end the connection.
    Expired,
}

/// Idle checks per idle limit, when the connection does not park.
const IDLE_CHECKS: u32 = 4;

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the stream was handed back")
}

impl<T> RequestGuard<T> {
    /// Guards `inner`, whose heads may be `head_limit` bytes and must
    /// arrive within `header_read` of their first byte, and which ends
    /// once it has been idle for `idle`. The service keeps the returned
    /// [`Verdicts`].
    pub fn new(
        inner: T,
        head_limit: usize,
        header_read: Duration,
        idle: Duration,
    ) -> (RequestGuard<T>, Verdicts) {
        let verdicts = Verdicts::default();
        let guard = RequestGuard {
            inner: Some(inner),
            scanner: Scanner::new(Side::Request, head_limit),
            verdicts: verdicts.clone(),
            header_read,
            idle,
            deadline: None,
            armed: false,
            flushed: true,
            park: None,
            idle_armed: false,
            quiet_for: Duration::ZERO,
            activity: 0,
            activity_armed: 0,
            ended: false,
            parked: false,
        };
        (guard, verdicts)
    }

    /// The stream, unguarded: for a connection hyper has handed over
    /// (CONNECT), whose bytes are no longer HTTP/1 messages to scan. `None`
    /// once it was handed back parked.
    pub fn into_inner(mut self) -> Option<T> {
        self.inner.take()
    }

    /// Lets the connection park as `park` says.
    pub fn parking(mut self, park: Park<T>) -> RequestGuard<T> {
        self.park = Some(park);
        self
    }

    fn scan(&mut self, fresh: &[u8]) {
        let mut ledger = self.verdicts.ledger();
        if ledger.opaque {
            self.scanner.stop();
            self.armed = false;
            return;
        }
        if self.scanner.is_done() {
            return;
        }
        let mut passed = 0u32;
        let result = self.scanner.scan(fresh, |_| passed += 1);
        ledger.passed = ledger.passed.saturating_add(passed);
        ledger.heads = ledger.heads.saturating_add(u64::from(passed));
        if let Err(error) = result {
            ledger.refused.get_or_insert(error);
        }
        drop(ledger);
        let in_head = self.scanner.in_head();
        // A head that began in these bytes (the first, or one after a head
        // that ended here) gets its own deadline.
        if in_head && (!self.armed || passed > 0) {
            self.set_deadline(Instant::now() + self.header_read);
            self.idle_armed = false;
        }
        self.armed = in_head;
    }

    fn set_deadline(&mut self, deadline: Instant) {
        match &mut self.deadline {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// The idle check's period: a quarter of the idle limit, or the park
    /// period if that is shorter (a connection that may park is checked as
    /// often as before the guard kept the idle limit).
    fn idle_period(&self) -> Duration {
        let quarter = (self.idle / IDLE_CHECKS).max(Duration::from_millis(1));
        self.park.as_ref().map_or(quarter, |p| p.after.min(quarter))
    }

    /// With nothing to read from the client: whether the connection has now
    /// been idle long enough to park, or to end.
    ///
    /// A check runs every period while the connection waits: it finds the
    /// connection quiet when no byte came from the client since the
    /// previous check and no exchange is open, and adds up how long it has
    /// been quiet in a row. A quiet client's connection parks one to two
    /// park periods after its last byte, and ends (if it does not park)
    /// between the idle limit and one period more. An open exchange (a slow
    /// response, a long poll) never counts as idle. The timer is set once
    /// per check, not per request: a request only counts as activity.
    fn idle_check(&mut self, cx: &mut Context<'_>) -> Idle {
        // A partial head or body is not idle.
        if !self.scanner.between_messages() {
            return Idle::Wait;
        }
        let period = self.idle_period();
        if self.idle_armed {
            // The timer's waker was registered when it was armed (this task
            // polls the connection throughout): until it fires, nothing to do.
            if !self
                .deadline
                .as_ref()
                .is_some_and(|sleep| sleep.is_elapsed())
            {
                return Idle::Wait;
            }
            let quiet = self.activity == self.activity_armed
                && self.flushed
                && self.verdicts.ledger().settled();
            self.quiet_for = if quiet {
                self.quiet_for.saturating_add(period)
            } else {
                Duration::ZERO
            };
            if self.quiet_for >= self.idle {
                return Idle::Expired;
            }
            if let Some(park) = &self.park {
                if self.quiet_for >= park.after {
                    return Idle::Park;
                }
            }
        }
        // Arm (or re-arm) the next check.
        self.set_deadline(Instant::now() + period);
        self.idle_armed = true;
        self.activity_armed = self.activity;
        if let Some(sleep) = self.deadline.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                // A zero period: ask again at once.
                cx.waker().wake_by_ref();
            }
        }
        Idle::Wait
    }
}

impl<T> Drop for RequestGuard<T> {
    fn drop(&mut self) {
        if !self.parked {
            return;
        }
        if let (Some(park), Some(inner)) = (self.park.take(), self.inner.take()) {
            // The tunnel may have stopped waiting (shutdown): the stream then
            // closes here, as it would have.
            let _ = park.back.send(inner);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RequestGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ended {
            // hyper was told the client closed: it stays closed.
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let before = buf.filled().len();
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if !fresh.is_empty() {
                    this.activity = this.activity.wrapping_add(1);
                    this.scan(fresh);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // A head begun in bytes the client sent with its CONNECT
                // (or upgrade) is the tunnel's, once the answer opened it:
                // no deadline of a head holds there.
                if this.armed && this.verdicts.ledger().opaque {
                    this.scanner.stop();
                    this.armed = false;
                }
                // Nothing more from the client now: a head it started
                // must still end in time.
                if this.armed {
                    if let Some(sleep) = this.deadline.as_mut() {
                        if sleep.as_mut().poll(cx).is_ready() {
                            this.armed = false;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the request head was not complete within timeouts.header_read",
                            )));
                        }
                    }
                } else {
                    match this.idle_check(cx) {
                        Idle::Wait => {}
                        // An end of stream while idle is a graceful close
                        // to hyper; a parked stream itself stays open for
                        // the tunnel, an expired one closes with the guard.
                        Idle::Park => {
                            this.ended = true;
                            this.parked = true;
                            return Poll::Ready(Ok(()));
                        }
                        Idle::Expired => {
                            tracing::debug!(idle = ?this.idle, "closing a client connection idle for timeouts.client_idle");
                            this.ended = true;
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> RequestGuard<T> {
    /// `write` on the stream; a write that moved bytes leaves them
    /// unflushed until the next flush goes through.
    fn write_with(
        &mut self,
        write: impl FnOnce(Pin<&mut T>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let written = write(Pin::new(inner));
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.flushed = false;
        }
        written
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RequestGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(|inner| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(|inner| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|inner| inner.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let flushed = Pin::new(inner).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            this.flushed = true;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parked {
            // The stream outlives this hyper connection.
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        Pin::new(inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn verdicts_follow_heads_in_order() {
        let bytes: &[u8] = b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n";
        let (mut guard, verdicts) =
            RequestGuard::new(bytes, 1024, Duration::from_secs(1), Duration::from_secs(60));
        let mut sink = Vec::new();
        guard.read_to_end(&mut sink).await.unwrap();
        assert_eq!(sink, bytes, "bytes pass untouched");
        assert_eq!(verdicts.take(), Ok(()));
        assert_eq!(verdicts.take(), Err(FramingError::ObsFold));
        assert_eq!(verdicts.take(), Err(FramingError::ObsFold));
    }

    /// A guard over one end of a pipe, idle limit 8 s, and the other end.
    fn piped() -> (
        RequestGuard<tokio::io::DuplexStream>,
        Verdicts,
        tokio::io::DuplexStream,
    ) {
        let (client, server) = tokio::io::duplex(1024);
        let (guard, verdicts) =
            RequestGuard::new(server, 1024, Duration::from_secs(1), Duration::from_secs(8));
        (guard, verdicts, client)
    }

    /// The client sends a request; the guard passes it; the service takes
    /// it and (if `answer`) answers it to the end.
    async fn exchange(
        guard: &mut RequestGuard<tokio::io::DuplexStream>,
        verdicts: &Verdicts,
        client: &mut tokio::io::DuplexStream,
        answer: bool,
    ) {
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(guard.read(&mut buf).await.unwrap() > 0);
        assert_eq!(verdicts.take(), Ok(()));
        if answer {
            verdicts.answered();
        }
    }

    // Time is paused: the runtime moves the clock to the next timer
    // whenever every task waits, so these take no real time.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_within_a_check_of_the_idle_limit() {
        let (mut guard, verdicts, mut client) = piped();
        // Requests 3 s apart keep it open well past the limit.
        for _ in 0..4 {
            exchange(&mut guard, &verdicts, &mut client, true).await;
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(3), guard.read(&mut buf)).await;
            assert!(read.is_err(), "still open while requests come");
        }
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(30), guard.read(&mut buf)).await;
        assert_eq!(read.ok().and_then(|r| r.ok()), Some(0), "ended as a close");
        let waited = started.elapsed();
        // 8 s checked every 2 s: between 8 and 10 s after the last byte.
        assert!(
            waited + Duration::from_secs(3) >= Duration::from_secs(8)
                && waited + Duration::from_secs(3) <= Duration::from_secs(10),
            "{waited:?}"
        );
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0, "and stays closed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_exchange_is_never_idle() {
        let (mut guard, verdicts, mut client) = piped();
        // Taken but not answered: a slow response, a long poll.
        exchange(&mut guard, &verdicts, &mut client, false).await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(60), guard.read(&mut buf)).await;
        assert!(read.is_err(), "kept open while the answer is pending");
        // Answered: idle from now on.
        verdicts.answered();
        let read = tokio::time::timeout(Duration::from_secs(12), guard.read(&mut buf)).await;
        assert_eq!(read.ok().and_then(|r| r.ok()), Some(0));
    }

    /// Bytes the client sent with its CONNECT, before the answer, that
    /// look like the start of a head (an SSH banner) are the tunnel's once
    /// it opens: the head deadline they armed does not end the tunnel
    /// while the client waits for its server.
    #[tokio::test(start_paused = true)]
    async fn a_head_begun_before_a_tunnel_opened_does_not_end_it() {
        use tokio::io::AsyncWriteExt;
        let (mut guard, verdicts, mut client) = piped();
        client
            .write_all(b"CONNECT a:22 HTTP/1.1\r\n\r\nSSH-2.0-x\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(guard.read(&mut buf).await.unwrap() > 0);
        assert_eq!(verdicts.take(), Ok(()));
        verdicts.after_response(&Method::CONNECT, StatusCode::OK);
        let read = tokio::time::timeout(Duration::from_secs(5), guard.read(&mut buf)).await;
        assert!(read.is_err(), "the tunnel was ended: {read:?}");
        // Still a tunnel: the client's next bytes come through.
        client.write_all(b"more").await.unwrap();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_tunnel_is_not_scanned() {
        let bytes: &[u8] = b"CONNECT a:443 HTTP/1.1\r\n\r\n";
        let (mut guard, verdicts) =
            RequestGuard::new(bytes, 1024, Duration::from_secs(1), Duration::from_secs(60));
        let mut sink = Vec::new();
        guard.read_to_end(&mut sink).await.unwrap();
        assert_eq!(verdicts.take(), Ok(()));
        verdicts.after_response(&Method::CONNECT, StatusCode::OK);
        guard.scan(b"\x16\x03\x01 not http at all\n");
        assert_eq!(verdicts.take(), Err(FramingError::Unverified));
        assert!(verdicts.ledger().refused.is_none());
    }
}
