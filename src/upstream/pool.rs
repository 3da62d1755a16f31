//! Keep-alive connections to an upstream's backends, one idle stack per
//! backend. A connection goes back on its stack the moment its response
//! body has been read to the end (nothing to spawn, no key to hash), and
//! the most recently used one is taken first so the warm ones stay warm
//! and the rest age out. A connection whose response was not read to the
//! end is closed, as HTTP/1.1 leaves no other way to reuse it.
//!
//! A connection left idle for [`PARK_AFTER`] is parked: hyper's task for it
//! ends and hands the socket back, and only the socket stays in the pool.
//! hyper keeps a connection's read buffer at its high-water mark (up to
//! `UPSTREAM_READ_BUFFER`, 72 KiB) plus an 8 KiB write buffer for as long
//! as the task runs, so 64 pooled connections that once carried large
//! bodies held ~5 MiB doing nothing; nginx likewise frees an upstream
//! connection's buffers once its request is done and caches only the
//! socket. Taking a parked socket up again costs a new hyper connection
//! object, not a TCP or TLS handshake, so parking is cheap enough to do
//! after a second; a socket the backend closed meanwhile is found with a
//! non-blocking read before it is used.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Parts, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tower::Service;

use crate::proxy::body::{Outgoing, RequestBody, UploadWatch, WriteAhead, SMALL_READ};
use crate::task::WhenWoken;

/// How long an idle connection keeps hyper's task and buffers before it is
/// parked as a bare socket.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Why a request got no response head from its connection.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, timed out, TLS handshake).
    Connect(BoxError),
    /// The connection broke before a whole response head arrived.
    Http(hyper::Error),
    /// As `Http`, on a connection the backend reset while the request was
    /// being written to it (see [`Watched`]): the reset is the clue, as
    /// hyper reports only the end of the read that followed.
    Reset(hyper::Error),
    /// No response head within `response_timeout`: the connection's task
    /// gave up on it and closed the connection (see [`HeadWait`]).
    HeadTimeout,
    /// As `Http`, on a connection taken idle from the pool that ended
    /// (closed or reset) before any response head: the backend closed it
    /// as it was reused, its keep-alive over, the request on its way, when
    /// it comes quickly (see `forward_with_retries`). With whether the
    /// backend reset it under the request, as `Reset` says.
    Stale(hyper::Error, bool),
}

/// Whether `error`, from a request sent on a reused connection, is the
/// connection ending under it: the close (or the reset of a socket closed
/// with the request unread) of a backend whose keep-alive ran out.
fn ended_under(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // `UnexpectedEof`: a TLS backend closing without close_notify
            // (review37e L1).
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = e.source();
    }
    false
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A backend socket, plain or TLS.
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// One upstream's connections.
pub(super) struct Pool {
    connector: HttpsConnector<HttpConnector>,
    builder: http1::Builder,
    /// `http://host:port` or `https://...` of each backend, for the connector.
    targets: Vec<http::Uri>,
    idle: Vec<Mutex<Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Bounds making a connection, TLS handshake included.
    connect_timeout: Duration,
    /// How long a request sent with [`Pool::send`]'s `watched` waits for
    /// its response head.
    response_timeout: Duration,
    /// How long a backend may leave an upload it answered unread.
    body_timeout: Duration,
    /// Each backend's `portico_backend_connections_opened_total`.
    opened: Vec<prometheus::IntCounter>,
    /// Each backend's clock for the warning of bytes no request asked
    /// for: a backend whose every response runs over its length would
    /// say it once per request.
    overrun_said: Vec<Arc<crate::logging::Every>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("targets", &self.targets)
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

/// A request's body as it goes to a backend: small chunks the client has
/// ready together are joined, as a response's are (see [`Outgoing`]). An
/// upload of one-byte chunks went on as one write each: 117,000 writes for
/// 100,000 bytes, and four such clients cut an unrelated route's
/// throughput by nine tenths (review32b F3).
type Upload = Outgoing;

/// A connection hyper is serving.
struct Conn {
    sender: SendRequest<Upload>,
    /// Where hyper's task hands the socket back once `sender` is dropped.
    /// `None` on a connection run for an upgrade, which hyper cannot give
    /// back and which is never pooled.
    handed_back: Option<oneshot::Receiver<Box<Io>>>,
    /// How long it may wait idle for its next request: the upstream's
    /// `idle_timeout`, or less if the backend announced a shorter one.
    /// `None` until a response on it has been looked at; each one that
    /// announces a timeout sets it anew.
    keep_for: Option<Duration>,
    /// What the connection's task watches for a late response head. `None`
    /// on a connection run for an upgrade: its caller times it.
    head: Option<Arc<HeadWait>>,
}

struct Idle {
    state: Held,
    since: Instant,
    /// [`Conn::keep_for`]: idle this long, it is closed.
    keep_for: Duration,
}

/// What the pool holds of an idle connection.
enum Held {
    Live {
        sender: SendRequest<Upload>,
        handed_back: oneshot::Receiver<Box<Io>>,
        head: Arc<HeadWait>,
    },
    /// The sender is dropped; hyper's task is finishing and will hand the
    /// socket back.
    Parking(oneshot::Receiver<Box<Io>>),
    /// Only the socket, boxed: a TLS one is large, and idle entries are
    /// moved on every checkout and return.
    Parked(Box<Io>),
}

/// What a checkout found.
enum Taken {
    Live(Conn),
    /// Parked a moment ago; the socket comes once hyper's task has ended.
    Parking(oneshot::Receiver<Box<Io>>),
    Parked(Box<Io>),
}

impl Conn {
    /// Starts the response-head clock of the request about to be sent:
    /// its number, or `None` on a connection without a watch.
    fn start_wait(&self) -> Option<u64> {
        let head = self.head.as_ref()?;
        let n = head.sent.fetch_add(1, Ordering::Relaxed) + 1;
        head.waiting.store(n, Ordering::Release);
        Some(n)
    }

    /// Says whether a request waits for its head, for [`Watched`].
    fn heading(&self, waits: bool) {
        if let Some(head) = &self.head {
            if waits {
                head.head_bytes.store(0, Ordering::Relaxed);
                head.small_reads.store(false, Ordering::Relaxed);
            }
            head.heading.store(waits, Ordering::Relaxed);
        }
    }

    /// Stops the clock of wait `n` as its head arrived; false if the
    /// connection's task gave up on it first.
    fn end_wait(&self, n: u64) -> bool {
        self.head.as_ref().is_none_or(|head| {
            head.waiting
                .compare_exchange(n, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// Whether the backend reset the connection under a request's upload.
    fn reset(&self) -> bool {
        self.head
            .as_ref()
            .is_some_and(|head| head.gone.load(Ordering::Relaxed))
    }

    /// Whether the connection's task gave up on the head of its request.
    fn timed_out(&self) -> bool {
        self.head
            .as_ref()
            .is_some_and(|head| head.waiting.load(Ordering::Acquire) == TIMED_OUT)
    }
}

/// `response_timeout` for the requests of one connection, kept by the
/// connection's own task with a stepped timer ([`HeadWait::late`]) instead
/// of a timer armed and cancelled for every request, which cost ~700
/// instructions of a 1 KiB pass-through request (callgrind). A request's
/// wait is numbered; the task looks every step (an eighth of the timeout,
/// 10 ms at least) and gives up on a wait it has seen under way for the
/// whole timeout, so never early, and at most one step (plus the timer's
/// millisecond) late.
#[derive(Debug, Default)]
struct HeadWait {
    /// Requests sent on the connection, numbering their waits.
    sent: AtomicU64,
    /// The wait under way: 0 for none, [`TIMED_OUT`] once given up on.
    waiting: AtomicU64,
    /// A response on the connection did not end cleanly: its body was let
    /// go before its end (its client left), or its head never came whole:
    /// what hyper had read of it is no stray bytes.
    cut: std::sync::atomic::AtomicBool,
    /// A request is waiting for its response head (watched or not), and
    /// the bytes read since it was sent (see [`Watched`]).
    heading: std::sync::atomic::AtomicBool,
    head_bytes: AtomicU64,
    /// The backend reset the connection under an upload (see [`Watched`]):
    /// its writes go nowhere, so it is never reused.
    gone: std::sync::atomic::AtomicBool,
    /// The last write found the socket full; and a read or write went
    /// through since the connection's task last looked: an upload the
    /// backend stopped reading, with nothing else moving (see
    /// [`HeadWait::late`]). Plain stores on the connection's own path,
    /// not counters: a count per read and write cost every request.
    write_blocked: std::sync::atomic::AtomicBool,
    moved: std::sync::atomic::AtomicBool,
    /// A read went through since the response body's stall guard last
    /// looked (see [`UpstreamBody::read_lately`]); a plain store per read.
    read: std::sync::atomic::AtomicBool,
    /// The client's upload, still coming when its answer came (see
    /// [`HeadWait::late`]); `answered` says the answer has gone out whole.
    /// Set once: such a connection is not reused.
    answered_upload: std::sync::OnceLock<UploadWatch>,
    answered: tokio::sync::Notify,
    /// The response's client takes its body slower than the backend sends
    /// it (see [`UpstreamBody::slow_client`]): reads stop at
    /// [`SMALL_READ`] until the next request.
    small_reads: std::sync::atomic::AtomicBool,
    /// What uploads have handed hyper and it has not written to the
    /// backend yet (see [`WriteAhead`]).
    write_ahead: Arc<WriteAhead>,
}

/// How long a backend that has answered in full may take nothing of the
/// rest of an upload before it is let go (see [`HeadWait::late`]), when
/// `body_timeout` is longer: 2 s cut backends that set something up
/// before reading the rest (review35f 2).
const ANSWERED_STALL: Duration = Duration::from_secs(10);

/// How many 5 ms looks a finished connection with bytes left over gives
/// its response's reader to say the body broke (see [`Pool::serve`]).
const CUT_SETTLE_STEPS: usize = 20;

/// How much of a health check's answer is read before the connection is
/// closed: the status decides, the body is only let finish.
const CHECK_BODY_READ: u64 = 1 << 20;

/// How long a health check's body is waited for, apart from its status.
const CHECK_BODY_WAIT: Duration = Duration::from_secs(2);

/// What a backend may send while a request waits for its response head
/// (the head, interim responses, what follows the head in the same read)
/// before the connection is given up: a final head is at most 72 KiB,
/// and a `102 Processing` a second for an hour is 90 KB.
const HEAD_BYTES: u64 = 1 << 20;

/// A backend socket that counts what is read while a request waits for
/// its head. hyper skips interim (1xx) responses in a loop within one
/// poll, so a backend streaming `100 Continue` forever kept the thread
/// busy parsing them: the request's `response_timeout` came 3x late or
/// not at all and every other request on the thread starved (review30a
/// F3). Past [`HEAD_BYTES`] the read fails, and the request with it.
///
/// It also lets a backend refuse an upload: one that answers from the
/// head alone (415, 401, 404) and closes without reading the body has its
/// kernel reset the connection, and hyper's next body write failed and was
/// reported in place of the head the backend had sent (review32f F1, a
/// third of such uploads). A write that meets the reset while the request
/// waits for its head is taken as written, and so is all that follows:
/// hyper reads on and relays the answer if one came, or fails the request
/// on the read as it would have on the write. The rest of the upload goes
/// nowhere, as it would have had the backend read and dropped it.
struct Watched {
    io: Io,
    head: Arc<HeadWait>,
}

impl Watched {
    /// The backend reset the connection under a request's upload.
    fn write_gone(&self) -> bool {
        self.head.gone.load(Ordering::Relaxed)
    }

    /// `written` as it came, or all of `len` taken, if the backend reset
    /// the connection under a request that waits for its head.
    fn written(&self, written: std::io::Result<usize>, len: usize) -> std::io::Result<usize> {
        use std::io::ErrorKind;
        match written {
            Err(e)
                if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
                    && self.head.heading.load(Ordering::Relaxed) =>
            {
                self.head.gone.store(true, Ordering::Relaxed);
                Ok(len)
            }
            other => other,
        }
    }
}

/// Why [`Watched`] failed a read: the backend sent [`HEAD_BYTES`] without
/// a final response head.
#[derive(Debug)]
pub struct EndlessInterim;

impl EndlessInterim {
    pub const TEXT: &'static str =
        "over 1 MiB without a final response head (interim 1xx responses without end)";
}

impl std::fmt::Display for EndlessInterim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::TEXT)
    }
}

impl std::error::Error for EndlessInterim {}

impl hyper::rt::Read for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // As hyper-util's TokioIo reads: into the cursor's spare room,
        // then the cursor moved on by what was read.
        let n = {
            // SAFETY: the ReadBuf only writes initialised bytes into the
            // cursor's memory, and reports how many.
            let room = unsafe { buf.as_mut() };
            let room = if self.head.small_reads.load(Ordering::Relaxed) {
                let len = room.len().min(SMALL_READ);
                &mut room[..len]
            } else {
                room
            };
            let mut read = hyper::rt::ReadBuf::uninit(room);
            match Pin::new(&mut self.io).poll_read(cx, read.unfilled()) {
                Poll::Ready(Ok(())) => read.filled().len(),
                other => return other,
            }
        };
        self.head.moved.store(true, Ordering::Relaxed);
        self.head.read.store(true, Ordering::Relaxed);
        if self.head.heading.load(Ordering::Relaxed) {
            let read = self.head.head_bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if read > HEAD_BYTES {
                // What hyper had read is no stray bytes after a response.
                self.head.cut.store(true, Ordering::Relaxed);
                return Poll::Ready(Err(std::io::Error::other(EndlessInterim)));
            }
        }
        // SAFETY: `n` bytes were just written into the cursor's memory.
        unsafe { buf.advance(n) };
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.write_gone() {
            return Poll::Ready(Ok(buf.len()));
        }
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.head.wrote(&written);
        Poll::Ready(self.written(ready!(written), buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.write_gone() {
            return Poll::Ready(Ok(len));
        }
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.head.wrote(&written);
        Poll::Ready(self.written(ready!(written), len))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.head.write_ahead.queue_written();
        if self.write_gone() {
            return Poll::Ready(Ok(()));
        }
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        self.head.wrote(&flushed);
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

const TIMED_OUT: u64 = u64::MAX;

impl HeadWait {
    /// After a write (or a flush) to the backend: progress, or a full
    /// socket.
    fn wrote<T>(&self, result: &Poll<T>) {
        if result.is_ready() {
            self.moved.store(true, Ordering::Relaxed);
            if self.write_blocked.load(Ordering::Relaxed) {
                self.write_blocked.store(false, Ordering::Relaxed);
            }
        } else {
            self.write_blocked.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves once one wait for a head has lasted `limit`, having marked
    /// it [`TIMED_OUT`] ([`Late::Head`]), or once the backend has taken
    /// nothing of an upload for `stall` after its answer came
    /// ([`Late::Upload`]): a backend answering early (RFC 9112 §9.3 says
    /// it must then read the rest, or close) that did neither held the
    /// connection, and what hyper had queued of the upload, until it
    /// closed it itself, ten minutes in review34a F3. Before the head,
    /// the request's own wait bounds such a stall (`after_upload`).
    ///
    /// Once the answer has gone out whole, [`ANSWERED_STALL`] of that is
    /// enough ([`Late::Answered`]): the client, which has its answer,
    /// waited `body_timeout` to be let go (30 s for an HTTP/1 client
    /// writing its whole body before it reads; an HTTP/2 one's stream
    /// window stayed shut, review34g L1, review35d 3). A backend still
    /// taking the upload, at any pace, gets all of it (review35d 1: cut at
    /// the answer's end, an HTTP/2 upload reached the backend truncated).
    ///
    /// The backend takes the upload when a write to its socket goes
    /// through, or, its socket full, when what is queued to it shrinks
    /// (`unsent`, read each step while writes wait): the kernel wakes a
    /// writer only once half the queue has gone, which for a backend
    /// reading under ~650 KB/s took over 2 s, and a backend reading the
    /// whole time was cut as stalled (review35f 1).
    async fn late(
        &self,
        limit: Duration,
        stall: Duration,
        unsent: impl Fn() -> Option<u64>,
    ) -> Late {
        let mut step = watch_step(limit, stall);
        let mut stall = stall;
        let mut answered = false;
        let mut seen = 0;
        let mut since = tokio::time::Instant::now();
        let mut wake = since + step;
        let mut stuck = since;
        let mut queued: Option<u64> = None;
        loop {
            tokio::select! {
                biased;
                () = self.answered.notified(), if !answered => {
                    answered = true;
                    stall = stall.min(ANSWERED_STALL);
                    step = step.min(ANSWERED_STALL / 8);
                    wake = wake.min(tokio::time::Instant::now() + step);
                    continue;
                }
                () = tokio::time::sleep_until(wake) => {}
            }
            // The clock read, not the steps counted: steps that each wake a
            // little late add up (2.26 s for a 2 s timeout, review11).
            let at = tokio::time::Instant::now();
            // A response still coming is no stall: a backend may read
            // the rest of an upload once it has answered (review34f M2).
            let moved = self.moved.swap(false, Ordering::Relaxed);
            let blocked = self.write_blocked.load(Ordering::Relaxed);
            // Only while writes wait: one syscall a step, not a request.
            let now_queued = if blocked { unsent() } else { None };
            let drained = matches!((queued, now_queued), (Some(before), Some(now)) if now < before);
            queued = now_queued;
            if moved || drained || !blocked || self.heading.load(Ordering::Relaxed) {
                stuck = at;
            } else if at >= stuck + stall {
                return if answered {
                    Late::Answered
                } else {
                    Late::Upload
                };
            }
            let now = self.waiting.load(Ordering::Acquire);
            if now == 0 || now != seen {
                // A wait that began since the last look counts from here.
                (seen, since, wake) = (now, at, at + step);
                continue;
            }
            if at >= since + limit {
                if self
                    .waiting
                    .compare_exchange(now, TIMED_OUT, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Late::Head;
                }
                continue;
            }
            // The last look lands on the timeout itself, not a step past it.
            wake = (at + step).min(since + limit);
        }
    }
}

/// How often a backend connection's task looks at its waits (see
/// [`HeadWait::late`]): an eighth of the shorter timeout, 10 ms at least.
fn watch_step(limit: Duration, stall: Duration) -> Duration {
    (limit.min(stall) / 8).max(Duration::from_millis(10))
}

/// The longest a request waits for its head before the backend
/// connection's task gives up on it: `response_timeout` and one
/// [`watch_step`], as the task counts a wait from its first look at it,
/// a step after the send on a new connection (review51 M1).
pub fn latest_head_timeout(response_timeout: Duration, body_timeout: Duration) -> Duration {
    response_timeout + watch_step(response_timeout, body_timeout)
}

/// Why a backend connection's task gave up on it (see [`HeadWait::late`]).
enum Late {
    Head,
    Upload,
    /// The answer went out whole, and the backend then stopped taking
    /// the upload (see [`HeadWait::late`]).
    Answered,
}

impl Pool {
    /// The pool of `config`'s backends (`targets`), with its limits and
    /// timeouts.
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        builder: http1::Builder,
        targets: Vec<http::Uri>,
        opened: Vec<prometheus::IntCounter>,
        config: &crate::config::Upstream,
    ) -> Arc<Self> {
        let pool = Arc::new(Pool {
            opened,
            overrun_said: targets.iter().map(|_| Arc::default()).collect(),
            idle: targets.iter().map(|_| Mutex::new(Vec::new())).collect(),
            connector,
            builder,
            targets,
            max_idle: config.max_idle_per_backend,
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            body_timeout: config.body_timeout,
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// Sends `request` (origin-form target, Host set) to backend `index` on
    /// an idle connection, or a new one (always, when `fresh`). A request
    /// the connection closed under before taking it goes out on a fresh
    /// connection instead. hyper hands an upgraded socket over only from a
    /// connection run for upgrades, and such a one cannot be parked: an
    /// `upgrade` request gets a connection of its own.
    ///
    /// When `watched`, the connection's task bounds the wait for the
    /// response head by `response_timeout` ([`HeadWait`]); otherwise the
    /// caller does (an upload's wait counts from its end, and a connection
    /// run for an upgrade has no such watch).
    ///
    /// Not an `async fn`, for the reason `Proxy::handle` gives.
    #[allow(clippy::manual_async_fn)]
    #[inline(always)]
    pub(super) fn send(
        self: &Arc<Self>,
        index: usize,
        request: Request<RequestBody>,
        fresh: bool,
        upgrade: bool,
        watched: bool,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + '_ {
        // An upload the backend may answer before its end (see `wrap`).
        let upload = request.body().upload_watch();
        let mut request = request.map(Outgoing::new);
        async move {
            let taken = if fresh || upgrade {
                None
            } else {
                self.checkout(index)
            };
            // Taken idle: the backend may close it as the request goes.
            let taken_idle = taken.is_some();
            let mut conn = match taken {
                Some(Taken::Live(conn)) => conn,
                Some(Taken::Parking(handed_back)) => {
                    Box::pin(self.take_up(index, handed_back)).await?
                }
                Some(Taken::Parked(io)) => Box::pin(self.serve(index, *io, false)).await?,
                None => Box::pin(self.connect(index, upgrade)).await?,
            };
            let mut fresh_tried = false;
            loop {
                // The error's scope ends with this statement, so the future
                // holds none of it across the connect below.
                let waiting = if watched { conn.start_wait() } else { None };
                conn.heading(true);
                if let Some(head) = &conn.head {
                    request.body_mut().paced(head.write_ahead.clone());
                }
                // A write whose exchange may go on without its client
                // learns it is on its way (see `proxy::Sent`).
                if let Some(sent) = request.extensions().get::<crate::proxy::Sent>() {
                    sent.mark();
                }
                request = match conn.sender.try_send_request(request).await {
                    Ok(response) => {
                        conn.heading(false);
                        if waiting.is_none_or(|n| conn.end_wait(n)) {
                            return Ok(self.wrap(index, conn, response, upload.as_ref()));
                        }
                        // The task gave up just as the head came.
                        return Err(SendError::HeadTimeout);
                    }
                    Err(_) if waiting.is_some() && conn.timed_out() => {
                        return Err(SendError::HeadTimeout)
                    }
                    Err(mut error) => match error.take_message() {
                        // The backend closed this keep-alive connection as
                        // we took it: nothing was sent, so a new one is safe.
                        Some(unsent) if !fresh_tried => unsent,
                        _ if taken_idle && !fresh_tried && ended_under(error.error()) => {
                            return Err(SendError::Stale(error.into_error(), conn.reset()))
                        }
                        _ if conn.reset() => return Err(SendError::Reset(error.into_error())),
                        _ => return Err(SendError::Http(error.into_error())),
                    },
                };
                fresh_tried = true;
                conn = Box::pin(self.connect(index, upgrade)).await?;
            }
        }
    }

    /// Sends `request` on a connection made for it alone, reads the answer
    /// to its end and closes the connection: an active check. A pooled
    /// connection would hide a backend that takes no new ones (listener
    /// closed, accept queue full), so a check makes its own, TLS included,
    /// as HAProxy's and nginx Plus's do; a refused or timed-out connect
    /// fails it. The caller bounds the whole exchange.
    pub(super) async fn probe(
        &self,
        index: usize,
        request: Request<RequestBody>,
    ) -> Result<http::StatusCode, SendError> {
        let mut conn = self.dial(index, false).await?;
        // Bounded as a request's wait is (see `Watched`).
        conn.heading(true);
        let response = conn
            .sender
            .send_request(request.map(Outgoing::new))
            .await
            .map_err(SendError::Http)?;
        conn.heading(false);
        let status = response.status();
        // The status decides. The body is read on, apart, so the backend
        // finishes its answer before the connection closes with `conn`:
        // each piece let go as it comes (a health path that answers 64 MiB
        // held that much per backend, review31a F3), and past
        // CHECK_BODY_READ or CHECK_BODY_WAIT the rest is not waited for
        // (one trickled slower than the check's timeout failed it).
        let mut body = response.into_body();
        tokio::spawn(async move {
            let _closed_after = conn;
            crate::proxy::body::read_off(&mut body, CHECK_BODY_READ, CHECK_BODY_WAIT).await;
        });
        Ok(status)
    }

    /// How many connections to backend `index` wait in the pool, parked
    /// ones too (some may have aged out, until the reaper's next round).
    pub(super) fn idle_count(&self, index: usize) -> usize {
        self.idle[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The freshest usable idle connection to backend `index`. Never waits:
    /// a connection still finishing its last exchange (a backend that
    /// answered before reading the whole upload) goes back once it is done.
    fn checkout(self: &Arc<Self>, index: usize) -> Option<Taken> {
        loop {
            let idle = {
                let mut stack = self.idle[index]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let idle = stack.pop()?;
                if idle.since.elapsed() >= idle.keep_for {
                    retire(idle.state);
                    continue;
                }
                idle
            };
            let (mut sender, handed_back, head) = match idle.state {
                Held::Live {
                    sender,
                    handed_back,
                    head,
                } => (sender, handed_back, head),
                Held::Parking(handed_back) => match unpark(handed_back) {
                    Ok(Some(io)) => return Some(Taken::Parked(io)),
                    Ok(None) => continue,
                    Err(handed_back) => return Some(Taken::Parking(handed_back)),
                },
                Held::Parked(mut io) => {
                    if quiet(&mut io) {
                        return Some(Taken::Parked(io));
                    }
                    continue;
                }
            };
            let conn = move |sender| Conn {
                sender,
                handed_back: Some(handed_back),
                keep_for: Some(idle.keep_for),
                head: Some(head),
            };
            if sender.is_ready() {
                return Some(Taken::Live(conn(sender)));
            }
            if !sender.is_closed() {
                let pool = self.clone();
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        pool.put_back(index, conn(sender));
                    }
                });
            }
        }
    }

    /// A new connection to backend `index` for requests, counted in
    /// `portico_backend_connections_opened_total` when it is one the pool
    /// could keep: an upgrade's never goes back, and counted it made a
    /// WebSocket backend's keep-alive look broken (review56 L5).
    async fn connect(&self, index: usize, upgrade: bool) -> Result<Conn, SendError> {
        let conn = self.dial(index, upgrade).await?;
        if !upgrade {
            self.opened[index].inc();
        }
        Ok(conn)
    }

    /// A new connection to backend `index`, uncounted: an active check's.
    async fn dial(&self, index: usize, upgrade: bool) -> Result<Conn, SendError> {
        // The TCP connector has its own bound; this one also covers the TLS
        // handshake, which a backend can accept and then never answer.
        let connecting = self.connector.clone().call(self.targets[index].clone());
        let io = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(io) => io.map_err(SendError::Connect)?,
            Err(_) => {
                return Err(SendError::Connect(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect or TLS handshake timed out",
                ))))
            }
        };
        self.serve(index, io, upgrade).await
    }

    /// The socket of a connection parked a moment ago, served again once
    /// hyper's task hands it back (it ends as soon as it runs); a new
    /// connection if that socket is not fit to use.
    async fn take_up(
        &self,
        index: usize,
        handed_back: oneshot::Receiver<Box<Io>>,
    ) -> Result<Conn, SendError> {
        if let Ok(mut io) = handed_back.await {
            if quiet(&mut io) {
                return self.serve(index, *io, false).await;
            }
        }
        self.connect(index, false).await
    }

    /// Starts hyper's task for a new or parked socket to backend `index`.
    async fn serve(&self, index: usize, io: Io, upgrade: bool) -> Result<Conn, SendError> {
        #[cfg(unix)]
        let fd = std::os::fd::AsRawFd::as_raw_fd(tcp_of(&io));
        let head = Arc::new(HeadWait::default());
        let io = Watched {
            io,
            head: head.clone(),
        };
        let (sender, connection) = self
            .builder
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        if upgrade {
            tokio::spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "backend connection ended with error");
                }
            });
            return Ok(Conn {
                sender,
                handed_back: None,
                keep_for: None,
                head: None,
            });
        }
        let (hand_back, handed_back) = oneshot::channel();
        let watch = head.clone();
        let (limit, stall) = (self.response_timeout, self.body_timeout);
        let backend = self.targets[index].authority().cloned();
        let overrun_said = Arc::clone(&self.overrun_said[index]);
        tokio::spawn(async move {
            let served = {
                // Polled only when its timer fires, not at each read and
                // write of the connection.
                let late = std::pin::pin!(watch.late(limit, stall, || unsent(fd)));
                // Marked as a connection poll, as the client side's is:
                // an upload being gathered that yields knows hyper's
                // writing loop polling it again is not its next turn.
                let mut connection = std::pin::pin!(connection.without_shutdown());
                let served = std::future::poll_fn(|cx| {
                    crate::proxy::body::in_connection_poll(|| connection.as_mut().poll(cx))
                });
                tokio::select! {
                    biased;
                    served = served => served,
                    late = WhenWoken::new(late) => {
                        // Dropping the connection closes it, as nginx
                        // closes an upstream connection that timed out.
                        match late {
                            Late::Head => tracing::debug!("no response head within response_timeout; backend connection closed"),
                            // As nginx logs an upstream that timed out
                            // while it was sent the request (review34g
                            // L1: a debug line only). Dropping the upload
                            // with the connection tells the client to stop:
                            // an HTTP/2 stream is reset with NO_ERROR once
                            // its answer is out (h2 does so for a stream
                            // whose sending side is closed, RFC 9113 §8.1);
                            // an HTTP/1 client's rest is read and dropped as
                            // its connection closes (lingering close).
                            stalled @ (Late::Upload | Late::Answered) => {
                                let why = if matches!(stalled, Late::Answered) {
                                    "backend answered in full before reading the whole upload, then stopped taking it; upload cut and backend connection closed"
                                } else {
                                    "backend answered before reading the whole upload, then took nothing of the rest for body_timeout; backend connection closed"
                                };
                                tracing::warn!(
                                    backend = backend.as_ref().map(tracing::field::display),
                                    "{why}"
                                );
                                // Reset: what was queued for a backend that
                                // stopped reading goes nowhere. The
                                // connection, which owns the socket, is
                                // dropped only as this returns.
                                #[cfg(unix)]
                                reset_on_close(fd);
                            }
                        }
                        return;
                    }
                }
            };
            let (io, read_buf) = match served {
                // Reset under an upload it answered early: closed.
                Ok(_) if watch.gone.load(Ordering::Relaxed) => return,
                Ok(Parts {
                    io: Watched { io, .. },
                    read_buf,
                    ..
                }) => (io, read_buf),
                // hyper's word for bytes read while no response was due:
                // a body longer than its length, read with it or after it,
                // or anything sent on an idle connection (chaos55 L2: the
                // warning below never fired, this came first).
                Err(error) if unasked(&error) => {
                    overrun(&overrun_said, backend.as_ref(), None);
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, "backend connection ended with error");
                    return;
                }
            };
            // Bytes that no request asked for: the socket is not reused.
            // Otherwise hyper's read buffer goes now, not when the socket
            // is taken up again.
            let fit = read_buf.is_empty();
            // A response that never ended cleanly: its body let go, or its
            // head still awaited (too large, say). hyper's task ends only
            // once the request's side has its response or error, so a
            // head that came was marked as such before this looks.
            let mut unfinished =
                watch.cut.load(Ordering::Relaxed) || watch.heading.load(Ordering::Relaxed);
            // hyper's task ends as it hands a body's error on, maybe
            // before the body's reader takes it and marks the response
            // cut: give it a moment before blaming the backend's framing.
            for _ in 0..CUT_SETTLE_STEPS {
                if fit || unfinished {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                unfinished = watch.cut.load(Ordering::Relaxed);
            }
            if !fit && unfinished {
                tracing::debug!(
                    bytes = read_buf.len(),
                    "backend connection closed with the rest of a response that did not end cleanly"
                );
            } else if !fit {
                overrun(&overrun_said, backend.as_ref(), Some(read_buf.len()));
            }
            drop(read_buf);
            match fit.then(|| hand_back.send(Box::new(io))) {
                Some(Ok(())) => crate::memory::freed(crate::memory::HYPER_CONNECTION),
                // Closed, with the FIN hyper would have sent.
                Some(Err(io)) => close(*io).await,
                None => {}
            }
        });
        Ok(Conn {
            sender,
            handed_back: Some(handed_back),
            keep_for: None,
            head: Some(head),
        })
    }

    /// The response on `conn`, which goes back to the pool once its body
    /// is read, unless the exchange leaves it in doubt (see `reusable`).
    fn wrap(
        self: &Arc<Self>,
        index: usize,
        mut conn: Conn,
        response: Response<Incoming>,
        upload: Option<&UploadWatch>,
    ) -> Response<UpstreamBody> {
        // The backend's latest word on how long it keeps the connection:
        // one going away says `timeout=0` on its last responses, not the
        // first.
        let keep_for = match announced_keep_alive(response.headers()) {
            Some(announced) => announced.min(self.idle_timeout),
            None => conn.keep_for.unwrap_or(self.idle_timeout),
        };
        conn.keep_for = Some(keep_for);
        let headers = response.headers();
        // A 101 hands the connection over to the tunnel.
        let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        // Answered before the upload ended: a backend that does not read
        // the rest (RFC 9112 §9.3 says it must, or close) takes it for the
        // next request, and another client gets the answer to that. nginx
        // does not keep such a connection either; the upload goes on while
        // the backend takes it (see `HeadWait::late`).
        let mid_upload = upload.filter(|u| u.coming());
        // Both framings (RFC 9112 §6.3): the length hyper ignored may be the
        // one the backend meant, and then what is left on the wire is the
        // next client's "response".
        let framed_twice = headers.contains_key(http::header::TRANSFER_ENCODING)
            && headers.contains_key(http::header::CONTENT_LENGTH);
        // A reset under the upload (review33c L3): hyper may not have seen
        // the end of the connection yet, and the next request's writes
        // would go nowhere.
        let gone = conn.reset();
        // An HTTP/1.0 answer, even with `Connection: keep-alive`: hyper
        // sends the next request on that connection as HTTP/1.0, where a
        // body of unknown length has no framing, and a chunked upload went
        // out as an empty request (review42a F1). nginx closes too.
        let http10 = response.version() == http::Version::HTTP_10;
        let reusable = !(upgraded
            || keep_for.is_zero()
            || mid_upload.is_some()
            || framed_twice
            || gone
            || http10);
        let (parts, inner) = response.into_parts();
        let head = if reusable { None } else { conn.head.take() };
        if let (Some(head), Some(upload)) = (&head, mid_upload) {
            let _ = head.answered_upload.set(upload.clone());
        }
        let mut body = UpstreamBody {
            inner,
            reuse: reusable.then(|| Reuse {
                pool: self.clone(),
                index,
                conn,
            }),
            head,
            ended: false,
        };
        if body.inner.is_end_stream() {
            body.finished();
        }
        Response::from_parts(parts, body)
    }

    fn put_back(&self, index: usize, conn: Conn) {
        let Conn {
            sender,
            handed_back: Some(handed_back),
            keep_for,
            head: Some(head),
        } = conn
        else {
            return;
        };
        let keep_for = keep_for.unwrap_or(self.idle_timeout);
        if sender.is_closed() {
            return;
        }
        let mut stack = self.idle[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if stack.len() < self.max_idle {
            stack.push(Idle {
                state: Held::Live {
                    sender,
                    handed_back,
                    head,
                },
                since: Instant::now(),
                keep_for,
            });
        }
    }

    /// Closes connections idle for as long as they may be (see
    /// [`Conn::keep_for`]) or closed by their backend, and parks those idle
    /// for [`PARK_AFTER`]. Returns how many it parked.
    fn reap_idle(&self) -> usize {
        let mut parked = 0;
        for stack in &self.idle {
            let mut stack = stack.lock().unwrap_or_else(PoisonError::into_inner);
            let entries = std::mem::take(&mut *stack);
            for mut idle in entries {
                let idle_for = idle.since.elapsed();
                if idle_for >= idle.keep_for {
                    retire(idle.state);
                    continue;
                }
                idle.state = match idle.state {
                    Held::Live { sender, .. } if sender.is_closed() => continue,
                    // Only a ready one: a connection still sending the
                    // upload of a request its backend answered early ends
                    // its task when the upload ends, and a checkout would
                    // wait on that.
                    Held::Live {
                        sender,
                        handed_back,
                        ..
                    } if idle_for >= PARK_AFTER && sender.is_ready() => {
                        drop(sender);
                        parked += 1;
                        Held::Parking(handed_back)
                    }
                    Held::Parking(handed_back) => match unpark(handed_back) {
                        Ok(Some(io)) => Held::Parked(io),
                        Ok(None) => continue,
                        Err(handed_back) => Held::Parking(handed_back),
                    },
                    Held::Parked(mut io) => {
                        if !quiet(&mut io) {
                            continue;
                        }
                        Held::Parked(io)
                    }
                    state => state,
                };
                stack.push(idle);
            }
        }
        parked
    }
}

/// The idle time a backend says it allows a connection, from a response's
/// `Keep-Alive: timeout=N` (Node.js and Apache send `timeout=5`), less a
/// margin (a second, or half of a shorter timeout) so that no request is
/// sent just as the backend closes the connection: a POST lost that way is
/// a 502. The field is a list, possibly over several lines, and a value
/// may be quoted (RFC 2068 §19.7.1.1); an unparsable one is ignored.
fn announced_keep_alive(headers: &http::HeaderMap) -> Option<Duration> {
    use crate::proxy::headers::{list_members, KEEP_ALIVE};
    let seconds = list_members(headers, &KEEP_ALIVE).find_map(|param| {
        let (name, seconds) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        seconds.trim().trim_matches('"').parse::<u64>().ok()
    })?;
    let timeout = Duration::from_secs(seconds);
    Some(timeout - (timeout / 2).min(Duration::from_secs(1)))
}

/// The socket hyper's ended task handed back: `Ok(None)` when there is
/// none fit to use (the task failed, bytes came that no request asked for,
/// or the backend has closed it since), `Err` while the task has not
/// finished yet.
fn unpark(
    mut handed_back: oneshot::Receiver<Box<Io>>,
) -> Result<Option<Box<Io>>, oneshot::Receiver<Box<Io>>> {
    match handed_back.try_recv() {
        Ok(mut io) => Ok(quiet(&mut io).then_some(io)),
        Err(oneshot::error::TryRecvError::Empty) => Err(handed_back),
        Err(oneshot::error::TryRecvError::Closed) => Ok(None),
    }
}

/// The backend a socket leads to, for the log.
/// Whether hyper gave up on a connection for bytes it read while no
/// response was due. No `hyper::Error` predicate names that kind
/// (`UnexpectedMessage`), so its message is matched; a test
/// (`bytes_after_a_response_are_warned_of`) breaks if hyper words it
/// otherwise.
fn unasked(error: &hyper::Error) -> bool {
    !error.is_parse()
        && error
            .to_string()
            .starts_with("received unexpected message from connection")
}

/// Warns, once every ten seconds per backend, that `backend` sent bytes
/// no request asked for (`bytes` of them, where known): a body longer than
/// its length, a body on a 204 or a HEAD's answer, anything on an idle
/// connection. The backend's framing is wrong, as nginx warns ("upstream
/// sent more data than specified"); the response went out as its length
/// said, and the connection is closed, not reused.
fn overrun(
    said: &crate::logging::Every,
    backend: Option<&http::uri::Authority>,
    bytes: Option<usize>,
) {
    let Some(held_back) = said.due(10) else {
        return;
    };
    let held_back = (held_back > 0).then_some(held_back);
    tracing::warn!(
        backend = backend.map(tracing::field::display),
        bytes,
        held_back,
        "backend sent bytes after its response that no request asked for; connection closed, not reused"
    );
}

/// The TCP socket under a backend connection, plain or TLS.
fn tcp_of(io: &Io) -> &TcpStream {
    let tcp = match io {
        MaybeHttpsStream::Http(tcp) => tcp,
        MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner(),
    };
    tcp.inner()
}

/// Bytes queued to send on the socket `fd` and not yet taken by its peer
/// (`SIOCOUTQ`): shrinking, the peer is reading.
#[cfg(unix)]
pub(crate) fn unsent(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: `fd` is an open socket its caller owns; the ioctl writes one
    // int into the value given.
    let done = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    (done == 0).then(|| u64::try_from(queued).unwrap_or(0))
}

/// Makes the close of the socket `fd` a reset that drops what is still
/// queued to send (SO_LINGER 0), as HAProxy aborts a server connection:
/// closed with an upload's megabytes unsent to a backend that reads
/// nothing, it stayed in FIN-WAIT-1 holding them for as long as the
/// backend kept its end (review34g L1). The caller still owns `fd`.
#[cfg(unix)]
pub(crate) fn reset_on_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket its caller owns; the option is read
    // from a value of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Whether a parked socket is still open with nothing to read: one the
/// backend closed (its keep-alive timeout ran out) or wrote to unasked
/// must not carry the next request. One non-blocking read, so a byte read
/// here is never missed: the socket is then dropped.
fn quiet(io: &mut Io) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [MaybeUninit::uninit()];
    let mut buf = hyper::rt::ReadBuf::uninit(&mut byte);
    let polled = hyper::rt::Read::poll_read(Pin::new(io), &mut cx, buf.unfilled());
    matches!(polled, Poll::Pending)
}

/// Lets go of an idle connection that has aged out. A live one's hyper
/// task closes it as the sender goes; a parked socket is closed here, with
/// the TLS close_notify a backend would otherwise not get.
fn retire(state: Held) {
    if let (Held::Parked(io), Ok(runtime)) = (state, tokio::runtime::Handle::try_current()) {
        runtime.spawn(close(*io));
    }
}

/// Closes a socket nobody will use again the way hyper would: a FIN (and
/// a TLS close_notify) rather than whatever the kernel does at close.
async fn close(mut io: Io) {
    let shutdown =
        std::future::poll_fn(|cx| hyper::rt::Write::poll_shutdown(Pin::new(&mut io), cx));
    let _ = tokio::time::timeout(Duration::from_secs(1), shutdown).await;
}

/// Closes and parks idle connections as they age, until the pool is
/// dropped. Runs at least twice per [`PARK_AFTER`], so a connection is
/// parked within 1.5 of them.
async fn reap(pool: Weak<Pool>) {
    let Some(every) = pool
        .upgrade()
        .map(|p| (p.idle_timeout / 2).clamp(Duration::from_millis(100), PARK_AFTER / 2))
    else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.reap_idle();
    }
}

/// The way back to the pool for a connection whose response is being read.
struct Reuse {
    pool: Arc<Pool>,
    index: usize,
    conn: Conn,
}

/// A backend's response body. Returns its connection to the pool once read
/// to the end; dropped earlier, the connection closes with it.
pub struct UpstreamBody {
    inner: Incoming,
    reuse: Option<Reuse>,
    /// The connection's wait record when it is not to be reused (else it
    /// is `reuse`'s), to say the body was let go before its end.
    head: Option<Arc<HeadWait>>,
    /// Read to its end. (`Incoming::is_end_stream` says so only of a body
    /// with a length, never of a chunked one.)
    ended: bool,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.ended || self.inner.is_end_stream() {
            return;
        }
        self.mark_cut();
    }
}

#[cfg(test)]
impl UpstreamBody {
    /// `inner`, with no pool to give its connection back to (tests).
    pub(crate) fn unpooled(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            reuse: None,
            head: None,
            ended: false,
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// The connection's wait record (HTTP/1 connections have one).
    fn wait_record(&self) -> Option<&HeadWait> {
        let reused = self.reuse.as_ref().and_then(|r| r.conn.head.as_ref());
        reused.or(self.head.as_ref()).map(|head| &**head)
    }

    /// The client takes the body slower than the backend sends it: the
    /// rest is read in [`SMALL_READ`] pieces, which is all a slow stream
    /// then holds of it.
    pub fn slow_client(&self) {
        if let Some(head) = self.wait_record() {
            head.small_reads.store(true, Ordering::Relaxed);
        }
    }

    /// The response did not end cleanly (see [`HeadWait::cut`]).
    fn mark_cut(&self) {
        if let Some(head) = self.wait_record() {
            head.cut.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the connection read anything since this was last asked:
    /// bytes that make no frame of the body yet (a chunk's size line,
    /// trailers trickling in) show its backend is not silent.
    pub fn read_lately(&self) -> bool {
        let Some(head) = self.wait_record() else {
            return false;
        };
        // A load first: a swap would write the line each time.
        head.read.load(Ordering::Relaxed) && head.read.swap(false, Ordering::Relaxed)
    }

    /// Read to its end: the connection goes back to the pool, or, when an
    /// upload still comes on it, its task is told the answer is whole.
    fn finished(&mut self) {
        if let Some(reuse) = self.reuse.take() {
            reuse.pool.put_back(reuse.index, reuse.conn);
        } else if let Some(head) = &self.head {
            if head.answered_upload.get().is_some_and(UploadWatch::coming) {
                head.answered.notify_one();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            // Trailers are the last frame: hyper's HTTP/2 server asks for
            // nothing after them (review35e L5).
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || this.inner.is_end_stream() => {
                this.finished()
            }
            Poll::Ready(None) => {
                this.ended = true;
                this.finished();
            }
            Poll::Ready(Some(Err(_))) => {
                // What hyper read past the error is the rest of a broken
                // body, not stray bytes after a response (review32c F4).
                this.mark_cut();
                this.reuse = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    /// Bounds every wait; parking takes at most two seconds.
    const STEP: Duration = Duration::from_secs(10);

    /// A backend answering `ok` to each bodiless request, counting the
    /// connections it accepts and closing them all when `hang_up` fires.
    async fn backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<Notify>) {
        announcing("").await
    }

    /// The same, with `fields` (CRLF-terminated lines) in each response.
    async fn announcing(fields: &'static str) -> (SocketAddr, Arc<AtomicUsize>, Arc<Notify>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let hang_up = Arc::new(Notify::new());
        let (count, notify) = (accepted.clone(), hang_up.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let notify = notify.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        tokio::select! {
                            read = stream.read(&mut buf) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            },
                            () = notify.notified() => return,
                        }
                        let ok = format!("HTTP/1.1 200 OK\r\n{fields}content-length: 2\r\n\r\nok");
                        if stream.write_all(ok.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted, hang_up)
    }

    fn pool(addr: SocketAddr) -> Arc<Pool> {
        timing_out(addr, Duration::from_secs(30))
    }

    /// A pool whose requests wait `response_timeout` for a head.
    fn timing_out(addr: SocketAddr, response_timeout: Duration) -> Arc<Pool> {
        let mut config = crate::config::Upstream::new("test", vec![addr]);
        config.max_idle_per_backend = 8;
        config.idle_timeout = Duration::from_secs(60);
        config.connect_timeout = Duration::from_secs(5);
        config.response_timeout = response_timeout;
        config.body_timeout = Duration::from_secs(30);
        let target = http::Uri::try_from(format!("http://{addr}/")).unwrap();
        Pool::new(
            super::super::tls::connector(&config),
            http1::Builder::new(),
            vec![target],
            vec![prometheus::IntCounter::new("opened", "opened").unwrap()],
            &config,
        )
    }

    /// A backend answering the first request on a connection at once and
    /// each later one after `later` (never, if `None`); `closed` is
    /// notified when portico closes a connection.
    async fn slowing(later: Option<Duration>) -> (SocketAddr, Arc<Notify>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(Notify::new());
        let notify = closed.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let notify = notify.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    for n in 0.. {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return notify.notify_one(),
                            Ok(_) => {}
                        }
                        if n > 0 {
                            match later {
                                Some(delay) => tokio::time::sleep(delay).await,
                                None => {
                                    // Never answered: wait for portico to hang up.
                                    while !matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {}
                                    return notify.notify_one();
                                }
                            }
                        }
                        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, closed)
    }

    fn get() -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header("host", "backend")
            .body(RequestBody::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_body_for_a_slow_client_is_read_in_small_pieces() {
        const LENGTH: usize = 1 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Two requests on one connection.
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {LENGTH}\r\n\r\n");
            let mut response = head.into_bytes();
            response.resize(response.len() + LENGTH, b'x');
            for _ in 0..2 {
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(&response).await;
            }
            let _ = stream.read(&mut buf).await;
        });
        let pool = pool(addr);
        let pieces = |slow: bool| {
            let pool = pool.clone();
            async move {
                let response = tokio::time::timeout(STEP, pool.send(0, get(), false, false, true))
                    .await
                    .expect("the head comes")
                    .unwrap();
                let mut body = response.into_body();
                if slow {
                    body.slow_client();
                }
                let mut sizes = Vec::new();
                while let Some(frame) = tokio::time::timeout(STEP, body.frame())
                    .await
                    .expect("the body comes")
                {
                    sizes.push(frame.unwrap().into_data().unwrap().len());
                }
                assert_eq!(sizes.iter().sum::<usize>(), LENGTH);
                // What hyper read before it was told (the head's read, and
                // one read ahead of its reader) may come in larger pieces.
                sizes
                    .into_iter()
                    .skip(2)
                    .filter(|&n| n > SMALL_READ)
                    .count()
            }
        };
        assert_eq!(pieces(true).await, 0, "pieces over {SMALL_READ}");
        // The next request on the connection reads in full again.
        assert_eq!(pool.idle_count(0), 1);
        assert!(pieces(false).await > 0, "all pieces small");
    }

    #[tokio::test]
    async fn a_late_head_on_a_pooled_connection_times_out_and_closes_it() {
        let (addr, closed) = slowing(None).await;
        let pool = timing_out(addr, Duration::from_millis(200));
        ok(&pool, http::Method::GET).await;
        assert_eq!(held(&pool), ["live"]);
        let started = std::time::Instant::now();
        let late = tokio::time::timeout(STEP, pool.send(0, get(), false, false, true))
            .await
            .expect("the connection's task gives up on the head");
        assert!(matches!(late, Err(SendError::HeadTimeout)));
        // Never before its time (a slow machine only makes it later).
        assert!(started.elapsed() >= Duration::from_millis(200));
        tokio::time::timeout(STEP, closed.notified())
            .await
            .expect("the connection is closed");
        assert!(held(&pool).is_empty());
    }

    #[tokio::test]
    async fn waits_under_the_timeout_do_not_add_up_on_one_connection() {
        // Each head comes after 60% of the timeout; four in a row on one
        // connection wait 2.4 timeouts in all, and none is late.
        let (addr, _closed) = slowing(Some(Duration::from_millis(120))).await;
        let pool = timing_out(addr, Duration::from_millis(200));
        for _ in 0..5 {
            let response = tokio::time::timeout(STEP, pool.send(0, get(), false, false, true))
                .await
                .expect("answered")
                .expect("in time");
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(held(&pool), ["live"]);
    }

    async fn ok(pool: &Arc<Pool>, method: http::Method) {
        let request = Request::builder()
            .method(method)
            .uri("/")
            .header("host", "backend")
            .body(RequestBody::empty())
            .unwrap();
        let response = pool.send(0, request, false, false, true).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
    }

    /// What the pool holds for the backend, oldest first.
    fn held(pool: &Pool) -> Vec<&'static str> {
        let stack = pool.idle[0].lock().unwrap();
        stack
            .iter()
            .map(|idle| match idle.state {
                Held::Live { .. } => "live",
                Held::Parking(_) => "parking",
                Held::Parked(_) => "parked",
            })
            .collect()
    }

    async fn wait_for(pool: &Pool, want: &[&str]) {
        tokio::time::timeout(STEP, async {
            while held(pool) != want {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("pool holds {:?}, not {want:?}", held(pool)));
    }

    /// A backend writing `answers[n]` for the n-th request on each
    /// connection (the last one again past the end).
    async fn answering(answers: &'static [&'static str]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    for n in 0.. {
                        if matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {
                            return;
                        }
                        let answer = answers[n.min(answers.len() - 1)];
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_keep_alive_timeout_announced_on_a_later_response_counts() {
        let addr = answering(&[
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nkeep-alive: timeout=0\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        assert_eq!(held(&pool), ["live"]);
        ok(&pool, http::Method::GET).await;
        assert!(held(&pool).is_empty(), "{:?}", held(&pool));
    }

    #[tokio::test]
    async fn a_response_framed_both_ways_leaves_its_connection_unpooled() {
        let addr = answering(&[
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ])
        .await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        assert!(held(&pool).is_empty(), "{:?}", held(&pool));
    }

    #[test]
    fn a_keep_alive_timeout_the_backend_announces_is_kept_with_a_margin() {
        let announced = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("keep-alive", http::HeaderValue::from_static(value));
            announced_keep_alive(&headers)
        };
        let seconds = |s: f64| Some(Duration::from_secs_f64(s));
        assert_eq!(announced("timeout=5"), seconds(4.0));
        assert_eq!(announced("timeout=5, max=100"), seconds(4.0));
        assert_eq!(announced("max=99 , Timeout = 1"), seconds(0.5));
        assert_eq!(announced("timeout=0"), seconds(0.0));
        assert_eq!(announced("timeout=soon"), None);
        assert_eq!(announced("max=3"), None);
        assert_eq!(announced("timeout=\"3\""), seconds(2.0));
        let mut lines = http::HeaderMap::new();
        lines.append("keep-alive", http::HeaderValue::from_static("max=100"));
        lines.append("keep-alive", http::HeaderValue::from_static("timeout=2"));
        assert_eq!(announced_keep_alive(&lines), seconds(1.0));
        assert_eq!(announced_keep_alive(&http::HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn a_connection_is_not_offered_past_the_backends_keep_alive() {
        // The backend itself never closes it; it only says it might.
        let (addr, accepted, _) = announcing("keep-alive: timeout=1\r\n").await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        ok(&pool, http::Method::GET).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Half a second is all it is offered for.
        tokio::time::sleep(Duration::from_millis(600)).await;
        ok(&pool, http::Method::POST).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_backend_gives_no_idle_time_is_not_pooled() {
        let (addr, accepted, _) = announcing("keep-alive: timeout=0\r\n").await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        assert_eq!(held(&pool), Vec::<&str>::new());
        ok(&pool, http::Method::GET).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_is_parked_then_taken_up_again() {
        let (addr, accepted, _) = backend().await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        assert_eq!(held(&pool), ["live"]);
        wait_for(&pool, &["parked"]).await;
        // The same socket carries the next requests, under a new hyper
        // connection.
        ok(&pool, http::Method::GET).await;
        ok(&pool, http::Method::POST).await;
        assert_eq!(held(&pool), ["live"]);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_taken_as_it_is_parked_waits_for_its_socket() {
        let (addr, accepted, _) = backend().await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        // Aged past PARK_AFTER, then parked with no chance for hyper's task
        // to end before the next checkout.
        for idle in pool.idle[0].lock().unwrap().iter_mut() {
            idle.since -= PARK_AFTER;
        }
        assert_eq!(pool.reap_idle(), 1);
        assert_eq!(held(&pool), ["parking"]);
        ok(&pool, http::Method::POST).await;
        assert_eq!(held(&pool), ["live"]);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_parked_connection_the_backend_closed_is_not_used() {
        let (addr, accepted, hang_up) = backend().await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        wait_for(&pool, &["parked"]).await;
        hang_up.notify_waiters();
        // The next pass finds the closed socket; nothing is sent on it.
        wait_for(&pool, &[]).await;
        ok(&pool, http::Method::POST).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_post_never_goes_out_on_a_parked_socket_the_backend_closed() {
        let (addr, accepted, hang_up) = backend().await;
        let pool = pool(addr);
        ok(&pool, http::Method::GET).await;
        wait_for(&pool, &["parked"]).await;
        hang_up.notify_waiters();
        // Let the FIN arrive and the runtime see it, likely before the next
        // pass: then checkout's probe, or failing that hyper's own check of
        // a new connection, passes the socket over. A POST is not retried
        // once sent, so it succeeds only if it never went out on that one.
        tokio::time::sleep(Duration::from_millis(50)).await;
        ok(&pool, http::Method::POST).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
