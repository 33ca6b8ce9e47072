//! HTTP for payments. Every POST that moves money needs an `Idempotency-Key`.

use crate::card::CardInput;
use crate::idempotency::{self, Claim, Stored};
use crate::{CardToken, NewPayment, Payment, Payments, RefundRequest};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiJson, Principal, ProblemDoc, RequestContext};
use std::sync::Arc;

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on a response that replays a stored one.
pub const REPLAYED: &str = "idempotent-replayed";

/// Routes for signed-in users (the server puts them behind authentication).
pub fn routes<S: Clone + Send + Sync + 'static>(payments: Arc<Payments>) -> Router<S> {
    Router::new()
        .route("/payments/tokens", post(tokenize))
        .route("/payments", post(create))
        .route("/payments/{id}", get(read))
        .route("/payments/{id}/capture", post(capture))
        .route("/payments/{id}/refund", post(refund))
        .with_state(payments)
}

#[utoipa::path(post, path = "/api/v1/payments/tokens", tag = "payments", security(("bearer" = [])), request_body = CardInput,
    responses((status = 201, description = "The card's token, brand and last 4 (the number is never stored)", body = CardToken),
        (status = 422, description = "Invalid card: Luhn checksum, expiry or CVC (fields named)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn tokenize(
    State(pay): State<Arc<Payments>>,
    who: Principal,
    ApiJson(input): ApiJson<CardInput>,
) -> Result<(StatusCode, Json<CardToken>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(pay.tokenize(&who.user_id, &input).await?),
    ))
}

fn owned(who: &Principal, p: Payment) -> Result<Payment, ApiError> {
    if p.user_id == who.user_id || who.has_role("admin") {
        Ok(p)
    } else {
        Err(Problem::new(ErrorCode::NotFound)
            .with_detail("no such payment")
            .into())
    }
}

/// Runs `run` once per idempotency key: repeats replay its stored response.
/// Only successes are kept; a refused or failed request leaves nothing, so
/// its retry is judged afresh.
async fn once<F, Fut>(
    pay: &Payments,
    who: &Principal,
    headers: &HeaderMap,
    route: &str,
    body: &serde_json::Value,
    run: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<(StatusCode, Payment), ApiError>>,
{
    let key = idempotency::parse_key(headers.get(IDEMPOTENCY_KEY))?;
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let hash = idempotency::request_hash(route, &bytes);
    let wait = pay.config().idempotency_wait;
    let owner = match idempotency::claim(
        &pay.db,
        &who.user_id,
        &key,
        &hash,
        wait,
        pay.config().idempotency_lease,
    )
    .await?
    {
        Claim::Replay(s) => return Ok(respond(s, true)),
        Claim::Run(owner) => owner,
    };
    // The claim is refreshed while the work runs, so a slow provider does
    // not let a duplicate take it over.
    let work = run(key.clone());
    tokio::pin!(work);
    let outcome = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tokio::time::sleep(idempotency::HEARTBEAT) => {
                if let Err(e) = idempotency::heartbeat(&pay.db, &who.user_id, &key, &owner).await {
                    tracing::warn!(error = %e, "cannot refresh an idempotency claim");
                }
            }
        }
    };
    match outcome {
        Ok((status, p)) => {
            let stored = Stored {
                status: status.as_u16(),
                body: serde_json::to_value(&p).unwrap_or_default(),
            };
            if let Err(e) = idempotency::finish(&pay.db, &who.user_id, &key, &owner, &stored).await
            {
                tracing::error!(error = %e, "cannot store the idempotent response");
            }
            Ok(respond(stored, false))
        }
        Err(e) => {
            if let Err(e) = idempotency::abandon(&pay.db, &who.user_id, &key, &owner).await {
                tracing::error!(error = %e, "cannot free an idempotency key");
            }
            Err(e)
        }
    }
}

fn respond(s: Stored, replayed: bool) -> Response {
    let status = StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK);
    let mut res = (status, Json(s.body)).into_response();
    res.headers_mut().insert(
        REPLAYED,
        HeaderValue::from_static(if replayed { "true" } else { "false" }),
    );
    res
}

fn parse<T: serde::de::DeserializeOwned>(body: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(body).map_err(|e| {
        Problem::new(ErrorCode::ValidationFailed)
            .with_detail(e.to_string())
            .into()
    })
}

#[utoipa::path(post, path = "/api/v1/payments", tag = "payments", security(("bearer" = [])), request_body = NewPayment,
    params(("Idempotency-Key" = String, Header, description = "Unique per payment attempt (e.g. a UUID); a retry with the same key and body replays the first response")),
    responses((status = 201, description = "Processed: CAPTURED, AUTHORIZED (capture: false), DECLINED (reason given, e.g. `fraud_suspected`) or FAILED", body = Payment),
        (status = 202, description = "Sent, outcome not yet known (PENDING); it is resolved by asking the provider", body = Payment),
        (status = 400, description = "Idempotency-Key missing or malformed", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The first request with this key is still running", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid payment, card token or VPA; or the key was used with another body (`idempotency_key_reused`)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn create(
    State(pay): State<Arc<Payments>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    let req: NewPayment = parse(body.clone())?;
    let (pay2, who2) = (&pay, &who);
    once(
        &pay,
        &who,
        &headers,
        "POST /payments",
        &body,
        |key| async move {
            let p = pay2.create(&ctx, &who2.user_id, &key, req).await?;
            let status = if p.status == crate::Status::Pending {
                StatusCode::ACCEPTED
            } else {
                StatusCode::CREATED
            };
            Ok((status, p))
        },
    )
    .await
}

#[utoipa::path(get, path = "/api/v1/payments/{id}", tag = "payments", security(("bearer" = [])),
    params(("id" = String, Path, description = "Payment id")),
    responses((status = 200, description = "The payment (yours, or any for an admin)", body = Payment),
        (status = 404, description = "No such payment", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn read(
    State(pay): State<Arc<Payments>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiError> {
    Ok(Json(owned(&who, pay.get(&id).await?)?))
}

#[utoipa::path(post, path = "/api/v1/payments/{id}/capture", tag = "payments", security(("bearer" = [])),
    params(("id" = String, Path, description = "Payment id"), ("Idempotency-Key" = String, Header, description = "Unique per capture attempt")),
    responses((status = 200, description = "Captured (or already was); `payment.captured` emitted", body = Payment),
        (status = 409, description = "Not authorized, or the key is in use", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 502, description = "The provider did not answer; retry", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn capture(
    State(pay): State<Arc<Payments>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    owned(&who, pay.get(&id).await?)?;
    let route = format!("POST /payments/{id}/capture");
    once(
        &pay,
        &who,
        &headers,
        &route,
        &serde_json::Value::Null,
        |_| async { Ok((StatusCode::OK, pay.capture(&ctx, &id).await?)) },
    )
    .await
}

#[utoipa::path(post, path = "/api/v1/payments/{id}/refund", tag = "payments", security(("bearer" = [])), request_body = RefundRequest,
    params(("id" = String, Path, description = "Payment id"), ("Idempotency-Key" = String, Header, description = "Unique per refund")),
    responses((status = 200, description = "Refunded in full (REFUNDED) or in part (PARTIALLY_REFUNDED); `payment.refunded` emitted", body = Payment),
        (status = 403, description = "Refunds are for admins", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Not captured", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "More than remains (`refund_exceeds_capture`) or another currency (`currency_mismatch`)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn refund(
    State(pay): State<Arc<Payments>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    if !who.has_role("admin") {
        return Err(Problem::new(ErrorCode::PermissionDenied)
            .with_detail("refunds are made by admins")
            .into());
    }
    let req: RefundRequest = parse(body.clone())?;
    let route = format!("POST /payments/{id}/refund");
    let (pay2, id2) = (&pay, &id);
    once(&pay, &who, &headers, &route, &body, |key| async move {
        Ok((StatusCode::OK, pay2.refund(&ctx, id2, &key, req).await?))
    })
    .await
}

/// The payments' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(tokenize, create, read, capture, refund))]
pub struct PaymentsApi;
