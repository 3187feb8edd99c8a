//! Leaf minting: how long pinproxy takes to produce the TLS configuration
//! for a host it has not seen (mint a leaf) versus one it has (cache hit).
//!
//! Two views, each interleaving new and cached hosts so drift hits both:
//! - [`library`]: `CertCache::server_config` called in-process through
//!   pinproxy's library;
//! - [`handshakes`]: what a client sees, `CONNECT` plus the TLS handshake
//!   through a running pinproxy, for a new SNI versus a cached one. pinproxy
//!   dials nothing upstream while a tunnel opens, so no origin is involved.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::client::connect_tunnel;
use crate::stats::percentile;

/// Latency percentiles of one kind of operation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timing {
    /// Operations timed.
    pub count: usize,
    /// Median, nanoseconds.
    pub p50_ns: u64,
    /// 90th percentile, nanoseconds.
    pub p90_ns: u64,
    /// 99th percentile, nanoseconds.
    pub p99_ns: u64,
}

impl Timing {
    fn of(mut samples: Vec<u64>) -> Timing {
        samples.sort_unstable();
        Timing {
            count: samples.len(),
            p50_ns: percentile(&samples, 0.5),
            p90_ns: percentile(&samples, 0.9),
            p99_ns: percentile(&samples, 0.99),
        }
    }
}

/// New host versus cached host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MintReport {
    /// A host seen for the first time.
    pub new_host: Timing,
    /// A host already cached.
    pub cached_host: Timing,
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Times `CertCache::server_config` in-process: `count` new hosts, each
/// followed by `cached_per_new` look-ups of a cached host.
#[cfg(feature = "library")]
pub async fn library(count: usize, cached_per_new: usize) -> Result<MintReport> {
    use pinproxy::mitm::ca::CertificateAuthority;
    use pinproxy::mitm::cert_cache::CertCache;
    use pinproxy::mitm::leaf::LeafName;

    let dir = tempfile::tempdir()?;
    let ca = CertificateAuthority::load_or_create(dir.path())?;
    let cache = CertCache::new(
        ca,
        pinproxy::daemon::crypto_provider(),
        count as u64 + 16,
        vec![b"http/1.1".to_vec()],
    )?;
    let cached = LeafName::from_host("cached.mint.bench.test");
    cache
        .server_config(cached.clone())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let (mut new_host, mut cached_host) = (Vec::new(), Vec::new());
    for i in 0..count {
        let name = LeafName::from_host(&format!("h{i}.mint.bench.test"));
        let t = Instant::now();
        cache
            .server_config(name)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        new_host.push(nanos(t));
        for _ in 0..cached_per_new {
            let t = Instant::now();
            cache
                .server_config(cached.clone())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            cached_host.push(nanos(t));
        }
    }
    Ok(MintReport {
        new_host: Timing::of(new_host),
        cached_host: Timing::of(cached_host),
    })
}

/// Times `CONNECT` plus a full TLS handshake through the proxy at `proxy`,
/// alternating a new SNI name and a cached one, `count` times each. `tls`
/// must trust the proxy's CA.
pub async fn handshakes(
    proxy: SocketAddr,
    tls: Arc<ClientConfig>,
    count: usize,
) -> Result<MintReport> {
    let cached = "cached.hs.bench.test";
    handshake(proxy, &tls, cached).await?;
    let (mut new_host, mut cached_host) = (Vec::new(), Vec::new());
    for i in 0..count {
        let t = Instant::now();
        handshake(proxy, &tls, &format!("h{i}.hs.bench.test")).await?;
        new_host.push(nanos(t));
        let t = Instant::now();
        handshake(proxy, &tls, cached).await?;
        cached_host.push(nanos(t));
    }
    Ok(MintReport {
        new_host: Timing::of(new_host),
        cached_host: Timing::of(cached_host),
    })
}

/// Without pinproxy's library there is nothing to time in-process.
#[cfg(not(feature = "library"))]
pub async fn library(_count: usize, _cached_per_new: usize) -> Result<MintReport> {
    anyhow::bail!("pinbench was built without the `library` feature (pinproxy's library)")
}

async fn handshake(proxy: SocketAddr, tls: &Arc<ClientConfig>, host: &str) -> Result<()> {
    let attempt = async {
        let mut tcp = TcpStream::connect(proxy).await?;
        tcp.set_nodelay(true)?;
        connect_tunnel(&mut tcp, &format!("{host}:443"), None).await?;
        let name = ServerName::try_from(host.to_owned()).map_err(|e| anyhow!("{e}"))?;
        TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), attempt)
        .await
        .map_err(|_| anyhow!("handshake with {host} timed out"))?
}
