//! Background tasks: ones that live exactly as long as what owns them, and
//! the cache's reads of bodies no client waits for any more, capped; and
//! [`WhenWoken`], for a future that shares its task with a busier one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// A spawned task that is aborted when this handle is dropped: the limiter's
/// cleanup, an upstream's health checker, the server's trimmer and admin
/// listener end with their owner, however the owner ends.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    pub fn new(task: tokio::task::JoinHandle<()>) -> Self {
        AbortOnDrop(task)
    }

    /// For watching the task from outside (tests).
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.0.abort_handle()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Bodies read for the cache at most at once with no client attached: the
/// body of a HEAD fetched as a GET, the rest of a body being stored whose
/// client left or whose range miss has its range (`proxy::body::read_ahead`,
/// and `Ahead`'s drop for one handed back past the read-ahead budget), a
/// body without a length read whole for a range (`GoesOn`). Each may hold
/// up to `max_object_size` and a backend connection, and a client can
/// start one per cold URL with a one-byte range and leave.
const BACKGROUND_READS: usize = 32;

static READING: std::sync::LazyLock<Arc<Places>> = std::sync::LazyLock::new(Arc::default);

/// A count of places taken, and a wake-up for whoever waits for none to
/// be ([`Places::settled`]).
#[derive(Debug, Default)]
pub struct Places {
    taken: AtomicUsize,
    emptied: tokio::sync::Notify,
}

impl Places {
    /// A place, unless all `max` are taken.
    pub fn try_take(self: &Arc<Self>, max: usize) -> Option<Place> {
        let place = Place(self.clone());
        (self.taken.fetch_add(1, Ordering::AcqRel) < max).then_some(place)
    }

    /// How many are taken now.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }

    /// Once no place is taken.
    pub async fn settled(&self) {
        loop {
            let emptied = self.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            // Listening before looking, so a place given back in between
            // still wakes this.
            emptied.as_mut().enable();
            if self.taken() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

/// One of at most `max` places of a [`Places`], given back when dropped,
/// however what holds it ends (runtime shutdown too), or if it never
/// began.
#[derive(Debug)]
pub struct Place(Arc<Places>);

impl Drop for Place {
    fn drop(&mut self) {
        if self.0.taken.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_waiters();
        }
    }
}

/// A place among the [`BACKGROUND_READS`], taken before a fetch that will
/// need one (a HEAD fetched as a GET), so that a burst of such fetches
/// cannot all pass a check and then find no room for their bodies.
#[derive(Debug)]
pub struct ReadPermit {
    /// Held for its drop.
    _place: Place,
}

impl ReadPermit {
    /// A place, unless all are taken.
    pub fn try_take() -> Option<ReadPermit> {
        READING
            .try_take(BACKGROUND_READS)
            .map(|_place| ReadPermit { _place })
    }

    /// Whether a place is free now (it may be gone when asked for).
    pub fn any_free() -> bool {
        READING.taken() < BACKGROUND_READS
    }
}

/// Spawns `read`, a body being read into the cache, unless
/// `BACKGROUND_READS` (32) are under way: then it is dropped, and with it the
/// copy (nothing is stored, and the next request for the URL fetches
/// again).
pub fn spawn_background_read(read: impl std::future::Future<Output = ()> + Send + 'static) {
    let Some(permit) = ReadPermit::try_take() else {
        tracing::debug!(
            "{BACKGROUND_READS} bodies are being read for the cache already; one more dropped"
        );
        return;
    };
    spawn_permitted_read(permit, read);
}

/// Spawns `read` in the place `permit` holds.
pub fn spawn_permitted_read(
    permit: ReadPermit,
    read: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let _permit = permit;
        read_at_most(read).await;
    });
}

/// A read for the cache that a request waits on for a while: dropped
/// before its end (the wait over, or the request's client gone and the
/// request's future with it), it goes on as a background read, so the
/// copy is not lost with the request (review39c F2: a range miss without
/// a length, its client gone during the wait, was fetched again).
pub struct GoesOn<F: Future<Output = ()> + Send + 'static>(Option<Pin<Box<F>>>);

impl<F: Future<Output = ()> + Send + 'static> GoesOn<F> {
    pub fn new(read: F) -> Self {
        GoesOn(Some(Box::pin(read)))
    }
}

impl<F: Future<Output = ()> + Send + 'static> Future for GoesOn<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(read) = self.0.as_mut() else {
            return Poll::Ready(());
        };
        std::task::ready!(read.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(())
    }
}

impl<F: Future<Output = ()> + Send + 'static> Drop for GoesOn<F> {
    fn drop(&mut self) {
        if let Some(read) = self.0.take() {
            spawn_background_read(read);
        }
    }
}

/// Longest a body is read for the cache with no client attached: a
/// backend that trickles one frame per `body_timeout` would otherwise hold
/// a place, a backend connection and a least-conn slot without end. At
/// `max_object_size`'s default (8 MiB) that is 140 KB/s, slower than any
/// backend worth caching from.
const BACKGROUND_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `read`, given up (the copy dropped, nothing stored) after
/// [`BACKGROUND_LIMIT`].
pub async fn read_at_most(read: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(BACKGROUND_LIMIT, read).await.is_err() {
        tracing::debug!(limit = ?BACKGROUND_LIMIT, "a body read for the cache took too long; dropped");
    }
}

/// A future polled only when it asked to be: on its first poll, and after
/// a waker it was given has fired. A client connection's task runs hyper's
/// connection and, beside it in one `select!`, its watchdog and the
/// shutdown signal; the task wakes for every read and write, and polling
/// the timer and the watch channel each time cost ~700 instructions per
/// request (callgrind), where this costs a waker check and a flag. A
/// backend connection's task keeps its response-head watch the same way.
pub struct WhenWoken<F> {
    inner: F,
    flag: Arc<Flag>,
}

/// Set by the inner future's waker; holds the task's waker to pass it on.
#[derive(Default)]
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> WhenWoken<F> {
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag::default());
        flag.woken.store(true, Ordering::Relaxed);
        WhenWoken { inner, flag }
    }
}

impl<F: Future + Unpin> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake in between is seen
        // now, and one after it wakes this task.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.flag.clone());
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::test_support::Counted;

    /// Polls `done` until it holds, for at most five seconds.
    async fn until(done: impl Fn() -> bool) -> bool {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        waited.await.is_ok()
    }

    #[tokio::test]
    async fn background_reads_are_capped() {
        let (release, held) = tokio::sync::watch::channel(());
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..BACKGROUND_READS + 5 {
            let (started, mut held) = (started.clone(), held.clone());
            spawn_background_read(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = held.changed().await;
            });
        }
        assert!(until(|| started.load(Ordering::SeqCst) == BACKGROUND_READS).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(started.load(Ordering::SeqCst), BACKGROUND_READS);
        // Once they end, there is room again.
        drop(release);
        assert!(until(|| READING.taken() == 0).await);
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        spawn_background_read(async move {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        assert!(until(|| ran.load(Ordering::SeqCst) == 1).await);
    }

    /// `settled` is over at once with no place taken, and once the last
    /// one taken is given back; a place refused past `max` is none.
    #[tokio::test]
    async fn places_settle_when_the_last_is_given_back() {
        let places = Arc::new(Places::default());
        let soon = Duration::from_millis(50);
        assert!(tokio::time::timeout(soon, places.settled()).await.is_ok());
        let first = places.try_take(2).expect("a first place");
        let second = places.try_take(2).expect("a second place");
        assert!(places.try_take(2).is_none());
        assert_eq!(places.taken(), 2);
        let waiting = tokio::spawn({
            let places = places.clone();
            async move { places.settled().await }
        });
        drop(first);
        tokio::time::sleep(soon).await;
        assert!(!waiting.is_finished());
        drop(second);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .is_ok());
    }

    #[test]
    fn when_woken_polls_its_future_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let inner_waker: Arc<Mutex<Option<Waker>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let inner = {
            let (polls, inner_waker, done) = (polls.clone(), inner_waker.clone(), done.clone());
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                *inner_waker.lock().unwrap() = Some(cx.waker().clone());
                if done.load(Ordering::SeqCst) {
                    Poll::Ready(7)
                } else {
                    Poll::Pending
                }
            })
        };
        let mut future = WhenWoken::new(inner);
        let task = Arc::new(Counted::default());
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);

        // The first poll reaches the future.
        assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // The task woken by something else (hyper's socket, say): not again.
        for _ in 0..3 {
            assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Its own waker fired: the task is woken, and the next poll reaches it.
        done.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert_eq!(Pin::new(&mut future).poll(&mut cx), Poll::Ready(7));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
