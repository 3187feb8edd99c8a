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
use crate::mitm::policy::{HostPatternError, InterceptPolicy};
use crate::net::HostPort;
use crate::proxy::capture::invalidation::{default_rules, InvalidationRule};
use crate::proxy::credentials::cookies::{CookiePolicy, PatternError};
use crate::routing::{ConflictPolicy, RetirePolicy};
use crate::upstream::egress_ip::EchoTarget;
use crate::upstream::FingerprintMode;

pub use crate::store::Unavailable;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the proxy listens on. Loopback by default; a non-loopback
    /// address is refused unless `allow_remote` is set.
    pub listen: SocketAddr,
    /// Allow listening on a non-loopback address. pinproxy has no client
    /// authentication yet, so anyone who can reach the port can use its exits.
    pub allow_remote: bool,
    /// Directory for the CA, the pin-hashing key and (later) the pin store.
    /// Default: `pinproxy` under the user's data directory
    /// (`~/.local/share/pinproxy` on Linux). Created when missing.
    pub data_dir: Option<PathBuf>,
    /// Extra PEM files of CA certificates to trust for origin servers, on top
    /// of the public web roots compiled into pinproxy.
    pub upstream_ca: Vec<PathBuf>,
    /// Extra cookie names or globs (`incap_ses_*`) to track, added to the
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
}

/// How connections to origins look.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Whose TLS ClientHello and HTTP/2 preface connections to origins
    /// present: `mirror` (the default: each identity's own client's, so the
    /// origin sees the client, not pinproxy), `chrome` (a current Chrome's,
    /// for clients that are not browsers) or `rustls` (pinproxy's own).
    /// Exits may override it.
    pub fingerprint: FingerprintMode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allow_remote: false,
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
    /// `direct://` (egress from this machine) or `direct://SOURCE_IP`. The
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
    /// address (servers that report their outgoing socket, like microsocks).
    pub socks_reply_is_egress: bool,
    /// This exit's `upstream.fingerprint` (`mirror`, `chrome` or `rustls`),
    /// overriding the global one.
    pub fingerprint: Option<FingerprintMode>,
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

/// The admin endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/metrics`, `/identities` and `/exits` are served (loopback
    /// unless `allow_remote`); unset to disable.
    pub listen: Option<SocketAddr>,
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
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
    /// Most client connections served at once; further connections wait in
    /// the kernel's accept queue.
    pub max_connections: usize,
    /// Most idle upstream connections kept per (exit, origin).
    pub max_idle_per_origin: usize,
    /// Length of the kernel's accept queue for the proxy listener (capped by
    /// `net.core.somaxconn`). A burst of new connections beyond it is
    /// dropped by the kernel and each costs its client a 1 s SYN retry.
    pub listen_backlog: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 256,
            max_connections: 16_384,
            // Sized for a fleet: one pool entry per concurrent client
            // stream, so a keep-alive client never waits for a new
            // upstream TLS handshake after a burst.
            max_idle_per_origin: 256,
            listen_backlog: 4096,
        }
    }
}

/// Timeouts, written as durations (`"10s"`, `"2m"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time a client has to send a complete request header section; also
    /// how long an idle client connection is kept between requests.
    #[serde(with = "humantime_serde")]
    pub header_read: Duration,
    /// Time to reach the origin through an exit: TCP to the exit, its
    /// CONNECT answer and the TLS handshake with the origin.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Time the origin has to start its response once the request is sent.
    #[serde(with = "humantime_serde")]
    pub response_head: Duration,
    /// How long an idle upstream connection stays in its pool.
    #[serde(with = "humantime_serde")]
    pub pool_idle: Duration,
    /// Time a client has to finish its TLS handshake inside a CONNECT tunnel.
    #[serde(with = "humantime_serde")]
    pub tls_handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: Duration::from_secs(30),
            connect: Duration::from_secs(10),
            response_head: Duration::from_secs(120),
            pool_idle: Duration::from_secs(90),
            tls_handshake: Duration::from_secs(10),
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
    /// The file is not valid TOML for [`Config`].
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
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
    /// Listening beyond loopback without `allow_remote`.
    #[error(
        "refusing to listen on {0}: it is not a loopback address and pinproxy has no client \
         authentication; pass --allow-remote (or allow_remote = true) if that is intended"
    )]
    RemoteListen(SocketAddr),
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
}

impl Config {
    /// Reads a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
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
        for addr in std::iter::once(self.listen).chain(self.admin.listen) {
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
        if limits.max_header_bytes < 1024 {
            return Err(ConfigError::Limit(
                "limits.max_header_bytes must be at least 1024".into(),
            ));
        }
        if limits.max_headers == 0 || limits.max_connections == 0 {
            return Err(ConfigError::Limit(
                "limits.max_headers and limits.max_connections must be positive".into(),
            ));
        }
        let cookies = CookiePolicy::with_extra(&self.track_cookies)?;
        let exits = self.validated_exits()?;
        let data_dir = self.resolved_data_dir()?;
        let store = self.store.kind(&data_dir)?;
        Ok(Settings {
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
                })
            }
            other => Err(ConfigError::Limit(format!(
                "store.url {other:?}: use embedded, memory, redis://host:port/db, \
                 redis+sentinel://host:port,.../service or redis+cluster://host:port,..."
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
    })
}

fn parse_probe_target(text: &str) -> Result<HostPort, ConfigError> {
    HostPort::parse(text)
        .map_err(|_| ConfigError::Limit(format!("health.probe_target {text:?} must be host:port")))
}

fn valid_exit_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-' | b'[' | b']')
        })
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
    }

    #[test]
    fn remote_listen_needs_opt_in() {
        let mut config = Config {
            listen: "0.0.0.0:8080".parse().unwrap(),
            ..Config::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::RemoteListen(_))
        ));
        config.allow_remote = true;
        assert!(config.validate().is_ok());
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
