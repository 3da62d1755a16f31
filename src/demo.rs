//! `portico demo`: N sample order backends in-process over one shared store
//! (so a POST on one and a GET on another agree, as with a real database),
//! and the proxy in front of them, until Ctrl-C.

use std::net::SocketAddr;

use crate::cli::say;
use crate::config::Config;
use crate::sample::{self, BackendOptions};
use crate::server;

/// Starts the backends and the proxy on `listen`; returns after Ctrl-C,
/// SIGTERM or SIGQUIT once everything has stopped.
pub async fn run(backends: usize, listen: SocketAddr, admin: SocketAddr) -> std::io::Result<()> {
    run_until(
        backends,
        listen,
        admin,
        crate::signal::terminate_or_hangup(),
    )
    .await
}

/// Why `listen` and `admin` cannot both be had: one port for both (a
/// wildcard covering the other included), which would otherwise read as a
/// port some other process holds.
pub fn clash(listen: SocketAddr, admin: SocketAddr) -> Option<String> {
    (listen.port() != 0 && (listen == admin || crate::config::overlap(listen, admin))).then(|| {
        format!(
            "--listen {listen} and --admin {admin} take the same port: give the admin API its own"
        )
    })
}

/// [`run`] with the stop signal supplied by the caller (tests).
pub async fn run_until(
    backends: usize,
    listen: SocketAddr,
    admin: SocketAddr,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    if let Some(clash) = clash(listen, admin) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, clash));
    }
    let repo = sample::new_repository();
    let mut running = Vec::with_capacity(backends);
    for i in 1..=backends {
        let opts = BackendOptions::new(format!("backend-{i}"));
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        running.push(sample::start_on(loopback, opts, repo.clone()).await?);
    }
    let addrs: Vec<SocketAddr> = running.iter().map(|b| b.addr()).collect();

    let mut config = Config::single_upstream(vec![listen], addrs.clone());
    config.upstreams[0].name = "orders".into();
    config.upstreams[0].health = Some(crate::config::HealthCheck::default());
    config.routes[0].name = "orders".into();
    config.cache = Some(crate::config::Cache::default());
    config.routes[0].cache = true;
    // A demo stops on Ctrl-C within seconds even with a client stuck
    // mid-request; the default 30 s suits production drains.
    config.server.shutdown_grace = std::time::Duration::from_secs(5);
    // The demo's user wrote flags, not a file: a port in use names the flag
    // that moves it.
    let flag = |flag: &'static str| {
        move |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{e} (choose another with {flag})"))
        }
    };
    let listeners = server::bind(&config.server.listen)
        .await
        .map_err(flag("--listen"))?;
    let proxy_addr = listeners[0].local_addr()?;
    let admin = server::bind(&[admin]).await.map_err(flag("--admin"))?;
    let admin = admin.into_iter().next().expect("one address, one listener");
    let admin_addr = admin.local_addr()?;
    // As `portico --config` logs it: one line per listener.
    tracing::info!(addr = %admin_addr, mutations = "disabled (no token_file)", "admin listening");
    sample::warn_if_public(proxy_addr);
    // As `portico --config` warns of it (review35d 6).
    crate::admin::warn_if_exposed(admin_addr);
    print_banner(proxy_addr, admin_addr, &addrs);

    let shared = server::Shared::new(&config);
    server::run_with_admin(shared, listeners, Some((admin, None)), stop).await;
    // Together: each may take its drain grace to confirm queued orders.
    futures_util::future::join_all(running.into_iter().map(|b| b.stop())).await;
    say("demo stopped");
    Ok(())
}

fn print_banner(proxy: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) {
    let (proxy, admin) = (reachable(proxy), reachable(admin));
    let base = format!("http://{proxy}");
    let plural = if backends.len() == 1 { "" } else { "s" };
    say(format_args!(
        "portico demo: {} order backend{plural} behind {base}",
        backends.len()
    ));
    for (i, addr) in backends.iter().enumerate() {
        say(format_args!("  backend-{}  http://{addr}", i + 1));
    }
    say("");
    say("Try (repeat them: /health rotates over the backends, the order list is cached):");
    say(format_args!("  curl -si {base}/health"));
    say(format_args!(
        "  curl -si {base}/users/1/orders      (Cache-Status: portico; hit on the second call)"
    ));
    say(format_args!(
        "  curl -si -X POST {base}/users/1/orders -H 'content-type: application/json' \\\n       -d '{{\"items\":[{{\"sku\":\"A-1\",\"qty\":2}}],\"amount_cents\":1999,\"email\":\"a@example.com\"}}'"
    ));
    say(format_args!("  curl -s {base}/orders/ORDER-002"));
    say(format_args!(
        "  curl -si --http2-prior-knowledge {base}/health"
    ));
    say(format_args!(
        "  curl -s http://{admin}/metrics | grep portico_   (admin: /metrics /status /readyz)"
    ));
    say("");
    say("Ctrl-C stops the proxy and the backends.");
}

/// An address to connect to for a listener on `addr`: a wildcard one
/// (`0.0.0.0`, `[::]`) is reached on loopback, which a browser takes.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if !ip.is_unspecified() => addr,
        std::net::IpAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        std::net::IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
    }
}
