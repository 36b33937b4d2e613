//! Quarantines: persisted blocks on workloads, and their changes.

use crate::error::StoreError;

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

pub(crate) fn quarantine_from_body(body: &str) -> Result<Quarantine, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("quarantine record: {e}")))
}
