//! Injected time. Production uses [`SystemClock`]; tests use [`FakeClock`] so that
//! expiry, renewal caps and sweeps are deterministic.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Millisecond precision is what the audit log
/// and lifecycle need; JWT claims use [`Timestamp::unix_seconds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn from_unix_seconds(s: i64) -> Self {
        Self(s.saturating_mul(1000))
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Whole seconds, rounded down, as used by JWT `iat`/`exp`/`nbf`.
    pub const fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn plus_secs(self, secs: u64) -> Self {
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(secs.saturating_mul(1000)))
    }

    /// Whole seconds from `self` until `later`, zero when `later` is not after `self`.
    pub fn secs_until(self, later: Timestamp) -> u64 {
        u64::try_from(later.0.saturating_sub(self.0).max(0) / 1000).unwrap_or(0)
    }

    /// RFC 3339 in UTC with second precision (`2026-11-24T10:00:00Z`): the form Cedar's
    /// `datetime()` extension and humans both read.
    pub fn rfc3339(self) -> String {
        match time::OffsetDateTime::from_unix_timestamp(self.unix_seconds()) {
            Ok(t) => format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            Err(_) => "1970-01-01T00:00:00Z".to_owned(),
        }
    }

    /// Parses RFC 3339 (any offset), as written in policy test files.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        let ms = t.unix_timestamp_nanos() / 1_000_000;
        i64::try_from(ms).ok().map(Self)
    }
}

/// The only way decision code learns the time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// A clock that moves only when told to. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct FakeClock(Arc<AtomicI64>);

impl FakeClock {
    pub fn at(t: Timestamp) -> Self {
        Self(Arc::new(AtomicI64::new(t.0)))
    }

    pub fn advance_secs(&self, secs: u64) {
        let ms = i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_at_second_precision() {
        let t = Timestamp::from_unix_seconds(1_795_000_000);
        let s = t.rfc3339();
        assert_eq!(s, "2026-11-18T11:06:40Z");
        assert_eq!(Timestamp::parse_rfc3339(&s), Some(t));
    }

    #[test]
    fn secs_until_never_negative() {
        let a = Timestamp::from_unix_seconds(100);
        assert_eq!(a.secs_until(Timestamp::from_unix_seconds(90)), 0);
        assert_eq!(a.secs_until(Timestamp::from_unix_seconds(160)), 60);
    }

    #[test]
    fn fake_clock_moves_only_when_told() {
        let c = FakeClock::at(Timestamp::from_unix_seconds(10));
        let shared = c.clone();
        assert_eq!(c.now(), Timestamp::from_unix_seconds(10));
        shared.advance_secs(5);
        assert_eq!(c.now(), Timestamp::from_unix_seconds(15));
    }
}
