//! Stage 5b, pacing: at most `identities.max_in_flight` requests of one
//! identity at a time, and at least `identities.min_interval` between the
//! starts of two of its requests.
//!
//! Runs after routing (stage 4, when the identity is known) and the
//! fingerprint check (5), before anything is sent (7). Only requests of an
//! identity are paced; cookie-less rotated traffic is not (it has no
//! session to protect).
//!
//! Why queue and delay rather than refuse: a browser that opens its six
//! connections at once, or a scraper's burst, would see spurious 429s on
//! pages that are perfectly normal to load. Anti-bot velocity detectors
//! look at how fast one session asks (the seeds' "velocity" signal), so a
//! request over the limit waits its turn (a freed slot goes to the line,
//! never to a request that came after it; the line's order is tokio's
//! `Notify`, oldest first, which a waiter woken and then refused breaks),
//! for at most
//! `identities.queue_timeout`, and at most `identities.max_queue` requests
//! wait per identity. Past either bound, and when the pacing delay would
//! exceed `identities.max_pacing_delay`, the answer is `429 identity-busy`
//! with `Retry-After`: a bounded wait, never an unbounded one.
//!
//! A slot is held from admission until the response body has been read to
//! its end (or dropped), so "in flight" means what the origin sees.
//!
//! Memory: one small entry per identity with a request in flight, waiting,
//! or paced within the last interval; idle entries are removed when their
//! last request ends, and paced ones by a periodic sweep.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http_body::{Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::credential::RandomKeys;
use crate::identity::IdentityId;

/// How often (in admissions) idle paced entries are swept.
const SWEEP_EVERY: u64 = 4096;

/// A request pinproxy will not serve now; answered 429 with `Retry-After`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Throttle {
    /// The client address sent more requests per second than allowed.
    #[error("{client} sent more than {rate} requests per second (burst {burst})")]
    ClientRate {
        /// The client address.
        client: std::net::IpAddr,
        /// `limits.requests_per_second_per_client`.
        rate: u32,
        /// `limits.requests_burst_per_client`.
        burst: u32,
        /// When a request would be accepted again.
        retry_after: Duration,
    },
    /// The client address has too many connections open.
    #[error("{client} has {open} connections open; the limit is {limit}")]
    ClientConnections {
        /// The client address.
        client: std::net::IpAddr,
        /// Its open connections.
        open: usize,
        /// `limits.max_connections_per_client`.
        limit: usize,
    },
    /// The identity has too many requests in flight or waiting.
    #[error("identity {identity} has {limit} requests in flight and {waiting} waiting ({why})")]
    IdentityBusy {
        /// The identity.
        identity: IdentityId,
        /// `identities.max_in_flight`.
        limit: u32,
        /// Requests waiting.
        waiting: u32,
        /// Which bound was hit.
        why: &'static str,
        /// A hint for the client.
        retry_after: Duration,
    },
}

impl Throttle {
    /// The `X-Pinproxy-Error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Throttle::ClientRate { .. } => "rate-limited",
            Throttle::ClientConnections { .. } => "too-many-connections",
            Throttle::IdentityBusy { .. } => "identity-busy",
        }
    }

    /// Seconds for `Retry-After` (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        let after = match self {
            Throttle::ClientRate { retry_after, .. }
            | Throttle::IdentityBusy { retry_after, .. } => *retry_after,
            Throttle::ClientConnections { .. } => Duration::from_secs(1),
        };
        // Whole seconds, rounded up; never 0 ("retry at once" invites a
        // tight loop).
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        secs.max(1)
    }

    /// What the client can do about it.
    pub fn advice(&self) -> &'static str {
        match self {
            Throttle::ClientRate { .. } => {
                "Slow down (Retry-After says when), or raise limits.requests_per_second_per_client."
            }
            Throttle::ClientConnections { .. } => {
                "Reuse connections (keep-alive) or raise limits.max_connections_per_client."
            }
            Throttle::IdentityBusy { .. } => {
                "One identity is one browsing session: send fewer of its requests at once, or raise \
                 identities.max_in_flight / identities.max_queue / identities.queue_timeout."
            }
        }
    }
}

/// Pacing settings (from `[identities]`; a reload may change them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacingSettings {
    /// Most requests of one identity in flight; 0: unlimited.
    pub max_in_flight: u32,
    /// Most requests of one identity waiting for a slot.
    pub max_queue: u32,
    /// Longest a request waits for a slot.
    pub queue_timeout: Duration,
    /// Least time between the starts of two requests of one identity.
    pub min_interval: Duration,
    /// Longest a request is delayed for pacing before it is refused.
    pub max_pacing_delay: Duration,
}

impl PacingSettings {
    /// Whether these settings pace anything at all.
    pub fn is_off(&self) -> bool {
        self.max_in_flight == 0 && self.min_interval.is_zero()
    }
}

#[derive(Debug, Default)]
struct GateState {
    in_flight: u32,
    waiting: u32,
    /// When the next request may start.
    next_start: Option<Instant>,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    freed: Notify,
}

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        // Each update is a handful of integer assignments: a poisoned lock
        // still holds consistent counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GateState {
    fn idle(&self, now: Instant) -> bool {
        self.in_flight == 0 && self.waiting == 0 && self.next_start.is_none_or(|t| t <= now)
    }
}

/// Every identity's gate; shared by the pipelines of successive reloads,
/// so a reload neither forgets in-flight requests nor resets pacing.
#[derive(Debug, Default)]
pub struct Pacer {
    gates: DashMap<IdentityId, Arc<Gate>, RandomKeys>,
    admissions: AtomicU64,
    /// `identities.max_in_flight` in force (0: none), set at start and by
    /// each reload ([`Pacer::apply`]): requests already in line judge by
    /// it, not by the settings they were routed with.
    limit: std::sync::atomic::AtomicU32,
}

/// An admitted request's slot; released when dropped.
#[derive(Debug)]
pub struct Slot {
    pacer: Arc<Pacer>,
    identity: IdentityId,
    gate: Arc<Gate>,
    /// Whether the request waited for it (in line, or for its pacing
    /// start): what was read when it was routed may have changed since.
    waited: bool,
    /// Let go already ([`Slot::release`]).
    released: std::sync::atomic::AtomicBool,
}

impl Slot {
    /// Whether the request waited for its slot.
    pub fn waited(&self) -> bool {
        self.waited
    }

    /// Lets the slot go before its holders are dropped: its answer was
    /// abandoned (its origin's side dropped, see `upstream::unread`), and
    /// the client's side, which holds the slot, may stay until the client
    /// reads again, or closes. Once only; dropping it then does nothing.
    pub fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let (idle, room) = {
            let mut state = self.gate.state();
            state.in_flight = state.in_flight.saturating_sub(1);
            (
                state.idle(Instant::now()),
                has_room(&state, self.pacer.limit()),
            )
        };
        // Not when the slot leaves no room (a limit lowered since): a
        // waiter woken for nothing would go to the back of the line.
        if room {
            self.gate.freed.notify_one();
        }
        if idle {
            // Only while no other request holds the gate (the map and this
            // slot do): the shard lock keeps new holders out meanwhile.
            self.pacer.gates.remove_if(&self.identity, |_, gate| {
                Arc::strong_count(gate) <= 2 && gate.state().idle(Instant::now())
            });
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

impl Pacer {
    /// A pacer with no identity known, under `settings`.
    pub fn new(settings: &PacingSettings) -> Arc<Pacer> {
        let pacer = Pacer::default();
        pacer.limit.store(settings.max_in_flight, Ordering::Relaxed);
        Arc::new(pacer)
    }

    /// Puts `settings` (a reload's) in force for the requests in line too:
    /// a line that now has room (a limit raised, or taken away) has its
    /// head woken, which wakes the next while room is left.
    pub fn apply(&self, settings: &PacingSettings) {
        self.limit.store(settings.max_in_flight, Ordering::Relaxed);
        for gate in self.gates.iter() {
            let state = gate.state();
            let room = has_room(&state, settings.max_in_flight);
            if state.waiting > 0 && room {
                drop(state);
                gate.freed.notify_one();
            }
        }
    }

    /// The limit of in-flight requests in force (0: none).
    fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Identities with a gate (in flight, waiting or recently paced).
    pub fn tracked(&self) -> usize {
        self.gates.len()
    }

    /// Requests of `identity` waiting in its line for a slot.
    pub fn waiting(&self, identity: IdentityId) -> u32 {
        self.gates
            .get(&identity)
            .map_or(0, |gate| gate.state().waiting)
    }

    /// Admits one request of `identity`: waits for an in-flight slot and
    /// for its pacing start, both bounded by `settings`. `None` when
    /// pacing is off.
    pub async fn admit(
        self: &Arc<Self>,
        identity: IdentityId,
        settings: &PacingSettings,
    ) -> Result<Option<Slot>, Throttle> {
        if settings.is_off() {
            return Ok(None);
        }
        self.sweep_now_and_then();
        let gate = self.gates.entry(identity).or_default().clone();
        let (start, queued) = wait_for_slot(&gate, identity, settings, &self.limit).await?;
        // From here the slot is taken: dropping it (even while the pacing
        // delay runs, if the client leaves) gives it back.
        let slot = Slot {
            pacer: self.clone(),
            identity,
            gate,
            waited: queued || start.is_some(),
            released: std::sync::atomic::AtomicBool::new(false),
        };
        if let Some(start) = start {
            // Dropped while it waits (its client gone), the request gives
            // its start back when no later one reserved after it: the
            // identity is not held back for a request the origin never saw.
            let unused = UnusedStart {
                gate: &slot.gate,
                start,
                reserved: start + settings.min_interval,
            };
            tokio::time::sleep_until(start).await;
            std::mem::forget(unused);
        }
        Ok(Some(slot))
    }

    /// Removes idle gates every [`SWEEP_EVERY`] admissions (those kept only
    /// for a pacing start that has passed).
    fn sweep_now_and_then(&self) {
        if self.admissions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            let now = Instant::now();
            self.gates
                .retain(|_, gate| Arc::strong_count(gate) > 1 || !gate.state().idle(now));
        }
    }
}

/// A pacing start reserved for a request still waiting for it: given back
/// if the request is dropped before its start (see [`Pacer::admit`]).
struct UnusedStart<'a> {
    gate: &'a Gate,
    /// When the request was to start.
    start: Instant,
    /// The next start its reservation set.
    reserved: Instant,
}

impl Drop for UnusedStart<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        if state.next_start == Some(self.reserved) {
            state.next_start = Some(self.start);
        }
    }
}

/// Takes an in-flight slot of `gate` (waiting in line if need be) and
/// reserves a pacing start; returns when the request may start (`None`:
/// now).
async fn wait_for_slot(
    gate: &Gate,
    identity: IdentityId,
    settings: &PacingSettings,
    in_force: &std::sync::atomic::AtomicU32,
) -> Result<(Option<Instant>, bool), Throttle> {
    let busy = |waiting, why, retry_after| Throttle::IdentityBusy {
        identity,
        limit: settings.max_in_flight,
        waiting,
        why,
        retry_after,
    };
    let deadline = Instant::now() + settings.queue_timeout;
    let mut queued = false;
    loop {
        // Registered before the state is read, so a slot freed in between
        // still wakes this request.
        let freed = gate.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        {
            let mut state = gate.state();
            let limit = in_force.load(Ordering::Relaxed);
            let room = has_room(&state, limit);
            // A slot freed while others wait in line is theirs: a request
            // that has not waited lines up behind them.
            let free = room && (queued || state.waiting == 0);
            if free {
                let now = Instant::now();
                let start = state.next_start.filter(|t| *t > now);
                let delay = start.map_or(Duration::ZERO, |t| t - now);
                if delay > settings.max_pacing_delay {
                    // Refused without the slot: one that waited in line
                    // may hold the wake of a slot freed for the line, and
                    // hands it to the next in line.
                    if queued {
                        gate.freed.notify_one();
                    }
                    return Err(busy(
                        state.waiting,
                        "pacing would delay it longer than identities.max_pacing_delay",
                        delay,
                    ));
                }
                state.in_flight += 1;
                if !settings.min_interval.is_zero() {
                    state.next_start = Some(start.unwrap_or(now) + settings.min_interval);
                }
                // Slots left for the line (a reload that raised the limit
                // frees several at once, with one wake): the next in line
                // is woken in turn.
                if queued && state.waiting > 0 && has_room(&state, limit) {
                    gate.freed.notify_one();
                }
                return Ok((start, queued));
            }

            if state.waiting >= settings.max_queue {
                return Err(busy(
                    state.waiting,
                    "the queue is full",
                    Duration::from_secs(1),
                ));
            }
            state.waiting += 1;
            queued = true;
        }
        // Out of the line however the wait ends: a request its client
        // gives up on (a stream reset, a closed connection) is dropped
        // right here, and must not hold its place in the line for good.
        let in_line = InLine(gate);
        let woken = tokio::time::timeout_at(deadline, freed).await;
        drop(in_line);
        if woken.is_err() {
            return Err(busy(
                gate.state().waiting,
                "it waited identities.queue_timeout for a slot",
                Duration::from_secs(1),
            ));
        }
    }
}

/// Whether a gate in `state` has room for one more request under `limit`
/// (0: no limit).
fn has_room(state: &GateState, limit: u32) -> bool {
    limit == 0 || state.in_flight < limit
}

/// A request's place in its identity's line, left when dropped. (A wake
/// it received and did not take, its time up or its client gone, goes on
/// to the next in line: tokio's `Notified` hands it on when dropped.)
struct InLine<'a>(&'a Gate);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.waiting = state.waiting.saturating_sub(1);
    }
}

/// A response body that holds its request's [`Slot`] until it ends. The
/// slot is shared: a body scanned for invalidation markers holds it too,
/// until the scan's verdict (see `capture::invalidation::scanning`), so a
/// request waiting in line is not let out before the answer ahead of it
/// is judged, even when that answer's client left before its marker came.
pub struct Paced {
    body: Body,
    slot: Option<Arc<Slot>>,
}

impl Paced {
    /// `body`, releasing its hold on `slot` at its end (or when dropped).
    pub fn wrap(body: Body, slot: Option<Arc<Slot>>) -> Body {
        match slot {
            None => body,
            Some(slot) => crate::body::boxed(Paced {
                body,
                slot: Some(slot),
            }),
        }
    }
}

impl http_body::Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(in_flight: u32, interval_ms: u64) -> PacingSettings {
        PacingSettings {
            max_in_flight: in_flight,
            max_queue: 2,
            queue_timeout: Duration::from_millis(100),
            min_interval: Duration::from_millis(interval_ms),
            max_pacing_delay: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_is_bounded_and_the_queue_too() {
        let pacer = Pacer::new(&settings(1, 0));
        let id = IdentityId(7);
        let s = settings(1, 0);
        let first = pacer.admit(id, &s).await.unwrap();
        // Waits, then times out.
        let busy = pacer.admit(id, &s).await.unwrap_err();
        assert_eq!(busy.code(), "identity-busy");
        // A waiter gets the slot when it is freed.
        let waiter = spawn_waiter(&pacer, id, s);
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(pacer.tracked(), 0, "idle gates are removed");
    }

    /// A slot let go early (its answer abandoned) frees its place once:
    /// dropping it afterwards frees nothing more.
    #[tokio::test(start_paused = true)]
    async fn a_slot_released_early_frees_its_place_once() {
        let pacer = Pacer::new(&settings(1, 0));
        let id = IdentityId(9);
        let s = settings(1, 0);
        let first = pacer.admit(id, &s).await.unwrap();
        first.as_ref().unwrap().release();
        let second = pacer.admit(id, &s).await.unwrap();
        drop(first);
        let busy = pacer.admit(id, &s).await.unwrap_err();
        assert_eq!(busy.code(), "identity-busy");
        drop(second);
        drop(pacer.admit(id, &s).await.unwrap());
        assert_eq!(pacer.tracked(), 0, "idle gates are removed");
    }

    /// A slot freed while a request waits in line is its: a request that
    /// comes meanwhile lines up behind it.
    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_line_first() {
        let pacer = Pacer::new(&settings(1, 0));
        let id = IdentityId(17);
        let s = settings(1, 0);
        let first = pacer.admit(id, &s).await.unwrap();
        // It holds the slot it gets for a second.
        let waiter = {
            let pacer = pacer.clone();
            tokio::spawn(async move {
                let slot = pacer.admit(id, &s).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                slot.map(drop)
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        let late = pacer.admit(id, &s).await;
        assert!(late.is_err(), "the later one waited, and timed out");
        assert!(waiter.await.unwrap().is_ok(), "the one in line got it");
    }

    /// One woken in line but refused for its pacing turn hands the freed
    /// slot's wake on: the line (and the requests after it) do not wait
    /// for a deadline with a slot free.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_refused_for_its_turn_passes_the_slot_on() {
        let pacer = Pacer::new(&settings(1, 0));
        let id = IdentityId(19);
        let s = PacingSettings {
            max_in_flight: 1,
            max_queue: 4,
            queue_timeout: Duration::from_secs(30),
            min_interval: Duration::from_secs(10),
            max_pacing_delay: Duration::from_secs(5),
        };
        let first = pacer.admit(id, &s).await.unwrap();
        let early = spawn_waiter(&pacer, id, s);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = spawn_waiter(&pacer, id, s);
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(first);
        let refused = early.await.unwrap().unwrap_err();
        assert_eq!(refused.code(), "identity-busy");
        // The second is woken in turn and refused too (its turn is 9 s
        // away); a request 5 s later, its turn 4 s away, is let in at it,
        // not at the second's deadline.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let late = tokio::time::timeout(Duration::from_secs(6), pacer.admit(id, &s)).await;
        assert!(matches!(late, Ok(Ok(_))), "{late:?}");
        assert!(second.await.unwrap().is_err());
    }

    /// A reload's limit reaches the requests already in line: raised, the
    /// line takes the room at once (each one admitted wakes the next while
    /// room is left), whatever settings its requests were routed with.
    #[tokio::test(start_paused = true)]
    async fn a_raised_limit_lets_the_line_through() {
        let one = PacingSettings {
            max_queue: 4,
            queue_timeout: Duration::from_secs(5),
            ..settings(1, 0)
        };
        let pacer = Pacer::new(&one);
        let id = IdentityId(23);
        let first = pacer.admit(id, &one).await.unwrap();
        let hold = |pacer: &Arc<Pacer>| {
            let pacer = pacer.clone();
            tokio::spawn(async move {
                let slot = pacer.admit(id, &one).await;
                let admitted = tokio::time::Instant::now();
                tokio::time::sleep(Duration::from_secs(1)).await;
                slot.map(|_| admitted)
            })
        };
        let waiters = [hold(&pacer), hold(&pacer)];
        tokio::time::sleep(Duration::from_millis(10)).await;
        let raised_at = tokio::time::Instant::now();
        pacer.apply(&PacingSettings {
            max_in_flight: 3,
            ..one
        });
        for waiter in waiters {
            let admitted = waiter.await.unwrap().unwrap();
            assert_eq!(admitted, raised_at, "let in at the reload");
        }
        drop(first);
    }

    /// A reload that turns pacing off lets the line go.
    #[tokio::test(start_paused = true)]
    async fn pacing_turned_off_lets_the_line_go() {
        let one = PacingSettings {
            queue_timeout: Duration::from_secs(5),
            ..settings(1, 0)
        };
        let pacer = Pacer::new(&one);
        let id = IdentityId(29);
        let first = pacer.admit(id, &one).await.unwrap();
        let waiter = spawn_waiter(&pacer, id, one);
        tokio::time::sleep(Duration::from_millis(10)).await;
        pacer.apply(&settings(0, 0));
        let admitted = tokio::time::timeout(Duration::from_millis(10), waiter).await;
        assert!(matches!(admitted, Ok(Ok(Ok(())))), "{admitted:?}");
        drop(first);
    }

    /// A limit lowered while requests are in flight: a slot freed with no
    /// room left wakes nobody, and the line keeps its order.
    #[tokio::test(start_paused = true)]
    async fn a_lowered_limit_keeps_the_lines_order() {
        let two = PacingSettings {
            max_queue: 4,
            queue_timeout: Duration::from_secs(5),
            ..settings(2, 0)
        };
        let pacer = Pacer::new(&two);
        let id = IdentityId(31);
        let (a, b) = (
            pacer.admit(id, &two).await.unwrap(),
            pacer.admit(id, &two).await.unwrap(),
        );
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let waiter = |n: u32| {
            let (pacer, order) = (pacer.clone(), order.clone());
            tokio::spawn(async move {
                let slot = pacer.admit(id, &two).await;
                order.lock().unwrap().push(n);
                tokio::time::sleep(Duration::from_millis(100)).await;
                slot.map(drop)
            })
        };
        let w1 = waiter(1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let w2 = waiter(2);
        tokio::time::sleep(Duration::from_millis(1)).await;
        pacer.apply(&PacingSettings {
            max_in_flight: 1,
            ..two
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(b);
        let _ = (w1.await, w2.await);
        assert_eq!(*order.lock().unwrap(), [1, 2]);
    }

    /// A request of `id` admitted in a task of its own (it waits in line).
    fn spawn_waiter(
        pacer: &Arc<Pacer>,
        id: IdentityId,
        s: PacingSettings,
    ) -> tokio::task::JoinHandle<Result<(), Throttle>> {
        let pacer = pacer.clone();
        tokio::spawn(async move { pacer.admit(id, &s).await.map(|_| ()) })
    }

    /// A request dropped while it waits for its pacing start gives the
    /// start back (it was the last reserved): the next request starts
    /// when the dropped one would have, not an interval later.
    #[tokio::test(start_paused = true)]
    async fn a_start_never_used_is_given_back() {
        let s = settings(4, 1_000);
        let pacer = Pacer::new(&s);
        let id = IdentityId(13);
        let first = pacer.admit(id, &s).await.unwrap();
        let began = tokio::time::Instant::now();
        let dropped = spawn_waiter(&pacer, id, s);
        tokio::time::sleep(Duration::from_millis(10)).await;
        dropped.abort();
        let _ = dropped.await;
        // Two intervals away, past `max_pacing_delay`, it would be refused.
        let next = pacer.admit(id, &s).await;
        assert!(
            next.is_ok(),
            "the start dropped was kept: {:?}",
            next.as_ref().err()
        );
        assert_eq!(
            tokio::time::Instant::now() - began,
            Duration::from_secs(1),
            "the next request starts one interval after the first, not two"
        );
        drop((first, next));
    }

    /// A waiter its client gives up on leaves the line: the line does not
    /// fill with requests nobody waits for, and the identity's gate goes
    /// once idle.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_in_line_leaves_it() {
        let pacer = Pacer::new(&settings(1, 0));
        let id = IdentityId(11);
        let s = settings(1, 0);
        let first = pacer.admit(id, &s).await.unwrap();
        for _ in 0..3 {
            let waiter = spawn_waiter(&pacer, id, s);
            tokio::time::sleep(Duration::from_millis(10)).await;
            waiter.abort();
            let _ = waiter.await;
        }
        // The line (room for two) is empty: one more waits for the slot.
        let waiter = spawn_waiter(&pacer, id, s);
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(pacer.tracked(), 0, "the idle gate is removed");
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_starts_and_bounds_the_delay() {
        let s = settings(0, 400);
        let pacer = Pacer::new(&s);
        let id = IdentityId(9);
        let t0 = Instant::now();
        for n in 0..3u32 {
            drop(pacer.admit(id, &s).await.unwrap());
            assert_eq!(Instant::now() - t0, Duration::from_millis(400) * n);
        }
        // Three more at once would start 400, 800 and 1200 ms from now:
        // the last is past max_pacing_delay (1 s) and refused.
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let pacer = pacer.clone();
                tokio::spawn(async move { pacer.admit(id, &s).await.map(|_| ()) })
            })
            .collect();
        let mut refused = 0;
        for task in tasks {
            if task.await.unwrap().is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, 1);
    }
}
