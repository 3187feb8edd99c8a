//! Opening a transport to an origin through one exit.
//!
//! Each exit kind is one file here ([`direct`], [`http_connect`],
//! [`socks5`]) behind one enum, [`ExitKind`]: it opens a raw TCP tunnel to
//! the origin and says which egress address the tunnel revealed, if any.
//! Adding a kind is a file here, a variant and one line in `each_kind!`
//! below, and one arm in the exit URL parser (`exits::spec`).
//!
//! A [`Dialer`] is one lane's view of an exit: the kind, the exit's
//! credentials with the lane's upstream session filled in, the egress
//! address check and the TLS settings. Every stage of a connect runs under
//! one deadline, and every failure says which stage failed
//! ([`ConnectError`]), so the client learns whether the exit or the origin
//! is at fault.

pub mod direct;
pub mod guard;
pub mod http_connect;
pub mod socks5;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::egress_ip::IpCheck;
use super::error::{ConnectError, Stage};
use super::tls::UpstreamTls;
use crate::identity::ExitId;
use crate::net::HostPort;

/// The placeholder in an exit's credentials that is replaced by an
/// identity's upstream session id.
pub const SESSION_PLACEHOLDER: &str = "{session}";

/// Basic credentials for an upstream proxy. Never shown: `Debug` redacts
/// the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAuth {
    /// User name, percent-decoded.
    pub user: String,
    /// Password, percent-decoded.
    pub password: String,
}

impl fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyAuth({:?}, <redacted>)", self.user)
    }
}

impl ProxyAuth {
    /// Whether the credentials carry a `{session}` placeholder.
    pub fn has_session_placeholder(&self) -> bool {
        self.user.contains(SESSION_PLACEHOLDER) || self.password.contains(SESSION_PLACEHOLDER)
    }

    /// The credentials with `{session}` replaced by `session`.
    pub fn with_session(&self, session: &str) -> ProxyAuth {
        ProxyAuth {
            user: self.user.replace(SESSION_PLACEHOLDER, session),
            password: self.password.replace(SESSION_PLACEHOLDER, session),
        }
    }

    /// The `Proxy-Authorization` value for these credentials.
    pub fn basic_header(&self) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        let mut value = HeaderValue::from_str(&format!("Basic {token}"))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        value.set_sensitive(true);
        value
    }
}

/// An upstream proxy: its address and, optionally, its credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyAddress {
    /// The proxy's address.
    pub proxy: HostPort,
    /// Credentials, if the proxy wants them.
    pub auth: Option<ProxyAuth>,
}

impl ProxyAddress {
    /// `scheme://user:***@host:port`, without the password.
    pub fn redacted_url(&self, scheme: &str) -> String {
        match &self.auth {
            Some(c) => format!("{scheme}://{}:***@{}", c.user, self.proxy),
            None => self.public_url(scheme),
        }
    }

    /// `scheme://host:port`, without credentials, the user name too.
    pub fn public_url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.proxy)
    }
}

/// How an exit is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Egress straight from this machine (`direct://[SOURCE_IP]`).
    Direct(direct::Direct),
    /// An HTTP proxy reached with CONNECT (`http://[user:pass@]host:port`).
    HttpConnect(http_connect::HttpConnect),
    /// A SOCKS5 proxy (`socks5://[user:pass@]host:port`).
    Socks5(socks5::Socks5),
}

/// Calls the same method on whichever kind `$kind` is.
macro_rules! each_kind {
    ($kind:expr, $k:ident => $call:expr) => {
        match $kind {
            ExitKind::Direct($k) => $call,
            ExitKind::HttpConnect($k) => $call,
            ExitKind::Socks5($k) => $call,
        }
    };
}

impl ExitKind {
    /// The upstream proxy, unless the exit is direct.
    pub fn proxy(&self) -> Option<&ProxyAddress> {
        each_kind!(self, k => k.proxy())
    }

    /// The proxy's credentials, if it is a proxy and has any.
    pub fn credentials(&self) -> Option<&ProxyAuth> {
        self.proxy().and_then(|p| p.auth.as_ref())
    }

    /// The URL without credentials, for logs and messages.
    pub fn redacted_url(&self) -> String {
        each_kind!(self, k => k.redacted_url())
    }

    /// The URL without the user name either (see [`ProxyAddress::public_url`]).
    pub fn public_url(&self) -> String {
        match self {
            ExitKind::Direct(direct) => direct.redacted_url(),
            ExitKind::HttpConnect(http) => http.0.public_url("http"),
            ExitKind::Socks5(socks) => socks.0.public_url("socks5"),
        }
    }

    /// The id an exit of this kind gets when none is given: stable when
    /// exits are reordered (`host:port`, `direct`, `direct-IP`).
    pub fn default_id(&self) -> String {
        match self {
            ExitKind::Direct(direct) => direct.default_id(),
            _ => self
                .proxy()
                .map(|p| p.proxy.to_string())
                .unwrap_or_default(),
        }
    }

    /// Opens a raw tunnel to `target`; also returns the egress address the
    /// transport itself reveals, if any.
    pub async fn open(
        &self,
        ctx: &DialContext<'_>,
        target: &HostPort,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        each_kind!(self, k => k.open(ctx, target).await)
    }
}

/// What a kind needs from its lane to open a tunnel.
#[derive(Debug)]
pub struct DialContext<'a> {
    /// The exit's credentials with the lane's session filled in.
    pub credentials: Option<&'a ProxyAuth>,
    /// When the whole connect must be done.
    pub deadline: Instant,
    /// The deadline's length, for error messages.
    pub timeout: Duration,
    /// CONNECT answer header in which the exit states the egress address.
    pub ip_header: Option<&'a HeaderName>,
    /// SOCKS5 exits: the reply's bound address is the egress address.
    pub socks_reply_is_egress: bool,
    /// Where the direct exit must not connect (SSRF guard).
    pub guard: &'a guard::AddressGuard,
    /// The address the lane's tunnels leave from, once one stated it: a
    /// direct exit on a host with IPv4 and IPv6 dials the origin's address
    /// of its family first, so that the identity keeps its address where
    /// the origin has one of that family.
    pub egress: Option<IpAddr>,
    /// Whose turns a lookup of the target takes: a client's origin, or (a
    /// health probe's target) the operator's.
    pub lookup: Lookup,
}

impl DialContext<'_> {
    /// The error for a stage that ran past the deadline.
    pub fn timed_out(&self, stage: Stage) -> ConnectError {
        ConnectError::Timeout {
            stage,
            after: self.timeout,
        }
    }

    /// Connects to an upstream proxy's address.
    pub async fn dial_proxy(&self, proxy: &HostPort) -> Result<TcpStream, ConnectError> {
        let unreachable = |source| ConnectError::ExitUnreachable {
            proxy: proxy.clone(),
            source: Arc::new(source),
        };
        let addrs = resolve_exit(&proxy.host, proxy.port, self.deadline)
            .await
            .map_err(|_| self.timed_out(Stage::ExitConnect))?
            .map_err(unreachable)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match tokio::time::timeout_at(self.deadline, connect_from(addr, None)).await {
                Err(_) => return Err(self.timed_out(Stage::ExitConnect)),
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => last = e,
            }
        }
        Err(unreachable(last))
    }
}

/// Everything needed to open tunnels through one exit for one lane.
#[derive(Debug)]
pub struct Dialer {
    /// The exit.
    pub exit: ExitId,
    /// How it is reached.
    pub kind: ExitKind,
    /// The exit's credentials, with the lane's session filled in.
    pub credentials: Option<ProxyAuth>,
    /// SOCKS5 exits: the reply's bound address is the egress address.
    pub socks_reply_is_egress: bool,
    /// TLS towards origins.
    pub tls: UpstreamTls,
    /// Offer HTTP/2 to the origin.
    pub h2: bool,
    /// Deadline for a whole connect.
    pub timeout: Duration,
    /// Egress address checks.
    pub ip_check: IpCheck,
    /// Where the direct exit must not connect (SSRF guard).
    pub guard: Arc<guard::AddressGuard>,
}

impl Dialer {
    /// The context a kind opens a tunnel in, for a connect ending at `deadline`.
    pub fn context(&self, deadline: Instant) -> DialContext<'_> {
        DialContext {
            credentials: self.credentials.as_ref(),
            deadline,
            timeout: self.timeout,
            ip_header: self.ip_check.header.as_ref(),
            socks_reply_is_egress: self.socks_reply_is_egress,
            guard: &self.guard,
            egress: self
                .ip_check
                .pinned
                .as_ref()
                .and_then(|pinned| pinned.get().copied()),
            lookup: Lookup::Origin,
        }
    }

    /// Opens a raw tunnel to `target` through the exit.
    pub async fn open_transport(
        &self,
        target: &HostPort,
        deadline: Instant,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        self.kind.open(&self.context(deadline), target).await
    }

    /// Opens a raw tunnel to `target` through the exit, its egress address
    /// checked as for any tunnel of the lane (passthrough).
    pub async fn raw_tunnel(
        &self,
        target: &HostPort,
    ) -> Result<(TcpStream, Option<IpAddr>), ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let (tcp, reported) = self.open_transport(target, deadline).await?;
        let egress = self.check_egress(reported, deadline).await?;
        Ok((tcp, egress))
    }

    /// Opens and drops a tunnel to `target`: the health probe. A direct
    /// exit looks the operator's probe target up among the exits' turns (a
    /// probe that waited behind clients' origins would count against the
    /// exit), a client's origin (a trial) among the origins'.
    pub async fn probe(&self, target: &HostPort, whose: Lookup) -> Result<(), ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let context = DialContext {
            lookup: whose,
            ..self.context(deadline)
        };
        self.kind.open(&context, target).await.map(|_| ())
    }
}

/// Name lookups running at most. A lookup holds a thread of the runtime's
/// blocking pool until the system resolver answers, whatever became of the
/// request that asked (it cannot be cancelled): without a bound, a client
/// naming hosts whose name servers never answer would queue lookups
/// without end, and password checks, store sweeps and every other lookup
/// wait on that pool. More wait for a turn, within their request's
/// connect deadline.
pub const MAX_LOOKUPS: usize = 64;

/// Of [`MAX_LOOKUPS`], the turns kept for exits' own names (a proxy exit
/// named by host): clients choose the origins' names, and origins whose
/// name servers never answer would otherwise hold every turn, so that an
/// exit's lookup timed out and counted against the exit, killing it and
/// retiring its identities for a fault that was not its.
pub const EXIT_LOOKUPS: usize = 8;

static ORIGIN_TURNS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_LOOKUPS - EXIT_LOOKUPS);
static EXIT_TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(EXIT_LOOKUPS);

/// Whose name a lookup is for: which turns it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// An origin's (through the direct exit): a name a client chose.
    Origin,
    /// An exit's own host.
    Exit,
}

/// The addresses of `host`, without a lookup for IP literals.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    resolve_for(Lookup::Origin, host, port).await
}

/// How long an exit's own name is taken as resolved.
const EXIT_NAME_FRESH: Duration = Duration::from_secs(60);

/// After a lookup that failed or ran out of time, how long the last
/// answer is taken before the name is looked up again (every dial would
/// otherwise wait for a lookup while the name servers hang).
const EXIT_NAME_RETRY: Duration = Duration::from_secs(10);

/// The oldest last answer taken when the name no longer resolves: past
/// it the lookup's failure stands (a name the provider retired must not
/// send tunnels, and their credentials, to an address reassigned since).
const EXIT_NAME_KEPT: Duration = Duration::from_secs(3600);

/// The most exit names kept resolved (a configuration names a few).
const EXIT_NAMES_KEPT: usize = 1024;

/// An exit's name as last resolved.
#[derive(Clone)]
struct KnownName {
    /// Its addresses at the last answer.
    addrs: Vec<SocketAddr>,
    /// When they were resolved.
    resolved: Instant,
    /// When it is next looked up again (a minute after an answer, ten
    /// seconds after a try that failed).
    recheck: Instant,
}

/// Exits' own names (and direct exits' probe targets) as last resolved.
type ExitNames = std::collections::HashMap<(String, u16), KnownName>;

fn exit_names() -> &'static std::sync::Mutex<ExitNames> {
    static NAMES: std::sync::OnceLock<std::sync::Mutex<ExitNames>> = std::sync::OnceLock::new();
    NAMES.get_or_init(Default::default)
}

fn known_name(key: &(String, u16)) -> Option<KnownName> {
    exit_names()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(key)
        .cloned()
}

fn remember_name(key: (String, u16), known: KnownName) {
    let mut names = exit_names()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if names.len() >= EXIT_NAMES_KEPT && !names.contains_key(&key) {
        names.clear();
    }
    names.insert(key, known);
}

/// A name's answer, taken for [`EXIT_NAME_FRESH`].
fn answered(addrs: Vec<SocketAddr>) -> KnownName {
    let now = Instant::now();
    KnownName {
        addrs,
        resolved: now,
        recheck: now + EXIT_NAME_FRESH,
    }
}

/// The addresses of an exit's own `host` (or a direct exit's probe
/// target), by `deadline`: resolved within the last minute, or looked up
/// among the exits' turns. When an answer of the last hour is known, one
/// dial looks the name up again (its lookup may take half the time left)
/// while the others take that answer for the next ten seconds, and so
/// does that dial when its lookup fails or runs out of time (the last
/// known good): one provider whose name servers hang, holding the exits'
/// turns, then delays one tunnel of another exit every ten seconds at
/// most, and none times out on a lookup and counts against its exit. The
/// outer error is the deadline's.
pub async fn resolve_exit(
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<io::Result<Vec<SocketAddr>>, tokio::time::error::Elapsed> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Ok(vec![SocketAddr::new(ip, port)]));
    }
    let key = (host.to_owned(), port);
    let known = known_name(&key).filter(|known| known.resolved.elapsed() < EXIT_NAME_KEPT);
    let Some(known) = known else {
        let found = tokio::time::timeout_at(deadline, resolve_for(Lookup::Exit, host, port)).await;
        if let Ok(Ok(addrs)) = &found {
            remember_name(key, answered(addrs.clone()));
        }
        return found;
    };
    if Instant::now() < known.recheck {
        return Ok(Ok(known.addrs));
    }
    // Known but due: this dial looks it up again, the others meanwhile
    // take the last answer for the next ten seconds (a failed lookup
    // leaves it so).
    let recheck = Instant::now() + EXIT_NAME_RETRY;
    remember_name(
        key.clone(),
        KnownName {
            recheck,
            ..known.clone()
        },
    );
    // Half the time left for a new answer, the rest for the connection if
    // the old one has to do.
    let now = Instant::now();
    let half = now + deadline.saturating_duration_since(now) / 2;
    match tokio::time::timeout_at(half, resolve_for(Lookup::Exit, host, port)).await {
        Ok(Ok(fresh)) => {
            remember_name(key, answered(fresh.clone()));
            Ok(Ok(fresh))
        }
        failed => {
            let why = match &failed {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer in time".to_owned(),
            };
            tracing::debug!(%host, %why, "an exit's name did not resolve again: its last answer is used");
            Ok(Ok(known.addrs))
        }
    }
}

/// [`resolve`], taking a turn among `whose` lookups.
pub async fn resolve_for(whose: Lookup, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let turns = match whose {
        Lookup::Origin => &ORIGIN_TURNS,
        Lookup::Exit => &EXIT_TURNS,
    };
    let turn = turns.acquire().await.map_err(io::Error::other)?;
    let name = (host.to_owned(), port);
    let lookup = tokio::task::spawn_blocking(move || {
        // The turn ends when the resolver answers, not when the asker
        // stops waiting.
        let _turn = turn;
        std::net::ToSocketAddrs::to_socket_addrs(&name).map(Iterator::collect)
    });
    lookup.await.map_err(io::Error::other)?
}

/// Connects to `addr`, from `source` when given, with Nagle off.
pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exit's name that no longer resolves in time (here: every exit
    /// turn taken) keeps its last answer; one never resolved times out.
    #[tokio::test]
    async fn an_exits_name_keeps_its_last_answer() {
        let Some(long_ago) = Instant::now().checked_sub(EXIT_NAME_FRESH * 2) else {
            return;
        };
        let known = vec![SocketAddr::from(([127, 0, 0, 7], 8080))];
        remember_name(
            ("stale.exit.invalid".into(), 8080),
            KnownName {
                addrs: known.clone(),
                resolved: long_ago,
                recheck: long_ago,
            },
        );
        let turns = u32::try_from(EXIT_LOOKUPS).unwrap_or(u32::MAX);
        let all = EXIT_TURNS
            .acquire_many(turns)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let deadline = || Instant::now() + Duration::from_millis(200);
        let found = resolve_exit("stale.exit.invalid", 8080, deadline()).await;
        assert_eq!(found.ok().and_then(Result::ok), Some(known.clone()));
        // Taken again at once for a while, without another wait.
        let started = Instant::now();
        let again = resolve_exit("stale.exit.invalid", 8080, deadline()).await;
        assert_eq!(again.ok().and_then(Result::ok), Some(known.clone()));
        assert!(started.elapsed() < Duration::from_millis(50));
        // Two dials due at once: one looks the name up, the other takes
        // the last answer without waiting.
        remember_name(
            ("due.exit.invalid".into(), 8080),
            KnownName {
                addrs: known.clone(),
                resolved: long_ago,
                recheck: long_ago,
            },
        );
        let timed = || async {
            let started = Instant::now();
            let found = resolve_exit("due.exit.invalid", 8080, deadline()).await;
            (started.elapsed(), found.ok().and_then(Result::ok))
        };
        let (one, two) = tokio::join!(timed(), timed());
        assert_eq!(
            (&one.1, &two.1),
            (&Some(known.clone()), &Some(known.clone()))
        );
        assert!(
            one.0.min(two.0) < Duration::from_millis(50),
            "{one:?} {two:?}"
        );
        // An answer older than the hour it may be kept is not taken.
        if let Some(hours_ago) = Instant::now().checked_sub(EXIT_NAME_KEPT * 2) {
            remember_name(
                ("retired.exit.invalid".into(), 8080),
                KnownName {
                    addrs: known,
                    resolved: hours_ago,
                    recheck: hours_ago,
                },
            );
            let retired = resolve_exit("retired.exit.invalid", 8080, deadline()).await;
            assert!(retired.is_err(), "{retired:?}");
        }
        let unknown = resolve_exit("never.exit.invalid", 8080, deadline()).await;
        assert!(unknown.is_err(), "{unknown:?}");
        drop(all);
    }

    /// With every turn taken, a lookup waits for one; an IP literal needs
    /// none.
    /// With every origin turn taken (origins whose name servers never
    /// answer), an exit's own name still resolves.
    #[tokio::test]
    async fn lookups_wait_for_a_turn_when_all_are_taken() {
        let turns = u32::try_from(MAX_LOOKUPS - EXIT_LOOKUPS).unwrap_or(u32::MAX);
        let all = ORIGIN_TURNS
            .acquire_many(turns)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let waiting =
            tokio::time::timeout(Duration::from_millis(200), resolve("localhost", 80)).await;
        assert!(waiting.is_err(), "a lookup ran without a turn");
        let exit = tokio::time::timeout(
            Duration::from_secs(20),
            resolve_for(Lookup::Exit, "localhost", 80),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!exit.is_empty(), "an exit's name has turns of its own");
        // A direct exit's health probe looks its target up among them too.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let target = HostPort::new("localhost", listener.local_addr().map_or(0, |a| a.port()));
        let guard = guard::AddressGuard::default();
        let context = |lookup| DialContext {
            credentials: None,
            deadline: Instant::now() + Duration::from_millis(300),
            timeout: Duration::from_millis(300),
            ip_header: None,
            socks_reply_is_egress: false,
            guard: &guard,
            egress: None,
            lookup,
        };
        let direct = direct::Direct::default();
        let probed = direct.open(&context(Lookup::Exit), &target).await;
        assert!(probed.is_ok(), "{probed:?}");
        let client = direct.open(&context(Lookup::Origin), &target).await;
        assert!(
            matches!(client, Err(ConnectError::Timeout { .. })),
            "a client's origin waits for a turn: {client:?}"
        );
        let literal = resolve("127.0.0.1", 80)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(literal, [SocketAddr::from(([127, 0, 0, 1], 80))]);
        drop(all);
        let found = tokio::time::timeout(Duration::from_secs(20), resolve("localhost", 80))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!found.is_empty());
    }
}
