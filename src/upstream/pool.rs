//! The keep-alive connections of one lane, by origin.
//!
//! A lane's connections all present the same fingerprint (its ClientHello
//! and HTTP/2 preface), so they are kept apart from every other lane's. Per
//! origin, a lane keeps one multiplexed HTTP/2 connection (as a browser
//! does) or a stack of idle HTTP/1.1 connections. When the client offers
//! HTTP/2, concurrent first requests to an origin wait for one dial, so the
//! origin sees one connection, not a burst. An HTTP/1.1 connection goes back
//! to the stack when its response body has been read to the end.
//!
//! A request that finds its connection closed before it was written is
//! retried once on a new connection; nothing is retried once written.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::conn::{NewConnection, TunnelInfo, UpstreamIo};
use super::dial::Dialer;
use super::error::{ConnectError, UpstreamError};
use super::framing;
use super::h2::{self, TokioExec};
use super::tls::Shape;
use super::Presentation;
use crate::body::{Body, BoxError};
use crate::fingerprint::header_order;
use crate::net::{default_port, HostPort};

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Origin {
    https: bool,
    target: HostPort,
}

impl Origin {
    fn of(uri: &Uri) -> Result<Origin, ConnectError> {
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let target = HostPort::from_uri(uri, default_port(https))
            .ok_or_else(|| ConnectError::BadTarget(uri.to_string()))?;
        Ok(Origin { https, target })
    }
}

/// The sending half of an HTTP/2 connection.
#[derive(Clone)]
enum H2Sender {
    /// hyper's HTTP/2 (rustls mode: pinproxy's own preface).
    Hyper(hyper::client::conn::http2::SendRequest<Body>),
    /// wreq's HTTP/2, sending the lane's preface.
    Shaped(wreq_proto::conn::http2::SendRequest<Body>),
}

impl H2Sender {
    fn is_closed(&self) -> bool {
        match self {
            H2Sender::Hyper(s) => s.is_closed(),
            H2Sender::Shaped(s) => s.is_closed(),
        }
    }
}

#[derive(Clone)]
struct H2Conn {
    sender: H2Sender,
    info: TunnelInfo,
}

struct H1Conn {
    sender: hyper::client::conn::http1::SendRequest<Body>,
    info: TunnelInfo,
    idle_since: Instant,
    /// Tells the connection's response scanner what each request was.
    framing: framing::Exchange,
}

/// The connections to one origin.
#[derive(Default)]
struct Conns {
    h2: Option<H2Conn>,
    idle: Vec<H1Conn>,
    /// The origin answered an `h2` offer with HTTP/1.1: later dials need
    /// not wait for each other.
    speaks_h1: bool,
    /// Held while a connection that may turn out HTTP/2 is being dialled.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

/// A connection checked out for one request.
enum Checked {
    H1(H1Conn),
    H2(H2Conn),
}

/// Keep-alive and timeout settings of a lane's connections.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// Most idle HTTP/1.1 connections per origin.
    pub max_idle_per_origin: usize,
}

/// The connections of one lane.
pub(super) struct LanePool {
    dialer: Dialer,
    presentation: Presentation,
    limits: Limits,
    /// Keyed by origins a client names, so with a seeded hasher; foldhash
    /// rather than SipHash: this map is looked up twice per request.
    origins: Mutex<HashMap<Origin, Conns, foldhash::fast::RandomState>>,
}

impl std::fmt::Debug for LanePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanePool")
            .field("exit", &self.dialer.exit)
            .finish_non_exhaustive()
    }
}

impl LanePool {
    /// A pool dialling with `dialer`, presenting `presentation`.
    pub(super) fn new(dialer: Dialer, presentation: Presentation, limits: Limits) -> LanePool {
        LanePool {
            dialer,
            presentation,
            limits,
            origins: Mutex::new(HashMap::default()),
        }
    }

    fn origins(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Origin, Conns, foldhash::fast::RandomState>> {
        // A panic while the lock was held cannot leave the map inconsistent
        // (every change is one insert or remove): keep using it.
        self.origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes this lane's idle HTTP/1.1 connections that have been idle
    /// for the idle timeout by `now` (or were closed by the far side), and
    /// appends when each remaining one went idle to `idle_since`.
    pub(super) fn expire_idle(&self, now: Instant, idle_since: &mut Vec<Instant>) {
        for conns in self.origins().values_mut() {
            conns.idle.retain(|conn| {
                now.duration_since(conn.idle_since) < self.limits.idle_timeout
                    && !conn.sender.is_closed()
            });
            idle_since.extend(conns.idle.iter().map(|conn| conn.idle_since));
        }
    }

    /// Closes this lane's idle HTTP/1.1 connections that went idle at or
    /// before `cutoff`; returns how many.
    pub(super) fn close_idle_since(&self, cutoff: Instant) -> usize {
        let mut closed = 0;
        for conns in self.origins().values_mut() {
            let before = conns.idle.len();
            conns.idle.retain(|conn| conn.idle_since > cutoff);
            closed += before - conns.idle.len();
        }
        closed
    }

    /// The TLS shape of this lane's connections (`None`: rustls).
    fn shape<'a>(&'a self, alps: &'a [u8], http1_only: bool) -> Option<Shape<'a>> {
        self.presentation.hello.as_deref().map(|hello| Shape {
            hello,
            http1_only,
            alps_settings: alps,
        })
    }

    fn offers_h2(&self) -> bool {
        match &self.presentation.hello {
            Some(hello) => hello
                .alpn
                .as_ref()
                .is_some_and(|alpn| alpn.iter().any(|p| p.as_slice() == b"h2")),
            None => self.dialer.h2,
        }
    }

    /// Sends `request` (absolute URI) to its origin on one of the lane's
    /// connections and returns the response head; the body streams.
    pub(super) async fn send(
        self: &Arc<Self>,
        request: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let origin = Origin::of(request.uri()).map_err(UpstreamError::Connect)?;
        let mut request = request;
        let mut retried = false;
        loop {
            let (checked, dialed) = self.checkout(&origin).await?;
            let attempt = match checked {
                Checked::H2(conn) => self.send_h2(conn, request).await,
                Checked::H1(conn) => self.send_h1(conn, request, &origin).await,
            };
            match attempt {
                Ok(mut response) => {
                    if dialed {
                        response.extensions_mut().insert(NewConnection);
                    }
                    return Ok(response);
                }
                // Not written: the connection was gone. Once more, fresh.
                Err(Unsent(Some(unsent), _)) if !retried => {
                    retried = true;
                    request = unsent;
                }
                Err(Unsent(_, error)) => return Err(error),
            }
        }
    }

    /// A live connection to `origin`: the shared HTTP/2 one, an idle
    /// HTTP/1.1 one, or a new one (then `true`: its open is this request's
    /// to time).
    async fn checkout(self: &Arc<Self>, origin: &Origin) -> Result<(Checked, bool), UpstreamError> {
        let (dialing, speaks_h1) = {
            let mut origins = self.origins();
            let conns = origins.entry(origin.clone()).or_default();
            if let Some(conn) = reusable_h2(conns) {
                return Ok((Checked::H2(conn), false));
            }
            if let Some(conn) = self.reusable_h1(conns) {
                return Ok((Checked::H1(conn), false));
            }
            (conns.dialing.clone(), conns.speaks_h1)
        };
        if origin.https && self.offers_h2() && !speaks_h1 {
            let _one_dial = dialing.lock().await;
            if let Some(conn) = self.origins().get_mut(origin).and_then(reusable_h2) {
                return Ok((Checked::H2(conn), false));
            }
            return Box::pin(self.dial(origin)).await.map(|c| (c, true));
        }
        // Boxed: dialling (exit, CONNECT, TLS) is a large future that a
        // keep-alive request never runs; unboxed it would size every
        // request's future.
        Box::pin(self.dial(origin)).await.map(|c| (c, true))
    }

    fn reusable_h1(&self, conns: &mut Conns) -> Option<H1Conn> {
        let now = Instant::now();
        while let Some(conn) = conns.idle.pop() {
            let fresh = now.duration_since(conn.idle_since) < self.limits.idle_timeout;
            if fresh && !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    /// Dials a new connection to `origin` and speaks what the origin chose.
    async fn dial(self: &Arc<Self>, origin: &Origin) -> Result<Checked, UpstreamError> {
        let alps = self
            .presentation
            .h2
            .as_deref()
            .map(h2::settings_payload)
            .unwrap_or_default();
        let (io, info) = self
            .dialer
            .connect(&origin.target, origin.https, self.shape(&alps, false))
            .await
            .map_err(UpstreamError::Connect)?;
        if io.negotiated_h2() {
            let sender = self.handshake_h2(io).await?;
            let conn = H2Conn { sender, info };
            self.origins().entry(origin.clone()).or_default().h2 = Some(conn.clone());
            return Ok(Checked::H2(conn));
        }
        if origin.https && self.offers_h2() {
            self.origins().entry(origin.clone()).or_default().speaks_h1 = true;
        }
        let (sender, framing) = handshake_h1(io, false).await?;
        Ok(Checked::H1(H1Conn {
            sender,
            info,
            idle_since: Instant::now(),
            framing,
        }))
    }

    async fn handshake_h2(&self, io: UpstreamIo) -> Result<H2Sender, UpstreamError> {
        match &self.presentation.h2 {
            Some(preface) => {
                let (sender, conn) = wreq_proto::conn::http2::Builder::new(TokioExec)
                    .options(h2::options(preface))
                    .handshake::<_, Body>(io)
                    .await
                    .map_err(|e| UpstreamError::from_wreq(&e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "origin HTTP/2 connection ended");
                    }
                });
                Ok(H2Sender::Shaped(sender))
            }
            None => {
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake::<_, Body>(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::from_hyper(&e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "origin HTTP/2 connection ended");
                    }
                });
                Ok(H2Sender::Hyper(sender))
            }
        }
    }

    async fn send_h2(
        &self,
        conn: H2Conn,
        mut request: Request<Body>,
    ) -> Result<Response<UpstreamBody>, Unsent> {
        for_h2(&mut request);
        let info = conn.info;
        let response = match conn.sender {
            H2Sender::Hyper(mut sender) => sender
                .try_send_request(request)
                .await
                .map(|r| r.map(UpstreamBody::Hyper))
                .map_err(|mut e| {
                    let unsent = e.take_message();
                    Unsent(unsent, UpstreamError::from_hyper(&e.into_error()))
                })?,
            H2Sender::Shaped(mut sender) => sender
                .try_send_request(request)
                .await
                .map(|r| r.map(UpstreamBody::Shaped))
                .map_err(|mut e| {
                    let unsent = e.take_message();
                    Unsent(unsent, UpstreamError::from_wreq(&e.into_error()))
                })?,
        };
        Ok(with_info(response, info))
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut conn: H1Conn,
        mut request: Request<Body>,
        origin: &Origin,
    ) -> Result<Response<UpstreamBody>, Unsent> {
        if let Err(e) = conn.sender.ready().await {
            return Err(Unsent(Some(request), UpstreamError::from_hyper(&e)));
        }
        for_h1(&mut request, origin);
        conn.framing.request(request.method());
        match conn.sender.try_send_request(request).await {
            Ok(response) => {
                let info = conn.info.clone();
                let giveback = GiveBack {
                    pool: Arc::downgrade(self),
                    origin: origin.clone(),
                    conn: Some(conn),
                };
                let response = response.map(|body| {
                    UpstreamBody::Pooled(PooledBody {
                        body,
                        giveback: Some(giveback),
                    })
                });
                Ok(with_info(response, info))
            }
            Err(mut e) => {
                let mut unsent = e.take_message();
                if let Some(request) = unsent.as_mut() {
                    back_to_absolute(request, origin);
                }
                Err(Unsent(unsent, UpstreamError::from_hyper(&e.into_error())))
            }
        }
    }

    fn give_back(&self, origin: Origin, mut conn: H1Conn) {
        if conn.sender.is_closed() {
            return;
        }
        conn.idle_since = Instant::now();
        let mut origins = self.origins();
        let conns = origins.entry(origin).or_default();
        if conns.idle.len() < self.limits.max_idle_per_origin {
            conns.idle.push(conn);
        }
    }

    /// Sends a WebSocket upgrade on a connection of its own (HTTP/1.1, as a
    /// browser opens one), which the response then owns.
    pub(super) async fn send_upgrade(
        &self,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin = Origin::of(request.uri()).map_err(UpstreamError::Connect)?;
        let (io, info) = self
            .dialer
            .connect(&origin.target, origin.https, self.shape(&[], true))
            .await
            .map_err(UpstreamError::Connect)?;
        let (mut sender, framing) = handshake_h1(io, true).await?;
        for_h1(&mut request, &origin);
        framing.request(request.method());
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::from_hyper(&e))?;
        let mut response = response;
        response.extensions_mut().insert(info);
        response.extensions_mut().insert(NewConnection);
        Ok(response)
    }
}

fn reusable_h2(conns: &mut Conns) -> Option<H2Conn> {
    match &conns.h2 {
        Some(conn) if !conn.sender.is_closed() => Some(conn.clone()),
        Some(_) => {
            conns.h2 = None;
            None
        }
        None => None,
    }
}

/// A request that failed, and the request itself when it was never written.
struct Unsent(Option<Request<Body>>, UpstreamError);

/// An HTTP/1.1 connection on `io`, its responses read through the framing
/// scanner (an ambiguous response fails its request with 502 before hyper
/// reads a byte of it; see `upstream::framing`).
async fn handshake_h1(
    io: UpstreamIo,
    upgrades: bool,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Body>,
        framing::Exchange,
    ),
    UpstreamError,
> {
    let (io, exchange) = framing::ResponseGuard::new(io);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::from_hyper(&e))?;
    if upgrades {
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "origin connection ended");
            }
        });
    } else {
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "origin connection ended");
            }
        });
    }
    Ok((sender, exchange))
}

fn with_info<B>(mut response: Response<B>, info: TunnelInfo) -> Response<B> {
    response.extensions_mut().insert(info);
    response
}

/// Makes an absolute-form request an HTTP/1.1 one: origin-form target, and
/// a `Host` header (first, where a browser puts it) if the client sent none
/// (an HTTP/2 client).
fn for_h1(request: &mut Request<Body>, origin: &Origin) {
    if !request.headers().contains_key(header::HOST) {
        let authority = origin.target.authority(default_port(origin.https));
        if let Ok(host) = HeaderValue::from_str(&authority) {
            let old = std::mem::take(request.headers_mut());
            let headers = request.headers_mut();
            headers.reserve(old.len() + 1);
            headers.insert(header::HOST, host);
            let mut name = None;
            for (next, value) in old {
                if next.is_some() {
                    name = next;
                }
                if let Some(name) = &name {
                    headers.append(name.clone(), value);
                }
            }
        }
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
}

/// Undoes [`for_h1`]'s target change, for a retry on another connection.
fn back_to_absolute(request: &mut Request<Body>, origin: &Origin) {
    let authority = origin.target.authority(default_port(origin.https));
    let scheme = if origin.https {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let path = request.uri().path_and_query().cloned();
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Authority::try_from(authority).ok();
    parts.path_and_query = path;
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// Makes a request an HTTP/2 one: the client's `Host` (an HTTP/1.1 client)
/// becomes `:authority`, and the connection-specific headers HTTP/2
/// forbids are dropped.
fn for_h2(request: &mut Request<Body>) {
    if let Some(host) = header_order::remove(request.headers_mut(), &header::HOST) {
        if let Ok(authority) = Authority::try_from(host.as_bytes()) {
            let mut parts = request.uri().clone().into_parts();
            parts.authority = Some(authority);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    strip_connection_specific(request.headers_mut());
}

/// Drops what HTTP/2 forbids (RFC 9113 §8.2.2), keeping the rest's order.
fn strip_connection_specific(headers: &mut HeaderMap) {
    header_order::retain(headers, |name, value| {
        let forbidden = *name == header::CONNECTION
            || *name == header::TRANSFER_ENCODING
            || *name == header::UPGRADE
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection";
        let te_other_than_trailers =
            *name == header::TE && !value.as_bytes().eq_ignore_ascii_case(b"trailers");
        !forbidden && !te_other_than_trailers
    });
}

/// Returns an HTTP/1.1 connection to its pool once its response is done.
struct GiveBack {
    pool: Weak<LanePool>,
    origin: Origin,
    conn: Option<H1Conn>,
}

impl GiveBack {
    fn now(&mut self) {
        if let (Some(pool), Some(conn)) = (self.pool.upgrade(), self.conn.take()) {
            pool.give_back(self.origin.clone(), conn);
        }
    }
}

/// A response body on a pooled HTTP/1.1 connection: the connection goes
/// back to the pool when the body has been read to its end.
pub struct PooledBody {
    body: Incoming,
    giveback: Option<GiveBack>,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body dropped unread (HEAD, 204, 304) is complete all the same.
        if self.body.is_end_stream() {
            if let Some(giveback) = self.giveback.as_mut() {
                giveback.now();
            }
        }
    }
}

/// The body of an origin's response, whichever connection carried it.
pub enum UpstreamBody {
    /// From hyper's HTTP/2.
    Hyper(Incoming),
    /// From the shaped HTTP/2.
    Shaped(wreq_proto::body::Incoming),
    /// From a pooled HTTP/1.1 connection.
    Pooled(PooledBody),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Shaped(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Pooled(pooled) => {
                let polled = Pin::new(&mut pooled.body).poll_frame(cx);
                if let Poll::Ready(None) = &polled {
                    if let Some(mut giveback) = pooled.giveback.take() {
                        giveback.now();
                    }
                }
                polled.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(body) => body.is_end_stream(),
            UpstreamBody::Shaped(body) => body.is_end_stream(),
            UpstreamBody::Pooled(pooled) => pooled.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(body) => body.size_hint(),
            UpstreamBody::Shaped(body) => body.size_hint(),
            UpstreamBody::Pooled(pooled) => pooled.body.size_hint(),
        }
    }
}
