//! Which of a lane's connections resume TLS sessions, and where each
//! origin's session is kept: the policy and bookkeeping behind
//! `tls::SessionSlot` (the stacks offer and keep the sessions themselves).
//!
//! A resumed handshake tells the origin the connection follows an earlier
//! one: what a browser's second connection to a host says, and what an
//! identity's connections may say, since its cookies link them anyway.
//! Never a lane shared by several visitors (cookie-less traffic), whose
//! tickets would link them, and never across exits (each exit has its own
//! lanes, and so its own sessions). A cookie-less connection's own session
//! goes to the identity an answer on it founds: the origin linked the two
//! when it set the cookie there, and a browser's next connection resumes
//! the one its cookie came on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::tls::SessionSlot;
use super::Origin;

/// Most origins an identity's lane keeps a TLS session for: a browser
/// keeps some thousand in all, an identity mostly needs a site's few hosts.
/// Past it, a new origin's session takes the place of another's.
pub(super) const MAX_SESSION_ORIGINS: usize = 64;

/// Whether a lane's connections resume the TLS sessions their origins
/// issued to the lane's earlier connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resumes {
    /// Every handshake is a full one, and no session is kept: a hello
    /// pinproxy does not shape (rustls mode, a client without TLS).
    Never,
    /// A lane shared by cookie-less traffic, with a shaped hello: every
    /// handshake is a full one (a ticket would link the visitors who share
    /// the lane), and each connection keeps the sessions its origin issues
    /// in a slot of its own, for the identity an answer on it founds (see
    /// [`Sessions::adopt`]): a browser's next connection to the host
    /// resumes the one its cookie came on.
    ForHeirs,
    /// As the client the identity presents does (mirror mode): always for
    /// a BoringSSL client's hello (one BoringSSL says with no gap: Chromium
    /// and the browsers built on it, and the tools that impersonate them),
    /// which resume; for another client's, once a client connection of the
    /// identity has offered pinproxy a session of its own (the client is
    /// one that resumes, where a single run of a command-line client never
    /// does). Which hello it is is asked at the lane's first dial, which
    /// prepares the hello's connector anyway, not while the lane map is
    /// locked.
    AsItsClient,
    /// Always: the identity presents Chrome (chrome mode), which resumes.
    /// A browser's first tunnel to a host may be the only one it opens to
    /// pinproxy, so pinproxy would never see it offer a session.
    Always,
}

/// An identity lane's TLS sessions, one slot per origin.
pub(super) struct Sessions {
    /// Keyed by origins a client names, so with a seeded hasher.
    by_origin: Mutex<HashMap<Origin, Arc<SessionSlot>, foldhash::fast::RandomState>>,
    /// Sessions are offered and kept ([`Resumes::Always`], or once the
    /// client has shown it resumes).
    wanted: AtomicBool,
    /// [`Resumes::AsItsClient`]: whether the hello is a BoringSSL client's,
    /// once the first dial has asked.
    browser_hello: Option<OnceLock<bool>>,
}

impl Sessions {
    /// The sessions of a lane that resumes as `resumes` says (`None`: one
    /// that never does).
    pub(super) fn new(resumes: Resumes) -> Option<Sessions> {
        matches!(resumes, Resumes::AsItsClient | Resumes::Always).then(|| Sessions {
            by_origin: Mutex::new(HashMap::default()),
            wanted: AtomicBool::new(resumes == Resumes::Always),
            browser_hello: (resumes == Resumes::AsItsClient).then(OnceLock::new),
        })
    }

    /// A client connection of the lane's identity offered pinproxy a TLS
    /// session: from now on the lane's connections resume theirs (see
    /// [`Resumes::AsItsClient`]).
    pub(super) fn client_resumes(&self) {
        if !self.wanted.load(Ordering::Relaxed) {
            self.wanted.store(true, Ordering::Relaxed);
        }
    }

    /// Where a new connection to `origin` finds a session to offer and
    /// keeps those it is given; `None` while the lane resumes none.
    /// `browser_hello` says whether the lane presents a BoringSSL client's
    /// hello (asked once, at most).
    pub(super) fn slot(
        &self,
        origin: &Origin,
        browser_hello: impl FnOnce() -> bool,
    ) -> Option<Arc<SessionSlot>> {
        let wanted = self.wanted.load(Ordering::Relaxed)
            || self
                .browser_hello
                .as_ref()
                .is_some_and(|browser| *browser.get_or_init(browser_hello));
        if !wanted {
            return None;
        }
        // A panic while the lock was held cannot leave the map
        // inconsistent (every change is one insert or remove).
        let mut by_origin = self.by_origin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = by_origin.get(origin) {
            return Some(slot.clone());
        }
        if by_origin.len() >= MAX_SESSION_ORIGINS {
            // Slots whose ticket was offered and not replaced go first
            // (not one a dial still holds: its connection's ticket is
            // coming); then any other (rare: an identity crawling many
            // hosts).
            by_origin.retain(|_, slot| slot.holds() || Arc::strong_count(slot) > 1);
            let other = by_origin.keys().next().cloned();
            if let (Some(other), true) = (other, by_origin.len() >= MAX_SESSION_ORIGINS) {
                by_origin.remove(&other);
            }
        }
        let slot = Arc::new(SessionSlot::default());
        by_origin.insert(origin.clone(), slot.clone());
        Some(slot)
    }

    /// Takes `founding`'s session (kept by the cookie-less connection whose
    /// answer founded the lane's identity, see [`Resumes::ForHeirs`]) as
    /// `origin`'s, unless the lane has one of its own there already: the
    /// identity's next connection to `origin` offers it (once the lane
    /// resumes at all), as a browser's next connection resumes the one its
    /// cookie came on. Taken out of `founding`, so it goes to one identity
    /// only.
    pub(super) fn adopt(&self, origin: &Origin, founding: &SessionSlot) {
        if !founding.holds() {
            return;
        }
        let slot = {
            let mut by_origin = self.by_origin.lock().unwrap_or_else(|e| e.into_inner());
            // A lane just founded has few origins: past the bound it keeps
            // those it has.
            if by_origin.len() >= MAX_SESSION_ORIGINS && !by_origin.contains_key(origin) {
                return;
            }
            by_origin.entry(origin.clone()).or_default().clone()
        };
        founding.pass_to(&slot);
    }

    /// Origins with a slot.
    #[cfg(test)]
    fn origins(&self) -> usize {
        self.by_origin.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::HostPort;

    fn origin(n: usize) -> Origin {
        Origin {
            target: HostPort::new(&format!("h{n}.test"), 443),
            https: true,
        }
    }

    /// Never: no sessions at all. Always: a slot from the first dial, the
    /// same one for an origin's every dial. As its client: none until the
    /// client resumes, unless the hello is a browser's (asked once).
    #[test]
    fn a_lane_resumes_as_its_policy_says() {
        assert!(Sessions::new(Resumes::Never).is_none());

        let Some(always) = Sessions::new(Resumes::Always) else {
            panic!("no sessions");
        };
        let first = always.slot(&origin(1), || unreachable!("not asked"));
        let again = always.slot(&origin(1), || unreachable!("not asked"));
        match (first, again) {
            (Some(a), Some(b)) => assert!(Arc::ptr_eq(&a, &b)),
            other => panic!("{other:?}"),
        }

        let Some(client) = Sessions::new(Resumes::AsItsClient) else {
            panic!("no sessions");
        };
        let mut asked = 0;
        for _ in 0..3 {
            let slot = client.slot(&origin(1), || {
                asked += 1;
                false
            });
            assert!(slot.is_none(), "not a browser, not resuming yet");
        }
        assert_eq!(asked, 1, "the hello is asked about once");
        client.client_resumes();
        assert!(client.slot(&origin(1), || unreachable!()).is_some());

        let Some(browser) = Sessions::new(Resumes::AsItsClient) else {
            panic!("no sessions");
        };
        assert!(browser.slot(&origin(1), || true).is_some());
    }

    /// A founding connection that was given no session adds no origin.
    #[test]
    fn adopting_nothing_keeps_nothing() {
        let Some(sessions) = Sessions::new(Resumes::Always) else {
            panic!("no sessions");
        };
        sessions.adopt(&origin(1), &SessionSlot::default());
        assert_eq!(sessions.origins(), 0);
        assert!(Sessions::new(Resumes::ForHeirs).is_none());
    }

    /// Past the bound, a new origin takes an emptied slot's place first
    /// (not one a dial still holds), and the map never holds more than the
    /// bound.
    #[test]
    fn slots_stay_within_their_bound() {
        let Some(sessions) = Sessions::new(Resumes::Always) else {
            panic!("no sessions");
        };
        let dialling = sessions.slot(&origin(0), || true);
        for n in 1..MAX_SESSION_ORIGINS {
            assert!(sessions.slot(&origin(n), || true).is_some());
        }
        assert!(sessions
            .slot(&origin(MAX_SESSION_ORIGINS), || true)
            .is_some());
        let again = sessions.slot(&origin(0), || true);
        match (&dialling, &again) {
            (Some(a), Some(b)) => assert!(Arc::ptr_eq(a, b), "the held slot stayed"),
            other => panic!("{other:?}"),
        }
        drop((dialling, again));
        for n in 0..MAX_SESSION_ORIGINS * 3 {
            assert!(sessions.slot(&origin(n), || true).is_some());
            assert!(sessions.origins() <= MAX_SESSION_ORIGINS);
        }
    }
}
