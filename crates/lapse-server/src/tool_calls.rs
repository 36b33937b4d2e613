//! The audit record of agents' tool calls. The MCP proxy decides every call
//! itself (in microseconds, from the token, the feed and the policies) and reports
//! each decision here in batches: exactly one `tool.called` entry per attempted
//! call, allowed or refused, with the tool, a hash of its arguments (never the
//! arguments: they may hold secrets), the decision, the policies that determined
//! it and the latency the proxy added.

use crate::error::ApiError;
use crate::service::{Lapse, Operator, event};
use lapse_core::{Grant, GrantId, Timestamp};
use lapse_store::WriteBatch;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;

/// Most calls in one report (with the 64 KiB body limit: records are ~250 bytes).
pub const MAX_CALLS: usize = 200;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub calls: Vec<Call>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    pub grant: String,
    /// When the call was decided (unix ms).
    pub at: i64,
    pub tool: String,
    /// SHA-256 of the arguments' JSON, hex.
    pub args_sha256: String,
    /// `allow` or `deny`.
    pub decision: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub policies: Vec<String>,
    /// Whether the refusal was a call outside the declared intent.
    #[serde(default)]
    pub drift: bool,
    /// Time the proxy took to decide, in microseconds.
    #[serde(default)]
    pub latency_us: u64,
}

impl Lapse {
    /// Appends one audit entry per call, all in one commit; calls for grants the
    /// proxy does not guard (or that do not exist) are refused as a whole.
    pub async fn record_tool_calls(&self, op: &Operator, r: Report) -> Result<usize, ApiError> {
        if r.calls.len() > MAX_CALLS {
            return Err(ApiError::InvalidRequest(format!(
                "at most {MAX_CALLS} calls per report"
            )));
        }
        let now = self.now();
        let mut grants: HashMap<GrantId, Grant> = HashMap::new();
        let mut events = Vec::with_capacity(r.calls.len());
        for c in r.calls {
            let id: GrantId = c
                .grant
                .parse()
                .map_err(|e: lapse_core::IdParseError| ApiError::InvalidRequest(e.to_string()))?;
            if !matches!(c.decision.as_str(), "allow" | "deny") {
                return Err(ApiError::InvalidRequest(
                    "`decision` is `allow` or `deny`".into(),
                ));
            }
            if c.args_sha256.len() != 64 || !c.args_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiError::InvalidRequest(
                    "`args_sha256` is 64 hex digits".into(),
                ));
            }
            if c.tool.len() > 256 || c.reason.len() > 2000 || c.policies.len() > 64 {
                return Err(ApiError::InvalidRequest(
                    "`tool`, `reason` or `policies` is too long".into(),
                ));
            }
            let audience = match grants.get(&id) {
                Some(g) => g.request.audience.clone(),
                None => {
                    let g = self.find(id, "grant").await?;
                    let audience = g.request.audience.clone();
                    grants.insert(id, g);
                    audience
                }
            };
            if !op.covers_audience(&audience) {
                return Err(ApiError::Forbidden(format!(
                    "operator `{}` does not guard audience `{}`",
                    op.name, audience
                )));
            }
            let at = Timestamp::from_millis(c.at.min(now.millis()));
            events.push(event(
                now,
                "tool.called",
                Some(&id),
                &op.name,
                json!({
                    "at": at.millis(),
                    "tool": c.tool,
                    "args_sha256": c.args_sha256.to_ascii_lowercase(),
                    "decision": c.decision,
                    "reason": c.reason,
                    "policies": c.policies,
                    "drift": c.drift,
                    "latency_us": c.latency_us,
                }),
            ));
        }
        let n = events.len();
        if n > 0 {
            let about: Vec<&Grant> = grants.values().collect();
            self.commit_about(
                WriteBatch {
                    events,
                    ..Default::default()
                },
                &about,
            )
            .await?;
        }
        Ok(n)
    }
}
