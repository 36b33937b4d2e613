//! The grant lifecycle: `pending → active → completed / expired / revoked` (or `denied`).
//!
//! Every transition consumes the grant and returns the next one, or an error that
//! leaves the caller with nothing to persist. There is no path from an ended state
//! back to `active`, and no transition can move `expires_at` past `max_expires_at`.

use crate::clock::Timestamp;
use crate::credential::{CredentialState, ProviderCredential};
use crate::ids::GrantId;
use crate::request::AccessRequest;
use crate::ttl;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    Pending,
    Active,
    Completed,
    Expired,
    Revoked,
    Denied,
}

impl GrantState {
    pub fn is_ended(self) -> bool {
        !matches!(self, Self::Pending | Self::Active)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Denied => "denied",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "active" => Self::Active,
            "completed" => Self::Completed,
            "expired" => Self::Expired,
            "revoked" => Self::Revoked,
            "denied" => Self::Denied,
            _ => return None,
        })
    }
}

impl fmt::Display for GrantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why and by whom a grant ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndReason {
    /// Who ended it: the workload URI, an operator name, or `lapse` for the sweeper.
    pub by: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error("grant `{id}` has already ended ({state})")]
    Ended { id: GrantId, state: GrantState },
    #[error("grant `{id}` is {state}, not active")]
    NotActive { id: GrantId, state: GrantState },
    #[error("grant `{id}` is {state}, not pending")]
    NotPending { id: GrantId, state: GrantState },
    #[error("grant `{id}` has not reached its expiry")]
    NotYetExpired { id: GrantId },
    #[error("grant `{id}` has reached its maximum lifetime and cannot be renewed")]
    MaximumLifetimeReached { id: GrantId },
    #[error("a credential lifetime of zero seconds cannot be issued")]
    ZeroTtl,
    #[error("a delegated grant may only narrow its parent `{parent}`: {why}")]
    DelegationWidens { parent: GrantId, why: String },
    #[error("delegation from grant `{parent}` would be {depth} hops deep; the limit is {limit}")]
    TooDeep {
        parent: GrantId,
        depth: u32,
        limit: u32,
    },
    #[error("`{by}` has already approved request `{id}`; one approver counts once")]
    AlreadyApproved { id: GrantId, by: String },
    #[error("an approval may only narrow request `{id}`: {what}")]
    Widening { id: GrantId, what: String },
    #[error("request `{id}` can no longer be approved: its approval window has passed")]
    ApprovalWindowPassed { id: GrantId },
    #[error("grant `{id}` has no break-glass review")]
    NoReview { id: GrantId },
    #[error("the review of grant `{id}` is already closed")]
    ReviewClosed { id: GrantId },
}

/// A grant and everything needed to decide its next transition without outside state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: GrantId,
    /// Exactly what was asked, kept so renewal can re-evaluate the same request.
    pub request: AccessRequest,
    /// The actions the credential carries; never wider than `request.actions`.
    pub actions: Vec<String>,
    pub state: GrantState,
    /// Policies that determined the most recent decision on this grant.
    pub policies: Vec<String>,
    /// The `@max_ttl` cap that applied at the most recent decision.
    pub ttl_cap_secs: Option<u64>,
    /// Approvals the decision required (0 when none).
    pub approvals_required: u32,
    pub created_at: Timestamp,
    /// For an active grant, when its current credential expires; for a pending one,
    /// when the request stops being approvable.
    /// INVARIANT: `expires_at <= max_expires_at` once active.
    pub expires_at: Timestamp,
    /// The grant's maximum lifetime; no renewal passes it.
    pub max_expires_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub end: Option<EndReason>,
    /// RFC 7638 thumbprint of the DPoP key every credential of this grant is bound to.
    pub jkt: String,
    /// `jti` of the most recently issued access token.
    pub token_jti: Option<String>,
    pub renewals: u32,
    /// Credentials providers made for this grant beside its token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<ProviderCredential>,
    /// The group whose members may approve (`@approvers`); `None`: any approver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<String>,
    /// Approvals given so far, each by a distinct approver.
    /// INVARIANT: no two entries have the same `by`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<crate::approval::Approval>,
    /// Whether the workload has received the credentials of an approved request.
    /// Directly issued grants hand them out in the answer that creates them.
    #[serde(default = "yes")]
    pub delivered: bool,
    /// When an approved request's credentials were handed over (its provider
    /// credentials are created then, not at approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Timestamp>,
    /// A break-glass grant's mandatory review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<crate::review::Review>,
    /// `@idle`: revoked when no use is reported for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u64>,
    /// The latest use a gate reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Timestamp>,
    /// RFC 8705 `x5t#S256` of the client certificate the workload authenticated
    /// with (mTLS); its tokens are bound to that certificate as well as the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5t: Option<String>,
    /// The grant this one was delegated from (a sub-agent's); it ends when that ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<GrantId>,
    /// RFC 8693 `act`: who acts, and behind it who delegated, outermost first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<serde_json::Value>,
    /// How many grants were delegated from this one (so ending it looks for them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delegations: u32,
    /// Optimistic-concurrency version; the store refuses a write whose version moved.
    pub version: u64,
}

fn yes() -> bool {
    true
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Parameters of a new grant that the lifecycle needs from the decision.
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub id: GrantId,
    pub request: AccessRequest,
    pub policies: Vec<String>,
    pub ttl_cap_secs: Option<u64>,
    pub jkt: String,
    pub now: Timestamp,
    /// Server `max_ttl` in seconds.
    pub server_max_ttl_secs: u64,
    /// Server maximum lifetime of a grant across renewals, in seconds.
    pub max_lifetime_secs: u64,
}

impl Grant {
    /// An allowed request becomes an active grant whose credential lives
    /// `min(requested, policy cap, server max_ttl)`.
    pub fn issue(new: NewGrant, jti: String) -> Result<Self, LifecycleError> {
        let ttl = ttl::effective_ttl_secs(
            new.request.requested_ttl_secs,
            new.ttl_cap_secs,
            new.server_max_ttl_secs,
        );
        if ttl == 0 {
            return Err(LifecycleError::ZeroTtl);
        }
        let max_expires_at = new.now.plus_secs(new.max_lifetime_secs);
        Ok(Self {
            id: new.id,
            actions: new.request.actions.clone(),
            request: new.request,
            state: GrantState::Active,
            policies: new.policies,
            ttl_cap_secs: new.ttl_cap_secs,
            approvals_required: 0,
            created_at: new.now,
            expires_at: ttl::expiry(new.now, ttl, max_expires_at),
            max_expires_at,
            ended_at: None,
            end: None,
            jkt: new.jkt,
            token_jti: Some(jti),
            renewals: 0,
            credentials: Vec::new(),
            approvers: None,
            approvals: Vec::new(),
            delivered: true,
            delivered_at: None,
            review: None,
            idle_secs: None,
            last_used_at: None,
            x5t: None,
            parent: None,
            act: None,
            delegations: 0,
            version: 1,
        })
    }

    /// A request that needs approval becomes a pending grant, approvable until
    /// `now + approval_window_secs`.
    pub fn pending(
        new: NewGrant,
        approvals: u32,
        approvers: Option<String>,
        approval_window_secs: u64,
    ) -> Self {
        Self {
            id: new.id,
            actions: new.request.actions.clone(),
            request: new.request,
            state: GrantState::Pending,
            policies: new.policies,
            ttl_cap_secs: new.ttl_cap_secs,
            approvals_required: approvals,
            created_at: new.now,
            expires_at: new.now.plus_secs(approval_window_secs),
            max_expires_at: new
                .now
                .plus_secs(approval_window_secs.saturating_add(new.max_lifetime_secs)),
            ended_at: None,
            end: None,
            jkt: new.jkt,
            token_jti: None,
            renewals: 0,
            credentials: Vec::new(),
            approvers,
            approvals: Vec::new(),
            delivered: false,
            delivered_at: None,
            review: None,
            idle_secs: None,
            last_used_at: None,
            x5t: None,
            parent: None,
            act: None,
            delegations: 0,
            version: 1,
        }
    }

    /// A sub-agent's grant delegated from `parent` (active, unexpired): the same
    /// workload, audience and task, actions and tools a subset of the parent's, and
    /// a credential that never outlives the parent's current one (nor can renewal
    /// take it past that). `new.request.context.depth` is the depth asked for;
    /// `act` the RFC 8693 actor chain.
    pub fn delegate(
        parent: &Grant,
        new: NewGrant,
        jti: String,
        act: serde_json::Value,
        max_depth: u32,
    ) -> Result<Self, LifecycleError> {
        Self::may_delegate(parent, &new.request, new.now, max_depth)?;
        let mut g = Self::issue(
            NewGrant {
                // Renewal may never take a child past the parent's credential.
                max_lifetime_secs: new.now.secs_until(parent.expires_at),
                ..new
            },
            jti,
        )?;
        g.x5t.clone_from(&parent.x5t);
        g.parent = Some(parent.id);
        g.act = Some(act);
        Ok(g)
    }

    /// Whether `r` may be delegated from `parent` at `now`: the checks of
    /// [`Grant::delegate`] that need no decision, so a widening request is refused
    /// as such before policy is asked.
    pub fn may_delegate(
        parent: &Grant,
        r: &AccessRequest,
        now: Timestamp,
        max_depth: u32,
    ) -> Result<(), LifecycleError> {
        parent.require_active()?;
        if now.secs_until(parent.expires_at) == 0 {
            return Err(LifecycleError::Ended {
                id: parent.id,
                state: GrantState::Expired,
            });
        }
        let widening = |why: String| LifecycleError::DelegationWidens {
            parent: parent.id,
            why,
        };
        let depth = parent.request.context.depth.saturating_add(1);
        if r.context.depth != depth {
            return Err(widening(format!("depth must be {depth}")));
        }
        if depth > max_depth {
            return Err(LifecycleError::TooDeep {
                parent: parent.id,
                depth,
                limit: max_depth,
            });
        }
        if r.workload.id != parent.request.workload.id {
            return Err(widening("the workload must be the parent's".into()));
        }
        if r.audience != parent.request.audience {
            return Err(widening(format!(
                "the audience must be the parent's (`{}`)",
                parent.request.audience
            )));
        }
        if r.task.id != parent.request.task.id {
            return Err(widening(format!(
                "the task must be the parent's (`{}`)",
                parent.request.task.id
            )));
        }
        if r.context.break_glass && !parent.request.context.break_glass {
            return Err(widening("break-glass cannot be added".into()));
        }
        if let Some(a) = r.actions.iter().find(|a| !parent.actions.contains(a)) {
            return Err(widening(format!(
                "action `{a}` is not granted to the parent"
            )));
        }
        crate::tools::narrows(&r.tools, &parent.request.tools)
            .map_err(|e| widening(e.to_string()))?;
        Ok(())
    }

    /// Records that a grant was delegated from this one.
    pub fn delegated(mut self) -> Result<Self, LifecycleError> {
        self.require_active()?;
        self.delegations = self.delegations.saturating_add(1);
        self.version += 1;
        Ok(self)
    }

    /// Seconds the current credential has left at `now`.
    pub fn remaining_secs(&self, now: Timestamp) -> u64 {
        now.secs_until(self.expires_at)
    }

    /// Whether a credential of this grant may be honoured at `now`.
    /// When an active grant with an idle window is due to be revoked for lack of
    /// use: its idle window after its latest reported use, or after the workload
    /// received it. An approved request not yet collected has no deadline: slow
    /// approvers must not make it idle before it was ever held.
    pub fn idle_deadline(&self) -> Option<Timestamp> {
        if self.state != GrantState::Active || !self.delivered {
            return None;
        }
        let start = self.delivered_at.unwrap_or(self.created_at);
        let since = self.last_used_at.map_or(start, |u| u.max(start));
        self.idle_secs.map(|s| since.plus_secs(s))
    }

    /// Records a use reported at `at`; false when it adds nothing (older, or the
    /// grant is not active).
    pub fn used(&mut self, at: Timestamp) -> bool {
        if self.state != GrantState::Active || self.last_used_at.is_some_and(|t| t >= at) {
            return false;
        }
        self.last_used_at = Some(at);
        self.version += 1;
        true
    }

    pub fn is_live(&self, now: Timestamp) -> bool {
        self.state == GrantState::Active && now < self.expires_at
    }

    fn end(mut self, state: GrantState, now: Timestamp, end: EndReason) -> Self {
        self.state = state;
        self.ended_at = Some(now);
        self.end = Some(end);
        // Ending a grant always owes the destruction of what it handed out.
        for c in &mut self.credentials {
            c.schedule_destroy(now);
        }
        self.version += 1;
        self
    }

    /// Records that a provider will create `credential` for this active grant.
    pub fn intend_credential(
        mut self,
        credential: ProviderCredential,
    ) -> Result<Self, LifecycleError> {
        self.require_active()?;
        self.credentials.push(credential);
        self.version += 1;
        Ok(self)
    }

    /// The provider created the credential named `name`.
    pub fn credential_created(mut self, name: &str, now: Timestamp) -> Self {
        for c in self.credentials.iter_mut().filter(|c| c.name == name) {
            if c.state == CredentialState::Intended {
                c.state = CredentialState::Live;
                c.created_at = Some(now);
            }
        }
        self.version += 1;
        self
    }

    /// The provider destroyed `name` (or found it already gone).
    pub fn credential_destroyed(mut self, name: &str, now: Timestamp) -> Self {
        for c in self.credentials.iter_mut().filter(|c| c.name == name) {
            c.mark_destroyed(now);
        }
        self.version += 1;
        self
    }

    /// Destroying `name` failed; it is retried after a backoff.
    pub fn credential_destroy_failed(mut self, name: &str, now: Timestamp, error: &str) -> Self {
        for c in self.credentials.iter_mut().filter(|c| c.name == name) {
            c.mark_failed(now, error);
        }
        self.version += 1;
        self
    }

    /// When the next owed credential destruction is due: `None` when nothing is owed.
    pub fn cleanup_due_at(&self) -> Option<Timestamp> {
        self.credentials
            .iter()
            .filter(|c| c.state == CredentialState::Destroying)
            .filter_map(|c| c.next_attempt_at)
            .min()
    }

    fn require_active(&self) -> Result<(), LifecycleError> {
        match self.state {
            GrantState::Active => Ok(()),
            s if s.is_ended() => Err(LifecycleError::Ended {
                id: self.id,
                state: s,
            }),
            s => Err(LifecycleError::NotActive {
                id: self.id,
                state: s,
            }),
        }
    }

    /// The workload says its task is over.
    pub fn complete(self, now: Timestamp, by: &str, reason: &str) -> Result<Self, LifecycleError> {
        self.require_active()?;
        Ok(self.end(
            GrantState::Completed,
            now,
            EndReason {
                by: by.to_owned(),
                reason: reason.to_owned(),
            },
        ))
    }

    /// Someone with authority ends it early. Pending grants can be revoked too.
    pub fn revoke(self, now: Timestamp, by: &str, reason: &str) -> Result<Self, LifecycleError> {
        if self.state.is_ended() {
            return Err(LifecycleError::Ended {
                id: self.id,
                state: self.state,
            });
        }
        Ok(self.end(
            GrantState::Revoked,
            now,
            EndReason {
                by: by.to_owned(),
                reason: reason.to_owned(),
            },
        ))
    }

    /// The sweeper ends a grant whose time is up (an active grant's credential, or a
    /// pending grant's approval window).
    pub fn expire(self, now: Timestamp) -> Result<Self, LifecycleError> {
        if self.state.is_ended() {
            return Err(LifecycleError::Ended {
                id: self.id,
                state: self.state,
            });
        }
        if now < self.expires_at {
            return Err(LifecycleError::NotYetExpired { id: self.id });
        }
        let reason = if self.state == GrantState::Pending {
            "approval window passed"
        } else {
            "ttl reached"
        };
        Ok(self.end(
            GrantState::Expired,
            now,
            EndReason {
                by: "lapse".to_owned(),
                reason: reason.to_owned(),
            },
        ))
    }

    /// Renewal after a fresh allow decision: a new credential of at most `ttl` seconds
    /// (already capped by the caller's fresh policy cap and server max), never past the
    /// maximum lifetime.
    pub fn renew(
        mut self,
        now: Timestamp,
        ttl_secs: u64,
        policies: Vec<String>,
        ttl_cap_secs: Option<u64>,
        jti: String,
    ) -> Result<Self, LifecycleError> {
        self.require_active()?;
        if now >= self.expires_at {
            // A lapsed credential is not renewable: the sweeper will end the grant.
            return Err(LifecycleError::Ended {
                id: self.id,
                state: GrantState::Expired,
            });
        }
        if ttl_secs == 0 {
            return Err(LifecycleError::ZeroTtl);
        }
        if now >= self.max_expires_at {
            return Err(LifecycleError::MaximumLifetimeReached { id: self.id });
        }
        let new_expiry = ttl::expiry(now, ttl_secs, self.max_expires_at);
        if new_expiry <= self.expires_at && self.expires_at >= self.max_expires_at {
            return Err(LifecycleError::MaximumLifetimeReached { id: self.id });
        }
        self.expires_at = new_expiry;
        for c in &mut self.credentials {
            if c.state == CredentialState::Live {
                c.valid_until = new_expiry;
            }
        }
        self.policies = policies;
        self.ttl_cap_secs = ttl_cap_secs;
        self.token_jti = Some(jti);
        self.renewals += 1;
        self.version += 1;
        Ok(self)
    }

    /// A pending grant whose approvals are complete becomes active.
    pub fn activate(
        mut self,
        now: Timestamp,
        server_max_ttl_secs: u64,
        max_lifetime_secs: u64,
        jti: String,
    ) -> Result<Self, LifecycleError> {
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
            return Err(LifecycleError::Ended {
                id: self.id,
                state: GrantState::Expired,
            });
        }
        let ttl = ttl::effective_ttl_secs(
            self.request.requested_ttl_secs,
            self.ttl_cap_secs,
            server_max_ttl_secs,
        );
        if ttl == 0 {
            return Err(LifecycleError::ZeroTtl);
        }
        self.max_expires_at = now.plus_secs(max_lifetime_secs);
        self.expires_at = ttl::expiry(now, ttl, self.max_expires_at);
        self.state = GrantState::Active;
        self.token_jti = Some(jti);
        self.version += 1;
        Ok(self)
    }

    /// A pending grant refused by a person.
    pub fn deny(self, now: Timestamp, by: &str, reason: &str) -> Result<Self, LifecycleError> {
        match self.state {
            GrantState::Pending => Ok(self.end(
                GrantState::Denied,
                now,
                EndReason {
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                },
            )),
            s if s.is_ended() => Err(LifecycleError::Ended {
                id: self.id,
                state: s,
            }),
            s => Err(LifecycleError::NotPending {
                id: self.id,
                state: s,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::request::{RequestContext, Task, WorkloadIdentity};
    use std::collections::BTreeMap;

    pub(crate) fn t(s: i64) -> Timestamp {
        Timestamp::from_unix_seconds(s)
    }

    pub(crate) fn new_grant_with(requested: u64, cap: Option<u64>, actions: &[&str]) -> NewGrant {
        NewGrant {
            id: GrantId::generate(),
            request: AccessRequest {
                workload: WorkloadIdentity {
                    id: "spiffe://example.org/ci".into(),
                    issuer: "https://issuer".into(),
                    subject: "ci".into(),
                    claims: BTreeMap::new(),
                },
                task: Task {
                    id: "T-1".into(),
                    purpose: "deploy".into(),
                    ticket: String::new(),
                },
                audience: "orders".into(),
                actions: actions.iter().map(|a| (*a).to_owned()).collect(),
                requested_ttl_secs: requested,
                context: RequestContext {
                    environment: "prod".into(),
                    source: "127.0.0.1"
                        .parse()
                        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
                    time: t(1000),
                    break_glass: false,
                    depth: 0,
                    tool: None,
                },
                tools: Vec::new(),
            },
            policies: vec!["p1".into()],
            ttl_cap_secs: cap,
            jkt: "jkt".into(),
            now: t(1000),
            server_max_ttl_secs: 3600,
            max_lifetime_secs: 1800,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{new_grant_with, t};
    use super::*;

    fn new_grant(requested: u64, cap: Option<u64>) -> NewGrant {
        new_grant_with(requested, cap, &["read"])
    }

    #[test]
    fn delegation_only_narrows_and_never_outlives_the_parent() -> Result<(), LifecycleError> {
        let tools = |v: serde_json::Value| -> Vec<crate::ToolDecl> {
            serde_json::from_value(v).unwrap_or_default()
        };
        let mut p = new_grant_with(600, None, &["read", "write"]);
        p.request.tools = tools(
            serde_json::json!([{ "name": "read_file", "args": { "path": { "prefix": "/data/" } } }, { "name": "query" }]),
        );
        let parent = Grant::issue(p, "jp".into())?;
        let child_req = |actions: &[&str], ttl: u64, depth: u32| {
            let mut n = new_grant_with(ttl, None, actions);
            n.now = t(1100);
            n.request.context.depth = depth;
            n.request.tools = tools(
                serde_json::json!([{ "name": "read_file", "args": { "path": { "prefix": "/data/x/" } } }]),
            );
            n
        };
        let act = serde_json::json!({ "sub": "agent-2" });
        let c = Grant::delegate(
            &parent,
            child_req(&["read"], 3600, 1),
            "jc".into(),
            act.clone(),
            3,
        )?;
        assert_eq!(c.parent, Some(parent.id));
        assert_eq!(
            c.expires_at, parent.expires_at,
            "capped at the parent's expiry"
        );
        assert_eq!(c.max_expires_at, parent.expires_at);
        assert!(
            c.clone()
                .renew(t(1500), 600, vec![], None, "r".into())
                .is_err(),
            "renewal cannot pass the parent"
        );
        // Widening: an action, a tool, a looser constraint, another audience or task.
        assert!(matches!(
            Grant::delegate(
                &parent,
                child_req(&["read", "admin"], 60, 1),
                "j".into(),
                act.clone(),
                3
            ),
            Err(LifecycleError::DelegationWidens { .. })
        ));
        let mut n = child_req(&["read"], 60, 1);
        n.request.tools = tools(serde_json::json!([{ "name": "read_file" }]));
        assert!(matches!(
            Grant::delegate(&parent, n, "j".into(), act.clone(), 3),
            Err(LifecycleError::DelegationWidens { .. })
        ));
        let mut n = child_req(&["read"], 60, 1);
        n.request.tools = tools(serde_json::json!([{ "name": "transfer" }]));
        assert!(matches!(
            Grant::delegate(&parent, n, "j".into(), act.clone(), 3),
            Err(LifecycleError::DelegationWidens { .. })
        ));
        let mut n = child_req(&["read"], 60, 1);
        n.request.audience = "payments".into();
        assert!(matches!(
            Grant::delegate(&parent, n, "j".into(), act.clone(), 3),
            Err(LifecycleError::DelegationWidens { .. })
        ));
        let mut n = child_req(&["read"], 60, 1);
        n.request.task.id = "other".into();
        assert!(matches!(
            Grant::delegate(&parent, n, "j".into(), act.clone(), 3),
            Err(LifecycleError::DelegationWidens { .. })
        ));
        // Depth: one more than the parent's, within the limit.
        assert!(
            Grant::delegate(
                &parent,
                child_req(&["read"], 60, 2),
                "j".into(),
                act.clone(),
                3
            )
            .is_err()
        );
        let grandchild =
            Grant::delegate(&c, child_req(&["read"], 60, 2), "j".into(), act.clone(), 2)?;
        assert!(matches!(
            Grant::delegate(
                &grandchild,
                child_req(&["read"], 60, 3),
                "j".into(),
                act.clone(),
                2
            ),
            Err(LifecycleError::TooDeep {
                depth: 3,
                limit: 2,
                ..
            })
        ));
        // An ended parent delegates nothing.
        let ended = parent.clone().revoke(t(1050), "op", "done")?;
        assert!(Grant::delegate(&ended, child_req(&["read"], 60, 1), "j".into(), act, 3).is_err());
        let bumped = parent.clone().delegated()?;
        assert_eq!(
            (bumped.delegations, bumped.version),
            (1, parent.version + 1)
        );
        Ok(())
    }

    #[test]
    fn issue_caps_ttl_at_every_ceiling() -> Result<(), LifecycleError> {
        let g = Grant::issue(new_grant(600, Some(300)), "j".into())?;
        assert_eq!(g.expires_at, t(1300));
        let g = Grant::issue(new_grant(100_000, None), "j".into())?;
        assert_eq!(
            g.expires_at,
            t(1000 + 1800),
            "max lifetime caps the first ttl too"
        );
        assert!(matches!(
            Grant::issue(new_grant(0, None), "j".into()),
            Err(LifecycleError::ZeroTtl)
        ));
        Ok(())
    }

    #[test]
    fn ended_grants_never_return_to_active() -> Result<(), LifecycleError> {
        let active = Grant::issue(new_grant(600, None), "j".into())?;
        let ended = [
            active.clone().complete(t(1100), "w", "done")?,
            active.clone().revoke(t(1100), "op", "why")?,
            active.clone().expire(t(1600))?,
        ];
        for g in ended {
            assert!(g.state.is_ended());
            assert!(g.clone().complete(t(1200), "w", "x").is_err());
            assert!(g.clone().revoke(t(1200), "w", "x").is_err());
            assert!(g.clone().expire(t(5000)).is_err());
            assert!(
                g.clone()
                    .renew(t(1200), 60, vec![], None, "j2".into())
                    .is_err()
            );
            assert!(g.clone().activate(t(1200), 600, 600, "j2".into()).is_err());
            assert!(!g.is_live(t(1200)));
        }
        Ok(())
    }

    #[test]
    fn idle_deadlines_follow_use_and_never_precede_delivery() -> Result<(), LifecycleError> {
        let mut g = Grant::issue(new_grant(600, None), "j".into())?;
        assert_eq!(g.idle_deadline(), None, "no @idle, no deadline");
        g.idle_secs = Some(60);
        assert_eq!(g.idle_deadline(), Some(t(1060)), "from issue");
        let v = g.version;
        assert!(g.used(t(1030)));
        assert_eq!(g.version, v + 1);
        assert_eq!(g.idle_deadline(), Some(t(1090)), "from the latest use");
        assert!(!g.used(t(1020)), "an older use adds nothing");
        assert_eq!(g.idle_deadline(), Some(t(1090)));
        // Not yet collected: no deadline; then it runs from delivery.
        g.delivered = false;
        assert_eq!(g.idle_deadline(), None);
        g.delivered = true;
        g.delivered_at = Some(t(1200));
        assert_eq!(
            g.idle_deadline(),
            Some(t(1260)),
            "delivery after the last use"
        );
        let ended = g.clone().revoke(t(1300), "op", "x")?;
        assert_eq!(ended.idle_deadline(), None);
        let mut ended = ended;
        assert!(!ended.used(t(1400)), "an ended grant records no use");
        Ok(())
    }

    #[test]
    fn expire_waits_for_expiry() -> Result<(), LifecycleError> {
        let g = Grant::issue(new_grant(600, None), "j".into())?;
        assert!(matches!(
            g.clone().expire(t(1599)),
            Err(LifecycleError::NotYetExpired { .. })
        ));
        assert_eq!(g.expire(t(1600))?.state, GrantState::Expired);
        Ok(())
    }

    #[test]
    fn renewal_is_capped_by_maximum_lifetime() -> Result<(), LifecycleError> {
        let g = Grant::issue(new_grant(600, None), "j".into())?;
        // max lifetime: 1000 + 1800 = 2800
        let g = g.renew(t(1500), 600, vec!["p".into()], None, "j2".into())?;
        assert_eq!(g.expires_at, t(2100));
        let g = g.renew(t(2000), 600, vec!["p".into()], None, "j3".into())?;
        assert_eq!(g.expires_at, t(2600));
        let g = g.renew(t(2500), 600, vec!["p".into()], None, "j4".into())?;
        assert_eq!(g.expires_at, t(2800), "capped at the maximum lifetime");
        assert!(matches!(
            g.clone().renew(t(2700), 600, vec![], None, "j5".into()),
            Err(LifecycleError::MaximumLifetimeReached { .. })
        ));
        assert_eq!(g.renewals, 3);
        Ok(())
    }

    #[test]
    fn lapsed_credentials_are_not_renewable() -> Result<(), LifecycleError> {
        let g = Grant::issue(new_grant(60, None), "j".into())?;
        assert!(g.renew(t(1060), 60, vec![], None, "j2".into()).is_err());
        Ok(())
    }

    #[test]
    fn pending_grants_activate_within_their_window_only() -> Result<(), LifecycleError> {
        let p = Grant::pending(new_grant(600, Some(120)), 2, None, 300);
        assert_eq!(p.state, GrantState::Pending);
        assert!(p.clone().complete(t(1010), "w", "x").is_err());
        let a = p.clone().activate(t(1100), 3600, 1800, "j".into())?;
        assert_eq!(a.state, GrantState::Active);
        assert_eq!(a.expires_at, t(1220), "policy cap applies at activation");
        assert!(p.clone().activate(t(1300), 3600, 1800, "j".into()).is_err());
        assert_eq!(p.clone().expire(t(1300))?.state, GrantState::Expired);
        assert_eq!(p.deny(t(1010), "alice", "no")?.state, GrantState::Denied);
        Ok(())
    }

    #[test]
    fn every_way_of_ending_owes_the_destruction_of_credentials() -> Result<(), LifecycleError> {
        let g = Grant::issue(new_grant(600, None), "j".into())?;
        let g = g
            .intend_credential(ProviderCredential::intended(
                "postgres",
                "orders",
                "r1",
                t(1600),
            ))?
            .credential_created("r1", t(1001));
        assert_eq!(g.credentials[0].state, CredentialState::Live);
        assert_eq!(g.cleanup_due_at(), None, "nothing owed while active");
        let renewed = g.clone().renew(t(1100), 600, vec![], None, "j2".into())?;
        assert_eq!(renewed.credentials[0].valid_until, renewed.expires_at);
        for ended in [
            g.clone().complete(t(1200), "w", "done")?,
            g.clone().revoke(t(1200), "op", "why")?,
            g.clone().expire(t(1600))?,
        ] {
            assert_eq!(ended.credentials[0].state, CredentialState::Destroying);
            assert_eq!(ended.cleanup_due_at(), ended.ended_at);
        }
        Ok(())
    }

    #[test]
    fn failed_destroys_back_off_and_success_clears_the_debt() -> Result<(), LifecycleError> {
        let g = Grant::issue(new_grant(600, None), "j".into())?
            .intend_credential(ProviderCredential::intended(
                "postgres",
                "orders",
                "r1",
                t(1600),
            ))?
            .revoke(t(1100), "op", "why")?;
        let f1 = g.credential_destroy_failed("r1", t(1100), "down");
        assert_eq!(f1.cleanup_due_at(), Some(t(1101)));
        let f2 = f1.credential_destroy_failed("r1", t(1101), "down");
        assert_eq!(f2.cleanup_due_at(), Some(t(1103)));
        let mut f = f2;
        for _ in 0..20 {
            f = f.credential_destroy_failed("r1", t(2000), "down");
        }
        assert_eq!(f.cleanup_due_at(), Some(t(2000 + 60)), "backoff is bounded");
        assert_eq!(f.credentials[0].last_error.as_deref(), Some("down"));
        let done = f.credential_destroyed("r1", t(2100));
        assert_eq!(done.cleanup_due_at(), None);
        assert_eq!(done.credentials[0].state, CredentialState::Destroyed);
        assert!(matches!(
            done.intend_credential(ProviderCredential::intended(
                "postgres",
                "orders",
                "r2",
                t(1600)
            )),
            Err(LifecycleError::Ended { .. })
        ));
        Ok(())
    }
}
