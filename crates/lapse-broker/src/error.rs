//! What can go wrong in a broker operation, in the words of the standards where
//! they have them (RFC 6749, 8693, 9449, 6750): `lapse-api` maps each to its HTTP
//! answer in one place. Descriptions are safe to show; internals are logged, never
//! put in them.

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
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
    /// Fail closed: store, policy or keys unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// Over a rate limit or cap: try again after the duration.
    #[error("{0}")]
    TooManyRequests(String, std::time::Duration),
}

impl BrokerError {
    /// The OAuth (or Lapse) error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
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
}

impl From<lapse_store::StoreError> for BrokerError {
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

/// A lifecycle transition the grant's state does not allow: someone else moved it.
pub(crate) fn lifecycle(e: lapse_core::LifecycleError) -> BrokerError {
    BrokerError::Conflict(e.to_string())
}

/// The sender's words, clipped, for an error message or a log line.
pub fn clip(s: &str) -> String {
    s.chars().take(128).collect()
}
