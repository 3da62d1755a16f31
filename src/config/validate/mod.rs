//! Raw file -> typed [`Config`]: defaults filled in, every value parsed and
//! every rule checked, with all problems collected rather than stopping at
//! the first.
//!
//! `[server]` and `[admin]` are checked in `frontend`, `[[upstream]]` in
//! `backend`; the rest, and the values every section uses, here.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::error::Reporter;
use super::model::*;
use super::raw;
use super::units::{parse_duration, parse_size};

mod backend;
mod frontend;

use backend::upstream;
use frontend::{admin, overlap_message, server, Claim};
pub(crate) use frontend::{overlap, pem_error, reaches_own, read_pem_certificates};

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
    // The upstreams an `unknown upstream` error lists.
    let known_upstreams = std::cell::OnceCell::new();
    for (i, spanned) in file.route.iter().enumerate() {
        let key = format!("route[{i}]");
        let raw = spanned.get_ref();
        // Every problem of the route is reported before it is left out.
        let upstream = by_name.get(raw.upstream.get_ref()).copied();
        if upstream.is_none() {
            let known = known_upstreams.get_or_init(|| {
                // Each name once: a duplicated one is an error of its
                // own (ops54 L5: `(defined: a, a)`).
                let mut seen = HashSet::new();
                let known: Vec<&str> = file
                    .upstream
                    .iter()
                    .map(|u| u.get_ref().name.get_ref().as_str())
                    .filter(|name| name_problem(name).is_none() && seen.insert(*name))
                    .collect();
                // Not `(defined: )` (review43b), nor every name of
                // thousands for each route that misses (ops54 M2: 2,000
                // such routes and 5,000 upstreams made 318 MB of errors);
                // made once, not for each (review62 L3).
                match known.len() {
                    0 => "none".to_owned(),
                    n if n <= MOST_NAMES_SHOWN => known.join(", "),
                    n => format!(
                        "{}, and {} more",
                        known[..MOST_NAMES_SHOWN].join(", "),
                        n - MOST_NAMES_SHOWN
                    ),
                }
            });
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

/// How many upstream names an `unknown upstream` error lists.
const MOST_NAMES_SHOWN: usize = 10;

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
        stale_if_error: duration(
            r,
            "cache.stale_if_error",
            raw.stale_if_error.as_ref(),
            d.stale_if_error,
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
}
