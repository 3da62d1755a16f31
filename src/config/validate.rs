//! Raw file -> typed [`Config`]: defaults filled in, every value parsed and
//! every rule checked, with all problems collected rather than stopping at
//! the first.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::error::Reporter;
use super::model::*;
use super::raw;
use super::units::{parse_duration, parse_size};

type R<'r, 'a> = &'r mut Reporter<'a>;

fn duration(r: R, key: &str, value: Option<&raw::Str>, default: Duration) -> Duration {
    let Some(value) = value else { return default };
    parse_duration(value.get_ref()).unwrap_or_else(|e| {
        r.at(value.span(), key, e);
        default
    })
}

/// A duration that must not be zero.
fn positive(r: R, key: &str, value: Option<&raw::Str>, default: Duration) -> Duration {
    let parsed = duration(r, key, value, default);
    if parsed.is_zero() {
        if let Some(value) = value {
            r.at(value.span(), key, "must be greater than 0");
        }
        return default;
    }
    parsed
}

fn size(r: R, key: &str, value: Option<&raw::Str>, default: u64) -> u64 {
    let Some(value) = value else { return default };
    match parse_size(value.get_ref()) {
        Ok(0) => {
            r.at(value.span(), key, "must be greater than 0");
            default
        }
        Ok(n) => n,
        Err(e) => {
            r.at(value.span(), key, e);
            default
        }
    }
}

fn integer(r: R, key: &str, value: Option<&Spanned<i64>>, default: u32, min: u32) -> u32 {
    let Some(value) = value else { return default };
    match u32::try_from(*value.get_ref()) {
        Ok(n) if n >= min => n,
        _ => {
            r.at(
                value.span(),
                key,
                format!("must be a whole number from {min} to {}", u32::MAX),
            );
            default
        }
    }
}

/// The slowest rate: one request an hour.
const MIN_RATE: f64 = 1.0 / 3600.0;
/// The fastest: one request a nanosecond, GCRA's resolution.
const MAX_RATE: f64 = 1e9;

fn rate(r: R, key: &str, value: Option<&Spanned<raw::Number>>, default: f64) -> f64 {
    let Some(value) = value else { return default };
    let rate = value.get_ref().0;
    if (MIN_RATE..=MAX_RATE).contains(&rate) {
        return rate;
    }
    r.at(
        value.span(),
        key,
        "must be a number from 0.000278 (one request an hour) to 1000000000; \
         below 1 for slower rates, e.g. 0.5 for one request every 2 s"
            .to_owned(),
    );
    default
}

fn socket_addr(r: R, key: &str, value: &str, span: std::ops::Range<usize>) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            r.at(
                span,
                key,
                format!("`{value}` is not an address: write IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""),
            );
            None
        }
    }
}

/// The addresses of a listen list, each claimed with its own key
/// (`server.listen[2]`) and span (zipped with the list after the bad
/// entries were left out, a clash was put at another entry's place,
/// review34d L1).
fn listen_list(r: R, key: &str, values: &[raw::Str], claim: &mut Claim) -> Vec<SocketAddr> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let key = format!("{key}[{i}]");
            let addr = socket_addr(r, &key, v.get_ref(), v.span())?;
            claim(r, key, addr, v.span());
            Some(addr)
        })
        .collect()
}

pub fn validate(file: raw::File, r: R, base: &Path) -> Config {
    // Defaults claim with an empty span; a clash with one is reported at the
    // address the operator actually wrote.
    let mut used_addrs: HashMap<SocketAddr, (String, std::ops::Range<usize>)> = HashMap::new();
    let mut claim = |r: R, key: String, addr: SocketAddr, span: std::ops::Range<usize>| {
        // Port 0 asks the OS for a fresh port each time: never a clash.
        if addr.port() == 0 {
            return;
        }
        // `[::ffff:127.0.0.1]:P` is `127.0.0.1:P`: binding both fails at
        // start, with a message that blames another process.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        // A wildcard address takes its port on every address of its
        // family (an IPv6 one on IPv4 too, dual-stack being the default):
        // binding both would fail at start.
        // The first in the file, whatever the map's order.
        let overlapping = used_addrs
            .iter()
            .filter(|(used, _)| **used != addr && overlap(**used, addr))
            .min_by_key(|(_, (_, span))| span.start);
        if let Some((used, (first, first_span))) = overlapping {
            if span.is_empty() {
                r.at(
                    first_span.clone(),
                    first.clone(),
                    format!("{used} overlaps {addr}, {key}'s default; set {key} elsewhere"),
                );
            } else {
                r.at(span, key, overlap_message(addr, *used, first));
            }
            return;
        }
        match used_addrs.get(&addr) {
            Some((first, first_span)) if span.is_empty() => {
                r.at(
                    first_span.clone(),
                    first.clone(),
                    format!("{addr} is also {key}'s default; set {key} elsewhere"),
                );
            }
            Some((first, _)) => r.at(span, key, format!("{addr} is already used by {first}")),
            None => {
                used_addrs.insert(addr, (key, span));
            }
        }
    };

    let server_trusts = file
        .server
        .as_ref()
        .is_some_and(|s| s.get_ref().trusted_proxies.is_some());
    let mut server = server(r, file.server, base, &mut claim);
    let admin = admin(r, file.admin, base, &mut claim);

    let mut upstreams = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    // Where clients reach this proxy: a backend there would loop.
    let own: Vec<(SocketAddr, String)> = (server
        .listen
        .iter()
        .map(|a| (*a, "server.listen".to_owned())))
    .chain(server.tls.iter().enumerate().flat_map(|(i, t)| {
        t.listen
            .iter()
            .map(move |a| (*a, format!("server.tls[{i}].listen")))
    }))
    // The admin API as a backend would serve `/metrics`, `/status` and,
    // to whoever has the token, reload and purge on the traffic port
    // (review36a L5).
    .chain(std::iter::once((admin.listen, "admin.listen".to_owned())))
    .collect();
    for (i, spanned) in file.upstream.iter().enumerate() {
        let key = format!("upstream[{i}]");
        let upstream = upstream(r, &key, spanned.get_ref(), base, &own);
        let name = spanned.get_ref().name.clone();
        if by_name.contains_key(name.get_ref()) {
            r.at(
                name.span(),
                format!("{key}.name"),
                format!("upstream `{}` is defined twice", name.get_ref()),
            );
            continue;
        }
        by_name.insert(name.get_ref().clone(), upstreams.len());
        upstreams.push(upstream);
    }
    if file.upstream.is_empty() {
        r.whole(
            "upstream",
            "no [[upstream]] defined: there is nowhere to send requests",
        );
    }

    let cache = file.cache.map(|c| cache(r, c.get_ref()));
    let compression = file
        .compression
        .as_ref()
        .map(|c| compression(r, c.get_ref()));
    let rate_limit = file.rate_limit.as_ref().map(|l| rate_limit(r, l.get_ref()));
    // One list of trusted proxies, for throttling keys and forwarding
    // fields alike, given in [server] or (DESIGN.md's place) [rate_limit].
    let limit_trusts = file.rate_limit.as_ref().and_then(|raw| {
        let list = raw.get_ref().trusted_proxies.as_ref()?;
        Some((list, list.first().map_or_else(|| raw.span(), |p| p.span())))
    });
    if let Some((list, span)) = limit_trusts {
        if server_trusts {
            r.at(
                span,
                "rate_limit.trusted_proxies",
                "also given in [server]: give the list once (server.trusted_proxies applies to throttling too)",
            );
        } else {
            server.trusted_proxies = cidr_list(r, "rate_limit.trusted_proxies", Some(list));
        }
    }

    let mut routes = Vec::new();
    let mut seen_routes: HashSet<(Option<String>, String, bool)> = HashSet::new();
    // Names given with `name`, and where; derived ones are checked against
    // them once every route is read.
    let mut given_names: HashMap<String, usize> = HashMap::new();
    let mut derived_count: HashMap<String, usize> = HashMap::new();
    let mut derived: Vec<(usize, String)> = Vec::new();
    for (i, spanned) in file.route.iter().enumerate() {
        let key = format!("route[{i}]");
        let raw = spanned.get_ref();
        // Every problem of the route is reported before it is left out.
        let upstream = by_name.get(raw.upstream.get_ref()).copied();
        if upstream.is_none() {
            let known: Vec<&str> = file
                .upstream
                .iter()
                .map(|u| u.get_ref().name.get_ref().as_str())
                .filter(|name| name_problem(name).is_none())
                .collect();
            // Not `(defined: )` (review43b).
            let known = if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            };
            r.at(
                raw.upstream.span(),
                format!("{key}.upstream"),
                format!(
                    "unknown upstream `{}` (defined: {})",
                    shown(raw.upstream.get_ref()),
                    known
                ),
            );
        }
        let host = match &raw.host {
            None => Some(HostMatch::Any),
            Some(h) => host_match(h.get_ref())
                .inspect_err(|e| r.at(h.span(), format!("{key}.host"), e))
                .ok(),
        };
        // `path` for one path, matched whole (nginx's `location =`,
        // Envoy's `path`), else `path_prefix`.
        let exact = raw.path.is_some();
        if let (Some(_), Some(path)) = (&raw.path_prefix, &raw.path) {
            r.at(
                path.span(),
                format!("{key}.path"),
                "a route takes a path_prefix or one path, not both: drop one",
            );
        }
        let (written, field) = match &raw.path {
            Some(path) => (Some(path), "path"),
            None => (raw.path_prefix.as_ref(), "path_prefix"),
        };
        let path_prefix = match written {
            None => Some("/".to_owned()),
            Some(p) if !p.get_ref().starts_with('/') => {
                r.at(p.span(), format!("{key}.{field}"), "must start with `/`");
                None
            }
            // Routes match the path alone, so a query or a byte a path
            // cannot hold would make the route dead.
            Some(p)
                if p.get_ref().contains('#')
                    || http::uri::PathAndQuery::try_from(p.get_ref().as_str())
                        .map_or(true, |pq| pq.query().is_some()) =>
            {
                r.at(
                    p.span(),
                    format!("{key}.{field}"),
                    "must be a path: no `?`, `#`, spaces or control characters",
                );
                None
            }
            // Prefixes are not patterns: `/api/*` would match only paths
            // that begin with those five characters, which no operator
            // writing it means.
            Some(p) if p.get_ref().ends_with('*') => {
                let meant = p.get_ref().trim_end_matches('*');
                let (what, write) = if exact {
                    ("one path", "path_prefix = ")
                } else {
                    ("a plain prefix", "")
                };
                r.at(
                    p.span(),
                    format!("{key}.{field}"),
                    format!(
                        "is {what}, not a pattern: a trailing `*` would be matched literally; \
                         write {write}`{meant}` to match everything under it"
                    ),
                );
                None
            }
            // Held in the form request paths are compared in, so that
            // `/café/` matches `/caf%C3%A9/x` and `/x%2fy/` `/x%2Fy/a`.
            Some(p) => crate::proxy::route::routing_prefix(p.get_ref())
                .inspect_err(|e| r.at(p.span(), format!("{key}.{field}"), e.to_string()))
                .ok(),
        };
        if let (Some(matched), Some(path_prefix)) = (&host, &path_prefix) {
            let host_text = raw.host.as_ref().map(|h| h.get_ref().as_str());
            // In the form requests are matched in: `[0:0::1]` is `[::1]`
            // (review48b L1: the second of those was accepted, and dead).
            let normal = match matched {
                HostMatch::Any => None,
                HostMatch::Exact(name) => Some(name.clone()),
                HostMatch::Suffix(name) => Some(format!("*{name}")),
            };
            let seen = (normal.clone(), path_prefix.clone(), exact);
            if !seen_routes.insert(seen) {
                let host = match (host_text, normal) {
                    (Some(host), Some(normal)) if !host.eq_ignore_ascii_case(&normal) => {
                        format!("host `{normal}`, the normal form of `{host}`,")
                    }
                    (Some(host), _) => format!("host `{host}`"),
                    (None, _) => "no host".to_owned(),
                };
                // Written otherwise, the clash is in the normal form.
                let written = written.map_or("/", |p| p.get_ref());
                let prefix = if written == path_prefix {
                    format!("`{path_prefix}`")
                } else {
                    format!("`{path_prefix}`, the normal form of `{written}`")
                };
                r.at(
                    spanned.span(),
                    &key,
                    format!("another route already has {host} and {field} {prefix}"),
                );
            }
        }
        let cache_on = route_switch(r, &key, "cache", raw.cache.as_ref(), cache.is_some());
        let limit_on = match &raw.rate_limit {
            Some(flag) if flag.get_ref().on && rate_limit.is_none() => {
                r.at(
                    flag.span(),
                    format!("{key}.rate_limit"),
                    "a route's rate_limit needs a [rate_limit] section (its key, max_tracked_clients and the rate of routes without one of their own)",
                );
                false
            }
            Some(flag) => flag.get_ref().on,
            None => rate_limit.is_some(),
        };
        let compress = route_switch(
            r,
            &key,
            "compression",
            raw.compression.as_ref(),
            compression.is_some(),
        );
        // A rate of its own; a key left out is the section's.
        let rate = raw
            .rate_limit
            .as_ref()
            .map(Spanned::get_ref)
            .filter(|own| own.requests_per_second.is_some() || own.burst.is_some())
            .zip(rate_limit.as_ref())
            .map(|(own, section)| {
                rate_and_burst(
                    r,
                    &format!("{key}.rate_limit"),
                    own.requests_per_second.as_ref(),
                    own.burst.as_ref(),
                    section.rate(),
                )
            });
        // Every route to an upstream counts, named or not, so that naming
        // one route leaves the others' labels as they were.
        let nth = upstream.map(|u| {
            let count = derived_count.entry(upstreams[u].name.clone()).or_insert(0);
            *count += 1;
            *count
        });
        let name = match &raw.name {
            Some(given) => {
                let text = given.get_ref();
                if let Some(problem) = name_problem(text) {
                    r.at(given.span(), format!("{key}.name"), problem);
                } else if let Some(other) = given_names.get(text) {
                    r.at(
                        given.span(),
                        format!("{key}.name"),
                        format!("route[{other}] is already named `{text}`"),
                    );
                } else {
                    given_names.insert(text.clone(), i);
                }
                Some(text.clone())
            }
            // The upstream's name, suffixed `#2`, `#3`... for the further
            // routes to the same upstream.
            None => upstream.zip(nth).map(|(u, count)| {
                let base: &str = &upstreams[u].name;
                let name = if count == 1 {
                    base.to_owned()
                } else {
                    format!("{base}#{count}")
                };
                derived.push((i, name.clone()));
                name
            }),
        };
        let (Some(upstream), Some(host), Some(path_prefix), Some(name)) =
            (upstream, host, path_prefix, name)
        else {
            continue;
        };
        routes.push(Route {
            host,
            path_prefix,
            exact,
            upstream,
            cache: cache_on,
            rate_limit: limit_on,
            rate,
            compress,
            name,
        });
    }
    for (i, name) in derived {
        if let Some(&other) = given_names.get(&name) {
            r.at(
                file.route[i].span(),
                format!("route[{i}]"),
                format!(
                    "its metrics label would be `{name}`, the name route[{other}] is given: name this route too"
                ),
            );
        }
    }
    if file.route.is_empty() {
        r.whole("route", "no [[route]] defined: every request would get 404");
    }

    Config {
        server,
        admin,
        upstreams,
        routes,
        cache,
        rate_limit,
        compression,
    }
}

/// A route's switch for a section (`cache = true` for `[cache]`): its
/// own value if written, else whether the section is; `true` without the
/// section is refused at its line.
fn route_switch(r: R, key: &str, name: &str, flag: Option<&Spanned<bool>>, section: bool) -> bool {
    match flag {
        Some(flag) if *flag.get_ref() && !section => {
            r.at(
                flag.span(),
                format!("{key}.{name}"),
                format!("{name} = true needs a [{name}] section"),
            );
            false
        }
        Some(flag) => *flag.get_ref(),
        None => section,
    }
}

/// The longest name an upstream or a route may have.
const MAX_NAME: usize = 128;

/// `name` as an error message shows it: cut short past [`MAX_NAME`].
fn shown(name: &str) -> String {
    match name.char_indices().nth(MAX_NAME) {
        Some((at, _)) => format!("{}…", &name[..at]),
        None => name.to_owned(),
    }
}

/// What is wrong with an upstream's or a route's name, if anything: it
/// is made of letters, digits, `-`, `_` and `.`, and is not the route
/// label of unrouted requests (which a route to an upstream so named would
/// take too).
fn name_problem(name: &str) -> Option<&'static str> {
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_NAME {
        // review48b L4: 100,000 characters were accepted, and one of 5 MB
        // made a 5 MB error line.
        Some("is longer than 128 characters: a name labels every metric series and access line of its upstream or route")
    } else if !valid {
        Some("names use letters, digits, `-`, `_` and `.` only")
    } else if name == crate::metrics::NO_ROUTE {
        Some("`_none` is taken: it labels the requests no route matched")
    } else {
        None
    }
}

/// Why `addr` cannot be bound beside `used` (of the key `first`).
fn overlap_message(addr: SocketAddr, used: SocketAddr, first: &str) -> String {
    let dual = [addr, used]
        .iter()
        .any(|a| a.is_ipv6() && a.ip().is_unspecified())
        && [addr, used].iter().any(SocketAddr::is_ipv4);
    if dual {
        // nginx's `listen 80; listen [::]:80;`, whose `[::]` is IPv6 only.
        format!(
            "{addr} overlaps {used} of {first}: portico's [::]:{} takes IPv4 clients too \
             (dual-stack, whatever net.ipv6.bindv6only says), so list it alone",
            addr.port()
        )
    } else {
        format!(
            "{addr} overlaps {used} of {first}: a wildcard address takes its port on every address"
        )
    }
}

/// Two listen addresses that cannot both be bound: the same port, one of
/// them a wildcard covering the other.
pub(crate) fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && (covers(a, b) || covers(b, a))
}

/// Whether connecting to `backend` reaches portico's own listener on
/// `listen` (this machine's addresses asked only for a wildcard one).
pub(crate) fn reaches_own(backend: SocketAddr, listen: SocketAddr) -> bool {
    reaches(backend, listen, is_local)
}

/// Whether connecting to `backend` reaches `listen`: the same address, or
/// one of this machine's on a wildcard listener of that port (an IPv6
/// wildcard takes IPv4 too). `local` says whether an address is this
/// machine's; it is asked only in that last case.
fn reaches(backend: SocketAddr, listen: SocketAddr, local: impl FnOnce(IpAddr) -> bool) -> bool {
    // An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) is the IPv4 one.
    let (to, at) = (backend.ip().to_canonical(), listen.ip().to_canonical());
    backend.port() == listen.port()
        && (to == at
            || (at.is_unspecified()
                && (at.is_ipv6() || to.is_ipv4())
                && (to.is_loopback() || local(to))))
}

/// Whether `ip` is an address of one of this machine's interfaces. An
/// error listing them counts as no: the check then misses a loop rather
/// than refusing a config that has none.
fn is_local(ip: IpAddr) -> bool {
    if_addrs::get_if_addrs()
        .is_ok_and(|interfaces| interfaces.iter().any(|i| i.ip().to_canonical() == ip))
}

type Claim<'c> = dyn FnMut(R, String, SocketAddr, std::ops::Range<usize>) + 'c;

/// The smallest `max_header_size` that holds for HTTP/1.1 as for HTTP/2:
/// hyper reads an HTTP/1.1 head into a buffer of at least 8 KiB.
const MIN_HEADER_SIZE: u64 = 8 * 1024;

/// The largest `max_header_size`: nginx's `large_client_header_buffers`
/// defaults to 32 KiB, HAProxy's buffers to 16 KiB.
const MAX_HEADER_SIZE: u64 = 1 << 20;

fn server(r: R, raw: Option<Spanned<raw::Server>>, base: &Path, claim: &mut Claim) -> Server {
    let defaults = Server::default();
    let Some(raw) = raw else {
        for addr in &defaults.listen {
            claim(r, "server.listen".into(), *addr, 0..0);
        }
        return defaults;
    };
    let section = raw.span();
    let raw = raw.into_inner();
    let listen = match &raw.listen {
        // HTTPS only, as nginx's `listen 443 ssl` opens no port 80: the
        // plain default came with every `[[server.tls]]`, on every
        // address, and unclaimed, so a TLS listener on its port passed
        // `check` and failed at start (review34d M1).
        None if !raw.tls.is_empty() => Vec::new(),
        None => {
            for addr in &defaults.listen {
                claim(r, "server.listen".into(), *addr, 0..0);
            }
            defaults.listen.clone()
        }
        Some(list) => listen_list(r, "server.listen", list, claim),
    };
    let mut tls = Vec::new();
    for (i, t) in raw.tls.iter().enumerate() {
        let key = format!("server.tls[{i}]");
        let t_ref = t.get_ref();
        if t_ref.listen.is_empty() {
            r.at(
                t.span(),
                format!("{key}.listen"),
                "a TLS listener needs at least one listen address",
            );
        }
        if t_ref.certificates.is_empty() {
            r.at(
                t.span(),
                format!("{key}.certificates"),
                "a TLS listener needs at least one { cert, key } pair",
            );
        }
        let listen = listen_list(r, &format!("{key}.listen"), &t_ref.listen, claim);
        let certificates = t_ref
            .certificates
            .iter()
            .enumerate()
            .map(|(j, c)| {
                let pair = CertificatePair {
                    cert: base.join(c.get_ref().cert.get_ref()),
                    key: base.join(c.get_ref().key.get_ref()),
                };
                // Loaded now, as at start, so every bad pair is reported
                // where the file names it.
                if let Err(e) = crate::server::tls::check_pair(&pair) {
                    r.at(c.span(), format!("{key}.certificates[{j}]"), e.to_string());
                }
                pair
            })
            .collect();
        tls.push(TlsListener {
            listen,
            certificates,
        });
    }
    // Not when the addresses given were refused: each has its error.
    let none_given = raw.listen.as_ref().is_none_or(Vec::is_empty);
    if listen.is_empty() && tls.is_empty() && none_given {
        r.at(
            section,
            "server.listen",
            "no traffic listener: give server.listen an address or add a [[server.tls]]",
        );
    }
    let max_header_size = size(
        r,
        "server.max_header_size",
        raw.max_header_size.as_ref(),
        defaults.max_header_size,
    );
    if let Some(v) = &raw.max_header_size {
        if max_header_size < MIN_HEADER_SIZE {
            r.at(
                v.span(),
                "server.max_header_size",
                "must be at least 8KiB (HTTP/1.1 heads are read into a buffer of that size)",
            );
        } else if max_header_size > MAX_HEADER_SIZE {
            // Each connection may hold that much of a head it is reading
            // (review34d L5: 1TiB passed, and was offered to HTTP/2 peers).
            r.at(
                v.span(),
                "server.max_header_size",
                "must be at most 1MiB (each client connection may hold a head that large)",
            );
        }
    }
    Server {
        listen,
        request_header_timeout: positive(
            r,
            "server.request_header_timeout",
            raw.request_header_timeout.as_ref(),
            defaults.request_header_timeout,
        ),
        idle_timeout: positive(
            r,
            "server.idle_timeout",
            raw.idle_timeout.as_ref(),
            defaults.idle_timeout,
        ),
        max_request_body: size(
            r,
            "server.max_request_body",
            raw.max_request_body.as_ref(),
            defaults.max_request_body,
        ),
        max_header_size,
        shutdown_grace: duration(
            r,
            "server.shutdown_grace",
            raw.shutdown_grace.as_ref(),
            defaults.shutdown_grace,
        ),
        max_connections: raw
            .max_connections
            .as_ref()
            .map(|v| integer(r, "server.max_connections", Some(v), 1, 1)),
        trusted_proxies: cidr_list(r, "server.trusted_proxies", raw.trusted_proxies.as_ref()),
        trusted_fields: match raw.trusted_fields.as_ref() {
            None => TrustedFields::default(),
            Some(v) => match v.get_ref().to_ascii_lowercase().as_str() {
                "either" => TrustedFields::Either,
                "x-forwarded" => TrustedFields::XForwarded,
                "forwarded" => TrustedFields::Forwarded,
                _ => {
                    r.at(
                        v.span(),
                        "server.trusted_fields",
                        "use \"x-forwarded\" (X-Forwarded-For/-Proto/-Host), \"forwarded\" (RFC 7239) or \"either\"",
                    );
                    TrustedFields::default()
                }
            },
        },
        tls,
    }
}

fn admin(r: R, raw: Option<Spanned<raw::Admin>>, base: &Path, claim: &mut Claim) -> Admin {
    let defaults = Admin::default();
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let listen = match &raw.listen {
        None => {
            claim(r, "admin.listen".into(), defaults.listen, 0..0);
            defaults.listen
        }
        Some(v) => match socket_addr(r, "admin.listen", v.get_ref(), v.span()) {
            Some(addr) => {
                claim(r, "admin.listen".into(), addr, v.span());
                addr
            }
            None => defaults.listen,
        },
    };
    // Read here, once: `check` finds what start would, and a reload that
    // validates the file has the token it rotates to.
    let mut token = None;
    let token_file = raw.token_file.map(|t| {
        let path = base.join(t.get_ref());
        match read_token(&path) {
            Ok(read) => token = Some(Token(read)),
            Err(e) => r.at(t.span(), "admin.token_file", e.to_string()),
        }
        path
    });
    Admin {
        listen,
        token_file,
        token,
    }
}

fn upstream(
    r: R,
    key: &str,
    raw: &raw::Upstream,
    base: &Path,
    own: &[(SocketAddr, String)],
) -> Upstream {
    let mut upstream = Upstream::new(raw.name.get_ref().clone(), Vec::new());
    if let Some(problem) = name_problem(raw.name.get_ref()) {
        r.at(raw.name.span(), format!("{key}.name"), problem);
    }
    if raw.backends.get_ref().is_empty() {
        r.at(
            raw.backends.span(),
            format!("{key}.backends"),
            "an upstream needs at least one backend",
        );
    }
    let per_backend = max_conns(
        r,
        &format!("{key}.max_conns_per_backend"),
        raw.max_conns_per_backend.as_ref(),
    );
    let mut seen = HashSet::new();
    for (i, backend) in raw.backends.get_ref().iter().enumerate() {
        let bkey = format!("{key}.backends[{i}]");
        let b = backend.get_ref();
        let (text, span) = match (&b.addr, &b.plain) {
            (Some(addr), _) => (addr.get_ref().as_str(), addr.span()),
            (None, Some(plain)) => (plain.as_str(), backend.span()),
            (None, None) => continue,
        };
        let weight = match &b.weight {
            None => 1,
            Some(w) => match u32::try_from(*w.get_ref()) {
                Ok(n) if n <= 1000 => n,
                _ => {
                    r.at(
                        w.span(),
                        format!("{bkey}.weight"),
                        "weight must be from 0 (drained) to 1000",
                    );
                    1
                }
            },
        };
        let max_conns = match &b.max_conns {
            None => per_backend,
            given => max_conns(r, &format!("{bkey}.max_conns"), given.as_ref()),
        };
        let Some(addr) = socket_addr(r, &bkey, text, span.clone()) else {
            continue;
        };
        // `[::ffff:127.0.0.1]:P` is `127.0.0.1:P`, for these checks: both
        // listed ran as two backends of double weight (review40d L2).
        let canonical = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        // Nor a multicast or broadcast address: TCP connects to one host
        // (review48b L2: every request was a 502, `Network is unreachable`).
        let broadcast = matches!(canonical.ip(), IpAddr::V4(ip) if ip.is_broadcast());
        if addr.port() == 0
            || canonical.ip().is_unspecified()
            || canonical.ip().is_multicast()
            || broadcast
        {
            r.at(
                span,
                &bkey,
                format!("backend {addr} cannot be connected to"),
            );
            continue;
        }
        if let Some((_, listener)) = own
            .iter()
            .find(|(listen, _)| reaches(addr, *listen, is_local))
        {
            // Host and target are forwarded as received, so the request
            // would match the same route again, and again.
            r.at(
                span,
                &bkey,
                if listener == "admin.listen" {
                    format!(
                        "backend {addr} is this proxy's own admin.listen: the admin API would be served to clients"
                    )
                } else {
                    format!(
                        "backend {addr} is this proxy's own {listener}: requests would loop back to it"
                    )
                },
            );
            continue;
        }
        if !seen.insert(canonical) {
            r.at(span, &bkey, format!("backend {addr} is listed twice"));
            continue;
        }
        upstream.backends.push(Backend {
            addr,
            weight,
            max_conns,
            backup: b.backup.as_ref().is_some_and(|b| *b.get_ref()),
        });
    }
    if !upstream.backends.is_empty() && upstream.backends.iter().all(|b| b.backup) {
        r.at(
            raw.backends.span(),
            format!("{key}.backends"),
            "every backend is a backup: a backup stands in for the others, so at least one must not be",
        );
    }
    if let Some(balance) = &raw.balance {
        upstream.balance = match balance.get_ref().as_str() {
            "round_robin" => Balance::RoundRobin,
            "least_conn" => Balance::LeastConn,
            "random_two" => Balance::RandomTwo,
            "hash" => match &raw.hash_key {
                Some(hash_key) => Balance::Hash(parse_hash_key(hash_key.get_ref()).unwrap_or_else(
                    |message| {
                        r.at(hash_key.span(), format!("{key}.hash_key"), message);
                        HashKey::ClientIp
                    },
                )),
                None => {
                    r.at(
                        balance.span(),
                        format!("{key}.balance"),
                        format!("`hash` needs a `hash_key` beside it: {HASH_KEYS}"),
                    );
                    Balance::RoundRobin
                }
            },
            other => {
                r.at(
                    balance.span(),
                    format!("{key}.balance"),
                    format!(
                        "unknown balance `{other}`: use round_robin, least_conn, random_two or hash"
                    ),
                );
                Balance::RoundRobin
            }
        };
    }
    // Said when the balance is another mode: one misspelt has its own
    // error (review45a L3: `"HASH"` was told to add `balance = "hash"`).
    let other_mode = raw.balance.as_ref().is_none_or(|b| {
        ["round_robin", "least_conn", "random_two"].contains(&b.get_ref().as_str())
    });
    if let Some(hash_key) = raw.hash_key.as_ref().filter(|_| other_mode) {
        r.at(
            hash_key.span(),
            format!("{key}.hash_key"),
            "has no effect without balance = \"hash\": add it, or remove hash_key",
        );
    }
    let d = Upstream::new("", Vec::new());
    upstream.connect_timeout = positive(
        r,
        &format!("{key}.connect_timeout"),
        raw.connect_timeout.as_ref(),
        d.connect_timeout,
    );
    upstream.response_timeout = positive(
        r,
        &format!("{key}.response_timeout"),
        raw.response_timeout.as_ref(),
        d.response_timeout,
    );
    upstream.body_timeout = positive(
        r,
        &format!("{key}.body_timeout"),
        raw.body_timeout.as_ref(),
        d.body_timeout,
    );
    upstream.idle_timeout = positive(
        r,
        &format!("{key}.idle_timeout"),
        raw.idle_timeout.as_ref(),
        d.idle_timeout,
    );
    upstream.queue_timeout = duration(
        r,
        &format!("{key}.queue_timeout"),
        raw.queue_timeout.as_ref(),
        d.queue_timeout,
    );
    upstream.slow_start = duration(
        r,
        &format!("{key}.slow_start"),
        raw.slow_start.as_ref(),
        d.slow_start,
    );
    if upstream.slow_start > MAX_SLOW_START {
        if let Some(value) = &raw.slow_start {
            r.at(
                value.span(),
                format!("{key}.slow_start"),
                "at most 1h: longer, a backend that came back would stay below its share for hours",
            );
        }
        upstream.slow_start = d.slow_start;
    }
    upstream.max_idle_per_backend = integer(
        r,
        &format!("{key}.max_idle_per_backend"),
        raw.max_idle_per_backend.as_ref(),
        d.max_idle_per_backend as u32,
        0,
    ) as usize;
    // One message for every value outside 0 to 10, -1 included.
    upstream.retries = match &raw.retries {
        Some(v) if !(0..=10).contains(v.get_ref()) => {
            r.at(
                v.span(),
                format!("{key}.retries"),
                "must be 0 to 10: more retries only multiply an outage",
            );
            d.retries
        }
        given => integer(r, &format!("{key}.retries"), given.as_ref(), d.retries, 0),
    };
    upstream.retry_on_timeout = raw
        .retry_on_timeout
        .as_ref()
        .map_or(d.retry_on_timeout, |on| *on.get_ref());
    upstream.health = raw
        .health
        .as_ref()
        .map(|h| health(r, &format!("{key}.health"), h));
    upstream.tls = upstream_tls(r, key, raw, base);
    upstream
}

/// The most requests a backend may have in flight at once: past this, a
/// cap is no cap (a backend answering a million at once needs none).
const MAX_CONNS: u32 = 1_000_000;

/// A `max_conns` or `max_conns_per_backend`: 0 (no cap, the default) to
/// [`MAX_CONNS`].
fn max_conns(r: R, key: &str, value: Option<&Spanned<i64>>) -> u32 {
    let Some(value) = value else { return 0 };
    match u32::try_from(*value.get_ref()) {
        Ok(n) if n <= MAX_CONNS => n,
        _ => {
            r.at(
                value.span(),
                key,
                format!("must be from 0 (no cap) to {MAX_CONNS}"),
            );
            0
        }
    }
}

/// `tls`, `tls_server_name`, `tls_ca`; the CA file is read now so a
/// missing or empty one is reported with the key that names it.
fn upstream_tls(r: R, key: &str, raw: &raw::Upstream, base: &Path) -> Option<UpstreamTls> {
    if !raw.tls.as_ref().is_some_and(|t| *t.get_ref()) {
        for (field, value) in [
            ("tls_server_name", &raw.tls_server_name),
            ("tls_ca", &raw.tls_ca),
        ] {
            if let Some(value) = value {
                r.at(value.span(), format!("{key}.{field}"), "needs `tls = true`");
            }
        }
        return None;
    }
    let server_name = raw.tls_server_name.as_ref().and_then(|v| {
        let name = v.get_ref();
        match pki_types::ServerName::try_from(name.as_str()) {
            Ok(_) => Some(name.clone()),
            Err(_) => {
                // `[::1]` is a Host's spelling: the name is the address.
                let unbracketed = name
                    .strip_prefix('[')
                    .and_then(|n| n.strip_suffix(']'))
                    .filter(|n| n.parse::<std::net::Ipv6Addr>().is_ok());
                let message = match unbracketed {
                    Some(bare) => {
                        format!("`{name}`: write an IPv6 address without brackets, `{bare}`")
                    }
                    None => format!("`{name}` is not a DNS name or an IP address"),
                };
                r.at(v.span(), format!("{key}.tls_server_name"), message);
                None
            }
        }
    });
    let mut tls = UpstreamTls {
        server_name,
        ca: None,
        ca_certs: Vec::new(),
    };
    if let Some(v) = &raw.tls_ca {
        let path = base.join(v.get_ref());
        match read_pem_certificates(&path, false) {
            Ok(certs) => tls.ca_certs = certs,
            Err(reason) => r.at(
                v.span(),
                format!("{key}.tls_ca"),
                format!("{}: {reason}", path.display()),
            ),
        }
        tls.ca = Some(path);
    }
    Some(tls)
}

/// Reads the admin token: the file's first line, trimmed. An empty file is
/// an error, since it would make every token check trivially pass.
fn read_token(path: &Path) -> std::io::Result<String> {
    let read = super::readable(path).and_then(|()| std::fs::read_to_string(path));
    let text = read.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot read admin token_file {}: {e}", path.display()),
        )
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        let what = if text.trim().is_empty() {
            "is empty"
        } else {
            "has an empty first line (the token is the first line)"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("admin token_file {} {what}", path.display()),
        ));
    }
    // The admin API reads the field as visible ASCII (and tabs): a token
    // holding anything else could never be given. A control character is
    // refused (400) before portico sees the request (review48b L3), and a
    // byte beyond ASCII, which a field may carry, failed that reading, so
    // purge and reload answered 401 (review48e M1).
    let readable = |c: &char| *c == '\t' || (' '..='~').contains(c);
    if let Some(bad) = token.chars().find(|c| !readable(c)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "admin token_file {}: the token holds {bad:?}, which no request can give the admin API (visible ASCII only): write it in letters, digits and -._~+/=",
                path.display()
            ),
        ));
    }
    Ok(token)
}

/// The certificates of a PEM file, each one webpki can read: with
/// `leaf`, the first as a server's own certificate (as rustls's key match
/// reads it) and the rest only as X.509, as rustls sends a chain unread
/// (an intermediate with a critical policy extension webpki does not know,
/// or an appended v1 root, is served as nginx serves it, review36e M1);
/// without, each as a trust anchor rustls can use (`tls_ca`). One a line
/// lost in a copy left unparsable was only warned of at the first
/// handshake, and a file of nothing usable failed every request with a
/// 502 after `check`, start and reload had all said yes (review36a M1).
pub(crate) fn read_pem_certificates(
    path: &Path,
    leaf: bool,
) -> Result<Vec<pki_types::CertificateDer<'static>>, String> {
    use pki_types::pem::PemObject;
    super::readable(path).map_err(|e| e.to_string())?;
    let certs = pki_types::CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    for (n, cert) in certs.iter().enumerate() {
        let read = if leaf && n == 0 {
            webpki::EndEntityCert::try_from(cert).map(drop)
        } else {
            webpki::anchor_from_trusted_cert(cert).map(drop)
        };
        if let Err(error) = read {
            return Err(unreadable_certificate(n, &error));
        }
    }
    Ok(certs)
}

/// A PEM file's error in an operator's words: the library names a block
/// cut short by its end marker's bytes as numbers, `missing section end
/// marker: [67, 69, 82, ...]` for a certificate file cut in a copy
/// (review36f L3).
pub(crate) fn pem_error(error: pki_types::pem::Error) -> String {
    match error {
        pki_types::pem::Error::Io(io) => io.to_string(),
        pki_types::pem::Error::MissingSectionEnd { end_marker } => format!(
            "the file ends inside a {} block (no -----END line): is the file whole?",
            String::from_utf8_lossy(&end_marker)
                .trim_matches('-')
                .trim()
        ),
        other => other.to_string(),
    }
}

/// What is said of the `n`th certificate (from 0) of a PEM file that
/// webpki could not read: a DER that does not parse is most often a file
/// cut in a copy.
fn unreadable_certificate(n: usize, error: &webpki::Error) -> String {
    let cut = matches!(
        error,
        webpki::Error::BadDer | webpki::Error::TrailingData(_)
    );
    format!(
        "certificate {} in the file cannot be read as X.509 ({error}){}",
        n + 1,
        if cut { ": is the file whole?" } else { "" }
    )
}

fn health(r: R, key: &str, raw: &Spanned<raw::Health>) -> HealthCheck {
    let d = HealthCheck::default();
    let h = raw.get_ref();
    let path = match &h.path {
        None => d.path.clone(),
        // A fragment is never sent (RFC 9112 §3.2): the check would ask
        // for another path than the one written (review34d L5).
        Some(p)
            if p.get_ref().starts_with('/')
                && !p.get_ref().contains('#')
                && http::uri::PathAndQuery::try_from(p.get_ref().as_str()).is_ok() =>
        {
            p.get_ref().clone()
        }
        Some(p) => {
            r.at(
                p.span(),
                format!("{key}.path"),
                "must be a path starting with `/`: no `#fragment`, spaces or control characters",
            );
            d.path.clone()
        }
    };
    let host = h.host.as_ref().and_then(|v| {
        let host = v.get_ref();
        // One `name[:port]`: a comma would read as a list of them, a
        // `*` is a route's wildcard and no host, and a port past 65535
        // none a server listens on (review42i L3).
        let port_ok = match host.rsplit_once(':') {
            Some((name, port)) if !name.ends_with(':') && !port.contains(']') => {
                port.parse::<u16>().is_ok()
            }
            _ => true,
        };
        if crate::proxy::headers::valid_host(host.as_bytes())
            && !host.contains([',', '*'])
            && port_ok
        {
            return Some(host.clone());
        }
        r.at(
            v.span(),
            format!("{key}.host"),
            format!(
                "`{host}` is not a valid Host: write `name` or `name:port` (an IPv6 address in brackets)"
            ),
        );
        None
    });
    let interval = positive(
        r,
        &format!("{key}.interval"),
        h.interval.as_ref(),
        d.interval,
    );
    let timeout = positive(r, &format!("{key}.timeout"), h.timeout.as_ref(), d.timeout);
    // Compared only as given: a refused value has its own error, and its
    // default stood in for it above.
    let given = |value: Option<&raw::Str>| {
        value.is_none_or(|v| parse_duration(v.get_ref()).is_ok_and(|d| !d.is_zero()))
    };
    if timeout > interval && given(h.interval.as_ref()) && given(h.timeout.as_ref()) {
        // Blamed on the key written: a timeout left at its default is
        // not the operator's line, the interval that undercuts it is.
        let (span, blamed, default) = match (&h.timeout, &h.interval) {
            (None, Some(interval_given)) => (interval_given.span(), "interval", ", the default"),
            (given, _) => (
                given.as_ref().map_or(raw.span(), |t| t.span()),
                "timeout",
                "",
            ),
        };
        r.at(
            span,
            format!("{key}.{blamed}"),
            format!("timeout ({timeout:?}{default}) must not exceed interval ({interval:?})"),
        );
    }
    HealthCheck {
        path,
        host,
        interval,
        timeout,
        rise: integer(r, &format!("{key}.rise"), h.rise.as_ref(), d.rise, 1),
        fall: integer(r, &format!("{key}.fall"), h.fall.as_ref(), d.fall, 1),
    }
}

/// `api.example.com`, `*.example.com` or an IPv6 literal `[::1]`,
/// lower-cased, no port. Labels are letters, digits, `-` (not at either
/// end) and `_`, which nginx's `server_name` takes too and a Host may
/// carry; a name in another script is written in its ASCII (IDNA) form,
/// as clients send it.
fn host_match(host: &str) -> Result<HostMatch, String> {
    let lower = host.to_ascii_lowercase();
    if let Some(inner) = lower.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // In the short form clients write (`[2001:db8::1]`), as matching
        // compares text.
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(addr) => Ok(HostMatch::Exact(format!("[{addr}]"))),
            Err(_) => Err(format!("`{host}` is not an IPv6 address in brackets")),
        };
    }
    if !host.is_ascii() {
        return Err(format!(
            "`{host}` is not ASCII: write the name as clients send it, in its IDNA form (`bücher.example` is `xn--bcher-kva.example`)"
        ));
    }
    let (suffix, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        // An IPv6 literal is written as in a Host: in brackets.
        if host.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(format!(
                "`{host}` is an IPv6 address: write it in brackets, `[{host}]`"
            ));
        }
        return Err(format!(
            "`{host}` is not a host name: write `api.example.com` or `*.example.com` (no port)"
        ));
    }
    Ok(if suffix {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_owned())
    })
}

fn cache(r: R, raw: &raw::Cache) -> Cache {
    let d = Cache::default();
    let max_size = size(r, "cache.max_size", raw.max_size.as_ref(), d.max_size);
    // A stored response weighs its body plus its head and bookkeeping: a
    // body of `max_size` itself never fits, and one said `stored` on
    // every fetch was never kept (review32a L4).
    let room = max_size.saturating_sub(OBJECT_HEADROOM);
    // The store weighs an entry in 32 bits: past them one was counted as
    // 4 GiB whatever it held (review34c L2).
    let largest = (1 << 32) - OBJECT_HEADROOM;
    if room == 0 {
        if let Some(v) = raw.max_size.as_ref() {
            r.at(
                v.span(),
                "cache.max_size",
                format!(
                    "must be more than {}KiB, the room for a response's head and bookkeeping",
                    OBJECT_HEADROOM >> 10
                ),
            );
        }
    }
    let max_object_size = match raw.max_object_size.as_ref() {
        Some(v) => {
            let written = size(r, "cache.max_object_size", Some(v), d.max_object_size);
            // Past what `size` refused (0, say) there is nothing to compare.
            let asked = parse_size(v.get_ref()).ok();
            if asked.is_some_and(|n| n > largest) {
                r.at(
                    v.span(),
                    "cache.max_object_size",
                    format!(
                        "must be at most {}, 4GiB less {}KiB for a response's head and bookkeeping",
                        shown_size(largest),
                        OBJECT_HEADROOM >> 10
                    ),
                );
            } else if room > 0 && asked.is_some_and(|n| n > room && n > 0) {
                r.at(
                    v.span(),
                    "cache.max_object_size",
                    format!(
                        "must be at most {}, cache.max_size less {}KiB for a response's head and bookkeeping",
                        shown_size(room),
                        OBJECT_HEADROOM >> 10
                    ),
                );
            }
            written
        }
        // The default shrinks to what a smaller cache holds: `max_size =
        // "8MiB"` alone was refused on an upgrade (review32f F3).
        None => d.max_object_size,
    };
    Cache {
        max_size,
        max_object_size: max_object_size.min(room).min(largest),
        default_ttl: duration(
            r,
            "cache.default_ttl",
            raw.default_ttl.as_ref(),
            d.default_ttl,
        ),
    }
}

fn compression(r: R, raw: &raw::Compression) -> Compression {
    let d = Compression::default();
    let types = match &raw.types {
        Some(spanned) => {
            let list = spanned.get_ref();
            if list.is_empty() {
                r.at(
                    spanned.span(),
                    "compression.types",
                    "is empty: list the media types to compress, or leave types out for the usual text ones",
                );
            }
            let mut types = Vec::with_capacity(list.len());
            // Looked up by hash: along the list, a long one took quadratic
            // time (fuzz49).
            let mut listed = std::collections::HashSet::with_capacity(list.len());
            for (i, written) in list.iter().enumerate() {
                let key = format!("compression.types[{i}]");
                match media_type(written.get_ref()) {
                    Ok(t) if listed.contains(&t) => {
                        r.at(written.span(), key, format!("`{t}` is listed twice"))
                    }
                    Ok(t) => {
                        listed.insert(t.clone());
                        types.push(t);
                    }
                    Err(e) => r.at(written.span(), key, e),
                }
            }
            // A type a `type/*` of the list takes already, either way round.
            for (i, written) in list.iter().enumerate() {
                let Ok(t) = media_type(written.get_ref()) else {
                    continue;
                };
                let Some((kind, _)) = t.split_once('/') else {
                    continue;
                };
                let all = format!("{kind}/*");
                if t != all && listed.contains(&all) {
                    r.at(
                        written.span(),
                        format!("compression.types[{i}]"),
                        format!("`{t}` is taken by `{all}` already: list one of the two"),
                    );
                }
            }
            types
        }
        None => d.types,
    };
    // 0 is allowed here (every body compressed), as nginx's
    // `gzip_min_length 0`.
    let min_size = match &raw.min_size {
        Some(v) => parse_size(v.get_ref()).unwrap_or_else(|e| {
            r.at(v.span(), "compression.min_size", e);
            d.min_size
        }),
        None => d.min_size,
    };
    let level = match &raw.level {
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n @ 1..=9) => n,
            _ => {
                r.at(
                    v.span(),
                    "compression.level",
                    "must be a whole number from 1 (fastest) to 9 (smallest), as nginx's gzip_comp_level",
                );
                d.level
            }
        },
        None => d.level,
    };
    Compression {
        types,
        min_size,
        level,
    }
}

/// A media type of `[compression] types`, lower-cased: `type/subtype` or
/// `type/*`, without parameters.
fn media_type(text: &str) -> Result<String, String> {
    let token = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    let problem = if text.contains(';') {
        "takes no parameters here (`; charset=...`): write the type alone, every charset is compressed alike"
    } else if text == "*/*" || text == "*" {
        "is every type, images and archives already compressed among them: list the types"
    } else {
        match text.split_once('/') {
            Some((kind, "*")) if token(kind) => return Ok(text.to_ascii_lowercase()),
            Some((kind, sub)) if token(kind) && token(sub) => {
                return Ok(text.to_ascii_lowercase())
            }
            _ => "is no media type: write type/subtype, as \"application/json\", or type/* for all of a type",
        }
    };
    Err(format!("`{text}`: {problem}"))
}

/// A size as an operator would write it: in MiB or KiB when it is a whole
/// number of them.
fn shown_size(bytes: u64) -> String {
    match bytes {
        0 => "0".to_owned(),
        b if b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => b.to_string(),
    }
}

/// What `cache.max_size` must hold beyond `max_object_size`: a response
/// head (up to 72 KiB) and an entry's bookkeeping.
const OBJECT_HEADROOM: u64 = 80 << 10;

/// An address or CIDR block. A block with host bits set (`10.0.0.1/8`) is
/// refused rather than masked: it is either a typo for one address or for
/// the block, and trusting the wider reading lets clients forge their IP.
fn cidr(text: &str) -> Result<Cidr, String> {
    let shape = || format!("`{text}` is not an address or CIDR block such as \"10.0.0.0/8\"");
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| shape())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().map_err(|_| shape())?
        }
        Some(_) => return Err(shape()),
    };
    if prefix > max {
        return Err(shape());
    }
    let network = Cidr { addr, prefix }.network();
    if network != addr {
        return Err(format!(
            "`{text}` has host bits set: write \"{network}/{prefix}\" for the block or \"{addr}\" for one address"
        ));
    }
    // `::ffff:10.0.0.0/104` is the IPv4 block 10.0.0.0/8: matched as
    // written, it trusted a proxy reaching a dual-stack listener but not
    // the same proxy on an IPv4 one, nor as a forwarding hop (review40d
    // L3).
    if let IpAddr::V6(v6) = addr {
        if let Some(v4) = v6.to_ipv4_mapped().filter(|_| prefix >= 96) {
            return Ok(Cidr {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
    }
    Ok(Cidr { addr, prefix })
}

/// The address blocks of a `trusted_proxies` list, each bad one reported
/// where it is written.
fn cidr_list(r: R, key: &str, raw: Option<&Vec<raw::Str>>) -> Vec<Cidr> {
    let mut blocks = Vec::new();
    for (i, p) in raw.into_iter().flatten().enumerate() {
        match cidr(p.get_ref()) {
            Ok(c) => blocks.push(c),
            Err(e) => r.at(p.span(), format!("{key}[{i}]"), e),
        }
    }
    blocks
}

/// `requests_per_second` and `burst` under `key` (`rate_limit`, or a
/// route's), each `default`'s where not given.
fn rate_and_burst(
    r: R,
    key: &str,
    requests_per_second: Option<&Spanned<raw::Number>>,
    burst: Option<&Spanned<i64>>,
    default: Rate,
) -> Rate {
    let rate_key = format!("{key}.requests_per_second");
    let burst_key = format!("{key}.burst");
    let rate_given = requests_per_second;
    let mut requests_per_second = rate(r, &rate_key, rate_given, default.requests_per_second);
    let given = burst;
    let mut burst = integer(r, &burst_key, given, default.burst, 1);
    // The limiter keeps a budget of `burst` requests' time in u64
    // nanoseconds, added to the time since it started: past 584 years it
    // wrapped, and throttling quietly stopped (review31b L1). Half of
    // that leaves the other half for uptime.
    if f64::from(burst) / requests_per_second * 1e9 >= (1u64 << 63) as f64 {
        let too_long = format!(
            "{burst} requests at {requests_per_second} a second take over 292 years to refill, past what the limiter counts"
        );
        // Said where it was written: a route's own rate with the
        // section's burst was let through (review41d F4).
        match (given, rate_given) {
            (Some(given), _) => {
                r.at(given.span(), burst_key, format!("{too_long}: lower burst"));
                burst = default.burst;
            }
            (None, Some(rate)) => {
                r.at(
                    rate.span(),
                    rate_key,
                    format!(
                        "{too_long}: raise requests_per_second, or give a lower burst beside it"
                    ),
                );
                requests_per_second = default.requests_per_second;
            }
            (None, None) => burst = default.burst,
        }
    }
    Rate {
        requests_per_second,
        burst,
    }
}

/// The longest `slow_start`.
const MAX_SLOW_START: Duration = Duration::from_secs(3600);

/// What `hash_key` may be, for its errors.
const HASH_KEYS: &str = "use \"client_ip\", \"uri\", \"path\", \"header:NAME\" or \"cookie:NAME\"";

/// An upstream's `hash_key`, or what is wrong with it.
fn parse_hash_key(text: &str) -> Result<HashKey, String> {
    let named = |prefix: &str| {
        text.get(..prefix.len())
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .map(|_| &text[prefix.len()..])
    };
    let unnamed = |kind: &str, name: &str| {
        if name.is_empty() {
            format!("`{text}` names no {kind}: {HASH_KEYS}")
        } else {
            format!("`{name}` is no {kind} name: {HASH_KEYS}")
        }
    };
    match text.to_ascii_lowercase().as_str() {
        "client_ip" => Ok(HashKey::ClientIp),
        "uri" => Ok(HashKey::Uri),
        "path" => Ok(HashKey::Path),
        _ => {
            if let Some(name) = named("header:") {
                http::HeaderName::try_from(name)
                    .map(HashKey::Header)
                    .map_err(|_| unnamed("header", name))
            } else if let Some(name) = named("cookie:") {
                // RFC 6265 §4.1.1: a cookie's name is a token.
                let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if !name.is_empty() && name.bytes().all(token) {
                    Ok(HashKey::Cookie(name.to_owned()))
                } else {
                    Err(unnamed("cookie", name))
                }
            } else {
                Err(format!("unknown hash_key `{text}`: {HASH_KEYS}"))
            }
        }
    }
}

fn rate_limit(r: R, raw: &raw::RateLimit) -> RateLimit {
    let d = RateLimit::default();
    let key = match &raw.key {
        None => d.key.clone(),
        Some(k) if k.get_ref() == "client_ip" => RateLimitKey::ClientIp,
        Some(k) => match k
            .get_ref()
            .strip_prefix("header:")
            .map(http::HeaderName::try_from)
        {
            Some(Ok(name)) => RateLimitKey::Header(name),
            _ => {
                r.at(
                    k.span(),
                    "rate_limit.key",
                    "use \"client_ip\" or \"header:NAME\" with a valid header name",
                );
                d.key.clone()
            }
        },
    };
    let Rate {
        requests_per_second,
        burst,
    } = rate_and_burst(
        r,
        "rate_limit",
        raw.requests_per_second.as_ref(),
        raw.burst.as_ref(),
        d.rate(),
    );
    RateLimit {
        requests_per_second,
        burst,
        key,
        max_tracked_clients: integer(
            r,
            "rate_limit.max_tracked_clients",
            raw.max_tracked_clients.as_ref(),
            d.max_tracked_clients as u32,
            1,
        ) as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert_eq!(
            host_match("API.example.com"),
            Ok(HostMatch::Exact("api.example.com".into()))
        );
        assert_eq!(
            host_match("*.example.com"),
            Ok(HostMatch::Suffix(".example.com".into()))
        );
        // As nginx's server_name takes them, and a Host carries them.
        assert_eq!(
            host_match("a_b.example"),
            Ok(HostMatch::Exact("a_b.example".into()))
        );
        assert_eq!(
            host_match("[2001:0DB8:0::1]"),
            Ok(HostMatch::Exact("[2001:db8::1]".into()))
        );
        for bad in [
            "",
            "*.",
            "a..b",
            "example.com:80",
            "*example.com",
            "a.*.com",
            "exa mple.com",
            "-a.example",
            "a-.example",
            "[not-v6]",
            "[::1]:80",
        ] {
            assert!(host_match(bad).is_err(), "{bad}");
        }
        let idn = host_match("bücher.example").unwrap_err();
        assert!(idn.contains("xn--bcher-kva"), "{idn}");
    }

    #[test]
    fn cidr_blocks() {
        assert_eq!(cidr("10.0.0.0/8").map(|c| c.prefix), Ok(8));
        assert_eq!(cidr("127.0.0.1").map(|c| c.prefix), Ok(32));
        assert_eq!(cidr("::1").map(|c| c.prefix), Ok(128));
        assert_eq!(cidr("2001:db8::/32").map(|c| c.prefix), Ok(32));
        assert_eq!(cidr("0.0.0.0/0").map(|c| c.prefix), Ok(0));
        let e = cidr("10.0.0.1/8").unwrap_err();
        assert!(
            e.contains("\"10.0.0.0/8\" for the block or \"10.0.0.1\""),
            "{e}"
        );
        let e = cidr("2001:db8::1/64").unwrap_err();
        assert!(e.contains("\"2001:db8::/64\""), "{e}");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0/8",
            "x",
            "10.0.0.0/+8",
        ] {
            assert!(
                cidr(bad).unwrap_err().contains("is not an address"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_wildcard_listener_is_reached_through_any_address_of_the_machine() {
        let at = |text: &str| text.parse::<SocketAddr>().unwrap();
        let lan: IpAddr = "10.1.2.3".parse().unwrap();
        let is_lan = |ip: IpAddr| ip == lan;
        // Behind a wildcard, this machine's addresses and loopback loop.
        assert!(reaches(at("10.1.2.3:80"), at("0.0.0.0:80"), is_lan));
        assert!(reaches(at("10.1.2.3:80"), at("[::]:80"), is_lan));
        assert!(reaches(
            at("[::ffff:10.1.2.3]:80"),
            at("0.0.0.0:80"),
            is_lan
        ));
        assert!(reaches(at("127.0.0.9:80"), at("0.0.0.0:80"), |_| false));
        // Another machine's, another port, an IPv4 wildcard for an IPv6
        // address, or a listener on one address: no.
        assert!(!reaches(at("10.1.2.4:80"), at("0.0.0.0:80"), is_lan));
        assert!(!reaches(at("10.1.2.3:81"), at("0.0.0.0:80"), is_lan));
        assert!(!reaches(at("[fe80::1]:80"), at("0.0.0.0:80"), |_| true));
        assert!(!reaches(at("10.1.2.3:80"), at("127.0.0.1:80"), is_lan));
        // The machine is asked only when the rest could loop.
        let asked = std::cell::Cell::new(false);
        let ask = |_| {
            asked.set(true);
            true
        };
        assert!(!reaches(at("10.1.2.3:81"), at("0.0.0.0:80"), ask));
        assert!(!asked.get());
    }

    #[test]
    fn this_machine_s_own_addresses_are_local() {
        let interfaces = if_addrs::get_if_addrs().unwrap();
        for interface in &interfaces {
            assert!(is_local(interface.ip()), "{interface:?}");
        }
        // And an address none of them has is not (a documentation one,
        // RFC 5737, that this machine does not happen to use).
        let elsewhere = ["203.0.113.7", "198.51.100.7", "192.0.2.77"]
            .map(|ip| ip.parse::<IpAddr>().unwrap())
            .into_iter()
            .find(|ip| interfaces.iter().all(|i| i.ip() != *ip))
            .unwrap();
        assert!(!is_local(elsewhere));
    }
}
