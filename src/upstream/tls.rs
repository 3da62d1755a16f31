//! The connector behind an upstream's pool: plain TCP, or rustls over it
//! for `tls = true` (ALPN http/1.1, TLS 1.2 and 1.3, ring like the
//! listeners). Trust comes from `tls_ca` when given, else the system's
//! roots; the name checked is `tls_server_name` (also sent as SNI), else
//! the backend's IP address.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use pki_types::ServerName;

use crate::config;

pub(super) fn connector(upstream: &config::Upstream) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(upstream.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    // Lets https URIs through to the TLS layer.
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(upstream))
        .https_or_http();
    let name = upstream
        .tls
        .as_ref()
        .and_then(|tls| tls.server_name.clone())
        .and_then(|name| ServerName::try_from(name).ok());
    match name {
        Some(name) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name))
            .enable_http1()
            .wrap_connector(http),
        None => builder.enable_http1().wrap_connector(http),
    }
}

fn client_config(upstream: &config::Upstream) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let Some(tls) = &upstream.tls else {
        // Never used for a handshake: plain upstreams connect over TCP.
        return builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
    };
    let mut roots = rustls::RootCertStore::empty();
    if tls.ca_certs.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(upstream = %upstream.name, %error, "reading the system's CA certificates");
        }
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::error!(
                upstream = %upstream.name,
                "no system CA certificates found: set tls_ca, or install ca-certificates"
            );
        }
    } else {
        let (_, ignored) = roots.add_parsable_certificates(tls.ca_certs.iter().cloned());
        if ignored > 0 {
            tracing::warn!(upstream = %upstream.name, ca = ?tls.ca, ignored, "unusable certificates in tls_ca");
        }
    }
    builder.with_root_certificates(roots).with_no_client_auth()
}
