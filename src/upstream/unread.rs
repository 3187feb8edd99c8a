//! Answers whose client has stopped reading them.
//!
//! What an origin sends within the window pinproxy offered it waits in
//! pinproxy's memory until the client reads it. Over HTTP/2 that window is
//! the client's own (mirrored, up to 32 MiB a stream), and each identity
//! has its own upstream connection, so one client connection naming many
//! sessions and then reading nothing could have origins fill gigabytes.
//! HTTP/1.1 answers wait in the kernel's socket buffers instead, and hold
//! an exit's connection.
//!
//! Two bounds, checked by a watcher each answer gets once it is longer than
//! one frame:
//! - **The stall limit** (`timeouts.client_stall`): an answer whose client
//!   has taken nothing of it for that long (within a [`GRACE`] more) is
//!   abandoned, as nginx's `send_timeout` does: its upstream stream is
//!   reset (HTTP/2) or its connection closed (HTTP/1.1), and the client's
//!   stream is reset or its connection closed once its server polls the
//!   answer again.
//! - **The unread budget** (`limits.max_unread_bytes`): an HTTP/2 answer
//!   its client has taken nothing of for a [`GRACE`] counts what its
//!   stream may hold (its stream window, at most what its connection's
//!   window leaves over the connection's other stalled streams) against
//!   one budget for the daemon; one the budget cannot take is abandoned at
//!   once. A client reading again takes its count back.
//!
//! "Taken nothing" means the client's side has not asked for the answer's
//! next frame since it was handed the last one. Its server asks whenever it
//! can write more to the client, so the limit runs between two writes, as
//! nginx's does: a client reading slowly lets pinproxy write now and then
//! (one whose socket buffers drain slower than that for the whole limit
//! is taken for stalled), and an origin that is slow to send (a long poll,
//! a stream of events) is being asked, so it is no stall. The
//! budget counts windows, not bytes (the crate holding them does not say
//! how many it holds), so it is an upper bound on what stalled answers
//! hold; what an origin sends within the grace before the count is made
//! is not bounded by it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Notify;

use super::pool::OriginBody;
use super::Origin;
use crate::body::BoxError;
use crate::identity::ExitId;
use crate::metrics::AbandonedLabel;

/// How long a client may take nothing of an answer before what its stream
/// may hold counts against the budget; also how often a watcher looks.
pub const GRACE: Duration = Duration::from_secs(1);

/// The daemon's bounds on answers their clients stopped reading; one per
/// daemon.
#[derive(Debug)]
pub struct Unread {
    /// `timeouts.client_stall`; zero: never abandoned for stalling.
    stall: Duration,
    /// `limits.max_unread_bytes`; zero: no budget.
    budget: u64,
    /// What stalled answers' streams may hold, counted against `budget`.
    held: AtomicU64,
    /// Answers abandoned, by why.
    abandoned: Family<AbandonedLabel, Counter>,
}

impl Unread {
    /// Bounds of `stall` (zero: none) and `budget` bytes (zero: none),
    /// counting abandoned answers in `abandoned`.
    pub fn new(
        stall: Duration,
        budget: u64,
        abandoned: Family<AbandonedLabel, Counter>,
    ) -> Arc<Unread> {
        Arc::new(Unread {
            stall,
            budget,
            held: AtomicU64::new(0),
            abandoned,
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
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&sum| sum <= self.budget)
            })
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// No bounds: nothing is watched.
impl Default for Unread {
    fn default() -> Unread {
        Unread {
            stall: Duration::ZERO,
            budget: 0,
            held: AtomicU64::new(0),
            abandoned: Family::default(),
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

    /// What one more stalled stream adds: its window, at most what the
    /// connection's leaves; counted.
    fn take(&self) -> u64 {
        let mut taken = 0;
        let _ = self
            .counted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |counted| {
                taken = self.stream.min(self.connection.saturating_sub(counted));
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
/// abandoned if its client stops reading it (see the module docs).
pub struct UpstreamBody {
    watch: Arc<Watch>,
    /// Whether its watcher has been started.
    watched: bool,
}

/// What an answer and its watcher share.
struct Watch {
    slot: Mutex<Slot>,
    unread: Arc<Unread>,
    /// Its HTTP/2 connection's (none over HTTP/1.1).
    exposure: Option<Arc<Exposure>>,
    /// Wakes the watcher when the answer ends.
    ended: Notify,
    exit: ExitId,
    origin: Origin,
}

struct Slot {
    /// `None` once abandoned.
    body: Option<OriginBody>,
    /// When the client's side was handed a frame it has not asked past.
    handed_at: Option<Instant>,
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

    /// What to do about a client that has taken nothing for `waited`.
    fn judge(&self, slot: &mut Slot, waited: Duration) -> Option<Why> {
        let unread = &self.unread;
        if !unread.stall.is_zero() && waited >= unread.stall {
            return Some(Why::Stall);
        }
        let exposure = self.exposure.as_ref()?;
        if unread.budget == 0 || slot.counted > 0 || waited < GRACE {
            return None;
        }
        let taken = exposure.take();
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
            let Some(since) = slot.handed_at else {
                continue;
            };
            let Some(why) = self.judge(&mut slot, now.saturating_duration_since(since)) else {
                continue;
            };
            let body = slot.body.take();
            let counted = std::mem::take(&mut slot.counted);
            drop(slot);
            self.uncount(counted);
            // Resets its upstream stream, or closes its connection.
            drop(body);
            self.unread
                .abandoned
                .get_or_create(&AbandonedLabel { why: why.label() })
                .inc();
            match why {
                Why::Stall => tracing::warn!(
                    exit = %self.exit,
                    origin = %self.origin.target,
                    stall = ?self.unread.stall,
                    "abandoned an answer its client took nothing of for timeouts.client_stall; \
                     a client that pauses longer needs a longer limit"
                ),
                Why::Budget => tracing::warn!(
                    exit = %self.exit,
                    origin = %self.origin.target,
                    budget = self.unread.budget,
                    "abandoned an answer its client stopped reading: answers other clients stopped \
                     reading already hold limits.max_unread_bytes"
                ),
            }
            return;
        }
    }
}

impl UpstreamBody {
    /// `body`, from `origin` through `exit`, watched within `unread`'s
    /// bounds; `exposure`: its HTTP/2 connection's.
    pub(super) fn new(
        body: OriginBody,
        unread: &Arc<Unread>,
        exposure: Option<Arc<Exposure>>,
        exit: ExitId,
        origin: &Origin,
    ) -> UpstreamBody {
        UpstreamBody {
            watch: Arc::new(Watch {
                slot: Mutex::new(Slot {
                    body: Some(body),
                    handed_at: None,
                    counted: 0,
                    over: false,
                }),
                unread: unread.clone(),
                exposure,
                ended: Notify::new(),
                exit,
                origin: origin.clone(),
            }),
            watched: false,
        }
    }

    /// Starts the watcher, on the first frame that is not the last.
    fn start_watching(&mut self) {
        self.watched = true;
        if !self.watch.unread.watches(self.watch.exposure.as_deref()) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.watch.clone().run());
        }
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
        let mut slot = this.watch.slot();
        slot.handed_at = None;
        let counted = std::mem::take(&mut slot.counted);
        let Some(body) = slot.body.as_mut() else {
            drop(slot);
            this.watch.uncount(counted);
            return Poll::Ready(Some(Err(Abandoned.into())));
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let goes_on = match &polled {
            Poll::Ready(Some(Ok(_))) => !body.is_end_stream(),
            Poll::Pending => false,
            Poll::Ready(_) => {
                slot.over = true;
                false
            }
        };
        if goes_on {
            slot.handed_at = Some(Instant::now());
        }
        drop(slot);
        this.watch.uncount(counted);
        if goes_on && !this.watched {
            this.start_watching();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.watch
            .slot()
            .body
            .as_ref()
            .is_some_and(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.watch
            .slot()
            .body
            .as_ref()
            .map_or_else(SizeHint::default, http_body::Body::size_hint)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let mut slot = self.watch.slot();
        slot.over = true;
        let body = slot.body.take();
        let counted = std::mem::take(&mut slot.counted);
        drop(slot);
        self.watch.uncount(counted);
        // A pooled HTTP/1.1 body goes back to its pool here.
        drop(body);
        self.watch.ended.notify_one();
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
        assert_eq!(exposure.take(), 6 << 20);
        assert_eq!(exposure.take(), 6 << 20);
        assert_eq!(exposure.take(), 3 << 20);
        assert_eq!(exposure.take(), 0);
        exposure.give_back(6 << 20);
        assert_eq!(exposure.take(), 6 << 20);
    }

    /// The budget takes what fits and refuses the rest; zero takes
    /// nothing but is never asked (no budget: nothing is counted).
    #[test]
    fn the_budget_takes_what_fits() {
        let unread = Unread::new(Duration::ZERO, 10, Family::default());
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
        let budget = Unread::new(Duration::ZERO, 1, Family::default());
        assert!(budget.watches(Some(&exposure)));
        assert!(!budget.watches(None));
        let stall = Unread::new(Duration::from_secs(1), 0, Family::default());
        assert!(stall.watches(None));
    }
}
