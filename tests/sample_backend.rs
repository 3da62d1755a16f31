//! The sample order backend over real sockets, as tests and demos use it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use portico::sample::model::OrderStatus;
use portico::sample::BackendOptions;

const ORDER_BACKEND: &str = env!("CARGO_BIN_EXE_order-backend");
const VALID_ORDER: &str =
    r#"{"items":[{"sku":"A-1","qty":2}],"amount_cents":1999,"email":"a@example.com"}"#;

fn url(backend: &portico::sample::RunningBackend, path: &str) -> String {
    format!("http://{}{path}", backend.addr())
}

fn post_order(addr: SocketAddr, user: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/users/{user}/orders"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

#[tokio::test]
async fn health_names_the_instance() {
    let backend = start_backend(BackendOptions::new("b7")).await;
    let answer = get(&client(), &url(&backend, "/health")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-backend"), "b7");
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok", "name": "b7"}));
}

#[tokio::test]
async fn user_one_starts_with_order_001_and_a_cacheable_etag() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();
    let answer = get(&client, &url(&backend, "/users/1/orders")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("cache-control"), "public, max-age=10");
    let orders: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(orders[0]["id"], "ORDER-001");

    let etag = answer.header("etag").to_owned();
    let request = Request::get(url(&backend, "/users/1/orders"))
        .header("if-none-match", &etag)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let revalidated = send(&client, request).await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert!(revalidated.body.is_empty());
    assert_eq!(revalidated.header("etag"), etag);
    assert_eq!(revalidated.header("x-backend"), "b1");
}

#[tokio::test]
async fn a_posted_order_is_created_then_confirmed_by_the_worker() {
    let mut opts = BackendOptions::new("b1");
    opts.max_age = 30;
    let backend = start_backend(opts).await;
    let client = client();
    let before = get(&client, &url(&backend, "/users/1/orders")).await;
    let request = Request::post(url(&backend, "/users/1/orders"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"items":[{"sku":"A-1","qty":2}],"amount_cents":1999,"email":"a@example.com"}"#,
        )))
        .unwrap();
    let created = send(&client, request).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let location = created.header("location").to_owned();
    assert_eq!(location, "/orders/ORDER-002");

    let confirmed = tokio::time::timeout(STEP, async {
        loop {
            let order = get(&client, &url(&backend, &location)).await;
            let body: serde_json::Value = serde_json::from_slice(&order.body).unwrap();
            if body["status"] == "confirmed" {
                return order;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the worker confirms the order");
    assert_eq!(confirmed.header("cache-control"), "no-store");

    let after = get(&client, &url(&backend, "/users/1/orders")).await;
    assert_ne!(after.header("etag"), before.header("etag"));
    assert_eq!(after.header("cache-control"), "public, max-age=30");
    assert_eq!(backend.orders_created(), 1);
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();
    let long_sku: &'static str = format!(
        r#"{{"items":[{{"sku":"{}","qty":1}}],"amount_cents":1,"email":"a@b"}}"#,
        "A".repeat(65)
    )
    .leak();
    let post = |path: &str, body: &'static str| {
        Request::post(url(&backend, path))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let cases = [
        (
            post("/users/1/orders", "{not json"),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(
                "/users/1/orders",
                r#"{"items":[],"amount_cents":1,"email":"a@b"}"#,
            ),
            StatusCode::BAD_REQUEST,
        ),
        (post("/users/x/orders", "{}"), StatusCode::BAD_REQUEST),
        (post("/health", ""), StatusCode::METHOD_NOT_ALLOWED),
        (post("/nowhere", ""), StatusCode::NOT_FOUND),
        // JSON objects only, not serde's array form of a struct.
        (
            post("/users/1/orders", r#"[[["A-1",2]],1999,"a@example.com"]"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(
                "/users/1/orders",
                r#"{"items":[["A-1",2]],"amount_cents":1,"email":"a@b"}"#,
            ),
            StatusCode::BAD_REQUEST,
        ),
        // A sku is printable and at most 64 characters.
        (
            post(
                "/users/1/orders",
                r#"{"items":[{"sku":"A\u001b[31m","qty":1}],"amount_cents":1,"email":"a@b"}"#,
            ),
            StatusCode::BAD_REQUEST,
        ),
        (post("/users/1/orders", long_sku), StatusCode::BAD_REQUEST),
        // A member twice: not the last one silently, as a gateway that
        // checked the first would pass the other on.
        (
            post(
                "/users/1/orders",
                r#"{"items":[{"sku":"A-1","qty":1}],"amount_cents":0,"amount_cents":5,"email":"a@b"}"#,
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(
                "/users/1/orders",
                r#"{"items":[{"sku":"A-1","qty":1,"qty":0}],"amount_cents":5,"email":"a@b"}"#,
            ),
            StatusCode::BAD_REQUEST,
        ),
        // A padded test answer past 64 MiB is refused, not allocated.
        (
            Request::get(url(&backend, "/cache/x?size=99999999999"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        // A content coding the backend does not decode (RFC 9110 §15.5.16).
        (
            {
                let mut coded = post("/users/1/orders", VALID_ORDER);
                coded
                    .headers_mut()
                    .insert("content-encoding", "gzip".parse().unwrap());
                coded
            },
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        // One URL per list: a leading `//` is not another spelling of it.
        (
            Request::get(url(&backend, "//users/1/orders"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (request, want) in cases {
        let path = request.uri().path().to_owned();
        let answer = send(&client, request).await;
        assert_eq!(answer.status, want, "{path}");
        assert_eq!(answer.header("content-type"), "application/json");
        assert_eq!(answer.header("x-backend"), "b1");
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let unknown = get(&client, &url(&backend, "/orders/ORDER-999")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(backend.orders_created(), 0);
}

/// An order declared larger than the backend takes is a 413 at once, not
/// a `100 Continue` inviting an upload that is then refused.
#[tokio::test]
async fn an_oversized_order_is_refused_before_its_upload() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let ask = "POST /users/1/orders HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
               Content-Length: 20971581\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(backend.addr(), ask.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
}

#[tokio::test]
async fn delay_holds_every_answer_back() {
    let mut opts = BackendOptions::new("slow");
    opts.delay = Duration::from_millis(150);
    let backend = start_backend(opts).await;
    let started = std::time::Instant::now();
    let answer = get(&client(), &url(&backend, "/health")).await;
    assert_eq!(answer.status, StatusCode::OK);
    // Only a lower bound: how much longer it takes depends on the machine.
    assert!(started.elapsed() >= Duration::from_millis(150));
}

/// With `concurrency`, requests beyond it wait their turn, so an
/// instance has a capacity and adding instances adds to it (review35c 6:
/// the delay alone bounded nothing).
#[tokio::test]
async fn concurrency_makes_requests_beyond_it_wait_their_turn() {
    let mut opts = BackendOptions::new("one-at-a-time");
    opts.delay = Duration::from_millis(150);
    opts.concurrency = Some(1);
    let backend = start_backend(opts).await;
    let started = std::time::Instant::now();
    let asks = (0..3).map(|_| {
        let url = url(&backend, "/health");
        tokio::spawn(async move { get(&client(), &url).await.status })
    });
    for ask in asks.collect::<Vec<_>>() {
        assert_eq!(ask.await.unwrap(), StatusCode::OK);
    }
    // One after another: a lower bound only, as above.
    assert!(started.elapsed() >= Duration::from_millis(450));
}

#[tokio::test]
async fn a_post_for_an_unknown_user_is_404_and_creates_nothing() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();
    for user in ["999999", "0", "4"] {
        let refused = send(&client, post_order(backend.addr(), user, VALID_ORDER)).await;
        assert_eq!(refused.status, StatusCode::NOT_FOUND, "user {user}");
        assert_eq!(refused.header("content-type"), "application/json");
        let body: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
        assert_eq!(body, serde_json::json!({"error": "user not found"}));
        let list = get(&client, &url(&backend, &format!("/users/{user}/orders"))).await;
        assert_eq!(list.status, StatusCode::NOT_FOUND, "user {user} after POST");
    }
    assert_eq!(backend.orders_created(), 0);
    // No order id was used up by the refused ones.
    let created = send(&client, post_order(backend.addr(), "2", VALID_ORDER)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.header("location"), "/orders/ORDER-002");
}

#[tokio::test]
async fn a_zero_or_negative_amount_is_refused_with_400() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();
    for amount in ["0", "-1"] {
        let body = format!(
            r#"{{"items":[{{"sku":"A-1","qty":2}}],"amount_cents":{amount},"email":"a@example.com"}}"#
        );
        let refused = send(&client, post_order(backend.addr(), "1", &body)).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "amount {amount}");
        let body: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
        assert!(body["error"].is_string(), "amount {amount}: {body}");
    }
    assert_eq!(backend.orders_created(), 0);
}

#[tokio::test]
async fn stop_returns_once_every_queued_order_is_confirmed() {
    let repo = portico::sample::new_repository();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let backend = portico::sample::start_on(loopback, BackendOptions::new("b1"), repo.clone())
        .await
        .unwrap();
    let client = client();
    let mut ids = Vec::new();
    // The worker takes about 50 ms an order: most are still queued at stop.
    for _ in 0..30 {
        let created = send(&client, post_order(backend.addr(), "1", VALID_ORDER)).await;
        assert_eq!(created.status, StatusCode::CREATED);
        ids.push(
            created
                .header("location")
                .trim_start_matches("/orders/")
                .to_owned(),
        );
    }
    drop(client);
    tokio::time::timeout(STEP * 2, backend.stop())
        .await
        .expect("stop is bounded");
    let pending: Vec<&String> = ids
        .iter()
        .filter(|id| repo.order(id).unwrap().status != OrderStatus::Confirmed)
        .collect();
    assert!(pending.is_empty(), "left pending at stop: {pending:?}");
}

/// A request still being answered when the grace ends is cut, with its
/// connection: it neither answers 201 late nor creates an order no worker
/// will confirm (review41c F1: in-process, the connection ran on).
#[tokio::test]
async fn a_stop_cuts_a_request_that_outlives_the_grace() {
    let repo = portico::sample::new_repository();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut opts = BackendOptions::new("b1");
    opts.delay = portico::sample::STOP_GRACE * 3;
    let backend = portico::sample::start_on(loopback, opts, repo.clone())
        .await
        .unwrap();
    let client = client();
    let request = post_order(backend.addr(), "1", VALID_ORDER);
    let answer = tokio::spawn(async move { client.request(request).await });
    // Until the backend has the request: it counts it before the delay.
    let started = tokio::time::Instant::now();
    while backend.requests() == 0 {
        assert!(started.elapsed() < STEP, "the request reached the backend");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(STEP * 2, backend.stop())
        .await
        .expect("stop is bounded");
    let answer = tokio::time::timeout(STEP, answer)
        .await
        .expect("the cut is seen at once")
        .unwrap();
    assert!(answer.is_err(), "{answer:?}");
    let (orders, _) = repo.orders_of(1).unwrap();
    assert_eq!(orders.len(), 1, "only the seeded order: {orders:?}");
}

/// Instances sharing an order service (the demo's) leave its queue to
/// the others when one stops: the worker goes on confirming (review41c
/// F2), until whoever made it drains it.
#[tokio::test]
async fn a_stopped_instance_leaves_a_shared_queue_to_the_others() {
    let service = portico::sample::service::OrderService::start(portico::sample::new_repository());
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let start = |name: &str| {
        portico::sample::start_sharing(loopback, BackendOptions::new(name), service.clone())
    };
    let (first, second) = (start("b1").await.unwrap(), start("b2").await.unwrap());
    let client = client();
    let created = send(&client, post_order(first.addr(), "1", VALID_ORDER)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    tokio::time::timeout(STEP * 2, first.stop())
        .await
        .expect("stop is bounded");
    let created = send(&client, post_order(second.addr(), "1", VALID_ORDER)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.header("location").trim_start_matches("/orders/");
    let started = tokio::time::Instant::now();
    while service.order(id).unwrap().status != OrderStatus::Confirmed {
        assert!(
            started.elapsed() < STEP,
            "{id} confirmed after the other stopped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    second.stop().await;
    let deadline = tokio::time::Instant::now() + STEP;
    assert_eq!(service.drain(deadline).await, 0);
}

/// Kills the child if a test fails before it exits on its own.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The text of a log line without terminal escape sequences.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte(@ to ~)
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn the_process_confirms_queued_orders_on_sigterm_and_logs_without_colour() {
    let mut child = Command::new(ORDER_BACKEND)
        .args(["--listen", "127.0.0.1:0", "--name", "proc"])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("order-backend starts");
    let stderr = child.stderr.take().unwrap();
    let mut child = ChildGuard(child);
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let addr: SocketAddr = tokio::time::timeout(STEP, async {
        while let Some(line) = lines.recv().await {
            let text = strip_escapes(&line);
            log.push(line);
            if let Some(rest) = text.split("addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("order-backend exited before listening: {log:?}");
    })
    .await
    .expect("order-backend logs its address");

    let client = client();
    for _ in 0..30 {
        let created = send(&client, post_order(addr, "1", VALID_ORDER)).await;
        assert_eq!(created.status, StatusCode::CREATED);
    }
    drop(client);
    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::timeout(STEP, async {
        while let Some(line) = lines.recv().await {
            log.push(line);
        }
    })
    .await
    .expect("order-backend exits after SIGTERM");
    let status = tokio::time::timeout(STEP, async {
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("order-backend exits after SIGTERM");
    let log = log.join("\n");
    assert!(status.success(), "exited with {status}:\n{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log}");
    assert!(
        log.contains("order.confirmed queue drained"),
        "no drain in the log:\n{log}"
    );
    assert!(!log.contains("still pending"), "{log}");
}

/// HEAD goes wherever GET does, and another method on a test endpoint is
/// a 405 naming what it takes, as on the API's paths (backend53 L6: a
/// 405 to HEAD on `/echo`, 404s elsewhere).
#[tokio::test]
async fn test_endpoints_take_head_and_name_their_methods() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();
    let head = send(
        &client,
        Request::head(url(&backend, "/echo"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    for (path, allow) in [
        ("/ws/echo", "GET"),
        ("/cache/x", "GET, HEAD"),
        ("/echo/headers", "GET, HEAD"),
        ("/bytes/10", "GET, HEAD"),
        ("/echo", "GET, HEAD, POST"),
    ] {
        let answer = send(
            &client,
            Request::delete(url(&backend, path))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(answer.header("allow"), allow, "{path}");
    }
}

/// `/cache/NAME?status=` answers a 204 or a 205 without content (RFC 9110
/// §15.3.5, §15.3.6; backend53 L7: a 205 sent its JSON), and refuses a
/// 1xx, which is no final answer.
#[tokio::test]
async fn the_cache_endpoint_sends_no_content_where_a_status_has_none() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();
    for (query, status) in [
        ("status=204", StatusCode::NO_CONTENT),
        ("status=205", StatusCode::RESET_CONTENT),
        ("status=205&chunked=1", StatusCode::RESET_CONTENT),
    ] {
        let answer = get(&client, &url(&backend, &format!("/cache/x?{query}"))).await;
        assert_eq!(answer.status, status, "{query}");
        assert!(answer.body.is_empty(), "{query}: {:?}", answer.body);
    }
    for status in [103, 700] {
        let refused = get(
            &client,
            &url(&backend, &format!("/cache/x?status={status}")),
        )
        .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{status}");
    }
}
