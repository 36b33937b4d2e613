//! Cedar policy for Lapse.
//!
//! - [`schema`]: the base schema Lapse contributes (`Workload`, `Resource`,
//!   `RequestContext`), merged at load with the folder's `*.cedarschema` fragments.
//! - [`bundle`]: a validated, indexed policy set loaded from a folder. Loading is the
//!   only I/O here; everything after it is pure.
//! - [`decide`](bundle::PolicyBundle::decide): `decide(&request) -> Decision`, a
//!   function of the request (which carries the time) and the bundle, nothing else.
//! - [`cases`]: policy test files (`lapse policy test FILE`).

pub mod bundle;
pub mod cases;
mod error;
mod index;
pub mod schema;

pub use bundle::{PolicyBundle, PolicyInfo, SourceFile};
pub use error::PolicyError;
