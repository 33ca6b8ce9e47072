//! HTTP for shipping: customers read their own shipments; couriers and admins
//! list them, move them forward and plan the day's routes. The order saga
//! creates and cancels shipments in-process, not over HTTP.

use crate::{RoutePlan, RoutePlanRequest, Shipment, Shipping, Status, StatusChange, MAX_LIST};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiJson, ApiQuery, Principal, ProblemDoc, RequestContext};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// (customer routes, admin routes). The server puts authentication in front
/// of both and the admin role check in front of the second.
pub fn routes<S: Clone + Send + Sync + 'static>(s: Arc<Shipping>) -> (Router<S>, Router<S>) {
    let customer = Router::new()
        .route("/shipments/{id}", get(own_shipment))
        .with_state(s.clone());
    let admin = Router::new()
        .route("/admin/shipments", get(list))
        .route("/admin/shipments/{id}", get(detail))
        .route("/admin/shipments/{id}/status", post(set_status))
        .route("/admin/shipping/routes", post(plan_routes))
        .with_state(s);
    (customer, admin)
}

#[utoipa::path(get, path = "/api/v1/shipments/{id}", tag = "shipping", security(("bearer" = [])),
    params(("id" = String, Path, description = "Shipment id")),
    responses((status = 200, description = "Your shipment: status and tracking number", body = Shipment),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such shipment of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn own_shipment(
    State(s): State<Arc<Shipping>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Shipment>, ApiError> {
    let shipment = s.get(&id).await?;
    // Someone else's shipment reads as missing: ids are not to be probed.
    if shipment.user_id != who.user_id {
        return Err(Problem::new(ErrorCode::NotFound)
            .with_detail("no such shipment")
            .into());
    }
    Ok(Json(shipment))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only shipments in this status.
    pub status: Option<Status>,
    /// 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ShipmentList {
    pub items: Vec<Shipment>,
}

#[utoipa::path(get, path = "/api/v1/admin/shipments", tag = "shipping", security(("bearer" = [])),
    params(ListParams),
    responses((status = 200, description = "Shipments, newest first", body = ShipmentList),
        (status = 400, description = "Bad status or limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list(
    State(s): State<Arc<Shipping>>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<ShipmentList>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(Problem::new(ErrorCode::MalformedRequest)
            .with_field("limit", format!("1..={MAX_LIST}"))
            .into());
    }
    Ok(Json(ShipmentList {
        items: s.list(q.status, limit).await?,
    }))
}

/// A shipment with its status history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ShipmentDetail {
    #[serde(flatten)]
    pub shipment: Shipment,
    /// Oldest first.
    pub history: Vec<StatusChange>,
}

#[utoipa::path(get, path = "/api/v1/admin/shipments/{id}", tag = "shipping", security(("bearer" = [])),
    params(("id" = String, Path, description = "Shipment id")),
    responses((status = 200, description = "The shipment and its status history", body = ShipmentDetail),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such shipment", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn detail(
    State(s): State<Arc<Shipping>>,
    Path(id): Path<String>,
) -> Result<Json<ShipmentDetail>, ApiError> {
    let shipment = s.get(&id).await?;
    let history = s.history(&id).await?;
    Ok(Json(ShipmentDetail { shipment, history }))
}

/// `POST /admin/shipments/{id}/status`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusUpdate {
    /// The next status (PICKED, IN_TRANSIT or DELIVERED); the current one
    /// again is a no-op.
    pub status: Status,
    /// Kept in the history, at most 500 characters.
    #[serde(default)]
    pub note: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/admin/shipments/{id}/status", tag = "shipping", security(("bearer" = [])),
    params(("id" = String, Path, description = "Shipment id")), request_body = StatusUpdate,
    responses((status = 200, description = "Moved one step forward (`shipment.picked`, `shipment.in_transit` or `shipment.delivered` emitted), or already in that status", body = Shipment),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such shipment", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Not the next step (`invalid_state`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Unknown status or note too long", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn set_status(
    State(s): State<Arc<Shipping>>,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<StatusUpdate>,
) -> Result<Json<Shipment>, ApiError> {
    Ok(Json(s.advance(&ctx, &id, req.status, req.note).await?))
}

#[utoipa::path(post, path = "/api/v1/admin/shipping/routes", tag = "shipping", security(("bearer" = [])),
    request_body = RoutePlanRequest,
    responses((status = 200, description = "Routes over the day's PENDING and PICKED shipments: split by sweep around the depot, ordered by nearest neighbour, improved by 2-opt", body = RoutePlan),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Bad date, depot, vehicles or capacity (fields named)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn plan_routes(
    State(s): State<Arc<Shipping>>,
    ApiJson(req): ApiJson<RoutePlanRequest>,
) -> Result<Json<RoutePlan>, ApiError> {
    Ok(Json(s.plan_routes(req).await?))
}

/// Shipping's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(own_shipment, list, detail, set_status, plan_routes))]
pub struct ShippingApi;
