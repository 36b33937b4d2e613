#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]
//! The policy index must never change a decision: on the benchmark's 100-policy
//! set, for thousands of mixed requests, indexed and whole-set evaluation agree on
//! the outcome, the TTL cap, the approvals and the determining policies.

use lapse_bench::policies;
use lapse_policy::PolicyBundle;
use std::collections::BTreeMap;

#[test]
fn indexed_decisions_equal_whole_set_decisions() {
    let files = policies::sources();
    let indexed = PolicyBundle::from_sources(&files).unwrap_or_else(|e| panic!("{e}"));
    let flat = PolicyBundle::from_sources_unindexed(&files).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(indexed.policy_count, 100);
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for (seed, n) in [(1u64, 4000usize), (2, 4000), (3, 4000)] {
        for r in policies::requests(n, seed) {
            let a = indexed.decide(&r);
            let b = flat.decide(&r);
            assert_eq!(a, b, "index changed the decision for {r:?}");
            *outcomes.entry(a.outcome_label()).or_default() += 1;
        }
    }
    // The set exercises every outcome, so agreement is not agreement on "deny".
    for o in ["allow", "deny", "approval_required"] {
        assert!(
            outcomes.get(o).copied().unwrap_or(0) > 100,
            "too few `{o}` decisions to mean anything: {outcomes:?}"
        );
    }
}
