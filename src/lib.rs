//! portico is a reverse proxy and load balancer with an RFC 9111 response
//! cache. A validated [`config::Config`] describes listeners, upstreams
//! (sets of backend addresses) and routes; [`server`] accepts HTTP/1.1 and
//! h2c connections and hands each request to [`proxy`], which picks a route,
//! cleans the head per RFC 9110 §7.6, chooses a backend through [`upstream`]
//! and streams both bodies. [`sample`] is the bundled order backend used by
//! the tests, benchmarks and the `demo` command.

pub mod config;
pub mod demo;
pub mod proxy;
pub mod sample;
pub mod server;
pub mod signal;
pub mod upstream;

/// Runs the proxy described by `config` until SIGTERM or SIGINT, then drains
/// (see [`server::run`]). A second signal during the drain exits at once.
pub async fn run(config: config::Config) -> std::io::Result<()> {
    let listeners = server::bind(&config.server.listen).await?;
    for listener in &listeners {
        tracing::info!(addr = %listener.local_addr()?, "listening (http, h2c)");
    }
    let shared = server::Shared::new(&config);
    server::run(&config, shared, listeners, signal::terminate()).await;
    Ok(())
}
