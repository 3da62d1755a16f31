//! Listeners and connection lifecycle: accept, serve HTTP/1.1 and h2c on
//! each connection (auto-detected), apply the connection-level limits from
//! `[server]`, and stop gracefully. The request path itself is
//! [`crate::proxy::Proxy`], read per request from an [`ArcSwap`] so a reload
//! can replace it without touching connections.

pub mod shutdown;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::proxy::{Conn, Proxy};
use shutdown::{Drain, DrainGuard, Shutdown};

/// hyper refuses smaller read buffers; a head must fit in one buffer.
const MIN_BUF_SIZE: usize = 8 * 1024;

/// Binds every address, naming the one that failed.
pub async fn bind(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A running proxy's shared state: the current request-path generation.
pub struct Shared {
    pub proxy: ArcSwap<Proxy>,
    pub metrics: Arc<Metrics>,
    /// The file a reload re-reads; `None` for configs built in code.
    config_path: Option<PathBuf>,
    /// Listen addresses in force, to tell the operator when a reload
    /// changes them (they need a restart).
    listen: ArcSwap<Vec<SocketAddr>>,
    /// One acceptor per `[[server.tls]]` entry, swapped on reload so new
    /// certificates apply to new connections.
    tls: ArcSwap<Vec<tokio_rustls::TlsAcceptor>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config_path", &self.config_path)
            .field("listen", &self.listen)
            .field("tls_listeners", &self.tls.load().len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Fresh state with its own metrics registry (one per running proxy, so
    /// tests in one process do not share counters).
    pub fn new(config: &Config) -> Arc<Self> {
        Self::with_path(config, None)
    }

    pub fn with_path(config: &Config, config_path: Option<PathBuf>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        Arc::new(Shared {
            proxy: ArcSwap::from_pointee(Proxy::new(config, metrics.clone())),
            metrics,
            config_path,
            listen: ArcSwap::from_pointee(config.server.listen.clone()),
            tls: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// Loads the certificates of every TLS listener; on error nothing
    /// changes and the message names the file.
    pub fn load_tls(&self, config: &Config) -> Result<(), tls::TlsError> {
        let acceptors = tls::acceptors(&config.server.tls)?;
        self.tls.store(Arc::new(acceptors));
        Ok(())
    }

    /// Re-reads the config file and swaps the new request-path state in. A
    /// bad file changes nothing and returns the same errors `portico check`
    /// prints. In-flight requests finish on the generation they started
    /// with; upstreams whose settings did not change keep their health
    /// state and connection pools.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("started without --config: nothing to reload".into());
        };
        let config = config::load(path).map_err(|e| e.to_string())?;
        if self.tls.load().len() != config.server.tls.len() {
            tracing::warn!(
                "[[server.tls]] listeners added or removed; they take effect after a restart"
            );
        }
        self.load_tls(&config).map_err(|e| e.to_string())?;
        let previous = self.proxy.load();
        let next = Proxy::rebuild(&config, self.metrics.clone(), &previous);
        self.proxy.store(Arc::new(next));
        if **self.listen.load() != config.server.listen {
            tracing::warn!(
                listen = ?config.server.listen,
                "listen addresses changed; they take effect after a restart"
            );
        }
        tracing::info!(file = %path.display(), "configuration reloaded");
        Ok(())
    }
}

fn connection_builder(settings: &config::Server) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this clock whenever it waits for a head, so it also
        // bounds how long an idle keep-alive connection is held, as
        // HAProxy's `timeout http-request` does.
        .header_read_timeout(settings.request_header_timeout)
        .max_buf_size((settings.max_header_size as usize).max(MIN_BUF_SIZE))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(settings.idle_timeout / 2)
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves `listeners` until `signal` resolves, then stops accepting, lets
/// in-flight requests finish within `shutdown_grace` and returns.
pub async fn run(
    config: &Config,
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    signal: impl Future<Output = ()>,
) {
    run_with_admin(config, shared, listeners, None, signal).await
}

/// The admin listener and its token, if mutations are enabled.
pub type AdminListener = (TcpListener, Option<String>);

/// Everything a running proxy listens on.
#[derive(Debug, Default)]
pub struct Listeners {
    pub plain: Vec<TcpListener>,
    /// Each with the index of its `[[server.tls]]` entry.
    pub tls: Vec<(TcpListener, usize)>,
    pub admin: Option<AdminListener>,
}

/// [`run`] plus the admin endpoints on their own listener.
pub async fn run_with_admin(
    config: &Config,
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    admin: Option<AdminListener>,
    signal: impl Future<Output = ()>,
) {
    let all = Listeners {
        plain: listeners,
        tls: Vec::new(),
        admin,
    };
    run_all(config, shared, all, signal).await
}

/// How a listener's connections start: plain, or a TLS handshake with the
/// acceptor of `[[server.tls]]` entry `index` (read per connection, so a
/// reload's new certificates apply to new connections).
#[derive(Debug, Clone, Copy)]
enum Transport {
    Plain,
    Tls(usize),
}

/// Serves every listener until `signal` resolves, then stops accepting,
/// lets in-flight requests finish within `shutdown_grace` and returns.
pub async fn run_all(
    config: &Config,
    shared: Arc<Shared>,
    all: Listeners,
    signal: impl Future<Output = ()>,
) {
    let (trigger, shutdown) = shutdown::channel();
    if let Some((listener, token)) = all.admin {
        tokio::spawn(crate::admin::serve(
            listener,
            shared.clone(),
            token,
            shutdown.clone(),
        ));
    }
    let drain = Drain::new();
    let builder = Arc::new(connection_builder(&config.server));
    let handshake_timeout = config.server.request_header_timeout;
    let transports = all
        .plain
        .into_iter()
        .map(|l| (l, Transport::Plain))
        .chain(all.tls.into_iter().map(|(l, i)| (l, Transport::Tls(i))));
    for (listener, transport) in transports {
        let accept = accept_loop(
            listener,
            transport,
            handshake_timeout,
            shared.clone(),
            builder.clone(),
            shutdown.clone(),
            drain.guard(),
        );
        tokio::spawn(accept);
    }

    signal.await;
    tracing::info!(
        grace = ?config.server.shutdown_grace,
        "shutting down: no new connections, draining in-flight requests"
    );
    trigger.fire();
    if drain.wait(config.server.shutdown_grace).await {
        tracing::info!("all connections drained");
    } else {
        tracing::warn!("shutdown_grace elapsed with connections still open; closing them");
    }
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    handshake_timeout: Duration,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut shutdown: Shutdown,
    drain: DrainGuard,
) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.recv() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let builder = builder.clone();
                let shutdown = shutdown.clone();
                let drain = drain.clone();
                tokio::spawn(async move {
                    match transport {
                        Transport::Plain => {
                            let conn = Conn {
                                peer,
                                proto: "http",
                            };
                            serve_connection(stream, conn, shared, builder, shutdown, drain).await
                        }
                        Transport::Tls(index) => {
                            let Some(acceptor) = shared.tls.load().get(index).cloned() else {
                                return;
                            };
                            let handshake =
                                tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                            match handshake.await {
                                Ok(Ok(tls)) => {
                                    let conn = Conn {
                                        peer,
                                        proto: "https",
                                    };
                                    serve_connection(tls, conn, shared, builder, shutdown, drain)
                                        .await
                                }
                                Ok(Err(error)) => {
                                    tracing::debug!(client = %peer, %error, "TLS handshake failed")
                                }
                                Err(_) => {
                                    tracing::debug!(client = %peer, "TLS handshake timed out")
                                }
                            }
                        }
                    }
                });
            }
            Err(error) => {
                // Out of file descriptors and similar: back off instead of
                // spinning; the listener itself stays usable.
                tracing::warn!(listener = ?local, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = ?local, "listener closed");
}

async fn serve_connection<IO>(
    stream: IO,
    conn: Conn,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut shutdown: Shutdown,
    _drain: DrainGuard,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = OpenConnection::new(shared.metrics.connections_open.clone());
    let service = service_fn(move |request| {
        // One generation per request: a reload mid-connection applies to
        // the next request, and this one finishes on the config it began on.
        let proxy = shared.proxy.load_full();
        async move { Ok::<_, Infallible>(proxy.handle(request, conn).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.recv() => {
            // Finish in-flight requests, close keep-alive, send GOAWAY on h2.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(client = %conn.peer, %error, "connection ended with error");
    }
}

/// Counts a connection in `portico_connections_open` for as long as it
/// lives, however its task ends.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
