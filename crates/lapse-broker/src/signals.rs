//! `POST /v1/signals`: outside systems say a workload can no longer be trusted, or
//! that a task is over, and the matching grants end at once (through the feed,
//! so gates stop honouring them within milliseconds).
//!
//! Event types follow OpenID CAEP (the full URI or its last segment) plus Lapse's
//! own for task endings and quarantine. Senders are operators with the `signal`
//! role, each with its own token, so every signal is attributed in the audit log.

use crate::audit::event;
use crate::broker::{Lapse, Operator};
use crate::config::Role;
use crate::error::BrokerError;
use lapse_core::{Grant, GrantId, GrantState};
use lapse_store::{GrantFilter, WriteBatch};
use serde::Deserialize;
use serde_json::{Value, json};

const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";

/// Signal types Lapse acts on; each ends every grant its subject matches.
const TYPES: &[&str] = &[
    // OpenID CAEP
    "session-revoked",
    "credential-change",
    "assurance-level-change",
    "device-compliance-change",
    "token-claims-change",
    // Lapse
    "task-ended",
    "workload-quarantined",
    "risk-raised",
    // An agent called outside its declared intent (the MCP proxy, `on_drift = "revoke"`).
    "intent-drift",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: Subject,
    #[serde(default)]
    pub reason: String,
    /// When the sender saw it happen (unix seconds), for the record.
    #[serde(default)]
    pub event_timestamp: Option<i64>,
}

/// What the signal is about; at least one field. Several narrow it (a task of
/// one workload).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub grant: Option<String>,
}

fn short_type(kind: &str) -> Option<&'static str> {
    let k = kind.strip_prefix(CAEP).unwrap_or(kind);
    TYPES.iter().copied().find(|t| *t == k)
}

impl Lapse {
    /// Ends every pending or active grant `signal` matches; answers their ids.
    pub async fn signal(&self, op: &Operator, signal: Signal) -> Result<Vec<GrantId>, BrokerError> {
        op.require(Role::Signal)?;
        let kind = short_type(&signal.kind).ok_or_else(|| {
            BrokerError::InvalidRequest(format!(
                "unknown signal type `{}`; known: {}",
                crate::error::clip(&signal.kind),
                TYPES.join(", ")
            ))
        })?;
        let s = &signal.subject;
        if s.workload.is_none() && s.task.is_none() && s.grant.is_none() {
            return Err(BrokerError::InvalidRequest(
                "`subject` needs a `workload`, a `task` or a `grant`".into(),
            ));
        }
        let matched = self.matching(s).await?;
        // A sender bound to audiences speaks for those only: grants on others that
        // its subject matches are left alone, and the record says how many.
        let (matched, out_of_scope): (Vec<Grant>, Vec<Grant>) = matched
            .into_iter()
            .partition(|g| op.covers_audience(&g.request.audience));
        if matched.is_empty() && !out_of_scope.is_empty() && s.grant.is_some() {
            self.commit(WriteBatch {
                events: vec![event(
                    self.now(),
                    "signal.refused",
                    None,
                    &op.name,
                    json!({
                        "type": kind,
                        "subject": { "workload": s.workload, "task": s.task, "grant": s.grant },
                        "reason": "the grant's audience is outside the sender's `audiences`",
                    }),
                )],
                ..Default::default()
            })
            .await?;
            return Err(BrokerError::Forbidden(format!(
                "operator `{}` may signal only grants on its audiences ({})",
                op.name,
                op.audiences.join(", ")
            )));
        }
        let why = format!(
            "signal `{kind}` from `{}`{}",
            op.name,
            if signal.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", crate::error::clip(&signal.reason))
            }
        );
        // A quarantine outlives the grants it ends: the workload named, or the
        // workloads of the grants matched, get no new grant until it is lifted.
        let mut quarantined: Vec<String> = Vec::new();
        if kind == "workload-quarantined" {
            quarantined.extend(s.workload.clone());
            for g in &matched {
                if !quarantined.contains(&g.request.workload.id) {
                    quarantined.push(g.request.workload.id.clone());
                }
            }
        }
        let quarantines: Vec<lapse_store::QuarantineChange> = quarantined
            .iter()
            .map(|w| self.quarantine_by(op, w, &signal.reason))
            .collect();
        let mut events: Vec<lapse_store::AuditEvent> = quarantines
            .iter()
            .filter_map(|q| match q {
                lapse_store::QuarantineChange::Set(q) => Some(event(
                    self.now(),
                    "workload.quarantined",
                    None,
                    &op.name,
                    json!({ "quarantine": q }),
                )),
                lapse_store::QuarantineChange::Lift(_) => None,
            })
            .collect();
        // The signal itself is on the record before anything it causes.
        events.insert(
            0,
            event(
                self.now(),
                "signal.received",
                None,
                &op.name,
                json!({
                    "type": kind,
                    "subject": { "workload": s.workload, "task": s.task, "grant": s.grant },
                    "reason": crate::error::clip(&signal.reason),
                    "event_timestamp": signal.event_timestamp,
                    "matched": matched.len(),
                    // Matched the subject but on audiences the sender is not bound to.
                    "out_of_scope": out_of_scope.len(),
                    "quarantined": quarantined,
                }),
            ),
        );
        self.commit(WriteBatch {
            events,
            quarantines,
            ..Default::default()
        })
        .await?;
        self.end_matched(op, matched, &why).await
    }

    /// The pending and active grants a signal's subject names.
    async fn matching(&self, s: &Subject) -> Result<Vec<Grant>, BrokerError> {
        let mut matched: Vec<Grant> = Vec::new();
        if let Some(id) = &s.grant {
            let id: GrantId = id.parse().map_err(|e: lapse_core::IdParseError| {
                BrokerError::InvalidRequest(e.to_string())
            })?;
            matched.extend(self.store.grant(id).await?);
        } else {
            for state in [GrantState::Active, GrantState::Pending] {
                matched.extend(
                    self.store
                        .grants(GrantFilter {
                            state: Some(state),
                            workload: s.workload.clone(),
                            task: s.task.clone(),
                            limit: 10_000,
                            ..Default::default()
                        })
                        .await?,
                );
            }
        }
        matched.retain(|g| {
            !g.state.is_ended()
                && s.workload
                    .as_ref()
                    .is_none_or(|w| *w == g.request.workload.id)
                && s.task.as_ref().is_none_or(|t| *t == g.request.task.id)
        });
        Ok(matched)
    }

    /// Ends each matched grant (denies a pending one); answers the ids ended.
    async fn end_matched(
        &self,
        op: &Operator,
        matched: Vec<Grant>,
        why: &str,
    ) -> Result<Vec<GrantId>, BrokerError> {
        let mut ended = Vec::new();
        for mut g in matched {
            let id = g.id;
            // A grant that changed meanwhile (a use report, a renewal) is read
            // again and ended still; only one that ended by itself is skipped.
            for attempt in 0..5 {
                let r = if g.state == GrantState::Pending {
                    self.deny_request_as(g.clone(), &op.name, why).await
                } else {
                    self.revoke(g.clone(), &op.name, why).await.map(|_| ())
                };
                match r {
                    Ok(()) => {
                        ended.push(id);
                        break;
                    }
                    Err(BrokerError::Conflict(_)) if attempt < 4 => {
                        match self.store.grant(id).await? {
                            Some(fresh) if !fresh.state.is_ended() => g = fresh,
                            _ => break,
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(ended)
    }

    async fn deny_request_as(&self, g: Grant, by: &str, why: &str) -> Result<(), BrokerError> {
        let denied = g
            .clone()
            .deny(self.now(), by, why)
            .map_err(crate::error::lifecycle)?;
        self.commit(WriteBatch {
            grants: vec![lapse_store::GrantWrite::Update {
                grant: denied,
                expected_version: g.version,
            }],
            events: vec![event(
                self.now(),
                "grant.denied",
                Some(&g.id),
                by,
                json!({ "reason": why }),
            )],
            ..Default::default()
        })
        .await?;
        Ok(())
    }
}

pub fn answer(kind: &str, ended: &[GrantId]) -> Value {
    json!({
        "type": short_type(kind).unwrap_or(kind),
        "ended": ended.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::short_type;

    #[test]
    fn caep_uris_and_short_names() {
        assert_eq!(
            short_type("https://schemas.openid.net/secevent/caep/event-type/session-revoked"),
            Some("session-revoked")
        );
        assert_eq!(short_type("task-ended"), Some("task-ended"));
        assert_eq!(short_type("https://evil/session-revoked"), None);
        assert_eq!(short_type("made-up"), None);
    }
}
