//! The broker: one [`Lapse`] per process, holding the store, the loaded policy
//! set, the identity verifier, the key ring and the credential providers. Its
//! operations live in the modules named for them (`exchange`, `lifecycle`,
//! `approvals`, …); this module holds what they share. Every operation writes
//! the grant change and its audit events in one store commit before answering: no
//! credential without its record.

use crate::config::{Config, Role};
use crate::error::BrokerError;
use crate::json::set_field;
use crate::leader::{Leadership, current_fence};
use crate::metrics::Metrics;
use arc_swap::ArcSwapOption;
use lapse_core::{Clock, Grant, GrantId, Timestamp};
use lapse_identity::IdentityVerifier;
use lapse_keyring::KeyRing;
use lapse_policy::PolicyBundle;
use lapse_providers::CredentialProvider;
use lapse_store::{GrantWrite, Store, WriteBatch};
use lapse_token::access;
use lapse_token::dpop;
use lapse_token::{AccessClaims, ReplayCache, SigningKey, TokenError};
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
    pub fn require(&self, role: Role) -> Result<(), BrokerError> {
        if self.roles.contains(&Role::Admin) || self.roles.contains(&role) {
            Ok(())
        } else {
            Err(BrokerError::Forbidden(
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
    pub keys: Arc<KeyRing>,
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
    /// reconciler while it does).
    pub leader: Leadership,
    /// TLS on the listener, when configured.
    pub tls: Option<Arc<lapse_tls::Tls>>,
    /// Rate limits and caps (`[limits]`).
    pub limits: crate::limits::Limits,
    /// When the sweeper last forgot expired nonces (ms).
    pub(crate) nonces_pruned_at: std::sync::atomic::AtomicI64,
    /// Set when the server is shutting down: ends the feed streams.
    pub closing: tokio::sync::watch::Sender<bool>,
    pub(crate) audiences: HashSet<String>,
    operators: HashMap<[u8; 32], Operator>,
}

pub fn hash_secret(s: &str) -> [u8; 32] {
    sha2::Sha256::digest(s.as_bytes()).into()
}

impl Lapse {
    pub fn new(
        cfg: Config,
        store: Arc<dyn Store>,
        policy: Option<PolicyBundle>,
        identity: IdentityVerifier,
        keys: Arc<KeyRing>,
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
            leader: Leadership::default(),
            limits: crate::limits::Limits::new(limits),
            tls: None,
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Grant `id` from the store; a 404 that calls it a `what` when missing.
    pub async fn find(&self, id: GrantId, what: &str) -> Result<Grant, BrokerError> {
        self.store
            .grant(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no {what} `{id}`")))
    }

    /// Commits through the store, marking every audit entry of a break-glass grant
    /// as such (`"break_glass": true` in its data). Entries about a grant the batch
    /// does not write must be committed with [`Lapse::commit_about`].
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), lapse_store::StoreError> {
        self.commit_about(batch, &[]).await
    }

    /// [`Lapse::commit`] for a batch whose entries name grants it does not write
    /// (a refused approval, a tool-call report): `about` are those grants, so their
    /// entries are marked as break-glass too.
    pub async fn commit_about(
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
                set_field(&mut e.data, "break_glass", json!(true));
            }
        }
        let ends = batch
            .grants
            .iter()
            .any(|w| matches!(w, GrantWrite::Update { grant, .. } if grant.state.is_ended()));
        if batch.fence.is_none() {
            // Within a leader-only pass every write is of that term.
            batch.fence = current_fence();
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
    pub fn operator(&self, authorization: Option<&str>) -> Result<Operator, BrokerError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                BrokerError::Unauthorized(
                    "an operator API token is required (`Authorization: Bearer …`)".into(),
                )
            })?;
        self.operators
            .get(&hash_secret(token.trim()))
            .cloned()
            .ok_or_else(|| BrokerError::Unauthorized("unknown operator API token".into()))
    }

    pub fn policy(&self) -> Result<Arc<PolicyBundle>, BrokerError> {
        self.policy.load_full().ok_or_else(|| {
            BrokerError::Unavailable("no valid policy set is loaded; nothing can be issued".into())
        })
    }

    /// The key that signs now.
    pub fn signing_key(&self) -> Result<SigningKey, BrokerError> {
        self.keys.current_at(self.now().millis()).ok_or_else(|| {
            BrokerError::Unavailable("no signing key is active; failing closed".into())
        })
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

    /// The tightest `@idle` among `policies` in the loaded policy set.
    pub(crate) fn idle_of(&self, policies: &[String]) -> Option<u64> {
        self.policy
            .load()
            .as_ref()
            .and_then(|p| p.idle_secs(policies))
    }

    /// Takes or renews the leader lease (`leader_lease`); see [`Leadership::lead`].
    pub async fn lead(&self) -> Result<bool, BrokerError> {
        let lease = std::time::Duration::from_secs(self.cfg.leader_lease.secs().max(1));
        Ok(self.leader.lead(self.store.as_ref(), lease).await?)
    }

    /// Whether this replica runs the sweeper, cleanup and reconciler now.
    pub fn leading(&self) -> bool {
        self.leader.fence().is_some()
    }

    /// Runs a leader-only pass in the term this replica holds, or skips it (`None`)
    /// when it holds none; see [`Leadership::run`].
    pub async fn run_as_leader<T>(&self, pass: impl Future<Output = T>) -> Option<T> {
        self.leader.run(pass).await
    }
}
