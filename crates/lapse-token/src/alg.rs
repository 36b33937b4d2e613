//! The signature algorithms Lapse accepts (re-exported as `jws::Alg`). Kept out
//! of `jws` so that a key (`jwk`) can name its algorithm without importing the
//! JWS code, which itself uses keys.

use crate::TokenError;

/// The only algorithms Lapse accepts. Anything else, including `none` and the HMAC
/// family, fails to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    EdDSA,
    ES256,
    RS256,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EdDSA => "EdDSA",
            Self::ES256 => "ES256",
            Self::RS256 => "RS256",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, TokenError> {
        match s {
            "EdDSA" | "Ed25519" => Ok(Self::EdDSA),
            "ES256" => Ok(Self::ES256),
            "RS256" => Ok(Self::RS256),
            other => Err(TokenError::UnsupportedAlgorithm(
                other.chars().take(32).collect(),
            )),
        }
    }
}
