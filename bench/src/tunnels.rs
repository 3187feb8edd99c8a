//! The idle-tunnel holder: opens N `CONNECT` + TLS tunnels through a proxy,
//! keeps them open and idle, and on command sends one request in each.
//!
//! It is driven over stdin/stdout so the orchestrator can measure the proxy
//! between steps: after opening it prints one JSON line (`opened`), then
//! reads commands, one per line: `request` sends one GET in every tunnel
//! (then prints `requested`), `close` or end of input closes everything and
//! exits. It exits by itself after `hold` in any case.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rustls::ClientConfig;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Sender, Target, Via};

/// What to hold.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    /// The proxy.
    pub via: Via,
    /// The origin the tunnels are for.
    pub target: Target,
    /// Path for the one request per tunnel.
    pub path: String,
    /// Tunnels to open.
    pub count: usize,
    /// Tunnels being opened (or requests sent) at once.
    pub parallel: usize,
    /// Longest time to hold the tunnels.
    pub hold: Duration,
}

/// One step's outcome, printed as a JSON line.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StepReport {
    /// `opened`, `requested` or `closed`.
    pub event: String,
    /// Tunnels (or requests) that succeeded.
    pub ok: u64,
    /// Ones that failed.
    pub failed: u64,
    /// How long the step took, in seconds.
    pub secs: f64,
    /// The first failure, for diagnosis.
    pub first_error: Option<String>,
}

fn emit(report: &StepReport) -> Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

/// Runs the holder until `close`, end of input or `spec.hold`.
pub async fn run(spec: TunnelSpec, tls: Arc<ClientConfig>) -> Result<()> {
    let deadline = Instant::now() + spec.hold;
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(spec.parallel.max(1)));
    let mut opening = JoinSet::new();
    for _ in 0..spec.count {
        let permit = gate.clone().acquire_owned().await?;
        let target = spec.target.clone();
        let tls = tls.clone();
        let via = spec.via;
        opening.spawn(async move {
            let result = tokio::time::timeout(
                Duration::from_secs(20),
                client::open(via, &target, tls, None),
            )
            .await;
            drop(permit);
            match result {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("opening the tunnel timed out")),
            }
        });
    }
    let mut senders: Vec<Sender> = Vec::with_capacity(spec.count);
    let mut failed = 0;
    let mut first_error = None;
    while let Some(joined) = opening.join_next().await {
        match joined? {
            Ok(sender) => senders.push(sender),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    emit(&StepReport {
        event: "opened".into(),
        ok: senders.len() as u64,
        failed,
        secs: started.elapsed().as_secs_f64(),
        first_error,
    })?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            _ => break,
        };
        match line.trim() {
            "request" => {
                let report = request_all(&spec, &mut senders).await?;
                emit(&report)?;
            }
            "close" => break,
            _ => {}
        }
    }
    drop(senders);
    emit(&StepReport {
        event: "closed".into(),
        ok: 0,
        failed: 0,
        secs: 0.0,
        first_error: None,
    })?;
    Ok(())
}

/// One GET in every tunnel, `spec.parallel` at a time; the senders come back
/// so the tunnels stay open.
async fn request_all(spec: &TunnelSpec, senders: &mut Vec<Sender>) -> Result<StepReport> {
    let started = Instant::now();
    let request = client::get_request(&spec.target, &spec.path, &[])?;
    let gate = Arc::new(Semaphore::new(spec.parallel.max(1)));
    let mut set = JoinSet::new();
    for mut sender in senders.drain(..) {
        let permit = gate.clone().acquire_owned().await?;
        let request = client::clone_request(&request);
        set.spawn(async move {
            let result =
                tokio::time::timeout(Duration::from_secs(20), client::fetch(&mut sender, request))
                    .await;
            drop(permit);
            let result = match result {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(anyhow::anyhow!("request timed out")),
            };
            (sender, result)
        });
    }
    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    while let Some(joined) = set.join_next().await {
        let (sender, result) = joined?;
        match result {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        senders.push(sender);
    }
    Ok(StepReport {
        event: "requested".into(),
        ok,
        failed,
        secs: started.elapsed().as_secs_f64(),
        first_error,
    })
}
