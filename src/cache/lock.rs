//! Request coalescing, after pingora's `CacheKeyLock`: the first miss for a
//! key becomes the leader and fetches; later misses wait (bounded) for the
//! leader to store the response, then read it from the cache. The lock is
//! released when the leader's guard drops: after the entry is stored, at
//! once for a response that will not be stored, or when the leader's
//! request dies, so waiters never hang on a lost fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, Default)]
pub struct Locks {
    /// Held only to insert or remove, never across an await.
    inner: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// Held by the leader; dropping it wakes the waiters.
#[derive(Debug)]
pub struct Leader {
    locks: Arc<super::Cache>,
    key: String,
    _done: watch::Sender<()>,
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
        // `_done` drops after this, so a woken waiter finds the key free.
    }
}

pub enum Claim {
    Leader(Leader),
    /// Another request is fetching; wait on this.
    Wait(watch::Receiver<()>),
}

impl Locks {
    pub fn claim(cache: &Arc<super::Cache>, key: &str) -> Claim {
        let mut map = cache.locks.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = map.get(key) {
            return Claim::Wait(waiting.clone());
        }
        let (done, waiting) = watch::channel(());
        map.insert(key.to_owned(), waiting);
        drop(map);
        Claim::Leader(Leader {
            locks: cache.clone(),
            key: key.to_owned(),
            _done: done,
        })
    }
}

/// Waits until the leader is done, at most `limit`. True if it finished.
pub async fn wait(mut waiting: watch::Receiver<()>, limit: Duration) -> bool {
    // `changed` errs once the sender (the leader) is dropped: that is the
    // signal; a value is never sent.
    tokio::time::timeout(limit, waiting.changed()).await.is_ok()
}
