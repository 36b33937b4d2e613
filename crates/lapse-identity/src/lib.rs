//! Workload authentication.
//!
//! A workload proves what it is with an identity token from a configured issuer.
//! [`IdentityVerifier::verify`] picks the issuer by the token's `iss`, verifies the
//! signature with that issuer's JWKS (refetched once, rate-limited, when the `kid`
//! is unknown), checks `aud`, `exp`, `nbf` and `iat` with the issuer's leeway, and
//! names the workload with the issuer's template over the claims.
//!
//! A refusal says why in a short stable word ([`IdentityError::reason`]) and
//! [`claimed_origin`] reads the issuer and `kid` a token claims, so the broker can
//! record failed authentications without ever recording the token.

mod jwks;
mod template;

pub use jwks::{JwksSource, KeySet};
pub use template::WorkloadTemplate;

use arc_swap::ArcSwap;
use lapse_core::WorkloadIdentity;
use lapse_token::TokenError;
use lapse_token::jws::{self, Unverified};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Certificates trusted beside the system's roots by every client [`http_client`]
/// builds: a private CA, set once at start (`lapse --ca-file`).
static EXTRA_ROOTS: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();

/// Trusts the CA certificates in the PEM file at `path`, beside the system's
/// roots, for every outbound HTTPS call this process makes from now on (the
/// broker's, a gate's, the CLI's). Once per process; returns how many it read.
pub fn trust_ca_file(path: &std::path::Path) -> Result<usize, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("`{}`: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no certificate", path.display()));
    }
    let n = certs.len();
    EXTRA_ROOTS
        .set(certs)
        .map_err(|_| "a CA file was already set for this process".to_owned())?;
    Ok(n)
}

/// An HTTP client for outbound calls (JWKS, the broker's API), with rustls on the
/// `ring` provider. Every process that makes outbound TLS calls builds its clients
/// through here, so [`trust_ca_file`] reaches all of them.
pub fn http_client() -> reqwest::Client {
    // Installing twice is harmless: the second call reports the first one won.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(roots) = EXTRA_ROOTS.get() {
        b = b.tls_certs_merge(roots.iter().cloned());
    }
    b.build().unwrap_or_else(|e| {
        // Only a broken TLS setup gets here; a default client would silently drop
        // the private CA, so say so loudly.
        tracing::error!(error = %e, "cannot build the HTTPS client with the configured CA; using the system roots only");
        reqwest::Client::new()
    })
}

/// One trusted issuer of identity tokens.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Exact `iss` value.
    pub issuer: String,
    pub jwks: JwksSource,
    /// The audience identity tokens must carry for Lapse.
    pub audience: String,
    pub workload: WorkloadTemplate,
    /// Tolerance for `exp`/`nbf`/`iat`, in seconds.
    pub leeway_secs: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity token is invalid: {0}")]
    Token(#[from] TokenError),
    #[error("identity token issuer `{0}` is not configured")]
    UnknownIssuer(String),
    #[error("identity token has no `iss`")]
    NoIssuer,
    #[error("identity token audience does not include `{0}`")]
    WrongAudience(String),
    #[error("identity token has no `sub`")]
    NoSubject,
    #[error("cannot name the workload: {0}")]
    Template(String),
    #[error("keys of issuer `{issuer}` are unavailable: {reason}")]
    KeysUnavailable { issuer: String, reason: String },
    /// `iat` later than now plus the leeway: a clock far off, or a token minted
    /// ahead to be used later (which `exp` alone would not bound).
    #[error("identity token was issued {ahead_secs} s in the future (`iat`)")]
    IssuedInFuture { ahead_secs: i64 },
    #[error("identity token `iat` is not a number")]
    BadIssuedAt,
}

impl IdentityError {
    /// Whether the failure is ours (keys unreachable) rather than the token's.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::KeysUnavailable { .. })
    }

    /// Why, in one stable word for logs, audit entries and metric labels: never
    /// anything from the token itself.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Token(t) => match t {
                TokenError::Malformed(_) => "malformed",
                TokenError::UnsupportedAlgorithm(_) | TokenError::AlgorithmMismatch { .. } => {
                    "bad_algorithm"
                }
                TokenError::BadSignature => "bad_signature",
                TokenError::UnknownKey(_) | TokenError::AmbiguousKey => "unknown_kid",
                TokenError::Expired => "expired",
                TokenError::NotYetValid => "not_yet_valid",
                TokenError::MissingClaim(_) => "missing_claim",
                _ => "invalid",
            },
            Self::UnknownIssuer(_) => "unknown_issuer",
            Self::NoIssuer => "no_issuer",
            Self::WrongAudience(_) => "wrong_audience",
            Self::NoSubject => "no_subject",
            Self::Template(_) => "workload_template",
            Self::KeysUnavailable { .. } => "keys_unavailable",
            Self::IssuedInFuture { .. } => "issued_in_future",
            Self::BadIssuedAt => "bad_iat",
        }
    }
}

/// The issuer and key id a token claims, read without verifying anything: for
/// naming a refused token in logs and audit. Each is clipped and stripped of
/// control characters, since whoever sent the token chose them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimedOrigin {
    pub issuer: Option<String>,
    pub kid: Option<String>,
}

/// [`ClaimedOrigin`] of `token`; both `None` when it is not a JWS at all.
pub fn claimed_origin(token: &str) -> ClaimedOrigin {
    fn tidy(s: &str, max: usize) -> String {
        s.chars().filter(|c| !c.is_control()).take(max).collect()
    }
    let Ok(unverified) = Unverified::parse(token) else {
        return ClaimedOrigin::default();
    };
    let issuer = unverified
        .untrusted_payload()
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .and_then(|c| c.get("iss").and_then(Value::as_str).map(|s| tidy(s, 128)));
    ClaimedOrigin {
        issuer,
        kid: unverified.header.kid.as_deref().map(|k| tidy(k, 64)),
    }
}

struct Issuer {
    config: IssuerConfig,
    keys: ArcSwap<KeySet>,
    last_fetch: Mutex<Option<Instant>>,
    refresh: tokio::sync::Mutex<()>,
}

/// Verified identities are cached by token hash until the token's `exp`, so a
/// workload that presents the same identity token many times pays for its
/// signature once. The cache is dropped whenever an issuer's keys change.
struct VerifiedCache {
    entries: Mutex<HashMap<[u8; 32], (WorkloadIdentity, i64)>>,
    capacity: usize,
}

pub struct IdentityVerifier {
    issuers: HashMap<String, Issuer>,
    http: reqwest::Client,
    /// Refetch a JWKS on an unknown `kid` at most this often.
    min_refresh: Duration,
    cache: VerifiedCache,
}

impl IdentityVerifier {
    /// Builds the verifier and loads every issuer's keys. A file JWKS that cannot be
    /// read stops the start; a URL that cannot be reached is retried on first use.
    pub async fn new(
        configs: Vec<IssuerConfig>,
        http: reqwest::Client,
    ) -> Result<Self, IdentityError> {
        let mut issuers = HashMap::new();
        for config in configs {
            let keys = match config.jwks.fetch(&http).await {
                Ok(k) => k,
                Err(reason) if config.jwks.is_file() => {
                    return Err(IdentityError::KeysUnavailable {
                        issuer: config.issuer.clone(),
                        reason,
                    });
                }
                Err(reason) => {
                    tracing::warn!(issuer = %config.issuer, %reason, "issuer keys unavailable at start; will retry on first use");
                    KeySet::default()
                }
            };
            issuers.insert(
                config.issuer.clone(),
                Issuer {
                    config,
                    keys: ArcSwap::from_pointee(keys),
                    last_fetch: Mutex::new(Some(Instant::now())),
                    refresh: tokio::sync::Mutex::new(()),
                },
            );
        }
        Ok(Self {
            issuers,
            http,
            min_refresh: Duration::from_secs(10),
            cache: VerifiedCache {
                entries: Mutex::new(HashMap::new()),
                capacity: 100_000,
            },
        })
    }

    /// How often an unknown `kid` may trigger a refetch (default 10 s).
    pub fn with_min_refresh(mut self, d: Duration) -> Self {
        self.min_refresh = d;
        self
    }

    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.keys().map(String::as_str)
    }

    /// Verifies `token` at `now_secs` and names its workload.
    pub async fn verify(
        &self,
        token: &str,
        now_secs: i64,
    ) -> Result<WorkloadIdentity, IdentityError> {
        let digest: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(token.as_bytes()).into()
        };
        if let Some(hit) = self.cached(&digest, now_secs) {
            return Ok(hit);
        }
        let unverified = Unverified::parse(token)?;
        let peek: Value = unverified
            .untrusted_payload()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(TokenError::Malformed("claims are not a JSON object"))?;
        let iss = peek
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(IdentityError::NoIssuer)?;
        let issuer = self
            .issuers
            .get(iss)
            .ok_or_else(|| IdentityError::UnknownIssuer(iss.chars().take(128).collect()))?;

        let key = match issuer
            .keys
            .load()
            .select(unverified.header.kid.as_deref())?
        {
            Some(k) => k,
            None => {
                self.refresh(issuer).await?;
                issuer
                    .keys
                    .load()
                    .select(unverified.header.kid.as_deref())?
                    .ok_or_else(|| {
                        TokenError::UnknownKey(
                            unverified
                                .header
                                .kid
                                .clone()
                                .unwrap_or_default()
                                .chars()
                                .take(64)
                                .collect(),
                        )
                    })?
            }
        };
        let payload = unverified.verify(&key)?;
        let claims: serde_json::Map<String, Value> = jws::claims(&payload)?;
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.config.issuer.as_str()) {
            return Err(IdentityError::NoIssuer);
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == issuer.config.audience,
            Some(Value::Array(a)) => a
                .iter()
                .any(|v| v.as_str() == Some(issuer.config.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(IdentityError::WrongAudience(issuer.config.audience.clone()));
        }
        let exp = claims.get("exp").and_then(Value::as_i64);
        let nbf = claims.get("nbf").and_then(Value::as_i64);
        jws::check_times(now_secs, exp, nbf, issuer.config.leeway_secs)?;
        // `exp` bounds how long a token lives only if it was not minted ahead of
        // time; an `iat` past the leeway means it was (or the issuer's clock is
        // wrong), so it is refused. Absent `iat` is allowed: JWT-SVIDs need not
        // carry one.
        match claims.get("iat") {
            None => {}
            Some(v) => {
                let iat = v
                    .as_i64()
                    .or_else(|| v.as_f64().map(|f| f as i64))
                    .ok_or(IdentityError::BadIssuedAt)?;
                let ahead = iat.saturating_sub(now_secs);
                if ahead > issuer.config.leeway_secs {
                    return Err(IdentityError::IssuedInFuture { ahead_secs: ahead });
                }
            }
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or(IdentityError::NoSubject)?
            .to_owned();
        let flat = flatten(&claims);
        let id = issuer
            .config
            .workload
            .render(&flat)
            .map_err(IdentityError::Template)?;
        let identity = WorkloadIdentity {
            id,
            issuer: issuer.config.issuer.clone(),
            subject,
            claims: flat,
        };
        self.remember(digest, &identity, exp.unwrap_or(now_secs));
        Ok(identity)
    }

    async fn refresh(&self, issuer: &Issuer) -> Result<(), IdentityError> {
        let _one_at_a_time = issuer.refresh.lock().await;
        {
            let last = issuer.last_fetch.lock().map(|g| *g).unwrap_or(None);
            if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
                return Ok(());
            }
        }
        let result = issuer.config.jwks.fetch(&self.http).await;
        if let Ok(mut g) = issuer.last_fetch.lock() {
            *g = Some(Instant::now());
        }
        match result {
            Ok(keys) => {
                tracing::info!(issuer = %issuer.config.issuer, keys = keys.len(), "issuer keys refreshed");
                issuer.keys.store(Arc::new(keys));
                if let Ok(mut c) = self.cache.entries.lock() {
                    c.clear();
                }
                Ok(())
            }
            Err(reason) => Err(IdentityError::KeysUnavailable {
                issuer: issuer.config.issuer.clone(),
                reason,
            }),
        }
    }

    fn cached(&self, digest: &[u8; 32], now_secs: i64) -> Option<WorkloadIdentity> {
        let c = self.cache.entries.lock().ok()?;
        let (id, exp) = c.get(digest)?;
        let leeway = self.issuers.get(&id.issuer)?.config.leeway_secs;
        (now_secs < exp.saturating_add(leeway)).then(|| id.clone())
    }

    fn remember(&self, digest: [u8; 32], identity: &WorkloadIdentity, exp: i64) {
        if let Ok(mut c) = self.cache.entries.lock() {
            if c.len() >= self.cache.capacity {
                c.clear();
            }
            c.insert(digest, (identity.clone(), exp));
        }
    }
}

/// Claims as strings: strings as they are, everything else as compact JSON. The
/// members of object claims are also given by dotted path (Kubernetes puts the
/// namespace at `kubernetes.io.namespace`), so policies and workload templates can
/// name them; nesting deeper than [`MAX_CLAIM_DEPTH`] is left as JSON.
fn flatten(claims: &serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &Value, depth: usize, out: &mut BTreeMap<String, String>) {
        let s = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.insert(prefix.to_owned(), s);
        if let Value::Object(m) = v
            && depth < MAX_CLAIM_DEPTH
        {
            for (k, inner) in m {
                walk(&format!("{prefix}.{k}"), inner, depth + 1, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in claims {
        walk(k, v, 1, &mut out);
    }
    out
}

/// How deep object claims are flattened into dotted names.
pub const MAX_CLAIM_DEPTH: usize = 4;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod flatten_tests {
    use super::*;

    #[test]
    fn nested_claims_get_dotted_names() {
        let claims = serde_json::json!({
            "sub": "system:serviceaccount:payments:migrator",
            "kubernetes.io": { "namespace": "payments", "serviceaccount": { "name": "migrator", "uid": "u-1" } },
            "n": 3,
            "deep": { "a": { "b": { "c": { "d": "too deep" } } } }
        });
        let flat = flatten(claims.as_object().unwrap());
        assert_eq!(flat["kubernetes.io.namespace"], "payments");
        assert_eq!(flat["kubernetes.io.serviceaccount.name"], "migrator");
        assert_eq!(flat["n"], "3");
        assert!(
            flat["kubernetes.io"].starts_with('{'),
            "the whole object stays too"
        );
        assert_eq!(flat["deep.a.b.c"], "{\"d\":\"too deep\"}");
        assert!(!flat.contains_key("deep.a.b.c.d"));
    }
}
