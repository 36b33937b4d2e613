//! Why a gate cannot start: its own module so that `config` (which reports
//! these) and the root (which returns them) need not import each other.

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Verifier(#[from] lapse_verifier::VerifierError),
    #[error("{0}")]
    Config(String),
}
