//! The two body types on the proxy path. [`RequestBody`] wraps a client's
//! upload on its way to a backend: it enforces `max_request_body` while
//! streaming (chunked uploads included) and `body_timeout` between frames.
//! [`ProxyBody`] is what portico sends to clients: a backend's streamed body
//! under the same stall timeout, or a small body held in memory (errors,
//! later cache hits), or one byte range cut from a backend's whole body.
//! Neither buffers a stream whole, save a response being stored, which is
//! read at the backend's pace whatever the client's (see [`Ahead`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::cache::capture::Capture;
use crate::upstream::health::InFlight;
use crate::upstream::UpstreamBody;

/// A stall timeout that never fires in practice; instants near
/// `Duration::MAX` would overflow `Instant` arithmetic.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a streamed body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("no body data for {0:?}")]
    Stalled(Duration),
    #[error("the client kept the stream's flow-control window shut; response abandoned")]
    Abandoned,
    #[error("the read of the response body ended before the body did")]
    Lost,
    /// The client's upload ended short of its declared length: an HTTP/2
    /// client's RST_STREAM(NO_ERROR) ends a stream's body as if whole.
    #[error("the client ended its upload short of its content-length")]
    Short,
    /// The backend's body broke, or fell silent, after the client's upload
    /// failed: hyper ends the backend connection when the upload fails.
    #[error("the response body was cut with the client's upload: {0}")]
    UploadFailed(Box<dyn std::error::Error + Send + Sync>),
    /// portico's own gzip encoder failed (see `compress`).
    #[error("compressing the response failed: {0}")]
    Compress(std::io::Error),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// Fails a stream that stays silent longer than `timeout`. Frames only
/// set a flag; the clock is read when the stream has to wait, the timer is
/// created on the first wait and re-armed lazily when it fires early, so a
/// body that never waits reads no clock and allocates nothing, and a fast
/// stream causes no timer-wheel churn.
#[derive(Debug)]
pub struct StallGuard {
    timeout: Duration,
    /// When the stream last started waiting after a frame; `None` before
    /// its first wait.
    waiting_since: Option<Instant>,
    /// A frame arrived since `waiting_since`.
    progressed: bool,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    fn new(timeout: Duration) -> Self {
        StallGuard {
            timeout,
            waiting_since: None,
            progressed: false,
            sleep: None,
        }
    }

    fn progress(&mut self) {
        self.progressed = true;
    }

    /// Ready(()) once the stream has been silent for `timeout`. `read`
    /// says whether bytes came from the peer since it was last asked
    /// (asked as each wait begins, then every quarter of `timeout`):
    /// bytes that make no frame (a chunk's size line, trailers trickling
    /// in) are no silence, as nginx's `proxy_read_timeout` counts between
    /// two reads (netfuzz49 L2: such a body was cut as stalled). A read is
    /// seen at most a quarter late, so the cut comes between `timeout` and
    /// a quarter more after the last byte (looked at only when the wait
    /// ended, bytes early in it made the cut up to `timeout` late,
    /// review50 L3).
    fn poll_stalled(&mut self, cx: &mut Context<'_>, mut read: impl FnMut() -> bool) -> Poll<()> {
        let since = match self.waiting_since {
            Some(since) if !self.progressed => since,
            _ => {
                read();
                *self.waiting_since.insert(Instant::now())
            }
        };
        self.progressed = false;
        let step = self.timeout / 4;
        let mut deadline = since + self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(since + step)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if read() {
                deadline = *self.waiting_since.insert(now) + self.timeout;
            } else if now >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset((now + step).min(deadline));
        }
    }
}

/// What bodies have handed hyper on one connection and hyper has not
/// written yet. hyper keeps asking a body for frames while its write queue
/// is under its `max_buf_size` (64 KiB toward clients, 72 KiB toward
/// backends), and each frame it holds for a slow reader is a slice of a
/// read buffer of the other side that stays allocated while any slice of
/// it lives: about 270 KiB a stream, where nginx without buffering holds
/// one 4 or 8 KiB buffer. Past [`WRITE_AHEAD`] bytes handed and not yet
/// written, the body's next frame waits until hyper has written its
/// queue, which it says by flushing the socket: it calls the IO's
/// `poll_flush` only once the queue is empty, and on every turn of the
/// connection ([`WriteAhead::queue_written`]). The body then has the other
/// side read in [`SMALL_READ`] pieces. Together, ~110 KiB a stream moving
/// a large body, where either alone saved little (~245 KiB; ~110 with
/// every read small).
#[derive(Debug, Default)]
pub struct WriteAhead {
    unwritten: std::sync::atomic::AtomicUsize,
    written: futures_util::task::AtomicWaker,
}

/// The body bytes handed to hyper before the next frame waits for them
/// to be written (see [`WriteAhead`]).
pub const WRITE_AHEAD: usize = 16 * 1024;

/// The most read at once from the other side of a stream once a body has
/// been held back (see [`WriteAhead`]). A body read whole with its head
/// (up to 72 KiB) is never held; a larger one usually is, even for a
/// client that keeps up (hyper asks for the next frame before it has tried
/// to write the last), and then costs about twice the read calls (a 1 MiB
/// body ~30 against ~17), for ~110 KiB a stream instead of ~270. 32 KiB
/// reads cost no more calls, but save a third, not three fifths.
pub const SMALL_READ: usize = 16 * 1024;

impl WriteAhead {
    /// Whether the body should wait before its next frame; if so, it is
    /// woken once hyper has written what it holds.
    pub fn held_back(&self, cx: &mut Context<'_>) -> bool {
        if self.unwritten.load(Ordering::Relaxed) < WRITE_AHEAD {
            return false;
        }
        self.written.register(cx.waker());
        self.unwritten.load(Ordering::Relaxed) >= WRITE_AHEAD
    }

    /// Counts what a poll of the body handed hyper.
    pub fn handed<E>(&self, frame: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        if let Poll::Ready(Some(Ok(frame))) = frame {
            if let Some(data) = frame.data_ref() {
                self.unwritten.fetch_add(data.len(), Ordering::Relaxed);
            }
        }
    }

    /// hyper is flushing the socket: its write queue is empty, and a body
    /// held back may go on.
    pub fn queue_written(&self) {
        if self.unwritten.load(Ordering::Relaxed) != 0
            && self.unwritten.swap(0, Ordering::Relaxed) >= WRITE_AHEAD
        {
            self.written.wake();
        }
    }
}

/// When a client's upload was read to its end, once it has been: the
/// backend's time to answer counts from then, and the connection's
/// watchdog knows hyper is past the body. Clones share the cell; the one
/// the request carries goes with whatever holds the upload.
#[derive(Debug, Clone, Default)]
pub struct UploadEnded(Arc<UploadState>);

#[derive(Debug, Default)]
struct UploadState {
    ended: OnceLock<Instant>,
    /// Frames hyper has taken from the upload, and whether it is waiting
    /// for the client's next one: with neither moving, the backend has
    /// stopped reading (see [`UploadEnded::progress`]).
    taken: std::sync::atomic::AtomicU64,
    awaiting_client: std::sync::atomic::AtomicBool,
    /// What a response body watching the upload sees (see
    /// [`UploadEnded::watch`]).
    outcome: Arc<std::sync::atomic::AtomicU8>,
    /// The backend stopped taking it, and the request was answered
    /// without it (see [`UploadEnded::give_up`]).
    given_up: std::sync::atomic::AtomicBool,
    /// Its backend takes it slower than the client sends it: the client is
    /// read in [`SMALL_READ`] pieces (see [`WriteAhead`]).
    small_reads: std::sync::atomic::AtomicBool,
}

/// [`UploadState::outcome`]: still coming, read to its end, or broken off
/// (the client closed or stalled, or it outgrew `max_request_body`).
const COMING: u8 = 0;
const ENDED: u8 = 1;
const FAILED: u8 = 2;

impl UploadEnded {
    /// Marks the end now; later calls keep the first instant.
    pub fn set(&self) {
        let _ = self.0.ended.set(Instant::now());
        let _ =
            self.0
                .outcome
                .compare_exchange(COMING, ENDED, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn at(&self) -> Option<Instant> {
        self.0.ended.get().copied()
    }

    pub fn is_set(&self) -> bool {
        self.0.ended.get().is_some()
    }

    /// Whether nothing will read the upload any more: read to its end, or
    /// let go of before it.
    pub fn is_over(&self) -> bool {
        self.is_set() || self.is_abandoned()
    }

    /// Whether the upload was let go of before its end: this is the last
    /// clone (the request, or the body that held it, is gone). hyper then
    /// drains what is left of it or stops reading.
    pub fn is_abandoned(&self) -> bool {
        !self.is_set() && Arc::strong_count(&self.0) == 1
    }

    /// Says the request is answered without the rest of its upload (its
    /// backend stopped taking it: a 504), while the backend connection
    /// that holds the upload has yet to let it go: the answer says
    /// `Connection: close`, as one to an upload let go of does.
    pub fn give_up(&self) {
        self.0.given_up.store(true, Ordering::Relaxed);
    }

    /// Whether the request was answered without the rest of its upload
    /// ([`UploadEnded::is_abandoned`], or [`UploadEnded::give_up`]).
    pub fn is_left_unread(&self) -> bool {
        !self.is_set() && (self.0.given_up.load(Ordering::Relaxed) || self.is_abandoned())
    }

    /// How the upload moves: frames hyper has taken so far, and whether
    /// hyper now waits for the client (the client's pace, which
    /// `body_timeout` bounds on the body itself). A count that stays put
    /// while hyper does not wait for the client means hyper cannot write:
    /// the backend has stopped reading.
    pub fn progress(&self) -> (u64, bool) {
        (
            self.0.taken.load(Ordering::Relaxed),
            self.0.awaiting_client.load(Ordering::Relaxed),
        )
    }

    /// Whether its client is to be read in small pieces (see
    /// [`UploadState::small_reads`]).
    pub fn small_reads(&self) -> bool {
        self.0.small_reads.load(Ordering::Relaxed)
    }

    fn took(&self) {
        self.0.taken.fetch_add(1, Ordering::Relaxed);
        self.0.awaiting_client.store(false, Ordering::Relaxed);
    }

    fn awaiting_client(&self) {
        self.0.awaiting_client.store(true, Ordering::Relaxed);
    }

    fn fail(&self) {
        let _ =
            self.0
                .outcome
                .compare_exchange(COMING, FAILED, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A look at how the upload goes, for a response body that its
    /// failure may cut. It outlives every clone (an HTTP/2 upload has no
    /// other once its request is sent) and counts as none of them, so
    /// [`UploadEnded::is_abandoned`] still counts right.
    pub fn watch(&self) -> UploadWatch {
        UploadWatch(self.0.outcome.clone())
    }
}

/// See [`UploadEnded::watch`].
#[derive(Debug, Clone)]
pub struct UploadWatch(Arc<std::sync::atomic::AtomicU8>);

impl UploadWatch {
    /// Whether the upload broke off.
    pub fn failed(&self) -> bool {
        self.0.load(Ordering::Relaxed) == FAILED
    }

    /// Whether the upload is still coming: neither read to its end nor
    /// broken off.
    pub fn coming(&self) -> bool {
        self.0.load(Ordering::Relaxed) == COMING
    }
}

/// A request body on its way upstream: a client's upload, or nothing
/// (requests portico makes itself, such as health checks).
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    /// Where a parked upload waits until the first poll (see [`park`]).
    ///
    /// [`park`]: RequestBody::park
    parked: Option<Arc<Mutex<Option<Upload>>>>,
    /// The upload's size hint and end flag, kept while it is parked.
    parked_hint: SizeHint,
    limit: u64,
    seen: u64,
    /// The upload's `Content-Length`, to tell an end short of it.
    declared: Option<u64>,
    stall: StallGuard,
    /// When the upload was read to its end, for whoever asked
    /// ([`RequestBody::end_marker`], [`RequestBody::ending`]).
    ended: Option<UploadEnded>,
    /// A frame [`RequestBody::settle`] read, to go first.
    first: Option<First>,
}

type First = Box<Result<Frame<Bytes>, hyper::Error>>;

/// A parked upload: the client's body, and a frame read from it early.
type Upload = (Incoming, Option<First>);

/// `hint` with `bytes` more, held in front of the body it describes.
pub fn plus(hint: SizeHint, bytes: u64) -> SizeHint {
    let mut total = SizeHint::new();
    total.set_lower(hint.lower() + bytes);
    if let Some(upper) = hint.upper() {
        total.set_upper(upper + bytes);
    }
    total
}

/// The other end of a parked upload: gives it back if nobody read it.
#[derive(Debug)]
pub struct Parked {
    slot: Arc<Mutex<Option<Upload>>>,
    limit: u64,
    stall_timeout: Duration,
    ended: Option<UploadEnded>,
}

impl Parked {
    /// The upload, if no byte of it was read: a connect failure leaves it
    /// untouched, and it can go to another backend.
    pub fn reclaim(self) -> Option<RequestBody> {
        let (inner, first) = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let mut body = RequestBody::new(inner, self.limit, self.stall_timeout).ending(self.ended);
        body.first = first;
        Some(body)
    }
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, stall_timeout: Duration) -> Self {
        RequestBody {
            declared: inner.size_hint().exact(),
            inner: Some(inner),
            parked: None,
            parked_hint: SizeHint::default(),
            limit,
            seen: 0,
            stall: StallGuard::new(stall_timeout),
            ended: None,
            first: None,
        }
    }

    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            parked: None,
            parked_hint: SizeHint::with_exact(0),
            limit: 0,
            seen: 0,
            declared: None,
            stall: StallGuard::new(NEVER),
            ended: None,
            first: None,
        }
    }

    /// Reads what the client has sent of the upload so far, for an HTTP/2
    /// GET or HEAD whose headers did not end its stream: some clients end
    /// it with an empty DATA frame of its own, and such a request has no
    /// content once that frame is in (most often it came with the
    /// headers). A frame with something in it is kept, to go first.
    /// Returns whether the upload is known to be over.
    pub fn settle(&mut self) -> bool {
        use futures_util::FutureExt;
        while self.first.is_none() && !self.is_end_stream() {
            let Some(inner) = self.inner.as_mut() else {
                break;
            };
            match http_body_util::BodyExt::frame(inner).now_or_never() {
                // Nothing yet: content may follow.
                None => break,
                Some(None) => self.inner = None,
                Some(Some(Ok(frame))) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
                Some(Some(frame)) => self.first = Some(Box::new(frame)),
            }
        }
        self.found_over()
    }

    /// Whether the upload is over, noted as read to its end when it is:
    /// a request whose empty upload was found so, then sent on without
    /// it, had its body dropped unmarked, taken for one let go of before
    /// its end, and its answer closed the connection (fuzz56 M1: a GET
    /// with a lone `0` chunk lost the request pipelined behind it).
    fn found_over(&self) -> bool {
        let over = self.is_end_stream();
        if over {
            self.mark_ended();
        }
        over
    }

    /// [`RequestBody::settle`], waiting up to `wait` for the frame that
    /// tells: a client that writes its GET's empty end-of-stream DATA
    /// frame apart from its HEADERS (a separate write microseconds later)
    /// made the GET one with content: chunked to its backend, past the
    /// cache, and not retried (review32c F2). Only idempotent requests
    /// whose framing left the length open wait (see `Proxy::forward`),
    /// and at most `wait`.
    pub async fn settle_within(&mut self, wait: Duration) -> bool {
        if self.settle() || self.first.is_some() {
            return self.found_over();
        }
        let told = tokio::time::timeout(
            wait,
            std::future::poll_fn(|cx| {
                let Some(inner) = self.inner.as_mut() else {
                    return Poll::Ready(());
                };
                loop {
                    match Pin::new(&mut *inner).poll_frame(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(None) => {
                            self.inner = None;
                            return Poll::Ready(());
                        }
                        Poll::Ready(Some(Ok(frame)))
                            if frame.data_ref().is_some_and(Bytes::is_empty) =>
                        {
                            if inner.is_end_stream() {
                                return Poll::Ready(());
                            }
                        }
                        Poll::Ready(Some(frame)) => {
                            self.first = Some(Box::new(frame));
                            return Poll::Ready(());
                        }
                    }
                }
            }),
        );
        let _ = told.await;
        self.found_over()
    }

    /// A cell that gets the instant the upload was read to its end (at
    /// once for a body that is already over). The backend's time to answer
    /// counts from then, not from the first byte of a slow upload.
    pub fn end_marker(&mut self) -> UploadEnded {
        let marker = self.ended.get_or_insert_with(Default::default).clone();
        if self.is_end_stream() {
            self.mark_ended();
        }
        marker
    }

    /// A look at how the upload goes, when it has an end marker (see
    /// [`RequestBody::end_marker`]).
    pub fn upload_watch(&self) -> Option<UploadWatch> {
        self.ended.as_ref().map(UploadEnded::watch)
    }

    /// Marks the upload's end in `ended` too (the server's, for the
    /// connection's watchdog; see [`UploadEnded`]).
    pub fn ending(mut self, ended: Option<UploadEnded>) -> Self {
        if let Some(ended) = ended {
            self.ended = Some(ended);
        }
        self
    }

    fn mark_ended(&self) {
        if let Some(ended) = &self.ended {
            ended.set();
        }
    }

    /// The upload broke off: a response cut with it is the client's doing.
    fn mark_failed(&self) {
        if let Some(ended) = &self.ended {
            ended.fail();
        }
    }

    /// Moves the upload into a shared slot that the first poll empties, so
    /// that if the request fails before any byte was read (the backend
    /// refused the connection), [`Parked::reclaim`] gets it back for a try
    /// on another backend. Costs one allocation; used for requests that
    /// carry a body.
    pub fn park(mut self) -> (RequestBody, Option<Parked>) {
        let hint = self.size_hint();
        let Some(inner) = self.inner.take() else {
            return (self, None);
        };
        self.parked_hint = hint;
        let slot = Arc::new(Mutex::new(Some((inner, self.first.take()))));
        self.parked = Some(slot.clone());
        let parked = Parked {
            slot,
            limit: self.limit,
            stall_timeout: self.stall.timeout,
            ended: self.ended.clone(),
        };
        (self, Some(parked))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(slot) = this.parked.take() {
            if let Some((inner, first)) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                (this.inner, this.first) = (Some(inner), first);
            }
        }
        let polled = match (this.first.take(), this.inner.as_mut()) {
            (Some(first), _) => Poll::Ready(Some(*first)),
            (None, Some(inner)) => Pin::new(inner).poll_frame(cx),
            (None, None) => return Poll::Ready(None),
        };
        match polled {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    super::headers::scrub_request_trailers(trailers);
                }
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.mark_failed();
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
                    }
                }
                this.stall.progress();
                // Trailers come last; after them hyper's client asks for
                // nothing more.
                // An HTTP/2 upload's END_STREAM may come in a frame of its
                // own, after the last declared byte: hyper's HTTP/1 client
                // stops at that byte and never asks for it, so the upload
                // is over then.
                let read_whole =
                    |body: &Incoming| body.is_end_stream() || body.size_hint().exact() == Some(0);
                if frame.is_trailers() || this.inner.as_ref().is_some_and(read_whole) {
                    this.mark_ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.mark_failed();
                Poll::Ready(Some(Err(e.into())))
            }
            // Short of its length: the client's doing, which hyper's
            // client reported as the backend's ("user body write aborted",
            // a 502 counted against the backend, review38g L1).
            Poll::Ready(None) if this.declared.is_some_and(|declared| this.seen < declared) => {
                this.mark_failed();
                Poll::Ready(Some(Err(BodyError::Short)))
            }
            Poll::Ready(None) => {
                this.mark_ended();
                Poll::Ready(None)
            }
            // hyper's server reads uploads on the connection's own task,
            // so every read that counts makes a frame.
            Poll::Pending => match this.stall.poll_stalled(cx, || false) {
                Poll::Ready(()) => {
                    this.mark_failed();
                    Poll::Ready(Some(Err(BodyError::Stalled(this.stall.timeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.first.is_some() {
            return false;
        }
        match (&self.inner, &self.parked) {
            (Some(inner), _) => inner.is_end_stream(),
            (None, Some(_)) => self.parked_hint.exact() == Some(0),
            (None, None) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let hint = match (&self.inner, &self.parked) {
            (Some(inner), _) => inner.size_hint(),
            (None, Some(_)) => self.parked_hint,
            (None, None) => SizeHint::with_exact(0),
        };
        match self.first.as_deref() {
            Some(Ok(frame)) => plus(hint, frame.data_ref().map_or(0, |d| d.len() as u64)),
            _ => hint,
        }
    }
}

/// Reads `body` off, each piece let go as it comes, until it ends (`true`),
/// or `most` bytes have come, it fails, or `wait` passes (`false`): an
/// answer given without reading its request's body, an active check's
/// body read on so the backend finishes it.
pub async fn read_off<B>(body: &mut B, most: u64, wait: Duration) -> bool
where
    B: Body<Data = Bytes> + Unpin,
{
    let reading = async {
        let mut read = 0u64;
        while read < most {
            match http_body_util::BodyExt::frame(body).await {
                None => return true,
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
                Some(Err(_)) => return false,
            }
        }
        false
    };
    tokio::time::timeout(wait, reading).await.unwrap_or(false)
}

/// A backend's body cut short after its head went out, broken or
/// `Stalled`: the error to hand the client. Counted against the backend
/// (its `slot`) and warned of, as nginx's "upstream prematurely closed"
/// is, since the client only sees its response cut; unless the client's
/// upload had failed, which cut it.
fn cut_short(slot: Option<InFlight>, error: BodyError, unattended: bool) -> BodyError {
    let (upstream, backend) = match slot.as_ref().and_then(InFlight::backend) {
        Some((upstream, addr)) => (upstream.to_string(), addr.to_string()),
        None => ("-".to_owned(), "-".to_owned()),
    };
    let stall = match error {
        BodyError::Stalled(timeout) => Some(timeout),
        _ => None,
    };
    if !slot.is_none_or(|slot| slot.body_failed(stall.is_some())) {
        match stall {
            Some(timeout) => tracing::debug!(
                upstream,
                backend,
                ?timeout,
                "response body silent after the client's upload failed"
            ),
            None => {
                tracing::debug!(upstream, backend, %error, "response body cut with the client's failed upload")
            }
        }
        return BodyError::UploadFailed(error.into());
    }
    if super::log::access_logged() && !unattended {
        // The access line's tail warns, with the client and the request's
        // id to pair the warning with its line (review35b F2).
        tracing::debug!(upstream, backend, %error, "response body cut short");
    } else {
        cut_warning(&upstream, &backend, None, &error, unattended);
    }
    error
}

/// The warning for a backend body cut short after its head went out, with
/// the client and request id when the access line knows them.
pub(super) fn cut_warning(
    upstream: &str,
    backend: &str,
    request: Option<(std::net::IpAddr, &str)>,
    error: &BodyError,
    unattended: bool,
) {
    let client = request.map(|(client, _)| tracing::field::display(client));
    let request_id = request.map(|(_, id)| id);
    // Read for the cache alone, there was no client response to abort
    // (review36f L6).
    let outcome = if unattended {
        "not stored (its client had left)"
    } else {
        "client response aborted"
    };
    // One line every ten seconds of each, per backend, with how many went
    // unsaid: a backend that breaks every body wrote one per request
    // (chaos55 L6), where its proxy errors are said as seldom; each
    // request's access line says `end="backend_broken"` or
    // `"backend_stalled"` all the same.
    let stalled = matches!(error, BodyError::Stalled(_));
    let Some(held_back) = cut_said(upstream, backend, stalled) else {
        return;
    };
    let held_back = (held_back > 0).then_some(held_back);
    match error {
        BodyError::Stalled(timeout) => tracing::warn!(
            client,
            upstream,
            backend,
            ?timeout,
            request_id,
            held_back,
            "backend body stalled past body_timeout; {outcome}"
        ),
        error => {
            // With its causes: hyper says "error reading a body from
            // connection" of a reset, an early close and a bad chunk alike
            // (review32c F4).
            let error = super::error::Chain(error);
            tracing::warn!(client, upstream, backend, %error, request_id, held_back, "backend broke the response body; {outcome}")
        }
    }
}

/// Seconds between two warnings of bodies cut short (see [`cut_warning`]).
const CUT_SAID: u64 = 10;

/// `Some(lines held back since the last)` when a warning of a body cut
/// short by `backend` of `upstream` may be said now (see [`cut_warning`]).
/// Kept per backend, as its failures' warnings are, so one broken backend
/// does not silence another's; a map of at most [`CUT_SAID_KEPT`] entries
/// (backends a reload removed are forgotten with the rest past it).
fn cut_said(upstream: &str, backend: &str, stalled: bool) -> Option<u64> {
    type Said = std::collections::HashMap<(String, String, bool), crate::logging::Every>;
    static SAID: Mutex<Option<Said>> = Mutex::new(None);
    let mut said = SAID
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let said = said.get_or_insert_with(Said::new);
    if said.len() >= CUT_SAID_KEPT {
        said.clear();
    }
    said.entry((upstream.to_owned(), backend.to_owned(), stalled))
        .or_default()
        .due(CUT_SAID)
}

/// Backends [`cut_said`] keeps a warning clock for.
const CUT_SAID_KEPT: usize = 1024;

/// The most of a body in memory (a cache hit) handed to hyper at once:
/// hyper asks for the next piece once its write buffer has room, so a
/// large hit goes out at the client's pace in pieces (shared, not copied),
/// and its access line is written when the last of it went out, not when
/// hyper took all of it at once. 64 KiB bodies still go in one.
const FULL_PIECE: usize = 64 * 1024;

/// A response body sent to a client.
#[derive(Debug)]
pub enum ProxyBody {
    /// A body already in memory; `None` once sent.
    Full { data: Option<Bytes> },
    /// A backend's body relayed frame by frame; holds the backend's
    /// in-flight slot until the body is done.
    Stream {
        inner: Gathered<UpstreamBody>,
        stall: StallGuard,
        in_flight: Option<InFlight>,
        /// Copies the body into the cache as it passes.
        capture: Option<Box<Capture>>,
        /// Read for the cache alone, its client gone: no access line
        /// will warn of its backend's failure, so [`cut_short`] does.
        unattended: bool,
    },
    /// One byte range of a body fetched whole (a range miss: the cache
    /// stores the whole, the client gets its range).
    Slice(Box<Slice>),
    /// A body being stored, read by a task of its own ([`ProxyBody::read_ahead`]).
    Ahead(Box<Ahead>),
    /// A body compressed as it is sent (see `compress`).
    Gzip(Box<super::compress::Gzip>),
}

/// What the task reading a body ahead sends to the client's side.
#[derive(Debug)]
enum Piece {
    /// A frame, and its charge against [`AHEAD_BUDGET`], given back when
    /// the piece is dropped (taken by the client, or never).
    Frame(Result<Frame<Bytes>, BodyError>, Charge),
    /// The body is not being stored (any more): the client reads the rest
    /// itself, at its own pace.
    Rest(ProxyBody),
    End,
}

/// Bytes all bodies read ahead of their clients may hold at once (see
/// [`read_ahead`]): past this, a body is read at its client's pace again,
/// so clients that do not read cannot make portico hold their responses
/// without bound.
const AHEAD_BUDGET: usize = 64 * 1024 * 1024;

/// What a piece costs beyond its bytes (its slot in the channel, the
/// `Bytes` handle): charged too, so a body of one-byte chunks cannot hold
/// far more than its charge says.
const PIECE_COST: usize = 128;

/// Bytes read ahead and not yet taken by their clients, all bodies.
static AHEAD_HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A piece's share of [`AHEAD_HELD`], given back on drop, whichever way
/// the piece goes (taken, left in a closed channel, refused by one).
#[derive(Debug)]
struct Charge(usize);

impl Charge {
    fn new(frame: &Result<Frame<Bytes>, BodyError>) -> Self {
        let len = frame
            .as_ref()
            .ok()
            .and_then(Frame::data_ref)
            .map_or(0, Bytes::len);
        let charge = len + PIECE_COST;
        AHEAD_HELD.fetch_add(charge, Ordering::Relaxed);
        Charge(charge)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        AHEAD_HELD.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// The client's side of a body read ahead: the frames the task has read,
/// in order, then the rest of the body if the task handed it back.
#[derive(Debug)]
pub struct Ahead {
    pieces: tokio::sync::mpsc::UnboundedReceiver<Piece>,
    rest: Option<ProxyBody>,
    /// Bytes still to come, when the body's length is known.
    left: Option<u64>,
}

impl Ahead {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if let Some(rest) = &mut self.rest {
                return Pin::new(rest).poll_frame(cx);
            }
            let piece = match self.pieces.poll_recv(cx) {
                Poll::Ready(piece) => piece,
                Poll::Pending => return Poll::Pending,
            };
            match piece {
                Some(Piece::Frame(frame, _charge)) => {
                    if let (Some(left), Ok(frame)) = (&mut self.left, &frame) {
                        let len = frame.data_ref().map_or(0, Bytes::len);
                        *left = left.saturating_sub(len as u64);
                    }
                    return Poll::Ready(Some(frame));
                }
                Some(Piece::Rest(rest)) => self.rest = Some(rest),
                Some(Piece::End) => return Poll::Ready(None),
                // The task died (a runtime shutting down) mid-body: a
                // clean end here would pass a cut body off as whole.
                None => return Poll::Ready(Some(Err(BodyError::Lost))),
            }
        }
    }
}

impl Drop for Ahead {
    /// A body the task handed back past [`AHEAD_BUDGET`] and still being
    /// stored goes on into the cache without the client, as the task
    /// would have taken it on: the client gone, the copy was dropped while
    /// its `Cache-Status` said `stored` (review39c F1). Received or still
    /// in the channel (the task's last piece).
    fn drop(&mut self) {
        self.pieces.close();
        let mut rest = self.rest.take();
        while let Ok(piece) = self.pieces.try_recv() {
            if let Piece::Rest(body) = piece {
                rest = Some(body);
            }
        }
        if let Some(rest) = rest.filter(ProxyBody::is_capturing) {
            crate::task::spawn_background_read(rest.read_into_cache());
        }
    }
}

/// Reads `body` (one being stored) to its end, sending each frame on to
/// the client's side: the cache fills at the backend's pace, so requests
/// waiting for it are not held up by a slow first client (nginx buffers
/// upstream responses, Varnish fetches apart from delivery), and the
/// backend connection is free as soon as the backend is done (small frames
/// come joined, see [`Gathered`]). Past what the cache keeps, or past
/// [`AHEAD_BUDGET`], the rest goes back to the client's side to be read at
/// its pace. A client gone while the body is still being stored leaves the
/// rest to a background read.
async fn read_ahead(mut body: ProxyBody, pieces: tokio::sync::mpsc::UnboundedSender<Piece>) {
    let send = |frame: Result<Frame<Bytes>, BodyError>| {
        let charge = Charge::new(&frame);
        pieces.send(Piece::Frame(frame, charge)).is_ok()
    };
    loop {
        if !body.is_capturing() || AHEAD_HELD.load(Ordering::Relaxed) >= AHEAD_BUDGET {
            // The client gone meanwhile, the rest goes on into the cache.
            match pieces.send(Piece::Rest(body)) {
                Ok(()) => return,
                Err(tokio::sync::mpsc::error::SendError(piece)) => match piece {
                    Piece::Rest(rest) => body = rest,
                    _ => return,
                },
            }
            break;
        }
        let frame = tokio::select! {
            frame = http_body_util::BodyExt::frame(&mut body) => frame,
            () = pieces.closed() => break,
        };
        let Some(frame) = frame else {
            let _ = pieces.send(Piece::End);
            return;
        };
        let failed = frame.is_err();
        if !send(frame) {
            break;
        }
        if failed {
            return;
        }
        if body.is_end_stream() {
            let _ = pieces.send(Piece::End);
            return;
        }
    }
    crate::task::spawn_background_read(body.read_into_cache());
}

/// Data frames smaller than this that a backend has ready one after another
/// are joined into one (copied), so a body of tiny chunks (a row or an
/// event per chunk, or worse) costs a frame each in hyper's decoder but not
/// a write, an HTTP/2 frame or a cache piece each downstream.
const SMALL_FRAME: usize = 4 * 1024;

/// Up to this many bytes of small frames make one.
const BATCH: usize = 16 * 1024;

/// Threads that have polled a connection, for [`in_connection_poll`]'s
/// ids: each thread counts its polls apart from the others'.
static POLLING_THREADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// The next id of a connection poll on this thread: the thread's
    /// number in the top 24 bits, a count below, so no two threads give the
    /// same id (a task moved to another worker never finds its old id).
    static POLLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The one under way, 0 outside one.
    static POLLING: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `poll`, one poll of a client connection, marked as such: a
/// [`Gathered`] body that yields within it knows that being polled again
/// before it ends is not the task's next turn.
pub fn in_connection_poll<T>(poll: impl FnOnce() -> T) -> T {
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            POLLING.set(self.0);
        }
    }
    let mut this = POLLS.get();
    if this & POLL_COUNT == 0 {
        // The thread's first poll, or its count has wrapped: a (new) number.
        let thread = POLLING_THREADS.fetch_add(1, Ordering::Relaxed) + 1;
        debug_assert!(
            thread < 1 << (64 - POLL_COUNT_BITS),
            "2^24 threads numbered"
        );
        this = thread << POLL_COUNT_BITS;
    }
    this += 1;
    POLLS.set(if this & POLL_COUNT == POLL_COUNT {
        0
    } else {
        this
    });
    let _restore = Restore(POLLING.replace(this));
    poll()
}

const POLL_COUNT_BITS: u32 = 40;
const POLL_COUNT: u64 = (1 << POLL_COUNT_BITS) - 1;

/// The connection poll under way on this thread, 0 outside one.
fn connection_poll() -> u64 {
    POLLING.get()
}

/// A turn of the task let to others (see [`Gathered`]): the task wakes
/// itself and returns Pending, and knows on a later poll whether a turn
/// has passed. hyper's HTTP/1 server polls a body again within the same
/// turn when it has flushed, which is not a turn: [`in_connection_poll`]
/// tells the two apart. Outside a connection poll (HTTP/2's bodies are
/// polled from a task of h2's), the next poll is the next turn.
#[derive(Debug, Default)]
pub(super) struct Turn(Option<u64>);

impl Turn {
    /// Begins a wait: wakes the task and notes in which connection poll.
    pub(super) fn start<T>(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        self.mark();
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Begins a wait from this poll, which returns something: the task
    /// is polled again without a wake of its own.
    pub(super) fn mark(&mut self) {
        self.0 = Some(connection_poll());
    }

    /// Ready once a turn has passed since the wait began (and the wait is
    /// over); begins one if none is under way. Polled again within the
    /// poll that began it, the task is woken again all the same: should a
    /// poll ever be taken for the one that began it, that costs a turn,
    /// not a hang.
    pub(super) fn wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.0 {
            Some(at) if at != 0 && at == connection_poll() => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(_) => {
                self.0 = None;
                Poll::Ready(())
            }
            None => self.start(cx),
        }
    }

    /// Whether a wait is under way.
    pub(super) fn is_waiting(&self) -> bool {
        self.0.is_some()
    }

    /// Ends a wait: something came.
    pub(super) fn clear(&mut self) {
        self.0 = None;
    }
}

/// A request's body as it goes to a backend: small chunks the client has
/// ready together joined, as a response's are (see [`Gathered`]), and its
/// progress told to the upload's [`UploadEnded`] at the layer hyper polls:
/// a frame handed over, or hyper left waiting for the client. Told from
/// the body inside, a batch that ended because the client had nothing
/// more ready left "waiting for the client" set while hyper held the
/// frame, and a backend that stopped reading was never found out
/// (review32e H1).
pub struct Outgoing {
    inner: Gathered<RequestBody>,
    /// A clone of the body's own: dropped with it, so it never makes the
    /// upload look held by someone else (see [`UploadEnded::is_abandoned`]).
    ended: Option<UploadEnded>,
    /// Its backend connection's (see [`WriteAhead`]).
    write_ahead: Option<Arc<WriteAhead>>,
}

impl Outgoing {
    pub fn new(body: RequestBody) -> Self {
        let ended = body.ended.clone();
        Outgoing {
            inner: Gathered::new(body),
            ended,
            write_ahead: None,
        }
    }

    /// Sent on the connection whose writes `write_ahead` follows.
    pub fn paced(&mut self, write_ahead: Arc<WriteAhead>) {
        self.write_ahead = Some(write_ahead);
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(write_ahead) = &this.write_ahead {
            if write_ahead.held_back(cx) {
                // Waiting on the backend, not the client: the wait is not
                // the client's to answer for under `body_timeout`.
                this.inner.inner.stall.progress();
                if let Some(ended) = &this.ended {
                    ended.0.small_reads.store(true, Ordering::Relaxed);
                }
                return Poll::Pending;
            }
        }
        let polled = this.inner.poll_frame(cx);
        if let Some(write_ahead) = &this.write_ahead {
            write_ahead.handed(&polled);
        }
        if let Some(ended) = &this.ended {
            match &polled {
                Poll::Ready(Some(Ok(_))) => ended.took(),
                // A yield while gathering sends on its next turn.
                Poll::Pending if !this.inner.is_gathering() => ended.awaiting_client(),
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        Body::size_hint(&self.inner)
    }
}

/// A backend's body with the small data frames it has ready together
/// joined (see [`SMALL_FRAME`]). hyper's client decodes the next chunk
/// only once the body has taken the one before, on the connection's own
/// task; so when the next frame is not there yet, this yields (wakes
/// itself and returns Pending) to let that task run, and sends what it has
/// when a frame is still not there on its next turn. hyper's HTTP/1 server
/// polls a body again within the same turn when it has flushed, which is
/// not a turn: [`in_connection_poll`] tells the two apart. A backend that
/// sends an event and goes quiet has it sent on one turn later.
pub struct Gathered<B: Body> {
    inner: B,
    /// Made on the first small frame that is not the body's last, and kept
    /// for the batches after it.
    state: Option<Box<Gathering<B::Error>>>,
}

struct Gathering<E> {
    /// The first small frame, not yet copied (sent as it is if it stays
    /// alone); `Some` while frames are being gathered.
    first: Option<Bytes>,
    batch: bytes::BytesMut,
    /// What ended a batch (a larger frame, trailers, an error, the end),
    /// to hand on after it.
    held: Option<Option<Result<Frame<Bytes>, E>>>,
    /// Found the inner body empty and yielded since the last frame.
    yielded: Turn,
}

impl<E> Gathering<E> {
    /// Bytes taken from the inner body and not yet sent on (`batch` holds
    /// a copy of `first` once it holds anything).
    fn len(&self) -> usize {
        if self.batch.is_empty() {
            self.first.as_ref().map_or(0, Bytes::len)
        } else {
            self.batch.len()
        }
    }

    /// Adds `data`; Ready with what was gathered before it when the two
    /// would make more than [`BATCH`] (`data` then begins the next batch).
    fn add(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        let Some(first) = &self.first else {
            self.first = Some(data);
            return Poll::Pending;
        };
        if self.len() + data.len() > BATCH {
            let full = self.take();
            self.first = Some(data);
            return full;
        }
        if self.batch.is_empty() {
            self.batch.reserve(first.len() + data.len());
            self.batch.extend_from_slice(first);
        }
        self.batch.extend_from_slice(&data);
        Poll::Pending
    }

    /// What has been gathered, as one frame. A joined batch goes out in
    /// the buffer it grew in (at most twice its size), and the next starts
    /// a buffer of its own: nothing is held between batches (a long quiet
    /// stream keeps no buffer), and a frame never shares its buffer with
    /// another (one kept in a cache copy, or read ahead for a slow client,
    /// where only its length is charged, keeps nothing else alive).
    fn take(&mut self) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        self.yielded.clear();
        let first = self.first.take().unwrap_or_default();
        let data = if self.batch.is_empty() {
            first
        } else {
            std::mem::take(&mut self.batch).freeze()
        };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// `next` ends the batch: it goes on after it.
    fn take_before(
        &mut self,
        next: Option<Result<Frame<Bytes>, E>>,
    ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        self.held = Some(next);
        self.take()
    }
}

impl<B: Body<Data = Bytes>> std::fmt::Debug for Gathered<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gathered")
            .field("gathered", &self.state.as_ref().map_or(0, |s| s.len()))
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Gathered<B> {
    pub fn new(inner: B) -> Self {
        Gathered { inner, state: None }
    }

    /// Whether frames are being gathered: a Pending now is this body
    /// yielding, not its backend being slow.
    pub(crate) fn is_gathering(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.first.is_some())
    }
}

impl<B: Body<Data = Bytes> + Unpin> Gathered<B>
where
    B::Error: Unpin,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(state) = self.state.as_deref_mut() {
            match state.held.take() {
                // hyper drops what it has buffered when a body fails: the
                // data before the error goes out first, in the meantime.
                Some(Some(Err(e))) if !state.yielded.is_waiting() => {
                    state.held = Some(Some(Err(e)));
                    return state.yielded.start(cx);
                }
                Some(held) => return Poll::Ready(held),
                None => {}
            }
        }
        loop {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            let state = match self.state.as_deref_mut() {
                Some(state) if state.first.is_some() => state,
                state => match polled {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if data.len() < SMALL_FRAME && !self.inner.is_end_stream() => {
                            let state = match state {
                                Some(state) => state,
                                None => self.state.insert(Box::new(Gathering {
                                    first: None,
                                    batch: bytes::BytesMut::new(),
                                    held: None,
                                    yielded: Turn::default(),
                                })),
                            };
                            // The first: nothing to send yet.
                            let _ = state.add(data);
                            continue;
                        }
                        Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                    other => return other,
                },
            };
            match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.len() < SMALL_FRAME => {
                        state.yielded.clear();
                        if let Poll::Ready(full) = state.add(data) {
                            return Poll::Ready(full);
                        }
                        if state.len() == BATCH || self.inner.is_end_stream() {
                            return state.take();
                        }
                    }
                    Ok(data) => return state.take_before(Some(Ok(Frame::data(data)))),
                    Err(frame) => return state.take_before(Some(Ok(frame))),
                },
                Poll::Ready(other) => return state.take_before(other),
                Poll::Pending => match state.yielded.wait(cx) {
                    Poll::Ready(()) => return state.take(),
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Gathered<B>
where
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Gathered::poll_frame(self.get_mut(), cx)
    }

    fn is_end_stream(&self) -> bool {
        // Held, the end itself is no more to come: hyper stops polling a
        // sized body at its last byte, so the frame before it must say so.
        self.state
            .as_ref()
            .is_none_or(|s| s.first.is_none() && matches!(s.held, None | Some(None)))
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let gathered = self.state.as_ref().map_or(0, |s| {
            let held = match &s.held {
                Some(Some(Ok(frame))) => frame.data_ref().map_or(0, Bytes::len),
                _ => 0,
            };
            (s.len() + held) as u64
        });
        plus(self.inner.size_hint(), gathered)
    }
}

/// The bytes `skip..skip + left` of `inner`, cut as they stream. A range
/// miss's `inner` is read ahead ([`read_ahead`]): its task stores the
/// whole response, and goes on without the client once the range is sent
/// or the client leaves.
#[derive(Debug)]
pub struct Slice {
    inner: ProxyBody,
    /// Bytes still to drop before the range begins.
    skip: u64,
    /// Bytes of the range still to send.
    left: u64,
}

impl Slice {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        while self.left > 0 {
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                other => return other,
            };
            // Trailers belong to the whole body, not to a part of it.
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let len = data.len() as u64;
            if self.skip >= len {
                self.skip -= len;
                continue;
            }
            bytes::Buf::advance(&mut data, self.skip as usize);
            self.skip = 0;
            data.truncate(self.left.min(data.len() as u64) as usize);
            self.left -= data.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(None)
    }
}

impl ProxyBody {
    pub fn full(data: Bytes) -> Self {
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn empty() -> Self {
        ProxyBody::Full { data: None }
    }

    /// Its client takes it slower than its backend sends it: the backend
    /// is read in small pieces from then on (see
    /// [`UpstreamBody::slow_client`]). A body being read ahead for the
    /// cache is read at the cache's pace, not the client's.
    pub fn slow_client(&self) {
        match self {
            ProxyBody::Stream { inner, .. } => inner.inner.slow_client(),
            ProxyBody::Slice(slice) => slice.inner.slow_client(),
            ProxyBody::Gzip(gzip) => gzip.inner.slow_client(),
            // Handed back to be read at the client's pace (not stored).
            ProxyBody::Ahead(ahead) => {
                if let Some(rest) = &ahead.rest {
                    rest.slow_client();
                }
            }
            ProxyBody::Full { .. } => {}
        }
    }

    pub fn stream(
        inner: UpstreamBody,
        stall_timeout: Duration,
        in_flight: Option<InFlight>,
    ) -> Self {
        ProxyBody::Stream {
            inner: Gathered::new(inner),
            stall: StallGuard::new(stall_timeout),
            in_flight,
            capture: None,
            unattended: false,
        }
    }

    /// Stores the body in the cache once it has been relayed completely.
    pub fn with_capture(mut self, capture: Capture) -> Self {
        if let ProxyBody::Stream {
            capture: slot,
            inner,
            ..
        } = &mut self
        {
            if inner.is_end_stream() {
                // An empty body is never polled: store it right away.
                capture.finish();
            } else {
                *slot = Some(Box::new(capture));
            }
        }
        self
    }

    /// This body, read from the backend ahead of the client by a task of
    /// its own while it is being stored (see [`read_ahead`]); any other
    /// body is returned as it is.
    pub fn read_ahead(self) -> Self {
        if !matches!(
            self,
            ProxyBody::Stream {
                capture: Some(_),
                ..
            }
        ) {
            return self;
        }
        let left = self.size_hint().exact();
        let (send, pieces) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(read_ahead(self, send));
        ProxyBody::Ahead(Box::new(Ahead {
            pieces,
            rest: None,
            left,
        }))
    }

    /// `count` bytes of this body from byte `start` on (see [`Slice`]).
    pub fn slice(self, start: u64, count: u64) -> Self {
        ProxyBody::Slice(Box::new(Slice {
            inner: self,
            skip: start,
            left: count,
        }))
    }

    /// Reads a body nobody else reads for the cache's copy: one frame at a
    /// time, each within `body_timeout`, until the body ends (and is
    /// stored) or the copy gives up (past `max_object_size`).
    pub async fn read_into_cache(mut self) {
        self.unattend();
        while self.is_capturing() {
            if !matches!(http_body_util::BodyExt::frame(&mut self).await, Some(Ok(_))) {
                break;
            }
        }
    }

    /// Marks the backend's body as read with no client (see
    /// `ProxyBody::Stream::unattended`).
    fn unattend(&mut self) {
        match self {
            ProxyBody::Stream { unattended, .. } => *unattended = true,
            ProxyBody::Slice(slice) => slice.inner.unattend(),
            ProxyBody::Gzip(gzip) => gzip.inner.unattend(),
            ProxyBody::Full { .. } | ProxyBody::Ahead(_) => {}
        }
    }

    /// The response as the cache stores it, once this body has been read
    /// to its end; None when it is not being copied into the cache.
    pub fn entry_when_whole(
        &mut self,
    ) -> Option<tokio::sync::oneshot::Receiver<(Arc<crate::cache::Entry>, bool)>> {
        match self {
            ProxyBody::Stream {
                capture: Some(capture),
                ..
            } => Some(capture.entry_when_whole()),
            ProxyBody::Slice(slice) => slice.inner.entry_when_whole(),
            ProxyBody::Gzip(gzip) => gzip.inner.entry_when_whole(),
            _ => None,
        }
    }

    /// Whether a Pending from this body is its own yield to let the
    /// backend connection's task run (see [`Gathered`]), not its backend
    /// being slow.
    pub(super) fn is_gathering(&self) -> bool {
        match self {
            ProxyBody::Stream { inner, .. } => inner.is_gathering(),
            ProxyBody::Slice(slice) => slice.inner.is_gathering(),
            _ => false,
        }
    }

    /// Whether this body is being copied into the cache.
    pub fn is_capturing(&self) -> bool {
        match self {
            ProxyBody::Stream { capture, .. } => capture.is_some(),
            ProxyBody::Slice(slice) => slice.inner.is_capturing(),
            ProxyBody::Gzip(gzip) => gzip.inner.is_capturing(),
            // What its task reads is none of the client side's business.
            ProxyBody::Full { .. } | ProxyBody::Ahead(_) => false,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full { data } => {
                let piece = match data {
                    Some(rest) if rest.len() > FULL_PIECE => rest.split_to(FULL_PIECE),
                    _ => match data.take() {
                        Some(all) => all,
                        None => return Poll::Ready(None),
                    },
                };
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            ProxyBody::Stream {
                inner,
                stall,
                in_flight,
                capture,
                unattended,
            } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(mut frame))) => {
                    stall.progress();
                    if let Some(trailers) = frame.trailers_mut() {
                        super::headers::scrub_trailers(trailers);
                    }
                    if let (Some(copy), Some(data)) = (capture.as_mut(), frame.data_ref()) {
                        if !copy.data(data) {
                            *capture = None;
                        }
                    }
                    // hyper stops polling once a sized body reports its end,
                    // or after trailers (always the last frame), so the end
                    // is handled here, not only at Ready(None).
                    if frame.is_trailers() || inner.is_end_stream() {
                        in_flight.take();
                        if let Some(copy) = capture.take() {
                            copy.finish();
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    // A broken body is never stored.
                    if let Some(copy) = capture.take() {
                        copy.broken(502);
                    }
                    Poll::Ready(Some(Err(cut_short(
                        in_flight.take(),
                        e.into(),
                        *unattended,
                    ))))
                }
                Poll::Ready(None) => {
                    // Done: free the slot now, not when hyper drops the body.
                    in_flight.take();
                    if let Some(copy) = capture.take() {
                        copy.finish();
                    }
                    Poll::Ready(None)
                }
                // Yielding to let the backend's connection decode more.
                Poll::Pending if inner.is_gathering() => Poll::Pending,
                Poll::Pending => match stall.poll_stalled(cx, || inner.inner.read_lately()) {
                    Poll::Ready(()) => {
                        if let Some(copy) = capture.take() {
                            copy.broken(504);
                        }
                        let stalled = BodyError::Stalled(stall.timeout);
                        Poll::Ready(Some(Err(cut_short(in_flight.take(), stalled, *unattended))))
                    }
                    Poll::Pending => Poll::Pending,
                },
            },
            ProxyBody::Slice(slice) => slice.poll_frame(cx),
            ProxyBody::Gzip(gzip) => gzip.poll_frame(cx),
            ProxyBody::Ahead(ahead) => ahead.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Stream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Slice(slice) => slice.left == 0,
            ProxyBody::Gzip(gzip) => gzip.is_end_stream(),
            // Backends speak HTTP/1.1: a body of known length has no
            // trailers, so its last byte is its end (and HTTP/2 clients get
            // no extra empty frame); else the task says when it ends.
            ProxyBody::Ahead(ahead) => match &ahead.rest {
                Some(rest) => rest.is_end_stream(),
                None => ahead.left == Some(0),
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Stream { inner, .. } => inner.size_hint(),
            ProxyBody::Slice(slice) => SizeHint::with_exact(slice.left),
            // Known once sent.
            ProxyBody::Gzip(_) => SizeHint::default(),
            ProxyBody::Ahead(ahead) => match (&ahead.rest, ahead.left) {
                (Some(rest), _) => rest.size_hint(),
                (None, Some(left)) => SizeHint::with_exact(left),
                (None, None) => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The body of a response of `chunks` chunks of `size` bytes and a
    /// trailer field, through hyper's client as a backend's body comes.
    pub(in crate::proxy) async fn chunks_with_trailers(chunks: usize, size: usize) -> Incoming {
        served_body(move |mut stream| async move {
            let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..chunks {
                out.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                out.extend(std::iter::repeat_n(b'x', size));
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\nx-sum: 1\r\ncontent-digest: sha-256=:x:\r\n\r\n");
            stream.write_all(&out).await.unwrap();
        })
        .await
    }

    /// The body of the response `respond` writes on a backend's socket,
    /// once the request has come, through hyper's client as a backend's
    /// body comes.
    pub(in crate::proxy) async fn served_body<F, Fut>(respond: F) -> Incoming
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = stream.read(&mut [0; 1024]).await;
            respond(stream).await;
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<Bytes>,
        >(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
        tokio::spawn(connection);
        let response = sender
            .send_request(hyper::Request::new(http_body_util::Empty::new()))
            .await
            .unwrap();
        response.into_body()
    }

    /// The sizes of the data frames `body` gives through [`Gathered`],
    /// and its trailers.
    async fn gathered_frames(body: Incoming) -> (Vec<usize>, Option<http::HeaderMap>) {
        let mut body = Gathered::new(body);
        let (mut sizes, mut trailers) = (Vec::new(), None);
        let wait = std::time::Duration::from_secs(10);
        while let Some(frame) = tokio::time::timeout(wait, body.frame()).await.unwrap() {
            match frame.unwrap().into_data() {
                Ok(data) => sizes.push(data.len()),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (sizes, trailers)
    }

    /// A backend's body of 4,000 bytes being stored in `cache` for `path`.
    async fn capturing(cache: &Arc<crate::cache::Cache>, path: &str) -> ProxyBody {
        let fill = cache.begin_fill(format!("GET|http|h|{path}"));
        let now = std::time::SystemTime::now();
        let head = crate::cache::capture::Head {
            status: http::StatusCode::OK,
            reason: None,
            headers: http::HeaderMap::new(),
            timing: crate::cache::policy::Timing::new(&http::HeaderMap::new(), now, now),
            lifetime: Duration::from_secs(60),
            cc: crate::cache::policy::CacheControl::default(),
        };
        let capture = Capture::new(cache.clone(), fill, http::HeaderMap::new(), head, None);
        let inner = crate::upstream::UpstreamBody::unpooled(chunks_with_trailers(4, 1000).await);
        ProxyBody::stream(inner, Duration::from_secs(10), None).with_capture(capture)
    }

    /// A body the read-ahead task handed back (past `AHEAD_BUDGET`) and
    /// whose client then left goes on into the cache, taken from the
    /// channel by the client's side yet or not: it was dropped with its
    /// copy (review39c F1).
    #[tokio::test]
    async fn a_body_handed_back_and_then_left_is_still_stored() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let cache = crate::cache::Cache::new(crate::config::Cache::default(), metrics);
        for (stored, taken) in [(1, false), (2, true)] {
            let body = capturing(&cache, &format!("/{stored}")).await;
            let (send, pieces) = tokio::sync::mpsc::unbounded_channel();
            let mut ahead = Ahead {
                pieces,
                rest: None,
                left: None,
            };
            if taken {
                ahead.rest = Some(body);
            } else {
                send.send(Piece::Rest(body)).unwrap();
            }
            drop(ahead);
            let kept = tokio::time::timeout(Duration::from_secs(10), async {
                while cache.stats().await.0 < stored {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            assert!(kept.await.is_ok(), "taken: {taken}: stored");
        }
    }

    #[tokio::test]
    async fn small_frames_come_joined_and_the_trailers_after_them() {
        let (sizes, trailers) = gathered_frames(chunks_with_trailers(40_000, 1).await).await;
        assert_eq!(sizes.iter().sum::<usize>(), 40_000);
        assert!(sizes.iter().all(|&size| size <= BATCH), "{sizes:?}");
        assert!(sizes.len() <= 40, "{} frames", sizes.len());
        assert_eq!(trailers.unwrap()["x-sum"], "1");
    }

    #[tokio::test]
    async fn a_batch_never_outgrows_its_bound() {
        // 3000-byte frames: five make 15,000 bytes, a sixth would make 18,000.
        let (sizes, _) = gathered_frames(chunks_with_trailers(60, 3000).await).await;
        assert_eq!(sizes.iter().sum::<usize>(), 180_000);
        assert!(sizes.iter().all(|&size| size <= BATCH), "{sizes:?}");
        assert!(sizes.len() <= 15, "{sizes:?}");
    }

    #[test]
    fn no_two_threads_number_a_connection_poll_alike() {
        // A task that yields in one worker's poll and is next polled by
        // another must not find the id it yielded in.
        let ids = || {
            (0..1000)
                .map(|_| in_connection_poll(connection_poll))
                .collect::<std::collections::HashSet<_>>()
        };
        let other = std::thread::spawn(ids).join().unwrap();
        let here = ids();
        assert_eq!(here.len(), 1000);
        assert!(here.is_disjoint(&other));
        assert!(!here.contains(&0));
        assert_eq!(connection_poll(), 0, "0 outside a connection poll");
    }

    /// A body of known length whose frames are all ready at once.
    struct Ready(std::collections::VecDeque<Bytes>);

    impl Body for Ready {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|d| d.len() as u64).sum())
        }
    }

    /// hyper stops polling a sized body at its last byte: the frame that
    /// carries it must come with the body's end, even when it is held
    /// back to begin a batch of its own (review27c).
    #[test]
    fn a_gathered_sized_body_ends_with_its_last_byte() {
        let frames = (0..6).map(|_| Bytes::from(vec![b'x'; 3000])).collect();
        let mut body = Gathered::new(Ready(frames));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut sent = 0;
        while sent < 18_000 {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => sent += frame.into_data().unwrap().len(),
                other => panic!("{other:?} after {sent} bytes"),
            }
        }
        assert!(body.is_end_stream());
    }
}
