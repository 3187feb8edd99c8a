//! The end of the spine: what one request did, counted in the metrics and
//! written as one access line (target `pinproxy::access`, level info).
//!
//! The stages fill an [`Access`] as they learn things (site, exit,
//! identity, credentials, pin decision, upstream timings);
//! [`Access::finish`] runs once, when the answer's head is ready. The line
//! holds the exit id, the identity id, the *names* of the tracked
//! credentials, the pin decision, the status (or pinproxy's error code) and
//! timings. Never a cookie value, a credential, a path or a query: the
//! origin appears as host and port.
//!
//! Cost: no allocation unless the access line is enabled (then the copy
//! handed to the log writer thread; the line is formatted directly, see
//! [`crate::telemetry::access_line`]); a disabled line is one cached
//! callsite check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;

use super::ProxyError;
use crate::credential::Credential;
use crate::identity::IdentityId;
use crate::metrics::{
    status_class, ExitInstruments, LabelValue, Metrics, UpstreamTimings, CLIENT_GONE, DECISIONS,
};
use crate::net::HostPort;
use crate::routing::{Reason, RouteError};
use crate::telemetry::{access_line, AccessLine};

/// How routing decided a request's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Its credentials belong to a live identity.
    Hit,
    /// Its credentials founded a new identity.
    New,
    /// No live credential: weighted rotation.
    Rotated,
    /// Credentials of several identities (refused, or the oldest kept).
    Conflict,
    /// Credentials of a retired identity (refused).
    Retired,
}

impl Decision {
    /// Its position in [`DECISIONS`] (the metrics' counter table).
    fn slot(self) -> usize {
        match self {
            Decision::Hit => 0,
            Decision::New => 1,
            Decision::Rotated => 2,
            Decision::Conflict => 3,
            Decision::Retired => 4,
        }
    }

    /// The label in metrics and logs.
    pub fn label(self) -> &'static str {
        DECISIONS[self.slot()]
    }

    /// The decision a route records.
    pub fn of(reason: Reason) -> Decision {
        match reason {
            Reason::Pinned => Decision::Hit,
            Reason::NewIdentity => Decision::New,
            Reason::Rotated => Decision::Rotated,
        }
    }

    /// The decision an error implies, if it is a routing one.
    fn of_error(error: &ProxyError) -> Option<Decision> {
        match error {
            ProxyError::Route(RouteError::Conflict(_)) => Some(Decision::Conflict),
            ProxyError::Route(RouteError::Retired(_)) | ProxyError::IdentityRetired { .. } => {
                Some(Decision::Retired)
            }
            _ => None,
        }
    }
}

/// What one request did, filled by the stages.
#[derive(Debug)]
pub struct Access {
    started: Instant,
    method: Method,
    /// The origin (host and port), kept only while the access line is on.
    pub origin: Option<HostPort>,
    /// The site label of the origin.
    pub site: Option<LabelValue>,
    /// The exit the request was routed to.
    pub exit: Option<Arc<ExitInstruments>>,
    /// Its identity (routed, or founded by the response).
    pub identity: Option<IdentityId>,
    /// Its tracked credentials (names are logged, never values).
    pub credentials: Vec<Credential>,
    /// How routing decided.
    pub decision: Option<Decision>,
    /// Upstream timings, where known.
    pub timings: UpstreamTimings,
    /// Whether access lines were on when the request arrived: asked once,
    /// because asking the subscriber costs a couple of hundred
    /// instructions, and a request's line is written or not as a whole.
    logging: bool,
}

impl Access {
    /// A request starting now.
    pub fn start(method: &Method) -> Access {
        Access {
            started: Instant::now(),
            method: method.clone(),
            origin: None,
            site: None,
            exit: None,
            identity: None,
            credentials: Vec::new(),
            decision: None,
            timings: UpstreamTimings::default(),
            logging: access_line::enabled(),
        }
    }

    /// Whether this request's access line is written (the origin is kept
    /// only then).
    pub fn logging(&self) -> bool {
        self.logging
    }

    /// Counts the request and writes its access line: `answer` is the
    /// origin's status, or pinproxy's error.
    pub fn finish(&mut self, metrics: &Metrics, answer: Result<http::StatusCode, &ProxyError>) {
        let (status, class, error) = match answer {
            Ok(status) => (status, status_class(status), None),
            Err(error) => {
                if self.decision.is_none() {
                    self.decision = Decision::of_error(error);
                }
                (
                    error.status(),
                    crate::metrics::PINPROXY_ERROR,
                    Some(error.code()),
                )
            }
        };
        self.write(metrics, status, class, error);
    }

    /// Counts and writes the line of a request whose client left before
    /// its answer's head was ready: status 499 (nginx's "client closed
    /// request"), error and status class [`CLIENT_GONE`]. Without it a
    /// request the client gave up on (a timeout of its own, a closed tab)
    /// would leave no trace but the origin's. Its identity keeps the last
    /// status an answer had (a challenge's `403` stays in view).
    pub fn client_gone(&mut self, metrics: &Metrics) {
        metrics.request(CLIENT_GONE);
        self.write(
            metrics,
            // nginx's "client closed request" (a valid status code).
            http::StatusCode::from_u16(499).unwrap_or(http::StatusCode::BAD_REQUEST),
            CLIENT_GONE,
            Some(CLIENT_GONE),
        );
    }

    fn write(
        &mut self,
        metrics: &Metrics,
        status: http::StatusCode,
        class: &'static str,
        error: Option<&str>,
    ) {
        let exit = self.exit.as_deref();
        metrics.exit_request(exit, self.site.as_ref(), class);
        if let Some(decision) = self.decision {
            metrics.pin_decision(exit, decision.slot());
        }
        if let Some(exit) = exit {
            metrics.upstream(exit, &self.timings);
        }
        if let Some(identity) = self.identity.filter(|_| class != CLIENT_GONE) {
            metrics.note_status(identity, status.as_u16());
        }
        if !self.logging {
            return;
        }
        // Microseconds, printed as milliseconds; counted without the
        // 128-bit arithmetic of `Duration::as_micros`.
        let micros = |d: Duration| {
            d.as_secs()
                .saturating_mul(1_000_000)
                .saturating_add(u64::from(d.subsec_micros()))
        };
        AccessLine {
            method: &self.method,
            origin: self.origin.as_ref(),
            site: self.site.as_ref().map(|s| s.as_str()),
            exit: exit.map(|e| e.exit.as_str()),
            identity: self.identity,
            credentials: &self.credentials,
            decision: self.decision.map(Decision::label),
            status: status.as_u16(),
            error,
            total_us: micros(self.started.elapsed()),
            connect_us: self.timings.connect.map(micros),
            tls_us: self.timings.tls.map(micros),
            ttfb_us: self.timings.ttfb.map(micros),
        }
        .write();
    }
}
