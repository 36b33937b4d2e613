//! The Lapse broker process: builds the broker from `lapse.toml`, serves its HTTP
//! API and console, and runs its background jobs.
//!
//! - [`build`]: config → key ring, store, policies, issuers, providers → [`Lapse`].
//! - [`serve`]: `lapse-api`'s router with `lapse-console`'s pages, over TCP or
//!   TLS, with the leader lease, sweeper, cleanup, reconciler, key-ring refresh
//!   and policy reloads running beside it.
//! - [`dev`]: `lapse serve --dev`: a data folder with keys, a dev issuer and example
//!   policies.

pub mod dev;

use lapse_broker::config::Config;
use lapse_broker::{BrokerError, Lapse};
use lapse_core::Clock;
use lapse_keyring::KeyRing;
use lapse_policy::PolicyBundle;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] lapse_broker::config::ConfigError),
    #[error(transparent)]
    Key(#[from] lapse_keyring::KeyRingError),
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
    Tls(#[from] lapse_tls::TlsError),
}

/// Builds the broker from its config: key, store, policies, issuers. Any of them
/// failing stops the start with an error that names what and where.
pub async fn build(cfg: Config, clock: Arc<dyn Clock>) -> Result<Arc<Lapse>, StartError> {
    let keys = Arc::new(KeyRing::new(cfg.key_sources())?);
    let store = lapse_store::open(
        &cfg.store,
        keys.clone(),
        Duration::from_secs(cfg.store_timeout.secs()),
    )
    .await?;
    keys.init(cfg.key_sources(), store.as_ref(), clock.now().millis())
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
    let actions: Vec<&str> = policy.actions().iter().map(String::as_str).collect();
    for table in cfg.providers() {
        let provider = table.build()?;
        let (kind, audience) = (table.kind(), table.audience());
        // The target may come up after Lapse: a failure to reach it is logged and
        // the setup retried before the first credential. A target that answers
        // and cannot serve the table (the admin lacks a privilege, a configured
        // table is missing) stops the start, naming it.
        match provider.prepare().await {
            Err(
                e @ (lapse_providers::ProviderError::Unfit { .. }
                | lapse_providers::ProviderError::Config(_)),
            ) => return Err(e.into()),
            Ok(()) => {}
            Err(e) => {
                tracing::error!(provider = kind, audience = %audience, error = %e, "provider not ready; credentials for it fail until it is")
            }
        }
        for action in provider.unmapped(&actions) {
            tracing::warn!(provider = kind, audience = %audience, action = %action, "the provider table maps no privileges to this action: its credential can do nothing for it");
        }
        providers.insert(audience.to_owned(), provider);
    }
    let webhook = cfg.webhook.clone();
    let tls = cfg
        .tls
        .as_ref()
        .map(lapse_tls::Tls::load)
        .transpose()?
        .map(Arc::new);
    let mut lapse = Lapse::new(cfg, store, Some(policy), identity, keys, clock);
    lapse.providers = providers;
    lapse.tls = tls;
    if let Some(w) = webhook {
        lapse.notifier = Some(
            lapse_broker::notify::Notifier::start(&w, lapse.metrics.clone())
                .map_err(StartError::Webhook)?,
        );
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
    let app = lapse_api::router(lapse, lapse_console::routes(axum::Router::new()));
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
    Fut: Future<Output = Result<usize, BrokerError>>,
{
    // The first pass waits for the lease rather than for a whole period: a
    // replica that starts (or takes over) runs the reconciler as soon as it leads,
    // not `reconcile_interval` later.
    let retry = Duration::from_millis(100).min(period);
    loop {
        if let Some(r) = lapse.run_as_leader(pass(lapse.clone())).await {
            log_pass(what, r);
            break;
        }
        tokio::time::sleep(retry).await;
    }
    tokio::time::sleep(period).await;
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
    Fut: Future<Output = Result<usize, BrokerError>>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        log_pass(what, pass().await);
    }
}

/// How many things a pass acted on, or why it failed (the next tick retries).
fn log_pass(what: &str, r: Result<usize, BrokerError>) {
    match r {
        Ok(0) => {}
        Ok(n) => tracing::info!(count = n, "{what}"),
        Err(e) => tracing::warn!(error = %e, "{what}: pass failed; will retry"),
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
