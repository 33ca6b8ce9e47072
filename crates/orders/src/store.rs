//! The order event store: append with optimistic concurrency, load, and the
//! `orders` projection kept in the same transaction (and rebuilt by replay).

use crate::model::{OrderEvent, OrderState};
use flowline_core::Timestamp;
use flowline_store::{on_pool, on_tx, Db, StoreError, Tx};
use serde_json::Value;

/// Another writer appended first: the caller re-reads and decides again.
#[derive(Debug)]
pub enum AppendError {
    Conflict { expected: i64, actual: i64 },
    NotFound,
    Store(StoreError),
}

impl From<StoreError> for AppendError {
    fn from(e: StoreError) -> Self {
        AppendError::Store(e)
    }
}

impl From<sqlx::Error> for AppendError {
    fn from(e: sqlx::Error) -> Self {
        AppendError::Store(e.into())
    }
}

impl From<AppendError> for StoreError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Store(e) => e,
            AppendError::Conflict { expected, actual } => {
                StoreError::Database(sqlx::Error::Protocol(format!(
                    "order stream moved on: expected version {expected}, found {actual}"
                )))
            }
            AppendError::NotFound => StoreError::CorruptEvent("no such order stream".into()),
        }
    }
}

type EventRow = (i64, String, String, i64);

fn event(r: EventRow) -> Result<OrderEvent, StoreError> {
    Ok(OrderEvent {
        version: r.0,
        kind: r.1,
        data: serde_json::from_str(&r.2)?,
        occurred_at: Timestamp::from_micros(r.3).to_rfc3339(),
        occurred_us: r.3,
    })
}

const EVENT_SQL: &str = "SELECT version, event_type, data, occurred_at FROM order_events
     WHERE order_id = $1 ORDER BY version";

/// The stream, oldest first (on the writer, so it includes what was just committed).
pub async fn load(db: &Db, order_id: &str) -> Result<Vec<OrderEvent>, StoreError> {
    let rows: Vec<EventRow> = on_pool!(write db, |p| sqlx::query_as(EVENT_SQL)
        .bind(order_id)
        .fetch_all(p)
        .await)?;
    rows.into_iter().map(event).collect()
}

pub async fn load_in(tx: &mut Tx, order_id: &str) -> Result<Vec<OrderEvent>, StoreError> {
    let rows: Vec<EventRow> = on_tx!(tx, |c| sqlx::query_as(EVENT_SQL)
        .bind(order_id)
        .fetch_all(c)
        .await)?;
    rows.into_iter().map(event).collect()
}

/// Events after `version`, for followers of one order.
pub async fn load_after(
    db: &Db,
    order_id: &str,
    version: i64,
) -> Result<Vec<OrderEvent>, StoreError> {
    // The read pool: followers must not queue on SQLite's one writer.
    let rows: Vec<EventRow> = on_pool!(db, |p| sqlx::query_as(
        "SELECT version, event_type, data, occurred_at FROM order_events
         WHERE order_id = $1 AND version > $2 ORDER BY version"
    )
    .bind(order_id)
    .bind(version)
    .fetch_all(p)
    .await)?;
    rows.into_iter().map(event).collect()
}

/// Appends `events` to a stream and updates the projection, in `tx`.
///
/// With `expected`, refuses unless the stream is at that version (the caller
/// decided on what it read). Without, appends at the end: for writers whose
/// events are valid whatever came before (the saga, the shipping follower).
/// The projection row is touched first so concurrent appenders of one order
/// queue on its row lock (PostgreSQL; SQLite has one writer) instead of
/// colliding on the primary key, which stays the guarantee either way.
pub async fn append(
    tx: &mut Tx,
    order_id: &str,
    expected: Option<i64>,
    events: &[(&str, Value)],
) -> Result<OrderState, AppendError> {
    lock(tx, order_id).await?;
    let stream = load_in(tx, order_id).await?;
    let actual = stream.last().map_or(0, |e| e.version);
    if let Some(expected) = expected {
        if expected != actual {
            return Err(AppendError::Conflict { expected, actual });
        }
    }
    let now = Timestamp::now().as_micros();
    let mut all = stream;
    for (i, (kind, data)) in events.iter().enumerate() {
        let e = OrderEvent {
            version: actual + 1 + i as i64,
            kind: (*kind).to_owned(),
            data: data.clone(),
            occurred_at: Timestamp::from_micros(now).to_rfc3339(),
            occurred_us: now,
        };
        let text = serde_json::to_string(&e.data).map_err(StoreError::from)?;
        on_tx!(&mut *tx, |c| sqlx::query(
            "INSERT INTO order_events (order_id, version, event_type, data, occurred_at)
             VALUES ($1, $2, $3, $4, $5)"
        )
        .bind(order_id)
        .bind(e.version)
        .bind(&e.kind)
        .bind(&text)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(|err| match &err {
            sqlx::Error::Database(d) if d.is_unique_violation() => AppendError::Conflict {
                expected: actual,
                actual: actual + 1,
            },
            _ => AppendError::Store(err.into()),
        })?;
        all.push(e);
    }
    let state = OrderState::replay(&all).ok_or(AppendError::NotFound)?;
    project(tx, &state).await?;
    Ok(state)
}

/// Takes the order's projection row lock (PostgreSQL; SQLite has one writer)
/// for the rest of `tx`: appenders of one order queue on it.
pub async fn lock(tx: &mut Tx, order_id: &str) -> Result<(), StoreError> {
    on_tx!(tx, |c| sqlx::query(
        "UPDATE orders SET version = version WHERE id = $1"
    )
    .bind(order_id)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Writes the projection row of `state`.
pub async fn project(tx: &mut Tx, s: &OrderState) -> Result<(), StoreError> {
    let state = serde_json::to_string(s)?;
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO orders (id, number, user_id, status, currency, total, item_count, state,
             version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (id) DO UPDATE SET status = excluded.status, state = excluded.state,
             version = excluded.version, updated_at = excluded.updated_at"
    )
    .bind(&s.id)
    .bind(&s.number)
    .bind(&s.user_id)
    .bind(s.status.as_str())
    .bind(&s.currency)
    .bind(s.total)
    .bind(s.item_count())
    .bind(&state)
    .bind(s.version)
    .bind(s.created_us)
    .bind(s.updated_us)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// The projected state (fast path for reads).
pub async fn projected(db: &Db, order_id: &str) -> Result<Option<OrderState>, StoreError> {
    let row: Option<String> = on_pool!(db, |p| sqlx::query_scalar(
        "SELECT state FROM orders WHERE id = $1"
    )
    .bind(order_id)
    .fetch_optional(p)
    .await)?;
    row.map(|s| serde_json::from_str(&s).map_err(StoreError::from))
        .transpose()
}

/// Drops the projection and folds every stream again, in one transaction.
/// Returns how many orders it holds afterwards.
pub async fn rebuild(db: &Db) -> Result<u64, StoreError> {
    let mut tx = db.begin().await?;
    if let Tx::Postgres(t) = &mut tx {
        // Appenders wait instead of writing rows this rebuild would miss.
        sqlx::query("LOCK TABLE orders IN EXCLUSIVE MODE")
            .execute(&mut **t)
            .await?;
    }
    on_tx!(&mut tx, |c| sqlx::query("DELETE FROM orders")
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    let rows: Vec<(String, i64, String, String, i64)> = on_tx!(&mut tx, |c| sqlx::query_as(
        "SELECT order_id, version, event_type, data, occurred_at FROM order_events
         ORDER BY order_id, version"
    )
    .fetch_all(c)
    .await)?;
    let mut n = 0;
    let mut current: Option<String> = None;
    let mut stream: Vec<OrderEvent> = Vec::new();
    for (id, version, kind, data, at) in rows {
        if current.as_deref() != Some(id.as_str()) {
            if let Some(s) = OrderState::replay(&stream) {
                project(&mut tx, &s).await?;
                n += 1;
            }
            stream.clear();
            current = Some(id);
        }
        stream.push(event((version, kind, data, at))?);
    }
    if let Some(s) = OrderState::replay(&stream) {
        project(&mut tx, &s).await?;
        n += 1;
    }
    tx.commit().await?;
    Ok(n)
}

/// The next number of `year`, taken in `tx` (a rollback gives it back).
pub async fn next_number(tx: &mut Tx, year: u32) -> Result<i64, StoreError> {
    let n: i64 = on_tx!(tx, |c| sqlx::query_scalar(
        "INSERT INTO order_numbers (year, last) VALUES ($1, 1)
         ON CONFLICT (year) DO UPDATE SET last = order_numbers.last + 1
         RETURNING last"
    )
    .bind(i64::from(year))
    .fetch_one(c)
    .await)?;
    Ok(n)
}
