//! Assembling and running the proxy: builds every stage from validated
//! settings, binds the listener and runs the accept loop; reloads the
//! configuration while running ([`live`]) and stops gracefully. Tests start
//! the proxy in-process through [`Daemon::start`]; the binary does the same.

pub mod live;
pub mod untracked;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::control::{Control, ReloadReport};
use crate::admin::{self, Admin};
use crate::clock::{duration_ms, Clock};
use crate::config::{Config, ConfigError, Settings, StoreKind};
use crate::credential::{PinHasher, PIN_KEY_FILE};
use crate::exits::drain::DrainBook;
use crate::exits::routes::{self, BookFile, ROUTE_FILE};
use crate::exits::spec::ExitSpec;
use crate::exits::{ExitSet, LiveExits};
use crate::fingerprint::live_hellos::LiveHellos;
use crate::front::{self, FrontSettings, Frontend};
use crate::metrics::Metrics;
use crate::mitm::ca::{CaError, CertificateAuthority};
use crate::mitm::cert_cache::{CertCache, CertCacheError};
use crate::mitm::{Mitm, CLIENT_ALPN};
use crate::net::tasks::ConnectionTasks;
use crate::proxy::Pipeline;
use crate::routing::Router;
use crate::store::durable::{DurableStore, KeyOnFile, OpenError};
use crate::store::memory::MemoryStore;
use crate::store::redis::journal::Journal;
use crate::store::redis::{RedisSettings, RedisStore, WaitFor};
use crate::store::{Store, StoreError, StoreErrorKind};
use crate::upstream::dial::guard::AddressGuard;
use crate::upstream::tls::{TlsSetupError, UpstreamTls};
use crate::upstream::unread::Unread;
use live::{ConfigSource, Core, Live, ReloadError};

/// The least `identities.remember_retired` with Redis (see `open_store`).
const REDIS_REMEMBER_AT_LEAST_MS: u64 = 10 * 60 * 1000;

/// How long a Redis replica keeps retired credentials (and pins past their
/// identities' lives) when `remember_retired` asks for `asked_ms`.
pub(crate) fn redis_keep_ms(asked_ms: u64) -> u64 {
    asked_ms.max(REDIS_REMEMBER_AT_LEAST_MS)
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The CA certificate could not be published (`ca.publish`).
    #[error("cannot publish the CA certificate to {path} (ca.publish): {source}")]
    Publish {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
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
    /// A listen address cannot be bound. The cause is part of the message
    /// (not a `source`), so it is printed once, before the advice.
    #[error("cannot listen on {addr} for {listener}: {cause}. {}", listener.advice(cause))]
    Bind {
        /// Which listener.
        listener: Listener,
        /// The address.
        addr: SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
    /// The store holds pins of cookie names no longer tracked.
    #[error(transparent)]
    UntrackedPins(#[from] crate::daemon::untracked::UntrackedPins),
    /// The tracked-cookie patterns the pin store records cannot be read.
    #[error(transparent)]
    TrackingRecord(#[from] crate::daemon::untracked::UnreadableRecord),
    /// The tracked cookies change against those a Redis fleet put in force.
    #[error(transparent)]
    FleetTracking(#[from] crate::daemon::untracked::FleetTracking),
    /// A start-up task failed to run.
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The embedded pin store could not be opened.
    #[error(transparent)]
    StoreFile(#[from] OpenError),
    /// The pin store could not be reached or set up.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The daemon's two listeners, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The proxy itself (`--listen`).
    Proxy,
    /// The admin endpoint (`--admin`).
    Admin,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Listener::Proxy => "the proxy",
            Listener::Admin => "the admin endpoint (metrics, identities, reload)",
        })
    }
}

impl Listener {
    /// What to do when it cannot be bound because of `cause`.
    fn advice(self, cause: &std::io::Error) -> String {
        let why = match cause.kind() {
            std::io::ErrorKind::AddrInUse => {
                "Another process (a second pinproxy?) holds that address"
            }
            std::io::ErrorKind::PermissionDenied => "Ports below 1024 need privileges",
            std::io::ErrorKind::AddrNotAvailable => "No interface of this machine has that address",
            _ => "It cannot be used",
        };
        let fix = match self {
            Listener::Proxy => "choose another with --listen ADDR (listen in the config file)",
            Listener::Admin => {
                "move the admin endpoint with --admin ADDR (admin.listen in the config file) \
                 or disable it with --admin off"
            }
        };
        format!("{why}: {fix}")
    }

    fn bind_error(self, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> StartError {
        move |cause| StartError::Bind {
            listener: self,
            addr,
            cause,
        }
    }
}

/// File in the data directory holding the fleet's pin-hashing key (Redis):
/// every replica keeps it, so whichever comes back first after a wipe
/// writes back the same key.
const FLEET_KEY_FILE: &str = "fleet-pin-key";
/// File in the data directory holding the Redis namespace's history as this
/// replica last saw it (see `store::redis::generation`).
const GENERATION_FILE: &str = "redis-generation.json";

/// How long a stop waits, after its grace period, for the abandoned
/// connection tasks to end: aborting a task schedules it at once and it
/// ends at that poll, so this bounds only a runtime too busy to poll them.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// Who opens a store: the daemon (a replica: journal and history kept) or
/// a command-line tool (neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    Replica,
    Tool,
}

/// Opens the configured pin store (the embedded one off the runtime
/// threads) and the pin hasher its pins are hashed with; background writes
/// of a remote store run on `tasks`. The data directory exists.
async fn open_store(
    settings: &Settings,
    tasks: &TaskTracker,
    metrics: &Arc<Metrics>,
    opener: Opener,
) -> Result<(Store, PinHasher), StartError> {
    let dir = settings.data_dir.clone();
    let local_key = || {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                PinHasher::load_or_create(&dir).map_err(|source| StartError::DataDir {
                    path: dir.join(PIN_KEY_FILE),
                    source,
                })
            })
            .await?
        }
    };
    match &settings.store {
        StoreKind::Memory => Ok((Store::Memory(MemoryStore::new()), local_key().await?)),
        StoreKind::Embedded(path) => {
            let path = path.clone();
            let (store, hasher) = tokio::task::spawn_blocking(move || {
                DurableStore::open_keyed(&path, |on_file| pin_key_for(&dir, &path, on_file))
            })
            .await??;
            Ok((Store::Durable(store), hasher))
        }
        StoreKind::Redis {
            url,
            namespace,
            loss_quarantine,
            wait_replicas,
            wait_timeout,
            hit_cache,
        } => {
            // Pins must outlive the longest-lived identity, then be
            // remembered as long as retired credentials are.
            let longest = settings
                .exits
                .iter()
                .filter_map(|e| e.options.max_lifetime)
                .chain(std::iter::once(settings.identities.max_lifetime))
                .max()
                .unwrap_or(settings.identities.max_lifetime);
            // Redis expires a pin's key by its own clock, and routing
            // trusts the pin until its creation plus the longest lifetime
            // on each replica's clock: the margin between the two is
            // `remember_retired`, and it must cover how far replicas'
            // clocks read apart, or a replica whose clock is behind would
            // find a live identity's pin gone and pin its cookie anew.
            let asked = duration_ms(settings.identities.remember_retired);
            let keep = redis_keep_ms(asked);
            if keep > asked {
                tracing::warn!(
                    remember_retired = ?settings.identities.remember_retired,
                    used = ?std::time::Duration::from_millis(keep),
                    "identities.remember_retired is raised to 10 minutes with Redis: pins must \
                     outlive their identities by more than replicas' clocks read apart"
                );
            }
            let redis = RedisSettings {
                url: url.clone(),
                namespace: namespace.clone(),
                pin_ttl_ms: duration_ms(longest).saturating_add(keep),
                keep_retired_ms: keep,
                quarantine_ms: duration_ms(*loss_quarantine),
                wait: (*wait_replicas > 0).then_some(WaitFor {
                    replicas: *wait_replicas,
                    timeout: *wait_timeout,
                }),
                // A tool reads once and leaves: nothing to cache.
                hit_cache: match opener {
                    Opener::Replica => *hit_cache,
                    Opener::Tool => Duration::ZERO,
                },
            };
            let (journal, generation) = match opener {
                Opener::Replica => {
                    let dir = settings.data_dir.clone();
                    let journal =
                        tokio::task::spawn_blocking(move || Journal::open(&dir)).await??;
                    (Some(journal), Some(settings.data_dir.join(GENERATION_FILE)))
                }
                Opener::Tool => (None, None),
            };
            let store = RedisStore::connect(
                redis,
                journal,
                generation.as_deref(),
                tasks.clone(),
                metrics.clone(),
            )?;
            let local = local_key().await?;
            let replica_dir = (opener == Opener::Replica).then_some(settings.data_dir.as_path());
            let hasher = fleet_hasher(&store, &local, replica_dir).await?;
            Ok((Store::Redis(store), hasher))
        }
    }
}

/// The addresses of the pin store's servers (Redis), which no client may
/// be forwarded to (see `AddressGuard`): a name among them is resolved
/// here, off the runtime, within a few seconds (a name that does not
/// resolve is left out, and said so: the store cannot reach it either).
async fn store_servers(store: &StoreKind) -> Vec<SocketAddr> {
    let StoreKind::Redis { url, namespace, .. } = store else {
        return Vec::new();
    };
    let Ok(target) = crate::store::redis::link::Target::parse(url, namespace) else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    for (host, port) in target.servers() {
        let lookup = tokio::task::spawn_blocking({
            let host = host.clone();
            move || std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        });
        match tokio::time::timeout(std::time::Duration::from_secs(5), lookup).await {
            Ok(Ok(Ok(found))) => addrs.extend(found),
            _ => tracing::warn!(
                host = %host, port,
                "the pin store's server name did not resolve at start: clients are not kept \
                 from it by address (list it in upstream.deny_ranges)"
            ),
        }
    }
    addrs
}

/// The pin key of the embedded store at `store`: the data directory's
/// `pin-key`, or a new one where the store holds nothing hashed with
/// another (a new key beside stored pins would make every stored cookie
/// look new, free to leave through any exit: refused instead).
fn pin_key_for(dir: &Path, store: &Path, on_file: &KeyOnFile) -> Result<PinHasher, OpenError> {
    let key = dir.join(PIN_KEY_FILE);
    let io_error = |source| OpenError::PinKey {
        key: key.clone(),
        source,
    };
    match PinHasher::load(dir).map_err(io_error)? {
        Some(hasher) => Ok(hasher),
        None if on_file.needs_its_key() => Err(OpenError::PinKeyMissing {
            key: key.clone(),
            path: store.to_owned(),
            recorded: on_file.key_id.clone(),
            pins: on_file.pins,
            identities: on_file.identities,
        }),
        None => PinHasher::create(dir).map_err(io_error),
    }
}

/// Opens the configured store and its pin-hasher for tools (`pinproxy
/// store`), without starting the proxy.
pub async fn open_store_for_tools(config: &Config) -> Result<(Store, PinHasher), StartError> {
    let settings = config.validate()?;
    let dir = settings.data_dir.clone();
    tokio::task::spawn_blocking(move || {
        crate::fsutil::create_private_dir(&dir).map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })
    })
    .await??;
    let metrics = Arc::new(Metrics::new());
    open_store(&settings, &TaskTracker::new(), &metrics, Opener::Tool).await
}

/// Replicas sharing a Redis store must hash cookies with one key: the first
/// replica's. Waits (bounded) for Redis at start, since hashing with another
/// key would miss every pin. A replica (`data_dir` given) keeps the fleet's
/// key in its data directory, offers it back after a wipe, and checks the
/// namespace's history (a loss while it was down starts a restore). A tool
/// (no `data_dir`) reads the fleet's key and never sets one.
async fn fleet_hasher(
    store: &RedisStore,
    local: &PinHasher,
    data_dir: Option<&Path>,
) -> Result<PinHasher, StartError> {
    let kept = match data_dir {
        Some(dir) => {
            let path = dir.join(FLEET_KEY_FILE);
            crate::fsutil::read_private(&path)
                .map_err(|source| StartError::DataDir { path, source })?
        }
        None => None,
    };
    let kept_key: Option<[u8; 32]> = kept.as_deref().and_then(|bytes| bytes.try_into().ok());
    let candidate = kept_key.unwrap_or_else(|| local.key_bytes());
    let mut last = None;
    for attempt in 0..10u32 {
        let agreed = async {
            let key = match data_dir {
                Some(_) => {
                    // The generation first: a replica that finds Redis
                    // empty waits there for the running replicas to report
                    // a loss, and their restore writes the fleet's key
                    // back, which this one then takes instead of setting
                    // its own (which they would refuse to hash with).
                    store.start().await?;
                    let offer = match kept_key {
                        Some(_) => crate::store::redis::KeyOffer::Kept,
                        None => crate::store::redis::KeyOffer::New,
                    };
                    let key = store.shared_hash_key(candidate, offer).await?;
                    if let Some(kept) = kept_key.filter(|kept| *kept != key) {
                        return Err(foreign_fleet_key(&key, &kept));
                    }
                    key
                }
                // A tool reads the fleet's key and never sets one: on a
                // store that has just lost its data, a tool's own key must
                // not become the fleet's (the running replicas would not
                // hash with it). With none set, nothing is pinned to find.
                None => store.existing_hash_key().await?.unwrap_or(candidate),
            };
            Ok::<_, StoreError>(key)
        };
        match agreed.await {
            Ok(key) => {
                store.check_server().await.map_err(StartError::Store)?;
                if let Some(dir) = data_dir.filter(|_| kept.as_deref() != Some(&key[..])) {
                    keep_fleet_key(dir, &key).map_err(|source| StartError::DataDir {
                        path: dir.join(FLEET_KEY_FILE),
                        source,
                    })?;
                }
                return Ok(PinHasher::new(key));
            }
            // Waiting cannot settle it.
            Err(e) if e.kind == StoreErrorKind::KeyConflict => return Err(StartError::Store(e)),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt + 1))).await;
    }
    Err(StartError::Store(StoreError::new(
        StoreErrorKind::Unreachable,
        format!(
            "cannot reach Redis to agree on the fleet's pin-hashing key: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
    )))
}

/// A replica that kept the fleet's key (`kept`) finds another in Redis
/// (`held`): it was set after Redis lost its data. Starting with either
/// would let one cookie be pinned to two exits, so the replica does not
/// start.
fn foreign_fleet_key(held: &[u8; 32], kept: &[u8; 32]) -> StoreError {
    StoreError::new(
        StoreErrorKind::KeyConflict,
        format!(
            "Redis holds pin-hashing key {} but this replica's data directory keeps the fleet's \
             key {} ({FLEET_KEY_FILE}): another was set after Redis lost its data. Put key {} \
             back into the namespace's hash-key, or, if the namespace was reset on purpose, \
             delete {FLEET_KEY_FILE} from the data directory",
            crate::store::redis::key_id(held),
            crate::store::redis::key_id(kept),
            crate::store::redis::key_id(kept),
        ),
    )
}

fn keep_fleet_key(dir: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    crate::fsutil::replace_private(&dir.join(FLEET_KEY_FILE), key)
}

/// A running proxy.
#[derive(Debug)]
pub struct Daemon {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    ca_dir: PathBuf,
    data_dir: PathBuf,
    shutdown: CancellationToken,
    /// Client connections, tunnels, relays and the loops beside them.
    tasks: ConnectionTasks,
    /// Background work that may change pins or identities (retirements,
    /// exit trials, store writes off the request path): awaited, with a
    /// deadline, before the store is closed.
    background: TaskTracker,
    accept: JoinHandle<()>,
    frontend: Arc<Frontend>,
    admin: Arc<Admin>,
    live: Arc<Live>,
}

/// The crypto provider used for both sides of every TLS connection.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Creates the data directory and loads the CA (creating it in the data
/// directory when missing; a `ca.dir` given explicitly must hold one).
fn prepare_data_dir(settings: &Settings) -> Result<CertificateAuthority, StartError> {
    let data_dir = &settings.data_dir;
    crate::fsutil::create_private_dir(data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let ca = CertificateAuthority::open(
        &settings.ca_dir,
        !settings.ca_dir_given,
        &settings.permitted_domains,
    )?;
    if let Some(path) = &settings.ca_publish {
        publish_trust(settings, path)?;
    }
    let configured =
        (!settings.permitted_domains.is_empty()).then(|| settings.permitted_domains.clone());
    if ca.permitted_domains() != configured {
        tracing::warn!(
            ca = %CertificateAuthority::cert_path(&settings.ca_dir).display(),
            configured = ?settings.permitted_domains,
            in_the_ca = ?ca.permitted_domains().unwrap_or_default(),
            "ca.permitted_domains applies when a CA is created; the existing CA has other \
             constraints and keeps them: run `pinproxy ca rotate` to make a CA with these"
        );
    }
    Ok(ca)
}

/// Writes the certificates clients are to trust (the CA's, or during a
/// rotation the bundle of both) to `path`, whole or not at all, readable
/// by all: a client container mounts it without the data directory's
/// secrets. Certificates only, whatever else the CA's file holds (a key
/// kept beside the certificate, as some tools write it), and never into
/// the data or CA directory, whose files it could replace.
fn publish_trust(settings: &Settings, path: &Path) -> Result<(), StartError> {
    let failed = |why: String| StartError::Publish {
        path: path.to_owned(),
        source: std::io::Error::other(why),
    };
    let folder = |dir: &Path| std::fs::canonicalize(dir).ok();
    let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => folder(parent),
        None => folder(Path::new(".")),
    };
    for (dir, what) in [
        (&settings.data_dir, "the data directory"),
        (&settings.ca_dir, "the CA directory"),
    ] {
        if parent.is_some() && parent == folder(dir) {
            return Err(failed(format!(
                "it is in {what} ({}): publish outside it, to a directory clients may read",
                dir.display()
            )));
        }
    }
    let source = CertificateAuthority::trust_path(&settings.ca_dir);
    let pem = std::fs::read_to_string(&source)
        .map_err(|e| failed(format!("reading {}: {e}", source.display())))?;
    let certificates = crate::mitm::ca::certificate_blocks(&pem);
    if certificates.is_empty() {
        return Err(failed(format!("{} holds no certificate", source.display())));
    }
    crate::fsutil::replace_public(path, certificates.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    tracing::info!(path = %path.display(), "published the CA certificate clients trust");
    Ok(())
}

impl Daemon {
    /// Validates `config`, builds every stage and starts serving.
    pub async fn start(config: &Config) -> Result<Daemon, StartError> {
        Daemon::start_with_clock(config, Clock::system()).await
    }

    /// [`Daemon::start`] with a given clock (tests advance a manual one).
    pub async fn start_with_clock(config: &Config, clock: Clock) -> Result<Daemon, StartError> {
        let settings = config.validate()?;
        let provider = crypto_provider();

        // Files in the data directory: read off the runtime threads.
        let for_ca = settings.clone();
        let ca = tokio::task::spawn_blocking(move || prepare_data_dir(&for_ca)).await??;
        let upstream_tls = {
            let provider = provider.clone();
            let files = settings.upstream_ca.clone();
            tokio::task::spawn_blocking(move || UpstreamTls::new(provider, &files)).await??
        };

        let metrics = Arc::new(Metrics::with_max_sites(settings.metrics.max_sites));
        let certs = CertCache::new(
            ca,
            provider.clone(),
            settings.mitm.cert_cache_capacity,
            CLIENT_ALPN.iter().map(|p| p.to_vec()).collect(),
        )?
        .with_metrics(&metrics);
        let guard = Arc::new(AddressGuard::new(settings.deny_ranges.clone()));
        guard.set_store(store_servers(&settings.store).await);
        let unread = Unread::new(
            settings.timeouts.client_stall,
            settings.limits.max_unread_bytes,
            metrics.answers_abandoned.clone(),
            metrics.answers_unread_bytes.clone(),
        );
        let build = live::exit_build(
            &settings,
            upstream_tls,
            (guard.clone(), unread.clone()),
            &metrics,
        );
        let exits = ExitSet::of(
            settings
                .exits
                .iter()
                .map(|spec| Arc::new(build.exit(spec, clock.now_ms())))
                .collect(),
            build.trial_interval_ms,
        );
        let drains = Arc::new(DrainBook::new(&settings.data_dir));
        let listed = {
            let drains = drains.clone();
            tokio::task::spawn_blocking(move || drains.read()).await?
        };
        match listed {
            Ok(listed) => {
                let forgotten = drains.apply(&listed, &exits);
                if !forgotten.is_empty() {
                    tracing::info!(exits = ?forgotten, "drained exits that are no longer configured are forgotten");
                }
                if listed.len() > forgotten.len() {
                    tracing::warn!(exits = ?exits.drained(), "exits drained before the restart stay drained (POST /exits/ID/undrain to resume)");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the drained exits; none is drained"),
        }
        // The routes the exits had before: identities founded on a route
        // that changed under its id retire (see `exits::routes`). Read
        // before the store is opened (a book that cannot be read stops the
        // start first), compared once the pin key is known: its routes are
        // hashed with it, as the routes identities were founded on.
        let book = {
            let dir = settings.data_dir.clone();
            let book = tokio::task::spawn_blocking(move || BookFile::read(&dir)).await?;
            book.map_err(|source| StartError::DataDir {
                path: settings.data_dir.join(ROUTE_FILE),
                source,
            })?
        };
        let background = TaskTracker::new();
        let (store, hasher) = open_store(&settings, &background, &metrics, Opener::Replica).await?;
        // Before anything is written (the book of routes below): a start
        // refused here leaves the data directory as it found it. It walks
        // every pin, on this thread: nothing is served yet.
        crate::daemon::untracked::check_at_start(
            &store,
            &settings.cookies,
            settings.identities.release_untracked_pins,
        )?;
        let fleet_judged = crate::daemon::untracked::check_fleet(
            &store,
            &settings.cookies,
            settings.identities.release_untracked_pins,
        )
        .await?;
        // The route identities founded on each exit carry, hashed with the
        // pin key (the fleet's on a shared store), so known only now.
        routes::found_on(&exits, &hasher);
        let routes = Arc::new(book.keyed(&hasher));
        let plan = {
            let specs: Vec<&ExitSpec> = exits.iter().map(|exit| &exit.spec).collect();
            let mut plan = routes.plan(&specs);
            plan.date(clock.now_ms());
            let book = routes.clone();
            let (plan, committed) = tokio::task::spawn_blocking(move || {
                let committed = book.commit(&plan);
                (plan, committed)
            })
            .await?;
            committed.map_err(|source| StartError::DataDir {
                path: settings.data_dir.join(ROUTE_FILE),
                source,
            })?;
            plan.mark(&exits);
            plan
        };
        plan.vouch(&exits);
        let router = Arc::new(Router::new(
            store,
            clock.clone(),
            live::policies(&settings, &settings),
            metrics.clone(),
            background.clone(),
        ));
        // Only the names tracked now are pinned (see `store::pinnable`).
        router
            .store()
            .pinnable()
            .set(Some(crate::daemon::untracked::pinnable(&settings.cookies)))
            .await;
        router.sync_exit_deaths(&exits).await?;
        let exits = Arc::new(exits);
        let live_exits = Arc::new(LiveExits::new(exits.clone()));

        let listener = bind_listener(settings.listen, settings.limits.listen_backlog)
            .map_err(Listener::Proxy.bind_error(settings.listen))?;
        let local_addr = listener
            .local_addr()
            .map_err(Listener::Proxy.bind_error(settings.listen))?;
        guard.set_proxy(local_addr);
        // Bound now, served once the daemon is built: its address may be
        // in use too.
        let admin_listener = match settings.admin {
            Some(addr) => {
                let bound = TcpListener::bind(addr)
                    .await
                    .map_err(Listener::Admin.bind_error(addr))?;
                let bound_addr = bound
                    .local_addr()
                    .map_err(Listener::Admin.bind_error(addr))?;
                guard.set_admin(bound_addr);
                Some((bound, bound_addr))
            }
            None => None,
        };
        // Pins are keyed under these patterns from here (the next start
        // judges them against it): recorded once both addresses are bound,
        // so that a start given up there leaves the record of the run
        // before, and before the admin listener is served and can take a
        // reload that records its own. The fleet's record first: it is
        // replaced only if no other replica changed it since it was judged
        // (else judged again: two replicas that judged one record at once
        // must not both go through), which may still refuse the start;
        // then this store's, after which nothing can.
        crate::daemon::untracked::claim_fleet(
            router.store(),
            &settings.cookies,
            fleet_judged,
            settings.identities.release_untracked_pins,
        )
        .await?;
        router
            .store()
            .record_tracking(settings.cookies.patterns())
            .await?;

        let shutdown = CancellationToken::new();
        let tasks = ConnectionTasks::new();
        let core = Core {
            router: router.clone(),
            hasher,
            metrics: metrics.clone(),
            background: background.clone(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            clock: clock.clone(),
            provider,
            guard: guard.clone(),
            unread,
            pacer: crate::proxy::pacing::Pacer::new(&settings.identities.pacing()),
            live_exits: live_exits.clone(),
        };
        let pipeline = live::pipeline(&settings, exits.clone(), &core, &settings.limits);
        let frontend = Arc::new(Frontend {
            pipeline: ArcSwap::from_pointee(pipeline),
            mitm: Mitm {
                certs,
                policy: settings.intercept.clone(),
                hellos: LiveHellos::default(),
            },
            settings: FrontSettings {
                max_connections: settings.limits.max_connections,
                max_header_bytes: settings.limits.max_header_bytes,
                max_headers: settings.limits.max_headers,
                header_read: settings.timeouts.header_read,
                client_idle: settings.timeouts.client_idle,
                tls_handshake: settings.timeouts.tls_handshake,
            },
            clients: front::limits::ClientLimits::new(front::limits::ClientLimitSettings {
                max_connections: settings.limits.max_connections_per_client,
                requests_per_second: settings.limits.requests_per_second_per_client,
                burst: match settings.limits.requests_burst_per_client {
                    0 => settings.limits.requests_per_second_per_client,
                    burst => burst,
                },
            }),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        });
        let loops = live::spawn_loops(&core, &live_exits, &settings, false);
        tasks.spawn(crate::heap_trim::trim_loop(
            [
                metrics.client_connections_parked.clone(),
                metrics.upstream_connections_parked.clone(),
            ],
            shutdown.clone(),
        ));
        // Until told otherwise, a reload re-applies what the daemon started
        // with (the binary gives its file and flags: cli::run).
        let started_with = config.clone();
        let source: ConfigSource = Arc::new(move || Ok(started_with.clone()));
        let live = Arc::new(Live::new(
            core,
            frontend.clone(),
            live_exits.clone(),
            (drains.clone(), routes),
            (settings.clone(), build, loops),
            source,
        ));
        let reloader = live.clone();
        let admin = Arc::new(Admin {
            router: router.clone(),
            exits: live_exits,
            metrics,
            page: Default::default(),
            walks: Default::default(),
            control: Control {
                reload: Arc::new(move || {
                    let live = reloader.clone();
                    // In a task of its own: an admin client that hangs up
                    // does not cut a reload short between its steps (the
                    // exits it replaces marked, the book of routes written,
                    // the new set not yet in force).
                    let reload = tokio::spawn(async move {
                        live.reload().await.map_err(|e| crate::fault::causes(&e))
                    });
                    Box::pin(async move {
                        reload
                            .await
                            .unwrap_or_else(|e| Err(format!("the reload task failed: {e}")))
                    })
                }),
                drains,
            },
        });
        let admin_addr = match admin_listener {
            Some((bound, bound_addr)) => {
                tasks.spawn(admin::serve(
                    bound,
                    admin.clone(),
                    shutdown.clone(),
                    tasks.clone(),
                ));
                Some(bound_addr)
            }
            None => None,
        };
        let accept = tokio::spawn(front::accept_loop(listener, frontend.clone()));
        tracing::info!(
            listen = %local_addr,
            exits = %exits.iter().map(|e| e.spec.redacted_url()).collect::<Vec<_>>().join(", "),
            ca = %CertificateAuthority::cert_path(&settings.ca_dir).display(),
            "pinproxy is listening"
        );
        Ok(Daemon {
            local_addr,
            admin_addr,
            ca_dir: settings.ca_dir,
            data_dir: settings.data_dir,
            shutdown,
            tasks,
            background,
            accept,
            frontend,
            admin,
            live,
        })
    }

    /// Reloads from now on re-read `source` (the binary: its `--config`
    /// file and flags; by default, the configuration the daemon started
    /// with).
    pub fn set_config_source(&self, source: ConfigSource) {
        self.live.set_source(source);
    }

    /// Re-reads the configuration source and applies it (SIGHUP and
    /// `POST /reload`); a configuration that does not validate is refused
    /// whole and the one in force stays.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.live.reload().await
    }

    /// Applies `config` as a reload would.
    pub async fn reload_with(&self, config: &Config) -> Result<ReloadReport, ReloadError> {
        self.live.apply(config).await
    }

    /// How long a graceful stop lets in-flight requests run
    /// (`timeouts.shutdown` in force).
    pub fn shutdown_grace(&self) -> Duration {
        self.live.settings().timeouts.shutdown
    }

    /// The exits in force.
    pub fn exits(&self) -> Arc<ExitSet> {
        self.live.exits.load()
    }

    /// The admin endpoint's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The admin view (identity listing, exits).
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The data directory in use.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Path of the file clients must trust: the CA certificate, or during a
    /// CA rotation the bundle of the current and the next CA.
    pub fn ca_cert_path(&self) -> PathBuf {
        CertificateAuthority::trust_path(&self.ca_dir)
    }

    /// The CA certificate (PEM).
    pub fn ca_cert_pem(&self) -> &str {
        self.frontend.mitm.certs.ca().cert_pem()
    }

    /// The request pipeline in force (for inspection in tests and tools).
    /// Held, it counts as a request of its configuration still running: a
    /// reload that keys cookie names otherwise refuses pins of those names
    /// until it is dropped (see `untracked::pinnable_during`).
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.frontend.pipeline.load_full()
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
            // Each ends at its next poll, dropping its sockets: none may
            // outlive this call in a program that embeds pinproxy.
            self.tasks.abandon();
            if tokio::time::timeout(ABANDON_WAIT, self.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    remaining = self.tasks.len(),
                    "connections not yet closed a second after being abandoned"
                );
            }
        }
        // What requests left behind (retirements, store writes) must reach
        // the store before it closes.
        self.background.close();
        if tokio::time::timeout(grace, self.background.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.background.len(),
                "background work (retirements, store writes) still running after the grace period"
            );
        }
        let pipeline = self.frontend.pipeline.load_full();
        if let Err(e) = pipeline.router.sync_exit_deaths(&pipeline.exits).await {
            tracing::warn!(error = %e, "could not store exit deaths");
        }
        pipeline.router.store().close().await;
    }
}

/// Binds the proxy listener with an accept queue of `backlog`: the standard
/// library's 128 overflows when a fleet opens hundreds of connections at
/// once, and every dropped SYN stalls its client for a second.
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Restarts must not wait for the previous process's TIME_WAIT sockets.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With Redis, pins outlive their identities by at least ten minutes,
    /// whatever `remember_retired` says: replicas' clocks read apart.
    #[test]
    fn redis_remembers_retired_credentials_at_least_ten_minutes() {
        assert_eq!(redis_keep_ms(0), 600_000);
        assert_eq!(redis_keep_ms(1_000), 600_000);
        assert_eq!(redis_keep_ms(30 * 86_400_000), 30 * 86_400_000);
    }
}
