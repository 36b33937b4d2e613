//! An index of the policy set by action and resource, so a decision evaluates only
//! the policies that could apply to it.
//!
//! The index is conservative: a policy is left out of a bucket only when its scope
//! proves it cannot apply (`action == X` for another action, `resource == R` for
//! another resource, or the wrong break-glass class). Anything the scope cannot rule
//! out (`action in [...]` naming a group, `resource in R`) stays in, so an indexed
//! decision always equals evaluating the whole set.

use cedar_policy::{ActionConstraint, Entities, EntityUid, Policy, PolicySet, ResourceConstraint};
use std::collections::{BTreeSet, HashMap};

/// Policy sets for one (action, break-glass) pair.
#[derive(Debug, Default)]
pub(crate) struct ActionBucket {
    /// Policies that apply to any resource not named by an `==` constraint.
    pub default: PolicySet,
    /// For each resource some policy names with `resource == R`: `default` plus those.
    pub by_resource: HashMap<String, PolicySet>,
}

#[derive(Debug, Default)]
pub(crate) struct PolicyIndex {
    /// Key: (action id, break_glass).
    buckets: HashMap<(String, bool), ActionBucket>,
}

impl PolicyIndex {
    /// `policies` carries each policy with its break-glass flag. With `by_scope`
    /// false every bucket holds every policy of its break-glass class: the whole
    /// set, as plain Cedar would evaluate it.
    pub fn build(
        policies: &[(Policy, bool)],
        actions: &[EntityUid],
        action_entities: &Entities,
        by_scope: bool,
    ) -> Result<Self, Box<cedar_policy::PolicySetError>> {
        let mut buckets = HashMap::new();
        for action in actions {
            let ancestors: BTreeSet<&EntityUid> = action_entities
                .ancestors(action)
                .map(|it| it.collect())
                .unwrap_or_default();
            for break_glass in [false, true] {
                let candidates: Vec<&Policy> = policies
                    .iter()
                    .filter(|(p, bg)| {
                        // Forbids always apply; a permit applies only to its own class.
                        let class_ok =
                            p.effect() == cedar_policy::Effect::Forbid || *bg == break_glass;
                        class_ok && (!by_scope || action_may_match(p, action, &ancestors))
                    })
                    .map(|(p, _)| p)
                    .collect();
                let mut named: BTreeSet<String> = BTreeSet::new();
                for p in candidates.iter().filter(|_| by_scope) {
                    if let ResourceConstraint::Eq(uid) = p.resource_constraint() {
                        named.insert(uid.id().unescaped().to_owned());
                    }
                }
                let mut bucket = ActionBucket::default();
                for p in &candidates {
                    if !by_scope || !matches!(p.resource_constraint(), ResourceConstraint::Eq(_)) {
                        bucket.default.add((*p).clone()).map_err(Box::new)?;
                    }
                }
                for r in named {
                    let mut set = bucket.default.clone();
                    for p in &candidates {
                        if let ResourceConstraint::Eq(uid) = p.resource_constraint()
                            && uid.id().unescaped() == r
                        {
                            set.add((*p).clone()).map_err(Box::new)?;
                        }
                    }
                    bucket.by_resource.insert(r, set);
                }
                buckets.insert((action.id().unescaped().to_owned(), break_glass), bucket);
            }
        }
        Ok(Self { buckets })
    }

    /// The policies that could apply, or `None` for an action the schema does not declare.
    pub fn lookup(&self, action: &str, resource: &str, break_glass: bool) -> Option<&PolicySet> {
        let bucket = self.buckets.get(&(action.to_owned(), break_glass))?;
        Some(bucket.by_resource.get(resource).unwrap_or(&bucket.default))
    }
}

fn action_may_match(p: &Policy, action: &EntityUid, ancestors: &BTreeSet<&EntityUid>) -> bool {
    match p.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => &uid == action,
        ActionConstraint::In(uids) => uids.iter().any(|u| u == action || ancestors.contains(u)),
    }
}
