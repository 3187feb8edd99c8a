//! Choosing an exit for traffic that no pin decides: plain rotation.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Hands out indexes 0, 1, ..., n-1, 0, ... across all threads.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The next index below `len` (`len` must be positive).
    pub fn next(&self, len: usize) -> usize {
        // Relaxed is enough: only the spread matters, not an order between threads.
        self.next.fetch_add(1, Ordering::Relaxed) % len.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_through_all() {
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..6).map(|_| rr.next(3)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
