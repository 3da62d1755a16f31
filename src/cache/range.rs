//! Byte ranges served from a stored complete response (RFC 9110 §14): one
//! range per request (a multi-range request gets the whole response, which
//! §14.2 allows), `If-Range` honoured with a strong validator. Pure: the
//! caller turns the answer into a 206, a 416 or the full 200.

use http::header::{self, HeaderMap, HeaderValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Serve the whole representation.
    Full,
    /// Serve bytes `start..=end`.
    Partial { start: usize, end: usize },
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// The one byte range a request asks for (RFC 9110 §14.1.2), before it
/// meets a representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// `bytes=a-b` (`last` given) or `bytes=a-`.
    From { first: u64, last: Option<u64> },
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

impl Spec {
    /// The request's `Range`, when it is one byte range portico serves
    /// itself; None without one, for several ranges, other units or a
    /// syntax error (all of which §14.2 lets a server ignore).
    pub fn of(request: &HeaderMap) -> Option<Spec> {
        let range = request.get(header::RANGE)?.to_str().ok()?;
        let (unit, spec) = range.trim().split_once('=')?;
        if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
            return None;
        }
        let (first, last) = spec.trim().split_once('-')?;
        let number = |s: &str| {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().unwrap_or(u64::MAX))
        };
        match (number(first), number(last), last.trim().is_empty()) {
            (Some(first), last, open) if open || last.is_some_and(|l| l >= first) => {
                Some(Spec::From { first, last })
            }
            (None, Some(suffix), false) if first.trim().is_empty() => Some(Spec::Suffix(suffix)),
            _ => None,
        }
    }

    /// Where the range starts in a representation longer than it reaches:
    /// how much of the body comes before it (unknown for a suffix).
    pub fn first(self) -> Option<u64> {
        match self {
            Spec::From { first, .. } => Some(first),
            Spec::Suffix(_) => None,
        }
    }

    /// The range against a representation of `len` bytes.
    fn against(self, len: usize) -> RangeAnswer {
        let len64 = len as u64;
        match self {
            Spec::From { first, .. } if first >= len64 => RangeAnswer::Unsatisfiable,
            Spec::From { first, last } => RangeAnswer::Partial {
                start: first as usize,
                end: last.map_or(len64 - 1, |l| l.min(len64 - 1)) as usize,
            },
            Spec::Suffix(0) => RangeAnswer::Unsatisfiable,
            // Satisfiable (RFC 9110 §14.1.1), yet no 206 can hold none of
            // nothing: the whole, empty, representation.
            Spec::Suffix(_) if len == 0 => RangeAnswer::Full,
            Spec::Suffix(n) => RangeAnswer::Partial {
                start: len64.saturating_sub(n) as usize,
                end: len - 1,
            },
        }
    }
}

/// What a request's `Range` and `If-Range` ask of a representation of
/// `len` bytes with `stored` headers (a stored response, or one just
/// fetched whole for a range).
pub fn evaluate(request: &HeaderMap, stored: &HeaderMap, len: usize) -> RangeAnswer {
    let Some(spec) = Spec::of(request) else {
        return RangeAnswer::Full;
    };
    if let Some(condition) = request.get(header::IF_RANGE) {
        if !if_range_matches(condition, stored) {
            return RangeAnswer::Full;
        }
    }
    spec.against(len)
}

/// §13.1.5: an entity-tag matches only a strong, identical ETag; a date
/// only an identical Last-Modified, and only when that is a strong
/// validator: for a cache, at least 60 seconds before the response's
/// `Date` (RFC 9110 §8.8.2.2), or a change within the same second could
/// splice two versions.
fn if_range_matches(condition: &HeaderValue, stored: &HeaderMap) -> bool {
    let Ok(condition) = condition.to_str() else {
        return false;
    };
    let condition = condition.trim();
    if condition.starts_with('"') {
        return stored
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|etag| etag.trim() == condition);
    }
    if condition.starts_with("W/") {
        return false;
    }
    let date_of = |name| {
        stored
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
    };
    let (Some(modified), Some(sent)) = (date_of(header::LAST_MODIFIED), date_of(header::DATE))
    else {
        return false;
    };
    let strong = sent
        .duration_since(modified)
        .is_ok_and(|before| before >= std::time::Duration::from_secs(60));
    strong && httpdate::parse_http_date(condition).ok() == Some(modified)
}

#[cfg(test)]
mod tests {
    use super::RangeAnswer::{self, *};
    use super::*;
    use crate::test_support::headers;

    #[test]
    fn single_ranges_against_ten_bytes() {
        let cases: &[(&str, RangeAnswer)] = &[
            ("bytes=0-1", Partial { start: 0, end: 1 }),
            ("bytes=1-", Partial { start: 1, end: 9 }),
            ("bytes=-1", Partial { start: 9, end: 9 }),
            ("bytes=-50", Partial { start: 0, end: 9 }),
            ("bytes=5-500", Partial { start: 5, end: 9 }),
            ("BYTES = 2-3", Partial { start: 2, end: 3 }),
            ("bytes=10-", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            // Ignored, so the whole response goes out.
            ("bytes=3-1", Full),
            ("bytes=0-1,4-5", Full),
            ("items=0-1", Full),
            ("bytes=a-b", Full),
            ("bytes=-", Full),
            ("bytes 0-1", Full),
        ];
        for &(range, want) in cases {
            let request = headers(&[("range", range)]);
            assert_eq!(evaluate(&request, &HeaderMap::new(), 10), want, "{range}");
        }
        assert_eq!(evaluate(&HeaderMap::new(), &HeaderMap::new(), 10), Full);
        let empty = |range| evaluate(&headers(&[("range", range)]), &HeaderMap::new(), 0);
        assert_eq!(empty("bytes=-5"), Full);
        assert_eq!(empty("bytes=0-"), Unsatisfiable);
    }

    #[test]
    fn if_range_needs_a_strong_identical_validator() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("date", "Sun, 06 Nov 1994 08:50:37 GMT"),
        ]);
        let partial = Partial { start: 0, end: 1 };
        for (if_range, want) in [
            ("\"v1\"", partial),
            ("\"v2\"", Full),
            ("W/\"v1\"", Full),
            ("Sun, 06 Nov 1994 08:49:37 GMT", partial),
            ("Sun, 06 Nov 1994 08:49:38 GMT", Full),
            ("garbage", Full),
        ] {
            let request = headers(&[("range", "bytes=0-1"), ("if-range", if_range)]);
            assert_eq!(evaluate(&request, &stored, 10), want, "{if_range}");
        }
        // A Last-Modified less than a minute before Date (or without a
        // Date) is weak: a date never matches it.
        let date_match = headers(&[
            ("range", "bytes=0-1"),
            ("if-range", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        for date in [Some("Sun, 06 Nov 1994 08:50:36 GMT"), None] {
            let mut weak = headers(&[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
            if let Some(date) = date {
                weak.insert(header::DATE, HeaderValue::from_static(date));
            }
            assert_eq!(evaluate(&date_match, &weak, 10), Full, "{date:?}");
        }
    }
}
