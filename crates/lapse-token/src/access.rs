//! RFC 9068 JWT access tokens, DPoP-bound through `cnf.jkt`.

use crate::TokenError;
use crate::jwk::PublicKey;
use crate::jws::{self, Unverified};
use serde::{Deserialize, Serialize};

/// The `typ` header of a Lapse access token (RFC 9068 section 2.1).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// Claims of a Lapse access token. One token, one grant, one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The workload URI.
    pub sub: String,
    /// The target the token is for.
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    /// RFC 9068 requires it; for a workload it is the workload itself.
    pub client_id: String,
    /// Space-separated actions, exactly those allowed.
    pub scope: String,
    pub cnf: Confirmation,
    /// The task id.
    pub task: String,
    pub grant_id: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    /// What the grant was decided on beyond the standard claims, so a gate can
    /// evaluate the current policies for each request exactly as the broker did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx: Option<DecisionContext>,
    /// The tools the task declared, with their argument constraints (what the MCP
    /// proxy checks each call against).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<lapse_core::ToolDecl>,
    /// RFC 8693 §4.1: for a sub-agent's token, who acts (and, nested, who
    /// delegated before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<serde_json::Value>,
}

/// The inputs of the grant's decision a gate needs to decide again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DecisionContext {
    /// The identity token's issuer.
    pub wl_iss: String,
    /// The identity token's `sub`.
    pub wl_sub: String,
    /// The identity claims policies see as the workload's tags.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub claims: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub purpose: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ticket: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub environment: String,
}

/// RFC 9449 confirmation: the SHA-256 thumbprint of the DPoP key; and, for a
/// client that authenticated with a certificate, RFC 8705's SHA-256 thumbprint of
/// that certificate (the token is then bound to both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub jkt: String,
    #[serde(rename = "x5t#S256", default, skip_serializing_if = "Option::is_none")]
    pub x5t_s256: Option<String>,
}

impl AccessClaims {
    pub fn actions(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|s| !s.is_empty())
    }

    /// Hops of delegation behind this token: the nesting of `act`.
    pub fn depth(&self) -> u32 {
        let mut depth = 0;
        let mut act = self.act.as_ref();
        while let Some(a) = act {
            depth += 1;
            act = a.get("act");
        }
        depth
    }
}

/// Verifies a Lapse access token: `typ`, signature by a key `key_for(kid)` returns,
/// issuer, and lifetime at `now_secs`. Grant state is the caller's to check.
pub fn verify<'k>(
    token: &str,
    key_for: impl Fn(&str) -> Option<&'k PublicKey>,
    issuer: &str,
    now_secs: i64,
) -> Result<AccessClaims, TokenError> {
    let unverified = Unverified::parse(token)?;
    match unverified.header.typ.as_deref() {
        Some(t)
            if t.eq_ignore_ascii_case(ACCESS_TOKEN_TYP)
                || t.eq_ignore_ascii_case("application/at+jwt") => {}
        other => {
            return Err(TokenError::WrongType(
                other.unwrap_or("").chars().take(32).collect(),
            ));
        }
    }
    let kid = unverified
        .header
        .kid
        .clone()
        .ok_or(TokenError::MissingClaim("kid"))?;
    let key =
        key_for(&kid).ok_or_else(|| TokenError::UnknownKey(kid.chars().take(64).collect()))?;
    let payload = unverified.verify(key)?;
    let claims: AccessClaims = jws::claims(&payload)?;
    if claims.iss != issuer {
        return Err(TokenError::WrongIssuer(
            claims.iss.chars().take(128).collect(),
        ));
    }
    jws::check_times(now_secs, Some(claims.exp), Some(claims.nbf), 0)?;
    Ok(claims)
}
