//! Request coalescing, after pingora's `CacheKeyLock`: the first miss for a
//! key becomes the leader and fetches; later misses wait (bounded) for the
//! leader to store the response, then read it from the cache. The lock is
//! released when the leader's guard drops: after the entry is stored, or
//! when the leader's request dies, so waiters never hang on a lost fetch.
//! A leader whose answer nobody may store ([`Leader::release`]) lets the
//! waiters go at once, each to fetch on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Debug, Default)]
pub struct Locks {
    /// Held only to insert or remove, never across an await.
    inner: Mutex<HashMap<String, watch::Receiver<bool>>>,
}

/// Held by the leader; dropping it wakes the waiters.
#[derive(Debug)]
pub struct Leader {
    locks: Arc<super::Cache>,
    key: String,
    /// Whether the waiters may stop waiting for a stored response.
    released: watch::Sender<bool>,
}

impl Leader {
    /// Wakes the waiters now, to fetch on their own: what this leader
    /// fetches will not be stored for anyone (or it failed).
    pub fn release(&self) {
        self.released.send_replace(true);
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
        // `released` drops after this, so a woken waiter finds the key free.
    }
}

pub enum Claim {
    Leader(Leader),
    /// Another request is fetching; wait on this.
    Wait(watch::Receiver<bool>),
}

impl Locks {
    pub fn claim(cache: &Arc<super::Cache>, key: &str) -> Claim {
        let mut map = cache.locks.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = map.get(key) {
            return Claim::Wait(waiting.clone());
        }
        let (released, waiting) = watch::channel(false);
        map.insert(key.to_owned(), waiting);
        drop(map);
        Claim::Leader(Leader {
            locks: cache.clone(),
            key: key.to_owned(),
            released,
        })
    }
}

impl Locks {
    /// The wait on `key`'s leader, if one is fetching, without becoming
    /// one: for a request whose own fetch could serve no one else.
    pub fn existing(cache: &super::Cache, key: &str) -> Option<watch::Receiver<bool>> {
        let map = cache.locks.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).cloned()
    }
}

/// How a wait on the leader ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The leader is done: look in the cache, and if nothing there serves,
    /// claim the lock again (what the leader could not store may have been
    /// its own request's doing).
    Done,
    /// The leader let the waiters go ([`Leader::release`]).
    Released,
    /// Not done by the deadline.
    Late,
}

/// Waits until the leader is done, at most until `deadline`.
pub async fn wait(mut waiting: watch::Receiver<bool>, deadline: tokio::time::Instant) -> Waited {
    // `changed` is Ok for a release, and errs once the sender (the leader)
    // is dropped.
    if tokio::time::timeout_at(deadline, waiting.changed())
        .await
        .is_err()
    {
        return Waited::Late;
    }
    if *waiting.borrow() {
        Waited::Released
    } else {
        Waited::Done
    }
}
