//! Where an issuer's keys come from, and the parsed key set.

use lapse_token::{Jwk, PublicKey, TokenError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const MAX_JWKS_BYTES: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// `https://…`, or `http://` to a loopback address only (tests, sidecars).
    Url(url::Url),
}

impl JwksSource {
    /// Parses `file://PATH`, `https://…` or loopback `http://…`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err("`file://` needs a path".into());
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        let url = url::Url::parse(s).map_err(|e| format!("invalid JWKS URL `{s}`: {e}"))?;
        match url.scheme() {
            "https" => Ok(Self::Url(url)),
            "http" if is_loopback(&url) => Ok(Self::Url(url)),
            "http" => Err(format!(
                "JWKS URL `{s}` must use https (plain http is allowed for loopback only)"
            )),
            other => Err(format!(
                "unsupported JWKS scheme `{other}`; use file:// or https://"
            )),
        }
    }

    pub fn is_file(&self) -> bool {
        matches!(self, Self::File(_))
    }

    pub async fn fetch(&self, http: &reqwest::Client) -> Result<KeySet, String> {
        let body = match self {
            Self::File(p) => tokio::fs::read(p)
                .await
                .map_err(|e| format!("cannot read `{}`: {e}", p.display()))?,
            Self::Url(u) => {
                let resp = http
                    .get(u.clone())
                    .timeout(FETCH_TIMEOUT)
                    .send()
                    .await
                    .map_err(|e| format!("cannot fetch `{u}`: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("`{u}` answered {}", resp.status()));
                }
                let bytes = resp
                    .bytes()
                    .await
                    .map_err(|e| format!("cannot read `{u}`: {e}"))?;
                bytes.to_vec()
            }
        };
        if body.len() > MAX_JWKS_BYTES {
            return Err("JWKS document is larger than 1 MiB".into());
        }
        KeySet::parse(&body)
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// An issuer's verification keys, parsed once.
#[derive(Debug, Default, Clone)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<PublicKey>>,
    without_kid: Vec<Arc<PublicKey>>,
}

#[derive(serde::Deserialize)]
struct JwksDoc {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Parses a JWKS document. Keys not for signatures, symmetric keys and keys that do
    /// not parse are skipped (and logged); a document with no usable key is an error.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let doc: JwksDoc =
            serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut set = Self::default();
        for raw in doc.keys {
            let jwk: Jwk = match serde_json::from_value(raw) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping unreadable JWK");
                    continue;
                }
            };
            if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match PublicKey::from_jwk(&jwk) {
                Ok(k) => Arc::new(k),
                Err(e) => {
                    tracing::warn!(kid = ?jwk.kid, error = %e, "skipping unusable JWK");
                    continue;
                }
            };
            // A key that names its algorithm is used for that algorithm only.
            if let Some(alg) = &jwk.alg
                && alg != key.alg().as_str()
            {
                tracing::warn!(kid = ?jwk.kid, %alg, "skipping JWK whose `alg` does not fit its key type");
                continue;
            }
            match jwk.kid {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.without_kid.push(key),
            }
        }
        if set.is_empty() {
            return Err("JWKS document has no usable signature key".into());
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key for `kid`: `Ok(None)` when unknown (worth a refetch). A token without
    /// `kid` is accepted only when the set has exactly one key.
    pub fn select(&self, kid: Option<&str>) -> Result<Option<Arc<PublicKey>>, TokenError> {
        match kid {
            Some(k) => Ok(self.by_kid.get(k).cloned()),
            None => {
                let mut all = self.by_kid.values().chain(self.without_kid.iter());
                match (all.next(), all.next()) {
                    (Some(one), None) => Ok(Some(one.clone())),
                    (None, _) => Ok(None),
                    (Some(_), Some(_)) => Err(TokenError::AmbiguousKey),
                }
            }
        }
    }
}
