//! Closing idle client connections, like nginx's `keepalive_timeout` and
//! `http2_idle_timeout`: a connection that moved no byte either way for
//! `[server].idle_timeout`, with no request being answered, is shut down
//! politely (HTTP/2 GOAWAY; HTTP/1.1 simply closed between requests).
//! HTTP/1.1 connections are usually closed sooner by hyper's head timer,
//! which also runs while a keep-alive connection waits for its next
//! request (`request_header_timeout`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the watchdog reads: a stamp bumped by every transfer and the
/// number of requests whose response head is still being produced.
#[derive(Debug, Default)]
pub(super) struct Activity {
    stamp: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn bump(&self) {
        self.stamp.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks a request in progress until the guard drops.
    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once the connection has been idle for `timeout` (checked
    /// every quarter of it, so it fires within 1.25 x `timeout`).
    pub(super) async fn idle_for(&self, timeout: Duration) {
        let step = timeout / 4;
        let mut last = self.stamp.load(Ordering::Relaxed);
        let mut quiet = Duration::ZERO;
        while quiet < timeout {
            tokio::time::sleep(step).await;
            let now = self.stamp.load(Ordering::Relaxed);
            if now != last || self.busy.load(Ordering::Relaxed) > 0 {
                last = now;
                quiet = Duration::ZERO;
            } else {
                quiet += step;
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
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if result.is_ready() {
            self.activity.bump();
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
        if result.is_ready() {
            self.activity.bump();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if result.is_ready() {
            self.activity.bump();
        }
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
