//! Upstreams: a named set of backend instances, the choice among them
//! (`select`), their health (`health`), the retry budget (`budget`) and the
//! pooled keep-alive client that talks to them. Knows HTTP only as far as
//! sending a prepared request and judging a health check; header hygiene and
//! routing live in `proxy`.

mod budget;
mod counter;
mod hash;
pub mod health;
mod pool;
mod queue;
pub mod select;
mod tls;

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Uri};
use http::{header, Method, Request, Response};

use crate::config::{self, Balance};
use crate::metrics::{BackendMetrics, Failure, Metrics};
use crate::proxy::body::{BodyError, RequestBody};
use crate::proxy::error::ProxyError;
use budget::RetryBudget;
use health::{BackendState, Clock, Counter, Health, InFlight};
pub use pool::{latest_head_timeout, UpstreamBody};
#[cfg(unix)]
pub(crate) use pool::{reset_on_close, unsent};
use pool::{Pool, SendError};
use queue::{Queue, Room};
use select::{Candidate, Tried, Turn};

/// Largest read buffer of a backend connection: 64 KiB of body per read
/// (what nginx's default 8 x 8 KiB `proxy_buffers` take in) plus room for
/// a response head. It also keeps the buffer under glibc's 128 KiB mmap
/// threshold, so growing it costs no mmap, munmap and page faults.
pub(crate) const UPSTREAM_READ_BUFFER: usize = 72 * 1024;

/// Share of requests that may be retries, per upstream, over the window.
const RETRY_BUDGET_PERCENT: u64 = 20;

/// One backend instance of an upstream.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Takes requests only while no primary backend can.
    pub backup: bool,
    /// Its own in `balance = "hash"`'s scores: a hash of its address, so
    /// the keys it wins stay its own whatever the order of the list, and
    /// in every portico in front of it (see [`select::rendezvous`]).
    seed: u64,
    /// Pre-built so a request's URI costs a cheap clone, not formatting.
    authority: Authority,
    state: Arc<BackendState>,
    pub metrics: BackendMetrics,
    /// The warnings that a request failed here (a refused connect, a
    /// timeout) and that an attempt that failed here is retried, each
    /// said at most once every [`UNAVAILABLE_SAID`] seconds for each
    /// [`Failure`] (review42d F4, review42e L2): each request has its
    /// access line and its count in `portico_upstream_errors_total`.
    /// One more, last, for portico's own failures (out of file
    /// descriptors), which have no [`Failure`] (review42j M2).
    failing: [crate::logging::Every; Failure::ALL.len() + 1],
    retrying: [crate::logging::Every; Failure::ALL.len() + 1],
}

impl Backend {
    pub fn state(&self) -> &BackendState {
        &self.state
    }

    /// Whether a request's failure here of this kind (`None`: portico's
    /// own, such as no file descriptor left) may be warned of now, and
    /// how many such warnings went unsaid before it (see
    /// [`crate::logging::Every::due`]). `retried`: the warning that the
    /// attempt is sent again, rather than that the request failed.
    pub fn failure_said(&self, failure: Option<Failure>, retried: bool) -> Option<u64> {
        let said = if retried {
            &self.retrying
        } else {
            &self.failing
        };
        let kind = failure.map_or(Failure::ALL.len(), |failure| failure as usize);
        said[kind].due(UNAVAILABLE_SAID)
    }

    /// Takes an in-flight slot until the returned guard drops, if it is
    /// below its `max_conns`.
    pub fn take_slot(&self) -> Option<InFlight> {
        if self.state.max_conns() == usize::MAX {
            return Some(InFlight::new(self.state.clone()));
        }
        self.state
            .start_request_within()
            .then(|| InFlight::taken(self.state.clone()))
    }

    /// Its `max_conns`, if it has one.
    pub fn max_conns(&self) -> Option<usize> {
        Some(self.state.max_conns()).filter(|&max| max != usize::MAX)
    }

    /// Weight 0: sent no new request by any balance mode, retries
    /// included (see [`select::Candidate`]), while its requests in flight
    /// finish and its health is still checked (HAProxy's `weight 0`,
    /// nginx's `down`).
    pub fn drained(&self) -> bool {
        self.weight == 0
    }
}

/// A backend's health as operators see it (admin `/status`, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Healthy now: up by active checks and not passively ejected. It
    /// takes traffic unless also `drained`; kept apart so an operator sees
    /// whether a drained backend is fit to come back.
    pub up: bool,
    pub active_up: bool,
    pub ejected: bool,
    /// Weight 0: takes no new requests whatever its health.
    pub drained: bool,
    pub in_flight: usize,
    pub max_conns: Option<usize>,
    pub backup: bool,
    /// While it warms up (`slow_start`): the percentage of its share it
    /// takes now.
    pub warming: Option<u8>,
    /// Connections waiting in the pool for its next request.
    pub idle_connections: usize,
    /// Up on trust: its upstream checks it and no check has judged it
    /// yet (the first goes out at once; see [`check_loop`]).
    pub unchecked: bool,
}

/// A request's key under `balance = "hash"`, read as it came (see
/// [`Upstream::keyed`]), carried in its extensions: `None` when it had
/// none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyed(pub Option<u64>);

/// Why no backend was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpicked {
    /// None is up (or every one up is drained).
    NoneUp,
    /// Every one up that could be picked is at its `max_conns`.
    Full,
}

/// Which backends one pass of [`Upstream::pick`] looks at.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// The backups, rather than the primaries.
    backup: bool,
    /// The passively ejected too (panic routing).
    ejected: bool,
}

impl Pass {
    const PRIMARY: Pass = Pass {
        backup: false,
        ejected: false,
    };
    const BACKUP: Pass = Pass {
        backup: true,
        ejected: false,
    };
    /// Panic routing: every primary and backup out.
    const PRIMARY_EJECTED: Pass = Pass {
        backup: false,
        ejected: true,
    };
    const BACKUP_EJECTED: Pass = Pass {
        backup: true,
        ejected: true,
    };
    /// In the order they are tried, without backups and with.
    const PRIMARIES: [Pass; 2] = [Pass::PRIMARY, Pass::PRIMARY_EJECTED];
    const WITH_BACKUPS: [Pass; 4] = [
        Pass::PRIMARY,
        Pass::BACKUP,
        Pass::PRIMARY_EJECTED,
        Pass::BACKUP_EJECTED,
    ];
}

/// What a look over the backends for a pick goes by (see
/// [`Upstream::candidate`]).
struct Look<'a> {
    now: u64,
    pass: Pass,
    /// Set when a backend would be picked but for its `max_conns`.
    full: &'a Cell<bool>,
    /// The pick's draw for backends warming up; `None` takes them whole.
    draw: Option<u64>,
    /// Set when a warming backend was passed over for the draw.
    cooled: &'a Cell<bool>,
}

/// A running upstream: its backends, balancer, health and connection pool.
#[derive(Debug)]
pub struct Upstream {
    pub config: config::Upstream,
    backends: Vec<Backend>,
    /// Smooth weighted round-robin cycle over the actively-up backends,
    /// rebuilt when active health changes.
    cycle: ArcSwap<Vec<usize>>,
    turns: select::Turns,
    /// Round-robin's turns among backups (see [`Upstream::choose`]).
    backup_turns: std::sync::atomic::AtomicUsize,
    budget: RetryBudget,
    retries: crate::metrics::Retries,
    clock: Clock,
    pool: Arc<Pool>,
    /// `Host` of the active checks when not each backend's address.
    check_host: Option<http::HeaderValue>,
    checker: std::sync::Mutex<Option<crate::task::AbortOnDrop>>,
    /// The warning that no backend could be picked (none healthy, or all
    /// drained), said at most once every [`UNAVAILABLE_SAID`] seconds.
    pub unavailable: crate::logging::Every,
    /// The warning that a failed request was not retried for the retry
    /// budget, as often: a state of the upstream, as `unavailable` is.
    pub budget_spent: crate::logging::Every,
    /// Attempts sent to ejected backends, every one being ejected (see
    /// [`Upstream::pick`]), and the warning that says so, as often.
    panic: prometheus::IntCounter,
    panicking: crate::logging::Every,
    /// Requests waiting for room when every backend is at its
    /// `max_conns`; shared with the upstream's other generations.
    queue: Arc<Queue>,
    /// This generation's number in `queue`, and the addresses of its
    /// backends not drained, sorted: those its requests in line take
    /// slots of.
    generation: u64,
    addrs: Arc<[SocketAddr]>,
    /// Some backend has a `max_conns`.
    capped: bool,
    /// Some backend is a backup.
    backups: bool,
    /// A `slow_start` is set: backends back in rotation warm up.
    warming: bool,
    /// The warning that requests go to the backups, as often as
    /// `unavailable`.
    backing_up: crate::logging::Every,
    /// Requests turned away after waiting in `queue`, and the warning
    /// that says so, at most every [`UNAVAILABLE_SAID`] seconds.
    rejected: prometheus::IntCounter,
    pub full: crate::logging::Every,
    /// Requests without their key, under `balance = "hash"` alone.
    keyless: Option<prometheus::IntCounter>,
}

/// A backend's warnings per [`Failure`] (see [`Backend::failure_said`]):
/// going on from `previous`, its predecessor's at a reload, so that a
/// reload does not let each be said again at once.
fn said_of(
    previous: Option<&[crate::logging::Every; Failure::ALL.len() + 1]>,
) -> [crate::logging::Every; Failure::ALL.len() + 1] {
    std::array::from_fn(|i| crate::logging::Every::continuing(previous.map(|p| &p[i])))
}

/// Seconds between two warnings that an upstream has no backend to pick:
/// one state, where a warning per request turned away flooded the log
/// (review40b L1: 408 of them in a soak, one per access line).
pub const UNAVAILABLE_SAID: u64 = 10;

impl Upstream {
    pub fn new(config: config::Upstream, metrics: &Metrics) -> Arc<Self> {
        let upstream = Self::build(config, metrics, None);
        upstream.start_checks();
        upstream
    }

    /// The upstream for `config`, its checks not started yet. Its backends
    /// count their requests in flight with those of `previous` at the same
    /// address, so least_conn sees the requests a reload left running.
    fn build(
        config: config::Upstream,
        metrics: &Metrics,
        previous: Option<&Upstream>,
    ) -> Arc<Self> {
        let threshold = config.health.as_ref().map_or(3, |h| h.fall);
        let name: Arc<str> = config.name.as_str().into();
        let old = previous.map(Upstream::by_addr).unwrap_or_default();
        // The last generation's, so the ejections taken over from it end
        // when they would have.
        let clock = previous.map_or_else(Clock::new, |p| p.clock);
        let lone = config.backends.len() == 1;
        // The upstream's warnings go on from the last generation's, or a
        // reload lets each be said again at once.
        let said = |of: fn(&Upstream) -> &crate::logging::Every| {
            crate::logging::Every::continuing(previous.map(of))
        };
        let (queued, rejected) = metrics.queue(&config.name);
        let queue = previous.map_or_else(|| Arc::new(Queue::new(queued)), |p| p.queue.clone());
        // Its requests in line are told apart from those a previous
        // generation left waiting (see `Queue`).
        let generation = queue.next_generation();
        let backends: Vec<Backend> = config
            .backends
            .iter()
            .map(|b| {
                let addr = b.addr.to_string();
                let backend_metrics = metrics.backend(&config.name, &addr);
                let mut state = BackendState::new(threshold)
                    .probe_hold(config.connect_timeout + config.response_timeout)
                    .counting_body_errors(metrics.body_errors(&config.name, &addr))
                    .counting_ejections(backend_metrics.ejections())
                    .of_upstream(clock, lone)
                    .named(name.clone(), b.addr)
                    .slow_start(config.slow_start);
                if let Some(old) = old.get(&b.addr) {
                    state = state.sharing_in_flight(&old.state).warming_like(&old.state);
                    // A lone backend is never ejected, nor would anything
                    // end an ejection taken over: it showed ejected after
                    // each probe for good (review43a L2).
                    if !lone {
                        state = state.keeping_passive(&old.state);
                    }
                }
                // Added by a reload, or undrained: back in rotation, as
                // HAProxy's servers out of maintenance (not at a start).
                let back = previous.is_some()
                    && old
                        .get(&b.addr)
                        .is_none_or(|old| old.drained() && b.weight > 0);
                if back {
                    state.start_warming();
                }
                // Every backend's: a reload may have capped one whose
                // requests of the previous generation free its slots.
                let state = state.with_max_conns(b.max_conns).queueing(queue.clone());
                Backend {
                    addr: b.addr,
                    weight: b.weight,
                    backup: b.backup,
                    seed: {
                        let mut seed = select::StableHash::new();
                        seed.write(addr.as_bytes());
                        seed.finish()
                    },
                    authority: Authority::try_from(addr.as_str())
                        .expect("a SocketAddr always formats as a valid authority"),
                    state: Arc::new(state),
                    metrics: backend_metrics,
                    // Going on from the same address's, as the upstream's
                    // own warnings do.
                    failing: said_of(old.get(&b.addr).map(|o| &o.failing)),
                    retrying: said_of(old.get(&b.addr).map(|o| &o.retrying)),
                }
            })
            .collect();
        // The pool, with its connections, goes on when nothing it uses
        // changed (a weight, the balance, the checks): each such reload
        // closed every backend connection, a TLS handshake apiece on a
        // `tls` upstream (review35a).
        let pool = match previous {
            Some(previous) if same_pool(&previous.config, &config) => previous.pool.clone(),
            _ => new_pool(&config, &backends),
        };
        let upstream = Arc::new(Upstream {
            cycle: ArcSwap::from_pointee(Vec::new()),
            turns: select::Turns::default(),
            backup_turns: std::sync::atomic::AtomicUsize::new(0),
            budget: RetryBudget::new(RETRY_BUDGET_PERCENT),
            retries: metrics.retries(&config.name),
            clock,
            checker: std::sync::Mutex::new(None),
            unavailable: said(|u| &u.unavailable),
            budget_spent: said(|u| &u.budget_spent),
            panic: metrics.panic(&config.name),
            panicking: said(|u| &u.panicking),
            capped: config.backends.iter().any(|b| b.max_conns > 0),
            backups: config.backends.iter().any(|b| b.backup),
            warming: !config.slow_start.is_zero(),
            backing_up: said(|u| &u.backing_up),
            queue,
            generation,
            addrs: {
                // Not the drained: none of its requests picks them.
                let mut addrs: Vec<SocketAddr> = config
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .map(|b| b.addr)
                    .collect();
                addrs.sort_unstable();
                addrs.into()
            },
            rejected,
            full: said(|u| &u.full),
            // A series for hashing upstreams alone: one that hashes no
            // more loses its (review45c L2).
            keyless: match config.balance {
                Balance::Hash(_) => Some(metrics.keyless(&config.name)),
                _ => {
                    metrics.forget_keyless(&config.name);
                    None
                }
            },
            check_host: check_host(&config),
            config,
            backends,
            pool,
        });
        upstream.rebuild_cycle();
        upstream
    }

    /// For a reload that changed this upstream's settings: a new upstream,
    /// whose backends `previous` (the upstream of the same name) had found
    /// down by its active checks start down, so a tuning reload does not
    /// send traffic to a dead backend until the checks find it dead again.
    /// Only under the same checks: a reload that changes them (a wrong
    /// path corrected, say, or a new TLS server name or CA) or drops them
    /// starts every backend up, as at a start. Requests in flight carry
    /// over whatever changed (see [`Upstream::build`]).
    pub fn rebuild(config: config::Upstream, metrics: &Metrics, previous: &Upstream) -> Arc<Self> {
        let upstream = Self::build(config, metrics, Some(previous));
        if same_checks(&previous.config, &upstream.config) {
            let old = previous.by_addr();
            for backend in &upstream.backends {
                let Some(old) = old.get(&backend.addr) else {
                    continue;
                };
                if !old.state.active_up() {
                    backend.state.set_active_up(false);
                }
                if old.state.judged() {
                    backend.state.set_judged();
                }
            }
            upstream.rebuild_cycle();
        } else {
            // Of the backends still configured.
            let kept = upstream.by_addr();
            // One the old checks found up is up under the new ones until
            // `fall` of them fail, as before: up on trust, a tuning reload
            // had `/readyz` say "first health checks under way" of a
            // replica whose every backend was serving. One they found down
            // is up on trust: its first failed check takes it down again.
            for old in &previous.backends {
                let judged_up = old.state.judged() && old.state.active_up();
                if let Some(backend) = kept.get(&old.addr).filter(|_| judged_up) {
                    backend.state.set_judged();
                }
            }
            let down = previous
                .backends
                .iter()
                .filter(|b| !b.state.active_up() && kept.contains_key(&b.addr))
                .count();
            // Said when it readmits someone: a backend known down takes
            // traffic again until its checks find it so (review36a L4).
            if down > 0 {
                let until = if upstream.config.health.is_some() {
                    "until the new checks judge them"
                } else {
                    "(no checks any more)"
                };
                tracing::info!(
                    upstream = %upstream.config.name,
                    down,
                    "health checks changed: backends found down are tried again {until}"
                );
            }
        }
        upstream.start_checks();
        upstream
    }

    /// Stops the active checks of a generation a reload replaced or
    /// removed. They ran on while anything held it (a response streaming
    /// from one of its backends, for hours), one more checker for each
    /// reload, checking removed backends and old paths and logging them
    /// down (review35a F2); nginx's and HAProxy's old generations check
    /// nothing. Its requests still in flight end as they would.
    pub fn stop_checks(&self) {
        drop(
            self.checker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }

    /// Starts the active checks, if configured.
    fn start_checks(self: &Arc<Self>) {
        if let Some(check) = self.config.health.clone() {
            let task = tokio::spawn(check_loop(Arc::downgrade(self), check));
            *self.checker.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(crate::task::AbortOnDrop::new(task));
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backends by address (an upstream lists an address once), for a
    /// reload to find each one's predecessor in one lookup rather than a
    /// scan: an upstream of thousands of backends made that quadratic.
    fn by_addr(&self) -> HashMap<SocketAddr, &Backend> {
        self.backends.iter().map(|b| (b.addr, b)).collect()
    }

    /// Every backend's health, in config order: the one accessor metrics and
    /// the admin status read.
    pub fn status(&self) -> Vec<BackendStatus> {
        let now = self.clock.now_ms();
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                // `judged` first: its verdict's state is then in `active_up`.
                let (judged, active_up) = (b.state.judged(), b.state.active_up());
                BackendStatus {
                    addr: b.addr,
                    weight: b.weight,
                    up: b.state.eligible(now),
                    active_up,
                    ejected: b.state.ejected(now),
                    drained: b.drained(),
                    in_flight: b.state.in_flight(),
                    max_conns: b.max_conns(),
                    backup: b.backup,
                    // Of one that takes traffic: not drained, down (review45d
                    // L2) nor ejected (review45f L2); it warms again when it
                    // is back.
                    warming: Some(b.state.warmth(now))
                        .filter(|&w| w < 1.0 && !b.drained() && b.state.eligible(now))
                        .map(|w| (w * 100.0) as u8),
                    idle_connections: self.pool.idle_count(i),
                    unchecked: self.config.health.is_some() && !judged && active_up,
                }
            })
            .collect()
    }

    /// The round-robin cycle, of the primary backends up by the active
    /// checks (backups are picked by weight alone, see [`Upstream::pick`]).
    fn rebuild_cycle(&self) {
        let candidates: Vec<Candidate> = self
            .backends
            .iter()
            .map(|b| Candidate::warm(b.state.active_up() && !b.backup, b.weight, 0))
            .collect();
        self.cycle
            .store(Arc::new(select::weighted_cycle(&candidates)));
    }

    /// Backend `i` as a pick sees it: eligible when of the pass's kind
    /// (primary or backup), not `tried` and up, by the active checks and
    /// passive health both, or by the active checks alone when the pass
    /// takes the `ejected` too, and below its `max_conns`; one that would
    /// be but for its `max_conns` sets `full`. (Drained ones are passed
    /// over by the selection itself, for its weight.) One warming up
    /// (`slow_start`) is passed over when the look's draw says so, which
    /// sets `cooled`.
    fn candidate(&self, i: usize, look: &Look<'_>, tried: Tried) -> Candidate {
        let b = &self.backends[i];
        let up = if look.pass.ejected {
            b.state.active_up()
        } else {
            b.state.eligible(look.now)
        };
        let in_flight = b.state.in_flight();
        let wanted = up && b.backup == look.pass.backup && !tried.contains(i);
        let room = in_flight < b.state.max_conns();
        if wanted && !room && !b.drained() {
            look.full.set(true);
        }
        let warmth = if self.warming {
            b.state.warmth(look.now)
        } else {
            1.0
        };
        let passed_over = warmth < 1.0
            && look
                .draw
                .is_some_and(|draw| !select::admits(draw, b.seed, warmth));
        if wanted && room && passed_over {
            look.cooled.set(true);
        }
        Candidate {
            eligible: wanted && room && !passed_over,
            weight: b.weight,
            in_flight,
            warmth,
        }
    }

    /// The backend for the next attempt of a request that has `tried`
    /// these backends (none, for its first attempt). A first attempt takes
    /// the next turn of the rotation; a retry takes one off it, so it does
    /// not shift which backend the next request goes to (see
    /// [`select::Turns`]), and goes to a backend not tried yet when one is
    /// up; failing that, a tried one that is up again (a keep-alive
    /// connection the backend closed as it was reused is the usual cause,
    /// and a new one may well work).
    ///
    /// Backups take a request only when no primary backend is healthy
    /// (each down, ejected or drained), as nginx's and HAProxy's `backup`
    /// servers; a retry goes to a primary it has not tried while one is
    /// healthy, then to a backup it has not tried (unless an untried
    /// primary is only full), then to a primary tried before.
    ///
    /// When every backend is out, the ones only passively ejected take
    /// traffic again, primaries first: those failures may be over, and
    /// without them every request would get a 503 until a backoff ran out
    /// (nginx marks all its peers live again then, Envoy routes to all
    /// hosts below its panic threshold); a success ends a backend's
    /// ejection at once. `NoneUp` only when no backend is up by the active
    /// checks, or every one that is is drained.
    ///
    /// Backends at their `max_conns` are passed over. When every one that
    /// is healthy is, the pick is `Full` (the request waits for room, see
    /// [`Upstream::wait_for_room`]): neither backups nor ejected backends
    /// are a spill-over for a busy upstream.
    ///
    /// With `balance = "hash"`, a request with a `key` goes to the
    /// backend that key ranks first among those that can take it (see
    /// [`select::rendezvous`]), a retry to the first of those not tried;
    /// one without is balanced round-robin.
    pub fn pick(&self, tried: Tried, key: Option<u64>) -> Result<usize, Unpicked> {
        let now = self.clock.now_ms();
        // One turn for every pass: taking one each would make the later
        // ones land on the same parity every time (one backend of two).
        // None for a hashed request with its key, which uses none: taken,
        // keyed and keyless requests in turn left the keyless ones every
        // other turn, all on one backend of two (review45b M1).
        let turn = match key {
            Some(_) => Turn::Off(0),
            None => self.turns.take(tried),
        };
        let full = Cell::new(false);
        let retry = !tried.is_empty();
        // Backends warming up (`slow_start`) are passed over for a share
        // of the picks, by a draw made once for the pick, so that each
        // look at a backend within it agrees; a hashed request's key
        // weighs them instead (see `Candidate::warmth`).
        let draw = (self.warming && key.is_none()).then(|| fastrand::u64(..));
        let cooled = Cell::new(false);
        let at = |pass, tried| {
            let at = |draw| {
                let look = Look {
                    now,
                    pass,
                    full: &full,
                    draw,
                    cooled: &cooled,
                };
                self.choose(turn, pass, key, |i| self.candidate(i, &look, tried))
            };
            // With only warming backends passed over, one of them: a
            // warm-up never turns a request away.
            cooled.set(false);
            at(draw).or_else(|| cooled.get().then(|| at(None)).flatten())
        };
        let pass = |pass: Pass| {
            at(pass, tried).or_else(|| {
                if !retry {
                    return None;
                }
                // Every primary up has failed this request: a backup it
                // has not tried before any of them, as nginx passes a
                // request its primaries failed to a backup (lb53 M1: two
                // primaries that reset it were each tried twice, the
                // backup up beside them never, until they were ejected).
                // Not when an untried primary is only busy: backups take
                // no overflow (review57 M1). A backup found full here
                // leaves the search to the backups' own pass, which may
                // go to one tried already (review57 M2). Under panic
                // routing too, among the ejected (review57 L2).
                if self.backups && !pass.backup && !full.get() {
                    if let Some(backup) = at(
                        Pass {
                            backup: true,
                            ..pass
                        },
                        tried,
                    ) {
                        return Some(backup);
                    }
                    full.set(false);
                }
                at(pass, Tried::NONE)
            })
        };
        let passes = if self.backups {
            &Pass::WITH_BACKUPS[..]
        } else {
            &Pass::PRIMARIES[..]
        };
        // A pass that found backends up, all full, ends the search.
        let picked = passes
            .iter()
            .take_while(|_| !full.get())
            .find_map(|&p| pass(p));
        picked.ok_or(if full.get() {
            Unpicked::Full
        } else {
            Unpicked::NoneUp
        })
    }

    /// [`Upstream::pick`], and a slot taken on the backend picked. A
    /// slot taken meanwhile by another request makes it pick again; every
    /// such loss is another request's progress, so after one for each
    /// backend the upstream counts as full.
    pub fn take(&self, tried: Tried, key: Option<u64>) -> Result<(usize, InFlight), Unpicked> {
        for _ in 0..=self.backends.len() {
            let index = self.pick(tried, key)?;
            if let Some(slot) = self.backends[index].take_slot() {
                return Ok((index, slot));
            }
        }
        Err(Unpicked::Full)
    }

    /// A first attempt's backend and slot: [`Upstream::take`], unless
    /// requests of this generation already wait for room (they go first:
    /// `Full`). Not for requests a previous generation left waiting alone:
    /// they cannot see the backends a reload added, and a request held
    /// behind them waited for nothing (review44c M2). An upstream without
    /// a `max_conns` has no line.
    pub fn take_first(&self, key: Option<u64>) -> Result<(usize, InFlight), Unpicked> {
        if self.capped && self.queue.busy_for(self.generation) {
            return Err(Unpicked::Full);
        }
        self.take(Tried::NONE, key)
    }

    /// For a first attempt that found every backend at its `max_conns`,
    /// or others waiting already: a place in line until a backend has
    /// room, at most `queue_timeout`. The error is the request's answer:
    /// 503 when none is up, or none had room in time.
    pub async fn wait_for_room(&self, key: Option<u64>) -> Result<(usize, InFlight), ProxyError> {
        let timeout = self.config.queue_timeout;
        let waited = if timeout.is_zero() {
            None
        } else {
            let take = || match self.take(Tried::NONE, key) {
                Ok(taken) => Some(Ok(taken)),
                Err(Unpicked::NoneUp) => Some(Err(self.none_to_pick())),
                Err(Unpicked::Full) => None,
            };
            let backends = self.addrs.clone();
            self.queue
                .wait(self.generation, backends, timeout, take, || self.room())
                .await
        };
        waited.unwrap_or_else(|| {
            self.rejected.inc();
            Err(ProxyError::Full { waited: timeout })
        })
    }

    /// Requests waiting for room now (see [`Upstream::wait_for_room`]),
    /// those a reload left waiting in earlier generations included.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether a backend would be picked now, without taking it (nor a
    /// turn of the rotation): a healthy primary if any is, else a healthy
    /// backup.
    fn room(&self) -> Room {
        let now = self.clock.now_ms();
        let (full, cooled) = (Cell::new(false), Cell::new(false));
        for pass in [Pass::PRIMARY, Pass::BACKUP] {
            let look = Look {
                now,
                pass,
                full: &full,
                draw: None,
                cooled: &cooled,
            };
            let room = (0..self.backends.len()).any(|i| {
                let c = self.candidate(i, &look, Tried::NONE);
                c.eligible && c.weight > 0
            });
            if room {
                return Room::Free;
            }
            if full.get() {
                return Room::Full;
            }
        }
        Room::NoneHealthy
    }

    /// Counts an attempt sent to an ejected backend, which [`Upstream::pick`]
    /// chooses only when every one is ejected, and says so once every
    /// [`UNAVAILABLE_SAID`] seconds: `portico_backend_up` shows each at
    /// 0 meanwhile, though they take the traffic (review42d F1). Counted
    /// as the attempt goes out, not as it is picked: a retry may pick
    /// and send nothing (review42e M1).
    fn panicked(&self) {
        self.panic.inc();
        self.say_every(
            &self.panicking,
            "every backend is ejected: requests go to them all the same until one answers (panic routing)",
        );
    }

    /// Whether some backend takes requests at `now`: up, not ejected,
    /// not drained; a primary, when `primaries`.
    fn any_eligible(&self, now: u64, primaries: bool) -> bool {
        self.backends
            .iter()
            .filter(|b| !(primaries && b.backup))
            .any(|b| !b.drained() && b.state.eligible(now))
    }

    /// Says, once every [`UNAVAILABLE_SAID`] seconds, that requests go
    /// to the backups, picked only when no primary can take them
    /// (HAProxy's "running on backup"; review44c L1: only each primary's
    /// `backend down` said so).
    fn on_backups(&self) {
        self.say_every(
            &self.backing_up,
            "no primary backend can take requests (down, ejected or drained): they go to the backups",
        );
    }

    /// Warns `what` of this upstream, a state rather than an event: at
    /// most once every [`UNAVAILABLE_SAID`] seconds through `said`, with
    /// how many times it went unsaid since (`held_back`).
    fn say_every(&self, said: &crate::logging::Every, what: &str) {
        if let Some(held_back) = said.due(UNAVAILABLE_SAID) {
            let held_back = (held_back > 0).then_some(held_back);
            tracing::warn!(upstream = %self.config.name, held_back, "{what}");
        }
    }

    /// An attempt is going out to backend `index` (picked, and its retry,
    /// if it is one, granted): it may be the probe of an ejected backend
    /// (see [`BackendState::sending`]). Returns the backend's epoch for
    /// [`Upstream::answered`] and [`Upstream::observe`].
    pub fn sending(&self, index: usize) -> u32 {
        let backend = &self.backends[index];
        // Not for a retry sent to a backup because the primaries failed
        // it: they can take requests (review57 L1: said they could not).
        if backend.backup && !self.any_eligible(self.clock.now_ms(), true) {
            self.on_backups();
        }
        let state = &backend.state;
        // The clock is read only for a backend that may need a probe.
        if state.in_ejection() {
            let now = self.clock.now_ms();
            // Still out (not yet due for its probe, or held out while
            // another attempt probes it): picked for want of any other,
            // unless it was picked before it went out while another
            // takes traffic (review43g L2: "every backend is ejected"
            // said beside a healthy one serving everything).
            if state.ejected(now) && !self.any_eligible(now, false) {
                self.panicked();
            }
            state.sending(now);
        }
        state.epoch()
    }

    /// The balancer's choice among `candidate`s at `turn`, or for `key`.
    fn choose(
        &self,
        turn: Turn,
        pass: Pass,
        key: Option<u64>,
        candidate: impl Fn(usize) -> Candidate,
    ) -> Option<usize> {
        let n = self.backends.len();
        match (&self.config.balance, key) {
            (Balance::Hash(_), Some(key)) => {
                select::rendezvous(n, key, |i| self.backends[i].seed, candidate)
            }
            // A hashed request without its key goes round-robin.
            //
            // Backups are out of the cycle: by weight, at turns of their
            // own. At the rotation's off-turns, after the primaries' pass
            // had taken one, they got every other turn, and two backups
            // of one weight split 40 requests 40/0 (review44c M1).
            // A turn is taken only by a look that picks one: taken by the
            // backups' pass that found none up, then by the ejected
            // backups' pass, every request took two, and under panic
            // routing all went to one backup of two (review58 L7).
            (Balance::RoundRobin | Balance::Hash(_), _) if pass.backup => {
                use std::sync::atomic::Ordering::Relaxed;
                let turn = self.backup_turns.fetch_add(1, Relaxed);
                let picked = select::by_weight(n, turn, candidate);
                if picked.is_none() {
                    self.backup_turns.fetch_sub(1, Relaxed);
                }
                picked
            }
            // Passively ejected backends stay in the cycle (ejection is
            // short); `round_robin` shares their turns by weight.
            (Balance::RoundRobin | Balance::Hash(_), _) => {
                select::round_robin(&self.cycle.load(), turn, &self.turns, n, candidate)
            }
            (Balance::LeastConn, _) => select::least_conn(n, turn.number(), candidate),
            (Balance::RandomTwo, _) => {
                select::random_two(n, fastrand::u64(..), fastrand::u64(..), candidate)
            }
        }
    }

    /// The key of a request for `uri` with `headers` under `balance =
    /// "hash"` (see [`Upstream::pick`]), `client` as for
    /// [`hash::request_key`]; `None` under the other balance modes. Read
    /// from a client's request as it came, before portico adds its hop
    /// (`Via`, `X-Forwarded-*`) and removes hop-by-hop fields (review45a
    /// L1: `header:Via` put every request on one backend), for the
    /// request, and those made from it (a cache fill, a revalidation, a
    /// background refresh), to carry to the pick (see
    /// [`Upstream::key_for`]).
    pub fn keyed(
        &self,
        uri: &Uri,
        headers: &http::HeaderMap,
        client: Option<std::net::IpAddr>,
    ) -> Option<Keyed> {
        match &self.config.balance {
            Balance::Hash(key) => Some(Keyed(hash::request_key(key, uri, headers, client))),
            _ => None,
        }
    }

    /// The key the picks for a request going to a backend go by: the one
    /// it carries ([`Upstream::keyed`]), else read from it as it goes. One
    /// without is counted as it goes round-robin: not a cache hit, which
    /// goes nowhere (review45c L1).
    pub fn key_for(
        &self,
        parts: &http::request::Parts,
        client: Option<std::net::IpAddr>,
    ) -> Option<u64> {
        let keyless = self.keyless.as_ref()?;
        let key = match parts.extensions.get::<Keyed>() {
            Some(keyed) => keyed.0,
            None => self.keyed(&parts.uri, &parts.headers, client)?.0,
        };
        if key.is_none() {
            keyless.inc();
        }
        key
    }

    /// Whether picking needs the client's address (`hash_key =
    /// "client_ip"`), which a request works out only when something needs
    /// it.
    pub fn hashes_client(&self) -> bool {
        self.config.balance == Balance::Hash(config::HashKey::ClientIp)
    }

    /// Whether picking reads the request's `name` field (`hash_key =
    /// "header:NAME"`).
    pub fn hashes_header(&self, name: &http::HeaderName) -> bool {
        matches!(&self.config.balance, Balance::Hash(config::HashKey::Header(key)) if key == name)
    }

    /// Why there is no backend to pick: every one drained (the operator's
    /// doing, worth saying so) or none healthy.
    pub fn none_to_pick(&self) -> ProxyError {
        if self.backends.iter().all(Backend::drained) {
            ProxyError::AllDrained
        } else {
            ProxyError::NoHealthyBackend
        }
    }

    /// The backend at `addr`, if this upstream has one.
    pub fn backend_at(&self, addr: SocketAddr) -> Option<&Backend> {
        self.backends.iter().find(|b| b.addr == addr)
    }

    pub fn backend(&self, index: usize) -> &Backend {
        &self.backends[index]
    }

    /// Counts a first attempt towards the retry budget.
    pub fn record_request(&self) {
        self.budget.record_request(self.clock.now_ms() / 1000);
    }

    /// Takes a retry from the budget if there is room, and counts it, or
    /// that the budget refused it. A retry of an attempt that sent nothing
    /// (the connection was refused or never made) is not taken from the
    /// budget: the budget keeps retries from multiplying the work of
    /// backends in trouble, and that attempt gave a backend none. nginx
    /// always retries such an attempt.
    pub fn try_retry(&self, nothing_sent: bool) -> bool {
        let granted = nothing_sent || self.budget.try_retry(self.clock.now_ms() / 1000);
        if granted {
            self.retries.sent.inc();
        } else {
            self.retries.refused.inc();
        }
        granted
    }

    /// Records the outcome of a request sent to backend `index` under
    /// `epoch` ([`BackendState::epoch`]) for passive health (see
    /// [`BackendState::observe`]).
    pub fn observe(&self, index: usize, ok: bool, epoch: u32) {
        self.backends[index].state.observe(ok, epoch);
    }

    /// A request sent to backend `index` under `epoch` got its head (see
    /// [`BackendState::answered`]); returns the epoch to judge its end
    /// under.
    pub fn answered(&self, index: usize, epoch: u32) -> u32 {
        self.backends[index].state.answered(epoch)
    }

    /// Sends `request` (path and headers already prepared) to backend
    /// `index`, on a new connection when `fresh`, and waits for the
    /// response head within `response_timeout`. Not an `async fn`, for the
    /// reason `Proxy::handle` gives: the head is prepared before the future
    /// is made, and the future holds the request once.
    #[inline(always)]
    pub fn send(
        &self,
        index: usize,
        mut request: Request<RequestBody>,
        fresh: bool,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + '_ {
        let backend = &self.backends[index];
        // Backends get the origin form (`/path?query`), whatever form the
        // client used (HTTP/2 and absolute-form targets carry more).
        if request.uri().scheme().is_some() || request.uri().authority().is_some() {
            let path = request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *request.uri_mut() = Uri::from(path);
        }
        if !request.headers().contains_key(header::HOST) {
            let host = http::HeaderValue::from_str(backend.authority.as_str())
                .expect("an authority is a valid header value");
            request.headers_mut().insert(header::HOST, host);
        }
        // Backends speak HTTP/1.1 whatever the client used.
        *request.version_mut() = http::Version::HTTP_11;
        // hyper sends a GET or HEAD body of unknown length (chunked, or
        // HTTP/2 without a length) as no body at all, assuming there is
        // none: say it is chunked, or the client's body is dropped unseen.
        if !http_body::Body::is_end_stream(request.body())
            && matches!(*request.method(), Method::GET | Method::HEAD)
            && http_body::Body::size_hint(request.body()).exact().is_none()
        {
            request.headers_mut().insert(
                header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }

        let addr = backend.addr;
        // The protocols a client offers to switch to: a 101 must be to one.
        let offered = request.headers().get(header::UPGRADE).cloned();
        let upgrade_asked = offered.is_some();
        let timeout = self.config.response_timeout;
        let stall = self.config.body_timeout;
        async move {
            let bodiless = http_body::Body::is_end_stream(request.body());
            let answer = if bodiless && !upgrade_asked {
                // The connection's task keeps the timeout (pool::HeadWait).
                match self.pool.send(index, request, fresh, false, true).await {
                    Err(SendError::HeadTimeout) => Err(Late::Head),
                    sent => Ok(sent),
                }
            } else if bodiless {
                // Boxed, as below: only upgrades take this path. A
                // connection run for one has no head watch of its own.
                Box::pin(tokio::time::timeout(
                    timeout,
                    self.pool.send(index, request, fresh, true, false),
                ))
                .await
                .map_err(|_| Late::Head)
            } else {
                let ended = request.body_mut().end_marker();
                // Boxed: only uploads take this path, and inline it would
                // grow every request's future (cache hits included).
                let answer = Box::pin(after_upload(
                    timeout,
                    stall,
                    &ended,
                    self.pool.send(index, request, fresh, upgrade_asked, false),
                ))
                .await;
                if let Err(Late::Upload) = answer {
                    ended.give_up();
                }
                answer
            };
            match answer {
                Err(Late::Head) => Err(ProxyError::ResponseTimeout {
                    backend: addr,
                    after: self.config.response_timeout,
                }),
                Err(Late::Upload) => Err(ProxyError::UploadStalled { backend: addr }),
                Ok(Ok(response)) => match unrelayable(&response, offered.as_ref()) {
                    // Dropping the response closes the connection.
                    Some(reason) => Err(ProxyError::BadResponse {
                        backend: addr,
                        reason,
                    }),
                    None => Ok(response),
                },
                Ok(Err(e)) => Err(classify(addr, e, self.config.response_timeout)),
            }
        }
    }

    /// One active check of backend `index`: 2xx or 3xx within `timeout`,
    /// on a connection of its own (see [`Pool::probe`]).
    async fn check(&self, index: usize, check: &config::HealthCheck) -> Result<(), CheckError> {
        use CheckError::{Failed, Unjudged};
        let backend = &self.backends[index];
        let mut request = Request::new(RequestBody::empty());
        *request.method_mut() = Method::GET;
        *request.uri_mut() =
            Uri::try_from(check.path.as_str()).map_err(|e| Failed(e.to_string()))?;
        let host = match &self.check_host {
            Some(host) => Ok(host.clone()),
            None => http::HeaderValue::from_str(backend.authority.as_str()),
        };
        if let Ok(host) = host {
            request.headers_mut().insert(http::header::HOST, host);
        }
        request.headers_mut().insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("portico-health-check"),
        );
        request.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        let status =
            match tokio::time::timeout(check.timeout, self.pool.probe(index, request)).await {
                Err(_) => return Err(Failed(format!("no answer within {:?}", check.timeout))),
                Ok(Err(e)) => {
                    return match classify(backend.addr, e, check.timeout) {
                        // Says nothing of the backend: the check counts
                        // neither way.
                        e @ ProxyError::Exhausted { .. } => Err(Unjudged(e.to_string())),
                        e => Err(Failed(e.to_string())),
                    };
                }
                Ok(Ok(status)) => status,
            };
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(Failed(format!("status {}", status.as_u16())))
        }
    }
}

/// Why an active check did not pass.
enum CheckError {
    /// The backend failed it: the reason.
    Failed(String),
    /// portico could not run it (out of file descriptors): it counts
    /// neither way.
    Unjudged(String),
}

/// Whether a reload leaves an upstream's active checks asking the same
/// question: the same checks, over the same TLS (its server name is the
/// checks' default Host, and a CA corrected may be what failed them).
fn same_checks(previous: &config::Upstream, next: &config::Upstream) -> bool {
    match (&previous.health, &next.health) {
        // What is asked, and how: a verdict on another path or host says
        // nothing of this one. Timing (`interval`, `timeout`, `rise`,
        // `fall`), tuned in an incident, keeps the verdicts: readmitted,
        // backends found dead took their share of traffic until found
        // dead again (review31a F2).
        // A longer timeout is excepted: "no answer within 1 s" says
        // nothing of 5 s, and raising a timeout that took every backend
        // down should bring them back at once (review31e F6).
        (Some(before), Some(after)) => {
            before.path == after.path
                && before.host == after.host
                && after.timeout <= before.timeout
                && previous.tls == next.tls
        }
        _ => false,
    }
}

/// A connection pool for `config`'s `backends`.
fn new_pool(config: &config::Upstream, backends: &[Backend]) -> Arc<Pool> {
    let mut builder = hyper::client::conn::http1::Builder::new();
    // hyper lets a backend connection's read buffer grow to ~400 KiB
    // on large bodies, and keeps it for the connection's life.
    builder.max_buf_size(UPSTREAM_READ_BUFFER);
    // The buffer's cap is checked only while a head is incomplete: a head
    // whole within the read that crossed it passed, up to ~110 KiB. This
    // is checked on every head (and on chunked trailers).
    builder.max_header_size(UPSTREAM_READ_BUFFER);
    // RFC 9112 §5.1: a proxy MUST remove whitespace between a response
    // field's name and its colon before forwarding; refused, `Foo :
    // bar` made the whole response a 502 (review32c F7). Requests
    // with it are still refused (400), as the RFC requires.
    builder.allow_spaces_after_header_name_in_responses(true);
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let targets = backends
        .iter()
        .map(|b| {
            Uri::try_from(format!("{scheme}://{}/", b.authority))
                .expect("a scheme and a socket address make a valid URI")
        })
        .collect();
    let opened = backends
        .iter()
        .map(|b| b.metrics.connections_opened.clone())
        .collect();
    Pool::new(tls::connector(config), builder, targets, opened, config)
}

/// Whether `next` can keep `previous`'s connection pool: the same backends
/// in the same order (their weights may differ), reached the same way,
/// under the same limits and timeouts.
fn same_pool(previous: &config::Upstream, next: &config::Upstream) -> bool {
    let addrs = |u: &config::Upstream| u.backends.iter().map(|b| b.addr).collect::<Vec<_>>();
    addrs(previous) == addrs(next)
        && previous.tls == next.tls
        && previous.connect_timeout == next.connect_timeout
        && previous.response_timeout == next.response_timeout
        && previous.body_timeout == next.body_timeout
        && previous.max_idle_per_backend == next.max_idle_per_backend
        && previous.idle_timeout == next.idle_timeout
}

/// The `Host` of an upstream's active checks unless it is each backend's
/// address: `[upstream.health] host`, else `tls_server_name`, the name the
/// backends' certificates carry and so the likeliest one they serve (as a
/// client that reached `https://name/`, without a port).
fn check_host(config: &config::Upstream) -> Option<http::HeaderValue> {
    let given = config.health.as_ref()?.host.clone();
    let host = given.or_else(|| {
        let name = config.tls.as_ref()?.server_name.as_ref()?;
        // A Host puts an IPv6 address in brackets; a server name does not.
        Some(match name.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{name}]"),
            Err(_) => name.clone(),
        })
    })?;
    // Validated with the config; one built in code falls back to the address.
    http::HeaderValue::from_str(&host).ok()
}

/// The active checker of one upstream: each backend every `interval`, with
/// ±10% jitter so many portico instances do not probe in lockstep, each on
/// a timer of its own: checked together, one backend slow to answer (or a
/// host that drops SYNs) held every other's next check, and the verdict on
/// a fast failure, for up to `timeout`, which made detection up to twice
/// as slow as configured (review35a F1; HAProxy and Envoy check each server
/// apart). Holds only a weak reference so a replaced upstream's checker
/// ends with it.
async fn check_loop(upstream: Weak<Upstream>, check: config::HealthCheck) {
    let starting: Vec<Counter> = match upstream.upgrade() {
        Some(u) => u
            .backends
            .iter()
            .map(|b| match (b.state.active_up(), b.state.judged()) {
                (true, true) => Counter::starting(check.rise, check.fall, Health::Up),
                (true, false) => Counter::starting(check.rise, check.fall, Health::Up).unjudged(),
                (false, _) => Counter::starting(check.rise, check.fall, Health::Down),
            })
            .collect(),
        None => return,
    };
    // Verdicts that come together (a rack going down) make one new
    // round-robin cycle, not one each: each costs up to ~10 ms of this
    // worker (review35e M2). Picks pass over a backend down meanwhile.
    let rebuild = tokio::sync::Notify::new();
    let each = starting
        .into_iter()
        .enumerate()
        .map(|(i, counter)| check_backend(upstream.clone(), &check, i, counter, &rebuild));
    let rebuilder = async {
        loop {
            rebuild.notified().await;
            tokio::time::sleep(REBUILD_AFTER).await;
            let Some(upstream) = upstream.upgrade() else {
                return;
            };
            upstream.rebuild_cycle();
        }
    };
    tokio::select! {
        _ = futures_util::future::join_all(each) => {}
        () = rebuilder => {}
    }
}

/// How long the checker gathers verdicts before it makes the round-robin
/// cycle anew (see [`check_loop`]).
const REBUILD_AFTER: Duration = Duration::from_millis(100);

/// [`check_loop`] for backend `i`.
async fn check_backend(
    upstream: Weak<Upstream>,
    check: &config::HealthCheck,
    i: usize,
    mut counter: Counter,
    rebuild: &tokio::sync::Notify,
) {
    // A backend up on trust is checked at once, not an interval after
    // the start (or the reload that added it): within a tenth of the
    // interval, so that a start's checks do not all go out together.
    let mut first = counter.is_unjudged();
    loop {
        let jitter = match std::mem::take(&mut first) {
            true => check.interval.mul_f64(fastrand::f64() * 0.1),
            false => check.interval.mul_f64(0.9 + fastrand::f64() * 0.2),
        };
        tokio::time::sleep(jitter).await;
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        let backend = &upstream.backends[i];
        let passed = match upstream.check(i, check).await {
            Ok(()) => Ok(()),
            Err(CheckError::Failed(reason)) => Err(reason),
            Err(CheckError::Unjudged(reason)) => {
                tracing::debug!(
                    upstream = %upstream.config.name, backend = %backend.addr,
                    %reason, "health check not run"
                );
                continue;
            }
        };
        // Only the active state: a passing check leaves a passive
        // ejection and its backoff alone (see `health`).
        let transition = counter.record(passed.is_ok());
        match transition {
            Some(Health::Down) => {
                backend.state.set_active_up(false);
                tracing::warn!(
                    upstream = %upstream.config.name, backend = %backend.addr,
                    reason = %passed.err().unwrap_or_default(),
                    "backend down"
                );
            }
            Some(Health::Up) => {
                // Warming before it is up: a pick between the two saw
                // it whole (review45e L5).
                backend.state.start_warming();
                backend.state.set_active_up(true);
                let slow_start = &upstream.config.slow_start;
                let slow_start =
                    (!slow_start.is_zero()).then_some(tracing::field::debug(slow_start));
                tracing::info!(
                    upstream = %upstream.config.name, backend = %backend.addr,
                    slow_start,
                    "backend up"
                );
            }
            None => {}
        }
        // Judged once its verdict is applied: `/readyz`, which reads
        // `judged` first, never sees a judged backend still up from
        // before its first failed check (review66 L1).
        backend.state.set_judged();
        if transition.is_none() {
            continue;
        }
        rebuild.notify_one();
    }
}

/// Why a backend's response head must not reach the client, if it must not.
fn unrelayable<B>(
    response: &Response<B>,
    offered: Option<&http::HeaderValue>,
) -> Option<&'static str> {
    let status = response.status().as_u16();
    if status >= 600 {
        // RFC 9110 §15: codes outside 100-599 are invalid; a client treats
        // them as a server error, so the proxy answers one.
        return Some("a status code above 599");
    }
    if status == 101 {
        let Some(offered) = offered else {
            // RFC 9110 §15.2.2: a server switches only to what was asked for.
            return Some("101 Switching Protocols to a request without Upgrade");
        };
        let Some(switched) = response.headers().get(http::header::UPGRADE) else {
            // RFC 9110 §7.8: a 101 MUST say what it switches to; a client
            // cannot tell what it is now speaking otherwise (review32c F8).
            return Some("101 Switching Protocols without an Upgrade field");
        };
        // RFC 9110 §7.8: "A server MUST NOT switch to a protocol that was
        // not indicated by the client". A backend that switches to `h2c`
        // whatever was asked would hand the client a raw HTTP/2
        // connection behind portico's routing and hygiene, which refusing
        // to pass `h2c` on is for (review36b F2).
        if !switched_to_offered(switched, offered) {
            return Some("101 Switching Protocols to a protocol the client did not offer");
        }
    }
    if !crate::proxy::headers::relayable_coding(response.headers()) {
        return Some("a transfer coding other than chunked");
    }
    None
}

/// Whether every protocol a 101's `Upgrade` names is one the request's
/// offered (names compared without case, as RFC 9110 §7.8 registers them).
fn switched_to_offered(switched: &http::HeaderValue, offered: &http::HeaderValue) -> bool {
    let tokens = |value: &http::HeaderValue| -> Vec<String> {
        value
            .to_str()
            .unwrap_or("")
            .split(',')
            .map(|token| token.trim().to_ascii_lowercase())
            .filter(|token| !token.is_empty())
            .collect()
    };
    let offered = tokens(offered);
    let switched = tokens(switched);
    !switched.is_empty() && switched.iter().all(|token| offered.contains(token))
}

/// Which wait ran out (see [`after_upload`]).
#[derive(Debug, PartialEq, Eq)]
enum Late {
    /// No response head within `response_timeout` (of the upload's end).
    Head,
    /// The backend took nothing of the upload for `body_timeout`.
    Upload,
}

/// Waits for `answer` until `timeout` after the upload ended (`ended`),
/// like nginx's `proxy_read_timeout`, which starts once the request is
/// sent: a slow upload is bounded by `body_timeout` between its frames, and
/// a backend that reads it all before answering is not blamed for the
/// client's pace. While the upload goes on, a backend that stops reading
/// it is given `stall` (`body_timeout`, as nginx's `proxy_send_timeout`
/// bounds a write to the upstream): hyper stops taking frames once it
/// cannot write, so the body's own stall timer never ran, and an 8 MB
/// upload to a frozen backend waited as long as the backend kept its
/// socket (review32c F1).
async fn after_upload<F: Future>(
    timeout: Duration,
    stall: Duration,
    ended: &crate::proxy::body::UploadEnded,
    answer: F,
) -> Result<F::Output, Late> {
    let mut answer = std::pin::pin!(answer);
    // Looked at in quarters of `stall` and eighths of `timeout`: never
    // early, and the upload's end, which wakes nothing, is seen at most an
    // eighth of `timeout` late (a quarter of a long `body_timeout` made a
    // short `response_timeout` fire 4x late, review32e L1).
    let step = (stall / 4).min(timeout / 8).max(Duration::from_millis(10));
    let mut timer = std::pin::pin!(tokio::time::sleep(step.min(timeout)));
    let mut moved = (ended.progress().0, tokio::time::Instant::now());
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = answer.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        // Each time the timer fires it moves to `timeout` after the
        // upload's end, or a step on while the upload still runs.
        while timer.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            match ended.at() {
                Some(end) if now >= end + timeout => return Poll::Ready(Err(Late::Head)),
                Some(end) => timer.as_mut().reset(end + timeout),
                None => {
                    let (taken, awaiting_client) = ended.progress();
                    // Nothing taken yet: still connecting (bounded by
                    // `connect_timeout`, and retried on its own), as hyper
                    // takes a first frame as soon as it writes the head.
                    if taken != moved.0 || awaiting_client || taken == 0 {
                        moved = (taken, now);
                    } else if now >= moved.1 + stall {
                        return Poll::Ready(Err(Late::Upload));
                    }
                    timer.as_mut().reset(now + step);
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// Whether a client's upload failed because its connection ended (closed
/// early or reset) rather than because of what it sent.
fn client_left(error: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            );
        }
        source = e.source();
    }
    error.is_incomplete_message()
}

/// Whether opening a socket failed for want of portico's own resources:
/// file descriptors (its own or the system's) or kernel memory. nginx
/// answers such a failure 500 and does not count it against the peer;
/// counted, it took every healthy backend down at once.
#[cfg(unix)]
fn out_of_resources(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(not(unix))]
fn out_of_resources(_: &std::io::Error) -> bool {
    false
}

/// Sorts a send error into the proxy's error kinds by walking its causes.
fn classify(backend: SocketAddr, error: SendError, after: Duration) -> ProxyError {
    let reset = matches!(error, SendError::Reset(_) | SendError::Stale(_, true));
    let stale = matches!(error, SendError::Stale(..));
    let (connecting, root): (bool, &(dyn std::error::Error + 'static)) = match &error {
        SendError::Connect(e) => (true, e.as_ref()),
        SendError::Http(e) | SendError::Reset(e) | SendError::Stale(e, _) => (false, e),
        SendError::HeadTimeout => return ProxyError::ResponseTimeout { backend, after },
    };
    let mut source = Some(root);
    let mut exhausted = false;
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<BodyError>() {
            return match body {
                BodyError::TooLarge { .. } => ProxyError::BodyTooLarge,
                BodyError::Stalled(_) => ProxyError::RequestBodyTimeout,
                // The client closed its connection in the middle of its
                // upload: nginx's 499 (the log's and the metrics'; the
                // answer goes nowhere).
                BodyError::Hyper(e) if client_left(e) => ProxyError::ClientClosed,
                BodyError::Short => ProxyError::ClientClosed,
                // The client's upload broke otherwise (bad chunked
                // framing, say). (Abandoned, Lost, UploadFailed and
                // Compress are a response body's; here for completeness.)
                BodyError::Hyper(_)
                | BodyError::Abandoned
                | BodyError::Lost
                | BodyError::UploadFailed(_)
                | BodyError::Compress(_) => ProxyError::BadRequest("request body aborted"),
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut && connecting {
                return ProxyError::ConnectTimeout { backend };
            }
            if connecting && out_of_resources(io) {
                exhausted = true;
            }
            // It would most likely answer so again: not retried, as a head
            // that does not parse is not.
            if io.get_ref().is_some_and(|e| e.is::<pool::EndlessInterim>()) {
                return ProxyError::BadResponse {
                    backend,
                    reason: pool::EndlessInterim::TEXT,
                };
            }
        }
        source = e.source();
    }
    match error {
        SendError::Connect(source) if exhausted => ProxyError::Exhausted { backend, source },
        SendError::Connect(source) => ProxyError::Connect { backend, source },
        SendError::Http(source) | SendError::Reset(source) | SendError::Stale(source, _) => {
            ProxyError::Upstream {
                backend,
                source,
                reset,
                stale,
            }
        }
        // Returned above; no cause to walk.
        SendError::HeadTimeout => ProxyError::ResponseTimeout { backend, after },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_is_only_to_an_offered_protocol() {
        let value = http::HeaderValue::from_static;
        for (switched, offered, ok) in [
            ("websocket", "websocket", true),
            ("WebSocket", "websocket", true),
            ("websocket", "foo/2, websocket", true),
            ("h2c", "websocket", false),
            ("websocket, h2c", "websocket", false),
            ("", "websocket", false),
        ] {
            assert_eq!(
                switched_to_offered(&value(switched), &value(offered)),
                ok,
                "{switched} to {offered}"
            );
        }
    }

    #[test]
    fn check_host_is_the_given_one_else_the_tls_server_name() {
        let upstream = |host: Option<&str>, server_name: Option<&str>| {
            let mut upstream = config::Upstream::new("a", Vec::new());
            upstream.health = Some(config::HealthCheck {
                host: host.map(str::to_owned),
                ..config::HealthCheck::default()
            });
            upstream.tls = server_name.map(|name| config::UpstreamTls {
                server_name: Some(name.to_owned()),
                ca: None,
                ca_certs: Vec::new(),
            });
            upstream
        };
        for (host, server_name, expected) in [
            (None, None, None),
            (
                Some("status.internal:8080"),
                None,
                Some("status.internal:8080"),
            ),
            (
                Some("status.internal"),
                Some("api.internal"),
                Some("status.internal"),
            ),
            (None, Some("api.internal"), Some("api.internal")),
            (None, Some("10.0.0.7"), Some("10.0.0.7")),
            (None, Some("fd00::7"), Some("[fd00::7]")),
        ] {
            let found = check_host(&upstream(host, server_name));
            assert_eq!(
                found.as_ref().map(|h| h.to_str().unwrap()),
                expected,
                "{host:?} {server_name:?}"
            );
        }
        // No checks, no check host.
        let mut unchecked = upstream(Some("status.internal"), None);
        unchecked.health = None;
        assert_eq!(check_host(&unchecked), None);
    }

    #[test]
    fn checks_over_another_tls_name_or_ca_are_other_checks() {
        let checked = || {
            let mut upstream = config::Upstream::new("a", Vec::new());
            upstream.health = Some(config::HealthCheck::default());
            upstream
        };
        let tls = |name: &str| config::UpstreamTls {
            server_name: Some(name.to_owned()),
            ca: None,
            ca_certs: Vec::new(),
        };
        let mut named = checked();
        named.tls = Some(tls("api.internal"));
        let mut renamed = checked();
        renamed.tls = Some(tls("api2.internal"));
        let mut retuned = named.clone();
        retuned.retries = 3;
        assert!(same_checks(&named, &retuned));
        assert!(!same_checks(&named, &renamed));
        assert!(!same_checks(&checked(), &named));
        let mut unchecked = named.clone();
        unchecked.health = None;
        assert!(!same_checks(&unchecked, &unchecked.clone()));
    }

    /// A backend's failure warnings go on across a reload, as its
    /// upstream's do: each reload let a failing backend's warning be said
    /// again at once.
    #[tokio::test]
    async fn a_backend_s_warnings_go_on_across_a_reload() {
        let metrics = Metrics::new();
        let addrs = vec![
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.1:10".parse().unwrap(),
        ];
        let before = Upstream::new(config::Upstream::new("a", addrs.clone()), &metrics);
        let refused = Some(Failure::Connect);
        assert_eq!(before.backend(0).failure_said(refused, false), Some(0));
        assert_eq!(before.backend(0).failure_said(refused, false), None);
        // The list reordered: the address keeps its own.
        let reordered = config::Upstream::new("a", addrs.into_iter().rev().collect());
        let after = Upstream::rebuild(reordered, &metrics, &before);
        assert_eq!(after.backend(1).failure_said(refused, false), None);
        assert_eq!(after.backend(0).failure_said(refused, false), Some(0));
        // Each kind and each of retried or not on its own.
        assert_eq!(after.backend(1).failure_said(refused, true), Some(0));
    }
}
