//! The Lapse broker's domain service: every decision and lifecycle step over the
//! store, the policy bundle, the credential providers and the key ring. No HTTP:
//! `lapse-api` and `lapse-console` call into it; `lapse-server` assembles them.
//!
//! - [`broker`]: [`Lapse`], what every operation shares (store commits, the
//!   operator tokens, the loaded policy, the signing key).
//! - [`exchange`]: authenticate → validate → decide → issue | pend | deny → provision.
//! - [`lifecycle`], [`approvals`], [`delegation`], [`signals`], [`tool_calls`],
//!   [`quarantine`], [`credentials`], [`sweep`]: the rest of a grant's life.
//! - [`report`]: the standing-privilege report; [`audit`]: entries and verification.
//! - [`config`]: `lapse.toml`; [`error`]: [`BrokerError`], in the standards' words.

pub mod approvals;
pub mod audit;
pub mod auth_failures;
pub mod broker;
pub mod config;
pub mod credentials;
pub mod delegation;
pub mod error;
pub mod exchange;
pub mod json;
pub mod leader;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod password;
pub mod proof;
pub mod quarantine;
pub mod report;
pub mod signals;
pub mod sweep;
pub mod tool_calls;

pub use broker::{Lapse, Operator};
pub use error::BrokerError;
pub use exchange::{ExchangeInput, Issued};
