//! The audit log: each entry carries the hash of the one before, and the head of the
//! chain is signed at every commit.
//!
//! `verify` detects an edited entry (its hash no longer matches), a deleted or
//! inserted one (a gap or a broken link), a reordered pair (broken links), and a
//! truncated tail or a recomputed chain (the signed checkpoint no longer matches).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a caller appends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Milliseconds since the epoch.
    pub at: i64,
    /// e.g. `access.decided`, `grant.issued`, `grant.revoked`.
    pub kind: String,
    pub grant_id: Option<String>,
    /// Who caused it: a workload URI, an operator name, or `lapse`.
    pub actor: String,
    /// Event details. Never a secret: tokens appear only as their `jti` or a hash.
    pub data: serde_json::Value,
}

/// An appended entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: i64,
    pub kind: String,
    pub grant_id: Option<String>,
    pub actor: String,
    /// The event data exactly as hashed (JSON text).
    pub data: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash that precedes the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 over an unambiguous JSON array of every field and the previous hash.
pub fn entry_hash(
    seq: u64,
    at: i64,
    kind: &str,
    grant_id: Option<&str>,
    actor: &str,
    data: &str,
    prev: &str,
) -> String {
    let canonical =
        serde_json::to_string(&(seq, at, kind, grant_id, actor, data, prev)).unwrap_or_default();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// The signed head of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub kid: String,
    /// Hex signature over [`checkpoint_message`].
    pub signature: String,
    pub at: i64,
}

pub fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("lapse-audit-checkpoint:{seq}:{hash}").into_bytes()
}

/// Signs checkpoints. The server's signing key implements it; the store never sees
/// the key itself.
pub trait AuditSigner: Send + Sync + 'static {
    /// Signs with the key that signs now: its key id and the signature (one call,
    /// so a key rotation cannot fall between them).
    fn sign(&self, message: &[u8]) -> (String, Vec<u8>);
}

/// The result of verifying a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub entries: u64,
    pub head: Option<String>,
    /// The first bad entry and why, or `None` when the chain verifies.
    pub first_bad: Option<(u64, String)>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Walks a chain incrementally.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_seq: u64,
    prev: String,
    entries: u64,
    first_bad: Option<(u64, String)>,
    checkpoint: Option<Checkpoint>,
    /// The chain's hash at the checkpoint's sequence number, once passed.
    at_checkpoint: Option<String>,
}

impl ChainVerifier {
    /// A verifier that also checks the chain passes through `checkpoint`.
    pub fn new(checkpoint: Option<Checkpoint>) -> Self {
        Self {
            expected_seq: 1,
            prev: GENESIS.to_owned(),
            entries: 0,
            first_bad: None,
            checkpoint,
            at_checkpoint: None,
        }
    }

    /// Feeds the next entry; returns false once the chain is known bad.
    pub fn push(&mut self, e: &AuditEntry) -> bool {
        if self.first_bad.is_some() {
            return false;
        }
        self.entries += 1;
        let bad = if e.seq != self.expected_seq {
            Some(format!(
                "expected entry {} but found {} (an entry was deleted, inserted or moved)",
                self.expected_seq, e.seq
            ))
        } else if e.prev_hash != self.prev {
            Some("its previous-hash link does not match the entry before it (entries were reordered, inserted or deleted)".to_owned())
        } else if entry_hash(
            e.seq,
            e.at,
            &e.kind,
            e.grant_id.as_deref(),
            &e.actor,
            &e.data,
            &e.prev_hash,
        ) != e.hash
        {
            Some("its content does not match its hash (the entry was edited)".to_owned())
        } else {
            None
        };
        if let Some(why) = bad {
            self.first_bad = Some((e.seq.min(self.expected_seq), why));
            return false;
        }
        self.expected_seq += 1;
        self.prev = e.hash.clone();
        if self.checkpoint.as_ref().is_some_and(|cp| cp.seq == e.seq) {
            self.at_checkpoint = Some(e.hash.clone());
        }
        true
    }

    /// Checks the end of the chain against the signed checkpoint.
    pub fn finish(mut self, verify_sig: impl Fn(&str, &[u8], &[u8]) -> bool) -> VerifyReport {
        let last = self.expected_seq - 1;
        let checkpoint = self.checkpoint.take();
        let checkpoint = checkpoint.as_ref();
        if self.first_bad.is_none() {
            match checkpoint {
                None if last > 0 => {
                    self.first_bad = Some((last, "the signed checkpoint is missing".into()));
                }
                None => {}
                Some(cp) => {
                    let sig = hex::decode(&cp.signature).unwrap_or_default();
                    if !verify_sig(&cp.kid, &checkpoint_message(cp.seq, &cp.hash), &sig) {
                        self.first_bad =
                            Some((cp.seq, "the checkpoint signature does not verify".into()));
                    } else if cp.seq > last {
                        self.first_bad = Some((
                            last + 1,
                            format!(
                                "the log ends at entry {last} but the signed checkpoint covers {} (entries were deleted from the end)",
                                cp.seq
                            ),
                        ));
                    } else if self.at_checkpoint.as_deref() != Some(cp.hash.as_str()) {
                        self.first_bad = Some((cp.seq, "the chain does not pass through the signed checkpoint's hash (the chain was rewritten)".into()));
                    }
                }
            }
        }
        VerifyReport {
            entries: self.entries,
            head: (last > 0).then_some(self.prev),
            first_bad: self.first_bad,
        }
    }
}

/// Verifies a chain end to end. Entries past the checkpoint (appended after it was
/// read) are checked by their links only.
pub fn verify<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
    checkpoint: Option<&Checkpoint>,
    verify_sig: impl Fn(&str, &[u8], &[u8]) -> bool,
) -> VerifyReport {
    let mut v = ChainVerifier::new(checkpoint.cloned());
    for e in entries {
        if !v.push(e) {
            break;
        }
    }
    v.finish(verify_sig)
}
