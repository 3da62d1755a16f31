//! The request path: validate the head, pick a route, clean the headers,
//! forward to a backend of the route's upstream and relay the answer.
//! Failures become short plain-text responses in one place
//! ([`error::ProxyError`]). Sending to a backend and retrying is
//! `retry`'s; the line a reload's changes get, `changes`'.

pub mod body;
mod cached;
mod changes;
pub mod compress;
pub mod error;
pub(crate) mod forwarded;
pub mod headers;
mod log;
mod retry;
pub mod route;
mod upgrade;

pub use log::Refused;
pub use log::Tail as AccessTail;
pub use upgrade::{Hold as TunnelHold, PendingUpgrade};

/// Put in a request's extensions, marked when the request is handed to a
/// backend connection to be written (see `cached::forward_write`), with
/// the backend of the attempt under way, for the access line of a request
/// its client left.
#[derive(Debug, Clone, Default)]
pub struct Sent(Arc<SentState>);

#[derive(Debug, Default)]
struct SentState {
    marked: std::sync::atomic::AtomicBool,
    backend: std::sync::Mutex<Option<SocketAddr>>,
}

impl Sent {
    pub fn mark(&self) {
        self.0
            .marked
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_marked(&self) -> bool {
        self.0.marked.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn to(&self, backend: SocketAddr) {
        *self.0.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    pub fn backend(&self) -> Option<SocketAddr> {
        *self.0.backend.lock().unwrap_or_else(|e| e.into_inner())
    }
}

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Version};
use hyper::body::Incoming;

use crate::cache::Cache;
use crate::config::Config;
use crate::limit::{Decision, Limiter};
use crate::metrics::{Metrics, RouteMetrics};
use crate::upstream::{Keyed, Upstream};
use body::{ProxyBody, RequestBody};
use error::ProxyError;
use headers::{ClientInfo, Hop};
use route::Router;

use changes::say_changes;
use retry::forward_with_retries;

/// What the server knows about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The TCP peer; an IPv4 client of a dual-stack listener as IPv4.
    pub peer: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The peer's address as `X-Forwarded-For` writes it.
    pub forwarded_for: HeaderValue,
    /// Whether what it still serves was cut: the access lines of what
    /// was cut say `end="shutdown"`.
    cut_off: Arc<CutOff>,
}

/// Whether `shutdown_grace` ran out on what a listener's connections still
/// serve: at shutdown (the process's flag, shared by every listener and
/// set before any connection is cut, as the runtime may be dropped right
/// after: set by each listener's task, the exit came first and the lines
/// said `client_gone`, review54 M1), or after a reload removed the
/// listener (its own, review53 M2).
#[derive(Debug, Default)]
pub struct CutOff {
    process: Arc<std::sync::atomic::AtomicBool>,
    listener: std::sync::atomic::AtomicBool,
}

impl CutOff {
    /// A listener's, beside the process's `process` flag.
    pub fn new(process: Arc<std::sync::atomic::AtomicBool>) -> Self {
        CutOff {
            process,
            listener: Default::default(),
        }
    }

    /// The listener's cut fired.
    pub fn listener_cut(&self) {
        self.listener
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cut(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.process.load(Relaxed) || self.listener.load(Relaxed)
    }
}

impl Conn {
    pub fn new(peer: SocketAddr, proto: &'static str, cut_off: Arc<CutOff>) -> Self {
        // IPv4 clients of a dual-stack listener as IPv4, as backends and
        // every log line would see them on an IPv4 one: the access line
        // said `127.0.0.1` where the server's lines about the same
        // connection said `[::ffff:127.0.0.1]:port` (review40d L5).
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        Conn {
            peer,
            proto,
            forwarded_for: headers::forwarded_for(peer.ip()),
            cut_off,
        }
    }
}

/// One immutable generation of the proxy's request-path state, built from a
/// validated config. A reload builds a new one and swaps it in whole.
#[derive(Debug)]
pub struct Proxy {
    router: Router,
    upstreams: Vec<Arc<Upstream>>,
    max_request_body: u64,
    /// `[server] idle_timeout`: how long an upgraded tunnel may sit silent.
    tunnel_idle: std::time::Duration,
    metrics: Arc<Metrics>,
    /// Per route, in config order.
    route_metrics: Vec<RouteMetrics>,
    /// Requests refused before a route was chosen.
    unrouted: RouteMetrics,
    limiter: Option<Arc<Limiter>>,
    /// `server.trusted_proxies` (or `[rate_limit]`'s): peers whose
    /// forwarding fields are believed.
    trusted_proxies: Box<[crate::config::Cidr]>,
    /// `server.trusted_fields`: which of their fields are read.
    trusted_fields: crate::config::TrustedFields,
    cache: Option<Arc<Cache>>,
    /// `[compression]`: gzip for the routes that have it.
    compressor: Option<compress::Compressor>,
    /// This proxy's name in `Via`: made at start, kept across reloads.
    pseudonym: headers::Pseudonym,
    /// Writes under way on a caching route (see `cached::forward_write`),
    /// in every generation, whichever task carries them (an HTTP/2
    /// stream's, or their own once their client left): a shutdown waits
    /// for them within its grace.
    writes: Arc<crate::task::Places>,
    /// The newest generation's cache, shared by every generation: a write
    /// a reload left running invalidates there too (see `cached::Owed`).
    newest_cache: Arc<arc_swap::ArcSwapOption<Cache>>,
}

/// What the request path learnt about one request, for metrics and the
/// access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Trace {
    pub route: Option<usize>,
    pub backend: Option<SocketAddr>,
    /// Why a caching route went to the backend (`Cache-Status` `fwd`), for
    /// the error answer when the backend fails.
    pub fwd: Option<&'static str>,
    /// The client's budget on a throttling route (limit, remaining,
    /// reset), for the error answer too.
    pub quota: Option<(u32, u32, std::time::Duration)>,
    /// Attempts that failed and were sent again.
    pub retries: u32,
    /// When the last retry went out: the request whose answer a cache
    /// stores, and whose sending its age counts from.
    pub retried_at: Option<std::time::Instant>,
    /// A retry was due and the upstream's retry budget refused it.
    pub budget_refused: bool,
    /// An attempt ended with no answer after it may have reached its
    /// backend ([`ProxyError::may_have_acted`]): a write owes its
    /// invalidation even if a later attempt could not connect (review38d
    /// F1).
    pub acted: bool,
    /// Whom the request comes from ([`Proxy::client_ip`]), once worked
    /// out: the access line's capture does it, and throttling takes its
    /// answer rather than walk the forwarding fields again.
    pub client: Option<std::net::IpAddr>,
    /// How long it waited in line for room under `max_conns`, if it did.
    pub queued: Option<std::time::Duration>,
    /// The request has its `X-Request-Id`, given when it was taken up for
    /// its access line; else it gets one only on its way to a backend (a
    /// hit with the access log off needs none).
    pub identified: bool,
}

/// How soon after it was sent a request's pooled connection must end, with
/// nothing of the answer, to be taken for the keep-alive race (the backend
/// closed it as the request arrived): that end comes within a round trip.
const STALE_RACE_SECONDS: f64 = 1.0;

/// How long an idempotent request whose framing left its length open (an
/// HTTP/2 GET whose HEADERS did not end its stream, an HTTP/1 `chunked`
/// PUT) waits for the frame that says whether it has content (see
/// [`RequestBody::settle_within`]). Past Linux's 40 ms delayed ACK: a
/// client with Nagle on writes that frame only once its HEADERS are
/// acknowledged. The wait ends as soon as a frame comes, so it costs only
/// a GET whose content comes later than that, which no client sends.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// nginx's 499: the client closed its connection, or reset its HTTP/2
/// stream, before its answer was ready.
pub const CLIENT_CLOSED: u16 = 499;

/// A request being served. hyper drops the request's future when its
/// client leaves before the answer (a closed connection, a reset stream),
/// so nothing after the await would count or log it: this does, on drop,
/// as status 499, so abandoned requests show in `portico_requests_total`
/// and the access log as they do in nginx's.
struct Pending<'a> {
    proxy: &'a Proxy,
    started: std::time::Instant,
    /// Taken once the request is logged; None also when the log is off.
    access: Option<log::AccessRecord>,
    trace: Trace,
    done: bool,
}

impl Pending<'_> {
    /// Counts the request and hands back its access line, which the
    /// response body writes when it is over.
    fn answered(mut self, response: &Response<ProxyBody>) -> Option<Box<log::Tail>> {
        self.done = true;
        self.count(response.status().as_u16());
        let access = self.access.take()?;
        Some(access.answered(response, self.started, self.reached()))
    }

    /// Counts the request, answered or left by its client, under its
    /// route. Only an answer is timed: the histogram is the time to a
    /// response head, and one the client left has none (its length is the
    /// client's patience, review32d F2).
    fn count(&self, status: u16) {
        let proxy = self.proxy;
        let route = self.trace.route.and_then(|i| proxy.route_metrics.get(i));
        let route = route.unwrap_or(&proxy.unrouted);
        if status == CLIENT_CLOSED {
            route.count(status);
        } else {
            route.record(status, self.started.elapsed().as_secs_f64());
        }
    }

    /// Where the request went, for the access line.
    fn reached(&self) -> log::Reached {
        log::Reached {
            route: self
                .trace
                .route
                .and_then(|i| self.proxy.route_metrics.get(i))
                .map(crate::metrics::RouteMetrics::shared_name),
            upstream: self.proxy.upstream_of(self.trace.route).cloned(),
            backend: self.trace.backend,
            retries: self.trace.retries,
            queued: self.trace.queued,
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        tracing::debug!(elapsed = ?self.started.elapsed(), "client left before its answer");
        self.count(CLIENT_CLOSED);
        if let Some(access) = self.access.take() {
            access.left(self.started, self.reached());
        }
    }
}

/// A request hyper has handed over, until its future first runs. hyper
/// can drop that future unpolled: a parked connection woken with a request
/// and the client's FIN together reads both before the future's first
/// poll, and an HTTP/1 server without half-close ends there. The request
/// is then counted and logged as left (499) here, as [`Pending`] does for
/// one left later; before, it left no trace (review30e F1).
pub struct Handed {
    proxy: Arc<Proxy>,
    taken: Option<(Request<Incoming>, Conn)>,
}

impl Handed {
    pub fn new(proxy: Arc<Proxy>, request: Request<Incoming>, conn: Conn) -> Self {
        Handed {
            proxy,
            taken: Some((request, conn)),
        }
    }

    /// The request and its connection, for [`Proxy::handle`] on
    /// [`Handed::proxy`], as the future first runs. (Not an `async fn`
    /// of its own: one more layer would move the request once more.)
    pub fn take(&mut self) -> (Request<Incoming>, Conn) {
        self.taken.take().expect("a handed request is taken once")
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        if let Some((mut request, conn)) = self.taken.take() {
            drop(self.proxy.pending(&mut request, &conn));
        }
    }
}

impl Proxy {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        Self::build(config, metrics, None)
    }

    /// A new generation for `config` that keeps what `previous` holds where
    /// the settings allow: upstreams (health, pools) whose settings are
    /// unchanged, the cache under an unchanged `max_size`, and the clients'
    /// budgets on routes left in place.
    pub fn rebuild(config: &Config, metrics: Arc<Metrics>, previous: &Proxy) -> Self {
        Self::build(config, metrics, Some(previous))
    }

    fn build(config: &Config, metrics: Arc<Metrics>, previous: Option<&Proxy>) -> Self {
        // What `previous` holds, by name: one lookup for each upstream and
        // route, where scanning the old list for each made a reload of
        // 20,000 upstreams and routes take seconds (review F3).
        let old_upstreams: HashMap<&str, &Arc<Upstream>> = previous
            .iter()
            .flat_map(|p| &p.upstreams)
            .map(|u| (u.name(), u))
            .collect();
        let upstream = |u: &crate::config::Upstream| match old_upstreams.get(u.name.as_str()) {
            Some(same) if same.config == *u => Arc::clone(same),
            Some(retuned) => {
                // First, so no verdict of the old checker is lost between
                // the new generation's copy of its state and its end.
                retuned.stop_checks();
                Upstream::rebuild(u.clone(), &metrics, retuned)
            }
            None => Upstream::new(u.clone(), &metrics),
        };
        // A route's handles hold the same series whatever the generation;
        // taking them over spares resolving them again.
        let old_routes: HashMap<&str, &RouteMetrics> = previous
            .iter()
            .flat_map(|p| &p.route_metrics)
            .map(|m| (m.name(), m))
            .collect();
        let route_metrics = |name: &str| {
            old_routes
                .get(name)
                .map_or_else(|| metrics.route(name), |&old| old.clone())
        };
        let cache = config.cache.as_ref().map(|c| {
            let old = previous.and_then(|p| p.cache.as_ref());
            match old.filter(|old| old.keeps(c)) {
                // Tuning `max_object_size` or `default_ttl` keeps what is
                // stored (soak53: any change emptied the cache, and sent
                // every URL to the backends again).
                Some(same) => {
                    if same.retune(c) {
                        tracing::info!(
                            max_object_size = c.max_object_size,
                            default_ttl = ?c.default_ttl,
                            stale_if_error = ?c.stale_if_error,
                            "[cache] retuned: applies to responses stored from now on; those stored keep their lifetimes (a bare DELETE /cache drops them)"
                        );
                    }
                    same.clone()
                }
                None => {
                    // A reload that changes `max_size` starts the cache
                    // empty: say so, as it sends every URL to the backends
                    // again (review32a L2).
                    if let Some(old) = old {
                        tracing::warn!(
                            entries = old.entries_estimate(),
                            "[cache] max_size changed: the cache starts empty, every URL is fetched again"
                        );
                    }
                    Cache::new(c.clone(), metrics.clone())
                }
            }
        });
        if let (Some(cache), false) = (&cache, config.server.trusted_proxies.is_empty()) {
            cache.trust_forwarded_hosts();
        }
        // Nor is one that removes `[cache]` silent about what it drops
        // (review39g L1).
        if let (None, Some(old)) = (&cache, previous.and_then(|p| p.cache.as_ref())) {
            tracing::warn!(
                entries = old.entries_estimate(),
                "[cache] removed: the stored responses are dropped, every URL goes to the backends"
            );
        }
        let newest_cache: Arc<arc_swap::ArcSwapOption<Cache>> =
            previous.map_or_else(Arc::default, |p| p.newest_cache.clone());
        newest_cache.store(cache.clone());
        let upstreams: Vec<Arc<Upstream>> = config.upstreams.iter().map(upstream).collect();
        // An upstream the file no longer has checks nothing more either.
        let kept: std::collections::HashSet<&str> =
            config.upstreams.iter().map(|u| u.name.as_str()).collect();
        for (name, old) in &old_upstreams {
            if !kept.contains(name) {
                old.stop_checks();
            }
        }
        if previous.is_some() {
            say_changes(config, &old_upstreams, &kept);
        }
        Proxy {
            router: Router::new(&config.routes),
            upstreams,
            max_request_body: config.server.max_request_body,
            tunnel_idle: config.server.idle_timeout,
            route_metrics: config
                .routes
                .iter()
                .map(|r| route_metrics(&r.name))
                .collect(),
            unrouted: previous.map_or_else(
                || metrics.route(crate::metrics::NO_ROUTE),
                |p| p.unrouted.clone(),
            ),
            limiter: match previous {
                Some(p) => Limiter::rebuild(config, p.limiter.as_deref()),
                None => Limiter::new(config),
            },
            trusted_proxies: config.server.trusted_proxies.clone().into(),
            trusted_fields: config.server.trusted_fields,
            cache,
            compressor: config
                .compression
                .as_ref()
                .map(|c| compress::Compressor::new(c.clone(), metrics.compression.clone())),
            metrics,
            pseudonym: previous.map_or_else(headers::Pseudonym::random, |p| p.pseudonym.clone()),
            writes: previous.map_or_else(Arc::default, |p| p.writes.clone()),
            newest_cache,
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The upstreams some route sends requests to.
    pub fn routed_upstreams(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        (self.upstreams.iter().enumerate())
            .filter(|(i, _)| self.router.uses(*i))
            .map(|(_, u)| u)
    }

    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    /// Whom a request from `peer` comes from: the peer, or behind trusted
    /// proxies the client their forwarding fields name.
    fn client_ip(&self, peer: SocketAddr, headers: &http::HeaderMap) -> std::net::IpAddr {
        crate::limit::client::client_ip(peer, headers, &self.trusted_proxies, self.trusted_fields)
    }

    /// The upstream of the route at `route` (its index), if one was chosen.
    fn upstream_of(&self, route: Option<usize>) -> Option<&Arc<Upstream>> {
        let route = self.router.route(route?)?;
        self.upstreams.get(route.upstream)
    }

    /// The writes under way on caching routes, every generation's: a
    /// shutdown waits for them to be answered, within its grace.
    pub fn writes_under_way(&self) -> Arc<crate::task::Places> {
        self.writes.clone()
    }

    /// The name this instance gives itself in the Via of the requests it
    /// sends on, the same for its whole life.
    pub fn via_name(&self) -> &str {
        self.pseudonym.name()
    }

    pub fn limiter(&self) -> Option<&Arc<Limiter>> {
        self.limiter.as_ref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves one request. Never fails: errors become responses. With the
    /// access log on, the request's line comes with the response, for its
    /// body to write once the response is over (see [`AccessTail`]).
    ///
    /// Not an `async fn`: one stores its arguments twice, as the call's and
    /// as the body's (rust-lang/rust#62958), and the futures of this chain
    /// (`forward`, `forward_with_retries`, `Upstream::send`, `Pool::send`)
    /// are each moved whole once per request at every layer above them. A
    /// block captures the request once. Inlined, so that the future is built
    /// where it is kept: out of line, it is built and then copied, and that
    /// cost more than the smaller size saved (callgrind).
    #[allow(clippy::manual_async_fn)]
    #[inline(always)]
    pub fn handle(
        &self,
        mut request: Request<Incoming>,
        conn: Conn,
    ) -> impl Future<Output = (Response<ProxyBody>, Option<Box<log::Tail>>)> + '_ {
        async move {
            let mut pending = self.pending(&mut request, &conn);
            let trace = &mut pending.trace;
            // Boxed: hyper and each async layer above move this future whole
            // once per request; a pointer is cheaper to move than kilobytes.
            let response = match Box::pin(self.forward(request, &conn, trace)).await {
                Ok(response) => response,
                Err(error) => {
                    let status = error.status();
                    // A warning is for what went wrong on portico's side
                    // or its backends': a 501 is the client's request.
                    if status.is_server_error() && status != http::StatusCode::NOT_IMPLEMENTED {
                        let upstream = self.upstream_of(trace.route);
                        // An upstream with no backend to pick is one state,
                        // not a failure of each request it turns away: said
                        // once every few seconds, with how many went unsaid
                        // (each still has its access line). `None`: said a
                        // moment ago, and counted for the next.
                        // So is a backend's failing, refusing or timing
                        // out request after request (review42d F4: 2,000
                        // warnings in 0.3 s beside the access lines).
                        let said = crate::upstream::UNAVAILABLE_SAID;
                        let held_back = match (&error, upstream) {
                            (
                                ProxyError::NoHealthyBackend | ProxyError::AllDrained,
                                Some(upstream),
                            ) => upstream.unavailable.due(said),
                            (ProxyError::Full { .. }, Some(upstream)) => upstream.full.due(said),
                            (_, Some(upstream)) if trace.budget_refused => {
                                upstream.budget_spent.due(said)
                            }
                            (error, Some(upstream)) => error
                                .backend()
                                .and_then(|addr| upstream.backend_at(addr))
                                .map_or(Some(0), |backend| {
                                    backend.failure_said(error.backend_failure(), false)
                                }),
                            _ => Some(0),
                        };
                        if let Some(held_back) = held_back {
                            let upstream = upstream.map_or("-", |u| u.name());
                            // Its access line's id, to pair the two (review32c F4).
                            let request_id =
                                pending.access.as_ref().map(log::AccessRecord::request_id);
                            let not_retried = trace.budget_refused.then_some("retry budget spent");
                            // Its access line's client too, as the body and
                            // retry warnings name it (review36d L8: IP:port).
                            let client = pending
                                .access
                                .as_ref()
                                .map_or_else(|| conn.peer.ip(), log::AccessRecord::client);
                            let held_back = (held_back > 0).then_some(held_back);
                            tracing::warn!(client = %client, upstream, status = status.as_u16(), %error, request_id, not_retried, held_back, "proxy error");
                        }
                    } else {
                        tracing::debug!(client = %conn.peer, status = status.as_u16(), %error, "request rejected");
                    }
                    let mut response = error.into_response();
                    error::quota_headers(response.status(), response.headers_mut(), trace.quota);
                    let caching = trace
                        .route
                        .and_then(|i| self.router.route(i))
                        .is_some_and(|route| route.cache && self.cache.is_some());
                    if caching {
                        // Every response of a caching route says what the cache
                        // did: forwarded and failed, or refused before it.
                        let headers = response.headers_mut();
                        match trace.fwd {
                            Some(fwd) => {
                                cached::add_status(headers, &format!("portico; fwd={fwd}"))
                            }
                            None => {
                                cached::add_static_status(headers, "portico; detail=not-forwarded")
                            }
                        }
                    }
                    response
                }
            };
            let tail = pending.answered(&response);
            (response, tail)
        }
    }

    /// The request's id, access record and clock, from the moment it is
    /// taken up.
    fn pending(&self, request: &mut Request<Incoming>, conn: &Conn) -> Pending<'_> {
        let mut pending = Pending {
            proxy: self,
            started: std::time::Instant::now(),
            access: log::AccessRecord::capture(request, conn, |headers| {
                self.client_ip(conn.peer, headers)
            }),
            trace: Trace::default(),
            done: false,
        };
        pending.trace.client = pending.access.as_ref().map(log::AccessRecord::client);
        pending.trace.identified = pending.access.is_some();
        pending
    }

    /// Counts and logs a request head the HTTP/1 parser refused with
    /// `status` before any of it reached [`Proxy::handle`], or one that
    /// did not arrive whole in time (408).
    pub fn refused(
        &self,
        client: SocketAddr,
        status: u16,
        error: &dyn std::fmt::Display,
        answered: log::Refused,
    ) {
        self.unrouted.count(status);
        log::emit_refused(client, status, error, answered);
    }

    /// What portico makes of a request before any of its body is read:
    /// answered here (`OPTIONS *`), refused (an error: a 429, a 404, a
    /// redirect), or on its way to a route's upstream. Left out of
    /// [`Proxy::forward`]'s future, so that a request answered here still
    /// has its body to read off (see [`discard_unread`]).
    fn admit<'a>(
        &'a self,
        request: &mut Request<Incoming>,
        conn: &Conn,
        trace: &mut Trace,
    ) -> Result<Admission<'a>, ProxyError> {
        // A 2xx to CONNECT makes the connection a tunnel (RFC 9110 §9.3.6),
        // which a reverse proxy must not open to whatever the backend
        // says; relayed, its answer would also leave the client with none.
        if is_method(request.method(), &Method::CONNECT) {
            return Err(ProxyError::ConnectMethod);
        }
        // TRACE echoes the request as the backend got it, fields the
        // hops on the way added included (cross-site tracing); nginx
        // refuses it with 405 before choosing a location, as here.
        if is_method(request.method(), &Method::TRACE) {
            return Err(ProxyError::TraceMethod);
        }
        // A target is a path (origin or absolute form) but for two
        // cases (RFC 9112 §3.2): CONNECT's authority, refused above,
        // and OPTIONS's `*`. A GET of `*` or of `host:port` is
        // malformed, not a path that no route matches.
        if !request.uri().path().starts_with('/') {
            if request.uri().path() != "*" || request.method() != Method::OPTIONS {
                return Err(ProxyError::BadRequest(
                    "the target is not a path (only OPTIONS may ask for `*`)",
                ));
            }
            // `OPTIONS *` asks the server itself, not a resource (RFC
            // 9110 §9.3.7): a ping, which no route's path matches and
            // no backend behind it should have to answer. Its Host is
            // judged as any request's (RFC 9112 §3.2: 400 if missing,
            // repeated or invalid).
            request_host(request)?;
            return Ok(Admission::Answer(Box::new(final_options())));
        }
        // RFC 9110 §7.6.2: an OPTIONS with `Max-Forwards: 0` is
        // answered here, as its final recipient; any other has the
        // count taken down by this hop. (TRACE, the other method it
        // governs, is refused above.)
        if request.method() == Method::OPTIONS && max_forwards_spent(request.headers_mut()) {
            request_host(request)?;
            return Ok(Admission::Answer(Box::new(final_options())));
        }
        // HTTP/1 heads over the limit never get here (hyper answers
        // 431). One more is allowed for the X-Request-Id `handle` may
        // have added, and cookies count as one field: HTTP/2 clients
        // send one per cookie, which reach the backend as one line.
        let fields = request.headers().len();
        // RFC 9113 §8.2.1: an HTTP/2 field value that begins or ends
        // with whitespace makes the request malformed. An HTTP/1 parser
        // trims it; relayed, backends would each read it their own way.
        if request.version() >= http::Version::HTTP_2 && request.headers().values().any(padded) {
            return Err(ProxyError::BadRequest(
                "a field value begins or ends with whitespace",
            ));
        }
        if request.version() >= http::Version::HTTP_2 && fields > error::MAX_HEADER_FIELDS + 1 {
            let cookies = request.headers().get_all(header::COOKIE).iter().count();
            if fields - cookies.saturating_sub(1) > error::MAX_HEADER_FIELDS + 1 {
                return Err(ProxyError::TooManyFields);
            }
        }
        // Before the cache: a looped miss would otherwise wait on its
        // own fill. For the same reason a request back once (allowed,
        // see `laps`) goes past the cache to its backend.
        let back = headers::laps(request.headers(), &self.pseudonym);
        if back >= 2 {
            return Err(ProxyError::Loop);
        }
        let host = request_host(request)?.map(canonical_host);
        let (index, route) = self
            .router
            .find(
                host.as_ref().and_then(|h| h.to_str().ok()),
                request.uri().path(),
            )
            .map_err(|unrouted| match unrouted {
                route::Unrouted::Ambiguous => ProxyError::BadRequest(
                    "ambiguous path: backends of other kinds would read its `;`, `\\`, escapes or dot segments as another resource",
                ),
                route::Unrouted::AddSlash(prefix) => {
                    ProxyError::AddSlash(error::AddSlash::new(request, prefix))
                }
            })?
            .ok_or(ProxyError::NoRoute)?;
        trace.route = Some(index);

        let mut quota = None;
        if let Some(limiter) = self.limiter.as_ref().filter(|_| route.rate_limit) {
            // Kept for a `client_ip` hash_key, which would work it out again.
            let client = *trace
                .client
                .get_or_insert_with(|| self.client_ip(conn.peer, request.headers()));
            let key = limiter.key(client, request.headers()).map_err(|_| {
                ProxyError::BadRequest("the rate-limit key field came on several lines that differ")
            })?;
            match limiter.check(index, &key) {
                Some(Decision::Throttled {
                    limit,
                    retry_after,
                    reset,
                }) => {
                    self.route_metrics[index].throttled();
                    return Err(ProxyError::Throttled {
                        limit,
                        retry_after,
                        reset,
                    });
                }
                Some(Decision::Allowed {
                    limit,
                    remaining,
                    reset,
                }) => {
                    quota = Some((limit, remaining, reset));
                    trace.quota = quota;
                }
                None => {}
            }
        }

        if declared_length(request.headers())? > Some(self.max_request_body) {
            return Err(ProxyError::BodyTooLarge);
        }
        // hyper decodes a final `chunked` and portico re-chunks; any coding
        // before it would reach the backend unannounced (RFC 9112 §6.1).
        if !headers::relayable_coding(request.headers()) {
            // `chunked` twice is no coding portico lacks but a
            // malformed message (RFC 9112 §6.1: applied once at most).
            let chunked = headers::list_members(request.headers(), &header::TRANSFER_ENCODING)
                .filter(|coding| coding.eq_ignore_ascii_case("chunked"))
                .count();
            return Err(match chunked {
                0 | 1 => ProxyError::UnsupportedCoding,
                _ => ProxyError::BadRequest("`chunked` applied more than once"),
            });
        }

        Ok(Admission::Forward(Admitted {
            route,
            host,
            quota,
            back,
        }))
    }

    /// Not an `async fn`, for the reason [`Proxy::handle`] gives.
    #[allow(clippy::manual_async_fn)]
    #[inline(always)]
    fn forward<'a>(
        &'a self,
        mut request: Request<Incoming>,
        conn: &'a Conn,
        trace: &'a mut Trace,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
        async move {
            let Admitted {
                route,
                host,
                quota,
                back,
            } = match self.admit(&mut request, conn, trace) {
                Ok(Admission::Forward(admitted)) => admitted,
                // Boxed: rare, and inline its timer would grow every
                // request's future.
                Ok(Admission::Answer(response)) => {
                    Box::pin(discard_unread(request)).await;
                    return Ok(*response);
                }
                Err(error) => {
                    // Not after a 400, a 413 or a 501: the request itself
                    // is at fault, and nginx ends the connection after
                    // those (`ngx_http_special_response_handler`).
                    let faulty = matches!(error.status().as_u16(), 400 | 413 | 501);
                    if !faulty {
                        Box::pin(discard_unread(request)).await;
                    }
                    return Err(error);
                }
            };
            let upstream = &self.upstreams[route.upstream];
            // Read now: `Accept-Encoding` goes on to the backend as it
            // came, and the request itself goes too.
            let compressing = self
                .compressor
                .as_ref()
                .filter(|_| route.compress)
                .map(|c| {
                    (
                        c,
                        c.asked(request.method(), request.version(), request.headers()),
                    )
                });
            if compressing
                .as_ref()
                .is_some_and(|(_, asked)| asked.takes_gzip())
            {
                compress::without_dated_range(request.headers_mut());
            }
            if upstream.hashes_client() {
                trace
                    .client
                    .get_or_insert_with(|| self.client_ip(conn.peer, request.headers()));
            }
            // A request's id is given before it is hashed on: with the
            // access log off it would come only on the way to the backend.
            if !trace.identified && upstream.hashes_header(&log::X_REQUEST_ID) {
                log::ensure_request_id(request.headers_mut());
                trace.identified = true;
            }
            let keyed = upstream.keyed(request.uri(), request.headers(), trace.client);

            let upgrade = upgrade::requested(&mut request);
            let (mut parts, body) = request.into_parts();
            if let Some(keyed) = keyed {
                parts.extensions.insert(keyed);
            }
            let mut body =
                RequestBody::new(body, self.max_request_body, upstream.config.body_timeout)
                    .ending(parts.extensions.remove::<body::UploadEnded>());
            let client = ClientInfo {
                ip: &conn.forwarded_for,
                proto: conn.proto,
                host: host.as_ref(),
                version: parts.version,
                trusted: crate::limit::client::trusted(conn.peer.ip(), &self.trusted_proxies)
                    .then_some(self.trusted_fields),
            };
            let cache = self.cache.as_ref().filter(|_| route.cache);
            let readable = parts.method == Method::GET || parts.method == Method::HEAD;
            // A GET or HEAD with content is not the request a stored
            // response answered: its answer may depend on the content (RFC
            // 9110 §9.3.1; a search API's GET with a query body), so it goes
            // past the cache, as one with `no-store` does.
            // An idempotent request whose framing left its length open (an
            // HTTP/2 one without `content-length` or with 0, HTTP/1
            // `chunked`) and whose upload turns out empty (an empty DATA
            // frame ending the stream, a lone `0` chunk, as `curl -X
            // DELETE -d ''` sends) is a request without content: cached as
            // one (GET, HEAD; review32c F2) and retried as one (PUT,
            // DELETE, OPTIONS; review37a M1: a 502 where the same request
            // with `Content-Length: 0` was retried).
            let empty = http_body::Body::is_end_stream(&body)
                || (is_idempotent(&parts.method)
                    && http_body::Body::size_hint(&body).lower() == 0
                    // A client waiting for `100 Continue` has content, and
                    // reading it would send the 100 before a backend was
                    // even picked (review37e L6).
                    && !parts.headers.contains_key(header::EXPECT)
                    // Boxed: rare, and inline its timer would grow every
                    // request's future.
                    && Box::pin(body.settle_within(SETTLE_WAIT)).await);
            let with_content = readable && !empty;
            // The scheme the backend is told, which the cache keys on.
            let scrubbed = headers::scrub_request(&mut parts.headers, client, !empty);
            let proto = scrubbed.proto;
            // The cache that may answer this request itself, if any: not
            // for a GET or HEAD a field may make another method (see
            // `headers::OVERRIDES`).
            let answering = cache.filter(|_| {
                readable
                    && !with_content
                    && upgrade.is_none()
                    && back == 0
                    && !scrubbed.overrides_method
            });
            // Such a request gets this hop in X-Forwarded-For and Via only
            // once it is on its way to a backend: a hit skips their cost,
            // and that of making the hop.
            let identified = trace.identified;
            let hop = || Hop::of(client, &self.pseudonym).identified(identified);
            if answering.is_none() {
                headers::add_hop(&mut parts.headers, hop());
            }
            // HTTP/2 carries the host in :authority; backends need a Host field.
            // The cache keys on it too: a clone shares the parsed bytes.
            if let Some(host) = &host {
                parts.headers.insert(header::HOST, host.clone());
            }
            let host_name = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
            if let Some(upgrade) = &upgrade {
                upgrade.restore_request(&mut parts.headers);
            }

            if let Some(cache) = answering {
                let at = (proto, host_name);
                // A hit's entry, for the gzip copy kept beside it, and
                // for the `Vary` a 304 made of it says (it has no type).
                let with_entry = compressing.is_some();
                let lookup = cached::lookup(cache, upstream, &parts, at, hop, with_entry);
                let (mut response, stored) = match lookup.await {
                    cached::Lookup::Answered(response) => (response, None),
                    cached::Lookup::Hit(response, stored) => (response, Some(stored)),
                    // Asked for only by a compressing route (`with_entry`).
                    cached::Lookup::Fresh(fresh) => {
                        let copy = match &compressing {
                            Some((compressor, asked)) => {
                                compressor.copy_hit(asked, fresh, cache).await
                            }
                            None => Err(fresh),
                        };
                        match copy {
                            Ok(mut response) => {
                                error::quota_headers(
                                    response.status(),
                                    response.headers_mut(),
                                    quota,
                                );
                                return Ok(response);
                            }
                            Err(fresh) => {
                                let (response, stored) = fresh.answer();
                                (response, Some(stored))
                            }
                        }
                    }
                    // Boxed: a hit never makes this kilobytes-large future.
                    cached::Lookup::Forward(looked) => {
                        headers::add_hop(&mut parts.headers, hop());
                        let serve = cached::serve(cache, upstream, parts, body, looked, trace);
                        (Box::pin(serve).await?, None)
                    }
                };
                error::quota_headers(response.status(), response.headers_mut(), quota);
                if let Some((compressor, asked)) = compressing {
                    response = match stored {
                        Some(stored) => match compressor.apply_stored(asked, response, stored) {
                            compress::FromStored::Sent(response) => response,
                            // Boxed: only hits to compress make it.
                            compress::FromStored::ToCompress(hit) => {
                                Box::pin(compressor.compress_stored(hit, cache)).await
                            }
                        },
                        None => compressor.apply(asked, response),
                    };
                }
                return Ok(response);
            }
            // RFC 9111 §4.4: unsafe methods, and methods of unknown safety,
            // invalidate; OPTIONS (a CORS preflight) does not. (TRACE is
            // refused before routing.)
            // On a route with `cache = false` too: entries stored while it
            // was on would otherwise come back, older than the write, when
            // it is turned on again (review33a F3).
            let owed = self
                .cache
                .as_ref()
                .filter(|_| !is_safe(&parts.method))
                .map(|cache| {
                    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    cached::Owed::new(
                        cache.clone(),
                        self.newest_cache.clone(),
                        proto,
                        host_name,
                        target.to_owned(),
                        self.writes.clone(),
                    )
                });
            if let Some(cache) = cache {
                if let Some(mut refused) = readable
                    .then(|| cached::only_if_cached_bypass(cache, &parts.headers))
                    .flatten()
                {
                    error::quota_headers(refused.status(), refused.headers_mut(), quota);
                    return Ok(refused);
                }
                trace.fwd = Some(if readable {
                    // A GET or HEAD here is a lookup the cache passed by,
                    // as `fwd=bypass` says: one with content, an upgrade,
                    // a method override, or one back through this proxy
                    // again (a loop the other hop will stop). `fwd=method` is for the
                    // methods a cache never answers (review32d F4).
                    cache.counters.bypass.inc();
                    "bypass"
                } else {
                    "method"
                });
            }
            let (response, in_flight) = match owed {
                // Boxed: only writes get here, and inline it would grow
                // every request's future.
                Some(owed) => {
                    Box::pin(cached::forward_write(upstream, parts, body, trace, owed)).await?
                }
                None => forward_with_retries(upstream, parts, body, trace).await?,
            };

            if let Some(client) = upgrade {
                if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    let ends = upgrade::Ends {
                        client: trace.client.unwrap_or_else(|| conn.peer.ip()),
                        upstream: upstream.name().to_owned(),
                        backend: trace.backend,
                    };
                    let mut switched = client.bridge(response, in_flight, self.tunnel_idle, ends);
                    // A 101 on a throttled route says the budget, as every
                    // other answer there (review42h L3).
                    error::quota_headers(switched.status(), switched.headers_mut(), quota);
                    // Counted as a bypass above: the header and the access
                    // line say so too (review32f F4).
                    if cache.is_some() {
                        cached::add_static_status(switched.headers_mut(), "portico; fwd=bypass");
                    }
                    return Ok(switched);
                }
            }
            let (mut parts, body) = response.into_parts();
            headers::prepare_response(&mut parts);
            error::quota_headers(parts.status, &mut parts.headers, quota);
            if cache.is_some() {
                // Every response of a caching route says what the cache did.
                let status = if readable {
                    "portico; fwd=bypass"
                } else {
                    "portico; fwd=method"
                };
                cached::add_static_status(&mut parts.headers, status);
            }
            let response = Response::from_parts(
                parts,
                ProxyBody::stream(body, upstream.config.body_timeout, Some(in_flight)),
            );
            Ok(match compressing {
                Some((compressor, asked)) => compressor.apply(asked, response),
                None => response,
            })
        }
    }
}

/// [`Proxy::admit`]'s verdict on a request it let through.
enum Admission<'a> {
    /// On its way to the route's upstream.
    Forward(Admitted<'a>),
    /// Answered by portico itself (`OPTIONS *`). Boxed: rare.
    Answer(Box<Response<ProxyBody>>),
}

/// What [`Proxy::admit`] found out about a request on its way.
struct Admitted<'a> {
    route: &'a crate::config::Route,
    /// The Host, or HTTP/2's `:authority`, in its canonical form.
    host: Option<HeaderValue>,
    /// The client's budget on a throttling route (see [`Trace::quota`]).
    quota: Option<(u32, u32, std::time::Duration)>,
    /// Times the request has been through this proxy already.
    back: usize,
}

/// The most of a request's body read off and dropped for an answer
/// portico gives itself (see [`discard_unread`]).
const DISCARD_LIMIT: u64 = 64 * 1024;

/// How long an answer portico gives itself waits for the rest of its
/// request's body (see [`discard_unread`]).
const DISCARD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads off and drops the body of an HTTP/1 request portico answers
/// itself (a 429, a redirect, a 404; not a 400, 413 or 501), before the
/// answer goes, so that the connection may carry the client's next
/// request, as nginx discards such a body. Left unread, hyper keeps the
/// connection only if the body had come whole with the head, and the
/// answer says `Connection: close` (review41b L1).
///
/// Not for a body larger than [`DISCARD_LIMIT`], or one that takes more
/// than [`DISCARD_WAIT`] to come: the connection closes, as before. Nor
/// for a client waiting for `100 Continue`: reading would ask it for a
/// body nobody wants (hyper sends the 100 when the body is first read).
/// Nor on a connection the request closes (`Connection: close`, HTTP/1.0
/// without keep-alive). The answer waits for the body, at most
/// [`DISCARD_WAIT`]; nginx sends it first and reads the body off after.
/// HTTP/2 streams have no such need: only the stream ends.
async fn discard_unread(request: Request<Incoming>) {
    let (parts, mut body) = request.into_parts();
    let Some(ended) = parts.extensions.get::<body::UploadEnded>() else {
        return;
    };
    if !reads_off(&parts) {
        return;
    }
    // Past the limit, not at it: a body of just DISCARD_LIMIT ends.
    if body::read_off(&mut body, DISCARD_LIMIT + 1, DISCARD_WAIT).await {
        ended.set();
    }
}

/// Whether an answer given without the body of the request `head` says
/// reads the body off first (see [`discard_unread`]).
fn reads_off(head: &http::request::Parts) -> bool {
    let small = match declared_length(&head.headers) {
        Ok(Some(length)) => length <= DISCARD_LIMIT,
        Ok(None) => true,
        Err(_) => false,
    };
    // A connection that ends after this answer anyway carries no next
    // request: the answer need not wait (review42e L1).
    let ending = match head.version {
        Version::HTTP_10 => !headers::connection_lists(&head.headers, "keep-alive"),
        _ => headers::connection_lists(&head.headers, "close"),
    };
    small && !ending && !head.headers.contains_key(header::EXPECT)
}

/// [`discard_unread`] for a request whose body was on its way to a
/// backend and came back unsent (no backend up, every connect refused):
/// portico's 502, 503 or 504 then left it unread and closed the
/// connection, where nginx and HAProxy read it off and keep it (chaos50
/// L1). The body marks its upload ended when read to its end. Only where
/// `discards` (an HTTP/1 request whose body [`reads_off`]): not for
/// HTTP/2, as `discard_unread` is not, where only the stream ends.
async fn discard_unsent(error: ProxyError, discards: bool, mut body: RequestBody) -> ProxyError {
    if discards && !http_body::Body::is_end_stream(&body) {
        body::read_off(&mut body, DISCARD_LIMIT + 1, DISCARD_WAIT).await;
    }
    error
}

/// The answer to an OPTIONS that ends here (`*`, or no hops left): an
/// empty 200, as nginx gives a bare `OPTIONS` it serves itself. Without
/// `Allow`, as portico cannot know what its backends allow.
fn final_options() -> Response<ProxyBody> {
    let mut answer = Response::new(ProxyBody::full(Bytes::new()));
    answer
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    answer
}

/// Whether a request's `Max-Forwards` is 0, and so it goes no further;
/// otherwise the count is taken down by one for the next hop (RFC 9110
/// §7.6.2). A value that is not one number is left as it is: the next
/// hop judges it, as nginx and HAProxy pass the field on untouched.
fn max_forwards_spent(headers: &mut http::HeaderMap) -> bool {
    let Some(left) = headers::only_line(headers, &header::MAX_FORWARDS)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
        // A count too large for u64 is as good as endless.
        .map(|value| value.parse::<u64>().unwrap_or(u64::MAX))
    else {
        return false;
    };
    if left == 0 {
        return true;
    }
    headers.insert(header::MAX_FORWARDS, HeaderValue::from(left - 1));
    false
}

/// Whether `method` is `standard` written in any case. Methods are
/// case-sensitive (RFC 9110 §9.1), but a backend that reads them without
/// regard to case takes `trace` for TRACE: refused as TRACE and CONNECT
/// are (proto54 L1; nginx refuses a method not in capitals).
fn is_method(method: &Method, standard: &Method) -> bool {
    method == standard
        || (method.as_str().len() == standard.as_str().len()
            && method.as_str().eq_ignore_ascii_case(standard.as_str()))
}

/// RFC 9110 §9.2.1 safe methods: read-only by definition.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// RFC 9110 §9.2.2 idempotent methods: safe to send twice.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A copy of a request head for a retry, a fill, a revalidation: of its
/// extensions, only its hash key ([`Keyed`]) is carried over.
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    // A fill's, a revalidation's or a refresh's request goes where its
    // client's would (its key as the client sent it).
    if let Some(&keyed) = parts.extensions.get::<Keyed>() {
        request.extensions_mut().insert(keyed);
    }
    request.into_parts().0
}

/// The host the client asked for. RFC 9112 §3.2: an HTTP/1.1 request without
/// exactly one Host field is rejected; HTTP/2 uses :authority, and a Host
/// field there must agree with it (RFC 9113 §8.3.1).
fn request_host(request: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("repeated Host header"));
    }
    let authority = request.uri().authority();
    match (request.version(), host, authority) {
        (Version::HTTP_11, None, _) => Err(ProxyError::BadRequest("missing Host header")),
        // RFC 9113 §8.3.1: an http(s) request needs :authority or Host.
        (Version::HTTP_2, None, None) => Err(ProxyError::BadRequest("missing :authority")),
        (Version::HTTP_2, Some(host), Some(authority))
            if !same_host(
                host.as_bytes(),
                authority.as_str(),
                request.uri().scheme_str(),
            ) =>
        {
            Err(ProxyError::BadRequest("Host disagrees with :authority"))
        }
        // RFC 9112 §3.2: an invalid Host is a 400 whatever the target's
        // form, though an absolute-form target's authority replaces it.
        // (An empty Host is a valid value, RFC 9110 §7.2; the authority
        // replaces it.)
        (_, Some(host), Some(_)) if !host.is_empty() && !headers::valid_host(host.as_bytes()) => {
            Err(ProxyError::BadRequest("invalid Host header"))
        }
        // Absolute-form targets override Host (RFC 9112 §3.2.2).
        (_, _, Some(authority)) if headers::valid_host(authority.as_str().as_bytes()) => {
            Ok(HeaderValue::from_str(authority.as_str()).ok())
        }
        (_, _, Some(_)) => Err(ProxyError::BadRequest("invalid authority in the target")),
        (_, Some(host), None) if headers::valid_host(host.as_bytes()) => Ok(Some(host.clone())),
        (_, Some(_), None) => Err(ProxyError::BadRequest("invalid Host header")),
        (_, None, None) => Ok(None),
    }
}

/// `host` with a bracketed IPv6 literal in its one text form (RFC 5952:
/// `[0:0::1]:8080` is `[::1]:8080`), which route hosts are read into: one
/// address spelled otherwise missed its route, and was another cache key
/// and purge host (review40d L1). Every other host is left as it is.
fn canonical_host(host: HeaderValue) -> HeaderValue {
    if host.as_bytes().first() != Some(&b'[') {
        return host;
    }
    host.to_str()
        .ok()
        .and_then(headers::canonical_literal)
        .and_then(|canonical| HeaderValue::from_str(&canonical).ok())
        .unwrap_or(host)
}

/// Whether a field value begins or ends with a space or a tab.
fn padded(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    bytes.first().is_some_and(blank) || bytes.last().is_some_and(blank)
}

/// Whether Host and :authority name the same origin (RFC 9113 §8.3.1):
/// case aside, and with the scheme's default port written or not.
fn same_host(host: &[u8], authority: &str, scheme: Option<&str>) -> bool {
    let default = match scheme {
        Some("https") => &b":443"[..],
        _ => &b":80"[..],
    };
    // The default port, or an empty one (RFC 3986 §6.2.3), as the cache
    // key reads it (review40f L4).
    let strip = |name: &[u8]| {
        name.strip_suffix(default)
            .or_else(|| name.strip_suffix(b":"))
            .map_or(name.len(), <[u8]>::len)
    };
    if host == authority.as_bytes() {
        return true;
    }
    // One IPv6 address in two spellings (`[0::1]`, `[::1]`).
    let respelled = match (host.first(), std::str::from_utf8(host)) {
        (Some(b'['), Ok(text)) => Some((
            headers::canonical_literal(text).unwrap_or_else(|| text.to_owned()),
            headers::canonical_literal(authority).unwrap_or_else(|| authority.to_owned()),
        )),
        _ => None,
    };
    let (host, authority) = match &respelled {
        Some((host, authority)) => (host.as_bytes(), authority.as_bytes()),
        None => (host, authority.as_bytes()),
    };
    let (h, a) = (strip(host), strip(authority));
    host[..h].eq_ignore_ascii_case(&authority[..a])
}

/// The request's Content-Length, if it declared one. Framing conflicts are
/// already refused by the HTTP/1 parser; this only reads the value.
fn declared_length(headers: &http::HeaderMap) -> Result<Option<u64>, ProxyError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or(ProxyError::BadRequest("invalid Content-Length")),
    }
}

#[cfg(test)]
mod tests {
    use super::Conn;
    use std::net::SocketAddr;

    /// An IPv4 client of a dual-stack listener is the IPv4 peer it is, in
    /// every line about its connection (review40d L5).
    #[test]
    fn a_dual_stack_ipv4_peer_is_ipv4() {
        let conn = Conn::new(
            "[::ffff:127.0.0.1]:5000".parse().unwrap(),
            "http",
            Default::default(),
        );
        assert_eq!(conn.peer, "127.0.0.1:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(conn.forwarded_for, "127.0.0.1");
        let v6 = Conn::new("[::1]:5000".parse().unwrap(), "http", Default::default());
        assert_eq!(v6.peer, "[::1]:5000".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn max_forwards_is_spent_at_zero_and_taken_down_otherwise() {
        let after = |value: &str| {
            let mut headers = crate::test_support::headers(&[("max-forwards", value)]);
            let spent = super::max_forwards_spent(&mut headers);
            let left = headers["max-forwards"].to_str().unwrap().to_owned();
            (spent, left)
        };
        assert_eq!(after("0"), (true, "0".to_owned()));
        assert_eq!(after("5"), (false, "4".to_owned()));
        assert_eq!(after("1"), (false, "0".to_owned()));
        // Not one number: the next hop's to judge.
        for odd in ["-1", "a", "1, 2", " 3"] {
            assert_eq!(after(odd), (false, odd.to_owned()), "{odd:?}");
        }
        let mut none = http::HeaderMap::new();
        assert!(!super::max_forwards_spent(&mut none));
        assert!(none.is_empty());
    }

    #[test]
    fn host_and_authority_agree_case_and_default_port_aside() {
        use super::same_host;
        assert!(same_host(b"a.example", "a.example", Some("http")));
        assert!(same_host(b"A.Example", "a.example", Some("http")));
        assert!(same_host(b"a.example", "a.example:80", Some("http")));
        assert!(same_host(b"a.example:443", "a.example", Some("https")));
        assert!(!same_host(b"a.example:443", "a.example", Some("http")));
        assert!(!same_host(b"a.example:8080", "a.example", Some("http")));
        assert!(!same_host(b"b.example", "a.example", Some("http")));
        // One IPv6 address, spelled two ways (review40d L1).
        assert!(same_host(b"[::1]", "[0::1]", Some("http")));
        assert!(same_host(b"[0:0::1]:80", "[::1]", Some("http")));
        assert!(same_host(b"[::ABCD]", "[::abcd]", Some("http")));
        assert!(!same_host(b"[::1]", "[::2]", Some("http")));
        assert!(!same_host(b"[::1]:8080", "[::1]", Some("http")));
        // An empty port is the default one.
        assert!(same_host(b"a.example", "a.example:", Some("http")));
        assert!(same_host(b"[::1]:", "[::1]", Some("https")));
        // A request's host is the one spelling routes and keys use.
        let canonical = |h: &str| super::canonical_host(http::HeaderValue::from_str(h).unwrap());
        assert_eq!(canonical("[0:0::0001]:8080"), "[::1]:8080");
        assert_eq!(canonical("[::FFFF:7f00:1]"), "[::ffff:127.0.0.1]");
        assert_eq!(canonical("[::1]"), "[::1]");
        assert_eq!(canonical("[v1.x]"), "[v1.x]");
        assert_eq!(canonical("A.example:80"), "A.example:80");
    }
}
