//! A grant's life after issue: introspection (RFC 7662), a workload acting on its
//! own grant, completion, revocation, renewal (re-decided, capped by the maximum
//! lifetime) and the uses gates report. Every ending takes the grants delegated
//! from it along, in the same commit.

use crate::audit::{event, issued_data};
use crate::broker::{Lapse, Operator};
use crate::error::{BrokerError, lifecycle};
use crate::exchange::{Issued, new_jti};
use crate::metrics::OutcomeLabels;
use lapse_core::{Decision, DecisionOutcome, Grant, GrantId, GrantState, Timestamp, ttl};
use lapse_store::{AuditEvent, GrantWrite, WriteBatch};
use lapse_token::{AccessClaims, DpopProof};
use serde_json::{Value, json};
use std::net::IpAddr;

impl Lapse {
    /// RFC 7662. Inactive for anything not currently honourable.
    pub async fn introspect(&self, token: &str) -> Result<Value, BrokerError> {
        let inactive = json!({ "active": false });
        let Ok(claims) = self.verify_access_token(token) else {
            return Ok(inactive);
        };
        let Ok(id) = claims.grant_id.parse::<GrantId>() else {
            return Ok(inactive);
        };
        let grant = self.store.grant(id).await.map_err(|e| {
            tracing::error!(error = %e, "introspection could not read the store; answering inactive");
            BrokerError::Unavailable("the store is unavailable; the token must be treated as inactive".into())
        })?;
        match grant {
            Some(g) if g.is_live(self.now()) && g.jkt == claims.cnf.jkt => Ok(json!({
                "active": true,
                "iss": claims.iss,
                "sub": claims.sub,
                "aud": claims.aud,
                "client_id": claims.client_id,
                "scope": claims.scope,
                "exp": claims.exp,
                "iat": claims.iat,
                "nbf": claims.nbf,
                "jti": claims.jti,
                "token_type": "DPoP",
                "cnf": claims.cnf,
                "task": claims.task,
                "grant_id": claims.grant_id,
            })),
            _ => Ok(inactive),
        }
    }

    /// A workload authenticated by its own DPoP-bound access token, for its own grant.
    pub async fn workload_grant(
        &self,
        authorization: Option<&str>,
        cert: Option<&lapse_tls::ClientCert>,
        dpop_headers: &[&str],
        htm: &str,
        path: &str,
        grant_id: GrantId,
    ) -> Result<(AccessClaims, Grant, DpopProof), BrokerError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("DPoP "))
            .ok_or_else(|| {
                BrokerError::InvalidToken(
                    "a DPoP-bound access token is required (`Authorization: DPoP …`)".into(),
                )
            })?;
        let claims = self
            .verify_access_token(token)
            .map_err(|e| BrokerError::InvalidToken(e.to_string()))?;
        let proof = self.verify_dpop(dpop_headers, htm, path, Some(token))?;
        if proof.jkt != claims.cnf.jkt {
            return Err(BrokerError::InvalidDpopProof(
                "the proof's key is not the key the token is bound to".into(),
            ));
        }
        // RFC 8705: a certificate-bound token comes over a connection with that
        // certificate.
        if let Some(x5t) = &claims.cnf.x5t_s256 {
            let presented = cert.map(lapse_tls::ClientCert::thumbprint);
            let same = presented.as_deref().is_some_and(|p| {
                p.len() == x5t.len()
                    && bool::from(subtle::ConstantTimeEq::ct_eq(p.as_bytes(), x5t.as_bytes()))
            });
            if !same {
                return Err(BrokerError::InvalidToken(
                    "the token is bound to a client certificate this connection did not present"
                        .into(),
                ));
            }
        }
        if claims.grant_id != grant_id.to_string() {
            return Err(BrokerError::Forbidden(
                "the token belongs to another grant".into(),
            ));
        }
        let grant = self.find(grant_id, "grant").await?;
        Ok((claims, grant, proof))
    }

    pub(crate) async fn end(
        &self,
        grant: Grant,
        ended: Grant,
        kind: &str,
        actor: &str,
        data: Value,
    ) -> Result<Grant, BrokerError> {
        let first = event(self.now(), kind, Some(&ended.id), actor, data);
        self.end_with(grant, ended, vec![first]).await
    }

    /// [`Lapse::end`] with the audit events of the ending given whole.
    pub(crate) async fn end_with(
        &self,
        grant: Grant,
        ended: Grant,
        events: Vec<AuditEvent>,
    ) -> Result<Grant, BrokerError> {
        let was_active = grant.state == GrantState::Active;
        // Grants delegated from this one end in the same commit. A descendant that
        // changed meanwhile (a use report) fails the commit; read them again then,
        // unless it was this grant that moved (the caller's view is stale).
        let mut attempt = 0;
        let cascaded = loop {
            let cascaded = self.cascade(&grant, &ended).await?;
            let mut batch = WriteBatch {
                events: events.clone(),
                grants: vec![GrantWrite::Update {
                    expected_version: grant.version,
                    grant: ended.clone(),
                }],
                ..Default::default()
            };
            for (d, e, ev) in &cascaded {
                batch.events.push(ev.clone());
                batch.grants.push(GrantWrite::Update {
                    expected_version: d.version,
                    grant: e.clone(),
                });
            }
            match self.commit(batch).await {
                Ok(()) => break cascaded,
                Err(lapse_store::StoreError::Conflict(m))
                    if !cascaded.is_empty() && attempt < 3 =>
                {
                    attempt += 1;
                    let current = self.store.grant(grant.id).await?;
                    if current.map(|c| c.version) != Some(grant.version) {
                        return Err(lapse_store::StoreError::Conflict(m).into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        let live_before = usize::from(was_active)
            + cascaded
                .iter()
                .filter(|(d, _, _)| d.state == GrantState::Active)
                .count();
        for _ in 0..live_before {
            self.metrics.active_grants.dec();
        }
        for e in std::iter::once(&ended).chain(cascaded.iter().map(|(_, e, _)| e)) {
            self.metrics
                .grants_ended
                .get_or_create(&OutcomeLabels {
                    outcome: e.state.as_str().into(),
                })
                .inc();
        }
        for (_, e, _) in cascaded {
            self.destroy_owed(e).await;
        }
        // A no-op unless the grant handed out provider credentials.
        Ok(self.destroy_owed(ended).await)
    }

    /// The workload ends its own grant; `data` (at least the reason) goes into the
    /// audit entry.
    pub async fn complete(
        &self,
        grant: Grant,
        by: &str,
        reason: &str,
        data: Value,
    ) -> Result<Grant, BrokerError> {
        self.end_by(
            grant,
            |g, now| g.complete(now, by, reason),
            "grant.completed",
            by,
            data,
        )
        .await
    }

    pub async fn revoke(&self, grant: Grant, by: &str, reason: &str) -> Result<Grant, BrokerError> {
        self.end_by(
            grant,
            |g, now| g.revoke(now, by, reason),
            "grant.revoked",
            by,
            json!({ "reason": reason }),
        )
        .await
    }

    /// Ends `grant` by `transition`. A use report committed since the caller read
    /// the grant moves its version and fails the commit, yet the ending still
    /// holds: the grant is read again and the transition re-applied (a few times;
    /// a grant that ended meanwhile fails the transition with its own 409).
    async fn end_by(
        &self,
        mut grant: Grant,
        transition: impl Fn(Grant, Timestamp) -> Result<Grant, lapse_core::LifecycleError>,
        kind: &str,
        actor: &str,
        data: Value,
    ) -> Result<Grant, BrokerError> {
        let mut attempt = 0;
        loop {
            let (id, version) = (grant.id, grant.version);
            let ended = transition(grant.clone(), self.now()).map_err(lifecycle)?;
            match self.end(grant, ended, kind, actor, data.clone()).await {
                Err(BrokerError::Conflict(m)) if attempt < 3 => {
                    attempt += 1;
                    match self.store.grant(id).await? {
                        Some(current) if current.version != version => grant = current,
                        _ => return Err(BrokerError::Conflict(m)),
                    }
                }
                r => return r,
            }
        }
    }

    /// Renewal re-decides the original request now. Anything but a plain allow ends
    /// the grant: the conditions it was granted under no longer hold.
    pub async fn renew(
        &self,
        grant: Grant,
        ttl_secs: Option<u64>,
        source: IpAddr,
        proof: &DpopProof,
    ) -> Result<Issued, BrokerError> {
        let now = self.now();
        let policy = self.policy()?;
        let mut request = grant.request.clone();
        request.context.time = now;
        request.context.source = source;
        if let Some(t) = ttl_secs {
            request.requested_ttl_secs = t;
        }
        self.refuse_if_quarantined(&request, Some(self.nonce(proof)), "renewal")
            .await?;
        let decision: Decision = policy.decide(&request);
        self.metrics
            .decisions
            .get_or_create(&OutcomeLabels {
                outcome: decision.outcome_label().into(),
            })
            .inc();
        let actor = grant.request.workload.id.clone();
        let decided = event(
            now,
            "renewal.decided",
            Some(&grant.id),
            &actor,
            json!({ "request": &request, "decision": &decision }),
        );
        match decision.outcome {
            DecisionOutcome::Allow { ttl_cap_secs } => {
                let ttl = ttl::effective_ttl_secs(
                    request.requested_ttl_secs,
                    ttl_cap_secs,
                    self.cfg.max_ttl.secs(),
                );
                let renewed = grant
                    .clone()
                    .renew(now, ttl, decision.policies.clone(), ttl_cap_secs, new_jti())
                    .map_err(lifecycle)?;
                // The target's own expiry moves first: if that fails, the renewal
                // is not recorded and the credential keeps its old end.
                for c in renewed
                    .credentials
                    .iter()
                    .filter(|c| c.state == lapse_core::CredentialState::Live)
                {
                    let p = self.provider(&c.target).ok_or_else(|| {
                        BrokerError::Unavailable(format!("no provider for `{}`", c.target))
                    })?;
                    p.extend(&c.name, renewed.expires_at)
                        .await
                        .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
                }
                let token = self.mint(&renewed, now)?;
                let data = issued_data(&renewed, &decision, now);
                self.commit(WriteBatch {
                    grants: vec![GrantWrite::Update {
                        grant: renewed.clone(),
                        expected_version: grant.version,
                    }],
                    events: vec![
                        decided,
                        event(now, "grant.renewed", Some(&renewed.id), &actor, data),
                    ],
                    nonces: vec![self.nonce(proof)],
                    ..Default::default()
                })
                .await?;
                Ok(Issued {
                    expires_in: renewed.remaining_secs(now),
                    grant: renewed,
                    access_token: token,
                    credentials: vec![],
                })
            }
            other => {
                let reason = match &other {
                    DecisionOutcome::Deny { reasons } => reasons.join("; "),
                    _ => "renewal would need approval".to_owned(),
                };
                let ended = grant
                    .clone()
                    .revoke(now, "lapse", &format!("renewal refused: {reason}"))
                    .map_err(lifecycle)?;
                let revoked = event(
                    now,
                    "grant.revoked",
                    Some(&ended.id),
                    "lapse",
                    json!({ "reason": format!("renewal refused: {reason}") }),
                );
                // Like every other end: with whatever was delegated from it.
                self.end_with(grant, ended, vec![decided, revoked]).await?;
                Err(BrokerError::AccessDenied {
                    description: format!("renewal refused, grant ended: {reason}"),
                    policies: decision.policies,
                })
            }
        }
    }

    /// Records uses gates report (`grant id`, unix ms), each at most once per
    /// `granularity` so busy grants do not turn every request into a write.
    /// Answers how many grants it recorded a use for.
    pub async fn record_uses(
        &self,
        op: &Operator,
        uses: &[(GrantId, i64)],
    ) -> Result<usize, BrokerError> {
        let gate = op.name.as_str();
        let now = self.now();
        let mut n = 0;
        for (id, at) in uses {
            let key = crate::tool_calls::use_nonce(gate, *id, *at, now);
            let at = Timestamp::from_millis((*at).min(now.millis()));
            let Some(g) = self.store.grant(*id).await? else {
                continue;
            };
            // A gate vouches only for uses of the audiences it guards.
            if !op.covers_audience(&g.request.audience) {
                continue;
            }
            let step = g.idle_secs.map_or(60, |i| (i / 10).clamp(1, 60));
            if g.last_used_at.is_some_and(|t| t.plus_secs(step) > at) {
                continue;
            }
            let mut used = g.clone();
            if !used.used(at) {
                continue;
            }
            let r = self
                .commit(WriteBatch {
                    grants: vec![GrantWrite::Update {
                        grant: used,
                        expected_version: g.version,
                    }],
                    events: vec![event(
                        now,
                        "grant.used",
                        Some(id),
                        gate,
                        json!({ "at": at.millis() }),
                    )],
                    nonces: vec![key],
                    ..Default::default()
                })
                .await;
            match r {
                Ok(()) => n += 1,
                // Conflict: a concurrent copy of this report moved the grant first;
                // Replay: this very use was recorded before (a resent report).
                Err(lapse_store::StoreError::Conflict(_) | lapse_store::StoreError::Replay(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }
}
