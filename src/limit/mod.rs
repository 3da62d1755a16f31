//! Per-client throttling with GCRA (governor's keyed limiter over a
//! bounded store): `requests_per_second` sustained, `burst` at once, one
//! limiter per route that enables it (a route group). Checked right after
//! routing, before any upstream work. Memory is bounded by
//! `max_tracked_clients`, and idle clients are forgotten every 10 seconds.

pub mod client;
mod store;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};
use http::HeaderMap;

use crate::config::{Config, HostMatch, Rate, RateLimit};
use client::ClientKey;
use store::BoundedStore;

/// How often idle client keys are dropped.
const CLEANUP_EVERY: Duration = Duration::from_secs(10);

type Keyed =
    RateLimiter<ClientKey, BoundedStore<ClientKey>, DefaultClock, StateInformationMiddleware>;

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `reset`: until the budget is whole again.
    Allowed {
        limit: u32,
        remaining: u32,
        reset: Duration,
    },
    /// `retry_after`: until the next request is allowed; `reset`: until
    /// the budget is whole again.
    Throttled {
        limit: u32,
        retry_after: Duration,
        reset: Duration,
    },
}

/// Where a route matches: what identifies it from one reload to the next.
/// (Its host, its path or prefix, whether that is one path.)
type RouteId = (HostMatch, String, bool);

/// One route's throttle: its clients' budgets, and the rate they follow.
#[derive(Debug, Clone)]
struct Throttle {
    keyed: Arc<Keyed>,
    rate: Rate,
    /// One request's worth of budget comes back every `interval`.
    interval: Duration,
}

impl Throttle {
    fn new(rate: Rate, max_tracked_clients: usize) -> Self {
        let plain: RateLimiter<_, _, _> = RateLimiter::new(
            quota(rate),
            BoundedStore::new(max_tracked_clients),
            DefaultClock::default(),
        );
        Throttle {
            keyed: Arc::new(plain.with_middleware::<StateInformationMiddleware>()),
            rate,
            interval: interval(rate),
        }
    }
}

#[derive(Debug)]
pub struct Limiter {
    config: RateLimit,
    /// Per route index; `None` where the route does not throttle. Shared
    /// with the limiter of the previous reload for unchanged routes.
    routes: Vec<Option<Throttle>>,
    /// Each route's identity, by route index.
    ids: Vec<RouteId>,
    hasher: RandomState,
    /// Held for its drop: the cleanup task ends with the limiter.
    _cleanup: Option<crate::task::AbortOnDrop>,
}

/// Whether budgets kept under `before` mean the same under `now`: same
/// key and table size (and, route by route, the same rate and burst).
/// `server.trusted_proxies` only decides
/// which address a request is counted under: trusting one more proxy in
/// the middle of a flood leaves every known client's budget as it was (the
/// clients behind the new proxy start their own, as new clients do).
fn same_budgets(now: &RateLimit, before: &RateLimit) -> bool {
    now.key == before.key && now.max_tracked_clients == before.max_tracked_clients
}

/// How often one request's worth of budget comes back.
fn interval(rate: Rate) -> Duration {
    // Validation keeps the rate within one an hour and one a nanosecond.
    Duration::try_from_secs_f64(1.0 / rate.requests_per_second)
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_nanos(1))
}

fn quota(rate: Rate) -> Quota {
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(interval(rate))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl Limiter {
    /// `None` when the config has no `[rate_limit]`.
    pub fn new(config: &Config) -> Option<Arc<Self>> {
        Self::build(config, None)
    }

    /// The limiter for a reloaded `config`, after `previous` (`None`: the
    /// file had no `[rate_limit]`). Under an unchanged
    /// `[rate_limit]`, each throttling route that was there before (same
    /// host and path_prefix, wherever it now sits in the file) at the same
    /// rate keeps its clients' budgets, so editing the routes during a
    /// flood hands no throttled client a fresh burst.
    pub fn rebuild(config: &Config, previous: Option<&Limiter>) -> Option<Arc<Self>> {
        let kept = previous.filter(|p| {
            config
                .rate_limit
                .as_ref()
                .is_some_and(|now| same_budgets(now, &p.config))
        });
        // Said, as a reload that empties the cache is: a throttled client
        // that is let through again otherwise looks like a bug (review36a
        // L4); throttling switched on or off too, by the section or by the
        // routes' own `rate_limit` (review36d L8, review37h L3), and only
        // where a route throttles or did (review37f L6, review37g L6).
        let before = previous.is_some_and(|p| p.routes.iter().any(Option::is_some));
        let now = config.rate_limit.is_some() && config.routes.iter().any(|r| r.rate_limit);
        // A new rate of the section's: the routes without their own start
        // anew, said once here rather than route by route.
        let rate_changed = previous
            .zip(config.rate_limit.as_ref())
            .is_some_and(|(p, now)| p.config.rate() != now.rate());
        match (before, now) {
            (true, true) if kept.is_none() => {
                tracing::info!("[rate_limit] changed: every client's budget starts full")
            }
            // Routes with a rate of their own keep theirs (review41d F3).
            (true, true) if rate_changed => tracing::info!(
                "[rate_limit] rate changed: every client's budget starts full on the routes without a rate of their own"
            ),
            (false, true) => {
                tracing::info!("[rate_limit] added: throttling starts, every client's budget full")
            }
            (true, false) => tracing::info!("[rate_limit] removed: no client is throttled"),
            _ => {}
        }
        Self::build(config, kept)
    }

    fn build(config: &Config, previous: Option<&Limiter>) -> Option<Arc<Self>> {
        let limits = config.rate_limit.clone()?;
        // The previous routes by where they match: one lookup per route,
        // where a scan of the old routes for each new one made a reload
        // of thousands of routes take seconds (review F3). Of two routes
        // matching alike, the first speaks, as in routing.
        let mut kept: HashMap<(&HostMatch, &str, bool), &Option<Throttle>> = HashMap::new();
        for ((host, prefix, exact), limiter) in
            previous.iter().flat_map(|p| p.ids.iter().zip(&p.routes))
        {
            kept.entry((host, prefix.as_str(), *exact))
                .or_insert(limiter);
        }
        // A change of the section's rate is said once, by `rebuild`.
        let section_rate_kept = previous.is_some_and(|p| p.config.rate() == limits.rate());
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let rate = route.rate.unwrap_or_else(|| limits.rate());
                route.rate_limit.then(|| {
                    let before = kept.get(&(&route.host, route.path_prefix.as_str(), route.exact));
                    match before.and_then(|throttle| throttle.as_ref()) {
                        Some(throttle) if throttle.rate == rate => throttle.clone(),
                        Some(_) => {
                            if route.rate.is_some() || section_rate_kept {
                                tracing::info!(route = %route.name, "the route's rate changed: every client's budget on it starts full");
                            }
                            Throttle::new(rate, limits.max_tracked_clients)
                        }
                        None => Throttle::new(rate, limits.max_tracked_clients),
                    }
                })
            })
            .collect();
        let ids = config
            .routes
            .iter()
            .map(|route| (route.host.clone(), route.path_prefix.clone(), route.exact))
            .collect();
        // The cleanup task holds a weak reference, so it is made with the
        // limiter: `Arc::get_mut` after the fact would never succeed while
        // that reference exists.
        Some(Arc::new_cyclic(|weak| Limiter {
            config: limits,
            routes,
            ids,
            // Header keys are hashed: the same hasher finds the same budgets.
            hasher: previous.map_or_else(RandomState::new, |p| p.hasher.clone()),
            _cleanup: tokio::runtime::Handle::try_current()
                .ok()
                .map(|runtime| crate::task::AbortOnDrop::new(runtime.spawn(cleanup(weak.clone())))),
        }))
    }

    /// The key a request is counted under (see [`client::key`]).
    pub fn key(
        &self,
        client: IpAddr,
        headers: &HeaderMap,
    ) -> Result<ClientKey, client::SeveralKeys> {
        client::key(client, headers, &self.config, &self.hasher)
    }

    /// Counts one request of `key` on route `route`; `None` if the route
    /// does not throttle.
    pub fn check(&self, route: usize, key: &ClientKey) -> Option<Decision> {
        let throttle = self.routes.get(route)?.as_ref()?;
        let limit = throttle.rate.burst;
        let interval = throttle.interval;
        Some(match throttle.keyed.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision::Allowed {
                    limit,
                    remaining,
                    reset: interval * limit.saturating_sub(remaining),
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(DefaultClock::default().now());
                Decision::Throttled {
                    limit,
                    retry_after,
                    reset: retry_after + interval * limit.saturating_sub(1),
                }
            }
        })
    }

    /// Client keys currently tracked, over all routes.
    pub fn tracked_keys(&self) -> usize {
        self.routes.iter().flatten().map(|t| t.keyed.len()).sum()
    }

    /// Drops keys whose bucket is full again (idle clients).
    pub fn forget_idle(&self) {
        for throttle in self.routes.iter().flatten() {
            throttle.keyed.retain_recent();
            throttle.keyed.shrink_to_fit();
        }
    }
}

async fn cleanup(limiter: Weak<Limiter>) {
    loop {
        tokio::time::sleep(CLEANUP_EVERY).await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        limiter.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Route;

    fn config(rps: f64, burst: u32, max: usize) -> Config {
        let mut config = Config::single_upstream(vec![], vec!["127.0.0.1:1".parse().unwrap()]);
        config.rate_limit = Some(RateLimit {
            requests_per_second: rps,
            burst,
            max_tracked_clients: max,
            ..RateLimit::default()
        });
        config.routes[0].rate_limit = true;
        config
            .routes
            .push(Route::new(HostMatch::Any, "/free", 0, "free"));
        config
    }

    fn ip(n: u32) -> ClientKey {
        ClientKey::Ip(std::net::IpAddr::V4(n.into()))
    }

    /// 0.5/s, like nginx's `rate=30r/m`: one request every two seconds.
    #[test]
    fn a_rate_below_one_a_second_spaces_requests_out() {
        let limiter = Limiter::new(&config(0.5, 1, 100)).unwrap();
        assert_eq!(
            limiter.check(0, &ip(1)),
            Some(Decision::Allowed {
                limit: 1,
                remaining: 0,
                reset: Duration::from_secs(2),
            })
        );
        match limiter.check(0, &ip(1)) {
            Some(Decision::Throttled { retry_after, .. }) => assert!(
                retry_after > Duration::from_millis(1900) && retry_after <= Duration::from_secs(2),
                "{retry_after:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_burst_is_allowed_then_throttled_with_a_wait() {
        // 1/s so no refill can happen during the test.
        let limiter = Limiter::new(&config(1.0, 5, 100)).unwrap();
        let decisions: Vec<Decision> = (0..7).map(|_| limiter.check(0, &ip(1)).unwrap()).collect();
        let remaining: Vec<u32> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Allowed { remaining, .. } => Some(*remaining),
                _ => None,
            })
            .collect();
        assert_eq!(remaining, [4, 3, 2, 1, 0]);
        // The budget is whole again once every spent request has come back.
        let resets: Vec<Duration> = decisions[..5]
            .iter()
            .map(|d| match d {
                Decision::Allowed { reset, .. } => *reset,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(resets, [1, 2, 3, 4, 5].map(Duration::from_secs));
        match decisions[5] {
            Decision::Throttled {
                limit,
                retry_after,
                reset,
            } => {
                assert_eq!(limit, 5);
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
                assert_eq!(reset, retry_after + Duration::from_secs(4));
            }
            other => panic!("{other:?}"),
        }
        // Another client has its own budget; a route without limits has none.
        assert!(matches!(
            limiter.check(0, &ip(2)),
            Some(Decision::Allowed { remaining: 4, .. })
        ));
        assert_eq!(limiter.check(1, &ip(1)), None);
    }

    #[tokio::test]
    async fn a_reload_keeps_the_budgets_of_the_routes_it_leaves_in_place() {
        let mut before = config(1.0, 2, 100);
        before.rate_limit.as_mut().unwrap().key =
            crate::config::RateLimitKey::Header(http::HeaderName::from_static("x-api-key"));
        let limiter = Limiter::new(&before).unwrap();
        let header_key = |l: &Limiter| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", "k1".parse().unwrap());
            l.key("192.0.2.1".parse().unwrap(), &headers).unwrap()
        };
        let key = header_key(&limiter);
        assert!(matches!(key, ClientKey::Header(_)), "{key:?}");
        for _ in 0..3 {
            limiter.check(0, &ip(1));
        }
        let throttled = |l: &Limiter, route, key: &ClientKey| {
            matches!(l.check(route, key), Some(Decision::Throttled { .. }))
        };
        assert!(throttled(&limiter, 0, &ip(1)));
        // A new throttling route goes first: the old one moves to index 1
        // and keeps its state; the new one starts fresh.
        let mut after = before.clone();
        after.routes.insert(
            0,
            Route {
                path_prefix: "/other/".into(),
                rate_limit: true,
                rate: None,
                name: "other".into(),
                ..after.routes[0].clone()
            },
        );
        let reloaded = Limiter::rebuild(&after, Some(&limiter)).unwrap();
        assert!(throttled(&reloaded, 1, &ip(1)));
        assert!(!throttled(&reloaded, 0, &ip(1)));
        // Keys from a header hash the same way after the reload.
        assert_eq!(header_key(&limiter), header_key(&reloaded));
        // Trusting another proxy changes no budget.
        let mut trusting = after.clone();
        trusting.server.trusted_proxies = vec![crate::config::Cidr {
            addr: "10.0.0.0".parse().unwrap(),
            prefix: 8,
        }];
        let reloaded = Limiter::rebuild(&trusting, Some(&reloaded)).unwrap();
        assert!(throttled(&reloaded, 1, &ip(1)));
        // Changed limits start everyone afresh.
        let mut stricter = after.clone();
        stricter.rate_limit.as_mut().unwrap().burst = 1;
        let reset = Limiter::rebuild(&stricter, Some(&reloaded)).unwrap();
        assert!(!throttled(&reset, 1, &ip(1)));
    }

    /// A route with a rate of its own (nginx's strict `limit_req` zone on
    /// a login page) throttles at it, beside the section's rate on the
    /// others (review41b M2); a reload that changes only its rate starts
    /// its budgets anew and keeps the others'.
    #[tokio::test]
    async fn a_route_with_a_rate_of_its_own_throttles_at_it() {
        let mut config = config(1.0, 3, 100);
        config.routes[1].rate_limit = true;
        config.routes[1].rate = Some(Rate {
            requests_per_second: 0.5,
            burst: 1,
        });
        let limiter = Limiter::new(&config).unwrap();
        let allowed = |l: &Limiter, route| {
            (0..5)
                .take_while(|_| matches!(l.check(route, &ip(1)), Some(Decision::Allowed { .. })))
                .count()
        };
        assert_eq!((allowed(&limiter, 0), allowed(&limiter, 1)), (3, 1));
        match limiter.check(1, &ip(1)) {
            Some(Decision::Throttled {
                limit, retry_after, ..
            }) => {
                assert_eq!(limit, 1);
                assert!(retry_after > Duration::from_secs(1), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        let mut looser = config.clone();
        looser.routes[1].rate = Some(Rate {
            requests_per_second: 0.5,
            burst: 2,
        });
        let reloaded = Limiter::rebuild(&looser, Some(&limiter)).unwrap();
        assert_eq!((allowed(&reloaded, 0), allowed(&reloaded, 1)), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cleanup_task_forgets_idle_clients() {
        let limiter = Limiter::new(&config(1000.0, 1, 100)).unwrap();
        for n in 0..10 {
            limiter.check(0, &ip(n));
        }
        assert_eq!(limiter.tracked_keys(), 10);
        // At 1000/s every bucket is full again after a millisecond of real
        // time (governor's clock); the paused tokio clock then runs the
        // cleanup task's 10 s timer at once.
        std::thread::sleep(Duration::from_millis(20));
        tokio::time::sleep(CLEANUP_EVERY + Duration::from_secs(1)).await;
        assert_eq!(limiter.tracked_keys(), 0);
        // And it stops with the limiter.
        let task = limiter._cleanup.as_ref().map(|t| t.abort_handle()).unwrap();
        drop(limiter);
        tokio::task::yield_now().await;
        assert!(task.is_finished());
    }

    #[test]
    fn the_table_never_grows_past_max_tracked_clients() {
        let limiter = Limiter::new(&config(100.0, 200, 1000)).unwrap();
        for n in 0..200_000 {
            limiter.check(0, &ip(n));
        }
        assert!(limiter.tracked_keys() <= 1000, "{}", limiter.tracked_keys());
        // Tracked clients keep their own state; new ones share the overflow.
        assert!(matches!(
            limiter.check(0, &ip(0)),
            Some(Decision::Allowed { .. })
        ));
    }
}
