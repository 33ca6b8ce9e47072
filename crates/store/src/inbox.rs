//! The inbox: exactly-once *effects* on top of at-least-once delivery.
//!
//! A handler opens a transaction on its own database, calls [`claim`], and applies
//! its effect only when the claim is new; the claim commits or rolls back with
//! the effect, so a redelivered event finds its id already there and does nothing.

use crate::db::{Db, Tx};
use crate::Result;
use flowline_core::Timestamp;
use uuid::Uuid;

/// Records that `consumer` processed `event_id`. `false` means it already had:
/// skip the effect.
pub async fn claim(tx: &mut Tx, consumer: &str, event_id: Uuid) -> Result<bool> {
    let id = event_id.to_string();
    let res = on_tx!(tx, |c| sqlx::query(
        "INSERT INTO inbox (consumer, event_id, processed_at) VALUES ($1, $2, $3)
         ON CONFLICT (consumer, event_id) DO NOTHING"
    )
    .bind(consumer)
    .bind(&id)
    .bind(Timestamp::now().as_micros())
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(res == 1)
}

/// Whether `consumer` has processed `event_id`.
pub async fn seen(db: &Db, consumer: &str, event_id: Uuid) -> Result<bool> {
    let id = event_id.to_string();
    let n: i64 = on_pool!(db, |p| sqlx::query_scalar(
        "SELECT count(*) FROM inbox WHERE consumer = $1 AND event_id = $2"
    )
    .bind(consumer)
    .bind(&id)
    .fetch_one(p)
    .await)?;
    Ok(n > 0)
}

/// Forgets inbox entries older than `before` (they can no longer be redelivered
/// once the log's retention has dropped their events).
pub async fn prune(db: &Db, before: Timestamp) -> Result<u64> {
    let n = on_pool!(write db, |p| sqlx::query("DELETE FROM inbox WHERE processed_at < $1")
        .bind(before.as_micros())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n)
}
