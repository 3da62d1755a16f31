//! `[compression]`: gzip for clients that take it, over real sockets, in
//! front of backends that send their bodies plain.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use portico::config::{Compression, Config};

/// A page of text that compresses well, 6,000 bytes.
fn page_text() -> &'static [u8] {
    static PAGE: OnceLock<Vec<u8>> = OnceLock::new();
    PAGE.get_or_init(|| {
        let line = b"<p>portico compresses what its backends send plain.</p>\n";
        line.iter().copied().cycle().take(6000).collect()
    })
}

/// A response with `head_fields` and [`page_text`] as its body.
fn respond(head_fields: &str) -> &'static [u8] {
    let body = page_text();
    let mut out = format!(
        "HTTP/1.1 200 OK\r\n{head_fields}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Box::leak(out.into_boxed_slice())
}

/// The backend's answers, by path: what is compressed and what is not.
fn answer(head: &str) -> &'static [u8] {
    static ANSWERS: OnceLock<Vec<(&'static str, &'static [u8])>> = OnceLock::new();
    let answers = ANSWERS.get_or_init(|| {
        vec![
            (
                "/page",
                respond(
                    "Content-Type: text/html; charset=utf-8\r\nETag: \"v1\"\r\nAccept-Ranges: bytes\r\nCache-Control: max-age=60\r\n",
                ),
            ),
            ("/json", respond("Content-Type: Application/JSON\r\n")),
            ("/picture", respond("Content-Type: image/png\r\n")),
            ("/untyped", respond("")),
            (
                "/encoded",
                respond("Content-Type: text/html\r\nContent-Encoding: br\r\n"),
            ),
            (
                "/untransformed",
                respond("Content-Type: text/html\r\nCache-Control: public, no-transform\r\n"),
            ),
            (
                "/digested",
                respond("Content-Type: text/html\r\nRepr-Digest: sha-256=:AAAA:\r\n"),
            ),
            (
                "/varied",
                respond("Content-Type: text/html\r\nVary: Cookie\r\n"),
            ),
            (
                "/part",
                b"HTTP/1.1 206 Partial Content\r\nContent-Type: text/html\r\nETag: \"p1\"\r\n\
                  Content-Range: bytes 0-9/6000\r\nContent-Length: 10\r\n\r\n<p>portico",
            ),
            (
                "/smallpart",
                b"HTTP/1.1 206 Partial Content\r\nContent-Type: text/html\r\n\
                  Content-Range: bytes 0-3/11\r\nContent-Length: 4\r\n\r\nhell",
            ),
            (
                "/small",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 11\r\n\r\nhello world",
            ),
            (
                "/missing",
                respond("Content-Type: text/html\r\n")
                    .strip_prefix(b"HTTP/1.1 200 OK")
                    .map(|rest| {
                        let mut out = b"HTTP/1.1 404 Not Found".to_vec();
                        out.extend_from_slice(rest);
                        &*Box::leak(out.into_boxed_slice())
                    })
                    .unwrap(),
            ),
        ]
    });
    let target = target_of(head);
    answers.iter().find(|(path, _)| *path == target).map_or(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n" as &[u8],
        |(_, answer)| answer,
    )
}

fn compressing(backend: SocketAddr, cache: bool) -> Config {
    let mut config = Config::single_upstream(vec!["127.0.0.1:0".parse().unwrap()], vec![backend]);
    config.compression = Some(Compression::default());
    config.routes[0].compress = true;
    if cache {
        config = with_cache(config);
    }
    config
}

async fn fetch(client: &TestClient, url: &str, accept: Option<&str>) -> Answer {
    let fields: &[(&str, &str)] = match &accept {
        Some(accept) => &[("accept-encoding", accept)],
        None => &[],
    };
    get_with(client, url, fields).await
}

/// A gzip client revalidating the copy it was sent (`W/"v1"`) gets a 304
/// that names that copy, as its 200 did (RFC 9110 §15.4.5, RFC 9111
/// §4.3.4), so that a cache in front freshens that copy.
async fn revalidates_the_gzip_copy(client: &TestClient, url: &str) {
    let fields = [("accept-encoding", "gzip"), ("if-none-match", "W/\"v1\"")];
    let revalidated = get_with(client, url, &fields).await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.header("etag"), "W/\"v1\"");
    assert_eq!(revalidated.header("vary"), "Accept-Encoding");
}

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut plain)
        .expect("a whole gzip stream");
    plain
}

#[tokio::test]
async fn a_listed_type_is_gzipped_for_a_client_that_takes_it() {
    let backend = scripted_backend(answer).await;
    let proxy = start_proxy(compressing(backend, false)).await;
    let client = client();

    let gzipped = fetch(&client, &proxy.url("/page"), Some("br, gzip;q=0.8")).await;
    assert_eq!(gzipped.status, StatusCode::OK);
    assert_eq!(gzipped.header("content-encoding"), "gzip");
    assert_eq!(gzipped.header("vary"), "Accept-Encoding");
    assert_eq!(
        gzipped.header("etag"),
        "W/\"v1\"",
        "the tag no longer names these bytes"
    );
    assert!(gzipped.headers.get("content-length").is_none());
    assert!(gzipped.headers.get("accept-ranges").is_none());
    assert!(
        gzipped.body.len() < page_text().len() / 4,
        "{} bytes",
        gzipped.body.len()
    );
    assert_eq!(gunzip(&gzipped.body), page_text());

    // The same answer for a client that takes no gzip says it varies.
    let plain = fetch(&client, &proxy.url("/page"), None).await;
    assert!(plain.headers.get("content-encoding").is_none());
    assert_eq!(plain.header("vary"), "Accept-Encoding");
    assert_eq!(plain.header("etag"), "\"v1\"");
    assert_eq!(plain.header("content-length"), "6000");
    assert_eq!(plain.body, page_text());

    // Types compared without case or parameters; 4xx pages too.
    for path in ["/json", "/missing"] {
        let answer = fetch(&client, &proxy.url(path), Some("gzip")).await;
        assert_eq!(answer.header("content-encoding"), "gzip", "{path}");
        assert_eq!(gunzip(&answer.body), page_text(), "{path}");
    }
    let counters = &proxy.shared.metrics.compression;
    assert_eq!(counters.responses.get(), 3);
    assert_eq!(counters.bytes_in.get(), 3 * 6000);
    assert!(
        counters.bytes_out.get() < 6000,
        "{}",
        counters.bytes_out.get()
    );
}

#[tokio::test]
async fn what_is_not_to_be_compressed_goes_as_it_came() {
    let backend = scripted_backend(answer).await;
    let proxy = start_proxy(compressing(backend, false)).await;
    let client = client();

    // (path, Accept-Encoding, whether the answer says it varies with it)
    let cases = [
        ("/picture", "gzip", false),
        ("/untyped", "gzip", false),
        ("/encoded", "gzip", false),
        ("/untransformed", "gzip", false),
        ("/digested", "gzip", false),
        ("/small", "gzip", false),
        ("/page", "gzip;q=0", true),
        ("/page", "br, *;q=0", true),
        ("/page", "gzip;q=0, *", true),
        ("/page", "identity", true),
        ("/page", "", true),
    ];
    for (path, accept, varies) in cases {
        let answer = fetch(&client, &proxy.url(path), Some(accept)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path} {accept}");
        assert_ne!(
            answer.headers.get("content-encoding").map(|v| v.as_bytes()),
            Some(&b"gzip"[..]),
            "{path} with {accept:?}"
        );
        assert_eq!(
            answer.headers.contains_key("vary"),
            varies,
            "{path} with {accept:?}: {:?}",
            answer.headers
        );
    }
    // `*` and `x-gzip` take it.
    for accept in ["*", "x-gzip", "deflate, GZIP;Q=0.5"] {
        let answer = fetch(&client, &proxy.url("/page"), Some(accept)).await;
        assert_eq!(answer.header("content-encoding"), "gzip", "{accept}");
    }
    // A client asking for no transformation gets none.
    let answer = get_with(
        &client,
        &proxy.url("/page"),
        &[
            ("accept-encoding", "gzip"),
            ("cache-control", "no-transform"),
        ],
    )
    .await;
    assert!(answer.headers.get("content-encoding").is_none());
    // A Vary of the backend's keeps its names, and gets the one more.
    let answer = fetch(&client, &proxy.url("/varied"), Some("gzip")).await;
    let vary: Vec<_> = answer.headers.get_all("vary").iter().collect();
    assert_eq!(vary, ["Cookie", "Accept-Encoding"]);

    // HTTP/1.0 cannot be sent a body of unknown length but by closing.
    let raw = raw_exchange(
        proxy.addr,
        b"GET /page HTTP/1.0\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(raw.starts_with("http/1.0 200"), "{raw}");
    assert!(!raw.contains("content-encoding"), "{raw}");
    assert!(raw.contains("content-length: 6000"), "{raw}");
    // The three that take it and `/varied`.
    assert_eq!(proxy.shared.metrics.compression.responses.get(), 4);
}

/// A HEAD gets the head its GET would, of a body of known length or
/// not (hyper says a HEAD's body is empty: that is no length).
#[tokio::test]
async fn a_head_says_what_the_get_would() {
    let sized = scripted_backend(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6000\r\n\r\n"
    })
    .await;
    let chunked = scripted_backend(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
    })
    .await;
    for backend in [sized, chunked] {
        let proxy = start_proxy(compressing(backend, false)).await;
        let raw = raw_exchange(
            proxy.addr,
            b"HEAD /page HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        )
        .await
        .to_ascii_lowercase();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with("http/1.1 200"), "{raw}");
        assert!(head.contains("content-encoding: gzip"), "{raw}");
        assert!(head.contains("vary: accept-encoding"), "{raw}");
        assert!(!head.contains("content-length"), "{raw}");
        assert!(!head.contains("transfer-encoding"), "{raw}");
        assert_eq!(body, "");
    }
}

/// A backend sending a body of `content_type` in `chunks`, all at once.
async fn chunked_backend(content_type: &'static str, chunks: Vec<Vec<u8>>) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in chunks {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(&chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    let out = Arc::new(out);
    serve_each(move |mut stream| {
        let out = out.clone();
        async move {
            if read_head(&mut stream).await.is_some() {
                let _ = stream.write_all(&out).await;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_body_in_small_chunks_is_not_flushed_chunk_by_chunk() {
    // 2,000 chunks of one byte.
    let backend = chunked_backend("text/plain", vec![b"x".to_vec(); 2000]).await;
    let proxy = start_proxy(compressing(backend, false)).await;
    let answer = fetch(&client(), &proxy.url("/trickle"), Some("gzip")).await;
    assert_eq!(gunzip(&answer.body), vec![b'x'; 2000]);
    // A flush costs at least 5 bytes: one for each chunk would make
    // 10,000 (the small chunks are joined before they come here).
    assert!(answer.body.len() < 500, "{} bytes", answer.body.len());
}

#[tokio::test]
async fn a_body_coming_as_fast_as_it_is_read_is_compressed_as_one() {
    // The page 54 times over, a chunk of 6,000 bytes each time.
    let backend = chunked_backend("text/html", vec![page_text().to_vec(); 54]).await;
    let proxy = start_proxy(compressing(backend, false)).await;
    let answer = fetch(&client(), &proxy.url("/big"), Some("gzip")).await;
    let plain = page_text().repeat(54);
    assert_eq!(gunzip(&answer.body), plain);
    let mut whole = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(2));
    std::io::Write::write_all(&mut whole, &plain).unwrap();
    let whole = whole.finish().unwrap().len();
    // Flushed only where the backend paused, if anywhere, not between
    // its chunks: a flush at each of them made it 3,406 bytes (2,323).
    let sent = answer.body.len();
    assert!(
        sent <= whole + whole / 10,
        "{sent} bytes, {whole} in one stream"
    );
}

/// A backend that sends the first of [`page_text`]'s two halves of a
/// chunked body on `/broken`, and closes, and the page whole elsewhere.
async fn breaking_backend() -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    serve_each(|mut stream| async move {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        if target_of(&head) != "/broken" {
            let _ = stream.write_all(answer("GET /page HTTP/1.1")).await;
            return;
        }
        let half = &page_text()[..3000];
        let mut out =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        out.extend_from_slice(format!("{:x}\r\n", half.len()).as_bytes());
        out.extend_from_slice(half);
        out.extend_from_slice(b"\r\n");
        let _ = stream.write_all(&out).await;
    })
    .await
}

#[tokio::test]
async fn a_response_cut_short_leaves_the_next_whole() {
    let mut config = compressing(breaking_backend().await, false);
    // zlib-rs's quick mode, whose reset left a block open (review46a H1).
    config.compression.as_mut().unwrap().level = 1;
    let proxy = start_proxy(config).await;
    let client = client();
    for _ in 0..3 {
        let request = Request::get(proxy.url("/broken"))
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(STEP, client.request(request))
            .await
            .unwrap()
            .unwrap();
        let read = tokio::time::timeout(STEP, response.into_body().collect()).await;
        assert!(
            read.unwrap().is_err(),
            "a body cut short is no whole stream"
        );
        let answer = fetch(&client, &proxy.url("/page"), Some("gzip")).await;
        assert_eq!(gunzip(&answer.body), page_text());
    }
}

#[tokio::test]
async fn a_stored_response_is_compressed_as_it_is_sent() {
    let backend = recording_backend(answer).await;
    let proxy = start_proxy(compressing(backend.addr, true)).await;
    let client = client();

    let miss = fetch(&client, &proxy.url("/page"), Some("gzip")).await;
    assert_eq!(miss.header("content-encoding"), "gzip");
    assert!(
        miss.header("cache-status").contains("stored"),
        "{:?}",
        miss.headers
    );
    assert_eq!(gunzip(&miss.body), page_text());

    // The cache holds the backend's plain body, for either kind of client.
    let plain = fetch(&client, &proxy.url("/page"), None).await;
    assert_eq!(plain.header("cache-status"), "portico; hit");
    assert!(plain.headers.get("content-encoding").is_none());
    assert_eq!(plain.header("content-length"), "6000");
    assert_eq!(plain.header("vary"), "Accept-Encoding");
    assert_eq!(plain.body, page_text());

    let hit = fetch(&client, &proxy.url("/page"), Some("gzip")).await;
    assert_eq!(hit.header("cache-status"), "portico; hit");
    assert_eq!(hit.header("content-encoding"), "gzip");
    assert_eq!(hit.header("etag"), "W/\"v1\"");
    assert_eq!(gunzip(&hit.body), page_text());
    assert_eq!(
        backend.heads_for("/page").len(),
        1,
        "one fetch served all three"
    );

    // The weak tag a gzip client holds revalidates against the stored one.
    revalidates_the_gzip_copy(&client, &proxy.url("/page")).await;
    // A client that holds the plain copy is told of that one.
    let revalidated = get_with(&client, &proxy.url("/page"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.header("etag"), "\"v1\"");
}

/// A HEAD of `url` from a client that takes gzip.
async fn head_gzip(client: &TestClient, url: &str) -> Answer {
    let request = Request::head(url).header("accept-encoding", "gzip");
    send(client, request.body(Full::new(Bytes::new())).unwrap()).await
}

/// Polls until the cache has stored `n` gzip copies; panics after [`STEP`].
async fn copies_stored(proxy: &RunningProxy, n: u64) {
    let counters = &proxy.shared.metrics.compression;
    let waited = tokio::time::timeout(STEP, async {
        while counters.copies_stored.get() < n {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no gzip copy stored");
}

#[tokio::test]
async fn a_stored_response_is_compressed_once_and_its_copy_sent_after() {
    let backend = recording_backend(answer).await;
    let proxy = start_proxy(compressing(backend.addr, true)).await;
    let client = client();
    let url = proxy.url("/page");
    let counters = &proxy.shared.metrics.compression;

    fetch(&client, &url, Some("gzip")).await;
    // The first gzip hit compresses the entry, and the cache keeps it.
    let first = fetch(&client, &url, Some("gzip")).await;
    assert!(first.headers.get("content-length").is_none());
    copies_stored(&proxy, 1).await;
    let compressed = counters.bytes_in.get();

    let hit = fetch(&client, &url, Some("gzip")).await;
    assert_eq!(hit.header("cache-status"), "portico; hit");
    assert_eq!(hit.header("content-encoding"), "gzip");
    assert_eq!(hit.header("etag"), "W/\"v1\"");
    assert_eq!(hit.header("vary"), "Accept-Encoding");
    assert!(hit.headers.get("accept-ranges").is_none());
    assert_eq!(hit.header("content-length"), hit.body.len().to_string());
    // The head kept with the copy is the one the first hit was sent with
    // (its Age of the moment, and a length where that one streamed).
    let fields = |answer: &Answer| {
        let mut fields: Vec<_> = answer
            .headers
            .iter()
            .filter(|(name, _)| {
                !["date", "age", "content-length", "transfer-encoding"].contains(&name.as_str())
            })
            .map(|(name, value)| format!("{name}: {value:?}"))
            .collect();
        fields.sort();
        fields
    };
    assert_eq!(fields(&hit), fields(&first));
    assert!(hit.headers.contains_key("age"));
    assert_eq!(hit.body, first.body, "the copy is the first hit's stream");
    assert_eq!(gunzip(&hit.body), page_text());
    let head = head_gzip(&client, &url).await;
    assert_eq!(head.header("content-length"), hit.header("content-length"));
    assert_eq!(head.header("content-encoding"), "gzip");
    assert!(head.body.is_empty());
    assert_eq!(counters.copies_served.get(), 2);
    assert_eq!(
        counters.bytes_in.get(),
        compressed,
        "nothing compressed again"
    );

    // Others are answered from the entry, as before.
    let plain = fetch(&client, &url, None).await;
    assert_eq!(plain.body, page_text());
    assert!(plain.headers.get("content-encoding").is_none());
    let range = get_with(
        &client,
        &url,
        &[("accept-encoding", "gzip"), ("range", "bytes=0-9")],
    )
    .await;
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.body, page_text()[..10]);
    revalidates_the_gzip_copy(&client, &url).await;
    assert_eq!(counters.copies_served.get(), 2);
    assert_eq!(backend.heads_for("/page").len(), 1);
}

/// A reload that stops compressing a type stops its copies too: a copy
/// kept at the same level is not sent once its response is not one to
/// compress.
#[tokio::test]
async fn a_copy_is_not_sent_once_its_type_is_not_compressed() {
    let backend = recording_backend(answer).await;
    let mut config = compressing(backend.addr, true);
    let proxy = start_proxy(config.clone()).await;
    let (client, url) = (client(), proxy.url("/page"));
    fetch(&client, &url, Some("gzip")).await;
    fetch(&client, &url, Some("gzip")).await;
    copies_stored(&proxy, 1).await;
    let hit = fetch(&client, &url, Some("gzip")).await;
    assert_eq!(hit.header("content-encoding"), "gzip");

    if let Some(compression) = config.compression.as_mut() {
        compression.types = vec!["text/css".into()];
    }
    proxy.swap_in(&config);
    let hit = fetch(&client, &url, Some("gzip")).await;
    assert_eq!(hit.header("cache-status"), "portico; hit");
    assert!(
        hit.headers.get("content-encoding").is_none(),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.body, page_text());
    assert_eq!(backend.heads_for("/page").len(), 1, "the cache was kept");
}

/// A stored body of 1 MiB that compresses to more than one 64 KiB piece.
fn large_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        (0..60_000u64)
            .map(|n| format!("line {n} {}\n", n * 7919 % 100_003))
            .collect()
    })
}

/// The backend's answer with [`large_text`], stored for a minute.
fn large_answer(_: &str) -> &'static [u8] {
    static ANSWER: OnceLock<Vec<u8>> = OnceLock::new();
    ANSWER.get_or_init(|| {
        let body = large_text();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=60\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_hits_keep_one_copy() {
    let body = large_text();
    let backend = scripted_backend(large_answer).await;
    let proxy = start_proxy(compressing(backend, true)).await;
    let client = client();
    let url = proxy.url("/large");
    fetch(&client, &url, None).await;
    // A HEAD says what a GET would.
    let head = head_gzip(&client, &url).await;
    assert_eq!(head.header("content-encoding"), "gzip");
    let counters = &proxy.shared.metrics.compression;
    let hits: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { fetch(&client, &url, Some("gzip")).await })
        })
        .collect();
    // However they interleave, those that came before the copy was kept
    // compressed the entry, and the others were sent the copy.
    let mut compressed = 0;
    for hit in hits {
        let hit = hit.await.unwrap();
        assert_eq!(gunzip(&hit.body), body.as_bytes());
        compressed += u64::from(hit.headers.get("content-length").is_none());
    }
    copies_stored(&proxy, 1).await;
    let copy = fetch(&client, &url, Some("gzip")).await;
    assert!(copy.body.len() > 64 * 1024, "{} bytes", copy.body.len());
    assert_eq!(copy.header("content-length"), copy.body.len().to_string());
    assert_eq!(gunzip(&copy.body), body.as_bytes());
    assert_eq!(counters.copies_stored.get(), 1, "one copy of the entry");
    assert_eq!(counters.copies_served.get() + compressed, 9);
}

/// A backend answering `/page` with a text body that says which of its
/// answers it is, stored for a minute.
async fn counting_backend() -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    serve_each(move |mut stream| {
        let answered = answered.clone();
        async move {
            while read_head(&mut stream).await.is_some() {
                let n = answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let body = format!("answer {n}\n").repeat(300);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=60\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_copy_is_never_sent_for_the_entry_that_replaced_its_own() {
    let backend = counting_backend().await;
    let proxy = start_proxy(compressing(backend, true)).await;
    let client = client();
    let url = proxy.url("/page");
    fetch(&client, &url, Some("gzip")).await;
    fetch(&client, &url, Some("gzip")).await;
    copies_stored(&proxy, 1).await;
    let copy = fetch(&client, &url, Some("gzip")).await;
    assert!(String::from_utf8(gunzip(&copy.body))
        .unwrap()
        .starts_with("answer 1\n"));

    // Fetched again, the entry is replaced by the backend's second answer.
    let fresh = get_with(&client, &url, &[("cache-control", "no-cache")]).await;
    assert!(String::from_utf8(fresh.body.to_vec())
        .unwrap()
        .starts_with("answer 2\n"));
    let hit = fetch(&client, &url, Some("gzip")).await;
    assert_eq!(hit.header("cache-status"), "portico; hit");
    assert!(String::from_utf8(gunzip(&hit.body))
        .unwrap()
        .starts_with("answer 2\n"));
    // And the new entry gets a copy of its own.
    copies_stored(&proxy, 2).await;
    let copy = fetch(&client, &url, Some("gzip")).await;
    assert_eq!(copy.header("content-length"), copy.body.len().to_string());
    assert!(String::from_utf8(gunzip(&copy.body))
        .unwrap()
        .starts_with("answer 2\n"));
}

#[tokio::test]
async fn http2_clients_get_it_too() {
    let backend = scripted_backend(answer).await;
    let proxy = start_proxy(compressing(backend, false)).await;
    let answer = fetch(&h2c_client(), &proxy.url("/page"), Some("gzip")).await;
    assert_eq!(answer.header("content-encoding"), "gzip");
    assert_eq!(gunzip(&answer.body), page_text());
}

#[tokio::test]
async fn a_route_may_turn_it_off() {
    let backend = scripted_backend(answer).await;
    let mut config = compressing(backend, false);
    config.routes[0].compress = false;
    let proxy = start_proxy(config).await;
    let answer = fetch(&client(), &proxy.url("/page"), Some("gzip")).await;
    assert!(answer.headers.get("content-encoding").is_none());
    assert!(answer.headers.get("vary").is_none());
}

/// A backend streaming a text body in two parts, the second only once
/// `go_on` is notified.
async fn streaming_backend(go_on: Arc<tokio::sync::Notify>) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    serve_each(move |mut stream| {
        let go_on = go_on.clone();
        async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            let first = "first part of the stream\n".repeat(100);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
                first.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            go_on.notified().await;
            let second = "second part\n";
            let rest = format!("{:x}\r\n{second}\r\n0\r\n\r\n", second.len());
            let _ = stream.write_all(rest.as_bytes()).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_streamed_body_reaches_the_client_as_its_backend_sends_it() {
    let go_on = Arc::new(tokio::sync::Notify::new());
    let backend = streaming_backend(go_on.clone()).await;
    let proxy = start_proxy(compressing(backend, false)).await;
    // HTTP/2's bodies are polled from a task of h2's, HTTP/1's from the
    // connection's.
    for client in [client(), h2c_client()] {
        let request = Request::get(proxy.url("/events"))
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(STEP, client.request(request))
            .await
            .expect("head within STEP")
            .unwrap();
        assert_eq!(response.headers()["content-encoding"], "gzip");
        let mut body = response.into_body();
        // The first part decodes whole before the backend sends the
        // second: it was flushed, not held for zlib's block to fill.
        let mut got = Vec::new();
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        let expected = "first part of the stream\n".repeat(100);
        while decoder.get_ref().len() < expected.len() {
            let frame = tokio::time::timeout(STEP, body.frame())
                .await
                .expect("the first part within STEP, before the second was sent")
                .expect("more body")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
                std::io::Write::write_all(&mut decoder, &data).unwrap();
                std::io::Write::flush(&mut decoder).unwrap();
            }
        }
        assert_eq!(decoder.get_ref().as_slice(), expected.as_bytes());
        go_on.notify_one();
        let rest = tokio::time::timeout(STEP, body.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        got.extend_from_slice(&rest);
        assert_eq!(gunzip(&got), format!("{expected}second part\n").as_bytes());
    }
}

/// What a backend sent before its body broke reaches a gzip client too,
/// as it does a client of the plain body (review46d M1: none of it did).
#[tokio::test]
async fn what_came_before_a_break_reaches_the_client() {
    let proxy = start_proxy(compressing(breaking_backend().await, false)).await;
    for accept in ["identity", "gzip"] {
        let request = Request::get(proxy.url("/broken"))
            .header("accept-encoding", accept)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(STEP, client().request(request))
            .await
            .unwrap()
            .unwrap();
        let mut body = response.into_body();
        let mut got = Vec::new();
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        while let Some(Ok(frame)) = tokio::time::timeout(STEP, body.frame()).await.unwrap() {
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
                if accept == "gzip" {
                    std::io::Write::write_all(&mut decoder, &data).unwrap();
                    std::io::Write::flush(&mut decoder).unwrap();
                }
            }
        }
        let plain = if accept == "gzip" {
            decoder.get_ref().as_slice()
        } else {
            &got[..]
        };
        let came = &page_text()[..3000];
        assert!(plain == came, "{accept}: {} bytes of 3000", plain.len());
    }
}

/// A backend's own 304 to a client revalidating its gzip copy names that
/// copy, as one from the cache does.
#[tokio::test]
async fn a_backend_s_304_names_the_gzip_copy_too() {
    let backend = scripted_backend(|_| {
        b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 0\r\n\r\n"
    })
    .await;
    let proxy = start_proxy(compressing(backend, false)).await;
    revalidates_the_gzip_copy(&client(), &proxy.url("/page")).await;
}

/// A 206 or a 304 says the `Vary` its 200 would (RFC 9110 §15.3.7,
/// §15.4.5), to clients that take gzip and to those that do not, so that
/// a cache in between keeps them apart as it keeps the 200s (range53 L1:
/// they said none, as nginx's do not): a range or a 304 made of a stored
/// page, and a backend's own 206 of a type to compress.
#[tokio::test]
async fn ranges_and_304s_of_a_type_to_compress_say_vary() {
    let backend = recording_backend(answer).await;
    let proxy = start_proxy(compressing(backend.addr, true)).await;
    let (client, url) = (client(), proxy.url("/page"));
    // The 304 a miss's fetch came to says it too (review54 L3), and the
    // fetch is stored.
    let fields = [("accept-encoding", "gzip"), ("if-none-match", "\"v1\"")];
    let cold = get_with(&client, &url, &fields).await;
    assert_eq!(cold.status, StatusCode::NOT_MODIFIED);
    assert_eq!(cold.header("vary"), "Accept-Encoding");
    for accept in ["identity", "gzip"] {
        let encoding = ("accept-encoding", accept);
        let range = get_with(&client, &url, &[encoding, ("range", "bytes=0-9")]).await;
        assert_eq!(range.status, StatusCode::PARTIAL_CONTENT, "{accept}");
        assert_eq!(range.header("vary"), "Accept-Encoding", "{accept}");
        let checked = get_with(&client, &url, &[encoding, ("if-none-match", "\"v1\"")]).await;
        assert_eq!(checked.status, StatusCode::NOT_MODIFIED, "{accept}");
        assert_eq!(checked.header("vary"), "Accept-Encoding", "{accept}");
    }
    assert_eq!(backend.heads_for("/page").len(), 1);
    let part = fetch(&client, &proxy.url("/part"), Some("gzip")).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.header("vary"), "Accept-Encoding");
    assert!(part.headers.get("content-encoding").is_none());
    // A range of a body too small to compress does not vary, as its 200
    // does not (review54 L6: the type alone was looked at).
    // A 304 judged on a backend's 206 (a request sent on as it came,
    // several ranges) drops its `Content-Range` and says the `Vary` of its
    // whole (review55 L1).
    let fields = [
        ("accept-encoding", "gzip"),
        ("range", "bytes=0-1,4-5"),
        ("if-none-match", "\"p1\""),
    ];
    let judged = get_with(&client, &proxy.url("/part"), &fields).await;
    assert_eq!(judged.status, StatusCode::NOT_MODIFIED);
    assert!(
        judged.headers.get("content-range").is_none(),
        "{:?}",
        judged.headers
    );
    assert_eq!(judged.header("vary"), "Accept-Encoding");
    let small = fetch(&client, &proxy.url("/smallpart"), Some("gzip")).await;
    assert_eq!(small.status, StatusCode::PARTIAL_CONTENT);
    assert!(small.headers.get("vary").is_none(), "{:?}", small.headers);
}

/// A client that takes gzip, resuming with `If-Range` set to the
/// `Last-Modified` it was sent, gets the whole response compressed: the
/// date names the gzip form as much as the plain body, and a range of the
/// plain body joined to the gzip bytes it held made a broken file
/// (range53 M2). Without a cache the range is not asked of the backend
/// either. A client that takes no gzip gets its range.
#[tokio::test]
async fn a_dated_if_range_from_a_gzip_client_gets_the_whole_response_compressed() {
    const MODIFIED: &str = "Mon, 01 Jan 2024 00:00:00 GMT";
    fn dated(_: &str) -> &'static [u8] {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        respond(&format!(
            "Content-Type: text/html\r\nLast-Modified: {MODIFIED}\r\nDate: {date}\r\n\
             Cache-Control: max-age=60\r\n"
        ))
    }
    for cache in [true, false] {
        let backend = recording_backend(dated).await;
        let proxy = start_proxy(compressing(backend.addr, cache)).await;
        let (client, url) = (client(), proxy.url("/dated"));
        let first = fetch(&client, &url, Some("gzip")).await;
        assert_eq!(first.header("content-encoding"), "gzip");
        let resume = [
            ("accept-encoding", "gzip"),
            ("range", "bytes=10-"),
            ("if-range", MODIFIED),
        ];
        let resumed = get_with(&client, &url, &resume).await;
        assert_eq!(resumed.status, StatusCode::OK, "cache {cache}");
        assert_eq!(resumed.header("content-encoding"), "gzip", "cache {cache}");
        assert_eq!(gunzip(&resumed.body), page_text());
        let heads = backend.heads_for("/dated");
        let last = heads.last().unwrap().to_ascii_lowercase();
        assert!(!last.contains("\r\nrange:"), "cache {cache}: {last}");
        if cache {
            let plain = get_with(&client, &url, &resume[1..]).await;
            assert_eq!(plain.status, StatusCode::PARTIAL_CONTENT);
            assert_eq!(plain.body, page_text()[10..]);
        }
    }
}

/// An answer made of a stored entry whose gzip form saves nothing is sent
/// plain, as its hits are, when it is no hit: a stale copy served for a
/// backend's failure (stale-if-error; review60 L3) or one a 304
/// revalidated (review61 L1). Each was compressed anew.
#[tokio::test]
async fn a_stale_copy_that_does_not_compress_is_sent_plain() {
    let mut random = vec![0u8; 20_000];
    random.iter_mut().for_each(|b| *b = fastrand::u8(..));
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nETag: \"r1\"\r\n\
         Cache-Control: max-age=60, stale-if-error=600\r\nContent-Length: {}\r\n\r\n",
        random.len()
    )
    .into_bytes();
    answer.extend_from_slice(&random);
    let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
    let laters: [(&'static [u8], &str); 2] = [
        (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            "portico; fwd=stale; fwd-status=503; detail=stale-if-error",
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nETag: \"r1\"\r\nCache-Control: max-age=60\r\n\r\n",
            "portico; fwd=stale; fwd-status=304",
        ),
    ];
    for (later, status) in laters {
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        let addr = scripted_backend(move |_| {
            match count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => answer,
                _ => later,
            }
        })
        .await;
        let proxy = start_proxy(compressing(addr, true)).await;
        let client = client();
        let url = proxy.url("/random");
        fetch(&client, &url, Some("gzip")).await;
        // The first gzip hit finds that its gzip form saves nothing.
        fetch(&client, &url, Some("gzip")).await;
        let cache = proxy.shared.proxy.load().cache().unwrap().clone();
        cache.advance_clock(std::time::Duration::from_secs(120));
        let stale = fetch(&client, &url, Some("gzip")).await;
        assert_eq!(stale.header("cache-status"), status);
        assert!(
            stale.headers.get("content-encoding").is_none(),
            "{:?}",
            stale.headers
        );
        assert_eq!(stale.header("vary"), "Accept-Encoding");
        assert_eq!(stale.body, random);
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
/// A stored response whose gzip form saves nothing (random bytes served
/// as a type to compress) keeps no copy, and its gzip hits after the one
/// that found out are sent as it is, saying they vary: compressed anew,
/// each cost a whole deflate and sent more bytes than the plain body
/// (gzip53 L2, review58 M1).
#[tokio::test]
async fn a_stored_response_that_does_not_compress_is_sent_plain_to_gzip_hits() {
    let mut random = vec![0u8; 20_000];
    random.iter_mut().for_each(|b| *b = fastrand::u8(..));
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nCache-Control: max-age=60\r\n\
         ETag: \"r1\"\r\nContent-Length: {}\r\n\r\n",
        random.len()
    )
    .into_bytes();
    answer.extend_from_slice(&random);
    let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
    let addr = scripted_backend(move |_| answer).await;
    let proxy = start_proxy(compressing(addr, true)).await;
    let client = client();
    let url = proxy.url("/random");
    fetch(&client, &url, Some("gzip")).await;
    // The first gzip hit compresses the entry and finds it saves nothing.
    let first = fetch(&client, &url, Some("gzip")).await;
    assert_eq!(first.header("content-encoding"), "gzip");
    assert_eq!(gunzip(&first.body), random);
    let hit = fetch(&client, &url, Some("gzip")).await;
    assert_eq!(hit.header("cache-status"), "portico; hit");
    assert!(
        hit.headers.get("content-encoding").is_none(),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.header("vary"), "Accept-Encoding");
    assert_eq!(hit.header("etag"), "\"r1\"");
    assert_eq!(hit.body, random);
    assert_eq!(proxy.shared.metrics.compression.copies_stored.get(), 0);
}
