//! The streams open on a client connection, counted for its idle limit
//! (see `front::h2_idle`): a request from its arrival until its response
//! body is done, and work that outlives its response (a WebSocket's
//! relay), which takes a hold of its own from the request's extensions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The open-stream count of one client connection. Cheap to clone; a
/// request of a connection that keeps one carries a clone in its
/// extensions.
#[derive(Debug, Clone, Default)]
pub struct OpenStreams(Arc<AtomicUsize>);

impl OpenStreams {
    /// Counts one more stream open until the returned hold is dropped.
    pub fn open(&self) -> OpenStream {
        self.0.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    /// Streams open now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A stream counted open until dropped.
#[derive(Debug)]
pub struct OpenStream(OpenStreams);

impl Drop for OpenStream {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_count_until_dropped() {
        let streams = OpenStreams::default();
        let one = streams.open();
        let two = streams.clone().open();
        assert_eq!(streams.count(), 2);
        drop(one);
        drop(two);
        assert_eq!(streams.count(), 0);
    }
}
