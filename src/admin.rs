//! The admin listener, separate from traffic: `GET /metrics` (Prometheus
//! text format), `/healthz` (process alive), `/readyz` (every upstream has a
//! backend taking traffic), `/status` (JSON), and the token-protected
//! mutations `POST /reload` and `DELETE /cache?prefix=`. Without a
//! `token_file` the mutations are disabled (403); a missing or wrong bearer
//! token gets 401.

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

use crate::server::shutdown::Shutdown;
use crate::server::Shared;

type Body = Full<Bytes>;

/// Reads the admin token: the file's first line, trimmed. An empty file is
/// an error, since it would make every token check trivially pass.
pub fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot read admin token_file {}: {e}", path.display()),
        )
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("admin token_file {} is empty", path.display()),
        ));
    }
    Ok(token)
}

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

/// `None` when the caller may mutate; otherwise the refusal.
fn authorize(token: Option<&str>, request: &Request<Incoming>) -> Option<Response<Body>> {
    let Some(token) = token else {
        return Some(text(
            StatusCode::FORBIDDEN,
            "403 Forbidden: set [admin] token_file to enable this call\n",
        ));
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => None,
        _ => {
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
                        "in_flight": b.in_flight,
                    })
                })
                .collect();
            serde_json::json!({ "name": u.name(), "backends": backends })
        })
        .collect();
    serde_json::json!({
        "upstreams": upstreams,
        "connections_open": shared.metrics.connections_open.get(),
        "limiter_keys": proxy.limiter().map(|l| l.tracked_keys()),
    })
}

/// Refreshes the gauges that are read off live state rather than counted.
fn refresh_gauges(shared: &Shared) {
    let proxy = shared.proxy.load();
    let mut rows = Vec::new();
    for upstream in proxy.upstreams() {
        for backend in upstream.status() {
            rows.push((upstream.name(), backend.addr.to_string(), backend.up));
        }
    }
    shared.metrics.set_backends_up(rows.into_iter());
}

async fn handle(
    shared: Arc<Shared>,
    token: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Response<Body> {
    let method = request.method().clone();
    match (method, request.uri().path()) {
        (Method::GET, "/metrics") => {
            refresh_gauges(&shared);
            let cache = shared.proxy.load().cache().cloned();
            if let Some(cache) = cache {
                cache.stats().await;
            }
            let mut response = text(StatusCode::OK, shared.metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET, "/readyz") => {
            let proxy = shared.proxy.load();
            let down: Vec<&str> = proxy
                .upstreams()
                .iter()
                .filter(|u| !u.status().iter().any(|b| b.up))
                .map(|u| u.name())
                .collect();
            if down.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: no backend up in {}\n", down.join(", ")),
                )
            }
        }
        (Method::GET, "/status") => {
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
                    "max_size_bytes": cache.config.max_size,
                    "hit_ratio": if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
                });
            }
            json(StatusCode::OK, &status)
        }
        (Method::POST, "/reload") => {
            if let Some(refusal) = authorize(token.as_deref(), &request) {
                return refusal;
            }
            match shared.reload() {
                Ok(()) => text(StatusCode::OK, "reloaded\n"),
                Err(errors) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("{errors}\n")),
            }
        }
        (Method::DELETE, "/cache") => {
            if let Some(refusal) = authorize(token.as_deref(), &request) {
                return refusal;
            }
            let proxy = shared.proxy.load();
            let Some(cache) = proxy.cache() else {
                return text(StatusCode::NOT_FOUND, "no [cache] configured\n");
            };
            let prefix = request
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|pair| pair.strip_prefix("prefix="));
            match prefix {
                Some(prefix) if prefix.starts_with('/') => {
                    cache.purge_prefix(prefix);
                    text(StatusCode::OK, format!("purged {prefix}*\n"))
                }
                Some(_) => text(StatusCode::BAD_REQUEST, "prefix must start with /\n"),
                None => {
                    cache.purge_all();
                    text(StatusCode::OK, "purged everything\n")
                }
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/status") => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "404 Not Found\n"),
    }
}

/// How long an admin connection may take to send a request head, or sit
/// idle between requests.
const ADMIN_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves the admin endpoints on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Option<String>,
    mut shutdown: Shutdown,
) {
    let token: Option<Arc<str>> = token.map(Arc::from);
    // HTTP/1.1 only (Prometheus, curl and load balancers' probes all speak
    // it): hyper-util's protocol detection waits for a first byte with no
    // timer, so a client that connected and said nothing held its
    // connection forever. hyper's own head timer covers that here, and
    // keep-alive idleness between requests.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEAD_TIMEOUT);
    let local: Option<SocketAddr> = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.recv() => break,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(listener = ?local, %error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let token = token.clone();
        let service = service_fn(move |request| {
            let shared = shared.clone();
            let token = token.clone();
            async move { Ok::<_, Infallible>(handle(shared, token, request).await) }
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

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
