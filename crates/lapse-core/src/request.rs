//! What a workload asks for and what policy answers.

use crate::clock::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A workload whose identity token has been verified. Only the identity crate
/// constructs these from tokens; nothing here proves anything by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadIdentity {
    /// The workload URI, e.g. `spiffe://example.org/ci/deploy`.
    pub id: String,
    /// The `iss` of the identity token that proved it.
    pub issuer: String,
    /// The identity token's `sub`.
    pub subject: String,
    /// Every claim of the identity token, flattened to strings, visible to Cedar as
    /// tags on the `Workload` entity.
    pub claims: BTreeMap<String, String>,
}

/// The unit of work access is for. Access never outlives its task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub purpose: String,
    /// A ticket or change reference, empty when none was given.
    #[serde(default)]
    pub ticket: String,
}

/// The context policy sees, beyond who and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestContext {
    /// Environment the workload says it acts in (`prod`, `staging`), empty when none.
    #[serde(default)]
    pub environment: String,
    /// The network address the request came from.
    pub source: IpAddr,
    /// When the decision is made.
    pub time: Timestamp,
    /// Set when the requester invokes break-glass; only `@break_glass("true")` permits
    /// can allow such a request.
    #[serde(default)]
    pub break_glass: bool,
    /// Hops of delegation behind this request: 0 for a workload's own request, 1
    /// for a sub-agent of it, and so on.
    #[serde(default)]
    pub depth: u32,
    /// The tool call being decided, when a gate (the MCP proxy) asks about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<crate::tools::ToolCall>,
}

/// Workload + task + audience + actions + requested TTL + context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub workload: WorkloadIdentity,
    pub task: Task,
    /// The target the credential is for (the token's `aud`).
    pub audience: String,
    /// Requested actions, deduplicated and sorted; never empty.
    pub actions: Vec<String>,
    /// Requested lifetime in seconds.
    pub requested_ttl_secs: u64,
    pub context: RequestContext,
    /// The tools an agent's task declares (empty: none; such a grant calls no tool
    /// through the MCP proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<crate::tools::ToolDecl>,
}

/// How a decision came out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum DecisionOutcome {
    /// Allowed; `ttl_cap_secs` is the tightest `@max_ttl` of the permits that allowed it.
    Allow { ttl_cap_secs: Option<u64> },
    /// Allowed by policy but only after `approvals` distinct people approve.
    ApprovalRequired {
        approvals: u32,
        ttl_cap_secs: Option<u64>,
        approvers: Option<String>,
    },
    /// Denied, with reasons a requester may see.
    Deny { reasons: Vec<String> },
}

/// A decision, always naming the policies that determined it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    #[serde(flatten)]
    pub outcome: DecisionOutcome,
    /// Ids of the policies that determined the outcome (satisfied permits for an allow,
    /// satisfied forbids for a deny by forbid; empty for a default deny).
    pub policies: Vec<String>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self.outcome, DecisionOutcome::Allow { .. })
    }

    pub fn deny(reason: impl Into<String>, policies: Vec<String>) -> Self {
        Self {
            outcome: DecisionOutcome::Deny {
                reasons: vec![reason.into()],
            },
            policies,
        }
    }

    pub fn outcome_label(&self) -> &'static str {
        match self.outcome {
            DecisionOutcome::Allow { .. } => "allow",
            DecisionOutcome::ApprovalRequired { .. } => "approval_required",
            DecisionOutcome::Deny { .. } => "deny",
        }
    }
}
