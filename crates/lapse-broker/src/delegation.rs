//! Sub-agent tokens (RFC 8693 delegation) and the cascade that ends them.
//!
//! An agent exchanges its own Lapse token (`subject_token`, proved by a DPoP proof
//! made with the token's key) for a narrower one for a sub-agent: the same
//! workload, audience and task; actions and tools a subset of its own; a lifetime
//! inside its own; an `act` claim naming the new actor with the chain behind it.
//! Policy decides the narrower request like any other, with `context.depth`
//! telling it how far down the chain it is. Ending a grant ends every grant
//! delegated from it, in the same commit.

use crate::audit::{event, issued_data};
use crate::broker::Lapse;
use crate::error::BrokerError;
use crate::error::{clip, lifecycle};
use crate::exchange::{Issued, new_jti};
use lapse_core::grant::NewGrant;
use lapse_core::{
    AccessRequest, DecisionOutcome, Grant, GrantId, GrantState, RequestContext, Task, ToolDecl,
};
use lapse_store::{GrantWrite, WriteBatch};
use lapse_token::DpopProof;
use serde_json::json;
use std::net::IpAddr;

/// A sub-agent token request, after parsing.
pub struct DelegationInput {
    /// The parent's Lapse access token.
    pub subject_token: String,
    /// An identity token of the sub-agent (`actor_token`), if it has one: its
    /// workload becomes `act.sub`.
    pub actor_token: Option<String>,
    /// Must be the parent's audience when given.
    pub audience: Option<String>,
    /// Empty: the parent's actions.
    pub actions: Vec<String>,
    /// `None`: the parent's tools.
    pub tools: Option<Vec<ToolDecl>>,
    pub ttl_secs: Option<u64>,
    /// Empty: the parent's purpose.
    pub purpose: String,
    /// RFC 9449 `dpop_jkt`: the sub-agent's key, which the new token is bound to.
    /// Absent, the token is bound to the key that made the request's proof.
    pub dpop_jkt: Option<String>,
    pub source: IpAddr,
}

/// A sub-agent given less time than it asked for, and what set the limit: the
/// answer says so (`requested_expires_in`, `ttl_capped_by`) instead of quietly
/// handing out a shorter token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlCapped {
    pub requested_secs: u64,
    /// `parent_grant` (a sub-agent never outlives its parent), `policy` (a
    /// `@ttl` cap) or `max_ttl` (the broker's).
    pub by: &'static str,
}

/// Which limit gave `granted` seconds: the smallest of them, the parent first
/// when they tie (it is the one a caller can do nothing about).
fn cap_reason(parent_secs: u64, policy_secs: Option<u64>, max_ttl_secs: u64) -> &'static str {
    let mut by = ("parent_grant", parent_secs);
    for (name, secs) in [("policy", policy_secs), ("max_ttl", Some(max_ttl_secs))] {
        if let Some(secs) = secs
            && secs < by.1
        {
            by = (name, secs);
        }
    }
    by.0
}

/// RFC 9278: a key named by its thumbprint, the actor when it has no identity.
fn thumbprint_uri(jkt: &str) -> String {
    format!("urn:ietf:params:oauth:jwk-thumbprint:sha-256:{jkt}")
}

impl Lapse {
    /// The sub-agent's token, and whether its lifetime is shorter than asked.
    pub async fn delegate(
        &self,
        input: DelegationInput,
        proof: &DpopProof,
    ) -> Result<(Issued, Option<TtlCapped>), BrokerError> {
        let now = self.now();
        self.policy()?;
        let claims = self
            .verify_access_token(&input.subject_token)
            .map_err(|e| BrokerError::InvalidGrant(format!("`subject_token`: {e}")))?;
        // Holding the parent's token is not enough: the request must be made with
        // its key.
        if proof.jkt != claims.cnf.jkt {
            return Err(BrokerError::InvalidDpopProof(
                "a sub-agent token is requested with a DPoP proof of the subject token's key"
                    .into(),
            ));
        }
        let parent_id: GrantId = claims
            .grant_id
            .parse()
            .map_err(|_| BrokerError::InvalidGrant("`subject_token` names no grant".into()))?;
        let actor = match &input.actor_token {
            Some(t) => {
                self.identity
                    .verify(t, now.unix_seconds())
                    .await
                    .map_err(|e| {
                        if e.is_unavailable() {
                            BrokerError::Unavailable(e.to_string())
                        } else {
                            BrokerError::InvalidGrant(format!("`actor_token`: {e}"))
                        }
                    })?
                    .id
            }
            None => thumbprint_uri(input.dpop_jkt.as_deref().unwrap_or(&proof.jkt)),
        };
        if let Some(jkt) = &input.dpop_jkt
            && (jkt.len() != 43
                || !jkt
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(BrokerError::InvalidRequest(
                "`dpop_jkt` must be an RFC 7638 SHA-256 thumbprint (43 base64url characters)"
                    .into(),
            ));
        }
        self.limits
            .token_workload
            .check(&claims.sub)
            .map_err(|wait| {
                BrokerError::TooManyRequests(
                    format!("workload `{}` is over its request rate", clip(&claims.sub)),
                    wait,
                )
            })?;
        // The parent may change under us (a use report, another delegation); the
        // commit checks its version, so a moved parent means read it again.
        for _ in 0..3 {
            let parent = self.find(parent_id, "grant").await.map_err(|_| {
                BrokerError::InvalidGrant("`subject_token`'s grant is unknown".into())
            })?;
            if parent.token_jti.as_deref() != Some(claims.jti.as_str()) {
                return Err(BrokerError::InvalidGrant(
                    "`subject_token` is not its grant's current token".into(),
                ));
            }
            if !parent.is_live(now) {
                return Err(BrokerError::InvalidGrant(format!(
                    "the parent grant `{parent_id}` is {}",
                    if parent.state == GrantState::Active {
                        "expired"
                    } else {
                        parent.state.as_str()
                    }
                )));
            }
            match self.delegate_from(&parent, &input, proof, &actor).await {
                Err(BrokerError::Conflict(_)) => continue,
                other => return other,
            }
        }
        Err(BrokerError::Unavailable(
            "the parent grant kept changing; try again".into(),
        ))
    }

    async fn delegate_from(
        &self,
        parent: &Grant,
        input: &DelegationInput,
        proof: &DpopProof,
        actor: &str,
    ) -> Result<(Issued, Option<TtlCapped>), BrokerError> {
        let now = self.now();
        let policy = self.policy()?;
        let request = hop_request(parent, input, now)?;
        let act = match &parent.act {
            Some(chain) => json!({ "sub": actor, "act": chain }),
            None => json!({ "sub": actor }),
        };
        self.refuse_if_quarantined(&request, Some(self.nonce(proof)), "delegation")
            .await?;
        let decision = policy.decide(&request);
        let id = GrantId::generate();
        let workload = request.workload.id.clone();
        let decided = |decision: &lapse_core::Decision, request: &AccessRequest| {
            event(
                now,
                "access.decided",
                Some(&id),
                &workload,
                json!({ "request": request, "decision": decision, "jkt": proof.jkt, "parent": parent.id.to_string(), "act": act }),
            )
        };
        let refuse = |why: String, policies: Vec<String>| lapse_core::Decision {
            outcome: DecisionOutcome::Deny { reasons: vec![why] },
            policies,
        };
        let widening = Grant::may_delegate(parent, &request, now, self.cfg.max_delegation_depth)
            .map_err(delegation_error);
        let ttl_cap_secs = hop_ttl_cap(parent, &decision.outcome);
        let new = NewGrant {
            id,
            request: request.clone(),
            policies: decision.policies.clone(),
            ttl_cap_secs: ttl_cap_secs.clone().ok().flatten(),
            jkt: input.dpop_jkt.clone().unwrap_or_else(|| proof.jkt.clone()),
            now,
            server_max_ttl_secs: self.cfg.max_ttl.secs(),
            max_lifetime_secs: self.cfg.max_lifetime.secs(),
        };
        let policy_cap_secs = ttl_cap_secs.clone().ok().flatten();
        let child = match (widening, ttl_cap_secs) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(why)) => Err(BrokerError::AccessDenied {
                description: why,
                policies: decision.policies.clone(),
            }),
            (Ok(()), Ok(_)) => Grant::delegate(
                parent,
                new,
                new_jti(),
                act.clone(),
                self.cfg.max_delegation_depth,
            )
            .map_err(delegation_error),
        };
        let child = match child {
            Ok(c) => c,
            Err(e @ (BrokerError::AccessDenied { .. } | BrokerError::InvalidScope(_))) => {
                // A refused hop is recorded like any denial; no grant row exists.
                let recorded = refuse(e.to_string(), decision.policies.clone());
                self.commit(WriteBatch {
                    events: vec![decided(&recorded, &request)],
                    nonces: vec![self.nonce(proof)],
                    ..Default::default()
                })
                .await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let token = self.mint(&child, now)?;
        let capped = input
            .ttl_secs
            .filter(|asked| child.remaining_secs(now) < *asked)
            .map(|asked| TtlCapped {
                requested_secs: asked,
                by: cap_reason(
                    parent.remaining_secs(now),
                    policy_cap_secs,
                    self.cfg.max_ttl.secs(),
                ),
            });
        let mut data = issued_data(&child, &decision, now);
        if let Some(c) = &capped {
            crate::json::set_field(&mut data, "requested_ttl_secs", json!(c.requested_secs));
            crate::json::set_field(&mut data, "ttl_capped_by", json!(c.by));
        }
        crate::json::set_field(&mut data, "parent", json!(parent.id.to_string()));
        crate::json::set_field(&mut data, "act", act.clone());
        crate::json::set_field(&mut data, "depth", json!(child.request.context.depth));
        let issued = event(now, "grant.issued", Some(&child.id), &workload, data);
        let bumped = parent.clone().delegated().map_err(lifecycle)?;
        self.commit(WriteBatch {
            grants: vec![
                GrantWrite::Update {
                    expected_version: parent.version,
                    grant: bumped,
                },
                GrantWrite::Insert(child.clone()),
            ],
            events: vec![decided(&decision, &request), issued],
            nonces: vec![self.nonce(proof)],
            ..Default::default()
        })
        .await
        .map_err(|e| match e {
            lapse_store::StoreError::Conflict(m) => BrokerError::Conflict(m),
            other => other.into(),
        })?;
        self.metrics.active_grants.inc();
        let issued = Issued {
            expires_in: child.remaining_secs(now),
            grant: child,
            access_token: token,
            credentials: vec![],
        };
        Ok((issued, capped))
    }

    /// Every live grant delegated, directly or not, from `grant`.
    pub(crate) async fn live_descendants(&self, grant: &Grant) -> Result<Vec<Grant>, BrokerError> {
        if grant.delegations == 0 {
            return Ok(vec![]);
        }
        // Delegated grants keep their parent's workload and task, so they are among
        // that task's grants.
        let family = self
            .store
            .grants(lapse_store::GrantFilter {
                workload: Some(grant.request.workload.id.clone()),
                task: Some(grant.request.task.id.clone()),
                limit: 10_000,
                ..Default::default()
            })
            .await?;
        let mut ancestors = vec![grant.id];
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(a) = ancestors.get(i).copied() {
            i += 1;
            for g in family.iter().filter(|g| g.parent == Some(a)) {
                ancestors.push(g.id);
                if !g.state.is_ended() {
                    out.push(g.clone());
                }
            }
        }
        Ok(out)
    }

    /// Revocations of `ended`'s live descendants, to commit with its own end.
    pub(crate) async fn cascade(
        &self,
        grant: &Grant,
        ended: &Grant,
    ) -> Result<Vec<(Grant, Grant, lapse_store::AuditEvent)>, BrokerError> {
        let now = self.now();
        let reason = format!(
            "its parent grant `{}` was {}",
            ended.id,
            ended.state.as_str()
        );
        let mut out = Vec::new();
        for d in self.live_descendants(grant).await? {
            let Ok(e) = d.clone().revoke(now, "lapse", &reason) else {
                continue;
            };
            let ev = event(
                now,
                "grant.revoked",
                Some(&d.id),
                "lapse",
                json!({ "reason": reason, "cascade_from": ended.id.to_string() }),
            );
            out.push((d, e, ev));
        }
        Ok(out)
    }
}

/// The request a hop makes: its parent's, for its parent's audience and task,
/// one level deeper, with what the sub-agent asked to narrow.
fn hop_request(
    parent: &Grant,
    input: &DelegationInput,
    now: lapse_core::Timestamp,
) -> Result<AccessRequest, BrokerError> {
    if let Some(a) = &input.audience
        && *a != parent.request.audience
    {
        return Err(BrokerError::InvalidTarget(format!(
            "a sub-agent token is for its parent's audience `{}`, not `{}`",
            parent.request.audience,
            clip(a)
        )));
    }
    let actions = if input.actions.is_empty() {
        parent.actions.clone()
    } else {
        input.actions.clone()
    };
    let request = AccessRequest {
        workload: parent.request.workload.clone(),
        task: Task {
            id: parent.request.task.id.clone(),
            purpose: if input.purpose.trim().is_empty() {
                parent.request.task.purpose.clone()
            } else {
                input.purpose.clone()
            },
            ticket: parent.request.task.ticket.clone(),
        },
        audience: parent.request.audience.clone(),
        actions,
        requested_ttl_secs: input.ttl_secs.unwrap_or_else(|| parent.remaining_secs(now)),
        context: RequestContext {
            environment: parent.request.context.environment.clone(),
            source: input.source,
            time: now,
            break_glass: parent.request.context.break_glass,
            depth: parent.request.context.depth.saturating_add(1),
            tool: None,
        },
        tools: input
            .tools
            .clone()
            .unwrap_or_else(|| parent.request.tools.clone()),
    };
    if request.requested_ttl_secs == 0 {
        return Err(BrokerError::InvalidRequest(
            "`expires_in` must be at least 1 second".into(),
        ));
    }
    Ok(request)
}

/// A hop may need no more approval than its parent was given: approval is not
/// asked for again mid-task, and is never skipped either. Answers the policy's
/// TTL cap, or why the hop is refused.
fn hop_ttl_cap(parent: &Grant, outcome: &DecisionOutcome) -> Result<Option<u64>, String> {
    match outcome {
        DecisionOutcome::Allow { ttl_cap_secs } => Ok(*ttl_cap_secs),
        DecisionOutcome::ApprovalRequired {
            approvals,
            ttl_cap_secs,
            ..
        } if *approvals <= u32::try_from(parent.approvals.len()).unwrap_or(0) => Ok(*ttl_cap_secs),
        DecisionOutcome::ApprovalRequired { approvals, .. } => Err(format!(
            "policy requires {approvals} approvals and the parent grant has {}; a sub-agent cannot wait for approval",
            parent.approvals.len()
        )),
        DecisionOutcome::Deny { reasons } => Err(reasons.join("; ")),
    }
}

/// A hop that would widen its parent, or go too deep, is a scope error; any
/// other lifecycle refusal is a conflict.
fn delegation_error(e: lapse_core::LifecycleError) -> BrokerError {
    match e {
        lapse_core::LifecycleError::DelegationWidens { .. }
        | lapse_core::LifecycleError::TooDeep { .. } => BrokerError::InvalidScope(e.to_string()),
        other => lifecycle(other),
    }
}
