//! The [`Store`] trait every backend implements.

use crate::audit::{AuditEntry, Checkpoint};
use crate::batch::WriteBatch;
use crate::error::StoreError;
use crate::feed::FeedEntry;
use crate::filter::GrantFilter;
use crate::keyring::KeyRecord;
use crate::quarantine::Quarantine;
use async_trait::async_trait;
use lapse_core::{Grant, GrantId, GrantState, Timestamp};

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
