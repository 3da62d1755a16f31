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

/// What a request's `Range` and `If-Range` ask of a stored representation
/// of `len` bytes with `stored` headers.
pub fn evaluate(request: &HeaderMap, stored: &HeaderMap, len: usize) -> RangeAnswer {
    let Some(range) = request.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if let Some(condition) = request.get(header::IF_RANGE) {
        if !if_range_matches(condition, stored) {
            return RangeAnswer::Full;
        }
    }
    let Some((unit, spec)) = range.trim().split_once('=') else {
        return RangeAnswer::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().unwrap_or(u64::MAX))
    };
    let len64 = len as u64;
    match (number(first), number(last), last.trim().is_empty()) {
        // bytes=a-b and bytes=a-
        (Some(start), last, open) if open || last.is_some_and(|l| l >= start) => {
            if start >= len64 {
                return RangeAnswer::Unsatisfiable;
            }
            let end = last.map_or(len64 - 1, |l| l.min(len64 - 1));
            RangeAnswer::Partial {
                start: start as usize,
                end: end as usize,
            }
        }
        // bytes=-n: the last n bytes
        (None, Some(suffix), false) if first.trim().is_empty() => {
            if suffix == 0 || len == 0 {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Partial {
                start: len64.saturating_sub(suffix) as usize,
                end: len - 1,
            }
        }
        // Syntactically invalid: ignored (§14.2).
        _ => RangeAnswer::Full,
    }
}

/// §13.1.5: an entity-tag matches only a strong, identical ETag; a date
/// only an identical Last-Modified.
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
    let date = httpdate::parse_http_date(condition).ok();
    let modified = stored
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    date.is_some() && date == modified
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
    }

    #[test]
    fn if_range_needs_a_strong_identical_validator() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
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
    }
}
