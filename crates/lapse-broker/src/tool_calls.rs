//! The audit record of agents' tool calls. The MCP proxy decides every call
//! itself (in microseconds, from the token, the feed and the policies) and reports
//! each decision here in batches: exactly one `tool.called` entry per attempted
//! call, allowed or refused, with the tool, a hash of its arguments (never the
//! arguments: they may hold secrets), the decision, the policies that determined
//! it and the latency the proxy added.
//!
//! A report is resent when its answer is lost (the proxy timed out while the
//! store was slow, and the broker committed after all). Each call may carry an
//! idempotency `key`, chosen by the proxy and kept with the record until the
//! broker took it; the broker spends `SHA-256("tool-call\n<operator>\n<key>")` as
//! a store nonce in the very commit that writes the record, so a call is recorded
//! once however often it is sent: a resend answers success without writing, and a
//! report mixing recorded and new calls records exactly the new ones.

use crate::audit::event;
use crate::broker::{Lapse, Operator};
use crate::error::BrokerError;
use lapse_core::{Grant, GrantId, Timestamp};
use lapse_store::WriteBatch;
use serde::Deserialize;
use serde_json::json;
use sha2::Digest;
use std::collections::HashMap;

/// Most calls in one report (with the 64 KiB body limit: records are ~250 bytes).
pub const MAX_CALLS: usize = 200;

/// How long a spent call key is kept: far past any resend (the proxy resends
/// within seconds of a lost answer, and the record it resends is already on the
/// chain), yet bounded, since every keyed call is a row until pruned.
pub const KEY_KEPT_SECS: u64 = 24 * 3600;

/// How often a commit may lose to a concurrent copy of the same report (it then
/// reads again which keys are spent) before the report is answered 409.
const RACES: usize = 3;

/// What a report did: calls written now, and calls whose key was already spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub recorded: usize,
    pub already_recorded: usize,
}

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
    /// The sender's idempotency key for this call (1–128 of `A-Z a-z 0-9 - _ .`),
    /// unique among its calls; without one, a resent call is recorded again.
    #[serde(default)]
    pub key: Option<String>,
}

/// The nonce that records `key` as spent by `operator`: namespaced per sender, so
/// one proxy's keys can never shadow another's calls.
fn key_nonce(operator: &str, key: &str, now: Timestamp) -> lapse_store::Nonce {
    lapse_store::Nonce {
        value: hex::encode(sha2::Sha256::digest(format!(
            "tool-call\n{operator}\n{key}"
        ))),
        expires_at: now.plus_secs(KEY_KEPT_SECS).millis(),
    }
}

/// The nonce a gate's use report spends for one use: the use is named by what
/// the gate reported (grant and its own `at`, before the broker clamps it to its
/// clock), so a resent report cannot record it again, not even at a later time
/// where the gate's clock runs ahead of the broker's.
pub(crate) fn use_nonce(
    operator: &str,
    grant: GrantId,
    at: i64,
    now: Timestamp,
) -> lapse_store::Nonce {
    lapse_store::Nonce {
        value: hex::encode(sha2::Sha256::digest(format!(
            "usage\n{operator}\n{grant}\n{at}"
        ))),
        expires_at: now.plus_secs(KEY_KEPT_SECS).millis(),
    }
}

impl Lapse {
    /// Appends one audit entry per call not recorded before (by its key), all in
    /// one commit; calls for grants the proxy does not guard (or that do not
    /// exist) are refused as a whole.
    pub async fn record_tool_calls(
        &self,
        op: &Operator,
        r: Report,
    ) -> Result<Recorded, BrokerError> {
        if r.calls.len() > MAX_CALLS {
            return Err(BrokerError::InvalidRequest(format!(
                "at most {MAX_CALLS} calls per report"
            )));
        }
        let now = self.now();
        let mut grants: HashMap<GrantId, Grant> = HashMap::new();
        // Each event with the nonce its key spends (none for an unkeyed call).
        let mut calls = Vec::with_capacity(r.calls.len());
        let mut keys = std::collections::HashSet::new();
        let mut repeated = 0;
        for c in r.calls {
            let id: GrantId = c.grant.parse().map_err(|e: lapse_core::IdParseError| {
                BrokerError::InvalidRequest(e.to_string())
            })?;
            if !matches!(c.decision.as_str(), "allow" | "deny") {
                return Err(BrokerError::InvalidRequest(
                    "`decision` is `allow` or `deny`".into(),
                ));
            }
            if c.args_sha256.len() != 64 || !c.args_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BrokerError::InvalidRequest(
                    "`args_sha256` is 64 hex digits".into(),
                ));
            }
            if c.tool.len() > 256 || c.reason.len() > 2000 || c.policies.len() > 64 {
                return Err(BrokerError::InvalidRequest(
                    "`tool`, `reason` or `policies` is too long".into(),
                ));
            }
            if let Some(k) = &c.key
                && (k.is_empty()
                    || k.len() > 128
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
            {
                return Err(BrokerError::InvalidRequest(
                    "`key` is 1 to 128 of `A-Z a-z 0-9 - _ .`".into(),
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
                return Err(BrokerError::Forbidden(format!(
                    "operator `{}` does not guard audience `{}`",
                    op.name, audience
                )));
            }
            let nonce = c.key.as_deref().map(|k| key_nonce(&op.name, k, now));
            if let Some(n) = &nonce
                && !keys.insert(n.value.clone())
            {
                // The same call twice in one report (a sender that re-queued it).
                repeated += 1;
                continue;
            }
            let at = Timestamp::from_millis(c.at.min(now.millis()));
            let e = event(
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
            );
            calls.push((e, nonce));
        }
        let about: Vec<&Grant> = grants.values().collect();
        let mut already = repeated;
        for _ in 0..RACES {
            // What an earlier copy of this report (or another with the same
            // calls) already wrote is left out, so the rest commits once.
            let values: Vec<String> = calls
                .iter()
                .filter_map(|(_, n)| n.as_ref().map(|n| n.value.clone()))
                .collect();
            let spent: std::collections::HashSet<String> = self
                .store
                .spent_nonces(&values)
                .await?
                .into_iter()
                .collect();
            let before = calls.len();
            calls.retain(|(_, n)| n.as_ref().is_none_or(|n| !spent.contains(&n.value)));
            already += before - calls.len();
            if calls.is_empty() {
                return Ok(Recorded {
                    recorded: 0,
                    already_recorded: already,
                });
            }
            let (events, nonces): (Vec<_>, Vec<_>) = calls.iter().cloned().unzip();
            let batch = WriteBatch {
                events,
                nonces: nonces.into_iter().flatten().collect(),
                ..Default::default()
            };
            match self.commit_about(batch, &about).await {
                Ok(()) => {
                    return Ok(Recorded {
                        recorded: calls.len(),
                        already_recorded: already,
                    });
                }
                // A copy still in flight committed some of these calls between
                // the read and this commit (nothing of this batch was written):
                // read again.
                Err(lapse_store::StoreError::Replay(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(BrokerError::Conflict(
            "the same calls are being recorded concurrently; retry".into(),
        ))
    }
}
