//! The admin endpoint, on its own listener (loopback unless `allow_remote`):
//!
//! - `GET /`: the live page, and `GET /summary`, the JSON it polls
//!   ([`page`]);
//! - `GET /metrics`: Prometheus text;
//! - `GET /identities` (`?all=1` to include retired ones): JSON list of
//!   identities with exit, age, last use, request count and credentials
//!   (name and hash only), as `pinproxy pins` shows them;
//! - `GET /exits`: JSON list of exits and their health;
//! - `GET /store`: JSON: the pin store's kind, whether it answers, and the
//!   last data loss it was seen to suffer (Redis) with what was restored
//!   and quarantined;
//! - `GET /healthz`: `ok`;
//! - the operations routes ([`control`]): `POST /reload`,
//!   `POST /exits/ID/drain|undrain`, `DELETE /identities/ID`,
//!   `DELETE /pins/NAME%23HASH`, `GET /readyz`.

pub mod control;
pub mod page;
pub mod walks;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::exits::LiveExits;
use crate::metrics::{ExitLabel, Metrics};
use crate::net::tasks::ConnectionTasks;
use crate::routing::Router;
use crate::store::{Listing, PinStore as _, StoreError};

/// One identity, as listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityView {
    /// Identity id.
    pub identity: String,
    /// Its exit.
    pub exit: String,
    /// Its upstream session id.
    pub session: String,
    /// `active`, `ending` (will be retired on its next use) or `retired`.
    pub state: String,
    /// Why it is ending or retired.
    pub reason: Option<String>,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Last use (a request, or a WebSocket or passed-through tunnel that
    /// moved bytes), Unix ms.
    pub last_used_ms: u64,
    /// Requests sent.
    pub requests: u64,
    /// Egress address, where known.
    pub egress_ip: Option<String>,
    /// The JA4 of the client that founded it (its TLS fingerprint).
    #[serde(default)]
    pub client_ja4: Option<String>,
    /// The Akamai form of that client's HTTP/2 preface.
    #[serde(default)]
    pub client_http2: Option<String>,
    /// The JA4 its upstream connections were last seen to send (measured
    /// off the wire; unknown until it has made a connection since start).
    #[serde(default)]
    pub sent_ja4: Option<String>,
    /// Its credentials.
    pub credentials: Vec<CredentialView>,
}

/// One credential of an identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CredentialView {
    /// `cookie` or `session-key`.
    pub kind: String,
    /// Cookie name.
    pub name: String,
    /// Short hash of the value.
    pub hash: String,
    /// Cookie expiry, Unix ms.
    pub expires_ms: Option<u64>,
}

/// One exit, as listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExitView {
    /// Exit id.
    pub id: String,
    /// URL without credentials.
    pub url: String,
    /// `healthy`, `unhealthy` or `dead`.
    pub state: String,
    /// Drained by an operator (no new identities, no rotated traffic).
    #[serde(default)]
    pub drained: bool,
    /// Share of rotation and new identities.
    #[serde(default)]
    pub weight: u32,
    /// When it last died, Unix ms.
    pub died_at_ms: Option<u64>,
    /// Live connection pools (identities and anonymous sessions).
    pub lanes: u64,
}

/// The pin store, as listed.
#[derive(Clone, Debug, Serialize)]
pub struct StoreView {
    /// `memory`, `embedded` or `redis`.
    pub kind: &'static str,
    /// Whether it answers.
    pub available: bool,
    /// The last data loss this replica noticed (Redis only).
    pub loss: Option<crate::store::redis::LossReport>,
    /// What it holds, from the listing the live page shares (retaken as
    /// [`page::Snapshots`] says); `null` when it cannot be listed.
    pub held: Option<page::Held>,
}

/// What the admin endpoint reads.
#[derive(Debug)]
pub struct Admin {
    /// Identities.
    pub router: Arc<Router>,
    /// Exits (the set in force; a reload swaps it).
    pub exits: Arc<LiveExits>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Reload, drain and evict.
    pub control: control::Control,
    /// The listing snapshot the live page and the alive gauge read.
    pub page: page::Snapshots,
    /// Places for walks of the whole store (see [`walks`]).
    pub walks: walks::Walks,
}

/// Most admin connections open at once: a metrics scraper, the live page
/// and the command line need a few; past it a connection is closed at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Time an admin client has to send a request head (hyper's default, which
/// it applies only when given a timer).
const ADMIN_HEADER_READ: std::time::Duration = std::time::Duration::from_secs(30);

/// An admin connection's read buffer: its requests are small (hyper's
/// default, about 400 KiB, held for each connection).
const ADMIN_BUFFER: usize = 16 << 10;

/// Serves the admin endpoint until shutdown.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
    tasks: ConnectionTasks,
) {
    // On loopback (the default), only requests addressed to loopback are
    // answered; beyond it (`allow_remote`) any name may reach it.
    let loopback = listener
        .local_addr()
        .is_ok_and(|addr| addr.ip().is_loopback());
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Past the cap the connection is closed unread: its file
        // descriptor and buffers are the proxy's too.
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::debug!("admin connection refused: {MAX_ADMIN_CONNECTIONS} open");
            continue;
        };
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _place = place;
            let service = service_fn(move |request| {
                let admin = admin.clone();
                async move {
                    let refused = loopback.then(|| control::foreign_host(&request)).flatten();
                    Ok::<_, Infallible>(match refused {
                        Some(refused) => refused,
                        None => admin.handle(request).await,
                    })
                }
            });
            // hyper keeps no header timeout without a timer.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_READ)
                .max_buf_size(ADMIN_BUFFER)
                .serve_connection(TokioIo::new(stream), service);
            // A kept-alive admin client (a metrics scraper) must not hold
            // up a graceful stop: its connection ends after its request.
            let _ = crate::front::listener::drive(conn, &shutdown, |c| c.graceful_shutdown()).await;
        });
    }
}

impl Admin {
    async fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if let Some(response) = control::handle(self, &request).await {
            return response;
        }
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        let all = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "all=1"));
        match request.uri().path() {
            "/" => page::page(),
            "/summary" => self.summary().await,
            "/metrics" => text(StatusCode::OK, self.metrics_text().await),
            "/identities" => self.identities_answer(all).await,
            "/exits" => json(&self.exit_views()),
            "/store" => json(&self.store_view().await),
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            _ => text(
                StatusCode::NOT_FOUND,
                "try / (the live page), /summary, /metrics, /identities, /exits, /store, /healthz or /readyz\n".into(),
            ),
        }
    }

    async fn metrics_text(&self) -> String {
        self.refresh_store_gauges().await;
        let exits = self.exits.load();
        for exit in exits.iter() {
            self.metrics
                .exit_state
                .get_or_create(&ExitLabel {
                    exit: exit.id().to_string(),
                })
                .set(i64::from(exit.health.state().as_u8()));
        }
        self.metrics
            .keep_exit_gauges_of(exits.iter().map(|exit| exit.id().to_string()).collect());
        self.metrics.encode()
    }

    /// `GET /identities`: the listing, built and written out on the
    /// blocking pool (a store of a million identities takes seconds to
    /// walk, which no runtime thread serving the proxy should spend).
    async fn identities_answer(self: &Arc<Self>, all: bool) -> Response<Body> {
        let admin = self.clone();
        let runtime = tokio::runtime::Handle::current();
        let built = self
            .walks
            .run(move || {
                runtime
                    .block_on(admin.identities(all))
                    .map(|views| json(&views))
            })
            .await;
        match built {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }

    /// The identity listing (retired ones only with `all`).
    pub async fn identities(&self, all: bool) -> Result<Vec<IdentityView>, StoreError> {
        let now = self.router.clock().now_ms();
        let listings = self.router.store().list().await?;
        let mut views: Vec<IdentityView> = listings
            .into_iter()
            .filter_map(|listing| self.view(listing, now, all))
            .collect();
        views.sort_by_key(|v| std::cmp::Reverse(v.last_used_ms));
        Ok(views)
    }

    fn view(&self, listing: Listing, now: u64, all: bool) -> Option<IdentityView> {
        let Listing { identity, pins } = listing;
        let (state, reason) = match &identity.retired {
            Some(r) => ("retired", Some(r.reason.to_string())),
            None => match self.router.end_due(
                &identity,
                &self.exits.load(),
                &self.router.policies(),
                now,
            ) {
                Some(reason) => ("ending", Some(reason.to_string())),
                None => ("active", None),
            },
        };
        if state == "retired" && !all {
            return None;
        }
        Some(IdentityView {
            identity: identity.id.to_string(),
            exit: identity.exit.to_string(),
            session: identity.session.to_string(),
            state: state.to_owned(),
            reason,
            created_ms: identity.created_ms,
            last_used_ms: identity.last_used_ms,
            requests: identity.requests,
            egress_ip: identity.egress_ip.map(|ip| ip.to_string()),
            client_ja4: identity.fingerprint.ja4(),
            client_http2: identity.fingerprint.akamai(),
            sent_ja4: self.router.sent_ja4(identity.id).map(|j| j.to_string()),
            credentials: pins
                .into_iter()
                .map(|(key, pin)| CredentialView {
                    kind: match pin.kind {
                        crate::credential::PinKind::Cookie => "cookie".into(),
                        crate::credential::PinKind::SessionKey => "session-key".into(),
                    },
                    name: pin.name.to_string(),
                    hash: key.to_string(),
                    expires_ms: pin.expires_ms,
                })
                .collect(),
        })
    }

    async fn store_view(&self) -> StoreView {
        let store = self.router.store();
        StoreView {
            kind: store.kind(),
            available: store.available(),
            loss: store.loss_report(),
            held: self.held().await,
        }
    }

    fn exit_views(&self) -> Vec<ExitView> {
        self.exits
            .iter()
            .map(|exit| ExitView {
                id: exit.id().to_string(),
                url: exit.spec.redacted_url(),
                state: format!("{:?}", exit.health.state()).to_ascii_lowercase(),
                drained: exit.drained(),
                weight: exit.spec.options.weight,
                died_at_ms: exit.health.died_at_ms(),
                lanes: exit.client.lanes(),
            })
            .collect()
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            let mut response = Response::new(body::full(text));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => self::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
