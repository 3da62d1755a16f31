//! Micro-benchmarks of the per-request work: routing, header hygiene,
//! backend selection, a cache hit (key, lookup, response head) and the
//! limiter check. `cargo bench`; these are measurements, not tests.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use portico::cache::policy::{self, Timing};
use portico::cache::{key, Cache, Entry};
use portico::config::{Config, HostMatch, RateLimit, Route};
use portico::limit::Limiter;
use portico::metrics::Metrics;
use portico::proxy::headers::{self, ClientInfo, Hop};
use portico::proxy::route::Router;
use portico::upstream::select::{self, Candidate};

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "api.example.com"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("connection", "keep-alive"),
        ("x-forwarded-for", "203.0.113.9"),
    ] {
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    h
}

fn routing(c: &mut Criterion) {
    let route = |host: HostMatch, prefix: &str| Route::new(host, prefix, 0, prefix);
    let router = Router::new(&[
        route(HostMatch::Any, "/"),
        route(HostMatch::Any, "/static/"),
        route(HostMatch::Suffix(".example.com".into()), "/"),
        route(HostMatch::Exact("api.example.com".into()), "/v1/"),
        route(HostMatch::Exact("api.example.com".into()), "/v2/orders/"),
    ]);
    c.bench_function("route lookup (5 routes)", |b| {
        b.iter(|| {
            router.find(
                black_box(Some("API.example.com:443")),
                black_box("/v2/orders/123"),
            )
        })
    });
}

fn hygiene(c: &mut Criterion) {
    let template = request_headers();
    let host = HeaderValue::from_static("api.example.com");
    // Made once per connection.
    let client = headers::forwarded_for("192.0.2.1".parse().unwrap());
    let info = ClientInfo {
        ip: &client,
        proto: "http",
        host: Some(&host),
        version: Version::HTTP_11,
        trusted: None,
    };
    // Made once per proxy.
    let name = headers::Pseudonym::random();
    c.bench_function("request header hygiene", |b| {
        b.iter_batched(
            || template.clone(),
            |mut h| {
                headers::prepare_request(&mut h, info, false, Hop::of(info, &name));
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn balancing(c: &mut Criterion) {
    let candidates: Vec<Candidate> = (0..8)
        .map(|i| Candidate::warm(i != 3, 1 + i % 3, (i * 7 % 5) as usize))
        .collect();
    let cycle = select::weighted_cycle(&candidates);
    let mut n = 0usize;
    c.bench_function("balancer pick: weighted round-robin", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(cycle[n % cycle.len()])
        })
    });
    c.bench_function("balancer pick: least_conn (8 backends)", |b| {
        b.iter(|| select::least_conn(8, black_box(5), |i| candidates[i]))
    });
    c.bench_function("balancer pick: random_two (8 backends)", |b| {
        b.iter(|| select::random_two(8, black_box(2), black_box(6), |i| candidates[i]))
    });
    c.bench_function(
        "balancer pick: hash, key and rendezvous (8 backends)",
        |b| {
            let seed = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            b.iter(|| {
                let mut key = select::StableHash::new();
                key.write(black_box(b"/products/1234?color=blue"));
                select::rendezvous(8, key.finish(), seed, |i| candidates[i])
            })
        },
    );
}

fn cache_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = runtime.block_on(async {
        let cache = Cache::new(
            portico::config::Cache::default(),
            std::sync::Arc::new(Metrics::new()),
        );
        let mut stored = HeaderMap::new();
        stored.insert(
            "cache-control",
            HeaderValue::from_static("public, max-age=600"),
        );
        stored.insert("content-type", HeaderValue::from_static("application/json"));
        stored.insert("etag", HeaderValue::from_static("\"u1-v1\""));
        let now = SystemTime::now();
        let entry = Entry::new(
            StatusCode::OK,
            None,
            stored.clone(),
            Bytes::from(vec![b'x'; 1024]),
            Timing::new(&stored, now, now),
            Duration::from_secs(600),
            policy::parse(&stored),
        );
        let primary = key::primary("http", "api.example.com", "/users/1/orders");
        let fill = cache.begin_fill(primary);
        cache.insert(&fill, &request_headers(), entry).await;
        cache
    });
    let request = request_headers();
    c.bench_function("cache hit: key + lookup + response head", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let primary = key::primary("http", "api.example.com", black_box("/users/1/orders"));
                let full = cache.key_for(&primary, &request).expect("stored");
                let entry = cache.get(&full).await.expect("hit");
                let age = entry.timing.current_age(SystemTime::now());
                let mut head = entry.headers.clone();
                head.insert(http::header::AGE, HeaderValue::from(age.as_secs()));
                (head, entry.body.clone())
            })
        })
    });
}

fn limiter(c: &mut Criterion) {
    let _runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = Config::single_upstream(vec![], vec!["127.0.0.1:1".parse().unwrap()]);
    config.rate_limit = Some(RateLimit {
        requests_per_second: 1e9,
        burst: 1_000_000_000,
        ..RateLimit::default()
    });
    config.routes[0].rate_limit = true;
    let limiter = Limiter::new(&config).unwrap();
    let headers = request_headers();
    let peer: SocketAddr = "198.51.100.7:5000".parse().unwrap();
    c.bench_function("limiter: client key + GCRA check", |b| {
        b.iter(|| {
            let client = portico::limit::client::client_ip(
                black_box(peer),
                &headers,
                &[],
                portico::config::TrustedFields::Either,
            );
            let key = limiter.key(client, &headers).expect("no key field");
            limiter.check(0, &key)
        })
    });
}

criterion_group!(benches, routing, hygiene, balancing, cache_hit, limiter);
criterion_main!(benches);
