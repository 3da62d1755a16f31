//! The access log and request ids. One structured line per request on the
//! `portico::access` target (text or JSON, as `--log-format` says): time,
//! client, method, host, path, status, bytes, duration, upstream, backend,
//! cache result, request id. It is written when the response head is sent:
//! `bytes` is the body's declared length (`-` when streamed without one;
//! 0 for a HEAD, a 204 or a 304, which get none, as nginx's
//! `$body_bytes_sent`) and `duration` is the time to the response head.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::Entry;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};

use super::Conn;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Keeps a client's `X-Request-Id` (if it is short and printable) or sets a
/// fresh random one, so the backend and the log share it. Of several
/// lines the first is the id, as the log records it, and the only one
/// forwarded: a backend reading the last would log another id.
/// One lookup whether the id is kept, replaced or added.
pub fn ensure_request_id(headers: &mut HeaderMap) -> &HeaderValue {
    match headers.entry(&X_REQUEST_ID) {
        Entry::Occupied(mut id) => {
            let usable = !id.get().is_empty() && id.get().len() <= 128 && id.get().to_str().is_ok();
            if !usable {
                id.insert(new_request_id());
            } else if id.iter().nth(1).is_some() {
                let first = id.get().clone();
                id.insert(first);
            }
            id.into_mut()
        }
        Entry::Vacant(slot) => slot.insert(new_request_id()),
    }
}

/// 128 random bits as 32 lowercase hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    let bits = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    super::headers::shared_value(&out).expect("hex digits are a valid header value")
}

/// A duration in milliseconds to the microsecond, as the access line
/// writes it: `0.533`, not `0.5337109999999999`.
fn millis(duration: std::time::Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

/// What the access line needs from the request, taken before the request is
/// consumed. Cheap clones: `Uri` and header values share their bytes.
#[derive(Debug)]
pub struct AccessRecord {
    client: SocketAddr,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    request_id: HeaderValue,
}

impl AccessRecord {
    /// `None` when the access log is filtered out, so a disabled log costs
    /// nothing per request.
    /// The request's id is the one [`ensure_request_id`] set.
    pub fn capture<B>(request: &Request<B>, conn: &Conn) -> Option<Self> {
        if !tracing::enabled!(target: "portico::access", tracing::Level::INFO) {
            return None;
        }
        Some(AccessRecord {
            client: conn.peer,
            method: request.method().clone(),
            uri: request.uri().clone(),
            host: request.headers().get(header::HOST).cloned(),
            request_id: request
                .headers()
                .get(&X_REQUEST_ID)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("-")),
        })
    }

    pub fn emit<B>(
        self,
        response: &Response<B>,
        duration: Duration,
        upstream: Option<&str>,
        backend: Option<SocketAddr>,
    ) {
        let text =
            |v: Option<&HeaderValue>| v.and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        let host = self
            .host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| self.uri.authority().map(|a| a.as_str()))
            .unwrap_or("-");
        tracing::info!(
            target: "portico::access",
            client = %self.client.ip(),
            method = %self.method,
            host,
            path = self.uri.path(),
            status = response.status().as_u16(),
            bytes = body_bytes(&self.method, response.status(), response.headers()),
            duration_ms = millis(duration),
            upstream = upstream.unwrap_or("-"),
            backend = backend.map_or_else(|| "-".to_owned(), |b| b.to_string()),
            cache = text(response.headers().get("cache-status")),
            request_id = self.request_id.to_str().unwrap_or("-"),
        );
    }
}

/// The access line's `bytes`: the body's declared length, `-` without
/// one, 0 for a HEAD (its response declares the GET's length) and for a
/// status that has no body (1xx, 204, 304: RFC 9110 §6.4.1), whatever
/// length a backend declared with it.
fn body_bytes(method: &Method, status: http::StatusCode, response: &HeaderMap) -> String {
    let bodiless = status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED;
    if *method == Method::HEAD || bodiless {
        return "0".to_owned();
    }
    response
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// The access line for a request head hyper's parser refused (and
/// answered itself): nothing of it is known but the client and the error,
/// so the other fields are `-`. Attempts at request smuggling show here.
pub fn emit_refused(client: SocketAddr, status: u16, error: &dyn std::fmt::Display) {
    tracing::info!(
        target: "portico::access",
        client = %client.ip(),
        method = "-",
        host = "-",
        path = "-",
        status,
        bytes = "-",
        duration_ms = 0.0,
        upstream = "-",
        backend = "-",
        cache = "-",
        request_id = "-",
        refused = %error,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        let made = ensure_request_id(&mut headers).clone();
        assert_eq!(made.len(), 32);
        assert_eq!(headers[&X_REQUEST_ID], made);
        assert_ne!(new_request_id(), new_request_id());

        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("abc-123"));
        assert_eq!(ensure_request_id(&mut headers), "abc-123");

        // Ids that are empty, overlong or not text are replaced rather than
        // forwarded (control characters never get this far: hyper refuses
        // the head).
        let (longest, overlong) = ("x".repeat(128), "x".repeat(129));
        let unusable: [&[u8]; 4] = [b"", overlong.as_bytes(), b"caf\xc3\xa9", b"\xff"];
        for id in unusable {
            let mut headers = HeaderMap::new();
            headers.insert(X_REQUEST_ID.clone(), HeaderValue::from_bytes(id).unwrap());
            let made = ensure_request_id(&mut headers).clone();
            assert_eq!(made.len(), 32, "{id:?}");
            assert_eq!(headers.get_all(&X_REQUEST_ID).iter().count(), 1);
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            X_REQUEST_ID.clone(),
            HeaderValue::from_str(&longest).unwrap(),
        );
        assert_eq!(ensure_request_id(&mut headers), longest.as_str());
    }

    #[test]
    fn of_several_request_ids_only_the_logged_one_is_forwarded() {
        for (lines, want) in [
            (&["first", "second"][..], Some("first")),
            (&["first", "second", "third"], Some("first")),
            // A first line that is no id is replaced, the rest with it.
            (&["", "second"], None),
        ] {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(X_REQUEST_ID.clone(), HeaderValue::from_static(line));
            }
            let id = ensure_request_id(&mut headers).clone();
            let forwarded: Vec<_> = headers.get_all(&X_REQUEST_ID).iter().collect();
            assert_eq!(forwarded, [&id], "{lines:?}");
            match want {
                Some(want) => assert_eq!(id, want),
                None => assert_eq!(id.len(), 32),
            }
        }
    }

    #[test]
    fn bytes_are_the_declared_body_length_and_none_for_head() {
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1024"));
        let ok = http::StatusCode::OK;
        assert_eq!(body_bytes(&Method::GET, ok, &declared), "1024");
        assert_eq!(body_bytes(&Method::HEAD, ok, &declared), "0");
        assert_eq!(body_bytes(&Method::GET, ok, &HeaderMap::new()), "-");
        // A backend's length on a 204 or 304 describes no body sent.
        for status in [http::StatusCode::NO_CONTENT, http::StatusCode::NOT_MODIFIED] {
            assert_eq!(body_bytes(&Method::GET, status, &declared), "0");
        }
    }

    #[test]
    fn durations_are_logged_to_the_microsecond() {
        use std::time::Duration;
        assert_eq!(
            millis(Duration::from_nanos(533_710_999)).to_string(),
            "533.71"
        );
        assert_eq!(millis(Duration::from_nanos(533_711)).to_string(), "0.533");
        assert_eq!(millis(Duration::from_secs(2)).to_string(), "2000");
    }
}
