//! The vocabulary of Lapse and the pure rules that connect it.
//!
//! Nothing in this crate performs I/O or reads the wall clock directly: time is
//! injected through [`Clock`], so every rule here (TTL capping, renewal limits,
//! lifecycle transitions) can be tested exhaustively and deterministically.

pub mod approval;
pub mod clock;
pub mod credential;
pub mod duration;
pub mod grant;
pub mod ids;
pub mod request;
pub mod review;
pub mod table;
pub mod tools;
pub mod ttl;

pub use approval::{Approval, Approved, Narrowing};
pub use clock::{Clock, FakeClock, SystemClock, Timestamp};
pub use credential::{CredentialState, ProviderCredential};
pub use duration::{DurationParseError, TtlDuration};
pub use grant::{EndReason, Grant, GrantState, LifecycleError};
pub use ids::{GrantId, IdParseError};
pub use request::{
    AccessRequest, Decision, DecisionOutcome, RequestContext, Task, WorkloadIdentity,
};
pub use review::{Review, Verdict};
pub use tools::{ToolCall, ToolDecl, ToolSet, Violation};
