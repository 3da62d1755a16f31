//! `[[upstream]]`: backends, balancing and its hash key, timeouts and
//! retries, `max_conns`, TLS to the backends and `[upstream.health]`.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use crate::config::model::*;
use crate::config::raw;
use crate::config::units::parse_duration;

use super::frontend::{is_local, reaches, read_pem_certificates};
use super::{duration, integer, name_problem, positive, socket_addr, R};

pub(super) fn upstream(
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
