//! The backend connection pool over real sockets: keep-alive reuse, a
//! connection the backend closed between requests, and idle expiry. The
//! backend here is a few lines of raw HTTP/1.1 so the test can count its
//! connections and choose when to close them.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use portico::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the raw backend has seen.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    requests: AtomicUsize,
}

/// A backend answering `200 ok` to each request. With `close_after`, it
/// closes the connection after each response without announcing it, as a
/// backend with a short keep-alive timeout does.
async fn raw_backend(close_after: bool) -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let seen = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            seen.accepted.fetch_add(1, Ordering::SeqCst);
            seen.open.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request: the head, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break Some(i + 4);
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break None,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let Some(head_end) = head_end else { break };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..(head_end + length).min(buf.len()));
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    let answer = if head.starts_with("get /big ") {
                        // The start of a body that does not end: the rest
                        // never comes, until the proxy closes the
                        // connection. (4 MB sent whole fitted in the
                        // sockets' buffers at times, so the proxy read it
                        // to its end and rightly kept the connection.)
                        let mut big =
                            b"HTTP/1.1 200 OK\r\ncontent-length: 4000000\r\n\r\n".to_vec();
                        big.resize(big.len() + 1000, b'x');
                        if stream.write_all(&big).await.is_ok() {
                            while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
                        }
                        break;
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
                    };
                    if stream.write_all(&answer).await.is_err() || close_after {
                        break;
                    }
                }
                seen.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

fn config(backend: SocketAddr, idle_timeout: Duration) -> Config {
    let mut config = Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![backend]);
    config.upstreams[0].idle_timeout = idle_timeout;
    config
}

fn post(url: String) -> Request<Full<Bytes>> {
    Request::post(url)
        .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
        .unwrap()
}

/// A backend that answers an upload early and then neither reads the rest
/// nor closes (RFC 9112 §9.3 asks one or the other) has its connection
/// closed after `body_timeout`: it was held, with the upload queued, until
/// the backend closed it, ten minutes in review34a F3.
#[tokio::test]
async fn an_upload_answered_early_and_left_unread_is_let_go() {
    const UPLOAD: usize = 32 << 20;
    let (received, got) = tokio::sync::oneshot::channel();
    let received = std::sync::Mutex::new(Some(received));
    let addr = serve_each(move |mut stream| {
        let received = received.lock().unwrap().take();
        async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            let _ = stream.write_all(answer).await;
            // Reads nothing for longer than body_timeout, then all it can.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut read = 0;
            let mut buf = vec![0u8; 1 << 16];
            let reset = loop {
                match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => read += n,
                    Ok(Err(e)) => break e.kind() == std::io::ErrorKind::ConnectionReset,
                    _ => break false,
                }
            };
            if let Some(received) = received {
                let _ = received.send((read, reset));
            }
        }
    })
    .await;
    let mut config = config(addr, Duration::from_secs(60));
    config.upstreams[0].body_timeout = Duration::from_secs(1);
    config.server.max_request_body = UPLOAD as u64;
    let proxy = start_proxy(config).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {UPLOAD}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    let (mut reading, mut writing) = client.into_split();
    let uploading = tokio::spawn(async move {
        let _ = writing.write_all(&vec![b'x'; UPLOAD]).await;
        writing
    });
    let mut status = [0u8; 12];
    let answer = tokio::time::timeout(STEP, reading.read_exact(&mut status)).await;
    assert!(answer.expect("an answer").is_ok());
    assert_eq!(&status, b"HTTP/1.1 200");
    // The connection was closed before the backend read on: it got what
    // the sockets held, not the whole upload.
    let (read, reset) = tokio::time::timeout(STEP * 2, got).await.unwrap().unwrap();
    assert!(read < UPLOAD / 2, "the upload reached the backend: {read}");
    // Reset, not closed with the upload's megabytes queued to a backend
    // that reads nothing (review34g L1: an orphan in FIN-WAIT-1).
    assert!(reset, "closed without a reset");
    uploading.abort();
}

/// portico in front of a backend that answers each request's head with
/// `answer` and then neither reads the rest nor closes, its
/// `body_timeout` longer than the tests wait.
async fn answering_then_silent(answer: &'static [u8]) -> Config {
    let addr = serve_each(move |mut stream| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let _ = stream.write_all(answer).await;
        tokio::time::sleep(STEP * 3).await;
    })
    .await;
    let mut config = config(addr, Duration::from_secs(60));
    config.upstreams[0].body_timeout = STEP * 3;
    config
}

/// An HTTP/2 upload answered whole before its end is stopped with
/// `RST_STREAM(NO_ERROR)` (RFC 9113 §8.1): the client has
/// its answer and sends no more. Without it a backend that read nothing
/// more held the stream's window shut until `body_timeout`, and curl over
/// HTTP/2 never finished (review34g L1).
#[tokio::test]
async fn an_http2_upload_answered_before_its_end_is_stopped_without_error() {
    let config =
        answering_then_silent(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope").await;
    let proxy = start_proxy(config).await;
    let mut client = h2_frames_client(proxy.addr).await;
    let request = Request::post(proxy.url("/up")).body(()).unwrap();
    let (response, mut upload) = client.send_request(request, false).unwrap();
    // Sent as curl sends, as fast as the windows let it, until the stream
    // is stopped: the backend's socket fills, and the backend is seen to
    // take nothing more.
    let (stopped, mut reset) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; 64 << 10]);
        loop {
            upload.reserve_capacity(chunk.len());
            match std::future::poll_fn(|cx| upload.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => {
                    if upload.send_data(chunk.slice(..n), false).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        let reason = std::future::poll_fn(|cx| upload.poll_reset(cx)).await;
        let _ = stopped.send(reason.ok());
    });
    let response = tokio::time::timeout(STEP, response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(data) = tokio::time::timeout(STEP, body.data()).await.unwrap() {
        got.extend_from_slice(&data.unwrap());
    }
    assert_eq!(got, b"nope");
    // Let go 10 s after the answer (body_timeout is 30 s here).
    let stopped = tokio::time::timeout(STEP * 2, &mut reset).await;
    let reason = stopped.expect("the upload was never stopped").unwrap();
    assert_eq!(reason, Some(h2::Reason::NO_ERROR));
}

/// An HTTP/1.1 client that writes its whole upload before it reads (as
/// most SDKs do) gets an answer given in full from the head as soon as the
/// backend stops taking the rest: it waited `body_timeout` (30 s by
/// default) while the backend neither read nor closed (review35d 3).
#[tokio::test]
async fn an_http1_upload_answered_in_full_is_let_go_once_the_backend_stops_reading() {
    const UPLOAD: usize = 32 << 20;
    let mut config =
        answering_then_silent(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 4\r\n\r\nnope")
            .await;
    config.server.max_request_body = UPLOAD as u64;
    let proxy = start_proxy(config).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {UPLOAD}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    // The whole upload first: until the backend is let go nothing reads it.
    let body = vec![b'x'; UPLOAD];
    // Let go 10 s after the answer (body_timeout is 30 s here).
    let written = tokio::time::timeout(STEP * 2, client.write_all(&body)).await;
    assert!(written.is_ok(), "the upload was held until body_timeout");
    let mut status = [0u8; 12];
    let answer = tokio::time::timeout(STEP, client.read_exact(&mut status)).await;
    assert!(answer.expect("an answer within STEP").is_ok());
    assert_eq!(&status, b"HTTP/1.1 413");
}

/// A backend that answers an HTTP/2 upload at once and then reads all of
/// it gets all of it: the stream is not cut at the answer's end
/// (review35d 1: it reached the backend truncated, the client told
/// NO_ERROR).
#[tokio::test]
async fn an_http2_upload_answered_early_still_reaches_a_backend_reading_it() {
    const UPLOAD: usize = 8 << 20;
    let (received, got) = tokio::sync::oneshot::channel();
    let received = std::sync::Mutex::new(Some(received));
    let addr = serve_each(move |mut stream| {
        let received = received.lock().unwrap().take();
        async move {
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            let answer = b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\nok";
            let _ = stream.write_all(answer).await;
            // All of it (with its length, or chunked: no fewer bytes),
            // from what came with the head on.
            let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut seen = head.len() - end;
            let mut buf = vec![0u8; 1 << 16];
            while seen < UPLOAD {
                match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => seen += n,
                    _ => break,
                }
            }
            if let Some(received) = received {
                let _ = received.send(seen);
            }
        }
    })
    .await;
    let mut config = config(addr, Duration::from_secs(60));
    config.server.max_request_body = UPLOAD as u64;
    let proxy = start_proxy(config).await;
    let (mut sender, _connection) = h2c_connection(proxy.addr).await;
    let request = Request::post(proxy.url("/up"))
        .body(Full::new(Bytes::from(vec![b'x'; UPLOAD])))
        .unwrap();
    let response = tokio::time::timeout(STEP, sender.send_request(request)).await;
    assert_eq!(response.unwrap().unwrap().status(), StatusCode::ACCEPTED);
    let seen = tokio::time::timeout(STEP * 2, got).await.unwrap().unwrap();
    assert!(seen >= UPLOAD, "the backend got {seen} bytes, not all");
}

/// A backend that answers an upload early and streams its answer before
/// it reads the rest (RFC 9112 §9.3 allows it) is no stalled one: the
/// answer still moving, the connection stays, and the response is whole
/// (review34f M2: cut after body_timeout).
#[tokio::test]
async fn an_early_answer_still_streaming_is_not_cut_for_the_unread_upload() {
    const UPLOAD: usize = 32 << 20;
    const BODY: usize = 64 << 10;
    let addr = serve_each(move |mut stream| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
        let _ = stream.write_all(head.as_bytes()).await;
        for _ in 0..BODY >> 10 {
            if stream.write_all(&[b'y'; 1 << 10]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let mut buf = vec![0u8; 1 << 16];
        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    let mut config = config(addr, Duration::from_secs(60));
    config.upstreams[0].body_timeout = Duration::from_secs(1);
    config.server.max_request_body = UPLOAD as u64;
    let proxy = start_proxy(config).await;
    let client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reading, mut writing) = client.into_split();
    let head = format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {UPLOAD}\r\n\r\n");
    writing.write_all(head.as_bytes()).await.unwrap();
    let uploading = tokio::spawn(async move {
        let _ = writing.write_all(&vec![b'x'; UPLOAD]).await;
        writing
    });
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let whole = |answer: &[u8]| {
        let head = answer.windows(4).position(|w| w == b"\r\n\r\n");
        head.is_some_and(|at| answer.len() - (at + 4) >= BODY)
    };
    while !whole(&answer) {
        match tokio::time::timeout(STEP, reading.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!("cut after {} bytes: {other:?}", answer.len()),
        }
    }
    uploading.abort();
}

#[tokio::test]
async fn sequential_requests_share_one_backend_connection() {
    let (addr, counts) = raw_backend(false).await;
    let proxy = start_proxy(config(addr, Duration::from_secs(60))).await;
    let client = client();
    for i in 0..20 {
        let answer = if i % 2 == 0 {
            get(&client, &proxy.url("/")).await
        } else {
            send(&client, post(proxy.url("/"))).await
        };
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "ok");
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 20);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
}

/// A reload that retunes the upstream without touching how its backends
/// are reached (a weight here) keeps the pooled connections: each such
/// reload closed them all, a TLS handshake apiece on a `tls` upstream
/// (review35a).
#[tokio::test]
async fn a_reload_that_changes_a_weight_keeps_the_pooled_connections() {
    let (addr, counts) = raw_backend(false).await;
    let mut config = config(addr, Duration::from_secs(60));
    let proxy = start_proxy(config.clone()).await;
    let client = client();
    assert_eq!(get(&client, &proxy.url("/")).await.status, StatusCode::OK);
    config.upstreams[0].backends[0].weight = 2;
    let previous = proxy.shared.proxy.load_full();
    let next = portico::proxy::Proxy::rebuild(&config, proxy.shared.metrics.clone(), &previous);
    proxy.shared.proxy.store(Arc::new(next));
    assert_eq!(proxy.backend_status()[0].weight, 2);
    assert_eq!(get(&client, &proxy.url("/")).await.status, StatusCode::OK);
    assert_eq!(counts.requests.load(Ordering::SeqCst), 2);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_replaced_even_for_post() {
    let (addr, counts) = raw_backend(true).await;
    let proxy = start_proxy(config(addr, Duration::from_secs(60))).await;
    let client = client();
    for _ in 0..5 {
        let answer = send(&client, post(proxy.url("/"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        // Give the close time to arrive, as between two real requests.
        wait_until(|| counts.open.load(Ordering::SeqCst) == 0).await;
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 5);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn idle_backend_connections_are_closed_after_idle_timeout() {
    let (addr, counts) = raw_backend(false).await;
    let proxy = start_proxy(config(addr, Duration::from_millis(200))).await;
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
    // Closed by portico, not by the backend or the test.
    wait_until(|| counts.open.load(Ordering::SeqCst) == 0).await;
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_response_the_client_abandoned_closes_its_backend_connection() {
    let (addr, counts) = raw_backend(false).await;
    let proxy = start_proxy(config(addr, Duration::from_secs(60))).await;
    let client = client();
    let response = tokio::time::timeout(
        STEP,
        client.request(
            Request::get(proxy.url("/big"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Read the head only; the rest of the body is still on its way.
    drop(response);
    drop(client);
    // The half-read connection must not be handed to the next request: its
    // unread body would be taken for that request's answer.
    wait_until(|| counts.open.load(Ordering::SeqCst) == 0).await;
    let answer = get(&common::client(), &proxy.url("/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "ok");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
}

/// Polls `done` until it holds, failing after [`STEP`].
async fn wait_until(done: impl Fn() -> bool) {
    tokio::time::timeout(STEP, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition within STEP");
}

#[tokio::test]
async fn a_retry_after_a_stale_pooled_connection_takes_a_fresh_one() {
    // Each connection answers its first request; a later one is read and
    // the connection closed unanswered, as a backend whose keep-alive
    // timeout fires just as a request arrives on it. Two such connections
    // wait in the pool: a GET failing on one must not be retried on the
    // other.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let both_open = Arc::new(tokio::sync::Barrier::new(2));
    tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let nth = accepted.fetch_add(1, Ordering::SeqCst);
                let both_open = both_open.clone();
                tokio::spawn(async move {
                    if read_head(&mut stream).await.is_none() {
                        return;
                    }
                    if nth < 2 {
                        // The first two requests overlap, so the proxy
                        // opens (and then pools) two connections.
                        both_open.wait().await;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                    let _ = read_head(&mut stream).await;
                });
            }
        }
    });
    let proxy = start_proxy(config(addr, Duration::from_secs(60))).await;
    let first: Vec<_> = (0..2)
        .map(|_| {
            let url = proxy.url("/");
            tokio::spawn(async move { get(&client(), &url).await.status })
        })
        .collect();
    for answer in first {
        assert_eq!(answer.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// A backend each of whose connections answers its first request and
/// ends on the next, unanswered, `after` it came (at once: a keep-alive
/// ending as a request arrives), and portico in front of it with
/// `retries = 0`; with the backend's count of accepted connections.
async fn answering_once_a_connection(after: Duration) -> (RunningProxy, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if read_head(&mut stream).await.is_none() {
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_ok() && read_head(&mut stream).await.is_some()
                    {
                        tokio::time::sleep(after).await;
                    }
                });
            }
        }
    });
    let mut config = config(addr, Duration::from_secs(60));
    config.upstreams[0].retries = 0;
    (start_proxy(config).await, accepted)
}

/// With `retries = 0` too, a GET sent on a pooled connection the backend
/// closes as it arrives goes again on a new connection, once, as nginx
/// does not count a cached connection's failure among its tries; a POST,
/// which may have reached the backend, is never sent again.
#[tokio::test]
async fn a_pooled_connection_closed_under_a_get_is_not_a_502_without_retries() {
    let (proxy, accepted) = answering_once_a_connection(Duration::ZERO).await;
    let client = client();
    for (n, path) in [(1, "/a"), (2, "/b"), (3, "/c")] {
        let answer = get(&client, &proxy.url(path)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {:?}", answer.body);
        // The second and third each found the last one's connection
        // pooled and closed under them: sent again on a new one.
        assert_eq!(accepted.load(Ordering::SeqCst), n, "{path}");
    }
    // Not the backend's failure: no 502 of its own; counted as the
    // retries they are (review37f L5, 37g L9).
    let metrics = String::from_utf8(proxy.shared.proxy.load().metrics().encode()).unwrap();
    let series = |name: &str| -> Vec<&str> {
        metrics
            .lines()
            .filter(|line| line.starts_with(name))
            .collect()
    };
    let upstream_502 = series("portico_upstream_requests_total{");
    assert!(
        !upstream_502
            .iter()
            .any(|line| counted_series(line, "code=\"502\"")),
        "{upstream_502:?}"
    );
    assert_eq!(
        series("portico_upstream_retries_total{"),
        ["portico_upstream_retries_total{upstream=\"default\"} 2"]
    );
    let answer = send(&client, post(proxy.url("/d"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// Only a quick end is the keep-alive race: a backend that dies while
/// working on a request on a pooled connection is not sent it again
/// with `retries = 0` (review37e M2).
#[tokio::test]
async fn a_pooled_connection_that_ends_late_is_not_the_keep_alive_race() {
    let (proxy, accepted) = answering_once_a_connection(Duration::from_millis(1200)).await;
    let client = client();
    assert_eq!(get(&client, &proxy.url("/a")).await.status, StatusCode::OK);
    let answer = get(&client, &proxy.url("/b")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_backend_connection_still_sending_an_upload_does_not_hold_up_other_requests() {
    let (addr, accepted) = early_answer_backend().await;
    let proxy = start_proxy(config(addr, Duration::from_secs(60))).await;
    let upload = b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n12345";
    let (mut uploader, _) = answered_ok(proxy.addr, upload).await;
    // Past the pool's parking age, with a reaper pass or two: the backend
    // connection under the upload must stay where a checkout passes it by.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The upload is finished only after this request is answered: a GET
    // that waited for that connection would never be.
    let answer = tokio::time::timeout(STEP, get(&client(), &proxy.url("/next")))
        .await
        .expect("a GET held up by another client's upload");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    uploader.write_all(b"67890").await.unwrap();
}

/// A backend that answers before it has read the upload and reads the rest
/// afterwards, as it should, takes the rest for the next request when it
/// does not: either way the connection is not one to hand another client
/// (review29c F5). The upload still goes on to its end.
#[tokio::test]
async fn a_connection_answered_before_its_upload_ended_is_not_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(tokio::sync::Notify::new());
    serve_early_answers_telling(listener, accepted.clone(), drained.clone());
    let proxy = start_proxy(config(addr, Duration::from_secs(60))).await;
    let upload = b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n12345";
    let (mut uploader, _) = answered_ok(proxy.addr, upload).await;
    uploader.write_all(b"67890").await.unwrap();
    tokio::time::timeout(STEP, drained.notified())
        .await
        .expect("the upload reaches the backend whole");
    // Time for the old connection to be ready again, were it pooled.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = get(&client(), &proxy.url("/next")).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A backend that answers every request with `100 Continue` heads without
/// end gets its request a 502 at once, not at `response_timeout`. hyper skips 1xx heads in a loop; the flood
/// kept the thread parsing them, the timeout came late or never and other
/// traffic starved (review30a F3).
#[tokio::test]
async fn a_backend_flooding_interim_responses_is_given_up_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flood = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if stream.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                let heads = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(2000);
                while stream.write_all(&heads).await.is_ok() {}
            });
        }
    });
    let mut config = config(flood, Duration::from_secs(60));
    config.upstreams[0].response_timeout = Duration::from_secs(60);
    config.upstreams[0].retries = 0;
    let proxy = start_proxy(config).await;
    // Well before response_timeout, or never.
    let answer = tokio::time::timeout(STEP, get(&client(), &proxy.url("/")))
        .await
        .expect("an answer well before response_timeout");
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
}

/// A backend that refuses an upload from its head alone and closes without
/// reading the body (its kernel then resets the connection) gets its
/// refusal to the client, as a direct client and HAProxy get it. portico's
/// next body write met the reset and hyper reported that instead of the
/// head it had been sent: a third of such uploads were 502s counted
/// against a healthy backend (review32f F1).
#[tokio::test]
async fn an_upload_refused_before_it_was_read_gets_the_refusal() {
    let addr = serve_each(|mut stream| async move {
        if read_head(&mut stream).await.is_some() {
            let refusal = b"HTTP/1.1 415 Unsupported Media Type\r\n\
                            content-length: 5\r\nconnection: close\r\n\r\nnope\n";
            let _ = stream.write_all(refusal).await;
        }
        // Dropped with the upload unread: a reset, not a FIN.
    })
    .await;
    let proxy = start_proxy(config(addr, Duration::from_secs(60))).await;
    let client = client();
    let body = Bytes::from(vec![b'x'; 1 << 20]);
    for n in 0..20 {
        let request = Request::post(proxy.url("/users/1/orders"))
            .header("content-type", "text/plain")
            .body(Full::new(body.clone()))
            .unwrap();
        let answer = tokio::time::timeout(STEP, send(&client, request))
            .await
            .expect("an answer within STEP");
        assert_eq!(
            answer.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "upload {n}: {:?}",
            answer.body
        );
        assert_eq!(answer.body, &b"nope\n"[..]);
    }
}

/// `body_timeout` counts silence, not frames: a chunked body whose last
/// chunk's trailers trickle in (bytes every 200 ms, no frame for 2 s) is
/// relayed whole under a 500 ms `body_timeout`, where it was cut as
/// `backend_stalled` (netfuzz49 L2); a body that falls silent is still cut.
#[tokio::test]
async fn a_body_whose_trailers_trickle_in_is_not_cut_as_stalled() {
    let addr = serve_each(|mut stream| async move {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n";
        if stream.write_all(start).await.is_err() {
            return;
        }
        if head.starts_with(b"GET /silent ") {
            tokio::time::sleep(STEP).await;
            return;
        }
        for piece in b"0\r\nx-t: abcdefghijklmnopq\r\n\r\n".chunks(2) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if stream.write_all(piece).await.is_err() {
                return;
            }
        }
    })
    .await;
    let mut config = config(addr, Duration::from_secs(60));
    config.upstreams[0].body_timeout = Duration::from_millis(500);
    let proxy = start_proxy(config).await;
    let fetch = |path: &'static str| async move {
        let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let ask = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        client.write_all(ask.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = client.read_to_end(&mut answer);
        tokio::time::timeout(STEP, read).await.unwrap().unwrap();
        String::from_utf8(answer).unwrap()
    };
    let trickled = fetch("/trickle").await;
    assert!(trickled.ends_with("\r\n2\r\nhi\r\n0\r\n\r\n"), "{trickled}");
    let silent = fetch("/silent").await;
    assert!(silent.ends_with("\r\n2\r\nhi\r\n"), "{silent}");
}
