//! The sweeper: ends grants whose time is up or whose `@idle` window passed, and
//! forgets spent proofs once they could not be accepted anyway. A leader-only pass.

use crate::audit::event;
use crate::broker::Lapse;
use crate::error::BrokerError;
use crate::metrics::OutcomeLabels;
use lapse_core::{Grant, GrantState, Timestamp};
use lapse_store::{GrantWrite, WriteBatch};
use serde_json::json;

const NONCE_PRUNE_PERIOD_MS: i64 = 10_000;

impl Lapse {
    /// Revokes active grants whose `@idle` window passed without a reported use.
    pub async fn sweep_idle(&self) -> Result<usize, BrokerError> {
        let now = self.now();
        let mut n = 0;
        for g in self.store.idle_due(now, 500).await? {
            let idle = g.idle_secs.unwrap_or(0);
            match self
                .revoke(
                    g,
                    "lapse",
                    &format!("idle: no use reported for {idle} s (`@idle`)"),
                )
                .await
            {
                Ok(_) => n += 1,
                Err(BrokerError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Grants read per page of a sweep, and pages per pass (a pass ends at most
    /// 500, as many as one read did before; what is left waits for the next).
    const SWEEP_PAGE: usize = 100;
    const SWEEP_PAGES: usize = 5;

    /// Ends every grant whose time is up. Returns how many it ended.
    pub async fn sweep(&self) -> Result<usize, BrokerError> {
        let idle = self.sweep_idle().await?;
        let now = self.now();
        // Spent proofs are forgotten once they could not be accepted anyway.
        let last = self
            .nonces_pruned_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if now.millis().saturating_sub(last) >= NONCE_PRUNE_PERIOD_MS {
            // A failed prune only delays forgetting; expiry must go on regardless.
            match self.store.prune_nonces(now).await {
                Ok(_) => self
                    .nonces_pruned_at
                    .store(now.millis(), std::sync::atomic::Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, "pruning spent DPoP nonces failed; will retry")
                }
            }
        }
        // Read in pages: a whole pass's grants held at once were the largest
        // allocation the broker made, and after a stall (a backlog of expiries)
        // the allocator kept that high-water mark for good.
        let mut n = 0;
        for _ in 0..Self::SWEEP_PAGES {
            let due = self.store.due(now, Self::SWEEP_PAGE).await?;
            let full = due.len() == Self::SWEEP_PAGE;
            n += self.expire_all(due, now).await?;
            if !full {
                break;
            }
        }
        Ok(n + idle)
    }

    /// Ends each grant past its expiry, one commit each; returns how many.
    async fn expire_all(&self, due: Vec<Grant>, now: Timestamp) -> Result<usize, BrokerError> {
        let mut n = 0;
        for g in due {
            let was_active = g.state == GrantState::Active;
            let Ok(ended) = g.clone().expire(now) else {
                continue;
            };
            let owed = ended.clone();
            let batch = WriteBatch {
                events: vec![event(
                    now,
                    "grant.expired",
                    Some(&ended.id),
                    "lapse",
                    json!({ "reason": ended.end.as_ref().map(|e| e.reason.clone()), "expires_at": g.expires_at }),
                )],
                grants: vec![GrantWrite::Update {
                    expected_version: g.version,
                    grant: ended,
                }],
                ..Default::default()
            };
            match self.commit(batch).await {
                Ok(()) => {
                    n += 1;
                    self.destroy_owed(owed).await;
                    if was_active {
                        self.metrics.active_grants.dec();
                    }
                    self.metrics
                        .grants_ended
                        .get_or_create(&OutcomeLabels {
                            outcome: "expired".into(),
                        })
                        .inc();
                }
                Err(lapse_store::StoreError::Conflict(_)) => {} // ended by someone else meanwhile
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }
}
