//! The revocation feed's entries.

/// One grant ending on the revocation feed: a grant that was active and is now
/// completed, revoked or expired. Gates keep it until `exp` (the grant's maximum
/// lifetime, which caps every token it ever had), after which the tokens are dead.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedEntry {
    /// Gap-free, in commit order.
    pub seq: u64,
    /// When the grant ended (ms).
    pub at: i64,
    pub grant_id: String,
    pub state: String,
    pub audience: String,
    /// The most recent token's `jti`.
    pub jti: Option<String>,
    /// The grant's maximum lifetime (ms): no token of it is valid after.
    pub exp: i64,
    pub reason: String,
}
