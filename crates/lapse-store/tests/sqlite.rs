#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::type_complexity
)]
//! Store contract and audit tamper-evidence, against the real SQLite backend.

use lapse_core::grant::NewGrant;
use lapse_core::{
    AccessRequest, Grant, GrantId, GrantState, RequestContext, Task, Timestamp, WorkloadIdentity,
};
use lapse_store::audit::{self, AuditEvent};
use lapse_store::{
    AuditSigner, GrantFilter, GrantWrite, SqliteStore, Store, StoreError, WriteBatch,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

struct Signer(lapse_token::SigningKey);
impl AuditSigner for Signer {
    fn kid(&self) -> String {
        self.0.kid().to_owned()
    }
    fn sign(&self, m: &[u8]) -> Vec<u8> {
        self.0.sign(m)
    }
}

fn grant(now: i64) -> Grant {
    let req = AccessRequest {
        workload: WorkloadIdentity {
            id: "spiffe://t/w".into(),
            issuer: "i".into(),
            subject: "w".into(),
            claims: BTreeMap::new(),
        },
        task: Task {
            id: "T".into(),
            purpose: "p".into(),
            ticket: String::new(),
        },
        audience: "a".into(),
        actions: vec!["read".into()],
        requested_ttl_secs: 60,
        context: RequestContext {
            environment: String::new(),
            source: [127, 0, 0, 1].into(),
            time: Timestamp::from_unix_seconds(now),
            break_glass: false,
        },
    };
    Grant::issue(
        NewGrant {
            id: GrantId::generate(),
            request: req,
            policies: vec![],
            ttl_cap_secs: None,
            jkt: "k".into(),
            now: Timestamp::from_unix_seconds(now),
            server_max_ttl_secs: 600,
            max_lifetime_secs: 600,
        },
        "jti".into(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn event(kind: &str, g: &Grant) -> AuditEvent {
    AuditEvent {
        at: 1,
        kind: kind.into(),
        grant_id: Some(g.id.to_string()),
        actor: "t".into(),
        data: serde_json::json!({"n": 1}),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    key: lapse_token::SigningKey,
    store: SqliteStore,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("lapse.db");
    let key = lapse_token::SigningKey::generate();
    let store = SqliteStore::open(
        &path,
        Arc::new(Signer(key.clone())),
        Duration::from_millis(300),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    Fixture {
        _dir: dir,
        path,
        key,
        store,
    }
}

async fn verify(f: &Fixture) -> audit::VerifyReport {
    let entries = f
        .store
        .audit(0, 1_000_000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cp = f.store.checkpoint().await.unwrap_or_else(|e| panic!("{e}"));
    let public = f.key.public().clone();
    audit::verify(&entries, cp.as_ref(), |_, m, s| public.verify(m, s).is_ok())
}

async fn seed(f: &Fixture, n: usize) {
    for _ in 0..n {
        let g = grant(1000);
        f.store
            .commit(WriteBatch {
                events: vec![event("access.decided", &g), event("grant.issued", &g)],
                grants: vec![GrantWrite::Insert(g)],
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test]
async fn grants_and_events_commit_together() -> Result<(), StoreError> {
    let f = fixture().await;
    let g = grant(1000);
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(g.clone())],
            events: vec![event("grant.issued", &g)],
        })
        .await?;
    assert_eq!(f.store.grant(g.id).await?, Some(g.clone()));
    // A stale update is refused and its audit event is not written either.
    let ended = g
        .clone()
        .complete(Timestamp::from_unix_seconds(1010), "w", "done")
        .unwrap_or_else(|e| panic!("{e}"));
    let stale = GrantWrite::Update {
        grant: ended.clone(),
        expected_version: 99,
    };
    assert!(matches!(
        f.store
            .commit(WriteBatch {
                grants: vec![stale],
                events: vec![event("grant.completed", &g)]
            })
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(f.store.audit(0, 100).await?.len(), 1);
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: ended,
                expected_version: g.version,
            }],
            events: vec![event("grant.completed", &g)],
        })
        .await?;
    assert_eq!(
        f.store.grant(g.id).await?.map(|g| g.state),
        Some(GrantState::Completed)
    );
    // A duplicate insert is refused.
    assert!(matches!(
        f.store
            .commit(WriteBatch {
                grants: vec![GrantWrite::Insert(g.clone())],
                events: vec![]
            })
            .await,
        Err(StoreError::Duplicate(_))
    ));
    assert!(verify(&f).await.ok());
    Ok(())
}

#[tokio::test]
async fn due_lists_live_grants_past_expiry_only() -> Result<(), StoreError> {
    let f = fixture().await;
    let g = grant(1000); // expires at 1060
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(g.clone())],
            events: vec![],
        })
        .await?;
    assert!(
        f.store
            .due(Timestamp::from_unix_seconds(1059), 10)
            .await?
            .is_empty()
    );
    assert_eq!(
        f.store
            .due(Timestamp::from_unix_seconds(1060), 10)
            .await?
            .len(),
        1
    );
    let filtered = f
        .store
        .grants(GrantFilter {
            state: Some(GrantState::Active),
            ..Default::default()
        })
        .await?;
    assert_eq!(filtered.len(), 1);
    Ok(())
}

#[tokio::test]
async fn concurrent_commits_form_one_chain() -> Result<(), StoreError> {
    let f = Arc::new(fixture().await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let g = grant(1000);
            f.store
                .commit(WriteBatch {
                    events: vec![event("grant.issued", &g)],
                    grants: vec![GrantWrite::Insert(g)],
                })
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{e}"))?;
    }
    let r = verify(&f).await;
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.entries, 200);
    Ok(())
}

#[tokio::test]
async fn survives_reopen() -> Result<(), StoreError> {
    let f = fixture().await;
    seed(&f, 3).await;
    drop(f.store);
    let store = SqliteStore::open(
        &f.path,
        Arc::new(Signer(f.key.clone())),
        Duration::from_millis(300),
    )
    .await?;
    let g = grant(1000);
    store
        .commit(WriteBatch {
            events: vec![event("grant.issued", &g)],
            grants: vec![GrantWrite::Insert(g)],
        })
        .await?;
    let f2 = Fixture { store, ..f };
    let r = verify(&f2).await;
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.entries, 7);
    Ok(())
}

/// Each kind of tampering, done with a separate SQLite connection as an attacker
/// with file access would, is detected and the first bad entry named.
#[tokio::test]
async fn every_kind_of_tampering_is_detected() {
    let cases: &[(&str, &str, u64)] = &[
        (
            "edit",
            "UPDATE audit SET actor = 'someone-else' WHERE seq = 3",
            3,
        ),
        ("delete", "DELETE FROM audit WHERE seq = 4", 4),
        (
            "insert",
            "UPDATE audit SET seq = seq + 1000 WHERE seq >= 5; UPDATE audit SET seq = seq - 999 WHERE seq >= 1000; INSERT INTO audit SELECT 5, at, kind, grant_id, actor, data, prev_hash, hash FROM audit WHERE seq = 2",
            5,
        ),
        (
            "reorder",
            "UPDATE audit SET seq = -5 WHERE seq = 5; UPDATE audit SET seq = 5 WHERE seq = 6; UPDATE audit SET seq = 6 WHERE seq = -5",
            5,
        ),
        ("truncate", "DELETE FROM audit WHERE seq >= 7", 7),
        ("drop checkpoint", "DELETE FROM audit_checkpoint", 8),
    ];
    for (name, sql, first_bad) in cases {
        let f = fixture().await;
        seed(&f, 4).await; // 8 entries
        assert!(verify(&f).await.ok());
        let c = rusqlite::Connection::open(&f.path).unwrap_or_else(|e| panic!("{e}"));
        c.execute_batch(sql)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        drop(c);
        let r = verify(&f).await;
        let (seq, why) = r
            .first_bad
            .clone()
            .unwrap_or_else(|| panic!("{name} was not detected"));
        assert_eq!(seq, *first_bad, "{name}: {why}");
    }
}

/// Recomputing every hash after an edit makes the links consistent again; the signed
/// checkpoint still exposes it.
#[tokio::test]
async fn a_recomputed_chain_is_caught_by_the_checkpoint() {
    let f = fixture().await;
    seed(&f, 3).await;
    let c = rusqlite::Connection::open(&f.path).unwrap_or_else(|e| panic!("{e}"));
    c.execute("UPDATE audit SET actor = 'forged' WHERE seq = 2", [])
        .unwrap_or_else(|e| panic!("{e}"));
    let entries = f
        .store
        .audit(0, 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut prev = audit::GENESIS.to_owned();
    for e in &entries {
        let h = audit::entry_hash(
            e.seq,
            e.at,
            &e.kind,
            e.grant_id.as_deref(),
            &e.actor,
            &e.data,
            &prev,
        );
        c.execute(
            "UPDATE audit SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
            rusqlite::params![prev, h, e.seq as i64],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        prev = h;
    }
    drop(c);
    let r = verify(&f).await;
    assert_eq!(r.first_bad.map(|(s, _)| s), Some(6));
}

#[tokio::test]
async fn a_locked_database_fails_closed() {
    let f = fixture().await;
    seed(&f, 1).await;
    let c = rusqlite::Connection::open(&f.path).unwrap_or_else(|e| panic!("{e}"));
    c.execute_batch("BEGIN EXCLUSIVE; INSERT INTO lapse_migrations VALUES (999, 0);")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        f.store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    let g = grant(1000);
    let id = g.id;
    assert!(matches!(
        f.store
            .commit(WriteBatch {
                events: vec![event("grant.issued", &g)],
                grants: vec![GrantWrite::Insert(g)]
            })
            .await,
        Err(StoreError::Unavailable(_))
    ));
    c.execute_batch("ROLLBACK")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        f.store
            .grant(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "nothing half-written"
    );
    assert!(f.store.ping().await.is_ok());
    assert!(verify(&f).await.ok());
}

#[tokio::test]
async fn an_active_grant_that_ends_goes_on_the_feed_once_with_its_commit() -> Result<(), StoreError>
{
    let f = fixture().await;
    let (a, b) = (grant(1000), grant(1000));
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(a.clone()), GrantWrite::Insert(b.clone())],
            events: vec![event("grant.issued", &a), event("grant.issued", &b)],
        })
        .await?;
    assert_eq!(f.store.feed_head().await?, 0);
    let revoked = a
        .clone()
        .revoke(Timestamp::from_unix_seconds(1010), "op", "gone")
        .unwrap_or_else(|e| panic!("{e}"));
    // A conflicting commit writes no feed entry.
    let stale = f
        .store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: revoked.clone(),
                expected_version: 99,
            }],
            events: vec![],
        })
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))));
    assert_eq!(f.store.feed_head().await?, 0);
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: revoked.clone(),
                expected_version: a.version,
            }],
            events: vec![event("grant.revoked", &a)],
        })
        .await?;
    // Writing the ended grant again (a credential destroyed later) adds nothing.
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: revoked.clone(),
                expected_version: revoked.version,
            }],
            events: vec![],
        })
        .await?;
    let completed = b
        .clone()
        .complete(Timestamp::from_unix_seconds(1020), "w", "done")
        .unwrap_or_else(|e| panic!("{e}"));
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: completed,
                expected_version: b.version,
            }],
            events: vec![event("grant.completed", &b)],
        })
        .await?;
    let feed = f.store.feed(0, 100).await?;
    let got: Vec<(u64, String, String, String)> = feed
        .iter()
        .map(|e| (e.seq, e.grant_id.clone(), e.state.clone(), e.reason.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, a.id.to_string(), "revoked".into(), "gone".into()),
            (2, b.id.to_string(), "completed".into(), "done".into()),
        ]
    );
    assert_eq!(feed[0].jti.as_deref(), Some("jti"));
    assert_eq!(feed[0].exp, a.max_expires_at.millis());
    assert_eq!(
        f.store.feed(1, 100).await?.len(),
        1,
        "resume after a sequence number"
    );
    assert_eq!(f.store.feed_head().await?, 2);
    Ok(())
}
