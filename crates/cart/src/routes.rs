//! HTTP for carts and addresses. The server mounts these behind
//! authentication: every handler acts for the calling user only.

use crate::{AddItem, Address, CartView, Carts, NewAddress, SetQuantity};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Extension, Json, Router};
use flowline_http::{ApiError, ApiJson, Principal, ProblemDoc, RequestContext};
use serde::Serialize;
use std::sync::Arc;

pub fn routes<S: Clone + Send + Sync + 'static>(carts: Arc<Carts>) -> Router<S> {
    Router::new()
        .route("/carts", post(create_cart))
        .route("/carts/{id}", get(read_cart))
        .route("/carts/{id}/items", post(add_item))
        .route(
            "/carts/{id}/items/{product_id}",
            patch(update_item).delete(remove_item),
        )
        .route(
            "/users/me/addresses",
            post(create_address).get(list_addresses),
        )
        .route("/users/me/addresses/{id}", delete(delete_address))
        .with_state(carts)
}

/// The user's addresses.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AddressList {
    pub items: Vec<Address>,
}

#[utoipa::path(post, path = "/api/v1/carts", tag = "cart", security(("bearer" = [])),
    responses((status = 201, description = "An empty cart; `Location` set, `cart.created` emitted", body = CartView),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn create_cart(
    State(c): State<Arc<Carts>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
) -> Result<Response, ApiError> {
    let cart = c.create(&ctx, &who.user_id).await?;
    let location = HeaderValue::from_str(&format!("/api/v1/carts/{}", cart.id)).expect("ASCII id");
    let mut res = (StatusCode::CREATED, Json(cart)).into_response();
    res.headers_mut().insert(header::LOCATION, location);
    Ok(res)
}

#[utoipa::path(get, path = "/api/v1/carts/{id}", tag = "cart", security(("bearer" = [])),
    params(("id" = String, Path, description = "Cart id")),
    responses((status = 200, description = "The cart priced now; lines the catalog no longer sells are `available: false` and left out of the subtotal", body = CartView),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such cart of yours", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Total too large", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn read_cart(
    State(c): State<Arc<Carts>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(c.view(&who.user_id, &id).await?))
}

#[utoipa::path(post, path = "/api/v1/carts/{id}/items", tag = "cart", security(("bearer" = [])), request_body = AddItem,
    params(("id" = String, Path, description = "Cart id")),
    responses((status = 200, description = "The cart; the quantity adds to the line's, `cart.item_added` emitted", body = CartView),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such cart of yours", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The cart is checked out (`invalid_state`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid item or unknown product (fields named), or `currency_mismatch`", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn add_item(
    State(c): State<Arc<Carts>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(item): ApiJson<AddItem>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(c.add_item(&ctx, &who.user_id, &id, item).await?))
}

#[utoipa::path(patch, path = "/api/v1/carts/{id}/items/{product_id}", tag = "cart", security(("bearer" = [])), request_body = SetQuantity,
    params(("id" = String, Path, description = "Cart id"), ("product_id" = String, Path, description = "Product id")),
    responses((status = 200, description = "The cart; `cart.item_updated` emitted", body = CartView),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such cart of yours, or no such item in it", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The cart is checked out (`invalid_state`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Quantity not 1 to 99", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn update_item(
    State(c): State<Arc<Carts>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path((id, product_id)): Path<(String, String)>,
    ApiJson(set): ApiJson<SetQuantity>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(
        c.set_quantity(&ctx, &who.user_id, &id, &product_id, set.quantity)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/carts/{id}/items/{product_id}", tag = "cart", security(("bearer" = [])),
    params(("id" = String, Path, description = "Cart id"), ("product_id" = String, Path, description = "Product id")),
    responses((status = 200, description = "The cart; the last item takes the currency with it, `cart.item_removed` emitted", body = CartView),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such cart of yours, or no such item in it", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The cart is checked out (`invalid_state`)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn remove_item(
    State(c): State<Arc<Carts>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path((id, product_id)): Path<(String, String)>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(
        c.remove_item(&ctx, &who.user_id, &id, &product_id).await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/users/me/addresses", tag = "cart", security(("bearer" = [])), request_body = NewAddress,
    responses((status = 201, description = "Kept", body = Address),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid address (fields named), or the limit of 20 reached", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn create_address(
    State(c): State<Arc<Carts>>,
    who: Principal,
    ApiJson(new): ApiJson<NewAddress>,
) -> Result<(StatusCode, Json<Address>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(c.add_address(&who.user_id, new).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/users/me/addresses", tag = "cart", security(("bearer" = [])),
    responses((status = 200, description = "Your addresses, oldest first", body = AddressList),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list_addresses(
    State(c): State<Arc<Carts>>,
    who: Principal,
) -> Result<Json<AddressList>, ApiError> {
    Ok(Json(AddressList {
        items: c.addresses(&who.user_id).await?,
    }))
}

#[utoipa::path(delete, path = "/api/v1/users/me/addresses/{id}", tag = "cart", security(("bearer" = [])),
    params(("id" = String, Path, description = "Address id")),
    responses((status = 204, description = "Deleted"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such address of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn delete_address(
    State(c): State<Arc<Carts>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.delete_address(&who.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The cart context's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    create_cart,
    read_cart,
    add_item,
    update_item,
    remove_item,
    create_address,
    list_addresses,
    delete_address
))]
pub struct CartApi;
