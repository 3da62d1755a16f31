//! Every way a proxied request can fail before a backend's answer reaches the
//! client, and the single place those failures become HTTP statuses.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::metrics::Failure;

/// Header fields a request may carry: hyper's fixed HTTP/1 limit, which
/// portico applies to HTTP/2 requests too (HAProxy's `tune.http.maxhdr`
/// is 101).
pub const MAX_HEADER_FIELDS: usize = 100;

/// Why portico answers a request itself instead of relaying a backend's
/// response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no route for this host and path")]
    NoRoute,
    /// A route's prefix asked for without its final `/`: sent there.
    #[error("a route's prefix without its final slash: redirected to {}", .0.location.to_str().unwrap_or("it"))]
    AddSlash(AddSlash),
    #[error("more than {MAX_HEADER_FIELDS} header fields")]
    TooManyFields,
    #[error("request uses a transfer coding other than chunked")]
    UnsupportedCoding,
    #[error("CONNECT is not supported: portico is a reverse proxy, not a tunnel")]
    ConnectMethod,
    #[error("TRACE is not forwarded: its answer would echo what the hops added")]
    TraceMethod,
    #[error("request body larger than max_request_body")]
    BodyTooLarge,
    #[error("request body stalled longer than body_timeout")]
    RequestBodyTimeout,
    #[error("client closed its connection in the middle of its upload")]
    ClientClosed,
    #[error("no healthy backend")]
    NoHealthyBackend,
    #[error("every backend of the upstream is drained (weight 0)")]
    AllDrained,
    /// Every backend up stayed at its `max_conns` while the request waited.
    #[error("every backend is at its max_conns{}", waited_for(*.waited))]
    Full { waited: std::time::Duration },
    /// The runtime stopped the task forwarding the request: portico is
    /// stopping.
    #[error("portico is stopping")]
    Stopping,
    #[error("client over its rate limit; may retry in {retry_after:?}")]
    Throttled {
        limit: u32,
        retry_after: std::time::Duration,
        reset: std::time::Duration,
    },
    #[error("backend {backend}: cannot connect: {}", Chain(source.as_ref()))]
    Connect {
        backend: std::net::SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// portico itself could not open the socket: out of file descriptors
    /// (EMFILE, ENFILE) or memory for it. Not the backend's doing.
    #[error(
        "cannot open a connection to backend {backend}: {}: portico's own limit, not the backend's (for \"Too many open files\", raise its open-file limit: ulimit -n, systemd LimitNOFILE)",
        Chain(source.as_ref())
    )]
    Exhausted {
        backend: std::net::SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("backend {backend}: connect or TLS handshake timed out (connect_timeout)")]
    ConnectTimeout { backend: std::net::SocketAddr },
    #[error("backend {backend} {}", Broke(source, *reset))]
    Upstream {
        backend: std::net::SocketAddr,
        source: hyper::Error,
        /// The backend reset the connection under the request (an upload
        /// it did not read): hyper's error is only the read that followed.
        reset: bool,
        /// On a connection taken idle from the pool, which the backend
        /// closed as the request went out (see `SendError::Stale`).
        stale: bool,
    },
    /// `after`: the `response_timeout` it waited (ops56 L5: the warning
    /// did not say how long that was).
    #[error("backend {backend} sent no response head within response_timeout ({after:?})")]
    ResponseTimeout {
        backend: std::net::SocketAddr,
        after: std::time::Duration,
    },
    /// The backend stopped reading the upload: hyper could not write to
    /// it for `body_timeout` (nginx's `proxy_send_timeout`).
    #[error("backend {backend} stopped reading the request body for longer than body_timeout")]
    UploadStalled { backend: std::net::SocketAddr },
    #[error("request came back to this proxy a second time (its Via names this proxy twice): a loop through an upstream")]
    Loop,
    #[error("backend {backend} sent a response portico cannot relay: {reason}")]
    BadResponse {
        backend: std::net::SocketAddr,
        reason: &'static str,
    },
}

/// Whether a connect failed in its TLS handshake: rustls's error, as
/// tokio-rustls wraps it in an `io::Error`, which hyper-rustls wraps in
/// another (an `io::Error`'s `source` skips what it wraps, so each is
/// opened; review42j M1: one level was looked into).
fn tls_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<rustls::Error>() {
            return true;
        }
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if let Some(wrapped) = wrapped {
            if tls_refused(wrapped) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// Where to send a request for a route's prefix without its final `/`,
/// and how: 301 Moved Permanently for GET and HEAD (as nginx answers
/// every method), 308 Permanent Redirect for the others, which a client
/// sends again as they were, body and all, where after a 301 it may turn
/// a POST into a GET (RFC 9110 §15.4.2, §15.4.9).
#[derive(Debug)]
pub struct AddSlash {
    location: HeaderValue,
    status: StatusCode,
}

impl AddSlash {
    /// To `prefix` (visible ASCII: see `Router`), with the request's query.
    /// A path, never a URL: the client stays on the host it asked, and a
    /// Host field cannot send it elsewhere.
    pub fn new<B>(request: &http::Request<B>, prefix: &str) -> Self {
        let location = match request.uri().query() {
            Some(query) => HeaderValue::try_from(format!("{prefix}?{query}")),
            None => HeaderValue::try_from(prefix),
        };
        let status = if matches!(*request.method(), http::Method::GET | http::Method::HEAD) {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::PERMANENT_REDIRECT
        };
        AddSlash {
            location: location.unwrap_or_else(|_| HeaderValue::from_static("/")),
            status,
        }
    }
}

/// An error with its causes, `outer: inner: innermost`: hyper-util's
/// connect error says only "tcp connect error", and the cause an operator
/// needs ("Connection refused", as nginx's `connect() failed (111:
/// Connection refused)` gives it) is its source. A cause whose text its
/// error already showed is not repeated.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !shown.contains(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            cause = error.source();
        }
        Ok(())
    }
}

/// How a backend broke its response, in an operator's terms where hyper's
/// would mislead: its "message head is too large" is said of a head with
/// more than 100 fields too, however short.
/// A backend's error and whether it reset the connection under the
/// request (hyper's error is then the read that followed: a reset, or the
/// end of the connection if the write took the reset).
struct Broke<'a>(&'a hyper::Error, bool);

impl std::fmt::Display for Broke<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A head that does not parse is counted `bad_response`, and said
        // as the heads portico refuses are (lb55 L5: it read "broke the
        // response", as a reset does).
        if self.1 {
            f.write_str("broke the response: connection reset while the request was sent to it")
        } else if self.0.is_parse_too_large() {
            write!(
                f,
                "sent a response portico cannot relay: head too large (over {} KiB, or more than 100 fields)",
                crate::upstream::UPSTREAM_READ_BUFFER >> 10
            )
        } else if self.0.is_parse() {
            write!(f, "sent a response portico cannot relay: {}", Chain(self.0))
        } else {
            // hyper says only "connection error" of an I/O error; the
            // cause (a reset, portico's own limit) is its source.
            write!(f, "broke the response: {}", Chain(self.0))
        }
    }
}

/// How long a request turned away for want of room waited, as its error
/// says it (nothing with `queue_timeout = "0s"`).
fn waited_for(waited: std::time::Duration) -> String {
    if waited.is_zero() {
        String::new()
    } else {
        format!(" (waited {waited:?} for room)")
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::AddSlash(to) => to.status,
            ProxyError::TooManyFields => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            // As nginx answers both: methods portico knows and will not
            // forward, not ones it has never heard of. (A 501 would also
            // put every open-proxy scanner's CONNECT among the 5xx.)
            ProxyError::ConnectMethod | ProxyError::TraceMethod => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientClosed => {
                StatusCode::from_u16(super::CLIENT_CLOSED).expect("499 is a three-digit status")
            }
            ProxyError::NoHealthyBackend
            | ProxyError::AllDrained
            | ProxyError::Full { .. }
            | ProxyError::Stopping
            | ProxyError::Exhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::BadResponse { .. }
            | ProxyError::Loop => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. }
            | ProxyError::ResponseTimeout { .. }
            | ProxyError::UploadStalled { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether the failure counts against the backend's passive health
    /// (the keep-alive race sent again does not: see `forward_with_retries`).
    pub fn blames_backend(&self) -> bool {
        self.backend_failure().is_some()
    }

    /// What went wrong with an attempt that got no head from the backend,
    /// as `portico_upstream_errors_total` names it; `None` for what was
    /// not the backend's doing.
    pub fn backend_failure(&self) -> Option<Failure> {
        Some(match self {
            ProxyError::Connect { source, .. } if tls_refused(source.as_ref()) => Failure::Tls,
            ProxyError::Connect { .. } => Failure::Connect,
            ProxyError::ConnectTimeout { .. } => Failure::ConnectTimeout,
            ProxyError::ResponseTimeout { .. } => Failure::ResponseTimeout,
            // A head hyper could not parse (a field without a colon,
            // `Content-Length: 5x`) is the backend's answer, not the
            // network's (review42e M2).
            ProxyError::Upstream { source, .. } if source.is_parse() => Failure::BadResponse,
            ProxyError::Upstream { .. } => Failure::Broken,
            ProxyError::UploadStalled { .. } => Failure::UploadStalled,
            ProxyError::BadResponse { .. } => Failure::BadResponse,
            _ => return None,
        })
    }

    /// The backend an attempt failed on, if one did.
    pub fn backend(&self) -> Option<std::net::SocketAddr> {
        match self {
            ProxyError::Connect { backend, .. }
            | ProxyError::Exhausted { backend, .. }
            | ProxyError::ConnectTimeout { backend }
            | ProxyError::Upstream { backend, .. }
            | ProxyError::ResponseTimeout { backend, .. }
            | ProxyError::UploadStalled { backend }
            | ProxyError::BadResponse { backend, .. } => Some(*backend),
            _ => None,
        }
    }

    /// The request went out on a pooled connection the backend closed as
    /// it was reused, before any of its answer (the keep-alive race).
    pub fn stale_connection(&self) -> bool {
        matches!(self, ProxyError::Upstream { stale: true, .. })
    }

    /// Whether the attempt counts in the backend's
    /// `portico_upstream_requests_total`: not when portico could not even
    /// open a socket for it.
    pub fn reached_for_backend(&self) -> bool {
        !matches!(self, ProxyError::Exhausted { .. })
    }

    /// Whether an idempotent request may be sent again elsewhere. A response
    /// timeout is only under `retry_on_timeout` (see `forward_with_retries`):
    /// the backend may still be working on it, and waiting twice doubles
    /// the client's wait. Nor is a response head that does not parse: the
    /// backend answered, badly, and would most likely answer so again
    /// (nginx retries it only with `proxy_next_upstream invalid_header`,
    /// HAProxy only with `retry-on junk-response`).
    pub fn is_retryable(&self) -> bool {
        match self {
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } => true,
            ProxyError::Upstream { source, .. } => !source.is_parse(),
            _ => false,
        }
    }

    /// Whether the backend may have acted on the request: it was sent, and
    /// what came back (nothing, a broken or late answer) does not say
    /// whether the backend carried it out.
    pub fn may_have_acted(&self) -> bool {
        matches!(
            self,
            ProxyError::Upstream { .. }
                | ProxyError::ResponseTimeout { .. }
                | ProxyError::UploadStalled { .. }
                | ProxyError::BadResponse { .. }
        )
    }

    /// The backend never received a byte of the request: the connection was
    /// refused or never established.
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. }
        )
    }

    /// A short plain-text answer; details stay in the log, not on the wire.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = match self {
            // Not "no healthy backend": they may all be fine, and the
            // operator who drained them may be the one reading.
            ProxyError::AllDrained => plain_response(
                self.status(),
                "503 Service Unavailable: every backend is drained\n",
            ),
            // Nor here: they are healthy, and busy.
            ProxyError::Full { .. } => plain_response(
                self.status(),
                "503 Service Unavailable: every backend is busy\n",
            ),
            // Not "no healthy backend" either: the backends are not at fault.
            ProxyError::Exhausted { .. } => plain_response(
                self.status(),
                "503 Service Unavailable: the proxy is out of connections\n",
            ),
            // Which rule the request broke, as HTTP/1's parser cannot say
            // (an HTTP/2 client's Host against its :authority, say): a
            // bare 400 left the client guessing (review34a F8).
            ProxyError::BadRequest(reason) => {
                plain_response(self.status(), format!("400 Bad Request: {reason}\n"))
            }
            ProxyError::AddSlash(to) => {
                let text = match to.status {
                    StatusCode::MOVED_PERMANENTLY => "301 Moved Permanently\n",
                    _ => "308 Permanent Redirect\n",
                };
                let mut response = plain_response(to.status, text);
                response.headers_mut().insert(header::LOCATION, to.location);
                return response;
            }
            _ => error_response(self.status()),
        };
        if let ProxyError::Throttled {
            limit,
            retry_after,
            reset,
        } = self
        {
            rate_limit_headers(response.headers_mut(), limit, 0, reset, Some(retry_after));
        }
        response
    }
}

/// A plain-text response whose body is the status line's reason phrase.
pub fn error_response(status: StatusCode) -> Response<ProxyBody> {
    let text: &'static str = match status {
        StatusCode::BAD_REQUEST => "400 Bad Request\n",
        StatusCode::NOT_FOUND => "404 Not Found: no route\n",
        StatusCode::METHOD_NOT_ALLOWED => "405 Method Not Allowed\n",
        StatusCode::PAYLOAD_TOO_LARGE => "413 Content Too Large\n",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "431 Request Header Fields Too Large\n",
        StatusCode::PRECONDITION_FAILED => "412 Precondition Failed\n",
        StatusCode::NOT_IMPLEMENTED => "501 Not Implemented\n",
        StatusCode::REQUEST_TIMEOUT => "408 Request Timeout\n",
        StatusCode::TOO_MANY_REQUESTS => "429 Too Many Requests\n",
        StatusCode::SERVICE_UNAVAILABLE => "503 Service Unavailable: no healthy backend\n",
        StatusCode::BAD_GATEWAY => "502 Bad Gateway\n",
        StatusCode::GATEWAY_TIMEOUT => "504 Gateway Timeout\n",
        closed if closed.as_u16() == super::CLIENT_CLOSED => "499 Client Closed Request\n",
        _ => "error\n",
    };
    plain_response(status, text)
}

/// A plain-text, uncacheable `status` with `text` for its body.
fn plain_response(status: StatusCode, text: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(text.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    // The HTTP/1 status line's reason, as the body says, where hyper's
    // would differ: RFC 9110's name for 413 (hyper gives RFC 7231's
    // `Payload Too Large`), and nginx's for 499, which hyper has none for
    // (a client that half-closed mid-upload reads it). HTTP/2 has none.
    let reason: Option<&'static [u8]> = match status.as_u16() {
        413 => Some(b"Content Too Large"),
        super::CLIENT_CLOSED => Some(b"Client Closed Request"),
        _ => None,
    };
    if let Some(reason) = reason {
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(reason));
    }
    response
}

/// Whether `name` is a rate-limit field: the IETF httpapi drafts' old
/// and new (`RateLimit-*`, `RateLimit`, `RateLimit-Policy`) and the
/// families APIs send (`X-RateLimit-*`: GitHub's `-Used` and `-Resource`
/// too, Discord's `-Reset-After` and `-Bucket`; Twitter's
/// `X-Rate-Limit-*`). A backend's describe the quota of the client it
/// answered, so a stored response keeps none of them (a hit would hand one
/// user's quota to everyone, review33c M1, review33e F6), and a response
/// from the backend that has one keeps its own, without portico's
/// (review33d F3).
pub fn is_rate_limit_field(name: &str) -> bool {
    name.starts_with("ratelimit")
        || name.starts_with("x-ratelimit-")
        || name.starts_with("x-rate-limit-")
}

/// Drops every rate-limit field (see [`is_rate_limit_field`]).
pub fn remove_rate_limit_fields(headers: &mut http::HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|name| is_rate_limit_field(name.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The `RateLimit-*` fields of an allowed request's quota (`limit`,
/// `remaining`, `reset`), when its route is limited, unless the backend
/// gave its own: its quota (per user, per API key) is the one its answer
/// speaks of, and a 429 of its own said "9 left, back in 1 s" beside its
/// own `Retry-After: 30` once portico's replaced them (review33b F4).
/// Nor does a 429 or 503 that says when to come back in a `Retry-After`
/// alone get them: "4 left, all back in 1 s" beside the backend's
/// `Retry-After: 30` sent its clients back 29 s early (limit53 L2).
pub fn quota_headers(
    status: StatusCode,
    headers: &mut http::HeaderMap,
    quota: Option<(u32, u32, std::time::Duration)>,
) {
    if let Some((limit, remaining, reset)) = quota {
        let says_when = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) && headers.contains_key(header::RETRY_AFTER);
        if says_when
            || headers
                .keys()
                .any(|name| is_rate_limit_field(name.as_str()))
        {
            return;
        }
        rate_limit_headers(headers, limit, remaining, reset, None);
    }
}

/// `RateLimit-*` fields (IETF httpapi draft names): `Reset` is when the
/// whole budget is back, and when throttled, `Retry-After` is when the
/// next request is allowed; both in whole seconds rounded up.
pub fn rate_limit_headers(
    headers: &mut http::HeaderMap,
    limit: u32,
    remaining: u32,
    reset: std::time::Duration,
    retry_after: Option<std::time::Duration>,
) {
    let seconds = |wait: std::time::Duration| {
        HeaderValue::from((wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1))
    };
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert("ratelimit-reset", seconds(reset));
    if let Some(wait) = retry_after {
        headers.insert(header::RETRY_AFTER, seconds(wait));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper-util's connect error: a bare summary over the real cause.
    #[derive(Debug)]
    struct Summary(std::io::Error);

    impl std::fmt::Display for Summary {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect error")
        }
    }

    impl std::error::Error for Summary {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_connect_failure_says_its_cause() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = ProxyError::Connect {
            backend: "127.0.0.1:9".parse().unwrap(),
            source: Box::new(Summary(refused)),
        };
        assert_eq!(
            error.to_string(),
            "backend 127.0.0.1:9: cannot connect: tcp connect error: connection refused"
        );
        assert_eq!(error.backend_failure(), Some(Failure::Connect));
    }

    /// A handshake the backend's certificate failed is counted as `tls`,
    /// not as a refused connect (review42f L2): rustls's error, inside
    /// the `io::Error` tokio-rustls makes of it, under the summary.
    #[test]
    fn a_failed_tls_handshake_is_told_from_a_refused_connect() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        // hyper-rustls wraps tokio-rustls's `io::Error` in another
        // (review42j M1: only one level was looked into).
        let io = std::io::Error::other(io);
        let error = ProxyError::Connect {
            backend: "127.0.0.1:9".parse().unwrap(),
            source: Box::new(Summary(io)),
        };
        assert_eq!(error.backend_failure(), Some(Failure::Tls));
    }
}
