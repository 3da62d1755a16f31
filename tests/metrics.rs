//! Metrics and the admin endpoints after known traffic: exact counters,
//! token-protected mutations, and an admin port separate from traffic.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use portico::sample::BackendOptions;

fn metric_line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

#[tokio::test]
async fn ten_requests_count_exactly_ten() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].name = "orders".into();
    config.routes[0].name = "orders".into();
    let proxy = start_proxy_with_admin(config, None, None).await;
    let client = client();
    for _ in 0..10 {
        assert_eq!(
            get(&client, &proxy.url("/users/1/orders")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get(&client, &proxy.url("/nowhere")).await.status,
        StatusCode::NOT_FOUND
    );

    let scrape = get(&client, &proxy.admin_url("/metrics")).await;
    assert_eq!(scrape.status, StatusCode::OK);
    assert!(scrape
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(scrape.body.to_vec()).unwrap();
    let backend_label = backend.addr().to_string();
    for (prefix, want) in [
        ("portico_requests_total{code=\"200\",route=\"orders\"}", "10"),
        // The backend answered 404 for /nowhere: still routed, counted as such.
        ("portico_requests_total{code=\"404\",route=\"orders\"}", "1"),
        (
            &format!("portico_upstream_requests_total{{backend=\"{backend_label}\",code=\"200\",upstream=\"orders\"}}"),
            "10",
        ),
        (&format!("portico_backend_up{{backend=\"{backend_label}\",upstream=\"orders\"}}"), "1"),
        (&format!("portico_backend_weight{{backend=\"{backend_label}\",upstream=\"orders\"}}"), "1"),
        ("portico_request_duration_seconds_count{route=\"orders\"}", "11"),
    ] {
        let line = metric_line(&text, prefix).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
        assert_eq!(line.rsplit(' ').next(), Some(want), "{line}");
    }
    assert!(
        text.contains("process_resident_memory_bytes"),
        "process metrics missing"
    );
    assert!(text.contains("portico_connections_open"));
    // The client's connection (or connections: its pool may open a second).
    let accepted = metric_line(&text, "portico_connections_accepted_total").unwrap();
    let accepted: u64 = accepted.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((1..=11).contains(&accepted), "{accepted}");
}

#[tokio::test]
async fn heads_the_parser_refuses_are_counted() {
    // hyper answers these itself; they must not vanish from the metrics
    // (and the access log): they are what smuggling attempts look like.
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    // Room for a head over hyper's 64 KiB URI limit: answered 414.
    config.server.max_header_size = 256 * 1024;
    let proxy = start_proxy_with_admin(config, None, None).await;
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(70_000));
    let long = raw_exchange(proxy.addr, long.as_bytes()).await;
    assert!(long.starts_with("HTTP/1.1 414"), "{long}");
    let folded = raw_exchange(
        proxy.addr,
        b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
    )
    .await;
    assert!(folded.starts_with("HTTP/1.1 400"), "{folded}");
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(300_000)
    );
    let big = raw_exchange(proxy.addr, big.as_bytes()).await;
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    let client = client();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let scrape = get(&client, &proxy.admin_url("/metrics")).await;
        let text = String::from_utf8(scrape.body.to_vec()).unwrap();
        let count = |code: &str| {
            let prefix = format!("portico_requests_total{{code=\"{code}\",route=\"_none\"}}");
            metric_line(&text, &prefix).and_then(|l| l.rsplit(' ').next().map(str::to_owned))
        };
        let one = |code| count(code).as_deref() == Some("1");
        if one("400") && one("414") && one("431") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn admin_health_readiness_and_status() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy_with_admin(config_for(&[&backend]), None, None).await;
    let client = client();
    assert_eq!(
        get(&client, &proxy.admin_url("/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, &proxy.admin_url("/readyz")).await.status,
        StatusCode::OK
    );
    let status = get(&client, &proxy.admin_url("/status")).await;
    let json: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(json["upstreams"][0]["name"], "default");
    assert_eq!(
        json["upstreams"][0]["backends"][0]["addr"],
        backend.addr().to_string()
    );
    assert_eq!(json["upstreams"][0]["backends"][0]["up"], true);
}

#[tokio::test]
async fn readyz_is_503_when_an_upstream_has_no_backend_up() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].health = Some(portico::config::HealthCheck {
        interval: std::time::Duration::from_millis(50),
        timeout: std::time::Duration::from_millis(25),
        rise: 1,
        fall: 1,
        ..Default::default()
    });
    let proxy = start_proxy_with_admin(config, None, None).await;
    backend.stop().await;
    proxy.wait_until("the backend down", |s| !s[0].up).await;
    assert_eq!(
        get(&client(), &proxy.admin_url("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// A backend up on trust is checked at once and its first failed check
/// takes it down, and `/readyz` does not say ready on its trust: it said
/// 200 for `fall` intervals while every request got a 502 (ops56 M1).
#[tokio::test]
async fn readyz_waits_for_the_first_check_and_one_failure_is_down() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = gone.local_addr().unwrap();
    drop(gone);
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].backends[0].addr = dead;
    // Only the first check (within a tenth of it) can judge in this
    // test's bound.
    config.upstreams[0].health = Some(portico::config::HealthCheck {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 3,
        ..Default::default()
    });
    let proxy = start_proxy_with_admin(config, None, None).await;
    let readyz = proxy.admin_url("/readyz");
    let said = tokio::time::timeout(STEP, async {
        loop {
            let answer = get(&client(), &readyz).await;
            let body = String::from_utf8_lossy(&answer.body).into_owned();
            assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            if body.contains("no backend taking traffic") {
                return body;
            }
            assert!(body.contains("first health checks under way"), "{body}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("/readyz never said the backend was down");
    assert!(said.starts_with("not ready"), "{said}");
    proxy
        .wait_until("the backend down", |s| !s[0].active_up)
        .await;
}

/// A reload that changes the checks keeps a backend the old ones found
/// up judged: `/readyz` stays ready, where every backend up on trust
/// again made it say "first health checks under way" (review of ops56 M1).
#[tokio::test]
async fn readyz_stays_ready_across_a_reload_that_changes_the_checks() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].health = Some(portico::config::HealthCheck {
        interval: Duration::from_secs(60),
        timeout: Duration::from_secs(1),
        ..Default::default()
    });
    let proxy = start_proxy_with_admin(config.clone(), None, None).await;
    let readyz = proxy.admin_url("/readyz");
    let ready = tokio::time::timeout(STEP, async {
        while get(&client(), &readyz).await.status != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(ready.await.is_ok(), "ready after the first check");
    config.upstreams[0].health.as_mut().unwrap().path = "/health?again".into();
    proxy.swap_in(&config);
    let answer = get(&client(), &readyz).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
}

/// Ready while some route can be served: an upstream no route uses says
/// nothing, and one upstream down is named but leaves the replica in its
/// load balancer; with none taking traffic it is out (review32d F1).
#[tokio::test]
async fn readyz_is_503_only_when_no_routed_upstream_takes_traffic() {
    let a = start_backend(BackendOptions::new("a")).await;
    let b = start_backend(BackendOptions::new("b")).await;
    let mut config = config_for(&[&a]);
    let health = portico::config::HealthCheck {
        interval: std::time::Duration::from_millis(50),
        timeout: std::time::Duration::from_millis(25),
        rise: 1,
        fall: 1,
        ..Default::default()
    };
    config.upstreams[0].health = Some(health.clone());
    let mut other = config.upstreams[0].clone();
    other.name = "b".into();
    other.backends[0].addr = b.addr();
    let mut unused = other.clone();
    unused.name = "unused".into();
    unused.backends[0].addr = "127.0.0.1:9".parse().unwrap();
    config.upstreams.extend([other, unused]);
    let mut route = config.routes[0].clone();
    route.path_prefix = "/b/".into();
    route.upstream = 1;
    route.name = "b".into();
    config.routes.push(route);
    let proxy = start_proxy_with_admin(config, None, None).await;
    let readyz = proxy.admin_url("/readyz");
    let until = |want: &'static str| {
        let readyz = readyz.clone();
        async move {
            let answered = tokio::time::timeout(STEP, async {
                loop {
                    let answer = get(&client(), &readyz).await;
                    let body = String::from_utf8_lossy(&answer.body).into_owned();
                    if body.contains(want) {
                        return (answer.status, body);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            answered.unwrap_or_else(|_| panic!("/readyz never said {want:?}"))
        }
    };
    // The unused upstream's backend is down from the first check on.
    let (status, _) = until("ready\n").await;
    assert_eq!(status, StatusCode::OK);
    b.stop().await;
    let (status, body) = until("in b:").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!body.contains("unused"), "{body}");
    a.stop().await;
    let (status, body) = until("not ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

fn mutation(url: String, method: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn admin_mutations_need_the_token() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();

    let open = start_proxy_with_admin(config_for(&[&backend]), None, None).await;
    let answer = send(
        &client,
        mutation(open.admin_url("/reload"), "POST", Some("x")),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::FORBIDDEN,
        "no token_file: mutations disabled"
    );

    let guarded = start_proxy_with_admin(config_for(&[&backend]), Some("s3cret"), None).await;
    for (path, method) in [("/reload", "POST"), ("/cache?prefix=/users", "DELETE")] {
        let url = guarded.admin_url(path);
        assert_eq!(
            send(&client, mutation(url.clone(), method, None))
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
        let wrong = send(&client, mutation(url.clone(), method, Some("guess"))).await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(wrong.header("www-authenticate"), "Bearer");
        let right = send(&client, mutation(url, method, Some("s3cret"))).await;
        assert!(right.status != StatusCode::UNAUTHORIZED && right.status != StatusCode::FORBIDDEN);
    }
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let lower = Request::post(guarded.admin_url("/reload"))
        .header("authorization", "bearer s3cret")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_ne!(send(&client, lower).await.status, StatusCode::UNAUTHORIZED);
    // Two credentials are none, in either order (review29b F8).
    for pair in [
        ["Bearer s3cret", "Bearer guess"],
        ["Bearer guess", "Bearer s3cret"],
    ] {
        let twice = Request::post(guarded.admin_url("/reload"))
            .header("authorization", pair[0])
            .header("authorization", pair[1])
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&client, twice).await.status, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn admin_answers_head_and_says_which_methods_a_path_allows() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let client = client();
    let proxy = start_proxy_with_admin(config_for(&[&backend]), Some("s3cret"), None).await;
    // HEAD wherever GET is (RFC 9110 §9.1).
    for path in ["/metrics", "/healthz", "/readyz", "/status"] {
        let head = send(&client, mutation(proxy.admin_url(path), "HEAD", None)).await;
        assert_eq!(head.status, StatusCode::OK, "{path}");
        assert!(head.body.is_empty(), "{path}");
    }
    for (path, method, allow) in [
        ("/metrics", "POST", "GET, HEAD"),
        ("/reload", "GET", "POST"),
        ("/cache", "GET", "DELETE"),
    ] {
        let answer = send(
            &client,
            mutation(proxy.admin_url(path), method, Some("s3cret")),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(answer.header("allow"), allow, "{method} {path}");
    }
}

#[tokio::test]
async fn the_admin_endpoints_are_not_reachable_through_the_traffic_listener() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy_with_admin(config_for(&[&backend]), None, None).await;
    // Proxied to the backend, which knows no /metrics.
    let answer = get(&client(), &proxy.url("/metrics")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.header("x-backend"), "b1");
    assert!(!String::from_utf8_lossy(&answer.body).contains("portico_requests_total"));
}

/// Writes `file`: admin with the token file `admin.token`, one upstream
/// `u` at `backend`, one route to it, then `extra`.
fn write_reloadable(file: &std::path::Path, backend: std::net::SocketAddr, extra: &str) {
    std::fs::write(
        file,
        format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n[[upstream]]\nname = \"u\"\nbackends = [\"{backend}\"]\n[[route]]\nupstream = \"u\"\n{extra}"),
    )
    .unwrap();
}

/// Starts a proxy from `file` (see [`write_reloadable`]), its admin token
/// `t` written beside it, reloadable from the file.
async fn start_reloadable(dir: &std::path::Path, file: &std::path::Path) -> RunningProxy {
    std::fs::write(dir.join("admin.token"), "t\n").unwrap();
    let config = portico::config::load(file).unwrap();
    start_proxy_with_admin(config, Some("t"), Some(file.to_owned())).await
}

#[tokio::test]
async fn a_reload_that_drops_the_cache_zeroes_its_gauges() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let (dir, file) = config_dir("nocache");
    let write = |cache: &str| write_reloadable(&file, backend.addr(), cache);
    write("cache = true\n[cache]\n");
    let proxy = start_reloadable(&dir, &file).await;
    let client = client();
    get(&client, &proxy.url("/users/1/orders")).await;
    let scrape = || async {
        String::from_utf8_lossy(&get(&client, &proxy.admin_url("/metrics")).await.body).into_owned()
    };
    assert!(scrape().await.contains("portico_cache_entries 1"));

    write("");
    let answer = send(
        &client,
        mutation(proxy.admin_url("/reload"), "POST", Some("t")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let metrics = scrape().await;
    assert!(metrics.contains("portico_cache_entries 0"), "{metrics}");
    assert!(metrics.contains("portico_cache_size_bytes 0"), "{metrics}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload that tunes `default_ttl` or `max_object_size` keeps what the
/// cache holds (soak53: any change to `[cache]` emptied it, and every URL
/// went to the backends again); the new default applies to what is stored
/// from then on.
#[tokio::test]
async fn a_reload_that_tunes_the_cache_keeps_what_it_holds() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let (dir, file) = config_dir("retune");
    let write = |cache: &str| write_reloadable(&file, backend.addr(), cache);
    write("[cache]\nmax_object_size = \"1MiB\"\n");
    let proxy = start_reloadable(&dir, &file).await;
    let client = client();
    let big = "/cache/big?cc=max-age=60&size=2000000";
    let ranged = || {
        let (client, url) = (client.clone(), proxy.url(big));
        async move {
            get_with(&client, &url, &[("range", "bytes=0-9")])
                .await
                .header("cache-status")
                .to_owned()
        }
    };
    assert_eq!(
        get(&client, &proxy.url(big)).await.header("cache-status"),
        "portico; fwd=miss; detail=too-large"
    );
    let status = |path: &'static str| {
        let (client, url) = (client.clone(), proxy.url(path));
        async move { get(&client, &url).await.header("cache-status").to_owned() }
    };
    assert_eq!(status("/users/1/orders").await, "portico; fwd=miss; stored");
    // No freshness of its own, and no default yet.
    assert_eq!(
        status("/cache/plain").await,
        "portico; fwd=miss; detail=no-freshness"
    );

    write("[cache]\ndefault_ttl = \"60s\"\nmax_object_size = \"4MiB\"\n");
    let reload = mutation(proxy.admin_url("/reload"), "POST", Some("t"));
    assert_eq!(send(&client, reload).await.status, StatusCode::OK);
    assert_eq!(status("/users/1/orders").await, "portico; hit");
    assert_eq!(status("/cache/plain").await, "portico; fwd=miss; stored");
    assert_eq!(status("/cache/plain").await, "portico; hit");
    // What was too large before is stored now, asked for by a range too
    // (review61 L2: its mark sent ranges past the cache for minutes).
    assert_eq!(ranged().await, "portico; fwd=miss; fwd-status=200; stored");
    // The rest of the body is read after the range is sent: stored then.
    let cache = proxy.shared.proxy.load().cache().unwrap().clone();
    let stored = tokio::time::timeout(STEP, async {
        while cache.stats().await.0 < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(stored.is_ok(), "the whole response never stored");
    assert_eq!(ranged().await, "portico; hit");
    assert_eq!(backend.requests(), 5);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Before any traffic, each route and backend exports the usual codes at
/// 0: a series made by its first request hid that request's count from
/// `rate()` and `increase()` (metrics54: 20 first 503s read as none).
#[tokio::test]
async fn routes_and_backends_export_the_usual_codes_before_any_request() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy_with_admin(config_for(&[&backend]), None, None).await;
    let client = client();
    let metrics = get(&client, &proxy.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let at_zero = |name: &str, code: &str| {
        metrics.lines().any(|line| {
            line.starts_with(name)
                && line.contains(&format!("code=\"{code}\""))
                && line.ends_with(" 0")
        })
    };
    for code in ["200", "404", "499", "502", "503", "504"] {
        assert!(
            at_zero("portico_requests_total{", code),
            "{code}: {metrics}"
        );
        assert!(
            at_zero("portico_upstream_requests_total{", code),
            "{code}: {metrics}"
        );
    }
    // What is answered before routing, and not what only a route's
    // backends answer.
    for code in ["400", "404", "408", "431"] {
        let series = format!("portico_requests_total{{code=\"{code}\",route=\"_none\"}} 0");
        assert!(
            metrics.lines().any(|line| line == series),
            "{series}: {metrics}"
        );
    }
    for code in ["200", "502"] {
        let series = format!("portico_requests_total{{code=\"{code}\",route=\"_none\"}}");
        assert!(!metrics.contains(&series), "{series}: {metrics}");
    }
}

/// An upstream with no backend to pick warns once for a burst it turns
/// away, and then with how many went unsaid, not once per request: 408
/// such lines in a soak, one beside each access line (review40b L1).
#[tokio::test]
async fn an_upstream_with_no_backend_to_pick_warns_once_for_a_burst() {
    let (lines, _guard) = AccessLines::capture_of("portico=warn");
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].backends[0].weight = 0;
    let proxy = start_proxy(config).await;
    let client = client();
    for _ in 0..5 {
        let answer = get(&client, &proxy.url("/users/1/orders")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let warning = lines
        .first("the warning", |line| line["message"] == "proxy error")
        .await;
    assert_eq!(warning["status"], 503, "{warning}");
    let written = String::from_utf8_lossy(&lines.0.lock().unwrap()).into_owned();
    assert_eq!(written.matches("\"proxy error\"").count(), 1, "{written}");
}

/// Backends that refuse every connect: each failure counted by why, apart
/// from a 502 the backend would send (review42d F3), and left out of the
/// backends' latency (F2); one warning for the burst, not one a request
/// (F4). Once both are ejected they take the traffic all the same (panic
/// routing), which is counted and keeps `/readyz` ready (F1): it said
/// the routes answered 503 while every request went to the backends.
#[tokio::test]
async fn backends_that_refuse_are_counted_by_why_and_warned_of_once() {
    let (lines, _guard) = AccessLines::capture_of("portico=warn");
    let (one, _held_one) = refusing_addr();
    let (two, _held_two) = refusing_addr();
    let mut config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![one, two],
    );
    config.upstreams[0].retries = 2;
    let proxy = start_proxy_with_admin(config, None, None).await;
    let client = client();
    for _ in 0..10 {
        let answer = get(&client, &proxy.url("/users/1/orders")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    }
    let metrics = get(&client, &proxy.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let value = |name: &str, labels: &str| -> u64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(name) && line.contains(labels))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let attempts = value("portico_upstream_requests_total", "code=\"502\"");
    assert!(attempts >= 10, "{metrics}");
    assert_eq!(
        value("portico_upstream_errors_total", "reason=\"connect\""),
        attempts,
        "{metrics}"
    );
    assert_eq!(
        value(
            "portico_upstream_errors_total",
            "reason=\"response_timeout\""
        ),
        0
    );
    assert_eq!(value("portico_upstream_duration_seconds_count", ""), 0);
    // Each ejected after its third failure in a row: the attempts after
    // that, sent all the same, and no more (review42e M1: the picks of a
    // retry counted, 40 for 20 attempts).
    let panic = value("portico_upstream_panic_total", "upstream=\"default\"");
    assert!(
        panic >= 1 && panic <= attempts,
        "{panic} of {attempts}: {metrics}"
    );
    assert!(metrics.contains("portico_build_info{version="), "{metrics}");
    assert!(metrics.contains("portico_backend_in_flight{"), "{metrics}");
    assert_eq!(value("portico_backend_in_flight", ""), 0);
    let ejected = proxy.backend_status();
    assert!(ejected.iter().all(|b| !b.up && b.active_up), "{ejected:?}");
    let readyz = get(&client, &proxy.admin_url("/readyz")).await;
    assert_eq!(readyz.status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&readyz.body), "ready\n");
    let written = String::from_utf8_lossy(&lines.0.lock().unwrap()).into_owned();
    // One `proxy error` a backend for the ten refusals.
    assert_eq!(written.matches("\"proxy error\"").count(), 2, "{written}");
    assert_eq!(written.matches("(panic routing)").count(), 1, "{written}");
}

/// A head that does not parse is the backend's bad answer, not a broken
/// connection (review42e M2: both were `broken`), and each kind of
/// failure of one backend gets its own warning (review42e L2: the first
/// kept the others quiet for 10 s).
#[tokio::test]
async fn a_head_that_does_not_parse_is_a_bad_response_and_warned_of_apart() {
    let (lines, _guard) = AccessLines::capture_of("portico=warn");
    let backend = scripted_backend(|head| match target_of(head) {
        "/bad" => b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
        // Closes without a word.
        _ => b"",
    })
    .await;
    let mut config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![backend],
    );
    config.upstreams[0].retries = 0;
    let proxy = start_proxy_with_admin(config, None, None).await;
    let client = client();
    for path in ["/bad", "/bad", "/closed", "/closed"] {
        assert_eq!(
            get(&client, &proxy.url(path)).await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    let metrics = get(&client, &proxy.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    for reason in ["bad_response", "broken"] {
        let series = format!(
            "portico_upstream_errors_total{{backend=\"{backend}\",reason=\"{reason}\",upstream=\"default\"}} 2\n"
        );
        assert!(metrics.contains(&series), "{series}: {metrics}");
    }
    let written = String::from_utf8_lossy(&lines.0.lock().unwrap()).into_owned();
    assert_eq!(written.matches("\"proxy error\"").count(), 2, "{written}");
}

/// A tunnel's end is logged at info with its client, backend, request id,
/// life, the bytes each way and what ended it (review42h M1: a debug line
/// without the client, where nginx writes the access line at the end).
/// With the access log off too, the line names the request's id, as the
/// backend got it (review51 L1: it was made on the way to the backend,
/// after the tunnel had taken the request's fields, and the line had
/// none).
#[tokio::test]
async fn a_tunnel_s_end_says_what_it_carried_and_what_ended_it() {
    for filter in ["portico=info", "portico=info,portico::access=off"] {
        let (lines, _guard) = AccessLines::capture_of(filter);
        let backend = start_backend(BackendOptions::new("b1")).await;
        let proxy = start_proxy(config_for(&[&backend])).await;
        let mut stream = open_echo_tunnel(proxy.addr).await;
        ping(&mut stream).await;
        drop(stream);
        let line = lines
            .first("the tunnel's end", |line| {
                line["message"] == "tunnel closed"
            })
            .await;
        assert_eq!(line["client"], "127.0.0.1", "{filter}: {line}");
        assert_eq!(line["backend"], backend.addr().to_string(), "{line}");
        assert_eq!(line["bytes_from_client"], 4, "{line}");
        assert_eq!(line["bytes_from_backend"], 4, "{line}");
        assert_eq!(line["end"], "closed", "{line}");
        assert!(line["request_id"].is_string(), "{filter}: {line}");
    }
}

/// A request held at its backend shows in `portico_backend_in_flight`
/// until answered (review42d F5: only `/status` had it).
#[tokio::test]
async fn a_request_at_its_backend_is_in_flight_until_answered() {
    let release = Arc::new(tokio::sync::Notify::new());
    let backend = holding_backend("held", release.clone()).await;
    let config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![backend],
    );
    let proxy = start_proxy_with_admin(config, None, None).await;
    let url = proxy.url("/hold");
    let held = tokio::spawn(async move { get(&client(), &url).await.status });
    let metrics = proxy.admin_url("/metrics");
    let series = format!("portico_backend_in_flight{{backend=\"{backend}\",upstream=\"default\"}}");
    let until = |n: u32| {
        let (metrics, want) = (metrics.clone(), format!("{series} {n}\n"));
        async move {
            tokio::time::timeout(STEP, async {
                while !String::from_utf8_lossy(&get(&client(), &metrics).await.body).contains(&want)
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("never {want:?}"));
        }
    };
    until(1).await;
    release.notify_one();
    assert_eq!(held.await.unwrap(), StatusCode::OK);
    until(0).await;
}

/// A reload that removes `[cache]` warns of the responses it drops, as
/// one that changes it does (review39g L1: it said only `reloaded`).
#[tokio::test]
async fn a_reload_that_removes_the_cache_warns_of_what_it_drops() {
    let (lines, _guard) = AccessLines::capture_of("portico=warn");
    let backend = start_backend(BackendOptions::new("b1")).await;
    let (dir, file) = config_dir("uncache");
    let write = |cache: &str| write_reloadable(&file, backend.addr(), cache);
    write("cache = true\n[cache]\n");
    let proxy = start_reloadable(&dir, &file).await;
    get(&client(), &proxy.url("/users/1/orders")).await;
    let cache = proxy.shared.proxy.load().cache().cloned().unwrap();
    let stored = tokio::time::timeout(STEP, async {
        while cache.stats().await.0 < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(stored.await.is_ok(), "stored within STEP");
    write("");
    // Here, on the thread whose records are captured (the admin API
    // reloads on one of the blocking pool's).
    proxy.shared.reload().unwrap();
    let warning = lines
        .first("the warning", |line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("[cache] removed"))
        })
        .await;
    assert_eq!(warning["entries"], 1, "{warning}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fetch under way when a reload replaces the cache says in its access
/// line that its copy is not kept: before, it said `stored` for a copy no
/// later request would find, and the next request was a miss (review39d
/// L1). The requests waiting on it are still answered from it, not
/// fetched one after another (review39e M1, against the first fix).
#[tokio::test]
async fn a_fill_under_way_when_a_reload_replaces_the_cache_says_its_copy_is_not_kept() {
    let (lines, _guard) = AccessLines::capture();
    let mut options = BackendOptions::new("b1");
    options.delay = Duration::from_millis(400);
    let backend = start_backend(options).await;
    let (dir, file) = config_dir("refill");
    let write = |cache: &str| write_reloadable(&file, backend.addr(), cache);
    write("cache = true\n[cache]\n");
    let proxy = start_reloadable(&dir, &file).await;
    let client = client();
    let fetch = || {
        let (client, url) = (client.clone(), proxy.url("/users/1/orders"));
        tokio::spawn(async move { get(&client, &url).await })
    };
    let leader = fetch();
    at_backend(&backend, 1).await;
    let waiters: Vec<_> = (0..4).map(|_| fetch()).collect();
    write("cache = true\n[cache]\nmax_size = \"32MiB\"\n");
    let reload = mutation(proxy.admin_url("/reload"), "POST", Some("t"));
    assert_eq!(send(&client, reload).await.status, StatusCode::OK);
    let answer = leader.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let line = lines
        .first("the leader's line", |line| {
            line["path"] == "/users/1/orders" && line["cache"] != "portico; fwd=miss; collapsed"
        })
        .await;
    assert_eq!(
        line["cache"], "portico; fwd=miss; detail=invalidated",
        "{line}"
    );
    for waiter in waiters {
        let waited = waiter.await.unwrap();
        assert_eq!(waited.status, StatusCode::OK);
        assert_eq!(waited.body, answer.body);
    }
    assert_eq!(
        backend.requests(),
        1,
        "the waiters were answered from the fetch"
    );
    // The new cache stores the next one.
    let next = get(&client, &proxy.url("/users/1/orders")).await;
    assert_eq!(next.header("cache-status"), "portico; fwd=miss; stored");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_applies_a_good_file_and_refuses_a_bad_one() {
    let old = start_backend(BackendOptions::new("old")).await;
    let new = start_backend(BackendOptions::new("new")).await;
    let (dir, file) = config_dir("reload");
    let write =
        |backend: std::net::SocketAddr, extra: &str| write_reloadable(&file, backend, extra);
    write(old.addr(), "");
    let proxy = start_reloadable(&dir, &file).await;
    let client = client();
    assert_eq!(
        get(&client, &proxy.url("/health"))
            .await
            .header("x-backend"),
        "old"
    );

    write(new.addr(), "");
    let answer = send(
        &client,
        mutation(proxy.admin_url("/reload"), "POST", Some("t")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        get(&client, &proxy.url("/health"))
            .await
            .header("x-backend"),
        "new"
    );

    write(old.addr(), "bogus = 1\n");
    let answer = send(
        &client,
        mutation(proxy.admin_url("/reload"), "POST", Some("t")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(String::from_utf8_lossy(&answer.body).contains("unknown key `bogus`"));
    assert_eq!(
        get(&client, &proxy.url("/health"))
            .await
            .header("x-backend"),
        "new"
    );

    // Rotating the token: rewrite its file, reload; the old one is refused
    // from then on.
    std::fs::write(dir.join("admin.token"), "t2\n").unwrap();
    write(new.addr(), "");
    let reload = |token| mutation(proxy.admin_url("/reload"), "POST", Some(token));
    assert_eq!(send(&client, reload("t")).await.status, StatusCode::OK);
    assert_eq!(
        send(&client, reload("t")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(send(&client, reload("t2")).await.status, StatusCode::OK);
    // A token file that cannot be read rejects the reload and keeps the token.
    std::fs::write(dir.join("admin.token"), "").unwrap();
    let answer = send(&client, reload("t2")).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(String::from_utf8_lossy(&answer.body).contains("is empty"));
    assert_eq!(
        send(&client, reload("t2")).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The series of `text` that mention `needle`, for a failure message.
fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test]
async fn a_reload_drops_the_series_of_what_it_removed_and_keeps_the_rest_counting() {
    let keep = start_backend(BackendOptions::new("keep")).await;
    let old = start_backend(BackendOptions::new("old")).await;
    let new = start_backend(BackendOptions::new("new")).await;
    let other = start_backend(BackendOptions::new("other")).await;
    let (dir, file) = config_dir("metrics-retain");
    let write = |swapped: std::net::SocketAddr, extra: &str| {
        std::fs::write(
            &file,
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\
                 [server]\nlisten = [\"127.0.0.1:0\"]\n\
                 [[upstream]]\nname = \"u\"\nbackends = [\"{}\", \"{swapped}\"]\n\
                 [[route]]\nname = \"main\"\nupstream = \"u\"\n{extra}",
                keep.addr()
            ),
        )
        .unwrap();
    };
    let other_upstream = format!(
        "[[upstream]]\nname = \"gone\"\nbackends = [\"{}\"]\n\
         [[route]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"gone\"\n",
        other.addr()
    );
    write(old.addr(), &other_upstream);
    let proxy = start_reloadable(&dir, &file).await;
    let client = client();
    for _ in 0..4 {
        let answer = get(&client, &proxy.url("/health")).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    // The sample backend has no such path: a 404, counted all the same.
    get(&client, &proxy.url("/other")).await;
    let scrape = || async {
        String::from_utf8_lossy(&get(&client, &proxy.admin_url("/metrics")).await.body).into_owned()
    };
    let before = scrape().await;
    let (old_label, keep_label) = (old.addr().to_string(), keep.addr().to_string());
    let kept_series = [
        format!("portico_upstream_requests_total{{backend=\"{keep_label}\",code=\"200\",upstream=\"u\"}}"),
        format!("portico_upstream_duration_seconds_count{{backend=\"{keep_label}\",upstream=\"u\"}}"),
        "portico_requests_total{code=\"200\",route=\"main\"}".to_owned(),
        "portico_request_duration_seconds_count{route=\"main\"}".to_owned(),
    ];
    let values = |text: &str| -> Vec<String> {
        kept_series
            .iter()
            .map(|prefix| {
                let line =
                    metric_line(text, prefix).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
                line.rsplit(' ').next().unwrap().to_owned()
            })
            .collect()
    };
    let counted = values(&before);
    assert_eq!(counted[2], "4", "{before}");
    assert!(
        before.contains(&format!("backend=\"{old_label}\"")),
        "{before}"
    );
    assert!(before.contains("route=\"other\""), "{before}");

    // The second backend's address changes; the other upstream and its
    // route go.
    write(new.addr(), "");
    let reload = || mutation(proxy.admin_url("/reload"), "POST", Some("t"));
    assert_eq!(send(&client, reload()).await.status, StatusCode::OK);
    let after = scrape().await;
    for gone in [
        format!("backend=\"{old_label}\""),
        "upstream=\"gone\"".to_owned(),
        "route=\"other\"".to_owned(),
    ] {
        assert!(
            lines_with(&after, &gone).is_empty(),
            "{gone} is still exported: {:?}",
            lines_with(&after, &gone)
        );
    }
    assert_eq!(values(&after), counted, "{after}");
    assert!(
        after.contains(&format!(
            "portico_upstream_duration_seconds_count{{backend=\"{}\",upstream=\"u\"}} 0",
            new.addr()
        )),
        "{after}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_outcome_of_the_last_reload_is_exported() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let (dir, file) = config_dir("metrics-reload-outcome");
    write_reloadable(&file, backend.addr(), "");
    let proxy = start_reloadable(&dir, &file).await;
    let client = client();
    let outcome = |text: &str| {
        let value = |name: &str| -> i64 {
            let line = metric_line(text, &format!("{name} "))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        (
            value("portico_config_last_reload_successful"),
            value("portico_config_last_reload_success_timestamp_seconds"),
        )
    };
    let scrape = || async {
        String::from_utf8_lossy(&get(&client, &proxy.admin_url("/metrics")).await.body).into_owned()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Loading the file at start counts, as in Prometheus.
    let (ok, loaded) = outcome(&scrape().await);
    assert_eq!(ok, 1);
    assert!((now - 60..=now + 60).contains(&loaded), "{loaded} vs {now}");

    write_reloadable(&file, backend.addr(), "bogus = 1\n");
    let reload = || mutation(proxy.admin_url("/reload"), "POST", Some("t"));
    assert_eq!(
        send(&client, reload()).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // Rejected: the time is still the last good load's.
    assert_eq!(outcome(&scrape().await), (0, loaded));

    write_reloadable(&file, backend.addr(), "");
    assert_eq!(send(&client, reload()).await.status, StatusCode::OK);
    let (ok, reloaded) = outcome(&scrape().await);
    assert_eq!(ok, 1);
    assert!(reloaded >= loaded);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_silent_admin_connection_is_closed() {
    use tokio::io::AsyncReadExt;
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy_with_admin(config_for(&[&backend]), None, None).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.admin.unwrap())
        .await
        .unwrap();
    // Paused time: the clock jumps to the next timer whenever all is idle,
    // so hyper's 30 s head timer closes this long before the bound.
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        stream.read(&mut [0u8; 64]),
    )
    .await
    .expect("closed before the bound");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn admin_serves_through_the_drain_and_readyz_says_it() {
    // A backend that holds its one answer until the test lets it go, so
    // the drain lasts exactly as long as the test looks at it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    tokio::spawn({
        let release = release.clone();
        async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_head(&mut stream).await;
            release.notified().await;
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, ok).await;
        }
    });
    let config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    let proxy = start_proxy_with_admin(config, None, None).await;
    assert_eq!(
        get(&client(), &proxy.admin_url("/readyz")).await.status,
        StatusCode::OK
    );
    // A request in flight keeps the drain going while we look.
    let held = tokio::spawn({
        let url = proxy.url("/");
        async move { get(&client(), &url).await.status }
    });
    proxy
        .wait_until("the request to reach the backend", |b| b[0].in_flight == 1)
        .await;
    let (readyz, metrics) = (proxy.admin_url("/readyz"), proxy.admin_url("/metrics"));
    let stopping = tokio::spawn(proxy.stop());
    // A new client, so a new connection, each time: the admin listener
    // must still accept.
    let draining = tokio::time::timeout(STEP, async {
        loop {
            let answer = get(&client(), &readyz).await;
            if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("readyz turned 503 during the drain");
    assert_eq!(draining.body, "not ready: shutting down\n");
    assert_eq!(get(&client(), &metrics).await.status, StatusCode::OK);
    release.notify_one();
    assert_eq!(held.await.unwrap(), StatusCode::OK);
    stopping.await.unwrap();
}

/// The scrape's value for the series starting with `prefix`, 0 when absent.
fn scraped(proxy: &RunningProxy, prefix: &str) -> u64 {
    let text = String::from_utf8(proxy.shared.proxy.load().metrics().encode()).unwrap();
    metric_line(&text, prefix)
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0, |value| value.parse().unwrap())
}

#[tokio::test]
async fn a_request_its_client_leaves_counts_as_499() {
    use tokio::io::AsyncWriteExt;
    let mut opts = BackendOptions::new("b1");
    opts.delay = Duration::from_secs(2);
    let backend = start_backend(opts).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].name = "orders".into();
    config.routes[0].name = "orders".into();
    let proxy = start_proxy(config).await;
    let route = "portico_requests_total{code=\"499\",route=\"orders\"}";
    let upstream = format!(
        "portico_upstream_requests_total{{backend=\"{}\",code=\"499\",upstream=\"orders\"}}",
        backend.addr()
    );
    let counted = |n: u64| {
        let (proxy, upstream) = (&proxy, &upstream);
        async move {
            let waited = tokio::time::timeout(STEP, async {
                while scraped(proxy, route) < n || scraped(proxy, upstream) < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "{n} requests counted as 499 within STEP");
        }
    };

    // HTTP/1.1: the client closes its connection while the backend works.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /users/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    at_backend(&backend, 1).await;
    drop(stream);
    counted(1).await;

    // HTTP/2: the client resets the stream and keeps the connection.
    let h2 = h2c_client();
    let url = proxy.url("/users/1");
    let asked = tokio::time::timeout(Duration::from_millis(300), h2.get(url.parse().unwrap()));
    assert!(asked.await.is_err(), "the backend is slower than that");
    counted(2).await;
    assert_eq!(scraped(&proxy, "portico_requests_total{code=\"200\""), 0);
    // Counted, not timed: a request with no response head has no time to
    // one, and how long it waited is its client's patience, not the
    // backend's latency (review32d F2).
    assert_eq!(
        scraped(
            &proxy,
            "portico_request_duration_seconds_count{route=\"orders\"}"
        ),
        0
    );
    let timed = format!(
        "portico_upstream_duration_seconds_count{{backend=\"{}\",upstream=\"orders\"}}",
        backend.addr()
    );
    assert_eq!(scraped(&proxy, &timed), 0);
}

#[tokio::test]
async fn bodies_a_backend_cuts_short_are_counted() {
    // A head promising 100 bytes, 10 of them, then the connection closes.
    let addr =
        scripted_backend(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").await;
    let mut config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    config.upstreams[0].name = "cut".into();
    let proxy = start_proxy(config).await;
    let series = |reason: &str| {
        format!("portico_upstream_body_errors_total{{backend=\"{addr}\",reason=\"{reason}\",upstream=\"cut\"}}")
    };
    let text = String::from_utf8(proxy.shared.proxy.load().metrics().encode()).unwrap();
    assert!(text.contains(&format!("{} 0", series("broken"))), "{text}");
    for _ in 0..2 {
        let answer = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("0123456789"), "{answer}");
    }
    assert_eq!(scraped(&proxy, &series("broken")), 2);
    assert_eq!(scraped(&proxy, &series("stalled")), 0);
}

#[tokio::test]
async fn a_body_cut_because_the_client_s_upload_failed_is_not_the_backend_s() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The backend answers at once and reads the upload meanwhile; the
    // upload then outgrows max_request_body, and hyper ends the backend
    // connection, which cuts the answer's body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_head(&mut stream).await;
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
                let _ = stream.write_all(head).await;
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    let mut config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    config.upstreams[0].name = "cut".into();
    config.server.max_request_body = 1024;
    let proxy = start_proxy(config).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    let head = tokio::time::timeout(STEP, read_head(&mut client))
        .await
        .unwrap();
    assert!(head.is_some_and(|head| head.starts_with(b"HTTP/1.1 200")));
    let oversize = format!("800\r\n{}\r\n", "x".repeat(0x800));
    let _ = client.write_all(oversize.as_bytes()).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, client.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the cut answer ends the connection");
    let series = format!(
        "portico_upstream_body_errors_total{{backend=\"{addr}\",reason=\"broken\",upstream=\"cut\"}}"
    );
    assert_eq!(scraped(&proxy, &series), 0);
}

/// Behind a trusted proxy the line's `client` is the client it forwarded
/// for and `peer` the proxy, as nginx's realip module logs; from a peer not
/// trusted, `client` is the peer whatever its fields say, and no `peer`.
#[tokio::test]
async fn the_access_line_names_the_client_a_trusted_proxy_forwarded_for() {
    let (lines, _guard) = AccessLines::capture();
    let backend = start_backend(BackendOptions::new("b1")).await;
    let trusting = start_proxy(trusting_loopback(config_for(&[&backend]))).await;
    let plain = start_proxy(config_for(&[&backend])).await;
    for (proxy, path) in [(&trusting, "/health"), (&plain, "/echo/headers")] {
        let request = Request::get(proxy.url(path))
            .header("x-forwarded-for", "198.51.100.4, 203.0.113.9")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    }
    let line = lines.of("GET", "/health").await;
    assert_eq!(
        (&line["client"], &line["peer"]),
        (&"203.0.113.9".into(), &"127.0.0.1".into()),
        "{line}"
    );
    let line = lines.of("GET", "/echo/headers").await;
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert!(line.get("peer").is_none(), "{line}");
    // A client's forged `Forwarded` beside its proxy's X-Forwarded-For
    // hides it (neither is believed) unless the proxies are known to
    // write X-Forwarded-* only (review28c F2).
    let mut config = trusting_loopback(config_for(&[&backend]));
    config.server.trusted_fields = portico::config::TrustedFields::XForwarded;
    let knowing = start_proxy(config).await;
    for (proxy, path) in [
        (&trusting, "/users/1/orders"),
        (&knowing, "/users/2/orders"),
    ] {
        let request = Request::get(proxy.url(path))
            .header("x-forwarded-for", "203.0.113.9")
            .header("forwarded", "for=192.0.2.66")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    }
    let line = lines.of("GET", "/users/1/orders").await;
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    let line = lines.of("GET", "/users/2/orders").await;
    assert_eq!(line["client"], "203.0.113.9", "{line}");
}

/// On a dual-stack listener an IPv4 client is `::ffff:a.b.c.d` to the
/// socket; the access line and `X-Forwarded-For` write it as the IPv4
/// address it is (review28c F7). Skipped where IPv6 cannot be bound.
#[tokio::test]
async fn a_dual_stack_listener_logs_and_forwards_ipv4_clients_as_ipv4() {
    let (lines, _guard) = AccessLines::capture();
    let Ok(listener) = tokio::net::TcpListener::bind("[::]:0").await else {
        eprintln!("no IPv6 here: skipped");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy_on(config_for(&[&backend]), listener).await;
    let url = format!("http://127.0.0.1:{port}/echo/headers");
    let answer = get(&client(), &url).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(seen["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    let line = lines.of("GET", "/echo/headers").await;
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert!(line.get("peer").is_none(), "{line}");
    drop(proxy);
}

/// A GET whose first attempt met a closed port and was retried on the
/// other backend: its line says so and names the backend that answered,
/// and the upstream counts the retry.
#[tokio::test]
async fn a_retried_attempt_shows_in_the_access_line_and_the_metrics() {
    let (lines, _guard) = AccessLines::capture();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let live = start_backend(BackendOptions::new("b1")).await;
    let mut config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![dead, live.addr()],
    );
    config.upstreams[0].name = "two".into();
    let proxy = start_proxy(config).await;
    for path in ["/health", "/echo/headers"] {
        assert_eq!(
            get(&client(), &proxy.url(path)).await.status,
            StatusCode::OK
        );
    }
    let line = lines
        .first("a retried GET", |line| line["retries"] == 1)
        .await;
    assert_eq!(line["backend"], live.addr().to_string(), "{line}");
    // The first GET's first pick is the closed port; the second's may be.
    let retried = scraped(&proxy, "portico_upstream_retries_total{upstream=\"two\"}");
    assert!((1..=2).contains(&retried), "{retried}");
    let exhausted = "portico_upstream_retries_budget_exhausted_total{upstream=\"two\"}";
    assert_eq!(scraped(&proxy, exhausted), 0);
}

/// A GET sent again because the backend closed its pooled connection as it
/// arrived (the keep-alive race) says so in its access line, as the
/// retries metric counts it (review39d L2: the metric counted a resend no
/// line showed).
#[tokio::test]
async fn a_keep_alive_race_resend_shows_in_the_access_line() {
    use tokio::io::AsyncWriteExt;
    let (lines, _guard) = AccessLines::capture();
    // Answers a connection's first request, then closes it as the next
    // one arrives.
    let backend = serve_each(|mut stream| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if stream.write_all(ok).await.is_ok() {
            let _ = read_head(&mut stream).await;
        }
    })
    .await;
    let mut config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![backend],
    );
    config.upstreams[0].name = "raced".into();
    config.upstreams[0].retries = 0;
    let proxy = start_proxy(config).await;
    for path in ["/first", "/second"] {
        assert_eq!(
            get(&client(), &proxy.url(path)).await.status,
            StatusCode::OK
        );
    }
    let line = lines.of("GET", "/second").await;
    assert_eq!(line["retries"], 1, "{line}");
    let first = lines.of("GET", "/first").await;
    assert!(first.get("retries").is_none(), "{first}");
    let retried = scraped(&proxy, "portico_upstream_retries_total{upstream=\"raced\"}");
    assert_eq!(retried, 1);
}

/// A retry after a refused connect is not taken from the retry budget:
/// the backend was given nothing to do. Past the budget's 100 a window,
/// a burst that met one dead backend got 502s while the others were free
/// (review33b F3).
#[tokio::test]
async fn retries_of_refused_connects_are_not_taken_from_the_budget() {
    let (a, _held_a) = refusing_addr();
    let (b, _held_b) = refusing_addr();
    let dead = vec![a, b];
    // Closed: every attempt meets a refusal, ejected or not (when all are
    // out, ejected backends take traffic again).
    let mut config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], dead);
    config.upstreams[0].name = "dead".into();
    // Room for more than the one retry each request makes: once both
    // backends refused, neither is tried again (review37a L1).
    config.upstreams[0].retries = 5;
    let proxy = start_proxy(config).await;
    let client = client();
    // Past 100 + 20% of them: the budget would have refused some.
    for _ in 0..200 {
        let answer = get(&client, &proxy.url("/x")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    }
    let retried = scraped(&proxy, "portico_upstream_retries_total{upstream=\"dead\"}");
    assert_eq!(retried, 200);
    let exhausted = "portico_upstream_retries_budget_exhausted_total{upstream=\"dead\"}";
    assert_eq!(scraped(&proxy, exhausted), 0);
}

/// The access lines written on the test's thread (where its proxies and
/// backends run: `#[tokio::test]` keeps every task on it), as JSON.
struct AccessLines(Arc<std::sync::Mutex<Vec<u8>>>);

impl AccessLines {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        Self::capture_of("portico::access=info")
    }

    /// [`AccessLines::capture`] of the records `filter` lets through.
    fn capture_of(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        // While one `Dispatch` is registered process-wide, tracing-core
        // caches a callsite first hit on another test's thread (which has
        // no subscriber) as never enabled, here too (tokio-rs/tracing#3611):
        // the line of this test is then never written. A second dispatch,
        // alive for the whole run, sends every callsite down the path that
        // asks all live subscribers.
        static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(filter)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        (
            AccessLines(lines),
            tracing::subscriber::set_default(subscriber),
        )
    }

    /// The first line for `method` and `path`, once written (within
    /// [`STEP`]).
    async fn of(&self, method: &str, path: &str) -> serde_json::Value {
        self.first(&format!("{method} {path}"), |line| {
            line["method"] == method && line["path"] == path
        })
        .await
    }

    /// Closes `stream` once its request reached `backend`, and checks the
    /// line for `method` and `path` says the client left before its
    /// answer: 499, `client_gone`, no time to a head.
    async fn left_while(
        &self,
        backend: &portico::sample::RunningBackend,
        stream: tokio::net::TcpStream,
        method: &str,
        path: &str,
    ) {
        at_backend(backend, 1).await;
        drop(stream);
        let line = self.of(method, path).await;
        assert_eq!(
            (&line["status"], &line["end"]),
            (&499.into(), &"client_gone".into()),
            "{line}"
        );
        assert!(line.get("head_ms").is_none(), "{line}");
    }

    /// The first line that is `wanted`, once written (within [`STEP`]).
    async fn first(
        &self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let found = tokio::time::timeout(STEP, async {
            loop {
                let written = self.0.lock().unwrap().clone();
                let line = written
                    .split(|&b| b == b'\n')
                    .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
                    .find(&wanted);
                if let Some(line) = line {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        found.await.unwrap_or_else(|_| {
            let written = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            panic!("no access line for {what} within STEP in:\n{written}")
        })
    }
}

/// Sends `ask` on a fresh connection to `addr` and closes it once the
/// answer has begun: a client that leaves during the body.
async fn leave_once_answered(addr: std::net::SocketAddr, ask: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(ask.as_bytes()).await.unwrap();
    let mut some = [0u8; 4096];
    let read = tokio::time::timeout(STEP, stream.read(&mut some)).await;
    assert!(
        read.is_ok_and(|n| n.is_ok_and(|n| n > 0)),
        "the answer began"
    );
}

struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The access line is written when the response is over, as nginx's and
/// HAProxy's are: the bytes the client was handed, the time to the end
/// and to the head, and how it ended (whole, cut by the backend, or left
/// by the client, before its head or during its body).
#[tokio::test]
async fn the_access_line_says_what_was_sent_and_how_the_response_ended() {
    use tokio::io::AsyncWriteExt;
    let (lines, _guard) = AccessLines::capture();
    let mut slow = BackendOptions::new("slow");
    slow.delay = Duration::from_secs(2);
    let (backend, slow) = (
        start_backend(BackendOptions::new("b1")).await,
        start_backend(slow).await,
    );
    let proxy = start_proxy(config_for(&[&backend])).await;

    // Whole, over HTTP/1.1 and HTTP/2 (where bodies go out in slices).
    for (client, path) in [(client(), "/bytes/70000"), (h2c_client(), "/bytes/70001")] {
        assert_eq!(
            get(&client, &proxy.url(path)).await.body.len(),
            70000 + usize::from(path.ends_with('1'))
        );
        let line = lines.of("GET", path).await;
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["end"], "done", "{line}");
        assert_eq!(
            line["bytes"],
            70000 + u64::from(path.ends_with('1')),
            "{line}"
        );
        let (head, total) = (line["head_ms"].as_f64(), line["duration_ms"].as_f64());
        assert!(head.is_some_and(|head| head <= total.unwrap()), "{line}");
    }
    // A HEAD gets its GET's length declared and no body.
    let head = Request::head(proxy.url("/bytes/500"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&client(), head).await.status, StatusCode::OK);
    let line = lines.of("HEAD", "/bytes/500").await;
    assert_eq!(
        (&line["bytes"], &line["end"]),
        (&0.into(), &"done".into()),
        "{line}"
    );

    // The client leaves during the body: what it was handed, no more.
    let big = 32 * 1024 * 1024;
    let ask = format!("GET /bytes/{big} HTTP/1.1\r\nHost: a\r\n\r\n");
    leave_once_answered(proxy.addr, &ask).await;
    let line = lines.of("GET", &format!("/bytes/{big}")).await;
    assert_eq!(
        (&line["status"], &line["end"]),
        (&200.into(), &"client_gone".into()),
        "{line}"
    );
    let bytes = line["bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes < big, "{line}");

    // The client leaves before the head: 499, no time to a head.
    let proxy_to_slow = start_proxy(config_for(&[&slow])).await;
    let mut stream = tokio::net::TcpStream::connect(proxy_to_slow.addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET /users/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    lines.left_while(&slow, stream, "GET", "/users/1").await;

    // The backend cuts the body: the status it sent, what came of the body.
    let cut =
        scripted_backend(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").await;
    let config =
        portico::config::Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![cut]);
    let proxy_to_cut = start_proxy(config).await;
    raw_exchange(proxy_to_cut.addr, b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let line = lines.of("GET", "/cut").await;
    assert_eq!(
        (&line["status"], &line["bytes"]),
        (&200.into(), &10.into()),
        "{line}"
    );
    assert_eq!(line["end"], "backend_broken", "{line}");
}

/// A cache hit goes out in pieces, at its client's pace: its line is
/// written when the last of it went out, and says so when the client
/// left first, as a relayed body's does.
#[tokio::test]
async fn the_access_line_of_a_large_hit_waits_for_its_client() {
    let (lines, _guard) = AccessLines::capture();
    let backend = start_backend(BackendOptions::new("b1")).await;
    let proxy = start_proxy(with_cache(config_for(&[&backend]))).await;
    let (size, path) = (8_000_000, "/bytes/8000000");
    assert_eq!(get(&client(), &proxy.url(path)).await.body.len(), size);
    // The host the stored copy is keyed on.
    let ask = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr);
    leave_once_answered(proxy.addr, &ask).await;
    let hit = lines
        .first("the hit", |line| line["cache"] == "portico; hit")
        .await;
    assert_eq!(hit["end"], "client_gone", "{hit}");
    let bytes = hit["bytes"].as_u64().unwrap();
    assert!(bytes < size as u64, "{hit}");
}

/// A client that ends its connection in the middle of its upload is
/// logged and counted as gone (499) when nothing was answered yet, and
/// its cut answer as `upload_failed`, not as the backend's doing, when the
/// backend had begun answering.
#[tokio::test]
async fn an_upload_its_client_abandons_is_the_client_s_in_the_log() {
    use tokio::io::AsyncWriteExt;
    let (lines, _guard) = AccessLines::capture();
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].name = "orders".into();
    let proxy = start_proxy(config).await;
    let send_part = |target: &'static str| {
        let addr = proxy.addr;
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head =
                format!("POST {target} HTTP/1.1\r\nHost: a\r\nContent-Length: 1500000\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&[b'x'; 50_000]).await.unwrap();
            stream
        }
    };

    // The order backend reads the whole order (under its 2 MiB limit)
    // before it answers.
    let stream = send_part("/users/1/orders").await;
    lines
        .left_while(&backend, stream, "POST", "/users/1/orders")
        .await;
    let attempt = format!(
        "portico_upstream_requests_total{{backend=\"{}\",code=\"499\",upstream=\"orders\"}}",
        backend.addr()
    );
    assert_eq!(scraped(&proxy, &attempt), 1);

    // `/echo` streams the upload back as it comes: answered before its end.
    let mut stream = send_part("/echo").await;
    let mut some = [0u8; 4096];
    let read =
        tokio::time::timeout(STEP, tokio::io::AsyncReadExt::read(&mut stream, &mut some)).await;
    assert!(
        read.is_ok_and(|n| n.is_ok_and(|n| n > 0)),
        "the answer began"
    );
    drop(stream);
    cut_with_its_upload(&lines, &proxy, &backend).await;
}

/// Trailers are a response's last frame: hyper polls no further after
/// them, over either protocol, and the line says the response went out
/// whole (review27c).
#[tokio::test]
async fn a_response_ending_in_trailers_is_logged_whole() {
    let (lines, _guard) = AccessLines::capture();
    let backend = scripted_backend(|_| {
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n"
    })
    .await;
    let config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![backend],
    );
    let proxy = start_proxy(config).await;
    let ask = b"GET /h1 HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    raw_exchange(proxy.addr, ask).await;
    assert_eq!(get(&h2c_client(), &proxy.url("/h2")).await.body, "hello");
    for path in ["/h1", "/h2"] {
        let line = lines.of("GET", path).await;
        assert_eq!(
            (&line["end"], &line["bytes"]),
            (&"done".into(), &5.into()),
            "{line}"
        );
    }
}

/// A backend that answers before the upload's end, reads it whole, and
/// then breaks its own body is blamed: only an upload that failed
/// excuses it (review27c).
#[tokio::test]
async fn a_body_broken_after_the_upload_ended_is_the_backend_s() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (lines, _guard) = AccessLines::capture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = read_head(&mut stream).await.unwrap();
        let (end, length) = head_end_and_length(&got);
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
        stream.write_all(head).await.unwrap();
        let mut buf = [0u8; 4096];
        while got.len() < end + length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        // The upload is in; the backend dies in the middle of its body.
    });
    let mut config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![backend],
    );
    config.upstreams[0].name = "cut".into();
    let proxy = start_proxy(config).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n";
    stream.write_all(head).await.unwrap();
    let mut some = [0u8; 4096];
    let began = tokio::time::timeout(STEP, stream.read(&mut some)).await;
    assert!(
        began.is_ok_and(|n| n.is_ok_and(|n| n > 0)),
        "the answer began"
    );
    stream.write_all(b"0123456789").await.unwrap();
    let line = lines.of("POST", "/up").await;
    assert_eq!(line["end"], "backend_broken", "{line}");
    let broken = format!(
        "portico_upstream_body_errors_total{{backend=\"{backend}\",reason=\"broken\",upstream=\"cut\"}}"
    );
    assert_eq!(scraped(&proxy, &broken), 1);
}

/// Over HTTP/2 too, an upload that outgrows `max_request_body` after the
/// backend began answering cuts the answer as the client's doing, not the
/// backend's (review27d F1: an HTTP/2 upload keeps no other handle once
/// its request is sent).
#[tokio::test]
async fn an_http2_upload_that_fails_mid_answer_is_the_client_s() {
    let (lines, _guard) = AccessLines::capture();
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].name = "orders".into();
    config.server.max_request_body = 64 * 1024;
    let proxy = start_proxy(config).await;
    let mut client = h2_frames_client(proxy.addr).await;
    let request = Request::post(proxy.url("/echo")).body(()).unwrap();
    let (response, mut upload) = client.send_request(request, false).unwrap();
    upload
        .send_data(Bytes::from(vec![b'x'; 1000]), false)
        .unwrap();
    // `/echo` answers as the upload comes.
    let response = tokio::time::timeout(STEP, response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for _ in 0..8 {
        let _ = upload.send_data(Bytes::from(vec![b'x'; 16 * 1024]), false);
    }
    let mut body = response.into_body();
    let read = tokio::time::timeout(STEP, async {
        while let Some(Ok(data)) = body.data().await {
            let _ = body.flow_control().release_capacity(data.len());
        }
    });
    assert!(read.await.is_ok(), "the answer ended");
    cut_with_its_upload(&lines, &proxy, &backend).await;
}

/// An attempt that sent the backend a cut upload counts under the
/// upstream with how it ended, as a 499 does: a chunked upload outgrowing
/// `max_request_body` reached the backend before the limit did
/// (review27d F4).
#[tokio::test]
async fn an_upload_cut_at_the_limit_counts_as_an_attempt() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = config_for(&[&backend]);
    config.upstreams[0].name = "orders".into();
    config.server.max_request_body = 1024;
    let proxy = start_proxy(config).await;
    let chunk = format!("800\r\n{}\r\n", "x".repeat(0x800));
    let ask = format!(
        "POST /users/1/orders HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n"
    );
    let answer = raw_exchange(proxy.addr, ask.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let attempt = format!(
        "portico_upstream_requests_total{{backend=\"{}\",code=\"413\",upstream=\"orders\"}}",
        backend.addr()
    );
    assert_eq!(scraped(&proxy, &attempt), 1);
}

/// Checks that the answer to `POST /echo` (on upstream `orders`) was cut
/// with its client's failed upload: `upload_failed` in the log, nothing
/// counted against `backend`.
async fn cut_with_its_upload(
    lines: &AccessLines,
    proxy: &RunningProxy,
    backend: &portico::sample::RunningBackend,
) {
    let line = lines.of("POST", "/echo").await;
    assert_eq!(
        (&line["status"], &line["end"]),
        (&200.into(), &"upload_failed".into()),
        "{line}"
    );
    let broken = format!(
        "portico_upstream_body_errors_total{{backend=\"{}\",reason=\"broken\",upstream=\"orders\"}}",
        backend.addr()
    );
    assert_eq!(scraped(proxy, &broken), 0);
}

/// Keep-alive at work shows per backend: the connections opened for
/// requests (an active check's own are not: they would hide the reuse),
/// and those waiting in the pool, in the scrape and `/status` (soak53 4:
/// nothing said whether connections were reused, as HAProxy's
/// `idle_conn_cur` and Envoy's `upstream_cx_total` do).
#[tokio::test]
async fn backend_connections_opened_and_idle_are_exported() {
    let backend = start_backend(BackendOptions::new("b1")).await;
    let mut config = portico::config::Config::single_upstream(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![backend.addr()],
    );
    config.upstreams[0].health = Some(portico::config::HealthCheck {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 100,
        ..Default::default()
    });
    let proxy = start_proxy_with_admin(config, None, None).await;
    let series = |name: &str| {
        format!(
            "{name}{{backend=\"{}\",upstream=\"default\"}} ",
            backend.addr()
        )
    };
    let value = |text: &str, name: &str| -> u64 {
        let line =
            metric_line(text, &series(name)).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let scrape = || async {
        String::from_utf8(
            get(&client(), &proxy.admin_url("/metrics"))
                .await
                .body
                .to_vec(),
        )
        .unwrap()
    };
    tokio::time::timeout(STEP, async {
        // Each check is a request the backend counts.
        while backend.requests() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("two checks within STEP");
    let text = scrape().await;
    assert_eq!(
        value(&text, "portico_backend_connections_opened_total"),
        0,
        "{text}"
    );
    assert_eq!(
        value(&text, "portico_backend_connections_idle"),
        0,
        "{text}"
    );

    let client = client();
    for _ in 0..5 {
        assert_eq!(
            get(&client, &proxy.url("/users/1/orders")).await.status,
            StatusCode::OK
        );
    }
    // Put back as its response ends, which may be just after the client
    // has it.
    let text = tokio::time::timeout(STEP, async {
        loop {
            let text = scrape().await;
            if value(&text, "portico_backend_connections_idle") >= 1 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a connection idle in the pool within STEP");
    let (opened, idle) = (
        value(&text, "portico_backend_connections_opened_total"),
        value(&text, "portico_backend_connections_idle"),
    );
    assert!((1..=5).contains(&opened), "{text}");
    assert!(idle <= opened, "{text}");
    let status = get(&client, &proxy.admin_url("/status")).await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    let listed = status["upstreams"][0]["backends"][0]["idle_connections"].as_u64();
    assert!(listed.is_some_and(|n| n <= opened), "{status}");
    // A tunnel's connection is never reused, and not counted (review56
    // L5: it made a WebSocket backend's keep-alive look broken).
    let mut tunnel = open_echo_tunnel(proxy.addr).await;
    ping(&mut tunnel).await;
    let text = scrape().await;
    assert_eq!(
        value(&text, "portico_backend_connections_opened_total"),
        opened,
        "{text}"
    );
}
