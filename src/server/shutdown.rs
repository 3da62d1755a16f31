//! Shutdown signalling for listeners and connections, after mini-redis: a
//! [`Shutdown`] is a clonable receiver that resolves once the server is told
//! to stop, and a [`Drain`] counts the tasks still running so the server can
//! wait for them (bounded by `shutdown_grace`).

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Resolves once shutdown has begun. Cheap to clone: one per connection.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// Starts shutdown for every [`Shutdown`] made from it.
#[derive(Debug)]
pub struct Trigger {
    sender: watch::Sender<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (Trigger { sender }, Shutdown { receiver })
}

impl Trigger {
    pub fn fire(&self) {
        // Err only means nobody listens any more: nothing left to stop.
        let _ = self.sender.send(true);
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Waits until shutdown begins (or the trigger is dropped).
    pub async fn recv(&mut self) {
        // An Err means the trigger is gone, which also means stop.
        let _ = self.receiver.wait_for(|stop| *stop).await;
    }
}

/// Held by every task that must finish before the server exits.
#[derive(Debug, Clone)]
pub struct DrainGuard {
    _sender: mpsc::Sender<()>,
}

/// Waits for every [`DrainGuard`] to be dropped.
#[derive(Debug)]
pub struct Drain {
    sender: Option<mpsc::Sender<()>>,
    receiver: mpsc::Receiver<()>,
}

impl Drain {
    pub fn new() -> Self {
        let (sender, receiver) = mpsc::channel(1);
        Drain {
            sender: Some(sender),
            receiver,
        }
    }

    pub fn guard(&self) -> DrainGuard {
        DrainGuard {
            _sender: self
                .sender
                .clone()
                .expect("guards are only handed out before wait() consumes the drain"),
        }
    }

    /// True if every guard was dropped within `grace`. May be called
    /// again, to wait some more.
    pub async fn wait(&mut self, grace: Duration) -> bool {
        self.sender = None;
        tokio::time::timeout(grace, self.receiver.recv())
            .await
            .is_ok()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}
