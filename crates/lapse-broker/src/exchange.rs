//! The token exchange (RFC 8693) and Lapse's native access request, as one
//! pipeline: authenticate the workload → validate the request → decide → issue,
//! pend for approval, or deny → provision the target's credential. Each step is a
//! function of its own; [`Lapse::exchange`] reads as the list of them.

use crate::audit::{event, issued_data};
use crate::auth_failures::{AuthFailure, Credential};
use crate::broker::Lapse;
use crate::error::{BrokerError, clip, lifecycle};
use crate::json::set_field;
use crate::metrics::OutcomeLabels;
use lapse_core::grant::NewGrant;
use lapse_core::{
    AccessRequest, Decision, DecisionOutcome, Grant, GrantId, GrantState, RequestContext, Task,
    Timestamp, WorkloadIdentity as Workload,
};
use lapse_policy::PolicyBundle;
use lapse_providers::Handout;
use lapse_store::{AuditEvent, GrantWrite, WriteBatch};
use lapse_token::access::ACCESS_TOKEN_TYP;
use lapse_token::{AccessClaims, Confirmation, DpopProof};
use serde_json::json;
use std::net::IpAddr;

/// A token exchange or native access request, after parsing and before identity.
pub struct ExchangeInput {
    /// Empty when the client authenticated with an X.509-SVID instead.
    pub identity_token: String,
    /// The verified client certificate of the connection (mTLS), if any: its SVID is
    /// the identity when no identity token is given, and tokens are bound to it.
    pub client_cert: Option<lapse_tls::ClientCert>,
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

/// A request decided: what every outcome records and builds on.
struct Decided {
    /// The grant as the request and the decision make it, before its outcome.
    new: NewGrant,
    decision: Decision,
    /// `access.decided`, committed with the outcome.
    event: AuditEvent,
    /// The client certificate's thumbprint the grant is bound to (mTLS).
    x5t: Option<String>,
    justification: String,
}

impl Lapse {
    /// Authenticate, decide, and issue (or record as pending, or deny).
    pub async fn exchange(
        &self,
        input: ExchangeInput,
        proof: &DpopProof,
    ) -> Result<Issued, BrokerError> {
        let now = self.now();
        let policy = self.policy()?;
        let workload = self.authenticate(&input, now).await?;
        let x5t = input
            .client_cert
            .as_ref()
            .map(lapse_tls::ClientCert::thumbprint);
        self.admit_workload(&workload)?;
        let (request, justification) = self.validate(input, workload, &policy, now)?;
        self.refuse_if_quarantined(&request, Some(self.nonce(proof)), "exchange")
            .await?;
        let decided = self.decide(&policy, request, proof, x5t, justification, now);
        match decided.decision.outcome.clone() {
            DecisionOutcome::Deny { reasons } => Err(self.deny(decided, reasons, proof).await?),
            DecisionOutcome::ApprovalRequired {
                approvals,
                ttl_cap_secs,
                approvers,
            } => Err(self
                .pend(decided, approvals, ttl_cap_secs, approvers, proof)
                .await?),
            DecisionOutcome::Allow { ttl_cap_secs } => {
                self.issue(decided, ttl_cap_secs, proof).await
            }
        }
    }

    /// Who the workload is: its identity token verified against its issuer, or
    /// the X.509-SVID of the connection when it sent no token. A refusal is
    /// recorded as a failed authentication.
    async fn authenticate(
        &self,
        input: &ExchangeInput,
        now: Timestamp,
    ) -> Result<Workload, BrokerError> {
        match (&input.client_cert, input.identity_token.is_empty()) {
            // The TLS layer verified the chain against the trust bundle.
            (Some(cert), true) => match cert.svid() {
                Ok(w) => Ok(w),
                Err(why) => {
                    let f = AuthFailure::new(Credential::ClientCertificate, "not_an_svid");
                    self.auth_failed(Some(input.source), f).await;
                    Err(BrokerError::InvalidGrant(why))
                }
            },
            (None, true) => Err(BrokerError::InvalidRequest(
                "`subject_token` is required (or a client certificate: an X.509-SVID)".into(),
            )),
            (_, false) => match self
                .identity
                .verify(&input.identity_token, now.unix_seconds())
                .await
            {
                Ok(w) => Ok(w),
                Err(e) if e.is_unavailable() => Err(BrokerError::Unavailable(e.to_string())),
                Err(e) => {
                    let f = AuthFailure::identity(&input.identity_token, &e);
                    self.auth_failed(Some(input.source), f).await;
                    Err(BrokerError::InvalidGrant(e.to_string()))
                }
            },
        }
    }

    /// Each workload's request rate (`[limits] token_per_workload`).
    fn admit_workload(&self, workload: &Workload) -> Result<(), BrokerError> {
        self.limits
            .token_workload
            .check(&workload.id)
            .map_err(|wait| {
                BrokerError::TooManyRequests(
                    format!("workload `{}` is over its request rate", clip(&workload.id)),
                    wait,
                )
            })
    }

    /// The request as policy sees it, once every parameter is known and well
    /// formed; with the break-glass justification, trimmed.
    fn validate(
        &self,
        input: ExchangeInput,
        workload: Workload,
        policy: &PolicyBundle,
        now: Timestamp,
    ) -> Result<(AccessRequest, String), BrokerError> {
        self.check_target(&input.audience, &input.actions, policy)?;
        if input.task.id.trim().is_empty() {
            return Err(BrokerError::InvalidRequest(
                "`task` is required: access is always for a named task".into(),
            ));
        }
        if input.task.purpose.trim().is_empty() {
            return Err(BrokerError::InvalidRequest("`purpose` is required".into()));
        }
        check_words(&[
            ("task", &input.task.id),
            ("purpose", &input.task.purpose),
            ("ticket", &input.task.ticket),
            ("environment", &input.environment),
            ("justification", &input.justification),
        ])?;
        let justification = check_justification(&input.justification, input.break_glass)?;
        let requested = input.ttl_secs.unwrap_or(self.cfg.default_ttl.secs());
        if requested == 0 {
            return Err(BrokerError::InvalidRequest(
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
        Ok((request, justification))
    }

    fn check_target(
        &self,
        audience: &str,
        actions: &[String],
        policy: &PolicyBundle,
    ) -> Result<(), BrokerError> {
        if audience.is_empty() {
            return Err(BrokerError::InvalidRequest("`audience` is required".into()));
        }
        if !self.audiences.contains(audience) {
            return Err(BrokerError::InvalidTarget(format!(
                "unknown audience `{}`",
                clip(audience)
            )));
        }
        if actions.is_empty() {
            return Err(BrokerError::InvalidScope(
                "`scope` must name at least one action".into(),
            ));
        }
        for a in actions {
            if !policy.has_action(a) {
                return Err(BrokerError::InvalidScope(format!(
                    "unknown action `{}`",
                    clip(a)
                )));
            }
        }
        Ok(())
    }

    /// Policy decides now; the decision and what it was made on become the
    /// `access.decided` entry, and the grant-to-be carries both.
    fn decide(
        &self,
        policy: &PolicyBundle,
        request: AccessRequest,
        proof: &DpopProof,
        x5t: Option<String>,
        justification: String,
        now: Timestamp,
    ) -> Decided {
        let decision = policy.decide(&request);
        self.metrics
            .decisions
            .get_or_create(&OutcomeLabels {
                outcome: decision.outcome_label().into(),
            })
            .inc();
        let id = GrantId::generate();
        let event = event(
            now,
            "access.decided",
            Some(&id),
            &request.workload.id,
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
        Decided {
            new,
            decision,
            event,
            x5t,
            justification,
        }
    }

    /// A denial is recorded like everything else, but no grant row exists.
    /// Answers the error to return.
    async fn deny(
        &self,
        d: Decided,
        reasons: Vec<String>,
        proof: &DpopProof,
    ) -> Result<BrokerError, BrokerError> {
        self.commit(WriteBatch {
            grants: vec![],
            events: vec![d.event],
            nonces: vec![self.nonce(proof)],
            ..Default::default()
        })
        .await?;
        Ok(BrokerError::AccessDenied {
            description: reasons.join("; "),
            policies: d.decision.policies,
        })
    }

    /// Records the request as waiting for people and tells the approvers.
    /// Answers the `authorization_pending` error to return.
    async fn pend(
        &self,
        d: Decided,
        approvals: u32,
        ttl_cap_secs: Option<u64>,
        approvers: Option<String>,
        proof: &DpopProof,
    ) -> Result<BrokerError, BrokerError> {
        let actor = d.new.request.workload.id.clone();
        self.check_pending_cap(&actor).await?;
        let now = d.new.now;
        let mut grant = Grant::pending(
            NewGrant {
                ttl_cap_secs,
                ..d.new
            },
            approvals,
            approvers.clone(),
            self.cfg.approval_window.secs(),
        );
        grant.x5t = d.x5t;
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
            events: vec![d.event, pending],
            nonces: vec![self.nonce(proof)],
            ..Default::default()
        })
        .await?;
        self.notify("request.pending", note);
        Ok(BrokerError::AuthorizationPending {
            request_id,
            approvals,
            approvers,
        })
    }

    /// A workload cannot flood the approvers' queue.
    async fn check_pending_cap(&self, workload: &str) -> Result<(), BrokerError> {
        let cap = self.limits.cfg.max_pending_per_workload;
        let waiting = self
            .store
            .grants(lapse_store::GrantFilter {
                state: Some(GrantState::Pending),
                workload: Some(workload.to_owned()),
                limit: cap.saturating_add(1),
                ..Default::default()
            })
            .await?;
        if waiting.len() >= cap {
            return Err(BrokerError::TooManyRequests(
                format!(
                    "workload `{}` already has {cap} requests waiting for approval",
                    clip(workload)
                ),
                std::time::Duration::from_secs(60),
            ));
        }
        Ok(())
    }

    /// Issues the grant and its token in one audited commit, then has the
    /// target's provider (if the audience has one) create the credential.
    async fn issue(
        &self,
        d: Decided,
        ttl_cap_secs: Option<u64>,
        proof: &DpopProof,
    ) -> Result<Issued, BrokerError> {
        let now = d.new.now;
        let actor = d.new.request.workload.id.clone();
        let break_glass = d.new.request.context.break_glass;
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
                ..d.new
            },
            new_jti(),
        )
        .map_err(|e| BrokerError::InvalidRequest(e.to_string()))?;
        grant.x5t = d.x5t;
        grant.idle_secs = self.idle_of(&grant.policies);
        if break_glass {
            grant.review = Some(lapse_core::Review::open(&d.justification, now));
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
        let mut data = issued_data(&grant, &d.decision, now);
        if let Some(c) = grant.credentials.last() {
            // The intent is recorded with the issue, before the provider
            // creates anything: a crash in between leaves a trace.
            set_field(
                &mut data,
                "credential",
                json!({ "provider": c.provider, "target": c.target, "name": c.name, "state": "intended", "valid_until": c.valid_until }),
            );
        }
        if break_glass {
            set_field(&mut data, "justification", json!(d.justification));
        }
        let issued = event(now, "grant.issued", Some(&grant.id), &actor, data);
        self.commit(WriteBatch {
            grants: vec![GrantWrite::Insert(grant.clone())],
            events: vec![d.event, issued],
            nonces: vec![self.nonce(proof)],
            ..Default::default()
        })
        .await?;
        self.metrics.active_grants.inc();
        if break_glass {
            self.notify_break_glass(&grant, &d.justification);
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

    fn notify_break_glass(&self, grant: &Grant, justification: &str) {
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

    pub(crate) fn mint(&self, grant: &Grant, now: Timestamp) -> Result<String, BrokerError> {
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
            .map_err(|e| BrokerError::Unavailable(format!("cannot sign: {e}")))
    }
}

/// The break-glass justification, trimmed: required (10 characters at least) with
/// `break_glass`, refused without it, at most 2000 characters.
/// The longest text a request's words may be, in characters.
const MAX_WORDS: usize = 2000;

/// The request's words go to policy, the store, the audit log and approvers'
/// screens: no NUL or other control character (tab, CR and LF aside), nothing
/// longer than [`MAX_WORDS`]. The error names the field.
fn check_words(fields: &[(&str, &str)]) -> Result<(), BrokerError> {
    for (name, value) in fields {
        if value
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        {
            return Err(BrokerError::InvalidRequest(format!(
                "`{name}` contains a control character"
            )));
        }
        if value.chars().count() > MAX_WORDS {
            return Err(BrokerError::InvalidRequest(format!(
                "`{name}` is longer than {MAX_WORDS} characters"
            )));
        }
    }
    Ok(())
}

fn check_justification(raw: &str, break_glass: bool) -> Result<String, BrokerError> {
    let justification = raw.trim().to_owned();
    if break_glass && justification.chars().count() < 10 {
        return Err(BrokerError::InvalidRequest(
            "a break-glass request needs a written `justification` (at least 10 characters)".into(),
        ));
    }
    if justification.chars().count() > 2000 {
        return Err(BrokerError::InvalidRequest(
            "`justification` is longer than 2000 characters".into(),
        ));
    }
    if !break_glass && !justification.is_empty() {
        return Err(BrokerError::InvalidRequest(
            "`justification` goes with `break_glass` only".into(),
        ));
    }
    Ok(justification)
}

/// A fresh token id: 128 random bits.
pub(crate) fn new_jti() -> String {
    let b: [u8; 16] = rand::random();
    lapse_token::b64::encode(b)
}
