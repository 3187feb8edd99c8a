//! The per-request spine. Every request, plain or from inside a MITM tunnel,
//! goes through [`Pipeline::handle`], which calls the stages in order:
//!
//! 1. [`Target::of`]: which origin the request is for;
//! 2. limits: the header section must fit `limits.max_header_bytes`;
//! 3. credentials: the tracked cookies ([`cookies::tracked_in_request`]) and
//!    the session key ([`session_key::of_request`]), as pin keys;
//! 4. [`Affinity::route`]: the identity, exit and lane (existing, new, or
//!    rotation for cookie-less traffic), with the credentials to strip;
//! 5. fingerprint: compared with the identity's, by policy;
//! 6. [`egress::sanitize_request`]: what may leave;
//! 7. [`ExitClient::send`](crate::upstream::ExitClient::send): through the
//!    exit, on the lane (a new tunnel's egress address is checked first);
//! 8. [`capture`]: Set-Cookie → pins, use recorded, invalidations judged,
//!    all before the response is released;
//! 9. [`egress::sanitize_response`]: hop-by-hop headers off, then respond.
//!
//! A stage that fails ends the request with its [`ProxyError`] answer; no
//! stage after it runs, so nothing is sent through an exit unless stages
//! 1-6 all agreed.

use std::sync::Arc;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use tracing::Instrument as _;

use crate::affinity::{Affinity, Reason, Route};
use crate::body::{self, Body};
use crate::capture::{self, invalidation};
use crate::config::Unavailable;
use crate::cookies::{self, CookiePolicy, Credential, PinHasher};
use crate::egress;
use crate::error::{Fault, ProxyError};
use crate::exits::ExitSet;
use crate::fingerprint::{Fingerprint, FingerprintPolicy};
use crate::identity::{Identity, RetireReason};
use crate::metrics::{Metrics, Policy, Rule};
use crate::session_key;
use crate::target::{Target, Tunnel};
use crate::upgrade;
use crate::upstream::connect::{ConnectError, TunnelInfo};
use crate::upstream::UpstreamError;

/// Everything the stages need, shared by all connections.
#[derive(Debug)]
pub struct Pipeline {
    /// Which cookies are tracked.
    pub cookies: CookiePolicy,
    /// How credentials become pin keys.
    pub hasher: PinHasher,
    /// Identities and routing.
    pub affinity: Arc<Affinity>,
    /// The exits.
    pub exits: Arc<ExitSet>,
    /// Largest header section accepted.
    pub max_header_bytes: usize,
    /// What to do when a request's fingerprint differs from its identity's.
    pub fingerprint_policy: FingerprintPolicy,
    /// Origin answers that end an identity.
    pub invalidation: invalidation::Rules,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// What to do while the pin store cannot answer.
    pub on_unavailable: Unavailable,
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
            identity = tracing::field::Empty,
        );
        async {
            match self.forward(tunnel, request).await {
                Ok(response) => {
                    self.metrics.request("forwarded");
                    response
                }
                Err(error) => {
                    self.metrics.request(error.code());
                    match error.fault() {
                        Fault::Client => tracing::debug!(code = error.code(), %error, "refused"),
                        _ => tracing::warn!(code = error.code(), %error, "failed"),
                    }
                    error.to_response()
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The credentials of a request: its session key first, then its
    /// tracked cookies.
    fn credentials<B>(
        &self,
        request: &Request<B>,
        tunnel: Option<&Tunnel>,
    ) -> Result<Vec<Credential>, ProxyError> {
        let tunnel_key = tunnel.and_then(|t| t.session_key.as_deref());
        let key = session_key::of_request(request.headers(), tunnel_key)?;
        let mut credentials: Vec<Credential> = key
            .map(|k| session_key::credential(&self.hasher, &k))
            .into_iter()
            .collect();
        credentials.extend(cookies::tracked_in_request(
            request.headers(),
            &self.cookies,
            &self.hasher,
        )?);
        Ok(credentials)
    }

    async fn forward(
        &self,
        tunnel: Option<&Tunnel>,
        mut request: Request<Incoming>,
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

        let credentials = self.credentials(&request, tunnel)?;
        // A store that cannot answer cannot say where a credential belongs,
        // nor remember what a response sets: fail closed (fail-open lets
        // requests without credentials through).
        let may_pass_without_store =
            self.on_unavailable == Unavailable::FailOpen && credentials.is_empty();
        if !self.affinity.store().available() && !may_pass_without_store {
            return Err(ProxyError::Store(crate::affinity::StoreError(
                "the pin store is unreachable".into(),
            )));
        }
        // A WebSocket upgrade is routed like any request; the client's side
        // of the upgrade is claimed now, before the request is taken apart.
        let upgrade = upgrade::requested(&request);
        let client_upgrade = upgrade.map(|_| hyper::upgrade::on(&mut request));
        let mut route = self
            .affinity
            .route(&self.exits, &credentials, request.headers())
            .await?;
        // What an identity founded by the response's cookies records; a
        // routed identity has its fingerprint already.
        let fingerprint = match route.identity {
            Some(_) => Fingerprint::default(),
            None => Fingerprint::of(request.headers()),
        };
        // Offer the origin what the client offered pinproxy; upgrades need
        // HTTP/1.1.
        route.lane.h2 = tunnel.is_some_and(|t| t.tls && t.client_offers_h2) && upgrade.is_none();
        self.trial_unhealthy_exit(&target);
        span.record("exit", tracing::field::display(route.exit.id()));
        if let Some(identity) = &route.identity {
            span.record("identity", tracing::field::display(identity.id));
        }

        let (mut parts, incoming) = request.into_parts();
        if let Some(identity) = &route.identity {
            self.check_fingerprint(identity, &mut parts.headers)?;
        }
        let strip: Vec<_> = route.strip.iter().map(|c| c.key).collect();
        cookies::strip_from_request(&mut parts.headers, &self.cookies, &self.hasher, &strip);
        egress::sanitize_request(&mut parts.headers);
        let expected_accept = upgrade.and_then(|u| upgrade::prepare_upstream(u, &mut parts));
        // A proxy must replace Host with the absolute-form target's authority
        // (RFC 9112 §3.2.2). Inside a tunnel the client's own Host stands; an
        // HTTP/2 client sends none, and the pool adds one only if the origin
        // turns out to speak HTTP/1.1.
        if tunnel.is_none() {
            parts
                .headers
                .insert(http::header::HOST, target.host_header()?);
        }
        parts.uri = target.upstream_uri()?;
        parts.version = Version::HTTP_11;
        let upstream_request = Request::from_parts(parts, body::streaming(incoming));

        let response = self.send(&route, upstream_request).await?;
        let egress_ip = response
            .extensions()
            .get::<TunnelInfo>()
            .and_then(|t| t.egress_ip);

        let identity = capture::pins_from_response(
            &self.affinity,
            &self.cookies,
            &self.hasher,
            &route,
            &fingerprint,
            response.headers(),
            egress_ip,
        )
        .await?;

        if let (Some(upgrade), Some(client_upgrade)) = (upgrade, client_upgrade) {
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                if let Some(identity) = &identity {
                    if let Err(e) = self.affinity.record_use(identity, true, egress_ip).await {
                        tracing::warn!(error = %e, "could not record the identity's use");
                    }
                }
                return upgrade::bridge(upgrade, client_upgrade, response, expected_accept)
                    .map_err(|e| ProxyError::Upstream {
                        exit: route.exit.id().clone(),
                        error: UpstreamError::Exchange(e),
                    });
            }
        }

        let (mut parts, incoming) = response.into_parts();
        let mut body = body::streaming(incoming);
        if let Some(identity) = &identity {
            if let Err(e) = self
                .affinity
                .record_use(identity, parts.status.is_success(), egress_ip)
                .await
            {
                tracing::warn!(error = %e, "could not record the identity's use");
            }
            body = self.judge_invalidation(identity, &parts, body).await;
        }
        egress::sanitize_response(&mut parts.headers);
        tracing::debug!(status = parts.status.as_u16(), "forwarded");
        Ok(Response::from_parts(parts, body))
    }

    /// Without health probes, an exit that is not healthy is tried now and
    /// then in the background, towards the origin of the request at hand.
    fn trial_unhealthy_exit(&self, target: &Target) {
        let now = self.affinity.clock().now_ms();
        let Some(exit) = self.exits.due_for_trial(now) else {
            return;
        };
        let exit = exit.clone();
        let origin = target.origin.clone();
        let clock = self.affinity.clock().clone();
        tokio::spawn(async move {
            let change = match exit.client.probe(&origin).await {
                Ok(()) => exit.health.success(),
                Err(_) => exit.health.failure(clock.now_ms()),
            };
            if let Some(state) = change {
                tracing::warn!(exit = %exit.id(), ?state, "exit health changed");
            }
        });
    }

    /// Applies the fingerprint policy to a request of `identity`.
    fn check_fingerprint(
        &self,
        identity: &Identity,
        headers: &mut http::HeaderMap,
    ) -> Result<(), ProxyError> {
        let drifted = identity.fingerprint.drifted(headers);
        if drifted.is_empty() {
            return Ok(());
        }
        let policy = self.fingerprint_policy;
        let label = match policy {
            FingerprintPolicy::Warn => "warn",
            FingerprintPolicy::Reject => "reject",
            FingerprintPolicy::Restore => "restore",
        };
        self.metrics
            .fingerprint_drift
            .get_or_create(&Policy { policy: label })
            .inc();
        match policy {
            FingerprintPolicy::Warn => {
                tracing::info!(identity = %identity.id, headers = ?drifted, "fingerprint drift");
                Ok(())
            }
            FingerprintPolicy::Restore => {
                identity.fingerprint.restore(headers);
                Ok(())
            }
            FingerprintPolicy::Reject => Err(ProxyError::FingerprintDrift {
                identity: identity.id,
                exit: identity.exit.clone(),
                headers: drifted,
            }),
        }
    }

    /// Sends through the route's exit, keeping the exit's health and the
    /// identity's standing up to date with what happened.
    async fn send(
        &self,
        route: &Route,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let exit = &route.exit;
        match exit.client.send(&route.lane, request).await {
            Ok(response) => {
                exit.health.success();
                if route.reason == Reason::NewIdentity {
                    tracing::debug!("first request of a new identity forwarded");
                }
                Ok(response)
            }
            Err(error) => Err(self.upstream_failed(route, error).await),
        }
    }

    /// Accounts for a failure to reach the origin through `route`: the
    /// exit's health, and retirement of an identity whose tunnel drifted to
    /// another address. Returns the answer for the client.
    pub(crate) async fn upstream_failed(&self, route: &Route, error: UpstreamError) -> ProxyError {
        let exit = &route.exit;
        if counts_against_exit(&error) {
            self.metrics
                .exit_failures
                .get_or_create(&crate::metrics::ExitLabel {
                    exit: exit.id().to_string(),
                })
                .inc();
            if let Some(state) = exit.health.failure(self.affinity.clock().now_ms()) {
                tracing::warn!(exit = %exit.id(), ?state, "exit health changed");
            }
        }
        let drifted = match (&error, &route.identity) {
            (
                UpstreamError::Connect(ConnectError::ExitIpDrift { expected, observed }),
                Some(identity),
            ) => Some((identity, *expected, *observed)),
            _ => None,
        };
        let Some((identity, expected, observed)) = drifted else {
            return ProxyError::Upstream {
                exit: exit.id().clone(),
                error,
            };
        };
        let reason = RetireReason::ExitIpDrift { expected, observed };
        if let Err(e) = self
            .affinity
            .retire(&self.exits, identity, reason.clone())
            .await
        {
            return ProxyError::Store(e);
        }
        ProxyError::IdentityRetired {
            identity: identity.id,
            exit: identity.exit.clone(),
            reason,
        }
    }

    /// Retires the identity if the answer is an invalidation: now for
    /// status and header rules, as the body streams for body markers.
    async fn judge_invalidation(
        &self,
        identity: &Identity,
        parts: &http::response::Parts,
        body: Body,
    ) -> Body {
        let verdict = self
            .invalidation
            .judge(parts.status, &parts.headers, identity.worked);
        match verdict {
            invalidation::Verdict::Clean => body,
            invalidation::Verdict::Invalidated(rule) => {
                self.metrics
                    .invalidations
                    .get_or_create(&Rule { rule: rule.clone() })
                    .inc();
                let reason = RetireReason::Invalidated { rule };
                if let Err(e) = self.affinity.retire(&self.exits, identity, reason).await {
                    tracing::warn!(error = %e, identity = %identity.id, "could not retire an invalidated identity");
                }
                body
            }
            invalidation::Verdict::ScanBody(rules) => {
                let affinity = self.affinity.clone();
                let exits = self.exits.clone();
                let metrics = self.metrics.clone();
                let identity = identity.clone();
                // The marker's frame is scanned before the client can read
                // it, so the client's next request already sees the retirement.
                let on_match = move |rule: String| {
                    metrics
                        .invalidations
                        .get_or_create(&Rule { rule: rule.clone() })
                        .inc();
                    affinity.retire_soon(exits, identity, RetireReason::Invalidated { rule });
                };
                invalidation::scanning(
                    body,
                    &parts.headers,
                    rules,
                    self.invalidation.scan_limit,
                    on_match,
                )
            }
        }
    }
}

/// Whether a failure is evidence against the exit itself (not the origin).
fn counts_against_exit(error: &UpstreamError) -> bool {
    match error {
        UpstreamError::Connect(c) => {
            c.is_exit_fault() || matches!(c, ConnectError::ExitRefused { status: 407, .. })
        }
        _ => false,
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
