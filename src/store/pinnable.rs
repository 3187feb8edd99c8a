//! Which cookie names the store takes new pins of: those the configuration
//! in force tracks (and, during a reload that keys some names otherwise,
//! not those while requests of the configuration before still run).
//!
//! A reload that stops tracking a name, or keys it otherwise (an exact
//! name respelt), is refused while the store holds pins of it
//! (`daemon::untracked`), since the new configuration would not find them
//! and those cookies would leave through any exit. That check walks the
//! store, and requests begun before the reload go on with the old
//! configuration until they end: one of them that pins such a cookie after
//! the walk (its answer's `Set-Cookie`, say) would leave a pin nothing
//! enforces. So the names the new configuration finds are given to the
//! store before the walk, and a pin write of a cookie name they do not
//! cover is refused, naming the cookie: the request fails closed, and its
//! retry is read by the new configuration. A gate lets the reload wait out
//! the writes admitted under the old names before it walks again.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::{RwLock, RwLockReadGuard};

use super::{StoreError, StoreErrorKind};
use crate::credential::{PinKey, PinKind};
use crate::identity::Pin;

/// Whether a cookie name may be pinned.
pub type NameTest = dyn Fn(&str) -> bool + Send + Sync;

/// The cookie names new pins may be made of, and the gate between pin
/// writes and a change of them.
#[derive(Default)]
pub struct PinnableNames {
    /// `None` until the daemon says (every name: a store used by the
    /// command-line tools, which pin nothing).
    test: ArcSwapOption<Box<NameTest>>,
    /// Held shared by every pin write from its check to its end, and
    /// taken whole by [`PinnableNames::set`] after it changes the test.
    gate: RwLock<()>,
}

impl std::fmt::Debug for PinnableNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnableNames")
            .field("set", &self.test.load().is_some())
            .finish_non_exhaustive()
    }
}

impl PinnableNames {
    /// Makes `test` the one new pins are judged by, and returns once every
    /// write admitted by the one before has ended: a walk of the store
    /// after this sees every pin the old names let in. Returns the test it
    /// replaced.
    pub async fn set(&self, test: Option<Arc<Box<NameTest>>>) -> Option<Arc<Box<NameTest>>> {
        let before = self.swap(test);
        self.wait_out().await;
        before
    }

    /// Makes `test` the one new pins are judged by, at once; returns the
    /// one it replaced.
    pub fn swap(&self, test: Option<Arc<Box<NameTest>>>) -> Option<Arc<Box<NameTest>>> {
        self.test.swap(test)
    }

    /// Returns once every pin write admitted before the call has ended
    /// (writes wait meanwhile: the lock is fair).
    pub async fn wait_out(&self) {
        drop(self.gate.write().await);
    }

    /// Admits a write of `pins`: a guard to hold until the write has
    /// ended, or the refusal of the first cookie whose name is no longer
    /// tracked.
    pub async fn admit<'p>(
        &self,
        pins: impl IntoIterator<Item = (&'p PinKey, &'p Pin)>,
    ) -> Result<RwLockReadGuard<'_, ()>, StoreError> {
        let guard = self.gate.read().await;
        if let Some(test) = self.test.load().as_deref() {
            let dropped = pins
                .into_iter()
                .find(|(_, pin)| pin.kind == PinKind::Cookie && !test(&pin.name));
            if let Some((key, pin)) = dropped {
                return Err(StoreError::new(
                    StoreErrorKind::Untracked,
                    format!(
                        "cookie {}#{key}: a reload that drops its name from track_cookies, or \
                         keys it otherwise, began while this request was on its way",
                        pin.name
                    ),
                ));
            }
        }
        Ok(guard)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::credential::{Credential, PinHasher};
    use crate::identity::IdentityId;

    fn pin(name: &str, kind: PinKind) -> (PinKey, Pin) {
        let key = PinHasher::new([3; 32]).cookie(name, "v");
        let credential = Credential {
            kind,
            name: name.into(),
            key,
        };
        (key, Pin::new(IdentityId(9), &credential, 1, None))
    }

    fn one((key, pin): &(PinKey, Pin)) -> [(&PinKey, &Pin); 1] {
        [(key, pin)]
    }

    fn only(names: &'static [&'static str]) -> Option<Arc<Box<NameTest>>> {
        Some(Arc::new(Box::new(move |name: &str| names.contains(&name))))
    }

    #[tokio::test]
    async fn only_names_in_force_are_pinned() {
        let names = PinnableNames::default();
        assert!(names
            .admit(one(&pin("anything", PinKind::Cookie)))
            .await
            .is_ok());
        names.set(only(&["datadome"])).await;
        assert!(names
            .admit(one(&pin("datadome", PinKind::Cookie)))
            .await
            .is_ok());
        let refused = names
            .admit(
                [
                    pin("datadome", PinKind::Cookie),
                    pin("sess", PinKind::Cookie),
                ]
                .iter()
                .map(|(key, pin)| (key, pin)),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.kind, StoreErrorKind::Untracked);
        assert!(refused.detail.contains("sess#"), "{refused}");
        // A session key is the client's, whatever cookies are tracked.
        assert!(names
            .admit(one(&pin("session-key", PinKind::SessionKey)))
            .await
            .is_ok());
    }

    /// A change of names waits out the writes admitted before it, so the
    /// walk after it sees their pins.
    #[tokio::test]
    async fn a_change_waits_for_the_writes_admitted_before_it() {
        let names = Arc::new(PinnableNames::default());
        let writing = names
            .admit(one(&pin("sess", PinKind::Cookie)))
            .await
            .unwrap();
        let changing = tokio::spawn({
            let names = names.clone();
            async move { names.set(only(&["datadome"])).await }
        });
        tokio::task::yield_now().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
            assert!(!changing.is_finished(), "the change waits for the write");
        }
        drop(writing);
        let before = tokio::time::timeout(std::time::Duration::from_secs(5), changing)
            .await
            .unwrap()
            .unwrap();
        assert!(before.is_none());
        assert!(names
            .admit(one(&pin("sess", PinKind::Cookie)))
            .await
            .is_err());
    }
}
