//! Request coalescing, after pingora's `CacheKeyLock`: the first miss for a
//! key becomes the leader and fetches; later misses wait (bounded) for the
//! leader to store the response, then read it from the cache. The lock is
//! released when the leader's guard drops: after the entry is stored, or
//! when the leader's request dies, so waiters never hang on a lost fetch.
//! A leader whose answer nobody may store ([`Leader::release`]) lets the
//! waiters go at once, each to fetch on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

#[derive(Debug, Default)]
pub struct Locks {
    /// Held only to insert or remove, never across an await.
    inner: Mutex<HashMap<String, watch::Receiver<Signal>>>,
}

/// What the leader tells its waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Fetching.
    Pending,
    /// Go: nothing it gets will be stored ([`Leader::release`]); `true`
    /// when its answer replaced the copy stored for its variant, which is
    /// being removed ([`Leader::release_replacing`]).
    Released(bool),
    /// Its revalidation failed with this status, and it served the stale
    /// copy stale-if-error allows, or would have, had it asked for it
    /// ([`Leader::failed`]).
    Failed(u16),
    /// It stored the entry whose response came at this time
    /// ([`Leader::stored`]): that one, and no other, is its fetch.
    Stored(SystemTime),
}

/// Held by the leader; dropping it wakes the waiters.
#[derive(Debug)]
pub struct Leader {
    locks: Arc<super::Cache>,
    key: String,
    signal: watch::Sender<Signal>,
    /// Set once its entry is stored, told the waiters when it drops.
    stored: Option<SystemTime>,
    /// It took the lock after a leader that handed it on.
    second: bool,
}

impl Leader {
    /// Wakes the waiters now, to fetch on their own: what this leader
    /// fetches will not be stored for anyone (or it failed).
    pub fn release(&self) {
        self.signal.send_replace(Signal::Released(false));
    }

    /// [`Leader::release`] for an answer that replaced the copy stored for
    /// the variant (RFC 9111 §4.3.3: a 410, a `no-store` 200): a waiter
    /// that looked that copy up must not revalidate it, which a 304 or a
    /// 5xx under stale-if-error answered with the removed page (review37f
    /// M1), but fetch as a miss.
    pub fn release_replacing(&self) {
        self.signal.send_replace(Signal::Released(true));
    }

    /// Wakes the waiters now: the revalidation failed with `status` (the
    /// backend's 5xx or portico's own error), and the stale copy was
    /// served, as it may be to them: Varnish's grace, one fetch for all.
    /// Also for a copy its leader's request took no stale-if-error for:
    /// each waiter's own may serve it.
    pub fn failed(&self, status: u16) {
        self.signal.send_replace(Signal::Failed(status));
    }

    /// Notes that the entry this leader fetched, its response in at
    /// `response_time`, is stored.
    pub fn stored(&mut self, response_time: SystemTime) {
        self.stored = Some(response_time);
    }

    /// Notes that this leader took the lock after a leader that handed it
    /// on (stored nothing for anyone).
    pub fn took_over(&mut self) {
        self.second = true;
    }

    /// Whether an answer that served only its own request may hand the
    /// lock on to the waiters rather than let them go: once per burst,
    /// so that requests which each get such an answer (a backend that
    /// answers every GET with a 304) are not answered one after another.
    pub fn may_hand_on(&self) -> bool {
        !self.second
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut map = self
            .locks
            .locks
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.remove(&self.key);
        drop(map);
        if let Some(at) = self.stored {
            self.signal.send_replace(Signal::Stored(at));
        }
        // `signal` drops after this, so a woken waiter finds the key free.
    }
}

pub enum Claim {
    Leader(Leader),
    /// Another request is fetching; wait on this.
    Wait(watch::Receiver<Signal>),
}

impl Locks {
    pub fn claim(cache: &Arc<super::Cache>, key: &str) -> Claim {
        let mut map = cache.locks.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = map.get(key) {
            return Claim::Wait(waiting.clone());
        }
        let (signal, waiting) = watch::channel(Signal::Pending);
        map.insert(key.to_owned(), waiting);
        drop(map);
        Claim::Leader(Leader {
            locks: cache.clone(),
            key: key.to_owned(),
            signal,
            stored: None,
            second: false,
        })
    }

    /// The wait on `key`'s leader, if one is fetching, without becoming
    /// one: for a request whose own fetch could serve no one else.
    pub fn existing(cache: &super::Cache, key: &str) -> Option<watch::Receiver<Signal>> {
        let map = cache.locks.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).cloned()
    }
}

/// How a wait on the leader ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The leader is done, and stored the entry whose response came at
    /// this time if any: look in the cache, and if nothing there serves,
    /// claim the lock again (what the leader could not store may have been
    /// its own request's doing).
    Done(Option<SystemTime>),
    /// The leader let the waiters go ([`Leader::release`]); `true` when
    /// its answer replaced the stored copy ([`Leader::release_replacing`]).
    Released(bool),
    /// The leader's revalidation failed with this status ([`Leader::failed`]).
    Failed(u16),
    /// Not done by the deadline.
    Late,
}

/// Waits until the leader is done, at most until `deadline`.
pub async fn wait(mut waiting: watch::Receiver<Signal>, deadline: tokio::time::Instant) -> Waited {
    // `changed` is Ok for a signal (seen even after the leader dropped),
    // and errs once the leader is dropped without one.
    if tokio::time::timeout_at(deadline, waiting.changed())
        .await
        .is_err()
    {
        return Waited::Late;
    }
    let signal = *waiting.borrow();
    match signal {
        Signal::Released(replaced) => Waited::Released(replaced),
        Signal::Failed(status) => Waited::Failed(status),
        Signal::Stored(at) => Waited::Done(Some(at)),
        Signal::Pending => Waited::Done(None),
    }
}
