//! The standing-privilege report: everything that looks like access outliving its
//! task, from the store, the audit chain and the targets themselves (including
//! what sits in Lapse's namespace there without being Lapse's: look-alike roles
//! and hand-added members of its group roles).
//!
//! It also proves, for a window, that every credential issued in it has its end
//! recorded (or is still inside its lifetime): the audit chain is verified first,
//! so the proof rests on a log nobody edited.

use crate::broker::Lapse;
use crate::error::BrokerError;
use lapse_core::{CredentialState, GrantState, Timestamp};
use lapse_providers::CredentialProvider;
use lapse_providers::StrayKind;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    pub detail: String,
}

impl Finding {
    fn new(kind: &'static str, detail: String) -> Self {
        Self {
            kind,
            grant_id: None,
            workload: None,
            target: None,
            credential: None,
            detail,
        }
    }
}

/// A grant that overstays its expiry by more than this is reported (the sweeper
/// runs every half second; this leaves room for a busy moment).
const EXPIRY_GRACE_SECS: u64 = 5;

const ENDS: &[&str] = &["grant.completed", "grant.revoked", "grant.expired"];

/// What the report reads: the broker's own parts when it runs, or the store, key
/// ring and providers `lapse report standing --config` opens without a server.
pub struct Sources<'a> {
    pub store: &'a dyn lapse_store::Store,
    pub keys: &'a lapse_keyring::KeyRing,
    /// Credential providers by audience; each is asked for what exists on its
    /// target, and one that cannot be reached is a `target_unreachable` finding.
    pub providers: &'a HashMap<String, Arc<dyn CredentialProvider>>,
    pub cfg: &'a crate::config::Config,
    pub now: Timestamp,
}

impl Lapse {
    /// The report over `[now - window, now]`.
    pub async fn standing_report(&self, window_secs: u64) -> Result<Value, BrokerError> {
        standing_report(
            Sources {
                store: self.store.as_ref(),
                keys: &self.keys,
                providers: &self.providers,
                cfg: &self.cfg,
                now: self.now(),
            },
            window_secs,
        )
        .await
    }
}

/// The report over `[now - window, now]` from `src`.
pub async fn standing_report(src: Sources<'_>, window_secs: u64) -> Result<Value, BrokerError> {
    let now = src.now;
    let from = Timestamp::from_millis(
        now.millis()
            .saturating_sub(i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
    );
    let mut findings: Vec<Finding> = Vec::new();
    let log = read_log(&src, from).await?;
    if let Some((seq, why)) = &log.chain.first_bad {
        findings.push(Finding::new(
            "audit_chain_broken",
            format!("entry {seq}: {why}; nothing below can be proven"),
        ));
    }
    let grants = src
        .store
        .grants(lapse_store::GrantFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await?;
    grant_findings(&grants, src.cfg, from, now, &mut findings);
    let targets = target_findings(&src, &grants, &mut findings).await;
    let (open_within_lifetime, unended) = proof_findings(&log, &grants, now, &mut findings);
    Ok(json!({
        "generated_at": now,
        "window": { "from": from, "to": now },
        "ok": findings.is_empty(),
        "findings": findings,
        "proof": {
            "audit_chain_verified": log.chain.ok(),
            "audit_entries": log.chain.entries,
            "issued_in_window": log.issued.len(),
            "ended": log.issued.len() - open_within_lifetime - unended,
            "still_active_within_lifetime": open_within_lifetime,
            "unended": unended,
        },
        "targets": targets,
        // Blocks standing on workloads: not access, but what an auditor asks
        // next about a workload whose grants were ended by a signal.
        "quarantined": src.store.quarantines().await?,
    }))
}

/// What the proof needs from the audit log, read once while its chain is verified.
struct LogFacts {
    chain: lapse_store::VerifyReport,
    /// Grants issued in the window, and when.
    issued: BTreeMap<String, i64>,
    /// Grants whose end is recorded, and when.
    ended: BTreeMap<String, i64>,
    /// Credential name -> the grant it was created for.
    created: BTreeMap<String, String>,
    /// Credentials whose destroy is recorded, and when.
    destroyed: BTreeMap<String, i64>,
}

/// Step 1: the audit chain itself, and what the proof (step 4) needs from it: one read of
/// the log.
async fn read_log(src: &Sources<'_>, from: Timestamp) -> Result<LogFacts, BrokerError> {
    let mut issued: BTreeMap<String, i64> = BTreeMap::new();
    let mut ended: BTreeMap<String, i64> = BTreeMap::new();
    let mut created: BTreeMap<String, String> = BTreeMap::new(); // credential -> grant
    let mut destroyed: BTreeMap<String, i64> = BTreeMap::new();
    let chain = crate::audit::verify_audit_visiting(src.store, src.keys, |e| {
        let Some(g) = e.grant_id.clone() else {
            return;
        };
        let name = || {
            serde_json::from_str::<Value>(&e.data)
                .ok()
                .and_then(|d| d.get("name").and_then(Value::as_str).map(str::to_owned))
        };
        match e.kind.as_str() {
            "grant.issued" if e.at >= from.millis() => {
                issued.insert(g, e.at);
            }
            k if ENDS.contains(&k) => {
                ended.insert(g, e.at);
            }
            "credential.created" => {
                if let Some(n) = name() {
                    created.insert(n, g);
                }
            }
            "credential.destroyed" | "credential.orphan_removed" => {
                if let Some(n) = name() {
                    destroyed.insert(n, e.at);
                }
            }
            _ => {}
        }
    })
    .await?;
    Ok(LogFacts {
        chain,
        issued,
        ended,
        created,
        destroyed,
    })
}

/// Step 2, grants: active past expiry, kept alive too long, open reviews, owed
/// destroys; and each workload's share of the window under some grant.
fn grant_findings(
    grants: &[lapse_core::Grant],
    cfg: &crate::config::Config,
    from: Timestamp,
    now: Timestamp,
    findings: &mut Vec<Finding>,
) {
    let span = cfg.standing_span.secs();
    let mut by_workload: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
    for g in grants {
        if g.state == GrantState::Active && g.expires_at.plus_secs(EXPIRY_GRACE_SECS) < now {
            findings.push(Finding {
                grant_id: Some(g.id.to_string()),
                workload: Some(g.request.workload.id.clone()),
                ..Finding::new(
                    "active_past_expiry",
                    format!("active although it expired at {}", g.expires_at.rfc3339()),
                )
            });
        }
        if g.state == GrantState::Active && g.created_at.plus_secs(span) < now {
            findings.push(Finding {
                grant_id: Some(g.id.to_string()),
                workload: Some(g.request.workload.id.clone()),
                ..Finding::new(
                    "renewed_beyond_span",
                    format!(
                        "alive since {} through {} renewal(s), longer than {}s",
                        g.created_at.rfc3339(),
                        g.renewals,
                        span
                    ),
                )
            });
        }
        if let Some(r) = g.review.as_ref().filter(|r| r.is_open()) {
            findings.push(Finding {
                grant_id: Some(g.id.to_string()),
                workload: Some(g.request.workload.id.clone()),
                ..Finding::new(
                    "break_glass_review_open",
                    format!(
                        "break-glass {} since {}, not yet reviewed; justification: {}",
                        g.state,
                        r.opened_at.rfc3339(),
                        r.justification
                    ),
                )
            });
        }
        for c in g
            .credentials
            .iter()
            .filter(|c| c.state == CredentialState::Destroying)
        {
            findings.push(Finding {
                grant_id: Some(g.id.to_string()),
                target: Some(c.target.clone()),
                credential: Some(c.name.clone()),
                ..Finding::new(
                    "credential_not_yet_destroyed",
                    format!(
                        "grant ended but the credential still exists after {} attempt(s){}",
                        c.attempts,
                        c.last_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                )
            });
        }
        if g.state != GrantState::Pending && g.state != GrantState::Denied {
            let start = g.created_at.millis().max(from.millis());
            let end = g
                .ended_at
                .unwrap_or(g.expires_at)
                .millis()
                .min(now.millis());
            if end > start {
                by_workload
                    .entry(g.request.workload.id.as_str())
                    .or_default()
                    .push((start, end));
            }
        }
    }
    near_continuous(by_workload, cfg.standing_share, from, now, findings);
}

/// Workloads that held some grant for more than `limit` of the window.
fn near_continuous(
    by_workload: BTreeMap<&str, Vec<(i64, i64)>>,
    limit: f64,
    from: Timestamp,
    now: Timestamp,
    findings: &mut Vec<Finding>,
) {
    let window_ms = now.millis().saturating_sub(from.millis()).max(1);
    for (workload, mut spans) in by_workload {
        spans.sort_unstable();
        let mut covered = 0i64;
        let mut cur: Option<(i64, i64)> = None;
        for (s, e) in spans {
            cur = match cur {
                Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
                Some((cs, ce)) => {
                    covered += ce - cs;
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((cs, ce)) = cur {
            covered += ce - cs;
        }
        let share = covered as f64 / window_ms as f64;
        if share > limit {
            findings.push(Finding {
                workload: Some(workload.to_owned()),
                ..Finding::new(
                    "near_continuous_access",
                    format!("held access {:.0}% of the window", share * 100.0),
                )
            });
        }
    }
}

/// Step 3, the targets: credentials with no active grant behind them, and what sits in
/// Lapse's namespace without being Lapse's. Answers each target's count.
async fn target_findings(
    src: &Sources<'_>,
    grants: &[lapse_core::Grant],
    findings: &mut Vec<Finding>,
) -> Vec<Value> {
    let live: HashMap<&str, GrantState> = grants
        .iter()
        .flat_map(|g| {
            g.credentials
                .iter()
                .map(move |c| (c.name.as_str(), g.state))
        })
        .collect();
    let mut targets = Vec::new();
    for (target, p) in src.providers {
        match p.list().await {
            Ok(existing) => {
                targets.push(json!({ "target": target, "credentials": existing.len() }));
                for ex in existing {
                    if live.get(ex.name.as_str()) != Some(&GrantState::Active) {
                        findings.push(Finding {
                                grant_id: ex.grant.map(|g| g.to_string()),
                                target: Some(target.clone()),
                                credential: Some(ex.name.clone()),
                                ..Finding::new(
                                    "orphan_credential",
                                    format!(
                                        "exists in the target (login {}, {} session(s)) with no active grant",
                                        if ex.can_login { "allowed" } else { "refused" },
                                        ex.sessions
                                    ),
                                )
                            });
                    }
                }
            }
            Err(e) => findings.push(Finding {
                target: Some(target.clone()),
                ..Finding::new(
                    "target_unreachable",
                    format!("cannot list credentials: {e}"),
                )
            }),
        }
        // What sits in Lapse's namespace without being Lapse's: no grant ends
        // it and the reconciler leaves it alone, so a person has to.
        match p.strays().await {
            Ok(strays) => findings.extend(strays.into_iter().map(|s| {
                let (kind, what) = match s.kind {
                    StrayKind::LookAlike => (
                        "look_alike_role",
                        "named like Lapse's credentials but not made by Lapse",
                    ),
                    StrayKind::GroupMember => (
                        "unexpected_group_member",
                        "a member of Lapse's group roles that Lapse did not make",
                    ),
                };
                let groups = if s.groups.is_empty() {
                    "no Lapse group".to_owned()
                } else {
                    s.groups
                        .iter()
                        .map(|g| format!("`{g}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                Finding {
                    target: Some(target.clone()),
                    credential: Some(s.name),
                    ..Finding::new(
                        kind,
                        format!(
                            "{what} (login {}, {} session(s), in {groups})",
                            if s.can_login { "allowed" } else { "refused" },
                            s.sessions
                        ),
                    )
                }
            })),
            Err(e) => findings.push(Finding {
                target: Some(target.clone()),
                ..Finding::new(
                    "target_unreachable",
                    format!("cannot list look-alike roles and group members: {e}"),
                )
            }),
        }
    }

    targets
}

/// Step 4, the proof from the log (read in step 1): every issue in the window has its end.
/// Answers how many are still active within their lifetime, and how many have
/// no end.
fn proof_findings(
    log: &LogFacts,
    grants: &[lapse_core::Grant],
    now: Timestamp,
    findings: &mut Vec<Finding>,
) -> (usize, usize) {
    let state: HashMap<String, (GrantState, Timestamp)> = grants
        .iter()
        .map(|g| (g.id.to_string(), (g.state, g.expires_at)))
        .collect();
    let mut open_within_lifetime = 0;
    let mut unended = 0;
    for g in log.issued.keys() {
        if log.ended.contains_key(g) {
            continue;
        }
        match state.get(g) {
            Some((GrantState::Active, exp)) if *exp >= now => open_within_lifetime += 1,
            _ => {
                unended += 1;
                findings.push(Finding {
                    grant_id: Some(g.clone()),
                    ..Finding::new(
                        "issue_without_end",
                        "issued in the window, past its expiry, and no end is recorded".into(),
                    )
                });
            }
        }
    }
    for (name, g) in &log.created {
        let grant_live = matches!(state.get(g), Some((GrantState::Active, _)));
        if !log.destroyed.contains_key(name) && !grant_live {
            findings.push(Finding {
                grant_id: Some(g.clone()),
                credential: Some(name.clone()),
                ..Finding::new(
                    "credential_without_destroy",
                    "created for a grant that ended, and no destroy is recorded".into(),
                )
            });
        }
    }

    (open_within_lifetime, unended)
}
