//! Remembers DPoP proof `jti`s until they could no longer pass the `iat` window, so
//! a captured proof cannot be replayed.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

const SHARDS: usize = 32;
/// How often (seconds) a shard forgets expired entries, at the next insert.
const PRUNE_EVERY_SECS: i64 = 10;

#[derive(Debug, Default)]
struct Shard {
    /// Keyed by the SHA-256 of the key, held inline: no allocation per proof
    /// that lives for the whole window among the requests' short-lived ones
    /// (which kept the allocator from giving memory back), and a fixed size per
    /// entry whatever the `jti` a client sends.
    map: HashMap<[u8; 32], i64>,
    pruned_at: i64,
}

/// A sharded set of `jti`s with expiry. Bounded: when full of live entries it refuses
/// new ones (the caller fails closed) rather than forgetting live ones. Expired
/// entries are forgotten every few seconds, so memory follows the live window, not
/// the capacity.
#[derive(Debug)]
pub struct ReplayCache {
    shards: Vec<Mutex<Shard>>,
    max_per_shard: usize,
    /// Keyed per process: which shard a `jti` lands in cannot be predicted from
    /// outside (no flooding one shard to make it refuse).
    hasher: std::collections::hash_map::RandomState,
}

/// What happened when a `jti` was offered.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Replay,
    Full,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            max_per_shard: (capacity / SHARDS).max(16),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Records `key` as used until `expires_secs`; says whether it was already used.
    pub fn check_and_insert(&self, key: &str, expires_secs: i64, now_secs: i64) -> Seen {
        // The shard is a pure function of the key within this process.
        let idx = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        let Some(shard) = self.shards.get(idx) else {
            return Seen::Full;
        };
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut shard = match shard.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(&exp) = shard.map.get(&digest)
            && exp > now_secs
        {
            return Seen::Replay;
        }
        if now_secs.saturating_sub(shard.pruned_at) >= PRUNE_EVERY_SECS {
            // Rebuilt, not only retained: see `lapse_core::table`.
            lapse_core::table::prune(&mut shard.map, |_, exp| *exp > now_secs);
            shard.pruned_at = now_secs;
        } else if shard.map.len() >= self.max_per_shard {
            // Full between sweeps (a flood): make room without rebuilding the
            // table on every insert; the next sweep rebuilds it.
            shard.map.retain(|_, exp| *exp > now_secs);
        }
        if shard.map.len() >= self.max_per_shard {
            return Seen::Full;
        }
        shard.map.insert(digest, expires_secs);
        Seen::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_seen_until_expiry() {
        let c = ReplayCache::new(1024);
        assert_eq!(c.check_and_insert("a", 100, 10), Seen::New);
        assert_eq!(c.check_and_insert("a", 100, 50), Seen::Replay);
        assert_eq!(
            c.check_and_insert("a", 200, 100),
            Seen::New,
            "expired entries may be reused"
        );
    }

    #[test]
    fn expired_entries_are_forgotten_as_time_passes() {
        let c = ReplayCache::new(1_000_000);
        for i in 0..10_000 {
            assert_eq!(c.check_and_insert(&format!("k{i}"), 60, 0), Seen::New);
        }
        let live = |c: &ReplayCache| -> usize {
            c.shards
                .iter()
                .map(|s| s.lock().map(|s| s.map.len()).unwrap_or(0))
                .sum()
        };
        assert_eq!(live(&c), 10_000);
        // Later inserts prune each shard they touch once its entries have expired.
        for i in 0..1_000 {
            c.check_and_insert(&format!("later{i}"), 200, 100);
        }
        assert!(live(&c) <= 1_000, "{} entries kept", live(&c));
    }

    /// Slots across the shards (what the cache's memory follows).
    fn slots(c: &ReplayCache) -> usize {
        c.shards
            .iter()
            .map(|s| s.lock().map(|s| s.map.capacity()).unwrap_or(0))
            .sum()
    }

    #[test]
    fn memory_stays_flat_under_a_steady_rate() {
        // The soak's load: 500 proofs a second, each remembered 65 s. Once the
        // window is full the live count is flat, and so must the tables be: with
        // entries only ever removed by pruning, deleted slots piled up until each
        // shard's table doubled, one shard at a time, minutes into the run.
        let c = ReplayCache::new(1_000_000);
        let mut after_warm_up = 0;
        let mut n = 0u64;
        for now in 0..900i64 {
            for _ in 0..500 {
                n += 1;
                assert_eq!(
                    c.check_and_insert(&format!("jkt:{n}"), now + 65, now),
                    Seen::New
                );
            }
            if now == 150 {
                after_warm_up = slots(&c);
            }
        }
        assert_eq!(
            slots(&c),
            after_warm_up,
            "the tables grew from {after_warm_up} slots while the live count stayed flat"
        );
    }

    #[test]
    fn full_cache_refuses_instead_of_forgetting() {
        let c = ReplayCache::new(0); // 16 per shard
        let mut full = false;
        for i in 0..10_000 {
            if c.check_and_insert(&format!("k{i}"), 1000, 0) == Seen::Full {
                full = true;
                break;
            }
        }
        assert!(full);
        // Once entries expire there is room again.
        assert_eq!(c.check_and_insert("fresh", 3000, 2000), Seen::New);
    }
}
