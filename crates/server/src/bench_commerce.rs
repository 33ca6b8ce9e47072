//! The saga participants under load, through their service APIs (no HTTP):
//! reservations on a few hot products, payments authorized and captured by
//! the sandbox at zero latency, and ledger postings. Each figure is printed
//! next to the disk's fsync ceiling measured in the same run: every one of
//! these operations is at least one durable commit.

use crate::bench::{fsync_ceiling, machine_description, Report};
use crate::config::Settings;
use flowline_http::RequestContext;
use flowline_store::outbox::Relay;
use flowline_store::{Backend, Db};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, serde::Serialize)]
pub struct Phase {
    pub ops: u64,
    pub per_sec: f64,
    pub per_fsync: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Refused operations (e.g. reservations that found no stock).
    pub refused: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct CommerceReport {
    pub machine: String,
    pub backend: String,
    pub durability: String,
    pub concurrency: usize,
    pub hot_products: usize,
    pub fsync_per_sec: f64,
    pub reservations: Phase,
    pub payments: Phase,
    pub ledger_entries: Phase,
    pub ledger_postings_per_sec: f64,
}

impl Report for CommerceReport {
    fn print(&self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(
            o,
            "scenario   saga participants: reservations, payments, ledger postings"
        );
        let _ = writeln!(o, "machine    {}", self.machine);
        let _ = writeln!(
            o,
            "setup      backend={} durability={} concurrency={} hot_products={}",
            self.backend, self.durability, self.concurrency, self.hot_products
        );
        let _ = writeln!(
            o,
            "ceiling    {:.0} fsync/s (4 KiB write + fdatasync, same disk)",
            self.fsync_per_sec
        );
        for (name, p) in [
            ("reserve", &self.reservations),
            ("payments", &self.payments),
            ("ledger", &self.ledger_entries),
        ] {
            let _ = writeln!(
                o,
                "{name:<10} {:.0}/s ({} ok, {} refused) = {:.2} per fsync; p50 {:.2} ms, p99 {:.2} ms",
                p.per_sec, p.ops, p.refused, p.per_fsync, p.p50_ms, p.p99_ms
            );
        }
        let _ = writeln!(
            o,
            "postings   {:.0}/s (3 per entry)",
            self.ledger_postings_per_sec
        );
    }
}

/// Runs `op(i)` from `concurrency` tasks for `duration`; `Ok(true)` counts
/// as done, `Ok(false)` as refused.
async fn drive<F, Fut>(
    concurrency: usize,
    duration: Duration,
    fsync: f64,
    op: F,
) -> anyhow::Result<Phase>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<bool>> + Send,
{
    let op = Arc::new(op);
    let seq = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, seq, refused, latencies) =
                (op.clone(), seq.clone(), refused.clone(), latencies.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while start.elapsed() < duration {
                    let i = seq.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    if op(i).await? {
                        mine.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies.lock().expect("poisoned").extend(mine);
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *latencies.lock().expect("poisoned"));
    l.sort_unstable();
    let pct = |p: f64| {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    let ops = l.len() as u64;
    let per_sec = ops as f64 / elapsed;
    Ok(Phase {
        ops,
        per_sec,
        per_fsync: per_sec / fsync,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        refused: refused.load(Ordering::Relaxed),
    })
}

fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: "bench".into(),
        request_id: flowline_core::id::new_id().to_string(),
    }
}

pub async fn run(
    settings: &Settings,
    dir: &Path,
    duration: Duration,
    concurrency: usize,
    hot: usize,
) -> anyhow::Result<CommerceReport> {
    let fsync = fsync_ceiling(dir, Duration::from_secs(2))?;
    let backend = match settings.backend()? {
        Backend::Postgres {
            url,
            max_connections,
            ..
        } => Backend::Postgres {
            url,
            schema_prefix: format!("bench{}_", flowline_core::id::new_id().simple()),
            max_connections,
        },
        Backend::Sqlite { durability, .. } => Backend::Sqlite {
            dir: dir.to_path_buf(),
            durability,
        },
    };
    let log = settings.open_log(&backend).await?;
    let metrics = flowline_cache::CacheMetrics::default();
    // Relays run as in a server: their commits compete with the measured ones.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut relays = Vec::new();
    let mut relay = |db: &Db| {
        let r = Relay::new(db.clone(), log.clone());
        relays.push(tokio::spawn(r.clone().run(stopped.clone())));
        r
    };

    // Reservations: every task reserves 1 to 2 units of the same few products.
    let db = Db::open(&backend, "inventory").await?;
    let inv =
        Arc::new(flowline_inventory::Inventory::open(db.clone(), relay(&db), &metrics).await?);
    let products: Arc<Vec<String>> =
        Arc::new((0..hot.max(1)).map(|i| format!("hot-{i}")).collect());
    for p in products.iter() {
        let set = flowline_inventory::SetStock {
            on_hand: 1_000_000_000,
            warehouse: None,
            reason: None,
        };
        inv.set_stock(&ctx(), p, set)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.0.code))?;
    }
    let (i2, p2) = (inv.clone(), products.clone());
    let reservations = drive(concurrency, duration, fsync, move |i| {
        let (inv, products) = (i2.clone(), p2.clone());
        async move {
            let n = products.len() as u64;
            let mut items = vec![flowline_inventory::ReserveItem {
                product_id: products[(i % n) as usize].clone(),
                quantity: 1,
                warehouse: None,
            }];
            if n > 1 && i % 2 == 0 {
                items.push(flowline_inventory::ReserveItem {
                    product_id: products[((i + 1) % n) as usize].clone(),
                    quantity: 2,
                    warehouse: None,
                });
            }
            let req = flowline_inventory::ReserveRequest {
                order_id: format!("bench-{i}"),
                items,
                ttl_minutes: None,
                ttl_seconds: None,
            };
            match inv.reserve(&ctx(), req).await {
                Ok(_) => Ok(true),
                Err(e) if e.0.code == "insufficient_stock" => Ok(false),
                Err(e) => anyhow::bail!("reserve: {} {:?}", e.0.code, e.0.detail),
            }
        }
    })
    .await?;

    // Payments: UPI through the sandbox at zero latency, authorize + capture.
    // Fraud rules run, with the velocity limits lifted (one payer here pays thousands of times).
    let db = Db::open(&backend, "payments").await?;
    let mut cfg = settings.payments_config();
    cfg.fraud.max_per_user = i64::MAX;
    cfg.fraud.max_per_card = i64::MAX;
    let sandbox = Arc::new(flowline_payments::provider::Sandbox::new(
        db.clone(),
        Duration::ZERO,
    ));
    let pay =
        Arc::new(flowline_payments::Payments::open(db.clone(), relay(&db), sandbox, cfg).await?);
    let p2 = pay.clone();
    let payments = drive(concurrency, duration, fsync, move |i| {
        let pay = p2.clone();
        async move {
            let req: flowline_payments::NewPayment = serde_json::from_value(serde_json::json!({
                "order_id": format!("bench-{i}"), "amount": 29990, "currency": "BRL", "method": "upi",
                "vpa": "success@razorpay", "tax_amount": 2990,
            }))?;
            let p = pay
                .create(&ctx(), &format!("user-{}", i % 1000), &format!("key-{i}"), req)
                .await
                .map_err(|e| anyhow::anyhow!("pay: {}", e.0.code))?;
            Ok(p.status == flowline_payments::Status::Captured)
        }
    })
    .await?;

    // Ledger: balanced three-posting entries (a capture with tax).
    let db = Db::open(&backend, "ledger").await?;
    let ledger = Arc::new(flowline_ledger::Ledger::open(db.clone(), relay(&db)).await?);
    let l2 = ledger.clone();
    let entries = drive(concurrency, duration, fsync, move |i| {
        let ledger = l2.clone();
        async move {
            let entry: flowline_ledger::NewEntry = serde_json::from_value(serde_json::json!({
                "reference": format!("bench-{i}"), "description": "capture",
                "postings": [
                    { "account": "provider_clearing", "direction": "debit", "amount": 29990, "currency": "BRL" },
                    { "account": "merchant_revenue", "direction": "credit", "amount": 27000, "currency": "BRL" },
                    { "account": "tax_payable", "direction": "credit", "amount": 2990, "currency": "BRL" },
                ],
            }))?;
            ledger
                .post(&ctx(), entry)
                .await
                .map_err(|e| anyhow::anyhow!("post: {}", e.0.code))?;
            Ok(true)
        }
    })
    .await?;
    let report = ledger.verify().await?;
    anyhow::ensure!(report.is_ok(), "the ledger does not verify after the run");
    let _ = stop.send(true);
    for r in relays {
        let _ = r.await;
    }
    log.db().close().await;

    Ok(CommerceReport {
        machine: machine_description(),
        backend: backend.name().to_owned(),
        durability: format!("{:?}", settings.database.durability).to_lowercase(),
        concurrency,
        hot_products: hot,
        fsync_per_sec: fsync,
        ledger_postings_per_sec: entries.per_sec * 3.0,
        reservations,
        payments,
        ledger_entries: entries,
    })
}
