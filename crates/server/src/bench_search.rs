//! `flowline bench search`: the search index next to SQLite FTS5 on the same
//! generated catalog, the same mixed queries and the same filters, in one run.

use crate::config::Settings;
use flowline_search::{SearchIndex, SearchQuery, Sort};
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::Row;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub struct SearchReport {
    pub machine: String,
    pub products: u64,
    pub queries: usize,
    pub index_docs_per_sec: f64,
    pub fts5_docs_per_sec: f64,
    pub index_p50_ms: f64,
    pub index_p99_ms: f64,
    pub fts5_p50_ms: f64,
    pub fts5_p99_ms: f64,
    pub index_qps: f64,
    pub fts5_qps: f64,
    pub qps_ratio: f64,
}

impl crate::bench::Report for SearchReport {
    fn print(&self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(
            o,
            "scenario   product search, {} generated products, {} mixed queries",
            self.products, self.queries
        );
        let _ = writeln!(o, "machine    {}", self.machine);
        let _ = writeln!(
            o,
            "indexing   flowline {:.0} docs/s | FTS5 {:.0} docs/s",
            self.index_docs_per_sec, self.fts5_docs_per_sec
        );
        let _ = writeln!(
            o,
            "latency    flowline p50 {:.2} ms, p99 {:.2} ms | FTS5 p50 {:.2} ms, p99 {:.2} ms (one query at a time)",
            self.index_p50_ms, self.index_p99_ms, self.fts5_p50_ms, self.fts5_p99_ms
        );
        let _ = writeln!(
            o,
            "throughput flowline {:.0} qps | FTS5 {:.0} qps (2 threads) = {:.1}x",
            self.index_qps, self.fts5_qps, self.qps_ratio
        );
    }
}

/// One page as a user asks for it: words, maybe a category, a price range, stock.
#[derive(Clone)]
struct Q {
    words: Vec<String>,
    category: Option<String>,
    price: Option<(i64, i64)>,
    in_stock: Option<bool>,
}

fn query_set(n: usize, catalog: &[flowline_catalog::NewProduct]) -> Vec<Q> {
    // Words drawn from the catalog itself, as users type them.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    (0..n)
        .map(|_| {
            let p = &catalog[(next() % catalog.len() as u64) as usize];
            let title: Vec<&str> = p.title.split_whitespace().collect();
            let mut words = vec![title[(next() % title.len() as u64) as usize].to_lowercase()];
            if next() % 3 == 0 {
                words.push(title[title.len() - 1].to_lowercase());
            }
            words.retain(|w| w.chars().all(char::is_alphanumeric));
            if words.is_empty() {
                words.push("classic".into());
            }
            words.dedup();
            Q {
                words,
                category: (next() % 3 == 0).then(|| p.category.clone()),
                price: (next() % 4 == 0).then(|| (p.price.amount / 2, p.price.amount * 2)),
                in_stock: (next() % 4 == 0).then_some(true),
            }
        })
        .collect()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn run(
    _settings: &Settings,
    dir: &Path,
    products: u64,
    queries: usize,
    d: Duration,
) -> anyhow::Result<SearchReport> {
    let catalog: Vec<flowline_catalog::NewProduct> = (0..products)
        .map(|i| flowline_catalog::seed::product(42, i))
        .collect();
    let docs: Vec<serde_json::Value> = catalog
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({
                "id": format!("p{i:08}"), "sku": p.sku, "title": p.title, "description": p.description,
                "price": p.price, "category": p.category, "brand": p.brand, "attributes": p.attributes,
                "in_stock": p.in_stock, "popularity_score": p.popularity_score, "created_at": "2026-11-21T00:00:00Z",
            })
        })
        .collect();
    let mut err = std::io::stderr().lock();

    // The index.
    let (index, _) = SearchIndex::open(&dir.join("index"), Box::new(|| {}))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    for (i, doc) in docs.iter().enumerate() {
        index.upsert(doc).map_err(|e| anyhow::anyhow!("{e}"))?;
        if i % 20_000 == 0 {
            let _ = write!(err, "\rindexing {i}/{products}");
        }
    }
    index.commit().map_err(|e| anyhow::anyhow!("{e}"))?;
    let index_rate = products as f64 / t.elapsed().as_secs_f64();

    // FTS5, as a user would set it up: a table and a bm25-ranked full-text index.
    let opts = SqliteConnectOptions::new()
        .filename(dir.join("fts.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await?;
    sqlx::raw_sql(
        "CREATE VIRTUAL TABLE fts USING fts5(title, description, category UNINDEXED, brand UNINDEXED,
            price UNINDEXED, in_stock UNINDEXED, popularity UNINDEXED)",
    )
    .execute(&pool)
    .await
    .map_err(|e| anyhow::anyhow!("SQLite FTS5 unavailable: {e}"))?;
    let t = Instant::now();
    for (n, chunk) in catalog.chunks(1000).enumerate() {
        let mut tx = pool.begin().await?;
        for p in chunk {
            sqlx::query("INSERT INTO fts (title, description, category, brand, price, in_stock, popularity) VALUES (?, ?, ?, ?, ?, ?, ?)")
                .bind(&p.title)
                .bind(&p.description)
                .bind(&p.category)
                .bind(&p.brand)
                .bind(p.price.amount)
                .bind(i64::from(p.in_stock))
                .bind(p.popularity_score)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let _ = write!(err, "\rFTS5 loading {}/{products}", (n + 1) * 1000);
    }
    let fts_rate = products as f64 / t.elapsed().as_secs_f64();
    let _ = writeln!(err);

    let qs = query_set(queries, &catalog);
    let index = Arc::new(index);
    let to_sq = |q: &Q| SearchQuery {
        q: q.words.join(" "),
        category: q.category.clone(),
        price_min: q.price.map(|p| p.0),
        price_max: q.price.map(|p| p.1),
        in_stock: q.in_stock,
        sort: Some(Sort::Relevance),
        page: 1,
        per_page: 20,
        ..Default::default()
    };

    // One page in FTS5: top 20 by bm25 (title weighted 2), total, category and brand counts.
    async fn fts_page(pool: &sqlx::SqlitePool, q: &Q) -> anyhow::Result<usize> {
        let matcher = q
            .words
            .iter()
            .map(|w| format!("\"{w}\""))
            .collect::<Vec<_>>()
            .join(" AND ");
        let bind = |sql: &'static str| {
            sqlx::query(sql)
                .bind(matcher.clone())
                .bind(q.category.clone().unwrap_or_default())
                .bind(q.price.map_or(-1, |p| p.0))
                .bind(q.price.map_or(-1, |p| p.1))
                .bind(q.in_stock.map_or(-1, i64::from))
        };
        let hits = bind(
            "SELECT rowid, highlight(fts, 0, '<b>', '</b>') FROM fts WHERE fts MATCH $1
               AND ($2 = '' OR category = $2) AND ($3 < 0 OR (price >= $3 AND price <= $4)) AND ($5 < 0 OR in_stock = $5)
             ORDER BY bm25(fts, 2.0, 1.0) LIMIT 20",
        )
        .fetch_all(pool)
        .await?;
        let total: i64 = bind(
            "SELECT count(*) FROM fts WHERE fts MATCH $1
               AND ($2 = '' OR category = $2) AND ($3 < 0 OR (price >= $3 AND price <= $4)) AND ($5 < 0 OR in_stock = $5)",
        )
        .fetch_one(pool)
        .await?
        .get(0);
        for col in ["category", "brand"] {
            let sql: &'static str = if col == "category" {
                "SELECT category, count(*) FROM fts WHERE fts MATCH $1
                   AND ($2 = '' OR category = $2) AND ($3 < 0 OR (price >= $3 AND price <= $4)) AND ($5 < 0 OR in_stock = $5)
                 GROUP BY category"
            } else {
                "SELECT brand, count(*) FROM fts WHERE fts MATCH $1
                   AND ($2 = '' OR category = $2) AND ($3 < 0 OR (price >= $3 AND price <= $4)) AND ($5 < 0 OR in_stock = $5)
                 GROUP BY brand"
            };
            bind(sql).fetch_all(pool).await?;
        }
        anyhow::ensure!(
            hits.len() as i64 <= total,
            "FTS5 page larger than its count"
        );
        Ok(hits.len())
    }

    // Latency, one query at a time (after one warm pass each).
    let (mut li, mut lf) = (Vec::new(), Vec::new());
    for q in &qs {
        let idx = index.clone();
        let sq = to_sq(q);
        tokio::task::spawn_blocking(move || idx.search(&sq))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        fts_page(&pool, q).await?;
    }
    for q in &qs {
        let idx = index.clone();
        let sq = to_sq(q);
        let t = Instant::now();
        tokio::task::spawn_blocking(move || idx.search(&sq))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        li.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        fts_page(&pool, q).await?;
        lf.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // Throughput: two workers cycling through the set for `d` each.
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (idx, qs, done) = (
                index.clone(),
                qs.iter().map(to_sq).collect::<Vec<_>>(),
                done.clone(),
            );
            std::thread::spawn(move || {
                let mut i = w;
                while start.elapsed() < d {
                    let _ = idx.search(&qs[i % qs.len()]);
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 2;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let index_qps = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..2 {
        let (pool, qs, done) = (pool.clone(), qs.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while start.elapsed() < d {
                let _ = fts_page(&pool, &qs[i % qs.len()]).await;
                done.fetch_add(1, Ordering::Relaxed);
                i += 2;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let fts_qps = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    Ok(SearchReport {
        machine: crate::bench::machine_description(),
        products,
        queries,
        index_docs_per_sec: index_rate,
        fts5_docs_per_sec: fts_rate,
        index_p50_ms: percentile(&mut li.clone(), 0.5),
        index_p99_ms: percentile(&mut li, 0.99),
        fts5_p50_ms: percentile(&mut lf.clone(), 0.5),
        fts5_p99_ms: percentile(&mut lf, 0.99),
        index_qps,
        fts5_qps: fts_qps,
        qps_ratio: index_qps / fts_qps,
    })
}
