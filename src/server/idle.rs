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
//!   balancer's count and any cache fill it leads for as long as it likes.
//!
//! A request counts as being answered from its head until its response
//! body has been handed over whole, so a long download is never cut while
//! the client keeps reading.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

    /// Marks a request in progress until the guard drops.
    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_pending.store(false, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once the connection has been idle for `idle`, has had its
    /// writes blocked for `idle`, or (HTTP/1) has spent `head` on a request
    /// head. Checked every quarter of the shorter one, so it fires within
    /// 1.25 x its timeout.
    pub(super) async fn expired(&self, idle: Duration, head: Duration) -> Expired {
        // A floor so a millisecond timeout does not spin a timer per
        // connection; such a timeout then fires within 10 ms of its due.
        let step = (idle.min(head) / 4).max(Duration::from_millis(10));
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
            idle_quiet = if busy || now.0 != last.0 {
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
            let stuck = now.1 == last.1 && self.write_blocked.load(Ordering::Relaxed);
            unread = if stuck { unread + step } else { Duration::ZERO };
            last = now;
            if head_wait >= head {
                return Expired::Head;
            }
            if unread >= idle {
                return Expired::Unread;
            }
            if idle_quiet >= idle {
                return Expired::Idle;
            }
        }
    }
}

pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.bump();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as being answered
    /// until hyper has taken all of it (and dropped it).
    pub(super) struct Answering<B> {
        #[pin]
        body: B,
        busy: Busy,
    }
}

impl<B> Answering<B> {
    pub(super) fn new(body: B, busy: Busy) -> Self {
        Answering { body, busy }
    }
}

impl<B: Body> Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's stream, bumping [`Activity`] on every transfer.
pub(super) struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO> Tracked<IO> {
    pub(super) fn new(io: IO, activity: Arc<Activity>) -> Self {
        Tracked { io, activity }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if result.is_ready() {
            let activity = &self.activity;
            activity.bump();
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                if activity.busy.load(Ordering::Relaxed) == 0 {
                    // Nothing is being answered: these bytes start a head.
                    activity.head_pending.store(true, Ordering::Relaxed);
                }
                if !activity.opened.swap(true, Ordering::Relaxed) {
                    // RFC 9113 §3.4: an HTTP/2 client opens with "PRI * HTTP/2.0".
                    let h2 = read.starts_with(b"PRI ");
                    activity.multiplexed.store(h2, Ordering::Relaxed);
                }
            }
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
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.activity.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
