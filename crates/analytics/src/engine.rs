//! Applying one element to a job's stored state, inside the event's
//! transaction.
//!
//! The caller holds the job's row lock (taken by [`lock`]) for the whole
//! transaction, so concurrent appliers of one job (several nodes sharing a
//! PostgreSQL database) queue instead of interleaving, and every state change
//! of an event commits or rolls back with its inbox claim — the job's
//! per-source progress ([`Sources`]) included.

use crate::job::{
    micros, windows_of, Element, ElementValue, Job, SourceMark, WindowKind, MAX_CLOCK_SKEW,
};
use crate::latency;
use flowline_store::{on_pool, on_tx, Db, StoreError, Tx};
use sqlx::Row;

/// A job's progress as stored in `analytics_jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct JobState {
    pub max_event_time: Option<i64>,
    pub watermark: Option<i64>,
    pub events: i64,
    pub late_applied: i64,
    pub dropped: i64,
}

/// One input source of a job, a topic partition, as stored in
/// `analytics_sources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub topic: String,
    pub partition: i32,
    pub mark: SourceMark,
}

/// A job's input sources: what its watermark is computed from.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    list: Vec<Source>,
    /// When this process opened the analytics context (µs). A source counts
    /// as active for `idle_timeout` after it whatever its stored last
    /// element: after a restart every source's last element is old, and the
    /// first partition the consumer catches up on must not run the watermark
    /// ahead of the others' backlog.
    opened_at: i64,
}

const SOURCES: &str = "SELECT topic, topic_partition, max_event_time, last_seen
     FROM analytics_sources WHERE job = $1 ORDER BY topic, topic_partition";

type SourceRow = (String, i32, i64, i64);

fn source((topic, partition, max_event_time, last_seen): SourceRow) -> Source {
    Source {
        topic,
        partition,
        mark: SourceMark {
            max_event_time,
            last_seen,
        },
    }
}

impl Sources {
    /// The job's sources, inside the transaction holding the job's lock.
    pub(crate) async fn load(tx: &mut Tx, job: &str, opened_at: i64) -> Result<Self, StoreError> {
        let rows: Vec<SourceRow> =
            on_tx!(tx, |c| sqlx::query_as(SOURCES).bind(job).fetch_all(c).await)?;
        Ok(Sources {
            list: rows.into_iter().map(source).collect(),
            opened_at,
        })
    }

    /// The job's sources, for a reader.
    pub(crate) async fn read(db: &Db, job: &str, opened_at: i64) -> Result<Self, StoreError> {
        let rows: Vec<SourceRow> =
            on_pool!(db, |p| sqlx::query_as(SOURCES).bind(job).fetch_all(p).await)?;
        Ok(Sources {
            list: rows.into_iter().map(source).collect(),
            opened_at,
        })
    }

    /// What the sources allow the watermark to be at `now` (see
    /// [`Job::watermark_of`]).
    pub(crate) fn watermark(&self, job: &Job, now: i64) -> Option<i64> {
        let marks: Vec<SourceMark> = self
            .list
            .iter()
            .map(|s| SourceMark {
                last_seen: s.mark.last_seen.max(self.opened_at),
                ..s.mark
            })
            .collect();
        job.watermark_of(&marks, now)
    }

    /// The index of a source, added (with no event time yet) if new.
    pub(crate) fn index(&mut self, topic: &str, partition: i32, now: i64) -> usize {
        if let Some(i) = self
            .list
            .iter()
            .position(|s| s.topic == topic && s.partition == partition)
        {
            return i;
        }
        self.list.push(Source {
            topic: topic.to_owned(),
            partition,
            mark: SourceMark {
                max_event_time: i64::MIN,
                last_seen: now,
            },
        });
        self.list.len() - 1
    }

    /// Records an element of event time `t` from source `i` at wall clock
    /// `now`. The time counts at most `now + MAX_CLOCK_SKEW`.
    fn observe(&mut self, i: usize, t: i64, now: i64) {
        let t = t.min(now.saturating_add(micros(MAX_CLOCK_SKEW)));
        let m = &mut self.list[i].mark;
        m.max_event_time = m.max_event_time.max(t);
        m.last_seen = now;
    }

    /// Writes source `i` back.
    pub(crate) async fn save(&self, tx: &mut Tx, job: &str, i: usize) -> Result<(), StoreError> {
        let s = &self.list[i];
        on_tx!(tx, |c| sqlx::query(
            "INSERT INTO analytics_sources (job, topic, topic_partition, max_event_time, last_seen)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (job, topic, topic_partition) DO UPDATE SET
                max_event_time = excluded.max_event_time, last_seen = excluded.last_seen"
        )
        .bind(job)
        .bind(&s.topic)
        .bind(s.partition)
        .bind(s.mark.max_event_time)
        .bind(s.mark.last_seen)
        .execute(c)
        .await
        .map(|_| ()))?;
        Ok(())
    }
}

/// Raises `s.watermark` to what `sources` allow at `now`; never lowers it.
pub(crate) fn advance(job: &Job, s: &mut JobState, sources: &Sources, now: i64) {
    if let Some(w) = sources.watermark(job, now) {
        s.watermark = Some(s.watermark.map_or(w, |old| old.max(w)));
    }
}

/// What became of one element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    OnTime,
    /// Applied to a window the watermark had already passed.
    Late,
    /// Every window it belongs to is final.
    Dropped,
}

/// Locks the job's row for the rest of the transaction and reads it.
pub(crate) async fn lock(tx: &mut Tx, job: &str) -> Result<JobState, StoreError> {
    let row = on_tx!(tx, |c| sqlx::query(
        "UPDATE analytics_jobs SET updated_at = updated_at WHERE job = $1
         RETURNING max_event_time, watermark, events, late_applied, dropped"
    )
    .bind(job)
    .fetch_optional(c)
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
    match row {
        Some(s) => Ok(s),
        // Rows are created at open; a job added since by another process's
        // configuration starts here.
        None => {
            on_tx!(tx, |c| sqlx::query(
                "INSERT INTO analytics_jobs (job, updated_at) VALUES ($1, 0)
                 ON CONFLICT (job) DO NOTHING"
            )
            .bind(job)
            .execute(c)
            .await
            .map(|_| ()))?;
            Box::pin(lock(tx, job)).await
        }
    }
}

pub(crate) async fn save(tx: &mut Tx, job: &str, s: &JobState, now: i64) -> Result<(), StoreError> {
    on_tx!(tx, |c| sqlx::query(
        "UPDATE analytics_jobs SET max_event_time = $2, watermark = $3, events = $4,
            late_applied = $5, dropped = $6, updated_at = $7 WHERE job = $1"
    )
    .bind(job)
    .bind(s.max_event_time)
    .bind(s.watermark)
    .bind(s.events)
    .bind(s.late_applied)
    .bind(s.dropped)
    .bind(now)
    .execute(c)
    .await
    .map(|_| ()))?;
    Ok(())
}

/// Applies `el`, which came from source `src`, to `job` and updates the
/// counters in `s`, the source in `sources` and the watermark.
pub(crate) async fn apply(
    tx: &mut Tx,
    job: &Job,
    s: &mut JobState,
    sources: &mut Sources,
    src: usize,
    el: &Element,
    now: i64,
) -> Result<Fate, StoreError> {
    let fate = match job.window {
        WindowKind::Session { gap } => session(tx, job, s, el, micros(gap)).await?,
        _ => windowed(tx, job, s, el, now).await?,
    };
    match fate {
        Fate::Dropped => s.dropped += 1,
        Fate::Late => {
            s.events += 1;
            s.late_applied += 1;
        }
        Fate::OnTime => s.events += 1,
    }
    let t = el.at.as_micros();
    if fate != Fate::Dropped {
        s.max_event_time = Some(s.max_event_time.map_or(t, |m| m.max(t)));
    }
    // Even a dropped element marks its source active: a source that is
    // behind holds the watermark until it catches up. The watermark follows
    // the slowest active source and never moves back (not even if
    // out_of_orderness is raised between runs).
    sources.observe(src, t, now);
    advance(job, s, sources, now);
    Ok(fate)
}

/// Tumbling and sliding windows: the element updates each of its windows
/// that is not final; it is dropped only when all of them are. It is late
/// when any of its windows had already been passed by the watermark.
async fn windowed(
    tx: &mut Tx,
    job: &Job,
    s: &JobState,
    el: &Element,
    now: i64,
) -> Result<Fate, StoreError> {
    let windows = windows_of(job.window, el.at.as_micros());
    let passed = |end: i64| s.watermark.is_some_and(|w| w >= end);
    let mut applied = false;
    let mut late = false;
    for (start, end) in windows {
        if passed(end) {
            late = true;
        }
        if job.is_final(end, s.watermark) {
            continue;
        }
        update_window(
            tx,
            job.name,
            &el.key,
            start,
            end,
            &el.value,
            passed(end),
            now,
        )
        .await?;
        applied = true;
    }
    Ok(match (applied, late) {
        (false, _) => Fate::Dropped,
        (true, true) => Fate::Late,
        (true, false) => Fate::OnTime,
    })
}

#[allow(clippy::too_many_arguments)]
async fn update_window(
    tx: &mut Tx,
    job: &str,
    key: &str,
    start: i64,
    end: i64,
    value: &ElementValue,
    late: bool,
    now: i64,
) -> Result<(), StoreError> {
    let (sum, max, distinct) = match value {
        ElementValue::None => (0, None, 0),
        ElementValue::Amount(a) => (*a, None, 0),
        ElementValue::Member(m) => {
            let new = on_tx!(tx, |c| sqlx::query(
                "INSERT INTO analytics_window_members
                    (job, window_key, window_start, window_end, member)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"
            )
            .bind(job)
            .bind(key)
            .bind(start)
            .bind(end)
            .bind(m)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
            (0, None, new as i64)
        }
        ElementValue::DurationUs(d) => {
            on_tx!(tx, |c| sqlx::query(
                "INSERT INTO analytics_window_latency
                    (job, window_key, window_start, window_end, bucket_us, n)
                 VALUES ($1, $2, $3, $4, $5, 1)
                 ON CONFLICT (job, window_key, window_start, window_end, bucket_us)
                 DO UPDATE SET n = analytics_window_latency.n + 1"
            )
            .bind(job)
            .bind(key)
            .bind(start)
            .bind(end)
            .bind(latency::bucket(*d))
            .execute(c)
            .await
            .map(|_| ()))?;
            (*d, Some(*d), 0)
        }
    };
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO analytics_windows (job, window_key, window_start, window_end, elements,
            late_elements, sum_value, distinct_count, max_value, updated_at)
         VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9)
         ON CONFLICT (job, window_key, window_start, window_end) DO UPDATE SET
            elements = analytics_windows.elements + 1,
            late_elements = analytics_windows.late_elements + excluded.late_elements,
            sum_value = analytics_windows.sum_value + excluded.sum_value,
            distinct_count = analytics_windows.distinct_count + excluded.distinct_count,
            max_value = CASE
                WHEN analytics_windows.max_value IS NULL
                  OR excluded.max_value > analytics_windows.max_value
                THEN excluded.max_value ELSE analytics_windows.max_value END,
            updated_at = excluded.updated_at"
    )
    .bind(job)
    .bind(key)
    .bind(start)
    .bind(end)
    .bind(i64::from(late))
    .bind(sum)
    .bind(distinct)
    .bind(max)
    .bind(now)
    .execute(c)
    .await
    .map(|_| ()))?;
    Ok(())
}

/// Session windows. The element's own window is `[t, t + gap)`; it merges
/// with every open session of the key whose window `[start, last + gap)`
/// overlaps it (a late element may bridge two sessions into one). It is
/// dropped when its own window is final, or when it would merge into a
/// session already closed (final sessions never change).
async fn session(
    tx: &mut Tx,
    job: &Job,
    s: &JobState,
    el: &Element,
    gap: i64,
) -> Result<Fate, StoreError> {
    let t = el.at.as_micros();
    if job.is_final(t.saturating_add(gap), s.watermark) {
        return Ok(Fate::Dropped);
    }
    let (hi, lo) = (t.saturating_add(gap), t.saturating_sub(gap));
    let closed: i64 = on_tx!(tx, |c| sqlx::query_scalar(
        "SELECT count(*) FROM analytics_sessions
         WHERE job = $1 AND session_key = $2 AND session_start < $3 AND session_end > $4"
    )
    .bind(job.name)
    .bind(&el.key)
    .bind(hi)
    .bind(lo)
    .fetch_one(c)
    .await)?;
    if closed > 0 {
        return Ok(Fate::Dropped);
    }
    let overlapping: Vec<(i64, i64, i64)> = on_tx!(tx, |c| sqlx::query_as(
        "SELECT session_start, last_event, events FROM analytics_open_sessions
         WHERE job = $1 AND session_key = $2 AND session_start < $3 AND last_event > $4"
    )
    .bind(job.name)
    .bind(&el.key)
    .bind(hi)
    .bind(lo)
    .fetch_all(c)
    .await)?;
    let (mut start, mut last, mut events) = (t, t, 1);
    for (s0, l0, n0) in &overlapping {
        start = start.min(*s0);
        last = last.max(*l0);
        events += n0;
    }
    if !overlapping.is_empty() {
        on_tx!(tx, |c| sqlx::query(
            "DELETE FROM analytics_open_sessions
             WHERE job = $1 AND session_key = $2 AND session_start < $3 AND last_event > $4"
        )
        .bind(job.name)
        .bind(&el.key)
        .bind(hi)
        .bind(lo)
        .execute(c)
        .await
        .map(|_| ()))?;
    }
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO analytics_open_sessions (job, session_key, session_start, last_event, events)
         VALUES ($1, $2, $3, $4, $5)"
    )
    .bind(job.name)
    .bind(&el.key)
    .bind(start)
    .bind(last)
    .bind(events)
    .execute(c)
    .await
    .map(|_| ()))?;
    let passed = s.watermark.is_some_and(|w| w >= last.saturating_add(gap));
    Ok(if passed { Fate::Late } else { Fate::OnTime })
}

/// Closes the sessions the watermark has made final (`last + gap +
/// allowed_lateness ≤ watermark`): they move to `analytics_sessions` and never
/// change again. Returns how many closed.
pub(crate) async fn close_sessions(
    tx: &mut Tx,
    job: &Job,
    s: &JobState,
    now: i64,
) -> Result<u64, StoreError> {
    let (WindowKind::Session { gap }, Some(w)) = (job.window, s.watermark) else {
        return Ok(0);
    };
    let before = w
        .saturating_sub(micros(gap))
        .saturating_sub(job.lateness_us());
    let n = on_tx!(tx, |c| sqlx::query(
        "INSERT INTO analytics_sessions
            (job, session_key, session_start, session_end, events, closed_at)
         SELECT job, session_key, session_start, last_event, events, $3
         FROM analytics_open_sessions WHERE job = $1 AND last_event <= $2"
    )
    .bind(job.name)
    .bind(before)
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    if n > 0 {
        on_tx!(tx, |c| sqlx::query(
            "DELETE FROM analytics_open_sessions WHERE job = $1 AND last_event <= $2"
        )
        .bind(job.name)
        .bind(before)
        .execute(c)
        .await
        .map(|_| ()))?;
    }
    Ok(n)
}
