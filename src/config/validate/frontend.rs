//! `[server]` and `[admin]`: listeners (and which of them may not be bound
//! together), limits, TLS certificates and the admin token.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use toml::Spanned;

use crate::config::model::*;
use crate::config::raw;

use super::{cidr_list, duration, integer, listen_list, positive, size, socket_addr, R};

/// Why `addr` cannot be bound beside `used` (of the key `first`).
pub(super) fn overlap_message(addr: SocketAddr, used: SocketAddr, first: &str) -> String {
    let dual = [addr, used]
        .iter()
        .any(|a| a.is_ipv6() && a.ip().is_unspecified())
        && [addr, used].iter().any(SocketAddr::is_ipv4);
    if dual {
        // nginx's `listen 80; listen [::]:80;`, whose `[::]` is IPv6 only.
        format!(
            "{addr} overlaps {used} of {first}: portico's [::]:{} takes IPv4 clients too \
             (dual-stack, whatever net.ipv6.bindv6only says), so list it alone",
            addr.port()
        )
    } else {
        format!(
            "{addr} overlaps {used} of {first}: a wildcard address takes its port on every address"
        )
    }
}

/// Two listen addresses that cannot both be bound: the same port, one of
/// them a wildcard covering the other.
pub(crate) fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && (covers(a, b) || covers(b, a))
}

/// Whether connecting to `backend` reaches portico's own listener on
/// `listen` (this machine's addresses asked only for a wildcard one).
pub(crate) fn reaches_own(backend: SocketAddr, listen: SocketAddr) -> bool {
    reaches(backend, listen, is_local)
}

/// Whether connecting to `backend` reaches `listen`: the same address, or
/// one of this machine's on a wildcard listener of that port (an IPv6
/// wildcard takes IPv4 too). `local` says whether an address is this
/// machine's; it is asked only in that last case.
pub(super) fn reaches(
    backend: SocketAddr,
    listen: SocketAddr,
    local: impl FnOnce(IpAddr) -> bool,
) -> bool {
    // An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) is the IPv4 one.
    let (to, at) = (backend.ip().to_canonical(), listen.ip().to_canonical());
    backend.port() == listen.port()
        && (to == at
            || (at.is_unspecified()
                && (at.is_ipv6() || to.is_ipv4())
                && (to.is_loopback() || local(to))))
}

/// Whether `ip` is an address of one of this machine's interfaces. An
/// error listing them counts as no: the check then misses a loop rather
/// than refusing a config that has none.
pub(super) fn is_local(ip: IpAddr) -> bool {
    if_addrs::get_if_addrs()
        .is_ok_and(|interfaces| interfaces.iter().any(|i| i.ip().to_canonical() == ip))
}

pub(super) type Claim<'c> = dyn FnMut(R, String, SocketAddr, std::ops::Range<usize>) + 'c;

/// The smallest `max_header_size` that holds for HTTP/1.1 as for HTTP/2:
/// hyper reads an HTTP/1.1 head into a buffer of at least 8 KiB.
const MIN_HEADER_SIZE: u64 = 8 * 1024;

/// The largest `max_header_size`: nginx's `large_client_header_buffers`
/// defaults to 32 KiB, HAProxy's buffers to 16 KiB.
const MAX_HEADER_SIZE: u64 = 1 << 20;

pub(super) fn server(
    r: R,
    raw: Option<Spanned<raw::Server>>,
    base: &Path,
    claim: &mut Claim,
) -> Server {
    let defaults = Server::default();
    let Some(raw) = raw else {
        for addr in &defaults.listen {
            claim(r, "server.listen".into(), *addr, 0..0);
        }
        return defaults;
    };
    let section = raw.span();
    let raw = raw.into_inner();
    let listen = match &raw.listen {
        // HTTPS only, as nginx's `listen 443 ssl` opens no port 80: the
        // plain default came with every `[[server.tls]]`, on every
        // address, and unclaimed, so a TLS listener on its port passed
        // `check` and failed at start (review34d M1).
        None if !raw.tls.is_empty() => Vec::new(),
        None => {
            for addr in &defaults.listen {
                claim(r, "server.listen".into(), *addr, 0..0);
            }
            defaults.listen.clone()
        }
        Some(list) => listen_list(r, "server.listen", list, claim),
    };
    let mut tls = Vec::new();
    for (i, t) in raw.tls.iter().enumerate() {
        let key = format!("server.tls[{i}]");
        let t_ref = t.get_ref();
        if t_ref.listen.is_empty() {
            r.at(
                t.span(),
                format!("{key}.listen"),
                "a TLS listener needs at least one listen address",
            );
        }
        if t_ref.certificates.is_empty() {
            r.at(
                t.span(),
                format!("{key}.certificates"),
                "a TLS listener needs at least one { cert, key } pair",
            );
        }
        let listen = listen_list(r, &format!("{key}.listen"), &t_ref.listen, claim);
        let certificates = t_ref
            .certificates
            .iter()
            .enumerate()
            .map(|(j, c)| {
                let pair = CertificatePair {
                    cert: base.join(c.get_ref().cert.get_ref()),
                    key: base.join(c.get_ref().key.get_ref()),
                };
                // Loaded now, as at start, so every bad pair is reported
                // where the file names it.
                if let Err(e) = crate::server::tls::check_pair(&pair) {
                    r.at(c.span(), format!("{key}.certificates[{j}]"), e.to_string());
                }
                pair
            })
            .collect();
        tls.push(TlsListener {
            listen,
            certificates,
        });
    }
    // Not when the addresses given were refused: each has its error.
    let none_given = raw.listen.as_ref().is_none_or(Vec::is_empty);
    if listen.is_empty() && tls.is_empty() && none_given {
        r.at(
            section,
            "server.listen",
            "no traffic listener: give server.listen an address or add a [[server.tls]]",
        );
    }
    let max_header_size = size(
        r,
        "server.max_header_size",
        raw.max_header_size.as_ref(),
        defaults.max_header_size,
    );
    if let Some(v) = &raw.max_header_size {
        if max_header_size < MIN_HEADER_SIZE {
            r.at(
                v.span(),
                "server.max_header_size",
                "must be at least 8KiB (HTTP/1.1 heads are read into a buffer of that size)",
            );
        } else if max_header_size > MAX_HEADER_SIZE {
            // Each connection may hold that much of a head it is reading
            // (review34d L5: 1TiB passed, and was offered to HTTP/2 peers).
            r.at(
                v.span(),
                "server.max_header_size",
                "must be at most 1MiB (each client connection may hold a head that large)",
            );
        }
    }
    Server {
        listen,
        request_header_timeout: positive(
            r,
            "server.request_header_timeout",
            raw.request_header_timeout.as_ref(),
            defaults.request_header_timeout,
        ),
        idle_timeout: positive(
            r,
            "server.idle_timeout",
            raw.idle_timeout.as_ref(),
            defaults.idle_timeout,
        ),
        max_request_body: size(
            r,
            "server.max_request_body",
            raw.max_request_body.as_ref(),
            defaults.max_request_body,
        ),
        max_header_size,
        shutdown_grace: duration(
            r,
            "server.shutdown_grace",
            raw.shutdown_grace.as_ref(),
            defaults.shutdown_grace,
        ),
        max_connections: raw
            .max_connections
            .as_ref()
            .map(|v| integer(r, "server.max_connections", Some(v), 1, 1)),
        trusted_proxies: cidr_list(r, "server.trusted_proxies", raw.trusted_proxies.as_ref()),
        trusted_fields: match raw.trusted_fields.as_ref() {
            None => TrustedFields::default(),
            Some(v) => match v.get_ref().to_ascii_lowercase().as_str() {
                "either" => TrustedFields::Either,
                "x-forwarded" => TrustedFields::XForwarded,
                "forwarded" => TrustedFields::Forwarded,
                _ => {
                    r.at(
                        v.span(),
                        "server.trusted_fields",
                        "use \"x-forwarded\" (X-Forwarded-For/-Proto/-Host), \"forwarded\" (RFC 7239) or \"either\"",
                    );
                    TrustedFields::default()
                }
            },
        },
        tls,
    }
}

pub(super) fn admin(
    r: R,
    raw: Option<Spanned<raw::Admin>>,
    base: &Path,
    claim: &mut Claim,
) -> Admin {
    let defaults = Admin::default();
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let listen = match &raw.listen {
        None => {
            claim(r, "admin.listen".into(), defaults.listen, 0..0);
            defaults.listen
        }
        Some(v) => match socket_addr(r, "admin.listen", v.get_ref(), v.span()) {
            Some(addr) => {
                claim(r, "admin.listen".into(), addr, v.span());
                addr
            }
            None => defaults.listen,
        },
    };
    // Read here, once: `check` finds what start would, and a reload that
    // validates the file has the token it rotates to.
    let mut token = None;
    let token_file = raw.token_file.map(|t| {
        let path = base.join(t.get_ref());
        match read_token(&path) {
            Ok(read) => token = Some(Token(read)),
            Err(e) => r.at(t.span(), "admin.token_file", e.to_string()),
        }
        path
    });
    Admin {
        listen,
        token_file,
        token,
    }
}

/// Reads the admin token: the file's first line, trimmed. An empty file is
/// an error, since it would make every token check trivially pass.
fn read_token(path: &Path) -> std::io::Result<String> {
    let read = crate::config::readable(path).and_then(|()| std::fs::read_to_string(path));
    let text = read.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot read admin token_file {}: {e}", path.display()),
        )
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        let what = if text.trim().is_empty() {
            "is empty"
        } else {
            "has an empty first line (the token is the first line)"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("admin token_file {} {what}", path.display()),
        ));
    }
    // The admin API reads the field as visible ASCII (and tabs): a token
    // holding anything else could never be given. A control character is
    // refused (400) before portico sees the request (review48b L3), and a
    // byte beyond ASCII, which a field may carry, failed that reading, so
    // purge and reload answered 401 (review48e M1).
    let readable = |c: &char| *c == '\t' || (' '..='~').contains(c);
    if let Some(bad) = token.chars().find(|c| !readable(c)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "admin token_file {}: the token holds {bad:?}, which no request can give the admin API (visible ASCII only): write it in letters, digits and -._~+/=",
                path.display()
            ),
        ));
    }
    Ok(token)
}

/// The certificates of a PEM file, each one webpki can read: with
/// `leaf`, the first as a server's own certificate (as rustls's key match
/// reads it) and the rest only as X.509, as rustls sends a chain unread
/// (an intermediate with a critical policy extension webpki does not know,
/// or an appended v1 root, is served as nginx serves it, review36e M1);
/// without, each as a trust anchor rustls can use (`tls_ca`). One a line
/// lost in a copy left unparsable was only warned of at the first
/// handshake, and a file of nothing usable failed every request with a
/// 502 after `check`, start and reload had all said yes (review36a M1).
pub(crate) fn read_pem_certificates(
    path: &Path,
    leaf: bool,
) -> Result<Vec<pki_types::CertificateDer<'static>>, String> {
    use pki_types::pem::PemObject;
    crate::config::readable(path).map_err(|e| e.to_string())?;
    let certs = pki_types::CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    for (n, cert) in certs.iter().enumerate() {
        let read = if leaf && n == 0 {
            webpki::EndEntityCert::try_from(cert).map(drop)
        } else {
            webpki::anchor_from_trusted_cert(cert).map(drop)
        };
        if let Err(error) = read {
            return Err(unreadable_certificate(n, &error));
        }
    }
    Ok(certs)
}

/// A PEM file's error in an operator's words: the library names a block
/// cut short by its end marker's bytes as numbers, `missing section end
/// marker: [67, 69, 82, ...]` for a certificate file cut in a copy
/// (review36f L3).
pub(crate) fn pem_error(error: pki_types::pem::Error) -> String {
    match error {
        pki_types::pem::Error::Io(io) => io.to_string(),
        pki_types::pem::Error::MissingSectionEnd { end_marker } => format!(
            "the file ends inside a {} block (no -----END line): is the file whole?",
            String::from_utf8_lossy(&end_marker)
                .trim_matches('-')
                .trim()
        ),
        other => other.to_string(),
    }
}

/// What is said of the `n`th certificate (from 0) of a PEM file that
/// webpki could not read: a DER that does not parse is most often a file
/// cut in a copy.
fn unreadable_certificate(n: usize, error: &webpki::Error) -> String {
    let hint = match error {
        webpki::Error::BadDer | webpki::Error::TrailingData(_) => ": is the file whole?",
        // An X.509 v1 certificate (openssl x509 -req without extensions),
        // which nginx takes (tls53 L6).
        webpki::Error::UnsupportedCertVersion => {
            ": it is an X.509 v1 certificate; reissue it as v3, with its names in subjectAltName (openssl's -addext subjectAltName=DNS:...)"
        }
        _ => "",
    };
    format!(
        "certificate {} in the file cannot be read as X.509 ({error}){hint}",
        n + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_reached_through_any_address_of_the_machine() {
        let at = |text: &str| text.parse::<SocketAddr>().unwrap();
        let lan: IpAddr = "10.1.2.3".parse().unwrap();
        let is_lan = |ip: IpAddr| ip == lan;
        // Behind a wildcard, this machine's addresses and loopback loop.
        assert!(reaches(at("10.1.2.3:80"), at("0.0.0.0:80"), is_lan));
        assert!(reaches(at("10.1.2.3:80"), at("[::]:80"), is_lan));
        assert!(reaches(
            at("[::ffff:10.1.2.3]:80"),
            at("0.0.0.0:80"),
            is_lan
        ));
        assert!(reaches(at("127.0.0.9:80"), at("0.0.0.0:80"), |_| false));
        // Another machine's, another port, an IPv4 wildcard for an IPv6
        // address, or a listener on one address: no.
        assert!(!reaches(at("10.1.2.4:80"), at("0.0.0.0:80"), is_lan));
        assert!(!reaches(at("10.1.2.3:81"), at("0.0.0.0:80"), is_lan));
        assert!(!reaches(at("[fe80::1]:80"), at("0.0.0.0:80"), |_| true));
        assert!(!reaches(at("10.1.2.3:80"), at("127.0.0.1:80"), is_lan));
        // The machine is asked only when the rest could loop.
        let asked = std::cell::Cell::new(false);
        let ask = |_| {
            asked.set(true);
            true
        };
        assert!(!reaches(at("10.1.2.3:81"), at("0.0.0.0:80"), ask));
        assert!(!asked.get());
    }

    #[test]
    fn this_machine_s_own_addresses_are_local() {
        let interfaces = if_addrs::get_if_addrs().unwrap();
        for interface in &interfaces {
            assert!(is_local(interface.ip()), "{interface:?}");
        }
        // And an address none of them has is not (a documentation one,
        // RFC 5737, that this machine does not happen to use).
        let elsewhere = ["203.0.113.7", "198.51.100.7", "192.0.2.77"]
            .map(|ip| ip.parse::<IpAddr>().unwrap())
            .into_iter()
            .find(|ip| interfaces.iter().all(|i| i.ip() != *ip))
            .unwrap();
        assert!(!is_local(elsewhere));
    }
}
