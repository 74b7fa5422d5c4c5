//! Per-client rate limiting (GCRA, `governor`) with bounded memory, and
//! client identification behind trusted proxies.
//!
//! Memory: a periodic sweep drops clients whose state is back to fresh
//! (`retain_recent`) and shrinks the table. If the table still holds more
//! than [`MAX_TRACKED_CLIENTS`] entries (a flood of distinct addresses), it
//! is replaced by an empty one: every client's budget restarts, which is
//! counted in `hndsr_rate_limiter_resets_total` and logged. Memory stays
//! bounded; the limiter is briefly lenient under such a flood, which the
//! admission limit (`MAX_QUEUE_DEPTH`) still caps.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter as Governor};
use ipnet::IpNet;
use parking_lot::RwLock;

use crate::error::Error;
use crate::metrics::Metrics;

/// Most clients tracked at once; about 100 bytes each.
pub const MAX_TRACKED_CLIENTS: usize = 100_000;

/// The per-client limiter.
#[derive(Debug)]
pub struct RateLimiter {
    quota: Quota,
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    max_clients: usize,
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
        let quota = Quota::per_hour(per_hour);
        Self {
            quota,
            limiter: RwLock::new(Arc::new(Governor::keyed(quota))),
            max_clients,
            metrics,
        }
    }

    /// Counts one request of `client`.
    ///
    /// # Errors
    /// [`Error::RateLimited`] with the time until the next allowed request.
    pub fn check(&self, client: IpAddr) -> Result<(), Error> {
        let limiter = Arc::clone(&self.limiter.read());
        let result = limiter.check_key(&key(client));
        if limiter.len() > self.max_clients {
            self.sweep();
        }
        result.map_err(|not_until| Error::RateLimited {
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    /// Drops fully replenished clients; resets the table if still over the cap.
    pub fn sweep(&self) {
        let limiter = Arc::clone(&self.limiter.read());
        limiter.retain_recent();
        limiter.shrink_to_fit();
        let mut len = limiter.len();
        if len > self.max_clients {
            tracing::warn!(
                clients = len,
                cap = self.max_clients,
                "rate limiter table full; resetting it"
            );
            *self.limiter.write() = Arc::new(Governor::keyed(self.quota));
            self.metrics.rate_limiter_resets.inc();
            len = 0;
        }
        self.metrics
            .rate_limiter_clients
            .set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    /// Clients currently tracked.
    #[must_use]
    pub fn len(&self) -> usize {
        self.limiter.read().len()
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

    #[test]
    fn memory_is_bounded() {
        let limiter = RateLimiter::with_capacity(NonZeroU32::MIN, 1000, Metrics::new());
        for i in 0..5000_u32 {
            let _ = limiter.check(IpAddr::from(i.to_be_bytes()));
        }
        assert!(limiter.len() <= 1001, "{} clients tracked", limiter.len());
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let b: IpAddr = "2001:db8::ffff:1".parse().expect("ip");
        assert_eq!(key(a), key(b));
    }
}
