//! The gate's Prometheus metrics (`GET /metrics`, OpenMetrics text): decisions by
//! outcome and code, decision latency, and whether the gate can decide at all
//! (keys, policy, the revocation feed), which is read when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` (401/403) or `unavailable` (503: the gate cannot decide).
    pub outcome: &'static str,
    /// The OAuth error code of a refusal (`invalid_token`, `insufficient_scope`,
    /// …), `no_credentials` for a request without any, `none` when allowed.
    pub code: &'static str,
}

pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    latency: Histogram,
    /// 1 while the gate can decide (`/readyz` answers 200), else 0.
    pub ready: Gauge<i64, AtomicI64>,
    /// 1 while the revocation feed is within its staleness bound, else 0.
    pub feed_fresh: Gauge<i64, AtomicI64>,
    /// When the feed was last heard from (unix seconds; 0: never).
    pub feed_heard: Gauge<f64, AtomicU64>,
    /// The newest feed sequence number applied.
    pub feed_seq: Gauge<i64, AtomicI64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lapse_gate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        // A decision is tens of microseconds; a stale feed with introspection is a
        // broker round trip.
        let latency = Histogram::new([
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0,
        ]);
        let ready = Gauge::<i64, AtomicI64>::default();
        let feed_fresh = Gauge::<i64, AtomicI64>::default();
        let feed_heard = Gauge::<f64, AtomicU64>::default();
        let feed_seq = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "decisions",
            "Forward-auth decisions by outcome and code",
            decisions.clone(),
        );
        registry.register(
            "decision_duration_seconds",
            "Time from a check request to its answer",
            latency.clone(),
        );
        registry.register(
            "ready",
            "Whether the gate can decide (keys, policy, fresh feed)",
            ready.clone(),
        );
        registry.register(
            "feed_fresh",
            "Whether the revocation feed is within its staleness bound",
            feed_fresh.clone(),
        );
        registry.register(
            "feed_last_heard_timestamp_seconds",
            "When the revocation feed was last heard from (0: never)",
            feed_heard.clone(),
        );
        registry.register(
            "feed_seq",
            "The newest revocation feed entry applied",
            feed_seq.clone(),
        );
        Self {
            registry,
            decisions,
            latency,
            ready,
            feed_fresh,
            feed_heard,
            feed_seq,
        }
    }

    /// Counts one decision and how long it took.
    pub fn decided(&self, labels: DecisionLabels, took: Duration) {
        self.decisions.get_or_create(&labels).inc();
        self.latency.observe(took.as_secs_f64());
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
