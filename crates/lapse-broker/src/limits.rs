//! Abuse limits: token buckets per source address and per workload on the token
//! endpoint and native access requests, per source on console sign-in, a cap on a
//! workload's pending requests, and header limits. A request over a limit gets 429
//! with `Retry-After` before it costs a signature check or a store write.

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `[limits]` in `lapse.toml`. Rates are `"N/s"`, `"N/m"` or `"N/h"`: a bucket of N
/// requests that refills at that rate (so N is also the burst). `"off"` disables one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Token endpoint and access requests, per source address (checked first, before
    /// any cryptography).
    #[serde(default = "default_per_source")]
    pub token_per_source: Rate,
    /// Token endpoint and access requests, per workload (after its identity token is
    /// verified).
    #[serde(default = "default_per_workload")]
    pub token_per_workload: Rate,
    /// Console sign-in attempts, per source address.
    #[serde(default = "default_login")]
    pub login_per_source: Rate,
    /// Console sign-in attempts, per operator name (from any address).
    #[serde(default = "default_login")]
    pub login_per_operator: Rate,
    /// Password checks (Argon2, ~19 MiB and tens of milliseconds each) running at
    /// once; more wait their turn, up to 10 s, then get 503.
    #[serde(default = "default_password_checks")]
    pub max_password_checks: usize,
    /// Requests of one workload waiting for approval at once.
    #[serde(default = "default_pending")]
    pub max_pending_per_workload: usize,
    /// Request headers: how many, and their total size in bytes.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// How long one request may take, from its head to the start of the answer
    /// (reading its body included); then 503. The revocation feed's stream is
    /// not cut: its answer starts at once.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: lapse_core::TtlDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            token_per_source: default_per_source(),
            token_per_workload: default_per_workload(),
            login_per_source: default_login(),
            login_per_operator: default_login(),
            max_password_checks: default_password_checks(),
            max_pending_per_workload: default_pending(),
            max_headers: default_max_headers(),
            max_header_bytes: default_max_header_bytes(),
            request_timeout: default_request_timeout(),
        }
    }
}

// The connecting address is the load balancer's when there is one: the default
// per-source rate is a ceiling above what one replica can serve, not a tenant limit.
fn default_per_source() -> Rate {
    Rate::per_second(10_000)
}
fn default_per_workload() -> Rate {
    Rate::per_second(200)
}
fn default_login() -> Rate {
    Rate {
        burst: 10,
        period: Duration::from_secs(60),
    }
}
fn default_request_timeout() -> lapse_core::TtlDuration {
    lapse_core::TtlDuration::from_secs(30)
}
fn default_password_checks() -> usize {
    4
}
fn default_pending() -> usize {
    20
}
fn default_max_headers() -> usize {
    64
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}

/// `burst` requests, refilled evenly over `period`; `burst == 0` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub period: Duration,
}

impl Rate {
    pub fn per_second(n: u32) -> Self {
        Self {
            burst: n,
            period: Duration::from_secs(1),
        }
    }

    pub fn off() -> Self {
        Self {
            burst: 0,
            period: Duration::from_secs(1),
        }
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "off" {
            return Ok(Self::off());
        }
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("rate `{s}`: expected N/s, N/m, N/h or off"))?;
        let burst: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("rate `{s}`: N must be a whole number above 0"))?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("rate `{s}`: unknown unit `{other}` (s, m, h)")),
        };
        Ok(Self { burst, period })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key. Buckets that have refilled are forgotten on the way, so
/// the map holds only keys seen within one period.
pub struct Limiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
    swept: Mutex<Instant>,
}

/// Most keys a limiter tracks; past it, new keys share one bucket (an attacker
/// spraying source addresses cannot grow memory without bound).
const MAX_KEYS: usize = 100_000;
const OVERFLOW: &str = "\u{0}overflow";

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        }
    }

    /// Takes one request from `key`'s bucket: `Ok`, or how long until one is there.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate.burst == 0 {
            return Ok(());
        }
        let burst = f64::from(self.rate.burst);
        let per_sec = burst / self.rate.period.as_secs_f64();
        self.sweep(now, burst, per_sec);
        // A poisoned lock only means another request panicked mid-update; the
        // buckets are still usable numbers.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            OVERFLOW
        } else {
            key
        };
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_sec).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_sec))
        }
    }

    fn sweep(&self, now: Instant, burst: f64, per_sec: f64) {
        let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(*swept) < self.rate.period.max(Duration::from_secs(1)) {
            return;
        }
        *swept = now;
        drop(swept);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        lapse_core::table::prune(&mut *buckets, |_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst
        });
    }
}

/// The limiters of one broker.
pub struct Limits {
    pub cfg: LimitsConfig,
    pub token_source: Limiter,
    pub token_workload: Limiter,
    pub login_source: Limiter,
    pub login_operator: Limiter,
    /// Permits for Argon2 password checks.
    pub password_checks: tokio::sync::Semaphore,
    /// Which failed authentications are logged and audited (all are counted).
    pub auth_failures: crate::auth_failures::Throttle,
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Self {
        Self {
            token_source: Limiter::new(cfg.token_per_source),
            token_workload: Limiter::new(cfg.token_per_workload),
            login_source: Limiter::new(cfg.login_per_source),
            login_operator: Limiter::new(cfg.login_per_operator),
            password_checks: tokio::sync::Semaphore::new(cfg.max_password_checks.max(1)),
            auth_failures: crate::auth_failures::Throttle::default(),
            cfg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_are_named() {
        assert_eq!("20/s".parse::<Rate>(), Ok(Rate::per_second(20)));
        assert_eq!(
            "10/m".parse::<Rate>().map(|r| r.period),
            Ok(Duration::from_secs(60))
        );
        assert_eq!("off".parse::<Rate>(), Ok(Rate::off()));
        for bad in ["", "0/s", "x/s", "5/d", "5"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let l = Limiter::new(Rate::per_second(5));
        let t = Instant::now();
        for _ in 0..5 {
            assert!(l.check_at("a", t).is_ok());
        }
        let wait = l.check_at("a", t).err();
        assert!(wait.is_some_and(|w| w <= Duration::from_millis(200) && !w.is_zero()));
        assert!(l.check_at("b", t).is_ok(), "keys are independent");
        assert!(l.check_at("a", t + Duration::from_millis(200)).is_ok());
        assert!(l.check_at("a", t + Duration::from_millis(200)).is_err());
        assert!(Limiter::new(Rate::off()).check_at("a", t).is_ok());
    }

    #[test]
    fn keys_past_the_cap_share_one_bucket() {
        let l = Limiter::new(Rate::per_second(1));
        let t = Instant::now();
        for i in 0..MAX_KEYS {
            assert!(l.check_at(&i.to_string(), t).is_ok());
        }
        assert!(l.check_at("new-1", t).is_ok());
        assert!(
            l.check_at("new-2", t).is_err(),
            "the overflow bucket is shared"
        );
    }
}
