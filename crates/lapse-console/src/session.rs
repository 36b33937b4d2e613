//! Console sign-in and sessions.
//!
//! A person signs in with their operator name and either their console password
//! (Argon2id, `password_argon2`) or their API token. The session is a cookie
//! holding a JWS signed by the broker's own key (so any replica holding the key
//! accepts it, and nothing lives in one process's memory). It carries:
//! - `cred`, a fingerprint of the operator's configured secrets: rotating the
//!   token or password, or removing the operator, ends every session at once;
//! - `csrf`, a random value every console form must echo back. A cross-site form
//!   cannot read it, and the cookie is `SameSite=Strict` besides.
//!
//! The `typ` (`lapse-console+jwt`) and `aud` keep a session from ever passing as an
//! access token (which must be `at+jwt`) and an access token from passing as a
//! session. A later OIDC login for people would end in the same session cookie.

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use lapse_broker::BrokerError;
use lapse_broker::broker::hash_secret;
use lapse_broker::config::OperatorEntry;
use lapse_broker::password::hash_password;
use lapse_broker::{Lapse, Operator};
use lapse_token::jws::{self, Unverified};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use subtle::ConstantTimeEq;

pub const SESSION_TYP: &str = "lapse-console+jwt";
const SESSION_AUD: &str = "lapse-console";

#[derive(Serialize, Deserialize)]
struct SessionClaims {
    iss: String,
    aud: String,
    sub: String,
    iat: i64,
    exp: i64,
    csrf: String,
    cred: String,
}

/// A signed-in operator, as read from a valid session cookie.
#[derive(Debug, Clone)]
pub struct Session {
    pub operator: Operator,
    /// What every form of this session must send back as `csrf`.
    pub csrf: String,
}

impl Session {
    /// Whether `sent` is this session's CSRF value (constant time).
    pub fn csrf_matches(&self, sent: &str) -> bool {
        self.csrf.len() == sent.len() && bool::from(self.csrf.as_bytes().ct_eq(sent.as_bytes()))
    }
}

/// How the operator proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInMethod {
    Password,
    ApiToken,
}

impl SignInMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Password => "password",
            Self::ApiToken => "api_token",
        }
    }
}

/// Fingerprint of an operator's configured secrets; changes when either changes.
fn fingerprint(entry: &OperatorEntry) -> String {
    let mut h = sha2::Sha256::new();
    h.update(entry.token_sha256.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(entry.password_argon2.as_deref().unwrap_or("").as_bytes());
    hex::encode(h.finalize().get(..12).unwrap_or_default())
}

fn operator_of(entry: &OperatorEntry) -> Operator {
    Operator {
        name: entry.name.clone(),
        roles: entry.roles.clone(),
        groups: entry.groups.clone(),
        audiences: entry.audiences.clone(),
    }
}

const BAD_SIGN_IN: &str = "unknown operator or wrong password or token";

/// An Argon2id hash of a random password nobody knows, with the default
/// parameters real hashes use, made once per process.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY
        .get_or_init(|| hash_password(&hex::encode(rand::random::<[u8; 32]>())).unwrap_or_default())
}

fn operator_entry<'a>(s: &'a Lapse, name: &str) -> Option<&'a OperatorEntry> {
    s.cfg.operators.iter().find(|o| o.name == name)
}

/// Checks `secret` (the console password or the API token) of operator `name`.
/// Every failure reads the same, so the form does not tell which names exist.
pub async fn sign_in(
    s: &Lapse,
    name: &str,
    secret: &str,
) -> Result<(Operator, SignInMethod), BrokerError> {
    let bad = || BrokerError::Unauthorized(BAD_SIGN_IN.into());
    let entry = operator_entry(s, name);
    if let Some(entry) = entry
        && let Some(expected) = entry
            .token_sha256
            .as_deref()
            .and_then(|t| hex::decode(t).ok())
        && bool::from(hash_secret(secret).as_slice().ct_eq(&expected))
    {
        return Ok((operator_of(entry), SignInMethod::ApiToken));
    }
    // Every failure costs one Argon2 check — against a throwaway hash when the
    // name is unknown or has no password — so the time taken does not tell
    // which operator names exist.
    let phc = entry
        .and_then(|e| e.password_argon2.clone())
        .unwrap_or_else(|| decoy_hash().to_owned());
    let secret = secret.to_owned();
    // Each check takes ~19 MiB and tens of milliseconds: a bounded number at
    // once, so a burst of sign-ins cannot exhaust memory or the blocking pool.
    let _permit = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.limits.password_checks.acquire(),
    )
    .await
    .map_err(|_| BrokerError::Unavailable("too many sign-ins at once; try again".into()))?
    .map_err(|_| BrokerError::Unavailable("shutting down".into()))?;
    // Argon2 is deliberately slow (tens of milliseconds): off the async workers.
    let ok = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&phc).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(secret.as_bytes(), &h)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false);
    match entry {
        Some(entry) if ok && entry.password_argon2.is_some() => {
            Ok((operator_of(entry), SignInMethod::Password))
        }
        _ => Err(bad()),
    }
}

/// A session cookie value for operator `name`, valid for `console_session`.
pub fn new_session(s: &Lapse, name: &str) -> Result<String, BrokerError> {
    let entry =
        operator_entry(s, name).ok_or_else(|| BrokerError::Unauthorized(BAD_SIGN_IN.into()))?;
    let now = s.now().unix_seconds();
    let ttl = i64::try_from(s.cfg.console_session.secs()).unwrap_or(8 * 3600);
    let csrf: [u8; 24] = rand::random();
    let claims = SessionClaims {
        iss: s.issuer.clone(),
        aud: SESSION_AUD.into(),
        sub: entry.name.clone(),
        iat: now,
        exp: now.saturating_add(ttl),
        csrf: lapse_token::b64::encode(csrf),
        cred: fingerprint(entry),
    };
    s.signing_key()?
        .sign_jwt(SESSION_TYP, &claims)
        .map_err(|e| BrokerError::Unavailable(format!("cannot sign the session: {e}")))
}

/// The session a cookie value stands for, if it is valid now.
pub fn open(s: &Lapse, cookie: &str) -> Result<Session, BrokerError> {
    let invalid = |why: &str| BrokerError::Unauthorized(format!("no valid session: {why}"));
    let u = Unverified::parse(cookie).map_err(|_| invalid("malformed"))?;
    if u.header.typ.as_deref() != Some(SESSION_TYP) {
        return Err(invalid("not a console session"));
    }
    let public = u
        .header
        .kid
        .as_deref()
        .and_then(|kid| s.keys.verifying(kid))
        .ok_or_else(|| invalid("signed by an unknown or retired key"))?;
    let payload = u.verify(&public).map_err(|_| invalid("bad signature"))?;
    let c: SessionClaims = jws::claims(&payload).map_err(|_| invalid("malformed"))?;
    if c.aud != SESSION_AUD || c.iss != s.issuer {
        return Err(invalid("not a console session of this broker"));
    }
    if s.now().unix_seconds() >= c.exp {
        return Err(invalid("expired; sign in again"));
    }
    let entry =
        operator_entry(s, &c.sub).ok_or_else(|| invalid("the operator no longer exists"))?;
    // Inside a verified signature already; compared in constant time anyway, as
    // every comparison of secrets or their hashes is.
    let now_cred = fingerprint(entry);
    if now_cred.len() != c.cred.len() || !bool::from(now_cred.as_bytes().ct_eq(c.cred.as_bytes())) {
        return Err(invalid("the operator's credentials changed; sign in again"));
    }
    Ok(Session {
        operator: operator_of(entry),
        csrf: c.csrf,
    })
}
