//! The listener: accepts client connections and serves proxy requests.
//!
//! Each client connection speaks HTTP/1.1 to pinproxy. A plain proxy request
//! (`GET http://host/path`) goes straight to the
//! [`Pipeline`](crate::proxy::Pipeline). A `CONNECT` is answered `200` and
//! the tunnel is handed to [`tunnel::serve`], which
//! terminates TLS and feeds every request inside to the same pipeline, or,
//! for hosts excluded from interception, to [`passthrough`].
//! Nothing is dialled upstream while a tunnel opens: the exit is chosen per
//! request, once the request is known.
//!
//! Limits: at most `limits.max_connections` client connections are served
//! at once (more wait in the kernel's queue), tunnels and WebSockets
//! included: each connection's [`ClientStream`] holds its place for as long
//! as it is open, whatever it becomes; header sections get
//! `timeouts.header_read`; oversized ones are refused with 431.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::client_stream::{ClientStream, Place};
use super::{framing, gate, limits, passthrough, tunnel, Frontend};
use crate::body::{self, Body};
use crate::fault;
use crate::net::tasks::Stopping;
use crate::proxy::credentials::session_key;
use crate::proxy::{self, target, ProxyError};

/// Accepts connections until `frontend.shutdown` is cancelled.
pub async fn accept_loop(listener: TcpListener, frontend: Arc<Frontend>) {
    let slots = Arc::new(Semaphore::new(frontend.settings.max_connections));
    let refusals = Arc::new(Semaphore::new(limits::REFUSALS_AT_ONCE));
    loop {
        let permit = tokio::select! {
            () = frontend.shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = frontend.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // At most limits.max_connections_per_client from one address.
        let client = match frontend.clients.connect(peer.ip()) {
            Ok(client) => client,
            Err(throttle) => {
                tracing::debug!(%peer, %throttle, "refused a connection");
                // A refusal holds its socket up to a second (the answer,
                // then the client's close): a flood of them would hold
                // every descriptor the process may open. Past the bound,
                // the connection is closed unanswered.
                if let Ok(turn) = refusals.clone().try_acquire_owned() {
                    frontend
                        .tasks
                        .spawn(limits::refuse_connection(stream, throttle, turn));
                }
                continue;
            }
        };
        let place = Place::new(permit, client);
        frontend.tasks.spawn(
            serve_client(frontend.clone(), stream, peer, place)
                .instrument(tracing::debug_span!("client", %peer)),
        );
    }
    tracing::debug!("stopped accepting");
}

async fn serve_client(frontend: Arc<Frontend>, stream: TcpStream, peer: SocketAddr, place: Place) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    // Given back when the socket is dropped, by this task or by the tunnel
    // or relay the connection becomes.
    let stream = ClientStream::new(stream, place);
    let service_frontend = frontend.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let frontend = service_frontend.clone();
        // Boxed whole, for the same reasons as in tunnels (see
        // `tunnel::tunnel_service`).
        super::boxed_in_place(move || async move {
            Ok::<_, Infallible>(outer_request(frontend, request, peer).await)
        })
    });
    // Every request head is checked before hyper reads it (smuggling), and
    // every request takes a rate token of its client address.
    let (stream, verdicts) = framing::guard(&frontend, stream);
    let service = limits::rated(frontend.clients.clone(), peer.ip(), service);
    let service = framing::guarded(verdicts, service);
    let conn = frontend
        .http1()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let result = drive(conn, &frontend.shutdown, |c| c.graceful_shutdown()).await;
    log_connection_end(result);
}

/// Handles a request on a client connection: CONNECT opens a tunnel (on the
/// connection's own stream, which hyper hands over), anything else is a
/// plain proxy request for the pipeline.
async fn outer_request(
    frontend: Arc<Frontend>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let pipeline = frontend.pipeline.load_full();
    // Stage 0: who the client is (407 without valid credentials).
    let principal = match gate::admit(&pipeline, &request, peer).await {
        Ok(principal) => principal,
        Err(error) => return error.to_response(),
    };
    if request.method() != Method::CONNECT {
        // Without authentication there is nothing to carry (the pipeline's
        // default is the same), and no extension map to allocate.
        if principal.user.is_some() || principal.exits.exits().is_some() {
            request.extensions_mut().insert(principal);
        }
        return pipeline.handle(None, request).await;
    }
    let size = proxy::header_section_size(&request);
    if size > frontend.settings.max_header_bytes {
        return ProxyError::HeadersTooLarge {
            size,
            limit: frontend.settings.max_header_bytes,
        }
        .to_response();
    }
    let authority = match target::connect_authority(request.uri()) {
        Ok(authority) => authority,
        Err(error) => return error.to_response(),
    };
    // A session key named on the CONNECT (`X-Pinproxy-Session`, which
    // wins, or `Proxy-Authorization`) holds for every request inside, and
    // is all that keeps a passed-through tunnel on its identity's exit.
    let session_key = match session_key::of_request(request.headers()) {
        Ok(key) => key,
        Err(error) => return ProxyError::from(error).to_response(),
    };
    let intercepted = frontend.mitm.policy.intercepts(&authority.host);
    if let Err(error) = gate::connect_target(&frontend, &pipeline, &authority, intercepted) {
        return error.to_response();
    }
    if !intercepted {
        let span = tracing::debug_span!("passthrough", %peer, target = %authority);
        return passthrough::connect(frontend, request, authority, session_key, principal)
            .instrument(span)
            .await;
    }
    let span = tracing::debug_span!("tunnel", %peer, target = %authority);
    let tunnel_frontend = frontend.clone();
    // Only the upgrade handle goes into the task, not the whole request: an
    // idle tunnel's task should hold what the tunnel needs and no more.
    let upgrade = hyper::upgrade::on(&mut request);
    // Boxed: the task keeps room for what it is handed for its whole life.
    let tunnel = Box::new(target::Tunnel {
        authority,
        tls: false,
        // The key's credential, made once: every request inside that names
        // no key of its own carries it (the tunnel's user is its
        // requests' user, and the process has one hasher).
        session_key: session_key
            .map(|key| session_key::credential(&pipeline.hasher, principal.user.as_deref(), &key)),
        client_offers_h2: false,
        client_resumes: false,
        client: Arc::default(),
        principal,
        site: Default::default(),
        cookie_memo: Default::default(),
    });
    frontend
        .tasks
        .spawn(tunnel::serve(tunnel_frontend, upgrade, tunnel, peer.ip()).instrument(span));
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    response
}

/// Drives a server connection to its end; when shutdown is requested it
/// stops taking new requests and lets in-flight ones finish.
pub(crate) async fn drive<C>(
    conn: C,
    shutdown: &CancellationToken,
    drain: impl FnOnce(Pin<&mut C>),
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        // Polled with every poll of the connection: the lock-free wait.
        () = Stopping::new(shutdown.clone()) => {
            drain(conn.as_mut());
            conn.await
        }
    }
}

/// Logs why a client connection ended. Clients come and go, and a client's
/// malformed request is the client's problem: debug level.
pub(crate) fn log_connection_end(result: hyper::Result<()>) {
    if let Err(e) = result {
        if fault::is_benign_disconnect(&e) {
            tracing::debug!(error = %fault::causes(&e), "client disconnected");
        } else if e.is_parse() || e.is_timeout() {
            tracing::debug!(error = %fault::causes(&e), "client sent a bad or slow request");
        } else {
            tracing::debug!(error = %fault::causes(&e), "client connection failed");
        }
    }
}
