//! Upstreams: a named set of backend instances, the choice among them and
//! the pooled keep-alive client that talks to them. Knows HTTP only as far
//! as sending a prepared request; header hygiene and routing live in
//! `proxy`.

mod balance;

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config;
use crate::proxy::body::RequestBody;
use crate::proxy::error::ProxyError;

pub use balance::RoundRobin;

/// One backend instance of an upstream.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Pre-built so a request's URI costs a cheap clone, not formatting.
    authority: Authority,
}

/// A running upstream: its backends, balancer and connection pool.
#[derive(Debug)]
pub struct Upstream {
    pub config: config::Upstream,
    backends: Vec<Backend>,
    balancer: RoundRobin,
    client: Client<HttpConnector, RequestBody>,
}

impl Upstream {
    pub fn new(config: config::Upstream) -> Self {
        let backends = config
            .backends
            .iter()
            .map(|b| Backend {
                addr: b.addr,
                weight: b.weight,
                authority: Authority::try_from(b.addr.to_string().as_str())
                    .expect("a SocketAddr always formats as a valid authority"),
            })
            .collect();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle_per_backend)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Upstream {
            config,
            backends,
            balancer: RoundRobin::default(),
            client,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backend for the next request.
    pub fn pick(&self) -> Option<&Backend> {
        self.balancer
            .pick(self.backends.len())
            .map(|i| &self.backends[i])
    }

    /// Sends `request` (path and headers already prepared) to `backend` and
    /// waits for the response head within `response_timeout`.
    pub async fn send(
        &self,
        backend: &Backend,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(backend.authority.clone());
        parts.path_and_query = Some(path);
        *request.uri_mut() =
            Uri::from_parts(parts).expect("scheme, authority and path make a valid URI");
        // Backends speak HTTP/1.1 whatever the client used.
        *request.version_mut() = http::Version::HTTP_11;

        let addr = backend.addr;
        match tokio::time::timeout(self.config.response_timeout, self.client.request(request)).await
        {
            Err(_) => Err(ProxyError::ResponseTimeout { backend: addr }),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(classify(addr, e)),
        }
    }
}

/// Sorts a client error into the proxy's error kinds by walking its causes.
fn classify(backend: SocketAddr, error: hyper_util::client::legacy::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<crate::proxy::body::BodyError>() {
            return match body {
                crate::proxy::body::BodyError::TooLarge { .. } => ProxyError::BodyTooLarge,
                crate::proxy::body::BodyError::Stalled(_) => ProxyError::RequestBodyTimeout,
                // The client's upload broke: nobody is left to answer.
                crate::proxy::body::BodyError::Hyper(_) => {
                    ProxyError::BadRequest("request body aborted")
                }
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut && error.is_connect() {
                return ProxyError::ConnectTimeout { backend };
            }
        }
        source = e.source();
    }
    if error.is_connect() {
        ProxyError::Connect {
            backend,
            source: error,
        }
    } else {
        ProxyError::Upstream {
            backend,
            source: error,
        }
    }
}
