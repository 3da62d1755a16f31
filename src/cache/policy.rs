//! RFC 9111 decisions for a shared cache, as pure functions over headers
//! and times: what `Cache-Control` says (§5.2), whether a response may be
//! stored (§3), how long it stays fresh (§4.2.1), how old it is (§4.2.3),
//! and what the request allows (§5.2.1). Knows nothing about the store.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

/// Delta-seconds beyond this are capped (RFC 9111 §1.2.2).
pub(super) const MAX_DELTA: u64 = 2_147_483_648;

/// Parsed `Cache-Control` directives, request or response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub min_fresh: Option<u64>,
    /// `Some(None)`: any staleness accepted; `Some(Some(n))`: up to n s.
    pub max_stale: Option<Option<u64>>,
    /// §5.2.2.3: store only if the status code is understood, and then
    /// regardless of `no-store`.
    pub must_understand: bool,
    /// From `CDN-Cache-Control` (RFC 9213): `Expires` does not apply.
    pub targeted: bool,
    /// A line with a quoted string left open, or a `"` where no value
    /// starts: where its directives end cannot be known, and a `private`
    /// or `no-store` may be among them.
    /// A response is then not stored, and a request goes past the cache.
    pub unreadable: bool,
}

impl CacheControl {
    /// A response's directives that forbid serving it stale at all:
    /// `no-cache`, which allows no use without a successful validation
    /// (RFC 9111 §5.2.2.4, §4.2.4: stale-if-error served it when the
    /// validation failed, review34e 1), `must-revalidate`,
    /// `proxy-revalidate`, and `s-maxage`, which shared caches treat as
    /// `proxy-revalidate` (§5.2.2.10).
    pub fn forbids_stale(&self) -> bool {
        self.no_cache || self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some()
    }

    /// A request's directives that ask for the stored response to be
    /// checked with the origin whatever its age: `no-cache`, `max-age=0`
    /// (a browser's reload).
    pub fn forces_revalidation(&self) -> bool {
        self.no_cache || self.max_age == Some(0)
    }
}

/// §1.2.2 delta-seconds: digits only; too large caps; anything else is
/// invalid (`None`).
fn delta_seconds(value: &str) -> Option<u64> {
    let value = value.trim().trim_matches('"');
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse::<u64>().map_or(MAX_DELTA, |n| n.min(MAX_DELTA)))
}

/// Splits a line on the commas outside quoted strings, in which `\`
/// escapes the next byte (a quoted-pair, RFC 9110 §5.6.4) and bytes
/// beyond ASCII may stand (obs-text). A quoted string is a directive's
/// value, so it opens only after `=` and ends the directive. `None` when
/// a quoted string is left open, a `"` stands anywhere else (`x=a"b`,
/// `"private"`), or text follows one (`ext="a"private`): where the
/// directives end cannot be known. Read as text, or with every `"` taken
/// for a quote, a valid `ext="a\"b", private` lost its `private`, and one
/// byte beyond ASCII anywhere lost the whole line: either way one user's
/// response was stored for all (review40c F3, review40f L2).
fn directives(value: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    each_directive(value, |directive| out.push(directive)).then_some(out)
}

/// [`directives`] without a list: calls `each` with every directive in
/// turn, and says whether the line could be read whole (when not, `each`
/// may have seen those before where it could not).
fn each_directive<'a>(value: &'a [u8], mut each: impl FnMut(&'a [u8])) -> bool {
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    // Whether a value may start here: after `=` and any blanks.
    let mut value_start = false;
    // Whether a quoted string just ended: only blanks and `,` may follow
    // (`ext="a"private` hid its `private`, review40h F3).
    let mut value_end = false;
    for (i, &byte) in value.iter().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' if quoted => {
                quoted = false;
                value_end = true;
            }
            b'"' if value_start => {
                quoted = true;
                value_start = false;
            }
            b'"' => return false,
            _ if quoted => {}
            b' ' | b'\t' => {}
            b',' => {
                each(&value[start..i]);
                start = i + 1;
                value_start = false;
                value_end = false;
            }
            _ if value_end => return false,
            b'=' => value_start = true,
            _ => value_start = false,
        }
    }
    if quoted {
        return false;
    }
    each(&value[start..]);
    true
}

/// Whether `Cache-Control` says `no-transform` (RFC 9111 §5.2.1.6,
/// §5.2.2.6), read as [`parse`] reads directives. A line whose directives
/// cannot be told apart counts as saying it: leaving content as it is
/// is never wrong.
pub fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .any(says_no_transform)
}

/// [`no_transform`] for one `Cache-Control` line. Read with no list made:
/// it is asked of every response a route may compress.
pub fn says_no_transform(line: &HeaderValue) -> bool {
    let mut said = false;
    let whole = each_directive(line.as_bytes(), |directive| {
        said |= directive.trim_ascii().eq_ignore_ascii_case(b"no-transform");
    });
    said || !whole
}

/// Parses every `Cache-Control` line. Unknown directives are ignored
/// (§5.2.3). A duplicated or invalid `max-age`/`s-maxage` makes the value
/// 0, so the response is treated as stale (§4.2.1).
pub fn parse(headers: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::default();
    let mut seen_max_age = false;
    let mut seen_s_maxage = false;
    for line in headers.get_all(header::CACHE_CONTROL) {
        let Some(list) = directives(line.as_bytes()) else {
            cc.unreadable = true;
            continue;
        };
        for directive in list {
            let directive = directive.trim_ascii();
            let (name, value) = match directive.iter().position(|&b| b == b'=') {
                Some(at) => (
                    directive[..at].trim_ascii(),
                    Some(directive[at + 1..].trim_ascii()),
                ),
                None => (directive, None),
            };
            // A name beyond ASCII is no directive this cache knows; a
            // value beyond it is no number (read as empty: invalid).
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let value = value.map(|v| std::str::from_utf8(v).unwrap_or(""));
            match name.to_ascii_lowercase().as_str() {
                "no-store" => cc.no_store = true,
                // Qualified forms (`no-cache="Set-Cookie"`) are treated as
                // the unqualified directive: stricter, never wrong.
                "no-cache" => cc.no_cache = true,
                "private" => cc.private = true,
                "public" => cc.public = true,
                "must-revalidate" => cc.must_revalidate = true,
                "proxy-revalidate" => cc.proxy_revalidate = true,
                "only-if-cached" => cc.only_if_cached = true,
                "must-understand" => cc.must_understand = true,
                "max-age" => {
                    let parsed = value.and_then(delta_seconds);
                    cc.max_age = if seen_max_age && cc.max_age != parsed {
                        Some(0)
                    } else {
                        Some(parsed.unwrap_or(0))
                    };
                    seen_max_age = true;
                }
                "s-maxage" => {
                    let parsed = value.and_then(delta_seconds);
                    cc.s_maxage = if seen_s_maxage && cc.s_maxage != parsed {
                        Some(0)
                    } else {
                        Some(parsed.unwrap_or(0))
                    };
                    seen_s_maxage = true;
                }
                "stale-while-revalidate" => {
                    cc.stale_while_revalidate = value.and_then(delta_seconds)
                }
                "stale-if-error" => cc.stale_if_error = value.and_then(delta_seconds),
                "min-fresh" => cc.min_fresh = value.and_then(delta_seconds),
                "max-stale" => {
                    cc.max_stale = match value {
                        None => Some(None),
                        Some(v) => delta_seconds(v).map(Some),
                    }
                }
                _ => {}
            }
        }
    }
    cc
}

/// A response's directives for this cache: `CDN-Cache-Control` when it is
/// valid (RFC 9213), else `Cache-Control`.
pub fn parse_response(headers: &HeaderMap) -> CacheControl {
    super::targeted::parse(headers).unwrap_or_else(|| parse(headers))
}

/// A request's cache-relevant directives (§5.2.1), with `Pragma:
/// no-cache` honoured when there is no `Cache-Control` (§5.4).
pub fn parse_request(headers: &HeaderMap) -> CacheControl {
    let mut cc = parse(headers);
    // Its `no-store` may be past the open quote: such a request goes past
    // the cache, as with `no-store`. Unless it may say `only-if-cached`,
    // which nothing goes forward with (cache53 L2).
    cc.no_store |= cc.unreadable;
    if cc.unreadable {
        cc.only_if_cached |= headers.get_all(header::CACHE_CONTROL).iter().any(|line| {
            line.as_bytes()
                .windows(b"only-if-cached".len())
                .any(|w| w.eq_ignore_ascii_case(b"only-if-cached"))
        });
    }
    if !headers.contains_key(header::CACHE_CONTROL)
        && headers
            .get_all(header::PRAGMA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("no-cache"))
    {
        cc.no_cache = true;
    }
    cc
}

/// An HTTP-date in any of the three formats of RFC 9110 §5.6.7, with the
/// letter case of day, month and zone forgiven as recipients do.
fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    httpdate::parse_http_date(value).ok().or_else(|| {
        let mut fixed = String::with_capacity(value.len());
        let mut word_start = true;
        for c in value.chars() {
            fixed.push(if word_start {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            });
            word_start = !c.is_ascii_alphabetic();
        }
        let fixed = fixed.replace("Gmt", "GMT");
        httpdate::parse_http_date(&fixed)
            .ok()
            .or_else(|| any_day_name(&fixed))
    })
}

/// `value` read whatever day name it starts with: the name says nothing
/// the date does not, and senders get it wrong (`Thu Aug  8 ... 2050`, a
/// Monday, is http-tests/cache-tests' asctime date). httpdate refuses a
/// wrong one; nginx and Varnish read the date (review40e).
fn any_day_name(value: &str) -> Option<SystemTime> {
    const SHORT: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const LONG: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let (day, rest) = value.split_at(value.find([',', ' '])?);
    let names = if day.len() > 3 { LONG } else { SHORT };
    names
        .iter()
        .find_map(|name| httpdate::parse_http_date(&format!("{name}{rest}")).ok())
}

/// The first member of the `Age` field (a list value such as `7200, 0`
/// means 7200); anything but delta-seconds there is ignored (§5.1).
fn age_seconds(headers: &HeaderMap) -> u64 {
    let Some(value) = headers.get(header::AGE).and_then(|v| v.to_str().ok()) else {
        return 0;
    };
    let first = value.split(',').next().unwrap_or("");
    delta_seconds(first).unwrap_or(0)
}

/// Whether `public` alone lends the operator's `default_ttl` to `status`:
/// a 2xx or 3xx, but not a temporary redirect (302, 303, 307), which often
/// sends one visitor to a login or a session of its own. Client and server
/// errors beyond the heuristic list depend on their request or say nothing.
fn public_on_default(status: StatusCode) -> bool {
    (status.is_success() || status.is_redirection()) && !matches!(status.as_u16(), 302 | 303 | 307)
}

/// Statuses a cache may store with heuristic freshness (RFC 9110 §15.1,
/// and 451 by RFC 7725 §3); 206 is left out because portico does not
/// combine partial content.
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 451 | 501
    )
}

/// The status codes whose caching rules portico follows (see
/// [`storable`]'s `must-understand`): RFC 9110's, and 451.
fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200..=206 | 300..=305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 451 | 500..=505
    )
}

/// The explicit freshness lifetime (§4.2.1): `s-maxage`, then `max-age`,
/// then `Expires` minus `Date`. An invalid `Expires` means already expired.
pub fn explicit_lifetime(headers: &HeaderMap, cc: &CacheControl) -> Option<Duration> {
    if let Some(s) = cc.s_maxage {
        return Some(Duration::from_secs(s));
    }
    if let Some(m) = cc.max_age {
        return Some(Duration::from_secs(m));
    }
    if headers.contains_key(header::EXPIRES) && !cc.targeted {
        let Some(expires) = http_date(headers, header::EXPIRES) else {
            return Some(Duration::ZERO);
        };
        let date = http_date(headers, header::DATE).unwrap_or_else(SystemTime::now);
        return Some(expires.duration_since(date).unwrap_or(Duration::ZERO));
    }
    None
}

/// Why a response is not stored (for `Cache-Status: ...; detail=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    /// A `Vary` member that is no field name (`"Cookie"`, `Cookie/1`), or
    /// a value that is not ASCII: what it varies on cannot be known.
    VaryInvalid,
    /// A `Cache-Control` line that cannot be split into directives (see
    /// [`CacheControl::unreadable`]).
    CacheControlInvalid,
    NoFreshness,
}

impl NotStored {
    /// Whether the reason lies with the resource's own terms, and so holds
    /// for the URL's next responses too: not with the request (HEAD, its
    /// `Authorization`) nor with a status (an error, a 304 to a client's
    /// own validators).
    pub fn lies_with_the_resource(self) -> bool {
        matches!(
            self,
            NotStored::NoStore
                | NotStored::Private
                | NotStored::SetCookie
                | NotStored::VaryStar
                | NotStored::VaryInvalid
                | NotStored::CacheControlInvalid
                | NotStored::NoFreshness
        )
    }

    pub fn detail(self) -> &'static str {
        match self {
            NotStored::Method => "method",
            NotStored::Status => "status",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::Authorization => "authorization",
            NotStored::SetCookie => "set-cookie",
            NotStored::VaryStar => "vary-star",
            NotStored::VaryInvalid => "vary-invalid",
            NotStored::CacheControlInvalid => "cache-control-invalid",
            NotStored::NoFreshness => "no-freshness",
        }
    }
}

/// An `ETag` or `Last-Modified`: something to revalidate with.
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Whether a shared cache may store this response (§3, §3.5), and for how
/// long it is fresh. `default_ttl` is the operator's heuristic for
/// heuristically cacheable statuses without explicit freshness (0 = none).
pub fn storable(
    method: &Method,
    request: &HeaderMap,
    request_cc: &CacheControl,
    status: StatusCode,
    response: &HeaderMap,
    cc: &CacheControl,
    default_ttl: Duration,
) -> Result<Duration, NotStored> {
    if method != Method::GET {
        return Err(NotStored::Method);
    }
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err(NotStored::Status);
    }
    // RFC 6585 §3-§6: a 428, 429, 431 or 511 MUST NOT be stored, whatever
    // its freshness: one client's demand for a precondition, its
    // throttling, its oversized fields or a captive portal's login,
    // which stored with a `max-age` went to every client (cache53 M1).
    // Varnish's built-in VCL does not store them either.
    if matches!(status.as_u16(), 428 | 429 | 431 | 511) {
        return Err(NotStored::Status);
    }
    // §5.2.2.3: must-understand overrides no-store for status codes this
    // cache knows the caching rules of, and forbids storing any other:
    // those RFC 9110 defines, and 451 (RFC 7725 §3); not any the `http`
    // crate has a name for (226, 418, 425 were stored despite `no-store`).
    if cc.must_understand && !understood(status) {
        return Err(NotStored::Status);
    }
    if (cc.no_store && !cc.must_understand) || request_cc.no_store {
        return Err(NotStored::NoStore);
    }
    // Whatever it holds, it may be `private` or `no-store`: the most
    // restrictive reading (RFC 9111 §4.2.1), as nginx, which looks for
    // `private` anywhere in the value, would not store it either.
    if cc.unreadable {
        return Err(NotStored::CacheControlInvalid);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    // §3.5: a shared cache stores answers to authorized requests only when
    // the origin says every user may see them.
    if request.contains_key(header::AUTHORIZATION)
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return Err(NotStored::Authorization);
    }
    let explicit = explicit_lifetime(response, cc);
    // A cookie set for one client must not reach another. RFC 9111 §7.3
    // lets a cache store it with an explicitly cacheable response, but an
    // application marking a page `public, max-age` while it starts a
    // session would hand that session to every visitor. nginx, Varnish's
    // built-in VCL and the big CDNs do not store such responses; neither
    // does portico.
    if response.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    // A `Vary` whose fields cannot all be read names what the response
    // varies on no less than one that can: stored as if it did not vary,
    // one user's `Vary: "Cookie"` page went to every other user
    // (review32a M2). Varnish passes such a response too.
    if response.contains_key(header::VARY) {
        match super::key::vary(response) {
            Err(super::key::Unmatchable::Star) => return Err(NotStored::VaryStar),
            Err(super::key::Unmatchable::Invalid) => return Err(NotStored::VaryInvalid),
            Ok(_) => {}
        }
    }
    let lifetime = match explicit {
        Some(lifetime) => lifetime,
        None if heuristically_cacheable(status) && !default_ttl.is_zero() => default_ttl,
        // `public` makes any status storable (RFC 9111 §4.2.2), but on the
        // operator's default only a 2xx or a lasting 3xx: many frameworks
        // mark every response `public`, and one passing 500 was served to
        // everyone for `default_ttl` (review32a L3), as one client's 401,
        // 403 or 429 was (review37b M2), and a 302 to a login page would
        // be. nginx's default `proxy_cache_valid` and Varnish's default
        // TTL skip them too; one with its own max-age is still stored.
        None if cc.public && !default_ttl.is_zero() && public_on_default(status) => default_ttl,
        // `no-cache` with a validator: kept stale so that every use is a
        // cheap conditional request (§5.2.2.4).
        None if cc.no_cache
            && has_validator(response)
            // As `public` lends `default_ttl` (review37e L3).
            && (heuristically_cacheable(status) || cc.public && public_on_default(status)) =>
        {
            Duration::ZERO
        }
        None => return Err(NotStored::NoFreshness),
    };
    // A response that must be revalidated before each use (`no-cache`) is
    // only worth keeping when that can be done cheaply; its stale windows
    // do not apply (RFC 9111 §4.2.4). One stale on arrival is worth
    // keeping too for a stale window: `max-age=0, stale-if-error=60` is
    // the usual "always ask me, but serve the last copy if I'm down"
    // (review32a M3), as a response aged past its `max-age` by `Age` is.
    let window = !cc.forbids_stale()
        && (cc.stale_while_revalidate.is_some_and(|s| s > 0)
            || cc.stale_if_error.is_some_and(|s| s > 0));
    if !has_validator(response) && (cc.no_cache || (lifetime.is_zero() && !window)) {
        return Err(NotStored::NoFreshness);
    }
    Ok(lifetime)
}

/// The inputs of the age calculation (§4.2.3), fixed when stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub request_time: SystemTime,
    pub response_time: SystemTime,
    pub date: Option<SystemTime>,
    pub age: u64,
}

impl Timing {
    pub fn new(headers: &HeaderMap, request_time: SystemTime, response_time: SystemTime) -> Self {
        let age = age_seconds(headers);
        Timing {
            request_time,
            response_time,
            date: http_date(headers, header::DATE),
            age,
        }
    }

    /// `current_age` at `now`.
    pub fn current_age(&self, now: SystemTime) -> Duration {
        let apparent = self
            .date
            .and_then(|d| self.response_time.duration_since(d).ok())
            .unwrap_or(Duration::ZERO);
        let delay = self
            .response_time
            .duration_since(self.request_time)
            .unwrap_or(Duration::ZERO);
        let corrected_age = Duration::from_secs(self.age) + delay;
        let initial = apparent.max(corrected_age);
        let resident = now
            .duration_since(self.response_time)
            .unwrap_or(Duration::ZERO);
        initial + resident
    }
}

/// What a stored response may be used for, given the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    /// Serve it.
    Fresh,
    /// Serve it now and revalidate in the background.
    StaleWhileRevalidate,
    /// Revalidate (or refetch) before serving.
    MustRevalidate,
}

/// §4 and §5.2.1: may a stored response of `lifetime` and `age` answer
/// this request? `cc` is the stored response's directives.
pub fn usable(
    lifetime: Duration,
    age: Duration,
    cc: &CacheControl,
    request: &CacheControl,
) -> Usable {
    if cc.no_cache || request.forces_revalidation() {
        return Usable::MustRevalidate;
    }
    // What the client asks of the response's age is not relaxed by
    // max-stale nor by stale-while-revalidate, which are about a response
    // stale by its own lifetime (RFC 5861 §3).
    let too_old = request
        .max_age
        .is_some_and(|max_age| age >= Duration::from_secs(max_age));
    let too_close = request
        .min_fresh
        .is_some_and(|min_fresh| lifetime.saturating_sub(age) < Duration::from_secs(min_fresh));
    if too_old || too_close {
        return Usable::MustRevalidate;
    }
    if age < lifetime {
        return Usable::Fresh;
    }
    if cc.forbids_stale() {
        return Usable::MustRevalidate;
    }
    let staleness = age.saturating_sub(lifetime);
    if let Some(max_stale) = request.max_stale {
        if max_stale.is_none_or(|s| staleness <= Duration::from_secs(s)) {
            return Usable::Fresh;
        }
    }
    match cc.stale_while_revalidate {
        Some(window) if staleness <= Duration::from_secs(window) => Usable::StaleWhileRevalidate,
        _ => Usable::MustRevalidate,
    }
}

/// May a stale response be served because the origin failed (RFC 5861
/// §4)? Within the response's `stale-if-error` window, or the one the
/// request's own `stale-if-error` (`asked`) grants: a client's leave to
/// serve it stale, as its `max-stale` is (cache53 L1: ignored), where the
/// response allows stale use at all.
pub fn stale_if_error(
    lifetime: Duration,
    age: Duration,
    cc: &CacheControl,
    asked: Option<u64>,
) -> bool {
    if cc.forbids_stale() {
        return false;
    }
    let staleness = age.saturating_sub(lifetime);
    [cc.stale_if_error, asked]
        .into_iter()
        .flatten()
        .any(|window| staleness <= Duration::from_secs(window))
}

/// Whether a 304 answering a revalidation is about the stored response
/// (RFC 9111 §4.3.4): an ETag in the 304 must be the stored one, else a
/// Last-Modified must be; a 304 without validators is taken to answer the
/// conditional request portico sent. One that names another representation
/// must not update the entry: its fields would go out on a body they do
/// not describe. ETags are compared weakly (the opaque tag, `W/` aside),
/// where §4.3.4 asks for a strong match when the 304's is strong: nginx
/// weakens the ETag of a body it compresses but not of its 304s, so a
/// strong comparison would turn every such revalidation into a refetch.
pub fn selects(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    match trimmed(not_modified, header::ETAG) {
        Some(new) => trimmed(stored, header::ETAG).is_some_and(|old| weak_match(old, new)),
        None => match trimmed(not_modified, header::LAST_MODIFIED) {
            Some(new) => trimmed(stored, header::LAST_MODIFIED) == Some(new),
            None => true,
        },
    }
}

/// Weak comparison of two entity tags (RFC 9110 §8.8.3.2): the opaque
/// tags are equal, `W/` aside.
pub fn weak_match(a: &[u8], b: &[u8]) -> bool {
    fn opaque(tag: &[u8]) -> &[u8] {
        tag.strip_prefix(b"W/").unwrap_or(tag)
    }
    opaque(a) == opaque(b)
}

fn trimmed(headers: &HeaderMap, name: header::HeaderName) -> Option<&[u8]> {
    headers.get(name).map(|v| v.as_bytes().trim_ascii())
}
