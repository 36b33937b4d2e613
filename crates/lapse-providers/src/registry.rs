//! The catalog: every provider kind Lapse knows, by its `lapse.toml` table. The
//! broker, the reconciler, the sweeper and the standing report work through
//! [`CredentialProvider`] and know no provider by name; this is the one place
//! that does. A new kind is a module beside `postgres` and one variant here.

use crate::{CredentialProvider, ProviderError};
use std::collections::HashSet;
use std::sync::Arc;

/// One provider table of `lapse.toml` (`[[postgres]]`, …), whatever its kind.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    Postgres(crate::postgres::PostgresConfig),
    Mysql(crate::mysql::MysqlConfig),
    Redis(crate::redis::RedisConfig),
}

impl ProviderConfig {
    /// The table's name in `lapse.toml`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Mysql(_) => "mysql",
            Self::Redis(_) => "redis",
        }
    }

    /// The audience whose grants get a credential from it.
    pub fn audience(&self) -> &str {
        match self {
            Self::Postgres(c) => &c.audience,
            Self::Mysql(c) => &c.audience,
            Self::Redis(c) => &c.audience,
        }
    }

    /// Checks the table by itself (not the target: see [`CredentialProvider::prepare`]).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Postgres(c) => c.validate(),
            Self::Mysql(c) => c.validate(),
            Self::Redis(c) => c.validate(),
        }
    }

    /// The provider; connects lazily, so a target that is down does not stop the start.
    pub fn build(&self) -> Result<Arc<dyn CredentialProvider>, ProviderError> {
        Ok(match self {
            Self::Postgres(c) => Arc::new(crate::postgres::PostgresProvider::new(c.clone())?),
            Self::Mysql(c) => Arc::new(crate::mysql::MysqlProvider::new(c.clone())?),
            Self::Redis(c) => Arc::new(crate::redis::RedisProvider::new(c.clone())?),
        })
    }
}

/// Checks every table: its audience is one of `audiences`, no audience has two
/// providers (of any kinds), and each table is valid. The error names the table.
pub fn validate(tables: &[ProviderConfig], audiences: &HashSet<&str>) -> Result<(), String> {
    let mut seen: HashSet<&str> = HashSet::new();
    for t in tables {
        let (kind, audience) = (t.kind(), t.audience());
        if !audiences.contains(audience) {
            return Err(format!(
                "[[{kind}]] audience `{audience}` is not declared in [[audience]]"
            ));
        }
        if !seen.insert(audience) {
            return Err(format!(
                "audience `{audience}` has two provider tables ([[{kind}]] is the second)"
            ));
        }
        t.validate()
            .map_err(|e| format!("[[{kind}]] `{audience}`: {e}"))?;
    }
    Ok(())
}
