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
    /// Whether `signature` over `message` verifies with key `kid` (any key the
    /// signer knows, current or retired). The writer checks a checkpoint it did not
    /// write itself before it appends after it: it never signs a head it has not
    /// verified.
    fn verifies(&self, kid: &str, message: &[u8], signature: &[u8]) -> bool;
}

/// The signed head a writer appends after, checked against the log's last entry.
///
/// `last` is the last stored entry (`seq`, `hash`); `known` is the head this
/// writer signed itself last (no signature check is needed then). Fails — and the
/// writer must refuse to append — when entries follow the checkpoint (appended
/// behind Lapse's back: signing a new head over them would launder them), when the
/// log ends before it (truncated), when the two disagree, or when the checkpoint's
/// signature does not verify.
pub fn trusted_head(
    checkpoint: Option<&Checkpoint>,
    last: Option<(u64, &str)>,
    known: Option<&(u64, String)>,
    verifies: impl Fn(&str, &[u8], &[u8]) -> bool,
) -> Result<(u64, String), String> {
    let refuse = |why: String| {
        Err(format!(
            "{why}; refusing to append to the audit log (run `lapse audit verify`)"
        ))
    };
    let cp = match checkpoint {
        // A fresh store (the PostgreSQL schema starts with an unsigned row at 0).
        None | Some(Checkpoint { seq: 0, .. }) => {
            return match last {
                None => Ok((0, GENESIS.to_owned())),
                Some((seq, _)) => refuse(format!(
                    "the audit log holds entries up to {seq} but no signed checkpoint"
                )),
            };
        }
        Some(cp) => cp,
    };
    let (cp_seq, cp_hash) = (cp.seq, cp.hash.as_str());
    match last {
        Some((seq, _)) if seq > cp_seq => {
            return refuse(format!(
                "entries {}..={seq} follow the signed checkpoint ({cp_seq}) and were not written by Lapse",
                cp_seq + 1
            ));
        }
        Some((seq, hash)) if seq == cp_seq && hash == cp_hash => {}
        Some((seq, _)) if seq == cp_seq => {
            return refuse(format!(
                "the last entry ({seq}) does not match the signed checkpoint's hash"
            ));
        }
        _ => {
            return refuse(format!(
                "the log ends before the signed checkpoint ({cp_seq}): entries were deleted"
            ));
        }
    }
    if known.is_some_and(|(s, h)| *s == cp_seq && h == cp_hash) {
        return Ok((cp_seq, cp_hash.to_owned()));
    }
    let sig = hex::decode(&cp.signature).unwrap_or_default();
    if verifies(&cp.kid, &checkpoint_message(cp.seq, &cp.hash), &sig) {
        Ok((cp_seq, cp_hash.to_owned()))
    } else {
        refuse(format!(
            "the checkpoint at entry {cp_seq} is not signed by a key of the ring"
        ))
    }
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

    /// The checkpoint to check the chain's end against, when it is read after the
    /// entries (so that a commit between the two reads cannot pass for a forged
    /// tail). Call it after the last [`ChainVerifier::push`].
    pub fn set_checkpoint(&mut self, checkpoint: Option<Checkpoint>) {
        let last = self.last();
        self.at_checkpoint = match &checkpoint {
            Some(cp) if cp.seq == last && last > 0 => Some(self.prev.clone()),
            _ => None,
        };
        self.checkpoint = checkpoint;
    }

    /// The sequence number of the last entry pushed (0 before any).
    pub fn last(&self) -> u64 {
        self.expected_seq - 1
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
                    } else if cp.seq < last {
                        // Every commit re-signs the head in the transaction that
                        // appends: a tail no checkpoint covers was written behind
                        // Lapse's back (or read before the checkpoint was: callers
                        // read the checkpoint after the entries).
                        self.first_bad = Some((
                            cp.seq + 1,
                            format!(
                                "entries {}..={last} follow the signed checkpoint ({}): they are not signed, and Lapse did not write them",
                                cp.seq + 1,
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

/// Verifies a chain end to end. Read the checkpoint after the entries: an entry
/// past it is reported as an unsigned tail.
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

/// The last line of an export (`lapse audit export`): the signed checkpoint the
/// entries above it end at. Every other line is one [`AuditEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportTrailer {
    pub checkpoint: Option<Checkpoint>,
}

/// Verifies an export offline: its entries as a chain, ending at the checkpoint of
/// its last line, signed by a key `verify_sig` knows (take the keys from a source
/// other than the export). A line that is neither, or a missing trailer (a cut-off
/// export), is an error naming the line.
pub fn verify_export(
    text: &str,
    verify_sig: impl Fn(&str, &[u8], &[u8]) -> bool,
) -> Result<VerifyReport, String> {
    let mut v = ChainVerifier::new(None);
    let mut trailer = None;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if trailer.is_some() {
            return Err(format!(
                "line {}: the checkpoint line must be the last",
                i + 1
            ));
        }
        if line.starts_with("{\"checkpoint\"") {
            let t: ExportTrailer = serde_json::from_str(line)
                .map_err(|e| format!("line {}: not a checkpoint: {e}", i + 1))?;
            trailer = Some(t);
        } else {
            let e: AuditEntry = serde_json::from_str(line)
                .map_err(|e| format!("line {}: not an audit entry: {e}", i + 1))?;
            v.push(&e);
        }
    }
    let Some(trailer) = trailer else {
        return Err(
            "no checkpoint line: the export is cut off, or older than checkpoints in exports"
                .into(),
        );
    };
    v.set_checkpoint(trailer.checkpoint);
    Ok(v.finish(verify_sig))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn cp(seq: u64, hash: &str, signature: &str) -> Checkpoint {
        Checkpoint {
            seq,
            hash: hash.into(),
            kid: "k".into(),
            signature: signature.into(),
            at: 0,
        }
    }

    /// Signatures are the hex of "ok" in these cases.
    fn good(_: &str, _: &[u8], s: &[u8]) -> bool {
        s == b"ok"
    }

    #[test]
    fn a_writer_appends_only_after_a_signed_head_that_ends_the_log() {
        let ok = hex::encode("ok");
        let signed = cp(3, "h3", &ok);
        // The log ends at the signed head: append after it.
        assert_eq!(
            trusted_head(Some(&signed), Some((3, "h3")), None, good),
            Ok((3, "h3".into()))
        );
        // A fresh store, with or without the unsigned genesis row.
        assert_eq!(
            trusted_head(None, None, None, good),
            Ok((0, GENESIS.into()))
        );
        assert_eq!(
            trusted_head(Some(&cp(0, GENESIS, "")), None, None, good),
            Ok((0, GENESIS.into()))
        );
        let refused = |r: Result<(u64, String), String>, what: &str| {
            let e = r.err().unwrap_or_else(|| panic!("accepted: {what}"));
            assert!(e.contains("refusing to append"), "{e}");
            e
        };
        let e = refused(
            trusted_head(Some(&signed), Some((4, "h4")), None, good),
            "a tail",
        );
        assert!(e.contains("entries 4..=4 follow"), "{e}");
        refused(
            trusted_head(Some(&signed), Some((2, "h2")), None, good),
            "a truncated log",
        );
        refused(
            trusted_head(Some(&signed), None, None, good),
            "an emptied log",
        );
        refused(
            trusted_head(Some(&signed), Some((3, "other")), None, good),
            "a last entry that is not the signed one",
        );
        refused(
            trusted_head(None, Some((1, "h1")), None, good),
            "entries without a checkpoint",
        );
        refused(
            trusted_head(Some(&cp(0, GENESIS, "")), Some((1, "h1")), None, good),
            "entries after the genesis row",
        );
        let e = refused(
            trusted_head(Some(&cp(3, "h3", "bad")), Some((3, "h3")), None, good),
            "a bad signature",
        );
        assert!(e.contains("not signed by a key"), "{e}");
        // The head this writer signed itself needs no second check...
        let known = (3, "h3".to_owned());
        assert_eq!(
            trusted_head(
                Some(&cp(3, "h3", "bad")),
                Some((3, "h3")),
                Some(&known),
                good
            ),
            Ok((3, "h3".into()))
        );
        // ...but it vouches for nothing else.
        refused(
            trusted_head(Some(&signed), Some((4, "h4")), Some(&known), good),
            "a tail after the known head",
        );
    }

    #[test]
    fn a_tail_past_the_checkpoint_read_after_it_does_not_verify() {
        let mut prev = GENESIS.to_owned();
        let mut entries = Vec::new();
        for seq in 1..=3 {
            let hash = entry_hash(seq, 0, "k", None, "a", "{}", &prev);
            entries.push(AuditEntry {
                seq,
                at: 0,
                kind: "k".into(),
                grant_id: None,
                actor: "a".into(),
                data: "{}".into(),
                prev_hash: prev.clone(),
                hash: hash.clone(),
            });
            prev = hash;
        }
        let ok = hex::encode("ok");
        let at = |n: usize| cp(n as u64, &entries[n - 1].hash, &ok);
        assert!(verify(&entries, Some(&at(3)), good).ok());
        let r = verify(&entries, Some(&at(2)), good);
        let (seq, why) = r.first_bad.unwrap();
        assert_eq!(seq, 3);
        assert!(why.contains("follow the signed checkpoint"), "{why}");
        // The same when the checkpoint is set after the entries were pushed.
        let mut v = ChainVerifier::new(None);
        for e in &entries {
            assert!(v.push(e));
        }
        v.set_checkpoint(Some(at(3)));
        assert!(v.finish(good).ok());
    }
}
