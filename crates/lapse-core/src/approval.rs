//! Approvals of a pending request: who approved, and how they narrowed it.
//!
//! An approval binds to the request as it stands: the audience, task and context
//! never change; an approver may take actions away or shorten the lifetime, never
//! add or lengthen. Earlier approvals cover a later narrowing (whoever approved the
//! wider request approved everything inside it). Who may approve (groups,
//! separation of duties) is the server's to check; this module keeps the record
//! consistent.

mod record;

pub use record::Approval;

use crate::clock::Timestamp;
use crate::grant::{Grant, GrantState, LifecycleError};

/// What an approver may take away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Narrowing {
    /// The actions to keep; `None` keeps them all.
    pub actions: Option<Vec<String>>,
    /// A shorter lifetime in seconds; `None` keeps the current one.
    pub ttl_secs: Option<u64>,
}

/// The outcome of one approval.
#[derive(Debug, Clone, PartialEq)]
pub enum Approved {
    /// More approvals are needed: how many.
    Waiting(Grant, u32),
    /// This was the last one: activate the grant.
    Complete(Grant),
}

impl Grant {
    /// The lifetime the grant would get if activated now, in seconds.
    pub fn effective_ttl_secs(&self, server_max_ttl_secs: u64) -> u64 {
        crate::ttl::effective_ttl_secs(
            self.request.requested_ttl_secs,
            self.ttl_cap_secs,
            server_max_ttl_secs,
        )
    }

    /// Records `by`'s approval of a pending request, narrowed as asked.
    pub fn approve(
        mut self,
        now: Timestamp,
        by: &str,
        reason: &str,
        narrowing: &Narrowing,
        server_max_ttl_secs: u64,
    ) -> Result<Approved, LifecycleError> {
        match self.state {
            GrantState::Pending => {}
            s if s.is_ended() => {
                return Err(LifecycleError::Ended {
                    id: self.id,
                    state: s,
                });
            }
            s => {
                return Err(LifecycleError::NotPending {
                    id: self.id,
                    state: s,
                });
            }
        }
        if now >= self.expires_at {
            return Err(LifecycleError::ApprovalWindowPassed { id: self.id });
        }
        if self.approvals.iter().any(|a| a.by == by) {
            return Err(LifecycleError::AlreadyApproved {
                id: self.id,
                by: by.to_owned(),
            });
        }
        let mut removed = Vec::new();
        if let Some(keep) = &narrowing.actions {
            if keep.is_empty() {
                return Err(LifecycleError::Widening {
                    id: self.id,
                    what: "at least one action must remain; deny instead".into(),
                });
            }
            if let Some(extra) = keep.iter().find(|a| !self.actions.contains(a)) {
                let by = self
                    .approvals
                    .iter()
                    .find(|a| a.removed.contains(extra))
                    .map(|a| a.by.as_str());
                let what = match by {
                    Some(by) => format!("`{extra}` is no longer on offer: `{by}` removed it"),
                    None => format!("`{extra}` was not asked for"),
                };
                return Err(LifecycleError::Widening { id: self.id, what });
            }
            let (mut kept, gone): (Vec<String>, Vec<String>) =
                self.actions.iter().cloned().partition(|a| keep.contains(a));
            kept.dedup();
            self.actions = kept;
            removed = gone;
        }
        if let Some(ttl) = narrowing.ttl_secs {
            let current = self.effective_ttl_secs(server_max_ttl_secs);
            if ttl == 0 || ttl > current {
                return Err(LifecycleError::Widening {
                    id: self.id,
                    what: format!("a lifetime of {ttl}s is not within the {current}s asked for"),
                });
            }
            self.ttl_cap_secs = Some(self.ttl_cap_secs.map_or(ttl, |c| c.min(ttl)));
        }
        self.approvals.push(Approval {
            by: by.to_owned(),
            at: now,
            reason: reason.to_owned(),
            removed,
        });
        self.version += 1;
        let have = u32::try_from(self.approvals.len()).unwrap_or(u32::MAX);
        if have >= self.approvals_required {
            Ok(Approved::Complete(self))
        } else {
            let left = self.approvals_required - have;
            Ok(Approved::Waiting(self, left))
        }
    }

    /// Hands the credentials of an approved request to the workload, once.
    pub fn deliver(mut self, now: Timestamp) -> Result<Self, LifecycleError> {
        if self.state != GrantState::Active {
            return Err(LifecycleError::NotActive {
                id: self.id,
                state: self.state,
            });
        }
        self.delivered = true;
        self.delivered_at = Some(now);
        self.version += 1;
        Ok(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::grant::tests_support::{new_grant_with, t};

    fn pending(approvals: u32) -> Grant {
        Grant::pending(
            new_grant_with(600, Some(900), &["read", "write"]),
            approvals,
            Some("dba".into()),
            300,
        )
    }

    fn waiting(r: Result<Approved, LifecycleError>) -> Grant {
        match r.unwrap() {
            Approved::Waiting(g, _) => g,
            Approved::Complete(_) => panic!("complete too early"),
        }
    }

    #[test]
    fn distinct_approvers_complete_the_request() {
        let g = pending(2);
        let g = waiting(g.approve(t(1010), "alice", "", &Narrowing::default(), 3600));
        let again = g
            .clone()
            .approve(t(1020), "alice", "", &Narrowing::default(), 3600);
        assert!(matches!(again, Err(LifecycleError::AlreadyApproved { .. })));
        match g
            .approve(t(1030), "bob", "ok", &Narrowing::default(), 3600)
            .unwrap()
        {
            Approved::Complete(g) => assert_eq!(g.approvals.len(), 2),
            Approved::Waiting(..) => panic!("two distinct approvals were needed"),
        }
    }

    /// A later approver is offered what is left, and told who took the rest.
    #[test]
    fn an_approval_records_what_it_removed() {
        let g = pending(2);
        let read = Narrowing {
            actions: Some(vec!["read".into()]),
            ttl_secs: None,
        };
        let g = waiting(g.approve(t(1010), "alice", "", &read, 3600));
        assert_eq!(g.actions, vec!["read".to_owned()]);
        assert_eq!(g.approvals[0].removed, vec!["write".to_owned()]);
        let back = Narrowing {
            actions: Some(vec!["read".into(), "write".into()]),
            ttl_secs: None,
        };
        match g.clone().approve(t(1020), "bob", "", &back, 3600) {
            Err(LifecycleError::Widening { what, .. }) => {
                assert_eq!(what, "`write` is no longer on offer: `alice` removed it");
            }
            other => panic!("{other:?}"),
        }
        let Approved::Complete(g) = g
            .approve(t(1020), "bob", "", &Narrowing::default(), 3600)
            .unwrap()
        else {
            panic!("two approvals were needed")
        };
        assert!(g.approvals[1].removed.is_empty());
    }

    #[test]
    fn narrowing_only_takes_away() {
        let g = pending(1);
        let wider = Narrowing {
            actions: Some(vec!["read".into(), "admin".into()]),
            ttl_secs: None,
        };
        assert!(matches!(
            g.clone().approve(t(1010), "alice", "", &wider, 3600),
            Err(LifecycleError::Widening { .. })
        ));
        let longer = Narrowing {
            actions: None,
            ttl_secs: Some(601),
        };
        assert!(matches!(
            g.clone().approve(t(1010), "alice", "", &longer, 3600),
            Err(LifecycleError::Widening { .. })
        ));
        let none = Narrowing {
            actions: Some(vec![]),
            ttl_secs: None,
        };
        assert!(
            g.clone()
                .approve(t(1010), "alice", "", &none, 3600)
                .is_err()
        );
        let narrower = Narrowing {
            actions: Some(vec!["read".into()]),
            ttl_secs: Some(120),
        };
        let Approved::Complete(g) = g.approve(t(1010), "alice", "", &narrower, 3600).unwrap()
        else {
            panic!("one approval was needed")
        };
        assert_eq!(g.actions, vec!["read".to_owned()]);
        assert_eq!(g.effective_ttl_secs(3600), 120);
        let g = g.activate(t(1020), 3600, 3600, "j".into()).unwrap();
        assert_eq!(
            g.expires_at,
            t(1140),
            "the narrowed lifetime is what is issued"
        );
    }

    #[test]
    fn expired_or_decided_requests_take_no_approval() {
        let g = pending(1);
        assert!(matches!(
            g.clone()
                .approve(t(1300), "alice", "", &Narrowing::default(), 3600),
            Err(LifecycleError::ApprovalWindowPassed { .. })
        ));
        let denied = g.deny(t(1010), "bob", "no").unwrap();
        assert!(matches!(
            denied.approve(t(1020), "alice", "", &Narrowing::default(), 3600),
            Err(LifecycleError::Ended { .. })
        ));
    }
}
