//! Why a request is refused, and which refusal each token fault becomes.

use lapse_token::{DpopFault, TokenError};

/// Why a request is refused. Each maps to an HTTP status and an RFC 6750/9449
/// error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("no access token (`Authorization: DPoP ...`)")]
    MissingToken,
    #[error("the access token must be sent with the `DPoP` scheme")]
    NotDpopScheme,
    #[error("the access token is malformed: {0}")]
    MalformedToken(String),
    #[error("the access token is signed by an unknown key")]
    UnknownKey,
    #[error("the access token's signature does not verify")]
    BadSignature,
    #[error("the access token is from another issuer")]
    WrongIssuer,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is not valid yet")]
    NotYetValid,
    #[error("the access token is for `{got}`, not `{expected}`")]
    WrongAudience { expected: String, got: String },
    #[error("the token does not grant `{0}`")]
    ActionNotGranted(String),
    #[error("no rule maps this request to an action")]
    NoRule,
    #[error("a `DPoP` proof is required")]
    MissingProof,
    #[error("exactly one `DPoP` header is allowed")]
    MultipleProofs,
    #[error("{detail}")]
    InvalidProof { fault: DpopFault, detail: String },
    #[error("the DPoP proof was already used")]
    ProofReplayed,
    /// RFC 9449 section 8: this gate wants its own nonce in the proof (a fresh one
    /// comes in the answer's `DPoP-Nonce`).
    #[error("the DPoP proof must carry this gate's nonce (sent in `DPoP-Nonce`)")]
    UseDpopNonce,
    #[error("the DPoP proof is signed by another key than the token is bound to")]
    ProofKeyMismatch,
    #[error(
        "the token is bound to a client certificate (`cnf.x5t#S256`) and the request came without one"
    )]
    CertificateMissing,
    #[error("the token is bound to another client certificate than the request came with")]
    CertificateMismatch,
    #[error("the grant has ended ({0})")]
    GrantEnded(String),
    #[error("the revocation feed has been silent for {0} s; failing closed")]
    FeedStale(u64),
    #[error("policy refuses: {0}")]
    PolicyDenied(String),
    #[error("cannot decide now: {0}")]
    Unavailable(String),
}

impl Denial {
    /// 401 for a missing or unusable credential, 403 for a valid one that does not
    /// cover the request, 503 when the gate cannot decide.
    pub fn status(&self) -> u16 {
        match self {
            Self::ActionNotGranted(_)
            | Self::WrongAudience { .. }
            | Self::NoRule
            | Self::PolicyDenied(_) => 403,
            Self::FeedStale(_) | Self::Unavailable(_) => 503,
            _ => 401,
        }
    }

    /// The RFC 6750 / RFC 9449 `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken => "invalid_request",
            Self::MissingProof
            | Self::MultipleProofs
            | Self::InvalidProof { .. }
            | Self::ProofReplayed
            | Self::ProofKeyMismatch => "invalid_dpop_proof",
            // RFC 8705 §3: a certificate-bound token presented without (or with
            // another) certificate is an invalid token.
            Self::ActionNotGranted(_)
            | Self::WrongAudience { .. }
            | Self::NoRule
            | Self::PolicyDenied(_) => "insufficient_scope",
            Self::FeedStale(_) | Self::Unavailable(_) => "temporarily_unavailable",
            Self::UseDpopNonce => "use_dpop_nonce",
            _ => "invalid_token",
        }
    }

    /// A `WWW-Authenticate` value for a 401 or 403. A request without any
    /// credentials gets the bare challenge, no error code (RFC 6750 section 3.1).
    pub fn www_authenticate(&self) -> String {
        if *self == Self::MissingToken {
            return "DPoP algs=\"EdDSA ES256 RS256\"".into();
        }
        let desc: String = self
            .to_string()
            .chars()
            .filter(|c| *c != '"' && *c != '\\')
            // A header value is visible ASCII: clients refuse anything else (a
            // claim or path quoted in a denial could carry it).
            .map(|c| {
                if c == ' ' || c.is_ascii_graphic() {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        format!(
            "DPoP error=\"{}\", error_description=\"{desc}\", algs=\"EdDSA ES256 RS256\"",
            self.code()
        )
    }
}

pub(crate) fn proof_denial(e: TokenError) -> Denial {
    match e {
        TokenError::Dpop { fault, detail } => Denial::InvalidProof {
            fault,
            detail: format!("DPoP proof {detail}"),
        },
        TokenError::DpopReplay => Denial::ProofReplayed,
        TokenError::ReplayCacheFull => Denial::Unavailable("replay cache is full".into()),
        other => Denial::InvalidProof {
            fault: DpopFault::Malformed,
            detail: format!("DPoP proof: {other}"),
        },
    }
}

pub(crate) fn token_denial(e: TokenError) -> Denial {
    match e {
        TokenError::UnknownKey(_) | TokenError::AmbiguousKey => Denial::UnknownKey,
        TokenError::BadSignature | TokenError::AlgorithmMismatch { .. } => Denial::BadSignature,
        TokenError::WrongIssuer(_) => Denial::WrongIssuer,
        TokenError::Expired => Denial::Expired,
        TokenError::NotYetValid => Denial::NotYetValid,
        other => Denial::MalformedToken(other.to_string()),
    }
}
