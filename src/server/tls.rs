//! TLS termination with rustls (ring provider): builds a `TlsAcceptor` per
//! `[[server.tls]]` listener from its certificate files. The certificate is
//! chosen by SNI among the listener's pairs (the first is the default when
//! no name matches or none is sent); ALPN offers h2 and http/1.1; rustls
//! speaks TLS 1.2 and 1.3 only. Errors name the file at fault.

use std::sync::Arc;

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
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path,
            reason: "no PEM certificate in the file".into(),
        });
    }
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
            e => e.to_string(),
        },
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(certs, key);
    certified.keys_match().map_err(|e| TlsError::Key {
        path: key_path,
        reason: format!("does not match certificate {cert_path}: {e}"),
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

/// Picks the first certificate valid for the SNI name, else the first.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|name| ServerName::try_from(name).ok())
            .and_then(|name| {
                self.keys.iter().find(|key| {
                    key.end_entity_cert()
                        .ok()
                        .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                        .is_some_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
                })
            });
        chosen.or_else(|| self.keys.first()).cloned()
    }
}

/// The acceptor for one TLS listener.
pub fn acceptor(listener: &TlsListener) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let keys = listener
        .certificates
        .iter()
        .map(|pair| load_pair(pair, &provider).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { keys }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Acceptors for every TLS listener of a config, in order.
pub fn acceptors(listeners: &[TlsListener]) -> Result<Vec<TlsAcceptor>, TlsError> {
    listeners.iter().map(acceptor).collect()
}
