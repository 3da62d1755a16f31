//! The cache while every background read is taken. A test binary of its
//! own: the 32 places are shared by the whole process, and filling them
//! would change what the other cache tests see.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use portico::sample::BackendOptions;

/// With every background read taken by 32 slow HEADs fetched as GETs, a
/// HEAD for another URL goes to the backend as a HEAD, and its answer may
/// not be stored. The GETs that came behind it are not all let go to the
/// backend then: the lock passes on, and one of them fetches for the rest.
#[tokio::test]
async fn an_unconverted_head_hands_the_lock_on_to_the_gets_behind_it() {
    let mut opts = BackendOptions::new("b1");
    opts.delay = Duration::from_millis(1500);
    let backend = start_backend(opts).await;
    let proxy = Arc::new(start_proxy(with_cache(config_for(&[&backend]))).await);
    let head = |url: String| {
        tokio::spawn(async move {
            let request = Request::head(url).body(Full::new(Bytes::new())).unwrap();
            send(&client(), request).await
        })
    };
    let holding: Vec<_> = (0..32)
        .map(|n| head(proxy.url(&format!("/cache/h{n}?cc=max-age=60"))))
        .collect();
    at_backend(&backend, 32).await;
    let url = proxy.url("/cache/x?cc=max-age=60");
    let leader = head(url.clone());
    at_backend(&backend, 33).await;
    let gets: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&client(), &url).await })
        })
        .collect();
    for answer in gets {
        assert_eq!(answer.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(leader.await.unwrap().status, StatusCode::OK);
    for answer in holding {
        assert_eq!(answer.await.unwrap().status, StatusCode::OK);
    }
    // The 32, the HEAD, and one GET for the ten.
    assert_eq!(backend.requests(), 34);
}
