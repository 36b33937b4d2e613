//! Audit entries as the broker writes them, and reading the chain back whole
//! against its signed checkpoint.

use lapse_core::{Decision, Grant, GrantId, Timestamp};
use lapse_keyring::KeyRing;
use lapse_store::{AuditEvent, Store, VerifyReport};
use serde_json::{Value, json};

pub fn event(
    at: Timestamp,
    kind: &str,
    grant: Option<&GrantId>,
    actor: &str,
    data: Value,
) -> AuditEvent {
    AuditEvent {
        at: at.millis(),
        kind: kind.to_owned(),
        grant_id: grant.map(ToString::to_string),
        actor: actor.to_owned(),
        data,
    }
}

pub fn issued_data(grant: &Grant, decision: &Decision, now: Timestamp) -> Value {
    json!({
        "jti": grant.token_jti,
        "jkt": grant.jkt,
        "audience": grant.request.audience,
        "scope": grant.actions.join(" "),
        "task": grant.request.task.id,
        "ttl": grant.remaining_secs(now),
        "expires_at": grant.expires_at,
        "max_expires_at": grant.max_expires_at,
        "policies": decision.policies,
        "break_glass": grant.request.context.break_glass,
    })
}

/// Verifies the whole audit chain in the store against the signed checkpoint.
pub async fn verify_audit(
    store: &dyn Store,
    keys: &KeyRing,
) -> Result<VerifyReport, lapse_store::StoreError> {
    verify_audit_visiting(store, keys, |_| {}).await
}

/// [`verify_audit`], showing every entry to `visit` on the way, so a caller that
/// also needs the log's content reads it once. Verification stops at the first bad
/// entry; the visit goes on to the end.
pub async fn verify_audit_visiting(
    store: &dyn Store,
    keys: &KeyRing,
    visit: impl FnMut(&lapse_store::AuditEntry),
) -> Result<VerifyReport, lapse_store::StoreError> {
    let mut v = lapse_store::audit::ChainVerifier::new(None);
    let mut visit = visit;
    let checkpoint = read_audit(store, |e| {
        v.push(e);
        visit(e);
    })
    .await?;
    v.set_checkpoint(checkpoint);
    // The checkpoint may be signed by any key the ring ever had.
    Ok(v.finish(|k, m, s| keys.any(k).is_some_and(|p| p.verify(m, s).is_ok())))
}

/// Shows every audit entry to `visit`, in order, then answers the signed
/// checkpoint, read after the entries: every commit appends and re-signs in one
/// transaction, so a checkpoint read later covers at least every entry read, and
/// an entry past it is a tail Lapse did not write. A checkpoint ahead of the
/// entries read means commits landed meanwhile: read on (a few rounds; past them,
/// a checkpoint the log never reaches is a truncation, which verification reports).
pub async fn read_audit(
    store: &dyn Store,
    mut visit: impl FnMut(&lapse_store::AuditEntry),
) -> Result<Option<lapse_store::Checkpoint>, lapse_store::StoreError> {
    let mut after = 0;
    let mut checkpoint = None;
    for _ in 0..4 {
        loop {
            let page = store.audit(after, 5000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            page.iter().for_each(&mut visit);
        }
        checkpoint = store.checkpoint().await?;
        if checkpoint.as_ref().is_none_or(|cp| cp.seq <= after) {
            break;
        }
    }
    Ok(checkpoint)
}
