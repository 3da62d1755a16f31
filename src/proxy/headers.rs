//! Request and response header hygiene for forwarding (RFC 9110 §7.6):
//! hop-by-hop fields are dropped in both directions, and the request gains
//! `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`.
//! Pure functions over `HeaderMap`; nothing here knows about routing or
//! backends.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::forwarded;
use crate::config::TrustedFields;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The members of a comma-separated list field (RFC 9110 §5.6.1), over
/// all its lines, trimmed of spaces and tabs. A member that is not ASCII is
/// skipped, and only it: one stray byte must not hide the rest of its line
/// (a `Connection` whose named fields would then go through).
pub(crate) fn list_members<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter(|member| member.is_ascii())
        .filter_map(|member| std::str::from_utf8(member).ok())
        .map(|member| member.trim_matches([' ', '\t']))
}

/// Whether the `Connection` field lists `option` (`close`, `upgrade`,
/// `keep-alive`), in any case.
pub(crate) fn connection_lists(headers: &HeaderMap, option: &str) -> bool {
    list_members(headers, &header::CONNECTION).any(|token| token.eq_ignore_ascii_case(option))
}

/// A host that is a bracketed IPv6 literal, with what follows it (a
/// port), in RFC 5952's one text form (`[0:0::1]:8080` is `[::1]:8080`,
/// as route hosts are read), when written otherwise; `None` for any
/// other host.
pub(crate) fn canonical_literal(host: &str) -> Option<String> {
    let (literal, port) = host.strip_prefix('[')?.split_once(']')?;
    let addr: std::net::Ipv6Addr = literal.parse().ok()?;
    let canonical = format!("[{addr}]{port}");
    (canonical != host).then_some(canonical)
}

/// What the pass over a head's names in [`remove_hop_by_hop`] saw, for
/// the callers' own checks, which then cost no lookup of their own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    /// `Transfer-Encoding`, which a response's framing depends on.
    pub transfer_encoding: bool,
    /// `Content-Length`, which [`one_length`] then looks at.
    pub content_length: bool,
    /// `Forwarded`.
    pub forwarded: bool,
    /// A name that may spell one portico writes with `_` (see
    /// [`remove_lookalikes`]).
    pub underscored: bool,
    /// One of the [`CLAIMS`].
    pub claims: bool,
    /// `Expect`.
    pub expect: bool,
    /// One of the [`OVERRIDES`], in any spelling with `_`.
    pub overrides_method: bool,
}

/// Forwarding fields portico does not write, which frameworks read as a
/// proxy's word on where the client came in: Rack takes `X-Forwarded-Ssl`
/// and `X-Forwarded-Scheme` before `X-Forwarded-Proto`, Rack and Spring
/// build links from `X-Forwarded-Port` and Spring from
/// `X-Forwarded-Prefix`, and apps moved from nginx read `X-Real-IP` as
/// the client. From a client they are claims nobody checked, and on a
/// caching route unkeyed inputs (Kettle's cache poisoning): they go on
/// only from `trusted_proxies`, as `Forwarded` does (review36b F1).
/// So do the fields proxies in front of IIS and Apache write and
/// frameworks take as the request's own: Symfony (before CVE-2018-14773)
/// and Zend read `X-Original-URL` and `X-Rewrite-URL` as the path, so a
/// client's swapped the page stored for another URL; others build links
/// from `X-Host` and `X-Forwarded-Server` (review40c F2).
pub(crate) const CLAIMS: [&str; 9] = [
    "x-real-ip",
    "x-forwarded-ssl",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-prefix",
    "x-original-url",
    "x-rewrite-url",
    "x-host",
    "x-forwarded-server",
];

/// Fields frameworks take as the request's method in place of its own
/// (Symfony, Laravel, Rails' Rack::MethodOverride, Express's
/// method-override). Clients that cannot send PUT or DELETE send them on
/// a POST, so they go on; but a GET or HEAD carrying one is no lookup the
/// cache can answer or store for others: a client's `HEAD` override
/// stored an empty 200 for everyone (cache-poisoned denial of service,
/// CPDoS, review40c F2), so such a request passes the cache by.
const OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Whether `name` is `written` with any of its `-` spelled `_` or not: the
/// same variable to Rack, WSGI and PHP (`HTTP_X_REAL_IP`).
fn spells(written: &str, name: &[u8]) -> bool {
    written.len() == name.len()
        && written
            .bytes()
            .zip(name)
            .all(|(w, &n)| w == n || (w == b'-' && n == b'_'))
}

/// Removes hop-by-hop fields, including every field the `Connection` header
/// names. The usual case, `Connection: keep-alive` or `close`, costs one
/// pass over the names and a lookup per field removed, no allocation.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> Seen {
    /// Where `fixed` holds Transfer-Encoding.
    const TRANSFER_ENCODING_SLOT: usize = 3;
    let fixed: [&HeaderName; 5] = [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ];
    // One pass over the names finds which are present, by their first
    // byte and then their text (names are lower case); most requests carry
    // none and stop here.
    let mut present = [false; 5];
    let mut proxy = false;
    let mut seen = Seen::default();
    for name in headers.keys() {
        let name = name.as_str();
        // Indexes into `fixed`.
        let slot = match name.as_bytes().first() {
            Some(b'c') if name == "connection" => 0,
            Some(b'c') if name == "content-length" => {
                seen.content_length = true;
                continue;
            }
            Some(b'k') if name == "keep-alive" => 1,
            Some(b't') if name == "te" => 2,
            Some(b't') if name == "transfer-encoding" => TRANSFER_ENCODING_SLOT,
            Some(b'u') if name == "upgrade" => 4,
            Some(b'p') if name.starts_with("proxy-") => {
                proxy = true;
                continue;
            }
            Some(b'f') if name == "forwarded" => {
                seen.forwarded = true;
                continue;
            }
            Some(b'e') if name == "expect" => {
                seen.expect = true;
                continue;
            }
            Some(b'x') if OVERRIDES.iter().any(|o| spells(o, name.as_bytes())) => {
                seen.overrides_method = true;
                continue;
            }
            Some(b'x') if LOOKALIKE_LENGTHS.contains(&name.len()) && name.contains('_') => {
                seen.underscored = true;
                continue;
            }
            Some(b'c' | b't')
                if (name.len() == FRAMING[0].len() || name.len() == FRAMING[1].len())
                    && name.contains('_') =>
            {
                seen.underscored = true;
                continue;
            }
            Some(b'x') if CLAIMS.contains(&name) => {
                seen.claims = true;
                continue;
            }
            _ => continue,
        };
        present[slot] = true;
    }
    seen.transfer_encoding = present[TRANSFER_ENCODING_SLOT];
    if !proxy && !present.contains(&true) {
        return seen;
    }
    // Fields the Connection header names beyond the fixed ones: rare. The
    // usual `Connection: keep-alive` or `close`, one token a line, names
    // none, and costs no walk over its list's members.
    let plain = |value: &HeaderValue| {
        let token = value.as_bytes().trim_ascii();
        token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"close")
    };
    let names_fields = present[0] && !headers.get_all(&header::CONNECTION).iter().all(plain);
    let mut named: Vec<HeaderName> = Vec::new();
    let listed = names_fields.then(|| list_members(headers, &header::CONNECTION));
    for token in listed.into_iter().flatten() {
        // `close` names no field (RFC 9110 §16.3.2.2 reserves the name).
        if token.is_empty() || token.eq_ignore_ascii_case("close") {
            continue;
        }
        // X-Request-Id is portico's own field for the next hop, set on
        // every request: naming it must not leave the backend without.
        if fixed
            .iter()
            .any(|name| token.eq_ignore_ascii_case(name.as_str()))
            || token.eq_ignore_ascii_case(super::log::X_REQUEST_ID.as_str())
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            named.push(name);
        }
    }
    for name in named {
        headers.remove(&name);
    }
    for (name, present) in fixed.into_iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    // `Proxy-*` fields, `Proxy-Connection` among them: rare, so collected.
    if proxy {
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy {
            headers.remove(&name);
        }
    }
    seen
}

/// Whether a head's transfer codings are ones portico can relay: none, or
/// exactly `chunked`, the one coding it decodes and re-applies. Anything
/// else (`gzip, chunked`, say) would reach the other side with the coding
/// stripped from the head but not from the bytes. A head without the field
/// costs one lookup.
pub fn relayable_coding(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if values.peek().is_none() {
        return true;
    }
    let mut codings = values
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    codings
        .next()
        .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Whether `value` is a valid `Host` (RFC 9110 §7.2): `uri-host [":"
/// port]`, where the host is a bracketed IP literal or a reg-name of
/// unreserved characters, percent-escapes and sub-delims. Userinfo, paths,
/// spaces and other delimiters make it invalid (RFC 9112 §3.2: 400). Empty
/// is valid: a client sends that for a target without an authority.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        let valid_literal = std::str::from_utf8(literal)
            .is_ok_and(|text| text.parse::<std::net::Ipv6Addr>().is_ok())
            || (literal.len() > 1
                && literal[0].eq_ignore_ascii_case(&b'v')
                && literal[1..]
                    .iter()
                    .all(|&b| unreserved_or_sub_delim(b) || b == b':'));
        if !valid_literal {
            return false;
        }
        match &rest[end + 1..] {
            [] => (&[][..], None),
            [b':', port @ ..] => (&[][..], Some(port)),
            _ => return false,
        }
    } else {
        let split = match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        };
        // RFC 9110 §4.2.1: an http URI with an empty host is invalid.
        if split.0.is_empty() {
            return false;
        }
        split
    };
    if !port.is_none_or(|port| port.iter().all(u8::is_ascii_digit)) {
        return false;
    }
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' => {
                let escaped = host.get(i + 1..i + 3);
                if !escaped.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if unreserved_or_sub_delim(b) => i += 1,
            _ => return false,
        }
    }
    true
}

/// RFC 3986 `unreserved` or `sub-delims`.
fn unreserved_or_sub_delim(b: u8) -> bool {
    REG_NAME[usize::from(b)]
}

/// Bytes a reg-name may hold as they are: one lookup per Host byte.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// `a.b.c.d` written into `buf`.
fn ipv4_text(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    std::str::from_utf8(&buf[..n]).expect("digits and dots are ASCII")
}

/// Longest header value [`shared_value`] keeps inline: an IPv6 address
/// (45 characters at most) or a request id fits.
const INLINE: usize = 48;

/// Up to [`INLINE`] bytes held by a [`Bytes`] owner.
struct Inline {
    bytes: [u8; INLINE],
    len: usize,
}

impl AsRef<[u8]> for Inline {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A header value that later clones share. A value made with `from_bytes`
/// is copied into a plain vector and allocates again on its first clone;
/// the retry copy of a request head clones every value, so each value
/// portico makes would cost two allocations instead of one. Longer text
/// than [`INLINE`] takes the plain way.
pub(crate) fn shared_value(text: &[u8]) -> Result<HeaderValue, header::InvalidHeaderValue> {
    if text.len() > INLINE {
        return HeaderValue::from_bytes(text);
    }
    let mut bytes = [0; INLINE];
    bytes[..text.len()].copy_from_slice(text);
    HeaderValue::from_maybe_shared(Bytes::from_owner(Inline {
        bytes,
        len: text.len(),
    }))
}

/// A response's Via entry, for the version portico received it in: the
/// plain `portico`, where a request's names the instance (see
/// [`Pseudonym`] for why).
fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_10 => "1.0 portico",
        Version::HTTP_2 => "2 portico",
        Version::HTTP_3 => "3 portico",
        _ => "1.1 portico",
    })
}

/// A client's address as `X-Forwarded-For` writes it, made once per
/// connection: formatting it and allocating its value for every request
/// cost ~500 instructions of a 1 KiB pass-through request (callgrind).
pub fn forwarded_for(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 15];
    let text = match ip {
        // The common case without the formatting machinery.
        IpAddr::V4(v4) => std::borrow::Cow::Borrowed(ipv4_text(v4, &mut buf)),
        IpAddr::V6(v6) => std::borrow::Cow::Owned(v6.to_string()),
    };
    shared_value(text.as_bytes()).expect("an IP address is a valid header value")
}

/// What the proxy knows about the client side of one request.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    /// The client's address, from [`forwarded_for`].
    pub ip: &'a HeaderValue,
    /// `http` or `https`: the scheme the client used to reach portico.
    pub proto: &'static str,
    /// The host the client asked for (Host or :authority), if any.
    pub host: Option<&'a HeaderValue>,
    pub version: Version,
    /// When the peer is one of `trusted_proxies`, the fields it writes:
    /// its `X-Forwarded-Proto` and `X-Forwarded-Host`, or `Forwarded`
    /// `proto` and `host`, say where its client came in.
    pub trusted: Option<TrustedFields>,
}

/// Prepares a request head for a backend: [`scrub_request`], then
/// [`add_hop`]. Returns the scheme forwarded, as [`scrub_request`] does.
pub fn prepare_request(
    headers: &mut HeaderMap,
    client: ClientInfo<'_>,
    content: bool,
    hop: Hop,
) -> &'static str {
    let proto = scrub_request(headers, client, content).proto;
    add_hop(headers, hop);
    proto
}

/// What [`scrub_request`] tells its caller.
#[derive(Debug, Clone, Copy)]
pub struct Scrubbed {
    /// The scheme forwarded, which the cache keys on.
    pub proto: &'static str,
    /// The request carries one of the [`OVERRIDES`]: a GET or HEAD that
    /// does passes the cache by.
    pub overrides_method: bool,
}

/// Hop-by-hop removal, then the forwarding fields that say where the
/// client came in: `X-Forwarded-Proto` and `X-Forwarded-Host`. portico
/// writes its own over the client's, except where a trusted proxy says
/// otherwise (see [`relayed`]): behind a balancer that ends TLS, the
/// backend must hear `https`. Returns the scheme forwarded, and whether
/// the method may be overridden ([`Scrubbed`]): the cache keys on the
/// scheme, and a cached response that varies on these fields is looked up
/// with the values its backend saw, which a client that is not trusted
/// cannot choose. Without `content` (the request goes on without a
/// body), `Expect` goes too: a client must not send `100-continue` on a
/// request without content (RFC 9110 §10.1.1), and its client's upload
/// turned out empty. So does an HTTP/1.0 client's, which a server must
/// ignore (§10.1.1) and which the backend, asked in HTTP/1.1, would take
/// for a valid one (proto54 L6; nginx drops it too).
pub fn scrub_request(headers: &mut HeaderMap, client: ClientInfo<'_>, content: bool) -> Scrubbed {
    let seen = remove_hop_by_hop(headers);
    if seen.expect && (!content || client.version < Version::HTTP_11) {
        headers.remove(header::EXPECT);
    }
    // A length written `0005` or twice goes on as one plain number, as a
    // response's does: backends that read a leading zero as octal, or
    // take the last of two lines, would frame the body otherwise.
    if !seen.transfer_encoding && seen.content_length {
        one_length(headers);
    }
    // The claims below are believed only from proxies trusted to write
    // `X-Forwarded-*` (a `trusted_fields = "forwarded"` proxy's
    // `X-Forwarded-Ssl` is its client's, review36d L1).
    let claims_trusted = client.trusted.is_some_and(TrustedFields::x_forwarded);
    if seen.underscored {
        remove_lookalikes(headers, !claims_trusted);
    }
    if client.version >= Version::HTTP_2 {
        join_cookies(headers);
    }
    // `Forwarded` goes on only as the trusted proxies' field: from anyone
    // else it is a claim portico does not check, and frameworks read it
    // before `X-Forwarded-*` (Spring's ForwardedHeaderFilter builds links
    // from its `host` and `proto`), so passed on it would undo the
    // replacing of `X-Forwarded-Host` and `-Proto` below.
    if seen.forwarded && !client.trusted.is_some_and(TrustedFields::forwarded) {
        headers.remove(header::FORWARDED);
    }
    if seen.claims && !claims_trusted {
        for name in CLAIMS {
            headers.remove(name);
        }
    }
    let (proto, host) = match client.trusted {
        Some(fields) => relayed(headers, fields),
        None => (None, None),
    };
    let proto = proto.unwrap_or(client.proto);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match (host, client.host) {
        // The trusted proxy's own line stays as it is.
        (Some(None), _) => {}
        (Some(Some(given)), _) => {
            headers.insert(X_FORWARDED_HOST.clone(), given);
        }
        (None, Some(own)) => {
            headers.insert(X_FORWARDED_HOST.clone(), own.clone());
        }
        (None, None) => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    Scrubbed {
        proto,
        overrides_method: seen.overrides_method,
    }
}

/// The fields portico writes for its backends, by the names a CGI-style
/// framework gives them: Rack, WSGI and PHP read `X_Forwarded_For` and
/// `X-Forwarded-For` both as `HTTP_X_FORWARDED_FOR`, and whichever comes
/// last wins (Puma CVE-2024-45614).
const WRITTEN: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

/// The framing fields, whose `_` spellings go too (see
/// [`remove_lookalikes`]): portico frames the body anew, and a backend
/// that reads `Transfer_Encoding: chunked` as `Transfer-Encoding` (CGI
/// and WSGI servers name both `HTTP_TRANSFER_ENCODING`) would read a body
/// framed otherwise as chunked (fuzz56 L: they went on; nginx drops every
/// name with `_`).
const FRAMING: [&str; 2] = ["content-length", "transfer-encoding"];

/// The lengths of the names in [`WRITTEN`] and [`CLAIMS`], so the pass
/// over a head's names looks for `_` only in names as long as one.
const LOOKALIKE_LENGTHS: [usize; 13] = [
    WRITTEN[0].len(),
    WRITTEN[1].len(),
    WRITTEN[2].len(),
    WRITTEN[3].len(),
    CLAIMS[0].len(),
    CLAIMS[1].len(),
    CLAIMS[2].len(),
    CLAIMS[3].len(),
    CLAIMS[4].len(),
    CLAIMS[5].len(),
    CLAIMS[6].len(),
    CLAIMS[7].len(),
    CLAIMS[8].len(),
];

/// Removes the fields whose names spell one portico writes with `_` for
/// some `-`, so a client cannot have its own `X_Forwarded_For` read in
/// place of portico's. nginx drops every name with `_` by default
/// (`underscores_in_headers off`); only these are dropped here, as they
/// are the ones portico vouches for. Called only when the pass of
/// [`remove_hop_by_hop`] saw a name that may be one. With `claims`, the
/// spellings of the [`CLAIMS`] go too: dropped as `X-Real-IP`, a client's
/// `X_Real_IP` would be the only one its backend reads (review36d M1).
fn remove_lookalikes(headers: &mut HeaderMap, claims: bool) {
    remove_named(headers, |name| {
        name.contains(&b'_')
            && (FRAMING.iter().any(|framing| spells(framing, name))
                || name.first() == Some(&b'x')
                    && (WRITTEN.iter().any(|written| spells(written, name))
                        || (claims && CLAIMS.iter().any(|claim| spells(claim, name)))))
    });
}

/// What a trusted proxy's fields say of one thing, the scheme or the host.
#[derive(Debug)]
enum Said<T> {
    /// Nothing: no such field, or a `Forwarded` element without it.
    Nothing,
    Value(T),
    /// Something portico cannot use: several lines, a list, junk.
    Junk,
}

impl<T> Said<T> {
    /// `Value` of what `check` accepts, `Junk` of what it refuses.
    fn checked<U>(self, check: impl FnOnce(T) -> Option<U>) -> Said<U> {
        match self {
            Said::Nothing => Said::Nothing,
            Said::Value(value) => check(value).map_or(Said::Junk, Said::Value),
            Said::Junk => Said::Junk,
        }
    }

    /// The value `self` and `other` give, when neither is junk and they do
    /// not disagree: `self`'s when both give one.
    fn agreeing(self, other: Said<T>, same: impl Fn(&T, &T) -> bool) -> Option<T> {
        match (self, other) {
            (Said::Junk, _) | (_, Said::Junk) | (Said::Nothing, Said::Nothing) => None,
            (Said::Value(a), Said::Value(b)) => same(&a, &b).then_some(a),
            (Said::Value(value), Said::Nothing) | (Said::Nothing, Said::Value(value)) => {
                Some(value)
            }
        }
    }
}

/// A field as one value: `Junk` when it came on several lines (see
/// [`only_line`]).
fn one_line<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Said<&'a HeaderValue> {
    match only_line(headers, name) {
        Some(value) => Said::Value(value),
        None if headers.contains_key(name) => Said::Junk,
        None => Said::Nothing,
    }
}

/// `http` or `https`, in any case.
fn scheme(value: &[u8]) -> Option<&'static str> {
    ["http", "https"]
        .into_iter()
        .find(|scheme| value.eq_ignore_ascii_case(scheme.as_bytes()))
}

/// One `host[:port]`, not a list of them that a chain of proxies appended.
fn one_host(value: &[u8]) -> bool {
    valid_host(value) && !value.contains(&b',')
}

/// A host as a trusted proxy gave it.
enum GivenHost<'a> {
    /// Its `X-Forwarded-Host` line, kept as it is.
    Line(&'a HeaderValue),
    /// The `host` of its `Forwarded` element, unquoted.
    Param(std::borrow::Cow<'a, [u8]>),
}

impl GivenHost<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            GivenHost::Line(line) => line.as_bytes(),
            GivenHost::Param(param) => param,
        }
    }
}

/// The scheme and the host a trusted proxy says its client used, each
/// `None` to write portico's own. Read from its one `X-Forwarded-Proto` /
/// `X-Forwarded-Host` line and from the last element of `Forwarded`
/// (RFC 7239), the one it appended: a scheme is `http` or `https` (any
/// case), a host one `host[:port]`. Where both fields give one they must
/// agree (hosts ignoring case), and neither may be junk (several lines, a
/// list, a malformed element): a proxy that writes only one of the two
/// passes a client's forged other one on, and which is which cannot be
/// told, so then neither is believed, as `limit::client` does for the
/// client address. The host is `Some(None)` when the proxy's
/// `X-Forwarded-Host` line stays as it is.
fn relayed(
    headers: &HeaderMap,
    fields: TrustedFields,
) -> (Option<&'static str>, Option<Option<HeaderValue>>) {
    let element = match fields.forwarded() {
        true => forwarded::last_element(headers),
        false => Ok(None),
    };
    let (forwarded_proto, forwarded_host) = match element {
        Err(forwarded::Malformed) => (Said::Junk, Said::Junk),
        Ok(None) => (Said::Nothing, Said::Nothing),
        Ok(Some(element)) => {
            let said = |value: Option<_>| value.map_or(Said::Nothing, Said::Value);
            (said(element.proto), said(element.host))
        }
    };
    // The proxies' family, or nothing: a client's claim is not read.
    let line = |name: &HeaderName| match fields.x_forwarded() {
        true => one_line(headers, name),
        false => Said::Nothing,
    };
    let proto = line(&X_FORWARDED_PROTO)
        .checked(|line| scheme(line.as_bytes()))
        .agreeing(forwarded_proto.checked(|param| scheme(&param)), |a, b| {
            a == b
        });
    let host = line(&X_FORWARDED_HOST)
        .checked(|line| one_host(line.as_bytes()).then_some(GivenHost::Line(line)))
        .agreeing(
            forwarded_host.checked(|param| one_host(&param).then_some(GivenHost::Param(param))),
            |a, b| a.bytes().eq_ignore_ascii_case(b.bytes()),
        )
        .and_then(|host| match host {
            GivenHost::Line(_) => Some(None),
            GivenHost::Param(param) => HeaderValue::from_bytes(&param).ok().map(Some),
        });
    (proto, host)
}

/// A field's value when it came on exactly one line. With several, which
/// one the next hop reads (the first, the last, all joined) is anyone's
/// guess, so callers treat that as no usable value.
pub(crate) fn only_line<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut lines = headers.get_all(name).iter();
    match (lines.next(), lines.next()) {
        (Some(value), None) => Some(value),
        _ => None,
    }
}

/// HTTP/2 lets a client send its cookies as several `cookie` fields (to
/// compress them apart); HTTP/1.1 allows one line, so RFC 9113 §8.2.3
/// says they MUST be joined with "; " for it. One field is left as it is.
fn join_cookies(headers: &mut HeaderMap) {
    let lines: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if lines.len() < 2 {
        return;
    }
    if let Ok(value) = HeaderValue::from_bytes(&lines.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// This hop, for the fields that list every hop.
#[derive(Debug, Clone)]
pub struct Hop {
    /// The client's address, from [`forwarded_for`].
    pub ip: HeaderValue,
    /// This proxy's `Via` entry for the version the client used.
    pub via: HeaderValue,
    /// The request has its `X-Request-Id` already (see
    /// [`super::log::ensure_request_id`]); else [`add_hop`] gives it one.
    pub identified: bool,
}

impl Hop {
    pub fn of(client: ClientInfo<'_>, name: &Pseudonym) -> Hop {
        Hop {
            ip: client.ip.clone(),
            via: name.via(client.version),
            identified: false,
        }
    }

    /// Whether the request has its `X-Request-Id` already.
    pub fn identified(self, identified: bool) -> Hop {
        Hop { identified, ..self }
    }
}

/// How one running proxy names itself in the `Via` of the requests it
/// sends on (RFC 9110 §7.6.3: a `received-by` pseudonym): `portico-` and
/// 48 random bits in hex. Every instance has its own, so portico in front
/// of portico is a chain; its own name coming back is a loop. Responses
/// keep the plain `portico`: their Via is for clients, who have no use
/// for an instance's name.
#[derive(Debug, Clone)]
pub struct Pseudonym {
    /// The `received-by` itself.
    name: Box<str>,
    /// `received-protocol received-by`, for HTTP/1.0, 1.1, 2 and 3.
    via: [HeaderValue; 4],
}

impl Pseudonym {
    /// 48 bits from the standard library's per-process random keys, which
    /// come from the operating system: two instances started in the same
    /// instant still differ.
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let bits = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self::named(&format!("portico-{:012x}", bits >> 16))
    }

    /// `name` must be a token.
    pub fn named(name: &str) -> Self {
        let entry = |protocol: &str| {
            HeaderValue::from_str(&format!("{protocol} {name}"))
                .expect("a token is a valid header value")
        };
        Pseudonym {
            name: name.into(),
            via: [entry("1.0"), entry("1.1"), entry("2"), entry("3")],
        }
    }

    fn via(&self, version: Version) -> HeaderValue {
        self.via[match version {
            Version::HTTP_10 => 0,
            Version::HTTP_2 => 2,
            Version::HTTP_3 => 3,
            _ => 1,
        }]
        .clone()
    }

    /// The name this proxy gives itself in the Via of requests it sends.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// How many times, up to 2, the request's `Via` names `me`: 2 means the
/// request is going round. Once is allowed, as Envoy's
/// `max_allowed_occurrences` allows it: a request may come back on purpose
/// under another Host (a Varnish "sandwich", an app that calls a neighbour
/// through the same gateway and copies the headers). A loop stops at its
/// third lap instead of going round until its head grew past
/// `max_header_size`, holding a connection per lap.
///
/// Bytes, not text: a line with a non-ASCII comment still counts. Commas
/// inside a comment do not split entries.
pub fn laps(headers: &HeaderMap, me: &Pseudonym) -> usize {
    let name = me.name.as_bytes();
    headers
        .get_all(header::VIA)
        .iter()
        .flat_map(|value| via_entries(value.as_bytes()))
        .filter(|entry| {
            // `received-protocol RWS received-by [ RWS comment ]`
            let mut words = entry
                .split(|b| b.is_ascii_whitespace())
                .filter(|w| !w.is_empty());
            words
                .nth(1)
                .is_some_and(|received_by| received_by.eq_ignore_ascii_case(name))
        })
        .take(2)
        .count()
}

/// A Via field line's entries: split at the commas outside comments, which
/// nest and may escape a parenthesis with `\` (RFC 9110 §5.6.5).
fn via_entries(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut depth = 0usize;
    let mut escaped = false;
    line.split(move |&b| {
        if escaped {
            escaped = false;
            return false;
        }
        match b {
            b'\\' if depth > 0 => escaped = true,
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b',' => return depth == 0,
            _ => {}
        }
        false
    })
}

/// Adds this hop to `X-Forwarded-For` (folding repeated fields into one
/// list, as RFC 9110 §5.3 allows) and to `Via`, and gives the request its
/// `X-Request-Id` if it has none yet. Only for a request that goes to a
/// backend: a cache hit needs none of them, and skips their cost.
pub fn add_hop(headers: &mut HeaderMap, hop: Hop) {
    let Hop {
        ip,
        via,
        identified,
    } = hop;
    if !identified {
        super::log::ensure_request_id(headers);
    }
    let xff = {
        let mut prior = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
        if prior.peek().is_none() {
            ip
        } else {
            // Bytes as they came: a lossy decoding sent a client's
            // obs-text on as U+FFFD (review37d note).
            let mut list = Vec::new();
            for value in prior {
                list.extend_from_slice(value.as_bytes());
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(ip.as_bytes());
            // Unrepresentable prior values (control characters) are
            // dropped rather than forwarded mangled.
            HeaderValue::from_bytes(&list).unwrap_or(ip)
        }
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.append(header::VIA, via);
}

/// Prepares a backend's response head for the client: hop-by-hop fields
/// out, one plain `Content-Length`, this hop in `Via`, and portico's own
/// HTTP version.
pub fn prepare_response(head: &mut http::response::Parts) {
    let headers = &mut head.headers;
    // A 426 names the protocol to upgrade to in `Upgrade`, which it must
    // carry (RFC 9110 §15.5.22), as nginx relays it (review42h L1).
    let required = (head.status == http::StatusCode::UPGRADE_REQUIRED)
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an
    // intermediary must drop the length before relaying the decoded body.
    let seen = remove_hop_by_hop(headers);
    if seen.transfer_encoding {
        headers.remove(header::CONTENT_LENGTH);
    } else if seen.content_length {
        one_length(headers);
    }
    if let Some(required) = required {
        headers.insert(header::UPGRADE, required);
        // RFC 9110 §7.8: an `Upgrade` in any answer but a 101 comes with
        // `upgrade` in `Connection` (review42j L3). HTTP/2 strips both.
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers.append(header::VIA, via_value(head.version));
    // RFC 9110 §6.2: an intermediary sends its own version, not its
    // backend's. An HTTP/1.0 backend's `HTTP/1.0 200` would otherwise
    // tell HTTP/1.1 clients to close after every response (hyper answers
    // HTTP/1.0 clients in their version itself).
    head.version = Version::HTTP_11;
}

/// Cleans a trailer section relayed to the next hop: hop-by-hop fields
/// and a `Content-Length`, which framing owns and no trailer may carry
/// (RFC 9110 §6.5.1). HTTP/2 peers treat either as a protocol error
/// (RFC 9113 §8.2.2, §8.1.1) and reset the stream, losing the message
/// they end; nginx relays no HTTP/1.1 backend's trailers at all.
pub fn scrub_trailers(trailers: &mut HeaderMap) {
    remove_hop_by_hop(trailers);
    trailers.remove(header::CONTENT_LENGTH);
}

/// [`scrub_trailers`] for a request's trailers, which also lose the
/// fields portico writes or vouches for in the head, and their `_`
/// spellings: a client's `X-Forwarded-For` trailer went on beside the
/// head portico rewrote, for a backend that merges trailers into the
/// head (RFC 9110 §6.5.2 forbids it, some do) to read (fuzz56 L).
pub fn scrub_request_trailers(trailers: &mut HeaderMap) {
    scrub_trailers(trailers);
    remove_named(trailers, |name| {
        ["forwarded", "via"]
            .iter()
            .chain(&WRITTEN)
            .chain(&CLAIMS)
            .any(|field| spells(field, name))
    });
}

/// Removes every field whose name (lower case, as bytes) `matches`.
fn remove_named(headers: &mut HeaderMap, matches: impl Fn(&[u8]) -> bool) {
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|name| matches(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in found {
        headers.remove(&name);
    }
}

/// A `Content-Length` as one plain number. hyper takes several
/// lines or a list of the same length (`2, 2`; RFC 9112 §6.3 lets a
/// recipient do so, and it refuses ones that differ), but relayed as
/// received the field breaks HTTP/2 clients (RFC 9113 §8.1.1) and is for
/// HTTP/1.1 ones the very ambiguity that lets requests be smuggled; RFC
/// 9110 §8.6 asks for one value. Leading zeros go too. The usual field
/// costs one lookup.
///
/// One that is no length, or lengths that differ, are dropped: hyper
/// refuses them where they frame the body, but reads no length of an
/// answer to HEAD, and `5x`, `-1` or `5` beside `700` went on, which
/// HTTP/1.1 clients refuse and HTTP/2 ones reset the stream for (RFC
/// 9110 §8.6: not to be forwarded; review42a F2). nginx drops it too.
fn one_length(headers: &mut HeaderMap) {
    let mut lines = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = lines.next() else { return };
    let digits = |v: &[u8]| !v.is_empty() && v.iter().all(u8::is_ascii_digit);
    let plain = |v: &HeaderValue| {
        let v = v.as_bytes();
        digits(v) && (v.len() == 1 || v.first() != Some(&b'0'))
    };
    if lines.next().is_none() && plain(first) {
        return;
    }
    let number = |member: &str| {
        digits(member.as_bytes())
            .then(|| member.parse::<u64>().ok())
            .flatten()
    };
    let agreed = {
        let mut members = list_members(headers, &header::CONTENT_LENGTH).map(number);
        let first = members.next().flatten();
        first.filter(|first| members.all(|member| member == Some(*first)))
    };
    match agreed {
        Some(length) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        // A body's own size hint gives hyper the length to write.
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::headers as map;

    static CLIENT_IP: HeaderValue = HeaderValue::from_static("192.0.2.7");

    /// [`prepare_request`] as a proxy named `portico-00000000002a` does.
    fn prepare(headers: &mut HeaderMap, client: ClientInfo<'_>) {
        let me = Pseudonym::named("portico-00000000002a");
        prepare_request(headers, client, false, Hop::of(client, &me));
    }

    fn client(host: Option<&HeaderValue>) -> ClientInfo<'_> {
        ClientInfo {
            ip: &CLIENT_IP,
            proto: "http",
            host,
            version: Version::HTTP_11,
            trusted: None,
        }
    }

    #[test]
    fn valid_host_follows_rfc_3986_authority_without_userinfo() {
        for good in [
            "shop.example",
            "Shop.Example:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[2001:db8::7]:443",
            "[v1.fe80::a+en1]",
            "xn--bcher-kva.example",
            "a%2Db",
            "under_score~tilde",
            "host:",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?} should be valid");
        }
        for bad in [
            // RFC 9110 §4.2.1: no empty host in an http URI.
            "",
            ":80",
            "shop|/users/1",
            "user@shop",
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "a:80x",
            "a%2",
            "a%zz",
            "a\"b",
            "\u{e9}.example",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn relayable_coding_is_none_or_exactly_one_chunked() {
        for (values, want) in [
            (&[][..], true),
            (&["chunked"], true),
            (&["Chunked "], true),
            (&["gzip, chunked"], false),
            (&["gzip", "chunked"], false),
            (&["chunked, chunked"], false),
            (&["chunked;x=1"], false),
            (&[""], false),
        ] {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::TRANSFER_ENCODING, HeaderValue::from_static(value));
            }
            assert_eq!(relayable_coding(&headers), want, "{values:?}");
        }
    }

    /// A backend's response head with `fields`, in `version`, prepared.
    fn prepared(fields: &[(&str, &str)], version: Version) -> http::response::Parts {
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.headers = map(fields);
        head.version = version;
        prepare_response(&mut head);
        head
    }

    #[test]
    fn a_response_length_beside_transfer_encoding_is_dropped() {
        let headers = prepared(
            &[("content-length", "100"), ("transfer-encoding", "chunked")],
            Version::HTTP_11,
        )
        .headers;
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        assert!(!headers.contains_key(header::TRANSFER_ENCODING));
    }

    #[test]
    fn ipv4_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "127.0.0.1",
            "192.168.100.255",
            "255.255.255.255",
        ] {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            assert_eq!(ipv4_text(ip, &mut [0; 15]), ip.to_string());
        }
    }

    #[test]
    fn forwarded_for_writes_addresses_as_display_does() {
        for ip in ["192.0.2.7", "2001:db8::7", "::ffff:192.0.2.7", "::1"] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(forwarded_for(parsed), ip);
        }
    }

    #[test]
    fn http2_cookie_fields_reach_http1_as_one_line() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        let mut h1 = headers.clone();
        scrub_request(&mut h1, client(None), false);
        assert_eq!(h1.get_all(header::COOKIE).iter().count(), 2);
        let h2 = ClientInfo {
            version: Version::HTTP_2,
            ..client(None)
        };
        scrub_request(&mut headers, h2, false);
        let cookies: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
    }

    #[test]
    fn a_stray_byte_in_connection_hides_none_of_the_fields_it_names() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xff, x-secret").unwrap(),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
        // A member that is not ASCII names nothing, even once trimmed.
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes("upgrade\u{a0}".as_bytes()).unwrap(),
        );
        assert_eq!(list_members(&headers, &header::CONNECTION).count(), 0);
    }

    #[test]
    fn expect_goes_on_only_with_content() {
        for content in [true, false] {
            let mut headers = HeaderMap::new();
            headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
            scrub_request(&mut headers, client(None), content);
            assert_eq!(headers.contains_key(header::EXPECT), content);
        }
        // Nor from an HTTP/1.0 client (RFC 9110 §10.1.1).
        let mut headers = HeaderMap::new();
        headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let old = ClientInfo {
            version: Version::HTTP_10,
            ..client(None)
        };
        scrub_request(&mut headers, old, true);
        assert!(!headers.contains_key(header::EXPECT));
    }

    #[test]
    fn a_plain_connection_line_beside_one_that_names_fields() {
        // One line a plain token, another naming a field: the named field
        // goes as it would on one line (the plain line takes no short cut
        // for the others).
        let mut headers = map(&[
            ("connection", " Keep-Alive "),
            ("connection", "close, x-trace"),
            ("x-trace", "1"),
            ("content-length", "5"),
            ("accept", "*/*"),
        ]);
        let seen = remove_hop_by_hop(&mut headers);
        assert!(seen.content_length && !seen.transfer_encoding);
        assert!(!headers.contains_key("connection"));
        assert!(!headers.contains_key("x-trace"));
        assert!(headers.contains_key("accept"));
        // Plain tokens only: nothing named, nothing else removed.
        let mut headers = map(&[("connection", "CLOSE"), ("x-trace", "1")]);
        let seen = remove_hop_by_hop(&mut headers);
        assert!(!seen.content_length);
        assert!(!headers.contains_key("connection"));
        assert!(headers.contains_key("x-trace"));
    }

    #[test]
    fn hop_by_hop_fields_are_removed() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a [&'a str]);
        let cases: &[Case] = &[
            // (input, must be gone, must remain)
            (
                &[
                    ("connection", "keep-alive"),
                    ("keep-alive", "timeout=5"),
                    ("accept", "*/*"),
                ],
                &["connection", "keep-alive"],
                &["accept"],
            ),
            (
                &[
                    ("te", "trailers"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                ],
                &["te", "transfer-encoding", "upgrade"],
                &[],
            ),
            (
                &[
                    ("proxy-authorization", "Basic x"),
                    ("proxy-connection", "close"),
                ],
                &["proxy-authorization", "proxy-connection"],
                &[],
            ),
            // Names that only begin like a hop-by-hop one stay.
            (
                &[
                    ("tea", "1"),
                    ("connections", "2"),
                    ("upgraded", "3"),
                    ("proxy", "4"),
                    ("keep-alive-x", "5"),
                    ("transfer", "6"),
                ],
                &[],
                &[
                    "tea",
                    "connections",
                    "upgraded",
                    "proxy",
                    "keep-alive-x",
                    "transfer",
                ],
            ),
            // Fields named by Connection go too, whatever their case or spacing.
            (
                &[
                    ("connection", "X-Secret ,  close,,"),
                    ("x-secret", "1"),
                    ("x-kept", "2"),
                ],
                &["connection", "x-secret"],
                &["x-kept"],
            ),
            // Tokens naming the fixed hop-by-hop fields, in any case.
            (
                &[
                    ("connection", "Keep-Alive, UPGRADE"),
                    ("keep-alive", "timeout=5"),
                    ("upgrade", "websocket"),
                    ("accept", "*/*"),
                ],
                &["connection", "keep-alive", "upgrade"],
                &["accept"],
            ),
            // Multiple Connection fields are all honoured.
            (
                &[
                    ("connection", "a"),
                    ("connection", "b"),
                    ("a", "1"),
                    ("b", "2"),
                    ("c", "3"),
                ],
                &["a", "b"],
                &["c"],
            ),
            // Garbage tokens in Connection are ignored, not a panic.
            (
                &[
                    ("connection", "bad header name, ok-name"),
                    ("ok-name", "1"),
                    ("host", "h"),
                ],
                &["ok-name"],
                &["host"],
            ),
            // portico's request id survives being named.
            (
                &[
                    ("connection", "X-Request-Id, x-a"),
                    ("x-request-id", "abc"),
                    ("x-a", "1"),
                ],
                &["x-a", "connection"],
                &["x-request-id"],
            ),
        ];
        for (input, gone, kept) in cases {
            let mut headers = map(input);
            remove_hop_by_hop(&mut headers);
            for name in *gone {
                assert!(!headers.contains_key(*name), "{name} kept in {input:?}");
            }
            for name in *kept {
                assert!(headers.contains_key(*name), "{name} removed in {input:?}");
            }
        }
    }

    #[test]
    fn forwarded_for_is_appended_to_prior_hops() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "192.0.2.7"),
            (&[("x-forwarded-for", "10.0.0.1")], "10.0.0.1, 192.0.2.7"),
            (
                &[
                    ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
                    ("x-forwarded-for", "10.0.0.3"),
                ],
                "10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7",
            ),
        ];
        for (input, want) in cases {
            let mut headers = map(input);
            prepare(&mut headers, client(None));
            let all: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
            assert_eq!(all, vec![*want], "for {input:?}");
        }
        // Bytes past ASCII go on as sent, not as U+FFFD.
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"a\xe9").unwrap(),
        );
        prepare(&mut headers, client(None));
        assert_eq!(headers["x-forwarded-for"].as_bytes(), b"a\xe9, 192.0.2.7");
    }

    #[test]
    fn forwarding_fields_replace_client_supplied_ones() {
        let host = HeaderValue::from_static("shop.example");
        let mut headers = map(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("host", "shop.example"),
        ]);
        prepare(&mut headers, client(Some(&host)));
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "shop.example");
        assert_eq!(headers["host"], "shop.example");
        assert_eq!(headers["via"], "1.1 portico-00000000002a");
    }

    #[test]
    fn a_trusted_proxy_s_one_well_formed_proto_and_host_are_kept() {
        const XFP: &str = "x-forwarded-proto";
        const XFH: &str = "x-forwarded-host";
        const EITHER: Option<TrustedFields> = Some(TrustedFields::Either);
        let host = HeaderValue::from_static("shop.example");
        // What the backend is told: X-Forwarded-Proto, X-Forwarded-Host.
        let forwarded = |trusted: Option<TrustedFields>, input: &[(&str, &str)]| {
            let mut headers = map(input);
            let info = ClientInfo {
                trusted,
                ..client(Some(&host))
            };
            let proto = scrub_request(&mut headers, info, false).proto;
            let sent = |name| headers.get_all(name).iter().collect::<Vec<_>>();
            assert_eq!(sent(XFP), [proto], "{input:?}");
            let [host] = sent(XFH)[..] else {
                panic!("not one X-Forwarded-Host for {input:?}");
            };
            (proto, host.to_str().unwrap().to_owned())
        };
        // (request fields, what the backend is told)
        type Case<'a> = (&'a [(&'a str, &'a str)], (&'a str, &'a str));
        // RFC 7239 `Forwarded`: the last element, the trusted proxy's own.
        const FWD: &str = "forwarded";
        let from_forwarded: &[Case] = &[
            (
                &[(FWD, "for=192.0.2.1;proto=https;host=lb.example")],
                ("https", "lb.example"),
            ),
            (
                &[(FWD, "for=192.0.2.1;Proto=HTTPS;host=\"[2001:db8::1]:8443\"")],
                ("https", "[2001:db8::1]:8443"),
            ),
            // A client's element to the left says nothing.
            (
                &[(
                    FWD,
                    "proto=http;host=evil.example, for=192.0.2.1;proto=https",
                )],
                ("https", "shop.example"),
            ),
            (
                &[
                    (FWD, "proto=https;host=evil.example"),
                    (FWD, "for=192.0.2.1"),
                ],
                ("http", "shop.example"),
            ),
            // Both fields, agreeing (hosts in any case).
            (
                &[
                    (XFP, "https"),
                    (XFH, "LB.example"),
                    (FWD, "proto=https;host=lb.example"),
                ],
                ("https", "LB.example"),
            ),
            // Each is judged on its own: a bad host spoils no scheme.
            (
                &[(FWD, "proto=https;host=\"user@a.example\"")],
                ("https", "shop.example"),
            ),
            // An element that says nothing of one leaves the other field's.
            (
                &[(XFP, "https"), (FWD, "for=192.0.2.1;host=lb.example")],
                ("https", "lb.example"),
            ),
        ];
        for (input, (proto, host)) in from_forwarded {
            assert_eq!(
                forwarded(EITHER, input),
                (*proto, host.to_string()),
                "{input:?}"
            );
        }
        let kept: &[Case] = &[
            (
                &[(XFP, "https"), (XFH, "lb.example")],
                ("https", "lb.example"),
            ),
            (&[(XFP, "HTTPS")], ("https", "shop.example")),
            (&[(XFP, "http")], ("http", "shop.example")),
            (
                &[(XFH, "[2001:db8::1]:8443")],
                ("http", "[2001:db8::1]:8443"),
            ),
        ];
        for (input, (proto, host)) in kept {
            assert_eq!(forwarded(EITHER, input), (*proto, host.to_string()));
        }
        // Disagreeing, the two are believed only when the proxies are
        // known to write one of them (`trusted_fields`): the other is a
        // client's claim.
        let disagreeing = [
            (XFP, "https"),
            (XFH, "lb.example"),
            (FWD, "proto=http;host=evil.example"),
        ];
        assert_eq!(
            forwarded(EITHER, &disagreeing),
            ("http", "shop.example".to_owned())
        );
        let only = |fields| forwarded(Some(fields), &disagreeing);
        assert_eq!(
            only(TrustedFields::XForwarded),
            ("https", "lb.example".to_owned())
        );
        assert_eq!(
            only(TrustedFields::Forwarded),
            ("http", "evil.example".to_owned())
        );
        // portico's own, as for a client that is not trusted.
        let own = ("http", "shop.example".to_owned());
        assert_eq!(forwarded(None, kept[0].0), own);
        for (input, _) in from_forwarded {
            assert_eq!(forwarded(None, input), own, "{input:?}");
        }
        let replaced: &[&[(&str, &str)]] = &[
            // Several lines: which one counts is anyone's guess.
            &[(XFP, "https"), (XFP, "https")],
            &[(XFH, "a.example"), (XFH, "a.example")],
            // Lists and junk.
            &[(XFP, "https, http")],
            &[(XFP, "ftp")],
            &[(XFP, "")],
            &[(XFH, "a.example, b.example")],
            &[(XFH, "a.example,b.example")],
            &[(XFH, "user@evil.example")],
            &[(XFH, "a.example/x")],
            &[(XFH, "")],
            // Named in Connection, it is hop-by-hop and gone first.
            &[("connection", XFP), (XFP, "https")],
            &[("connection", FWD), (FWD, "proto=https;host=a.example")],
            // Forwarded junk: a scheme or host portico does not take, a
            // list, a parameter twice, a malformed element.
            &[(FWD, "proto=ftp;host=\"\"")],
            &[(FWD, "proto=\"https, http\";host=\"a.example,b.example\"")],
            &[(FWD, "proto=https;proto=https;host=a.example")],
            &[(FWD, "proto=https;host=a.example:8443")],
            &[(FWD, "proto=gopher;host=\"user@a.example\"")],
            &[(FWD, "proto=https;host=\"a.example")],
            // Both fields, disagreeing: one was the client's; neither.
            &[
                (XFP, "http"),
                (XFH, "a.example"),
                (FWD, "proto=https;host=b.example"),
            ],
            // Junk in one spoils the other's.
            &[
                (XFP, "https"),
                (XFP, "https"),
                (XFH, "a.example"),
                (XFH, "a.example"),
                (FWD, "proto=https;host=a.example"),
            ],
            &[
                (XFP, "https"),
                (XFH, "a.example"),
                (FWD, "proto=https;host=a.example;proto=https"),
            ],
            &[
                (XFP, "https"),
                (XFH, "a.example"),
                (FWD, "proto=gopher;host=a.example/x"),
            ],
        ];
        for input in replaced {
            assert_eq!(forwarded(EITHER, input), own, "{input:?}");
        }
    }

    #[test]
    fn via_is_appended_with_the_received_protocol() {
        let mut headers = map(&[("via", "1.0 edge")]);
        let mut info = client(None);
        info.version = Version::HTTP_2;
        prepare(&mut headers, info);
        let all: Vec<_> = headers.get_all("via").iter().collect();
        assert_eq!(all, vec!["1.0 edge", "2 portico-00000000002a"]);
    }

    #[test]
    fn a_request_has_looped_only_when_its_via_names_this_proxy_twice() {
        let me = Pseudonym::named("portico-00000000002a");
        let looped = |headers: &HeaderMap, me: &Pseudonym| laps(headers, me) >= 2;
        let twice = |entry: &'static str| [("via", entry), ("via", entry)];
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            // One lap back is allowed: a deliberate re-entry.
            (&[("via", "1.1 portico-00000000002a")], false),
            (&twice("1.1 portico"), false),
            (&twice("1.1 portico-00000000002b"), false),
            (&twice("1.1 portico-00000000002a0"), false),
            (&twice("1.1 x-portico-00000000002a"), false),
            (&twice("portico-00000000002a"), false),
            (&twice("1.0 edge (portico-00000000002a)"), false),
            // A comma inside a comment, nested or escaped, splits nothing.
            (&twice("1.0 edge (see, x portico-00000000002a)"), false),
            (&twice("1.0 edge ((a, b), x portico-00000000002a)"), false),
            (&twice("1.0 edge (\\), x portico-00000000002a)"), false),
            (
                &twice("1.0 edge (a, b), 1.1 portico-00000000002a (c, d)"),
                true,
            ),
            (&twice("1.1 portico-00000000002a"), true),
            (&twice("2 Portico-00000000002A"), true),
            (
                &[(
                    "via",
                    "1.1 portico-00000000002a, 1.0 edge, HTTP/1.1 portico-00000000002a (v2)",
                )],
                true,
            ),
            (
                &[
                    ("via", "1.1 portico-00000000002a"),
                    ("via", " 1.1\tportico-00000000002a"),
                ],
                true,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(looped(&map(input), &me), *want, "for {input:?}");
        }
        // What this proxy adds, twice, is what it finds.
        let mut headers = HeaderMap::new();
        add_hop(&mut headers, Hop::of(client(None), &me));
        assert!(!looped(&headers, &me));
        add_hop(&mut headers, Hop::of(client(None), &me));
        assert!(looped(&headers, &me));
        // A line that is not text (a hop's non-ASCII comment) still counts.
        let mut headers = HeaderMap::new();
        let line = b"1.1 portico-00000000002a (caf\xc3\xa9), 1.1 portico-00000000002a";
        headers.insert(header::VIA, HeaderValue::from_bytes(line).unwrap());
        assert!(looped(&headers, &me));
    }

    #[test]
    fn every_proxy_has_a_pseudonym_of_its_own() {
        let (a, b) = (Pseudonym::random(), Pseudonym::random());
        let name = a.name();
        assert_ne!(name, b.name());
        assert_eq!(name.len(), "portico-".len() + 12, "{name}");
        assert!(name.starts_with("portico-"), "{name}");
        assert!(name[8..].bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
        assert_eq!(a.via(Version::HTTP_2), format!("2 {name}"));
    }

    #[test]
    fn response_loses_hop_by_hop_and_gains_via() {
        let headers = prepared(
            &[
                ("connection", "close, x-internal"),
                ("x-internal", "1"),
                ("transfer-encoding", "chunked"),
                ("etag", "\"v1\""),
            ],
            Version::HTTP_11,
        )
        .headers;
        assert!(!headers.contains_key("connection"));
        assert!(!headers.contains_key("x-internal"));
        assert!(!headers.contains_key("transfer-encoding"));
        assert_eq!(headers["etag"], "\"v1\"");
        assert_eq!(headers["via"], "1.1 portico");
    }

    #[test]
    fn a_response_length_goes_only_beside_transfer_encoding() {
        // RFC 9112 §6.3: the coding overrides the length.
        let both = prepared(
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            Version::HTTP_11,
        );
        assert!(!both.headers.contains_key("content-length"));
        let length = prepared(
            &[("content-length", "5"), ("connection", "keep-alive")],
            Version::HTTP_11,
        );
        assert_eq!(length.headers["content-length"], "5");
    }

    #[test]
    fn forwarded_goes_on_only_from_proxies_trusted_to_write_it() {
        let field = "for=6.6.6.6;proto=https;host=evil.example";
        for (trusted, kept) in [
            (None, false),
            (Some(TrustedFields::XForwarded), false),
            (Some(TrustedFields::Forwarded), true),
            (Some(TrustedFields::Either), true),
        ] {
            let mut headers = map(&[("forwarded", field)]);
            prepare(
                &mut headers,
                ClientInfo {
                    trusted,
                    ..client(None)
                },
            );
            assert_eq!(headers.contains_key("forwarded"), kept, "{trusted:?}");
        }
    }

    /// The forwarding fields frameworks read that portico does not write
    /// go on only from trusted proxies (review36b F1).
    #[test]
    fn other_forwarding_claims_go_on_only_from_trusted_proxies() {
        let given = [
            ("x-forwarded-scheme", "http"),
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-port", "1337"),
            ("x-forwarded-prefix", "//evil.example"),
            ("x-real-ip", "6.6.6.6"),
            // Read as the path, or to build links, by frameworks behind
            // IIS or Apache (review40c F2).
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-host", "evil.example"),
            ("x-forwarded-server", "evil.example"),
            // Read as the same variable by Rack, WSGI and PHP (review36d M1).
            ("x_real_ip", "7.7.7.7"),
            ("x-forwarded_port", "1"),
            ("x_original_url", "/admin"),
            ("x-custom", "kept"),
        ];
        // A proxy trusted for `Forwarded` only does not vouch for them
        // (review36d L1).
        for (trusted, kept) in [
            (None, false),
            (Some(TrustedFields::Forwarded), false),
            (Some(TrustedFields::XForwarded), true),
        ] {
            let mut headers = map(&given);
            prepare(
                &mut headers,
                ClientInfo {
                    trusted,
                    ..client(None)
                },
            );
            for (name, _) in &given[..given.len() - 1] {
                assert_eq!(headers.contains_key(*name), kept, "{name} {trusted:?}");
            }
            assert_eq!(headers["x-custom"], "kept");
        }
    }

    /// A method override goes on, and is told to the caller, in any
    /// spelling a framework reads (review40c F2).
    #[test]
    fn method_overrides_go_on_and_are_told() {
        for name in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x_http_method_override",
            "x-http_method",
        ] {
            let mut headers = map(&[(name, "HEAD")]);
            assert!(
                scrub_request(&mut headers, client(None), false).overrides_method,
                "{name}"
            );
            assert_eq!(headers[name], "HEAD");
        }
        let mut headers = map(&[("x-http-method-overrides", "HEAD")]);
        assert!(!scrub_request(&mut headers, client(None), false).overrides_method);
    }

    #[test]
    fn a_request_length_goes_on_plain_and_once() {
        for given in [
            &[("content-length", "0005")][..],
            &[("content-length", "5"), ("content-length", "5")],
            &[("content-length", "5, 5")],
        ] {
            let mut headers = map(given);
            prepare(&mut headers, client(None));
            let lines: Vec<_> = headers.get_all("content-length").iter().collect();
            assert_eq!(lines, ["5"], "{given:?}");
        }
    }

    #[test]
    fn names_spelling_portico_s_fields_with_underscores_are_dropped() {
        let mut headers = map(&[
            ("x_forwarded_for", "6.6.6.6"),
            ("x-forwarded_proto", "https"),
            ("x_forwarded_host", "evil.example"),
            ("x_request_id", "forged"),
            ("x_custom_field", "kept"),
            ("x-forwarded-for", "10.0.0.1"),
            // The framing fields' too (fuzz56 L).
            ("transfer_encoding", "chunked"),
            ("content_length", "5"),
            ("content_type_x", "kept"),
        ]);
        prepare(&mut headers, client(None));
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("x_forwarded") || *n == "x-forwarded_proto"),
            "{names:?}"
        );
        assert!(!headers.contains_key("x_request_id"));
        assert!(!headers.contains_key("transfer_encoding"));
        assert!(!headers.contains_key("content_length"));
        assert_eq!(headers["content_type_x"], "kept");
        assert_eq!(headers["x_custom_field"], "kept");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
    }

    #[test]
    fn trailers_lose_what_framing_and_the_connection_own() {
        let mut trailers = map(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("x-checksum", "abc"),
        ]);
        scrub_trailers(&mut trailers);
        let names: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-checksum"]);
    }

    /// A request's trailers lose the fields portico writes or vouches for
    /// in the head, however spelt (fuzz56 L).
    #[test]
    fn request_trailers_lose_the_fields_portico_vouches_for() {
        let mut trailers = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x_forwarded_proto", "https"),
            ("forwarded", "for=6.6.6.6"),
            ("via", "1.1 evil"),
            ("x-request-id", "forged"),
            ("x-real-ip", "6.6.6.6"),
            ("content-length", "5"),
            ("x-checksum", "abc"),
        ]);
        scrub_request_trailers(&mut trailers);
        let names: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-checksum"]);
    }

    #[test]
    fn a_response_length_given_twice_goes_out_once_and_plain() {
        for given in [
            &[("content-length", "2"), ("content-length", "2")][..],
            &[("content-length", "2, 2")],
            &[("content-length", "0002")],
            &[("content-length", "2 ,2")],
        ] {
            let head = prepared(given, Version::HTTP_11);
            let lines: Vec<_> = head.headers.get_all("content-length").iter().collect();
            assert_eq!(lines, ["2"], "{given:?}");
        }
        let zero = prepared(&[("content-length", "0")], Version::HTTP_11);
        assert_eq!(zero.headers["content-length"], "0");
        // A 426 keeps the `Upgrade` it must carry; others lose it
        // (review42h L1).
        let fields = [("upgrade", "websocket"), ("connection", "upgrade")];
        let mut head = prepared(&fields, Version::HTTP_11);
        assert!(!head.headers.contains_key("upgrade"));
        head.status = http::StatusCode::UPGRADE_REQUIRED;
        head.headers = map(&fields);
        prepare_response(&mut head);
        assert_eq!(head.headers["upgrade"], "websocket");
        assert_eq!(head.headers["connection"], "upgrade");
        // What hyper does not read, an answer to HEAD's, may be no
        // length at all: dropped, never relayed (review42a F2).
        for given in [
            &[("content-length", "5x")][..],
            &[("content-length", "-1")],
            &[("content-length", "+5")],
            &[("content-length", "")],
            &[("content-length", "5"), ("content-length", "700")],
            &[("content-length", "5, 700")],
        ] {
            let head = prepared(given, Version::HTTP_11);
            assert!(!head.headers.contains_key("content-length"), "{given:?}");
        }
    }

    #[test]
    fn a_response_goes_out_in_portico_s_version_and_its_via_names_the_backend_s() {
        let head = prepared(&[("content-length", "2")], Version::HTTP_10);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["via"], "1.0 portico");
    }
}
