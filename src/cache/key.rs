//! Cache keys. The primary key is the method class (GET and HEAD share
//! one), scheme, host (lower-cased, default port dropped) and the path with
//! its query. The secondary key adds the request's values of the header
//! fields the response named in `Vary`, normalised (RFC 9111 §4.1) so that
//! whitespace differences do not split variants, and a trusted proxy's
//! forwarded host where it is not the host.

use http::header::{HeaderMap, HeaderName};

/// `GET|scheme|host|/path?query`
pub fn primary(scheme: &str, host: &str, path_and_query: &str) -> String {
    let host = without_default_port(scheme, host);
    let mut key = String::with_capacity(8 + scheme.len() + host.len() + path_and_query.len());
    key.push_str("GET|");
    key.push_str(scheme);
    key.push('|');
    let start = key.len();
    key.push_str(host);
    key[start..].make_ascii_lowercase();
    key.push('|');
    key.push_str(path_and_query);
    key
}

/// `host` without its `scheme`'s default port: `a.example:80` over http is
/// `a.example`, as `a.example:443` is over https, and `a.example:` is too
/// (an empty port is the default one, RFC 3986 §6.2.3; it was a second
/// key for the same resource, review40d L1).
fn without_default_port<'a>(scheme: &str, host: &'a str) -> &'a str {
    // What goes is ASCII, so the rest is still UTF-8.
    &host[..default_port_dropped(scheme, host.as_bytes()).len()]
}

/// [`without_default_port`] for a field's bytes.
fn default_port_dropped<'a>(scheme: &str, host: &'a [u8]) -> &'a [u8] {
    host.strip_suffix(b":")
        .or_else(|| host.strip_suffix(b":80").filter(|_| scheme == "http"))
        .or_else(|| host.strip_suffix(b":443").filter(|_| scheme == "https"))
        .unwrap_or(host)
}

/// The path-and-query part of a primary key.
pub fn path_of(key: &str) -> &str {
    host_and_path_of(key).1
}

/// The host (lower-cased, default port dropped) and path-and-query parts
/// of a key.
pub fn host_and_path_of(key: &str) -> (&str, &str) {
    let primary = primary_of(key);
    let mut parts = primary.splitn(4, '|').skip(2);
    let host = parts.next().unwrap_or("");
    (host, parts.next().unwrap_or(""))
}

/// The primary part of a full key.
pub fn primary_of(key: &str) -> &str {
    key.split('\n').next().unwrap_or(key)
}

/// Why a response's `Vary` matches no request (see [`vary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatchable {
    /// `Vary: *`.
    Star,
    /// A member that is no field name, or a value that is not ASCII: what
    /// it varies on is unknown.
    Invalid,
}

/// The field names a response's `Vary` lists, lower-cased, or why it
/// matches nothing: `*` anywhere (in a readable value) wins over a member
/// that cannot be read. Empty members (`a, , b`) are allowed, as in every
/// list (RFC 9110 §5.6.1).
pub fn vary(response: &HeaderMap) -> Result<Vec<HeaderName>, Unmatchable> {
    let mut names = Vec::new();
    let mut invalid = false;
    for value in response.get_all(http::header::VARY) {
        let Ok(value) = value.to_str() else {
            invalid = true;
            continue;
        };
        for name in value.split(',') {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            // `*` is a token, so it would pass for a field name.
            if name == "*" {
                return Err(Unmatchable::Star);
            }
            match HeaderName::try_from(name) {
                Ok(name) => names.push(name),
                Err(_) => invalid = true,
            }
        }
    }
    if invalid {
        return Err(Unmatchable::Invalid);
    }
    // Sorted, then rid of repeats: looked for in the list as each came, a
    // long `Vary` was quadratic (18,000 names in 72 KiB took a second of
    // the thread, fuzz49).
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Ok(names)
}

/// [`vary`]'s names; `None` when the response matches no request
/// (`Vary: *`, or a `Vary` that cannot be read whole).
pub fn vary_names(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    vary(response).ok()
}

/// `primary` plus, for each Vary field, the request's normalised value
/// (`\nname:value`, or `\nname` when the request lacks the field). The
/// cache adds the forwarded host where it is not the host
/// ([`push_forwarded`]).
pub fn full(primary: &str, names: &[HeaderName], request: &HeaderMap) -> String {
    let mut key = String::from(primary);
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        // RFC 9111 §4.1: an absent field matches only an absent field, so
        // `x-foo` absent (no colon) differs from `x-foo:` sent empty.
        if !request.contains_key(name) {
            continue;
        }
        key.push(':');
        let list = is_list(name);
        let mut first = true;
        for value in request.get_all(name) {
            // A list's lines are one list (RFC 9110 §5.3); another field's
            // are kept apart, with a byte no value holds: two `Cookie`
            // lines, forwarded as two, are not the one `a, b` (review37b L1).
            if !first {
                key.push(if list { ',' } else { '\r' });
            }
            first = false;
            // Bytes are taken one char each (as Latin-1), so values that
            // differ in bytes that are not UTF-8 stay different: a lossy
            // decoding made every such byte U+FFFD, and one client's
            // variant another's.
            if !list {
                key.extend(value.as_bytes().iter().map(|&b| char::from(b)));
                continue;
            }
            // Whitespace around a list's separators is collapsed (RFC
            // 9111 §4.1 allows it where the field's syntax does).
            for (i, part) in value.as_bytes().split(|&b| b == b',').enumerate() {
                if i > 0 {
                    key.push(',');
                }
                key.extend(part.trim_ascii().iter().map(|&b| char::from(b)));
            }
        }
    }
    key
}

/// What begins each forwarded variant in a key: no Vary field's name
/// holds a NUL, so a key holds it only after [`push_forwarded`].
const FORWARDED_MARK: &str = "\n\0";

/// Whether `key` is a forwarded variant of its URL ([`push_forwarded`]).
pub fn is_forwarded_variant(key: &str) -> bool {
    key.contains(FORWARDED_MARK)
}

static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A trusted proxy's forwarded host, where it is not the `Host` that
/// `primary` holds, as a variant of its own (`\n\0host:` and the host,
/// lower-cased, its default port dropped; no field name holds a NUL).
/// Backends build links from `X-Forwarded-Host` (Rails, Django, Spring),
/// so the page made for one forwarded host must not serve another: keyed
/// on `Host` alone, a balancer that passes its clients' field on let one
/// poison every client's page (netfuzz49 Q1). Keyed on the forwarded host
/// instead, a request routed and fetched by one `Host` stored its page
/// under another's URL (review49). As a variant, it is chosen by both,
/// and a purge or an unsafe request for the `Host` URL reaches it as it
/// reaches any variant. The request is the one portico forwards, which
/// carries the `Host` here unless a trusted proxy said otherwise: other
/// requests have no such variant. The other claims such a proxy passes on
/// are variants too ([`push_claims`]).
pub fn push_forwarded(key: &mut String, primary: &str, request: &HeaderMap) {
    // `GET|http|host|...` or `GET|https|host|...` (see [`primary`]).
    let scheme = match primary.as_bytes().get(4..10) {
        Some(b"https|") => "https",
        _ => "http",
    };
    let rest = primary
        .as_bytes()
        .get(4 + scheme.len() + 1..)
        .unwrap_or(&[]);
    let own = &rest[..rest.iter().position(|&b| b == b'|').unwrap_or(rest.len())];
    let said = request
        .get(&X_FORWARDED_HOST)
        .map(|given| default_port_dropped(scheme, given.as_bytes()));
    if let Some(given) = said.filter(|given| !given.eq_ignore_ascii_case(own)) {
        key.push_str(FORWARDED_MARK);
        key.push_str("host:");
        key.extend(given.iter().map(|&b| char::from(b.to_ascii_lowercase())));
    }
    push_claims(key, (scheme, said.unwrap_or(own)), request);
}

/// The other claims a trusted proxy passes on, as variants of their own
/// (`\n\0` and each `name:value`, in the order of the names): what
/// `Forwarded` says beyond the scheme and host the key has already
/// (`keyed`), and the `X-Forwarded-Prefix`, `-Port`, `X-Original-URL` and
/// the like that frameworks build links or even paths from (see
/// `headers::CLAIMS`), as they came, in either spelling (Rack and PHP read
/// `X_Forwarded_Prefix` as `X-Forwarded-Prefix`, review50b M1). Without
/// them a client's `Forwarded: host=evil.example` ahead of its balancer's
/// element, stored, was served to everyone (review50 H1). Not a client's
/// own address (`for=`, `X-Real-IP`), which would make a variant per
/// client; a balancer writes the rest alike for every client of a site.
/// Other requests carry none of them: portico drops them from clients
/// that are not trusted.
fn push_claims(key: &mut String, keyed: (&str, &[u8]), request: &HeaderMap) {
    let mut claims: Vec<(&str, &[u8])> = Vec::new();
    for (name, value) in request {
        let name = name.as_str();
        if name == "forwarded" || is_claim(name) {
            claims.push((name, value.as_bytes()));
        }
    }
    // Stable: a field's lines keep their order.
    claims.sort_by_key(|(name, _)| *name);
    for (name, value) in claims {
        let start = key.len();
        key.push_str(FORWARDED_MARK);
        key.push_str(name);
        key.push(':');
        if name == "forwarded" {
            let bare = key.len();
            push_forwarded_pairs(key, keyed, value);
            // Nothing but what the key has already.
            if key.len() == bare {
                key.truncate(start);
            }
        } else {
            key.extend(value.iter().map(|&b| char::from(b)));
        }
    }
}

/// A `Forwarded` line's pairs, read as loosely as frameworks read them:
/// Spring finds `host=` and `proto=` anywhere in the field, inside a
/// quoted value or a longer name too (`for="_x;host=evil.example"`,
/// `xhost=`), so the line is split at every `,` and `;`, quotes or not,
/// and every pair is kept but a `host=` or `proto=` saying what `keyed`
/// says and a `for=` or `by=` holding neither (review50b H1). Junk a
/// strict reading refuses (an unquoted IPv6 `for=2001:db8::10`, a
/// `host=site:8080`) is so read like the rest, not kept whole with the
/// client's address in it (review50b M2).
fn push_forwarded_pairs(key: &mut String, keyed: (&str, &[u8]), line: &[u8]) {
    let (scheme, host) = keyed;
    let unquoted = |value: &[u8]| -> Vec<u8> {
        let value = value.strip_prefix(b"\"").unwrap_or(value);
        value
            .strip_suffix(b"\"")
            .unwrap_or(value)
            .to_ascii_lowercase()
    };
    for pair in line.split(|&b| b == b',' || b == b';') {
        let pair = pair.trim_ascii();
        let lower = pair.to_ascii_lowercase();
        let named = |param: &[u8]| lower.windows(param.len()).any(|w| w == param);
        let redundant = if let Some(value) = lower.strip_prefix(b"host=") {
            default_port_dropped(scheme, &unquoted(value)).eq_ignore_ascii_case(host)
        } else if let Some(value) = lower.strip_prefix(b"proto=") {
            unquoted(value) == scheme.as_bytes()
        } else {
            pair.is_empty()
                || ((lower.starts_with(b"for=") || lower.starts_with(b"by="))
                    && !named(b"host=")
                    && !named(b"proto="))
        };
        if !redundant {
            key.push(';');
            key.extend(pair.iter().map(|&b| char::from(b)));
        }
    }
}

/// Whether `name` is one of `headers::CLAIMS` but `X-Real-IP`, in either
/// spelling (`_` for `-`).
fn is_claim(name: &str) -> bool {
    let name = name.as_bytes();
    if !(name.starts_with(b"x-") || name.starts_with(b"x_")) {
        return false;
    }
    crate::proxy::headers::CLAIMS.iter().any(|claim| {
        *claim != "x-real-ip"
            && claim.len() == name.len()
            && claim
                .bytes()
                .zip(name)
                .all(|(c, &n)| c == n || (c == b'-' && n == b'_'))
    })
}

/// Whether the request field `name` is a comma-separated list, whose
/// spacing around commas and split over lines mean nothing (RFC 9110
/// §5.3, §5.6.1): the `Accept` family, `Cache-Control` and the like. Any
/// other (`User-Agent`, `Cookie`, `Origin`, an application's own) is
/// matched byte for byte: `Bot (a ,b)` and `Bot (a, b)` are two clients.
fn is_list(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("accept")
        || matches!(
            name,
            "cache-control" | "pragma" | "prefer" | "te" | "via" | "forwarded" | "x-forwarded-for"
        )
}

/// A `Location` or `Content-Location` value resolved against the request
/// target `base` (RFC 3986 §5.2): the path and query it names on the same
/// origin, or `None` for another origin. `scheme` and `host` are the
/// request's, to judge an absolute URI's authority (default ports aside,
/// as keys hold hosts); a relative reference is same-origin.
pub fn resolve(base: &str, scheme: &str, host: &str, reference: &str) -> Option<String> {
    let reference = reference.split('#').next().unwrap_or("");
    let has_scheme = reference
        .find([':', '/', '?'])
        .is_some_and(|i| reference.as_bytes()[i] == b':');
    if has_scheme || reference.starts_with("//") {
        let uri = if has_scheme {
            reference.parse::<http::Uri>().ok()?
        } else {
            format!("{scheme}:{reference}").parse::<http::Uri>().ok()?
        };
        let authority = uri.authority()?.as_str();
        // The scheme is the origin's too: an `https:` URI on a plain
        // request names another resource (review42b L1).
        let named_scheme = uri.scheme_str().unwrap_or(scheme);
        let named = without_default_port(named_scheme, authority);
        if !named_scheme.eq_ignore_ascii_case(scheme)
            || !named.eq_ignore_ascii_case(without_default_port(scheme, host))
        {
            return None;
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        return Some(without_dot_segments(path));
    }
    let base_path = base.split('?').next().unwrap_or(base);
    let merged = if reference.is_empty() {
        base.to_owned()
    } else if reference.starts_with('/') {
        reference.to_owned()
    } else if reference.starts_with('?') {
        format!("{base_path}{reference}")
    } else {
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        format!("{}{reference}", if dir.is_empty() { "/" } else { dir })
    };
    Some(without_dot_segments(&merged))
}

/// RFC 3986 §5.2.4 on the path part of `path?query`.
fn without_dot_segments(path_and_query: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut resolved = remove_dot_segments(path, false);
    if let Some(query) = query {
        resolved.push('?');
        resolved.push_str(query);
    }
    resolved
}

/// RFC 3986 §5.2.4: `.` and `..` segments of an absolute path (`/...`)
/// removed; a final one leaves its slash. With `merge_slashes`, empty
/// segments (`//`) go too, but a trailing slash stays, as nginx merges
/// them before matching locations.
pub fn remove_dot_segments(path: &str, merge_slashes: bool) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                kept.pop();
            }
            "" if merge_slashes && i != last => continue,
            segment => {
                kept.push(segment);
                continue;
            }
        }
        // A final `.` or `..` names a directory: keep the slash.
        if i == last {
            kept.push("");
        }
    }
    format!("/{}", kept.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn primary_keys_normalise_host_and_default_port() {
        assert_eq!(
            primary("http", "Example.COM:80", "/a?b=1"),
            "GET|http|example.com|/a?b=1"
        );
        assert_eq!(
            primary("https", "example.com:443", "/"),
            "GET|https|example.com|/"
        );
        assert_eq!(
            primary("http", "example.com:8080", "/"),
            "GET|http|example.com:8080|/"
        );
        assert_eq!(primary("http", "[::1]:", "/"), "GET|http|[::1]|/");
        assert_eq!(primary("https", "a.example:", "/"), "GET|https|a.example|/");
        assert_eq!(path_of("GET|http|h|/users/1?x=1\naccept:a"), "/users/1?x=1");
    }

    /// A `Vary` of many names, repeated on its lines, is each name once,
    /// in order (each was looked for along the list: quadratic).
    #[test]
    fn a_long_vary_lists_each_name_once() {
        let names: Vec<String> = (0..20_000).rev().map(|i| format!("x-{i}")).collect();
        let line = HeaderValue::from_str(&names.join(", ")).unwrap();
        let mut response = HeaderMap::new();
        response.append("vary", line.clone());
        response.append("vary", HeaderValue::from_static("Accept, accept"));
        response.append("vary", line);
        let read = vary(&response).unwrap();
        assert_eq!(read.len(), 20_001);
        assert_eq!(read[0], "accept");
        assert!(read.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
    }

    /// A forwarded host other than `Host` is a variant of the `Host` URL;
    /// the `Host` itself (as portico writes it for a client that is not
    /// trusted), in any case and with its default port, is none.
    #[test]
    fn a_forwarded_host_other_than_host_is_a_variant_of_its_own() {
        let with = |host: &'static str| {
            let mut request = HeaderMap::new();
            request.insert("x-forwarded-host", HeaderValue::from_static(host));
            request
        };
        let key = |p: &str, names: &[HeaderName], request: &HeaderMap| {
            let mut key = full(p, names, request);
            push_forwarded(&mut key, p, request);
            key
        };
        let p = primary("https", "Shop.example", "/");
        for same in ["shop.example", "SHOP.example:443", "shop.example:"] {
            assert_eq!(key(&p, &[], &with(same)), p, "{same}");
        }
        assert_eq!(key(&p, &[], &HeaderMap::new()), p);
        assert_eq!(
            key(&p, &[], &with("Other.example:443")),
            "GET|https|shop.example|/\n\0host:other.example"
        );
        for other in [
            "shop.example:80",
            "shop.exampl",
            "shop.example.com",
            "hop.example",
        ] {
            assert_eq!(
                key(&p, &[], &with(other)),
                format!("GET|https|shop.example|/\n\0host:{other}")
            );
        }
        let names = [HeaderName::from_static("accept")];
        assert_eq!(
            key(&p, &names, &with("other.example")),
            "GET|https|shop.example|/\naccept\n\0host:other.example"
        );
        let plain = primary("http", "shop.example:80", "/");
        assert_eq!(key(&plain, &[], &with("Shop.Example:80")), plain);
        assert_eq!(
            key(&plain, &[], &with("shop.example:443")),
            "GET|http|shop.example|/\n\0host:shop.example:443"
        );
    }

    /// The claims a trusted proxy passes on are variants, whatever the
    /// order of their fields; a client's address in them is not.
    #[test]
    fn a_trusted_proxy_s_claims_are_variants_of_their_own() {
        let p = primary("https", "shop.example", "/");
        let key = |fields: &[(&'static str, &'static str)]| {
            let mut request = HeaderMap::new();
            for (name, value) in fields {
                request.append(*name, HeaderValue::from_static(value));
            }
            let mut key = full(&p, &[], &request);
            push_forwarded(&mut key, &p, &request);
            key
        };
        // What the key has already (scheme, host) makes no variant.
        let balancer = "for=192.0.2.1;proto=https;host=shop.example";
        assert_eq!(key(&[("x-real-ip", "192.0.2.1")]), p);
        assert_eq!(key(&[("forwarded", balancer)]), p);
        assert_eq!(
            key(&[(
                "forwarded",
                "for=198.51.100.7;proto=HTTPS;host=\"Shop.example:443\""
            )]),
            p
        );
        let forged = "host=evil.example, for=192.0.2.1;proto=https;host=shop.example";
        assert_eq!(
            key(&[("forwarded", forged)]),
            "GET|https|shop.example|/\n\0forwarded:;host=evil.example"
        );
        assert_eq!(
            key(&[("forwarded", "proto=http;host=a.example, for=1;proto=https")]),
            "GET|https|shop.example|/\n\0forwarded:;proto=http;host=a.example"
        );
        // Read as loosely as Spring reads it (review50b H1), and a client's
        // address is no variant however it is written (M2).
        for loose in [
            "for=\"_x;host=evil.example\", for=1;host=shop.example",
            "for=1;by=\"host=evil.example\";host=shop.example",
            "xhost=evil.example, for=1;host=shop.example",
            "for=\"x,host=evil.example\";host=shop.example",
            "for=1;xproto=http",
        ] {
            assert_ne!(key(&[("forwarded", loose)]), p, "{loose}");
        }
        for client in [
            "for=2001:db8::10;proto=https;host=shop.example",
            "for=192.0.2.1:4711;host=shop.example:443",
            "for=\"[2001:db8::1]:4711\";by=10.0.0.1",
        ] {
            assert_eq!(key(&[("forwarded", client)]), p, "{client}");
        }
        assert_eq!(
            key(&[("forwarded", "\"open, for=1;host=shop.example")]),
            "GET|https|shop.example|/\n\0forwarded:;\"open"
        );
        // Against the forwarded host the key has, where there is one.
        let mut request = HeaderMap::new();
        request.append("x-forwarded-host", HeaderValue::from_static("b.example"));
        request.append(
            "forwarded",
            HeaderValue::from_static("for=1;host=b.example"),
        );
        let mut forwarded = full(&p, &[], &request);
        push_forwarded(&mut forwarded, &p, &request);
        assert_eq!(forwarded, "GET|https|shop.example|/\n\0host:b.example");
        let both = [("x-forwarded-prefix", "/shop"), ("x-forwarded-port", "443")];
        assert_eq!(
            key(&both),
            "GET|https|shop.example|/\n\0x-forwarded-port:443\n\0x-forwarded-prefix:/shop"
        );
        assert_eq!(key(&both), key(&[both[1], both[0]]));
        assert_ne!(key(&[("x-original-url", "/admin")]), p);
        // Either spelling (review50b M1); not the client's address.
        assert_eq!(
            key(&[("x_forwarded_prefix", "/evil")]),
            "GET|https|shop.example|/\n\0x_forwarded_prefix:/evil"
        );
        assert_eq!(key(&[("x_real_ip", "192.0.2.1")]), p);
    }

    #[test]
    fn vary_splits_variants_by_request_values() {
        let mut response = HeaderMap::new();
        response.insert("vary", HeaderValue::from_static("Accept-Encoding, accept"));
        let names = vary_names(&response).unwrap();
        let mut gzip = HeaderMap::new();
        gzip.insert("accept-encoding", HeaderValue::from_static("gzip,  br"));
        let mut gzip2 = HeaderMap::new();
        gzip2.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        let plain = HeaderMap::new();
        let p = primary("http", "h", "/");
        assert_eq!(full(&p, &names, &gzip), full(&p, &names, &gzip2));
        assert_ne!(full(&p, &names, &gzip), full(&p, &names, &plain));
        // Sent empty is not the same as absent (RFC 9111 §4.1).
        let mut empty = HeaderMap::new();
        empty.insert("accept-encoding", HeaderValue::from_static(""));
        assert_ne!(full(&p, &names, &empty), full(&p, &names, &plain));
        response.insert("vary", HeaderValue::from_static("*"));
        assert!(vary_names(&response).is_none());
        // What cannot be read varies on the unknown: nothing matches.
        for unreadable in ["\"Cookie\"", "Cookie/1", "accept, x y"] {
            response.insert("vary", HeaderValue::from_static(unreadable));
            assert!(vary_names(&response).is_none(), "{unreadable}");
        }
        response.insert("vary", HeaderValue::from_bytes(b"Cookie\xe9").unwrap());
        assert!(vary_names(&response).is_none());
        // `*` wins, as the store's reason says.
        response.insert("vary", HeaderValue::from_static("\"Cookie\", *"));
        assert_eq!(vary(&response), Err(Unmatchable::Star));
        response.insert("vary", HeaderValue::from_static("accept, , cookie,"));
        assert_eq!(vary_names(&response).unwrap().len(), 2);
    }

    #[test]
    fn values_that_differ_only_in_bytes_outside_utf8_are_other_variants() {
        let mut response = HeaderMap::new();
        response.insert("vary", HeaderValue::from_static("x-name"));
        let names = vary_names(&response).unwrap();
        let p = primary("http", "h", "/");
        let with = |bytes: &[u8]| {
            let mut request = HeaderMap::new();
            request.insert("x-name", HeaderValue::from_bytes(bytes).unwrap());
            full(&p, &names, &request)
        };
        assert_ne!(with(b"Ren\xe9"), with(b"Ren\xe8"));
        assert_ne!(with(b"Ren\xe9"), with("Ren\u{fffd}".as_bytes()));
        // No list: its spacing is the client's (review37b L1).
        assert_ne!(with(b"a\xe9 , b"), with(b"a\xe9,b"));
    }

    #[test]
    fn only_list_fields_are_read_as_lists() {
        let mut response = HeaderMap::new();
        response.insert(
            "vary",
            HeaderValue::from_static("cookie, user-agent, accept-language"),
        );
        let names = vary_names(&response).unwrap();
        let p = primary("http", "h", "/");
        let key = |fields: &[(&'static str, &'static str)]| {
            let mut request = HeaderMap::new();
            for (name, value) in fields {
                request.append(*name, HeaderValue::from_static(value));
            }
            full(&p, &names, &request)
        };
        // Two Cookie lines go to the backend as two: not one `a, b`.
        let two = key(&[("cookie", "prefs=en"), ("cookie", "dark")]);
        assert_ne!(two, key(&[("cookie", "prefs=en,dark")]));
        assert_ne!(two, key(&[("cookie", "prefs=en, dark")]));
        assert_ne!(
            key(&[("user-agent", "Bot (compatible ,x)")]),
            key(&[("user-agent", "Bot (compatible, x)")])
        );
        // A list's lines and spacing mean nothing.
        assert_eq!(
            key(&[("accept-language", "en ,fr"), ("accept-language", "de")]),
            key(&[("accept-language", "en, fr, de")])
        );
    }

    #[test]
    fn locations_resolve_against_the_target() {
        let base = "/rl/a/b?x=1";
        for (reference, want) in [
            ("../target", Some("/rl/target")),
            ("target", Some("/rl/a/target")),
            ("./target?q", Some("/rl/a/target?q")),
            ("?page=2", Some("/rl/a/b?page=2")),
            ("", Some("/rl/a/b?x=1")),
            ("#top", Some("/rl/a/b?x=1")),
            ("/abs/../x", Some("/x")),
            ("../../../..", Some("/")),
            ("http://Example.com/y", Some("/y")),
            ("//example.com/z", Some("/z")),
            ("http://other.example/y", None),
            ("//other.example/y", None),
            ("https://example.com:8443/y", None),
            // Default ports aside, the same origin (review28b F4).
            ("http://example.com:80/p", Some("/p")),
            ("http://example.com:8080/p", None),
            // Another scheme is another origin (RFC 9111 §4.4), default
            // port or not (review42b L1).
            ("https://example.com/y", None),
            ("HTTP://example.com/y", Some("/y")),
        ] {
            assert_eq!(
                resolve(base, "http", "example.com", reference).as_deref(),
                want,
                "{reference}"
            );
        }
        for (reference, want) in [
            ("https://example.com:443/y", Some("/y")),
            ("//example.com/z", Some("/z")),
            ("http://example.com/y", None),
        ] {
            assert_eq!(
                resolve(base, "https", "example.com", reference).as_deref(),
                want,
                "{reference}"
            );
        }
    }
}
