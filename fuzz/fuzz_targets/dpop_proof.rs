//! A DPoP proof header (RFC 9449) as the token endpoint receives it: JWS with an
//! embedded JWK, typ/alg checks, htm/htu/iat/ath, replay cache, key cache.
#![no_main]

use lapse_token::ReplayCache;
use lapse_token::dpop::{self, DpopRequirements, KeyCache};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static REPLAY: LazyLock<ReplayCache> = LazyLock::new(|| ReplayCache::new(10_000));
static KEYS: LazyLock<KeyCache> = LazyLock::new(KeyCache::new);

fuzz_target!(|data: &[u8]| {
    let Ok(proof) = std::str::from_utf8(data) else {
        return;
    };
    let req = DpopRequirements {
        htm: "POST",
        htu: "https://lapse.example/oauth/token",
        now_secs: 1_800_000_000,
        max_age_secs: 60,
        max_skew_secs: 5,
        access_token: Some("token"),
        keys: Some(&KEYS),
    };
    let _ = dpop::verify(proof, &req, &REPLAY);
});
