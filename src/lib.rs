//! portico is a reverse proxy and load balancer with an RFC 9111 response
//! cache. A validated [`config::Config`] describes listeners, upstreams
//! (sets of backend addresses) and routes; [`server`] accepts HTTP/1.1 and
//! h2c connections and hands each request to [`proxy`], which picks a route,
//! cleans the head per RFC 9110 §7.6, chooses a backend through [`upstream`]
//! and streams both bodies. [`sample`] is the bundled order backend used by
//! the tests, benchmarks and the `demo` command.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod limit;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod sample;
pub mod server;
pub mod signal;
pub mod task;
pub mod upstream;

/// Runs the proxy described by the config at `path` until SIGTERM,
/// SIGINT or SIGQUIT, then drains (see [`server::run`]). A second signal
/// during the drain closes the connections still open, logs their
/// requests and exits 1; SIGHUP reloads the file.
///
/// `text` is the file as read, for the places of its warnings.
pub async fn run(
    path: std::path::PathBuf,
    config: config::Config,
    text: String,
) -> std::io::Result<()> {
    // Handled before the first socket is bound (see `signal`).
    let stop = signal::terminate();
    let hangup = signal::Hangup::install();
    let listeners = server::bind(&config.server.listen).await?;
    let admin_listener = server::bind_admin(config.admin.listen).await?;
    let token = config.admin.token.as_ref().map(|t| t.0.clone());
    let written = config::Written::new(&text, &path);
    admin::warn_if_short(token.as_deref(), written.at("admin.token_file"));
    tracing::info!(
        addr = %admin_listener.local_addr()?,
        mutations = if token.is_some() { "enabled" } else { "disabled (no token_file)" },
        "admin listening"
    );
    admin::warn_if_exposed(config.admin.listen, written.at("admin.listen"));
    config::warn_of_risks(&config, &written);
    drop(written);
    let shared = server::Shared::with_path(&config, Some(path));
    shared
        .load_tls(&config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut tls = Vec::new();
    for (index, listener) in config.server.tls.iter().enumerate() {
        for bound in server::bind(&listener.listen).await? {
            tls.push((bound, index));
        }
    }
    hangup.reload(shared.clone());
    let all = server::Listeners {
        plain: listeners,
        tls,
        admin: Some((admin_listener, token)),
    };
    server::run_all(shared, all, stop).await;
    Ok(())
}

/// Helpers shared by the unit tests.
#[cfg(test)]
mod test_support;
