//! The validated runtime configuration. Everything here is typed
//! (`Duration`, `SocketAddr`, byte counts); the rest of portico never sees
//! TOML or strings that still need parsing. Built only by `config::load`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A whole, validated configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: Server,
    pub admin: Admin,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub cache: Option<Cache>,
    pub rate_limit: Option<RateLimit>,
    pub compression: Option<Compression>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub listen: Vec<SocketAddr>,
    pub request_header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_request_body: u64,
    pub max_header_size: u64,
    pub shutdown_grace: Duration,
    /// Client connections open at once, over all traffic listeners
    /// (HAProxy's `maxconn`, nginx's `worker_connections`); at the cap a
    /// listener stops accepting, and new connections wait in the kernel's
    /// backlog until one closes. `None`: no cap but the file limit.
    pub max_connections: Option<u32>,
    /// Peers whose forwarding fields are believed: the client address of
    /// `X-Forwarded-For` / `Forwarded` (the rate-limit key and the access
    /// line's `client`), and the scheme and host they say the client used.
    /// Given here or, as DESIGN.md has it, in `[rate_limit]`: one list.
    pub trusted_proxies: Vec<Cidr>,
    /// Which forwarding fields the trusted proxies write.
    pub trusted_fields: TrustedFields,
    pub tls: Vec<TlsListener>,
}

/// The forwarding fields a trusted proxy is believed in (nginx's
/// `real_ip_header`): the `X-Forwarded-For` / `-Proto` / `-Host` family,
/// RFC 7239 `Forwarded`, or either. With either, a request whose two
/// disagree is believed in neither, since a proxy that writes one passes a
/// client's forged other one on; naming the one the proxies write closes
/// that door: the other is then only a client's claim, and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrustedFields {
    #[default]
    Either,
    XForwarded,
    Forwarded,
}

impl TrustedFields {
    /// Whether `X-Forwarded-*` fields are read.
    pub fn x_forwarded(self) -> bool {
        self != TrustedFields::Forwarded
    }

    /// Whether `Forwarded` is read.
    pub fn forwarded(self) -> bool {
        self != TrustedFields::XForwarded
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsListener {
    pub listen: Vec<SocketAddr>,
    pub certificates: Vec<CertificatePair>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificatePair {
    /// Paths are resolved relative to the config file's folder.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Resolved relative to the config file's folder.
    pub token_file: Option<PathBuf>,
    /// The first line of `token_file`, read when the file was validated.
    pub token: Option<Token>,
}

/// A bearer token; its `Debug` does not show it, so a logged config does
/// not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    RandomTwo,
    /// Consistent hashing of the request's `hash_key`: nginx's `hash ...
    /// consistent`, HAProxy's `balance source` / `uri` / `hdr()` with
    /// `hash-type consistent`.
    Hash(HashKey),
}

/// What `balance = "hash"` hashes: its `hash_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `client_ip`: the client's address, as throttling reads it (through
    /// `trusted_proxies`).
    ClientIp,
    /// `uri`: the target's path and query, as the client wrote them.
    Uri,
    /// `path`: the target's path alone.
    Path,
    /// `header:NAME`: the field's value.
    Header(http::HeaderName),
    /// `cookie:NAME`: that cookie's value.
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub addr: SocketAddr,
    /// 0 to 1000; 0 is drained: no new requests, health still checked.
    pub weight: u32,
    /// Requests it is sent at once at most (nginx's `max_conns`, HAProxy's
    /// `maxconn`): its own `max_conns`, else the upstream's
    /// `max_conns_per_backend`; 0 for no cap.
    pub max_conns: u32,
    /// Takes requests only while no other backend can (nginx's and
    /// HAProxy's `backup`): every one down, ejected or drained.
    pub backup: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub backends: Vec<Backend>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub body_timeout: Duration,
    pub max_idle_per_backend: usize,
    /// How long a request waits for room when every backend is at its
    /// `max_conns`, before a 503; zero answers 503 at once.
    pub queue_timeout: Duration,
    /// How long a backend back in rotation (up again by its checks, its
    /// ejection over, undrained or added by a reload) takes to come up to
    /// its full share of requests; zero for at once. HAProxy's
    /// `slowstart`, nginx's `slow_start`.
    pub slow_start: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    /// An idempotent request without a body whose backend sent no
    /// response head within `response_timeout` goes to another backend
    /// (one of `retries`), as nginx's `proxy_next_upstream timeout` does.
    pub retry_on_timeout: bool,
    pub health: Option<HealthCheck>,
    /// Backends are reached over HTTPS when set.
    pub tls: Option<UpstreamTls>,
}

/// `tls = true` on an upstream: how its backends' certificates are checked.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// `tls_server_name`: sent as SNI and required in the certificate.
    /// Without it the backend's IP address must be in the certificate (and
    /// no SNI is sent, as TLS forbids IP addresses there).
    pub server_name: Option<String>,
    /// `tls_ca`: the PEM file of trust anchors, read at load time. Empty
    /// means the system's roots.
    pub ca: Option<PathBuf>,
    pub ca_certs: Vec<pki_types::CertificateDer<'static>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: String,
    /// `Host` of the checks (`name[:port]`, a valid Host); `None` for the
    /// upstream's `tls_server_name` if set, else each backend's address.
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// How a route matches the request's Host (port ignored, lower-cased).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    /// `api.example.com`
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any name ending with it.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub host: HostMatch,
    /// In [`routing_prefix`](crate::proxy::route::routing_prefix)'s form:
    /// a prefix of the paths the route takes, or with `exact` the one
    /// path it takes (the route's `path`).
    pub path_prefix: String,
    /// The route takes `path_prefix` alone, as nginx's `location =`.
    pub exact: bool,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// Resolved: the route's own `cache` if set, else whether `[cache]` exists.
    pub cache: bool,
    /// Resolved: the route's own `rate_limit` if set, else whether `[rate_limit]` exists.
    pub rate_limit: bool,
    /// The route's own rate, where its `rate_limit` gives one; else
    /// `[rate_limit]`'s.
    pub rate: Option<Rate>,
    /// Resolved: the route's own `compression` if set, else whether
    /// `[compression]` exists.
    pub compress: bool,
    /// The label of its metrics: its `name`, or else the upstream's name,
    /// suffixed `#2`, `#3`... when several routes share one upstream.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cache {
    pub max_size: u64,
    pub max_object_size: u64,
    pub default_ttl: Duration,
    /// How long past its freshness a stored response may be served when
    /// its backend fails, for responses that give no `stale-if-error` of
    /// their own (RFC 5861 §4); zero for none (nginx's
    /// `proxy_cache_use_stale`, Varnish's grace).
    pub stale_if_error: Duration,
}

/// Responses compressed with gzip for clients that take it (nginx's
/// `gzip`): see `proxy::compress`.
#[derive(Debug, Clone, PartialEq)]
pub struct Compression {
    /// Media types compressed, lower-case: `type/subtype`, or `type/*`
    /// for all of a type.
    pub types: Vec<String>,
    /// Responses whose `Content-Length` says less are sent as they are
    /// (a body of unknown length is compressed).
    pub min_size: u64,
    /// The encoder's level, 1 (fastest) to 9 (smallest).
    pub level: u32,
}

/// What `[compression]` compresses when its `types` are not given: text
/// a browser or an API client fetches, not media already compressed
/// (images but SVG, fonts in WOFF, video, archives).
pub const COMPRESSED_TYPES: &[&str] = &[
    "text/html",
    "text/css",
    "text/plain",
    "text/xml",
    "text/javascript",
    "text/markdown",
    "text/csv",
    "application/javascript",
    "application/json",
    "application/ld+json",
    "application/manifest+json",
    "application/problem+json",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/wasm",
    "image/svg+xml",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    ClientIp,
    Header(http::HeaderName),
}

#[derive(Debug, Clone, PartialEq, Eq, Copy)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// Logs what a loaded configuration risks that is no error, each with
/// where its key is written (`at`): said at start and at each reload alike
/// (`check` says the same, with the same places).
pub fn warn_of_risks(config: &Config, written: &super::Written<'_>) {
    if let Some(warning) = trusts_everyone(&config.server) {
        let at = written.at("server.trusted_proxies");
        tracing::warn!(at, "{warning}");
    }
    for (i, warning) in all_drained(config) {
        let at = written.at(&format!("upstream[{i}]"));
        tracing::warn!(at, "{warning}");
    }
    if let Some(max_connections) = config.server.max_connections {
        let at = written.at("server.max_connections");
        crate::server::warn_past_open_file_limit(max_connections, at);
    }
}

/// A warning for each upstream a route uses whose backends are all
/// drained (weight 0): its routes answer 503 to everything, almost always
/// a slip (review42i L1). Said by `check`, at start and at a reload;
/// with each, the upstream's place in the file.
pub fn all_drained(config: &Config) -> Vec<(usize, String)> {
    config
        .upstreams
        .iter()
        .enumerate()
        .filter(|(i, _)| config.routes.iter().any(|route| route.upstream == *i))
        .filter(|(_, upstream)| upstream.backends.iter().all(|b| b.weight == 0))
        .map(|(i, upstream)| {
            let said = format!(
                "upstream `{}`: every backend is drained (weight 0): its routes answer 503 to every request",
                upstream.name
            );
            (i, said)
        })
        .collect()
}

/// The warning for `trusted_proxies` that trusts every address of a
/// family (`0.0.0.0/0`, `::/0`): any client then chooses the address it
/// is logged and throttled as, and the scheme and host its backend hears.
/// Blocks that cover a family between them (`0.0.0.0/1` and
/// `128.0.0.0/1`, or `::ffff:0.0.0.0/96`, which a dual-stack listener's
/// IPv4 clients are matched by) are warned of too (review37d L2).
pub fn trusts_everyone(server: &Server) -> Option<String> {
    const CONSEQUENCE: &str = "any client can choose the address it is logged and throttled as, and the scheme and host its backend hears";
    let blocks = &server.trusted_proxies;
    if let Some(all) = blocks.iter().find(|cidr| cidr.prefix == 0) {
        return Some(format!(
            "trusted_proxies holds {}/0, every address: {CONSEQUENCE}",
            all.addr
        ));
    }
    // Each block as a range of IPv6 addresses, IPv4 ones as mapped.
    let mut ranges: Vec<(u128, u128)> = blocks
        .iter()
        .map(|cidr| {
            let (start, prefix) = match cidr.network() {
                std::net::IpAddr::V4(v4) => {
                    (u128::from(v4.to_ipv6_mapped()), 96 + u32::from(cidr.prefix))
                }
                std::net::IpAddr::V6(v6) => (u128::from(v6), u32::from(cidr.prefix)),
            };
            (start, start | u128::MAX.checked_shr(prefix).unwrap_or(0))
        })
        .collect();
    ranges.sort_unstable();
    let covers = |from: u128, to: u128| {
        let mut next = from;
        for &(start, end) in &ranges {
            if start > next {
                break;
            }
            if end >= to {
                return true;
            }
            next = next.max(end + 1);
        }
        false
    };
    let mapped = u128::from(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
    let family = if covers(0, u128::MAX) {
        "address"
    } else if covers(mapped, mapped | u128::from(u32::MAX)) {
        "IPv4 address"
    } else {
        // A block of public addresses as wide as a /8 of IPv4 or wider
        // than a /16 of IPv6 holds them by the million: `2000::/3` is every
        // public IPv6 address, `0.0.0.0/1` half of IPv4 (review37f L4,
        // review37g L4). 10.0.0.0/8, fc00::/7 and fe80::/10 are private.
        let wide_v4 = |net: std::net::Ipv4Addr, prefix: u8| {
            prefix < 8 || (prefix == 8 && !matches!(net.octets()[0], 0 | 10 | 127))
        };
        let wide = blocks.iter().find(|cidr| match cidr.network() {
            std::net::IpAddr::V4(v4) => wide_v4(v4, cidr.prefix),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if cidr.prefix >= 96 => wide_v4(v4, cidr.prefix - 96),
                // Past a /16 of public space (2a00::/8, 2000::/3), and
                // not the unique-local or link-local blocks.
                _ => {
                    let first = v6.segments()[0];
                    cidr.prefix < 16
                        && !(cidr.prefix >= 7 && first & 0xfe00 == 0xfc00)
                        // Link-local, and the old site-local fec0::/10.
                        && !(cidr.prefix >= 9 && first & 0xff80 == 0xfe80)
                }
            },
        })?;
        return Some(format!(
            "trusted_proxies holds {}/{}, public addresses by the million, more than any network of proxies: {CONSEQUENCE}, from any address in it",
            wide.network(),
            wide.prefix
        ));
    };
    Some(format!(
        "trusted_proxies covers every {family} between its blocks: {CONSEQUENCE}"
    ))
}

impl Cidr {
    /// The block's first address: `addr` with the host bits cleared.
    pub fn network(&self) -> std::net::IpAddr {
        masked(self.addr, self.prefix)
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && masked(ip, self.prefix) == self.network()
    }
}

fn masked(ip: std::net::IpAddr, prefix: u8) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// A sustained rate and the burst over it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Below 1 for slower ones (0.5: one every 2 s).
    pub requests_per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Sustained rate; below 1 for slower ones (0.5: one every 2 s).
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: RateLimitKey,
    pub max_tracked_clients: usize,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 8080))],
            request_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_request_body: 10 * 1024 * 1024,
            max_header_size: 64 * 1024,
            shutdown_grace: Duration::from_secs(30),
            max_connections: None,
            trusted_proxies: Vec::new(),
            trusted_fields: TrustedFields::default(),
            tls: Vec::new(),
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token_file: None,
            token: None,
        }
    }
}

impl Upstream {
    /// An upstream with DESIGN.md's defaults, for tests and the demo.
    pub fn new(name: impl Into<String>, backends: Vec<SocketAddr>) -> Self {
        Upstream {
            name: name.into(),
            backends: backends
                .into_iter()
                .map(|addr| Backend {
                    addr,
                    weight: 1,
                    max_conns: 0,
                    backup: false,
                })
                .collect(),
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_idle_per_backend: 64,
            queue_timeout: Duration::from_secs(5),
            slow_start: Duration::ZERO,
            idle_timeout: Duration::from_secs(90),
            retries: 1,
            retry_on_timeout: true,
            health: None,
            tls: None,
        }
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/health".into(),
            host: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            max_size: 256 * 1024 * 1024,
            max_object_size: 8 * 1024 * 1024,
            default_ttl: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        }
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            types: COMPRESSED_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            min_size: 1024,
            // zlib-rs's level 1 is zlib-ng's quick mode, a third larger
            // than zlib's level 1 (nginx's default); its 2 is about as
            // large, in half zlib's time.
            level: 2,
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            requests_per_second: 100.0,
            burst: 200,
            key: RateLimitKey::ClientIp,
            max_tracked_clients: 100_000,
        }
    }
}

impl Route {
    /// A route taking the paths under `path_prefix` (in
    /// [`routing_prefix`](crate::proxy::route::routing_prefix)'s form) on
    /// `host` to upstream `upstream`, neither caching nor throttling.
    pub fn new(
        host: HostMatch,
        path_prefix: impl Into<String>,
        upstream: usize,
        name: impl Into<String>,
    ) -> Self {
        Route {
            host,
            path_prefix: path_prefix.into(),
            exact: false,
            upstream,
            cache: false,
            rate_limit: false,
            rate: None,
            compress: false,
            name: name.into(),
        }
    }
}

impl RateLimit {
    /// The section's rate: that of every throttled route without its own.
    pub fn rate(&self) -> Rate {
        Rate {
            requests_per_second: self.requests_per_second,
            burst: self.burst,
        }
    }
}

impl Config {
    /// One upstream named "default" with a catch-all route: what the demo and
    /// most tests need.
    pub fn single_upstream(listen: Vec<SocketAddr>, backends: Vec<SocketAddr>) -> Self {
        let upstream = Upstream::new("default", backends);
        Config {
            server: Server {
                listen,
                ..Server::default()
            },
            admin: Admin::default(),
            routes: vec![Route::new(HostMatch::Any, "/", 0, upstream.name.clone())],
            upstreams: vec![upstream],
            cache: None,
            rate_limit: None,
            compression: None,
        }
    }
}
