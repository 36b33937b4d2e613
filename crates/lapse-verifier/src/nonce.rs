//! RFC 9449 section 8 server-provided DPoP nonces, made by one verifier and good
//! only there. Each gate process holds its own random key, so a proof carrying one
//! gate's nonce is refused by every other: a proof captured on its way to gate A
//! cannot be replayed to gate B (A's own replay cache already refuses it twice).
//! Without nonces, each gate's replay cache is its own and a proof is accepted once
//! per gate within `dpop_max_age`.
//!
//! A nonce is stateless: `base64url(window || HMAC-SHA256(key, window)[..16])`, the
//! window being unix seconds / [`WINDOW_SECS`]. It is accepted in its window and the
//! next, so it lives 30 to 60 s; a client gets a fresh one in `DPoP-Nonce` on every
//! answer and on the `use_dpop_nonce` refusal.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long one nonce window lasts.
pub const WINDOW_SECS: i64 = 30;
const TAG_LEN: usize = 16;

pub struct NonceKey {
    key: [u8; 32],
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

impl NonceKey {
    /// A key of this process's own.
    pub fn generate() -> Self {
        Self {
            key: rand::random(),
        }
    }

    fn tag(&self, window: i64) -> Option<[u8; TAG_LEN]> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        mac.update(&window.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(full.get(..TAG_LEN)?);
        Some(tag)
    }

    /// The nonce to hand out at `now_secs`.
    pub fn issue(&self, now_secs: i64) -> String {
        let window = now_secs.div_euclid(WINDOW_SECS);
        let mut raw = window.to_be_bytes().to_vec();
        raw.extend_from_slice(&self.tag(window).unwrap_or_default());
        lapse_token::b64::encode(&raw)
    }

    /// Whether `nonce` was issued by this key in the current window or the one
    /// before (compared in constant time).
    pub fn accepts(&self, nonce: &str, now_secs: i64) -> bool {
        let Some(raw) = lapse_token::b64::decode(nonce) else {
            return false;
        };
        let (Some(w), Some(tag)) = (raw.get(..8), raw.get(8..)) else {
            return false;
        };
        let Ok(w) = <[u8; 8]>::try_from(w) else {
            return false;
        };
        let window = i64::from_be_bytes(w);
        let current = now_secs.div_euclid(WINDOW_SECS);
        if window != current && window != current - 1 {
            return false;
        }
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return false;
        };
        mac.update(&window.to_be_bytes());
        tag.len() == TAG_LEN && mac.verify_truncated_left(tag).is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_good_for_its_window_and_the_next_at_its_own_key_only() {
        let (a, b) = (NonceKey::generate(), NonceKey::generate());
        let t = 1_800_000_000;
        let n = a.issue(t);
        assert!(a.accepts(&n, t));
        assert!(a.accepts(&n, t + WINDOW_SECS));
        assert!(!a.accepts(&n, t + 2 * WINDOW_SECS + 1), "expired");
        assert!(!a.accepts(&n, t - WINDOW_SECS - 1), "from the future");
        assert!(!b.accepts(&n, t), "another gate's nonce");
        let mut raw = lapse_token::b64::decode(&n).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        assert!(!a.accepts(&lapse_token::b64::encode(&raw), t), "altered");
        for junk in ["", "!!", "AAAA", &"A".repeat(400)] {
            assert!(!a.accepts(junk, t), "{junk}");
        }
    }
}
