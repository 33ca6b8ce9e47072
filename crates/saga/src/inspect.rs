//! Read-only views of instances and their timelines, for admin routes and the CLI.

use crate::def::SagaStatus;
use crate::orchestrator::{status_of, Inst, InstRow, Orchestrator, COLUMNS};
use flowline_core::Timestamp;
use flowline_store::{on_pool, StoreError};
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize)]
pub struct SagaSummary {
    pub id: String,
    pub name: String,
    pub status: SagaStatus,
    /// The step running or being compensated; none once finished.
    pub current_step: Option<String>,
    pub step_index: usize,
    /// Failed attempts of the current action or compensation.
    pub attempt: u32,
    pub stuck: bool,
    pub failure: Option<String>,
    pub next_attempt_at: Timestamp,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The trace the saga belongs to (`flowline flows TRACE_ID`).
    pub trace_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub seq: i64,
    pub step: String,
    /// `do` or `undo`.
    pub phase: String,
    pub attempt: u32,
    /// `ok`, `failed` or `timeout`.
    pub status: String,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub duration_ms: f64,
    pub output: Option<Value>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SagaDetail {
    #[serde(flatten)]
    pub summary: SagaSummary,
    pub data: Value,
    pub results: Map<String, Value>,
    pub locked_until: Option<Timestamp>,
    pub version: i64,
    pub timeline: Vec<TimelineEntry>,
}

type SummaryRow = (InstRow, i64, i64);
/// `COLUMNS` then `created_at, updated_at`.
type FlatRow = (
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
    i64,
    i64,
);

fn unflatten(r: FlatRow) -> SummaryRow {
    (
        (r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9, r.10, r.11),
        r.12,
        r.13,
    )
}
type StepRow = (
    i64,
    String,
    String,
    i64,
    String,
    i64,
    i64,
    Option<String>,
    Option<String>,
);

/// Keys whose values never leave the database through inspection.
const SECRET_KEYS: &[&str] = &[
    "password",
    "secret",
    "token",
    "cvv",
    "cvc",
    "card_number",
    "authorization",
    "api_key",
    "api-key",
    "apikey",
    "cookie",
    "cardnumber",
    "credential",
    "private_key",
];

/// Replaces secret-looking fields (card tokens, passwords…) at any depth,
/// and runs every string through the log redactor (emails masked; bearer
/// tokens, JWTs and card numbers inside free text removed).
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => redact_map(m),
        Value::Array(a) => a.iter_mut().for_each(redact),
        Value::String(s) => {
            if let std::borrow::Cow::Owned(r) = flowline_telemetry::redact::redact(s) {
                *s = r;
            }
        }
        _ => {}
    }
}

fn redact_map(m: &mut Map<String, Value>) {
    for (k, v) in m.iter_mut() {
        let k = k.to_ascii_lowercase();
        if SECRET_KEYS.iter().any(|s| k.contains(s)) || k == "pan" {
            *v = Value::String("[redacted]".into());
        } else {
            redact(v);
        }
    }
}

impl Orchestrator {
    fn summary(&self, row: SummaryRow) -> Result<(SagaSummary, Inst), StoreError> {
        let (inst, created, updated) = (Inst::from_row(row.0)?, row.1, row.2);
        let steps = self.defs.get(&inst.name).map(|d| &d.steps);
        let current_step = match inst.status {
            SagaStatus::Running => steps.and_then(|s| s.get(inst.step_index)),
            SagaStatus::Compensating => inst
                .step_index
                .checked_sub(1)
                .and_then(|i| steps.and_then(|s| s.get(i))),
            _ => None,
        }
        .map(|s| s.name.clone());
        Ok((
            SagaSummary {
                id: inst.id.clone(),
                name: inst.name.clone(),
                status: inst.status,
                current_step,
                step_index: inst.step_index,
                attempt: inst.attempt,
                stuck: inst.stuck,
                failure: inst.failure.clone(),
                next_attempt_at: Timestamp::from_micros(inst.next_at),
                created_at: Timestamp::from_micros(created),
                updated_at: Timestamp::from_micros(updated),
                trace_id: inst
                    .traceparent
                    .as_deref()
                    .and_then(flowline_telemetry::TraceContext::parse)
                    .map(|c| c.trace_hex()),
            },
            inst,
        ))
    }

    /// Newest first. `status` is RUNNING, COMPENSATING, COMPLETED,
    /// COMPENSATED, or STUCK (compensating and flagged stuck).
    pub async fn list(
        &self,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        let filter = match status {
            None => "",
            Some("STUCK") => "WHERE stuck = 1 AND status = 'COMPENSATING'",
            Some(_) => "WHERE status = $2",
        };
        let sql = format!(
            "SELECT {COLUMNS}, created_at, updated_at FROM saga_instances {filter}
             ORDER BY created_at DESC, id DESC LIMIT $1"
        );
        let rows: Vec<SummaryRow> = on_pool!(&self.db, |p| {
            let mut q = sqlx::query_as::<_, FlatRow>(&sql).bind(limit.clamp(0, 1000));
            if let Some(s) = status.filter(|s| *s != "STUCK") {
                q = q.bind(s);
            }
            q.fetch_all(p).await
        })?
        .into_iter()
        .map(unflatten)
        .collect();
        rows.into_iter()
            .map(|r| self.summary(r).map(|(s, _)| s))
            .collect()
    }

    /// An instance with its timeline; secrets in data and outputs redacted.
    pub async fn get(&self, id: &str) -> Result<Option<SagaDetail>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS}, created_at, updated_at FROM saga_instances WHERE id = $1");
        let row: Option<FlatRow> = on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let locked_until: Option<i64> = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT locked_until FROM saga_instances WHERE id = $1"
        )
        .bind(id)
        .fetch_one(p)
        .await)?;
        let steps: Vec<StepRow> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT seq, step, phase, attempt, status, started_at, finished_at, output, error
             FROM saga_steps WHERE saga_id = $1 ORDER BY seq"
        )
        .bind(id)
        .fetch_all(p)
        .await)?;
        let (summary, inst) = self.summary(unflatten(row))?;
        let mut data = inst.data;
        redact(&mut data);
        let mut results = inst.results;
        redact_map(&mut results);
        let timeline = steps
            .into_iter()
            .map(|s| {
                let output = match s.7 {
                    Some(text) => {
                        let mut v: Value = serde_json::from_str(&text)?;
                        redact(&mut v);
                        Some(v)
                    }
                    None => None,
                };
                Ok(TimelineEntry {
                    seq: s.0,
                    step: s.1,
                    phase: s.2,
                    attempt: s.3.clamp(0, u32::MAX as i64) as u32,
                    status: s.4,
                    started_at: Timestamp::from_micros(s.5),
                    finished_at: Timestamp::from_micros(s.6),
                    duration_ms: (s.6 - s.5) as f64 / 1000.0,
                    output,
                    error: s.8,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(SagaDetail {
            summary,
            data,
            results,
            locked_until: locked_until.map(Timestamp::from_micros),
            version: inst.version,
            timeline,
        }))
    }

    /// An instance's status, for callers that wait on it.
    pub async fn status(&self, id: &str) -> Result<Option<SagaStatus>, StoreError> {
        let s: Option<String> = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT status FROM saga_instances WHERE id = $1"
        )
        .bind(id)
        .fetch_optional(p)
        .await)?;
        s.map(|s| status_of(&s)).transpose()
    }
}
