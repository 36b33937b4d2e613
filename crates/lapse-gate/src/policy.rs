//! The broker's current Cedar policies, pulled by a gate and swapped in as they
//! change, so a policy change reaches every gate without a restart.

use arc_swap::ArcSwapOption;
use lapse_policy::PolicyBundle;
use std::sync::Arc;
use std::time::Duration;

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
