//! Answers whose clients do not keep up with them.
//!
//! What an origin sends within the window pinproxy offered it waits in
//! pinproxy's memory until the client reads it. Over HTTP/2 that window is
//! the client's own (mirrored, up to 32 MiB a stream), and each identity
//! has its own upstream connection, so one client connection naming many
//! sessions and then reading nothing, or a trickle, could have origins fill
//! gigabytes. HTTP/1.1 answers wait in the kernel's socket buffers instead,
//! and hold an exit's connection.
//!
//! Two bounds, checked by a watcher each answer gets once it is longer than
//! one frame, every [`GRACE`]:
//! - **The stall limit** (`timeouts.client_stall`): an answer pinproxy has
//!   written nothing more of to its client for that long (within a
//!   [`GRACE`] more) is abandoned, as nginx's `send_timeout` does: its
//!   upstream stream is reset (HTTP/2) or its connection closed
//!   (HTTP/1.1). The client's stream is reset, or its connection closed,
//!   when its server next tries to write to it. The limit runs between two
//!   writes: the client's server asks for the answer's next frame whenever
//!   it can write more, so a client reading slowly lets it now and then,
//!   and an origin slow to send (a long poll, a stream of events) is being
//!   asked, so it is no stall.
//! - **The unread budget** (`limits.max_unread_bytes`): an HTTP/2 answer
//!   whose origin has had the next frame waiting at every ask for a
//!   [`GRACE`] (its client is the slower side, stalled or trickling) holds
//!   what the origin sent ahead, up to its stream window. It counts that
//!   window (at most what its connection's window leaves over the
//!   connection's other counted streams, and at most what the answer has
//!   left to send, when it says) against one budget for the daemon, until
//!   an ask finds nothing waiting (the client caught up) or the answer
//!   ends. One the budget cannot take is abandoned at once; answers
//!   counted already go on. The budget counts windows, not bytes (the
//!   crate holding them does not say how many it holds), so it bounds
//!   what slow clients' answers hold; what origins send within the grace,
//!   before the count, it does not.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use super::pool::OriginBody;
use super::Origin;
use crate::body::BoxError;
use crate::identity::ExitId;
use crate::metrics::AbandonedLabel;
use crate::telemetry::now_and_then::NowAndThen;

/// How long a client may take nothing of an answer before what its stream
/// may hold counts against the budget; also how often a watcher looks.
pub const GRACE: Duration = Duration::from_secs(1);

/// The daemon's bounds on answers their clients do not keep up with; one
/// per daemon.
#[derive(Debug)]
pub struct Unread {
    /// `timeouts.client_stall`; zero: never abandoned for stalling.
    stall: Duration,
    /// `limits.max_unread_bytes`; zero: no budget.
    budget: u64,
    /// What answers behind their origins count against `budget`.
    held: AtomicU64,
    /// `held`, for the metrics.
    held_gauge: Gauge,
    /// Answers abandoned, by why.
    abandoned: Family<AbandonedLabel, Counter>,
    /// Abandoned answers are logged at most once a second (each is
    /// counted).
    warnings: NowAndThen,
}

impl Unread {
    /// Bounds of `stall` (zero: none) and `budget` bytes (zero: none),
    /// counting abandoned answers in `abandoned` and showing what the
    /// budget holds in `held`.
    pub fn new(
        stall: Duration,
        budget: u64,
        abandoned: Family<AbandonedLabel, Counter>,
        held: Gauge,
    ) -> Arc<Unread> {
        Arc::new(Unread {
            stall,
            budget,
            held: AtomicU64::new(0),
            held_gauge: held,
            abandoned,
            warnings: NowAndThen::every(1),
        })
    }

    /// What stalled answers' streams may hold now, in bytes.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether an answer with `exposure` (an HTTP/2 one) needs watching.
    fn watches(&self, exposure: Option<&Exposure>) -> bool {
        !self.stall.is_zero() || (self.budget > 0 && exposure.is_some())
    }

    /// Counts `bytes` against the budget, if it can take them.
    fn reserve(&self, bytes: u64) -> bool {
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&sum| sum <= self.budget)
            })
            .is_ok();
        if taken {
            self.held_gauge.inc_by(gauge_bytes(bytes));
        }
        taken
    }

    fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
        self.held_gauge.dec_by(gauge_bytes(bytes));
    }
}

/// `bytes` as a gauge's value (a window is at most 2 GiB).
fn gauge_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// No bounds: nothing is watched.
impl Default for Unread {
    fn default() -> Unread {
        Unread {
            stall: Duration::ZERO,
            budget: 0,
            held: AtomicU64::new(0),
            held_gauge: Gauge::default(),
            abandoned: Family::default(),
            warnings: NowAndThen::every(1),
        }
    }
}

/// What the stalled streams of one upstream HTTP/2 connection may hold:
/// each its stream window, all of them the connection's.
#[derive(Debug)]
pub struct Exposure {
    stream: u64,
    connection: u64,
    /// What the connection's stalled streams count now.
    counted: AtomicU64,
}

impl Exposure {
    /// A connection offering `stream` bytes a stream and `connection` in
    /// all.
    pub fn new(stream: u32, connection: u32) -> Arc<Exposure> {
        Arc::new(Exposure {
            stream: u64::from(stream),
            connection: u64::from(connection),
            counted: AtomicU64::new(0),
        })
    }

    /// What one more stream behind its origin adds: its window, at most
    /// what the connection's leaves and `left` (what its answer has left
    /// to send); counted.
    fn take(&self, left: u64) -> u64 {
        let mut taken = 0;
        let _ = self
            .counted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |counted| {
                taken = self
                    .stream
                    .min(self.connection.saturating_sub(counted))
                    .min(left);
                Some(counted + taken)
            });
        taken
    }

    fn give_back(&self, bytes: u64) {
        self.counted.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Why an answer was abandoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// Its client took nothing for the stall limit.
    Stall,
    /// The unread budget could not take what its stream may hold.
    Budget,
}

impl Why {
    fn label(self) -> &'static str {
        match self {
            Why::Stall => "stall",
            Why::Budget => "unread-budget",
        }
    }
}

/// An answer pinproxy gave up on (see the module docs); what its client's
/// server reads in place of the rest.
#[derive(Debug, thiserror::Error)]
#[error("the client took nothing of this answer for too long; it was abandoned")]
pub struct Abandoned;

/// The body of an origin's response, whichever connection carried it,
/// abandoned if its client does not keep up with it (see the module docs).
///
/// An answer of one frame (most of them) is polled as it is; one that goes
/// on past its first frame moves into a [`Watch`] it shares with its
/// watcher, when a bound applies to it.
pub struct UpstreamBody {
    /// The body, until it is watched.
    body: Option<OriginBody>,
    /// What its watcher would need, until it is watched (or found to need
    /// none).
    bounds: Option<Bounds>,
    /// Shared with its watcher, once watched.
    watch: Option<Arc<Watch>>,
}

/// The bounds an answer is held to, and what its watcher logs.
struct Bounds {
    unread: Arc<Unread>,
    exposure: Option<Arc<Exposure>>,
    exit: ExitId,
    origin: Origin,
    /// What to let go if it is abandoned (see [`UpstreamBody::on_abandon`]).
    releases: Vec<Release>,
}

/// Something the client's side of an answer holds that an abandoned
/// answer lets go at once.
type Release = Box<dyn FnOnce() + Send + Sync>;

/// What an answer and its watcher share.
struct Watch {
    slot: Mutex<Slot>,
    unread: Arc<Unread>,
    /// Its HTTP/2 connection's (none over HTTP/1.1).
    exposure: Option<Arc<Exposure>>,
    /// Wakes the watcher when the answer ends.
    ended: Notify,
    /// Run once if the answer is abandoned.
    releases: Mutex<Vec<Release>>,
    exit: ExitId,
    origin: Origin,
}

struct Slot {
    /// `None` once abandoned.
    body: Option<OriginBody>,
    /// When the client's side was handed a frame it has not asked past.
    handed_at: Option<Instant>,
    /// Since when every ask has found the origin's next frame waiting
    /// (`None` once one found nothing).
    behind_since: Option<Instant>,
    /// Whether the body has ended, as it last said (asking it takes its
    /// HTTP/2 connection's lock).
    end_stream: bool,
    /// What it counts against the budget now.
    counted: u64,
    /// Read to its end, or dropped.
    over: bool,
}

impl Watch {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn uncount(&self, bytes: u64) {
        if bytes > 0 {
            self.unread.release(bytes);
            if let Some(exposure) = &self.exposure {
                exposure.give_back(bytes);
            }
        }
    }

    /// What to do about the answer at `now`, if anything.
    fn judge(&self, slot: &mut Slot, now: Instant) -> Option<Why> {
        let unread = &self.unread;
        let for_at_least = |since: Option<Instant>, limit: Duration| {
            since.is_some_and(|since| now.saturating_duration_since(since) >= limit)
        };
        if !unread.stall.is_zero() && for_at_least(slot.handed_at, unread.stall) {
            return Some(Why::Stall);
        }
        let exposure = self.exposure.as_ref()?;
        if unread.budget == 0 || slot.counted > 0 || !for_at_least(slot.behind_since, GRACE) {
            return None;
        }
        let left = slot
            .body
            .as_ref()
            .and_then(|body| body.size_hint().upper())
            .unwrap_or(u64::MAX);
        let taken = exposure.take(left);
        if taken == 0 || unread.reserve(taken) {
            slot.counted = taken;
            return None;
        }
        exposure.give_back(taken);
        Some(Why::Budget)
    }

    /// Looks every [`GRACE`] until the answer ends or is abandoned.
    async fn run(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(GRACE) => {}
                () = self.ended.notified() => return,
            }
            let now = Instant::now();
            let mut slot = self.slot();
            if slot.over || slot.body.is_none() {
                return;
            }
            let Some(why) = self.judge(&mut slot, now) else {
                continue;
            };
            let body = slot.body.take();
            let counted = std::mem::take(&mut slot.counted);
            drop(slot);
            self.uncount(counted);
            // Resets its upstream stream, or closes its connection.
            drop(body);
            let releases =
                std::mem::take(&mut *self.releases.lock().unwrap_or_else(PoisonError::into_inner));
            for release in releases {
                release();
            }
            self.unread
                .abandoned
                .get_or_create(&AbandonedLabel { why: why.label() })
                .inc();
            if !self.unread.warnings.due() {
                return;
            }
            match why {
                Why::Stall => tracing::warn!(
                    exit = %self.exit,
                    origin = %self.origin.target,
                    stall = ?self.unread.stall,
                    "abandoned an answer pinproxy could write nothing more of to its client for \
                     timeouts.client_stall; a client that pauses longer needs a longer limit"
                ),
                Why::Budget => tracing::warn!(
                    exit = %self.exit,
                    origin = %self.origin.target,
                    budget = self.unread.budget,
                    "abandoned an answer its client fell behind: answers of other clients slower \
                     than their origins already hold limits.max_unread_bytes (raise it for many \
                     large downloads to slow clients at once)"
                ),
            }
            return;
        }
    }
}

impl UpstreamBody {
    /// `body`, from `origin` through `exit`, held to `unread`'s bounds;
    /// `exposure`: its HTTP/2 connection's.
    pub(super) fn new(
        body: OriginBody,
        unread: &Arc<Unread>,
        exposure: Option<Arc<Exposure>>,
        exit: ExitId,
        origin: &Origin,
    ) -> UpstreamBody {
        UpstreamBody {
            body: Some(body),
            bounds: Some(Bounds {
                unread: unread.clone(),
                exposure,
                exit,
                origin: origin.clone(),
                releases: Vec::new(),
            }),
            watch: None,
        }
    }

    /// Runs `release` if the answer is abandoned (see [`Abandonable`]):
    /// for what the layers
    /// around it hold until hyper polls them again (an identity's pacing
    /// slot), which a client that never reads again would hold for good.
    pub fn on_abandon(&mut self, release: impl FnOnce() + Send + Sync + 'static) {
        if let Some(bounds) = &mut self.bounds {
            bounds.releases.push(Box::new(release));
        }
    }

    /// The body goes on past a frame just handed on: it moves into a
    /// watch, and its watcher starts, if a bound applies to it.
    fn goes_on(&mut self) {
        let Some(Bounds {
            unread,
            exposure,
            exit,
            origin,
            releases,
        }) = self.bounds.take()
        else {
            return;
        };
        if !unread.watches(exposure.as_deref()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let now = Instant::now();
        let watch = Arc::new(Watch {
            slot: Mutex::new(Slot {
                body: self.body.take(),
                handed_at: Some(now),
                behind_since: Some(now),
                end_stream: false,
                counted: 0,
                over: false,
            }),
            unread,
            exposure,
            ended: Notify::new(),
            releases: Mutex::new(releases),
            exit,
            origin,
        });
        runtime.spawn(watch.clone().run());
        self.watch = Some(watch);
    }
}

/// A body that can be told what to let go of if its answer is abandoned
/// for its client: an origin's answer ([`UpstreamBody`]), or one nothing
/// abandons (a WebSocket handshake answered otherwise than `101`), which
/// ignores it.
pub trait Abandonable:
    http_body::Body<Data = Bytes, Error = crate::body::BoxError> + Send + Sync + Sized + 'static
{
    /// Runs `release` if the answer is abandoned.
    fn on_abandon(&mut self, release: impl FnOnce() + Send + Sync + 'static);
}

impl Abandonable for UpstreamBody {
    fn on_abandon(&mut self, release: impl FnOnce() + Send + Sync + 'static) {
        UpstreamBody::on_abandon(self, release);
    }
}

impl Abandonable for crate::body::Body {
    fn on_abandon(&mut self, _release: impl FnOnce() + Send + Sync + 'static) {}
}

impl Watch {
    /// Polls the watched body for the client's side (see
    /// [`UpstreamBody::poll_frame`]).
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut slot = self.slot();
        slot.handed_at = None;
        let Some(body) = slot.body.as_mut() else {
            return Poll::Ready(Some(Err(Abandoned.into())));
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let mut caught_up = false;
        let goes_on = match &polled {
            Poll::Ready(Some(Ok(_))) => !body.is_end_stream(),
            Poll::Pending => {
                caught_up = true;
                false
            }
            Poll::Ready(_) => false,
        };
        if goes_on {
            let now = Instant::now();
            slot.handed_at = Some(now);
            slot.behind_since.get_or_insert(now);
        } else {
            slot.behind_since = None;
            if !caught_up {
                slot.end_stream = true;
                slot.over = true;
            }
        }
        // Its origin holds nothing more for it, or it is over.
        let counted = if goes_on {
            0
        } else {
            std::mem::take(&mut slot.counted)
        };
        drop(slot);
        self.uncount(counted);
        polled
    }

    /// The answer is done with, read or not.
    fn end(&self) {
        let mut slot = self.slot();
        slot.over = true;
        let body = slot.body.take();
        let counted = std::mem::take(&mut slot.counted);
        drop(slot);
        self.uncount(counted);
        // A pooled HTTP/1.1 body goes back to its pool here.
        drop(body);
        self.ended.notify_one();
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(watch) = &this.watch {
            return watch.poll_frame(cx);
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !body.is_end_stream() {
            this.goes_on();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match (&self.watch, &self.body) {
            (Some(watch), _) => watch.slot().end_stream,
            (None, Some(body)) => body.is_end_stream(),
            (None, None) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.watch, &self.body) {
            (Some(watch), _) => watch
                .slot()
                .body
                .as_ref()
                .map_or_else(SizeHint::default, http_body::Body::size_hint),
            (None, Some(body)) => body.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's stalled streams count their windows up to the
    /// connection's, and give back what they counted.
    #[test]
    fn a_connection_counts_at_most_its_window() {
        let exposure = Exposure::new(6 << 20, 15 << 20);
        assert_eq!(exposure.take(u64::MAX), 6 << 20);
        assert_eq!(exposure.take(u64::MAX), 6 << 20);
        assert_eq!(exposure.take(u64::MAX), 3 << 20);
        assert_eq!(exposure.take(u64::MAX), 0);
        exposure.give_back(6 << 20);
        // An answer with less left to send counts that.
        assert_eq!(exposure.take(20_000), 20_000);
        assert_eq!(exposure.take(u64::MAX), (6 << 20) - 20_000);
    }

    /// The budget takes what fits and refuses the rest; zero takes
    /// nothing but is never asked (no budget: nothing is counted).
    #[test]
    fn the_budget_takes_what_fits() {
        let unread = Unread::new(Duration::ZERO, 10, Family::default(), Gauge::default());
        assert!(unread.reserve(6));
        assert!(!unread.reserve(5));
        assert!(unread.reserve(4));
        assert_eq!(unread.held(), 10);
        unread.release(6);
        assert!(unread.reserve(5));
        assert!(!unread.reserve(u64::MAX));
    }

    /// Only answers either bound applies to are watched.
    #[test]
    fn only_bounded_answers_are_watched() {
        let exposure = Exposure::new(1, 1);
        let none = Unread::default();
        assert!(!none.watches(Some(&exposure)));
        let budget = Unread::new(Duration::ZERO, 1, Family::default(), Gauge::default());
        assert!(budget.watches(Some(&exposure)));
        assert!(!budget.watches(None));
        let stall = Unread::new(
            Duration::from_secs(1),
            0,
            Family::default(),
            Gauge::default(),
        );
        assert!(stall.watches(None));
    }
}
