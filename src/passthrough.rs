//! Tunnels pinproxy does not open: hosts excluded from interception
//! (`mitm.exclude`, or not in a non-empty `mitm.include`) are tunnelled raw.
//!
//! The CONNECT goes through the exit of the client's session key when it
//! named one (a new key founds an identity, as a request would), else
//! through the next exit in rotation, and the tunnel stays on it for its
//! whole life. pinproxy cannot see cookies inside such a tunnel: only the
//! session key keeps it coherent with the client's other traffic.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::exits::HostPort;
use crate::listener::Frontend;
use crate::session_key;

/// Answers a CONNECT to a passed-through host: opens the tunnel through the
/// exit first (so a failure can still be answered with a 502), then `200`,
/// then relays bytes until either side closes.
pub async fn connect(
    frontend: Arc<Frontend>,
    request: Request<Incoming>,
    authority: HostPort,
    session_key: Option<String>,
) -> Response<Body> {
    match open(&frontend, request, &authority, session_key).await {
        Ok(response) => response,
        Err(error) => {
            frontend.pipeline.metrics.request(error.code());
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
) -> Result<Response<Body>, ProxyError> {
    let pipeline = &frontend.pipeline;
    let credentials: Vec<_> = session_key
        .map(|key| session_key::credential(&pipeline.hasher, &key))
        .into_iter()
        .collect();
    if !credentials.is_empty() && !pipeline.affinity.store().available() {
        return Err(ProxyError::Store(crate::affinity::StoreError(
            "the pin store is unreachable".into(),
        )));
    }
    // A CONNECT carries the client's User-Agent (browsers and curl send it):
    // the best fingerprint there is for an identity founded here, so its
    // headers go to the router.
    let route = pipeline
        .affinity
        .route(&pipeline.exits, &credentials, request.headers())
        .await?;
    let (upstream, egress_ip) = match route.exit.client.raw_tunnel(&route.lane, authority).await {
        Ok(opened) => opened,
        Err(error) => return Err(pipeline.upstream_failed(&route, error).await),
    };
    route.exit.health.success();
    if let Some(identity) = &route.identity {
        if let Err(e) = pipeline
            .affinity
            .record_use(identity, true, egress_ip)
            .await
        {
            tracing::warn!(error = %e, "could not record the identity's use");
        }
    }
    tracing::debug!(target = %authority, exit = %route.exit.id(), "passthrough tunnel open");
    pipeline.metrics.request("passthrough");
    frontend.tasks.spawn(async move {
        let client = match hyper::upgrade::on(request).await {
            Ok(client) => client,
            Err(e) => return tracing::debug!(error = %e, "client left before the tunnel opened"),
        };
        let mut upstream = upstream;
        match tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut upstream).await {
            Ok((up, down)) => tracing::debug!(up, down, "passthrough tunnel closed"),
            Err(e) => tracing::debug!(error = %e, "passthrough tunnel ended"),
        }
    });
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}
