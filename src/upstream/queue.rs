//! The line requests wait in when every backend of an upstream is at its
//! `max_conns`, as HAProxy queues a request when every server is at its
//! `maxconn` (nginx's `max_conns` has a queue only in NGINX Plus; the
//! open-source one answers 502 at once).
//!
//! A slot freed on a capped backend wakes the first request in line, which
//! picks again; one that comes while others wait joins the line behind
//! them rather than taking the slot from under them, so the line is
//! served in order. Room can also come with no slot freed (a backend's
//! ejection over, one found up by its checks): each waiting request
//! looks for it every [`RECHECK`], and wakes the first in line if it finds
//! some.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// How often a waiting request looks for room though nothing woke it.
pub const RECHECK: Duration = Duration::from_millis(250);

/// One upstream's line, shared by its generations (a reload's requests
/// and those it left running free the same backends' slots).
#[derive(Debug)]
pub struct Queue {
    wake: Notify,
    /// Requests in line. Read by every release of a capped backend's slot,
    /// so only a line with someone in it costs a wake-up.
    waiting: AtomicUsize,
    /// `portico_upstream_queued_requests`.
    gauge: prometheus::IntGauge,
}

impl Queue {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Queue {
            wake: Notify::new(),
            waiting: AtomicUsize::new(0),
            gauge,
        }
    }

    /// Requests in line now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Someone is in line: a request that comes now joins it.
    pub fn busy(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// A slot of a capped backend was freed: the first in line looks for
    /// room. (SeqCst, with [`Queue::join`]: either this sees the request
    /// that joins, or that request, which looks for room after joining,
    /// sees the slot free.)
    pub fn released(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.wake.notify_one();
        }
    }

    /// Waits in line for `take` to find room (`None`: none yet; an error
    /// ends the wait, as no backend being up does), at most `timeout`
    /// (`None` then). A request first in line looks at once; one behind
    /// others waits to be woken, so it does not take the slot freed for
    /// the first. One that takes a slot wakes the next in line if `room`
    /// is left. Every [`RECHECK`], one that finds `room` wakes the first
    /// in line rather than take it.
    pub async fn wait<T, E>(
        &self,
        timeout: Duration,
        mut take: impl FnMut() -> Option<Result<T, E>>,
        room: impl Fn() -> bool,
    ) -> Option<Result<T, E>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (_place, first) = self.join();
        // Registered before each look, so a slot freed between the look
        // and the wait still wakes this request; kept across rechecks, so
        // its place in line is too. A wake-up it does not live to take is
        // passed on to the next in line by tokio.
        let woken = self.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let mut look = first;
        loop {
            if look {
                if let Some(taken) = take() {
                    if taken.is_ok() && self.waiting.load(Ordering::SeqCst) > 1 && room() {
                        self.wake.notify_one();
                    }
                    return Some(taken);
                }
            }
            look = false;
            tokio::select! {
                () = &mut woken => {
                    woken.set(self.wake.notified());
                    woken.as_mut().enable();
                    look = true;
                }
                () = tokio::time::sleep(RECHECK) => {
                    if room() {
                        self.wake.notify_one();
                    }
                }
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Joins the line until the returned place drops; says whether the
    /// request is first in line.
    fn join(&self) -> (Place<'_>, bool) {
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        self.gauge.inc();
        (Place { queue: self }, ahead == 0)
    }
}

/// A request's place in line (see [`Queue::join`]).
#[derive(Debug)]
struct Place<'a> {
    queue: &'a Queue,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
        self.queue.gauge.dec();
    }
}
