//! The pin filler: makes a proxy create pins by sending requests whose
//! tracked cookies it has never seen.
//!
//! Each request carries `per_request` tracked cookies (cycling through the
//! built-in tracked names, several values per name) with values unique
//! across the run, so every cookie becomes one new pin; workers keep their
//! connections alive.
//!
//! pinproxy groups the pins of one client session into an *identity*. A
//! request whose tracked cookies are all new starts a new identity (with its
//! own upstream connection); one that also carries an already pinned cookie
//! adds the new pins to that cookie's identity. With `anchor`, every request
//! of a worker also carries that worker's own anchor cookie, so all its pins
//! join one identity and the fill measures the pins alone; without it, every
//! request makes a new identity (with `fresh_clients`, each from a client of
//! its own: a new connection and a `User-Agent` of its own, so a fingerprint
//! of its own). Driven over stdin/stdout like the tunnel holder:
//! `fill N` creates at least N more pins and prints one JSON line (`warm R`:
//! every worker sends R requests without new cookies, see [`warm`]); end of
//! input exits. Cookie values are never printed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use http::HeaderValue;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Sender, Target, Via};

/// Exact cookie names pinproxy tracks by default; the filler cycles through them.
pub const TRACKED_NAMES: &[&str] = &[
    "datadome",
    "cf_clearance",
    "__cf_bm",
    "_abck",
    "bm_sz",
    "ak_bmsc",
    "reese84",
    "KP_UIDz",
];

/// How to fill.
#[derive(Debug, Clone)]
pub struct PinSpec {
    /// The proxy.
    pub via: Via,
    /// The origin.
    pub target: Target,
    /// Path requested.
    pub path: String,
    /// Kept-alive connections working at once.
    pub concurrency: usize,
    /// New tracked cookies per request.
    pub per_request: usize,
    /// Longest time one `fill` may take.
    pub fill_limit: Duration,
    /// Prefix making values unique to this run.
    pub tag: String,
    /// Send each worker's anchor cookie along, so its pins join one identity.
    pub anchor: bool,
    /// Each request from a client of its own: a new connection, and a
    /// `User-Agent` of its own (numbered as its first cookie), so the
    /// identities it founds differ in fingerprint as a fleet's new browser
    /// profiles do.
    pub fresh_clients: bool,
}

/// The outcome of one `fill`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FillReport {
    /// Pins created by this fill (cookies in successful requests).
    pub pins: u64,
    /// Pins created since the filler started.
    pub total_pins: u64,
    /// Successful requests.
    pub requests: u64,
    /// Failed requests.
    pub failed: u64,
    /// How long the fill took, in seconds.
    pub secs: f64,
    /// The first failure, for diagnosis.
    pub first_error: Option<String>,
}

/// Runs the filler until end of input.
pub async fn run(spec: PinSpec, tls: Arc<ClientConfig>) -> Result<()> {
    let spec = Arc::new(spec);
    let sequence = Arc::new(AtomicU64::new(0));
    let mut senders: Vec<Option<Sender>> = (0..spec.concurrency).map(|_| None).collect();
    let mut total_pins = 0;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        let number = |prefix: &str| {
            line.strip_prefix(prefix)
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        let report = if let Some(n) = number("fill ") {
            fill(&spec, &tls, &sequence, &mut senders, n, &mut total_pins).await?
        } else if let Some(rounds) = number("warm ") {
            warm(&spec, &tls, &mut senders, rounds, total_pins).await?
        } else {
            continue;
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// `warm R`: every worker sends `rounds` requests carrying no new cookie
/// (only its anchor, with `anchor`), so its connection, its identity and
/// that identity's upstream connection exist before a baseline is taken,
/// with one pin per worker at most. Reports `pins: 0`.
async fn warm(
    spec: &Arc<PinSpec>,
    tls: &Arc<ClientConfig>,
    senders: &mut [Option<Sender>],
    rounds: u64,
    total_pins: u64,
) -> Result<FillReport> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, slot) in senders.iter_mut().enumerate() {
        let mut conn = slot.take();
        let (spec, tls) = (spec.clone(), tls.clone());
        set.spawn(async move {
            let mut tally = Tally::default();
            for _ in 0..rounds {
                tally.send(&spec, &tls, &mut conn, i, 0, 0).await;
            }
            (i, conn, tally)
        });
    }
    let tally = Tally::join(set, senders).await?;
    Ok(FillReport {
        pins: 0,
        total_pins,
        requests: tally.ok,
        failed: tally.failed,
        secs: started.elapsed().as_secs_f64(),
        first_error: tally.first_error,
    })
}

/// The requests of one worker (or, joined, of all): succeeded, failed, and
/// the first failure.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Tally {
    /// Sends one request of `per` new cookies numbered from `first`
    /// (bounded by 20 s) and counts it; a failure drops the connection, so
    /// the next request opens a new one.
    async fn send(
        &mut self,
        spec: &PinSpec,
        tls: &Arc<ClientConfig>,
        conn: &mut Option<Sender>,
        worker: usize,
        first: u64,
        per: u64,
    ) {
        let error = match tokio::time::timeout(
            Duration::from_secs(20),
            one(spec, tls, conn, worker, first, per),
        )
        .await
        {
            Ok(Ok(())) => {
                self.ok += 1;
                return;
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "request timed out".to_owned(),
        };
        self.failed += 1;
        self.first_error.get_or_insert(error);
        *conn = None;
    }

    /// Waits for every worker, puts its connection back in its slot and
    /// adds up their tallies.
    async fn join(
        mut set: JoinSet<(usize, Option<Sender>, Tally)>,
        senders: &mut [Option<Sender>],
    ) -> Result<Tally> {
        let mut all = Tally::default();
        while let Some(joined) = set.join_next().await {
            let (i, conn, tally) = joined?;
            if let Some(slot) = senders.get_mut(i) {
                *slot = conn;
            }
            all.ok += tally.ok;
            all.failed += tally.failed;
            if all.first_error.is_none() {
                all.first_error = tally.first_error;
            }
        }
        Ok(all)
    }
}

async fn fill(
    spec: &Arc<PinSpec>,
    tls: &Arc<ClientConfig>,
    sequence: &Arc<AtomicU64>,
    senders: &mut [Option<Sender>],
    n: u64,
    total_pins: &mut u64,
) -> Result<FillReport> {
    let started = Instant::now();
    let deadline = started + spec.fill_limit;
    let per = spec.per_request.max(1) as u64;
    let requests_needed = n.div_ceil(per);
    let issued = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for (i, slot) in senders.iter_mut().enumerate() {
        let conn = slot.take();
        let (spec, tls, sequence, issued) =
            (spec.clone(), tls.clone(), sequence.clone(), issued.clone());
        set.spawn(async move {
            let mut conn = conn;
            let mut tally = Tally::default();
            while Instant::now() < deadline
                && issued.fetch_add(1, Ordering::Relaxed) < requests_needed
            {
                let first = sequence.fetch_add(per, Ordering::Relaxed);
                tally.send(&spec, &tls, &mut conn, i, first, per).await;
            }
            (i, conn, tally)
        });
    }
    let tally = Tally::join(set, senders).await?;
    let pins = tally.ok * per;
    *total_pins += pins;
    Ok(FillReport {
        pins,
        total_pins: *total_pins,
        requests: tally.ok,
        failed: tally.failed,
        secs: started.elapsed().as_secs_f64(),
        first_error: tally.first_error,
    })
}

/// One request from `worker` carrying `per` new cookies numbered from `first`.
async fn one(
    spec: &PinSpec,
    tls: &Arc<ClientConfig>,
    conn: &mut Option<Sender>,
    worker: usize,
    first: u64,
    per: u64,
) -> Result<()> {
    let mut cookie = String::with_capacity(per as usize * 40 + 40);
    if spec.anchor {
        cookie.push_str(&format!("datadome={}anchor{worker:04}", spec.tag));
    }
    for seq in first..first + per {
        if !cookie.is_empty() {
            cookie.push_str("; ");
        }
        let name = TRACKED_NAMES[(seq % TRACKED_NAMES.len() as u64) as usize];
        cookie.push_str(&format!("{name}={}{seq:012x}", spec.tag));
    }
    let mut request = client::get_request(
        &spec.target,
        &spec.path,
        &[("cookie", HeaderValue::from_str(&cookie)?)],
    )?;
    if spec.fresh_clients {
        let agent = format!("pinbench/0 (client {}{first:012x})", spec.tag);
        request
            .headers_mut()
            .insert(http::header::USER_AGENT, HeaderValue::from_str(&agent)?);
    }
    let sender = match conn {
        Some(sender) => sender,
        None => conn.insert(client::open(spec.via, &spec.target, tls.clone(), None).await?),
    };
    let len = client::fetch(sender, request).await?;
    if spec.fresh_clients {
        // The next request is another client's.
        *conn = None;
    }
    if len == 0 {
        bail!("empty body");
    }
    Ok(())
}
