//! TTL math. The one place where a credential's lifetime is decided:
//! `min(requested, policy cap, server max_ttl)`, never past the grant's maximum lifetime.

use crate::clock::Timestamp;

/// The lifetime a new credential gets. Every input is a ceiling; the result is the
/// lowest of them. A zero result means no credential may be issued.
pub fn effective_ttl_secs(requested: u64, policy_cap: Option<u64>, server_max: u64) -> u64 {
    let mut ttl = requested.min(server_max);
    if let Some(cap) = policy_cap {
        ttl = ttl.min(cap);
    }
    ttl
}

/// The expiry of a credential issued at `now` for `ttl_secs`, never beyond `max_expires_at`.
pub fn expiry(now: Timestamp, ttl_secs: u64, max_expires_at: Timestamp) -> Timestamp {
    now.plus_secs(ttl_secs).min(max_expires_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_the_lowest_ceiling() {
        for requested in [0u64, 1, 60, 900, 3600, u64::MAX] {
            for cap in [None, Some(0), Some(30), Some(600), Some(u64::MAX)] {
                for max in [0u64, 60, 900, 86_400] {
                    let ttl = effective_ttl_secs(requested, cap, max);
                    assert!(ttl <= requested);
                    assert!(ttl <= max);
                    if let Some(c) = cap {
                        assert!(ttl <= c);
                    }
                    let lowest = [requested, max, cap.unwrap_or(u64::MAX)]
                        .into_iter()
                        .min()
                        .unwrap_or(0);
                    assert_eq!(ttl, lowest);
                }
            }
        }
    }

    #[test]
    fn expiry_never_passes_the_lifetime_cap() {
        let now = Timestamp::from_unix_seconds(1000);
        let max = Timestamp::from_unix_seconds(1300);
        assert_eq!(expiry(now, 60, max), Timestamp::from_unix_seconds(1060));
        assert_eq!(expiry(now, 600, max), max);
        assert_eq!(expiry(now, u64::MAX, max), max);
    }
}
