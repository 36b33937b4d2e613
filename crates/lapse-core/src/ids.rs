//! Identifiers. Grant ids are UUIDv7 (time-ordered, so store indexes stay append-mostly)
//! with a readable prefix so a grant id is never confused with another kind of id.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(uuid::Uuid);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid grant id `{0}`: expected `gr_` followed by 32 hex digits")]
pub struct IdParseError(pub String);

impl GrantId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gr_{}", self.0.simple())
    }
}

impl FromStr for GrantId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("gr_")
            .ok_or_else(|| IdParseError(truncate(s)))?;
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdParseError(truncate(s)));
        }
        uuid::Uuid::parse_str(hex)
            .map(Self)
            .map_err(|_| IdParseError(truncate(s)))
    }
}

/// Error messages echo user input; keep what they echo short.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

impl Serialize for GrantId {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GrantId {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = String::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_foreign_ids() {
        let id = GrantId::generate();
        assert_eq!(id.to_string().parse::<GrantId>(), Ok(id));
        assert!("gr_xyz".parse::<GrantId>().is_err());
        assert!(
            "0190f0a0b0c0d0e0f000000000000000"
                .parse::<GrantId>()
                .is_err()
        );
    }
}
