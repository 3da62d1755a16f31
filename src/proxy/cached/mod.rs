//! A GET or HEAD on a caching route: answer from the cache when RFC 9111
//! allows, revalidate or fetch when it does not, coalesce concurrent misses,
//! and say what happened in `Cache-Status` (RFC 9211).
//!
//! Answers made from a stored entry (conditionals, 304s, ranges, `Age`)
//! are in [`answer`], revalidation with the backend in [`revalidation`],
//! and the invalidation unsafe requests owe the cache in [`write`](mod@write).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::body::{ProxyBody, RequestBody};
use super::error::ProxyError;
use super::headers::{self, Hop};
use super::{forward_with_retries, Trace};
use crate::cache::capture::{Capture, Head};
use crate::cache::fill::Fill;
use crate::cache::lock::{self, Claim, Leader, Locks};
use crate::cache::policy::{self, CacheControl, Timing, Usable};
use crate::cache::range::{self, RangeAnswer};
use crate::cache::{key, Cache, Entry};
use crate::task::ReadPermit;
use crate::upstream::health::InFlight;
use crate::upstream::Upstream;
use crate::upstream::UpstreamBody;

/// Longest a coalesced request waits for the leader before fetching itself.
const COALESCE_WAIT: Duration = Duration::from_secs(5);

/// How long requests wait on a revalidation of an entry stale-if-error may
/// serve: as long as the revalidation can take, at least
/// [`COALESCE_WAIT`]: its wait for room under `max_conns`, and for each
/// attempt a connect and a wait for the head, as late as the backend
/// connection's watch may find it (review51 M1): a backend that timed out
/// is not asked again (review50b L1), but a connection lost just before
/// its head is retried, the same backend's too (review53 L3: waiters gave
/// up at 41 s of 87). Whatever it gets, they are answered from it, so
/// behind a hung backend each no longer left at 5 s to wait its own
/// `response_timeout` on the same backend (review33c M2).
fn revalidation_wait(config: &crate::config::Upstream) -> Duration {
    let head = crate::upstream::latest_head_timeout(config.response_timeout, config.body_timeout);
    let attempts = (config.connect_timeout + head) * (config.retries + 1);
    // Only the first attempt waits in line: a retry does not.
    let capped = config.backends.iter().any(|b| b.max_conns > 0);
    let queued = if capped {
        config.queue_timeout
    } else {
        Duration::ZERO
    };
    (queued + attempts + Duration::from_secs(1)).max(COALESCE_WAIT)
}

pub use crate::cache::CACHE_STATUS;
use crate::cache::HIT;

mod answer;
mod revalidation;
mod write;

pub(super) use answer::{add_static_status, add_status, only_if_cached_bypass};
use answer::{
    from_entry, made_of, made_response, only_if_cached_miss, precondition_failed_response,
    preconditions, range_fields, set_status, stored_response, stripped_for_304, text, whole_body,
    Made,
};
use revalidation::{refresh, revalidate, stale_on_error};
pub(super) use write::{forward_write, Owed};

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
        lock::Waited::Failed(code) => {
            return stale_for_waiter(cache, primary, parts, request_cc, code).await
        }
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
/// with `code`, if stale-if-error (the response's, or this request's own)
/// still allows it; else the request fetches on its own. Before, every waiter went
/// to the failing backend itself: 20 clients made 21 requests of a backend
/// answering 503, and behind a hung one each waited its own
/// `response_timeout` (review33b F2).
async fn stale_for_waiter(
    cache: &Cache,
    primary: &str,
    parts: &Parts,
    request_cc: &CacheControl,
    code: u16,
) -> Woken {
    let Some((entry, age)) = stored_for(cache, primary, parts).await else {
        return Woken::Alone;
    };
    let Ok(code) = StatusCode::from_u16(code) else {
        return Woken::Alone;
    };
    if !policy::stale_if_error(entry.lifetime, age, &entry.cc, request_cc.stale_if_error) {
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
    // RFC 9111 §5.2.1.7: never forwarded, whatever else the request says
    // (cache53 L2: with `no-store`, or a line that does not parse, it
    // went to the backend).
    if request_cc.no_store && request_cc.only_if_cached {
        return Lookup::Answered(answer::only_if_cached_passed(cache));
    }
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
        // The entry revalidated in the background, its client answered.
        let refresh_later = |entry: &Arc<Entry>| {
            let mut head = super::copy_head(parts);
            headers::add_hop(&mut head.headers, hop());
            tokio::spawn(refresh(
                cache.clone(),
                upstream.clone(),
                primary.clone(),
                head,
                entry.clone(),
            ));
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
                        refresh_later(&entry);
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
                    Usable::MustRevalidate => {
                        // Its last revalidation failed a moment ago: the
                        // copy stale-if-error allows is served at once,
                        // and revalidated in the background, one refresh
                        // at a time (see `Entry::failing`).
                        // Not for a client that asked to have it checked
                        // (`no-cache`, `max-age=0`): it is, and gets the
                        // copy only if that fails (review66 L4).
                        let held = entry.failing(cache.now()).filter(|_| {
                            !request_cc.forces_revalidation()
                                && policy::stale_if_error(
                                    entry.lifetime,
                                    age,
                                    &entry.cc,
                                    request_cc.stale_if_error,
                                )
                        });
                        match held {
                            None => stale = Some((entry, age)),
                            Some(code) => {
                                refresh_later(&entry);
                                let code =
                                    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
                                let response = stale_on_error(
                                    cache, &entry, age, parts, "stale", code, "; held",
                                );
                                return answer(full, response, entry, false);
                            }
                        }
                    }
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
        let wait =
            if policy::stale_if_error(entry.lifetime, age, &entry.cc, request_cc.stale_if_error) {
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
        without_conditions(&mut parts.headers);
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
        covered: None,
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
    without_conditions(&mut parts.headers);
    // A HEAD's Range means nothing (RFC 9110 §14.2); the GET's would.
    if head {
        without_range(&mut parts.headers);
    }
    Some(Own {
        client,
        permit: Some(permit),
    })
}

/// Whether the request's own answer could not be stored: a HEAD's, a 304
/// to the client's `If-None-Match`/`If-Modified-Since`, or a 412 to its
/// `If-Match`/`If-Unmodified-Since`.
fn wants_converting(parts: &Parts) -> bool {
    parts.method == Method::HEAD
        || carries_validators(&parts.headers)
        || carries_preconditions(&parts.headers)
}

/// Whether a request with these fields could get a 304 to them.
fn carries_validators(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_NONE_MATCH) || headers.contains_key(header::IF_MODIFIED_SINCE)
}

/// Whether a request with these fields could get a 412 to them.
fn carries_preconditions(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_MATCH) || headers.contains_key(header::IF_UNMODIFIED_SINCE)
}

/// Takes off the fields that could get a request a 304 or a 412 to them:
/// portico judges the client's against what the fetch gets, as it judges
/// them against a stored copy (an origin that ignores `If-Match` gave a
/// miss a 200 or 206 where the hit after it got the 412, range53 M1).
fn without_conditions(headers: &mut HeaderMap) {
    headers.remove(header::IF_NONE_MATCH);
    headers.remove(header::IF_MODIFIED_SINCE);
    headers.remove(header::IF_MATCH);
    headers.remove(header::IF_UNMODIFIED_SINCE);
}

/// A client answered from a fetch made for the cache ([`answer_own`]).
struct Own {
    /// Its own head.
    client: Parts,
    /// The place for a body it does not take, if one was reserved.
    permit: Option<ReadPermit>,
}

/// The answer to the client whose HEAD or conditional GET was fetched as
/// a plain GET ([`storable_fetch`]): a 412 when its preconditions fail, a
/// 304 when its validators match (RFC 9110 §13.2.2, only where a 2xx
/// would be the answer, as for a stored copy), its head alone for a HEAD,
/// else the response itself. A body left unsent goes on into the cache by
/// a background read (in the place reserved for it, else one taken now if
/// any is free); one not being stored is dropped.
fn answer_own(own: Own, response: Response<ProxyBody>) -> Response<ProxyBody> {
    let Own { client, permit } = own;
    let made = preconditions(&client.headers, response.status(), response.headers());
    if client.method != Method::HEAD && made.is_none() {
        return response;
    }
    let (parts, body) = response.into_parts();
    if body.is_capturing() {
        match permit {
            Some(permit) => crate::task::spawn_permitted_read(permit, body.read_into_cache()),
            None => crate::task::spawn_background_read(body.read_into_cache()),
        }
    }
    bodiless_answer(made, parts)
}

/// The answer without a body a backend's head `parts` comes to for the
/// client: the 412 or 304 its conditions `made`, else the head itself (a
/// HEAD's).
fn bodiless_answer(made: Option<Made>, mut parts: http::response::Parts) -> Response<ProxyBody> {
    match made {
        Some(Made::Failed) => {
            return precondition_failed_response(&ours(&parts.headers), parts.status);
        }
        Some(Made::NotModified) => {
            // RFC 9211 §2.3: without it, the 304 would read as the backend's.
            with_fwd_status(&mut parts.headers, parts.status);
            restatus(&mut parts, StatusCode::NOT_MODIFIED);
            let dropped = stripped_for_304(&mut parts.headers);
            parts.extensions.insert(dropped);
        }
        _ => {}
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
    // A revalidation asks with the entry's validators, not the client's,
    // and a range's fetch asks for the whole without the client's
    // conditions: storable, whatever the background reads.
    let own_answer = || miss && !ranged && wants_converting(parts) && !ReadPermit::any_free();
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
                .is_none_or(|first| first < cache.max_object_size())
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
    // RFC 9110 §13.2.2: the client's preconditions before its range.
    if preconditions(&asked.headers, response.status(), response.headers()).is_some() {
        let own = Own {
            client: asked,
            permit: None,
        };
        return Ok(answer_own(own, response));
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
    if !response.body().is_capturing() && len as u64 > cache.max_object_size() {
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
    let conditions = conditions_of(&asked.headers);
    let (again, in_flight) =
        forward_with_retries(upstream, asked, RequestBody::empty(), trace).await?;
    let mut again = relay(upstream, again, in_flight);
    set_status(&mut again, said);
    Ok(judged_relayed(conditions, again))
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
    let conditions = conditions_of(&parts.headers);
    let (response, in_flight) = forward_with_retries(upstream, parts, body, trace).await?;
    let mut response = relay(upstream, response, in_flight);
    set_status(&mut response, "portico; fwd=bypass");
    Ok(judged_relayed(conditions, response))
}

/// The client's conditional fields, kept to judge what a request sent as
/// it came gets (see [`judged_relayed`]); none for most requests.
fn conditions_of(headers: &HeaderMap) -> Option<HeaderMap> {
    if !(carries_validators(headers) || carries_preconditions(headers)) {
        return None;
    }
    let mut kept = HeaderMap::new();
    for name in [
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_UNMODIFIED_SINCE,
    ] {
        for value in headers.get_all(&name) {
            kept.append(name.clone(), value.clone());
        }
    }
    Some(kept)
}

/// An answer relayed past the cache, judged by the client's `conditions`
/// as one from the cache is: an origin that ignores `If-Match` gave a
/// range sent on as it came (one portico does not cut, or one that waited
/// past another's fetch) a 200 or 206 where the same request a moment
/// later got its 412 from the cache (review54 M2). nginx judges them on
/// whatever it relays too.
fn judged_relayed(
    conditions: Option<HeaderMap>,
    response: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let Some(conditions) = conditions else {
        return response;
    };
    match preconditions(&conditions, response.status(), response.headers()) {
        None => response,
        made => bodiless_answer(made, response.into_parts().0),
    }
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
    /// The stored copy a revalidation may serve stale if it fails (its
    /// stale-if-error, or the leading request's, covers it now): a new
    /// body that breaks off is then such a failure (see
    /// `Capture::broken`).
    covered: Option<Arc<Entry>>,
}

impl Fetch {
    /// Relays the fetched response and stores it as it streams when
    /// RFC 9111 allows. The coalescing lock goes with the stored body, or
    /// its waiters are released at once when nothing will be stored; the
    /// lock itself is handed back then, for the caller to drop once the
    /// copy the answer replaced is gone (see [`revalidation::forget_if_replaced`]).
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
            covered,
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
                cache.default_ttl(),
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
            Ok(_) if declared.is_some_and(|n| n > cache.max_object_size()) => {
                cache.not_stored(fill.primary(), &request_headers, response.headers(), status);
                release_for(leader.as_ref(), status, true);
                format!("portico; fwd={fwd}{fwd_status}; detail=too-large")
            }
            Ok(lifetime) => {
                let mut stored = crate::cache::detached(response.headers());
                // What a cache behind portico did for this fetch is not true of
                // later hits.
                stored.remove(&CACHE_STATUS);
                // Trailers are not stored: a hit has none to announce, and
                // an announced digest kept every hit from being compressed
                // (review58 L1).
                stored.remove(header::TRAILER);
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
                    cc: cache.with_stale_default(cc),
                };
                // Stale on arrival (an old `Age` or `Date`), with no validator
                // and no stale window: it could never be served.
                if head.keep_for().is_zero() {
                    cache.not_stored(fill.primary(), &request_headers, response.headers(), status);
                    release_for(leader.as_ref(), status, true);
                    format!("portico; fwd={fwd}{fwd_status}; detail=no-freshness")
                } else {
                    let mut capture =
                        Capture::new(cache.clone(), fill, request_headers, head, leader.take());
                    if let Some(stale) = covered {
                        capture = capture.revalidating(stale);
                    }
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
                // Authorization; a HEAD, or a miss's 304 or 412 to the
                // client's own conditions, where no plain GET was fetched
                // instead: no background read free) hands the lock on,
                // once a burst (see `join`): the waiters' plain GETs may be
                // stored. Any other, the waiters would not have stored
                // either.
                let own_304 = fwd.ends_with("miss")
                    && match status {
                        StatusCode::NOT_MODIFIED => carries_validators(&request_headers),
                        StatusCode::PRECONDITION_FAILED => carries_preconditions(&request_headers),
                        _ => false,
                    };
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
    without_conditions(&mut parts.headers);
    without_range(&mut parts.headers);
    parts
}

/// Takes a client's range off a request portico sends for the whole
/// response (`If-Range` means nothing without `Range`).
fn without_range(headers: &mut HeaderMap) {
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A connection lost just before its head is retried on the same
        // backend, which may wait its head again; and a capped upstream's
        // first attempt may wait in line first (review53 L3).
        let mut one = crate::config::Upstream::new("a", vec!["127.0.0.1:1".parse().unwrap()]);
        one.retries = 2;
        let head = one.response_timeout + one.body_timeout.min(one.response_timeout) / 8;
        let each = one.connect_timeout + head;
        assert!(revalidation_wait(&one) > each * 3);
        one.backends[0].max_conns = 4;
        assert!(revalidation_wait(&one) > each * 3 + one.queue_timeout);
    }
}
