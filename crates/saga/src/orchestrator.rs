//! Claims due instances, runs their steps and records every transition.

use crate::def::{BoxFuture, SagaDef, SagaStatus, StepCtx, StepError};
use crate::metrics::SagaMetrics;
use flowline_core::{Envelope, EventDraft, Timestamp};
use flowline_store::outbox::{self, Relay};
use flowline_store::{on_pool, on_tx, Db, Migration, StoreError, Tx};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

/// Topic of the saga lifecycle events; the key is the saga id.
pub const TOPIC: &str = "saga.events";

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        scope: "saga",
        version: 1,
        name: "saga instances and timeline",
        sqlite: include_str!("../migrations/sqlite/0001_saga.sql"),
        postgres: include_str!("../migrations/postgres/0001_saga.sql"),
    },
    Migration {
        scope: "saga",
        version: 2,
        name: "traceparent",
        sqlite: include_str!("../migrations/sqlite/0002_traceparent.sql"),
        postgres: include_str!("../migrations/postgres/0002_traceparent.sql"),
    },
];

#[derive(Debug, Clone)]
pub struct SagaOptions {
    /// Instances executed at once by one runner.
    pub max_in_flight: usize,
    /// How often an idle runner looks for work that `wake` did not announce
    /// (started by another process, or due after a backoff).
    pub idle_poll: Duration,
    /// Lease margin. An instance is held for its next step's timeout plus
    /// this (a fresh claim: the longest timeout plus this), so a live runner
    /// never loses an instance mid-step; after a crash, another runner picks
    /// it up once the lease has expired.
    pub lease: Duration,
    /// Failed attempts of one compensation before the saga is flagged stuck.
    pub stuck_after: u32,
}

impl Default for SagaOptions {
    fn default() -> Self {
        SagaOptions {
            max_in_flight: 64,
            idle_poll: Duration::from_millis(200),
            lease: Duration::from_secs(5),
            stuck_after: 5,
        }
    }
}

pub struct Orchestrator {
    pub(crate) db: Db,
    relay: Relay,
    pub(crate) defs: HashMap<String, Arc<SagaDef>>,
    opts: SagaOptions,
    lease: Duration,
    wake: Arc<Notify>,
    metrics: SagaMetrics,
}

pub(crate) const COLUMNS: &str = "id, name, status, data, results, step_index, attempt, \
    next_attempt_at, failure, stuck, version, traceparent";

pub(crate) type InstRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    Option<String>,
    i64,
    i64,
    Option<String>,
);

/// An instance as a runner holds it.
#[derive(Debug, Clone)]
pub(crate) struct Inst {
    pub id: String,
    pub name: String,
    pub status: SagaStatus,
    pub data: Value,
    pub results: Map<String, Value>,
    /// RUNNING: the next step to run. COMPENSATING: how many steps are left
    /// to undo (the next is `step_index - 1`).
    pub step_index: usize,
    /// Failed attempts of the current action or compensation.
    pub attempt: u32,
    pub next_at: i64,
    pub failure: Option<String>,
    pub stuck: bool,
    pub version: i64,
    /// The trace of whatever started the saga: every step continues it.
    pub traceparent: Option<String>,
}

pub(crate) fn status_of(s: &str) -> Result<SagaStatus, StoreError> {
    SagaStatus::parse(s).ok_or_else(|| StoreError::CorruptEvent(format!("saga status {s}")))
}

impl Inst {
    pub(crate) fn from_row(r: InstRow) -> Result<Inst, StoreError> {
        Ok(Inst {
            status: status_of(&r.2)?,
            data: serde_json::from_str(&r.3)?,
            results: serde_json::from_str(&r.4)?,
            id: r.0,
            name: r.1,
            step_index: r.5.max(0) as usize,
            attempt: r.6.clamp(0, u32::MAX as i64) as u32,
            next_at: r.7,
            failure: r.8,
            stuck: r.9 != 0,
            version: r.10,
            traceparent: r.11,
        })
    }
}

/// One timeline row.
struct Record<'a> {
    step: &'a str,
    phase: &'static str,
    attempt: u32,
    status: &'static str,
    started: i64,
    finished: i64,
    output: Option<String>,
    error: Option<String>,
}

/// What a transition writes besides the instance row.
struct Effects<'a> {
    record: Option<Record<'a>>,
    events: Vec<(&'static str, Value)>,
    /// A completed step, for `on_step`.
    step_output: Option<(&'a str, &'a Value)>,
    /// Keep the lease and go on at once (the next step or compensation).
    hold: bool,
}

fn now_us() -> i64 {
    Timestamp::now().as_micros()
}

fn micros(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

impl Orchestrator {
    /// Applies the kernel's and the saga migrations.
    ///
    /// # Panics
    /// If two definitions share a name or one has two steps with one name
    /// (results are keyed by step name).
    pub async fn new(
        db: Db,
        relay: Relay,
        defs: Vec<SagaDef>,
        opts: SagaOptions,
    ) -> Result<Orchestrator, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        let longest = defs
            .iter()
            .flat_map(|d| d.steps.iter().map(|s| s.timeout))
            .max()
            .unwrap_or_default();
        let mut map = HashMap::new();
        for def in defs {
            let mut names: Vec<&str> = def.steps.iter().map(|s| s.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(
                names.len(),
                def.steps.len(),
                "saga `{}` has two steps with one name",
                def.name
            );
            let name = def.name.clone();
            assert!(
                map.insert(name.clone(), Arc::new(def)).is_none(),
                "saga `{name}` defined twice"
            );
        }
        Ok(Orchestrator {
            db,
            relay,
            defs: map,
            lease: longest.saturating_add(opts.lease),
            opts,
            wake: Arc::new(Notify::new()),
            metrics: SagaMetrics::default(),
        })
    }

    pub fn metrics(&self) -> &SagaMetrics {
        &self.metrics
    }

    /// Makes the runner look for due instances now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Records a new instance of saga `name` in the caller's transaction, so
    /// it commits (or not) with the caller's own state. Starting an id that
    /// exists already does nothing. On PostgreSQL, call [`Self::wake`] again
    /// after the commit for the runner to see it before its next idle poll.
    pub async fn start(
        &self,
        tx: &mut Tx,
        name: &str,
        saga_id: &str,
        data: Value,
    ) -> Result<(), StoreError> {
        if !self.defs.contains_key(name) {
            // A programming error, not a request error: there is no variant for it.
            return Err(StoreError::Database(sqlx::Error::Configuration(
                format!("unknown saga `{name}`").into(),
            )));
        }
        let now = now_us();
        let data = serde_json::to_string(&data)?;
        let n = on_tx!(tx, |c| sqlx::query(
            "INSERT INTO saga_instances (id, name, status, data, results, step_index, attempt,
                next_attempt_at, locked_until, failure, stuck, version, created_at, updated_at,
                traceparent)
             VALUES ($1, $2, 'RUNNING', $3, '{}', 0, 0, $4, NULL, NULL, 0, 0, $4, $4, $5)
             ON CONFLICT (id) DO NOTHING"
        )
        .bind(saga_id)
        .bind(name)
        .bind(&data)
        .bind(now)
        .bind(flowline_telemetry::current_traceparent())
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        if n > 0 {
            self.metrics
                .started
                .get_or_create(&SagaMetrics::label(name))
                .inc();
        }
        self.wake();
        Ok(())
    }

    /// Runs due instances until shutdown. Several runners (in one process or
    /// many, on PostgreSQL) may share a database: a lease taken by a
    /// conditional update gives each instance to one of them at a time.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = JoinSet::new();
        let mut last_refresh = tokio::time::Instant::now();
        if let Err(e) = self.refresh_metrics().await {
            tracing::warn!(error = %e, "saga metrics refresh failed");
        }
        loop {
            if *shutdown.borrow() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            let free = self.opts.max_in_flight.saturating_sub(tasks.len());
            let mut full = free == 0;
            if free > 0 {
                match self.claim(free).await {
                    Ok(claimed) => {
                        full = claimed.len() == free;
                        for inst in claimed {
                            tasks.spawn(self.clone().drive(inst, shutdown.clone()));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "saga claim failed; will retry"),
                }
            }
            if last_refresh.elapsed() >= Duration::from_secs(5) {
                last_refresh = tokio::time::Instant::now();
                if let Err(e) = self.refresh_metrics().await {
                    tracing::warn!(error = %e, "saga metrics refresh failed");
                }
            }
            if full && !tasks.is_empty() {
                // Every slot is busy: wait for one to free up.
                tokio::select! {
                    _ = tasks.join_next() => {}
                    r = shutdown.changed() => if r.is_err() { break },
                }
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.opts.idle_poll) => {}
                // A dropped sender counts as shutdown (else this would spin).
                r = shutdown.changed() => if r.is_err() { break },
            }
        }
        // In-flight instances finish their current step, then release their lease.
        while tasks.join_next().await.is_some() {}
    }

    /// Frees every lease, so unfinished instances run again at once. Only
    /// for a process that knows it is the sole runner (an embedded database
    /// under its data-directory lock): leases a crashed run left behind need
    /// not expire first. With several runners, leases must expire instead.
    pub async fn release_leases(&self) -> Result<u64, StoreError> {
        let n = on_pool!(write & self.db, |p| sqlx::query(
            "UPDATE saga_instances SET locked_until = NULL
             WHERE status IN ('RUNNING', 'COMPENSATING') AND locked_until IS NOT NULL"
        )
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Leases up to `limit` due instances.
    async fn claim(&self, limit: usize) -> Result<Vec<Inst>, StoreError> {
        let now = now_us();
        let until = now.saturating_add(micros(self.lease));
        // SKIP LOCKED keeps concurrent PostgreSQL runners off each other's rows
        // (and out of deadlocks); the outer WHERE repeats the condition, so a
        // row another runner claimed meanwhile is re-checked and left alone.
        let lock = match self.db {
            Db::Postgres { .. } => " FOR UPDATE SKIP LOCKED",
            Db::Sqlite { .. } => "",
        };
        if self.defs.is_empty() {
            return Ok(Vec::new());
        }
        // Only sagas this process can run: during a rolling deploy an older
        // runner must not lease a newer saga it has no definition for.
        let names = self
            .defs
            .keys()
            .map(|n| format!("'{}'", n.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let due = format!(
            "status IN ('RUNNING', 'COMPENSATING') AND next_attempt_at <= $2 \
             AND (locked_until IS NULL OR locked_until <= $2) AND name IN ({names})"
        );
        // The pick is materialized: as an `IN (…)` subquery PostgreSQL may
        // run it as a join and lock (and lease) more than `limit` rows.
        let sql = format!(
            "WITH pick AS MATERIALIZED (
                 SELECT id FROM saga_instances WHERE {due}
                 ORDER BY next_attempt_at LIMIT $3{lock})
             UPDATE saga_instances SET locked_until = $1, version = version + 1
             FROM pick WHERE saga_instances.id = pick.id AND {due}
             RETURNING {}",
            COLUMNS
                .split(", ")
                .map(|c| format!("saga_instances.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows: Vec<InstRow> = on_pool!(write & self.db, |p| sqlx::query_as(&sql)
            .bind(until)
            .bind(now)
            .bind(limit as i64)
            .fetch_all(p)
            .await)?;
        // Row by row: one unreadable instance must not strand the batch.
        Ok(rows
            .into_iter()
            .filter_map(|r| match Inst::from_row(r) {
                Ok(i) => Some(i),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable saga instance left for its lease");
                    None
                }
            })
            .collect())
    }

    /// Takes one instance as far as it can go now.
    async fn drive(self: Arc<Self>, mut inst: Inst, shutdown: watch::Receiver<bool>) {
        let Some(def) = self.defs.get(&inst.name).cloned() else {
            tracing::warn!(saga_id = %inst.id, saga = %inst.name, "no definition for saga; left for its lease");
            return;
        };
        if *shutdown.borrow() {
            // Claimed while shutdown began: hand it straight back.
            if let Err(e) = self.release(&inst).await {
                tracing::warn!(saga_id = %inst.id, error = %e, "saga lease release failed");
            }
            return;
        }
        loop {
            // Each step is a span of the trace that started the saga.
            let span = tracing::info_span!("saga.step", saga = %inst.name, saga_id = %inst.id,
                phase = tracing::field::Empty, step = tracing::field::Empty,
                attempt = tracing::field::Empty, status = tracing::field::Empty,
                traceparent = inst.traceparent.as_deref());
            let step = match inst.status {
                SagaStatus::Running => self.step_forward(&def, &mut inst).instrument(span).await,
                SagaStatus::Compensating => self.step_back(&def, &mut inst).instrument(span).await,
                _ => return,
            };
            match step {
                Ok(true) if !*shutdown.borrow() => {}
                Ok(true) => {
                    if let Err(e) = self.release(&inst).await {
                        tracing::warn!(saga_id = %inst.id, error = %e, "saga lease release failed");
                    }
                    return;
                }
                Ok(false) => return,
                Err(e) => {
                    // The lease expires and the step runs again: participants dedupe.
                    tracing::warn!(saga_id = %inst.id, error = %e, "saga transition failed; retried when the lease expires");
                    return;
                }
            }
        }
    }

    /// Runs the current action. Returns whether to go on at once.
    async fn step_forward(&self, def: &SagaDef, inst: &mut Inst) -> Result<bool, StoreError> {
        let idx = inst.step_index;
        let mut next = inst.clone();
        let Some(step) = def.steps.get(idx) else {
            // Nothing (left) to run: a saga without steps.
            next.status = SagaStatus::Completed;
            let fx = Effects {
                record: None,
                events: vec![(
                    "saga.completed",
                    json!({"saga_id": inst.id, "saga": def.name}),
                )],
                step_output: None,
                hold: false,
            };
            self.commit(def, inst, next, fx).await?;
            return Ok(false);
        };
        let attempt = inst.attempt + 1;
        let ctx = StepCtx {
            saga_id: inst.id.clone(),
            step: step.name.clone(),
            command_id: format!("{}:{}:do", inst.id, step.name),
            attempt,
            data: inst.data.clone(),
            results: inst.results.clone(),
        };
        let span = tracing::Span::current();
        span.record("phase", "do");
        span.record("step", step.name.as_str());
        span.record("attempt", attempt);
        let started = now_us();
        let res = guarded(step.timeout, step.action.call(ctx)).await;
        let finished = now_us();
        span.record("status", outcome_of(&res));
        let mut record = Record {
            step: &step.name,
            phase: "do",
            attempt,
            status: "ok",
            started,
            finished,
            output: None,
            error: None,
        };
        let (message, retryable, status) = match res {
            Ok(Ok(output)) => {
                record.output = Some(serde_json::to_string(&output)?);
                next.results.insert(step.name.clone(), output.clone());
                next.step_index = idx + 1;
                next.attempt = 0;
                let mut events = vec![(
                    "saga.step_completed",
                    json!({"saga_id": inst.id, "saga": def.name, "step": step.name, "attempt": attempt}),
                )];
                let done = next.step_index >= def.steps.len();
                if done {
                    next.status = SagaStatus::Completed;
                    events.push((
                        "saga.completed",
                        json!({"saga_id": inst.id, "saga": def.name}),
                    ));
                }
                let fx = Effects {
                    record: Some(record),
                    events,
                    step_output: Some((&step.name, &output)),
                    hold: !done,
                };
                return self
                    .commit(def, inst, next, fx)
                    .await
                    .map(|held| held && !done);
            }
            Ok(Err(e)) => (e.message, e.retryable, "failed"),
            Err(_) => (
                format!("timed out after {} ms", step.timeout.as_millis()),
                true,
                "timeout",
            ),
        };
        self.metrics
            .failed_attempts
            .get_or_create(&SagaMetrics::label(&def.name))
            .inc();
        record.status = status;
        record.error = Some(message.clone());
        if retryable && attempt < step.retry.max_attempts {
            let wait = step.retry.backoff(attempt);
            next.attempt = attempt;
            next.next_at = now_us().saturating_add(micros(wait));
            let fx = Effects {
                record: Some(record),
                events: vec![],
                step_output: None,
                hold: false,
            };
            self.commit(def, inst, next, fx).await?;
            self.wake_after(wait);
            return Ok(false);
        }
        // A definite refusal had no effect; a step that timed out or kept
        // failing may have had one, so it is compensated too (its
        // compensation must accept "nothing to undo").
        // A refusal after an earlier timeout or failure is compensated too:
        // that earlier attempt may have taken effect.
        let undo = if retryable || attempt > 1 {
            idx + 1
        } else {
            idx
        };
        let reason = format!("{}: {}", step.name, message);
        next.status = SagaStatus::Compensating;
        next.failure = Some(reason.clone());
        next.step_index = def.undo_from(undo);
        next.attempt = 0;
        let mut events = vec![(
            "saga.compensating",
            json!({"saga_id": inst.id, "saga": def.name, "step": step.name, "reason": reason}),
        )];
        if next.step_index == 0 {
            next.status = SagaStatus::Compensated;
            events.push((
                "saga.compensated",
                json!({"saga_id": inst.id, "saga": def.name, "reason": reason}),
            ));
        }
        let go_on = next.status == SagaStatus::Compensating;
        let fx = Effects {
            record: Some(record),
            events,
            step_output: None,
            hold: go_on,
        };
        Ok(self.commit(def, inst, next, fx).await? && go_on)
    }

    /// Runs the next compensation. Returns whether to go on at once.
    async fn step_back(&self, def: &SagaDef, inst: &mut Inst) -> Result<bool, StoreError> {
        let mut next = inst.clone();
        let left = def.undo_from(inst.step_index.min(def.steps.len()));
        let reason = inst.failure.clone().unwrap_or_default();
        let compensated = |saga_id: &str| {
            (
                "saga.compensated",
                json!({"saga_id": saga_id, "saga": def.name, "reason": reason}),
            )
        };
        if left == 0 {
            next.status = SagaStatus::Compensated;
            next.step_index = 0;
            let fx = Effects {
                record: None,
                events: vec![compensated(&inst.id)],
                step_output: None,
                hold: false,
            };
            self.commit(def, inst, next, fx).await?;
            return Ok(false);
        }
        let step = &def.steps[left - 1];
        let Some(undo) = step.compensation.as_ref() else {
            unreachable!("undo_from stops at a step with a compensation")
        };
        let attempt = inst.attempt + 1;
        let ctx = StepCtx {
            saga_id: inst.id.clone(),
            step: step.name.clone(),
            command_id: format!("{}:{}:undo", inst.id, step.name),
            attempt,
            data: inst.data.clone(),
            results: inst.results.clone(),
        };
        let span = tracing::Span::current();
        span.record("phase", "undo");
        span.record("step", step.name.as_str());
        span.record("attempt", attempt);
        let started = now_us();
        let res = guarded(step.timeout, undo.call(ctx)).await;
        let finished = now_us();
        span.record("status", outcome_of(&res));
        let mut record = Record {
            step: &step.name,
            phase: "undo",
            attempt,
            status: "ok",
            started,
            finished,
            output: None,
            error: None,
        };
        let error = match res {
            Ok(Ok(output)) => {
                record.output = Some(serde_json::to_string(&output)?);
                next.step_index = def.undo_from(left - 1);
                next.attempt = 0;
                // A compensation that went through ends the stuck episode, so
                // a later one alerts again.
                next.stuck = false;
                let mut events = vec![(
                    "saga.step_compensated",
                    json!({"saga_id": inst.id, "saga": def.name, "step": step.name, "attempt": attempt}),
                )];
                let done = next.step_index == 0;
                if done {
                    next.status = SagaStatus::Compensated;
                    events.push(compensated(&inst.id));
                }
                let fx = Effects {
                    record: Some(record),
                    events,
                    step_output: None,
                    hold: !done,
                };
                return Ok(self.commit(def, inst, next, fx).await? && !done);
            }
            Ok(Err(e)) => ("failed", e.message),
            Err(_) => (
                "timeout",
                format!("timed out after {} ms", step.timeout.as_millis()),
            ),
        };
        self.metrics
            .failed_attempts
            .get_or_create(&SagaMetrics::label(&def.name))
            .inc();
        record.status = error.0;
        record.error = Some(error.1.clone());
        // Compensations are retried until they succeed: giving up would leave
        // the saga half-compensated. Never faster than the idle poll.
        let wait = step.retry.backoff(attempt).max(self.opts.idle_poll);
        next.attempt = attempt;
        next.next_at = now_us().saturating_add(micros(wait));
        let mut events = vec![];
        let newly_stuck = !inst.stuck && attempt >= self.opts.stuck_after;
        if newly_stuck {
            next.stuck = true;
            events.push((
                "saga.stuck",
                json!({"saga_id": inst.id, "saga": def.name, "step": step.name,
                       "attempts": attempt, "error": error.1}),
            ));
        }
        let fx = Effects {
            record: Some(record),
            events,
            step_output: None,
            hold: false,
        };
        if self.commit(def, inst, next, fx).await? && newly_stuck {
            tracing::error!(saga_id = %inst.id, saga = %def.name, step = %step.name, attempts = attempt, "saga stuck compensating");
            self.metrics
                .stuck_total
                .get_or_create(&SagaMetrics::label(&def.name))
                .inc();
            self.refresh_metrics().await?;
        }
        self.wake_after(wait);
        Ok(false)
    }

    /// Writes `next` over `inst` if this runner still holds it, with its
    /// timeline row, events and hooks, in one transaction. Returns false when
    /// the instance was taken over meanwhile (nothing is written then).
    /// Records a transition (and its events) as the orchestrator's own work:
    /// a `saga.transition` span inside the step's, so what it publishes is
    /// drawn as coming from the saga, not from the step's participant.
    async fn commit(
        &self,
        def: &SagaDef,
        inst: &mut Inst,
        next: Inst,
        fx: Effects<'_>,
    ) -> Result<bool, StoreError> {
        let span = tracing::info_span!("saga.transition", saga = %def.name, saga_id = %inst.id);
        self.commit_inner(def, inst, next, fx)
            .instrument(span)
            .await
    }

    async fn commit_inner(
        &self,
        def: &SagaDef,
        inst: &mut Inst,
        mut next: Inst,
        fx: Effects<'_>,
    ) -> Result<bool, StoreError> {
        let now = now_us();
        let (next_at, locked_until) = if fx.hold {
            // Held for the next action only: its timeout plus the margin.
            let upcoming = match next.status {
                SagaStatus::Running => def.steps.get(next.step_index),
                _ => def
                    .undo_from(next.step_index.min(def.steps.len()))
                    .checked_sub(1)
                    .and_then(|i| def.steps.get(i)),
            };
            let lease = upcoming.map_or(self.lease, |s| s.timeout.saturating_add(self.opts.lease));
            (now, Some(now.saturating_add(micros(lease))))
        } else if matches!(next.status, SagaStatus::Completed | SagaStatus::Compensated) {
            (now, None)
        } else {
            (next.next_at, None)
        };
        next.next_at = next_at;
        next.version = inst.version + 1;
        let results = serde_json::to_string(&next.results)?;
        let mut tx = self.db.begin().await?;
        let n = on_tx!(&mut tx, |c| {
            sqlx::query(
            "UPDATE saga_instances SET status = $1, results = $2, step_index = $3, attempt = $4,
                next_attempt_at = $5, locked_until = $6, failure = $7, stuck = $8,
                version = $9, updated_at = $10
             WHERE id = $11 AND version = $12"
        )
        .bind(next.status.as_str())
        .bind(&results)
        .bind(next.step_index as i64)
        .bind(next.attempt as i64)
        .bind(next_at)
        .bind(locked_until)
        .bind(next.failure.as_deref())
        .bind(next.stuck as i64)
        .bind(next.version)
        .bind(now)
        .bind(&next.id)
        .bind(inst.version)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        })?;
        if n == 0 {
            tx.rollback().await?;
            tracing::warn!(saga_id = %inst.id, "saga lease lost; the transition is dropped");
            return Ok(false);
        }
        if let Some(r) = &fx.record {
            insert_record(&mut tx, &inst.id, r).await?;
        }
        for (event_type, payload) in fx.events.iter() {
            let draft = EventDraft::new(TOPIC, *event_type, inst.id.clone(), payload.clone());
            outbox::enqueue(&mut tx, &Envelope::stamp(draft, &inst.id, None)).await?;
        }
        if let (Some(hook), Some((step, output))) = (&def.on_step, fx.step_output) {
            hook.call(&mut tx, &inst.id, step, output).await?;
        }
        let finished = matches!(next.status, SagaStatus::Completed | SagaStatus::Compensated);
        if let (Some(hook), true) = (&def.on_finish, finished) {
            hook.call(
                &mut tx,
                &inst.id,
                next.status,
                next.failure.as_deref(),
                &next.results,
            )
            .await?;
        }
        tx.commit().await?;
        if !fx.events.is_empty() {
            self.relay.notify();
        }
        let label = SagaMetrics::label(&def.name);
        match next.status {
            SagaStatus::Completed => self.metrics.completed.get_or_create(&label).inc(),
            SagaStatus::Compensated => self.metrics.compensated.get_or_create(&label).inc(),
            _ => 0,
        };
        let was_stuck = inst.stuck;
        *inst = next;
        if finished && was_stuck {
            self.refresh_metrics().await?;
        }
        Ok(true)
    }

    /// Gives an instance back (at shutdown) so another runner need not wait
    /// for the lease to expire.
    async fn release(&self, inst: &Inst) -> Result<(), StoreError> {
        on_pool!(write & self.db, |p| sqlx::query(
            "UPDATE saga_instances SET locked_until = NULL, version = version + 1
             WHERE id = $1 AND version = $2"
        )
        .bind(&inst.id)
        .bind(inst.version)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Wakes the runner when a backoff ends, rather than at its next idle poll.
    fn wake_after(&self, wait: Duration) {
        if wait < self.opts.idle_poll {
            let wake = self.wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                wake.notify_one();
            });
        }
    }

    /// Sets the stuck gauge from the database.
    pub async fn refresh_metrics(&self) -> Result<(), StoreError> {
        let n: i64 = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT COUNT(*) FROM saga_instances WHERE stuck = 1 AND status = 'COMPENSATING'"
        )
        .fetch_one(p)
        .await)?;
        self.metrics.stuck.set(n);
        Ok(())
    }
}

async fn insert_record(tx: &mut Tx, saga_id: &str, r: &Record<'_>) -> Result<(), StoreError> {
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO saga_steps (saga_id, seq, step, phase, attempt, status, started_at,
            finished_at, output, error)
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM saga_steps WHERE saga_id = $1),
            $2, $3, $4, $5, $6, $7, $8, $9)"
    )
    .bind(saga_id)
    .bind(r.step)
    .bind(r.phase)
    .bind(r.attempt as i64)
    .bind(r.status)
    .bind(r.started)
    .bind(r.finished)
    .bind(r.output.as_deref())
    .bind(r.error.as_deref())
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Runs a step's future on its own task under `timeout`: a panic becomes a
/// retryable failure (counted like any other, so it cannot loop unseen), and
/// a step past its timeout is aborted rather than left running.
/// `ok`, `failed` or `timeout`, for the step's span.
fn outcome_of(res: &Result<Result<Value, StepError>, tokio::time::error::Elapsed>) -> &'static str {
    match res {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "failed",
        Err(_) => "timeout",
    }
}

async fn guarded(
    timeout: Duration,
    fut: BoxFuture<'static, Result<Value, StepError>>,
) -> Result<Result<Value, StepError>, tokio::time::error::Elapsed> {
    // The step's own task stays in the step's span (and so in its trace).
    let mut task = tokio::spawn(fut.in_current_span());
    match tokio::time::timeout(timeout, &mut task).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Ok(Err(StepError::retryable(format!("step failed: {e}")))),
        Err(elapsed) => {
            task.abort();
            Err(elapsed)
        }
    }
}
