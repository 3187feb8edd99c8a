//! The per-request spine. Every request, plain or from inside a MITM tunnel,
//! goes through [`Pipeline::handle`], which calls the stages in order:
//!
//! 1. [`Target::of`]: which origin the request is for;
//! 2. limits: the header section must fit `limits.max_header_bytes`;
//! 3. [`cookies::tracked_in_request`]: the tracked cookies, as pin keys;
//! 4. [`Affinity::route`]: the exit (pinned, newly pinned, or rotated);
//! 5. [`egress::sanitize_request`]: what may leave;
//! 6. [`ExitClient::send`](crate::upstream::ExitClient::send): through the exit;
//! 7. [`capture::learn_from_response`]: Set-Cookie → pins, before the
//!    response is released;
//! 8. [`egress::sanitize_response`]: hop-by-hop headers off, then respond.
//!
//! A stage that fails ends the request with its [`ProxyError`] answer; no
//! stage after it runs, so nothing is sent through an exit unless stages 1-5
//! all agreed.

use http::{Request, Response, Version};
use hyper::body::Incoming;
use tracing::Instrument as _;

use crate::affinity::{Affinity, Reason};
use crate::body::{self, Body};
use crate::capture;
use crate::cookies::{self, CookiePolicy, PinHasher};
use crate::egress;
use crate::error::ProxyError;
use crate::exits::ExitSet;
use crate::target::{Target, Tunnel};

/// Everything the stages need, shared by all connections.
#[derive(Debug)]
pub struct Pipeline {
    /// Which cookies are tracked.
    pub cookies: CookiePolicy,
    /// How cookie values become pin keys.
    pub hasher: PinHasher,
    /// Pins and routing.
    pub affinity: Affinity,
    /// The exits.
    pub exits: ExitSet,
    /// Largest header section accepted.
    pub max_header_bytes: usize,
}

impl Pipeline {
    /// Handles one request, arriving in `tunnel` or as a plain proxy request.
    /// Never fails: errors become pinproxy's error answers.
    pub async fn handle(
        &self,
        tunnel: Option<&Tunnel>,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            origin = tracing::field::Empty,
            exit = tracing::field::Empty,
        );
        async {
            match self.forward(tunnel, request).await {
                Ok(response) => response,
                Err(error) => {
                    match error.fault() {
                        crate::error::Fault::Client => {
                            tracing::debug!(code = error.code(), %error, "refused")
                        }
                        _ => tracing::warn!(code = error.code(), %error, "failed"),
                    }
                    error.to_response()
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn forward(
        &self,
        tunnel: Option<&Tunnel>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let span = tracing::Span::current();
        let target = Target::of(&request, tunnel)?;
        span.record("origin", tracing::field::display(&target.origin));

        let size = header_section_size(&request);
        if size > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                size,
                limit: self.max_header_bytes,
            });
        }

        let tracked = cookies::tracked_in_request(request.headers(), &self.cookies, &self.hasher)?;
        let route = self.affinity.route(&self.exits, &tracked).await?;
        let exit = route.exit.id();
        span.record("exit", tracing::field::display(exit));
        if route.reason == Reason::NewPin {
            for cookie in &tracked {
                tracing::info!(%cookie, %exit, "pinned on first sight");
            }
        }

        let (mut parts, incoming) = request.into_parts();
        egress::sanitize_request(&mut parts.headers);
        // A proxy must replace Host with the absolute-form target's authority
        // (RFC 9112 §3.2.2); inside a tunnel the client's own Host stands.
        if tunnel.is_none() || !parts.headers.contains_key(http::header::HOST) {
            parts
                .headers
                .insert(http::header::HOST, target.host_header()?);
        }
        parts.uri = target.upstream_uri()?;
        parts.version = Version::HTTP_11;
        let upstream_request = Request::from_parts(parts, body::streaming(incoming));

        let response = route
            .exit
            .client
            .send(upstream_request)
            .await
            .map_err(|error| ProxyError::Upstream {
                exit: exit.clone(),
                error,
            })?;

        capture::learn_from_response(
            &self.affinity,
            &self.cookies,
            &self.hasher,
            exit,
            response.headers(),
        )
        .await?;

        let (mut parts, incoming) = response.into_parts();
        egress::sanitize_response(&mut parts.headers);
        tracing::debug!(status = parts.status.as_u16(), "forwarded");
        Ok(Response::from_parts(parts, body::streaming(incoming)))
    }
}

/// Approximate size of a request's header section as sent on the wire.
pub fn header_section_size<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target_len = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = request.method().as_str().len() + 1 + target_len + " HTTP/1.1\r\n".len();
    line + request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum::<usize>()
}
