//! People deciding pending requests, and the waiting workload collecting the result.
//!
//! Who may decide: an operator with the `approve` role, in the group the policy
//! named (`@approvers`), who does not own the requesting workload (`[[owner]]`).
//! A refusal on those grounds is audited. Each approver counts once; an approver
//! may narrow (fewer actions, shorter lifetime), never widen. The workload polls
//! the token endpoint with its `request_id` and the same DPoP key, and receives
//! the credentials exactly once.

use crate::audit::{event, issued_data};
use crate::broker::{Lapse, Operator};
use crate::config::Role;
use crate::error::BrokerError;
use crate::error::lifecycle;
use crate::exchange::{Issued, new_jti};
use lapse_core::{Approved, Grant, GrantId, GrantState, LifecycleError, Narrowing};
use lapse_store::{GrantFilter, GrantWrite, WriteBatch};
use lapse_token::DpopProof;
use serde_json::json;

impl Lapse {
    /// Pending requests, newest first.
    pub async fn pending_requests(&self, limit: usize) -> Result<Vec<Grant>, BrokerError> {
        Ok(self
            .store
            .grants(GrantFilter {
                state: Some(GrantState::Pending),
                limit,
                ..Default::default()
            })
            .await?)
    }

    /// The workload's recent grants, for an approver deciding on one of its requests.
    pub async fn workload_history(
        &self,
        workload: &str,
        limit: usize,
    ) -> Result<Vec<Grant>, BrokerError> {
        Ok(self
            .store
            .grants(GrantFilter {
                workload: Some(workload.to_owned()),
                limit,
                ..Default::default()
            })
            .await?)
    }

    /// Whether `op` may decide on `grant`; a refusal is audited before it is answered.
    async fn may_decide(&self, op: &Operator, grant: &Grant) -> Result<(), BrokerError> {
        op.require(Role::Approve)?;
        let workload = &grant.request.workload.id;
        let why = if let Some(g) = grant.approvers.as_ref().filter(|g| !op.groups.contains(g)) {
            Some(format!("`{}` is not in the approver group `{g}`", op.name))
        } else if self
            .cfg
            .owners
            .iter()
            .any(|o| o.covers(workload) && o.operators.contains(&op.name))
        {
            Some(format!(
                "`{}` owns `{workload}` and cannot decide its requests (separation of duties)",
                op.name
            ))
        } else {
            None
        };
        let Some(why) = why else { return Ok(()) };
        self.commit_about(
            WriteBatch {
                events: vec![event(
                    self.now(),
                    "approval.refused",
                    Some(&grant.id),
                    &op.name,
                    json!({ "reason": why }),
                )],
                ..Default::default()
            },
            &[grant],
        )
        .await?;
        Err(BrokerError::Forbidden(why))
    }

    /// `op` approves request `id`, narrowed as asked. The last approval activates it.
    pub async fn approve(
        &self,
        op: &Operator,
        id: GrantId,
        reason: &str,
        narrowing: Narrowing,
    ) -> Result<Grant, BrokerError> {
        let grant = self.find(id, "request").await?;
        self.may_decide(op, &grant).await?;
        let now = self.now();
        let approved = grant
            .clone()
            .approve(now, &op.name, reason, &narrowing, self.cfg.max_ttl.secs())
            .map_err(approval_error)?;
        let data = json!({
            "reason": reason,
            "actions": narrowing.actions,
            "ttl": narrowing.ttl_secs,
        });
        let (next, events) = match approved {
            Approved::Waiting(g, left) => {
                let mut d = data;
                crate::json::set_field(&mut d, "approvals_left", json!(left));
                (
                    g.clone(),
                    vec![event(now, "approval.granted", Some(&id), &op.name, d)],
                )
            }
            Approved::Complete(g) => {
                let approvers: Vec<String> = g.approvals.iter().map(|a| a.by.clone()).collect();
                let active = g
                    .activate(
                        now,
                        self.cfg.max_ttl.secs(),
                        self.cfg.max_lifetime.secs(),
                        new_jti(),
                    )
                    .map_err(approval_error)?;
                let mut active = active;
                active.idle_secs = self.idle_of(&active.policies);
                let active = match self.provider(&active.request.audience) {
                    Some(p) => {
                        let intent = crate::credentials::intent(p, &active);
                        active.intend_credential(intent).map_err(lifecycle)?
                    }
                    None => active,
                };
                let decision = lapse_core::Decision {
                    outcome: lapse_core::DecisionOutcome::Allow {
                        ttl_cap_secs: active.ttl_cap_secs,
                    },
                    policies: active.policies.clone(),
                };
                let mut issued = issued_data(&active, &decision, now);
                crate::json::set_field(&mut issued, "approved_by", json!(approvers));
                (
                    active.clone(),
                    vec![
                        event(now, "approval.granted", Some(&id), &op.name, data),
                        event(now, "grant.issued", Some(&id), &op.name, issued),
                    ],
                )
            }
        };
        self.commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: next.clone(),
                expected_version: grant.version,
            }],
            events,
            ..Default::default()
        })
        .await?;
        if next.state == GrantState::Active {
            self.metrics.active_grants.inc();
            self.notify(
                "request.approved",
                json!({
                    "request_id": id.to_string(),
                    "workload": next.request.workload.id,
                    "audience": next.request.audience,
                    "actions": next.actions,
                    "approved_by": next.approvals.iter().map(|a| a.by.clone()).collect::<Vec<_>>(),
                    "expires_at": next.expires_at.millis(),
                }),
            );
        }
        Ok(next)
    }

    /// `op` denies request `id`; a reason is required.
    pub async fn deny_request(
        &self,
        op: &Operator,
        id: GrantId,
        reason: &str,
    ) -> Result<Grant, BrokerError> {
        if reason.trim().is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a denial needs a `reason`".into(),
            ));
        }
        let grant = self.find(id, "request").await?;
        self.may_decide(op, &grant).await?;
        let now = self.now();
        let denied = grant
            .clone()
            .deny(now, &op.name, reason)
            .map_err(approval_error)?;
        self.commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: denied.clone(),
                expected_version: grant.version,
            }],
            events: vec![event(
                now,
                "grant.denied",
                Some(&id),
                &op.name,
                json!({ "reason": reason }),
            )],
            ..Default::default()
        })
        .await?;
        self.notify(
            "request.denied",
            json!({
                "request_id": id.to_string(),
                "workload": denied.request.workload.id,
                "audience": denied.request.audience,
                "by": op.name,
                "reason": reason,
            }),
        );
        Ok(denied)
    }

    /// The waiting workload asks for the outcome of request `id`, proving with a
    /// DPoP proof that it holds the key the request was made with.
    pub async fn collect(&self, id: GrantId, proof: &DpopProof) -> Result<Issued, BrokerError> {
        let unknown = || BrokerError::InvalidGrant(format!("no request `{id}` for this key"));
        let grant = self.store.grant(id).await?.ok_or_else(unknown)?;
        // Another key learns nothing about the request, not even that it exists.
        if grant.jkt != proof.jkt {
            return Err(unknown());
        }
        let now = self.now();
        match grant.state {
            GrantState::Pending if now < grant.expires_at => {
                // Spent even though nothing else changes: a poll captured while the
                // request waits must not collect it, on any replica, once approved.
                self.commit(WriteBatch {
                    nonces: vec![self.nonce(proof)],
                    ..Default::default()
                })
                .await?;
                let have = u32::try_from(grant.approvals.len()).unwrap_or(u32::MAX);
                Err(BrokerError::AuthorizationPending {
                    request_id: id.to_string(),
                    approvals: grant.approvals_required.saturating_sub(have),
                    approvers: grant.approvers.clone(),
                })
            }
            GrantState::Pending | GrantState::Expired if grant.token_jti.is_none() => {
                Err(BrokerError::AccessDenied {
                    description: "the request expired before it was approved".into(),
                    policies: grant.policies.clone(),
                })
            }
            GrantState::Denied => {
                let (by, why) = grant
                    .end
                    .as_ref()
                    .map_or(("", ""), |e| (e.by.as_str(), e.reason.as_str()));
                Err(BrokerError::AccessDenied {
                    description: format!("denied by `{by}`: {why}"),
                    policies: grant.policies.clone(),
                })
            }
            GrantState::Active if !grant.delivered => self.deliver(grant, proof).await,
            GrantState::Active => Err(BrokerError::InvalidGrant(format!(
                "the credentials of request `{id}` were already delivered"
            ))),
            s => Err(BrokerError::InvalidGrant(format!(
                "request `{id}` has ended ({s})"
            ))),
        }
    }

    async fn deliver(&self, grant: Grant, proof: &DpopProof) -> Result<Issued, BrokerError> {
        let now = self.now();
        let delivered = grant.clone().deliver(now).map_err(lifecycle)?;
        let actor = grant.request.workload.id.clone();
        // Recorded before anything is handed out; a concurrent second poll loses on
        // the version and gets nothing.
        self.commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: delivered.clone(),
                expected_version: grant.version,
            }],
            events: vec![event(
                now,
                "grant.delivered",
                Some(&grant.id),
                &actor,
                json!({ "jti": delivered.token_jti }),
            )],
            // A captured polling proof replayed to another replica finds it spent.
            nonces: vec![self.nonce(proof)],
            ..Default::default()
        })
        .await?;
        let token = self.mint(&delivered, now)?;
        let provider = self.provider(&delivered.request.audience).cloned();
        let (delivered, credentials) = match provider {
            Some(p)
                if delivered
                    .credentials
                    .iter()
                    .any(|c| c.state == lapse_core::CredentialState::Intended) =>
            {
                let (g, h) = self.provision(delivered, &p).await?;
                (g, vec![h])
            }
            _ => (delivered, vec![]),
        };
        Ok(Issued {
            expires_in: delivered.remaining_secs(now),
            grant: delivered,
            access_token: token,
            credentials,
        })
    }
}

impl Lapse {
    /// Break-glass grants (their reviews), newest first, among the newest 10,000
    /// grants; `open_only` keeps the ones nobody has closed.
    pub async fn reviews(&self, open_only: bool) -> Result<Vec<Grant>, BrokerError> {
        Ok(self
            .store
            .grants(GrantFilter {
                limit: 10_000,
                ..Default::default()
            })
            .await?
            .into_iter()
            .filter(|g| g.review.as_ref().is_some_and(|r| !open_only || r.is_open()))
            .collect())
    }

    /// `op` closes the review of break-glass grant `id` with a verdict.
    pub async fn close_review(
        &self,
        op: &Operator,
        id: GrantId,
        verdict: lapse_core::Verdict,
        note: &str,
    ) -> Result<Grant, BrokerError> {
        let grant = self.find(id, "request").await?;
        self.may_decide(op, &grant).await?;
        let now = self.now();
        let closed = grant
            .clone()
            .close_review(now, &op.name, verdict, note)
            .map_err(lifecycle)?;
        self.commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: closed.clone(),
                expected_version: grant.version,
            }],
            events: vec![event(
                now,
                "review.closed",
                Some(&id),
                &op.name,
                json!({ "verdict": verdict, "note": note }),
            )],
            ..Default::default()
        })
        .await?;
        self.notify(
            "break_glass.reviewed",
            json!({ "grant_id": id.to_string(), "by": op.name, "verdict": verdict, "note": note }),
        );
        Ok(closed)
    }
}

/// Lifecycle errors of a decision, as the approver should read them.
fn approval_error(e: LifecycleError) -> BrokerError {
    match e {
        LifecycleError::Widening { .. } | LifecycleError::ZeroTtl => {
            BrokerError::InvalidRequest(e.to_string())
        }
        other => lifecycle(other),
    }
}
