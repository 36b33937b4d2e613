#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or cannot take the operation now. Callers fail
    /// closed: nothing is issued, nothing is reported active.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("grant `{0}` changed concurrently")]
    Conflict(String),
    #[error("grant `{0}` already exists")]
    Duplicate(String),
    /// The batch holds something no backend may store (a NUL character in text:
    /// PostgreSQL refuses it, so neither backend takes it).
    #[error("cannot store: {0}")]
    Invalid(String),
    /// A one-time value (a DPoP proof's `jti`) was already spent.
    #[error("`{0}` was already used")]
    Replay(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store configuration: {0}")]
    Config(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}
