//! RFC 9449 DPoP: verifying proofs (server and gates) and making them (clients).

use crate::DpopFault;
use crate::jwk::{Jwk, PublicKey, thumbprint};
use crate::jws::{self, Unverified};
use crate::replay::{ReplayCache, Seen};
use crate::{TokenError, b64};
use serde::{Deserialize, Serialize};

pub const DPOP_TYP: &str = "dpop+jwt";

/// What a proof must match.
#[derive(Debug, Clone)]
pub struct DpopRequirements<'a> {
    /// The request's method.
    pub htm: &'a str,
    /// The request's URL without query and fragment, as this server is known publicly.
    pub htu: &'a str,
    pub now_secs: i64,
    /// How old `iat` may be.
    pub max_age_secs: i64,
    /// How far in the future `iat` may be (clock skew).
    pub max_skew_secs: i64,
    /// The access token presented with the proof, whose hash must be in `ath`.
    pub access_token: Option<&'a str>,
    /// Parsed proof keys, so a workload's key is decoded once, not per request.
    pub keys: Option<&'a KeyCache>,
}

/// Proof keys already parsed (an Ed25519 point decompressed, a P-256 point
/// checked), with their RFC 7638 thumbprints, by their JWK members. Bounded: when
/// full it starts over.
#[derive(Default)]
pub struct KeyCache {
    keys: std::sync::RwLock<std::collections::HashMap<String, ProofKey>>,
}

/// A proof's key and its thumbprint (what `cnf.jkt` binds a token to).
#[derive(Debug, Clone)]
struct ProofKey {
    key: PublicKey,
    jkt: String,
}

impl ProofKey {
    fn of(jwk: &Jwk) -> Result<Self, TokenError> {
        Ok(Self {
            key: PublicKey::from_jwk(jwk)?,
            jkt: thumbprint(jwk)?,
        })
    }
}

const KEY_CACHE_CAP: usize = 50_000;

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.keys.read().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("KeyCache").field("keys", &n).finish()
    }
}

impl KeyCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn get_or_parse(&self, jwk: &Jwk) -> Result<ProofKey, TokenError> {
        // Everything that determines the key; `kid` and other members do not.
        let id = format!(
            "{}|{}|{}|{}|{}|{}",
            jwk.kty,
            jwk.crv.as_deref().unwrap_or(""),
            jwk.x.as_deref().unwrap_or(""),
            jwk.y.as_deref().unwrap_or(""),
            jwk.n.as_deref().unwrap_or(""),
            jwk.e.as_deref().unwrap_or("")
        );
        if jwk.d.is_none()
            && let Some(k) = self.keys.read().ok().and_then(|m| m.get(&id).cloned())
        {
            return Ok(k);
        }
        let k = ProofKey::of(jwk)?;
        if let Ok(mut m) = self.keys.write() {
            if m.len() >= KEY_CACHE_CAP {
                m.clear();
            }
            m.insert(id, k.clone());
        }
        Ok(k)
    }
}

/// A verified proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopProof {
    /// RFC 7638 thumbprint of the proof's key.
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
    /// The server-provided nonce the proof carries (RFC 9449 section 8), checked by
    /// the server that requires one.
    pub nonce: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
struct ProofClaims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ath: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
}

const MAX_JTI_LEN: usize = 256;

fn bad(msg: &str) -> TokenError {
    bad_as(DpopFault::Malformed, msg)
}

fn bad_as(fault: DpopFault, msg: &str) -> TokenError {
    TokenError::Dpop {
        fault,
        detail: msg.to_owned(),
    }
}

/// Verifies a DPoP proof per RFC 9449 section 4.3 and records its `jti`.
pub fn verify(
    proof: &str,
    req: &DpopRequirements<'_>,
    replay: &ReplayCache,
) -> Result<DpopProof, TokenError> {
    parse(proof, req.keys)?
        .check_signature()?
        .accept(req, replay)
}

/// A proof whose form and key have been read; its signature is not checked yet.
/// The three steps of [`verify`] apart, so that many proofs' signatures can be
/// checked together ([`check_signatures`]).
#[derive(Debug)]
pub struct Parsed<'a> {
    unverified: Unverified<'a>,
    key: ProofKey,
}

/// A proof whose signature holds, made only by [`Parsed::check_signature`] or
/// [`check_signatures`]: its claims are still to be checked ([`Signed::accept`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Signed {
    /// The key's thumbprint.
    jkt: String,
    payload: Vec<u8>,
}

/// Reads a proof's form (`typ`, `jwk`) and its key, through `keys` if given.
pub fn parse<'a>(proof: &'a str, keys: Option<&KeyCache>) -> Result<Parsed<'a>, TokenError> {
    let unverified =
        Unverified::parse(proof).map_err(|e| bad(&format!("is not a valid JWS: {e}")))?;
    if !unverified
        .header
        .typ
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case(DPOP_TYP))
    {
        return Err(bad("must have `typ` `dpop+jwt`"));
    }
    let jwk = unverified
        .header
        .jwk
        .as_ref()
        .ok_or_else(|| bad("has no `jwk` header"))?;
    let key = match keys {
        Some(cache) => cache.get_or_parse(jwk),
        None => ProofKey::of(jwk),
    }
    .map_err(|e| bad(&format!("key is unusable: {e}")))?;
    Ok(Parsed { unverified, key })
}

fn signature_fault(e: TokenError) -> TokenError {
    bad_as(DpopFault::Signature, &format!("does not verify: {e}"))
}

impl Parsed<'_> {
    pub fn check_signature(self) -> Result<Signed, TokenError> {
        let payload = self
            .unverified
            .verify(&self.key.key)
            .map_err(signature_fault)?;
        Ok(Signed {
            jkt: self.key.jkt,
            payload,
        })
    }
}

/// [`Parsed::check_signature`] for many proofs, with Ed25519 signatures checked as
/// one batch ([`jws::verify_many`]); answers in the same order.
pub fn check_signatures(proofs: Vec<Parsed<'_>>) -> Vec<Result<Signed, TokenError>> {
    let items: Vec<_> = proofs.iter().map(|p| (&p.unverified, &p.key.key)).collect();
    let results = jws::verify_many(&items);
    proofs
        .into_iter()
        .zip(results)
        .map(|(p, r)| {
            r.map(|payload| Signed {
                jkt: p.key.jkt,
                payload,
            })
            .map_err(signature_fault)
        })
        .collect()
}

impl Signed {
    /// Checks the claims against `req` (method, URL, age, access-token hash) and
    /// records the `jti`: a proof is accepted once.
    pub fn accept(
        self,
        req: &DpopRequirements<'_>,
        replay: &ReplayCache,
    ) -> Result<DpopProof, TokenError> {
        let Self { jkt, payload } = self;
        let claims: ProofClaims =
            jws::claims(&payload).map_err(|_| bad("claims are not a JSON object"))?;
        let jti = claims.jti.ok_or_else(|| bad("has no `jti`"))?;
        if jti.is_empty() || jti.len() > MAX_JTI_LEN {
            return Err(bad("`jti` must be 1 to 256 characters"));
        }
        let htm = claims.htm.ok_or_else(|| bad("has no `htm`"))?;
        if htm != req.htm {
            return Err(bad_as(
                DpopFault::Method,
                &format!(
                    "`htm` `{}` does not match the request method `{}`",
                    clip(&htm),
                    req.htm
                ),
            ));
        }
        let htu = claims.htu.ok_or_else(|| bad("has no `htu`"))?;
        if !same_htu(&htu, req.htu) {
            return Err(bad_as(
                DpopFault::Url,
                &format!(
                    "`htu` `{}` does not match the request URL `{}`",
                    clip(&htu),
                    req.htu
                ),
            ));
        }
        let iat = claims.iat.ok_or_else(|| bad("has no `iat`"))?;
        if iat < req.now_secs.saturating_sub(req.max_age_secs) {
            return Err(bad_as(DpopFault::Stale, "is too old (`iat`)"));
        }
        if iat > req.now_secs.saturating_add(req.max_skew_secs) {
            return Err(bad_as(DpopFault::Future, "is from the future (`iat`)"));
        }
        match (req.access_token, claims.ath.as_deref()) {
            (Some(token), Some(ath)) => {
                if b64::sha256(token) != ath {
                    return Err(bad_as(
                        DpopFault::AccessTokenHash,
                        "`ath` does not match the access token",
                    ));
                }
            }
            (Some(_), None) => {
                return Err(bad_as(
                    DpopFault::AccessTokenHash,
                    "has no `ath` for the access token",
                ));
            }
            (None, _) => {}
        }
        // Only proofs that passed every other check take room in the replay cache.
        let expires = iat
            .saturating_add(req.max_age_secs)
            .saturating_add(req.max_skew_secs)
            .max(req.now_secs + 1);
        match replay.check_and_insert(&format!("{jkt}:{jti}"), expires, req.now_secs) {
            Seen::New => Ok(DpopProof {
                jkt,
                jti,
                iat,
                nonce: claims.nonce,
            }),
            Seen::Replay => Err(TokenError::DpopReplay),
            Seen::Full => Err(TokenError::ReplayCacheFull),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

/// RFC 9449 section 4.3 step 9: compare without query and fragment, after syntax-based
/// normalisation (case of scheme and host, default ports).
pub fn same_htu(claimed: &str, expected: &str) -> bool {
    // What a client that signs the URL it calls sends: no need to parse either.
    if claimed == expected {
        return true;
    }
    let (Ok(a), Ok(b)) = (url::Url::parse(claimed), url::Url::parse(expected)) else {
        return false;
    };
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
        && a.path() == b.path()
}

/// A client's DPoP key (Ed25519). Lives in memory; `to_pem` exists for CLIs that
/// must keep it between commands.
#[derive(Clone)]
pub struct DpopKey {
    key: crate::signing::SigningKey,
    jwk: Jwk,
    jkt: String,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey")
            .field("jkt", &self.jkt)
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    pub fn generate() -> Self {
        Self::from_signing(crate::signing::SigningKey::generate())
    }

    pub fn from_signing(key: crate::signing::SigningKey) -> Self {
        let mut jwk = key.jwk().clone();
        jwk.kid = None;
        jwk.alg = None;
        jwk.use_ = None;
        let jkt = thumbprint(&jwk).unwrap_or_default();
        Self { key, jwk, jkt }
    }

    pub fn signing_key(&self) -> &crate::signing::SigningKey {
        &self.key
    }

    pub fn jkt(&self) -> &str {
        &self.jkt
    }

    /// A proof for one request, issued at `now_secs`, with a fresh random `jti`.
    pub fn proof(&self, htm: &str, htu: &str, access_token: Option<&str>, now_secs: i64) -> String {
        self.proof_with_nonce(htm, htu, access_token, now_secs, None)
    }

    /// [`DpopKey::proof`] carrying a server's `DPoP-Nonce` (RFC 9449 section 8).
    pub fn proof_with_nonce(
        &self,
        htm: &str,
        htu: &str,
        access_token: Option<&str>,
        now_secs: i64,
        nonce: Option<&str>,
    ) -> String {
        let jti: [u8; 16] = rand::random();
        let claims = ProofClaims {
            jti: Some(b64::encode(jti)),
            htm: Some(htm.to_owned()),
            htu: Some(htu.to_owned()),
            iat: Some(now_secs),
            ath: access_token.map(b64::sha256),
            nonce: nonce.map(str::to_owned),
        };
        let header = serde_json::json!({ "typ": DPOP_TYP, "alg": "EdDSA", "jwk": self.jwk });
        self.key
            .sign_with_header(&header, &claims)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://lapse.example/oauth/token";

    fn reqs(now: i64) -> DpopRequirements<'static> {
        DpopRequirements {
            keys: None,
            htm: "POST",
            htu: URL,
            now_secs: now,
            max_age_secs: 60,
            max_skew_secs: 5,
            access_token: None,
        }
    }

    #[test]
    fn cached_keys_give_the_same_answers() -> Result<(), TokenError> {
        let keys = KeyCache::new();
        let replay = ReplayCache::new(1000);
        let with_cache = |now| DpopRequirements {
            keys: Some(&keys),
            ..reqs(now)
        };
        let (a, b) = (DpopKey::generate(), DpopKey::generate());
        for _ in 0..2 {
            let p = verify(
                &a.proof("POST", URL, None, 1000),
                &with_cache(1000),
                &replay,
            )?;
            assert_eq!(p.jkt, a.jkt());
        }
        let p = verify(
            &b.proof("POST", URL, None, 1000),
            &with_cache(1000),
            &replay,
        )?;
        assert_eq!(
            p.jkt,
            b.jkt(),
            "another key is not mistaken for a cached one"
        );
        // A proof signed by another key under a's public key fails, cache or not.
        let forged = {
            let good = a.proof("POST", URL, None, 1000);
            let (rest, _) = good.rsplit_once('.').unwrap_or_default();
            format!(
                "{rest}.{}",
                b64::encode(b.signing_key().sign(rest.as_bytes()))
            )
        };
        assert!(matches!(
            verify(&forged, &with_cache(1000), &replay),
            Err(TokenError::Dpop {
                fault: DpopFault::Signature,
                ..
            })
        ));
        Ok(())
    }

    /// A compact JWS over `header` and `claims`, signed by `sign`.
    fn jws(
        header: &serde_json::Value,
        claims: &serde_json::Value,
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> String {
        let input = format!(
            "{}.{}",
            b64::encode(header.to_string()),
            b64::encode(claims.to_string())
        );
        let sig = sign(input.as_bytes());
        format!("{input}.{}", b64::encode(sig))
    }

    fn proof_claims() -> serde_json::Value {
        let jti: [u8; 16] = rand::random();
        serde_json::json!({ "jti": b64::encode(jti), "htm": "POST", "htu": URL, "iat": 1000 })
    }

    #[test]
    fn signatures_checked_together_answer_as_each_alone() -> Result<(), TokenError> {
        use p256::ecdsa::signature::Signer as _;
        let keys: Vec<DpopKey> = (0..6).map(|_| DpopKey::generate()).collect();
        let good: Vec<String> = keys
            .iter()
            .map(|k| k.proof("POST", URL, None, 1000))
            .collect();
        // One key's header and claims, another key's signature.
        let forged = jws(
            &serde_json::json!({ "typ": DPOP_TYP, "alg": "EdDSA", "jwk": keys[0].jwk }),
            &proof_claims(),
            |m| keys[1].signing_key().sign(m),
        );
        // A key for EdDSA under a header that says ES256.
        let mismatched = jws(
            &serde_json::json!({ "typ": DPOP_TYP, "alg": "ES256", "jwk": keys[2].jwk }),
            &proof_claims(),
            |m| keys[2].signing_key().sign(m),
        );
        // ES256 keys are not batched; a good and a forged one among the Ed25519 ones.
        let es = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let point = es.verifying_key().to_encoded_point(false);
        let es_jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "x": b64::encode(point.x().map(|x| x.to_vec()).unwrap_or_default()),
            "y": b64::encode(point.y().map(|y| y.to_vec()).unwrap_or_default()),
        });
        let es_header = serde_json::json!({ "typ": DPOP_TYP, "alg": "ES256", "jwk": es_jwk });
        let es_sign = |m: &[u8]| -> Vec<u8> {
            let s: p256::ecdsa::Signature = es.sign(m);
            s.to_bytes().to_vec()
        };
        let es_good = jws(&es_header, &proof_claims(), es_sign);
        let es_forged = {
            let other = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
            jws(&es_header, &proof_claims(), |m| {
                let s: p256::ecdsa::Signature = other.sign(m);
                s.to_bytes().to_vec()
            })
        };
        let mixed: Vec<&str> = vec![
            &good[0],
            &forged,
            &good[1],
            &es_good,
            &good[2],
            &mismatched,
            &good[3],
            &es_forged,
            &good[4],
            &good[5],
        ];
        let expect_ok = [
            true, false, true, true, true, false, true, false, true, true,
        ];
        for proofs in [mixed, good.iter().map(String::as_str).collect()] {
            let parsed = proofs
                .iter()
                .map(|p| parse(p, None))
                .collect::<Result<Vec<_>, _>>()?;
            let together = check_signatures(parsed);
            assert_eq!(together.len(), proofs.len());
            for (i, (t, p)) in together.into_iter().zip(&proofs).enumerate() {
                let alone = parse(p, None)?.check_signature();
                assert_eq!(t, alone, "proof {i} answered differently in a batch");
                if proofs.len() == expect_ok.len() {
                    assert_eq!(t.is_ok(), expect_ok[i], "proof {i}: {t:?}");
                    if let Err(e) = &t {
                        assert!(
                            matches!(
                                e,
                                TokenError::Dpop {
                                    fault: DpopFault::Signature,
                                    ..
                                }
                            ),
                            "proof {i}: {e:?}"
                        );
                    }
                } else {
                    let accepted = t?.accept(&reqs(1000), &ReplayCache::new(10))?;
                    assert_eq!(accepted.jkt, keys[i].jkt(), "proof {i} kept its own key");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_small_order_key_is_refused() {
        // The identity point (y = 1): every signature with s·B = R verifies under it.
        let mut x = [0u8; 32];
        x[0] = 1;
        let jwk = Jwk::ed25519(&x);
        assert_eq!(
            PublicKey::from_jwk(&jwk).map(|_| ()),
            Err(TokenError::InvalidKey("Ed25519 key of small order".into()))
        );
    }

    #[test]
    fn a_good_proof_verifies_once() -> Result<(), TokenError> {
        let key = DpopKey::generate();
        let cache = ReplayCache::new(1000);
        let proof = key.proof("POST", URL, None, 1000);
        let v = verify(&proof, &reqs(1001), &cache)?;
        assert_eq!(v.jkt, key.jkt());
        assert_eq!(
            verify(&proof, &reqs(1002), &cache),
            Err(TokenError::DpopReplay)
        );
        Ok(())
    }

    #[test]
    fn wrong_method_url_or_time_is_refused() {
        let key = DpopKey::generate();
        let cache = ReplayCache::new(1000);
        assert!(verify(&key.proof("GET", URL, None, 1000), &reqs(1000), &cache).is_err());
        assert!(
            verify(
                &key.proof("POST", "https://other.example/oauth/token", None, 1000),
                &reqs(1000),
                &cache
            )
            .is_err()
        );
        assert!(verify(&key.proof("POST", URL, None, 900), &reqs(1000), &cache).is_err());
        assert!(verify(&key.proof("POST", URL, None, 1100), &reqs(1000), &cache).is_err());
    }

    #[test]
    fn htu_normalisation_ignores_query_and_default_port() {
        assert!(same_htu("https://LAPSE.example:443/oauth/token?x=1#f", URL));
        assert!(!same_htu("http://lapse.example/oauth/token", URL));
        assert!(!same_htu("https://lapse.example/oauth/token/", URL));
    }

    #[test]
    fn ath_binds_the_access_token() -> Result<(), TokenError> {
        let key = DpopKey::generate();
        let cache = ReplayCache::new(1000);
        let mut r = reqs(1000);
        r.access_token = Some("the-token");
        verify(&key.proof("POST", URL, Some("the-token"), 1000), &r, &cache)?;
        assert!(
            verify(
                &key.proof("POST", URL, Some("other-token"), 1000),
                &r,
                &cache
            )
            .is_err()
        );
        assert!(verify(&key.proof("POST", URL, None, 1000), &r, &cache).is_err());
        Ok(())
    }

    #[test]
    fn a_forged_signature_is_refused() {
        let key = DpopKey::generate();
        let other = DpopKey::generate();
        let cache = ReplayCache::new(1000);
        // Header (with `key`'s jwk) from one proof, signature from another key.
        let good = key.proof("POST", URL, None, 1000);
        let forged = other.proof("POST", URL, None, 1000);
        let (gh, _) = good.split_once('.').unwrap_or_default();
        let (_, rest) = forged.split_once('.').unwrap_or_default();
        assert!(verify(&format!("{gh}.{rest}"), &reqs(1000), &cache).is_err());
    }
}
