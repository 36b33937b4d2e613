//! Provider credentials around the grant lifecycle: provision on issue (intent
//! first), destroy when a grant ends (retried with backoff until done), and
//! reconcile the target with the store.

use crate::audit::event;
use crate::broker::Lapse;
use crate::error::BrokerError;
use lapse_core::{CredentialState, Grant, GrantState, ProviderCredential};
use lapse_providers::{CredentialProvider, CredentialSpec, Handout, Secret};
use lapse_store::{GrantWrite, WriteBatch};
use serde_json::json;
use std::sync::Arc;

/// How long an `intended` credential may stay so before the reconciler treats the
/// issue as interrupted (a crash between the intent and the record).
pub const INTENT_GRACE_SECS: u64 = 30;

impl Lapse {
    pub fn provider(&self, audience: &str) -> Option<&Arc<dyn CredentialProvider>> {
        self.providers.get(audience)
    }

    /// Creates the provider credential of a freshly committed active grant whose
    /// intent is recorded, and records it. On failure the grant is ended (its
    /// credential destroyed, in case it half exists) and the request fails.
    pub(crate) async fn provision(
        &self,
        grant: Grant,
        provider: &Arc<dyn CredentialProvider>,
    ) -> Result<(Grant, Handout), BrokerError> {
        let now = self.now();
        let Some(cred) = grant.credentials.last().cloned() else {
            return Err(BrokerError::Unavailable(
                "no credential intent recorded".into(),
            ));
        };
        let spec = CredentialSpec {
            grant: grant.id,
            name: cred.name.clone(),
            actions: grant.actions.clone(),
            valid_until: grant.expires_at,
        };
        let secret = Secret::generate();
        let handout = match provider.create(&spec, &secret).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(grant = %grant.id, error = %e, "credential creation failed; ending the grant");
                let reason = format!("credential could not be created: {e}");
                if let Ok(ended) = grant.clone().revoke(now, "lapse", &reason) {
                    let _ = self
                        .end(
                            grant,
                            ended,
                            "grant.revoked",
                            "lapse",
                            json!({ "reason": reason }),
                        )
                        .await;
                }
                return Err(BrokerError::Unavailable(format!(
                    "the credential for `{}` could not be created; nothing was issued",
                    provider.target()
                )));
            }
        };
        let created = grant.clone().credential_created(&cred.name, now);
        let actor = grant.request.workload.id.clone();
        let commit = self.commit(WriteBatch {
                grants: vec![GrantWrite::Update {
                    grant: created.clone(),
                    expected_version: grant.version,
                }],
                events: vec![event(
                    now,
                    "credential.created",
                    Some(&grant.id),
                    &actor,
                    json!({ "provider": provider.kind(), "target": provider.target(), "name": cred.name, "valid_until": grant.expires_at }),
                )],
                ..Default::default()
            })
            .await;
        if let Err(e) = commit {
            // Nothing may be handed out without its record: take it back.
            if let Err(d) = provider.destroy(&cred.name).await {
                tracing::error!(grant = %grant.id, error = %d, "could not take back an unrecorded credential; the reconciler will");
            }
            return Err(e.into());
        }
        Ok((created, handout))
    }

    /// Destroys every credential `grant` still owes, recording each outcome. Errors
    /// are recorded on the grant and retried later; they never fail the caller.
    pub async fn destroy_owed(&self, mut grant: Grant) -> Grant {
        let names: Vec<(String, String)> = grant
            .credentials
            .iter()
            .filter(|c| c.state == CredentialState::Destroying)
            .map(|c| (c.target.clone(), c.name.clone()))
            .collect();
        for (target, name) in names {
            let now = self.now();
            let (next, ev) = match self.providers.get(&target) {
                None => {
                    let msg = format!("no provider is configured for `{target}` any more");
                    (
                        grant.clone().credential_destroy_failed(&name, now, &msg),
                        event(
                            now,
                            "credential.destroy_failed",
                            Some(&grant.id),
                            "lapse",
                            json!({ "target": target, "name": name, "error": msg }),
                        ),
                    )
                }
                Some(p) => match p.destroy(&name).await {
                    Ok(d) => (
                        grant.clone().credential_destroyed(&name, self.now()),
                        event(
                            self.now(),
                            "credential.destroyed",
                            Some(&grant.id),
                            "lapse",
                            json!({ "provider": p.kind(), "target": target, "name": name, "existed": d.existed, "sessions_terminated": d.sessions_terminated, "sessions_left": d.sessions_left }),
                        ),
                    ),
                    Err(e) => {
                        let failed =
                            grant
                                .clone()
                                .credential_destroy_failed(&name, now, &e.to_string());
                        let attempt = failed
                            .credentials
                            .iter()
                            .find(|c| c.name == name)
                            .map_or(0, |c| c.attempts);
                        tracing::warn!(grant = %grant.id, credential = %name, attempt, error = %e, "destroying a credential failed; will retry");
                        let ev = event(
                            now,
                            "credential.destroy_failed",
                            Some(&grant.id),
                            "lapse",
                            json!({ "target": target, "name": name, "error": e.to_string(), "attempt": attempt, "next_attempt_at": failed.cleanup_due_at() }),
                        );
                        (failed, ev)
                    }
                },
            };
            match self
                .commit(WriteBatch {
                    grants: vec![GrantWrite::Update {
                        grant: next.clone(),
                        expected_version: grant.version,
                    }],
                    events: vec![ev],
                    ..Default::default()
                })
                .await
            {
                Ok(()) => grant = next,
                Err(e) => {
                    // The target is clean or not; either way the record still owes
                    // it, so the loop tries again.
                    tracing::warn!(grant = %grant.id, error = %e, "could not record a credential destroy; will retry");
                    return grant;
                }
            }
        }
        grant
    }

    /// One pass over grants whose credential destruction is due.
    pub async fn cleanup(&self) -> Result<usize, BrokerError> {
        let due = self.store.cleanup_due(self.now(), 100).await?;
        let n = due.len();
        for g in due {
            self.destroy_owed(g).await;
        }
        Ok(n)
    }

    /// Makes each target agree with the store: credentials Lapse made whose grant is
    /// not active are removed; active grants whose credential is missing (or whose
    /// issue never completed) are ended. Every action is audited.
    pub async fn reconcile(&self) -> Result<usize, BrokerError> {
        let mut actions = 0;
        for (target, p) in &self.providers {
            let existing = p
                .list()
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
            let now = self.now();
            let active = self
                .store
                .grants(lapse_store::GrantFilter {
                    state: Some(GrantState::Active),
                    audience: Some(target.clone()),
                    limit: 10_000,
                    ..Default::default()
                })
                .await?;
            // Credentials of active grants, so live roles cost no store read.
            let live: std::collections::HashSet<&str> = active
                .iter()
                .flat_map(|g| g.credentials.iter())
                .filter(|c| c.state != CredentialState::Destroyed)
                .map(|c| c.name.as_str())
                .collect();
            for ex in existing
                .iter()
                .filter(|ex| !live.contains(ex.name.as_str()))
            {
                // An ended grant may still owe this destroy: the cleanup loop does it.
                // The grant the credential belonged to, if it is still on record.
                let owner = match ex.grant {
                    Some(id) => self.store.grant(id).await?,
                    None => None,
                };
                let owed = owner.as_ref().is_some_and(|g| {
                    g.credentials
                        .iter()
                        .any(|c| c.name == ex.name && c.state == CredentialState::Destroying)
                });
                if owed {
                    continue;
                }
                // What this pass read may predate a stall in which another replica
                // took over and issued the credential it would now remove.
                if !self.leader.still_in_term() {
                    return Ok(actions);
                }
                let d = p.destroy(&ex.name).await;
                let data = match &d {
                    Ok(d) => {
                        json!({ "target": target, "name": ex.name, "grant": ex.grant.map(|g| g.to_string()), "sessions_terminated": d.sessions_terminated, "sessions_left": d.sessions_left })
                    }
                    Err(e) => json!({ "target": target, "name": ex.name, "error": e.to_string() }),
                };
                let kind = if d.is_ok() {
                    "credential.orphan_removed"
                } else {
                    "credential.orphan_remove_failed"
                };
                // The owner, so a break-glass grant's entry is marked like its others.
                self.commit_about(
                    WriteBatch {
                        events: vec![event(
                            now,
                            kind,
                            ex.grant.as_ref(),
                            "lapse-reconciler",
                            data,
                        )],
                        ..Default::default()
                    },
                    &owner.iter().collect::<Vec<_>>(),
                )
                .await?;
                actions += 1;
            }
            // A credential may have been created after the listing and recorded as
            // live before the store read: list again before calling it missing
            // (creation precedes the `live` record, so a second listing sees it).
            let mut relisted: Option<Vec<lapse_providers::Existing>> = None;
            for g in active {
                // An approved request's credential is created when the workload
                // collects it: the grace runs from then.
                let since = g.delivered_at.unwrap_or(g.created_at);
                let mut broken = None;
                for c in &g.credentials {
                    let present = existing.iter().any(|e| e.name == c.name);
                    broken = match c.state {
                        CredentialState::Live if !present => {
                            if relisted.is_none() {
                                relisted = Some(
                                    p.list()
                                        .await
                                        .map_err(|e| BrokerError::Unavailable(e.to_string()))?,
                                );
                            }
                            let now_present = relisted
                                .as_ref()
                                .is_some_and(|l| l.iter().any(|e| e.name == c.name));
                            (!now_present).then_some("its credential is missing in the target")
                        }
                        CredentialState::Intended
                            if g.delivered && since.plus_secs(INTENT_GRACE_SECS) <= now =>
                        {
                            Some("its credential's issue never completed")
                        }
                        _ => None,
                    };
                    if broken.is_some() {
                        break;
                    }
                }
                let Some(why) = broken else { continue };
                let reason = format!("reconciler: {why}");
                let Ok(ended) = g.clone().revoke(now, "lapse-reconciler", &reason) else {
                    continue;
                };
                match self
                    .end(
                        g,
                        ended,
                        "grant.revoked",
                        "lapse-reconciler",
                        json!({ "reason": reason }),
                    )
                    .await
                {
                    Ok(_) | Err(BrokerError::Conflict(_)) => actions += 1,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(actions)
    }
}

/// The credential record for a new grant's intent.
pub(crate) fn intent(p: &Arc<dyn CredentialProvider>, grant: &Grant) -> ProviderCredential {
    ProviderCredential::intended(
        p.kind(),
        p.target(),
        &p.name_for(grant.id),
        grant.expires_at,
    )
}
