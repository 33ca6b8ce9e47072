//! RFC 9457 problem details with a stable catalogue of error codes.
//!
//! Clients branch on `code` (snake_case, never renamed); `title` is the fixed
//! human summary of the code; `detail` explains this occurrence. A 5xx never
//! carries internal error text in `detail`.

use serde::Serialize;

/// The stable error catalogue. Adding a code is fine; renaming one breaks clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    RouteNotFound,
    MethodNotAllowed,
    NotFound,
    MalformedRequest,
    ValidationFailed,
    Conflict,
    Unauthenticated,
    InvalidCredentials,
    TokenInvalid,
    RefreshTokenReused,
    PermissionDenied,
    RateLimited,
    WeakPassword,
    InvalidEmail,
    EmailTaken,
    AccountBanned,
    PreconditionFailed,
    PreconditionRequired,
    PayloadTooLarge,
    UnsupportedMediaType,
    RequestTimeout,
    ServiceUnavailable,
    Internal,
    UnbalancedEntry,
    InsufficientStock,
    CurrencyMismatch,
    InvalidCard,
    InvalidVpa,
    IdempotencyKeyRequired,
    IdempotencyKeyReused,
    IdempotencyKeyInProgress,
    InvalidState,
    RefundExceedsCapture,
    PaymentProviderUnavailable,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::RouteNotFound => "route_not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::InvalidCredentials => "invalid_credentials",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::RefreshTokenReused => "refresh_token_reused",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::WeakPassword => "weak_password",
            ErrorCode::InvalidEmail => "invalid_email",
            ErrorCode::EmailTaken => "email_taken",
            ErrorCode::AccountBanned => "account_banned",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::PreconditionRequired => "precondition_required",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::Internal => "internal_error",
            ErrorCode::UnbalancedEntry => "unbalanced_entry",
            ErrorCode::InsufficientStock => "insufficient_stock",
            ErrorCode::CurrencyMismatch => "currency_mismatch",
            ErrorCode::InvalidCard => "invalid_card",
            ErrorCode::InvalidVpa => "invalid_vpa",
            ErrorCode::IdempotencyKeyRequired => "idempotency_key_required",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::IdempotencyKeyInProgress => "idempotency_key_in_progress",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::RefundExceedsCapture => "refund_exceeds_capture",
            ErrorCode::PaymentProviderUnavailable => "payment_provider_unavailable",
        }
    }

    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::RouteNotFound | ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::MalformedRequest => 400,
            ErrorCode::ValidationFailed => 422,
            ErrorCode::Conflict | ErrorCode::EmailTaken => 409,
            ErrorCode::Unauthenticated
            | ErrorCode::InvalidCredentials
            | ErrorCode::TokenInvalid
            | ErrorCode::RefreshTokenReused => 401,
            ErrorCode::PermissionDenied | ErrorCode::AccountBanned => 403,
            ErrorCode::RateLimited => 429,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::PreconditionRequired => 428,
            ErrorCode::WeakPassword | ErrorCode::InvalidEmail => 422,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::ServiceUnavailable => 503,
            ErrorCode::Internal => 500,
            ErrorCode::UnbalancedEntry => 422,
            ErrorCode::InsufficientStock => 409,
            ErrorCode::CurrencyMismatch => 422,
            ErrorCode::InvalidCard => 422,
            ErrorCode::InvalidVpa => 422,
            ErrorCode::IdempotencyKeyRequired => 400,
            ErrorCode::IdempotencyKeyReused => 422,
            ErrorCode::IdempotencyKeyInProgress => 409,
            ErrorCode::InvalidState => 409,
            ErrorCode::RefundExceedsCapture => 422,
            ErrorCode::PaymentProviderUnavailable => 502,
        }
    }

    pub const fn title(self) -> &'static str {
        match self {
            ErrorCode::RouteNotFound => "No such route",
            ErrorCode::MethodNotAllowed => "Method not allowed on this route",
            ErrorCode::NotFound => "Resource not found",
            ErrorCode::MalformedRequest => "The request could not be parsed",
            ErrorCode::ValidationFailed => "The request is well-formed but invalid",
            ErrorCode::Conflict => "The request conflicts with the current state",
            ErrorCode::Unauthenticated => "Authentication required",
            ErrorCode::InvalidCredentials => "Email or password is incorrect",
            ErrorCode::TokenInvalid => "The token is invalid, expired or revoked",
            ErrorCode::RefreshTokenReused => "Refresh token reuse detected; the session is revoked",
            ErrorCode::PermissionDenied => "You do not have permission for this",
            ErrorCode::RateLimited => "Too many requests",
            ErrorCode::WeakPassword => "The password is too weak",
            ErrorCode::InvalidEmail => "The email address is not valid",
            ErrorCode::EmailTaken => "An account with this email already exists",
            ErrorCode::AccountBanned => "This account is banned",
            ErrorCode::PreconditionFailed => {
                "The resource changed since the version you sent (If-Match)"
            }
            ErrorCode::PreconditionRequired => {
                "This write needs an If-Match header with the current version"
            }
            ErrorCode::PayloadTooLarge => "The request body is too large",
            ErrorCode::UnsupportedMediaType => "Unsupported content type",
            ErrorCode::RequestTimeout => "The request took too long",
            ErrorCode::ServiceUnavailable => "The service is temporarily unavailable",
            ErrorCode::Internal => "Internal error",
            ErrorCode::UnbalancedEntry => "The journal entry does not balance",
            ErrorCode::InsufficientStock => "Not enough stock is available",
            ErrorCode::CurrencyMismatch => "The currencies do not match",
            ErrorCode::InvalidCard => "The card details are not valid",
            ErrorCode::InvalidVpa => "The UPI address (VPA) is not valid",
            ErrorCode::IdempotencyKeyRequired => "This request needs an Idempotency-Key header",
            ErrorCode::IdempotencyKeyReused => {
                "The Idempotency-Key was used with a different request"
            }
            ErrorCode::IdempotencyKeyInProgress => {
                "A request with this Idempotency-Key is still being processed"
            }
            ErrorCode::InvalidState => "The resource is not in a state that allows this",
            ErrorCode::RefundExceedsCapture => "The refund is larger than what remains captured",
            ErrorCode::PaymentProviderUnavailable => "The payment provider did not answer",
        }
    }
}

/// An `application/problem+json` body.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// A URI naming the problem type; resolves to the code's documentation.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Field-level validation errors, when there are any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldError {
    /// JSON pointer or parameter name of the offending input.
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(code: ErrorCode) -> Self {
        Problem {
            type_uri: format!("https://flowline.dev/problems/{}", code.as_str()),
            title: code.title(),
            status: code.status(),
            code: code.as_str(),
            detail: None,
            instance: None,
            correlation_id: None,
            errors: Vec::new(),
        }
    }

    /// Adds a detail. Ignored for 5xx: internal text never reaches a client.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        if self.status < 500 {
            self.detail = Some(detail.into());
        }
        self
    }

    pub fn with_field(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_never_carry_detail() {
        let p = Problem::new(ErrorCode::Internal).with_detail("db password is hunter2");
        assert_eq!(p.detail, None);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["code"], "internal_error");
        assert_eq!(json["status"], 500);
        assert!(!json.to_string().contains("hunter2"));

        let p = Problem::new(ErrorCode::ValidationFailed)
            .with_detail("bad")
            .with_field("email", "missing @");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["detail"], "bad");
        assert_eq!(json["errors"][0]["field"], "email");
    }
}
