//! HTTP/1.1 protocol upgrades (WebSocket and the like), passed through:
//! the `Upgrade` request is forwarded with its `Upgrade` and `Connection:
//! upgrade` fields intact (they are hop-by-hop, so the general hygiene
//! strips them), and when the backend answers `101 Switching Protocols` the
//! two connections are bridged byte for byte until either side closes.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::ProxyBody;
use super::headers;
use crate::upstream::health::InFlight;
use crate::upstream::UpstreamBody;

/// A client's request to switch protocols, with its pending connection.
pub struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

/// Whether the `Connection` field lists the `upgrade` token.
fn connection_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Takes the client's pending upgrade out of an HTTP/1.1 upgrade request.
pub fn requested(request: &mut Request<Incoming>) -> Option<Upgrade> {
    if request.version() != Version::HTTP_11 || !connection_upgrade(request.headers()) {
        return None;
    }
    let protocol = request.headers().get(header::UPGRADE)?.clone();
    Some(Upgrade {
        protocol,
        client: hyper::upgrade::on(request),
    })
}

impl Upgrade {
    /// Puts back the fields hop-by-hop removal took out.
    pub fn restore_request(&self, headers: &mut HeaderMap) {
        headers.insert(header::UPGRADE, self.protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    /// Answers the client with the backend's 101 and bridges the two
    /// upgraded connections in the background.
    pub fn bridge(
        self,
        mut response: Response<UpstreamBody>,
        in_flight: InFlight,
    ) -> Response<ProxyBody> {
        let backend = hyper::upgrade::on(&mut response);
        let client = self.client;
        tokio::spawn(async move {
            // The backend slot stays taken while the tunnel is open.
            let _in_flight = in_flight;
            let (client, backend) = match tokio::try_join!(client, backend) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%error, "upgrade failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut backend = TokioIo::new(backend);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                tracing::debug!(%error, "upgraded connection ended with error");
            }
        });
        let (mut parts, _) = response.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        headers::prepare_response(&mut parts.headers, parts.version);
        if let Some(protocol) = protocol {
            parts.headers.insert(header::UPGRADE, protocol);
        }
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        Response::from_parts(parts, ProxyBody::empty())
    }
}
