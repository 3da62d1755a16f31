//! Cache keys. The primary key is the method class (GET and HEAD share
//! one), scheme, host (lower-cased, default port dropped) and the path with
//! its query. The secondary key adds the request's values of the header
//! fields the response named in `Vary`, normalised (RFC 9111 §4.1) so that
//! whitespace differences do not split variants.

use http::header::{HeaderMap, HeaderName};

/// `GET|scheme|host|/path?query`
pub fn primary(scheme: &str, host: &str, path_and_query: &str) -> String {
    let host = host
        .strip_suffix(":80")
        .filter(|_| scheme == "http")
        .or_else(|| host.strip_suffix(":443").filter(|_| scheme == "https"))
        .unwrap_or(host);
    let mut key = String::with_capacity(8 + scheme.len() + host.len() + path_and_query.len());
    key.push_str("GET|");
    key.push_str(scheme);
    key.push('|');
    for c in host.chars() {
        key.push(c.to_ascii_lowercase());
    }
    key.push('|');
    key.push_str(path_and_query);
    key
}

/// The path-and-query part of a primary key.
pub fn path_of(key: &str) -> &str {
    let primary = key.split('\n').next().unwrap_or(key);
    primary.splitn(4, '|').nth(3).unwrap_or("")
}

/// The primary part of a full key.
pub fn primary_of(key: &str) -> &str {
    key.split('\n').next().unwrap_or(key)
}

/// The field names a response's `Vary` lists, lower-cased; `None` for
/// `Vary: *` (never matches).
pub fn vary_names(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in response.get_all(http::header::VARY) {
        for name in value.to_str().unwrap_or("").split(',') {
            let name = name.trim();
            if name == "*" {
                return None;
            }
            if let Ok(name) = HeaderName::try_from(name) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

/// `primary` plus, for each Vary field, the request's normalised value
/// (`\nname:value`, or `\nname` when the request lacks the field).
pub fn full(primary: &str, names: &[HeaderName], request: &HeaderMap) -> String {
    let mut key = String::from(primary);
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        // RFC 9111 §4.1: an absent field matches only an absent field, so
        // `x-foo` absent (no colon) differs from `x-foo:` sent empty.
        if !request.contains_key(name) {
            continue;
        }
        key.push(':');
        let mut first = true;
        for value in request.get_all(name) {
            if !first {
                key.push(',');
            }
            first = false;
            // Collapse whitespace around list separators.
            let text = String::from_utf8_lossy(value.as_bytes());
            let parts: Vec<&str> = text.split(',').map(str::trim).collect();
            key.push_str(&parts.join(","));
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn primary_keys_normalise_host_and_default_port() {
        assert_eq!(
            primary("http", "Example.COM:80", "/a?b=1"),
            "GET|http|example.com|/a?b=1"
        );
        assert_eq!(
            primary("https", "example.com:443", "/"),
            "GET|https|example.com|/"
        );
        assert_eq!(
            primary("http", "example.com:8080", "/"),
            "GET|http|example.com:8080|/"
        );
        assert_eq!(path_of("GET|http|h|/users/1?x=1\naccept:a"), "/users/1?x=1");
    }

    #[test]
    fn vary_splits_variants_by_request_values() {
        let mut response = HeaderMap::new();
        response.insert("vary", HeaderValue::from_static("Accept-Encoding, accept"));
        let names = vary_names(&response).unwrap();
        let mut gzip = HeaderMap::new();
        gzip.insert("accept-encoding", HeaderValue::from_static("gzip,  br"));
        let mut gzip2 = HeaderMap::new();
        gzip2.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        let plain = HeaderMap::new();
        let p = primary("http", "h", "/");
        assert_eq!(full(&p, &names, &gzip), full(&p, &names, &gzip2));
        assert_ne!(full(&p, &names, &gzip), full(&p, &names, &plain));
        // Sent empty is not the same as absent (RFC 9111 §4.1).
        let mut empty = HeaderMap::new();
        empty.insert("accept-encoding", HeaderValue::from_static(""));
        assert_ne!(full(&p, &names, &empty), full(&p, &names, &plain));
        response.insert("vary", HeaderValue::from_static("*"));
        assert!(vary_names(&response).is_none());
    }
}
