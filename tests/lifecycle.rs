//! Operating portico: draining on shutdown, reloading under load, and
//! protocol upgrades bridged through the proxy.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use portico::sample::BackendOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn shutdown_lets_fifty_slow_requests_finish_and_refuses_new_connections() {
    let mut opts = BackendOptions::new("slow");
    opts.delay = Duration::from_millis(300);
    let backend = Arc::new(start_backend(opts).await);
    let proxy = start_proxy(config_for(&[&backend])).await;
    let addr = proxy.addr;
    let mut requests = Vec::new();
    for _ in 0..50 {
        let url = proxy.url("/health");
        // One connection each, as 50 separate clients would have.
        requests.push(tokio::spawn(
            async move { get(&client(), &url).await.status },
        ));
    }
    at_backend(&backend, 50).await;

    let stopping = tokio::spawn(proxy.stop());
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    tokio::time::timeout(STEP, stopping).await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn reloading_under_load_fails_no_request_and_switches_backends() {
    let old = start_backend(BackendOptions::new("old")).await;
    let new = start_backend(BackendOptions::new("new")).await;
    let (dir, file) = config_dir("lifecycle");
    let write = |backend: std::net::SocketAddr| {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[upstream]]\nname = \"u\"\nbackends = [\"{backend}\"]\n[[route]]\nupstream = \"u\"\n"
        );
        std::fs::write(&file, text).unwrap();
    };
    write(old.addr());
    let config = portico::config::load(&file).unwrap();
    let proxy = Arc::new(start_proxy_with_admin(config, None, Some(file.clone())).await);

    let running = Arc::new(AtomicBool::new(true));
    let served = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (proxy, running, served) = (proxy.clone(), running.clone(), served.clone());
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut failures = 0;
            while running.load(Ordering::Relaxed) {
                let answer = get(&client, &proxy.url("/health")).await;
                if answer.status != StatusCode::OK {
                    failures += 1;
                }
                served.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let wait_for = |n: usize| {
        let served = served.clone();
        async move {
            let start = served.load(Ordering::Relaxed);
            tokio::time::timeout(STEP, async {
                while served.load(Ordering::Relaxed) < start + n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("traffic keeps flowing");
        }
    };
    let via_name = || async {
        let status = get(&client(), &proxy.admin_url("/status")).await;
        let json: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
        json["via_name"].as_str().unwrap().to_owned()
    };
    let before = via_name().await;
    assert!(before.starts_with("portico-"), "{before}");
    wait_for(50).await;
    write(new.addr());
    proxy.shared.reload().expect("good file reloads");
    wait_for(50).await;
    // The name loop detection relies on outlives a reload.
    assert_eq!(via_name().await, before);
    std::fs::write(&file, "[[upstream]]\nname = \"u\"\nbackends = []\n").unwrap();
    let error = proxy.shared.reload().expect_err("bad file is refused");
    assert!(error.contains("at least one backend"), "{error}");
    wait_for(50).await;
    running.store(false, Ordering::Relaxed);
    for worker in workers {
        assert_eq!(worker.await.unwrap(), 0, "a request failed during reload");
    }
    let answer = get(&client(), &proxy.url("/health")).await;
    assert_eq!(answer.header("x-backend"), "new");
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload waiting on its file (a FIFO here, which blocks the reader until
/// written: a slow disk, or a file of 20,000 routes, in the extreme) holds
/// up no request, even on a runtime of one thread as `--threads 1` runs;
/// and what the reload starts from the blocking pool, a listener and
/// health checks, runs on that runtime (review F3).
#[cfg(unix)]
#[test]
fn a_reload_waiting_on_its_file_holds_up_no_request_on_a_one_thread_runtime() {
    let (dir, file) = config_dir("reload-off-runtime");
    let fifo = dir.join("fifo.toml");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo failed");
    let (answered, answered_rx) = std::sync::mpsc::channel();
    let (reloaded_tx, reloaded) = std::sync::mpsc::channel();
    let (runner_fifo, runner_file) = (fifo.clone(), file.clone());
    // The new file, written into the FIFO once the request was answered.
    let (text_tx, text_rx) = std::sync::mpsc::channel::<String>();
    let runner = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let backend = start_backend(BackendOptions::new("b")).await;
            // Where the health checks of the upstream the reload adds go.
            let checked = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let extra = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap()
            };
            let base = format!(
                "[[upstream]]\nname = \"u\"\nbackends = [\"{}\"]\n[[route]]\nupstream = \"u\"\n",
                backend.addr()
            );
            std::fs::write(
                &runner_file,
                format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{base}"),
            )
            .unwrap();
            let config = portico::config::load(&runner_file).unwrap();
            let proxy = start_proxy_with_admin(config, None, Some(runner_fifo)).await;
            let client = client();
            assert_eq!(
                get(&client, &proxy.url("/health")).await.status,
                StatusCode::OK
            );

            let shared = proxy.shared.clone();
            let reload = tokio::spawn(async move { shared.reload_for("test").await });
            tokio::task::yield_now().await;
            assert_eq!(
                get(&client, &proxy.url("/health")).await.status,
                StatusCode::OK
            );
            let _ = answered.send(());

            let _ = text_tx.send(format!(
                "[server]\nlisten = [\"127.0.0.1:0\", \"{extra}\"]\n{base}\
                 [[upstream]]\nname = \"checked\"\nbackends = [\"{}\"]\n\
                 [upstream.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"50ms\"\n\
                 [[route]]\npath_prefix = \"/checked\"\nupstream = \"checked\"\n",
                checked.local_addr().unwrap()
            ));
            let outcome = tokio::time::timeout(STEP, reload).await;
            let outcome = outcome.expect("reload done once its file came").unwrap();
            assert!(outcome.is_ok(), "{outcome:?}");
            let extra_url = format!("http://{extra}/health");
            assert_eq!(get(&client, &extra_url).await.status, StatusCode::OK);
            let check = tokio::time::timeout(STEP, checked.accept()).await;
            assert!(check.is_ok(), "no health check reached the new upstream");
            let _ = reloaded_tx.send(());
        });
    });
    let feed = |text: String| {
        // Opening a FIFO to write waits for its reader: the reload.
        std::fs::write(&fifo, text).unwrap();
    };
    if answered_rx.recv_timeout(STEP).is_err() {
        // Let the stuck reload go, so that the runtime's thread ends.
        feed(String::new());
        panic!("no request was answered while a reload waited on its file");
    }
    feed(text_rx.recv_timeout(STEP).unwrap());
    let done = reloaded.recv_timeout(STEP);
    if let Err(panic) = runner.join() {
        std::panic::resume_unwind(panic);
    }
    done.expect("the reload finished");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_upgraded_connection_is_bridged_both_ways() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let mut stream = open_echo_tunnel(proxy.addr).await;
    for message in [&b"hello"[..], b"through the proxy", &[0u8, 255, 7, 13, 10]] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(STEP, stream.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(echoed, message);
    }
}

/// hyper lets go of a client connection as it upgrades it: the tunnel
/// keeps it counted as open, and a shutdown waits for the tunnel (up to
/// `shutdown_grace`) as for any connection.
#[tokio::test]
async fn an_open_tunnel_counts_as_a_connection_and_holds_the_drain() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.shutdown_grace = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    let shared = proxy.shared.clone();
    let open = move || shared.metrics.connections_open.get();
    let mut stream = open_echo_tunnel(proxy.addr).await;
    ping(&mut stream).await;
    // The upgrade request's own count goes once hyper has let go.
    tokio::time::timeout(STEP, async {
        while open() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("one connection counted");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(open(), 1);

    let shared = proxy.shared.clone();
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    ping(&mut stream).await;
    assert!(
        !stopping.is_finished(),
        "the drain did not wait for the tunnel"
    );
    // A reload during the drain is ignored, and says so (review34d: a
    // SIGHUP then logged "configuration reloaded").
    let refused = shared.reload().expect_err("no reload while draining");
    assert!(refused.contains("shutting down"), "{refused}");
    drop(stream);
    tokio::time::timeout(STEP, stopping)
        .await
        .expect("drained once the tunnel closed")
        .unwrap();
    assert_eq!(open(), 0);
}

#[tokio::test]
async fn h2c_and_chunked_upgrades_go_through_as_plain_requests() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    // h2c smuggling: the backend would upgrade, but never sees the ask.
    let answer = raw_exchange(
        proxy.addr,
        b"GET /ws/echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Offered beside another protocol, h2c alone is taken out: the
    // WebSocket upgrade goes on (review36d), where the whole request went
    // as a plain one.
    // The same offered on two lines, one list (RFC 9110 §5.3, review36f).
    for offer in [
        "Upgrade: websocket, h2c\r\n",
        "Upgrade: h2c\r\nUpgrade: websocket\r\n",
    ] {
        let mut tunnel = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "GET /ws/echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n{offer}\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tokio::io::AsyncWriteExt::write_all(&mut tunnel, head.as_bytes())
            .await
            .unwrap();
        let head = tokio::time::timeout(STEP, read_head(&mut tunnel))
            .await
            .expect("a head within STEP")
            .expect("a head");
        let answer = String::from_utf8_lossy(&head).into_owned();
        assert!(answer.starts_with("HTTP/1.1 101"), "{offer:?}: {answer}");
        assert!(!answer.to_ascii_lowercase().contains("h2c"), "{answer}");
    }
    // An upgrade request with a chunked body: the body is not lost, the
    // request is answered as an ordinary one.
    let answer = raw_exchange(
        proxy.addr,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nHELLO\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nHELLO\r\n"), "{answer}");
}

#[tokio::test]
async fn a_silent_tunnel_is_closed_after_idle_timeout_but_a_busy_one_is_not() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.idle_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let mut stream = open_echo_tunnel(proxy.addr).await;
    // Traffic every 100 ms for 3x the idle timeout keeps it open.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ping(&mut stream).await;
    }
    // Then silence: the proxy closes both sides.
    let read = tokio::time::timeout(STEP, stream.read(&mut [0u8; 16]))
        .await
        .expect("closed, not held open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    proxy
        .wait_until("the tunnel's backend slot to be freed", |b| {
            b[0].in_flight == 0
        })
        .await;
}

/// A stream a removed listener still serves is cut `shutdown_grace`
/// after the reload, as at shutdown (review52 L1: only its tunnels were;
/// a download or an event stream went on for as long as it lasted).
#[tokio::test]
async fn a_removed_listener_s_streams_end_within_shutdown_grace() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let streaming = endless_backend().await;
    let (dir, file) = config_dir("removed-streams");
    let extra = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let write = |listen: &str| {
        let text = format!(
            "[server]\nlisten = [{listen}]\nshutdown_grace = \"1s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [[upstream]]\nname = \"u\"\nbackends = [\"{streaming}\"]\n\
             [[route]]\nupstream = \"u\"\n"
        );
        std::fs::write(&file, text).unwrap();
    };
    write("\"127.0.0.1:0\"");
    let config = portico::config::load(&file).unwrap();
    let proxy = start_proxy_with_admin(config, None, Some(file.clone())).await;
    // Serving, so the listeners are registered before the reload.
    let ask = b"GET /events HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(ask).await.unwrap();
    let head = tokio::time::timeout(STEP, read_head(&mut first)).await;
    assert!(matches!(head, Ok(Some(_))), "no answer on {}", proxy.addr);
    drop(first);
    write(&format!("\"127.0.0.1:0\", \"{extra}\""));
    proxy.shared.reload().expect("reload adds a listener");
    // And an HTTP/1.0 client's, whose body ends with the connection.
    let mut streams = Vec::new();
    for ask in [&ask[..], b"GET /events HTTP/1.0\r\nHost: a\r\n\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(extra).await.unwrap();
        stream.write_all(ask).await.unwrap();
        let head = tokio::time::timeout(STEP, read_head(&mut stream)).await;
        assert!(matches!(head, Ok(Some(_))), "no answer on {extra}");
        streams.push(stream);
    }
    write("\"127.0.0.1:0\"");
    proxy.shared.reload().expect("reload removes a listener");
    let mut ends = Vec::new();
    for mut stream in streams {
        let ended = tokio::time::timeout(STEP, async {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return "closed",
                    Ok(_) => {}
                    Err(_) => return "reset",
                }
            }
        })
        .await;
        ends.push(ended.expect("the removed listener's stream went on"));
    }
    // The HTTP/1.0 body cut short is not made to read as whole by a FIN
    // (review53 L2), as one its backend cuts is not.
    assert_eq!(ends[1], "reset");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reload_adds_and_removes_listeners_without_touching_the_others() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let (dir, file) = config_dir("listeners");
    let write = |listen: &str| {
        let text = format!(
            "[server]\nlisten = [{listen}]\nshutdown_grace = \"1s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [[upstream]]\nname = \"u\"\nbackends = [\"{}\"]\n[[route]]\nupstream = \"u\"\n",
            backend.addr()
        );
        std::fs::write(&file, text).unwrap();
    };
    write("\"127.0.0.1:0\"");
    let config = portico::config::load(&file).unwrap();
    let proxy = start_proxy_with_admin(config, None, Some(file.clone())).await;
    // A free port for the listener the reload adds.
    let extra = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let extra_url = format!("http://{extra}/health");
    let client = client();
    // Serving, so the listeners are registered before the first reload.
    assert_eq!(
        get(&client, &proxy.url("/health")).await.status,
        StatusCode::OK
    );

    write(&format!("\"127.0.0.1:0\", \"{extra}\""));
    proxy.shared.reload().expect("reload adds a listener");
    assert_eq!(get(&client, &extra_url).await.status, StatusCode::OK);
    assert_eq!(
        get(&client, &proxy.url("/health")).await.status,
        StatusCode::OK
    );

    // A port someone else holds rejects the whole reload; nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    write(&format!("\"127.0.0.1:0\", \"{taken_addr}\""));
    let error = proxy.shared.reload().expect_err("a busy port is refused");
    assert!(
        error.contains(&format!("cannot listen on {taken_addr}")),
        "{error}"
    );
    assert_eq!(get(&client, &extra_url).await.status, StatusCode::OK);
    // Widening a listener on its port: portico's own holds it until the
    // reload is done, which the refusal says (review34d L2). (The kernel
    // refuses the wildcard while 127.0.0.1 holds the port: nothing binds.)
    write(&format!("\"127.0.0.1:0\", \"0.0.0.0:{}\"", extra.port()));
    let error = proxy.shared.reload().expect_err("its own port is refused");
    assert!(
        error.contains(&format!("portico's own listener {extra} holds the port")),
        "{error}"
    );

    // A keep-alive connection to the listener about to go.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut kept = tokio::net::TcpStream::connect(extra).await.unwrap();
    kept.write_all(ask).await.unwrap();
    let head = tokio::time::timeout(STEP, read_head(&mut kept))
        .await
        .unwrap();
    assert!(head.is_some_and(|head| !head
        .to_ascii_lowercase()
        .windows(17)
        .any(|w| w == b"connection: close")));

    // And a tunnel through it.
    let mut tunnel = open_echo_tunnel(extra).await;

    write("\"127.0.0.1:0\"");
    proxy.shared.reload().expect("reload removes a listener");
    // Its connections are drained as at shutdown (review28a F4): answers
    // say `Connection: close` from the signal on, and a connection ends
    // once it has had nothing to do for a second. (Whether the request
    // sent now is read before the signal is the scheduler's call.)
    let mut rest = Vec::new();
    let _ = kept.write_all(ask).await;
    let ended = tokio::time::timeout(STEP, kept.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the removed listener's connection stayed open"
    );
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let refused = tokio::time::timeout(STEP, async {
        while tokio::net::TcpStream::connect(extra).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "{extra} still accepts after its removal");
    // The tunnel goes on for `shutdown_grace`, then is cut, busy as it
    // is, as a shutdown would cut it (review29a F5), where a busy one went
    // on for good.
    assert!(
        until_cut(&mut tunnel).await,
        "the removed listener's busy tunnel stayed open"
    );
    assert_eq!(
        get(&client, &proxy.url("/health")).await.status,
        StatusCode::OK
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Opens one client connection (h2c prior knowledge or HTTP/1.1), sends a
/// GET for `path` and returns its status with the connection's task, which
/// ends when the server closes the connection.
async fn one_request_on_own_connection(
    addr: std::net::SocketAddr,
    path: &str,
    h2: bool,
) -> (StatusCode, tokio::task::JoinHandle<()>) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = http::Request::get(format!("http://{addr}{path}"));
    if !h2 {
        // HTTP/2 carries the authority in the URI instead.
        request = request.header("host", "a");
    }
    let request = request.body(Empty::<bytes::Bytes>::new()).unwrap();
    let (response, task) = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender.send_request(request).await.unwrap(), task)
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender.send_request(request).await.unwrap(), task)
    };
    let status = response.status();
    let _ = response.into_body().collect().await;
    (status, task)
}

#[tokio::test]
async fn idle_client_connections_are_closed_after_idle_timeout_but_busy_ones_are_not() {
    let mut opts = BackendOptions::new("slow");
    opts.delay = Duration::from_millis(800);
    let slow = start_backend(opts).await;
    let mut config = config_for(&[&slow]);
    config.server.idle_timeout = Duration::from_millis(200);
    // Far longer than the test's bound: only the idle timeout can close.
    config.server.request_header_timeout = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    for h2 in [true, false] {
        // The answer takes 4x the idle timeout: the connection is busy,
        // not idle, and the request completes.
        let (status, connection) = one_request_on_own_connection(proxy.addr, "/health", h2).await;
        assert_eq!(status, StatusCode::OK, "h2: {h2}");
        // Then nothing moves: the server closes it.
        let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
        assert!(closed.is_ok(), "idle connection left open (h2: {h2})");
    }
}

/// A proxy with `idle_timeout` (its head timer far beyond any test's
/// bound), and an HTTP/2 connection to it that has sent HEADERS without
/// END_HEADERS: a header block begun and not finished.
async fn half_sent_http2_head(
    idle_timeout: Duration,
    header_timeout: Duration,
) -> (
    portico::sample::RunningBackend,
    RunningProxy,
    tokio::net::TcpStream,
) {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.idle_timeout = idle_timeout;
    config.server.request_header_timeout = header_timeout;
    let proxy = start_proxy(config).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
                                                           // HEADERS, stream 1, END_STREAM only: GET http / (indexed fields).
    hello.extend_from_slice(&[0, 0, 3, 1, 1, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
    stream.write_all(&hello).await.unwrap();
    (backend, proxy, stream)
}

#[tokio::test]
async fn a_half_sent_http2_header_block_is_let_go_soon_after_idle_timeout() {
    // HEADERS without END_HEADERS, then silence. After the idle GOAWAY the
    // connection used to wait another idle_timeout; with nothing in flight
    // it now goes after a second. 6 s: the old 12 s would miss the bound.
    let (backend, _proxy, mut stream) =
        half_sent_http2_head(Duration::from_secs(6), Duration::from_secs(60)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6) + STEP / 2;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection with a half-sent header block left open"),
        }
    }
    assert_eq!(backend.requests(), 0);
}

/// A header block begun must end within `request_header_timeout`, as an
/// HTTP/1 head must (nginx's `client_header_timeout` times both): it was
/// held until `idle_timeout` (review41a F1: 400 such connections held
/// 80 MiB for 61 s). Cut, it is counted as a 408, as a stalled head is.
#[tokio::test]
async fn a_half_sent_http2_header_block_is_cut_at_request_header_timeout() {
    let header_timeout = Duration::from_millis(300);
    let (backend, proxy, mut stream) =
        half_sent_http2_head(Duration::from_secs(60), header_timeout).await;
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 4096];
    let mut read = Vec::new();
    loop {
        match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection with a half-sent header block left open"),
        }
    }
    assert!(
        started.elapsed() >= header_timeout / 2,
        "cut before its time"
    );
    // With a GOAWAY, which says which streams were taken (review41e F1).
    let mut kinds = Vec::new();
    let mut at = 0;
    while at + 9 <= read.len() {
        let len = (usize::from(read[at]) << 16)
            | (usize::from(read[at + 1]) << 8)
            | usize::from(read[at + 2]);
        kinds.push(read[at + 3]);
        at += 9 + len;
    }
    assert!(kinds.contains(&0x7), "frames {kinds:?}");
    assert_eq!(backend.requests(), 0);
    let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(
        text.contains("portico_requests_total{code=\"408\",route=\"_none\"} 1"),
        "{text}"
    );
    // An HTTP/2 connection between requests is not timed so: it waits for
    // idle_timeout.
    let mut client = h2_frames_client(proxy.addr).await;
    for _ in 0..2 {
        let request = http::Request::get(format!("http://{}/health", proxy.addr))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let response = tokio::time::timeout(STEP, response).await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(header_timeout * 3).await;
    }
}

/// Each header block is timed from its own start: blocks sent back to
/// back, each open across a look of the watchdog but ended in time, were
/// timed as one and the connection cut, its downloads with it (review41d
/// F1: a slow uplink and headers over 16 KiB).
#[tokio::test]
async fn http2_header_blocks_back_to_back_are_each_timed_alone() {
    let (backend, proxy, mut stream) =
        half_sent_http2_head(Duration::from_secs(60), Duration::from_millis(400)).await;
    // Stream 1's block is open; each pause below is over a quarter of the
    // timeout (the watchdog's step), each block well within it.
    let mut id = 1u32;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // CONTINUATION, END_HEADERS: `:authority: a`.
        let mut frames = vec![0, 0, 3, 9, 4];
        frames.extend_from_slice(&id.to_be_bytes());
        frames.extend_from_slice(&[0x41, 1, b'a']);
        id += 2;
        // HEADERS, END_STREAM only: GET http /.
        frames.extend_from_slice(&[0, 0, 3, 1, 1]);
        frames.extend_from_slice(&id.to_be_bytes());
        frames.extend_from_slice(&[0x82, 0x86, 0x84]);
        stream
            .write_all(&frames)
            .await
            .expect("connection still open");
    }
    let answered = tokio::time::timeout(STEP, async {
        while backend.requests() < 8 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(answered.is_ok(), "{} of 8 answered", backend.requests());
    let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(!counted_series(&text, "code=\"408\""), "{text}");
}

/// A header block trickled in CONTINUATION frames never becomes a request
/// hyper sees; its bytes used to count as activity, holding the
/// connection for as long as the client went on (review29a F6: minutes).
/// Frames outside a request do not keep an HTTP/2 connection from idling.
#[tokio::test]
async fn an_http2_header_block_trickled_in_continuations_does_not_hold_the_connection() {
    let (backend, _proxy, mut stream) =
        half_sent_http2_head(Duration::from_secs(1), Duration::from_secs(60)).await;
    let trickle = async {
        let mut buf = [0u8; 4096];
        loop {
            // CONTINUATION, stream 1, no END_HEADERS: one more indexed field.
            let frame = [0, 0, 1, 9, 0, 0, 0, 0, 1, 0x84];
            if stream.write_all(&frame).await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(STEP, trickle)
        .await
        .expect("a trickled header block held the connection open");
    assert_eq!(backend.requests(), 0);
}

/// A backend and a proxy in front of it whose request head timer is 200 ms
/// and whose idle timeout (60 s) is far beyond any bound of these tests.
async fn proxy_with_short_head_timer() -> (portico::sample::RunningBackend, RunningProxy) {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.request_header_timeout = Duration::from_millis(200);
    config.server.idle_timeout = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    (backend, proxy)
}

#[tokio::test]
async fn idle_keep_alive_waits_for_idle_timeout_not_request_header_timeout() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    // Only the head timer could close within the test's bounds.
    let (_backend, proxy) = proxy_with_short_head_timer().await;
    let url = proxy.url("/health");

    // As nginx's keepalive_timeout: between requests, a keep-alive
    // connection idles under idle_timeout, on HTTP/1.1 as on HTTP/2.
    for h2 in [false, true] {
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (mut h1_sender, mut h2_sender, connection) = if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            (
                None,
                Some(sender),
                tokio::spawn(async move { conn.await.is_ok() }),
            )
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            (
                Some(sender),
                None,
                tokio::spawn(async move { conn.await.is_ok() }),
            )
        };
        for round in 0..2 {
            let mut request = http::Request::get(&url);
            if !h2 {
                request = request.header("host", "a");
            }
            let request = request.body(Empty::<bytes::Bytes>::new()).unwrap();
            let response = match (&mut h1_sender, &mut h2_sender) {
                (Some(sender), _) => tokio::time::timeout(STEP, sender.send_request(request)).await,
                (_, Some(sender)) => tokio::time::timeout(STEP, sender.send_request(request)).await,
                _ => unreachable!(),
            }
            .unwrap()
            .unwrap_or_else(|e| panic!("request {round} refused (h2: {h2}): {e}"));
            assert_eq!(response.status(), StatusCode::OK);
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            tokio::time::sleep(Duration::from_millis(1000)).await;
            assert!(
                !connection.is_finished(),
                "keep-alive connection closed by the head timer (h2: {h2})"
            );
        }
    }
}

#[tokio::test]
async fn request_header_timeout_drops_silent_and_stalled_heads() {
    let (backend, proxy) = proxy_with_short_head_timer().await;

    // A new connection that never sends a head, as nginx's
    // client_header_timeout counts from the accept.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(STEP, silent.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "silent connection still open");
    // Closed without an answer; a head begun and not finished counts as
    // 408, as nginx logs it, and a connection that sent nothing does not.
    let timed_out = || {
        let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
        let series = "portico_requests_total{code=\"408\",route=\"_none\"} ";
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    assert_eq!((out.len(), timed_out()), (0, 0));

    // A keep-alive connection whose second head stalls halfway.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut first = vec![0; 4096];
    let n = tokio::time::timeout(STEP, stream.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost:")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "stalled second head left open");
    assert_eq!(backend.requests(), 1);
    assert_eq!((rest.len(), timed_out()), (0, 1));

    // A head trickled in, one header line at a time, that begins like the
    // HTTP/2 preface (a `PRI` method) but is not it.
    let mut trickled = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    trickled.write_all(b"PRI /a HTTP/1.1\r\n").await.unwrap();
    let closed = tokio::time::timeout(STEP, async {
        let mut buf = [0u8; 256];
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if trickled.write_all(b"x-a: 1\r\n").await.is_err() {
                return;
            }
            let read =
                tokio::time::timeout(Duration::from_millis(1), trickled.read(&mut buf)).await;
            if matches!(read, Ok(Ok(0) | Err(_))) {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "trickled PRI head left open");
    assert_eq!(timed_out(), 2);
}

/// Asks the proxy at `addr` for `size` bytes; returns the connection and
/// its first read, which holds the response head.
async fn start_download(
    addr: std::net::SocketAddr,
    size: usize,
) -> (tokio::net::TcpStream, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut first = vec![0; 16 * 1024];
    let n = tokio::time::timeout(STEP, stream.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    first.truncate(n);
    (stream, first)
}

#[tokio::test]
async fn a_download_paused_longer_than_request_header_timeout_arrives_whole() {
    let (_backend, proxy) = proxy_with_short_head_timer().await;
    // Far more than the socket buffers hold, so the proxy is still handing
    // the body over while the client pauses.
    let size = 40_000_000;
    let (mut stream, first) = start_download(proxy.addr, size).await;
    let n = first.len();
    let head_end = first[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the head fits in the first read")
        + 4;
    assert!(first.starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut rest = 0;
    let mut buf = vec![0; 256 * 1024];
    let mut received = n - head_end;
    while received < size {
        let read = tokio::time::timeout(STEP, stream.read(&mut buf))
            .await
            .expect("body kept flowing")
            .unwrap();
        assert!(
            read > 0,
            "connection closed after {received} of {size} bytes"
        );
        received += read;
        rest += 1;
    }
    assert_eq!(received, size);
    assert!(rest > 0);
}

/// Reads `stream` until the server closes it (or resets it), counting
/// the bytes; panics if nothing arrives for [`STEP`].
async fn bytes_until_closed(stream: &mut tokio::net::TcpStream) -> usize {
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    loop {
        match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return received,
            Ok(Ok(n)) => received += n,
            Err(_) => panic!("stalled after {received} bytes"),
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_idle_timeout() {
    // As nginx's send_timeout: a response the client takes no byte of for
    // idle_timeout ends, and the backend side is let go with it.
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.idle_timeout = Duration::from_millis(300);
    config.server.request_header_timeout = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    let size = 40_000_000;
    let (mut stream, first) = start_download(proxy.addr, size).await;
    let n = first.len();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    // The backend is busy for us while the socket buffers fill; then the
    // proxy gives up on the client and the request ends.
    proxy
        .wait_until("the unread response to be dropped", |backends| {
            backends[0].in_flight == 0
        })
        .await;
    // What the socket buffers held arrives, then the end, well short.
    let received = n + bytes_until_closed(&mut stream).await;
    assert!(received < size, "all {received} bytes arrived");
}

/// A sample backend and a proxy whose idle timeout is `idle` (head timer
/// far beyond the test), with an HTTP/2 connection to it whose streams'
/// windows are 64 KiB; the task ends when the connection does.
async fn h2_to_proxy_with_idle(
    idle: Duration,
) -> (
    portico::sample::RunningBackend,
    RunningProxy,
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.idle_timeout = idle;
    config.server.request_header_timeout = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(async move {
        let _ = conn.await;
    });
    (backend, proxy, sender, connection)
}

fn h2_get(proxy: &RunningProxy, path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://{}{path}", proxy.addr))
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test]
async fn an_http2_stream_whose_window_stays_shut_lets_its_backend_go_after_idle_timeout() {
    // The client stops reading one stream, so its flow-control window
    // closes; the connection itself keeps working. As nginx's send_timeout
    // for a stream: after idle_timeout the response is abandoned and the
    // backend side let go, while other streams go on.
    use http_body_util::BodyExt;
    let (_backend, proxy, mut sender, connection) =
        h2_to_proxy_with_idle(Duration::from_millis(300)).await;
    let size = 40_000_000;
    let unread = tokio::time::timeout(
        STEP,
        sender.send_request(h2_get(&proxy, &format!("/bytes/{size}"))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(unread.status(), StatusCode::OK);
    proxy
        .wait_until("the backend to be let go", |backends| {
            backends[0].in_flight == 0
        })
        .await;
    // The connection and its other streams are unharmed.
    let other = tokio::time::timeout(STEP, async {
        let response = sender
            .send_request(h2_get(&proxy, "/health"))
            .await
            .unwrap();
        let status = response.status();
        response.into_body().collect().await.unwrap();
        status
    })
    .await
    .expect("another stream answered");
    assert_eq!(other, StatusCode::OK);
    // With nothing else going on the connection is idle: it is closed,
    // though the client never ended the abandoned stream.
    tokio::time::timeout(STEP, connection)
        .await
        .expect("the idle connection closed")
        .unwrap();
    // What is left of the abandoned stream ends in an error, not in a body
    // that merely looks short.
    let rest = tokio::time::timeout(STEP, unread.into_body().collect())
        .await
        .map(|body| body.map(|whole| whole.to_bytes().len()));
    assert!(matches!(rest, Ok(Err(_))), "abandoned body: {rest:?}");
}

/// An HTTP/2 client that keeps asking is not idle, however small the
/// answers against its requests: one whose requests wrote more than it
/// read (uploads, a long token each time) was closed every `idle_timeout`
/// (tls56 M1).
#[tokio::test]
async fn an_http2_client_asking_more_than_it_is_answered_is_not_idle() {
    use http_body_util::BodyExt;
    let (_backend, proxy, mut sender, connection) =
        h2_to_proxy_with_idle(Duration::from_millis(600)).await;
    for n in 0..12 {
        // A fresh value each time, so the header compression cannot
        // shrink it: 2 KiB asked, a few bytes answered.
        let mut request = h2_get(&proxy, "/health");
        let pad = format!("{n:04}").repeat(512);
        request
            .headers_mut()
            .insert("x-pad", http::HeaderValue::from_str(&pad).unwrap());
        let status = tokio::time::timeout(STEP, async {
            let response = sender.send_request(request).await.expect("answered");
            let status = response.status();
            response.into_body().collect().await.unwrap();
            status
        })
        .await
        .expect("answered in time");
        assert_eq!(status, StatusCode::OK, "request {n}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !connection.is_finished(),
        "the connection was closed as idle"
    );
}

#[tokio::test]
async fn an_http2_stream_read_slowly_arrives_whole() {
    // Each pause is shorter than idle_timeout but all of them together far
    // longer: a client that keeps opening its window is never cut.
    use http_body_util::BodyExt;
    let (_backend, proxy, mut sender, _connection) =
        h2_to_proxy_with_idle(Duration::from_millis(600)).await;
    let size = 1024 * 1024;
    let request = h2_get(&proxy, &format!("/bytes/{size}"));
    let received = tokio::time::timeout(STEP, async {
        let mut body = sender.send_request(request).await.unwrap().into_body();
        let (mut received, mut since_pause) = (0, 0);
        while let Some(frame) = body.frame().await {
            let len = frame
                .expect("the stream is not cut")
                .into_data()
                .map_or(0, |d| d.len());
            received += len;
            since_pause += len;
            if since_pause >= 64 * 1024 {
                since_pause = 0;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        received
    })
    .await
    .expect("the download ended");
    assert_eq!(received, size);
}

/// A client stream that can go deaf: from then on it reads nothing, so
/// the client never sees (let alone answers) what the server sends.
struct Deafened {
    inner: tokio::net::TcpStream,
    deaf: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for Deafened {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.deaf.load(Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Deafened {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn the_drain_does_not_wait_on_a_trickled_head_or_a_silent_http2_client() {
    // Neither has a request in flight: the head timer still applies during
    // the drain, and an HTTP/2 client that never answers the GOAWAY is let
    // go after a quiet second, not at the end of shutdown_grace.
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.request_header_timeout = Duration::from_millis(300);
    config.server.idle_timeout = Duration::from_secs(60);
    config.server.shutdown_grace = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    let mut trickle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    trickle
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    // An HTTP/2 client that made a request, then stops listening: it will
    // never acknowledge the GOAWAY's PING.
    let deaf = Arc::new(AtomicBool::new(false));
    let stream = Deafened {
        inner: tokio::net::TcpStream::connect(proxy.addr).await.unwrap(),
        deaf: deaf.clone(),
    };
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let silent = tokio::spawn(async move {
        let _ = conn.await;
    });
    let answer = tokio::time::timeout(STEP, sender.send_request(h2_get(&proxy, "/health")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    drop(answer);
    deaf.store(true, Ordering::Relaxed);
    connections_open(&proxy, 2).await;
    // Bounded by STEP, far short of the 60 s grace.
    proxy.stop().await;
    drop((trickle, sender));
    silent.abort();
}

/// A head begun and left silent when shutdown begins is closed after the
/// drain's quiet second, and logged and counted as one the head timer
/// closes is (408); it left no trace (review31b L3).
#[tokio::test]
async fn a_head_the_drain_closes_is_counted() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.request_header_timeout = Duration::from_secs(60);
    config.server.shutdown_grace = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    let mut half = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHo").await.unwrap();
    connections_open(&proxy, 1).await;
    let generation = proxy.shared.proxy.load_full();
    proxy.stop().await;
    let text = String::from_utf8(generation.metrics().encode()).unwrap();
    assert!(
        text.contains("portico_requests_total{code=\"408\",route=\"_none\"} 1"),
        "{text}"
    );
    drop(half);
}

/// When `shutdown_grace` runs out, what is still being relayed is closed
/// then, not only when the process exits: the demo goes on after its
/// proxy stops (draining its backends), and kept relaying (review31d F3).
#[tokio::test]
async fn a_response_still_going_when_the_grace_runs_out_is_closed() {
    use tokio::io::AsyncReadExt as _;
    let addr = endless_backend().await;
    let mut config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    config.server.shutdown_grace = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = tokio::time::timeout(STEP, client.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    proxy.stop().await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, client.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the response went on after the grace");
}

#[tokio::test]
async fn the_drain_does_not_cut_a_response_the_client_reads_slowly() {
    // A cache hit is handed to hyper as one frame, so nothing counts as
    // being answered while hyper still writes it out. A client pausing
    // longer than the drain's quiet second must still get all of it.
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.cache = Some(portico::config::Cache {
        max_object_size: 64 * 1024 * 1024,
        ..portico::config::Cache::default()
    });
    config.routes[0].cache = true;
    config.server.shutdown_grace = Duration::from_secs(60);
    let proxy = start_proxy(config).await;
    let size = 16 * 1024 * 1024;
    let path = format!("/bytes/{size}");
    let url = proxy.url(&path);
    let stored = get(&client(), &url).await;
    assert!(stored.header("cache-status").contains("stored"));
    // The entry is stored once its body has gone by.
    let cache = proxy.shared.proxy.load().cache().unwrap().clone();
    tokio::time::timeout(STEP, async {
        while cache.stats().await.0 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the response was stored");
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let first = tokio::time::timeout(STEP, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..first.min(400)]).into_owned();
    assert!(head.contains("portico; hit"), "{head}");
    // The socket fills while the client pauses; the drain starts.
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let received = first + bytes_until_closed(&mut stream).await;
    stopping.await.unwrap();
    assert!(received > size, "cut after {received} of {size} bytes");
}

/// Sends a GET for `path` on `stream` and reads the response whole;
/// returns its status line.
async fn get_on(stream: &mut tokio::net::TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    exchange_on(stream, request.as_bytes()).await
}

/// Reads on `stream`, after what was `seen` already, until `count`
/// answers of 200 have come, each within [`STEP`].
async fn read_answers(stream: &mut tokio::net::TcpStream, mut seen: Vec<u8>, count: usize) {
    let mut buf = [0u8; 4096];
    while seen.windows(12).filter(|w| w == b"HTTP/1.1 200").count() < count {
        let n = tokio::time::timeout(STEP, stream.read(&mut buf))
            .await
            .expect("the answers within STEP")
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Writes `raw` on `stream` and reads one whole answer; returns its
/// status line, lowercased.
async fn exchange_on(stream: &mut tokio::net::TcpStream, raw: &[u8]) -> String {
    let head = whole_answer_on(stream, raw).await;
    head.lines().next().unwrap_or_default().to_owned()
}

/// A proxy with `idle_timeout` and `shutdown_grace`, and a keep-alive
/// connection to it that has served one request and then sat idle long
/// enough to be parked: the watchdog looks every 50 ms (a 200 ms head
/// timer), so parking comes by ~1.05 s.
async fn parked_connection(
    idle_timeout: Duration,
    grace: Duration,
) -> (
    portico::sample::RunningBackend,
    RunningProxy,
    tokio::net::TcpStream,
) {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.request_header_timeout = Duration::from_millis(200);
    config.server.idle_timeout = idle_timeout;
    config.server.shutdown_grace = grace;
    let proxy = start_proxy(config).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(get_on(&mut stream, "/health").await, "http/1.1 200 ok");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    (backend, proxy, stream)
}

/// A keep-alive connection idle for a second is parked (hyper's buffers
/// and task freed, the socket kept): its next request is served on the
/// same socket, it still counts as open, and `idle_timeout` still closes it.
#[tokio::test]
async fn a_parked_keep_alive_connection_serves_its_next_request_and_still_times_out() {
    let (backend, proxy, mut stream) =
        parked_connection(Duration::from_secs(3), Duration::from_secs(10)).await;
    assert_eq!(proxy.shared.metrics.connections_open.get(), 1);
    assert_eq!(get_on(&mut stream, "/health").await, "http/1.1 200 ok");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // Pipelined: both arrive at the parked socket at once.
    stream
        .write_all(
            b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    read_answers(&mut stream, Vec::new(), 2).await;
    assert_eq!(backend.requests(), 4);
    // Then idle_timeout closes it, parked or not.
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(3) + STEP / 2, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "parked connection outlived idle_timeout");
    tokio::time::timeout(STEP, async {
        while proxy.shared.metrics.connections_open.get() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the open-connections gauge back at 0");
}

/// A request with `Upgrade` that becomes no tunnel (`h2c`, which portico
/// does not pass on, as `curl --http2 http://` asks; a WebSocket upgrade
/// its backend answers without switching) leaves its connection as any
/// other: parked after a second, and its next request served. hyper
/// keeps such an upgrade armed and hands it the connection as the
/// connection ends; the socket went with it, closed without a word, and
/// a request sent then was lost (review38a F1).
#[tokio::test]
async fn a_connection_whose_upgrade_was_not_taken_is_parked_and_served_again() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    // The watchdog looks every 50 ms (see `parked_connection`).
    config.server.request_header_timeout = Duration::from_millis(200);
    let proxy = start_proxy(config).await;
    for upgrade in [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let first = format!("GET /health HTTP/1.1\r\nHost: a\r\n{upgrade}\r\n");
        assert_eq!(
            exchange_on(&mut stream, first.as_bytes()).await,
            "http/1.1 200 ok"
        );
        // Parked meanwhile (see `parked_connection`).
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(
            get_on(&mut stream, "/health").await,
            "http/1.1 200 ok",
            "{upgrade}"
        );
    }
    assert_eq!(backend.requests(), 4);
}

/// An empty line on a parked connection (RFC 9112 §2.2 lets a client
/// send one between requests) is neither a head nor activity: the
/// connection stays parked and serves the next request. It used to be
/// handed to hyper, which then waited for a head that never came, and the
/// connection was closed with a warning (review30c F1).
#[tokio::test]
async fn an_empty_line_on_a_parked_connection_leaves_it_parked() {
    let (backend, proxy, mut stream) =
        parked_connection(Duration::from_secs(30), Duration::from_secs(10)).await;
    stream.write_all(b"\r\n").await.unwrap();
    // Past the head timer (200 ms), the parking age and the second a
    // connection being parked is given to end.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stream.write_all(b"\r\n\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_on(&mut stream, "/health").await, "http/1.1 200 ok");
    assert_eq!(backend.requests(), 2);
    assert_eq!(proxy.shared.metrics.connections_open.get(), 1);
}

/// A parked connection woken by a request and the client's FIN together:
/// hyper reads both before the request's future first runs, and without
/// half-close ends the connection there. The request is counted (and
/// logged) as left, 499, as on a fresh connection; before, it left no
/// trace at all (review30e F1).
#[tokio::test]
async fn a_request_and_its_client_s_fin_on_a_parked_connection_is_counted() {
    let (_backend, proxy, mut stream) =
        parked_connection(Duration::from_secs(30), Duration::from_secs(10)).await;
    let left = || {
        let text = String::from_utf8(proxy.shared.proxy.load().metrics().encode()).unwrap();
        text.lines()
            .filter(|line| line.starts_with("portico_requests_total{code=\"499\""))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!(left(), 0);
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection ended within STEP");
    let counted = tokio::time::timeout(STEP, async {
        while left() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(
        counted.await.is_ok(),
        "the request counted as 499 within STEP"
    );
}

/// Bytes hyper has read but not parsed come back with the socket when a
/// connection is parked, and are served first. Here the start of the next
/// head came with the last one, and its end after the parking age (the
/// head timer, 2 s, runs from when the connection is served again).
#[tokio::test]
async fn the_start_of_a_pipelined_head_is_not_lost_to_parking() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    // The watchdog looks every 500 ms: parked by ~1 s.
    config.server.request_header_timeout = Duration::from_secs(2);
    let proxy = start_proxy(config).await;
    let (mut stream, first) = answered_ok(
        proxy.addr,
        b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /health HTTP/1.1\r\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    stream.write_all(b"Host: a\r\n\r\n").await.unwrap();
    read_answers(&mut stream, first, 2).await;
    assert_eq!(backend.requests(), 2);
}

/// An upload answered early leaves hyper reading its body: the connection
/// is not parked then, what comes of the body is not timed as a head, and
/// the rest of the body and the next request, sent well after the parking
/// age and the head timer, are taken and answered.
#[tokio::test]
async fn a_request_after_an_upload_answered_early_is_answered() {
    let (addr, _) = early_answer_backend().await;
    let mut config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    config.server.request_header_timeout = Duration::from_millis(200);
    let proxy = start_proxy(config).await;
    let upload = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345";
    let (mut stream, _) = answered_ok(proxy.addr, upload).await;
    stream.write_all(b"678").await.unwrap();
    // Past the parking age and the second hyper is given to end.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stream.write_all(b"90").await.unwrap();
    assert_eq!(get_on(&mut stream, "/next").await, "http/1.1 200 ok");
}

/// An upload read whole leaves nothing of it for hyper to read: the
/// connection is parked like any other, and what the client sends next,
/// pipelined after the parking age, is served.
#[tokio::test]
async fn a_connection_past_its_upload_is_parked_and_served_again() {
    let (backend, proxy) = proxy_with_short_head_timer().await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let upload = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(exchange_on(&mut stream, upload).await, "http/1.1 200 ok");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let pair = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi\
        GET /health HTTP/1.1\r\nHost: a\r\n\r\n";
    stream.write_all(pair).await.unwrap();
    read_answers(&mut stream, Vec::new(), 2).await;
    assert_eq!(backend.requests(), 3);
}

/// What a connection began as it stays: the HTTP/2 preface on a keep-alive
/// connection served as HTTP/1.1 is refused with an HTTP/1.1 400, as
/// nginx refuses it, parked in between or not.
#[tokio::test]
async fn a_parked_http1_connection_is_not_taken_up_as_http2() {
    let (_backend, _proxy, mut stream) =
        parked_connection(Duration::from_secs(60), Duration::from_secs(60)).await;
    // The preface and an empty SETTINGS frame.
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&preface).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "connection left open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("HTTP/2 preface"), "{answer}");
}

/// An answer that leaves the request's body unread (here a 413) says
/// `Connection: close`, as nginx's does, and the connection then ends:
/// hyper would drain a body it already holds, but not one still coming,
/// and a client told nothing could lose its next request to the close.
#[tokio::test]
async fn an_answer_that_leaves_the_body_unread_closes_the_connection() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.max_request_body = 100;
    let proxy = start_proxy(config).await;
    // An HTTP/1.0 client that asked for keep-alive is told `close` alone:
    // hyper added `keep-alive` beside it (review39b L1).
    for (version, asked) in [("HTTP/1.1", ""), ("HTTP/1.0", "Connection: keep-alive\r\n")] {
        for sent in [0, 101] {
            let head =
                format!("POST /echo {version}\r\nHost: a\r\n{asked}Content-Length: 101\r\n\r\n");
            let mut upload = head.into_bytes();
            upload.extend(std::iter::repeat_n(b'x', sent));
            let answer = raw_exchange(proxy.addr, &upload).await.to_ascii_lowercase();
            let status = format!("{} 413", version.to_ascii_lowercase());
            assert!(
                answer.starts_with(&status)
                    && answer.contains("connection: close")
                    && !answer.contains("keep-alive"),
                "{version}, {sent} body bytes sent: {answer:?}"
            );
        }
    }
    assert_eq!(backend.requests(), 0);
}

/// An empty line after a request (RFC 9112 §2.2) is no head in progress:
/// the connection waits for the next request as for any other, parked.
#[tokio::test]
async fn an_empty_line_after_a_request_leaves_the_connection_idle() {
    let (backend, proxy) = proxy_with_short_head_timer().await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n\r\n";
    assert_eq!(exchange_on(&mut stream, request).await, "http/1.1 200 ok");
    // Past the 200 ms head timer and the parking age.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(get_on(&mut stream, "/health").await, "http/1.1 200 ok");
    assert_eq!(backend.requests(), 2);
}

/// Empty lines are not activity: a client that sends nothing else, parked
/// in between or not, is closed by `idle_timeout` as if silent.
#[tokio::test]
async fn a_client_sending_only_empty_lines_is_closed_as_idle() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.idle_timeout = Duration::from_secs(3);
    let proxy = start_proxy(config).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(get_on(&mut stream, "/health").await, "http/1.1 200 ok");
    let closed = tokio::time::timeout(Duration::from_secs(3) + STEP, async {
        let mut buf = [0u8; 64];
        loop {
            if stream.write_all(b"\r\n").await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(400), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => panic!("answered an empty line"),
                Err(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "empty lines kept the connection open");
}

#[tokio::test]
async fn shutdown_closes_a_parked_connection_within_a_second() {
    let (_backend, proxy, mut stream) =
        parked_connection(Duration::from_secs(60), Duration::from_secs(60)).await;
    // Within STEP, far below the 60 s grace a waiting drain would take.
    proxy.stop().await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(STEP, stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "parked connection left open"
    );
}

/// A request a keep-alive client sends just after shutdown began, on a
/// connection that was idle then, is answered (with `Connection: close`)
/// rather than lost with the connection: HTTP/1 gives the client no way to
/// know the connection was closing. Parked or not, and over HTTP/1.0.
#[tokio::test]
async fn a_request_on_an_idle_connection_as_shutdown_begins_is_answered() {
    // An HTTP/1.0 client that asked for keep-alive too: told `close`,
    // alone, in an HTTP/1.0 head.
    let keep_alive_1_0 = b"GET /health HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n";
    for (parked, http10) in [(false, false), (true, false), (false, true)] {
        let backend = start_backend(BackendOptions::new("b1")).await;
        let mut config = config_for(&[&backend]);
        config.server.request_header_timeout = Duration::from_millis(200);
        config.server.shutdown_grace = Duration::from_secs(60);
        let proxy = start_proxy(config).await;
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let first = match http10 {
            true => exchange_on(&mut stream, keep_alive_1_0).await,
            false => get_on(&mut stream, "/health").await,
        };
        assert!(first.ends_with(" 200 ok"), "{first}");
        if parked {
            tokio::time::sleep(Duration::from_millis(1600)).await;
        }
        let stopping = tokio::spawn(proxy.stop());
        // Shutdown is under way (listeners closed) when the request leaves.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ask: &[u8] = match http10 {
            true => keep_alive_1_0,
            false => b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n",
        };
        stream.write_all(ask).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(STEP, stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "connection left open (parked: {parked})");
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        let status = if http10 {
            "http/1.0 200 ok"
        } else {
            "http/1.1 200 ok"
        };
        assert!(
            answer.starts_with(status)
                && answer.contains("connection: close")
                && !answer.contains("keep-alive"),
            "parked: {parked}, HTTP/1.0: {http10}: {answer:?}"
        );
        tokio::time::timeout(STEP, stopping)
            .await
            .expect("drained within STEP")
            .unwrap();
    }
}

/// Waits (bounded by STEP) until `proxy` counts `n` client connections.
async fn connections_open(proxy: &RunningProxy, n: i64) {
    let open = proxy.shared.metrics.connections_open.clone();
    tokio::time::timeout(STEP, async {
        while open.get() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the connections accepted");
}

/// A proxy capped at two client connections (with `header_timeout` as
/// `request_header_timeout`, if given), and two connections to it that
/// have each been answered once.
async fn two_of_two(
    header_timeout: Option<Duration>,
) -> (
    portico::sample::RunningBackend,
    RunningProxy,
    tokio::net::TcpStream,
    tokio::net::TcpStream,
) {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.max_connections = Some(2);
    if let Some(timeout) = header_timeout {
        config.server.request_header_timeout = timeout;
    }
    let proxy = start_proxy(config).await;
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(get_on(&mut first, "/health").await, "http/1.1 200 ok");
    assert_eq!(get_on(&mut second, "/health").await, "http/1.1 200 ok");
    (backend, proxy, first, second)
}

/// At `max_connections` client connections a listener stops accepting:
/// the next connection waits in the kernel's backlog, unanswered, until
/// one closes, and is then served (HAProxy's `maxconn`).
#[tokio::test]
async fn past_max_connections_new_connections_wait_until_one_closes() {
    let (_backend, proxy, first, _second) = two_of_two(None).await;
    // Connected (the kernel's backlog takes it), not accepted.
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(300), read_head(&mut third)).await;
    assert!(waiting.is_err(), "answered past the cap: {waiting:?}");
    assert_eq!(proxy.shared.metrics.connections_open.get(), 2);
    drop(first);
    let head = tokio::time::timeout(STEP, read_head(&mut third))
        .await
        .expect("served once a connection closed")
        .expect("an answer");
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
}

/// At the cap, an idle keep-alive connection (parked) is closed to make
/// room, as nginx reuses one when it runs short of connections: idle ones
/// held every place until `idle_timeout` (review33c L1).
#[tokio::test]
async fn past_max_connections_an_idle_connection_makes_room() {
    // Parked a second on, give or take a quarter of this.
    let (_backend, proxy, mut first, mut second) = two_of_two(Some(Duration::from_secs(1))).await;
    // Served once one of them is parked and closed for it.
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(get_on(&mut third, "/health").await, "http/1.1 200 ok");
    // One of the two idle ones was closed; the other still serves.
    let (mut a, mut b) = ([0u8; 1], [0u8; 1]);
    let closed = tokio::time::timeout(STEP, async {
        tokio::select! {
            read = first.read(&mut a) => (read.ok(), &mut second),
            read = second.read(&mut b) => (read.ok(), &mut first),
        }
    })
    .await
    .expect("an idle connection closed");
    let (read, other) = closed;
    assert_eq!(read, Some(0));
    assert_eq!(get_on(other, "/health").await, "http/1.1 200 ok");
}

/// At the cap, a connection that has sent nothing yet (a browser's
/// preconnect) makes room as an idle one does, as nginx counts it among
/// its reusable connections: it held its place until
/// `request_header_timeout` (16 s here, past `STEP`), and the next client
/// waited. (The watchdog looks every 4 s here: idle on its first look.)
#[tokio::test]
async fn past_max_connections_a_connection_that_sent_nothing_makes_room() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.server.max_connections = Some(2);
    config.server.request_header_timeout = Duration::from_secs(16);
    let proxy = start_proxy(config).await;
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The second one has begun its head: it is not idle, and stays.
    second.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let answer = tokio::time::timeout(STEP, get_on(&mut third, "/health")).await;
    assert_eq!(answer.expect("served within STEP"), "http/1.1 200 ok");
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(STEP, first.read(&mut byte)).await;
    assert_eq!(closed.expect("the silent one closed").ok(), Some(0));
    second.write_all(b"Host: a\r\n\r\n").await.unwrap();
    let head = tokio::time::timeout(STEP, read_head(&mut second)).await;
    let head = head.expect("the begun one answered").expect("an answer");
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
}

/// A first request that arrives in time is answered even when the head
/// deadline of its connection, idle until then, passes while it is served
/// (review35e M1: closed at the deadline with no answer).
#[tokio::test]
async fn a_first_request_arriving_just_before_the_head_deadline_is_answered() {
    let mut opts = BackendOptions::new("slow");
    opts.delay = Duration::from_secs(1);
    let backend = start_backend(opts).await;
    let mut config = config_for(&[&backend]);
    config.server.max_connections = Some(10);
    config.server.request_header_timeout = Duration::from_secs(3);
    let proxy = start_proxy(config).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2700)).await;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(STEP, read_head(&mut stream)).await;
    let head = head.expect("within STEP").expect("an answer, not a close");
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
}

/// At the cap, an HTTP/2 connection without a stream makes room as an
/// idle HTTP/1.1 one does, closed with a GOAWAY: idle ones held every
/// place until `idle_timeout` (review33e F3). One with a stream in flight
/// is left to finish it.
#[tokio::test]
async fn past_max_connections_an_idle_http2_connection_makes_room() {
    let mut opts = BackendOptions::new("slow");
    opts.delay = Duration::from_secs(3);
    let slow = start_backend(opts).await;
    let mut config = config_for(&[&slow]);
    config.server.max_connections = Some(2);
    // The watchdog looks every 250 ms: idle a second on, give or take.
    config.server.request_header_timeout = Duration::from_secs(1);
    let proxy = start_proxy(config).await;
    // Answered once, and kept: a client with its sender alive.
    let (mut sender, idle) = h2c_connection(proxy.addr).await;
    let request = http::Request::get(format!("http://{}/health", proxy.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The other place: an HTTP/2 connection busy for 3 s from now.
    let busy = tokio::spawn(one_request_on_own_connection(proxy.addr, "/health", true));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(proxy.shared.metrics.connections_open.get(), 2);
    let addr = proxy.addr;
    let third = tokio::spawn(async move {
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        get_on(&mut third, "/health").await
    });
    // The idle one is closed for it while the busy one goes on.
    let closed = tokio::time::timeout(STEP, idle).await;
    assert!(closed.expect("the idle connection closed").is_ok());
    assert!(!busy.is_finished(), "closed only once the busy one ended");
    let (status, _) = busy.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let served = tokio::time::timeout(STEP, third).await;
    assert_eq!(
        served.expect("served within STEP").unwrap(),
        "http/1.1 200 ok"
    );
    drop(sender);
}

/// An HTTP/2 connection closed at the cap may owe a response's end the
/// client has not opened its window for (h2 holds it once the body has
/// been handed over): it is delivered when the client reads, not cut a
/// second after the GOAWAY (review34f M1).
#[tokio::test]
async fn an_http2_connection_closed_at_the_cap_delivers_what_it_owes() {
    use http_body_util::BodyExt;
    const BODY: usize = 65536;
    let addr = serve_each(move |mut stream| async move {
        while read_head(&mut stream).await.is_some() {
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n").into_bytes();
            answer.resize(answer.len() + BODY, b'z');
            if stream.write_all(&answer).await.is_err() {
                return;
            }
        }
    })
    .await;
    let listen = vec!["127.0.0.1:0".parse().unwrap()];
    let mut config = portico::config::Config::single_upstream(listen, vec![addr]);
    config.server.max_connections = Some(1);
    config.server.request_header_timeout = Duration::from_secs(1);
    let proxy = start_proxy(config).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65535)
            .initial_connection_window_size(65535)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(format!("http://{}/big", proxy.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    // Its last byte waits on the window; nothing read for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let addr = proxy.addr;
    let knocking = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        get_on(&mut stream, "/other").await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .expect("the body within STEP")
        .expect("the body whole");
    assert_eq!(body.to_bytes().len(), BODY);
    let served = tokio::time::timeout(STEP, knocking).await;
    assert_eq!(
        served.expect("served within STEP").unwrap(),
        "http/1.1 200 ok"
    );
}

/// An answer given before the request's body was read (a 413 by its
/// Content-Length) reaches a client that goes on sending that body: the
/// connection is closed only once the client stops, as nginx's lingering
/// close does. Closed at once, the unread bytes made the kernel reset it,
/// and the client lost the answer it had not read yet (review34a F4).
#[tokio::test]
async fn an_early_answer_reaches_a_client_still_sending_its_body() {
    use tokio::io::AsyncWriteExt;
    const SENT: usize = 24 << 20;
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    for _ in 0..5 {
        let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (mut reading, mut writing) = stream.into_split();
        let head =
            format!("POST /users/1/orders HTTP/1.1\r\nHost: a\r\nContent-Length: {SENT}\r\n\r\n");
        // Sends it all before it reads, as a client without Expect does.
        let sent = tokio::time::timeout(STEP, async move {
            writing.write_all(head.as_bytes()).await?;
            writing.write_all(&vec![b'x'; SENT]).await?;
            Ok::<_, std::io::Error>(writing)
        })
        .await
        .expect("the upload was read and dropped within STEP");
        assert!(sent.is_ok(), "the connection was reset under the upload");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(STEP, reading.read_to_end(&mut answer)).await;
        assert!(read.expect("closed within STEP").is_ok());
        assert!(answer.starts_with(b"HTTP/1.1 413"), "{answer:?}");
    }
}

/// A request asking to upgrade counts once among the open connections
/// while its backend has not switched yet: it held a second place from
/// the start, so pending WebSocket handshakes filled `max_connections`
/// twice as fast (review33d F4).
#[tokio::test]
async fn a_pending_upgrade_counts_once() {
    let addr = silent_backend().await;
    let config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    let proxy = start_proxy(config).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    // The request is at the backend, which says nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.shared.metrics.connections_open.get(), 1);
}

/// The cap holds while idle connections make room: each client knocking
/// gets in only once an idle connection has closed for it. Taking the
/// place first let a burst in on one idle connection's account many times
/// over (49 open at a cap of 4, review33e F1).
#[tokio::test]
async fn idle_connections_make_room_without_passing_the_cap() {
    let (_backend, proxy, _first, _second) = two_of_two(Some(Duration::from_secs(1))).await;
    let shared = proxy.shared.clone();
    let watching = tokio::spawn(async move {
        let mut most = 0;
        loop {
            most = most.max(shared.metrics.connections_open.get());
            tokio::time::sleep(Duration::from_millis(5)).await;
            if most > 2 {
                return most;
            }
        }
    });
    // Four more clients at once, each keeping its connection when served.
    let knocking: Vec<_> = (0..4)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                assert_eq!(get_on(&mut stream, "/health").await, "http/1.1 200 ok");
                stream
            })
        })
        .collect();
    let mut kept = Vec::new();
    for client in knocking {
        kept.push(client.await.unwrap());
    }
    assert!(!watching.is_finished(), "{:?}", watching.await);
    watching.abort();
    assert!(proxy.shared.metrics.connections_open.get() <= 2);
}

/// A request that reached a parked connection as a client knocked at the
/// cap is answered: the client's place comes from another idle one. The
/// parked connection's wake was a coin toss between its request and the
/// reclaim, and the request was dropped unread (review33f F1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_parked_connection_is_not_lost_to_a_client_at_the_cap() {
    let (_backend, proxy, first, second) = two_of_two(Some(Duration::from_secs(1))).await;
    let mut pair = [first, second];
    for round in 0..3 {
        // Both parked.
        tokio::time::sleep(Duration::from_millis(1700)).await;
        let ask = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n";
        pair[0].write_all(ask).await.unwrap();
        let mut knocking = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        knocking.write_all(ask).await.unwrap();
        for (who, stream) in [("parked", &mut pair[0]), ("knocking", &mut knocking)] {
            let head = tokio::time::timeout(STEP, read_head(stream))
                .await
                .unwrap_or_else(|_| panic!("round {round}: {who} not answered within STEP"))
                .unwrap_or_else(|| panic!("round {round}: {who} closed unanswered"));
            assert!(head.starts_with(b"HTTP/1.1 200"), "round {round}: {who}");
        }
        // The other idle one made room.
        assert_eq!(bytes_until_closed(&mut pair[1]).await, 0, "round {round}");
        pair[1] = knocking;
    }
}
