//! One client connection's life: served by hyper (HTTP/1.1 or HTTP/2),
//! parked between requests when idle, lingered on and closed, and what
//! its end says in the logs.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;

use super::shutdown::{DrainGuard, Shutdown};
use super::slots::{OpenConnection, Reclaim};
use super::{
    head_cut, head_timed_out, idle, protocol, ConnectionSettings, Shared, H2_MAX_REQUESTS,
    H2_PAST_GOAWAY,
};
use crate::proxy::Conn;
use crate::task::WhenWoken;

/// How long an HTTP/1 keep-alive connection waits for its next request
/// before it is parked: at least this, and at most one step of its
/// watchdog more (a quarter of the shorter of `idle_timeout` and
/// `request_header_timeout`).
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);

/// What a client connection keeps through its life, parked or served.
pub(super) struct Held {
    pub(super) shared: Arc<Shared>,
    pub(super) settings: Arc<ConnectionSettings>,
    pub(super) shutdown: Shutdown,
    /// Fires when `shutdown_grace` runs out: a connection still draining
    /// is dropped then, with its socket.
    pub(super) cut: Shutdown,
    pub(super) _drain: DrainGuard,
    /// Its place among `max_connections`; given up early by an idle
    /// HTTP/2 connection closing for a client at the cap.
    pub(super) open: Option<OpenConnection>,
}

/// A client socket that can wait for its next request without hyper.
pub(super) trait Parkable:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
    /// The TCP socket under it, to wait on.
    fn socket(&self) -> &tokio::net::TcpStream;

    /// The protocol agreed on before the first byte (TLS's ALPN).
    fn agreed(&self) -> Option<protocol::Protocol> {
        None
    }
}

impl Parkable for tokio::net::TcpStream {
    fn socket(&self) -> &tokio::net::TcpStream {
        self
    }
}

impl Parkable for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn socket(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }

    fn agreed(&self) -> Option<protocol::Protocol> {
        Some(protocol::Protocol::from_alpn(
            self.get_ref().1.alpn_protocol(),
        ))
    }
}

/// A connection coming back from parking.
pub(super) struct Again {
    /// What hyper had read of the next request.
    unread: Bytes,
    /// How long the connection has been idle.
    quiet: Duration,
}

/// Serves a client connection until it ends or is parked; `again` for one
/// coming back from parking (it speaks HTTP/1.1).
pub(super) async fn serve_connection<IO: Parkable>(
    stream: IO,
    conn: Conn,
    mut held: Held,
    again: Option<Again>,
) {
    let activity = Arc::new(match &again {
        Some(again) => idle::Activity::again(&again.unread, again.quiet),
        None => idle::Activity::new(),
    });
    if held.shutdown.is_shutdown() {
        // A parked connection woken while shutting down: its answers say
        // `Connection: close` from the first.
        activity.close_after_answers();
    }
    let requests = activity.clone();
    let generations = held.shared.clone();
    let (drain, stopping) = (held._drain.clone(), held.shutdown.clone());
    let client = conn.clone();
    let service = service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        // hyper lets go of a connection it upgrades at once; the tunnel
        // keeps its place in the count and the drain instead, and ends
        // `shutdown_grace` after its listener stops.
        // The upgrade hyper armed for an HTTP/1.1 request with `Upgrade`
        // (or CONNECT): a tunnel's, or, if none is made, the connection's
        // (see `idle::Busy::keep_upgrade`).
        let pending = request
            .extensions_mut()
            .remove::<hyper::upgrade::OnUpgrade>()
            .map(|armed| crate::proxy::PendingUpgrade::new(Some(armed).into()));
        if request.headers().contains_key(http::header::UPGRADE) {
            // Read when the listener stops, as a shutdown reads it: a
            // reload may have changed it since the tunnel opened.
            let shared = generations.clone();
            let grace = move || shared.connections.load().shutdown_grace;
            let slots = generations.slots.clone();
            request.extensions_mut().insert(crate::proxy::TunnelHold {
                keep: Arc::new(drain.clone()),
                place: Arc::new(move || Box::new(slots.take())),
                stopping: (stopping.clone(), Arc::new(grace)),
                pending: pending.clone().unwrap_or_default(),
            });
        }
        // One generation per request: a reload mid-connection applies to
        // the next request, and this one finishes on the config it began on.
        let proxy = generations.proxy.load_full();
        let busy = requests.busy();
        let multiplexed = request.version() == http::Version::HTTP_2;
        // At the cap, a GOAWAY; a client that ignores it (and the PING
        // that confirms it) and opens a round of streams more is dropped.
        if multiplexed && matches!(requests.started(), H2_MAX_REQUESTS | H2_PAST_GOAWAY) {
            requests.retire();
        }
        if !multiplexed && !hyper::body::Body::is_end_stream(request.body()) {
            let ended = crate::proxy::body::UploadEnded::default();
            requests.has_body(ended.clone());
            request.extensions_mut().insert(ended);
        }
        // hyper's HTTP/1 server leaves out the body of an answer to HEAD;
        // its HTTP/2 server sends it, and clients reset such a stream as
        // malformed (RFC 9113 §8.1.1): portico's own answers (a 429, a
        // 502) were lost to `curl -I` over HTTPS (review33b F1).
        let bodiless = multiplexed && request.method() == http::Method::HEAD;
        // HTTP/1.0 has no chunked coding: see `close_delimited` below.
        let request_version = request.version();
        let http10_body =
            request_version == http::Version::HTTP_10 && request.method() != http::Method::HEAD;
        let mut handed = crate::proxy::Handed::new(proxy, request, client.clone());
        async move {
            let (request, conn) = handed.take();
            let (mut response, tail) = handed.proxy().handle(request, conn).await;
            // No tunnel took it: the connection's, to end with.
            let untaken = pending.and_then(|pending| {
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.take()
            });
            if let Some(armed) = untaken {
                busy.keep_upgrade(armed);
            }
            // RFC 9110 §8.6: no Content-Length on a 204. hyper's HTTP/1
            // server drops one from a GET's answer, not a HEAD's
            // (netfuzz49 L4); over HTTP/2 a backend's `Content-Length:
            // 5` on its 204 went out, and clients reset the stream
            // (review33d F7), as nginx's HTTP/2 filter drops it too.
            if response.status() == http::StatusCode::NO_CONTENT {
                response.headers_mut().remove(http::header::CONTENT_LENGTH);
            }
            if bodiless && !hyper::body::Body::is_end_stream(response.body()) {
                // The length a GET would get, as RFC 9110 §9.3.2 allows.
                let length = hyper::body::Body::size_hint(response.body()).exact();
                *response.body_mut() = crate::proxy::body::ProxyBody::empty();
                if let Some(length) = length {
                    response
                        .headers_mut()
                        .entry(http::header::CONTENT_LENGTH)
                        .or_insert_with(|| length.into());
                }
            }
            // An answer given with the request's body left unread (a
            // backend's early answer, a 413 for a large body; portico's own
            // read a small one off, see `proxy::discard_unread`): hyper
            // drains what it already holds or stops reading, and the
            // connection ends; say so, as nginx does.
            // A body of unknown length goes to an HTTP/1.0 client ended by
            // the connection's close (RFC 9112 §9.3: a persistent message
            // needs a length of its own); hyper does so, but said
            // `keep-alive` first, and `ab -k` read such bodies as empty
            // (review39b L1). nginx says `close`, as here.
            let close_delimited = http10_body
                && !hyper::body::Body::is_end_stream(response.body())
                && hyper::body::Body::size_hint(response.body())
                    .exact()
                    .is_none();
            if !multiplexed && (busy.closing() || busy.upload_left_unread() || close_delimited) {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                // hyper adds `keep-alive` for a client of HTTP/1.0 that
                // asked for it, beside the `close`, unless the head it
                // is given says HTTP/1.0 too: it goes out as 1.0 anyway.
                if request_version == http::Version::HTTP_10 {
                    *response.version_mut() = http::Version::HTTP_10;
                }
            }
            Ok::<_, Infallible>(response.map(|body| {
                if multiplexed {
                    idle::Answering::watched(body, busy, tail)
                } else {
                    idle::Answering::new(body, busy, tail, close_delimited)
                }
            }))
        }
    });
    let protocol = match again {
        Some(_) => Some(protocol::Protocol::Http1),
        None => stream.agreed(),
    };
    let rewound = again.map(|again| again.unread).unwrap_or_default();
    let stream = idle::Tracked::new(stream, activity.clone(), rewound);
    let settings = held.settings.clone();
    let mut connection =
        protocol::Connection::new(stream, service, protocol, settings.builders.clone());
    /// How the connection's hyper life ends.
    enum End<R> {
        Done(R),
        /// Gracefully: GOAWAY on HTTP/2, keep-alive off on 1.1.
        Graceful,
        /// Shutdown has begun.
        Drain,
        /// Draining, and nothing came for a second: closed now, without
        /// a second round of the graceful path's wait.
        Close,
        /// Parked, after this long idle.
        Park(Duration),
        /// An idle HTTP/2 connection closing for a client at the cap.
        Reclaimed,
    }
    // The watchdog and the shutdown signal are polled only when their own
    // timers or the signal wake them, not at each of hyper's reads and
    // writes (see `WhenWoken`).
    let ended = loop {
        let ended = {
            let aside = std::pin::pin!(async {
                tokio::select! {
                    expired = activity.expired(settings.limits()) => match expired {
                        idle::Expired::Idle => {
                            tracing::debug!(client = %conn.peer, "closing idle connection");
                            End::Graceful
                        }
                        // Nothing is being answered: dropping the connection
                        // closes it, as hyper's head timer did. An HTTP/2
                        // one may be answering other streams: a GOAWAY tells
                        // the client which were taken (RFC 9113 §5.4.1), and
                        // they finish first (review41e F1: a download was cut).
                        idle::Expired::Head => {
                            head_timed_out(&held.shared, &activity, conn.peer, settings.header_timeout);
                            if activity.is_multiplexed() {
                                End::Graceful
                            } else {
                                End::Done(Ok(()))
                            }
                        }
                        // A client that reads nothing would not read a GOAWAY
                        // either: dropping frees the backend side at once.
                        idle::Expired::Unread => {
                            tracing::info!(client = %conn.peer, "client read nothing for idle_timeout; closing");
                            End::Done(Ok(()))
                        }
                        idle::Expired::Parkable(quiet) => End::Park(quiet),
                    },
                    // Finish in-flight requests, then close.
                    _ = held.shutdown.recv() => End::Drain,
                    () = activity.retired() => {
                        tracing::debug!(client = %conn.peer, "HTTP/2 connection served its {H2_MAX_REQUESTS} requests; GOAWAY");
                        End::Graceful
                    }
                    () = activity.flooded() => {
                        if let Some(kind) = activity.flood_to_say() {
                            http2_broke(&held, conn.peer, h2::Reason::ENHANCE_YOUR_CALM, &format_args!("client flooded {kind} frames"));
                        }
                        End::Graceful
                    }
                }
            });
            // Its timers outside the task's budget for a poll, which a
            // client sending as fast as portico reads spent on hyper each
            // time: they never fired, and `idle_timeout` let a flood of
            // frames nothing counted run for as long as it was sent
            // (review43c H1).
            tokio::select! {
                biased;
                result = &mut connection => End::Done(result),
                ended = WhenWoken::new(tokio::task::unconstrained(aside)) => ended,
            }
        };
        let End::Park(quiet) = ended else { break ended };
        // A connection that has sent nothing yet (a browser's preconnect):
        // idle too, as nginx counts a connection awaiting its first
        // request among the reusable ones it closes at the cap; it held
        // its place until `request_header_timeout`.
        let fresh = activity.never_read();
        if !activity.is_multiplexed() && !fresh {
            break ended;
        }
        // An HTTP/2 connection without a stream for a while: among the
        // idle connections that make room at `server.max_connections`, as
        // a parked HTTP/1.1 one is, closed with a GOAWAY when its place is
        // wanted, as nginx closes a reusable HTTP/2 connection (idle ones
        // held every place until `idle_timeout`, review33e F3). A stream
        // beginning (or anything written) hands it back to the watchdog.
        let _parked = held.shared.slots.parked();
        let entered = tokio::time::Instant::now();
        let mut idle_until = entered + settings.idle_timeout.saturating_sub(quiet);
        if fresh {
            // Its first head is still timed from the accept.
            let head = settings
                .header_timeout
                .saturating_sub(activity.head_waited());
            idle_until = idle_until.min(entered + head);
        }
        let writes = activity.h2_bytes();
        let used = || {
            if fresh {
                !activity.never_read()
            } else {
                activity.used_since(writes)
            }
        };
        let slots = &held.shared.slots;
        // One place in the queue for the whole wait, so the connection idle
        // longest is asked first: made anew at each tick, it went to the
        // back of the queue once a second (review35e L6).
        let mut reclaim = std::pin::pin!(slots.reclaim.notified());
        reclaim.as_mut().enable();
        let idle = loop {
            // Timers outside the poll's budget, as the watchdog's above.
            tokio::select! {
                biased;
                result = &mut connection => break Some(End::Done(result)),
                _ = tokio::task::unconstrained(held.shutdown.recv()) => break Some(End::Drain),
                () = tokio::task::unconstrained(tokio::time::sleep_until(idle_until)) => {
                    // A request that came since the last tick is served:
                    // closed at the deadline, one that arrived in time went
                    // unanswered (review35e M1).
                    if used() {
                        break None;
                    }
                    tracing::debug!(client = %conn.peer, "closing idle connection");
                    // Nothing to say goodbye to, as the watchdog's head
                    // timer would drop it.
                    break Some(if fresh { End::Close } else { End::Graceful });
                }
                () = &mut reclaim => {
                    reclaim.set(slots.reclaim.notified());
                    reclaim.as_mut().enable();
                    let cap = held.shared.connections.load().max_connections;
                    // A stream came meanwhile: back to the watchdog.
                    match slots.reclaimed(cap, used) {
                        Reclaim::Stale => continue,
                        Reclaim::PassedOn => break None,
                        Reclaim::Close => {}
                    }
                    // Its place goes to the client at once, as a parked
                    // HTTP/1.1 connection's does: the GOAWAY's round trip,
                    // or a response's end the client is slow to read (see
                    // `reclaimed_limits`), kept it waiting, and more idle
                    // connections were closed meanwhile (review34f M3,
                    // review34g M1). It takes no new stream.
                    held.open = None;
                    if fresh {
                        // Nothing to say goodbye to: closed, as at a drain.
                        tracing::debug!(client = %conn.peer, "closing a connection that sent nothing yet for a client at server.max_connections");
                        break Some(End::Close);
                    }
                    tracing::debug!(client = %conn.peer, "closing idle HTTP/2 connection for a client at server.max_connections");
                    break Some(End::Reclaimed);
                }
                () = tokio::task::unconstrained(tokio::time::sleep(PARK_AFTER)) => {
                    if used() {
                        break None;
                    }
                }
            }
        };
        if let Some(ended) = idle {
            break ended;
        }
        if fresh {
            // The watchdog's head timer goes on from where it was, plus
            // the time spent here.
            activity.head_waited_more(entered.elapsed());
        }
    };
    // An HTTP/1 client may have sent a request on this connection that is
    // not here yet, and closing now would lose it (HTTP/1 has no GOAWAY):
    // answers say `Connection: close` from now on, and the connection
    // closes once it has had nothing to do for a second.
    // Set when `shutdown_grace` ran out with the connection still open.
    let mut cut_off = false;
    let ended = match ended {
        End::Drain if !activity.is_multiplexed() => {
            activity.close_after_answers();
            let mut cut = held.cut.clone();
            tokio::select! {
                result = &mut connection => End::Done(result),
                // `shutdown_grace` ran out: dropped, with its socket.
                _ = cut.recv() => {
                    cut_off = true;
                    End::Done(Ok(()))
                }
                why = activity.expired(settings.closing_limits()) => {
                    if why == idle::Expired::Head {
                        head_timed_out(&held.shared, &activity, conn.peer, settings.header_timeout);
                    } else {
                        let why = "request head not complete when shutdown closed the connection";
                        let waited = activity.head_waited();
                        head_cut(&held.shared, &activity, conn.peer, waited, why);
                    }
                    tracing::debug!(client = %conn.peer, ?why, "closed while draining");
                    End::Close
                }
            }
        }
        ended => ended,
    };
    // A connection closed for a client at the cap may still owe the end of
    // a response the client has not opened its window for (h2 holds it
    // after the body has been handed over): it ends as the client reads
    // it, or once nothing has moved for `idle_timeout`, not after a second
    // of quiet, which cut such a response (review34f M1).
    let limits = if matches!(ended, End::Reclaimed) {
        settings.reclaimed_limits()
    } else {
        settings.closing_limits()
    };
    let result = match ended {
        End::Done(result) => result,
        // Nothing is being answered (or a response is stuck on a client
        // that reads nothing, which no shutdown gets through), and
        // `Connection: close` was promised to whatever came: close as
        // hyper would, a FIN after the TLS close_notify, bounded by
        // DRAIN_QUIET. A connection still sniffing (no byte yet) has no
        // parts to close: dropped. Before, a graceful shutdown came first,
        // which an HTTP/1 connection with no request begun waits out, and
        // the drain took two seconds of quiet (review11).
        End::Close => {
            if let Some((mut socket, _)) = connection.into_parts(activity.take_upgrade()).await {
                close(&mut socket).await;
            }
            return;
        }
        End::Park(quiet) => {
            // hyper ends an HTTP/1 connection at once when it is between
            // requests; the socket skips the shutdown, and comes back with
            // whatever hyper read of the next request.
            let started = activity.started();
            activity.park();
            connection.graceful_shutdown();
            let ended = tokio::time::timeout(DRAIN_QUIET, &mut connection).await;
            let Some((mut socket, unread)) = connection.into_parts(activity.take_upgrade()).await
            else {
                return;
            };
            if ended.is_err() {
                // hyper was between requests when the watchdog looked, so
                // it ends at once; if it ever did not, say so.
                tracing::warn!(client = %conn.peer, "connection being parked did not end within a second; closed");
            }
            // A request that arrived meanwhile was answered with
            // `Connection: close`: then close, as promised.
            if !matches!(ended, Ok(Ok(()))) || activity.started() != started {
                close(&mut socket).await;
            } else if idle::only_line_ends(&unread) {
                // Nothing, or an empty line after the last request (RFC
                // 9112 §2.2), which hyper would skip anyway.
                tracing::trace!(client = %conn.peer, "parked idle connection");
                tokio::spawn(park(socket, conn, held, quiet));
                crate::memory::freed(crate::memory::HYPER_CONNECTION);
            } else {
                // The next head has begun to arrive: no wait to park for.
                let unread = Bytes::copy_from_slice(&unread);
                tokio::spawn(serve_again(socket, conn, held, Again { unread, quiet }));
            }
            return;
        }
        End::Graceful | End::Drain | End::Reclaimed => {
            connection.graceful_shutdown();
            let mut cut = held.cut.clone();
            // The watchdog goes on, or a client trickling a head in, one
            // that never acknowledges the GOAWAY, or one that left an
            // HTTP/2 header block half sent, would hold the connection
            // (and a drain) for as long as hyper lets it; with nothing in
            // flight, a second of silence is enough to let it go.
            tokio::select! {
                result = &mut connection => result,
                why = activity.expired(limits) => {
                    tracing::debug!(client = %conn.peer, ?why, "closed while closing gracefully");
                    Ok(())
                }
                _ = cut.recv() => {
                    cut_off = true;
                    Ok(())
                }
                // Retired, and the client went on opening streams.
                () = activity.retired() => {
                    tracing::debug!(client = %conn.peer, "HTTP/2 client ignored the GOAWAY; closed");
                    Ok(())
                }
            }
        }
    };
    if cut_off && activity.close_framed_answered() {
        if let Some((mut socket, _)) = connection.into_parts(activity.take_upgrade()).await {
            reset_after_sending(&mut socket).await;
        }
        return;
    }
    // An answer given before its request's body was read whole (a 413 by
    // Content-Length, a backend's 401 from the head): the client may still
    // be sending it. Dropped at once, the socket's unread bytes made the
    // kernel reset the connection, and a client still writing lost the
    // answer it had not read yet (review34a F4: 5 to 7 in 20 over TLS).
    // As nginx's lingering close: the rest is read and dropped until the
    // client stops sending, for a while.
    if result.is_ok() && !activity.is_multiplexed() && !activity.upload_read() {
        if let Some((mut socket, _)) = connection.into_parts(activity.take_upgrade()).await {
            linger(&mut socket, held.cut.clone()).await;
        }
        return;
    }
    // Ended where hyper closes a connection itself (TLS close_notify, then
    // FIN), but handed to the upgrade it armed for a request that became
    // no tunnel, which skips that: closed here as hyper would.
    if let (Ok(()), Some(armed)) = (&result, activity.take_upgrade()) {
        if let Some((mut socket, _)) = connection.into_parts(Some(armed)).await {
            close(&mut socket).await;
        }
        return;
    }
    // A response body broke off (its backend cut it or fell silent). To an
    // HTTP/1.0 client, whose body ends with the connection, a FIN made the
    // cut body read as whole (netfuzz49 H1): a reset says it is not. Else
    // the body's framing says it, and the close is graceful: dropped with
    // pipelined requests unread, the socket was reset, and the answers
    // sent before it were lost with it (netfuzz49 L3).
    if let (Err(error), Some(reset)) = (&result, activity.broke()) {
        tracing::debug!(client = %conn.peer, %error, reset, "response cut; connection closed");
        if let Some((mut socket, _)) = connection.into_parts(activity.take_upgrade()).await {
            if reset {
                reset_after_sending(&mut socket).await;
            } else {
                linger(&mut socket, held.cut.clone()).await;
            }
        }
        return;
    }
    if let Err(error) = result {
        // An HTTP/2 preface where HTTP/1.1 was agreed (ALPN `http/1.1`, or
        // after an HTTP/1.1 request): hyper answers nothing, and the
        // client was left with a closed connection and no line said why.
        // nginx answers 400 (review32d).
        let h2_preface = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_version_h2);
        if h2_preface {
            if let Some((mut socket, _)) = connection.into_parts(activity.take_upgrade()).await {
                let answered = refuse_h2_preface(&mut socket).await;
                let proxy = held.shared.proxy.load();
                proxy.refused(conn.peer, 400, &H2_PREFACE_ON_HTTP1, answered);
            }
            return;
        }
        // hyper answers a head it cannot parse itself, before the service
        // runs: count and log it like any other answer, or smuggling
        // attempts would leave no trace.
        let hyper_error = error.downcast_ref::<hyper::Error>();
        let cause: &(dyn std::error::Error + 'static) = error.as_ref();
        // A flood h2 lets through, that the connection's reads refused
        // (said already, unless the connection was parked when it came).
        if idle::Flood::within(cause) {
            if activity.flood_to_say().is_some() {
                let error = crate::proxy::error::Chain(cause);
                http2_broke(&held, conn.peer, h2::Reason::ENHANCE_YOUR_CALM, &error);
            }
            return;
        }
        if let Some(reason) = hyper_error.and_then(broke_http2) {
            http2_broke(&held, conn.peer, reason, &crate::proxy::error::Chain(cause));
            return;
        }
        match hyper_error.and_then(refused_with) {
            Some((parse, status)) => {
                let answered = crate::proxy::Refused::default();
                held.shared
                    .proxy
                    .load()
                    .refused(conn.peer, status, parse, answered);
            }
            None => tracing::debug!(client = %conn.peer, %error, "connection ended with error"),
        }
    }
}

/// Resets the connection of `socket` (SO_LINGER 0) once what was written
/// to it has left, for [`DRAIN_QUIET`] at most: a reset drops the send
/// queue, and over a real network the head and the body's first bytes,
/// flushed a moment before, were still in it (review49).
async fn reset_after_sending<IO: Parkable>(socket: &mut IO) {
    use tokio::io::AsyncWriteExt;
    let until = tokio::time::Instant::now() + DRAIN_QUIET;
    // TLS records rustls still holds go to the socket first.
    let _ = tokio::time::timeout_at(until, socket.flush()).await;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let fd = socket.socket().as_raw_fd();
        while crate::upstream::unsent(fd).is_some_and(|queued| queued > 0)
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        crate::upstream::reset_on_close(fd);
    }
}

/// Why an HTTP/2 preface on an HTTP/1.1 connection is refused.
const H2_PREFACE_ON_HTTP1: &str = "HTTP/2 preface on a connection that speaks HTTP/1.1";

/// Answers an HTTP/2 preface sent where HTTP/1.1 was agreed with a 400
/// and closes, as nginx does.
async fn refuse_h2_preface<IO: Parkable>(socket: &mut IO) -> crate::proxy::Refused {
    use tokio::io::AsyncWriteExt;
    let (answer, body) = bad_request(H2_PREFACE_ON_HTTP1);
    let _ = tokio::time::timeout(DRAIN_QUIET, socket.write_all(answer.as_bytes())).await;
    close(socket).await;
    crate::proxy::Refused {
        bytes: body,
        took: Duration::ZERO,
    }
}

/// portico's own 400 for what it refuses before hyper can answer (plain
/// HTTP on a TLS port, an HTTP/2 preface on HTTP/1.1): the whole answer,
/// closing the connection, and its body's length for the access line.
pub(super) fn bad_request(why: &str) -> (String, u64) {
    let body = why.len() + 1;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {body}\r\n\
         connection: close\r\n\r\n{why}\n"
    );
    (answer, body as u64)
}

/// A keep-alive connection between requests, without hyper: its read and
/// write buffers and its task are gone, and what is left (the socket, its
/// TLS session, this small task) waits for the client's next request, to
/// serve it under a new hyper connection. nginx keeps an idle keep-alive
/// connection in about a kilobyte the same way; hyper's held ~25 KiB.
/// `idle_timeout` (counted from `quiet` ago) and shutdown still close it,
/// shutdown after a second in which no request came.
pub(super) async fn park<IO: Parkable>(
    mut socket: IO,
    conn: Conn,
    mut held: Held,
    quiet: Duration,
) {
    let parked = tokio::time::Instant::now();
    let idle_until = parked + held.settings.idle_timeout.saturating_sub(quiet);
    // The socket still holds the waker of hyper's task, from its last read,
    // and with it that task's memory: a no-op waker takes its place.
    let _ = socket
        .socket()
        .poll_read_ready(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    // Once a shutdown came: how long a request already on its way has.
    let mut draining: Option<tokio::time::Instant> = None;
    let _parked = held.shared.slots.parked();
    loop {
        // A request that came first is served first: its place wanted at
        // the same moment, the connection closed with the request unread
        // (review33f F1).
        let next = tokio::select! {
            biased;
            ready = socket.socket().readable() => ready.is_ok(),
            // As for a connection hyper holds: a request already on its
            // way gets its answer (with `Connection: close`).
            _ = held.shutdown.recv(), if draining.is_none() => {
                draining = Some(tokio::time::Instant::now() + DRAIN_QUIET);
                continue;
            }
            () = tokio::time::sleep_until(draining.unwrap_or(idle_until).min(idle_until)) => false,
            // Its place is wanted (`server.max_connections`).
            () = held.shared.slots.reclaim.notified() => {
                let cap = held.shared.connections.load().max_connections;
                // Bytes came since (a request, or a TLS record of one).
                let used = || {
                    let waker = std::task::Waker::noop();
                    socket
                        .socket()
                        .poll_read_ready(&mut std::task::Context::from_waker(waker))
                        .is_ready()
                };
                match held.shared.slots.reclaimed(cap, used) {
                    Reclaim::Stale | Reclaim::PassedOn => continue,
                    Reclaim::Close => {}
                }
                tracing::debug!(client = %conn.peer, "closing idle connection for a client at server.max_connections");
                false
            }
        };
        if !next {
            tracing::debug!(client = %conn.peer, "closing idle connection");
            close(&mut socket).await;
            return;
        }
        match woken(&mut socket) {
            // A TLS record not whole yet, or a wake with nothing to read.
            Woken::Nothing => {}
            Woken::LineEnds if draining.is_some() => {
                close(&mut socket).await;
                return;
            }
            Woken::LineEnds => {}
            Woken::Read(unread) => {
                let again = Again {
                    unread,
                    quiet: quiet + parked.elapsed(),
                };
                tokio::spawn(serve_again(socket, conn, held, again));
                return;
            }
            Woken::Failed(error) => {
                tracing::debug!(client = %conn.peer, %error, "parked connection failed");
                return;
            }
        }
    }
}

/// What a parked socket had when it woke (see [`woken`]).
enum Woken {
    Nothing,
    /// Empty lines only.
    LineEnds,
    /// A request's first bytes (or none: the end), for hyper.
    Read(Bytes),
    Failed(std::io::Error),
}

/// What a parked socket has, read without waiting for more: empty lines
/// between requests (RFC 9112 §2.2) are read off here, as neither a head
/// nor activity; handed to hyper, they made it wait for a head that never
/// came, and the connection was closed a few seconds on with a warning
/// (review30c F1). Not async, so its buffer is no part of [`park`]'s
/// future, which every parked connection holds.
fn woken<IO: Parkable>(socket: &mut IO) -> Woken {
    let mut buf = [0u8; 512];
    let mut read = tokio::io::ReadBuf::new(&mut buf);
    let polled = std::pin::Pin::new(socket).poll_read(
        &mut std::task::Context::from_waker(std::task::Waker::noop()),
        &mut read,
    );
    match polled {
        std::task::Poll::Pending => Woken::Nothing,
        std::task::Poll::Ready(Ok(())) => {
            let got = read.filled();
            if !got.is_empty() && idle::only_line_ends(got) {
                Woken::LineEnds
            } else {
                Woken::Read(Bytes::copy_from_slice(got))
            }
        }
        std::task::Poll::Ready(Err(error)) => Woken::Failed(error),
    }
}

/// [`serve_connection`] for a socket coming out of [`park`], boxed: the
/// two spawn each other, and the compiler needs a named type between them.
fn serve_again<IO: Parkable>(
    socket: IO,
    conn: Conn,
    held: Held,
    again: Again,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(serve_connection(socket, conn, held, Some(again)))
}

/// Reads and drops what a client still sends after its connection's last
/// answer (see `serve_connection`), until it stops for [`LINGER_QUIET`],
/// for at most [`LINGER_TIME`], or until a shutdown's grace runs out:
/// nginx's `lingering_timeout` and `lingering_time`, shorter.
async fn linger<IO: Parkable>(socket: &mut IO, mut cut: Shutdown) {
    use tokio::io::AsyncReadExt;
    // Said to be the end first, if hyper has not (a FIN after the TLS
    // close_notify): the client then knows the answer is whole.
    close(socket).await;
    let until = tokio::time::Instant::now() + LINGER_TIME;
    let mut sink = [0u8; 4096];
    loop {
        let quiet = tokio::time::Instant::now() + LINGER_QUIET;
        tokio::select! {
            read = socket.read(&mut sink) => {
                if !read.is_ok_and(|n| n > 0) {
                    return;
                }
            }
            () = tokio::time::sleep_until(quiet.min(until)) => return,
            _ = cut.recv() => return,
        }
    }
}

/// How long a client may go on sending an upload nobody reads before its
/// connection is closed (see [`linger`]).
const LINGER_TIME: Duration = Duration::from_secs(10);

/// How long a client may pause its upload before that (see [`linger`]).
const LINGER_QUIET: Duration = Duration::from_secs(2);

/// Closes a socket hyper no longer has as hyper would: a FIN, after a TLS
/// close_notify.
async fn close<IO: Parkable>(socket: &mut IO) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(DRAIN_QUIET, socket.shutdown()).await;
}

/// The status hyper's HTTP/1 server answered a parse error with, mirroring
/// its `on_error` table (hyper exposes no kind): 414 for a URI too long,
/// 431 for a head too large, 400 for the rest. `None` where it answers
/// nothing (its internal errors, an HTTP/2 preface on HTTP/1).
fn refused_with(error: &hyper::Error) -> Option<(&hyper::Error, u16)> {
    if !error.is_parse() || error.is_parse_version_h2() {
        return None;
    }
    let text = error.to_string();
    let status = if text.starts_with("internal error") {
        return None;
    } else if text.starts_with("URI too long") {
        414
    } else if error.is_parse_too_large() {
        431
    } else {
        400
    };
    Some((error, status))
}

/// The error code of the GOAWAY h2 closed a client's connection with for
/// breaking the protocol (a flood, a forbidden frame): an error of the
/// library's own, not the client's GOAWAY nor a broken socket.
fn broke_http2(error: &hyper::Error) -> Option<h2::Reason> {
    let h2 = std::error::Error::source(error)?.downcast_ref::<h2::Error>()?;
    if !(h2.is_go_away() && h2.is_library()) {
        return None;
    }
    h2.reason().filter(|reason| *reason != h2::Reason::NO_ERROR)
}

/// Counts and says (at most once every [`BROKEN_HTTP2_SAID`] seconds,
/// with how many went unsaid: floods come by the thousand connections a
/// second) a client HTTP/2 connection closed for breaking the protocol.
fn http2_broke(held: &Held, client: SocketAddr, reason: h2::Reason, why: &dyn std::fmt::Display) {
    held.shared.proxy.load().metrics().http2_broken(reason);
    static SAID: crate::logging::Every = crate::logging::Every::new();
    if let Some(held_back) = SAID.due(BROKEN_HTTP2_SAID) {
        let held_back = (held_back > 0).then_some(held_back);
        // With its causes: hyper says only "connection error" of the
        // flood the reads refused (review41d F2).
        tracing::warn!(client = %client, reason = ?reason, error = %why, held_back, "HTTP/2 client broke the protocol or flooded it; connection closed");
    }
}

/// Seconds between two warnings of HTTP/2 connections closed for breaking
/// the protocol.
const BROKEN_HTTP2_SAID: u64 = 10;

/// Once a connection is closing gracefully (idle, or a drain), how long it
/// may stay silent with nothing in flight before it is dropped (an HTTP/2
/// client that has not acknowledged the GOAWAY, for one).
pub(super) const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// After a second stop signal has cut the connections still open, how
/// long their tasks have to log their requests before the exit (the
/// signal's own backstop is longer).
pub(super) const CUT_LOGGED: Duration = Duration::from_secs(1);
