//! Keeping an invalidation from being undone by a fetch that was under way.
//!
//! An unsafe request invalidates its target (RFC 9111 §4.4) when its
//! response comes back. A GET for that URL already at the backend may have
//! been answered from the state before the change; stored after the
//! invalidation, it would be served until it expires, the write seemingly
//! lost. So every fetch whose answer may be stored is a [`Fill`], taken
//! before the request goes out: an invalidation or purge of its URL while
//! it is under way marks it overtaken, and an overtaken fill stores
//! nothing.
//!
//! Only URLs with a fetch under way have a record, so the table is as
//! small as the fetches in flight and an invalidation of any other URL
//! finds nothing to mark.

use std::hash::BuildHasher;
use std::sync::Arc;

use super::{key, Cache};

/// One URL's fetches under way.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Invalidations of the URL seen while fetches were under way.
    generation: u64,
    /// The fetches under way; the record goes with the last.
    fills: usize,
    /// For each key of the URL stored while fetches were under way (by
    /// its hash), the sequence of the latest-begun fetch whose answer it
    /// was; at most [`STORED_KEPT`].
    stored: Vec<(u64, u64)>,
    /// The latest sequence among the entries let go from `stored` to keep
    /// it bounded: a fill begun before it may have been overtaken under a
    /// key no longer listed, and is taken to be (see [`Cache::superseded`]).
    forgotten: u64,
}

/// Keys a URL's record keeps. A URL whose fetches never all end (one slow
/// download at a time, say) kept every variant stored meanwhile, keys of
/// up to 64 KiB of a client's `Vary` fields included: 6,000 requests with
/// fresh `Accept-Encoding` values took 500 MB, and each store scanned them
/// all (panic56 H1). As many as a URL keeps variants; past that, the
/// oldest go, and fetches begun before them store nothing: a store
/// missed, never an older answer over a newer one. Kept by hash, so a
/// long key costs eight bytes (two that collide: a store missed).
const STORED_KEPT: usize = super::MAX_VARIANTS;

/// A fetch that may end in a store, from before its request goes out until
/// its response is stored or given up.
#[derive(Debug)]
pub struct Fill {
    cache: Arc<Cache>,
    primary: String,
    generation: u64,
    /// Its place among the cache's fetches, by when they began: of two
    /// answers for one key, the one with the later place is the newer.
    sequence: u64,
}

impl Fill {
    pub(super) fn begin(cache: &Arc<Cache>, primary: String) -> Self {
        let generation = {
            let mut pending = cache.fills.entry(primary.clone()).or_default();
            pending.fills += 1;
            pending.generation
        };
        Fill {
            cache: cache.clone(),
            primary,
            generation,
            sequence: cache
                .fetches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn primary(&self) -> &str {
        &self.primary
    }

    /// The URL was invalidated or purged since this fetch began.
    pub fn overtaken(&self) -> bool {
        self.cache
            .fills
            .get(&self.primary)
            .is_none_or(|pending| pending.generation != self.generation)
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        let fills = &self.cache.fills;
        let last = fills.get_mut(&self.primary).is_some_and(|mut pending| {
            pending.fills -= 1;
            pending.fills == 0
        });
        if last {
            fills.remove_if(&self.primary, |_, pending| pending.fills == 0);
        }
    }
}

/// Whether a URL, by its host and path (with its query), is one meant.
pub(super) type UrlMatch = dyn Fn(&str, &str) -> bool;

impl Cache {
    /// Whether an answer of a fetch begun after `fill` was stored under
    /// `full` while `fill` was under way: `fill`'s is the older, whichever
    /// came back last, even if that one has left the store since.
    pub(super) fn superseded(&self, fill: &Fill, full: &str) -> bool {
        let hash = self.fills.hasher().hash_one(full);
        self.fills.get(&fill.primary).is_some_and(|pending| {
            pending.forgotten > fill.sequence
                || pending
                    .stored
                    .iter()
                    .any(|&(key, sequence)| key == hash && sequence > fill.sequence)
        })
    }

    /// Notes that `fill`'s answer is stored under `full`, for
    /// [`Cache::superseded`].
    pub(super) fn note_stored(&self, fill: &Fill, full: &str) {
        let hash = self.fills.hasher().hash_one(full);
        let Some(mut pending) = self.fills.get_mut(&fill.primary) else {
            return;
        };
        if let Some((_, sequence)) = pending.stored.iter_mut().find(|(key, _)| *key == hash) {
            *sequence = (*sequence).max(fill.sequence);
            return;
        }
        if pending.stored.len() >= STORED_KEPT {
            let (_, sequence) = pending.stored.remove(0);
            pending.forgotten = pending.forgotten.max(sequence);
        }
        pending.stored.push((hash, fill.sequence));
    }

    /// Marks the fetches under way for `primary` overtaken. Called before
    /// the stored variants are dropped (see [`Cache::insert`] for why).
    pub(super) fn overtake(&self, primary: &str) {
        if let Some(mut pending) = self.fills.get_mut(primary) {
            pending.generation += 1;
        }
    }

    /// The same for every URL whose host and path (with its query)
    /// `matches`, or for all.
    pub(super) fn overtake_paths(&self, matches: Option<&UrlMatch>) {
        for mut pending in self.fills.iter_mut() {
            let (host, path) = key::host_and_path_of(pending.key());
            if matches.is_none_or(|matches| matches(host, path)) {
                pending.generation += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL's record keeps at most [`STORED_KEPT`] keys however many
    /// variants are stored while one fetch of it stays under way, and a
    /// fetch older than the keys let go stores nothing (panic56 H1).
    #[test]
    fn a_url_s_record_stays_bounded_under_a_fetch_that_never_ends() {
        let cache = Cache::new(
            crate::config::Cache::default(),
            Arc::new(crate::metrics::Metrics::new()),
        );
        let held = cache.begin_fill("P".into());
        for n in 0..1000 {
            let fill = cache.begin_fill("P".into());
            let key = format!("P|variant-{n}");
            assert!(!cache.superseded(&fill, &key));
            cache.note_stored(&fill, &key);
        }
        assert_eq!(cache.fills.get("P").unwrap().stored.len(), STORED_KEPT);
        assert!(cache.superseded(&held, "P|variant-999"));
        assert!(cache.superseded(&held, "P|never-stored"));
        let late = cache.begin_fill("P".into());
        assert!(!cache.superseded(&late, "P|variant-999"));
        assert!(!cache.superseded(&late, "P|never-stored"));
    }
}
