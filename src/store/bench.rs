//! `pinproxy store bench`: how fast a store takes new pins, measured with
//! synthetic identities against the store the configuration names.
//!
//! Concurrent workers each found identities and give every identity a few
//! pins through [`PinStore::pin_if_absent`], the operation a request with a
//! never-seen cookie waits on (for the embedded store that includes the
//! durable commit, shared between concurrent writers). Each call is timed on
//! its own; the report gives the rate and the latency distribution.
//!
//! It writes real records, so it refuses a store that holds anything: point
//! it at a scratch data directory or a scratch Redis database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{PinStore, Store, StoreError, StoreErrorKind};
use crate::credential::PinKey;
use crate::credential::PinKind;
use crate::fingerprint::Fingerprint;
use crate::identity::{ExitId, Identity, Pin, SessionId};

/// Most pins one run may write (keeps a mistyped count from filling a disk).
pub const MAX_PINS: u64 = 10_000_000;
/// Most concurrent workers.
pub const MAX_CONCURRENCY: usize = 4096;
/// Pins each synthetic identity gets (a session typically earns a few
/// tracked cookies).
const PINS_PER_IDENTITY: u64 = 4;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Pins to write in total.
    pub pins: u64,
    /// Concurrent workers.
    pub concurrency: usize,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Pins written.
    pub pins: u64,
    /// Concurrent workers.
    pub concurrency: usize,
    /// Wall time of the run, seconds.
    pub secs: f64,
    /// Pins written per second.
    pub pins_per_sec: f64,
    /// Median pin-if-absent latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile pin-if-absent latency, microseconds.
    pub p99_us: f64,
    /// Slowest pin-if-absent, microseconds.
    pub max_us: f64,
}

/// Why a run did not happen or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The plan is out of bounds.
    #[error("store bench: {0}")]
    Plan(String),
    /// The store holds records already.
    #[error(
        "store bench writes synthetic pins, and this store holds {pins} pins and {identities} \
         identities already; point it at an empty store (a scratch --data-dir, or a scratch \
         Redis database such as redis://127.0.0.1:6379/15)"
    )]
    NotEmpty {
        /// Pins found.
        pins: u64,
        /// Identities found.
        identities: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs `plan` against `store`, which must be empty.
pub async fn run(store: Arc<Store>, plan: Plan) -> Result<Report, BenchError> {
    if plan.pins == 0 || plan.pins > MAX_PINS {
        return Err(BenchError::Plan(format!("--pins must be 1 to {MAX_PINS}")));
    }
    if plan.concurrency == 0 || plan.concurrency > MAX_CONCURRENCY {
        return Err(BenchError::Plan(format!(
            "--concurrency must be 1 to {MAX_CONCURRENCY}"
        )));
    }
    let counts = store.count().await?;
    if counts.pins > 0 || counts.identities > 0 {
        return Err(BenchError::NotEmpty {
            pins: counts.pins,
            identities: counts.identities,
        });
    }

    // Work is handed out one identity at a time, so fast workers take more.
    let identities = plan.pins.div_ceil(PINS_PER_IDENTITY);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..plan.concurrency {
        let store = store.clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut latencies_ns = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= identities {
                    break;
                }
                let pins = PINS_PER_IDENTITY.min(plan.pins - n * PINS_PER_IDENTITY);
                identity_with_pins(&store, pins, &mut latencies_ns).await?;
            }
            Ok::<_, StoreError>(latencies_ns)
        });
    }
    let mut latencies_ns = Vec::with_capacity(usize::try_from(plan.pins).unwrap_or(0));
    while let Some(joined) = workers.join_next().await {
        let worker = joined.map_err(|e| {
            StoreError::new(
                StoreErrorKind::Closed,
                format!("a bench worker failed: {e}"),
            )
        })?;
        latencies_ns.extend(worker?);
    }
    let secs = started.elapsed().as_secs_f64();
    latencies_ns.sort_unstable();
    let written = latencies_ns.len() as u64;
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(Report {
        pins: written,
        concurrency: plan.concurrency,
        secs,
        pins_per_sec: written as f64 / secs.max(1e-9),
        p50_us: us(percentile(&latencies_ns, 0.50)),
        p99_us: us(percentile(&latencies_ns, 0.99)),
        max_us: us(latencies_ns.last().copied().unwrap_or(0)),
    })
}

/// Founds one identity and pins `pins` fresh keys to it, timing each pin.
async fn identity_with_pins(
    store: &Store,
    pins: u64,
    latencies_ns: &mut Vec<u64>,
) -> Result<(), StoreError> {
    let now = crate::clock::Clock::system().now_ms();
    let identity = Identity::new(
        ExitId::new("bench"),
        SessionId(rand::random()),
        now,
        Arc::new(Fingerprint::default()),
        now,
    );
    store.create_identity(&identity).await?;
    for _ in 0..pins {
        let pin = Pin {
            identity: identity.id,
            kind: PinKind::Cookie,
            name: Arc::from("datadome"),
            created_ms: now,
            expires_ms: None,
        };
        let started = Instant::now();
        store
            .pin_if_absent(PinKey::from_bytes(rand::random()), &pin)
            .await?;
        latencies_ns.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(())
}

/// The `q` quantile of sorted `values` (nearest rank).
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&values, 1.0), 100);
        assert_eq!(percentile(&[], 0.99), 0);
    }

    #[tokio::test]
    async fn writes_every_pin_and_refuses_a_used_store() {
        let store = Arc::new(Store::Memory(super::super::memory::MemoryStore::default()));
        let report = run(
            store.clone(),
            Plan {
                pins: 10,
                concurrency: 3,
            },
        )
        .await
        .unwrap();
        assert_eq!(report.pins, 10);
        assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
        let counts = store.count().await.unwrap();
        assert_eq!((counts.pins, counts.identities), (10, 3));
        let again = run(
            store,
            Plan {
                pins: 1,
                concurrency: 1,
            },
        )
        .await;
        assert!(matches!(again, Err(BenchError::NotEmpty { pins: 10, .. })));
    }
}
