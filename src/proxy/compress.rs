//! Response compression: gzip for clients that take it, as nginx's `gzip`
//! module does it. Which responses ([`Compressor::decide`]: a listed
//! media type, long enough, not encoded already, no `no-transform`),
//! what their heads become (`Content-Encoding: gzip`, no
//! `Content-Length` or `Accept-Ranges`, a weak `ETag`, `Vary:
//! Accept-Encoding`), and the body's encoder ([`Gzip`]).
//!
//! The cache stores the backend's response, plain, and a hit is
//! compressed as a miss is; the first that compresses a stored response
//! whole has the cache keep the result beside it, with the head its hits
//! are sent with ([`Keep`]), and the next gzip hits are sent that copy
//! ([`Compressor::copy_hit`] for a fresh hit of the stored response
//! itself, [`Compressor::compress_stored`] for a stale-while-revalidate
//! one).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::{Compress, Compression as Level, FlushCompress, Status};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;

use super::body::{BodyError, ProxyBody, Turn};
use super::cached::{Fresh, Stored};
use super::headers::list_members;
use crate::cache::policy::{no_transform, says_no_transform};
use crate::cache::{Cache, Entry, Incompressible};
use crate::config::Compression as Config;

/// Encoders kept for the next responses once theirs are done. An
/// encoder's state is ~370 KiB (zlib's hash table alone is 128 KiB, its
/// window and the chain behind it as much again), which glibc maps and
/// unmaps on each allocation of that size (its mmap threshold is pinned
/// at 128 KiB, see `memory`), with a page fault for each page zlib clears
/// on every new one. At most this many are kept, ~12 MiB, what 32 bodies
/// compressed at once use; the memory watch lets them go once traffic
/// falls ([`drop_spares`]).
const SPARES_KEPT: usize = 32;

/// Kept encoders, reset, with their level. The lock is held to push or
/// pop one, never while zlib works.
static SPARES: Mutex<Vec<(u32, Compress)>> = Mutex::new(Vec::new());

/// Compressed output gathered before it goes out as a frame, when the
/// body goes on coming: zlib writes the gzip header and then its blocks
/// as they fill, and a frame of each would be many small writes. As
/// large as a body usually compresses to, so that a body that has come
/// whole is compressed at once and its encoder freed, rather than held
/// while its client reads: 64 KiB bodies to 256 clients held 256
/// encoders, 77 MB (review46a L6), where nginx's output buffers hold the
/// compressed body and free the encoder.
const OUT_PIECE: usize = 64 * 1024;

/// Input held before a body's encoder is taken (see [`Gzip::held`]).
const HOLD: usize = 64 * 1024;

/// Input compressed in one poll at most, past which the task lets others
/// run: ~1 ms of zlib at level 2 on text.
const IN_PER_POLL: usize = 256 * 1024;

/// Bytes a body takes between additions to the byte counters.
const COUNT_EVERY: u64 = 1 << 20;

/// The least time between two flushes of a body's stream (the first goes
/// at once): each ends a deflate block, and a backend trickling its body
/// had every piece flushed, a byte a millisecond growing a 3,000-byte body
/// to 21,020 (gzip53 M2). nginx buffers the whole body instead.
const FLUSH_GAP: std::time::Duration = std::time::Duration::from_millis(50);

/// Fields of digests of the content (RFC 9530 and older): a digest of the
/// plain content would not be of what is sent.
const DIGESTS: [HeaderName; 4] = [
    HeaderName::from_static("content-digest"),
    HeaderName::from_static("repr-digest"),
    HeaderName::from_static("digest"),
    HeaderName::from_static("content-md5"),
];

/// Whether the `Trailer` fields name one of the [`DIGESTS`], read with
/// `list_members` (each member apart: one with a byte beyond ASCII hid
/// the others, review58 L2).
fn names_digest(headers: &HeaderMap) -> bool {
    list_members(headers, &header::TRAILER).any(|name| {
        DIGESTS
            .iter()
            .any(|d| name.eq_ignore_ascii_case(d.as_str()))
    })
}

/// Whether an encoder was taken since [`spares_unused`] last looked.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Lets every kept encoder go: called when the heap is trimmed after a
/// burst, so that their memory goes back with the rest, and when they
/// went unused for a while ([`spares_unused`]).
pub fn drop_spares() {
    let spares = std::mem::take(&mut *SPARES.lock().unwrap_or_else(|e| e.into_inner()));
    drop(spares);
}

/// Whether encoders are kept and none was taken since the last call: the
/// memory watch asks once a second, and lets them go after a second
/// without compression, whatever the traffic (a trim waits for a burst
/// to fall).
pub fn spares_unused() -> bool {
    !TAKEN.swap(false, Ordering::Relaxed)
        && !SPARES.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
}

/// What a request says of compression, read before it goes on.
#[derive(Debug, Clone)]
pub struct Asked {
    /// gzip may be sent: the client accepts it, speaks HTTP/1.1 or later
    /// (an HTTP/1.0 client cannot be sent a body of unknown length but by
    /// closing the connection; nginx's `gzip_http_version 1.1`), and
    /// asked for no `no-transform`.
    gzip: bool,
    /// A HEAD: the head says what a GET's would, and there is no body.
    head: bool,
    /// The request's `If-None-Match`, when gzip may be sent: a weak tag in
    /// it that a 304 names strongly is one this made weak (see
    /// [`Compressor::apply`]).
    if_none_match: Option<HeaderValue>,
}

/// `[compression]`, with its counters.
#[derive(Debug)]
pub struct Compressor {
    config: Config,
    counters: Counters,
}

/// What compression did, for `/metrics`.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Responses sent compressed.
    pub responses: IntCounter,
    /// Bytes given to the encoder, and bytes it gave back.
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    /// gzip copies of stored responses kept by the cache, and responses
    /// sent from them.
    pub copies_stored: IntCounter,
    pub copies_served: IntCounter,
}

/// Where a hit's compressed body goes once whole: the cache, as the gzip
/// copy of the entry the hit was made of ([`Compressor::apply_stored`]).
/// One hit at a time makes a copy of an entry: the first whose body is
/// polled takes the entry's claim, and the others that find no copy
/// compress for their clients alone. It gathers what it sends, up to the
/// room the cache has free: past that, a copy could not be kept, so it
/// gathers nothing (review47d H1: every hit that found no copy held all it
/// had sent, 8 MiB of a large body each, in a full cache that kept none).
#[derive(Debug)]
pub struct Keep {
    /// Weak: a response whose client stopped reading does not keep a
    /// cache that a reload replaced.
    cache: Weak<Cache>,
    key: String,
    entry: Arc<Entry>,
    level: u32,
    /// Holds the entry's claim ([`Keep::claim`]), let go when dropped.
    claimed: bool,
    /// The head the copy's hits are sent with, made at the claim.
    head: HeaderMap,
    /// The stream so far, and the most it may come to.
    whole: Vec<u8>,
    room: usize,
    /// Bytes of the entry compressed: all of them, or nothing is kept.
    taken: usize,
    /// Bytes of the stream so far, kept or not: once they reach the
    /// entry's own, its gzip form saves nothing, which is noted on it with
    /// no room needed (review60 M1: noted only of a stream that fitted
    /// the free room, so never in a full cache or of a large body).
    sent: usize,
    stored: IntCounter,
}

impl Keep {
    fn new(
        cache: &Arc<Cache>,
        key: String,
        entry: Arc<Entry>,
        level: u32,
        stored: IntCounter,
    ) -> Self {
        Keep {
            cache: Arc::downgrade(cache),
            key,
            entry,
            level,
            claimed: false,
            head: HeaderMap::new(),
            whole: Vec::new(),
            room: 0,
            taken: 0,
            sent: 0,
            stored,
        }
    }

    /// Takes the entry's claim, if no other hit has it, and makes the
    /// copy's head and finds the room the cache has for it (none in a
    /// full one: the stream is then only measured, see `sent`).
    fn claim(&mut self) -> bool {
        let Some(cache) = self.cache.upgrade() else {
            return false;
        };
        if !self.entry.claim_copy(self.level) {
            return false;
        }
        // Let go when this is dropped, whatever follows.
        self.claimed = true;
        // Sized for the fields it gains, so that making it does not grow
        // its table past the entry's (a copy would weigh a table's worth
        // more, ~1.3 KB). Its length is set when the stream is whole: until
        // then it holds the longest there is, so that the room is not
        // counted a digit short (review48e L2).
        let fields = &self.entry.headers;
        let mut head = HeaderMap::with_capacity(fields.len() + 2);
        head.extend(
            fields
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        gzip_head(&mut head, Some(usize::MAX));
        let room = cache.copy_room(&self.key, self.level, &head);
        self.room = usize::try_from(room).unwrap_or(usize::MAX);
        self.head = head;
        true
    }

    /// Adds a piece of the stream; false once it is more than a copy
    /// could be, and for every piece after that (a stream with a piece
    /// left out is no copy). Every piece is measured (`sent`).
    fn gather(&mut self, piece: &[u8]) -> bool {
        self.sent += piece.len();
        if self.room == 0 || self.whole.len() + piece.len() > self.room {
            self.room = 0;
            self.whole = Vec::new();
            return false;
        }
        self.whole.extend_from_slice(piece);
        true
    }

    /// Whether the stream is worth following on: not once it is no
    /// smaller than the entry, which is then noted on it.
    fn measuring(&self) -> bool {
        if self.sent < self.entry.body.len() {
            return true;
        }
        self.entry.mark_incompressible(self.level);
        false
    }

    /// Stores the stream, ending with `last`, in a task of its own (a
    /// body's poll cannot wait on the store).
    fn store(mut self: Box<Self>, last: &[u8]) {
        // One encoder run gone wrong would be sent to every later client.
        if self.taken != self.entry.body.len() {
            return;
        }
        let whole = self.gather(last);
        // One no smaller than the response saves no byte sent, and kept
        // beside it doubled what incompressible content held (gzip53 L2:
        // 7.8 MB of random bytes kept twice); its hits are sent plain.
        if !self.measuring() || !whole {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let Some(cache) = self.cache.upgrade() else {
                return;
            };
            // Exactly its length: a vector grown piece by piece has up to
            // as much room again, which the copy would hold (review47e M2).
            let whole = Bytes::from(std::mem::take(&mut self.whole).into_boxed_slice());
            // The head its hits are sent with, made once, with its length.
            let mut head = std::mem::take(&mut self.head);
            head.insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
            let kept = cache
                .insert_copy(&self.key, self.level, &self.entry, head, whole)
                .await;
            if kept {
                self.stored.inc();
            }
        });
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        // Stored, refused, or the body cut short: the next hit may try.
        if self.claimed {
            self.entry.release_copy();
        }
    }
}

/// What [`Compressor::apply_stored`] made of a hit.
#[allow(clippy::large_enum_variant)] // matched as soon as it is returned
pub(super) enum FromStored {
    /// The response to send.
    Sent(http::Response<ProxyBody>),
    /// One to compress ([`Compressor::compress_stored`]).
    ToCompress(StoredHit),
}

/// A hit to compress, and the entry it was made of.
pub(super) struct StoredHit {
    asked: Asked,
    parts: http::response::Parts,
    body: ProxyBody,
    stored: Stored,
}

/// What to do with a response on a compressing route.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not a response to compress for anyone: sent as it is.
    Leave,
    /// One to compress, for clients that take gzip; this client does not,
    /// so it only says that the answer varies with `Accept-Encoding`.
    Vary,
    /// Compressed for this client.
    Compress,
}

impl Asked {
    /// Whether gzip may be sent to this client.
    pub fn takes_gzip(&self) -> bool {
        self.gzip
    }
}

impl Compressor {
    pub fn new(config: Config, counters: Counters) -> Self {
        Compressor { config, counters }
    }

    /// What `request` asks of compression.
    pub fn asked(&self, method: &Method, version: Version, headers: &HeaderMap) -> Asked {
        let gzip = version >= Version::HTTP_11 && accepts_gzip(headers) && !no_transform(headers);
        Asked {
            gzip,
            head: method == Method::HEAD,
            if_none_match: headers.get(header::IF_NONE_MATCH).filter(|_| gzip).cloned(),
        }
    }

    /// Compresses `response` if it should be, for what `asked` says.
    pub fn apply(
        &self,
        asked: Asked,
        response: http::Response<ProxyBody>,
    ) -> http::Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        if parts.status == StatusCode::NOT_MODIFIED {
            // A 304 to a client revalidating the gzip copy it was sent
            // (its tag made weak here) says what that copy's 200 said:
            // the weak tag, so that a cache in front freshens the copy it
            // holds (RFC 9111 §4.3.4), and the same Vary (RFC 9110
            // §15.4.5). A 304 tells no type or length to decide by; the
            // weak tag tells that the 200 was compressed.
            if revalidates_gzip(asked.if_none_match.as_ref(), &parts.headers) {
                weaken_etag(&mut parts.headers);
                add_vary(&mut parts.headers);
            } else if let Some(Stripped(fields)) = parts.extensions.remove::<Stripped>() {
                // One the cache made of a 200 (a miss's or a
                // revalidation's) says the `Vary` that 200 would carry
                // (RFC 9110 §15.4.5), judged on the fields it dropped
                // (review54 L3).
                self.vary_as_whole(&asked, &mut parts.headers, fields);
            }
            return http::Response::from_parts(parts, body);
        }
        if parts.status == StatusCode::PARTIAL_CONTENT {
            // A range of the plain body, sent as it is, with the `Vary`
            // its 200 would carry (RFC 9110 §15.3.7, range53 L1), judged
            // as that 200 is: its type, coding, `no-transform`, digests
            // and whole length (review54 L6).
            self.vary_as_whole(&asked, &mut parts.headers, HeaderMap::new());
            return http::Response::from_parts(parts, body);
        }
        // An answer made of an entry that is no hit (a stale copy, a
        // revalidated one) carries what the entry was noted as.
        let decision = self.unless_noted(
            self.decide(&asked, parts.status, &parts.headers, body.size_hint()),
            parts.extensions.get::<Incompressible>().copied(),
        );
        self.act(decision, &asked, parts, body, None)
    }

    /// `decision`, unless it is to compress a stored entry's body whose
    /// gzip form at this level was `noted` as saving nothing: then sent as
    /// it is, saying it varies (review58 M1).
    fn unless_noted(&self, decision: Decision, noted: Option<Incompressible>) -> Decision {
        match noted {
            Some(noted) if decision == Decision::Compress && noted.at(self.config.level) => {
                Decision::Vary
            }
            _ => decision,
        }
    }

    /// [`Compressor::apply`] for a hit from the cache, made of `stored`,
    /// to a client that takes gzip. One to compress is handed back, for
    /// [`Compressor::compress_stored`]: the others (an image, a 304, a
    /// range) need no look for the cache's copy.
    pub(super) fn apply_stored(
        &self,
        asked: Asked,
        response: http::Response<ProxyBody>,
        stored: Stored,
    ) -> FromStored {
        // The entry's own response, not a 304, 206, 412 or 416 made of it.
        if response.status() != stored.entry.status {
            // A 304 has no type to decide by: the entry's 200 tells whether
            // it varies, which the 304 must say too (RFC 9110 §15.4.5).
            let entry = &stored.entry;
            let size = SizeHint::with_exact(entry.body.len() as u64);
            let varies = response.status() == StatusCode::NOT_MODIFIED
                && self.decide(&asked, entry.status, &entry.headers, size) != Decision::Leave;
            let mut sent = self.apply(asked, response);
            if varies {
                add_vary(sent.headers_mut());
            }
            return FromStored::Sent(sent);
        }
        let (parts, body) = response.into_parts();
        let decision = self.unless_noted(
            self.decide(&asked, parts.status, &parts.headers, body.size_hint()),
            stored.entry.incompressible_note(),
        );
        if decision != Decision::Compress {
            return FromStored::Sent(self.act(decision, &asked, parts, body, None));
        }
        FromStored::ToCompress(StoredHit {
            asked,
            parts,
            body,
            stored,
        })
    }

    /// A hit to compress: the copy the cache keeps of its entry compressed
    /// is sent, with its length, if there is one; else the entry is
    /// compressed as it is sent, and the cache keeps the result ([`Keep`]),
    /// so that the next hits are not. nginx compresses every hit of its
    /// `proxy_cache`; Varnish stores the gzip form.
    pub(super) async fn compress_stored(
        &self,
        hit: StoredHit,
        cache: &Arc<Cache>,
    ) -> http::Response<ProxyBody> {
        let StoredHit {
            asked,
            mut parts,
            body,
            stored: Stored { key, entry, fresh },
        } = hit;
        let level = self.config.level;
        if let Some(copy) = cache.copy_for(&key, level, &entry).await {
            self.compressed_head(&mut parts.headers, Some(copy.body.len()));
            self.counters.copies_served.inc();
            let body = if asked.head {
                ProxyBody::empty()
            } else {
                ProxyBody::full(copy.body.clone())
            };
            return http::Response::from_parts(parts, body);
        }
        // Not of an entry about to be replaced (stale-while-revalidate),
        // nor for a HEAD, which compresses nothing.
        let keep = (fresh && !asked.head).then(|| {
            let stored = self.counters.copies_stored.clone();
            Box::new(Keep::new(cache, key, entry, level, stored))
        });
        self.act(Decision::Compress, &asked, parts, body, keep)
    }

    /// A fresh hit from the gzip copy kept of its entry, if there is one
    /// (at this level) and the entry is a response to compress for this
    /// client; else the hit, to answer as any other
    /// ([`Compressor::apply_stored`]).
    pub(super) async fn copy_hit(
        &self,
        asked: &Asked,
        fresh: Fresh,
        cache: &Cache,
    ) -> Result<http::Response<ProxyBody>, Fresh> {
        let (entry, level) = (&fresh.stored.entry, self.config.level);
        // A look at the entry first: most hits without a copy cost no
        // decision and no lookup more.
        if !entry.has_copy(level) {
            return Err(fresh);
        }
        let size = SizeHint::with_exact(entry.body.len() as u64);
        if self.decide(asked, entry.status, &entry.headers, size) != Decision::Compress {
            return Err(fresh);
        }
        let Some(copy) = cache.copy_for(&fresh.stored.key, level, entry).await else {
            return Err(fresh);
        };
        self.counters.responses.inc();
        self.counters.copies_served.inc();
        Ok(fresh.answer_from(&copy))
    }

    /// Does to a response what `decision` says; a compressed body is
    /// given to `keep` too, once whole.
    fn act(
        &self,
        decision: Decision,
        asked: &Asked,
        mut parts: http::response::Parts,
        body: ProxyBody,
        keep: Option<Box<Keep>>,
    ) -> http::Response<ProxyBody> {
        match decision {
            Decision::Leave => {}
            Decision::Vary => add_vary(&mut parts.headers),
            Decision::Compress => {
                self.compressed_head(&mut parts.headers, None);
                if !asked.head {
                    let gzip = Gzip::new(body, self.config.level, self.counters.clone());
                    let body = ProxyBody::Gzip(Box::new(gzip.keeping(keep)));
                    return http::Response::from_parts(parts, body);
                }
            }
        }
        http::Response::from_parts(parts, body)
    }

    /// What a compressed response's head says ([`gzip_head`]), counted.
    fn compressed_head(&self, headers: &mut HeaderMap, length: Option<usize>) {
        gzip_head(headers, length);
        self.counters.responses.inc();
    }

    /// Whether a response with this status and head (and a body of this
    /// size) is compressed, for a request that asked `asked`.
    pub fn decide(
        &self,
        asked: &Asked,
        status: StatusCode,
        headers: &HeaderMap,
        size: SizeHint,
    ) -> Decision {
        // The type first: most responses not to compress stop there.
        if !self.listed(headers.get(header::CONTENT_TYPE)) {
            return Decision::Leave;
        }
        // No content (1xx, 204, 205, 304), or a range of the plain body (206).
        let bodiless =
            status.is_informational() || matches!(status.as_u16(), 204 | 205 | 206 | 304);
        if bodiless {
            return Decision::Leave;
        }
        // A coding, a range, a digest of the plain body or `no-transform`
        // leaves it as it is. One pass over the fields, where a lookup of
        // each name (eight) cost a cache hit ~1,500 instructions.
        let mut length_field = None;
        for (name, value) in headers {
            if *name == header::CONTENT_ENCODING
                || *name == header::CONTENT_RANGE
                || DIGESTS.contains(name)
                || (*name == header::CACHE_CONTROL && says_no_transform(value))
                // One the trailers will carry, as announced (gzip53 M1:
                // the plain body's digest went after the gzip one).
                || (*name == header::TRAILER && names_digest(headers))
            {
                return Decision::Leave;
            }
            if *name == header::CONTENT_LENGTH && length_field.is_none() {
                length_field = Some(value);
            }
        }
        let length = match length_field {
            Some(value) => std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|text| text.parse::<u64>().ok()),
            // A HEAD's body is empty whatever the GET's is.
            None if asked.head => None,
            None => size.exact(),
        };
        // An empty body stays empty: gzip would make it 20 bytes.
        if length.is_some_and(|length| length == 0 || length < self.config.min_size) {
            return Decision::Leave;
        }
        if asked.gzip {
            Decision::Compress
        } else {
            Decision::Vary
        }
    }

    /// Adds to the `headers` of a 304 or 206 the `Vary: Accept-Encoding`
    /// of its whole 200, when that would carry it: the 200 with `headers`,
    /// the fields the 304 `dropped`, and for a part its whole length (see
    /// [`whole_of_part`]).
    fn vary_as_whole(&self, asked: &Asked, headers: &mut HeaderMap, dropped: HeaderMap) {
        let mut whole = headers.clone();
        whole.extend(dropped);
        whole_of_part(&mut whole);
        if self.decide(asked, StatusCode::OK, &whole, SizeHint::default()) != Decision::Leave {
            add_vary(headers);
        }
    }

    /// Whether `content_type` is among the types compressed.
    fn listed(&self, content_type: Option<&HeaderValue>) -> bool {
        let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let essence = value.split(';').next().unwrap_or("").trim();
        let Some((kind, _)) = essence.split_once('/') else {
            return false;
        };
        self.config
            .types
            .iter()
            .any(|listed| match listed.strip_suffix("/*") {
                Some(listed_kind) => listed_kind.eq_ignore_ascii_case(kind),
                None => listed.eq_ignore_ascii_case(essence),
            })
    }
}

/// Takes the range off a request whose `If-Range` is a date, from a
/// client that takes gzip on a route that compresses. The date is the
/// plain body's `Last-Modified`, which the gzip form carries too: it
/// matched for a client holding gzip bytes and got it a range of the
/// plain body, which it cannot join to them (range53 M2). It gets the
/// whole response instead, compressed if it is one to compress, as from
/// nginx, which sends no range of what it compresses. An entity tag tells
/// the forms apart (the gzip form's is weak, which `If-Range` never
/// matches), so a range it validates is served.
pub fn without_dated_range(headers: &mut HeaderMap) {
    let dated = headers.get(header::IF_RANGE).is_some_and(|value| {
        !value.as_bytes().starts_with(b"\"") && !value.as_bytes().starts_with(b"W/")
    });
    if dated {
        headers.remove(header::RANGE);
        headers.remove(header::IF_RANGE);
    }
}

/// The fields of its 200 a 304 the cache made dropped (`Content-Type`,
/// `Content-Length`, `Content-Encoding`...), kept in its extensions for
/// the `Vary` that 200 would carry (see [`Compressor::apply`]).
#[derive(Clone)]
pub struct Stripped(pub HeaderMap);

/// Makes a 206's fields those of its 200, for what compression decides
/// of it: no `Content-Range`, and the complete length it names
/// (`bytes a-b/N`) as `Content-Length`. Fields without `Content-Range`
/// are left as they are.
fn whole_of_part(headers: &mut HeaderMap) {
    let Some(range) = headers.remove(header::CONTENT_RANGE) else {
        return;
    };
    let length = range
        .to_str()
        .ok()
        .and_then(|range| range.rsplit_once('/'))
        .and_then(|(_, length)| length.trim().parse::<u64>().ok());
    match length {
        Some(length) => headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length)),
        None => headers.remove(header::CONTENT_LENGTH),
    };
}

/// Whether `Accept-Encoding` takes gzip (RFC 9110 §12.5.3): `gzip` or
/// `x-gzip` with a weight above 0, or, neither named, `*` with one. No
/// field: nothing is compressed (the RFC allows any coding then, but
/// clients that take one say so, and nginx and Varnish read it so).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut named = None;
    let mut any = None;
    for item in list_members(headers, &header::ACCEPT_ENCODING) {
        let mut params = item.split(';');
        let coding = params.next().unwrap_or("").trim();
        let weight = params.find_map(|param| {
            let (name, value) = param.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("q")
                .then(|| positive_weight(value.trim()))
        });
        // No weight is 1; one that is no weight refuses.
        let taken = weight.unwrap_or(true);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            // `gzip;q=0` refuses it whatever else says (x-gzip too).
            named = Some(named.unwrap_or(true) && taken);
        } else if coding == "*" {
            any = Some(any.unwrap_or(true) && taken);
        }
    }
    named.or(any).unwrap_or(false)
}

/// Whether a weight (RFC 9110 §12.4.2: `0` to `1` with up to three
/// decimals) is above 0. One that is none counts as 0.
fn positive_weight(value: &str) -> bool {
    let bytes = value.as_bytes();
    let valid = match bytes {
        [b'0'] | [b'1'] => true,
        [b'0', b'.', rest @ ..] => rest.len() <= 3 && rest.iter().all(u8::is_ascii_digit),
        [b'1', b'.', rest @ ..] => rest.len() <= 3 && rest.iter().all(|b| *b == b'0'),
        _ => false,
    };
    valid && bytes.iter().any(|b| (b'1'..=b'9').contains(b))
}

/// Whether a 304's strong `ETag` is named weakly by the request's
/// `If-None-Match`: the tag of the gzip copy this sent the client.
fn revalidates_gzip(if_none_match: Option<&HeaderValue>, headers: &HeaderMap) -> bool {
    let (Some(asked), Some(tag)) = (if_none_match, headers.get(header::ETAG)) else {
        return false;
    };
    let tag = tag.as_bytes();
    if tag.first() != Some(&b'"') {
        return false;
    }
    // Tags may hold commas: looked for whole, `W/` before it.
    let asked = asked.as_bytes();
    memchr::memmem::find_iter(asked, tag).any(|at| at >= 2 && &asked[at - 2..at] == b"W/")
}

/// What a compressed response's head says: `Content-Encoding`, `Vary`,
/// the compressed `length` if it is known (a copy's) or none, no ranges,
/// a weak tag; made for each compressed response, and once for a gzip
/// copy the cache keeps. Fields are taken out before others go in: a
/// hit's copy of the stored fields has no room to spare, and a field more
/// grows its table.
fn gzip_head(headers: &mut HeaderMap, length: Option<usize>) {
    match length {
        Some(length) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
    // A range of the compressed body cannot be served, and a range of the
    // plain one would not be of what this said it sent.
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    add_vary(headers);
    weaken_etag(headers);
}

/// Adds `Accept-Encoding` to `Vary`, unless it is there or `Vary` is `*`.
fn add_vary(headers: &mut HeaderMap) {
    let said = list_members(headers, &header::VARY)
        .any(|name| name == "*" || name.eq_ignore_ascii_case("accept-encoding"));
    if !said {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// A strong `ETag` made weak: the compressed body is not the bytes the
/// tag names (RFC 9110 §8.8.1), and a weak tag still matches it in
/// `If-None-Match`, as nginx does.
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(tag) = headers.get(header::ETAG) else {
        return;
    };
    if tag.as_bytes().first() != Some(&b'"') {
        return;
    }
    let mut weak = Vec::with_capacity(tag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(tag.as_bytes());
    if let Ok(weak) = HeaderValue::from_maybe_shared(Bytes::from(weak)) {
        headers.insert(header::ETAG, weak);
    }
}

/// A body compressed with gzip as it is sent. What the body gives is
/// compressed as it comes and sent in pieces of [`OUT_PIECE`]; when the
/// body has nothing more ready, what was taken is flushed (a sync flush),
/// so a body that streams slowly (events, progress) reaches the client as
/// its backend sends it, not when zlib's blocks fill. Not at the first
/// Pending: as [`Gathered`](super::body::Gathered) does, the task first
/// lets the backend connection's task run (hyper decodes a backend's next
/// frame there), and flushes if the body has still nothing on its next
/// turn: a body coming as fast as it is read is not cut into small blocks
/// (a flush ends zlib's block: ~7 bytes at level 1, ~40 at 6, and new
/// code tables after it). Nor sooner than [`FLUSH_GAP`] after the last
/// flush: a body trickling in has what came meanwhile flushed together.
#[derive(Debug)]
pub struct Gzip {
    pub(super) inner: ProxyBody,
    level: u32,
    /// Taken at the first input zlib is given ([`Gzip::step`]), let go
    /// at the stream's end.
    encoder: Option<Encoder>,
    /// The gzip stream is ended (or the body failed).
    done: bool,
    /// Input not yet given to zlib, before it has an encoder: a body that
    /// ends within [`HOLD`] is compressed at once at its end, and holds an
    /// encoder only then (review46c M1: 64 KiB bodies from a backend to
    /// 256 clients held ~260 encoders, one from each response's head to
    /// its last frame, 130 MB).
    held: Vec<u8>,
    /// The body's trailers, sent after the gzip stream's end.
    trailers: Option<HeaderMap>,
    /// Input taken since the last flush.
    unflushed: bool,
    /// When the stream was last flushed, and the wait for the next flush
    /// to be due (see [`FLUSH_GAP`]), made only for a body that trickles.
    flushed_at: Option<tokio::time::Instant>,
    flush_due: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Found the body with nothing ready and yielded (or sent what came
    /// before its error), waiting for a turn to pass.
    yielded: Turn,
    /// Where zlib writes, handed on whole as a frame.
    out: Vec<u8>,
    /// The inner body's error, held a turn after what came before it.
    failed: Option<BodyError>,
    /// Bytes taken and given since they were last added to the metrics
    /// (at the body's end, or past [`COUNT_EVERY`]).
    bytes_in: u64,
    bytes_out: u64,
    counters: Counters,
    /// Where the whole stream goes too, if anywhere.
    keep: Option<Box<Keep>>,
}

/// An encoder, given back to [`SPARES`] when dropped at the end of its
/// stream.
struct Encoder {
    zlib: Option<(u32, Compress)>,
    /// Its stream was ended. One left in the middle is not kept: zlib-rs's
    /// reset leaves level 1's block open, and the next stream made with it
    /// did not decode (review46a H1).
    ended: bool,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Encoder {
    fn new(level: u32) -> Self {
        // A load first: the line is written only once a second.
        if !TAKEN.load(Ordering::Relaxed) {
            TAKEN.store(true, Ordering::Relaxed);
        }
        let spare = SPARES.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let zlib = match spare {
            Some((kept, zlib)) if kept == level => Some(zlib),
            // Kept at another level (before a reload changed it): set to
            // this one, so that spares of the old level are not left
            // unused while new ones are made.
            Some((_, mut zlib)) => zlib.set_level(Level::new(level)).is_ok().then_some(zlib),
            None => None,
        };
        let zlib = zlib.unwrap_or_else(|| Compress::new_gzip(Level::new(level), 15));
        Encoder {
            zlib: Some((level, zlib)),
            ended: false,
        }
    }

    fn zlib(&mut self) -> &mut Compress {
        &mut self.zlib.as_mut().expect("taken only on drop").1
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        let Some((level, mut zlib)) = self.zlib.take().filter(|_| self.ended) else {
            return;
        };
        let spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() >= SPARES_KEPT {
            return;
        }
        // Outside the lock: a reset clears zlib's 128 KiB hash table.
        drop(spares);
        zlib.reset();
        let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < SPARES_KEPT {
            spares.push((level, zlib));
        }
    }
}

impl Gzip {
    fn new(inner: ProxyBody, level: u32, counters: Counters) -> Self {
        Gzip {
            inner,
            level,
            encoder: None,
            done: false,
            held: Vec::new(),
            trailers: None,
            unflushed: false,
            flushed_at: None,
            flush_due: None,
            yielded: Turn::default(),
            out: Vec::new(),
            failed: None,
            bytes_in: 0,
            bytes_out: 0,
            counters,
            keep: None,
        }
    }

    /// The stream given to `keep` too, once whole.
    fn keeping(mut self, keep: Option<Box<Keep>>) -> Self {
        self.keep = keep;
        self
    }

    /// Feeds `input` to zlib with `flush`, adding what it gives to `out`.
    fn step(&mut self, input: &[u8], flush: FlushCompress) -> Result<(), BodyError> {
        if self.done {
            return Ok(());
        }
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            self.step(&held, FlushCompress::None)?;
        }
        let level = self.level;
        let encoder = self.encoder.get_or_insert_with(|| Encoder::new(level));
        let zlib = encoder.zlib();
        let out = &mut self.out;
        let mut input = input;
        loop {
            if out.capacity() - out.len() < 64 {
                // Text compresses to well under half; more is made room
                // for if it does not.
                out.reserve(input.len() / 2 + 256);
            }
            let before = zlib.total_in();
            let status = zlib
                .compress_vec(input, out, flush)
                .map_err(|e| BodyError::Compress(io::Error::other(e)))?;
            input = &input[(zlib.total_in() - before) as usize..];
            let full = out.capacity() == out.len();
            match status {
                Status::StreamEnd => {
                    encoder.ended = true;
                    return Ok(());
                }
                // zlib filled the room it had: there is more to give.
                Status::Ok if full => {}
                Status::Ok if !input.is_empty() => {}
                Status::Ok if flush != FlushCompress::Finish => return Ok(()),
                // Nothing to do: no input, and nothing pending to flush.
                Status::BufError if input.is_empty() && flush != FlushCompress::Finish => {
                    return Ok(())
                }
                // Finishing with room to spare ends the stream; zlib
                // made no progress (a `BufError`) or stopped short.
                _ => {
                    return Err(BodyError::Compress(io::Error::other(
                        "zlib stopped before the gzip stream's end",
                    )))
                }
            }
        }
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.failed.is_some() {
            // What came before the error went out on the last poll; the
            // error follows once hyper has written it, a turn later
            // (hyper drops what it holds unwritten when a body fails).
            std::task::ready!(self.yielded.wait(cx));
            self.end();
            return Poll::Ready(self.failed.take().map(Err));
        }
        if self.done {
            return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        // A copy is made by the first hit whose body is polled, not by
        // one whose client reads nothing yet (review47b L4).
        if let Some(keep) = &mut self.keep {
            if !keep.claimed && !keep.claim() {
                self.keep = None;
            }
        }
        // Input taken in this poll: a body in memory that compresses very
        // well would otherwise be taken whole (8 MiB of repeated JSON in 9
        // ms at level 2, review46d L2), holding up the task's other work.
        let mut taken = 0;
        loop {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            if polled.is_ready() {
                self.yielded.clear();
            }
            let (data, flush) = match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if self.inner.is_end_stream() => (data, FlushCompress::Finish),
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => (data, FlushCompress::None),
                    Err(frame) => {
                        // A digest the head did not announce is of the
                        // plain body: not of what is sent (gzip53 M1).
                        self.trailers = frame.into_trailers().ok().map(|mut trailers| {
                            for digest in &DIGESTS {
                                trailers.remove(digest);
                            }
                            trailers
                        });
                        (Bytes::new(), FlushCompress::Finish)
                    }
                },
                Poll::Ready(None) => (Bytes::new(), FlushCompress::Finish),
                Poll::Ready(Some(Err(error))) => {
                    // What came before the break goes to the client first,
                    // as it does uncompressed (review46d M1: a gzip client
                    // got none of it).
                    if self.unflushed && self.step(&[], FlushCompress::Sync).is_ok() {
                        if let Some(out) = self.take_out() {
                            self.unflushed = false;
                            self.failed = Some(error);
                            self.yielded.mark();
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    self.end();
                    return Poll::Ready(Some(Err(error)));
                }
                // Nothing taken since the last flush, or the body yielding
                // a turn itself (it woke the task).
                Poll::Pending if !self.unflushed || self.inner.is_gathering() => {
                    return Poll::Pending
                }
                // Flushed once a turn has passed with nothing more, and
                // no sooner than FLUSH_GAP after the last flush.
                Poll::Pending => match self.yielded.wait(cx) {
                    Poll::Ready(()) if self.flush_waits(cx) => {
                        // The turn has passed: the timer's wake-up flushes
                        // at once, not a turn later (review59 L1).
                        self.yielded.mark();
                        return Poll::Pending;
                    }
                    Poll::Ready(()) => (Bytes::new(), FlushCompress::Sync),
                    Poll::Pending => return Poll::Pending,
                },
            };
            let hold = self.encoder.is_none()
                && flush == FlushCompress::None
                && self.held.len() + data.len() <= HOLD;
            if hold {
                self.held.extend_from_slice(&data);
            } else if let Err(error) = self.step(&data, flush) {
                tracing::warn!(%error, "gzip encoder failed; response cut short");
                self.end();
                return Poll::Ready(Some(Err(error)));
            }
            self.bytes_in += data.len() as u64;
            taken += data.len();
            if let Some(keep) = &mut self.keep {
                keep.taken += data.len();
            }
            match flush {
                FlushCompress::Finish => {
                    self.end();
                    if let Some(keep) = self.keep.take() {
                        keep.store(&self.out);
                    }
                }
                FlushCompress::Sync => {
                    self.unflushed = false;
                    self.flushed_at = Some(tokio::time::Instant::now());
                }
                _ => self.unflushed = true,
            }
            let due = flush != FlushCompress::None || self.out.len() >= OUT_PIECE;
            if due || taken >= IN_PER_POLL {
                if let Some(out) = self.take_out() {
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
            if self.done {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if taken >= IN_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    /// Whether a flush waits, the last one less than [`FLUSH_GAP`] ago:
    /// the task is woken when it is due (input coming meanwhile joins it).
    fn flush_waits(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(due) = self.flushed_at.map(|at| at + FLUSH_GAP) else {
            return false;
        };
        // The runtime's clock, which the timer goes by (review59 L2).
        if tokio::time::Instant::now() >= due {
            return false;
        }
        let timer = match &mut self.flush_due {
            Some(timer) => {
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
                timer
            }
            None => self
                .flush_due
                .insert(Box::pin(tokio::time::sleep_until(due))),
        };
        std::future::Future::poll(timer.as_mut(), cx).is_pending()
    }

    /// What zlib gave since the last frame, if anything, as the next one.
    fn take_out(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            return None;
        }
        self.bytes_out += self.out.len() as u64;
        let out = Bytes::from(std::mem::take(&mut self.out));
        if let Some(keep) = &mut self.keep {
            keep.gather(&out);
            if !keep.measuring() {
                self.keep = None;
            }
        }
        // A long stream shows in the metrics as it goes, a MiB at a time.
        if self.bytes_in >= COUNT_EVERY {
            self.count();
        }
        Some(out)
    }

    /// Adds the bytes taken and given since the last count to the metrics.
    fn count(&mut self) {
        self.counters
            .bytes_in
            .inc_by(std::mem::take(&mut self.bytes_in));
        self.counters
            .bytes_out
            .inc_by(std::mem::take(&mut self.bytes_out));
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    /// Ends the stream: its encoder goes (kept if the stream ended whole).
    fn end(&mut self) {
        self.done = true;
        self.encoder = None;
        self.held = Vec::new();
    }
}

impl Drop for Gzip {
    fn drop(&mut self) {
        self.count();
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    /// A cache of `max_size` holding one 10,000-byte response: its key
    /// and entry.
    async fn stored_in(max_size: u64) -> (Arc<Cache>, String, Arc<Entry>) {
        let config = crate::config::Cache {
            max_size,
            ..crate::config::Cache::default()
        };
        let cache = Cache::new(config, Arc::new(crate::metrics::Metrics::new()));
        let primary = crate::cache::key::primary("http", "shop", "/page");
        let fill = cache.begin_fill(primary.clone());
        let now = std::time::SystemTime::now();
        let stored = Entry::new(
            StatusCode::OK,
            None,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; 10_000]),
            crate::cache::policy::Timing::new(&HeaderMap::new(), now, now),
            std::time::Duration::from_secs(60),
            crate::cache::policy::CacheControl::default(),
        );
        cache.insert(&fill, &HeaderMap::new(), stored).await;
        let key = cache.key_for(&primary, &HeaderMap::new()).unwrap();
        let entry = cache.get(&key).await.unwrap();
        (cache, key, entry)
    }

    /// A [`Keep`] for a copy of `entry`.
    fn keep(cache: &Arc<Cache>, key: &str, entry: &Arc<Entry>) -> Keep {
        let stored = counters().copies_stored;
        Keep::new(cache, key.to_owned(), entry.clone(), 2, stored)
    }

    #[tokio::test]
    async fn one_hit_at_a_time_gathers_a_copy_and_no_more_than_fits() {
        let (cache, key, entry) = stored_in(1 << 20).await;
        let mut first = keep(&cache, &key, &entry);
        let mut second = keep(&cache, &key, &entry);
        assert!(first.claim());
        assert!(!second.claim(), "claimed by the first");
        // What it gathers is bounded by the room the cache has free
        // (review47d H1: every hit that found no copy held all it sent).
        // room, less what the copy's head and bookkeeping will take.
        let room = first.room;
        assert!(room < usize::try_from(cache.free_room()).unwrap());
        assert!(first.gather(&vec![0; room / 2]));
        assert!(!first.gather(&vec![0; room - room / 2 + 1]));
        assert!(!first.gather(&[0]), "a stream with a piece left out");
        drop(first);
        assert!(second.claim(), "let go by the first");

        // A cache with a few bytes free beside a copy's head gathers no
        // more; one with less than a head's room free gathers nothing,
        // only measures (review60 M1).
        let head = cache.free_room() - room as u64;
        let (cache, key, entry) = stored_in(entry.bytes(&key) + head + 100).await;
        let mut gathering = keep(&cache, &key, &entry);
        assert!(gathering.claim());
        assert!(!gathering.gather(&[0; 101]));
        let (cache, key, entry) = stored_in(entry.bytes(&key) + head).await;
        let mut measuring = keep(&cache, &key, &entry);
        assert!(measuring.claim());
        assert_eq!(measuring.room, 0);
        assert!(!measuring.gather(&[0]));
        assert!(measuring.measuring());
        // A stream as long as the entry: noted as saving nothing, though
        // no copy could be kept (review60 M1: noted only of one that fit).
        assert!(!measuring.gather(&vec![0; entry.body.len() - 1]));
        assert!(!measuring.measuring());
        assert!(entry.incompressible(2));
    }

    /// A copy no smaller than its response is not kept (gzip53 L2).
    #[tokio::test]
    async fn a_copy_no_smaller_than_its_response_is_not_kept() {
        for (size, kept) in [(10_000, 0), (9_999, 1)] {
            let (cache, key, entry) = stored_in(1 << 20).await;
            let mut copy = keep(&cache, &key, &entry);
            let stored = copy.stored.clone();
            assert!(copy.claim());
            copy.taken = entry.body.len();
            assert!(copy.gather(&vec![0; size]));
            Box::new(copy).store(&[]);
            // Until the store's task has kept it, or long past that.
            for _ in 0..50 {
                if stored.get() == 1 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(stored.get(), kept, "{size}");
        }
    }

    fn counters() -> Counters {
        let counter = || IntCounter::new("c", "c").unwrap();
        Counters {
            responses: counter(),
            bytes_in: counter(),
            bytes_out: counter(),
            copies_stored: counter(),
            copies_served: counter(),
        }
    }

    fn compressor() -> Compressor {
        Compressor::new(Config::default(), counters())
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn accept_encoding_is_read_as_rfc_9110_has_it() {
        let cases: &[(&[&str], bool)] = &[
            (&[], false),
            (&[""], false),
            (&["gzip"], true),
            (&["GZip"], true),
            (&["x-gzip"], true),
            (&["br, gzip"], true),
            (&["br", "gzip"], true),
            (&["gzip;q=0"], false),
            (&["gzip; q=0.000"], false),
            (&["gzip;q=0.001"], true),
            (&["gzip;Q=1.000"], true),
            (&["gzip;q=1.5"], false),
            (&["gzip;q=0.0001"], false),
            (&["gzip;q=high"], false),
            (&["*"], true),
            (&["*;q=0"], false),
            (&["br, *;q=0"], false),
            (&["gzip;q=0, *"], false),
            (&["*;q=0, gzip"], true),
            (&["gzip, x-gzip;q=0"], false),
            (&["identity"], false),
            (&["deflate, br"], false),
            (&["gzipx"], false),
        ];
        for (lines, takes) in cases {
            let fields: Vec<_> = lines.iter().map(|l| ("accept-encoding", *l)).collect();
            assert_eq!(accepts_gzip(&headers(&fields)), *takes, "{lines:?}");
        }
    }

    #[test]
    fn what_is_compressed() {
        let c = compressor();
        let gzip = &Asked {
            gzip: true,
            head: false,
            if_none_match: None,
        };
        let unknown = SizeHint::default();
        let ok = StatusCode::OK;
        let html = ("content-type", "text/html; charset=utf-8");
        type Case<'a> = (StatusCode, &'a [(&'a str, &'a str)], Decision);
        let cases: &[Case] = &[
            (ok, &[html], Decision::Compress),
            (ok, &[html, ("content-length", "1024")], Decision::Compress),
            (ok, &[html, ("content-length", "1023")], Decision::Leave),
            (ok, &[("content-type", "TEXT/CSS")], Decision::Compress),
            (
                ok,
                &[("content-type", "text/event-stream")],
                Decision::Leave,
            ),
            (ok, &[("content-type", "image/png")], Decision::Leave),
            (ok, &[("content-type", "html")], Decision::Leave),
            (ok, &[], Decision::Leave),
            (ok, &[html, ("content-encoding", "gzip")], Decision::Leave),
            (
                ok,
                &[html, ("cache-control", "max-age=1, No-Transform")],
                Decision::Leave,
            ),
            (
                ok,
                &[html, ("content-digest", "sha-256=:x:")],
                Decision::Leave,
            ),
            (ok, &[html, ("repr-digest", "sha-256=:x:")], Decision::Leave),
            (ok, &[html, ("digest", "sha-256=x")], Decision::Leave),
            (ok, &[html, ("content-md5", "x")], Decision::Leave),
            // Announced for the trailers (gzip53 M1).
            (
                ok,
                &[html, ("trailer", "X-Sum, Content-Digest")],
                Decision::Leave,
            ),
            (ok, &[html, ("trailer", "x-sum")], Decision::Compress),
            (
                ok,
                &[html, ("content-range", "bytes 0-1/2")],
                Decision::Leave,
            ),
            // no-transform on a line of its own, or a line that cannot be
            // read (where the directives end is not known).
            (
                ok,
                &[
                    html,
                    ("cache-control", "max-age=1"),
                    ("cache-control", "no-transform"),
                ],
                Decision::Leave,
            ),
            (
                ok,
                &[html, ("cache-control", "x=\"a, private")],
                Decision::Leave,
            ),
            // A quoted value is no directive.
            (
                ok,
                &[html, ("cache-control", "max-age=1, ext=\"no-transform\"")],
                Decision::Compress,
            ),
            // The first length counts, as `get` reads it.
            (
                ok,
                &[html, ("content-length", "1023"), ("content-length", "4096")],
                Decision::Leave,
            ),
            (StatusCode::NOT_FOUND, &[html], Decision::Compress),
            (StatusCode::PARTIAL_CONTENT, &[html], Decision::Leave),
            (StatusCode::NO_CONTENT, &[html], Decision::Leave),
            (StatusCode::RESET_CONTENT, &[html], Decision::Leave),
            (StatusCode::NOT_MODIFIED, &[html], Decision::Leave),
            // Empty content stays empty, whatever min_size says.
            (ok, &[html, ("content-length", "0")], Decision::Leave),
        ];
        for (status, fields, decision) in cases {
            let got = c.decide(gzip, *status, &headers(fields), unknown);
            assert_eq!(got, *decision, "{status} {fields:?}");
        }
        // The body's own length when no field says it.
        let small = c.decide(gzip, ok, &headers(&[html]), SizeHint::with_exact(10));
        assert_eq!(small, Decision::Leave);
        assert_eq!(
            c.decide(gzip, ok, &headers(&[html]), SizeHint::with_exact(0)),
            Decision::Leave
        );
        let plain = &Asked {
            gzip: false,
            head: false,
            if_none_match: None,
        };
        assert_eq!(
            c.decide(plain, ok, &headers(&[html]), unknown),
            Decision::Vary
        );
        // A HEAD's empty body says nothing of the GET's length.
        let head = &Asked {
            gzip: true,
            head: true,
            if_none_match: None,
        };
        let exact_0 = SizeHint::with_exact(0);
        assert_eq!(
            c.decide(head, ok, &headers(&[html]), exact_0),
            Decision::Compress
        );
        // `type/*` takes the whole type.
        let all_text = Config {
            types: vec!["text/*".to_owned()],
            ..Config::default()
        };
        let c = Compressor::new(all_text, counters());
        let events = headers(&[("content-type", "text/event-stream")]);
        assert_eq!(c.decide(gzip, ok, &events, unknown), Decision::Compress);
        let json = headers(&[("content-type", "application/json")]);
        assert_eq!(c.decide(gzip, ok, &json, unknown), Decision::Leave);
    }

    #[test]
    fn vary_and_etag_are_said_once() {
        let mut h = headers(&[("vary", "accept-encoding, cookie"), ("etag", "W/\"a\"")]);
        add_vary(&mut h);
        weaken_etag(&mut h);
        assert_eq!(h.get_all("vary").iter().count(), 1);
        assert_eq!(h["etag"], "W/\"a\"");
        let mut h = headers(&[("vary", "*"), ("etag", "\"a\"")]);
        add_vary(&mut h);
        weaken_etag(&mut h);
        assert_eq!(h.get_all("vary").iter().count(), 1);
        assert_eq!(h["etag"], "W/\"a\"");
    }

    #[test]
    fn a_304_names_the_gzip_copy_a_client_revalidates() {
        let inm = |v: &'static str| Some(HeaderValue::from_static(v));
        let etag = headers(&[("etag", "\"v1\"")]);
        assert!(revalidates_gzip(inm("W/\"v1\"").as_ref(), &etag));
        assert!(revalidates_gzip(inm("\"x\", W/\"v1\"").as_ref(), &etag));
        assert!(!revalidates_gzip(inm("\"v1\"").as_ref(), &etag));
        assert!(!revalidates_gzip(inm("W/\"v2\"").as_ref(), &etag));
        assert!(!revalidates_gzip(None, &etag));
        let weak = headers(&[("etag", "W/\"v1\"")]);
        assert!(!revalidates_gzip(inm("W/\"v1\"").as_ref(), &weak));
    }

    #[test]
    fn an_empty_frame_or_a_second_flush_is_nothing_to_do() {
        let _alone = POOL.blocking_lock();
        let mut gzip = Gzip::new(ProxyBody::empty(), 1, counters());
        gzip.step(b"abc", FlushCompress::None).unwrap();
        gzip.step(b"", FlushCompress::None).unwrap();
        gzip.step(b"", FlushCompress::Sync).unwrap();
        gzip.step(b"", FlushCompress::Sync).unwrap();
        gzip.step(b"", FlushCompress::Finish).unwrap();
        assert_eq!(gunzip(&gzip.out), b"abc");
    }

    #[test]
    fn a_spare_of_another_level_is_set_to_this_one() {
        let _alone = POOL.blocking_lock();
        // A spare of a level no response asks for any more (a reload
        // changed it).
        let mut kept = SPARES.lock().unwrap_or_else(|e| e.into_inner());
        let before = kept.len();
        kept.push((3, Compress::new_gzip(Level::new(3), 15)));
        drop(kept);
        let mut encoder = Encoder::new(8);
        assert!(
            SPARES.lock().unwrap().len() <= before,
            "the spare was taken"
        );
        let mut out = Vec::with_capacity(1024);
        let text = b"level eight, level eight, level eight, level eight";
        encoder
            .zlib()
            .compress_vec(text, &mut out, FlushCompress::Finish)
            .unwrap();
        assert_eq!(gunzip(&out), text);
    }

    /// A backend's body of `pieces` chunks of ten bytes, one every
    /// `gap`, as a response relays it.
    async fn trickled(pieces: usize, gap: std::time::Duration) -> ProxyBody {
        scheduled(vec![(&b"0123456789"[..], gap); pieces]).await
    }

    /// A backend's body of these chunks, each followed by its pause.
    async fn scheduled(steps: Vec<(&'static [u8], std::time::Duration)>) -> ProxyBody {
        use tokio::io::AsyncWriteExt;
        let incoming = super::super::body::tests::served_body(move |mut stream| async move {
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            stream.write_all(head).await.unwrap();
            for (piece, pause) in steps {
                let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                stream.write_all(&chunk).await.unwrap();
                tokio::time::sleep(pause).await;
            }
            stream.write_all(b"0\r\n\r\n").await.unwrap();
        })
        .await;
        let upstream = crate::upstream::UpstreamBody::unpooled(incoming);
        ProxyBody::stream(upstream, std::time::Duration::from_secs(10), None)
    }

    /// A body trickling in is flushed at most every [`FLUSH_GAP`], not
    /// piece by piece: each flush ends a deflate block, and a byte a
    /// millisecond grew a body sevenfold (gzip53 M2).
    #[tokio::test]
    async fn a_trickled_body_is_flushed_at_most_every_flush_gap() {
        let _alone = POOL.lock().await;
        let gap = std::time::Duration::from_millis(5);
        let body = trickled(60, gap).await;
        let began = std::time::Instant::now();
        let mut gzip = ProxyBody::Gzip(Box::new(Gzip::new(body, 2, counters())));
        let (mut frames, mut out) = (0, Vec::new());
        let wait = std::time::Duration::from_secs(10);
        while let Some(frame) = tokio::time::timeout(wait, gzip.frame()).await.unwrap() {
            if let Ok(data) = frame.unwrap().into_data() {
                frames += 1;
                out.extend_from_slice(&data);
            }
        }
        assert_eq!(gunzip(&out), b"0123456789".repeat(60));
        // About 300 ms of pieces: the first flushed at once, the rest at
        // most every 50 ms, then the end (61 frames, one a piece, before);
        // bounded by the time the pieces took, however long (review59 L4).
        let gaps = began.elapsed().as_millis() / FLUSH_GAP.as_millis();
        assert!(frames <= 2 + gaps, "{frames} frames in {gaps} gaps");
    }

    /// A piece that comes within the gap after a flush, the backend then
    /// silent, is flushed once the gap is over, by the timer alone: not
    /// held until the body's end (review59 L3).
    #[tokio::test]
    async fn a_piece_held_for_the_gap_is_flushed_while_the_backend_is_silent() {
        let _alone = POOL.lock().await;
        let ms = std::time::Duration::from_millis;
        let body = scheduled(vec![
            (&b"first piece "[..], ms(10)),
            (&b"second piece"[..], std::time::Duration::from_secs(20)),
        ])
        .await;
        let mut gzip = ProxyBody::Gzip(Box::new(Gzip::new(body, 2, counters())));
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        let both = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while decoder.get_ref().len() < 24 {
                let frame = gzip.frame().await.unwrap().unwrap();
                if let Ok(data) = frame.into_data() {
                    std::io::Write::write_all(&mut decoder, &data).unwrap();
                    std::io::Write::flush(&mut decoder).unwrap();
                }
            }
        })
        .await;
        assert!(both.is_ok(), "the second piece was not flushed");
        assert_eq!(decoder.get_ref(), b"first piece second piece");
    }

    /// A backend's body of `chunks` chunks of `size` bytes of `x`, and
    /// trailers, as a response relays it.
    async fn backend_body(chunks: usize, size: usize) -> ProxyBody {
        let incoming = super::super::body::tests::chunks_with_trailers(chunks, size).await;
        let upstream = crate::upstream::UpstreamBody::unpooled(incoming);
        ProxyBody::stream(upstream, std::time::Duration::from_secs(10), None)
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut plain).unwrap();
        plain
    }

    #[tokio::test]
    async fn a_body_is_one_gzip_stream_with_its_trailers_after() {
        let _alone = POOL.lock().await;
        let body = backend_body(4, 1000).await;
        let gzip = ProxyBody::Gzip(Box::new(Gzip::new(body, 6, counters())));
        let collected = gzip.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-sum"], "1");
        // A digest in the trailers is of the plain body (gzip53 M1).
        assert!(!collected.trailers().unwrap().contains_key("content-digest"));
        assert_eq!(gunzip(&collected.to_bytes()), vec![b'x'; 4000]);

        // A body in memory larger than one piece.
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let body = ProxyBody::full(Bytes::from(text.clone()));
        let gzip = ProxyBody::Gzip(Box::new(Gzip::new(body, 1, counters())));
        assert_eq!(gunzip(&gzip.collect().await.unwrap().to_bytes()), text);

        // An empty body is an empty gzip stream, not nothing.
        let gzip = ProxyBody::Gzip(Box::new(Gzip::new(ProxyBody::empty(), 1, counters())));
        let bytes = gzip.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..2], b"\x1f\x8b");
        assert_eq!(gunzip(&bytes), b"");
    }

    #[tokio::test]
    async fn an_encoder_is_kept_for_the_next_body() {
        let _alone = POOL.lock().await;
        let level_7 = || {
            SPARES
                .lock()
                .unwrap()
                .iter()
                .filter(|(l, _)| *l == 7)
                .count()
        };
        let body = ProxyBody::full(Bytes::from_static(b"once"));
        let gzip = ProxyBody::Gzip(Box::new(Gzip::new(body, 7, counters())));
        let first = gzip.collect().await.unwrap().to_bytes();
        let kept = level_7();
        assert!(kept >= 1);
        // Taken for the next body, and reset when kept: its stream is
        // whole on its own.
        let body = ProxyBody::full(Bytes::from_static(b"once"));
        let mut gzip = Gzip::new(body, 7, counters());
        gzip.step(b"", FlushCompress::None).unwrap();
        assert_eq!(level_7(), kept - 1, "the kept encoder was taken");
        let second = ProxyBody::Gzip(Box::new(gzip))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(first, second);
    }

    /// An encoder left in the middle of a stream (its client gone, its
    /// backend broken) is not kept: zlib-rs's reset leaves level 1's
    /// block open, and the next stream made with it did not decode
    /// (review46a H1).
    #[test]
    fn an_encoder_left_mid_stream_is_not_kept_and_a_kept_one_makes_whole_streams() {
        let _alone = POOL.blocking_lock();
        let text: Vec<u8> = (0..40_000u32)
            .flat_map(|i| (i % 97).to_le_bytes())
            .collect();
        for level in 1..=9 {
            let mut left = Gzip::new(ProxyBody::empty(), level, counters());
            left.step(&text[..16 * 1024], FlushCompress::None).unwrap();
            drop(left);
            for _ in 0..2 {
                let mut next = Gzip::new(ProxyBody::empty(), level, counters());
                next.step(&text, FlushCompress::Finish).unwrap();
                assert_eq!(gunzip(&next.out), text, "level {level}");
            }
        }
    }

    #[test]
    fn spares_go_after_a_look_that_finds_none_taken() {
        let _alone = POOL.blocking_lock();
        drop_spares();
        assert!(!spares_unused(), "none kept");
        let mut ended = Gzip::new(ProxyBody::empty(), 4, counters());
        ended.step(b"", FlushCompress::Finish).unwrap();
        drop(ended);
        assert!(!spares_unused(), "one taken since the last look");
        assert!(spares_unused(), "none taken since");
        drop_spares();
        assert!(SPARES.lock().unwrap().is_empty());
    }

    /// A body in memory that compresses to little is taken a part at a
    /// time, not whole in one poll (review46d L2: 8 MiB in 9 ms).
    #[test]
    fn one_poll_takes_a_bounded_part_of_a_body() {
        let _alone = POOL.blocking_lock();
        let total = 8 << 20;
        let body = ProxyBody::full(Bytes::from(vec![b'x'; total]));
        let mut gzip = Gzip::new(body, 2, counters());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut polls = 0;
        let mut out = Vec::new();
        loop {
            let before = gzip.inner.size_hint().exact().unwrap_or(0);
            let polled = gzip.poll_frame(&mut cx);
            let after = gzip.inner.size_hint().exact().unwrap_or(0);
            // A piece of the body in memory is 64 KiB.
            assert!(before - after <= (IN_PER_POLL + 64 * 1024) as u64);
            polls += 1;
            match polled {
                Poll::Ready(Some(Ok(frame))) => out.extend_from_slice(&frame.into_data().unwrap()),
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(error))) => panic!("{error}"),
                Poll::Pending => {}
            }
        }
        assert!(polls >= total / IN_PER_POLL, "{polls} polls");
        assert_eq!(gunzip(&out), vec![b'x'; total]);
    }

    /// A body from a backend that ends within [`HOLD`] has no encoder
    /// while it comes: it is compressed at its end (review46c M1).
    #[tokio::test]
    async fn a_short_body_takes_an_encoder_only_at_its_end() {
        let _alone = POOL.lock().await;
        let mut gzip = Gzip::new(backend_body(4, 5000).await, 2, counters());
        let (mut out, mut waited_without_one) = (Vec::new(), false);
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(gzip.poll_frame(cx))).await;
            match polled {
                Poll::Pending => {
                    waited_without_one |= !gzip.held.is_empty() && gzip.encoder.is_none();
                    tokio::task::yield_now().await;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        out.extend_from_slice(&data);
                    }
                }
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(error))) => panic!("{error}"),
            }
        }
        assert!(
            waited_without_one,
            "the body came in one poll: nothing shown"
        );
        assert_eq!(gunzip(&out), vec![b'x'; 20_000]);
    }

    /// The tests that make encoders, one at a time: they share [`SPARES`]
    /// and [`TAKEN`].
    static POOL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
}
