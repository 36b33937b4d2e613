//! What one commit writes: grant changes, their audit events and everything else
//! that must land with them or not at all.

use crate::audit::AuditEvent;
use crate::error::StoreError;
use crate::keyring::KeyRecord;
use crate::quarantine::{Quarantine, QuarantineChange};
use lapse_core::Grant;

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
    /// The leader term this write belongs to (a generation from [`Store::try_lead`](crate::Store::try_lead)):
    /// the batch fails with [`StoreError::Fenced`] unless the store's lease still
    /// has this generation when it commits, so a replica that stalled past its lease
    /// and lost it cannot write as leader afterwards. `None`: not a leader-only write.
    pub fence: Option<u64>,
}

/// A spent one-time value, kept until `expires_at` (ms), after which it could not
/// be accepted anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nonce {
    pub value: String,
    pub expires_at: i64,
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
