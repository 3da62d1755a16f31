//! RFC 9213 targeted cache control: `CDN-Cache-Control` is meant for
//! caches like portico and, when present and valid, replaces
//! `Cache-Control` and `Expires` for the cache's own decisions (the client
//! still gets every field). Its value is an RFC 8941 Dictionary; a field
//! that does not parse is ignored as a whole, and a directive whose value
//! has the wrong type is ignored alone.

use std::collections::HashMap;

use http::header::{HeaderMap, HeaderName};

use super::policy::{CacheControl, MAX_DELTA};

pub static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// A Dictionary member's value, as far as cache directives care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Integer(i64),
    Boolean(bool),
    /// A decimal, string, token, byte sequence or inner list.
    Other,
}

/// The directives of a valid, non-empty `CDN-Cache-Control`, else `None`.
pub fn parse(headers: &HeaderMap) -> Option<CacheControl> {
    let mut text = String::new();
    for line in headers.get_all(&CDN_CACHE_CONTROL) {
        if !text.is_empty() {
            text.push(',');
        }
        text.push_str(line.to_str().ok()?);
    }
    let members = dictionary(text.as_bytes())?;
    if members.is_empty() {
        return None;
    }
    let mut cc = CacheControl {
        targeted: true,
        ..CacheControl::default()
    };
    let seconds = |n: i64| u64::try_from(n).ok().map(|n| n.min(MAX_DELTA));
    for (key, value) in members {
        let flag = value == Value::Boolean(true);
        match (key.as_str(), value) {
            ("no-store", _) => cc.no_store |= flag,
            // A field list (`no-cache="a"`) is taken as the whole directive,
            // as for Cache-Control: stricter, never wrong.
            ("no-cache", v) => cc.no_cache |= flag || v == Value::Other,
            ("private", v) => cc.private |= flag || v == Value::Other,
            ("public", _) => cc.public |= flag,
            ("must-revalidate", _) => cc.must_revalidate |= flag,
            ("proxy-revalidate", _) => cc.proxy_revalidate |= flag,
            ("max-age", Value::Integer(n)) => cc.max_age = seconds(n),
            ("s-maxage", Value::Integer(n)) => cc.s_maxage = seconds(n),
            ("stale-while-revalidate", Value::Integer(n)) => cc.stale_while_revalidate = seconds(n),
            ("stale-if-error", Value::Integer(n)) => cc.stale_if_error = seconds(n),
            _ => {}
        }
    }
    Some(cc)
}

/// RFC 8941 §4.2.2: a Dictionary, later duplicates replacing earlier ones.
fn dictionary(input: &[u8]) -> Option<Vec<(String, Value)>> {
    let mut p = Parser { input, at: 0 };
    p.skip(b" ");
    let mut members: Vec<(String, Value)> = Vec::new();
    // Where each key stands in `members`. Looked for along the list, a
    // duplicate made a long field quadratic: 18,000 members in a backend's
    // 72 KiB field took a second of the thread (fuzz49).
    let mut places: HashMap<String, usize> = HashMap::new();
    while !p.done() {
        let key = p.key()?;
        let value = if p.eat(b'=') {
            p.item_or_inner_list()?
        } else {
            p.parameters()?;
            Value::Boolean(true)
        };
        match places.get(&key) {
            Some(&place) => members[place].1 = value,
            None => {
                places.insert(key.clone(), members.len());
                members.push((key, value));
            }
        }
        p.skip(b" \t");
        if p.done() {
            break;
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip(b" \t");
        if p.done() {
            return None;
        }
    }
    Some(members)
}

struct Parser<'a> {
    input: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.at >= self.input.len()
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.peek() == Some(byte);
        self.at += usize::from(hit);
        hit
    }

    fn skip(&mut self, set: &[u8]) {
        while self.peek().is_some_and(|b| set.contains(&b)) {
            self.at += 1;
        }
    }

    /// Advances over bytes matching `ok`; returns how many.
    fn take(&mut self, ok: impl Fn(u8) -> bool) -> usize {
        let start = self.at;
        while self.peek().is_some_and(&ok) {
            self.at += 1;
        }
        self.at - start
    }

    fn key(&mut self) -> Option<String> {
        let first = self.peek()?;
        if !(first.is_ascii_lowercase() || first == b'*') {
            return None;
        }
        let start = self.at;
        self.take(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b));
        String::from_utf8(self.input[start..self.at].to_vec()).ok()
    }

    fn item_or_inner_list(&mut self) -> Option<Value> {
        if self.eat(b'(') {
            loop {
                self.skip(b" ");
                if self.eat(b')') {
                    break;
                }
                self.bare_item()?;
                self.parameters()?;
                if !matches!(self.peek(), Some(b' ' | b')')) {
                    return None;
                }
            }
            self.parameters()?;
            return Some(Value::Other);
        }
        let value = self.bare_item()?;
        self.parameters()?;
        Some(value)
    }

    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip(b" ");
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    fn bare_item(&mut self) -> Option<Value> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => {
                self.at += 1;
                loop {
                    match self.peek()? {
                        b'\\' => {
                            self.at += 1;
                            if !matches!(self.peek()?, b'"' | b'\\') {
                                return None;
                            }
                        }
                        b'"' => break,
                        0x20..=0x7e => {}
                        _ => return None,
                    }
                    self.at += 1;
                }
                self.at += 1;
                Some(Value::Other)
            }
            b'*' | b'a'..=b'z' | b'A'..=b'Z' => {
                self.at += 1;
                self.take(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b));
                Some(Value::Other)
            }
            b':' => {
                self.at += 1;
                self.take(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
                self.eat(b':').then_some(Value::Other)
            }
            b'?' => {
                self.at += 1;
                let value = match self.peek()? {
                    b'0' => false,
                    b'1' => true,
                    _ => return None,
                };
                self.at += 1;
                Some(Value::Boolean(value))
            }
            _ => None,
        }
    }

    /// §4.2.4: at most 15 digits, or a decimal of 12.3 digits.
    fn number(&mut self) -> Option<Value> {
        let negative = self.eat(b'-');
        let start = self.at;
        let whole = self.take(|b| b.is_ascii_digit());
        if whole == 0 {
            return None;
        }
        if self.eat(b'.') {
            let fraction = self.take(|b| b.is_ascii_digit());
            return (whole <= 12 && (1..=3).contains(&fraction)).then_some(Value::Other);
        }
        if whole > 15 {
            return None;
        }
        let digits = std::str::from_utf8(&self.input[start..self.at]).ok()?;
        let n: i64 = digits.parse().ok()?;
        Some(Value::Integer(if negative { -n } else { n }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targeted(value: &str) -> Option<CacheControl> {
        let mut headers = HeaderMap::new();
        headers.insert(&CDN_CACHE_CONTROL, value.parse().unwrap());
        parse(&headers)
    }

    /// A field of many members, repeated ones among them, reads as a short
    /// one does (each member was looked for along the list: quadratic).
    #[test]
    fn a_long_field_reads_each_member_once() {
        let mut value: Vec<String> = (0..20_000).map(|i| format!("x{i}")).collect();
        value.push("max-age=5".into());
        value.extend((0..20_000).map(|i| format!("x{i}=?0")));
        value.push("max-age=9".into());
        let cc = targeted(&value.join(", ")).expect("a valid dictionary");
        assert_eq!(cc.max_age, Some(9));
    }

    #[test]
    fn valid_dictionaries_become_directives() {
        // (field value, max-age, no-store, no-cache, private)
        let cases: &[(&str, Option<u64>, bool, bool, bool)] = &[
            ("max-age=3600", Some(3600), false, false, false),
            ("foobar, max-age=3600", Some(3600), false, false, false),
            ("max-age=1, max-age=7", Some(7), false, false, false),
            // A later duplicate replaces the value, of whatever type.
            ("max-age=7, max-age=\"7\"", None, false, false, false),
            ("no-store, public, no-store=?0", None, false, false, false),
            ("max-age=99999999999", Some(MAX_DELTA), false, false, false),
            ("no-store", None, true, false, false),
            ("no-cache, private", None, false, true, true),
            ("no-store=?0", None, false, false, false),
            ("no-cache=\"set-cookie\"", None, false, true, false),
            // Wrong type: the directive is ignored, the field still counts.
            ("max-age=\"3600\"", None, false, false, false),
            ("max-age=3.5", None, false, false, false),
            ("max-age=-5", None, false, false, false),
            (
                "max-age=60;foo=bar, x=(a b);c",
                Some(60),
                false,
                false,
                false,
            ),
        ];
        for &(value, max_age, no_store, no_cache, private) in cases {
            let cc = targeted(value).unwrap_or_else(|| panic!("{value} is valid"));
            assert!(cc.targeted, "{value}");
            assert_eq!(
                (cc.max_age, cc.no_store, cc.no_cache, cc.private),
                (max_age, no_store, no_cache, private),
                "{value}"
            );
        }
    }

    #[test]
    fn invalid_or_empty_fields_are_ignored_whole() {
        for value in [
            "",
            "max-age=10000, &&&&&",
            "MaX-aGe=3600",
            "max-age = 3600",
            "max-age=3600,",
            "max-age=1234567890123456",
            "max-age=\"unterminated",
            "a=(1 2",
        ] {
            assert_eq!(targeted(value), None, "{value:?}");
        }
        assert_eq!(parse(&HeaderMap::new()), None);
    }
}
