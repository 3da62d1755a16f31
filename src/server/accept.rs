//! Accepting client connections: the accept loop of each listener (caps,
//! TLS handshakes, plain HTTP on a TLS port), and its failures logged as
//! runs rather than one line per retry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use super::connection::{bad_request, serve_connection, Held, DRAIN_QUIET, PARK_AFTER};
use super::listeners::Mode;
use super::shutdown::Shutdown;
use super::slots::{listen_queue, Reclaim};
use super::{listeners, Shared};
use crate::proxy::Conn;

pub(super) async fn accept_loop(
    listener: TcpListener,
    kind: Arc<ArcSwap<listeners::Kind>>,
    shared: Arc<Shared>,
    serving: listeners::Serving,
    mut removed: Shutdown,
) {
    let listeners::Serving {
        mut shutdown,
        drain,
        cut: _,
    } = serving;
    // Shown as an address, not as Rust's `Some(...)`.
    let local = listener
        .local_addr()
        .map_or_else(|_| "-".to_owned(), |a| a.to_string());
    let mut failing = AcceptFailures::default();
    loop {
        // A place among `max_connections` first: at the cap, new
        // connections wait in the kernel's backlog, as HAProxy's `maxconn`
        // leaves them, rather than take descriptors portico needs for
        // its backends.
        tokio::select! {
            () = shared.slots.room(
                || shared.connections.load().max_connections,
                || listen_queue(&listener),
            ) => {}
            _ = shutdown.recv() => break,
            _ = removed.recv() => break,
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.recv() => break,
            _ = removed.recv() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.metrics.connections_accepted.inc();
                // At the cap, an idle connection makes room for it first.
                tokio::select! {
                    () = shared.slots.make_room(|| shared.connections.load().max_connections) => {}
                    _ = shutdown.recv() => break,
                    _ = removed.recv() => break,
                }
                let open = shared.slots.take();
                failing.recovered(&local);
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                // Read per connection: a reload's certificates and
                // settings apply to the connections that follow it.
                let kind = kind.load_full();
                // The kind's own signal, which also fires at shutdown: a
                // reload that removes the listener, or switches its kind,
                // drains its connections as a shutdown would
                // (`Connection: close`, GOAWAY), where they went on being
                // served for as long as their clients kept them busy.
                let shutdown = kind.stopped.clone();
                let drain = drain.clone();
                let settings = shared.connections.load_full();
                let cut = kind.cut.clone();
                let cut_off = kind.cut_off.clone();
                tokio::spawn(async move {
                    let held = Held {
                        shared,
                        settings,
                        shutdown,
                        cut,
                        _drain: drain,
                        open: Some(open),
                    };
                    match &kind.mode {
                        Mode::Plain => {
                            let conn = Conn::new(peer, "http", cut_off);
                            serve_connection(stream, conn, held, None).await
                        }
                        Mode::Tls(acceptor) => {
                            // The head's time, the handshake's included.
                            let accepted = tokio::time::Instant::now();
                            let deadline = accepted + held.settings.header_timeout;
                            match first_byte_or_room(&stream, &held.shared, deadline).await {
                                Ok(FirstByte::Room) => {
                                    tracing::debug!(client = %peer, "closing a connection that sent nothing yet for a client at server.max_connections");
                                    return;
                                }
                                Ok(FirstByte::Plain) => {
                                    let refusal = refuse_plain_http(stream, accepted, deadline);
                                    let (said, answered) = refusal.await;
                                    held.shared.proxy.load().refused(peer, 400, &said, answered);
                                    return;
                                }
                                Ok(FirstByte::Other) => {}
                                // A TCP check or a port scan: no handshake
                                // failed, as none began (nginx closes it
                                // quietly, HAProxy's `dontlognull`); counted,
                                // they hid real failures (review35b F1).
                                Ok(FirstByte::None) | Err(_) => {
                                    tracing::debug!(client = %peer, "connection to a TLS listener sent nothing; closed");
                                    return;
                                }
                            }
                            let handshake =
                                tokio::time::timeout_at(deadline, acceptor.accept(stream));
                            match handshake.await {
                                Ok(Ok(tls)) => {
                                    let conn = Conn::new(peer, "https", cut_off);
                                    serve_connection(tls, conn, held, None).await
                                }
                                Ok(Err(error)) => {
                                    held.shared.metrics.tls_handshake_failed(false);
                                    tracing::debug!(client = %peer, %error, "TLS handshake failed")
                                }
                                Err(_) => handshake_timed_out(&held.shared, peer),
                            }
                        }
                    }
                });
            }
            Err(error) => {
                // Out of file descriptors and similar: back off instead of
                // spinning; the listener itself stays usable.
                failing.failed(&local, &error);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = local, "listener closed");
}

/// A client's TLS handshake, begun, did not finish within
/// `request_header_timeout`.
fn handshake_timed_out(shared: &Shared, peer: SocketAddr) {
    shared.metrics.tls_handshake_failed(true);
    tracing::debug!(client = %peer, "TLS handshake timed out");
}

/// A run of failed accepts (out of file descriptors, mostly), logged when
/// it starts, every ten seconds while it lasts, and when it ends: one
/// line per 50 ms retry was twenty a second for as long as it lasted. It
/// ends only once accepts have gone through for [`AcceptFailures::CALM`]:
/// at the limit each descriptor freed lets one accept through before the
/// next fails, and a run ended at each was two lines per freed descriptor
/// (review34g M3).
/// The admin listener's too (review34b F4: it said so twenty times a
/// second).
#[derive(Default)]
pub(crate) struct AcceptFailures {
    /// When the run started, its last line, the failures since, and the
    /// last failure.
    run: Option<AcceptRun>,
}

struct AcceptRun {
    since: std::time::Instant,
    said: std::time::Instant,
    count: u64,
    last: std::time::Instant,
}

impl AcceptFailures {
    const EVERY: Duration = Duration::from_secs(10);
    const CALM: Duration = Duration::from_secs(1);

    /// Notes a failed accept; whether a line said so.
    pub(crate) fn failed(&mut self, local: &str, error: &std::io::Error) -> bool {
        let now = std::time::Instant::now();
        match &mut self.run {
            None => {
                tracing::warn!(
                    listener = local, %error,
                    "accept failed; new connections wait in the listen queue"
                );
                self.run = Some(AcceptRun {
                    since: now,
                    said: now,
                    count: 0,
                    last: now,
                });
                true
            }
            Some(run) => {
                run.count += 1;
                run.last = now;
                if now.duration_since(run.said) >= Self::EVERY {
                    tracing::warn!(
                        listener = local, %error, failures = run.count,
                        "accept still failing"
                    );
                    (run.said, run.count) = (now, 0);
                    return true;
                }
                false
            }
        }
    }

    /// Notes an accept that went through; whether a line said the run of
    /// failures is over.
    pub(crate) fn recovered(&mut self, local: &str) -> bool {
        let Some(run) = &self.run else { return false };
        if run.last.elapsed() < Self::CALM {
            return false;
        }
        tracing::info!(
            listener = local,
            after_ms = run.since.elapsed().as_millis() as u64,
            "accepting again"
        );
        self.run = None;
        true
    }
}

/// How a connection to a TLS listener opens: with an HTTP/1 request (an
/// upper-case method; `http://` typed for an `https://` address), a TLS
/// record (0x16, a handshake), or not at all.
async fn first_byte(stream: &tokio::net::TcpStream) -> FirstByte {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        // A TLS record starts with its type (0x16 for a handshake); a
        // request with a method, or with the empty line RFC 9112 §2.2 lets
        // come first.
        Ok(1) if first[0].is_ascii_uppercase() || first[0] == b'\r' || first[0] == b'\n' => {
            FirstByte::Plain
        }
        Ok(1) => FirstByte::Other,
        _ => FirstByte::None,
    }
}

/// [`first_byte`], by `deadline`, waited for as an idle connection: with
/// `server.max_connections` set, one that has sent nothing for
/// [`PARK_AFTER`] is among the connections closed to make room for a new
/// client at the cap, as a plain one that sent nothing is (tls53 L2: it
/// held its place until `request_header_timeout`, 10 s by default).
async fn first_byte_or_room(
    stream: &tokio::net::TcpStream,
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Result<FirstByte, tokio::time::error::Elapsed> {
    let mut first = std::pin::pin!(tokio::time::timeout_at(deadline, first_byte(stream)));
    if shared.connections.load().max_connections.is_none() {
        return first.await;
    }
    tokio::select! {
        got = &mut first => return got,
        () = tokio::time::sleep(PARK_AFTER) => {}
    }
    let slots = &shared.slots;
    let _parked = slots.parked();
    let mut reclaim = std::pin::pin!(slots.reclaim.notified());
    reclaim.as_mut().enable();
    loop {
        tokio::select! {
            // First: a byte come meanwhile keeps the connection.
            biased;
            got = &mut first => return got,
            () = &mut reclaim => {
                reclaim.set(slots.reclaim.notified());
                reclaim.as_mut().enable();
                let cap = shared.connections.load().max_connections;
                match slots.reclaimed(cap, || false) {
                    Reclaim::Stale | Reclaim::PassedOn => continue,
                    Reclaim::Close => return Ok(FirstByte::Room),
                }
            }
        }
    }
}

/// What a client's first byte on a TLS listener says (see [`first_byte`]).
enum FirstByte {
    /// Plain HTTP.
    Plain,
    /// Anything else: a handshake, or what the handshake will refuse.
    Other,
    /// None came: the connection closed (or broke) first.
    None,
    /// None came, and its place was wanted for a new client at
    /// `server.max_connections` (see [`first_byte_or_room`]).
    Room,
}

/// What nginx tells plain HTTP sent to its HTTPS port, in place of the TLS
/// alert that curl and browsers show as a garbled or empty reply.
const PLAIN_HTTP_ON_TLS: &str = "plain HTTP request sent to an HTTPS port";

/// Answers a plain HTTP request on a TLS listener with a readable 400 and
/// closes: what arrived of the request is read first (by `deadline`, up
/// to 16 KiB), so the close sends the answer rather than a reset. Returns
/// what to log: the reason, and the answer's body bytes and time since
/// `accepted`.
async fn refuse_plain_http(
    mut stream: tokio::net::TcpStream,
    accepted: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> (&'static str, crate::proxy::Refused) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout_at(deadline, async {
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let (answer, body) = bad_request(PLAIN_HTTP_ON_TLS);
    let _ = tokio::time::timeout_at(deadline, async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
    let answered = crate::proxy::Refused {
        bytes: body,
        took: accepted.elapsed(),
    };
    // A body still coming is read off for a moment, so the close sends the
    // answer rather than a reset that could discard it.
    let _ = tokio::time::timeout(DRAIN_QUIET, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    (PLAIN_HTTP_ON_TLS, answered)
}

#[cfg(test)]
mod accept_failure_tests {
    use super::*;

    #[test]
    fn accepts_between_failures_do_not_end_the_run() {
        let mut failing = AcceptFailures::default();
        let error = std::io::Error::from_raw_os_error(24);
        assert!(failing.failed("l", &error));
        // At the limit: one goes through, the next fails. Said once.
        for _ in 0..100 {
            assert!(!failing.recovered("l"));
            assert!(!failing.failed("l", &error));
        }
        // Calm for a second: over.
        if let Some(run) = &mut failing.run {
            run.last -= AcceptFailures::CALM;
        }
        assert!(failing.recovered("l"));
        assert!(failing.failed("l", &error));
    }
}
