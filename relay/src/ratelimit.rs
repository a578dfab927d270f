//! Per-client-address rate limits: one token bucket per address and kind.
//!
//! Each kind (all requests, deposits, bundle fetches) allows `n` per minute
//! on average, in bursts of up to `n`: a bucket holds at most `n` tokens,
//! refills at `n / 60` tokens per second, and every counted request takes
//! one. `n = 0` disables that kind. Addresses are grouped as they are
//! usually allocated: an IPv6 address counts for its /64 (one host or one
//! home network), an IPv4-mapped IPv6 address as the IPv4 address.
//!
//! The state is a map from address to buckets; [`RateLimiter::cleanup`]
//! (run every minute by the server) drops the addresses whose buckets are
//! full again, so the map only holds addresses active in the last minute or
//! so.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What a request is counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Any request.
    Request = 0,
    /// A deposit.
    Deposit = 1,
    /// A bundle fetch (claims a one-time prekey).
    Claim = 2,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The rate limiter of one server.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_minute: [u32; 3],
    buckets: Mutex<HashMap<IpAddr, [Bucket; 3]>>,
}

/// The address that counts for `ip`: IPv4 as is, IPv4-mapped IPv6 as IPv4,
/// other IPv6 addresses by their /64 prefix.
pub(crate) fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl RateLimiter {
    /// A limiter allowing these many requests, deposits and bundle fetches
    /// per minute and address (0: unlimited).
    pub(crate) fn new(requests: u32, deposits: u32, claims: u32) -> Self {
        RateLimiter {
            per_minute: [requests, deposits, claims],
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(bucket: &mut Bucket, per_minute: u32, now: Instant) {
        let capacity = f64::from(per_minute);
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * capacity / 60.0).min(capacity);
        bucket.updated = now;
    }

    /// Takes a token of `kind` for `ip`. `Err` carries how long until the
    /// next token (for `Retry-After`).
    pub(crate) fn check(&self, ip: IpAddr, kind: Kind) -> Result<(), Duration> {
        self.check_at(ip, kind, Instant::now())
    }

    /// [`RateLimiter::check`] at the time `now`.
    fn check_at(&self, ip: IpAddr, kind: Kind, now: Instant) -> Result<(), Duration> {
        let per_minute = self.per_minute[kind as usize];
        if per_minute == 0 {
            return Ok(());
        }
        // The buckets are plain counters: a panic elsewhere while holding
        // the lock cannot leave them inconsistent, so poisoning is ignored.
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let full = |n: u32| Bucket {
            tokens: f64::from(n),
            updated: now,
        };
        let per = self.per_minute;
        let buckets = map
            .entry(bucket_key(ip))
            .or_insert_with(|| [full(per[0]), full(per[1]), full(per[2])]);
        let bucket = &mut buckets[kind as usize];
        Self::refill(bucket, per_minute, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - bucket.tokens;
            Err(Duration::from_secs_f64(
                missing * 60.0 / f64::from(per_minute),
            ))
        }
    }

    /// Forgets the addresses whose buckets are all full again.
    pub(crate) fn cleanup(&self) {
        let now = Instant::now();
        let per = self.per_minute;
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, buckets| {
            buckets.iter_mut().zip(per).any(|(bucket, n)| {
                if n == 0 {
                    return false;
                }
                Self::refill(bucket, n, now);
                bucket.tokens < f64::from(n)
            })
        });
    }

    /// How many addresses are tracked.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn bursts_then_refuses() {
        let limiter = RateLimiter::new(3, 0, 1);
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        for _ in 0..3 {
            assert!(limiter.check(ip, Kind::Request).is_ok());
        }
        let wait = limiter.check(ip, Kind::Request).unwrap_err();
        assert!(wait > Duration::from_secs(10) && wait <= Duration::from_secs(20));
        // Another address and another kind have their own buckets.
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        assert!(limiter.check(other, Kind::Request).is_ok());
        assert!(limiter.check(ip, Kind::Claim).is_ok());
        assert!(limiter.check(ip, Kind::Claim).is_err());
        // Unlimited kind.
        for _ in 0..100 {
            assert!(limiter.check(ip, Kind::Deposit).is_ok());
        }
    }

    /// A bucket of `n` per minute gains a token every `60 / n` seconds
    /// (checked on a clock the test moves, not the real one).
    #[test]
    fn refills_at_n_per_minute() {
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3));
        let start = Instant::now();
        let at = |secs: f64| start + Duration::from_secs_f64(secs);
        for (n, period) in [(60u32, 1.0f64), (3, 20.0), (120, 0.5)] {
            let limiter = RateLimiter::new(n, 0, 0);
            for _ in 0..n {
                assert!(limiter.check_at(ip, Kind::Request, start).is_ok());
            }
            let wait = limiter.check_at(ip, Kind::Request, start).unwrap_err();
            assert!(
                (wait.as_secs_f64() - period).abs() < 1e-6,
                "{n}/min: {wait:?}"
            );
            // Half a period later: half a token, still refused, half the wait.
            let wait = limiter
                .check_at(ip, Kind::Request, at(period / 2.0))
                .unwrap_err();
            assert!(
                (wait.as_secs_f64() - period / 2.0).abs() < 1e-6,
                "{n}/min: {wait:?}"
            );
            // A whole period: one token, one request.
            assert!(limiter.check_at(ip, Kind::Request, at(period)).is_ok());
            assert!(limiter.check_at(ip, Kind::Request, at(period)).is_err());
            // Never more than a full bucket, however long it rested.
            let later = period + 61.0;
            for _ in 0..n {
                assert!(
                    limiter.check_at(ip, Kind::Request, at(later)).is_ok(),
                    "{n}/min after resting"
                );
            }
            assert!(limiter.check_at(ip, Kind::Request, at(later)).is_err());
        }
    }

    #[test]
    fn groups_ipv6_by_prefix_and_cleans_up() {
        let limiter = RateLimiter::new(1, 0, 0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.check(a, Kind::Request).is_ok());
        assert!(limiter.check(b, Kind::Request).is_err());
        assert!(limiter.check(c, Kind::Request).is_ok());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(bucket_key(mapped), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(limiter.tracked(), 2);
        limiter.cleanup();
        assert_eq!(limiter.tracked(), 2, "buckets still draining");
        {
            let mut map = limiter.buckets.lock().unwrap();
            for buckets in map.values_mut() {
                buckets[0].updated = buckets[0]
                    .updated
                    .checked_sub(Duration::from_secs(61))
                    .unwrap();
            }
        }
        limiter.cleanup();
        assert_eq!(limiter.tracked(), 0);
    }
}
