#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::type_complexity
)]
//! Identity tokens signed by an independent JWT library (jsonwebtoken), verified by Lapse.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lapse_identity::{IdentityError, IdentityVerifier, IssuerConfig, JwksSource, WorkloadTemplate};
use p256::pkcs8::EncodePrivateKey as _;
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use serde_json::json;
use std::path::Path;

const ISS: &str = "https://issuer.test";
const NOW: i64 = 1_795_000_000;

struct Keys {
    ed: (EncodingKey, serde_json::Value),
    es: (EncodingKey, serde_json::Value),
    rs: (EncodingKey, serde_json::Value),
}

fn keys() -> Keys {
    let ed = ed25519_dalek_key();
    let es_sk = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let es_pt = es_sk.public_key().to_sec1_bytes();
    let es = (
        EncodingKey::from_ec_der(
            es_sk
                .to_pkcs8_der()
                .map(|d| d.as_bytes().to_vec())
                .unwrap_or_default()
                .as_slice(),
        ),
        json!({"kty":"EC","crv":"P-256","kid":"es","x":B64.encode(&es_pt[1..33]),"y":B64.encode(&es_pt[33..65])}),
    );
    let rs_sk =
        rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap_or_else(|e| panic!("{e}"));
    let rs = (
        EncodingKey::from_rsa_der(
            rs_sk
                .to_pkcs1_der()
                .map(|d| d.as_bytes().to_vec())
                .unwrap_or_default()
                .as_slice(),
        ),
        json!({"kty":"RSA","kid":"rs","n":B64.encode(rs_sk.n().to_bytes_be()),"e":B64.encode(rs_sk.e().to_bytes_be())}),
    );
    Keys { ed, es, rs }
}

fn ed25519_dalek_key() -> (EncodingKey, serde_json::Value) {
    let k = lapse_token::SigningKey::generate();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path().join("k.pem");
    k.save(&p).unwrap_or_else(|e| panic!("{e}"));
    let pem = std::fs::read(&p).unwrap_or_default();
    let mut jwk = serde_json::to_value(k.jwk()).unwrap_or_default();
    jwk["kid"] = json!("ed");
    (
        EncodingKey::from_ed_pem(&pem).unwrap_or_else(|e| panic!("{e}")),
        jwk,
    )
}

fn write_jwks(path: &Path, keys: &[&serde_json::Value]) {
    std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap_or_else(|e| panic!("{e}"));
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"iss": ISS, "sub": sub, "aud": "lapse", "exp": NOW + 300, "iat": NOW, "nbf": NOW - 5, "repo": "acme/shop"})
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, key).unwrap_or_else(|e| panic!("{e}"))
}

async fn verifier(jwks: &Path, template: &str) -> IdentityVerifier {
    IdentityVerifier::new(
        vec![IssuerConfig {
            issuer: ISS.into(),
            jwks: JwksSource::File(jwks.to_owned()),
            audience: "lapse".into(),
            workload: template.parse::<WorkloadTemplate>().unwrap_or_default(),
            leeway_secs: 10,
        }],
        lapse_identity::http_client(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .with_min_refresh(std::time::Duration::ZERO)
}

#[tokio::test]
async fn eddsa_es256_and_rs256_tokens_verify() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&k.ed.1, &k.es.1, &k.rs.1]);
    let v = verifier(&jwks, "spiffe://ci.test/{repo}").await;
    for (alg, kid, key) in [
        (Algorithm::EdDSA, "ed", &k.ed.0),
        (Algorithm::ES256, "es", &k.es.0),
        (Algorithm::RS256, "rs", &k.rs.0),
    ] {
        let id = v
            .verify(&sign(alg, kid, key, &claims("job-1")), NOW)
            .await
            .unwrap_or_else(|e| panic!("{kid}: {e}"));
        assert_eq!(id.id, "spiffe://ci.test/acme/shop");
        assert_eq!(id.subject, "job-1");
        assert_eq!(id.claims.get("repo").map(String::as_str), Some("acme/shop"));
    }
}

#[tokio::test]
async fn hostile_and_invalid_tokens_are_refused() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&k.ed.1, &k.rs.1]);
    let v = verifier(&jwks, "{sub}").await;
    let good = sign(Algorithm::EdDSA, "ed", &k.ed.0, &claims("spiffe://x/y"));
    assert!(v.verify(&good, NOW).await.is_ok());

    // alg: none
    let (h, rest) = good.split_once('.').unwrap_or_default();
    let _ = h;
    let none_header = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = rest.split_once('.').map(|(p, _)| p).unwrap_or_default();
    let err = v
        .verify(&format!("{none_header}.{payload}."), NOW)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("unsupported algorithm `none`"), "{err}");

    // HS256 keyed with the RSA public key's bytes (the classic confusion attack).
    let n = k.rs.1["n"].as_str().unwrap_or_default().to_owned();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rs".into());
    let hs = jsonwebtoken::encode(
        &h,
        &claims("spiffe://x/y"),
        &EncodingKey::from_secret(n.as_bytes()),
    )
    .unwrap_or_default();
    let err = v
        .verify(&hs, NOW)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("unsupported algorithm `HS256`"), "{err}");

    // RS256 header on the Ed25519 key id.
    let err = v
        .verify(&sign(Algorithm::RS256, "ed", &k.rs.0, &claims("a")), NOW)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("does not match the key"), "{err}");

    // Unknown kid.
    assert!(matches!(
        v.verify(&sign(Algorithm::ES256, "es", &k.es.0, &claims("a")), NOW)
            .await,
        Err(IdentityError::Token(_))
    ));

    // Issuer not configured.
    let mut c = claims("a");
    c["iss"] = json!("https://evil.test");
    assert!(matches!(
        v.verify(&sign(Algorithm::EdDSA, "ed", &k.ed.0, &c), NOW)
            .await,
        Err(IdentityError::UnknownIssuer(_))
    ));

    // Wrong audience.
    let mut c = claims("a");
    c["aud"] = json!(["other"]);
    assert!(matches!(
        v.verify(&sign(Algorithm::EdDSA, "ed", &k.ed.0, &c), NOW)
            .await,
        Err(IdentityError::WrongAudience(_))
    ));

    // Expired beyond leeway, and within it.
    assert!(v.verify(&good, NOW + 311).await.is_err());
    let fresh = sign(Algorithm::EdDSA, "ed", &k.ed.0, &{
        let mut c = claims("b");
        c["exp"] = json!(NOW - 5);
        c
    });
    assert!(
        v.verify(&fresh, NOW).await.is_ok(),
        "5 s past exp is inside the 10 s leeway"
    );
    // Not yet valid.
    let mut c = claims("a");
    c["nbf"] = json!(NOW + 60);
    assert!(
        v.verify(&sign(Algorithm::EdDSA, "ed", &k.ed.0, &c), NOW)
            .await
            .is_err()
    );

    // Tampered payload.
    let mut parts: Vec<&str> = good.split('.').collect();
    let evil = B64.encode(claims("spiffe://x/admin").to_string());
    parts[1] = &evil;
    assert!(v.verify(&parts.join("."), NOW).await.is_err());
}

#[tokio::test]
async fn unknown_kid_refetches_the_jwks() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&k.ed.1]);
    let v = verifier(&jwks, "{sub}").await;
    let token = sign(Algorithm::ES256, "es", &k.es.0, &claims("a"));
    assert!(v.verify(&token, NOW).await.is_err());
    // The issuer rotates in a new key; the next token with that kid triggers a refetch.
    write_jwks(&jwks, &[&k.ed.1, &k.es.1]);
    assert!(v.verify(&token, NOW).await.is_ok());
}

/// Issue 28 (6b): an `iat` a year ahead passed. A token issued in the future is
/// refused beyond the issuer's leeway (10 s here), within it accepted; `iat`
/// that is not a number is refused too, and a token without `iat` still passes
/// (JWT-SVIDs need not carry one).
#[tokio::test]
async fn iat_in_the_future_is_refused_beyond_the_leeway() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&k.ed.1]);
    let v = verifier(&jwks, "{sub}").await;
    let with_iat = |sub: &str, iat: serde_json::Value| {
        let mut c = claims(sub);
        c["iat"] = iat;
        sign(Algorithm::EdDSA, "ed", &k.ed.0, &c)
    };
    let year_ahead = with_iat("a", json!(NOW + 365 * 24 * 3600));
    let err = v.verify(&year_ahead, NOW).await.err();
    assert!(
        matches!(err, Some(IdentityError::IssuedInFuture { .. })),
        "{err:?}"
    );
    assert_eq!(err.map(|e| e.reason()), Some("issued_in_future"));
    assert!(
        v.verify(&with_iat("b", json!(NOW + 11)), NOW)
            .await
            .is_err()
    );
    assert!(v.verify(&with_iat("c", json!(NOW + 10)), NOW).await.is_ok());
    assert!(v.verify(&with_iat("d", json!("soon")), NOW).await.is_err());
    let mut c = claims("e");
    c.as_object_mut().unwrap().remove("iat");
    assert!(
        v.verify(&sign(Algorithm::EdDSA, "ed", &k.ed.0, &c), NOW)
            .await
            .is_ok()
    );
}

/// What a refusal may name in logs and audit: the claimed issuer and `kid`,
/// read without trusting them, clipped, never the token.
#[tokio::test]
async fn refusals_name_their_reason_issuer_and_kid() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&k.ed.1, &k.rs.1]);
    let v = verifier(&jwks, "{sub}").await;
    // A good token's header and claims with a signature nobody made.
    let forged = sign(Algorithm::EdDSA, "ed", &k.ed.0, &claims("a"))
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".")
        + "."
        + &B64.encode([7u8; 64]);
    let err = v.verify(&forged, NOW).await.err().unwrap();
    assert_eq!(err.reason(), "bad_signature", "{err}");
    let origin = lapse_identity::claimed_origin(&forged);
    assert_eq!(origin.issuer.as_deref(), Some(ISS));
    assert_eq!(origin.kid.as_deref(), Some("ed"));

    let mut c = claims("a");
    c["iss"] = json!("https://evil.test/".to_owned() + &"x".repeat(500));
    let foreign = sign(Algorithm::EdDSA, "ed", &k.ed.0, &c);
    let err = v.verify(&foreign, NOW).await.err().unwrap();
    assert_eq!(err.reason(), "unknown_issuer");
    let origin = lapse_identity::claimed_origin(&foreign);
    assert!(origin.issuer.unwrap().len() <= 128);
    assert_eq!(lapse_identity::claimed_origin("not a jwt").issuer, None);
    let expired = {
        let mut c = claims("a");
        c["exp"] = json!(NOW - 100);
        sign(Algorithm::EdDSA, "ed", &k.ed.0, &c)
    };
    assert_eq!(
        v.verify(&expired, NOW).await.err().unwrap().reason(),
        "expired"
    );
}
