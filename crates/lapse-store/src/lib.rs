//! The store: the single source of truth for grants and the audit log.
//!
//! Every write goes through [`Store::commit`], which applies grant changes and
//! appends their audit events in one transaction: either both are durable or
//! neither is. That is how "no credential without its audit record" is kept —
//! callers hand out a credential only after `commit` returned.

pub mod audit;
mod error;
pub mod sqlite;

pub use audit::{AuditEntry, AuditEvent, AuditSigner, Checkpoint, VerifyReport};
pub use error::StoreError;
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
}

/// Opens the store a config names: `sqlite://PATH`.
pub async fn open(
    url: &str,
    signer: Arc<dyn AuditSigner>,
    busy_timeout: std::time::Duration,
) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let store = SqliteStore::open(std::path::Path::new(path), signer, busy_timeout).await?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Err(StoreError::Config(
            "the PostgreSQL store is not available in this build yet; use sqlite://PATH".into(),
        ))
    } else {
        Err(StoreError::Config(format!(
            "unsupported store URL `{url}`: expected sqlite://PATH"
        )))
    }
}
