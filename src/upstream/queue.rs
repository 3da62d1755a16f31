//! The line requests wait in when every backend of an upstream is at its
//! `max_conns`, as HAProxy queues a request when every server is at its
//! `maxconn` (nginx's `max_conns` has a queue only in NGINX Plus; the
//! open-source one answers 502 at once).
//!
//! The line is an explicit list, served in order: a slot freed under its
//! cap wakes the first request in line, which picks again and leaves the
//! line when it has a slot (or gives up). One that comes while others
//! wait joins the line behind them rather than taking the slot freed for
//! the first, and a first that finds no room after all (a retry took the
//! slot) keeps its place (review44b M2: with a
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
//! own generation, though, so a slot freed wakes the first request in
//! line whose generation has that backend, and a request that comes waits
//! behind those of its own generation only (review44c M2: held behind
//! requests that could not use the backend the reload added, it waited
//! for nothing; review44e M1: waking each of them in turn to find that
//! out cost the added backend 60% of its requests behind 200 of them).
//!
//! Each request in line is woken once for one slot: two slots freed
//! together wake two requests, and one that leaves the line with a
//! wake-up it did not use passes it to the next that can use it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
    line: Mutex<Line>,
    /// The newest generation's number (see [`Queue::next_generation`]).
    newest: AtomicU64,
    /// Requests in line: read as each slot frees, so only a line with
    /// someone in it costs a wake-up (and the lock).
    waiting: AtomicUsize,
    /// `portico_upstream_queued_requests`.
    gauge: prometheus::IntGauge,
}

#[derive(Debug, Default)]
struct Line {
    /// First in line first.
    entries: VecDeque<Entry>,
    /// Requests in line by generation.
    per_generation: HashMap<u64, usize>,
}

/// A request in line.
#[derive(Debug)]
struct Entry {
    /// The generation of the upstream it picks in, and that generation's
    /// backends, sorted.
    generation: u64,
    backends: Arc<[SocketAddr]>,
    wake: Arc<Notify>,
    /// Woken, and not looked yet (passed over by the next wake-up): what
    /// for, to pass on a wake-up it leaves unused.
    woken: Option<For>,
}

/// Whom a wake-up is for.
#[derive(Debug, Clone, Copy)]
enum For {
    /// A slot freed on this backend: a request whose generation has it.
    Slot(SocketAddr),
    /// Room a request of this generation found.
    Generation(u64),
}

impl Line {
    /// Wakes the first request from `from` on not woken yet that the
    /// wake-up is for.
    fn wake(&mut self, from: usize, wanted: For) {
        let fits = |e: &Entry| match wanted {
            For::Slot(addr) => e.backends.binary_search(&addr).is_ok(),
            For::Generation(generation) => e.generation == generation,
        };
        if let Some(entry) = self
            .entries
            .iter_mut()
            .skip(from)
            .find(|e| e.woken.is_none() && fits(e))
        {
            entry.woken = Some(wanted);
            entry.wake.notify_one();
        }
    }

    fn position(&self, wake: &Arc<Notify>) -> Option<usize> {
        self.entries.iter().position(|e| Arc::ptr_eq(&e.wake, wake))
    }
}

impl Queue {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Queue {
            line: Mutex::new(Line::default()),
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
            && self.lock().per_generation.get(&generation) > Some(&0)
    }

    /// A slot of backend `addr` was freed under its cap: the first in line
    /// that can use it looks for room. (SeqCst, with [`Queue::join`]:
    /// either this sees the request that joins, or that request, which
    /// looks for room after joining, sees the slot free.)
    pub fn released(&self, addr: SocketAddr) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.lock().wake(0, For::Slot(addr));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits in line for `take` to find room (`None`: none yet; an error
    /// ends the wait, as no backend being up does), at most `timeout`
    /// (`None` then). `generation` is the upstream's whose `backends`
    /// (sorted) `take` picks among. The first in line of its generation
    /// looks at once, and each looks when woken; the others wait their
    /// turn. Every [`RECHECK`], one that finds `room` wakes the first of
    /// its generation rather than take it, and one that finds no backend
    /// healthy looks itself (review44a M1: without, the line waited its
    /// whole `queue_timeout` through an outage and was told "busy").
    pub async fn wait<T, E>(
        &self,
        generation: u64,
        backends: Arc<[SocketAddr]>,
        timeout: Duration,
        mut take: impl FnMut() -> Option<Result<T, E>>,
        room: impl Fn() -> Room,
    ) -> Option<Result<T, E>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut place, mut look) = self.join(generation, backends);
        loop {
            if look {
                let mut taken = take();
                // Woken for a slot another took (a retry), or one of a
                // backend its generation lists and cannot pick now: to be
                // woken again, and a look for one freed while it was
                // marked woken, which passed it over.
                if taken.is_none() {
                    if let Some(wanted) = place.ready_again() {
                        taken = take();
                        // A request a reload left waiting passes it on to
                        // one that may pick that backend (review44f M1: a
                        // slot waited for the next recheck). Not one of the
                        // newest generation: woken for a slot a retry
                        // took, each in line would wake the next for
                        // nothing.
                        if taken.is_none() && generation != self.newest.load(Ordering::Relaxed) {
                            place.pass_on(wanted);
                        }
                    }
                }
                if taken.is_some() {
                    place.settled = true;
                    return taken;
                }
            }
            look = false;
            tokio::select! {
                // A wake-up that came between the look and here was kept.
                () = place.wake.notified() => look = true,
                () = tokio::time::sleep(RECHECK) => match room() {
                    Room::Free => self.lock().wake(0, For::Generation(generation)),
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
    fn join(&self, generation: u64, backends: Arc<[SocketAddr]>) -> (Place<'_>, bool) {
        let wake = Arc::new(Notify::new());
        let mut line = self.lock();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let ahead = line.per_generation.entry(generation).or_insert(0);
        let first = *ahead == 0;
        *ahead += 1;
        line.entries.push_back(Entry {
            generation,
            backends,
            wake: wake.clone(),
            woken: None,
        });
        drop(line);
        self.gauge.inc();
        let place = Place {
            queue: self,
            wake,
            settled: false,
        };
        (place, first)
    }
}

/// A request's place in line (see [`Queue::join`]). One that leaves it
/// with a wake-up it did not use (its client left, its time ran out)
/// passes the wake-up on.
#[derive(Debug)]
struct Place<'a> {
    queue: &'a Queue,
    wake: Arc<Notify>,
    /// It took a slot: its wake-up was used.
    settled: bool,
}

impl Place<'_> {
    /// Marks it not woken, to be woken again; says what it was woken
    /// for, if it was.
    fn ready_again(&self) -> Option<For> {
        let mut line = self.queue.lock();
        let at = line.position(&self.wake)?;
        line.entries[at].woken.take()
    }

    /// Passes a wake-up it could not use to the next in line it is for.
    fn pass_on(&self, wanted: For) {
        let mut line = self.queue.lock();
        if let Some(at) = line.position(&self.wake) {
            line.wake(at + 1, wanted);
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut line = self.queue.lock();
        if let Some(at) = line.position(&self.wake) {
            let entry = line.entries.remove(at).expect("a position in the line");
            if let Some(n) = line.per_generation.get_mut(&entry.generation) {
                *n -= 1;
                if *n == 0 {
                    line.per_generation.remove(&entry.generation);
                }
            }
            if let Some(wanted) = entry.woken.filter(|_| !self.settled) {
                line.wake(at, wanted);
            }
        }
        self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
        drop(line);
        self.queue.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const BACKEND: &str = "127.0.0.1:1";

    fn backends() -> Arc<[SocketAddr]> {
        Arc::from([BACKEND.parse().unwrap()])
    }

    fn released(queue: &Queue) {
        queue.released(BACKEND.parse().unwrap());
    }

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
                line.wait(1, backends(), Duration::from_secs(60), take, room)
                    .await
            }));
            // In line before the next comes.
            while queue.len() < n + 1 {
                tokio::task::yield_now().await;
            }
        }
        for round in 0..5 {
            // A wake-up with no room: the first keeps its place.
            released(&queue);
            tokio::time::sleep(RECHECK * 3).await;
            free.store(true, Ordering::SeqCst);
            released(&queue);
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

    /// A slot freed on a backend only a request further back can use (its
    /// generation, a reload's, added it) wakes that request, not each one
    /// before it in turn (review44e M1: the added backend lost 60% of its
    /// requests behind 200 of them).
    #[tokio::test(start_paused = true)]
    async fn a_slot_wakes_the_first_request_that_can_use_it() {
        let queue = queue();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let looks = Arc::new(AtomicUsize::new(0));
        let free_b = Arc::new(AtomicBool::new(false));
        let waiter = |generation: u64, backends: Vec<SocketAddr>| {
            let (queue, looks, free_b) = (queue.clone(), looks.clone(), free_b.clone());
            let uses_b = backends.contains(&b);
            tokio::spawn(async move {
                let take = || {
                    looks.fetch_add(1, Ordering::SeqCst);
                    (uses_b && free_b.swap(false, Ordering::SeqCst)).then_some(Ok::<_, ()>(()))
                };
                let backends = Arc::from(backends);
                queue
                    .wait(generation, backends, Duration::from_secs(60), take, || {
                        Room::Full
                    })
                    .await
            })
        };
        let mut earlier = Vec::new();
        for n in 1..=3 {
            earlier.push(waiter(1, vec![a]));
            while queue.len() < n {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(queue.next_generation(), 2);
        let later = waiter(2, vec![a, b]);
        while queue.len() < 4 {
            tokio::task::yield_now().await;
        }
        // The first of each generation looked as it joined.
        assert_eq!(looks.load(Ordering::SeqCst), 2);
        free_b.store(true, Ordering::SeqCst);
        queue.released(b);
        assert_eq!(later.await.unwrap(), Some(Ok(())));
        assert_eq!(looks.load(Ordering::SeqCst), 3);
        for waiter in earlier {
            waiter.abort();
        }
    }

    /// A request a reload left waiting, woken for a slot of a backend its
    /// generation lists but cannot pick now, passes the wake-up on to one
    /// that can, at once rather than at the next recheck (review44f M1).
    #[tokio::test(start_paused = true)]
    async fn a_wake_up_an_older_request_cannot_use_goes_on_at_once() {
        let queue = queue();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let free_b = Arc::new(AtomicBool::new(false));
        let waiter = |generation: u64, picks_b: bool| {
            let (queue, free_b) = (queue.clone(), free_b.clone());
            tokio::spawn(async move {
                let take =
                    || (picks_b && free_b.swap(false, Ordering::SeqCst)).then_some(Ok::<_, ()>(()));
                let backends: Arc<[SocketAddr]> = Arc::from([b]);
                queue
                    .wait(generation, backends, Duration::from_secs(60), take, || {
                        Room::Full
                    })
                    .await
            })
        };
        // Listed, and not picked (drained or down in that generation).
        let earlier: Vec<_> = (0..3).map(|_| waiter(1, false)).collect();
        while queue.len() < 3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(queue.next_generation(), 2);
        let later = waiter(2, true);
        while queue.len() < 4 {
            tokio::task::yield_now().await;
        }
        let start = tokio::time::Instant::now();
        free_b.store(true, Ordering::SeqCst);
        queue.released(b);
        assert_eq!(later.await.unwrap(), Some(Ok(())));
        // The paused clock moves only when every task waits: no recheck.
        assert!(start.elapsed() < RECHECK);
        for waiter in earlier {
            waiter.abort();
        }
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
                    .wait(1, backends(), Duration::from_secs(60), take, || Room::Full)
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
        released(&queue);
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert_eq!(second.await.unwrap(), Some(Ok(())));
        assert_eq!(queue.len(), 0);
    }
}
