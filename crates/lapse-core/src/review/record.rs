//! The review itself: what a grant holds. Apart from closing it (the parent
//! module, which takes and returns grants) so that a grant can hold its review
//! without the two modules importing each other.

use crate::clock::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The emergency was real and the access fitted it.
    Justified,
    /// It was not; follow up.
    Unjustified,
}

impl Verdict {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "justified" => Some(Self::Justified),
            "unjustified" => Some(Self::Unjustified),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// Why the requester broke glass, in their words.
    pub justification: String,
    pub opened_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Review {
    pub fn open(justification: &str, now: Timestamp) -> Self {
        Self {
            justification: justification.to_owned(),
            opened_at: now,
            closed_at: None,
            closed_by: None,
            verdict: None,
            note: String::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.closed_at.is_none()
    }
}
