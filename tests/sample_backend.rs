//! The sample order backend over real sockets, as tests and demos use it.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use portico::sample::BackendOptions;

fn url(backend: &portico::sample::RunningBackend, path: &str) -> String {
    format!("http://{}{path}", backend.addr())
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
