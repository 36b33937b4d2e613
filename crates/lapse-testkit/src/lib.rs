//! Test-only helpers. Panics are the point here: a helper that cannot build its
//! fixture fails the test that asked for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod pg;
pub mod pki;
pub mod process;
pub mod redis;
