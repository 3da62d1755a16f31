//! `cargo run --example embedding`: portico as a library inside your own
//! tokio program. Bind a listener, build a config, run the server with a
//! shutdown future of your choosing, and stop it when you are done. The
//! `portico` binary does the same, with a TOML file and the signals
//! (see `portico::run`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portico::config::Config;
use portico::sample::{self, BackendOptions};
use portico::server::{self, Shared};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::timeout;

/// Longest any one step may take: an example must never hang.
const LIMIT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Something to proxy to: the bundled sample order backend. In your
    // program these would be the addresses of your own servers.
    let backend = sample::start(BackendOptions::new("orders-1")).await?;

    // Bind the listener yourself: with port 0 the OS picks a free port,
    // and you know the address before any traffic arrives.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;

    // One upstream and a catch-all route, built in code; every other
    // setting keeps its default. `portico::config::parse` builds the same
    // from a TOML string, with the errors `portico check` prints.
    let mut config = Config::single_upstream(vec![addr], vec![backend.addr()]);
    config.server.shutdown_grace = Duration::from_secs(2);

    // `Shared` is the running proxy's state, made from the config
    // (routes, upstreams, metrics, the settings `run` serves with);
    // keep a clone to read health or metrics while it runs. The server
    // runs until the future it is given resolves, then drains.
    let shared = Shared::new(&config);
    let (stop, stopped) = oneshot::channel::<()>();
    let proxy = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        server::run(shared, vec![listener], shutdown).await
    });

    // One request through the proxy.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = timeout(
        LIMIT,
        client.get(format!("http://{addr}/users/1/orders").parse()?),
    )
    .await??;
    let status = response.status();
    let header = |name: &str| {
        let value = response.headers().get(name).and_then(|v| v.to_str().ok());
        value.unwrap_or("-").to_owned()
    };
    println!("GET http://{addr}/users/1/orders -> {status}");
    println!(
        "  x-backend: {}, via: {}",
        header("x-backend"),
        header("via")
    );
    let body = timeout(LIMIT, response.into_body().collect()).await??;
    println!("  {}", String::from_utf8_lossy(&body.to_bytes()));

    // The client's idle keep-alive connection would hold the drain for
    // up to a second; a process that is exiting closes it first.
    drop(client);

    // Shut down: stop accepting, let in-flight requests finish (up to
    // `shutdown_grace`), return. Then stop the backend.
    let _ = stop.send(());
    timeout(LIMIT, proxy).await??;
    timeout(LIMIT, backend.stop()).await?;
    println!("proxy and backend stopped");
    if status != http::StatusCode::OK {
        return Err(format!("expected 200 OK, got {status}").into());
    }
    Ok(())
}
