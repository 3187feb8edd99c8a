//! The keep-alive connections of one lane, by origin.
//!
//! A lane's connections all present the same fingerprint (its ClientHello
//! and HTTP/2 preface), so they are kept apart from every other lane's. Per
//! origin, a lane keeps one multiplexed HTTP/2 connection (as a browser
//! does) or a stack of idle HTTP/1.1 connections. When the client offers
//! HTTP/2, concurrent first requests to an origin wait for one dial, so the
//! origin sees one connection, not a burst. An HTTP/1.1 connection goes back
//! to the stack when its response body has been read to the end, and its
//! request body written: an origin may answer (a 413, a redirect) before an
//! upload is over, and a request handed to the connection meanwhile would
//! wait behind the upload.
//!
//! A request that finds its connection closed before it was written is
//! retried once on a new connection. One that was written is sent again
//! once when the origin left it unanswered on a connection that had been
//! idle, or said over HTTP/2 that it did not process it (see
//! `upstream::replay`), on the lane's own connections, and counted
//! (`upstream_requests_replayed`).
//!
//! Parking: hyper keeps an 8 KiB read and an 8 KiB write buffer (and its
//! connection state and task) for as long as an HTTP/1.1 connection lives,
//! and a fleet leaves many upstream connections idle (one per recently
//! active identity, and the shared lanes' after a burst). An idle
//! connection therefore *parks* at the first sweep after [`PARK_AFTER`] of
//! idleness (see `upstream::idle`): its task lets go of hyper's connection
//! and hands the stream back, which waits in the pool with no buffer of its
//! own (TLS state only). The next request on it checks that the origin has
//! neither closed it nor sent anything meanwhile, then starts a new hyper
//! connection on it; a stream that fails the check is closed and the
//! request takes the next idle connection or a new one, so parking never
//! sends a request onto a connection the pool could know was gone.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::conn::{Answered, TunnelInfo, UpstreamIo};
use super::dial::Dialer;
use super::error::{ExchangeKind, UpstreamError};
use super::framing;
use super::h2::{self, TokioExec};
use super::replay::{Replay, Unanswered};
use super::resumption::{Resumes, Sessions};
use super::tls::{SessionSlot, Shape};
use super::unread::{Exposure, Unread, UpstreamBody};
use super::Presentation;
use super::{came_over_http2, ClientAuthority, Origin};
use crate::body::{Body, BoxError};
use crate::fingerprint::header_order;
use crate::identity::RetireReason;
use crate::net::default_port;
use http2::HpackPolicy;

/// The sending half of an HTTP/2 connection.
#[derive(Clone)]
enum H2Sender {
    /// hyper's HTTP/2 (rustls mode: pinproxy's own preface).
    Hyper(hyper::client::conn::http2::SendRequest<Body>),
    /// wreq's HTTP/2, sending the lane's preface.
    Shaped(wreq_proto::conn::http2::SendRequest<Body>),
}

impl H2Sender {
    fn is_closed(&self) -> bool {
        match self {
            H2Sender::Hyper(s) => s.is_closed(),
            H2Sender::Shaped(s) => s.is_closed(),
        }
    }
}

#[derive(Clone)]
struct H2Conn {
    sender: H2Sender,
    info: Arc<TunnelInfo>,
    /// What its stalled streams may hold (see [`super::unread`]).
    exposure: Arc<Exposure>,
}

/// How long an idle HTTP/1.1 connection waits before it parks (it parks at
/// the first sweep after this, so one to two seconds into its idleness, as
/// a client connection does): long enough that a lane sending request after
/// request never parks (restarting a hyper connection costs a task and its
/// buffers), short enough that a burst's leftovers soon do.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// How long an HTTP/1.1 connection must have been idle before a request on
/// it keeps a copy to send again after a close (see the module
/// documentation). An origin closes an idle connection after its
/// keep-alive timeout (seconds, at the least); a connection busy with
/// request after request is not at risk, and copying every request's head
/// would cost the hot path a header map. An HTTP/2 connection counts as
/// idle from a sweep that finds no request took it for a whole sweep
/// interval until its next answer: every request of a burst that meets an
/// origin closing it may go again after the close. (Every body-less
/// request over HTTP/2 keeps a copy for the streams an origin refuses.)
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// An origin stream as an HTTP/1.1 connection reads it.
type GuardedIo = framing::ResponseGuard<UpstreamIo>;

/// Asks a connection's task to let go of its stream, handing it back here.
type ParkRequest = oneshot::Sender<GuardedIo>;

/// A running HTTP/1.1 connection.
struct H1Conn {
    sender: http1::SendRequest<Body>,
    /// To the connection's task: park (see the module documentation).
    park: oneshot::Sender<ParkRequest>,
    /// Shared with every response the connection carries: one count to
    /// take, and a small record to move through the request's futures.
    info: Arc<TunnelInfo>,
    idle_since: Instant,
    /// Tells the connection's response scanner what each request was.
    framing: framing::Exchange,
}

/// A parked HTTP/1.1 connection: no hyper connection, no task.
struct ParkedH1 {
    /// The stream, as soon as the connection's task has let go of it.
    io: oneshot::Receiver<GuardedIo>,
    info: Arc<TunnelInfo>,
    idle_since: Instant,
    framing: framing::Exchange,
}

/// An idle HTTP/1.1 connection.
enum IdleH1 {
    /// Its hyper connection runs (idle less than [`PARK_AFTER`]).
    Live(H1Conn),
    /// Parked.
    Parked(ParkedH1),
}

impl IdleH1 {
    fn idle_since(&self) -> Instant {
        match self {
            IdleH1::Live(conn) => conn.idle_since,
            IdleH1::Parked(conn) => conn.idle_since,
        }
    }
}

/// The connections to one origin.
#[derive(Default)]
struct Conns {
    h2: Option<H2Conn>,
    /// A request took the HTTP/2 connection since the last sweep (a flag,
    /// not a time: no clock read per request).
    h2_taken: bool,
    /// The first sweep that found it untaken since then: one no request
    /// has taken for the idle timeout is let go (see `expire_idle`).
    h2_quiet_since: Option<Instant>,
    /// A sweep found it untaken for a whole interval, and no answer has
    /// come on it since: the origin may be closing it ([`Reuse::Quiet`]).
    h2_quiet: bool,
    /// The lane's HTTP/2 connection once an answer on it founded an
    /// identity, on a cookie-less lane: it serves none of the lane's
    /// visitors again, and waits here for its heir to take it
    /// ([`LanePool::hand_over_h2`]) until the next sweep lets it go (a
    /// founding that failed or was given up hands it to nobody).
    founding_h2: Option<H2Conn>,
    /// A sweep has found it set aside: the next one lets it go (a founding
    /// may take a store's round trip, a `WAIT` or a disk's sync).
    founding_swept: bool,
    idle: Vec<IdleH1>,
    /// The origin answered an `h2` offer with HTTP/1.1: later dials need
    /// not wait for each other.
    speaks_h1: bool,
    /// Held while a connection that may turn out HTTP/2 is being dialled.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

impl Conns {
    /// Nothing to keep: no idle connection, no open HTTP/2 one, and no
    /// request dialling (it holds a clone of `dialing`). Read under the
    /// lane's lock, so no request can take a clone meanwhile.
    fn unused(&self) -> bool {
        self.idle.is_empty()
            && self.founding_h2.is_none()
            && self.h2.as_ref().is_none_or(|conn| conn.sender.is_closed())
            && Arc::strong_count(&self.dialing) == 1
    }
}

/// A connection checked out for one request.
enum Checked {
    H1(H1Conn),
    H2(H2Conn),
}

/// Keep-alive and timeout settings of a lane's connections.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// Most idle HTTP/1.1 connections per origin.
    pub max_idle_per_origin: usize,
    /// Counts connections parked.
    pub parked: Counter,
    /// Counts requests sent again after the origin left them unanswered.
    pub replayed: Counter,
    /// The daemon's bounds on answers their clients stopped reading.
    pub unread: Arc<Unread>,
}

/// The connections of one lane.
pub(super) struct LanePool {
    dialer: Dialer,
    presentation: Presentation,
    limits: Limits,
    /// Keyed by origins a client names, so with a seeded hasher; foldhash
    /// rather than SipHash: this map is looked up twice per request.
    origins: Mutex<HashMap<Origin, Conns, foldhash::fast::RandomState>>,
    /// Why the lane's identity retired, once it has (see
    /// [`LanePool::retire`]).
    retired: std::sync::OnceLock<RetireReason>,
    /// The identity the first founding answer on the lane was for, and
    /// the connection it came on, which goes to the identity's lane (see
    /// [`LanePool::hand_over`], [`LanePool::hand_over_h2`]).
    heir: std::sync::OnceLock<Heir>,
    /// The TLS sessions the lane's connections resume (an identity's lane
    /// with a shaped hello only; see [`Resumes`]).
    sessions: Option<Sessions>,
    /// Each connection keeps its sessions for the identity an answer on it
    /// founds ([`Resumes::ForHeirs`]: a cookie-less lane with a shaped
    /// hello).
    keeps_for_heirs: bool,
    /// A lane of cookie-less traffic (shared by its visitors), whose
    /// connections an answer may found an identity on.
    cookie_less: bool,
}

/// The identity's lane an anonymous lane's connection goes to (see
/// [`LanePool::hand_over`]).
struct Heir {
    lane: Weak<LanePool>,
    /// The connection.
    founding: Arc<TunnelInfo>,
}

impl std::fmt::Debug for LanePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanePool")
            .field("exit", &self.dialer.exit)
            .finish_non_exhaustive()
    }
}

impl LanePool {
    /// Holds the lane's tunnels to `expected` (see [`Dialer::hold_to`]).
    pub(super) fn hold_to(&self, expected: std::net::IpAddr) -> Result<(), super::ConnectError> {
        self.dialer.hold_to(expected)
    }

    /// A pool dialling with `dialer`, presenting `presentation`, resuming
    /// TLS sessions as `resumes` says; `cookie_less` for a lane of
    /// cookie-less traffic.
    pub(super) fn new(
        dialer: Dialer,
        presentation: Presentation,
        limits: Limits,
        resumes: Resumes,
        cookie_less: bool,
    ) -> LanePool {
        // `resumes` is `Never` for a presentation without a hello.
        let sessions = Sessions::new(resumes);
        LanePool {
            dialer,
            presentation,
            limits,
            origins: Mutex::new(HashMap::default()),
            retired: std::sync::OnceLock::new(),
            heir: std::sync::OnceLock::new(),
            sessions,
            keeps_for_heirs: resumes == Resumes::ForHeirs,
            cookie_less,
        }
    }

    /// A client connection of the lane's identity offered pinproxy a TLS
    /// session (see [`Sessions::client_resumes`]).
    pub(super) fn client_resumes(&self) {
        if let Some(sessions) = &self.sessions {
            sessions.client_resumes();
        }
    }

    /// Where a new connection to `origin` finds a session to offer and
    /// keeps those it is given (on a cookie-less lane, a slot of the
    /// connection's own, which never has one to offer); `None` while the
    /// lane keeps none.
    fn session_slot(&self, origin: &Origin) -> Option<Arc<SessionSlot>> {
        if !origin.https {
            return None;
        }
        if self.keeps_for_heirs {
            return Some(Arc::new(SessionSlot::default()));
        }
        let sessions = self.sessions.as_ref()?;
        sessions.slot(origin, || {
            self.shape(&[], false, None)
                .is_some_and(|shape| self.dialer.tls.said_in_full_by_boringssl(shape))
        })
    }

    /// Hands `connection` (an HTTP/1.1 connection of this anonymous lane,
    /// dialled for the request whose answer founded `heir`'s identity, and
    /// busy with that answer still) to `heir` when the answer has been
    /// read: a browser goes on with the connection its cookies came on. Only
    /// an HTTP/1.1 connection that carried nothing but the founding request
    /// is handed over: the lane's other HTTP/1.1 connections may have
    /// carried other visitors' requests (the lane serves every client with
    /// the same ClientHello); an HTTP/2 one goes at once (see
    /// [`LanePool::hand_over_h2`]). Only to the first identity founded on the
    /// lane (its session is then the identity's, and no cookie-less request
    /// takes the lane again), and only when this lane presents what the
    /// heir presents (the caller asks [`LanePool::presents`] first); the
    /// heir takes it only when its egress address rules admit it (see
    /// `Dialer::admits`). True when `heir` is the connection's heir; the
    /// connection never serves this lane again either way (see
    /// [`LanePool::let_go`]).
    pub(super) fn hand_over(&self, heir: &Arc<LanePool>, connection: &Arc<TunnelInfo>) -> bool {
        // The first heir stands: another founding may have come first.
        self.heir
            .set(Heir {
                lane: Arc::downgrade(heir),
                founding: connection.clone(),
            })
            .is_ok()
    }

    /// Hands this lane's HTTP/2 connection to `origin`, when it is
    /// `connection` (the one whose answer founded `heir`'s identity), to
    /// `heir` at once, as a browser goes on with the HTTP/2 connection its
    /// cookies came on: the identity's next requests to `origin` share it,
    /// and its streams in flight finish where they are. The lane may have
    /// carried other visitors' cookie-less requests on it (the lane serves
    /// every client with the same ClientHello), but the origin linked the
    /// identity to all of them when it set the cookie there, and no
    /// cookie-less request takes the connection once its answer founded an
    /// identity. As [`LanePool::hand_over`]: only to the first identity
    /// founded on the lane, presenting what the lane presents (the caller
    /// asks [`LanePool::presents`] first), and only when the heir stands
    /// and its egress address rules admit the connection's. True when
    /// `heir` is the connection's heir (named under the lane's lock as the
    /// connection leaves it: a founding that comes second and finds it
    /// gone finds its heir named, unless it left the lane otherwise, closed
    /// or let go for having been idle).
    pub(super) fn hand_over_h2(
        &self,
        heir: &Arc<LanePool>,
        origin: &Origin,
        connection: &Arc<TunnelInfo>,
    ) -> bool {
        let conn = {
            let mut origins = self.origins();
            let Some(conn) = Self::take_h2(&mut origins, origin, connection) else {
                return false;
            };
            let named = Heir {
                lane: Arc::downgrade(heir),
                founding: connection.clone(),
            };
            // The first heir stands; the connection leaves this lane
            // either way, and closes once its streams have ended.
            if self.heir.set(named).is_err() {
                return false;
            }
            conn
        };
        // An heir that retired meanwhile, or whose address rules refuse
        // it, lets it close once its streams have ended.
        if !heir.admits(connection) {
            return true;
        }
        let mut origins = heir.origins();
        let conns = origins.entry(origin.clone()).or_default();
        // The heir opened one of its own meanwhile: the handed one closes
        // once its streams have ended.
        if conns.h2.as_ref().is_some_and(|own| !own.sender.is_closed()) {
            return true;
        }
        conns.h2 = Some(conn);
        conns.h2_taken = true;
        // As an idle connection: the identity's first request on it keeps
        // a copy to send again should the origin close it meanwhile (its
        // first request would otherwise have dialled, which no close can
        // meet).
        conns.h2_quiet = true;
        conns.h2_quiet_since = None;
        true
    }

    /// An answer on `connection` founded an identity that takes nothing of
    /// this lane (it presents otherwise, it could not have a lane, or it
    /// retired at its founding, on an exit route a reload replaced): the
    /// connection still never serves the lane again. The origin linked it
    /// to the identity when it set the cookie there, and would see it carry
    /// other visitors' requests after. An HTTP/2 one leaves the lane now and
    /// closes once its streams have ended; an HTTP/1.1 one closes when its
    /// answer has been read (see `give_back`: capture marked it founding,
    /// `TunnelInfo::note_founding`, as soon as the answer set the cookie).
    pub(super) fn let_go(&self, origin: &Origin, connection: &Arc<TunnelInfo>) {
        let mut origins = self.origins();
        drop(Self::take_h2(&mut origins, origin, connection));
    }

    /// Takes `connection` out of `origins` when it is the open HTTP/2
    /// connection to `origin`.
    fn take_h2(
        origins: &mut HashMap<Origin, Conns, foldhash::fast::RandomState>,
        origin: &Origin,
        connection: &Arc<TunnelInfo>,
    ) -> Option<H2Conn> {
        let conns = origins.get_mut(origin)?;
        let is_it = |conn: &Option<H2Conn>| {
            conn.as_ref()
                .is_some_and(|conn| Arc::ptr_eq(&conn.info, connection) && !conn.sender.is_closed())
        };
        if is_it(&conns.founding_h2) {
            return conns.founding_h2.take();
        }
        if !is_it(&conns.h2) {
            return None;
        }
        conns.h2_quiet_since = None;
        conns.h2.take()
    }

    /// Whether another identity than `heir`'s took `connection` (see
    /// [`LanePool::hand_over`]): its TLS session then goes with it, to that
    /// identity alone.
    pub(super) fn handed_to_another(&self, heir: &Arc<LanePool>, connection: &TunnelInfo) -> bool {
        self.heir.get().is_some_and(|named| {
            std::ptr::eq(Arc::as_ptr(&named.founding), connection)
                && !std::ptr::eq(named.lane.as_ptr(), Arc::as_ptr(heir))
        })
    }

    /// Whether the lane may take over `connection` (or the session kept on
    /// it), founded on another lane: it stands, and its egress address
    /// rules admit the connection's address.
    pub(super) fn admits(&self, connection: &TunnelInfo) -> bool {
        self.still_live().is_ok() && self.dialer.admits(connection.egress_ip)
    }

    /// Whether this lane presents `presentation` (the hello its sessions
    /// were made with, see [`LanePool::adopt_sessions`]).
    pub(super) fn presents(&self, presentation: &Presentation) -> bool {
        self.presentation == *presentation
    }

    /// Takes the session `founding` (a cookie-less lane's connection,
    /// presenting this lane's hello, whose answer to a request for
    /// `origin` founded the lane's identity) kept, for the identity's next
    /// connection to `origin` to resume (see [`Sessions::adopt`]), if the
    /// lane [`admits`](LanePool::admits) the connection.
    pub(super) fn adopt_sessions(&self, origin: &Origin, founding: &TunnelInfo) {
        if let (Some(sessions), Some(slot), true) =
            (&self.sessions, &founding.sessions, origin.https)
        {
            if self.admits(founding) {
                sessions.adopt(origin, slot);
            }
        }
    }

    /// The lane's identity retired for `reason`: a request still holding
    /// the lane (routed before the retirement, then waiting for a
    /// connection) writes nothing, on a connection it dialled or one it
    /// found idle.
    pub(super) fn retire(&self, reason: RetireReason) {
        let _ = self.retired.set(reason);
    }

    /// Refused once the lane's identity retired (see [`LanePool::retire`]).
    pub(super) fn still_live(&self) -> Result<(), UpstreamError> {
        match self.retired.get() {
            None => Ok(()),
            Some(reason) => Err(UpstreamError::IdentityRetired(reason.clone())),
        }
    }

    fn origins(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Origin, Conns, foldhash::fast::RandomState>> {
        // A panic while the lock was held cannot leave the map inconsistent
        // (every change is one insert or remove): keep using it.
        self.origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes this lane's idle HTTP/1.1 connections that have been idle
    /// for the idle timeout by `now` (or were closed by the far side),
    /// parks those idle for [`PARK_AFTER`], appends when each remaining one
    /// went idle to `idle_since`, and forgets the origins left with none.
    pub(super) fn expire_idle(&self, now: Instant, idle_since: &mut Vec<Instant>) {
        let mut origins = self.origins();
        for conns in origins.values_mut() {
            // A founding connection set aside for its heir, which takes it
            // as soon as the founding is stored: one still here at the
            // second sweep was handed to nobody.
            if conns.founding_h2.is_some() {
                if conns.founding_swept {
                    conns.founding_h2 = None;
                }
                conns.founding_swept = !conns.founding_swept;
            }
            // An HTTP/2 connection no request has taken for the idle
            // timeout is let go, as an idle HTTP/1.1 one is closed: many
            // origins never close one, and a crawl through one lane would
            // keep one per host (a socket, a tunnel at the exit, its
            // buffers) for the lane's life. hyper closes it once the
            // streams still open on it end.
            // (Counted from the sweep after the last request took it: a
            // sweep's interval later at most.)
            if conns.h2.is_some() {
                let quiet_since = if std::mem::take(&mut conns.h2_taken) {
                    now
                } else {
                    conns.h2_quiet = true;
                    *conns.h2_quiet_since.get_or_insert(now)
                };
                conns.h2_quiet_since = Some(quiet_since);
                if now.duration_since(quiet_since) >= self.limits.idle_timeout {
                    conns.h2 = None;
                    conns.h2_quiet_since = None;
                }
            }
            // Rebuilt in place (same element type: the allocation is reused).
            conns.idle = std::mem::take(&mut conns.idle)
                .into_iter()
                .filter_map(|conn| self.sweep_one(conn, now))
                .collect();
            idle_since.extend(conns.idle.iter().map(IdleH1::idle_since));
        }
        // An origin with no connection left is forgotten: a crawl through
        // one lane names ever more hosts, and each would otherwise keep its
        // entry for the lane's life (the anonymous lanes live as long as
        // the exit). Its next request starts it afresh.
        origins.retain(|_, conns| !conns.unused());
        let held = origins.len();
        if origins.capacity() > 64 && held < origins.capacity() / 4 {
            origins.shrink_to(held * 2);
        }
    }

    /// Origins this lane keeps an entry for.
    #[cfg(test)]
    pub(super) fn origins_held(&self) -> usize {
        self.origins().len()
    }

    /// One idle connection at a sweep: closed (`None`), parked, or as it was.
    fn sweep_one(&self, conn: IdleH1, now: Instant) -> Option<IdleH1> {
        let idle_for = now.duration_since(conn.idle_since());
        if idle_for >= self.limits.idle_timeout {
            return None;
        }
        match conn {
            IdleH1::Live(conn) if conn.sender.is_closed() => None,
            // Ready: hyper's connection waits for a request, so nothing of
            // an exchange is in flight.
            IdleH1::Live(conn) if idle_for >= PARK_AFTER && conn.sender.is_ready() => {
                let parked = conn.park()?;
                self.limits.parked.inc();
                Some(IdleH1::Parked(parked))
            }
            conn => Some(conn),
        }
    }

    /// Closes this lane's idle HTTP/1.1 connections that went idle at or
    /// before `cutoff`; returns how many.
    pub(super) fn close_idle_since(&self, cutoff: Instant) -> usize {
        let mut closed = 0;
        for conns in self.origins().values_mut() {
            let before = conns.idle.len();
            conns.idle.retain(|conn| conn.idle_since() > cutoff);
            closed += before - conns.idle.len();
        }
        closed
    }

    /// The TLS shape of this lane's connections (`None`: rustls).
    fn shape<'a>(
        &'a self,
        alps: &'a [u8],
        http1_only: bool,
        sessions: Option<&'a Arc<SessionSlot>>,
    ) -> Option<Shape<'a>> {
        self.presentation.hello.as_deref().map(|hello| Shape {
            hello,
            http1_only,
            alps_settings: alps,
            sessions,
        })
    }

    fn offers_h2(&self) -> bool {
        match &self.presentation.hello {
            Some(hello) => hello
                .alpn
                .as_ref()
                .is_some_and(|alpn| alpn.iter().any(|p| p.as_slice() == b"h2")),
            None => self.dialer.h2,
        }
    }

    /// Sends `request` (origin-form URI) to `origin` on one of the lane's
    /// connections and returns the response head; the body streams.
    pub(super) async fn send(
        self: &Arc<Self>,
        origin: &Origin,
        request: Request<Body>,
    ) -> Result<Answered<UpstreamBody>, UpstreamError> {
        let mut request = request;
        // At most one of each: a request found its connection gone before
        // it was written, one the origin left unanswered, and one stream
        // the origin refused (`REFUSED_STREAM`), sent again on its
        // connection; in either order: a refused stream's connection may
        // then close (an origin refusing streams as it shuts down), and a
        // stream left out of a `GOAWAY` may be refused on its new
        // connection (an origin shedding load). Four attempts in all.
        let (mut retried, mut replayed, mut refused) = (false, false, false);
        // A retry after a close takes a new connection: the others the
        // origin left idle as long may be closing too.
        let mut fresh = false;
        let mut replaying = false;
        loop {
            // Before a dial (nothing to open for a retired identity) and
            // after the checkout, which may have waited for one.
            self.still_live()?;
            let (checked, reuse) = self.checkout(origin, fresh).await?;
            // Read after the checkout, which may have waited for a dial:
            // a retirement meanwhile sends nothing.
            self.still_live()?;
            if std::mem::take(&mut replaying) {
                self.limits.replayed.inc();
            }
            // On a connection that had been idle, for whatever the origin
            // may have left unanswered as it closed; on any other HTTP/2
            // connection, for the streams an origin says it never
            // processed: origins close busy connections too (nginx sends a
            // `GOAWAY` every 1,000 requests by default, leaving the streams
            // in flight past the last one it names unprocessed), and a
            // browser sends those again. A busy HTTP/1.1 connection carries
            // one request at a time, and an origin closing it says so on
            // the answer before.
            let replay = match (&checked, reuse) {
                _ if replayed && refused => None,
                (_, Reuse::Quiet) => Replay::of(&request, true),
                (Checked::H2(_), _) => Replay::of(&request, false),
                (Checked::H1(_), _) => None,
            };
            let attempt = match checked {
                Checked::H2(conn) => {
                    let quiet = reuse == Reuse::Quiet;
                    self.send_h2(conn, request, origin, quiet).await
                }
                Checked::H1(conn) => self.send_h1(conn, request, origin).await,
            };
            match attempt {
                Ok((response, tunnel)) => {
                    return Ok(Answered {
                        response,
                        tunnel,
                        new_connection: reuse == Reuse::Dialed,
                    });
                }
                // Not written: the connection was gone, and its idle
                // neighbours may be closing too. Once more, on a new one.
                Err(Unsent {
                    request: Some(unsent),
                    ..
                }) if !retried => {
                    retried = true;
                    fresh = true;
                    request = unsent;
                    // As it came, not as the attempt wrote it.
                    as_it_came(&mut request);
                }
                Err(Unsent {
                    request: None,
                    error,
                    unanswered,
                }) => match replay {
                    Some(replay) if replay.allows(unanswered) => {
                        // The refusal's own turn first, then the one turn
                        // for anything else left unanswered.
                        if unanswered == Unanswered::Refused && !refused {
                            refused = true;
                        } else if !replayed {
                            replayed = true;
                        } else {
                            return Err(error);
                        }
                        tracing::debug!(
                            exit = %self.dialer.exit,
                            origin = %origin.target,
                            error = %error,
                            "the origin left a request unanswered; sending it again"
                        );
                        replaying = true;
                        fresh = fresh || unanswered.needs_new_connection();
                        request = replay.into_request();
                    }
                    _ => return Err(error),
                },
                Err(Unsent { error, .. }) => return Err(error),
            }
        }
    }

    /// A live connection to `origin`: the shared HTTP/2 one, an idle
    /// HTTP/1.1 one (not when `fresh`), or a new one; and how it came.
    async fn checkout(
        self: &Arc<Self>,
        origin: &Origin,
        fresh: bool,
    ) -> Result<(Checked, Reuse), UpstreamError> {
        let (dialing, speaks_h1) = loop {
            let parked = {
                let mut origins = self.origins();
                let conns = origins.entry(origin.clone()).or_default();
                if let Some((conn, reuse)) = reusable_h2(conns, self.cookie_less) {
                    return Ok((Checked::H2(conn), reuse));
                }
                let idle = if fresh { None } else { self.reusable_h1(conns) };
                match idle {
                    Some((IdleH1::Live(conn), reuse)) => return Ok((Checked::H1(conn), reuse)),
                    Some((IdleH1::Parked(parked), _)) => parked,
                    None => break (conns.dialing.clone(), conns.speaks_h1),
                }
            };
            // Each turn takes one connection off the idle stack: bounded.
            // A parked connection has been idle past `REPLAY_AFTER_IDLE`.
            if let Some(conn) = unpark(parked).await {
                return Ok((Checked::H1(conn), Reuse::Quiet));
            }
        };
        if origin.https && self.offers_h2() && !speaks_h1 {
            let _one_dial = dialing.lock().await;
            let cookie_less = self.cookie_less;
            if let Some((conn, reuse)) = self
                .origins()
                .get_mut(origin)
                .and_then(|conns| reusable_h2(conns, cookie_less))
            {
                return Ok((Checked::H2(conn), reuse));
            }
            return Box::pin(self.dial(origin))
                .await
                .map(|c| (c, Reuse::Dialed));
        }
        // Boxed: dialling (exit, CONNECT, TLS) is a large future that a
        // keep-alive request never runs; unboxed it would size every
        // request's future.
        Box::pin(self.dial(origin))
            .await
            .map(|c| (c, Reuse::Dialed))
    }

    /// The most recently idle HTTP/1.1 connection still fresh (a parked
    /// one is checked as it is unparked), the stale ones dropped.
    fn reusable_h1(&self, conns: &mut Conns) -> Option<(IdleH1, Reuse)> {
        let now = Instant::now();
        while let Some(conn) = conns.idle.pop() {
            let idle_for = now.duration_since(conn.idle_since());
            if idle_for >= self.limits.idle_timeout {
                continue;
            }
            match &conn {
                IdleH1::Live(live) if live.sender.is_closed() => continue,
                _ => {
                    let reuse = if idle_for >= REPLAY_AFTER_IDLE {
                        Reuse::Quiet
                    } else {
                        Reuse::Busy
                    };
                    return Some((conn, reuse));
                }
            }
        }
        None
    }

    /// Dials a new connection to `origin` and speaks what the origin chose.
    async fn dial(self: &Arc<Self>, origin: &Origin) -> Result<Checked, UpstreamError> {
        let alps = self
            .presentation
            .h2
            .as_deref()
            .map(h2::settings_payload)
            .unwrap_or_default();
        let sessions = self.session_slot(origin);
        let (io, info) = self
            .dialer
            .connect(
                &origin.target,
                origin.https,
                self.shape(&alps, false, sessions.as_ref()),
            )
            .await
            .map_err(UpstreamError::Connect)?;
        let info = Arc::new(info);
        if io.negotiated_h2() {
            let sender = self.handshake_h2(io).await?;
            let windows = h2::windows(self.presentation.h2.as_deref());
            let conn = H2Conn {
                sender,
                info,
                exposure: Exposure::new(windows.stream, windows.connection),
            };
            let mut origins = self.origins();
            let conns = origins.entry(origin.clone()).or_default();
            conns.h2 = Some(conn.clone());
            conns.h2_taken = true;
            conns.h2_quiet = false;
            return Ok(Checked::H2(conn));
        }
        if origin.https && self.offers_h2() {
            self.origins().entry(origin.clone()).or_default().speaks_h1 = true;
        }
        let (io, framing) = framing::ResponseGuard::new(io);
        let (sender, park) = start_h1(io).await?;
        Ok(Checked::H1(H1Conn {
            sender,
            park,
            info,
            idle_since: Instant::now(),
            framing,
        }))
    }

    /// Opens HTTP/2 on `io` and spawns the connection as its own task.
    async fn handshake_h2(&self, io: UpstreamIo) -> Result<H2Sender, UpstreamError> {
        match &self.presentation.h2 {
            Some(preface) => {
                let (sender, conn) = wreq_proto::conn::http2::Builder::new(TokioExec)
                    .options(h2::options(preface))
                    .handshake::<_, Body>(io)
                    .await
                    .map_err(|e| UpstreamError::from_wreq(&e))?;
                spawn_connection(conn, "origin HTTP/2 connection ended");
                Ok(H2Sender::Shaped(sender))
            }
            None => {
                // hyper's own windows, stated so that what the unread budget
                // counts stays what is offered.
                let windows = h2::windows(None);
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(windows.stream)
                    .initial_connection_window_size(windows.connection)
                    .handshake::<_, Body>(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::from_hyper(&e))?;
                spawn_connection(conn, "origin HTTP/2 connection ended");
                Ok(H2Sender::Hyper(sender))
            }
        }
    }

    /// Sends `request` on an HTTP/2 connection; `quiet`: it was taken as
    /// [`Reuse::Quiet`], which an answer ends.
    async fn send_h2(
        &self,
        conn: H2Conn,
        mut request: Request<Body>,
        origin: &Origin,
        quiet: bool,
    ) -> Result<(Response<UpstreamBody>, Arc<TunnelInfo>), Unsent> {
        let moved_host = for_h2(&mut request, origin);
        let info = conn.info;
        let watched = |body: OriginBody| {
            UpstreamBody::new(
                body,
                &self.limits.unread,
                Some(conn.exposure.clone()),
                self.dialer.exit.clone(),
                origin,
            )
        };
        let response: Result<Response<UpstreamBody>, Unsent> = match conn.sender {
            H2Sender::Hyper(mut sender) => sender
                .try_send_request(request)
                .await
                .map(|r| r.map(|body| watched(OriginBody::Hyper(body))))
                .map_err(|mut e| {
                    let unsent = back_from_h2(e.take_message(), moved_host);
                    let error = e.into_error();
                    let unanswered = Unanswered::of_h2::<::h2::Error>(&error);
                    Unsent::new(unsent, UpstreamError::from_hyper(&error), unanswered)
                }),
            H2Sender::Shaped(mut sender) => sender
                .try_send_request(request)
                .await
                .map(|r| r.map(|body| watched(OriginBody::Shaped(body))))
                .map_err(|mut e| {
                    let unsent = back_from_h2(e.take_message(), moved_host);
                    let error = e.into_error();
                    let unanswered = Unanswered::of_h2::<http2::Error>(&error);
                    Unsent::new(unsent, UpstreamError::from_wreq(&error), unanswered)
                }),
        };
        match response {
            Ok(response) => {
                if quiet {
                    self.with_h2(origin, &info, |conns| conns.h2_quiet = false);
                }
                Ok((response, info))
            }
            Err(unsent) => {
                // A connection the origin is closing: the retry dials (the
                // pool would otherwise hand it out until its task ends).
                if unsent.unanswered.needs_new_connection() {
                    self.with_h2(origin, &info, |conns| {
                        conns.h2 = None;
                        conns.h2_quiet = false;
                    });
                }
                Err(unsent)
            }
        }
    }

    /// Runs `change` on `origin`'s connections if its HTTP/2 connection is
    /// still the one `info` describes.
    fn with_h2(&self, origin: &Origin, info: &Arc<TunnelInfo>, change: impl FnOnce(&mut Conns)) {
        let mut origins = self.origins();
        if let Some(conns) = origins.get_mut(origin) {
            if conns
                .h2
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(&c.info, info))
            {
                change(conns);
            }
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut conn: H1Conn,
        mut request: Request<Body>,
        origin: &Origin,
    ) -> Result<(Response<UpstreamBody>, Arc<TunnelInfo>), Unsent> {
        if let Err(e) = conn.sender.ready().await {
            let error = UpstreamError::from_hyper(&e);
            return Err(Unsent::new(Some(request), error, Unanswered::Unknown));
        }
        let family = self.presentation.h2.as_deref().map(h2::hpack_policy);
        // An HTTP/1.1 client's request has its own case map.
        let case_map = if came_over_http2(&request) {
            super::header_case::case_map().await
        } else {
            None
        };
        for_h1(&mut request, origin, family, case_map);
        conn.framing.request(request.method());
        let uploads = !request.body().is_end_stream();
        let held = super::expect::hold_body(&mut request);
        match conn.sender.try_send_request(request).await {
            Ok(response) => {
                if let Some(held) = &held {
                    held.answered(response.status());
                }
                let info = conn.info.clone();
                let giveback = GiveBack {
                    pool: Arc::downgrade(self),
                    origin: origin.clone(),
                    conn: Some(conn),
                    uploads,
                    held,
                };
                let response = response.map(|body| {
                    let pooled = OriginBody::Pooled(PooledBody {
                        body,
                        giveback: Some(giveback),
                    });
                    let exit = self.dialer.exit.clone();
                    UpstreamBody::new(pooled, &self.limits.unread, None, exit, origin)
                });
                Ok((response, info))
            }
            Err(mut e) => {
                let unsent = e.take_message();
                let error = e.into_error();
                let unanswered = Unanswered::of_h1(&error, conn.framing.answer_begun());
                Err(Unsent::new(
                    unsent,
                    UpstreamError::from_hyper(&error),
                    unanswered,
                ))
            }
        }
    }

    fn give_back(&self, origin: Origin, mut conn: H1Conn) {
        if conn.sender.is_closed() {
            return;
        }
        // The answer that founded an identity came on it (see
        // `hand_over`): to the identity's lane, if it still stands and may
        // use it.
        if let Some(heir) = self
            .heir
            .get()
            .filter(|heir| Arc::ptr_eq(&heir.founding, &conn.info))
        {
            if let Some(heir) = heir.lane.upgrade().filter(|heir| heir.admits(&conn.info)) {
                // Idle since long enough that the identity's first request
                // on it keeps a copy, to send again should the exit or the
                // origin have closed it meanwhile: before the hand-over that
                // request dialled, which no close can meet, and it must not
                // become the request lost to one.
                let now = Instant::now();
                conn.idle_since = now.checked_sub(REPLAY_AFTER_IDLE).unwrap_or(now);
                heir.keep_idle(origin, conn);
            }
            return;
        }
        // An answer on it founded an identity that did not take it: it
        // closes rather than carry other visitors' requests (see
        // `LanePool::let_go`).
        if self.cookie_less && conn.info.founded_one() {
            return;
        }
        conn.idle_since = Instant::now();
        self.keep_idle(origin, conn);
    }

    /// Keeps `conn` (idle since its `idle_since`) for `origin`'s next
    /// request, unless the origin has as many idle already.
    fn keep_idle(&self, origin: Origin, conn: H1Conn) {
        let mut origins = self.origins();
        let conns = origins.entry(origin).or_default();
        if conns.idle.len() < self.limits.max_idle_per_origin {
            conns.idle.push(IdleH1::Live(conn));
        }
    }

    /// Sends a WebSocket upgrade (origin-form URI) to `origin` on a
    /// connection of its own (HTTP/1.1, as a browser opens one), which the
    /// response then owns.
    pub(super) async fn send_upgrade(
        &self,
        origin: &Origin,
        mut request: Request<Body>,
    ) -> Result<Answered<Incoming>, UpstreamError> {
        self.still_live()?;
        let (io, info) = self
            .dialer
            // A WebSocket's HTTP/1.1-only hello has a connector of its
            // own, which the lane's sessions were not made by: it resumes
            // none.
            .connect(&origin.target, origin.https, self.shape(&[], true, None))
            .await
            .map_err(UpstreamError::Connect)?;
        self.still_live()?;
        let (mut sender, framing) = handshake_upgrade(io).await?;
        // An upgrade is an HTTP/1.1 client's (HTTP/2 clients are offered
        // none): its own names and case.
        for_h1(&mut request, origin, None, None);
        framing.request(request.method());
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::from_hyper(&e))?;
        Ok(Answered {
            response,
            tunnel: Arc::new(info),
            new_connection: true,
        })
    }
}

/// The origin's HTTP/2 connection, if open, and whether it is quiet (see
/// `Conns::h2_quiet`). On a `cookie_less` lane, one an answer founded an
/// identity on is set aside for its heir instead: the origin linked it to
/// that identity when it set the cookie there, and would see it carry
/// other visitors' requests after (also when the founding failed, or its
/// request was given up before the hand-over).
fn reusable_h2(conns: &mut Conns, cookie_less: bool) -> Option<(H2Conn, Reuse)> {
    match &conns.h2 {
        Some(conn) if cookie_less && conn.info.founded_one() => {
            conns.founding_h2 = conns.h2.take();
            conns.founding_swept = false;
            conns.h2_quiet_since = None;
            None
        }
        Some(conn) if !conn.sender.is_closed() => {
            let conn = conn.clone();
            conns.h2_taken = true;
            let reuse = if conns.h2_quiet {
                Reuse::Quiet
            } else {
                Reuse::Busy
            };
            Some((conn, reuse))
        }
        Some(_) => {
            conns.h2 = None;
            None
        }
        None => None,
    }
}

/// A request that failed, and the request itself when it was never written.
struct Unsent {
    request: Option<Request<Body>>,
    error: UpstreamError,
    /// What the failure says of whether the origin acted on the request.
    unanswered: Unanswered,
}

impl Unsent {
    fn new(request: Option<Request<Body>>, error: UpstreamError, unanswered: Unanswered) -> Self {
        // A refusal says more than the stack's error: the origin did not
        // process the request, so the client may safely send it again.
        let error = match error {
            UpstreamError::Exchange { detail, .. } if unanswered == Unanswered::Refused => {
                UpstreamError::Exchange {
                    kind: ExchangeKind::Refused,
                    detail,
                }
            }
            error => error,
        };
        Unsent {
            request,
            error,
            unanswered,
        }
    }
}

/// How a connection came to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reuse {
    /// Dialled for it: its open is this request's to time.
    Dialed,
    /// Carrying other requests lately.
    Busy,
    /// Idle until now (see [`REPLAY_AFTER_IDLE`]): the origin may be
    /// closing it as the request leaves.
    Quiet,
}

impl H1Conn {
    /// Asks the connection's task to let go of the stream; `None` when the
    /// task has ended (the connection with it).
    fn park(self) -> Option<ParkedH1> {
        let (back, io) = oneshot::channel();
        self.park.send(back).ok()?;
        Some(ParkedH1 {
            io,
            info: self.info,
            idle_since: self.idle_since,
            framing: self.framing,
        })
    }
}

/// A parked connection running again, or `None` when its stream cannot
/// carry a request: the task ended before it let go (or hyper had read
/// bytes the origin sent unasked), a response was left unread, or the
/// origin has closed the stream (or sent something) while it was parked.
async fn unpark(parked: ParkedH1) -> Option<H1Conn> {
    let mut io = parked.io.await.ok()?;
    if !io.between_messages() || !quiet(io.get_mut()) {
        return None;
    }
    let (sender, park) = start_h1(io).await.ok()?;
    Some(H1Conn {
        sender,
        park,
        info: parked.info,
        idle_since: parked.idle_since,
        framing: parked.framing,
    })
}

/// Whether an idle stream has nothing to read and is not closed: one read
/// that must not complete. An origin's close (FIN, TLS close_notify, a
/// reset) or bytes it sent unasked complete it, and either way the stream
/// is done with.
fn quiet(io: &mut UpstreamIo) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    // Polled with a waker that does nothing: the stream's next owner (a
    // new hyper connection) polls it again with its own.
    Pin::new(io).poll_read(&mut cx, &mut buf).is_pending()
}

/// Runs an HTTP/1.1 connection on `io`, its responses read through the
/// framing scanner (an ambiguous response fails its request with 502
/// before hyper reads a byte of it; see `upstream::framing`). The task
/// ends with the connection, or hands the stream back when parked.
async fn start_h1(
    io: GuardedIo,
) -> Result<(http1::SendRequest<Body>, oneshot::Sender<ParkRequest>), UpstreamError> {
    let (sender, mut conn) = h1_builder()
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::from_hyper(&e))?;
    let (park, parking) = oneshot::channel::<ParkRequest>();
    tokio::spawn(async move {
        tokio::select! {
            // First: the pool drops its sender as it parks, which would end
            // the connection (and close the stream) if polled before this.
            biased;
            // The pool parks only a connection hyper holds ready for a
            // request: nothing of an exchange is lost here. A dropped
            // request (the connection left the pool) disables this branch.
            Ok(back) = parking => {
                let parts = conn.into_parts();
                // Bytes hyper read unasked: the stream is out of step. Else
                // the stream goes back alone: hyper's read buffer (kept
                // alive by `read_buf`) is freed with the rest. If the pool
                // is gone by now, so is the stream.
                if parts.read_buf.is_empty() {
                    let _ = back.send(parts.io.into_inner());
                }
            }
            result = &mut conn => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "origin connection ended");
                }
            }
        }
    });
    Ok((sender, park))
}

/// An HTTP/1.1 connection for a WebSocket upgrade (never pooled, never
/// parked), its responses read through the framing scanner.
async fn handshake_upgrade(
    io: UpstreamIo,
) -> Result<(http1::SendRequest<Body>, framing::Exchange), UpstreamError> {
    let (io, exchange) = framing::ResponseGuard::new(io);
    let (sender, conn) = h1_builder()
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::from_hyper(&e))?;
    spawn_connection(conn.with_upgrades(), "origin connection ended");
    Ok((sender, exchange))
}

/// Runs an origin connection as a task of its own, logging `ended` with
/// its error if it fails. The connection future is the task itself, mapped
/// rather than awaited in an async block, which would hold it twice (see
/// `net::tasks`).
fn spawn_connection<C, E>(conn: C, ended: &'static str)
where
    C: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(conn.map(move |result| {
        if let Err(e) = result {
            tracing::debug!(error = %e, "{ended}");
        }
    }));
}

fn h1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    // A name the request's case map does not spell (one pinproxy added,
    // or any of an HTTP/2 client's; see `header_case`) is capitalised, as
    // HTTP/1.1 clients write them.
    builder.preserve_header_case(true).title_case_headers(true);
    builder
}

/// Makes a request an HTTP/1.1 one. An HTTP/2 client's ([`came_over_http2`])
/// gets what HTTP/1.1 needs: a `Host` header (first, where a browser puts
/// it; from `:authority`, RFC 9113 §8.3.1, in place of any `host` field
/// it sent), and its cookie crumbs (HTTP/2 lets a client send each cookie
/// as a field of its own) joined into one `Cookie` header with `"; "`
/// where the first one stood (RFC 9113 §8.2.3): a browser speaking
/// HTTP/1.1 sends one, and an origin may read only the first of several.
/// Its names are written as its kind writes them over HTTP/1.1
/// (`case_map`, see `header_case`); a Chromium's (by the `family` of its
/// HTTP/2 preface) also get the `Connection: keep-alive` Chromium writes
/// after `Host`, and lose the `priority` header it sends over HTTP/2 only.
/// An HTTP/1.x client's headers are left as it sent them; one that sent
/// no `Host` (HTTP/1.0) gets one at the end, which HTTP/1.1 needs.
fn for_h1(
    request: &mut Request<Body>,
    origin: &Origin,
    family: Option<HpackPolicy>,
    case_map: Option<&http::Extensions>,
) {
    let from_h2 = came_over_http2(request);
    if from_h2 {
        let came = request.headers().clone();
        request.extensions_mut().insert(AsItCame(came));
        *request.version_mut() = http::Version::HTTP_11;
        header_order::remove(request.headers_mut(), &header::HOST);
    } else if request.headers().contains_key(header::HOST) {
        return;
    }
    let host = match request.extensions().get::<ClientAuthority>() {
        Some(named) => HeaderValue::from_str(named.0.as_str()),
        None => HeaderValue::from_str(&origin.target.authority(default_port(origin.https))),
    };
    let Ok(host) = host else {
        return;
    };
    if !from_h2 {
        request.headers_mut().insert(header::HOST, host);
        return;
    }
    let chromium = family == Some(HpackPolicy::Chromium);
    if chromium {
        header_order::remove(request.headers_mut(), &PRIORITY);
    }
    let cookie = joined_crumbs(request.headers());
    let connection = chromium.then(|| HeaderValue::from_static("keep-alive"));
    host_first(request.headers_mut(), host, connection, cookie);
    if let Some(case_map) = case_map {
        request.extensions_mut().extend(case_map.clone());
    }
}

/// An HTTP/2 client's headers as they came, kept while its request is
/// written as HTTP/1.1 ([`for_h1`]): a request handed back unsent is put
/// back as it came ([`as_it_came`], in `LanePool::send`) and written anew,
/// for HTTP/1.1 or HTTP/2, rather than sent in its HTTP/1.1 form (which
/// would get a second `Connection`, or take pinproxy's `Host` and joined
/// cookies to an HTTP/2 origin).
#[derive(Clone)]
struct AsItCame(HeaderMap);

/// Puts back the headers an HTTP/2 client's request came with, if it was
/// written as HTTP/1.1 before ([`AsItCame`]).
fn as_it_came(request: &mut Request<Body>) {
    if let Some(AsItCame(headers)) = request.extensions_mut().remove() {
        *request.headers_mut() = headers;
        *request.version_mut() = http::Version::HTTP_2;
    }
}

/// The `priority` header (RFC 9218).
const PRIORITY: header::HeaderName = header::HeaderName::from_static("priority");

/// Rebuilds `headers` with `host` in front, then `connection` if given,
/// the others in their order; with `cookie` (crumbs joined), it stands
/// where the first `Cookie` field did, and the other crumbs, which it
/// holds, go.
fn host_first(
    headers: &mut HeaderMap,
    host: HeaderValue,
    connection: Option<HeaderValue>,
    cookie: Option<HeaderValue>,
) {
    let old = std::mem::take(headers);
    headers.reserve(old.len() + 2);
    headers.insert(header::HOST, host);
    if let Some(connection) = connection {
        headers.insert(header::CONNECTION, connection);
    }
    let mut cookie = cookie.map(Some);
    let mut name = None;
    for (next, value) in old {
        if next.is_some() {
            name = next;
        }
        let Some(name) = &name else { continue };
        match &mut cookie {
            Some(joined) if name == header::COOKIE => {
                if let Some(joined) = joined.take() {
                    headers.append(header::COOKIE, joined);
                }
            }
            _ => {
                headers.append(name.clone(), value);
            }
        }
    }
}

/// The `Cookie` values of `headers` joined with `"; "` into one, when there
/// are several (`None` for one or none).
fn joined_crumbs(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let first = crumbs.next()?;
    let mut rest = crumbs.peekable();
    rest.peek()?;
    let mut joined = first.as_bytes().to_vec();
    for crumb in rest {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(crumb.as_bytes());
    }
    // Valid values joined by visible bytes and a space stay valid.
    HeaderValue::from_bytes(&joined).ok()
}

/// Makes a request an HTTP/2 one: an absolute URI whose authority is the
/// client's `Host` (an HTTP/1.1 client), else the one an HTTP/2 client
/// named ([`ClientAuthority`]), else the origin's, and without the
/// connection-specific headers HTTP/2 forbids. An HTTP/2 client's own
/// `host` field ([`came_over_http2`]) stays where it was. Answers whether it
/// took a `Host` header into the URI (see [`back_from_h2`]).
fn for_h2(request: &mut Request<Body>, origin: &Origin) -> bool {
    let host = if came_over_http2(request) {
        None
    } else {
        header_order::remove(request.headers_mut(), &header::HOST)
    };
    let moved_host = host.is_some();
    let authority = host
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .or_else(|| {
            request
                .extensions()
                .get::<ClientAuthority>()
                .map(|named| named.0.clone())
        })
        .or_else(|| Authority::try_from(origin.target.authority(default_port(origin.https))).ok());
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if origin.https {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    });
    parts.authority = authority;
    parts.path_and_query = request.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    strip_connection_specific(request.headers_mut());
    moved_host
}

/// Undoes [`for_h2`]'s changes that HTTP/1.1 would show, for a request
/// handed back unsent, which the pool tries again on a connection that may
/// speak HTTP/1.1: an absolute URI (HTTP/1.1 writes it into the request
/// line, which only proxies are sent) goes back to origin-form, and an
/// HTTP/1.1 client's `Host` (`moved_host`), taken into the URI, goes back
/// in front. The headers HTTP/2 forbids stay dropped.
fn back_from_h2(request: Option<Request<Body>>, moved_host: bool) -> Option<Request<Body>> {
    let mut request = request?;
    undo_h2(&mut request, moved_host);
    Some(request)
}

/// [`back_from_h2`] on a request at hand.
fn undo_h2(request: &mut Request<Body>, moved_host: bool) {
    let Some(authority) = request.uri().authority().cloned() else {
        return;
    };
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    if !moved_host || request.headers().contains_key(header::HOST) {
        return;
    }
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        host_first(request.headers_mut(), host, None, None);
    }
}

/// Drops what HTTP/2 forbids (RFC 9113 §8.2.2), keeping the rest's order.
fn strip_connection_specific(headers: &mut HeaderMap) {
    header_order::retain(headers, |name, value| {
        let forbidden = *name == header::CONNECTION
            || *name == header::TRANSFER_ENCODING
            || *name == header::UPGRADE
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection";
        // Byte for byte, as the HTTP/2 stacks compare it: a `Trailers`
        // they found would be swap-removed, moving the last header into
        // its place.
        let te_other_than_trailers = *name == header::TE && value.as_bytes() != b"trailers";
        !forbidden && !te_other_than_trailers
    });
}

/// Returns an HTTP/1.1 connection to its pool once its response is done.
struct GiveBack {
    pool: Weak<LanePool>,
    origin: Origin,
    conn: Option<H1Conn>,
    /// Whether its request had a body to write.
    uploads: bool,
    /// Its request's body, held for the origin's `100 Continue` (see
    /// `expect`): one the answer refused ends with the answer.
    held: Option<Arc<super::expect::Gate>>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.answer_over();
        }
    }
}

impl GiveBack {
    /// The response is over. hyper's connection asks for its next request
    /// once the request body is written too; until then a request handed
    /// to it would wait behind an upload the origin answered early (up to
    /// the response-head timeout, then 504). Such a connection goes back
    /// when it asks, or not at all if it does not within the idle timeout
    /// (hyper closes it once the body ends). A request without a body is
    /// written whole before its answer: its connection goes back at once,
    /// and the next request's wait for it (`send_h1`) is hyper's own
    /// bookkeeping, not an upload.
    fn now(&mut self) {
        let (Some(pool), Some(mut conn)) = (self.pool.upgrade(), self.conn.take()) else {
            return;
        };
        if !self.uploads || conn.sender.is_ready() {
            pool.give_back(self.origin.clone(), conn);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (weak, origin, wait) = (
            self.pool.clone(),
            self.origin.clone(),
            pool.limits.idle_timeout,
        );
        drop(pool);
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(wait, conn.sender.ready()).await {
                if let Some(pool) = weak.upgrade() {
                    pool.give_back(origin, conn);
                }
            }
        });
    }
}

/// A response body on a pooled HTTP/1.1 connection: the connection goes
/// back to the pool when the body has been read to its end.
pub struct PooledBody {
    body: Incoming,
    giveback: Option<GiveBack>,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body dropped unread (HEAD, 204, 304) is complete all the same.
        if self.body.is_end_stream() {
            if let Some(giveback) = self.giveback.as_mut() {
                giveback.now();
            }
        }
    }
}

/// The body of an origin's response, whichever connection carried it.
pub enum OriginBody {
    /// From hyper's HTTP/2.
    Hyper(Incoming),
    /// From the shaped HTTP/2.
    Shaped(wreq_proto::body::Incoming),
    /// From a pooled HTTP/1.1 connection.
    Pooled(PooledBody),
}

impl http_body::Body for OriginBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            OriginBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            OriginBody::Shaped(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            OriginBody::Pooled(pooled) => {
                let polled = Pin::new(&mut pooled.body).poll_frame(cx);
                if let Poll::Ready(None) = &polled {
                    if let Some(mut giveback) = pooled.giveback.take() {
                        giveback.now();
                    }
                }
                polled.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OriginBody::Hyper(body) => body.is_end_stream(),
            OriginBody::Shaped(body) => body.is_end_stream(),
            OriginBody::Pooled(pooled) => pooled.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OriginBody::Hyper(body) => body.size_hint(),
            OriginBody::Shaped(body) => body.size_hint(),
            OriginBody::Pooled(pooled) => pooled.body.size_hint(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::net::HostPort;

    /// An HTTPS origin for the upstream modules' tests.
    pub(in crate::upstream) fn origin() -> Origin {
        Origin {
            https: true,
            target: HostPort::new("a.test", 443),
        }
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut builder = Request::get(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(crate::body::empty()).unwrap()
    }

    /// A `TE` other than `trailers` byte for byte goes in order: the
    /// HTTP/2 stacks would otherwise swap-remove `TE: Trailers`, moving the
    /// last header into its place.
    #[test]
    fn a_te_of_trailers_in_another_case_goes_in_order() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("accept", "*/*"),
            ("te", "Trailers"),
            ("user-agent", "x"),
            ("accept-language", "en"),
        ] {
            headers.append(
                http::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_connection_specific(&mut headers);
        let kept: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(kept, ["accept", "user-agent", "accept-language"]);
        let mut headers = HeaderMap::new();
        headers.append(header::TE, HeaderValue::from_static("trailers"));
        strip_connection_specific(&mut headers);
        assert!(headers.contains_key(header::TE));
    }

    /// The header names of `request`, in order.
    pub(in crate::upstream) fn names(request: &Request<Body>) -> Vec<String> {
        request.headers().keys().map(|n| n.to_string()).collect()
    }

    /// A request made ready for HTTP/2, handed back unsent, and tried on an
    /// HTTP/1.1 connection goes out in origin-form with the client's own
    /// `Host` in front, as it came: not `GET https://a.test/p HTTP/1.1`.
    #[test]
    fn a_request_made_ready_for_h2_then_sent_on_h1_is_as_the_client_sent_it() {
        let mut r = request("/p?q", &[("host", "a.test:443"), ("user-agent", "u")]);
        let moved_host = for_h2(&mut r, &origin());
        assert_eq!(r.uri().to_string(), "https://a.test:443/p?q");
        let mut r = back_from_h2(Some(r), moved_host).unwrap();
        for_h1(&mut r, &origin(), None, None);
        assert_eq!(r.uri().to_string(), "/p?q");
        assert_eq!(r.headers()["host"], "a.test:443");
        assert_eq!(names(&r), ["host", "user-agent"]);

        // An HTTP/2 client's request: no Host of its own, crumbs joined.
        let mut r = request("/p", &[("cookie", "a=1"), ("cookie", "b=2")]);
        *r.version_mut() = http::Version::HTTP_2;
        let moved_host = for_h2(&mut r, &origin());
        let mut r = back_from_h2(Some(r), moved_host).unwrap();
        for_h1(&mut r, &origin(), None, None);
        assert_eq!(r.uri().to_string(), "/p");
        assert_eq!(r.headers()["host"], "a.test");
        assert_eq!(r.headers()["cookie"], "a=1; b=2");

        // An HTTP/1.0 client's: no Host of its own either, but its headers
        // as it sent them, and the Host HTTP/1.1 needs after them.
        let mut r = request("/p", &[("cookie", "a=1"), ("cookie", "b=2")]);
        let moved_host = for_h2(&mut r, &origin());
        let mut r = back_from_h2(Some(r), moved_host).unwrap();
        for_h1(&mut r, &origin(), None, None);
        assert_eq!(names(&r), ["cookie", "host"]);
        assert_eq!(r.headers().get_all("cookie").iter().count(), 2);
    }

    /// An HTTP/2 client's own `host` field beside `:authority` stays where
    /// it was for an HTTP/2 origin, `:authority` naming the target; an
    /// HTTP/1.1 origin gets one `Host`, first, from `:authority`, and the
    /// crumbs joined, as for an HTTP/2 client without `host`.
    #[test]
    fn an_h2_clients_host_field_stays_beside_its_authority() {
        let fields = [
            ("user-agent", "u"),
            ("host", "other.test"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ];
        let uri: Uri = "https://www.site.test/x".parse().unwrap();
        let named = ClientAuthority::differing(&uri, &origin()).unwrap();
        let mut r = request("/x", &fields);
        *r.version_mut() = http::Version::HTTP_2;
        r.extensions_mut().insert(named);
        let moved_host = for_h2(&mut r, &origin());
        assert!(!moved_host);
        assert_eq!(r.uri().to_string(), "https://www.site.test/x");
        assert_eq!(names(&r), ["user-agent", "host", "cookie"]);
        assert_eq!(r.headers()["host"], "other.test");
        // Handed back unsent and tried on HTTP/1.1.
        let mut r = back_from_h2(Some(r), moved_host).unwrap();
        for_h1(&mut r, &origin(), None, None);
        assert_eq!(r.uri().to_string(), "/x");
        assert_eq!(names(&r), ["host", "user-agent", "cookie"]);
        assert_eq!(r.headers()["host"], "www.site.test");
        assert_eq!(r.headers()["cookie"], "a=1; b=2");
        // Straight to HTTP/1.1, naming the tunnel's host.
        let mut r = request("/x", &fields);
        *r.version_mut() = http::Version::HTTP_2;
        for_h1(&mut r, &origin(), None, None);
        assert_eq!(names(&r), ["host", "user-agent", "cookie"]);
        assert_eq!(r.headers()["host"], "a.test");
        assert_eq!(r.headers().get_all("cookie").iter().count(), 1);
    }

    /// A Chromium's request written for HTTP/1.1 (`Host`, then `Connection:
    /// keep-alive`, without `priority`, crumbs joined) and handed back
    /// unsent is written anew from its headers as they came: once more for
    /// HTTP/1.1 (one `Connection`), or for HTTP/2 (no `Host`, its
    /// `priority` and crumbs as sent).
    #[test]
    fn a_chromium_request_handed_back_by_http1_is_written_anew() {
        let fields = [
            ("user-agent", "u"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("priority", "u=0, i"),
        ];
        let mut r = request("/p", &fields);
        *r.version_mut() = http::Version::HTTP_2;
        let chromium = Some(HpackPolicy::Chromium);
        for _ in 0..2 {
            as_it_came(&mut r);
            for_h1(&mut r, &origin(), chromium, None);
            assert_eq!(names(&r), ["host", "connection", "user-agent", "cookie"]);
            assert_eq!(r.headers().get_all("connection").iter().count(), 1);
            assert_eq!(r.headers()["cookie"], "a=1; b=2");
        }
        as_it_came(&mut r);
        for_h2(&mut r, &origin());
        assert_eq!(names(&r), ["user-agent", "cookie", "priority"]);
        assert_eq!(r.headers().get_all("cookie").iter().count(), 2);
        assert_eq!(r.uri().to_string(), "https://a.test/p");
        // Another family gets neither `Connection` nor a lost `priority`.
        let mut r = request("/p", &fields);
        *r.version_mut() = http::Version::HTTP_2;
        for_h1(&mut r, &origin(), Some(HpackPolicy::Firefox), None);
        assert_eq!(names(&r), ["host", "user-agent", "cookie", "priority"]);
    }

    /// The authority an HTTP/2 client named goes to the origin whichever
    /// protocol it speaks; one that reads as the tunnel's host is not
    /// carried at all.
    #[test]
    fn an_h2_clients_own_authority_is_what_the_origin_is_told() {
        let uri: Uri = "https://www.site.test/x".parse().unwrap();
        let named = ClientAuthority::differing(&uri, &origin()).unwrap();
        let mut r = request("/x", &[]);
        *r.version_mut() = http::Version::HTTP_2;
        r.extensions_mut().insert(named.clone());
        for_h2(&mut r, &origin());
        assert_eq!(r.uri().authority().unwrap().as_str(), "www.site.test");
        let mut r = request("/x", &[]);
        *r.version_mut() = http::Version::HTTP_2;
        r.extensions_mut().insert(named);
        for_h1(&mut r, &origin(), None, None);
        assert_eq!(r.headers()["host"], "www.site.test");

        for same in ["https://a.test/x", "https://a.test:443/y"] {
            let uri: Uri = same.parse().unwrap();
            let differing = ClientAuthority::differing(&uri, &origin());
            assert_eq!(differing.is_some(), same.contains(":443"), "{same}");
        }
        let v6 = Origin {
            https: false,
            target: HostPort::new("::1", 8080),
        };
        let uri: Uri = "http://[::1]:8080/".parse().unwrap();
        assert_eq!(ClientAuthority::differing(&uri, &v6), None);
    }
}
