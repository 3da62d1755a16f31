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
//!   for between streams; but a header block begun (a HEADERS frame
//!   without END_HEADERS) must end within the same timeout, as nginx's
//!   `client_header_timeout` times it (see [`Frames`]);
//! - a connection whose writes have been blocked for `idle_timeout`, with
//!   not one byte taken by the client meanwhile, is dropped, like nginx's
//!   `send_timeout` (HAProxy's `timeout client`): a client that stopped
//!   reading would otherwise hold its backend connection, its slot in the
//!   balancer's count and any cache fill it leads for as long as it likes;
//! - on HTTP/2 the same per stream: a response body whose client has kept
//!   the stream's flow-control window shut for `idle_timeout` is dropped
//!   (see [`Watched`]), while the connection's other streams go on;
//! - an HTTP/1.1 connection waiting for its next request for a step of at
//!   least a second, with its last upload read whole
//!   ([`Activity::upload_read`]) and no response still being flushed, is
//!   reported parkable ([`Expired::Parkable`]): the server then lets hyper
//!   go, with any bytes it read past the last request, and keeps only the
//!   socket until the client writes again (see `server::park`).
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

use crate::proxy::body::{plus, BodyError, ProxyBody, UploadEnded, WriteAhead, SMALL_READ};
use crate::proxy::AccessTail;

/// What the watchdog reads, bumped by the connection as it works.
#[derive(Debug)]
pub(super) struct Activity {
    /// Every read or write.
    stamp: AtomicU64,
    /// Every write.
    writes: AtomicU64,
    /// HTTP/2 bytes written and read (see [`Activity::h2_sent`]).
    h2_out: AtomicU64,
    h2_in: AtomicU64,
    /// Requests whose response has not been handed over whole.
    busy: AtomicUsize,
    /// Head bytes have arrived (or the connection is new) and the request
    /// they start has not begun yet.
    head_pending: AtomicBool,
    /// Bytes of the pending head have arrived: a head left unfinished is
    /// a request that timed out, not a connection that sent nothing.
    head_begun: AtomicBool,
    /// The connection speaks HTTP/2 (see `protocol`).
    multiplexed: AtomicBool,
    /// An HTTP/2 header block has begun and not ended (see [`Frames`]).
    h2_block: AtomicBool,
    /// HTTP/2 header blocks begun so far: each is timed from its own
    /// start, not from an earlier one's that ended between two looks.
    h2_blocks: AtomicU64,
    /// The last write found the socket full.
    write_blocked: AtomicBool,
    /// Requests begun on this connection.
    started: AtomicU64,
    /// The last request begun has a body, in `upload`.
    upload_open: AtomicBool,
    /// Set once that body has been read to its end. Until then hyper may
    /// still be reading it, with the response long sent (a backend may
    /// answer before reading an upload), and the bytes that come are body,
    /// not a head. hyper reads the next head only after the body, so the
    /// next request begun says the same.
    upload: Mutex<Option<UploadEnded>>,
    /// The upgrade hyper armed for the last request with `Upgrade` (or
    /// CONNECT) that became no tunnel: the connection goes to it as it
    /// ends (see [`Busy::keep_upgrade`]).
    upgrade: Mutex<Option<hyper::upgrade::OnUpgrade>>,
    /// The connection is being ended to be parked (see [`Tracked`]).
    parking: AtomicBool,
    /// How long the connection had been idle before this hyper connection
    /// (parked in between).
    quiet_before: Duration,
    /// Shutdown has begun: answers say `Connection: close`.
    closing: AtomicBool,
    /// The HTTP/2 streams being answered (see [`Watched`]).
    streams: Mutex<Vec<StreamWatch>>,
    /// The head timer as of the watchdog's last look, for the next
    /// watchdog: the drain's takes over from the serving one without
    /// giving a head under way a fresh `request_header_timeout`.
    head_clock: Mutex<HeadClock>,
    /// Told when the connection has served its share of requests (see
    /// [`Activity::retire`]).
    retire: tokio::sync::Notify,
    /// The HTTP/2 flood found, if any (see [`Flood`]), woken once.
    flood: std::sync::OnceLock<&'static str>,
    flooding: tokio::sync::Notify,
    /// Set once the flood has been counted and said.
    flood_said: AtomicBool,
    /// An HTTP/1 response body broke off (see [`Activity::broke`]).
    broke: AtomicBool,
    /// That body was framed by the connection's close (to an HTTP/1.0
    /// client): the connection ends with a reset, or its FIN would make
    /// the cut body read as whole.
    reset: AtomicBool,
    /// An answer framed by the close was handed out: cut before it is
    /// whole, the connection ends with a reset (see
    /// [`Activity::close_framed_answered`]).
    close_framed: AtomicBool,
    /// What HTTP/1 response bodies have handed hyper and it has not
    /// written yet (see [`WriteAhead`]).
    write_ahead: WriteAhead,
}

/// The head timer at one look of the watchdog.
#[derive(Debug, Clone, Copy, Default)]
struct HeadClock {
    /// How long the head has been awaited.
    waited: Duration,
    /// Whether one was awaited then.
    waiting: bool,
    /// The connection's writes then: any since mean a response went out
    /// in between, and the wait is another.
    writes: u64,
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
    /// it, this long idle may be parked, and an HTTP/2 one this long
    /// without a stream counts as idle; `None` never.
    pub park: Option<Duration>,
    /// A connection that has read nothing yet counts as idle too after
    /// `park`: only to make room at `server.max_connections`, so only
    /// under a cap (see `server::serve_connection`).
    pub park_fresh: bool,
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
    /// on its own (see `server::park`). An HTTP/2 one has had no stream
    /// for this long: it may make room for a client at the cap (see
    /// `server::serve_connection`).
    Parkable(Duration),
}

impl Activity {
    /// A connection served again after parking, idle for `quiet` so far,
    /// with `unread` (what hyper had read of the next request) to read
    /// first: a head is awaited only if that holds more than empty lines.
    /// The wake-up alone may have been an empty line, which starts nothing
    /// and leaves the connection as idle as it was.
    pub(super) fn again(unread: &[u8], quiet: Duration) -> Self {
        let head_pending = !only_line_ends(unread);
        Activity {
            head_pending: AtomicBool::new(head_pending),
            head_begun: AtomicBool::new(head_pending),
            quiet_before: quiet,
            // A head begun behind the last request has waited since that
            // request was answered, as nginx times a pipelined head: the
            // timer goes on from there rather than from the parking
            // (audit25c: a 3 s timer fired at 5.3 s).
            head_clock: Mutex::new(HeadClock {
                waited: if head_pending { quiet } else { Duration::ZERO },
                waiting: head_pending,
                writes: 0,
            }),
            ..Self::new()
        }
    }

    /// A new connection: its first head is already awaited.
    pub(super) fn new() -> Self {
        Activity {
            stamp: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            head_pending: AtomicBool::new(true),
            head_begun: AtomicBool::new(false),
            multiplexed: AtomicBool::new(false),
            h2_block: AtomicBool::new(false),
            h2_blocks: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            started: AtomicU64::new(0),
            upload_open: AtomicBool::new(false),
            h2_out: AtomicU64::new(0),
            h2_in: AtomicU64::new(0),
            upload: Mutex::new(None),
            upgrade: Mutex::new(None),
            parking: AtomicBool::new(false),
            quiet_before: Duration::ZERO,
            closing: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
            head_clock: Mutex::new(HeadClock::default()),
            retire: tokio::sync::Notify::new(),
            flood: std::sync::OnceLock::new(),
            flooding: tokio::sync::Notify::new(),
            flood_said: AtomicBool::new(false),
            broke: AtomicBool::new(false),
            reset: AtomicBool::new(false),
            close_framed: AtomicBool::new(false),
            write_ahead: WriteAhead::default(),
        }
    }

    fn bump(&self) {
        self.stamp.fetch_add(1, Ordering::Relaxed);
    }

    /// After a write attempt: progress, or a full socket. On HTTP/2 the
    /// bytes are counted too (see [`Activity::h2_sent`]).
    fn wrote(&self, result: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result {
            if self.multiplexed.load(Ordering::Relaxed) {
                self.h2_out.fetch_add(*n as u64, Ordering::Relaxed);
            }
        }
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
        self.head_begun.store(false, Ordering::Relaxed);
        // hyper has read the last request's body whole: it reads the
        // next head only after.
        if self.upload_open.swap(false, Ordering::Relaxed) {
            *lock(&self.upload) = None;
        }
        Busy(self.clone())
    }

    /// Marks the HTTP/1 request just begun as one with a body, whose end
    /// `ended` will tell.
    pub(super) fn has_body(&self, ended: UploadEnded) {
        *lock(&self.upload) = Some(ended);
        self.upload_open.store(true, Ordering::Relaxed);
    }

    /// The upgrade [`Busy::keep_upgrade`] kept, if any.
    pub(super) fn take_upgrade(&self) -> Option<hyper::upgrade::OnUpgrade> {
        lock(&self.upgrade).take()
    }

    /// Requests begun so far.
    pub(super) fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether the last request's body, if it had one, has been read to
    /// its end: then hyper is past it, and a parked connection's next
    /// bytes are a head. One nothing read whole (an early answer, a 413)
    /// counts only once the next request begins: hyper drains it or stops
    /// reading, and which of the two it did shows only then.
    pub(super) fn upload_read(&self) -> bool {
        self.upload(true, UploadEnded::is_set)
    }

    /// Whether hyper reads no more of the last request's body as one:
    /// read whole, or with nothing left to read it.
    fn upload_over(&self) -> bool {
        self.upload(true, UploadEnded::is_over)
    }

    /// `test` of the last request's body, `without` one. Borrowed, not
    /// cloned: [`UploadEnded::is_abandoned`] counts the clones.
    fn upload(&self, without: bool, test: fn(&UploadEnded) -> bool) -> bool {
        if !self.upload_open.load(Ordering::Relaxed) {
            return without;
        }
        lock(&self.upload).as_ref().map_or(without, test)
    }

    /// Notes bytes the client sent: with nothing being answered, and no
    /// upload still coming, they start a head. Empty lines alone (RFC 9112
    /// §2.2: a client may send one after a request) neither start a head
    /// nor count as activity: a client sending nothing else is idle, and
    /// `idle_timeout` closes it.
    fn on_read(&self, read: &[u8]) {
        if self.multiplexed.load(Ordering::Relaxed) {
            self.h2_in.fetch_add(read.len() as u64, Ordering::Relaxed);
        }
        if only_line_ends(read) {
            return;
        }
        self.bump();
        if self.busy.load(Ordering::Relaxed) == 0 && self.upload_over() {
            self.head_pending.store(true, Ordering::Relaxed);
            self.head_begun.store(true, Ordering::Relaxed);
        }
    }

    /// Whether bytes of the head awaited have arrived (see
    /// [`Expired::Head`]).
    pub(super) fn head_begun(&self) -> bool {
        self.head_begun.load(Ordering::Relaxed)
    }

    /// How long the head has been awaited, as the watchdog last counted
    /// it (to a step of its clock).
    pub(super) fn head_waited(&self) -> Duration {
        lock(&self.head_clock).waited
    }

    /// Whether the connection has read nothing yet but empty lines: no
    /// request begun, no head under way (a browser's preconnect).
    pub(super) fn never_read(&self) -> bool {
        self.started.load(Ordering::Relaxed) == 0 && !self.head_begun.load(Ordering::Relaxed)
    }

    /// Counts `more` into the head's wait, for a time the watchdog was not
    /// looking (see `server::serve_connection`).
    pub(super) fn head_waited_more(&self, more: Duration) {
        let mut clock = lock(&self.head_clock);
        if clock.waiting {
            clock.waited += more;
        }
    }

    /// Whether a request is being answered, or more written than read,
    /// since `mark` (from [`Activity::h2_bytes`]).
    /// A header block begun counts too: back with the watchdog, which
    /// times it and does not park the connection meanwhile.
    pub(super) fn used_since(&self, mark: (u64, u64)) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
            || self.h2_sent(mark)
            || self.h2_block.load(Ordering::Relaxed)
    }

    /// HTTP/2 bytes written and read so far, to look back at with
    /// [`Activity::h2_sent`].
    pub(super) fn h2_bytes(&self) -> (u64, u64) {
        (
            self.h2_out.load(Ordering::Relaxed),
            self.h2_in.load(Ordering::Relaxed),
        )
    }

    /// Whether an HTTP/2 connection has written more than it read since
    /// `mark`: a response moving (its end going out as the client opens
    /// its window). Writes alone counted, and the acknowledgements of a
    /// client's PINGs and SETTINGS held an idle connection, and the
    /// streams it had stalled, for ever (review34b F1); their size alone
    /// told nothing once two went out in one write (review34g M2). What
    /// a client's control frames make portico write is never more than
    /// they took to send.
    fn h2_sent(&self, (out, read): (u64, u64)) -> bool {
        let (now_out, now_in) = self.h2_bytes();
        now_out - out > now_in - read
    }

    /// How the connection ends after an HTTP/1 response body broke off:
    /// `Some(true)` with a reset, `Some(false)` closed gracefully, so that
    /// what went before it reaches the client; `None` if none broke.
    pub(super) fn broke(&self) -> Option<bool> {
        self.broke
            .load(Ordering::Relaxed)
            .then(|| self.reset.load(Ordering::Relaxed))
    }

    /// Whether an answer framed by the connection's close (to an HTTP/1.0
    /// client) was handed out: one cut (`shutdown_grace` run out) before
    /// the connection ended is not whole, or not flushed whole (hyper may
    /// hold its last bytes after taking its last frame, review54 L1), and
    /// the connection ends with a reset, as when a body broke off, or its
    /// FIN would make the cut body read as whole (review53 L2).
    pub(super) fn close_framed_answered(&self) -> bool {
        self.close_framed.load(Ordering::Relaxed)
    }

    /// Whether the connection speaks HTTP/2.
    pub(super) fn is_multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    /// The connection has served its share of requests: it is to end
    /// gracefully ([`Activity::retired`]).
    pub(super) fn retire(&self) {
        self.retire.notify_one();
    }

    /// Resolves once [`Activity::retire`] has been called.
    pub(super) async fn retired(&self) {
        self.retire.notified().await;
    }

    /// Resolves once the client is found flooding (see [`Flood`]): the
    /// connection is then to end with a GOAWAY.
    pub(super) async fn flooded(&self) {
        self.flooding.notified().await;
    }

    /// The kind of frames the client flooded, the first time it is asked
    /// for: to count and say the flood once, wherever the connection ends.
    pub(super) fn flood_to_say(&self) -> Option<&'static str> {
        let kind = *self.flood.get()?;
        (!self.flood_said.swap(true, Ordering::Relaxed)).then_some(kind)
    }

    /// From now on every answer tells the client the connection closes.
    pub(super) fn close_after_answers(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// From now on a shutdown of the socket is skipped: the server takes
    /// the socket back from hyper (see [`Tracked`]).
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
            park_fresh,
        } = limits;
        // A floor so a millisecond timeout does not spin a timer per
        // connection; such a timeout then fires within 10 ms of its due.
        let step = (idle.min(head).min(unread_limit) / 4).max(Duration::from_millis(10));
        let mut last = (
            self.stamp.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        );
        let mut idle_quiet = self.quiet_before;
        let mut unread = Duration::ZERO;
        // A wait counts a step only if it was under way at the step's
        // start too: one that began within the step counts from the next,
        // so no timer fires before its time (and each within a step after).
        let mut was_waiting = self.h2_block.load(Ordering::Relaxed)
            || (self.head_pending.load(Ordering::Relaxed)
                && self.busy.load(Ordering::Relaxed) == 0
                && !self.multiplexed.load(Ordering::Relaxed));
        // A wait the last watchdog saw, still the same, goes on: what it
        // timed until its last look counts.
        let carried = *lock(&self.head_clock);
        let mut head_wait = if was_waiting && carried.waiting && carried.writes == last.1 {
            carried.waited
        } else {
            Duration::ZERO
        };
        let mut was_stuck = false;
        let mut h2_last = self.h2_bytes();
        let mut started_last = self.started.load(Ordering::Relaxed);
        let mut blocks_last = self.h2_blocks.load(Ordering::Relaxed);
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
            // Bytes moving count on HTTP/1 (a head or body arriving). On
            // HTTP/2, bytes read do not: frames outside a request (a header
            // block trickled in CONTINUATION frames, which hyper never sees
            // as one) would otherwise hold the connection for as long as
            // the client likes (review29a F6). Bytes written still do: the
            // end of a response h2 is sending as the client's window opens.
            // And a request begun since the last look, answered in
            // between: a client whose requests are larger than their
            // answers (uploads, beacons, a long token each time) wrote
            // more than it read, and was closed as idle every
            // `idle_timeout` though it never stopped asking (tls56 M1).
            let moved = if self.multiplexed.load(Ordering::Relaxed) {
                let sent = self.h2_sent(h2_last);
                h2_last = self.h2_bytes();
                let started = self.started.load(Ordering::Relaxed);
                let asked = started != started_last;
                started_last = started;
                sent || asked
            } else {
                now.0 != last.0
            };
            idle_quiet = if busy || sending || moved {
                Duration::ZERO
            } else {
                idle_quiet + step
            };
            // A response still being written (to a slow reader) holds the
            // head timer back: hyper reads the next head after. An HTTP/2
            // header block is timed whatever the other streams do: its
            // CONTINUATION frames must follow it with nothing between
            // (RFC 9113 §6.10), so only the client can hold it open.
            let block = self.h2_block.load(Ordering::Relaxed);
            // The block the last look saw, not one begun since: back-to-back
            // blocks, each ended in time, were timed as one and cut
            // (review41d F1).
            let blocks = self.h2_blocks.load(Ordering::Relaxed);
            let same_block = block && blocks == blocks_last;
            blocks_last = blocks;
            let waiting = block
                || (!busy
                    && !sending
                    && self.head_pending.load(Ordering::Relaxed)
                    && !self.multiplexed.load(Ordering::Relaxed));
            // The same wait as at the last look only if nothing was written
            // in between; the last response's writes within the step
            // before do not hide a head that followed them (review11: the
            // timer ran up to two steps late).
            head_wait = match (waiting, was_waiting) {
                (true, true) if same_block || (!block && now.1 == last.1) => head_wait + step,
                _ => Duration::ZERO,
            };
            *lock(&self.head_clock) = HeadClock {
                waited: head_wait,
                waiting,
                writes: now.1,
            };
            let stuck = now.1 == last.1 && sending;
            unread = match (stuck, was_stuck) {
                (true, true) => unread + step,
                _ => Duration::ZERO,
            };
            (was_waiting, was_stuck, last) = (waiting, stuck, now);
            // Streams wait on their windows only while the socket moves: a
            // client that reads nothing at all stalls every stream too, and
            // is the unread limit's (each stream's end `client_gone`, not
            // `client_stalled`, review34b F3).
            if self.multiplexed.load(Ordering::Relaxed) && !stuck {
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
            // With no head pending, a request has been served, or this is
            // a parked connection woken by an empty line. An HTTP/2 one
            // quiet this long has no stream open (it counted only then);
            // one with a header block open stays here, where it is timed.
            let between_requests = (self.multiplexed.load(Ordering::Relaxed)
                && !self.h2_block.load(Ordering::Relaxed))
                || (!self.head_pending.load(Ordering::Relaxed) && self.upload_read())
                || (park_fresh && self.never_read());
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

    /// Whether the request's body was let go of before its end, or is
    /// answered without its rest ([`UploadEnded::is_left_unread`]).
    pub(super) fn upload_left_unread(&self) -> bool {
        self.0.upload(false, UploadEnded::is_left_unread)
    }

    /// Keeps `pending`, the upgrade hyper armed for a request that became
    /// no tunnel: hyper keeps it armed after an answer other than 101, and
    /// hands it the connection as the connection ends, which is where the
    /// server takes its socket back (see `protocol::Connection::into_parts`).
    /// Dropped, the socket went with it: such a connection was closed
    /// without a word when parked, and a request sent then was lost
    /// (review38a F1).
    pub(super) fn keep_upgrade(&self, pending: hyper::upgrade::OnUpgrade) {
        *lock(&self.0.upgrade) = Some(pending);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.bump();
    }
}

/// A response body that keeps its request counted as being answered
/// until hyper has taken all of it (and dropped it), and its access line
/// until then.
// Every HTTP/1 response is `Direct`: boxing it to match the HTTP/2 arm
// would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
pub(super) enum Answering {
    Direct {
        body: ProxyBody,
        /// The request's access line, written when this is dropped.
        tail: Option<Box<AccessTail>>,
        busy: Busy,
        /// The body's end is the connection's close (an HTTP/1.0 client).
        close_delimited: bool,
        /// The body's error, given to hyper at the next poll (see
        /// `poll_frame`).
        failed: Option<BodyError>,
    },
    /// An HTTP/2 stream's body, which the connection's watchdog may take
    /// away (see [`Activity::abandon_shut_streams`]).
    Watched(Arc<Watched>),
}

impl Answering {
    pub(super) fn new(
        body: ProxyBody,
        busy: Busy,
        tail: Option<Box<AccessTail>>,
        close_delimited: bool,
    ) -> Self {
        if close_delimited {
            busy.0.close_framed.store(true, Ordering::Relaxed);
        }
        Answering::Direct {
            body,
            tail,
            busy,
            close_delimited,
            failed: None,
        }
    }

    /// For a stream of a multiplexed connection: the watchdog gets to see
    /// whether the client keeps its flow-control window shut.
    pub(super) fn watched(body: ProxyBody, busy: Busy, tail: Option<Box<AccessTail>>) -> Self {
        let activity = busy.0.clone();
        let watched = Arc::new(Watched {
            slot: Mutex::new(Some(Stream {
                body,
                rest: Bytes::new(),
                tail,
                _busy: busy,
                failed: None,
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
            Answering::Direct {
                body,
                tail,
                busy,
                close_delimited,
                failed,
            } => {
                if let Some(error) = failed.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                if busy.0.write_ahead.held_back(cx) {
                    body.slow_client();
                    return Poll::Pending;
                }
                let polled = Pin::new(&mut *body).poll_frame(cx);
                busy.0.write_ahead.handed(&polled);
                AccessTail::note(tail, &polled, || body.is_end_stream());
                match polled {
                    // Given an error, hyper drops what it has buffered to
                    // write: the head when the backend broke before its
                    // first body byte (the client got nothing at all,
                    // netfuzz49 L1), or the last pieces relayed. Held for
                    // one turn, in which hyper flushes them.
                    Poll::Ready(Some(Err(error))) => {
                        busy.0.broke.store(true, Ordering::Relaxed);
                        if *close_delimited {
                            busy.0.reset.store(true, Ordering::Relaxed);
                        }
                        *failed = Some(error);
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    polled => polled,
                }
            }
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
            Answering::Watched(watched) => lock(&watched.slot)
                .as_ref()
                .map_or_else(SizeHint::default, |s| {
                    plus(s.body.size_hint(), s.rest.len() as u64)
                }),
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
/// which lets its backend connection and in-flight slot go (a body being
/// stored goes on into the cache by a background read, see
/// `proxy::body::read_ahead`).
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
    /// The request's access line, written when this is dropped.
    tail: Option<Box<AccessTail>>,
    /// The request's place in the connection's busy count.
    _busy: Busy,
    /// The body's error, held until its time (see [`Stream::poll_slice`]).
    failed: Option<(BodyError, Pin<Box<tokio::time::Sleep>>)>,
}

/// How long an HTTP/2 body's error waits before hyper gets it (see
/// [`Stream::poll_slice`]).
const FAILED_HELD: Duration = Duration::from_millis(50);

/// The most a watched stream hands hyper at once: HTTP/2's default
/// SETTINGS_MAX_FRAME_SIZE.
const SLICE: usize = 16 * 1024;

impl Stream {
    /// Given an error, hyper resets the stream, and h2 drops the frames it
    /// has queued for it and not yet written: the response head, when the
    /// backend broke before its first body byte (the client saw a reset
    /// and no status half the time, chaos55 L1). The connection's own task
    /// writes them, and turns of the stream's task alone did not always let
    /// it run first (one in six still lost its head after 16): the error
    /// is held for [`FAILED_HELD`] (an HTTP/1 body's for one turn of its
    /// connection, which writes itself, see [`Answering`]).
    fn poll_slice(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some((_, held)) = &mut self.failed {
            ready!(std::future::Future::poll(held.as_mut(), cx));
            return Poll::Ready(self.failed.take().map(|(error, _)| Err(error)));
        }
        if self.rest.is_empty() {
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.rest = data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(error)) => {
                    // In the access line now: a stream dropped while its
                    // error is held (the client's reset, a shutdown) still
                    // says what ended it (review65 M2).
                    let noted = Poll::Ready(Some(Err(error)));
                    AccessTail::note(&mut self.tail, &noted, || false);
                    if let Poll::Ready(Some(Err(error))) = noted {
                        self.failed = Some((error, Box::pin(tokio::time::sleep(FAILED_HELD))));
                    }
                    return self.poll_slice(cx);
                }
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
        // A held error was noted as it came (see `Stream::poll_slice`).
        let held = stream.failed.is_some();
        let result = stream.poll_slice(cx);
        if !held {
            AccessTail::note(&mut stream.tail, &result, || {
                stream.rest.is_empty() && stream.body.is_end_stream()
            });
        }
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
        let Some(mut stream) = taken else {
            return false;
        };
        if let Some(tail) = &mut stream.tail {
            tail.stalled_by_client();
        }
        true
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

/// Whether `bytes` hold nothing but line ends (or nothing at all): what
/// hyper skips before a request line.
pub(super) fn only_line_ends(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == b'\r' || b == b'\n')
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The client's stream, bumping [`Activity`] on every transfer.
pub(super) struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    /// Bytes read before, handed out again first (see [`Tracked::rewind`]).
    rewound: Bytes,
    /// On HTTP/2, where the client is in its frames.
    frames: Option<Frames>,
}

/// Where an HTTP/2 client is in its frames, read from the bytes hyper
/// reads (frame headers only; payloads are passed over): enough to tell a
/// header block begun and not ended. h2 bounds a block's size and its
/// CONTINUATION frames, not its time, and hyper sees no request until it
/// ends: a client sending a HEADERS frame without END_HEADERS, and then
/// nothing, held its connection and the block's buffers (about 200 KiB)
/// until `idle_timeout` (review41a F1), where an HTTP/1 head is cut at
/// `request_header_timeout`.
#[derive(Debug)]
struct Frames {
    /// Bytes to pass over before the next frame header: the connection
    /// preface, then each frame's payload.
    skip: usize,
    /// The next frame header, as far as it has come.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Header blocks begun so far.
    opened: u64,
    /// PRIORITY and WINDOW_UPDATE frames so far: h2 bounds neither (see
    /// [`Flood`]); nor PINGs and SETTINGS (each answered), nor RST_STREAM
    /// frames for streams already closed (ignored).
    priority: u64,
    window_updates: u64,
    pings: u64,
    settings: u64,
    resets: u64,
    /// Frames of any other kind but DATA: acknowledgements, GOAWAYs,
    /// kinds h2 does not know (which it ignores, as RFC 9113 §5.5 says).
    others: u64,
    /// When the PINGs, SETTINGS and others counted began (see
    /// [`CONTROL_WINDOW`]).
    since: std::time::Instant,
}

/// An HTTP/2 client sending PRIORITY or WINDOW_UPDATE frames beyond any
/// use: h2 answers neither, nor counts them, and a client sending them
/// as fast as it could kept a core busy until `idle_timeout` (review41a
/// F3). Found, the connection ends with a GOAWAY, as any connection error
/// should (RFC 9113 §5.4.1: the client learns which streams were taken);
/// a client that goes on past another 1,000 frames is cut (its reads
/// fail). As Envoy bounds them (`max_inbound_priority_frames_per_stream`
/// 100, `max_inbound_window_update_frames_per_data_frame_sent` 10), the
/// connection is closed past 1,000 of either and 100 PRIORITY frames a
/// stream begun, or one WINDOW_UPDATE frame for every byte portico wrote
/// (clients send one for every few KiB they read; one for the stream and
/// one for the connection on each of the smallest DATA frames, 10 bytes,
/// is let through, where 1 for 8 bytes closed such a client, review41d
/// F2). A flood must then make portico write as much as it sends.
///
/// PINGs and SETTINGS too, which h2 answers each, and RST_STREAM frames,
/// which it ignores for a stream already closed: a client sending them as
/// fast as it could kept a core busy past `idle_timeout` and cut other
/// clients' throughput tenfold, where nginx says `http2 flood detected`
/// (review43c H1). So are acknowledgements, GOAWAYs and frames of kinds
/// h2 does not know, which it ignores (review43e H1). PINGs, SETTINGS and
/// these others are let through 1,000 of each in each [`CONTROL_WINDOW`]
/// (a keep-alive PING every second never comes near; an allowance that
/// grew with the connection's age let an hour-old one send 36,000 at
/// once, review43f L8), RST_STREAM frames 1,000 and one for each stream
/// begun.
#[derive(Debug)]
pub(super) struct Flood(&'static str);

impl std::fmt::Display for Flood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{FLOODED}{} frames", self.0)
    }
}

impl std::error::Error for Flood {}

impl Flood {
    /// Whether `error` (a connection's) is a [`Flood`]: h2 keeps only the
    /// text of the read's error (it clones its errors), so that is what
    /// is looked for.
    pub(super) fn within(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                return io.get_ref().is_some_and(|inner| {
                    inner.is::<Flood>() || inner.to_string().starts_with(FLOODED)
                });
            }
            cause = error.source();
        }
        false
    }
}

/// How a [`Flood`] is said.
const FLOODED: &str = "HTTP/2 client flooded ";

/// Frames of each kind a connection may send before [`Flood`] counts.
const FRAMES_FREE: u64 = 1_000;

/// The window in which a connection may send [`FRAMES_FREE`] PINGs, as
/// many SETTINGS and as many frames of the other kinds (see [`Flood`]).
const CONTROL_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// An HTTP/2 frame header's length (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;

impl Frames {
    /// From the first byte of the client connection preface on.
    fn new() -> Self {
        Frames {
            skip: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".len(),
            header: [0; FRAME_HEADER],
            have: 0,
            opened: 0,
            priority: 0,
            window_updates: 0,
            pings: 0,
            settings: 0,
            resets: 0,
            others: 0,
            since: std::time::Instant::now(),
        }
    }

    /// Reads `bytes`: `Some(open)` when the last HEADERS or CONTINUATION
    /// frame among them leaves a header block open or ends it.
    fn read(&mut self, mut bytes: &[u8]) -> Option<bool> {
        const DATA: u8 = 0x0;
        const HEADERS: u8 = 0x1;
        const PRIORITY: u8 = 0x2;
        const RST_STREAM: u8 = 0x3;
        const SETTINGS: u8 = 0x4;
        const PING: u8 = 0x6;
        const WINDOW_UPDATE: u8 = 0x8;
        const CONTINUATION: u8 = 0x9;
        const END_HEADERS: u8 = 0x4;
        // Of SETTINGS and PING: an acknowledgement, which answers portico.
        const ACK: u8 = 0x1;
        let mut block = None;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < FRAME_HEADER {
                break;
            }
            self.have = 0;
            let [l0, l1, l2, kind, flags, ..] = self.header;
            self.skip = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            match kind {
                HEADERS | CONTINUATION => {
                    let open = flags & END_HEADERS == 0;
                    if open && kind == HEADERS {
                        self.opened += 1;
                    }
                    block = Some(open);
                }
                PRIORITY => self.priority += 1,
                WINDOW_UPDATE => self.window_updates += 1,
                RST_STREAM => self.resets += 1,
                PING if flags & ACK == 0 => self.pings += 1,
                SETTINGS if flags & ACK == 0 => self.settings += 1,
                // Bounded by flow control, and empty ones by h2.
                DATA => {}
                // PING and SETTINGS acknowledgements, GOAWAY, unknown
                // kinds: a flood of them went uncounted (review43e H1).
                _ => self.others += 1,
            }
        }
        block
    }
}

impl<IO> Tracked<IO> {
    /// `rewound`: bytes of this stream read before, to be read first.
    pub(super) fn new(io: IO, activity: Arc<Activity>, rewound: Bytes) -> Self {
        Tracked {
            io,
            activity,
            rewound,
            frames: None,
        }
    }

    /// Puts bytes already read (and noted) back in front of the stream.
    pub(super) fn rewind(&mut self, read: Bytes) {
        debug_assert!(self.rewound.is_empty());
        self.rewound = read;
    }

    /// Marks the connection as HTTP/2, before hyper reads any of it: no
    /// heads to wait for but header blocks, streams to watch, never parked.
    pub(super) fn multiplexed(&mut self) {
        self.activity.multiplexed.store(true, Ordering::Relaxed);
        self.frames = Some(Frames::new());
    }

    /// Follows the frames of `read`, bytes hyper is handed, on HTTP/2.
    /// A [`Flood`] ends the connection.
    fn frames(&mut self, read: &[u8]) -> Result<(), Flood> {
        let Some(frames) = self.frames.as_mut() else {
            return Ok(());
        };
        if let Some(open) = frames.read(read) {
            // The count before the flag: a look that sees the flag set
            // sees the block it stands for counted.
            self.activity
                .h2_blocks
                .store(frames.opened, Ordering::Relaxed);
            self.activity.h2_block.store(open, Ordering::Relaxed);
            if open {
                // A request begun, for the line its cut leaves.
                self.activity.head_begun.store(true, Ordering::Relaxed);
            }
        }
        let streams = self.activity.started.load(Ordering::Relaxed);
        let written = self.activity.h2_out.load(Ordering::Relaxed);
        // Counted anew once a window is over: the clock is read only once
        // there is a count past the free one.
        if frames.pings.max(frames.settings).max(frames.others) > FRAMES_FREE
            && frames.since.elapsed() >= CONTROL_WINDOW
        {
            frames.pings = 0;
            frames.settings = 0;
            frames.others = 0;
            frames.since = std::time::Instant::now();
        }
        let over = [
            ("PRIORITY", frames.priority, FRAMES_FREE + 100 * streams),
            (
                "WINDOW_UPDATE",
                frames.window_updates,
                FRAMES_FREE + written,
            ),
            ("PING", frames.pings, FRAMES_FREE),
            ("SETTINGS", frames.settings, FRAMES_FREE),
            ("other", frames.others, FRAMES_FREE),
            ("RST_STREAM", frames.resets, FRAMES_FREE + streams),
        ]
        .into_iter()
        .find(|(_, sent, allowed)| sent > allowed);
        let Some((kind, sent, allowed)) = over else {
            return Ok(());
        };
        if self.activity.flood.set(kind).is_ok() {
            // The watchdog's task says goodbye; reads go on meanwhile.
            self.activity.flooding.notify_one();
        } else if sent > allowed + FRAMES_FREE {
            return Err(Flood(kind));
        }
        Ok(())
    }

    pub(super) fn into_inner(self) -> IO {
        self.io
    }

    fn io(&mut self) -> Pin<&mut IO>
    where
        IO: Unpin,
    {
        Pin::new(&mut self.io)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        if !self.rewound.is_empty() {
            let n = self.rewound.len().min(buf.remaining());
            buf.put_slice(&self.rewound.split_to(n));
            let followed = self.frames(&buf.filled()[before..]);
            return Poll::Ready(followed.map_err(std::io::Error::other));
        }
        // An upload its backend takes slower than it comes is read in
        // small pieces (see `WriteAhead`).
        let result = if buf.remaining() > SMALL_READ
            && self.activity.upload(false, UploadEnded::small_reads)
        {
            let mut small = buf.take(SMALL_READ);
            let result = self.io().poll_read(cx, &mut small);
            let n = small.filled().len();
            // SAFETY: `small` is a view of `buf`'s unfilled part, whose
            // first `n` bytes the read just filled (the readers here,
            // TcpStream and tokio-rustls, fill the buffer they are given;
            // none swaps it for another).
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            result
        } else {
            self.io().poll_read(cx, buf)
        };
        if let Poll::Ready(Ok(())) = result {
            self.activity.on_read(&buf.filled()[before..]);
            if let Err(flood) = self.frames(&buf.filled()[before..]) {
                return Poll::Ready(Err(std::io::Error::other(flood)));
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
        self.io.is_write_vectored()
    }

    /// Watched like a write: over TLS, `poll_write` takes plaintext into
    /// rustls at once and only a flush finds the socket full, so a client
    /// that stopped reading near the end of a response shows here alone.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.activity.write_ahead.queue_written();
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

    #[test]
    fn an_http1_body_waits_for_hyper_to_write_what_it_was_handed() {
        let activity = Arc::new(Activity::new());
        // Handed over in 64 KiB pieces.
        let body = ProxyBody::full(Bytes::from(vec![7u8; 200 * 1024]));
        let mut answering = Answering::new(body, activity.busy(), None, false);
        let counted = Arc::new(crate::test_support::Counted::default());
        let waker = std::task::Waker::from(counted.clone());
        let mut cx = Context::from_waker(&waker);
        let mut poll = || Pin::new(&mut answering).poll_frame(&mut cx);
        // hyper takes the first piece and asks for more before writing
        // it: the next waits.
        assert!(matches!(poll(), Poll::Ready(Some(Ok(_)))));
        assert!(poll().is_pending());
        // hyper flushes the socket once it has written its queue.
        activity.write_ahead.queue_written();
        assert_eq!(counted.0.load(Ordering::SeqCst), 1);
        assert!(matches!(poll(), Poll::Ready(Some(Ok(_)))));
        // A flush with no body held back wakes nobody.
        activity.write_ahead.queue_written();
        assert_eq!(counted.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_watched_stream_hands_over_data_frame_sized_slices() {
        let activity = Arc::new(Activity::new());
        let body = ProxyBody::full(Bytes::from(vec![7u8; 3 * SLICE + 5]));
        let mut answering = Answering::watched(body, activity.busy(), None);
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
        park_fresh: true,
    };

    /// What the watchdog says within a minute of (paused) time.
    async fn verdict(activity: &Activity) -> Option<Expired> {
        tokio::time::timeout(Duration::from_secs(59), activity.expired(LIMITS))
            .await
            .ok()
    }

    /// What the watchdog says while `client` runs (and after it is done),
    /// and how long it took to say it.
    async fn expired_while(
        activity: &Activity,
        limits: Limits,
        client: impl std::future::Future<Output = ()>,
    ) -> (Expired, Duration) {
        let started = tokio::time::Instant::now();
        let client = async {
            client.await;
            std::future::pending::<()>().await
        };
        tokio::select! {
            expired = activity.expired(limits) => (expired, started.elapsed()),
            () = client => unreachable!("never done"),
        }
    }

    /// A connection that has read `sent` and begun `requests` bodiless
    /// requests, all answered since.
    fn after(sent: &[&[u8]], requests: usize) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        for read in sent {
            activity.on_read(read);
        }
        for _ in 0..requests {
            drop(activity.busy());
        }
        activity
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_between_requests_is_parkable() {
        // One request answered, nothing since: parkable after a step of
        // quiet (2.5 s here), with no wake-up of its own.
        let served = after(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], 1);
        assert_eq!(
            verdict(&served).await,
            Some(Expired::Parkable(Duration::from_millis(2500)))
        );

        // No byte yet: idle too, and may make room at the cap (it stays
        // with hyper, see `server::serve_connection`); without a cap, the
        // head timer's.
        let fresh = Arc::new(Activity::new());
        assert_eq!(
            verdict(&fresh).await,
            Some(Expired::Parkable(Duration::from_millis(2500)))
        );
        let uncapped = Limits {
            park_fresh: false,
            ..LIMITS
        };
        let fresh = Arc::new(Activity::new());
        let verdict_uncapped =
            tokio::time::timeout(Duration::from_secs(59), fresh.expired(uncapped)).await;
        assert_eq!(verdict_uncapped.ok(), Some(Expired::Head));
        // The first head begun: the head timer's.
        let begun = Arc::new(Activity::new());
        begun.on_read(b"GET / HT");
        assert_eq!(verdict(&begun).await, Some(Expired::Head));

        // A request being answered: never.
        let busy = Arc::new(Activity::new());
        let _answering = busy.busy();
        assert_eq!(verdict(&busy).await, None);

        // HTTP/2 with no stream: idle, and may make room at the cap
        // (it stays with hyper, see `server::serve_connection`).
        let multiplexed = Arc::new(Activity::new());
        drop(multiplexed.busy());
        multiplexed.multiplexed.store(true, Ordering::Relaxed);
        assert_eq!(
            verdict(&multiplexed).await,
            Some(Expired::Parkable(Duration::from_millis(2500)))
        );

        // HTTP/2 with a stream: never.
        let streaming = Arc::new(Activity::new());
        let _answering = streaming.busy();
        streaming.multiplexed.store(true, Ordering::Relaxed);
        assert_eq!(verdict(&streaming).await, None);

        // The next head has begun to arrive.
        let reading = Arc::new(Activity::new());
        drop(reading.busy());
        reading.head_pending.store(true, Ordering::Relaxed);
        assert_eq!(verdict(&reading).await, Some(Expired::Head));
    }

    /// hyper may still be reading an upload whose answer has gone (a
    /// backend may answer first): not parked, and what comes meanwhile is
    /// body, not a head, until the body is known read.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_parked_only_past_its_last_upload() {
        let parkable = Some(Expired::Parkable(Duration::from_millis(2500)));
        let upload = || {
            let activity = after(&[b"POST / HTTP/1.1\r\ncontent-length: 9\r\n\r\nok"], 0);
            let ended = UploadEnded::default();
            drop(activity.busy());
            activity.has_body(ended.clone());
            (activity, ended)
        };
        // Answered, the body still coming: neither parked nor timed as a
        // head, whatever arrives.
        let (activity, _reader) = upload();
        activity.on_read(b"more body");
        assert_eq!(verdict(&activity).await, None);
        // Read to its end (by whoever relayed it).
        let (activity, ended) = upload();
        ended.set();
        assert_eq!(verdict(&activity).await, parkable);
        // Never read, and a next request begun: hyper drained it.
        let (activity, _reader) = upload();
        activity.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(activity.busy());
        assert_eq!(verdict(&activity).await, parkable);
        // Dropped unread (a 413): what comes next is timed as a head, but
        // whether hyper drained the rest shows only with the next request.
        let (activity, ended) = upload();
        drop(ended);
        assert_eq!(verdict(&activity).await, None);
        activity.on_read(b"GET / HT");
        assert_eq!(verdict(&activity).await, Some(Expired::Head));
    }

    /// An empty line after a request (RFC 9112 §2.2) starts no head.
    #[tokio::test(start_paused = true)]
    async fn empty_lines_between_requests_start_no_head() {
        let activity = after(&[b"GET / HTTP/1.1\r\n\r\n"], 1);
        activity.on_read(b"\r\n");
        assert_eq!(
            verdict(&activity).await,
            Some(Expired::Parkable(Duration::from_millis(2500)))
        );
    }

    /// A head timer runs from the head's first byte, not from the step of
    /// the watchdog it fell in: here a head begins 2.4 s in, just before a
    /// step ends (steps of 2.5 s), and the 10 s timer fires 10 s after it
    /// at the earliest.
    #[tokio::test(start_paused = true)]
    async fn the_head_timer_never_fires_early() {
        let activity = after(&[b"GET / HTTP/1.1\r\n\r\n"], 1);
        let head_at = Duration::from_millis(2400);
        let head = async {
            tokio::time::sleep(head_at).await;
            activity.on_read(b"GET /next");
        };
        let waited = head_timer(&activity, head_at, head).await;
        assert!(
            waited >= Duration::from_secs(10) && waited <= Duration::from_millis(12_600),
            "{waited:?}"
        );
    }

    /// How long after `head_at` the head timer of `activity` fired, with
    /// `client` (which begins a head at `head_at`) run meanwhile.
    async fn head_timer(
        activity: &Arc<Activity>,
        head_at: Duration,
        client: impl std::future::Future<Output = ()>,
    ) -> Duration {
        let limits = Limits {
            park: None,
            ..LIMITS
        };
        let (expired, took) = expired_while(activity, limits, client).await;
        assert_eq!(expired, Expired::Head);
        took - head_at
    }

    /// Nor late by more than a step when the head follows the last
    /// response's writes within one step: here the response's last write
    /// is 0.1 s in and the next head begins 0.2 s in.
    #[tokio::test(start_paused = true)]
    async fn a_head_right_after_a_response_is_timed_from_the_next_step() {
        let activity = after(&[b"GET / HTTP/1.1\r\n\r\n"], 1);
        let head = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            activity.wrote(&Poll::Ready(Ok(SLICE)));
            tokio::time::sleep(Duration::from_millis(100)).await;
            activity.on_read(b"GET /next");
        };
        let waited = head_timer(&activity, Duration::from_millis(200), head).await;
        assert!(
            waited >= Duration::from_secs(10) && waited <= Duration::from_millis(12_500),
            "{waited:?}"
        );
    }

    /// A head under way when the drain's watchdog takes over keeps the
    /// time it has waited: here the serving watchdog (2.5 s steps) has
    /// timed 5 s of a trickled 10 s head when it is dropped 6 s in, and
    /// the drain's (0.25 s steps) closes the connection 11 s in, not 10 s
    /// after the drain began.
    #[tokio::test(start_paused = true)]
    async fn the_drain_goes_on_with_the_head_timer_it_finds() {
        let unparked = Limits {
            park: None,
            ..LIMITS
        };
        let draining = Limits {
            idle: Duration::from_secs(1),
            ..unparked
        };
        let trickle = |activity: Arc<Activity>| async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                activity.on_read(b"x");
            }
        };
        // The serving watchdog dropped 6 s into a trickled head, then
        // (maybe) a response written, then the drain's: how long it took.
        let drained_after = |written: bool| async move {
            let activity = after(&[b"GET / HTTP/1.1\r\n\r\n"], 1);
            activity.on_read(b"GET /next");
            let serving = expired_while(&activity, unparked, trickle(activity.clone()));
            assert!(tokio::time::timeout(Duration::from_secs(6), serving)
                .await
                .is_err());
            if written {
                activity.wrote(&Poll::Ready(Ok(SLICE)));
            }
            let (expired, took) =
                expired_while(&activity, draining, trickle(activity.clone())).await;
            assert_eq!(expired, Expired::Head);
            took
        };
        assert_eq!(
            Duration::from_secs(6) + drained_after(false).await,
            Duration::from_secs(11)
        );
        // A response written in between makes the next wait another.
        let took = drained_after(true).await;
        assert!(took >= Duration::from_secs(10), "{took:?}");
    }

    /// A head that came in behind the last request, before the connection
    /// was parked, keeps the time it waited: 5 s of quiet before parking,
    /// and the 10 s timer fires 5 s (and at most a step) after.
    /// A header block is followed through frames split anywhere across
    /// reads, payloads that look like frame headers passed over.
    #[test]
    fn frames_tell_a_header_block_left_open() {
        let frame = |kind: u8, flags: u8, payload: &[u8]| {
            let len = payload.len().to_be_bytes();
            let mut frame = vec![len[5], len[6], len[7], kind, flags, 0, 0, 0, 1];
            frame.extend_from_slice(payload);
            frame
        };
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, &[]));
        // A DATA payload that reads as a HEADERS frame without END_HEADERS.
        bytes.extend(frame(0x0, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 3]));
        // Where each frame header's last byte falls: the block's state is
        // known there.
        let mut known = Vec::new();
        for (kind, flags, payload) in [
            (0x1, 0, &[0x82, 0x86][..]),
            (0x9, 0, &[0x84]),
            (0x9, 0x4, &[0x41]),
        ] {
            known.push((bytes.len() + FRAME_HEADER - 1, flags & 0x4 == 0));
            bytes.extend(frame(kind, flags, payload));
        }
        let mut frames = Frames::new();
        let states: Vec<(usize, bool)> = bytes
            .iter()
            .enumerate()
            .filter_map(|(at, byte)| Some((at, frames.read(std::slice::from_ref(byte))?)))
            .collect();
        assert_eq!(states, known);
        for split in 1..bytes.len() {
            let mut frames = Frames::new();
            let last = bytes
                .chunks(split)
                .filter_map(|chunk| frames.read(chunk))
                .last();
            assert_eq!(last, Some(false), "split {split}");
            // Without the last frame: open.
            let mut frames = Frames::new();
            let without = &bytes[..known[2].0 - FRAME_HEADER + 1];
            let last = without
                .chunks(split)
                .filter_map(|chunk| frames.read(chunk))
                .last();
            assert_eq!(last, Some(true), "split {split}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_begun_before_parking_keeps_its_wait() {
        let activity = Activity::again(b"GET /next", Duration::from_secs(5));
        let limits = Limits {
            park: None,
            ..LIMITS
        };
        let (expired, took) = expired_while(&activity, limits, std::future::ready(())).await;
        assert_eq!(expired, Expired::Head);
        assert!(
            took >= Duration::from_secs(5) && took <= Duration::from_millis(7_500),
            "{took:?}"
        );
    }

    /// A parked connection woken by an empty line alone is parked again.
    #[tokio::test(start_paused = true)]
    async fn a_connection_woken_by_an_empty_line_is_parked_again() {
        let activity = Activity::again(b"", Duration::from_secs(3));
        activity.on_read(b"\r\n");
        assert_eq!(
            verdict(&activity).await,
            Some(Expired::Parkable(Duration::from_millis(5500)))
        );
    }

    /// Nor are empty lines activity: a client sending nothing else is
    /// closed by the idle timeout, here 4 s, counted from before parking.
    #[tokio::test(start_paused = true)]
    async fn empty_lines_do_not_keep_a_connection_open() {
        let limits = Limits {
            idle: Duration::from_secs(4),
            park: None,
            ..LIMITS
        };
        let activity = Activity::again(b"\r\n", Duration::from_secs(2));
        let lines = async {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                activity.on_read(b"\r\n");
            }
        };
        let (expired, took) = expired_while(&activity, limits, lines).await;
        assert_eq!(expired, Expired::Idle);
        // 2 s left of the 4, in steps of 1 s.
        assert!(took <= Duration::from_secs(3), "{took:?}");
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
        let mut socket = Tracked::new(Unflushed, activity.clone(), Bytes::new());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let wrote = Pin::new(&mut socket).poll_write(&mut cx, b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(wrote.is_ready());
        assert!(Pin::new(&mut socket).poll_flush(&mut cx).is_pending());
        // Parked, the socket would be closed with the response's end unsent.
        assert_eq!(verdict(&activity).await, None);
    }
}
