//! The Lapse broker.
//!
//! - `config`: `lapse.toml`.
//! - [`service`]: exchange, introspect, complete, revoke, renew, sweep — no HTTP.
//! - [`http`]: the axum router (`router(state)`, so tests drive it directly or over a
//!   real socket).
//! - [`dev`]: `lapse serve --dev`: a data folder with keys, a dev issuer and example
//!   policies.

// The OpenAPI document is one `json!` literal, deeper than the default limit.
#![recursion_limit = "256"]

pub mod approvals;
pub mod auth_failures;
pub mod config;
pub mod console;
pub mod credentials;
pub mod delegation;
pub mod dev;
pub mod error;
pub mod feed;
pub mod http;
pub mod keyring;
pub mod limits;
pub mod metrics;
pub mod notify;
mod openapi;
pub mod quarantine;
pub mod report;
pub mod service;
pub mod signals;
pub mod tool_calls;
pub use lapse_tls as tls;

use config::Config;
use lapse_core::Clock;
use lapse_policy::PolicyBundle;
use lapse_store::{Store, VerifyReport};
use service::Lapse;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Key(#[from] keyring::KeyRingError),
    #[error(transparent)]
    KeyFile(#[from] lapse_token::signing::KeyFileError),
    #[error(transparent)]
    Store(#[from] lapse_store::StoreError),
    #[error("policies: {0}")]
    Policy(#[from] lapse_policy::PolicyError),
    #[error(transparent)]
    Identity(#[from] lapse_identity::IdentityError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("dev setup: {0}")]
    Dev(String),
    #[error(transparent)]
    Provider(#[from] lapse_providers::ProviderError),
    #[error("webhook: {0}")]
    Webhook(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Builds the broker from its config: key, store, policies, issuers. Any of them
/// failing stops the start with an error that names what and where.
pub async fn build(cfg: Config, clock: Arc<dyn Clock>) -> Result<Arc<Lapse>, StartError> {
    let keys = Arc::new(keyring::KeyRing::new(&cfg)?);
    let store = lapse_store::open(
        &cfg.store,
        keys.clone(),
        Duration::from_secs(cfg.store_timeout.secs()),
    )
    .await?;
    keys.init(&cfg, store.as_ref(), clock.now().millis())
        .await?;
    let policy = PolicyBundle::load_dir(&cfg.policies)?;
    tracing::info!(policies = policy.policy_count, actions = ?policy.actions(), "policies loaded");
    let mut issuers = Vec::new();
    for i in &cfg.issuers {
        issuers.push(lapse_identity::IssuerConfig {
            issuer: i.issuer.clone(),
            jwks: lapse_identity::JwksSource::parse(&i.jwks).map_err(StartError::Dev)?,
            audience: i.audience.clone(),
            workload: i.workload.parse().map_err(|e: String| StartError::Dev(e))?,
            leeway_secs: i64::try_from(i.leeway.secs()).unwrap_or(30),
        });
    }
    let identity =
        lapse_identity::IdentityVerifier::new(issuers, lapse_identity::http_client()).await?;
    let mut providers: std::collections::HashMap<
        String,
        Arc<dyn lapse_providers::CredentialProvider>,
    > = std::collections::HashMap::new();
    for p in &cfg.postgres {
        let provider = lapse_providers::postgres::PostgresProvider::new(p.clone())?;
        // The database may come up after Lapse: a failure here is logged and the
        // setup retried before the first credential.
        if let Err(e) = provider.prepare().await {
            tracing::error!(audience = %p.audience, error = %e, "postgres provider not ready; credentials for it fail until it is");
        }
        for action in policy.actions() {
            if !provider.groups().contains_key(action) {
                tracing::warn!(audience = %p.audience, action = %action, "no [[postgres.grant]] for this action: its database role gets no privileges for it");
            }
        }
        providers.insert(p.audience.clone(), Arc::new(provider));
    }
    let webhook = cfg.webhook.clone();
    let tls = cfg
        .tls
        .as_ref()
        .map(tls::Tls::load)
        .transpose()?
        .map(Arc::new);
    let mut lapse = Lapse::new(cfg, store, Some(policy), identity, keys, clock);
    lapse.providers = providers;
    lapse.tls = tls;
    if let Some(w) = webhook {
        lapse.notifier =
            Some(notify::Notifier::start(&w, lapse.metrics.clone()).map_err(StartError::Webhook)?);
    }
    let lapse = Arc::new(lapse);
    if let Ok(n) = lapse.store.count(lapse_core::GrantState::Active).await {
        lapse
            .metrics
            .active_grants
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    Ok(lapse)
}

/// Serves until `shutdown` resolves, running the sweeper, the policy watcher and,
/// with providers, the credential cleanup and the reconciler.
pub async fn serve(
    lapse: Arc<Lapse>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweep_period = lapse
        .cfg
        .sweep_interval
        .map_or(Duration::from_millis(500), |d| {
            Duration::from_secs(d.secs().max(1))
        });
    // The sweeper, cleanup and reconciler run on one replica at a time: the one
    // holding the store's leader lease. It renews five times per lease; the others
    // ask as often and one takes over once a lease lapses unrenewed.
    let lease = Duration::from_secs(lapse.cfg.leader_lease.secs().max(1));
    let mut background = vec![
        tokio::spawn(lead_loop(lapse.clone(), lease / 5)),
        tokio::spawn(every_as_leader(
            lapse.clone(),
            sweep_period,
            "sweeper ended expired grants",
            |l| async move { l.sweep().await },
        )),
        tokio::spawn(policy_watch_loop(lapse.clone())),
    ];
    if !lapse.providers.is_empty() {
        // Owed destroys, each grant at its own backoff.
        background.push(tokio::spawn(every_as_leader(
            lapse.clone(),
            Duration::from_millis(500),
            "cleanup retried credential destroys",
            |l| async move { l.cleanup().await },
        )));
        // At start, then every `reconcile_interval`.
        background.push(tokio::spawn(every_as_leader(
            lapse.clone(),
            Duration::from_secs(lapse.cfg.reconcile_interval.secs().max(1)),
            "reconciler corrected targets",
            |l| async move { l.reconcile().await },
        )));
    }
    if lapse.keys.shared() {
        // Rotations made by another replica or `lapse keys rotate`.
        let l = lapse.clone();
        background.push(tokio::spawn(async move {
            let period = Duration::from_secs(l.cfg.key_refresh.secs().max(1));
            loop {
                tokio::time::sleep(period).await;
                if let Err(e) = l.keys.reload(l.store.as_ref()).await {
                    tracing::warn!(error = %e, "key ring reload failed; keeping the keys loaded");
                }
            }
        }));
    }
    if lapse.store.feed_changes().is_some() {
        // Other replicas issue and end grants too: the gauge is re-read from the
        // store rather than drifting with this replica's share.
        let l = lapse.clone();
        background.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Ok(n) = l.store.count(lapse_core::GrantState::Active).await {
                    l.metrics
                        .active_grants
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }));
    }
    if let Some(mut changes) = lapse.store.feed_changes() {
        // Another replica ended a grant: wake this replica's feed streams.
        let l = lapse.clone();
        background.push(tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                l.feed_bumps.send_modify(|n| *n = n.wrapping_add(1));
            }
        }));
    }
    let closing = lapse.closing.clone();
    let tls = lapse.tls.clone();
    let app = http::router(lapse);
    // Feed streams never end by themselves; they must, for the graceful shutdown
    // to finish (gates reconnect to another replica, or resume).
    let result = lapse_tls::serve(tls, listener, app, shutdown, move || {
        closing.send_replace(true);
    })
    .await;
    for task in background {
        task.abort();
    }
    result
}

/// Keeps asking for (or renewing) the leader lease every `period`. Its own task,
/// so a long sweep or reconcile never delays a renewal.
async fn lead_loop(lapse: Arc<Lapse>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = lapse.lead().await {
            tracing::warn!(error = %e, "leader lease: the store did not answer; not leading until it does");
        }
    }
}

/// [`every`] for the singleton jobs: a pass runs only in a leader term this replica
/// holds, and its writes are fenced with that term.
async fn every_as_leader<F, Fut>(lapse: Arc<Lapse>, period: Duration, what: &'static str, pass: F)
where
    F: Fn(Arc<Lapse>) -> Fut,
    Fut: Future<Output = Result<usize, error::ApiError>>,
{
    every(period, what, || {
        let l = lapse.clone();
        let run = pass(l.clone());
        async move { l.run_as_leader(run).await.unwrap_or(Ok(0)) }
    })
    .await
}

/// Runs `pass` every `period` (the first at once), logging how many things it
/// acted on, or why it failed (the next tick retries).
async fn every<F, Fut>(period: Duration, what: &'static str, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<usize, error::ApiError>>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pass().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "{what}"),
            Err(e) => tracing::warn!(error = %e, "{what}: pass failed; will retry"),
        }
    }
}

/// A fingerprint of the policy folder: names, sizes and modification times.
fn fingerprint(dir: &Path) -> Option<Vec<(String, u64, SystemTime)>> {
    let mut v: Vec<(String, u64, SystemTime)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.modified().ok()?,
            ))
        })
        .collect();
    v.sort();
    Some(v)
}

async fn policy_watch_loop(lapse: Arc<Lapse>) {
    let dir = lapse.cfg.policies.clone();
    let mut last = fingerprint(&dir);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = fingerprint(&dir);
        if now == last {
            continue;
        }
        last = now;
        match PolicyBundle::load_dir(&dir) {
            Ok(b) => {
                tracing::info!(policies = b.policy_count, "policies reloaded");
                lapse.policy.store(Some(Arc::new(b)));
            }
            Err(e) => {
                lapse.metrics.policy_reload_failures.inc();
                tracing::error!(error = %e, "policy change refused; keeping the last good set");
            }
        }
    }
}

/// Verifies the whole audit chain in the store against the signed checkpoint.
pub async fn verify_audit(
    store: &dyn Store,
    keys: &keyring::KeyRing,
) -> Result<VerifyReport, lapse_store::StoreError> {
    verify_audit_visiting(store, keys, |_| {}).await
}

/// [`verify_audit`], showing every entry to `visit` on the way, so a caller that
/// also needs the log's content reads it once. Verification stops at the first bad
/// entry; the visit goes on to the end.
pub async fn verify_audit_visiting(
    store: &dyn Store,
    keys: &keyring::KeyRing,
    visit: impl FnMut(&lapse_store::AuditEntry),
) -> Result<VerifyReport, lapse_store::StoreError> {
    let mut v = lapse_store::audit::ChainVerifier::new(None);
    let mut visit = visit;
    let checkpoint = read_audit(store, |e| {
        v.push(e);
        visit(e);
    })
    .await?;
    v.set_checkpoint(checkpoint);
    // The checkpoint may be signed by any key the ring ever had.
    Ok(v.finish(|k, m, s| keys.any(k).is_some_and(|p| p.verify(m, s).is_ok())))
}

/// Shows every audit entry to `visit`, in order, then answers the signed
/// checkpoint, read after the entries: every commit appends and re-signs in one
/// transaction, so a checkpoint read later covers at least every entry read, and
/// an entry past it is a tail Lapse did not write. A checkpoint ahead of the
/// entries read means commits landed meanwhile: read on (a few rounds; past them,
/// a checkpoint the log never reaches is a truncation, which verification reports).
pub async fn read_audit(
    store: &dyn Store,
    mut visit: impl FnMut(&lapse_store::AuditEntry),
) -> Result<Option<lapse_store::Checkpoint>, lapse_store::StoreError> {
    let mut after = 0;
    let mut checkpoint = None;
    for _ in 0..4 {
        loop {
            let page = store.audit(after, 5000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            page.iter().for_each(&mut visit);
        }
        checkpoint = store.checkpoint().await?;
        if checkpoint.as_ref().is_none_or(|cp| cp.seq <= after) {
            break;
        }
    }
    Ok(checkpoint)
}

/// Sets `key` on a JSON object (a no-op on anything else, which callers never pass).
pub fn set_field(v: &mut serde_json::Value, key: &str, value: serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(key.to_owned(), value);
    }
}
