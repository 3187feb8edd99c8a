//! What pinproxy answers when it cannot forward a request.
//!
//! Every failure is a [`ProxyError`], classified by who is at fault
//! ([`Fault`], decided by each inner error type), which chooses the status
//! code. The answer carries an
//! `X-Pinproxy-Error: <code>: <message>. <advice>` header and a plain-text
//! body with the same message and advice. The advice follows the cause, not
//! only the code: an untrusted certificate names `--upstream-ca`, a 407
//! names the exit's credentials, a retired identity says why it ended.
//! Messages name the exit (with its URL, never its credentials) and, for
//! cookies, only their name and short hash.

use std::borrow::Cow;

use http::{HeaderValue, Response, StatusCode};

use super::auth::AuthFailure;
use super::credentials::cookies::CookieError;
use super::credentials::session_key::SessionKeyError;
use crate::body::{self, Body};
use crate::credential::Credential;
use crate::exits::Exit;
use crate::fault::{Blame, Fault};
use crate::identity::{ExitId, IdentityId, RetireReason};
use crate::net::HostPort;
use crate::routing::RouteError;
use crate::store::{StoreError, StoreErrorKind};
use crate::upstream::dial::guard::{OwnListener, Refusal};
use crate::upstream::error::{ExchangeKind, Stage, TlsFailure};
use crate::upstream::{ConnectError, UpstreamError};

/// The response header that names pinproxy's reason for an error answer.
pub const X_PINPROXY_ERROR: &str = "x-pinproxy-error";

/// A request pinproxy could not forward.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or not a proxy request.
    #[error("{0}")]
    BadRequest(String),
    /// The request's framing could be read two ways (request smuggling):
    /// refused, and the connection closed.
    #[error("refused a request whose framing could be read two ways: {0}; it was not forwarded")]
    AmbiguousFraming(String),
    /// The header section is over the limit.
    #[error("the request header section is {size} bytes; the limit is {limit}")]
    HeadersTooLarge {
        /// Size of the section.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// More header fields than `limits.max_headers` (an HTTP/2 request:
    /// hyper refuses an HTTP/1.1 one itself).
    #[error("the request has {fields} header fields; the limit is {limit}")]
    TooManyHeaders {
        /// How many fields it has.
        fields: usize,
        /// The limit.
        limit: usize,
    },
    /// The cookies cannot be read.
    #[error(transparent)]
    Cookies(#[from] CookieError),
    /// The session key cannot be used.
    #[error(transparent)]
    SessionKey(#[from] SessionKeyError),
    /// The request's fingerprint differs from its identity's (reject policy).
    #[error(
        "identity {identity} on exit {exit} was created with other values of {}",
        .headers.join(", ")
    )]
    FingerprintDrift {
        /// The identity.
        identity: IdentityId,
        /// Its exit.
        exit: ExitId,
        /// The headers that differ.
        headers: Vec<&'static str>,
    },
    /// The identity was retired while handling this request.
    #[error("identity {identity} on exit {exit} was retired: {reason}")]
    IdentityRetired {
        /// The identity.
        identity: IdentityId,
        /// Its exit.
        exit: ExitId,
        /// Why.
        reason: RetireReason,
    },
    /// The origin answered, but what its answer pins (its tracked cookies,
    /// the identity's first egress address) could not be stored: the
    /// answer was withheld, so that no client holds a cookie pinned
    /// nowhere. Unlike [`ProxyError::Store`], the request was carried.
    #[error("exit {exit} carried the request and the origin answered {status}, but what the answer pins could not be stored ({error}); the answer was withheld")]
    AnswerWithheld {
        /// The exit that carried the request.
        exit: ExitId,
        /// The origin's status.
        status: StatusCode,
        /// The store's failure.
        error: StoreError,
    },
    /// Routing failed.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The exit or origin failed.
    #[error("exit {exit} ({url}): {error}")]
    Upstream {
        /// The exit used.
        exit: ExitId,
        /// Its URL without credentials, user name included (boxed: errors
        /// travel in `Result`s and are kept small).
        url: Box<str>,
        /// What failed.
        error: UpstreamError,
    },
    /// The store failed after the origin answered.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The client did not authenticate (stage 0): 407.
    #[error("{0}")]
    AuthRequired(AuthFailure),
    /// The target is pinproxy itself.
    #[error("{target} is {listener}: pinproxy does not forward there")]
    Loop {
        /// The target asked for.
        target: HostPort,
        /// Which listener it is.
        listener: OwnListener,
    },
    /// The CA's name constraints exclude the host: clients would reject
    /// any leaf for it.
    #[error("{host} is outside the domains pinproxy's CA may sign for ({permitted})")]
    OutsideCa {
        /// The host.
        host: String,
        /// The CA's permitted domains.
        permitted: String,
    },
    /// A client or identity limit: 429 with `Retry-After`.
    #[error(transparent)]
    Throttled(#[from] super::pacing::Throttle),
}

impl Blame for ProxyError {
    fn fault(&self) -> Fault {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::AmbiguousFraming(_)
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::TooManyHeaders { .. }
            | ProxyError::Cookies(_)
            | ProxyError::SessionKey(_)
            | ProxyError::FingerprintDrift { .. }
            | ProxyError::AuthRequired(_)
            | ProxyError::Loop { .. }
            | ProxyError::OutsideCa { .. }
            | ProxyError::Throttled(_) => Fault::Client,
            ProxyError::IdentityRetired { .. } => Fault::Exit,
            ProxyError::Route(e) => e.fault(),
            ProxyError::Store(e) | ProxyError::AnswerWithheld { error: e, .. } => e.fault(),
            ProxyError::Upstream { error, .. } => error.fault(),
        }
    }
}

impl ProxyError {
    /// This error met while capturing what an answer of `status` through
    /// `exit` pins: a store failure then is an answer withheld (see
    /// [`ProxyError::AnswerWithheld`]); others are left as they are.
    pub fn withheld(self, exit: &ExitId, status: StatusCode) -> ProxyError {
        match self {
            ProxyError::Store(error) => ProxyError::AnswerWithheld {
                exit: exit.clone(),
                status,
                error,
            },
            other => other,
        }
    }

    /// `error` on the way through `exit`.
    pub fn upstream(exit: &Exit, error: UpstreamError) -> ProxyError {
        ProxyError::Upstream {
            exit: exit.id().clone(),
            url: exit.spec.public_url().into(),
            error,
        }
    }

    /// The short, stable error code sent in `X-Pinproxy-Error`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) | ProxyError::AmbiguousFraming(_) => "bad-request",
            ProxyError::HeadersTooLarge { .. } | ProxyError::TooManyHeaders { .. } => {
                "headers-too-large"
            }
            ProxyError::Cookies(_) => "unreadable-cookies",
            ProxyError::SessionKey(_) => "bad-session-key",
            ProxyError::FingerprintDrift { .. } => "fingerprint-drift",
            ProxyError::Route(RouteError::Conflict(_)) => "pin-conflict",
            ProxyError::Route(RouteError::Retired(_)) | ProxyError::IdentityRetired { .. } => {
                "identity-retired"
            }
            ProxyError::Route(RouteError::NoExit(_)) => "no-exit-available",
            ProxyError::Route(RouteError::ExitMissing { .. }) => "exit-missing",
            ProxyError::Route(RouteError::ExitReloaded { .. }) => "exit-reloaded",
            ProxyError::Route(RouteError::ExitNotAllowed { .. }) => "exit-not-allowed",
            ProxyError::AuthRequired(AuthFailure::Unchecked) => "auth-unavailable",
            ProxyError::AuthRequired(_) => "proxy-auth-required",
            ProxyError::Loop { .. } => "proxy-loop",
            ProxyError::OutsideCa { .. } => "outside-ca-constraints",
            ProxyError::Throttled(t) => t.code(),
            ProxyError::Route(RouteError::Store(e))
            | ProxyError::Store(e)
            | ProxyError::AnswerWithheld { error: e, .. }
                if e.kind == StoreErrorKind::Untracked =>
            {
                "tracking-changed"
            }
            ProxyError::Route(RouteError::Store(_))
            | ProxyError::Store(_)
            | ProxyError::AnswerWithheld { .. } => "store-unavailable",
            ProxyError::Upstream { error, .. } => match error {
                UpstreamError::Connect(c) => match c {
                    ConnectError::ExitUnreachable { .. } => "exit-unreachable",
                    ConnectError::ExitRefused { .. } => "exit-refused",
                    ConnectError::ExitProtocol(_) | ConnectError::ExitSocksProtocol { .. } => {
                        "exit-protocol"
                    }
                    ConnectError::Timeout { .. } if c.is_exit_fault() => "exit-timeout",
                    ConnectError::Timeout { .. } => "origin-timeout",
                    ConnectError::Resolve { .. } => "origin-dns",
                    ConnectError::OriginUnreachable { .. } => "origin-unreachable",
                    ConnectError::Tls { .. } => "upstream-tls",
                    ConnectError::ExitIpDrift { .. } => "exit-ip-drift",
                    ConnectError::ExitIpUnknown(_) => "exit-ip-unknown",
                    ConnectError::ExitSocks { .. } => "exit-refused",
                    ConnectError::Forbidden(f) if matches!(f.refusal, Refusal::Own(_)) => {
                        "proxy-loop"
                    }
                    ConnectError::Forbidden(_) => "address-denied",
                },
                UpstreamError::ResponseTimeout(_) => "origin-timeout",
                UpstreamError::Exchange { .. } => "origin-failed",
                UpstreamError::IdentityRetired(_) => "identity-retired",
            },
        }
    }

    /// The status code of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::HeadersTooLarge { .. } | ProxyError::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::Route(RouteError::Conflict(_)) | ProxyError::FingerprintDrift { .. } => {
                StatusCode::CONFLICT
            }
            ProxyError::Route(RouteError::NoExit(_) | RouteError::ExitReloaded { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // No word on the credentials: a 407 would have a browser ask
            // for them again, or drop them.
            ProxyError::AuthRequired(AuthFailure::Unchecked) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AuthRequired(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Loop { .. }
            | ProxyError::OutsideCa { .. }
            | ProxyError::Route(RouteError::ExitNotAllowed { .. })
            | ProxyError::Upstream {
                error: UpstreamError::Connect(ConnectError::Forbidden(_)),
                ..
            } => StatusCode::FORBIDDEN,
            ProxyError::Upstream {
                error: UpstreamError::ResponseTimeout(_),
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
            // Like a response-head timeout: the origin was too slow (the
            // code is the same, so is the status).
            ProxyError::Upstream {
                error: UpstreamError::Connect(c @ ConnectError::Timeout { .. }),
                ..
            } if !c.is_exit_fault() => StatusCode::GATEWAY_TIMEOUT,
            _ => match self.fault() {
                Fault::Client => StatusCode::BAD_REQUEST,
                Fault::Exit | Fault::Origin => StatusCode::BAD_GATEWAY,
                Fault::Store => StatusCode::SERVICE_UNAVAILABLE,
                Fault::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// What the user can do about it, for this cause.
    pub fn advice(&self) -> Cow<'static, str> {
        match self {
            ProxyError::BadRequest(_) => {
                "Send absolute-form requests (GET http://host/path) or CONNECT host:port to pinproxy."
                    .into()
            }
            ProxyError::AmbiguousFraming(_) => {
                "Send the head as RFC 9112 frames it: CRLF line endings, no folded lines, control \
                 characters or space before a colon, and a body's length stated once (one \
                 Content-Length, or Transfer-Encoding: chunked alone). The connection was closed: \
                 nothing after this request on it was read."
                    .into()
            }
            ProxyError::HeadersTooLarge { .. } => {
                "Send fewer or smaller headers, or raise limits.max_header_bytes.".into()
            }
            ProxyError::TooManyHeaders { .. } => {
                "Send fewer header fields, or raise limits.max_headers.".into()
            }
            ProxyError::Cookies(CookieError::NotUtf8) => "Send cookies as UTF-8 text.".into(),
            ProxyError::Cookies(CookieError::BadTokenHeader(header)) => format!(
                "Send the {header} header as visible ASCII, as the vendor's SDK does."
            )
            .into(),
            ProxyError::Cookies(CookieError::HiddenPair) => {
                "Send cookies as one Cookie header with pairs separated by '; ', as browsers do."
                    .into()
            }
            ProxyError::Cookies(CookieError::TooMany | CookieError::NameTooLong { .. }) => {
                "Send each tracked cookie once, as the site set it: a browser's jar holds a handful per site."
                    .into()
            }
            ProxyError::SessionKey(_) => {
                "Name the session in X-Pinproxy-Session or as user name session-KEY, 1-256 visible ASCII characters."
                    .into()
            }
            ProxyError::FingerprintDrift { .. } => {
                "This identity was created by a client with another User-Agent / client hints / language \
                 or another TLS / HTTP/2 fingerprint. Use one identity per browser profile, or set \
                 identities.fingerprint_policy."
                    .into()
            }
            ProxyError::Route(RouteError::Conflict(_)) => {
                "These credentials were earned by different identities (exits) and cannot leave together. \
                 Drop the cookies of one identity from the client's jar (or use one jar per identity)."
                    .into()
            }
            ProxyError::Route(RouteError::Retired(dead)) => match dead.first() {
                Some(d) => retired_advice(&d.reason),
                None => retired_advice(&RetireReason::Forgotten),
            },
            ProxyError::IdentityRetired { reason, .. } => retired_advice(reason),
            ProxyError::Route(RouteError::NoExit(_)) => {
                "No exit takes new traffic: a dead exit comes back after health.healthy_after good probes, \
                 a drained one with POST /exits/ID/undrain on the admin endpoint (GET /exits shows each)."
                    .into()
            }
            ProxyError::Route(RouteError::ExitMissing { .. }) => {
                "Configure the same exits on every replica: the identity stays alive for the replicas \
                 that have its exit, and retires once unused for identities.idle_timeout. Or drop its \
                 cookies from the client's jar."
                    .into()
            }
            ProxyError::Route(RouteError::ExitReloaded { .. }) => {
                "Send the request again: it is routed by the configuration now in force. The \
                 identity is not retired for it."
                    .into()
            }
            ProxyError::Route(RouteError::ExitNotAllowed { .. }) => {
                "This identity (its cookies or session key) lives on an exit this user may not use, \
                 and pinproxy never moves an identity: drop its cookies and session key, or add the \
                 exit to the user's exits in [[auth.users]]."
                    .into()
            }
            ProxyError::AuthRequired(AuthFailure::NameYourSession) => {
                "Give the client proxy credentials with user name session-KEY (curl --proxy-user \
                 session-KEY:x, http://session-KEY:x@HOST:PORT as the proxy URL, a browser's \
                 proxy username)."
                    .into()
            }
            ProxyError::AuthRequired(AuthFailure::Unchecked) => {
                "Send the request again with the same credentials: pinproxy could not check \
                 them just now (it is shutting down or its password checks failed to run)."
                    .into()
            }
            ProxyError::AuthRequired(_) => {
                "Give the client a configured user's proxy credentials (curl --proxy-user \
                 NAME:PASSWORD, http://NAME:PASSWORD@HOST:PORT as the proxy URL); `pinproxy user add \
                 NAME` makes a user."
                    .into()
            }
            ProxyError::Loop { .. } => {
                "Point the client at origins, not at pinproxy itself: requests for pinproxy's own \
                 listen or admin address, or its pin store's server, are refused."
                    .into()
            }
            ProxyError::OutsideCa { .. } => {
                "Clients would reject a certificate for this host: add it to ca.permitted_domains \
                 and rotate the CA (pinproxy ca rotate), or tunnel it raw (mitm.exclude)."
                    .into()
            }
            ProxyError::Route(RouteError::Store(e)) | ProxyError::Store(e) => store_advice(e),
            ProxyError::AnswerWithheld { error, .. } => format!(
                "The origin has acted on the request: repeat it only if that is safe. {}",
                store_advice(error)
            )
            .into(),
            ProxyError::Upstream { error, .. } => upstream_advice(error).into(),
            ProxyError::Throttled(t) => t.advice().into(),
        }
    }

    /// The answer sent to the client.
    pub fn to_response(&self) -> Response<Body> {
        self.to_response_for(&[])
    }

    /// [`ProxyError::to_response`] for a request that carried
    /// `credentials`: an error about the request's identity as a whole
    /// (retired after routing, its exit missing or not the user's, its
    /// fingerprint changed) names them (`name#hash`), so the user knows
    /// which entries of the jar its advice means.
    pub fn to_response_for(&self, credentials: &[Credential]) -> Response<Body> {
        let mut message = self.to_string();
        let of_identity = matches!(
            self,
            ProxyError::IdentityRetired { .. }
                | ProxyError::FingerprintDrift { .. }
                | ProxyError::Route(
                    RouteError::ExitMissing { .. }
                        | RouteError::ExitNotAllowed { .. }
                        | RouteError::ExitReloaded { .. }
                )
        );
        if of_identity && !credentials.is_empty() {
            // A few are enough to find the jar entries; the message stays
            // short enough for its header, advice included.
            const NAMED: usize = 8;
            let mut named: Vec<String> = credentials
                .iter()
                .take(NAMED)
                .map(ToString::to_string)
                .collect();
            if credentials.len() > NAMED {
                named.push(format!("and {} more", credentials.len() - NAMED));
            }
            message.push_str(&format!(" (the request carried {})", named.join(", ")));
        }
        let advice = self.advice();
        let header = header_value(&format!("{}: {message}. {advice}", self.code()));
        let text = format!("pinproxy: {message}\n{advice}\n");
        let mut response = Response::new(body::full(text));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(X_PINPROXY_ERROR, header);
        if let ProxyError::Throttled(t) = self {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(t.retry_after_secs()),
            );
        }
        match self {
            ProxyError::AuthRequired(AuthFailure::Unchecked) => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(1u32));
            }
            ProxyError::AuthRequired(_) => {
                headers.insert(http::header::PROXY_AUTHENTICATE, super::auth::challenge());
            }
            _ => {}
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        response
    }
}

/// Why an identity ended, and what the client should do.
fn retired_advice(reason: &RetireReason) -> Cow<'static, str> {
    const NEW_SESSION: &str = "Drop its cookies and session key and start a new session: pinproxy \
                               never moves an identity to another exit (identities.retire_policy = \
                               \"strip\" removes such credentials instead).";
    let why = match reason {
        RetireReason::CookieExpired => {
            return "This cookie's own Max-Age/Expires has passed: drop it from the jar; pinproxy sends \
                    an expired cookie through no exit."
                .into()
        }
        RetireReason::ExitDown => {
            "Its exit was declared dead by health checks, and an address seen before an outage \
             cannot be trusted to be the same."
        }
        RetireReason::ExitRemoved => "Its exit is no longer configured.",
        RetireReason::ExitChanged => {
            "Its exit's URL, credentials or fingerprint mode changed since it was founded, and the \
             new route may leave from other IPs (keep_identities_on_route_change keeps identities \
             when it does not)."
        }
        RetireReason::StickyExpired => {
            "The exit's sticky-session window (sticky_ttl) has passed: the provider may have moved \
             the session to another IP."
        }
        RetireReason::IdleExpired => {
            "It was unused for longer than identities.idle_timeout (or its exit's idle_timeout)."
        }
        RetireReason::LifetimeExpired => {
            "It is older than identities.max_lifetime (or its exit's max_lifetime)."
        }
        RetireReason::Invalidated { .. } => {
            "The origin invalidated it (a challenge or a block): these cookies are burnt, and \
             retrying with them will not help."
        }
        RetireReason::ExitIpDrift { .. } => {
            "Its exit now leaves from another address than the one its cookies were earned on."
        }
        RetireReason::Evicted => "An operator retired it by hand on the admin endpoint.",
        RetireReason::Forgotten => {
            "Its record is gone (retired longer ago than identities.remember_retired)."
        }
        RetireReason::StoreLost => {
            "The pin store lost this credential's pin and no replica's journal had it: pinproxy \
             will not guess its exit (store.loss_quarantine)."
        }
    };
    format!("{why} {NEW_SESSION}").into()
}

/// What to do when the pin store failed.
fn store_advice(error: &StoreError) -> Cow<'static, str> {
    match error.kind {
        StoreErrorKind::Unreachable if error.detail.contains("wait_replicas") => {
            "Too few Redis replicas acknowledged the new pin in time, so nothing was sent: check the \
             replicas, or lower store.wait_replicas or raise store.wait_timeout. Retry later."
        }
        StoreErrorKind::Unreachable => {
            "The pin store (Redis) does not answer; pinproxy will not route tracked cookies blindly. \
             Check Redis and retry when it is back (store.on_unavailable = \"fail-open\" lets \
             cookie-less requests through meanwhile)."
        }
        StoreErrorKind::WriteFailed => {
            "A pin store file could not be written (disk full or read-only?): the embedded store's, \
             or with Redis this replica's journal (DATA_DIR/journal.redb). pinproxy refuses new pins \
             until it is restarted after the disk is fixed; with Redis, the other replicas serve."
        }
        StoreErrorKind::Stalled => {
            "The disk of the embedded pin store (or, with Redis, of this replica's journal, \
             DATA_DIR/journal.redb) has not confirmed a write in time (a hung or overloaded disk); \
             pinproxy does not send a cookie whose pin is not on disk. Check the disk; requests go \
             through again once it answers."
        }
        StoreErrorKind::Closed => "pinproxy is shutting down; retry once it is back.",
        StoreErrorKind::Untracked => {
            "A reload that drops this cookie's name from track_cookies, or keys it otherwise (an \
             exact name respelt), began while the request was on its way, and a pin the new \
             configuration would not find is not made. Retry: once the reload went through and \
             the requests begun before it have ended, the cookie goes as the new configuration \
             says (untracked, or pinned under its new keying); if the reload was refused, it is \
             pinned as before."
        }
        StoreErrorKind::Corrupt => {
            "A stored record could not be read; pinproxy will not guess. Check the store \
             (pinproxy store stats) and its logs."
        }
        StoreErrorKind::Protocol => {
            "The store answered something pinproxy does not understand: store.url must name Redis \
             6.2 or later (or a Sentinel for it)."
        }
        StoreErrorKind::Lost => {
            "Redis was seen to forget pins it had acknowledged (a failover, a restart without \
             persistence, a flush or an eviction); the replicas are writing back what they \
             journaled. Retry in a moment; credentials nobody can restore are then answered as \
             retired (store-lost)."
        }
        StoreErrorKind::KeyConflict => {
            "Nothing is routed by this replica until the fleet's pin-hashing key is back in Redis \
             and the replica is restarted (the error says which key and where)."
        }
    }
    .into()
}

/// What to do when an exit or the origin failed.
fn upstream_advice(error: &UpstreamError) -> &'static str {
    let connect = match error {
        UpstreamError::ResponseTimeout(_) => {
            return "The origin sent no response head within timeouts.response_head, counted from \
                    when pinproxy began sending (a long upload counts too); raise it for slow \
                    endpoints or large uploads, or retry later."
        }
        UpstreamError::Exchange { kind, .. } => return match kind {
            ExchangeKind::OriginClosed => {
                "The origin closed the connection before its answer was complete; retry if the \
                     request is safe to repeat."
            }
            ExchangeKind::Protocol => {
                "The origin's answer is not valid HTTP; retrying will not help unless the origin \
                     is fixed."
            }
            ExchangeKind::Upgrade => {
                "The origin refused or broke the WebSocket upgrade, or switched protocols \
                     unasked (pinproxy relays only a WebSocket): check the path and, for a \
                     WebSocket, the client's upgrade headers."
            }
            ExchangeKind::Unpinnable => {
                "The answer was withheld so that no tracked cookie reaches the client unpinned; \
                     the origin acted on the request. If this origin sets that many tracked \
                     cookies, track fewer names (cookies.track)."
            }
            ExchangeKind::Refused => {
                "The origin refused the request's stream (REFUSED_STREAM), so it did not process \
                     it: retrying is safe. pinproxy sends a request again itself only when it has \
                     no body (a body streams once and is not kept), a few times at most."
            }
            ExchangeKind::Other => {
                "The connection to the origin failed during the exchange; retry if the request \
                     is safe to repeat."
            }
        },
        UpstreamError::IdentityRetired(_) => {
            return "Its identity was retired while the request waited for a connection (another \
                    request's answer invalidated it, or an operator evicted it): nothing was \
                    sent; start a new session without its cookies."
        }
        UpstreamError::Connect(connect) => connect,
    };
    match connect {
        ConnectError::ExitUnreachable { .. } => {
            "The exit's proxy does not accept connections: check that it runs and that this machine \
             can reach it. After health.unhealthy_after failures pinproxy sends new traffic elsewhere."
        }
        ConnectError::ExitRefused { status: 407, .. } => {
            "The exit refused pinproxy's credentials (407): fix the user name and password in the \
             exit's URL (--exit or [[exits]] url)."
        }
        ConnectError::ExitRefused { .. } => {
            "The exit refused to open the tunnel (its status is quoted): it may not allow this host \
             or port, or could not reach the origin itself; check the exit's access rules and logs."
        }
        ConnectError::ExitSocks { auth: true, .. } => {
            "The SOCKS5 exit refused pinproxy's user name and password: fix them in the exit's URL."
        }
        ConnectError::ExitSocks { .. } => {
            "The SOCKS5 exit could not connect to the origin (its reason is quoted): it may not allow \
             this destination, or the origin is down."
        }
        ConnectError::ExitSocksProtocol {
            after_connect: true,
            ..
        } => {
            "The SOCKS5 exit closed the connection once asked for the origin, without answering: \
             the origin may be down or refuse the exit, or the exit may be failing; retry, and \
             check the exit's logs if it goes on."
        }
        ConnectError::ExitSocksProtocol { .. } => {
            "The SOCKS5 exit did not keep to SOCKS5 (what it did is quoted): check that the exit's \
             URL names a SOCKS5 server's host and port, and that the server takes the credentials \
             the URL gives (or none, if it gives none)."
        }
        ConnectError::ExitProtocol(_) => {
            "The exit's answer is not what its URL's scheme promises: use http:// for an HTTP proxy \
             and socks5:// for a SOCKS5 one, and check the port."
        }
        ConnectError::Timeout { stage, .. } => match stage {
            Stage::ExitConnect | Stage::ExitReply => {
                "The exit did not answer within timeouts.connect: it may be overloaded or dropping \
                 connections (raise timeouts.connect if it is merely slow)."
            }
            Stage::OriginConnect | Stage::TlsHandshake => {
                "The origin did not complete the connection within timeouts.connect: it may be down or \
                 slow; retry later, or raise timeouts.connect."
            }
        },
        ConnectError::Resolve { .. } => {
            "The origin's host name does not resolve from this machine (direct exits resolve here): \
             check the name."
        }
        ConnectError::OriginUnreachable { .. } => {
            "The origin refused the connection or cannot be reached from this exit: check the host \
             and port; retry later."
        }
        ConnectError::Tls { .. } => match connect.tls_failure() {
            Some(TlsFailure::UntrustedIssuer) => {
                "The origin's certificate is signed by an issuer pinproxy does not trust; retrying \
                 will not help. If the origin is genuine (a private or test CA), give pinproxy that \
                 CA with --upstream-ca FILE (upstream_ca in the config file)."
            }
            Some(TlsFailure::WrongName) => {
                "The origin's certificate is not valid for this host name (a wrong certificate can \
                 also mean interception on the way); retrying will not help."
            }
            Some(TlsFailure::Expired) => {
                "The origin's certificate has expired or is not valid yet (or this machine's clock is \
                 wrong); retrying will not help until it is renewed."
            }
            Some(TlsFailure::Rejected) => {
                "The origin's certificate was rejected (the reason is quoted); retrying will not help. \
                 A private CA is given to pinproxy with --upstream-ca FILE."
            }
            Some(TlsFailure::Handshake) | None => {
                "The TLS handshake with the origin failed: it may not speak TLS on this port, or \
                 accept no protocol version or cipher pinproxy offers; check the scheme and port."
            }
        },
        ConnectError::Forbidden(f) if matches!(f.refusal, Refusal::Own(_)) => {
            "Point the client at origins, not at pinproxy itself: this name resolves to pinproxy's \
             own listen or admin address."
        }
        ConnectError::Forbidden(_) => {
            "The origin resolves to an address in upstream.deny_ranges (link-local and the cloud \
             metadata address by default); pinproxy will not connect there. Remove the range from \
             upstream.deny_ranges if this origin is intended."
        }
        ConnectError::ExitIpDrift { .. } => {
            "The exit left from another address than before; retry (traffic without cookies is not \
             bound to one address)."
        }
        ConnectError::ExitIpUnknown(_) => {
            "The exit should state each tunnel's address (exit_ip_header or ip_echo) and did not: \
             check the header name and the IP-echo URL, or remove the setting if the exit cannot."
        }
    }
}

/// A header value from arbitrary text: non-printable and non-ASCII characters
/// become `?`, and long text is cut.
fn header_value(text: &str) -> HeaderValue {
    const MAX: usize = 1024;
    let cleaned: String = text
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("internal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_sanitised() {
        let v = header_value("bad\r\ninjected: ä");
        assert_eq!(v.to_str().unwrap(), "bad??injected: ?");
    }

    /// The advice fits the cause: a smuggling refusal is not told to send
    /// absolute-form requests, an answer setting too many tracked cookies
    /// is not called invalid HTTP.
    #[test]
    fn advice_fits_the_cause() {
        let framing =
            ProxyError::AmbiguousFraming("both Content-Length and Transfer-Encoding".into());
        assert_eq!(framing.code(), "bad-request");
        assert_eq!(framing.status(), StatusCode::BAD_REQUEST);
        assert!(
            !framing.advice().contains("absolute-form"),
            "{}",
            framing.advice()
        );
        assert!(
            framing.advice().contains("Content-Length"),
            "{}",
            framing.advice()
        );
        let exit = crate::identity::ExitId::new("res1");
        let unpinnable = ProxyError::Upstream {
            exit,
            url: "http://res1.example:3128".into(),
            error: UpstreamError::Exchange {
                kind: crate::upstream::error::ExchangeKind::Unpinnable,
                detail: "the origin set 300 tracked cookies in one answer".into(),
            },
        };
        assert!(
            !unpinnable.advice().contains("not valid HTTP"),
            "{}",
            unpinnable.advice()
        );
        assert!(
            unpinnable.advice().contains("withheld"),
            "{}",
            unpinnable.advice()
        );
    }

    /// An identity-level error names the request's credentials, a few of
    /// them: the header keeps its advice however many the request carried.
    #[test]
    fn an_identity_error_names_a_few_of_the_requests_credentials() {
        let hasher = crate::credential::PinHasher::new([1; 32]);
        let credentials: Vec<Credential> = (0..300)
            .map(|n| Credential::cookie("datadome", hasher.cookie("datadome", &n.to_string())))
            .collect();
        let error = ProxyError::IdentityRetired {
            identity: IdentityId::random(),
            exit: ExitId::new("res1"),
            reason: RetireReason::Evicted,
        };
        let response = error.to_response_for(&credentials);
        let header = response.headers()[X_PINPROXY_ERROR]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(header.contains("the request carried datadome#"), "{header}");
        assert!(header.contains("and 292 more"), "{header}");
        assert!(header.ends_with(&*error.advice()), "{header}");
    }

    #[test]
    fn statuses_follow_fault() {
        let e = ProxyError::HeadersTooLarge { size: 2, limit: 1 };
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let e = ProxyError::BadRequest("x".into());
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let r = e.to_response();
        assert!(r
            .headers()
            .get(X_PINPROXY_ERROR)
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("bad-request: "));
    }
}
