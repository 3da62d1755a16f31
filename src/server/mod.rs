//! Listeners and connection lifecycle: accept, serve HTTP/1.1 and HTTP/2 on
//! each connection (by ALPN, or by the client's first bytes; see
//! `protocol`), apply the connection-level limits from
//! `[server]`, and stop gracefully. The request path itself is
//! [`crate::proxy::Proxy`], read per request from an [`ArcSwap`] so a reload
//! can replace it without touching connections.
//!
//! This module holds what the listeners share ([`Shared`]: settings,
//! reloads, the cut at shutdown) and starts them; `accept` runs each
//! listener's loop, `connection` one client connection's life, `slots`
//! the `max_connections` count.

mod accept;
mod connection;
mod idle;
mod listeners;
mod protocol;
pub mod shutdown;
mod slots;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::task::AbortOnDrop;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::metrics::{Configured, Metrics};
use crate::proxy::Proxy;
use listeners::{Mode, Registry, Serving};
use shutdown::Drain;

use accept::accept_loop;
pub(crate) use accept::AcceptFailures;
use connection::{CUT_LOGGED, DRAIN_QUIET, PARK_AFTER};
use slots::Slots;
pub use slots::{open_file_limit_short, warn_past_open_file_limit, OPEN_FILE_LIMIT_SHORT};

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
    /// Set as `shutdown_grace` runs out at shutdown, before the
    /// connections are cut (see [`crate::proxy::CutOff`]).
    cut_off: Arc<AtomicBool>,
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
    /// How long a listener a reload removes goes on serving: stored
    /// before the reload stops it, where the whole file is stored after
    /// (see `listeners::cut_after_removal`).
    shutdown_grace: Duration,
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
            shutdown_grace: settings.shutdown_grace,
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
            cut_off: Arc::default(),
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
        let configured = Configured::of(&config);
        self.metrics.admit(&configured);
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
        self.metrics.retain(&configured);
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
    // Each listener's cut marks what it cuts (see `listeners::spawn`).
    let cut_them = || {
        shared.cut_off.store(true, Ordering::Relaxed);
        cut_all.fire();
    };
    match drained {
        Some(None) => tracing::info!("all connections drained"),
        Some(Some(left)) => {
            tracing::warn!("shutdown_grace elapsed with {left}");
            cut_them();
            // A moment for the connections cut to end as they should (an
            // HTTP/1.0 body framed by the close with a reset) and log
            // what they cut: the exit after this drops their tasks
            // (review54 L1).
            drain.wait(CUT_LOGGED).await;
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
