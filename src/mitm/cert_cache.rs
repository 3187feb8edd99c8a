//! A bounded, single-flight cache of per-host TLS server configurations.
//!
//! The first tunnel to a host mints its leaf; concurrent tunnels to the same
//! host wait for that one mint instead of minting their own. The least
//! recently used hosts fall out when the cache is full.

use std::sync::Arc;

use rcgen::KeyPair;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::{CertifiedKey, SigningKey, SingleCertAndKey};
use rustls::ServerConfig;

use super::ca::{generate_leaf_key, CertificateAuthority};
use super::leaf::{self, LeafName};

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
}

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache")
            .field("entries", &self.configs.entry_count())
            .finish_non_exhaustive()
    }
}

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
                .build(),
        })
    }

    /// The CA behind every leaf.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The TLS configuration presenting a leaf for `name`, minted on first use.
    pub async fn server_config(&self, name: LeafName) -> Result<Arc<ServerConfig>, Arc<MintError>> {
        self.configs
            .try_get_with_by_ref(&name, async { self.build(&name) })
            .await
    }

    /// Mints a leaf and builds its configuration without touching the cache
    /// (also used by the benchmarks to time a cold mint).
    pub fn build(&self, name: &LeafName) -> Result<Arc<ServerConfig>, MintError> {
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
