//! TLS termination with rustls (ring provider): builds a `TlsAcceptor` per
//! `[[server.tls]]` listener from its certificate files. The certificate is
//! chosen by SNI among the listener's pairs (the first is the default when
//! no name matches or none is sent); ALPN offers h2 and http/1.1; rustls
//! speaks TLS 1.2 and 1.3 only. Errors name the file at fault.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{CertificatePair, TlsListener};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("TLS key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn load_pair(
    pair: &CertificatePair,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_path = pair.cert.display().to_string();
    let key_path = pair.key.display().to_string();
    // Read as `tls_ca` files are, the chain's first as the server's own.
    let certs = crate::config::read_pem_certificates(&pair.cert, true).map_err(|reason| {
        TlsError::Cert {
            path: cert_path.clone(),
            reason,
        }
    })?;
    crate::config::readable(&pair.key).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        reason: match e {
            // Said as such, not as the parser's "no key" or "base64
            // decode error", which would send the operator hunting.
            _ if encrypted_key(&pair.key) => ENCRYPTED_KEY.into(),
            // A certificate given as the key, the usual mix-up.
            pki_types::pem::Error::NoItemsFound => {
                "no PEM private key in the file (a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)".into()
            }
            e => crate::config::pem_error(e),
        },
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_path.clone(),
            // ring's "failed to parse private key as RSA, ECDSA, or EdDSA"
            // is said of a key it read well but cannot use (P-521,
            // secp256k1, Ed448, RSA under 2048 bits), which read as a
            // corrupt file (review36a L3).
            reason: format!(
                "{e}: portico takes RSA keys of 2048 bits or more, ECDSA keys on P-256 or P-384, and Ed25519 keys"
            ),
        })?;
    // The key of a later certificate in the file: the chain is out of
    // order, which rustls's "keys may not be consistent" did not say
    // (review34a F10).
    let belongs_to = |cert: &CertificateDer<'static>| {
        CertifiedKey::new(vec![cert.clone()], key.clone())
            .keys_match()
            .is_ok()
    };
    let later = certs.iter().skip(1).position(belongs_to);
    let certified = CertifiedKey::new(certs, key);
    certified.keys_match().map_err(|_| TlsError::Key {
        path: key_path,
        reason: match later {
            Some(n) => format!(
                "is the key of certificate {} in {cert_path}, not of its first: the file must start with the server's own certificate, then its intermediates",
                n + 2
            ),
            None => format!("does not match certificate {cert_path} (nor any other in the file)"),
        },
    })?;
    Ok(certified)
}

const ENCRYPTED_KEY: &str = "the private key is encrypted, and portico asks for no passphrase: \
     decrypt it (`openssl pkey -in KEY -out PLAIN_KEY`) into a file only portico's user can read";

/// Whether the key file holds a passphrase-protected key: PKCS #8's
/// `ENCRYPTED PRIVATE KEY` block, or OpenSSL's traditional form with
/// `Proc-Type: 4,ENCRYPTED` in an `RSA PRIVATE KEY` or `EC PRIVATE KEY`
/// block.
fn encrypted_key(path: &std::path::Path) -> bool {
    std::fs::read(path).is_ok_and(|pem| {
        memchr::memmem::find(&pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----").is_some()
            || memchr::memmem::find(&pem, b"Proc-Type: 4,ENCRYPTED").is_some()
    })
}

/// Loads one `{ cert, key }` pair as a listener would: readable PEM files,
/// a key rustls can use, and a key that matches the certificate. For
/// validation, so `check` reports every bad pair where the file names it.
pub fn check_pair(pair: &CertificatePair) -> Result<(), TlsError> {
    load_pair(pair, &rustls::crypto::ring::default_provider()).map(drop)
}

/// Picks, in this order of weight, a certificate valid for the SNI name,
/// one whose key the client can verify a signature of, and one valid now,
/// the first in the file's order among equals: an RSA and an ECDSA pair
/// for one name serve each client the one it takes, as nginx does with two
/// `ssl_certificate` lines (the second was never served, and an RSA-only
/// client failed its handshake, review34a F2), and an expired pair listed
/// before its replacement for the same name is not served over it
/// (tls53 L3: rotating by adding the new pair after the old one served
/// the old one until it was removed).
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Served>,
}

/// A listener's certificate, with what choosing it needs, read at load.
#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    /// The names a certificate without subjectAltName is chosen by: its
    /// subject's CNs, lower-cased (see [`common_names`]).
    cn: Vec<String>,
    /// Its own validity (notBefore, notAfter).
    valid: Option<(SystemTime, SystemTime)>,
}

impl Served {
    fn new(key: Arc<CertifiedKey>) -> Self {
        let own = key.end_entity_cert().ok();
        let cn = own.and_then(names_without_alt).unwrap_or_default();
        let valid = own.and_then(|der| validity(der.as_ref()));
        Served { key, cn, valid }
    }

    /// How it names the SNI `name` (as `host`, lower-cased and without a
    /// trailing dot, for a CN): 2 in its subjectAltName, 1 by a CN of a
    /// certificate without subjectAltName, 0 not at all. A reissued
    /// certificate with subjectAltName is chosen over the CN-only one it
    /// replaces, wherever it is listed (review55 M2).
    fn names(&self, name: &ServerName<'_>, host: &str) -> u8 {
        if !self.cn.is_empty() {
            let by_cn = self.cn.iter().any(|cn| match cn.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => cn == host,
            });
            return u8::from(by_cn);
        }
        let by_alt_name = self
            .key
            .end_entity_cert()
            .ok()
            .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
            .is_some_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok());
        2 * u8::from(by_alt_name)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let name = sni.and_then(|name| ServerName::try_from(name).ok());
        let host = sni.map(|sni| sni.trim_end_matches('.').to_ascii_lowercase());
        let offered = hello.signature_schemes();
        let now = SystemTime::now();
        let rank = |served: &Served| {
            let named = match (&name, &host) {
                (Some(name), Some(host)) => served.names(name, host),
                _ => 0,
            };
            let verifiable = served.key.key.choose_scheme(offered).is_some();
            let valid = served
                .valid
                .is_none_or(|(from, until)| from <= now && now <= until);
            (named << 2) | (u8::from(verifiable) << 1) | u8::from(valid)
        };
        let mut best: Option<(u8, &Served)> = None;
        for served in &self.keys {
            let ranked = rank(served);
            if best.is_none_or(|(top, _)| ranked > top) {
                best = Some((ranked, served));
            }
            if ranked == 0b1011 {
                break;
            }
        }
        best.map(|(_, served)| served.key.clone())
    }
}

/// The CNs of a certificate's subject (`subject` without its outer
/// SEQUENCE), lower-cased, that read as host names (`*.` allowed), in a
/// UTF8String, PrintableString or IA5String: what a certificate without
/// subjectAltName is chosen by, as HAProxy indexes one by every CN
/// (tls53 M1: such a certificate was never served, the first pair going
/// out instead). webpki matches names in subjectAltName only, as
/// browsers, Go and rustls clients do.
fn common_names(mut subject: &[u8]) -> Vec<String> {
    const CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let mut found = Vec::new();
    while let Some((_, mut set, rest)) = tlv(subject) {
        subject = rest;
        while let Some((_, attribute, more)) = tlv(set) {
            set = more;
            let Some((tag, text, _)) = attribute.strip_prefix(&CN).and_then(tlv) else {
                continue;
            };
            let text = std::str::from_utf8(text)
                .ok()
                .filter(|_| matches!(tag, 0x0c | 0x13 | 0x16));
            if let Some(cn) = text.map(|t| t.trim_end_matches('.').to_ascii_lowercase()) {
                let host = cn.strip_prefix("*.").unwrap_or(&cn);
                let hostlike = !host.is_empty()
                    && host.split('.').all(|label| {
                        !label.is_empty()
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    });
                if hostlike {
                    found.push(cn);
                }
            }
        }
    }
    found
}

/// The acceptor for one TLS listener.
pub fn acceptor(listener: &TlsListener) -> Result<TlsAcceptor, TlsError> {
    Ok(loaded(listener)?.0)
}

/// The acceptor for one TLS listener, and the certificates it serves.
fn loaded(listener: &TlsListener) -> Result<(TlsAcceptor, Vec<Arc<CertifiedKey>>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let keys = listener
        .certificates
        .iter()
        .map(|pair| load_pair(pair, &provider).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    for (pair, key) in listener.certificates.iter().zip(&keys) {
        warn_if_lapsing(pair, key);
        if let Some(said) = key.end_entity_cert().ok().and_then(cn_only) {
            tracing::warn!(cert = %pair.cert.display(), "{said}");
        }
    }
    let (ticketer, sessions) = resumption(&keys)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            keys: keys.iter().cloned().map(Served::new).collect(),
        }));
    // `http/1.0` too, as nginx takes it: a client offering only that got
    // a fatal alert (review34a F5).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    config.ticketer = ticketer;
    config.session_storage = sessions;
    Ok((TlsAcceptor::from(Arc::new(config)), keys))
}

/// Session resumption, kept across reloads while a listener's
/// certificates stay the same, as nginx resumes: session tickets (their
/// keys made at start and rotated every 6 hours by rustls, the last one
/// still accepted), and for clients without them a cache of 4096 sessions.
/// Without tickets only the last 256 sessions (128 clients on TLS 1.3)
/// resumed, and a reload lost them all, so returning clients paid full
/// handshakes: 0.87 ms of CPU each with an RSA key against 0.12 ms
/// resumed, and a round trip on TLS 1.2 (review34a F1). New certificates
/// get new ones, as nginx ties sessions to its certificates: a certificate
/// replaced after a key compromise still had its sessions resumed for the
/// tickets' lifetime (review34g L3).
fn resumption(keys: &[Arc<CertifiedKey>]) -> Result<Resumption, TlsError> {
    use std::hash::{Hash, Hasher};
    static SHARED: std::sync::Mutex<Vec<(u64, Resumption)>> = std::sync::Mutex::new(Vec::new());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for key in keys {
        key.cert.hash(&mut hasher);
    }
    let certificates = hasher.finish();
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, resumption)) = shared.iter().find(|(hash, _)| *hash == certificates) {
        return Ok(resumption.clone());
    }
    let made: Resumption = (
        rustls::crypto::ring::Ticketer::new()?,
        rustls::server::ServerSessionMemoryCache::new(SESSIONS_KEPT),
    );
    // The sets of certificates loaded lately: a reload back to one keeps
    // its sessions; a few are plenty.
    if shared.len() >= RESUMPTIONS_KEPT {
        shared.remove(0);
    }
    shared.push((certificates, made.clone()));
    Ok(made)
}

/// Sets of certificates whose sessions are kept (see [`resumption`]).
const RESUMPTIONS_KEPT: usize = 16;

/// What resumes sessions: tickets, and the cache for clients without.
type Resumption = (
    Arc<dyn rustls::server::ProducesTickets>,
    Arc<dyn rustls::server::StoresServerSessions>,
);

/// Sessions kept for resumption without tickets (about 100 bytes each).
const SESSIONS_KEPT: usize = 4096;

/// How long before its end a certificate is warned about at load.
const LAPSING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Warns when a listener's certificate is not valid now or ends within
/// [`LAPSING`]. rustls serves any certificate it is given, and clients
/// then fail their handshakes with nothing in portico's log; nginx and
/// HAProxy say nothing either, so the first sign is usually a user's
/// report. A start or reload is where an operator looks.
///
/// Every certificate of the chain: an intermediate that ends first ends
/// the chain, and went unsaid (review42f L1).
fn warn_if_lapsing(pair: &CertificatePair, key: &CertifiedKey) {
    let Some((place, lapse)) = chain_lapse(key.cert.iter().map(|der| der.as_ref())) else {
        return;
    };
    let cert = Which(pair, place);
    let date = httpdate::fmt_http_date;
    match lapse {
        Lapse::Expired(until) => {
            tracing::warn!(%cert, not_after = %date(until), "TLS certificate {lapse}");
        }
        Lapse::NotYet(from) => {
            tracing::warn!(%cert, not_before = %date(from), "TLS certificate {lapse}");
        }
        Lapse::Soon(until, _) => {
            tracing::warn!(%cert, not_after = %date(until), "TLS certificate {lapse}");
        }
    }
}

/// What is said of a certificate without subjectAltName
/// (see [`common_names`]), at start, reload and `portico check`.
fn cn_only(der: &CertificateDer<'_>) -> Option<String> {
    let names = names_without_alt(der)?;
    let chosen = match names.is_empty() {
        false => format!(
            "chosen by SNI by its CN, `{}`, as HAProxy does",
            names.join("`, `")
        ),
        true => "never chosen by SNI (nor by a CN: none reads as a host name)".to_owned(),
    };
    Some(format!(
        "TLS certificate has no subjectAltName: {chosen}; browsers, Go and rustls clients refuse it: reissue it with one (openssl's -addext subjectAltName=DNS:...)"
    ))
}

/// [`cn_only`] for `portico check`.
pub fn cn_only_warning(pair: &CertificatePair) -> Option<String> {
    cn_only(chain(pair)?.first()?)
}

/// What `portico check` says of a listener's certificate that the start
/// would warn of (review36a L2: only the start and reloads said it).
pub fn lapse_warning(pair: &CertificatePair) -> Option<String> {
    let chain = chain(pair)?;
    let (place, lapse) = chain_lapse(chain.iter().map(|der| der.as_ref()))?;
    let date = httpdate::fmt_http_date;
    let when = match lapse {
        Lapse::Expired(until) | Lapse::Soon(until, _) => format!("not after {}", date(until)),
        Lapse::NotYet(from) => format!("not before {}", date(from)),
    };
    Some(format!(
        "TLS certificate {} {lapse} ({when})",
        Which(pair, place)
    ))
}

/// The certificates of `pair`'s file, its own first.
fn chain(pair: &CertificatePair) -> Option<Vec<CertificateDer<'static>>> {
    crate::config::readable(&pair.cert).ok()?;
    let chain = CertificateDer::pem_file_iter(&pair.cert).ok()?;
    Some(chain.filter_map(Result::ok).collect())
}

/// The first certificate of a chain that is not valid now or ends within
/// [`LAPSING`], with its place (0: the server's own).
fn chain_lapse<'a>(chain: impl Iterator<Item = &'a [u8]>) -> Option<(usize, Lapse)> {
    chain
        .enumerate()
        .find_map(|(place, der)| Some((place, lapse(der)?)))
}

/// A certificate file, and which of its chain a warning is about.
struct Which<'a>(&'a CertificatePair, usize);

impl std::fmt::Display for Which<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.cert.display())?;
        if self.1 > 0 {
            write!(f, " (certificate {} of its chain)", self.1 + 1)?;
        }
        Ok(())
    }
}

/// When a chain stops serving, in seconds since the Unix epoch: the
/// earliest end of its certificates.
fn chain_end<'a>(chain: impl Iterator<Item = &'a [u8]>) -> Option<u64> {
    let end = chain.filter_map(|der| Some(validity(der)?.1)).min()?;
    Some(end.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs())
}

/// Why a certificate will not serve much longer, if so.
#[derive(Debug, Clone, Copy)]
enum Lapse {
    /// Ended at this time.
    Expired(SystemTime),
    /// Valid only from this time.
    NotYet(SystemTime),
    /// Ends at this time, this soon.
    Soon(SystemTime, Duration),
}

impl std::fmt::Display for Lapse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lapse::Expired(_) => f.write_str("has expired: clients will refuse it"),
            Lapse::NotYet(_) => f.write_str("is not valid yet: clients will refuse it"),
            Lapse::Soon(_, left) => write!(
                f,
                "expires in {:.1} days",
                left.as_secs_f64() / (24.0 * 3600.0)
            ),
        }
    }
}

/// A certificate that is not valid now or ends within [`LAPSING`].
fn lapse(der: &[u8]) -> Option<Lapse> {
    let (from, until) = validity(der)?;
    let now = SystemTime::now();
    if until <= now {
        Some(Lapse::Expired(until))
    } else if from > now {
        Some(Lapse::NotYet(from))
    } else {
        let left = until.duration_since(now).ok()?;
        (left < LAPSING).then_some(Lapse::Soon(until, left))
    }
}

/// A certificate's validity (notBefore, notAfter), read from its DER
/// (RFC 5280 §4.1): the fields before it are skipped, not parsed. `None`
/// for anything unexpected, which only means no warning.
fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (0x30, validity, _) = tlv(after_issuer(der)?)? else {
        return None;
    };
    let (tag, from, rest) = tlv(validity)?;
    let from = der_time(tag, from)?;
    let (tag, until, _) = tlv(rest)?;
    Some((from, der_time(tag, until)?))
}

/// A certificate's fields from its validity on (RFC 5280 §4.1).
fn after_issuer(der: &[u8]) -> Option<&[u8]> {
    let (_, certificate, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(certificate)?;
    // The optional [0] version, then serialNumber, signature and issuer.
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    for _ in 0..3 {
        tbs = tlv(tbs)?.2;
    }
    Some(tbs)
}

/// The CNs a certificate without subjectAltName is chosen by (see
/// [`common_names`]); `None` for one with subjectAltName, or unreadable.
fn names_without_alt(der: &CertificateDer<'_>) -> Option<Vec<String>> {
    if has_alt_names(der.as_ref())? {
        return None;
    }
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    Some(common_names(cert.subject()))
}

/// Whether a certificate has a subjectAltName extension (of any names:
/// DNS, IP addresses...). `None` for anything unexpected.
fn has_alt_names(der: &[u8]) -> Option<bool> {
    const SAN: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x11];
    // Validity, subject and subjectPublicKeyInfo, then the optional unique
    // ids and the [3] extensions.
    let mut rest = after_issuer(der)?;
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    while !rest.is_empty() {
        let (tag, value, more) = tlv(rest)?;
        rest = more;
        if tag != 0xa3 {
            continue;
        }
        let (_, mut extensions, _) = tlv(value)?;
        while !extensions.is_empty() {
            let (_, extension, more) = tlv(extensions)?;
            extensions = more;
            if extension.starts_with(&SAN) {
                return Some(true);
            }
        }
    }
    Some(false)
}

/// One DER tag-length-value: the tag, the value and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(count)?;
        rest = after;
        bytes.iter().fold(0, |n, &b| (n << 8) | usize::from(b))
    };
    let (value, after) = rest.split_at_checked(length)?;
    Some((tag, value, after))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, 1950-2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), the forms RFC 5280 §4.1.2.5 allows.
fn der_time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let digits = |at: usize, count: usize| -> Option<u64> {
        let part = text.get(at..at + count)?;
        part.iter().try_fold(0, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
        })
    };
    let (year, at) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = digits(0, 2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 15) => (digits(0, 4)?, 4),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let (month, day) = (digits(at, 2)?, digits(at + 2, 2)?);
    let (hour, minute, second) = (digits(at + 4, 2)?, digits(at + 6, 2)?, digits(at + 8, 2)?);
    // In range, so the latest is 9999-12-31 23:59:59, which an HTTP date
    // can still be written for (httpdate panics from the year 10000).
    let in_range = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour <= 23
        && minute <= 59
        && second <= 59;
    if !in_range {
        return None;
    }
    // Valid since before the epoch: long ago, as far as a warning goes.
    if year < 1970 {
        return Some(SystemTime::UNIX_EPOCH);
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
    // days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y % 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// Acceptors for every TLS listener of a config, in order, and when each
/// certificate file stops serving: the earliest end of its chain, for
/// `portico_tls_certificate_not_after_timestamp_seconds`, so that an alert
/// sees a certificate come near its end in a process that has run for
/// months (the warning is said at load only; review42f L1). Read from the
/// certificates loaded, not from the files once more.
pub fn acceptors(listeners: &[TlsListener]) -> Result<Loaded, TlsError> {
    let mut ends = std::collections::BTreeMap::new();
    let mut acceptors = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let (acceptor, keys) = loaded(listener)?;
        for (pair, key) in listener.certificates.iter().zip(&keys) {
            if let Some(end) = chain_end(key.cert.iter().map(|der| der.as_ref())) {
                ends.insert(pair.cert.display().to_string(), end);
            }
        }
        acceptors.push(acceptor);
    }
    Ok(Loaded {
        acceptors,
        ends: ends.into_iter().collect(),
    })
}

/// What [`acceptors`] loads.
pub struct Loaded {
    pub acceptors: Vec<TlsAcceptor>,
    /// Each certificate file's name, and when it stops serving.
    pub ends: Vec<(String, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(from: (i32, u8, u8), until: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn date(text: &str) -> SystemTime {
        httpdate::parse_http_date(text).unwrap()
    }

    #[test]
    fn a_certificate_s_validity_is_read_in_both_time_forms() {
        // Before 2050 the times are UTCTime, from 2050 GeneralizedTime.
        let der = made((2020, 1, 2), (2049, 12, 31));
        assert_eq!(
            validity(&der),
            Some((
                date("Thu, 02 Jan 2020 00:00:00 GMT"),
                date("Fri, 31 Dec 2049 00:00:00 GMT")
            ))
        );
        let der = made((1999, 2, 28), (2051, 3, 1));
        assert_eq!(
            validity(&der),
            Some((
                date("Sun, 28 Feb 1999 00:00:00 GMT"),
                date("Wed, 01 Mar 2051 00:00:00 GMT")
            ))
        );
    }

    /// A certificate without subjectAltName is said to be chosen by its
    /// CN (tls53 M1), one with names of any kind (an IP address only too)
    /// is not said anything of.
    #[test]
    fn a_certificate_without_alt_names_is_warned_of_with_its_cn() {
        let made = |names: Vec<String>| {
            let mut params = rcgen::CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "Old.Example");
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().clone()
        };
        let said = cn_only(&made(Vec::new())).expect("a warning");
        assert!(said.contains("by its CN, `old.example`"), "{said}");
        assert_eq!(cn_only(&made(vec!["a.test".to_owned()])), None);
        assert_eq!(cn_only(&made(vec!["127.0.0.1".to_owned()])), None);
    }

    /// `portico check` says what the start would warn of (review36a L2).
    #[test]
    fn check_names_an_expired_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 2);
        params.not_after = rcgen::date_time_ymd(2021, 1, 2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = std::env::temp_dir().join(format!("portico-lapse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = CertificatePair {
            cert: dir.join("old.pem"),
            key: dir.join("old.key"),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        let warning = lapse_warning(&pair).expect("a warning");
        assert!(
            warning.ends_with("old.pem has expired: clients will refuse it (not after Sat, 02 Jan 2021 00:00:00 GMT)"),
            "{warning}"
        );
        // Nothing to read is no warning (the load says what is wrong).
        std::fs::write(&pair.cert, "not a certificate").unwrap();
        assert_eq!(lapse_warning(&pair), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An intermediate that ends before the server's own certificate is
    /// warned of, naming its place, and ends the file's series (review42f
    /// L1: only the first certificate was read).
    #[test]
    fn the_chain_ends_with_its_first_certificate_to_end() {
        let pem = |from: (i32, u8, u8), until: (i32, u8, u8)| {
            let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
            params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
            params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().pem()
        };
        let dir = std::env::temp_dir().join(format!("portico-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = CertificatePair {
            cert: dir.join("chain.pem"),
            key: dir.join("chain.key"),
        };
        let chain = pem((2020, 1, 2), (2049, 12, 31)) + &pem((2020, 1, 2), (2021, 1, 2));
        std::fs::write(&pair.cert, chain).unwrap();
        let warning = lapse_warning(&pair).expect("a warning");
        assert!(
            warning.contains("chain.pem (certificate 2 of its chain) has expired"),
            "{warning}"
        );
        let loaded = super::chain(&pair).unwrap();
        let end = date("Sat, 02 Jan 2021 00:00:00 GMT");
        let seconds = end
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(
            chain_end(loaded.iter().map(|der| der.as_ref())),
            Some(seconds)
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn odd_der_gives_no_validity_rather_than_a_panic() {
        let der = made((2020, 1, 2), (2049, 12, 31));
        for cut in 0..der.len() {
            let _ = validity(&der[..cut]);
        }
        assert_eq!(validity(b""), None);
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(der_time(0x17, b"991301000000Z"), None);
        assert_eq!(der_time(0x17, b"9901010000000"), None);
        assert_eq!(
            der_time(0x18, b"19700101000000Z"),
            Some(SystemTime::UNIX_EPOCH)
        );
        // Out of range: none, where the year 10000 it rolled into made
        // httpdate panic (review30d F6).
        assert_eq!(der_time(0x18, b"99991231240000Z"), None);
        assert_eq!(der_time(0x18, b"99991231235960Z"), None);
        let latest = der_time(0x18, b"99991231235959Z").unwrap();
        assert_eq!(
            httpdate::fmt_http_date(latest),
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
        assert_eq!(
            der_time(0x17, b"550101000000Z"),
            Some(SystemTime::UNIX_EPOCH)
        );
    }
}
