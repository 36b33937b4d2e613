//! Lapse's HTTP surface: thin axum handlers over `lapse-broker`.
//!
//! - [`http`]: the router (OAuth endpoints, the /v1 API, health, metrics) and its
//!   middleware (limits, metrics, the record of refused operator tokens).
//! - [`error`]: [`ApiError`], the one place an error becomes an HTTP answer.
//! - [`feed`]: the revocation feed (server-sent events) gates follow.
//! - `openapi`: the OpenAPI document served at `/openapi.json`.

// The OpenAPI document is one `json!` literal, deeper than the default limit.
#![recursion_limit = "256"]

pub mod error;
mod extract;
pub mod feed;
pub mod http;
mod openapi;

pub use error::ApiError;
pub use http::router;
