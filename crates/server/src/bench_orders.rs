//! Orders end to end: `POST /api/v1/orders` over HTTP on the whole app (every
//! context, relay and consumer running, as `flowline serve`), each order's
//! saga reserving, charging (sandbox, zero latency), confirming and shipping.
//! Latency is POST sent → CONFIRMED committed (the CONFIRMED event's time in
//! the order's stream, same clock). The disk's fsync ceiling and the
//! payments service alone are measured in the same run: an order is ~20
//! commits over eight databases, a payment two or three.

use crate::bench::{
    fsync_ceiling, lift_rate_limits, machine_description, percentile, register, serve_loopback,
    Conn, Report,
};
use crate::config::Settings;
use flowline_http::RequestContext;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, serde::Serialize)]
pub struct OrdersReport {
    pub machine: String,
    pub backend: String,
    pub durability: String,
    pub orders: usize,
    pub concurrency: usize,
    pub fsync_per_sec: f64,
    /// Orders accepted per second (POST answered 202).
    pub accepted_per_sec: f64,
    pub post_p50_ms: f64,
    pub post_p99_ms: f64,
    /// Orders confirmed per second, first POST to last CONFIRMED.
    pub confirmed_per_sec: f64,
    pub confirm_p50_ms: f64,
    pub confirm_p99_ms: f64,
    pub confirm_max_ms: f64,
    /// Payments alone (create + capture through the service), same run.
    pub payments_per_sec: f64,
}

impl Report for OrdersReport {
    fn print(&self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "scenario   orders: POST /orders → saga → CONFIRMED");
        let _ = writeln!(o, "machine    {}", self.machine);
        let _ = writeln!(
            o,
            "setup      backend={} durability={} orders={} concurrency={}",
            self.backend, self.durability, self.orders, self.concurrency
        );
        let _ = writeln!(
            o,
            "ceiling    {:.0} fsync/s; payments alone {:.0}/s",
            self.fsync_per_sec, self.payments_per_sec
        );
        let _ = writeln!(
            o,
            "accepted   {:.0}/s; POST p50 {:.2} ms, p99 {:.2} ms",
            self.accepted_per_sec, self.post_p50_ms, self.post_p99_ms
        );
        let _ = writeln!(
            o,
            "confirmed  {:.0}/s = {:.3} per fsync, {:.2} per payment; POST→CONFIRMED p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.confirmed_per_sec,
            self.confirmed_per_sec / self.fsync_per_sec,
            self.confirmed_per_sec / self.payments_per_sec.max(1e-9),
            self.confirm_p50_ms,
            self.confirm_p99_ms,
            self.confirm_max_ms
        );
    }
}

fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: "bench".into(),
        request_id: flowline_core::id::new_id().to_string(),
    }
}

fn api(e: flowline_http::ApiError, what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} {:?}", e.0.code, e.0.detail)
}

pub async fn run(
    mut settings: Settings,
    dir: &Path,
    orders: usize,
    concurrency: usize,
) -> anyhow::Result<OrdersReport> {
    let fsync = fsync_ceiling(dir, Duration::from_secs(2))?;
    settings.data_dir = dir.to_path_buf();
    if settings.database.url.starts_with("postgres") {
        settings.database.schema_prefix = format!("bench{}_", flowline_core::id::new_id().simple());
    } else {
        settings.database.url = "sqlite://".into();
    }
    if let Some(prefix) = settings
        .bus
        .url
        .starts_with("nats://")
        .then(|| format!("bench{}", flowline_core::id::new_id().simple()))
    {
        settings.bus.prefix = prefix;
    }
    settings.probe.enabled = false;
    // One client orders thousands of times: measure the flow, not the
    // limiter or the fraud rules' velocity limits.
    lift_rate_limits(&mut settings);
    settings.payments.fraud_max_per_user = i64::MAX;
    settings.payments.fraud_max_per_card = i64::MAX;
    settings.payments.sandbox_latency.0 = Duration::ZERO;
    let backend = format!(
        "{}+{}",
        settings.backend()?.name(),
        if settings.bus.url.starts_with("nats://") {
            "nats"
        } else {
            "embedded"
        }
    );
    let durability = format!("{:?}", settings.database.durability).to_lowercase();

    let app = crate::app::App::start(settings).await?;
    let state = app.state.clone();
    let (addr, server) = serve_loopback(crate::cli::app_router(&state)).await?;

    // A customer, a product with stock, an address, and one cart per order.
    let token = register(addr, "buyer@example.com", "Buyer").await?;
    let mut c = Conn::open(addr).await?;
    let me = format!(
        "GET /api/v1/users/me HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    let (_, body) = c.send(me.as_bytes()).await?;
    let user = serde_json::from_slice::<serde_json::Value>(&body)?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let product: flowline_catalog::NewProduct = serde_json::from_value(serde_json::json!({
        "sku": "BENCH-1", "title": "Bench mug", "price": { "amount": 2990, "currency": "BRL" },
        "category": "kitchen", "brand": "flowline",
    }))?;
    let product = state
        .catalog
        .create(&ctx(), product)
        .await
        .map_err(|e| api(e, "create product"))?;
    let stock = flowline_inventory::SetStock {
        on_hand: 1_000_000_000,
        warehouse: None,
        reason: None,
    };
    state
        .inventory
        .set_stock(&ctx(), &product.id, stock)
        .await
        .map_err(|e| api(e, "set stock"))?;
    let address: flowline_cart::NewAddress = serde_json::from_value(serde_json::json!({
        "name": "Buyer", "line1": "Rua 1", "city": "São Paulo", "postal_code": "01310-100", "country": "BR",
    }))?;
    let address = state
        .carts
        .add_address(&user, address)
        .await
        .map_err(|e| api(e, "add address"))?;
    let mut carts = Vec::with_capacity(orders);
    for _ in 0..orders {
        let cart = state
            .carts
            .create(&ctx(), &user)
            .await
            .map_err(|e| api(e, "create cart"))?;
        let item = flowline_cart::AddItem {
            product_id: product.id.clone(),
            quantity: 1,
        };
        state
            .carts
            .add_item(&ctx(), &user, &cart.id, item)
            .await
            .map_err(|e| api(e, "add item"))?;
        carts.push(cart.id);
    }
    // Setup's own events are relayed and consumed before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let carts = Arc::new(carts);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (carts, next, token, address) = (
            carts.clone(),
            next.clone(),
            token.clone(),
            address.id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await?;
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(cart) = carts.get(i) else { break };
                let body = serde_json::json!({ "cart_id": cart, "shipping_address_id": address,
                    "payment": { "method": "upi", "vpa": "success@razorpay" } })
                .to_string();
                let req = format!(
                    "POST /api/v1/orders HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\nidempotency-key: bench-{i}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let sent_at = flowline_core::Timestamp::now();
                let t = Instant::now();
                let (status, resp) = c.send(req.as_bytes()).await?;
                anyhow::ensure!(
                    status == 202,
                    "POST /orders: {status} {}",
                    String::from_utf8_lossy(&resp)
                );
                let id = serde_json::from_slice::<serde_json::Value>(&resp)?["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                mine.push((id, sent_at, t.elapsed().as_micros() as u32));
            }
            Ok::<_, anyhow::Error>(mine)
        }));
    }
    let mut placed = Vec::with_capacity(orders);
    for t in tasks {
        placed.extend(t.await??);
    }
    let accepted_secs = start.elapsed().as_secs_f64();

    // Wait for every saga, then read when each order was confirmed.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut confirm = Vec::with_capacity(placed.len());
    let mut last_confirmed = 0i64;
    for (id, sent_at, _) in &placed {
        let events = loop {
            let events = state
                .orders
                .events_after(id, 0)
                .await
                .map_err(|e| api(e, "read order events"))?;
            if let Some(last) = events
                .iter()
                .find(|e| e.kind == "CONFIRMED" || e.kind == "CANCELLED")
            {
                anyhow::ensure!(
                    last.kind == "CONFIRMED",
                    "order {id} was cancelled: {}",
                    last.data
                );
                break events;
            }
            anyhow::ensure!(Instant::now() < deadline, "order {id} never finished");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let at = events
            .iter()
            .find(|e| e.kind == "CONFIRMED")
            .map_or(0, |e| e.occurred_us);
        last_confirmed = last_confirmed.max(at);
        confirm.push((at - sent_at.as_micros()).max(0).min(u32::MAX as i64) as u32);
    }
    let first_sent = placed
        .iter()
        .map(|p| p.1.as_micros())
        .min()
        .unwrap_or_default();
    let confirmed_secs = (last_confirmed - first_sent) as f64 / 1e6;
    let mut post: Vec<u32> = placed.iter().map(|p| p.2).collect();
    post.sort_unstable();
    confirm.sort_unstable();

    // The payments service alone, on the same app and disk.
    let pay_start = Instant::now();
    let pay_n = (orders / 2).max(50);
    let mut pay_tasks = Vec::new();
    let per = pay_n.div_ceil(concurrency);
    for t in 0..concurrency {
        let payments = state.payments.clone();
        let user = user.clone();
        pay_tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let req: flowline_payments::NewPayment =
                    serde_json::from_value(serde_json::json!({
                        "order_id": format!("alone-{t}-{i}"), "amount": 2990, "currency": "BRL",
                        "method": "upi", "vpa": "success@razorpay",
                    }))?;
                payments
                    .create(&ctx(), &user, &format!("alone-{t}-{i}"), req)
                    .await
                    .map_err(|e| api(e, "payment alone"))?;
            }
            Ok::<_, anyhow::Error>(per)
        }));
    }
    let mut paid = 0;
    for t in pay_tasks {
        paid += t.await??;
    }
    let payments_per_sec = paid as f64 / pay_start.elapsed().as_secs_f64();

    server.abort();
    app.stop().await;
    Ok(OrdersReport {
        machine: machine_description(),
        backend,
        durability,
        orders,
        concurrency,
        fsync_per_sec: fsync,
        accepted_per_sec: placed.len() as f64 / accepted_secs,
        post_p50_ms: percentile(&post, 0.5),
        post_p99_ms: percentile(&post, 0.99),
        confirmed_per_sec: placed.len() as f64 / confirmed_secs.max(1e-9),
        confirm_p50_ms: percentile(&confirm, 0.5),
        confirm_p99_ms: percentile(&confirm, 0.99),
        confirm_max_ms: confirm.last().copied().unwrap_or_default() as f64 / 1000.0,
        payments_per_sec,
    })
}
