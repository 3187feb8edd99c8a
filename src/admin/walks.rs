//! Walks of the whole store, a few at a time.
//!
//! A listing (`/identities`, an eviction's search, the live page's
//! snapshot) builds the store's whole listing in memory, hundreds of
//! megabytes for a million identities, on the blocking pool, and with
//! Redis scans the namespace every replica shares. Admin requests are an
//! operator's, but a script that asks in a loop with a short timeout
//! would start a walk per request; and a walk runs to its end even when
//! its client has gone (the blocking pool cannot cancel it). So a walk
//! holds its place until it ends, not until its request does, and at most
//! [`WALKS_AT_ONCE`] run: the others wait their turn.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Most walks of the store at once.
pub const WALKS_AT_ONCE: usize = 2;

/// The places walks take (see the module docs).
#[derive(Debug)]
pub struct Walks(Arc<Semaphore>);

impl Default for Walks {
    fn default() -> Walks {
        Walks(Arc::new(Semaphore::new(WALKS_AT_ONCE)))
    }
}

impl Walks {
    /// Runs `walk` on the blocking pool once a place is free, holding the
    /// place until it returns (whether or not this future is still
    /// awaited). An error says why it did not run or end.
    pub async fn run<T: Send + 'static>(
        &self,
        walk: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let place = self
            .0
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "the admin endpoint is closing".to_owned())?;
        tokio::task::spawn_blocking(move || {
            let _place = place;
            walk()
        })
        .await
        .map_err(|e| format!("the store's walk failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// A walk whose request went away still holds its place until it
    /// ends: a client that asks and hangs up in a loop starts no more
    /// walks than the places.
    #[tokio::test]
    async fn a_walk_holds_its_place_until_it_ends_not_its_request() {
        let walks = Arc::new(Walks::default());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(std::sync::Mutex::new(released));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let blocked = |n: usize| {
            let (released, started_tx) = (released.clone(), started_tx.clone());
            move || {
                let _ = started_tx.send(n);
                let _ = released.lock().unwrap().recv();
                n
            }
        };
        // Asked, and abandoned once running: their walks go on.
        for n in 0..WALKS_AT_ONCE {
            let asking = tokio::spawn({
                let walks = walks.clone();
                let walk = blocked(n);
                async move { walks.run(walk).await }
            });
            assert_eq!(started.recv().await, Some(n));
            asking.abort();
        }
        // A third waits for a place.
        let third = tokio::spawn({
            let walks = walks.clone();
            let walk = blocked(WALKS_AT_ONCE);
            async move { walks.run(walk).await }
        });
        let waited = tokio::time::timeout(std::time::Duration::from_millis(300), started.recv());
        assert!(waited.await.is_err(), "a third walk ran beside two");
        // One of the first ends: the third runs.
        release.send(()).unwrap();
        assert_eq!(started.recv().await, Some(WALKS_AT_ONCE));
        release.send(()).unwrap();
        release.send(()).unwrap();
        assert_eq!(third.await.unwrap(), Ok(WALKS_AT_ONCE));
    }
}
