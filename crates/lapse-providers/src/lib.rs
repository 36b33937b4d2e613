//! Credential providers.
//!
//! A provider applies what Lapse decided in one target system: it creates a
//! credential for a grant (Lapse generates the name and the secret), extends it on
//! renewal, destroys it when the grant ends (terminating live sessions first), and
//! lists what it finds in the target so a reconciler can remove what slipped.
//!
//! Destroying something that is already gone is success: revocation is retried until
//! it succeeds, and a retry must not fail because the first attempt got further than
//! it knew.

pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod registry;

use async_trait::async_trait;
use lapse_core::{GrantId, Timestamp};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The target could not be reached or refused the admin connection.
    #[error("target `{target}` is unavailable: {message}")]
    Unavailable { target: String, message: String },
    /// The target answered, but a step failed.
    #[error("target `{target}`: {step} failed: {message}")]
    Step {
        target: String,
        step: &'static str,
        message: String,
    },
    /// Live sessions survived termination.
    #[error("target `{target}`: {left} session(s) of `{name}` still open after termination")]
    SessionsLeft {
        target: String,
        name: String,
        left: i64,
    },
    /// The target answered, and it cannot serve this config as it stands: the
    /// admin lacks a privilege, a configured object does not exist. Found by
    /// `prepare`; the broker refuses to start on it.
    #[error("target `{target}` cannot serve its config: {message}")]
    Unfit { target: String, message: String },
    #[error("provider config: {0}")]
    Config(String),
}

/// Reads an admin secret (a connection string or URL) from where a provider
/// table's `admin_url` points: `env:NAME` or `file:/path`, never the string
/// itself, so config files can be shared and logged.
pub fn read_admin_secret(source: &str, audience: &str) -> Result<String, ProviderError> {
    let cfg = |m: String| ProviderError::Config(m);
    if let Some(var) = source.strip_prefix("env:") {
        std::env::var(var).map_err(|_| {
            cfg(format!(
                "audience `{audience}`: environment variable `{var}` (admin_url) is not set"
            ))
        })
    } else if let Some(path) = source.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                cfg(format!(
                    "audience `{audience}`: admin_url file `{path}`: {e}"
                ))
            })
    } else {
        Err(cfg("`admin_url` must be env:NAME or file:/path".into()))
    }
}

/// A secret Lapse generated. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// 32 random bytes from the thread CSPRNG, base64url: 256 bits, safe in any
    /// connection string.
    pub fn generate() -> Self {
        use base64::Engine;
        let raw: [u8; 32] = rand::random();
        Self(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What the provider is asked to create.
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    pub grant: GrantId,
    /// The name Lapse chose (see [`CredentialProvider::name_for`]).
    pub name: String,
    /// The grant's actions; each maps to privileges in the provider's config.
    pub actions: Vec<String>,
    /// The grant's expiry: the target must refuse the credential after it by itself.
    pub valid_until: Timestamp,
}

/// How the requester uses the credential; returned once, never stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Handout {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub audience: String,
    pub host: String,
    pub port: u16,
    /// The database (PostgreSQL, MySQL) the credential logs in to; empty where
    /// the target has none (Redis).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dbname: String,
    pub username: String,
    pub password: String,
    pub valid_until: String,
}

/// The outcome of a destroy, recorded in the audit entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Destroyed {
    /// Whether the credential still existed in the target.
    pub existed: bool,
    /// Sessions that were open and were terminated.
    pub sessions_terminated: i64,
    /// Sessions seen after termination (always 0 on success).
    pub sessions_left: i64,
}

/// A credential found in the target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Existing {
    pub name: String,
    /// The grant its marker names, when it parses.
    pub grant: Option<GrantId>,
    pub can_login: bool,
    /// Unix seconds of the target's own expiry, when it has one.
    pub valid_until: Option<i64>,
    pub sessions: i64,
}

/// Something inside Lapse's namespace in the target that Lapse did not make. No
/// grant accounts for it and no reconciler removes it (Lapse drops only what
/// carries its marker), so it is standing access: the standing-privilege report
/// lists it for a person to decide.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stray {
    pub name: String,
    pub kind: StrayKind,
    /// Lapse's group roles it belongs to.
    pub groups: Vec<String>,
    pub can_login: bool,
    pub sessions: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrayKind {
    /// Named like the credentials Lapse generates, without Lapse's marker.
    LookAlike,
    /// A member of one of Lapse's group roles that is not a credential Lapse made.
    GroupMember,
}

#[async_trait]
pub trait CredentialProvider: Send + Sync + 'static {
    /// `postgres`, …
    fn kind(&self) -> &'static str;
    /// The audience this provider serves.
    fn target(&self) -> &str;
    /// The credential's name for `grant`: deterministic, so a retry after a crash
    /// finds the same thing.
    fn name_for(&self, grant: GrantId) -> String;
    /// Sets up what every credential of this target shares (group roles, ACL
    /// templates) and checks the admin account holds what [`Self::destroy`] will
    /// need, so a missing privilege shows at start, not at the first revoke.
    /// Idempotent; the broker retries it before the first credential when the
    /// target was down at start.
    async fn prepare(&self) -> Result<(), ProviderError>;
    /// The actions among `actions` this provider's config gives no privileges:
    /// a credential for them can log in and do nothing (warned at start).
    fn unmapped(&self, actions: &[&str]) -> Vec<String>;
    /// Creates it; everything or nothing.
    async fn create(
        &self,
        spec: &CredentialSpec,
        secret: &Secret,
    ) -> Result<Handout, ProviderError>;
    /// Moves its expiry in the target (renewal).
    async fn extend(&self, name: &str, valid_until: Timestamp) -> Result<(), ProviderError>;
    /// Forbids new use, ends live sessions, checks none are left, then removes it.
    /// Success when it is already gone.
    async fn destroy(&self, name: &str) -> Result<Destroyed, ProviderError>;
    /// Every credential in the target marked as made by Lapse for this target.
    async fn list(&self) -> Result<Vec<Existing>, ProviderError>;
    /// The live sessions (connections) of the credential `name`.
    async fn sessions(&self, name: &str) -> Result<i64, ProviderError>;
    /// What looks like Lapse's but is not: see [`Stray`]. Providers whose targets
    /// have no such namespace find nothing.
    async fn strays(&self) -> Result<Vec<Stray>, ProviderError> {
        Ok(Vec::new())
    }
}
