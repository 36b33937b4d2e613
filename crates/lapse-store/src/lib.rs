//! The store: the single source of truth for grants and the audit log.
//!
//! Every write goes through [`Store::commit`], which applies grant changes and
//! appends their audit events in one transaction: either both are durable or
//! neither is. That is how "no credential without its audit record" is kept —
//! callers hand out a credential only after `commit` returned.

pub mod audit;
mod batch;
mod error;
mod feed;
mod filter;
mod keyring;
pub mod postgres;
mod quarantine;
mod redact;
pub mod sqlite;
mod store;

pub use audit::{AuditEntry, AuditEvent, AuditSigner, Checkpoint, VerifyReport};
pub use batch::{GrantWrite, Nonce, WriteBatch};
pub use error::StoreError;
pub use feed::FeedEntry;
pub use filter::{CursorParseError, GrantCursor, GrantFilter};
pub use keyring::KeyRecord;
pub use postgres::PgStore;
pub use quarantine::{Quarantine, QuarantineChange};
pub use redact::redact_url;
pub use sqlite::SqliteStore;
pub use store::Store;

use std::sync::Arc;

/// Opens the store a config names: `sqlite://PATH` or `postgres://…`.
pub async fn open(
    url: &str,
    signer: Arc<dyn AuditSigner>,
    busy_timeout: std::time::Duration,
) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let store = SqliteStore::open(std::path::Path::new(path), signer, busy_timeout).await?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::open(url, signer, busy_timeout).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported store URL `{}`: expected sqlite://PATH or postgres://…",
            redact_url(url)
        )))
    }
}
