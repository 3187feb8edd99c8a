//! The upstream sessions of cookie-less traffic.
//!
//! An exit whose credentials carry `{session}` gives one IP per session
//! name. Identities get their own session; traffic without one rotates over
//! a small ring of anonymous sessions, so it still spreads over IPs while
//! its connections can be reused. A slot gets a fresh session once it is
//! older than the exit's sticky window. Exits without the placeholder use a
//! single slot (the session name is never sent).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::identity::SessionId;

/// One anonymous upstream session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnonymousSession {
    /// The session id.
    pub session: SessionId,
    /// When it started (Unix ms).
    pub started_ms: u64,
}

/// A ring of anonymous sessions.
#[derive(Debug)]
pub struct AnonymousSessions {
    slots: Vec<Mutex<AnonymousSession>>,
    next: AtomicUsize,
    ttl_ms: Option<u64>,
}

impl AnonymousSessions {
    /// `count` slots (at least one) whose sessions last `ttl_ms` each.
    pub fn new(count: usize, ttl_ms: Option<u64>, now_ms: u64) -> AnonymousSessions {
        AnonymousSessions {
            slots: (0..count.max(1))
                .map(|_| Mutex::new(fresh(now_ms)))
                .collect(),
            next: AtomicUsize::new(0),
            ttl_ms,
        }
    }

    /// Whether its sessions end (`sticky_ttl`): only then are they dated
    /// by the clock their age is judged on (see `Router::rotate`).
    pub fn expire(&self) -> bool {
        self.ttl_ms.is_some()
    }

    /// The next session in the ring, renewed first if it is too old.
    pub fn next(&self, now_ms: u64) -> AnonymousSession {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        // Per-slot lock held for a few instructions, never across an await.
        let mut slot = self.slots[index].lock().unwrap_or_else(|e| e.into_inner());
        if self
            .ttl_ms
            .is_some_and(|ttl| now_ms.saturating_sub(slot.started_ms) >= ttl)
        {
            *slot = fresh(now_ms);
        }
        *slot
    }

    /// Hands `session` over to an identity founded on it (by the cookies
    /// an answer on it set): its slot takes a fresh session, so cookie-less
    /// traffic routed from now on no longer goes out on the identity's
    /// session (its address at a provider that keeps one per session), and
    /// the connection that carried the answer serves it no more (see
    /// `ExitClient::hand_over`): the origin would see it carry other
    /// visitors' first requests. A request routed to the session before
    /// still leaves on it (on another of its connections, or one it dials).
    /// A session no slot holds (renewed meanwhile) is left.
    pub fn hand_over(&self, session: SessionId, now_ms: u64) {
        for slot in &self.slots {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.session == session {
                *slot = fresh(now_ms);
                return;
            }
        }
    }
}

fn fresh(now_ms: u64) -> AnonymousSession {
    AnonymousSession {
        session: SessionId(rand::random()),
        started_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_rotates_and_renews_old_sessions() {
        let ring = AnonymousSessions::new(2, Some(1_000), 0);
        let a = ring.next(0);
        let b = ring.next(0);
        assert_ne!(a.session, b.session);
        assert_eq!(ring.next(500), a, "still within the window");
        let b2 = ring.next(1_500);
        assert_ne!(b2.session, b.session, "renewed after the window");
        assert_eq!(b2.started_ms, 1_500);
    }

    #[test]
    fn a_session_handed_over_leaves_the_ring() {
        let ring = AnonymousSessions::new(2, None, 0);
        let a = ring.next(0);
        let b = ring.next(0);
        ring.hand_over(a.session, 5);
        let seen: Vec<_> = (0..4).map(|_| ring.next(5).session).collect();
        assert!(!seen.contains(&a.session), "{seen:?}");
        assert!(seen.contains(&b.session));
        // A session no slot holds any more is left alone.
        ring.hand_over(a.session, 6);
        assert!((0..4).all(|_| seen.contains(&ring.next(6).session)));
    }
}
