//! JSON Web Keys: parsing public keys once into ready-to-verify form, and RFC 7638
//! thumbprints.

use crate::TokenError;
use crate::alg::Alg;
use crate::b64;
use serde::{Deserialize, Serialize};

/// A JWK as it appears in a JWKS document or a DPoP header. Only public members
/// are modelled; a key that carries private members (`d`, `p`, …) is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// Present only in private keys; its presence makes the key unusable here.
    #[serde(default, skip_serializing)]
    pub d: Option<String>,
}

impl Jwk {
    /// The public JWK of an Ed25519 key with public bytes `x`, no other members.
    pub fn ed25519(x: &[u8]) -> Self {
        Self {
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: Some(b64::encode(x)),
            y: None,
            n: None,
            e: None,
            kid: None,
            alg: None,
            use_: None,
            d: None,
        }
    }
}

/// A public key parsed once, ready to verify. Never re-parsed per request.
#[derive(Clone)]
pub enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
    Rsa(Box<rsa::pkcs1v15::VerifyingKey<sha2::Sha256>>),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ed25519(_) => "PublicKey::Ed25519",
            Self::P256(_) => "PublicKey::P256",
            Self::Rsa(_) => "PublicKey::Rsa",
        })
    }
}

const MIN_RSA_BITS: usize = 2048;

impl PublicKey {
    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self {
            Self::Ed25519(_) => Alg::EdDSA,
            Self::P256(_) => Alg::ES256,
            Self::Rsa(_) => Alg::RS256,
        }
    }

    pub fn from_jwk(jwk: &Jwk) -> Result<Self, TokenError> {
        if jwk.d.is_some() {
            return Err(TokenError::InvalidKey(
                "a private key was given where a public key belongs".into(),
            ));
        }
        let field = |v: &Option<String>, name: &str| -> Result<Vec<u8>, TokenError> {
            v.as_deref()
                .and_then(b64::decode)
                .ok_or_else(|| TokenError::InvalidKey(format!("missing or invalid `{name}`")))
        };
        match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("OKP", Some("Ed25519")) => {
                let x: [u8; 32] = field(&jwk.x, "x")?
                    .try_into()
                    .map_err(|_| TokenError::InvalidKey("Ed25519 `x` must be 32 bytes".into()))?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&x)
                    .map_err(|_| TokenError::InvalidKey("invalid Ed25519 point".into()))?;
                // A small-order key verifies signatures nobody made; `verify_strict`
                // refuses them, and batch verification (jws::verify_many) relies on
                // their never getting that far.
                if key.is_weak() {
                    return Err(TokenError::InvalidKey("Ed25519 key of small order".into()));
                }
                Ok(Self::Ed25519(key))
            }
            ("EC", Some("P-256")) => {
                let x = field(&jwk.x, "x")?;
                let y = field(&jwk.y, "y")?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(TokenError::InvalidKey(
                        "P-256 coordinates must be 32 bytes".into(),
                    ));
                }
                // SEC1 uncompressed point: 0x04 || x || y.
                let mut sec1 = Vec::with_capacity(65);
                sec1.push(0x04);
                sec1.extend_from_slice(&x);
                sec1.extend_from_slice(&y);
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map(Self::P256)
                    .map_err(|_| TokenError::InvalidKey("invalid P-256 point".into()))
            }
            ("RSA", _) => {
                let n = rsa::BigUint::from_bytes_be(&field(&jwk.n, "n")?);
                let e = rsa::BigUint::from_bytes_be(&field(&jwk.e, "e")?);
                let key = rsa::RsaPublicKey::new(n, e)
                    .map_err(|e| TokenError::InvalidKey(format!("invalid RSA key: {e}")))?;
                if rsa::traits::PublicKeyParts::size(&key) * 8 < MIN_RSA_BITS {
                    return Err(TokenError::InvalidKey(format!(
                        "RSA keys must have at least {MIN_RSA_BITS} bits"
                    )));
                }
                Ok(Self::Rsa(Box::new(rsa::pkcs1v15::VerifyingKey::new(key))))
            }
            (kty, crv) => Err(TokenError::InvalidKey(format!(
                "unsupported key type `{kty}`{}",
                crv.map(|c| format!(" on curve `{c}`")).unwrap_or_default()
            ))),
        }
    }

    /// Verifies `signature` over `message` with this key's algorithm.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), TokenError> {
        use p256::ecdsa::signature::Verifier;
        let ok = match self {
            Self::Ed25519(k) => ed25519_dalek::Signature::from_slice(signature)
                .map(|s| k.verify_strict(message, &s).is_ok())
                .unwrap_or(false),
            Self::P256(k) => p256::ecdsa::Signature::from_slice(signature)
                .map(|s| k.verify(message, &s).is_ok())
                .unwrap_or(false),
            Self::Rsa(k) => rsa::pkcs1v15::Signature::try_from(signature)
                .map(|s| k.verify(message, &s).is_ok())
                .unwrap_or(false),
        };
        if ok {
            Ok(())
        } else {
            Err(TokenError::BadSignature)
        }
    }
}

/// RFC 7638 JWK thumbprint (SHA-256, base64url) over the required members in
/// lexicographic order. The key must already have parsed as a [`PublicKey`].
pub fn thumbprint(jwk: &Jwk) -> Result<String, TokenError> {
    let s = |v: &Option<String>| -> Result<String, TokenError> {
        let v = v
            .as_deref()
            .ok_or(TokenError::InvalidKey("missing member".into()))?;
        serde_json::to_string(v).map_err(|e| TokenError::InvalidKey(e.to_string()))
    };
    let canonical = match jwk.kty.as_str() {
        "OKP" => format!(
            r#"{{"crv":{},"kty":"OKP","x":{}}}"#,
            s(&jwk.crv)?,
            s(&jwk.x)?
        ),
        "EC" => format!(
            r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
            s(&jwk.crv)?,
            s(&jwk.x)?,
            s(&jwk.y)?
        ),
        "RSA" => format!(r#"{{"e":{},"kty":"RSA","n":{}}}"#, s(&jwk.e)?, s(&jwk.n)?),
        other => {
            return Err(TokenError::InvalidKey(format!(
                "unsupported key type `{other}`"
            )));
        }
    };
    Ok(b64::sha256(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of RFC 7638 section 3.1.
    #[test]
    fn rfc7638_example_thumbprint() -> Result<(), TokenError> {
        let jwk = Jwk {
            kty: "RSA".into(),
            n: Some("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".into()),
            e: Some("AQAB".into()),
            crv: None, x: None, y: None, kid: Some("2011-04-29".into()), alg: Some("RS256".into()), use_: None, d: None,
        };
        assert_eq!(
            thumbprint(&jwk)?,
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        assert!(PublicKey::from_jwk(&jwk).is_ok());
        Ok(())
    }

    #[test]
    fn private_and_small_keys_are_refused() {
        let mut jwk = Jwk {
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: Some("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into()),
            y: None,
            n: None,
            e: None,
            kid: None,
            alg: None,
            use_: None,
            d: Some("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A".into()),
        };
        assert!(PublicKey::from_jwk(&jwk).is_err());
        jwk.d = None;
        assert!(PublicKey::from_jwk(&jwk).is_ok());
        let small = Jwk {
            kty: "RSA".into(),
            n: Some(b64::encode([0xc3u8; 128])),
            e: Some("AQAB".into()),
            crv: None,
            x: None,
            y: None,
            kid: None,
            alg: None,
            use_: None,
            d: None,
        };
        assert!(PublicKey::from_jwk(&small).is_err());
        let oct = Jwk {
            kty: "oct".into(),
            crv: None,
            x: None,
            y: None,
            n: None,
            e: None,
            kid: None,
            alg: None,
            use_: None,
            d: None,
        };
        assert!(PublicKey::from_jwk(&oct).is_err());
    }
}
