//! Revalidation of a stored entry with its backend (RFC 9111 §4.3), in
//! the request or in the background, and what a 304 or a full answer does
//! to the stored copy.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::{
    answer_own, answered_request_time, asks_range, cut_range, from_entry, release, unconditional,
    without_conditions, without_range, Fetch, Own, CACHE_STATUS,
};
use crate::cache::capture;
use crate::cache::lock::{Claim, Leader, Locks};
use crate::cache::policy::{self, CacheControl, Timing};
use crate::cache::{Cache, Entry};
use crate::proxy::body::{ProxyBody, RequestBody};
use crate::proxy::error::ProxyError;
use crate::proxy::headers;
use crate::proxy::{forward_with_retries, Trace};
use crate::task::ReadPermit;
use crate::upstream::Upstream;

/// What a 304 answering portico's revalidation of `entry` comes to.
pub(super) enum Revalidated {
    /// It names another validator (RFC 9111 §4.3.4): it cannot update the
    /// entry, and the stored body is not known to be current.
    Mismatch,
    /// The entry refreshed with its fields, to be stored...
    Store(Entry),
    /// ... or served this once, when the entry it makes may not be stored
    /// (the 304 says `no-store` or `private`, or leaves it no freshness):
    /// the stale copy of this variant then goes too...
    Once(Entry),
    /// ... or served once to a logged-in client whose 304 does not make
    /// its answer everyone's: the copy everyone else gets stays as it was.
    Personal(Entry),
}

pub(super) fn judge_304(
    cache: &Cache,
    entry: &Entry,
    not_modified: &HeaderMap,
    fetch: &Fetch,
) -> Revalidated {
    if !policy::selects(&entry.headers, not_modified) {
        return Revalidated::Mismatch;
    }
    let (headers, arrived) = merged(cache, entry, not_modified);
    // The stored response updated is judged as any response is, by its
    // fields and status: not by the 304's alone, which need not repeat a
    // `CDN-Cache-Control` that overrides its `Cache-Control` (RFC 9213:
    // every revalidation of a "portico max-age, browsers no-store" entry
    // dropped it, and the requests behind it each fetched the whole
    // response, cache55 M1), and never with `default_ttl` for a status
    // that does not get it (a 302 or 500 revalidated was served for
    // `default_ttl`, cache55 L2).
    let cc = policy::parse_response(&headers);
    // The response's own terms decide whether the copy goes (a client with
    // `Authorization` revalidating a copy stored for everyone does not
    // make it personal, review64 H2); but an authorized request's 304
    // refreshes the shared copy only where its answer may be stored (RFC
    // 9111 §3.5: `public`, `s-maxage`, `must-revalidate`), or its fields
    // (a longer lifetime, a `Link` of the user's) went to everyone
    // (review65 M1): else it is served once, the copy left as it was.
    let authorized = fetch.request_headers.contains_key(header::AUTHORIZATION);
    let shared = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
    let storable = policy::storable(
        &Method::GET,
        &HeaderMap::new(),
        &fetch.request_cc,
        entry.status,
        &headers,
        &cc,
        cache.default_ttl(),
    );
    let lifetime = match &storable {
        Ok(lifetime) => *lifetime,
        Err(_) => policy::explicit_lifetime(&headers, &cc).unwrap_or_default(),
    };
    // The response is as old as the 304 says (its own Date and Age), not
    // as the merged fields say: an Age or Date kept from the first
    // response would age the refreshed entry from the start.
    let timing = Timing::new(not_modified, fetch.request_time, arrived);
    let updated = refreshed(
        entry,
        headers,
        cache.with_stale_default(cc),
        lifetime,
        timing,
    );
    match storable {
        Ok(_) if !authorized || shared => Revalidated::Store(updated),
        // A logged-in client's answer says nothing of what everyone else
        // gets (as in `store_or_relay`).
        _ if authorized => Revalidated::Personal(updated),
        _ => Revalidated::Once(updated),
    }
}

/// Stores or drops what [`judge_304`] made of a 304 (not a mismatch), and
/// tells the requests waiting on `fetch`: the refreshed entry is theirs;
/// one served once and dropped (`private`, `no-store`) lets them go, each
/// to revalidate on its own rather than one after another.
pub(super) async fn keep_304(cache: &Cache, fetch: &mut Fetch, judged: Revalidated) {
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
        // The copy stays, and the lock is handed on, once a burst, so that
        // one waiter revalidates it for the rest (review65 L3).
        Revalidated::Personal(_) => {
            if !fetch.leader.as_ref().is_some_and(Leader::may_hand_on) {
                release(fetch.leader.as_ref());
            }
        }
        Revalidated::Once(_) => {
            // This variant's copy only (as `forget_if_replaced` drops
            // one): the URL's others, and fetches of them under way, are
            // still what the origin serves (cache55 L1). Dropped before its
            // waiters go, and they fetch as a miss: none revalidates the
            // copy on its way out.
            if let Some(full) = cache.key_for(fetch.fill.primary(), &fetch.request_headers) {
                cache.forget_variant(&full).await;
            }
            if let Some(leader) = &fetch.leader {
                leader.release_replacing();
            }
        }
        Revalidated::Mismatch => {}
    }
}

/// Adds our validators to a request for a stored entry. The client's own
/// are taken off in any case: a 304 to them would not revalidate it.
pub(super) fn conditional(parts: &mut Parts, entry: &Entry) {
    without_conditions(&mut parts.headers);
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
pub(super) fn stale_on_error(
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

/// The stored entry's fields updated by a 304 (RFC 9111 §4.3.4): its
/// fields replace the stored ones; and when it came.
fn merged(
    cache: &Cache,
    entry: &Entry,
    not_modified: &HeaderMap,
) -> (HeaderMap, std::time::SystemTime) {
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
            // No trailers are stored (review60 L2: brought back by a 304,
            // an announced digest kept every hit uncompressed again).
            || name == header::TRAILER
            || crate::proxy::error::is_rate_limit_field(name.as_str())
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
    (headers, arrived)
}

/// The stored entry updated by a 304: its `headers` (see [`merged`]),
/// the body stays.
fn refreshed(
    entry: &Entry,
    headers: HeaderMap,
    cc: CacheControl,
    lifetime: Duration,
    timing: Timing,
) -> Entry {
    let refreshed = Entry::new(
        entry.status,
        entry.reason.clone(),
        // The 304's values are slices of its connection's read buffer.
        crate::cache::detached(&headers),
        entry.body.clone(),
        timing,
        lifetime,
        cc,
    );
    // The same body: its gzip form saves no more than it did (review60
    // L4: each revalidation had one gzip hit compress it anew).
    refreshed.inherit_incompressible(entry);
    refreshed
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn revalidate(
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
    let client = crate::proxy::copy_head(&parts);
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
    let asked = request_cc.stale_if_error;
    let stale_copy_age = || {
        let age = entry.timing.current_age(cache.now());
        policy::stale_if_error(entry.lifetime, age, &entry.cc, asked).then_some(age)
    };
    let mut fetch = Fetch {
        request_headers,
        request_cc,
        is_head,
        fill: cache.begin_fill(primary),
        request_time,
        leader,
        fwd,
        covered: stale_copy_age().is_some().then(|| entry.clone()),
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
                    // The waiters are told it failed all the same where the
                    // copy may be served stale at all: one that asked for
                    // it with its own `stale-if-error` takes it, where
                    // each went to the failing backend on its own, and
                    // behind a hung one waited another `response_timeout`
                    // (review56 L1); the others fetch alone, as released.
                    match &fetch.leader {
                        Some(leader) if !entry.cc.forbids_stale() => {
                            leader.failed(error.status().as_u16());
                        }
                        leader => release(leader.as_ref()),
                    }
                    cache.counters.miss.inc();
                    return Err(error);
                };
                let code = error.status();
                if let Some(leader) = &fetch.leader {
                    leader.failed(code.as_u16());
                }
                entry.failed_at(cache.now(), code.as_u16());
                return Ok(stale_on_error(cache, &entry, age, &client, fwd, code, ""));
            }
        };
        if response.status() == StatusCode::NOT_MODIFIED && validated && !refetched {
            let judged = judge_304(cache, &entry, response.headers(), &fetch);
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
                Revalidated::Store(updated)
                | Revalidated::Once(updated)
                | Revalidated::Personal(updated) => updated,
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
            entry.failed_at(cache.now(), code.as_u16());
            return Ok(stale_on_error(cache, &entry, age, &client, fwd, code, ""));
        }
        cache.counters.miss.inc();
        let primary = fetch.fill.primary().to_owned();
        let (response, leader) = fetch.store_or_relay(cache, upstream, response, in_flight);
        forget_if_replaced(cache, &primary, &client.headers, &response, leader).await;
        // The client's preconditions are judged before its range, there.
        if ranged {
            return Box::pin(cut_range(cache, upstream, client, response, trace)).await;
        }
        return Ok(answer_own(Own { client, permit }, response).map(ProxyBody::read_ahead));
    }
}

/// Background revalidation for stale-while-revalidate: refreshes or
/// replaces the entry; the client was already answered.
pub(super) async fn refresh(
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
    // The variant is the client's: its fields key what is stored, as
    // they keyed the lock (review57 L3: under `Vary: Cache-Control` the
    // refresh stored another variant).
    let mut fetch = Fetch {
        request_headers: parts.headers.clone(),
        request_cc: policy::parse_request(&parts.headers),
        is_head: false,
        fill: cache.begin_fill(primary),
        request_time: cache.now(),
        leader: Some(leader),
        fwd: "stale",
        covered: None,
    };
    // But the request does not carry what the client asked of caches: the
    // refresh is this cache's own, and the client's `only-if-cached` (or
    // `max-stale`, `min-fresh`) sent on had a cache behind answer 504 and
    // the entry go unrefreshed (review56 M1).
    parts.headers.remove(header::CACHE_CONTROL);
    parts.headers.remove(header::PRAGMA);
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
            Err(error) => {
                entry.failed_at(cache.now(), error.status().as_u16());
                return failed(&error);
            }
        };
    fetch.request_time = answered_request_time(&cache, fetch.request_time, &trace);
    if response.status() == StatusCode::NOT_MODIFIED {
        match judge_304(&cache, &entry, response.headers(), &fetch) {
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
        entry.failed_at(cache.now(), response.status().as_u16());
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
pub(super) async fn forget_if_replaced(
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
