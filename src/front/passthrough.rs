//! Tunnels pinproxy does not open: hosts excluded from interception
//! (`mitm.exclude`, or not in a non-empty `mitm.include`) are tunnelled raw.
//! They go through the pipeline's own stages (credentials, route, send,
//! capture), so the store policy and routing are the same as for any
//! request; only the tunnel replaces the request.
//!
//! The CONNECT goes through the exit of the client's session key when it
//! named one (a new key founds an identity, as a request would), else
//! through the next exit in rotation, and the tunnel stays on it for its
//! whole life. pinproxy cannot see cookies inside such a tunnel: only the
//! session key keeps it coherent with the client's other traffic. A tunnel
//! that carries nothing either way for `timeouts.relay_idle` is closed.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::Frontend;
use crate::body::{self, Body};
use crate::fingerprint::Fingerprint;
use crate::net::relay::relay;
use crate::net::HostPort;
use crate::proxy::target::Principal;
use crate::proxy::{credentials, ProxyError};

/// Answers a CONNECT to a passed-through host: opens the tunnel through the
/// exit first (so a failure can still be answered with a 502), then `200`,
/// then relays bytes until either side closes.
pub async fn connect(
    frontend: Arc<Frontend>,
    request: Request<Incoming>,
    authority: HostPort,
    session_key: Option<String>,
    principal: Principal,
) -> Response<Body> {
    match open(&frontend, request, &authority, session_key, principal).await {
        Ok(response) => response,
        Err(error) => {
            frontend.pipeline.load().metrics.request(error.code());
            tracing::warn!(target = %authority, code = error.code(), %error, "passthrough failed");
            error.to_response()
        }
    }
}

async fn open(
    frontend: &Arc<Frontend>,
    request: Request<Incoming>,
    authority: &HostPort,
    session_key: Option<String>,
    principal: Principal,
) -> Result<Response<Body>, ProxyError> {
    let pipeline = frontend.pipeline.load_full();
    // Stage 3: only the session key can be read.
    let credentials = credentials::of_connect(
        session_key.as_deref(),
        principal.user.as_deref(),
        &pipeline.hasher,
    );
    // Stage 4. A CONNECT carries the client's User-Agent (browsers and curl
    // send it): the best fingerprint there is for an identity founded here,
    // so its headers go to the router.
    let route = pipeline
        .route(&principal.exits, &credentials, || {
            Fingerprint::of(request.headers())
        })
        .await?;
    // Stage 7: the tunnel itself.
    let (upstream, egress_ip) = match route.exit.client.raw_tunnel(&route.lane, authority).await {
        Ok(opened) => opened,
        Err(error) => return Err(pipeline.upstream_failed(&route, error).await),
    };
    route.exit.health.success();
    // Stage 8: nothing to read but the tunnel's use.
    if let Some(identity) = &route.identity {
        pipeline
            .capture_use(identity, true, egress_ip, None)
            .await?;
    }
    tracing::debug!(target = %authority, exit = %route.exit.id(), "passthrough tunnel open");
    pipeline.metrics.request("passthrough");
    // The tunnel is the client connection from here on: the upgraded
    // stream holds its place among the connection limits.
    let idle = Some(pipeline.relay_idle);
    frontend.tasks.spawn(async move {
        let client = match hyper::upgrade::on(request).await {
            Ok(client) => client,
            Err(e) => return tracing::debug!(error = %e, "client left before the tunnel opened"),
        };
        let mut upstream = upstream;
        relay(&mut TokioIo::new(client), &mut upstream, idle)
            .await
            .log("passthrough tunnel");
    });
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}
