//! The one place errors become HTTP: a status, an OAuth error code where the
//! standards define one, and a description safe to show. Internals are logged,
//! never returned.

use crate::set_field;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// RFC 6749 `invalid_request`: missing, repeated or malformed parameters.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    /// RFC 6749 `invalid_grant`: the subject (identity) token is not acceptable.
    #[error("{0}")]
    InvalidGrant(String),
    /// RFC 8693 `invalid_target`: unknown audience.
    #[error("{0}")]
    InvalidTarget(String),
    /// RFC 6749 `invalid_scope`: unknown action.
    #[error("{0}")]
    InvalidScope(String),
    /// RFC 9449 `invalid_dpop_proof`.
    #[error("{0}")]
    InvalidDpopProof(String),
    /// RFC 6750 `invalid_token` for a bad access token on the /v1 API.
    #[error("{0}")]
    InvalidToken(String),
    /// Policy said no.
    #[error("{description}")]
    AccessDenied {
        description: String,
        policies: Vec<String>,
    },
    /// Policy wants people to approve first.
    #[error("authorization pending")]
    AuthorizationPending {
        request_id: String,
        approvals: u32,
        approvers: Option<String>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Fail closed: store, policy or keys unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// Over a rate limit or cap: try again after the duration.
    #[error("{0}")]
    TooManyRequests(String, std::time::Duration),
    #[error("{0}")]
    HeadersTooLarge(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_)
            | Self::PayloadTooLarge(_)
            | Self::UnsupportedMediaType(_)
            | Self::HeadersTooLarge(_) => "invalid_request",
            // RFC 8628's code for "too often": the client waits `Retry-After`.
            Self::TooManyRequests(..) => "slow_down",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::InvalidGrant(_) => "invalid_grant",
            Self::InvalidTarget(_) => "invalid_target",
            Self::InvalidScope(_) => "invalid_scope",
            Self::InvalidDpopProof(_) => "invalid_dpop_proof",
            Self::InvalidToken(_) => "invalid_token",
            Self::AccessDenied { .. } => "access_denied",
            Self::AuthorizationPending { .. } => "authorization_pending",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Unavailable(_) => "temporarily_unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_)
            | Self::UnsupportedGrantType(_)
            | Self::InvalidGrant(_)
            | Self::InvalidTarget(_)
            | Self::InvalidScope(_)
            | Self::InvalidDpopProof(_)
            | Self::AuthorizationPending { .. } => StatusCode::BAD_REQUEST,
            Self::InvalidToken(_) | Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::AccessDenied { .. } | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({ "error": self.code(), "error_description": self.to_string() });
        match &self {
            Self::AccessDenied { policies, .. } => {
                set_field(&mut body, "policies", json!(policies))
            }
            Self::AuthorizationPending {
                request_id,
                approvals,
                approvers,
            } => {
                set_field(&mut body, "request_id", json!(request_id));
                set_field(&mut body, "approvals_required", json!(approvals));
                set_field(&mut body, "approvers", json!(approvers));
                // RFC 8628's `interval`: poll once a second (`lapse` itself polls twice).
                set_field(&mut body, "interval", json!(1));
            }
            _ => {}
        }
        let mut resp = (status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            Self::InvalidDpopProof(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "DPoP error=\"invalid_dpop_proof\", algs=\"EdDSA ES256 RS256\"",
                    ),
                );
            }
            Self::InvalidToken(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "DPoP error=\"invalid_token\", algs=\"EdDSA ES256 RS256\"",
                    ),
                );
            }
            Self::Unauthorized(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                // For the router to record the failed authentication, with the
                // source only it knows.
                resp.extensions_mut()
                    .insert(crate::auth_failures::OperatorRefused);
            }
            Self::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::TooManyRequests(_, wait) => {
                // Whole seconds, rounded up (never 0: that would invite a retry storm).
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        resp
    }
}

impl From<lapse_store::StoreError> for ApiError {
    fn from(e: lapse_store::StoreError) -> Self {
        match e {
            lapse_store::StoreError::Conflict(id) => {
                Self::Conflict(format!("grant `{id}` changed concurrently; retry"))
            }
            lapse_store::StoreError::Invalid(why) => Self::InvalidRequest(why),
            // The nonces that reach here are DPoP proofs: reports' keys
            // (tool_calls.rs) answer their own replays as already recorded.
            lapse_store::StoreError::Replay(_) => {
                Self::InvalidDpopProof("the DPoP proof was already used".into())
            }
            other => {
                tracing::error!(error = %other, "store failure; failing closed");
                Self::Unavailable("the store is unavailable; nothing was issued or changed".into())
            }
        }
    }
}
