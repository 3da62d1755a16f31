//! Answers made from a stored entry: `Cache-Status`, `Age`, conditional
//! requests evaluated against it (RFC 9110 §13), 304s and ranges.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::{with_fwd_status, CACHE_STATUS, HIT};
use crate::cache::policy;
use crate::cache::range::{self, RangeAnswer};
use crate::cache::{Cache, Entry};
use crate::proxy::body::ProxyBody;
use crate::proxy::compress::Stripped;

pub(super) fn set_status(response: &mut Response<ProxyBody>, ours: &str) {
    add_status(response.headers_mut(), ours);
}

/// Adds portico's member to `Cache-Status`. A backend's own members (a
/// cache behind portico) stay in front of it: RFC 9211 §2 lists caches from
/// the origin to the client. Entries are stored without them, so a hit
/// carries portico's member alone, built without a merge.
pub(in crate::proxy) fn add_status(headers: &mut HeaderMap, ours: &str) {
    add_member(headers, ours, || HeaderValue::from_str(ours).ok());
}

/// [`add_status`] for a fixed value: no copy when it stands alone.
pub(in crate::proxy) fn add_static_status(headers: &mut HeaderMap, ours: &'static str) {
    add_member(headers, ours, || Some(HeaderValue::from_static(ours)));
}

fn add_member(headers: &mut HeaderMap, ours: &str, alone: impl FnOnce() -> Option<HeaderValue>) {
    if let header::Entry::Vacant(slot) = headers.entry(&CACHE_STATUS) {
        if let Some(value) = alone() {
            slot.insert(value);
        }
        return;
    }
    let mut value = String::new();
    for theirs in headers.get_all(&CACHE_STATUS) {
        if let Ok(theirs) = theirs.to_str() {
            if !theirs.trim().is_empty() {
                value.push_str(theirs.trim());
                value.push_str(", ");
            }
        }
    }
    value.push_str(ours);
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(CACHE_STATUS.clone(), value);
    }
}

pub(super) fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

pub(super) fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<std::time::SystemTime> {
    text(headers, name).and_then(|v| httpdate::parse_http_date(v).ok())
}

/// The members of an entity-tag list (`If-Match`, `If-None-Match`), split
/// on commas outside quotes: RFC 9110 §8.8.3 lets a tag hold a comma.
fn tag_list(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut quoted = false;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                quoted ^= c == '"';
                c == ',' && !quoted
            })
            .map_or(rest.len(), |(i, _)| i);
        let member = rest[..end].trim();
        rest = rest.get(end + 1..).unwrap_or("");
        Some(member)
    })
}

/// Every member of an entity-tag list field, over all its lines (a list
/// may be split over several, RFC 9110 §5.3).
fn tags(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(tag_list)
}

/// Whether the client's conditional headers match the stored response
/// (RFC 9110 §13.1.2 weak comparison for If-None-Match, where `*` matches
/// any representation, with an entity tag or not; If-Modified-Since only
/// without If-None-Match, against Last-Modified or else Date).
pub(super) fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if request.contains_key(header::IF_NONE_MATCH) {
        let etag = text(stored, header::ETAG);
        return tags(request, header::IF_NONE_MATCH).any(|t| {
            t == "*" || etag.is_some_and(|etag| policy::weak_match(t.as_bytes(), etag.as_bytes()))
        });
    }
    // Dates are parsed only when asked about: most hits carry neither.
    // One later than now is invalid (RFC 9110 §13.1.3), as Apache reads
    // it: a client's clock ahead, or a date made up to be past any
    // Last-Modified, gets the content, not a 304 for a copy it may lack.
    let Some(since) = date(request, header::IF_MODIFIED_SINCE)
        .filter(|&since| since <= std::time::SystemTime::now())
    else {
        return false;
    };
    // RFC 9111 §4.3.2: without Last-Modified, the stored Date stands in.
    date(stored, header::LAST_MODIFIED)
        .or_else(|| date(stored, header::DATE))
        .is_some_and(|modified| modified <= since)
}

/// RFC 9110 §13.2.2 steps 1 and 2 against the stored response: whether
/// `If-Match` (strong comparison; `*` matches what is stored) or, without
/// it, `If-Unmodified-Since` fails. A cache evaluates them like the origin
/// would (§13.2.1); nginx answers 412 from its cache too.
pub(super) fn precondition_failed(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if request.contains_key(header::IF_MATCH) {
        let etag = text(stored, header::ETAG).filter(|e| !e.starts_with("W/"));
        return !tags(request, header::IF_MATCH).any(|t| t == "*" || etag == Some(t));
    }
    let Some(since) = date(request, header::IF_UNMODIFIED_SINCE) else {
        return false;
    };
    date(stored, header::LAST_MODIFIED).is_some_and(|modified| modified > since)
}

/// What a stored entry answers a request with: a failed precondition
/// before a 304 before a range of it (RFC 9110 §13.2.2, §14.2), else the
/// stored response itself.
pub(super) enum Made {
    /// 412.
    Failed,
    /// 304.
    NotModified,
    /// A 206 or 416 of a stored 200.
    Part(RangeAnswer),
    /// The stored response (for a HEAD, without its body).
    Whole,
}

/// What the preconditions of a request with `request` fields make of a
/// response with `status` and `headers`, stored or just fetched: a 412
/// before a 304 (RFC 9110 §13.2.2), or nothing (the response itself, or a
/// range of it). They apply only where the answer would be a 2xx
/// (§13.2.1): a 404 or 301 is served as it is.
pub(super) fn preconditions(
    request: &HeaderMap,
    status: StatusCode,
    headers: &HeaderMap,
) -> Option<Made> {
    if !status.is_success() {
        return None;
    }
    if precondition_failed(request, headers) {
        return Some(Made::Failed);
    }
    not_modified(request, headers).then_some(Made::NotModified)
}

/// What `entry` answers `request` with.
pub(super) fn made_of(entry: &Entry, request: &Parts) -> Made {
    if let Some(made) = preconditions(&request.headers, entry.status, &entry.headers) {
        return made;
    }
    if request.method == Method::GET && entry.status == StatusCode::OK {
        match range::evaluate(&request.headers, &entry.headers, entry.body.len()) {
            RangeAnswer::Full => {}
            part => return Made::Part(part),
        }
    }
    Made::Whole
}

/// A response built from a stored entry: 304 for a matching conditional,
/// 206 or 416 for a byte range of a stored 200, else the stored response.
pub(super) fn from_entry(
    entry: &Entry,
    age: Duration,
    request: &Parts,
    status: &str,
) -> Response<ProxyBody> {
    let head = request.method == Method::HEAD;
    let mut response = made_response(entry, age, head, status, made_of(entry, request));
    // Not a hit the compressor knows the entry of (a stale copy for a
    // failed fetch, a revalidated one, a waiter's): what it was noted as
    // not compressing at goes with it (review60 L3, review61 L1).
    if let Some(note) = entry.incompressible_note() {
        response.extensions_mut().insert(note);
    }
    response
}

/// The response `made` of `entry`, `age` old, with `status` for its
/// `Cache-Status`.
pub(super) fn made_response(
    entry: &Entry,
    age: Duration,
    head: bool,
    status: &str,
    made: Made,
) -> Response<ProxyBody> {
    if let Made::Failed = made {
        return precondition_failed_response(status, entry.status);
    }
    // With `Content-Length` and `Cache-Status` as a fresh hit has them,
    // and `Age` to replace (`Entry::new`).
    let mut headers = entry.headers.clone();
    let len = entry.body.len();
    let mut dropped = None;
    let part = match made {
        Made::NotModified => {
            match status == HIT {
                true => strip_for_304(&mut headers),
                false => dropped = Some(stripped_for_304(&mut headers)),
            }
            Some((StatusCode::NOT_MODIFIED, ProxyBody::empty()))
        }
        Made::Part(range) => range_fields(&mut headers, range, len).map(|(code, start, count)| {
            (
                code,
                ProxyBody::full(entry.body.slice(start..start + count)),
            )
        }),
        Made::Failed | Made::Whole => None,
    };
    let (code, body) = part.unwrap_or_else(|| (entry.status, whole_body(entry, head)));
    let mut response = stored_response(entry, code, age, headers, body);
    if let Some(dropped) = dropped {
        response.extensions_mut().insert(dropped);
    }
    // Stored entries hold no Cache-Status but a fresh hit's (see
    // `add_status`): nothing to merge with, so no lookup before the insert.
    if status != HIT {
        if let Ok(value) = HeaderValue::from_str(status) {
            response.headers_mut().insert(CACHE_STATUS.clone(), value);
        }
        // A 304, 206 or 416 made of what a fetch for this request (or the
        // one it waited on) brought says what the backend sent: RFC 9211
        // §2.3, else it reads as the backend's (review39a L1). A hit has
        // no `fwd` to add it to.
        if code != entry.status {
            with_fwd_status(response.headers_mut(), entry.status);
        }
    }
    response
}

/// The 412 for a failed precondition, with `status` for its
/// `Cache-Status` and the status of the response it was judged against
/// (RFC 9211 §2.3: without it, the 412 would read as the backend's).
pub(super) fn precondition_failed_response(
    status: &str,
    judged: StatusCode,
) -> Response<ProxyBody> {
    let mut response = crate::proxy::error::error_response(StatusCode::PRECONDITION_FAILED);
    set_status(&mut response, status);
    with_fwd_status(response.headers_mut(), judged);
    response
}

/// The body of a whole answer made of `of` (a stored response or its
/// gzip copy): none for a HEAD.
pub(super) fn whole_body(of: &Entry, head: bool) -> ProxyBody {
    if head {
        ProxyBody::empty()
    } else {
        ProxyBody::full(of.body.clone())
    }
}

/// A response of `entry` with status `code`, its `headers` (the stored
/// fields, made into a 304's or a range's, or its gzip copy's) and
/// `body`, `age` old.
pub(super) fn stored_response(
    entry: &Entry,
    code: StatusCode,
    age: Duration,
    mut headers: HeaderMap,
    body: ProxyBody,
) -> Response<ProxyBody> {
    headers.insert(header::AGE, age_value(age.as_secs()));
    let mut response = Response::new(body);
    *response.status_mut() = code;
    *response.headers_mut() = headers;
    if let (Some(reason), true) = (&entry.reason, code == entry.status) {
        response.extensions_mut().insert(reason.clone());
    }
    response
}

/// How many seconds of `Age` [`age_value`] has made in advance: ten
/// minutes' worth, 600 values of a few bytes each, made at the first hit.
const AGES_MADE: u64 = 600;

/// An `Age` value. Those of the first ten minutes are made once: a hit's
/// then costs no allocation, no formatting, and no count of references
/// that threads serving hits of one age would contend on (the values are
/// static).
fn age_value(secs: u64) -> HeaderValue {
    static MADE: std::sync::LazyLock<Box<[HeaderValue]>> = std::sync::LazyLock::new(|| {
        (0..AGES_MADE)
            .map(|n| HeaderValue::from_static(String::leak(n.to_string())))
            .collect()
    });
    usize::try_from(secs)
        .ok()
        .and_then(|i| MADE.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(secs))
}

/// Drops from the fields of a 200 those a 304 made of it should not carry:
/// the body's description (RFC 9110 §15.4.5 keeps ETag, Vary, the caching
/// fields and Content-Location; Last-Modified stays to guide the updates
/// of caches that lack an ETag). nginx's `not_modified` filter drops the
/// same, and Accept-Ranges, which says what ranges of a body can be asked.
pub(super) fn strip_for_304(headers: &mut HeaderMap) {
    for name in NOT_FOR_304 {
        headers.remove(name);
    }
}

/// What [`strip_for_304`] drops; `Content-Range` for a 304 judged on a
/// backend's 206 (review55 L1: a cache in front would merge it into the
/// 200 it holds).
const NOT_FOR_304: [header::HeaderName; 6] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::ACCEPT_RANGES,
    header::CONTENT_RANGE,
];

/// [`strip_for_304`], keeping what it dropped for compression's `Vary`
/// (see [`Stripped`]): for a 304 not made of a hit's entry, which
/// compression judges by itself.
pub(super) fn stripped_for_304(headers: &mut HeaderMap) -> Stripped {
    let mut dropped = HeaderMap::new();
    for name in NOT_FOR_304 {
        if let Some(value) = headers.remove(&name) {
            dropped.insert(name, value);
        }
    }
    Stripped(dropped)
}

/// Turns the fields of a 200 of `len` bytes into those of the 206 or 416
/// `answer` makes of it (RFC 9110 §14.4, §15.5.17): its status, and where
/// the bytes it keeps start and how many they are. None for `Full`.
pub(super) fn range_fields(
    headers: &mut HeaderMap,
    answer: RangeAnswer,
    len: usize,
) -> Option<(StatusCode, usize, usize)> {
    let (code, content_range, start, count) = match answer {
        RangeAnswer::Full => return None,
        RangeAnswer::Partial { start, end } => (
            StatusCode::PARTIAL_CONTENT,
            format!("bytes {start}-{end}/{len}"),
            start,
            end + 1 - start,
        ),
        RangeAnswer::Unsatisfiable => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("bytes */{len}"),
            len,
            0,
        ),
    };
    if let Ok(value) = HeaderValue::from_str(&content_range) {
        headers.insert(header::CONTENT_RANGE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    // The backend's `Accept-Ranges: none` is about itself: copied onto a
    // range portico cut, it said the range could not be (range53 L2).
    if headers.contains_key(header::ACCEPT_RANGES) {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    Some((code, start, count))
}

/// The 504 for `only-if-cached` when nothing usable is stored: a miss,
/// though not forwarded (RFC 9211 §2.2: no `fwd`).
pub(super) fn only_if_cached_miss(cache: &Cache) -> Response<ProxyBody> {
    cache.counters.miss.inc();
    only_if_cached_answer()
}

fn only_if_cached_answer() -> Response<ProxyBody> {
    let mut response = crate::proxy::error::error_response(StatusCode::GATEWAY_TIMEOUT);
    set_status(&mut response, "portico; detail=only-if-cached");
    response
}

/// The 504 for `only-if-cached` on a GET or HEAD the cache passes by
/// (with content, a method override, an upgrade, a loop), which must not
/// be forwarded either (RFC 9111 §5.2.1.7; cache53 L2). None without it:
/// a look at `Cache-Control` only when the field is there.
/// Counted a bypass, as such a request is (review56 L3: as a miss, it
/// lowered the hit ratio with no lookup made).
pub fn only_if_cached_bypass(
    cache: &Cache,
    request: &http::HeaderMap,
) -> Option<Response<ProxyBody>> {
    (request.contains_key(header::CACHE_CONTROL)
        && crate::cache::policy::parse_request(request).only_if_cached)
        .then(|| only_if_cached_passed(cache))
}

/// The 504 for `only-if-cached` on a request the cache does not look up
/// (see [`only_if_cached_bypass`]; `no-store` too), counted a bypass.
pub(super) fn only_if_cached_passed(cache: &Cache) -> Response<ProxyBody> {
    cache.counters.bypass.inc();
    only_if_cached_answer()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::{CacheControl, Timing};
    use crate::test_support::headers;

    #[test]
    fn if_match_then_if_unmodified_since_decide_412() {
        let stored = headers(&[
            ("etag", "\"s1\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ]);
        let before = "Sun, 31 Dec 2023 00:00:00 GMT";
        let after = "Tue, 02 Jan 2024 00:00:00 GMT";
        for (request, failed) in [
            (vec![("if-match", "\"s1\"")], false),
            (vec![("if-match", "\"x\", \"s1\"")], false),
            (vec![("if-match", "*")], false),
            (vec![("if-match", "\"nope\"")], true),
            // Strong comparison: a weak tag never matches.
            (vec![("if-match", "W/\"s1\"")], true),
            (vec![("if-unmodified-since", before)], true),
            (vec![("if-unmodified-since", after)], false),
            (vec![("if-unmodified-since", "not a date")], false),
            // If-Match wins over If-Unmodified-Since (§13.2.2).
            (
                vec![("if-match", "\"s1\""), ("if-unmodified-since", before)],
                false,
            ),
            (vec![], false),
        ] {
            assert_eq!(
                precondition_failed(&headers(&request), &stored),
                failed,
                "{request:?}"
            );
        }
        // A comma inside a tag is part of it.
        let comma = headers(&[("etag", "\"a,b\"")]);
        assert!(!precondition_failed(
            &headers(&[("if-match", "\"a,b\"")]),
            &comma
        ));
        assert!(precondition_failed(
            &headers(&[("if-match", "\"a\", \"b\"")]),
            &comma
        ));
        assert!(not_modified(
            &headers(&[("if-none-match", "\"x\", W/\"a,b\"")]),
            &comma
        ));
        assert_eq!(
            tag_list(" \"a,b\" , W/\"c\",*").collect::<Vec<_>>(),
            ["\"a,b\"", "W/\"c\"", "*"]
        );
        let weak = headers(&[("etag", "W/\"s1\"")]);
        assert!(precondition_failed(
            &headers(&[("if-match", "W/\"s1\"")]),
            &weak
        ));
        assert!(!precondition_failed(&headers(&[("if-match", "*")]), &weak));
        // `*` matches what is stored, entity tag or not (review28b F3).
        let untagged = headers(&[("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")]);
        assert!(not_modified(&headers(&[("if-none-match", "*")]), &untagged));
        assert!(!not_modified(
            &headers(&[("if-none-match", "\"a\"")]),
            &untagged
        ));
    }

    /// An `If-Modified-Since` later than now is invalid (RFC 9110
    /// §13.1.3): the content, not a 304 (review34e).
    #[test]
    fn a_modified_since_date_in_the_future_is_ignored() {
        let day = Duration::from_secs(24 * 3600);
        let now = std::time::SystemTime::now();
        let at = |t| httpdate::fmt_http_date(t);
        let stored = headers(&[("last-modified", &at(now - day * 2))]);
        let since = |t| headers(&[("if-modified-since", &at(t))]);
        assert!(not_modified(&since(now - day), &stored));
        assert!(!not_modified(&since(now - day * 3), &stored));
        assert!(!not_modified(&since(now + day), &stored));
    }

    /// A stored entry carries the fields a hit is served with, so a hit
    /// replaces `Age` where it stands and appends nothing (`Entry::new`);
    /// each kind of answer still has the fields it should.
    #[test]
    fn a_hit_replaces_its_fields_in_place() {
        let now = std::time::SystemTime::now();
        let stored = headers(&[("etag", "\"v1\""), ("cache-control", "max-age=60")]);
        let entry = Entry::new(
            StatusCode::OK,
            None,
            stored,
            bytes::Bytes::from_static(b"0123456789"),
            Timing::new(&HeaderMap::new(), now, now),
            Duration::from_secs(60),
            CacheControl::default(),
        );
        let request = |method: Method, fields: &[(&str, &str)]| {
            let mut request = http::Request::builder()
                .method(method)
                .uri("/")
                .body(())
                .unwrap();
            *request.headers_mut() = headers(fields);
            request.into_parts().0
        };
        let fields = |response: &Response<ProxyBody>| {
            response
                .headers()
                .iter()
                .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        let hit = from_entry(
            &entry,
            Duration::from_secs(7),
            &request(Method::GET, &[]),
            HIT,
        );
        assert_eq!(hit.status(), StatusCode::OK);
        assert_eq!(
            fields(&hit),
            [
                "etag: \"v1\"",
                "cache-control: max-age=60",
                "age: 7",
                "content-length: 10",
                "cache-status: portico; hit",
            ]
        );
        // No room was made: the fields were there to replace.
        assert_eq!(hit.headers().len(), entry.headers.len());
        let head = from_entry(&entry, Duration::ZERO, &request(Method::HEAD, &[]), HIT);
        assert_eq!(head.headers()["content-length"], "10");
        assert_eq!(head.headers()["age"], "0");
        let stale = "portico; hit; detail=stale-while-revalidate";
        let served = from_entry(
            &entry,
            Duration::from_secs(9000),
            &request(Method::GET, &[]),
            stale,
        );
        assert_eq!(served.headers()["age"], "9000");
        assert_eq!(served.headers()["cache-status"], stale);
        let conditional = request(Method::GET, &[("if-none-match", "\"v1\"")]);
        let not_modified = from_entry(&entry, Duration::ZERO, &conditional, HIT);
        assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
        assert!(!not_modified.headers().contains_key("content-length"));
        let ranged = request(Method::GET, &[("range", "bytes=2-4")]);
        let partial = from_entry(&entry, Duration::ZERO, &ranged, HIT);
        assert_eq!(partial.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(partial.headers()["content-length"], "3");
        assert_eq!(partial.headers()["content-range"], "bytes 2-4/10");
        // Ages past those made in advance are written as they come.
        for secs in [0, 1, AGES_MADE - 1, AGES_MADE, u64::MAX] {
            assert_eq!(age_value(secs), secs.to_string().as_str());
        }
    }
}
