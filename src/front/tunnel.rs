//! Serving one CONNECT tunnel pinproxy opens (the MITM): tell TLS from
//! plain HTTP by the first byte,
//! terminate TLS with the host's leaf, then serve the protocol the client
//! chose by ALPN (HTTP/2 or HTTP/1.1) on the decrypted stream, every request
//! through the pipeline.
//!
//! Memory: fleets hold thousands of tunnels open and idle, so an idle tunnel
//! must cost little. Each stage's future is boxed only while it runs (the
//! tunnel task itself stays small), and the HTTP server, with its buffers,
//! is only built once the client has sent its first decrypted byte.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::client_stream::ClientStream;
use super::fingerprint::{read_client_hello, HelloRead, PrefaceRecorder};
use super::framing::{self, Park, RequestGuard};
use super::listener::{drive, log_connection_end};
use super::queue_room::QueueRoom;
use super::rewind::Rewind;
use super::{h2_idle, limits, Frontend};
use crate::fingerprint::ClientConnection;
use crate::mitm::cert_cache::MintError;
use crate::mitm::leaf::LeafName;
use crate::proxy::target::Tunnel;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Concurrent streams a client may open on one HTTP/2 connection.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Bytes of an answer an HTTP/2 stream to the client holds before
/// pinproxy stops reading the origin's body for it.
const SEND_BUFFER_PER_STREAM: usize = 64 * 1024;
/// How often an HTTP/1.1 connection in a tunnel checks whether it may park
/// (releasing hyper's buffers, about 20 KiB, until the client's next byte):
/// a quiet client's connection parks one to two of these after its last
/// byte. Long enough that a client sending request after request never
/// parks (setting up a hyper connection costs a few microseconds), short
/// enough that a fleet's idle tunnels all do.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Serves `tunnel` once `upgrade` hands over the client's stream, until
/// either side closes it; `client` is the address whose request rate limit
/// every request inside counts against. The tunnel holds the connection's
/// place among the connection limits as long as it is open.
///
/// One async block over its arguments rather than a chain of `async fn`s:
/// this future is the tunnel task's state for the tunnel's whole life, and
/// each `async fn` layer keeps its own copy of the arguments it moves on
/// (about 900 bytes per idle tunnel in all). An argument keeps its slot for
/// the task's whole life, even once moved on, so `tunnel` comes boxed. The
/// stages whose state is large, short-lived or rare (the opening up to the
/// end of the TLS handshake, HTTP/2, plain HTTP, each HTTP/1 connection)
/// are boxed. The HTTP/1 loop over TLS is not: its state is what a parked
/// tunnel keeps, and boxed it was allocated at the first request, amid that
/// request's short-lived buffers, where it kept a page of them from being
/// returned (about 0.8 KiB per idle tunnel, measured at 10,000 tunnels).
// Not `async fn` (clippy's suggestion): it would rebind each argument in the
// body, which `-Zprint-type-sizes` shows as a second slot per argument.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    frontend: Arc<Frontend>,
    upgrade: OnUpgrade,
    tunnel: Box<Tunnel>,
    client: IpAddr,
) -> impl Future<Output = ()> + Send {
    async move {
        // Boxed: the opening's state (the first byte's wait, the
        // ClientHello, the handshake) is short-lived; the tunnel task
        // should not carry room for it afterwards.
        let opened = super::boxed_in_place(|| open(&frontend, upgrade, tunnel)).await;
        let (tls, tunnel) = match opened {
            Some(Opened::Tls(tls, tunnel)) => (tls, tunnel),
            // Plain HTTP in a tunnel is rare: boxed, so that its state does
            // not size every tunnel's task.
            Some(Opened::Plain(io, tunnel)) => {
                return super::boxed_in_place(|| serve_http1(frontend, io, tunnel, client)).await;
            }
            None => return,
        };
        let h2 = speaks_h2(&tls);
        // Taken as the handshake ends, for rustls' plaintext queue.
        let room = QueueRoom::reserve();
        let Some(tls) = first_byte(&frontend, tls, frontend.settings.client_idle, room).await
        else {
            return;
        };
        if h2 {
            let tls = PrefaceRecorder::new(tls, tunnel.client.clone());
            super::boxed_in_place(|| serve_h2(frontend, tls, tunnel, client)).await;
        } else {
            serve_http1(frontend, tls, tunnel, client).await;
        }
    }
}

/// A tunnel whose client has spoken: TLS (terminated) or plain HTTP.
enum Opened {
    Tls(Box<TlsStream<Rewind<ClientStream>>>, Arc<Tunnel>),
    Plain(Rewind<ClientStream>, Arc<Tunnel>),
}

/// Takes the client's stream once `upgrade` hands it over and waits for
/// its first byte: TLS is terminated (its ClientHello recorded first),
/// anything else is plain HTTP. `None` when the client left or failed
/// first.
async fn open(frontend: &Frontend, upgrade: OnUpgrade, mut tunnel: Box<Tunnel>) -> Option<Opened> {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "client left before the tunnel opened");
            return None;
        }
    };
    let io = client_stream(upgraded)?;
    let io = first_byte(
        frontend,
        io,
        frontend.settings.tls_handshake,
        QueueRoom::none(),
    )
    .await?
    .flatten();
    tunnel.tls = io.prefix().first() == Some(&TLS_HANDSHAKE);
    if !tunnel.tls {
        return Some(Opened::Plain(io, Arc::new(*tunnel)));
    }
    // The client's ClientHello, read before rustls sees it and put back.
    let deadline = tokio::time::Instant::now() + frontend.settings.tls_handshake;
    let (io, hello) = match tokio::time::timeout_at(deadline, read_client_hello(io)).await {
        Ok((io, HelloRead::Hello(hello))) => (io.flatten(), hello),
        Ok((_, HelloRead::Closed)) => {
            tracing::debug!("client left during its ClientHello");
            return None;
        }
        Err(_) => {
            tracing::debug!("TLS ClientHello timed out");
            return None;
        }
    };
    match hello {
        Some(mut hello) => {
            tunnel.client_resumes = hello.pre_shared_key();
            if tunnel.authority.host.parse::<std::net::IpAddr>().is_ok() {
                hello.presume_sni_for_names();
            }
            tunnel.client = ClientConnection::tls(*hello, &frontend.mitm.hellos);
        }
        None => unread_hello(frontend),
    }
    let (tls, tunnel) = accept_tls(frontend, io, deadline, *tunnel).await?;
    Some(Opened::Tls(tls, tunnel))
}

/// How often a refusal of one cause is warned of, at most.
const WARN_EVERY_MS: u64 = 10 * 60 * 1000;

/// How a refusal warned of says that the others of its cause are not.
pub(super) const SAID_SELDOM: &str = "warned of at most every 10 minutes; each is logged at \
     debug and counted in pinproxy_requests_total{outcome=\"tunnel-refused\"}";

/// Counts a tunnel refused for what its client sent (`tunnel-refused`);
/// answers whether to warn of it: the first refusal of the cause
/// `last_warned` stands for (when it was last warned of, 0: never), and
/// then one every [`WARN_EVERY_MS`] at most (the others are logged at
/// debug). A client repeating one would otherwise write a warning per
/// connection.
pub(super) fn refused_tunnel(frontend: &Frontend, last_warned: &AtomicU64) -> bool {
    frontend
        .pipeline
        .load()
        .metrics
        .request(crate::metrics::TUNNEL_REFUSED);
    // 1 ms on: 0 means never warned.
    let now = crate::clock::Clock::system().elapsed_ms().saturating_add(1);
    let last = last_warned.load(std::sync::atomic::Ordering::Relaxed);
    (last == 0 || now.saturating_sub(last) >= WARN_EVERY_MS)
        && last_warned
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
}

/// A client whose ClientHello pinproxy could not read: if rustls takes it,
/// its tunnel can only present pinproxy's own TLS fingerprint upstream,
/// the same for every such client. Counted (`fingerprint_gaps` of kind
/// `unread-hello`) and warned of once, so that it is never silent.
fn unread_hello(frontend: &Frontend) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    frontend
        .pipeline
        .load()
        .metrics
        .fingerprint_gaps
        .get_or_create(&crate::metrics::GapLabel {
            kind: "unread-hello",
        })
        .inc();
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "a client's TLS ClientHello could not be read (see the debug log for why): if its \
             handshake goes on, its tunnel presents pinproxy's own TLS fingerprint upstream \
             (counted in pinproxy_fingerprint_gaps_total{{kind=\"unread-hello\"}}; warned of once)"
        );
    }
}

/// The client's stream out of hyper's upgrade (with its place among the
/// connection limits), with what hyper read past the CONNECT head put back
/// in front. The listener's head scanner and hyper's boxed stream would
/// otherwise stay wrapped around every read and write of the tunnel, and in
/// its memory, for as long as it lives.
fn client_stream(upgraded: Upgraded) -> Option<Rewind<ClientStream>> {
    match upgraded.downcast::<TokioIo<RequestGuard<ClientStream>>>() {
        Ok(parts) => {
            let stream = parts.io.into_inner().into_inner()?;
            Some(Rewind::new(parts.read_buf, stream))
        }
        Err(_) => {
            // Only the listener opens tunnels, always over this type.
            tracing::error!("a tunnel's stream is not the listener's (a bug); closing it");
            None
        }
    }
}

/// Waits, at most `timeout` and never past shutdown, for the client's first
/// byte on `io`, and returns the stream with that byte put back in front.
/// Reading one byte lets a tunnel wait without any buffer of its own. The
/// read goes through `room` (see [`QueueRoom`]).
async fn first_byte<T>(
    frontend: &Frontend,
    mut io: T,
    timeout: std::time::Duration,
    mut room: QueueRoom,
) -> Option<Rewind<T>>
where
    T: AsyncRead + Unpin,
{
    let mut byte = [0u8; 1];
    let read = tokio::select! {
        read = tokio::time::timeout(timeout, room.read(&mut io, &mut byte)) => read,
        () = frontend.shutdown.cancelled() => return None,
    };
    match read {
        Ok(Ok(1)) => Some(Rewind::new(Bytes::copy_from_slice(&byte), io)),
        Ok(Ok(_)) => {
            tracing::debug!("client closed the tunnel without sending anything");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "tunnel read failed");
            None
        }
        Err(_) => {
            tracing::debug!("client sent nothing in the tunnel in time");
            None
        }
    }
}

/// Terminates TLS on `io` with the leaf for the client's SNI (or the
/// tunnel's host), by `deadline` (`timeouts.tls_handshake`); records in
/// `tunnel` whether the client offered h2, and returns it shared, as its
/// requests will hold it.
///
/// The tunnel is shared here rather than at its first request: made then,
/// amid the request's short-lived buffers, its allocation would keep a page
/// of them from being returned once the connection idles.
async fn accept_tls<T>(
    frontend: &Frontend,
    io: T,
    deadline: tokio::time::Instant,
    mut tunnel: Tunnel,
) -> Option<(Box<TlsStream<T>>, Arc<Tunnel>)>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout_at(deadline, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no valid TLS ClientHello in the tunnel");
            return None;
        }
        Err(_) => {
            tracing::debug!("TLS ClientHello timed out");
            return None;
        }
    };
    let hello = start.client_hello();
    // Interception was decided on the CONNECT host; a hello naming a host
    // `mitm.exclude` keeps out (or a non-empty `mitm.include` leaves out)
    // is not opened: pinproxy would mint a leaf for a host it was told to
    // pass through, and read it. Its passed-through tunnels judge the
    // hello the other way round (`passthrough`).
    if let Some(sni) = hello.server_name() {
        if !frontend.mitm.policy.intercepts(sni) {
            static WARNED: AtomicU64 = AtomicU64::new(0);
            const WHY: &str = "refused a tunnel whose TLS names a host the mitm policy passes through, though its CONNECT named one it intercepts; CONNECT the host the TLS names";
            if refused_tunnel(frontend, &WARNED) {
                tracing::warn!(connect = %tunnel.authority, sni, "{WHY} ({SAID_SELDOM})");
            } else {
                tracing::debug!(connect = %tunnel.authority, sni, "{WHY}");
            }
            return None;
        }
    }
    // The leaf names what the client will verify: its SNI, or the CONNECT
    // host when it sent none (IP literals).
    let name = match hello.server_name() {
        Some(sni) => LeafName::from_host(sni),
        None => LeafName::from_host(&tunnel.authority.host),
    };
    // The origin will be offered what the client offered pinproxy.
    tunnel.client_offers_h2 = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == b"h2"));
    let config = match frontend.mitm.certs.server_config(name.clone()).await {
        Ok(config) => config,
        // The CONNECT host was within the CA's name constraints (else the
        // CONNECT was refused), its TLS names one outside: the client's
        // doing, not pinproxy's.
        Err(e) if matches!(*e, MintError::OutsideConstraints { .. }) => {
            static WARNED: AtomicU64 = AtomicU64::new(0);
            if refused_tunnel(frontend, &WARNED) {
                tracing::warn!(connect = %tunnel.authority, error = %e, "refused a tunnel whose TLS names a host outside the CA's name constraints ({SAID_SELDOM})");
            } else {
                tracing::debug!(connect = %tunnel.authority, error = %e, "refused a tunnel whose TLS names a host outside the CA's name constraints");
            }
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serve TLS for this host");
            return None;
        }
    };
    match tokio::time::timeout_at(deadline, start.into_stream(config)).await {
        Ok(Ok(tls)) => {
            if speaks_h2(&tls) {
                // The preface is this connection's own: not for the record
                // that connections with an equal hello share.
                tunnel.client = Arc::new(tunnel.client.for_h2());
            }
            // Boxed once here, so that the later stages move a pointer
            // rather than copying the stream's state into each of their
            // futures.
            Some((Box::new(tls), Arc::new(tunnel)))
        }
        Ok(Err(e)) => {
            log_handshake_failure(&name, &e);
            None
        }
        Err(_) => {
            tracing::debug!(host = %name, "TLS handshake timed out");
            None
        }
    }
}

/// Whether the client chose HTTP/2 by ALPN.
fn speaks_h2<T>(tls: &TlsStream<T>) -> bool {
    tls.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// The pipeline as a hyper service for requests in `tunnel`.
fn tunnel_service(
    frontend: Arc<Frontend>,
    tunnel: Arc<Tunnel>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<crate::body::Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<crate::body::Body>, Infallible>> + Send,
> + Clone {
    service_fn(move |request: Request<Incoming>| {
        let frontend = frontend.clone();
        let tunnel = tunnel.clone();
        // Boxed whole, request included. hyper keeps room for one service
        // future per connection even while it is idle, so that room should be
        // a pointer, not the pipeline's state. And the layers around this
        // service (`limits::rated`, `framing::guarded`) each hold the future
        // they wrap twice (before and while awaiting it): a pointer doubles
        // to 16 bytes, where an unboxed future holding the request grew to
        // 1.3 KB kept per connection and copied on every request.
        super::boxed_in_place(move || async move {
            let pipeline = frontend.pipeline.load_full();
            Ok::<_, Infallible>(pipeline.handle(Some(&tunnel), request).await)
        })
    })
}

/// Serves HTTP/1.1 on the tunnel's stream. An idle connection parks (see
/// `framing`): its hyper connection ends without closing the stream, the
/// stream waits for the client's next byte with no buffer of its own, and a
/// new hyper connection serves what follows.
async fn serve_http1<T>(
    frontend: Arc<Frontend>,
    mut io: Rewind<T>,
    tunnel: Arc<Tunnel>,
    client: IpAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Kept to empty the tunnel's cookie memo when the connection parks.
    let memo_of = Arc::clone(&tunnel);
    // A rate token per request.
    let service = limits::rated(
        frontend.clients.clone(),
        client,
        tunnel_service(frontend.clone(), tunnel),
    );
    // The loop's locals are scoped or moved before the idle wait: whatever
    // is still in scope across it takes room in every parked tunnel.
    loop {
        let stream = {
            // Heads checked before hyper reads them.
            let (back, mut parked) = oneshot::channel();
            let (guarded_io, verdicts) = framing::guard(&frontend, io);
            let guarded_io = guarded_io.parking(Park {
                after: PARK_AFTER,
                back,
            });
            let conn = frontend
                .http1()
                .serve_connection(
                    TokioIo::new(guarded_io),
                    framing::guarded(verdicts, service.clone()),
                )
                .with_upgrades();
            // Boxed: the connection's state is only needed while it runs, and
            // this future is what a parked tunnel keeps.
            let result = super::boxed_in_place(|| {
                drive(conn, &frontend.shutdown, |c| c.graceful_shutdown())
            })
            .await;
            // The stream comes back only from a connection that parked, and
            // then as hyper drops the connection (at the end of `drive`).
            match (result, parked.try_recv()) {
                (Ok(()), Ok(stream)) => stream,
                (result, _) => return log_connection_end(result),
            }
        };
        frontend
            .pipeline
            .load()
            .metrics
            .client_connections_parked
            .inc();
        // A parked tunnel keeps no copy of its last `Cookie` fields.
        memo_of.cookie_memo.forget();
        let (unread, stream) = stream.into_parts();
        if !unread.is_empty() {
            io = Rewind::new(unread, stream);
            continue;
        }
        drop(unread);
        // hyper's idle limit counted from the start of the idle wait.
        let idle_left = frontend.settings.client_idle.saturating_sub(PARK_AFTER);
        io = match first_byte(&frontend, stream, idle_left, QueueRoom::none()).await {
            Some(io) => io,
            None => return,
        };
    }
}

async fn serve_h2<T>(frontend: Arc<Frontend>, io: T, tunnel: Arc<Tunnel>, client: IpAddr)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // HTTP/2 frames its messages itself (and hyper refuses what RFC 9113
    // forbids: connection-specific headers, false content-lengths); the
    // rate limit and the idle limit apply here.
    let activity = h2_idle::Activity::default();
    let service = tunnel_service(frontend.clone(), tunnel);
    let service = limits::rated(frontend.clients.clone(), client, service);
    let service = h2_idle::counted(activity.clone(), service);
    let header_limit = u32::try_from(frontend.settings.max_header_bytes).unwrap_or(u32::MAX);
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // What each stream's answer may hold in pinproxy while its client
        // does not read (hyper's default, 400 KiB, is 100 MiB over 256
        // streams; this is 16 MiB): the origin's bytes wait in its window.
        .max_send_buf_size(SEND_BUFFER_PER_STREAM)
        // Four times the limit, as for HTTP/1.1: the pipeline answers 431
        // with an explanation below that.
        .max_header_list_size(header_limit.saturating_mul(4))
        // No `Date` added to an answer whose origin sent none.
        .auto_date_header(false)
        // No WebSockets over HTTP/2 (RFC 8441, `SETTINGS_ENABLE_CONNECT_
        // PROTOCOL`): towards the origin a WebSocket is an HTTP/1.1
        // upgrade, and one rebuilt from a browser's extended CONNECT is no
        // browser's (its names in lower case, its own headers last). Not
        // offered it, a browser opens an HTTP/1.1 upgrade of its own, which
        // leaves as it wrote it.
        .serve_connection(TokioIo::new(io), service);
    let result = h2_idle::drive(
        conn,
        &frontend.shutdown,
        &activity,
        frontend.settings.client_idle,
        |c| c.graceful_shutdown(),
    )
    .await;
    log_connection_end(result);
}

/// A client that rejects pinproxy's certificate has not trusted the CA: say
/// so plainly, since that is the one thing the user must fix.
fn log_handshake_failure(host: &LeafName, error: &std::io::Error) {
    use rustls::AlertDescription as Alert;
    let rejected_cert = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(
                    Alert::UnknownCA | Alert::BadCertificate | Alert::CertificateUnknown
                )
            )
        });
    if rejected_cert {
        tracing::warn!(
            %host,
            "the client rejected pinproxy's certificate: install the CA from `pinproxy ca` in the client"
        );
    } else {
        tracing::debug!(%host, error = %error, "TLS handshake with the client failed");
    }
}
