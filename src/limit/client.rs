//! Who a request counts against: pure functions from the TCP peer, the
//! request headers and the `[rate_limit]` settings to a client key. A
//! forwarding header is believed only when the peer is a trusted proxy, and
//! then only back to the first hop that is not itself trusted. Parsing is
//! defensive: bounded work per request, and anything odd falls back to the
//! peer's address.

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::header::{HeaderMap, HeaderName};

use crate::config::{Cidr, RateLimit, RateLimitKey, TrustedFields};
use crate::proxy::forwarded;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Forwarding entries examined at most, counted from the right.
const MAX_HOPS: usize = 32;
/// Bytes of a forwarding header examined at most (its right-hand end).
const MAX_HEADER_BYTES: usize = 8 * 1024;

/// A throttling identity. Header keys are hashed so a key costs the same
/// few bytes however long the client made its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// IPv4 as is; IPv6 cut to its /64, the block one subscriber gets.
    Ip(IpAddr),
    Header(u64),
}

/// A dual-stack (`[::]`) listener sees an IPv4 proxy as `::ffff:a.b.c.d`:
/// it is matched as the IPv4 address it is (a block written
/// `::ffff:10.0.0.0/104` is read as 10.0.0.0/8), and as written.
pub fn trusted(ip: IpAddr, proxies: &[Cidr]) -> bool {
    let canonical = ip.to_canonical();
    let mapped = canonical != ip;
    proxies
        .iter()
        .any(|cidr| cidr.contains(ip) || (mapped && cidr.contains(canonical)))
}

/// NAT64's well-known prefix (RFC 6052 §2.1): `64:ff9b::a.b.c.d` is the
/// IPv4 client a.b.c.d behind a translator.
const NAT64: u128 = 0x0064_ff9b << 96;

/// IPv4-mapped IPv6, and IPv4 behind NAT64's well-known prefix, become
/// IPv4: cut to a /64, every IPv4 client of a translator shared one
/// budget (review40d L4). Other IPv6 is cut to its /64.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if u128::from(v6) >> 32 == NAT64 >> 32 => {
                // The low 32 bits: the embedded address.
                IpAddr::V4(std::net::Ipv4Addr::from(u128::from(v6) as u32))
            }
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// One address out of an `X-Forwarded-For` entry: `1.2.3.4`,
/// `1.2.3.4:80`, `[2001:db8::1]:443`, `2001:db8::1`, `fe80::1%eth0`.
/// Anything else is not an address, as for nginx's realip: a port that is
/// not a number (`1.2.3.4:abc`), IPv4 in brackets, a quoted entry (limit55
/// L4: each was read as the address inside it).
pub fn parse_hop(entry: &str) -> Option<IpAddr> {
    parse_node(entry.trim(), false)
}

/// The address of a node, `X-Forwarded-For`'s or `Forwarded`'s (RFC 7239
/// §6: its quotes already gone), where `Forwarded` also allows an
/// obfuscated port (`_abc`).
fn parse_node(node: &str, obfuscated_port: bool) -> Option<IpAddr> {
    let without_zone = |v6: &str| v6.split('%').next().unwrap_or(v6).parse::<Ipv6Addr>();
    let (ip, port) = match node.strip_prefix('[') {
        Some(rest) => {
            let (v6, port) = rest.split_once(']')?;
            (IpAddr::V6(without_zone(v6).ok()?), port)
        }
        // Bare IPv6 has several colons; IPv4 at most one, before a port.
        None if node.matches(':').count() > 1 => (IpAddr::V6(without_zone(node).ok()?), ""),
        None => {
            let v4 = node.split(':').next().unwrap_or(node);
            (IpAddr::V4(v4.parse().ok()?), &node[v4.len()..])
        }
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(port) if obfuscated_port && port.starts_with('_') => {
            port.len() > 1
                && port[1..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        Some(port) => port.parse::<u16>().is_ok() && port.bytes().all(|b| b.is_ascii_digit()),
    };
    port_ok.then_some(ip)
}

/// The right-hand end of a header value, cut at an entry boundary.
fn tail(value: &[u8]) -> &[u8] {
    if value.len() <= MAX_HEADER_BYTES {
        return value;
    }
    let start = value.len() - MAX_HEADER_BYTES;
    match value[start..].iter().position(|&b| b == b',') {
        Some(comma) => &value[start + comma + 1..],
        None => b"",
    }
}

/// Entries of every line of `name`, right-most first, bounded; `None` for
/// one that is not text. Split as bytes, so a stray byte a client put at
/// the left of a line does not hide the entries its proxies appended;
/// `Forwarded` at the commas outside quoted-strings, from the right end
/// (see [`forwarded::elements_from_right`]), so a comma inside a proxy's
/// quoted value (`host="a,for=6.6.6.6"`) starts no element of its own.
fn hops_right_to_left<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Vec<Option<&'a str>> {
    let quoted = name == FORWARDED;
    let lines: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
    lines
        .iter()
        .rev()
        .flat_map(|line| {
            let line = tail(line);
            let entries: Box<dyn Iterator<Item = &[u8]>> = match quoted {
                true => Box::new(forwarded::elements_from_right(line)),
                false => Box::new(line.rsplit(|&b| b == b',')),
            };
            entries
        })
        .take(MAX_HOPS)
        .map(|entry| {
            entry
                .is_ascii()
                .then(|| std::str::from_utf8(entry).ok())
                .flatten()
        })
        .collect()
}

/// The address of one `Forwarded` element's `for`, read strictly (RFC 7239
/// §4: a malformed element, a parameter given twice, an unquoted port,
/// is no address).
fn forwarded_node(element: &str) -> Option<IpAddr> {
    let node = forwarded::parse_element(element.as_bytes()).ok()?.node?;
    parse_node(std::str::from_utf8(&node).ok()?, true)
}

/// Whether a `Forwarded` element has a `for=` at all, well formed or not.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })
}

/// The client address: the peer, or behind trusted proxies the right-most
/// address that is not itself a trusted proxy in the `fields` they write.
pub fn client_ip(
    peer: SocketAddr,
    headers: &HeaderMap,
    proxies: &[Cidr],
    fields: TrustedFields,
) -> IpAddr {
    let peer = peer.ip();
    if !trusted(peer, proxies) {
        return peer;
    }
    let xff = fields.x_forwarded() && headers.contains_key(&X_FORWARDED_FOR);
    let by_xff = xff.then(|| {
        walk(
            peer,
            hops_right_to_left(headers, &X_FORWARDED_FOR),
            false,
            proxies,
        )
    });
    let forwarded = match fields.forwarded() {
        true => hops_right_to_left(headers, &FORWARDED),
        false => Vec::new(),
    };
    // One that names no client at all (`proto=https` alone) does not
    // count against the other.
    let names_a_client = |entries: &[Option<&str>]| {
        entries
            .iter()
            .flatten()
            .any(|entry| forwarded_for(entry).is_some())
    };
    let by_forwarded = match by_xff {
        Some(_) if !names_a_client(&forwarded) => None,
        _ if forwarded.is_empty() => None,
        _ => Some(walk(peer, forwarded, true, proxies)),
    };
    match (by_xff, by_forwarded) {
        // Both, naming different clients: one of them was the client's
        // own, and which cannot be told (a proxy that writes only
        // `Forwarded` passes a forged `X-Forwarded-For` on). Neither is
        // believed: the request counts against the proxy. `::ffff:a.b.c.d`
        // in one and `a.b.c.d` in the other name one client (limit53 L1).
        (Some(xff), Some(forwarded)) if xff.to_canonical() != forwarded.to_canonical() => peer,
        // As the access line writes it (review56 L6).
        (Some(ip), _) | (None, Some(ip)) => ip.to_canonical(),
        (None, None) => peer,
    }
}

/// The right-most address of `entries` that is not a trusted proxy.
fn walk(peer: IpAddr, entries: Vec<Option<&str>>, forwarded: bool, proxies: &[Cidr]) -> IpAddr {
    let mut client = peer;
    for entry in entries {
        // RFC 9110 §5.6.1: empty list elements (`a, , b`) are ignored.
        if entry.is_some_and(|entry| entry.trim().is_empty()) {
            continue;
        }
        let hop = entry.and_then(|entry| {
            if forwarded {
                forwarded_node(entry)
            } else {
                parse_hop(entry)
            }
        });
        match hop {
            Some(ip) if trusted(ip, proxies) => client = ip,
            Some(ip) => return ip,
            // Garbage where an address should be: nothing left of it can be
            // believed, so count against the last hop we could trust.
            None => return client,
        }
    }
    client
}

/// A request whose key field (`key = "header:..."`) came on several lines
/// that differ: which one the backend reads (the first, the last, all
/// joined) is anyone's guess, so no budget can be charged for sure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeveralKeys;

/// The key a request from `client` (the peer, or the client a trusted
/// proxy forwarded for: [`client_ip`]) is throttled under: its key
/// field's value, or without one its address.
pub fn key(
    client: IpAddr,
    headers: &HeaderMap,
    config: &RateLimit,
    hasher: &impl BuildHasher,
) -> Result<ClientKey, SeveralKeys> {
    if let RateLimitKey::Header(name) = &config.key {
        // HTTP/2 sends cookies as crumbs, a field each (RFC 9113 §8.2.3),
        // joined with "; " before they go on: that one line is the key,
        // where crumbs that differ made every HTTP/2 browser's request a
        // 400 (review37e L7).
        if name == http::header::COOKIE && headers.get_all(name).iter().nth(1).is_some() {
            let joined = headers
                .get_all(name)
                .iter()
                .map(|crumb| crumb.as_bytes())
                .collect::<Vec<_>>()
                .join(&b"; "[..]);
            return Ok(ClientKey::Header(hasher.hash_one(&joined[..])));
        }
        let mut lines = headers.get_all(name).iter();
        if let Some(first) = lines.next() {
            // Counted by the address, a throttled key sent on two lines
            // had a fresh budget from each address it came from while the
            // backend read the key (review37d M1); by the first line, a
            // junk line put first bought one. The same line repeated is
            // the one key.
            if lines.any(|line| line != first) {
                return Err(SeveralKeys);
            }
            if !first.is_empty() {
                return Ok(ClientKey::Header(hasher.hash_one(first.as_bytes())));
            }
        }
    }
    Ok(ClientKey::Ip(normalize(client)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        let (addr, prefix) = text.split_once('/').unwrap();
        Cidr {
            addr: addr.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }

    use crate::test_support::headers;

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_peers() {
        let proxies = [cidr("10.0.0.0/8"), cidr("127.0.0.1/32")];
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            // Untrusted peer: headers ignored.
            (
                "203.0.113.5:1000",
                &[("x-forwarded-for", "1.1.1.1")],
                "203.0.113.5",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "198.51.100.7")],
                "198.51.100.7",
            ),
            // Right-most untrusted wins; spoofed left entries are ignored.
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.2.3")],
                "198.51.100.7",
            ),
            // Several lines are one list.
            (
                "127.0.0.1:1000",
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-for", "198.51.100.7"),
                ],
                "198.51.100.7",
            ),
            // All trusted: the left-most hop is the client.
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "10.0.0.9, 10.0.0.8")],
                "10.0.0.9",
            ),
            // Ports, brackets, zone ids.
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "198.51.100.7:5555")],
                "198.51.100.7",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "[2001:db8::1]:443")],
                "2001:db8::1",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "fe80::1%eth0")],
                "fe80::1",
            ),
            // Garbage falls back to the last trusted hop (here the peer).
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "1.1.1.1, not-an-ip")],
                "127.0.0.1",
            ),
            // What nginx's realip takes for no address is none here
            // either (limit55 L4): a port that is not a number, IPv4 in
            // brackets, quotes, an empty port.
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "1.1.1.1, 198.51.100.7:abc")],
                "127.0.0.1",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "1.1.1.1, [198.51.100.7]")],
                "127.0.0.1",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "1.1.1.1, \"198.51.100.7\"")],
                "127.0.0.1",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "1.1.1.1, 198.51.100.7:")],
                "127.0.0.1",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "1.1.1.1, 198.51.100.7:99999")],
                "127.0.0.1",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "1.1.1.1, [2001:db8::1]x")],
                "127.0.0.1",
            ),
            // RFC 7239 §6.3: an obfuscated port is `Forwarded`'s alone.
            (
                "127.0.0.1:1000",
                &[("forwarded", "for=\"198.51.100.7:_gate-1\"")],
                "198.51.100.7",
            ),
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", "198.51.100.7:_gate-1")],
                "127.0.0.1",
            ),
            ("127.0.0.1:1000", &[("x-forwarded-for", "")], "127.0.0.1"),
            // Forwarded (RFC 7239) alone.
            (
                "127.0.0.1:1000",
                &[(
                    "forwarded",
                    "for=6.6.6.6, for=\"[2001:db8::2]:80\";proto=https",
                )],
                "2001:db8::2",
            ),
            (
                "127.0.0.1:1000",
                &[("forwarded", "for=unknown")],
                "127.0.0.1",
            ),
            (
                "127.0.0.1:1000",
                &[("forwarded", "proto=https")],
                "127.0.0.1",
            ),
            // Empty list elements are skipped, not taken for garbage.
            (
                "127.0.0.1:1000",
                &[("x-forwarded-for", " 198.51.100.9 ,, ")],
                "198.51.100.9",
            ),
        ];
        for (peer, pairs, want) in cases {
            let got = client_ip(
                peer.parse().unwrap(),
                &headers(pairs),
                &proxies,
                TrustedFields::Either,
            );
            assert_eq!(got, want.parse::<IpAddr>().unwrap(), "{peer} {pairs:?}");
        }
        // A byte that is not text at the left of the line, where the client
        // wrote, hides nothing its proxy appended on the right.
        let mut odd = HeaderMap::new();
        odd.insert(
            X_FORWARDED_FOR.clone(),
            http::HeaderValue::from_bytes(b"\xff-junk, 198.51.100.7").unwrap(),
        );
        let got = client_ip(
            "127.0.0.1:1000".parse().unwrap(),
            &odd,
            &proxies,
            TrustedFields::Either,
        );
        assert_eq!(got, "198.51.100.7".parse::<IpAddr>().unwrap());
        // Where the address should be, it is garbage like any other.
        odd.insert(
            X_FORWARDED_FOR.clone(),
            http::HeaderValue::from_bytes(b"1.1.1.1, \xff").unwrap(),
        );
        let got = client_ip(
            "127.0.0.1:1000".parse().unwrap(),
            &odd,
            &proxies,
            TrustedFields::Either,
        );
        assert_eq!(got, "127.0.0.1".parse::<IpAddr>().unwrap());
        // Both fields: believed when they agree; when not, one was forged
        // and neither is believed.
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let both =
            |xff: &str| headers(&[("x-forwarded-for", xff), ("forwarded", "for=198.51.100.7")]);
        let got = client_ip(peer, &both("198.51.100.7"), &proxies, TrustedFields::Either);
        assert_eq!(got, "198.51.100.7".parse::<IpAddr>().unwrap());
        let got = client_ip(peer, &both("6.6.6.6"), &proxies, TrustedFields::Either);
        assert_eq!(got, "127.0.0.1".parse::<IpAddr>().unwrap());
        // One address, written IPv4-mapped in one field, agrees (limit53
        // L1: counted against the proxy).
        for (xff, forwarded) in [
            ("::ffff:198.51.100.7", "for=198.51.100.7"),
            ("198.51.100.7", "for=\"[::ffff:198.51.100.7]\""),
        ] {
            let fields = headers(&[("x-forwarded-for", xff), ("forwarded", forwarded)]);
            let got = client_ip(peer, &fields, &proxies, TrustedFields::Either);
            // Written as the access line writes it (review56 L6).
            assert_eq!(got, "198.51.100.7".parse::<IpAddr>().unwrap());
        }
        // Unless the proxies are known to write one (review28c F2): the
        // other is a client's claim, and not read.
        let got = client_ip(peer, &both("6.6.6.6"), &proxies, TrustedFields::XForwarded);
        assert_eq!(got, "6.6.6.6".parse::<IpAddr>().unwrap());
        let got = client_ip(peer, &both("6.6.6.6"), &proxies, TrustedFields::Forwarded);
        assert_eq!(got, "198.51.100.7".parse::<IpAddr>().unwrap());
        // A Forwarded that names no client leaves X-Forwarded-For alone.
        let proto_only = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("forwarded", "proto=https"),
        ]);
        let got = client_ip(peer, &proto_only, &proxies, TrustedFields::Either);
        assert_eq!(got, "198.51.100.7".parse::<IpAddr>().unwrap());
        // `Forwarded` is read as RFC 7239 writes it (review28d F1): a comma
        // in a proxy's quoted value starts no element, a quote a client
        // left open swallows nothing of its proxy's element, and a
        // malformed element is no address.
        for (line, want) in [
            ("for=198.51.100.7;host=\"a,for=6.6.6.6\"", "198.51.100.7"),
            ("for=6.6.6.6;x=\"open, for=198.51.100.7", "198.51.100.7"),
            ("for=198.51.100.7;for=6.6.6.6", "127.0.0.1"),
            ("for=198.51.100.7;junk", "127.0.0.1"),
            ("for=198.51.100.7:80", "127.0.0.1"),
            ("for=\"198.51.100.7:80\"", "198.51.100.7"),
        ] {
            let got = client_ip(
                peer,
                &headers(&[("forwarded", line)]),
                &proxies,
                TrustedFields::Either,
            );
            assert_eq!(got, want.parse::<IpAddr>().unwrap(), "{line}");
        }
    }

    #[test]
    fn huge_headers_cost_bounded_work() {
        let proxies = [cidr("127.0.0.1/32")];
        let many = (0..1000)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
            .collect::<Vec<_>>()
            .join(", ");
        let got = client_ip(
            "127.0.0.1:1".parse().unwrap(),
            &headers(&[("x-forwarded-for", &many)]),
            &proxies,
            TrustedFields::Either,
        );
        assert_eq!(got, "10.0.3.249".parse::<IpAddr>().unwrap());
        let long = format!("{}, 198.51.100.7", "x".repeat(100_000));
        let got = client_ip(
            "127.0.0.1:1".parse().unwrap(),
            &headers(&[("x-forwarded-for", &long)]),
            &proxies,
            TrustedFields::Either,
        );
        assert_eq!(got, "198.51.100.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn cidr_membership() {
        let cases = [
            ("10.1.2.3", "10.0.0.0/8", true),
            ("11.1.2.3", "10.0.0.0/8", false),
            ("1.2.3.4", "0.0.0.0/0", true),
            ("2001:db8::1", "2001:db8::/32", true),
            ("2001:db9::1", "2001:db8::/32", false),
            ("10.1.2.3", "::/0", false),
        ];
        let proxies = [cidr("127.0.0.0/8")];
        assert!(trusted("::ffff:127.0.0.9".parse().unwrap(), &proxies));
        assert!(!trusted("::ffff:10.0.0.9".parse().unwrap(), &proxies));
        let mapped = [cidr("::ffff:10.0.0.0/104")];
        assert!(trusted("::ffff:10.0.0.9".parse().unwrap(), &mapped));
        for (ip, net, want) in cases {
            assert_eq!(
                cidr(net).contains(ip.parse().unwrap()),
                want,
                "{ip} in {net}"
            );
        }
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let a = normalize("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = normalize("2001:db8:1:2:bbbb::2".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(
            normalize("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        // IPv4 clients behind NAT64 each have their own (review40d L4).
        assert_eq!(
            normalize("64:ff9b::192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_ne!(
            normalize("64:ff9b::192.0.2.1".parse().unwrap()),
            normalize("64:ff9b::192.0.2.2".parse().unwrap())
        );
        // Only the /96: a neighbour of it is an IPv6 client.
        assert_eq!(
            normalize("64:ff9b:0:1::1".parse().unwrap()),
            "64:ff9b:0:1::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn header_keys_fall_back_to_the_address() {
        let config = RateLimit {
            key: RateLimitKey::Header(HeaderName::from_static("x-api-key")),
            ..RateLimit::default()
        };
        let hasher = std::collections::hash_map::RandomState::new();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let a = key(peer, &headers(&[("x-api-key", "alpha")]), &config, &hasher);
        let b = key(peer, &headers(&[("x-api-key", "beta")]), &config, &hasher);
        assert_ne!(a, b);
        assert_eq!(
            key(peer, &headers(&[]), &config, &hasher),
            Ok(ClientKey::Ip("192.0.2.1".parse().unwrap()))
        );
        // Two lines that differ: which one the backend reads is anyone's
        // guess, and the address's budget is not the key's (review37d M1).
        let twice = headers(&[("x-api-key", "junk"), ("x-api-key", "alpha")]);
        assert_eq!(key(peer, &twice, &config, &hasher), Err(SeveralKeys));
        // The same line twice is the one key.
        let same = headers(&[("x-api-key", "alpha"), ("x-api-key", "alpha")]);
        assert_eq!(key(peer, &same, &config, &hasher), a);
        // Cookie crumbs (HTTP/2) are the line they are joined into.
        let config = RateLimit {
            key: RateLimitKey::Header(HeaderName::from_static("cookie")),
            ..RateLimit::default()
        };
        let crumbs = headers(&[("cookie", "a=1"), ("cookie", "b=2")]);
        let line = headers(&[("cookie", "a=1; b=2")]);
        assert_eq!(
            key(peer, &crumbs, &config, &hasher),
            key(peer, &line, &config, &hasher)
        );
    }
}
