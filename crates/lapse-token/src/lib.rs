//! JOSE for Lapse, built on audited primitives (ed25519-dalek, p256, rsa, sha2).
//!
//! The one rule this crate enforces everywhere: a token is [`jws::Unverified`] until
//! its signature has been checked against a key chosen *before* looking at the
//! header's claims about itself, and the algorithm must be the one that key is for.
//! `alg: none`, HMAC algorithms and anything else not listed in [`jws::Alg`] do not
//! parse, so they can never be confused with a public-key algorithm.

pub mod access;
mod alg;
pub mod b64;
pub mod dpop;
mod error;
pub mod jwk;
pub mod jws;
pub mod replay;
pub mod signing;

pub use access::{AccessClaims, Confirmation, DecisionContext};
pub use dpop::{DpopKey, DpopProof, DpopRequirements};
pub use error::{DpopFault, TokenError};
pub use jwk::{Jwk, PublicKey};
pub use replay::ReplayCache;
pub use signing::SigningKey;
