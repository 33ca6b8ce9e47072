//! The Redis rate limiter against a real Redis (FLOWLINE_TEST_REDIS_URL; set
//! but unreachable fails the test), checked against the in-process one.

use flowline_http::ratelimit::{Decision, MemoryRateLimiter, Quota, RateLimiter, RedisRateLimiter};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connected limiter under a fresh prefix, or None when no Redis is configured.
async fn limiter(prefix: &str) -> Option<RedisRateLimiter> {
    let url = std::env::var("FLOWLINE_TEST_REDIS_URL").ok()?;
    let rl = RedisRateLimiter::connect(&url, prefix)
        .await
        .unwrap_or_else(|e| panic!("FLOWLINE_TEST_REDIS_URL is set but Redis is unreachable: {e}"));
    Some(rl)
}

fn prefix() -> String {
    format!("t-{}:", flowline_core::id::new_id().simple())
}

async fn conn() -> ConnectionManager {
    let url = std::env::var("FLOWLINE_TEST_REDIS_URL").unwrap();
    ConnectionManager::new(redis::Client::open(url).unwrap())
        .await
        .unwrap()
}

async fn pttl(key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut conn().await)
        .await
        .unwrap()
}

async fn cleanup(prefix: &str) {
    let mut c = conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn redis_decides_a_burst_like_memory() {
    let p = prefix();
    let Some(redis) = limiter(&p).await else {
        eprintln!("FLOWLINE_TEST_REDIS_URL not set; skipped");
        return;
    };
    let memory = MemoryRateLimiter::default();
    let q = Quota::per_minute(6, 5); // one every 10 s, bursts of 5
    let t0 = Instant::now();
    for i in 0..8 {
        let m = memory.check_at("k", q, t0);
        let r = redis.check("k", q).await;
        match (m, r) {
            (Decision::Allowed, Decision::Allowed) => assert!(i < 5),
            (Decision::Limited(m), Decision::Limited(r)) => {
                assert!(i >= 5);
                // Same wait, less the time this test has taken.
                assert!(r <= m && m - r < Duration::from_secs(1), "{m:?} vs {r:?}");
            }
            _ => panic!("request {i}: memory {m:?}, redis {r:?}"),
        }
    }
    cleanup(&p).await;
}

#[tokio::test]
async fn redis_recovers_after_retry_after() {
    let p = prefix();
    let Some(rl) = limiter(&p).await else {
        eprintln!("FLOWLINE_TEST_REDIS_URL not set; skipped");
        return;
    };
    let q = Quota {
        per_period: 10,
        period: Duration::from_secs(1),
        burst: 3,
    };
    for _ in 0..3 {
        assert_eq!(rl.check("k", q).await, Decision::Allowed);
    }
    let Decision::Limited(wait) = rl.check("k", q).await else {
        panic!("burst exceeded but allowed");
    };
    let interval = Duration::from_millis(100);
    assert!(
        wait > Duration::ZERO && wait <= interval * q.burst,
        "{wait:?}"
    );
    assert_eq!(
        rl.check("other", q).await,
        Decision::Allowed,
        "keys are independent"
    );
    tokio::time::sleep(wait + Duration::from_millis(5)).await;
    assert_eq!(rl.check("k", q).await, Decision::Allowed, "recovers");
    cleanup(&p).await;
}

/// Two nodes, one quota: 100 concurrent checks split across both allow exactly
/// the burst, and every refusal names a wait within the quota's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_two_nodes_share_one_quota() {
    let p = prefix();
    let (Some(a), Some(b)) = (limiter(&p).await, limiter(&p).await) else {
        eprintln!("FLOWLINE_TEST_REDIS_URL not set; skipped");
        return;
    };
    let nodes = [Arc::new(a), Arc::new(b)];
    let q = Quota::per_minute(1, 20);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let node = nodes[i % 2].clone();
            tokio::spawn(async move { node.check("user:42", q).await })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Decision::Allowed => allowed += 1,
            Decision::Limited(wait) => assert!(
                wait > Duration::ZERO && wait <= Duration::from_secs(60) * q.burst,
                "{wait:?}"
            ),
        }
    }
    assert_eq!(allowed, 20);
    assert_eq!(nodes.iter().map(|n| n.errors.get()).sum::<u64>(), 0);
    cleanup(&p).await;
}

#[tokio::test]
async fn redis_keys_expire_when_idle() {
    let p = prefix();
    let Some(rl) = limiter(&p).await else {
        eprintln!("FLOWLINE_TEST_REDIS_URL not set; skipped");
        return;
    };
    let q = Quota {
        per_period: 10,
        period: Duration::from_secs(1),
        burst: 2,
    };
    let key = format!("{p}ratelimit:idle");
    assert_eq!(rl.check("idle", q).await, Decision::Allowed);
    let ttl = pttl(&key).await;
    assert!(ttl > 0 && ttl <= 100, "lives until its TAT: {ttl} ms");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(pttl(&key).await, -2, "gone");
    cleanup(&p).await;
}

/// No Redis behind the limiter: every request is allowed, and counted.
#[tokio::test]
async fn redis_down_fails_open_and_counts() {
    // Port 1: nothing listens there. Lazy: the failure comes with the checks.
    let client = redis::Client::open("redis://127.0.0.1:1").unwrap();
    let config = ConnectionManagerConfig::new().set_number_of_retries(0);
    let conn = ConnectionManager::new_lazy_with_config(client, config).unwrap();
    let rl = RedisRateLimiter::new(conn, "down:");
    let q = Quota::per_minute(1, 1);
    for _ in 0..3 {
        assert_eq!(rl.check("k", q).await, Decision::Allowed);
    }
    assert_eq!(rl.errors.get(), 3);
    let mut registry = prometheus_client::registry::Registry::default();
    rl.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("flowline_rate_limit_redis_errors_total 3"),
        "{text}"
    );
}
