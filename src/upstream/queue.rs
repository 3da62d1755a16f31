//! The line requests wait in when every backend of an upstream is at its
//! `max_conns`, as HAProxy queues a request when every server is at its
//! `maxconn` (nginx's `max_conns` has a queue only in NGINX Plus; the
//! open-source one answers 502 at once).
//!
//! The line is an explicit list, served in order: a slot freed under its
//! cap wakes the first request in line, which picks again; it leaves the
//! line when it has a slot (or gives up), and wakes the next. One that
//! comes while others wait joins the line behind them rather than taking
//! the slot freed for the first, and a first that finds no room after all
//! (a retry took the slot) keeps its place (review44b M2: with a
//! `tokio::sync::Notify`, each wake-up that found no room sent its waiter
//! to the back). Room can also come with no slot freed (a backend's
//! ejection over, one found up by its checks): every request in line
//! looks for it every [`RECHECK`], and wakes the first if it finds some.
//!
//! The line is the upstream's, across reloads: the requests a reload left
//! waiting are woken by the slots every generation frees, and served
//! first (review44d M1: with a line per generation they were woken by
//! their own generation's slots alone, and under load were overtaken
//! until their `queue_timeout`). They pick among the backends of their
//! own generation, though: one that is woken and finds no room there
//! passes the wake-up on to the next in line, which may be of a
//! generation with a backend the reload added, and a request that comes
//! waits behind those of its own generation only (review44c M2: held
//! behind requests that could not use the backend the reload added, it
//! waited for nothing).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// How often a waiting request looks for room though nothing woke it.
pub const RECHECK: Duration = Duration::from_millis(250);

/// What a look at an upstream's backends finds, without taking a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// A healthy backend has room.
    Free,
    /// Every healthy backend is at its `max_conns`.
    Full,
    /// None is healthy: the requests in line are to be told (a 503 of
    /// their own), or sent to the ejected ones (panic routing).
    NoneHealthy,
}

/// One upstream's line, shared by its generations.
#[derive(Debug)]
pub struct Queue {
    /// Each request in line's own wake-up, first in line first.
    line: Mutex<VecDeque<Entry>>,
    /// The newest generation's number (see [`Queue::next_generation`]).
    newest: AtomicU64,
    /// Requests in line: read as each slot frees, so only a line with
    /// someone in it costs a wake-up (and the lock).
    waiting: AtomicUsize,
    /// `portico_upstream_queued_requests`.
    gauge: prometheus::IntGauge,
}

/// A request in line: the generation of the upstream it picks in, and
/// its own wake-up.
#[derive(Debug)]
struct Entry {
    generation: u64,
    wake: Arc<Notify>,
}

impl Queue {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Queue {
            line: Mutex::new(VecDeque::new()),
            newest: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            gauge,
        }
    }

    /// The number of a new generation of the upstream (a reload's).
    pub fn next_generation(&self) -> u64 {
        self.newest.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Requests in line now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests of `generation` are in line: one of it that comes now
    /// joins them.
    pub fn busy_for(&self, generation: u64) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
            && self.lock().iter().any(|e| e.generation == generation)
    }

    /// A slot was freed under its cap: the first in line looks for room.
    /// (SeqCst, with [`Queue::join`]: either this sees the request that
    /// joins, or that request, which looks for room after joining, sees
    /// the slot free.)
    pub fn released(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.wake_first();
        }
    }

    /// Wakes the first in line (a wake-up it is not waiting for yet is
    /// kept for it).
    fn wake_first(&self) {
        if let Some(first) = self.lock().front() {
            first.wake.notify_one();
        }
    }

    /// Wakes the request in line after `me`.
    fn wake_after(&self, me: &Arc<Notify>) {
        let line = self.lock();
        if let Some(at) = line.iter().position(|e| Arc::ptr_eq(&e.wake, me)) {
            if let Some(next) = line.get(at + 1) {
                next.wake.notify_one();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits in line for `take` to find room (`None`: none yet; an error
    /// ends the wait, as no backend being up does), at most `timeout`
    /// (`None` then). The first in line (of its generation) looks at once,
    /// and each looks when woken; the others wait their turn. Every [`RECHECK`], one that
    /// finds `room` wakes the first in line rather than take it, and one
    /// that finds no backend healthy looks itself (review44a M1: without,
    /// the line waited its whole `queue_timeout` through an outage and
    /// was told "busy").
    ///
    /// `generation` is the upstream's whose backends `take` picks among:
    /// one of an earlier generation woken for nothing passes the wake-up
    /// on (see the module's doc).
    pub async fn wait<T, E>(
        &self,
        generation: u64,
        timeout: Duration,
        mut take: impl FnMut() -> Option<Result<T, E>>,
        room: impl Fn() -> Room,
    ) -> Option<Result<T, E>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (place, mut look) = self.join(generation);
        loop {
            if look {
                if let Some(taken) = take() {
                    // Leaving the line wakes the next (see `Place`).
                    return Some(taken);
                }
                if generation != self.newest.load(Ordering::Relaxed) {
                    self.wake_after(&place.wake);
                }
            }
            look = false;
            tokio::select! {
                // A wake-up that came between the look and here was kept.
                () = place.wake.notified() => look = true,
                () = tokio::time::sleep(RECHECK) => match room() {
                    Room::Free => self.wake_first(),
                    Room::NoneHealthy => look = true,
                    Room::Full => {}
                },
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Joins the end of the line until the returned place drops; says
    /// whether the request is the first of its generation in line (it
    /// looks at once: only requests a reload left waiting are ahead of
    /// it, if any, and a slot they cannot use would not wake it).
    fn join(&self, generation: u64) -> (Place<'_>, bool) {
        let wake = Arc::new(Notify::new());
        let mut line = self.lock();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let first = !line.iter().any(|e| e.generation == generation);
        line.push_back(Entry {
            generation,
            wake: wake.clone(),
        });
        drop(line);
        self.gauge.inc();
        (Place { queue: self, wake }, first)
    }
}

/// A request's place in line (see [`Queue::join`]). Leaving it, the first
/// wakes the next: to take the room left, if any, or a wake-up it was
/// given and did not live to take.
#[derive(Debug)]
struct Place<'a> {
    queue: &'a Queue,
    wake: Arc<Notify>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut line = self.queue.lock();
        let at = line.iter().position(|e| Arc::ptr_eq(&e.wake, &self.wake));
        if let Some(at) = at {
            line.remove(at);
        }
        self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
        if at == Some(0) {
            if let Some(next) = line.front() {
                next.wake.notify_one();
            }
        }
        drop(line);
        self.queue.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn queue() -> Arc<Queue> {
        let gauge = prometheus::IntGauge::new("queued", "queued").unwrap();
        let queue = Arc::new(Queue::new(gauge));
        // The waiters' generation, 1, is the newest.
        assert_eq!(queue.next_generation(), 1);
        queue
    }

    /// Five requests wait for one slot, freed five times: they take it in
    /// the order they came, though every one also looks at each recheck
    /// and the first is sometimes woken with no room (review44b M2: a
    /// waiter woken for nothing went to the back; 1..5 were served
    /// `[1, 2, 4, 5, 3]`).
    #[tokio::test(start_paused = true)]
    async fn the_line_is_served_in_order() {
        let queue = queue();
        let free = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for n in 0..5 {
            let (line, free, served) = (queue.clone(), free.clone(), served.clone());
            waiting.push(tokio::spawn(async move {
                let take = || {
                    free.swap(false, Ordering::SeqCst).then(|| {
                        served.lock().unwrap().push(n);
                        Ok::<_, ()>(())
                    })
                };
                let room = || Room::Full;
                line.wait(1, Duration::from_secs(60), take, room).await
            }));
            // In line before the next comes.
            while queue.len() < n + 1 {
                tokio::task::yield_now().await;
            }
        }
        for round in 0..5 {
            // A wake-up with no room: the first keeps its place.
            queue.released();
            tokio::time::sleep(RECHECK * 3).await;
            free.store(true, Ordering::SeqCst);
            queue.released();
            while served.lock().unwrap().len() < round + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for waiter in waiting {
            assert_eq!(waiter.await.unwrap(), Some(Ok(())));
        }
        assert_eq!(*served.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!(queue.len(), 0);
    }

    /// The first in line leaving with a wake-up it did not live to take
    /// passes it on: the next takes the slot it was woken for.
    #[tokio::test(start_paused = true)]
    async fn a_wake_up_the_first_does_not_live_to_take_goes_to_the_next() {
        let queue = queue();
        let free = Arc::new(AtomicBool::new(false));
        let waiter = |free: Arc<AtomicBool>| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let take = || {
                    free.swap(false, Ordering::SeqCst)
                        .then_some(Ok::<_, ()>(()))
                };
                queue
                    .wait(1, Duration::from_secs(60), take, || Room::Full)
                    .await
            })
        };
        let first = waiter(free.clone());
        while queue.len() < 1 {
            tokio::task::yield_now().await;
        }
        let second = waiter(free.clone());
        while queue.len() < 2 {
            tokio::task::yield_now().await;
        }
        // Woken, and gone (its client left) before it ran.
        free.store(true, Ordering::SeqCst);
        queue.released();
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert_eq!(second.await.unwrap(), Some(Ok(())));
        assert_eq!(queue.len(), 0);
    }
}
