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
    /// A leader-only write from a term that has ended: another process took the
    /// lease over (or this one lost it) since the write's fence was issued.
    #[error("leader term {0} has ended; the write was refused")]
    Fenced(u64),
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
