//! The front door's checks before a request is served or a tunnel opened:
//! client authentication (stage 0, [`crate::proxy::auth`]), then, for a
//! CONNECT, that the target is not pinproxy itself and that the CA may
//! sign for it when it is to be intercepted. Each refusal is a
//! [`ProxyError`] answer and is counted like any other.

use std::net::SocketAddr;

use http::Request;

use super::Frontend;
use crate::mitm::leaf::LeafName;
use crate::net::HostPort;
use crate::proxy::target::{self, Principal};
use crate::proxy::{Pipeline, ProxyError};

/// Stage 0 for a plain request or a CONNECT from `peer`: who the client is,
/// or the `407` to answer.
pub async fn admit<B>(
    pipeline: &Pipeline,
    request: &Request<B>,
    peer: SocketAddr,
) -> Result<Principal, ProxyError> {
    pipeline
        .auth
        .admit(request.headers(), peer)
        .await
        .inspect_err(|error| pipeline.metrics.request(error.code()))
}

/// Whether a CONNECT to `authority` may open: never to pinproxy's own
/// listeners, and, when the tunnel is to be intercepted, only to a host the
/// CA's name constraints permit (clients would reject the leaf; refusing
/// says why instead of a failed handshake).
pub fn connect_target(
    frontend: &Frontend,
    pipeline: &Pipeline,
    authority: &HostPort,
    intercepted: bool,
) -> Result<(), ProxyError> {
    let refused = target::refuse_own(authority, &pipeline.guard).and_then(|()| {
        let ca = frontend.mitm.certs.ca();
        if !intercepted || ca.permits(&LeafName::from_host(&authority.host)) {
            return Ok(());
        }
        Err(ProxyError::OutsideCa {
            host: authority.host.to_string(),
            permitted: ca.permitted_domains().unwrap_or_default().join(", "),
        })
    });
    refused.inspect_err(|error| {
        pipeline.metrics.request(error.code());
        tracing::info!(target = %authority, code = error.code(), %error, "CONNECT refused");
    })
}
