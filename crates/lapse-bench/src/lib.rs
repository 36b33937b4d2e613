//! Benchmarks for Lapse. `cargo run --release -p lapse-bench -- --help`.
//!
//! - [`policies`]: a synthetic 100-policy set shaped like a real organisation's, and
//!   requests against it.
//! - [`http`]: a minimal HTTP/1.1 keep-alive client, so the client spends as little
//!   of the shared two cores as possible and the numbers are the server's.
//! - [`stats`]: latency histograms and the report lines.

pub mod http;
pub mod policies;
pub mod stats;
