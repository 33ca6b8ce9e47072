//! HTTP for the identity context, and the gateway's authentication and
//! permission steps that every context's protected routes sit behind.

use crate::service::{Device, Identity, TokenPair, User};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::cache::{CachePolicy, ResponseCache};
use flowline_http::ratelimit::{Decision, Quota, RateLimiter};
use flowline_http::{ApiError, ApiJson, ClientIp, Principal, ProblemDoc, RequestContext};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The identity context's state plus the per-user rate limit of the gateway.
#[derive(Clone)]
pub struct AuthState {
    pub identity: Arc<Identity>,
    pub limiter: Option<(Arc<dyn RateLimiter>, Quota)>,
    /// The gateway's response cache (`GET /users/me` is cached per user).
    pub cache: Arc<ResponseCache>,
}

/// `GET /users/me`: personal, dropped by any `user.events` event of the user.
pub const ME_CACHE: CachePolicy = CachePolicy {
    ttl: std::time::Duration::from_secs(30),
    per_user: true,
    vary_query: false,
};

/// `/api/v1` routes: public auth flows, the caller's own account, and admin.
pub fn api_routes<S: Clone + Send + Sync + 'static>(state: AuthState) -> Router<S> {
    let public = Router::new()
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
        .route("/auth/refresh", post(refresh));
    let authed = Router::new()
        .route("/auth/logout", post(logout))
        .route("/auth/logout-all", post(logout_all))
        .route("/auth/sessions", get(sessions))
        .route("/auth/sessions/{id}", delete(end_session))
        .route("/users/me/password", post(change_password))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    // Layers run outermost-last: authenticate, then the cache, then the handler.
    let cached = Router::new()
        .route("/users/me", get(me).patch(update_me))
        .route_layer(middleware::from_fn_with_state(
            (state.cache.clone(), ME_CACHE),
            flowline_http::cache::cached,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    let admin = Router::new()
        .route("/admin/users/{id}/ban", post(ban))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_role_admin,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    public
        .merge(authed)
        .merge(cached)
        .merge(admin)
        .with_state(state)
}

/// Root routes: `/.well-known/jwks.json`.
pub fn well_known<S: Clone + Send + Sync + 'static>(state: AuthState) -> Router<S> {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state)
}

fn device(headers: &HeaderMap, ip: Option<&ClientIp>) -> Device {
    Device {
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(256)
            .collect(),
        ip: ip.map(|c| c.0.to_string()).unwrap_or_default(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn challenge(mut res: Response, error: Option<&str>) -> Response {
    let v = match error {
        Some(e) => format!("Bearer error=\"{e}\""),
        None => "Bearer".to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&v) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    res
}

/// Gateway step: a valid access token of an active session, then the per-user limit.
pub async fn require_auth(
    State(state): State<AuthState>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return challenge(
            ApiError::from(Problem::new(ErrorCode::Unauthenticated)).into_response(),
            None,
        );
    };
    let principal = match state.identity.authenticate(token).await {
        Ok(p) => p,
        Err(e) => return challenge(e.into_response(), Some("invalid_token")),
    };
    if let Some((limiter, quota)) = &state.limiter {
        if let Decision::Limited(wait) = limiter
            .check(&format!("user:{}", principal.user_id), *quota)
            .await
        {
            return ApiError::from(
                Problem::new(ErrorCode::RateLimited).with_detail("per-user request limit"),
            )
            .with_retry_after(wait)
            .into_response();
        }
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Gateway step: the `admin` role; a refusal is audited.
pub async fn require_role_admin(
    State(state): State<AuthState>,
    req: Request,
    next: Next,
) -> Response {
    let p = req.extensions().get::<Principal>().cloned();
    match p {
        Some(p) if p.has_role("admin") => next.run(req).await,
        other => {
            let ctx = req
                .extensions()
                .get::<RequestContext>()
                .cloned()
                .unwrap_or_else(RequestContext::detached);
            let user = other.map(|p| p.user_id).unwrap_or_default();
            state
                .identity
                .audit(
                    &ctx,
                    "auth.permission_denied",
                    &user,
                    serde_json::json!({
                        "user_id": user, "method": req.method().as_str(), "path": req.uri().path(), "required_role": "admin",
                    }),
                )
                .await;
            ApiError::from(
                Problem::new(ErrorCode::PermissionDenied).with_detail("requires the admin role"),
            )
            .into_response()
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    email: String,
    password: String,
    display_name: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    password: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuthResponse {
    user: User,
    #[serde(flatten)]
    tokens: TokenPair,
}

#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered and logged in", body = AuthResponse),
        (status = 400, description = "Malformed JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Email taken (`email_taken`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Weak password, bad email or name", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited (see Retry-After)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn register(
    State(s): State<AuthState>,
    Extension(ctx): Extension<RequestContext>,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    ApiJson(r): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<AuthResponse>), ApiError> {
    let d = device(&headers, ip.as_ref().map(|e| &e.0));
    let (user, tokens) = s
        .identity
        .register(&ctx, &d, &r.email, &r.password, &r.display_name)
        .await?;
    Ok((StatusCode::CREATED, Json(AuthResponse { user, tokens })))
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in: a new session", body = AuthResponse),
        (status = 400, description = "Malformed JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Unknown email or wrong password (one answer for both)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Account banned", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited, or the account is slowed after failures", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn login(
    State(s): State<AuthState>,
    Extension(ctx): Extension<RequestContext>,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    ApiJson(r): ApiJson<LoginRequest>,
) -> Result<Json<AuthResponse>, ApiError> {
    let d = device(&headers, ip.as_ref().map(|e| &e.0));
    let (user, tokens) = s.identity.login(&ctx, &d, &r.email, &r.password).await?;
    Ok(Json(AuthResponse { user, tokens }))
}

#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses(
        (status = 200, description = "Rotated: a new access and refresh token", body = TokenPair),
        (status = 401, description = "Invalid, or reused (the session is revoked: `refresh_token_reused`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn refresh(
    State(s): State<AuthState>,
    Extension(ctx): Extension<RequestContext>,
    ApiJson(r): ApiJson<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    Ok(Json(s.identity.refresh(&ctx, &r.refresh_token).await?))
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "Session revoked; its access tokens stop working at once"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn logout(State(s): State<AuthState>, p: Principal) -> Result<StatusCode, ApiError> {
    s.identity.logout(&p).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/auth/logout-all", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "Every session revoked", body = serde_json::Value),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn logout_all(
    State(s): State<AuthState>,
    p: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    let n = s.identity.logout_all(&p).await?;
    Ok(Json(serde_json::json!({ "sessions_ended": n })))
}

#[utoipa::path(get, path = "/api/v1/auth/sessions", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The caller's active sessions (`current` marks this one)", body = serde_json::Value),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn sessions(
    State(s): State<AuthState>,
    p: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.identity.sessions(&p).await?;
    let items: Vec<serde_json::Value> = list
        .into_iter()
        .map(|x| {
            let current = x.id == p.session_id;
            let mut v = serde_json::to_value(x).unwrap_or_default();
            v["current"] = current.into();
            v
        })
        .collect();
    Ok(Json(serde_json::json!({ "sessions": items })))
}

#[utoipa::path(delete, path = "/api/v1/auth/sessions/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses((status = 204, description = "Session ended"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such session of the caller", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn end_session(
    State(s): State<AuthState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.identity.end_session(&p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/users/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, description = "The caller (cached per user; `x-cache` says hit or miss)", body = User),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn me(State(s): State<AuthState>, p: Principal) -> Result<Json<User>, ApiError> {
    Ok(Json(s.identity.me(&p).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMe {
    display_name: String,
}

#[utoipa::path(patch, path = "/api/v1/users/me", tag = "users", security(("bearer" = [])), request_body = UpdateMe,
    responses((status = 200, description = "Updated", body = User),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid display name", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn update_me(
    State(s): State<AuthState>,
    Extension(ctx): Extension<RequestContext>,
    p: Principal,
    ApiJson(r): ApiJson<UpdateMe>,
) -> Result<Json<User>, ApiError> {
    Ok(Json(s.identity.update_me(&ctx, &p, &r.display_name).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    current_password: String,
    new_password: String,
}

#[utoipa::path(post, path = "/api/v1/users/me/password", tag = "users", security(("bearer" = [])), request_body = ChangePassword,
    responses((status = 200, description = "Changed; every other session revoked", body = serde_json::Value),
        (status = 401, description = "Not authenticated, or wrong current password", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "New password too weak", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn change_password(
    State(s): State<AuthState>,
    Extension(ctx): Extension<RequestContext>,
    p: Principal,
    ApiJson(r): ApiJson<ChangePassword>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let n = s
        .identity
        .change_password(&ctx, &p, &r.current_password, &r.new_password)
        .await?;
    Ok(Json(serde_json::json!({ "other_sessions_ended": n })))
}

#[utoipa::path(post, path = "/api/v1/admin/users/{id}/ban", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, description = "Banned: sessions ended, `user.banned` emitted", body = User),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin (audited as `auth.permission_denied`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn ban(
    State(s): State<AuthState>,
    Extension(ctx): Extension<RequestContext>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<User>, ApiError> {
    Ok(Json(s.identity.ban(&ctx, &p, &id).await?))
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "Public keys (Ed25519 JWKs) that verify access tokens", body = serde_json::Value)))]
pub async fn jwks(State(s): State<AuthState>) -> Response {
    let mut res = Json(s.identity.jwks()).into_response();
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    res
}

/// The identity context's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    register,
    login,
    refresh,
    logout,
    logout_all,
    sessions,
    end_session,
    me,
    update_me,
    change_password,
    ban,
    jwks
))]
pub struct IdentityApi;
