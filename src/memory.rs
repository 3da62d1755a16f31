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
//! Memory can also pile up and be freed with few requests: thousands of
//! connections opened and closed, slow uploads and downloads, a cache
//! filled and purged. So the heap's slack is looked at too: the resident
//! size less what glibc has handed out, that is, free memory it keeps
//! resident. Grown by [`GROWN_TO_TRIM`] over what the last trim left (or
//! the least seen since) while fewer than [`BUSY`] requests a second
//! come, the heap is trimmed. After 3,000 idle connections closed, 33 MB
//! stayed resident until the next burst of requests (review32b F2).
//!
//! Parked connections (client ones in `server`, backend ones in
//! `upstream::pool`) report what hyper freed as they are parked
//! ([`freed`]); once half a MiB of that has built up it goes back to the
//! kernel at the next look with little traffic (under load the next
//! requests take it again, unless it reaches [`FREED_UNDER_LOAD`]), so
//! thousands of idle keep-alive connections
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

/// Parking that frees this much has the heap trimmed at the next look
/// with little traffic.
const FREED_TO_TRIM: usize = 512 << 10;

/// Parking that frees this much has it trimmed under load too: 10,000
/// keep-alive clients pausing between requests at a steady 150 a second
/// left ~160 MB resident that only a quiet second gave back (review36e),
/// and past this much the next requests will not take it all again. At
/// 32 parks a second that is a trim a minute, not one a second.
const FREED_UNDER_LOAD: usize = 32 << 20;

/// Notes `bytes` freed by parking a connection (see [`watch`]).
pub fn freed(bytes: usize) {
    FREED.fetch_add(bytes, Ordering::Relaxed);
}

/// Free but resident heap grown this much over what the last trim left,
/// with little traffic, has the heap trimmed.
const GROWN_TO_TRIM: u64 = 8 << 20;

/// Whether the request rates seen so far say a burst just ended, or the
/// heap's slack says memory was freed at a quiet time.
#[derive(Debug, Default)]
struct Watch {
    last_total: u64,
    peak: u64,
    /// The last rate seen (requests in the last tick).
    rate: u64,
    /// The slack right after the last trim, or the least seen since.
    rested: Option<u64>,
}

impl Watch {
    /// Takes the running total; true when it is time to trim.
    fn tick(&mut self, total: u64) -> bool {
        let rate = total.saturating_sub(self.last_total);
        self.last_total = total;
        self.rate = rate;
        self.peak = self.peak.max(rate);
        if self.peak >= BUSY && rate * 10 <= self.peak {
            // The next trim waits for the next burst.
            self.peak = 0;
            return true;
        }
        false
    }

    /// Takes the heap's slack (see [`slack`]); true when it has grown by
    /// [`GROWN_TO_TRIM`] while traffic is light. Under load it is left
    /// alone: the pages the next requests need would be faulted in again,
    /// and the burst's end trims anyway.
    fn slack(&mut self, slack: u64) -> bool {
        let rested = *self.rested.get_or_insert(slack);
        if slack < rested {
            self.rested = Some(slack);
            return false;
        }
        self.quiet() && slack - rested >= GROWN_TO_TRIM
    }

    /// Whether the last second's traffic was light enough to look at the
    /// heap's slack.
    fn quiet(&self) -> bool {
        self.rate < BUSY
    }

    /// The slack right after a trim: growth counts from here.
    fn trimmed(&mut self, slack: Option<u64>) {
        self.rested = slack;
    }

    /// One look: the running total of requests, the bytes parking freed
    /// since the last trim, and the heap's slack, read only when traffic
    /// is light. True when it is time to trim.
    fn due(&mut self, total: u64, freed: usize, slack: impl FnOnce() -> Option<u64>) -> bool {
        let burst_over = self.tick(total);
        // Under load what parking freed is taken again by the next
        // requests, as the slack is (review36c F1: steady keep-alive
        // clients pausing between requests trimmed every second).
        let quiet = self.quiet();
        let grown = quiet && slack().is_some_and(|slack| self.slack(slack));
        burst_over || grown || (quiet && freed >= FREED_TO_TRIM) || freed >= FREED_UNDER_LOAD
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
        // The slack is read only at a quiet time: `mallinfo2` walks every
        // arena's free lists under its lock (review32e L3).
        if crate::proxy::compress::spares_unused() {
            // Off the runtime's workers: each is unmapped.
            let _ = tokio::task::spawn_blocking(crate::proxy::compress::drop_spares).await;
        }
        let freed = FREED.load(Ordering::Relaxed);
        if watch.due(metrics.requests_answered(), freed, slack) {
            FREED.store(0, Ordering::Relaxed);
            // Off the runtime's workers: with a large heap a trim walks
            // and releases for milliseconds.
            // Encoders kept for the next compressed responses go too.
            let _ = tokio::task::spawn_blocking(|| {
                crate::proxy::compress::drop_spares();
                release_free_memory();
            })
            .await;
            watch.trimmed(if watch.quiet() { slack() } else { None });
        }
    }
}

/// The heap's slack: the resident size less what glibc has handed out
/// (`mallinfo2`'s in-use and mapped bytes). It holds the code and the
/// stacks as well, a constant, and free heap memory still resident, which
/// a trim gives back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn slack() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant; mallinfo2 takes no
    // pointers and reads glibc's arenas under their locks.
    let (page, info) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::mallinfo2()) };
    let resident = pages * u64::try_from(page).ok()?;
    let used = info.uordblks as u64 + info.hblkhd as u64;
    Some(resident.saturating_sub(used))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn slack() -> Option<u64> {
    None
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
    fn trims_memory_freed_at_a_quiet_time_once() {
        const MIB: u64 = 1 << 20;
        let mut watch = Watch::default();
        let mut trims = Vec::new();
        // (requests in the second, slack MiB): connections pile up with
        // few requests (the slack stays), then close (it grows); later
        // the same under load.
        let seconds = [
            (0, 3),
            (5, 4),
            (5, 4),
            (0, 60),
            (0, 3),
            (0, 6),
            (4000, 30),
            (4000, 45),
            (4000, 45),
        ];
        let mut total = 0;
        for (i, (rate, slack)) in seconds.into_iter().enumerate() {
            total += rate;
            let trim = watch.tick(total) | watch.slack(slack * MIB);
            if trim {
                trims.push(i);
                // The trim gives back all but 3 MiB.
                watch.trimmed(Some(3 * MIB));
            }
        }
        // At 60 MiB once; not at 6 after, nor under load.
        assert_eq!(trims, [3]);
    }

    /// Connections parked under steady load free memory the next
    /// requests take again: no trim until traffic is light (review36c F1).
    #[test]
    fn memory_freed_by_parking_is_trimmed_only_once_traffic_is_light() {
        let mut watch = Watch::default();
        let mut total = 0;
        let mut trims = Vec::new();
        // A steady 5000 a second: what parking freed waits, unless it
        // is a lot.
        for (i, rate) in [5000, 5000, 5000, 4000].into_iter().enumerate() {
            total += rate;
            if watch.due(total, 2 * FREED_TO_TRIM, || None) {
                trims.push(i);
            }
        }
        assert_eq!(trims, [] as [usize; 0]);
        total += 5000;
        assert!(
            watch.due(total, FREED_UNDER_LOAD, || None),
            "32 MiB freed under load"
        );
        // Then a steady 60 (never a burst: its peak is under BUSY).
        let (mut watch, mut total) = (Watch::default(), 0);
        for (i, rate) in [60, 60, 60].into_iter().enumerate() {
            total += rate;
            if watch.due(total, 2 * FREED_TO_TRIM, || None) {
                trims.push(i);
            }
        }
        assert_eq!(trims, [0, 1, 2], "parking freed 1 MiB each second");
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
