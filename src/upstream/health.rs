//! Backend health: what the request path reads (lock-free atomics per
//! backend) and the two ways it changes. Active checks run one task per
//! upstream, GET `path` every `interval` (jittered) and move a backend down
//! after `fall` failures and up after `rise` successes. Passive ejection
//! watches real traffic: `fall` consecutive connect failures, broken
//! responses (heads or bodies: a request is judged when its body ends,
//! see [`InFlight::judged_at_end`]; a 101 at once) or timeouts eject a
//! backend for a backoff that doubles on each repeated ejection (1 s up to
//! 30 s). When it ends, the next request is a probe, alone: the others
//! keep away until its outcome, for at most as long as an attempt may take
//! (nginx lets one request through per `fail_timeout`). Its failure ejects
//! again, for twice as long. Its head readmits the backend, on probation
//! (see [`BackendState::answered`]): until a response ends whole or its
//! client leaves it, which clears the record, one failure ejects it again
//! for twice as long. A probe that ends with no verdict (its client left
//! before its head) frees the place for the next. Failures and successes
//! of requests sent before the probe, or before a recovery, count for
//! nothing.
//! The two are independent: a passing check neither ends an ejection nor
//! resets its backoff, as a backend may answer its health path while its
//! real traffic fails (a grey failure), and only that traffic can say it
//! works again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use super::counter::{Counter, Health};

const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);

/// Milliseconds on a monotonic clock that starts with the upstream; the
/// tokio clock, so tests can pause and advance it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        // Starts at 1 so 0 can mean "never" in the atomics below.
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One backend's live state. Every field is an atomic: the request path
/// reads and updates it without locks.
#[derive(Debug)]
pub struct BackendState {
    active_up: AtomicBool,
    /// An active check has judged it (passed or failed): until then it is
    /// up on trust, and `/readyz` does not count on it (see
    /// [`BackendState::judged`]).
    judged: AtomicBool,
    /// Its passive health, shared with the same backend of the upstream's
    /// other generations (see [`BackendState::keeping_passive`]).
    passive: Arc<PassiveRecord>,
    /// How long a probe holds the others off at most: as long as an
    /// attempt may take (`connect_timeout` + `response_timeout`).
    probe_hold_ms: u64,
    /// Requests in flight to this address and its `max_conns`, shared
    /// with the same backend of the upstream's other generations (see
    /// [`BackendState::sharing_in_flight`]).
    slots: Arc<Slots>,
    /// Its upstream's line, woken as a slot frees (see
    /// [`BackendState::queueing`]).
    queue: Option<Arc<super::queue::Queue>>,
    /// Failures that eject.
    threshold: u32,
    /// Bodies this backend cut short; `None` for states made outside an
    /// upstream (tests).
    body_errors: Option<crate::metrics::BodyErrors>,
    /// Its upstream's name and its address, for the warnings about its
    /// bodies; `None` outside an upstream (tests).
    named: Option<(Arc<str>, std::net::SocketAddr)>,
    /// Counts its passive ejections; `None` outside an upstream (tests).
    ejections_counted: Option<prometheus::IntCounter>,
    /// The only backend of its upstream: never ejected (see
    /// [`BackendState::observe`]).
    lone: bool,
    /// Its upstream's clock, for a verdict given where the upstream is
    /// not at hand (a body's end, see [`InFlight::judged_at_end`]).
    clock: Clock,
    /// Its upstream's `slow_start`, in ms (0: none), and the clock ms
    /// its warming began at (0: warm), shared with the same backend of
    /// the upstream's other generations as its passive record is; see
    /// [`BackendState::warmth`].
    slow_start_ms: u64,
    warm_from: Arc<AtomicU64>,
}

/// The share a backend takes at the very start of its `slow_start`: one
/// twentieth of its full one (HAProxy's starts near a twentieth too),
/// so that it is tried, and the share grows from there.
const COLDEST: f32 = 0.05;

/// A backend's passive health: what real traffic said of it.
#[derive(Debug, Default)]
struct PassiveRecord {
    /// Clock ms until which passive ejection holds; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Consecutive failures seen on real traffic.
    failures: AtomicU32,
    /// Consecutive ejections, for the backoff.
    ejections: AtomicU32,
    /// Moves on at each ejection and each probe, so that a failure can be
    /// told to be the probe's and not that of a request sent before.
    epoch: AtomicU32,
    /// A probe is out (for the current epoch).
    probing: AtomicBool,
}

/// A backend address's requests in flight, and how many it may have.
#[derive(Debug)]
struct Slots {
    taken: AtomicUsize,
    /// `usize::MAX`: no cap.
    max: AtomicUsize,
}

/// What a passive observation changed, for the one log line it deserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passive {
    Ejected(Duration),
    /// Its probe's head came: it takes traffic again, on probation.
    Readmitted,
    Recovered,
}

impl BackendState {
    pub fn new(threshold: u32) -> Self {
        BackendState {
            active_up: AtomicBool::new(true),
            judged: AtomicBool::new(false),
            passive: Arc::default(),
            probe_hold_ms: 32_000,
            slots: Arc::new(Slots {
                taken: AtomicUsize::new(0),
                max: AtomicUsize::new(usize::MAX),
            }),
            queue: None,
            threshold: threshold.max(1),
            body_errors: None,
            named: None,
            ejections_counted: None,
            lone: false,
            clock: Clock::new(),
            slow_start_ms: 0,
            warm_from: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Warms up over `slow_start` when it comes back (see
    /// [`BackendState::start_warming`]); zero for never.
    pub fn slow_start(mut self, slow_start: Duration) -> Self {
        self.slow_start_ms = slow_start.as_millis().min(u128::from(u64::MAX)) as u64;
        self
    }

    /// Goes on warming where `previous`, the same backend in the
    /// upstream's last generation, was (a reload does not cut a warm-up
    /// short, nor start it again), and warms with it from then on: the
    /// start is shared, so a readmission that generation's probe or
    /// requests see starts the warm-up here too (review53 M1: copied, a
    /// backend readmitted across a reload took its full share at once).
    pub fn warming_like(mut self, previous: &BackendState) -> Self {
        // Only a warm-up the previous generation has not seen through: a
        // finished one nothing read since kept its start, and a reload
        // that lengthened `slow_start` began it again (review45e L2).
        let from = previous.warm_from.load(Ordering::Relaxed);
        if from != 0 && previous.warmth(previous.clock.now_ms()) >= 1.0 {
            let _ =
                previous
                    .warm_from
                    .compare_exchange(from, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.warm_from = previous.warm_from.clone();
        self
    }

    /// It is back in rotation (up again by its checks, its ejection over,
    /// undrained or added by a reload): it takes a growing share of its
    /// requests over its `slow_start`, from [`COLDEST`], as a backend
    /// that restarted has cold caches, pools and JIT (HAProxy's
    /// `slowstart`, nginx's `slow_start`). Noted without a `slow_start`
    /// too, for a generation a reload gave one (it shares the note).
    pub fn start_warming(&self) {
        self.warm_from.store(self.clock.now_ms(), Ordering::Relaxed);
    }

    /// Its `slow_start`, for the lines that say it came back (review45d
    /// L1: only `backend up` said it warms).
    fn warms_over(&self) -> Option<tracing::field::DebugValue<Duration>> {
        (self.slow_start_ms > 0)
            .then(|| tracing::field::debug(Duration::from_millis(self.slow_start_ms)))
    }

    /// The share of its weight it takes at `now_ms`: 1 when warm, else
    /// from [`COLDEST`] up to 1 in proportion to the time since it came
    /// back over its `slow_start`. One load for a warm backend.
    pub fn warmth(&self, now_ms: u64) -> f32 {
        let from = self.warm_from.load(Ordering::Relaxed);
        if from == 0 || self.slow_start_ms == 0 {
            return 1.0;
        }
        let elapsed = now_ms.saturating_sub(from);
        if elapsed >= self.slow_start_ms {
            // Warm, by this generation's `slow_start`; the start is left
            // as it is, shared with the others: a generation a reload left
            // running with a shorter one ended the new one's longer
            // warm-up when it cleared it (review54 L4).
            return 1.0;
        }
        (elapsed as f32 / self.slow_start_ms as f32).max(COLDEST)
    }

    /// Its upstream's `clock`, and whether it is the upstream's `lone`
    /// backend.
    pub fn of_upstream(mut self, clock: Clock, lone: bool) -> Self {
        self.clock = clock;
        self.lone = lone;
        self
    }

    /// Counts its passive ejections in `ejections`.
    pub fn counting_ejections(mut self, ejections: prometheus::IntCounter) -> Self {
        self.ejections_counted = Some(ejections);
        self
    }

    /// A probe holds the others off for at most `hold`, the longest an
    /// attempt may take.
    pub fn probe_hold(mut self, hold: Duration) -> Self {
        self.probe_hold_ms = hold.as_millis().max(1) as u64;
        self
    }

    /// Names the backend in what is logged of its bodies.
    pub fn named(mut self, upstream: Arc<str>, addr: std::net::SocketAddr) -> Self {
        self.named = Some((upstream, addr));
        self
    }

    /// Counts the bodies this backend cuts short in `errors`.
    pub fn counting_body_errors(mut self, errors: crate::metrics::BodyErrors) -> Self {
        self.body_errors = Some(errors);
        self
    }

    /// Shares `previous`'s passive health, the same backend in the
    /// upstream's last generation, timed by the same clock: its ejection
    /// and back-off, and the failures seen since its last success. A
    /// reload that changed the upstream (a weight, another backend)
    /// forgot them, and readmitted a backend that passes its checks but
    /// fails real requests, at `fall` clients' cost each time, with its
    /// back-off started again at a second (review35a F3). As Envoy keeps
    /// a host's outlier state across an update that keeps the host.
    /// Shared, not copied: the requests a reload left running give their
    /// verdicts here too, and its probe's outcome ends the hold it set
    /// (review52 M2: copied, their failures went to a record nothing read
    /// any more, and a controller reloading more often than
    /// `response_timeout` kept a hanging backend in rotation for good).
    pub fn keeping_passive(mut self, previous: &BackendState) -> Self {
        self.passive = previous.passive.clone();
        self
    }

    /// Counts its requests in flight together with `previous`, the same
    /// address in the generation a reload replaces: requests started there
    /// still load the backend, and each one that ends there is one fewer
    /// here. The cap is shared too (see [`BackendState::with_max_conns`]),
    /// so a reload that lowers it holds the requests still waiting in line
    /// on the previous generation to it (review44a L1). Active health is
    /// each generation's own (its checks); passive health is shared (see
    /// [`BackendState::keeping_passive`]).
    pub fn sharing_in_flight(mut self, previous: &BackendState) -> Self {
        self.slots = previous.slots.clone();
        self
    }

    /// Its `max_conns` (0: none), for every generation sharing its count:
    /// set after [`BackendState::sharing_in_flight`].
    pub fn with_max_conns(self, max: u32) -> Self {
        let max = match max {
            0 => usize::MAX,
            n => n as usize,
        };
        self.slots.max.store(max, Ordering::Relaxed);
        self
    }

    /// Wakes `queue`'s first request as a slot frees with room left under
    /// the cap: a request may be waiting for it.
    pub fn queueing(mut self, queue: Arc<super::queue::Queue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// May take traffic now: up by the active checks, not ejected.
    pub fn eligible(&self, now_ms: u64) -> bool {
        self.active_up.load(Ordering::Relaxed)
            && self.passive.ejected_until.load(Ordering::Relaxed) <= now_ms
    }

    pub fn active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    pub fn set_active_up(&self, up: bool) {
        self.active_up.store(up, Ordering::Relaxed);
    }

    /// Whether an active check has given a verdict on it yet, in this
    /// generation or (under the same checks) an earlier one: a backend
    /// starts up on trust, as in nginx and HAProxy, and its first failed
    /// check takes it down at once (see `Counter::unjudged`).
    pub fn judged(&self) -> bool {
        self.judged.load(Ordering::Acquire)
    }

    /// Set once the verdict is applied: one who reads it set sees the
    /// active state that verdict left.
    pub fn set_judged(&self) {
        self.judged.store(true, Ordering::Release);
    }

    pub fn ejected(&self, now_ms: u64) -> bool {
        self.passive.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    // SeqCst on the count, for the line's wake-ups (see
    // `Queue::released`); on x86 the same instructions as Relaxed.
    pub fn in_flight(&self) -> usize {
        self.slots.taken.load(Ordering::SeqCst)
    }

    /// Its `max_conns`; `usize::MAX` for none.
    pub fn max_conns(&self) -> usize {
        self.slots.max.load(Ordering::Relaxed)
    }

    pub fn start_request(&self) {
        self.slots.taken.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes an in-flight slot if it is below its `max_conns`.
    pub fn start_request_within(&self) -> bool {
        let max = self.max_conns();
        self.slots
            .taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn end_request(&self) {
        let before = self.slots.taken.fetch_sub(1, Ordering::SeqCst);
        // Only a slot under the cap is room: one above it (a reload
        // lowered the cap) would wake the first in line for nothing.
        if before <= self.max_conns() {
            if let (Some(queue), Some((_, addr))) = (&self.queue, &self.named) {
                queue.released(*addr);
            }
        }
    }

    /// Records the outcome of a request sent under `epoch` for passive
    /// health, with the one log line an ejection or a recovery deserves:
    /// its failure, or its success (its body ended whole, or its client
    /// left it; a 101 at once). A lone backend is never ejected (as in
    /// nginx): with nowhere else to go, ejection would only turn its
    /// errors into 503s. Active checks still apply.
    pub fn observe(&self, ok: bool, epoch: u32) {
        if self.lone {
            return;
        }
        let change = if ok {
            self.record_success(epoch)
        } else {
            self.record_failure(self.clock.now_ms(), epoch)
        };
        self.say(change);
    }

    /// A request sent under `epoch` got its head. A backend out whose
    /// probe this is takes traffic again at once, so that a long body (a
    /// download, a stream) does not hold its return back; but on
    /// probation: its backoff is kept until a response ends whole or its
    /// client leaves it, and one failure before that ejects it again, for
    /// twice as long. A backend that sends every head and breaks every
    /// body was readmitted by each probe's head with its backoff reset, so
    /// it was out a second at a time (review43a H1). A head of a request
    /// sent before the ejection readmits nothing: it undid ejections
    /// within milliseconds under concurrency (review43a H2).
    ///
    /// Returns the epoch to judge the request's end under (see
    /// [`InFlight::judged_at_end`]).
    pub fn answered(&self, epoch: u32) -> u32 {
        // Cheap reads first: the common case changes nothing.
        if !self.in_ejection() || self.lone || epoch != self.epoch() {
            return epoch;
        }
        // Only a probe's head: with every backend ejected, each request
        // panic routing sent readmitted its backend and each broken body
        // ejected it again, two log lines a request (review43e M1). Such
        // a request's whole body still ends the ejection (see
        // `record_success`). Requests sent before now end on evidence
        // older than this.
        if !self.passive.probing.load(Ordering::Relaxed) || !self.claim(epoch) {
            return epoch;
        }
        // Warming before it is back: a pick between saw it whole
        // (review45f L3).
        self.start_warming();
        self.passive.ejected_until.store(0, Ordering::Relaxed);
        self.passive.probing.store(false, Ordering::Relaxed);
        self.passive.failures.store(0, Ordering::Relaxed);
        self.say(Some(Passive::Readmitted));
        epoch.wrapping_add(1)
    }

    /// Takes the verdict of `epoch`, the current one: moves the epoch on,
    /// so that no other request of it gives a verdict beside this one.
    /// Two failures at once both ejected (the backoff went 4 times as
    /// long, counted and said twice), and a failure beside a probe's head
    /// was said to eject a backend the head readmitted (review43f M1).
    fn claim(&self, epoch: u32) -> bool {
        self.passive
            .epoch
            .compare_exchange(
                epoch,
                epoch.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// The log line (and count) a passive `change` deserves.
    fn say(&self, change: Option<Passive>) {
        // Named only when there is something to say: a success that
        // changes nothing is every request's.
        let Some(change) = change else {
            return;
        };
        let named = self.named.as_ref();
        let upstream = named.map(|(upstream, _)| tracing::field::display(upstream));
        let backend = named.map(|(_, addr)| tracing::field::display(addr));
        match change {
            Passive::Ejected(backoff) => {
                if let Some(ejections) = &self.ejections_counted {
                    ejections.inc();
                }
                tracing::warn!(
                    upstream,
                    backend,
                    ?backoff,
                    "backend ejected: consecutive failures on live traffic"
                )
            }
            Passive::Readmitted => tracing::info!(
                upstream,
                backend,
                slow_start = self.warms_over(),
                "backend readmitted: its probe was answered (on probation until a response ends whole)"
            ),
            Passive::Recovered => tracing::info!(
                upstream,
                backend,
                slow_start = self.warms_over(),
                "backend recovered: request succeeded after ejection"
            ),
        }
    }

    /// A request on live traffic, sent under `epoch`, succeeded (never an
    /// active check: see the module's doc): its failures are forgotten,
    /// and so is its backoff. `Recovered` when it was out until now (not
    /// merely on probation, whose readmission said so). A success of a
    /// request sent before an ejection or a recovery counts for nothing,
    /// as its failure would.
    pub fn record_success(&self, epoch: u32) -> Option<Passive> {
        // Cheap read first: the common case changes nothing and writes no
        // shared cache line.
        if self.passive.failures.load(Ordering::Relaxed) == 0 && !self.in_ejection() {
            return None;
        }
        if epoch != self.epoch() {
            return None;
        }
        if !self.in_ejection() {
            self.passive.failures.store(0, Ordering::Relaxed);
            return None;
        }
        // Requests sent before now fail on evidence older than this.
        if !self.claim(epoch) {
            return None;
        }
        self.passive.failures.store(0, Ordering::Relaxed);
        // Out until now, not on probation (whose readmission began its
        // warm-up): warming before it is back (review45f L3).
        if self.passive.ejected_until.load(Ordering::Relaxed) != 0 {
            self.start_warming();
        }
        let was_out = self.passive.ejected_until.swap(0, Ordering::Relaxed) != 0;
        self.passive.probing.store(false, Ordering::Relaxed);
        self.passive.ejections.store(0, Ordering::Relaxed);
        was_out.then_some(Passive::Recovered)
    }

    /// The epoch a request sent now is sent under, for
    /// [`BackendState::record_failure`]: read right after the pick that
    /// may have made it the probe.
    pub fn epoch(&self) -> u32 {
        self.passive.epoch.load(Ordering::Relaxed)
    }

    /// An attempt is going out to this backend (chosen, and sure to be
    /// sent). Once its backoff is over, the first is the probe: the
    /// backend is held out again until the probe's outcome, for at most
    /// `probe_hold`. An attempt while the backend is still ejected (every
    /// backend is, see `Upstream::pick`) probes nothing.
    pub fn sending(&self, now_ms: u64) {
        if !self.in_ejection() {
            return;
        }
        let epoch = self.epoch();
        let until = self.passive.ejected_until.load(Ordering::Relaxed);
        // 0: a success cleared the ejection as this looked.
        if until == 0 || until > now_ms || !self.claim(epoch) {
            return;
        }
        // Not over a success that cleared the ejection between the two
        // reads above and the claim: a plain store left a healthy backend
        // held out, with no ejection on record to end it (review43g L1).
        let hold = now_ms + self.probe_hold_ms;
        let held = self.passive.ejected_until.compare_exchange(
            until,
            hold,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if held.is_ok() {
            self.passive.probing.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the backend has been ejected since its last success: out,
    /// or readmitted on probation (see [`BackendState::answered`]).
    pub fn in_ejection(&self) -> bool {
        self.passive.ejections.load(Ordering::Relaxed) > 0
    }

    /// An attempt sent under `epoch` ended with no verdict on the backend
    /// (its client left, its upload failed): if it was the probe, the next
    /// attempt probes instead of the backend sitting out the hold.
    pub fn no_verdict(&self, epoch: u32) {
        if epoch == self.epoch() && self.passive.probing.swap(false, Ordering::Relaxed) {
            // 1: over, and still an ejection (0 is none); not if a verdict
            // readmitted the backend meanwhile (review43f L2).
            let _ = self.passive.ejected_until.fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |until| (until != 0).then_some(1),
            );
        }
    }

    /// A request sent under `epoch` failed in a way that blames the
    /// backend. Only failures of requests sent in the current epoch
    /// count: while it is ejected, the probe's (or those sent alongside
    /// it), which eject it again, for twice as long, once; on probation,
    /// any one.
    pub fn record_failure(&self, now_ms: u64, epoch: u32) -> Option<Passive> {
        if epoch != self.epoch() {
            return None;
        }
        if self.in_ejection() {
            // Out: only the probe's failure counts. On probation (see
            // `answered`): any.
            let out = self.passive.ejected_until.load(Ordering::Relaxed) != 0;
            let counts = !out || self.passive.probing.swap(false, Ordering::Relaxed);
            return if counts {
                self.eject(now_ms, epoch)
            } else {
                None
            };
        }
        let failures = self.passive.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.threshold || self.ejected(now_ms) {
            return None;
        }
        self.eject(now_ms, epoch)
    }

    /// Ejects the backend for the failure of a request sent under `epoch`,
    /// if no other verdict of that epoch came first (see `claim`).
    fn eject(&self, now_ms: u64, epoch: u32) -> Option<Passive> {
        if !self.claim(epoch) {
            return None;
        }
        let ejections = self.passive.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let backoff = backoff(ejections);
        self.passive
            .ejected_until
            .store(now_ms + backoff.as_millis() as u64, Ordering::Relaxed);
        self.passive.failures.store(0, Ordering::Relaxed);
        self.passive.probing.store(false, Ordering::Relaxed);
        Some(Passive::Ejected(backoff))
    }
}

/// How long the `ejections`th ejection in a row lasts.
fn backoff(ejections: u32) -> Duration {
    EJECT_BASE
        .saturating_mul(1u32 << ejections.saturating_sub(1).min(16))
        .min(EJECT_MAX)
}

/// Holds one in-flight slot on a backend until dropped (with the response
/// body, so least-conn sees streaming responses as busy).
#[derive(Debug)]
pub struct InFlight {
    state: Arc<BackendState>,
    /// The client's upload, when the backend answered before its end: a
    /// body cut short is not the backend's doing if that upload failed, as
    /// hyper ends the backend connection (and so the body) with it.
    upload: Option<crate::proxy::body::UploadWatch>,
    /// The epoch the request was sent under, while its success waits for
    /// the end of its body (see [`InFlight::judged_at_end`]).
    verdict: Option<u32>,
}

impl InFlight {
    pub fn new(state: Arc<BackendState>) -> Self {
        state.start_request();
        Self::taken(state)
    }

    /// For a slot already taken (see [`BackendState::start_request_within`]).
    pub fn taken(state: Arc<BackendState>) -> Self {
        InFlight {
            state,
            upload: None,
            verdict: None,
        }
    }

    /// The request, answered under `epoch` (see
    /// [`BackendState::answered`]), is judged when its response ends
    /// rather than at its head: a success once the body ended or the
    /// client left it, a failure if the backend broke it or fell silent
    /// (see [`InFlight::body_failed`]). A backend that sends every head
    /// and breaks every body was never ejected (review42c), as the head
    /// had counted as a success. A success that comes after an ejection
    /// or a recovery (a long download, a stream) counts for nothing, as
    /// failures of requests sent before them do.
    pub fn judged_at_end(mut self, epoch: u32) -> Self {
        self.verdict = Some(epoch);
        self
    }

    /// The backend's upstream and address, as [`BackendState::named`]
    /// gave them.
    pub fn backend(&self) -> Option<(Arc<str>, std::net::SocketAddr)> {
        self.state.named.clone()
    }

    /// The backend answered while the client's `upload` was still coming.
    pub fn answered_mid_upload(mut self, upload: crate::proxy::body::UploadWatch) -> Self {
        self.upload = Some(upload);
        self
    }

    /// The backend's body was cut short: `stalled` past `body_timeout`, or
    /// broken. The slot goes with this. Returns whether the backend is
    /// blamed (and counted): not when the client's upload, still coming
    /// when the backend answered, failed, which cut the body. A silence
    /// while the upload is merely unfinished is counted and warned of
    /// ("unfinished" cannot tell a client that stalls from a backend that
    /// stopped reading it), but gives no verdict on its health.
    pub fn body_failed(mut self, stalled: bool) -> bool {
        let mut verdict = self.verdict.take();
        if self.upload.as_ref().is_some_and(|upload| upload.failed()) {
            return false;
        }
        // Counted and warned of, but no verdict on the backend's health: a
        // client that stalls its upload makes a backend that waits for the
        // rest fall silent, and three such clients ejected a healthy
        // backend (review43a M1).
        if stalled && self.upload.as_ref().is_some_and(|upload| upload.coming()) {
            verdict = None;
        }
        if let Some(errors) = &self.state.body_errors {
            let counter = if stalled {
                &errors.stalled
            } else {
                &errors.broken
            };
            counter.inc();
        }
        if let Some(epoch) = verdict {
            self.state.observe(false, epoch);
        }
        true
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.end_request();
        if let Some(epoch) = self.verdict {
            self.state.observe(true, epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend back in rotation takes a twentieth of its share at
    /// first, then in proportion to the time since, and all of it once
    /// its `slow_start` is over; a warm one is never cooled, and none
    /// warms without a `slow_start`.
    #[test]
    fn a_backend_warms_up_over_its_slow_start() {
        let state = BackendState::new(3).slow_start(Duration::from_secs(10));
        assert_eq!(state.warmth(5), 1.0);
        state.start_warming();
        let from = state.warm_from.load(Ordering::Relaxed);
        assert_eq!(state.warmth(from), COLDEST);
        assert_eq!(state.warmth(from + 250), COLDEST);
        assert_eq!(state.warmth(from + 5_000), 0.5);
        assert_eq!(state.warmth(from + 10_000), 1.0);
        // Taken over by the next generation, mid-way.
        let warming = BackendState::new(3).slow_start(Duration::from_secs(10));
        warming.start_warming();
        let next = BackendState::new(3)
            .slow_start(Duration::from_secs(10))
            .warming_like(&warming);
        let from = next.warm_from.load(Ordering::Relaxed);
        assert!(from > 0);
        assert_eq!(next.warmth(from + 2_500), 0.25);
        let never = BackendState::new(3);
        never.start_warming();
        assert_eq!(never.warmth(1), 1.0);
        // One over, though nothing read it since, is not begun again by a
        // reload that lengthens `slow_start` (review45e L2).
        let quick = BackendState::new(3).slow_start(Duration::from_millis(1));
        quick.start_warming();
        std::thread::sleep(Duration::from_millis(5));
        let longer = BackendState::new(3)
            .slow_start(Duration::from_secs(3600))
            .warming_like(&quick);
        assert_eq!(longer.warm_from.load(Ordering::Relaxed), 0);
    }

    /// A backend the previous generation readmits after a reload (its
    /// probe, or a request the reload left running) warms in the new one
    /// too (review53 M1: it took its full share there at once), and one
    /// that generation had no `slow_start` for warms where the reload
    /// gave it one.
    #[test]
    fn a_readmission_across_a_reload_warms_the_new_generation() {
        for before in [Duration::from_secs(10), Duration::ZERO] {
            let old = BackendState::new(3).slow_start(before);
            let new = BackendState::new(3)
                .slow_start(Duration::from_secs(10))
                .warming_like(&old);
            assert_eq!(new.warmth(new.clock.now_ms()), 1.0, "{before:?}");
            old.start_warming();
            let from = new.warm_from.load(Ordering::Relaxed);
            assert!(from > 0, "{before:?}");
            assert_eq!(new.warmth(from + 2_500), 0.25, "{before:?}");
        }
        // One the old generation, with a shorter `slow_start`, has seen
        // through goes on in the new one (review54 L4: the old one ended
        // it for both).
        let old = BackendState::new(3).slow_start(Duration::from_millis(100));
        let new = BackendState::new(3)
            .slow_start(Duration::from_secs(10))
            .warming_like(&old);
        old.start_warming();
        let from = new.warm_from.load(Ordering::Relaxed);
        assert_eq!(old.warmth(from + 5_000), 1.0);
        assert_eq!(new.warmth(from + 5_000), 0.5);
    }

    #[test]
    fn threshold_failures_eject_with_doubling_backoff() {
        let state = BackendState::new(3);
        let before = state.epoch();
        assert_eq!(state.record_failure(10, before), None);
        assert_eq!(state.record_failure(10, before), None);
        assert_eq!(
            state.record_failure(10, before),
            Some(Passive::Ejected(Duration::from_secs(1)))
        );
        assert!(!state.eligible(500));
        assert!(state.eligible(1_010));
        // The first attempt after the backoff is the probe, alone.
        state.sending(1_010);
        let probe = state.epoch();
        assert!(!state.eligible(1_020));
        // A request sent before the ejection fails late: nothing changes.
        assert_eq!(state.record_failure(1_020, before), None);
        // The probe fails: ejected again, for twice as long.
        assert_eq!(
            state.record_failure(1_030, probe),
            Some(Passive::Ejected(Duration::from_secs(2)))
        );
        assert!(!state.eligible(3_000));
        assert!(state.eligible(3_030));
        // A success clears everything.
        assert_eq!(
            state.record_success(state.epoch()),
            Some(Passive::Recovered)
        );
        assert_eq!(state.record_failure(4_000, state.epoch()), None);
        assert!(state.eligible(4_000));
    }

    #[test]
    fn backoff_is_capped() {
        let state = BackendState::new(1);
        let mut now = 0;
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            state.sending(now);
            if let Some(Passive::Ejected(d)) = state.record_failure(now, state.epoch()) {
                last = d;
            }
            now += 60_000;
        }
        assert_eq!(last, EJECT_MAX);
    }

    #[test]
    fn failures_while_ejected_do_not_extend_it() {
        let state = BackendState::new(1);
        assert!(state.record_failure(0, state.epoch()).is_some());
        assert_eq!(state.record_failure(10, state.epoch()), None);
        assert!(state.eligible(1_000));
    }

    /// A probe that times out long after the backoff still holds the
    /// others off until then, and its failure doubles the backoff: the
    /// backend does not get a request every backoff for ever (review31e F1).
    #[test]
    fn a_probe_that_times_out_still_doubles_the_backoff() {
        let state = BackendState::new(1).probe_hold(Duration::from_secs(32));
        assert!(state.record_failure(0, state.epoch()).is_some());
        state.sending(1_000);
        let probe = state.epoch();
        assert!(!state.eligible(31_000));
        assert_eq!(
            state.record_failure(31_000, probe),
            Some(Passive::Ejected(Duration::from_secs(2)))
        );
        state.sending(33_000);
        assert_eq!(
            state.record_failure(63_000, state.epoch()),
            Some(Passive::Ejected(Duration::from_secs(4)))
        );
    }

    /// A probe never heard of holds the others off for `probe_hold`; then
    /// the next attempt is a new probe, and the old one's failure is stale.
    #[test]
    fn a_lost_probe_gives_way_after_its_hold() {
        let state = BackendState::new(1).probe_hold(Duration::from_secs(5));
        assert!(state.record_failure(0, state.epoch()).is_some());
        state.sending(1_000);
        let first = state.epoch();
        assert!(!state.eligible(5_999));
        assert!(state.eligible(6_000));
        state.sending(6_000);
        assert_eq!(state.record_failure(6_100, first), None);
        assert_eq!(
            state.record_failure(6_200, state.epoch()),
            Some(Passive::Ejected(Duration::from_secs(2)))
        );
    }

    /// A probe that ends with no verdict (its client left) frees the place
    /// at once for the next attempt to probe.
    #[test]
    fn a_probe_without_a_verdict_lets_the_next_attempt_probe() {
        let state = BackendState::new(1);
        assert!(state.record_failure(0, state.epoch()).is_some());
        state.sending(1_000);
        let first = state.epoch();
        assert!(!state.eligible(1_001));
        state.no_verdict(first);
        assert!(state.eligible(1_001));
        state.sending(1_001);
        assert_ne!(state.epoch(), first);
        assert!(!state.eligible(1_002));
    }

    /// An attempt while still ejected (every backend is) is no probe.
    #[test]
    fn an_attempt_during_the_backoff_probes_nothing() {
        let state = BackendState::new(1);
        assert!(state.record_failure(0, state.epoch()).is_some());
        state.sending(500);
        assert_eq!(state.record_failure(600, state.epoch()), None);
        assert!(state.eligible(1_000));
    }

    /// Requests sent before a recovery fail on old evidence: they do not
    /// eject the backend again (review31e F4).
    #[test]
    fn failures_from_before_a_recovery_count_for_nothing() {
        let state = BackendState::new(1);
        let before = state.epoch();
        assert!(state.record_failure(0, before).is_some());
        state.sending(1_000);
        let probe = state.epoch();
        assert_eq!(state.record_success(probe), Some(Passive::Recovered));
        assert_eq!(state.record_failure(1_100, before), None);
        assert_eq!(state.record_failure(1_100, probe), None);
        assert!(state.eligible(1_100));
        assert!(state.record_failure(1_200, state.epoch()).is_some());
    }

    /// A probe's head readmits the backend, on probation: its backoff is
    /// kept until a response ends whole, and its first failure before
    /// that ejects it for twice as long (review43a H1). A head of a
    /// request sent before the ejection readmits nothing (H2).
    #[test]
    fn a_probe_s_head_readmits_on_probation() {
        let state = BackendState::new(1);
        let before = state.epoch();
        assert!(state.record_failure(0, before).is_some());
        assert_eq!(state.answered(before), before);
        // A head of a request panic routing sent, no probe: still out.
        let ejected = state.epoch();
        assert_eq!(state.answered(ejected), ejected);
        assert!(!state.eligible(500));
        state.sending(1_000);
        let probe = state.epoch();
        let readmitted = state.answered(probe);
        assert_ne!(readmitted, probe);
        assert!(state.eligible(1_001));
        // Its body breaks: out again, for twice as long.
        assert_eq!(
            state.record_failure(1_100, readmitted),
            Some(Passive::Ejected(Duration::from_secs(2)))
        );
        state.sending(3_100);
        let readmitted = state.answered(state.epoch());
        // Its body ends whole: the backoff is forgotten (said at the head).
        assert_eq!(state.record_success(readmitted), None);
        assert!(!state.in_ejection());
        assert_eq!(
            state.record_failure(3_200, state.epoch()),
            Some(Passive::Ejected(Duration::from_secs(1)))
        );
    }

    /// Failures of one epoch at once eject once: two did, and the backoff
    /// went four times as long (review43f M1).
    #[test]
    fn one_epoch_gives_one_verdict() {
        for probation in [false, true] {
            for _ in 0..2_000 {
                let state = Arc::new(BackendState::new(if probation { 1 } else { 2 }));
                let epoch = if probation {
                    state.record_failure(0, state.epoch());
                    state.sending(1_000);
                    state.answered(state.epoch())
                } else {
                    state.record_failure(0, state.epoch());
                    state.epoch()
                };
                let barrier = Arc::new(std::sync::Barrier::new(2));
                let threads: Vec<_> = (0..2)
                    .map(|_| {
                        let (state, barrier) = (state.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            barrier.wait();
                            state.record_failure(1_100, epoch).is_some()
                        })
                    })
                    .collect();
                let ejected = threads
                    .into_iter()
                    .map(|thread| usize::from(thread.join().unwrap()))
                    .sum::<usize>();
                assert_eq!(ejected, 1, "probation: {probation}");
            }
        }
    }

    #[test]
    fn a_request_is_judged_when_its_body_ends() {
        let state = Arc::new(BackendState::new(2));
        let judged = || InFlight::new(state.clone()).judged_at_end(state.epoch());
        // A body that ends, or that its client leaves, is a success: the
        // failure before it is forgotten.
        assert!(judged().body_failed(false));
        drop(judged());
        assert!(judged().body_failed(true));
        assert!(!state.in_ejection());
        // A long body sent before an ejection ends after it: its success
        // counts for nothing.
        let long = judged();
        assert!(judged().body_failed(false));
        assert!(state.in_ejection());
        drop(long);
        assert!(state.in_ejection());
    }

    #[test]
    fn active_down_makes_a_backend_ineligible() {
        let state = BackendState::new(3);
        state.set_active_up(false);
        assert!(!state.eligible(0));
        state.set_active_up(true);
        assert!(state.eligible(0));
    }

    #[test]
    fn a_later_generation_sees_and_releases_earlier_in_flight() {
        let old = Arc::new(BackendState::new(3));
        let running = InFlight::new(old.clone());
        let new = Arc::new(BackendState::new(3).sharing_in_flight(&old));
        assert_eq!(new.in_flight(), 1);
        let started = InFlight::new(new.clone());
        assert_eq!(old.in_flight(), 2);
        drop(running);
        drop(started);
        assert_eq!(new.in_flight(), 0);
    }

    #[test]
    fn in_flight_is_released_on_drop() {
        let state = Arc::new(BackendState::new(3));
        let a = InFlight::new(state.clone());
        let b = InFlight::new(state.clone());
        assert_eq!(state.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(state.in_flight(), 0);
    }
}
