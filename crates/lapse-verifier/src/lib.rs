//! Verifying Lapse access tokens where they are used.
//!
//! One call, [`Verifier::verify`], answers allow (with the token's claims) or a
//! typed [`Denial`]: the token's signature against the broker's JWKS (fetched,
//! cached, refetched on an unknown `kid` so key rotation needs no restart), issuer,
//! lifetime, audience, the action needed, the DPoP proof of this very request
//! (`htm`, `htu`, `iat` window, `ath`, `jti` replay, key = `cnf.jkt`), and the
//! grant's revocation state as learnt from the broker's revocation feed
//! ([`Verifier::follow`]). If the feed has been silent for longer than the
//! staleness bound, the verifier fails closed, or asks the broker's introspection
//! endpoint, as configured.

mod batch;
mod denial;
pub mod nonce;
mod verifier;

pub use batch::{Batcher, MAX_BATCH};
pub use denial::Denial;
pub use verifier::feed::FeedEntry;
pub use verifier::{Allowed, OnStale, Request, Verifier, VerifierConfig, VerifierError};
