//! The bundled sample order backend: a small layered service (model →
//! repository → service → HTTP) used by the tests, the benchmarks and
//! `portico demo`. JSON everywhere; every response names its instance in
//! `X-Backend`. Start it in-process with [`start`] (tests) or [`start_on`]
//! with a shared repository (the demo: several instances, one store), or as
//! its own process with the `order-backend` binary.

pub mod http;
pub mod model;
pub mod repository;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use repository::{InMemoryRepository, OrderRepository};
use service::OrderService;

/// How long a stopping backend waits for in-flight requests and then for
/// the worker to confirm the orders still queued, both together.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct BackendOptions {
    pub name: String,
    /// Added before every answer.
    pub delay: Duration,
    /// `max-age` of the cacheable answers.
    pub max_age: u32,
    /// Requests served at once at most, the rest waiting their turn, as
    /// an app server with N workers; `None` for no bound. With `delay`,
    /// it gives an instance a capacity (N / delay a second), so that
    /// adding instances shows in a load test: a sleep alone bounds
    /// nothing, and one instance served what three did (review35c 6).
    pub concurrency: Option<usize>,
}

impl BackendOptions {
    pub fn new(name: impl Into<String>) -> Self {
        BackendOptions {
            name: name.into(),
            delay: Duration::ZERO,
            max_age: 10,
            concurrency: None,
        }
    }
}

/// Warns when the sample is reached from beyond loopback at `addr`: its
/// test endpoints echo request headers (Authorization too) and let a
/// client choose response headers, which no public service should do.
/// Both the `order-backend` process and `portico demo`, whose proxy serves
/// them, say so (review35c 7: only the former did).
pub fn warn_if_public(addr: SocketAddr) {
    if !addr.ip().to_canonical().is_loopback() {
        tracing::warn!(
            %addr,
            "listening beyond loopback: the sample order backend serves test endpoints (/echo, /echo/headers, /bytes/N, /cache/..., /ws/echo) that no public service should"
        );
    }
}

/// A fresh seeded store: user 1 owns `ORDER-001`.
pub fn new_repository() -> Arc<dyn OrderRepository> {
    Arc::new(InMemoryRepository::seeded())
}

/// A fresh seeded store for the instance `name`, one of several with a
/// store each: new orders are `ORDER-{name}-002`... (see
/// [`InMemoryRepository::seeded_for`]).
pub fn new_repository_for(name: &str) -> Arc<dyn OrderRepository> {
    Arc::new(InMemoryRepository::seeded_for(name))
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting,
/// lets in-flight connections finish and the worker confirm the queued
/// orders, within a bounded grace.
pub async fn serve(
    listener: TcpListener,
    opts: BackendOptions,
    repo: Arc<dyn OrderRepository>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ctx = Arc::new(http::Context::new(opts, OrderService::start(repo)));
    serve_context(listener, ctx, shutdown, Worker::Own).await
}

/// Whether an instance stopping drains its order service's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Worker {
    /// Its own: the confirmations still queued are done (within the
    /// grace) before it stops.
    Own,
    /// Shared with other instances, as they share a store (`portico
    /// demo`): the queue is theirs too, and outlives this one (review41c
    /// F2: a stopped demo backend's backlog was dropped after 5 s, its
    /// orders left `pending` in the shared store for good).
    Shared,
}

async fn serve_context(
    listener: TcpListener,
    ctx: Arc<http::Context>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    worker: Worker,
) -> std::io::Result<()> {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let (trigger, stop) = crate::server::shutdown::channel();
    // Held here, so that a connection still busy at the end of the grace
    // is cut, not left running on a runtime that lives on (the demo's,
    // the tests'): review41c F1 saw one answer 201 after the cut, for an
    // order no worker would confirm.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next() => continue,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let builder = builder.clone();
        let mut stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let ctx = ctx.clone();
                async move { Ok::<_, std::convert::Infallible>(http::handle(ctx, request).await) }
            });
            // With upgrades, for the `/ws/echo` test helper.
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.recv() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    trigger.fire();
    let finished = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, finished).await.is_err() {
        tracing::warn!(
            grace = ?STOP_GRACE,
            busy = connections.len(),
            "connections still busy at the end of the shutdown grace are cut"
        );
        connections.shutdown().await;
    }
    // After the requests: one still being answered may publish an event.
    if worker == Worker::Own {
        ctx.service.drain(deadline).await;
    }
    Ok(())
}

/// A backend running on the current runtime; stops when dropped.
#[derive(Debug)]
pub struct RunningBackend {
    addr: SocketAddr,
    ctx: Arc<http::Context>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningBackend {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.ctx.opts.name
    }

    /// Requests answered (or being answered) so far.
    pub fn requests(&self) -> u64 {
        self.ctx.requests.load(Ordering::Relaxed)
    }

    /// Orders this instance created.
    pub fn orders_created(&self) -> u64 {
        self.ctx.orders_created.load(Ordering::Relaxed)
    }

    /// Stops accepting, waits (bounded) for in-flight requests and queued
    /// order confirmations.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(STOP_GRACE * 2, &mut self.task).await;
    }
}

impl Drop for RunningBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds 127.0.0.1:0 with its own fresh store and starts serving.
pub async fn start(opts: BackendOptions) -> std::io::Result<RunningBackend> {
    start_on(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        opts,
        new_repository(),
    )
    .await
}

/// Binds `addr` and starts serving from `repo`; returns once listening.
pub async fn start_on(
    addr: SocketAddr,
    opts: BackendOptions,
    repo: Arc<dyn OrderRepository>,
) -> std::io::Result<RunningBackend> {
    start_serving(addr, opts, OrderService::start(repo), Worker::Own).await
}

/// Binds `addr` and starts serving the orders of `service`, a store and
/// confirmation worker shared with other instances (`portico demo`'s, as
/// instances of one app share a database and a broker): stopping this one
/// leaves its queued confirmations to the worker, which whoever made
/// `service` drains ([`OrderService::drain`]) once all have stopped.
pub async fn start_sharing(
    addr: SocketAddr,
    opts: BackendOptions,
    service: OrderService,
) -> std::io::Result<RunningBackend> {
    start_serving(addr, opts, service, Worker::Shared).await
}

async fn start_serving(
    addr: SocketAddr,
    opts: BackendOptions,
    service: OrderService,
    worker: Worker,
) -> std::io::Result<RunningBackend> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let ctx = Arc::new(http::Context::new(opts, service));
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let task = tokio::spawn(serve_context(listener, ctx.clone(), shutdown, worker));
    Ok(RunningBackend {
        addr,
        ctx,
        stop: Some(stop),
        task,
    })
}
