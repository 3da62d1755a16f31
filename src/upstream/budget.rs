//! The retry budget: retries may add at most a fixed share of an
//! upstream's requests over a sliding window (plus a small floor so a quiet
//! upstream can still retry), so retries cannot multiply an outage the way
//! unbounded retries do. Lock-free: per-second buckets of atomic counters.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Seconds covered by the window.
const WINDOW: usize = 10;
/// Retries allowed per window whatever the traffic: 10 a second, as
/// Linkerd's and Finagle's budgets allow. 10 a window left a burst that
/// met one dead backend with 502s while the others were free (review33b F3).
const FLOOR: u64 = 100;

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

#[derive(Debug)]
pub struct RetryBudget {
    /// Allowed retries per request, in percent.
    percent: u64,
    buckets: [Bucket; WINDOW],
}

impl RetryBudget {
    pub fn new(percent: u64) -> Self {
        RetryBudget {
            percent,
            buckets: Default::default(),
        }
    }

    /// The bucket for `second`, emptied first if it still holds an older
    /// second. Two threads may race on the reset and lose a count or two;
    /// the budget is an estimate, not an invariant.
    fn bucket(&self, second: u64) -> &Bucket {
        let bucket = &self.buckets[(second % WINDOW as u64) as usize];
        let seen = bucket.second.load(Ordering::Relaxed);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    /// Counts a first attempt.
    pub fn record_request(&self, second: u64) {
        self.bucket(second).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_retry(&self, second: u64) -> bool {
        let (mut requests, mut retries) = (0u64, 0u64);
        for bucket in &self.buckets {
            let s = bucket.second.load(Ordering::Relaxed);
            if s + (WINDOW as u64) > second && s <= second {
                requests += u64::from(bucket.requests.load(Ordering::Relaxed));
                retries += u64::from(bucket.retries.load(Ordering::Relaxed));
            }
        }
        if retries >= FLOOR + requests * self.percent / 100 {
            return false;
        }
        self.bucket(second).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_the_share_plus_the_floor() {
        let budget = RetryBudget::new(20);
        for _ in 0..100 {
            budget.record_request(1_000);
        }
        let allowed = (0..500).filter(|_| budget.try_retry(1_000)).count();
        assert_eq!(allowed, FLOOR as usize + 20);
    }

    #[test]
    fn the_window_slides() {
        let budget = RetryBudget::new(20);
        let used = (0..500).filter(|_| budget.try_retry(5)).count();
        assert_eq!(used, FLOOR as usize);
        assert!(!budget.try_retry(5 + WINDOW as u64 - 1));
        // Ten seconds on, the old retries have left the window.
        assert!(budget.try_retry(5 + WINDOW as u64));
    }
}
