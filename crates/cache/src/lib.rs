//! flowline-cache: one cache abstraction for every context.
//!
//! L1 is in-process and bounded (moka: TinyLFU admission, LRU eviction, TTL).
//! Reads are cache-aside through [`Cache::get_or_load`]: concurrent misses for
//! one key run the loader once and share its result (no stampede). Entries carry
//! tags derived from their value, so an event about one product can drop every
//! cached page that contains it ([`Cache::invalidate_tag`]).
//!
//! In distributed mode an L2 in Redis ([`Cache::with_l2`]) is shared by every
//! node: a miss here is often a hit there, so the database sees one load per
//! key per TTL across the cluster. Invalidation stays event-driven: each node
//! drops its own L1 entries on the events it consumes, and every invalidation
//! also bumps the cache's generation in Redis, which every L2 key embeds. A
//! bump makes all older L2 entries unreachable at once, including one written
//! late by a load that began before the change, so L2 can never serve a value
//! older than the last invalidation. (Coarse, but always correct; entries
//! expire by TTL.)

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: String,
}

/// Hit, miss, load and eviction counters, labelled by cache name.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    hits: Family<CacheLabels, Counter>,
    misses: Family<CacheLabels, Counter>,
    loads: Family<CacheLabels, Counter>,
    evictions: Family<CacheLabels, Counter>,
    l2_hits: Family<CacheLabels, Counter>,
}

impl CacheMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flowline_cache_hits",
            "Cache hits by cache",
            self.hits.clone(),
        );
        registry.register(
            "flowline_cache_misses",
            "Cache misses by cache",
            self.misses.clone(),
        );
        registry.register(
            "flowline_cache_loads",
            "Loads run on a miss (concurrent misses share one)",
            self.loads.clone(),
        );
        registry.register(
            "flowline_cache_l2_hits",
            "L1 misses answered by the shared L2 (Redis)",
            self.l2_hits.clone(),
        );
        registry.register(
            "flowline_cache_evictions",
            "Entries evicted for size, by cache",
            self.evictions.clone(),
        );
    }
}

/// Why a load left nothing in the cache.
enum Miss<E, V> {
    Failed(E),
    /// An invalidation ran while loading: the value may predate it.
    Overtaken(V),
}

#[derive(Clone)]
struct Entry<V> {
    value: V,
    tags: Arc<[String]>,
}

/// A Redis connection (reconnects by itself; cheap to clone).
pub use redis::aio::ConnectionManager as RedisConnection;

/// Connects to Redis at `url` (`redis://host:port[/db]`).
pub async fn connect_redis(url: &str) -> redis::RedisResult<RedisConnection> {
    redis::Client::open(url)?.get_connection_manager().await
}

/// The shared second level: Redis, and how to (de)serialize `V`.
struct L2<V> {
    conn: redis::aio::ConnectionManager,
    /// `{prefix}cache:{name}`: generation key, and prefix of entry keys.
    base: String,
    ttl_ms: u64,
    encode: fn(&V) -> Option<String>,
    decode: fn(&str) -> Option<V>,
}

/// Reads the generation and the entry in one round trip.
const L2_GET: &str = r"
local g = redis.call('GET', KEYS[1]) or '0'
return {g, redis.call('GET', KEYS[1] .. ':' .. g .. ':' .. ARGV[1])}
";

impl<V> L2<V> {
    fn gen_key(&self) -> String {
        format!("{}:gen", self.base)
    }

    /// (generation, entry) — an unreachable Redis is a miss, never an error.
    async fn get(&self, key: &str) -> (Option<String>, Option<V>) {
        let mut c = self.conn.clone();
        let r: redis::RedisResult<(String, Option<String>)> = redis::Script::new(L2_GET)
            .key(self.gen_key())
            .arg(key)
            .invoke_async(&mut c)
            .await;
        match r {
            Ok((g, v)) => (Some(g), v.and_then(|v| (self.decode)(&v))),
            Err(e) => {
                tracing::warn!(error = %e, "cache L2 read failed; loading");
                (None, None)
            }
        }
    }

    async fn put(&self, generation: &str, key: &str, value: &V) {
        let Some(v) = (self.encode)(value) else {
            return;
        };
        let mut c = self.conn.clone();
        let k = format!("{}:{generation}:{key}", self.gen_key());
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(k)
            .arg(v)
            .arg("PX")
            .arg(self.ttl_ms)
            .query_async(&mut c)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cache L2 write failed");
        }
    }

    async fn bump(&self) {
        let mut c = self.conn.clone();
        let r: redis::RedisResult<i64> = redis::cmd("INCR")
            .arg(self.gen_key())
            .query_async(&mut c)
            .await;
        if let Err(e) = r {
            // Entries written before this still expire by TTL.
            tracing::error!(error = %e, "cache L2 invalidation failed");
        }
    }
}

/// A named, bounded cache of `V` by string key.
#[derive(Clone)]
pub struct Cache<V: Clone + Send + Sync + 'static> {
    inner: moka::future::Cache<String, Entry<V>>,
    /// Bumped by every invalidation. A load that straddles one may have read
    /// the old data: it answers its caller but is not kept.
    generation: Arc<std::sync::atomic::AtomicU64>,
    tags_of: fn(&V) -> Vec<String>,
    labels: CacheLabels,
    metrics: CacheMetrics,
    l2: Option<Arc<L2<V>>>,
    ttl: Duration,
}

impl<V> Cache<V>
where
    V: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
{
    /// Adds the shared L2 in Redis under `key_prefix`.
    pub fn with_l2(mut self, conn: redis::aio::ConnectionManager, key_prefix: &str) -> Self {
        self.l2 = Some(Arc::new(L2 {
            conn,
            base: format!("{key_prefix}cache:{}", self.labels.cache),
            ttl_ms: self.ttl.as_millis().max(1) as u64,
            encode: |v| serde_json::to_string(v).ok(),
            decode: |s| serde_json::from_str(s).ok(),
        }));
        self
    }
}

impl<V: Clone + Send + Sync + 'static> Cache<V> {
    /// `tags_of` names what an entry depends on (e.g. `product:{id}` for every
    /// product in a search page).
    pub fn new(
        name: &str,
        capacity: u64,
        ttl: Duration,
        tags_of: fn(&V) -> Vec<String>,
        metrics: &CacheMetrics,
    ) -> Self {
        let labels = CacheLabels {
            cache: name.to_owned(),
        };
        let evictions = metrics.evictions.get_or_create(&labels).clone();
        let inner = moka::future::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(ttl)
            .support_invalidation_closures()
            .eviction_listener(move |_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        Cache {
            inner,
            generation: Arc::default(),
            tags_of,
            labels,
            metrics: metrics.clone(),
            l2: None,
            ttl,
        }
    }

    /// The cached value, or `load()`'s. Concurrent callers for one missing key
    /// wait for a single load. A failed load is not cached, nor is one that an
    /// invalidation overtook.
    pub async fn get_or_load<E, F>(&self, key: &str, load: F) -> Result<V, Arc<E>>
    where
        E: Clone + Send + Sync + 'static,
        F: Future<Output = Result<V, E>>,
    {
        use std::sync::atomic::Ordering;
        if let Some(e) = self.inner.get(key).await {
            self.metrics.hits.get_or_create(&self.labels).inc();
            return Ok(e.value);
        }
        self.metrics.misses.get_or_create(&self.labels).inc();
        let loads = self.metrics.loads.get_or_create(&self.labels).clone();
        let tags_of = self.tags_of;
        let generation = self.generation.clone();
        let before = generation.load(Ordering::SeqCst);
        let l2 = self.l2.clone();
        let l2_hits = self.metrics.l2_hits.get_or_create(&self.labels).clone();
        let loaded = self
            .inner
            .try_get_with(key.to_owned(), async move {
                let mut l2_gen = None;
                if let Some(l2) = &l2 {
                    let (g, hit) = l2.get(key).await;
                    if let Some(value) = hit {
                        l2_hits.inc();
                        let tags: Arc<[String]> = tags_of(&value).into();
                        return Ok(Entry { value, tags });
                    }
                    l2_gen = g;
                }
                loads.inc();
                let value = load.await.map_err(Miss::Failed)?;
                if generation.load(Ordering::SeqCst) != before {
                    return Err(Miss::Overtaken(value));
                }
                // Under the generation read before loading: if it moved on
                // meanwhile, this entry is unreachable.
                if let (Some(l2), Some(g)) = (&l2, &l2_gen) {
                    l2.put(g, key, &value).await;
                }
                let tags: Arc<[String]> = tags_of(&value).into();
                Ok(Entry { value, tags })
            })
            .await;
        match loaded {
            Ok(e) => Ok(e.value),
            Err(miss) => match &*miss {
                Miss::Overtaken(v) => Ok(v.clone()),
                Miss::Failed(e) => Err(Arc::new(e.clone())),
            },
        }
    }

    pub async fn invalidate(&self, key: &str) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.bump_l2().await;
        self.inner.invalidate(key).await;
    }

    async fn bump_l2(&self) {
        if let Some(l2) = &self.l2 {
            l2.bump().await;
        }
    }

    /// Drops every entry tagged `tag` (and, with an L2, every L2 entry).
    pub async fn invalidate_tag(&self, tag: &str) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.bump_l2().await;
        let tag = tag.to_owned();
        self.inner
            .invalidate_entries_if(move |_, e| e.tags.contains(&tag))
            .expect("invalidation closures are enabled");
    }

    /// Drops every L1 entry whose key starts with `prefix` (for node-local
    /// caches such as search pages; the L2 is left alone).
    pub fn invalidate_prefix(&self, prefix: &str) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let prefix = prefix.to_owned();
        self.inner
            .invalidate_entries_if(move |k, _| k.starts_with(&prefix))
            .expect("invalidation closures are enabled");
    }

    /// Runs pending maintenance (eviction, invalidation sweeps); tests call it
    /// because moka otherwise does this lazily during cache operations.
    pub async fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks().await;
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[allow(clippy::ptr_arg)] // the cache calls it with `&V`, and V is `Vec<u32>` here
    fn tags(v: &Vec<u32>) -> Vec<String> {
        v.iter().map(|id| format!("item:{id}")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_load_once() {
        let m = CacheMetrics::default();
        let c: Cache<Vec<u32>> = Cache::new("t", 100, Duration::from_secs(60), tags, &m);
        let loads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let c = c.clone();
                let loads = loads.clone();
                tokio::spawn(async move {
                    c.get_or_load::<(), _>("page:1", async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(vec![1, 2, 3])
                    })
                    .await
                    .unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), vec![1, 2, 3]);
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "one load for fifty concurrent misses"
        );
        let labels = CacheLabels { cache: "t".into() };
        assert_eq!(m.loads.get_or_create(&labels).get(), 1);
        assert_eq!(
            m.hits.get_or_create(&labels).get() + m.misses.get_or_create(&labels).get(),
            50
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_overtaken_by_an_invalidation_is_not_kept() {
        let m = CacheMetrics::default();
        let c: Cache<Vec<u32>> = Cache::new("race", 100, Duration::from_secs(60), tags, &m);
        let (read_done, invalidated) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let loader = {
            let (c, read_done, invalidated) = (c.clone(), read_done.clone(), invalidated.clone());
            tokio::spawn(async move {
                c.get_or_load::<(), _>("p:1", async move {
                    let old = vec![1]; // read before the write commits
                    read_done.notify_one();
                    invalidated.notified().await;
                    Ok(old)
                })
                .await
                .unwrap()
            })
        };
        read_done.notified().await;
        c.invalidate_tag("item:1").await; // the write's invalidation, mid-load
        invalidated.notify_one();
        assert_eq!(
            loader.await.unwrap(),
            vec![1],
            "the caller still gets its answer"
        );
        let fresh = c
            .get_or_load::<(), _>("p:1", async { Ok(vec![2]) })
            .await
            .unwrap();
        assert_eq!(fresh, vec![2], "the overtaken value was not kept");
    }

    #[tokio::test]
    async fn tags_prefixes_keys_errors_and_capacity() {
        let m = CacheMetrics::default();
        let c: Cache<Vec<u32>> = Cache::new("t", 1000, Duration::from_secs(60), tags, &m);
        let load = |v: Vec<u32>| async move { Ok::<_, ()>(v) };
        c.get_or_load("search:a", load(vec![1, 2])).await.unwrap();
        c.get_or_load("search:b", load(vec![2, 3])).await.unwrap();
        c.get_or_load("search:c", load(vec![4])).await.unwrap();
        c.get_or_load("product:4", load(vec![4])).await.unwrap();
        c.invalidate_tag("item:2").await;
        // Both pages containing item 2 are gone for readers at once.
        assert_eq!(
            c.get_or_load("search:a", load(vec![9])).await.unwrap(),
            vec![9]
        );
        assert_eq!(
            c.get_or_load("search:b", load(vec![9])).await.unwrap(),
            vec![9]
        );
        assert_eq!(
            c.get_or_load("search:c", load(vec![0])).await.unwrap(),
            vec![4],
            "untagged page kept"
        );
        c.invalidate_prefix("search:");
        assert_eq!(
            c.get_or_load("search:c", load(vec![5])).await.unwrap(),
            vec![5]
        );
        assert_eq!(
            c.get_or_load("product:4", load(vec![0])).await.unwrap(),
            vec![4]
        );
        c.invalidate("product:4").await;
        assert_eq!(
            c.get_or_load("product:4", load(vec![6])).await.unwrap(),
            vec![6]
        );
        // A failed load is not cached.
        assert!(c
            .get_or_load("bad", async { Err::<Vec<u32>, _>("boom") })
            .await
            .is_err());
        assert_eq!(c.get_or_load("bad", load(vec![7])).await.unwrap(), vec![7]);

        let small: Cache<Vec<u32>> = Cache::new("small", 10, Duration::from_secs(60), tags, &m);
        for i in 0..200u32 {
            small
                .get_or_load(&format!("k{i}"), load(vec![i]))
                .await
                .unwrap();
        }
        small.run_pending_tasks().await;
        assert!(
            small.entry_count() <= 10,
            "bounded: {}",
            small.entry_count()
        );
        assert!(
            m.evictions
                .get_or_create(&CacheLabels {
                    cache: "small".into()
                })
                .get()
                > 0
        );
    }
}
