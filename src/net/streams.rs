//! The streams open on a client connection, counted for its idle limit
//! (see `front::h2_idle`): a request from its arrival until its response
//! body is done.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The open-stream count of one client connection. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct OpenStreams(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    open: AtomicUsize,
    opened: AtomicU64,
}

impl OpenStreams {
    /// Counts one more stream open until the returned hold is dropped.
    pub fn open(&self) -> OpenStream {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    /// Streams open now.
    pub fn count(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    /// Streams ever opened (a request that came and went between two
    /// looks at [`OpenStreams::count`] shows here).
    pub fn opened(&self) -> u64 {
        self.0.opened.load(Ordering::Relaxed)
    }
}

/// A stream counted open until dropped.
#[derive(Debug)]
pub struct OpenStream(OpenStreams);

impl Drop for OpenStream {
    fn drop(&mut self) {
        (self.0).0.open.fetch_sub(1, Ordering::Relaxed);
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
        assert_eq!(streams.opened(), 2);
    }
}
