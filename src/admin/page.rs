//! The live view on the admin listener:
//!
//! - `GET /`: one HTML page (`live.html`, compiled into the binary: no
//!   build step, no external asset) whose inline script polls `/summary`
//!   every two seconds and renders the exits (health, drain state,
//!   identities alive, request rate, creations and retirements) and the
//!   newest identities (exit, age, credentials as `name#hash`, last status).
//!   It is served with a strict Content-Security-Policy: nothing but its own
//!   inline script and style (pinned by hash) and requests to the admin
//!   listener itself.
//! - `GET /summary`: that compact JSON.
//!
//! Both read a listing snapshot of the store, shared with the
//! `pinproxy_identities_alive`, `pinproxy_store_pins` and
//! `pinproxy_store_identities` gauges and `/store`'s counts: it is retaken at most every
//! [`MIN_SNAPSHOT_AGE`], or every 20 times as long as the last listing
//! took (a large Redis store is not walked on every poll), on a blocking
//! thread. The snapshot keeps counts per exit and the newest identities,
//! not the listing.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;
use sha2::Digest as _;

use super::{Admin, ExitView};
use crate::body::{self, Body};
use crate::metrics::{ExitLabel, HeldState};
use crate::store::{Listing, PinStore as _, StoreError};

/// The page.
const PAGE: &str = include_str!("live.html");
/// A snapshot younger than this is reused.
pub const MIN_SNAPSHOT_AGE: Duration = Duration::from_secs(2);
/// How many of the newest identities the summary shows.
pub const NEWEST: usize = 50;

/// The store listing the live view and the alive gauge read, retaken when
/// stale.
#[derive(Debug, Default)]
pub struct Snapshots {
    /// The latest snapshot, written by the walk that took it: a request
    /// that stopped waiting for it (a scraper's timeout shorter than a
    /// walk of a large store) does not throw it away, so the next finds it
    /// (before, every scrape started a walk of its own and none finished
    /// in time, so the gauges went dark for good).
    latest: Arc<std::sync::Mutex<Option<Arc<Snapshot>>>>,
    /// Held while a walk is awaited: one at a time, the others then take
    /// its snapshot.
    taking: tokio::sync::Mutex<()>,
}

impl Snapshots {
    /// The latest snapshot, if it is fresh.
    fn fresh(&self) -> Option<Arc<Snapshot>> {
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        latest
            .as_ref()
            .filter(|snapshot| snapshot.fresh(Instant::now()))
            .cloned()
    }
}

/// What one listing of the store said.
#[derive(Debug)]
pub struct Snapshot {
    taken: Instant,
    took: Duration,
    /// Identities alive (not retired, not ending) per exit id.
    alive: HashMap<String, u64>,
    /// The newest identities that are not retired, newest first.
    newest: Vec<Listing>,
    /// What the store holds.
    held: Held,
}

/// What the store holds, counted from one listing: what its memory (and
/// Redis's) grows with. Every value an origin reissues for a cookie is one
/// more pin, kept for its identity's life and, once it retires, for
/// `identities.remember_retired`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Held {
    /// Pins of identities not retired.
    pub active_pins: u64,
    /// Pins of retired identities.
    pub retired_pins: u64,
    /// Identities not retired.
    pub active_identities: u64,
    /// Retired identities still remembered.
    pub retired_identities: u64,
}

impl Held {
    fn count(&mut self, listing: &Listing) {
        let pins = listing.pins.len() as u64;
        if listing.identity.retired.is_some() {
            self.retired_pins += pins;
            self.retired_identities += 1;
        } else {
            self.active_pins += pins;
            self.active_identities += 1;
        }
    }
}

impl Snapshot {
    fn fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.taken) < MIN_SNAPSHOT_AGE.max(self.took * 20)
    }
}

/// One exit in the summary.
#[derive(Debug, Serialize)]
struct ExitSummary {
    #[serde(flatten)]
    view: ExitView,
    identities_alive: u64,
    requests: u64,
    identities_created: u64,
    identities_retired: u64,
}

/// One identity in the summary.
#[derive(Debug, Serialize)]
struct IdentitySummary {
    identity: String,
    exit: String,
    state: String,
    reason: Option<String>,
    age_ms: u64,
    idle_ms: u64,
    requests: u64,
    credentials: Vec<String>,
    last_status: Option<u16>,
}

/// The summary the live page renders.
#[derive(Debug, Serialize)]
struct Summary {
    now_ms: u64,
    snapshot_age_ms: u64,
    store: &'static str,
    store_available: bool,
    identities_alive: u64,
    exits: Vec<ExitSummary>,
    identities: Vec<IdentitySummary>,
}

impl Admin {
    /// The current snapshot, retaken if stale.
    pub(super) async fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        if let Some(snapshot) = self.page.fresh() {
            return Ok(snapshot);
        }
        let _taking = self.page.taking.lock().await;
        // Taken meanwhile by the walk this one waited for.
        if let Some(snapshot) = self.page.fresh() {
            return Ok(snapshot);
        }
        let latest = self.page.latest.clone();
        let router = self.router.clone();
        let exits = self.exits.load();
        let runtime = tokio::runtime::Handle::current();
        let taken = Instant::now();
        let walk = move || {
            let listings = runtime.block_on(router.store().list())?;
            let now = router.clock().now_ms();
            let policies = router.policies();
            let mut alive: HashMap<String, u64> = HashMap::new();
            let mut live: Vec<Listing> = Vec::new();
            let mut held = Held::default();
            for listing in listings {
                held.count(&listing);
                let identity = &listing.identity;
                if identity.retired.is_some() {
                    continue;
                }
                if router.end_due(identity, &exits, &policies, now).is_none() {
                    *alive.entry(identity.exit.to_string()).or_default() += 1;
                }
                live.push(listing);
            }
            let newest = live.len().min(NEWEST);
            if newest > 0 {
                live.select_nth_unstable_by_key(newest - 1, |l| {
                    std::cmp::Reverse((l.identity.created_ms, l.identity.id))
                });
                live.truncate(newest);
            }
            live.sort_by_key(|l| std::cmp::Reverse((l.identity.created_ms, l.identity.id)));
            let snapshot = Arc::new(Snapshot {
                taken,
                took: taken.elapsed(),
                alive,
                newest: live,
                held,
            });
            *latest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(snapshot.clone());
            Ok::<_, StoreError>(snapshot)
        };
        self.walks
            .run(walk)
            .await
            .map_err(|e| StoreError::new(crate::store::StoreErrorKind::Closed, e))?
    }

    /// Sets `pinproxy_identities_alive` (every configured exit gets a
    /// value, 0 when it has none), `pinproxy_store_pins` and
    /// `pinproxy_store_identities` from the snapshot. A store that cannot
    /// be listed leaves the last values.
    pub(super) async fn refresh_store_gauges(&self) {
        let snapshot = match self.snapshot().await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the store for its gauges");
                return;
            }
        };
        let gauge = |count: u64| i64::try_from(count).unwrap_or(i64::MAX);
        for exit in self.exits.iter() {
            let id = exit.id().to_string();
            let alive = snapshot.alive.get(&id).copied().unwrap_or(0);
            self.metrics
                .identities_alive
                .get_or_create(&ExitLabel { exit: id })
                .set(gauge(alive));
        }
        let held = snapshot.held;
        for (state, pins, identities) in [
            ("active", held.active_pins, held.active_identities),
            ("retired", held.retired_pins, held.retired_identities),
        ] {
            let label = HeldState { state };
            self.metrics
                .store_pins
                .get_or_create(&label)
                .set(gauge(pins));
            self.metrics
                .store_identities
                .get_or_create(&label)
                .set(gauge(identities));
        }
    }

    /// What the store holds, from the snapshot (`None` when the store
    /// cannot be listed).
    pub(super) async fn held(&self) -> Option<Held> {
        self.snapshot().await.ok().map(|snapshot| snapshot.held)
    }

    /// `GET /summary`.
    pub(super) async fn summary(&self) -> Response<Body> {
        let snapshot = match self.snapshot().await {
            Ok(snapshot) => snapshot,
            Err(e) => return super::text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
        let now = self.router.clock().now_ms();
        let exits = self
            .exit_views()
            .into_iter()
            .map(|view| {
                let counts = self.metrics.exit(&crate::identity::ExitId::new(&view.id));
                let load =
                    |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
                ExitSummary {
                    identities_alive: snapshot.alive.get(&view.id).copied().unwrap_or(0),
                    requests: load(&counts.requests),
                    identities_created: load(&counts.created),
                    identities_retired: load(&counts.retired),
                    view,
                }
            })
            .collect();
        let identities = snapshot
            .newest
            .iter()
            .filter_map(|listing| {
                let last_status = self.metrics.last_status(listing.identity.id);
                Some((self.view(listing.clone(), now, false)?, last_status))
            })
            .map(|(view, last_status)| IdentitySummary {
                age_ms: now.saturating_sub(view.created_ms),
                idle_ms: now.saturating_sub(view.last_used_ms),
                credentials: view
                    .credentials
                    .iter()
                    .map(|c| format!("{}#{}", c.name, c.hash))
                    .collect(),
                last_status,
                identity: view.identity,
                exit: view.exit,
                state: view.state,
                reason: view.reason,
                requests: view.requests,
            })
            .collect();
        let store = self.router.store();
        super::json(&Summary {
            now_ms: now,
            snapshot_age_ms: u64::try_from(snapshot.taken.elapsed().as_millis())
                .unwrap_or(u64::MAX),
            store: store.kind(),
            store_available: store.available(),
            identities_alive: snapshot.alive.values().sum(),
            exits,
            identities,
        })
    }
}

/// `GET /`: the page, with headers that keep it to itself.
pub(super) fn page() -> Response<Body> {
    let mut response = Response::new(body::full(PAGE.to_owned()));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(policy) = HeaderValue::from_str(content_security_policy()) {
        headers.insert(http::header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// The page's policy: its inline script and style by hash, requests to the
/// admin listener only, nothing else.
pub fn content_security_policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash_of(inline(PAGE, "script")),
            hash_of(inline(PAGE, "style")),
        )
    })
}

/// The text of the first inline `<tag>` element of `html`.
fn inline<'a>(html: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    html.split_once(open.as_str())
        .and_then(|(_, rest)| rest.split_once(close.as_str()))
        .map_or("", |(text, _)| text)
}

/// A CSP source expression for `text`: `sha256-BASE64`.
fn hash_of(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_inline_script_and_style_pinned_by_hash() {
        assert!(!inline(PAGE, "script").is_empty());
        assert!(!inline(PAGE, "style").is_empty());
        assert_eq!(PAGE.matches("<script").count(), 1, "one inline script");
        assert!(!PAGE.contains("src="), "no external script or image");
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://"));
        let policy = content_security_policy();
        assert!(policy.contains("script-src 'sha256-"), "{policy}");
        assert!(policy.starts_with("default-src 'none'"), "{policy}");
    }
}
