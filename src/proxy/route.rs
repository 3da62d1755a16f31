//! Route selection: which configured route serves a host and path. The most
//! specific host wins (exact name, then the longest `*.suffix`, then routes
//! without a host), then the longest matching `path_prefix`. Prefixes match
//! as plain string prefixes, like nginx's prefix locations, against the
//! path in its normal form ([`routing_path`]), so `/public/../admin/` is
//! routed as `/admin/`. The config holds each prefix in that same form
//! ([`routing_prefix`]), so `/caf%c3%a9/` and `/café/` are one prefix.
//! Host comparison ignores case, a trailing dot and any port.

use std::borrow::Cow;

use crate::config::{HostMatch, Route};

/// Routes in match order, so a lookup is the first hit of a linear scan:
/// configs have a handful of routes, and a scan over a few cache lines beats
/// hashing here.
#[derive(Debug, Clone)]
pub struct Router {
    /// (index into the config's routes, the route), most specific first.
    routes: Vec<(usize, Route)>,
    /// By upstream index: whether some route sends requests to it, worked
    /// out once (a `/readyz` probe scanned every route per upstream,
    /// review32e M2).
    used: Vec<bool>,
    /// The prefixes that end in `/`, without it (`/account` for
    /// `/account/`): the paths that may be [`Unrouted::AddSlash`].
    slashless: Vec<String>,
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
        // A byte search: `rfind` on a `char` walks back a char at a time.
        match memchr::memrchr(b':', host.as_bytes()) {
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
    /// A router over `routes`, whose prefixes are in [`routing_prefix`]'s
    /// form, as the validated config holds them.
    pub fn new(routes: &[Route]) -> Self {
        let mut routes: Vec<(usize, Route)> = routes.iter().cloned().enumerate().collect();
        // Stable sort: among equally specific routes, file order decides.
        // Within a host, one path matched whole comes before any prefix,
        // as nginx's `location =` does.
        routes.sort_by(|(_, a), (_, b)| {
            host_rank(&b.host)
                .cmp(&host_rank(&a.host))
                .then(b.exact.cmp(&a.exact))
                .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
        });
        let mut used = Vec::new();
        for (_, route) in &routes {
            if used.len() <= route.upstream {
                used.resize(route.upstream + 1, false);
            }
            used[route.upstream] = true;
        }
        let slashless = routes
            .iter()
            .filter(|(_, route)| !route.exact)
            .filter_map(|(_, route)| route.path_prefix.strip_suffix('/'))
            // A Location field holds visible ASCII only.
            .filter(|path| !path.is_empty() && path.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned)
            .collect();
        Router {
            routes,
            used,
            slashless,
        }
    }

    /// The route with index `index` in the config's route list.
    pub fn route(&self, index: usize) -> Option<&Route> {
        self.routes
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, r)| r)
    }

    /// Whether some route sends requests to upstream `upstream` (its
    /// index in the config's list).
    pub fn uses(&self, upstream: usize) -> bool {
        self.used.get(upstream).copied().unwrap_or(false)
    }

    /// The route for a request, with its index in the config's route list.
    /// `host` is the raw Host / :authority value (port allowed). A path
    /// that backends of another kind read as another route's is
    /// [`Unrouted::Ambiguous`]; a route's prefix without its final `/` is
    /// [`Unrouted::AddSlash`].
    pub fn find(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Result<Option<(usize, &Route)>, Unrouted<'_>> {
        let host = host.map(host_name);
        if plain(path) {
            let found = self.lookup(host, path);
            return self.with_slash(host, path, found);
        }
        let raw = path.as_bytes();
        if stray_percent(raw) {
            return Err(Unrouted::Ambiguous);
        }
        let once = percent_decoded(raw);
        if read_apart(raw, &once) {
            return Err(Unrouted::Ambiguous);
        }
        let normal = normal_form(path);
        let found = self.lookup(host, &normal);
        let index = found.map(|(i, _)| i);
        let others = [Some(liberal_form(path)), decoded_twice_form(&once)];
        for other in others.into_iter().flatten() {
            if other != normal && self.lookup(host, &other).map(|(i, _)| i) != index {
                return Err(Unrouted::Ambiguous);
            }
        }
        self.with_slash(host, &normal, found)
    }

    /// `found`, the route for `path`, unless `path` is another route's
    /// prefix without its final `/` and no route's prefix is `path`
    /// itself: that is [`Unrouted::AddSlash`], as nginx answers it.
    fn with_slash<'a>(
        &'a self,
        host: Option<&str>,
        path: &str,
        found: Option<(usize, &'a Route)>,
    ) -> Result<Option<(usize, &'a Route)>, Unrouted<'a>> {
        // Nearly every request leaves at the comparison of lengths that
        // string equality starts with.
        if !self.slashless.iter().any(|p| p == path)
            || found.is_some_and(|(_, route)| route.path_prefix == path)
        {
            return Ok(found);
        }
        let with_slash = format!("{path}/");
        match self.lookup(host, &with_slash) {
            Some((index, route)) if Some(index) != found.map(|(i, _)| i) => {
                Err(Unrouted::AddSlash(&route.path_prefix))
            }
            _ => Ok(found),
        }
    }

    fn lookup(&self, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .find(|(_, route)| {
                host_matches(&route.host, host)
                    && if route.exact {
                        path == route.path_prefix
                    } else {
                        path.starts_with(route.path_prefix.as_str())
                    }
            })
            .map(|(index, route)| (*index, route))
    }
}

/// A path that backends read as different routes' paths: nginx, Go or
/// Express take `;` and `\` as ordinary characters (as routing does),
/// Tomcat, Jetty and Spring strip each segment's `;` path parameters
/// (before resolving dots), and IIS reads `\` as `/`. Routed either way, one of them could
/// be made to serve one route's page under another's cache or limits
/// (web cache deception, review40c F1 and review40g): such a request is
/// refused (`Ambiguous`), as Envoy refuses escaped slashes it is told to.
///
/// The other case a path takes no route is a route's prefix ending in
/// `/` asked for without it (`/account` for `/account/`): it would go to
/// whichever route matches it (often a caching catch-all), where many
/// apps serve the same page as at `/account/` (review40j F2). As nginx
/// does for a proxied location, it is answered with a redirect to the
/// prefix (the path with its `/`, never another host), unless a route's
/// prefix is the path itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted<'a> {
    Ambiguous,
    /// The prefix to send the client to.
    AddSlash(&'a str),
}

/// The path a route is chosen by: percent-escaped unreserved characters
/// decoded (RFC 3986 §6.2.2.2: `%2e` is `.`), and `%2F` too, the escapes
/// kept written in upper-case hex (§6.2.2.1: `%3b` is `%3B`), non-ASCII
/// characters escaped as UTF-8 (`é` is `%C3%A9`), repeated slashes merged
/// and dot segments removed (§5.2.4), as nginx does before matching
/// locations. nginx decodes `%2F` into a separator before it resolves
/// `..`, so `/x/..%2fadmin/` is its `/admin/` (review34c M1: kept escaped,
/// it was routed by `/x/`'s route, which a backend decoding `%2F` first
/// served as `/admin/`). A backend
/// that resolves `/public/../admin` serves `/admin`, so the route, its
/// upstream and its limits must be `/admin`'s too; one that decodes
/// `%c3%a9` serves `/caf%C3%A9/`'s page, so that route must match it too.
/// The request itself is forwarded as the client wrote it. Paths without
/// `%`, non-ASCII bytes, `//` or `/.` (nearly all) are returned as they
/// are.
pub fn routing_path(path: &str) -> Cow<'_, str> {
    if plain(path) {
        return Cow::Borrowed(path);
    }
    Cow::Owned(normal_form(path))
}

/// Whether [`routing_path`] leaves `path` as it is, and no backend reads
/// it otherwise (see [`Unrouted::Ambiguous`]).
fn plain(path: &str) -> bool {
    is_plain(path.as_bytes()) || !path.starts_with('/')
}

/// [`routing_path`]'s form of a path that is not [`plain`].
fn normal_form(path: &str) -> String {
    crate::cache::key::remove_dot_segments(&normal_escapes(path), true)
}

/// Whether backends of different kinds would resolve `raw`, a path with
/// no [`stray_percent`] and decoded `once`, apart, in a way no one
/// reading here stands for. Each resolves such paths in its
/// own order: Tomcat strips raw `;` parameters before decoding (so
/// `..%3B` stays a name), Jetty 9.4 strips them before `%2F` separates,
/// IIS splits on `\` but keeps `..;` a name and decodes `%u002e`,
/// Kestrel and Undertow keep `%2F` a name, some decode twice. So refused
/// are: a `%` that starts no escape (nginx refuses it too); dot segments
/// a second decoding makes (`%252e%252e`); and a dot segment in any
/// reading beside a `;`, a `\` or an escaped slash. (A second decoding
/// that picks another route is [`Router::find`]'s to refuse.)
/// `/account;/..%3B/profile` was routed by `/` and served by Tomcat as
/// `/account/`'s page (review40h F1); `/account/..%2Fx.css` by Kestrel
/// (review40i F1). Browsers resolve plain dot segments before they send
/// a path; Spring Security's firewall refuses all of these and more.
fn read_apart(raw: &[u8], once: &[u8]) -> bool {
    let separators = |b: &u8| matches!(b, b'/' | b'\\' | b';');
    let has_dots = |text: &[u8]| {
        text.split(separators)
            .any(|segment| segment == b"." || segment == b"..")
    };
    // Dots a second decoding makes (`%252e%252e`).
    if escaped_again(once) && has_dots(&percent_decoded(once)) {
        return true;
    }
    let dots = has_dots(once);
    let escaped_slash = raw
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'));
    dots && (once.iter().any(|&b| b == b';' || b == b'\\') || escaped_slash)
}

/// Whether `once`, a path decoded once, still holds an escape of `/`,
/// `\`, `;` or `.`: one a backend that decodes twice reads otherwise.
fn escaped_again(once: &[u8]) -> bool {
    once.iter().enumerate().any(|(at, &b)| {
        b == b'%' && matches!(escaped_byte(&once[at..]), Some(b'/' | b'\\' | b';' | b'.'))
    })
}

/// A path decoded `once` as a backend that decodes twice reads it, when
/// that differs: Jenkins's `feature%252Fnew-login` job and Harbor's
/// `a%252Fb` repositories are such paths, ordinary where both readings
/// take one route; `/account%252Fprofile.css` is not (review40j F1).
fn decoded_twice_form(once: &[u8]) -> Option<String> {
    if !escaped_again(once) {
        return None;
    }
    Some(normal_form(&String::from_utf8_lossy(once)))
}

/// Whether `bytes` hold a `%` that starts no escape of two hex digits:
/// nothing to decode to nginx, which refuses it, a character to IIS
/// (`%u002e`), and a prefix holding one could not be told apart from the
/// escape it starts.
fn stray_percent(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(at, &b)| b == b'%' && escaped_byte(&bytes[at..]).is_none())
}

/// `bytes` with every `%XY` escape decoded once.
fn percent_decoded(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match escaped_byte(&bytes[at..]) {
            Some(byte) => {
                out.push(byte);
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    out
}

/// `path` as the most liberal backends read it: [`normal_form`], with
/// `\` and `%5C` separating segments and each segment's path parameters
/// (`;x`, `%3Bx`) gone, so `/account;x/profile` is `/account/profile` and
/// `..;x` is `..` (see [`Unrouted::Ambiguous`]).
fn liberal_form(path: &str) -> String {
    let escaped = normal_escapes(path).replace('\\', "/").replace("%5C", "/");
    let segments: Vec<&str> = escaped
        .split('/')
        .map(|segment| {
            let end = [segment.find(';'), segment.find("%3B")]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(segment.len());
            &segment[..end]
        })
        .collect();
    crate::cache::key::remove_dot_segments(&segments.join("/"), true)
}

/// Whether `bytes` hold nothing [`routing_path`] would change, nor any
/// backend read otherwise: no `%`, `\\` or `;`, no byte beyond ASCII, no `/`
/// before `/` or `.`. Nearly every request stops
/// here, so this allocates nothing, and the first test is a fold without
/// branches, which compiles to vector instructions: it costs what a
/// `memchr` for `%` alone did (callgrind, on typical paths).
fn is_plain(bytes: &[u8]) -> bool {
    let escape_or_utf8 = bytes.iter().fold(0, |seen, &b| {
        seen | (b & 0x80) | u8::from(b == b'%') | u8::from(b == b'\\') | u8::from(b == b';')
    });
    escape_or_utf8 == 0
        && !bytes
            .windows(2)
            .any(|pair| pair[0] == b'/' && (pair[1] == b'/' || pair[1] == b'.'))
}

/// `path` with the escapes of unreserved characters and of `/` decoded,
/// the other escapes in upper-case hex and non-ASCII characters escaped. A `%` that
/// starts no escape is left as it is: it means nothing to decode.
fn normal_escapes(path: &str) -> String {
    let mut normal = String::with_capacity(path.len());
    let mut rest = path;
    while let Some((at, c)) = rest
        .char_indices()
        .find(|&(_, c)| c == '%' || !c.is_ascii())
    {
        normal.push_str(&rest[..at]);
        rest = &rest[at..];
        let taken = if c != '%' {
            for &byte in c.encode_utf8(&mut [0; 4]).as_bytes() {
                push_escape(&mut normal, byte);
            }
            c.len_utf8()
        } else if let Some(byte) = escaped_byte(rest.as_bytes()) {
            if is_unreserved(byte) || byte == b'/' {
                normal.push(char::from(byte));
            } else {
                push_escape(&mut normal, byte);
            }
            3
        } else {
            normal.push('%');
            1
        };
        rest = &rest[taken..];
    }
    normal.push_str(rest);
    normal
}

/// The byte `%XY` at the start of `text` stands for. Hex digits only: a
/// sign, which `u8::from_str_radix` would take, is no escape.
pub(crate) fn escaped_byte(text: &[u8]) -> Option<u8> {
    let value = |digit: u8| match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    };
    match text {
        [b'%', high, low, ..] => Some(value(*high)? << 4 | value(*low)?),
        _ => None,
    }
}

/// RFC 3986 §2.3: the characters an escape of which means the character.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xF)]));
}

/// Why a `path_prefix` cannot be routed as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// A `%` that starts no escape: a path holding it could not be told
    /// apart from the escape it starts (`/a%4` before `/a%41`, which is
    /// `/aA`).
    #[error("`%` must start an escape of two hex digits (`%25` for `%` itself)")]
    BadEscape,
    /// Dot segments or repeated slashes, which request paths never keep:
    /// as written the prefix would match nothing.
    #[error(
        "request paths are routed with `.` and `..` segments resolved and \
         repeated slashes merged, so this would never match: write `{normal}`"
    )]
    NotNormal { normal: String },
    /// A `;` or `\`, written or escaped: some backends read them as a
    /// path parameter's start or a separator, so a request through the
    /// prefix is refused as [`Unrouted::Ambiguous`] (review40h F2).
    #[error(
        "`;` and `\\` (or `%3B`, `%5C`) start path parameters or separate segments \
         to some backends, so requests holding them here are refused as ambiguous \
         and this would never match: end the prefix before it (`/app/` rather than \
         `/app;v=1/`)"
    )]
    Separator,
}

/// A route's `path_prefix` in [`routing_path`]'s normal form, so that a
/// request's path is compared with it in one form: escapes decoded or
/// upper-cased and non-ASCII characters escaped exactly as there. The
/// text after the last `/` is the start of a segment, not a segment:
/// `/.` is kept (it matches `/.git/config`), whereas dot segments and
/// repeated slashes before it could never be matched and are refused,
/// with the form that would be.
pub fn routing_prefix(prefix: &str) -> Result<String, PrefixError> {
    if stray_percent(prefix.as_bytes()) {
        return Err(PrefixError::BadEscape);
    }
    let escaped = normal_escapes(prefix);
    if escaped.contains([';', '\\']) || escaped.contains("%3B") || escaped.contains("%5C") {
        return Err(PrefixError::Separator);
    }
    let Some(last_slash) = escaped.rfind('/') else {
        return Ok(escaped);
    };
    let (segments, partial) = escaped.split_at(last_slash + 1);
    let resolved = crate::cache::key::remove_dot_segments(segments, true);
    if resolved != segments {
        return Err(PrefixError::NotNormal {
            normal: resolved + partial,
        });
    }
    Ok(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: HostMatch, prefix: &str, name: &str) -> Route {
        Route::new(host, prefix, 0, name)
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
            let got = router
                .find(*host, path)
                .unwrap()
                .map(|(_, r)| r.name.as_str());
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
            // An escaped slash separates, as in nginx.
            ("/a%2Fb/../c", "/a/c"),
            ("/a%2Fb", "/a/b"),
            ("/x/..%2fadmin/a", "/admin/a"),
            ("/x/%2e%2e%2Fadmin/a", "/admin/a"),
            ("/a%2f%2fb", "/a/b"),
            // Kept escapes in one case, whichever the client wrote.
            ("/a%3bb", "/a%3Bb"),
            ("/caf%c3%a9/x", "/caf%C3%A9/x"),
            ("/caf%C3%A9/x", "/caf%C3%A9/x"),
            ("/%7Euser/", "/~user/"),
            ("/a%2f%2E%2e/", "/"),
            // Raw UTF-8, which HTTP/1 and HTTP/2 parsers let through.
            ("/café/x", "/caf%C3%A9/x"),
            ("/a%zz", "/a%zz"),
            ("/a%", "/a%"),
            ("/a%+1", "/a%+1"),
            ("/a%c", "/a%c"),
            ("/.well-known/x", "/.well-known/x"),
            ("*", "*"),
        ];
        for (path, want) in cases {
            assert_eq!(routing_path(path), want, "{path}");
        }
    }

    #[test]
    fn prefixes_take_the_normal_form_of_paths() {
        let cases = [
            ("/", Ok("/")),
            ("/api/", Ok("/api/")),
            ("/api", Ok("/api")),
            ("/x%2fy/", Ok("/x/y/")),
            ("/x%2cy/", Ok("/x%2Cy/")),
            ("/caf%c3%a9/", Ok("/caf%C3%A9/")),
            ("/café/", Ok("/caf%C3%A9/")),
            ("/%7Euser/", Ok("/~user/")),
            ("/%41pi/", Ok("/Api/")),
            // The last part starts a segment: `/.` matches `/.git/`.
            ("/.", Ok("/.")),
            ("/a/..", Ok("/a/..")),
            ("/a/%2e", Ok("/a/.")),
            ("/.well-known/", Ok("/.well-known/")),
        ];
        for (prefix, want) in cases {
            assert_eq!(routing_prefix(prefix).as_deref(), want, "{prefix}");
        }
        let not_normal = |normal: &str| {
            Err(PrefixError::NotNormal {
                normal: normal.into(),
            })
        };
        let refused = [
            ("//admin/", not_normal("/admin/")),
            ("/a//b", not_normal("/a/b")),
            ("/a/./b/", not_normal("/a/b/")),
            ("/a/../b/", not_normal("/b/")),
            ("/a/%2E%2E/b/", not_normal("/b/")),
            ("/a%2f..%2fb/", not_normal("/b/")),
            ("/a/./", not_normal("/a/")),
            ("/a%4", Err(PrefixError::BadEscape)),
            ("/a%zz/", Err(PrefixError::BadEscape)),
            ("/a%+1/", Err(PrefixError::BadEscape)),
        ];
        for (prefix, want) in refused {
            assert_eq!(routing_prefix(prefix), want, "{prefix}");
        }
    }

    #[test]
    fn a_normal_prefix_is_a_normal_path() {
        // The two forms cannot drift apart: a prefix accepted is left as
        // it is by the function request paths go through.
        for prefix in [
            "/",
            "/api/",
            "/x%2fy/",
            "/x%2cy/",
            "/café/",
            "/%7Euser/",
            "/a%2fb",
        ] {
            let normal = routing_prefix(prefix).unwrap();
            assert_eq!(routing_path(&normal), normal, "{prefix}");
        }
    }

    #[test]
    fn escapes_in_either_case_reach_the_same_route() {
        let prefixes = ["/caf%C3%A9/", "/x%2cy/", "/naïve/", "/"];
        let routes: Vec<Route> = prefixes
            .iter()
            .map(|p| route(HostMatch::Any, &routing_prefix(p).unwrap(), p))
            .collect();
        let router = Router::new(&routes);
        for (path, want) in [
            ("/caf%c3%a9/x", "/caf%C3%A9/"),
            ("/caf%C3%A9/x", "/caf%C3%A9/"),
            ("/café/x", "/caf%C3%A9/"),
            ("/x%2Cy/a", "/x%2cy/"),
            ("/x%2cy/a", "/x%2cy/"),
            ("/na%C3%AFve/", "/naïve/"),
            ("/na%c3%afve/", "/naïve/"),
            ("/x;y/a", "/"),
        ] {
            assert_eq!(routed(&router, path), Some(want), "{path}");
        }
    }

    /// The name of the route `path` takes (no host), if any.
    fn routed<'a>(router: &'a Router, path: &str) -> Option<&'a str> {
        router
            .find(None, path)
            .expect("not ambiguous")
            .map(|(_, r)| r.name.as_str())
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
            assert_eq!(routed(&router, path), Some(want), "{path}");
        }
    }

    /// A path that Tomcat, Jetty, Spring or IIS would read as another
    /// route's than nginx, Go or Express do is refused; one both read as
    /// the same route's goes (review40c F1, review40g).
    #[test]
    fn paths_backends_read_as_other_routes_are_ambiguous() {
        let router = router();
        for path in [
            "/x/..;/api/y",
            "/x/..;jsessionid=1/api/y",
            "/x/..%3b/api/y",
            "/x/.%2e;x/api/y",
            "/x/..%5capi/y",
            "/x/..\\api/y",
            "/api/..;/x",
            "/api/..%5Cx",
            // Every segment's parameters go (review40f F1).
            "/api;x/y",
            "/api%3Bv=1/y",
            // A dot segment in some backend's reading, beside what
            // backends read apart, whatever route the two readings here
            // pick (review40h F1).
            "/api;/..%3B/y",
            "/api;/%2e%2e%3b/y",
            "/api;%2F..%2F..%2F/y",
            "/api\\..;/y",
            "/x/..;\\zzz/api/y",
            "/x/%252e%252e/api/y",
            // Read the same by both readings here, but dot segments
            // beside `;` are crafted: refused whatever the routes.
            "/api/x/..;/y",
            "/x/.;/y",
            // Beside an escaped slash; a `%` that starts no escape (IIS
            // reads `%u002e` as `.`); an escape escaped again (review40i
            // F1).
            "/x/..%2Fapi/y",
            "/api/..%2fy",
            "/api/%u002e%u002e/y",
            "/a%zz",
            "/x/%252e%252e/api/y",
            // Decoded twice, another route's (review40j F1).
            "/api%252Fy",
        ] {
            assert_eq!(router.find(None, path), Err(Unrouted::Ambiguous), "{path}");
        }
        for (path, want) in [
            ("/api/a;v=1/b", "api"),
            ("/api/..x;y/b", "api"),
            ("/api/a\\b", "api"),
            ("/api/a%5Cb", "api"),
            ("/.well-known/x", "default"),
            ("/api/x/../y", "api"),
            // Decoded twice, the same route's: Jenkins's branch jobs,
            // Harbor's repositories (review40j F1).
            ("/job/app/job/feature%252Fnew-login/", "default"),
            ("/api/repositories/a%252Fb/tags", "api"),
        ] {
            assert_eq!(routed(&router, path), Some(want), "{path}");
        }
    }

    /// A route's prefix without its `/` is sent to it, unless it takes
    /// the same route anyway or a route's prefix is the path itself
    /// (review40j F2).
    #[test]
    fn a_prefix_without_its_slash_adds_it() {
        let router = router();
        for (host, path) in [
            (None, "/api"),
            (None, "/%61pi"),
            (None, "//api"),
            (Some("www.example.org"), "/api"),
            (Some("api.example.com"), "/v2"),
        ] {
            let found = router.find(host, path).map(|f| f.map(|(_, r)| &r.name));
            let want = if path == "/v2" { "/v2/" } else { "/api/" };
            assert_eq!(found, Err(Unrouted::AddSlash(want)), "{host:?} {path}");
        }
        // `/api/` is not a.example.com's route: the slash changes nothing.
        let found = router.find(Some("a.example.com"), "/api").unwrap();
        assert_eq!(found.map(|(_, r)| r.name.as_str()), Some("wild"));
        let router = Router::new(&[
            route(HostMatch::Any, "/", "default"),
            route(HostMatch::Any, "/api", "bare"),
            route(HostMatch::Any, "/api/", "api"),
        ]);
        assert_eq!(routed(&router, "/api"), Some("bare"));
        assert_eq!(routed(&router, "/apis"), Some("bare"));
    }

    /// One path matched whole (nginx's `location =`) comes before any
    /// prefix of its host, takes nothing under it, and is no prefix a path
    /// without its slash is sent to.
    #[test]
    fn an_exact_path_takes_that_path_alone() {
        let exact = |host: HostMatch, path: &str, name: &str| Route {
            exact: true,
            ..route(host, path, name)
        };
        let router = Router::new(&[
            route(HostMatch::Any, "/", "default"),
            route(HostMatch::Any, "/user/", "dir"),
            exact(HostMatch::Any, "/user", "login"),
            exact(HostMatch::Any, "/api/", "api-root"),
            route(HostMatch::Exact("a.example".into()), "/", "a"),
        ]);
        for (path, want) in [
            ("/user", "login"),
            ("/%75ser", "login"),
            ("/user/x", "dir"),
            ("/user/", "dir"),
            ("/users/1/orders", "default"),
            ("/username", "default"),
            ("/api/", "api-root"),
            ("/api/x", "default"),
            ("/api", "default"),
        ] {
            assert_eq!(routed(&router, path), Some(want), "{path}");
        }
        let found = router.find(Some("a.example"), "/user").unwrap();
        assert_eq!(found.map(|(_, r)| r.name.as_str()), Some("a"));
    }

    #[test]
    fn no_match_is_none() {
        let router = Router::new(&[route(HostMatch::Exact("a.example".into()), "/", "a")]);
        assert!(router.find(Some("b.example"), "/").unwrap().is_none());
        assert!(router.find(None, "/").unwrap().is_none());
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
