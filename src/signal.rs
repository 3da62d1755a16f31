//! Process signals: SIGTERM, SIGINT and SIGQUIT (nginx's graceful stop,
//! which its systemd unit sends) start a graceful shutdown; a second one
//! while draining cuts the drain short, as operators expect from nginx:
//! the connections still open are closed at once, their requests logged,
//! and the process exits 1 ([`hurried`]). SIGHUP
//! reloads portico's file, and drains the processes that have none.
//! SIGUSR1 and SIGUSR2 (nginx's reopen-logs and upgrade, HAProxy's soft
//! stop) are logged and ignored: their default action killed the process
//! at once, and a logrotate `postrotate` written for nginx sends SIGUSR1.
//!
//! Handlers are installed by [`terminate`] and [`Hangup::install`], before
//! the listeners are bound: until then a signal has its
//! default action, which kills the process, and a supervisor's SIGTERM
//! sent as soon as the port answers would skip the drain (review11).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// A second stop signal came: the drain is to be cut short.
static HURRIED: AtomicBool = AtomicBool::new(false);
static HURRY: Notify = Notify::const_new();
/// How many servers would cut their drain short on a second signal
/// ([`HurryWatch`]): with none, a second signal exits at once.
static WATCHING: AtomicUsize = AtomicUsize::new(0);
/// How long a hurried drain may take to close its connections and log
/// their requests before the process exits anyway.
const HURRY_BACKSTOP: Duration = Duration::from_secs(2);

/// Held by a server for its whole life, from before its stop signal is
/// awaited: a second stop signal then leaves the exit to its drain, which
/// awaits [`hurried`]. Held from the start, so a second signal that comes
/// before the drain begins is not taken for one with no drain to hurry.
pub struct HurryWatch(());

pub fn watch_hurry() -> HurryWatch {
    WATCHING.fetch_add(1, Ordering::SeqCst);
    HurryWatch(())
}

impl Drop for HurryWatch {
    fn drop(&mut self) {
        WATCHING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves once a second stop signal has come (at once if it came
/// already). A drain that awaits this closes its connections, waits
/// briefly for their access lines and exits 1; the signal's task exits
/// after [`HURRY_BACKSTOP`] if it does not.
pub async fn hurried() {
    loop {
        let notified = HURRY.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so a signal in between
        // still wakes this.
        notified.as_mut().enable();
        if HURRIED.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

/// Installs the SIGTERM, SIGINT and SIGQUIT handlers now, and returns a
/// future that resolves on the first of those signals and arranges for
/// the next one to cut the drain short ([`hurried`]). Needs a tokio
/// runtime.
pub fn terminate() -> impl Future<Output = ()> {
    on_signals(Terminate::install(false))
}

/// [`terminate`] for the processes that have no file to reload (`portico
/// demo`, `order-backend`): SIGHUP, a closed terminal's signal, drains
/// them too, rather than killing them with their queued work.
pub fn terminate_or_hangup() -> impl Future<Output = ()> {
    on_signals(Terminate::install(true))
}

/// Handlers installed by the caller (the argument is made before this is
/// awaited).
async fn on_signals(mut signals: Terminate) {
    let signal = signals.next().await;
    // Which one, for an operator reading why it stopped (review31f).
    tracing::info!(signal, "stop signal received");
    tokio::spawn(async move {
        let signal = signals.next().await;
        HURRIED.store(true, Ordering::SeqCst);
        if WATCHING.load(Ordering::SeqCst) == 0 {
            // Not "in-flight requests": by now there may be none, and what
            // is cut is other work (the demo's queued confirmations, which
            // the line blamed on requests, review35c 4).
            tracing::warn!(
                signal,
                "second signal: exiting at once, without finishing the shutdown"
            );
            std::process::exit(1);
        }
        tracing::warn!(
            signal,
            "second signal: closing the connections still open and exiting"
        );
        HURRY.notify_waiters();
        tokio::time::sleep(HURRY_BACKSTOP).await;
        std::process::exit(1);
    });
}

/// SIGTERM, SIGINT and SIGQUIT (and SIGHUP if asked), watched from the
/// moment of [`Terminate::install`].
struct Terminate {
    #[cfg(unix)]
    watched: Option<[tokio::signal::unix::Signal; 3]>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Terminate {
    #[cfg(unix)]
    fn install(with_hangup: bool) -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let hangup = with_hangup
            .then(|| signal(SignalKind::hangup()))
            .and_then(|watched| {
                watched
                    .inspect_err(|error| tracing::warn!(%error, "cannot watch SIGHUP"))
                    .ok()
            });
        let watched = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) {
            (Ok(term), Ok(int), Ok(quit)) => Some([term, int, quit]),
            (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => {
                tracing::warn!(%error, "cannot watch SIGTERM, SIGINT and SIGQUIT; only Ctrl-C stops portico");
                None
            }
        };
        ignore_user_signals();
        Terminate { watched, hangup }
    }

    #[cfg(not(unix))]
    fn install(_: bool) -> Self {
        Terminate {}
    }

    /// Waits for the next stop signal; its name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        if let Some([term, int, quit]) = &mut self.watched {
            let hangup = async {
                match &mut self.hangup {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => "SIGQUIT",
                _ = hangup => "SIGHUP",
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// Logs SIGUSR1 and SIGUSR2 from now on, and does nothing else with them
/// (see the module's doc): logs go to stderr, so there is no file to
/// reopen.
#[cfg(unix)]
fn ignore_user_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, name) in [
        (SignalKind::user_defined1(), "SIGUSR1"),
        (SignalKind::user_defined2(), "SIGUSR2"),
    ] {
        match signal(kind) {
            Ok(mut watched) => {
                tokio::spawn(async move {
                    while watched.recv().await.is_some() {
                        tracing::info!(signal = name, "ignored: logs go to stderr, there is nothing to reopen (SIGHUP reloads, SIGTERM or SIGQUIT stops)");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, signal = name, "cannot watch"),
        }
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
                // One sent before the listeners are up waits for them.
                shared.serving().await;
                while hangup.recv().await.is_some() {
                    // Logged by `reload_for`; nothing else to do with a
                    // rejection.
                    let _ = shared.reload_for("SIGHUP").await;
                }
            });
        }
        #[cfg(not(unix))]
        let _ = shared;
    }
}
