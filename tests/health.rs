//! Load balancing an operator can trust when backends fail: active checks,
//! passive ejection, weighted and least-conn balancing, safe retries.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use portico::config::{Balance, Config, HealthCheck};
use portico::sample::{self, BackendOptions, RunningBackend};
use tokio::sync::Notify;

fn checked(backends: &[&RunningBackend], interval_ms: u64, rise: u32, fall: u32) -> Config {
    let mut config = config_for(backends);
    config.upstreams[0].health = Some(checks(interval_ms, rise, fall));
    config
}

/// `GET /health` every `interval_ms`, each given half that to answer.
fn checks(interval_ms: u64, rise: u32, fall: u32) -> HealthCheck {
    HealthCheck {
        path: "/health".into(),
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(interval_ms / 2),
        rise,
        fall,
        ..HealthCheck::default()
    }
}

/// Stops backend `b2` (taken from `backends`) and waits until the
/// proxy's checks have it down; its address, for [`revive_second`].
async fn kill_second(
    proxy: &RunningProxy,
    backends: &mut Vec<RunningBackend>,
) -> std::net::SocketAddr {
    let victim = backends.remove(1);
    let addr = victim.addr();
    victim.stop().await;
    proxy
        .wait_until("the dead backend to be marked down", |s| !s[1].active_up)
        .await;
    addr
}

/// Starts backend `b2` again on its old address and waits until the proxy
/// has it up.
async fn revive_second(proxy: &RunningProxy, addr: std::net::SocketAddr) -> RunningBackend {
    let revived = sample::start_on(addr, BackendOptions::new("b2"), sample::new_repository())
        .await
        .expect("rebind the dead backend's port");
    proxy
        .wait_until("the backend to come back up", |s| s[1].up)
        .await;
    revived
}

#[tokio::test]
async fn killing_a_backend_mid_run_fails_no_get_and_a_restart_brings_it_back() {
    let mut backends = start_backends(3).await;
    let proxy = start_proxy(checked(&backends.iter().collect::<Vec<_>>(), 100, 2, 2)).await;
    let client = client();
    let url = proxy.url("/users/1/orders");

    for _ in 0..30 {
        assert_eq!(get(&client, &url).await.status, StatusCode::OK);
    }
    let victim = backends.remove(1);
    let victim_addr = victim.addr();
    victim.stop().await;
    // Every GET succeeds while the backend is dead: retries cover the
    // requests that still reach it until it is ejected and marked down.
    for _ in 0..60 {
        let answer = get(&client, &url).await;
        assert_eq!(answer.status, StatusCode::OK, "a GET failed after the kill");
    }
    proxy
        .wait_until("the dead backend to be marked down", |s| !s[1].active_up)
        .await;
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(get(&client, &url).await);
    }
    assert!(!count_by_backend(&answers).contains_key("b2"));

    // Same address, new process: back in rotation after `rise` checks.
    let revived = revive_second(&proxy, victim_addr).await;
    let mut answers = Vec::new();
    for _ in 0..30 {
        answers.push(get(&client, &url).await);
    }
    assert_eq!(count_by_backend(&answers).get("b2"), Some(&10));
    drop(revived);
}

#[tokio::test]
async fn a_reload_that_retunes_an_upstream_keeps_its_dead_backend_down() {
    let mut backends = start_backends(2).await;
    let config = checked(&backends.iter().collect::<Vec<_>>(), 100, 2, 1);
    let proxy = start_proxy(config.clone()).await;
    let victim_addr = kill_second(&proxy, &mut backends).await;
    // A reload changing one setting of the upstream builds it anew.
    let mut retuned = config;
    retuned.upstreams[0].connect_timeout = Duration::from_millis(1500);
    proxy.swap_in(&retuned);
    let status = proxy.backend_status();
    assert!(status[0].active_up && !status[1].active_up, "{status:?}");
    let client = client();
    for _ in 0..10 {
        let answer = get(&client, &proxy.url("/health")).await;
        assert_eq!(answer.header("x-backend"), "b1");
    }
    // Checks retimed (in an incident, say) keep their verdicts too.
    let mut retimed = retuned.clone();
    let health = retimed.upstreams[0].health.as_mut().unwrap();
    health.timeout = Duration::from_millis(40);
    health.fall = 3;
    proxy.swap_in(&retimed);
    let status = proxy.backend_status();
    assert!(status[0].active_up && !status[1].active_up, "{status:?}");
    // Checks that ask something else (a wrong path corrected, say) judge
    // afresh: every backend starts up, as at a start.
    let mut rechecked = retimed.clone();
    rechecked.upstreams[0].health.as_mut().unwrap().path = "/health?again".into();
    proxy.swap_in(&rechecked);
    assert!(proxy.backend_status()[1].active_up);
    // The new upstream's checks bring it back once it answers again.
    let revived = revive_second(&proxy, victim_addr).await;
    drop(revived);
}

#[tokio::test]
async fn weights_three_to_one_split_requests_three_to_one() {
    let backends = start_backends(2).await;
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.upstreams[0].backends[0].weight = 3;
    let proxy = start_proxy(config).await;
    let client = client();
    let mut answers = Vec::new();
    for _ in 0..400 {
        answers.push(get(&client, &proxy.url("/health")).await);
    }
    let seen = count_by_backend(&answers);
    assert_eq!((seen["b1"], seen["b2"]), (300, 100));
}

#[tokio::test]
async fn least_conn_steers_away_from_a_slow_backend() {
    let fast = start_backend(BackendOptions::new("fast")).await;
    let mut slow_opts = BackendOptions::new("slow");
    slow_opts.delay = Duration::from_millis(200);
    let slow = start_backend(slow_opts).await;
    let mut config = config_for(&[&fast, &slow]);
    config.upstreams[0].balance = Balance::LeastConn;
    let proxy = Arc::new(start_proxy(config).await);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let proxy = proxy.clone();
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut answers = Vec::new();
            for _ in 0..10 {
                answers.push(get(&client, &proxy.url("/health")).await);
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for worker in workers {
        answers.extend(worker.await.unwrap());
    }
    let seen = count_by_backend(&answers);
    let slow_share = seen.get("slow").copied().unwrap_or(0);
    assert!(
        slow_share * 4 < answers.len(),
        "slow backend got {slow_share} of {}",
        answers.len()
    );
}

#[tokio::test]
async fn least_conn_counts_requests_a_reload_left_running() {
    // A long request runs on one backend when a reload retunes the
    // upstream: the new generation must see that backend busy, and see it
    // free once the request ends on the old one.
    let release = Arc::new(Notify::new());
    let a = holding_backend("a", release.clone()).await;
    let b = holding_backend("b", release.clone()).await;
    let mut config = Config::single_upstream(vec![], vec![a, b]);
    config.upstreams[0].balance = Balance::LeastConn;
    let proxy = start_proxy(config.clone()).await;
    let held = tokio::spawn({
        let url = proxy.url("/hold");
        async move { get(&client(), &url).await.status }
    });
    proxy
        .wait_until("the long request to reach a backend", |s| {
            s.iter().any(|b| b.in_flight == 1)
        })
        .await;
    let busy = if proxy.backend_status()[0].in_flight == 1 {
        0
    } else {
        1
    };
    let (busy_name, free_name) = [("a", "b"), ("b", "a")][busy];

    let mut retuned = config;
    retuned.upstreams[0].response_timeout = Duration::from_secs(20);
    proxy.swap_in(&retuned);
    let status = proxy.backend_status();
    assert_eq!(status[busy].in_flight, 1, "{status:?}");
    let client = client();
    for _ in 0..6 {
        let answer = get(&client, &proxy.url("/")).await;
        assert_eq!(answer.header("x-backend"), free_name, "not {busy_name}");
    }
    // The request ends on the old generation; the new one sees it go.
    release.notify_one();
    assert_eq!(held.await.unwrap(), StatusCode::OK);
    proxy
        .wait_until("the long request to be over", |s| {
            s.iter().all(|b| b.in_flight == 0)
        })
        .await;
}

#[tokio::test]
async fn with_every_backend_down_the_answer_is_503_without_trying_them() {
    let backends = start_backends(2).await;
    let proxy = start_proxy(checked(&backends.iter().collect::<Vec<_>>(), 100, 1, 1)).await;
    for backend in backends {
        backend.stop().await;
    }
    proxy
        .wait_until("both backends down", |s| s.iter().all(|b| !b.up))
        .await;
    // 503 rather than 502 shows no connection was attempted.
    let answer = get(&client(), &proxy.url("/health")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("retry-after"), "1");
}

#[tokio::test]
async fn passive_ejection_works_without_active_checks() {
    let backends = start_backends(2).await;
    let proxy = start_proxy(config_for(&backends.iter().collect::<Vec<_>>())).await;
    let mut backends = backends;
    backends.remove(0).stop().await;
    let client = client();
    for _ in 0..10 {
        assert_eq!(
            get(&client, &proxy.url("/health")).await.status,
            StatusCode::OK
        );
    }
    let status = proxy.backend_status();
    assert!(status[0].ejected, "{status:?}");
    // Counted, as a short ejection rarely shows in a scraped gauge.
    let metrics = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    let ejections = format!(
        "portico_upstream_ejections_total{{backend=\"{}\",upstream=\"default\"}} 1",
        status[0].addr
    );
    assert!(metrics.contains(&ejections), "{ejections} not in {metrics}");
}

/// Passive ejections so far, all backends.
fn ejections(proxy: &RunningProxy) -> u64 {
    let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    text.lines()
        .filter(|l| l.starts_with("portico_upstream_ejections_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Sends a GET for `path` and says whether its body was cut short.
async fn body_cut(client: &TestClient, url: &str) -> bool {
    let response = client
        .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("a head");
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .expect("the body ends within STEP");
    body.is_err()
}

/// A backend answering every request with a head and a body it cuts
/// short, and `/ws/echo` with a 101 (it then closes the tunnel).
fn head_then_cut(head: &str) -> &'static [u8] {
    if target_of(head) == "/ws/echo" {
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort"
    }
}

/// A backend that sends every head and breaks every body is ejected: the
/// verdict waits for the body's end. The head had counted as a success,
/// so such a backend was never ejected (review42c). Its probe's head
/// readmits it, on probation: the probe's cut body ejects it again at
/// once, where the head had reset its backoff and it took `fall` more
/// (review43a H1).
#[tokio::test]
async fn a_backend_that_breaks_every_body_is_ejected() {
    let broken = scripted_backend(head_then_cut).await;
    let good = start_backend(BackendOptions::new("good")).await;
    let proxy = start_proxy(Config::single_upstream(vec![], vec![broken, good.addr()])).await;
    let client = client();
    let url = proxy.url("/health");
    let mut cut = 0;
    for _ in 0..10 {
        cut += usize::from(body_cut(&client, &url).await);
    }
    // The default `fall` of 3: three cut bodies, then the good backend.
    assert_eq!(cut, 3);
    let status = proxy.backend_status();
    assert!(status[0].ejected && !status[1].ejected, "{status:?}");
    let ejections = || ejections(&proxy);
    // After its 1 s backoff, one probe: cut, and out again.
    let deadline = tokio::time::Instant::now() + STEP;
    while ejections() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ejected again"
        );
        cut += usize::from(body_cut(&client, &url).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cut, 4);
}

/// A 101 is judged at once, as nothing judges a tunnel's end: failures
/// with tunnels opened between them, still open, added up to an ejection
/// (review43a M2).
#[tokio::test]
async fn a_tunnel_opened_breaks_a_run_of_failures() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Cuts every body; holds every tunnel open until its client leaves.
    let serve = |mut stream: tokio::net::TcpStream| async move {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let _ = stream.write_all(head_then_cut(&head)).await;
        if target_of(&head) == "/ws/echo" {
            let _ = stream.read(&mut [0; 64]).await;
        }
    };
    let a = serve_each(serve).await;
    let b = serve_each(serve).await;
    let proxy = start_proxy(Config::single_upstream(vec![], vec![a, b])).await;
    let client = client();
    let mut tunnels = Vec::new();
    // Round-robin: each backend sees cut, 101, cut, 101, cut.
    for round in 0..5 {
        for _ in 0..2 {
            if round % 2 == 0 {
                assert!(body_cut(&client, &proxy.url("/cut")).await);
                continue;
            }
            tunnels.push(open_echo_tunnel_with_head(proxy.addr).await.0);
        }
    }
    let status = proxy.backend_status();
    assert!(status.iter().all(|b| !b.ejected), "{status:?}");
}

/// A reload that changes the upstream (another backend's weight) keeps an
/// ejection and its back-off: it readmitted a backend failing real
/// requests, at the cost of `fall` more failures each time (review35a
/// F3).
#[tokio::test]
async fn a_reload_that_retunes_the_upstream_keeps_an_ejection() {
    let backends = start_backends(2).await;
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    let proxy = start_proxy(config.clone()).await;
    let mut backends = backends;
    backends.remove(0).stop().await;
    let client = client();
    // Ejected twice (its probe failed), so its back-off is 2 s: time
    // enough for the reload below on a loaded machine (review35e L7).
    let ejections = || ejections(&proxy);
    let deadline = tokio::time::Instant::now() + STEP;
    while !(ejections() >= 2 && proxy.backend_status()[0].ejected) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ejected twice"
        );
        get(&client, &proxy.url("/health")).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    config.upstreams[0].backends[1].weight = 2;
    proxy.swap_in(&config);
    let status = proxy.backend_status();
    assert_eq!(status[1].weight, 2, "{status:?}");
    assert!(status[0].ejected, "{status:?}");
}

/// Failures of requests a reload left running count toward an ejection
/// as the new generation's own do (review52 M2: the passive record was
/// copied at the reload, their failures went to the old copy, which
/// nothing read, and three timeouts straddling a weight-only reload left
/// a hanging backend in rotation).
#[tokio::test]
async fn failures_a_reload_left_running_still_eject_their_backend() {
    let hanging = silent_backend().await;
    let good = start_backend(BackendOptions::new("good")).await;
    let mut config = Config::single_upstream(vec![], vec![hanging, good.addr()]);
    config.upstreams[0].response_timeout = Duration::from_millis(800);
    let proxy = start_proxy(config.clone()).await;
    let client = client();
    // Six at once: three wait at the hanging backend (each then retried
    // on the good one), the fall of 3 an ejection takes.
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let (client, url) = (client.clone(), proxy.url("/health"));
            tokio::spawn(async move { get(&client, &url).await.status })
        })
        .collect();
    proxy
        .wait_until("three at the hanging backend", |status| {
            status[0].in_flight == 3
        })
        .await;
    config.upstreams[0].backends[1].weight = 2;
    proxy.swap_in(&config);
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    let status = proxy.backend_status();
    assert_eq!(status[1].weight, 2, "{status:?}");
    assert!(status[0].ejected, "{status:?}");
}

#[tokio::test]
async fn an_ejected_backends_turns_are_shared_by_weight() {
    // Round-robin over three; the third is dead and gets ejected. Its
    // turns used to go all to the backend after it in the cycle (2:1).
    let mut backends = start_backends(3).await;
    let proxy = start_proxy(config_for(&backends.iter().collect::<Vec<_>>())).await;
    backends.remove(2).stop().await;
    let client = client();
    let deadline = tokio::time::Instant::now() + STEP;
    while !proxy.backend_status()[2].ejected {
        assert!(tokio::time::Instant::now() < deadline, "never ejected");
        get(&client, &proxy.url("/health")).await;
    }
    let mut answers = Vec::new();
    for _ in 0..60 {
        answers.push(get(&client, &proxy.url("/health")).await);
    }
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    let seen = count_by_backend(&answers);
    let (b1, b2) = (seen["b1"], seen["b2"]);
    assert!(b1.abs_diff(b2) <= 2, "b1 {b1}, b2 {b2}");
}

/// Answers `/garbage` with what is not HTTP, anything else with a 200.
fn garbage_on_one_path(head: &str) -> &'static [u8] {
    if target_of(head) == "/garbage" {
        b"this is not http\r\n\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
    }
}

#[tokio::test]
async fn with_every_backend_ejected_they_take_traffic_again() {
    // One broken URL gets both backends ejected; the others still work.
    // As nginx marks all its peers live again when every one has failed,
    // they are tried rather than everything answered 503 for the backoff.
    let a = scripted_backend(garbage_on_one_path).await;
    let b = scripted_backend(garbage_on_one_path).await;
    let proxy = start_proxy(Config::single_upstream(vec![], vec![a, b])).await;
    let client = client();
    let deadline = tokio::time::Instant::now() + STEP;
    while !proxy.backend_status().iter().all(|b| b.ejected) {
        assert!(tokio::time::Instant::now() < deadline, "never all ejected");
        let answer = get(&client, &proxy.url("/garbage")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    }
    let answer = get(&client, &proxy.url("/ok")).await;
    assert_eq!(answer.status, StatusCode::OK);
    // The success ends that backend's ejection at once.
    assert!(
        proxy.backend_status().iter().any(|b| !b.ejected),
        "{:?}",
        proxy.backend_status()
    );
}

#[tokio::test]
async fn with_every_backend_ejected_picks_still_take_turns() {
    // Both stay broken: every request fails, and in turn, not always on
    // the same one (each pick once took two turns of an even cycle).
    let garbage = |_: &str| -> &'static [u8] { b"this is not http\r\n\r\n" };
    let (a, seen_a) = counted_scripted_backend(garbage).await;
    let (b, seen_b) = counted_scripted_backend(garbage).await;
    let mut config = Config::single_upstream(vec![], vec![a, b]);
    config.upstreams[0].retries = 0;
    let proxy = start_proxy(config).await;
    let client = client();
    let deadline = tokio::time::Instant::now() + STEP;
    while !proxy.backend_status().iter().all(|b| b.ejected) {
        assert!(tokio::time::Instant::now() < deadline, "never all ejected");
        get(&client, &proxy.url("/")).await;
    }
    let (before_a, before_b) = (seen_a.load(Ordering::SeqCst), seen_b.load(Ordering::SeqCst));
    for _ in 0..6 {
        let answer = get(&client, &proxy.url("/")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    }
    let (a, b) = (
        seen_a.load(Ordering::SeqCst) - before_a,
        seen_b.load(Ordering::SeqCst) - before_b,
    );
    assert_eq!((a, b), (3, 3));
}

/// Answers `/health` with a 200 and anything else with what is not HTTP:
/// a grey failure, whose health path works while its real traffic fails.
fn healthy_but_broken(head: &str) -> &'static [u8] {
    if target_of(head) == "/health" {
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
    } else {
        b"this is not http\r\n\r\n"
    }
}

/// Sends GETs until backend `i` is ejected; returns when the request that
/// ejected it was sent, a moment no later than the ejection.
async fn eject(proxy: &RunningProxy, i: usize) -> tokio::time::Instant {
    let client = client();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "never ejected");
        let sent = tokio::time::Instant::now();
        get(&client, &proxy.url("/orders/1")).await;
        if proxy.backend_status()[i].ejected {
            return sent;
        }
    }
}

/// How long backend `i`, ejected at `ejected` or later, stays ejected
/// (at least: the status is polled).
async fn out_for(proxy: &RunningProxy, i: usize, ejected: tokio::time::Instant) -> Duration {
    proxy
        .wait_until("the ejection to end", |s| !s[i].ejected)
        .await;
    ejected.elapsed()
}

#[tokio::test]
async fn a_passing_check_neither_ends_an_ejection_nor_resets_its_backoff() {
    // Checks pass every 200 ms throughout; the backend must still sit out
    // its 1 s backoff, and the next one must be 2 s, not 1 s again.
    let good = start_backend(BackendOptions::new("b1")).await;
    let grey = recording_backend(healthy_but_broken).await;
    let mut config = Config::single_upstream(vec![], vec![good.addr(), grey.addr]);
    config.upstreams[0].health = Some(checks(200, 1, 3));
    let proxy = start_proxy(config).await;
    let checked = || grey.heads_for("/health").len();

    let ejected = eject(&proxy, 1).await;
    let before = checked();
    let waited = tokio::time::timeout(STEP, async {
        while checked() < before + 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no checks while ejected");
    let out = out_for(&proxy, 1, ejected).await;
    assert!(out >= Duration::from_millis(900), "out for {out:?} only");

    // The probe after the backoff fails: ejected again, for twice as long.
    let ejected = eject(&proxy, 1).await;
    let out = out_for(&proxy, 1, ejected).await;
    assert!(out >= Duration::from_millis(1900), "out for {out:?} only");
}

/// After a backoff, one request probes the ejected backend while the rest
/// of its share goes elsewhere: for a backend that hangs, every request of
/// its share went to it until the first one timed out (review31a F1).
#[tokio::test]
async fn after_a_backoff_one_request_probes_and_the_rest_go_elsewhere() {
    let good = start_backend(BackendOptions::new("b1")).await;
    let hanging = silent_backend().await;
    let mut config = Config::single_upstream(vec![], vec![good.addr(), hanging]);
    config.upstreams[0].response_timeout = Duration::from_millis(300);
    // Each request sent to the hanging backend answered 504, not retried
    // elsewhere: counted so.
    config.upstreams[0].retry_on_timeout = false;
    let proxy = start_proxy(config).await;
    eject(&proxy, 1).await;
    proxy
        .wait_until("the backoff to end", |s| !s[1].ejected)
        .await;
    let client = client();
    let asked = (0..10).map(|_| {
        let (client, url) = (client.clone(), proxy.url("/health"));
        tokio::spawn(async move { get(&client, &url).await.status })
    });
    let mut timed_out = 0;
    for answer in futures_util::future::join_all(asked).await {
        match answer.unwrap() {
            StatusCode::OK => {}
            StatusCode::GATEWAY_TIMEOUT => timed_out += 1,
            other => panic!("{other}"),
        }
    }
    assert_eq!(timed_out, 1, "requests sent to the hanging backend");
    assert!(proxy.backend_status()[1].ejected);
}

/// A health backend answering 200 with a chunked body that never ends,
/// 64 KiB pieces `pause` apart; counts the checks it saw.
async fn endless_health(
    pause: Duration,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let checked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = checked.clone();
    let addr = serve_each(move |mut stream| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let mut chunk = b"10000\r\n".to_vec();
            chunk.extend(std::iter::repeat_n(b'x', 0x10000));
            chunk.extend(b"\r\n");
            while stream.write_all(&chunk).await.is_ok() {
                tokio::time::sleep(pause).await;
            }
        }
    })
    .await;
    (addr, checked)
}

/// A check is judged by its status; of its body only the first MiB is
/// read, each piece let go as it comes, and not for long. Collected whole,
/// a health path that streams without end timed every check out (and a
/// large one held its whole size in memory: review31a F3); read under the
/// check's timeout, one trickled slowly did too (review31e).
#[tokio::test]
async fn a_check_reads_only_the_start_of_an_endless_answer() {
    for pause in [Duration::ZERO, Duration::from_millis(300)] {
        let (addr, checked) = endless_health(pause).await;
        let mut config = Config::single_upstream(vec![], vec![addr]);
        config.upstreams[0].health = Some(checks(200, 1, 1));
        let proxy = start_proxy(config).await;
        let waited = tokio::time::timeout(STEP, async {
            while checked.load(Ordering::SeqCst) < 4 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "fewer than 4 checks within STEP");
        assert!(
            proxy.backend_status()[0].active_up,
            "{pause:?}: {:?}",
            proxy.backend_status()
        );
    }
}

#[tokio::test]
async fn a_backend_that_takes_no_new_connections_fails_its_checks() {
    // It stops accepting while it goes on serving the keep-alive
    // connection the proxy holds: checks sent on that one would pass
    // for as long as it lasts. Each check makes a connection of its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepting = serve_early_answers(listener, accepted.clone());
    let mut config = Config::single_upstream(vec![], vec![addr]);
    config.upstreams[0].health = Some(checks(100, 1, 2));
    let proxy = start_proxy(config).await;
    assert_eq!(get(&client(), &proxy.url("/")).await.status, StatusCode::OK);
    let waited = tokio::time::timeout(STEP, async {
        while accepted.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "checks reused a connection");

    accepting.abort();
    let _ = accepting.await;
    proxy
        .wait_until("the backend to be marked down", |s| !s[0].active_up)
        .await;
}

#[tokio::test]
async fn checks_say_the_configured_host_else_the_backend_address() {
    let backend = recording_backend(healthy_but_broken).await;
    let mut config = Config::single_upstream(vec![], vec![backend.addr]);
    config.upstreams[0].health = Some(HealthCheck {
        host: Some("status.internal:8080".into()),
        ..checks(100, 1, 3)
    });
    let proxy = start_proxy(config.clone()).await;
    let head = backend.first_head_for("/health").await;
    assert!(
        head.contains("\r\nhost: status.internal:8080\r\n"),
        "{head}"
    );
    // A connection of its own, not to be kept.
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    drop(proxy);

    let backend = recording_backend(healthy_but_broken).await;
    config.upstreams[0].backends[0].addr = backend.addr;
    config.upstreams[0].health = Some(checks(100, 1, 3));
    let _proxy = start_proxy(config).await;
    let head = backend.first_head_for("/health").await;
    let host = format!("\r\nhost: {}\r\n", backend.addr);
    assert!(head.contains(&host), "{head}");
}

#[tokio::test]
async fn a_response_head_that_does_not_parse_is_not_retried() {
    // The backend answered, badly: sent again, the request would count a
    // second failure and most likely get the same answer.
    let garbage = |_: &str| -> &'static [u8] { b"this is not http\r\n\r\n" };
    let (a, seen_a) = counted_scripted_backend(garbage).await;
    let (b, seen_b) = counted_scripted_backend(garbage).await;
    let proxy = start_proxy(Config::single_upstream(vec![], vec![a, b])).await;
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let seen = seen_a.load(Ordering::SeqCst) + seen_b.load(Ordering::SeqCst);
    assert_eq!(seen, 1);
}

#[tokio::test]
async fn a_lone_backend_is_never_ejected_so_errors_stay_errors() {
    // As in nginx: with nowhere else to go, ejecting the only backend
    // would turn its failures (and its recovery) into blanket 503s.
    let addr = fake_backend(b"this is not http\r\n\r\n", false).await;
    let proxy = start_proxy(single(addr)).await;
    let client = client();
    for _ in 0..5 {
        assert_eq!(
            get(&client, &proxy.url("/")).await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    assert!(!proxy.backend_status()[0].ejected);
}

#[tokio::test]
async fn posts_are_never_sent_twice_and_refused_ones_go_elsewhere() {
    let backends = start_backends(2).await;
    let proxy = start_proxy(config_for(&backends.iter().collect::<Vec<_>>())).await;
    let client = client();
    let mut created = 0;
    let mut backends = backends;
    let dead = backends.remove(1);
    dead.stop().await;
    for _ in 0..10 {
        let request = Request::post(proxy.url("/users/1/orders"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"items":[{"sku":"A-1","qty":1}],"amount_cents":5,"email":"a@example.com"}"#,
            )))
            .unwrap();
        let answer = send(&client, request).await;
        if answer.status == StatusCode::CREATED {
            created += 1;
        } else {
            assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        }
    }
    assert_eq!(backends[0].orders_created(), created);
    // Refused connections sent nothing, so those POSTs went elsewhere.
    assert_eq!(created, 10, "a POST was lost to the dead backend");
}

/// A POST or PATCH without a body whose connection was refused goes to
/// another backend too: nothing of it was sent. It got a 502, while one
/// with a body went on (review33a F1).
#[tokio::test]
async fn refused_bodiless_posts_go_elsewhere_too() {
    let mut backends = start_backends(2).await;
    let proxy = start_proxy(config_for(&backends.iter().collect::<Vec<_>>())).await;
    backends.remove(1).stop().await;
    let client = client();
    for method in ["POST", "PATCH", "POST", "PATCH"] {
        let request = Request::builder()
            .method(method)
            .uri(proxy.url("/users/1/orders"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answer = send(&client, request).await;
        // The live backend's own answer to a request without an order.
        assert!(
            answer.status.is_client_error(),
            "{method}: {} {:?}",
            answer.status,
            answer.body
        );
    }
    // The dead backend was met, and the requests that met it went again.
    let metrics = String::from_utf8(proxy.shared.proxy.load().metrics().encode()).unwrap();
    let retried = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portico_upstream_retries_total{upstream=\"default\"} "))
        .map_or(0, |n| n.parse::<u64>().unwrap());
    assert!(retried >= 1, "{metrics}");
}

/// A misbehaving backend no real server imitates on purpose: it answers
/// every connection with `reply` and then does `then`.
async fn fake_backend(reply: &'static [u8], hang: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    serve_each(move |mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(reply).await;
        if hang {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
    .await
}

fn single(addr: std::net::SocketAddr) -> Config {
    let mut config = Config::single_upstream(vec![], vec![addr]);
    config.upstreams[0].retries = 0;
    config
}

#[tokio::test]
async fn a_backend_that_sends_garbage_gives_502() {
    let addr = fake_backend(b"this is not http\r\n\r\n", false).await;
    let proxy = start_proxy(single(addr)).await;
    assert_eq!(
        get(&client(), &proxy.url("/")).await.status,
        StatusCode::BAD_GATEWAY
    );
}

#[tokio::test]
async fn a_backend_that_accepts_then_hangs_gives_504() {
    let addr = fake_backend(b"", true).await;
    let mut config = single(addr);
    config.upstreams[0].response_timeout = Duration::from_millis(200);
    let proxy = start_proxy(config).await;
    assert_eq!(
        get(&client(), &proxy.url("/")).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
}

#[tokio::test]
async fn a_backend_closing_mid_body_aborts_the_response() {
    let addr = fake_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
        false,
    )
    .await;
    let proxy = start_proxy(single(addr)).await;
    let response = tokio::time::timeout(
        STEP,
        client().request(
            Request::get(proxy.url("/"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .expect("head arrives");
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .unwrap();
    assert!(body.is_err(), "a truncated body was delivered as complete");
}

/// A backend that counts the requests for each path and answers them
/// `200 ok`, except those for `hang`, which it never answers.
async fn counting_backend(
    hang: Option<&'static str>,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<HashMap<String, usize>>>,
) {
    let seen: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let count = seen.clone();
    let addr = serve_each(move |mut stream| {
        let count = count.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            while let Some(head) = read_head(&mut stream).await {
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                *count.lock().unwrap().entry(path.clone()).or_default() += 1;
                if Some(path.as_str()) == hang {
                    tokio::time::sleep(STEP * 6).await;
                    return;
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

fn counted(seen: &std::sync::Mutex<HashMap<String, usize>>, path: &str) -> usize {
    seen.lock().unwrap().get(path).copied().unwrap_or(0)
}

/// Each backend is checked on its own timer: one that never answers its
/// checks held every other backend's next check until its timeout, so
/// detection everywhere took up to twice the configured time (review35a
/// F1; HAProxy checks each server apart).
#[tokio::test]
async fn a_backend_slow_to_answer_its_checks_delays_no_other_backends_checks() {
    let (hung, hung_seen) = counting_backend(Some("/health")).await;
    let (fine, fine_seen) = counting_backend(None).await;
    let mut config =
        Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![hung, fine]);
    config.upstreams[0].health = Some(HealthCheck {
        path: "/health".into(),
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 1,
        ..HealthCheck::default()
    });
    let _proxy = start_proxy(config).await;
    // The hung backend is checked every second (its interval, then its
    // timeout), the other every 500 ms: not at the hung one's pace, which
    // gave them as many checks.
    let paced = tokio::time::timeout(STEP, async {
        while counted(&hung_seen, "/health") < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(paced.is_ok(), "the hung backend was checked five times");
    let (hung_checks, fine_checks) = (
        counted(&hung_seen, "/health"),
        counted(&fine_seen, "/health"),
    );
    assert!(
        fine_checks >= hung_checks + 3,
        "{fine_checks} checks of the other, {hung_checks} of the hung one"
    );
}

/// A reload that replaces an upstream stops its old generation's checks,
/// even while something still holds that generation (a response
/// streaming from it): they went on, one more checker a reload, checking
/// the old path and removed backends (review35a F2).
#[tokio::test]
async fn a_replaced_upstream_checks_nothing_more() {
    let (addr, seen) = counting_backend(None).await;
    let mut config = Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![addr]);
    config.upstreams[0].health = Some(HealthCheck {
        path: "/health".into(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        rise: 1,
        fall: 1,
        ..HealthCheck::default()
    });
    let proxy = start_proxy(config.clone()).await;
    let waited = tokio::time::timeout(STEP, async {
        while counted(&seen, "/health") < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "checked");
    // Held, as a streaming response's access line holds it.
    let old = proxy.shared.proxy.load_full();
    config.upstreams[0].health.as_mut().unwrap().path = "/healthz".into();
    proxy.swap_in(&config);
    // A check of the old path already under way may still land.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = counted(&seen, "/health");
    let waited = tokio::time::timeout(STEP, async {
        while counted(&seen, "/healthz") < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the new path is checked");
    assert_eq!(
        counted(&seen, "/health"),
        before,
        "the old generation still checks"
    );
    drop(old);
}

/// A backup (nginx's and HAProxy's `backup`) takes requests only while no
/// primary can (each drained, or down), and the primaries take them back
/// as soon as one is up again.
#[tokio::test]
async fn a_backup_takes_requests_only_while_no_primary_can() {
    for balance in [Balance::RoundRobin, Balance::LeastConn, Balance::RandomTwo] {
        backup_stands_in(balance).await;
    }
}

async fn backup_stands_in(balance: Balance) {
    let mut backends = start_backends(4).await;
    let mut config = checked(&backends.iter().collect::<Vec<_>>(), 100, 1, 1);
    // Two backups, weighted 3 and 1.
    config.upstreams[0].backends[2].backup = true;
    config.upstreams[0].backends[2].weight = 3;
    config.upstreams[0].backends[3].backup = true;
    config.upstreams[0].balance = balance.clone();
    let proxy = start_proxy(config.clone()).await;
    assert!(proxy.backend_status()[2].backup);
    // Only the backups' share is checked: random draws need not split
    // 10/10.
    let backups = |seen: &HashMap<String, usize>| {
        let on_backups = seen.get("b3").unwrap_or(&0) + seen.get("b4").unwrap_or(&0);
        (on_backups, seen.values().sum::<usize>())
    };
    assert_eq!(backups(&proxy.spread(20).await), (0, 20), "{balance:?}");

    // Both primaries drained: the backups take everything, by weight
    // (round-robin gave them 40/0, review44c M1).
    for primary in &mut config.upstreams[0].backends[..2] {
        primary.weight = 0;
    }
    proxy.swap_in(&config);
    let drained = proxy.spread(40).await;
    if balance == Balance::RandomTwo {
        assert_eq!(backups(&drained), (40, 40));
    } else {
        assert_eq!(drained, counts(&[("b3", 30), ("b4", 10)]), "{balance:?}");
    }

    // Back, then one primary down: the other takes everything.
    for primary in &mut config.upstreams[0].backends[..2] {
        primary.weight = 1;
    }
    proxy.swap_in(&config);
    let b2_addr = kill_second(&proxy, &mut backends).await;
    assert_eq!(proxy.spread(10).await, counts(&[("b1", 10)]));

    // Both down: the backups.
    let b1 = backends.remove(0);
    b1.stop().await;
    proxy
        .wait_until("the checks to find b1 down", |s| !s[0].up)
        .await;
    assert_eq!(backups(&proxy.spread(10).await), (10, 10), "{balance:?}");

    // A primary up again takes everything back.
    let _b2 = revive_second(&proxy, b2_addr).await;
    assert_eq!(proxy.spread(10).await, counts(&[("b2", 10)]));
    proxy.stop().await;
}

/// With `slow_start`, a backend its checks find up again warms up: it
/// takes about a twentieth of its share at first (review45e L1: only a
/// reload's undrain was tested).
#[tokio::test]
async fn a_backend_up_again_by_its_checks_warms_up() {
    let mut backends = start_backends(2).await;
    let mut config = checked(&backends.iter().collect::<Vec<_>>(), 100, 1, 1);
    config.upstreams[0].slow_start = Duration::from_secs(3600);
    let proxy = start_proxy(config).await;
    // Not at a start: every backend is new then.
    let warming = |proxy: &RunningProxy| -> Vec<Option<u8>> {
        proxy.backend_status().iter().map(|b| b.warming).collect()
    };
    assert_eq!(warming(&proxy), [None, None]);
    let addr = kill_second(&proxy, &mut backends).await;
    let revived = revive_second(&proxy, addr).await;
    assert_eq!(warming(&proxy), [None, Some(5)]);
    let seen = proxy.spread(600).await;
    let b2 = seen.get("b2").copied().unwrap_or(0);
    assert!(b2 > 0 && b2 < 90, "{seen:?}");
    drop(revived);
}
