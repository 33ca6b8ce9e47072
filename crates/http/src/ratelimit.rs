//! Rate limiting: GCRA (the generic cell rate algorithm) behind a trait, so a
//! cluster-wide backend (Redis) can replace the in-process one.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT): a request
//! is allowed if it does not arrive more than `burst` emission intervals before
//! its TAT. It allows bursts up to `burst` and a sustained `rate` with no
//! background refill task.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `per_period` requests per `period`, with up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_period: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Quota {
    pub fn per_minute(n: u32, burst: u32) -> Quota {
        Quota {
            per_period: n.max(1),
            period: Duration::from_secs(60),
            burst: burst.max(1),
        }
    }

    fn emission_interval(&self) -> Duration {
        self.period / self.per_period
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Denied; retry after this long.
    Limited(Duration),
}

pub use crate::BoxFuture;

pub trait RateLimiter: Send + Sync + 'static {
    fn check<'a>(&'a self, key: &'a str, quota: Quota) -> BoxFuture<'a, Decision>;
}

/// In-process GCRA. Bounded: when it holds too many keys it drops those whose
/// TAT has passed (they would be allowed anyway).
pub struct MemoryRateLimiter {
    state: Mutex<HashMap<String, Instant>>,
    max_keys: usize,
    epoch: Instant,
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        MemoryRateLimiter {
            state: Mutex::new(HashMap::new()),
            max_keys: 100_000,
            epoch: Instant::now(),
        }
    }
}

impl MemoryRateLimiter {
    pub fn check_at(&self, key: &str, quota: Quota, now: Instant) -> Decision {
        let t = quota.emission_interval();
        let tolerance = t * quota.burst.saturating_sub(1);
        let mut state = self.state.lock().expect("rate limiter poisoned");
        if state.len() >= self.max_keys && !state.contains_key(key) {
            state.retain(|_, tat| *tat > now);
        }
        let tat = state.get(key).copied().unwrap_or(now).max(now);
        let allow_at = tat.checked_sub(tolerance).unwrap_or(self.epoch);
        if now < allow_at {
            return Decision::Limited(allow_at - now);
        }
        state.insert(key.to_owned(), tat + t);
        Decision::Allowed
    }
}

impl RateLimiter for MemoryRateLimiter {
    fn check<'a>(&'a self, key: &'a str, quota: Quota) -> BoxFuture<'a, Decision> {
        let d = self.check_at(key, quota, Instant::now());
        Box::pin(async move { d })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_the_burst_then_the_rate_and_recovers() {
        let rl = MemoryRateLimiter::default();
        let q = Quota {
            per_period: 10,
            period: Duration::from_secs(1),
            burst: 3,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(rl.check_at("k", q, t0), Decision::Allowed);
        }
        let Decision::Limited(wait) = rl.check_at("k", q, t0) else {
            panic!("burst exceeded but allowed")
        };
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert_eq!(
            rl.check_at("other", q, t0),
            Decision::Allowed,
            "keys are independent"
        );
        assert_eq!(
            rl.check_at("k", q, t0 + wait),
            Decision::Allowed,
            "recovers after Retry-After"
        );
        // Sustained: one per 100 ms.
        let mut t = t0 + Duration::from_secs(5);
        let mut allowed = 0;
        for _ in 0..100 {
            if rl.check_at("s", q, t) == Decision::Allowed {
                allowed += 1;
            }
            t += Duration::from_millis(10);
        }
        assert!(
            (10..=14).contains(&allowed),
            "1 s at 10/s plus a burst of 3, got {allowed}"
        );
    }
}
