//! Policy test files: a TOML list of requests and the decisions they must get.
//!
//! ```toml
//! [defaults]                      # optional, applies to every case
//! time = "2026-11-24T10:00:00Z"
//!
//! [[case]]
//! name = "ci reads orders in prod"
//! workload = "spiffe://example.org/ci/deploy"
//! audience = "orders-db"
//! actions = ["read"]
//! ttl = "10m"
//! environment = "prod"
//! expect = "allow"                # allow | deny | approval
//! expect_ttl = "15m"              # optional: the policy cap
//! ```

use crate::bundle::PolicyBundle;
use lapse_core::{
    AccessRequest, DecisionOutcome, RequestContext, Task, Timestamp, TtlDuration, WorkloadIdentity,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(default)]
    pub defaults: CaseFields,
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFields {
    pub workload: Option<String>,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub claims: Option<BTreeMap<String, String>>,
    pub audience: Option<String>,
    pub actions: Option<Vec<String>>,
    pub ttl: Option<TtlDuration>,
    pub task: Option<String>,
    pub purpose: Option<String>,
    pub ticket: Option<String>,
    pub environment: Option<String>,
    pub source: Option<IpAddr>,
    pub time: Option<String>,
    pub break_glass: Option<bool>,
    /// Tools the task declares: names, or full declarations as JSON text (with
    /// argument constraints, which Cedar sees as `context.constraints`).
    pub tools: Option<Vec<String>>,
    /// Delegation depth (0: the workload's own request).
    pub depth: Option<u32>,
    /// A tool call to decide (as the MCP proxy does), with its arguments.
    pub tool: Option<String>,
    pub args: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(flatten)]
    pub fields: CaseFields,
    pub expect: Expect,
    pub expect_ttl: Option<TtlDuration>,
    pub expect_approvals: Option<u32>,
    pub expect_policies: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Allow,
    Deny,
    Approval,
}

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("invalid policy test file: {0}")]
    Parse(String),
    #[error("case `{case}`: {message}")]
    Incomplete { case: String, message: String },
}

/// The outcome of one case.
#[derive(Debug, serde::Serialize)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    /// What differed, empty when passed.
    pub failures: Vec<String>,
    pub decision: lapse_core::Decision,
}

pub fn parse(text: &str) -> Result<CaseFile, CaseError> {
    toml::from_str(text).map_err(|e| CaseError::Parse(e.to_string()))
}

/// Runs every case against `bundle`.
pub fn run(bundle: &PolicyBundle, file: &CaseFile) -> Result<Vec<CaseResult>, CaseError> {
    file.cases
        .iter()
        .map(|c| run_one(bundle, &file.defaults, c))
        .collect()
}

fn run_one(
    bundle: &PolicyBundle,
    defaults: &CaseFields,
    case: &Case,
) -> Result<CaseResult, CaseError> {
    let request = request_of(defaults, case)?;
    let decision = bundle.decide(&request);
    let mut failures = Vec::new();
    let (got, cap, approvals) = match &decision.outcome {
        DecisionOutcome::Allow { ttl_cap_secs } => (Expect::Allow, *ttl_cap_secs, 0),
        DecisionOutcome::ApprovalRequired {
            approvals,
            ttl_cap_secs,
            ..
        } => (Expect::Approval, *ttl_cap_secs, *approvals),
        DecisionOutcome::Deny { .. } => (Expect::Deny, None, 0),
    };
    if got != case.expect {
        failures.push(format!("expected {:?}, got {:?}", case.expect, got).to_lowercase());
    }
    if let Some(want) = case.expect_ttl
        && cap != Some(want.secs())
    {
        let got = cap.map_or("no cap".to_owned(), |c| {
            TtlDuration::from_secs(c).to_string()
        });
        failures.push(format!("expected ttl cap {want}, got {got}"));
    }
    if let Some(want) = case.expect_approvals
        && approvals != want
    {
        failures.push(format!("expected {want} approvals, got {approvals}"));
    }
    if let Some(want) = &case.expect_policies {
        let mut want = want.clone();
        want.sort();
        if want != decision.policies {
            failures.push(format!(
                "expected policies {want:?}, got {:?}",
                decision.policies
            ));
        }
    }
    Ok(CaseResult {
        name: case.name.clone(),
        passed: failures.is_empty(),
        failures,
        decision,
    })
}

fn request_of(defaults: &CaseFields, case: &Case) -> Result<AccessRequest, CaseError> {
    let f = &case.fields;
    let missing = |what: &str| CaseError::Incomplete {
        case: case.name.clone(),
        message: format!("`{what}` is required (in the case or in [defaults])"),
    };
    macro_rules! pick {
        ($field:ident) => {
            f.$field.clone().or_else(|| defaults.$field.clone())
        };
    }
    let workload = pick!(workload).ok_or_else(|| missing("workload"))?;
    let audience = pick!(audience).ok_or_else(|| missing("audience"))?;
    let mut actions = pick!(actions).ok_or_else(|| missing("actions"))?;
    actions.sort();
    actions.dedup();
    let time = match pick!(time) {
        Some(t) => Timestamp::parse_rfc3339(&t).ok_or_else(|| CaseError::Incomplete {
            case: case.name.clone(),
            message: format!("`time` `{t}` is not RFC 3339"),
        })?,
        None => Timestamp::from_unix_seconds(0),
    };
    Ok(AccessRequest {
        workload: WorkloadIdentity {
            subject: pick!(subject).unwrap_or_else(|| workload.clone()),
            id: workload,
            issuer: pick!(issuer).unwrap_or_else(|| "https://issuer.test".to_owned()),
            claims: pick!(claims).unwrap_or_default(),
        },
        task: Task {
            id: pick!(task).unwrap_or_else(|| "test-task".to_owned()),
            purpose: pick!(purpose).unwrap_or_else(|| "policy test".to_owned()),
            ticket: pick!(ticket).unwrap_or_default(),
        },
        audience,
        actions,
        requested_ttl_secs: pick!(ttl).map_or(600, TtlDuration::secs),
        context: RequestContext {
            environment: pick!(environment).unwrap_or_default(),
            source: pick!(source).unwrap_or(IpAddr::from([127, 0, 0, 1])),
            time,
            break_glass: pick!(break_glass).unwrap_or(false),
            depth: pick!(depth).unwrap_or(0),
            tool: pick!(tool).map(|name| lapse_core::ToolCall {
                name,
                args: pick!(args).unwrap_or_default(),
            }),
        },
        tools: pick!(tools)
            .unwrap_or_default()
            .into_iter()
            .map(|t| {
                if t.trim_start().starts_with('{') {
                    serde_json::from_str(&t).map_err(|e| CaseError::Incomplete {
                        case: case.name.clone(),
                        message: format!("`tools` entry `{t}`: {e}"),
                    })
                } else {
                    Ok(lapse_core::ToolDecl {
                        name: t,
                        args: BTreeMap::new(),
                    })
                }
            })
            .collect::<Result<_, _>>()?,
    })
}
