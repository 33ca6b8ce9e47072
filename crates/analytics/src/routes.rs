//! The admin API: the jobs with their watermark and counters, and each job's
//! windows. The server mounts [`routes`] behind its admin step.

use crate::{Analytics, JobStats, Window};
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::{ApiError, ApiQuery, ProblemDoc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The admin routes (paths relative to `/api/v1`).
pub fn routes<S: Clone + Send + Sync + 'static>(a: Arc<Analytics>) -> Router<S> {
    Router::new()
        .route("/admin/analytics", get(jobs))
        .route("/admin/analytics/{job}", get(windows))
        .with_state(a)
}

/// Every job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobList {
    pub items: Vec<JobStats>,
}

#[utoipa::path(get, path = "/api/v1/admin/analytics", tag = "analytics", security(("bearer" = [])),
    responses((status = 200, description = "The analytics jobs: window kind, aggregate, watermark (the slowest active topic partition's newest event time − out-of-orderness; the newest over all when every partition is idle) and the counts of applied, late-applied and dropped elements", body = JobList),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn jobs(State(a): State<Arc<Analytics>>) -> Result<Json<JobList>, ApiError> {
    Ok(Json(JobList {
        items: a.all_stats().await?,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WindowParams {
    /// Only this key (currency, channel id, `METHOD route`, user id, `all`).
    pub key: Option<String>,
    /// Windows starting at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Windows starting before this time (RFC 3339).
    pub to: Option<String>,
    /// 1 to 500 (default 60).
    pub limit: Option<i64>,
}

/// A job and its windows, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WindowPage {
    pub job: JobStats,
    pub items: Vec<Window>,
}

fn time(name: &str, v: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    v.filter(|s| !s.is_empty())
        .map(|s| {
            Timestamp::parse_rfc3339(s).map_err(|_| {
                ApiError::from(
                    Problem::new(ErrorCode::MalformedRequest)
                        .with_detail(format!("{name} must be an RFC 3339 time"))
                        .with_field(name, "e.g. 2026-11-22T10:00:00Z"),
                )
            })
        })
        .transpose()
}

#[utoipa::path(get, path = "/api/v1/admin/analytics/{job}", tag = "analytics", security(("bearer" = [])),
    params(("job" = String, Path, description = "`orders_per_minute`, `active_users`, `messages_per_channel`, `login_failures_per_minute`, `endpoint_latency` or `session_duration`"), WindowParams),
    responses((status = 200, description = "The job and its windows starting in [from, to), newest first: key, start, end, whether final, count, late count and the job's measure (sum, distinct, p50/p99/max in ms, or a session's duration)", body = WindowPage),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such job (`not_found`)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn windows(
    State(a): State<Arc<Analytics>>,
    Path(job): Path<String>,
    ApiQuery(q): ApiQuery<WindowParams>,
) -> Result<Json<WindowPage>, ApiError> {
    // The job first: an unknown job is a 404 whatever the parameters.
    let stats = a.job_stats(&job).await?;
    let limit = q.limit.unwrap_or(60);
    if !(1..=500).contains(&limit) {
        return Err(Problem::new(ErrorCode::MalformedRequest)
            .with_detail("limit must be 1 to 500")
            .with_field("limit", "1..=500")
            .into());
    }
    let from = time("from", q.from.as_deref())?;
    let to = time("to", q.to.as_deref())?;
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(Problem::new(ErrorCode::MalformedRequest)
                .with_detail("from must be before to")
                .with_field("from", "before `to`")
                .into());
        }
    }
    let key = q.key.as_deref().filter(|k| !k.is_empty());
    let items = a.windows(&job, key, from, to, limit).await?;
    Ok(Json(WindowPage { job: stats, items }))
}

/// The analytics part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(jobs, windows))]
pub struct AnalyticsApi;
