//! Per-client throttling over real sockets: bursts, headers, separate
//! budgets, and forwarding headers believed only from trusted proxies.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use portico::config::{Cidr, Config, HostMatch, RateLimit, Route};
use portico::sample::{BackendOptions, RunningBackend};

fn limited(backend: &RunningBackend, trusted: &str) -> Config {
    let mut config = config_for(&[backend]);
    let (addr, prefix) = trusted.split_once('/').unwrap();
    config.rate_limit = Some(RateLimit {
        requests_per_second: 10.0,
        burst: 5,
        ..RateLimit::default()
    });
    config.server.trusted_proxies = vec![Cidr {
        addr: addr.parse().unwrap(),
        prefix: prefix.parse().unwrap(),
    }];
    config.routes[0].rate_limit = true;
    config
        .routes
        .push(Route::new(HostMatch::Any, "/health", 0, "health"));
    config
}

/// One throttled route (10/s, burst 5) in front of the backend at `addr`.
fn limited_at(addr: std::net::SocketAddr) -> Config {
    let mut config = Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    config.rate_limit = Some(RateLimit {
        requests_per_second: 10.0,
        burst: 5,
        ..RateLimit::default()
    });
    config.routes[0].rate_limit = true;
    config
}

async fn burst(
    client: &TestClient,
    url: &str,
    forwarded_for: Option<&str>,
    n: usize,
) -> Vec<Answer> {
    let mut answers = Vec::new();
    for _ in 0..n {
        let mut request = Request::get(url);
        if let Some(xff) = forwarded_for {
            request = request.header("x-forwarded-for", xff);
        }
        answers.push(send(client, request.body(Full::new(Bytes::new())).unwrap()).await);
    }
    answers
}

fn allowed(answers: &[Answer]) -> usize {
    answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count()
}

/// A route with a rate of its own throttles at it, and says its burst,
/// beside the section's on the others (review41b M2).
#[tokio::test]
async fn a_route_with_its_own_rate_throttles_at_it() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = limited(&backend, "10.0.0.0/8");
    config.routes[1].rate_limit = true;
    config.routes[1].rate = Some(portico::config::Rate {
        requests_per_second: 0.01,
        burst: 2,
    });
    let proxy = start_proxy(config).await;
    let client = client();
    let strict = burst(&client, &proxy.url("/health"), None, 4).await;
    assert_eq!(allowed(&strict), 2);
    assert_eq!(strict[0].header("ratelimit-limit"), "2");
    let loose = burst(&client, &proxy.url("/users/1/orders"), None, 4).await;
    assert_eq!(allowed(&loose), 4);
    assert_eq!(loose[0].header("ratelimit-limit"), "5");
}

#[tokio::test]
async fn a_burst_of_twenty_lets_five_through_and_throttles_the_rest() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy(limited(&backend, "10.0.0.0/8")).await;
    let client = client();
    let url = proxy.url("/users/1/orders");
    let started = std::time::Instant::now();
    let mut answers = burst(&client, &url, None, 20).await;
    // On a machine so loaded that the rate refilled the budget as fast as
    // requests came, more until one is refused.
    while !answers
        .iter()
        .any(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
    {
        assert!(answers.len() < 200, "never throttled");
        answers.extend(burst(&client, &url, None, 1).await);
    }
    // Five from the burst, and what the rate (10/s) gave back meanwhile:
    // bounded by the time taken, not by a guess at how fast the test runs
    // (a loaded CI machine let 7 through where 6 were allowed, stop 43).
    let refilled = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    let ok = allowed(&answers);
    assert!(
        (5..=5 + refilled).contains(&ok),
        "{ok} allowed, {refilled} refilled"
    );
    assert_eq!(
        backend.requests() as usize,
        ok,
        "throttled requests reached the backend"
    );

    let first = &answers[0];
    assert_eq!(first.header("ratelimit-limit"), "5");
    assert_eq!(first.header("ratelimit-remaining"), "4");
    // 10/s: the one spent request is back within a second.
    assert_eq!(first.header("ratelimit-reset"), "1");
    let throttled = answers
        .iter()
        .find(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .unwrap();
    assert_eq!(throttled.header("retry-after"), "1");
    assert_eq!(throttled.header("ratelimit-limit"), "5");
    assert_eq!(throttled.header("ratelimit-remaining"), "0");
    assert_eq!(throttled.header("ratelimit-reset"), "1");
    assert!(String::from_utf8_lossy(&throttled.body).starts_with("429"));

    // A route without rate_limit is not throttled.
    let free = burst(&client, &proxy.url("/health"), None, 10).await;
    assert_eq!(allowed(&free), 10);
}

/// A key field sent on two lines that differ is a 400, never sent on:
/// counted by the address, a throttled key had a fresh budget from each
/// address it came from while the backend read the key (review37d M1).
#[tokio::test]
async fn a_rate_limit_key_on_two_differing_lines_is_refused() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = limited(&backend, "10.0.0.0/8");
    let limits = config.rate_limit.as_mut().unwrap();
    limits.key = portico::config::RateLimitKey::Header(http::HeaderName::from_static("x-api-key"));
    // Nothing comes back while the test runs, however slowly it does.
    limits.requests_per_second = 0.01;
    let proxy = start_proxy(config).await;
    let client = client();
    let url = proxy.url("/users/1/orders");
    let with_keys = |keys: &[&str]| {
        let mut request = Request::get(&url);
        for key in keys {
            request = request.header("x-api-key", *key);
        }
        request.body(Full::new(Bytes::new())).unwrap()
    };
    let answer = send(&client, with_keys(&["gamma", "junk"])).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{:?}", answer.body);
    assert!(String::from_utf8_lossy(&answer.body).contains("several lines"));
    assert_eq!(backend.requests(), 0);
    // The same key twice is that key, and spends its budget.
    let answer = send(&client, with_keys(&["gamma", "gamma"])).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("ratelimit-remaining"), "4");
    let answer = send(&client, with_keys(&["gamma"])).await;
    assert_eq!(answer.header("ratelimit-remaining"), "3");
}

#[tokio::test]
async fn portico_s_own_errors_carry_the_budget_too() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = limited(&backend, "10.0.0.0/8");
    config.upstreams[0].retries = 0;
    let proxy = start_proxy(config).await;
    backend.stop().await;
    let answer = get(&client(), &proxy.url("/users/1/orders")).await;
    assert!(answer.status.is_server_error(), "{}", answer.status);
    assert_eq!(answer.header("ratelimit-limit"), "5");
    assert_eq!(answer.header("ratelimit-remaining"), "4");
}

/// The clients the limiter tracks are a gauge, so a table filling up
/// (its new clients then share one budget) shows in Prometheus, not only
/// in `/status` (review33b note).
#[tokio::test]
async fn the_tracked_clients_are_a_gauge() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy_with_admin(limited(&backend, "127.0.0.1/32"), None, None).await;
    let client = client();
    for who in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        burst(&client, &proxy.url("/users/1/orders"), Some(who), 1).await;
    }
    let text = get(&client, &proxy.admin_url("/metrics")).await.body;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.lines()
            .any(|l| l == "portico_ratelimit_tracked_clients 3"),
        "{text}"
    );
}

/// A backend's own rate-limit fields are its quota's, and pass on
/// untouched, without portico's beside them: a 429 of its own said
/// "9 left, back in 1 s" next to its `Retry-After: 30` (review33b F4).
#[tokio::test]
async fn a_backend_s_own_rate_limit_fields_are_kept() {
    let ietf_s = scripted_backend(|_| {
        b"HTTP/1.1 429 Too Many Requests\r\nRateLimit-Limit: 1000\r\n\
          RateLimit-Remaining: 0\r\nRateLimit-Reset: 60\r\nRetry-After: 30\r\n\
          Content-Length: 0\r\n\r\n"
    })
    .await;
    // The fields GitHub's API and most frameworks send (review33d F3).
    let github_s = scripted_backend(|_| {
        b"HTTP/1.1 429 Too Many Requests\r\nX-RateLimit-Limit: 60\r\n\
          X-RateLimit-Remaining: 0\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n"
    })
    .await;
    for (addr, kept) in [
        (
            ietf_s,
            [("ratelimit-limit", "1000"), ("ratelimit-remaining", "0")],
        ),
        (
            github_s,
            [("x-ratelimit-limit", "60"), ("x-ratelimit-remaining", "0")],
        ),
    ] {
        let proxy = start_proxy(limited_at(addr)).await;
        let answer = get(&client(), &proxy.url("/api")).await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        for (name, value) in kept {
            assert_eq!(answer.header(name), value);
            assert_eq!(answer.headers.get_all(name).iter().count(), 1);
        }
        assert_eq!(answer.header("retry-after"), "30");
        if addr == github_s {
            // None of portico's beside the backend's.
            assert!(!answer.headers.contains_key("ratelimit-limit"));
        }
    }
    // A 429 or 503 that says when to come back in `Retry-After` alone
    // gets none of portico's either: its "4 left, all back in 1 s" sent
    // clients back 29 s early (limit53 L2). Other answers get them.
    let retry_s = scripted_backend(|head| {
        if head.starts_with("GET /busy ") {
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n"
        } else if head.starts_with("GET /moved ") {
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: /api\r\nRetry-After: 30\r\n\
              Content-Length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n"
        }
    })
    .await;
    let proxy = start_proxy(limited_at(retry_s)).await;
    for (path, status, quota) in [
        ("/api", StatusCode::TOO_MANY_REQUESTS, false),
        ("/busy", StatusCode::SERVICE_UNAVAILABLE, false),
        ("/moved", StatusCode::MOVED_PERMANENTLY, true),
    ] {
        let answer = get(&client(), &proxy.url(path)).await;
        assert_eq!(answer.status, status, "{path}");
        assert_eq!(answer.header("retry-after"), "30", "{path}");
        assert_eq!(
            answer.headers.contains_key("ratelimit-remaining"),
            quota,
            "{path}: {:?}",
            answer.headers
        );
    }
}

/// A stored response keeps none of the backend's rate-limit fields: they
/// were the quota of the client it answered, and every hit handed that
/// one user's "0 left" to everyone (review33c M1). Hits carry portico's.
#[tokio::test]
async fn a_hit_carries_portico_s_quota_not_the_stored_backend_s() {
    let addr = scripted_backend(|_| {
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nRateLimit-Limit: 1000\r\n\
          RateLimit-Remaining: 0\r\nRateLimit-Reset: 60\r\nX-RateLimit-Used: 10\r\n\
          Content-Length: 2\r\n\r\nok"
    })
    .await;
    let proxy = start_proxy(with_cache(limited_at(addr))).await;
    let client = client();
    let miss = get(&client, &proxy.url("/list")).await;
    assert_eq!(miss.header("ratelimit-remaining"), "0");
    let hit = tokio::time::timeout(STEP, async {
        loop {
            let answer = get(&client, &proxy.url("/list")).await;
            if answer.header("cache-status") == "portico; hit" {
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a hit within STEP");
    assert_eq!(hit.header("ratelimit-limit"), "5");
    assert_ne!(hit.header("ratelimit-remaining"), "0");
    // GitHub's count of the first client's requests (review33e F6).
    assert!(!hit.headers.contains_key("x-ratelimit-used"));
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_does_not_escape_the_limit() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = limited(&backend, "10.0.0.0/8");
    // Nothing comes back while the test runs, however slowly it does: a
    // bound that grew with the time taken let a slow run pass a bypass
    // (review43f L6).
    config.rate_limit.as_mut().unwrap().requests_per_second = 0.01;
    let proxy = start_proxy(config).await;
    let client = client();
    let mut ok = 0;
    for i in 0..20 {
        let spoofed = format!("198.51.100.{i}");
        ok += allowed(&burst(&client, &proxy.url("/users/1/orders"), Some(&spoofed), 1).await);
    }
    assert_eq!(ok, 5, "allowed with rotating spoofed addresses");
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = limited(&backend, "127.0.0.1/32");
    // Nothing comes back while the test runs (see above).
    config.rate_limit.as_mut().unwrap().requests_per_second = 0.01;
    let proxy = start_proxy(config).await;
    let client = client();
    let url = proxy.url("/users/1/orders");
    let first = burst(&client, &url, Some("198.51.100.1"), 20).await;
    assert_eq!(allowed(&first), 5);
    // A second client behind the same proxy is unaffected by the first.
    let second = burst(&client, &url, Some("198.51.100.2"), 5).await;
    assert_eq!(allowed(&second), 5);
    // Garbage in the header falls back to the peer: its own budget.
    let garbage = burst(&client, &url, Some("not an address"), 3).await;
    assert_eq!(allowed(&garbage), 3);
}

#[tokio::test]
async fn throttled_requests_are_counted_per_route() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy_with_admin(limited(&backend, "10.0.0.0/8"), None, None).await;
    let answers = burst(&client(), &proxy.url("/users/1/orders"), None, 10).await;
    let throttled = answers.len() - allowed(&answers);
    let metrics = get(&client(), &proxy.admin_url("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    let want = format!("portico_ratelimit_rejected_total{{route=\"default\"}} {throttled}");
    assert!(text.contains(&want), "{want} not in\n{text}");
}

/// A rate below one a second, written as a fraction: 0.5/s is one request
/// every two seconds (nginx's `rate=30r/m`).
#[tokio::test]
async fn a_fractional_rate_allows_one_request_every_few_seconds() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = limited(&backend, "10.0.0.0/8");
    let limit = config.rate_limit.as_mut().unwrap();
    limit.requests_per_second = 0.5;
    limit.burst = 1;
    let proxy = start_proxy(config).await;
    let answers = burst(&client(), &proxy.url("/users/1/orders"), None, 2).await;
    assert_eq!(answers[0].status, StatusCode::OK);
    assert_eq!(answers[0].header("ratelimit-reset"), "2");
    assert_eq!(answers[1].status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answers[1].header("retry-after"), "2");
}
