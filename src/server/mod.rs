//! Listeners and connection lifecycle: accept, serve HTTP/1.1 and HTTP/2 on
//! each connection (by ALPN, or by the client's first bytes; see
//! `protocol`), apply the connection-level limits from
//! `[server]`, and stop gracefully. The request path itself is
//! [`crate::proxy::Proxy`], read per request from an [`ArcSwap`] so a reload
//! can replace it without touching connections.

mod idle;
mod listeners;
mod protocol;
pub mod shutdown;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::task::{AbortOnDrop, WhenWoken};
use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::metrics::{Configured, Metrics};
use crate::proxy::{Conn, Proxy};
use listeners::{Mode, Registry, Serving};
use shutdown::{Drain, DrainGuard, Shutdown};

/// hyper refuses smaller read buffers; a head must fit in one buffer.
const MIN_BUF_SIZE: usize = 8 * 1024;

/// Binds every address, naming the one that failed.
pub async fn bind(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    addrs.iter().map(|a| listeners::bind_now(*a)).collect()
}

/// A connection's request head did not arrive whole in time: one that
/// had begun is logged and counted as nginx does (408, closed without an
/// answer); a connection that sent nothing is no request.
fn head_timed_out(
    shared: &Shared,
    activity: &idle::Activity,
    client: SocketAddr,
    waited: Duration,
) {
    head_cut(
        shared,
        activity,
        client,
        waited,
        "request head not complete within request_header_timeout",
    );
}

/// [`head_timed_out`] for any reason the connection closes on a head
/// begun and not finished: a drain that found it silent for a second
/// too, which left no line (review31b L3).
fn head_cut(
    shared: &Shared,
    activity: &idle::Activity,
    client: SocketAddr,
    waited: Duration,
    why: &'static str,
) {
    if activity.head_begun() {
        let answered = crate::proxy::Refused {
            bytes: 0,
            took: waited,
        };
        shared.proxy.load().refused(client, 408, &why, answered);
    } else {
        tracing::debug!(%client, why, "no request head begun; closing");
    }
}

/// Binds the admin listener, saying which listener an error is about.
pub async fn bind_admin(addr: SocketAddr) -> io::Result<TcpListener> {
    listeners::bind_now(addr).map_err(|e| io::Error::new(e.kind(), format!("[admin] listen: {e}")))
}

/// A running proxy's shared state: the current request-path generation,
/// the connection settings and the listeners, each replaced by a reload.
pub struct Shared {
    pub proxy: ArcSwap<Proxy>,
    pub metrics: Arc<Metrics>,
    /// The file a reload re-reads; `None` for configs built in code.
    config_path: Option<PathBuf>,
    /// The config in force, for what a reload compares against.
    config: ArcSwap<Config>,
    /// How new connections are served (timeouts, buffer sizes).
    connections: ArcSwap<ConnectionSettings>,
    /// The client connections open, against `max_connections`.
    slots: Arc<Slots>,
    /// One acceptor per `[[server.tls]]` entry, from [`Shared::load_tls`],
    /// for the listeners [`run_all`] starts with; once running, each
    /// listener holds its own acceptor and a reload swaps it there.
    tls: ArcSwap<Vec<tokio_rustls::TlsAcceptor>>,
    listeners: Registry,
    /// One reload at a time (SIGHUP and the admin API may race).
    reloading: Mutex<()>,
    /// The admin mutations' bearer token (`[admin] token_file`), read at
    /// start and again by every reload; `None` disables the mutations.
    admin_token: ArcSwapOption<String>,
    /// Set once a shutdown began.
    draining: AtomicBool,
    /// Set once [`run_all`] has started the listeners, which a reload
    /// changes (see [`Shared::serving`]).
    started: tokio::sync::watch::Sender<bool>,
    /// `[admin] listen` as the process started with it: the admin
    /// listener stays there until a restart, whatever a reload says.
    admin_listen: std::net::SocketAddr,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config_path", &self.config_path)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

/// What a new connection is served with, from `[server]`.
struct ConnectionSettings {
    builders: Arc<protocol::Builders>,
    /// `request_header_timeout`: for the TLS handshake and for each head.
    header_timeout: Duration,
    idle_timeout: Duration,
    max_connections: Option<usize>,
}

impl ConnectionSettings {
    fn limits(&self) -> idle::Limits {
        idle::Limits {
            idle: self.idle_timeout,
            head: self.header_timeout,
            unread: self.idle_timeout,
            park: Some(PARK_AFTER),
            park_fresh: self.max_connections.is_some(),
        }
    }

    /// The watchdog's limits for a connection on its way out: a second
    /// with nothing to do is enough to let it go, and it is not parked.
    fn closing_limits(&self) -> idle::Limits {
        idle::Limits {
            idle: self.idle_timeout.min(DRAIN_QUIET),
            park: None,
            park_fresh: false,
            ..self.limits()
        }
    }

    /// The watchdog's limits for an idle HTTP/2 connection closed to make
    /// room: as while serving, not parked.
    fn reclaimed_limits(&self) -> idle::Limits {
        idle::Limits {
            park: None,
            park_fresh: false,
            ..self.limits()
        }
    }

    fn new(settings: &config::Server) -> Arc<Self> {
        Arc::new(ConnectionSettings {
            builders: Arc::new(connection_builders(settings)),
            header_timeout: settings.request_header_timeout,
            idle_timeout: settings.idle_timeout,
            max_connections: settings
                .max_connections
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        })
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
        metrics.config_loaded(true);
        Arc::new(Shared {
            proxy: ArcSwap::from_pointee(Proxy::new(config, metrics.clone())),
            slots: Arc::new(Slots::new(metrics.connections_open.clone())),
            metrics,
            config_path,
            config: ArcSwap::from_pointee(config.clone()),
            connections: ArcSwap::new(ConnectionSettings::new(&config.server)),
            tls: ArcSwap::from_pointee(Vec::new()),
            listeners: Registry::default(),
            reloading: Mutex::new(()),
            admin_token: ArcSwapOption::empty(),
            draining: AtomicBool::new(false),
            started: tokio::sync::watch::Sender::new(false),
            admin_listen: config.admin.listen,
        })
    }

    /// Ends once [`run_all`] has started the listeners: a SIGHUP waiting
    /// from before would reload a file whose listeners nothing applied,
    /// and the start would then key the sockets bound for the old one by
    /// the new one's addresses (review52 L2).
    pub async fn serving(&self) {
        let _ = self.started.subscribe().wait_for(|started| *started).await;
    }

    /// A shutdown is under way: listeners closed, in-flight requests
    /// finishing.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The token admin mutations must present, if they are enabled.
    pub fn admin_token(&self) -> Option<Arc<String>> {
        self.admin_token.load_full()
    }

    /// Loads the certificates of every TLS listener; on error nothing
    /// changes and the message names the file.
    pub fn load_tls(&self, config: &Config) -> Result<(), tls::TlsError> {
        let loaded = tls::acceptors(&config.server.tls)?;
        self.tls.store(Arc::new(loaded.acceptors));
        self.metrics.set_certificate_ends(&loaded.ends);
        Ok(())
    }

    /// [`Shared::reload_blocking`] for `by` (`SIGHUP`, or the admin
    /// client's address), run on tokio's blocking pool. Reading the files,
    /// loading certificates, validating and building the new generation
    /// take a while on a large file; on an async worker that stalled every
    /// connection the worker serves, and with `--threads 1` all of them
    /// (review F3). Threads of the blocking pool keep the runtime's
    /// context, so the health checks and accept loops a reload spawns, and
    /// the listeners it binds, belong to the runtime as before.
    ///
    /// A reload applied returns the warnings it logged (as logged, one a
    /// line; empty if none), for an admin call to show beside the log.
    pub async fn reload_for(self: &Arc<Self>, by: &str) -> Result<String, String> {
        let shared = self.clone();
        let by = by.to_owned();
        let reload = move || crate::logging::capturing_warnings(|| shared.reload_blocking(&by));
        match tokio::task::spawn_blocking(reload).await {
            Ok((outcome, warnings)) => outcome.map(|()| warnings),
            // A bug in the reload: let it surface where it would have
            // when the reload ran on the caller's task.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err("reload cancelled: the runtime is shutting down".into()),
        }
    }

    /// [`Shared::reload_blocking`] for a caller that owns its thread (an
    /// embedding program, a test), logged as asked by `caller`.
    pub fn reload(self: &Arc<Self>) -> Result<(), String> {
        self.reload_blocking("caller")
    }

    /// Re-reads the config file and swaps the new state in. A bad file, an
    /// unreadable certificate or an address that cannot be bound changes
    /// nothing and returns the errors (for the file, the same ones
    /// `portico check` prints). Otherwise, atomically for new requests:
    /// routes and upstreams are replaced (upstreams whose settings did not
    /// change keep their health state and connection pools, the cache and
    /// the limiter survive when their sections did not change), listeners
    /// are added and removed without touching the others, certificates and
    /// connection settings apply to new connections, and the metric series
    /// of what the file no longer has are dropped. In-flight requests
    /// finish on the generation they started with.
    ///
    /// The outcome is logged with `by`, who asked for it: a rejection as
    /// one record on one line, the file's errors separated by `; `, since
    /// the log is where an operator looks for what a deploy tool did, and
    /// a line per record is what log shippers and `grep` expect. It is
    /// recorded in `portico_config_last_reload_*` too.
    ///
    /// Blocks on file reads; needs a tokio runtime's context (a worker, or
    /// a thread of its blocking pool) for the tasks it spawns.
    pub fn reload_blocking(self: &Arc<Self>, by: &str) -> Result<(), String> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Nothing new is served once the drain began: a SIGHUP then said
        // "configuration reloaded" of a file no request would see
        // (review34d), as nginx ignores a reload once it is exiting.
        if self.draining() {
            tracing::warn!(by, "{RELOAD_IGNORED}");
            return Err(RELOAD_IGNORED.into());
        }
        let outcome = self.apply_file();
        self.metrics.config_loaded(outcome.is_ok());
        match &outcome {
            Ok(path) => tracing::info!(by, file = %path.display(), "configuration reloaded"),
            Err(errors) => tracing::error!(
                by,
                errors = %errors.replace('\n', "; "),
                "reload rejected, configuration unchanged"
            ),
        }
        outcome.map(drop)
    }

    /// The work of [`Shared::reload_blocking`], under its lock: the file
    /// applied, or why it was not.
    fn apply_file(self: &Arc<Self>) -> Result<&std::path::Path, String> {
        let Some(path) = &self.config_path else {
            return Err("started without --config: nothing to reload".into());
        };
        // A pipe read again was empty, and the reload was refused for
        // having no [[upstream]] (review43b M1).
        if let Some(why) = config::not_read_again(path) {
            return Err(why);
        }
        let (config, text) = config::load_keeping_text(path).map_err(|e| e.to_string())?;
        let written = config::Written::new(&text, path);
        // The file's `[admin] listen` was checked against its backends; the
        // admin API that runs is the one the process started with, until
        // a restart (review36d L2: it became a backend, served to all).
        let live_admin = config.upstreams.iter().find_map(|u| {
            u.backends
                .iter()
                // As the file's own listeners are checked: `[::ffff:
                // 127.0.0.1]` spells 127.0.0.1 (review36f L1).
                .find(|b| config::reaches_own(b.addr, self.admin_listen))
                .map(|b| (u.name.as_str(), b.addr))
        });
        if let Some((upstream, addr)) = live_admin {
            return Err(format!(
                "{}: upstream `{upstream}`: backend {addr} is the admin API portico listens on (until a restart): it would be served to clients",
                path.display()
            ));
        }
        // Rotating the token is rewriting its file and reloading; the load
        // read it, and a file that cannot be read rejected the reload.
        let token = config.admin.token.as_ref().map(|t| t.0.clone());
        let tls = tls::acceptors(&config.server.tls).map_err(|e| e.to_string())?;
        let wanted = listeners::wanted(&config, &tls.acceptors);
        let added = self
            .listeners
            .bind_added(&wanted, self.admin_listen)
            .map_err(|e| e.to_string())?;

        // Adding the first [[server.tls]] to a file without
        // `server.listen` makes it HTTPS only: the plain default goes, which
        // an info line about a removed listener hid (review34f L5).
        let served_plain = &self.config.load().server.listen;
        if !served_plain.is_empty() && config.server.listen.is_empty() {
            tracing::warn!(
                at = written.at("server.tls"),
                removed = ?served_plain,
                "the configuration now serves no plain HTTP (with [[server.tls]], a [server] without listen serves HTTPS only); set server.listen to keep plain listeners"
            );
        }
        // As at start (review36d L6).
        config::warn_of_risks(&config, &written);
        let previous = self.proxy.load();
        let next = Proxy::rebuild(&config, self.metrics.clone(), &previous);
        // A cache the new generation does not keep: the fetches still
        // filling it say so in their access lines (review39d L1).
        if let Some(old) = previous.cache() {
            if !next.cache().is_some_and(|new| Arc::ptr_eq(old, new)) {
                old.retire();
            }
        }
        self.proxy.store(Arc::new(next));
        self.connections
            .store(ConnectionSettings::new(&config.server));
        // Listeners waiting at the old cap look at the new one.
        self.slots.freed.notify_waiters();
        self.listeners.apply(self, wanted, added);
        if self.admin_token.load().as_deref() != token.as_ref() {
            // Rotated as the README says (rewrite the file, reload): checked
            // as at start, where only the start was (review35b F3).
            crate::admin::warn_if_short(token.as_deref(), written.at("admin.token_file"));
            tracing::info!(
                mutations = if token.is_some() {
                    "enabled"
                } else {
                    "disabled (no token_file)"
                },
                "admin token changed"
            );
        }
        self.admin_token.store(token.map(Arc::new));
        if config.admin.listen != self.admin_listen {
            tracing::warn!(
                at = written.at("admin.listen"),
                in_file = %config.admin.listen,
                started_with = %self.admin_listen,
                "[admin] listen differs from what the process started with; it takes effect after a restart"
            );
        }
        self.metrics.retain(&Configured::of(&config));
        self.metrics.set_certificate_ends(&tls.ends);
        self.config.store(Arc::new(config));
        Ok(path)
    }
}

/// Why a reload asked for once the drain has begun is not done (see
/// [`Shared::reload_blocking`]).
pub const RELOAD_IGNORED: &str = "reload ignored: shutting down";

/// Concurrent streams per HTTP/2 connection (nginx's
/// `http2_max_concurrent_streams`).
const H2_MAX_STREAMS: u32 = 128;

/// Requests an HTTP/2 connection serves before it is sent a GOAWAY and the
/// client opens another, as nginx's `keepalive_requests` (1000) ends one.
/// Each stream a client cancels once it has reached a backend costs that
/// backend a connection: opening and resetting streams without end made
/// 7,680 backend connections in 4 s on one client connection, past the
/// h2 library's guard against resets (it counts streams reset before they
/// are accepted) (review32b F4).
const H2_MAX_REQUESTS: u64 = 1000;

/// Requests past which a retired HTTP/2 connection is dropped: hyper's
/// GOAWAY first announces the largest stream id, and the real last one
/// only once the client acknowledges a PING, so a client ignoring both
/// could go on opening streams. As many again are let through: a client
/// sending short requests one after another can open well over a round
/// of concurrent streams in the round trip before it sees the GOAWAY
/// (review32e M1).
const H2_PAST_GOAWAY: u64 = 2 * H2_MAX_REQUESTS;

/// Request body bytes an HTTP/2 client may send on a stream ahead of
/// portico's reading them: 256 KiB, 12.5 MB/s for one upload over a 20 ms
/// round trip.
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// The same for a whole connection: 32 streams' windows, so up to 31
/// uploads to backends not reading yet leave the others moving, and one
/// connection makes portico hold at most 8 MiB of them (hyper's default
/// was 1 MiB, which one such upload filled; 128 streams' worth would be
/// 32 MiB).
const H2_CONNECTION_WINDOW: u32 = 32 * H2_STREAM_WINDOW;
// h2 panics at the handshake on a window past 2^31 - 1.
const _: () = assert!(H2_CONNECTION_WINDOW < 1 << 31);

/// Response bytes hyper buffers per HTTP/2 stream ahead of the client's
/// window: four of the 16 KiB slices a body is handed over in.
const H2_SEND_BUFFER: usize = 64 * 1024;

fn connection_builders(settings: &config::Server) -> protocol::Builders {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // `request_header_timeout` is enforced by the connection's watchdog
        // (see `idle`): hyper's own arms a fresh boxed timer per request.
        .header_read_timeout(None)
        .max_buf_size((settings.max_header_size as usize).max(MIN_BUF_SIZE))
        // The read buffer's cap alone is checked only while a head is
        // incomplete: a later request on a connection whose buffer held
        // more passed whole at twice the limit (netfuzz49). This one is
        // checked on every head, and on chunked trailers.
        .max_header_size(settings.max_header_size as usize)
        .keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_size).unwrap_or(u32::MAX))
        // What one connection can make portico hold for a client that
        // opens streams and never reads: streams times per-stream send
        // buffer, 8 MiB here (hyper's defaults, 200 x 400 KB, let one
        // connection pin 110 MB). nginx allows 128 streams too.
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER)
        // Each stream's upload window fits in the connection's however
        // many are open: with hyper's defaults (1 MiB for a stream and 1
        // MiB for the connection) one upload to a backend that did not
        // read yet held the whole connection's window, and every other
        // upload on it stood still until `body_timeout` cut it (review31c
        // F1). nginx gives a stream 64 KiB and the connection 2^31-1.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW);
    // No keep-alive PINGs: they would keep an idle connection busy forever;
    // dead peers are dropped by the idle timeout instead (see `idle`).
    protocol::Builders { http1, http2 }
}

/// Serves `listeners` until `signal` resolves, then stops accepting, lets
/// in-flight requests finish within `shutdown_grace` and returns.
pub async fn run(
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    signal: impl Future<Output = ()>,
) {
    run_with_admin(shared, listeners, None, signal).await
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
    run_all(shared, all, signal).await
}

/// Serves every listener until `signal` resolves, then stops accepting,
/// lets in-flight requests finish within `shutdown_grace` and returns.
/// Listeners are matched to the config's addresses in order (so a reload
/// knows which to keep); TLS ones carry the index of their
/// `[[server.tls]]` entry, whose certificates [`Shared::load_tls`] loaded.
/// The config is the one `shared` was made with.
pub async fn run_all(shared: Arc<Shared>, all: Listeners, signal: impl Future<Output = ()>) {
    let config = shared.config.load_full();
    let (trigger, shutdown) = shutdown::channel();
    // Both end with this function, however it ends (a caller may drop it).
    let _trimmer = AbortOnDrop::new(tokio::spawn(crate::memory::watch(shared.metrics.clone())));
    let mut initial = Vec::new();
    for (n, listener) in all.plain.into_iter().enumerate() {
        let configured = config.server.listen.get(n).copied();
        initial.push(keyed(listener, configured, Mode::Plain));
    }
    let acceptors = shared.tls.load_full();
    let mut seen = vec![0; config.server.tls.len()];
    for (listener, index) in all.tls {
        let Some(acceptor) = acceptors.get(index) else {
            tracing::error!(
                index,
                "no certificates loaded for this TLS listener; not serving it"
            );
            continue;
        };
        let configured = config.server.tls.get(index).and_then(|entry| {
            let n = seen[index];
            seen[index] += 1;
            entry.listen.get(n).copied()
        });
        initial.push(keyed(listener, configured, Mode::Tls(acceptor.clone())));
    }
    let mut drain = Drain::new();
    let (cut_all, cut) = shutdown::channel();
    let serving = Serving {
        shutdown: shutdown.clone(),
        drain: drain.guard(),
        cut,
    };
    // Which instance a request went through, as backends see it.
    // The build too, to tell replicas apart in a rollout (review42d F5).
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        via = shared.proxy.load().via_name(),
        "portico starting; requests to backends carry this name in Via"
    );
    shared.listeners.start(&shared, serving, initial);
    // The admin listener serves through the drain, so /metrics and
    // /readyz (which says so) can watch it, and closes after; it starts
    // once the listeners are there for its reloads to change.
    let admin = all.admin.map(|(listener, token)| {
        shared.admin_token.store(token.map(Arc::new));
        AbortOnDrop::new(tokio::spawn(crate::admin::serve(listener, shared.clone())))
    });
    shared.started.send_replace(true);

    let _hurry = crate::signal::watch_hurry();
    signal.await;
    // A reload may have changed the grace period.
    let grace = shared.config.load().server.shutdown_grace;
    tracing::info!(
        ?grace,
        "shutting down: no new connections, draining in-flight requests"
    );
    shared.draining.store(true, Ordering::Relaxed);
    shared.listeners.close();
    trigger.fire();
    let deadline = tokio::time::Instant::now() + grace;
    let writes = shared.proxy.load().writes_under_way();
    // What is still going when the grace runs out, if anything.
    let drained = tokio::select! {
        left = async {
            if !drain.wait(grace).await {
                return Some("connections still open; closing them");
            }
            // Writes still waiting on their backends' answers, their
            // clients gone (or on HTTP/2 streams, whose tasks no
            // connection holds): cut as the process exits, a backend
            // that stops work when its client goes (Go's request
            // context) may drop them half done.
            if tokio::time::timeout_at(deadline, writes.settled()).await.is_err() {
                return Some("writes still waiting on their backends' answers; cutting them");
            }
            None
        } => Some(left),
        () = crate::signal::hurried() => None,
    };
    // Closed now, not only as the process exits: a process that goes on
    // (the demo, draining its backends) kept relaying them (review31d F3).
    let cut_them = || {
        shared.proxy.load().cut_off();
        cut_all.fire();
    };
    match drained {
        Some(None) => tracing::info!("all connections drained"),
        Some(Some(left)) => {
            tracing::warn!("shutdown_grace elapsed with {left}");
            cut_them();
        }
        None => {
            // A second stop signal: the requests it cuts are logged
            // (`end="shutdown"`) before the exit, where the process used
            // to exit with no line for them.
            cut_them();
            drain.wait(CUT_LOGGED).await;
            std::process::exit(1);
        }
    }
    drop(admin);
}

/// A listener with the configured address it stands for (its own address
/// when it stands for none).
fn keyed(
    listener: TcpListener,
    configured: Option<SocketAddr>,
    mode: Mode,
) -> (SocketAddr, TcpListener, Mode) {
    let configured = configured
        .or_else(|| listener.local_addr().ok())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    (configured, listener, mode)
}

async fn accept_loop(
    listener: TcpListener,
    mode: Arc<ArcSwap<Mode>>,
    shared: Arc<Shared>,
    serving: listeners::Serving,
    mut removed: Shutdown,
) {
    let listeners::Serving {
        mut shutdown,
        drain,
        cut,
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
                // The listener's own signal, which also fires at shutdown:
                // a reload that removes the listener drains its
                // connections as a shutdown would (`Connection: close`,
                // GOAWAY), where they went on being served for as long as
                // their clients kept them busy.
                let shutdown = removed.clone();
                let drain = drain.clone();
                // Read per connection: a reload's certificates and
                // settings apply to the connections that follow it.
                let mode = mode.load_full();
                let settings = shared.connections.load_full();
                let cut = cut.clone();
                tokio::spawn(async move {
                    let held = Held {
                        shared,
                        settings,
                        shutdown,
                        cut,
                        _drain: drain,
                        open: Some(open),
                    };
                    match &*mode {
                        Mode::Plain => {
                            let conn = Conn::new(peer, "http");
                            serve_connection(stream, conn, held, None).await
                        }
                        Mode::Tls(acceptor) => {
                            // The head's time, the handshake's included.
                            let accepted = tokio::time::Instant::now();
                            let deadline = accepted + held.settings.header_timeout;
                            match tokio::time::timeout_at(deadline, first_byte(&stream)).await {
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
                                    let conn = Conn::new(peer, "https");
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

/// How long an HTTP/1 keep-alive connection waits for its next request
/// before it is parked: at least this, and at most one step of its
/// watchdog more (a quarter of the shorter of `idle_timeout` and
/// `request_header_timeout`).
const PARK_AFTER: Duration = Duration::from_secs(1);

/// What a client connection keeps through its life, parked or served.
struct Held {
    shared: Arc<Shared>,
    settings: Arc<ConnectionSettings>,
    shutdown: Shutdown,
    /// Fires when `shutdown_grace` runs out: a connection still draining
    /// is dropped then, with its socket.
    cut: Shutdown,
    _drain: DrainGuard,
    /// Its place among `max_connections`; given up early by an idle
    /// HTTP/2 connection closing for a client at the cap.
    open: Option<OpenConnection>,
}

/// A client socket that can wait for its next request without hyper.
trait Parkable: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
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

/// What a client's first byte on a TLS listener says (see [`first_byte`]).
enum FirstByte {
    /// Plain HTTP.
    Plain,
    /// Anything else: a handshake, or what the handshake will refuse.
    Other,
    /// None came: the connection closed (or broke) first.
    None,
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

/// A connection coming back from parking.
struct Again {
    /// What hyper had read of the next request.
    unread: Bytes,
    /// How long the connection has been idle.
    quiet: Duration,
}

/// Serves a client connection until it ends or is parked; `again` for one
/// coming back from parking (it speaks HTTP/1.1).
async fn serve_connection<IO: Parkable>(
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
            let grace = move || shared.config.load().server.shutdown_grace;
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
    let ended = match ended {
        End::Drain if !activity.is_multiplexed() => {
            activity.close_after_answers();
            let mut cut = held.cut.clone();
            tokio::select! {
                result = &mut connection => End::Done(result),
                // `shutdown_grace` ran out: dropped, with its socket.
                _ = cut.recv() => End::Done(Ok(())),
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
                _ = cut.recv() => Ok(()),
                // Retired, and the client went on opening streams.
                () = activity.retired() => {
                    tracing::debug!(client = %conn.peer, "HTTP/2 client ignored the GOAWAY; closed");
                    Ok(())
                }
            }
        }
    };
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
fn bad_request(why: &str) -> (String, u64) {
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
async fn park<IO: Parkable>(mut socket: IO, conn: Conn, mut held: Held, quiet: Duration) {
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
const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// After a second stop signal has cut the connections still open, how
/// long their tasks have to log their requests before the exit (the
/// signal's own backstop is longer).
const CUT_LOGGED: Duration = Duration::from_secs(1);

/// The client connections open (tunnels included), counted against
/// `max_connections` and in `portico_connections_open`.
struct Slots {
    /// Told when one closes, or a reload may have moved the cap.
    freed: tokio::sync::Notify,
    /// Told, once for each place wanted, to close an idle (parked)
    /// keep-alive connection, the longest waiting first.
    reclaim: tokio::sync::Notify,
    /// Connections parked (see [`park`]).
    parked: std::sync::atomic::AtomicUsize,
    /// `portico_connections_open`: the count itself, moved only here.
    gauge: prometheus::IntGauge,
}

impl Slots {
    fn new(gauge: prometheus::IntGauge) -> Self {
        Slots {
            freed: tokio::sync::Notify::new(),
            reclaim: tokio::sync::Notify::new(),
            parked: std::sync::atomic::AtomicUsize::new(0),
            gauge,
        }
    }

    /// For a connection accepted once there was [`Slots::room`]: at the
    /// cap, closes idle keep-alive connections, the one parked longest
    /// first, until there is a place for it, as nginx frees a reusable
    /// connection before it hands one out (idle ones held every place until
    /// `idle_timeout`, review33c L1). Closing first and taking the place
    /// after keeps the cap: taken first, a burst was let in on one idle
    /// connection's account many times over (49 open at a cap of 4,
    /// review33e F1). A cap lowered by a reload is reached so too.
    async fn make_room(&self, cap: impl Fn() -> Option<usize>) {
        // One idle connection asked to close at a time, another only if
        // that one has not made room within a second: an HTTP/2 one takes
        // a round trip (and a client reading a response's end, longer),
        // and each connection parking meanwhile woke this loop to ask
        // again, so one client closed several (review34f M3).
        let mut asked: Option<tokio::time::Instant> = None;
        loop {
            let Some(max) = cap() else { return };
            let mut freed = std::pin::pin!(self.freed.notified());
            freed.as_mut().enable();
            if self.open() < max {
                return;
            }
            // None idle any more (it took a request meanwhile): wait, as
            // `room` does, for a close.
            let now = tokio::time::Instant::now();
            if self.parked.load(Ordering::Relaxed) > 0 && asked.is_none_or(|at| now >= at) {
                self.reclaim.notify_one();
                asked = Some(now + Duration::from_secs(1));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }

    /// The client connections open: what `portico_connections_open` shows.
    fn open(&self) -> usize {
        usize::try_from(self.gauge.get()).unwrap_or(0)
    }

    /// What an idle connection woken by [`Slots::reclaim`] does: nothing
    /// for a wake left from a moment at the cap that has passed; if it was
    /// `used` meanwhile (a request came), pass the wake on to another idle
    /// connection; else close.
    fn reclaimed(&self, cap: Option<usize>, used: impl FnOnce() -> bool) -> Reclaim {
        if cap.is_none_or(|max| self.open() < max) {
            Reclaim::Stale
        } else if used() {
            self.reclaim.notify_one();
            Reclaim::PassedOn
        } else {
            Reclaim::Close
        }
    }

    /// A connection between requests, parked, that could make room.
    fn parked(self: &Arc<Self>) -> ParkedPlace {
        self.parked.fetch_add(1, Ordering::Relaxed);
        // A listener waiting at the cap may now take a client.
        self.freed.notify_waiters();
        ParkedPlace(self.clone())
    }

    /// A place, whatever the cap: for a connection accepted once there was
    /// room, or a tunnel, which takes over its connection's.
    fn take(self: &Arc<Self>) -> OpenConnection {
        self.gauge.inc();
        OpenConnection(self.clone())
    }

    /// Resolves once fewer than `cap()` are open (no cap: at once), or an
    /// idle (parked) keep-alive connection could make room. The place is
    /// taken at the accept that follows ([`Slots::make_room`]), so with
    /// several listeners the cap may be passed by one for each listener
    /// beyond the first; a place held for a listener with no one knocking
    /// would have kept out the clients of the others.
    async fn room(&self, cap: impl Fn() -> Option<usize>, queued: impl Fn() -> Option<u32>) {
        loop {
            let Some(max) = cap() else { return };
            // Listening before looking, so a close (or a park) in between
            // is not missed.
            let mut freed = std::pin::pin!(self.freed.notified());
            freed.as_mut().enable();
            if self.open() < max || self.parked.load(Ordering::Relaxed) > 0 {
                return;
            }
            // Said once clients wait, every 10 s while they do, with how
            // many wait in this listener's queue (nginx says so each time
            // it runs short); looked at each second.
            let waiting = queued();
            static FULL: crate::logging::Every = crate::logging::Every::new();
            if waiting != Some(0) && FULL.due(10).is_some() {
                tracing::warn!(
                    max_connections = max,
                    queued = waiting,
                    "server.max_connections client connections open; new ones wait in the listen queue"
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }
}

/// The open-file limit `max_connections` leaves no room in, if it does:
/// none for the backend connection each client connection may need (and
/// the pools, the listeners, the log), so the cap cannot keep clients from
/// the descriptors the backends need (review33d F6). `before_start` reads
/// the hard limit, which a start raises the soft one to (`portico check`,
/// review33e F7).
#[cfg(unix)]
pub fn open_file_limit_short(max_connections: u32, before_start: bool) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let have = if before_start {
        limit.rlim_max
    } else {
        limit.rlim_cur
    };
    let needs = 2 * u64::from(max_connections) + 64;
    (have != libc::RLIM_INFINITY && needs > have).then_some(have)
}

#[cfg(not(unix))]
pub fn open_file_limit_short(_: u32, _: bool) -> Option<u64> {
    None
}

/// What is said of [`open_file_limit_short`], at start, at a reload and
/// by `portico check`.
pub const OPEN_FILE_LIMIT_SHORT: &str = "server.max_connections leaves no room for backend connections in the open-file limit (each client connection may need one): raise the limit (ulimit -n, LimitNOFILE) to twice the cap and 64 more";

/// Warns, as nginx and HAProxy do, of a `max_connections` the open-file
/// limit cannot hold (see [`open_file_limit_short`]).
/// `at` is where the file sets it.
pub fn warn_past_open_file_limit(max_connections: u32, at: Option<String>) {
    if let Some(open_file_limit) = open_file_limit_short(max_connections, false) {
        tracing::warn!(
            at,
            max_connections,
            open_file_limit,
            "{OPEN_FILE_LIMIT_SHORT}"
        );
    }
}

/// The connections waiting in `listener`'s accept queue (Linux reports it
/// in a listening socket's `TCP_INFO`, as `ss -ltn` shows it in Recv-Q).
#[cfg(target_os = "linux")]
fn listen_queue(listener: &TcpListener) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is as large as `len` says, and the call writes no more.
    let got = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // SAFETY: zeroed, then written by the kernel.
    (got == 0).then(|| unsafe { info.assume_init() }.tcpi_unacked)
}

#[cfg(not(target_os = "linux"))]
fn listen_queue(_: &TcpListener) -> Option<u32> {
    None
}

/// See [`Slots::reclaimed`].
enum Reclaim {
    Stale,
    PassedOn,
    Close,
}

/// A parked connection counted in [`Slots`] while it is parked.
struct ParkedPlace(Arc<Slots>);

impl Drop for ParkedPlace {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection's place in [`Slots`] for as long as it lives,
/// however its task ends.
struct OpenConnection(Arc<Slots>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.gauge.dec();
        self.0.freed.notify_waiters();
    }
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
