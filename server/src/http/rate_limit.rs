//! Per-client rate limiting (GCRA) with bounded memory, and client
//! identification behind trusted proxies.
//!
//! Each client's state is one instant, its GCRA "theoretical arrival time",
//! kept in an LRU table of at most [`MAX_TRACKED_CLIENTS`] entries. When the
//! table is full, a new client takes the place of the least recently seen
//! one (counted in `hndsr_rate_limiter_evictions_total`): only that client's
//! budget starts afresh, and a client that keeps sending is never the one
//! forgotten. A flood of distinct addresses therefore cannot reset the
//! limit of the clients that are actually active. A periodic sweep drops
//! clients whose budget is whole again (forgetting them changes nothing).
//!
//! The limit is per pod: behind a Service with N replicas a client gets up
//! to N× `RATE_LIMIT_PER_HOUR` (docs/server.md says how to get a global
//! limit). Hand-written GCRA over the `lru` crate: `governor`'s keyed
//! limiter cannot evict by recency, only reset or retain by state.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use ipnet::IpNet;
use lru::LruCache;
use parking_lot::Mutex;

use crate::error::Error;
use crate::metrics::Metrics;

/// Most clients tracked at once; about 60 bytes each.
pub const MAX_TRACKED_CLIENTS: usize = 100_000;

/// The per-client limiter.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time between two requests at the sustained rate.
    interval: Duration,
    /// How far ahead of now a client's arrival time may run: the burst.
    tolerance: Duration,
    clients: Mutex<LruCache<IpAddr, Instant>>,
    metrics: Metrics,
}

impl RateLimiter {
    /// `per_hour` requests per client per hour, in a burst of up to `per_hour`.
    #[must_use]
    pub fn new(per_hour: NonZeroU32, metrics: Metrics) -> Self {
        Self::with_capacity(per_hour, MAX_TRACKED_CLIENTS, metrics)
    }

    /// As [`RateLimiter::new`] with a custom client cap (tests).
    #[must_use]
    pub fn with_capacity(per_hour: NonZeroU32, max_clients: usize, metrics: Metrics) -> Self {
        let interval = Duration::from_secs(3600) / per_hour.get();
        let cap = std::num::NonZeroUsize::new(max_clients).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            interval,
            tolerance: interval * (per_hour.get() - 1),
            clients: Mutex::new(LruCache::new(cap)),
            metrics,
        }
    }

    /// Counts one request of `client`.
    ///
    /// # Errors
    /// [`Error::RateLimited`] with the time until the next allowed request.
    pub fn check(&self, client: IpAddr) -> Result<(), Error> {
        self.check_at(client, Instant::now())
    }

    fn check_at(&self, client: IpAddr, now: Instant) -> Result<(), Error> {
        let key = key(client);
        let mut clients = self.clients.lock();
        let tat = clients.get(&key).copied().map_or(now, |t| t.max(now));
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Err(Error::RateLimited {
                retry_after: ahead - self.tolerance,
            });
        }
        if let Some((evicted, _)) = clients.push(key, tat + self.interval)
            && evicted != key
        {
            self.metrics.rate_limiter_evictions.inc();
        }
        drop(clients);
        Ok(())
    }

    /// Drops the clients whose budget is whole again and reports the size.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let mut clients = self.clients.lock();
        let idle: Vec<IpAddr> = clients
            .iter()
            .filter(|(_, tat)| **tat <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            clients.pop(&k);
        }
        let len = clients.len();
        drop(clients);
        self.metrics
            .rate_limiter_clients
            .set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    /// Clients currently tracked.
    #[must_use]
    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }

    /// Whether no client is tracked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The limiter key: IPv4 addresses as they are, IPv6 by /64 (one
/// subscriber usually holds a whole /64 and could rotate within it).
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1_u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The client address: the TCP peer, unless the peer is a trusted proxy, in
/// which case X-Forwarded-For is walked from the right and the first hop
/// that is not a trusted proxy is the client.
#[must_use]
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip));
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            // A malformed hop: trust nothing to its left.
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().expect("header"));
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let h = headers("203.0.113.9, 10.1.2.3");
        let from_proxy = client_ip("10.9.9.9".parse().expect("ip"), &h, &trusted);
        assert_eq!(from_proxy, "203.0.113.9".parse::<IpAddr>().expect("ip"));
        let direct = client_ip("198.51.100.7".parse().expect("ip"), &h, &trusted);
        assert_eq!(direct, "198.51.100.7".parse::<IpAddr>().expect("ip"));
        // A spoofed left-most entry does not win over an untrusted hop.
        let h = headers("1.1.1.1, 203.0.113.9");
        let ip = client_ip("10.9.9.9".parse().expect("ip"), &h, &trusted);
        assert_eq!(ip, "203.0.113.9".parse::<IpAddr>().expect("ip"));
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(i.to_be_bytes())
    }

    #[test]
    fn memory_is_bounded() {
        let metrics = Metrics::new();
        let limiter = RateLimiter::with_capacity(NonZeroU32::MIN, 1000, metrics.clone());
        for i in 0..5000_u32 {
            let _ = limiter.check(ip(i));
        }
        assert_eq!(limiter.len(), 1000);
        assert_eq!(metrics.rate_limiter_evictions.get(), 4000);
    }

    #[test]
    fn the_budget_is_a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(NonZeroU32::new(3).unwrap(), Metrics::new());
        let now = Instant::now();
        let a = ip(1);
        for _ in 0..3 {
            limiter.check_at(a, now).expect("within the burst");
        }
        let Err(Error::RateLimited { retry_after }) = limiter.check_at(a, now) else {
            panic!("the fourth is over")
        };
        assert_eq!(retry_after, Duration::from_secs(1200));
        limiter
            .check_at(ip(2), now)
            .expect("another client has its own budget");
        limiter
            .check_at(a, now + Duration::from_secs(1200))
            .expect("one more after an interval");
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_seen_not_everyone() {
        let metrics = Metrics::new();
        let limiter = RateLimiter::with_capacity(NonZeroU32::MIN, 10, metrics.clone());
        let heavy = ip(u32::MAX);
        limiter.check(heavy).expect("first request");
        // A flood of new addresses, ten times the table, while the heavy
        // client keeps trying: it stays limited throughout.
        for i in 0..100 {
            let _ = limiter.check(ip(i));
            assert!(
                limiter.check(heavy).is_err(),
                "the active client's budget was reset after {i} new clients"
            );
        }
        assert!(metrics.rate_limiter_evictions.get() >= 90);
    }

    #[test]
    fn the_sweep_drops_only_replenished_clients() {
        let limiter = RateLimiter::new(NonZeroU32::new(60).unwrap(), Metrics::new());
        let now = Instant::now();
        limiter.check_at(ip(1), now).unwrap();
        for _ in 0..30 {
            limiter.check_at(ip(2), now).unwrap();
        }
        // One minute on: client 1's single request is paid back, client
        // 2's thirty are not.
        limiter.sweep_at(now + Duration::from_secs(61));
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let b: IpAddr = "2001:db8::ffff:1".parse().expect("ip");
        assert_eq!(key(a), key(b));
    }
}
