//! The access log and request ids. One structured line per request on the
//! `portico::access` target (text or JSON, as `--log-format` says): time,
//! client, method, host, path, status, bytes, duration, time to the head,
//! how the response ended, upstream, backend, cache result, request id,
//! referer and user agent.
//!
//! It is written when the response is over, as nginx and HAProxy write
//! theirs: once the body has been handed to the client's connection whole,
//! or cut (by the backend, or by a client that left), so that `bytes` is
//! what was sent (nginx's `$body_bytes_sent`) and `duration_ms` the whole
//! exchange (nginx's `$request_time`, HAProxy's `Ta`); `head_ms` is the
//! time to the response head (HAProxy's `Tr`, from the request's start).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::Entry;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body::{Body, Frame};

use super::body::BodyError;
use super::Conn;
use crate::upstream::Upstream;

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

/// Whether requests get access lines (and so a [`Tail`] once answered).
pub fn access_logged() -> bool {
    tracing::enabled!(target: "portico::access", tracing::Level::INFO)
}

/// What the access line needs from the request, taken before the request is
/// consumed. Cheap clones: `Uri` and header values share their bytes.
#[derive(Debug)]
pub struct AccessRecord {
    /// The peer, or behind `server.trusted_proxies` the client their
    /// forwarding fields name (as nginx's `real_ip_header` does).
    client: IpAddr,
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    /// HTTP/1.1 or HTTP/2, and over TLS or not.
    version: http::Version,
    tls: bool,
    host: Option<HeaderValue>,
    /// What nginx's `combined` format ends with.
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    request_id: HeaderValue,
    /// Its listener's cut (see `Conn`).
    cut_off: Arc<super::CutOff>,
}

impl AccessRecord {
    /// `None` when the access log is filtered out (see [`access_logged`]), so a disabled log costs
    /// nothing per request.
    /// The request gets its id here ([`ensure_request_id`]), for the line
    /// and its backend alike.
    /// `client` says who the request comes from (see `Proxy::client_ip`).
    pub fn capture<B>(
        request: &mut Request<B>,
        conn: &Conn,
        client: impl FnOnce(&http::HeaderMap) -> IpAddr,
    ) -> Option<Self> {
        if !access_logged() {
            return None;
        }
        let request_id = ensure_request_id(request.headers_mut()).clone();
        Some(AccessRecord {
            // A dual-stack listener's IPv4 clients (`::ffff:a.b.c.d`) are
            // written as the IPv4 addresses they are, one spelling per
            // client whichever listener it reached.
            client: client(request.headers()).to_canonical(),
            peer: conn.peer,
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            tls: conn.proto == "https",
            host: request.headers().get(header::HOST).cloned(),
            referer: request.headers().get(header::REFERER).cloned(),
            user_agent: request.headers().get(header::USER_AGENT).cloned(),
            request_id,
            cut_off: conn.cut_off.clone(),
        })
    }

    /// The protocol, as nginx's `$server_protocol` says it, with `+tls`
    /// over TLS: HTTP/2 and HTTPS requests were not told apart (review34a
    /// F7).
    fn proto(&self) -> &'static str {
        match (self.version, self.tls) {
            (http::Version::HTTP_2, false) => "HTTP/2.0",
            (http::Version::HTTP_2, true) => "HTTP/2.0+tls",
            (http::Version::HTTP_10, false) => "HTTP/1.0",
            (http::Version::HTTP_10, true) => "HTTP/1.0+tls",
            (_, false) => "HTTP/1.1",
            (_, true) => "HTTP/1.1+tls",
        }
    }

    /// Whom the request comes from (IPv4 as IPv4).
    pub fn client(&self) -> IpAddr {
        self.client
    }

    /// The request's id, as its access line gives it.
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }

    /// The trusted proxy that forwarded the request, when the client is
    /// another address.
    fn relayed_by(&self) -> Option<IpAddr> {
        // `Conn` holds a dual-stack listener's IPv4 peer as IPv4.
        Some(self.peer.ip()).filter(|&peer| peer != self.client)
    }

    /// The target's path; a CONNECT's authority, which it has instead.
    fn path(&self) -> &str {
        match self.uri.path() {
            "" => self.uri.authority().map_or("-", |a| a.as_str()),
            path => path,
        }
    }

    /// The line of a request whose head is going out, written when the
    /// returned tail is dropped: the response body holds it and lets it go
    /// when it ends, or when hyper lets the body go before its end.
    pub fn answered<B: Body>(
        self,
        response: &Response<B>,
        started: Instant,
        reached: Reached,
    ) -> Box<Tail> {
        let status = response.status();
        // The client left in the middle of its upload: its answer goes
        // nowhere.
        let gone = status.as_u16() == super::CLIENT_CLOSED;
        // hyper neither polls nor sends a body with these (RFC 9110 §6.4.1),
        // whatever length a backend declared with them.
        let bodiless = self.method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let end = if gone {
            End::ClientGone
        } else if bodiless || response.body().is_end_stream() {
            End::Done
        } else {
            End::Open
        };
        Box::new(Tail {
            status: status.as_u16(),
            head: (!gone).then(|| started.elapsed()),
            cache: response.headers().get("cache-status").cloned(),
            fate: response
                .extensions()
                .get::<crate::cache::capture::Fate>()
                .cloned(),
            expected: response.body().size_hint().exact(),
            record: self,
            started,
            reached,
            bytes: 0,
            end,
        })
    }

    /// Writes the line of a request whose client left before its answer
    /// was ready: status 499, no head.
    pub fn left(self, started: Instant, reached: Reached) {
        drop(Tail {
            record: self,
            status: super::CLIENT_CLOSED,
            started,
            head: None,
            reached,
            cache: None,
            fate: None,
            bytes: 0,
            expected: None,
            // Not `ClientGone`: a request the exit cut before its head
            // reads as `shutdown` (see `end_name`).
            end: End::Open,
        });
    }
}

/// How a response ended: the access line's `end`, after HAProxy's
/// termination state (`CD`, `SD`, `sD`, `cD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Not over. A body let go like this lost its client: the client
    /// closed its connection or reset its stream, or was dropped for not
    /// reading, or the process exited at the end of `shutdown_grace`
    /// (`client_gone`).
    Open,
    /// Handed to the client's connection whole (`done`).
    Done,
    /// Answered 499: its client left in the middle of its upload
    /// (`client_gone`).
    ClientGone,
    /// The client kept its HTTP/2 stream's flow-control window shut past
    /// `idle_timeout` (`client_stalled`).
    ClientStalled,
    /// The backend's body broke off (`backend_broken`).
    BackendBroken,
    /// The backend's body was silent past `body_timeout` (`backend_stalled`).
    BackendStalled,
    /// The backend's body broke while the client's upload was still
    /// coming, which ends the backend connection when it fails: the client
    /// closed, stalled or outgrew `max_request_body` (`upload_failed`).
    UploadFailed,
    /// portico's gzip encoder failed (`compress_failed`).
    CompressFailed,
}

impl End {
    fn of(error: &BodyError) -> Self {
        match error {
            BodyError::Stalled(_) => End::BackendStalled,
            BodyError::Abandoned => End::ClientStalled,
            BodyError::UploadFailed(_) | BodyError::Short => End::UploadFailed,
            BodyError::Hyper(_) | BodyError::Lost | BodyError::TooLarge { .. } => {
                End::BackendBroken
            }
            BodyError::Compress(_) => End::CompressFailed,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            End::Open | End::ClientGone => "client_gone",
            End::Done => "done",
            End::ClientStalled => "client_stalled",
            End::BackendBroken => "backend_broken",
            End::BackendStalled => "backend_stalled",
            End::UploadFailed => "upload_failed",
            End::CompressFailed => "compress_failed",
        }
    }
}

/// Where a request went: its route's upstream, the backend of its last
/// attempt, and how many attempts before that failed and were retried
/// (nginx's `$upstream_addr` lists them all; HAProxy logs the count).
#[derive(Debug, Default)]
pub struct Reached {
    /// The route's name, as `portico_requests_total` labels it (ops56
    /// L6: the line named only the upstream, several routes may share).
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<Upstream>>,
    pub backend: Option<SocketAddr>,
    pub retries: u32,
    /// Its wait in line for room under `max_conns` (HAProxy's `Tw`).
    pub queued: Option<Duration>,
}

/// The access line of a request whose response is under way, written when
/// it is dropped.
#[derive(Debug)]
pub struct Tail {
    record: AccessRecord,
    status: u16,
    started: Instant,
    /// Time to the response head; `None` for a client that left first.
    head: Option<Duration>,
    reached: Reached,
    cache: Option<HeaderValue>,
    /// Why a response said `stored` was not, if it was not.
    fate: Option<crate::cache::capture::Fate>,
    /// Body bytes handed to the client's connection.
    bytes: u64,
    /// The body's length, when known at the head.
    expected: Option<u64>,
    end: End,
}

impl Tail {
    /// Notes what a poll of the response body handed over; `at_end` says
    /// whether the body is over after a frame (hyper stops polling a body
    /// of known length at its last byte, without waiting for its end).
    pub fn saw(
        &mut self,
        polled: &Poll<Option<Result<Frame<Bytes>, BodyError>>>,
        at_end: impl FnOnce() -> bool,
    ) {
        if self.end != End::Open {
            return;
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                // Trailers are the last frame, and hyper polls no further
                // after a sized body's last byte.
                if frame.is_trailers() || self.expected == Some(self.bytes) || at_end() {
                    self.end = End::Done;
                }
            }
            Poll::Ready(Some(Err(error))) => {
                self.end = End::of(error);
                // The backend's failures, as `cut_short` judged them: not
                // a read-ahead task lost with the runtime (review36e).
                if matches!(error, BodyError::Hyper(_) | BodyError::Stalled(_)) {
                    let upstream = self.reached.upstream.as_ref().map_or("-", |u| u.name());
                    let backend = self
                        .reached
                        .backend
                        .map_or_else(|| "-".to_owned(), |b| b.to_string());
                    let request = (self.record.client, self.record.request_id());
                    super::body::cut_warning(upstream, &backend, Some(request), error, false);
                }
            }
            Poll::Ready(None) => self.end = End::Done,
            Poll::Pending => {}
        }
    }

    /// [`Tail::saw`] for a body that may carry a tail (none when the
    /// access log is off).
    pub fn note(
        tail: &mut Option<Box<Tail>>,
        polled: &Poll<Option<Result<Frame<Bytes>, BodyError>>>,
        at_end: impl FnOnce() -> bool,
    ) {
        if let Some(tail) = tail {
            tail.saw(polled, at_end);
        }
    }

    /// The body is being let go because its client kept its window shut.
    pub fn stalled_by_client(&mut self) {
        if self.end == End::Open {
            self.end = End::ClientStalled;
        }
    }
}

impl Tail {
    /// `end` as the line writes it: a response not over when
    /// `shutdown_grace` ran out was cut by the exit, not by its client.
    fn end_name(&self) -> &'static str {
        if self.end == End::Open && self.record.cut_off.is_cut() {
            return "shutdown";
        }
        self.end.as_str()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let record = &self.record;
        // The host routed by: an absolute-form target's authority (or
        // HTTP/2's :authority) over a Host field (RFC 9112 §3.2.2), which
        // a client may have set to another (review34e 5: the line named
        // the Host, and a purge by it found nothing).
        let host = record
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| record.host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("-");
        tracing::info!(
            target: "portico::access",
            client = %record.client,
            peer = record.relayed_by().map(tracing::field::display),
            method = %record.method,
            host,
            path = record.path(),
            query = record.uri.query(),
            proto = record.proto(),
            status = self.status,
            bytes = self.bytes,
            duration_ms = millis(self.started.elapsed()),
            head_ms = self.head.map(millis),
            end = self.end_name(),
            route = self.reached.route.as_deref().unwrap_or("-"),
            upstream = self.reached.upstream.as_ref().map_or("-", |u| u.name()),
            backend = self.reached.backend.map_or_else(|| "-".to_owned(), |b| b.to_string()),
            retries = Some(self.reached.retries).filter(|&n| n > 0),
            queue_ms = self.reached.queued.map(millis),
            cache = self.cache_result().as_ref(),
            request_id = record.request_id.to_str().unwrap_or("-"),
            // Last, as nginx's `combined` has them (review37c L1); a value
            // with bytes past ASCII is `-`, as a host's is.
            referer = record.referer.as_ref().map(|v| v.to_str().unwrap_or("-")),
            user_agent = record.user_agent.as_ref().map(|v| v.to_str().unwrap_or("-")),
        );
    }
}

impl Tail {
    /// The Cache-Status the client got, unless the body was then not
    /// stored: the header said `stored` before the body came. A body the
    /// backend breaks off or leaves silent is never stored (review32c F5),
    /// nor one that outgrows `max_object_size` or finds the fills holding
    /// `max_size` (review32f F2). The line says what became of it.
    fn cache_result(&self) -> std::borrow::Cow<'_, str> {
        let sent = self
            .cache
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let Some(head) = sent.strip_suffix("; stored") else {
            return sent.into();
        };
        let broke = matches!(self.end, End::BackendBroken | End::BackendStalled);
        let given_up = self.fate.as_ref().and_then(|f| f.detail());
        match (broke, given_up) {
            (true, _) => format!("{head}; detail=body-not-whole").into(),
            (false, Some(why)) => format!("{head}; detail={why}").into(),
            (false, None) => sent.into(),
        }
    }
}

/// The access line for a request head hyper's parser refused (and
/// answered itself): nothing of it is known but the client, the error,
/// the body bytes of the answer and, where known, how long the head took
/// (zero for one the parser refused as it read it), so the other fields
/// are `-`. Attempts at request smuggling show here.
pub fn emit_refused(
    client: SocketAddr,
    status: u16,
    error: &dyn std::fmt::Display,
    answered: Refused,
) {
    tracing::info!(
        target: "portico::access",
        client = %client.ip().to_canonical(),
        method = "-",
        host = "-",
        path = "-",
        status,
        bytes = answered.bytes,
        duration_ms = millis(answered.took),
        end = "done",
        route = "-",
        upstream = "-",
        backend = "-",
        cache = "-",
        request_id = "-",
        // A string, so the text format quotes it as it does the other
        // free-text fields (logfmt parsers split on its spaces otherwise).
        refused = error.to_string().as_str(),
    );
}

/// What portico knows of a refused head's exchange (see [`emit_refused`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Refused {
    /// Body bytes of the answer: none for hyper's own.
    pub bytes: u64,
    /// From the head's first byte (or the connection's) to the refusal.
    pub took: std::time::Duration,
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

    fn record(method: Method) -> AccessRecord {
        AccessRecord {
            client: "127.0.0.1".parse().unwrap(),
            peer: "127.0.0.1:1".parse().unwrap(),
            method,
            uri: Uri::from_static("/a"),
            version: http::Version::HTTP_11,
            tls: false,
            host: None,
            referer: None,
            user_agent: None,
            request_id: HeaderValue::from_static("-"),
            cut_off: Arc::default(),
        }
    }

    fn tail(method: Method, status: StatusCode, body: &'static str) -> Box<Tail> {
        let mut response = Response::new(http_body_util::Full::new(Bytes::from_static(
            body.as_bytes(),
        )));
        *response.status_mut() = status;
        record(method).answered(&response, Instant::now(), Reached::default())
    }

    #[test]
    fn a_response_that_gets_no_body_is_over_at_its_head() {
        // A backend's length on a HEAD, 204 or 304 describes no body sent,
        // and hyper polls none: the line must not say the client left.
        for (method, status) in [
            (Method::HEAD, StatusCode::OK),
            (Method::GET, StatusCode::NO_CONTENT),
            (Method::GET, StatusCode::NOT_MODIFIED),
            (Method::GET, StatusCode::SWITCHING_PROTOCOLS),
        ] {
            let tail = tail(method, status, "body");
            assert_eq!((tail.end, tail.bytes), (End::Done, 0), "{status}");
        }
        assert_eq!(tail(Method::GET, StatusCode::OK, "").end, End::Done);
        assert_eq!(tail(Method::GET, StatusCode::OK, "body").end, End::Open);
    }

    #[test]
    fn a_tail_counts_what_went_out_and_how_it_ended() {
        let data = |n: usize| Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0u8; n])))));
        let mut sent = tail(Method::GET, StatusCode::OK, "body");
        sent.saw(&data(3), || false);
        sent.saw(&Poll::Pending, || false);
        sent.saw(&data(4), || true);
        assert_eq!((sent.end, sent.bytes), (End::Done, 7));
        // Nothing is counted once over.
        sent.saw(&data(4), || true);
        assert_eq!(sent.bytes, 7);

        let mut chunked = tail(Method::GET, StatusCode::OK, "body");
        chunked.saw(&data(2), || false);
        chunked.saw(&Poll::Ready(None), || true);
        assert_eq!((chunked.end, chunked.bytes), (End::Done, 2));

        for (error, end) in [
            (
                BodyError::Stalled(Duration::from_secs(1)),
                End::BackendStalled,
            ),
            (BodyError::Lost, End::BackendBroken),
            (BodyError::Abandoned, End::ClientStalled),
        ] {
            let mut cut = tail(Method::GET, StatusCode::OK, "body");
            cut.saw(&data(5), || false);
            cut.saw(&Poll::Ready(Some(Err(error))), || false);
            assert_eq!((cut.end, cut.bytes), (end, 5));
        }

        let mut left = tail(Method::GET, StatusCode::OK, "body");
        left.saw(&data(1), || false);
        assert_eq!(left.end.as_str(), "client_gone");
        left.stalled_by_client();
        assert_eq!(left.end.as_str(), "client_stalled");

        // Cut as the process exits at the end of `shutdown_grace`: only
        // what was not over says so.
        let (mut going, mut over) = (
            tail(Method::GET, StatusCode::OK, "body"),
            tail(Method::GET, StatusCode::OK, "body"),
        );
        over.saw(&Poll::Ready(None), || true);
        for tail in [&mut going, &mut over] {
            tail.record.cut_off.listener_cut();
        }
        assert_eq!((going.end_name(), over.end_name()), ("shutdown", "done"));
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
