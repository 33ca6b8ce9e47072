//! Shared by the ledger's test binaries: backends, a ledger on each, events.

#![allow(dead_code)]

use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_http::RequestContext;
use flowline_ledger::{Ledger, PAYMENTS_TOPIC};
use flowline_store::outbox::Relay;
use flowline_store::{Backend, Db, Durability, EventLog, LogOptions};
use std::sync::Arc;

/// A backend to test, kept alive (temp dir) for the test's duration.
pub struct TestBackend {
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

impl TestBackend {
    pub fn name(&self) -> &'static str {
        self.backend.name()
    }
}

/// SQLite always; PostgreSQL too when `FLOWLINE_TEST_POSTGRES_URL` is set, each
/// with its own schema prefix so parallel tests never share tables.
pub fn backends(durability: Durability) -> Vec<TestBackend> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = vec![TestBackend {
        backend: Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability,
        },
        _dir: Some(dir),
    }];
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        let prefix = format!("t{}_", uuid::Uuid::now_v7().simple());
        v.push(TestBackend {
            backend: Backend::Postgres {
                url,
                schema_prefix: prefix,
                max_connections: 8,
            },
            _dir: None,
        });
    }
    v
}

/// A migrated ledger whose relay feeds a log on the same backend.
pub async fn ledger(b: &TestBackend) -> Arc<Ledger> {
    let db = Db::open(&b.backend, "ledger")
        .await
        .expect("open ledger db");
    let log = EventLog::open(&b.backend, LogOptions::default())
        .await
        .expect("open log");
    let relay = Relay::new(db.clone(), log);
    Arc::new(Ledger::open(db, relay).await.expect("open ledger"))
}

pub fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: flowline_core::id::new_correlation_id(),
        request_id: flowline_core::id::new_correlation_id(),
    }
}

/// A `commerce.payments` event as a consumer receives it from the log.
pub fn payment_event(
    event_type: &str,
    payment_id: &str,
    payload: serde_json::Value,
) -> RecordedEvent {
    RecordedEvent {
        partition: flowline_core::event::partition_for(payment_id, 4),
        offset: 0,
        appended_at: Timestamp::now(),
        envelope: Envelope::stamp(
            EventDraft::new(PAYMENTS_TOPIC, event_type, payment_id, payload),
            &flowline_core::id::new_correlation_id(),
            None,
        ),
    }
}

pub fn captured(payment_id: &str, amount: i64, tax: i64, currency: &str) -> RecordedEvent {
    payment_event(
        "payment.captured",
        payment_id,
        serde_json::json!({
            "payment_id": payment_id, "order_id": format!("order-{payment_id}"), "user_id": "user-1",
            "amount": amount, "currency": currency, "tax_amount": tax, "method": "card",
            "captured_at": "2026-03-01T12:00:00Z",
        }),
    )
}

pub fn refunded(
    payment_id: &str,
    refund_id: &str,
    amount: i64,
    tax: i64,
    currency: &str,
    refunded_total: i64,
) -> RecordedEvent {
    payment_event(
        "payment.refunded",
        payment_id,
        serde_json::json!({
            "payment_id": payment_id, "refund_id": refund_id, "order_id": null, "user_id": "user-1",
            "amount": amount, "tax_amount": tax, "currency": currency,
            "refunded_total": refunded_total, "refunded_at": "2026-03-02T12:00:00Z",
        }),
    )
}

pub fn failed(payment_id: &str) -> RecordedEvent {
    payment_event(
        "payment.failed",
        payment_id,
        serde_json::json!({ "payment_id": payment_id, "reason": "card_declined" }),
    )
}

/// Runs one write statement directly (to tamper with the tables).
pub async fn exec(db: &Db, sql: &str) -> u64 {
    flowline_store::on_pool!(write db, |p| sqlx::query(sql)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
    .expect(sql)
}

/// One integer from a query.
pub async fn scalar(db: &Db, sql: &str) -> i64 {
    flowline_store::on_pool!(write db, |p| sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(p)
        .await)
    .expect(sql)
}

/// Outbox events of `event_type` not yet relayed.
pub async fn outbox_count(db: &Db, event_type: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM outbox WHERE event_type = '{event_type}'");
    scalar(db, &sql).await
}

/// Debits minus credits over all accounts, per currency: zero everywhere in a
/// consistent double-entry ledger.
pub async fn trial_balance(db: &Db) -> Vec<(String, i64, i64)> {
    flowline_store::on_pool!(write db, |p| sqlx::query_as(
        "SELECT currency, CAST(SUM(debits) AS BIGINT), CAST(SUM(credits) AS BIGINT)
         FROM balances GROUP BY currency ORDER BY currency"
    )
    .fetch_all(p)
    .await)
    .expect("trial balance")
}
