//! A gate's view of its broker: the verifier (keys, revocation feed) and the
//! broker's current Cedar policies, pulled and swapped in as they change, so a
//! policy change reaches every gate without a restart. Shared by `lapse gate` and
//! `lapse mcp-proxy`.

use arc_swap::ArcSwapOption;
use lapse_core::TtlDuration;
use lapse_policy::PolicyBundle;
use lapse_verifier::{OnStale, Verifier, VerifierConfig, VerifierError};
use std::sync::Arc;
use std::time::Duration;

/// How often the broker's keys are refetched even without an unknown `kid`.
const KEY_REFRESH: Duration = Duration::from_secs(60);

/// What a gate needs to know about its broker.
pub struct BrokerLink<'a> {
    pub broker: &'a str,
    /// The `iss` of Lapse tokens; `None`: the broker's URL.
    pub issuer: Option<&'a str>,
    pub audience: &'a str,
    /// The gate's operator API token.
    pub token: &'a str,
    pub staleness: TtlDuration,
    pub on_stale: OnStale,
}

/// How old a DPoP proof may be unless configured otherwise.
pub const DPOP_MAX_AGE_SECS: i64 = 60;

/// Connects to the broker: keys first, then the policies (a gate without them
/// refuses until they come). Fails when the keys cannot be fetched.
pub async fn connect(
    link: &BrokerLink<'_>,
) -> Result<(Arc<Verifier>, Arc<BrokerPolicy>), VerifierError> {
    let verifier = Verifier::new(verifier_config(link, DPOP_MAX_AGE_SECS)).await?;
    let policy = Arc::new(BrokerPolicy::new(link.broker, link.token));
    if let Err(e) = policy.refresh().await {
        tracing::warn!(error = %e, "no policy from the broker yet; refusing until there is");
    }
    Ok((Arc::new(verifier), policy))
}

/// A gate's view of a broker that may not answer yet: tries the keys and the
/// policies once, and answers whether the keys came. A gate that got neither
/// refuses everything (503) until [`follow`] and [`fetch_keys`] get them.
pub async fn open(
    link: &BrokerLink<'_>,
    dpop_max_age_secs: i64,
    dpop_nonces: bool,
) -> (Arc<Verifier>, Arc<BrokerPolicy>, bool) {
    let mut verifier =
        Verifier::offline(verifier_config(link, dpop_max_age_secs), Default::default());
    if dpop_nonces {
        verifier = verifier.requiring_dpop_nonces();
    }
    let keys = match verifier.refresh_keys().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "no keys from the broker yet; refusing until there are");
            false
        }
    };
    let policy = Arc::new(BrokerPolicy::new(link.broker, link.token));
    if let Err(e) = policy.refresh().await {
        tracing::warn!(error = %e, "no policy from the broker yet; refusing until there is");
    }
    (Arc::new(verifier), policy, keys)
}

/// Fetches the broker's keys until it answers, with backoff (250 ms doubling to
/// 5 s).
pub async fn fetch_keys(verifier: &Verifier) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match verifier.refresh_keys().await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "still no keys from the broker; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn verifier_config(link: &BrokerLink<'_>, dpop_max_age_secs: i64) -> VerifierConfig {
    VerifierConfig {
        broker: link.broker.to_owned(),
        issuer: link.issuer.unwrap_or(link.broker).to_owned(),
        audience: link.audience.to_owned(),
        token: link.token.to_owned(),
        staleness: Duration::from_secs(link.staleness.secs().max(1)),
        on_stale: link.on_stale,
        dpop_max_age_secs,
    }
}

/// Keeps a gate's view current until aborted: the feed, the policies every
/// `policy_every`, and the keys every minute (they are also refetched on an
/// unknown `kid`; this catches a key the broker withdrew).
pub fn follow(
    verifier: Arc<Verifier>,
    policy: Arc<BrokerPolicy>,
    policy_every: Duration,
) -> Vec<tokio::task::JoinHandle<()>> {
    let feed = tokio::spawn(verifier.clone().follow());
    let pulls = tokio::spawn(async move {
        let mut tick = tokio::time::interval(policy_every.max(Duration::from_secs(1)));
        let mut last_keys = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if let Err(e) = policy.refresh().await {
                tracing::warn!(error = %e, "could not refresh the broker's policies; keeping the last good set");
            }
            if last_keys.elapsed() >= KEY_REFRESH {
                last_keys = tokio::time::Instant::now();
                if let Err(e) = verifier.refresh_keys().await {
                    tracing::warn!(error = %e, "could not refresh the broker's keys");
                }
            }
        }
    });
    vec![feed, pulls]
}

pub struct BrokerPolicy {
    url: String,
    token: String,
    http: reqwest::Client,
    current: ArcSwapOption<PolicyBundle>,
    digest: std::sync::Mutex<String>,
}

impl BrokerPolicy {
    /// `token`: an operator API token with the `gate` role.
    pub fn new(broker: &str, token: &str) -> Self {
        Self {
            url: format!("{}/v1/policies", broker.trim_end_matches('/')),
            token: token.to_owned(),
            http: lapse_identity::http_client(),
            current: ArcSwapOption::empty(),
            digest: std::sync::Mutex::new(String::new()),
        }
    }

    /// The bundle in force; `None` until the first pull succeeded.
    pub fn current(&self) -> Option<Arc<PolicyBundle>> {
        self.current.load_full()
    }

    /// Pulls the broker's policy files and swaps in a new bundle when they changed
    /// (true). A bundle that does not build keeps the last good one.
    pub async fn refresh(&self) -> Result<bool, String> {
        let v: serde_json::Value = self
            .http
            .get(&self.url)
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .error_for_status()
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let digest = v
            .get("digest")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if self.digest.lock().map(|d| *d == digest).unwrap_or(false) {
            return Ok(false);
        }
        let files: Vec<lapse_policy::SourceFile> =
            serde_json::from_value(v.get("files").cloned().unwrap_or_default())
                .map_err(|e| e.to_string())?;
        let bundle = PolicyBundle::from_sources(&files).map_err(|e| e.to_string())?;
        tracing::info!(policies = bundle.policy_count, %digest, "gate policy updated");
        self.current.store(Some(Arc::new(bundle)));
        if let Ok(mut d) = self.digest.lock() {
            *d = digest;
        }
        Ok(true)
    }
}
