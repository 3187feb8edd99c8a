//! Assembling and running the proxy: builds every stage from validated
//! settings, binds the listener and runs the accept loop. Tests start the
//! proxy in-process through [`Daemon::start`]; the binary does the same.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::affinity::{memory::MemoryStore, Affinity, Store};
use crate::config::{Config, ConfigError, Settings};
use crate::cookies::PinHasher;
use crate::exits::{Exit, ExitSet};
use crate::listener::{self, Frontend};
use crate::mitm::ca::{CaError, CertificateAuthority};
use crate::mitm::cert_cache::{CertCache, CertCacheError};
use crate::mitm::{Mitm, CLIENT_ALPN};
use crate::pipeline::Pipeline;
use crate::upstream::tls::{self, TlsSetupError};
use crate::upstream::{ExitClient, PoolSettings};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory or a file in it is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The leaf certificate machinery could not be set up.
    #[error(transparent)]
    Certs(#[from] CertCacheError),
    /// The upstream TLS settings are invalid.
    #[error(transparent)]
    UpstreamTls(#[from] TlsSetupError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A start-up task failed to run.
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A running proxy.
#[derive(Debug)]
pub struct Daemon {
    local_addr: SocketAddr,
    data_dir: PathBuf,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    accept: JoinHandle<()>,
    frontend: Arc<Frontend>,
}

/// The crypto provider used for both sides of every TLS connection.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Creates the data directory and loads (or creates) the CA in it; shared by
/// `pinproxy run` and `pinproxy ca`.
pub fn prepare_data_dir(data_dir: &Path) -> Result<CertificateAuthority, StartError> {
    crate::fsutil::create_private_dir(data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    Ok(CertificateAuthority::load_or_create(data_dir)?)
}

impl Daemon {
    /// Validates `config`, builds every stage and starts serving.
    pub async fn start(config: &Config) -> Result<Daemon, StartError> {
        let settings = config.validate()?;
        let provider = crypto_provider();

        // Files in the data directory: read off the runtime threads.
        let dir = settings.data_dir.clone();
        let (ca, hasher) = tokio::task::spawn_blocking(move || {
            let ca = prepare_data_dir(&dir)?;
            let hasher = PinHasher::load_or_create(&dir).map_err(|source| StartError::DataDir {
                path: dir.clone(),
                source,
            })?;
            Ok::<_, StartError>((ca, hasher))
        })
        .await??;
        let upstream_tls = {
            let provider = provider.clone();
            let files = settings.upstream_ca.clone();
            tokio::task::spawn_blocking(move || tls::client_config(provider, &files)).await??
        };

        let certs = CertCache::new(
            ca,
            provider,
            settings.mitm.cert_cache_capacity,
            CLIENT_ALPN.iter().map(|p| p.to_vec()).collect(),
        )?;
        let exits = build_exits(&settings, upstream_tls);
        let pipeline = Pipeline {
            cookies: settings.cookies.clone(),
            hasher,
            affinity: Affinity::new(Store::Memory(MemoryStore::new())),
            exits,
            max_header_bytes: settings.limits.max_header_bytes,
        };

        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: settings.listen,
            source,
        })?;

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let frontend = Arc::new(Frontend {
            pipeline,
            mitm: Mitm { certs },
            limits: settings.limits.clone(),
            timeouts: settings.timeouts.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        });
        let accept = tokio::spawn(listener::accept_loop(listener, frontend.clone()));
        tracing::info!(
            listen = %local_addr,
            exits = %frontend.pipeline.exits.iter().map(|e| e.spec.redacted_url()).collect::<Vec<_>>().join(", "),
            ca = %CertificateAuthority::cert_path(&settings.data_dir).display(),
            "pinproxy is listening"
        );
        Ok(Daemon {
            local_addr,
            data_dir: settings.data_dir,
            shutdown,
            tasks,
            accept,
            frontend,
        })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The data directory in use.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Path of the CA certificate clients must trust.
    pub fn ca_cert_path(&self) -> PathBuf {
        CertificateAuthority::cert_path(&self.data_dir)
    }

    /// The CA certificate (PEM).
    pub fn ca_cert_pem(&self) -> &str {
        self.frontend.mitm.certs.ca().cert_pem()
    }

    /// The shared request pipeline (for inspection in tests and tools).
    pub fn pipeline(&self) -> &Pipeline {
        &self.frontend.pipeline
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`,
    /// then abandons what is left.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        let _ = self.accept.await;
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tasks.len(),
                "connections still open after the grace period; closing them"
            );
        }
    }
}

fn build_exits(settings: &Settings, upstream_tls: Arc<rustls::ClientConfig>) -> ExitSet {
    let pool = PoolSettings {
        connect_timeout: settings.timeouts.connect,
        response_head_timeout: settings.timeouts.response_head,
        idle_timeout: settings.timeouts.pool_idle,
        max_idle_per_origin: settings.limits.max_idle_per_origin,
    };
    ExitSet::new(
        settings
            .exits
            .iter()
            .map(|spec| Exit {
                client: ExitClient::new(
                    spec.id.clone(),
                    spec.kind.clone(),
                    upstream_tls.clone(),
                    &pool,
                ),
                spec: spec.clone(),
            })
            .collect(),
    )
}
