//! HTTP for the catalog: public reads, admin writes with `If-Match`.

use crate::{Catalog, ListQuery, NewProduct, Product, ProductPatch};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiJson, ApiQuery, ProblemDoc, RequestContext};
use serde::Deserialize;
use std::sync::Arc;

/// (public reads, admin writes): the server puts the writes behind the
/// gateway's authentication and admin steps.
pub fn routes<S: Clone + Send + Sync + 'static>(catalog: Arc<Catalog>) -> (Router<S>, Router<S>) {
    let public = Router::new()
        .route("/products", get(list))
        .route("/products/{id}", get(read))
        .with_state(catalog.clone());
    let admin = Router::new()
        .route("/products", axum::routing::post(create))
        .route(
            "/products/{id}",
            axum::routing::patch(update).delete(remove),
        )
        .with_state(catalog);
    (public, admin)
}

fn etag(p: &Product) -> HeaderValue {
    HeaderValue::from_str(&format!("\"v{}\"", p.version)).expect("ASCII")
}

fn with_etag(status: StatusCode, p: Product) -> Response {
    let tag = etag(&p);
    let mut res = (status, Json(p)).into_response();
    res.headers_mut().insert(header::ETAG, tag);
    res
}

/// `If-Match: "v3"` → Some(3); `*` → None (any version); absent → 428.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Err(Problem::new(ErrorCode::PreconditionRequired).into());
    };
    let v = v.to_str().unwrap_or("").trim();
    if v == "*" {
        return Ok(None);
    }
    let n = v
        .trim_start_matches("W/")
        .trim_matches('"')
        .trim_start_matches('v');
    n.parse::<i64>().map(Some).map_err(|_| {
        Problem::new(ErrorCode::MalformedRequest)
            .with_detail("If-Match must be an ETag from this API, e.g. \"v3\"")
            .with_field("If-Match", "an ETag such as \"v3\"")
            .into()
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub category: Option<String>,
    pub brand: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/products", tag = "catalog", params(ListParams),
    responses((status = 200, description = "A page of products and `next_cursor` (absent on the last page)", body = serde_json::Value),
        (status = 400, description = "Bad parameter (named)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list(
    State(c): State<Arc<Catalog>>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(Problem::new(ErrorCode::MalformedRequest)
            .with_detail("limit must be 1 to 100")
            .with_field("limit", "1..=100")
            .into());
    }
    let (items, next) = c
        .list(&ListQuery {
            category: q.category,
            brand: q.brand,
            cursor: q.cursor,
            limit,
        })
        .await?;
    Ok(Json(
        serde_json::json!({ "items": items, "next_cursor": next }),
    ))
}

#[utoipa::path(get, path = "/api/v1/products/{id}", tag = "catalog", params(("id" = String, Path, description = "Product id")),
    responses((status = 200, description = "The product; `ETag` carries its version", body = Product),
        (status = 404, description = "No such product", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn read(
    State(c): State<Arc<Catalog>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(with_etag(StatusCode::OK, c.get(&id).await?))
}

#[utoipa::path(post, path = "/api/v1/products", tag = "catalog", security(("bearer" = [])), request_body = NewProduct,
    responses((status = 201, description = "Created; `ETag` and `Location` set, `product.created` emitted", body = Product),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "SKU taken", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid product (fields named)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn create(
    State(c): State<Arc<Catalog>>,
    Extension(ctx): Extension<RequestContext>,
    ApiJson(new): ApiJson<NewProduct>,
) -> Result<Response, ApiError> {
    let p = c.create(&ctx, new).await?;
    let location = HeaderValue::from_str(&format!("/api/v1/products/{}", p.id)).expect("ASCII id");
    let mut res = with_etag(StatusCode::CREATED, p);
    res.headers_mut().insert(header::LOCATION, location);
    Ok(res)
}

#[utoipa::path(patch, path = "/api/v1/products/{id}", tag = "catalog", security(("bearer" = [])), request_body = ProductPatch,
    params(("id" = String, Path, description = "Product id"), ("If-Match" = String, Header, description = "The ETag you read, e.g. \"v3\"")),
    responses((status = 200, description = "Updated; `product.updated` lists the changed fields", body = Product),
        (status = 404, description = "No such product", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 412, description = "Stale version", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid change", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn update(
    State(c): State<Arc<Catalog>>,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(patch): ApiJson<ProductPatch>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    Ok(with_etag(
        StatusCode::OK,
        c.update(&ctx, &id, expected, patch).await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/products/{id}", tag = "catalog", security(("bearer" = [])),
    params(("id" = String, Path, description = "Product id"), ("If-Match" = String, Header, description = "The ETag you read")),
    responses((status = 204, description = "Deleted; `product.deleted` emitted"),
        (status = 404, description = "No such product", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 412, description = "Stale version", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn remove(
    State(c): State<Arc<Catalog>>,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let expected = if_match(&headers)?;
    c.delete(&ctx, &id, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The catalog's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, read, create, update, remove))]
pub struct CatalogApi;
