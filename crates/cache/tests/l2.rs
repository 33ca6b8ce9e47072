//! The shared L2 on a real Redis (`FLOWLINE_TEST_REDIS_URL`): several caches
//! stand for several nodes. Each test works under its own key prefix.

use flowline_cache::{connect_redis, Cache, CacheMetrics, RedisConnection};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn redis() -> Option<RedisConnection> {
    let url = std::env::var("FLOWLINE_TEST_REDIS_URL").ok()?;
    // Set but unreachable is a failure, not a skip.
    Some(
        connect_redis(&url)
            .await
            .expect("FLOWLINE_TEST_REDIS_URL unreachable"),
    )
}

#[allow(clippy::ptr_arg)] // the cache calls it with `&V`, and V is `String` here
fn tags(v: &String) -> Vec<String> {
    vec![format!("product:{}", v.split('@').next().unwrap_or(""))]
}

/// One "node": its own L1, the shared L2.
fn node(conn: &RedisConnection, prefix: &str, m: &CacheMetrics) -> Cache<String> {
    Cache::new("products", 100, Duration::from_secs(60), tags, m).with_l2(conn.clone(), prefix)
}

async fn read(c: &Cache<String>, key: &str, db: &str, loads: &AtomicUsize) -> String {
    let v = db.to_owned();
    c.get_or_load::<(), _>(key, async move {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok(v)
    })
    .await
    .unwrap()
}

async fn cleanup(conn: &RedisConnection, prefix: &str) {
    let mut c = conn.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_value_loaded_on_one_node_is_served_to_the_others_until_invalidated() {
    let Some(conn) = redis().await else {
        eprintln!("FLOWLINE_TEST_REDIS_URL not set: L2 tests need Redis");
        return;
    };
    let prefix = format!("t{}:", uuid::Uuid::now_v7().simple());
    let m = CacheMetrics::default();
    let (a, b, c) = (
        node(&conn, &prefix, &m),
        node(&conn, &prefix, &m),
        node(&conn, &prefix, &m),
    );
    let loads = AtomicUsize::new(0);

    assert_eq!(read(&a, "p1", "p1@v1", &loads).await, "p1@v1");
    assert_eq!(
        read(&b, "p1", "never read", &loads).await,
        "p1@v1",
        "B is served from L2"
    );
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one database load for two nodes"
    );

    // The product changes: every node drops its L1 on the event; the first
    // invalidation already makes L2 miss for everyone.
    a.invalidate_tag("product:p1").await;
    b.invalidate_tag("product:p1").await;
    assert_eq!(
        read(&b, "p1", "p1@v2", &loads).await,
        "p1@v2",
        "no stale L2 read"
    );
    assert_eq!(
        read(&c, "p1", "never read", &loads).await,
        "p1@v2",
        "C gets B's fresh load"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2);

    // An entry expires with the cache's TTL in Redis too.
    let mut r = conn.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}cache:products:gen:*"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut r)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{k}: {ttl}");
    }
    cleanup(&conn, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_straddles_an_invalidation_elsewhere_never_reaches_l2_readers() {
    let Some(conn) = redis().await else {
        eprintln!("FLOWLINE_TEST_REDIS_URL not set: L2 tests need Redis");
        return;
    };
    let prefix = format!("t{}:", uuid::Uuid::now_v7().simple());
    let m = CacheMetrics::default();
    let (a, b, c) = (
        node(&conn, &prefix, &m),
        node(&conn, &prefix, &m),
        node(&conn, &prefix, &m),
    );
    let (read_done, invalidated) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    // A reads the old row, then stalls; meanwhile B's write invalidates.
    let slow = {
        let (a, read_done, invalidated) = (a.clone(), read_done.clone(), invalidated.clone());
        tokio::spawn(async move {
            a.get_or_load::<(), _>("p1", async move {
                read_done.notify_one();
                invalidated.notified().await;
                Ok("p1@old".to_owned())
            })
            .await
            .unwrap()
        })
    };
    read_done.notified().await;
    b.invalidate_tag("product:p1").await;
    invalidated.notify_one();
    assert_eq!(slow.await.unwrap(), "p1@old", "A's caller gets its answer");
    let loads = AtomicUsize::new(0);
    assert_eq!(
        read(&c, "p1", "p1@new", &loads).await,
        "p1@new",
        "the late write went under the old generation"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    cleanup(&conn, &prefix).await;
}
