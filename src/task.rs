//! Background tasks: ones that live exactly as long as what owns them, and
//! the cache's reads of bodies no client waits for any more, capped.

/// A spawned task that is aborted when this handle is dropped: the limiter's
/// cleanup, an upstream's health checker, the server's trimmer and admin
/// listener end with their owner, however the owner ends.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    pub fn new(task: tokio::task::JoinHandle<()>) -> Self {
        AbortOnDrop(task)
    }

    /// For watching the task from outside (tests).
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.0.abort_handle()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Bodies read for the cache at most at once with no client attached (the
/// rest of a range miss's response, see `proxy::body::Slice`): each may
/// hold up to `max_object_size` and a backend connection, and a client
/// can start one per cold URL with a one-byte range and leave.
const BACKGROUND_READS: usize = 32;

static READING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Spawns `read`, a body being read into the cache, unless
/// `BACKGROUND_READS` (32) are under way: then it is dropped, and with it the
/// copy (nothing is stored, and the next request for the URL fetches
/// again).
pub fn spawn_background_read(read: impl std::future::Future<Output = ()> + Send + 'static) {
    use std::sync::atomic::Ordering;
    /// Counts a read out however its task ends (runtime shutdown too).
    struct Reading;
    impl Drop for Reading {
        fn drop(&mut self) {
            READING.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if READING.fetch_add(1, Ordering::Relaxed) >= BACKGROUND_READS {
        READING.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(
            "{BACKGROUND_READS} bodies are being read for the cache already; one more dropped"
        );
        return;
    }
    let reading = Reading;
    runtime.spawn(async move {
        let _reading = reading;
        read.await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Polls `done` until it holds, for at most five seconds.
    async fn until(done: impl Fn() -> bool) -> bool {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        waited.await.is_ok()
    }

    #[tokio::test]
    async fn background_reads_are_capped() {
        let (release, held) = tokio::sync::watch::channel(());
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..BACKGROUND_READS + 5 {
            let (started, mut held) = (started.clone(), held.clone());
            spawn_background_read(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = held.changed().await;
            });
        }
        assert!(until(|| started.load(Ordering::SeqCst) == BACKGROUND_READS).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(started.load(Ordering::SeqCst), BACKGROUND_READS);
        // Once they end, there is room again.
        drop(release);
        assert!(until(|| READING.load(Ordering::SeqCst) == 0).await);
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        spawn_background_read(async move {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        assert!(until(|| ran.load(Ordering::SeqCst) == 1).await);
    }
}
