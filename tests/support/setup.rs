//! Starting pinproxy for a test. A [`Setup`] is a test origin, test exits
//! and an in-process pinproxy over them; [`Setup::builder`] starts one from
//! only what a test changes:
//!
//! ```ignore
//! let s = Setup::builder()
//!     .exits(3)
//!     .clock(clock.clone())
//!     .config(|c| c.identities.retire_policy = RetirePolicy::Strip)
//!     .start()
//!     .await;
//! let s = Setup::builder()
//!     .exit(TestExitSpec::with_auth("127.0.0.2", "u:p"))
//!     .exit(TestExitSpec::plain("127.0.0.3"))
//!     .start()
//!     .await;
//! ```
//!
//! Exits are listed in pinproxy's configuration in the order they are
//! added; a test exit's id is `exit{N}`, N its 1-based place in that list,
//! unless [`TestExitSpec::id`] names it.

use std::net::IpAddr;
use std::time::Duration;

use pinproxy::clock::Clock;
use pinproxy::config::{AdminConfig, Config, ExitConfig};
use pinproxy::exits::health::HealthState;
use pinproxy::identity::ExitId;
use pinproxy::Daemon;

use super::client::{Conn, Jar, ProxyClient, Reply};
use super::exit::{Gateway, TestExit};
use super::origin::{self, Origin};

/// User name and password that give every identity its own upstream session
/// on an exit, the way providers spell it: pinproxy fills in `{session}`.
pub const SESSION_CREDENTIALS: &str = "customer-acme-session-{session}:pw";

/// A pinproxy running in this process with its own data directory.
pub struct Proxy {
    /// The daemon.
    pub daemon: Daemon,
    /// A client that trusts its CA.
    pub client: ProxyClient,
    /// The data directory (deleted on drop).
    pub data_dir: tempfile::TempDir,
    /// The configuration it was started with.
    pub config: Config,
    clock: Clock,
}

impl Proxy {
    /// Starts pinproxy with these `(id, url)` exits, trusting `origin`'s CA;
    /// `tweak` adjusts the configuration first.
    pub async fn start(
        exits: &[(String, String)],
        origin: &Origin,
        tweak: impl FnOnce(&mut Config),
    ) -> Proxy {
        Proxy::start_clocked(exits, origin, Clock::system(), tweak).await
    }

    /// [`Proxy::start`] with a given clock.
    pub async fn start_clocked(
        exits: &[(String, String)],
        origin: &Origin,
        clock: Clock,
        tweak: impl FnOnce(&mut Config),
    ) -> Proxy {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = base_config(&data_dir, origin, exits);
        tweak(&mut config);
        Proxy::launch(config, clock, data_dir).await
    }

    async fn launch(config: Config, clock: Clock, data_dir: tempfile::TempDir) -> Proxy {
        let daemon = Daemon::start_with_clock(&config, clock.clone())
            .await
            .expect("pinproxy starts");
        let client = ProxyClient::new(daemon.local_addr(), daemon.ca_cert_pem());
        Proxy {
            daemon,
            client,
            data_dir,
            config,
            clock,
        }
    }

    /// Stops the daemon.
    pub async fn stop(self) {
        self.daemon.shutdown(Duration::from_secs(5)).await;
    }

    /// Stops the daemon and hands back its data directory, which lives on
    /// until it is dropped.
    pub async fn stop_keeping_data_dir(self) -> tempfile::TempDir {
        self.daemon.shutdown(Duration::from_secs(5)).await;
        self.data_dir
    }

    /// Stops the daemon and starts a new one on the same data directory and
    /// clock, its configuration adjusted by `tweak`.
    pub async fn restart_with(self, tweak: impl FnOnce(&mut Config)) -> Proxy {
        let Proxy {
            daemon,
            data_dir,
            mut config,
            clock,
            ..
        } = self;
        daemon.shutdown(Duration::from_secs(5)).await;
        tweak(&mut config);
        Proxy::launch(config, clock, data_dir).await
    }

    /// The health of exit `id` now.
    pub fn health(&self, id: &str) -> HealthState {
        self.daemon
            .pipeline()
            .exits
            .get(&ExitId::new(id))
            .unwrap()
            .health
            .state()
    }

    /// Waits until exit `id` is in health state `want`; panics with
    /// `reason` if it is not within `within`.
    pub async fn wait_for_health(
        &self,
        id: &str,
        want: HealthState,
        within: Duration,
        reason: &str,
    ) {
        let exits = &self.daemon.pipeline().exits;
        let mut changes = exits.get(&ExitId::new(id)).unwrap().health.subscribe();
        tokio::time::timeout(within, changes.wait_for(|state| *state == want))
            .await
            .expect(reason)
            .unwrap();
    }
}

/// The configuration every test starts from: loopback listeners on free
/// ports, `data_dir`, trust in `origin`'s CA, and these `(id, url)` exits.
fn base_config(
    data_dir: &tempfile::TempDir,
    origin: &Origin,
    exits: &[(String, String)],
) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: Some(data_dir.path().to_owned()),
        upstream_ca: vec![origin.pki.ca_file.clone()],
        admin: AdminConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
        },
        exits: exits
            .iter()
            .map(|(id, url)| ExitConfig::new(id, url))
            .collect(),
        ..Config::default()
    }
}

/// A test exit to start: where it egresses, what it demands, how pinproxy
/// names and reaches it.
pub struct TestExitSpec {
    kind: ExitKind,
    id: Option<String>,
    url_credentials: Option<String>,
}

enum ExitKind {
    Plain { source: String },
    Auth { source: String, demands: String },
    Gateway(Gateway),
}

impl TestExitSpec {
    /// An exit egressing from `source` (e.g. "127.0.0.2").
    pub fn plain(source: &str) -> TestExitSpec {
        TestExitSpec::of(ExitKind::Plain {
            source: source.to_owned(),
        })
    }

    /// An exit that demands `user:pass` Basic credentials; pinproxy's URL
    /// for it carries them unless [`TestExitSpec::url_credentials`] says
    /// otherwise.
    pub fn with_auth(source: &str, credentials: &str) -> TestExitSpec {
        TestExitSpec::of(ExitKind::Auth {
            source: source.to_owned(),
            demands: credentials.to_owned(),
        })
        .url_credentials(credentials)
    }

    /// A sticky-session gateway exit (see [`Gateway`]).
    pub fn gateway(gateway: Gateway) -> TestExitSpec {
        TestExitSpec::of(ExitKind::Gateway(gateway))
    }

    fn of(kind: ExitKind) -> TestExitSpec {
        TestExitSpec {
            kind,
            id: None,
            url_credentials: None,
        }
    }

    /// Its exit id in pinproxy's configuration.
    pub fn id(mut self, id: &str) -> TestExitSpec {
        self.id = Some(id.to_owned());
        self
    }

    /// `user:pass` in pinproxy's URL for the exit.
    pub fn url_credentials(mut self, credentials: &str) -> TestExitSpec {
        self.url_credentials = Some(credentials.to_owned());
        self
    }

    /// [`SESSION_CREDENTIALS`] in pinproxy's URL for the exit: one upstream
    /// session name per identity.
    pub fn with_sessions(self) -> TestExitSpec {
        self.url_credentials(SESSION_CREDENTIALS)
    }

    /// Starts the exit; returns it with pinproxy's URL for it.
    pub async fn start(self) -> (TestExit, String) {
        let exit = match self.kind {
            ExitKind::Plain { source } => TestExit::start(&source).await,
            ExitKind::Auth { source, demands } => {
                TestExit::start_with_auth(&source, Some(&demands)).await
            }
            ExitKind::Gateway(gateway) => TestExit::start_gateway(gateway).await,
        };
        let url = match self.url_credentials {
            Some(credentials) => format!("http://{credentials}@{}", exit.addr),
            None => exit.url(),
        };
        (exit, url)
    }
}

/// One entry of the exit list being built.
enum PlannedExit {
    /// A test exit the harness starts and keeps.
    Test(TestExitSpec),
    /// An exit pinproxy is given by URL only (direct, SOCKS, a third-party
    /// proxy, a closed port).
    Url { id: String, url: String },
}

/// Starts the test exits among `planned`; returns them and the whole
/// `(id, url)` list.
async fn start_exits(planned: Vec<PlannedExit>) -> (Vec<TestExit>, Vec<(String, String)>) {
    let mut running = Vec::new();
    let mut listed = Vec::new();
    for (n, planned) in planned.into_iter().enumerate() {
        match planned {
            PlannedExit::Test(spec) => {
                let id = spec.id.clone().unwrap_or_else(|| format!("exit{}", n + 1));
                let (exit, url) = spec.start().await;
                listed.push((id, url));
                running.push(exit);
            }
            PlannedExit::Url { id, url } => listed.push((id, url)),
        }
    }
    (running, listed)
}

/// Starts `n` test exits egressing from 127.0.0.2, 127.0.0.3, ... and
/// returns them with their `(id, url)` pairs.
pub async fn exits(n: usize) -> (Vec<TestExit>, Vec<(String, String)>) {
    start_exits(Setup::builder().exits(n).exits).await
}

/// What a configuration tweak may look at: the origin and the test exits,
/// already running.
pub struct Env<'e> {
    /// The origin.
    pub origin: &'e Origin,
    /// The test exits, in the order they were added.
    pub exits: &'e [TestExit],
}

type Tweak<'a> = Box<dyn for<'e> FnOnce(&mut Config, &Env<'e>) + 'a>;

/// Builds a [`Setup`]; see the module documentation.
pub struct SetupBuilder<'a> {
    http1_only_origin: bool,
    exits: Vec<PlannedExit>,
    clock: Clock,
    tweaks: Vec<Tweak<'a>>,
}

impl<'a> SetupBuilder<'a> {
    /// `n` more plain test exits, egressing from 127.0.0.{K+2}, K the
    /// number of test exits added before (127.0.0.2, 127.0.0.3, ... when
    /// they are the only ones).
    pub fn exits(mut self, n: usize) -> Self {
        for _ in 0..n {
            let running = self
                .exits
                .iter()
                .filter(|e| matches!(e, PlannedExit::Test(_)))
                .count();
            let source = format!("127.0.0.{}", running + 2);
            self.exits
                .push(PlannedExit::Test(TestExitSpec::plain(&source)));
        }
        self
    }

    /// One more test exit.
    pub fn exit(mut self, spec: TestExitSpec) -> Self {
        self.exits.push(PlannedExit::Test(spec));
        self
    }

    /// One more exit that the test runs itself (or that needs nothing
    /// running: `direct://`, a closed port), given to pinproxy by URL.
    pub fn exit_url(mut self, id: &str, url: impl Into<String>) -> Self {
        self.exits.push(PlannedExit::Url {
            id: id.to_owned(),
            url: url.into(),
        });
        self
    }

    /// [`SetupBuilder::exit_url`] for each `(id, url)`.
    pub fn exit_urls(self, exits: &[(String, String)]) -> Self {
        exits
            .iter()
            .fold(self, |builder, (id, url)| builder.exit_url(id, url.clone()))
    }

    /// An origin that speaks HTTP/1.1 only.
    pub fn http1_only_origin(mut self) -> Self {
        self.http1_only_origin = true;
        self
    }

    /// pinproxy's clock (the system clock otherwise).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Adjusts pinproxy's configuration (after the ones before).
    pub fn config(self, tweak: impl FnOnce(&mut Config) + 'a) -> Self {
        self.config_with(move |config, _| tweak(config))
    }

    /// Adjusts pinproxy's configuration knowing the running origin and
    /// test exits.
    pub fn config_with(mut self, tweak: impl FnOnce(&mut Config, &Env<'_>) + 'a) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// Health probes to the test origin every 50 ms: one failure makes an
    /// exit unhealthy, `dead_after` make it dead.
    pub fn probe_health(self, dead_after: u32) -> Self {
        self.config_with(move |c, env| {
            c.health.probe_target = Some(format!("localhost:{}", env.origin.https.port()));
            c.health.interval = Duration::from_millis(50);
            c.health.unhealthy_after = 1;
            c.health.dead_after = dead_after;
        })
    }

    /// Starts the origin, then the exits, then pinproxy.
    pub async fn start(self) -> Setup {
        let origin = if self.http1_only_origin {
            Origin::start_http1_only().await
        } else {
            Origin::start().await
        };
        let (exits, listed) = start_exits(self.exits).await;
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = base_config(&data_dir, &origin, &listed);
        let env = Env {
            origin: &origin,
            exits: &exits,
        };
        for tweak in self.tweaks {
            tweak(&mut config, &env);
        }
        let proxy = Proxy::launch(config, self.clock, data_dir).await;
        Setup {
            origin,
            exits,
            proxy,
        }
    }
}

/// A test origin, test exits and a pinproxy over them.
pub struct Setup {
    /// The origin.
    pub origin: Origin,
    /// The test exits, in the order they were added (by default egressing
    /// from 127.0.0.2, 127.0.0.3, ...).
    pub exits: Vec<TestExit>,
    /// pinproxy.
    pub proxy: Proxy,
}

impl Setup {
    /// A builder with no exit, the system clock and the default
    /// configuration.
    pub fn builder<'a>() -> SetupBuilder<'a> {
        SetupBuilder {
            http1_only_origin: false,
            exits: Vec::new(),
            clock: Clock::system(),
            tweaks: Vec::new(),
        }
    }

    /// Starts everything with `n` exits and default settings.
    pub async fn start(n: usize) -> Setup {
        Setup::builder().exits(n).start().await
    }

    /// Starts everything, `tweak` adjusting pinproxy's configuration.
    pub async fn start_with(n: usize, tweak: impl FnOnce(&mut Config)) -> Setup {
        Setup::builder().exits(n).config(tweak).start().await
    }

    /// Starts everything with a given clock.
    pub async fn start_clocked(n: usize, clock: Clock, tweak: impl FnOnce(&mut Config)) -> Setup {
        Setup::builder()
            .exits(n)
            .clock(clock)
            .config(tweak)
            .start()
            .await
    }

    /// Restarts pinproxy on the same data directory, origin and exits.
    pub async fn restart(self) -> Setup {
        self.restart_with(|_| {}).await
    }

    /// Restarts pinproxy on the same data directory, origin and exits, its
    /// configuration adjusted by `tweak`.
    pub async fn restart_with(self, tweak: impl FnOnce(&mut Config)) -> Setup {
        Setup {
            proxy: self.proxy.restart_with(tweak).await,
            ..self
        }
    }

    /// A fresh tunnel to the HTTPS origin.
    pub async fn tunnel(&self) -> Conn {
        self.proxy
            .client
            .tunnel("localhost", self.origin.https.port())
            .await
    }

    /// GETs `path` on a fresh tunnel with extra headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.tunnel().await.get(path, headers).await
    }

    /// The index (0-based) of the test exit whose address is `ip`.
    pub fn exit_of(&self, ip: IpAddr) -> usize {
        self.exits
            .iter()
            .position(|e| e.source == ip)
            .expect("a test exit's address")
    }

    /// GETs `path` on the HTTPS origin in a fresh tunnel with `jar`.
    pub async fn get(&self, path: &str, jar: &mut Jar) -> Reply {
        self.tunnel().await.get_with_jar(path, jar).await
    }

    /// Logs in (`/login` or a variant) in a fresh tunnel: the new jar and
    /// the exit address the cookie is bound to.
    pub async fn login(&self, path: &str) -> (Jar, IpAddr) {
        let mut jar = Jar::default();
        let reply = self.get(path, &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        (
            jar,
            origin::reported_peer(&reply.body).expect("origin reports the peer"),
        )
    }

    /// The address the origin saw for a reply.
    pub fn peer(reply: &Reply) -> Option<IpAddr> {
        origin::reported_peer(&reply.body)
    }

    /// Stops pinproxy.
    pub async fn stop(self) {
        self.proxy.stop().await;
    }

    /// Starts stopping pinproxy with `grace` in a task of its own, for a
    /// test that watches what the shutdown waits for; the origin and the
    /// exits live on in the answer.
    pub fn begin_shutdown(self, grace: Duration) -> ShuttingDown {
        let Setup {
            origin,
            exits,
            proxy,
        } = self;
        let Proxy {
            daemon, data_dir, ..
        } = proxy;
        ShuttingDown {
            shutdown: tokio::spawn(daemon.shutdown(grace)),
            _held: (origin, exits, data_dir),
        }
    }
}

/// A [`Setup`] whose pinproxy is stopping ([`Setup::begin_shutdown`]).
pub struct ShuttingDown {
    shutdown: tokio::task::JoinHandle<()>,
    _held: (Origin, Vec<TestExit>, tempfile::TempDir),
}

impl ShuttingDown {
    /// Whether the shutdown is still waiting `window` from now (a window
    /// to see that something does not happen: there is no signal for it).
    pub async fn still_waiting_after(&mut self, window: Duration) -> bool {
        tokio::time::timeout(window, &mut self.shutdown)
            .await
            .is_err()
    }

    /// Waits for the shutdown to end, failing the test with `what` if it
    /// has not after `limit`.
    pub async fn ends_within(self, limit: Duration, what: &str) {
        tokio::time::timeout(limit, self.shutdown)
            .await
            .unwrap_or_else(|_| panic!("{what}: still shutting down after {limit:?}"))
            .unwrap();
    }
}
