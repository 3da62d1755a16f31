//! Sending a request to a backend of its upstream, and again to another
//! when the first failed in a way that allows it: which failures, how
//! often (`retries`, the retry budget), and what each attempt counts.

use std::future::Future;

use http::{Request, Response, Version};

use super::body::RequestBody;
use super::error::ProxyError;
use super::{
    copy_head, discard_unsent, is_idempotent, reads_off, Sent, Trace, CLIENT_CLOSED,
    STALE_RACE_SECONDS,
};
use crate::upstream::health::InFlight;
use crate::upstream::select::Tried;
use crate::upstream::{Unpicked, Upstream, UpstreamBody};

/// Sends the request to a backend picked by the upstream's balancer. An
/// idempotent request without a body is retried on a different backend
/// (the same one when it is the only one left) after a connect failure or
/// a connection lost before the response head, and, under
/// `retry_on_timeout`, on another one only after no head came within
/// `response_timeout`. Any request, POST included, is retried elsewhere
/// when the backend refused the connection before a byte of it was sent;
/// once bytes may have reached a backend, a request with a body is never
/// sent again. Retries stop at `retries` and when the upstream's retry
/// budget runs out.
///
/// Not an `async fn`, for the reason [`Proxy::handle`](super::Proxy::handle) gives: the future
/// holds the request once, in `next`.
#[inline(always)]
pub(super) fn forward_with_retries<'a>(
    upstream: &'a Upstream,
    parts: http::request::Parts,
    mut body: RequestBody,
    trace: &'a mut Trace,
) -> impl Future<Output = Result<(Response<UpstreamBody>, InFlight), ProxyError>> + 'a {
    let retries = upstream.config.retries;
    let bodiless = http_body::Body::is_end_stream(&body);
    // Whether the upload is over when the answer comes (see `InFlight`).
    let upload = (!bodiless).then(|| body.end_marker());
    let idempotent = bodiless && is_idempotent(&parts.method);
    // Only requests that may loop keep a copy of their head: with
    // retries, or one that a pooled connection closing under it sends
    // again (see below).
    let replay = (retries > 0 || idempotent).then(|| copy_head(&parts));
    // Whether a body no backend took is read off before the error (see
    // `discard_unsent`), decided while the head is at hand: a POST keeps
    // no copy of it with `retries = 0`.
    let discards = !bodiless && parts.version < Version::HTTP_2 && reads_off(&parts);
    // Carried to the retries, whose heads are copies (see `Sent`).
    let sent = parts.extensions.get::<Sent>().cloned();
    let key = upstream.key_for(&parts, trace.client);
    let mut next = Some((parts, body));
    async move {
        // Counted once the request is under way, not when the future is
        // made: one dropped unpolled sent nothing.
        upstream.record_request();
        let mut tried = Tried::NONE;
        // Boxed: only an upstream with a `max_conns` waits here, and
        // inline the wait would grow every request's future.
        let taken = match upstream.take_first(key) {
            Ok(taken) => Ok(taken),
            Err(Unpicked::NoneUp) => Err(upstream.none_to_pick()),
            Err(Unpicked::Full) => {
                let since = std::time::Instant::now();
                let taken = Box::pin(upstream.wait_for_room(key)).await;
                trace.queued = Some(since.elapsed());
                taken
            }
        };
        let (mut index, mut slot) = match taken {
            Ok(taken) => taken,
            Err(error) => {
                let (_, body) = next.take().expect("the first attempt's request");
                return Err(Box::pin(discard_unsent(error, discards, body)).await);
            }
        };
        // A copy of the head for the next attempt, with the `Sent` mark.
        let retry_head = |head: &http::request::Parts| {
            let mut parts = copy_head(head);
            if let Some(sent) = &sent {
                parts.extensions.insert(sent.clone());
            }
            parts
        };
        let mut attempt = 0;
        let mut resent_stale = false;
        // Backends whose connect failed for this request, and those that
        // sent no head in time.
        let mut unreachable = Tried::NONE;
        let mut too_slow = Tried::NONE;
        loop {
            let (parts, body) = next.take().expect("every attempt has a request");
            // Parked with `retries = 0` too: a body no backend took is
            // read off (review51 L3: it went with the one attempt, and
            // the refused connect's 502 closed the connection).
            let (body, parked) = if !bodiless { body.park() } else { (body, None) };
            let backend = upstream.backend(index);
            trace.backend = Some(backend.addr);
            if let Some(sent) = &sent {
                sent.to(backend.addr);
            }
            let epoch = upstream.sending(index);
            let in_flight = slot;
            let waiting = Unanswered {
                metrics: &backend.metrics,
                state: backend.state(),
                epoch,
                sent: std::time::Instant::now(),
                open: true,
            };
            // A retry goes out on a new connection: the usual failure is a
            // pooled one the backend closed as it was reused, and the next
            // idle one may well have been closed the same way.
            let fresh = attempt > 0 || resent_stale;
            let result = upstream
                .send(index, Request::from_parts(parts, body), fresh)
                .await;
            let seconds = waiting.close();
            let error = match result {
                Ok(response) => {
                    backend.metrics.record(response.status().as_u16(), seconds);
                    // Judged at the body's end, where a body the backend
                    // breaks counts against it (a backend out comes back
                    // at the head, see `answered`); a tunnel at its 101,
                    // as nothing judges its end (review43a M2).
                    let epoch = upstream.answered(index, epoch);
                    let in_flight = if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        upstream.observe(index, true, epoch);
                        in_flight
                    } else {
                        in_flight.judged_at_end(epoch)
                    };
                    let in_flight = match &upload {
                        Some(upload) if !upload.is_set() => {
                            in_flight.answered_mid_upload(upload.watch())
                        }
                        _ => in_flight,
                    };
                    return Ok((response, in_flight));
                }
                Err(error) => error,
            };
            trace.acted |= error.may_have_acted();
            // A pooled connection the backend closed as the request went
            // out (its keep-alive ran out, hinted or not): sent again, once,
            // to the same backend on a new connection (see below). Only a
            // quick end is that race: a backend that dies while working on
            // the request is retried, or not, as `retries` says (review37e
            // M2).
            let resend = !resent_stale
                && idempotent
                && error.stale_connection()
                && seconds < STALE_RACE_SECONDS;
            // Every attempt counts, with how it ended: the backend's
            // failures, and the upload's (499, 408, 413, 400), which sent
            // it a cut request; only the former count against it, and
            // only their time is the backend's. The race sent again is no
            // failure of the backend's: the new connection says whether it
            // answers (a stale end not sent again still is, review37e M3).
            if let Some(failure) = error.backend_failure().filter(|_| !resend) {
                // Timed only when the time was the backend's answering: a
                // refused connect took a quarter of a millisecond, and
                // during an outage made its latency look better than ever
                // (review42d F2). A response timeout is a lower bound.
                if matches!(error, ProxyError::ResponseTimeout { .. }) {
                    backend.metrics.record(error.status().as_u16(), seconds);
                } else {
                    backend.metrics.count(error.status().as_u16());
                }
                backend.metrics.failed(failure);
                upstream.observe(index, false, epoch);
            } else {
                backend.state().no_verdict(epoch);
                // The race sent again is counted as a retry only: as a
                // 502 of the backend's, a backend whose every client got a
                // 200 looked half failing (review37f L5).
                if error.reached_for_backend() && !resend {
                    backend.metrics.count(error.status().as_u16());
                }
            }
            // A backend that sent no head in time may still be working on
            // the request: only an idempotent one goes elsewhere, and only
            // when `retry_on_timeout` says so (nginx's `proxy_next_upstream
            // timeout`, on by default there too), never to it again.
            let timed_out = matches!(error, ProxyError::ResponseTimeout { .. });
            let retry_body = if idempotent
                && (error.is_retryable() || (timed_out && upstream.config.retry_on_timeout))
            {
                Some(RequestBody::empty())
            } else if error.nothing_sent() {
                // A POST or PATCH without a body has none parked: it goes
                // again as it came, as one with a body does (review33a F1).
                if bodiless {
                    Some(RequestBody::empty())
                } else {
                    parked.and_then(super::body::Parked::reclaim)
                }
            } else {
                None
            };
            let Some(retry_body) = retry_body else {
                return Err(error);
            };
            // The keep-alive race (see `resend`): not one of `retries` nor
            // taken from the budget, as nginx does not count a failure on a
            // cached connection among its tries. With `retries = 0` the
            // race was a 502 (review36 carry-over).
            if resend {
                resent_stale = true;
                upstream.try_retry(true);
                // In the access line as in `portico_upstream_retries_total`
                // (review39d L2: the metric counted what no line showed).
                trace.retries += 1;
                tracing::debug!(
                    upstream = %upstream.name(), backend = %backend.addr, %error,
                    "pooled connection closed by the backend as it was reused; sending again on a new one"
                );
                trace.retried_at = Some(std::time::Instant::now());
                // Sent again only when idempotent, which keeps its head.
                let head = replay
                    .as_ref()
                    .expect("an idempotent request keeps its head");
                next = Some((retry_head(head), retry_body));
                // Its slot goes with it: the backend is the same.
                slot = in_flight;
                continue;
            }
            // Its slot is free for the retry (its own backend's, if that
            // is the one left) and for those waiting for room.
            drop(in_flight);
            // Where the request fails from here on, a body not sent is
            // read off.
            macro_rules! fail {
                ($error:expr) => {
                    return Err(Box::pin(discard_unsent($error, discards, retry_body)).await)
                };
            }
            if attempt >= retries {
                fail!(error);
            }
            // A backend not tried yet when there is one worth trying, else
            // one tried already (see `Upstream::pick`); with none up at
            // all, or no room in the budget, the original failure stands.
            tried = tried.with(index);
            if error.nothing_sent() {
                unreachable = unreachable.with(index);
            }
            if timed_out {
                too_slow = too_slow.with(index);
            }
            // Picked again among all, one whose connect failed or that
            // timed out is passed over for one reached before, if any is
            // left (review37g L1; review51 L4: the one that timed out was
            // picked again over one that had only lost its connection).
            let spent = unreachable.and(too_slow);
            let picked = match upstream.pick(tried, key) {
                Ok(again) if spent.contains(again) => upstream.pick(spent, key),
                picked => picked,
            };
            // A retry does not wait for room: with every backend at its
            // `max_conns`, the failure stands.
            let picked = picked
                .ok()
                .and_then(|again| Some((again, upstream.backend(again).take_slot()?)));
            let (retry_index, retry_slot) = match picked {
                // Every backend tried, and the one picked again could not
                // be reached: another round would only wait out the same
                // refusals or connect timeouts, `retries + 1` of them for a
                // black-holed upstream (review37a L1), where nginx stops
                // once each server was tried. One that was reached (its
                // connection lost before the head) may be tried again
                // (review37e L2).
                Some((again, _)) if unreachable.contains(again) => fail!(error),
                // Every backend tried: one that timed out, for this error
                // or an earlier one, would likely do so again, after as
                // long (review50b M3: asked again after a refused connect
                // elsewhere).
                Some((again, _)) if too_slow.contains(again) => fail!(error),
                Some(taken) if upstream.try_retry(error.nothing_sent()) => taken,
                Some(_) => {
                    // Said in the request's warning (review32c F4).
                    trace.budget_refused = true;
                    fail!(error);
                }
                None => fail!(error),
            };
            // As nginx logs each failed attempt: the client's answer,
            // and its access line, show only the last.
            // With the request's id and client, to pair it with its
            // access line under concurrency (review32c F4).
            // Once every few seconds a backend, as a request's own
            // failure is (see `Proxy::handle`).
            if let Some(held_back) = backend.failure_said(error.backend_failure(), true) {
                let request_id = head_request_id(replay.as_ref());
                let held_back = (held_back > 0).then_some(held_back);
                tracing::warn!(
                    upstream = %upstream.name(), backend = %backend.addr, %error,
                    same_backend = retry_index == index, client = trace.client.map(tracing::field::display),
                    request_id, held_back, "attempt failed; retrying"
                );
            }
            index = retry_index;
            slot = retry_slot;
            attempt += 1;
            trace.retries += 1;
            trace.retried_at = Some(std::time::Instant::now());
            let head = replay.as_ref().expect("retries > 0 keeps the head");
            next = Some((retry_head(head), retry_body));
        }
    }
}

/// The request id a copied head carries (set as the request was taken up
/// for its access line, or as it went to its first backend).
fn head_request_id(head: Option<&http::request::Parts>) -> Option<&str> {
    head?.headers.get(&super::log::X_REQUEST_ID)?.to_str().ok()
}

/// A request at a backend and not answered yet. Dropped so (its client
/// left, see [`Pending`](super::Pending)) it counts in `portico_upstream_requests_total`
/// as 499, as a failed attempt counts as 502 or 504; its connection is
/// closed with it, as nginx closes an upstream connection when the client
/// aborts. (An attempt that ends because the client's upload broke off is
/// the client's 400, and counts on the backend's side under no code.)
struct Unanswered<'a> {
    metrics: &'a crate::metrics::BackendMetrics,
    /// For a probe left so: no verdict (see `BackendState::no_verdict`).
    state: &'a crate::upstream::health::BackendState,
    epoch: u32,
    sent: std::time::Instant,
    open: bool,
}

impl Unanswered<'_> {
    /// The backend answered or failed: the seconds it took.
    fn close(mut self) -> f64 {
        self.open = false;
        self.sent.elapsed().as_secs_f64()
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.open {
            // Counted, not timed: how long the backend had been waited
            // for when the client left is the client's patience, not the
            // backend's latency.
            self.metrics.count(CLIENT_CLOSED);
            self.state.no_verdict(self.epoch);
        }
    }
}
