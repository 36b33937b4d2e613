//! A Lapse access token as a gate or introspection receives it: JWS parsing,
//! header checks, signature, claims. Any input: an error or a verified token,
//! never a panic; and nothing but a real signature verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static KEY: LazyLock<lapse_token::SigningKey> = LazyLock::new(lapse_token::SigningKey::generate);

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let public = KEY.public().clone();
    let kid = KEY.kid().to_owned();
    let r = lapse_token::access::verify(
        token,
        |k| (k == kid).then_some(&public),
        "https://lapse.example",
        1_800_000_000,
    );
    // The key is made here and never signs anything the fuzzer could copy.
    assert!(r.is_err(), "an unsigned input verified: {token}");
});
