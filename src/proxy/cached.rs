//! A GET or HEAD on a caching route: answer from the cache when RFC 9111
//! allows, revalidate or fetch when it does not, coalesce concurrent misses,
//! and say what happened in `Cache-Status` (RFC 9211).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::body::{ProxyBody, RequestBody};
use super::error::ProxyError;
use super::headers::{self, Hop};
use super::{forward_with_retries, Trace};
use crate::cache::capture::{self, Capture, Head};
use crate::cache::fill::Fill;
use crate::cache::lock::{self, Claim, Leader, Locks};
use crate::cache::policy::{self, CacheControl, Timing, Usable};
use crate::cache::range::{self, RangeAnswer};
use crate::cache::{key, Cache, Entry};
use crate::task::{Places, ReadPermit};
use crate::upstream::health::InFlight;
use crate::upstream::Upstream;
use crate::upstream::UpstreamBody;

/// Longest a coalesced request waits for the leader before fetching itself.
const COALESCE_WAIT: Duration = Duration::from_secs(5);

/// How long requests wait on a revalidation of an entry stale-if-error may
/// serve: as long as the revalidation can take (its connects, each retried,
/// and its response timeouts: one per backend it may try under
/// `retry_on_timeout`, review50b L1, each as late as the backend
/// connection's watch may find it, review51 M1), at least
/// [`COALESCE_WAIT`]. Whatever it gets, they are answered from it, so
/// behind a hung backend each no longer left at 5 s to wait its own
/// `response_timeout` on the same backend (review33c M2).
fn revalidation_wait(config: &crate::config::Upstream) -> Duration {
    let connects = config.connect_timeout * (config.retries + 1);
    let heads = match config.retry_on_timeout {
        true => (config.retries + 1).min(config.backends.len().max(1) as u32),
        false => 1,
    };
    let head = crate::upstream::latest_head_timeout(config.response_timeout, config.body_timeout);
    (connects + head * heads + Duration::from_secs(1)).max(COALESCE_WAIT)
}

pub use crate::cache::CACHE_STATUS;
use crate::cache::HIT;

fn set_status(response: &mut Response<ProxyBody>, ours: &str) {
    add_status(response.headers_mut(), ours);
}

/// Adds portico's member to `Cache-Status`. A backend's own members (a
/// cache behind portico) stay in front of it: RFC 9211 §2 lists caches from
/// the origin to the client. Entries are stored without them, so a hit
/// carries portico's member alone, built without a merge.
pub(super) fn add_status(headers: &mut HeaderMap, ours: &str) {
    add_member(headers, ours, || HeaderValue::from_str(ours).ok());
}

/// [`add_status`] for a fixed value: no copy when it stands alone.
pub(super) fn add_static_status(headers: &mut HeaderMap, ours: &'static str) {
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

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<std::time::SystemTime> {
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
fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
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
fn precondition_failed(request: &HeaderMap, stored: &HeaderMap) -> bool {
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
enum Made {
    /// 412.
    Failed,
    /// 304.
    NotModified,
    /// A 206 or 416 of a stored 200.
    Part(RangeAnswer),
    /// The stored response (for a HEAD, without its body).
    Whole,
}

/// What `entry` answers `request` with.
fn made_of(entry: &Entry, request: &Parts) -> Made {
    // RFC 9110 §13.2.1: preconditions apply only where the answer would
    // be a 2xx; a stored 404 or 301 is served as it is.
    if entry.status.is_success() {
        if precondition_failed(&request.headers, &entry.headers) {
            return Made::Failed;
        }
        if not_modified(&request.headers, &entry.headers) {
            return Made::NotModified;
        }
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
fn from_entry(entry: &Entry, age: Duration, request: &Parts, status: &str) -> Response<ProxyBody> {
    let head = request.method == Method::HEAD;
    made_response(entry, age, head, status, made_of(entry, request))
}

/// The response `made` of `entry`, `age` old, with `status` for its
/// `Cache-Status`.
fn made_response(
    entry: &Entry,
    age: Duration,
    head: bool,
    status: &str,
    made: Made,
) -> Response<ProxyBody> {
    if let Made::Failed = made {
        let mut response = super::error::error_response(StatusCode::PRECONDITION_FAILED);
        set_status(&mut response, status);
        with_fwd_status(response.headers_mut(), entry.status);
        return response;
    }
    // With `Content-Length` and `Cache-Status` as a fresh hit has them,
    // and `Age` to replace (`Entry::new`).
    let mut headers = entry.headers.clone();
    let len = entry.body.len();
    let part = match made {
        Made::NotModified => {
            strip_for_304(&mut headers);
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

/// The body of a whole answer made of `of` (a stored response or its
/// gzip copy): none for a HEAD.
fn whole_body(of: &Entry, head: bool) -> ProxyBody {
    if head {
        ProxyBody::empty()
    } else {
        ProxyBody::full(of.body.clone())
    }
}

/// A response of `entry` with status `code`, its `headers` (the stored
/// fields, made into a 304's or a range's, or its gzip copy's) and
/// `body`, `age` old.
fn stored_response(
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
fn strip_for_304(headers: &mut HeaderMap) {
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::ACCEPT_RANGES,
    ] {
        headers.remove(name);
    }
}

/// Turns the fields of a 200 of `len` bytes into those of the 206 or 416
/// `answer` makes of it (RFC 9110 §14.4, §15.5.17): its status, and where
/// the bytes it keeps start and how many they are. None for `Full`.
fn range_fields(
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
    Some((code, start, count))
}

/// The 504 for `only-if-cached` when nothing usable is stored: a miss,
/// though not forwarded (RFC 9211 §2.2: no `fwd`).
fn only_if_cached_miss(cache: &Cache) -> Response<ProxyBody> {
    cache.counters.miss.inc();
    let mut response = super::error::error_response(StatusCode::GATEWAY_TIMEOUT);
    set_status(&mut response, "portico; detail=only-if-cached");
    response
}

/// How a wait on another request's fetch of the same URL ended. Matched
/// as soon as it is returned, as [`Joined`] is.
#[allow(clippy::large_enum_variant)]
enum Woken {
    /// It stored a response fresh enough for this request.
    Answered(Response<ProxyBody>),
    /// It finished with nothing this request can use: the next fetch may.
    /// `handed_on` when it stored nothing at all (its answer was its own
    /// request's, its client left), rather than something for others.
    Nothing { handed_on: bool },
    /// It stored what this request asked for, from a fetch sent before the
    /// request came, and not fresh enough for it: the next fetch will be
    /// sent after.
    Earlier,
    /// It let the waiters go (nothing it gets will be stored), or was not
    /// done by the deadline.
    Alone,
    /// It let the waiters go with an answer that replaced the copy stored
    /// for the variant (see [`Leader::release_replacing`]).
    Replaced,
}

/// Waits (until `deadline`) for the request fetching its URL to finish,
/// then answers from what is stored if that serves this request: fresh
/// for it, or the entry that very fetch stored, if the fetch was sent
/// after this request `arrived`, whatever it asked (`no-cache`,
/// `max-age=0`) and whatever the entry's own freshness: a copy the origin
/// gave or vouched for when asked after the request came is what it would
/// have got itself (nginx and Varnish serve coalesced waiters alike).
///
/// Sent after, not answered after: a check sent before the request came
/// may carry what the origin held before a change the client made and
/// then reloaded to see (review47c's stale reads: a `no-cache` reload
/// answered with the old page, `fwd=request; collapsed`). Such a waiter
/// is told [`Woken::Earlier`] and waits on the next check, which all the
/// requests that came during this one share: one check at a time per
/// URL, each request normally answered by the second.
#[allow(clippy::too_many_arguments)]
async fn collapsed(
    cache: &Arc<Cache>,
    waiting: tokio::sync::watch::Receiver<lock::Signal>,
    deadline: tokio::time::Instant,
    arrived: std::time::SystemTime,
    primary: &str,
    parts: &Parts,
    request_cc: &CacheControl,
    status: &str,
) -> Woken {
    let leaders = match lock::wait(waiting, deadline).await {
        lock::Waited::Done(stored) => stored,
        lock::Waited::Failed(code) => return stale_for_waiter(cache, primary, parts, code).await,
        lock::Waited::Released(true) => return Woken::Replaced,
        lock::Waited::Released(false) | lock::Waited::Late => return Woken::Alone,
    };
    let nothing = Woken::Nothing {
        handed_on: leaders.is_none(),
    };
    let Some((entry, age)) = stored_for(cache, primary, parts).await else {
        return nothing;
    };
    // The leader's own entry (not one another request stored meanwhile,
    // say an Authorization request's `must-revalidate` answer), asked for
    // after this request came.
    let timing = &entry.timing;
    let leaders = leaders == Some(timing.response_time);
    let since = leaders && timing.request_time >= arrived;
    if !since && policy::usable(entry.lifetime, age, &entry.cc, request_cc) != Usable::Fresh {
        return if leaders { Woken::Earlier } else { nothing };
    }
    cache.counters.hit.inc();
    Woken::Answered(from_entry(&entry, age, parts, status))
}

/// What is stored for a waiter's variant of `primary` once the fetch it
/// waited on is done, and its age.
async fn stored_for(cache: &Cache, primary: &str, parts: &Parts) -> Option<(Arc<Entry>, Duration)> {
    let full = cache.key_for(primary, &parts.headers)?;
    let entry = cache.get(&full).await?;
    let age = entry.timing.current_age(cache.now());
    Some((entry, age))
}

/// What is stored for the request's variant now, with the `fwd` its
/// check would say (see [`checked`]): what a request that waited on
/// another's fetch revalidates.
async fn stored_now(
    cache: &Cache,
    primary: &str,
    parts: &Parts,
) -> Option<(&'static str, Arc<Entry>)> {
    let (entry, age) = stored_for(cache, primary, parts).await?;
    Some((checked(&entry, age), entry))
}

/// The stale copy for a request that waited on a revalidation that failed
/// with `code`, if stale-if-error still allows it, as it allowed it the
/// leader; else the request fetches on its own. Before, every waiter went
/// to the failing backend itself: 20 clients made 21 requests of a backend
/// answering 503, and behind a hung one each waited its own
/// `response_timeout` (review33b F2).
async fn stale_for_waiter(cache: &Cache, primary: &str, parts: &Parts, code: u16) -> Woken {
    let Some((entry, age)) = stored_for(cache, primary, parts).await else {
        return Woken::Alone;
    };
    let Ok(code) = StatusCode::from_u16(code) else {
        return Woken::Alone;
    };
    if !policy::stale_if_error(entry.lifetime, age, &entry.cc) {
        return Woken::Alone;
    }
    Woken::Answered(stale_on_error(
        cache,
        &entry,
        age,
        parts,
        "stale",
        code,
        "; collapsed",
    ))
}

/// What the store holds for a GET or HEAD, found before anything is
/// fetched.
pub(super) enum Lookup {
    /// Answered from the store: a hit, a stale-while-revalidate hit (with
    /// no entry asked for), or only-if-cached's 504.
    Answered(Response<ProxyBody>),
    /// A hit or a stale-while-revalidate hit, with the entry it was made
    /// of, when asked for (see [`lookup`]).
    Hit(Response<ProxyBody>, Stored),
    /// A fresh hit answered with the stored response itself, when the
    /// entry was asked for: not made yet, for the gzip copy kept beside it
    /// may be sent instead.
    Fresh(Fresh),
    /// The backend is needed: [`serve`] goes on from here.
    Forward(Looked),
}

/// A fresh hit whose answer is the stored response itself (no 304, no
/// range, no failed precondition), for a client that takes gzip on a
/// compressing route: the gzip copy kept beside it is sent with the head
/// kept with it (`compress::Compressor::copy_hit`), with no copy of the
/// stored fields made and changed first (~3,500 instructions a hit);
/// else it is [`Fresh::answer`]ed as any hit.
pub(super) struct Fresh {
    pub stored: Stored,
    age: Duration,
    head: bool,
}

impl Fresh {
    /// The stored response, as [`from_entry`] makes a fresh hit.
    pub fn answer(self) -> (Response<ProxyBody>, Stored) {
        let response = made_response(&self.stored.entry, self.age, self.head, HIT, Made::Whole);
        (response, self.stored)
    }

    /// The gzip `copy` kept beside the stored response, with its head.
    pub fn answer_from(self, copy: &Entry) -> Response<ProxyBody> {
        let entry = &self.stored.entry;
        let body = whole_body(copy, self.head);
        stored_response(entry, entry.status, self.age, copy.headers.clone(), body)
    }
}

/// The entry a hit was made of, and its key: what a gzip copy is kept
/// beside (`compress::Compressor::apply_stored`).
pub(super) struct Stored {
    pub key: String,
    pub entry: Arc<Entry>,
    /// Fresh, not served stale while it is refreshed: a copy made of an
    /// entry about to be replaced would be dropped with it.
    pub fresh: bool,
}

/// What [`lookup`] learnt, for [`serve`].
pub(super) struct Looked {
    request_cc: CacheControl,
    primary: String,
    /// `miss` or `vary-miss` (RFC 9211).
    miss: &'static str,
    /// A stored response that must be revalidated first, and its age.
    stale: Option<(Arc<Entry>, Duration)>,
}

/// Looks a GET or HEAD up in the cache. Apart from [`serve`], so that a
/// hit is answered by a small future: `serve`'s is kilobytes, boxed, and
/// made only when the backend is needed. A hit comes with its entry
/// ([`Lookup::Hit`]) when `with_entry`.
pub(super) async fn lookup(
    cache: &Arc<Cache>,
    upstream: &Arc<Upstream>,
    parts: &Parts,
    (scheme, host): (&str, &str),
    hop: impl FnOnce() -> Hop,
    with_entry: bool,
) -> Lookup {
    let request_cc = policy::parse_request(&parts.headers);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let primary = key::primary(scheme, host, path);
    // RFC 9211 `vary-miss`: the URL has stored variants, none for this
    // request's Vary fields or forwarded host (not this one expired or
    // evicted: a `miss`).
    let mut miss = "miss";
    let mut stale = None;
    if !request_cc.no_store {
        let full = cache.key_for(&primary, &parts.headers);
        let found = match &full {
            Some(full) => {
                let found = cache.get(full).await;
                if found.is_none() && cache.lists_others_only(&primary, full) {
                    miss = "vary-miss";
                }
                found
            }
            None => None,
        };
        let answer = |full, response, entry: Arc<Entry>, fresh| match full {
            Some(key) if with_entry => Lookup::Hit(response, Stored { key, entry, fresh }),
            _ => Lookup::Answered(response),
        };
        match found {
            None if request_cc.only_if_cached => {
                return Lookup::Answered(only_if_cached_miss(cache))
            }
            None => {}
            Some(entry) => {
                let age = entry.timing.current_age(cache.now());
                match policy::usable(entry.lifetime, age, &entry.cc, &request_cc) {
                    Usable::Fresh => {
                        cache.counters.hit.inc();
                        let head = parts.method == Method::HEAD;
                        return match (full, made_of(&entry, parts)) {
                            (Some(key), Made::Whole) if with_entry => {
                                let stored = Stored {
                                    key,
                                    entry,
                                    fresh: true,
                                };
                                Lookup::Fresh(Fresh { stored, age, head })
                            }
                            (full, made) => {
                                let response = made_response(&entry, age, head, HIT, made);
                                answer(full, response, entry, true)
                            }
                        };
                    }
                    Usable::StaleWhileRevalidate => {
                        cache.counters.stale.inc();
                        let mut head = super::copy_head(parts);
                        headers::add_hop(&mut head.headers, hop());
                        tokio::spawn(refresh(
                            cache.clone(),
                            upstream.clone(),
                            primary.clone(),
                            head,
                            entry.clone(),
                        ));
                        let response = from_entry(
                            &entry,
                            age,
                            parts,
                            "portico; hit; detail=stale-while-revalidate",
                        );
                        return answer(full, response, entry, false);
                    }
                    // RFC 9111 §5.2.1.7: a stored response that needs the
                    // backend is not one only-if-cached may have.
                    Usable::MustRevalidate if request_cc.only_if_cached => {
                        return Lookup::Answered(only_if_cached_miss(cache));
                    }
                    Usable::MustRevalidate => stale = Some((entry, age)),
                }
            }
        }
    }
    Lookup::Forward(Looked {
        request_cc,
        primary,
        miss,
        stale,
    })
}

/// Serves a GET or HEAD the cache could not answer by itself (see
/// [`lookup`]): revalidates, fetches and stores, or bypasses.
pub(super) async fn serve(
    cache: &Arc<Cache>,
    upstream: &Arc<Upstream>,
    mut parts: Parts,
    body: RequestBody,
    looked: Looked,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Looked {
        request_cc,
        primary,
        miss,
        stale,
    } = looked;
    if request_cc.no_store {
        return bypass(cache, upstream, parts, body, trace).await;
    }
    // A byte range is served from a fresh stored response (by `lookup`); a
    // miss or a revalidation asks for the whole response and cuts the range
    // from what it gets (see `whole_for_range`). A range portico does not
    // serve itself goes to the backend untouched.
    let ranged = asks_range(&parts);
    if ranged && !whole_for_range(cache, &primary, &parts, &body) {
        return bypass(cache, upstream, parts, body, trace).await;
    }
    // Waits on another request's fetch of the URL (see `join`).
    let join_as = |miss, status, wait| {
        join(
            cache,
            &primary,
            &parts,
            &request_cc,
            ranged,
            miss,
            status,
            wait,
        )
    };
    // Set when the revalidation this request waited on removed the copy
    // it looked up: it is a miss now, on its own.
    let mut replaced = false;
    // The lock taken to revalidate an entry that was gone by then: it is
    // a miss now, fetched with that lock.
    let mut taken = None;
    if let Some((entry, age)) = stale {
        let fwd = checked(&entry, age);
        let status = if fwd == "request" {
            "portico; fwd=request; collapsed"
        } else {
            "portico; fwd=stale; collapsed"
        };
        // Requests for a stale entry revalidate it once between them, as
        // misses fetch once; so do clients that asked to revalidate a
        // fresh one (`no-cache`, `max-age=0`: a browser's reload), each
        // answered by a check sent after it came. Each had its own: 30
        // reloads at once were 30 requests to the origin, and with 200s
        // 30 rewrites of the entry (review34e 2).
        let wait = if policy::stale_if_error(entry.lifetime, age, &entry.cc) {
            revalidation_wait(&upstream.config)
        } else {
            COALESCE_WAIT
        };
        match join_as(false, status, wait).await {
            Joined::Fetch { leader, waited } => {
                // Having waited on another's check, it revalidates what
                // is stored now, that check's answer, not what it looked
                // up before (review48d M1: sent the old tag, and under
                // stale-if-error served the old page beside the new one).
                // Gone meanwhile (evicted, purged, or its variants
                // dropped by a new Vary), it is a miss: its old validators
                // would bring back what was dropped (review48e L1).
                let checking = if waited {
                    stored_now(cache, &primary, &parts).await
                } else {
                    Some((fwd, entry))
                };
                match checking {
                    Some((fwd, entry)) => {
                        return revalidate(
                            cache, upstream, primary, parts, entry, request_cc, fwd, leader, trace,
                        )
                        .await;
                    }
                    None => taken = Some(leader),
                }
            }
            Joined::Answered(hit) => return Ok(hit),
            Joined::Bypass => return bypass(cache, upstream, parts, body, trace).await,
            // The revalidation it waited on removed the copy it looked up
            // (a 410, a `no-store` 200). Revalidated still, with its
            // validators, a 304 or a 5xx under stale-if-error brought the
            // removed page back to every waiter (review37f M1).
            Joined::Replaced => replaced = true,
        }
    }
    let status = "portico; fwd=miss; collapsed";
    let leader = if let Some(leader) = taken {
        leader
    } else if replaced {
        None
    } else {
        match join_as(true, status, COALESCE_WAIT).await {
            // It found nothing, then waited on a fetch that did not answer
            // it (sent before it came, as for a burst of reloads): what
            // that fetch stored, if it can be asked about, is revalidated,
            // where it was fetched whole again.
            Joined::Fetch {
                leader,
                waited: true,
            } => match stored_now(cache, &primary, &parts).await {
                Some((fwd, entry)) if policy::has_validator(&entry.headers) => {
                    return revalidate(
                        cache, upstream, primary, parts, entry, request_cc, fwd, leader, trace,
                    )
                    .await;
                }
                _ => leader,
            },
            Joined::Fetch { leader, .. } => leader,
            Joined::Answered(hit) => return Ok(hit),
            Joined::Bypass => return bypass(cache, upstream, parts, body, trace).await,
            // Another miss's answer replaced what a waiter could not use
            // anyway: on its own, as a released one goes.
            Joined::Replaced => None,
        }
    };
    cache.counters.miss.inc();
    // The client's own head, kept to cut its range from the whole answer
    // (a follower above was answered from the store with its range).
    let asked = ranged.then(|| {
        let asked = super::copy_head(&parts);
        without_range(&mut parts.headers);
        asked
    });
    // The client's own head, when the fetch asks for what can be stored
    // instead (a GET for a HEAD, no validators), to answer it from that.
    let own = if ranged {
        None
    } else {
        storable_fetch(cache, &primary, &mut parts)
    };
    let mut fetch = Fetch {
        request_headers: parts.headers.clone(),
        request_cc,
        is_head: parts.method == Method::HEAD,
        fill: cache.begin_fill(primary),
        request_time: cache.now(),
        leader,
        fwd: miss,
    };
    trace.fwd = Some(miss);
    let forwarded = forward_with_retries(
        upstream,
        std::mem::replace(&mut parts, empty_parts()),
        body,
        trace,
    )
    .await;
    let (response, in_flight) = match forwarded {
        Ok(answer) => answer,
        Err(error) => {
            release(fetch.leader.as_ref());
            return Err(error);
        }
    };
    fetch.request_time = answered_request_time(cache, fetch.request_time, trace);
    // A miss: no copy to forget.
    let (mut response, leader) = fetch.store_or_relay(cache, upstream, response, in_flight);
    drop(leader);
    if let Some(own) = own {
        response = answer_own(own, response);
    }
    match asked {
        // Boxed: only ranges take this path, and inline its future would
        // grow every cached request's (hits included) by a second fetch's.
        Some(asked) => Box::pin(cut_range(cache, upstream, asked, response, trace)).await,
        None => Ok(response.map(ProxyBody::read_ahead)),
    }
}

/// The `request_time` of the request that got the answer (RFC 9111
/// §4.2.3): the last retry's sending when there was one. A failed
/// attempt's time is no transit delay; counted as one, it aged a retried
/// response by a whole `connect_timeout`, and a `max-age=1` one was not
/// stored at all while a backend was black-holed (review32a L1).
fn answered_request_time(
    cache: &Cache,
    asked: std::time::SystemTime,
    trace: &Trace,
) -> std::time::SystemTime {
    trace
        .retried_at
        .map_or(asked, |at| cache.now() - at.elapsed())
}

/// Makes a miss's request one whose answer the cache can store, as nginx
/// does (`proxy_cache_convert_head`, and the client's validators left out
/// of a cacheable request; Varnish the same): a GET for a HEAD, without
/// `If-None-Match`/`If-Modified-Since`, whose 304 nobody else could use.
/// Returns the client's own head if anything changed, for [`answer_own`],
/// with the place among the background reads its body will need.
///
/// Not for a URL whose last answer was not stored (nothing would be), nor
/// when the background reads are all taken (the body would be fetched
/// for nothing).
fn storable_fetch(cache: &Cache, primary: &str, parts: &mut Parts) -> Option<Own> {
    let head = parts.method == Method::HEAD;
    // Nor for a request with Authorization: its answer is rarely stored,
    // and never noted as such (see `store_or_relay`).
    if !wants_converting(parts)
        || parts.headers.contains_key(header::AUTHORIZATION)
        || cache.uncacheable(primary, &parts.headers)
    {
        return None;
    }
    let permit = ReadPermit::try_take()?;
    let client = super::copy_head(parts);
    parts.method = Method::GET;
    without_validators(&mut parts.headers);
    // A HEAD's Range means nothing (RFC 9110 §14.2); the GET's would.
    if head {
        without_range(&mut parts.headers);
    }
    Some(Own {
        client,
        permit: Some(permit),
    })
}

/// Whether the request's own answer could not be stored: a HEAD's, or a
/// 304 to the client's `If-None-Match`/`If-Modified-Since`.
fn wants_converting(parts: &Parts) -> bool {
    parts.method == Method::HEAD || carries_validators(&parts.headers)
}

/// Whether a request with these fields could get a 304 to them.
fn carries_validators(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_NONE_MATCH) || headers.contains_key(header::IF_MODIFIED_SINCE)
}

/// Takes off the fields that could get a request a 304 to them.
fn without_validators(headers: &mut HeaderMap) {
    headers.remove(header::IF_NONE_MATCH);
    headers.remove(header::IF_MODIFIED_SINCE);
}

/// A client answered from a fetch made for the cache ([`answer_own`]).
struct Own {
    /// Its own head.
    client: Parts,
    /// The place for a body it does not take, if one was reserved.
    permit: Option<ReadPermit>,
}

/// The answer to the client whose HEAD or conditional GET was fetched as
/// a plain GET ([`storable_fetch`]): its head alone for a HEAD, a 304 when
/// its validators match (RFC 9110 §13.2.1, only where a 2xx would be the
/// answer), else the response itself. A body left unsent goes on into the
/// cache by a background read (in the place reserved for it, else one
/// taken now if any is free); one not being stored is dropped.
fn answer_own(own: Own, response: Response<ProxyBody>) -> Response<ProxyBody> {
    let Own { client, permit } = own;
    let matched =
        response.status().is_success() && not_modified(&client.headers, response.headers());
    if client.method != Method::HEAD && !matched {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    if body.is_capturing() {
        match permit {
            Some(permit) => crate::task::spawn_permitted_read(permit, body.read_into_cache()),
            None => crate::task::spawn_background_read(body.read_into_cache()),
        }
    }
    if matched {
        // RFC 9211 §2.3: without it, the 304 would read as the backend's.
        with_fwd_status(&mut parts.headers, parts.status);
        restatus(&mut parts, StatusCode::NOT_MODIFIED);
        strip_for_304(&mut parts.headers);
    }
    Response::from_parts(parts, ProxyBody::empty())
}

/// Gives a backend's response a status of portico's making, without the
/// backend's reason phrase, which was for its own status (`206 OK`).
fn restatus(parts: &mut http::response::Parts, status: StatusCode) {
    parts.status = status;
    parts.extensions.remove::<hyper::ext::ReasonPhrase>();
}

/// Adds `fwd-status` to portico's `Cache-Status` member if it has none.
fn with_fwd_status(headers: &mut HeaderMap, status: StatusCode) {
    let Some(text) = text(headers, CACHE_STATUS.clone()) else {
        return;
    };
    let Some(ours) = text.rfind("portico") else {
        return;
    };
    if text[ours..].contains("fwd-status=") {
        return;
    }
    // After the `fwd` parameter, which is first.
    let Some(fwd) = text[ours..].find("fwd=").map(|at| ours + at) else {
        return;
    };
    let end = text[fwd..].find(';').map_or(text.len(), |at| fwd + at);
    let value = format!(
        "{}; fwd-status={}{}",
        &text[..end],
        status.as_u16(),
        &text[end..]
    );
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(CACHE_STATUS.clone(), value);
    }
}

/// How a request joins the fetches for its URL (see [`Locks::claim`]).
/// Matched as soon as it is returned, so a response inline costs nothing.
#[allow(clippy::large_enum_variant)]
enum Joined {
    /// Fetch: as the leader the others wait on, or (the one it waited on
    /// being slow) on its own; `waited` when it waited on another's fetch
    /// first, which may have stored what it is to fetch or revalidate.
    Fetch {
        leader: Option<Leader>,
        waited: bool,
    },
    /// It waited, and the response the leader stored answered it.
    Answered(Response<ProxyBody>),
    /// It waited for a slow fetch and asks for a range: it goes to the
    /// backend with its range rather than start another whole fetch.
    Bypass,
    /// It waited on a fetch whose answer replaced the copy stored for the
    /// variant: whatever it looked up is gone, and it fetches as a miss,
    /// on its own.
    Replaced,
}

/// Concurrent fetches of one variant wait for the first, the leader (see
/// [`Locks::claim`]). One that stored nothing for a waiter (another
/// variant; its client gone before the answer) hands the lock on: the
/// waiters claim it again, now by their own variant's key, and one of each
/// fetches next, as with nginx's `proxy_cache_lock`. A leader whose answer
/// nobody may store, or whose fetch failed, lets them all go at once, as
/// Varnish's hit-for-miss does; so does a URL whose last answer was not
/// stored, with no wait at all. A request with `Authorization`, whose
/// answer may serve no one else, leads only when it comes first; handed
/// the lock on, it waits on another's fetch if one has begun (what that
/// stores for everyone answers it too), else fetches alone. So, once a
/// lock was handed on, does a
/// HEAD or conditional GET on a `miss` that would not be fetched as a
/// plain GET (a range, or no background read free): its answer would be
/// its own. Waiting ends at `wait` in all ([`COALESCE_WAIT`], or behind a
/// revalidation stale-if-error covers [`revalidation_wait`]), renewed once
/// when the fetch waited on was sent before the request came (so at most
/// twice that), after which the request fetches on its own.
#[allow(clippy::too_many_arguments)]
async fn join(
    cache: &Arc<Cache>,
    primary: &str,
    parts: &Parts,
    request_cc: &CacheControl,
    ranged: bool,
    miss: bool,
    status: &'static str,
    wait: Duration,
) -> Joined {
    // A range goes past the cache on a miss, rather than start another
    // whole fetch; on a revalidation, it revalidates the copy on its own,
    // as the others do, and keeps stale-if-error's cover (review37h L1).
    let alone = |waited| {
        if ranged && miss {
            Joined::Bypass
        } else {
            Joined::Fetch {
                leader: None,
                waited,
            }
        }
    };
    // A request with Authorization leads only the first time: if its
    // answer was not stored for others, the waiters take the lock on (an
    // anonymous one fetches for the rest) and it never leads them again.
    let personal = parts.headers.contains_key(header::AUTHORIZATION);
    // After a hand-on, only requests whose answer can be stored take the
    // lock again. Whether a HEAD or a conditional GET is fetched as a
    // plain GET depends on the background reads free at that moment; one
    // that took the lock and then found none left answers for itself, and
    // as a second-round leader lets the waiters go (`Leader::may_hand_on`).
    // A revalidation asks with the entry's validators, not the client's.
    let own_answer = || miss && wants_converting(parts) && (ranged || !ReadPermit::any_free());
    let mut since = None;
    let mut handed_on = false;
    let mut renewed = false;
    loop {
        let leads = since.is_none() || !(personal || (handed_on && own_answer()));
        // Once the URL's Vary is known, each variant has its lock.
        let full = cache.lock_key_for(primary, &parts.headers);
        let key = full.as_deref().unwrap_or(primary);
        let waiting = if leads {
            match Locks::claim(cache, key) {
                Claim::Leader(mut leader) => {
                    if handed_on {
                        leader.took_over();
                    }
                    return Joined::Fetch {
                        leader: Some(leader),
                        waited: since.is_some(),
                    };
                }
                Claim::Wait(waiting) => waiting,
            }
        } else {
            match Locks::existing(cache, key) {
                Some(waiting) => waiting,
                None => return alone(since.is_some()),
            }
        };
        if cache.uncacheable(primary, &parts.headers) {
            return alone(since.is_some());
        }
        let (deadline, arrived) =
            *since.get_or_insert_with(|| (tokio::time::Instant::now() + wait, cache.now()));
        let woken = collapsed(
            cache, waiting, deadline, arrived, primary, parts, request_cc, status,
        );
        match woken.await {
            Woken::Answered(hit) => return Joined::Answered(hit),
            Woken::Nothing { handed_on: was } => handed_on = was,
            Woken::Earlier => {
                handed_on = false;
                // The next fetch began no sooner than the one waited on
                // ended: it is given the wait the first was, once. Else
                // behind a backend taking 3 s, a reload that came during a
                // check left at 5 s to fetch on its own, at 8 s in all.
                if let (Some((deadline, _)), false) = (since.as_mut(), renewed) {
                    *deadline = tokio::time::Instant::now() + wait;
                    renewed = true;
                }
            }
            Woken::Alone => return alone(true),
            Woken::Replaced if ranged => return Joined::Bypass,
            Woken::Replaced => return Joined::Replaced,
        }
    }
}

/// What a check of a stored `entry` this `age` is, for `Cache-Status`'s
/// `fwd`: `request` when the client asked for it of a fresh one
/// (`no-cache`, `max-age=0`), else `stale`.
fn checked(entry: &Entry, age: Duration) -> &'static str {
    if age < entry.lifetime && !entry.cc.no_cache {
        "request"
    } else {
        "stale"
    }
}

/// Whether a request asks for a range. Range means nothing to HEAD (RFC
/// 9110 §14.2): a HEAD is served as if it had none.
fn asks_range(parts: &Parts) -> bool {
    parts.method == Method::GET && parts.headers.contains_key(header::RANGE)
}

/// Whether a `Range` request that found nothing usable stored fetches the
/// whole response, to store it and cut the range from it as it streams, as
/// nginx and Varnish do on a miss. Only a GET without a body asking for
/// one byte range does; and not one starting at or past `max_object_size`,
/// which no response the cache keeps can serve: reading up to it would
/// only fetch what is thrown away. Nor one for a URL with an answer not
/// stored lately, for any variant (see [`Cache::uncacheable_anywhere`]).
fn whole_for_range(cache: &Cache, primary: &str, parts: &Parts, body: &RequestBody) -> bool {
    parts.method == Method::GET
        && http_body::Body::is_end_stream(body)
        && !cache.uncacheable_anywhere(primary)
        && range::Spec::of(&parts.headers).is_some_and(|spec| {
            spec.first()
                .is_none_or(|first| first < cache.config.max_object_size)
        })
}

/// The client's range of a 200 fetched whole for it (`asked` is the
/// client's head), cut from the stream while the whole is stored: a 206 or
/// 416. A response whose `If-Range` does not match goes out whole, which
/// RFC 9110 §14.2 allows.
///
/// A response that will not be stored is cut the same way when it is small;
/// a larger one (over `max_object_size`) is not read up to the range, but
/// asked for again with it. Without a `Content-Length` nothing can be cut
/// as it streams: a response being stored is read whole first (for at most
/// [`COALESCE_WAIT`]) and the range served from it, any other asked for
/// again with the range.
async fn cut_range(
    cache: &Cache,
    upstream: &Upstream,
    asked: Parts,
    response: Response<ProxyBody>,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    if response.status() != StatusCode::OK {
        return Ok(response);
    }
    let len = content_length(response.headers()).and_then(|len| usize::try_from(len).ok());
    let Some(len) = len else {
        let mut said = ours(response.headers());
        let mut body = response.into_body();
        if let Some(whole) = body.entry_when_whole() {
            // The client waits for the whole as long as a coalesced request
            // would for another's fetch; then the store goes on without it,
            // as it does when the client leaves first (`GoesOn`).
            let mut reading = crate::task::GoesOn::new(body.read_into_cache());
            if tokio::time::timeout(COALESCE_WAIT, &mut reading)
                .await
                .is_err()
            {
                drop(reading);
            } else if let Ok((entry, overtaken)) = whole.await {
                // This fetch's own response, not whatever else is stored.
                if overtaken {
                    said = said.replace("; stored", "; detail=invalidated");
                }
                let age = entry.timing.current_age(cache.now());
                return Ok(from_entry(&entry, age, &asked, &said));
            }
            // Too large after all, broken off, or slow.
            said = said.replace("; stored", "");
        }
        return again_with_range(upstream, asked, &said, trace).await;
    };
    let answer = range::evaluate(&asked.headers, response.headers(), len);
    if answer == RangeAnswer::Full {
        // Sent whole (an `If-Range` that does not match), as a miss is.
        return Ok(response.map(ProxyBody::read_ahead));
    }
    if !response.body().is_capturing() && len as u64 > cache.config.max_object_size {
        let said = ours(response.headers());
        drop(response);
        return again_with_range(upstream, asked, &said, trace).await;
    }
    let (mut parts, body) = response.into_parts();
    let Some((code, start, count)) = range_fields(&mut parts.headers, answer, len) else {
        return Ok(Response::from_parts(parts, body));
    };
    // RFC 9211 §2.3: the backend sent a 200; without it, the 206 or 416
    // would read as the backend's (review39a L1).
    with_fwd_status(&mut parts.headers, parts.status);
    restatus(&mut parts, code);
    // Read ahead as a whole miss is: the fill goes at the backend's pace,
    // not at that of a client that stops reading once it has enough (a
    // media player's `bytes=0-`), so the requests waiting on it are not
    // held up, and a client gone mid-range leaves the rest to be stored
    // (review39b M1, M2: every viewer of a video fetched it whole again).
    Ok(Response::from_parts(
        parts,
        body.read_ahead().slice(start as u64, count as u64),
    ))
}

/// A response's declared length.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    text(headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
}

/// portico's own `Cache-Status` member: the last one (see [`add_status`]).
fn ours(headers: &HeaderMap) -> String {
    let all = headers
        .get(&CACHE_STATUS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("portico; fwd=miss");
    all.rsplit_once(", ")
        .map_or(all, |(_, ours)| ours)
        .to_owned()
}

/// The client's request sent again as it came, `Range` and all, for a
/// response portico does not keep: the backend cuts the range.
async fn again_with_range(
    upstream: &Upstream,
    asked: Parts,
    said: &str,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (again, in_flight) =
        forward_with_retries(upstream, asked, RequestBody::empty(), trace).await?;
    let mut again = relay(upstream, again, in_flight);
    set_status(&mut again, said);
    Ok(again)
}

/// Forwards the request as it is and relays the answer without storing it.
async fn bypass(
    cache: &Cache,
    upstream: &Upstream,
    parts: Parts,
    body: RequestBody,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    cache.counters.bypass.inc();
    trace.fwd = Some("bypass");
    let (response, in_flight) = forward_with_retries(upstream, parts, body, trace).await?;
    let mut response = relay(upstream, response, in_flight);
    set_status(&mut response, "portico; fwd=bypass");
    Ok(response)
}

fn empty_parts() -> Parts {
    http::Request::new(()).into_parts().0
}

/// A backend response relayed with hop-by-hop hygiene.
fn relay(
    upstream: &Upstream,
    response: Response<UpstreamBody>,
    in_flight: InFlight,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    headers::prepare_response(&mut parts);
    Response::from_parts(
        parts,
        ProxyBody::stream(body, upstream.config.body_timeout, Some(in_flight)),
    )
}

/// A fetch whose answer may be stored: what it keeps from the request until
/// that answer is in.
struct Fetch {
    /// The client's own request fields (`Vary` is matched against them).
    request_headers: HeaderMap,
    request_cc: CacheControl,
    /// HEAD is forwarded as HEAD, and its answer is never stored.
    is_head: bool,
    fill: Fill,
    request_time: std::time::SystemTime,
    /// The coalescing lock, when this fetch leads.
    leader: Option<Leader>,
    /// Cache-Status `fwd` parameter: miss, vary-miss, stale or request.
    fwd: &'static str,
}

impl Fetch {
    /// Relays the fetched response and stores it as it streams when
    /// RFC 9111 allows. The coalescing lock goes with the stored body, or
    /// its waiters are released at once when nothing will be stored; the
    /// lock itself is handed back then, for the caller to drop once the
    /// copy the answer replaced is gone (see [`forget_if_replaced`]).
    fn store_or_relay(
        self,
        cache: &Arc<Cache>,
        upstream: &Upstream,
        response: Response<UpstreamBody>,
        in_flight: InFlight,
    ) -> (Response<ProxyBody>, Option<Leader>) {
        let Fetch {
            request_headers,
            request_cc,
            is_head,
            fill,
            request_time,
            mut leader,
            fwd,
        } = self;
        let response_time = cache.now();
        let mut response = relay(upstream, response, in_flight);
        let status = response.status();
        let cc = policy::parse_response(response.headers());
        let decision = if is_head {
            Err(policy::NotStored::Method)
        } else {
            policy::storable(
                &Method::GET,
                &request_headers,
                &request_cc,
                status,
                response.headers(),
                &cc,
                cache.config.default_ttl,
            )
        };
        let declared = content_length(response.headers());
        // A miss's forwarded status is the status of the answer itself.
        let fwd_status = if fwd.ends_with("miss") {
            String::new()
        } else {
            format!("; fwd-status={}", status.as_u16())
        };
        let text = match decision {
            // The URL was invalidated while this was fetched: it may predate
            // the change (see `cache::fill`).
            Ok(_) if fill.overtaken() => {
                format!("portico; fwd={fwd}{fwd_status}; detail=invalidated")
            }
            Ok(_) if declared.is_some_and(|n| n > cache.config.max_object_size) => {
                cache.not_stored(fill.primary(), &request_headers, response.headers(), status);
                release_for(leader.as_ref(), status, true);
                format!("portico; fwd={fwd}{fwd_status}; detail=too-large")
            }
            Ok(lifetime) => {
                let mut stored = crate::cache::detached(response.headers());
                // What a cache behind portico did for this fetch is not true of
                // later hits.
                stored.remove(&CACHE_STATUS);
                // Nor is the quota of the client it answered.
                super::error::remove_rate_limit_fields(&mut stored);
                // RFC 9110 §6.6.1: a cache records when an undated
                // response was received, so hits do not wear the time they
                // are served at (hyper's) as the response's date.
                if !stored.contains_key(header::DATE) {
                    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(response_time))
                    {
                        stored.insert(header::DATE, date);
                    }
                }
                let head = Head {
                    status,
                    reason: status
                        .canonical_reason()
                        .is_none()
                        .then(|| {
                            response
                                .extensions()
                                .get::<hyper::ext::ReasonPhrase>()
                                .cloned()
                        })
                        .flatten(),
                    headers: stored,
                    timing: Timing::new(response.headers(), request_time, response_time),
                    lifetime,
                    cc,
                };
                // Stale on arrival (an old `Age` or `Date`), with no validator
                // and no stale window: it could never be served.
                if head.keep_for().is_zero() {
                    cache.not_stored(fill.primary(), &request_headers, response.headers(), status);
                    release_for(leader.as_ref(), status, true);
                    format!("portico; fwd={fwd}{fwd_status}; detail=no-freshness")
                } else {
                    let capture =
                        Capture::new(cache.clone(), fill, request_headers, head, leader.take());
                    response.extensions_mut().insert(capture.fate());
                    let (parts, body) = response.into_parts();
                    response = Response::from_parts(parts, body.with_capture(capture));
                    format!("portico; fwd={fwd}{fwd_status}; stored")
                }
            }
            Err(reason) => {
                // A logged-in client's private answer says nothing of what
                // everyone else gets.
                let personal = request_headers.contains_key(header::AUTHORIZATION);
                let of_the_resource = reason.lies_with_the_resource() && !personal;
                if of_the_resource {
                    cache.not_stored(fill.primary(), &request_headers, response.headers(), status);
                }
                // An answer kept out for what its request was (its
                // Authorization; a HEAD, or a miss's 304 to the client's
                // own validators, where no plain GET was fetched instead:
                // no background read free, or a range) hands the lock on,
                // once a burst (see `join`): the waiters' plain GETs may be
                // stored. Any other, the waiters would not have stored
                // either.
                let own_304 = status == StatusCode::NOT_MODIFIED
                    && fwd.ends_with("miss")
                    && carries_validators(&request_headers);
                let for_the_request = personal
                    || matches!(
                        reason,
                        policy::NotStored::Authorization | policy::NotStored::Method
                    )
                    || own_304;
                let hand_on = for_the_request && leader.as_ref().is_some_and(Leader::may_hand_on);
                if !hand_on {
                    release_for(leader.as_ref(), status, of_the_resource);
                }
                format!("portico; fwd={fwd}{fwd_status}; detail={}", reason.detail())
            }
        };
        set_status(&mut response, &text);
        (response, leader)
    }
}

/// [`release`] for an answer with `status` not stored; `noted` when it was
/// noted as the resource's (see `Cache::not_stored`): one that replaces the
/// stored copy (see `forget_if_replaced`) tells the waiters it is gone.
fn release_for(leader: Option<&Leader>, status: StatusCode, noted: bool) {
    match leader {
        Some(leader) if noted && crate::cache::replaces(status) => leader.release_replacing(),
        _ => release(leader),
    }
}

/// Lets the requests waiting on `leader`, if any, fetch on their own now.
fn release(leader: Option<&Leader>) {
    if let Some(leader) = leader {
        leader.release();
    }
}

/// A copy of `client` without the validators that could get it a 304, nor
/// a range: a fetch of the whole response, for when a 304 named another
/// validator.
fn unconditional(client: &Parts) -> Parts {
    let mut parts = super::copy_head(client);
    // Whatever the client's method: the whole response is what is stored.
    parts.method = Method::GET;
    without_validators(&mut parts.headers);
    without_range(&mut parts.headers);
    parts
}

/// Takes a client's range off a request portico sends for the whole
/// response (`If-Range` means nothing without `Range`).
fn without_range(headers: &mut HeaderMap) {
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
}

/// What a 304 answering portico's revalidation of `entry` comes to.
enum Revalidated {
    /// It names another validator (RFC 9111 §4.3.4): it cannot update the
    /// entry, and the stored body is not known to be current.
    Mismatch,
    /// The entry refreshed with its fields, to be stored...
    Store(Entry),
    /// ... or served this once, when the 304 says `no-store` or `private`:
    /// the stale entry then goes too.
    Once(Entry),
}

fn judge_304(
    cache: &Cache,
    entry: &Entry,
    not_modified: &HeaderMap,
    request_time: std::time::SystemTime,
) -> Revalidated {
    if !policy::selects(&entry.headers, not_modified) {
        return Revalidated::Mismatch;
    }
    let updated = refreshed(cache, entry, not_modified, request_time);
    let cc = policy::parse_response(not_modified);
    if cc.no_store || cc.private || cc.unreadable {
        Revalidated::Once(updated)
    } else {
        Revalidated::Store(updated)
    }
}

/// Stores or drops what [`judge_304`] made of a 304 (not a mismatch), and
/// tells the requests waiting on `fetch`: the refreshed entry is theirs;
/// one served once and dropped (`private`, `no-store`) lets them go, each
/// to revalidate on its own rather than one after another.
async fn keep_304(cache: &Cache, fetch: &mut Fetch, judged: Revalidated) {
    match judged {
        Revalidated::Store(updated) => {
            let response_time = updated.timing.response_time;
            cache
                .insert(&fetch.fill, &fetch.request_headers, updated)
                .await;
            let vouches = !fetch.fill.overtaken() && capture::vouches(&fetch.request_headers);
            if let Some(leader) = fetch.leader.as_mut().filter(|_| vouches) {
                leader.stored(response_time);
            }
        }
        Revalidated::Once(_) => {
            release(fetch.leader.as_ref());
            cache.invalidate(fetch.fill.primary()).await;
        }
        Revalidated::Mismatch => {}
    }
}

/// Adds our validators to a request for a stored entry. The client's own
/// are taken off in any case: a 304 to them would not revalidate it.
fn conditional(parts: &mut Parts, entry: &Entry) {
    without_validators(&mut parts.headers);
    if let Some(etag) = entry.etag() {
        parts.headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
        parts
            .headers
            .insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
}

/// The stale copy, served because the backend failed with `code` and the
/// entry allows stale-if-error (RFC 5861).
fn stale_on_error(
    cache: &Cache,
    entry: &Entry,
    age: Duration,
    client: &Parts,
    fwd: &str,
    code: StatusCode,
    collapsed: &str,
) -> Response<ProxyBody> {
    cache.counters.stale.inc();
    let text = format!(
        "portico; fwd={fwd}; fwd-status={}; detail=stale-if-error{collapsed}",
        code.as_u16()
    );
    from_entry(entry, age, client, &text)
}

/// The stored entry updated by a 304 (RFC 9111 §4.3.4): its header fields
/// replace the stored ones, the body stays.
fn refreshed(
    cache: &Cache,
    entry: &Entry,
    not_modified: &HeaderMap,
    request_time: std::time::SystemTime,
) -> Entry {
    // The 304's own hop-by-hop fields (`Connection: close`, `Keep-Alive`)
    // must not be stored and replayed on every later hit.
    let mut not_modified = not_modified.clone();
    headers::remove_hop_by_hop(&mut not_modified);
    let mut headers = entry.headers.clone();
    for name in not_modified.keys() {
        // A cookie the 304 sets is for the client whose request carried
        // the revalidation; stored, every later hit would hand it out.
        // The stored ETag stays: a 304 matched weakly (`"a"` for a stored
        // `W/"a"`, the compressed variant) must not make the stored body
        // claim the strong tag of another one (RFC 9110 §8.8.1).
        // Nor do the fields that say what the stored body's bytes are
        // (RFC 9111 §3.2 lets a cache keep those it depends on): a 304
        // saying `Content-Encoding: gzip` or a `Content-Range` made every
        // later hit of a plain body claim it (review48c).
        if name == header::CONTENT_LENGTH
            || name == header::CONTENT_ENCODING
            || name == header::CONTENT_RANGE
            || name == header::VIA
            || name == CACHE_STATUS
            || name == header::SET_COOKIE
            || name == header::ETAG
            || super::error::is_rate_limit_field(name.as_str())
        {
            continue;
        }
        headers.remove(name);
        for value in not_modified.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    // A 304 must carry its Date (RFC 9110 §15.4.5); one without is dated
    // when it came, as a recipient dates any undated response (§6.6.1).
    // The stored Date kept instead made `Expires` count from the first
    // response, and the entry was served seconds past its new `Expires`
    // (review32a L7).
    let arrived = cache.now();
    if !not_modified.contains_key(header::DATE) {
        if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(arrived)) {
            headers.insert(header::DATE, date);
        }
    }
    let cc = policy::parse_response(&headers);
    let lifetime = policy::explicit_lifetime(&headers, &cc).unwrap_or(cache.config.default_ttl);
    Entry::new(
        entry.status,
        entry.reason.clone(),
        // The 304's values are slices of its connection's read buffer.
        crate::cache::detached(&headers),
        entry.body.clone(),
        // The response is as old as the 304 says (its own Date and Age),
        // not as the merged fields say: an Age or Date kept from the first
        // response would age the refreshed entry from the start.
        Timing::new(&not_modified, request_time, arrived),
        lifetime,
        cc,
    )
}

#[allow(clippy::too_many_arguments)]
async fn revalidate(
    cache: &Arc<Cache>,
    upstream: &Arc<Upstream>,
    primary: String,
    mut parts: Parts,
    entry: Arc<Entry>,
    request_cc: CacheControl,
    fwd: &'static str,
    // Held until the refreshed entry is stored, so requests waiting on it
    // read that.
    leader: Option<Leader>,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client = super::copy_head(&parts);
    // A range is cut from what the revalidation gets, as on a miss.
    let ranged = asks_range(&parts);
    without_range(&mut parts.headers);
    let request_headers = parts.headers.clone();
    // What can be stored is asked for, as on a miss (see `storable_fetch`):
    // a GET, with the entry's validators and never the client's; the
    // client is answered from the result (`answer_own`). A HEAD stays one
    // if no background read could take the body it would not send.
    let permit = (parts.method == Method::HEAD)
        .then(ReadPermit::try_take)
        .flatten();
    let is_head = parts.method == Method::HEAD && permit.is_none();
    if !is_head {
        parts.method = Method::GET;
    }
    conditional(&mut parts, &entry);
    let request_time = cache.now();
    // The copy's age as a failed revalidation would send it, if
    // stale-if-error allows that then: counted at the failure, not the
    // request, so the time the attempts took is in its Age (an hour-old
    // copy left after a 30 s wait for a hung backend said it was an hour
    // old, review34e 3), and its window is judged then too.
    let stale_copy_age = || {
        let age = entry.timing.current_age(cache.now());
        policy::stale_if_error(entry.lifetime, age, &entry.cc).then_some(age)
    };
    let mut fetch = Fetch {
        request_headers,
        request_cc,
        is_head,
        fill: cache.begin_fill(primary),
        request_time,
        leader,
        fwd,
    };
    trace.fwd = Some(fwd);
    let validated = policy::has_validator(&entry.headers);
    let mut request = parts;
    let mut refetched = false;
    loop {
        let result = forward_with_retries(upstream, request, RequestBody::empty(), trace).await;
        fetch.request_time = answered_request_time(cache, fetch.request_time, trace);
        let (response, in_flight) = match result {
            Ok(answer) => answer,
            Err(error) => {
                let Some(age) = stale_copy_age() else {
                    release(fetch.leader.as_ref());
                    cache.counters.miss.inc();
                    return Err(error);
                };
                let code = error.status();
                if let Some(leader) = &fetch.leader {
                    leader.failed(code.as_u16());
                }
                return Ok(stale_on_error(cache, &entry, age, &client, fwd, code, ""));
            }
        };
        if response.status() == StatusCode::NOT_MODIFIED && validated && !refetched {
            let judged = judge_304(cache, &entry, response.headers(), fetch.request_time);
            let updated = match &judged {
                Revalidated::Mismatch => {
                    // Fetch it whole, once, as a miss would (and counted
                    // as one below), its age counted from its own sending.
                    refetched = true;
                    (fetch.request_time, trace.retried_at) = (cache.now(), None);
                    request = unconditional(&client);
                    // No place to read a body the HEAD would not take.
                    if fetch.is_head {
                        request.method = Method::HEAD;
                    }
                    continue;
                }
                Revalidated::Store(updated) | Revalidated::Once(updated) => updated,
            };
            // A lookup answered by revalidating; a background refresh
            // is none (its request was counted stale: counted again, the
            // lookups outnumbered the requests, review34e 4).
            cache.counters.revalidated.inc();
            let age = updated.timing.current_age(cache.now());
            let mut answer = from_entry(
                updated,
                age,
                &client,
                &format!("portico; fwd={fwd}; fwd-status=304"),
            );
            // A cookie the 304 sets is this client's alone (never stored).
            for cookie in response.headers().get_all(header::SET_COOKIE) {
                answer
                    .headers_mut()
                    .append(header::SET_COOKIE, cookie.clone());
            }
            keep_304(cache, &mut fetch, judged).await;
            // Requests waiting on the lock read the refreshed entry now.
            drop(fetch);
            return Ok(answer);
        }
        let stale_age = response
            .status()
            .is_server_error()
            .then(stale_copy_age)
            .flatten();
        if let Some(age) = stale_age {
            let code = response.status();
            if let Some(leader) = &fetch.leader {
                leader.failed(code.as_u16());
            }
            return Ok(stale_on_error(cache, &entry, age, &client, fwd, code, ""));
        }
        cache.counters.miss.inc();
        let primary = fetch.fill.primary().to_owned();
        let (response, leader) = fetch.store_or_relay(cache, upstream, response, in_flight);
        forget_if_replaced(cache, &primary, &client.headers, &response, leader).await;
        // RFC 9110 §13.2.2: If-None-Match is evaluated before Range.
        let matched =
            response.status().is_success() && not_modified(&client.headers, response.headers());
        if ranged && !matched {
            return Box::pin(cut_range(cache, upstream, client, response, trace)).await;
        }
        return Ok(answer_own(Own { client, permit }, response).map(ProxyBody::read_ahead));
    }
}

/// Background revalidation for stale-while-revalidate: refreshes or
/// replaces the entry; the client was already answered.
async fn refresh(
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
    primary: String,
    mut parts: Parts,
    entry: Arc<Entry>,
) {
    // One refresh at a time per variant (the lock `join` takes for it);
    // others keep serving stale.
    let full = cache.lock_key_for(&primary, &parts.headers);
    let Claim::Leader(leader) = Locks::claim(&cache, full.as_deref().unwrap_or(&primary)) else {
        return;
    };
    parts.method = Method::GET;
    // The client that found the entry stale may have asked for a range;
    // the refresh is for the whole response.
    without_range(&mut parts.headers);
    let mut fetch = Fetch {
        request_headers: parts.headers.clone(),
        request_cc: policy::parse_request(&parts.headers),
        is_head: false,
        fill: cache.begin_fill(primary),
        request_time: cache.now(),
        leader: Some(leader),
        fwd: "stale",
    };
    let whole = unconditional(&parts);
    conditional(&mut parts, &entry);
    // Its failures are logged: its client was answered from the stale
    // copy, so no access line says the backend failed, and every refresh
    // could fail behind a row of healthy hits (review32a L5).
    // At most one line every ten seconds: with a backend down, every
    // stale hit on a hot URL starts a refresh that fails at once
    // (review32e L4).
    static FAILED: crate::logging::Every = crate::logging::Every::new();
    let path = parts.uri.path().to_owned();
    let failed = |why: &dyn std::fmt::Display| {
        if let Some(held_back) = FAILED.due(10) {
            tracing::warn!(upstream = upstream.name(), path, error = %why, held_back, "background refresh failed; the stale copy goes on being served");
        }
    };
    let mut trace = Trace::default();
    let (mut response, mut in_flight) =
        match forward_with_retries(&upstream, parts, RequestBody::empty(), &mut trace).await {
            Ok(answer) => answer,
            Err(error) => return failed(&error),
        };
    fetch.request_time = answered_request_time(&cache, fetch.request_time, &trace);
    if response.status() == StatusCode::NOT_MODIFIED {
        match judge_304(&cache, &entry, response.headers(), fetch.request_time) {
            Revalidated::Mismatch => {
                // As in `revalidate`: fetch it whole, once. The 304 and
                // its slot go first: held, under a `max_conns` of 1 the
                // refetch waited in line for the slot it held itself,
                // and the upstream with it (review44b M1).
                drop((response, in_flight));
                (fetch.request_time, trace.retried_at) = (cache.now(), None);
                (response, in_flight) =
                    match forward_with_retries(&upstream, whole, RequestBody::empty(), &mut trace)
                        .await
                    {
                        Ok(answer) => answer,
                        Err(error) => return failed(&error),
                    };
                fetch.request_time = answered_request_time(&cache, fetch.request_time, &trace);
            }
            judged => return keep_304(&cache, &mut fetch, judged).await,
        }
    }
    // A background fetch's server error is dropped, as Varnish's built-in
    // VCL abandons one: a cacheable 503 would replace the copy the stale
    // windows still serve (stale-if-error among them) for its whole
    // lifetime. The copy goes on being served stale, and refreshed.
    if response.status().is_server_error() {
        release(fetch.leader.as_ref());
        return failed(&format_args!("the backend answered {}", response.status()));
    }
    let primary = fetch.fill.primary().to_owned();
    let request_headers = fetch.request_headers.clone();
    let (response, leader) = fetch.store_or_relay(&cache, &upstream, response, in_flight);
    forget_if_replaced(&cache, &primary, &request_headers, &response, leader).await;
    // Nobody reads this body but the cache; as any such read, given up
    // after a while (it holds the variant's lock, not a background place).
    crate::task::read_at_most(response.into_body().read_into_cache()).await;
}

/// RFC 9111 §4.3.3: a full response replaces the stored one (its
/// variant's), even when it may not be stored itself (`no-store`,
/// `private`, a 404 or 410 without freshness...): the stale copy is of a
/// representation the origin has replaced or removed, which
/// stale-if-error or stale-while-revalidate must not bring back (Varnish's
/// hit-for-miss object replaces it too; a 410 kept the old 200 served
/// for the whole stale-while-revalidate window, review37b M1). A 5xx does
/// not (see [`crate::cache::replaces`]). `request` is the revalidating
/// request's head. `leader`, the lock its waiters were released from,
/// is dropped only once the copy is gone: a request arriving in between
/// would otherwise take the lock, find the copy, and revalidate it
/// (review37h L2).
async fn forget_if_replaced(
    cache: &Cache,
    primary: &str,
    request: &HeaderMap,
    response: &Response<ProxyBody>,
    leader: Option<Leader>,
) {
    if crate::cache::replaces(response.status())
        && !response.body().is_capturing()
        && cache.uncacheable(primary, request)
    {
        // This variant's copy only: the others are still what the origin
        // serves their requests.
        if let Some(full) = cache.key_for(primary, request) {
            cache.forget_variant(&full).await;
        }
    }
    drop(leader);
}

/// The invalidation an unsafe request owes the cache (RFC 9111 §4.4),
/// paid by [`forward_write`] once the exchange with the backend ends.
pub(super) struct Owed {
    cache: Arc<Cache>,
    /// The newest generation's cache: a reload that changed `[cache]`
    /// while the write went on replaced `cache`, and a read meanwhile may
    /// have stored the old state there (review52 M1: served as a hit
    /// after the write's 2xx, for its whole lifetime).
    newest: Arc<arc_swap::ArcSwapOption<Cache>>,
    scheme: &'static str,
    host: String,
    target: String,
    /// The proxy's writes under way, which a shutdown waits for (see
    /// [`Proxy::writes_under_way`]).
    ///
    /// [`Proxy::writes_under_way`]: super::Proxy::writes_under_way
    writes: Arc<Places>,
}

impl Owed {
    pub(super) fn new(
        cache: Arc<Cache>,
        newest: Arc<arc_swap::ArcSwapOption<Cache>>,
        scheme: &'static str,
        host: &str,
        target: String,
        writes: Arc<Places>,
    ) -> Self {
        Owed {
            cache,
            newest,
            scheme,
            host: host.to_owned(),
            target,
            writes,
        }
    }

    /// Invalidates at once, with no answer to go by.
    async fn unanswered(&self) {
        self.invalidate(&HeaderMap::new()).await;
    }

    /// The backend answered with `status`: a success or a redirect
    /// invalidates (with the URLs its `response` head names), an error
    /// status does not.
    async fn settle(&self, status: StatusCode, response: &HeaderMap) {
        if status.is_success() || status.is_redirection() {
            self.invalidate(response).await;
        }
    }

    /// Invalidates the URL (and those `response` names) in the cache of
    /// the write's generation and, when a reload has replaced it since,
    /// in the newest one.
    async fn invalidate(&self, response: &HeaderMap) {
        let (scheme, host, target) = (self.scheme, self.host.as_str(), self.target.as_str());
        invalidate(&self.cache, scheme, host, target, response).await;
        let newest = self.newest.load_full();
        if let Some(newest) = newest.filter(|newest| !Arc::ptr_eq(newest, &self.cache)) {
            invalidate(&newest, scheme, host, target, response).await;
        }
    }

    /// The request failed with `error`, with no answer: owed still if an
    /// attempt may have reached its backend and been carried out (a
    /// broken connection, `response_timeout`; `acted`, see
    /// [`Trace::acted`]). One that never reached a backend leaves the
    /// cache, and its stale-if-error cover, as it was.
    ///
    /// A backend that outlasted `response_timeout` is likely still at
    /// work, and carries the write out later: a read in between stored
    /// the old state again, served as a hit for its whole lifetime
    /// (review38e M1). So the URL is invalidated again once `again` (the
    /// upstream's `response_timeout`) has passed once more.
    async fn failed(self: Arc<Self>, error: &ProxyError, acted: bool, again: Duration) {
        if !(acted || error.may_have_acted()) {
            return;
        }
        self.unanswered().await;
        tokio::spawn(async move {
            tokio::time::sleep(again).await;
            self.unanswered().await;
        });
    }
}

/// Forwards a write (an unsafe request) on a proxy with a cache, and pays
/// the invalidation it owes by how the exchange ends. A client that
/// leaves once its request is on its way to a backend (the head handed to
/// a backend connection, and the upload read to its end) does not cut
/// the exchange: it goes on in a task of its own (bounded by its
/// response timeouts, as any), and the backend's answer decides, as it
/// would have for the client. Before, the old copy stayed served as a hit
/// for its whole lifetime though the backend carried the write out
/// (review38c M1), and invalidating on any abandoned write let a client
/// drop any copy with a write the backend would have refused (review38d
/// F2). A write left before that point is cut, as any request is: it
/// was not sent, or not whole (review38f). At most [`DETACHED_MAX`] go
/// on at once; past that, a left write is cut too.
pub(super) async fn forward_write(
    upstream: &Arc<Upstream>,
    mut parts: Parts,
    mut body: RequestBody,
    trace: &mut Trace,
    owed: Owed,
) -> Result<(Response<UpstreamBody>, InFlight), ProxyError> {
    let sent = super::Sent::default();
    parts.extensions.insert(sent.clone());
    let upload = (!http_body::Body::is_end_stream(&body)).then(|| body.end_marker());
    // An HTTP/2 upload without `content-length` is the one whose end a
    // client's reset can fake (see `Detachable`'s drop); framing proves
    // any other whole.
    let resettable = parts.version == http::Version::HTTP_2
        && !parts.headers.contains_key(header::CONTENT_LENGTH);
    // Counted from here, wherever the exchange goes on: a shutdown waits
    // for it. Counted only once its client left, a write on an HTTP/2
    // stream (a task of its own) whose connection ended first was not
    // waited for (review40f M1).
    let under_way = owed.writes.try_take(usize::MAX);
    // Shared with `Detachable`, which pays it for a write it cuts.
    let owed = Arc::new(owed);
    let fallback = owed.clone();
    let upstream = upstream.clone();
    let mut own = *trace;
    let exchange = Box::pin(async move {
        let _under_way = under_way;
        let result = forward_with_retries(&upstream, parts, body, &mut own).await;
        match &result {
            Ok((response, _)) => owed.settle(response.status(), response.headers()).await,
            Err(error) => {
                let again = upstream.config.response_timeout;
                owed.failed(error, own.acted, again).await;
            }
        }
        (result, own)
    });
    let (result, own) = Detachable {
        exchange: Some(exchange),
        sent,
        upload,
        resettable,
        owed: fallback,
        trace,
    }
    .await;
    *trace = own;
    result
}

/// Writes whose exchange goes on after their client left, at most: each
/// holds a backend connection until its answer or `response_timeout`
/// (one per backend tried, a bodiless write under `retry_on_timeout`).
const DETACHED_MAX: usize = 256;

/// Writes going on after their client left, every server's (a cap on
/// backend connections held, not what a shutdown waits for).
static DETACHED: std::sync::LazyLock<Arc<Places>> = std::sync::LazyLock::new(Arc::default);

/// How long before its request was dropped an upload must have ended to
/// be taken for whole (see [`Detachable`]'s drop).
const UPLOAD_SETTLED: Duration = Duration::from_millis(20);

/// How a write's exchange ended, and its trace.
type Exchanged = (
    Result<(Response<UpstreamBody>, InFlight), ProxyError>,
    Trace,
);

type Exchange = std::pin::Pin<Box<dyn std::future::Future<Output = Exchanged> + Send>>;

/// A write's exchange (see [`forward_write`]), driven by its request
/// until that is dropped, then by a task of its own if the write is on
/// its way.
struct Detachable<'a> {
    exchange: Option<Exchange>,
    sent: super::Sent,
    upload: Option<crate::proxy::body::UploadEnded>,
    /// The upload's end may be a client's reset (see [`forward_write`]).
    resettable: bool,
    /// What the exchange owes, paid at once for one cut once delivered.
    owed: Arc<Owed>,
    /// The request's own, which the exchange's copy replaces once done;
    /// dropped before that, it is told the backend for its access line.
    trace: &'a mut Trace,
}

impl std::future::Future for Detachable<'_> {
    type Output = Exchanged;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let exchange = self
            .exchange
            .as_mut()
            .expect("a Detachable is not polled once done");
        let done = std::task::ready!(exchange.as_mut().poll(cx));
        self.exchange = None;
        std::task::Poll::Ready(done)
    }
}

impl Drop for Detachable<'_> {
    fn drop(&mut self) {
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        self.trace.backend = self.sent.backend();
        // Delivered: its head handed to a backend connection, its upload
        // read to its end. Left before, it is cut as any request is, and
        // owes nothing: the backend has no whole request to act on.
        let delivered = self.sent.is_marked() && self.upload.as_ref().is_none_or(|u| u.is_set());
        if !delivered {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // An HTTP/2 upload without `content-length` that ended as its
        // request was dropped may not be whole: a client's
        // RST_STREAM(NO_ERROR) ends it as if it were, in the same instant
        // (review38f: 5 of 5 such truncated uploads were carried out).
        // Its exchange is cut rather than awaited; the backend may act on
        // what it got, so the URL is invalidated at once, as it is for a
        // write past the cap below (review38g M1: cut and invalidating
        // nothing, such writes left the old copy served).
        let settled = !self.resettable
            || self
                .upload
                .as_ref()
                .and_then(|u| u.at())
                .is_none_or(|at| at.elapsed() >= UPLOAD_SETTLED);
        let owed = self.owed.clone();
        if !settled {
            runtime.spawn(async move { owed.unanswered().await });
            return;
        }
        let Some(place) = DETACHED.try_take(DETACHED_MAX) else {
            tracing::debug!(
                "a write's client left; too many such writes going on to wait for its answer"
            );
            runtime.spawn(async move { owed.unanswered().await });
            return;
        };
        runtime.spawn(async move {
            let _place = place;
            let (result, trace) = exchange.await;
            let backend = trace.backend.map(tracing::field::display);
            match result {
                Ok((response, _)) => tracing::info!(
                    backend,
                    status = response.status().as_u16(),
                    "a write's client left; its backend answered"
                ),
                Err(error) => tracing::info!(backend, %error, "a write's client left; it failed"),
            }
        });
    }
}

/// After a successful unsafe request, drops what the cache holds for the
/// target URI and same-origin `Location` / `Content-Location` (RFC 9111 §4.4).
pub(super) async fn invalidate(
    cache: &Cache,
    scheme: &str,
    host: &str,
    target: &str,
    response: &HeaderMap,
) {
    invalidate_spellings(cache, scheme, host, target).await;
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = response.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        // Relative references (`../list`) name a URL too (RFC 9110 §10.2.2).
        if let Some(path) = key::resolve(target, scheme, host, value.trim()) {
            invalidate_spellings(cache, scheme, host, &path).await;
        }
    }
}

/// Drops what is stored for `target` as written and, when it differs,
/// for its normal form as routes and purges read it (`/py/%63%39`,
/// `/py//c9` and `/py/x/../c9` are `/py/c9`; the query as written): a
/// write spelled otherwise left the plain URL's copy served (review34g
/// L4). Copies stored under other spellings stay, as the cache keys them
/// as written (nginx's and Varnish's do too); a purge by prefix finds them.
async fn invalidate_spellings(cache: &Cache, scheme: &str, host: &str, target: &str) {
    cache.invalidate(&key::primary(scheme, host, target)).await;
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    if let std::borrow::Cow::Owned(normal) = super::route::routing_path(path) {
        if normal != path {
            let normal = normal + query;
            cache.invalidate(&key::primary(scheme, host, &normal)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;

    /// With the defaults and two hung backends, a revalidation waits out
    /// each one's `response_timeout` and the watch's step, 33.75 s each:
    /// its waiters wait as long (review51 M1: they gave up at 65 s of
    /// 67.5, and each asked the hung backends again).
    #[test]
    fn a_revalidation_s_waiters_wait_out_every_backend_s_timeout() {
        let backends = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let config = crate::config::Upstream::new("a", backends);
        assert_eq!(config.retries, 1);
        assert!(config.retry_on_timeout);
        let longest =
            (config.response_timeout + config.body_timeout.min(config.response_timeout) / 8) * 2;
        assert!(
            revalidation_wait(&config) > longest,
            "{:?}",
            revalidation_wait(&config)
        );
    }

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
