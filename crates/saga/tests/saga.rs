//! The orchestrator against a real database: SQLite always, PostgreSQL too
//! when `FLOWLINE_TEST_POSTGRES_URL` is set.

use flowline_saga::{
    BoxFuture, OnFinish, OnStep, Orchestrator, RetryPolicy, SagaDef, SagaLabels, SagaOptions,
    SagaStatus, Step, StepCtx, StepError,
};
use flowline_store::outbox::Relay;
use flowline_store::{on_pool, on_tx, Backend, Db, Durability, EventLog, LogOptions, StoreError};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

struct TestBackend {
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

fn backends() -> Vec<TestBackend> {
    let dir = tempfile::tempdir().unwrap();
    let mut v = vec![TestBackend {
        backend: Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Relaxed,
        },
        _dir: Some(dir),
    }];
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        v.push(TestBackend {
            backend: Backend::Postgres {
                url,
                schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
                max_connections: 8,
            },
            _dir: None,
        });
    }
    v
}

fn opts() -> SagaOptions {
    SagaOptions {
        lease: Duration::from_millis(200),
        stuck_after: 3,
        ..SagaOptions::default()
    }
}

async fn open(b: &TestBackend, defs: Vec<SagaDef>, opts: SagaOptions) -> (Arc<Orchestrator>, Db) {
    let db = Db::open(&b.backend, "orders").await.unwrap();
    let log = EventLog::open(&b.backend, LogOptions::default())
        .await
        .unwrap();
    let relay = Relay::new(db.clone(), log);
    let orch = Orchestrator::new(db.clone(), relay, defs, opts)
        .await
        .unwrap();
    (Arc::new(orch), db)
}

struct Runner {
    handle: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

fn spawn(orch: &Arc<Orchestrator>) -> Runner {
    let (stop, rx) = watch::channel(false);
    let handle = tokio::spawn(orch.clone().run(rx));
    Runner { handle, stop }
}

impl Runner {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.handle.await.unwrap();
    }
}

async fn start(orch: &Orchestrator, db: &Db, name: &str, id: &str, data: Value) {
    let mut tx = db.begin().await.unwrap();
    orch.start(&mut tx, name, id, data).await.unwrap();
    tx.commit().await.unwrap();
    orch.wake();
}

async fn wait_end(orch: &Orchestrator, id: &str, within: Duration) -> SagaStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = orch.status(id).await.unwrap().expect("saga exists");
        if matches!(s, SagaStatus::Completed | SagaStatus::Compensated) {
            return s;
        }
        if Instant::now() >= deadline {
            panic!("saga {id} still {s:?}: {:#?}", orch.get(id).await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn events(db: &Db, key: &str) -> Vec<(String, Value)> {
    let rows: Vec<(String, String, String)> = on_pool!(db, |p| sqlx::query_as(
        "SELECT event_type, topic, payload FROM outbox WHERE event_key = $1 ORDER BY id"
    )
    .bind(key)
    .fetch_all(p)
    .await)
    .unwrap();
    rows.into_iter()
        .map(|(t, topic, p)| {
            assert_eq!(topic, "saga.events");
            (t, serde_json::from_str(&p).unwrap())
        })
        .collect()
}

fn types(ev: &[(String, Value)]) -> Vec<&str> {
    ev.iter().map(|(t, _)| t.as_str()).collect()
}

fn ok_step(name: &'static str) -> Step {
    Step::new(name, move |ctx: StepCtx| async move {
        let seen: Vec<String> = ctx.results.keys().cloned().collect();
        Ok(json!({"step": name, "seen": seen, "order": ctx.data["order"]}))
    })
}

type Log = Arc<Mutex<Vec<String>>>;

fn recording(
    log: &Log,
    what: String,
) -> impl Fn(StepCtx) -> BoxFuture<'static, Result<Value, StepError>> {
    let log = log.clone();
    move |ctx: StepCtx| {
        log.lock()
            .unwrap()
            .push(format!("{what} {}", ctx.command_id));
        Box::pin(async { Ok(Value::Null) })
    }
}

/// Writes what the hooks saw into the orchestrator's database, in the saga's transaction.
struct Hooks;

async fn hook_log(
    tx: &mut flowline_store::Tx,
    saga_id: &str,
    what: String,
) -> Result<(), StoreError> {
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO hook_log (saga_id, what) VALUES ($1, $2)"
    )
    .bind(saga_id)
    .bind(&what)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

impl OnStep for Hooks {
    fn call<'a>(
        &'a self,
        tx: &'a mut flowline_store::Tx,
        saga_id: &'a str,
        step: &'a str,
        _output: &'a Value,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(hook_log(tx, saga_id, format!("step {step}")))
    }
}

impl OnFinish for Hooks {
    fn call<'a>(
        &'a self,
        tx: &'a mut flowline_store::Tx,
        saga_id: &'a str,
        status: SagaStatus,
        reason: Option<&'a str>,
        results: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let what = format!(
            "finish {} {} {}",
            status.as_str(),
            reason.unwrap_or("-"),
            results.len()
        );
        Box::pin(hook_log(tx, saga_id, what))
    }
}

async fn hook_rows(db: &Db, saga_id: &str) -> Vec<String> {
    on_pool!(db, |p| sqlx::query_scalar(
        "SELECT what FROM hook_log WHERE saga_id = $1 ORDER BY what"
    )
    .bind(saga_id)
    .fetch_all(p)
    .await)
    .unwrap()
}

async fn create_hook_table(db: &Db) {
    on_pool!(write db, |p| sqlx::query(
        "CREATE TABLE IF NOT EXISTS hook_log (saga_id TEXT NOT NULL, what TEXT NOT NULL)"
    )
    .execute(p)
    .await
    .map(|r| r.rows_affected()))
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn happy_path_completes_and_records_everything() {
    for b in backends() {
        let def = SagaDef::new("order", vec![ok_step("a"), ok_step("b"), ok_step("c")])
            .on_step(Hooks)
            .on_finish(Hooks);
        let (orch, db) = open(&b, vec![def], opts()).await;
        create_hook_table(&db).await;
        let runner = spawn(&orch);
        let data = json!({"order": "o-1", "card_token": "tok_secret"});
        start(&orch, &db, "order", "s1", data.clone()).await;
        // Starting again is a no-op.
        start(&orch, &db, "order", "s1", json!({"other": true})).await;
        assert_eq!(
            wait_end(&orch, "s1", Duration::from_secs(5)).await,
            SagaStatus::Completed
        );
        runner.stop().await;

        let d = orch.get("s1").await.unwrap().unwrap();
        assert_eq!(d.summary.status, SagaStatus::Completed);
        assert_eq!(d.data["order"], "o-1", "{}", b.backend.name());
        assert_eq!(d.data["card_token"], "[redacted]");
        assert_eq!(d.results["c"]["seen"], json!(["a", "b"]));
        assert_eq!(d.results["b"]["seen"], json!(["a"]));
        assert_eq!(d.results["a"]["order"], "o-1");
        let tl: Vec<_> = d
            .timeline
            .iter()
            .map(|t| {
                (
                    t.step.as_str(),
                    t.phase.as_str(),
                    t.attempt,
                    t.status.as_str(),
                )
            })
            .collect();
        assert_eq!(
            tl,
            [
                ("a", "do", 1, "ok"),
                ("b", "do", 1, "ok"),
                ("c", "do", 1, "ok")
            ]
        );
        assert!(d.timeline.iter().all(|t| t.finished_at >= t.started_at));

        let ev = events(&db, "s1").await;
        assert_eq!(
            types(&ev),
            [
                "saga.step_completed",
                "saga.step_completed",
                "saga.step_completed",
                "saga.completed"
            ]
        );
        assert_eq!(ev[1].1["step"], "b");
        assert_eq!(
            hook_rows(&db, "s1").await,
            ["finish COMPLETED - 3", "step a", "step b", "step c"]
        );
        let listed = orch.list(Some("COMPLETED"), 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(orch.list(Some("RUNNING"), 10).await.unwrap().is_empty());
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["status"], "COMPLETED");
        assert_eq!(json["timeline"].as_array().unwrap().len(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusal_compensates_completed_steps_in_reverse_order() {
    for b in backends() {
        let undo: Log = Arc::default();
        let def = SagaDef::new(
            "order",
            vec![
                ok_step("reserve").compensate(recording(&undo, "undo".into())),
                ok_step("notify"), // nothing to undo: skipped
                ok_step("pay").compensate(recording(&undo, "undo".into())),
                Step::new("confirm", |_c: StepCtx| async {
                    Err::<Value, _>(StepError::fatal("out of stock"))
                })
                .compensate(recording(&undo, "undo".into())),
            ],
        )
        .on_finish(Hooks);
        let (orch, db) = open(&b, vec![def], opts()).await;
        create_hook_table(&db).await;
        let runner = spawn(&orch);
        start(&orch, &db, "order", "s2", json!({})).await;
        assert_eq!(
            wait_end(&orch, "s2", Duration::from_secs(5)).await,
            SagaStatus::Compensated
        );
        runner.stop().await;
        assert_eq!(
            *undo.lock().unwrap(),
            ["undo s2:pay:undo", "undo s2:reserve:undo"]
        );
        let d = orch.get("s2").await.unwrap().unwrap();
        assert_eq!(d.summary.failure.as_deref(), Some("confirm: out of stock"));
        let tl: Vec<_> = d
            .timeline
            .iter()
            .map(|t| (t.step.as_str(), t.phase.as_str(), t.status.as_str()))
            .collect();
        assert_eq!(
            tl,
            [
                ("reserve", "do", "ok"),
                ("notify", "do", "ok"),
                ("pay", "do", "ok"),
                ("confirm", "do", "failed"),
                ("pay", "undo", "ok"),
                ("reserve", "undo", "ok"),
            ]
        );
        let ev = events(&db, "s2").await;
        assert_eq!(
            types(&ev),
            [
                "saga.step_completed",
                "saga.step_completed",
                "saga.step_completed",
                "saga.compensating",
                "saga.step_compensated",
                "saga.step_compensated",
                "saga.compensated"
            ]
        );
        assert_eq!(
            hook_rows(&db, "s2").await,
            ["finish COMPENSATED confirm: out of stock 3"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retryable_failure_succeeds_on_the_third_attempt_after_backoff() {
    for b in backends() {
        let seen: Arc<Mutex<Vec<(u32, String, Instant)>>> = Arc::default();
        let s = seen.clone();
        let flaky = Step::new("pay", move |ctx: StepCtx| {
            s.lock()
                .unwrap()
                .push((ctx.attempt, ctx.command_id.clone(), Instant::now()));
            async move {
                if ctx.attempt < 3 {
                    Err(StepError::retryable("gateway busy"))
                } else {
                    Ok(json!({"paid": true}))
                }
            }
        })
        .retry(RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        });
        let def = SagaDef::new("order", vec![flaky]);
        let (orch, db) = open(&b, vec![def], opts()).await;
        let runner = spawn(&orch);
        start(&orch, &db, "order", "s3", json!({})).await;
        assert_eq!(
            wait_end(&orch, "s3", Duration::from_secs(5)).await,
            SagaStatus::Completed
        );
        runner.stop().await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.iter().map(|s| s.0).collect::<Vec<_>>(),
            [1, 2, 3],
            "{}",
            b.backend.name()
        );
        assert!(seen.iter().all(|s| s.1 == "s3:pay:do"));
        let gap1 = seen[1].2 - seen[0].2;
        let gap2 = seen[2].2 - seen[1].2;
        assert!(gap1 >= Duration::from_millis(95), "{gap1:?}");
        assert!(gap2 >= Duration::from_millis(195), "{gap2:?}");
        assert!(gap2 < Duration::from_millis(1500), "{gap2:?}");
        let d = orch.get("s3").await.unwrap().unwrap();
        let tl: Vec<_> = d
            .timeline
            .iter()
            .map(|t| (t.attempt, t.status.as_str(), t.error.clone()))
            .collect();
        assert_eq!(
            tl,
            [
                (1, "failed", Some("gateway busy".to_owned())),
                (2, "failed", Some("gateway busy".to_owned())),
                (3, "ok", None)
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_is_a_failed_attempt_and_exhausted_timeouts_compensate_the_step() {
    for b in backends() {
        let quick = RetryPolicy {
            max_attempts: 2,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
        };
        let slow_once = Step::new("pay", |ctx: StepCtx| async move {
            if ctx.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(json!("ok"))
        })
        .timeout(Duration::from_millis(100))
        .retry(quick);
        let undo: Log = Arc::default();
        let always_slow = Step::new("pay", |_c: StepCtx| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(Value::Null)
        })
        .timeout(Duration::from_millis(100))
        .retry(quick)
        .compensate(recording(&undo, "undo".into()));
        let defs = vec![
            SagaDef::new("once", vec![slow_once]),
            SagaDef::new(
                "never",
                vec![
                    ok_step("reserve").compensate(recording(&undo, "undo".into())),
                    always_slow,
                ],
            ),
        ];
        let (orch, db) = open(&b, defs, opts()).await;
        let runner = spawn(&orch);
        start(&orch, &db, "once", "t1", json!({})).await;
        start(&orch, &db, "never", "t2", json!({})).await;
        assert_eq!(
            wait_end(&orch, "t1", Duration::from_secs(5)).await,
            SagaStatus::Completed
        );
        assert_eq!(
            wait_end(&orch, "t2", Duration::from_secs(5)).await,
            SagaStatus::Compensated
        );
        runner.stop().await;
        let d = orch.get("t1").await.unwrap().unwrap();
        let tl: Vec<_> = d.timeline.iter().map(|t| t.status.as_str()).collect();
        assert_eq!(tl, ["timeout", "ok"]);
        assert!(d.timeline[0].duration_ms >= 90.0);
        let d = orch.get("t2").await.unwrap().unwrap();
        assert!(d.summary.failure.unwrap().starts_with("pay: timed out"));
        // Its effect is unknown, so the timed-out step is compensated first.
        assert_eq!(
            *undo.lock().unwrap(),
            ["undo t2:pay:undo", "undo t2:reserve:undo"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_compensation_is_flagged_stuck_once_and_still_finishes() {
    for b in backends() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let def = SagaDef::new(
            "order",
            vec![
                ok_step("pay")
                    .compensate(move |_ctx: StepCtx| {
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            if n <= 5 {
                                Err(StepError::retryable("refund service down"))
                            } else {
                                Ok(json!({"refunded": true}))
                            }
                        }
                    })
                    .retry(RetryPolicy {
                        max_attempts: 1,
                        backoff_base: Duration::from_millis(10),
                        backoff_max: Duration::from_millis(20),
                    }),
                Step::new("ship", |_c: StepCtx| async {
                    Err::<Value, _>(StepError::fatal("no courier"))
                }),
            ],
        );
        let (orch, db) = open(&b, vec![def], opts()).await;
        let runner = spawn(&orch);
        start(&orch, &db, "order", "s5", json!({})).await;
        assert_eq!(
            wait_end(&orch, "s5", Duration::from_secs(5)).await,
            SagaStatus::Compensated
        );
        runner.stop().await;
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        let ev = events(&db, "s5").await;
        let stuck: Vec<_> = ev.iter().filter(|e| e.0 == "saga.stuck").collect();
        assert_eq!(stuck.len(), 1, "{:?}", types(&ev));
        assert_eq!(stuck[0].1["attempts"], 3);
        assert_eq!(types(&ev).last(), Some(&"saga.compensated"));
        let label = SagaLabels {
            saga: "order".into(),
        };
        assert_eq!(orch.metrics().stuck_total.get_or_create(&label).get(), 1);
        // No longer stuck now that it finished.
        assert_eq!(orch.metrics().stuck.get(), 0);
        let d = orch.get("s5").await.unwrap().unwrap();
        // The compensation went through: the stuck episode is over.
        assert!(!d.summary.stuck);
        let undo: Vec<_> = d
            .timeline
            .iter()
            .filter(|t| t.phase == "undo")
            .map(|t| (t.attempt, t.status.as_str()))
            .collect();
        assert_eq!(
            undo,
            [
                (1, "failed"),
                (2, "failed"),
                (3, "failed"),
                (4, "failed"),
                (5, "failed"),
                (6, "ok")
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_runner_is_resumed_by_another_with_the_same_command_id() {
    for b in backends() {
        let commands: Log = Arc::default();
        let first_ran = Arc::new(tokio::sync::Notify::new());
        let defs = || {
            let c = commands.clone();
            let first = first_ran.clone();
            vec![SagaDef::new(
                "order",
                vec![
                    ok_step("reserve"),
                    Step::new("pay", move |ctx: StepCtx| {
                        let n = {
                            let mut c = c.lock().unwrap();
                            c.push(ctx.command_id.clone());
                            c.len()
                        };
                        let first = first.clone();
                        async move {
                            if n == 1 {
                                // Hangs, as a process does when it is killed mid-call.
                                first.notify_one();
                                std::future::pending::<()>().await;
                            }
                            Ok(json!({"payment": "p-1"}))
                        }
                    })
                    .timeout(Duration::from_millis(500)),
                    ok_step("confirm"),
                ],
            )]
        };
        let (orch1, db1) = open(&b, defs(), opts()).await;
        let crashed = spawn(&orch1);
        start(&orch1, &db1, "order", "s6", json!({"order": "o-6"})).await;
        tokio::time::timeout(Duration::from_secs(5), first_ran.notified())
            .await
            .expect("step 2 ran");
        crashed.handle.abort();
        let _ = crashed.handle.await;

        let (orch2, _db2) = open(&b, defs(), opts()).await;
        let t0 = Instant::now();
        let runner = spawn(&orch2);
        assert_eq!(
            wait_end(&orch2, "s6", Duration::from_secs(5)).await,
            SagaStatus::Completed
        );
        runner.stop().await;
        // Not before the lease (500 ms timeout + 200 ms margin) ran out.
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(*commands.lock().unwrap(), ["s6:pay:do", "s6:pay:do"]);
        let d = orch2.get("s6").await.unwrap().unwrap();
        let tl: Vec<_> = d.timeline.iter().map(|t| t.step.as_str()).collect();
        assert_eq!(tl, ["reserve", "pay", "confirm"]);
        assert_eq!(d.results["pay"]["payment"], "p-1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runners_never_run_one_instance_at_once() {
    for b in backends() {
        let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let max_seen = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let step = |name: &'static str| {
            let running = running.clone();
            let max_seen = max_seen.clone();
            let calls = calls.clone();
            Step::new(name, move |ctx: StepCtx| {
                let running = running.clone();
                let max_seen = max_seen.clone();
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let now = {
                        let mut r = running.lock().unwrap();
                        let n = r.entry(ctx.saga_id.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    max_seen.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    *running.lock().unwrap().get_mut(&ctx.saga_id).unwrap() -= 1;
                    Ok(Value::Null)
                }
            })
        };
        let defs = || vec![SagaDef::new("order", vec![step("a"), step("b"), step("c")])];
        let o = SagaOptions {
            idle_poll: Duration::from_millis(20),
            ..opts()
        };
        let (orch1, db1) = open(&b, defs(), o.clone()).await;
        let (orch2, _db2) = open(&b, defs(), o).await;
        let r1 = spawn(&orch1);
        let r2 = spawn(&orch2);
        let ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
        for id in &ids {
            start(&orch1, &db1, "order", id, json!({})).await;
            orch2.wake();
        }
        for id in &ids {
            assert_eq!(
                wait_end(&orch1, id, Duration::from_secs(10)).await,
                SagaStatus::Completed
            );
        }
        r1.stop().await;
        r2.stop().await;
        assert_eq!(max_seen.load(Ordering::SeqCst), 1, "{}", b.backend.name());
        // Without crashes every step ran exactly once.
        assert_eq!(calls.load(Ordering::SeqCst), 60);
        assert_eq!(orch1.list(Some("COMPLETED"), 100).await.unwrap().len(), 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_is_a_failed_attempt_and_a_refusal_after_a_timeout_is_undone() {
    for b in backends() {
        let quick = RetryPolicy {
            max_attempts: 3,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
        };
        let panics_once = Step::new("pay", |ctx: StepCtx| async move {
            if ctx.attempt == 1 {
                panic!("a bug in the step");
            }
            Ok(json!("ok"))
        })
        .retry(quick);
        // Attempt 1 times out (it may have charged), attempt 2 is refused.
        let undo: Log = Arc::default();
        let then_refused = Step::new("pay", |ctx: StepCtx| async move {
            if ctx.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(StepError::fatal("token already used"))
        })
        .timeout(Duration::from_millis(100))
        .retry(quick)
        .compensate(recording(&undo, "undo".into()));
        let defs = vec![
            SagaDef::new("panics", vec![panics_once]),
            SagaDef::new(
                "refused",
                vec![
                    ok_step("reserve").compensate(recording(&undo, "undo".into())),
                    then_refused,
                ],
            ),
        ];
        let (orch, db) = open(&b, defs, opts()).await;
        let runner = spawn(&orch);
        start(&orch, &db, "panics", "p1", json!({})).await;
        start(&orch, &db, "refused", "p2", json!({})).await;
        assert_eq!(
            wait_end(&orch, "p1", Duration::from_secs(5)).await,
            SagaStatus::Completed
        );
        assert_eq!(
            wait_end(&orch, "p2", Duration::from_secs(5)).await,
            SagaStatus::Compensated
        );
        runner.stop().await;
        let d = orch.get("p1").await.unwrap().unwrap();
        let tl: Vec<_> = d.timeline.iter().map(|t| t.status.as_str()).collect();
        assert_eq!(tl, ["failed", "ok"]);
        // The refused step is undone too: its timed-out first attempt may have taken effect.
        assert_eq!(
            *undo.lock().unwrap(),
            ["undo p2:pay:undo", "undo p2:reserve:undo"]
        );
    }
}
