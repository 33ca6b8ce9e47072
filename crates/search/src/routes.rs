//! `GET /api/v1/search`: parameters checked and named when wrong, results
//! cached until the index changes.

use crate::{SearchIndex, SearchQuery, SearchResult, Sort};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiQuery, ProblemDoc};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone)]
pub struct SearchState {
    pub index: Arc<SearchIndex>,
    /// Result pages by normalised query; every index commit drops them all
    /// (a change can move a product into any page, not only the ones it is on).
    pub cache: flowline_cache::Cache<Arc<SearchResult>>,
}

pub fn routes<S: Clone + Send + Sync + 'static>(state: SearchState) -> Router<S> {
    Router::new()
        .route("/search", get(search))
        .with_state(state)
}

/// Pages deeper than this are refused (use filters instead).
const MAX_RESULT_WINDOW: usize = 10_000;

fn bad(param: &str, msg: &str) -> ApiError {
    Problem::new(ErrorCode::MalformedRequest)
        .with_detail(format!("query parameter `{param}`: {msg}"))
        .with_field(param, msg)
        .into()
}

/// Parses the query string into a [`SearchQuery`], naming any bad parameter.
pub fn parse(params: &BTreeMap<String, String>) -> Result<SearchQuery, ApiError> {
    let mut sq = SearchQuery {
        page: 1,
        per_page: 20,
        ..Default::default()
    };
    let int = |k: &str, v: &str| {
        v.parse::<i64>()
            .map_err(|_| bad(k, "must be a whole number (minor units)"))
    };
    for (k, v) in params {
        match k.as_str() {
            "q" => {
                if v.chars().count() > 200 {
                    return Err(bad(k, "at most 200 characters"));
                }
                sq.q = v.clone();
            }
            "category" => sq.category = Some(v.clone()).filter(|s| !s.is_empty()),
            "brand" => sq.brand = Some(v.clone()).filter(|s| !s.is_empty()),
            "price_min" | "price_max" => {
                let n = int(k, v)?;
                if n < 0 {
                    return Err(bad(k, "must not be negative"));
                }
                if k == "price_min" {
                    sq.price_min = Some(n);
                } else {
                    sq.price_max = Some(n);
                }
            }
            "in_stock" => {
                sq.in_stock = Some(match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad(k, "true or false")),
                })
            }
            "sort" => {
                sq.sort = Some(match v.as_str() {
                    "relevance" => Sort::Relevance,
                    "popularity" => Sort::Popularity,
                    "price_asc" => Sort::PriceAsc,
                    "price_desc" => Sort::PriceDesc,
                    "newest" => Sort::Newest,
                    _ => {
                        return Err(bad(
                            k,
                            "one of relevance, popularity, price_asc, price_desc, newest",
                        ))
                    }
                })
            }
            "page" => {
                sq.page = v
                    .parse()
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or_else(|| bad(k, "a whole number from 1"))?
            }
            "per_page" => {
                sq.per_page = v
                    .parse()
                    .ok()
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| bad(k, "1 to 100"))?
            }
            _ => match k.strip_prefix("attr.") {
                Some(name) if !name.is_empty() && !v.is_empty() => {
                    sq.attrs.push((name.to_owned(), v.clone()))
                }
                _ => return Err(bad(k, "unknown parameter")),
            },
        }
    }
    if let (Some(lo), Some(hi)) = (sq.price_min, sq.price_max) {
        if lo > hi {
            return Err(bad("price_min", "must not exceed price_max"));
        }
    }
    if sq.page * sq.per_page > MAX_RESULT_WINDOW {
        return Err(bad(
            "page",
            "beyond the first 10000 results; narrow the query",
        ));
    }
    Ok(sq)
}

#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct SearchParams {
    /// Words to find (title counts twice the description; one typo forgiven in words of 5+ letters).
    q: Option<String>,
    category: Option<String>,
    brand: Option<String>,
    /// Minor units.
    price_min: Option<i64>,
    price_max: Option<i64>,
    in_stock: Option<bool>,
    /// relevance (default), popularity, price_asc, price_desc, newest.
    sort: Option<String>,
    page: Option<usize>,
    /// 1 to 100 (default 20).
    per_page: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/search", tag = "search", params(SearchParams),
    responses((status = 200, description = "Hits with highlighted titles, total, and facet counts (category, brand, attributes). Attribute filters: `attr.<name>=<value>`.", body = serde_json::Value),
        (status = 400, description = "A malformed or unknown parameter (named)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn search(
    State(s): State<SearchState>,
    ApiQuery(params): ApiQuery<BTreeMap<String, String>>,
) -> Result<Json<Arc<SearchResult>>, ApiError> {
    let sq = parse(&params)?;
    let key = format!(
        "search:{}",
        serde_json::to_string(&params).unwrap_or_default()
    );
    let index = s.index.clone();
    let result = s
        .cache
        .get_or_load(&key, async move {
            tokio::task::spawn_blocking(move || index.search(&sq).map(Arc::new))
                .await
                .map_err(|e| crate::SearchError::Index(e.to_string()))?
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "search failed");
            ApiError::from(Problem::new(ErrorCode::Internal))
        })?;
    Ok(Json(result))
}

/// The search context's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(search))]
pub struct SearchApi;
