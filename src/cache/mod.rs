//! The response cache: an RFC 9111 shared cache held in memory. `policy`
//! decides (pure functions), `key` names entries, this module holds them in
//! a moka cache weighted by bytes with per-entry expiry, and `lock` makes
//! concurrent misses for one key share a single upstream fetch. How a
//! request flows through it lives in `proxy::cached`.

pub mod capture;
mod copies;
pub use copies::Incompressible;
pub mod fill;
pub mod key;
pub mod lock;
pub mod policy;
#[cfg(test)]
mod policy_tests;
pub mod range;
pub mod targeted;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use moka::future::Cache as Moka;
use moka::notification::RemovalCause;
use prometheus::IntCounter;

use crate::config;
use crate::metrics::Metrics;
use policy::{CacheControl, Timing};

/// How long a stale entry with a validator is kept for revalidation.
const REVALIDATE_GRACE: Duration = Duration::from_secs(300);
/// How long a URL whose response was not stored is remembered as such
/// (Varnish's hit-for-miss objects live as long by default).
const UNCACHEABLE_FOR: Duration = Duration::from_secs(120);
/// URLs remembered so at most; past it, the least used are forgotten.
const UNCACHEABLE_URLS: u64 = 4096;
/// What one entry costs besides its body, header bytes and key, counted
/// so that `max_size` bounds memory, not only content: the `Entry` in its
/// `Arc`, the store's record of it (moka's node, its place in the LRU
/// order and the expiry wheel) and the index's, and the allocator's
/// headers. Measured: 20,000 stored 132-byte responses took 2.9 KB each
/// where 0.8 KB was counted before the header map and this were.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>() + 640;
/// What one slot of a header map costs: `HeaderMap` keeps a bucket (name,
/// value, hash and links) and an index per slot, and has more slots than
/// fields (`HeaderMap::capacity`).
const HEADER_SLOT: usize =
    std::mem::size_of::<HeaderName>() + std::mem::size_of::<HeaderValue>() + 40;

/// [`Entry::bytes`] of an entry under a key of `key_len` bytes, with
/// `headers` and a body of `body_len`.
fn weigh(key_len: usize, headers: &HeaderMap, body_len: usize) -> u64 {
    // Standard names are static, others own their bytes: all are counted,
    // which errs on the side of the bound.
    let names: usize = headers.keys().map(|n| n.as_str().len()).sum();
    let values: usize = headers.values().map(HeaderValue::len).sum();
    let slots = headers.capacity() * HEADER_SLOT;
    // The key is held once by the store and its variant's record, and the
    // URL's record holds the URL (the same copy without Vary): counted
    // twice, which errs on the side of the bound.
    let bytes = 2 * key_len + body_len + names + values + slots + ENTRY_OVERHEAD;
    bytes as u64
}

/// Whether a response with `status` is a new representation, which
/// replaces what is stored for its variant even when not stored itself
/// (RFC 9111 §4.3.3): a 2xx, a 3xx saying it moved, a 404 or 410 saying
/// it is gone. Not a 304, which confirms; not another 4xx, which answers
/// the request rather than tells of the resource (one client's 401, 403,
/// 412 or 429 would drop everyone's copy, review37e M1); nor a 5xx, which
/// a cache may take as no answer at all (the same section), and
/// stale-if-error exists for.
pub fn replaces(status: http::StatusCode) -> bool {
    match status.as_u16() {
        304 => false,
        200..=399 | 404 | 410 => true,
        _ => false,
    }
}

/// Takes `weight` off `held`, down to 0 at most.
fn take_off(held: &AtomicU64, weight: u64) {
    let _ = held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
        Some(held.saturating_sub(weight))
    });
}

/// Why [`Cache::insert_shared`] stored nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotKept {
    /// An invalidation overtook the fetch.
    Overtaken,
    /// What is stored was fetched by a request begun after this one's:
    /// it is the newer answer.
    Superseded,
    /// Its `Vary` cannot be read (decided before it got this far).
    Unmatchable,
    /// With its head and key it outweighs `max_size`.
    TooHeavy,
}

/// The `Cache-Status` response field (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// What `Cache-Status` says of a fresh hit.
pub const HIT: &str = "portico; hit";

/// How long a failed revalidation holds (see [`Entry::failing`]): as
/// nginx's `fail_timeout` keeps a failed server out.
pub const FAILING_HOLD: Duration = Duration::from_secs(10);

/// `time` in ms since the epoch, within the 48 bits [`Entry::failing`]
/// packs it in.
fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .min(u64::MAX >> 16)
}

/// One stored response. Made by [`Entry::new`].
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// The backend's reason phrase, kept for a status code without a
    /// standard one (599): hyper writes `<none>` for those otherwise
    /// (review32a L6).
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub timing: Timing,
    pub lifetime: Duration,
    pub cc: CacheControl,
    /// Set on a gzip copy ([`Cache::insert_copy`]): the entry it is a copy
    /// of. The weak reference keeps that entry's allocation, so no later
    /// entry takes its address while the copy may be found. A copy's
    /// `lifetime` is how long it is kept: what its entry had left.
    copy_of: Option<Weak<Entry>>,
    /// A hit is making a gzip copy of this entry: the others compress it
    /// for their clients alone.
    copying: AtomicBool,
    /// The levels (a bit each) of the gzip copies stored of this entry, so
    /// that they go when it does; a copy's own level.
    copied: AtomicU16,
    /// The levels at which its gzip copy came out no smaller than it: its
    /// gzip hits are sent as it is (see `copies`).
    incompressible: AtomicU16,
    /// Until when (ms since the epoch, by the cache's clock, in the high
    /// 48 bits) its last revalidation's failure (the status, in the low
    /// 16) holds: see [`Entry::failing`].
    failing: AtomicU64,
}

impl Entry {
    /// An entry to store. Its fields get the three a hit is served with,
    /// as a fresh hit has them: `Age` (the response's own, if it came with
    /// one), `Content-Length` and `Cache-Status` ([`HIT`]). A hit's copy of
    /// the fields then has `Age` replaced where it stands and the others
    /// kept. Appended to the copy, which has no room to spare, they grew
    /// it: an allocation and a move of every field per hit, ~1,100 of a
    /// 1 KiB hit's 23,600 instructions (callgrind).
    pub fn new(
        status: StatusCode,
        reason: Option<hyper::ext::ReasonPhrase>,
        mut headers: HeaderMap,
        body: Bytes,
        timing: Timing,
        lifetime: Duration,
        cc: CacheControl,
    ) -> Entry {
        headers
            .entry(http::header::AGE)
            .or_insert(HeaderValue::from_static("0"));
        // A 204 and a 304 have no content to measure (RFC 9110 §8.6).
        if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        headers.insert(CACHE_STATUS.clone(), HeaderValue::from_static(HIT));
        Entry {
            status,
            reason,
            headers,
            body,
            timing,
            lifetime,
            cc,
            copy_of: None,
            copying: AtomicBool::new(false),
            copied: AtomicU16::new(0),
            incompressible: AtomicU16::new(0),
            failing: AtomicU64::new(0),
        }
    }

    /// Notes that revalidating it failed at `now` with `status` (the
    /// backend's 5xx or portico's own 502 or 504), its stale copy served:
    /// see [`Entry::failing`].
    pub fn failed_at(&self, now: SystemTime, status: u16) {
        let until = epoch_ms(now + FAILING_HOLD);
        self.failing
            .store((until << 16) | u64::from(status), Ordering::Relaxed);
    }

    /// The status its last revalidation failed with, if that was less
    /// than [`FAILING_HOLD`] before `now`: while it holds, a request that
    /// stale-if-error lets have the copy gets it at once, and the copy is
    /// revalidated in the background, one refresh at a time, as Varnish's
    /// grace and nginx's `proxy_cache_use_stale updating` serve. Each
    /// request waited for its own revalidation to fail: behind a hung
    /// backend, `response_timeout` each (cache56 M2: 4.5 s, one after
    /// another).
    pub fn failing(&self, now: SystemTime) -> Option<u16> {
        let packed = self.failing.load(Ordering::Relaxed);
        (packed != 0 && epoch_ms(now) < packed >> 16).then_some((packed & 0xffff) as u16)
    }

    /// The memory the entry holds, as near as can be told: what
    /// `max_size` bounds and `portico_cache_size_bytes` reports.
    pub(crate) fn bytes(&self, key: &str) -> u64 {
        weigh(key.len(), &self.headers, self.body.len())
    }

    /// Whether the entry is too heavy to keep under `max_size`, or for
    /// the store's weights (32 bits: one past them would be counted as
    /// less than it holds, review34c L2).
    pub(crate) fn too_heavy(&self, key: &str, max_size: u64) -> bool {
        let bytes = self.bytes(key);
        bytes > max_size || bytes > u64::from(u32::MAX)
    }

    /// [`Entry::bytes`] as the store weighs it ([`Entry::too_heavy`]
    /// keeps out what it would not hold).
    fn weight(&self, key: &str) -> u32 {
        u32::try_from(self.bytes(key)).unwrap_or(u32::MAX)
    }

    fn keep_for(&self) -> Duration {
        match &self.copy_of {
            Some(_) => self.lifetime,
            None => keep_for(&self.timing, self.lifetime, &self.cc, &self.headers),
        }
    }

    pub fn etag(&self) -> Option<&http::HeaderValue> {
        self.headers.get(http::header::ETAG)
    }
}

/// A copy of `headers` for an entry to keep: the values in one allocation
/// of their own. hyper's values are slices of the read buffer of the
/// connection they came on (8 to 72 KiB), so kept as they are, a stored
/// 130-byte response held a whole buffer, and the store, counting its
/// bytes, took ten times `max_size` of memory (review30a F1).
pub(crate) fn detached(headers: &HeaderMap) -> HeaderMap {
    let mut all = bytes::BytesMut::with_capacity(headers.values().map(HeaderValue::len).sum());
    for value in headers.values() {
        all.extend_from_slice(value.as_bytes());
    }
    let mut all = all.freeze();
    let mut copy = HeaderMap::with_capacity(headers.keys_len());
    for (name, value) in headers {
        let own = all.split_to(value.len());
        // The bytes of a value that was valid are valid.
        let mut own = HeaderValue::from_maybe_shared(own).unwrap_or_else(|_| value.clone());
        own.set_sensitive(value.is_sensitive());
        copy.append(name, own);
    }
    copy
}

/// How long the store keeps a response: its remaining freshness plus the
/// time it may still serve stale or be revalidated. Zero for one that is
/// stale on arrival and can be neither: not worth storing.
pub(crate) fn keep_for(
    timing: &Timing,
    lifetime: Duration,
    cc: &CacheControl,
    headers: &HeaderMap,
) -> Duration {
    let age = timing.current_age(timing.response_time);
    let fresh_left = lifetime.saturating_sub(age);
    let stale_window = Duration::from_secs(
        cc.stale_while_revalidate
            .unwrap_or(0)
            .max(cc.stale_if_error.unwrap_or(0)),
    );
    let grace = if policy::has_validator(headers) {
        REVALIDATE_GRACE
    } else {
        Duration::ZERO
    };
    fresh_left + stale_window.max(grace)
}

struct EntryExpiry;

impl moka::Expiry<Arc<str>, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.keep_for())
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
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

/// What is stored under one primary key: the Vary field names of its
/// latest response (how a request finds its variant) and the variants in
/// the store, so an invalidation removes exactly those.
#[derive(Debug)]
struct Variants {
    names: Arc<[HeaderName]>,
    keys: Vec<Variant>,
}

/// One stored variant: its full key (the store's own, shared), and the
/// entry stored under it.
#[derive(Debug)]
struct Variant {
    key: Arc<str>,
    /// The entry's address: the store reports a value's removal after
    /// another may have taken its key (a purge of everything is lazy, and
    /// the old value is only pushed out by the next insert), so the report
    /// must name the value to drop its record. The removed value is alive
    /// while it is reported, so no entry listed shares its address.
    entry: usize,
}

/// The identity [`Variant::entry`] records.
fn address(entry: &Arc<Entry>) -> usize {
    Arc::as_ptr(entry) as usize
}

/// What [`Cache::not_stored`] remembers.
#[derive(Debug, Clone)]
enum Mark {
    /// Under a URL's hash: the `Vary` names of its response that was not
    /// stored, the salt its variants' marks are hashed with, and whether
    /// every variant is marked (`Vary: *`, or no `Vary` for a request
    /// without a forwarded variant, see [`key::push_forwarded`]; a
    /// forwarded host's `private` answer without `Vary` marks only its own
    /// variant, review50 L1).
    Url {
        names: Arc<[HeaderName]>,
        salt: u64,
        whole: bool,
    },
    /// Under a variant's hash (see [`Cache::variant_hash`]): its response
    /// was not stored.
    Variant,
}

/// Variants kept per primary key; past this the oldest is dropped, so a
/// `Vary` on a field with endless values cannot grow one record without
/// bound.
const MAX_VARIANTS: usize = 64;

/// The stripes of [`Cache::inserting`].
const INSERT_STRIPES: usize = 64;

/// Drops `full` from its primary's record once the store no longer holds
/// `entry` under it (expired, evicted for space, invalidated), and the
/// record with its last variant: the index lives exactly as long as what
/// it points to.
fn forget(index: &DashMap<Arc<str>, Variants>, full: &str, entry: &Arc<Entry>) {
    let primary = key::primary_of(full);
    let emptied = match index.get_mut(primary) {
        Some(mut variants) => {
            variants
                .keys
                .retain(|v| &*v.key != full || v.entry != address(entry));
            variants.keys.is_empty()
        }
        None => false,
    };
    if emptied {
        index.remove_if(primary, |_, variants| variants.keys.is_empty());
    }
}

pub struct Cache {
    /// `[cache] max_size`, the store's bound: fixed when the cache is
    /// made (a reload that changes it makes a new, empty one).
    pub max_size: u64,
    /// `[cache] max_object_size` and `default_ttl` (in nanoseconds),
    /// which a reload changes in place (see [`Cache::retune`]).
    max_object_size: AtomicU64,
    default_ttl: AtomicU64,
    /// `[cache] stale_if_error`, in seconds (see [`Cache::with_stale_default`]).
    stale_if_error: AtomicU64,
    store: Moka<Arc<str>, Arc<Entry>>,
    /// Primary key -> its stored variants. Never locked across a store
    /// call: the store's eviction listener takes it too.
    index: Arc<DashMap<Arc<str>, Variants>>,
    /// The gzip copies kept beside stored responses (see `copies`).
    copies: Arc<copies::Copies>,
    /// What the store holds, by its weights, and the room reserved for
    /// what is being stored: added as room is taken, taken off as the
    /// store reports entries removed. The store's own count is brought
    /// up to date only by its pending work.
    held: Arc<AtomicU64>,
    /// Weights of entries removed, not yet taken off `held`.
    freed: Arc<AtomicU64>,
    /// Stores between their taking room and the store's having the entry.
    reserving: Arc<AtomicU64>,
    /// Fetches begun, which numbers them (see [`fill::Fill`]).
    fetches: AtomicU64,
    /// Held by an insert from its index record to its store insert, one
    /// for the keys of each stripe: two inserts of one key interleaved
    /// could leave the index naming the entry the store had replaced, and
    /// the record then outlived what it pointed to (review34c L1).
    inserting: Box<[tokio::sync::Mutex<()>]>,
    /// Primary key -> the fetches under way for it (see [`fill`]).
    fills: DashMap<String, fill::Pending>,
    /// URLs and variants whose last response was not stored (see
    /// [`Cache::uncacheable`]), by a keyed hash: a long URL costs no more
    /// than a short one.
    uncacheable: moka::sync::Cache<u64, Mark>,
    url_hasher: std::hash::RandomState,
    /// Where the next [`Mark::Url`]'s salt comes from.
    salts: AtomicU64,
    pub locks: lock::Locks,
    pub counters: Counters,
    metrics: Arc<Metrics>,
    /// Seconds added to the wall clock; lets tests age entries without
    /// sleeping.
    skew: AtomicU64,
    /// Bytes the responses being stored hold in their copies, all fills
    /// together: at most `max_size` (see [`capture::Held`]).
    filling: Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes stored since the store last let go of what it removed (see
    /// [`Cache::let_go`]): as much, at most, is waiting to be freed.
    unsettled: AtomicU64,
    /// Replaced by a reload that changed `max_size` (see [`Cache::retire`]).
    retired: std::sync::atomic::AtomicBool,
    /// Some generation serving from it trusts proxies, whose forwarded
    /// host may not be the `Host` (see [`Cache::trust_forwarded_hosts`]).
    forwarded_hosts: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("max_size", &self.max_size)
            .field("max_object_size", &self.max_object_size())
            .field("default_ttl", &self.default_ttl())
            .field("entries", &self.store.entry_count())
            .finish_non_exhaustive()
    }
}

/// The removals an insert owes `store`, done by the insert or, if it is
/// dropped before it has done them, in a task of their own, so that a
/// caller dropped mid-insert leaves no copy an invalidation misses:
/// `dropped`, the variants the index let go of, and `full`, the entry
/// stored, if `fill` was overtaken ([`Undo::settle`]).
struct Undo<'a> {
    store: &'a Moka<Arc<str>, Arc<Entry>>,
    fill: &'a fill::Fill,
    full: Option<Arc<str>>,
    dropped: Vec<Arc<str>>,
}

impl Undo<'_> {
    /// Undoes the insert if the fill was overtaken; says whether it was.
    async fn settle(mut self) -> bool {
        let overtaken = self.fill.overtaken();
        if let Some(full) = self.full.as_ref().filter(|_| overtaken) {
            self.store.invalidate(full).await;
        }
        // Done: dropped mid-way, the removal above goes again on its own.
        self.full = None;
        overtaken
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let mut keys = std::mem::take(&mut self.dropped);
        keys.extend(self.full.take().filter(|_| self.fill.overtaken()));
        if keys.is_empty() {
            return;
        }
        let store = self.store.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for key in keys {
                    store.invalidate(&key).await;
                }
            });
        }
    }
}

impl Cache {
    pub fn new(config: config::Cache, metrics: Arc<Metrics>) -> Arc<Self> {
        let index: Arc<DashMap<Arc<str>, Variants>> = Arc::default();
        let copies: Arc<copies::Copies> = Arc::default();
        let held: Arc<AtomicU64> = Arc::default();
        let freed: Arc<AtomicU64> = Arc::default();
        let store = Moka::builder()
            .max_capacity(config.max_size)
            // Least recently used out first, as nginx and Varnish evict:
            // moka's default (TinyLFU) admits a new entry only if it is
            // likelier to be asked for than what it would evict, so a
            // large new object in a full cache was answered `stored` and
            // dropped, and fetched again on each request.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|key: &Arc<str>, entry: &Arc<Entry>| entry.weight(key))
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .eviction_listener({
                let index = index.clone();
                let evicted = metrics.cache_evictions.clone();
                let copies = copies.clone();
                let held = held.clone();
                let freed = freed.clone();
                move |key: Arc<Arc<str>>, entry: Arc<Entry>, cause| {
                    let weight = u64::from(entry.weight(&key));
                    // An entry removed or replaced by a call is reported
                    // before the store queues the change: room freed then
                    // could let another store's insert be queued first,
                    // and the store would evict for it (review47d M2).
                    // Freed once the call is done ([`Cache::settle_freed`];
                    // a copy's remover frees its room itself). Evictions
                    // and expiries are the store's own work, done: their
                    // room is free at once (review47e M1: held back, it
                    // made copies go and others be refused for nothing).
                    let housekeeping = matches!(cause, RemovalCause::Size | RemovalCause::Expired);
                    if housekeeping {
                        take_off(&held, weight);
                    } else if !entry.withdrawn() {
                        freed.fetch_add(weight, Ordering::Relaxed);
                    }
                    // A gzip copy is in no index, and is no response of
                    // its own to count.
                    if copies.removed(&key, &entry, cause) {
                        return;
                    }
                    if cause == RemovalCause::Size {
                        evicted.inc();
                    }
                    if cause != RemovalCause::Replaced {
                        forget(&index, &key, &entry);
                    }
                }
            })
            .build();
        let counters = Counters {
            hit: metrics.cache_lookup("hit"),
            miss: metrics.cache_lookup("miss"),
            stale: metrics.cache_lookup("stale"),
            revalidated: metrics.cache_lookup("revalidated"),
            bypass: metrics.cache_lookup("bypass"),
        };
        let cache = Arc::new(Cache {
            max_size: config.max_size,
            max_object_size: AtomicU64::new(0),
            default_ttl: AtomicU64::new(0),
            stale_if_error: AtomicU64::new(0),
            store,
            index,
            copies,
            held,
            freed,
            reserving: Arc::default(),
            fetches: AtomicU64::new(1),
            inserting: (0..INSERT_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            fills: DashMap::new(),
            uncacheable: moka::sync::Cache::builder()
                .max_capacity(UNCACHEABLE_URLS)
                .time_to_live(UNCACHEABLE_FOR)
                .build(),
            url_hasher: std::hash::RandomState::new(),
            salts: AtomicU64::new(0),
            locks: lock::Locks::default(),
            counters,
            metrics,
            skew: AtomicU64::new(0),
            filling: Arc::default(),
            unsettled: AtomicU64::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
            forwarded_hosts: std::sync::atomic::AtomicBool::new(false),
        });
        cache.retune(&config);
        cache
    }

    /// Whether a reload to `config` keeps this cache and what it holds:
    /// only a new `max_size` needs a new store.
    pub fn keeps(&self, config: &config::Cache) -> bool {
        self.max_size == config.max_size
    }

    /// Applies `config`'s `max_object_size` and `default_ttl` to what is
    /// stored from now on; what is stored keeps its lifetime and stays
    /// until it expires or is evicted, as Varnish's objects keep the TTL
    /// they were fetched with across a VCL reload.
    ///
    /// Says whether anything changed; if so, the marks of what was not
    /// stored go (see [`Cache::uncacheable`]): a response too large for
    /// the old `max_object_size`, or without freshness under the old
    /// `default_ttl`, would otherwise pass the cache by for minutes more
    /// (review61 L2: ranges of a video too large before were not stored).
    pub fn retune(&self, config: &config::Cache) -> bool {
        let nanos = u64::try_from(config.default_ttl.as_nanos()).unwrap_or(u64::MAX);
        let size = self
            .max_object_size
            .swap(config.max_object_size, Ordering::Relaxed);
        let ttl = self.default_ttl.swap(nanos, Ordering::Relaxed);
        // Whole seconds, as the directive has them: "500ms" is one, not
        // none (review66 L5).
        let stale =
            config.stale_if_error.as_secs() + u64::from(config.stale_if_error.subsec_nanos() > 0);
        let was_stale = self.stale_if_error.swap(stale, Ordering::Relaxed);
        let changed = size != config.max_object_size || ttl != nanos || was_stale != stale;
        if changed {
            self.uncacheable.invalidate_all();
        }
        changed
    }

    /// `[cache] max_object_size`: larger responses are not stored.
    pub fn max_object_size(&self) -> u64 {
        self.max_object_size.load(Ordering::Relaxed)
    }

    /// `[cache] default_ttl`: the lifetime of a response without one of
    /// its own.
    pub fn default_ttl(&self) -> Duration {
        Duration::from_nanos(self.default_ttl.load(Ordering::Relaxed))
    }

    /// `cc`, the directives of a response being stored, with `[cache]
    /// stale_if_error` as its `stale-if-error` when it gives none and
    /// allows stale use at all (no `no-cache`, `must-revalidate`,
    /// `proxy-revalidate` or `s-maxage`, RFC 9111 §4.2.4): the operator's
    /// leave to serve it stale while its backend fails, as nginx's
    /// `proxy_cache_use_stale error timeout http_5xx` and Varnish's grace
    /// give, where without one a stored copy went unused in an outage
    /// (cache56 H2). The entry is kept that much longer too.
    pub fn with_stale_default(&self, mut cc: CacheControl) -> CacheControl {
        let window = self.stale_if_error.load(Ordering::Relaxed);
        if window > 0 && cc.stale_if_error.is_none() && !cc.forbids_stale() {
            cc.stale_if_error = Some(window);
        }
        cc
    }

    /// Says a generation serving from the cache trusts proxies: from then
    /// on a forwarded host that is not the `Host` is a variant of its own,
    /// as are the other claims a trusted proxy passes on
    /// ([`key::push_forwarded`]). Never taken back, so the requests of an
    /// older generation that trusted one still key on them after a reload
    /// that trusts none. Without trusted proxies, portico writes the
    /// `Host` as the forwarded host and drops the claims, and the look is
    /// spared.
    pub fn trust_forwarded_hosts(&self) {
        self.forwarded_hosts.store(true, Ordering::Relaxed);
    }

    /// The full key of `request`'s variant of `primary`, its `Vary`
    /// naming `names`.
    fn full_key(&self, primary: &str, names: &[HeaderName], request: &HeaderMap) -> String {
        let mut full = key::full(primary, names, request);
        if self.forwarded_hosts.load(Ordering::Relaxed) {
            key::push_forwarded(&mut full, primary, request);
        }
        full
    }

    /// Marks the cache replaced by a reload's new one: the access lines of
    /// the fetches still filling it say `detail=invalidated` rather than
    /// `stored`, as no later request will find their copies (review39d
    /// L1; see `capture::Capture::finish`). The requests still on it go
    /// on as before, waiters served from the fetch they wait on.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Whether a reload replaced the cache ([`Cache::retire`]).
    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
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
        let variants = self.index.get(primary)?;
        Some(self.full_key(primary, &variants.names, request))
    }

    /// The key concurrent fetches for this request share a lock by: its
    /// variant's, once a `Vary` is known, from what is stored or else from
    /// the URL's answer that was not stored (so requests for a URL never
    /// stored, whose answers vary by a session cookie, do not queue behind
    /// one another's fetches); the URL otherwise.
    pub fn lock_key_for(&self, primary: &str, request: &HeaderMap) -> Option<String> {
        if let Some(full) = self.key_for(primary, request) {
            return Some(full);
        }
        match self.uncacheable.get(&self.url_hash(primary)) {
            Some(Mark::Url { names, whole, .. }) if !whole => {
                Some(self.full_key(primary, &names, request))
            }
            _ => None,
        }
    }

    /// Whether the URL's record lists variants, none of them `full` (a
    /// variant expired and not yet dropped from the record is listed):
    /// RFC 9211's `vary-miss`. A record left without any (its last variant
    /// dropped, the record not yet) is a plain miss (review50b L3).
    pub fn lists_others_only(&self, primary: &str, full: &str) -> bool {
        self.index.get(primary).is_some_and(|variants| {
            !variants.keys.is_empty() && variants.keys.iter().all(|v| &*v.key != full)
        })
    }

    /// Notes that a response for `primary` with `status`, to a request
    /// with `request` headers, was not stored (not storable, or too
    /// large). When it [`replaces`] what was stored, requests for that
    /// variant then go to the backend for a while without waiting on each
    /// other, and a range as it is, instead of having the whole response
    /// fetched for a store that will not happen; a server error or a 304
    /// says nothing of the next responses. The variant is the response's
    /// own `Vary`, as Varnish's hit-for-miss objects obey it: a logged-in
    /// user's `private` answer with `Vary: Cookie` does not mark the
    /// anonymous variant.
    pub fn not_stored(
        &self,
        primary: &str,
        request: &HeaderMap,
        response: &HeaderMap,
        status: http::StatusCode,
    ) {
        if !replaces(status) {
            return;
        }
        // `Vary: *` varies on everything: the whole URL is marked.
        let vary = key::vary_names(response);
        let star = vary.is_none();
        let names = vary.unwrap_or_default();
        let full = self.full_key(primary, &names, request);
        let whole = star || full.len() == primary.len();
        let hash = self.url_hash(primary);
        // Read first: a URL that is never stored says so on every request,
        // and a lookup costs less than an insert. A mark of every variant
        // takes in one of a variant; one of a variant gives way to one of
        // every variant.
        let salt = match self.uncacheable.get(&hash) {
            Some(Mark::Url {
                names: known,
                salt,
                whole: all,
            }) if *known == *names && (all || !whole) => salt,
            _ => {
                let salt = self.salts.fetch_add(1, Ordering::Relaxed);
                let names = names.clone().into();
                let mark = Mark::Url { names, salt, whole };
                self.uncacheable.insert(hash, mark);
                salt
            }
        };
        if !whole {
            let variant = self.salted(salt, &full);
            if !self.uncacheable.contains_key(&variant) {
                self.uncacheable.insert(variant, Mark::Variant);
            }
        }
    }

    /// Whether the last response for this request's variant of `primary`,
    /// in the last two minutes, was not stored.
    pub fn uncacheable(&self, primary: &str, request: &HeaderMap) -> bool {
        match self.uncacheable.get(&self.url_hash(primary)) {
            Some(Mark::Url { names, salt, whole }) => {
                whole
                    || self
                        .uncacheable
                        .contains_key(&self.variant_hash(salt, primary, &names, request))
            }
            _ => false,
        }
    }

    /// Takes back the mark of the variant just stored, or the URL's when
    /// its mark is for every variant or for another `Vary`.
    fn stored(&self, primary: &str, names: &[HeaderName], full: &str) {
        let hash = self.url_hash(primary);
        match self.uncacheable.get(&hash) {
            Some(Mark::Url {
                names: marked,
                salt,
                whole: false,
            }) if *marked == *names => {
                self.uncacheable.invalidate(&self.salted(salt, full));
            }
            Some(_) => self.uncacheable.invalidate(&hash),
            None => {}
        }
    }

    /// Whether any answer for `primary`, in the last two minutes, was not
    /// stored, whatever its variant: a range for such a URL goes to the
    /// backend as it is rather than have a whole response fetched for a
    /// store that would most likely not happen.
    pub fn uncacheable_anywhere(&self, primary: &str) -> bool {
        self.uncacheable.contains_key(&self.url_hash(primary))
    }

    fn url_hash(&self, primary: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.url_hasher, primary)
    }

    /// A variant's mark: its full key hashed with its URL mark's salt, so
    /// the variants marked under a URL mark that is gone (invalidated,
    /// replaced) are never read again.
    fn variant_hash(
        &self,
        salt: u64,
        primary: &str,
        names: &[HeaderName],
        request: &HeaderMap,
    ) -> u64 {
        self.salted(salt, &self.full_key(primary, names, request))
    }

    /// The mark of the variant with key `full` under a URL mark's `salt`.
    fn salted(&self, salt: u64, full: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.url_hasher, (salt, full))
    }

    pub async fn get(&self, full_key: &str) -> Option<Arc<Entry>> {
        self.store.get(full_key).await
    }

    /// A fetch for `primary` whose answer may be stored: taken before the
    /// request goes to the backend.
    pub fn begin_fill(self: &Arc<Self>, primary: String) -> fill::Fill {
        fill::Fill::begin(self, primary)
    }

    /// Stores `entry`, fetched by `fill`, for the request whose headers are
    /// `request`; nothing if the URL was invalidated since the fetch began.
    pub async fn insert(&self, fill: &fill::Fill, request: &HeaderMap, entry: Entry) {
        let _ = self.insert_shared(fill, request, Arc::new(entry)).await;
    }

    /// [`Cache::insert`] for an entry someone else holds too.
    ///
    /// Whether it was stored, for the access line: not when overtaken, nor
    /// when the entry with its head and key outweighs `max_size` (a head
    /// near 72 KiB and a body near `max_object_size` in a small cache,
    /// review33d F8).
    pub async fn insert_shared(
        &self,
        fill: &fill::Fill,
        request: &HeaderMap,
        entry: Arc<Entry>,
    ) -> Result<(), NotKept> {
        self.drop_orphans().await;
        if fill.overtaken() {
            return Err(NotKept::Overtaken);
        }
        let primary = fill.primary();
        let Some(names) = key::vary_names(&entry.headers) else {
            return Err(NotKept::Unmatchable);
        };
        let full = self.full_key(primary, &names, request);
        if entry.too_heavy(&full, self.max_size) {
            return Err(NotKept::TooHeavy);
        }
        // One copy of the key for the store and the index, and for a URL
        // without Vary for its record too: each held its own, so an entry
        // with a long URL held three (review34b F2: a 32 MiB cache of
        // 60 KB URLs took 78 MB); weighed as two (see `Entry::bytes`).
        let mut full: Arc<str> = full.into();
        let names: Arc<[HeaderName]> = names.into();
        // Room first, before the index names the entry: gzip copies go to
        // make it (a store dropped on the way gives the room back).
        let weight = u64::from(entry.weight(&full));
        let room = self.make_room(weight).await;
        let stripe = std::hash::BuildHasher::hash_one(&self.url_hasher, &*full) as usize;
        let _inserting = self.inserting[stripe % INSERT_STRIPES].lock().await;
        // A fetch begun before one whose answer was stored brings an older
        // answer, whichever came back last (RFC 9111 §4 has a cache use
        // the most recent response): a revalidation begun before a
        // `no-cache` fetch and ending after it would put the older body
        // back. Its own fill keeps the URL's record of stores alive from
        // before the later fetch began, so one evicted since counts too.
        if self.superseded(fill, &full) {
            return Err(NotKept::Superseded);
        }
        let dropped = {
            let mut variants = match self.index.get_mut(primary) {
                Some(variants) => variants,
                None => {
                    let record = if *full == *primary {
                        full.clone()
                    } else {
                        primary.into()
                    };
                    self.index.entry(record).or_insert_with(|| Variants {
                        names: names.clone(),
                        keys: Vec::new(),
                    })
                }
            };
            let mut dropped = Vec::new();
            if *variants.names != *names {
                // Vary changed: the old variants can no longer be found.
                dropped = std::mem::take(&mut variants.keys);
                variants.names = names.clone();
            }
            match variants.keys.iter_mut().find(|v| v.key == full) {
                Some(listed) => {
                    listed.entry = address(&entry);
                    full = listed.key.clone();
                }
                None => {
                    // The oldest goes; the oldest forwarded variant first
                    // (see `key::push_forwarded`), so that hosts a client
                    // forges through a balancer that passes them on push
                    // out only one another, never the URL's own page
                    // (review50 L2).
                    if variants.keys.len() >= MAX_VARIANTS {
                        let forwarded = variants
                            .keys
                            .iter()
                            .position(|v| key::is_forwarded_variant(&v.key));
                        dropped.push(variants.keys.remove(forwarded.unwrap_or(0)));
                    }
                    variants.keys.push(Variant {
                        key: full.clone(),
                        entry: address(&entry),
                    });
                }
            }
            dropped
        };
        // The variants the index no longer lists go from the store too,
        // and the undo below is done, even if the caller (a
        // revalidation's request, its client gone) is dropped on the way
        // (review38c, review38f).
        let mut undo = Undo {
            store: &self.store,
            fill,
            full: None,
            dropped: dropped.into_iter().map(|variant| variant.key).collect(),
        };
        while let Some(key) = undo.dropped.last() {
            self.store.invalidate(key).await;
            undo.dropped.pop();
        }
        undo.full = Some(full.clone());
        self.store.insert(full.clone(), entry).await;
        room.taken();
        // What it replaced.
        self.settle_freed();
        self.stored(primary, &names, &full);
        self.note_stored(fill, &full);
        // An invalidation marks fills before it reads the index. Overtaken
        // since the check above, it may have missed this key, or dropped it
        // before the store took it: undo. Not overtaken yet, any later
        // invalidation finds the key in the index and the entry stored.
        let overtaken = undo.settle().await;
        self.brought(weight).await;
        if overtaken {
            return Err(NotKept::Overtaken);
        }
        Ok(())
    }

    /// Counts `weight` stored. What a store evicts or replaces weighs
    /// about what it brings: freed ([`Cache::let_go`]) once a 32nd of
    /// `max_size` has come in (moka's own pass frees it too, every few
    /// dozen writes). At every store it cost a 1 KiB miss 9% more.
    async fn brought(&self, weight: u64) {
        let unsettled = self.unsettled.fetch_add(weight, Ordering::Relaxed) + weight;
        if unsettled >= (self.max_size / 32).max(1) {
            self.unsettled.store(0, Ordering::Relaxed);
            self.let_go().await;
        }
    }

    /// Frees what the store has let go of, now: the entries an insert
    /// evicted or replaced, and those invalidated. moka applies evictions
    /// and removals as pending work, done at some later operation, and
    /// frees a removed entry once its epoch collector has moved on twice
    /// (crossbeam-epoch's deferred destruction). Left to that, a burst of
    /// large stores into a full cache, or a purge, held 5-10 times
    /// `max_size` resident until the next requests came, idle or not:
    /// 40 responses of 7 MB into a 32 MiB cache left 167 MB resident
    /// (review38b H1). Paid by removals, and by stores once they have
    /// brought a 32nd of `max_size`; never by a hit.
    pub async fn let_go(&self) {
        self.store.run_pending_tasks().await;
        // The copies of the entries it removed go with them.
        if self.drop_orphans().await {
            self.store.run_pending_tasks().await;
        }
        self.settle_freed();
        // Each flush seals this thread's garbage, moves the epoch on once
        // if no thread is pinned behind it, and frees what is two epochs
        // old: three free what the work above removed.
        for _ in 0..3 {
            crossbeam_epoch::pin().flush();
        }
    }

    /// Drops every variant stored for `primary` (RFC 9111 §4.4): exactly
    /// the keys the index lists, with no scan of the store. Fetches for it
    /// under way will not store what they bring.
    pub async fn invalidate(&self, primary: &str) {
        self.overtake(primary);
        self.uncacheable.invalidate(&self.url_hash(primary));
        self.forget(primary).await;
    }

    /// Drops the variant stored under `full` (its record in the index goes
    /// with it, by the store's eviction listener).
    pub async fn forget_variant(&self, full: &str) {
        self.store.invalidate(full).await;
        self.let_go().await;
    }

    /// Drops every variant stored for `primary`, and nothing else: a
    /// response that replaced them could not be stored itself.
    pub async fn forget(&self, primary: &str) {
        let Some((_, variants)) = self.index.remove(primary) else {
            return;
        };
        for variant in &variants.keys {
            self.store.invalidate(&variant.key).await;
        }
        self.let_go().await;
    }

    /// Drops every stored response whose host and path (with its query)
    /// `matches` (admin purge); fetches under way for such a URL will not
    /// store. Returns how many were stored: a scan of the store (an answer
    /// that says what it did shows a prefix that matched nothing), so
    /// callers on the runtime run it as blocking work.
    pub fn purge_paths(&self, matches: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> u64 {
        self.overtake_paths(Some(&matches));
        // Hashes cannot be matched against a prefix: all are forgotten.
        self.uncacheable.invalidate_all();
        let matching = move |k: &str| {
            let (host, path) = key::host_and_path_of(k);
            matches(host, path)
        };
        let found = self
            .store
            .iter()
            .filter(|(k, entry)| !entry.is_copy() && matching(k))
            .count() as u64;
        let _ = self.store.invalidate_entries_if(move |k, _| matching(k));
        found
    }

    /// Drops everything stored; returns how many responses that was:
    /// moka's count once its pending work is done (without it, the count
    /// missed recent stores and kept earlier purges: review31f).
    pub async fn purge_all(&self) -> u64 {
        let (found, _) = self.stats().await;
        self.overtake_paths(None);
        self.store.invalidate_all();
        self.index.clear();
        self.uncacheable.invalidate_all();
        self.let_go().await;
        found
    }

    /// Entries stored, as the index lists them: a walk over it, for the
    /// reload that drops the cache (a few milliseconds a million URLs).
    pub fn entries_estimate(&self) -> u64 {
        // The index, kept as entries are stored: the store's own count is
        // brought up to date only by its pending tasks, and said 0 of a
        // cache of 3 at a reload (review43b L1).
        self.index
            .iter()
            .map(|variants| variants.keys.len() as u64)
            .sum()
    }

    /// Entries and weighted bytes, after applying pending evictions; also
    /// refreshes the size gauges.
    pub async fn stats(&self) -> (u64, u64) {
        self.settle_held().await;
        let copies = self.copies.count();
        let entries = self.store.entry_count().saturating_sub(copies);
        let bytes = self.store.weighted_size();
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_size_bytes.set(bytes as i64);
        let bound = i64::try_from(self.max_size).unwrap_or(i64::MAX);
        self.metrics.cache_max_size_bytes.set(bound);
        (entries, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::copies::copy_key;
    use super::*;
    use crate::test_support::headers as map;

    const PRIMARY: &str = "GET|http|shop|/x";

    /// A failed revalidation holds for [`FAILING_HOLD`], with its status.
    #[test]
    fn a_failed_revalidation_holds_for_a_while() {
        let now = SystemTime::now();
        let entry = entry("");
        assert_eq!(entry.failing(now), None);
        entry.failed_at(now, 504);
        assert_eq!(entry.failing(now), Some(504));
        assert_eq!(
            entry.failing(now + FAILING_HOLD - Duration::from_millis(1)),
            Some(504)
        );
        assert_eq!(entry.failing(now + FAILING_HOLD), None);
    }

    fn cache() -> Arc<Cache> {
        Cache::new(config::Cache::default(), Arc::new(Metrics::new()))
    }

    /// Stores as a fetch begun just now would.
    async fn store(cache: &Arc<Cache>, request: &HeaderMap, entry: Entry) {
        let fill = cache.begin_fill(PRIMARY.to_owned());
        cache.insert(&fill, request, entry).await;
    }

    fn entry(vary: &str) -> Entry {
        let now = SystemTime::now();
        Entry {
            status: StatusCode::OK,
            reason: None,
            headers: map(&[("vary", vary), ("cache-control", "max-age=60")]),
            body: Bytes::from_static(b"x"),
            timing: Timing::new(&HeaderMap::new(), now, now),
            lifetime: Duration::from_secs(60),
            cc: CacheControl::default(),
            copy_of: None,
            copying: AtomicBool::new(false),
            copied: AtomicU16::new(0),
            incompressible: AtomicU16::new(0),
            failing: AtomicU64::new(0),
        }
    }

    #[tokio::test]
    async fn invalidation_removes_every_variant_and_the_index() {
        let cache = cache();
        let gzip = map(&[("accept-encoding", "gzip")]);
        let plain = map(&[("accept-encoding", "identity")]);
        store(&cache, &gzip, entry("accept-encoding")).await;
        store(&cache, &plain, entry("accept-encoding")).await;
        let keys = [&gzip, &plain].map(|h| cache.key_for(PRIMARY, h).unwrap());
        assert_ne!(keys[0], keys[1]);
        for key in &keys {
            assert!(cache.get(key).await.is_some());
        }
        cache.invalidate(PRIMARY).await;
        assert!(cache.key_for(PRIMARY, &gzip).is_none());
        for key in &keys {
            assert!(cache.get(key).await.is_none(), "{key} survived");
        }
    }

    /// What the store holds under `key`, copies too.
    async fn held(cache: &Cache, key: &str) -> bool {
        cache.store.get(key).await.is_some()
    }

    /// [`Cache::insert_copy`] with no head: these tests weigh and find
    /// copies by their bodies.
    async fn keep_copy(
        cache: &Cache,
        key: &str,
        level: u32,
        entry: &Arc<Entry>,
        body: Bytes,
    ) -> bool {
        cache
            .insert_copy(key, level, entry, HeaderMap::new(), body)
            .await
    }

    /// The body of `entry`'s copy at `level`, if one is kept.
    async fn copy_body(cache: &Cache, key: &str, level: u32, entry: &Arc<Entry>) -> Option<Bytes> {
        let copy = cache.copy_for(key, level, entry).await?;
        Some(copy.body.clone())
    }

    #[tokio::test]
    async fn a_gzip_copy_is_found_through_its_entry_alone_and_weighed_apart() {
        let cache = cache();
        let request = HeaderMap::new();
        store(&cache, &request, entry("accept")).await;
        let key = cache.key_for(PRIMARY, &request).unwrap();
        let stored = cache.get(&key).await.unwrap();
        let (_, alone) = cache.stats().await;
        let copy = Bytes::from(vec![7u8; 500]);
        assert!(stored.claim_copy(2));
        assert!(keep_copy(&cache, &key, 2, &stored, copy.clone()).await);
        stored.release_copy();
        assert_eq!(copy_body(&cache, &key, 2, &stored).await, Some(copy));
        // Stored at this level, a copy is not claimed again; at another
        // level it is another copy.
        assert!(!stored.claim_copy(2));
        assert_eq!(copy_body(&cache, &key, 6, &stored).await, None);
        // One stored response, weighing its copy too.
        let (entries, bytes) = cache.stats().await;
        assert_eq!(entries, 1);
        assert!(bytes >= alone + 500, "{bytes} against {alone}");
        // A purge counts responses, and takes the copies with them.
        assert_eq!(cache.purge_paths(|_, _| true), 1);
        assert!(!held(&cache, &copy_key(&key, 2)).await);
        assert_eq!(cache.stats().await, (0, 0));
        assert_eq!(cache.copies.count(), 0);

        // Stored again, the entry is another: the copy is not of it.
        store(&cache, &request, entry("accept")).await;
        let replaced = cache.get(&key).await.unwrap();
        assert_eq!(copy_body(&cache, &key, 2, &replaced).await, None);
        // A copy of the new entry, then one made of the old entry while it
        // was compressed: the late one is not kept, and leaves the new
        // entry's copy where it is (review47b L1).
        assert!(keep_copy(&cache, &key, 2, &replaced, Bytes::from_static(b"new")).await);
        assert!(!keep_copy(&cache, &key, 2, &stored, Bytes::from_static(b"old")).await);
        assert_eq!(copy_body(&cache, &key, 2, &stored).await, None);
        let kept = copy_body(&cache, &key, 2, &replaced).await;
        assert_eq!(kept.as_deref(), Some(&b"new"[..]));
        assert_eq!(cache.stats().await.0, 1);
    }

    #[tokio::test]
    async fn a_gzip_copy_goes_with_its_entry() {
        /// Stores an entry and a copy of it: their keys.
        async fn copy_of(cache: Arc<Cache>) -> (String, String) {
            let request = HeaderMap::new();
            store(&cache, &request, entry("accept")).await;
            let key = cache.key_for(PRIMARY, &request).unwrap();
            let stored = cache.get(&key).await.unwrap();
            assert!(keep_copy(&cache, &key, 2, &stored, Bytes::from_static(b"gz")).await);
            let copy = copy_key(&key, 2);
            (key, copy)
        }
        let cache = cache();
        let request = HeaderMap::new();
        // Invalidated (an unsafe method's answer).
        let (_, copy) = copy_of(cache.clone()).await;
        cache.invalidate(PRIMARY).await;
        assert!(!held(&cache, &copy).await, "invalidated");
        // Replaced by a new response.
        let (_, copy) = copy_of(cache.clone()).await;
        store(&cache, &request, entry("accept")).await;
        cache.stats().await;
        assert!(!held(&cache, &copy).await, "replaced");
        // A copy is kept as long as its entry has left (60 s from its
        // storing), not the entry's whole time from the copy's making
        // (review47b M1: a copy made at minute 59 of an hour outlived its
        // entry by 59 minutes).
        let (key, _) = copy_of(cache.clone()).await;
        cache.advance_clock(Duration::from_secs(50));
        let stored = cache.get(&key).await.unwrap();
        assert!(keep_copy(&cache, &key, 3, &stored, Bytes::from_static(b"gz")).await);
        let late = cache.store.get(&*copy_key(&key, 3)).await.unwrap();
        let left = late.keep_for();
        assert!(
            left <= Duration::from_secs(10) && left > Duration::from_secs(9),
            "{left:?}"
        );
        // Two copies of one entry at two levels (a reload between them):
        // both go with it (review47d L2).
        assert_eq!(cache.stats().await.0, 1);
        assert_eq!(cache.copies.count(), 2);
        cache.invalidate(PRIMARY).await;
        assert_eq!(cache.stats().await, (0, 0));
        assert_eq!(cache.copies.count(), 0);
    }

    /// Stores a response of `size` bytes under `path`: its key and entry.
    async fn store_at(cache: &Arc<Cache>, path: &str, size: usize) -> (String, Arc<Entry>) {
        let primary = key::primary("http", "shop", path);
        let fill = cache.begin_fill(primary.clone());
        let mut stored = entry("accept");
        stored.body = Bytes::from(vec![b'x'; size]);
        cache.insert(&fill, &HeaderMap::new(), stored).await;
        let key = cache.key_for(&primary, &HeaderMap::new()).unwrap();
        let entry = cache.get(&key).await.unwrap();
        (key, entry)
    }

    /// What a response of 10,000 bytes weighs, and a copy of it of 8,000,
    /// weighed in a cache of their own.
    async fn weights() -> (u64, u64) {
        let cache = cache();
        let (key, stored) = store_at(&cache, "/a", 10_000).await;
        let copy = Bytes::from(vec![b'z'; 8_000]);
        assert!(keep_copy(&cache, &key, 2, &stored, copy).await);
        let copy = cache.store.get(&*copy_key(&key, 2)).await.unwrap();
        (stored.bytes(&key), copy.bytes(&copy_key(&key, 2)))
    }

    #[tokio::test]
    async fn copies_take_only_the_room_responses_leave_free() {
        let (response, copy_weight) = weights().await;
        // Room for three responses, or two and one copy, not two copies.
        assert!(2 * copy_weight > response);
        let config = config::Cache {
            max_size: 3 * response + (2 * copy_weight - response) / 2,
            ..config::Cache::default()
        };
        let cache = Cache::new(config, Arc::new(Metrics::new()));
        let (a, stored_a) = store_at(&cache, "/a", 10_000).await;
        let (b, stored_b) = store_at(&cache, "/b", 10_000).await;
        let copy = Bytes::from(vec![b'z'; 8_000]);
        assert!(keep_copy(&cache, &a, 2, &stored_a, copy.clone()).await);
        assert!(!keep_copy(&cache, &b, 2, &stored_b, copy.clone()).await);
        // A third response needs the room: the copy goes, no response.
        let (c, _) = store_at(&cache, "/c", 10_000).await;
        assert!(
            cache.copy_for(&a, 2, &stored_a).await.is_none(),
            "copy kept"
        );
        for key in [&a, &b, &c] {
            assert!(held(&cache, key).await, "{key} evicted");
        }
        assert_eq!(cache.stats().await.0, 3);
        assert_eq!(cache.copies.count(), 0);
        // With room again, a copy of a is made again (review47d M1).
        cache.invalidate(&key::primary("http", "shop", "/c")).await;
        assert!(stored_a.claim_copy(2));
        stored_a.release_copy();
        assert!(keep_copy(&cache, &a, 2, &stored_a, copy.clone()).await);

        // A response and its copy too large together: the copy is refused,
        // rather than evict the response it was made of (review47a M1).
        let cache = Cache::new(
            config::Cache {
                max_size: response + copy_weight / 2,
                ..config::Cache::default()
            },
            Arc::new(Metrics::new()),
        );
        let (key, stored) = store_at(&cache, "/a", 10_000).await;
        assert!(!keep_copy(&cache, &key, 2, &stored, copy).await);
        assert!(held(&cache, &key).await);
    }

    #[tokio::test]
    async fn an_answer_to_an_earlier_fetch_does_not_replace_a_later_one() {
        let cache = cache();
        let request = HeaderMap::new();
        let earlier = cache.begin_fill(PRIMARY.to_owned());
        let later = cache.begin_fill(PRIMARY.to_owned());
        let mut newer = entry("accept");
        newer.body = Bytes::from_static(b"v2");
        assert!(cache
            .insert_shared(&later, &request, Arc::new(newer))
            .await
            .is_ok());
        // Evicted since (a busy cache), it is still the newer answer.
        let key = cache.key_for(PRIMARY, &request).unwrap();
        cache.forget_variant(&key).await;
        // The earlier fetch's answer comes back last (review47c L1: a
        // revalidation begun before a `no-cache` fetch replaced its
        // answer with the older body).
        let older = Arc::new(entry("accept"));
        let kept = cache.insert_shared(&earlier, &request, older).await;
        assert_eq!(kept, Err(NotKept::Superseded));
        assert!(cache.get(&key).await.is_none());
        // A fetch begun after both is stored.
        let next = cache.begin_fill(PRIMARY.to_owned());
        let newest = Arc::new(entry("accept"));
        assert!(cache.insert_shared(&next, &request, newest).await.is_ok());
        assert_eq!(&cache.get(&key).await.unwrap().body[..], b"x");
    }

    #[tokio::test]
    async fn the_room_of_expired_responses_is_free_at_once() {
        let (response, copy_weight) = weights().await;
        // Room for 4 responses and 1 copy.
        let config = config::Cache {
            max_size: 4 * response + copy_weight + 100,
            ..config::Cache::default()
        };
        let cache = Cache::new(config, Arc::new(Metrics::new()));
        let (a, stored_a) = store_at(&cache, "/a", 10_000).await;
        let copy = Bytes::from(vec![b'z'; 8_000]);
        assert!(keep_copy(&cache, &a, 2, &stored_a, copy).await);
        // Three responses of a second's life.
        for i in 0..3 {
            let primary = key::primary("http", "shop", &format!("/s{i}"));
            let fill = cache.begin_fill(primary);
            let mut brief = entry("accept");
            brief.body = Bytes::from(vec![b'x'; 10_000]);
            brief.lifetime = Duration::from_secs(1);
            cache.insert(&fill, &HeaderMap::new(), brief).await;
        }
        // The store's clock is its own: waited out, not advanced.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The store's own work, which a hit may run, finds them expired.
        cache.store.run_pending_tasks().await;
        assert_eq!(cache.store.entry_count(), 2, "a and its copy left");
        // Room for three responses is free: a new one takes no copy's
        // (review47e M1: it was counted as used until a store ended).
        let (b, _) = store_at(&cache, "/b", 10_000).await;
        assert!(held(&cache, &b).await);
        assert!(held(&cache, &copy_key(&a, 2)).await, "a's copy dropped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_and_responses_stored_at_once_evict_no_response() {
        // Room for 16 responses of 10 KB and a little more: 8 stored,
        // then 8 copies and 8 more responses at once, on two threads. A
        // copy and a response counting on the same room made the store
        // evict a response in 12 of 200 runs (review47d M2).
        for _ in 0..50 {
            let (response, _) = weights().await;
            let config = config::Cache {
                max_size: 16 * response + response / 2,
                ..config::Cache::default()
            };
            let cache = Cache::new(config, Arc::new(Metrics::new()));
            let mut tasks = Vec::new();
            for i in 0..8 {
                let (key, stored) = store_at(&cache, &format!("/o{i}"), 10_000).await;
                let copying = cache.clone();
                tasks.push(tokio::spawn(async move {
                    let copy = Bytes::from(vec![b'z'; 9_000]);
                    keep_copy(&copying, &key, 2, &stored, copy).await;
                }));
                let storing = cache.clone();
                tasks.push(tokio::spawn(async move {
                    store_at(&storing, &format!("/n{i}"), 10_000).await;
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            cache.stats().await;
            assert_eq!(cache.metrics.cache_evictions.get(), 0);
            assert_eq!(cache.stats().await.0, 16);
        }
    }

    /// Whether `part` lies within `whole`'s bytes.
    fn inside(part: &[u8], whole: &[u8]) -> bool {
        whole.as_ptr_range().contains(&part.as_ptr())
    }

    #[test]
    fn detached_headers_share_nothing_with_the_buffer_they_were_read_into() {
        // As hyper parses them: values are slices of the read buffer.
        let buffer = Bytes::from(b"max-age=60\"v1\"a=1b=2".repeat(1000));
        let slice = |from: usize, to: usize| {
            HeaderValue::from_maybe_shared(buffer.slice(from..to)).unwrap()
        };
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", slice(0, 10));
        headers.insert("etag", slice(10, 14));
        headers.append("set-cookie", slice(14, 17));
        headers.append("set-cookie", slice(17, 20));
        let mut secret = slice(14, 17);
        secret.set_sensitive(true);
        headers.insert("authorization", secret);
        let copy = detached(&headers);
        assert_eq!(copy, headers);
        for (name, value) in &copy {
            assert!(
                !inside(value.as_bytes(), &buffer),
                "{name} still in the buffer"
            );
        }
        assert!(copy["authorization"].is_sensitive());
        let cookies: Vec<_> = copy.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn an_entry_weighs_what_it_holds_not_only_its_content() {
        let mut small = entry("accept");
        small.body = Bytes::from(vec![b'x'; 132]);
        for (name, value) in [("etag", "\"v1\""), ("content-type", "application/json")] {
            small.headers.insert(name, HeaderValue::from_static(value));
        }
        let content = 132
            + small
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>();
        let weight = small.weight(PRIMARY) as usize;
        // 20,000 stored answers of 132 bytes with 8 fields took 2.9 KB
        // each; this one has 4.
        assert!(weight > 1_500, "{weight} for {content} bytes of content");
        let mut large = entry("accept");
        large.body = Bytes::from(vec![b'x'; 1 << 20]);
        assert!((large.weight(PRIMARY) as usize) < (1 << 20) + 4096);
    }

    #[tokio::test]
    async fn an_answer_not_stored_marks_its_own_variant_until_one_is_stored() {
        let cache = cache();
        let alice = map(&[("cookie", "session=alice")]);
        let bob = map(&[("cookie", "session=bob")]);
        let anonymous = HeaderMap::new();
        let private = map(&[("vary", "Cookie"), ("cache-control", "private")]);
        cache.not_stored(PRIMARY, &alice, &private, StatusCode::OK);
        cache.not_stored(PRIMARY, &bob, &private, StatusCode::OK);
        assert!(cache.uncacheable(PRIMARY, &alice));
        assert!(cache.uncacheable(PRIMARY, &bob));
        assert!(!cache.uncacheable(PRIMARY, &anonymous));
        // Storing one variant takes back its mark only.
        store(&cache, &alice, entry("cookie")).await;
        assert!(!cache.uncacheable(PRIMARY, &alice));
        assert!(cache.uncacheable(PRIMARY, &bob));
        // An invalidation takes back every mark, for good: marked again,
        // the URL does not bring bob's back.
        cache.invalidate(PRIMARY).await;
        cache.not_stored(PRIMARY, &alice, &private, StatusCode::OK);
        assert!(!cache.uncacheable(PRIMARY, &bob));
        // Without Vary (or with `*`), the answer stands for every request.
        for vary in [&[][..], &[("vary", "*")]] {
            let cache = self::cache();
            cache.not_stored(PRIMARY, &alice, &map(vary), StatusCode::OK);
            assert!(cache.uncacheable(PRIMARY, &anonymous), "{vary:?}");
        }
        // An error says nothing of the next answers.
        let cache = self::cache();
        cache.not_stored(PRIMARY, &alice, &HeaderMap::new(), StatusCode::BAD_GATEWAY);
        assert!(!cache.uncacheable(PRIMARY, &alice));
    }

    /// What the store evicts or loses to an invalidation is freed with the
    /// operation, not at some later one: 40 responses of 7 MB into a full
    /// 32 MiB cache held 167 MB until the next requests came (review38b H1).
    #[tokio::test]
    async fn what_the_store_lets_go_of_is_freed_at_once() {
        let config = config::Cache {
            max_size: 64 << 10,
            ..config::Cache::default()
        };
        let cache = Cache::new(config, Arc::new(Metrics::new()));
        let big = || {
            let mut entry = entry("");
            entry.headers.remove(http::header::VARY);
            entry.body = Bytes::from(vec![b'x'; 40 << 10]);
            Arc::new(entry)
        };
        let stored = |path: &str, entry: Arc<Entry>| {
            let (cache, path) = (cache.clone(), format!("GET|http|shop|{path}"));
            async move {
                let fill = cache.begin_fill(path);
                let weak = Arc::downgrade(&entry);
                cache
                    .insert_shared(&fill, &HeaderMap::new(), entry)
                    .await
                    .unwrap();
                weak
            }
        };
        // Other tests' threads pin moka's epoch collector too: waited for
        // (bounded), with this thread's flushes and no store operation.
        let freed = |weak: std::sync::Weak<Entry>| async move {
            for _ in 0..200 {
                if weak.strong_count() == 0 {
                    return true;
                }
                crossbeam_epoch::pin().flush();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        };
        let evicted = stored("/a", big()).await;
        let kept = stored("/b", big()).await;
        assert!(freed(evicted).await, "the evicted entry is still held");
        cache.invalidate("GET|http|shop|/b").await;
        assert!(freed(kept).await, "the invalidated entry is still held");
    }

    /// An insert whose caller is dropped after the store took the entry
    /// still undoes it when its fill was overtaken (review38c).
    #[tokio::test]
    async fn an_overtaken_insert_dropped_midway_is_undone() {
        let cache = cache();
        let full: Arc<str> = "GET|http|shop|/x|dropped".into();
        let fill = cache.begin_fill(PRIMARY.to_owned());
        cache
            .store
            .insert(full.clone(), Arc::new(entry("accept")))
            .await;
        cache.invalidate(PRIMARY).await;
        drop(Undo {
            store: &cache.store,
            fill: &fill,
            full: Some(full.clone()),
            dropped: Vec::new(),
        });
        let gone = tokio::time::timeout(Duration::from_secs(5), async {
            while cache.store.get(&full).await.is_some() {
                tokio::task::yield_now().await;
            }
        });
        assert!(gone.await.is_ok(), "the overtaken entry stayed");
    }

    #[tokio::test]
    async fn the_index_forgets_what_the_store_drops() {
        let cache = cache();
        let request = HeaderMap::new();
        store(&cache, &request, entry("accept")).await;
        assert!(cache.key_for(PRIMARY, &request).is_some());
        cache.purge_paths(|_, path| path.starts_with("/x"));
        cache.stats().await; // runs the store's pending removals
        assert!(cache.key_for(PRIMARY, &request).is_none());
        assert!(cache.index.is_empty());
    }

    /// Two stores of one variant at once leave the index naming what the
    /// store holds (review34c L1: interleaved, the record named the entry
    /// replaced, and outlived the one kept).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_stores_of_one_variant_leave_the_index_right() {
        let cache = cache();
        let request = HeaderMap::new();
        for _ in 0..200 {
            let stores: Vec<_> = (0..2)
                .map(|_| {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        store(&cache, &HeaderMap::new(), entry("accept")).await;
                    })
                })
                .collect();
            for stored in stores {
                stored.await.unwrap();
            }
            let key = cache.key_for(PRIMARY, &request).unwrap();
            let held = cache.get(&key).await.unwrap();
            let listed = cache.index.get(PRIMARY).unwrap().keys[0].entry;
            assert_eq!(listed, address(&held));
        }
    }

    /// A URL's key is held once, by the store and both records of the
    /// index (review34b F2: three copies of a 60 KB URL per entry).
    #[tokio::test]
    async fn the_store_and_the_index_share_one_copy_of_a_key() {
        let cache = cache();
        let request = HeaderMap::new();
        for _ in 0..2 {
            let mut plain = entry("");
            plain.headers.remove("vary");
            store(&cache, &request, plain).await;
        }
        let record = cache.index.iter().next().unwrap().key().clone();
        let variant = cache.index.get(PRIMARY).unwrap().keys[0].key.clone();
        let (stored, _) = cache.store.iter().next().unwrap();
        assert!(Arc::ptr_eq(&record, &variant));
        assert!(Arc::ptr_eq(&record, &stored));
    }

    #[tokio::test]
    async fn what_is_stored_after_a_purge_of_everything_stays_findable() {
        let cache = cache();
        let request = HeaderMap::new();
        store(&cache, &request, entry("accept")).await;
        assert_eq!(cache.purge_all().await, 1);
        // The store reports the purged entry's removal as the new one
        // replaces it: that report is about the old value only.
        store(&cache, &request, entry("accept")).await;
        cache.stats().await;
        let key = cache
            .key_for(PRIMARY, &request)
            .expect("the new entry is listed");
        assert!(cache.get(&key).await.is_some());
    }

    #[tokio::test]
    async fn a_vary_change_drops_the_variants_it_orphans() {
        let cache = cache();
        let gzip = map(&[("accept-encoding", "gzip"), ("accept", "a")]);
        store(&cache, &gzip, entry("accept-encoding")).await;
        let old = cache.key_for(PRIMARY, &gzip).unwrap();
        store(&cache, &gzip, entry("accept")).await;
        let new = cache.key_for(PRIMARY, &gzip).unwrap();
        assert_ne!(old, new);
        assert!(cache.get(&old).await.is_none());
        assert!(cache.get(&new).await.is_some());
    }

    #[tokio::test]
    async fn one_primary_keeps_at_most_max_variants() {
        let cache = cache();
        for n in 0..MAX_VARIANTS + 5 {
            let request = map(&[("accept", &format!("type/{n}"))]);
            store(&cache, &request, entry("accept")).await;
        }
        assert_eq!(cache.index.get(PRIMARY).unwrap().keys.len(), MAX_VARIANTS);
        let first = cache
            .key_for(PRIMARY, &map(&[("accept", "type/0")]))
            .unwrap();
        assert!(cache.get(&first).await.is_none());
    }

    /// Forwarded variants push out one another first: the URL's own page
    /// stays (review50 L2).
    #[tokio::test]
    async fn forged_forwarded_hosts_do_not_push_out_the_url_s_own_variant() {
        let cache = cache();
        cache.trust_forwarded_hosts();
        let own = HeaderMap::new();
        store(&cache, &own, entry("accept")).await;
        for n in 0..MAX_VARIANTS + 5 {
            let request = map(&[("x-forwarded-host", &format!("forged-{n}.example"))]);
            store(&cache, &request, entry("accept")).await;
        }
        assert_eq!(cache.index.get(PRIMARY).unwrap().keys.len(), MAX_VARIANTS);
        let key = cache.key_for(PRIMARY, &own).unwrap();
        assert!(cache.get(&key).await.is_some());
    }

    #[tokio::test]
    async fn a_fetch_overtaken_by_an_invalidation_stores_nothing() {
        let cache = cache();
        let request = HeaderMap::new();
        // A GET goes out; a POST to the same URL completes meanwhile.
        let early = cache.begin_fill(PRIMARY.to_owned());
        let other = cache.begin_fill("GET|http|shop|/y".to_owned());
        cache.invalidate(PRIMARY).await;
        cache.insert(&early, &request, entry("accept")).await;
        assert!(cache.key_for(PRIMARY, &request).is_none());
        // Another URL's fetch is not affected.
        cache.insert(&other, &request, entry("accept")).await;
        assert!(cache.key_for("GET|http|shop|/y", &request).is_some());
        // Nor is a fetch begun after the invalidation.
        store(&cache, &request, entry("accept")).await;
        let key = cache.key_for(PRIMARY, &request).unwrap();
        assert!(cache.get(&key).await.is_some());
        // A purge overtakes like an invalidation.
        let fill = cache.begin_fill(PRIMARY.to_owned());
        cache.purge_paths(|_, _| true);
        cache.insert(&fill, &request, entry("accept")).await;
        cache.stats().await;
        assert!(cache.get(&key).await.is_none());
        // Records live only while their fetches do.
        drop((early, fill, other));
        assert!(cache.fills.is_empty());
    }
}
