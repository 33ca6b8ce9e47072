//! flowline-analytics: a stream processor over the event log.
//!
//! Jobs ([`Job`]) turn events into keyed elements with an event time and
//! aggregate them in tumbling, sliding or session windows. Event time, not
//! arrival time, decides the window, so the numbers do not depend on how late
//! or in what order the log delivers (partitions interleave freely).
//!
//! - Watermark: tracked per input *source*, a `(topic, partition)` of the
//!   log. Per job, each source keeps the largest event time it delivered and
//!   the wall-clock time of its last element (`analytics_sources`). The job's
//!   watermark is the smallest of those event times over the *active*
//!   sources, minus `out_of_orderness`, and never moves back. The consumer
//!   reads up to a batch of one partition before the next, and a retried
//!   event or a backlog after a restart holds one partition back: taking the
//!   minimum keeps a partition that runs ahead from finalizing windows the
//!   others are still delivering into. A source that delivered nothing for
//!   `idle_timeout` of processing time is idle and left out (it would stall
//!   the job otherwise); when every source is idle, the largest event time
//!   over all of them counts, so a quiet system still finalizes its windows
//!   (readers see that without waiting for another event). For
//!   `idle_timeout` after the process opens every known source counts as
//!   active, so a restart's backlog is not mistaken for idleness. A source
//!   joins when its first element arrives: one never seen cannot hold the
//!   watermark back. An event time counts for the watermark at most
//!   [`MAX_CLOCK_SKEW`] past the wall clock (a producer whose clock runs
//!   ahead must not finalize everything); the element still goes to the
//!   windows of its own time.
//! - Windows: a window `[start, end)` is *final* once
//!   `watermark ≥ end + allowed_lateness`. An element whose window the
//!   watermark has passed but which is not final yet still updates it and is
//!   counted `late_applied`; one whose windows are all final is counted
//!   `dropped` and changes nothing (a final window never changes).
//! - Exactly once: every state change of one event — windows, members,
//!   latency buckets, sessions, the job's sources, watermark and counters —
//!   commits in one transaction with the event's inbox claim. The consumer
//!   commits its offset after the batch, so a crash redelivers the
//!   uncommitted tail, and the inbox turns each already-applied event into a
//!   no-op: the state is checkpointed with the offset, nothing is lost or
//!   counted twice.
//!
//! The built-in jobs are in [`builtin`]; [`routes`] is the admin API.

pub mod builtin;
mod engine;
pub mod job;
pub mod latency;
mod metrics;
pub mod routes;

pub use builtin::{
    builtin_jobs, ACTIVE_USERS, ALL, AUDIT_TOPIC, ENDPOINT_LATENCY, LOGIN_FAILURES_PER_MINUTE,
    MESSAGES_PER_CHANNEL, MESSAGES_TOPIC, ORDERS_PER_MINUTE, ORDERS_TOPIC, REQUESTS_TOPIC,
    SESSION_DURATION,
};
pub use job::{
    Aggregate, Element, ElementValue, Extractor, Job, WindowKind, WindowSpec, MAX_CLOCK_SKEW,
};
pub use metrics::{AnalyticsMetrics, JobLabels};

use crate::engine::{Fate, JobState, Sources};
use crate::job::micros;
use flowline_core::{ErrorCode, Problem, RecordedEvent, Timestamp};
use flowline_http::ApiError;
use flowline_store::{inbox, on_pool, outbox, Db, Handler, HandlerError, Migration, StoreError};
use serde::Serialize;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The consumer group, and the inbox consumer name.
pub const GROUP: &str = "analytics";
/// Everything the built-in jobs read.
pub const TOPICS: &[&str] = &[ORDERS_TOPIC, AUDIT_TOPIC, MESSAGES_TOPIC, REQUESTS_TOPIC];

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        scope: "analytics",
        version: 1,
        name: "jobs, windows, sessions",
        sqlite: include_str!("../migrations/sqlite/0001_analytics.sql"),
        postgres: include_str!("../migrations/postgres/0001_analytics.sql"),
    },
    Migration {
        scope: "analytics",
        version: 2,
        name: "per-source watermarks",
        sqlite: include_str!("../migrations/sqlite/0002_sources.sql"),
        postgres: include_str!("../migrations/postgres/0002_sources.sql"),
    },
];

/// Settings of the built-in jobs.
#[derive(Debug, Clone)]
pub struct AnalyticsConfig {
    /// How far behind the slowest active source's newest event time the
    /// watermark trails (5 s).
    pub out_of_orderness: Duration,
    /// How long after the watermark passes a window it still accepts late
    /// elements (1 min).
    pub allowed_lateness: Duration,
    /// Inactivity that ends a user session (30 min).
    pub session_gap: Duration,
    /// Processing time after which a source (topic partition) that delivered
    /// nothing stops holding the watermark back (30 s). Zero: one watermark
    /// for all sources, following the newest event time over all of them.
    pub idle_timeout: Duration,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            out_of_orderness: Duration::from_secs(5),
            allowed_lateness: Duration::from_secs(60),
            session_gap: Duration::from_secs(30 * 60),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event a job consumes whose payload it cannot read.
    #[error("{0}")]
    Malformed(String),
    #[error("no analytics job `{0}`")]
    UnknownJob(String),
}

impl From<AnalyticsError> for ApiError {
    fn from(e: AnalyticsError) -> Self {
        match e {
            AnalyticsError::Store(e) => ApiError::from(e),
            AnalyticsError::UnknownJob(j) => Problem::new(ErrorCode::NotFound)
                .with_detail(format!("no analytics job `{j}`"))
                .into(),
            AnalyticsError::Malformed(m) => Problem::new(ErrorCode::MalformedRequest)
                .with_detail(m)
                .into(),
        }
    }
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// The event had been applied before (the inbox had it): nothing changed.
    pub duplicate: bool,
    /// Elements applied, over all jobs (late ones included).
    pub elements: u64,
    pub late_applied: u64,
    pub dropped: u64,
    /// Sessions the advanced watermark closed.
    pub sessions_closed: u64,
}

/// A job with its stored progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobStats {
    #[schema(value_type = String)]
    pub name: &'static str,
    #[schema(value_type = String)]
    pub description: &'static str,
    pub window: WindowSpec,
    pub aggregate: Aggregate,
    pub out_of_orderness_ms: i64,
    pub allowed_lateness_ms: i64,
    /// RFC 3339; absent before the first element. The slowest active
    /// source's newest event time − out_of_orderness (every source's newest
    /// when all are idle), never moving back.
    #[schema(value_type = Option<String>)]
    pub watermark: Option<Timestamp>,
    /// The largest event time seen over all sources (RFC 3339).
    #[schema(value_type = Option<String>)]
    pub max_event_time: Option<Timestamp>,
    /// Elements applied (on time or late).
    pub events: i64,
    /// Elements applied to a window the watermark had already passed.
    pub late_applied: i64,
    /// Elements whose windows were all final.
    pub dropped: i64,
}

/// One window of a job (for a session job, one session).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Window {
    /// The job's key (currency, channel, `METHOD route`, user id, or `all`).
    pub key: String,
    /// RFC 3339, inclusive. For a session, its first event.
    #[schema(value_type = String)]
    pub start: Timestamp,
    /// RFC 3339, exclusive. For a session, its last event.
    #[schema(value_type = String)]
    pub end: Timestamp,
    /// No element can change it any more (watermark ≥ end + allowed
    /// lateness; a session: closed).
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Elements in the window.
    pub count: i64,
    /// Of which applied after the watermark had passed the window.
    pub late: i64,
    /// `sum` jobs: the total in minor units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<i64>,
    /// `distinct` jobs: distinct members (users).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distinct: Option<i64>,
    /// `latency` jobs: nearest-rank median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    /// `latency` jobs: nearest-rank 99th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<f64>,
    /// Sessions: `end - start`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// A user session of [`SESSION_DURATION`].
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Session {
    pub user_id: String,
    /// The first event (RFC 3339).
    #[schema(value_type = String)]
    pub start: Timestamp,
    /// The last event (RFC 3339).
    #[schema(value_type = String)]
    pub end: Timestamp,
    pub duration_ms: f64,
    pub events: i64,
    /// Closed by the watermark: final.
    pub closed: bool,
}

fn ms(us: i64) -> f64 {
    us as f64 / 1000.0
}

/// The analytics context: the jobs, their stored state and the queries.
pub struct Analytics {
    db: Db,
    jobs: Vec<Job>,
    metrics: AnalyticsMetrics,
    /// When this instance opened (µs): see [`engine::Sources`].
    opened_at: i64,
}

impl Analytics {
    /// Opens with the built-in jobs ([`builtin_jobs`]).
    pub async fn open(db: Db, config: AnalyticsConfig) -> Result<Arc<Analytics>, StoreError> {
        Self::open_with_jobs(db, builtin_jobs(&config)).await
    }

    /// Opens with these jobs: runs the migrations and creates missing job
    /// rows. State of jobs no longer configured stays in the database.
    ///
    /// # Panics
    /// On an invalid job (zero size, slide larger than size, duplicate name):
    /// jobs are code, not input.
    pub async fn open_with_jobs(db: Db, jobs: Vec<Job>) -> Result<Arc<Analytics>, StoreError> {
        for (i, j) in jobs.iter().enumerate() {
            if let Err(e) = j.validate() {
                panic!("{e}");
            }
            assert!(
                jobs[..i].iter().all(|o| o.name != j.name),
                "duplicate analytics job `{}`",
                j.name
            );
        }
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        let now = Timestamp::now().as_micros();
        for j in &jobs {
            on_pool!(write & db, |p| sqlx::query(
                "INSERT INTO analytics_jobs (job, updated_at) VALUES ($1, $2)
                 ON CONFLICT (job) DO NOTHING"
            )
            .bind(j.name)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()))?;
        }
        Ok(Arc::new(Analytics {
            db,
            jobs,
            metrics: AnalyticsMetrics::default(),
            opened_at: now,
        }))
    }

    pub fn jobs(&self) -> &[Job] {
        &self.jobs
    }

    pub fn metrics(&self) -> &AnalyticsMetrics {
        &self.metrics
    }

    fn job(&self, name: &str) -> Result<&Job, AnalyticsError> {
        self.jobs
            .iter()
            .find(|j| j.name == name)
            .ok_or_else(|| AnalyticsError::UnknownJob(name.to_owned()))
    }

    /// Applies one event to every job it concerns, in one transaction with
    /// its inbox claim. A redelivered event changes nothing. Events no job
    /// reads are not recorded at all.
    pub async fn apply(&self, ev: &RecordedEvent) -> Result<Applied, AnalyticsError> {
        let e = &ev.envelope;
        let mut work = Vec::new();
        for job in &self.jobs {
            let elements = (job.extract)(e).map_err(AnalyticsError::Malformed)?;
            if !elements.is_empty() {
                work.push((job, elements));
            }
        }
        if work.is_empty() {
            return Ok(Applied::default());
        }
        let mut tx = self.db.begin().await?;
        if !inbox::claim(&mut tx, GROUP, e.id).await? {
            tx.rollback().await?;
            self.metrics.duplicates.inc();
            return Ok(Applied {
                duplicate: true,
                ..Applied::default()
            });
        }
        let mut out = Applied::default();
        let mut per_job = Vec::new();
        // Jobs are locked in configuration order: concurrent appliers (other
        // nodes, other partitions) take the same locks in the same order.
        for (job, elements) in work {
            let mut st = engine::lock(&mut tx, job.name).await?;
            // Read once the lock is held: idleness is judged at the same
            // moment for everything this job does with the event.
            let now = Timestamp::now().as_micros();
            let mut sources = Sources::load(&mut tx, job.name, self.opened_at).await?;
            // Sources idle since the last event may have let the watermark
            // advance (readers already show that): it applies before this
            // event's elements are placed.
            engine::advance(job, &mut st, &sources, now);
            let src = sources.index(&e.topic, ev.partition, now);
            let (mut applied, mut late, mut dropped) = (0, 0, 0);
            for el in &elements {
                match engine::apply(&mut tx, job, &mut st, &mut sources, src, el, now).await? {
                    Fate::OnTime => applied += 1,
                    Fate::Late => {
                        applied += 1;
                        late += 1;
                    }
                    Fate::Dropped => dropped += 1,
                }
            }
            out.sessions_closed += engine::close_sessions(&mut tx, job, &st, now).await?;
            sources.save(&mut tx, job.name, src).await?;
            engine::save(&mut tx, job.name, &st, now).await?;
            out.elements += applied;
            out.late_applied += late;
            out.dropped += dropped;
            per_job.push((job.name, applied, late, dropped, st.watermark));
        }
        tx.commit().await?;
        for (name, applied, late, dropped, wm) in per_job {
            self.metrics.job(name, applied, late, dropped, wm);
        }
        Ok(out)
    }

    /// A job's stored progress, with the watermark the sources allow now
    /// (idle ones left out): a quiet job's windows become final as its
    /// sources go idle, before any new event arrives.
    async fn state(&self, job: &Job) -> Result<JobState, StoreError> {
        let mut st = self.stored_state(job.name).await?;
        let sources = Sources::read(&self.db, job.name, self.opened_at).await?;
        engine::advance(job, &mut st, &sources, Timestamp::now().as_micros());
        Ok(st)
    }

    async fn stored_state(&self, job: &str) -> Result<JobState, StoreError> {
        let row = on_pool!(&self.db, |p| sqlx::query(
            "SELECT max_event_time, watermark, events, late_applied, dropped
             FROM analytics_jobs WHERE job = $1"
        )
        .bind(job)
        .fetch_optional(p)
        .await
        .and_then(|r| r
            .map(|r| Ok(JobState {
                max_event_time: r.try_get("max_event_time")?,
                watermark: r.try_get("watermark")?,
                events: r.try_get("events")?,
                late_applied: r.try_get("late_applied")?,
                dropped: r.try_get("dropped")?,
            }))
            .transpose()))?;
        Ok(row.unwrap_or_default())
    }

    /// A job's definition and stored progress.
    pub async fn job_stats(&self, job: &str) -> Result<JobStats, AnalyticsError> {
        let j = self.job(job)?;
        let s = self.state(j).await?;
        Ok(JobStats {
            name: j.name,
            description: j.description,
            window: j.window.into(),
            aggregate: j.aggregate,
            out_of_orderness_ms: micros(j.out_of_orderness) / 1000,
            allowed_lateness_ms: micros(j.allowed_lateness) / 1000,
            watermark: s.watermark.map(Timestamp::from_micros),
            max_event_time: s.max_event_time.map(Timestamp::from_micros),
            events: s.events,
            late_applied: s.late_applied,
            dropped: s.dropped,
        })
    }

    /// Every job's stats, in configuration order.
    pub async fn all_stats(&self) -> Result<Vec<JobStats>, AnalyticsError> {
        let mut v = Vec::with_capacity(self.jobs.len());
        for j in &self.jobs {
            v.push(self.job_stats(j.name).await?);
        }
        Ok(v)
    }

    /// A job's windows starting in `[from, to)`, newest first (then by key),
    /// at most `limit`. For a session job, its sessions (open and closed).
    pub async fn windows(
        &self,
        job: &str,
        key: Option<&str>,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
        limit: i64,
    ) -> Result<Vec<Window>, AnalyticsError> {
        let j = self.job(job)?;
        let from = from.map_or(i64::MIN, Timestamp::as_micros);
        let to = to.map_or(i64::MAX, Timestamp::as_micros);
        if let WindowKind::Session { .. } = j.window {
            let sessions = self.session_rows(j.name, key, from, to, limit).await?;
            return Ok(sessions
                .into_iter()
                .map(|s| Window {
                    key: s.user_id,
                    start: s.start,
                    end: s.end,
                    is_final: s.closed,
                    count: s.events,
                    late: 0,
                    sum: None,
                    distinct: None,
                    p50_ms: None,
                    p99_ms: None,
                    max_ms: None,
                    duration_ms: Some(s.duration_ms),
                })
                .collect());
        }
        let st = self.state(j).await?;
        type Row = (String, i64, i64, i64, i64, i64, i64, Option<i64>);
        let rows: Vec<Row> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT window_key, window_start, window_end, elements, late_elements, sum_value,
                    distinct_count, max_value
             FROM analytics_windows
             WHERE job = $1 AND ($2 IS NULL OR window_key = $2)
               AND window_start >= $3 AND window_start < $4
             ORDER BY window_start DESC, window_key LIMIT $5"
        )
        .bind(job)
        .bind(key)
        .bind(from)
        .bind(to)
        .bind(limit)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)?;
        let mut dist: HashMap<(String, i64), Vec<(i64, i64)>> = HashMap::new();
        if j.aggregate == Aggregate::Latency && !rows.is_empty() {
            let lo = rows.iter().map(|r| r.1).min().unwrap_or(from);
            let hi = rows.iter().map(|r| r.1).max().unwrap_or(to);
            let buckets: Vec<(String, i64, i64, i64)> = on_pool!(&self.db, |p| sqlx::query_as(
                "SELECT window_key, window_start, bucket_us, n FROM analytics_window_latency
                 WHERE job = $1 AND ($2 IS NULL OR window_key = $2)
                   AND window_start >= $3 AND window_start <= $4
                 ORDER BY window_key, window_start, bucket_us"
            )
            .bind(job)
            .bind(key)
            .bind(lo)
            .bind(hi)
            .fetch_all(p)
            .await)
            .map_err(StoreError::from)?;
            for (k, start, bucket, n) in buckets {
                dist.entry((k, start)).or_default().push((bucket, n));
            }
        }
        Ok(rows
            .into_iter()
            .map(|(k, start, end, count, late, sum, distinct, max)| {
                let d = dist.get(&(k.clone(), start)).map(Vec::as_slice);
                let latency = j.aggregate == Aggregate::Latency;
                let pct = |p| d.and_then(|d| latency::percentile(d, p)).map(ms);
                Window {
                    is_final: j.is_final(end, st.watermark),
                    key: k,
                    start: Timestamp::from_micros(start),
                    end: Timestamp::from_micros(end),
                    count,
                    late,
                    sum: (j.aggregate == Aggregate::Sum).then_some(sum),
                    distinct: (j.aggregate == Aggregate::Distinct).then_some(distinct),
                    p50_ms: if latency { pct(50) } else { None },
                    p99_ms: if latency { pct(99) } else { None },
                    max_ms: if latency { max.map(ms) } else { None },
                    duration_ms: None,
                }
            })
            .collect())
    }

    /// A user's sessions of [`SESSION_DURATION`], newest first: the closed
    /// ones and the one still open, if any.
    pub async fn sessions(&self, user: &str, limit: i64) -> Result<Vec<Session>, AnalyticsError> {
        self.job(SESSION_DURATION)?;
        Ok(self
            .session_rows(SESSION_DURATION, Some(user), i64::MIN, i64::MAX, limit)
            .await?)
    }

    async fn session_rows(
        &self,
        job: &str,
        key: Option<&str>,
        from: i64,
        to: i64,
        limit: i64,
    ) -> Result<Vec<Session>, StoreError> {
        let mut all = Vec::new();
        for (table, end, closed) in [
            ("analytics_sessions", "session_end", true),
            ("analytics_open_sessions", "last_event", false),
        ] {
            let sql = format!(
                "SELECT session_key, session_start, {end}, events FROM {table}
                 WHERE job = $1 AND ($2 IS NULL OR session_key = $2)
                   AND session_start >= $3 AND session_start < $4
                 ORDER BY session_start DESC, session_key LIMIT $5"
            );
            let rows: Vec<(String, i64, i64, i64)> = on_pool!(&self.db, |p| sqlx::query_as(&sql)
                .bind(job)
                .bind(key)
                .bind(from)
                .bind(to)
                .bind(limit)
                .fetch_all(p)
                .await)?;
            all.extend(rows.into_iter().map(|(k, start, end, events)| Session {
                user_id: k,
                start: Timestamp::from_micros(start),
                end: Timestamp::from_micros(end),
                duration_ms: ms(end - start),
                events,
                closed,
            }));
        }
        all.sort_by(|a, b| {
            b.start
                .cmp(&a.start)
                .then_with(|| a.user_id.cmp(&b.user_id))
        });
        all.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(all)
    }

    /// Deletes final windows that ended before `before` (and closed sessions
    /// no element could reach any more). Windows that may still change are
    /// kept whatever `before` says. Returns the rows deleted.
    pub async fn prune(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut n = 0;
        for j in &self.jobs {
            let Some(w) = self.state(j).await?.watermark else {
                continue;
            };
            let before = before.as_micros();
            if let WindowKind::Session { gap } = j.window {
                // Beyond this no new element can overlap the session without
                // its own window being final, so forgetting it is safe.
                let cutoff = before.min(
                    w.saturating_sub(2 * micros(gap))
                        .saturating_sub(j.lateness_us()),
                );
                n += on_pool!(write & self.db, |p| sqlx::query(
                    "DELETE FROM analytics_sessions WHERE job = $1 AND session_end < $2"
                )
                .bind(j.name)
                .bind(cutoff)
                .execute(p)
                .await
                .map(|r| r.rows_affected()))?;
                continue;
            }
            let cutoff = before.min(w.saturating_sub(j.lateness_us()).saturating_add(1));
            for table in [
                "analytics_window_members",
                "analytics_window_latency",
                "analytics_windows",
            ] {
                let sql = format!("DELETE FROM {table} WHERE job = $1 AND window_end < $2");
                n += on_pool!(write & self.db, |p| sqlx::query(&sql)
                    .bind(j.name)
                    .bind(cutoff)
                    .execute(p)
                    .await
                    .map(|r| r.rows_affected()))?;
            }
        }
        Ok(n)
    }
}

impl Handler for Analytics {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        match self.apply(ev).await {
            Ok(_) => Ok(()),
            Err(AnalyticsError::Malformed(m)) => Err(HandlerError::permanent(m)),
            Err(e) => Err(HandlerError::transient(e)),
        }
    }
}
