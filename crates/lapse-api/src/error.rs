//! The one place errors become HTTP: a status, an OAuth error code where the
//! standards define one, and a description safe to show. Internals are logged,
//! never returned. Handlers answer `Result<_, ApiError>`; a [`BrokerError`] turns
//! into one with `?`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lapse_broker::BrokerError;
use lapse_broker::json::set_field;
use serde_json::json;

/// A broker error, or a refusal only HTTP knows (the request's size and shape).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    HeadersTooLarge(String),
}

impl From<lapse_store::StoreError> for ApiError {
    fn from(e: lapse_store::StoreError) -> Self {
        Self::Broker(e.into())
    }
}

impl ApiError {
    /// The OAuth (or Lapse) error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Broker(e) => e.code(),
            Self::PayloadTooLarge(_) | Self::UnsupportedMediaType(_) | Self::HeadersTooLarge(_) => {
                "invalid_request"
            }
        }
    }

    /// The broker error inside, if it is one.
    pub fn broker(&self) -> Option<&BrokerError> {
        match self {
            Self::Broker(e) => Some(e),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        use BrokerError as B;
        let b = match self {
            Self::Broker(b) => b,
            Self::PayloadTooLarge(_) => return StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => return StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::HeadersTooLarge(_) => return StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        };
        match b {
            B::InvalidRequest(_)
            | B::UnsupportedGrantType(_)
            | B::InvalidGrant(_)
            | B::InvalidTarget(_)
            | B::InvalidScope(_)
            | B::InvalidDpopProof(_)
            | B::AuthorizationPending { .. } => StatusCode::BAD_REQUEST,
            B::InvalidToken(_) | B::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            B::AccessDenied { .. } | B::Forbidden(_) => StatusCode::FORBIDDEN,
            B::NotFound(_) => StatusCode::NOT_FOUND,
            B::Conflict(_) => StatusCode::CONFLICT,
            B::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            B::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({ "error": self.code(), "error_description": self.to_string() });
        match self.broker() {
            Some(BrokerError::AccessDenied { policies, .. }) => {
                set_field(&mut body, "policies", json!(policies))
            }
            Some(BrokerError::AuthorizationPending {
                request_id,
                approvals,
                approvers,
            }) => {
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
        match self.broker() {
            Some(BrokerError::InvalidDpopProof(_)) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "DPoP error=\"invalid_dpop_proof\", algs=\"EdDSA ES256 RS256\"",
                    ),
                );
            }
            Some(BrokerError::InvalidToken(_)) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "DPoP error=\"invalid_token\", algs=\"EdDSA ES256 RS256\"",
                    ),
                );
            }
            Some(BrokerError::Unauthorized(_)) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                // For the router to record the failed authentication, with the
                // source only it knows.
                resp.extensions_mut()
                    .insert(lapse_broker::auth_failures::OperatorRefused);
            }
            Some(BrokerError::Unavailable(_)) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Some(BrokerError::TooManyRequests(_, wait)) => {
                // Whole seconds, rounded up (never 0: that would invite a retry storm).
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        resp
    }
}
