//! The broker's operations, independent of HTTP: exchange, introspect, complete,
//! revoke, renew, sweep. Each writes the grant change and its audit events in one
//! store commit before answering: no credential without its record.

use crate::config::{Config, Role};
use crate::error::ApiError;
use crate::metrics::{Metrics, OutcomeLabels};
use arc_swap::ArcSwapOption;
use lapse_core::grant::NewGrant;
use lapse_core::{
    AccessRequest, Clock, Decision, DecisionOutcome, Grant, GrantId, GrantState, RequestContext,
    Task, Timestamp, ttl,
};
use lapse_identity::IdentityVerifier;
use lapse_policy::PolicyBundle;
use lapse_providers::{CredentialProvider, Handout};
use lapse_store::{AuditEvent, GrantWrite, Store, WriteBatch};
use lapse_token::access::{self, ACCESS_TOKEN_TYP};
use lapse_token::dpop::{self, DpopRequirements};
use lapse_token::{AccessClaims, Confirmation, DpopProof, ReplayCache, SigningKey, TokenError};
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

const NONCE_PRUNE_PERIOD_MS: i64 = 10_000;

tokio::task_local! {
    /// The leader term a leader-only pass runs in (see [`Lapse::run_as_leader`]).
    static LEADER_FENCE: u64;
}

/// A leader term as this replica holds it.
#[derive(Debug, Clone, Copy)]
struct Term {
    generation: u64,
    /// When it lapses by this process's monotonic clock.
    until: std::time::Instant,
}

/// How far in the future a DPoP proof's `iat` may be.
const DPOP_MAX_SKEW_SECS: i64 = 5;

#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    pub roles: Vec<Role>,
    pub groups: Vec<String>,
    /// For a gate: the audiences it guards (empty: any).
    pub audiences: Vec<String>,
}

impl Operator {
    /// Whether this operator speaks for `audience` (a gate bound to others does not).
    pub fn covers_audience(&self, audience: &str) -> bool {
        self.audiences.is_empty() || self.audiences.iter().any(|a| a == audience)
    }
}

impl Operator {
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.roles.contains(&Role::Admin) || self.roles.contains(&role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                format!("operator `{}` lacks the `{role:?}` role", self.name).to_lowercase(),
            ))
        }
    }
}

pub struct Lapse {
    pub cfg: Config,
    pub issuer: String,
    pub store: Arc<dyn Store>,
    pub policy: ArcSwapOption<PolicyBundle>,
    pub identity: IdentityVerifier,
    /// The signing key ring: the key that signs now, and those that verify.
    pub keys: Arc<crate::keyring::KeyRing>,
    pub replay: ReplayCache,
    /// DPoP proof keys already parsed.
    pub proof_keys: dpop::KeyCache,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// The notification webhook, when configured.
    pub notifier: Option<crate::notify::Notifier>,
    /// Credential providers by audience.
    pub providers: HashMap<String, Arc<dyn CredentialProvider>>,
    /// Bumped after every commit that ends a grant: wakes the revocation-feed streams.
    pub feed_bumps: tokio::sync::watch::Sender<u64>,
    /// The leader term this replica holds (it runs the sweeper, cleanup and
    /// reconciler while it does), with when it lapses by this process's clock.
    leadership: std::sync::Mutex<Option<Term>>,
    /// TLS on the listener, when configured.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Rate limits and caps (`[limits]`).
    pub limits: crate::limits::Limits,
    /// When the sweeper last forgot expired nonces (ms).
    nonces_pruned_at: std::sync::atomic::AtomicI64,
    /// Set when the server is shutting down: ends the feed streams.
    pub closing: tokio::sync::watch::Sender<bool>,
    audiences: HashSet<String>,
    operators: HashMap<[u8; 32], Operator>,
}

/// A token exchange or native access request, after parsing and before identity.
pub struct ExchangeInput {
    /// Empty when the client authenticated with an X.509-SVID instead.
    pub identity_token: String,
    /// The verified client certificate of the connection (mTLS), if any: its SVID is
    /// the identity when no identity token is given, and tokens are bound to it.
    pub client_cert: Option<crate::tls::ClientCert>,
    pub audience: String,
    pub actions: Vec<String>,
    pub task: Task,
    pub ttl_secs: Option<u64>,
    pub environment: String,
    pub break_glass: bool,
    /// Why the requester breaks glass (required with `break_glass`).
    pub justification: String,
    pub source: IpAddr,
    /// Tools the task declares (an agent's), checked by `lapse_core::tools`.
    pub tools: Vec<lapse_core::ToolDecl>,
}

/// An issued credential.
pub struct Issued {
    pub grant: Grant,
    pub access_token: String,
    pub expires_in: u64,
    /// Provider credentials, handed out once (they hold secrets); never stored.
    pub credentials: Vec<Handout>,
}

pub fn hash_secret(s: &str) -> [u8; 32] {
    sha2::Sha256::digest(s.as_bytes()).into()
}

pub(crate) fn event(
    at: Timestamp,
    kind: &str,
    grant: Option<&GrantId>,
    actor: &str,
    data: Value,
) -> AuditEvent {
    AuditEvent {
        at: at.millis(),
        kind: kind.to_owned(),
        grant_id: grant.map(ToString::to_string),
        actor: actor.to_owned(),
        data,
    }
}

impl Lapse {
    pub fn new(
        cfg: Config,
        store: Arc<dyn Store>,
        policy: Option<PolicyBundle>,
        identity: IdentityVerifier,
        keys: Arc<crate::keyring::KeyRing>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let operators = cfg
            .operators
            .iter()
            .filter_map(|o| {
                let bytes: [u8; 32] = hex::decode(o.token_sha256.as_deref()?)
                    .ok()?
                    .try_into()
                    .ok()?;
                Some((
                    bytes,
                    Operator {
                        name: o.name.clone(),
                        roles: o.roles.clone(),
                        groups: o.groups.clone(),
                        audiences: o.audiences.clone(),
                    },
                ))
            })
            .collect();
        let limits = cfg.limits.clone();
        Self {
            issuer: cfg.public_url(),
            audiences: cfg.audiences.iter().map(|a| a.id.clone()).collect(),
            operators,
            cfg,
            store,
            policy: ArcSwapOption::from(policy.map(Arc::new)),
            identity,
            keys,
            replay: ReplayCache::new(1_000_000),
            proof_keys: dpop::KeyCache::new(),
            clock,
            metrics: Arc::new(Metrics::new()),
            notifier: None,
            providers: HashMap::new(),
            feed_bumps: tokio::sync::watch::channel(0).0,
            closing: tokio::sync::watch::channel(false).0,
            nonces_pruned_at: std::sync::atomic::AtomicI64::new(0),
            leadership: std::sync::Mutex::new(None),
            limits: crate::limits::Limits::new(limits),
            tls: None,
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Grant `id` from the store; a 404 that calls it a `what` when missing.
    pub async fn find(&self, id: GrantId, what: &str) -> Result<Grant, ApiError> {
        self.store
            .grant(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no {what} `{id}`")))
    }

    /// Commits through the store, marking every audit entry of a break-glass grant
    /// as such (`"break_glass": true` in its data). Entries about a grant the batch
    /// does not write must be committed with [`Lapse::commit_about`].
    pub(crate) async fn commit(&self, batch: WriteBatch) -> Result<(), lapse_store::StoreError> {
        self.commit_about(batch, &[]).await
    }

    /// [`Lapse::commit`] for a batch whose entries name grants it does not write
    /// (a refused approval, a tool-call report): `about` are those grants, so their
    /// entries are marked as break-glass too.
    pub(crate) async fn commit_about(
        &self,
        mut batch: WriteBatch,
        about: &[&Grant],
    ) -> Result<(), lapse_store::StoreError> {
        let written = batch.grants.iter().map(|w| match w {
            GrantWrite::Insert(g) | GrantWrite::Update { grant: g, .. } => g,
        });
        let marked: std::collections::HashSet<String> = written
            .chain(about.iter().copied())
            .filter(|g| g.request.context.break_glass)
            .map(|g| g.id.to_string())
            .collect();
        for e in &mut batch.events {
            if e.grant_id.as_ref().is_some_and(|id| marked.contains(id)) {
                crate::set_field(&mut e.data, "break_glass", json!(true));
            }
        }
        let ends = batch
            .grants
            .iter()
            .any(|w| matches!(w, GrantWrite::Update { grant, .. } if grant.state.is_ended()));
        if batch.fence.is_none() {
            // Within a leader-only pass every write is of that term.
            batch.fence = LEADER_FENCE.try_with(|f| *f).ok();
        }
        self.store.commit(batch).await?;
        if ends {
            self.feed_bumps.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    /// Queues a webhook event (when a webhook is configured); never waits.
    pub fn notify(&self, kind: &str, data: Value) {
        if let Some(n) = &self.notifier {
            n.send(kind, self.now().millis(), data);
        }
    }

    /// The operator an `Authorization: Bearer` API token belongs to.
    pub fn operator(&self, authorization: Option<&str>) -> Result<Operator, ApiError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "an operator API token is required (`Authorization: Bearer …`)".into(),
                )
            })?;
        self.operators
            .get(&hash_secret(token.trim()))
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("unknown operator API token".into()))
    }

    pub fn policy(&self) -> Result<Arc<PolicyBundle>, ApiError> {
        self.policy.load_full().ok_or_else(|| {
            ApiError::Unavailable("no valid policy set is loaded; nothing can be issued".into())
        })
    }

    /// Verifies the single DPoP header of a request to `path` with method `htm`.
    pub fn verify_dpop(
        &self,
        headers: &[&str],
        htm: &str,
        path: &str,
        access_token: Option<&str>,
    ) -> Result<DpopProof, ApiError> {
        let proof = match headers {
            [one] => *one,
            [] => {
                return Err(ApiError::InvalidDpopProof(
                    "a `DPoP` header with a proof is required".into(),
                ));
            }
            _ => {
                return Err(ApiError::InvalidDpopProof(
                    "exactly one `DPoP` header is allowed".into(),
                ));
            }
        };
        let htu = format!("{}{}", self.issuer, path);
        let req = DpopRequirements {
            keys: Some(&self.proof_keys),
            htm,
            htu: &htu,
            now_secs: self.now().unix_seconds(),
            max_age_secs: i64::try_from(self.cfg.dpop_max_age.secs()).unwrap_or(60),
            max_skew_secs: DPOP_MAX_SKEW_SECS,
            access_token,
        };
        dpop::verify(proof, &req, &self.replay).map_err(|e| match e {
            TokenError::ReplayCacheFull => {
                ApiError::Unavailable("DPoP replay protection is saturated; failing closed".into())
            }
            other => ApiError::InvalidDpopProof(other.to_string()),
        })
    }

    fn check_target(
        &self,
        audience: &str,
        actions: &[String],
        policy: &PolicyBundle,
    ) -> Result<(), ApiError> {
        if audience.is_empty() {
            return Err(ApiError::InvalidRequest("`audience` is required".into()));
        }
        if !self.audiences.contains(audience) {
            return Err(ApiError::InvalidTarget(format!(
                "unknown audience `{}`",
                clip(audience)
            )));
        }
        if actions.is_empty() {
            return Err(ApiError::InvalidScope(
                "`scope` must name at least one action".into(),
            ));
        }
        for a in actions {
            if !policy.has_action(a) {
                return Err(ApiError::InvalidScope(format!(
                    "unknown action `{}`",
                    clip(a)
                )));
            }
        }
        Ok(())
    }

    /// Authenticate, decide, and issue (or record as pending, or deny).
    pub async fn exchange(
        &self,
        input: ExchangeInput,
        proof: &DpopProof,
    ) -> Result<Issued, ApiError> {
        let now = self.now();
        let policy = self.policy()?;
        let workload = match (&input.client_cert, input.identity_token.is_empty()) {
            // The TLS layer verified the chain against the trust bundle.
            (Some(cert), true) => match cert.svid() {
                Ok(w) => w,
                Err(why) => {
                    let f = crate::auth_failures::AuthFailure::new(
                        crate::auth_failures::Credential::ClientCertificate,
                        "not_an_svid",
                    );
                    self.auth_failed(Some(input.source), f).await;
                    return Err(ApiError::InvalidGrant(why));
                }
            },
            (None, true) => {
                return Err(ApiError::InvalidRequest(
                    "`subject_token` is required (or a client certificate: an X.509-SVID)".into(),
                ));
            }
            (_, false) => match self
                .identity
                .verify(&input.identity_token, now.unix_seconds())
                .await
            {
                Ok(w) => w,
                Err(e) if e.is_unavailable() => return Err(ApiError::Unavailable(e.to_string())),
                Err(e) => {
                    let f = crate::auth_failures::AuthFailure::identity(&input.identity_token, &e);
                    self.auth_failed(Some(input.source), f).await;
                    return Err(ApiError::InvalidGrant(e.to_string()));
                }
            },
        };
        let x5t = input
            .client_cert
            .as_ref()
            .map(crate::tls::ClientCert::thumbprint);
        self.limits
            .token_workload
            .check(&workload.id)
            .map_err(|wait| {
                ApiError::TooManyRequests(
                    format!("workload `{}` is over its request rate", clip(&workload.id)),
                    wait,
                )
            })?;
        self.check_target(&input.audience, &input.actions, &policy)?;
        if input.task.id.trim().is_empty() {
            return Err(ApiError::InvalidRequest(
                "`task` is required: access is always for a named task".into(),
            ));
        }
        if input.task.purpose.trim().is_empty() {
            return Err(ApiError::InvalidRequest("`purpose` is required".into()));
        }
        let justification = input.justification.trim().to_owned();
        if input.break_glass && justification.chars().count() < 10 {
            return Err(ApiError::InvalidRequest(
                "a break-glass request needs a written `justification` (at least 10 characters)"
                    .into(),
            ));
        }
        if justification.chars().count() > 2000 {
            return Err(ApiError::InvalidRequest(
                "`justification` is longer than 2000 characters".into(),
            ));
        }
        if !input.break_glass && !justification.is_empty() {
            return Err(ApiError::InvalidRequest(
                "`justification` goes with `break_glass` only".into(),
            ));
        }
        let requested = input.ttl_secs.unwrap_or(self.cfg.default_ttl.secs());
        if requested == 0 {
            return Err(ApiError::InvalidRequest(
                "`expires_in` must be at least 1 second".into(),
            ));
        }
        let request = AccessRequest {
            workload,
            task: input.task,
            audience: input.audience,
            actions: input.actions,
            requested_ttl_secs: requested,
            context: RequestContext {
                environment: input.environment,
                source: input.source,
                time: now,
                break_glass: input.break_glass,
                depth: 0,
                tool: None,
            },
            tools: input.tools,
        };
        self.refuse_if_quarantined(&request, Some(self.nonce(proof)), "exchange")
            .await?;
        let decision = policy.decide(&request);
        self.metrics
            .decisions
            .get_or_create(&OutcomeLabels {
                outcome: decision.outcome_label().into(),
            })
            .inc();
        let actor = request.workload.id.clone();
        let id = GrantId::generate();
        let decided = event(
            now,
            "access.decided",
            Some(&id),
            &actor,
            json!({ "request": &request, "decision": &decision, "jkt": proof.jkt }),
        );
        let new = NewGrant {
            id,
            request,
            policies: decision.policies.clone(),
            ttl_cap_secs: None,
            jkt: proof.jkt.clone(),
            now,
            server_max_ttl_secs: self.cfg.max_ttl.secs(),
            max_lifetime_secs: self.cfg.max_lifetime.secs(),
        };
        match decision.outcome.clone() {
            DecisionOutcome::Deny { reasons } => {
                // A denial is recorded like everything else, but no grant row exists.
                self.commit(WriteBatch {
                    grants: vec![],
                    events: vec![decided],
                    nonces: vec![self.nonce(proof)],
                    ..Default::default()
                })
                .await?;
                Err(ApiError::AccessDenied {
                    description: reasons.join("; "),
                    policies: decision.policies,
                })
            }
            DecisionOutcome::ApprovalRequired {
                approvals,
                ttl_cap_secs,
                approvers,
            } => {
                // A workload cannot flood the approvers' queue.
                let cap = self.limits.cfg.max_pending_per_workload;
                let waiting = self
                    .store
                    .grants(lapse_store::GrantFilter {
                        state: Some(GrantState::Pending),
                        workload: Some(actor.clone()),
                        limit: cap.saturating_add(1),
                        ..Default::default()
                    })
                    .await?;
                if waiting.len() >= cap {
                    return Err(ApiError::TooManyRequests(
                        format!(
                            "workload `{}` already has {cap} requests waiting for approval",
                            clip(&actor)
                        ),
                        std::time::Duration::from_secs(60),
                    ));
                }
                let mut grant = Grant::pending(
                    NewGrant {
                        ttl_cap_secs,
                        ..new
                    },
                    approvals,
                    approvers.clone(),
                    self.cfg.approval_window.secs(),
                );
                grant.x5t = x5t.clone();
                let pending = event(
                    now,
                    "grant.pending",
                    Some(&grant.id),
                    &actor,
                    json!({ "approvals_required": approvals, "approvers": approvers, "approvable_until": grant.expires_at }),
                );
                let request_id = grant.id.to_string();
                let note = json!({
                    "request_id": request_id,
                    "workload": grant.request.workload.id,
                    "audience": grant.request.audience,
                    "actions": grant.actions,
                    "task": grant.request.task,
                    "approvals_required": approvals,
                    "approvers": approvers,
                    "policies": grant.policies,
                    "approvable_until": grant.expires_at.millis(),
                });
                self.commit(WriteBatch {
                    grants: vec![GrantWrite::Insert(grant)],
                    events: vec![decided, pending],
                    nonces: vec![self.nonce(proof)],
                    ..Default::default()
                })
                .await?;
                self.notify("request.pending", note);
                Err(ApiError::AuthorizationPending {
                    request_id,
                    approvals,
                    approvers,
                })
            }
            DecisionOutcome::Allow { ttl_cap_secs } => {
                let jti = new_jti();
                let break_glass = new.request.context.break_glass;
                // Break-glass access is short whatever the policy says.
                let ttl_cap_secs = if break_glass {
                    let hard = self.cfg.break_glass_max_ttl.secs();
                    Some(ttl_cap_secs.map_or(hard, |c| c.min(hard)))
                } else {
                    ttl_cap_secs
                };
                let mut grant = Grant::issue(
                    NewGrant {
                        ttl_cap_secs,
                        ..new
                    },
                    jti,
                )
                .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
                grant.x5t = x5t.clone();
                grant.idle_secs = self.idle_of(&grant.policies);
                if break_glass {
                    grant.review = Some(lapse_core::Review::open(&justification, now));
                }
                let provider = self.provider(&grant.request.audience).cloned();
                let grant = match &provider {
                    Some(p) => {
                        let intent = crate::credentials::intent(p, &grant);
                        grant.intend_credential(intent).map_err(lifecycle)?
                    }
                    None => grant,
                };
                let token = self.mint(&grant, now)?;
                let mut data = issued_data(&grant, &decision, now);
                if let Some(c) = grant.credentials.last() {
                    // The intent is recorded with the issue, before the provider
                    // creates anything: a crash in between leaves a trace.
                    crate::set_field(
                        &mut data,
                        "credential",
                        json!({ "provider": c.provider, "target": c.target, "name": c.name, "state": "intended", "valid_until": c.valid_until }),
                    );
                }
                if break_glass {
                    crate::set_field(&mut data, "justification", json!(justification));
                }
                let issued = event(now, "grant.issued", Some(&grant.id), &actor, data);
                self.commit(WriteBatch {
                    grants: vec![GrantWrite::Insert(grant.clone())],
                    events: vec![decided, issued],
                    nonces: vec![self.nonce(proof)],
                    ..Default::default()
                })
                .await?;
                self.metrics.active_grants.inc();
                if break_glass {
                    self.notify(
                        "break_glass.used",
                        json!({
                            "grant_id": grant.id.to_string(),
                            "workload": grant.request.workload.id,
                            "audience": grant.request.audience,
                            "actions": grant.actions,
                            "task": grant.request.task,
                            "justification": justification,
                            "policies": grant.policies,
                            "expires_at": grant.expires_at.millis(),
                        }),
                    );
                }
                let (grant, credentials) = match &provider {
                    Some(p) => {
                        let (g, h) = self.provision(grant, p).await?;
                        (g, vec![h])
                    }
                    None => (grant, vec![]),
                };
                Ok(Issued {
                    expires_in: grant.remaining_secs(now),
                    grant,
                    access_token: token,
                    credentials,
                })
            }
        }
    }

    pub(crate) fn mint(&self, grant: &Grant, now: Timestamp) -> Result<String, ApiError> {
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: grant.request.workload.id.clone(),
            aud: grant.request.audience.clone(),
            exp: grant.expires_at.unix_seconds(),
            iat: now.unix_seconds(),
            nbf: now.unix_seconds(),
            jti: grant.token_jti.clone().unwrap_or_default(),
            client_id: grant.request.workload.id.clone(),
            scope: grant.actions.join(" "),
            cnf: Confirmation {
                jkt: grant.jkt.clone(),
                x5t_s256: grant.x5t.clone(),
            },
            task: grant.request.task.id.clone(),
            grant_id: grant.id.to_string(),
            break_glass: grant.request.context.break_glass,
            ctx: Some(lapse_token::DecisionContext {
                wl_iss: grant.request.workload.issuer.clone(),
                wl_sub: grant.request.workload.subject.clone(),
                claims: grant.request.workload.claims.clone(),
                purpose: grant.request.task.purpose.clone(),
                ticket: grant.request.task.ticket.clone(),
                environment: grant.request.context.environment.clone(),
            }),
            tools: grant.request.tools.clone(),
            act: grant.act.clone(),
        };
        self.signing_key()?
            .sign_jwt(ACCESS_TOKEN_TYP, &claims)
            .map_err(|e| ApiError::Unavailable(format!("cannot sign: {e}")))
    }

    /// The proof's `jti` as spent in the store: the commit that acts on the proof
    /// fails if any replica already acted on it. Kept until the proof is too old to
    /// be accepted anyway.
    pub(crate) fn nonce(&self, proof: &DpopProof) -> lapse_store::Nonce {
        let value = hex::encode(sha2::Sha256::digest(format!(
            "{}\n{}",
            proof.jkt, proof.jti
        )));
        let max_age = i64::try_from(self.cfg.dpop_max_age.secs()).unwrap_or(60);
        lapse_store::Nonce {
            value,
            // Kept a minute past acceptance: replicas' clocks (and the pruning
            // leader's) may disagree by that much without reopening a replay window.
            expires_at: proof
                .iat
                .saturating_add(max_age)
                .saturating_add(DPOP_MAX_SKEW_SECS)
                .saturating_add(60)
                .saturating_mul(1000),
        }
    }

    /// The key that signs now.
    pub fn signing_key(&self) -> Result<SigningKey, ApiError> {
        self.keys
            .current_at(self.now().millis())
            .ok_or_else(|| ApiError::Unavailable("no signing key is active; failing closed".into()))
    }

    /// Verifies a Lapse access token's signature and lifetime (not grant state).
    pub fn verify_access_token(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let keys = self.keys.all();
        let now = self.now().millis();
        access::verify(
            token,
            |kid| {
                keys.iter()
                    .find(|k| k.kid == kid && k.published(now))
                    .map(|k| &k.public)
            },
            &self.issuer,
            self.now().unix_seconds(),
        )
    }

    /// RFC 7662. Inactive for anything not currently honourable.
    pub async fn introspect(&self, token: &str) -> Result<Value, ApiError> {
        let inactive = json!({ "active": false });
        let Ok(claims) = self.verify_access_token(token) else {
            return Ok(inactive);
        };
        let Ok(id) = claims.grant_id.parse::<GrantId>() else {
            return Ok(inactive);
        };
        let grant = self.store.grant(id).await.map_err(|e| {
            tracing::error!(error = %e, "introspection could not read the store; answering inactive");
            ApiError::Unavailable("the store is unavailable; the token must be treated as inactive".into())
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
        cert: Option<&crate::tls::ClientCert>,
        dpop_headers: &[&str],
        htm: &str,
        path: &str,
        grant_id: GrantId,
    ) -> Result<(AccessClaims, Grant, DpopProof), ApiError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("DPoP "))
            .ok_or_else(|| {
                ApiError::InvalidToken(
                    "a DPoP-bound access token is required (`Authorization: DPoP …`)".into(),
                )
            })?;
        let claims = self
            .verify_access_token(token)
            .map_err(|e| ApiError::InvalidToken(e.to_string()))?;
        let proof = self.verify_dpop(dpop_headers, htm, path, Some(token))?;
        if proof.jkt != claims.cnf.jkt {
            return Err(ApiError::InvalidDpopProof(
                "the proof's key is not the key the token is bound to".into(),
            ));
        }
        // RFC 8705: a certificate-bound token comes over a connection with that
        // certificate.
        if let Some(x5t) = &claims.cnf.x5t_s256 {
            let presented = cert.map(crate::tls::ClientCert::thumbprint);
            let same = presented.as_deref().is_some_and(|p| {
                p.len() == x5t.len()
                    && bool::from(subtle::ConstantTimeEq::ct_eq(p.as_bytes(), x5t.as_bytes()))
            });
            if !same {
                return Err(ApiError::InvalidToken(
                    "the token is bound to a client certificate this connection did not present"
                        .into(),
                ));
            }
        }
        if claims.grant_id != grant_id.to_string() {
            return Err(ApiError::Forbidden(
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
    ) -> Result<Grant, ApiError> {
        let first = event(self.now(), kind, Some(&ended.id), actor, data);
        self.end_with(grant, ended, vec![first]).await
    }

    /// [`Lapse::end`] with the audit events of the ending given whole.
    pub(crate) async fn end_with(
        &self,
        grant: Grant,
        ended: Grant,
        events: Vec<AuditEvent>,
    ) -> Result<Grant, ApiError> {
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
    ) -> Result<Grant, ApiError> {
        self.end_by(
            grant,
            |g, now| g.complete(now, by, reason),
            "grant.completed",
            by,
            data,
        )
        .await
    }

    pub async fn revoke(&self, grant: Grant, by: &str, reason: &str) -> Result<Grant, ApiError> {
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
    ) -> Result<Grant, ApiError> {
        let mut attempt = 0;
        loop {
            let (id, version) = (grant.id, grant.version);
            let ended = transition(grant.clone(), self.now()).map_err(lifecycle)?;
            match self.end(grant, ended, kind, actor, data.clone()).await {
                Err(ApiError::Conflict(m)) if attempt < 3 => {
                    attempt += 1;
                    match self.store.grant(id).await? {
                        Some(current) if current.version != version => grant = current,
                        _ => return Err(ApiError::Conflict(m)),
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
    ) -> Result<Issued, ApiError> {
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
                        ApiError::Unavailable(format!("no provider for `{}`", c.target))
                    })?;
                    p.extend(&c.name, renewed.expires_at)
                        .await
                        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
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
                Err(ApiError::AccessDenied {
                    description: format!("renewal refused, grant ended: {reason}"),
                    policies: decision.policies,
                })
            }
        }
    }

    /// Ends every grant whose time is up. Returns how many it ended.
    /// The tightest `@idle` among `policies` in the loaded policy set.
    pub(crate) fn idle_of(&self, policies: &[String]) -> Option<u64> {
        self.policy
            .load()
            .as_ref()
            .and_then(|p| p.idle_secs(policies))
    }

    /// Records uses gates report (`grant id`, unix ms), each at most once per
    /// `granularity` so busy grants do not turn every request into a write.
    /// Answers how many grants it recorded a use for.
    pub async fn record_uses(
        &self,
        op: &Operator,
        uses: &[(GrantId, i64)],
    ) -> Result<usize, ApiError> {
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

    /// Revokes active grants whose `@idle` window passed without a reported use.
    pub async fn sweep_idle(&self) -> Result<usize, ApiError> {
        let now = self.now();
        let mut n = 0;
        for g in self.store.idle_due(now, 500).await? {
            let idle = g.idle_secs.unwrap_or(0);
            match self
                .revoke(
                    g,
                    "lapse",
                    &format!("idle: no use reported for {idle} s (`@idle`)"),
                )
                .await
            {
                Ok(_) => n += 1,
                Err(ApiError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Takes or renews the leader lease (`leader_lease`) and remembers the term.
    /// The term is taken to lapse `leader_lease` after the request was sent —
    /// never later than the store's own lease, which starts when the store
    /// answers — so a process that stalls stops acting as leader, by its own
    /// monotonic clock, no later than another may take over.
    pub async fn lead(&self) -> Result<bool, ApiError> {
        let lease = std::time::Duration::from_secs(self.cfg.leader_lease.secs().max(1));
        let asked = std::time::Instant::now();
        let answer = self.store.try_lead(lease).await;
        let term = match &answer {
            Ok(Some(generation)) => Some(Term {
                generation: *generation,
                until: asked + lease,
            }),
            _ => None,
        };
        let was = {
            let mut held = self
                .leadership
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *held, term)
        };
        match (&was, &term) {
            (None, Some(t)) => {
                tracing::info!(
                    generation = t.generation,
                    "this replica now runs the sweeper and reconciler"
                );
            }
            (Some(w), Some(t)) if w.generation != t.generation => {
                tracing::warn!(
                    generation = t.generation,
                    "the leader term lapsed and a new one began"
                );
            }
            (Some(_), None) => {
                tracing::warn!("this replica no longer runs the sweeper and reconciler");
            }
            _ => {}
        }
        Ok(answer?.is_some())
    }

    /// The generation of the leader term this replica holds now, if it holds one
    /// that has not lapsed: what leader-only writes carry as their fence.
    pub fn fence(&self) -> Option<u64> {
        let held = self
            .leadership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.filter(|t| std::time::Instant::now() < t.until)
            .map(|t| t.generation)
    }

    /// Whether this replica runs the sweeper, cleanup and reconciler now.
    pub fn leading(&self) -> bool {
        self.fence().is_some()
    }

    /// Whether a leader-only pass may still act: outside one, always; inside, while
    /// the term it began in has not lapsed. For actions on targets, which the
    /// store's fence cannot refuse.
    pub(crate) fn still_in_term(&self) -> bool {
        LEADER_FENCE
            .try_with(|f| *f)
            .map_or(true, |f| self.fence() == Some(f))
    }

    /// Runs a leader-only pass in the term this replica holds, or skips it (`None`)
    /// when it holds none. Every commit of the pass carries the term as its fence:
    /// if the process stalls mid-pass and another replica takes over, what the
    /// pass writes after it wakes is refused.
    pub async fn run_as_leader<T>(&self, pass: impl Future<Output = T>) -> Option<T> {
        let generation = self.fence()?;
        Some(LEADER_FENCE.scope(generation, pass).await)
    }

    /// Grants read per page of a sweep, and pages per pass (a pass ends at most
    /// 500, as many as one read did before; what is left waits for the next).
    const SWEEP_PAGE: usize = 100;
    const SWEEP_PAGES: usize = 5;

    pub async fn sweep(&self) -> Result<usize, ApiError> {
        let idle = self.sweep_idle().await?;
        let now = self.now();
        // Spent proofs are forgotten once they could not be accepted anyway.
        let last = self
            .nonces_pruned_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if now.millis().saturating_sub(last) >= NONCE_PRUNE_PERIOD_MS {
            // A failed prune only delays forgetting; expiry must go on regardless.
            match self.store.prune_nonces(now).await {
                Ok(_) => self
                    .nonces_pruned_at
                    .store(now.millis(), std::sync::atomic::Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, "pruning spent DPoP nonces failed; will retry")
                }
            }
        }
        // Read in pages: a whole pass's grants held at once were the largest
        // allocation the broker made, and after a stall (a backlog of expiries)
        // the allocator kept that high-water mark for good.
        let mut n = 0;
        for _ in 0..Self::SWEEP_PAGES {
            let due = self.store.due(now, Self::SWEEP_PAGE).await?;
            let full = due.len() == Self::SWEEP_PAGE;
            n += self.expire_all(due, now).await?;
            if !full {
                break;
            }
        }
        Ok(n + idle)
    }

    /// Ends each grant past its expiry, one commit each; returns how many.
    async fn expire_all(&self, due: Vec<Grant>, now: Timestamp) -> Result<usize, ApiError> {
        let mut n = 0;
        for g in due {
            let was_active = g.state == GrantState::Active;
            let Ok(ended) = g.clone().expire(now) else {
                continue;
            };
            let owed = ended.clone();
            let batch = WriteBatch {
                events: vec![event(
                    now,
                    "grant.expired",
                    Some(&ended.id),
                    "lapse",
                    json!({ "reason": ended.end.as_ref().map(|e| e.reason.clone()), "expires_at": g.expires_at }),
                )],
                grants: vec![GrantWrite::Update {
                    expected_version: g.version,
                    grant: ended,
                }],
                ..Default::default()
            };
            match self.commit(batch).await {
                Ok(()) => {
                    n += 1;
                    self.destroy_owed(owed).await;
                    if was_active {
                        self.metrics.active_grants.dec();
                    }
                    self.metrics
                        .grants_ended
                        .get_or_create(&OutcomeLabels {
                            outcome: "expired".into(),
                        })
                        .inc();
                }
                Err(lapse_store::StoreError::Conflict(_)) => {} // ended by someone else meanwhile
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }
}

pub(crate) fn issued_data(grant: &Grant, decision: &Decision, now: Timestamp) -> Value {
    json!({
        "jti": grant.token_jti,
        "jkt": grant.jkt,
        "audience": grant.request.audience,
        "scope": grant.actions.join(" "),
        "task": grant.request.task.id,
        "ttl": grant.remaining_secs(now),
        "expires_at": grant.expires_at,
        "max_expires_at": grant.max_expires_at,
        "policies": decision.policies,
        "break_glass": grant.request.context.break_glass,
    })
}

pub(crate) fn new_jti() -> String {
    let b: [u8; 16] = rand::random();
    lapse_token::b64::encode(b)
}

pub(crate) fn lifecycle(e: lapse_core::LifecycleError) -> ApiError {
    ApiError::Conflict(e.to_string())
}

pub fn clip(s: &str) -> String {
    s.chars().take(128).collect()
}
