//! Failed authentications: a refused identity token or client certificate at the
//! token endpoint, an unknown operator API token on the API, a wrong console
//! password. Each one is counted (`lapse_auth_failures_total{credential,reason}`);
//! the first [`PER_SOURCE_PER_MINUTE`] per source address in a minute are also
//! logged (`warn`) and appended to the audit chain as `auth.failed`, so a flood of
//! guesses costs the log a bounded number of lines and the store a bounded number
//! of writes. What a minute suppressed is counted in the source's next recorded
//! entry (`suppressed`).
//!
//! Never a secret: the record names the kind of credential, why it was refused (one
//! stable word), the source, and for identity tokens the issuer and `kid` the token
//! claims (clipped; they are the sender's words); for the console, the operator
//! name only when it is a configured one (people type passwords into name fields).

use crate::audit::event;
use crate::broker::Lapse;
use serde_json::json;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Recorded (logged and audited) failures per source address and minute.
pub const PER_SOURCE_PER_MINUTE: u32 = 10;
/// Recorded failures per minute from all sources together: many addresses at once
/// still cannot make the log grow faster than this.
pub const ALL_SOURCES_PER_MINUTE: u32 = 1_000;
const WINDOW_MS: i64 = 60_000;
/// Sources tracked at once; beyond it (after dropping finished windows) the rest
/// share one window.
const MAX_SOURCES: usize = 10_000;

/// What was presented and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Credential {
    IdentityToken,
    ClientCertificate,
    OperatorToken,
    ConsolePassword,
}

impl Credential {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IdentityToken => "identity_token",
            Self::ClientCertificate => "client_certificate",
            Self::OperatorToken => "operator_token",
            Self::ConsolePassword => "console_password",
        }
    }
}

/// Marks an answer that refused an operator credential (`BrokerError::Unauthorized`),
/// so the router records it with the request's source.
#[derive(Debug, Clone, Copy)]
pub struct OperatorRefused;

/// One refusal, as it is recorded.
#[derive(Debug, Clone)]
pub struct AuthFailure {
    pub credential: Credential,
    /// One stable word (`bad_signature`, `unknown_token`, ...).
    pub reason: &'static str,
    /// The issuer the identity token claims.
    pub issuer: Option<String>,
    /// The key id the identity token names.
    pub kid: Option<String>,
    /// Console: the operator signing in, when the name is a configured one.
    pub operator: Option<String>,
}

impl AuthFailure {
    pub fn new(credential: Credential, reason: &'static str) -> Self {
        Self {
            credential,
            reason,
            issuer: None,
            kid: None,
            operator: None,
        }
    }

    /// A refused identity token: its claimed issuer and `kid`, never the token.
    pub fn identity(token: &str, e: &lapse_identity::IdentityError) -> Self {
        let origin = lapse_identity::claimed_origin(token);
        Self {
            issuer: origin.issuer,
            kid: origin.kid,
            ..Self::new(Credential::IdentityToken, e.reason())
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start_ms: i64,
    recorded: u32,
    /// Refusals not recorded since the last recorded one.
    suppressed: u64,
}

impl Window {
    fn at(now_ms: i64) -> Self {
        Self {
            start_ms: now_ms,
            recorded: 0,
            suppressed: 0,
        }
    }

    fn over(&self, now_ms: i64) -> bool {
        now_ms.saturating_sub(self.start_ms) >= WINDOW_MS
    }
}

/// Decides which refusals are recorded: a fixed one-minute window per source
/// (IPv6 by /64, as one host holds a whole /64), and one for all sources. Pure
/// apart from its lock; time comes from the caller.
#[derive(Debug)]
pub struct Throttle {
    per_source: u32,
    all_sources: u32,
    state: Mutex<ThrottleState>,
}

#[derive(Debug)]
struct ThrottleState {
    sources: HashMap<IpAddr, Window>,
    all: Window,
}

/// The window all sources share once [`MAX_SOURCES`] are tracked.
const OVERFLOW: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(PER_SOURCE_PER_MINUTE, ALL_SOURCES_PER_MINUTE)
    }
}

impl Throttle {
    pub fn new(per_source: u32, all_sources: u32) -> Self {
        Self {
            per_source,
            all_sources,
            state: Mutex::new(ThrottleState {
                sources: HashMap::new(),
                all: Window::at(i64::MIN / 2),
            }),
        }
    }

    /// Whether a refusal from `source` at `now_ms` is recorded; if so, how many of
    /// that source's refusals were suppressed since its last recorded one.
    pub fn admit(&self, source: IpAddr, now_ms: i64) -> Option<u64> {
        let Ok(mut st) = self.state.lock() else {
            // A panic elsewhere poisoned the lock: count only, record nothing.
            return None;
        };
        let st = &mut *st;
        if st.all.over(now_ms) {
            st.all = Window::at(now_ms);
        }
        let mut key = source_key(source);
        if !st.sources.contains_key(&key) && st.sources.len() >= MAX_SOURCES {
            st.sources
                .retain(|_, w| !w.over(now_ms) || w.suppressed > 0);
            if st.sources.len() >= MAX_SOURCES {
                key = OVERFLOW;
            }
        }
        let w = st.sources.entry(key).or_insert_with(|| Window::at(now_ms));
        if w.over(now_ms) {
            // A new minute; what the last one suppressed is still owed.
            *w = Window {
                suppressed: w.suppressed,
                ..Window::at(now_ms)
            };
        }
        if w.recorded >= self.per_source || st.all.recorded >= self.all_sources {
            w.suppressed = w.suppressed.saturating_add(1);
            return None;
        }
        w.recorded += 1;
        st.all.recorded += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

impl Lapse {
    /// Counts a failed authentication and, unless its source is over its share,
    /// logs it and appends an `auth.failed` entry. The refusal does not wait on
    /// the store's health: a failed append is logged and the refusal stands.
    pub async fn auth_failed(&self, source: Option<IpAddr>, f: AuthFailure) {
        self.metrics
            .auth_failures
            .get_or_create(&crate::metrics::AuthFailureLabels {
                credential: f.credential.as_str().to_owned(),
                reason: f.reason.to_owned(),
            })
            .inc();
        let now = self.now();
        let source_ip = source.unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
        let Some(suppressed) = self.limits.auth_failures.admit(source_ip, now.millis()) else {
            return;
        };
        let source = source.map(|s| s.to_string());
        tracing::warn!(
            credential = f.credential.as_str(),
            reason = f.reason,
            source = source.as_deref().unwrap_or("unknown"),
            issuer = ?f.issuer,
            kid = ?f.kid,
            operator = ?f.operator,
            suppressed,
            "authentication failed"
        );
        let data = json!({
            "credential": f.credential.as_str(),
            "reason": f.reason,
            "source": source,
            "issuer": f.issuer,
            "kid": f.kid,
            "operator": f.operator,
            "suppressed": suppressed,
        });
        let batch = lapse_store::WriteBatch {
            events: vec![event(now, "auth.failed", None, "unauthenticated", data)],
            ..Default::default()
        };
        if let Err(e) = self.commit(batch).await {
            tracing::error!(error = %e, "cannot record a failed authentication in the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn a_source_is_recorded_n_times_a_minute_and_the_rest_are_counted_next() {
        let t = Throttle::new(3, 100);
        let a = ip("192.0.2.1");
        let got: Vec<Option<u64>> = (0..7).map(|i| t.admit(a, 1_000 + i)).collect();
        assert_eq!(got, [Some(0), Some(0), Some(0), None, None, None, None]);
        // Another source has its own share.
        assert_eq!(t.admit(ip("192.0.2.2"), 2_000), Some(0));
        // The next minute: the first entry carries the four suppressed.
        assert_eq!(t.admit(a, 61_000), Some(4));
        assert_eq!(t.admit(a, 61_001), Some(0));
    }

    #[test]
    fn an_ipv6_host_is_one_source_per_64_and_all_sources_share_a_cap() {
        let t = Throttle::new(2, 3);
        assert_eq!(t.admit(ip("2001:db8::1"), 0), Some(0));
        assert_eq!(t.admit(ip("2001:db8::ffff:2"), 0), Some(0));
        assert_eq!(t.admit(ip("2001:db8::3"), 0), None, "same /64");
        assert_eq!(t.admit(ip("2001:db8:0:1::1"), 0), Some(0));
        assert_eq!(t.admit(ip("198.51.100.7"), 0), None, "all sources: 3");
        assert_eq!(t.admit(ip("198.51.100.7"), 60_000), Some(1));
    }
}
