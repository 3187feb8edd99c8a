//! The load generator: a fixed number of concurrent workers sending GETs
//! over TLS, directly or through an HTTP proxy with `CONNECT`, either on one
//! kept-alive connection per worker or on a new connection per request.
//! Bounded by a request count and a wall-clock limit; reports requests/s and
//! latency percentiles.
//!
//! Each worker first sends one untimed warm-up request (which also opens its
//! kept-alive connection), then all workers start the timed phase together.
//! Latency is measured per request from when it was due (see `rate`) or
//! started to when the whole body has arrived; with a new connection per
//! request it includes TCP, `CONNECT` and the full TLS handshake.
//!
//! Over HTTP/2, `streams` workers may share one kept-alive connection, each
//! with a request of its own in flight on it, as a browser multiplexes a
//! page's requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::Empty;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::{Barrier, Mutex};
use tokio::time::Instant;

use crate::client::{self, Sender, Target, Via};
use crate::stats::percentile;

/// Connection reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConnMode {
    /// One connection per worker, reused for every request.
    KeepAlive,
    /// A new connection (and TLS handshake) for every request.
    NewConn,
}

impl ConnMode {
    /// Short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            ConnMode::KeepAlive => "keep-alive",
            ConnMode::NewConn => "new conn",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Direct or through a proxy.
    pub via: Via,
    /// The origin.
    pub target: Target,
    /// Path requested.
    pub path: String,
    /// Concurrent workers.
    pub concurrency: usize,
    /// Connection reuse.
    pub mode: ConnMode,
    /// Most timed requests in total.
    pub max_requests: u64,
    /// Wall-clock limit of the timed phase.
    pub max_duration: Duration,
    /// Limit for each request (and for each warm-up request).
    pub request_timeout: Duration,
    /// Send tracked cookies: each worker gets its own `datadome` and
    /// `cf_clearance` values, prefixed with this tag (plus an untracked cookie).
    pub cookie_tag: Option<String>,
    /// With `cookie_tag`: the same header with each tracked name one letter
    /// off (`datadomx`, `cf_clearancx`), so that no name is tracked and the
    /// proxy carries the same bytes without pinning anything.
    pub untracked_cookies: bool,
    /// With `cookie_tag`: the header also carries a browser's untracked
    /// cookies ([`BROWSER_COOKIES`]: 20 pairs in all, about 700 bytes).
    pub browser_cookies: bool,
    /// With `cookie_tag`: each pair in a `Cookie` field of its own (cookie
    /// crumbs), as a browser sends its cookies over HTTP/2 (RFC 9113,
    /// 8.2.3), instead of one header.
    pub cookie_crumbs: bool,
    /// Each client connection's `CONNECT` names a session key of its own,
    /// prefixed with this tag (`X-Pinproxy-Session`), which every request
    /// inside carries.
    pub session_tag: Option<String>,
    /// Total request rate to pace the workers at (open loop: a request sent
    /// late because earlier ones were slow is timed from when it was due);
    /// `None` sends as fast as possible.
    pub rate: Option<f64>,
    /// Expected body length; any other length counts as an error.
    pub expect_body: Option<usize>,
    /// Workers per connection (keep-alive over HTTP/2 only; 1: a connection
    /// each). Worker `id` uses connection `id / streams`.
    pub streams: usize,
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Timed requests that succeeded.
    pub ok: u64,
    /// Timed requests that failed (status, I/O, timeout, wrong body).
    pub errors: u64,
    /// Warm-up requests that succeeded.
    pub warmup_ok: u64,
    /// Length of the timed phase, in seconds.
    pub elapsed_s: f64,
    /// Successful requests per second.
    pub rps: f64,
    /// Median latency, microseconds.
    pub p50_us: u32,
    /// 90th percentile latency, microseconds.
    pub p90_us: u32,
    /// 99th percentile latency, microseconds.
    pub p99_us: u32,
    /// Largest latency, microseconds.
    pub max_us: u32,
    /// The first error seen, for diagnosis.
    pub first_error: Option<String>,
    /// Connections opened during the timed phase: one per request with a
    /// new connection per request; with keep-alive, those reopened after an
    /// error or after a response that said `Connection: close`.
    #[serde(default)]
    pub connections: u64,
}

struct Shared {
    barrier: Barrier,
    issued: AtomicU64,
    start: OnceLock<Instant>,
    /// The connections workers share (`streams` > 1), opened by the first
    /// worker of each group that needs one.
    connections: Vec<Mutex<Option<Sender>>>,
}

#[derive(Default)]
struct WorkerOut {
    latencies_us: Vec<u32>,
    connections: u64,
    errors: u64,
    warmup_ok: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

/// Runs the load described by `spec`.
pub async fn run(spec: LoadSpec, tls: Arc<ClientConfig>) -> Result<LoadResult> {
    let spec = Arc::new(spec);
    anyhow::ensure!(
        spec.streams <= 1 || spec.mode == ConnMode::KeepAlive,
        "streams share kept-alive connections: use --mode keep-alive"
    );
    let groups = if spec.streams > 1 {
        spec.concurrency.div_ceil(spec.streams)
    } else {
        0
    };
    let shared = Arc::new(Shared {
        barrier: Barrier::new(spec.concurrency),
        issued: AtomicU64::new(0),
        start: OnceLock::new(),
        connections: (0..groups).map(|_| Mutex::new(None)).collect(),
    });
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for id in 0..spec.concurrency {
        let request = worker_request(&spec, id)?;
        tasks.push(tokio::spawn(worker(
            id,
            spec.clone(),
            shared.clone(),
            tls.clone(),
            request,
        )));
    }
    let mut outs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outs.push(task.await?);
    }
    let start = shared.start.get().copied().unwrap_or_else(Instant::now);
    let end = outs
        .iter()
        .filter_map(|o| o.last_done)
        .max()
        .unwrap_or(start);
    let mut latencies: Vec<u32> = outs
        .iter()
        .flat_map(|o| o.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let ok = latencies.len() as u64;
    let elapsed_s = end.saturating_duration_since(start).as_secs_f64();
    Ok(LoadResult {
        ok,
        errors: outs.iter().map(|o| o.errors).sum(),
        warmup_ok: outs.iter().map(|o| o.warmup_ok).sum(),
        elapsed_s,
        rps: if elapsed_s > 0.0 {
            ok as f64 / elapsed_s
        } else {
            0.0
        },
        p50_us: percentile(&latencies, 0.50),
        p90_us: percentile(&latencies, 0.90),
        p99_us: percentile(&latencies, 0.99),
        max_us: latencies.last().copied().unwrap_or(0),
        connections: outs.iter().map(|o| o.connections).sum(),
        first_error: outs.into_iter().find_map(|o| o.first_error),
    })
}

/// What else a browser's `Cookie` header carries beside the anti-bot
/// cookies and `_ga`: analytics, consent and preference cookies nobody
/// tracks (17 pairs).
pub const BROWSER_COOKIES: [&str; 17] = [
    "_gid=GA1.2.987654321.1700000000",
    "_gcl_au=1.1.123456789.1700000000",
    "_fbp=fb.1.1700000000000.123456789",
    "_hjSessionUser_123456=eyJpZCI6IjEyMyIsImNyZWF0ZWQiOjE3MDAwMDAwMDB9",
    "_hjSession_123456=eyJpZCI6IjQ1NiJ9",
    "OptanonConsent=isGpcEnabled=0&datestamp=Mon+Nov+30+2026&version=202310.1.0",
    "OptanonAlertBoxClosed=2026-11-30T10:00:00.000Z",
    "_uetsid=0a1b2c3d4e5f11ee",
    "_uetvid=6a7b8c9d0e1f11ee",
    "ajs_anonymous_id=3f2504e0-4f89-11d3-9a0c-0305e82c3301",
    "theme=dark",
    "lang=en-GB",
    "currency=EUR",
    "cart_id=c0ffee1234",
    "_clck=1abcde2|2|fh1|0|1400",
    "_clsk=xyz123|1700000000000|1|1|q.clarity.ms/collect",
    "AMP_TOKEN=%24NOT_FOUND",
];

/// The request worker `id` sends, every time.
fn worker_request(spec: &LoadSpec, id: usize) -> Result<Request<Empty<Bytes>>> {
    let mut extra = Vec::new();
    if let Some(tag) = &spec.cookie_tag {
        // Values look like real tokens; they are unique per worker and run,
        // so each worker's first request pins them and the rest look them up.
        let (datadome, cf_clearance) = if spec.untracked_cookies {
            ("datadomx", "cf_clearancx")
        } else {
            ("datadome", "cf_clearance")
        };
        let mut cookie = format!(
            "{datadome}={tag}w{id:04}Qm9vc3RlZFRva2VuVmFsdWU; {cf_clearance}={tag}w{id:04}.aGVsbG8-1700000000-1.2.1.1; _ga=GA1.1.1234567890.1700000000"
        );
        if spec.browser_cookies {
            for pair in BROWSER_COOKIES {
                cookie.push_str("; ");
                cookie.push_str(pair);
            }
        }
        if spec.cookie_crumbs {
            for pair in cookie.split("; ") {
                extra.push(("cookie", HeaderValue::from_str(pair)?));
            }
        } else {
            extra.push(("cookie", HeaderValue::from_str(&cookie)?));
        }
    }
    client::get_request(&spec.target, &spec.path, &extra)
}

async fn worker(
    id: usize,
    spec: Arc<LoadSpec>,
    shared: Arc<Shared>,
    tls: Arc<ClientConfig>,
    request: Request<Empty<Bytes>>,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut conn: Option<Sender> = None;

    let group_id = id / spec.streams.max(1);
    let group = shared.connections.get(group_id);
    let session = spec
        .session_tag
        .as_ref()
        .map(|tag| format!("{tag}w{group_id:04}"));
    let session = session.as_deref();
    let warm = tokio::time::timeout(
        spec.request_timeout,
        one(&spec, &tls, group, session, &mut conn, &request),
    )
    .await;
    match warm {
        Ok(Ok(())) => out.warmup_ok += 1,
        _ => conn = None,
    }
    if spec.mode == ConnMode::NewConn {
        conn = None;
    }
    shared.barrier.wait().await;

    let start = *shared.start.get_or_init(Instant::now);
    let deadline = start + spec.max_duration;
    let interval = spec
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| spec.concurrency as f64 / r);
    let offset = spec.rate.filter(|r| *r > 0.0).map(|r| id as f64 / r);
    let mut k: u64 = 0;
    loop {
        // When paced and on schedule, sleep until the request is due and
        // time it from when it is sent (the timer wakes up to 1 ms late);
        // when behind schedule because earlier requests were slow, time it
        // from when it was due, so the backlog counts (no coordinated omission).
        let due = match (interval, offset) {
            (Some(interval), Some(offset)) => {
                let due = start + Duration::from_secs_f64(offset + k as f64 * interval);
                if due >= deadline {
                    break;
                }
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                    None
                } else {
                    Some(due)
                }
            }
            _ => None,
        };
        if Instant::now() >= deadline
            || shared.issued.fetch_add(1, Ordering::Relaxed) >= spec.max_requests
        {
            break;
        }
        let began = due.unwrap_or_else(Instant::now);
        if conn.is_none() {
            out.connections += 1;
        }
        let result = tokio::time::timeout(
            spec.request_timeout,
            one(&spec, &tls, group, session, &mut conn, &request),
        )
        .await;
        let done = Instant::now();
        match result {
            Ok(Ok(())) => {
                let us = done.saturating_duration_since(began).as_micros();
                out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Ok(Err(e)) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
                conn = None;
            }
            Err(_) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| "request timed out".to_owned());
                conn = None;
            }
        }
        if spec.mode == ConnMode::NewConn {
            conn = None;
        }
        out.last_done = Some(done);
        k += 1;
    }
    out
}

/// One request on the worker's connection, opening it first when needed
/// (or taking its group's shared one).
async fn one(
    spec: &LoadSpec,
    tls: &Arc<ClientConfig>,
    group: Option<&Mutex<Option<Sender>>>,
    session: Option<&str>,
    conn: &mut Option<Sender>,
    request: &Request<Empty<Bytes>>,
) -> Result<()> {
    let sender = match conn {
        Some(sender) => sender,
        None => conn.insert(connect(spec, tls, group, session).await?),
    };
    let fetched = client::fetch_reusable(sender, client::clone_request(request)).await;
    let (len, reusable) = match fetched {
        Ok(answer) => answer,
        Err(e) => {
            // The next worker of the group opens a fresh connection.
            if let Some(group) = group {
                *group.lock().await = None;
            }
            return Err(e);
        }
    };
    if !reusable {
        *conn = None;
    }
    if let Some(expected) = spec.expect_body {
        anyhow::ensure!(len == expected, "body of {len} bytes, expected {expected}");
    }
    Ok(())
}

/// A connection for a worker: its own, or a handle on its group's, which
/// the first worker to need it opens.
async fn connect(
    spec: &LoadSpec,
    tls: &Arc<ClientConfig>,
    group: Option<&Mutex<Option<Sender>>>,
    session: Option<&str>,
) -> Result<Sender> {
    let Some(group) = group else {
        return client::open(spec.via, &spec.target, tls.clone(), session).await;
    };
    let mut slot = group.lock().await;
    if let Some(shared) = slot.as_ref().and_then(Sender::share) {
        return Ok(shared);
    }
    let opened = client::open(spec.via, &spec.target, tls.clone(), session).await?;
    let handle = opened
        .share()
        .ok_or_else(|| anyhow::anyhow!("--streams needs HTTP/2, and the connection is HTTP/1.1"))?;
    *slot = Some(opened);
    Ok(handle)
}
