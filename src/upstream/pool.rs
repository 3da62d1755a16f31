//! Keep-alive connections to an upstream's backends, one idle stack per
//! backend. A connection goes back on its stack the moment its response
//! body has been read to the end (nothing to spawn, no key to hash), and
//! the most recently used one is taken first so the warm ones stay warm
//! and the rest age out. A connection whose response was not read to the
//! end is closed, as HTTP/1.1 leaves no other way to reuse it.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use crate::proxy::body::RequestBody;

/// Why a request got no response head from its connection.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, timed out, TLS handshake).
    Connect(BoxError),
    /// The connection broke before a whole response head arrived.
    Http(hyper::Error),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("targets", &self.targets)
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl Pool {
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        builder: http1::Builder,
        targets: Vec<http::Uri>,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(Pool {
            idle: targets.iter().map(|_| Mutex::new(Vec::new())).collect(),
            connector,
            builder,
            targets,
            max_idle,
            idle_timeout,
            connect_timeout,
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// Sends `request` (origin-form target, Host set) to backend `index` on
    /// an idle connection, or a new one (always, when `fresh`). A request
    /// the connection closed under before taking it goes out on a fresh
    /// connection instead.
    pub(super) async fn send(
        self: &Arc<Self>,
        index: usize,
        mut request: Request<RequestBody>,
        fresh: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let idle = if fresh { None } else { self.checkout(index) };
        let mut sender = match idle {
            Some(sender) => sender,
            None => Box::pin(self.connect(index)).await?,
        };
        let mut fresh_tried = false;
        loop {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.wrap(index, sender, response)),
                Err(mut error) => match error.take_message() {
                    // The backend closed this keep-alive connection as we
                    // took it: nothing was sent, so a new one is safe.
                    Some(unsent) if !fresh_tried => {
                        request = unsent;
                        fresh_tried = true;
                        sender = Box::pin(self.connect(index)).await?;
                    }
                    _ => return Err(SendError::Http(error.into_error())),
                },
            }
        }
    }

    /// The freshest usable idle connection to backend `index`. Never waits:
    /// a connection still finishing its last exchange (a backend that
    /// answered before reading the whole upload) goes back once it is done.
    fn checkout(self: &Arc<Self>, index: usize) -> Option<SendRequest<RequestBody>> {
        loop {
            let idle = {
                let mut stack = self.idle[index]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let idle = stack.pop()?;
                if idle.since.elapsed() >= self.idle_timeout {
                    // The rest of the stack is older still.
                    stack.clear();
                    return None;
                }
                idle
            };
            let mut sender = idle.sender;
            if sender.is_ready() {
                return Some(sender);
            }
            if !sender.is_closed() {
                let pool = self.clone();
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        pool.put_back(index, sender);
                    }
                });
            }
        }
    }

    async fn connect(&self, index: usize) -> Result<SendRequest<RequestBody>, SendError> {
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
        let (sender, connection) = self
            .builder
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "backend connection ended with error");
            }
        });
        Ok(sender)
    }

    fn wrap(
        self: &Arc<Self>,
        index: usize,
        sender: SendRequest<RequestBody>,
        response: Response<Incoming>,
    ) -> Response<UpstreamBody> {
        // A 101 hands the connection over to the tunnel: never reused.
        let reusable = response.status() != http::StatusCode::SWITCHING_PROTOCOLS;
        let (parts, inner) = response.into_parts();
        let mut body = UpstreamBody {
            inner,
            reuse: reusable.then(|| Reuse {
                pool: self.clone(),
                index,
                sender,
            }),
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        Response::from_parts(parts, body)
    }

    fn put_back(&self, index: usize, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut stack = self.idle[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if stack.len() < self.max_idle {
            stack.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle for `idle_timeout`.
    fn reap_idle(&self) {
        for stack in &self.idle {
            let mut stack = stack.lock().unwrap_or_else(PoisonError::into_inner);
            stack.retain(|idle| {
                idle.since.elapsed() < self.idle_timeout && !idle.sender.is_closed()
            });
        }
    }
}

/// Closes idle connections as they expire, until the pool is dropped.
async fn reap(pool: Weak<Pool>) {
    let Some(every) = pool
        .upgrade()
        .map(|p| (p.idle_timeout / 2).max(Duration::from_millis(100)))
    else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(pool) => pool.reap_idle(),
            None => return,
        }
    }
}

/// The way back to the pool for a connection whose response is being read.
struct Reuse {
    pool: Arc<Pool>,
    index: usize,
    sender: SendRequest<RequestBody>,
}

/// A backend's response body. Returns its connection to the pool once read
/// to the end; dropped earlier, the connection closes with it.
pub struct UpstreamBody {
    inner: Incoming,
    reuse: Option<Reuse>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(reuse) = self.reuse.take() {
            reuse.pool.put_back(reuse.index, reuse.sender);
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
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.reuse = None,
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
