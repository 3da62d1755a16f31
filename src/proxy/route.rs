//! Route selection: which configured route serves a host and path. The most
//! specific host wins (exact name, then the longest `*.suffix`, then routes
//! without a host), then the longest matching `path_prefix`. Prefixes match
//! as plain string prefixes, like nginx's prefix locations, against the
//! path in its normal form ([`routing_path`]), so `/public/../admin/` is
//! routed as `/admin/`. Host comparison ignores case, a trailing dot and
//! any port.

use std::borrow::Cow;

use crate::config::{HostMatch, Route};

/// Routes in match order, so a lookup is the first hit of a linear scan:
/// configs have a handful of routes, and a scan over a few cache lines beats
/// hashing here.
#[derive(Debug, Clone)]
pub struct Router {
    /// (index into the config's routes, the route), most specific first.
    routes: Vec<(usize, Route)>,
}

/// Higher is more specific: exact hosts, then longer suffixes, then any host.
fn host_rank(host: &HostMatch) -> (u8, usize) {
    match host {
        HostMatch::Exact(name) => (2, name.len()),
        HostMatch::Suffix(suffix) => (1, suffix.len()),
        HostMatch::Any => (0, 0),
    }
}

/// `Host` without port or trailing dot. Bracketed IPv6 literals keep their
/// brackets.
pub fn host_name(host: &str) -> &str {
    let name = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    name.strip_suffix('.').unwrap_or(name)
}

fn host_matches(rule: &HostMatch, host: Option<&str>) -> bool {
    match (rule, host) {
        (HostMatch::Any, _) => true,
        (_, None) => false,
        (HostMatch::Exact(name), Some(host)) => host.eq_ignore_ascii_case(name),
        (HostMatch::Suffix(suffix), Some(host)) => {
            // `*.example.com` matches `a.example.com`, not `example.com`.
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

impl Router {
    pub fn new(routes: &[Route]) -> Self {
        let mut routes: Vec<(usize, Route)> = routes.iter().cloned().enumerate().collect();
        // Stable sort: among equally specific routes, file order decides.
        routes.sort_by(|(_, a), (_, b)| {
            host_rank(&b.host)
                .cmp(&host_rank(&a.host))
                .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
        });
        Router { routes }
    }

    /// The route with index `index` in the config's route list.
    pub fn route(&self, index: usize) -> Option<&Route> {
        self.routes
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, r)| r)
    }

    /// The route for a request, with its index in the config's route list.
    /// `host` is the raw Host / :authority value (port allowed).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        let host = host.map(host_name);
        let path = routing_path(path);
        let path = path.as_ref();
        self.routes
            .iter()
            .find(|(_, route)| {
                host_matches(&route.host, host) && path.starts_with(route.path_prefix.as_str())
            })
            .map(|(index, route)| (*index, route))
    }
}

/// The path a route is chosen by: percent-escaped unreserved characters
/// decoded (RFC 3986 §6.2.2.2: `%2e` is `.`), repeated slashes merged and
/// dot segments removed (§5.2.4), as nginx does before matching locations.
/// A backend that resolves `/public/../admin` serves `/admin`, so the
/// route, its upstream and its limits must be `/admin`'s too. The request
/// itself is forwarded as the client wrote it. Paths without `%`, `//` or
/// `/.` (nearly all) are returned as they are.
pub fn routing_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let plain = !bytes.contains(&b'%')
        && !bytes
            .windows(2)
            .any(|pair| pair[0] == b'/' && (pair[1] == b'/' || pair[1] == b'.'));
    if plain || !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    let mut decoded = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        decoded.push_str(&rest[..at]);
        let escape = rest.get(at + 1..at + 3);
        match escape.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
            Some(b) if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                decoded.push(char::from(b));
                rest = &rest[at + 3..];
            }
            // Reserved or invalid: `%2F` is not a `/`.
            _ => {
                decoded.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    decoded.push_str(rest);
    Cow::Owned(crate::cache::key::remove_dot_segments(&decoded, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: HostMatch, prefix: &str, name: &str) -> Route {
        Route {
            host,
            path_prefix: prefix.into(),
            upstream: 0,
            cache: false,
            rate_limit: false,
            name: name.into(),
        }
    }

    fn router() -> Router {
        Router::new(&[
            route(HostMatch::Any, "/", "default"),
            route(HostMatch::Any, "/api/", "api"),
            route(HostMatch::Suffix(".example.com".into()), "/", "wild"),
            route(
                HostMatch::Suffix(".shop.example.com".into()),
                "/",
                "wild-shop",
            ),
            route(HostMatch::Exact("api.example.com".into()), "/", "exact"),
            route(
                HostMatch::Exact("api.example.com".into()),
                "/v2/",
                "exact-v2",
            ),
        ])
    }

    #[test]
    fn most_specific_host_then_longest_prefix_wins() {
        let router = router();
        let cases: &[(Option<&str>, &str, Option<&str>)] = &[
            (None, "/", Some("default")),
            (None, "/api/users", Some("api")),
            (None, "/apix", Some("default")),
            (Some("other.org"), "/api/x", Some("api")),
            (Some("api.example.com"), "/", Some("exact")),
            (Some("api.example.com"), "/v2/orders", Some("exact-v2")),
            (Some("API.Example.COM:8080"), "/v2/", Some("exact-v2")),
            (Some("api.example.com."), "/", Some("exact")),
            (Some("www.example.com"), "/api/x", Some("wild")),
            (Some("a.shop.example.com"), "/", Some("wild-shop")),
            // The bare domain is not covered by `*.example.com`.
            (Some("example.com"), "/", Some("default")),
            (Some("[::1]:8080"), "/api/", Some("api")),
        ];
        for (host, path, want) in cases {
            let got = router.find(*host, path).map(|(_, r)| r.name.as_str());
            assert_eq!(got, *want, "host {host:?} path {path}");
        }
    }

    #[test]
    fn routing_path_is_the_normal_form() {
        let cases = [
            ("/", "/"),
            ("/users/1/orders", "/users/1/orders"),
            ("/e/../health", "/health"),
            ("/e/%2e%2e/health", "/health"),
            ("/e/%2E%2E/health", "/health"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/../../x", "/x"),
            ("/..", "/"),
            ("//api//x", "/api/x"),
            ("/%61pi/", "/api/"),
            ("/a%2Fb/../c", "/c"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%zz", "/a%zz"),
            ("/a%", "/a%"),
            ("/.well-known/x", "/.well-known/x"),
            ("*", "*"),
        ];
        for (path, want) in cases {
            assert_eq!(routing_path(path), want, "{path}");
        }
    }

    #[test]
    fn dot_segments_cannot_reach_another_route() {
        let router = router();
        for (path, want) in [
            ("/api/../admin", "default"),
            ("/x/../api/y", "api"),
            ("/x/%2e%2e/api/y", "api"),
            ("//api/y", "api"),
        ] {
            let got = router.find(None, path).map(|(_, r)| r.name.as_str());
            assert_eq!(got, Some(want), "{path}");
        }
    }

    #[test]
    fn no_match_is_none() {
        let router = Router::new(&[route(HostMatch::Exact("a.example".into()), "/", "a")]);
        assert!(router.find(Some("b.example"), "/").is_none());
        assert!(router.find(None, "/").is_none());
    }

    #[test]
    fn host_name_strips_port_and_dot() {
        let cases = [
            ("example.com", "example.com"),
            ("example.com:80", "example.com"),
            ("example.com.", "example.com"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("", ""),
            ("[", "["),
        ];
        for (input, want) in cases {
            assert_eq!(host_name(input), want, "{input}");
        }
    }
}
