//! Saga inspection for admins: `GET /admin/sagas`, `GET /admin/sagas/{id}`,
//! and `flowline saga show|list`.

use crate::app::AppState;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiQuery, ProblemDoc};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/sagas", get(list))
        .route("/admin/sagas/{id}", get(show))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SagaParams {
    /// RUNNING, COMPENSATING, COMPLETED, COMPENSATED or STUCK.
    pub status: Option<String>,
    /// 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

const STATUSES: [&str; 5] = [
    "RUNNING",
    "COMPENSATING",
    "COMPLETED",
    "COMPENSATED",
    "STUCK",
];

#[utoipa::path(get, path = "/api/v1/admin/sagas", tag = "admin", security(("bearer" = [])), params(SagaParams),
    responses((status = 200, description = "Saga instances, newest first: {items: [{id, name, status, current_step, attempt, stuck, failure, …}]}", body = Object),
        (status = 400, description = "Bad status or limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<SagaParams>,
) -> Result<Json<Value>, ApiError> {
    let mut bad = Problem::new(ErrorCode::MalformedRequest);
    if q.status.as_deref().is_some_and(|s| !STATUSES.contains(&s)) {
        bad = bad.with_field("status", STATUSES.join(", "));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        bad = bad.with_field("limit", "1..=1000");
    }
    if !bad.errors.is_empty() {
        return Err(bad.into());
    }
    // Orders and messaging each keep their sagas in their own database.
    let mut items = state
        .orders
        .orchestrator()
        .list(q.status.as_deref(), limit)
        .await?;
    items.extend(
        state
            .messaging
            .orchestrator()
            .list(q.status.as_deref(), limit)
            .await?,
    );
    items.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    items.truncate(limit as usize);
    Ok(Json(serde_json::json!({ "items": items })))
}

#[utoipa::path(get, path = "/api/v1/admin/sagas/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Saga id (an order's place saga has the order's id; a create-workspace saga the workspace's)")),
    responses((status = 200, description = "The instance and its timeline: every attempt of every step and compensation with timings, outputs and errors; secrets redacted", body = Object),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such saga", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let found = match state.orders.orchestrator().get(&id).await? {
        Some(d) => Some(d),
        None => state.messaging.orchestrator().get(&id).await?,
    };
    match found {
        Some(d) => Ok(Json(
            serde_json::to_value(d).map_err(flowline_store::StoreError::from)?,
        )),
        None => Err(Problem::new(ErrorCode::NotFound)
            .with_detail("no such saga")
            .into()),
    }
}

/// `flowline saga show ID`: the timeline as a table (or JSON).
pub fn print_detail(d: &flowline_saga::SagaDetail, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(d)?);
        return Ok(());
    }
    let s = &d.summary;
    println!("saga     {} ({})", s.id, s.name);
    println!(
        "status   {}{}",
        s.status.as_str(),
        if s.stuck { " — STUCK" } else { "" }
    );
    if let Some(step) = &s.current_step {
        println!("current  {step} (failed attempts: {})", s.attempt);
    }
    if let Some(f) = &s.failure {
        println!("failure  {f}");
    }
    println!("created  {}", s.created_at.to_rfc3339());
    println!("updated  {}", s.updated_at.to_rfc3339());
    println!();
    println!(
        "{:>4}  {:<18} {:<5} {:>3}  {:<8} {:>10}  detail",
        "#", "step", "phase", "try", "status", "ms"
    );
    for t in &d.timeline {
        let detail = match (&t.error, &t.output) {
            (Some(e), _) => e.clone(),
            (None, Some(o)) => o.to_string(),
            (None, None) => String::new(),
        };
        println!(
            "{:>4}  {:<18} {:<5} {:>3}  {:<8} {:>10.1}  {}",
            t.seq, t.step, t.phase, t.attempt, t.status, t.duration_ms, detail
        );
    }
    Ok(())
}

/// Saga inspection's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, show))]
pub struct SagasApi;
