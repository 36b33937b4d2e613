//! Provider credentials: what a grant hands out in a target system beside its token
//! (a PostgreSQL role, later SSH certificates or cloud roles).
//!
//! The record holds everything needed to destroy the credential (provider, target,
//! name), so revocation works even after the config changed. Its state moves
//! `intended → live → destroying → destroyed`; `intended` is written before the
//! provider is asked to create anything, so a crash in between leaves a record the
//! reconciler finds. A grant that ends moves every credential to `destroying`, and
//! a failed destroy is retried with bounded backoff until it succeeds.

use crate::clock::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    /// Recorded before the provider creates it; may or may not exist in the target.
    Intended,
    /// Created and handed out.
    Live,
    /// The grant ended; destruction is due at `next_attempt_at`.
    Destroying,
    /// Gone from the target (or never created there).
    Destroyed,
}

impl CredentialState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Intended => "intended",
            Self::Live => "live",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
        }
    }
}

/// The longest wait between two attempts to destroy a credential.
pub const MAX_BACKOFF_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderCredential {
    /// The provider kind, e.g. `postgres`.
    pub provider: String,
    /// The audience whose provider made it.
    pub target: String,
    /// Its name in the target (the role name): enough to destroy it.
    pub name: String,
    pub state: CredentialState,
    /// When the target itself stops honouring it (PostgreSQL `VALID UNTIL`).
    pub valid_until: Timestamp,
    pub created_at: Option<Timestamp>,
    pub destroyed_at: Option<Timestamp>,
    /// Failed destroy attempts so far.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the next destroy attempt is due (`destroying` only).
    pub next_attempt_at: Option<Timestamp>,
}

impl ProviderCredential {
    pub fn intended(provider: &str, target: &str, name: &str, valid_until: Timestamp) -> Self {
        Self {
            provider: provider.to_owned(),
            target: target.to_owned(),
            name: name.to_owned(),
            state: CredentialState::Intended,
            valid_until,
            created_at: None,
            destroyed_at: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
        }
    }

    /// Whether destruction is still owed.
    pub fn needs_destroy(&self) -> bool {
        self.state != CredentialState::Destroyed
    }

    pub(crate) fn schedule_destroy(&mut self, now: Timestamp) {
        if self.needs_destroy() {
            self.state = CredentialState::Destroying;
            self.next_attempt_at = Some(now);
        }
    }

    pub(crate) fn mark_destroyed(&mut self, now: Timestamp) {
        self.state = CredentialState::Destroyed;
        self.destroyed_at = Some(now);
        self.next_attempt_at = None;
        self.last_error = None;
    }

    /// Backoff after the n-th failure: 1, 2, 4 … seconds, at most [`MAX_BACKOFF_SECS`].
    pub fn backoff_secs(attempts: u32) -> u64 {
        1u64.checked_shl(attempts.saturating_sub(1))
            .unwrap_or(MAX_BACKOFF_SECS)
            .min(MAX_BACKOFF_SECS)
    }

    pub(crate) fn mark_failed(&mut self, now: Timestamp, error: &str) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = Some(error.to_owned());
        self.next_attempt_at = Some(now.plus_secs(Self::backoff_secs(self.attempts)));
    }
}
