//! The store: the single source of truth for grants and the audit log.
//!
//! Every write goes through [`Store::commit`], which applies grant changes and
//! appends their audit events in one transaction: either both are durable or
//! neither is. That is how "no credential without its audit record" is kept —
//! callers hand out a credential only after `commit` returned.

pub mod audit;
mod error;
pub mod postgres;
pub mod sqlite;

pub use audit::{AuditEntry, AuditEvent, AuditSigner, Checkpoint, VerifyReport};
pub use error::StoreError;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use lapse_core::{Grant, GrantId, GrantState, Timestamp};
use std::sync::Arc;

/// A change to one grant.
#[derive(Debug, Clone)]
pub enum GrantWrite {
    Insert(Grant),
    /// Replace the stored grant if its version is still `expected_version`.
    Update {
        grant: Grant,
        expected_version: u64,
    },
}

/// Grant changes and the audit events that record them, committed atomically.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    pub grants: Vec<GrantWrite>,
    pub events: Vec<AuditEvent>,
    /// DPoP proof `jti`s this write spends: a `jti` already spent (by any replica
    /// sharing the store) fails the whole batch with [`StoreError::Replay`].
    pub nonces: Vec<Nonce>,
    /// Signing keys added to the ring or changed (retirement).
    pub keys: Vec<KeyRecord>,
    /// A precondition on the key ring: the batch fails with [`StoreError::Conflict`]
    /// unless the ring's key ids are exactly these when it commits. Seeding expects
    /// none (replicas starting together seed it once); a rotation expects the ring
    /// it read (two rotations at once cannot leave a key that never retires).
    pub keys_expected: Option<Vec<String>>,
    /// Quarantines set or lifted.
    pub quarantines: Vec<QuarantineChange>,
    /// The leader term this write belongs to (a generation from [`Store::try_lead`]):
    /// the batch fails with [`StoreError::Fenced`] unless the store's lease still
    /// has this generation when it commits, so a replica that stalled past its lease
    /// and lost it cannot write as leader afterwards. `None`: not a leader-only write.
    pub fence: Option<u64>,
}

/// A persisted block on a workload: no new grants or renewals for it while it
/// stands, on `audiences` (every audience when empty), until an operator lifts it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quarantine {
    pub workload: String,
    /// Empty: every audience. A sender bound to audiences quarantines on those.
    #[serde(default)]
    pub audiences: Vec<String>,
    pub reason: String,
    /// Who set it (the signal's sender).
    pub by: String,
    /// ms since the epoch.
    pub since: i64,
}

impl Quarantine {
    pub fn covers(&self, audience: &str) -> bool {
        self.audiences.is_empty() || self.audiences.iter().any(|a| a == audience)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuarantineChange {
    /// Sets (or replaces) the workload's quarantine.
    Set(Quarantine),
    /// Lifts the workload's quarantine; lifting none is no change.
    Lift(String),
}

/// A spent one-time value, kept until `expires_at` (ms), after which it could not
/// be accepted anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nonce {
    pub value: String,
    pub expires_at: i64,
}

/// One key of the signing key ring as stored. The store never sees a private key
/// in the clear: `sealed` is encrypted by the broker with its key-encryption key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    pub kid: String,
    pub alg: String,
    /// The public key (raw bytes, as the algorithm defines them).
    pub public: Vec<u8>,
    /// The private key, sealed (AEAD) under the key-encryption key.
    pub sealed: Vec<u8>,
    /// ms since the epoch.
    pub created_at: i64,
    /// From when it signs (it is published from `created_at`).
    pub activates_at: i64,
    /// From when it is no longer published; `None` while in use.
    pub retires_at: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct GrantFilter {
    pub state: Option<GrantState>,
    pub workload: Option<String>,
    pub task: Option<String>,
    pub audience: Option<String>,
    /// Only grants older than this one, in the list's newest-first order (keyset
    /// paging: stable while new grants arrive).
    pub before: Option<GrantCursor>,
    pub limit: usize,
}

/// One grant ending on the revocation feed: a grant that was active and is now
/// completed, revoked or expired. Gates keep it until `exp` (the grant's maximum
/// lifetime, which caps every token it ever had), after which the tokens are dead.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedEntry {
    /// Gap-free, in commit order.
    pub seq: u64,
    /// When the grant ended (ms).
    pub at: i64,
    pub grant_id: String,
    pub state: String,
    pub audience: String,
    /// The most recent token's `jti`.
    pub jti: Option<String>,
    /// The grant's maximum lifetime (ms): no token of it is valid after.
    pub exp: i64,
    pub reason: String,
}

/// A position in the newest-first order of grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantCursor {
    pub created_at: Timestamp,
    pub id: GrantId,
}

impl GrantCursor {
    pub fn of(g: &Grant) -> Self {
        Self {
            created_at: g.created_at,
            id: g.id,
        }
    }
}

/// `CREATED_MS.ID`: how a cursor travels in `?before=` (API, console, CLI).
impl std::fmt::Display for GrantCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at.millis(), self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a paging cursor (expected `CREATED_MS.GRANT_ID`)")]
pub struct CursorParseError(String);

impl std::str::FromStr for GrantCursor {
    type Err = CursorParseError;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = || CursorParseError(raw.chars().take(80).collect());
        let (ms, id) = raw.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            created_at: Timestamp::from_millis(ms.parse().map_err(|_| bad())?),
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies `batch` atomically and durably. Fails with [`StoreError::Conflict`]
    /// when a grant moved since it was read, leaving nothing written.
    async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError>;
    async fn grant(&self, id: GrantId) -> Result<Option<Grant>, StoreError>;
    /// Newest first.
    async fn grants(&self, filter: GrantFilter) -> Result<Vec<Grant>, StoreError>;
    /// Active or pending grants whose `expires_at` is at or before `now`.
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<Grant>, StoreError>;
    /// Ended grants whose provider credentials are owed a destroy attempt at or
    /// before `now`, most overdue first.
    async fn cleanup_due(&self, now: Timestamp, limit: usize) -> Result<Vec<Grant>, StoreError>;
    /// Audit entries with `seq > after`, in order.
    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// Audit entries that name `grant`, in order.
    async fn audit_for(&self, grant: GrantId) -> Result<Vec<AuditEntry>, StoreError>;
    /// Active grants whose `@idle` window passed without a reported use.
    async fn idle_due(&self, now: Timestamp, limit: usize) -> Result<Vec<Grant>, StoreError>;
    /// Revocation-feed entries with `seq > after`, in order.
    async fn feed(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError>;
    /// The newest feed sequence number (0 when empty).
    async fn feed_head(&self) -> Result<u64, StoreError>;
    /// How many grants are in `state`.
    async fn count(&self, state: GrantState) -> Result<u64, StoreError>;
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// Proves the store can take a write now.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The signing key ring, oldest first.
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// The quarantine standing on `workload`, if any.
    async fn quarantine(&self, workload: &str) -> Result<Option<Quarantine>, StoreError>;
    /// Every quarantine standing, by workload.
    async fn quarantines(&self) -> Result<Vec<Quarantine>, StoreError>;
    /// Forgets spent nonces that expired before `now`; returns how many.
    async fn prune_nonces(&self, now: Timestamp) -> Result<u64, StoreError>;
    /// Which of `values` are spent nonces (expired or not: until pruned, a commit
    /// spending one fails with [`StoreError::Replay`]). Lets a writer drop what was
    /// already written before committing the rest, instead of one failed commit
    /// per spent value.
    async fn spent_nonces(&self, values: &[String]) -> Result<Vec<String>, StoreError>;
    /// Takes or renews the lease on the singleton jobs (sweeper, cleanup,
    /// reconciler) for `lease`, and answers the term's generation, or `None` while
    /// another process holds an unexpired lease. Backends shared by several replicas
    /// elect one; the others keep asking and take over once the lease lapses
    /// unrenewed (a stalled leader loses it within `lease`). Each new term has a
    /// higher generation, which leader-only writes carry as their
    /// [`WriteBatch::fence`]. A backend that one process owns always leads.
    async fn try_lead(&self, lease: std::time::Duration) -> Result<Option<u64>, StoreError> {
        let _ = lease;
        Ok(Some(0))
    }
    /// Wakes when another process sharing the store appended to the revocation
    /// feed (`None`: no other process can, or the backend cannot tell).
    fn feed_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Opens the store a config names: `sqlite://PATH` or `postgres://…`.
pub async fn open(
    url: &str,
    signer: Arc<dyn AuditSigner>,
    busy_timeout: std::time::Duration,
) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let store = SqliteStore::open(std::path::Path::new(path), signer, busy_timeout).await?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::open(url, signer, busy_timeout).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported store URL `{}`: expected sqlite://PATH or postgres://…",
            redact_url(url)
        )))
    }
}

fn redact_param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("password=") {
        let (head, tail) = rest.split_at(i + "password=".len());
        out.push_str(head);
        out.push_str("***");
        let end = tail.find(['&', ' ']).unwrap_or(tail.len());
        rest = tail.get(end..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// Refuses a batch whose stored text holds a NUL character (PostgreSQL cannot
/// store one; both backends refuse it so they behave alike). JSON bodies escape it;
/// these are the columns stored as raw text.
pub(crate) fn validate(batch: &WriteBatch) -> Result<(), StoreError> {
    let nul = |what: &str, s: &str| {
        if s.contains('\0') {
            Err(StoreError::Invalid(format!(
                "{what} contains a NUL character"
            )))
        } else {
            Ok(())
        }
    };
    for w in &batch.grants {
        let (GrantWrite::Insert(g) | GrantWrite::Update { grant: g, .. }) = w;
        nul("the workload", &g.request.workload.id)?;
        nul("the audience", &g.request.audience)?;
        nul("the task", &g.request.task.id)?;
        nul("the token id", g.token_jti.as_deref().unwrap_or_default())?;
        nul(
            "the reason",
            g.end.as_ref().map_or("", |e| e.reason.as_str()),
        )?;
    }
    for e in &batch.events {
        nul("an audit event kind", &e.kind)?;
        nul("an audit actor", &e.actor)?;
        nul(
            "an audit grant id",
            e.grant_id.as_deref().unwrap_or_default(),
        )?;
    }
    for n in &batch.nonces {
        nul("a nonce", &n.value)?;
    }
    for q in &batch.quarantines {
        let (QuarantineChange::Set(Quarantine { workload, .. }) | QuarantineChange::Lift(workload)) =
            q;
        nul("a quarantined workload", workload)?;
    }
    Ok(())
}

pub(crate) fn quarantine_from_body(body: &str) -> Result<Quarantine, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("quarantine record: {e}")))
}

/// Whether two lists of key ids hold the same ids.
pub(crate) fn same_kids(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort();
    b.sort();
    a == b
}

/// `url` with any password replaced, for messages and logs: in the user info of a
/// URL, or as a `password=` parameter (URL query or key=value connection string).
pub fn redact_url(url: &str) -> String {
    let url = &redact_param(url);
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let (head, rest) = url.split_at(scheme + 3);
            let userinfo = rest.get(..at - scheme - 3).unwrap_or_default();
            let tail = rest.get(at - scheme - 3..).unwrap_or_default();
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{head}{user}:***{tail}"),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(
            super::redact_url("postgres://lapse:s3cret@db:5432/lapse"),
            "postgres://lapse:***@db:5432/lapse"
        );
        assert_eq!(
            super::redact_url("postgres://lapse@db/lapse"),
            "postgres://lapse@db/lapse"
        );
        assert_eq!(super::redact_url("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(
            super::redact_url("postgres://u@db/x?password=secret&sslmode=disable"),
            "postgres://u@db/x?password=***&sslmode=disable"
        );
        assert_eq!(
            super::redact_url("host=db password=secret user=u"),
            "host=db password=*** user=u"
        );
    }
}
