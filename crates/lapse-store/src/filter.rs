//! Which grants a listing asks for, and where a page of them starts.

use lapse_core::{Grant, GrantId, GrantState, Timestamp};

#[derive(Debug, Clone, Default)]
pub struct GrantFilter {
    pub state: Option<GrantState>,
    pub workload: Option<String>,
    pub task: Option<String>,
    pub audience: Option<String>,
    /// Only grants older than this one, in the list's newest-first order (keyset
    /// paging: stable while new grants arrive).
    pub before: Option<GrantCursor>,
    pub limit: usize,
}

/// A position in the newest-first order of grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantCursor {
    pub created_at: Timestamp,
    pub id: GrantId,
}

impl GrantCursor {
    pub fn of(g: &Grant) -> Self {
        Self {
            created_at: g.created_at,
            id: g.id,
        }
    }
}

/// `CREATED_MS.ID`: how a cursor travels in `?before=` (API, console, CLI).
impl std::fmt::Display for GrantCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at.millis(), self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a paging cursor (expected `CREATED_MS.GRANT_ID`)")]
pub struct CursorParseError(String);

impl std::str::FromStr for GrantCursor {
    type Err = CursorParseError;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = || CursorParseError(raw.chars().take(80).collect());
        let (ms, id) = raw.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            created_at: Timestamp::from_millis(ms.parse().map_err(|_| bad())?),
            id: id.parse().map_err(|_| bad())?,
        })
    }
}
