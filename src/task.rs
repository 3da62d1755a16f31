//! Background tasks that live exactly as long as what owns them.

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
