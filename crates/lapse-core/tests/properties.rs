#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Property tests of the grant lifecycle: random sequences of every transition, at
//! random times, from an issued or a pending grant. After every step:
//! - nothing leaves an ended state (no path back to active or pending);
//! - an active grant's credential never outlives its caps: the lifetime it was
//!   given when (re)issued (requested, `@max_ttl`, server `max_ttl`, an approver's
//!   shortening) nor the grant's maximum lifetime, which never moves once active;
//! - actions only ever narrow, and an approval that would add an action or lengthen
//!   the lifetime is refused;
//! - every transition that succeeds bumps the version (the store's optimistic check).

use lapse_core::approval::{Approved, Narrowing};
use lapse_core::grant::NewGrant;
use lapse_core::{
    AccessRequest, Grant, GrantId, GrantState, RequestContext, Task, Timestamp, WorkloadIdentity,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

const ACTIONS: [&str; 4] = ["admin", "delete", "read", "write"];

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Complete,
    Revoke,
    Expire,
    Renew {
        ttl: u64,
        cap: Option<u64>,
    },
    Approve {
        by: u8,
        keep: Option<Vec<usize>>,
        ttl: Option<u64>,
    },
    Deny,
    Activate,
    Deliver,
    Used,
}

impl Op {
    /// Whether the operation is a lifecycle transition (the others only observe or
    /// move the clock).
    fn transition(&self) -> bool {
        !matches!(self, Op::Advance(_) | Op::Used)
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..2_000).prop_map(Op::Advance),
        1 => Just(Op::Complete),
        1 => Just(Op::Revoke),
        2 => Just(Op::Expire),
        3 => ((0u64..3_000), proptest::option::of(1u64..3_000))
            .prop_map(|(ttl, cap)| Op::Renew { ttl, cap }),
        3 => (
            0u8..4,
            proptest::option::of(proptest::collection::vec(0usize..4, 0..4)),
            proptest::option::of(0u64..3_000),
        )
            .prop_map(|(by, keep, ttl)| Op::Approve { by, keep, ttl }),
        1 => Just(Op::Deny),
        2 => Just(Op::Activate),
        1 => Just(Op::Deliver),
        1 => Just(Op::Used),
    ]
}

#[derive(Debug, Clone)]
struct Start {
    pending: bool,
    approvals: u32,
    requested: u64,
    cap: Option<u64>,
    server_max: u64,
    max_lifetime: u64,
    actions: Vec<usize>,
    window: u64,
}

fn start() -> impl Strategy<Value = Start> {
    (
        any::<bool>(),
        1u32..4,
        1u64..5_000,
        proptest::option::of(1u64..5_000),
        1u64..5_000,
        1u64..20_000,
        proptest::collection::btree_set(0usize..4, 1..4),
        1u64..2_000,
    )
        .prop_map(
            |(pending, approvals, requested, cap, server_max, max_lifetime, actions, window)| {
                Start {
                    pending,
                    approvals,
                    requested,
                    cap,
                    server_max,
                    max_lifetime,
                    actions: actions.into_iter().collect(),
                    window,
                }
            },
        )
}

fn new_grant(s: &Start, now: Timestamp) -> NewGrant {
    NewGrant {
        id: GrantId::generate(),
        request: AccessRequest {
            workload: WorkloadIdentity {
                id: "spiffe://t/w".into(),
                issuer: "i".into(),
                subject: "w".into(),
                claims: BTreeMap::new(),
            },
            task: Task {
                id: "T".into(),
                purpose: "p".into(),
                ticket: String::new(),
            },
            audience: "a".into(),
            actions: s.actions.iter().map(|i| ACTIONS[*i].to_owned()).collect(),
            requested_ttl_secs: s.requested,
            context: RequestContext {
                environment: String::new(),
                source: [127, 0, 0, 1].into(),
                time: now,
                break_glass: false,
                depth: 0,
                tool: None,
            },
            tools: Vec::new(),
        },
        policies: vec![],
        ttl_cap_secs: s.cap,
        jkt: "k".into(),
        now,
        server_max_ttl_secs: s.server_max,
        max_lifetime_secs: s.max_lifetime,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn the_lifecycle_never_leaves_an_end_and_never_exceeds_its_caps(
        s in start(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut now = Timestamp::from_unix_seconds(1_000_000);
        let mut g = if s.pending {
            Grant::pending(new_grant(&s, now), s.approvals, None, s.window)
        } else {
            Grant::issue(new_grant(&s, now), "j0".into())
                .map_err(|e| TestCaseError::fail(format!("issue: {e}")))?
        };
        let asked = g.request.actions.clone();
        // When the current credential got its lifetime, and the bound it had then.
        let mut issued_at = now;
        let mut ttl_bound = g.effective_ttl_secs(s.server_max);
        let mut active_max = (g.state == GrantState::Active).then_some(g.max_expires_at);
        for (step, op) in ops.into_iter().enumerate() {
            let before = g.clone();
            let result: Result<Grant, String> = match op.clone() {
                Op::Advance(d) => {
                    now = now.plus_secs(d);
                    Ok(g.clone())
                }
                Op::Complete => g.clone().complete(now, "w", "done").map_err(|e| e.to_string()),
                Op::Revoke => g.clone().revoke(now, "op", "r").map_err(|e| e.to_string()),
                Op::Expire => g.clone().expire(now).map_err(|e| e.to_string()),
                Op::Renew { ttl, cap } => {
                    // The caller caps the asked lifetime by the fresh decision.
                    let ttl = lapse_core::ttl::effective_ttl_secs(ttl, cap, s.server_max);
                    g.clone()
                        .renew(now, ttl, vec![], cap, format!("j{step}"))
                        .map_err(|e| e.to_string())
                }
                Op::Approve { by, keep, ttl } => {
                    let narrowing = Narrowing {
                        actions: keep
                            .map(|k| k.into_iter().map(|i| ACTIONS[i].to_owned()).collect()),
                        ttl_secs: ttl,
                    };
                    let approved = g
                        .clone()
                        .approve(now, &format!("approver-{by}"), "", &narrowing, s.server_max);
                    if approved.is_ok() {
                        // What succeeded did not widen: every kept action was asked
                        // for, and a new lifetime is within the one asked for.
                        if let Some(keep) = &narrowing.actions {
                            prop_assert!(!keep.is_empty());
                            prop_assert!(keep.iter().all(|a| before.actions.contains(a)), "{keep:?} widened {:?}", before.actions);
                        }
                        if let Some(t) = narrowing.ttl_secs {
                            prop_assert!(t >= 1 && t <= before.effective_ttl_secs(s.server_max));
                        }
                    }
                    match approved {
                        Ok(Approved::Waiting(g, _)) => Ok(g),
                        Ok(Approved::Complete(g)) => g
                            .activate(now, s.server_max, s.max_lifetime, format!("j{step}"))
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Op::Deny => g.clone().deny(now, "op", "no").map_err(|e| e.to_string()),
                Op::Activate => g
                    .clone()
                    .activate(now, s.server_max, s.max_lifetime, format!("j{step}"))
                    .map_err(|e| e.to_string()),
                Op::Deliver => g.clone().deliver(now).map_err(|e| e.to_string()),
                Op::Used => {
                    let mut x = g.clone();
                    x.used(now);
                    Ok(x)
                }
            };
            let Ok(next) = result else { continue };

            // Nothing leaves an end: no transition succeeds on an ended grant.
            if before.state.is_ended() {
                prop_assert!(!op.transition(), "{op:?} succeeded on a {:?} grant", before.state);
                prop_assert_eq!(next.state, before.state);
            }
            if op.transition() {
                prop_assert!(next.version > before.version, "{op:?} kept version {}", next.version);
            }
            // Actions only narrow.
            prop_assert!(!next.actions.is_empty());
            prop_assert!(next.actions.iter().all(|a| asked.contains(a)), "{:?} not within {asked:?}", next.actions);
            prop_assert!(next.actions.iter().all(|a| before.actions.contains(a)));
            // A shortened lifetime never grows back through approvals.
            if let (Op::Approve { .. }, Some(b)) = (&op, before.ttl_cap_secs) {
                prop_assert!(next.ttl_cap_secs.is_some_and(|n| n <= b));
            }

            if next.state == GrantState::Active {
                let became_active = before.state != GrantState::Active;
                if became_active || matches!(op, Op::Renew { .. }) {
                    issued_at = now;
                    ttl_bound = match op {
                        Op::Renew { ttl, cap } => lapse_core::ttl::effective_ttl_secs(ttl, cap, s.server_max),
                        _ => next.effective_ttl_secs(s.server_max),
                    };
                }
                if became_active {
                    active_max = Some(next.max_expires_at);
                    prop_assert_eq!(next.max_expires_at, now.plus_secs(s.max_lifetime));
                }
                // The maximum lifetime never moves once active, and nothing passes it.
                prop_assert_eq!(Some(next.max_expires_at), active_max);
                prop_assert!(next.expires_at <= next.max_expires_at);
                // The credential lives no longer than the caps of its (re)issue.
                prop_assert!(next.expires_at <= issued_at.plus_secs(ttl_bound),
                    "expires {:?} after issue {:?} + {ttl_bound}s", next.expires_at, issued_at);
                prop_assert!(next.expires_at <= issued_at.plus_secs(s.server_max));
                prop_assert!(next.expires_at > issued_at || next.expires_at == next.max_expires_at);
            }
            g = next;
        }
    }
}
