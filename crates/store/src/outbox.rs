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
pub const KERNEL_MIGRATIONS: &[Migration] = &[Migration {
    scope: "kernel",
    version: 1,
    name: "outbox_inbox",
    sqlite: include_str!("../migrations/sqlite/kernel_0001_outbox_inbox.sql"),
    postgres: include_str!("../migrations/postgres/kernel_0001_outbox_inbox.sql"),
}];

/// Adds `event` to the outbox within `tx`.
pub async fn enqueue(tx: &mut Tx, event: &Envelope) -> Result<()> {
    let payload = serde_json::to_string(&event.payload)?;
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO outbox (event_id, topic, event_type, event_key, occurred_at, correlation_id,
            causation_id, schema_version, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
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
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
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
                        causation_id, schema_version, payload
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
