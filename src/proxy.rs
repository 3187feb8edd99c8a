//! The per-request spine. Every request, plain or from inside a MITM
//! tunnel, goes through [`Pipeline::handle`], which calls the stages in
//! order (each stage's module says what it may change and what happens on
//! error):
//!
//! 0. [`auth`]: who the client is and which exits it may use (run by the
//!    front door on every plain request and CONNECT; `407` without valid
//!    credentials when users are configured);
//! 1. [`target`]: which origin the request is for (pinproxy's own listen
//!    and admin addresses refused: a loop);
//! 2. limits: the header section must fit `limits.max_header_bytes`;
//! 3. [`credentials`]: the tracked cookies and the session key, as pin keys;
//! 4. route ([`crate::routing`]): the identity, exit and lane (existing,
//!    new, or rotation for cookie-less traffic), with the credentials to
//!    strip; nothing is routed while the pin store cannot answer;
//! 5. [`fingerprint`]: compared with the identity's, by policy;
//!    5b. [`pacing`]: the identity's in-flight requests and their spacing
//!    (waits, bounded, or 429);
//! 6. [`egress`]: what may leave (forwarding, hop-by-hop and pinproxy's
//!    own headers removed);
//! 7. [`send`]: through the exit, on the lane (a new tunnel's egress
//!    address is checked first);
//! 8. [`capture`]: Set-Cookie → pins, use recorded, invalidations judged,
//!    all before the response is released;
//! 9. respond: the origin's hop-by-hop headers off, then the answer;
//!    [`access`] counts it (by exit, site, status class, pin decision) and
//!    writes its access line, answered or refused alike.
//!
//! A stage that fails ends the request with its [`ProxyError`] answer; no
//! stage after it runs, so nothing is sent through an exit unless stages
//! 1-6 all agreed. Passthrough tunnels ([`crate::front::passthrough`]) run
//! stages 3, 4, 7 and 8 through the same functions.

pub mod access;
pub mod auth;
pub mod capture;
pub mod credentials;
pub mod egress;
pub mod error;
pub mod fingerprint;
pub mod pacing;
pub mod send;
pub mod target;
pub mod upgrade;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::body::{self, Body};
use crate::credential::{Credential, PinHasher};
use crate::exits::scope::ExitScope;
use crate::exits::ExitSet;
use crate::fault::{Blame as _, Fault};
use crate::fingerprint::{Fingerprint, FingerprintPolicy, RequestFingerprint};
use crate::metrics::Metrics;
use crate::net::tasks::ConnectionTasks;
use crate::routing::{Reread, Route, Router};
use crate::store::Unavailable;
use crate::upstream::dial::guard::AddressGuard;
use crate::upstream::Answered;
use access::{Access, Decision};
use capture::invalidation;
use credentials::cookies::{self, CookiePolicy};
use target::{Principal, Target, Tunnel};

pub use error::ProxyError;

/// Everything the stages need, shared by all connections.
#[derive(Debug)]
pub struct Pipeline {
    /// Which cookies are tracked.
    pub cookies: CookiePolicy,
    /// How credentials become pin keys.
    pub hasher: PinHasher,
    /// Identities and routing.
    pub router: Arc<Router>,
    /// The exits.
    pub exits: Arc<ExitSet>,
    /// Largest header section accepted.
    pub max_header_bytes: usize,
    /// Most header fields accepted (hyper's HTTP/1.1 server enforces it
    /// itself; an HTTP/2 request is held to it here).
    pub max_headers: usize,
    /// What to do when a request's fingerprint differs from its identity's.
    pub fingerprint_policy: FingerprintPolicy,
    /// Origin answers that end an identity.
    pub invalidation: invalidation::Rules,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// What to do while the pin store cannot answer.
    pub on_unavailable: Unavailable,
    /// Background work started by requests (exit trials), awaited at
    /// shutdown.
    pub tasks: TaskTracker,
    /// Client connections, and the WebSocket relays that outlive their
    /// upgrade requests: what the shutdown's grace period waits for.
    pub connections: ConnectionTasks,
    /// Whether the chrome-mode User-Agent warning was logged.
    pub warned_chrome_user_agent: AtomicBool,
    /// Client authentication (stage 0).
    pub auth: Arc<auth::Auth>,
    /// Addresses never connected to: pinproxy's own listeners (stage 1)
    /// and, for the direct exit, `upstream.deny_ranges`.
    pub guard: Arc<AddressGuard>,
    /// Every identity's in-flight count and pacing (stage 5b); shared by
    /// the pipelines of successive reloads.
    pub pacer: Arc<pacing::Pacer>,
    /// How identities are paced (`identities.max_in_flight` and friends).
    pub pacing: pacing::PacingSettings,
    /// How long a passed-through tunnel or a WebSocket may carry nothing
    /// before it is closed (`timeouts.relay_idle`; zero: never).
    pub relay_idle: Duration,
    /// The exits in force now, a later reload's where there was one: what
    /// outlives this pipeline (a WebSocket's or a tunnel's relay) judges
    /// its identity by them.
    pub live_exits: Arc<crate::exits::LiveExits>,
}

/// A request's [`Access`] until its answer's head is ready. hyper drops a
/// request's future when its client leaves (a closed connection, a reset
/// stream): such a request is counted and logged as
/// [`crate::metrics::CLIENT_GONE`] as it is dropped. (So is one still
/// unanswered when a shutdown's grace period ends: pinproxy lets go of
/// it as a client would. One whose handling panicked is not: that is no
/// client's doing, and the panic is logged.)
struct OpenAccess<'a> {
    access: Access,
    metrics: &'a Metrics,
    finished: bool,
}

impl OpenAccess<'_> {
    fn finish(&mut self, answer: Result<http::StatusCode, &ProxyError>) {
        self.finished = true;
        self.access.finish(self.metrics, answer);
    }
}

impl Drop for OpenAccess<'_> {
    fn drop(&mut self) {
        if !self.finished && !std::thread::panicking() {
            self.access.client_gone(self.metrics);
        }
    }
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
        let mut open = OpenAccess {
            access: Access::start(request.method()),
            metrics: &self.metrics,
            finished: false,
        };
        async {
            match self.forward(tunnel, request, &mut open.access).await {
                Ok(response) => {
                    self.metrics.forwarded();
                    open.finish(Ok(response.status()));
                    response
                }
                Err(error) => {
                    self.metrics.request(error.code());
                    match error.fault() {
                        Fault::Client => tracing::debug!(code = error.code(), %error, "refused"),
                        _ => tracing::warn!(code = error.code(), %error, "failed"),
                    }
                    let response = error.to_response_for(&open.access.credentials);
                    open.finish(Err(&error));
                    response
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The spine: stages 1 to 9 in order; `access` learns what each did
    /// (counted and logged once the answer is ready, see [`access`]).
    async fn forward(
        &self,
        tunnel: Option<&Tunnel>,
        mut request: Request<Incoming>,
        access: &mut Access,
    ) -> Result<Response<Body>, ProxyError> {
        let span = tracing::Span::current();
        // 0. who: admitted by the front door with the request (plain) or
        // with its tunnel's CONNECT.
        let principal = match tunnel {
            Some(tunnel) => self.auth.confirm(&tunnel.principal)?,
            None => request
                .extensions()
                .get::<Principal>()
                .cloned()
                .unwrap_or_default(),
        };
        // 1. target
        let target = Target::of(&request, tunnel)?;
        span.record("origin", tracing::field::display(&target.origin));
        access.site = Some(match tunnel {
            Some(tunnel) => self.metrics.site_in(&tunnel.site, &target.origin.host),
            None => self.metrics.site(&target.origin.host),
        });
        if access.logging() {
            access.origin = Some(target.origin.clone());
        }
        // A tunnel's target was checked when its CONNECT arrived.
        if tunnel.is_none() {
            target::refuse_own(&target.origin, &self.guard)?;
        }

        // 2. limits
        let size = header_section_size(&request);
        if size > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                size,
                limit: self.max_header_bytes,
            });
        }
        // A browser sends each cookie as a field of its own over HTTP/2
        // (crumbs, RFC 9113 §8.2.3), where HTTP/1.1 has one `Cookie` line:
        // they count as that one line.
        // (Counted only past the limit: the lookup costs every request.)
        let headers = request.headers();
        let mut fields = headers.len();
        if fields > self.max_headers {
            let crumbs = headers.get_all(http::header::COOKIE).iter().count();
            fields -= crumbs.saturating_sub(1);
        }
        if fields > self.max_headers {
            return Err(ProxyError::TooManyHeaders {
                fields,
                limit: self.max_headers,
            });
        }

        // 3. credentials
        access.credentials = credentials::of_request(
            request.headers(),
            tunnel.and_then(|t| t.session_key.as_ref()),
            principal.user.as_deref(),
            &self.cookies,
            &self.hasher,
            tunnel.map(|t| &t.cookie_memo),
        )?;
        let credentials = &access.credentials;

        // 4. route. A WebSocket upgrade is routed like any request; the
        // client's side of the upgrade is claimed now, before the request is
        // taken apart.
        let upgrade = upgrade::requested(&request);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let client = tunnel.map_or_else(Arc::default, |t| t.client.clone());
        // What an identity founded by this request (its session key) or by
        // its answer records of the connection. Not the hello of an upgrade
        // whose client offered HTTP/1.1 alone: Chromium opens WebSockets on
        // a tunnel of their own offering nothing else, and an identity
        // recording that hello would have its page loads leave as HTTP/1.1
        // only, as no Chromium does; recording none, its connections
        // present their own client's hello, as after a plain-HTTP founding.
        let founding = if upgrade
            && client
                .hello
                .as_deref()
                .is_some_and(|h| h.offers_http1_only())
        {
            Arc::default()
        } else {
            client.clone()
        };
        let mut route = self
            .route(&principal.exits, credentials, || {
                Fingerprint::of_request(request.headers(), &founding)
            })
            .await?;
        // What an identity founded by the response's cookies records, held
        // (not yet copied) until one is; a routed identity has its
        // fingerprint already.
        let fingerprint = match route.identity {
            Some(_) => RequestFingerprint::default(),
            None => RequestFingerprint::of_request(request.headers(), &founding),
        };
        // Offer the origin what the client offered pinproxy; upgrades need
        // HTTP/1.1. Cookie-less traffic presents the client's own
        // fingerprint (an identity's lane presents the identity's). So does
        // an identity founded without a ClientHello (its first request
        // came to pinproxy in plain HTTP) when its client now speaks TLS:
        // it has no hello of its own to present, and pinproxy's would be
        // nobody's.
        route.lane.h2 = tunnel.is_some_and(|t| t.tls && t.client_offers_h2) && !upgrade;
        route.lane.client_resumes = tunnel.is_some_and(|t| t.client_resumes);
        let presents_client = match &route.identity {
            None => true,
            Some(identity) => identity.fingerprint.tls.is_none() && client.has_hello(),
        };
        if presents_client {
            route.lane.fingerprint = Some(client.presented());
            route.lane.fingerprint_key = client.key();
        }
        self.trial_unhealthy_exit(&target);
        self.note_chrome_user_agent(&route, request.headers());
        span.record("exit", tracing::field::display(route.exit.id()));
        access.exit = Some(route.exit.instruments(&self.metrics));
        access.identity = route.identity.as_ref().map(|i| i.id);
        access.decision = Some(Decision::of(route.reason));
        if let Some(identity) = &route.identity {
            span.record("identity", tracing::field::display(identity.id));
        }

        // 5. fingerprint
        let (mut parts, incoming) = request.into_parts();
        if let Some(identity) = &route.identity {
            self.check_fingerprint(identity, &client, &mut parts.headers)?;
        }

        // 5b. pacing: the identity's requests in flight and their spacing
        // (the request waits, bounded, or gets 429).
        let slot = match &route.identity {
            Some(identity) => self.pacer.admit(identity.id, &self.pacing).await?,
            None => None,
        }
        .map(Arc::new);
        // A request that waited was routed before its wait: the identity
        // may have retired meanwhile (a challenge, a drift, an eviction),
        // and must not then be served (its lane, forgotten at the
        // retirement, would be made anew), or may have recorded its first
        // egress address, which its tunnels must now leave from.
        if let (Some(identity), Some(true)) =
            (&route.identity, slot.as_deref().map(pacing::Slot::waited))
        {
            match self
                .router
                .reread(&self.exits, identity, credentials)
                .await?
            {
                Reread::Live(now) => {
                    route.lane.expected_ip = route.lane.expected_ip.or(now.egress_ip);
                }
                Reread::Retired(reason) => {
                    return Err(ProxyError::IdentityRetired {
                        identity: identity.id,
                        exit: identity.exit.clone(),
                        reason,
                    })
                }
            }
        }

        // 6. egress
        let strip: Vec<_> = route.strip.iter().map(|c| c.key).collect();
        cookies::strip_from_request(&mut parts.headers, &self.cookies, &self.hasher, &strip);
        if tunnel.is_none() {
            egress::proxy_connection_as_connection(&mut parts.headers);
        }
        if upgrade {
            egress::sanitize_upgrade_request(&mut parts.headers);
        } else {
            egress::sanitize_request(&mut parts.headers);
        }
        let expected_accept = upgrade
            .then(|| upgrade::expected_accept(&parts.headers))
            .flatten();
        // A proxy must replace Host with the absolute-form target's authority
        // (RFC 9112 §3.2.2). Inside a tunnel the client's own Host stands; an
        // HTTP/2 client sends none, and the pool adds one only if the origin
        // turns out to speak HTTP/1.1.
        if tunnel.is_none() {
            parts
                .headers
                .insert(http::header::HOST, target.host_header()?);
        }
        let origin = target.upstream_origin();
        // An HTTP/2 client names its host in `:authority` (the URI), not
        // `Host`: one that is not its tunnel's host as pinproxy would write
        // it goes on as the client wrote it, beside any `host` field of its
        // own. (An HTTP/1.1 client's absolute-form target inside a tunnel
        // gives way to its `Host`, as the origin would have it.)
        let from_h2 = parts.version == Version::HTTP_2;
        if tunnel.is_some()
            && parts.uri.authority().is_some()
            && (from_h2 || !parts.headers.contains_key(http::header::HOST))
        {
            if let Some(authority) =
                crate::upstream::ClientAuthority::differing(&parts.uri, &origin)
            {
                parts.extensions.insert(authority);
            }
        }
        // Origin-form: the origin travels beside the request, so no
        // absolute URI is built here only to be taken apart in the pool.
        parts.uri = Uri::from(target.path_and_query.clone());
        // HTTP/1.x requests go on as HTTP/1.1 (a proxy sends its own
        // version); an HTTP/2 client's keeps its version, which says so to
        // the pool (`upstream::came_over_http2`).
        if !from_h2 {
            parts.version = Version::HTTP_11;
        }
        let upstream_request = Request::from_parts(parts, egress::request_body(incoming));

        // 7. send; a WebSocket goes its own way from here.
        if let Some(client_upgrade) = client_upgrade {
            let socket = upgrade::Socket {
                client: client_upgrade,
                expected_accept,
            };
            // Boxed: a WebSocket's stages make a 4 KB future, and without
            // the box every request in flight would keep room for it (its
            // future was 6 KB, two thirds of it this one awaitee).
            return Box::pin(self.forward_upgrade(
                &route,
                &origin,
                upstream_request,
                &fingerprint,
                socket,
                slot,
            ))
            .await;
        }
        let (
            Answered {
                response,
                tunnel: carried_by,
                new_connection,
            },
            timings,
        ) = self.send(&route, &origin, upstream_request).await?;
        let egress_ip = carried_by.egress_ip;
        access.timings = timings;
        // A switch the request did not ask for (or asked for in a way not
        // taken as a WebSocket) is never relayed: its bytes would cross
        // unread. hyper keeps the upstream connection out of the pool.
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let error = crate::upstream::UpstreamError::Exchange {
                kind: crate::upstream::error::ExchangeKind::Upgrade,
                detail: "the origin switched protocols though no WebSocket upgrade was asked for; \
                         only a WebSocket is relayed"
                    .into(),
            };
            return Err(ProxyError::upstream(&route.exit, error));
        }

        // 8. capture
        let status = response.status();
        let identity = self
            .capture_pins(
                &route,
                &fingerprint,
                response.headers(),
                egress_ip,
                Some(capture::CarriedBy {
                    origin: &origin,
                    tunnel: &carried_by,
                    // An HTTP/2 connection's other streams may be other
                    // requests'.
                    dialled_for_it: new_connection && response.version() != http::Version::HTTP_2,
                }),
            )
            .await
            .map_err(|e| e.withheld(route.exit.id(), status))?;
        let (mut parts, mut upstream_body) = response.into_parts();
        // An answer abandoned for its client (see `upstream::unread`) lets
        // its identity's slot go at once, not when its client reads again.
        // (Held weakly: the place goes back with its last holder as ever.)
        if let Some(slot) = &slot {
            let slot = Arc::downgrade(slot);
            upstream_body.on_abandon(move || {
                if let Some(slot) = slot.upgrade() {
                    slot.release();
                }
            });
        }
        let body = match &identity {
            Some(identity) => {
                access.identity = Some(identity.id);
                self.capture_use(
                    identity,
                    parts.status.is_success(),
                    egress_ip,
                    Some(&carried_by),
                )
                .await
                .map_err(|e| e.withheld(route.exit.id(), status))?;
                let site = access.site.as_ref();
                self.capture_invalidation_on(identity, site, &parts, upstream_body, held(&slot))
                    .await
            }
            None => body::boxed(upstream_body),
        };

        // 9. respond
        let body = egress::response_body(body, &parts);
        egress::sanitize_response(&mut parts.headers);
        tracing::debug!(status = parts.status.as_u16(), "forwarded");
        Ok(Response::from_parts(parts, pacing::Paced::wrap(body, slot)))
    }

    /// Stage 4: routes `credentials`. A store that cannot answer cannot say
    /// where a credential belongs, nor remember what a response sets: fail
    /// closed (fail-open lets requests without credentials through). A new
    /// identity records the fingerprint `fingerprint` makes; only exits
    /// `scope` allows are used (a user's exits).
    pub async fn route(
        &self,
        scope: &ExitScope,
        credentials: &[Credential],
        fingerprint: impl FnOnce() -> Fingerprint,
    ) -> Result<Route, ProxyError> {
        let may_pass_without_store =
            self.on_unavailable == Unavailable::FailOpen && credentials.is_empty();
        if let Some(refusal) = self.router.store().refusal() {
            if !may_pass_without_store {
                return Err(ProxyError::Store(refusal));
            }
        }
        Ok(self
            .router
            .route_within(&self.exits, scope, credentials, fingerprint)
            .await?)
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

/// A request's pacing slot as a scan of its answer holds it (see
/// [`pacing::Paced`]).
pub(crate) fn held(slot: &Option<Arc<pacing::Slot>>) -> Option<Arc<dyn Send + Sync>> {
    slot.clone().map(|slot| slot as Arc<dyn Send + Sync>)
}
