//! HTTP/1.1 protocol upgrades (WebSocket and the like), passed through:
//! the `Upgrade` request is forwarded with its `Upgrade` and `Connection:
//! upgrade` fields intact (they are hop-by-hop, so the general hygiene
//! strips them), and when the backend answers `101 Switching Protocols` the
//! two connections are bridged byte for byte until either side closes, or
//! until no byte has moved either way for `[server] idle_timeout` (nginx's
//! `proxy_read_timeout` on a tunnel, HAProxy's `timeout tunnel`), so a
//! vanished peer does not hold a tunnel and its backend slot for good.

use std::any::Any;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::ProxyBody;
use super::headers;
use crate::upstream::health::InFlight;
use crate::upstream::UpstreamBody;

/// A client's request to switch protocols, with its pending connection.
pub struct Upgrade {
    protocol: HeaderValue,
    /// The request's id, for the line the tunnel's end is logged with.
    request_id: HeaderValue,
    /// Taken by [`Upgrade::bridge`]; given back to the server's
    /// [`Hold::pending`] if the backend does not switch.
    client: Option<OnUpgrade>,
    hold: Option<Hold>,
}

impl Drop for Upgrade {
    fn drop(&mut self) {
        if let (Some(client), Some(hold)) = (self.client.take(), &self.hold) {
            *hold.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
        }
    }
}

/// The pending upgrade of a request's client connection: hyper arms one
/// for every HTTP/1.1 request with `Upgrade` (and CONNECT), keeps it
/// armed after an answer other than 101, and hands the connection to it
/// when the connection ends. The server keeps it for the connection,
/// which then gets its socket back; taken for a tunnel, it is the
/// client's side of the tunnel.
pub type PendingUpgrade = Arc<std::sync::Mutex<Option<OnUpgrade>>>;

/// What the server of the client's connection wants kept for as long as a
/// tunnel made from it runs, put in the upgrade request's extensions: its
/// count of open connections and its drain guard, so that the tunnel still
/// counts as an open connection and a shutdown waits for it (up to
/// `shutdown_grace`), as for any connection.
#[derive(Clone)]
pub struct Hold {
    pub keep: Arc<dyn Any + Send + Sync>,
    /// Takes the tunnel's place among the open connections, once the
    /// backend switched: taken with the request, a pending upgrade held
    /// two places (review33d F4).
    pub place: Place,
    /// The client's listener stopping (a shutdown, or a reload that
    /// removed it), and how long a tunnel may go on after: a shutdown's
    /// end cuts tunnels with the process, and a removed listener's are
    /// cut as they would be then, not left to run for good.
    pub stopping: (crate::server::shutdown::Shutdown, Grace),
    /// The request's pending upgrade, which the server took out of its
    /// extensions: a tunnel takes it from here.
    pub pending: PendingUpgrade,
}

/// Who a tunnel joins, for the line its end is logged with.
pub struct Ends {
    pub client: std::net::IpAddr,
    pub upstream: String,
    pub backend: Option<std::net::SocketAddr>,
}

/// Takes a place among the open connections, held as long as what it
/// returns.
pub type Place = Arc<dyn Fn() -> Box<dyn Any + Send + Sync> + Send + Sync>;

/// `shutdown_grace` as it is when asked.
pub type Grace = Arc<dyn Fn() -> Duration + Send + Sync>;

/// Ends once `stopping` fires and its grace (read then) has passed; never
/// without.
async fn cut_after(stopping: Option<(crate::server::shutdown::Shutdown, Grace)>) {
    match stopping {
        Some((mut signal, grace)) => {
            signal.recv().await;
            tokio::time::sleep(grace()).await;
        }
        None => std::future::pending().await,
    }
}

/// Takes the client's pending upgrade out of an HTTP/1.1 upgrade request.
/// Two kinds are not passed on, and go to the backend as plain requests
/// (the `Upgrade` field stripped with the other hop-by-hop fields), which
/// RFC 9110 §7.8 lets any server do:
/// - `h2c`: a backend that took it would hand the client a raw HTTP/2
///   connection behind portico's routing, limits and hygiene ("h2c
///   smuggling"); RFC 9113 dropped the mechanism.
/// - a chunked request body: hyper's client sends an upgrade request's
///   body only with a Content-Length, so this one would be lost.
pub fn requested(request: &mut Request<Incoming>) -> Option<Upgrade> {
    // Not kept past a request that does not become a tunnel.
    let hold = request.extensions_mut().remove::<Hold>();
    if request.version() != Version::HTTP_11
        || !headers::connection_lists(request.headers(), "upgrade")
    {
        return None;
    }
    if request.headers().contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    // Every line's protocols, as one list (RFC 9110 §5.3: two `Upgrade`
    // lines offered only the first, review36f L6), `h2c` taken out of
    // one that offers others too (`websocket, h2c` went on as a plain
    // request, review36d).
    let kept: Vec<&str> = headers::list_members(request.headers(), &header::UPGRADE)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("h2c"))
        .collect();
    if kept.is_empty() {
        return None;
    }
    let protocol = HeaderValue::from_str(&kept.join(", ")).ok()?;
    // Given here, not on the way to the backend as other requests get it
    // with the access log off: the tunnel's closing line, then its only
    // record, names the id the backend got (review51 L1).
    let request_id = super::log::ensure_request_id(request.headers_mut()).clone();
    let client = match &hold {
        Some(hold) => hold
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?,
        None => hyper::upgrade::on(request),
    };
    Some(Upgrade {
        protocol,
        request_id,
        hold,
        client: Some(client),
    })
}

impl Upgrade {
    /// Puts back the fields hop-by-hop removal took out.
    pub fn restore_request(&self, headers: &mut HeaderMap) {
        headers.insert(header::UPGRADE, self.protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    /// Answers the client with the backend's 101 and bridges the two
    /// upgraded connections in the background. The tunnel's end is logged
    /// at info with `ends`: its access line was written at the 101.
    pub fn bridge(
        mut self,
        mut response: Response<UpstreamBody>,
        in_flight: InFlight,
        idle: Duration,
        ends: Ends,
    ) -> Response<ProxyBody> {
        let backend = hyper::upgrade::on(&mut response);
        let request_id = std::mem::replace(&mut self.request_id, HeaderValue::from_static(""));
        let client = self.client.take();
        let hold = self.hold.take();
        let place = hold.as_ref().map(|hold| (hold.place)());
        tokio::spawn(async move {
            let _place = place;
            // The backend slot stays taken while the tunnel is open, and
            // the client's connection counted.
            let _in_flight = in_flight;
            let stopping = hold.as_ref().map(|hold| hold.stopping.clone());
            let _hold = hold;
            // Taken by `requested`, which made this.
            let Some(client) = client else {
                return;
            };
            let (client, backend) = match tokio::try_join!(client, backend) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%error, "upgrade failed");
                    return;
                }
            };
            let opened = std::time::Instant::now();
            let moved = AtomicU64::new(0);
            let mut client = Counted::new(TokioIo::new(client), &moved);
            let mut backend = Counted::new(TokioIo::new(backend), &moved);
            let (end, error) = tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut client, &mut backend) => match copied {
                    Ok(_) => ("closed", None),
                    Err(error) => ("broken", Some(error)),
                },
                () = quiet_for(&moved, idle) => ("idle_timeout", None),
                () = cut_after(stopping) => ("shutdown_grace", None),
            };
            // As nginx writes a tunnel's access line at its end, and
            // HAProxy its termination state: a user's report of a dropped
            // WebSocket is told from portico's idle cut or a backend's
            // reset (review42h M1: debug lines without the client).
            tracing::info!(
                client = %ends.client,
                upstream = %ends.upstream,
                backend = ends.backend.map(tracing::field::display),
                request_id = request_id.to_str().ok(),
                duration_s = opened.elapsed().as_secs_f64(),
                bytes_from_client = client.read,
                bytes_from_backend = backend.read,
                end,
                error = error.map(tracing::field::display),
                "tunnel closed"
            );
        });
        let (mut parts, _) = response.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        headers::prepare_response(&mut parts);
        if let Some(protocol) = protocol {
            parts.headers.insert(header::UPGRADE, protocol);
        }
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        Response::from_parts(parts, ProxyBody::empty())
    }
}

/// Resolves once `moved` has not changed for `idle`, checked every quarter
/// of it (never more often than every 10 ms).
async fn quiet_for(moved: &AtomicU64, idle: Duration) {
    let step = (idle / 4).max(Duration::from_millis(10));
    let mut last = moved.load(Ordering::Relaxed);
    let mut still = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = moved.load(Ordering::Relaxed);
        if now == last {
            still += step;
            if still >= idle {
                return;
            }
        } else {
            last = now;
            still = Duration::ZERO;
        }
    }
}

/// One side of a tunnel, counting every transfer into a shared counter.
struct Counted<'a, IO> {
    io: IO,
    moved: &'a AtomicU64,
    /// Bytes read from `io`.
    read: u64,
}

impl<'a, IO> Counted<'a, IO> {
    fn new(io: IO, moved: &'a AtomicU64) -> Self {
        Counted { io, moved, read: 0 }
    }

    fn count<T>(&self, result: Poll<T>) -> Poll<T> {
        if result.is_ready() {
            self.moved.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<'_, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            self.read += (buf.filled().len() - before) as u64;
        }
        self.count(result)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<'_, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.count(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
