//! The [`Verifier`]: what it is configured with, the request it judges and what
//! it answers. The revocation feed that keeps its view of ended grants is the
//! child module `feed`.

pub(crate) mod feed;

use crate::denial::{Denial, proof_denial, token_denial};
use crate::nonce;
use arc_swap::ArcSwap;
use lapse_token::access::{self, AccessClaims};
use lapse_token::dpop::{self, DpopRequirements};
use lapse_token::{PublicKey, ReplayCache, TokenError};
use sha2::Digest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What to do when the feed has been silent longer than the staleness bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStale {
    /// Refuse every request until the feed is heard again (the default).
    Deny,
    /// Ask the broker's RFC 7662 introspection endpoint for each request.
    Introspect,
}

#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The broker's base URL (its JWKS, feed and introspection live under it).
    pub broker: String,
    /// The `iss` Lapse tokens carry: the broker's public URL.
    pub issuer: String,
    /// The audience this gate protects.
    pub audience: String,
    /// The gate's operator API token (role `gate`, and `introspect` for the fallback).
    pub token: String,
    /// How long the feed may be silent before the gate stops trusting its view.
    pub staleness: Duration,
    pub on_stale: OnStale,
    /// How old a DPoP proof may be.
    pub dpop_max_age_secs: i64,
}

/// One request as the gate saw it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The original request's method.
    pub method: &'a str,
    /// The original request's URL without query, as the client addressed it (DPoP `htu`).
    pub url: &'a str,
    /// The `Authorization` header.
    pub authorization: Option<&'a str>,
    /// Every `DPoP` header.
    pub dpop: &'a [&'a str],
    /// The action the request needs.
    pub action: &'a str,
    /// The `x5t#S256` of the client certificate the request came with (verified by
    /// whoever terminated its TLS), for certificate-bound tokens (RFC 8705).
    pub client_cert: Option<&'a str>,
    /// Unix seconds.
    pub now_secs: i64,
}

#[derive(Debug, Clone)]
pub struct Allowed {
    /// Shared with the verifier's cache of verified tokens: a request copies none
    /// of it.
    pub claims: Arc<AccessClaims>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("cannot fetch the broker's keys from `{url}`: {detail}")]
    Keys { url: String, detail: String },
}

/// Ended grants the gate knows of, with the time after which their tokens are dead
/// anyway and the entry can go.
#[derive(Default)]
struct Ended {
    by_grant: HashMap<String, (String, i64)>,
}

pub struct Verifier {
    cfg: VerifierConfig,
    http: reqwest::Client,
    keys: ArcSwap<HashMap<String, PublicKey>>,
    last_key_fetch: Mutex<Option<Instant>>,
    replay: ReplayCache,
    proof_keys: dpop::KeyCache,
    ended: RwLock<Ended>,
    /// Sequence number of the newest feed entry applied.
    seq: AtomicU64,
    /// When the feed was last heard from (unix ms); 0: never.
    heard_ms: AtomicI64,
    /// Claims of tokens whose signature verified, by the token's SHA-256.
    verified: RwLock<HashMap<[u8; 32], Arc<AccessClaims>>>,
    /// Set: every proof must carry a nonce this verifier issued
    /// ([`Verifier::requiring_dpop_nonces`]).
    nonces: Option<nonce::NonceKey>,
}

/// Verified tokens kept at most; beyond it the expired go, then all.
const VERIFIED_CAP: usize = 100_000;

/// Unknown `kid`s trigger at most one key fetch per this interval.
const KEY_REFETCH: Duration = Duration::from_secs(5);

impl Verifier {
    /// A verifier with the broker's current keys.
    pub async fn new(cfg: VerifierConfig) -> Result<Self, VerifierError> {
        let v = Self::offline(cfg, HashMap::new());
        v.refresh_keys().await?;
        Ok(v)
    }

    /// A verifier with the given keys and no network fetch yet (tests, benchmarks).
    pub fn offline(cfg: VerifierConfig, keys: HashMap<String, PublicKey>) -> Self {
        Self {
            cfg,
            http: lapse_identity::http_client(),
            keys: ArcSwap::from_pointee(keys),
            last_key_fetch: Mutex::new(None),
            replay: ReplayCache::new(1_000_000),
            proof_keys: dpop::KeyCache::new(),
            ended: RwLock::new(Ended::default()),
            seq: AtomicU64::new(0),
            heard_ms: AtomicI64::new(0),
            verified: RwLock::new(HashMap::new()),
            nonces: None,
        }
    }

    /// This verifier then accepts only proofs that carry a nonce it issued
    /// ([`Verifier::dpop_nonce`]): a proof made for another gate is refused here.
    pub fn requiring_dpop_nonces(mut self) -> Self {
        self.nonces = Some(nonce::NonceKey::generate());
        self
    }

    /// The nonce to send in `DPoP-Nonce` now, when nonces are required.
    pub fn dpop_nonce(&self, now_secs: i64) -> Option<String> {
        self.nonces.as_ref().map(|k| k.issue(now_secs))
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.cfg
    }

    /// Fetches the broker's JWKS and replaces the cached keys.
    pub async fn refresh_keys(&self) -> Result<(), VerifierError> {
        let url = format!(
            "{}/.well-known/jwks.json",
            self.cfg.broker.trim_end_matches('/')
        );
        let err = |detail: String| VerifierError::Keys {
            url: url.clone(),
            detail,
        };
        if let Ok(mut t) = self.last_key_fetch.lock() {
            *t = Some(Instant::now());
        }
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("HTTP {}", resp.status())));
        }
        let set: serde_json::Value = resp.json().await.map_err(|e| err(e.to_string()))?;
        let mut keys = HashMap::new();
        for k in set
            .get("keys")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
        {
            let Ok(jwk) = serde_json::from_value::<lapse_token::Jwk>(k.clone()) else {
                continue;
            };
            if let (Some(kid), Ok(pk)) = (jwk.kid.clone(), PublicKey::from_jwk(&jwk)) {
                keys.insert(kid, pk);
            }
        }
        if keys.is_empty() {
            return Err(err("no usable key".into()));
        }
        let changed = {
            let old = self.keys.load();
            old.len() != keys.len() || keys.keys().any(|k| !old.contains_key(k))
        };
        self.keys.store(Arc::new(keys));
        // A key taken out of the set must stop vouching for tokens verified with it.
        if changed && let Ok(mut m) = self.verified.write() {
            m.clear();
        }
        Ok(())
    }

    fn may_refetch(&self) -> bool {
        self.last_key_fetch
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() >= KEY_REFETCH))
            .unwrap_or(false)
    }

    /// Verifies `req`; an unknown signing key makes it fetch the broker's keys once
    /// (rate-limited) and try again, so rotations need no restart. With
    /// `on_stale = introspect`, a stale feed defers to the broker's introspection.
    pub async fn verify(&self, req: &Request<'_>) -> Result<Allowed, Denial> {
        let first = self.check(req);
        self.settle(req, first).await
    }

    /// The network fallbacks of [`Verifier::verify`] for an answer [`Verifier::check`]
    /// (or [`Verifier::check_many`]) gave `req`: a refetch of the broker's keys for an
    /// unknown one, introspection for a stale feed when so configured. Any other
    /// answer is final and returned as it is.
    pub async fn settle(
        &self,
        req: &Request<'_>,
        first: Result<Allowed, Denial>,
    ) -> Result<Allowed, Denial> {
        let mut r = first;
        // An unknown key fails before the proof is looked at, so the retry may
        // verify the same proof.
        if matches!(r, Err(Denial::UnknownKey)) && self.may_refetch() {
            if let Err(e) = self.refresh_keys().await {
                tracing::warn!(error = %e, "refetching the broker's keys failed");
            }
            r = self.check(req);
        }
        match r {
            Err(Denial::FeedStale(_)) if self.cfg.on_stale == OnStale::Introspect => {
                self.introspected(req).await
            }
            other => other,
        }
    }

    /// [`Verifier::check_held`] with the network fallbacks of [`Verifier::verify`].
    pub async fn verify_held(
        &self,
        token: &str,
        action: &str,
        now_secs: i64,
    ) -> Result<Allowed, Denial> {
        let mut r = self.check_held(token, action, now_secs);
        if matches!(r, Err(Denial::UnknownKey)) && self.may_refetch() {
            if let Err(e) = self.refresh_keys().await {
                tracing::warn!(error = %e, "refetching the broker's keys failed");
            }
            r = self.check_held(token, action, now_secs);
        }
        match r {
            Err(Denial::FeedStale(_)) if self.cfg.on_stale == OnStale::Introspect => {
                let claims = self.token_claims(token, now_secs)?;
                if self.introspect(token).await? {
                    Ok(Allowed { claims })
                } else {
                    Err(Denial::GrantEnded("inactive at the broker".into()))
                }
            }
            other => other,
        }
    }

    /// Everything but the grant's state passed; the broker says whether it holds.
    async fn introspected(&self, req: &Request<'_>) -> Result<Allowed, Denial> {
        let token = req
            .authorization
            .and_then(|h| h.split_once(' '))
            .map_or("", |(_, t)| t.trim());
        let claims = self.token_claims(token, req.now_secs)?;
        if self.introspect(token).await? {
            Ok(Allowed { claims })
        } else {
            Err(Denial::GrantEnded("inactive at the broker".into()))
        }
    }

    /// Everything but network fallbacks: the in-memory decision.
    pub fn check(&self, req: &Request<'_>) -> Result<Allowed, Denial> {
        let (token, claims, proof) = self.check_to_signature(req)?;
        self.check_from_signature(req, token, claims, proof.check_signature())
    }

    /// [`Verifier::check`] for many requests, answers in the same order, with the
    /// Ed25519 signatures of their DPoP proofs checked as one batch (about half the
    /// cost each: BENCHMARKS.md). Every answer is the one `check` would give (but
    /// for signatures a key's own holder crafted: `lapse_token::jws::verify_many`),
    /// and requests are taken in order, so of two carrying the same proof the first
    /// is accepted and the second is a replay.
    pub fn check_many(&self, reqs: &[Request<'_>]) -> Vec<Result<Allowed, Denial>> {
        // `None`: waits for its proof's signature.
        let mut early: Vec<Option<Denial>> = Vec::with_capacity(reqs.len());
        let mut waiting = Vec::new();
        let mut proofs = Vec::new();
        for req in reqs {
            match self.check_to_signature(req) {
                Ok((token, claims, proof)) => {
                    waiting.push((req, token, claims));
                    proofs.push(proof);
                    early.push(None);
                }
                Err(d) => early.push(Some(d)),
            }
        }
        let mut rest = waiting.into_iter().zip(dpop::check_signatures(proofs)).map(
            |((req, token, claims), signed)| self.check_from_signature(req, token, claims, signed),
        );
        early
            .into_iter()
            .map(|e| match e {
                Some(d) => Err(d),
                None => rest.next().unwrap_or_else(|| {
                    Err(Denial::Unavailable(
                        "a proof went missing in its batch".into(),
                    ))
                }),
            })
            .collect()
    }

    /// The token, its claims and the audience; the proof's form and key.
    fn check_to_signature<'a>(
        &self,
        req: &Request<'a>,
    ) -> Result<(&'a str, Arc<AccessClaims>, dpop::Parsed<'a>), Denial> {
        let token = match req.authorization {
            None => return Err(Denial::MissingToken),
            Some(h) => match h.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("DPoP") => t.trim(),
                Some((scheme, _)) if scheme.eq_ignore_ascii_case("Bearer") => {
                    return Err(Denial::NotDpopScheme);
                }
                _ => return Err(Denial::MalformedToken("bad `Authorization` header".into())),
            },
        };
        let claims = self.token_claims(token, req.now_secs)?;
        if claims.aud != self.cfg.audience {
            return Err(Denial::WrongAudience {
                expected: self.cfg.audience.clone(),
                got: claims.aud.chars().take(128).collect(),
            });
        }
        let proof = match req.dpop {
            [one] => *one,
            [] => return Err(Denial::MissingProof),
            _ => return Err(Denial::MultipleProofs),
        };
        let parsed = dpop::parse(proof, Some(&self.proof_keys)).map_err(proof_denial)?;
        Ok((token, claims, parsed))
    }

    /// The proof's claims and binding, the certificate binding, and the grant's
    /// standing, once the proof's signature has been checked.
    fn check_from_signature(
        &self,
        req: &Request<'_>,
        token: &str,
        claims: Arc<AccessClaims>,
        signed: Result<dpop::Signed, TokenError>,
    ) -> Result<Allowed, Denial> {
        let proof = signed
            .and_then(|s| {
                s.accept(
                    &DpopRequirements {
                        keys: Some(&self.proof_keys),
                        htm: req.method,
                        htu: req.url,
                        now_secs: req.now_secs,
                        max_age_secs: self.cfg.dpop_max_age_secs,
                        max_skew_secs: 5,
                        access_token: Some(token),
                    },
                    &self.replay,
                )
            })
            .map_err(proof_denial)?;
        if proof.jkt != claims.cnf.jkt {
            return Err(Denial::ProofKeyMismatch);
        }
        if let Some(k) = &self.nonces
            && !proof
                .nonce
                .as_deref()
                .is_some_and(|n| k.accepts(n, req.now_secs))
        {
            return Err(Denial::UseDpopNonce);
        }
        // Both bindings hold when a token has both: the DPoP key and the
        // certificate the workload authenticated with when the token was issued.
        if let Some(bound) = &claims.cnf.x5t_s256 {
            match req.client_cert {
                None => return Err(Denial::CertificateMissing),
                Some(got) if got != bound => return Err(Denial::CertificateMismatch),
                Some(_) => {}
            }
        }
        self.standing(claims, req.action, req.now_secs)
    }

    /// For a gate that holds the token itself rather than receiving it with each
    /// request (the MCP proxy over stdio, started by the agent with its token):
    /// everything [`Verifier::check`] does but the proof of possession, which no
    /// request exists to carry.
    pub fn check_held(&self, token: &str, action: &str, now_secs: i64) -> Result<Allowed, Denial> {
        let claims = self.token_claims(token, now_secs)?;
        if claims.aud != self.cfg.audience {
            return Err(Denial::WrongAudience {
                expected: self.cfg.audience.clone(),
                got: claims.aud.chars().take(128).collect(),
            });
        }
        self.standing(claims, action, now_secs)
    }

    /// The action is granted, the grant has not ended, and the feed is fresh.
    fn standing(
        &self,
        claims: Arc<AccessClaims>,
        action: &str,
        now_secs: i64,
    ) -> Result<Allowed, Denial> {
        if !claims.actions().any(|a| a == action) {
            return Err(Denial::ActionNotGranted(action.to_owned()));
        }
        if let Some(state) = self.ended(&claims.grant_id) {
            return Err(Denial::GrantEnded(state));
        }
        let now_ms = now_secs.saturating_mul(1000);
        if let Some(silent) = self.silent_for(now_ms) {
            return Err(Denial::FeedStale(silent));
        }
        Ok(Allowed { claims })
    }

    /// The verified claims of `token`. A token's signature is checked once and its
    /// claims kept (keyed by the token's SHA-256) until it expires; its lifetime is
    /// checked on every use. The DPoP proof, new with every request, never is cached.
    pub fn token_claims(&self, token: &str, now_secs: i64) -> Result<Arc<AccessClaims>, Denial> {
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self
            .verified
            .read()
            .ok()
            .and_then(|m| m.get(&digest).cloned())
        {
            if now_secs >= c.exp {
                return Err(Denial::Expired);
            }
            if now_secs < c.nbf {
                return Err(Denial::NotYetValid);
            }
            return Ok(c);
        }
        let keys = self.keys.load();
        let claims = Arc::new(
            access::verify(token, |kid| keys.get(kid), &self.cfg.issuer, now_secs)
                .map_err(token_denial)?,
        );
        if let Ok(mut m) = self.verified.write() {
            if m.len() >= VERIFIED_CAP {
                lapse_core::table::prune(&mut *m, |_, c| c.exp > now_secs);
                if m.len() >= VERIFIED_CAP {
                    m.clear();
                }
            }
            m.insert(digest, Arc::clone(&claims));
        }
        Ok(claims)
    }

    /// How long the feed has been silent, if longer than the staleness bound.
    fn silent_for(&self, now_ms: i64) -> Option<u64> {
        let heard = self.heard_ms.load(Ordering::Acquire);
        let silent_ms = now_ms.saturating_sub(heard).max(0);
        let bound = i64::try_from(self.cfg.staleness.as_millis()).unwrap_or(i64::MAX);
        (silent_ms > bound).then(|| u64::try_from(silent_ms / 1000).unwrap_or(u64::MAX))
    }

    /// How grant `grant_id` ended, if the feed said so.
    pub fn ended(&self, grant_id: &str) -> Option<String> {
        self.ended
            .read()
            .ok()
            .and_then(|e| e.by_grant.get(grant_id).map(|(s, _)| s.clone()))
    }

    /// Waits, up to `within`, until the feed has been heard from once; false if it
    /// has not. Until then every check fails closed, so a process that answers as
    /// soon as it starts (an MCP proxy reading stdin) waits here first.
    pub async fn caught_up(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while self.heard_ms.load(Ordering::Acquire) == 0 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// When the feed was last heard from (unix ms), `None` if never: for a gate's
    /// readiness and metrics.
    pub fn heard_at_ms(&self) -> Option<i64> {
        let heard = self.heard_ms.load(Ordering::Acquire);
        (heard != 0).then_some(heard)
    }

    /// Whether the feed has been heard from within the staleness bound at `now_ms`
    /// (a check would not fail with [`Denial::FeedStale`]).
    pub fn fresh(&self, now_ms: i64) -> bool {
        self.silent_for(now_ms).is_none()
    }

    /// Notes that the feed was heard from at `now_ms` (an entry or a heartbeat).
    pub fn heard(&self, now_ms: i64) {
        self.heard_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// Starts over from the beginning of the feed (the broker's store went back).
    pub fn reset_seq(&self) {
        self.seq.store(0, Ordering::Release);
    }

    /// The newest feed sequence number applied: where to resume.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Asks the broker's introspection endpoint whether `token` is active.
    async fn introspect(&self, token: &str) -> Result<bool, Denial> {
        let url = format!("{}/oauth/introspect", self.cfg.broker.trim_end_matches('/'));
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.cfg.token)
            .form(&[("token", token)])
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| Denial::Unavailable(format!("introspection: {e}")))?;
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| Denial::Unavailable(format!("introspection: {e}")))?;
        Ok(v.get("active").and_then(serde_json::Value::as_bool) == Some(true))
    }
}
