//! HTTP for auditors: the record with filters, the alerts, and a
//! verification of the chain. Admin only: the server mounts [`routes`] under
//! `/api/v1` behind its admin step.

use crate::{AlertFilter, AlertPage, Audit, AuditFilter, AuditPage, VerifyReport};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::{ApiError, ApiQuery, ProblemDoc};
use serde::Deserialize;
use std::sync::Arc;

/// The admin routes.
pub fn routes<S: Clone + Send + Sync + 'static>(audit: Arc<Audit>) -> Router<S> {
    Router::new()
        .route("/admin/audit", get(list))
        .route("/admin/audit/alerts", get(alerts))
        .route("/admin/audit/verify", get(verify))
        .with_state(audit)
}

fn bad(field: &str, msg: impl Into<String>) -> ApiError {
    let msg = msg.into();
    Problem::new(ErrorCode::MalformedRequest)
        .with_detail(format!("{field}: {msg}"))
        .with_field(field, msg)
        .into()
}

fn limit(given: Option<i64>) -> Result<u32, ApiError> {
    match given {
        None => Ok(50),
        Some(l @ 1..=500) => Ok(l as u32),
        Some(_) => Err(bad("limit", "1 to 500")),
    }
}

/// A trimmed, non-empty value.
fn given(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn time(field: &str, v: Option<String>) -> Result<Option<Timestamp>, ApiError> {
    given(v)
        .map(|s| {
            Timestamp::parse_rfc3339(&s)
                .map_err(|_| bad(field, "an RFC 3339 time such as 2026-05-01T10:00:00Z"))
        })
        .transpose()
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// A user id, or the masked email of a failed login.
    pub actor: Option<String>,
    /// An event type (`auth.login_failed`), or a prefix ending in `.` (`auth.`).
    pub action: Option<String>,
    /// `authentication`, `authorization`, `admin`, `data`, `account`, …
    pub category: Option<String>,
    pub ip: Option<String>,
    /// `success` or `failure`.
    pub outcome: Option<String>,
    /// Occurred at or after (RFC 3339).
    pub from: Option<String>,
    /// Occurred before (RFC 3339).
    pub to: Option<String>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "audit", security(("bearer" = [])), params(AuditParams),
    responses((status = 200, description = "Audit records, newest first", body = AuditPage),
        (status = 400, description = "Bad parameter (named; code `malformed_request`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list(
    State(audit): State<Arc<Audit>>,
    ApiQuery(q): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = limit(q.limit)?;
    let from = time("from", q.from)?;
    let to = time("to", q.to)?;
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(bad("to", "must be after `from`"));
        }
    }
    let outcome = given(q.outcome);
    if outcome
        .as_deref()
        .is_some_and(|o| o != "success" && o != "failure")
    {
        return Err(bad("outcome", "`success` or `failure`"));
    }
    if q.cursor.is_some_and(|c| c < 1) {
        return Err(bad("cursor", "a record seq (1 or more)"));
    }
    let filter = AuditFilter {
        actor: given(q.actor),
        action: given(q.action),
        category: given(q.category),
        ip: given(q.ip),
        outcome,
        from,
        to,
        limit,
        cursor: q.cursor,
    };
    Ok(Json(audit.query(filter).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AlertParams {
    /// `failed_logins_account` or `failed_logins_ip`.
    pub rule: Option<String>,
    /// The account (masked email or user id) or address.
    pub key: Option<String>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/admin/audit/alerts", tag = "audit", security(("bearer" = [])), params(AlertParams),
    responses((status = 200, description = "Alerts raised, newest first", body = AlertPage),
        (status = 400, description = "Bad parameter (named; code `malformed_request`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn alerts(
    State(audit): State<Arc<Audit>>,
    ApiQuery(q): ApiQuery<AlertParams>,
) -> Result<Json<AlertPage>, ApiError> {
    let filter = AlertFilter {
        rule: given(q.rule),
        key: given(q.key),
        limit: limit(q.limit)?,
        cursor: given(q.cursor),
    };
    Ok(Json(audit.alerts(filter).await?))
}

#[utoipa::path(get, path = "/api/v1/admin/audit/verify", tag = "audit", security(("bearer" = [])),
    responses((status = 200, description = "The chain recomputed: `ok`, the records read, the head, and the records found edited, deleted, inserted or cut off (the first 1000 in chain order; `truncated` when there were more)", body = VerifyReport),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn verify(State(audit): State<Arc<Audit>>) -> Result<Json<VerifyReport>, ApiError> {
    Ok(Json(audit.verify().await?))
}

/// The audit part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, alerts, verify))]
pub struct AuditApi;
