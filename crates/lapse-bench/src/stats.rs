//! Latency histograms and one-line reports.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Latencies in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(ns);
}

/// A value in nanoseconds, in the unit that reads best.
pub fn fmt_ns(ns: u64) -> String {
    if ns < 10_000 {
        format!("{:.2} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}

pub struct Summary {
    pub count: u64,
    pub median_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

pub fn summary(h: &Histogram<u64>) -> Summary {
    Summary {
        count: h.len(),
        median_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
        p999_ns: h.value_at_quantile(0.999),
        max_ns: h.max(),
    }
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "n={} median={} p99={} p99.9={} max={}",
            self.count,
            fmt_ns(self.median_ns),
            fmt_ns(self.p99_ns),
            fmt_ns(self.p999_ns),
            fmt_ns(self.max_ns)
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "median_ns": self.median_ns,
            "p99_ns": self.p99_ns,
            "p999_ns": self.p999_ns,
            "max_ns": self.max_ns,
        })
    }
}

/// Median of a few runs' values (throughputs, say).
pub fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(0.0),
        _ => {
            let a = v.get(n / 2 - 1).copied().unwrap_or(0.0);
            let b = v.get(n / 2).copied().unwrap_or(0.0);
            (a + b) / 2.0
        }
    }
}
