//! The client connections open, counted against `max_connections` (parked
//! ones reclaimed for new clients at the cap), and the checks of the
//! open-file limit and listen queue that go with the cap.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

/// The client connections open (tunnels included), counted against
/// `max_connections` and in `portico_connections_open`.
pub(super) struct Slots {
    /// Told when one closes, or a reload may have moved the cap.
    pub(super) freed: tokio::sync::Notify,
    /// Told, once for each place wanted, to close an idle (parked)
    /// keep-alive connection, the longest waiting first.
    pub(super) reclaim: tokio::sync::Notify,
    /// Connections parked (see [`park`](super::connection::park)).
    pub(super) parked: std::sync::atomic::AtomicUsize,
    /// `portico_connections_open`: the count itself, moved only here.
    pub(super) gauge: prometheus::IntGauge,
}

impl Slots {
    pub(super) fn new(gauge: prometheus::IntGauge) -> Self {
        Slots {
            freed: tokio::sync::Notify::new(),
            reclaim: tokio::sync::Notify::new(),
            parked: std::sync::atomic::AtomicUsize::new(0),
            gauge,
        }
    }

    /// For a connection accepted once there was [`Slots::room`]: at the
    /// cap, closes idle keep-alive connections, the one parked longest
    /// first, until there is a place for it, as nginx frees a reusable
    /// connection before it hands one out (idle ones held every place until
    /// `idle_timeout`, review33c L1). Closing first and taking the place
    /// after keeps the cap: taken first, a burst was let in on one idle
    /// connection's account many times over (49 open at a cap of 4,
    /// review33e F1). A cap lowered by a reload is reached so too.
    pub(super) async fn make_room(&self, cap: impl Fn() -> Option<usize>) {
        // One idle connection asked to close at a time, another only if
        // that one has not made room within a second: an HTTP/2 one takes
        // a round trip (and a client reading a response's end, longer),
        // and each connection parking meanwhile woke this loop to ask
        // again, so one client closed several (review34f M3).
        let mut asked: Option<tokio::time::Instant> = None;
        loop {
            let Some(max) = cap() else { return };
            let mut freed = std::pin::pin!(self.freed.notified());
            freed.as_mut().enable();
            if self.open() < max {
                return;
            }
            // None idle any more (it took a request meanwhile): wait, as
            // `room` does, for a close.
            let now = tokio::time::Instant::now();
            if self.parked.load(Ordering::Relaxed) > 0 && asked.is_none_or(|at| now >= at) {
                self.reclaim.notify_one();
                asked = Some(now + Duration::from_secs(1));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }

    /// The client connections open: what `portico_connections_open` shows.
    pub(super) fn open(&self) -> usize {
        usize::try_from(self.gauge.get()).unwrap_or(0)
    }

    /// What an idle connection woken by [`Slots::reclaim`] does: nothing
    /// for a wake left from a moment at the cap that has passed; if it was
    /// `used` meanwhile (a request came), pass the wake on to another idle
    /// connection; else close.
    pub(super) fn reclaimed(&self, cap: Option<usize>, used: impl FnOnce() -> bool) -> Reclaim {
        if cap.is_none_or(|max| self.open() < max) {
            Reclaim::Stale
        } else if used() {
            self.reclaim.notify_one();
            Reclaim::PassedOn
        } else {
            Reclaim::Close
        }
    }

    /// A connection between requests, parked, that could make room.
    pub(super) fn parked(self: &Arc<Self>) -> ParkedPlace {
        self.parked.fetch_add(1, Ordering::Relaxed);
        // A listener waiting at the cap may now take a client.
        self.freed.notify_waiters();
        ParkedPlace(self.clone())
    }

    /// A place, whatever the cap: for a connection accepted once there was
    /// room, or a tunnel, which takes over its connection's.
    pub(super) fn take(self: &Arc<Self>) -> OpenConnection {
        self.gauge.inc();
        OpenConnection(self.clone())
    }

    /// Resolves once fewer than `cap()` are open (no cap: at once), or an
    /// idle (parked) keep-alive connection could make room. The place is
    /// taken at the accept that follows ([`Slots::make_room`]), so with
    /// several listeners the cap may be passed by one for each listener
    /// beyond the first; a place held for a listener with no one knocking
    /// would have kept out the clients of the others.
    pub(super) async fn room(
        &self,
        cap: impl Fn() -> Option<usize>,
        queued: impl Fn() -> Option<u32>,
    ) {
        loop {
            let Some(max) = cap() else { return };
            // Listening before looking, so a close (or a park) in between
            // is not missed.
            let mut freed = std::pin::pin!(self.freed.notified());
            freed.as_mut().enable();
            if self.open() < max || self.parked.load(Ordering::Relaxed) > 0 {
                return;
            }
            // Said once clients wait, every 10 s while they do, with how
            // many wait in this listener's queue (nginx says so each time
            // it runs short); looked at each second.
            let waiting = queued();
            static FULL: crate::logging::Every = crate::logging::Every::new();
            if waiting != Some(0) && FULL.due(10).is_some() {
                tracing::warn!(
                    max_connections = max,
                    queued = waiting,
                    "server.max_connections client connections open; new ones wait in the listen queue"
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }
}

/// The open-file limit `max_connections` leaves no room in, if it does:
/// none for the backend connection each client connection may need (and
/// the pools, the listeners, the log), so the cap cannot keep clients from
/// the descriptors the backends need (review33d F6). `before_start` reads
/// the hard limit, which a start raises the soft one to (`portico check`,
/// review33e F7).
#[cfg(unix)]
pub fn open_file_limit_short(max_connections: u32, before_start: bool) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let have = if before_start {
        limit.rlim_max
    } else {
        limit.rlim_cur
    };
    let needs = 2 * u64::from(max_connections) + 64;
    (have != libc::RLIM_INFINITY && needs > have).then_some(have)
}

#[cfg(not(unix))]
pub fn open_file_limit_short(_: u32, _: bool) -> Option<u64> {
    None
}

/// What is said of [`open_file_limit_short`], at start, at a reload and
/// by `portico check`.
pub const OPEN_FILE_LIMIT_SHORT: &str = "server.max_connections leaves no room for backend connections in the open-file limit (each client connection may need one): raise the limit (ulimit -n, LimitNOFILE) to twice the cap and 64 more";

/// Warns, as nginx and HAProxy do, of a `max_connections` the open-file
/// limit cannot hold (see [`open_file_limit_short`]).
/// `at` is where the file sets it.
pub fn warn_past_open_file_limit(max_connections: u32, at: Option<String>) {
    if let Some(open_file_limit) = open_file_limit_short(max_connections, false) {
        tracing::warn!(
            at,
            max_connections,
            open_file_limit,
            "{OPEN_FILE_LIMIT_SHORT}"
        );
    }
}

/// The connections waiting in `listener`'s accept queue (Linux reports it
/// in a listening socket's `TCP_INFO`, as `ss -ltn` shows it in Recv-Q).
#[cfg(target_os = "linux")]
pub(super) fn listen_queue(listener: &TcpListener) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is as large as `len` says, and the call writes no more.
    let got = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // SAFETY: zeroed, then written by the kernel.
    (got == 0).then(|| unsafe { info.assume_init() }.tcpi_unacked)
}

#[cfg(not(target_os = "linux"))]
fn listen_queue(_: &TcpListener) -> Option<u32> {
    None
}

/// See [`Slots::reclaimed`].
pub(super) enum Reclaim {
    Stale,
    PassedOn,
    Close,
}

/// A parked connection counted in [`Slots`] while it is parked.
pub(super) struct ParkedPlace(Arc<Slots>);

impl Drop for ParkedPlace {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection's place in [`Slots`] for as long as it lives,
/// however its task ends.
pub(super) struct OpenConnection(Arc<Slots>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.gauge.dec();
        self.0.freed.notify_waiters();
    }
}
