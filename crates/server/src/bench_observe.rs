//! `flowline bench observe`: what seeing the data flow costs.
//!
//! - Tracing: traced writes (a probe write, its event and two consumer groups,
//!   every span kept in the trace store) next to the same writes with span
//!   recording off, in alternating slices of one run.
//! - Audit and analytics: events appended to the hash chain, and events
//!   applied to every analytics job, each next to the floor any exactly-once
//!   consumer pays on the same database (an inbox claim committed per event).

use crate::bench::{
    lift_rate_limits, machine_description, post_json, serve_loopback, Conn, Report,
};
use crate::config::Settings;
use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_store::{inbox, Db};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, serde::Serialize)]
pub struct ObserveReport {
    pub machine: String,
    pub durability: String,
    pub connections: usize,
    pub traced_writes_per_sec: f64,
    pub untraced_writes_per_sec: f64,
    /// Traced ÷ untraced, median of the slices.
    pub traced_vs_untraced: f64,
    pub spans_stored: i64,
    pub audit_appends_per_sec: f64,
    pub analytics_events_per_sec: f64,
    /// Inbox claim + commit per event: the floor of an exactly-once consumer.
    pub inbox_floor_per_sec: f64,
    pub audit_vs_floor: f64,
    pub analytics_vs_floor: f64,
}

impl Report for ObserveReport {
    fn print(&self) {
        println!(
            "observability cost ({}; durability {})",
            self.machine, self.durability
        );
        println!(
            "  traced probe writes   {:>9.0}/s   untraced {:>9.0}/s   ratio {:.2} ({} connections, {} spans stored)",
            self.traced_writes_per_sec,
            self.untraced_writes_per_sec,
            self.traced_vs_untraced,
            self.connections,
            self.spans_stored
        );
        println!(
            "  audit chain appends   {:>9.0}/s   inbox floor {:>9.0}/s   ratio {:.2}",
            self.audit_appends_per_sec, self.inbox_floor_per_sec, self.audit_vs_floor
        );
        println!(
            "  analytics (6 jobs)    {:>9.0}/s   inbox floor {:>9.0}/s   ratio {:.2}",
            self.analytics_events_per_sec, self.inbox_floor_per_sec, self.analytics_vs_floor
        );
    }
}

pub async fn run(
    mut settings: Settings,
    dir: &Path,
    d: Duration,
    connections: usize,
    events: usize,
) -> anyhow::Result<ObserveReport> {
    settings.data_dir = dir.to_path_buf();
    settings.database.url = "sqlite://".into();
    settings.probe.enabled = true;
    settings.telemetry.traces = true;
    lift_rate_limits(&mut settings);
    let durability = match settings.backend()? {
        flowline_store::Backend::Sqlite { durability, .. } => {
            format!("{durability:?}").to_lowercase()
        }
        other => other.name().to_owned(),
    };

    // Tracing: alternate slices with span recording on and off.
    let app = crate::app::App::start(settings.clone()).await?;
    let (addr, server) = serve_loopback(crate::cli::app_router(&app.state)).await?;
    let slices = 6u32;
    let slice = d / slices;
    let counter = Arc::new(AtomicU64::new(0));
    writes(addr, connections, Duration::from_millis(500), &counter).await?;
    let (mut on, mut off, mut ratios) = (0.0, 0.0, Vec::new());
    for _ in 0..slices {
        flowline_telemetry::trace::set_enabled(true);
        let t = writes(addr, connections, slice, &counter).await?;
        flowline_telemetry::trace::set_enabled(false);
        let u = writes(addr, connections, slice, &counter).await?;
        on += t;
        off += u;
        ratios.push(t / u);
    }
    flowline_telemetry::trace::set_enabled(true);
    // Let the flusher store what the traced slices produced.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spans = match &app.state.traces {
        Some(t) => t.count().await?,
        None => 0,
    };
    server.abort();
    app.stop().await;

    // Audit and analytics next to the inbox floor, one event at a time as a
    // consumer partition applies them.
    let backend = {
        let mut s = settings.clone();
        s.data_dir = dir.join("consumers");
        s.backend()?
    };
    let floor_db = Db::open(&backend, "floor").await?;
    floor_db
        .migrate(flowline_store::outbox::KERNEL_MIGRATIONS)
        .await?;
    let evs = synthetic(events);
    let audit_db = Db::open(&backend, "audit").await?;
    let log = flowline_store::EventLog::open(&backend, Default::default()).await?;
    let audit = flowline_audit::Audit::open(
        audit_db.clone(),
        flowline_store::outbox::Relay::new(audit_db.clone(), log),
    )
    .await?;
    let analytics_db = Db::open(&backend, "analytics").await?;
    let analytics = flowline_analytics::Analytics::open(analytics_db, Default::default()).await?;
    // The three in alternating chunks, so that a change in the machine's
    // load (or a warming cache) affects all alike.
    let (mut floor_t, mut audit_t, mut analytics_t) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for chunk in evs.chunks(evs.len().div_ceil(10)) {
        let t = Instant::now();
        for e in chunk {
            let mut tx = floor_db.begin().await?;
            inbox::claim(&mut tx, "floor", e.envelope.id).await?;
            tx.commit().await?;
        }
        floor_t += t.elapsed();
        // Only audit.events reach the chain (the others are not its input).
        let t = Instant::now();
        for e in chunk.iter().filter(|e| e.envelope.topic == "audit.events") {
            audit.append(e).await?;
        }
        audit_t += t.elapsed();
        let t = Instant::now();
        for e in chunk {
            analytics.apply(e).await?;
        }
        analytics_t += t.elapsed();
    }
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let audited = evs
        .iter()
        .filter(|e| e.envelope.topic == "audit.events")
        .count();
    let (floor, audit_rate, analytics_rate) = (
        rate(evs.len(), floor_t),
        rate(audited, audit_t),
        rate(evs.len(), analytics_t),
    );
    anyhow::ensure!(
        audit.verify().await?.is_ok(),
        "the benchmark's audit chain does not verify"
    );

    let n = f64::from(slices);
    ratios.sort_by(f64::total_cmp);
    Ok(ObserveReport {
        machine: machine_description(),
        durability,
        connections,
        traced_writes_per_sec: on / n,
        untraced_writes_per_sec: off / n,
        traced_vs_untraced: ratios[ratios.len() / 2],
        spans_stored: spans,
        audit_appends_per_sec: audit_rate,
        analytics_events_per_sec: analytics_rate,
        inbox_floor_per_sec: floor,
        audit_vs_floor: audit_rate / floor,
        analytics_vs_floor: analytics_rate / floor,
    })
}

/// Closed loops of probe writes for `d`; writes per second.
async fn writes(
    addr: std::net::SocketAddr,
    connections: usize,
    d: Duration,
    counter: &Arc<AtomicU64>,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await?;
            let mut n = 0u64;
            while start.elapsed() < d {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let body = format!(r#"{{"key":"k{}","value":"v{i}"}}"#, i % 64);
                let (status, _) = c.send(&post_json("/api/v1/probe/writes", &body)).await?;
                anyhow::ensure!(status == 201, "probe write: status {status}");
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// A mix as the platform produces it: failed and successful logins, orders
/// and request samples, a second apart in event time.
fn synthetic(n: usize) -> Vec<RecordedEvent> {
    let base = Timestamp::now().as_micros() - n as i64 * 1_000_000;
    (0..n)
        .map(|i| {
            let user = format!("user-{}", i % 50);
            let (topic, ty, payload) = match i % 4 {
                0 => (
                    "audit.events",
                    "auth.login_failed",
                    serde_json::json!({"email": format!("{}***@example.com", &user[..1]),
                        "ip": format!("10.0.0.{}", i % 7), "reason": "invalid_credentials"}),
                ),
                1 => (
                    "audit.events",
                    "auth.login_succeeded",
                    serde_json::json!({"user_id": user, "ip": "10.0.0.1"}),
                ),
                2 => (
                    "orders.events",
                    "order.created",
                    serde_json::json!({"order_id": format!("o{i}"), "user_id": user,
                        "total": {"amount": 1250 + i as i64, "currency": "BRL"}}),
                ),
                _ => (
                    "gateway.requests",
                    "http.requests_sampled",
                    serde_json::json!({"node": "bench", "samples": [{"method": "GET",
                        "route": "/api/v1/products", "status": 200, "duration_ms": 1.5,
                        "at": Timestamp::from_micros(base + i as i64 * 1_000_000)}]}),
                ),
            };
            let mut env =
                Envelope::stamp(EventDraft::new(topic, ty, &user, payload), "bench", None);
            env.occurred_at = Timestamp::from_micros(base + i as i64 * 1_000_000);
            RecordedEvent {
                partition: 0,
                offset: i as i64,
                appended_at: env.occurred_at,
                envelope: env,
            }
        })
        .collect()
}
