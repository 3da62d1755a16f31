//! The order backend's HTTP layer: routing, JSON in and out, ETags and
//! conditional GETs. Every answer carries `X-Backend: NAME`. Besides the
//! order API it has three helpers for proxy tests: `POST /echo` (or GET)
//! streams the body back, `GET /echo/headers` shows the request headers it received,
//! `GET /bytes/{n}` returns n deterministic bytes, and `GET /ws/echo`
//! upgrades the connection and echoes raw bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use super::model::NewOrder;
use super::service::{OrderService, ServiceError};
use super::BackendOptions;

/// Largest order body accepted.
const MAX_ORDER_BODY: usize = 2 * 1024 * 1024;
/// Largest `/bytes/{n}`, and `size` of `/cache/...`.
const MAX_BYTES: usize = 64 * 1024 * 1024;

pub type Body = Either<Full<Bytes>, Either<Incoming, Chunked>>;

/// A body sent without a length, so chunked (`chunked=1` on `/cache/...`).
/// `Chunked(None)` is empty, and says so only once polled.
#[derive(Debug)]
pub struct Chunked(pub Option<Bytes>);

impl http_body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.get_mut()
                .0
                .take()
                .map(|data| Ok(http_body::Frame::data(data))),
        )
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct Context {
    pub opts: BackendOptions,
    pub name: HeaderValue,
    pub cache_control: HeaderValue,
    pub service: OrderService,
    pub requests: AtomicU64,
    pub orders_created: AtomicU64,
    /// Places for requests being served (see `BackendOptions::concurrency`).
    places: Option<tokio::sync::Semaphore>,
}

impl Context {
    pub fn new(opts: BackendOptions, service: OrderService) -> Self {
        let name = HeaderValue::from_str(&opts.name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        let cache_control = HeaderValue::from_str(&format!("public, max-age={}", opts.max_age))
            .expect("digits are a valid header value");
        Context {
            places: opts.concurrency.map(tokio::sync::Semaphore::new),
            opts,
            name,
            cache_control,
            service,
            requests: AtomicU64::new(0),
            orders_created: AtomicU64::new(0),
        }
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(body.into())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => full(status, "application/json", body),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode response"),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Strong or weak, an entity tag without its `W/` prefix.
fn opaque(tag: &str) -> &str {
    tag.trim().strip_prefix("W/").unwrap_or(tag.trim())
}

/// RFC 9110 §13.1.2: `If-None-Match` uses the weak comparison; `*` matches
/// any current representation.
pub fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || opaque(tag) == opaque(etag))
}

fn parse_id(segment: &str) -> Option<u64> {
    // Digits only: "+1" or " 1" are not ids; nor is "01", which would make
    // a second URL for user 1's list, one a cache invalidates apart.
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if segment.len() > 1 && segment.starts_with('0') {
        return None;
    }
    segment.parse().ok()
}

/// Serves one request.
pub async fn handle(ctx: Arc<Context>, request: Request<Incoming>) -> Response<Body> {
    ctx.requests.fetch_add(1, Ordering::Relaxed);
    // Held until the answer is made; never closed, so the wait ends.
    let _place = match &ctx.places {
        Some(places) => places.acquire().await.ok(),
        None => None,
    };
    if !ctx.opts.delay.is_zero() {
        tokio::time::sleep(ctx.opts.delay).await;
    }
    // What a developer watching one instance wants to see at debug level
    // (review35c: nothing was said per request at any level). The method
    // and path are copied only when the line is wanted.
    let asked = tracing::enabled!(tracing::Level::DEBUG)
        .then(|| (request.method().clone(), request.uri().path().to_owned()));
    let mut response = route(&ctx, request).await;
    if let Some((method, path)) = asked {
        tracing::debug!(name = %ctx.opts.name, %method, path, status = response.status().as_u16(), "request");
    }
    response.headers_mut().insert("x-backend", ctx.name.clone());
    response
}

async fn route(ctx: &Context, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    // One slash off, not all: `//users/1/orders` is not a second URL of
    // user 1's list (which a cache would invalidate apart), but a 404, as
    // `/users//1/orders` is.
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(&path).split('/').collect();
    let method = request.method().clone();
    let read = method == Method::GET || method == Method::HEAD;
    match segments.as_slice() {
        ["health"] if read => json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ok", "name": ctx.opts.name }),
        ),
        ["health"] => method_not_allowed("GET, HEAD"),
        ["users", id, "orders"] => {
            let Some(user_id) = parse_id(id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "user id must be a whole number from 0 to 18446744073709551615, without leading zeros",
                );
            };
            if read {
                list_orders(ctx, user_id, request.headers())
            } else if method == Method::POST {
                create_order(ctx, user_id, request).await
            } else {
                method_not_allowed("GET, HEAD, POST")
            }
        }
        ["orders", id] if read => match ctx.service.order(id) {
            Ok(order) => {
                let mut response = json(StatusCode::OK, &order);
                // The status changes behind the client's back: never cache.
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            Err(e) => error(StatusCode::NOT_FOUND, &e.to_string()),
        },
        ["orders", _] => method_not_allowed("GET, HEAD"),
        // HEAD wherever GET is (RFC 9110 §9.1; backend53 L6: a 405).
        ["echo"] if method == Method::POST || read => {
            let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
            let mut response = Response::new(Either::Right(Either::Left(request.into_body())));
            if let Some(ct) = content_type {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            response
        }
        ["echo"] => method_not_allowed("GET, HEAD, POST"),
        ["ws", "echo"] if method == Method::GET => upgrade_echo(request),
        // The other methods on the test endpoints are 405s with `Allow`,
        // as on the API's (backend53 L6: 404s).
        ["ws", "echo"] => method_not_allowed("GET"),
        ["cache", _] | ["echo", "headers"] | ["bytes", _] if !read => {
            method_not_allowed("GET, HEAD")
        }
        ["cache", _] => cache_test(ctx, &request),
        ["echo", "headers"] => {
            let mut seen: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
            for (name, value) in request.headers() {
                seen.entry(name.as_str())
                    .or_default()
                    .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
            json(StatusCode::OK, &seen)
        }
        ["bytes", n] => match parse_id(n).map(|n| n as usize) {
            Some(n) if n <= MAX_BYTES => {
                // a..z over and over, made by doubling copies: a byte at a
                // time took seconds for 60 MB in a debug build.
                let mut body = b"abcdefghijklmnopqrstuvwxyz".repeat(n / 26 + 1);
                body.truncate(n);
                let mut response = full(StatusCode::OK, "application/octet-stream", body);
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, ctx.cache_control.clone());
                response
            }
            _ => error(StatusCode::BAD_REQUEST, "n must be a number up to 67108864"),
        },
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Test helper for protocol upgrades: answers `101 Switching Protocols` to
/// any `Upgrade` request and then echoes every byte it receives. It speaks
/// no WebSocket framing; it exists to prove a proxy bridges the raw stream.
fn upgrade_echo(mut request: Request<Incoming>) -> Response<Body> {
    let Some(protocol) = request.headers().get(header::UPGRADE).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "this endpoint needs an Upgrade header",
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut reader, mut writer) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    });
    let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(header::UPGRADE, protocol);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response
}

/// Test helper for caches: answers with the headers the query asks for
/// (`cc`, or `cc_cookie` for a request with a Cookie, `vary`, `etag`, `lm`,
/// `expires`, `cookie=1`, `status`) and a body
/// naming the instance and its request count, so a test can tell a cached
/// answer from a fresh one; `size=N` pads that body to N bytes, and
/// `chunked=1` sends it without a length.
/// Honours `If-None-Match` against `etag`, and says what `Range` it was
/// sent in `x-seen-range` (it ignores it and answers whole).
fn cache_test(ctx: &Context, request: &Request<Incoming>) -> Response<Body> {
    let mut params: std::collections::HashMap<&str, String> = Default::default();
    for pair in request.uri().query().unwrap_or("").split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            params.insert(
                k,
                v.replace("%20", " ")
                    .replace("%2C", ",")
                    .replace("%22", "\""),
            );
        }
    }
    let status = params
        .get("status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    // A 1xx is no final answer (hyper would send none at all), and codes
    // past 599 are none of HTTP's (RFC 9110 §15).
    if status.is_informational() || status.as_u16() > 599 {
        return error(StatusCode::BAD_REQUEST, "status must be 200 to 599");
    }
    let etag = params.get("etag").map(|e| format!("\"{e}\""));
    let not_modified = etag
        .as_deref()
        .is_some_and(|e| none_match(request.headers(), e));
    let mut response = if not_modified {
        let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let body = serde_json::json!({
            "backend": ctx.opts.name,
            "n": ctx.requests.load(Ordering::Relaxed),
            "path": request.uri().path(),
        });
        let mut text = serde_json::to_vec(&body).unwrap_or_default();
        match params.get("size").map(|s| s.parse::<usize>()) {
            None => {}
            Some(Ok(size)) if size <= MAX_BYTES => pad(&mut text, size),
            // Unbounded, one request's allocation failing aborted the
            // process, and with it the demo's proxy (review31d F1).
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "size must be a number up to 67108864",
                )
            }
        }
        let mut response = full(status, "application/json", Bytes::new());
        // RFC 9110 §15.3.5, §15.3.6: a 204 or a 205 has no content
        // (backend53 L7: a 205 sent the JSON).
        if matches!(status, StatusCode::NO_CONTENT | StatusCode::RESET_CONTENT) {
            text.clear();
        }
        let text = Bytes::from(text);
        *response.body_mut() = if params.contains_key("chunked") {
            Either::Right(Either::Right(Chunked(Some(text))))
        } else {
            Either::Left(Full::new(text))
        };
        response
    };
    if let Some(range) = request.headers().get(header::RANGE) {
        response.headers_mut().insert("x-seen-range", range.clone());
    }
    let headers = response.headers_mut();
    let mut set = |name: header::HeaderName, value: Option<String>| {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, value);
        }
    };
    let cc = match params.get("cc_cookie") {
        Some(cc) if request.headers().contains_key(header::COOKIE) => Some(cc),
        _ => params.get("cc"),
    };
    set(header::CACHE_CONTROL, cc.cloned());
    set(header::VARY, params.get("vary").cloned());
    set(header::ETAG, etag);
    set(header::LAST_MODIFIED, params.get("lm").cloned());
    set(header::EXPIRES, params.get("expires").cloned());
    if params.contains_key("cookie") {
        set(header::SET_COOKIE, Some("session=abc; Path=/".into()));
    }
    response
}

/// Grows the JSON object `text` to `size` bytes with a `pad` member whose
/// characters repeat only every 251, so a byte range cut from the wrong
/// place shows.
fn pad(text: &mut Vec<u8>, size: usize) {
    const MEMBER: &[u8] = b",\"pad\":\"";
    if text.last() != Some(&b'}') || size < text.len() + MEMBER.len() + 1 {
        return;
    }
    text.pop();
    text.extend_from_slice(MEMBER);
    const CHARS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let digits = size - text.len() - 2;
    text.extend((0..digits).map(|i| CHARS[i % 251 % CHARS.len()]));
    text.extend_from_slice(b"\"}");
}

fn list_orders(ctx: &Context, user_id: u64, headers: &HeaderMap) -> Response<Body> {
    let (orders, version) = match ctx.service.orders_of(user_id) {
        Ok(found) => found,
        Err(e) => return error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let etag = format!("\"u{user_id}-v{version}\"");
    let etag_value = HeaderValue::from_str(&etag).expect("digits and quotes are a valid value");
    let mut response = if none_match(headers, &etag) {
        let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        json(StatusCode::OK, &orders)
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag_value);
    headers.insert(header::CACHE_CONTROL, ctx.cache_control.clone());
    response
}

async fn create_order(ctx: &Context, user_id: u64, request: Request<Incoming>) -> Response<Body> {
    // RFC 9110 §15.5.16: a content coding the server does not decode is a
    // 415 too, not a body that fails to parse.
    let coded = request
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let unsupported = match (is_json(request.headers()), coded) {
        (false, _) => Some("an order is sent as application/json"),
        (true, true) => Some("an order is sent without a content coding"),
        (true, false) => None,
    };
    if let Some(why) = unsupported {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, why);
    }
    // Refused on its declared length, before hyper answers an `Expect:
    // 100-continue` by inviting the upload.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_ORDER_BODY as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large: an order is at most 2 MiB",
        );
    }
    let body = match Limited::new(request.into_body(), MAX_ORDER_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large: an order is at most 2 MiB",
            );
        }
        Err(_) => return error(StatusCode::BAD_REQUEST, "body could not be read"),
    };
    let new = match parse_order(&body) {
        Ok(new) => new,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid order: {e}")),
    };
    match ctx.service.create(user_id, new) {
        Ok(order) => {
            ctx.orders_created.fetch_add(1, Ordering::Relaxed);
            let mut response = json(StatusCode::CREATED, &order);
            if let Ok(location) = HeaderValue::from_str(&format!("/orders/{}", order.id)) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(e @ ServiceError::Invalid(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ ServiceError::Busy) => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        Err(e) => error(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

/// An order as JSON objects only: serde would also take a struct as an
/// array of its fields in order (`[[["A-1",2]],1999,"a@b.c"]`), a form no
/// client is told of and which `deny_unknown_fields` cannot check.
fn parse_order(body: &[u8]) -> Result<NewOrder, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        // Beyond what a double holds (`1e400`): serde says only "number out
        // of range", not which or what is allowed (review41c F5).
        let text = e.to_string();
        match text.strip_prefix("number out of range") {
            Some(at) => format!(
                "a number is out of range{at}: amount_cents is a whole number from 1 to 9007199254740991, qty one from 1 to 4294967295"
            ),
            None => text,
        }
    })?;
    let items = value.get("items").and_then(serde_json::Value::as_array);
    if !value.is_object() || items.is_some_and(|items| !items.iter().all(|i| i.is_object())) {
        return Err("an order and each of its items are JSON objects".to_owned());
    }
    // Numbers out of range, or not numbers, said as the rules say them,
    // not as serde's "invalid value: integer -5, expected u64" (review35c
    // 5, review35d 6).
    let whole = |v: &serde_json::Value, max: u64| v.as_u64().is_some_and(|n| n <= max);
    if value
        .get("amount_cents")
        .is_some_and(|v| !whole(v, u64::MAX))
    {
        return Err("amount_cents must be a whole number from 1 to 9007199254740991".to_owned());
    }
    let qty_out = items
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("qty"))
        .any(|qty| !whole(qty, u32::MAX.into()));
    if qty_out {
        return Err("qty must be a whole number from 1 to 4294967295".to_owned());
    }
    // From the bytes, not the value: a `Value` keeps the last of two
    // members with one name, where the struct refuses the duplicate (a
    // gateway that checks the first would pass another one on).
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Whether a request body is declared JSON (`application/json`, with any
/// parameters, or a `+json` type). One that declares nothing is taken as
/// JSON; curl's `-d` alone declares a form, which is refused.
fn is_json(headers: &HeaderMap) -> bool {
    let mut lines = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = lines.next() else {
        return true;
    };
    // Content-Type is one value (RFC 9110 §8.3): two lines say two things.
    if lines.next().is_some() {
        return false;
    }
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers out of range are refused in the rules' words (review35c 5).
    #[test]
    fn out_of_range_numbers_are_said_plainly() {
        let order = |amount: &str, qty: &str| {
            let text = format!(
                r#"{{"items":[{{"sku":"A-1","qty":{qty}}}],"amount_cents":{amount},"email":"a@b"}}"#
            );
            parse_order(text.as_bytes()).map(drop)
        };
        assert_eq!(order("5", "1"), Ok(()));
        for amount in ["-5", "1.5", "1e30", "\"100\""] {
            let refused = order(amount, "1").unwrap_err();
            assert!(
                refused.starts_with("amount_cents must be a whole number"),
                "{amount}: {refused}"
            );
        }
        for qty in ["-1", "99999999999999", "2.5"] {
            let refused = order("5", qty).unwrap_err();
            assert!(
                refused.starts_with("qty must be a whole number"),
                "{qty}: {refused}"
            );
        }
        // Beyond a double's range: which rules, where (review41c F5).
        for (amount, qty) in [("1e400", "1"), ("5", "-1e999")] {
            let refused = order(amount, qty).unwrap_err();
            assert!(
                refused.starts_with("a number is out of range at line 1 column")
                    && refused.contains("amount_cents is a whole number from 1"),
                "{amount} {qty}: {refused}"
            );
        }
    }

    #[test]
    fn ids_are_digits_without_leading_zeros() {
        for (segment, want) in [("1", Some(1)), ("0", Some(0)), ("10", Some(10))] {
            assert_eq!(parse_id(segment), want, "{segment}");
        }
        for segment in ["", "01", "001", "+1", " 1", "1a"] {
            assert_eq!(parse_id(segment), None, "{segment}");
        }
    }

    #[test]
    fn orders_are_json_or_undeclared() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            is_json(&headers)
        };
        assert!(is_json(&HeaderMap::new()));
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/vnd.order+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-www-form-urlencoded"));
        // Two lines are not one type (review30c F4).
        let mut two = HeaderMap::new();
        two.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        two.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&two));
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["\"u1-v1\""], "\"u1-v1\"", true),
            (&["W/\"u1-v1\""], "\"u1-v1\"", true),
            (&["\"a\", \"u1-v1\""], "\"u1-v1\"", true),
            (&["\"a\"", "\"u1-v1\""], "\"u1-v1\"", true),
            (&["*"], "\"u1-v1\"", true),
            (&["\"u1-v2\""], "\"u1-v1\"", false),
            (&[], "\"u1-v1\"", false),
            (&["garbage"], "\"u1-v1\"", false),
        ];
        for (values, etag, want) in cases {
            let mut headers = HeaderMap::new();
            for v in *values {
                headers.append(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
            }
            assert_eq!(none_match(&headers, etag), *want, "{values:?} vs {etag}");
        }
    }

    #[test]
    fn ids_are_plain_digits() {
        for (input, want) in [
            ("1", Some(1)),
            ("42", Some(42)),
            ("+1", None),
            ("", None),
            ("x", None),
            ("99999999999999999999", None),
        ] {
            assert_eq!(parse_id(input), want, "{input}");
        }
    }
}
