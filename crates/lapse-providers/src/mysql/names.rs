//! Generated user names: `<prefix>_<grant id in 26 base32 characters>`.
//!
//! A grant id prints as `gr_` + 32 hex digits (35 characters). MySQL allows
//! user names of 32 characters (MariaDB 10.6+: 128), so the name carries the
//! same 128 bits in lowercase base32 (RFC 4648 alphabet, no padding): 26
//! characters, deterministic, unique per grant, and time-ordered like the id.
//! With the default prefix `lapse` a name is exactly 32 characters.

use lapse_core::GrantId;

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Characters of [`compact`]'s output.
pub const COMPACT_CHARS: usize = 26;

/// The grant id's 128 bits in 26 base32 characters.
pub fn compact(grant: GrantId) -> String {
    let shown = grant.to_string();
    let Some(bits) = shown
        .strip_prefix("gr_")
        .and_then(|hex| u128::from_str_radix(hex, 16).ok())
    else {
        // INVARIANT: `GrantId` always prints as `gr_` + 32 hex digits. Were that
        // to change, the printed id is still unique (only longer).
        return shown;
    };
    (0..COMPACT_CHARS)
        .rev()
        .map(|i| {
            let digit = ((bits >> (5 * i)) & 31) as u8;
            ALPHABET
                .get(usize::from(digit))
                .map_or('?', |b| char::from(*b))
        })
        .collect()
}

/// The grant whose [`compact`] form `s` is.
pub fn expand(s: &str) -> Option<GrantId> {
    if s.len() != COMPACT_CHARS {
        return None;
    }
    let mut bits: u128 = 0;
    for b in s.bytes() {
        let digit = ALPHABET.iter().position(|a| *a == b)?;
        bits = bits
            .checked_mul(32)?
            .checked_add(u128::try_from(digit).ok()?)?;
    }
    format!("gr_{bits:032x}").parse().ok()
}

/// Whether `name` is shaped like a name generated with `prefix`.
pub fn is_generated(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|tail| expand(tail).is_some())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compact_names_round_trip_and_fit_mysql() {
        for _ in 0..100 {
            let g = GrantId::generate();
            let c = compact(g);
            assert_eq!(c.len(), COMPACT_CHARS);
            assert!(c.bytes().all(|b| ALPHABET.contains(&b)), "{c}");
            assert_eq!(expand(&c), Some(g));
            let name = format!("lapse_{c}");
            assert_eq!(name.len(), 32, "MySQL's limit");
            assert!(is_generated("lapse", &name));
            assert!(!is_generated("laps", &name));
        }
        let zero: GrantId = "gr_00000000000000000000000000000000".parse().unwrap();
        assert_eq!(compact(zero), "a".repeat(26));
        let max: GrantId = "gr_ffffffffffffffffffffffffffffffff".parse().unwrap();
        assert_eq!(compact(max), format!("h{}", "7".repeat(25)));
        assert_eq!(expand(&compact(max)), Some(max));
    }

    #[test]
    fn only_generated_shapes_are_recognised() {
        assert!(!is_generated("lapse", "lapse_alice"));
        assert!(!is_generated("lapse", "lapse"));
        assert!(!is_generated("lapse", &format!("lapse_{}", "A".repeat(26))));
        assert!(!is_generated("lapse", &format!("lapse_{}", "a".repeat(27))));
        // 26 characters whose first one would need more than 128 bits.
        assert!(!is_generated("lapse", &format!("lapse_{}", "7".repeat(26))));
        assert!(is_generated("lapse", &format!("lapse_{}", "a".repeat(26))));
    }
}
