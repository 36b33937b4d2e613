//! The notification webhook: a signed JSON event for each request that waits for
//! people and each decision they take.
//!
//! Delivery never blocks the decision path: events go into a bounded queue and one
//! worker posts them in order, retrying with exponential backoff. A full queue
//! drops the event (counted in `lapse_webhook_events_total{outcome="dropped"}` and
//! logged): the audit log, not the webhook, is the record.
//!
//! Signature: `Lapse-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`, so a receiver can check both origin and freshness.

use crate::metrics::{Metrics, OutcomeLabels};
use hmac::{Hmac, Mac};
use lapse_core::TtlDuration;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// `[webhook]` in `lapse.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events are posted: https, or http to a loopback address.
    pub url: String,
    /// Where the HMAC secret is: `env:NAME` or `file:/path`.
    pub secret: String,
    /// Attempts per event before it is given up (logged and counted).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Timeout of one attempt.
    #[serde(default = "default_timeout")]
    pub timeout: TtlDuration,
    /// Events waiting for delivery before new ones are dropped.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_attempts() -> u32 {
    8
}
fn default_timeout() -> TtlDuration {
    TtlDuration::from_secs(5)
}
fn default_queue() -> usize {
    10_000
}

impl WebhookConfig {
    /// Checks the config and reads the secret.
    pub fn secret_bytes(&self) -> Result<Vec<u8>, String> {
        let url = url::Url::parse(&self.url).map_err(|e| format!("webhook `url`: {e}"))?;
        let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err("webhook `url` must be https (http only to a loopback address)".into());
        }
        if !(1..=100).contains(&self.max_attempts) || self.queue == 0 {
            return Err("webhook `max_attempts` must be 1..=100 and `queue` at least 1".into());
        }
        let secret = if let Some(var) = self.secret.strip_prefix("env:") {
            std::env::var(var).map_err(|_| format!("webhook secret: `{var}` is not set"))?
        } else if let Some(path) = self.secret.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map_err(|e| format!("webhook secret file `{path}`: {e}"))?
                .trim()
                .to_owned()
        } else {
            return Err(
                "webhook `secret` must say where it is (`env:NAME` or `file:/path`), not contain it"
                    .into(),
            );
        };
        if secret.len() < 16 {
            return Err("the webhook secret must be at least 16 bytes".into());
        }
        Ok(secret.into_bytes())
    }
}

/// `t=…,v1=…` for `body` sent at `t`.
#[expect(
    clippy::expect_used,
    reason = "HMAC accepts keys of any length; `new_from_slice` never fails for it"
)]
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    format!("t={t},v1={}", hex::encode(m.finalize().into_bytes()))
}

#[derive(Clone)]
pub struct Notifier {
    tx: tokio::sync::mpsc::Sender<Value>,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// Starts the delivery worker.
    pub fn start(cfg: &WebhookConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let secret = cfg.secret_bytes()?;
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.queue);
        tokio::spawn(deliver(
            rx,
            Delivery {
                http: lapse_identity::http_client(),
                url: cfg.url.clone(),
                secret,
                max_attempts: cfg.max_attempts,
                timeout: Duration::from_secs(cfg.timeout.secs().max(1)),
            },
            metrics.clone(),
        ));
        Ok(Self { tx, metrics })
    }

    /// Queues an event; never waits.
    pub fn send(&self, kind: &str, at_millis: i64, data: Value) {
        let id = uuid::Uuid::now_v7().to_string();
        let event = json!({ "id": id, "type": kind, "at": at_millis, "data": data });
        if self.tx.try_send(event).is_err() {
            tracing::warn!(
                kind,
                "webhook queue full or closed; event dropped (the audit log has it)"
            );
            count(&self.metrics, "dropped");
        }
    }
}

fn count(m: &Metrics, outcome: &str) {
    m.webhook_events
        .get_or_create(&OutcomeLabels {
            outcome: outcome.to_owned(),
        })
        .inc();
}

struct Delivery {
    http: reqwest::Client,
    url: String,
    secret: Vec<u8>,
    max_attempts: u32,
    timeout: Duration,
}

async fn deliver(mut rx: tokio::sync::mpsc::Receiver<Value>, d: Delivery, metrics: Arc<Metrics>) {
    let Delivery {
        http,
        url,
        secret,
        max_attempts,
        timeout,
    } = d;
    while let Some(event) = rx.recv().await {
        let body = event.to_string();
        let id = event
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut backoff = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
            let sent = http
                .post(&url)
                .header("content-type", "application/json")
                .header("Lapse-Event-Id", &id)
                .header("Lapse-Signature", signature(&secret, t, body.as_bytes()))
                .body(body.clone())
                .timeout(timeout)
                .send()
                .await;
            let failure = match sent {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("HTTP {}", r.status())),
                Err(e) => Some(e.to_string()),
            };
            let Some(why) = failure else {
                count(&metrics, "delivered");
                break;
            };
            if attempt >= max_attempts {
                tracing::error!(event = %id, attempts = attempt, error = %why, "webhook event given up");
                count(&metrics, "failed");
                break;
            }
            tracing::warn!(event = %id, attempt, error = %why, "webhook delivery failed; retrying");
            count(&metrics, "retried");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_time_and_body() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac 0123456789abcdef
        assert_eq!(
            signature(b"0123456789abcdef", 1_700_000_000, b"{}"),
            format!("t=1700000000,v1={}", KNOWN)
        );
    }

    const KNOWN: &str = "e4f8e2ecae2295b2ddb2f0b5584c8275e226c0ebe9b3b819e70156bb67122e3e";
}
