//! Unsafe requests on a caching proxy: forwarded, and the invalidation
//! they owe the cache (RFC 9111 §4.4) paid by how the exchange ends.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Response, StatusCode};

use crate::cache::{key, Cache};
use crate::proxy::body::RequestBody;
use crate::proxy::error::ProxyError;
use crate::proxy::{forward_with_retries, Trace};
use crate::task::Places;
use crate::upstream::health::InFlight;
use crate::upstream::Upstream;
use crate::upstream::UpstreamBody;

/// The invalidation an unsafe request owes the cache (RFC 9111 §4.4),
/// paid by [`forward_write`] once the exchange with the backend ends.
pub(in crate::proxy) struct Owed {
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
    /// [`Proxy::writes_under_way`]: crate::proxy::Proxy::writes_under_way
    writes: Arc<Places>,
}

impl Owed {
    pub(in crate::proxy) fn new(
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
    ///
    /// Those waits hold at most [`AGAIN_MAX_BYTES`] between them, their
    /// URLs and [`AGAIN_FLOOR`] each: unbounded, 2,000 failed writes with
    /// long targets held 128 MB for `response_timeout` (panic56 M1). Past
    /// it, a write is invalidated once, as before review38e, and an info
    /// line says so once a minute.
    async fn failed(self: Arc<Self>, error: &ProxyError, acted: bool, again: Duration) {
        if !(acted || error.may_have_acted()) {
            return;
        }
        self.unanswered().await;
        let Some(held) = AgainHeld::take(AGAIN_FLOOR + self.host.len() + self.target.len()) else {
            static REFUSED: crate::logging::Every = crate::logging::Every::new();
            if let Some(held_back) = REFUSED.due(60) {
                tracing::info!(
                    held_back,
                    "a failed write's URL is invalidated once, not again after response_timeout: the writes waiting to do so hold their budget"
                );
            }
            return;
        };
        tokio::spawn(async move {
            let _held = held;
            tokio::time::sleep(again).await;
            self.unanswered().await;
        });
    }
}

/// The most that writes waiting to invalidate again hold at once (see
/// [`Owed::failed`]): their URLs (host and target) and [`AGAIN_FLOOR`]
/// each, some 4,000 waits.
const AGAIN_MAX_BYTES: usize = 16 << 20;

/// What a wait holds besides its URL: its task and future (2.4 KB
/// measured), its share of the write's state. Counted by URL alone, 2-byte
/// URLs allowed half a million waits, 1.3 GB (review66 M1).
const AGAIN_FLOOR: usize = 4 << 10;

/// Bytes of URLs held by writes waiting to invalidate again.
static AGAIN: Budget = Budget(std::sync::atomic::AtomicUsize::new(0));

/// Bytes held by waits, of [`AGAIN_MAX_BYTES`].
struct Budget(std::sync::atomic::AtomicUsize);

/// A wait's share of a [`Budget`], given back when it ends.
struct AgainHeld(&'static Budget, usize);

impl AgainHeld {
    fn take(bytes: usize) -> Option<Self> {
        AGAIN.take(bytes)
    }
}

impl Budget {
    fn take(&'static self, bytes: usize) -> Option<AgainHeld> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= AGAIN_MAX_BYTES).then_some(held + bytes)
            })
            .ok()
            .map(|_| AgainHeld(self, bytes))
    }
}

impl Drop for AgainHeld {
    fn drop(&mut self) {
        (self.0)
            .0
            .fetch_sub(self.1, std::sync::atomic::Ordering::AcqRel);
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
pub(in crate::proxy) async fn forward_write(
    upstream: &Arc<Upstream>,
    mut parts: Parts,
    mut body: RequestBody,
    trace: &mut Trace,
    owed: Owed,
) -> Result<(Response<UpstreamBody>, InFlight), ProxyError> {
    let sent = crate::proxy::Sent::default();
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
    sent: crate::proxy::Sent,
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
pub(in crate::proxy) async fn invalidate(
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
    if let std::borrow::Cow::Owned(normal) = crate::proxy::route::routing_path(path) {
        if normal != path {
            let normal = normal + query;
            cache.invalidate(&key::primary(scheme, host, &normal)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, AGAIN_MAX_BYTES};

    /// Writes waiting to invalidate again hold at most
    /// [`AGAIN_MAX_BYTES`] of URLs, each its share until it ends
    /// (panic56 M1).
    #[test]
    fn waits_to_invalidate_again_hold_a_bounded_share() {
        let budget: &'static Budget = Box::leak(Box::new(Budget(0.into())));
        let most = budget.take(AGAIN_MAX_BYTES - 10).unwrap();
        let some = budget.take(10).unwrap();
        assert!(budget.take(1).is_none());
        drop(some);
        assert!(budget.take(11).is_none());
        assert!(budget.take(10).is_some());
        drop(most);
        assert!(budget.take(AGAIN_MAX_BYTES).is_some());
    }
}
