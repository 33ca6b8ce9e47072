//! Analytics against a real database: SQLite always, PostgreSQL too when
//! `FLOWLINE_TEST_POSTGRES_URL` is set (each run in its own schemas).
//!
//! Every expected number below is computed by hand from a fixed event set
//! (times are 2025-11-22, UTC: in the past, since an event time counts for the
//! watermark at most `MAX_CLOCK_SKEW` past the wall clock) with the default
//! settings, allowed lateness 1 min, session gap 30 min, and one watermark
//! for all sources (`idle_timeout` zero): watermark = max event time − 5 s,
//! in delivery order. That is what those tests are about (window arithmetic,
//! lateness, duplicates, crashes); the per-source watermark (the default) has
//! tests of its own, with events placed on explicit partitions.

use flowline_analytics::{
    Analytics, AnalyticsConfig, JobStats, Window, ACTIVE_USERS, ALL, ENDPOINT_LATENCY, GROUP,
    LOGIN_FAILURES_PER_MINUTE, MESSAGES_PER_CHANNEL, ORDERS_PER_MINUTE, SESSION_DURATION, TOPICS,
};
use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_store::{Backend, ConsumerOptions, Db, Durability, EventLog, Handler, LogOptions};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

struct Env {
    name: &'static str,
    backend: Backend,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A database of its own (`service` names the file or schema).
    async fn db(&self, service: &str) -> Db {
        Db::open(&self.backend, service).await.unwrap()
    }
}

fn envs() -> Vec<Env> {
    let dir = tempfile::tempdir().unwrap();
    let mut v = vec![Env {
        name: "sqlite",
        backend: Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Relaxed,
        },
        _dir: dir,
    }];
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        v.push(Env {
            name: "postgres",
            backend: Backend::Postgres {
                url,
                schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
                max_connections: 4,
            },
            _dir: tempfile::tempdir().unwrap(),
        });
    }
    v
}

/// `10:00:05` (or `10:00:05.5`) on the test day.
fn at(hms: &str) -> Timestamp {
    Timestamp::parse_rfc3339(&format!("2025-11-22T{hms}Z")).unwrap()
}

fn event(topic: &str, ty: &str, key: &str, time: &str, payload: Value) -> RecordedEvent {
    let mut envelope = Envelope::stamp(EventDraft::new(topic, ty, key, payload), "corr", None);
    envelope.occurred_at = at(time);
    RecordedEvent {
        partition: flowline_core::event::partition_for(key, 4),
        offset: 0,
        appended_at: Timestamp::now(),
        envelope,
    }
}

fn login(user: &str, time: &str) -> RecordedEvent {
    event(
        "audit.events",
        "auth.login_succeeded",
        user,
        time,
        json!({"user_id": user, "session_id": "s", "ip": "10.0.0.1", "user_agent": "t"}),
    )
}

fn login_failed(time: &str) -> RecordedEvent {
    event(
        "audit.events",
        "auth.login_failed",
        "a***@example.com",
        time,
        json!({"email": "a***@example.com", "ip": "10.0.0.1", "reason": "invalid_credentials"}),
    )
}

fn order(id: &str, user: &str, time: &str, amount: i64, currency: &str) -> RecordedEvent {
    event(
        "orders.events",
        "order.created",
        id,
        time,
        json!({"order_id": id, "order_number": "1", "user_id": user, "status": "PENDING",
            "total": {"amount": amount, "currency": currency}, "items": []}),
    )
}

fn message(channel: &str, author: &str, time: &str) -> RecordedEvent {
    event(
        "messaging.messages",
        "message.sent",
        channel,
        time,
        json!({"channel_id": channel, "workspace_id": "w", "seq": 1,
            "message": {"id": format!("m-{time}"), "channel_id": channel, "seq": 1,
                "author_id": author, "body": "hi", "created_at": time, "deleted": false}}),
    )
}

fn samples(time: &str, list: &[(&str, &str, f64, &str)]) -> RecordedEvent {
    let samples: Vec<Value> = list
        .iter()
        .map(|(m, r, d, t)| {
            json!({"method": m, "route": r, "status": 200, "duration_ms": d,
                "at": format!("2025-11-22T{t}Z")})
        })
        .collect();
    event(
        "gateway.requests",
        "http.requests_sampled",
        "node-a",
        time,
        json!({"node": "node-a", "samples": samples}),
    )
}

/// The fixed set, in delivery order: three minutes of orders, logins,
/// failures and messages, with out-of-order, late, too-late and duplicated
/// deliveries. Comments give each job's watermark after the event.
fn fixed_set() -> Vec<RecordedEvent> {
    let o2 = order("o2", "u2", "10:00:40", 2500, "BRL");
    vec![
        login("u1", "10:00:05"),
        order("o1", "u1", "10:00:10", 1000, "BRL"),
        message("ch-a", "u2", "10:00:20"),
        login_failed("10:00:25"),
        o2.clone(),
        order("o3", "u1", "10:00:50", 700, "USD"),
        login_failed("10:00:55"),
        order("o4", "u3", "10:01:05", 300, "BRL"),
        message("ch-a", "u1", "10:01:10"),
        message("ch-b", "u3", "10:01:20"), // index 9: the crash comes after this one
        order("o5", "u2", "10:01:30", 1200, "BRL"),
        login_failed("10:01:45"),                   // failures wm 10:01:40
        order("o6", "u1", "10:02:20", 4000, "BRL"), // orders wm 10:02:15
        message("ch-b", "u4", "10:02:30"),          // messages and active users wm 10:02:25
        // Late but within lateness: [10:01, 10:02) is passed, not final.
        order("o7", "u4", "10:01:50", 800, "BRL"),
        // Too late for orders: [10:00, 10:01) is final (10:02 + 0 ≤ 10:02:15).
        order("o8", "u5", "10:00:55", 5000, "USD"),
        // The same event delivered again.
        o2,
        // Late for failures: [10:00, 10:01) passed (wm 10:01:40), final at 10:02.
        login_failed("10:00:58"),
        order("o9", "u2", "10:02:50", 900, "USD"), // orders, active users wm 10:02:45
        // Too late for messages ([10:00, 10:01) final at wm 10:02:25).
        message("ch-a", "u5", "10:00:30"),
    ]
}

/// The defaults, but with one watermark over all sources: the fixed set's
/// events spread over topics and partitions, and its expectations follow the
/// newest event time over all of them.
fn one_watermark() -> AnalyticsConfig {
    AnalyticsConfig {
        idle_timeout: Duration::ZERO,
        ..AnalyticsConfig::default()
    }
}

async fn open(db: Db) -> Arc<Analytics> {
    Analytics::open(db, one_watermark())
        .await
        .expect("open analytics")
}

async fn apply_all(a: &Analytics, events: &[RecordedEvent]) {
    for e in events {
        a.apply(e).await.unwrap();
    }
}

async fn all_windows(a: &Analytics, job: &str) -> Vec<Window> {
    a.windows(job, None, None, None, 500).await.unwrap()
}

fn find<'a>(ws: &'a [Window], key: &str, start: &str) -> &'a Window {
    ws.iter()
        .find(|w| w.key == key && w.start == at(start))
        .unwrap_or_else(|| panic!("no window {key} {start} in {ws:#?}"))
}

/// (count, late, final) of a window.
fn clf(w: &Window) -> (i64, i64, bool) {
    (w.count, w.late, w.is_final)
}

/// The hand-computed results of [`fixed_set`].
async fn assert_fixed_set_results(name: &str, a: &Analytics) {
    // orders_per_minute: o1 o2 | o3 | o4 o5 o7(late) | o6 | o9; o8 dropped.
    let s = a.job_stats(ORDERS_PER_MINUTE).await.unwrap();
    assert_eq!(
        (s.events, s.late_applied, s.dropped),
        (8, 1, 1),
        "{name}: {s:?}"
    );
    assert_eq!(s.watermark, Some(at("10:02:45")), "{name}");
    assert_eq!(s.max_event_time, Some(at("10:02:50")), "{name}");
    let ws = all_windows(a, ORDERS_PER_MINUTE).await;
    assert_eq!(ws.len(), 5, "{name}: {ws:#?}");
    let brl0 = find(&ws, "BRL", "10:00:00");
    assert_eq!((clf(brl0), brl0.sum), ((2, 0, true), Some(3500)), "{name}");
    assert_eq!(brl0.end, at("10:01:00"));
    let usd0 = find(&ws, "USD", "10:00:00");
    assert_eq!((clf(usd0), usd0.sum), ((1, 0, true), Some(700)), "{name}");
    let brl1 = find(&ws, "BRL", "10:01:00");
    assert_eq!((clf(brl1), brl1.sum), ((3, 1, false), Some(2300)), "{name}");
    let brl2 = find(&ws, "BRL", "10:02:00");
    assert_eq!((clf(brl2), brl2.sum), ((1, 0, false), Some(4000)), "{name}");
    let usd2 = find(&ws, "USD", "10:02:00");
    assert_eq!((clf(usd2), usd2.sum), ((1, 0, false), Some(900)), "{name}");
    // Newest first, then by key.
    let order: Vec<(&str, Timestamp)> = ws.iter().map(|w| (w.key.as_str(), w.start)).collect();
    assert_eq!(
        order,
        vec![
            ("BRL", at("10:02:00")),
            ("USD", at("10:02:00")),
            ("BRL", at("10:01:00")),
            ("BRL", at("10:00:00")),
            ("USD", at("10:00:00")),
        ],
        "{name}"
    );

    // login_failures_per_minute: 10:00:25, 10:00:55, 10:00:58 (late) | 10:01:45.
    let s = a.job_stats(LOGIN_FAILURES_PER_MINUTE).await.unwrap();
    assert_eq!(
        (s.events, s.late_applied, s.dropped),
        (4, 1, 0),
        "{name}: {s:?}"
    );
    assert_eq!(s.watermark, Some(at("10:01:40")), "{name}");
    let ws = all_windows(a, LOGIN_FAILURES_PER_MINUTE).await;
    assert_eq!(ws.len(), 2, "{name}");
    assert_eq!(clf(find(&ws, ALL, "10:00:00")), (3, 1, false), "{name}");
    assert_eq!(clf(find(&ws, ALL, "10:01:00")), (1, 0, false), "{name}");

    // messages_per_channel: ch-a 10:00:20 | ch-a 10:01:10 | ch-b 10:01:20 |
    // ch-b 10:02:30; ch-a 10:00:30 dropped.
    let s = a.job_stats(MESSAGES_PER_CHANNEL).await.unwrap();
    assert_eq!(
        (s.events, s.late_applied, s.dropped),
        (4, 0, 1),
        "{name}: {s:?}"
    );
    assert_eq!(s.watermark, Some(at("10:02:25")), "{name}");
    let ws = all_windows(a, MESSAGES_PER_CHANNEL).await;
    assert_eq!(ws.len(), 4, "{name}");
    assert_eq!(clf(find(&ws, "ch-a", "10:00:00")), (1, 0, true), "{name}");
    assert_eq!(clf(find(&ws, "ch-a", "10:01:00")), (1, 0, false), "{name}");
    assert_eq!(clf(find(&ws, "ch-b", "10:01:00")), (1, 0, false), "{name}");
    assert_eq!(clf(find(&ws, "ch-b", "10:02:00")), (1, 0, false), "{name}");
    let only = a
        .windows(MESSAGES_PER_CHANNEL, Some("ch-b"), None, None, 10)
        .await
        .unwrap();
    assert_eq!(only.len(), 2, "{name}");
    let range = a
        .windows(
            MESSAGES_PER_CHANNEL,
            None,
            Some(at("10:01:00")),
            Some(at("10:02:00")),
            10,
        )
        .await
        .unwrap();
    assert_eq!(range.len(), 2, "{name}: starts in [10:01, 10:02)");

    assert_active_users(name, a).await;
}

/// active_users (5 min every 1 min): an element at 10:00:xx belongs to the
/// windows starting 09:56…10:00, at 10:01:xx to 09:57…10:01, at 10:02:xx to
/// 09:58…10:02. The late u4 10:01:50 (wm 10:02:25) passes [09:57, 10:02);
/// u5 10:00:55 and u5 10:00:30 find [09:56, 10:01) final (wm ≥ 10:02) and
/// update only their four other windows, late.
async fn assert_active_users(name: &str, a: &Analytics) {
    let s = a.job_stats(ACTIVE_USERS).await.unwrap();
    assert_eq!(
        (s.events, s.late_applied, s.dropped),
        (15, 3, 0),
        "{name}: {s:?}"
    );
    assert_eq!(s.watermark, Some(at("10:02:45")), "{name}");
    let ws = all_windows(a, ACTIVE_USERS).await;
    let got: Vec<(String, i64, i64, i64, bool)> = ws
        .iter()
        .map(|w| {
            (
                w.start.to_rfc3339()[11..16].to_owned(),
                w.count,
                w.distinct.unwrap(),
                w.late,
                w.is_final,
            )
        })
        .collect();
    let want = [
        ("10:02", 3, 3, 0, false), // u1 u4 u2
        ("10:01", 8, 4, 0, false), // u3 u1 u3 u2 u4 u1 u4 u2
        ("10:00", 15, 5, 0, false),
        ("09:59", 15, 5, 0, false),
        ("09:58", 15, 5, 0, false),
        ("09:57", 12, 5, 3, false), // ends 10:02: passed by the watermark
        ("09:56", 5, 2, 0, true),   // u1 u1 u2 u2 u1; final at 10:02
    ];
    let want: Vec<(String, i64, i64, i64, bool)> = want
        .iter()
        .map(|(s, c, d, l, f)| (s.to_string(), *c, *d, *l, *f))
        .collect();
    assert_eq!(got, want, "{name}");
    for w in &ws {
        assert_eq!(w.key, ALL);
        assert_eq!(
            w.end.as_micros() - w.start.as_micros(),
            300_000_000,
            "{name}"
        );
    }
}

#[tokio::test]
async fn windows_are_exact_on_a_fixed_set_with_late_dropped_and_duplicated_events() {
    for env in envs() {
        let a = open(env.db("analytics").await).await;
        let events = fixed_set();
        let mut duplicates = 0;
        for e in &events {
            if a.apply(e).await.unwrap().duplicate {
                duplicates += 1;
            }
        }
        assert_eq!(duplicates, 1, "{}", env.name);
        assert_fixed_set_results(env.name, &a).await;
        // Delivering everything again changes nothing.
        for e in &events {
            assert!(a.apply(e).await.unwrap().duplicate);
        }
        assert_fixed_set_results(env.name, &a).await;
    }
}

/// Everything a job shows: stats and windows.
async fn snapshot(a: &Analytics) -> Value {
    let mut v = Vec::new();
    for j in a.jobs() {
        v.push(json!({
            "stats": a.job_stats(j.name).await.unwrap(),
            "windows": all_windows(a, j.name).await,
        }));
    }
    Value::Array(v)
}

#[tokio::test]
async fn a_crash_mid_window_neither_loses_nor_double_counts() {
    for env in envs() {
        let name = env.name;
        let events = fixed_set();
        let whole = open(env.db("analytics_whole").await).await;
        apply_all(&whole, &events).await;
        let expected = snapshot(&whole).await;

        // The first ten events, then the process dies: the consumer had
        // committed its offset only up to event 7, so 7, 8 and 9 (applied
        // and checkpointed in their own transactions) are delivered again.
        let db = env.db("analytics_crash").await;
        let a = open(db.clone()).await;
        apply_all(&a, &events[..10]).await;
        drop(a);
        db.close().await;

        let a = open(env.db("analytics_crash").await).await;
        let mut redelivered = 0;
        for e in &events[7..] {
            if a.apply(e).await.unwrap().duplicate {
                redelivered += 1;
            }
        }
        // 7, 8, 9 and the duplicated o2.
        assert_eq!(redelivered, 4, "{name}");
        assert_fixed_set_results(name, &a).await;
        assert_eq!(snapshot(&a).await, expected, "{name}");
    }
}

#[tokio::test]
async fn sessions_split_on_the_gap_merge_across_it_and_close_with_the_watermark() {
    for env in envs() {
        let name = env.name;
        let a = open(env.db("analytics").await).await;
        let seq = [
            login("u7", "10:00:00"),
            login("u7", "10:10:00"),
            message("ch-a", "u7", "10:25:00"),
            login("u9", "10:30:00"),
            // wm 10:59:55: u7's first burst (last 10:25 + 30 min + 1 min) closes.
            login("u7", "11:00:00"),
            // Its own window [10:40, 11:10) is not final, but it would merge
            // into the closed 10:00–10:25 session: dropped.
            login("u7", "10:40:00"),
            // 30 min 30 s after u9's 10:30: a second session (wm 11:00:25).
            order("o1", "u9", "11:00:30", 100, "BRL"),
            // Bridges u9's two open sessions into one.
            login("u9", "10:45:00"),
            // Its own window [10:20, 10:50) is final: dropped.
            login("u7", "10:20:00"),
            login("u7", "11:20:00"),
            // wm 11:54:55: u7's 11:00–11:20 and u9's 10:30–11:00:30 close.
            login("u8", "11:55:00"),
            // [10:59, 11:29) final at 11:30: dropped.
            login("u7", "10:59:00"),
            // [11:24, 11:54) passed (wm 11:54:55), final at 11:55: late.
            login("u10", "11:24:00"),
        ];
        for e in &seq {
            a.apply(e).await.unwrap();
        }
        let s = a.job_stats(SESSION_DURATION).await.unwrap();
        assert_eq!(
            (s.events, s.late_applied, s.dropped),
            (10, 1, 3),
            "{name}: {s:?}"
        );
        assert_eq!(s.watermark, Some(at("11:54:55")), "{name}");

        let u7 = a.sessions("u7", 10).await.unwrap();
        let got: Vec<(Timestamp, Timestamp, f64, i64, bool)> = u7
            .iter()
            .map(|s| (s.start, s.end, s.duration_ms, s.events, s.closed))
            .collect();
        assert_eq!(
            got,
            vec![
                (at("11:00:00"), at("11:20:00"), 1_200_000.0, 2, true),
                (at("10:00:00"), at("10:25:00"), 1_500_000.0, 3, true),
            ],
            "{name}"
        );
        let u9 = a.sessions("u9", 10).await.unwrap();
        assert_eq!(u9.len(), 1, "{name}: {u9:?}");
        assert_eq!(
            (
                u9[0].start,
                u9[0].end,
                u9[0].duration_ms,
                u9[0].events,
                u9[0].closed
            ),
            (at("10:30:00"), at("11:00:30"), 1_830_000.0, 3, true),
            "{name}"
        );
        let u10 = a.sessions("u10", 10).await.unwrap();
        assert_eq!(
            (u10[0].duration_ms, u10[0].events, u10[0].closed),
            (0.0, 1, false),
            "{name}"
        );
        // The job's windows are its sessions, open and closed.
        let ws = all_windows(&a, SESSION_DURATION).await;
        let keys: Vec<(&str, bool)> = ws.iter().map(|w| (w.key.as_str(), w.is_final)).collect();
        assert_eq!(
            keys,
            vec![
                ("u8", false),
                ("u10", false),
                ("u7", true),
                ("u9", true),
                ("u7", true)
            ],
            "{name}"
        );
        assert_eq!(ws[2].duration_ms, Some(1_200_000.0));
    }
}

#[tokio::test]
async fn endpoint_latency_has_exact_nearest_rank_percentiles() {
    for env in envs() {
        let name = env.name;
        let a = open(env.db("analytics").await).await;
        // GET /products at 10:00: 5 1 4 2 3 100 7.5 6 9 8 ms. Sorted:
        // 1 2 3 4 5 6 7.5 8 9 100. Nearest rank: p50 = the ceil(0.5·10) = 5th
        // = 5 ms; p99 = the ceil(0.99·10) = 10th = 100 ms.
        let first = samples(
            "10:00:30",
            &[
                ("GET", "/api/v1/products", 5.0, "10:00:01"),
                ("GET", "/api/v1/products", 1.0, "10:00:02"),
                ("GET", "/api/v1/products", 4.0, "10:00:03"),
                ("POST", "/api/v1/orders", 12.5, "10:00:04"),
                ("GET", "/api/v1/products", 2.0, "10:00:05"),
                ("GET", "/api/v1/products", 3.0, "10:00:06"),
                ("POST", "/api/v1/orders", 40.0, "10:00:07"),
            ],
        );
        let second = samples(
            "10:01:00",
            &[
                ("GET", "/api/v1/products", 100.0, "10:00:40"),
                ("GET", "/api/v1/products", 7.5, "10:00:41"),
                ("POST", "/api/v1/orders", 20.0, "10:00:42"),
                ("GET", "/api/v1/products", 6.0, "10:00:43"),
                ("GET", "/api/v1/products", 9.0, "10:00:44"),
                ("GET", "/api/v1/products", 8.0, "10:00:45"),
                // Next minute.
                ("GET", "/api/v1/products", 0.25, "10:01:10"),
            ],
        );
        // GET /search at 10:02: 1..=101 ms. p50 = 51st = 51, p99 = the
        // ceil(0.99·101) = 100th = 100, max 101.
        let search: Vec<(&str, &str, f64, &str)> = (1..=101)
            .map(|i| ("GET", "/api/v1/search", f64::from(i), "10:02:30"))
            .collect();
        let third = samples("10:02:31", &search);
        for e in [&first, &second, &first, &third] {
            a.apply(e).await.unwrap();
        }
        let ws = all_windows(&a, ENDPOINT_LATENCY).await;
        let stats = |w: &Window| (w.count, w.p50_ms, w.p99_ms, w.max_ms);
        assert_eq!(
            stats(find(&ws, "GET /api/v1/products", "10:00:00")),
            (10, Some(5.0), Some(100.0), Some(100.0)),
            "{name}"
        );
        // 12.5 20 40: p50 = 2nd, p99 = 3rd.
        assert_eq!(
            stats(find(&ws, "POST /api/v1/orders", "10:00:00")),
            (3, Some(20.0), Some(40.0), Some(40.0)),
            "{name}"
        );
        assert_eq!(
            stats(find(&ws, "GET /api/v1/products", "10:01:00")),
            (1, Some(0.25), Some(0.25), Some(0.25)),
            "{name}"
        );
        assert_eq!(
            stats(find(&ws, "GET /api/v1/search", "10:02:00")),
            (101, Some(51.0), Some(100.0), Some(101.0)),
            "{name}"
        );
        let s = a.job_stats(ENDPOINT_LATENCY).await.unwrap();
        assert_eq!((s.events, s.late_applied, s.dropped), (115, 0, 0), "{name}");
        assert_eq!(s.watermark, Some(at("10:02:25")), "{name}");
        // Non-latency fields stay absent from latency windows.
        let j = serde_json::to_value(&ws[0]).unwrap();
        assert!(j.get("sum").is_none() && j.get("distinct").is_none(), "{j}");
    }
}

/// The same set, all within lateness (1 h): windows do not depend on the
/// order or on repeated deliveries; only which elements count as late does.
fn within_lateness() -> AnalyticsConfig {
    AnalyticsConfig {
        allowed_lateness: Duration::from_secs(3600),
        ..one_watermark()
    }
}

/// A snapshot without the order-dependent late counts.
async fn order_free_snapshot(a: &Analytics) -> Value {
    let mut v = snapshot(a).await;
    for job in v.as_array_mut().unwrap() {
        job["stats"].as_object_mut().unwrap().remove("late_applied");
        for w in job["windows"].as_array_mut().unwrap() {
            w.as_object_mut().unwrap().remove("late");
        }
    }
    v
}

#[test]
fn any_permutation_or_duplication_within_lateness_gives_the_same_windows() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let events = fixed_set();
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite {
        dir: dir.path().to_path_buf(),
        durability: Durability::Relaxed,
    };
    let reference = rt.block_on(async {
        let db = Db::open(&backend, "reference").await.unwrap();
        let a = Analytics::open(db, within_lateness()).await.unwrap();
        let mut sorted = events.clone();
        sorted.sort_by_key(|e| e.envelope.occurred_at);
        apply_all(&a, &sorted).await;
        let s = a.job_stats(ORDERS_PER_MINUTE).await.unwrap();
        assert_eq!((s.events, s.dropped), (9, 0), "nothing is dropped");
        order_free_snapshot(&a).await
    });
    let n = events.len();
    let strategy = (
        Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        proptest::collection::vec((0..n, 0..n), 0..4),
    );
    let mut runner = TestRunner::new(Config {
        cases: 12,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&strategy, |(order, dups)| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut seq: Vec<RecordedEvent> = order.iter().map(|&i| events[i].clone()).collect();
            for (pos, which) in dups {
                seq.insert(pos.min(seq.len()), events[which].clone());
            }
            let got = rt.block_on(async {
                let db = Db::open(&backend, &format!("case{case}")).await.unwrap();
                let a = Analytics::open(db.clone(), within_lateness())
                    .await
                    .unwrap();
                apply_all(&a, &seq).await;
                let s = order_free_snapshot(&a).await;
                db.close().await;
                s
            });
            prop_assert_eq!(got, reference.clone());
            Ok(())
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_consumer_applies_the_set_exactly_once() {
    for env in envs() {
        let name = env.name;
        let events = fixed_set();
        let reference = {
            let a = Analytics::open(env.db("analytics_ref").await, within_lateness())
                .await
                .unwrap();
            apply_all(&a, &events).await;
            order_free_snapshot(&a).await
        };
        let log = EventLog::open(&env.backend, LogOptions::default())
            .await
            .unwrap();
        let a = Analytics::open(env.db("analytics").await, within_lateness())
            .await
            .unwrap();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let sub = log
            .subscribe(ConsumerOptions::new(GROUP, TOPICS), a.clone(), shutdown)
            .await
            .unwrap();
        // Four partitions: the consumer interleaves them in its own order.
        let envelopes: Vec<Envelope> = events.iter().map(|e| e.envelope.clone()).collect();
        log.append(&envelopes[..12]).await.unwrap();
        log.append(&envelopes[12..]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = order_free_snapshot(&a).await;
            if got == reference {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {got:#}\nwant {reference:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send(true).unwrap();
        sub.task.await.unwrap();
        let dead = log.dead_letters(None, true).await.unwrap();
        assert!(dead.is_empty(), "{name}: {dead:?}");
        assert_eq!(order_free_snapshot(&a).await, reference, "{name}");
        // The handler is what the consumer calls; a redelivery is a no-op.
        a.handle(&events[0]).await.unwrap();
        assert_eq!(order_free_snapshot(&a).await, reference, "{name}");
    }
}

/// `e` as the log delivers it from partition `p` of its topic.
fn on(p: i32, mut e: RecordedEvent) -> RecordedEvent {
    e.partition = p;
    e
}

/// `hh:mm:ss` of `m` minutes and `s` seconds past 10:00.
fn ten(m: u32, s: u32) -> String {
    format!("10:{m:02}:{s:02}")
}

/// Orders on two partitions of `orders.events` (partition 0 in BRL,
/// partition 1 in USD, so each window shows whose elements it holds): both
/// partitions deliver one order at 10:00, then partition 0 delivers three
/// minutes (10:00:10 … 10:03:00, every 10 s) before partition 1 delivers its
/// own from the same minutes (10:00:05 … 10:02:55), as the consumer does with
/// a partition that lagged (a retried event, a backlog after a restart).
fn partition_zero_runs_ahead() -> Vec<RecordedEvent> {
    let mut v = vec![
        on(0, order("p0-0", "u1", "10:00:00", 100, "BRL")),
        on(1, order("p1-0", "u2", "10:00:01", 100, "USD")),
    ];
    for i in 1..=18u32 {
        let t = ten(i / 6, i % 6 * 10);
        v.push(on(0, order(&format!("p0-{i}"), "u1", &t, 100, "BRL")));
    }
    for i in 0..18u32 {
        let t = ten(i / 6, i % 6 * 10 + 5);
        v.push(on(1, order(&format!("p1-{}", i + 1), "u2", &t, 100, "USD")));
    }
    v
}

#[tokio::test]
async fn a_partition_running_ahead_does_not_drop_the_others_on_time_events() {
    for env in envs() {
        let name = env.name;
        let events = partition_zero_runs_ahead();
        let a = Analytics::open(env.db("analytics").await, AnalyticsConfig::default())
            .await
            .unwrap();
        // Partition 0 alone has reached 10:03:00, but partition 1 (at
        // 10:00:01) holds the watermark.
        apply_all(&a, &events[..20]).await;
        let s = a.job_stats(ORDERS_PER_MINUTE).await.unwrap();
        assert_eq!(s.watermark, Some(at("09:59:56")), "{name}: {s:?}");
        assert_eq!(s.max_event_time, Some(at("10:03:00")), "{name}");
        let mut dropped = 0;
        let mut late = 0;
        for e in &events[20..] {
            let r = a.apply(e).await.unwrap();
            dropped += r.dropped;
            late += r.late_applied;
        }
        assert_eq!((dropped, late), (0, 0), "{name}: partition 1 is on time");
        let s = a.job_stats(ORDERS_PER_MINUTE).await.unwrap();
        assert_eq!(
            (s.events, s.late_applied, s.dropped),
            (38, 0, 0),
            "{name}: {s:?}"
        );
        // Both caught up: min(10:03:00, 10:02:55) − 5 s.
        assert_eq!(s.watermark, Some(at("10:02:50")), "{name}");
        let ws = all_windows(&a, ORDERS_PER_MINUTE).await;
        let got: Vec<(&str, String, i64, i64, bool)> = ws
            .iter()
            .map(|w| {
                let start = w.start.to_rfc3339()[11..16].to_owned();
                (w.key.as_str(), start, w.count, w.sum.unwrap(), w.is_final)
            })
            .collect();
        let want = [
            ("BRL", "10:03", 1, 100, false),
            ("BRL", "10:02", 6, 600, false),
            ("USD", "10:02", 6, 600, false),
            ("BRL", "10:01", 6, 600, false),
            ("USD", "10:01", 6, 600, false),
            // Final: 10:01 + 1 min lateness ≤ 10:02:50.
            ("BRL", "10:00", 6, 600, true),
            ("USD", "10:00", 7, 700, true),
        ];
        let want: Vec<(&str, String, i64, i64, bool)> = want
            .iter()
            .map(|(k, s, c, sum, f)| (*k, s.to_string(), *c, *sum, *f))
            .collect();
        assert_eq!(got, want, "{name}");
        // Redelivered, nothing changes (sources included).
        let before = snapshot(&a).await;
        for e in &events {
            assert!(a.apply(e).await.unwrap().duplicate, "{name}");
        }
        assert_eq!(snapshot(&a).await, before, "{name}");

        // The same deliveries with one watermark for all sources (the
        // previous behaviour): partition 0 pushes it to 10:02:55, so
        // partition 1's 10:00 minute is final (dropped) and its 10:01 minute
        // passed (late).
        let old = Analytics::open(env.db("analytics_one").await, one_watermark())
            .await
            .unwrap();
        apply_all(&old, &events).await;
        let s = old.job_stats(ORDERS_PER_MINUTE).await.unwrap();
        assert_eq!(
            (s.events, s.late_applied, s.dropped),
            (32, 6, 6),
            "{name}: {s:?}"
        );
    }
}

#[tokio::test]
async fn an_idle_partition_stops_holding_the_watermark_and_a_quiet_job_finalizes() {
    const IDLE: Duration = Duration::from_millis(500);
    const PAST_IDLE: Duration = Duration::from_millis(700);
    for env in envs() {
        let name = env.name;
        let cfg = AnalyticsConfig {
            idle_timeout: IDLE,
            ..AnalyticsConfig::default()
        };
        let a = Analytics::open(env.db("analytics").await, cfg)
            .await
            .unwrap();
        let stats = || async { a.job_stats(ORDERS_PER_MINUTE).await.unwrap() };
        let o =
            |p: i32, id: &str, t: &str| on(p, order(id, "u1", t, 100, ["BRL", "USD"][p as usize]));
        apply_all(&a, &[o(0, "a0", "10:00:00"), o(1, "b0", "10:00:01")]).await;
        a.apply(&o(0, "a1", "10:00:30")).await.unwrap();
        // Partition 1 is active: it holds the watermark.
        assert_eq!(stats().await.watermark, Some(at("09:59:56")), "{name}");

        // Partition 1 goes quiet; partition 0 alone moves the watermark.
        tokio::time::sleep(PAST_IDLE).await;
        for (m, sec) in [(1, 0), (1, 30), (2, 0), (2, 30), (3, 0)] {
            let t = ten(m, sec);
            a.apply(&o(0, &format!("a-{t}"), &t)).await.unwrap();
        }
        let s = stats().await;
        assert_eq!(s.watermark, Some(at("10:02:55")), "{name}: {s:?}");
        let ws = all_windows(&a, ORDERS_PER_MINUTE).await;
        assert!(find(&ws, "BRL", "10:00:00").is_final, "{name}");
        assert!(find(&ws, "USD", "10:00:00").is_final, "{name}");
        assert!(!find(&ws, "BRL", "10:01:00").is_final, "{name}");

        // Partition 1 comes back: an element for an open window is applied,
        // one for a window finalized meanwhile is dropped.
        let counts = |s: JobStats| (s.events, s.late_applied, s.dropped);
        assert_eq!(counts(stats().await), (8, 0, 0), "{name}");
        a.apply(&o(1, "b1", "10:02:40")).await.unwrap();
        assert_eq!(counts(stats().await), (9, 0, 0), "{name}");
        a.apply(&o(1, "b2", "10:00:30")).await.unwrap();
        assert_eq!(counts(stats().await), (9, 0, 1), "{name}");
        // Both active again: partition 1 (10:02:40) holds the watermark, which
        // does not move back either.
        a.apply(&o(0, "a4", "10:04:10")).await.unwrap();
        assert_eq!(stats().await.watermark, Some(at("10:02:55")), "{name}");

        // Everything quiet: with every source idle the newest event time
        // counts, and the windows it passes become final without a new event.
        tokio::time::sleep(PAST_IDLE).await;
        let s = stats().await;
        assert_eq!(s.watermark, Some(at("10:04:05")), "{name}: {s:?}");
        let ws = all_windows(&a, ORDERS_PER_MINUTE).await;
        assert!(find(&ws, "BRL", "10:02:00").is_final, "{name}");
        assert!(find(&ws, "USD", "10:02:00").is_final, "{name}");
        assert!(!find(&ws, "BRL", "10:04:00").is_final, "{name}");
        // The next event sees the same watermark the reader showed: 10:03:30
        // is late (its window passed) but not dropped (not final until 10:05).
        a.apply(&o(1, "b3", "10:03:30")).await.unwrap();
        assert_eq!(counts(stats().await), (11, 1, 1), "{name}");
        let ws = all_windows(&a, ORDERS_PER_MINUTE).await;
        assert_eq!(clf(find(&ws, "USD", "10:03:00")), (1, 1, false), "{name}");
    }
}

#[tokio::test]
async fn an_event_time_ahead_of_the_clock_moves_the_watermark_only_to_now_plus_the_skew() {
    for env in envs() {
        let name = env.name;
        let a = Analytics::open(env.db("analytics").await, AnalyticsConfig::default())
            .await
            .unwrap();
        let secs = |s: i64| s * 1_000_000;
        let at_us = |us: i64| {
            let mut e = order(&format!("o{us}"), "u1", "10:00:00", 100, "BRL");
            e.envelope.occurred_at = Timestamp::from_micros(us);
            e
        };
        let before = Timestamp::now().as_micros();
        // A producer an hour ahead.
        let ahead = before + secs(3600);
        a.apply(&at_us(ahead)).await.unwrap();
        let after = Timestamp::now().as_micros();
        let s = a.job_stats(ORDERS_PER_MINUTE).await.unwrap();
        let w = s.watermark.unwrap().as_micros();
        // now + 1 min skew − 5 s out-of-orderness, at the time of the apply.
        assert!(
            (before + secs(55)..=after + secs(55)).contains(&w),
            "{name}: {s:?}"
        );
        assert_eq!(s.max_event_time, Some(Timestamp::from_micros(ahead)));
        // The element itself is in the window of its own time.
        let ws = all_windows(&a, ORDERS_PER_MINUTE).await;
        assert_eq!(ws.len(), 1, "{name}");
        let start = ahead.div_euclid(secs(60)) * secs(60);
        assert_eq!((ws[0].start.as_micros(), ws[0].count), (start, 1), "{name}");
        // An order from two seconds ago is still on time: its window ends
        // after now − 2 s, final only at a watermark past now + 58 s.
        a.apply(&at_us(Timestamp::now().as_micros() - secs(2)))
            .await
            .unwrap();
        let s = a.job_stats(ORDERS_PER_MINUTE).await.unwrap();
        assert_eq!((s.events, s.dropped), (2, 0), "{name}: {s:?}");
    }
}

#[tokio::test]
async fn a_malformed_payload_is_a_permanent_error_and_changes_nothing() {
    let env = envs().remove(0);
    let a = open(env.db("analytics").await).await;
    let bad = event(
        "orders.events",
        "order.created",
        "o1",
        "10:00:00",
        json!({"user_id": "u1"}),
    );
    let err = a.handle(&bad).await.unwrap_err();
    assert!(err.permanent, "{err:?}");
    let ignored = event(
        "orders.events",
        "order.shipped",
        "o1",
        "10:00:00",
        json!({}),
    );
    assert_eq!(a.apply(&ignored).await.unwrap(), Default::default());
    let s = a.job_stats(ACTIVE_USERS).await.unwrap();
    assert_eq!((s.events, s.watermark), (0, None));
}

#[tokio::test]
async fn prune_forgets_only_final_windows() {
    let env = envs().remove(0);
    let a = open(env.db("analytics").await).await;
    apply_all(&a, &fixed_set()).await;
    let n = a.prune(at("12:00:00")).await.unwrap();
    assert!(n > 0);
    // orders: the two final 10:00 windows are gone, the open ones stay.
    let ws = all_windows(&a, ORDERS_PER_MINUTE).await;
    assert_eq!(ws.len(), 3, "{ws:#?}");
    assert!(ws.iter().all(|w| !w.is_final));
    // A late element for a pruned window is still dropped, not re-created.
    let before = a.job_stats(ORDERS_PER_MINUTE).await.unwrap().dropped;
    a.apply(&order("o10", "u1", "10:00:30", 1, "BRL"))
        .await
        .unwrap();
    assert_eq!(
        a.job_stats(ORDERS_PER_MINUTE).await.unwrap().dropped,
        before + 1
    );
    assert_eq!(all_windows(&a, ORDERS_PER_MINUTE).await.len(), 3);
}

mod http {
    use super::*;
    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use tower::ServiceExt;
    use utoipa::OpenApi;

    async fn get(router: &axum::Router, uri: &str) -> (StatusCode, String, Value) {
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let res = router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let ct = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, ct, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn the_admin_routes_answer_with_windows_and_problems() {
        let env = envs().remove(0);
        let a = open(env.db("analytics").await).await;
        apply_all(&a, &fixed_set()).await;
        let router: axum::Router =
            axum::Router::new().nest("/api/v1", flowline_analytics::routes::routes(a.clone()));

        let (s, _, list) = get(&router, "/api/v1/admin/analytics").await;
        assert_eq!(s, StatusCode::OK, "{list}");
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 6);
        let orders = items
            .iter()
            .find(|j| j["name"] == ORDERS_PER_MINUTE)
            .unwrap();
        assert_eq!(
            orders["window"],
            json!({"kind": "tumbling", "size_ms": 60000})
        );
        assert_eq!(orders["aggregate"], "sum");
        assert_eq!(orders["watermark"], "2025-11-22T10:02:45Z");
        assert_eq!(
            (
                &orders["events"],
                &orders["late_applied"],
                &orders["dropped"]
            ),
            (&json!(8), &json!(1), &json!(1))
        );
        let active = items.iter().find(|j| j["name"] == ACTIVE_USERS).unwrap();
        assert_eq!(
            active["window"],
            json!({"kind": "sliding", "size_ms": 300000, "slide_ms": 60000})
        );

        let (s, _, page) = get(
            &router,
            "/api/v1/admin/analytics/orders_per_minute?key=BRL&from=2025-11-22T10:00:00Z&to=2025-11-22T10:02:00Z&limit=5",
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert_eq!(page["job"]["name"], ORDERS_PER_MINUTE);
        assert_eq!(
            page["items"],
            json!([
                {"key": "BRL", "start": "2025-11-22T10:01:00Z", "end": "2025-11-22T10:02:00Z",
                 "final": false, "count": 3, "late": 1, "sum": 2300},
                {"key": "BRL", "start": "2025-11-22T10:00:00Z", "end": "2025-11-22T10:01:00Z",
                 "final": true, "count": 2, "late": 0, "sum": 3500},
            ])
        );

        let (s, ct, p) = get(&router, "/api/v1/admin/analytics/nope").await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{p}");
        assert_eq!(ct, "application/problem+json");
        assert_eq!(p["code"], "not_found");
        assert_eq!(p["status"], 404);

        for bad in [
            "/api/v1/admin/analytics/active_users?limit=0",
            "/api/v1/admin/analytics/active_users?limit=many",
            "/api/v1/admin/analytics/active_users?from=yesterday",
            "/api/v1/admin/analytics/active_users?from=2025-11-22T10:05:00Z&to=2025-11-22T10:00:00Z",
            "/api/v1/admin/analytics/active_users?colour=red",
        ] {
            let (s, ct, p) = get(&router, bad).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {p}");
            assert_eq!(ct, "application/problem+json");
            assert_eq!(p["code"], "malformed_request", "{bad}");
        }

        let doc = flowline_analytics::routes::AnalyticsApi::openapi();
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        assert_eq!(
            paths,
            vec!["/api/v1/admin/analytics", "/api/v1/admin/analytics/{job}"]
        );
    }
}
