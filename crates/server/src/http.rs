//! The HTTP edge: correlation ids, metrics, timeouts, body limits, and one
//! rule for errors: every failure leaves as `application/problem+json`.

use crate::app::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::ratelimit::{Decision, Quota};
pub use flowline_http::{
    problem_response, ApiError, ApiJson, RequestContext, PROBLEM_JSON, REQUEST_ID, TRACE_ID,
};
use std::sync::Arc;
use std::time::Instant;

/// `api` is mounted under `/api/v1`, `root` at the root (e.g. `/.well-known/…`).
pub fn router(
    state: Arc<AppState>,
    api: Router<Arc<AppState>>,
    root: Router<Arc<AppState>>,
) -> Router {
    let s = &state.settings.server;
    // The interactive page's assets are vendored into the binary at build time.
    let docs: Router<Arc<AppState>> = utoipa_swagger_ui::SwaggerUi::new("/api/v1/docs")
        .url("/api/v1/openapi.json", openapi())
        .into();
    root.merge(docs)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(s.body_limit_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit))
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = serde_json::Value)))]
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Every store and the event log answer", body = serde_json::Value),
        (status = 503, description = "A store is unreachable", body = flowline_http::ProblemDoc, content_type = "application/problem+json")))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.ready().await {
        Ok(()) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(what) => {
            tracing::warn!(%what, "not ready");
            problem_response(
                Problem::new(ErrorCode::ServiceUnavailable)
                    .with_detail(format!("{what} is unreachable")),
            )
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus / OpenMetrics text", content_type = "application/openmetrics-text")))]
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Err(e) = state.log.refresh_lag().await {
        tracing::warn!(error = %e, "cannot refresh consumer lag");
    }
    let body = state.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn fallback() -> ApiError {
    Problem::new(ErrorCode::RouteNotFound).into()
}

/// The OpenAPI 3.1 document of every route, assembled from each context's part.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = ServerApi::openapi();
    doc.merge(flowline_identity::routes::IdentityApi::openapi());
    doc.merge(crate::probe::ProbeApi::openapi());
    doc.merge(flowline_catalog::routes::CatalogApi::openapi());
    doc.merge(flowline_search::routes::SearchApi::openapi());
    doc.merge(flowline_inventory::routes::InventoryApi::openapi());
    doc.merge(flowline_payments::routes::PaymentsApi::openapi());
    doc.merge(flowline_cart::routes::CartApi::openapi());
    doc.merge(flowline_ledger::routes::LedgerApi::openapi());
    doc.merge(flowline_orders::routes::OrdersApi::openapi());
    doc.merge(flowline_shipping::routes::ShippingApi::openapi());
    doc.merge(crate::sagas::SagasApi::openapi());
    doc.merge(crate::traces::TracesApi::openapi());
    doc.merge(flowline_audit::routes::AuditApi::openapi());
    doc.merge(flowline_analytics::routes::AnalyticsApi::openapi());
    doc.merge(crate::console::ConsoleApi::openapi());
    doc.merge(flowline_notifications::routes::NotificationsApi::openapi());
    doc.merge(flowline_messaging::routes::MessagingApi::openapi());
    doc
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "flowline", description = "An event-driven backend platform. Every error is RFC 9457 problem+json with a stable `code`."),
    paths(healthz, readyz, metrics),
    modifiers(&BearerAuth)
)]
struct ServerApi;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Accepts a caller's id if it is sane (printable ASCII, ≤ 128 bytes).
fn header_id(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| v.to_owned())
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn traceparent_trace_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1] != "0".repeat(32)
        && hex(parts[2], 16)
        && hex(parts[3], 2);
    ok.then(|| parts[1].to_ascii_lowercase())
}

/// Health, metrics, the console and the admin views of events, groups,
/// sagas, traces, audit and analytics.
fn is_observability_read(route: &str) -> bool {
    matches!(route, "/healthz" | "/readyz" | "/metrics")
        || route.starts_with("/console")
        || [
            "/api/v1/admin/events",
            "/api/v1/admin/consumer-groups",
            "/api/v1/admin/sagas",
            "/api/v1/admin/traces",
            "/api/v1/admin/flows",
            "/api/v1/admin/audit",
            "/api/v1/admin/analytics",
        ]
        .iter()
        .any(|p| route.starts_with(p))
}

/// Outermost middleware: correlation, logging span, timeout, metrics, and
/// conversion of any non-problem error body into problem+json.
async fn edge(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let correlation_id = header_id(req.headers(), REQUEST_ID)
        .or_else(|| traceparent_trace_id(req.headers()))
        .unwrap_or_else(flowline_core::id::new_correlation_id);
    let request_id = flowline_core::id::new_id().to_string();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| route_of(req.uri().path()));
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) =
        flowline_http::client_ip(req.headers(), peer, &state.settings.server.trusted_proxies)
    {
        req.extensions_mut().insert(flowline_http::ClientIp(ip));
    }
    req.extensions_mut().insert(RequestContext {
        correlation_id: correlation_id.clone(),
        request_id: request_id.clone(),
    });
    // The trace continues the caller's `traceparent`, or takes the correlation
    // id as its trace id when that is one (so either finds the other).
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| flowline_telemetry::TraceContext::parse(v).is_some())
        .map(str::to_owned);
    let user_agent: String = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    // Reads of the observability surface itself (the console polls them
    // every second) would bury the flows they show: not recorded.
    let untraced = method == "GET" && is_observability_read(&route);
    let span = tracing::info_span!("request", %correlation_id, %request_id, %method, %route,
        traceparent = traceparent.as_deref(), trace_id = %correlation_id, untraced,
        status = tracing::field::Empty);
    let trace_id = span
        .in_scope(flowline_telemetry::trace::current_context)
        .map(|c| c.trace_hex());
    let timeout = state.settings.server.request_timeout.0;
    let mut res = {
        use tracing::Instrument;
        match tokio::time::timeout(timeout, next.run(req))
            .instrument(span.clone())
            .await
        {
            Ok(res) => normalize_error(res).await,
            Err(_) => {
                problem_response(Problem::new(ErrorCode::RequestTimeout).with_detail(format!(
                    "no response within {}",
                    state.settings.server.request_timeout
                )))
            }
        }
    };
    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    state
        .metrics
        .requests
        .get_or_create(&crate::metrics::RequestLabels {
            method: method.clone(),
            route: route.clone(),
            status,
        })
        .inc();
    // Latency samples for analytics: not the console's own polling, and a
    // made-up method is one key, not one per spelling.
    if !untraced {
        let m = match method.as_str() {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => method.as_str(),
            _ => "OTHER",
        };
        let now = flowline_core::Timestamp::now();
        state.samples.push(m, &route, status, elapsed, now);
    }
    state
        .metrics
        .latency
        .get_or_create(&crate::metrics::RouteLabels { method, route })
        .observe(elapsed.as_secs_f64());
    span.record("status", status);
    span.in_scope(|| {
        tracing::info!(
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            user_agent,
            "request handled"
        );
    });
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    if let Some(v) = trace_id.and_then(|t| HeaderValue::from_str(&t).ok()) {
        res.headers_mut().insert(TRACE_ID, v);
    }
    res
}

/// Gateway step after correlation: per-client-IP limits, stricter on the
/// credential routes (login, register, refresh). 429 with `Retry-After`.
async fn rate_limit(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let r = &state.settings.ratelimit;
    if !r.enabled {
        return next.run(req).await;
    }
    let ip = req
        .extensions()
        .get::<flowline_http::ClientIp>()
        .map(|c| flowline_http::rate_key(c.0))
        .unwrap_or_default();
    let path = req.uri().path();
    // Every route that checks a password or a refresh token gets the strict bucket.
    let credential = matches!(
        path,
        "/api/v1/auth/login"
            | "/api/v1/auth/register"
            | "/api/v1/auth/refresh"
            | "/api/v1/users/me/password"
    );
    let mut checks = vec![(
        format!("ip:{ip}"),
        Quota::per_minute(r.ip_per_minute, r.ip_burst),
    )];
    if credential {
        checks.push((
            format!("auth:{ip}"),
            Quota::per_minute(r.auth_per_minute, r.auth_burst),
        ));
    }
    for (key, quota) in checks {
        if let Decision::Limited(wait) = state.limiter.check(&key, quota).await {
            tracing::warn!(%ip, path, "rate limited");
            return ApiError::from(
                Problem::new(ErrorCode::RateLimited).with_detail("request limit for this client"),
            )
            .with_retry_after(wait)
            .into_response();
        }
    }
    next.run(req).await
}

/// Route label for requests no route matched: bounded cardinality.
fn route_of(path: &str) -> String {
    match path {
        "/healthz" | "/readyz" | "/metrics" => path.to_owned(),
        _ => "unmatched".to_owned(),
    }
}

/// Framework rejections (405, 413, 415…) arrive as text; re-render them.
async fn normalize_error(res: Response) -> Response {
    let status = res.status();
    if status.as_u16() < 400 || is_problem(res.headers()) {
        return res;
    }
    let code = match status.as_u16() {
        400 => ErrorCode::MalformedRequest,
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::RouteNotFound,
        405 => ErrorCode::MethodNotAllowed,
        408 | 504 => ErrorCode::RequestTimeout,
        409 => ErrorCode::Conflict,
        413 => ErrorCode::PayloadTooLarge,
        415 => ErrorCode::UnsupportedMediaType,
        422 => ErrorCode::ValidationFailed,
        429 => ErrorCode::RateLimited,
        503 => ErrorCode::ServiceUnavailable,
        _ => ErrorCode::Internal,
    };
    let (parts, body) = res.into_parts();
    let mut p = Problem::new(code);
    if status.as_u16() < 500 {
        if let Ok(bytes) = axum::body::to_bytes(body, 4096).await {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            if !text.is_empty() {
                p = p.with_detail(text);
            }
        }
    }
    let mut out = problem_response(p);
    // Keep the status the framework chose and headers such as `Allow`.
    *out.status_mut() = parts.status;
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

fn is_problem(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_and_request_ids_are_validated() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            traceparent_trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            traceparent_trace_id(&h),
            None,
            "all-zero trace id is invalid"
        );
        h.insert("traceparent", "garbage".parse().unwrap());
        assert_eq!(traceparent_trace_id(&h), None);
        h.insert(REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(header_id(&h, REQUEST_ID).as_deref(), Some("abc-123"));
        h.insert(REQUEST_ID, "has space".parse().unwrap());
        assert_eq!(header_id(&h, REQUEST_ID), None);
        h.insert(REQUEST_ID, "x".repeat(129).parse().unwrap());
        assert_eq!(header_id(&h, REQUEST_ID), None);
    }
}
