//! Test harness, after mini-redis's `start_server()`: every server binds
//! 127.0.0.1:0, is spawned on the test's runtime and hands back its address;
//! every wait is bounded.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portico::config::Config;
use portico::sample::{self, BackendOptions, RunningBackend};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest any single step of a test may take before it counts as a hang.
pub const STEP: Duration = Duration::from_secs(10);

pub struct RunningProxy {
    pub addr: SocketAddr,
    /// Set by [`start_proxy_with_admin`].
    pub admin: Option<SocketAddr>,
    pub shared: std::sync::Arc<portico::server::Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin.expect("started with admin"), path)
    }

    /// Health of the first upstream's backends, as the admin status shows it.
    pub fn backend_status(&self) -> Vec<portico::upstream::BackendStatus> {
        self.shared.proxy.load().upstreams()[0].status()
    }

    /// Polls `done` every 20 ms until it holds; panics after [`STEP`].
    pub async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[portico::upstream::BackendStatus]) -> bool,
    ) {
        let waited = tokio::time::timeout(STEP, async {
            while !done(&self.backend_status()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "timed out waiting for {what}: {:?}",
            self.backend_status()
        );
    }

    /// What a reload to `config` does to the running proxy's generation.
    pub fn swap_in(&self, config: &Config) {
        let previous = self.shared.proxy.load_full();
        let next = portico::proxy::Proxy::rebuild(config, self.shared.metrics.clone(), &previous);
        self.shared.proxy.store(Arc::new(next));
    }

    /// The requests waiting for room in the first upstream.
    pub fn queued(&self) -> usize {
        self.shared.proxy.load().upstreams()[0].queued()
    }

    /// Waits until `n` requests wait for room in the first upstream.
    pub async fn wait_queued(&self, n: usize) {
        let waited = tokio::time::timeout(STEP, async {
            while self.queued() != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{} queued, not {n}", self.queued());
    }

    /// Sends `n` GETs of `/health` one after another, each answered 200;
    /// counts them by `X-Backend`.
    pub async fn spread(&self, n: usize) -> HashMap<String, usize> {
        let client = client();
        let mut answers = Vec::with_capacity(n);
        for _ in 0..n {
            let answer = get(&client, &self.url("/health")).await;
            assert_eq!(answer.status, StatusCode::OK);
            answers.push(answer);
        }
        count_by_backend(&answers)
    }

    /// A GET of `path` in a task of its own.
    pub fn spawn_get(&self, path: &str) -> JoinHandle<Answer> {
        let (client, url) = (client(), self.url(path));
        tokio::spawn(async move { get(&client, &url).await })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful stop; waits for the drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(STEP, &mut self.task)
            .await
            .expect("proxy drained in time")
            .expect("proxy task did not panic");
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the proxy for `config` on 127.0.0.1:0 (the config's own listen
/// addresses are ignored).
pub async fn start_proxy(config: Config) -> RunningProxy {
    start(config, None, None).await
}

/// [`start_proxy`] plus the admin endpoints on their own 127.0.0.1:0
/// listener, mutations allowed with `token`; `config_path` enables reload.
pub async fn start_proxy_with_admin(
    config: Config,
    token: Option<&str>,
    config_path: Option<std::path::PathBuf>,
) -> RunningProxy {
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start(config, Some((admin, token.map(str::to_owned))), config_path).await
}

/// [`start_proxy`] on a listener the test bound, so that the config can
/// name the proxy's own address before it starts.
pub async fn start_proxy_on(config: Config, listener: tokio::net::TcpListener) -> RunningProxy {
    start_listening(config, None, None, listener)
}

async fn start(
    config: Config,
    admin: Option<portico::server::AdminListener>,
    config_path: Option<std::path::PathBuf>,
) -> RunningProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_listening(config, admin, config_path, listener)
}

fn start_listening(
    config: Config,
    admin: Option<portico::server::AdminListener>,
    config_path: Option<std::path::PathBuf>,
    listener: tokio::net::TcpListener,
) -> RunningProxy {
    let addr = listener.local_addr().unwrap();
    let admin_addr = admin.as_ref().map(|(l, _)| l.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let shared = portico::server::Shared::with_path(&config, config_path);
    let running = shared.clone();
    let task = tokio::spawn(async move {
        portico::server::run_with_admin(running, vec![listener], admin, async {
            let _ = stopped.await;
        })
        .await;
    });
    RunningProxy {
        addr,
        admin: admin_addr,
        shared,
        stop: Some(stop),
        task,
    }
}

pub async fn start_backends(n: usize) -> Vec<RunningBackend> {
    let mut backends = Vec::with_capacity(n);
    for i in 1..=n {
        backends.push(start_backend(BackendOptions::new(format!("b{i}"))).await);
    }
    backends
}

/// Waits until `backend` has seen `n` requests, at most [`STEP`].
pub async fn at_backend(backend: &RunningBackend, n: u64) {
    let seen = tokio::time::timeout(STEP, async {
        while backend.requests() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(
        seen.await.is_ok(),
        "{n} requests at the backend within STEP; it saw {}",
        backend.requests()
    );
}

pub async fn start_backend(opts: BackendOptions) -> RunningBackend {
    tokio::time::timeout(STEP, sample::start(opts))
        .await
        .expect("backend started in time")
        .expect("backend bound")
}

/// An address whose connects are refused for as long as the socket
/// returned lives: bound and never listening, so no other test running
/// alongside can take the port. A listener dropped to free its port
/// could find it bound again by another test, which then answered.
pub fn refusing_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// One upstream over `backends`, one catch-all route, limits at defaults.
pub fn config_for(backends: &[&RunningBackend]) -> Config {
    Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        backends.iter().map(|b| b.addr()).collect(),
    )
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// `answers` counted by their `X-Backend`.
pub fn count_by_backend(answers: &[Answer]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for answer in answers {
        *seen
            .entry(answer.header("x-backend").to_owned())
            .or_default() += 1;
    }
    seen
}

/// Counts by backend name, as [`count_by_backend`] gives them.
pub fn counts(pairs: &[(&str, usize)]) -> HashMap<String, usize> {
    pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
}

/// `config` with the cache on for its first route.
/// A fresh directory for one test's files (a config, a token file), and
/// the `portico.toml` path in it.
pub fn config_dir(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("portico-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("portico.toml");
    (dir, file)
}

pub fn with_cache(mut config: Config) -> Config {
    config.cache = Some(portico::config::Cache::default());
    config.routes[0].cache = true;
    config
}

/// `config` with 127.0.0.1 in `server.trusted_proxies`, as a balancer in
/// front of portico would be.
pub fn trusting_loopback(mut config: Config) -> Config {
    config.server.trusted_proxies = vec![portico::config::Cidr {
        addr: "127.0.0.1".parse().unwrap(),
        prefix: 32,
    }];
    config
}

/// Sends `request` alone on a fresh h2c connection with hyper's
/// connection-level client, which sends its target as given (no
/// `:authority` for a relative one, `*` as the path), and returns the
/// status, within [`STEP`]: for requests the pooled client would fix up.
pub async fn h2c_status(addr: SocketAddr, request: Request<Full<Bytes>>) -> StatusCode {
    let (mut sender, _connection) = h2c_connection(addr).await;
    tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("answer within STEP")
        .expect("response")
        .status()
}

/// An HTTP/2 prior-knowledge connection to `addr`: its sender, and its
/// task, which ends when the connection does.
pub async fn h2c_connection<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

/// A client of the h2 library on a new h2c (prior knowledge) connection
/// to `addr`, ready for a stream: for what hyper's client hides (a
/// stream's reset, DATA written apart from its HEADERS).
pub async fn h2_frames_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    client.ready().await.unwrap()
}

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

/// Sends a request and reads the whole answer, within [`STEP`].
pub async fn send(client: &TestClient, request: Request<Full<Bytes>>) -> Answer {
    tokio::time::timeout(STEP, async {
        let response = client.request(request).await.expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    })
    .await
    .expect("answer within STEP")
}

pub async fn get(client: &TestClient, url: &str) -> Answer {
    send(
        client,
        Request::get(url).body(Full::new(Bytes::new())).unwrap(),
    )
    .await
}

/// A GET of `url` with `fields`.
pub async fn get_with(client: &TestClient, url: &str, fields: &[(&str, &str)]) -> Answer {
    let mut request = Request::get(url);
    for (name, value) in fields {
        request = request.header(*name, *value);
    }
    send(client, request.body(Full::new(Bytes::new())).unwrap()).await
}

/// Writes `raw` on a fresh connection and reads until the server closes or
/// [`STEP`] passes; for requests a well-behaved client library cannot send.
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A backend that speaks raw bytes: for each connection it reads one
/// request head and writes `answer(head)`, then closes. For backend
/// behaviour the sample backend would never show.
pub async fn scripted_backend(answer: impl Answers) -> SocketAddr {
    counted_scripted_backend(answer).await.0
}

/// What a [`scripted_backend`] answers a request head with.
pub trait Answers: Fn(&str) -> &'static [u8] + Send + Sync + 'static {}

impl<F: Fn(&str) -> &'static [u8] + Send + Sync + 'static> Answers for F {}

/// A [`scripted_backend`] with two answers: `then` to a request whose
/// head, lower-cased, holds `holds`, and `otherwise` to the others.
pub async fn answering_when(
    holds: &'static str,
    then: &'static [u8],
    otherwise: &'static [u8],
) -> SocketAddr {
    scripted_backend(
        move |head| match head.to_ascii_lowercase().contains(holds) {
            true => then,
            false => otherwise,
        },
    )
    .await
}

/// [`scripted_backend`], with the count of connections it accepted.
pub async fn counted_scripted_backend(answer: impl Answers) -> (SocketAddr, Arc<AtomicUsize>) {
    let backend = recording_backend(answer).await;
    (backend.addr, backend.accepted)
}

/// A [`scripted_backend`] that keeps count of its connections and the
/// heads it was sent.
pub struct Recording {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Recording {
    /// The heads received so far whose target is `target`.
    pub fn heads_for(&self, target: &str) -> Vec<String> {
        let heads = self.heads.lock().unwrap();
        heads
            .iter()
            .filter(|head| target_of(head) == target)
            .cloned()
            .collect()
    }
}

impl Recording {
    /// The head of the first request for `target`, lower-cased; waits for
    /// one at most [`STEP`].
    pub async fn first_head_for(&self, target: &str) -> String {
        let first = tokio::time::timeout(STEP, async {
            loop {
                if let Some(head) = self.heads_for(target).into_iter().next() {
                    return head.to_ascii_lowercase();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        first.unwrap_or_else(|_| panic!("no request for {target} within STEP"))
    }
}

/// [`scripted_backend`], recording what it gets (see [`Recording`]).
pub async fn recording_backend(answer: impl Answers) -> Recording {
    use tokio::io::AsyncWriteExt;
    let answer = Arc::new(answer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let recording = Recording {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::new(AtomicUsize::new(0)),
        heads: Arc::default(),
    };
    let (accepted, heads) = (recording.accepted.clone(), recording.heads.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let (heads, answer) = (heads.clone(), answer.clone());
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&head).into_owned();
                let reply = answer(&head);
                heads.lock().unwrap().push(head);
                let _ = stream.write_all(reply).await;
            });
        }
    });
    recording
}

/// A backend that answers `/hold` once `release` is notified and anything
/// else at once, naming itself in `X-Backend`; one request per connection.
pub async fn holding_backend(name: &'static str, release: Arc<tokio::sync::Notify>) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                if target_of(&String::from_utf8_lossy(&head)) == "/hold" {
                    release.notified().await;
                }
                let ok = format!(
                    "HTTP/1.1 200 OK\r\nx-backend: {name}\r\ncontent-length: 2\r\n\
                     connection: close\r\n\r\nok"
                );
                let _ = stream.write_all(ok.as_bytes()).await;
            });
        }
    });
    addr
}

/// A keep-alive backend that answers `200 ok` to each request as soon as
/// its head is in, before reading its body (which it then reads): an
/// upload answered early. Counts the connections it accepts.
pub async fn early_answer_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    serve_early_answers(listener, accepted.clone());
    (addr, accepted)
}

/// [`early_answer_backend`] on `listener`, counting in `count`. Aborting
/// the task returned closes the listener (new connects are refused) while
/// the connections already accepted go on being served.
pub fn serve_early_answers(
    listener: tokio::net::TcpListener,
    count: Arc<AtomicUsize>,
) -> JoinHandle<()> {
    serve_early_answers_telling(listener, count, Arc::new(tokio::sync::Notify::new()))
}

/// [`serve_early_answers`], notifying `uploaded` each time it has read an
/// upload to its end.
pub fn serve_early_answers_telling(
    listener: tokio::net::TcpListener,
    count: Arc<AtomicUsize>,
    uploaded: Arc<tokio::sync::Notify>,
) -> JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let uploaded = uploaded.clone();
            tokio::spawn(async move {
                while let Some(mut got) = read_head(&mut stream).await {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                    let (end, length) = head_end_and_length(&got);
                    let mut buf = [0u8; 4096];
                    while got.len() < end + length {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if length > 0 {
                        uploaded.notify_one();
                    }
                }
            });
        }
    })
}

/// Where the HTTP/1 head at the start of `got` ends, and the
/// Content-Length it declares (0 for none).
pub fn head_end_and_length(got: &[u8]) -> (usize, usize) {
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    (end, length)
}

/// Connects to `addr`, writes `raw` and reads the first answer's head,
/// which must be a 200; returns the connection and what was read.
pub async fn answered_ok(addr: SocketAddr, raw: &[u8]) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let first = tokio::time::timeout(STEP, read_head(&mut stream))
        .await
        .expect("the first answer within STEP")
        .expect("the first answer");
    assert!(first.starts_with(b"HTTP/1.1 200"), "{first:?}");
    (stream, first)
}

/// Writes `raw` on `stream` and reads one whole answer (its body by its
/// `Content-Length`), each read within [`STEP`]; returns its head,
/// lowercased.
pub async fn whole_answer_on(stream: &mut tokio::net::TcpStream, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(raw).await.unwrap();
    let mut got = tokio::time::timeout(STEP, read_head(stream))
        .await
        .expect("a response within STEP")
        .expect("a response, not a closed connection");
    let (end, length) = head_end_and_length(&got);
    let mut buf = [0u8; 4096];
    while got.len() < end + length {
        let n = tokio::time::timeout(STEP, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got[..end]).to_ascii_lowercase()
}

/// Reads a request head (and whatever follows it in the same reads);
/// `None` if the connection ends first.
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// The request target of a raw request head.
pub fn target_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("/")
}

/// A raw backend on loopback: each connection it accepts is handed to
/// `serve` in a task of its own.
pub async fn serve_each<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// A backend whose answer never ends: a chunked 200, a byte of it every
/// 50 ms (so that to an HTTP/1.0 client its end is the connection's).
pub async fn endless_backend() -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    serve_each(|mut stream| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        if stream.write_all(head).await.is_err() {
            return;
        }
        while stream.write_all(b"1\r\nx\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// A backend that reads whatever comes and never answers.
pub async fn silent_backend() -> SocketAddr {
    use tokio::io::AsyncReadExt;
    serve_each(|mut stream| async move {
        let mut buf = [0u8; 4096];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
}

/// A WebSocket upgrade to the sample backend's echo through the proxy at
/// `addr`; checks the 101 head and returns the tunnel and the head,
/// lowercased.
pub async fn open_echo_tunnel_with_head(
    addr: std::net::SocketAddr,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws/echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(STEP, async {
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
    })
    .await
    .expect("101 head in time");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    (stream, head)
}

/// Sends "ping" through an echo tunnel and reads it back.
pub async fn ping(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(STEP, stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echoed, b"ping");
}

/// [`open_echo_tunnel_with_head`], the tunnel alone.
pub async fn open_echo_tunnel(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    open_echo_tunnel_with_head(addr).await.0
}

/// Whether a scrape holds a series whose line holds `holding` and whose
/// value is not 0: routes and backends export their usual codes at 0 from
/// the start, so a code's absence is its count of 0.
pub fn counted_series(metrics: &str, holding: &str) -> bool {
    metrics
        .lines()
        .any(|line| !line.starts_with('#') && line.contains(holding) && !line.ends_with(" 0"))
}

/// Pings an echo `tunnel` every 50 ms until it is cut (a write or an echo
/// fails): whether that came within [`STEP`].
pub async fn until_cut(tunnel: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cut = tokio::time::timeout(STEP, async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut echoed = [0u8; 4];
            if tunnel.write_all(b"ping").await.is_err()
                || !matches!(tunnel.read_exact(&mut echoed).await, Ok(4))
            {
                return;
            }
        }
    })
    .await;
    cut.is_ok()
}
