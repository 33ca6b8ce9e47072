//! flowline-audit: a tamper-evident record of security-relevant events.
//!
//! Why a context of its own: the record must outlive and out-trust the
//! contexts it watches. It consumes `audit.events` (every event, whatever its
//! type: logins, denials, exports, admin actions) and the security-relevant
//! part of `user.events`, and appends each to `audit_records`, a chain where
//! every record carries the hash of the one before ([`chain`]). Editing,
//! deleting or inserting a record breaks the chain where it happened, and
//! [`verify`] says where.
//!
//! One transaction per event: the inbox claim (a redelivery appends nothing),
//! the append (which first takes the single `audit_head` row, so appenders on
//! several instances or partitions queue and the chain stays gapless), the
//! alert rules, and any `audit.alert_raised` event through the outbox.
//!
//! Alert rule: `failed_login_threshold` `auth.login_failed` events for one
//! account (the record's actor) or one address, by event time, within
//! `failed_login_window`. A window is `(end − window, end]`, `end` being a
//! failure's time; the first window to hold the threshold raises one alert,
//! and a later one for the same rule and key is raised only once its end is
//! a full window away from every earlier alert's end. Windows of one key's
//! alerts therefore never overlap, and each failure counts toward at most
//! one alert. Failures may arrive out of time order (an address's travel in
//! several partitions): a late one completes the window it belongs in.

pub mod chain;
pub mod classify;
mod metrics;
pub mod routes;

pub use chain::{
    verify, verify_with_limit, ChainFields, Finding, FindingKind, VerifyReport, GENESIS_HASH,
    MAX_FINDINGS,
};
pub use classify::{is_recorded, AUDIT_TOPIC, SECURITY_USER_EVENTS, USER_TOPIC};
pub use metrics::{AuditMetrics, RuleLabels};
pub use routes::{routes, AuditApi};

use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_store::outbox::{self, Relay};
use flowline_store::{inbox, on_pool, on_tx, Db, Handler, HandlerError, Migration, StoreError};
use serde::Serialize;
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;

/// The consumer group (and inbox consumer name).
pub const GROUP: &str = "audit";
/// Subscribed topics.
pub const TOPICS: &[&str] = &[AUDIT_TOPIC, USER_TOPIC];
/// Where alerts are published.
pub const ALERTS_TOPIC: &str = "audit.alerts";
/// The alert event's type.
pub const ALERT_RAISED: &str = "audit.alert_raised";
/// Failed logins for one account.
pub const RULE_FAILED_LOGINS_ACCOUNT: &str = "failed_logins_account";
/// Failed logins from one address.
pub const RULE_FAILED_LOGINS_IP: &str = "failed_logins_ip";
/// The event type the failed-login rules count.
pub const LOGIN_FAILED: &str = "auth.login_failed";

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "audit",
    version: 1,
    name: "audit chain, head, alerts",
    sqlite: include_str!("../migrations/sqlite/0001_audit.sql"),
    postgres: include_str!("../migrations/postgres/0001_audit.sql"),
}];

#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Failed logins for one account or one address that raise an alert; 0
    /// turns the rules off.
    pub failed_login_threshold: u32,
    /// How far back (by event time) failures count.
    pub failed_login_window: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            failed_login_threshold: 5,
            failed_login_window: Duration::from_secs(300),
        }
    }
}

/// One record of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: i64,
    /// The event recorded.
    pub event_id: String,
    /// When it happened (the event's time).
    pub occurred_at: String,
    /// When it was appended here.
    pub recorded_at: String,
    /// `authentication`, `authorization`, `admin`, `data`, `account`, …
    pub category: String,
    /// The event type, `auth.login_failed`.
    pub action: String,
    /// Who acted: a user id, or the masked email of a failed login.
    pub actor: Option<String>,
    /// Whom it was done to, when that is someone else.
    pub subject: Option<String>,
    pub ip: Option<String>,
    /// `success` or `failure`.
    pub outcome: String,
    pub correlation_id: String,
    /// The event's payload.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// What [`Audit::query`] selects. Empty filters match everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    /// An exact type, or a prefix when it ends with `.` or `.*` (`auth.`).
    pub action: Option<String>,
    pub category: Option<String>,
    pub ip: Option<String>,
    pub outcome: Option<String>,
    /// Occurred at or after.
    pub from: Option<Timestamp>,
    /// Occurred before.
    pub to: Option<Timestamp>,
    /// 1 to 500 (clamped); 0 means the default, 50.
    pub limit: u32,
    /// Records below this seq (the previous page's `next_cursor`).
    pub cursor: Option<i64>,
}

/// Records, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditRecord>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<i64>,
}

/// A raised alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Alert {
    /// Also the id of its `audit.alert_raised` event.
    pub id: String,
    /// `failed_logins_account` or `failed_logins_ip`.
    pub rule: String,
    /// `account` or `ip`.
    pub key_kind: String,
    pub key: String,
    /// Failures in the window when it was raised.
    pub count: i64,
    pub threshold: i64,
    /// Exclusive.
    pub window_start: String,
    /// Inclusive: the time of the window's last failure.
    pub window_end: String,
    /// The record whose append raised it.
    pub seq: i64,
    pub raised_at: String,
}

#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub rule: Option<String>,
    pub key: Option<String>,
    /// 1 to 500 (clamped); 0 means the default, 50.
    pub limit: u32,
    /// Alerts with an id below this (the previous page's `next_cursor`).
    pub cursor: Option<String>,
}

/// Alerts, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AlertPage {
    pub items: Vec<Alert>,
    pub next_cursor: Option<String>,
}

/// What one append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: i64,
    pub hash: String,
    pub alerts: Vec<Alert>,
}

/// The audit context.
pub struct Audit {
    pub db: Db,
    relay: Relay,
    cfg: AuditConfig,
    metrics: AuditMetrics,
}

pub(crate) fn rfc3339(us: i64) -> String {
    Timestamp::from_micros(us).to_rfc3339()
}

/// A bound value of a query built at run time.
enum Arg {
    Text(String),
    Int(i64),
}

macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                Arg::Text(s) => q.bind(s.as_str()),
                Arg::Int(i) => q.bind(*i),
            };
        }
        q
    }};
}

const RECORD_COLUMNS: &str = "seq, event_id, occurred_at, recorded_at, category, action, actor, \
    subject, ip, outcome, correlation_id, details, prev_hash, hash";

macro_rules! record_row {
    ($r:expr) => {{
        let r = $r;
        let details: String = r.try_get("details")?;
        AuditRecord {
            seq: r.try_get("seq")?,
            event_id: r.try_get("event_id")?,
            occurred_at: rfc3339(r.try_get("occurred_at")?),
            recorded_at: rfc3339(r.try_get("recorded_at")?),
            category: r.try_get("category")?,
            action: r.try_get("action")?,
            actor: r.try_get("actor")?,
            subject: r.try_get("subject")?,
            ip: r.try_get("ip")?,
            outcome: r.try_get("outcome")?,
            correlation_id: r.try_get("correlation_id")?,
            // Shown as stored even when it no longer parses (tampered).
            details: serde_json::from_str(&details).unwrap_or(serde_json::Value::String(details)),
            prev_hash: r.try_get("prev_hash")?,
            hash: r.try_get("hash")?,
        }
    }};
}

const ALERT_COLUMNS: &str =
    "id, rule, key_kind, alert_key, window_start, window_end, count, threshold, seq, raised_at";

macro_rules! alert_row {
    ($r:expr) => {{
        let r = $r;
        Alert {
            id: r.try_get("id")?,
            rule: r.try_get("rule")?,
            key_kind: r.try_get("key_kind")?,
            key: r.try_get("alert_key")?,
            window_start: rfc3339(r.try_get("window_start")?),
            window_end: rfc3339(r.try_get("window_end")?),
            count: r.try_get("count")?,
            threshold: r.try_get("threshold")?,
            seq: r.try_get("seq")?,
            raised_at: rfc3339(r.try_get("raised_at")?),
        }
    }};
}

fn page_limit(limit: u32) -> i64 {
    if limit == 0 {
        50
    } else {
        i64::from(limit.min(500))
    }
}

impl Audit {
    /// Migrates (kernel tables and the chain's) with the default config.
    pub async fn open(db: Db, relay: Relay) -> Result<Arc<Audit>, StoreError> {
        Audit::open_with(db, relay, AuditConfig::default()).await
    }

    pub async fn open_with(
        db: Db,
        relay: Relay,
        cfg: AuditConfig,
    ) -> Result<Arc<Audit>, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        Ok(Arc::new(Audit {
            db,
            relay,
            cfg,
            metrics: AuditMetrics::default(),
        }))
    }

    pub fn config(&self) -> &AuditConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    /// Registers [`AuditMetrics`] (`flowline_audit_records_total`,
    /// `flowline_audit_alerts_total{rule}`).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    /// The head: the last record's seq and hash (0 and [`GENESIS_HASH`] when empty).
    pub async fn head(&self) -> Result<(i64, String), StoreError> {
        Ok(on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT seq, hash FROM audit_head WHERE id = 1"
        )
        .fetch_one(p)
        .await)?)
    }

    /// Checks the whole chain (see [`verify`]).
    pub async fn verify(&self) -> Result<VerifyReport, StoreError> {
        verify(&self.db).await
    }

    /// Appends `ev` to the chain, evaluates the alert rules and enqueues any
    /// alert, in one transaction. `None` when the event is not recorded: a
    /// type this context ignores, or one already recorded (redelivery).
    pub async fn append(&self, ev: &RecordedEvent) -> Result<Option<Appended>, StoreError> {
        let e = &ev.envelope;
        if !is_recorded(&e.topic, &e.event_type) {
            return Ok(None);
        }
        let entry = classify::entry(e);
        let event_id = e.id.to_string();
        let mut tx = self.db.begin().await?;
        if !inbox::claim(&mut tx, GROUP, e.id).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        // The inbox may have been pruned before a replay: the chain itself
        // knows the event too.
        let known: i64 = on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT count(*) FROM audit_records WHERE event_id = $1"
        )
        .bind(&event_id)
        .fetch_one(c)
        .await)?;
        if known > 0 {
            tx.commit().await?;
            return Ok(None);
        }
        // The head row first: on PostgreSQL this write lock queues every other
        // appender until commit, so seq and prev_hash cannot be taken twice.
        let (seq, prev_hash): (i64, String) = on_tx!(&mut tx, |c| sqlx::query_as(
            "UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash"
        )
        .fetch_one(c)
        .await)?;
        let occurred_at = e.occurred_at.as_micros();
        let recorded_at = Timestamp::now().as_micros();
        let hash = ChainFields {
            seq,
            prev_hash: &prev_hash,
            event_id: &event_id,
            occurred_at,
            recorded_at,
            category: &entry.category,
            action: &entry.action,
            actor: entry.actor.as_deref(),
            subject: entry.subject.as_deref(),
            ip: entry.ip.as_deref(),
            outcome: entry.outcome,
            correlation_id: &e.correlation_id,
            details: &entry.details,
        }
        .hash();
        on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO audit_records (seq, event_id, occurred_at, recorded_at, category, action,
                actor, subject, ip, outcome, correlation_id, details, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        )
        .bind(seq)
        .bind(&event_id)
        .bind(occurred_at)
        .bind(recorded_at)
        .bind(&entry.category)
        .bind(&entry.action)
        .bind(entry.actor.as_deref())
        .bind(entry.subject.as_deref())
        .bind(entry.ip.as_deref())
        .bind(entry.outcome)
        .bind(&e.correlation_id)
        .bind(&entry.details)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE audit_head SET hash = $1 WHERE id = 1"
        )
        .bind(&hash)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        let mut alerts = Vec::new();
        if entry.action == LOGIN_FAILED && self.cfg.failed_login_threshold > 0 {
            let keys = [
                (RULE_FAILED_LOGINS_ACCOUNT, "account", "actor", &entry.actor),
                (RULE_FAILED_LOGINS_IP, "ip", "ip", &entry.ip),
            ];
            for (rule, kind, column, key) in keys {
                if let Some(key) = key {
                    if let Some(a) = self
                        .evaluate(&mut tx, e, seq, rule, kind, column, key)
                        .await?
                    {
                        alerts.push(a);
                    }
                }
            }
        }
        tx.commit().await?;
        self.metrics.records.inc();
        if !alerts.is_empty() {
            for a in &alerts {
                self.metrics
                    .alerts
                    .get_or_create(&AuditMetrics::rule(&a.rule))
                    .inc();
                tracing::warn!(rule = %a.rule, key = %a.key, count = a.count, "audit alert raised");
            }
            self.relay.notify();
        }
        Ok(Some(Appended { seq, hash, alerts }))
    }

    /// One failed-login rule for one key, inside the append's transaction
    /// (which holds the head row, so no other appender evaluates meanwhile).
    #[allow(clippy::too_many_arguments)]
    async fn evaluate(
        &self,
        tx: &mut flowline_store::Tx,
        e: &Envelope,
        seq: i64,
        rule: &str,
        kind: &str,
        column: &str,
        key: &str,
    ) -> Result<Option<Alert>, StoreError> {
        let t = e.occurred_at.as_micros();
        let w = i64::try_from(self.cfg.failed_login_window.as_micros()).unwrap_or(i64::MAX);
        let n = i64::from(self.cfg.failed_login_threshold);
        // Events of one key may arrive out of time order (an address's
        // failures travel in several partitions), so this failure may complete
        // a window that ends after it. Any window of `n` failures that holds
        // it is `n` consecutive failures by time, so the `n` up to it and the
        // `n - 1` after it (within a window each way) are all it takes.
        let before_sql = format!(
            "SELECT occurred_at FROM audit_records
             WHERE action = $1 AND {column} = $2 AND occurred_at > $3 AND occurred_at <= $4
             ORDER BY occurred_at DESC LIMIT $5"
        );
        let mut times: Vec<i64> = on_tx!(&mut *tx, |c| sqlx::query_scalar(&before_sql)
            .bind(LOGIN_FAILED)
            .bind(key)
            .bind(t.saturating_sub(w))
            .bind(t)
            .bind(n)
            .fetch_all(c)
            .await)?;
        times.reverse();
        let Some(p) = times.len().checked_sub(1) else {
            return Ok(None);
        };
        let after_sql = format!(
            "SELECT occurred_at FROM audit_records
             WHERE action = $1 AND {column} = $2 AND occurred_at > $3 AND occurred_at < $4
             ORDER BY occurred_at LIMIT $5"
        );
        let after: Vec<i64> = on_tx!(&mut *tx, |c| sqlx::query_scalar(&after_sql)
            .bind(LOGIN_FAILED)
            .bind(key)
            .bind(t)
            .bind(t.saturating_add(w))
            .bind(n - 1)
            .fetch_all(c)
            .await)?;
        times.extend(after);
        let n = n as usize;
        // The earliest run of `n` that holds this failure and fits in a window.
        let end = (p.saturating_sub(n - 1)..=p).find_map(|i| {
            let last = *times.get(i + n - 1)?;
            (last - times[i] < w).then_some(last)
        });
        let Some(end) = end else {
            return Ok(None);
        };
        let start = end.saturating_sub(w);
        let threshold = n as i64;
        let count_sql = format!(
            "SELECT count(*) FROM audit_records
             WHERE action = $1 AND {column} = $2 AND occurred_at > $3 AND occurred_at <= $4"
        );
        let count: i64 = on_tx!(&mut *tx, |c| sqlx::query_scalar(&count_sql)
            .bind(LOGIN_FAILED)
            .bind(key)
            .bind(start)
            .bind(end)
            .fetch_one(c)
            .await)?;
        let recent: i64 = on_tx!(&mut *tx, |c| sqlx::query_scalar(
            "SELECT count(*) FROM audit_alerts
             WHERE rule = $1 AND alert_key = $2 AND window_end > $3 AND window_end < $4"
        )
        .bind(rule)
        .bind(key)
        .bind(start)
        .bind(end.saturating_add(w))
        .fetch_one(c)
        .await)?;
        if recent > 0 {
            return Ok(None);
        }
        let raised_at = Timestamp::now();
        let payload = serde_json::json!({
            "rule": rule,
            "key_kind": kind,
            "key": key,
            "count": count,
            "threshold": threshold,
            "window_start": rfc3339(start),
            "window_end": rfc3339(end),
            "seq": seq,
            "event_id": e.id.to_string(),
        });
        let draft = EventDraft::new(ALERTS_TOPIC, ALERT_RAISED, format!("{kind}:{key}"), payload);
        let alert_event = Envelope::caused_by(draft, e);
        let id = alert_event.id.to_string();
        on_tx!(&mut *tx, |c| sqlx::query(
            "INSERT INTO audit_alerts (id, rule, key_kind, alert_key, window_start, window_end,
                count, threshold, seq, raised_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )
        .bind(&id)
        .bind(rule)
        .bind(kind)
        .bind(key)
        .bind(start)
        .bind(end)
        .bind(count)
        .bind(threshold)
        .bind(seq)
        .bind(raised_at.as_micros())
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        outbox::enqueue(tx, &alert_event).await?;
        Ok(Some(Alert {
            id,
            rule: rule.to_owned(),
            key_kind: kind.to_owned(),
            key: key.to_owned(),
            count,
            threshold,
            window_start: rfc3339(start),
            window_end: rfc3339(end),
            seq,
            raised_at: raised_at.to_rfc3339(),
        }))
    }

    /// Records matching `filter`, newest first.
    pub async fn query(&self, filter: AuditFilter) -> Result<AuditPage, StoreError> {
        let mut conds: Vec<String> = Vec::new();
        let mut args: Vec<Arg> = Vec::new();
        let mut eq = |column: &str, v: &Option<String>, conds: &mut Vec<String>| {
            if let Some(v) = v {
                args.push(Arg::Text(v.clone()));
                conds.push(format!("{column} = ${}", args.len()));
            }
        };
        eq("actor", &filter.actor, &mut conds);
        eq("category", &filter.category, &mut conds);
        eq("ip", &filter.ip, &mut conds);
        eq("outcome", &filter.outcome, &mut conds);
        if let Some(action) = &filter.action {
            let prefix = action.strip_suffix('*').unwrap_or(action);
            if prefix.ends_with('.') {
                args.push(Arg::Text(prefix.to_owned()));
                let n = args.len();
                conds.push(format!("substr(action, 1, length(${n})) = ${n}"));
            } else {
                args.push(Arg::Text(action.clone()));
                conds.push(format!("action = ${}", args.len()));
            }
        }
        if let Some(from) = filter.from {
            args.push(Arg::Int(from.as_micros()));
            conds.push(format!("occurred_at >= ${}", args.len()));
        }
        if let Some(to) = filter.to {
            args.push(Arg::Int(to.as_micros()));
            conds.push(format!("occurred_at < ${}", args.len()));
        }
        if let Some(c) = filter.cursor {
            args.push(Arg::Int(c));
            conds.push(format!("seq < ${}", args.len()));
        }
        let limit = page_limit(filter.limit);
        args.push(Arg::Int(limit + 1));
        let filter_sql = where_clause(&conds);
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM audit_records {filter_sql} ORDER BY seq DESC LIMIT ${}",
            args.len()
        );
        let mut items = on_pool!(&self.db, |p| {
            let rows = bind_all!(sqlx::query(&sql), &args).fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok(record_row!(r)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|r| r.seq)
        } else {
            None
        };
        Ok(AuditPage { items, next_cursor })
    }

    /// Alerts raised, newest first.
    pub async fn alerts(&self, filter: AlertFilter) -> Result<AlertPage, StoreError> {
        let mut conds: Vec<String> = Vec::new();
        let mut args: Vec<Arg> = Vec::new();
        for (column, v) in [
            ("rule", &filter.rule),
            ("alert_key", &filter.key),
            ("id", &filter.cursor),
        ] {
            if let Some(v) = v {
                args.push(Arg::Text(v.clone()));
                let op = if column == "id" { "<" } else { "=" };
                conds.push(format!("{column} {op} ${}", args.len()));
            }
        }
        let limit = page_limit(filter.limit);
        args.push(Arg::Int(limit + 1));
        let filter_sql = where_clause(&conds);
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM audit_alerts {filter_sql} ORDER BY id DESC LIMIT ${}",
            args.len()
        );
        let mut items = on_pool!(&self.db, |p| {
            let rows = bind_all!(sqlx::query(&sql), &args).fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok(alert_row!(r)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|a| a.id.clone())
        } else {
            None
        };
        Ok(AlertPage { items, next_cursor })
    }
}

/// The consumer of [`TOPICS`] (group [`GROUP`]). Subscribe with the
/// `Arc<Audit>` that [`Audit::open`] returns.
impl Handler for Audit {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        self.append(ev).await?;
        Ok(())
    }
}

/// `WHERE a AND b`, or nothing without conditions.
fn where_clause(conds: &[String]) -> String {
    if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    }
}
