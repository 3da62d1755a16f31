//! Table tests for `policy`, each case citing the RFC 9111 rule it checks.

use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};

use super::policy::*;

use crate::test_support::headers;

fn cc(value: &str) -> CacheControl {
    parse(&headers(&[("cache-control", value)]))
}

#[test]
fn cache_control_parsing() {
    // (header value, expected)
    let cases: Vec<(&str, CacheControl)> = vec![
        (
            "max-age=60",
            CacheControl {
                max_age: Some(60),
                ..Default::default()
            },
        ),
        // §5.2: directive names are case-insensitive; whitespace is allowed.
        (
            " Max-Age = 60 , PUBLIC",
            CacheControl {
                max_age: Some(60),
                public: true,
                ..Default::default()
            },
        ),
        // §4.2.1: conflicting duplicates make the response stale.
        (
            "max-age=60, max-age=120",
            CacheControl {
                max_age: Some(0),
                ..Default::default()
            },
        ),
        (
            "max-age=60, max-age=60",
            CacheControl {
                max_age: Some(60),
                ..Default::default()
            },
        ),
        // §1.2.2: invalid delta-seconds -> stale; huge values cap at 2^31.
        (
            "max-age=-1",
            CacheControl {
                max_age: Some(0),
                ..Default::default()
            },
        ),
        (
            "max-age=abc",
            CacheControl {
                max_age: Some(0),
                ..Default::default()
            },
        ),
        (
            "max-age=99999999999999999999",
            CacheControl {
                max_age: Some(2_147_483_648),
                ..Default::default()
            },
        ),
        (
            "max-age=\"30\"",
            CacheControl {
                max_age: Some(30),
                ..Default::default()
            },
        ),
        // §5.2.3: unknown directives are ignored.
        (
            "foo, bar=baz, no-store",
            CacheControl {
                no_store: true,
                ..Default::default()
            },
        ),
        // Commas inside quoted strings do not split directives.
        (
            "no-cache=\"set-cookie, x-a\", s-maxage=5",
            CacheControl {
                no_cache: true,
                s_maxage: Some(5),
                ..Default::default()
            },
        ),
        (
            "stale-while-revalidate=30, stale-if-error=60",
            CacheControl {
                stale_while_revalidate: Some(30),
                stale_if_error: Some(60),
                ..Default::default()
            },
        ),
        (
            "max-stale",
            CacheControl {
                max_stale: Some(None),
                ..Default::default()
            },
        ),
        (
            "max-stale=10, min-fresh=5, only-if-cached",
            CacheControl {
                max_stale: Some(Some(10)),
                min_fresh: Some(5),
                only_if_cached: true,
                ..Default::default()
            },
        ),
        (",,,", CacheControl::default()),
        // RFC 9110 §5.6.4: a quoted-pair's `"` ends no quoted string, and
        // obs-text may stand in one: neither hides what follows
        // (review40c F3).
        (
            r#"max-age=60, ext="a\"b, c", private"#,
            CacheControl {
                max_age: Some(60),
                private: true,
                ..Default::default()
            },
        ),
        (
            "max-age=60, x=\"caf\u{e9}\", private",
            CacheControl {
                max_age: Some(60),
                private: true,
                ..Default::default()
            },
        ),
        // A quoted string left open: where the directives end is unknown.
        (
            "max-age=60, foo=\"bar, private",
            CacheControl {
                unreadable: true,
                ..Default::default()
            },
        ),
        (
            "=,=x,max-age",
            CacheControl {
                max_age: Some(0),
                ..Default::default()
            },
        ),
    ];
    for (value, want) in cases {
        assert_eq!(cc(value), want, "{value:?}");
    }
    // One unreadable line of two: the other's directives still count.
    let two = parse(&headers(&[
        ("cache-control", "public, max-age=60"),
        ("cache-control", "x=\"open"),
    ]));
    assert!(two.unreadable && two.public && two.max_age == Some(60));
    // A `"` where no value starts opens nothing: it is junk that may hide
    // a directive (review40f L2).
    for junk in [
        r#"x=a"b, private, y=""#,
        r#""private""#,
        r#"private"x""#,
        r#"ext="a"private"#,
        "ext=\"a\"\tno-store",
    ] {
        assert!(cc(junk).unreadable, "{junk}");
    }
    // Quoted values after `=`, with blanks or not, and commas in them.
    let quoted = cc(r#"no-cache="set-cookie, x" , max-age = "60",private"#);
    assert!(!quoted.unreadable && quoted.no_cache && quoted.private);
    assert_eq!(quoted.max_age, Some(60));
    // A request's: it goes past the cache, as with `no-store`.
    assert!(parse_request(&headers(&[("cache-control", r#"x="\", no-store"#)])).no_store);
    assert!(parse_request(&headers(&[("cache-control", "x=\"open, no-store")])).no_store);
    // §5.4: Pragma: no-cache counts only without Cache-Control.
    assert!(parse_request(&headers(&[("pragma", "no-cache")])).no_cache);
    assert!(
        !parse_request(&headers(&[
            ("pragma", "no-cache"),
            ("cache-control", "max-stale")
        ]))
        .no_cache
    );
}

#[test]
fn storability_for_a_shared_cache() {
    let ok = Duration::from_secs(60);
    let none = Duration::ZERO;
    let ttl = Duration::from_secs(5);
    // (method, request headers, status, response headers, default_ttl, expected)
    type Case<'a> = (
        Method,
        &'a [(&'a str, &'a str)],
        u16,
        &'a [(&'a str, &'a str)],
        Duration,
        Result<Duration, NotStored>,
    );
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            none,
            Ok(ok),
        ),
        // §3: only GET responses are stored here.
        (
            Method::POST,
            &[],
            200,
            &[("cache-control", "max-age=60")],
            none,
            Err(NotStored::Method),
        ),
        // §3: no-store in the response or the request.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-store, max-age=60")],
            none,
            Err(NotStored::NoStore),
        ),
        (
            Method::GET,
            &[("cache-control", "no-store")],
            200,
            &[("cache-control", "max-age=60")],
            none,
            Err(NotStored::NoStore),
        ),
        // §5.2.2.7: private is not for shared caches.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "private, max-age=60")],
            none,
            Err(NotStored::Private),
        ),
        // §3.5: Authorization needs public, s-maxage or must-revalidate.
        (
            Method::GET,
            &[("authorization", "x")],
            200,
            &[("cache-control", "max-age=60")],
            none,
            Err(NotStored::Authorization),
        ),
        (
            Method::GET,
            &[("authorization", "x")],
            200,
            &[("cache-control", "public, max-age=60")],
            none,
            Ok(ok),
        ),
        (
            Method::GET,
            &[("authorization", "x")],
            200,
            &[("cache-control", "s-maxage=60")],
            none,
            Ok(ok),
        ),
        (
            Method::GET,
            &[("authorization", "x")],
            200,
            &[("cache-control", "must-revalidate, max-age=60")],
            none,
            Ok(ok),
        ),
        // Set-Cookie is never stored, however cacheable the response says
        // it is (§7.3 would allow it; nginx and Varnish do not).
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            none,
            Err(NotStored::SetCookie),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("set-cookie", "a=b")],
            ttl,
            Err(NotStored::SetCookie),
        ),
        // §5.2.2.4 no-cache with a validator: stored, to be revalidated.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-cache"), ("etag", "\"v1\"")],
            none,
            Ok(Duration::ZERO),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-cache")],
            none,
            Err(NotStored::NoFreshness),
        ),
        // §5.2.2.3 must-understand: a known status overrides no-store, an
        // unknown one is never stored.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60, no-store, must-understand")],
            none,
            Ok(ok),
        ),
        (
            Method::GET,
            &[],
            599,
            &[("cache-control", "max-age=60, no-store, must-understand")],
            none,
            Err(NotStored::Status),
        ),
        // A status the `http` crate names but whose caching rules are
        // another RFC's (cache53 M1: stored).
        (
            Method::GET,
            &[],
            226,
            &[("cache-control", "max-age=60, no-store, must-understand")],
            none,
            Err(NotStored::Status),
        ),
        (
            Method::GET,
            &[],
            404,
            &[("cache-control", "max-age=60, no-store, must-understand")],
            none,
            Ok(ok),
        ),
        // RFC 6585: 428, 429, 431 and 511 are never stored (cache53 M1).
        (
            Method::GET,
            &[],
            429,
            &[("cache-control", "max-age=60"), ("retry-after", "60")],
            none,
            Err(NotStored::Status),
        ),
        (
            Method::GET,
            &[],
            511,
            &[("cache-control", "public, s-maxage=60")],
            none,
            Err(NotStored::Status),
        ),
        (
            Method::GET,
            &[],
            431,
            &[("cache-control", "max-age=60, no-store, must-understand")],
            none,
            Err(NotStored::Status),
        ),
        // RFC 9213: CDN-Cache-Control replaces Cache-Control and Expires.
        (
            Method::GET,
            &[],
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
            ],
            none,
            Ok(ok),
        ),
        (
            Method::GET,
            &[],
            200,
            &[
                ("cache-control", "max-age=600"),
                ("cdn-cache-control", "private"),
            ],
            none,
            Err(NotStored::Private),
        ),
        (
            Method::GET,
            &[],
            200,
            &[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", "a=b"),
            ],
            none,
            Err(NotStored::SetCookie),
        ),
        // §4.1: Vary: * never matches.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept, *")],
            none,
            Err(NotStored::VaryStar),
        ),
        // Stale on arrival, no validator, but a window to serve it stale
        // in: kept (RFC 5861); `no-cache` allows no stale use, so not so.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=0, stale-if-error=60")],
            none,
            Ok(Duration::ZERO),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=0, stale-while-revalidate=30")],
            none,
            Ok(Duration::ZERO),
        ),
        // s-maxage forbids stale use (§5.2.2.10): the window is no reason.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "s-maxage=0, stale-while-revalidate=30")],
            none,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=0, stale-if-error=0")],
            none,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60, no-cache, stale-if-error=60")],
            none,
            Err(NotStored::NoFreshness),
        ),
        // `public` lends default_ttl to a 2xx or a lasting 3xx, not to a
        // temporary redirect, a client error or a server error (review37b
        // M2).
        (
            Method::GET,
            &[],
            308,
            &[("cache-control", "public")],
            ttl,
            Ok(ttl),
        ),
        (
            Method::GET,
            &[],
            202,
            &[("cache-control", "public")],
            ttl,
            Ok(ttl),
        ),
        (
            Method::GET,
            &[],
            302,
            &[("cache-control", "public")],
            ttl,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            503,
            &[("cache-control", "public")],
            ttl,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            401,
            &[("cache-control", "public")],
            ttl,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            503,
            &[("cache-control", "public, max-age=60")],
            ttl,
            Ok(ok),
        ),
        // Nor kept to be revalidated on each use (review37e L3).
        (
            Method::GET,
            &[],
            401,
            &[("cache-control", "public, no-cache"), ("etag", "\"a\"")],
            none,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            202,
            &[("cache-control", "public, no-cache"), ("etag", "\"a\"")],
            none,
            Ok(Duration::ZERO),
        ),
        (
            Method::GET,
            &[],
            500,
            &[("cache-control", "public")],
            ttl,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            500,
            &[("cache-control", "public, max-age=60")],
            ttl,
            Ok(ok),
        ),
        // §4.1: a Vary whose fields cannot be read cannot be matched.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "\"Cookie\"")],
            none,
            Err(NotStored::VaryInvalid),
        ),
        // §4.2.1: the most restrictive reading of what cannot be read.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60, x=\"open, private")],
            none,
            Err(NotStored::CacheControlInvalid),
        ),
        // §4.2.1: s-maxage wins over max-age for a shared cache.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=1, s-maxage=60")],
            none,
            Ok(ok),
        ),
        // §4.2.2: heuristic freshness only from default_ttl, only for
        // heuristically cacheable statuses.
        (
            Method::GET,
            &[],
            200,
            &[],
            none,
            Err(NotStored::NoFreshness),
        ),
        (Method::GET, &[], 200, &[], ttl, Ok(ttl)),
        (Method::GET, &[], 404, &[], ttl, Ok(ttl)),
        (Method::GET, &[], 500, &[], ttl, Err(NotStored::NoFreshness)),
        (
            Method::GET,
            &[],
            500,
            &[("cache-control", "max-age=60")],
            none,
            Ok(ok),
        ),
        (
            Method::GET,
            &[],
            206,
            &[("cache-control", "max-age=60")],
            none,
            Err(NotStored::Status),
        ),
        // §5.2.2.4: no-cache is stored only when it can be revalidated.
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-cache, max-age=60")],
            none,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-cache, max-age=60"), ("etag", "\"a\"")],
            none,
            Ok(ok),
        ),
        // §5.3: an invalid Expires means already expired.
        (
            Method::GET,
            &[],
            200,
            &[("expires", "not a date"), ("etag", "\"a\"")],
            none,
            Ok(Duration::ZERO),
        ),
        (
            Method::GET,
            &[],
            200,
            &[("expires", "0")],
            none,
            Err(NotStored::NoFreshness),
        ),
        (
            Method::GET,
            &[],
            200,
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
            ],
            none,
            Ok(ok),
        ),
    ];
    for (method, request, status, response, default_ttl, want) in cases {
        let request = headers(request);
        let response = headers(response);
        let got = storable(
            &method,
            &request,
            &parse_request(&request),
            StatusCode::from_u16(status).unwrap(),
            &response,
            &parse_response(&response),
            default_ttl,
        );
        assert_eq!(got, want, "{method} {status} {response:?} {request:?}");
    }
}

#[test]
fn current_age_follows_section_4_2_3() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let s = Duration::from_secs;
    // Age from upstream plus the round trip plus time in cache.
    let timing = Timing {
        request_time: t0,
        response_time: t0 + s(2),
        date: Some(t0 + s(1)),
        age: 30,
    };
    assert_eq!(timing.current_age(t0 + s(12)), s(30 + 2 + 10));
    // A Date far in the past makes the apparent age win.
    let timing = Timing {
        request_time: t0,
        response_time: t0,
        date: Some(t0 - s(100)),
        age: 0,
    };
    assert_eq!(timing.current_age(t0), s(100));
    // A Date in the future never makes the age negative.
    let timing = Timing {
        request_time: t0,
        response_time: t0,
        date: Some(t0 + s(100)),
        age: 0,
    };
    assert_eq!(timing.current_age(t0 + s(1)), s(1));
}

#[test]
fn request_and_response_directives_decide_use() {
    let s = Duration::from_secs;
    // (lifetime, age, response cc, request cc, expected)
    let cases = [
        (60, 10, "", "", Usable::Fresh),
        (60, 70, "", "", Usable::MustRevalidate),
        // §5.2.1.1 request max-age; §5.2.1.3 min-fresh; §5.2.1.2 max-stale.
        (60, 10, "", "max-age=5", Usable::MustRevalidate),
        (60, 50, "", "min-fresh=20", Usable::MustRevalidate),
        (60, 70, "", "max-stale=20", Usable::Fresh),
        (60, 70, "", "max-stale", Usable::Fresh),
        (60, 100, "", "max-stale=20", Usable::MustRevalidate),
        // §5.2.2.2 must-revalidate and §5.2.2.10 s-maxage forbid stale use.
        (
            60,
            70,
            "must-revalidate",
            "max-stale",
            Usable::MustRevalidate,
        ),
        (60, 70, "s-maxage=60", "max-stale", Usable::MustRevalidate),
        // §5.2.1.4 / §5.2.2.4 no-cache.
        (60, 10, "", "no-cache", Usable::MustRevalidate),
        (60, 10, "no-cache", "", Usable::MustRevalidate),
        // RFC 5861 stale-while-revalidate.
        (
            60,
            80,
            "stale-while-revalidate=30",
            "",
            Usable::StaleWhileRevalidate,
        ),
        (
            60,
            100,
            "stale-while-revalidate=30",
            "",
            Usable::MustRevalidate,
        ),
        // Neither stale-while-revalidate nor max-stale serves what the
        // client's max-age or min-fresh refused (RFC 5861 §3).
        (
            100,
            3,
            "stale-while-revalidate=300",
            "max-age=1",
            Usable::MustRevalidate,
        ),
        (
            100,
            0,
            "stale-while-revalidate=600",
            "min-fresh=500",
            Usable::MustRevalidate,
        ),
        (60, 70, "", "max-age=30, max-stale", Usable::MustRevalidate),
        (60, 70, "", "max-age=80, max-stale", Usable::Fresh),
        (60, 70, "", "min-fresh=0, max-stale", Usable::Fresh),
        (60, 70, "", "min-fresh=5, max-stale", Usable::MustRevalidate),
    ];
    for (lifetime, age, response, request, want) in cases {
        let got = usable(s(lifetime), s(age), &cc(response), &cc(request));
        assert_eq!(
            got, want,
            "lifetime {lifetime} age {age} response {response:?} request {request:?}"
        );
    }
    assert!(stale_if_error(
        s(60),
        s(100),
        &cc("stale-if-error=60"),
        None
    ));
    assert!(!stale_if_error(
        s(60),
        s(200),
        &cc("stale-if-error=60"),
        None
    ));
    assert!(!stale_if_error(
        s(60),
        s(100),
        &cc("stale-if-error=60, must-revalidate"),
        None
    ));
    // The request's own window (RFC 5861 §4; cache53 L1: ignored), where
    // the response allows stale use.
    assert!(stale_if_error(s(60), s(100), &cc("max-age=60"), Some(60)));
    assert!(!stale_if_error(s(60), s(200), &cc("max-age=60"), Some(60)));
    assert!(stale_if_error(
        s(60),
        s(200),
        &cc("stale-if-error=10"),
        Some(600)
    ));
    assert!(!stale_if_error(
        s(60),
        s(100),
        &cc("max-age=60, must-revalidate"),
        Some(600)
    ));
    // No use without a successful validation, fresh or not (§5.2.2.4).
    for response in [
        "max-age=600, no-cache, stale-if-error=60",
        "max-age=0, no-cache, stale-if-error=60",
    ] {
        assert!(
            !stale_if_error(s(600), s(10), &cc(response), Some(60)),
            "{response}"
        );
        assert!(
            !stale_if_error(s(0), s(10), &cc(response), None),
            "{response}"
        );
    }
}

#[test]
fn age_takes_the_first_members_digits() {
    // §5.1: a list value is a sender error; the first member is the age.
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for (value, want) in [
        ("7200", 7200),
        ("7200, 0", 7200),
        ("0, 7200", 0),
        ("7200.0", 0),
        ("abc", 0),
        ("-5", 0),
    ] {
        let timing = Timing::new(&headers(&[("age", value)]), t0, t0);
        assert_eq!(timing.age, want, "Age: {value}");
    }
}

#[test]
fn expires_in_every_http_date_format_and_any_letter_case() {
    let cc = CacheControl::default();
    let date = ("date", "Thu, 18 Aug 2050 01:01:18 GMT");
    for expires in [
        "Thu, 18 Aug 2050 02:01:18 GMT",
        "Thursday, 18-Aug-50 02:01:18 GMT",
        "Thu Aug 18 02:01:18 2050",
        "THU, 18 AUG 2050 02:01:18 gMT",
    ] {
        let lifetime = explicit_lifetime(&headers(&[date, ("expires", expires)]), &cc);
        assert_eq!(lifetime, Some(Duration::from_secs(3600)), "{expires}");
    }
    let asctime = headers(&[
        ("date", "Mon, 08 Aug 2050 01:01:18 GMT"),
        ("expires", "Mon Aug  8 02:01:18 2050"),
    ]);
    assert_eq!(
        explicit_lifetime(&asctime, &cc),
        Some(Duration::from_secs(3600))
    );
    // A wrong day name is read past, in each format (review40e: 8 August
    // 2050 is a Monday).
    for expires in [
        "Thu Aug  8 02:01:18 2050",
        "Thu, 08 Aug 2050 02:01:18 GMT",
        "Thursday, 08-Aug-50 02:01:18 GMT",
    ] {
        let wrong = headers(&[
            ("date", "Mon, 08 Aug 2050 01:01:18 GMT"),
            ("expires", expires),
        ]);
        assert_eq!(
            explicit_lifetime(&wrong, &cc),
            Some(Duration::from_secs(3600)),
            "{expires}"
        );
    }
    // Not a date at all: already expired (§5.3).
    let lifetime = explicit_lifetime(&headers(&[date, ("expires", "0")]), &cc);
    assert_eq!(lifetime, Some(Duration::ZERO));
}

#[test]
fn a_304_updates_only_the_response_it_names() {
    let stored = headers(&[
        ("etag", "\"a\""),
        ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ]);
    let weak = headers(&[("etag", "W/\"a\"")]);
    for (not_modified, want) in [
        (headers(&[("etag", "\"a\"")]), true),
        (headers(&[("etag", "\"b\"")]), false),
        (headers(&[("etag", "W/\"a\"")]), true),
        (headers(&[("etag", "W/\"b\"")]), false),
        (
            headers(&[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")]),
            true,
        ),
        (
            headers(&[("last-modified", "Tue, 02 Jan 2024 00:00:00 GMT")]),
            false,
        ),
        (headers(&[("date", "Tue, 02 Jan 2024 00:00:00 GMT")]), true),
    ] {
        assert_eq!(selects(&stored, &not_modified), want, "{not_modified:?}");
    }
    // Weak comparison either way: nginx's gzip weakens the 200's tag and
    // not the 304's.
    assert!(selects(&weak, &headers(&[("etag", "\"a\"")])));
    assert!(selects(&weak, &headers(&[("etag", "W/\"a\"")])));
    assert!(!selects(&weak, &headers(&[("etag", "\"b\"")])));
    // No stored ETag: a 304 naming one is about something else.
    assert!(!selects(&headers(&[]), &headers(&[("etag", "\"a\"")])));
}
