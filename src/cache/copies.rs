//! gzip copies of stored responses. The first hit by a client that takes
//! gzip compresses a stored response as it is sent, and the result is kept
//! beside it (`proxy::compress::Keep`), in the same store under a key of
//! its own: the next gzip hits are sent it with no compression.
//!
//! A copy is sent only for the very entry it was made of, and takes only
//! the room stored responses leave free: it is kept only if it fits
//! without evicting anything, and a response being stored pushes copies
//! out, oldest first, before the store evicts a response
//! ([`Cache::make_room`]). It goes when its entry goes (the store's
//! eviction listener queues it, the next store or removal drops it), and
//! is kept no longer than its entry has left.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use http::HeaderMap;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};

use super::policy::CacheControl;
use super::{Cache, Entry};

/// The key of the gzip copy at `level` of the entry stored under `full`:
/// a line no request's key has (a field name starts each line but the
/// first), under the same URL, so that a purge of the URL drops it too.
pub(super) fn copy_key(full: &str, level: u32) -> String {
    let mut key = String::with_capacity(full.len() + 8);
    key.push_str(full);
    key.push_str("\n\0gzip");
    key.push(char::from(b'0' + (level % 10) as u8));
    key
}

/// Carried by an answer made of a stored entry outside the hit path (a
/// stale copy served for a backend's failure, a revalidated one, a
/// waiter's): the levels at which the entry's gzip form saves nothing, so
/// that the compressor sends it plain as it sends the entry's hits
/// (review60 L3, review61 L1).
#[derive(Debug, Clone, Copy)]
pub struct Incompressible(u16);

impl Incompressible {
    /// Whether the entry's gzip form at `level` saves nothing.
    pub fn at(self, level: u32) -> bool {
        self.0 & bit(level) != 0
    }
}

/// The bit of `level` among an entry's copies ([`Entry::copied`]).
fn bit(level: u32) -> u16 {
    1 << (level % 16)
}

/// A copy's key, with the entry it was made of.
type Made = (Arc<str>, Weak<Entry>);

/// What the cache knows of its copies besides the store.
#[derive(Debug, Default)]
pub(super) struct Copies {
    /// Copies in the store, which are not counted as stored responses.
    count: AtomicU64,
    /// Copies whose entries the store let go of, to drop
    /// ([`Cache::drop_orphans`]), and whether there are any: a store
    /// takes no lock when there are none.
    orphans: Mutex<Vec<Made>>,
    orphaned: AtomicBool,
    /// The copies kept, oldest first, by their own weak references: the
    /// first to go when a response needs their room. Those the store let
    /// go of are dropped from the list as it grows.
    kept: Mutex<VecDeque<Made>>,
    /// Copies being stored, which took room and are not in `kept` yet,
    /// and a signal as each is listed (or given up).
    storing: AtomicU64,
    listed: tokio::sync::Notify,
}

/// A copy being stored, counted in [`Copies::storing`] until dropped.
struct Storing<'a>(&'a Copies);

impl<'a> Storing<'a> {
    fn new(copies: &'a Copies) -> Self {
        copies.storing.fetch_add(1, Ordering::AcqRel);
        Storing(copies)
    }
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        self.0.storing.fetch_sub(1, Ordering::AcqRel);
        self.0.listed.notify_waiters();
    }
}

/// How long [`Cache::make_room`] waits for copies being stored to be
/// listed, at most: a few steps each, unless the store's own work holds
/// one up.
const ROOM_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

impl Copies {
    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// What the store's eviction listener does for copies: counts a copy
    /// gone (and lets its entry have another, if it stays), or queues the
    /// copies of an entry gone, which nothing can reach any more (dropped
    /// by the next store or removal: not from here, inside the store's
    /// own work). Whether `entry` was a copy.
    pub(super) fn removed(&self, key: &str, entry: &Arc<Entry>, cause: RemovalCause) -> bool {
        let levels = entry.copied.load(Ordering::Acquire);
        if let Some(of) = &entry.copy_of {
            self.count.fetch_sub(1, Ordering::Relaxed);
            // Pushed out for room, or expired first: a copy may be made
            // again (review47d M1). Replaced, it is by another of the same.
            if cause != RemovalCause::Replaced {
                if let Some(of) = of.upgrade() {
                    of.copied.fetch_and(!levels, Ordering::AcqRel);
                }
            }
            return true;
        }
        if levels != 0 {
            let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            for level in (1..16).filter(|&level| levels & bit(level) != 0) {
                orphans.push((copy_key(key, level).into(), Arc::downgrade(entry)));
            }
            self.orphaned.store(true, Ordering::Release);
        }
        false
    }
}

impl Entry {
    /// Whether this is a gzip copy, not a response.
    pub(super) fn is_copy(&self) -> bool {
        self.copy_of.is_some()
    }

    /// Marks a copy removed by [`Cache::remove_copy_of`], which frees its
    /// room itself (a copy's `copying` flag, unused otherwise).
    fn withdraw(&self) {
        self.copying.store(true, Ordering::Release);
    }

    /// Whether the room of this entry, removed by a call, is freed by
    /// its remover. (Removed by the store's own work first, its room is
    /// freed by the listener, and the remover finds nothing to remove.)
    pub(super) fn withdrawn(&self) -> bool {
        self.is_copy() && self.copying.load(Ordering::Acquire)
    }

    /// Whether a gzip copy of this entry at `level` was stored (and not
    /// pushed out since): worth a look for.
    pub fn has_copy(&self, level: u32) -> bool {
        self.copied.load(Ordering::Acquire) & bit(level) != 0
    }

    /// Notes that a gzip copy of this entry at `level` came out no
    /// smaller than it.
    pub fn mark_incompressible(&self, level: u32) {
        self.incompressible.fetch_or(bit(level), Ordering::AcqRel);
    }

    /// Whether this entry's gzip form at `level` is known to save nothing
    /// (see [`Entry::mark_incompressible`]): its gzip hits are sent plain,
    /// where compressing each anew cost a whole deflate per hit and sent
    /// more bytes than the plain body (review58 M1).
    pub fn incompressible(&self, level: u32) -> bool {
        self.incompressible_note()
            .is_some_and(|note| note.at(level))
    }

    /// What this entry was noted as not compressing at, if anything (see
    /// [`Entry::mark_incompressible`]), for an answer made of it that is
    /// no hit to carry.
    pub fn incompressible_note(&self) -> Option<Incompressible> {
        let levels = self.incompressible.load(Ordering::Acquire);
        (levels != 0).then_some(Incompressible(levels))
    }

    /// Takes on what `other`, an entry of the same body, was noted as
    /// not compressing at (see [`Entry::mark_incompressible`]).
    pub fn inherit_incompressible(&self, other: &Entry) {
        let levels = other.incompressible.load(Ordering::Acquire);
        self.incompressible.fetch_or(levels, Ordering::AcqRel);
    }

    /// Takes the making of a gzip copy of this entry at `level`, unless
    /// one is stored or another hit is making one.
    pub fn claim_copy(&self, level: u32) -> bool {
        !self.has_copy(level) && !self.copying.swap(true, Ordering::AcqRel)
    }

    /// Lets another hit make a gzip copy (this one's is stored, or not).
    pub fn release_copy(&self) {
        self.copying.store(false, Ordering::Release);
    }
}

/// Room taken in [`Cache::held`] for an entry being stored: given back if
/// the store is dropped before the entry is in ([`Room::taken`]).
pub(super) struct Room<'a> {
    cache: &'a Cache,
    weight: u64,
    taken: bool,
}

impl Room<'_> {
    /// The entry is in the store: its weight stays counted.
    pub(super) fn taken(mut self) {
        self.taken = true;
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if !self.taken {
            super::take_off(&self.cache.held, self.weight);
        }
        self.cache.reserving.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cache {
    /// The gzip copy of `entry` (stored under `full`) compressed at
    /// `level`, if one is kept: a copy of an entry since replaced or
    /// dropped is not of this one. Its `headers` are the head a hit from
    /// it is sent with, its `body` the compressed stream.
    pub async fn copy_for(&self, full: &str, level: u32, entry: &Arc<Entry>) -> Option<Arc<Entry>> {
        let copy = self.store.get(&*copy_key(full, level)).await?;
        let of = copy.copy_of.as_ref()?;
        std::ptr::eq(of.as_ptr(), Arc::as_ptr(entry)).then_some(copy)
    }

    /// The room a gzip copy at `level` of the entry stored under `full`,
    /// sent with `head`, may take for its body: what is free, less what
    /// its head and bookkeeping weigh. Gathered up to the free room alone,
    /// a copy that then did not fit was compressed for nothing, at every
    /// hit (review48d L2: a copy's head weighs ~3 KB for an answer of ten
    /// fields).
    pub fn copy_room(&self, full: &str, level: u32, head: &HeaderMap) -> u64 {
        let around = super::weigh(copy_key(full, level).len(), head, 0);
        self.free_room().saturating_sub(around)
    }

    /// The room stored responses and copies leave free in `max_size`.
    pub fn free_room(&self) -> u64 {
        let held = self.held.load(Ordering::Relaxed);
        self.max_size.saturating_sub(held)
    }

    /// Keeps `body`, `entry`'s body compressed at `level`, beside it, with
    /// `head`, the fields a hit from it is sent with, if it fits in the
    /// room responses leave free. Whether it was kept.
    pub async fn insert_copy(
        &self,
        full: &str,
        level: u32,
        entry: &Arc<Entry>,
        head: HeaderMap,
        body: Bytes,
    ) -> bool {
        self.drop_orphans().await;
        self.settle_freed();
        let elapsed = self
            .now()
            .duration_since(entry.timing.response_time)
            .unwrap_or_default();
        let left = entry.keep_for().saturating_sub(elapsed);
        // Replaced or dropped while it was compressed: a copy of it would
        // only take room, and might replace one of the entry now stored.
        if left.is_zero() || !self.holds(full, entry).await {
            return false;
        }
        let key: Arc<str> = copy_key(full, level).into();
        let copy = Arc::new(Entry {
            status: entry.status,
            reason: None,
            headers: head,
            body,
            timing: entry.timing,
            // Kept no longer than its entry has left (review47b M1: a copy
            // made at minute 59 of an hour outlived its entry by 59).
            lifetime: left,
            cc: CacheControl::default(),
            copy_of: Some(Arc::downgrade(entry)),
            copying: AtomicBool::new(false),
            copied: AtomicU16::new(bit(level)),
            incompressible: AtomicU16::new(0),
            failing: std::sync::atomic::AtomicU64::new(0),
        });
        // Only in room the stored responses leave free: a copy never
        // pushes one out (review47a M1: a response and its copy too large
        // for the cache together, the copy evicted the response it was
        // made of, and a working set that fitted thrashed).
        let weight = u64::from(copy.weight(&key));
        let storing = Storing::new(&self.copies);
        let Some(room) = self.reserve(weight) else {
            return false;
        };
        // Marked first: if the entry goes from here on, its copy goes too.
        entry.copied.fetch_or(bit(level), Ordering::AcqRel);
        self.copies.count.fetch_add(1, Ordering::Relaxed);
        self.store.insert(key.clone(), copy.clone()).await;
        room.taken();
        // Replaced or dropped since: this copy alone goes, as another, of
        // the entry that replaced it, may have taken the key since.
        let kept = self.holds(full, entry).await;
        if kept {
            self.list_copy(key, &copy);
        } else {
            self.remove_copy(&key, &copy).await;
        }
        drop(storing);
        self.brought(weight).await;
        kept
    }

    /// Takes room for `weight` if it is free, at once: two stores cannot
    /// both count on the same room (review47d M2).
    fn reserve(&self, weight: u64) -> Option<Room<'_>> {
        let max = self.max_size;
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + weight <= max).then_some(held + weight)
            })
            .ok()?;
        Some(self.room(weight))
    }

    /// Room for `weight`, counted in `held` already.
    fn room(&self, weight: u64) -> Room<'_> {
        self.reserving.fetch_add(1, Ordering::Relaxed);
        Room {
            cache: self,
            weight,
            taken: false,
        }
    }

    /// Takes room for a response of `weight`, dropping copies, oldest
    /// first, until it fits beside what is stored: copies take only the
    /// room responses leave free, so a response stored pushes them out
    /// before the store evicts any response. With no copy left to drop,
    /// the room is taken all the same, and the store evicts as it did.
    pub(super) async fn make_room(&self, weight: u64) -> Room<'_> {
        self.settle_freed();
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let listed = self.copies.listed.notified();
            if let Some(room) = self.reserve(weight) {
                return room;
            }
            let oldest = {
                let mut kept = self.copies.kept.lock().unwrap_or_else(|e| e.into_inner());
                kept.pop_front()
            };
            let Some((key, copy)) = oldest else {
                // A copy that took room and is not listed yet is a moment
                // from being listed: the store would evict a response in
                // its place (review47d M2, on two threads).
                let storing = self.copies.storing.load(Ordering::Acquire) > 0;
                if storing && tokio::time::timeout_at(deadline, listed).await.is_ok() {
                    continue;
                }
                self.held.fetch_add(weight, Ordering::Relaxed);
                return self.room(weight);
            };
            if let Some(copy) = copy.upgrade() {
                self.remove_copy(&key, &copy).await;
            }
        }
    }

    /// Adds a kept copy to the list [`Cache::make_room`] takes from,
    /// dropping from it those the store let go of once they are as many
    /// again as the copies it holds.
    fn list_copy(&self, key: Arc<str>, copy: &Arc<Entry>) {
        let mut kept = self.copies.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= 2 * self.copies.count() as usize + 64 {
            kept.retain(|(_, copy)| copy.strong_count() > 0);
        }
        kept.push_back((key, Arc::downgrade(copy)));
    }

    /// Whether the store holds `entry` under `full`.
    async fn holds(&self, full: &str, entry: &Arc<Entry>) -> bool {
        let current = self.store.get(full).await;
        current.is_some_and(|current| Arc::ptr_eq(&current, entry))
    }

    /// Removes the copy under `key` if it is a copy of the entry `copy`
    /// was made of: another, of an entry stored since, stays.
    async fn remove_copy(&self, key: &Arc<str>, copy: &Arc<Entry>) {
        if let Some(of) = &copy.copy_of {
            self.remove_copy_of(key, of.as_ptr() as usize).await;
        }
    }

    /// Removes the copy under `key` if it was made of the entry at `of`
    /// (an address a weak reference the caller holds keeps from reuse).
    async fn remove_copy_of(&self, key: &Arc<str>, of: usize) {
        let removed = self
            .store
            .entry(key.clone())
            .and_compute_with(|current| {
                let copy = current.as_ref().map(|current| current.value());
                let made_of = copy
                    .and_then(|copy| copy.copy_of.as_ref())
                    .map(|made_of| made_of.as_ptr() as usize);
                std::future::ready(match (copy, made_of) {
                    (Some(copy), Some(made_of)) if made_of == of => {
                        copy.withdraw();
                        Op::Remove
                    }
                    _ => Op::Nop,
                })
            })
            .await;
        // Its removal queued, its room is free (not before: see the
        // eviction listener in `Cache::new`).
        if let CompResult::Removed(copy) = removed {
            super::take_off(&self.held, u64::from(copy.value().weight(key)));
        }
    }

    /// Drops the copies of the entries the store let go of since the
    /// last call: a copy nothing can reach would hold its room until it
    /// expired. Whether there were any.
    pub(super) async fn drop_orphans(&self) -> bool {
        if !self.copies.orphaned.swap(false, Ordering::AcqRel) {
            return false;
        }
        let orphans = {
            let mut orphans = self
                .copies
                .orphans
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *orphans)
        };
        for (key, of) in orphans {
            self.remove_copy_of(&key, of.as_ptr() as usize).await;
        }
        true
    }

    /// Takes the room of entries removed off `held`, once their removals
    /// are queued (see the eviction listener in [`Cache::new`]).
    pub(super) fn settle_freed(&self) {
        let freed = self.freed.swap(0, Ordering::Relaxed);
        if freed > 0 {
            super::take_off(&self.held, freed);
        }
    }

    /// [`Cache::let_go`], and `held` set to the store's own count when no
    /// store was under way throughout: a store dropped inside the store's
    /// insert, after it took the entry, gave back room it holds.
    pub(super) async fn settle_held(&self) {
        let quiet = self.reserving.load(Ordering::Relaxed) == 0;
        let before = self.held.load(Ordering::Relaxed);
        self.let_go().await;
        if quiet && self.reserving.load(Ordering::Relaxed) == 0 {
            let size = self.store.weighted_size();
            let _ = self
                .held
                .compare_exchange(before, size, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_key_is_no_request_s() {
        let key = copy_key("GET|http|shop|/x\naccept:a", 2);
        assert_eq!(key, "GET|http|shop|/x\naccept:a\n\0gzip2");
        assert_eq!(super::super::key::primary_of(&key), "GET|http|shop|/x");
    }
}
