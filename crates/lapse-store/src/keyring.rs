//! The signing key ring as the store keeps it.

/// One key of the signing key ring as stored. The store never sees a private key
/// in the clear: `sealed` is encrypted by the broker with its key-encryption key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    pub kid: String,
    pub alg: String,
    /// The public key (raw bytes, as the algorithm defines them).
    pub public: Vec<u8>,
    /// The private key, sealed (AEAD) under the key-encryption key.
    pub sealed: Vec<u8>,
    /// ms since the epoch.
    pub created_at: i64,
    /// From when it signs (it is published from `created_at`).
    pub activates_at: i64,
    /// From when it is no longer published; `None` while in use.
    pub retires_at: Option<i64>,
}

/// Whether two lists of key ids hold the same ids.
pub(crate) fn same_kids(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort();
    b.sort();
    a == b
}
