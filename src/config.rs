//! Configuration: one typed, documented struct, read from TOML, overlaid by
//! command-line flags (flags win) and validated once into [`Settings`], the
//! runtime form every other module consumes.
//!
//! The `///` comments on [`Config`] and its parts are the reference for the
//! TOML file; `config/pinproxy.example.toml` mirrors them and a test checks
//! that the example parses and validates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;

use crate::exits::select::MAX_WEIGHT;
use crate::exits::{ExitOptions, ExitSpec, ExitUrlError};
use crate::fingerprint::FingerprintPolicy;
use crate::identity::ExitId;
use crate::mitm::ca::CaError;
use crate::mitm::policy::{HostPatternError, InterceptPolicy};
use crate::net::HostPort;
use crate::proxy::auth::{AuthSettings, User, UserError};
use crate::proxy::capture::invalidation::{default_rules, InvalidationRule};
use crate::proxy::credentials::cookies::{CookiePolicy, PatternError};
use crate::routing::{ConflictPolicy, RetirePolicy};
use crate::telemetry::LogFormat;
use crate::upstream::dial::guard::{parse_ranges, DEFAULT_DENY_RANGES};
use crate::upstream::egress_ip::EchoTarget;
use crate::upstream::FingerprintMode;
use ipnet::IpNet;

mod durations;
mod sizes;

pub use crate::store::Unavailable;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the proxy listens on. Loopback by default; a non-loopback
    /// address needs client authentication (`[[auth.users]]`) or
    /// `insecure_open_proxy = true`.
    pub listen: SocketAddr,
    /// Allow a non-loopback admin endpoint (`admin.listen`). The admin
    /// endpoint has no authentication: restrict who can reach it. (It no
    /// longer opens the proxy listener: see `insecure_open_proxy`.)
    pub allow_remote: bool,
    /// Allow a non-loopback proxy listener without client authentication:
    /// anyone who can reach the port can use the exits (an open proxy).
    pub insecure_open_proxy: bool,
    /// Client authentication.
    pub auth: AuthConfig,
    /// The CA that signs intercepted hosts' leaves.
    pub ca: CaConfig,
    /// Directory for the CA, the pin-hashing key and the embedded pin store.
    /// Default: `pinproxy` under the user's data directory
    /// (`~/.local/share/pinproxy` on Linux). Created when missing.
    pub data_dir: Option<PathBuf>,
    /// Extra PEM files of CA certificates to trust for origin servers, on top
    /// of the public web roots compiled into pinproxy.
    pub upstream_ca: Vec<PathBuf>,
    /// Extra cookie names or globs (`session_*`) to track, added to the
    /// built-in anti-bot set (see `cookies::DEFAULT_TRACKED`).
    pub track_cookies: Vec<String>,
    /// Upstream exits. Empty means one built-in `direct` exit (egress from
    /// this machine).
    pub exits: Vec<ExitConfig>,
    /// Size and count limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// TLS interception settings.
    pub mitm: MitmConfig,
    /// Identity lifetimes and policies.
    pub identities: IdentityConfig,
    /// Exit health checks.
    pub health: HealthConfig,
    /// The admin endpoint (metrics, identity listing).
    pub admin: AdminConfig,
    /// Where pins and identities live.
    pub store: StoreConfig,
    /// How connections to origins look.
    pub upstream: UpstreamConfig,
    /// Log format and the access log.
    pub log: LogConfig,
    /// Metric labels.
    pub metrics: MetricsConfig,
}

/// How connections to origins look.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Whose TLS ClientHello and HTTP/2 preface connections to origins
    /// present: `mirror` (the default: each identity's own client's, so the
    /// origin sees the client, not pinproxy), `chrome` (a current Chrome's,
    /// for clients that are not browsers) or `rustls` (pinproxy's own).
    /// Exits may override it.
    pub fingerprint: FingerprintMode,
    /// Address ranges (CIDR, or single addresses) the direct exit refuses
    /// to connect to, checked on every address a name resolves to (so DNS
    /// rebinding cannot bypass it). Default: link-local IPv4 (with the
    /// cloud metadata address 169.254.169.254) and IPv6. Loopback is
    /// allowed unless listed. Exits that are proxies resolve names
    /// themselves and are not checked.
    pub deny_ranges: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            fingerprint: FingerprintMode::default(),
            deny_ranges: DEFAULT_DENY_RANGES.iter().map(|r| r.to_string()).collect(),
        }
    }
}

/// Client authentication.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Users who may use the proxy. With any, every plain request and every
    /// CONNECT must carry `Proxy-Authorization: Basic` with a user's name
    /// (`NAME`, or `NAME-session-KEY` to name a session) and password, or
    /// gets `407`.
    pub users: Vec<UserConfig>,
    /// Without users: answer `407` to clients that send no
    /// `Proxy-Authorization`, so browsers (which send proxy credentials
    /// only when challenged) can name their session as user name
    /// `session-KEY`. Any user name is accepted and the password ignored:
    /// this names sessions, it does not authenticate.
    pub challenge_session_keys: bool,
}

/// One proxy user (`pinproxy user add NAME` prints the entry).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// The user name: letters, digits and `-._~+=`; not starting with
    /// `session-` nor containing `-session-`.
    pub name: String,
    /// The password's hash: argon2id (a PHC string, `$argon2id$...`) or
    /// bcrypt (`$2b$...`). Never the password itself.
    pub password_hash: String,
    /// Exit ids this user may use (new identities and rotated traffic stay
    /// within them; an identity on another exit is refused with 403).
    /// Absent: every exit.
    pub exits: Option<Vec<String>>,
}

/// The CA that signs intercepted hosts' leaves.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaConfig {
    /// Directory holding the CA (`ca.pem`, `ca-key.pem`, and during a
    /// rotation `ca-next.pem`, `ca-next-key.pem` and `ca-bundle.pem`), e.g. a secret mounted into every replica
    /// of a fleet. When set, the daemon never creates a CA there (`pinproxy
    /// ca --ca-dir DIR` does). Default: the data directory, where a CA is
    /// created on first start.
    pub dir: Option<PathBuf>,
    /// Domains a newly created CA may sign for (X.509 name constraints;
    /// each covers the domain and every name under it; IP addresses are
    /// then excluded). Clients reject leaves outside them, and pinproxy
    /// refuses to intercept such hosts (403) unless `mitm.exclude` /
    /// `mitm.include` tunnels them raw. Applies when a CA is created or
    /// rotated, not to an existing CA.
    pub permitted_domains: Vec<String>,
    /// A file the daemon writes, at start, the certificate clients are to
    /// trust to (the bundle of both CAs during a rotation), readable by
    /// all: what a sidecar's client container mounts, rather than the data
    /// directory, which holds the CA's key and the pin-hashing key.
    pub publish: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allow_remote: false,
            insecure_open_proxy: false,
            auth: AuthConfig::default(),
            ca: CaConfig::default(),
            data_dir: None,
            upstream_ca: Vec::new(),
            track_cookies: Vec::new(),
            exits: Vec::new(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            mitm: MitmConfig::default(),
            identities: IdentityConfig::default(),
            health: HealthConfig::default(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            upstream: UpstreamConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// Where pins and identities live.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `embedded` (the default: a durable redb file in the data directory),
    /// `memory` (nothing survives a restart), `redis://host:port/db` (shared
    /// by a fleet of replicas),
    /// `redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` (the primary
    /// of a Sentinel-managed group, followed through failovers) or
    /// `redis+cluster://HOST:PORT[,HOST:PORT...]` (a Redis Cluster; every
    /// key hash-tagged into one slot, followed when the slot moves).
    pub url: String,
    /// Prefix of every Redis key (replicas sharing pins use the same one).
    pub namespace: String,
    /// When the store cannot answer: `fail-closed` refuses every request with
    /// 503 `store-unavailable`; `fail-open` still forwards requests that
    /// carry no credential (a response setting a tracked cookie then gets
    /// 503, since its pin cannot be stored).
    pub on_unavailable: Unavailable,
    /// Redis: after the store is seen to have lost data, how long a
    /// credential it does not know is treated as lost (answered as retired,
    /// `store-lost`, unless a replica's journal restores it) instead of
    /// being pinned anew. Cover the lifetime of the cookies that matter.
    #[serde(with = "humantime_serde")]
    pub loss_quarantine: Duration,
    /// Redis: replicas that must acknowledge each new pin before its
    /// response is released (`WAIT`); 0 disables. Narrows what a failover
    /// can lose; on timeout the request fails closed (503).
    pub wait_replicas: u32,
    /// Redis: how long to wait for `wait_replicas`.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Redis: how long a replica may answer a credential it looked up
    /// moments ago from its own memory, without a round trip. Safe because
    /// a pin never moves; retirements reach every replica's cache at once
    /// over Redis pub/sub, and the cache answers only while that
    /// subscription is live. Bounds how far an identity's use counters may
    /// lag; `0s` disables (every lookup asks Redis).
    #[serde(with = "humantime_serde")]
    pub hit_cache: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "embedded".into(),
            namespace: "pinproxy".into(),
            on_unavailable: Unavailable::default(),
            loss_quarantine: Duration::from_secs(24 * 3600),
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(250),
            hit_cache: Duration::from_secs(1),
        }
    }
}

/// The store, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded durable store at this path.
    Embedded(PathBuf),
    /// In memory only.
    Memory,
    /// Redis.
    Redis {
        /// `redis://...`, `redis+sentinel://...` or `redis+cluster://...`
        url: String,
        /// Key prefix.
        namespace: String,
        /// How long unknown credentials are lost after a loss.
        loss_quarantine: Duration,
        /// Replicas that must acknowledge each new pin (0: none).
        wait_replicas: u32,
        /// How long to wait for them.
        wait_timeout: Duration,
        /// How long a pin hit may be answered from the replica's cache.
        hit_cache: Duration,
    },
}

/// One upstream exit, as written in the TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExitConfig {
    /// Stable name of the exit. Pins refer to exits by this id, so keep it
    /// stable across restarts and config edits.
    pub id: String,
    /// `http://[user:pass@]host:port` (an HTTP proxy reached with CONNECT),
    /// `socks5://[user:pass@]host:port` (or `socks5h://`), `direct://`
    /// (egress from this machine) or `direct://SOURCE_IP`. The
    /// credentials may carry `{session}`, filled with a stable id per
    /// identity so the provider keeps one IP for it.
    pub url: String,
    /// Share of new identities and rotated traffic, 1-1000.
    pub weight: u32,
    /// The provider's sticky-session window (e.g. `"10m"`): an identity is
    /// retired once its upstream session is this old.
    #[serde(with = "humantime_serde")]
    pub sticky_ttl: Option<Duration>,
    /// CONNECT answer header in which the exit states each tunnel's egress
    /// address (e.g. `"X-Exit-IP"`): every new tunnel of an identity must
    /// come from the identity's address.
    pub exit_ip_header: Option<String>,
    /// IP-echo URL (`http://host/path` answering with the caller's address)
    /// fetched through the exit for each new identity tunnel when the exit
    /// states no address. A probe on another connection cannot prove the
    /// address of this one; it catches sessions that moved.
    pub ip_echo: Option<String>,
    /// Idle timeout of identities on this exit (overrides identities.idle_timeout).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Lifetime of identities on this exit (overrides identities.max_lifetime).
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Upstream sessions cookie-less traffic rotates over, on exits with `{session}`.
    pub anonymous_sessions: usize,
    /// SOCKS5 exits: the address in the CONNECT reply is the tunnel's egress
    /// address (servers that report their outgoing socket, like Dante; a
    /// reply of `0.0.0.0`, as microsocks sends, gives no address).
    pub socks_reply_is_egress: bool,
    /// This exit's `upstream.fingerprint` (`mirror`, `chrome` or `rustls`),
    /// overriding the global one.
    pub fingerprint: Option<FingerprintMode>,
    /// Keep the exit's identities when its URL or credentials change under
    /// its id (a renamed gateway, a rotated password that still reach the
    /// same IPs); otherwise they retire, `exit-changed`. A change of its
    /// fingerprint mode retires them either way.
    pub keep_identities_on_route_change: bool,
}

impl Default for ExitConfig {
    fn default() -> Self {
        let options = ExitOptions::default();
        ExitConfig {
            id: String::new(),
            url: String::new(),
            weight: options.weight,
            sticky_ttl: None,
            exit_ip_header: None,
            ip_echo: None,
            idle_timeout: None,
            max_lifetime: None,
            anonymous_sessions: options.anonymous_sessions,
            socks_reply_is_egress: false,
            fingerprint: None,
            keep_identities_on_route_change: false,
        }
    }
}

impl ExitConfig {
    /// An exit with default options.
    pub fn new(id: &str, url: &str) -> ExitConfig {
        ExitConfig {
            id: id.to_owned(),
            url: url.to_owned(),
            ..ExitConfig::default()
        }
    }
}

/// Identity lifetimes and policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Requests carrying a retired identity's credentials: `fail` (502
    /// `identity-retired`) or `strip` (remove them, send as a new client).
    pub retire_policy: RetirePolicy,
    /// Requests carrying credentials of two identities: `reject` (409) or
    /// `oldest` (keep the identity made first, strip the others).
    pub conflict_policy: ConflictPolicy,
    /// Requests whose fingerprint differs from their identity's: `warn`,
    /// `reject` (409) or `restore` (rewrite the headers back).
    pub fingerprint_policy: FingerprintPolicy,
    /// An identity unused this long is retired.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// An identity this old is retired.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// How long retired credentials are remembered (so they are never pinned
    /// elsewhere); keep it longer than clients keep cookies.
    #[serde(with = "humantime_serde")]
    pub remember_retired: Duration,
    /// How often expired identities are retired and old ones forgotten.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Origin answers that end an identity. Default: DataDome's challenge
    /// and hard block, Cloudflare's challenge, 401 after success. An empty
    /// list disables detection.
    pub invalidation: Vec<InvalidationRule>,
    /// Bytes of (decoded) response body scanned for invalidation markers.
    pub scan_limit: usize,
    /// Most requests of one identity in flight at once (until each
    /// response body ends); more wait in line. 0: no limit.
    pub max_in_flight: u32,
    /// Most requests of one identity waiting for an in-flight slot; more
    /// get 429 `identity-busy`.
    pub max_queue: u32,
    /// Longest a request waits for an in-flight slot before 429.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Least time between the starts of two requests of one identity
    /// (a velocity limit: requests are delayed, not refused). 0: off.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Longest a request is delayed by `min_interval` before it is refused
    /// with 429 instead.
    #[serde(with = "humantime_serde")]
    pub max_pacing_delay: Duration,
    /// Start (or reload) while the store holds pins of cookie names
    /// `track_cookies` no longer matches, leaving those pins unenforced.
    /// Without it such a start or reload is refused, naming them: their
    /// cookies would leave through any exit.
    pub release_untracked_pins: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            retire_policy: RetirePolicy::default(),
            conflict_policy: ConflictPolicy::default(),
            fingerprint_policy: FingerprintPolicy::default(),
            idle_timeout: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(24 * 3600),
            remember_retired: Duration::from_secs(30 * 24 * 3600),
            sweep_interval: Duration::from_secs(60),
            invalidation: default_rules(),
            scan_limit: 64 * 1024,
            max_in_flight: 0,
            max_queue: 256,
            queue_timeout: Duration::from_secs(30),
            min_interval: Duration::ZERO,
            max_pacing_delay: Duration::from_secs(30),
            release_untracked_pins: false,
        }
    }
}

impl IdentityConfig {
    /// The pacing part of these settings.
    pub fn pacing(&self) -> crate::proxy::pacing::PacingSettings {
        crate::proxy::pacing::PacingSettings {
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
            queue_timeout: self.queue_timeout,
            min_interval: self.min_interval,
            max_pacing_delay: self.max_pacing_delay,
        }
    }
}

/// Exit health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// `host:port` each exit is asked to CONNECT to every `interval`. Unset:
    /// no probes; health then comes from real traffic alone, and an
    /// unhealthy exit gets one trial request every `retry_interval`.
    pub probe_target: Option<String>,
    /// Time between probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Consecutive failures that make a healthy exit unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive failures that make an exit dead (its identities retire).
    pub dead_after: u32,
    /// Consecutive successes that make an exit healthy again.
    pub healthy_after: u32,
    /// Without probes: how often an unhealthy exit gets a trial request.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_target: None,
            interval: Duration::from_secs(15),
            unhealthy_after: 3,
            dead_after: 10,
            healthy_after: 2,
            retry_interval: Duration::from_secs(10),
        }
    }
}

/// Log format and the access log.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (the default) or `json` (one object per line, for log
    /// shippers). `--log-format` wins.
    pub format: LogFormat,
    /// One `info` line per request (target `pinproxy::access`): exit,
    /// identity, tracked cookie names, pin decision, status and timings;
    /// never a cookie value or a path. `--access-log off` wins.
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            access: true,
        }
    }
}

/// Metric labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Sites (registrable domains) with a `site` label of their own; the
    /// rest count as `other`. The first ones seen get a label; once a
    /// minute the busiest unlabelled site replaces the quietest labelled
    /// one if it had more than twice its requests. At most 10000.
    pub max_sites: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_sites: crate::metrics::DEFAULT_MAX_SITES,
        }
    }
}

/// Most sites `metrics.max_sites` may label (bounds the series count).
pub const MAX_SITES_LIMIT: usize = 10_000;

/// The most upstream sessions an exit's cookie-less traffic may rotate over
/// (`[[exits]] anonymous_sessions`).
pub const MAX_ANONYMOUS_SESSIONS: usize = 4_096;

/// The admin endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/metrics`, `/identities` and `/exits` are served (loopback
    /// unless `allow_remote`); `"off"` disables it. A file that leaves the
    /// key out gets the default, so "off" is spelled out: TOML has no null.
    #[serde(deserialize_with = "address_or_off")]
    pub listen: Option<SocketAddr>,
}

/// An address, or `"off"` for none (as `--admin off` says it).
fn address_or_off<'de, D>(deserializer: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is neither an address (e.g. \"127.0.0.1:8081\") nor \"off\""
        ))
    })
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
        }
    }
}

/// Size and count limits that protect the daemon from its clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request header section accepted, in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more gets 431. The default, 100,
    /// is hyper's own, which spares each request initialising a larger
    /// header array.
    pub max_headers: usize,
    /// Most client connections served at once, open tunnels and WebSockets
    /// included; further connections wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Most idle upstream connections kept per (exit, origin).
    pub max_idle_per_origin: usize,
    /// Most idle upstream HTTP/1.1 connections kept per exit, over all its
    /// identities and sessions: each is an open tunnel through the exit's
    /// proxy, and providers limit those. Beyond it the longest idle are
    /// closed (checked every second; a connection reused within the last
    /// second does not count, since closing it would only open another).
    pub max_idle_per_exit: usize,
    /// Length of the kernel's accept queue for the proxy listener (capped by
    /// `net.core.somaxconn`). A burst of new connections beyond it is
    /// dropped by the kernel and each costs its client a 1 s SYN retry.
    pub listen_backlog: u32,
    /// Most connections open at once from one client address, open tunnels
    /// included; beyond it a new connection is answered 429 and closed. 0: no per-client limit
    /// (the default: a loopback sidecar's clients all share 127.0.0.1; set
    /// it when others can reach the port).
    pub max_connections_per_client: usize,
    /// Requests per second one client address may send (every request
    /// counts: a CONNECT, and each request inside a tunnel); beyond it 429
    /// with `Retry-After`. 0: no limit.
    pub requests_per_second_per_client: u32,
    /// Requests a client address may send at once above that rate (the
    /// token bucket's size); 0: one second's worth.
    pub requests_burst_per_client: u32,
    /// Most bytes origins may have waiting in pinproxy, over HTTP/2, for
    /// clients slower than them: an answer whose origin has had its next
    /// frame waiting at every ask for a second counts what its upstream
    /// stream may hold (its window), until its client catches up, and one
    /// past this is abandoned at once. 0: no budget
    /// (`timeouts.client_stall` still applies).
    pub max_unread_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 16_384,
            // Sized for a fleet: one pool entry per concurrent client
            // stream, so a keep-alive client never waits for a new
            // upstream TLS handshake after a burst.
            max_idle_per_origin: 256,
            max_idle_per_exit: 128,
            listen_backlog: 4096,
            max_connections_per_client: 0,
            requests_per_second_per_client: 0,
            requests_burst_per_client: 0,
            // Eighty stalled answers of Chrome's 6 MiB window at once.
            max_unread_bytes: 512 << 20,
        }
    }
}

/// Timeouts, written as durations (`"10s"`, `"2m"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time a client has to send a request header section once its first
    /// byte has arrived (a slowloris client is cut off then).
    #[serde(with = "humantime_serde")]
    pub header_read: Duration,
    /// How long an HTTP/1.1 client connection may send nothing while it
    /// holds no exchange (idle keep-alive, counted from the end of the
    /// previous response, or from the connection's start; it is closed
    /// within a quarter more); also the wait for the first request inside
    /// a new tunnel.
    #[serde(with = "humantime_serde")]
    pub client_idle: Duration,
    /// Time to reach the origin through an exit: TCP to the exit, its
    /// CONNECT answer and the TLS handshake with the origin.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Time from when pinproxy starts sending a request (a connection to
    /// open, the head and the whole body to write) to the origin's response
    /// head: an upload that takes longer fails with `origin-timeout`.
    #[serde(with = "humantime_serde")]
    pub response_head: Duration,
    /// How long an idle upstream connection stays in its pool.
    #[serde(with = "humantime_serde")]
    pub pool_idle: Duration,
    /// Time a client has to finish its TLS handshake inside a CONNECT tunnel.
    #[serde(with = "humantime_serde")]
    pub tls_handshake: Duration,
    /// How long a relay pinproxy does not read (a passed-through tunnel, a
    /// WebSocket) may carry no byte either way before it is closed (within
    /// a quarter more); `"0s"`: never closed for idleness.
    #[serde(with = "humantime_serde")]
    pub relay_idle: Duration,
    /// How long pinproxy may write nothing more of an answer to its client
    /// (its socket or stream window full) before the answer is abandoned
    /// (within a second more): the origin's stream reset, or its connection
    /// closed, and the client's when pinproxy next writes to it. `"0s"`:
    /// never; otherwise at least a second. A client reading slowly is not
    /// stalled, nor is one waiting for a slow origin.
    #[serde(with = "humantime_serde")]
    pub client_stall: Duration,
    /// On SIGTERM/SIGINT: how long in-flight requests, open WebSockets and
    /// passed-through tunnels get to finish (the listener stops accepting
    /// at once; what is still open then is closed), then how long
    /// background store writes get, before the daemon exits.
    #[serde(with = "humantime_serde")]
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            connect: Duration::from_secs(10),
            response_head: Duration::from_secs(120),
            pool_idle: Duration::from_secs(90),
            tls_handshake: Duration::from_secs(10),
            relay_idle: Duration::from_secs(600),
            client_stall: Duration::from_secs(60),
            shutdown: Duration::from_secs(30),
        }
    }
}

/// TLS interception (MITM) settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MitmConfig {
    /// Most leaf certificates kept in memory; the least recently used host's
    /// certificate is minted again when needed.
    pub cert_cache_capacity: u64,
    /// Hosts (globs, e.g. `*.bank.example`) tunnelled raw instead of
    /// intercepted: pinproxy cannot see their cookies.
    pub exclude: Vec<String>,
    /// If set, only these hosts (globs) are intercepted; every other host is
    /// tunnelled raw. `exclude` still applies.
    pub include: Vec<String>,
}

impl Default for MitmConfig {
    fn default() -> Self {
        MitmConfig {
            cert_cache_capacity: 10_000,
            exclude: Vec::new(),
            include: Vec::new(),
        }
    }
}

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Config`]. Says where and why, never
    /// the line itself: it may be an exit's or the store's URL with its
    /// password.
    #[error("invalid config file {path}{at}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where in it (`, line L column C`), when known.
        at: String,
        /// Why, as the TOML reader says it.
        reason: String,
    },
    /// An exit URL is malformed.
    #[error("exit {id:?}: {source}")]
    Exit {
        /// The exit's id.
        id: String,
        /// Why.
        source: ExitUrlError,
    },
    /// Two exits share an id.
    #[error("two exits have the id {0:?}; ids must be unique because pins refer to them")]
    DuplicateExit(String),
    /// An exit id is empty or has characters that would make logs and headers ambiguous.
    #[error(
        "exit id {0:?} must be 1-64 characters of [A-Za-z0-9._:-] (brackets allowed for IPv6)"
    )]
    BadExitId(String),
    /// A tracked-cookie pattern is malformed.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// A mitm include/exclude pattern is malformed.
    #[error(transparent)]
    HostPattern(#[from] HostPatternError),
    /// The admin endpoint beyond loopback without `allow_remote`.
    #[error(
        "refusing to serve the admin endpoint on {0}: it is not a loopback address and the \
         admin endpoint has no authentication; pass --allow-remote (or allow_remote = true) \
         if that is intended, or --admin off"
    )]
    RemoteListen(SocketAddr),
    /// The proxy beyond loopback without client authentication.
    #[error(
        "refusing to listen on {0}: it is not a loopback address and no [[auth.users]] are \
         configured, so anyone who can reach it could use your exits; add users (`pinproxy \
         user add NAME` prints one) or, if an open proxy is really intended, pass \
         --insecure-open-proxy (insecure_open_proxy = true). --allow-remote no longer opens \
         the proxy listener"
    )]
    OpenProxy(SocketAddr),
    /// `[auth]` is invalid.
    #[error(transparent)]
    Auth(#[from] UserError),
    /// `[ca]` is invalid.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// No data directory could be determined.
    #[error("no data directory: set --data-dir (the user's data directory could not be found)")]
    NoDataDir,
    /// A limit is out of range.
    #[error("{0}")]
    Limit(String),
}

/// The validated, runtime form of [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory (absolute or relative as given; not yet created).
    pub data_dir: PathBuf,
    /// Extra upstream CA files.
    pub upstream_ca: Vec<PathBuf>,
    /// Which cookies are tracked.
    pub cookies: CookiePolicy,
    /// The exits, in configuration order; never empty.
    pub exits: Vec<ExitSpec>,
    /// Limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// MITM settings.
    pub mitm: MitmConfig,
    /// Identity settings.
    pub identities: IdentityConfig,
    /// Health settings (probe target parsed).
    pub health: HealthConfig,
    /// The probe target.
    pub probe_target: Option<HostPort>,
    /// Admin endpoint address.
    pub admin: Option<SocketAddr>,
    /// The pin store.
    pub store: StoreKind,
    /// Behaviour while the store cannot answer.
    pub on_unavailable: Unavailable,
    /// Which tunnels are intercepted.
    pub intercept: InterceptPolicy,
    /// Log format and the access log.
    pub log: LogConfig,
    /// Metric labels.
    pub metrics: MetricsConfig,
    /// Client authentication.
    pub auth: AuthSettings,
    /// The CA directory (`ca.dir`, else the data directory).
    pub ca_dir: PathBuf,
    /// Whether `ca.dir` was given (the daemon then never creates a CA).
    pub ca_dir_given: bool,
    /// Domains a newly created CA is constrained to.
    pub permitted_domains: Vec<String>,
    /// Where the certificate clients trust is published (`ca.publish`).
    pub ca_publish: Option<PathBuf>,
    /// Ranges the direct exit refuses.
    pub deny_ranges: Vec<IpNet>,
}

impl Settings {
    /// The keys that differ between `self` (in force) and `new` but cannot
    /// change while the daemon runs: a reload applies everything else and
    /// reports these as needing a restart. Every key not listed here is
    /// applied live (exits, tracked cookies, `upstream_ca`, `[identities]`,
    /// `[health]`, `store.on_unavailable`, upstream timeouts and pool size,
    /// `timeouts.shutdown`); a new key that is read only at start belongs
    /// in this list.
    pub fn restart_needed(&self, new: &Settings) -> Vec<&'static str> {
        let (a, b) = (self, new);
        let (la, lb) = (&a.limits, &b.limits);
        let (ta, tb) = (&a.timeouts, &b.timeouts);
        let (ma, mb) = (&a.mitm, &b.mitm);
        [
            ("listen", a.listen != b.listen),
            ("data_dir", a.data_dir != b.data_dir),
            ("admin.listen", a.admin != b.admin),
            (
                "limits.max_header_bytes",
                la.max_header_bytes != lb.max_header_bytes,
            ),
            ("limits.max_headers", la.max_headers != lb.max_headers),
            (
                "limits.max_connections",
                la.max_connections != lb.max_connections,
            ),
            (
                "limits.listen_backlog",
                la.listen_backlog != lb.listen_backlog,
            ),
            (
                "limits.max_connections_per_client",
                la.max_connections_per_client != lb.max_connections_per_client,
            ),
            (
                "limits.requests_per_second_per_client",
                la.requests_per_second_per_client != lb.requests_per_second_per_client,
            ),
            (
                "limits.requests_burst_per_client",
                la.requests_burst_per_client != lb.requests_burst_per_client,
            ),
            ("timeouts.header_read", ta.header_read != tb.header_read),
            ("timeouts.client_idle", ta.client_idle != tb.client_idle),
            ("timeouts.client_stall", ta.client_stall != tb.client_stall),
            (
                "limits.max_unread_bytes",
                la.max_unread_bytes != lb.max_unread_bytes,
            ),
            (
                "timeouts.tls_handshake",
                ta.tls_handshake != tb.tls_handshake,
            ),
            (
                "mitm.cert_cache_capacity",
                ma.cert_cache_capacity != mb.cert_cache_capacity,
            ),
            ("mitm.include", ma.include != mb.include),
            ("mitm.exclude", ma.exclude != mb.exclude),
            ("ca.dir", a.ca_dir != b.ca_dir),
            ("ca.publish", a.ca_publish != b.ca_publish),
            (
                "ca.permitted_domains",
                a.permitted_domains != b.permitted_domains,
            ),
            ("upstream.deny_ranges", a.deny_ranges != b.deny_ranges),
            // The log subscriber and the site table are built once at start.
            ("log.format", a.log.format != b.log.format),
            ("log.access", a.log.access != b.log.access),
            (
                "metrics.max_sites",
                a.metrics.max_sites != b.metrics.max_sites,
            ),
            // Redis's keys live by the value the replica started with: a
            // longer one taken live would still be forgotten at the old.
            (
                "identities.remember_retired",
                matches!(a.store, StoreKind::Redis { .. })
                    && a.identities.remember_retired != b.identities.remember_retired,
            ),
        ]
        .into_iter()
        .chain(store_changes(&a.store, &b.store))
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

/// Which `store.*` keys differ between two stores.
fn store_changes(a: &StoreKind, b: &StoreKind) -> Vec<(&'static str, bool)> {
    match (a, b) {
        (
            StoreKind::Redis {
                url,
                namespace,
                loss_quarantine,
                wait_replicas,
                wait_timeout,
                hit_cache,
            },
            StoreKind::Redis {
                url: url2,
                namespace: namespace2,
                loss_quarantine: loss_quarantine2,
                wait_replicas: wait_replicas2,
                wait_timeout: wait_timeout2,
                hit_cache: hit_cache2,
            },
        ) => vec![
            ("store.url", url != url2),
            ("store.namespace", namespace != namespace2),
            ("store.loss_quarantine", loss_quarantine != loss_quarantine2),
            ("store.wait_replicas", wait_replicas != wait_replicas2),
            ("store.wait_timeout", wait_timeout != wait_timeout2),
            ("store.hit_cache", hit_cache != hit_cache2),
        ],
        // An embedded store moves with data_dir, which is reported itself.
        _ => vec![(
            "store.url",
            std::mem::discriminant(a) != std::mem::discriminant(b),
        )],
    }
}

impl Config {
    /// Reads a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            at: e
                .span()
                .map(|span| {
                    let before = text.get(..span.start).unwrap_or(&text);
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
                    format!(", line {line} column {column}")
                })
                .unwrap_or_default(),
            reason: without_userinfo(e.message().trim_end()),
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The data directory this configuration resolves to.
    pub fn resolved_data_dir(&self) -> Result<PathBuf, ConfigError> {
        match &self.data_dir {
            Some(dir) => Ok(dir.clone()),
            None => dirs::data_dir()
                .map(|d| d.join("pinproxy"))
                .ok_or(ConfigError::NoDataDir),
        }
    }

    /// Checks everything once and converts to runtime types.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        if !self.listen.ip().is_loopback()
            && self.auth.users.is_empty()
            && !self.insecure_open_proxy
        {
            return Err(ConfigError::OpenProxy(self.listen));
        }
        if let Some(addr) = self.admin.listen {
            if !addr.ip().is_loopback() && !self.allow_remote {
                return Err(ConfigError::RemoteListen(addr));
            }
        }
        let health = &self.health;
        if health.unhealthy_after == 0
            || health.healthy_after == 0
            || health.dead_after < health.unhealthy_after
        {
            return Err(ConfigError::Limit(
                "health: unhealthy_after and healthy_after must be positive and dead_after at least unhealthy_after".into(),
            ));
        }
        let probe_target = match &health.probe_target {
            None => None,
            Some(text) => Some(parse_probe_target(text)?),
        };
        let limits = self.limits.clone();
        sizes::check(self)?;
        durations::check(self)?;
        if self.metrics.max_sites > MAX_SITES_LIMIT {
            return Err(ConfigError::Limit(format!(
                "metrics.max_sites must be at most {MAX_SITES_LIMIT} (each site is a set of series)"
            )));
        }
        let cookies = CookiePolicy::with_extra(&self.track_cookies)?;
        let exits = self.validated_exits()?;
        let data_dir = self.resolved_data_dir()?;
        let store = self.store.kind(&data_dir)?;
        let auth = self.auth.validate(&exits)?;
        let permitted_domains = crate::mitm::ca::permitted_domains(&self.ca.permitted_domains)?;
        let deny_ranges = parse_ranges(&self.upstream.deny_ranges).map_err(ConfigError::Limit)?;
        Ok(Settings {
            auth,
            ca_dir: self.ca.dir.clone().unwrap_or_else(|| data_dir.clone()),
            ca_dir_given: self.ca.dir.is_some(),
            permitted_domains,
            ca_publish: self.ca.publish.clone(),
            deny_ranges,
            listen: self.listen,
            data_dir,
            upstream_ca: self.upstream_ca.clone(),
            cookies,
            exits,
            limits,
            timeouts: self.timeouts.clone(),
            mitm: self.mitm.clone(),
            identities: self.identities.clone(),
            health: self.health.clone(),
            probe_target,
            admin: self.admin.listen,
            store,
            on_unavailable: self.store.on_unavailable,
            intercept: InterceptPolicy::new(&self.mitm.include, &self.mitm.exclude)?,
            log: self.log.clone(),
            metrics: self.metrics.clone(),
        })
    }

    fn validated_exits(&self) -> Result<Vec<ExitSpec>, ConfigError> {
        if self.exits.is_empty() {
            let mut direct = ExitSpec::builtin_direct();
            direct.options.fingerprint = self.upstream.fingerprint;
            return Ok(vec![direct]);
        }
        let mut seen = std::collections::HashSet::new();
        let mut specs = Vec::with_capacity(self.exits.len());
        for exit in &self.exits {
            if !valid_exit_id(&exit.id) {
                return Err(ConfigError::BadExitId(exit.id.clone()));
            }
            if !seen.insert(exit.id.as_str()) {
                return Err(ConfigError::DuplicateExit(exit.id.clone()));
            }
            let error = |source| ConfigError::Exit {
                id: exit.id.clone(),
                source,
            };
            let mut spec = ExitSpec::parse(&exit.id, &exit.url).map_err(error)?;
            spec.options = exit_options(exit).map_err(error)?;
            spec.options.fingerprint = exit.fingerprint.unwrap_or(self.upstream.fingerprint);
            specs.push(spec);
        }
        Ok(specs)
    }
}

impl AuthConfig {
    /// The users and mode, their exits checked against `exits`.
    fn validate(&self, exits: &[ExitSpec]) -> Result<AuthSettings, UserError> {
        let users = self
            .users
            .iter()
            .map(|u| {
                let scope = u
                    .exits
                    .as_ref()
                    .map(|ids| ids.iter().map(|id| ExitId::new(id)).collect());
                User::new(&u.name, &u.password_hash, scope)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<ExitId> = exits.iter().map(|e| e.id.clone()).collect();
        AuthSettings::new(users, self.challenge_session_keys, &ids)
    }
}

impl StoreConfig {
    /// The store this configuration names, in `data_dir` when embedded.
    pub fn kind(&self, data_dir: &Path) -> Result<StoreKind, ConfigError> {
        match self.url.as_str() {
            "embedded" => Ok(StoreKind::Embedded(
                data_dir.join(crate::store::durable::STORE_FILE),
            )),
            "memory" => Ok(StoreKind::Memory),
            url if url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+sentinel://")
                || url.starts_with("redis+cluster://") =>
            {
                if self.namespace.is_empty() || self.namespace.contains([' ', '{', '}']) {
                    return Err(ConfigError::Limit(
                        "store.namespace must be non-empty, without spaces or braces".into(),
                    ));
                }
                crate::store::redis::link::Target::parse(url, &self.namespace)
                    .map_err(|e| ConfigError::Limit(e.to_string()))?;
                Ok(StoreKind::Redis {
                    url: url.to_owned(),
                    namespace: self.namespace.clone(),
                    loss_quarantine: self.loss_quarantine,
                    wait_replicas: self.wait_replicas,
                    wait_timeout: self.wait_timeout,
                    hit_cache: self.hit_cache,
                })
            }
            other => Err(ConfigError::Limit(format!(
                "store.url {:?}: use embedded, memory, redis://host:port/db, \
                 redis+sentinel://host:port,.../service or redis+cluster://host:port,...",
                crate::store::redis::link::redacted(other)
            ))),
        }
    }
}

fn exit_options(exit: &ExitConfig) -> Result<ExitOptions, ExitUrlError> {
    if exit.weight == 0 || exit.weight > MAX_WEIGHT {
        return Err(ExitUrlError::Address(format!(
            "weight must be 1-{MAX_WEIGHT}"
        )));
    }
    // One slot each, allocated whenever the exit set is built (at start and
    // on a reload): a unit slip must be refused, not allocated.
    if exit.anonymous_sessions > MAX_ANONYMOUS_SESSIONS {
        return Err(ExitUrlError::Address(format!(
            "anonymous_sessions must be at most {MAX_ANONYMOUS_SESSIONS}"
        )));
    }
    let exit_ip_header = exit
        .exit_ip_header
        .as_deref()
        .map(|h| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                ExitUrlError::Address(format!("exit_ip_header {h:?} is not a header name"))
            })
        })
        .transpose()?;
    Ok(ExitOptions {
        weight: exit.weight,
        sticky_ttl: exit.sticky_ttl,
        exit_ip_header,
        ip_echo: exit
            .ip_echo
            .as_deref()
            .map(EchoTarget::parse)
            .transpose()
            .map_err(ExitUrlError::Address)?,
        idle_timeout: exit.idle_timeout,
        max_lifetime: exit.max_lifetime,
        anonymous_sessions: exit.anonymous_sessions.max(1),
        socks_reply_is_egress: exit.socks_reply_is_egress,
        fingerprint: exit.fingerprint.unwrap_or_default(),
        keep_identities_on_route_change: exit.keep_identities_on_route_change,
    })
}

fn parse_probe_target(text: &str) -> Result<HostPort, ConfigError> {
    HostPort::parse(text)
        .map_err(|_| ConfigError::Limit(format!("health.probe_target {text:?} must be host:port")))
}

/// Whether `id` can be an exit id: 1-64 characters of `[A-Za-z0-9._:-]`
/// (brackets allowed for IPv6).
pub fn valid_exit_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-' | b'[' | b']')
        })
}

/// `text` with the user information of every URL in it written as `***`
/// (each word, between spaces and quotes, as a store URL is redacted): a
/// TOML error may quote the value it could not take, an exit's URL with its
/// password among them.
fn without_userinfo(text: &str) -> String {
    let ends_word = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`');
    text.split_inclusive(ends_word)
        .map(|piece| {
            let word = piece.strip_suffix(ends_word).unwrap_or(piece);
            crate::store::redis::link::redacted(word) + &piece[word.len()..]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../config/pinproxy.example.toml");
        let config = Config::from_toml(text).expect("example parses");
        let settings = config.validate().expect("example validates");
        assert_eq!(settings.exits.len(), 2);
        // The example shows the built-in rules as they are.
        assert_eq!(settings.identities.invalidation, default_rules());
    }

    /// A file that does not parse is named with the place and the reason,
    /// never with the line, which may hold an exit's password.
    #[test]
    fn a_file_that_does_not_parse_is_reported_without_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pinproxy.toml");
        std::fs::write(
            &path,
            "[[exits]]\nid = \"a\"\nurl = \"http://u:Secr\\qt-77@127.0.0.1:9\"\n",
        )
        .unwrap();
        let message = Config::from_file(&path).unwrap_err().to_string();
        assert!(!message.contains("Secr"), "{message}");
        assert!(message.contains("line 3 column"), "{message}");
        assert!(message.contains("escape"), "{message}");
        // A value of the wrong type is quoted by the reader: its URL's
        // password is not.
        std::fs::write(&path, "exits = \"http://u:Secret-77@127.0.0.1:9\"\n").unwrap();
        let message = Config::from_file(&path).unwrap_err().to_string();
        assert!(!message.contains("Secret"), "{message}");
        assert!(message.contains("***@127.0.0.1:9"), "{message}");
    }

    #[test]
    fn keys_read_only_at_start_are_named_on_reload() {
        let before = Config::default().validate().unwrap();
        let mut changed = Config {
            listen: "127.0.0.1:9999".parse().unwrap(),
            ..Config::default()
        };
        changed.limits.max_connections = 7;
        changed.track_cookies = vec!["session_*".into()];
        changed.timeouts.shutdown = Duration::from_secs(1);
        let after = changed.validate().unwrap();
        assert_eq!(
            before.restart_needed(&after),
            ["listen", "limits.max_connections"]
        );
        assert!(before.restart_needed(&before).is_empty());
    }

    /// With Redis, `remember_retired` is read at start only: the keys'
    /// lifetimes were set from it, so a longer value taken by a reload
    /// would still be forgotten at the old one. The embedded store takes it.
    #[test]
    fn remember_retired_needs_a_restart_with_redis_only() {
        let with = |store: &str, days: u64| {
            let mut config = Config::default();
            config.store.url = store.into();
            config.identities.remember_retired = Duration::from_secs(days * 86_400);
            config.validate().unwrap()
        };
        let redis = "redis://127.0.0.1:6379/0";
        assert_eq!(
            with(redis, 7).restart_needed(&with(redis, 90)),
            ["identities.remember_retired"]
        );
        assert!(with("embedded", 7)
            .restart_needed(&with("embedded", 90))
            .is_empty());
    }

    /// Leaving `admin.listen` out keeps the default endpoint (serde fills
    /// the key), so the file turns it off with `"off"`, as the flag does.
    #[test]
    fn the_admin_endpoint_is_turned_off_by_off() {
        let admin = |text: &str| Config::from_toml(text).map(|c| c.admin.listen);
        let default = Some(SocketAddr::from(([127, 0, 0, 1], 8081)));
        assert_eq!(admin("").unwrap(), default);
        assert_eq!(admin("[admin]\n").unwrap(), default);
        assert_eq!(admin("[admin]\nlisten = \"off\"\n").unwrap(), None);
        assert_eq!(
            admin("[admin]\nlisten = \"127.0.0.1:9\"\n").unwrap(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9)))
        );
        let message = admin("[admin]\nlisten = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"off\""), "{message}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::from_toml("listne = \"127.0.0.1:1\"").is_err());
        assert!(Config::from_toml("[timeouts]\nconect = \"1s\"").is_err());
    }

    #[test]
    fn no_exit_means_builtin_direct() {
        let settings = Config::default().validate().unwrap();
        assert_eq!(settings.exits.len(), 1);
        assert_eq!(settings.exits[0].id.as_str(), "direct");
    }

    #[test]
    fn exit_options_and_probe_targets_are_validated() {
        let text = "[[exits]]\nid = \"g\"\nurl = \"http://u-{session}:p@127.0.0.1:7000\"\nweight = 3\nsticky_ttl = \"10m\"\nexit_ip_header = \"X-Exit-IP\"\n[health]\nprobe_target = \"origin.test:443\"\n";
        let settings = Config::from_toml(text).unwrap().validate().unwrap();
        let options = &settings.exits[0].options;
        assert_eq!(options.weight, 3);
        assert_eq!(options.sticky_ttl, Some(Duration::from_secs(600)));
        assert_eq!(
            options.exit_ip_header.as_ref().map(|h| h.as_str()),
            Some("x-exit-ip")
        );
        assert_eq!(
            settings.probe_target.unwrap().to_string(),
            "origin.test:443"
        );
        let bad = Config::from_toml("[health]\nprobe_target = \"http://x/\"").unwrap();
        assert!(bad.validate().is_err());
        let bad =
            Config::from_toml("[[exits]]\nid = \"a\"\nurl = \"direct://\"\nweight = 0").unwrap();
        assert!(bad.validate().is_err());
        // A unit slip is refused, not allocated at start or on a reload.
        let bad = Config::from_toml(
            "[[exits]]\nid = \"g\"\nurl = \"http://u-{session}:p@127.0.0.1:7000\"\n\
             anonymous_sessions = 1000000000000",
        )
        .unwrap();
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("anonymous_sessions"), "{error}");
    }

    #[test]
    fn remote_listen_needs_users_or_an_explicit_open_proxy() {
        let mut config = Config {
            listen: "0.0.0.0:8080".parse().unwrap(),
            ..Config::default()
        };
        assert!(matches!(config.validate(), Err(ConfigError::OpenProxy(_))));
        config.allow_remote = true;
        let error = config.validate().unwrap_err();
        assert!(matches!(error, ConfigError::OpenProxy(_)), "{error}");
        assert!(error.to_string().contains("--insecure-open-proxy"));
        config.insecure_open_proxy = true;
        assert!(config.validate().is_ok());
        config.insecure_open_proxy = false;
        config.auth.users = vec![UserConfig {
            name: "alice".into(),
            password_hash: crate::proxy::auth::password::hash_argon2id(b"pw").unwrap(),
            exits: None,
        }];
        assert!(config.validate().is_ok());
        // The admin endpoint still needs allow_remote.
        config.allow_remote = false;
        config.admin.listen = Some("0.0.0.0:8081".parse().unwrap());
        assert!(matches!(
            config.validate(),
            Err(ConfigError::RemoteListen(_))
        ));
    }

    #[test]
    fn users_and_deny_ranges_are_validated() {
        let bad = Config::from_toml("[[auth.users]]\nname = \"a\"\npassword_hash = \"hunter2\"\n")
            .unwrap();
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("never the password itself"), "{error}");
        let bad = Config::from_toml("[upstream]\ndeny_ranges = [\"x\"]").unwrap();
        assert!(bad.validate().is_err());
        let settings = Config::default().validate().unwrap();
        assert_eq!(settings.deny_ranges.len(), 2);
        assert!(!settings.auth.required());
    }

    #[test]
    fn duplicate_and_malformed_exit_ids_are_rejected() {
        let exit = |id: &str| ExitConfig::new(id, "http://127.0.0.1:1");
        let config = Config {
            exits: vec![exit("a"), exit("a")],
            ..Config::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DuplicateExit(_))
        ));
        let config = Config {
            exits: vec![exit("has space")],
            ..Config::default()
        };
        assert!(matches!(config.validate(), Err(ConfigError::BadExitId(_))));
    }
}
