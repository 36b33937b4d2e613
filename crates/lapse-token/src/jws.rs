//! Compact JWS: parse into [`Unverified`], verify into bytes you may trust.

pub use crate::alg::Alg;
use crate::jwk::{Jwk, PublicKey};
use crate::{TokenError, b64};
use serde::Deserialize;

/// The JOSE header members Lapse reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default)]
    pub typ: Option<String>,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub jwk: Option<Jwk>,
    #[serde(default)]
    pub crit: Option<Vec<String>>,
}

/// The largest compact JWS Lapse will look at.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A parsed but unverified compact JWS. Nothing in it may be trusted except for
/// choosing which key to verify it with.
#[derive(Debug)]
pub struct Unverified<'a> {
    pub header: Header,
    pub alg: Alg,
    signing_input: &'a str,
    payload_b64: &'a str,
    signature: Vec<u8>,
}

impl<'a> Unverified<'a> {
    pub fn parse(token: &'a str) -> Result<Self, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("token too long"));
        }
        let (signing_input, sig_b64) = token
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("not a compact JWS"))?;
        let (header_b64, payload_b64) = signing_input
            .split_once('.')
            .ok_or(TokenError::Malformed("not a compact JWS"))?;
        if payload_b64.contains('.') {
            return Err(TokenError::Malformed(
                "encrypted tokens (JWE) are not accepted",
            ));
        }
        let header_bytes =
            b64::decode(header_b64).ok_or(TokenError::Malformed("header is not base64url"))?;
        let header: Header = serde_json::from_slice(&header_bytes)
            .map_err(|_| TokenError::Malformed("header is not a JSON object"))?;
        // RFC 7515 4.1.11: a `crit` we do not understand makes the token invalid.
        if header.crit.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(TokenError::Malformed("unsupported critical header"));
        }
        let alg = Alg::parse(&header.alg)?;
        let signature =
            b64::decode(sig_b64).ok_or(TokenError::Malformed("signature is not base64url"))?;
        Ok(Self {
            header,
            alg,
            signing_input,
            payload_b64,
            signature,
        })
    }

    /// The payload *before* verification, only for choosing which issuer's keys to
    /// verify with. Never act on it otherwise.
    pub fn untrusted_payload(&self) -> Option<Vec<u8>> {
        b64::decode(self.payload_b64)
    }

    /// Verifies with `key`; the header's `alg` must be the key's algorithm.
    pub fn verify(self, key: &PublicKey) -> Result<Vec<u8>, TokenError> {
        self.algorithm_matches(key)?;
        key.verify(self.signing_input.as_bytes(), &self.signature)?;
        self.payload()
    }

    fn algorithm_matches(&self, key: &PublicKey) -> Result<(), TokenError> {
        if self.alg == key.alg() {
            Ok(())
        } else {
            Err(TokenError::AlgorithmMismatch {
                alg: self.header.alg.clone(),
                key: key.alg().as_str(),
            })
        }
    }

    fn payload(&self) -> Result<Vec<u8>, TokenError> {
        b64::decode(self.payload_b64).ok_or(TokenError::Malformed("payload is not base64url"))
    }
}

/// [`Unverified::verify`] for many tokens at once, answers in the same order.
///
/// Ed25519 signatures are checked together with ed25519-dalek's batch verification
/// (one multiscalar multiplication, about half the cost per signature of checking
/// them one by one: BENCHMARKS.md, "Ed25519 in batches"). If the batch fails, every
/// signature in it is checked alone with `verify_strict`, so one bad signature
/// costs its batch the time of a batch but never makes a good one fail.
///
/// What a batch accepts differs from `verify_strict` only for signatures that the
/// holder of the private key made on purpose: a small-order `R`, or an `R` with a
/// small-order component, passes the batch's randomised equation with some
/// probability where `verify_strict` refuses it. Nobody without the private key
/// can make such a signature any more than a valid one, and small-order (weak) keys
/// never get here: [`PublicKey::from_jwk`] refuses them. So a batch proves
/// possession of the key exactly as one verification does.
pub fn verify_many(items: &[(&Unverified<'_>, &PublicKey)]) -> Vec<Result<Vec<u8>, TokenError>> {
    // `None`: in the Ed25519 batch, answered once the batch is checked.
    let mut answers: Vec<Option<Result<Vec<u8>, TokenError>>> = Vec::with_capacity(items.len());
    let mut messages: Vec<&[u8]> = Vec::new();
    let mut signatures = Vec::new();
    let mut keys = Vec::new();
    for (u, key) in items {
        if let Err(e) = u.algorithm_matches(key) {
            answers.push(Some(Err(e)));
        } else if let PublicKey::Ed25519(k) = *key
            && let Ok(sig) = ed25519_dalek::Signature::from_slice(&u.signature)
        {
            messages.push(u.signing_input.as_bytes());
            signatures.push(sig);
            keys.push(*k);
            answers.push(None);
        } else {
            answers.push(Some(alone(u, key)));
        }
    }
    let batch_holds =
        messages.len() > 1 && ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok();
    items
        .iter()
        .zip(answers)
        .map(|((u, key), answer)| match answer {
            Some(done) => done,
            None if batch_holds => u.payload(),
            None => alone(u, key),
        })
        .collect()
}

fn alone(u: &Unverified<'_>, key: &PublicKey) -> Result<Vec<u8>, TokenError> {
    key.verify(u.signing_input.as_bytes(), &u.signature)?;
    u.payload()
}

/// Reads claims JSON into `T`.
pub fn claims<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, TokenError> {
    serde_json::from_slice(payload)
        .map_err(|_| TokenError::Malformed("claims are not the expected JSON object"))
}

/// Checks `exp` and `nbf` against `now_secs` with `leeway` seconds of tolerance.
pub fn check_times(
    now_secs: i64,
    exp: Option<i64>,
    nbf: Option<i64>,
    leeway: i64,
) -> Result<(), TokenError> {
    let exp = exp.ok_or(TokenError::MissingClaim("exp"))?;
    if now_secs >= exp.saturating_add(leeway) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = nbf
        && now_secs.saturating_add(leeway) < nbf
    {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}
