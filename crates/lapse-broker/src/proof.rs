//! DPoP proofs at the broker (RFC 9449): one proof per request, verified against
//! the request's method and URL, and spent in the store by the commit that acts
//! on it so no replica acts on it twice.

use crate::broker::Lapse;
use crate::error::BrokerError;
use lapse_token::dpop::{self, DpopRequirements};
use lapse_token::{DpopProof, TokenError};
use sha2::Digest;

/// How far in the future a DPoP proof's `iat` may be.
pub(crate) const DPOP_MAX_SKEW_SECS: i64 = 5;

impl Lapse {
    /// Verifies the single DPoP header of a request to `path` with method `htm`.
    pub fn verify_dpop(
        &self,
        headers: &[&str],
        htm: &str,
        path: &str,
        access_token: Option<&str>,
    ) -> Result<DpopProof, BrokerError> {
        let proof = match headers {
            [one] => *one,
            [] => {
                return Err(BrokerError::InvalidDpopProof(
                    "a `DPoP` header with a proof is required".into(),
                ));
            }
            _ => {
                return Err(BrokerError::InvalidDpopProof(
                    "exactly one `DPoP` header is allowed".into(),
                ));
            }
        };
        let htu = format!("{}{}", self.issuer, path);
        let req = DpopRequirements {
            keys: Some(&self.proof_keys),
            htm,
            htu: &htu,
            now_secs: self.now().unix_seconds(),
            max_age_secs: i64::try_from(self.cfg.dpop_max_age.secs()).unwrap_or(60),
            max_skew_secs: DPOP_MAX_SKEW_SECS,
            access_token,
        };
        dpop::verify(proof, &req, &self.replay).map_err(|e| match e {
            TokenError::ReplayCacheFull => BrokerError::Unavailable(
                "DPoP replay protection is saturated; failing closed".into(),
            ),
            other => BrokerError::InvalidDpopProof(other.to_string()),
        })
    }

    /// The proof's `jti` as spent in the store: the commit that acts on the proof
    /// fails if any replica already acted on it. Kept until the proof is too old to
    /// be accepted anyway.
    pub(crate) fn nonce(&self, proof: &DpopProof) -> lapse_store::Nonce {
        let value = hex::encode(sha2::Sha256::digest(format!(
            "{}\n{}",
            proof.jkt, proof.jti
        )));
        let max_age = i64::try_from(self.cfg.dpop_max_age.secs()).unwrap_or(60);
        lapse_store::Nonce {
            value,
            // Kept a minute past acceptance: replicas' clocks (and the pruning
            // leader's) may disagree by that much without reopening a replay window.
            expires_at: proof
                .iat
                .saturating_add(max_age)
                .saturating_add(DPOP_MAX_SKEW_SECS)
                .saturating_add(60)
                .saturating_mul(1000),
        }
    }
}
