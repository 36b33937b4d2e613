//! Remembers DPoP proof `jti`s until they could no longer pass the `iat` window, so
//! a captured proof cannot be replayed.

use std::collections::HashMap;
use std::sync::Mutex;

const SHARDS: usize = 32;

/// A sharded set of `jti`s with expiry. Bounded: when full of live entries it refuses
/// new ones (the caller fails closed) rather than forgetting live ones.
#[derive(Debug)]
pub struct ReplayCache {
    shards: Vec<Mutex<HashMap<String, i64>>>,
    max_per_shard: usize,
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
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_per_shard: (capacity / SHARDS).max(16),
        }
    }

    /// Records `key` as used until `expires_secs`; says whether it was already used.
    pub fn check_and_insert(&self, key: &str, expires_secs: i64, now_secs: i64) -> Seen {
        use std::hash::{Hash, Hasher};
        // The shard must be a pure function of the key, so a fixed-key hasher.
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        let idx = usize::try_from(h.finish() % SHARDS as u64).unwrap_or(0);
        let Some(shard) = self.shards.get(idx) else {
            return Seen::Full;
        };
        let mut map = match shard.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(&exp) = map.get(key)
            && exp > now_secs
        {
            return Seen::Replay;
        }
        if map.len() >= self.max_per_shard {
            map.retain(|_, exp| *exp > now_secs);
            if map.len() >= self.max_per_shard {
                return Seen::Full;
            }
        }
        map.insert(key.to_owned(), expires_secs);
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
