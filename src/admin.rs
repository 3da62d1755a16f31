//! The admin listener, separate from traffic: `GET /metrics` (Prometheus
//! text format), `/healthz` (process alive), `/readyz` (every upstream has a
//! backend taking traffic), `/status` (JSON), and the token-protected
//! mutations `POST /reload` and `DELETE /cache?prefix=`. Without a
//! `token_file` the mutations are disabled (403); a missing or wrong bearer
//! token gets 401. The token is read again on every reload, so rotating it
//! is: rewrite the file, reload.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::proxy::route::{escaped_byte, routing_path};
use crate::server::Shared;

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Compares in time independent of where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credentials of a `Bearer` Authorization field; the scheme name is
/// case-insensitive (RFC 9110 §11.1). A field given twice is no
/// credential: which one decides would depend on the order, so a right
/// token beside a wrong one is refused either way.
fn bearer(request: &Request<Incoming>) -> Option<&str> {
    let value = crate::proxy::headers::only_line(request.headers(), &header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// An admin token shorter than this is warned about, at start and when a
/// reload brings it: it is a bearer secret, and 16 hex digits are 64 bits.
const MIN_TOKEN_LEN: usize = 16;

/// Why `token` is short enough to guess, if it is. Only a warning: the
/// file may be a test's, and the port loopback.
pub fn short_token(token: Option<&str>) -> Option<String> {
    let short = token.filter(|t| t.len() < MIN_TOKEN_LEN)?;
    Some(format!(
        "the admin token is short enough to guess ({} characters); use at least {MIN_TOKEN_LEN} random characters (openssl rand -hex 16)",
        short.len()
    ))
}

/// Warns of a `token` short enough to guess (see [`short_token`]); `at`
/// is where the file names it.
pub fn warn_if_short(token: Option<&str>, at: Option<String>) {
    if let (Some(why), Some(token)) = (short_token(token), token) {
        tracing::warn!(at, length = token.len(), "{why}");
    }
}

/// Why the admin listener at `addr` is exposed, if it listens beyond
/// loopback: `/metrics` and `/status` (the backends' addresses) answer
/// anyone who reaches the port, and the token crosses it in clear text.
pub fn exposed(addr: SocketAddr) -> Option<&'static str> {
    (!addr.ip().to_canonical().is_loopback()).then_some(
        "admin listens beyond loopback: /metrics and /status answer without a token, and the token travels unencrypted; keep the port behind a firewall",
    )
}

/// Warns of an admin listener at `addr` beyond loopback (see
/// [`exposed`]); `at` is where the file sets it.
pub fn warn_if_exposed(addr: SocketAddr, at: Option<String>) {
    if let Some(why) = exposed(addr) {
        tracing::warn!(at, %addr, "{why}");
    }
}

/// `None` when the caller may mutate; otherwise the refusal.
fn authorize(
    shared: &Shared,
    request: &Request<Incoming>,
    peer: SocketAddr,
) -> Option<Response<Body>> {
    let Some(token) = shared.admin_token() else {
        return Some(text(
            StatusCode::FORBIDDEN,
            "403 Forbidden: set [admin] token_file to enable this call\n",
        ));
    };
    match bearer(request) {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => None,
        presented => {
            // One line every 10 s, with how many went unsaid: a token
            // being guessed wrote one per try (ops56 L2), where proxy
            // errors are said as seldom.
            static REFUSED: crate::logging::Every = crate::logging::Every::new();
            if let Some(held_back) = REFUSED.due(10) {
                tracing::warn!(
                    client = %peer,
                    call = %request.uri().path(),
                    reason = if presented.is_some() { "wrong token" } else { "no bearer token" },
                    held_back = (held_back > 0).then_some(held_back),
                    "admin call refused"
                );
            }
            let mut response = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(response)
        }
    }
}

fn status_json(shared: &Shared) -> serde_json::Value {
    let proxy = shared.proxy.load();
    let upstreams: Vec<serde_json::Value> = proxy
        .upstreams()
        .iter()
        .map(|u| {
            let backends: Vec<serde_json::Value> = u
                .status()
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "addr": b.addr.to_string(),
                        "weight": b.weight,
                        "up": b.up,
                        "active_up": b.active_up,
                        "ejected": b.ejected,
                        "drained": b.drained,
                        "in_flight": b.in_flight,
                        "max_conns": b.max_conns,
                        "backup": b.backup,
                        "warming": b.warming,
                        "idle_connections": b.idle_connections,
                    })
                })
                .collect();
            serde_json::json!({ "name": u.name(), "backends": backends, "queued": u.queued() })
        })
        .collect();
    serde_json::json!({
        "via_name": proxy.via_name(),
        "upstreams": upstreams,
        "connections_open": shared.metrics.connections_open.get(),
        "limiter_keys": proxy.limiter().map(|l| l.tracked_keys()),
    })
}

/// The exposition, with the gauges read off live state rather than
/// counted refreshed first.
fn scrape(shared: &Shared) -> Vec<u8> {
    let proxy = shared.proxy.load();
    let tracked = proxy.limiter().map_or(0, |l| l.tracked_keys());
    shared
        .metrics
        .ratelimit_tracked
        .set(i64::try_from(tracked).unwrap_or(i64::MAX));
    let mut rows = Vec::new();
    for upstream in proxy.upstreams() {
        for backend in upstream.status() {
            rows.push(crate::metrics::BackendRow {
                upstream: upstream.name(),
                backend: backend.addr.to_string(),
                up: backend.up,
                weight: backend.weight,
                in_flight: backend.in_flight,
                max_conns: backend.max_conns,
                idle_connections: backend.idle_connections,
            });
        }
    }
    shared.metrics.encode_with_backends(rows.into_iter())
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let method = request.method().clone();
    // HEAD wherever GET is (RFC 9110 §9.1); hyper sends no body for it.
    let read = method == Method::GET || method == Method::HEAD;
    match (method, request.uri().path()) {
        (_, "/metrics") if read => {
            let cache = shared.proxy.load().cache().cloned();
            match cache {
                Some(cache) => {
                    cache.stats().await;
                }
                // A reload took `[cache]` away: nothing is stored any more.
                None => {
                    shared.metrics.cache_entries.set(0);
                    shared.metrics.cache_size_bytes.set(0);
                    shared.metrics.cache_max_size_bytes.set(0);
                }
            }
            let mut response = text(StatusCode::OK, scrape(&shared));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (_, "/healthz") if read => text(StatusCode::OK, "ok\n"),
        (_, "/readyz") if read => {
            if shared.draining() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                );
            }
            // Ready while some route can be served: an upstream no route
            // uses says nothing, and one upstream down (a minor one, or
            // one being retired) took every replica out of its load
            // balancer at once, the routes still served with it
            // (review32d F1). Envoy's readiness is its own state alone.
            let proxy = shared.proxy.load();
            let (mut taking, mut down, mut awaiting) = (0, Vec::new(), Vec::new());
            for upstream in proxy.routed_upstreams() {
                // Up by its active checks: with every backend ejected,
                // the ejected ones take the traffic (panic routing), and
                // a replica that routes it is not unready (review42d F1).
                // Up on trust, before its first check, is not yet: a
                // replica whose backends were never there said ready
                // for `fall` intervals, every request a 502 (ops56 M1).
                let status = upstream.status();
                let serving = status.iter().filter(|b| b.active_up && !b.drained);
                if serving.clone().any(|b| !b.unchecked) {
                    taking += 1;
                } else if serving.clone().next().is_some() {
                    awaiting.push(upstream.name());
                } else {
                    down.push(upstream.name());
                }
            }
            let down = down.join(", ");
            match (taking, down.is_empty()) {
                (0, _) if !awaiting.is_empty() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: first health checks under way in {}\n",
                        awaiting.join(", ")
                    ),
                ),
                (_, true) => text(StatusCode::OK, "ready\n"),
                (0, false) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: no backend taking traffic (up by its checks and not drained) in {down}\n"),
                ),
                (_, false) => text(
                    StatusCode::OK,
                    format!("ready; no backend taking traffic (up by its checks and not drained) in {down}: its routes answer 503\n"),
                ),
            }
        }
        (_, "/status") if read => {
            let mut status = status_json(&shared);
            let cache = shared.proxy.load().cache().cloned();
            if let Some(cache) = cache {
                let (entries, bytes) = cache.stats().await;
                let hits = cache.counters.hit.get();
                let lookups = hits
                    + cache.counters.miss.get()
                    + cache.counters.stale.get()
                    + cache.counters.revalidated.get();
                status["cache"] = serde_json::json!({
                    "entries": entries,
                    "size_bytes": bytes,
                    "max_size_bytes": cache.max_size,
                    "hit_ratio": if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
                });
            }
            json(StatusCode::OK, &status)
        }
        (Method::POST, "/reload") => {
            if let Some(refusal) = authorize(&shared, &request, peer) {
                return refusal;
            }
            match shared.reload_for(&peer.to_string()).await {
                Ok(warnings) if warnings.is_empty() => text(StatusCode::OK, "reloaded\n"),
                // Applied, with what the log said of it that the caller
                // would otherwise not see (review36a L4).
                Ok(warnings) => text(
                    StatusCode::OK,
                    format!("reloaded, with warnings (as logged):\n{warnings}"),
                ),
                // Refused (and logged) by the reload itself once the drain
                // began: the service is going, the file is not at fault.
                Err(refused) if refused == crate::server::RELOAD_IGNORED => {
                    text(StatusCode::SERVICE_UNAVAILABLE, format!("{refused}\n"))
                }
                Err(errors) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("{errors}\n")),
            }
        }
        (Method::DELETE, "/cache") => {
            if let Some(refusal) = authorize(&shared, &request, peer) {
                return refusal;
            }
            let proxy = shared.proxy.load();
            let Some(cache) = proxy.cache() else {
                return text(StatusCode::NOT_FOUND, "no [cache] configured\n");
            };
            match purge_request(request.uri().query()) {
                Ok(Purge::All) => {
                    let purged = cache.purge_all().await;
                    tracing::info!(client = %peer, purged, "cache purged");
                    text(
                        StatusCode::OK,
                        format!("purged everything: {}\n", stored(purged)),
                    )
                }
                Ok(Purge::Matching { host, prefixes }) => {
                    let on = host.as_deref().unwrap_or("");
                    // With what it was read as, when that differs: a prefix
                    // ending `/x/..` is `/`, everything (review34g L5).
                    let spelt: Vec<String> = prefixes
                        .iter()
                        .map(|p| match routing_path(p) {
                            normal if normal != p.as_str() => {
                                format!("{on}{p}* (read as {on}{normal}*)")
                            }
                            _ => format!("{on}{p}*"),
                        })
                        .collect();
                    let spelt = spelt.join(" and ");
                    let on = host.clone();
                    let matchers: Vec<_> = prefixes.into_iter().map(prefix_matcher).collect();
                    let paths = move |path: &str| matchers.iter().any(|m| m(path));
                    // Off the runtime's workers: the count scans the store.
                    let purger = cache.clone();
                    let purging = tokio::task::spawn_blocking(move || {
                        purger.purge_paths(move |stored_host, path| {
                            host.as_deref().is_none_or(|host| host == stored_host) && paths(path)
                        })
                    });
                    let Ok(purged) = purging.await else {
                        return text(StatusCode::INTERNAL_SERVER_ERROR, "purge failed\n");
                    };
                    cache.let_go().await;
                    // As text, not a list's Debug form inside a string (a
                    // JSON log held `"[\"/x\"]"`), and with the count the
                    // answer gives, so the log shows a purge that matched
                    // nothing (review35b F4). A text field is quoted and
                    // escaped: a `"` or a space in a prefix forges nothing.
                    tracing::info!(client = %peer, host = on.as_deref().unwrap_or("*"), prefix = spelt.as_str(), purged, "cache purged by prefix");
                    text(
                        StatusCode::OK,
                        format!("purged {spelt}: {}\n", stored(purged)),
                    )
                }
                Err(problem) => text(StatusCode::BAD_REQUEST, format!("{problem}\n")),
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/status") => not_allowed("GET, HEAD"),
        (_, "/reload") => not_allowed("POST"),
        (_, "/cache") => not_allowed("DELETE"),
        _ => text(StatusCode::NOT_FOUND, "404 Not Found\n"),
    }
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// What `DELETE /cache` asks for.
#[derive(Debug, PartialEq, Eq)]
enum Purge {
    All,
    /// The paths starting with one of `prefixes`, of one host
    /// (lower-cased, as keys hold it) or of all. Two prefixes when the
    /// value was written with `%XX` or `+`: as decoded, and as written,
    /// which is how a path copied from a request or the access log is
    /// stored (`/a%20b`, `/a+b`).
    Matching {
        host: Option<String>,
        prefixes: Vec<String>,
    },
}

/// `DELETE /cache` purges everything only when asked with no query at all;
/// otherwise the query holds a `prefix` starting with `/`, a `host`, or
/// both, at most once each (form-encoded, as curl `--data-urlencode` and
/// every query builder write them). Anything else is refused, so a
/// misspelt purge never empties the cache.
fn purge_request(query: Option<&str>) -> Result<Purge, String> {
    const USAGE: &str =
        "use DELETE /cache to purge everything, or DELETE /cache?prefix=/path (and/or host=NAME)";
    let (mut prefix, mut host, mut as_written) = (None, None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, written) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(name), Some(value)) = (form_decode(name), form_decode(written)) else {
            return Err(format!("malformed query `{pair}`: {USAGE}"));
        };
        // A prefix matches all below it; a `*` ending one, as a glob or
        // nginx's purge module would write it, means the same, where taken
        // literally it matched nothing (review31b L2).
        let (written, value) = match name.as_str() {
            "prefix" => (
                written
                    .trim_end_matches(['*'])
                    .trim_end_matches("%2A")
                    .trim_end_matches("%2a"),
                value.trim_end_matches('*').to_owned(),
            ),
            _ => (written, value),
        };
        if name == "prefix" {
            as_written = Some(written).filter(|&w| w != value && w.starts_with('/'));
        }
        let slot = match name.as_str() {
            "prefix" => &mut prefix,
            "host" => &mut host,
            _ => {
                let name = name.escape_debug();
                return Err(format!("unknown parameter `{name}`: {USAGE}"));
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!("`{name}` given twice: {USAGE}"));
        }
    }
    if let Some(host) = &mut host {
        if host.is_empty() || !crate::proxy::headers::valid_host(host.as_bytes()) {
            let host = host.escape_debug();
            return Err(format!("`{host}` is not a host: {USAGE}"));
        }
        // Keys hold the host without its scheme's default port (or an
        // empty one), and an IPv6 literal in one spelling.
        for default in [":80", ":443", ":"] {
            if let Some(bare) = host.strip_suffix(default) {
                *host = bare.to_owned();
            }
        }
        if let Some(canonical) = crate::proxy::headers::canonical_literal(host) {
            *host = canonical;
        }
    }
    match (prefix, host) {
        // `/cache?` too: what a script sends for `/cache?$QUERY` with the
        // query left empty (audit12), not a request to purge everything.
        (None, None) if query.is_some() => Err(USAGE.to_owned()),
        (None, None) => Ok(Purge::All),
        (Some(prefix), _) if !prefix.starts_with('/') => Err("prefix must start with /".to_owned()),
        // No request path holds one: such a prefix could match nothing,
        // and would be echoed raw into the answer and the log.
        (Some(prefix), _) if prefix.chars().any(char::is_control) => {
            Err("prefix must not hold control characters".to_owned())
        }
        (prefix, host) => Ok(Purge::Matching {
            host: host.map(|h| h.to_ascii_lowercase()),
            prefixes: std::iter::once(prefix.unwrap_or_else(|| "/".to_owned()))
                .chain(as_written.map(str::to_owned))
                .collect(),
        }),
    }
}

/// `n` stored responses, in words.
fn stored(n: u64) -> String {
    match n {
        1 => "1 stored response".to_owned(),
        n => format!("{n} stored responses"),
    }
}

/// Decodes one `application/x-www-form-urlencoded` name or value: `+` is a
/// space, `%XX` a byte; `None` for a bad escape or bytes that are not UTF-8.
fn form_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some(&b) = rest.first() {
        let (byte, taken) = match b {
            b'+' => (b' ', 1),
            // Hex digits only, as routes read escapes: `%+5` is none.
            b'%' => (escaped_byte(rest)?, 3),
            b => (b, 1),
        };
        bytes.push(byte);
        rest = &rest[taken..];
    }
    String::from_utf8(bytes).ok()
}

/// Which stored paths a purge of `prefix` drops: those starting with it as
/// written, and those whose normal form (as routes see it: `//a/./b` is
/// `/a/b`) starts with its normal form, so content purged under one
/// spelling is not still served under another.
fn prefix_matcher(prefix: String) -> impl Fn(&str) -> bool + Send + Sync + 'static {
    let normal = routing_path(&prefix).into_owned();
    move |path_and_query: &str| {
        if path_and_query.starts_with(&prefix) {
            return true;
        }
        let path = path_and_query.split('?').next().unwrap_or(path_and_query);
        routing_path(path).starts_with(&normal)
    }
}

/// How long an admin connection may take to send a request head, or sit
/// idle between requests.
const ADMIN_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves the admin endpoints on `listener` until aborted (after the
/// drain, so it can be watched).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // HTTP/1.1 only (Prometheus, curl and load balancers' probes all speak
    // it): hyper-util's protocol detection waits for a first byte with no
    // timer, so a client that connected and said nothing held its
    // connection forever. hyper's own head timer covers that here, and
    // keep-alive idleness between requests.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEAD_TIMEOUT);
    let local = listener
        .local_addr()
        .map_or_else(|_| "-".to_owned(), |a| a.to_string());
    let mut failing = crate::server::AcceptFailures::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                failing.recovered(&local);
                accepted
            }
            Err(error) => {
                failing.failed(&local, &error);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let service = service_fn(move |request| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(shared, request, peer).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback in any spelling is not exposed (review40d L2).
    #[test]
    fn loopback_in_any_spelling_is_not_exposed() {
        for addr in ["127.0.0.1:9000", "[::1]:9000", "[::ffff:127.0.0.1]:9000"] {
            assert_eq!(exposed(addr.parse().unwrap()), None, "{addr}");
        }
        assert!(exposed("[::]:9000".parse().unwrap()).is_some());
    }

    #[test]
    fn a_purge_is_everything_only_when_asked_with_no_query() {
        assert_eq!(purge_request(None), Ok(Purge::All));
        let prefix = |p: &[&str]| {
            Ok(Purge::Matching {
                host: None,
                prefixes: p.iter().map(|p| p.to_string()).collect(),
            })
        };
        assert_eq!(
            purge_request(Some("prefix=/users/1")),
            prefix(&["/users/1"])
        );
        // As curl --data-urlencode and urlencode() write it.
        assert_eq!(
            purge_request(Some("prefix=%2Fusers%2F1")),
            prefix(&["/users/1"])
        );
        // Written as a path is stored, copied from the access log: both.
        assert_eq!(
            purge_request(Some("prefix=/a+b%3F")),
            prefix(&["/a b?", "/a+b%3F"])
        );
        // One host's paths, or all of them.
        let of_host = |h: &str, p: &str| {
            Ok(Purge::Matching {
                host: Some(h.to_owned()),
                prefixes: vec![p.to_owned()],
            })
        };
        assert_eq!(
            purge_request(Some("host=Shop.Example&prefix=/a")),
            of_host("shop.example", "/a")
        );
        assert_eq!(
            purge_request(Some("host=shop.example:8080")),
            of_host("shop.example:8080", "/")
        );
        assert_eq!(
            purge_request(Some("host=shop.example:443")),
            of_host("shop.example", "/")
        );
        for refused in [
            "host=",
            "host=a&host=b",
            "host=a/b",
            "host=%0Aa",
            "host=a%7Cb",
            "host=a&prefix=b",
            "prefx=/users/1",
            "foo=bar",
            "prefix=/a&prefix=/b",
            "prefix=/a&all=1",
            "prefix=users",
            "prefix=%zz",
            "prefix=%",
            "prefix=%ff",
            "prefix=%+5",
            "prefix=/x%00y",
            "&",
            "",
        ] {
            assert!(purge_request(Some(refused)).is_err(), "{refused}");
        }
        // What the caller sent comes back escaped, never as raw bytes.
        let said = purge_request(Some("host=a%0d%0ab")).unwrap_err();
        assert!(said.starts_with("`a\\r\\nb` is not a host"), "{said}");
        let said = purge_request(Some("x%07=1")).unwrap_err();
        assert!(said.starts_with("unknown parameter `x\\u{7}`"), "{said}");
    }

    #[test]
    fn a_prefix_purge_matches_every_spelling_of_the_path() {
        let matches = prefix_matcher("/users/1".to_owned());
        for hit in [
            "/users/1/orders",
            "/users/1",
            "//users/1/orders?x=1",
            "/x/../users/1/o",
        ] {
            assert!(matches(hit), "{hit}");
        }
        for miss in ["/users/2/orders", "/users", "/"] {
            assert!(!matches(miss), "{miss}");
        }
        // A prefix with a query matches as written.
        assert!(prefix_matcher("/list?page=".to_owned())("/list?page=2"));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
