//! HTTP for the ledger. Every route is for admins: the server puts them behind
//! the gateway's authentication and admin steps.

use crate::{AccountBalance, Entry, Invoice, Ledger, NewEntry, CHART};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::{ApiError, ApiJson, ApiQuery, ProblemDoc, RequestContext};
use serde::Deserialize;
use std::sync::Arc;

pub fn routes<S: Clone + Send + Sync + 'static>(ledger: Arc<Ledger>) -> Router<S> {
    Router::new()
        .route("/ledger/entries", get(list_entries).post(post_entry))
        .route("/ledger/accounts", get(list_accounts))
        .route("/ledger/accounts/{id}/balance", get(balance))
        .route("/ledger/invoices", get(list_invoices))
        .route("/ledger/invoices/{number}", get(read_invoice))
        .with_state(ledger)
}

#[utoipa::path(post, path = "/api/v1/ledger/entries", tag = "ledger", security(("bearer" = [])), request_body = NewEntry,
    responses((status = 201, description = "Posted; `ledger.entry_posted` emitted", body = Entry),
        (status = 200, description = "The reference was already posted with these postings: the existing entry", body = Entry),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The reference was posted with other postings", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid entry (fields named) or `unbalanced_entry`", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn post_entry(
    State(l): State<Arc<Ledger>>,
    Extension(ctx): Extension<RequestContext>,
    ApiJson(new): ApiJson<NewEntry>,
) -> Result<(StatusCode, Json<Entry>), ApiError> {
    let posted = l.submit(&ctx, new).await?;
    let status = if posted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(posted.entry)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EntriesParams {
    /// Journal position to list after (`next_after` of the previous page); default 0.
    pub after: Option<i64>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/ledger/entries", tag = "ledger", security(("bearer" = [])), params(EntriesParams),
    responses((status = 200, description = "`items`: entries in journal order; `next_after` (absent on the last page)", body = serde_json::Value),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list_entries(
    State(l): State<Arc<Ledger>>,
    ApiQuery(q): ApiQuery<EntriesParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Problem::new(ErrorCode::MalformedRequest)
            .with_detail("limit must be 1 to 500")
            .with_field("limit", "1..=500")
            .into());
    }
    let items = l.entries(q.after.unwrap_or(0).max(0), limit).await?;
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|e| e.seq))
        .flatten();
    Ok(Json(
        serde_json::json!({ "items": items, "next_after": next }),
    ))
}

#[utoipa::path(get, path = "/api/v1/ledger/accounts", tag = "ledger", security(("bearer" = [])),
    responses((status = 200, description = "`items`: the chart of accounts", body = serde_json::Value),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list_accounts() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "items": CHART }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BalanceParams {
    /// RFC 3339: replay postings that occurred at or before it (default: now, from the projection).
    pub as_of: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/ledger/accounts/{id}/balance", tag = "ledger", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id"), BalanceParams),
    responses((status = 200, description = "Debits, credits and the balance (signed by the normal side) per currency", body = AccountBalance),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn balance(
    State(l): State<Arc<Ledger>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<BalanceParams>,
) -> Result<Json<AccountBalance>, ApiError> {
    let as_of = q
        .as_of
        .map(|s| {
            Timestamp::parse_rfc3339(&s).map_err(|_| {
                ApiError::from(
                    Problem::new(ErrorCode::MalformedRequest)
                        .with_detail("as_of must be an RFC 3339 time")
                        .with_field("as_of", "e.g. 2026-11-21T10:00:00Z"),
                )
            })
        })
        .transpose()?;
    Ok(Json(l.balance(&id, as_of).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InvoicesParams {
    /// Only this payment's invoice and credit notes.
    pub payment_id: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/ledger/invoices", tag = "ledger", security(("bearer" = [])), params(InvoicesParams),
    responses((status = 200, description = "`items`: invoices, then credit notes, in number order", body = serde_json::Value),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list_invoices(
    State(l): State<Arc<Ledger>>,
    ApiQuery(q): ApiQuery<InvoicesParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let items = l.invoices(q.payment_id.as_deref()).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

#[utoipa::path(get, path = "/api/v1/ledger/invoices/{number}", tag = "ledger", security(("bearer" = [])),
    params(("number" = String, Path, description = "`INV-000001` or `CN-000001`")),
    responses((status = 200, description = "The invoice or credit note", body = Invoice),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such invoice", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn read_invoice(
    State(l): State<Arc<Ledger>>,
    Path(number): Path<String>,
) -> Result<Json<Invoice>, ApiError> {
    Ok(Json(l.invoice(&number).await?))
}

/// The ledger's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    post_entry,
    list_entries,
    list_accounts,
    balance,
    list_invoices,
    read_invoice
))]
pub struct LedgerApi;
