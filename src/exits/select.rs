//! Choosing an exit for traffic that no pin decides (cookie-less requests
//! and new identities): smooth weighted round-robin that skips exits that
//! are not healthy while a healthy one exists.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest weight an exit may have.
pub const MAX_WEIGHT: u32 = 1000;

/// A fixed weighted order of exit indexes and a shared cursor into it.
#[derive(Debug)]
pub struct Rotation {
    schedule: Vec<usize>,
    next: AtomicUsize,
}

impl Rotation {
    /// The smooth weighted round-robin order (nginx's algorithm) for these
    /// weights: exit `i` appears `weights[i]` times per cycle, spread out.
    pub fn new(weights: &[u32]) -> Rotation {
        let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            for (c, w) in current.iter_mut().zip(weights) {
                *c += i64::from(*w);
            }
            let Some((best, _)) = current
                .iter()
                .enumerate()
                .max_by_key(|(i, c)| (**c, -(*i as i64)))
            else {
                break;
            };
            current[best] -= total;
            schedule.push(best);
        }
        Rotation {
            schedule,
            next: AtomicUsize::new(0),
        }
    }

    /// One full cycle of exit indexes, starting at the next turn.
    pub fn cycle(&self) -> impl Iterator<Item = usize> + '_ {
        let len = self.schedule.len().max(1);
        // Relaxed: only the spread matters, not an order between threads.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.schedule.len()).map(move |i| self.schedule[(start + i) % len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_weights_cycle_in_order() {
        let r = Rotation::new(&[1, 1, 1]);
        let firsts: Vec<_> = (0..6).map(|_| r.cycle().next().unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weights_are_respected_and_spread() {
        let r = Rotation::new(&[3, 1]);
        let firsts: Vec<_> = (0..8).map(|_| r.cycle().next().unwrap()).collect();
        assert_eq!(firsts.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(firsts[..4], [0, 0, 1, 0]);
    }
}
