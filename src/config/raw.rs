//! The configuration file exactly as written: serde structs mirroring the
//! TOML, with values that still need checking kept as spanned strings so
//! validation can point at them. Nothing outside `config` sees these types.

use serde::Deserialize;
use toml::Spanned;

pub type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
pub struct File {
    #[serde(default)]
    pub server: Option<Spanned<Server>>,
    #[serde(default)]
    pub admin: Option<Spanned<Admin>>,
    #[serde(default)]
    pub upstream: Vec<Spanned<Upstream>>,
    #[serde(default)]
    pub route: Vec<Spanned<Route>>,
    #[serde(default)]
    pub cache: Option<Spanned<Cache>>,
    #[serde(default)]
    pub rate_limit: Option<Spanned<RateLimit>>,
    #[serde(default)]
    pub compression: Option<Spanned<Compression>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Server {
    pub listen: Option<Vec<Str>>,
    pub request_header_timeout: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub max_request_body: Option<Str>,
    pub max_header_size: Option<Str>,
    pub shutdown_grace: Option<Str>,
    pub max_connections: Option<Spanned<i64>>,
    pub trusted_proxies: Option<Vec<Str>>,
    pub trusted_fields: Option<Str>,
    #[serde(default)]
    pub tls: Vec<Spanned<Tls>>,
}

#[derive(Debug, Deserialize)]
pub struct Tls {
    #[serde(default)]
    pub listen: Vec<Str>,
    #[serde(default)]
    pub certificates: Vec<Spanned<Certificate>>,
}

#[derive(Debug, Deserialize)]
pub struct Certificate {
    pub cert: Str,
    pub key: Str,
}

#[derive(Debug, Default, Deserialize)]
pub struct Admin {
    pub listen: Option<Str>,
    pub token_file: Option<Str>,
}

/// A number written whole (`100`) or with a fraction (`0.5`): TOML keeps
/// the two apart, and a rate may be either.
#[derive(Debug, Clone, Copy)]
pub struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Number;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number")
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Number, E> {
                Ok(Number(value as f64))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Number, E> {
                Ok(Number(value as f64))
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Number, E> {
                Ok(Number(value))
            }

            /// nginx's `30r/m` and `5r/s`, the first thing an operator
            /// moving from `limit_req` writes, said in this file's terms
            /// (review41b L2).
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Number, E> {
                let nginx = value
                    .strip_suffix("r/s")
                    .map(|n| (n, 1.0))
                    .or_else(|| value.strip_suffix("r/m").map(|n| (n, 60.0)))
                    .and_then(|(n, per)| Some(n.parse::<f64>().ok()? / per));
                match nginx {
                    Some(rate) => Err(E::custom(format_args!(
                        "{value:?} is nginx's way to write a rate: here it is a number of requests a second, {}",
                        (rate * 10_000.0).round() / 10_000.0
                    ))),
                    None => Err(E::invalid_type(serde::de::Unexpected::Str(value), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `"127.0.0.1:8001"` or `{ addr = "127.0.0.1:8001", weight = 2, max_conns = 8,
/// backup = true }`. A
/// hand-written visitor rather than `#[serde(untagged)]`, which buffers the
/// value and so loses the spans inside it.
#[derive(Debug)]
pub struct Backend {
    /// `None` for the plain-string form: the span is the backend's own.
    pub addr: Option<Str>,
    pub plain: Option<String>,
    pub weight: Option<Spanned<i64>>,
    pub max_conns: Option<Spanned<i64>>,
    pub backup: Option<Spanned<bool>>,
}

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Backend;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a backend: \"IP:PORT\" or { addr = \"IP:PORT\", weight = N, max_conns = N, backup = true }",
                )
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Backend, E> {
                Ok(Backend {
                    addr: None,
                    plain: Some(value.to_owned()),
                    weight: None,
                    max_conns: None,
                    backup: None,
                })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Backend, A::Error> {
                let mut addr = None;
                let mut weight = None;
                let mut max_conns = None;
                let mut backup = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "addr" => addr = Some(map.next_value()?),
                        "weight" => weight = Some(map.next_value()?),
                        "max_conns" => max_conns = Some(map.next_value()?),
                        "backup" => backup = Some(map.next_value()?),
                        other => {
                            return Err(serde::de::Error::unknown_field(
                                other,
                                &["addr", "weight", "max_conns", "backup"],
                            ))
                        }
                    }
                }
                let addr = addr.ok_or_else(|| serde::de::Error::missing_field("addr"))?;
                Ok(Backend {
                    addr: Some(addr),
                    plain: None,
                    weight,
                    max_conns,
                    backup,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
pub struct Upstream {
    pub name: Str,
    pub backends: Spanned<Vec<Spanned<Backend>>>,
    pub balance: Option<Str>,
    pub hash_key: Option<Str>,
    pub connect_timeout: Option<Str>,
    pub response_timeout: Option<Str>,
    pub body_timeout: Option<Str>,
    pub max_idle_per_backend: Option<Spanned<i64>>,
    pub max_conns_per_backend: Option<Spanned<i64>>,
    pub queue_timeout: Option<Str>,
    pub slow_start: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub retries: Option<Spanned<i64>>,
    pub retry_on_timeout: Option<Spanned<bool>>,
    pub health: Option<Spanned<Health>>,
    pub tls: Option<Spanned<bool>>,
    pub tls_server_name: Option<Str>,
    pub tls_ca: Option<Str>,
}

#[derive(Debug, Deserialize)]
pub struct Health {
    pub path: Option<Str>,
    pub host: Option<Str>,
    pub interval: Option<Str>,
    pub timeout: Option<Str>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
pub struct Route {
    /// The `route` label of its metrics.
    pub name: Option<Str>,
    pub host: Option<Str>,
    pub path_prefix: Option<Str>,
    /// One path, matched whole: nginx's `location =`.
    pub path: Option<Str>,
    pub upstream: Str,
    pub cache: Option<Spanned<bool>>,
    pub rate_limit: Option<Spanned<RouteLimit>>,
    pub compression: Option<Spanned<bool>>,
}

/// A route's `rate_limit`: `true`, `false`, or a rate of its own,
/// `{ requests_per_second = 5, burst = 10 }` (either key alone keeps the
/// section's other), as nginx's `limit_req` names a zone per location.
/// Hand-written, as [`Backend`], to keep the spans inside.
#[derive(Debug)]
pub struct RouteLimit {
    pub on: bool,
    pub requests_per_second: Option<Spanned<Number>>,
    pub burst: Option<Spanned<i64>>,
}

impl<'de> Deserialize<'de> for RouteLimit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RouteLimit;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or { requests_per_second = N, burst = N }")
            }

            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<RouteLimit, E> {
                Ok(RouteLimit {
                    on,
                    requests_per_second: None,
                    burst: None,
                })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RouteLimit, A::Error> {
                const KEYS: &[&str] = &["requests_per_second", "burst"];
                let mut limit = RouteLimit {
                    on: true,
                    requests_per_second: None,
                    burst: None,
                };
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "requests_per_second" => {
                            limit.requests_per_second = Some(map.next_value()?)
                        }
                        "burst" => limit.burst = Some(map.next_value()?),
                        other => return Err(serde::de::Error::unknown_field(other, KEYS)),
                    }
                }
                Ok(limit)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct Cache {
    pub max_size: Option<Str>,
    pub max_object_size: Option<Str>,
    pub default_ttl: Option<Str>,
    pub stale_if_error: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Compression {
    pub types: Option<Spanned<Vec<Str>>>,
    pub min_size: Option<Str>,
    pub level: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RateLimit {
    pub requests_per_second: Option<Spanned<Number>>,
    pub burst: Option<Spanned<i64>>,
    pub key: Option<Str>,
    pub trusted_proxies: Option<Vec<Str>>,
    pub max_tracked_clients: Option<Spanned<i64>>,
}
