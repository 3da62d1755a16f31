//! Backend selection. Plain round-robin for now: a shared counter modulo the
//! backend count, lock-free on the request path.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The index of the next backend out of `count`, or `None` when there
    /// are none.
    pub fn pick(&self, count: usize) -> Option<usize> {
        if count == 0 {
            return None;
        }
        // Relaxed: only the spread matters, not ordering with other memory.
        Some(self.next.fetch_add(1, Ordering::Relaxed) % count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_through_every_backend() {
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..7).map(|_| rr.pick(3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(rr.pick(0), None);
    }
}
