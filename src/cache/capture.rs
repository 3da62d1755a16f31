//! Filling the cache from a response as it streams to the client: each
//! frame goes downstream first and is copied second, so a cache problem
//! never cuts a response. Only a body that ends cleanly within
//! `max_object_size` is stored; a larger one, or one the backend breaks off,
//! is dropped and the coalescing lock released.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::fill::Fill;
use super::lock::Leader;
use super::policy::{CacheControl, Timing};
use super::{Cache, Entry};

/// Frames under this size are gathered into chunks of about this size.
const SMALL: usize = 4 * 1024;

#[derive(Debug)]
pub struct Capture {
    cache: Arc<Cache>,
    fill: Fill,
    /// The request's headers, for the Vary secondary key.
    request: HeaderMap,
    status: StatusCode,
    reason: Option<hyper::ext::ReasonPhrase>,
    headers: HeaderMap,
    timing: Timing,
    lifetime: Duration,
    cc: CacheControl,
    chunks: Vec<Bytes>,
    /// Small frames gathered into one chunk (see [`Capture::data`]).
    small: BytesMut,
    size: usize,
    limit: usize,
    /// The copy's share of what all fills may hold.
    held: Held,
    leader: Option<Leader>,
    /// The stored copy a revalidation's failure may serve stale (see
    /// [`Capture::revalidating`]).
    stale: Option<Arc<Entry>>,
    /// Who waits for the whole response (see [`Capture::entry_when_whole`]).
    whole: Option<tokio::sync::oneshot::Sender<(Arc<Entry>, bool)>>,
    /// Why the copy was given up, for the access line.
    fate: Fate,
}

/// Why a response whose `Cache-Status` said `stored` was not stored after
/// all, told to the access line (the header went out before the body):
/// `Cache-Status`'s `detail`, or none while it may still be stored.
#[derive(Debug, Clone, Default)]
pub struct Fate(Arc<std::sync::atomic::AtomicU8>);

impl Fate {
    const TOO_LARGE: u8 = 1;
    const FILL_BUDGET: u8 = 2;
    const INVALIDATED: u8 = 3;
    const SUPERSEDED: u8 = 4;

    fn set(&self, why: u8) {
        self.0.store(why, std::sync::atomic::Ordering::Relaxed);
    }

    /// A response too large to keep (its body past `max_object_size`, or
    /// its entry past `max_size`): said on the access line, and marked as
    /// not stored, so the requests waiting on its fill fetch at once.
    fn too_large(
        &self,
        cache: &Cache,
        primary: &str,
        request: &HeaderMap,
        headers: &HeaderMap,
        status: StatusCode,
    ) {
        cache.not_stored(primary, request, headers, status);
        self.set(Self::TOO_LARGE);
    }

    pub fn detail(&self) -> Option<&'static str> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            Self::TOO_LARGE => Some("too-large"),
            Self::FILL_BUDGET => Some("fill-budget"),
            Self::INVALIDATED => Some("invalidated"),
            Self::SUPERSEDED => Some("superseded"),
            _ => None,
        }
    }
}

/// A response about to be stored, minus its body.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    /// See [`Entry::reason`].
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub headers: HeaderMap,
    pub timing: Timing,
    pub lifetime: Duration,
    pub cc: CacheControl,
}

impl Head {
    /// How long the store keeps this response: its remaining freshness
    /// plus the time it may still serve stale or be revalidated.
    pub fn keep_for(&self) -> Duration {
        super::keep_for(&self.timing, self.lifetime, &self.cc, &self.headers)
    }
}

impl Capture {
    pub fn new(
        cache: Arc<Cache>,
        fill: Fill,
        request: HeaderMap,
        head: Head,
        leader: Option<Leader>,
    ) -> Self {
        let limit = usize::try_from(cache.max_object_size()).unwrap_or(usize::MAX);
        let held = Held {
            filling: cache.filling.clone(),
            bytes: 0,
        };
        Capture {
            cache,
            fill,
            request,
            status: head.status,
            reason: head.reason,
            headers: head.headers,
            timing: head.timing,
            lifetime: head.lifetime,
            cc: head.cc,
            chunks: Vec::new(),
            small: BytesMut::new(),
            size: 0,
            limit,
            held,
            leader,
            stale: None,
            whole: None,
            fate: Fate::default(),
        }
    }

    /// Marks the fetch as a revalidation of `stale`, a copy its
    /// stale-if-error lets be served if it fails: see [`Capture::broken`].
    pub fn revalidating(mut self, stale: Arc<Entry>) -> Self {
        self.stale = Some(stale);
        self
    }

    /// The body broke off (`status` 502) or stalled past `body_timeout`
    /// (504): nothing is stored. The requests waiting on a revalidation
    /// are told it failed, as for a 5xx, so each gets the stale copy its
    /// stale-if-error allows, or fetches on its own: they were handed
    /// the lock one after another, each to get the same broken body from
    /// the backend (cache56 H1: ten waiters, eleven fetches 0.5 s apart,
    /// every one cut off, where nginx and Varnish served the copy). A
    /// miss's waiters still take the lock on, one fetching for the rest.
    ///
    /// Only for a copy stale-if-error covers: without one, the waiters
    /// told so would each fetch on their own, all at once (review66 H1),
    /// where the lock handed on has one fetch for the rest. The copy's
    /// failure holds too (see `Entry::failing`).
    pub fn broken(self, status: u16) {
        let Some(stale) = &self.stale else {
            return;
        };
        stale.failed_at(self.cache.now(), status);
        if let Some(leader) = &self.leader {
            leader.failed(status);
        }
    }

    /// Where the access line learns why the copy was given up.
    pub fn fate(&self) -> Fate {
        self.fate.clone()
    }

    /// The response as it is stored, sent once the body has ended cleanly,
    /// with whether an invalidation overtook the fetch (then it is not
    /// stored); the sender is dropped if it never ends so (too large,
    /// broken off).
    pub fn entry_when_whole(&mut self) -> tokio::sync::oneshot::Receiver<(Arc<Entry>, bool)> {
        let (tell, told) = tokio::sync::oneshot::channel();
        self.whole = Some(tell);
        told
    }

    /// Copies one frame; false once the body is too large to keep. Small
    /// frames are copied into the last chunk, so a body of tiny chunks
    /// does not keep a handle (and a backend read buffer) for each.
    pub fn data(&mut self, data: &Bytes) -> bool {
        self.size += data.len();
        if self.size > self.limit {
            self.fate.too_large(
                &self.cache,
                self.fill.primary(),
                &self.request,
                &self.headers,
                self.status,
            );
            return false;
        }
        let budget = usize::try_from(self.cache.max_size).unwrap_or(usize::MAX);
        if !self.held.take(data.len(), budget) {
            self.fate.set(Fate::FILL_BUDGET);
            // Not marked uncacheable: the next response may well fit. The
            // waiters fetch for themselves, as for a fill that broke off.
            // Said, at most once a minute: with slow clients holding the
            // budget, responses would otherwise go unstored while their
            // Cache-Status said `stored` and nothing told why (review32e
            // L5).
            static REFUSED: crate::logging::Every = crate::logging::Every::new();
            if let Some(held_back) = REFUSED.due(60) {
                tracing::info!(
                    key = self.fill.primary(),
                    held_back,
                    "not stored: the responses being stored already hold cache.max_size"
                );
            }
            return false;
        }
        if data.len() >= SMALL {
            self.flush_small();
            self.chunks.push(data.clone());
        } else {
            self.small.extend_from_slice(data);
            if self.small.len() >= SMALL {
                self.flush_small();
            }
        }
        true
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.chunks.push(self.small.split().freeze());
        }
    }

    /// The body ended cleanly: store it, then release the waiters.
    pub fn finish(mut self) {
        self.flush_small();
        // Copied whole, never kept as a frame: a frame is a slice of the
        // backend connection's read buffer, up to 72 KiB for a body of
        // 4 (see `detached`).
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            _ => {
                let mut all = BytesMut::with_capacity(self.size);
                for chunk in &self.chunks {
                    all.extend_from_slice(chunk);
                }
                all.freeze()
            }
        };
        // Weighed by the store from here on.
        drop(self.chunks);
        drop(self.held);
        let entry = Arc::new(Entry::new(
            self.status,
            self.reason,
            self.headers,
            body,
            self.timing,
            self.lifetime,
            self.cc,
        ));
        // Too heavy with its head and key for the store (a head near
        // 72 KiB in a small cache): not stored, said now, before the
        // access line is written, and marked as a body too large is, so
        // the requests waiting on it fetch at once rather than one after
        // another (review33e F2). The key with its Vary part is longer
        // still: the insert weighs it again.
        if entry.too_heavy(self.fill.primary(), self.cache.max_size) {
            self.fate.too_large(
                &self.cache,
                self.fill.primary(),
                &self.request,
                &entry.headers,
                entry.status,
            );
            if let Some(leader) = &self.leader {
                leader.release();
            }
            return;
        }
        // A purge or an unsafe request for the URL overtook the fetch: not
        // stored, which the access line says (review33b note).
        // Nor is one kept for later requests when a reload replaced the
        // cache (review39d L1). It is stored all the same, for the
        // requests still on the old cache that wait on this fetch: an
        // overtaken fill would leave them to fetch one after another
        // until their wait ran out (review39e M1).
        if self.fill.overtaken() || self.cache.retired() {
            self.fate.set(Fate::INVALIDATED);
        }
        if let Some(whole) = self.whole {
            let _ = whole.send((entry.clone(), self.fill.overtaken()));
        }
        let (cache, fill, request, mut leader) = (self.cache, self.fill, self.request, self.leader);
        let fate = self.fate;
        tokio::spawn(async move {
            let response_time = entry.timing.response_time;
            // Overtaken since `finish` looked, or too heavy with its head:
            // the insert stored nothing.
            let kept = cache.insert_shared(&fill, &request, entry.clone()).await;
            match kept {
                Err(super::NotKept::Overtaken) => fate.set(Fate::INVALIDATED),
                // A fetch begun after this one stored its newer answer.
                Err(super::NotKept::Superseded) => fate.set(Fate::SUPERSEDED),
                // Tipped over by its key's Vary part: marked as in
                // `finish`, before the leader goes, so its waiters fetch at
                // once (review33f F2).
                Err(super::NotKept::TooHeavy) => {
                    fate.too_large(
                        &cache,
                        fill.primary(),
                        &request,
                        &entry.headers,
                        entry.status,
                    );
                }
                Err(super::NotKept::Unmatchable) | Ok(()) => {}
            }
            if let Some(leader) = &mut leader {
                if kept.is_ok() && !fill.overtaken() && vouches(&request) {
                    leader.stored(response_time);
                }
            }
            drop(leader);
        });
    }
}

/// A capture's share of [`Cache::filling`], given back when the capture
/// ends, stored or not. Without this bound each response being stored
/// kept its copy (up to `max_object_size`) for as long as its client took
/// to read it: forty slow clients of 8 MB responses held 295 MB beside a
/// 16 MiB cache (review32b F1). Varnish allocates a fetch's object from
/// the storage it is bounded by; nginx spools to disk.
#[derive(Debug)]
struct Held {
    filling: Arc<std::sync::atomic::AtomicUsize>,
    bytes: usize,
}

impl Held {
    /// Takes `n` more bytes if all fills together stay within `budget`.
    fn take(&mut self, n: usize, budget: usize) -> bool {
        use std::sync::atomic::Ordering;
        let before = self.filling.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > budget {
            self.filling.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.bytes += n;
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.filling
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether an entry fetched for `request` may serve the requests that
/// waited on it past their own `no-cache` and its own freshness (see
/// `proxy::cached::collapsed`). Not one fetched with `Authorization`: it
/// was answered for those credentials, and RFC 9111 §3.5 lets it be
/// stored only because the response said so (`public`, `s-maxage`,
/// `must-revalidate`); a waiter past its own `no-cache` or the entry's
/// freshness asked for more than that, so it fetches with its own.
pub fn vouches(request: &http::HeaderMap) -> bool {
    !request.contains_key(http::header::AUTHORIZATION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::time::SystemTime;

    fn head() -> Head {
        let now = SystemTime::now();
        Head {
            status: StatusCode::OK,
            reason: None,
            headers: HeaderMap::new(),
            timing: Timing::new(&HeaderMap::new(), now, now),
            lifetime: Duration::from_secs(60),
            cc: CacheControl::default(),
        }
    }

    fn capture(cache: &Arc<Cache>, path: &str) -> Capture {
        let fill = cache.begin_fill(format!("GET|http|h|{path}"));
        Capture::new(cache.clone(), fill, HeaderMap::new(), head(), None)
    }

    #[tokio::test]
    async fn a_stored_body_shares_nothing_with_the_frames_it_came_in() {
        let cache = Cache::new(crate::config::Cache::default(), Arc::new(Metrics::new()));
        let mut capture = capture(&cache, "/x");
        let whole = capture.entry_when_whole();
        // One frame of a body, cut from a larger read buffer as hyper's are.
        let buffer = Bytes::from(vec![7u8; 72 * 1024]);
        let frame = buffer.slice(100..100 + 2 * SMALL);
        assert!(capture.data(&frame));
        capture.finish();
        let (entry, _) = whole.await.unwrap();
        assert_eq!(entry.body, frame);
        assert!(!buffer.as_ptr_range().contains(&entry.body.as_ptr()));
    }

    /// A fill a purge overtook is not stored, and the access line learns
    /// so (the Cache-Status sent before the body said `stored`).
    #[tokio::test]
    async fn a_fill_a_purge_overtook_says_invalidated() {
        let cache = Cache::new(crate::config::Cache::default(), Arc::new(Metrics::new()));
        let mut overtaken = capture(&cache, "/x");
        let fate = overtaken.fate();
        assert!(overtaken.data(&Bytes::from_static(b"body")));
        cache.invalidate("GET|http|h|/x").await;
        overtaken.finish();
        assert_eq!(fate.detail(), Some("invalidated"));
        let mut untouched = capture(&cache, "/y");
        let fate = untouched.fate();
        assert!(untouched.data(&Bytes::from_static(b"body")));
        untouched.finish();
        assert_eq!(fate.detail(), None);
    }

    /// A body within `max_object_size` whose head makes the entry outweigh
    /// `max_size` is not stored, and the access line says `too-large`
    /// rather than `stored` (review33d F8).
    #[tokio::test]
    async fn an_entry_its_head_makes_too_heavy_says_too_large() {
        let config = crate::config::Cache {
            max_size: 81 * 1024,
            max_object_size: 1024,
            ..crate::config::Cache::default()
        };
        let cache = Cache::new(config, Arc::new(Metrics::new()));
        let mut big_head = head();
        for i in 0..70 {
            let name = http::HeaderName::try_from(format!("x-pad-{i}")).unwrap();
            big_head
                .headers
                .insert(name, "p".repeat(1000).parse().unwrap());
        }
        let fill = cache.begin_fill("GET|http|h|/heavy".to_owned());
        let mut capture = Capture::new(cache.clone(), fill, HeaderMap::new(), big_head, None);
        let fate = capture.fate();
        assert!(capture.data(&Bytes::from(vec![b'b'; 1000])));
        capture.finish();
        // Known as the body ends, before the access line is written.
        assert_eq!(fate.detail(), Some("too-large"));
        // Marked as a body too large is: waiters fetch at once.
        assert!(cache.uncacheable("GET|http|h|/heavy", &HeaderMap::new()));
    }

    /// The copies of responses being stored count against `max_size`
    /// together; past it a fill gives up (its client still gets the
    /// whole body), and what a fill held is given back when it ends,
    /// stored or not (review32b F1).
    #[tokio::test]
    async fn fills_under_way_together_hold_at_most_max_size() {
        let config = crate::config::Cache {
            max_size: 100 * 1024,
            max_object_size: 80 * 1024,
            ..crate::config::Cache::default()
        };
        let cache = Cache::new(config, Arc::new(Metrics::new()));
        let frame = Bytes::from(vec![1u8; 40 * 1024]);
        let mut first = capture(&cache, "/a");
        let mut second = capture(&cache, "/b");
        assert!(first.data(&frame));
        assert!(second.data(&frame));
        // 120 KiB would be held: the third frame is refused.
        let mut third = capture(&cache, "/c");
        let fate = third.fate();
        assert_eq!(fate.detail(), None);
        assert!(!third.data(&frame));
        drop(third);
        // What the access line says of it.
        assert_eq!(fate.detail(), Some("fill-budget"));
        // A fill that ends gives its share back, stored or not.
        drop(first);
        assert!(capture(&cache, "/d").data(&frame));
        second.finish();
        let mut fifth = capture(&cache, "/e");
        assert!(fifth.data(&frame));
        assert!(fifth.data(&frame));
        assert_eq!(
            cache.filling.load(std::sync::atomic::Ordering::Relaxed),
            80 * 1024
        );
    }
}
