//! An identity token (OIDC workload token or JWT-SVID) through the issuer
//! verifier: issuer lookup by `iss`, keys from a JWKS, signature, audience, times,
//! the workload template over claims.
#![no_main]

use lapse_identity::{IdentityVerifier, IssuerConfig, JwksSource};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

struct Setup {
    rt: tokio::runtime::Runtime,
    verifier: IdentityVerifier,
    _dir: tempfile::TempDir,
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = lapse_token::SigningKey::generate();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [key.jwk()] }).to_string(),
    )
    .expect("jwks");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let verifier = rt
        .block_on(IdentityVerifier::new(
            vec![IssuerConfig {
                issuer: "https://issuer.example".into(),
                jwks: JwksSource::parse(&format!("file://{}", jwks.display())).expect("source"),
                audience: "lapse".into(),
                workload: "{sub}".parse().expect("template"),
                leeway_secs: 30,
            }],
            lapse_identity::http_client(),
        ))
        .expect("verifier");
    Setup {
        rt,
        verifier,
        _dir: dir,
    }
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let s = &*SETUP;
    let r = s.rt.block_on(s.verifier.verify(token, 1_800_000_000));
    assert!(r.is_err(), "an unsigned identity token verified");
});
