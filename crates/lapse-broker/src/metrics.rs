//! Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicI64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// A failed authentication: what was presented and why it was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    pub credential: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnly {
    pub route: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub latency: Family<RouteOnly, Histogram>,
    pub decisions: Family<OutcomeLabels, Counter>,
    pub grants_ended: Family<OutcomeLabels, Counter>,
    pub active_grants: Gauge<i64, AtomicI64>,
    pub policy_reload_failures: Counter,
    pub webhook_events: Family<OutcomeLabels, Counter>,
    /// Every failed authentication, recorded or suppressed (see `auth_failures`).
    pub auth_failures: Family<AuthFailureLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lapse");
        let requests = Family::<RouteLabels, Counter>::default();
        let latency = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ])
        });
        let decisions = Family::<OutcomeLabels, Counter>::default();
        let grants_ended = Family::<OutcomeLabels, Counter>::default();
        let active_grants = Gauge::<i64, AtomicI64>::default();
        let policy_reload_failures = Counter::default();
        let webhook_events = Family::<OutcomeLabels, Counter>::default();
        let auth_failures = Family::<AuthFailureLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Failed authentications by credential (identity_token, client_certificate, operator_token, console_password) and reason",
            auth_failures.clone(),
        );
        registry.register(
            "webhook_events",
            "Webhook events: delivered, retried, failed, dropped",
            webhook_events.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        registry.register(
            "decisions",
            "Policy decisions by outcome",
            decisions.clone(),
        );
        registry.register("grants_ended", "Grants ended, by how", grants_ended.clone());
        registry.register(
            "active_grants",
            "Grants currently active",
            active_grants.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Policy reloads refused (the last good set stays)",
            policy_reload_failures.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            decisions,
            grants_ended,
            active_grants,
            policy_reload_failures,
            webhook_events,
            auth_failures,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
