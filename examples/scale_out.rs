//! `cargo run --example scale_out [N]`: N sample order backends (default 3)
//! and portico in front of them, all in this process on 127.0.0.1, then
//! three checked steps: load spreads over the backends, a backend that dies
//! costs no client a request, and a reload adds a backend that takes its
//! share at once. Exits 1 when a step does not behave as it should and 2 on
//! a bad argument, so CI can run it; every wait is bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use portico::sample::{self, BackendOptions, RunningBackend};
use portico::server::{self, Shared};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Requests per batch, and how many are in flight at once.
const REQUESTS: usize = 300;
const CONCURRENCY: usize = 16;
/// Longest any one request or wait may take before it counts as a hang.
const STEP: Duration = Duration::from_secs(5);
/// The whole run, however it goes.
const WHOLE_RUN: Duration = Duration::from_secs(60);

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// The proxy's config, as an operator would write it: round-robin, one
/// retry on another backend, and active checks every 250 ms, so a dead
/// backend is out of rotation within about half a second. It is a file
/// because a reload re-reads one.
fn config_text(backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"[server]
listen = ["127.0.0.1:0"]
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "orders"
backends = [{}]
balance = "round_robin"
retries = 1

[upstream.health]
path = "/health"
interval = "250ms"
timeout = "200ms"
rise = 2
fall = 2

[[route]]
path_prefix = "/"
upstream = "orders"
"#,
        list.join(", ")
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let count = match std::env::args().nth(1).map(|n| n.parse::<usize>()) {
        None => 3,
        Some(Ok(n)) if n >= 2 => n,
        _ => {
            eprintln!("usage: scale_out [N]  (N >= 2 backends, default 3)");
            return ExitCode::from(2);
        }
    };
    let dir = TempDir::new();
    match tokio::time::timeout(WHOLE_RUN, run(count, &dir.0)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(problem)) => {
            eprintln!("scale_out FAILED: {problem}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("scale_out FAILED: still running after {WHOLE_RUN:?}");
            ExitCode::FAILURE
        }
    }
}

async fn run(count: usize, dir: &Path) -> Result<(), String> {
    let started = Instant::now();
    let mut backends = Vec::new();
    for i in 1..=count {
        backends.push(start_backend(i).await?);
    }
    let file = dir.join("portico.toml");
    write_config(&file, &backends)?;
    let proxy = start_proxy(&file).await?;
    println!(
        "portico on http://{} (admin http://{}), round_robin over:",
        proxy.addr, proxy.admin
    );
    for b in &backends {
        println!("  {}  http://{}", b.name(), b.addr());
    }
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{}/users/1/orders", proxy.addr);

    println!("\n(a) {REQUESTS} GETs, {CONCURRENCY} at a time: load spreads");
    let seen = batch(&client, &url).await?;
    report(&seen, &backends)?;

    let victim = backends.remove(1);
    let (victim_name, victim_addr) = (victim.name().to_owned(), victim.addr());
    println!("\n(b) {victim_name} stops; {REQUESTS} more GETs");
    tokio::time::timeout(STEP, victim.stop())
        .await
        .map_err(|_| format!("{victim_name} did not stop within {STEP:?}"))?;
    let seen = batch(&client, &url).await?;
    report(&seen, &backends)?;
    wait_until_down(&proxy.shared, victim_addr).await?;
    show_down(&client, proxy.admin, &victim_name, victim_addr).await?;

    let name = format!("backend-{}", count + 1);
    println!("\n(c) {name} starts and replaces {victim_name} in the config file; reload");
    backends.push(start_backend(count + 1).await?);
    write_config(&file, &backends)?;
    proxy.shared.reload()?;
    let seen = batch(&client, &url).await?;
    report(&seen, &backends)?;

    println!("\nshutting down");
    // Its idle keep-alive connections would hold the drain for a second.
    drop(client);
    proxy.stop().await?;
    let stopping = futures_util::future::join_all(backends.into_iter().map(|b| b.stop()));
    tokio::time::timeout(STEP, stopping)
        .await
        .map_err(|_| format!("the backends did not stop within {STEP:?}"))?;
    println!("all stopped, {} ms in all", started.elapsed().as_millis());
    Ok(())
}

/// portico serving on 127.0.0.1:0, its admin endpoints on another port.
struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Starts portico with the config in `file`, which a reload re-reads.
async fn start_proxy(file: &Path) -> Result<Proxy, String> {
    let config = portico::config::load(file).map_err(|e| e.to_string())?;
    let listener = bind().await?;
    let admin = bind().await?;
    let (addr, admin_addr) = (local(&listener)?, local(&admin)?);
    let shared = Shared::with_path(&config, Some(file.to_path_buf()));
    let (stop, stopped) = oneshot::channel::<()>();
    let running = shared.clone();
    let task = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        // No token: the admin mutations (reload, purge) stay disabled.
        let admin = Some((admin, None));
        server::run_with_admin(running, vec![listener], admin, stopped).await
    });
    Ok(Proxy {
        addr,
        admin: admin_addr,
        shared,
        stop,
        task,
    })
}

impl Proxy {
    /// Stops accepting and waits for the drain.
    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        tokio::time::timeout(STEP, self.task)
            .await
            .map_err(|_| format!("the proxy did not drain within {STEP:?}"))?
            .map_err(|e| format!("the proxy task failed: {e}"))
    }
}

/// Prints what the admin `/status` and `/metrics` say of the stopped
/// backend, and fails unless both show it down.
async fn show_down(
    client: &HttpClient,
    admin: SocketAddr,
    name: &str,
    addr: SocketAddr,
) -> Result<(), String> {
    let status = fetch(client, &format!("http://{admin}/status")).await?;
    let status: serde_json::Value =
        serde_json::from_slice(&status).map_err(|e| format!("/status is not JSON: {e}"))?;
    let entry = status["upstreams"][0]["backends"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["addr"] == addr.to_string()))
        .ok_or("/status does not list the stopped backend")?;
    println!("  admin /status for {name}: {entry}");
    if entry["up"] != false {
        return Err(format!("/status does not show {name} down"));
    }
    let metrics = fetch(client, &format!("http://{admin}/metrics")).await?;
    let metrics = String::from_utf8_lossy(&metrics);
    let label = format!("backend=\"{addr}\"");
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("portico_backend_up") || l.starts_with("portico_upstream_requests")
        })
        .filter(|l| l.contains(&label))
        // The usual codes are exported at 0 from the start: what moved.
        .filter(|l| l.starts_with("portico_backend_up") || !l.ends_with(" 0"))
        .collect();
    for line in &lines {
        println!("  metrics: {line}");
    }
    if !lines
        .iter()
        .any(|l| l.starts_with("portico_backend_up") && l.ends_with(" 0"))
    {
        return Err(format!("/metrics does not show {name} down"));
    }
    let failed = lines
        .iter()
        .find(|l| l.contains("code=\"502\""))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("0");
    println!("  {failed} attempts on {name} failed (code 502) and were retried elsewhere");
    Ok(())
}

async fn start_backend(i: usize) -> Result<RunningBackend, String> {
    sample::start(BackendOptions::new(format!("backend-{i}")))
        .await
        .map_err(|e| format!("backend-{i} did not start: {e}"))
}

fn write_config(file: &Path, backends: &[RunningBackend]) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    std::fs::write(file, config_text(&addrs))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))
}

async fn bind() -> Result<TcpListener, String> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))
}

fn local(listener: &TcpListener) -> Result<SocketAddr, String> {
    listener.local_addr().map_err(|e| e.to_string())
}

/// Sends [`REQUESTS`] GETs to `url`, [`CONCURRENCY`] at a time; counts the
/// answers by the `X-Backend` that served them. Any answer but a 200 fails.
async fn batch(client: &HttpClient, url: &str) -> Result<HashMap<String, usize>, String> {
    let answers: Vec<Result<String, String>> = stream::iter(0..REQUESTS)
        .map(|_| answered_by(client, url))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut seen = HashMap::new();
    let mut failures = Vec::new();
    for answer in answers {
        match answer {
            Ok(backend) => *seen.entry(backend).or_insert(0) += 1,
            Err(problem) => failures.push(problem),
        }
    }
    match failures.first() {
        None => Ok(seen),
        Some(first) => Err(format!(
            "{} of {REQUESTS} requests failed; the first: {first}",
            failures.len()
        )),
    }
}

/// The name of the backend that answered a GET of `url` with a 200.
async fn answered_by(client: &HttpClient, url: &str) -> Result<String, String> {
    let response = get(client, url).await?;
    if response.status() != StatusCode::OK {
        return Err(format!("{} for GET {url}", response.status()));
    }
    let backend = response
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .ok_or("a 200 without X-Backend")?
        .to_owned();
    // Read to the end, so the connection goes back to the client's pool.
    let _ = tokio::time::timeout(STEP, response.into_body().collect()).await;
    Ok(backend)
}

async fn get(
    client: &HttpClient,
    url: &str,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    match tokio::time::timeout(STEP, client.get(uri)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(format!("GET {url}: {e}")),
        Err(_) => Err(format!("GET {url}: no answer within {STEP:?}")),
    }
}

/// The body of a 200 answer to a GET of `url`.
async fn fetch(client: &HttpClient, url: &str) -> Result<Bytes, String> {
    let response = get(client, url).await?;
    if response.status() != StatusCode::OK {
        return Err(format!("{} for GET {url}", response.status()));
    }
    match tokio::time::timeout(STEP, response.into_body().collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) => Err(format!("GET {url}: body: {e}")),
        Err(_) => Err(format!("GET {url}: body not read within {STEP:?}")),
    }
}

/// Prints how many answers each running backend gave, and fails unless
/// each got at least half of an even share.
fn report(seen: &HashMap<String, usize>, backends: &[RunningBackend]) -> Result<(), String> {
    let even = REQUESTS / backends.len();
    for b in backends {
        let n = seen.get(b.name()).copied().unwrap_or(0);
        println!("  {:<10} {n:>4}  {}", b.name(), "#".repeat(n / 5));
    }
    println!("  all {REQUESTS} answered 200");
    match backends
        .iter()
        .find(|b| seen.get(b.name()).copied().unwrap_or(0) * 2 < even)
    {
        Some(b) => Err(format!(
            "{} got less than half of its share of {even}",
            b.name()
        )),
        None => Ok(()),
    }
}

/// Waits until the active checks take the backend at `addr` out.
async fn wait_until_down(shared: &Shared, addr: SocketAddr) -> Result<(), String> {
    let down = || {
        shared.proxy.load().upstreams()[0]
            .status()
            .iter()
            .any(|b| b.addr == addr && !b.active_up)
    };
    tokio::time::timeout(STEP, async {
        while !down() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| format!("the checks did not mark {addr} down within {STEP:?}"))
}

/// A directory of this run's own for the config file, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("portico-scale-out-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
