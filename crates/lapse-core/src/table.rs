//! Pruning long-lived hash maps without their memory creeping up.
//!
//! A map that keeps entries for a window and forgets them in periodic sweeps (replay
//! caches, rate-limit buckets, ended grants) has a flat live count under steady load,
//! yet with `retain` alone its table still grows: removals leave deleted slots
//! behind, inserts count them against the table's room, and once they fill it the
//! table doubles although it holds no more than before. Under a steady 500 proofs/s
//! the DPoP replay cache's shards doubled one by one over ten minutes (a soak's
//! resident memory +2 MiB, flat live heap). Rebuilding after a sweep gives a table
//! with no deleted slots, sized by what it holds, so its size follows the live count
//! both ways (it also shrinks after a burst).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Keeps the entries `keep` accepts; if any went, moves the rest into a fresh table
/// with room for a quarter more (the inserts until the next sweep). Returns how many
/// were removed.
pub fn prune<K, V, S>(map: &mut HashMap<K, V, S>, keep: impl FnMut(&K, &mut V) -> bool) -> usize
where
    K: Eq + Hash,
    S: BuildHasher + Clone,
{
    let before = map.len();
    map.retain(keep);
    let removed = before - map.len();
    if removed > 0 {
        let room = map.len() + map.len() / 4 + 16;
        let mut fresh = HashMap::with_capacity_and_hasher(room, map.hasher().clone());
        fresh.extend(map.drain());
        *map = fresh;
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window of `live` entries slides for `rounds` sweeps of `step` new entries.
    fn churn(
        live: u64,
        step: u64,
        rounds: u64,
        sweep: impl Fn(&mut HashMap<u64, u64>, u64),
    ) -> (usize, usize) {
        let mut m: HashMap<u64, u64> = HashMap::new();
        let mut next = 0;
        let mut warm = 0;
        for round in 0..rounds {
            for _ in 0..step {
                m.insert(next, next);
                next += 1;
            }
            sweep(&mut m, next.saturating_sub(live));
            if round == live / step * 2 {
                warm = m.capacity();
            }
        }
        (warm, m.capacity())
    }

    #[test]
    fn a_sliding_window_keeps_its_table_size() {
        let (warm, end) = churn(1_100, 150, 400, |m, oldest| {
            prune(m, |_, v| *v >= oldest);
        });
        assert_eq!(warm, end, "the table grew while the window slid");
    }

    #[test]
    fn a_burst_gives_its_memory_back() {
        let mut m: HashMap<u64, ()> = (0..100_000).map(|i| (i, ())).collect();
        let burst = m.capacity();
        assert_eq!(prune(&mut m, |k, _| *k < 100), 99_900);
        assert_eq!(m.len(), 100);
        assert!(
            m.capacity() < burst / 100,
            "{} slots kept for 100 entries",
            m.capacity()
        );
    }

    #[test]
    fn nothing_removed_leaves_the_table_alone() {
        let mut m: HashMap<u64, ()> = HashMap::with_capacity(1_000);
        m.insert(1, ());
        let slots = m.capacity();
        assert_eq!(prune(&mut m, |_, _| true), 0);
        assert_eq!(m.capacity(), slots);
    }
}
