//! A bounded, single-flight cache of per-host TLS server configurations.
//!
//! The first tunnel to a host mints its leaf; concurrent tunnels to the same
//! host wait for that one mint instead of minting their own. The least
//! recently used hosts fall out when the cache is full.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rcgen::KeyPair;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::{CertifiedKey, SigningKey, SingleCertAndKey};
use rustls::ServerConfig;

use super::ca::{generate_leaf_key, CertificateAuthority};
use super::leaf::{self, LeafName};
use crate::metrics::Metrics;

/// TLS session tickets/ids remembered across all intercepted hosts.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Minting a leaf or building its TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// rcgen could not sign the certificate.
    #[error("cannot mint a certificate for {name}: {source}")]
    Sign {
        /// The host.
        name: LeafName,
        /// Why.
        source: rcgen::Error,
    },
    /// The CA's name constraints exclude the host: clients would reject
    /// the leaf.
    #[error(
        "{name} is outside the domains the CA may sign for ({permitted}); add it to \
         ca.permitted_domains and rotate the CA (`pinproxy ca rotate`), or tunnel it raw \
         (mitm.exclude)"
    )]
    OutsideConstraints {
        /// The host.
        name: LeafName,
        /// The CA's permitted domains.
        permitted: String,
    },
    /// rustls rejected the configuration.
    #[error("cannot build TLS settings for {name}: {source}")]
    Tls {
        /// The host.
        name: LeafName,
        /// Why.
        source: rustls::Error,
    },
}

/// Mints and caches one `ServerConfig` per intercepted host.
pub struct CertCache {
    ca: CertificateAuthority,
    leaf_key: KeyPair,
    signing_key: Arc<dyn SigningKey>,
    provider: Arc<CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
    alpn: Vec<Vec<u8>>,
    configs: moka::future::Cache<LeafName, Arc<ServerConfig>>,
    /// Mint latency and cache size, when the daemon's metrics are attached.
    instruments: Option<Instruments>,
}

/// Where minting is measured: `pinproxy_cert_mint_seconds` and
/// `pinproxy_cert_cache_entries`.
#[derive(Debug)]
struct Instruments {
    mint: Histogram,
    entries: Gauge,
}

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache")
            .field("entries", &self.configs.entry_count())
            .finish_non_exhaustive()
    }
}

/// How long a minted leaf is served before a new one is minted for its
/// host: well within the leaf's own validity
/// ([`leaf::LEAF_VALIDITY_DAYS`]), so that a daemon up for months never
/// presents an expired one for a host it keeps serving.
pub const LEAF_REUSE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

impl CertCache {
    /// A cache signing with `ca`, holding at most `capacity` hosts, offering
    /// `alpn` protocols to clients.
    pub fn new(
        ca: CertificateAuthority,
        provider: Arc<CryptoProvider>,
        capacity: u64,
        alpn: Vec<Vec<u8>>,
    ) -> Result<CertCache, CertCacheError> {
        // One key for every leaf: minting then costs one signature, and the
        // key never leaves memory. Serials stay unique (see `leaf`).
        let (leaf_key, leaf_key_der) = generate_leaf_key()?;
        let signing_key = provider
            .key_provider
            .load_private_key(leaf_key_der)
            .map_err(CertCacheError::Key)?;
        Ok(CertCache {
            ca,
            leaf_key,
            signing_key,
            provider,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
            alpn,
            configs: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(LEAF_REUSE)
                .build(),
            instruments: None,
        })
    }

    /// Measures every mint in `metrics` (its latency, and the cache's size
    /// after it).
    pub fn with_metrics(mut self, metrics: &Metrics) -> CertCache {
        self.instruments = Some(Instruments {
            mint: metrics.cert_mint.clone(),
            entries: metrics.cert_cache_entries.clone(),
        });
        self
    }

    /// The CA behind every leaf.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The TLS configuration presenting a leaf for `name`, minted on first use.
    pub async fn server_config(&self, name: LeafName) -> Result<Arc<ServerConfig>, Arc<MintError>> {
        let minted = std::sync::atomic::AtomicBool::new(false);
        let config = self
            .configs
            .try_get_with_by_ref(&name, async {
                let started = std::time::Instant::now();
                let built = self.build(&name);
                if let Some(instruments) = &self.instruments {
                    instruments.mint.observe(started.elapsed().as_secs_f64());
                    minted.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                built
            })
            .await;
        // The cache only grows (and evicts) when a leaf is inserted: its
        // size is measured then, never on the way of a cache hit.
        if let (true, Some(instruments)) = (
            minted.load(std::sync::atomic::Ordering::Relaxed),
            &self.instruments,
        ) {
            self.configs.run_pending_tasks().await;
            let entries = i64::try_from(self.configs.entry_count()).unwrap_or(i64::MAX);
            instruments.entries.set(entries);
        }
        config
    }

    /// Mints a leaf and builds its configuration without touching the cache
    /// (also used by the benchmarks to time a cold mint).
    pub fn build(&self, name: &LeafName) -> Result<Arc<ServerConfig>, MintError> {
        if !self.ca.permits(name) {
            return Err(MintError::OutsideConstraints {
                name: name.clone(),
                permitted: self.ca.permitted_domains().unwrap_or_default().join(", "),
            });
        }
        let leaf =
            leaf::mint(&self.ca, &self.leaf_key, name).map_err(|source| MintError::Sign {
                name: name.clone(),
                source,
            })?;
        let chain = vec![leaf, self.ca.cert_der().clone()];
        let certified = CertifiedKey::new(chain, self.signing_key.clone());
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| MintError::Tls {
                name: name.clone(),
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        config.alpn_protocols = self.alpn.clone();
        config.session_storage = self.sessions.clone();
        Ok(Arc::new(config))
    }

    /// Number of hosts currently cached.
    pub fn len(&self) -> u64 {
        self.configs.entry_count()
    }

    /// Whether no host is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CertCacheError {
    /// The leaf key could not be generated.
    #[error("cannot generate the leaf key: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the leaf key.
    #[error("cannot load the leaf key: {0}")]
    Key(rustls::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaf is served for a month at most, far within its validity: a
    /// host kept in the cache gets a new one before the old expires.
    #[test]
    fn leaves_are_reminted_well_before_they_expire() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cache = CertCache::new(ca, provider, 10, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cache.configs.policy().time_to_live(), Some(LEAF_REUSE));
        let validity = std::time::Duration::from_secs(
            u64::try_from(leaf::LEAF_VALIDITY_DAYS).unwrap_or(0) * 24 * 3600,
        );
        assert!(LEAF_REUSE * 4 < validity);
    }
}
