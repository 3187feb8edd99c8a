//! What pinproxy answers when it cannot forward a request.
//!
//! Every failure is a [`ProxyError`], classified by who is at fault
//! ([`Fault`], decided by each inner error type), which chooses the status
//! code. The answer carries an
//! `X-Pinproxy-Error: <code>: <message>` header and a plain-text body with the
//! same message and what to do about it. Messages name the exit and, for
//! cookies, only their name and short hash.

use http::{HeaderValue, Response, StatusCode};

use super::credentials::cookies::CookieError;
use super::credentials::session_key::SessionKeyError;
use crate::body::{self, Body};
use crate::fault::{Blame, Fault};
use crate::identity::{ExitId, IdentityId, RetireReason};
use crate::routing::RouteError;
use crate::store::StoreError;
use crate::upstream::{ConnectError, UpstreamError};

/// The response header that names pinproxy's reason for an error answer.
pub const X_PINPROXY_ERROR: &str = "x-pinproxy-error";

/// A request pinproxy could not forward.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or not a proxy request.
    #[error("{0}")]
    BadRequest(String),
    /// The header section is over the limit.
    #[error("the request header section is {size} bytes; the limit is {limit}")]
    HeadersTooLarge {
        /// Size of the section.
        size: usize,
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
    /// Routing failed.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The exit or origin failed.
    #[error("exit {exit}: {error}")]
    Upstream {
        /// The exit used.
        exit: ExitId,
        /// What failed.
        error: UpstreamError,
    },
    /// The store failed after the origin answered.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Blame for ProxyError {
    fn fault(&self) -> Fault {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::Cookies(_)
            | ProxyError::SessionKey(_)
            | ProxyError::FingerprintDrift { .. } => Fault::Client,
            ProxyError::IdentityRetired { .. } => Fault::Exit,
            ProxyError::Route(e) => e.fault(),
            ProxyError::Store(e) => e.fault(),
            ProxyError::Upstream { error, .. } => error.fault(),
        }
    }
}

impl ProxyError {
    /// The short, stable error code sent in `X-Pinproxy-Error`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::HeadersTooLarge { .. } => "headers-too-large",
            ProxyError::Cookies(_) => "unreadable-cookies",
            ProxyError::SessionKey(_) => "bad-session-key",
            ProxyError::FingerprintDrift { .. } => "fingerprint-drift",
            ProxyError::Route(RouteError::Conflict(_)) => "pin-conflict",
            ProxyError::Route(RouteError::Retired(_)) | ProxyError::IdentityRetired { .. } => {
                "identity-retired"
            }
            ProxyError::Route(RouteError::NoExit) => "no-exit-available",
            ProxyError::Route(RouteError::ExitMissing { .. }) => "exit-missing",
            ProxyError::Route(RouteError::Store(_)) | ProxyError::Store(_) => "store-unavailable",
            ProxyError::Upstream { error, .. } => match error {
                UpstreamError::Connect(c) => match c {
                    ConnectError::ExitUnreachable { .. } => "exit-unreachable",
                    ConnectError::ExitRefused { .. } => "exit-refused",
                    ConnectError::ExitProtocol(_) => "exit-protocol",
                    ConnectError::Timeout { .. } if c.is_exit_fault() => "exit-timeout",
                    ConnectError::Timeout { .. } => "origin-timeout",
                    ConnectError::Resolve { .. } => "origin-dns",
                    ConnectError::OriginUnreachable { .. } => "origin-unreachable",
                    ConnectError::Tls { .. } => "upstream-tls",
                    ConnectError::BadTarget(_) => "bad-request",
                    ConnectError::ExitIpDrift { .. } => "exit-ip-drift",
                    ConnectError::ExitIpUnknown(_) => "exit-ip-unknown",
                    ConnectError::ExitSocks { .. } => "exit-refused",
                },
                UpstreamError::ResponseTimeout(_) => "origin-timeout",
                UpstreamError::Exchange { .. } => "origin-failed",
            },
        }
    }

    /// The status code of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Route(RouteError::Conflict(_)) | ProxyError::FingerprintDrift { .. } => {
                StatusCode::CONFLICT
            }
            ProxyError::Route(RouteError::NoExit) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream {
                error: UpstreamError::ResponseTimeout(_),
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
            _ => match self.fault() {
                Fault::Client => StatusCode::BAD_REQUEST,
                Fault::Exit | Fault::Origin => StatusCode::BAD_GATEWAY,
                Fault::Store => StatusCode::SERVICE_UNAVAILABLE,
                Fault::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// What the user can do about it.
    fn advice(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => {
                "Send absolute-form requests (GET http://host/path) or CONNECT host:port to pinproxy."
            }
            ProxyError::HeadersTooLarge { .. } => {
                "Send fewer or smaller headers, or raise limits.max_header_bytes."
            }
            ProxyError::Cookies(_) => "Send cookies as UTF-8 text.",
            ProxyError::SessionKey(_) => {
                "Name the session in X-Pinproxy-Session or as user name session-KEY, 1-256 visible ASCII characters."
            }
            ProxyError::FingerprintDrift { .. } => {
                "This identity was created by a client with another User-Agent / client hints / language \
                 or another TLS / HTTP/2 fingerprint. Use one identity per browser profile, or set \
                 identities.fingerprint_policy."
            }
            ProxyError::Route(RouteError::Conflict(_)) => {
                "These credentials were earned by different identities (exits) and cannot leave together. \
                 Drop the cookies of one identity from the client's jar (or use one jar per identity)."
            }
            ProxyError::Route(RouteError::Retired(_)) | ProxyError::IdentityRetired { .. } => {
                "This identity cannot continue on its exit and pinproxy will not move it to another. \
                 Drop its cookies and session key and start a new session."
            }
            ProxyError::Route(RouteError::NoExit) => "Every exit is dead; check the exits and retry later.",
            ProxyError::Route(RouteError::ExitMissing { .. }) => {
                "Configure the same exits on every replica, or drop the cookie from the client's jar."
            }
            ProxyError::Route(RouteError::Store(_)) | ProxyError::Store(_) => {
                "The pin store is unreachable; pinproxy will not route tracked cookies blindly. Retry later."
            }
            ProxyError::Upstream { .. } => match self.fault() {
                Fault::Exit => "Check the exit (is the proxy up, are its credentials right?); retry later.",
                _ => "The origin could not be reached through this exit; retry later.",
            },
        }
    }

    /// The answer sent to the client.
    pub fn to_response(&self) -> Response<Body> {
        let message = self.to_string();
        let header = header_value(&format!("{}: {}", self.code(), message));
        let text = format!("pinproxy: {message}\n{}\n", self.advice());
        let mut response = Response::new(body::full(text));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(X_PINPROXY_ERROR, header);
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
