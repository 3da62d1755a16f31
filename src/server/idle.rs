//! Closing client connections that are not being used, like nginx's
//! `keepalive_timeout` and `client_header_timeout` (HAProxy's `timeout
//! http-keep-alive` and `timeout http-request`), with one watchdog per
//! connection instead of a timer per request:
//!
//! - a connection that moved no byte either way for `[server].idle_timeout`,
//!   with no request being answered, is shut down politely (HTTP/2 GOAWAY;
//!   HTTP/1.1 simply closed between requests). This is also how long an
//!   idle HTTP/1.1 keep-alive connection is held;
//! - an HTTP/1.1 request head must arrive whole within
//!   `request_header_timeout`, counted from the connection's start for its
//!   first request and from the head's first byte for the ones after; a
//!   client trickling a head in is closed, whatever it sends meanwhile.
//!   HTTP/2 connections, recognised by their preface, have no heads to wait
//!   for between streams and are left to the idle timeout;
//! - a connection whose writes have been blocked for `idle_timeout`, with
//!   not one byte taken by the client meanwhile, is dropped, like nginx's
//!   `send_timeout` (HAProxy's `timeout client`): a client that stopped
//!   reading would otherwise hold its backend connection, its slot in the
//!   balancer's count and any cache fill it leads for as long as it likes;
//! - on HTTP/2 the same per stream: a response body whose client has kept
//!   the stream's flow-control window shut for `idle_timeout` is dropped
//!   (see [`Watched`]), while the connection's other streams go on;
//! - an HTTP/1.1 connection waiting for its next request for a step of at
//!   least a second, with nothing read that hyper has not taken
//!   ([`Activity::all_read_taken`]) and no response still being flushed,
//!   is reported parkable ([`Expired::Parkable`]): the server then lets
//!   hyper go and keeps only the socket until the client writes again
//!   (see `server::park`).
//!
//! A request counts as being answered from its head until its response
//! body has been handed over whole, so a long download is never cut while
//! the client keeps reading.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::proxy::body::{BodyError, ProxyBody};

/// What the watchdog reads, bumped by the connection as it works.
#[derive(Debug)]
pub(super) struct Activity {
    /// Every read or write.
    stamp: AtomicU64,
    /// Every write.
    writes: AtomicU64,
    /// Requests whose response has not been handed over whole.
    busy: AtomicUsize,
    /// Head bytes have arrived (or the connection is new) and the request
    /// they start has not begun yet.
    head_pending: AtomicBool,
    /// The client opened with the HTTP/2 preface.
    multiplexed: AtomicBool,
    /// The first read has been looked at for the preface.
    opened: AtomicBool,
    /// The last write found the socket full.
    write_blocked: AtomicBool,
    /// Requests begun on this connection.
    started: AtomicU64,
    /// Ends of request heads (empty lines) in what the client has sent.
    heads_read: AtomicU64,
    /// The last bytes read left no part of a head behind: they ended
    /// with a head's end (or with empty lines after one).
    read_to_head_end: AtomicBool,
    /// A request with a body has begun. What hyper has read can no longer
    /// be told from what it has taken, so the connection is not parked:
    /// bytes hyper holds unparsed would go with its buffer.
    bodied: AtomicBool,
    /// The connection is being ended to be parked (see [`Tracked`]).
    parking: AtomicBool,
    /// Shutdown has begun: answers say `Connection: close`.
    closing: AtomicBool,
    /// The HTTP/2 streams being answered (see [`Watched`]).
    streams: Mutex<Vec<StreamWatch>>,
}

/// The watchdog's timeouts (see [`Activity::expired`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// No byte either way and nothing being answered.
    pub idle: Duration,
    /// An HTTP/1 request head arriving.
    pub head: Duration,
    /// A client taking no byte of a response (writes blocked, or an
    /// HTTP/2 stream's window shut).
    pub unread: Duration,
    /// An HTTP/1 connection between requests, with at least one behind
    /// it, this long idle may be parked; `None` never.
    pub park: Option<Duration>,
}

/// Why the watchdog fired.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Expired {
    /// Nothing moved for `idle_timeout`.
    Idle,
    /// No request head arrived within `request_header_timeout`.
    Head,
    /// The client took no byte of a response for `idle_timeout`.
    Unread,
    /// An HTTP/1 keep-alive connection has waited this long for its next
    /// request: hyper's connection and buffers can go, and the socket wait
    /// on its own (see `server::park`).
    Parkable(Duration),
}

impl Activity {
    /// A new connection: its first head is already awaited.
    pub(super) fn new() -> Self {
        Activity {
            stamp: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            head_pending: AtomicBool::new(true),
            multiplexed: AtomicBool::new(false),
            opened: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            started: AtomicU64::new(0),
            heads_read: AtomicU64::new(0),
            read_to_head_end: AtomicBool::new(false),
            bodied: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        }
    }

    fn bump(&self) {
        self.stamp.fetch_add(1, Ordering::Relaxed);
    }

    /// After a write attempt: progress, or a full socket.
    fn wrote<T>(&self, result: &Poll<T>) {
        match result {
            Poll::Ready(_) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.write_blocked.store(false, Ordering::Relaxed);
                self.bump();
            }
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
        }
    }

    /// After a flush: a full socket, or (only if it was full) progress.
    /// hyper flushes on every poll of the connection, so a flush with
    /// nothing to send is no sign of life.
    fn flushed<T>(&self, result: &Poll<T>) {
        match result {
            Poll::Ready(_) => {
                if self.write_blocked.swap(false, Ordering::Relaxed) {
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    self.bump();
                }
            }
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
        }
    }

    /// Marks a request in progress until the guard drops.
    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        self.head_pending.store(false, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Marks the request just begun as one with a body.
    pub(super) fn has_body(&self) {
        self.bodied.store(true, Ordering::Relaxed);
    }

    /// Requests begun so far.
    pub(super) fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether hyper has taken every byte the client sent: each head read
    /// has begun its request, the last read ended with a head, and no
    /// request had a body (whose end only hyper knows). Parking drops
    /// hyper's read buffer; anything in it would be lost.
    pub(super) fn all_read_taken(&self) -> bool {
        !self.bodied.load(Ordering::Relaxed)
            && self.read_to_head_end.load(Ordering::Relaxed)
            && self.heads_read.load(Ordering::Relaxed) == self.started()
    }

    /// Notes bytes the client sent: a new head beginning, the HTTP/2
    /// preface, and (while heads can be counted) the ends of heads.
    fn on_read(&self, read: &[u8], ends: &mut HeadEnds) {
        self.bump();
        if read.is_empty() {
            return;
        }
        if self.busy.load(Ordering::Relaxed) == 0 {
            // Nothing is being answered: these bytes start a head.
            self.head_pending.store(true, Ordering::Relaxed);
        }
        if !self.opened.swap(true, Ordering::Relaxed) {
            // RFC 9113 §3.4: an HTTP/2 client opens with "PRI * HTTP/2.0".
            // Not any `PRI` method: that would turn the head timer off for
            // an HTTP/1 client. One whose preface came split is known by
            // its first answer instead (see `Answering::watched`).
            let h2 = read.starts_with(b"PRI * HTTP/2.0");
            self.multiplexed.store(h2, Ordering::Relaxed);
        }
        if self.bodied.load(Ordering::Relaxed) || self.multiplexed.load(Ordering::Relaxed) {
            return;
        }
        let (found, at_end) = ends.scan(read);
        self.heads_read.fetch_add(found, Ordering::Relaxed);
        self.read_to_head_end.store(at_end, Ordering::Relaxed);
    }

    /// Whether the client opened with the HTTP/2 preface (or a stream
    /// has been answered as HTTP/2).
    pub(super) fn is_multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    /// From now on every answer tells the client the connection closes.
    pub(super) fn close_after_answers(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// From now on a shutdown of the socket is skipped and the socket
    /// handed back when hyper drops it (see [`Tracked`]).
    pub(super) fn park(&self) {
        self.parking.store(true, Ordering::Relaxed);
    }

    /// Resolves once the connection has been idle for `limits.idle`, has
    /// had its writes blocked for `limits.unread`, or (HTTP/1) has spent
    /// `limits.head` on a request head, or may be parked (`limits.park`);
    /// meanwhile drops HTTP/2 responses whose window stayed shut for
    /// `limits.unread`. Checked every quarter of the shortest of the first
    /// three, so each fires within 1.25 x its timeout; parking, which needs
    /// no precision, adds no wake-ups of its own.
    pub(super) async fn expired(&self, limits: Limits) -> Expired {
        let Limits {
            idle,
            head,
            unread: unread_limit,
            park,
        } = limits;
        // A floor so a millisecond timeout does not spin a timer per
        // connection; such a timeout then fires within 10 ms of its due.
        let step = (idle.min(head).min(unread_limit) / 4).max(Duration::from_millis(10));
        let mut last = (
            self.stamp.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        );
        let mut idle_quiet = Duration::ZERO;
        let mut head_wait = Duration::ZERO;
        let mut unread = Duration::ZERO;
        loop {
            tokio::time::sleep(step).await;
            let now = (
                self.stamp.load(Ordering::Relaxed),
                self.writes.load(Ordering::Relaxed),
            );
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            // Bytes hyper holds for a full socket are a response still
            // being sent, though its body was handed over (a cache hit is
            // one frame): that silence is for the unread limit to judge.
            let sending = self.write_blocked.load(Ordering::Relaxed);
            idle_quiet = if busy || sending || now.0 != last.0 {
                Duration::ZERO
            } else {
                idle_quiet + step
            };
            // Writes still draining the last response (to a slow reader)
            // hold the head timer back: hyper reads the next head after.
            let waiting = !busy
                && now.1 == last.1
                && self.head_pending.load(Ordering::Relaxed)
                && !self.multiplexed.load(Ordering::Relaxed);
            head_wait = if waiting {
                head_wait + step
            } else {
                Duration::ZERO
            };
            let stuck = now.1 == last.1 && sending;
            unread = if stuck { unread + step } else { Duration::ZERO };
            last = now;
            if self.multiplexed.load(Ordering::Relaxed) {
                self.abandon_shut_streams(step, unread_limit);
            }
            if head_wait >= head {
                return Expired::Head;
            }
            if unread >= unread_limit {
                return Expired::Unread;
            }
            if idle_quiet >= idle {
                return Expired::Idle;
            }
            let between_requests = !self.head_pending.load(Ordering::Relaxed)
                && !self.multiplexed.load(Ordering::Relaxed)
                && self.started() > 0
                && self.all_read_taken();
            if park.is_some_and(|park| idle_quiet >= park) && between_requests {
                return Expired::Parkable(idle_quiet);
            }
        }
    }

    /// Called every `step`: drops the body of each HTTP/2 stream whose
    /// client has kept its window shut for `limit` (see [`Watched`]), and
    /// forgets the streams that are done.
    fn abandon_shut_streams(&self, step: Duration, limit: Duration) {
        let mut abandoned = 0;
        lock(&self.streams).retain_mut(|watch| {
            let Some(stream) = watch.stream.upgrade() else {
                return false;
            };
            let handed = stream.handed.load(Ordering::Relaxed);
            if handed != watch.last || !stream.with_client.load(Ordering::Relaxed) {
                watch.last = handed;
                watch.shut = Duration::ZERO;
                return true;
            }
            watch.shut += step;
            if watch.shut < limit {
                return true;
            }
            if stream.abandon(handed) {
                abandoned += 1;
                return false;
            }
            watch.shut = Duration::ZERO;
            true
        });
        if abandoned > 0 {
            tracing::info!(
                streams = abandoned,
                "HTTP/2 client kept a stream's window shut for idle_timeout; its response was abandoned"
            );
        }
    }
}

#[derive(Debug)]
pub(super) struct Busy(Arc<Activity>);

impl Busy {
    /// Whether this answer should say `Connection: close` (shutdown).
    pub(super) fn closing(&self) -> bool {
        self.0.closing.load(Ordering::Relaxed)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.bump();
    }
}

/// A response body that keeps its request counted as being answered
/// until hyper has taken all of it (and dropped it).
pub(super) enum Answering {
    Direct {
        body: ProxyBody,
        _busy: Busy,
    },
    /// An HTTP/2 stream's body, which the connection's watchdog may take
    /// away (see [`Activity::abandon_shut_streams`]).
    Watched(Arc<Watched>),
}

impl Answering {
    pub(super) fn new(body: ProxyBody, busy: Busy) -> Self {
        Answering::Direct { body, _busy: busy }
    }

    /// For a stream of a multiplexed connection: the watchdog gets to see
    /// whether the client keeps its flow-control window shut.
    pub(super) fn watched(body: ProxyBody, busy: Busy) -> Self {
        let activity = busy.0.clone();
        // Whatever the first read looked like, this is an HTTP/2
        // connection: let the watchdog look at its streams.
        activity.multiplexed.store(true, Ordering::Relaxed);
        let watched = Arc::new(Watched {
            slot: Mutex::new(Some(Stream {
                body,
                rest: Bytes::new(),
                _busy: busy,
            })),
            handed: AtomicU64::new(0),
            with_client: AtomicBool::new(false),
        });
        let mut streams = lock(&activity.streams);
        if streams.len() == streams.capacity() {
            // Forget finished streams before growing: a busy connection
            // would otherwise keep each one's allocation until the next
            // tick, which may be seconds away.
            streams.retain(|watch| watch.stream.strong_count() > 0);
        }
        streams.push(StreamWatch {
            stream: Arc::downgrade(&watched),
            last: 0,
            shut: Duration::ZERO,
        });
        drop(streams);
        Answering::Watched(watched)
    }
}

impl Body for Answering {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Answering::Direct { body, .. } => Pin::new(body).poll_frame(cx),
            Answering::Watched(watched) => watched.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answering::Direct { body, .. } => body.is_end_stream(),
            Answering::Watched(watched) => lock(&watched.slot)
                .as_ref()
                .is_some_and(|s| s.rest.is_empty() && s.body.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answering::Direct { body, .. } => body.size_hint(),
            Answering::Watched(watched) => {
                lock(&watched.slot)
                    .as_ref()
                    .map_or_else(SizeHint::default, |s| {
                        let held = s.rest.len() as u64;
                        let hint = s.body.size_hint();
                        let mut total = SizeHint::new();
                        total.set_lower(hint.lower() + held);
                        if let Some(upper) = hint.upper() {
                            total.set_upper(upper + held);
                        }
                        total
                    })
            }
        }
    }
}

/// One HTTP/2 response body, shared between hyper (which polls it) and
/// the connection's watchdog (which may drop it).
///
/// hyper asks an HTTP/2 body for its next frame only once the frame before
/// has found room in the client's flow-control window. A client that keeps
/// a stream's window shut therefore stalls it without blocking the socket,
/// which other streams go on using, and without the body ever learning of
/// it: `body_timeout` only counts waits on the backend. nginx ends such a
/// stream after `send_timeout`; here the watchdog drops a body that has
/// handed hyper a frame and not been asked for the next for `idle_timeout`,
/// which lets its backend connection, in-flight slot and any cache fill go.
/// Frames go out in slices of at most [`SLICE`] bytes, the size of an
/// HTTP/2 DATA frame, so a slow reader shows progress as it reads.
#[derive(Debug)]
pub(super) struct Watched {
    /// `None` once abandoned.
    slot: Mutex<Option<Stream>>,
    /// Frames handed to hyper so far.
    handed: AtomicU64,
    /// The last poll handed over a frame: hyper waits for the client's
    /// window before it asks again.
    with_client: AtomicBool,
}

/// What a watched stream holds until it ends or is abandoned.
#[derive(Debug)]
struct Stream {
    body: ProxyBody,
    /// The part of the body's last frame not handed over yet.
    rest: Bytes,
    /// The request's place in the connection's busy count.
    _busy: Busy,
}

/// The most a watched stream hands hyper at once: HTTP/2's default
/// SETTINGS_MAX_FRAME_SIZE.
const SLICE: usize = 16 * 1024;

impl Stream {
    fn poll_slice(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.rest.is_empty() {
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.rest = data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                other => return Poll::Ready(other),
            }
        }
        let slice = self.rest.split_to(self.rest.len().min(SLICE));
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }
}

impl Watched {
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut slot = lock(&self.slot);
        let Some(stream) = slot.as_mut() else {
            // hyper resets the stream on an error.
            return Poll::Ready(Some(Err(BodyError::Abandoned)));
        };
        let result = stream.poll_slice(cx);
        let handed = matches!(result, Poll::Ready(Some(Ok(_))));
        if handed {
            self.handed.fetch_add(1, Ordering::Relaxed);
        }
        self.with_client.store(handed, Ordering::Relaxed);
        result
    }

    /// Drops the body if hyper still waits on the client to take the frame
    /// that was `handed` as `last`.
    fn abandon(&self, last: u64) -> bool {
        let taken = {
            let mut slot = lock(&self.slot);
            // Re-read under the lock a poll holds while it counts.
            if !self.with_client.load(Ordering::Relaxed)
                || self.handed.load(Ordering::Relaxed) != last
            {
                return false;
            }
            slot.take()
        };
        taken.is_some()
    }
}

/// The watchdog's view of one HTTP/2 stream.
#[derive(Debug)]
struct StreamWatch {
    stream: Weak<Watched>,
    /// `handed` when last looked at.
    last: u64,
    /// How long the stream has waited on the client's window.
    shut: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The client's stream, bumping [`Activity`] on every transfer.
pub(super) struct Tracked<IO> {
    /// Always `Some` until dropped.
    io: Option<IO>,
    activity: Arc<Activity>,
    /// Where the socket goes when hyper drops it after [`Activity::park`].
    hand_back: Option<oneshot::Sender<IO>>,
    ends: HeadEnds,
}

/// Finds where request heads end (an empty line after a line of text,
/// CRLF or a bare LF as hyper accepts) in the bytes a client sends,
/// across reads. An empty line with no head before it (RFC 9112 §2.2 lets
/// a server ignore one before a request line; some clients send one after
/// a request) ends nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadEnds {
    line: Line,
    /// A line of text has come since the last empty line.
    in_head: bool,
}

/// What the line being read holds so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Empty,
    Cr,
    Text,
}

impl HeadEnds {
    /// A new connection: at the start of a line, no head begun.
    const NEW: HeadEnds = HeadEnds {
        line: Line::Empty,
        in_head: false,
    };

    /// How many heads end in `read`, and whether it ends at the end of a
    /// line with no head begun (so nothing of one is left over).
    fn scan(&mut self, read: &[u8]) -> (u64, bool) {
        let mut found = 0;
        let mut start = 0;
        let HeadEnds {
            mut line,
            mut in_head,
        } = *self;
        for newline in memchr::memchr_iter(b'\n', read) {
            let empty = matches!(
                (line, &read[start..newline]),
                (Line::Empty, b"" | b"\r") | (Line::Cr, b"")
            );
            found += u64::from(empty && in_head);
            in_head = !empty;
            line = Line::Empty;
            start = newline + 1;
        }
        line = match (line, &read[start..]) {
            (line, b"") => line,
            (Line::Empty, b"\r") => Line::Cr,
            _ => Line::Text,
        };
        *self = HeadEnds { line, in_head };
        (found, start == read.len() && !in_head)
    }
}

impl<IO> Tracked<IO> {
    pub(super) fn new(io: IO, activity: Arc<Activity>, hand_back: oneshot::Sender<IO>) -> Self {
        Tracked {
            io: Some(io),
            activity,
            hand_back: Some(hand_back),
            ends: HeadEnds::NEW,
        }
    }

    fn io(&mut self) -> Pin<&mut IO>
    where
        IO: Unpin,
    {
        Pin::new(self.io.as_mut().expect("the socket is there until drop"))
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        if self.activity.parking.load(Ordering::Relaxed) {
            if let (Some(io), Some(hand_back)) = (self.io.take(), self.hand_back.take()) {
                let _ = hand_back.send(io);
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = self.io().poll_read(cx, buf);
        if result.is_ready() {
            let this = &mut *self;
            this.activity
                .on_read(&buf.filled()[before..], &mut this.ends);
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = self.io().poll_write(cx, buf);
        self.activity.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = self.io().poll_write_vectored(cx, bufs);
        self.activity.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(IO::is_write_vectored)
    }

    /// Watched like a write: over TLS, `poll_write` takes plaintext into
    /// rustls at once and only a flush finds the socket full, so a client
    /// that stopped reading near the end of a response shows here alone.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = self.io().poll_flush(cx);
        self.activity.flushed(&result);
        result
    }

    /// Skipped for a connection being parked: the socket stays open.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.activity.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        self.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_watched_stream_hands_over_data_frame_sized_slices() {
        let activity = Arc::new(Activity::new());
        let body = ProxyBody::full(Bytes::from(vec![7u8; 3 * SLICE + 5]));
        let mut answering = Answering::watched(body, activity.busy());
        assert_eq!(answering.size_hint().exact(), Some(3 * SLICE as u64 + 5));
        let mut sizes = Vec::new();
        while let Some(frame) = answering.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
        }
        // Each slice counts as progress for the watchdog.
        assert_eq!(sizes, [SLICE, SLICE, SLICE, 5]);
        let Answering::Watched(watched) = &answering else {
            unreachable!()
        };
        assert_eq!(watched.handed.load(Ordering::Relaxed), 4);
        assert!(answering.is_end_stream());
    }
}

#[cfg(test)]
mod park_tests {
    use super::*;

    const LIMITS: Limits = Limits {
        idle: Duration::from_secs(60),
        head: Duration::from_secs(10),
        unread: Duration::from_secs(60),
        park: Some(Duration::from_secs(1)),
    };

    /// What the watchdog says within a minute of (paused) time.
    async fn verdict(activity: &Activity) -> Option<Expired> {
        tokio::time::timeout(Duration::from_secs(59), activity.expired(LIMITS))
            .await
            .ok()
    }

    /// A connection that has read `sent` and begun `requests` bodiless
    /// requests, all answered since.
    fn after(sent: &[&[u8]], requests: usize) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        let mut ends = HeadEnds::NEW;
        for read in sent {
            activity.on_read(read, &mut ends);
        }
        for _ in 0..requests {
            drop(activity.busy());
        }
        activity
    }

    #[tokio::test(start_paused = true)]
    async fn only_an_http1_connection_between_requests_is_parkable() {
        // One request answered, nothing since: parkable after a step of
        // quiet (2.5 s here), with no wake-up of its own.
        let served = after(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], 1);
        assert_eq!(
            verdict(&served).await,
            Some(Expired::Parkable(Duration::from_millis(2500)))
        );

        // No request yet: the head timer's, not parking.
        let fresh = Arc::new(Activity::new());
        assert_eq!(verdict(&fresh).await, Some(Expired::Head));

        // A request being answered: never.
        let busy = Arc::new(Activity::new());
        let _answering = busy.busy();
        assert_eq!(verdict(&busy).await, None);

        // HTTP/2: its idle streams stay with hyper.
        let multiplexed = Arc::new(Activity::new());
        drop(multiplexed.busy());
        multiplexed.multiplexed.store(true, Ordering::Relaxed);
        assert_eq!(verdict(&multiplexed).await, None);

        // The next head has begun to arrive.
        let reading = Arc::new(Activity::new());
        drop(reading.busy());
        reading.head_pending.store(true, Ordering::Relaxed);
        assert_eq!(verdict(&reading).await, Some(Expired::Head));
    }

    /// Parking drops hyper's read buffer: never while it may hold bytes.
    #[tokio::test(start_paused = true)]
    async fn a_connection_hyper_may_hold_unparsed_bytes_for_is_not_parkable() {
        let parkable = Some(Expired::Parkable(Duration::from_millis(2500)));
        // Two whole pipelined heads in one read, both served.
        let pair = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(verdict(&after(&[pair], 2)).await, parkable);
        // A head split across reads, and bare LFs.
        let split: [&[u8]; 3] = [b"GET / HTTP/1.1\r", b"\nHost: a\r\n\r", b"\n"];
        assert_eq!(verdict(&after(&split, 1)).await, parkable);
        assert_eq!(
            verdict(&after(&[b"GET / HTTP/1.1\nHost: a\n\n"], 1)).await,
            parkable
        );
        // An empty line before a request, or after one, that hyper skips.
        let stray = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n";
        assert_eq!(verdict(&after(&[stray], 1)).await, parkable);

        // The start of the next head came with the last one: hyper holds it.
        let partial = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n";
        assert_eq!(verdict(&after(&[partial], 1)).await, None);
        // A whole head not begun yet (hyper yielded between the two).
        assert_eq!(verdict(&after(&[pair], 1)).await, None);
        // A request with a body, even with a bodiless one after it.
        let upload = Arc::new(Activity::new());
        let mut ends = HeadEnds::NEW;
        upload.on_read(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nok", &mut ends);
        drop(upload.busy());
        upload.has_body();
        upload.on_read(b"GET / HTTP/1.1\r\n\r\n", &mut ends);
        drop(upload.busy());
        assert_eq!(verdict(&upload).await, None);
    }

    #[test]
    fn head_ends_are_found_across_reads() {
        let mut ends = HeadEnds::NEW;
        assert_eq!(ends.scan(b"GET / HTTP/1.1\r\nHost: a\r\n"), (0, false));
        assert_eq!(ends.scan(b"\r"), (0, false));
        assert_eq!(ends.scan(b"\nGET /b HTTP/1.1\r\n\r\nGET"), (2, false));
        assert_eq!(ends.scan(b" /c HTTP/1.1\n\n"), (1, true));
        // Text before the CR: not an empty line.
        assert_eq!(ends.scan(b"GET /d HTTP/1.1\r\nx\r"), (0, false));
        assert_eq!(ends.scan(b"\n"), (0, false));
        // Empty lines with no head before them end nothing.
        let mut ends = HeadEnds::NEW;
        assert_eq!(ends.scan(b"\r\nGET / HTTP/1.1\r\n\r\n\r\n"), (1, true));
        assert_eq!(ends.scan(b"\n\r\n"), (0, true));
    }

    /// A socket that takes every write and never finishes a flush: TLS
    /// records rustls holds for a client that stopped reading.
    struct Unflushed;

    impl AsyncRead for Unflushed {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Unflushed {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_still_being_flushed_is_not_parked() {
        let activity = after(&[b"GET / HTTP/1.1\r\n\r\n"], 1);
        let (hand_back, _) = oneshot::channel();
        let mut socket = Tracked::new(Unflushed, activity.clone(), hand_back);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let wrote = Pin::new(&mut socket).poll_write(&mut cx, b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(wrote.is_ready());
        assert!(Pin::new(&mut socket).poll_flush(&mut cx).is_pending());
        // Parked, the socket would be closed with the response's end unsent.
        assert_eq!(verdict(&activity).await, None);
    }
}
