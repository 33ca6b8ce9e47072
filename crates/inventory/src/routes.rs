//! HTTP for inventory: public stock reads; stock changes and reservations
//! for admins and services (the order saga calls the same methods in-process).

use crate::{Inventory, Movement, Reservation, ReserveRequest, SetStock, StockLevel};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiJson, ApiQuery, ProblemDoc, RequestContext};
use serde::Deserialize;
use std::sync::Arc;

/// (public reads, admin writes).
pub fn routes<S: Clone + Send + Sync + 'static>(inv: Arc<Inventory>) -> (Router<S>, Router<S>) {
    let public = Router::new()
        .route("/inventory/{product_id}", get(level))
        .with_state(inv.clone());
    let admin = Router::new()
        .route("/inventory/{product_id}", axum::routing::put(set_stock))
        .route("/inventory/{product_id}/movements", get(movements))
        .route("/inventory/reservations", post(reserve))
        .route("/inventory/reservations/{order_id}", get(reservation))
        .route("/inventory/reservations/{order_id}/confirm", post(confirm))
        .route("/inventory/reservations/{order_id}/release", post(release))
        .with_state(inv);
    (public, admin)
}

#[utoipa::path(get, path = "/api/v1/inventory/{product_id}", tag = "inventory",
    params(("product_id" = String, Path, description = "Product id")),
    responses((status = 200, description = "on_hand, reserved and available, in total and per warehouse (a product never stocked reads as zero); served from the hot counter cache", body = StockLevel),
        (status = 500, description = "The store could not be read", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn level(
    State(inv): State<Arc<Inventory>>,
    Path(id): Path<String>,
) -> Result<Json<StockLevel>, ApiError> {
    Ok(Json(inv.level(&id).await?))
}

#[utoipa::path(put, path = "/api/v1/inventory/{product_id}", tag = "inventory", security(("bearer" = [])),
    params(("product_id" = String, Path, description = "Product id")), request_body = SetStock,
    responses((status = 200, description = "Stock set; a movement and `inventory.stock_adjusted` recorded", body = StockLevel),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Below the reserved units", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid count", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn set_stock(
    State(inv): State<Arc<Inventory>>,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SetStock>,
) -> Result<Json<StockLevel>, ApiError> {
    Ok(Json(inv.set_stock(&ctx, &id, req).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MovementParams {
    /// 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/inventory/{product_id}/movements", tag = "inventory", security(("bearer" = [])),
    params(("product_id" = String, Path, description = "Product id"), MovementParams),
    responses((status = 200, description = "Stock movements, newest first", body = Vec<Movement>),
        (status = 400, description = "Bad limit", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn movements(
    State(inv): State<Arc<Inventory>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<MovementParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::new(ErrorCode::MalformedRequest)
            .with_field("limit", "1..=1000")
            .into());
    }
    let items = inv.movements(&id, limit).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

#[utoipa::path(post, path = "/api/v1/inventory/reservations", tag = "inventory", security(("bearer" = [])), request_body = ReserveRequest,
    responses((status = 201, description = "Every item held; `inventory.reserved` emitted", body = Reservation),
        (status = 200, description = "The order already held this reservation (retried command)", body = Reservation),
        (status = 409, description = "Not enough stock for some item (named; nothing held), or the order holds other items", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid request (fields named)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn reserve(
    State(inv): State<Arc<Inventory>>,
    Extension(ctx): Extension<RequestContext>,
    ApiJson(req): ApiJson<ReserveRequest>,
) -> Result<(StatusCode, Json<Reservation>), ApiError> {
    let (r, created) = inv.reserve(&ctx, req).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(r)))
}

#[utoipa::path(get, path = "/api/v1/inventory/reservations/{order_id}", tag = "inventory", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "Order id")),
    responses((status = 200, description = "The reservation", body = Reservation),
        (status = 404, description = "No reservation for this order", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn reservation(
    State(inv): State<Arc<Inventory>>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    Ok(Json(inv.reservation(&order_id).await?))
}

#[utoipa::path(post, path = "/api/v1/inventory/reservations/{order_id}/confirm", tag = "inventory", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "Order id")),
    responses((status = 200, description = "Confirmed (or already was): the units left on_hand", body = Reservation),
        (status = 404, description = "No reservation for this order", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Released or expired", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn confirm(
    State(inv): State<Arc<Inventory>>,
    Extension(ctx): Extension<RequestContext>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    Ok(Json(inv.confirm(&ctx, &order_id).await?))
}

#[utoipa::path(post, path = "/api/v1/inventory/reservations/{order_id}/release", tag = "inventory", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "Order id")),
    responses((status = 200, description = "Released (or already released/expired): the units are available again", body = Reservation),
        (status = 404, description = "No reservation for this order", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Already confirmed", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn release(
    State(inv): State<Arc<Inventory>>,
    Extension(ctx): Extension<RequestContext>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    Ok(Json(inv.release(&ctx, &order_id).await?))
}

/// The inventory's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(level, set_stock, movements, reserve, reservation, confirm, release))]
pub struct InventoryApi;
