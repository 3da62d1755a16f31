//! The last element of an RFC 7239 `Forwarded` field: the one the proxy
//! that sent the request appended, which says what that proxy saw (the
//! scheme and host its client used). Parsing only, strict where a loose
//! reading could be steered: quoted-strings are honoured when finding the
//! element, and an element that does not follow RFC 7239 §4 is reported
//! as such, not read in part. Whom to believe is `headers`'s business;
//! the client address (`for=`) is read by `limit::client`.

use std::borrow::Cow;

use http::header::{HeaderMap, HeaderName};

static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The `for` (the node the element speaks of: the client), `proto` and
/// `host` of one well-formed element, unquoted; `None` for a parameter the
/// element does not carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element<'a> {
    pub node: Option<Cow<'a, [u8]>>,
    pub proto: Option<Cow<'a, [u8]>>,
    pub host: Option<Cow<'a, [u8]>>,
}

/// The last element of `Forwarded` over all its lines (RFC 9110 §5.3: the
/// lines are one list), empty elements skipped as RFC 9110 §5.6.1 says.
/// `Ok(None)` without a field or an element; `Err(Malformed)` when the
/// last element breaks RFC 7239 §4: a pair that is not `token=value`, a
/// value neither a token nor a quoted-string, a quote left open, a
/// parameter given twice.
pub fn last_element(headers: &HeaderMap) -> Result<Option<Element<'_>>, Malformed> {
    let last = headers
        .get_all(&FORWARDED)
        .iter()
        .rev()
        .find_map(|line| last_in_line(line.as_bytes()));
    last.map(parse_element).transpose()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// The last element of one line that holds more than whitespace.
fn last_in_line(line: &[u8]) -> Option<&[u8]> {
    elements_from_right(line).find(|e| !is_blank(e))
}

/// The elements of one line, right-most first, split at the commas
/// outside quoted-strings as seen from the right end. The right-most
/// elements are the ones the trusted proxies appended, well formed, so
/// scanning from that end finds their bounds whatever a client put to
/// their left: a quote a client left open swallows nothing of theirs,
/// where a scan from the left would run it over them. What is left of a
/// client's junk comes out as one malformed element.
pub fn elements_from_right(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (mut end, mut at, mut quoted, mut done) = (line.len(), line.len(), false, false);
    std::iter::from_fn(move || {
        while at > 0 {
            at -= 1;
            match line[at] {
                // Inside a quoted-string, `\"` is a quote character, not
                // its end: an odd run of backslashes before it escapes it.
                b'"' if !quoted || escapes(&line[..at]).is_multiple_of(2) => quoted = !quoted,
                b',' if !quoted => {
                    let element = &line[at + 1..end];
                    end = at;
                    return Some(element);
                }
                _ => {}
            }
        }
        (!std::mem::replace(&mut done, true)).then(|| &line[..end])
    })
}

/// The backslashes `text` ends with.
fn escapes(text: &[u8]) -> usize {
    text.iter().rev().take_while(|&&b| b == b'\\').count()
}

fn is_blank(element: &[u8]) -> bool {
    element.iter().all(|&b| b == b' ' || b == b'\t')
}

fn trim_ows(text: &[u8]) -> &[u8] {
    let start = text.iter().position(|&b| b != b' ' && b != b'\t');
    let end = text.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(start), Some(end)) => &text[start..=end],
        _ => &[],
    }
}

/// `forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] )`,
/// with `forwarded-pair = token "=" value`. Whitespace is allowed around
/// `;` (it changes no meaning), not around `=`.
pub fn parse_element(element: &[u8]) -> Result<Element<'_>, Malformed> {
    let mut found = Element::default();
    // The RFC 7239 parameters seen so far (for, by, proto, host), one bit each.
    let mut seen = 0u8;
    let mut rest = element;
    loop {
        rest = trim_ows(rest);
        if !rest.is_empty() && rest[0] != b';' {
            let (name, after) = rest.split_at(rest.iter().take_while(|&&b| tchar(b)).count());
            let (value, after) = match after.split_first() {
                Some((b'=', value)) if !name.is_empty() => parse_value(value)?,
                _ => return Err(Malformed),
            };
            let bit = ["for", "by", "proto", "host"]
                .iter()
                .position(|known| name.eq_ignore_ascii_case(known.as_bytes()))
                .map_or(0, |i| 1u8 << i);
            if seen & bit != 0 {
                return Err(Malformed);
            }
            seen |= bit;
            if name.eq_ignore_ascii_case(b"for") {
                found.node = Some(value);
            } else if name.eq_ignore_ascii_case(b"proto") {
                found.proto = Some(value);
            } else if name.eq_ignore_ascii_case(b"host") {
                found.host = Some(value);
            }
            rest = trim_ows(after);
        }
        match rest.split_first() {
            None => return Ok(found),
            Some((b';', after)) => rest = after,
            Some(_) => return Err(Malformed),
        }
    }
}

/// `value = token / quoted-string`, unquoted, and what follows it.
fn parse_value(text: &[u8]) -> Result<(Cow<'_, [u8]>, &[u8]), Malformed> {
    let Some(inner) = text.strip_prefix(b"\"") else {
        let end = text.iter().take_while(|&&b| tchar(b)).count();
        return match end {
            0 => Err(Malformed),
            _ => Ok((Cow::Borrowed(&text[..end]), &text[end..])),
        };
    };
    let mut unescaped: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < inner.len() {
        match inner[i] {
            b'"' => {
                let value = unescaped.map_or(Cow::Borrowed(&inner[..i]), Cow::Owned);
                return Ok((value, &inner[i + 1..]));
            }
            b'\\' => {
                let &escaped = inner.get(i + 1).ok_or(Malformed)?;
                if !qdtext(escaped) && escaped != b'"' && escaped != b'\\' {
                    return Err(Malformed);
                }
                unescaped
                    .get_or_insert_with(|| inner[..i].to_vec())
                    .push(escaped);
                i += 2;
            }
            b if qdtext(b) => {
                if let Some(text) = &mut unescaped {
                    text.push(b);
                }
                i += 1;
            }
            _ => return Err(Malformed),
        }
    }
    // The quote never closed.
    Err(Malformed)
}

/// RFC 9110 `tchar`.
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 `qdtext`: HTAB, SP, visible ASCII but `"` and `\`, obs-text.
fn qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::headers;

    #[test]
    fn the_last_element_is_read_strictly() {
        // (Forwarded lines, (proto, host) of the last element, or None for
        // malformed)
        type Want<'a> = Option<(Option<&'a str>, Option<&'a str>)>;
        let cases: &[(&[&str], Want)] = &[
            (&[], Some((None, None))),
            (&["for=192.0.2.1"], Some((None, None))),
            (
                &["for=192.0.2.1;proto=https;host=example.com"],
                Some((Some("https"), Some("example.com"))),
            ),
            // Names in any case, values quoted or not, pairs in any order.
            (
                &["Host=\"example.com:8443\";PROTO=\"https\""],
                Some((Some("https"), Some("example.com:8443"))),
            ),
            (
                &["for=\"[2001:db8::1]:80\";host=\"[2001:db8::2]:443\""],
                Some((None, Some("[2001:db8::2]:443"))),
            ),
            // Only the last element counts, over all lines.
            (
                &["proto=http, for=192.0.2.1;proto=https"],
                Some((Some("https"), None)),
            ),
            (
                &["proto=https;host=a.example", "for=192.0.2.1"],
                Some((None, None)),
            ),
            // Empty elements and pairs count for nothing.
            (&["proto=https, ,", " "], Some((Some("https"), None))),
            (
                &["for=192.0.2.1;;proto=https;"],
                Some((Some("https"), None)),
            ),
            (
                &["for=192.0.2.1 ; proto=https"],
                Some((Some("https"), None)),
            ),
            // A comma or semicolon inside a quoted-string splits nothing.
            (
                &["for=192.0.2.1;x=\"a, b;proto=http\";proto=https"],
                Some((Some("https"), None)),
            ),
            (&["proto=\"ht\\tps\""], Some((Some("https"), None))),
            // An extension parameter is skipped, even given twice.
            (&["x=1;x=2;proto=https"], Some((Some("https"), None))),
            // Malformed: repeated parameters, bad pairs, open quotes.
            (&["proto=https;proto=http"], None),
            (&["for=1;For=2"], None),
            (&["proto = https"], None),
            (&["proto=https host=a"], None),
            (&["proto="], None),
            (&["=https"], None),
            (&["proto"], None),
            (&["proto=htt\"ps\""], None),
            (&["proto=\"https"], None),
            (&["proto=\"https\"x"], None),
            (&["proto=https/2"], None),
            (&["host=example.com:8443"], None),
            // A quote a client opened to the left swallows nothing of the
            // element its proxy appended at the right end.
            (&["x=\"a, proto=https"], Some((Some("https"), None))),
            (
                &["x=\"a\\\", b\", proto=https"],
                Some((Some("https"), None)),
            ),
            (&["for=1;x=\"a\\\", proto=http\""], Some((None, None))),
        ];
        for (lines, want) in cases {
            let pairs: Vec<_> = lines.iter().map(|line| ("forwarded", *line)).collect();
            let headers = headers(&pairs);
            let got = last_element(&headers).map(|element| {
                let element = element.unwrap_or_default();
                let text =
                    |v: Option<Cow<[u8]>>| v.map(|v| String::from_utf8(v.into_owned()).unwrap());
                (text(element.proto), text(element.host))
            });
            let want = want
                .map(|(p, h)| (p.map(str::to_owned), h.map(str::to_owned)))
                .ok_or(Malformed);
            assert_eq!(got, want, "{lines:?}");
        }
    }
}
