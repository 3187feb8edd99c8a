//! What a reload changes while the daemon runs, and how.
//!
//! A request takes the [`Pipeline`] in force when it starts (one atomic
//! load, no lock) and keeps it to its end: the exits, tracked-cookie
//! patterns and policies it sees never change under it. A reload builds a
//! whole new pipeline beside the old one and swaps it in; requests and
//! client connections already open are not touched, and an exit that was
//! removed still carries the requests already routed through it.
//!
//! What a reload applies: exits (added, removed, re-weighted, options
//! changed; an exit that stays keeps its drain state, its health while its
//! URL and credentials are the same, and its pools when its route did not
//! change), tracked cookies, `upstream_ca`,
//! `[identities]`, `[health]`, `store.on_unavailable`, the upstream
//! timeouts and pool size, `timeouts.shutdown`. Keys read only at start
//! ([`Settings::restart_needed`]) keep their values; the reload says which
//! changed. A configuration that does not validate is refused whole.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::control::ReloadReport;
use crate::clock::{duration_ms, Clock};
use crate::config::{Config, ConfigError, Settings};
use crate::credential::PinHasher;
use crate::daemon::untracked::NamesChange;
use crate::exits::drain::DrainBook;
use crate::exits::health::Thresholds;
use crate::exits::routes::RouteBook;
use crate::exits::spec::ExitSpec;
use crate::exits::{Exit, ExitBuild, ExitSet, LiveExits};
use crate::front::Frontend;
use crate::metrics::Metrics;
use crate::net::tasks::ConnectionTasks;
use crate::proxy::auth::Auth;
use crate::proxy::capture::invalidation;
use crate::proxy::credentials::cookies::CookiePolicy;
use crate::proxy::Pipeline;
use crate::routing::{Policies, Router};
use crate::upstream::dial::guard::AddressGuard;
use crate::upstream::tls::{TlsSetupError, UpstreamTls};
use crate::upstream::unread::Unread;
use crate::upstream::PoolSettings;

/// Where a reload reads the configuration: the same file and flags the
/// daemon started from (blocking: it is called off the runtime).
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Why a reload was refused (the configuration in force stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration could not be read.
    #[error("cannot read the configuration: {0}")]
    Source(String),
    /// The new configuration is invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// A new `upstream_ca` file is unusable.
    #[error(transparent)]
    UpstreamTls(#[from] TlsSetupError),
    /// A reload task failed to run.
    #[error("reload task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The store holds pins of cookie names the new configuration no
    /// longer tracks.
    #[error(transparent)]
    UntrackedPins(#[from] crate::daemon::untracked::UntrackedPins),
    /// The tracked cookies change against those a Redis fleet put in
    /// force (see `untracked::check_fleet`).
    #[error(transparent)]
    FleetTracking(#[from] crate::daemon::untracked::FleetTracking),
    /// The exits' routes could not be remembered (see `exits::routes`).
    #[error("{0} (the exits' routes must be remembered before a change applies)")]
    Routes(String),
}

/// What every pipeline shares, built once at start.
#[derive(Debug)]
pub(super) struct Core {
    /// Identities and routing (its policies are swapped by a reload).
    pub router: Arc<Router>,
    /// How credentials become pin keys.
    pub hasher: PinHasher,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Background work started by requests (awaited at shutdown).
    pub background: TaskTracker,
    /// Connections and loops.
    pub tasks: ConnectionTasks,
    /// Cancelled when the daemon stops (the loops' tokens are children).
    pub shutdown: CancellationToken,
    /// The clock.
    pub clock: Clock,
    /// TLS crypto, for a new `upstream_ca` trust store.
    pub provider: Arc<rustls::crypto::CryptoProvider>,
    /// SSRF guard: own listeners, `upstream.deny_ranges` (read at start).
    pub guard: Arc<AddressGuard>,
    /// The bounds on answers clients stopped reading (read at start).
    pub unread: Arc<Unread>,
    /// Identities' in-flight counts and pacing, kept across reloads.
    pub pacer: Arc<crate::proxy::pacing::Pacer>,
    /// The exits in force (each reload's in turn).
    pub live_exits: Arc<LiveExits>,
}

/// The settings a reload compares with, and the loops it restarts.
struct Applied {
    /// In force at start: keys that need a restart are compared with these.
    started: Settings,
    /// Applied last.
    settings: Settings,
    build: ExitBuild,
    /// Cancels the probe and sweep loops of the settings in force.
    loops: CancellationToken,
    /// The cookie policies of reloads before whose requests may still run
    /// (their pipelines), where a reload since keyed names otherwise: pins
    /// are judged against each until its requests have ended (see
    /// `untracked::pinnable_during`).
    settling: Vec<(CookiePolicy, std::sync::Weak<Pipeline>)>,
}

/// The running daemon's reloadable state.
pub(super) struct Live {
    /// What every pipeline shares.
    pub core: Core,
    /// Where the pipeline in force is swapped.
    pub frontend: Arc<Frontend>,
    /// The exits in force (admin, sweep).
    pub exits: Arc<LiveExits>,
    /// Drained exits remembered across restarts.
    pub drains: Arc<DrainBook>,
    /// The exits' routes remembered across restarts (see `exits::routes`).
    pub routes: Arc<RouteBook>,
    /// One reload at a time (the control plane only; requests never wait).
    applied: tokio::sync::Mutex<Applied>,
    /// The settings in force, for readers that must not wait.
    settings: ArcSwap<Settings>,
    /// What a reload re-reads.
    source: std::sync::Mutex<ConfigSource>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Live {
    /// The state of a daemon that just started with `settings` (its
    /// loops already running under `loops`); reloads re-read `source`.
    pub fn new(
        core: Core,
        frontend: Arc<Frontend>,
        exits: Arc<LiveExits>,
        books: (Arc<DrainBook>, Arc<RouteBook>),
        started: (Settings, ExitBuild, CancellationToken),
        source: ConfigSource,
    ) -> Live {
        let (settings, build, loops) = started;
        let (drains, routes) = books;
        Live {
            core,
            frontend,
            exits,
            drains,
            routes,
            settings: ArcSwap::from_pointee(settings.clone()),
            applied: tokio::sync::Mutex::new(Applied {
                started: settings.clone(),
                settings,
                build,
                loops,
                settling: Vec::new(),
            }),
            source: std::sync::Mutex::new(source),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// Reloads from now on read `source`.
    pub fn set_source(&self, source: ConfigSource) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = source;
    }

    /// Re-reads the configuration source and applies it.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let source = self
            .source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let config = tokio::task::spawn_blocking(move || source())
            .await?
            .map_err(ReloadError::Source);
        match config {
            Ok(config) => self.apply(&config).await,
            Err(e) => Err(refused(e)),
        }
    }

    /// Validates `config` and puts it in force (logged either way).
    pub async fn apply(&self, config: &Config) -> Result<ReloadReport, ReloadError> {
        match self.try_apply(config).await {
            Ok(report) => {
                tracing::info!(
                    added = ?report.added,
                    removed = ?report.removed,
                    changed = ?report.changed,
                    "configuration reloaded"
                );
                if !report.restart_needed.is_empty() {
                    tracing::warn!(
                        keys = %report.restart_needed.join(", "),
                        "reload: these keys changed but only take effect after a restart; \
                         their old values stay in force"
                    );
                }
                let shared_store = self.core.router.policies().shared_store;
                for id in &report.removed {
                    if shared_store {
                        tracing::warn!(
                            exit = %id,
                            "exit removed: its identities' requests are refused on this replica \
                             (exit-missing) and left alive for replicas that still have it; they \
                             retire once unused for identities.idle_timeout, or past \
                             identities.max_lifetime"
                        );
                    } else {
                        tracing::warn!(exit = %id, "exit removed: its identities retire (exit-removed)");
                    }
                }
                Ok(report)
            }
            Err(e) => Err(refused(e)),
        }
    }

    async fn try_apply(&self, config: &Config) -> Result<ReloadReport, ReloadError> {
        let settings = config.validate()?;
        let mut applied = self.applied.lock().await;
        // The open-proxy rule (`Config::validate`) for the address the proxy
        // is bound to, which a reload does not move: a file that moves
        // `listen` to loopback and drops its users would otherwise leave the
        // bound socket open to anyone until the restart it asks for.
        let bound = applied.started.listen;
        if !bound.ip().is_loopback()
            && settings.auth.users.is_empty()
            && !config.insecure_open_proxy
        {
            return Err(ReloadError::Invalid(ConfigError::OpenProxy(bound)));
        }
        let restart_needed = applied.started.restart_needed(&settings);
        let tls_changed = applied.settings.upstream_ca != settings.upstream_ca;
        let tls = if tls_changed {
            let provider = self.core.provider.clone();
            let files = settings.upstream_ca.clone();
            tokio::task::spawn_blocking(move || UpstreamTls::new(provider, &files)).await??
        } else {
            applied.build.tls.clone()
        };
        // Pins of names the new configuration drops would go unenforced:
        // refused if the store holds any. Walks every pin held: off the
        // runtime.
        // So would pins of names it keys otherwise (an exact name respelt:
        // its keys are hashed in the policy's spelling), than the policy in
        // force or one whose requests still run since a reload that rekeyed.
        applied.settling.retain(|(_, runs)| runs.strong_count() > 0);
        let in_force = self.frontend.pipeline.load_full();
        let mut olds = vec![applied.settings.cookies.clone()];
        olds.extend(applied.settling.iter().map(|(old, _)| old.clone()));
        let untracked = || {
            let router = self.core.router.clone();
            let (cookies, olds, release) = (
                settings.cookies.clone(),
                olds.clone(),
                settings.identities.release_untracked_pins,
            );
            tokio::task::spawn_blocking(move || {
                crate::daemon::untracked::check(router.store(), &cookies, &olds, release)
            })
        };
        let rekeyed = olds.iter().any(|old| !settings.cookies.keys_alike(old));
        if rekeyed {
            // The usual refusal, before anything changes.
            untracked().await??;
        }
        // The fleet's pins, which Redis cannot list, are judged by the
        // patterns the fleet last put in force, and these become its
        // record at once unless another replica changed it since (then
        // judged again). A reload refused after this leaves the fleet's
        // record ahead of this replica, which the other replicas' changes
        // are then judged against: more refusals, no missed pin (unless
        // released).
        let patterns_changed = settings.cookies.patterns() != applied.settings.cookies.patterns();
        if patterns_changed {
            let store = self.core.router.store();
            let release = settings.identities.release_untracked_pins;
            let judged =
                crate::daemon::untracked::check_fleet(store, &settings.cookies, release).await?;
            crate::daemon::untracked::claim_fleet(store, &settings.cookies, judged, release)
                .await?;
        }
        // Requests begun before go on with the old configuration and may
        // pin such a name after that walk; so from here only names the new
        // configuration finds are pinned (a write of another is refused;
        // while requests of the old one run, none of a name the two key
        // otherwise), the walk is made again once the writes admitted
        // before have ended, and a refused reload puts the old names back
        // (see `store::pinnable`).
        let mut running = applied.settling.clone();
        running.push((applied.settings.cookies.clone(), Arc::downgrade(&in_force)));
        drop(in_force);
        let test = if rekeyed {
            let older = running
                .iter()
                .map(|(old, pipeline)| {
                    let pipeline = pipeline.clone();
                    let runs: Box<dyn Fn() -> bool + Send + Sync> =
                        Box::new(move || pipeline.strong_count() > 0);
                    (old.clone(), runs)
                })
                .collect();
            crate::daemon::untracked::pinnable_during(&settings.cookies, older)
        } else {
            crate::daemon::untracked::pinnable(&settings.cookies)
        };
        let names = NamesChange::make(self.core.router.store().pinnable(), test);
        if rekeyed {
            names.wait_out().await;
            untracked().await??;
        }
        let shared = (self.core.guard.clone(), self.core.unread.clone());
        let build = exit_build(&settings, tls, shared, &self.core.metrics);
        let previous = self.exits.load();
        let set = build.set(
            &settings.exits,
            &previous,
            (!tls_changed).then_some(&applied.build),
            self.core.clock.now_ms(),
        );
        let report = ReloadReport {
            added: ids(&set, |id| previous.get(id).is_none()),
            removed: ids(&previous, |id| set.get(id).is_none()),
            changed: ids(&set, |id| {
                previous
                    .get(id)
                    .zip(set.get(id))
                    .is_some_and(|(old, new)| old.spec != new.spec)
            }),
            restart_needed,
        };
        // An exit whose route changed under its id: the identities founded
        // on the old route retire, unless the exit keeps them (see
        // `exits::routes`). The exits being replaced are marked before the
        // change is dated, so that a request still on one of them that
        // founds an identity after the date sees the mark (see
        // `Exit::superseded`); a book that cannot be written refuses the
        // reload, since a change kept only in memory would be forgotten at
        // the next start.
        crate::exits::routes::found_on(&set, &self.core.hasher);
        let specs: Vec<&ExitSpec> = set.iter().map(|exit| &exit.spec).collect();
        let mut plan = self.routes.plan(&specs);
        let replaced: Vec<(Arc<Exit>, bool)> = plan
            .changes
            .iter()
            .filter_map(|change| Some((previous.get(&change.exit).cloned()?, change.kept)))
            .collect();
        for (exit, kept) in &replaced {
            exit.mark_replaced(*kept);
        }
        plan.date(self.core.clock.now_ms());
        let routes = self.routes.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let committed = routes.commit(&plan);
            (plan, committed)
        })
        .await;
        // Refused: the exits in force are theirs again.
        let unmark = || {
            for (exit, _) in &replaced {
                exit.unmark_replaced();
            }
        };
        let plan = match committed {
            Ok((plan, Ok(()))) => plan,
            Ok((_, Err(e))) => {
                unmark();
                return Err(ReloadError::Routes(e.to_string()));
            }
            Err(e) => {
                unmark();
                return Err(ReloadError::Task(e));
            }
        };
        // Past the last refusal: the new names stay, and while requests of
        // the policies before run, later reloads judge pins against them.
        names.keep();
        if rekeyed {
            applied.settling = running;
        }
        // What the next start judges the pins against. Not a refusal: the
        // reload is in force from here. The store refuses the record only
        // once its writer has stopped (then it writes no pin either, so
        // none is keyed as this reload keys) or while its disk hangs (the
        // record stays queued, and lands with the pins behind it).
        if patterns_changed {
            if let Err(e) = self
                .core
                .router
                .store()
                .record_tracking(settings.cookies.patterns())
                .await
            {
                tracing::warn!(
                    error = %e,
                    "reload: the pin store could not record the tracked-cookie patterns; \
                     the next start judges its pins against those before"
                );
            }
        }
        plan.mark(&set);
        plan.vouch(&set);
        let routes_retire = plan.changes.iter().any(|change| !change.kept);
        // Deaths another replica (or an earlier run) recorded for an exit
        // that comes back: its old identities must still retire.
        if let Err(e) = self.core.router.sync_exit_deaths(&set).await {
            tracing::warn!(error = %e, "reload: could not read exit deaths from the store; the sweep will");
        }
        let set = Arc::new(set);
        // The store in use is the one started with (`store.url` is read at
        // start only): whether it is shared decides how a missing exit ends.
        self.core
            .router
            .set_policies(policies(&settings, &applied.started));
        self.exits.store(set.clone());
        build.put_in_force(&set);
        // A removed exit's identities retire (the store not shared: see
        // `apply`), and at once on every path: requests of theirs still
        // connecting through it write nothing more, and one founding an
        // identity on it retires that identity.
        if !self.core.router.policies().shared_store {
            for old in previous.iter().filter(|old| set.get(old.id()).is_none()) {
                old.mark_removed();
            }
        }
        // The health of a route replaced under its id is let go once the
        // new set is in force (before, the old exit still serves; a reload
        // refused, or given up while it ran, keeps it).
        for exit in set.iter() {
            if let Some(old) = previous.get(exit.id()) {
                if !Arc::ptr_eq(&old.health, &exit.health) {
                    old.health.let_go();
                }
            }
        }
        // With both in force: a relay spacing its checks by an idle
        // timeout the reload shortened would record its uses that much
        // late, and other replicas, which judge its identity by the uses
        // stored, would find it idle while in use.
        self.core.router.relays_reloaded();
        // Read at start only (see `Settings::restart_needed`).
        let pipeline = pipeline(&settings, set.clone(), &self.core, &applied.started.limits);
        self.frontend.pipeline.store(Arc::new(pipeline));
        // Requests already waiting in an identity's line judge by the new
        // limit from now on (a line that now has room goes on).
        self.core.pacer.apply(&settings.identities.pacing());

        applied.loops.cancel();
        applied.loops = spawn_loops(
            &self.core,
            &self.exits,
            &settings,
            !report.removed.is_empty() || routes_retire,
        );
        let forgot_drained = report.removed.iter().any(|id| {
            previous
                .iter()
                .any(|e| e.id().as_str() == id && e.drained())
        });
        if forgot_drained {
            if let Err(e) = self.drains.write(&self.exits).await {
                tracing::warn!(error = %e, "could not rewrite the drained exits");
            }
        }
        self.settings.store(Arc::new(settings.clone()));
        applied.settings = settings;
        applied.build = build;
        Ok(report)
    }
}

fn refused(e: ReloadError) -> ReloadError {
    tracing::error!(error = %crate::fault::causes(&e), "reload refused; the configuration in force stays");
    e
}

/// The ids of the exits of `set` that `keep` selects.
fn ids(set: &ExitSet, keep: impl Fn(&crate::identity::ExitId) -> bool) -> Vec<String> {
    set.iter()
        .map(|e| e.id())
        .filter(|id| keep(id))
        .map(|id| id.to_string())
        .collect()
}

/// The request pipeline for `settings` over `exits`.
pub(super) fn pipeline(
    settings: &Settings,
    exits: Arc<ExitSet>,
    core: &Core,
    started: &crate::config::Limits,
) -> Pipeline {
    let identities = &settings.identities;
    Pipeline {
        cookies: settings.cookies.clone(),
        hasher: core.hasher.clone(),
        router: core.router.clone(),
        exits,
        max_header_bytes: started.max_header_bytes,
        max_headers: started.max_headers,
        fingerprint_policy: identities.fingerprint_policy,
        on_unavailable: settings.on_unavailable,
        invalidation: invalidation::Rules::new(
            identities.invalidation.clone(),
            identities.scan_limit,
        ),
        metrics: core.metrics.clone(),
        tasks: core.background.clone(),
        connections: core.tasks.clone(),
        warned_chrome_user_agent: Default::default(),
        auth: Arc::new(Auth::new(&settings.auth)),
        guard: core.guard.clone(),
        pacer: core.pacer.clone(),
        pacing: settings.identities.pacing(),
        relay_idle: settings.timeouts.relay_idle,
        live_exits: core.live_exits.clone(),
    }
}

/// The routing policies `settings` describe, for a daemon `started` with
/// the settings it started with (its store, and with Redis the time
/// retired credentials are remembered: Redis's keys were given their
/// lifetimes from it, and the journal must not forget before them).
pub(super) fn policies(settings: &Settings, started: &Settings) -> Policies {
    let identities = &settings.identities;
    let shared_store = matches!(started.store, crate::config::StoreKind::Redis { .. });
    let remember_retired = if shared_store {
        started.identities.remember_retired
    } else {
        identities.remember_retired
    };
    Policies {
        retire: identities.retire_policy,
        conflict: identities.conflict_policy,
        idle_timeout_ms: duration_ms(identities.idle_timeout),
        max_lifetime_ms: duration_ms(identities.max_lifetime),
        keep_retired_ms: if shared_store {
            super::redis_keep_ms(duration_ms(remember_retired))
        } else {
            duration_ms(remember_retired)
        },
        shared_store,
    }
}

/// What every exit of `settings` is built with, sharing the daemon's
/// address guard and bounds on unread answers.
pub(super) fn exit_build(
    settings: &Settings,
    tls: UpstreamTls,
    (guard, unread): (Arc<AddressGuard>, Arc<Unread>),
    metrics: &Metrics,
) -> ExitBuild {
    let health = &settings.health;
    ExitBuild {
        tls,
        pool: PoolSettings {
            connect_timeout: settings.timeouts.connect,
            response_head_timeout: settings.timeouts.response_head,
            idle_timeout: settings.timeouts.pool_idle,
            max_idle_per_origin: settings.limits.max_idle_per_origin,
            max_idle_per_exit: settings.limits.max_idle_per_exit,
            guard,
            parked: metrics.upstream_connections_parked.clone(),
            replayed: metrics.upstream_requests_replayed.clone(),
            unread,
        },
        thresholds: Thresholds {
            unhealthy_after: health.unhealthy_after,
            dead_after: health.dead_after,
            healthy_after: health.healthy_after,
        },
        // Without probes, trial requests are how an unhealthy exit recovers.
        trial_interval_ms: match settings.probe_target {
            Some(_) => None,
            None => Some(duration_ms(health.retry_interval)),
        },
    }
}

/// Starts the sweep loop and the exits' probe loops for `settings`; they
/// stop when the returned token (a child of the shutdown) is cancelled.
/// `sweep_now`: sweep at once (exits were removed).
pub(super) fn spawn_loops(
    core: &Core,
    exits: &Arc<LiveExits>,
    settings: &Settings,
    sweep_now: bool,
) -> CancellationToken {
    let loops = core.shutdown.child_token();
    core.tasks.spawn(crate::routing::lifecycle::sweep_loop(
        core.router.clone(),
        exits.clone(),
        settings.identities.sweep_interval,
        sweep_now,
        loops.clone(),
    ));
    for exit in exits.iter() {
        core.tasks.spawn(crate::routing::lifecycle::on_exit_deaths(
            core.router.clone(),
            exit.clone(),
            loops.clone(),
        ));
    }
    if let Some(target) = &settings.probe_target {
        for exit in exits.iter() {
            core.tasks.spawn(crate::exits::probe_loop(
                exit,
                target.clone(),
                settings.health.interval,
                core.clock.clone(),
                loops.clone(),
            ));
        }
    }
    loops
}
