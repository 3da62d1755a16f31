//! The response cache: an RFC 9111 shared cache held in memory. `policy`
//! decides (pure functions), `key` names entries, this module holds them in
//! a moka cache weighted by bytes with per-entry expiry, and `lock` makes
//! concurrent misses for one key share a single upstream fetch. How a
//! request flows through it lives in `proxy::cached`.

pub mod capture;
pub mod key;
pub mod lock;
pub mod policy;
#[cfg(test)]
mod policy_tests;
pub mod range;
pub mod targeted;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::StatusCode;
use moka::future::Cache as Moka;
use prometheus::IntCounter;

use crate::config;
use crate::metrics::Metrics;
use policy::{CacheControl, Timing};

/// How long a stale entry with a validator is kept for revalidation.
const REVALIDATE_GRACE: Duration = Duration::from_secs(300);
/// Fixed cost counted per entry besides its body and header bytes.
const ENTRY_OVERHEAD: usize = 256;

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub timing: Timing,
    pub lifetime: Duration,
    pub cc: CacheControl,
}

impl Entry {
    fn weight(&self, key: &str) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        u32::try_from(key.len() + self.body.len() + headers + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
    }

    /// How long the store keeps it: its remaining freshness plus the time
    /// it may still serve stale or be revalidated.
    fn keep_for(&self) -> Duration {
        let age = self.timing.current_age(self.timing.response_time);
        let fresh_left = self.lifetime.saturating_sub(age);
        let stale_window = Duration::from_secs(
            self.cc
                .stale_while_revalidate
                .unwrap_or(0)
                .max(self.cc.stale_if_error.unwrap_or(0)),
        );
        let validator = self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED);
        let grace = if validator {
            REVALIDATE_GRACE
        } else {
            Duration::ZERO
        };
        fresh_left + stale_window.max(grace)
    }

    pub fn etag(&self) -> Option<&http::HeaderValue> {
        self.headers.get(http::header::ETAG)
    }
}

struct EntryExpiry;

impl moka::Expiry<String, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &String,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.keep_for())
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.keep_for())
    }
}

/// Lookup outcomes counted in `portico_cache_lookups_total{result}`.
#[derive(Debug, Clone)]
pub struct Counters {
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub stale: IntCounter,
    pub revalidated: IntCounter,
    pub bypass: IntCounter,
}

pub struct Cache {
    pub config: config::Cache,
    store: Moka<String, Arc<Entry>>,
    /// Primary key -> the Vary field names of its latest stored response.
    vary: moka::sync::Cache<String, Arc<[HeaderName]>>,
    pub locks: lock::Locks,
    pub counters: Counters,
    metrics: Arc<Metrics>,
    /// Seconds added to the wall clock; lets tests age entries without
    /// sleeping.
    skew: AtomicU64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.config)
            .field("entries", &self.store.entry_count())
            .finish_non_exhaustive()
    }
}

impl Cache {
    pub fn new(config: config::Cache, metrics: Arc<Metrics>) -> Arc<Self> {
        let store = Moka::builder()
            .max_capacity(config.max_size)
            .weigher(|key: &String, entry: &Arc<Entry>| entry.weight(key))
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .build();
        let counters = Counters {
            hit: metrics.cache_lookup("hit"),
            miss: metrics.cache_lookup("miss"),
            stale: metrics.cache_lookup("stale"),
            revalidated: metrics.cache_lookup("revalidated"),
            bypass: metrics.cache_lookup("bypass"),
        };
        Arc::new(Cache {
            config,
            store,
            vary: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            locks: lock::Locks::default(),
            counters,
            metrics,
            skew: AtomicU64::new(0),
        })
    }

    /// The cache's notion of now (the wall clock, as HTTP dates are).
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_secs(self.skew.load(Ordering::Relaxed))
    }

    /// Moves the cache's clock forward (tests).
    pub fn advance_clock(&self, by: Duration) {
        self.skew.fetch_add(by.as_secs(), Ordering::Relaxed);
    }

    /// The full key for a request, if responses for `primary` are stored.
    pub fn key_for(&self, primary: &str, request: &HeaderMap) -> Option<String> {
        let names = self.vary.get(primary)?;
        Some(key::full(primary, &names, request))
    }

    pub async fn get(&self, full_key: &str) -> Option<Arc<Entry>> {
        self.store.get(full_key).await
    }

    /// Stores `entry` for the request whose headers are `request`.
    pub async fn insert(&self, primary: &str, request: &HeaderMap, entry: Entry) {
        let Some(names) = key::vary_names(&entry.headers) else {
            return;
        };
        let full = key::full(primary, &names, request);
        self.vary.insert(primary.to_owned(), names.into());
        if entry.weight(&full) as u64 > self.config.max_size {
            return;
        }
        self.store.insert(full, Arc::new(entry)).await;
    }

    /// Drops every variant stored for `primary` (RFC 9111 §4.4).
    pub fn invalidate(&self, primary: &str) {
        if self.vary.get(primary).is_none() {
            return;
        }
        self.vary.invalidate(primary);
        let primary = primary.to_owned();
        // Only fails when closures are unsupported, which `new` enables.
        let _ = self
            .store
            .invalidate_entries_if(move |k, _| key::primary_of(k) == primary);
    }

    /// Drops every entry whose path starts with `prefix` (admin purge).
    pub fn purge_prefix(&self, prefix: &str) {
        let prefix = prefix.to_owned();
        let _ = self
            .store
            .invalidate_entries_if(move |k, _| key::path_of(k).starts_with(&prefix));
    }

    pub fn purge_all(&self) {
        self.store.invalidate_all();
        self.vary.invalidate_all();
    }

    /// Entries and weighted bytes, after applying pending evictions; also
    /// refreshes the size gauges.
    pub async fn stats(&self) -> (u64, u64) {
        self.store.run_pending_tasks().await;
        let (entries, bytes) = (self.store.entry_count(), self.store.weighted_size());
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_size_bytes.set(bytes as i64);
        (entries, bytes)
    }
}
