//! What a grant keeps of each approval. Apart from the approving itself (the
//! parent module, which takes and returns grants) so that a grant can hold its
//! approvals without the two modules importing each other.

use crate::clock::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The approver's account name.
    pub by: String,
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The actions this approval took away from what was still on offer (so a
    /// later approver sees who narrowed what).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}
