//! Rate limiting: GCRA (the generic cell rate algorithm) behind a trait, so a
//! cluster-wide backend (Redis) can replace the in-process one.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT): a request
//! is allowed if it does not arrive more than `burst` emission intervals before
//! its TAT. It allows bursts up to `burst` and a sustained `rate` with no
//! background refill task.

use prometheus_client::metrics::counter::Counter;
use redis::aio::ConnectionManager;
use redis::Script;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
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

/// The same GCRA as [`MemoryRateLimiter`], in Redis. The clock is Redis's own
/// (TIME), so nodes' clocks do not matter; the TAT is in ms and the key expires
/// when the TAT passes (an absent key is allowed anyway).
/// KEYS[1]: the key. ARGV: emission interval, tolerance (ms, may be fractional).
/// Returns 0 if allowed, else the wait in µs.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = tonumber(ARGV[1])
        local tolerance = tonumber(ARGV[2])
        local clock = redis.call('TIME')
        local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
        local tat = math.max(tonumber(redis.call('GET', KEYS[1])) or now, now)
        local allow_at = tat - tolerance
        if now < allow_at then
            return math.ceil((allow_at - now) * 1000)
        end
        tat = tat + t
        redis.call('SET', KEYS[1], tat, 'PX', math.ceil(tat - now))
        return 0
        ",
    )
});

/// Cluster-wide GCRA: every node sharing the prefix shares each key's quota.
/// Fails open: when Redis cannot answer, the request is allowed (an outage of
/// the limiter must not become an outage of the API) and counted.
pub struct RedisRateLimiter {
    conn: ConnectionManager,
    prefix: String,
    /// Checks allowed because Redis failed.
    pub errors: Counter,
    last_warning: Mutex<Option<Instant>>,
}

impl RedisRateLimiter {
    /// Keys are `{prefix}ratelimit:{key}`.
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        RedisRateLimiter {
            conn,
            prefix: prefix.into(),
            errors: Counter::default(),
            last_warning: Mutex::new(None),
        }
    }

    pub async fn connect(url: &str, prefix: impl Into<String>) -> redis::RedisResult<Self> {
        let conn = ConnectionManager::new(redis::Client::open(url)?).await?;
        Ok(Self::new(conn, prefix))
    }

    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "flowline_rate_limit_redis_errors",
            "Requests allowed without a rate limit check because Redis failed",
            self.errors.clone(),
        );
    }

    async fn try_check(&self, key: &str, quota: Quota) -> redis::RedisResult<Decision> {
        let t = quota.emission_interval();
        let tolerance = t * quota.burst.saturating_sub(1);
        let wait_us: u64 = GCRA
            .key(format!("{}ratelimit:{key}", self.prefix))
            .arg(t.as_secs_f64() * 1000.0)
            .arg(tolerance.as_secs_f64() * 1000.0)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match wait_us {
            0 => Decision::Allowed,
            us => Decision::Limited(Duration::from_micros(us)),
        })
    }
}

impl RateLimiter for RedisRateLimiter {
    fn check<'a>(&'a self, key: &'a str, quota: Quota) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            self.try_check(key, quota).await.unwrap_or_else(|e| {
                self.errors.inc();
                // Once a second at most: an outage would otherwise log every request.
                let mut last = self.last_warning.lock().expect("rate limiter poisoned");
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    *last = Some(Instant::now());
                    tracing::warn!(error = %e, "rate limiter cannot reach Redis; allowing requests");
                }
                Decision::Allowed
            })
        })
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
