//! Giving freed heap memory back to the kernel once a burst is over.
//!
//! glibc keeps what a program frees for its next allocations and returns
//! pages to the kernel only from the top of the heap. After a burst of
//! connections the heap is full of such holes: 64 keep-alive clients
//! fetching 64 KiB bodies left ~8 MiB of freed but resident memory. nginx
//! and HAProxy keep their pools too; portico does a little better, the way
//! Go's scavenger or tcmalloc's release rate do: once a second it compares
//! the requests of the last second with the busiest second since it last
//! trimmed, and when traffic has fallen to a tenth of that it asks glibc
//! (`malloc_trim`) to release every free page. Under steady load it never
//! runs, so the pages the next requests need are not faulted in again.
//!
//! Parked connections (client ones in `server`, backend ones in
//! `upstream::pool`) report what hyper freed as they are parked
//! ([`freed`]); once half a MiB of that has built up it goes back to the
//! kernel at the next look, so thousands of idle keep-alive connections
//! shrink the process rather than leave holes in its heap. At most one
//! trim a second: clients that pause between requests have their
//! connections parked after each one, and `malloc_trim` walks every arena.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// How often the request rate is looked at.
const TICK: Duration = Duration::from_secs(1);

/// Below this many requests in a second nothing is worth trimming.
const BUSY: u64 = 100;

/// Bytes freed by parking connections since the last trim.
static FREED: AtomicUsize = AtomicUsize::new(0);

/// What hyper frees at least when a connection's task ends: its 8 KiB
/// write buffer and a read buffer of 8 KiB or more.
pub const HYPER_CONNECTION: usize = 16 * 1024;

/// Parking that frees this much has the heap trimmed at the next look.
const FREED_TO_TRIM: usize = 512 << 10;

/// Notes `bytes` freed by parking a connection (see [`watch`]).
pub fn freed(bytes: usize) {
    FREED.fetch_add(bytes, Ordering::Relaxed);
}

/// Whether the request rates seen so far say a burst just ended.
#[derive(Debug, Default)]
struct Watch {
    last_total: u64,
    peak: u64,
}

impl Watch {
    /// Takes the running total; true when it is time to trim.
    fn tick(&mut self, total: u64) -> bool {
        let rate = total.saturating_sub(self.last_total);
        self.last_total = total;
        self.peak = self.peak.max(rate);
        if self.peak >= BUSY && rate * 10 <= self.peak {
            // The next trim waits for the next burst.
            self.peak = 0;
            return true;
        }
        false
    }
}

/// Watches the rate of answered requests, trimming after each burst and
/// after half a MiB freed by parking, until aborted.
pub async fn watch(metrics: Arc<Metrics>) {
    let mut watch = Watch::default();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let burst_over = watch.tick(metrics.requests_answered());
        if burst_over || FREED.load(Ordering::Relaxed) >= FREED_TO_TRIM {
            FREED.store(0, Ordering::Relaxed);
            release_free_memory();
        }
    }
}

/// How much free memory glibc may keep at the top of its heap while
/// traffic flows. Its default, 128 KiB, has it give pages back and fault
/// them in again (2.4 us each on a VM) many times a second under a 64 KiB
/// load: 0.8 page faults per request, against 0.07 with 4 MiB. What is left
/// after a burst goes back through `malloc_trim` anyway. Setting it also
/// pins glibc's mmap threshold at its 128 KiB start: backend read buffers
/// (72 KiB at most) stay on the heap, bigger blocks are mapped.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 4 << 20;

/// Raises glibc's trim threshold for a long-running proxy, unless the
/// operator set one (`MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
        || tunables.contains("malloc.trim_threshold")
    {
        return;
    }
    // SAFETY: mallopt only sets a parameter under the arena lock.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Asks the allocator to give every free page back to the kernel now.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own
    // arenas under their locks; any thread may call it at any time.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released = released != 0, "returned free heap pages");
}

/// Other allocators (musl, macOS) return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_when_a_burst_falls_to_a_tenth() {
        let mut watch = Watch::default();
        let mut total = 0;
        let mut ticks = Vec::new();
        for rate in [0, 5000, 6000, 5500, 700, 500, 0, 0, 3000, 200, 0] {
            total += rate;
            ticks.push(watch.tick(total));
        }
        let trimmed: Vec<usize> = (0..ticks.len()).filter(|&i| ticks[i]).collect();
        // 500 is the first second at a tenth of the 6000 peak; 200 after
        // the second burst of 3000.
        assert_eq!(trimmed, [5, 9]);
    }

    #[test]
    fn never_trims_a_steady_or_quiet_process() {
        let mut watch = Watch::default();
        let mut total = 0;
        for rate in [0, 50, 99, 0, 20, 0, 4000, 4100, 3900, 4000, 3800] {
            total += rate;
            assert!(!watch.tick(total), "trimmed at rate {rate}");
        }
    }
}
