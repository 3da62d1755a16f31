//! Balancing around a failing backend and a drained one, over real
//! sockets: a retry must not move the rotation, and weight 0 takes a
//! backend out of it (and a reload puts it back) without cutting what it
//! is still answering.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::StatusCode;
use portico::config::{Balance, Config, HashKey, HealthCheck};
use tokio::sync::Notify;

/// Answers nothing: reads a request head and closes, which the proxy
/// retries elsewhere (a connection lost before the response head).
fn close_at_once(_head: &str) -> &'static [u8] {
    b""
}

/// Checks an hour apart, which never run here, whose `fall` of 100 keeps
/// passive ejection (after `fall` failures) out of a test's counts.
fn never_ejecting() -> HealthCheck {
    HealthCheck {
        path: "/health".into(),
        interval: Duration::from_secs(3600),
        timeout: Duration::from_secs(1),
        rise: 1,
        fall: 100,
        host: None,
    }
}

#[tokio::test]
async fn a_failing_backend_is_tried_first_by_its_share_and_its_retries_are_spread() {
    for balance in [Balance::RoundRobin, Balance::LeastConn] {
        let (failing, attempts) = counted_scripted_backend(close_at_once).await;
        let backends = start_backends(2).await;
        let mut config = Config::single_upstream(
            vec![],
            vec![failing, backends[0].addr(), backends[1].addr()],
        );
        let upstream = &mut config.upstreams[0];
        upstream.balance = balance.clone();
        upstream.health = Some(never_ejecting());
        let proxy = start_proxy(config).await;
        let client = client();
        for _ in 0..30 {
            let answer = get(&client, &proxy.url("/health")).await;
            assert_eq!(answer.status, StatusCode::OK, "{balance:?}");
        }
        // A retry that took the rotation's next turn made the failing
        // backend first choice of every other request (15 of 30), and its
        // neighbour the taker of every retry.
        let served = [backends[0].requests(), backends[1].requests()];
        assert_eq!(
            (attempts.load(Ordering::SeqCst), served),
            (10, [15, 15]),
            "{balance:?}"
        );
        proxy.stop().await;
    }
}

/// The config file of the drain test: one upstream over `backends`,
/// weighted as given, checked every half second.
fn write_weighted(file: &std::path::Path, backends: &[(std::net::SocketAddr, u32)]) {
    let list: Vec<String> = backends
        .iter()
        .map(|(addr, weight)| format!("{{ addr = \"{addr}\", weight = {weight} }}"))
        .collect();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"u\"\nbackends = [{}]\n\
         [upstream.health]\npath = \"/health\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\n\
         [[route]]\nupstream = \"u\"\n",
        list.join(", ")
    );
    std::fs::write(file, text).unwrap();
}

#[tokio::test]
async fn weight_zero_drains_a_backend_on_reload_and_weight_one_brings_it_back() {
    let release = Arc::new(Notify::new());
    let b1 = start_backend(portico::sample::BackendOptions::new("b1")).await;
    let b2 = holding_backend("b2", release.clone()).await;
    let b3 = start_backend(portico::sample::BackendOptions::new("b3")).await;
    let (dir, file) = config_dir("balance-drain");
    let weighted = |w2| [(b1.addr(), 1), (b2, w2), (b3.addr(), 1)];
    write_weighted(&file, &weighted(1));
    let config = portico::config::load(&file).unwrap();
    let proxy = start_proxy_with_admin(config, None, Some(file.clone())).await;
    assert_eq!(
        proxy.spread(30).await,
        counts(&[("b1", 10), ("b2", 10), ("b3", 10)])
    );

    // Turn 30 is b1's, turn 31 b2's: a request b2 holds until released.
    proxy.spread(1).await;
    let held = tokio::spawn({
        let (client, url) = (client(), proxy.url("/hold"));
        async move { get(&client, &url).await }
    });
    proxy
        .wait_until("the held request to reach b2", |s| s[1].in_flight == 1)
        .await;

    write_weighted(&file, &weighted(0));
    proxy.shared.reload().expect("weight 0 is a valid config");
    let status = proxy.backend_status();
    assert!(status[1].drained && !status[0].drained, "{status:?}");
    // Still checked and healthy, and its request still counted on it.
    assert!(status[1].up && status[1].in_flight == 1, "{status:?}");
    let json = get(&client(), &proxy.admin_url("/status")).await;
    let json: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(json["upstreams"][0]["backends"][1]["drained"], true);
    assert_eq!(json["upstreams"][0]["backends"][0]["drained"], false);
    assert_eq!(proxy.spread(20).await, counts(&[("b1", 10), ("b3", 10)]));

    // The request it held when drained finishes there.
    release.notify_one();
    let answer = tokio::time::timeout(STEP, held)
        .await
        .expect("held request answered in time")
        .unwrap();
    assert_eq!(
        (answer.status, answer.header("x-backend")),
        (StatusCode::OK, "b2")
    );

    write_weighted(&file, &weighted(1));
    proxy.shared.reload().expect("weight back to 1");
    assert!(!proxy.backend_status()[1].drained);
    assert_eq!(
        proxy.spread(30).await,
        counts(&[("b1", 10), ("b2", 10), ("b3", 10)])
    );

    // Every backend drained: 503 (not 502: nothing tried), saying why,
    // and not ready.
    write_weighted(&file, &[(b1.addr(), 0), (b2, 0), (b3.addr(), 0)]);
    proxy
        .shared
        .reload()
        .expect("all drained is a valid config");
    let answer = get(&client(), &proxy.url("/health")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        &answer.body[..],
        b"503 Service Unavailable: every backend is drained\n"
    );
    assert_eq!(answer.header("retry-after"), "1");
    let ready = get(&client(), &proxy.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A backend that holds each request until `release` lets one go, and
/// notes the targets in the order they reach it.
async fn holding_in_order(release: Arc<Notify>) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::AsyncWriteExt;
    let order = Arc::new(Mutex::new(Vec::new()));
    let noted = order.clone();
    let addr = serve_each(move |mut stream| {
        let (order, release) = (noted.clone(), release.clone());
        async move {
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            let target = target_of(&String::from_utf8_lossy(&head)).to_owned();
            order.lock().unwrap().push(target);
            release.notified().await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;
    (addr, order)
}

/// A GET of `path` in a task of its own, once it holds the first
/// backend's only slot.
async fn held_at_backend(proxy: &RunningProxy, path: &str) -> tokio::task::JoinHandle<Answer> {
    let held = proxy.spawn_get(path);
    proxy
        .wait_until("the first request to reach the backend", |s| {
            s[0].in_flight == 1
        })
        .await;
    held
}

/// One upstream over `backends`, the first capped at `max_conns`.
fn capped(backends: Vec<std::net::SocketAddr>, max_conns: u32, queue_timeout: Duration) -> Config {
    let mut config = Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], backends);
    config.upstreams[0].backends[0].max_conns = max_conns;
    config.upstreams[0].queue_timeout = queue_timeout;
    config
}

/// What [`holding_capped`] started.
struct Held {
    proxy: RunningProxy,
    config: Config,
    /// Lets one request the backend holds go.
    release: Arc<Notify>,
    /// The targets in the order they reached the backend.
    order: Arc<Mutex<Vec<String>>>,
}

/// A proxy in front of one [`holding_in_order`] backend capped at
/// `max_conns`.
async fn holding_capped(max_conns: u32, queue_timeout: Duration) -> Held {
    let release = Arc::new(Notify::new());
    let (backend, order) = holding_in_order(release.clone()).await;
    let config = capped(vec![backend], max_conns, queue_timeout);
    let proxy = start_proxy(config.clone()).await;
    Held {
        proxy,
        config,
        release,
        order,
    }
}

impl Held {
    /// Lets the backend answer one request at a time, each of `answers`
    /// in turn answered 200.
    async fn answer_in_turn(
        &self,
        answers: impl IntoIterator<Item = tokio::task::JoinHandle<Answer>>,
    ) {
        for answer in answers {
            self.release.notify_one();
            let answer = tokio::time::timeout(STEP, answer)
                .await
                .expect("answered once its turn came")
                .unwrap();
            assert_eq!(answer.status, StatusCode::OK);
        }
    }

    /// `/held` at the backend, in its only slot, and `path` in line.
    async fn one_held_one_waiting(
        &self,
        path: &str,
    ) -> (
        tokio::task::JoinHandle<Answer>,
        tokio::task::JoinHandle<Answer>,
    ) {
        let held = held_at_backend(&self.proxy, "/held").await;
        let waiting = self.proxy.spawn_get(path);
        self.proxy.wait_queued(1).await;
        (held, waiting)
    }
}

/// `max_conns`: a backend at its cap is sent nothing more; requests past
/// it wait in line and reach it in the order they came, one as each slot
/// frees (HAProxy's `maxconn` and queue).
#[tokio::test]
async fn requests_past_max_conns_wait_in_line_and_go_in_order() {
    let Held {
        proxy,
        release,
        order,
        ..
    } = holding_capped(1, STEP).await;
    let mut answers = vec![held_at_backend(&proxy, "/1").await];
    for n in 2..=4 {
        answers.push(proxy.spawn_get(&format!("/{n}")));
        proxy.wait_queued(n - 1).await;
    }
    assert_eq!(order.lock().unwrap().len(), 1, "sent past its max_conns");
    for (n, answer) in answers.into_iter().enumerate() {
        release.notify_one();
        let answer = tokio::time::timeout(STEP, answer)
            .await
            .expect("answered once its turn came")
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert!(proxy.backend_status()[0].in_flight <= 1);
        // The next is sent as this one's slot frees.
        proxy.wait_queued(2usize.saturating_sub(n)).await;
    }
    assert_eq!(*order.lock().unwrap(), ["/1", "/2", "/3", "/4"]);
    proxy.stop().await;
}

/// With every backend at its `max_conns` for `queue_timeout` (0: no
/// waiting at all), a request is answered 503 and counted; a backup does
/// not take the overflow (HAProxy's backups do not either).
#[tokio::test]
async fn a_request_finding_no_room_within_queue_timeout_gets_a_503() {
    let backup = start_backend(portico::sample::BackendOptions::new("backup")).await;
    for queue_timeout in [Duration::ZERO, Duration::from_millis(200)] {
        let release = Arc::new(Notify::new());
        let (backend, order) = holding_in_order(release.clone()).await;
        let mut config = capped(vec![backend, backup.addr()], 1, queue_timeout);
        config.upstreams[0].backends[1].backup = true;
        let proxy = start_proxy(config).await;
        let held = held_at_backend(&proxy, "/held").await;
        let answer = get(&client(), &proxy.url("/turned-away")).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{queue_timeout:?}"
        );
        assert_eq!(
            &answer.body[..],
            b"503 Service Unavailable: every backend is busy\n"
        );
        assert_eq!(answer.header("retry-after"), "1");
        let metrics = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
        assert!(
            metrics.contains("portico_upstream_queue_rejected_total{upstream=\"default\"} 1"),
            "{queue_timeout:?}"
        );
        assert_eq!(proxy.queued(), 0);
        release.notify_one();
        let held = tokio::time::timeout(STEP, held).await.unwrap().unwrap();
        assert_eq!(held.status, StatusCode::OK);
        assert_eq!(*order.lock().unwrap(), ["/held"]);
        proxy.stop().await;
    }
    assert_eq!(backup.requests(), 0);
}

/// Requests in line when every backend goes down are told so at once (503
/// `no healthy backend`), not left to wait out `queue_timeout` and then
/// told "busy" (review44a M1: HAProxy keeps them its whole `timeout
/// queue`).
#[tokio::test]
async fn requests_in_line_when_every_backend_goes_down_are_told_so() {
    use tokio::io::AsyncWriteExt;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let release = Arc::new(Notify::new());
    let backend = serve_each({
        let (healthy, release) = (healthy.clone(), release.clone());
        move |mut stream| {
            let (healthy, release) = (healthy.clone(), release.clone());
            async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let answer: &[u8] = if target_of(&String::from_utf8_lossy(&head)) == "/health" {
                    if healthy.load(Ordering::SeqCst) {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    } else {
                        b"HTTP/1.1 503 Down\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    }
                } else {
                    release.notified().await;
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                };
                let _ = stream.write_all(answer).await;
            }
        }
    })
    .await;
    let mut config = capped(vec![backend], 1, STEP * 3);
    config.upstreams[0].health = Some(HealthCheck {
        path: "/health".into(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(50),
        rise: 1,
        fall: 1,
        host: None,
    });
    let proxy = start_proxy(config).await;
    let held = held_at_backend(&proxy, "/held").await;
    let waiting = proxy.spawn_get("/waiting");
    proxy.wait_queued(1).await;
    healthy.store(false, Ordering::SeqCst);
    let answer = tokio::time::timeout(STEP, waiting)
        .await
        .expect("told well before its queue_timeout")
        .unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        &answer.body[..],
        b"503 Service Unavailable: no healthy backend\n"
    );
    let metrics = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(metrics.contains("portico_upstream_queue_rejected_total{upstream=\"default\"} 0"));
    release.notify_one();
    let held = tokio::time::timeout(STEP, held).await.unwrap().unwrap();
    assert_eq!(held.status, StatusCode::OK);
    proxy.stop().await;
}

/// A reload that lowers `max_conns` holds the requests already in line
/// to the new cap too: they wait for the old generation's requests to
/// bring the count under it (review44a L1: they went in under the old).
#[tokio::test]
async fn a_lower_max_conns_holds_the_requests_already_in_line() {
    let mut backend = holding_capped(2, STEP * 3).await;
    let proxy = &backend.proxy;
    let mut answers = vec![proxy.spawn_get("/1"), proxy.spawn_get("/2")];
    proxy
        .wait_until("two requests at the backend", |s| s[0].in_flight == 2)
        .await;
    answers.push(proxy.spawn_get("/3"));
    proxy.wait_queued(1).await;
    backend.config.upstreams[0].backends[0].max_conns = 1;
    let proxy = &backend.proxy;
    proxy.swap_in(&backend.config);
    assert_eq!(proxy.backend_status()[0].max_conns, Some(1));
    // One of the two ends: one is left, the cap is 1, /3 still waits.
    backend.answer_in_turn([answers.remove(0)]).await;
    // Longer than a request in line takes to look again (250 ms).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(proxy.queued(), 1, "sent past the lowered cap");
    assert_eq!(backend.order.lock().unwrap().len(), 2);
    // The other ends, and /3 goes.
    backend.answer_in_turn(answers).await;
    assert_eq!(*backend.order.lock().unwrap(), ["/1", "/2", "/3"]);
    backend.proxy.stop().await;
}

/// A reload that adds a backend while requests wait: a request that comes
/// after it goes to the new backend at once, not behind those still
/// waiting on the previous generation, which cannot see it (review44c
/// M2: it waited 4 s, they 5 s and a 503).
#[tokio::test]
async fn a_backend_added_by_a_reload_serves_new_requests_past_the_old_line() {
    let mut backend = holding_capped(1, STEP * 3).await;
    let added = start_backend(portico::sample::BackendOptions::new("added")).await;
    let (held, waiting) = backend.one_held_one_waiting("/waiting").await;
    backend.config.upstreams[0]
        .backends
        .push(portico::config::Backend {
            addr: added.addr(),
            weight: 1,
            max_conns: 1,
            backup: false,
        });
    let proxy = &backend.proxy;
    proxy.swap_in(&backend.config);
    let answer = tokio::time::timeout(STEP, get(&client(), &proxy.url("/health")))
        .await
        .expect("answered by the added backend");
    assert_eq!(
        (answer.status, answer.header("x-backend")),
        (StatusCode::OK, "added")
    );
    // The one waiting before the reload goes where it was waiting to.
    backend.answer_in_turn([held, waiting]).await;
    assert_eq!(*backend.order.lock().unwrap(), ["/held", "/waiting"]);
    backend.proxy.stop().await;
}

/// A request a reload left waiting is served before one that came after
/// the reload, for the same backend: the line is the upstream's across
/// reloads (review44d M1: with a line per generation, a slot freed by the
/// new generation's requests did not wake the old line, and under load
/// its requests were overtaken until their `queue_timeout`).
#[tokio::test]
async fn a_reload_keeps_the_line_in_order() {
    let mut backend = holding_capped(1, STEP * 3).await;
    let (held, before) = backend.one_held_one_waiting("/before").await;
    // A reload that changes another setting: the same backend.
    backend.config.upstreams[0].queue_timeout = STEP * 4;
    let proxy = &backend.proxy;
    proxy.swap_in(&backend.config);
    let after = proxy.spawn_get("/after");
    proxy.wait_queued(2).await;
    backend.answer_in_turn([held, before, after]).await;
    assert_eq!(
        *backend.order.lock().unwrap(),
        ["/held", "/before", "/after"]
    );
    backend.proxy.stop().await;
}

/// Where `balance = "hash"` sends each of `keys`: the backend that
/// answered a GET carrying it in `field`, 200 each.
async fn where_keys_go(proxy: &RunningProxy, field: &str, keys: &[String]) -> Vec<String> {
    let client = client();
    let mut went = Vec::with_capacity(keys.len());
    for key in keys {
        let request = http::Request::get(proxy.url("/health"))
            .header(field, key)
            .body(Default::default())
            .unwrap();
        let answer = send(&client, request).await;
        assert_eq!(answer.status, StatusCode::OK, "{key}");
        went.push(answer.header("x-backend").to_owned());
    }
    went
}

/// Each backend's count in `went`.
fn tally(went: &[String]) -> std::collections::HashMap<String, usize> {
    let mut seen = std::collections::HashMap::new();
    for name in went {
        *seen.entry(name.clone()).or_default() += 1;
    }
    seen
}

/// `balance = "hash"` keeps each key on one backend, whatever the order
/// of the list; a backend out (drained, or refusing connections) moves
/// its own keys only, to each one's next choice, spread over the others,
/// and they come back with it; a request without the key goes
/// round-robin.
#[tokio::test]
async fn hashing_keeps_each_key_on_its_backend_and_moves_only_those_of_one_out() {
    let backends = start_backends(3).await;
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.upstreams[0].balance = Balance::Hash(HashKey::Cookie("sid".into()));
    // No ejection: the refusing backend below is retried past on every
    // request that picks it (after `fall` failures it was passed over,
    // review45b L5).
    config.upstreams[0].health = Some(never_ejecting());
    let proxy = start_proxy(config.clone()).await;
    let keys: Vec<String> = (0..120)
        .map(|k| format!("theme=dark; sid=user-{k}"))
        .collect();
    let before = where_keys_go(&proxy, "cookie", &keys).await;
    // About a third each (40; 15 is nearly five deviations off).
    let seen = tally(&before);
    assert!(
        seen.len() == 3 && seen.values().all(|&n| n >= 15),
        "{seen:?}"
    );
    assert_eq!(where_keys_go(&proxy, "cookie", &keys).await, before);

    // The list in another order: the same backend for each key.
    let mut reversed = config.clone();
    reversed.upstreams[0].backends.reverse();
    proxy.swap_in(&reversed);
    assert_eq!(where_keys_go(&proxy, "cookie", &keys).await, before);

    // b2 drained: its keys go to b1 and b3 (some to each), the others
    // stay.
    let mut drained = config.clone();
    drained.upstreams[0].backends[1].weight = 0;
    proxy.swap_in(&drained);
    let after = where_keys_go(&proxy, "cookie", &keys).await;
    let mut moved = Vec::new();
    for (was, is) in before.iter().zip(&after) {
        if was == "b2" {
            moved.push(is.clone());
        } else {
            assert_eq!(was, is);
        }
    }
    let moved = tally(&moved);
    assert!(moved.len() == 2 && !moved.contains_key("b2"), "{moved:?}");

    // A fourth backend that refuses connections: the keys it ranks first
    // are retried on their next choice, which is where they went among
    // the three; no other key moves.
    let (refusing, _socket) = refusing_addr();
    let mut four = config.clone();
    let mut extra = four.upstreams[0].backends[0].clone();
    extra.addr = refusing;
    four.upstreams[0].backends.push(extra);
    proxy.swap_in(&four);
    assert_eq!(where_keys_go(&proxy, "cookie", &keys).await, before);

    // Back as it was: every key where it was.
    proxy.swap_in(&config);
    assert_eq!(where_keys_go(&proxy, "cookie", &keys).await, before);

    // Without the cookie (another one, or none): round-robin.
    let others: Vec<String> = (0..6).map(|k| format!("theme=t{k}")).collect();
    let seen = tally(&where_keys_go(&proxy, "cookie", &others).await);
    assert_eq!(seen, counts(&[("b1", 2), ("b2", 2), ("b3", 2)]));
    proxy.stop().await;
}

/// Requests without the key, among requests with it, go round-robin
/// over every backend: the keyed ones take no turn of the rotation
/// (review45b M1: each took one, and with two backends every keyless
/// request of a strict alternation went to one).
#[tokio::test]
async fn keyless_requests_among_hashed_ones_go_round_robin() {
    let backends = start_backends(2).await;
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.upstreams[0].balance = Balance::Hash(HashKey::Cookie("sid".into()));
    let proxy = start_proxy(config.clone()).await;
    let mixed: Vec<String> = (0..40)
        .map(|k| match k % 2 {
            0 => format!("sid=user-{k}"),
            _ => "theme=dark".to_owned(),
        })
        .collect();
    let went = where_keys_go(&proxy, "cookie", &mixed).await;
    let keyless: Vec<String> = went.into_iter().skip(1).step_by(2).collect();
    assert_eq!(tally(&keyless), counts(&[("b1", 10), ("b2", 10)]));
    let metrics = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(
        metrics.contains("portico_upstream_hash_keyless_total{upstream=\"default\"} 20"),
        "{metrics}"
    );
    // An upstream that hashes no more has no such series (review45c L2).
    let mut unhashed = config.clone();
    unhashed.upstreams[0].balance = Balance::RoundRobin;
    proxy.swap_in(&unhashed);
    let metrics = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(
        !metrics.contains("portico_upstream_hash_keyless_total{"),
        "{metrics}"
    );
    proxy.stop().await;
}

/// `backends` sample backends behind a proxy hashing on the field `name`
/// (`hash_key = "header:NAME"`).
async fn hashing_on_field(
    backends: usize,
    name: &'static str,
) -> (Vec<portico::sample::RunningBackend>, RunningProxy) {
    let backends = start_backends(backends).await;
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    let name = http::HeaderName::from_static(name);
    config.upstreams[0].balance = Balance::Hash(HashKey::Header(name));
    let proxy = start_proxy(config).await;
    (backends, proxy)
}

/// `hash_key = "header:X-Request-Id"` spreads requests without an id by
/// the one portico gives them, access log on or off (review50 L4: with
/// it off, the id came only on the way to the backend, after the pick,
/// and every such request went keyless).
#[tokio::test]
async fn requests_hashed_on_their_id_get_one_before_the_pick() {
    let (_backends, proxy) = hashing_on_field(2, "x-request-id").await;
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/health")).await.status, 200);
    }
    let metrics = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(
        metrics.contains("portico_upstream_hash_keyless_total{upstream=\"default\"} 0"),
        "{metrics}"
    );
    proxy.stop().await;
}

/// A header key is read as the client sent it, before portico adds its
/// own hop: requests without `Via` have no key, where portico's `Via` was
/// every such request's key, all on one backend (review45a L1).
#[tokio::test]
async fn a_header_key_is_read_as_the_client_sent_it() {
    let (_backends, proxy) = hashing_on_field(3, "via").await;
    assert_eq!(
        proxy.spread(6).await,
        counts(&[("b1", 2), ("b2", 2), ("b3", 2)])
    );
    // With one, each `Via` stays on its backend.
    let vias: Vec<String> = (0..30).map(|k| format!("1.1 cdn-{k}")).collect();
    let went = where_keys_go(&proxy, "via", &vias).await;
    assert!(tally(&went).len() > 1, "{went:?}");
    assert_eq!(where_keys_go(&proxy, "via", &vias).await, went);
    proxy.stop().await;
}

/// `hash_key = "client_ip"` reads the client's address as throttling
/// does, through `trusted_proxies`: each client forwarded by a trusted
/// balancer stays on its backend, and clients spread.
#[tokio::test]
async fn hashing_by_client_ip_reads_the_forwarded_client() {
    let backends = start_backends(3).await;
    let mut config = trusting_loopback(config_for(&backends.iter().collect::<Vec<_>>()));
    config.upstreams[0].balance = Balance::Hash(HashKey::ClientIp);
    let proxy = start_proxy(config).await;
    let clients: Vec<String> = (0..60).map(|k| format!("198.51.100.{k}")).collect();
    let went = where_keys_go(&proxy, "x-forwarded-for", &clients).await;
    let seen = tally(&went);
    assert!(
        seen.len() == 3 && seen.values().all(|&n| n >= 5),
        "{seen:?}"
    );
    assert_eq!(
        where_keys_go(&proxy, "x-forwarded-for", &clients).await,
        went
    );
    // A client's own address when not forwarded: one backend for all.
    let direct = proxy.spread(6).await;
    assert_eq!(direct.len(), 1, "{direct:?}");
    proxy.stop().await;
}

/// `slow_start`: a backend back in rotation (undrained here) takes about
/// a twentieth of its share at first, in every balance mode, and
/// `/status` says it warms; with every backend warming, requests are
/// shared as usual and none is turned away.
#[tokio::test]
async fn a_backend_undrained_takes_a_twentieth_of_its_share_at_first() {
    let cookie = Balance::Hash(HashKey::Cookie("sid".into()));
    for balance in [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::RandomTwo,
        cookie,
    ] {
        let backends = start_backends(2).await;
        let mut config = config_for(&backends.iter().collect::<Vec<_>>());
        config.upstreams[0].balance = balance.clone();
        // An hour: the share stays at its first twentieth for minutes.
        config.upstreams[0].slow_start = Duration::from_secs(3600);
        let mut drained = config.clone();
        drained.upstreams[0].backends[1].weight = 0;
        let proxy = start_proxy(drained.clone()).await;
        proxy.swap_in(&config);
        let warming: Vec<_> = proxy.backend_status().iter().map(|b| b.warming).collect();
        assert_eq!(warming, [None, Some(5)], "{balance:?}");
        let keys: Vec<String> = (0..600).map(|k| format!("sid=user-{k}")).collect();
        let went = tally(&where_keys_go(&proxy, "cookie", &keys).await);
        // About 15 to 30 of 600 (of its 300 when warm).
        let b2 = went.get("b2").copied().unwrap_or(0);
        assert!(b2 > 0 && b2 < 90, "{balance:?}: {went:?}");

        // Both back at once: both warm alike, shared as usual.
        drained.upstreams[0].backends[0].weight = 0;
        proxy.swap_in(&drained);
        proxy.swap_in(&config);
        let went = tally(&where_keys_go(&proxy, "cookie", &keys[..200]).await);
        assert!(went.values().all(|&n| n >= 50), "{balance:?}: {went:?}");
        proxy.stop().await;
    }
}

/// `header:Host` keys on the host a request is for: over HTTP/2 its
/// `:authority`, as over HTTP/1 its `Host` (review45c M1: HTTP/2
/// requests had no key, all round-robin).
#[tokio::test]
async fn a_host_key_holds_over_http2() {
    let backends = start_backends(3).await;
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.upstreams[0].balance = Balance::Hash(HashKey::Header(http::header::HOST));
    let proxy = start_proxy(config).await;
    let hosts: Vec<String> = (0..30).map(|k| format!("site{k}.example")).collect();
    let over_http1 = where_keys_go(&proxy, "host", &hosts).await;
    let (mut sender, _connection) =
        h2c_connection::<http_body_util::Full<bytes::Bytes>>(proxy.addr).await;
    let mut over_http2 = Vec::new();
    for host in &hosts {
        let request = http::Request::get(format!("http://{host}/health"))
            .body(Default::default())
            .unwrap();
        let response = tokio::time::timeout(STEP, sender.send_request(request))
            .await
            .expect("answer within STEP")
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        over_http2.push(response.headers()["x-backend"].to_str().unwrap().to_owned());
    }
    assert_eq!(over_http2, over_http1);
    assert!(tally(&over_http1).len() > 1, "{over_http1:?}");
    let metrics = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(
        metrics.contains("portico_upstream_hash_keyless_total{upstream=\"default\"} 0"),
        "{metrics}"
    );
    proxy.stop().await;
}

/// A retry after every primary up has failed the request goes to a backup
/// it has not tried, before a primary that failed it, as nginx passes a
/// request its primaries failed to a backup (lb53 M1: the two failing
/// primaries were tried twice each and the request answered 502, the
/// backup never asked, until passive ejection took them out). Without
/// backups, such a retry still goes to a primary reached before.
#[tokio::test]
async fn a_retry_goes_to_an_untried_backup_before_a_primary_that_failed_it() {
    for balance in [Balance::RoundRobin, Balance::LeastConn, Balance::RandomTwo] {
        let (first, first_tries) = counted_scripted_backend(close_at_once).await;
        let (second, second_tries) = counted_scripted_backend(close_at_once).await;
        let backup = start_backend(portico::sample::BackendOptions::new("backup")).await;
        let mut config = Config::single_upstream(vec![], vec![first, second, backup.addr()]);
        let upstream = &mut config.upstreams[0];
        upstream.balance = balance.clone();
        upstream.health = Some(never_ejecting());
        upstream.retries = 3;
        upstream.backends[2].backup = true;
        let proxy = start_proxy(config).await;
        let answer = get(&client(), &proxy.url("/health")).await;
        assert_eq!(answer.status, StatusCode::OK, "{balance:?}");
        assert_eq!(answer.header("x-backend"), "backup", "{balance:?}");
        let tries = [&first_tries, &second_tries].map(|n| n.load(Ordering::SeqCst));
        assert_eq!(tries, [1, 1], "{balance:?}");
    }
}

/// That retry does not go to a backup while an untried primary is only
/// at its `max_conns`: backups take no overflow (review57 M1: any retry
/// found the busy primary full and went to the backup).
#[tokio::test]
async fn a_retry_does_not_take_a_backup_for_a_primary_that_is_only_full() {
    let release = Arc::new(Notify::new());
    let holding = holding_backend("held", release.clone()).await;
    let (failing, _) = counted_scripted_backend(close_at_once).await;
    let backup = start_backend(portico::sample::BackendOptions::new("backup")).await;
    let mut config = capped(vec![holding, failing, backup.addr()], 1, STEP);
    let upstream = &mut config.upstreams[0];
    upstream.health = Some(never_ejecting());
    upstream.retries = 1;
    upstream.backends[2].backup = true;
    let proxy = start_proxy(config).await;
    let held = held_at_backend(&proxy, "/hold").await;
    let answer = get(&client(), &proxy.url("/health")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(backup.requests(), 0);
    release.notify_one();
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
}
