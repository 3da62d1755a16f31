//! Process signals: SIGTERM and SIGINT start a graceful shutdown; a second
//! one while draining exits at once, as operators expect from nginx.

/// Resolves on the first SIGTERM or SIGINT, and arranges for the next one to
/// exit the process immediately.
pub async fn terminate() {
    wait_for_terminate().await;
    tokio::spawn(async {
        wait_for_terminate().await;
        tracing::warn!("second signal: exiting without waiting for in-flight requests");
        std::process::exit(1);
    });
}

#[cfg(unix)]
async fn wait_for_terminate() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops portico");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_terminate() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Reloads the configuration on every SIGHUP, logging the outcome.
pub fn spawn_reload_on_hangup(shared: std::sync::Arc<crate::server::Shared>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGHUP; reload through the admin API only");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            // Logged by `reload_for`; nothing else to do with a rejection.
            let _ = shared.reload_for("SIGHUP");
        }
    });
    #[cfg(not(unix))]
    let _ = shared;
}
