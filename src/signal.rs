//! Process signals: SIGTERM and SIGINT start a graceful shutdown; a second
//! one while draining exits at once, as operators expect from nginx.
//!
//! Handlers are installed by [`terminate`] and [`Hangup::install`], before
//! the listeners are bound: until then a signal has its
//! default action, which kills the process, and a supervisor's SIGTERM
//! sent as soon as the port answers would skip the drain (review11).

use std::future::Future;

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that
/// resolves on the first of those signals and arranges for the next one to
/// exit the process immediately. Needs a tokio runtime.
pub fn terminate() -> impl Future<Output = ()> {
    let mut signals = Terminate::install();
    async move {
        signals.next().await;
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!("second signal: exiting without waiting for in-flight requests");
            std::process::exit(1);
        });
    }
}

/// SIGTERM and SIGINT, watched from the moment of [`Terminate::install`].
struct Terminate {
    #[cfg(unix)]
    watched: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Terminate {
    #[cfg(unix)]
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let watched = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "cannot watch SIGTERM and SIGINT; only Ctrl-C stops portico");
                None
            }
        };
        Terminate { watched }
    }

    #[cfg(not(unix))]
    fn install() -> Self {
        Terminate {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.watched {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP, watched from the moment of [`Hangup::install`]: one that
/// comes before [`Hangup::reload`] is kept for it, not fatal.
pub struct Hangup {
    #[cfg(unix)]
    watched: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    /// Needs a tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let watched = signal(SignalKind::hangup())
                .inspect_err(|error| {
                    tracing::warn!(%error, "cannot watch SIGHUP; reload through the admin API only");
                })
                .ok();
            Hangup { watched }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    /// From now on every SIGHUP reloads `shared`'s configuration file,
    /// logging the outcome.
    pub fn reload(self, shared: std::sync::Arc<crate::server::Shared>) {
        #[cfg(unix)]
        if let Some(mut hangup) = self.watched {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    // Logged by `reload_for`; nothing else to do with a
                    // rejection.
                    let _ = shared.reload_for("SIGHUP");
                }
            });
        }
        #[cfg(not(unix))]
        let _ = shared;
    }
}
