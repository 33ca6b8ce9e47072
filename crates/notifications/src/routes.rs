//! HTTP for notifications: a user's in-app inbox and preferences; for
//! admins the local mailbox, the delivery log and the templates. The server
//! mounts the first router behind authentication and the second behind the
//! admin step.

use crate::{
    Delivery, DeliveryCounts, DeliveryFilter, DeliveryStatus, InAppNotification, MailboxEntry,
    NewTemplate, Notifications, Preferences, Template, TemplateKind,
};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiJson, ApiQuery, Principal, ProblemDoc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// (authenticated user routes, admin routes).
pub fn routes<S: Clone + Send + Sync + 'static>(n: Arc<Notifications>) -> (Router<S>, Router<S>) {
    let user = Router::new()
        .route("/notifications", get(list_mine))
        .route(
            "/notifications/preferences",
            get(read_preferences).put(write_preferences),
        )
        .route("/notifications/{id}/read", post(mark_read))
        .with_state(n.clone());
    let admin = Router::new()
        .route("/admin/mailbox", get(mailbox))
        .route("/admin/notifications/deliveries", get(deliveries))
        .route(
            "/admin/notifications/deliveries/{id}/retry",
            post(retry_dead),
        )
        .route("/admin/notification-templates", get(templates))
        .route(
            "/admin/notification-templates/{key}/{locale}",
            put(put_template),
        )
        .with_state(n);
    (user, admin)
}

fn limit(given: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    let l = given.unwrap_or(default);
    if !(1..=max).contains(&l) {
        return Err(Problem::new(ErrorCode::MalformedRequest)
            .with_detail(format!("limit must be 1 to {max}"))
            .with_field("limit", format!("1..={max}"))
            .into());
    }
    Ok(l)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InboxParams {
    /// Only notifications not yet read.
    pub unread: Option<bool>,
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of the user's in-app notifications.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InboxPage {
    pub items: Vec<InAppNotification>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
    /// Unread notifications in total.
    pub unread: i64,
}

#[utoipa::path(get, path = "/api/v1/notifications", tag = "notifications", security(("bearer" = [])), params(InboxParams),
    responses((status = 200, description = "The caller's in-app notifications, newest first", body = InboxPage),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list_mine(
    State(n): State<Arc<Notifications>>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<InboxParams>,
) -> Result<Json<InboxPage>, ApiError> {
    let limit = limit(q.limit, 20, 100)?;
    let items = n
        .in_app(
            &who.user_id,
            q.unread.unwrap_or(false),
            limit,
            q.cursor.as_deref(),
        )
        .await?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|i| i.id.clone()))
        .flatten();
    let unread = n.unread_count(&who.user_id).await?;
    Ok(Json(InboxPage {
        items,
        next_cursor,
        unread,
    }))
}

#[utoipa::path(post, path = "/api/v1/notifications/{id}/read", tag = "notifications", security(("bearer" = [])),
    params(("id" = String, Path, description = "Notification id")),
    responses((status = 200, description = "Marked read (or already was; the first read time stays)", body = InAppNotification),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such notification of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn mark_read(
    State(n): State<Arc<Notifications>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<InAppNotification>, ApiError> {
    Ok(Json(n.mark_read(&who.user_id, &id).await?))
}

#[utoipa::path(get, path = "/api/v1/notifications/preferences", tag = "notifications", security(("bearer" = [])),
    responses((status = 200, description = "The caller's opt-outs and locale", body = Preferences),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn read_preferences(
    State(n): State<Arc<Notifications>>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Preferences>, ApiError> {
    Ok(Json(n.preferences(&who.user_id).await?))
}

#[utoipa::path(put, path = "/api/v1/notifications/preferences", tag = "notifications", security(("bearer" = [])), request_body = Preferences,
    responses((status = 200, description = "Replaced; later notifications follow them", body = Preferences),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Unknown channel, type or locale (fields named, e.g. `opt_out[0].channel`)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn write_preferences(
    State(n): State<Arc<Notifications>>,
    Extension(who): Extension<Principal>,
    ApiJson(prefs): ApiJson<Preferences>,
) -> Result<Json<Preferences>, ApiError> {
    Ok(Json(n.set_preferences(&who.user_id, prefs).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MailboxParams {
    /// Only emails to this address.
    pub to: Option<String>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// Emails in the local mailbox.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MailboxPage {
    pub items: Vec<MailboxEntry>,
}

#[utoipa::path(get, path = "/api/v1/admin/mailbox", tag = "notifications", security(("bearer" = [])), params(MailboxParams),
    responses((status = 200, description = "Emails the local mailbox transport wrote, newest first", body = MailboxPage),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn mailbox(
    State(n): State<Arc<Notifications>>,
    ApiQuery(q): ApiQuery<MailboxParams>,
) -> Result<Json<MailboxPage>, ApiError> {
    let limit = limit(q.limit, 50, 500)?;
    let to = q.to.as_deref().map(str::trim).filter(|t| !t.is_empty());
    Ok(Json(MailboxPage {
        items: n.mailbox(to, limit).await?,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// `QUEUED`, `RETRY`, `SENT` or `DEAD` (the dead letters).
    pub status: Option<String>,
    pub user_id: Option<String>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// A page of the delivery log with the counts per status.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryPage {
    pub items: Vec<Delivery>,
    pub counts: DeliveryCounts,
}

#[utoipa::path(get, path = "/api/v1/admin/notifications/deliveries", tag = "notifications", security(("bearer" = [])), params(DeliveryParams),
    responses((status = 200, description = "The delivery log, newest first: channel, template key, version and locale, status, attempts, last error; with counts per status", body = DeliveryPage),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn deliveries(
    State(n): State<Arc<Notifications>>,
    ApiQuery(q): ApiQuery<DeliveryParams>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let limit = limit(q.limit, 50, 500)?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            ApiError::from(
                Problem::new(ErrorCode::MalformedRequest)
                    .with_detail("status must be QUEUED, RETRY, SENT or DEAD")
                    .with_field("status", "QUEUED, RETRY, SENT or DEAD"),
            )
        })?),
    };
    let filter = DeliveryFilter {
        status,
        user_id: q.user_id.filter(|u| !u.is_empty()),
        limit,
    };
    Ok(Json(DeliveryPage {
        items: n.deliveries(&filter).await?,
        counts: n.counts().await?,
    }))
}

/// Every stored template version and the variables each type offers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateList {
    /// By key and locale, newest version first.
    pub items: Vec<Template>,
    pub kinds: Vec<TemplateKind>,
}

#[utoipa::path(get, path = "/api/v1/admin/notification-templates", tag = "notifications", security(("bearer" = [])),
    responses((status = 200, description = "Every template version (the highest version of a key and locale is the one in use) and each notification type's variables", body = TemplateList),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn templates(
    State(n): State<Arc<Notifications>>,
) -> Result<Json<TemplateList>, ApiError> {
    Ok(Json(TemplateList {
        items: n.templates().await?,
        kinds: n.kinds(),
    }))
}

#[utoipa::path(put, path = "/api/v1/admin/notification-templates/{key}/{locale}", tag = "notifications", security(("bearer" = [])), request_body = NewTemplate,
    params(("key" = String, Path, description = "Notification type, e.g. `order_confirmed`"),
        ("locale" = String, Path, description = "`en`, `pt`, `pt-BR`, …")),
    responses((status = 201, description = "Stored as the next version; later deliveries use it", body = Template),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such notification type", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Another version was stored at the same moment", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Does not render with the type's variables, or bad locale (fields named)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn put_template(
    State(n): State<Arc<Notifications>>,
    Path((key, locale)): Path<(String, String)>,
    ApiJson(new): ApiJson<NewTemplate>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let t = n.put_template(&key, &locale, new).await?;
    Ok((StatusCode::CREATED, Json(t)))
}

/// The notifications part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list_mine,
    mark_read,
    read_preferences,
    write_preferences,
    mailbox,
    deliveries,
    templates,
    put_template,
    retry_dead
))]
pub struct NotificationsApi;

#[utoipa::path(post, path = "/api/v1/admin/notifications/deliveries/{id}/retry", tag = "notifications", security(("bearer" = [])),
    params(("id" = String, Path, description = "Delivery id")),
    responses((status = 200, description = "The dead letter is queued again (RETRY, attempts reset)", body = Delivery),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such delivery", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The delivery is not DEAD", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn retry_dead(
    State(n): State<Arc<Notifications>>,
    Path(id): Path<String>,
) -> Result<Json<Delivery>, ApiError> {
    match n.retry_dead(&id).await? {
        None => Err(Problem::new(ErrorCode::NotFound)
            .with_detail("no such delivery")
            .into()),
        Some(false) => Err(Problem::new(ErrorCode::InvalidState)
            .with_detail("only a DEAD delivery can be retried")
            .into()),
        Some(true) => match n.delivery(&id).await? {
            Some(d) => Ok(Json(d)),
            None => Err(Problem::new(ErrorCode::NotFound).into()),
        },
    }
}
