//! base64url without padding, as JOSE uses it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// SHA-256 of `bytes`, base64url: `ath`, `jkt` and `x5t#S256` all take this form.
pub fn sha256(bytes: impl AsRef<[u8]>) -> String {
    use sha2::Digest;
    encode(sha2::Sha256::digest(bytes.as_ref()))
}
