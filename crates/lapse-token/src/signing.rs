//! Lapse's own Ed25519 signing key: loaded once from a PKCS#8 PEM file (created
//! with mode 0600 when absent), never re-parsed per request.

use crate::jwk::{Jwk, PublicKey};
use crate::{TokenError, b64};
use ed25519_dalek::Signer;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use std::path::Path;

#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    kid: String,
    public: PublicKey,
    jwk: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read signing key `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write signing key `{path}`: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("signing key `{path}` is not an Ed25519 PKCS#8 PEM private key")]
    Format { path: String },
}

impl SigningKey {
    pub fn generate() -> Self {
        use rand::RngCore;
        // The seed is the private key: wiped when it goes out of scope.
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut());
        Self::from_dalek(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    fn from_dalek(key: ed25519_dalek::SigningKey) -> Self {
        let jwk_nokid = Jwk::ed25519(key.verifying_key().as_bytes());
        // The kid is the key's own RFC 7638 thumbprint: stable and collision-free.
        let kid = crate::jwk::thumbprint(&jwk_nokid).unwrap_or_default();
        let jwk = Jwk {
            kid: Some(kid.clone()),
            alg: Some("EdDSA".into()),
            use_: Some("sig".into()),
            ..jwk_nokid
        };
        Self {
            public: PublicKey::Ed25519(key.verifying_key()),
            key,
            kid,
            jwk,
        }
    }

    /// Loads the key at `path`, generating and saving a new one (mode 0600) if the
    /// file does not exist. Returns whether it was created.
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), KeyFileError> {
        let p = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(pem) => {
                let key = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
                    .map_err(|_| KeyFileError::Format { path: p })?;
                Ok((Self::from_dalek(key), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                key.save(path)?;
                Ok((key, true))
            }
            Err(source) => Err(KeyFileError::Read { path: p, source }),
        }
    }

    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let p = path.display().to_string();
        let pem = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: p.clone(),
            source,
        })?;
        ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
            .map(Self::from_dalek)
            .map_err(|_| KeyFileError::Format { path: p })
    }

    /// Writes the key as PKCS#8 PEM, readable by the owner only.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let p = path.display().to_string();
        let pem = self
            .key
            .to_pkcs8_pem(Default::default())
            .map_err(|_| KeyFileError::Format { path: p.clone() })?;
        write_private(path, pem.as_bytes())
            .map_err(|source| KeyFileError::Write { path: p, source })
    }

    /// The private key as PKCS#8 PEM, for handing to a child process in memory (its
    /// environment) rather than on disk. `None` only if encoding fails.
    pub fn to_pkcs8_pem(&self) -> Option<String> {
        self.key
            .to_pkcs8_pem(Default::default())
            .ok()
            .map(|pem| pem.as_str().to_owned())
    }

    /// Parses a PKCS#8 PEM Ed25519 private key.
    pub fn from_pkcs8_pem(pem: &str) -> Option<Self> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .ok()
            .map(Self::from_dalek)
    }

    /// The 32-byte Ed25519 secret, for sealing under a key-encryption key. Callers
    /// must not keep or log it.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Self {
        Self::from_dalek(ed25519_dalek::SigningKey::from_bytes(bytes))
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The public JWK, with `kid`, `alg` and `use`.
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    /// Signs `claims` as a compact JWS with header `{"alg":"EdDSA","typ":typ,"kid":kid}`.
    pub fn sign_jwt<T: serde::Serialize>(
        &self,
        typ: &str,
        claims: &T,
    ) -> Result<String, TokenError> {
        let header = serde_json::json!({ "alg": "EdDSA", "typ": typ, "kid": self.kid });
        self.sign_with_header(&header, claims)
    }

    /// Signs with a caller-built header (which must say `"alg":"EdDSA"`).
    pub fn sign_with_header<T: serde::Serialize>(
        &self,
        header: &serde_json::Value,
        claims: &T,
    ) -> Result<String, TokenError> {
        let h = serde_json::to_vec(header).map_err(|_| TokenError::Malformed("header"))?;
        let c = serde_json::to_vec(claims).map_err(|_| TokenError::Malformed("claims"))?;
        let mut out = String::with_capacity(h.len() * 2 + c.len() * 2 + 90);
        out.push_str(&b64::encode(h));
        out.push('.');
        out.push_str(&b64::encode(c));
        let sig = self.sign(out.as_bytes());
        out.push('.');
        out.push_str(&b64::encode(sig));
        Ok(out)
    }
}

/// Creates (or replaces) `path` with `bytes`, mode 0600 on Unix.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
