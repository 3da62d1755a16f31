//! Balancing around a failing backend, over real sockets: a retry must
//! not move the rotation.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use http::StatusCode;
use portico::config::{Balance, Config, HealthCheck};

/// Answers nothing: reads a request head and closes, which the proxy
/// retries elsewhere (a connection lost before the response head).
fn close_at_once(_head: &str) -> &'static [u8] {
    b""
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
        upstream.balance = balance;
        // Checks an hour apart never run here; their `fall` of 100 keeps
        // passive ejection (after `fall` failures) out of the counts.
        upstream.health = Some(HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 100,
        });
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
