//! The request path: validate the head, pick a route, clean the headers,
//! forward to a backend of the route's upstream and relay the answer.
//! Failures become short plain-text responses in one place
//! ([`error::ProxyError`]).

pub mod body;
pub mod error;
pub mod headers;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, Version};
use hyper::body::Incoming;

use crate::config::Config;
use crate::upstream::health::InFlight;
use crate::upstream::Upstream;
use body::{ProxyBody, RequestBody};
use error::ProxyError;
use headers::ClientInfo;
use route::Router;

/// What the server knows about the connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub peer: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
}

/// One immutable generation of the proxy's request-path state, built from a
/// validated config. A reload builds a new one and swaps it in whole.
#[derive(Debug)]
pub struct Proxy {
    router: Router,
    upstreams: Vec<Arc<Upstream>>,
    max_request_body: u64,
}

impl Proxy {
    pub fn new(config: &Config) -> Self {
        Proxy {
            router: Router::new(&config.routes),
            upstreams: config
                .upstreams
                .iter()
                .map(|u| Upstream::new(u.clone()))
                .collect(),
            max_request_body: config.server.max_request_body,
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Serves one request. Never fails: errors become responses.
    pub async fn handle(&self, request: Request<Incoming>, conn: Conn) -> Response<ProxyBody> {
        let method = request.method().clone();
        // A Uri clone shares its bytes: cheap, unlike formatting the path.
        let uri = request.uri().clone();
        match self.forward(request, conn).await {
            Ok(response) => response,
            Err(error) => {
                let status = error.status();
                if status.is_server_error() {
                    tracing::warn!(%method, path = uri.path(), client = %conn.peer, status = status.as_u16(), %error, "proxy error");
                } else {
                    tracing::debug!(%method, path = uri.path(), client = %conn.peer, status = status.as_u16(), %error, "request rejected");
                }
                error.into_response()
            }
        }
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        conn: Conn,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let host = request_host(&request)?;
        let (_, route) = self
            .router
            .find(
                host.as_ref().and_then(|h| h.to_str().ok()),
                request.uri().path(),
            )
            .ok_or(ProxyError::NoRoute)?;
        let upstream = &self.upstreams[route.upstream];

        if declared_length(&request)? > Some(self.max_request_body) {
            return Err(ProxyError::BodyTooLarge);
        }

        let (mut parts, body) = request.into_parts();
        headers::prepare_request(
            &mut parts.headers,
            ClientInfo {
                ip: conn.peer.ip(),
                proto: conn.proto,
                host: host.as_ref(),
                version: parts.version,
            },
        );
        // HTTP/2 carries the host in :authority; backends need a Host field.
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        let body = RequestBody::new(body, self.max_request_body, upstream.config.body_timeout);
        let (response, in_flight) = forward_with_retries(upstream, parts, body).await?;

        let (mut parts, body) = response.into_parts();
        headers::prepare_response(&mut parts.headers, parts.version);
        Ok(Response::from_parts(
            parts,
            ProxyBody::stream(body, upstream.config.body_timeout, Some(in_flight)),
        ))
    }
}

/// RFC 9110 §9.2.2 idempotent methods: safe to send twice.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Sends the request to a backend picked by the upstream's balancer. An
/// idempotent request without a body is retried on a different backend
/// after a connect failure or a connection lost before the response head,
/// up to `retries` times and while the upstream's retry budget allows. A
/// request with a body is never retried: its bytes may already be gone.
async fn forward_with_retries(
    upstream: &Upstream,
    parts: http::request::Parts,
    body: RequestBody,
) -> Result<(Response<Incoming>, InFlight), ProxyError> {
    let retryable = upstream.config.retries > 0
        && is_idempotent(&parts.method)
        && http_body::Body::is_end_stream(&body);
    upstream.record_request();
    let mut once = Some((parts, body));
    let mut replay: Option<http::request::Parts> = None;
    let mut skip = None;
    let mut attempt = 0;
    loop {
        let Some(index) = upstream.pick(skip) else {
            return Err(ProxyError::NoHealthyBackend);
        };
        let request = match once.take() {
            Some((parts, body)) => {
                if retryable {
                    replay = Some(copy_head(&parts));
                }
                Request::from_parts(parts, body)
            }
            None => {
                let head = replay.as_ref().expect("only retryable requests loop");
                Request::from_parts(copy_head(head), RequestBody::empty())
            }
        };
        let in_flight = upstream.backend(index).in_flight();
        match upstream.send(index, request).await {
            Ok(response) => {
                upstream.observe(index, true);
                return Ok((response, in_flight));
            }
            Err(error) => {
                if error.blames_backend() {
                    upstream.observe(index, false);
                }
                let again = retryable
                    && attempt < upstream.config.retries
                    && error.is_retryable()
                    && upstream.try_retry();
                if !again {
                    return Err(error);
                }
                tracing::debug!(upstream = %upstream.name(), %error, "retrying on another backend");
                attempt += 1;
                skip = Some(index);
                // With no other backend left, the original failure stands.
                if upstream.pick_is_empty(skip) {
                    return Err(error);
                }
            }
        }
    }
}

/// A copy of a request head for a retry; extensions are not carried over.
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// The host the client asked for. RFC 9112 §3.2: an HTTP/1.1 request without
/// exactly one Host field is rejected; HTTP/2 uses :authority, and a Host
/// field there must agree with it (RFC 9113 §8.3.1).
fn request_host(request: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("repeated Host header"));
    }
    let authority = request.uri().authority();
    match (request.version(), host, authority) {
        (Version::HTTP_11, None, _) => Err(ProxyError::BadRequest("missing Host header")),
        (Version::HTTP_2, Some(host), Some(authority)) if host != authority.as_str() => {
            Err(ProxyError::BadRequest("Host disagrees with :authority"))
        }
        // Absolute-form targets override Host (RFC 9112 §3.2.2).
        (_, _, Some(authority)) => Ok(HeaderValue::from_str(authority.as_str()).ok()),
        (_, Some(host), None) => Ok(Some(host.clone())),
        (_, None, None) => Ok(None),
    }
}

/// The request's Content-Length, if it declared one. Framing conflicts are
/// already refused by the HTTP/1 parser; this only reads the value.
fn declared_length(request: &Request<Incoming>) -> Result<Option<u64>, ProxyError> {
    match request.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or(ProxyError::BadRequest("invalid Content-Length")),
    }
}
