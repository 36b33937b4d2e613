/// Why a token or proof was refused. Messages are safe to show to the caller: they
/// never contain key material or the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported algorithm `{0}`: only EdDSA, ES256 and RS256 are accepted")]
    UnsupportedAlgorithm(String),
    #[error("algorithm `{alg}` does not match the key, which is for `{key}`")]
    AlgorithmMismatch { alg: String, key: &'static str },
    #[error("signature does not verify")]
    BadSignature,
    #[error("no key with id `{0}`")]
    UnknownKey(String),
    #[error("token has no `kid` and the issuer has more than one key")]
    AmbiguousKey,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("unexpected `typ` `{0}`")]
    WrongType(String),
    #[error("issuer `{0}` is not the expected one")]
    WrongIssuer(String),
    #[error("audience does not match")]
    WrongAudience,
    #[error("missing claim `{0}`")]
    MissingClaim(&'static str),
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("DPoP proof {detail}")]
    Dpop { fault: DpopFault, detail: String },
    #[error("DPoP proof `jti` was already used")]
    DpopReplay,
    #[error("DPoP replay cache is full: failing closed")]
    ReplayCacheFull,
}

/// Which check a DPoP proof failed, for callers that answer differently per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpopFault {
    /// Not a well-formed `dpop+jwt` with the claims RFC 9449 requires.
    Malformed,
    /// The signature does not verify with the key in its header.
    Signature,
    /// `htm` is not the request's method.
    Method,
    /// `htu` is not the request's URL.
    Url,
    /// `iat` is older than the allowed age.
    Stale,
    /// `iat` is in the future beyond the allowed skew.
    Future,
    /// `ath` is missing or is not the hash of the access token presented.
    AccessTokenHash,
}
