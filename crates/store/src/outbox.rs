//! The transactional outbox.
//!
//! A context writes its state change and [`enqueue`]s the events it causes in
//! the same transaction of its own database, so both commit or neither does.
//! A [`Relay`] per service database moves committed rows to the event log in
//! batches, in commit order, and deletes them once the log has them. A crash
//! between the log append and the delete resends the batch; the log skips ids
//! it already has, so every event is appended exactly once.

use crate::db::{Db, Tx};
use crate::log::EventLog;
use crate::migrate::Migration;
use crate::Result;
use flowline_core::Envelope;
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Kernel tables (outbox, inbox) that every service database carries.
pub const KERNEL_MIGRATIONS: &[Migration] = &[
    Migration {
        scope: "kernel",
        version: 1,
        name: "outbox_inbox",
        sqlite: include_str!("../migrations/sqlite/kernel_0001_outbox_inbox.sql"),
        postgres: include_str!("../migrations/postgres/kernel_0001_outbox_inbox.sql"),
    },
    Migration {
        scope: "kernel",
        version: 2,
        name: "traceparent",
        sqlite: include_str!("../migrations/sqlite/kernel_0002_traceparent.sql"),
        postgres: include_str!("../migrations/postgres/kernel_0002_traceparent.sql"),
    },
];

/// Adds `event` to the outbox within `tx`. The event joins the current trace:
/// a `publish` span (child of the current span) is recorded, and the event
/// carries its context so whoever handles it continues the trace.
pub async fn enqueue(tx: &mut Tx, event: &Envelope) -> Result<()> {
    let payload = serde_json::to_string(&event.payload)?;
    let traceparent = match &event.traceparent {
        Some(tp) => Some(tp.clone()),
        None => publish_span(event),
    };
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO outbox (event_id, topic, event_type, event_key, occurred_at, correlation_id,
            causation_id, schema_version, payload, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    )
    .bind(event.id.to_string())
    .bind(&event.topic)
    .bind(&event.event_type)
    .bind(&event.key)
    .bind(event.occurred_at.as_micros())
    .bind(&event.correlation_id)
    .bind(event.causation_id.as_deref())
    .bind(event.schema_version)
    .bind(&payload)
    .bind(traceparent.as_deref())
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Records the `publish` span of `event` under the current span; returns the
/// context the event carries (`None` outside any trace).
fn publish_span(event: &Envelope) -> Option<String> {
    use flowline_telemetry::trace;
    let parent = trace::current_context()?;
    let ctx = trace::TraceContext {
        trace_id: parent.trace_id,
        span_id: trace::new_span_id(),
    };
    if trace::enabled() {
        let mut attrs = serde_json::Map::new();
        attrs.insert("topic".into(), event.topic.clone().into());
        attrs.insert("event_type".into(), event.event_type.clone().into());
        attrs.insert("event_id".into(), event.id.to_string().into());
        trace::record(trace::SpanRecord {
            trace_id: ctx.trace_hex(),
            span_id: format!("{:016x}", ctx.span_id),
            parent_id: Some(format!("{:016x}", parent.span_id)),
            name: "publish".into(),
            start_us: trace::now_us(),
            duration_us: 0,
            attrs,
            db_calls: 0,
            db_us: 0,
        });
    }
    Some(ctx.to_string())
}

/// One `relay` span per traced event: from its commit in the outbox to its
/// append to the log (the hop's latency).
fn relay_spans(events: &[Envelope]) {
    use flowline_telemetry::trace;
    if !trace::enabled() {
        return;
    }
    let now = trace::now_us();
    for e in events {
        let Some(ctx) = e
            .traceparent
            .as_deref()
            .and_then(trace::TraceContext::parse)
        else {
            continue;
        };
        let start = e.occurred_at.as_micros();
        let mut attrs = serde_json::Map::new();
        attrs.insert("topic".into(), e.topic.clone().into());
        attrs.insert("event_type".into(), e.event_type.clone().into());
        trace::record(trace::SpanRecord {
            trace_id: ctx.trace_hex(),
            span_id: format!("{:016x}", trace::new_span_id()),
            parent_id: Some(format!("{:016x}", ctx.span_id)),
            name: "relay".into(),
            start_us: start,
            duration_us: (now - start).max(0),
            attrs,
            db_calls: 0,
            db_us: 0,
        });
    }
}

/// Moves one service database's outbox to the log.
#[derive(Clone)]
pub struct Relay {
    source: Db,
    log: EventLog,
    wake: Arc<Notify>,
    batch: i64,
}

impl Relay {
    pub fn new(source: Db, log: EventLog) -> Relay {
        Relay {
            source,
            log,
            wake: Arc::new(Notify::new()),
            batch: 1000,
        }
    }

    /// Call after committing a transaction that enqueued events: the relay
    /// runs at once instead of at its next idle poll.
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Moves one batch. Returns how many rows left the outbox.
    #[tracing::instrument(skip_all)]
    pub async fn relay_once(&self) -> Result<usize> {
        let rows = on_pool!(&self.source, |p| {
            let rows = sqlx::query(
                "SELECT id, event_id, topic, event_type, event_key, occurred_at, correlation_id,
                        causation_id, schema_version, payload, traceparent
                 FROM outbox ORDER BY id LIMIT $1",
            )
            .bind(self.batch)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<i64, _>("id")?, decode_envelope!(r))))
                .collect::<Result<Vec<_>>>()
        })?;
        if rows.is_empty() {
            return Ok(0);
        }
        let (ids, events): (Vec<i64>, Vec<Envelope>) = rows.into_iter().unzip();
        self.log.append(&events).await?;
        relay_spans(&events);
        // Delete exactly the rows relayed (not a range): on PostgreSQL a lower id
        // may commit after a higher one and must not be lost.
        for chunk in ids.chunks(500) {
            let sqlite = matches!(self.source, Db::Sqlite { .. });
            let sql = format!(
                "DELETE FROM outbox WHERE id IN ({})",
                crate::log::placeholders(sqlite, 0, chunk.len()).join(", ")
            );
            on_pool!(write & self.source, |p| {
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            })?;
        }
        Ok(ids.len())
    }

    /// Relays until the outbox is empty.
    pub async fn drain(&self) -> Result<usize> {
        let mut total = 0;
        loop {
            let n = self.relay_once().await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Runs until shutdown, then drains what is left.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            match self.relay_once().await {
                Ok(n) if n > 0 => {
                    failures = 0;
                    continue;
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay failed; will retry");
                }
            }
            if *shutdown.borrow() {
                break;
            }
            let wait = if failures > 0 {
                crate::consumer::backoff(
                    Duration::from_millis(50),
                    Duration::from_secs(5),
                    failures,
                )
            } else {
                Duration::from_millis(500)
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        match self.drain().await {
            Ok(n) => tracing::info!(flushed = n, "outbox relay flushed"),
            Err(e) => tracing::error!(error = %e, "outbox relay could not flush on shutdown"),
        }
    }
}
