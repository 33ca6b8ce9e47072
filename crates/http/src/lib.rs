//! flowline-http: the HTTP vocabulary every context's handlers share.
//!
//! Handlers return `Result<_, ApiError>`; an `ApiError` is a problem+json
//! response. `ApiJson` is a JSON body extractor whose rejections are problems
//! naming what was wrong. `RequestContext` carries the correlation id the edge
//! middleware assigned.

/// A boxed, sendable future: what object-safe async traits (session stores,
/// rate limiters) return, so a Redis backend can stand behind the same trait.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub mod cache;
pub mod ratelimit;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flowline_core::{ErrorCode, Problem};

pub const REQUEST_ID: &str = "x-request-id";
/// The W3C trace id of the request's trace (`flowline flows TRACE_ID`).
pub const TRACE_ID: &str = "x-trace-id";
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Per-request context: who asked, for correlating logs and events.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Follows the request through every log line and event it causes.
    pub correlation_id: String,
    /// This hop's own id: the `causation_id` of events the request emits.
    pub request_id: String,
}

impl RequestContext {
    /// For work no request caused (sweepers, reconcilers, CLI commands): a
    /// fresh correlation id.
    pub fn detached() -> RequestContext {
        RequestContext {
            correlation_id: flowline_core::id::new_correlation_id(),
            request_id: flowline_core::id::new_id().to_string(),
        }
    }

    /// For work an event caused: its correlation id carries on, and the
    /// event is the cause of what follows.
    pub fn caused_by(event: &flowline_core::Envelope) -> RequestContext {
        RequestContext {
            correlation_id: event.correlation_id.clone(),
            request_id: event.id.to_string(),
        }
    }
}

/// The problem+json body, as documented in OpenAPI (mirrors `flowline_core::Problem`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(title = "Problem")]
pub struct ProblemDoc {
    /// URI of the problem type.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    /// Stable snake_case error code, e.g. `validation_failed`.
    pub code: String,
    pub detail: Option<String>,
    pub correlation_id: Option<String>,
    /// Field-level errors (`field` names the offending input).
    pub errors: Vec<FieldErrorDoc>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct FieldErrorDoc {
    pub field: String,
    pub message: String,
}

/// The authenticated caller, put in request extensions by the gateway's
/// authentication step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub session_id: String,
    pub roles: Vec<String>,
}

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Problem::new(ErrorCode::Unauthenticated).into())
    }
}

/// An error a handler returns; rendered as problem+json.
#[derive(Debug)]
pub struct ApiError(pub Box<Problem>, Option<std::time::Duration>);

impl ApiError {
    /// Adds a `Retry-After` header (whole seconds, rounded up).
    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        self.1 = Some(wait);
        self
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError(Box::new(p), None)
    }
}

impl From<flowline_store::StoreError> for ApiError {
    fn from(e: flowline_store::StoreError) -> Self {
        tracing::error!(error = %e, "storage error");
        ApiError::from(Problem::new(ErrorCode::Internal))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = problem_response(*self.0);
        if let Some(wait) = self.1 {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        res
    }
}

pub fn problem_response(p: Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, Json(p)).into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    res
}

/// JSON body extractor whose rejections are problems naming what was wrong.
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection as R;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => {
                let code = match &rej {
                    R::JsonDataError(_) => ErrorCode::ValidationFailed,
                    R::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
                    R::BytesRejection(_) => ErrorCode::PayloadTooLarge,
                    _ => ErrorCode::MalformedRequest,
                };
                Err(Problem::new(code).with_detail(rej.body_text()).into())
            }
        }
    }
}

/// Query-string extractor whose rejections are `malformed_request` problems.
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(Problem::new(ErrorCode::MalformedRequest)
                .with_detail(e.body_text())
                .into()),
        }
    }
}

/// The client's address as the edge resolved it (see [`client_ip`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub std::net::IpAddr);

/// The client address: the TCP peer, unless the peer is a trusted proxy, in
/// which case the right-most `X-Forwarded-For` entry that is not itself a
/// trusted proxy (entries further left are whatever the client claimed).
pub fn client_ip(
    headers: &axum::http::HeaderMap,
    peer: Option<std::net::IpAddr>,
    trusted: &[std::net::IpAddr],
) -> Option<std::net::IpAddr> {
    let peer = peer?;
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !trusted.contains(ip))
        .or(Some(peer))
}

/// The rate-limit bucket of an address: IPv6 clients get a /64 each (one
/// host usually owns a whole /64, so per-address buckets would be free to dodge).
pub fn rate_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4.to_string();
            }
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_trusted_only_from_proxies_and_v6_buckets_by_64() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let client: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            client_ip(&h, Some(client), &[proxy]),
            Some(client),
            "untrusted peer: header ignored"
        );
        assert_eq!(
            client_ip(&h, Some(proxy), &[proxy]),
            Some(client),
            "right-most untrusted hop, not the spoofable left"
        );
        assert_eq!(
            client_ip(&axum::http::HeaderMap::new(), Some(proxy), &[proxy]),
            Some(proxy)
        );
        assert_eq!(
            rate_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            rate_key("2001:db8:1:2:bbbb::9".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
        assert_eq!(rate_key("::ffff:192.0.2.1".parse().unwrap()), "192.0.2.1");
        assert_eq!(rate_key("192.0.2.1".parse().unwrap()), "192.0.2.1");
    }
}
