//! The audit context against a real database: SQLite always, PostgreSQL too
//! when `FLOWLINE_TEST_POSTGRES_URL` is set (each run in schemas of its own).
//! Events are fed to the handler as the log would deliver them; tampering is
//! done with raw SQL, as someone with database access would.

use flowline_audit::{verify_with_limit, MAX_FINDINGS};
use flowline_audit::{
    AlertFilter, Audit, AuditConfig, AuditFilter, ChainFields, Finding, FindingKind, VerifyReport,
    ALERTS_TOPIC, ALERT_RAISED, GENESIS_HASH, GROUP, RULE_FAILED_LOGINS_ACCOUNT,
    RULE_FAILED_LOGINS_IP, TOPICS,
};
use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_store::outbox::Relay;
use flowline_store::{on_pool, Backend, Db, Durability, EventLog, Handler, LogOptions};
use serde_json::{json, Value};
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;

struct Env {
    name: &'static str,
    backend: Backend,
    db: Db,
    relay: Relay,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn open(&self, cfg: AuditConfig) -> Arc<Audit> {
        Audit::open_with(self.db.clone(), self.relay.clone(), cfg)
            .await
            .expect("open audit")
    }

    /// Drops this run's PostgreSQL schemas.
    async fn cleanup(self) {
        if let (Backend::Postgres { schema_prefix, .. }, Db::Postgres { pool, .. }) =
            (&self.backend, &self.db)
        {
            let schemas: Vec<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace")
                .fetch_all(pool)
                .await
                .expect("list schemas");
            for s in schemas
                .iter()
                .filter(|s| s.starts_with(schema_prefix.as_str()))
            {
                sqlx::raw_sql(&format!("DROP SCHEMA \"{s}\" CASCADE"))
                    .execute(pool)
                    .await
                    .expect("drop schema");
            }
        }
    }
}

async fn envs() -> Vec<Env> {
    let mut backends = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    backends.push((
        Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Relaxed,
        },
        dir,
    ));
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        backends.push((
            Backend::Postgres {
                url,
                schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
                max_connections: 8,
            },
            tempfile::tempdir().unwrap(),
        ));
    }
    let mut v = Vec::new();
    for (backend, dir) in backends {
        let log = EventLog::open(&backend, LogOptions::default())
            .await
            .unwrap();
        let db = Db::open(&backend, "audit").await.unwrap();
        let relay = Relay::new(db.clone(), log);
        v.push(Env {
            name: backend.name(),
            backend,
            db,
            relay,
            _dir: dir,
        });
    }
    v
}

fn base() -> Timestamp {
    Timestamp::parse_rfc3339("2026-05-01T10:00:00Z").unwrap()
}

fn plus(t: Timestamp, secs: i64) -> Timestamp {
    Timestamp::from_micros(t.as_micros() + secs * 1_000_000)
}

fn event(topic: &str, event_type: &str, key: &str, payload: Value) -> RecordedEvent {
    RecordedEvent {
        partition: flowline_core::event::partition_for(key, 4),
        offset: 0,
        appended_at: Timestamp::now(),
        envelope: Envelope::stamp(
            EventDraft::new(topic, event_type, key, payload),
            &flowline_core::id::new_correlation_id(),
            Some("req-1"),
        ),
    }
}

fn at(mut e: RecordedEvent, t: Timestamp) -> RecordedEvent {
    e.envelope.occurred_at = t;
    e
}

/// As identity publishes a failed login with a wrong password.
fn login_failed(masked: &str, ip: &str, t: Timestamp) -> RecordedEvent {
    at(
        event(
            "audit.events",
            "auth.login_failed",
            masked,
            json!({"email": masked, "ip": ip, "user_agent": "curl/8", "reason": "invalid_credentials"}),
        ),
        t,
    )
}

/// A varied stream, as identity and the other contexts publish it: seven
/// recorded events and one (`user.updated`) that is not security-relevant.
fn stream() -> Vec<RecordedEvent> {
    let t = base();
    vec![
        at(
            event(
                "audit.events",
                "auth.login_succeeded",
                "u1",
                json!({"user_id": "u1", "session_id": "s1", "ip": "10.0.0.1", "user_agent": "Firefox"}),
            ),
            t,
        ),
        login_failed("a***@example.com", "10.0.0.2", plus(t, 60)),
        at(
            event(
                "user.events",
                "user.updated",
                "u2",
                json!({"user_id": "u2", "display_name": "Bo"}),
            ),
            plus(t, 90),
        ),
        at(
            event(
                "audit.events",
                "admin.user_banned",
                "u2",
                json!({"user_id": "u2", "admin_id": "u1"}),
            ),
            plus(t, 120),
        ),
        at(
            event(
                "user.events",
                "user.banned",
                "u2",
                json!({"user_id": "u2", "banned_by": "u1"}),
            ),
            plus(t, 121),
        ),
        at(
            event(
                "audit.events",
                "auth.permission_denied",
                "u3",
                json!({"user_id": "u3", "ip": "10.0.0.3", "route": "/api/v1/admin/audit"}),
            ),
            plus(t, 180),
        ),
        at(
            event(
                "audit.events",
                "data.exported",
                "u1",
                json!({"user_id": "u1", "ip": "10.0.0.1", "format": "csv", "rows": 120}),
            ),
            plus(t, 240),
        ),
        at(
            event(
                "audit.events",
                "auth.refresh_token_reused",
                "u1",
                json!({"user_id": "u1", "session_id": "s1"}),
            ),
            plus(t, 300),
        ),
    ]
}

async fn feed(audit: &Arc<Audit>, events: &[RecordedEvent]) {
    for e in events {
        audit.handle(e).await.expect("handle");
    }
}

async fn exec(db: &Db, sql: &str) -> u64 {
    on_pool!(write db, |p| sqlx::query(sql).execute(p).await.map(|r| r.rows_affected())).expect(sql)
}

async fn scalar(db: &Db, sql: &str) -> i64 {
    on_pool!(write db, |p| sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await).expect(sql)
}

/// The `audit.alert_raised` events waiting in the outbox, oldest first.
async fn alert_events(db: &Db) -> Vec<(String, Value, Option<String>, String)> {
    let rows: Vec<(String, String, Option<String>, String)> = on_pool!(write db, |p| {
        sqlx::query_as(
            "SELECT topic, payload, causation_id, correlation_id FROM outbox
             WHERE event_type = 'audit.alert_raised' ORDER BY id",
        )
        .fetch_all(p)
        .await
    })
    .unwrap();
    rows.into_iter()
        .map(|(t, p, c, k)| (t, serde_json::from_str(&p).unwrap(), c, k))
        .collect()
}

async fn verified(audit: &Audit) -> VerifyReport {
    audit.verify().await.expect("verify")
}

fn kinds(r: &VerifyReport) -> Vec<(i64, FindingKind)> {
    r.findings.iter().map(|f| (f.seq, f.kind)).collect()
}

/// Rewrites record `seq`'s details and, as a careful attacker would, its hash.
async fn rewrite_with_hash(db: &Db, seq: i64, details: &str) {
    let sql = format!(
        "SELECT seq, event_id, occurred_at, recorded_at, category, action, actor, subject, ip,
                outcome, correlation_id, details, prev_hash FROM audit_records WHERE seq = {seq}"
    );
    let hash = on_pool!(write db, |p| async {
        let r = sqlx::query(&sql).fetch_one(p).await?;
        let (event_id, category, action): (String, String, String) = (
            r.try_get("event_id")?,
            r.try_get("category")?,
            r.try_get("action")?,
        );
        let (actor, subject, ip): (Option<String>, Option<String>, Option<String>) =
            (r.try_get("actor")?, r.try_get("subject")?, r.try_get("ip")?);
        let (outcome, corr, prev): (String, String, String) = (
            r.try_get("outcome")?,
            r.try_get("correlation_id")?,
            r.try_get("prev_hash")?,
        );
        Ok::<_, sqlx::Error>(
            ChainFields {
                seq,
                prev_hash: &prev,
                event_id: &event_id,
                occurred_at: r.try_get("occurred_at")?,
                recorded_at: r.try_get("recorded_at")?,
                category: &category,
                action: &action,
                actor: actor.as_deref(),
                subject: subject.as_deref(),
                ip: ip.as_deref(),
                outcome: &outcome,
                correlation_id: &corr,
                details,
            }
            .hash(),
        )
    }
    .await)
    .unwrap();
    let n = on_pool!(write db, |p| sqlx::query(
        "UPDATE audit_records SET details = $1, hash = $2 WHERE seq = $3"
    )
    .bind(details)
    .bind(&hash)
    .bind(seq)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))
    .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_events_form_a_chain_that_verifies() {
    assert_eq!(GROUP, "audit");
    assert_eq!(TOPICS, &["audit.events", "user.events"]);
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        let empty = verified(&audit).await;
        assert!(empty.is_ok() && empty.ok, "{}: {empty:?}", env.name);
        assert_eq!(
            (empty.records, empty.head_seq, empty.head_hash.as_str()),
            (0, 0, GENESIS_HASH)
        );

        let events = stream();
        feed(&audit, &events).await;
        let page = audit.query(AuditFilter::default()).await.unwrap();
        let mut recs = page.items.clone();
        recs.reverse();
        assert_eq!(recs.len(), 7, "{}: user.updated is not recorded", env.name);
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
        assert_eq!(recs[0].prev_hash, GENESIS_HASH);
        for w in recs.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash, "{}: seq {}", env.name, w[1].seq);
            assert_ne!(w[1].hash, w[0].hash);
        }
        let recorded: Vec<&RecordedEvent> = events
            .iter()
            .filter(|e| e.envelope.event_type != "user.updated")
            .collect();
        for (r, e) in recs.iter().zip(&recorded) {
            assert_eq!(r.event_id, e.envelope.id.to_string());
            assert_eq!(r.action, e.envelope.event_type);
            assert_eq!(r.occurred_at, e.envelope.occurred_at.to_rfc3339());
            assert_eq!(r.correlation_id, e.envelope.correlation_id);
            assert_eq!(r.details, e.envelope.payload);
        }
        let failed = &recs[1];
        assert_eq!(
            (
                failed.category.as_str(),
                failed.actor.as_deref(),
                failed.ip.as_deref(),
                failed.outcome.as_str()
            ),
            (
                "authentication",
                Some("a***@example.com"),
                Some("10.0.0.2"),
                "failure"
            )
        );
        let ban = &recs[2];
        assert_eq!(
            (
                ban.category.as_str(),
                ban.actor.as_deref(),
                ban.subject.as_deref()
            ),
            ("admin", Some("u1"), Some("u2"))
        );
        assert_eq!(
            (recs[3].action.as_str(), recs[3].category.as_str()),
            ("user.banned", "account")
        );
        assert_eq!(
            (recs[4].category.as_str(), recs[4].outcome.as_str()),
            ("authorization", "failure")
        );
        assert_eq!(
            (recs[5].category.as_str(), recs[5].outcome.as_str()),
            ("data", "success")
        );

        let report = verified(&audit).await;
        assert!(report.is_ok(), "{}: {report:?}", env.name);
        assert_eq!(
            (report.records, report.head_seq, report.head_hash.as_str()),
            (7, 7, recs[6].hash.as_str())
        );
        assert_eq!(audit.head().await.unwrap(), (7, recs[6].hash.clone()));
        assert_eq!(audit.metrics().records.get(), 7);
        // The report is what a CLI prints with --json.
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], true);
        assert_eq!(json["head_seq"], 7);
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_record_is_reported_by_seq() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        feed(&audit, &stream()).await;
        let n = exec(
            &env.db,
            r#"UPDATE audit_records SET details = '{"user_id":"someone-else"}' WHERE seq = 3"#,
        )
        .await;
        assert_eq!(n, 1);
        let r = verified(&audit).await;
        assert!(!r.is_ok() && !r.ok);
        assert_eq!(
            kinds(&r),
            vec![(3, FindingKind::Edited)],
            "{}: {r:?}",
            env.name
        );
        assert_eq!(r.records, 7);

        // Any column counts, the actor as much as the details.
        exec(
            &env.db,
            "UPDATE audit_records SET actor = 'nobody' WHERE seq = 6",
        )
        .await;
        let r = verified(&audit).await;
        assert_eq!(
            kinds(&r),
            vec![(3, FindingKind::Edited), (6, FindingKind::Edited)],
            "{}",
            env.name
        );
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_middle_record_is_reported() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        feed(&audit, &stream()).await;
        assert_eq!(
            exec(&env.db, "DELETE FROM audit_records WHERE seq = 4").await,
            1
        );
        let r = verified(&audit).await;
        assert_eq!(
            kinds(&r),
            vec![(4, FindingKind::Deleted)],
            "{}: {r:?}",
            env.name
        );
        assert!(r.findings[0].detail.contains("record 4 is missing"));
        assert_eq!(r.records, 6);

        // Several in a row, at the start.
        exec(&env.db, "DELETE FROM audit_records WHERE seq IN (1, 2)").await;
        let r = verified(&audit).await;
        assert_eq!(
            r.findings[0],
            Finding {
                seq: 1,
                kind: FindingKind::Deleted,
                detail: "records 1 to 2 are missing: the chain jumps from 0 to 3".into()
            }
        );
        assert_eq!(kinds(&r).len(), 2, "{r:?}");
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_last_record_is_a_head_mismatch() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        feed(&audit, &stream()).await;
        exec(&env.db, "DELETE FROM audit_records WHERE seq = 7").await;
        let r = verified(&audit).await;
        assert_eq!(
            kinds(&r),
            vec![(7, FindingKind::HeadMismatch)],
            "{}: {r:?}",
            env.name
        );
        assert_eq!((r.records, r.head_seq), (6, 7));
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_record_with_a_fixed_hash_breaks_the_next_link() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        feed(&audit, &stream()).await;
        rewrite_with_hash(&env.db, 3, r#"{"user_id":"u2","admin_id":"u9"}"#).await;
        let r = verified(&audit).await;
        assert_eq!(
            kinds(&r),
            vec![(4, FindingKind::BrokenLink)],
            "{}: record 3 itself hashes fine now, record 4 no longer points at it: {r:?}",
            env.name
        );

        // The last record rewritten the same way: only the head still knows.
        rewrite_with_hash(&env.db, 7, r#"{"user_id":"u9"}"#).await;
        let r = verified(&audit).await;
        assert_eq!(
            kinds(&r),
            vec![(4, FindingKind::BrokenLink), (7, FindingKind::HeadMismatch)],
            "{}: {r:?}",
            env.name
        );
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_added_past_the_head_is_reported() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        feed(&audit, &stream()[..2]).await;
        let (seq, head) = audit.head().await.unwrap();
        assert_eq!(seq, 2);
        let fields = ChainFields {
            seq: 3,
            prev_hash: &head,
            event_id: "forged",
            occurred_at: 1,
            recorded_at: 1,
            category: "admin",
            action: "admin.user_unbanned",
            actor: Some("u1"),
            subject: None,
            ip: None,
            outcome: "success",
            correlation_id: "c",
            details: "{}",
        };
        let sql = format!(
            "INSERT INTO audit_records (seq, event_id, occurred_at, recorded_at, category, action,
                actor, outcome, correlation_id, details, prev_hash, hash)
             VALUES (3, 'forged', 1, 1, 'admin', 'admin.user_unbanned', 'u1', 'success', 'c', '{{}}',
                '{head}', '{}')",
            fields.hash()
        );
        exec(&env.db, &sql).await;
        let r = verified(&audit).await;
        assert_eq!(
            kinds(&r),
            vec![(3, FindingKind::HeadMismatch)],
            "{}: {r:?}",
            env.name
        );
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_edit_report_is_capped_and_says_it_was_truncated() {
    assert_eq!(MAX_FINDINGS, 1000);
    for env in envs().await {
        let name = env.name;
        let audit = env.open(AuditConfig::default()).await;
        feed(&audit, &stream()).await;
        let intact = verified(&audit).await;
        assert!(intact.is_ok() && !intact.truncated, "{name}: {intact:?}");
        assert_eq!(serde_json::to_value(&intact).unwrap()["truncated"], false);

        // Every row edited: one finding per record.
        let n = exec(
            &env.db,
            r#"UPDATE audit_records SET details = '{"bulk":true}'"#,
        )
        .await;
        assert_eq!(n, 7);
        let all = verified(&audit).await;
        assert_eq!(all.findings.len(), 7, "{name}: {all:?}");
        assert!(!all.truncated && !all.is_ok() && !all.ok, "{name}");

        // With a limit of 3 only the first three are listed, but every record
        // is still read and counted, and the chain is still not ok.
        let r = verify_with_limit(&env.db, 3).await.unwrap();
        assert_eq!(
            kinds(&r),
            vec![
                (1, FindingKind::Edited),
                (2, FindingKind::Edited),
                (3, FindingKind::Edited)
            ],
            "{name}: {r:?}"
        );
        assert!(r.truncated && !r.is_ok() && !r.ok, "{name}");
        assert_eq!((r.records, r.head_seq), (7, 7), "{name}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (&json["truncated"], &json["ok"], &json["records"]),
            (&json!(true), &json!(false), &json!(7)),
            "{name}"
        );

        // A limit of 0 lists nothing and still says the chain does not hold.
        let r = verify_with_limit(&env.db, 0).await.unwrap();
        assert!(r.findings.is_empty() && r.truncated && !r.is_ok() && !r.ok);
        // Exactly at the limit is not truncated.
        let r = verify_with_limit(&env.db, 7).await.unwrap();
        assert_eq!((r.findings.len(), r.truncated), (7, false), "{name}");
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_appends_nothing() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        let e = stream().remove(0);
        let first = audit.append(&e).await.unwrap().expect("appended");
        assert_eq!(first.seq, 1);
        assert!(audit.append(&e).await.unwrap().is_none());
        audit.handle(&e).await.unwrap();
        // A replay after the inbox was pruned: the chain knows the event.
        exec(&env.db, "DELETE FROM inbox").await;
        assert!(audit.append(&e).await.unwrap().is_none());
        assert_eq!(
            scalar(&env.db, "SELECT count(*) FROM audit_records").await,
            1
        );
        assert_eq!(audit.head().await.unwrap().0, 1);
        // An ignored type claims nothing and appends nothing.
        let ignored = event(
            "user.events",
            "user.registered",
            "u5",
            json!({"user_id": "u5"}),
        );
        assert!(audit.append(&ignored).await.unwrap().is_none());
        let next = audit.append(&stream().remove(1)).await.unwrap().unwrap();
        assert_eq!((next.seq, next.alerts.len()), (2, 0));
        assert!(verified(&audit).await.is_ok());
        assert_eq!(audit.metrics().records.get(), 2);
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_for_one_account_alert_once_per_window() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        let acct = "a***@example.com";
        let t0 = base();
        // Four failures, from four addresses (so the per-IP rule stays quiet).
        for i in 0..4 {
            let e = login_failed(acct, &format!("10.1.0.{i}"), plus(t0, i * 10));
            let a = audit.append(&e).await.unwrap().unwrap();
            assert!(a.alerts.is_empty(), "{}: failure {}", env.name, i + 1);
        }
        assert!(alert_events(&env.db).await.is_empty());
        // The fifth within five minutes raises exactly one alert.
        let fifth = login_failed(acct, "10.1.0.4", plus(t0, 40));
        let a = audit.append(&fifth).await.unwrap().unwrap();
        assert_eq!(a.alerts.len(), 1, "{}", env.name);
        assert_eq!(a.alerts[0].rule, RULE_FAILED_LOGINS_ACCOUNT);
        let events = alert_events(&env.db).await;
        assert_eq!(events.len(), 1, "{}", env.name);
        let (topic, p, cause, corr) = &events[0];
        assert_eq!(topic, ALERTS_TOPIC);
        assert_eq!(p["rule"], RULE_FAILED_LOGINS_ACCOUNT);
        assert_eq!(p["key_kind"], "account");
        assert_eq!(p["key"], acct);
        assert_eq!(p["count"], 5);
        assert_eq!(p["threshold"], 5);
        assert_eq!(p["window_end"], plus(t0, 40).to_rfc3339());
        assert_eq!(p["window_start"], plus(t0, 40 - 300).to_rfc3339());
        assert_eq!(p["seq"], 5);
        assert_eq!(
            cause.as_deref(),
            Some(fifth.envelope.id.to_string().as_str())
        );
        assert_eq!(corr, &fifth.envelope.correlation_id);
        assert_eq!(
            scalar(
                &env.db,
                &format!("SELECT count(*) FROM outbox WHERE event_type = '{ALERT_RAISED}'")
            )
            .await,
            1
        );

        // A second burst inside the window: the same attack, no new alert.
        for i in 0..5 {
            let e = login_failed(acct, &format!("10.2.0.{i}"), plus(t0, 45 + i * 10));
            assert!(audit.append(&e).await.unwrap().unwrap().alerts.is_empty());
        }
        assert_eq!(alert_events(&env.db).await.len(), 1, "{}", env.name);

        // A burst well after the window is a new alert, at its fifth failure.
        let t1 = plus(t0, 20 * 60);
        for i in 0..5 {
            let e = login_failed(acct, &format!("10.3.0.{i}"), plus(t1, i));
            let a = audit.append(&e).await.unwrap().unwrap();
            assert_eq!(a.alerts.len(), usize::from(i == 4), "{}: {i}", env.name);
        }
        let events = alert_events(&env.db).await;
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].1["window_end"], plus(t1, 4).to_rfc3339());

        let listed = audit.alerts(AlertFilter::default()).await.unwrap();
        assert_eq!(listed.items.len(), 2);
        assert_eq!(
            listed.items[0].window_end,
            plus(t1, 4).to_rfc3339(),
            "newest first"
        );
        assert!(listed
            .items
            .iter()
            .all(|a| a.key == acct && a.key_kind == "account"));
        let m = audit
            .metrics()
            .alerts
            .get_or_create(&flowline_audit::RuleLabels {
                rule: RULE_FAILED_LOGINS_ACCOUNT.into(),
            })
            .get();
        assert_eq!(m, 2);
        assert!(verified(&audit).await.is_ok());
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_address_alert_and_spread_out_ones_do_not() {
    for env in envs().await {
        let audit = env.open(AuditConfig::default()).await;
        let t0 = base();
        // Ten failures, two minutes apart: never five within five minutes.
        for i in 0..10 {
            let e = login_failed(
                &format!("s{i}***@example.com"),
                "198.51.100.1",
                plus(t0, i * 120),
            );
            assert!(audit.append(&e).await.unwrap().unwrap().alerts.is_empty());
        }
        assert!(alert_events(&env.db).await.is_empty(), "{}", env.name);

        // Five accounts from one address within a minute.
        let ip = "203.0.113.7";
        for i in 0..5 {
            let e = login_failed(&format!("x{i}***@example.com"), ip, plus(t0, 3600 + i));
            let a = audit.append(&e).await.unwrap().unwrap();
            assert_eq!(a.alerts.len(), usize::from(i == 4));
        }
        let events = alert_events(&env.db).await;
        assert_eq!(events.len(), 1, "{}", env.name);
        assert_eq!(events[0].1["rule"], RULE_FAILED_LOGINS_IP);
        assert_eq!(events[0].1["key_kind"], "ip");
        assert_eq!(events[0].1["key"], ip);

        // One account from one address: both rules fire on the same failure.
        let t2 = plus(t0, 7200);
        for i in 0..5 {
            let e = login_failed("z***@example.com", "192.0.2.9", plus(t2, i));
            let a = audit.append(&e).await.unwrap().unwrap();
            if i == 4 {
                let mut rules: Vec<&str> = a.alerts.iter().map(|a| a.rule.as_str()).collect();
                rules.sort();
                assert_eq!(rules, [RULE_FAILED_LOGINS_ACCOUNT, RULE_FAILED_LOGINS_IP]);
            }
        }
        assert_eq!(alert_events(&env.db).await.len(), 3);
        let only_ip = audit
            .alerts(AlertFilter {
                rule: Some(RULE_FAILED_LOGINS_IP.into()),
                ..AlertFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(only_ip.items.len(), 2);

        // Out of time order, as two partitions caught up one after the other
        // deliver them: the late failures complete the window that holds them.
        let t4 = plus(t0, 9000);
        for (i, s) in [1, 3, 5, 2, 4].into_iter().enumerate() {
            let e = login_failed(&format!("r{i}***@example.com"), "192.0.2.77", plus(t4, s));
            let a = audit.append(&e).await.unwrap().unwrap();
            assert_eq!(a.alerts.len(), usize::from(i == 4), "{}: {i}", env.name);
            if i == 4 {
                assert_eq!(a.alerts[0].window_end, plus(t4, 5).to_rfc3339());
                assert_eq!(a.alerts[0].count, 5);
            }
        }
        assert_eq!(alert_events(&env.db).await.len(), 4);

        // The threshold and window are settings.
        let strict = env
            .open(AuditConfig {
                failed_login_threshold: 2,
                failed_login_window: Duration::from_secs(10),
            })
            .await;
        let t3 = plus(t0, 10_800);
        let e = login_failed("q***@example.com", "192.0.2.50", t3);
        assert!(strict.append(&e).await.unwrap().unwrap().alerts.is_empty());
        let e = login_failed("q***@example.com", "192.0.2.51", plus(t3, 11));
        assert!(
            strict.append(&e).await.unwrap().unwrap().alerts.is_empty(),
            "outside the 10 s window"
        );
        let e = login_failed("q***@example.com", "192.0.2.52", plus(t3, 12));
        assert_eq!(strict.append(&e).await.unwrap().unwrap().alerts.len(), 1);
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_keep_one_gapless_chain_and_alert_once() {
    for env in envs().await {
        let a1 = env.open(AuditConfig::default()).await;
        // A second instance with its own pool on PostgreSQL, as another node.
        let a2 = match &env.backend {
            Backend::Postgres { .. } => {
                let db = Db::open(&env.backend, "audit").await.unwrap();
                Audit::open(db, env.relay.clone()).await.unwrap()
            }
            Backend::Sqlite { .. } => env.open(AuditConfig::default()).await,
        };
        let t0 = base();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let audit = if i % 2 == 0 { a1.clone() } else { a2.clone() };
            // Every failure for one account, within a minute.
            let e = login_failed("c***@example.com", &format!("10.9.0.{i}"), plus(t0, i));
            tasks.push(tokio::spawn(async move { audit.handle(&e).await }));
        }
        for t in tasks {
            t.await.unwrap().expect("append");
        }
        let r = verified(&a1).await;
        assert!(r.is_ok(), "{}: {r:?}", env.name);
        assert_eq!((r.records, r.head_seq), (40, 40));
        assert_eq!(
            scalar(&env.db, "SELECT count(DISTINCT seq) FROM audit_records").await,
            40
        );
        assert_eq!(
            alert_events(&env.db).await.len(),
            1,
            "{}: forty failures within a window are one alert",
            env.name
        );
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_and_pages_by_cursor() {
    for env in envs().await {
        let audit = env
            .open(AuditConfig {
                failed_login_threshold: 0,
                ..AuditConfig::default()
            })
            .await;
        feed(&audit, &stream()).await;
        let t = base();
        // 12 more failures a minute apart, two accounts, one address in three.
        for i in 0..12 {
            let acct = if i % 2 == 0 { "e***@x.io" } else { "o***@x.io" };
            let ip = if i % 3 == 0 {
                "172.16.0.1"
            } else {
                "172.16.0.2"
            };
            feed(&audit, &[login_failed(acct, ip, plus(t, 600 + i * 60))]).await;
        }
        let q = |f: AuditFilter| {
            let audit = audit.clone();
            async move { audit.query(f).await.unwrap().items }
        };
        let all = q(AuditFilter {
            limit: 500,
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(all.len(), 19);
        assert!(all.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");

        let failed = q(AuditFilter {
            action: Some("auth.login_failed".into()),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(failed.len(), 13, "{}", env.name);
        let auth = q(AuditFilter {
            action: Some("auth.".into()),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(auth.len(), 16);
        assert!(auth.iter().all(|r| r.action.starts_with("auth.")));
        let star = q(AuditFilter {
            action: Some("auth.*".into()),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(star, auth);
        let not_a_prefix = q(AuditFilter {
            action: Some("auth".into()),
            ..AuditFilter::default()
        })
        .await;
        assert!(not_a_prefix.is_empty(), "without the dot it is exact");

        let even = q(AuditFilter {
            actor: Some("e***@x.io".into()),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(even.len(), 6);
        let admin = q(AuditFilter {
            category: Some("admin".into()),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(admin.len(), 1);
        assert_eq!(admin[0].action, "admin.user_banned");
        let from_ip = q(AuditFilter {
            ip: Some("172.16.0.1".into()),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(from_ip.len(), 4);
        let failures = q(AuditFilter {
            outcome: Some("failure".into()),
            ..AuditFilter::default()
        })
        .await;
        // 13 failed logins, the denial, the reused refresh token.
        assert_eq!(failures.len(), 15);
        let combined = q(AuditFilter {
            actor: Some("o***@x.io".into()),
            ip: Some("172.16.0.1".into()),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(combined.len(), 2, "i = 3 and 9");

        // [t + 10 min, t + 13 min): the failures i = 0, 1, 2.
        let window = q(AuditFilter {
            from: Some(plus(t, 600)),
            to: Some(plus(t, 780)),
            ..AuditFilter::default()
        })
        .await;
        assert_eq!(window.len(), 3, "{}", env.name);
        assert_eq!(window[0].occurred_at, plus(t, 720).to_rfc3339());
        assert_eq!(window[2].occurred_at, plus(t, 600).to_rfc3339());

        // Pages of 5 over the 13 failures: 5, 5, 3, same records, in order.
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = audit
                .query(AuditFilter {
                    action: Some("auth.login_failed".into()),
                    limit: 5,
                    cursor,
                    ..AuditFilter::default()
                })
                .await
                .unwrap();
            pages += 1;
            seen.extend(page.items.iter().map(|r| r.seq));
            match page.next_cursor {
                Some(c) => {
                    assert_eq!(page.items.len(), 5);
                    cursor = Some(c);
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, failed.iter().map(|r| r.seq).collect::<Vec<_>>());
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_registered_under_their_names() {
    let env = envs().await.remove(0);
    let audit = env.open(AuditConfig::default()).await;
    let mut registry = prometheus_client::registry::Registry::default();
    audit.register_metrics(&mut registry);
    for i in 0..5 {
        let e = login_failed(&format!("m{i}***@x.io"), "192.0.2.200", plus(base(), i));
        audit.handle(&e).await.unwrap();
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("flowline_audit_records_total 5"), "{text}");
    assert!(
        text.contains("flowline_audit_alerts_total{rule=\"failed_logins_ip\"} 1"),
        "{text}"
    );
    env.cleanup().await;
}

mod http {
    use super::*;
    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use tower::ServiceExt;
    use utoipa::OpenApi;

    async fn get(router: &axum::Router, uri: &str) -> (StatusCode, Option<String>, Value) {
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let res = router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let ct = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, ct, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_admin_routes_answer_and_bad_parameters_are_400_problems() {
        for env in envs().await {
            let audit = env.open(AuditConfig::default()).await;
            feed(&audit, &stream()).await;
            let router: axum::Router =
                axum::Router::new().nest("/api/v1", flowline_audit::routes(audit.clone()));

            for (uri, field) in [
                ("/api/v1/admin/audit?limit=0", Some("limit")),
                ("/api/v1/admin/audit?limit=501", Some("limit")),
                ("/api/v1/admin/audit?limit=ten", None),
                ("/api/v1/admin/audit?from=yesterday", Some("from")),
                (
                    "/api/v1/admin/audit?from=2026-05-01T11:00:00Z&to=2026-05-01T10:00:00Z",
                    Some("to"),
                ),
                ("/api/v1/admin/audit?outcome=maybe", Some("outcome")),
                ("/api/v1/admin/audit?cursor=0", Some("cursor")),
                ("/api/v1/admin/audit?bogus=1", None),
                ("/api/v1/admin/audit/alerts?limit=1000", Some("limit")),
            ] {
                let (s, ct, p) = get(&router, uri).await;
                assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {p}");
                assert_eq!(ct.as_deref(), Some("application/problem+json"), "{uri}");
                assert_eq!(p["code"], "malformed_request", "{uri}: {p}");
                assert_eq!(p["status"], 400);
                if let Some(f) = field {
                    assert_eq!(p["errors"][0]["field"], f, "{uri}: {p}");
                }
            }

            let (s, _, page) = get(&router, "/api/v1/admin/audit?action=auth.&limit=2").await;
            assert_eq!(s, StatusCode::OK, "{page}");
            let items = page["items"].as_array().unwrap();
            assert_eq!(items.len(), 2);
            assert_eq!(items[0]["action"], "auth.refresh_token_reused");
            let cursor = page["next_cursor"].as_i64().unwrap();
            let (_, rest) = {
                let (s, _, v) = get(
                    &router,
                    &format!("/api/v1/admin/audit?action=auth.&cursor={cursor}"),
                )
                .await;
                (s, v)
            };
            let rest = rest["items"].as_array().unwrap();
            assert_eq!(rest.len(), 2, "login_failed and login_succeeded");
            assert_eq!(rest[1]["action"], "auth.login_succeeded");
            let (_, _, windowed) = get(
                &router,
                "/api/v1/admin/audit?from=2026-05-01T10:02:00Z&to=2026-05-01T10:03:00Z",
            )
            .await;
            assert_eq!(windowed["items"].as_array().unwrap().len(), 2, "{windowed}");

            let (s, _, report) = get(&router, "/api/v1/admin/audit/verify").await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(report["ok"], true, "{report}");
            assert_eq!(report["records"], 7);
            let (s, _, alerts) = get(&router, "/api/v1/admin/audit/alerts").await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(alerts["items"], json!([]));

            exec(
                &env.db,
                "UPDATE audit_records SET ip = '1.2.3.4' WHERE seq = 2",
            )
            .await;
            let (_, _, report) = get(&router, "/api/v1/admin/audit/verify").await;
            assert_eq!(report["ok"], false);
            assert_eq!(report["findings"][0]["seq"], 2);
            assert_eq!(report["findings"][0]["kind"], "edited");
            env.cleanup().await;
        }
    }

    #[test]
    fn the_openapi_part_documents_every_route() {
        let doc = flowline_audit::AuditApi::openapi();
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        for p in [
            "/api/v1/admin/audit",
            "/api/v1/admin/audit/alerts",
            "/api/v1/admin/audit/verify",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p} in {paths:?}");
        }
    }
}
