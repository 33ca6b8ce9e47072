//! HTTP for orders: place, read, history, live status (SSE), cancel; and the
//! admin views. The server puts these behind authentication.

use crate::{
    parse_cursor, OrderEvent, OrderState, OrderStatus, OrderSummary, OrderView, Orders, PlaceOrder,
    Placed,
};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::{ApiError, ApiJson, ApiQuery, Principal, ProblemDoc, RequestContext};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Set on a response that answers a retried request.
pub const REPLAYED: &str = "idempotent-replayed";

/// (customer routes, admin routes).
pub fn routes<S: Clone + Send + Sync + 'static>(orders: Arc<Orders>) -> (Router<S>, Router<S>) {
    let user = Router::new()
        .route("/orders", post(place).get(mine))
        .route("/orders/{id}", get(read))
        .route("/orders/{id}/history", get(history))
        .route("/orders/{id}/events", get(follow))
        .route("/orders/{id}/cancel", post(cancel))
        .with_state(orders.clone());
    let admin = Router::new()
        .route("/admin/orders", get(all))
        .route("/admin/orders/rebuild", post(rebuild))
        .with_state(orders);
    (user, admin)
}

#[utoipa::path(post, path = "/api/v1/orders", tag = "orders", security(("bearer" = [])), request_body = PlaceOrder,
    params(("Idempotency-Key" = String, Header, description = "Unique per order attempt (e.g. a UUID): a retry with it returns the same order and places nothing")),
    responses((status = 202, description = "Accepted: the order is being placed (reserve stock → charge → confirm → ship); follow `Location` or the `events` stream", body = Placed,
            headers(("Location" = String, description = "The order"), ("Idempotent-Replayed" = String, description = "`true` when a retry returned the order placed before"))),
        (status = 400, description = "Idempotency-Key missing or malformed, or malformed JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The cart was checked out already, or has unavailable items", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid order (fields named: unknown cart or address, payment method without its token/VPA); or the key was used with another body (`idempotency_key_reused`)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn place(
    State(orders): State<Arc<Orders>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<PlaceOrder>,
) -> Result<Response, ApiError> {
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or("\u{1}"));
    let (placed, replayed) = orders.place(&ctx, &who.user_id, key, req).await?;
    let mut res = (StatusCode::ACCEPTED, Json(&placed)).into_response();
    if let Ok(v) = HeaderValue::from_str(&placed.location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    if replayed {
        res.headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(res)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// PENDING, PAID, CONFIRMED, SHIPPED, DELIVERED or CANCELLED.
    pub status: Option<String>,
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderPage {
    pub items: Vec<OrderSummary>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next: Option<String>,
}

async fn page(
    orders: &Orders,
    user: Option<&str>,
    q: ListParams,
) -> Result<Json<OrderPage>, ApiError> {
    let mut bad = Problem::new(ErrorCode::MalformedRequest);
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        bad = bad.with_field("limit", "1..=100");
    }
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => {
            let st = OrderStatus::parse(s);
            if st.is_none() {
                bad = bad.with_field(
                    "status",
                    "PENDING, PAID, CONFIRMED, SHIPPED, DELIVERED or CANCELLED",
                );
            }
            st
        }
    };
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => {
            let parsed = parse_cursor(c);
            if parsed.is_none() {
                bad = bad.with_field("cursor", "a `next` value from a previous page");
            }
            parsed
        }
    };
    if !bad.errors.is_empty() {
        return Err(bad.into());
    }
    let (items, next) = orders.list(user, status, limit, cursor).await?;
    Ok(Json(OrderPage { items, next }))
}

#[utoipa::path(get, path = "/api/v1/orders", tag = "orders", security(("bearer" = [])), params(ListParams),
    responses((status = 200, description = "Your orders, newest first (the `orders` projection, rebuilt from events by replay)", body = OrderPage),
        (status = 400, description = "Bad status, limit or cursor", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn mine(
    State(orders): State<Arc<Orders>>,
    who: Principal,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<OrderPage>, ApiError> {
    page(&orders, Some(&who.user_id), q).await
}

#[utoipa::path(get, path = "/api/v1/admin/orders", tag = "admin", security(("bearer" = [])), params(ListParams),
    responses((status = 200, description = "Everyone's orders, newest first", body = OrderPage),
        (status = 400, description = "Bad status, limit or cursor", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn all(
    State(orders): State<Arc<Orders>>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<OrderPage>, ApiError> {
    page(&orders, None, q).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// RFC 3339: the order as it was then (folded from its events).
    pub as_of: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders", security(("bearer" = [])),
    params(("id" = String, Path, description = "Order id"), ReadParams),
    responses((status = 200, description = "The order, with user and item names from read models", body = OrderView),
        (status = 400, description = "`as_of` is not RFC 3339", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such order of yours (or it did not exist yet at `as_of`)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn read(
    State(orders): State<Arc<Orders>>,
    who: Principal,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ReadParams>,
) -> Result<Json<OrderView>, ApiError> {
    let as_of = match q.as_of.as_deref() {
        None => None,
        Some(s) => Some(Timestamp::parse_rfc3339(s).map_err(|_| {
            ApiError::from(
                Problem::new(ErrorCode::MalformedRequest)
                    .with_field("as_of", "an RFC 3339 time, e.g. 2026-11-22T10:00:00Z"),
            )
        })?),
    };
    let admin = who.has_role("admin");
    Ok(Json(orders.get(&who.user_id, admin, &id, as_of).await?))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct History {
    pub order_id: String,
    /// Oldest first; `version` counts from 1.
    pub events: Vec<OrderEvent>,
}

#[utoipa::path(get, path = "/api/v1/orders/{id}/history", tag = "orders", security(("bearer" = [])),
    params(("id" = String, Path, description = "Order id")),
    responses((status = 200, description = "Every event of the order: CREATED, STOCK_RESERVED, PAYMENT_AUTHORIZED, PAID, CONFIRMED, SHIPPED, DELIVERED, CANCEL_REQUESTED, REFUNDED, CANCELLED…", body = History),
        (status = 404, description = "No such order of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn history(
    State(orders): State<Arc<Orders>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<History>, ApiError> {
    let events = orders
        .history(&who.user_id, who.has_role("admin"), &id)
        .await?;
    Ok(Json(History {
        order_id: id,
        events,
    }))
}

#[utoipa::path(get, path = "/api/v1/orders/{id}/events", tag = "orders", security(("bearer" = [])),
    params(("id" = String, Path, description = "Order id"),
        ("Last-Event-ID" = Option<String>, Header, description = "The last version seen: the stream resumes after it")),
    responses((status = 200, description = "Server-Sent Events: one `order` event per order event (id = version, data = {type, version, status, data, occurred_at}), comments as heartbeats every 15 s", content_type = "text/event-stream"),
        (status = 404, description = "No such order of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn follow(
    State(orders): State<Arc<Orders>>,
    who: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Subscribed before the read, so no append between the two is missed.
    let rx = orders.subscribe();
    let past = orders.events_after(&id, 0).await?;
    let owner = OrderState::replay(&past).map(|s| s.user_id);
    if owner.as_deref() != Some(who.user_id.as_str()) && !(owner.is_some() && who.has_role("admin"))
    {
        return Err(Problem::new(ErrorCode::NotFound)
            .with_detail("no such order")
            .into());
    }
    let from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    // The order as of `Last-Event-ID`, then folded one event at a time, so
    // each event carries the status it left the order in.
    let state = OrderState::replay(past.iter().take_while(|e| e.version <= from));
    let follow = Follow {
        orders,
        id,
        version: from,
        state,
        rx,
        pending: Vec::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop() {
                return Some((Ok::<Event, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            match st.orders.events_after(&st.id, st.version).await {
                Ok(events) if !events.is_empty() => {
                    let mut out = Vec::with_capacity(events.len());
                    for mut e in events {
                        match st.state.as_mut() {
                            Some(s) => s.apply(&e),
                            None => st.state = OrderState::replay([&e]),
                        }
                        st.version = e.version;
                        let status = st.state.as_ref().map(|s| s.status);
                        crate::scrub(&mut e);
                        let body = serde_json::json!({
                            "type": e.kind, "version": e.version, "status": status,
                            "data": e.data, "occurred_at": e.occurred_at,
                        });
                        let mut ev = Event::default()
                            .event("order")
                            .id(e.version.to_string())
                            .data(body.to_string());
                        if status.is_some_and(OrderStatus::is_final) {
                            // Nothing follows a final status: end the stream and
                            // tell EventSource clients not to reconnect soon.
                            ev = ev.retry(Duration::from_secs(24 * 3600));
                            st.done = true;
                        }
                        out.push(ev);
                    }
                    out.reverse();
                    st.pending = out;
                    continue;
                }
                Ok(_) => {
                    if st.state.as_ref().is_some_and(|s| s.status.is_final()) {
                        return None;
                    }
                }
                Err(e) => tracing::warn!(code = e.0.code, "order stream read failed"),
            }
            // Woken by this process's appends; the poll covers other instances.
            let _ = tokio::time::timeout(Duration::from_millis(500), st.rx.changed()).await;
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

struct Follow {
    orders: Arc<Orders>,
    id: String,
    version: i64,
    state: Option<OrderState>,
    rx: tokio::sync::watch::Receiver<u64>,
    pending: Vec<Event>,
    done: bool,
}

#[utoipa::path(post, path = "/api/v1/orders/{id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("id" = String, Path, description = "Order id")),
    responses((status = 202, description = "Cancellation under way: stock is returned, the payment refunded, the shipment cancelled; the order becomes CANCELLED (or records why it could not be)", body = OrderView),
        (status = 404, description = "No such order of yours", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Already shipped, delivered or cancelled", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn cancel(
    State(orders): State<Arc<Orders>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(orders.cancel(&ctx, &who.user_id, &id).await?),
    ))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rebuilt {
    /// Orders in the projection after the replay.
    pub orders: u64,
    pub duration_ms: f64,
}

#[utoipa::path(post, path = "/api/v1/admin/orders/rebuild", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "The `orders` projection dropped and rebuilt by replaying `order_events`", body = Rebuilt),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn rebuild(State(orders): State<Arc<Orders>>) -> Result<Json<Rebuilt>, ApiError> {
    let t = std::time::Instant::now();
    let n = orders.rebuild_projection().await?;
    Ok(Json(Rebuilt {
        orders: n,
        duration_ms: t.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Orders' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(place, mine, all, read, history, follow, cancel, rebuild))]
pub struct OrdersApi;
