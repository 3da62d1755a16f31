//! Prometheus metrics: the names and labels of DESIGN.md, registered once
//! per process, and pre-resolved handles so the request path records with a
//! few atomic adds instead of label lookups. Label values are bounded by the
//! config (route, upstream and backend names, status codes), never by
//! traffic (paths, clients).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets for a proxy: 0.5 ms to 60 s, so that answers waited
/// out to the default `response_timeout` (30 s) and its 504s land in a
/// bucket rather than all in `+Inf` (review31b).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The route label of requests that matched no route.
pub const NO_ROUTE: &str = "_none";

/// Every metric family portico exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// The sum of `requests`, kept apart (see [`Answered`]).
    answered: Arc<Answered>,
    request_duration: HistogramVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_body_errors: IntCounterVec,
    upstream_retries: IntCounterVec,
    upstream_retries_refused: IntCounterVec,
    upstream_ejections: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_panic: IntCounterVec,
    upstream_queued: IntGaugeVec,
    upstream_queue_rejected: IntCounterVec,
    upstream_keyless: IntCounterVec,
    backend_up: IntGaugeVec,
    backend_weight: IntGaugeVec,
    backend_in_flight: IntGaugeVec,
    backend_max_conns: IntGaugeVec,
    backend_connections_idle: IntGaugeVec,
    backend_connections_opened: IntCounterVec,
    /// One [`Metrics::encode_with_backends`] at a time: two interleaved, each
    /// from its own reload's snapshot, removed each other's new series.
    /// It holds what the last [`Metrics::retain`] kept, pruned to again at
    /// each scrape.
    backends_setting: std::sync::Mutex<Option<Configured>>,
    cache_lookups: IntCounterVec,
    pub cache_size_bytes: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_max_size_bytes: IntGauge,
    pub cache_evictions: IntCounter,
    /// What `[compression]` did (see `proxy::compress`).
    pub compression: crate::proxy::compress::Counters,
    ratelimit_rejected: IntCounterVec,
    pub ratelimit_tracked: IntGauge,
    pub connections_open: IntGauge,
    pub connections_accepted: IntCounter,
    tls_handshake_errors: IntCounterVec,
    http2_broken: IntCounterVec,
    tls_not_after: IntGaugeVec,
    last_load_successful: IntGauge,
    last_load_success_time: IntGauge,
}

/// `metric`, registered in `registry`.
fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are static and valid");
    registered(registry, metric)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are static and valid");
    registered(registry, metric)
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("metric names and labels are static and valid");
    registered(registry, metric)
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("metric names are static and valid");
    registered(registry, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("metric names are static and valid");
    registered(registry, metric)
}

/// One backend's gauges, as a scrape sets them (see
/// [`Metrics::encode_with_backends`]).
#[derive(Debug)]
pub struct BackendRow<'a> {
    pub upstream: &'a str,
    pub backend: String,
    pub up: bool,
    pub weight: u32,
    pub in_flight: usize,
    pub max_conns: Option<usize>,
    pub idle_connections: usize,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            // Only fails if registered twice, which a fresh registry rules out.
            let _ = registry.register(Box::new(Process::new()));
        }
        let backend_up = gauge_vec(
            &registry,
            "portico_backend_up",
            "1 if the backend is healthy (up by its checks, not ejected); a drained one (weight 0) stays 1",
            &["upstream", "backend"],
        );
        // A drained backend shows in Prometheus too, not only in /status
        // (review35b F5; HAProxy exports each server's weight).
        let backend_weight = gauge_vec(
            &registry,
            "portico_backend_weight",
            "The backend's configured weight; 0 when drained (it takes no new requests)",
            &["upstream", "backend"],
        );
        // Which build each replica runs, as `prometheus_build_info`
        // (review42d F5); the registry holds it.
        gauge_vec(
            &registry,
            "portico_build_info",
            "Always 1, labelled with the running build's version",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        // Concurrency per backend shows a slow one piling up requests
        // (review42d F5), as HAProxy's `current_sessions` and Envoy's
        // `upstream_rq_active`.
        let backend_in_flight = gauge_vec(
            &registry,
            "portico_backend_in_flight",
            "Requests sent to the backend and not answered yet (their response body may still be coming), and open tunnels (WebSocket), as least_conn counts them",
            &["upstream", "backend"],
        );
        // Beside `portico_backend_in_flight`, how near its cap a backend
        // runs (HAProxy's `limit_sessions`).
        let backend_max_conns = gauge_vec(
            &registry,
            "portico_backend_max_conns",
            "The backend's max_conns: requests sent to it at once at most (no series when it has no cap)",
            &["upstream", "backend"],
        );
        // Keep-alive at work: connections waiting in the pool (HAProxy's
        // `idle_conn_cur` and `safe_conn_cur`), and those opened (Envoy's `upstream_cx_total`;
        // over the backend's requests, how often one was not reused).
        let backend_connections_idle = gauge_vec(
            &registry,
            "portico_backend_connections_idle",
            "Connections to the backend kept open in the pool for the next request",
            &["upstream", "backend"],
        );
        let backend_connections_opened = counter_vec(
            &registry,
            "portico_backend_connections_opened_total",
            "Connections opened to the backend for requests (not those of active health checks)",
            &["upstream", "backend"],
        );
        Metrics {
            answered: Arc::default(),
            requests: counter_vec(
                &registry,
                "portico_requests_total",
                "Requests answered, by route and status code",
                &["route", "code"],
            ),
            request_duration: histogram_vec(
                &registry,
                "portico_request_duration_seconds",
                "Time from request head to response head",
                &["route"],
            ),
            upstream_requests: counter_vec(
                &registry,
                "portico_upstream_requests_total",
                "Requests sent to backends, by answer status code (502/504 when it failed)",
                &["upstream", "backend", "code"],
            ),
            upstream_duration: histogram_vec(
                &registry,
                "portico_upstream_duration_seconds",
                "Time a backend took to send its response head",
                &["upstream", "backend"],
            ),
            upstream_body_errors: counter_vec(
                &registry,
                "portico_upstream_body_errors_total",
                "Backend response bodies cut short after their head was relayed: broken (the connection failed) or stalled (silent past body_timeout)",
                &["upstream", "backend", "reason"],
            ),
            upstream_retries: counter_vec(
                &registry,
                "portico_upstream_retries_total",
                "Attempts that failed and were sent again (to another backend when there is one)",
                &["upstream"],
            ),
            upstream_retries_refused: counter_vec(
                &registry,
                "portico_upstream_retries_budget_exhausted_total",
                "Failed attempts that could have been retried but were not: the upstream's retry budget was spent",
                &["upstream"],
            ),
            upstream_ejections: counter_vec(
                &registry,
                "portico_upstream_ejections_total",
                "Times passive health ejected the backend (consecutive failures on live traffic); an ejection can be shorter than a scrape",
                &["upstream", "backend"],
            ),
            // A 502 or 504 of portico's own told from one the backend sent
            // (review42d F3), as HAProxy counts connection and response
            // errors and Envoy `upstream_cx_connect_fail` and
            // `upstream_rq_timeout`.
            upstream_errors: counter_vec(
                &registry,
                "portico_upstream_errors_total",
                "Attempts that got no response head from the backend, by reason: connect (refused or failed), tls (the handshake failed: a certificate refused, nothing in common), connect_timeout, response_timeout, broken (the connection closed or reset before the head), upload_stalled (the backend stopped reading the request body), bad_response (a head portico cannot relay); each also counts in portico_upstream_requests_total as the 502 or 504 portico answered",
                &["upstream", "backend", "reason"],
            ),
            // Envoy's `lb_healthy_panic` (review42d F1): with every backend
            // ejected, `portico_backend_up` says 0 for each, and this says
            // they take traffic all the same.
            upstream_panic: counter_vec(
                &registry,
                "portico_upstream_panic_total",
                "Attempts sent to a passively ejected backend because every backend of the upstream up by its active checks was ejected (panic routing: the failures may be over)",
                &["upstream"],
            ),
            // HAProxy's `qcur` and Envoy's `upstream_rq_pending_active`;
            // the refusals, its `upstream_rq_pending_overflow`.
            upstream_queued: gauge_vec(
                &registry,
                "portico_upstream_queued_requests",
                "Requests waiting for room because every backend of the upstream was at its max_conns",
                &["upstream"],
            ),
            upstream_queue_rejected: counter_vec(
                &registry,
                "portico_upstream_queue_rejected_total",
                "Requests turned away because every backend of the upstream stayed at its max_conns for queue_timeout (at once when it is 0): answered 503, or a stale copy in its place; a cache's background refresh is dropped",
                &["upstream"],
            ),
            // None in nginx and HAProxy: a misspelt cookie name turned
            // affinity into round-robin unseen (review45a L4).
            upstream_keyless: counter_vec(
                &registry,
                "portico_upstream_hash_keyless_total",
                "Requests to a balance = \"hash\" upstream without their hash_key (no such field or cookie, or an empty one), balanced round-robin instead",
                &["upstream"],
            ),
            backend_up,
            backend_weight,
            backend_in_flight,
            backend_max_conns,
            backend_connections_idle,
            backend_connections_opened,
            backends_setting: std::sync::Mutex::new(None),
            cache_lookups: counter_vec(
                &registry,
                "portico_cache_lookups_total",
                "Cache lookups by result",
                &["result"],
            ),
            cache_size_bytes: gauge(
                &registry,
                "portico_cache_size_bytes",
                "Bytes held by the response cache",
            ),
            cache_entries: gauge(
                &registry,
                "portico_cache_entries",
                "Responses held by the response cache",
            ),
            // The bound beside the size, for an alert that follows a
            // reload's `max_size` (review42d F5).
            cache_max_size_bytes: gauge(
                &registry,
                "portico_cache_max_size_bytes",
                "The response cache's max_size (0 without a cache)",
            ),
            // What "cache too small" looks like, apart from uncacheable
            // answers, which a miss does not tell apart (review35b F5;
            // Varnish's n_lru_nuked).
            cache_evictions: counter(
                &registry,
                "portico_cache_evictions_total",
                "Stored responses dropped, least recently used first, to make room under max_size (not those expired, replaced or purged)",
            ),
            compression: {
                let bytes = counter_vec(
                    &registry,
                    "portico_compression_bytes_total",
                    "Bytes of response bodies given to the gzip encoder (direction in) and sent from it (out): their ratio is what compression saves",
                    &["direction"],
                );
                let copies = counter_vec(
                    &registry,
                    "portico_compression_copies_total",
                    "gzip copies of stored responses the cache kept, compressed once by a hit (event stored), and responses sent from them with no compression (served)",
                    &["event"],
                );
                crate::proxy::compress::Counters {
                    responses: counter(
                        &registry,
                        "portico_compressed_responses_total",
                        "Responses sent compressed with gzip by [compression] (HEAD ones included, which say so with no body)",
                    ),
                    bytes_in: bytes.with_label_values(&["in"]),
                    bytes_out: bytes.with_label_values(&["out"]),
                    copies_stored: copies.with_label_values(&["stored"]),
                    copies_served: copies.with_label_values(&["served"]),
                }
            },
            ratelimit_rejected: counter_vec(
                &registry,
                "portico_ratelimit_rejected_total",
                "Requests refused with 429, by route",
                &["route"],
            ),
            ratelimit_tracked: gauge(
                &registry,
                "portico_ratelimit_tracked_clients",
                "Clients the rate limiter tracks, summed over throttled routes (each tracks at most max_tracked_clients)",
            ),
            connections_open: gauge(
                &registry,
                "portico_connections_open",
                "Client connections currently open",
            ),
            // Churn between scrapes, which the open gauge cannot show
            // (nginx's `accepts`, HAProxy's CumConns; review35b F5).
            connections_accepted: counter(
                &registry,
                "portico_connections_accepted_total",
                "Client connections accepted on the traffic listeners",
            ),
            tls_handshake_errors: {
                let errors = counter_vec(
                    &registry,
                    "portico_tls_handshake_errors_total",
                    "TLS handshakes on client connections that failed (reason=failed: refused by either side, such as no shared version, cipher or protocol, an unknown certificate authority, a bad record) or did not finish within request_header_timeout (reason=timeout)",
                    &["reason"],
                );
                for reason in ["failed", "timeout"] {
                    errors.with_label_values(&[reason]);
                }
                errors
            },
            // Floods and protocol breaches h2 closes a connection for
            // showed nowhere but in its own warnings, without the client
            // (review41a F2), where Envoy and HAProxy count each guard.
            http2_broken: {
                let broken = counter_vec(
                    &registry,
                    "portico_http2_connection_errors_total",
                    "Client HTTP/2 connections closed for breaking the protocol (reason=enhance_your_calm: a flood, such as resets of streams as they open, CONTINUATION, empty DATA, PRIORITY or WINDOW_UPDATE frames; protocol_error, frame_size_error, compression_error, flow_control_error: frames RFC 9113 forbids; other)",
                    &["reason"],
                );
                for reason in ["enhance_your_calm", "protocol_error"] {
                    broken.with_label_values(&[reason]);
                }
                broken
            },
            // The load-time warning is said once; this lets an alert see
            // the end come near in a process up for months (review42f L1),
            // as cert-manager's and the blackbox exporter's expiry series.
            tls_not_after: gauge_vec(
                &registry,
                "portico_tls_certificate_not_after_timestamp_seconds",
                "When a TLS listener's certificate file stops serving: the earliest notAfter of its chain, in seconds since the Unix epoch",
                &["cert"],
            ),
            last_load_successful: gauge(
                &registry,
                "portico_config_last_reload_successful",
                "1 if the last reload of the configuration file succeeded (or none was asked for yet), 0 if it was rejected",
            ),
            last_load_success_time: gauge(
                &registry,
                "portico_config_last_reload_success_timestamp_seconds",
                "When the configuration in force was loaded, at start or by a reload, in seconds since the Unix epoch",
            ),
            registry,
        }
    }

    /// A client's TLS handshake that failed (`timed_out`: did not finish in
    /// time). They were logged at debug level only: a certificate clients
    /// refuse showed nowhere (review34a F6).
    /// A client HTTP/2 connection closed for breaking the protocol, with
    /// the GOAWAY's error code (RFC 9113 §7).
    pub fn http2_broken(&self, reason: h2::Reason) {
        let reason = match u32::from(reason) {
            0x1 => "protocol_error",
            0x3 => "flow_control_error",
            0x6 => "frame_size_error",
            0x9 => "compression_error",
            0xb => "enhance_your_calm",
            _ => "other",
        };
        self.http2_broken.with_label_values(&[reason]).inc();
    }

    pub fn tls_handshake_failed(&self, timed_out: bool) {
        let reason = if timed_out { "timeout" } else { "failed" };
        self.tls_handshake_errors.with_label_values(&[reason]).inc();
    }

    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            name: Arc::from(route),
            requests: self.requests.clone(),
            answered: self.answered.clone(),
            codes: code_counters(
                &self.requests,
                &[route],
                if route == NO_ROUTE {
                    NO_ROUTE_CODES
                } else {
                    PRESET_CODES
                },
            ),
            duration: self.request_duration.with_label_values(&[route]),
            // Nothing before routing is throttled: no series that never moves.
            rejected: (route != NO_ROUTE)
                .then(|| self.ratelimit_rejected.with_label_values(&[route])),
        }
    }

    pub fn backend(&self, upstream: &str, backend: &str) -> BackendMetrics {
        BackendMetrics {
            labels: [upstream.to_owned(), backend.to_owned()],
            requests: self.upstream_requests.clone(),
            codes: code_counters(&self.upstream_requests, &[upstream, backend], PRESET_CODES),
            duration: self
                .upstream_duration
                .with_label_values(&[upstream, backend]),
            ejections: self
                .upstream_ejections
                .with_label_values(&[upstream, backend]),
            connections_opened: self
                .backend_connections_opened
                .with_label_values(&[upstream, backend]),
            errors: UpstreamErrors(Failure::ALL.map(|failure| {
                self.upstream_errors
                    .with_label_values(&[upstream, backend, failure.label()])
            })),
        }
    }

    /// One upstream's `portico_upstream_panic_total`, made (at 0) with it.
    pub fn panic(&self, upstream: &str) -> IntCounter {
        self.upstream_panic.with_label_values(&[upstream])
    }

    /// One upstream's `portico_upstream_hash_keyless_total`, made (at 0)
    /// with it when it hashes.
    pub fn keyless(&self, upstream: &str) -> IntCounter {
        self.upstream_keyless.with_label_values(&[upstream])
    }

    /// Drops an upstream's `portico_upstream_hash_keyless_total`, when it
    /// hashes no more.
    pub fn forget_keyless(&self, upstream: &str) {
        let _ = self.upstream_keyless.remove_label_values(&[upstream]);
    }

    /// One upstream's `portico_upstream_queued_requests` and
    /// `portico_upstream_queue_rejected_total`, made (at 0) with it.
    pub fn queue(&self, upstream: &str) -> (IntGauge, IntCounter) {
        (
            self.upstream_queued.with_label_values(&[upstream]),
            self.upstream_queue_rejected.with_label_values(&[upstream]),
        )
    }

    /// One upstream's retry counters, made (at 0) with the upstream.
    pub fn retries(&self, upstream: &str) -> Retries {
        Retries {
            sent: self.upstream_retries.with_label_values(&[upstream]),
            refused: self.upstream_retries_refused.with_label_values(&[upstream]),
        }
    }

    /// One backend's body-error counters, made (at 0) with the backend.
    pub fn body_errors(&self, upstream: &str, backend: &str) -> BodyErrors {
        let counter = |reason| {
            self.upstream_body_errors
                .with_label_values(&[upstream, backend, reason])
        };
        BodyErrors {
            broken: counter("broken"),
            stalled: counter("stalled"),
        }
    }

    pub fn cache_lookup(&self, result: &str) -> IntCounter {
        self.cache_lookups.with_label_values(&[result])
    }

    /// Sets `portico_backend_up`, `portico_backend_weight`,
    /// `portico_backend_in_flight` and `portico_backend_max_conns` for
    /// exactly the given backends (see [`BackendRow`]), dropping series
    /// of backends no longer configured, then encodes the exposition (see
    /// [`Metrics::encode`]), with no other scrape's setting in between:
    /// two scrapes racing a reload, each from its own snapshot, gave one
    /// body `portico_backend_up` of one configuration and
    /// `portico_backend_weight` of the other (review36d L4).
    pub fn encode_with_backends<'a>(
        &self,
        backends: impl Iterator<Item = BackendRow<'a>>,
    ) -> Vec<u8> {
        let configured = self
            .backends_setting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A request a reload left running on a removed backend or route
        // that met a status code its handles had not resolved brought that
        // series back, for good until the next reload, with no
        // `portico_backend_up` beside it (soak53 2): pruned again here.
        if let Some(configured) = configured.as_ref() {
            self.prune_to(configured);
        }
        // Set, then the stale series removed, never all cleared first: a
        // scrape running beside this one (two Prometheus servers) would
        // gather between the clearing and the setting and find no backend
        // at all (review36c F2).
        let rows: Vec<BackendRow> = backends.collect();
        let mut current = HashSet::with_capacity(rows.len());
        let mut capped = HashSet::new();
        for row in &rows {
            let BackendRow {
                upstream,
                backend,
                up,
                weight,
                in_flight,
                max_conns,
                idle_connections,
            } = row;
            let labels = [*upstream, backend.as_str()];
            if let Some(max) = max_conns {
                self.backend_max_conns
                    .with_label_values(&labels)
                    .set(i64::try_from(*max).unwrap_or(i64::MAX));
                capped.insert((*upstream, backend.as_str()));
            }
            self.backend_in_flight
                .with_label_values(&labels)
                .set(i64::try_from(*in_flight).unwrap_or(i64::MAX));
            self.backend_up
                .with_label_values(&labels)
                .set(i64::from(*up));
            self.backend_connections_idle
                .with_label_values(&labels)
                .set(i64::try_from(*idle_connections).unwrap_or(i64::MAX));
            self.backend_weight
                .with_label_values(&labels)
                .set(i64::from(*weight));
            current.insert((*upstream, backend.as_str()));
        }
        for gauges in [
            &self.backend_up,
            &self.backend_weight,
            &self.backend_in_flight,
            &self.backend_connections_idle,
        ] {
            remove_series(gauges, |labels| {
                let label = |name| labels.get(name).copied().unwrap_or("");
                current.contains(&(label("upstream"), label("backend")))
            });
        }
        remove_series(&self.backend_max_conns, |labels| {
            let label = |name| labels.get(name).copied().unwrap_or("");
            capped.contains(&(label("upstream"), label("backend")))
        });
        self.encode()
    }

    /// Sets `portico_tls_certificate_not_after_timestamp_seconds` to
    /// exactly these certificate files and ends (see
    /// [`crate::server::tls::acceptors`]).
    /// Set, then the others removed, never all cleared first: a scrape
    /// between the two found none (review42j L4).
    pub fn set_certificate_ends(&self, ends: &[(String, u64)]) {
        for (cert, end) in ends {
            self.tls_not_after
                .with_label_values(&[cert.as_str()])
                .set(i64::try_from(*end).unwrap_or(i64::MAX));
        }
        remove_series(&self.tls_not_after, |labels| {
            ends.iter()
                .any(|(kept, _)| labels.get("cert") == Some(&kept.as_str()))
        });
    }

    /// Records a load of the configuration: at start, and the outcome of
    /// each reload, as Prometheus's own `prometheus_config_last_reload_*`
    /// do. A rejected reload leaves the time of the last good one.
    pub fn config_loaded(&self, successful: bool) {
        self.last_load_successful.set(i64::from(successful));
        if successful {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            self.last_load_success_time
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// Drops the series of routes, upstreams and backends that `configured`
    /// no longer has, in every family labelled by them, as Envoy and
    /// HAProxy drop a removed host's stats: otherwise each reload that
    /// swaps a backend leaves its twenty series behind for good. Series of
    /// what is still configured are not touched, so their counts go on.
    ///
    /// A request still in flight on a removed backend or route records
    /// into handles whose series are gone, which is harmless; one that
    /// meets a status code its handles had not resolved yet brings that
    /// one series back, until the next scrape drops it again.
    pub fn retain(&self, configured: &Configured) {
        let mut kept = self
            .backends_setting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.prune_to(configured);
        *kept = Some(configured.clone());
    }

    /// Keeps the series of `configured` too from now on, until the next
    /// [`Metrics::retain`]: called by a reload before it makes the new
    /// generation's handles, so that a scrape in between, pruning to the
    /// old configuration, does not drop the new series those handles then
    /// count into unexported (review55 M1: 8 of 60 upstreams a burst of
    /// reloads added lost their queue series for good).
    pub fn admit(&self, configured: &Configured) {
        let mut kept = self
            .backends_setting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(kept) = kept.as_mut() {
            kept.routes.extend(configured.routes.iter().cloned());
            kept.upstreams.extend(configured.upstreams.iter().cloned());
            kept.backends.extend(configured.backends.iter().cloned());
        }
    }

    /// [`Metrics::retain`]'s pruning.
    fn prune_to(&self, configured: &Configured) {
        prune(&self.requests, configured);
        prune(&self.request_duration, configured);
        prune(&self.ratelimit_rejected, configured);
        prune(&self.upstream_requests, configured);
        prune(&self.upstream_duration, configured);
        prune(&self.upstream_body_errors, configured);
        prune(&self.upstream_retries, configured);
        prune(&self.upstream_retries_refused, configured);
        prune(&self.upstream_ejections, configured);
        prune(&self.upstream_errors, configured);
        prune(&self.upstream_panic, configured);
        prune(&self.upstream_queued, configured);
        prune(&self.upstream_queue_rejected, configured);
        prune(&self.upstream_keyless, configured);
        prune(&self.backend_up, configured);
        prune(&self.backend_weight, configured);
        prune(&self.backend_in_flight, configured);
        prune(&self.backend_max_conns, configured);
        prune(&self.backend_connections_idle, configured);
        prune(&self.backend_connections_opened, configured);
    }

    /// Requests answered so far, over every route and status: what
    /// `portico_requests_total` counted, those of routes a reload removed
    /// included.
    pub fn requests_answered(&self) -> u64 {
        self.answered.total()
    }

    /// The text exposition format (0.0.4).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a bad family would be a
        // bug in this module, so an empty scrape is the safe answer.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The label values a configuration gives series to: what
/// [`Metrics::retain`] keeps after a reload.
#[derive(Debug, Default, Clone)]
pub struct Configured {
    routes: HashSet<String>,
    upstreams: HashSet<String>,
    /// (upstream, backend address)
    backends: HashSet<(String, String)>,
}

impl Configured {
    pub fn of(config: &crate::config::Config) -> Self {
        let mut routes: HashSet<String> = config.routes.iter().map(|r| r.name.clone()).collect();
        routes.insert(NO_ROUTE.to_owned());
        Configured {
            routes,
            upstreams: config.upstreams.iter().map(|u| u.name.clone()).collect(),
            backends: config
                .upstreams
                .iter()
                .flat_map(|u| {
                    u.backends
                        .iter()
                        .map(|b| (u.name.clone(), b.addr.to_string()))
                })
                .collect(),
        }
    }

    /// Whether a series with these labels belongs to something configured.
    /// A family's labels say what it is about: a route, a backend (with
    /// its upstream), or an upstream.
    fn holds(&self, labels: &HashMap<&str, &str>) -> bool {
        if let Some(route) = labels.get("route") {
            return self.routes.contains(*route);
        }
        match (labels.get("upstream"), labels.get("backend")) {
            (Some(upstream), Some(backend)) => self
                .backends
                .contains(&((*upstream).to_owned(), (*backend).to_owned())),
            (Some(upstream), None) => self.upstreams.contains(*upstream),
            _ => true,
        }
    }
}

/// Removes the series of `vec` that `configured` does not hold.
fn prune<T: MetricVecBuilder>(vec: &MetricVec<T>, configured: &Configured) {
    remove_series(vec, |labels| configured.holds(labels));
}

/// Removes the series of `vec` whose labels `keep` says no to.
fn remove_series<T: MetricVecBuilder>(
    vec: &MetricVec<T>,
    keep: impl Fn(&HashMap<&str, &str>) -> bool,
) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            if !keep(&labels) {
                // Only fails for a series already gone: another removal
                // under way beside this one.
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// Status codes 100..=599, resolved on first use.
type CodeCounters = Arc<[OnceLock<IntCounter>; 500]>;

/// The codes every route and backend exports from the start, at 0: a
/// series that appears only with its first request makes Prometheus take
/// that count as its start, so `rate()` and `increase()` missed the first
/// burst of each (metrics54: 20 first 503s read as an increase of 0), and
/// before any traffic the families were absent (as HAProxy's exporter
/// does, which shows its status classes at 0). The usual answers and the
/// errors an alert watches; others appear with their first request.
const PRESET_CODES: &[u16] = &[200, 304, 400, 404, 429, 499, 500, 502, 503, 504];

/// [`PRESET_CODES`] for [`NO_ROUTE`]: what is answered before routing.
const NO_ROUTE_CODES: &[u16] = &[400, 404, 408, 431];

/// [`CodeCounters`] for one route or backend, `preset` made.
fn code_counters(vec: &IntCounterVec, labels: &[&str], preset: &[u16]) -> CodeCounters {
    let codes: CodeCounters = Arc::new(std::array::from_fn(|_| OnceLock::new()));
    for &code in preset {
        code_counter(&codes, vec, labels, code);
    }
    codes
}

fn code_counter<'a>(
    codes: &'a CodeCounters,
    vec: &IntCounterVec,
    labels: &[&str],
    code: u16,
) -> Option<&'a IntCounter> {
    let slot = codes.get(usize::from(code).checked_sub(100)?)?;
    Some(slot.get_or_init(|| {
        let code = code.to_string();
        let mut all: Vec<&str> = labels.to_vec();
        all.push(&code);
        vec.with_label_values(&all)
    }))
}

/// Requests answered, over every route and status, for the memory
/// watcher's look once a second: summed from the series, every route's
/// preset codes made the look clone tens of thousands of label sets
/// (review61 M1: 5,000 routes took 32 ms of a worker each second). In
/// shards, so that threads answering at once share no cache line.
#[derive(Debug, Default)]
struct Answered([Shard; ANSWERED_SHARDS]);

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

const ANSWERED_SHARDS: usize = 16;

impl Answered {
    fn add(&self) {
        static THREADS: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = THREADS.fetch_add(1, Ordering::Relaxed) % ANSWERED_SHARDS;
        }
        let shard = SHARD.with(|shard| *shard);
        self.0[shard].0.fetch_add(1, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.0
            .iter()
            .map(|shard| shard.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// One route's handles.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Shared with the access lines that name it.
    name: Arc<str>,
    requests: IntCounterVec,
    answered: Arc<Answered>,
    codes: CodeCounters,
    duration: Histogram,
    rejected: Option<IntCounter>,
}

impl RouteMetrics {
    /// The route's label: its name, or [`NO_ROUTE`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`RouteMetrics::name`], for an access line to hold.
    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    pub fn record(&self, code: u16, seconds: f64) {
        if self.tally(code) {
            self.duration.observe(seconds);
        }
    }

    /// Counts an answer that had no request to time: a head the parser
    /// refused. It stays out of the duration histogram.
    pub fn count(&self, code: u16) {
        self.tally(code);
    }

    /// Counts an answer with `code` in its series and in the answered
    /// total; false for a code no series takes.
    fn tally(&self, code: u16) -> bool {
        let counter = code_counter(&self.codes, &self.requests, &[&self.name], code);
        counter
            .inspect(|counter| {
                counter.inc();
                self.answered.add();
            })
            .is_some()
    }

    pub fn throttled(&self) {
        if let Some(rejected) = &self.rejected {
            rejected.inc();
        }
    }
}

/// An upstream's `portico_upstream_retries_total` and
/// `portico_upstream_retries_budget_exhausted_total` series (Envoy's
/// `upstream_rq_retry` and `upstream_rq_retry_overflow`).
#[derive(Debug, Clone)]
pub struct Retries {
    pub sent: IntCounter,
    pub refused: IntCounter,
}

/// A backend's `portico_upstream_body_errors_total` series. HAProxy counts
/// the same as server aborts (its `SD` termination state); nginx only logs
/// "upstream prematurely closed connection".
#[derive(Debug, Clone)]
pub struct BodyErrors {
    pub broken: IntCounter,
    pub stalled: IntCounter,
}

/// One backend's handles.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    labels: [String; 2],
    requests: IntCounterVec,
    codes: CodeCounters,
    duration: Histogram,
    ejections: IntCounter,
    /// `portico_backend_connections_opened_total`, counted by the pool.
    pub connections_opened: IntCounter,
    errors: UpstreamErrors,
}

/// A backend's `portico_upstream_errors_total` series, one per reason.
#[derive(Debug, Clone)]
struct UpstreamErrors([IntCounter; Failure::ALL.len()]);

/// Why an attempt got no response head from its backend: the `reason`
/// of `portico_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Refused, unreachable, or failed otherwise before any byte.
    Connect,
    /// The TLS handshake failed: a certificate refused, nothing in common.
    Tls,
    ConnectTimeout,
    ResponseTimeout,
    /// The connection closed or reset before the head.
    Broken,
    /// The backend stopped reading the request body.
    UploadStalled,
    /// A head hyper could not parse, or portico cannot relay.
    BadResponse,
}

impl Failure {
    /// Every reason, each series made at 0 with its backend so that
    /// `rate()` sees the first.
    pub const ALL: [Failure; 7] = [
        Failure::Connect,
        Failure::Tls,
        Failure::ConnectTimeout,
        Failure::ResponseTimeout,
        Failure::Broken,
        Failure::UploadStalled,
        Failure::BadResponse,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Tls => "tls",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::ResponseTimeout => "response_timeout",
            Failure::Broken => "broken",
            Failure::UploadStalled => "upload_stalled",
            Failure::BadResponse => "bad_response",
        }
    }
}

impl BackendMetrics {
    /// Its passive ejections, counted by its health state (see
    /// `BackendState::observe`): a 1 s ejection rarely shows in a
    /// `portico_backend_up` scraped every 15 s.
    pub fn ejections(&self) -> IntCounter {
        self.ejections.clone()
    }

    pub fn record(&self, code: u16, seconds: f64) {
        if self.count(code) {
            self.duration.observe(seconds);
        }
    }

    /// Counts an attempt that got no head from the backend.
    pub fn failed(&self, failure: Failure) {
        self.errors.0[failure as usize].inc();
    }

    /// Counts an attempt under `code` without timing it: one whose length
    /// was the client's doing (a cut upload), which would skew the
    /// backend's latency. Whether the code was counted.
    pub fn count(&self, code: u16) -> bool {
        let labels = [self.labels[0].as_str(), self.labels[1].as_str()];
        let counter = code_counter(&self.codes, &self.requests, &labels, code);
        counter.inspect(|counter| counter.inc()).is_some()
    }
}

/// The standard `process_*` metrics, with `process_cpu_seconds_total` to
/// the clock tick: the prometheus crate counts it in whole seconds
/// (tikv/rust-prometheus#451), which makes `rate()` a staircase.
#[cfg(target_os = "linux")]
struct Process {
    inner: prometheus::process_collector::ProcessCollector,
    descs: Vec<prometheus::core::Desc>,
}

#[cfg(target_os = "linux")]
const CPU_SECONDS: &str = "process_cpu_seconds_total";

#[cfg(target_os = "linux")]
impl Process {
    fn new() -> Self {
        let inner = prometheus::process_collector::ProcessCollector::for_self();
        let descs = inner
            .desc()
            .into_iter()
            .filter(|d| d.fq_name != CPU_SECONDS)
            .chain(cpu_counter(0.0).desc())
            .cloned()
            .collect();
        Process { inner, descs }
    }
}

/// `process_cpu_seconds_total` at `seconds`: made afresh from /proc at each
/// scrape, so there is no running count for concurrent scrapes to race on.
#[cfg(target_os = "linux")]
fn cpu_counter(seconds: f64) -> prometheus::Counter {
    let counter = prometheus::Counter::new(
        CPU_SECONDS,
        "Total user and system CPU time spent in seconds.",
    )
    .expect("a static, valid name");
    counter.inc_by(seconds);
    counter
}

/// User plus system CPU seconds of this process, from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th and stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

#[cfg(target_os = "linux")]
impl Collector for Process {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families: Vec<_> = self
            .inner
            .collect()
            .into_iter()
            .filter(|f| f.name() != CPU_SECONDS)
            .collect();
        if let Some(total) = cpu_seconds() {
            families.extend(cpu_counter(total).collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend up, of weight 1, with nothing in flight and no cap.
    fn up(upstream: &str, backend: String) -> BackendRow<'_> {
        BackendRow {
            upstream,
            backend,
            up: true,
            weight: 1,
            in_flight: 0,
            max_conns: None,
            idle_connections: 0,
        }
    }

    /// `Failure as usize` indexes a backend's series: the order of
    /// `Failure::ALL` is the declaration's.
    #[test]
    fn failures_are_listed_in_their_order() {
        for (i, failure) in Failure::ALL.iter().enumerate() {
            assert_eq!(*failure as usize, i, "{}", failure.label());
        }
    }

    #[test]
    fn recorded_requests_show_up_in_the_text_format() {
        let metrics = Metrics::new();
        let route = metrics.route("orders");
        route.record(200, 0.002);
        route.record(200, 0.002);
        route.record(503, 0.0001);
        route.record(42, 0.0); // not an HTTP status: ignored, not a panic
        let backend = metrics.backend("orders", "127.0.0.1:8001");
        backend.record(200, 0.001);
        let _ =
            metrics.encode_with_backends([up("orders", "127.0.0.1:8001".to_owned())].into_iter());
        // What the burst trimmer reads: the 3 answered, not the upstream's.
        assert_eq!(metrics.requests_answered(), 3);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("portico_requests_total{code=\"200\",route=\"orders\"} 2"),
            "{text}"
        );
        assert!(text.contains("portico_requests_total{code=\"503\",route=\"orders\"} 1"));
        assert!(text.contains("portico_upstream_requests_total{backend=\"127.0.0.1:8001\",code=\"200\",upstream=\"orders\"} 1"));
        assert!(
            text.contains("portico_backend_up{backend=\"127.0.0.1:8001\",upstream=\"orders\"} 1")
        );
        assert!(text
            .contains("portico_request_duration_seconds_bucket{route=\"orders\",le=\"0.0005\"} 1"));
    }

    /// Scrapes side by side each find every backend (review36c F2): the
    /// series were cleared and set again, and a scrape gathering between
    /// the two found none.
    #[test]
    fn concurrent_scrapes_each_see_every_backend() {
        let metrics = Arc::new(Metrics::new());
        let rows = |from: usize| (from..from + 50).map(|i| up("u", format!("10.0.0.{i}:80")));
        let _ = metrics.encode_with_backends(rows(0));
        // Two scrapes of two configurations (a reload between them): each
        // body holds one whole, in both families (review36d L4).
        let scrapers: Vec<_> = (0..2)
            .map(|from| {
                let metrics = metrics.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let text =
                            String::from_utf8(metrics.encode_with_backends(rows(from))).unwrap();
                        let named = |family: &str| -> Vec<String> {
                            text.lines()
                                .filter(|l| l.starts_with(family))
                                .map(|l| l.split('"').nth(1).unwrap_or("").to_owned())
                                .collect()
                        };
                        let up = named("portico_backend_up{");
                        assert_eq!(up.len(), 50, "a scrape saw {} backends", up.len());
                        assert_eq!(up, named("portico_backend_weight{"));
                    }
                })
            })
            .collect();
        for scraper in scrapers {
            scraper.join().unwrap();
        }
        // A backend no longer given is dropped, the rest kept.
        let _ = metrics.encode_with_backends(rows(0).skip(1));
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(!text.contains("10.0.0.0:80"), "{text}");
        assert_eq!(text.matches("portico_backend_weight{").count(), 49);
    }

    /// A capped backend's `max_conns` is exported beside its in-flight
    /// count; a backend without a cap, or whose cap a reload removed, has
    /// no such series.
    #[test]
    fn a_backend_s_cap_is_exported_while_it_has_one() {
        let metrics = Metrics::new();
        let row = |max_conns| BackendRow {
            upstream: "u",
            backend: "10.0.0.1:80".to_owned(),
            up: true,
            weight: 1,
            in_flight: 3,
            max_conns,
            idle_connections: 2,
        };
        let text =
            String::from_utf8(metrics.encode_with_backends([row(Some(8))].into_iter())).unwrap();
        assert!(
            text.contains("portico_backend_max_conns{backend=\"10.0.0.1:80\",upstream=\"u\"} 8"),
            "{text}"
        );
        let text =
            String::from_utf8(metrics.encode_with_backends([row(None)].into_iter())).unwrap();
        assert!(!text.contains("portico_backend_max_conns{"), "{text}");
        assert!(
            text.contains("portico_backend_in_flight{backend=\"10.0.0.1:80\",upstream=\"u\"} 3")
        );
    }

    #[test]
    fn nothing_unrouted_has_a_rate_limit_series() {
        let metrics = Metrics::new();
        let (_unrouted, _main) = (metrics.route(NO_ROUTE), metrics.route("main"));
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(text.contains("portico_ratelimit_rejected_total{route=\"main\"} 0"));
        assert!(!text.contains("portico_ratelimit_rejected_total{route=\"_none\"}"));
    }

    /// A scrape while a reload makes the new generation's handles, before
    /// it retains the new configuration, keeps their series (review55 M1:
    /// pruned to the old one, they were lost for good).
    #[test]
    fn a_scrape_during_a_reload_keeps_the_new_configuration_s_series() {
        let metrics = Metrics::new();
        let addr = |a: &str| vec![a.parse().unwrap()];
        let old = crate::config::Config::single_upstream(vec![], addr("10.0.0.1:80"));
        metrics.retain(&Configured::of(&old));
        let mut new = old.clone();
        new.upstreams[0].name = "added".to_owned();
        metrics.admit(&Configured::of(&new));
        let (_queued, _rejected) = metrics.queue("added");
        let _ = metrics.encode_with_backends(std::iter::empty());
        metrics.retain(&Configured::of(&new));
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("portico_upstream_queued_requests{upstream=\"added\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn retain_drops_what_is_no_longer_configured_and_keeps_the_rest_counting() {
        let metrics = Metrics::new();
        let (kept, gone) = ("10.0.0.1:80", "10.0.0.2:80");
        let main = metrics.route("default");
        main.record(200, 0.001);
        metrics.route(NO_ROUTE).count(400);
        metrics.route("old").throttled();
        metrics.backend("default", kept).record(200, 0.001);
        let removed = metrics.backend("default", gone);
        removed.record(200, 0.001);
        let _ = metrics.body_errors("default", gone);
        let _ = metrics.retries("default");
        let _ = metrics.retries("old");
        let _ = metrics.encode_with_backends([up("default", gone.to_owned())].into_iter());
        let config = crate::config::Config::single_upstream(vec![], vec![kept.parse().unwrap()]);

        metrics.retain(&Configured::of(&config));
        // A request that was in flight on the removed backend records into
        // handles whose series are gone: no panic, and nothing exported,
        // even under a code its handles had not met, which makes the
        // series again until the next scrape prunes it (soak53 2).
        removed.record(200, 0.002);
        removed.record(418, 0.002);
        let _ = metrics.encode_with_backends([up("default", kept.to_owned())].into_iter());
        let text = String::from_utf8(metrics.encode()).unwrap();
        for absent in [gone, "route=\"old\"", "upstream=\"old\""] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
        for present in [
            "portico_requests_total{code=\"200\",route=\"default\"} 1",
            "portico_requests_total{code=\"400\",route=\"_none\"} 1",
            "portico_upstream_requests_total{backend=\"10.0.0.1:80\",code=\"200\",upstream=\"default\"} 1",
            "portico_upstream_retries_total{upstream=\"default\"} 0",
        ] {
            assert!(text.contains(present), "no {present} in {text}");
        }
        // The handles of what stayed still count into the exported series.
        main.record(200, 0.001);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(text.contains("portico_requests_total{code=\"200\",route=\"default\"} 2"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cpu_seconds_are_exported_to_the_tick() {
        // Burn a little CPU so the count is not only what came before.
        let start = cpu_seconds().unwrap();
        let mut x = 0u64;
        while cpu_seconds().unwrap() < start + 0.05 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let metrics = Metrics::new();
        let before = cpu_seconds().unwrap();
        let text = String::from_utf8(metrics.encode()).unwrap();
        let after = cpu_seconds().unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("process_cpu_seconds_total "))
            .expect("exported");
        let exported: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        // Read between the two: whole seconds would fall below `before`
        // unless it happened to be whole.
        assert!(
            before <= exported && exported <= after,
            "{before} {exported} {after}"
        );
        assert_eq!(text.matches("# TYPE process_cpu_seconds_total").count(), 1);
    }
}
