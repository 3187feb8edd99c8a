//! Carrying requests to origins through exits (used by pipeline stage 7,
//! send).
//!
//! Each exit owns an [`ExitClient`]: keep-alive connection pools whose
//! connectors only ever dial through that exit, so a connection (and the IP
//! it leaves from) is never shared across exits. Within an exit, pools are
//! split by [`Lane`]: every identity has its own (its connections, its
//! upstream session, its egress-address check), and cookie-less traffic
//! shares the pools of the exit's anonymous sessions. Bodies stream both
//! ways.
//!
//! Errors name the exit and the stage that failed (see [`UpstreamError`]).
//!
//! Rooms: [`dial`] opens a transport through each kind of exit,
//! [`egress_ip`] learns and checks the address a tunnel leaves from,
//! [`tls`] encrypts towards the origin, [`conn`] hands connections to
//! hyper's pools, [`error`] says what failed and whose fault it is;
//! `resumption` decides which of an identity's connections resume the TLS
//! sessions its earlier ones were given.
//!
//! Invariant: a connection (and the IP it leaves from) is never shared
//! across exits, nor across lanes of one exit: it moves from a cookie-less
//! lane to an identity's only when an answer on it founded the identity,
//! and is never on two lanes at once.

pub mod conn;
pub mod dial;
pub mod egress_ip;
pub mod error;
mod expect;
pub mod framing;
pub mod h2;
mod header_case;
mod idle;
mod lanes;
mod pool;
mod replay;
mod resumption;
mod retired;
pub mod tls;
pub mod unread;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::Body;
use crate::fingerprint::client_hello::ClientHello;
use crate::fingerprint::h2_preface::H2Fingerprint;
use crate::fingerprint::{profile, Fingerprint};
use crate::identity::{ExitId, Identity, IdentityId, RetireReason, SessionId};
use crate::net::HostPort;
use dial::{Dialer, ExitKind};
use egress_ip::{EgressCheck, IpCheck};
use lanes::Lanes;
use pool::LanePool;
use resumption::Resumes;
use tls::UpstreamTls;

pub use conn::Answered;
pub use error::{ConnectError, UpstreamError};
pub use unread::UpstreamBody;

/// The hasher of an exit's lane map: seeded, and cheaper than SipHash on
/// a lookup made once per request.
type LaneHasher = foldhash::fast::RandomState;

/// Most pools (lanes) an exit keeps; the least recently used go first.
const MAX_LANES_PER_EXIT: usize = 65_536;

/// Pool and timeout settings shared by every exit's client.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Deadline for reaching an origin (exit, CONNECT, TLS).
    pub connect_timeout: Duration,
    /// Deadline for the origin's response head once the request is sent.
    pub response_head_timeout: Duration,
    /// How long idle connections stay pooled.
    pub idle_timeout: Duration,
    /// Most idle connections per origin.
    pub max_idle_per_origin: usize,
    /// Most idle HTTP/1.1 connections of one exit, over all its lanes.
    pub max_idle_per_exit: usize,
    /// Where the direct exit must not connect (`upstream.deny_ranges` and
    /// pinproxy's own listeners); one per daemon.
    pub guard: Arc<dial::guard::AddressGuard>,
    /// Counts idle HTTP/1.1 connections parked (their hyper connection
    /// and buffers released until their next request); one per daemon.
    pub parked: prometheus_client::metrics::counter::Counter,
    /// Counts requests sent again after the origin left them unanswered on
    /// an idle connection, or said over HTTP/2 that it did not process
    /// them; one per daemon.
    pub replayed: prometheus_client::metrics::counter::Counter,
    /// The bounds on answers their clients stopped reading; one per daemon.
    pub unread: Arc<unread::Unread>,
}

/// Where a request goes: the origin a connection is opened to (and pooled
/// by). The request itself carries an origin-form URI (its path and query).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// TLS to the origin (`https`).
    pub https: bool,
    /// Its host and port.
    pub target: HostPort,
}

/// The authority an HTTP/2 client named in `:authority`, when it is not
/// the text pinproxy would write for its tunnel's host (a virtual host
/// other than the CONNECT host, a default port written out): carried in
/// the request's extensions so that the origin is told what the client
/// asked for, as an HTTP/1.1 client's own `Host` is, whichever protocol
/// the origin speaks. The connection still goes to the tunnel's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAuthority(pub http::uri::Authority);

impl ClientAuthority {
    /// The authority of `uri` (an HTTP/2 request's), unless it reads as
    /// what pinproxy writes for `origin` anyway, or `None` without one.
    /// Compared as text, without allocating: most requests name their
    /// tunnel's host exactly.
    pub fn differing(uri: &http::Uri, origin: &Origin) -> Option<ClientAuthority> {
        let authority = uri.authority()?;
        let text = authority.as_str();
        let host = &*origin.target.host;
        let written_host = |text: &str| match host.contains(':') {
            true => text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) == Some(host),
            false => text == host,
        };
        let same = if origin.target.port == crate::net::default_port(origin.https) {
            written_host(text)
        } else {
            text.rsplit_once(':')
                .is_some_and(|(h, port)| written_host(h) && port.parse() == Ok(origin.target.port))
        };
        (!same).then(|| ClientAuthority(authority.clone()))
    }
}

/// Whether a request came over HTTP/2. The pipeline passes a request on
/// with the version it came with (HTTP/2, or HTTP/1.1 for every HTTP/1.x
/// one) until the pool writes it for the origin's protocol: an extension
/// saying so would cost every HTTP/2 request an extension map, copied
/// again by its replay. A `host` field such a request carries beside its
/// `:authority` (nghttp2 and Node clients send one when the application
/// sets `Host`) is the client's own and goes to an HTTP/2 origin where the
/// client put it; `:authority` stays the request's target (RFC 9113
/// §8.3.1), and an HTTP/1.1 origin gets one `Host`, first, from it.
pub fn came_over_http2<B>(request: &http::Request<B>) -> bool {
    request.version() == http::Version::HTTP_2
}

/// Which pool of an exit a request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKey {
    /// Cookie-less traffic on one anonymous upstream session.
    Anonymous(SessionId),
    /// One identity's own connections.
    Identity(IdentityId),
}

/// A pool partition: which connections, which upstream session and which
/// egress address a request may use.
#[derive(Clone, Debug)]
pub struct Lane {
    /// The pool.
    pub key: PoolKey,
    /// The upstream session filled into `{session}`.
    pub session: SessionId,
    /// For identities: the address every tunnel must leave from (`None`
    /// until the first tunnel records it).
    pub expected_ip: Option<IpAddr>,
    /// Offer HTTP/2 to the origin (the client offered it; rustls mode).
    pub h2: bool,
    /// The fingerprint the lane's connections present in mirror mode: the
    /// identity's recorded one, or (cookie-less traffic) the client's.
    pub fingerprint: Option<Arc<Fingerprint>>,
    /// Cookie-less traffic: which client fingerprint the lane's connections
    /// present (lanes of different clients never share a connection).
    /// 0 for an identity's lane, whose fingerprint never changes.
    pub fingerprint_key: u64,
    /// The request's client connection offered pinproxy a TLS session (its
    /// ClientHello carried a pre_shared_key): an identity's lane in mirror
    /// mode then resumes its own (see `resumption::Resumes`).
    pub client_resumes: bool,
}

impl Lane {
    /// The lane of cookie-less traffic on anonymous session `session`.
    pub fn anonymous(session: SessionId) -> Lane {
        Lane {
            key: PoolKey::Anonymous(session),
            session,
            expected_ip: None,
            h2: false,
            fingerprint: None,
            fingerprint_key: 0,
            client_resumes: false,
        }
    }

    /// For an identity's lane, the address its tunnels must leave from:
    /// set from the identity's record, or by the lane's first tunnel.
    fn pinned_address(&self) -> Option<Arc<OnceLock<IpAddr>>> {
        match self.key {
            PoolKey::Identity(_) => {
                let cell = OnceLock::new();
                if let Some(ip) = self.expected_ip {
                    let _ = cell.set(ip);
                }
                Some(Arc::new(cell))
            }
            PoolKey::Anonymous(_) => None,
        }
    }

    /// An identity's lane.
    pub fn identity(identity: &Identity) -> Lane {
        Lane {
            key: PoolKey::Identity(identity.id),
            session: identity.session,
            expected_ip: identity.egress_ip,
            h2: false,
            fingerprint: Some(identity.fingerprint.clone()),
            fingerprint_key: 0,
            client_resumes: false,
        }
    }
}

/// How to reach one exit: what the pools of an [`ExitClient`] dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitRoute {
    /// The exit's id.
    pub id: ExitId,
    /// How it is reached.
    pub kind: ExitKind,
    /// How its tunnels' egress addresses are learnt.
    pub egress: EgressCheck,
    /// SOCKS5 exits: the reply's bound address is the egress address.
    pub socks_reply_is_egress: bool,
    /// Whose TLS ClientHello and HTTP/2 preface its connections present.
    pub fingerprint: FingerprintMode,
}

/// Whose fingerprint (TLS ClientHello, HTTP/2 preface) an exit's
/// connections present to origins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FingerprintMode {
    /// The client's own, per identity (BoringSSL and a shaped HTTP/2).
    #[default]
    Mirror,
    /// A current Chrome's, for clients that are not browsers.
    Chrome,
    /// pinproxy's own (rustls and hyper's HTTP/2), whoever the client is.
    Rustls,
}

impl FingerprintMode {
    /// A short, stable label (metrics, listings).
    pub fn label(self) -> &'static str {
        match self {
            FingerprintMode::Mirror => "mirror",
            FingerprintMode::Chrome => "chrome",
            FingerprintMode::Rustls => "rustls",
        }
    }
}

/// What a lane's connections say to origins: the ClientHello BoringSSL
/// imitates (`None`: rustls) and the HTTP/2 preface (`None`: hyper's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Presentation {
    /// The ClientHello to imitate.
    pub hello: Option<Arc<ClientHello>>,
    /// The HTTP/2 preface to send.
    pub h2: Option<Arc<H2Fingerprint>>,
}

/// Which connections of an exit a request may use: its lane's, presenting
/// the same fingerprint, offering the same protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PoolId {
    key: PoolKey,
    fingerprint: u64,
    h2: bool,
}

/// The connection pools of one exit.
#[derive(Clone)]
pub struct ExitClient {
    route: Arc<ExitRoute>,
    tls: UpstreamTls,
    settings: PoolSettings,
    /// One pool per lane and way of speaking (see [`PoolId`]).
    pools: Arc<Lanes>,
    /// The exit's retired lanes, shared with the clients a reload
    /// replaced this one with or this one replaced (see
    /// [`ExitClient::succeeding`]).
    retired: Arc<retired::RetiredLanes>,
    /// Closes idle connections on time and beyond the exit's cap.
    _sweeper: Arc<idle::Sweeper>,
}

impl std::fmt::Debug for ExitClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitClient")
            .field("exit", &self.route.id)
            .field("lanes", &self.pools.len())
            .finish_non_exhaustive()
    }
}

/// A lane to drop, retired (see [`ExitClient::forget`]).
#[derive(Clone, Debug)]
pub struct Forgotten {
    /// The lane.
    pub key: PoolKey,
    /// Whether its pools are kept per client presentation too.
    pub every_presentation: bool,
    /// Why.
    pub reason: RetireReason,
}

/// `timeout` after `started`; one too large to add is as good as never, as
/// in `tokio::time::timeout`.
fn deadline(started: std::time::Instant, timeout: Duration) -> tokio::time::Instant {
    /// Far enough to be never, near enough not to overflow a clock reading.
    const NEVER: Duration = Duration::from_secs(30 * 365 * 86_400);
    let started = tokio::time::Instant::from_std(started);
    started
        .checked_add(timeout)
        .or_else(|| started.checked_add(NEVER))
        .unwrap_or(started)
}

impl ExitClient {
    /// The pools of the exit `route`.
    pub fn new(route: ExitRoute, tls: UpstreamTls, settings: &PoolSettings) -> Self {
        Self::with_retired(route, tls, settings, Arc::default())
    }

    /// The pools of the exit `route`, replacing `previous` (the same exit's
    /// client before a reload changed its settings): a retirement decided
    /// through either stops the requests holding either's pools.
    pub fn succeeding(
        previous: &ExitClient,
        route: ExitRoute,
        tls: UpstreamTls,
        settings: &PoolSettings,
    ) -> Self {
        Self::with_retired(route, tls, settings, previous.retired.clone())
    }

    fn with_retired(
        route: ExitRoute,
        tls: UpstreamTls,
        settings: &PoolSettings,
        retired: Arc<retired::RetiredLanes>,
    ) -> Self {
        // A lane idle for twice the connection idle time has no
        // connection left worth keeping.
        let pools = Arc::new(Lanes::new(
            settings.idle_timeout.saturating_mul(2),
            MAX_LANES_PER_EXIT,
        ));
        retired.register(&pools);
        ExitClient {
            route: Arc::new(route),
            tls,
            settings: settings.clone(),
            _sweeper: Arc::new(idle::Sweeper::start(
                pools.clone(),
                settings.max_idle_per_exit,
            )),
            pools,
            retired,
        }
    }

    fn dialer(
        &self,
        session: SessionId,
        pinned: Option<Arc<OnceLock<IpAddr>>>,
        h2: bool,
    ) -> Dialer {
        let route = &self.route;
        let credentials = route
            .kind
            .credentials()
            .map(|c| c.with_session(&session.to_string()));
        Dialer {
            exit: route.id.clone(),
            kind: route.kind.clone(),
            credentials,
            socks_reply_is_egress: route.socks_reply_is_egress,
            tls: self.tls.clone(),
            h2,
            timeout: self.settings.connect_timeout,
            ip_check: IpCheck {
                header: route.egress.header.clone(),
                echo: route.egress.echo.clone(),
                pinned,
            },
            guard: self.settings.guard.clone(),
        }
    }

    /// What `lane`'s connections present, by the exit's mode.
    pub fn presentation(&self, lane: &Lane) -> Presentation {
        match self.route.fingerprint {
            FingerprintMode::Rustls => Presentation::default(),
            FingerprintMode::Chrome => Presentation {
                hello: profile::chrome_hello(),
                h2: profile::chrome_h2(),
            },
            FingerprintMode::Mirror => match &lane.fingerprint {
                Some(fingerprint) if fingerprint.tls.is_some() => Presentation {
                    hello: fingerprint.tls.clone(),
                    h2: fingerprint.h2.clone(),
                },
                // No ClientHello to mirror (the client spoke plain HTTP
                // to pinproxy): pinproxy's own.
                _ => Presentation::default(),
            },
        }
    }

    /// Whether `lane`'s connections, presenting `presentation`, resume
    /// their TLS sessions (see `resumption::Resumes`): an identity's, presenting
    /// Chrome (chrome mode), always; presenting its client's hello (mirror
    /// mode), always for a BoringSSL client's (Chromium and the browsers
    /// built on it), else as its client does; never in rustls mode. Cookie-less
    /// traffic's never, its connections keeping their sessions for the
    /// identities their answers found. Cheap: it runs while the lane map is
    /// locked.
    fn resumes(&self, lane: &Lane, presentation: &Presentation) -> Resumes {
        if presentation.hello.is_none() {
            return Resumes::Never;
        }
        match (self.route.fingerprint, lane.key) {
            (FingerprintMode::Rustls, _) => Resumes::Never,
            (_, PoolKey::Anonymous(_)) => Resumes::ForHeirs,
            (FingerprintMode::Chrome, _) => Resumes::Always,
            (FingerprintMode::Mirror, _) => Resumes::AsItsClient,
        }
    }

    /// The pool of `lane`, held to the address its identity's record holds
    /// (made before the record knew it, a pool's own first tunnel may have
    /// set another: refused, `ExitIpDrift`).
    fn pool(&self, lane: &Lane) -> Result<Arc<LanePool>, UpstreamError> {
        let pool = self.lane_pool(lane);
        if let Some(expected) = lane.expected_ip {
            pool.hold_to(expected).map_err(UpstreamError::Connect)?;
        }
        Ok(pool)
    }

    fn lane_pool(&self, lane: &Lane) -> Arc<LanePool> {
        let id = PoolId {
            key: lane.key,
            fingerprint: lane.fingerprint_key,
            h2: lane.h2,
        };
        self.pools.get_or_make(id, || {
            let pinned = lane.pinned_address();
            let dialer = self.dialer(lane.session, pinned, lane.h2);
            let limits = pool::Limits {
                idle_timeout: self.settings.idle_timeout,
                max_idle_per_origin: self.settings.max_idle_per_origin,
                parked: self.settings.parked.clone(),
                replayed: self.settings.replayed.clone(),
                unread: self.settings.unread.clone(),
            };
            let presentation = self.presentation(lane);
            let resumes = self.resumes(lane, &presentation);
            let cookie_less = matches!(lane.key, PoolKey::Anonymous(_));
            let pool = LanePool::new(dialer, presentation, limits, resumes, cookie_less);
            // Made rarely (once per lane): the map is read only then.
            if let Some(reason) = self.retired.reason(&lane.key) {
                pool.retire(reason);
            }
            pool
        })
    }

    /// What an identity founded by an answer on a cookie-less lane's
    /// `connection` (the answer to a request for `origin` on lane
    /// `anonymous`, whose upstream session is now the identity's) takes of
    /// it, as a browser goes on from the connection its cookies came on:
    /// the TLS session the origin issued there, for the identity's next
    /// connection to resume (see `LanePool::adopt_sessions`), and the
    /// connection itself rather than open another with a handshake of its
    /// own right after: an HTTP/2 one at once (see
    /// `LanePool::hand_over_h2`), an HTTP/1.1 one once the answer has been
    /// read, when it was `dialled_for_it` (for the founding request: see
    /// `LanePool::hand_over`). Only when the identity presents what the
    /// lane presented (the hello the session was made with). Whatever the
    /// identity takes, the connection never carries a request of the
    /// cookie-less lane again (see [`ExitClient::let_go`]).
    pub fn hand_over(
        &self,
        anonymous: &Lane,
        identity: &Identity,
        origin: &Origin,
        connection: &Arc<conn::TunnelInfo>,
        dialled_for_it: bool,
    ) {
        let Some(from) = self.anonymous_pool(anonymous) else {
            return;
        };
        let heir = Lane {
            h2: anonymous.h2,
            ..Lane::identity(identity)
        };
        let presentation = self.presentation(&heir);
        let heir = (anonymous.session == identity.session && from.presents(&presentation))
            .then(|| self.pool(&heir).ok())
            .flatten();
        let Some(heir) = heir else {
            from.let_go(origin, connection);
            return;
        };
        let named = if dialled_for_it {
            from.hand_over(&heir, connection)
        } else {
            // Handed over when it is the lane's HTTP/2 connection.
            from.hand_over_h2(&heir, origin, connection)
        };
        // After the connection: its session goes with it. A connection
        // another identity took keeps its session for that one (two
        // foundings on one HTTP/2 connection); any other founding
        // connection's goes to the identity its answer founded.
        if named || !from.handed_to_another(&heir, connection) {
            heir.adopt_sessions(origin, connection);
        }
    }

    /// An answer on `connection` (of the cookie-less lane `anonymous`, to a
    /// request for `origin`) founded an identity that takes nothing of it
    /// (one retired at its founding): the connection still never carries
    /// another request of the lane. The origin linked it to the identity
    /// when it set the cookie there, and would see it carry other
    /// visitors' requests after. An HTTP/2 one closes once its streams have
    /// ended, an HTTP/1.1 one once its answer has been read.
    pub fn let_go(&self, anonymous: &Lane, origin: &Origin, connection: &Arc<conn::TunnelInfo>) {
        if let Some(from) = self.anonymous_pool(anonymous) {
            from.let_go(origin, connection);
        }
    }

    /// The pool of the cookie-less lane `anonymous`, if it is one and is
    /// held.
    fn anonymous_pool(&self, anonymous: &Lane) -> Option<Arc<LanePool>> {
        if !matches!(anonymous.key, PoolKey::Anonymous(_)) {
            return None;
        }
        self.pools.get(&PoolId {
            key: anonymous.key,
            fingerprint: anonymous.fingerprint_key,
            h2: anonymous.h2,
        })
    }

    /// Sends `request` (origin-form URI: path and query) to `origin` on
    /// `lane` and waits for the response head, at most the response-head
    /// timeout from `started` (when the caller began sending: its own clock
    /// reading, so that this does not read the clock again). The body
    /// streams afterwards.
    pub async fn send(
        &self,
        lane: &Lane,
        origin: &Origin,
        request: Request<Body>,
        started: std::time::Instant,
    ) -> Result<Answered<UpstreamBody>, UpstreamError> {
        let pool = self.pool(lane)?;
        if lane.client_resumes {
            pool.client_resumes();
        }
        let timeout = self.settings.response_head_timeout;
        tokio::time::timeout_at(deadline(started, timeout), pool.send(origin, request))
            .await
            .map_err(|_| UpstreamError::ResponseTimeout(timeout))?
    }

    /// Sends a WebSocket upgrade (origin-form URI) to `origin` on a new
    /// HTTP/1.1 connection of `lane`.
    pub async fn send_upgrade(
        &self,
        lane: &Lane,
        origin: &Origin,
        request: Request<Body>,
    ) -> Result<Answered<Incoming>, UpstreamError> {
        let pool = self.pool(lane)?;
        let timeout = self.settings.response_head_timeout;
        tokio::time::timeout(timeout, pool.send_upgrade(origin, request))
            .await
            .map_err(|_| UpstreamError::ResponseTimeout(timeout))?
    }

    /// Drops a lane's pools and their connections (an identity's, retired
    /// for `reason`); requests still holding them write nothing (see
    /// `LanePool::retire`). `every_presentation`: the identity was founded
    /// without a ClientHello (over plain HTTP), so its lanes are also kept
    /// per client fingerprint its TLS clients presented
    /// (`Lane::fingerprint_key`), found by a walk of the exit's lanes
    /// (rare: other identities skip it).
    pub fn forget(&self, key: PoolKey, every_presentation: bool, reason: &RetireReason) {
        self.forget_many(&[Forgotten {
            key,
            every_presentation,
            reason: reason.clone(),
        }]);
    }

    /// [`ExitClient::forget`] for several lanes (a sweep's retirements):
    /// one walk of each client's lanes for all those kept per presentation.
    /// In every client the exit has had (see [`ExitClient::succeeding`]).
    pub fn forget_many(&self, lanes: &[Forgotten]) {
        self.retired.retire(lanes);
    }

    /// Retires the lanes of every identity on the exit now, for `reason`
    /// (it died: identities founded before a death retire, `exit-down`):
    /// their requests still under way (dialling, waiting for a connection,
    /// sending again after a reset) write nothing more. In every client the
    /// exit has had.
    pub fn retire_identities(&self, reason: &RetireReason) {
        self.retired.retire_every_identity(reason);
    }

    /// Retires every identity on the exit for good, for `reason` (a reload
    /// removed it): their requests still under way write nothing more, and
    /// neither do those that make their lane only now (routed on the exits
    /// in force before the reload), nor their passed-through tunnels.
    pub fn retire_all_identities(&self, reason: &RetireReason) {
        self.retired.retire_all(reason);
    }

    /// Number of live lanes.
    pub fn lanes(&self) -> u64 {
        self.pools.len() as u64
    }

    /// Opens a raw tunnel to `target` on `lane` (passthrough): same session,
    /// same egress-address check as the lane's pooled connections.
    pub async fn raw_tunnel(
        &self,
        lane: &Lane,
        target: &HostPort,
    ) -> Result<(tokio::net::TcpStream, Option<IpAddr>), UpstreamError> {
        // As a pool refuses (`LanePool::still_live`): nothing opened for an
        // identity retired since it was routed, and a tunnel opened while
        // it retired carries none of the client's bytes.
        let refuse_retired = || match self.retired.reason(&lane.key) {
            Some(reason) => Err(UpstreamError::IdentityRetired(reason)),
            None => Ok(()),
        };
        refuse_retired()?;
        let opened = self
            .dialer(lane.session, lane.pinned_address(), false)
            .raw_tunnel(target)
            .await
            .map_err(UpstreamError::Connect)?;
        refuse_retired()?;
        Ok(opened)
    }

    /// Opens and drops a tunnel to `target` on a fresh session: the health
    /// probe (`whose` names the target: the operator's probe target, or a
    /// client's origin for a trial of an unhealthy exit; see
    /// [`dial::Lookup`]).
    pub async fn probe(&self, target: &HostPort, whose: dial::Lookup) -> Result<(), ConnectError> {
        self.dialer(SessionId(rand::random()), None, false)
            .probe(target, whose)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_counts_from_the_start_and_never_overflows() {
        let started = std::time::Instant::now();
        let at = deadline(started, Duration::from_secs(120));
        assert_eq!(at.into_std() - started, Duration::from_secs(120));
        // A timeout no clock can add is years away, not a panic.
        let never = deadline(started, Duration::MAX);
        assert!(never.into_std() - started > Duration::from_secs(10 * 365 * 86_400));
    }

    /// A plain HTTP/1.1 origin on loopback answering `ok` to every request
    /// of every keep-alive connection; returns its port.
    async fn keep_alive_origin() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        head.extend_from_slice(&buf[..n]);
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            head.clear();
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        port
    }

    /// A direct exit's client whose idle connections last 100 ms.
    fn direct_client() -> (ExitClient, PoolSettings) {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = UpstreamTls::new(provider, &[]).unwrap();
        let settings = PoolSettings {
            connect_timeout: Duration::from_secs(5),
            response_head_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_millis(100),
            max_idle_per_origin: 4,
            max_idle_per_exit: 128,
            guard: Arc::new(dial::guard::AddressGuard::new(Vec::new())),
            parked: prometheus_client::metrics::counter::Counter::default(),
            replayed: prometheus_client::metrics::counter::Counter::default(),
            unread: Arc::default(),
        };
        let route = ExitRoute {
            id: ExitId::new("direct"),
            kind: ExitKind::Direct(dial::direct::Direct { source: None }),
            egress: EgressCheck::default(),
            socks_reply_is_egress: false,
            fingerprint: FingerprintMode::Rustls,
        };
        (ExitClient::new(route, tls, &settings), settings)
    }

    /// A retirement marks the pools it drops, and a pool made for the
    /// same lane afterwards (by a request routed before it) is born
    /// retired: neither writes a request. Other lanes are untouched.
    #[tokio::test]
    async fn a_retired_lanes_pools_write_nothing_even_made_anew() {
        let (client, _) = direct_client();
        let (lane, other) = (Lane::anonymous(SessionId(1)), Lane::anonymous(SessionId(2)));
        let before = client.lane_pool(&lane);
        assert!(before.still_live().is_ok());
        client.forget(lane.key, false, &RetireReason::Evicted);
        let refused = |pool: &LanePool| {
            matches!(
                pool.still_live(),
                Err(UpstreamError::IdentityRetired(RetireReason::Evicted))
            )
        };
        assert!(refused(&before), "the dropped pool");
        assert!(refused(&client.lane_pool(&lane)), "a pool made anew");
        assert!(client.lane_pool(&other).still_live().is_ok());
    }

    /// A passed-through tunnel is not opened for a lane retired since its
    /// request was routed: refused before the dial (to a closed port, which
    /// a dial would have found), where another lane's dial goes on.
    #[tokio::test]
    async fn a_retired_lane_opens_no_raw_tunnel() {
        let (client, _) = direct_client();
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            HostPort::new("127.0.0.1", listener.local_addr().unwrap().port())
        };
        let (lane, other) = (Lane::anonymous(SessionId(1)), Lane::anonymous(SessionId(2)));
        client.forget(lane.key, false, &RetireReason::Evicted);
        assert!(matches!(
            client.raw_tunnel(&lane, &closed).await,
            Err(UpstreamError::IdentityRetired(RetireReason::Evicted))
        ));
        assert!(matches!(
            client.raw_tunnel(&other, &closed).await,
            Err(UpstreamError::Connect(_))
        ));
    }

    /// A sweep's retirements drop their lanes in one call, each marked
    /// with its own reason, and a burst of them walks the remembered
    /// retired lanes a few times, not once per retirement.
    #[tokio::test]
    async fn many_lanes_are_forgotten_at_once_each_with_its_reason() {
        let (client, _) = direct_client();
        let lanes: Vec<Lane> = (0..4).map(|n| Lane::anonymous(SessionId(n))).collect();
        let pools: Vec<Arc<LanePool>> = lanes.iter().map(|l| client.lane_pool(l)).collect();
        // The first lane's HTTP/2 pool, and the second's for another
        // client presentation (found by the walk): dropped with them.
        let h2 = Lane {
            h2: true,
            ..lanes[0].clone()
        };
        let presented = Lane {
            fingerprint_key: 7,
            ..lanes[1].clone()
        };
        let variants = [client.lane_pool(&h2), client.lane_pool(&presented)];
        assert_eq!(client.lanes(), 6);
        let reasons = [RetireReason::IdleExpired, RetireReason::LifetimeExpired];
        let forgotten: Vec<Forgotten> = lanes[..2]
            .iter()
            .zip(&reasons)
            .zip([false, true])
            .map(|((lane, reason), every_presentation)| Forgotten {
                key: lane.key,
                every_presentation,
                reason: reason.clone(),
            })
            .collect();
        client.forget_many(&forgotten);
        assert_eq!(client.lanes(), 2, "the other two lanes are left");
        for (pool, reason) in pools
            .iter()
            .zip(&reasons)
            .chain(variants.iter().zip(&reasons))
        {
            assert!(
                matches!(pool.still_live(), Err(UpstreamError::IdentityRetired(r)) if r == *reason)
            );
        }
        assert!(pools[2..].iter().all(|pool| pool.still_live().is_ok()));
    }

    /// A reload that gives an exit a new client (other pool settings, the
    /// same route) leaves requests routed before it holding the old
    /// client's pools: a retirement through either client stops both, and
    /// a pool either makes for the lane afterwards is born retired.
    #[tokio::test]
    async fn a_retirement_through_either_client_of_an_exit_stops_both() {
        let (old, settings) = direct_client();
        let new = ExitClient::succeeding(&old, (*old.route).clone(), old.tls.clone(), &settings);
        let unrelated = direct_client().0;
        let (first, second) = (Lane::anonymous(SessionId(1)), Lane::anonymous(SessionId(2)));
        let held = [old.lane_pool(&first), new.lane_pool(&second)];
        let elsewhere = unrelated.lane_pool(&first);

        new.forget(first.key, false, &RetireReason::Evicted);
        old.forget(second.key, false, &RetireReason::IdleExpired);
        let refused = |pool: &LanePool, reason: RetireReason| matches!(pool.still_live(), Err(UpstreamError::IdentityRetired(r)) if r == reason);
        assert!(
            refused(&held[0], RetireReason::Evicted),
            "the old client's pool"
        );
        assert!(
            refused(&held[1], RetireReason::IdleExpired),
            "the new client's pool"
        );
        assert!(refused(&old.lane_pool(&second), RetireReason::IdleExpired));
        assert!(refused(&new.lane_pool(&first), RetireReason::Evicted));
        assert!(elsewhere.still_live().is_ok(), "another exit's client");
    }

    #[tokio::test]
    async fn origins_left_without_connections_are_forgotten() {
        use http_body_util::BodyExt as _;
        let (client, settings) = direct_client();
        let lane = Lane::anonymous(SessionId(1));

        // A crawl through one lane: a request to each of twelve origins,
        // each answered in full, so its connection goes back idle.
        const ORIGINS: usize = 12;
        for _ in 0..ORIGINS {
            let port = keep_alive_origin().await;
            let origin = Origin {
                https: false,
                target: HostPort {
                    host: Arc::from("127.0.0.1"),
                    port,
                },
            };
            let request = Request::builder()
                .uri("/")
                .header(http::header::HOST, format!("127.0.0.1:{port}"))
                .body(crate::body::empty())
                .unwrap();
            let answered = client
                .send(&lane, &origin, request, std::time::Instant::now())
                .await
                .unwrap();
            let body = answered.response.into_body().collect().await.unwrap();
            assert_eq!(&body.to_bytes()[..], b"ok");
        }
        let pool = client.lane_pool(&lane);
        assert_eq!(pool.origins_held(), ORIGINS);

        // A sweep past the idle timeout closes the connections, and the
        // origins they leave with nothing go with them.
        let later = tokio::time::Instant::now() + settings.idle_timeout;
        pool.expire_idle(later, &mut Vec::new());
        assert_eq!(pool.origins_held(), 0);
    }
}
