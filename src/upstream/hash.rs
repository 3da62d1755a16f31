//! The key `balance = "hash"` hashes, read from a request: its client's
//! address, its target, a header field or a cookie (`hash_key`). A request
//! without one (no such field or cookie, or one empty) has no key, and is
//! balanced round-robin, as HAProxy's `hdr()` and `url_param` balancing
//! fall back to round-robin.

use std::net::IpAddr;

use http::{HeaderMap, Uri};

use super::select::StableHash;
use crate::config::HashKey;

/// The hash of the `key` of a request for `uri` with `headers`, if it has
/// one. `client` is whom the request comes from (the peer, or the client
/// a trusted proxy forwarded for), known for client requests, not for
/// portico's own made from none: those have no `client_ip` key.
pub fn request_key(
    key: &HashKey,
    uri: &Uri,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Option<u64> {
    let mut hash = StableHash::new();
    match key {
        // One spelling per client: a dual-stack listener's IPv4 clients
        // as the IPv4 addresses they are.
        HashKey::ClientIp => match client?.to_canonical() {
            IpAddr::V4(ip) => hash.write(&ip.octets()),
            IpAddr::V6(ip) => hash.write(&ip.octets()),
        },
        HashKey::Uri => {
            let target = uri.path_and_query().map_or("", |target| target.as_str());
            hash.write(target.as_bytes());
        }
        HashKey::Path => hash.write(uri.path().as_bytes()),
        // The host the request is for: HTTP/2's `:authority` (browsers
        // send no `Host` then) or an absolute target's, which outranks
        // `Host` (RFC 9112 §3.2.2; review45c M1).
        HashKey::Header(name) if name == http::header::HOST && uri.authority().is_some() => {
            hash.write(uri.authority()?.as_str().as_bytes());
        }
        HashKey::Header(name) => {
            // A field sent on several lines is one list, its lines
            // joined with commas (RFC 9110 §5.3), empty ones left out
            // (§5.6.1): `a, b` on one line or two is one key (review45b
            // L6, review45a L2); `Cookie` lines with `; ` (RFC 9113
            // §8.2.3), as HTTP/1 sends them on one line.
            let comma = if name == http::header::COOKIE {
                &b"; "[..]
            } else {
                b", "
            };
            let mut lines = headers.get_all(name).iter().filter(|l| !l.is_empty());
            hash.write(lines.next()?.as_bytes());
            for line in lines {
                hash.write(comma);
                hash.write(line.as_bytes());
            }
        }
        HashKey::Cookie(name) => hash.write(cookie(headers, name)?),
    }
    Some(hash.finish())
}

/// The value of the first cookie called `name` in the request's `Cookie`
/// lines (HTTP/2 sends each cookie on a line of its own, RFC 9113
/// §8.2.3), if not empty. Names are compared exactly, as browsers send
/// them back (RFC 6265 §5.4).
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
        .filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::request::Parts;

    fn parts(target: &str, fields: &[(&str, &str)]) -> Parts {
        let mut request = http::Request::get(target);
        for (name, value) in fields {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    fn key(key: &HashKey, parts: &Parts) -> Option<u64> {
        request_key(key, &parts.uri, &parts.headers, None)
    }

    #[test]
    fn a_cookie_is_found_among_the_others_on_any_line() {
        let session = HashKey::Cookie("sid".into());
        let one = parts("/", &[("cookie", "a=1; sid=abc; b=2")]);
        let split = parts("/", &[("cookie", "a=1"), ("cookie", "sid=abc")]);
        let other = parts("/", &[("cookie", "sid=abd")]);
        assert!(key(&session, &one).is_some());
        assert_eq!(key(&session, &one), key(&session, &split));
        assert_ne!(key(&session, &one), key(&session, &other));
        // Absent, empty, or only a name that ends with it: no key.
        for fields in [
            &[][..],
            &[("cookie", "sid=")],
            &[("cookie", "xsid=abc; SID=abc")],
            &[("x-sid", "abc")],
        ] {
            assert_eq!(key(&session, &parts("/", fields)), None, "{fields:?}");
        }
    }

    #[test]
    fn uri_takes_the_query_and_path_does_not() {
        let a = parts("/a?x=1", &[]);
        let b = parts("/a?x=2", &[]);
        assert_ne!(key(&HashKey::Uri, &a), key(&HashKey::Uri, &b));
        assert_eq!(key(&HashKey::Path, &a), key(&HashKey::Path, &b));
        // The target, whether or not written absolute.
        let absolute = parts("http://example.com/a?x=1", &[]);
        assert_eq!(key(&HashKey::Uri, &a), key(&HashKey::Uri, &absolute));
    }

    #[test]
    fn a_header_key_is_its_lines_and_none_without_them() {
        let tenant = HashKey::Header(http::HeaderName::from_static("x-tenant"));
        let a = parts("/", &[("x-tenant", "a")]);
        assert!(key(&tenant, &a).is_some());
        assert_ne!(
            key(&tenant, &a),
            key(&tenant, &parts("/", &[("x-tenant", "b")]))
        );
        // Lines are one list: `a, b` on one line or two, not `ab`.
        let two = key(
            &tenant,
            &parts("/", &[("x-tenant", "a"), ("x-tenant", "b")]),
        );
        assert_eq!(key(&tenant, &parts("/", &[("x-tenant", "a, b")])), two);
        assert_ne!(key(&tenant, &parts("/", &[("x-tenant", "ab")])), two);
        assert_eq!(key(&tenant, &parts("/", &[])), None);
        assert_eq!(key(&tenant, &parts("/", &[("x-tenant", "")])), None);
        let empty_line = parts(
            "/",
            &[("x-tenant", "a"), ("x-tenant", ""), ("x-tenant", "b")],
        );
        assert_eq!(key(&tenant, &empty_line), two);
    }

    #[test]
    fn a_client_is_one_key_whichever_way_its_address_came() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let request = parts("/", &[]);
        let of = |ip| request_key(&HashKey::ClientIp, &request.uri, &request.headers, Some(ip));
        assert_eq!(of(v4), of(mapped));
        assert_ne!(of(v4), of("192.0.2.8".parse().unwrap()));
        // portico's own requests have no client.
        assert_eq!(key(&HashKey::ClientIp, &request), None);
    }

    /// `header:Host` is the host the request is for: HTTP/2's
    /// `:authority`, and an absolute target's over `Host` (review45c M1:
    /// HTTP/2 requests had no key). `Cookie` lines are one line as HTTP/1
    /// sends it.
    #[test]
    fn a_host_key_is_the_request_s_authority() {
        let host = HashKey::Header(http::header::HOST);
        let origin_form = parts("/x", &[("host", "a.example")]);
        let mut h2 = parts("http://a.example/x", &[]);
        h2.version = http::Version::HTTP_2;
        let absolute = parts("http://a.example/x", &[("host", "other.example")]);
        assert!(key(&host, &origin_form).is_some());
        assert_eq!(key(&host, &h2), key(&host, &origin_form));
        assert_eq!(key(&host, &absolute), key(&host, &origin_form));
        let cookie = HashKey::Header(http::header::COOKIE);
        let crumbs = parts("/", &[("cookie", "a=1"), ("cookie", "b=2")]);
        let line = parts("/", &[("cookie", "a=1; b=2")]);
        assert_eq!(key(&cookie, &crumbs), key(&cookie, &line));
    }

    /// How each kind of key is read is fixed too: a change moves every
    /// key of its kind at the upgrade (review45c L3: one did, and no test
    /// failed).
    #[test]
    fn keys_are_read_as_in_earlier_versions() {
        let request = parts(
            "/shop/item?id=7",
            &[
                ("x-tenant", "acme"),
                ("x-tenant", "beta"),
                ("cookie", "theme=dark; sid=abc123"),
            ],
        );
        let of = |kind: &HashKey| {
            let client = Some("192.0.2.7".parse().unwrap());
            request_key(kind, &request.uri, &request.headers, client).unwrap()
        };
        let tenant = HashKey::Header(http::HeaderName::from_static("x-tenant"));
        let got = [
            of(&HashKey::ClientIp),
            of(&HashKey::Uri),
            of(&HashKey::Path),
            of(&tenant),
            of(&HashKey::Cookie("sid".into())),
        ];
        // FNV-1a and the finalizer of 192.0.2.7's four bytes, the target,
        // its path, `acme, beta` and `abc123`, as computed apart.
        let want = [
            2_516_330_309_676_661_609,
            16_421_401_640_525_564_465,
            18_149_865_089_037_874_954,
            5_600_053_865_648_276_045,
            17_346_860_799_031_559_656,
        ];
        assert_eq!(got, want);
    }

    /// The hash is fixed: a key goes where it went in every earlier run
    /// and build (a change here moves every key of every hashed upstream
    /// at the upgrade).
    #[test]
    fn the_hash_is_the_same_in_every_run() {
        let mut hash = StableHash::new();
        hash.write(b"/index.html");
        assert_eq!(hash.finish(), 0x43f3_e2a1_af9f_1352);
    }
}
