//! WebSockets through the pipeline: the upgrade request is pinned and routed
//! like any request, then frames are relayed both ways until either side
//! closes, or until nothing has moved either way for `timeouts.relay_idle`.
//!
//! The client's HTTP/1.1 `Upgrade: websocket` goes to the origin as it
//! wrote it (the upgrade lane never offers h2), and the frames pass through
//! untouched. HTTP/2 clients are not offered WebSockets over HTTP/2 (RFC
//! 8441; see `front::tunnel`): a browser then opens an HTTP/1.1 upgrade of
//! its own, where one rebuilt from its extended CONNECT would be no
//! browser's.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use base64::Engine as _;
use http::{header, HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{egress, Pipeline, ProxyError};
use crate::body::{self, Body};
use crate::fingerprint::RequestFingerprint;
use crate::net::relay::relay;
use crate::net::tasks::ConnectionTasks;
use crate::routing::relays::{until_retired, RelayOwner};
use crate::routing::Route;
use crate::upstream::error::{ExchangeKind, UpstreamError};
use crate::upstream::Answered;
use crate::upstream::Origin;

/// The GUID of RFC 6455 §1.3, appended to the key for the accept value.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Whether a request asks for a WebSocket (HTTP/1.1 `Upgrade: websocket`).
pub fn requested<B>(request: &Request<B>) -> bool {
    // `Upgrade` first: most requests have none, and then `Connection`'s
    // tokens need not be read. Exactly one field naming exactly
    // `websocket`, with the key the answer must prove it read: the relay
    // that follows a `101` carries bytes pinproxy never reads, so no other
    // protocol (`h2c` in a second field, say, whose requests would carry
    // any cookie out unseen) may be switched to under a WebSocket's name.
    let mut upgrades = request.headers().get_all(header::UPGRADE).iter();
    let websocket = upgrades
        .next()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && upgrades.next().is_none()
        && request
            .headers()
            .get_all(header::SEC_WEBSOCKET_KEY)
            .iter()
            .count()
            == 1;
    let connection_upgrade = || {
        request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
    };
    websocket && connection_upgrade()
}

/// The `Sec-WebSocket-Accept` the origin must answer an upgrade with the
/// (sanitised) `headers` with: the one for the client's key, which goes on
/// with its own `Connection` and `Upgrade` headers
/// ([`super::egress::sanitize_upgrade_request`] keeps them).
pub fn expected_accept(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|key| key.to_str().ok())
        .map(|key| accept_for(key.trim()))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_for(key: &str) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha1.digest().bytes())
}

/// The client's side of a WebSocket upgrade, claimed before its request was
/// taken apart.
#[derive(Debug)]
pub struct Socket {
    /// The client's connection, once upgraded.
    pub client: OnUpgrade,
    /// The `Sec-WebSocket-Accept` the origin must answer with (`None`: no
    /// key to answer for, so no `101` is bridged).
    pub expected_accept: Option<String>,
}

impl Pipeline {
    /// Stages 7 to 9 for a WebSocket upgrade: sent on a connection of its
    /// own; pins are captured from the answer as for any request; a `101`
    /// bridges the two connections, anything else is relayed as is.
    pub(crate) async fn forward_upgrade(
        &self,
        route: &Route,
        origin: &Origin,
        request: Request<Body>,
        fingerprint: &RequestFingerprint,
        socket: Socket,
        slot: Option<std::sync::Arc<super::pacing::Slot>>,
    ) -> Result<Response<Body>, ProxyError> {
        let Answered {
            response, tunnel, ..
        } = self.send_upgrade(route, origin, request).await?;
        let egress_ip = tunnel.egress_ip;
        let status = response.status();
        let withheld = |e: ProxyError| e.withheld(route.exit.id(), status);
        let identity = self
            .capture_pins(route, fingerprint, response.headers(), egress_ip, None)
            .await
            .map_err(withheld)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(identity) = &identity {
                self.capture_use(identity, true, egress_ip, Some(&tunnel))
                    .await
                    .map_err(withheld)?;
            }
            let owner = identity.map(|identity| RelayOwner {
                router: self.router.clone(),
                exits: self.live_exits.clone(),
                identity,
            });
            return bridge(socket, response, self.relay_idle, &self.connections, owner)
                .map_err(|error| ProxyError::upstream(&route.exit, error));
        }
        let (mut parts, incoming) = response.into_parts();
        let mut body = body::streaming(incoming);
        if let Some(identity) = &identity {
            self.capture_use(
                identity,
                parts.status.is_success(),
                egress_ip,
                Some(&tunnel),
            )
            .await
            .map_err(withheld)?;
            body = self
                .capture_invalidation_on(identity, None, &parts, body, super::held(&slot))
                .await;
        }
        // An answer that is not a switch is an ordinary response: in
        // flight, for the identity's pacing, until its body ends (a
        // WebSocket, once open, is not).
        let body = egress::response_body(body, &parts);
        egress::sanitize_response(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            super::pacing::Paced::wrap(body, slot),
        ))
    }
}

/// Answers the client for an origin that switched protocols (`101`), and
/// relays the two connections until either closes, until nothing has
/// moved either way for `idle` (zero: no limit), or until `owner`'s
/// identity is retired (it is held in use meanwhile). The relay runs as one of
/// `tasks`, the daemon's client connections, so that the shutdown lets it
/// go on for the grace period as it does a passed-through tunnel. (Any
/// other answer goes back to the client as an ordinary response.)
pub fn bridge(
    socket: Socket,
    mut upstream: Response<Incoming>,
    idle: Duration,
    tasks: &ConnectionTasks,
    owner: Option<RelayOwner>,
) -> Result<Response<Body>, UpstreamError> {
    let Socket {
        client,
        expected_accept,
    } = socket;
    // Only a WebSocket is relayed: an answer that switched to anything
    // else, or that does not prove it read this handshake's key, is not.
    let switched_to = upstream
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if !switched_to.is_some_and(|p| p.trim().eq_ignore_ascii_case("websocket")) {
        return Err(UpstreamError::Exchange {
            kind: ExchangeKind::Upgrade,
            detail: "the origin answered the WebSocket upgrade by switching to another \
                     protocol; only a WebSocket is relayed"
                .into(),
        });
    }
    let accept = upstream
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .and_then(|v| v.to_str().ok());
    if expected_accept.is_none() || accept.map(str::trim) != expected_accept.as_deref() {
        return Err(UpstreamError::Exchange {
            kind: ExchangeKind::Upgrade,
            detail: "the origin answered the WebSocket upgrade with a wrong Sec-WebSocket-Accept"
                .into(),
        });
    }
    let upstream_io = hyper::upgrade::on(&mut upstream);
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = upstream.headers().clone();
    // The client's upgraded stream holds the connection's place among the
    // connection limits for as long as the relay keeps it open.
    tasks.spawn(async move {
        let (client, upstream) = tokio::join!(client, upstream_io);
        match (client, upstream) {
            (Ok(client), Ok(upstream)) => {
                let reads = AtomicU64::new(0);
                relay(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(upstream),
                    Some(idle),
                    &reads,
                    until_retired(owner, &reads, "WebSocket"),
                )
                .await
                .log("WebSocket");
            }
            (client, upstream) => tracing::debug!(
                client_ok = client.is_ok(),
                upstream_ok = upstream.is_ok(),
                "WebSocket upgrade did not complete"
            ),
        }
    });
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        let ws = Request::get("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        assert!(requested(&ws));
        let plain = Request::get("/").header("upgrade", "h2c").body(()).unwrap();
        assert!(!requested(&plain));
        // No key, or a second `Upgrade` field: no WebSocket upgrade.
        let keyless = Request::get("/ws")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!requested(&keyless));
        let two = Request::get("/ws")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("upgrade", "h2c")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        assert!(!requested(&two));
        // An HTTP/2 extended CONNECT is not one: pinproxy never offers it.
        let mut connect = Request::connect("https://a.test/ws").body(()).unwrap();
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(!requested(&connect));
    }
}
