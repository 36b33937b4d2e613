//! Quarantined workloads: a `workload-quarantined` signal ends the workload's grants
//! *and* persists a block, so its next exchange, renewal or sub-agent token is
//! refused (`access_denied` naming the quarantine) on every replica, until an
//! operator with the `admin` role lifts it (`POST /v1/workloads/release`,
//! `lapse workloads release`). Setting and lifting are audited in the same commit
//! as the change.

use crate::audit::event;
use crate::broker::{Lapse, Operator};
use crate::config::Role;
use crate::error::BrokerError;
use crate::error::clip;
use lapse_core::AccessRequest;
use lapse_store::{Quarantine, QuarantineChange, WriteBatch};
use serde_json::json;

/// The refusal a quarantined workload gets: what blocks it, since when, by whom,
/// and how it is lifted.
fn refusal(q: &Quarantine) -> BrokerError {
    BrokerError::AccessDenied {
        description: format!(
            "workload `{}` is quarantined (by `{}`: {}); an operator lifts it with `lapse workloads release {}`",
            clip(&q.workload),
            q.by,
            if q.reason.is_empty() {
                "no reason given"
            } else {
                &q.reason
            },
            clip(&q.workload)
        ),
        policies: vec![],
    }
}

impl Lapse {
    /// Refuses `request` while a quarantine on its workload covers its audience,
    /// recording the refusal (`access.refused`, with the spent proof `nonce`, so a
    /// refused proof cannot be replayed either). A store that cannot answer fails
    /// closed.
    pub(crate) async fn refuse_if_quarantined(
        &self,
        request: &AccessRequest,
        nonce: Option<lapse_store::Nonce>,
        step: &str,
    ) -> Result<(), BrokerError> {
        let Some(q) = self.store.quarantine(&request.workload.id).await? else {
            return Ok(());
        };
        if !q.covers(&request.audience) {
            return Ok(());
        }
        let e = refusal(&q);
        self.commit(WriteBatch {
            events: vec![event(
                self.now(),
                "access.refused",
                None,
                &request.workload.id,
                json!({ "step": step, "request": request, "quarantine": q, "reason": e.to_string() }),
            )],
            nonces: nonce.into_iter().collect(),
            ..Default::default()
        })
        .await?;
        Err(e)
    }

    /// The quarantine a signal sets on `workload`: on the sender's audiences when
    /// it is bound to some, else on every audience.
    pub(crate) fn quarantine_by(
        &self,
        op: &Operator,
        workload: &str,
        reason: &str,
    ) -> QuarantineChange {
        QuarantineChange::Set(Quarantine {
            workload: workload.to_owned(),
            audiences: op.audiences.clone(),
            reason: clip(reason),
            by: op.name.clone(),
            since: self.now().millis(),
        })
    }

    /// Every quarantine standing.
    pub async fn quarantines(&self, op: &Operator) -> Result<Vec<Quarantine>, BrokerError> {
        op.require(Role::Read)?;
        Ok(self.store.quarantines().await?)
    }

    /// Lifts the quarantine on `workload`; answers what was lifted.
    pub async fn release(
        &self,
        op: &Operator,
        workload: &str,
        reason: &str,
    ) -> Result<Quarantine, BrokerError> {
        op.require(Role::Admin)?;
        if reason.trim().is_empty() {
            return Err(BrokerError::InvalidRequest(
                "`reason` is required: say why the workload can be trusted again".into(),
            ));
        }
        let q = self.store.quarantine(workload).await?.ok_or_else(|| {
            BrokerError::NotFound(format!("workload `{}` is not quarantined", clip(workload)))
        })?;
        self.commit(WriteBatch {
            events: vec![event(
                self.now(),
                "workload.released",
                None,
                &op.name,
                json!({ "workload": workload, "reason": clip(reason), "quarantine": q }),
            )],
            quarantines: vec![QuarantineChange::Lift(workload.to_owned())],
            ..Default::default()
        })
        .await?;
        Ok(q)
    }
}
