#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::type_complexity
)]
//! The store contract and audit tamper-evidence: one suite, run unchanged against
//! the embedded SQLite backend and against the machine's real PostgreSQL (each
//! case on a database of its own).

use lapse_core::grant::NewGrant;
use lapse_core::{
    AccessRequest, Grant, GrantId, GrantState, RequestContext, Task, Timestamp, WorkloadIdentity,
};
use lapse_store::audit::{self, AuditEvent};
use lapse_store::{
    AuditSigner, GrantFilter, GrantWrite, KeyRecord, Nonce, PgStore, SqliteStore, Store,
    StoreError, WriteBatch,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

struct Signer(lapse_token::SigningKey);
impl AuditSigner for Signer {
    fn sign(&self, m: &[u8]) -> (String, Vec<u8>) {
        (self.0.kid().to_owned(), self.0.sign(m))
    }
    fn verifies(&self, kid: &str, m: &[u8], sig: &[u8]) -> bool {
        kid == self.0.kid() && self.0.public().verify(m, sig).is_ok()
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
            depth: 0,
            tool: None,
        },
        tools: Vec::new(),
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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A database of its own on the machine's PostgreSQL, dropped afterwards.
struct PgDb {
    admin: String,
    name: String,
    url: String,
}

fn pg_admin_url() -> String {
    std::env::var("LAPSE_TEST_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is needed at `{url}` (set LAPSE_TEST_PG_URL; .ci/run starts the local server): {e}")
        });
    tokio::spawn(conn);
    c
}

impl PgDb {
    async fn create() -> Self {
        let admin = pg_admin_url();
        let name = format!("lapse_store_{}", uuid_like());
        pg_connect(&admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Self { admin, name, url }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

fn uuid_like() -> String {
    let n: u64 = rand_u64();
    format!("{n:016x}")
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

async fn open_store(
    path: &std::path::Path,
    pg: Option<&PgDb>,
    key: &lapse_token::SigningKey,
) -> Result<Arc<dyn Store>, StoreError> {
    let signer = Arc::new(Signer(key.clone()));
    let timeout = Duration::from_millis(300);
    Ok(match pg {
        Some(db) => Arc::new(PgStore::open(&db.url, signer, timeout).await?),
        None => Arc::new(SqliteStore::open(path, signer, timeout).await?),
    })
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    pg: Option<PgDb>,
    key: lapse_token::SigningKey,
    store: Arc<dyn Store>,
}

impl Fixture {
    async fn new(kind: Kind) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("lapse.db");
        let key = lapse_token::SigningKey::generate();
        let pg = match kind {
            Kind::Sqlite => None,
            Kind::Postgres => Some(PgDb::create().await),
        };
        let store = open_store(&path, pg.as_ref(), &key)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            _dir: dir,
            path,
            pg,
            key,
            store,
        }
    }

    /// Another handle on the same database: a restarted process, or a second replica.
    async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        open_store(&self.path, self.pg.as_ref(), &self.key).await
    }

    /// Runs SQL on the database behind the store's back, as an attacker with
    /// database access would.
    async fn tamper(&self, sql: &str) {
        match &self.pg {
            Some(db) => pg_connect(&db.url)
                .await
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            None => rusqlite::Connection::open(&self.path)
                .and_then(|c| c.execute_batch(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }
}

/// A session that holds the store's write lock.
enum Lock {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl Lock {
    async fn take(f: &Fixture) -> Self {
        match &f.pg {
            Some(db) => {
                let c = pg_connect(&db.url).await;
                c.batch_execute("BEGIN; LOCK TABLE audit_checkpoint IN ACCESS EXCLUSIVE MODE")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                Lock::Postgres(c)
            }
            None => {
                let c = rusqlite::Connection::open(&f.path).unwrap_or_else(|e| panic!("{e}"));
                c.execute_batch("BEGIN EXCLUSIVE; INSERT INTO lapse_migrations VALUES (999, 0);")
                    .unwrap_or_else(|e| panic!("{e}"));
                Lock::Sqlite(c)
            }
        }
    }

    async fn release(self) {
        match self {
            Lock::Postgres(c) => c
                .batch_execute("ROLLBACK")
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            Lock::Sqlite(c) => c
                .execute_batch("ROLLBACK")
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }
}

async fn verify_store(store: &dyn Store, key: &lapse_token::SigningKey) -> audit::VerifyReport {
    let entries = store
        .audit(0, 1_000_000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cp = store.checkpoint().await.unwrap_or_else(|e| panic!("{e}"));
    let public = key.public().clone();
    audit::verify(&entries, cp.as_ref(), |_, m, s| public.verify(m, s).is_ok())
}

async fn verify(f: &Fixture) -> audit::VerifyReport {
    verify_store(f.store.as_ref(), &f.key).await
}

async fn seed(f: &Fixture, n: usize) {
    for _ in 0..n {
        let g = grant(1000);
        f.store
            .commit(WriteBatch {
                events: vec![event("access.decided", &g), event("grant.issued", &g)],
                grants: vec![GrantWrite::Insert(g)],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

async fn grants_and_events_commit_together(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let g = grant(1000);
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(g.clone())],
            events: vec![event("grant.issued", &g)],
            ..Default::default()
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
                events: vec![event("grant.completed", &g)],
                ..Default::default()
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
            ..Default::default()
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
                events: vec![],
                ..Default::default()
            })
            .await,
        Err(StoreError::Duplicate(_))
    ));
    assert!(verify(&f).await.ok());
    Ok(())
}

async fn due_lists_live_grants_past_expiry_only(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let g = grant(1000); // expires at 1060
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(g.clone())],
            events: vec![],
            ..Default::default()
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

async fn concurrent_commits_form_one_chain(kind: Kind) -> Result<(), StoreError> {
    let f = Arc::new(Fixture::new(kind).await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let g = grant(1000);
            f.store
                .commit(WriteBatch {
                    events: vec![event("grant.issued", &g)],
                    grants: vec![GrantWrite::Insert(g)],
                    ..Default::default()
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

async fn survives_reopen(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    seed(&f, 3).await;
    let Fixture {
        _dir,
        path,
        pg,
        key,
        store,
    } = f;
    drop(store);
    let f = Fixture {
        store: open_store(&path, pg.as_ref(), &key).await?,
        _dir,
        path,
        pg,
        key,
    };
    let store = f.store.clone();
    let g = grant(1000);
    store
        .commit(WriteBatch {
            events: vec![event("grant.issued", &g)],
            grants: vec![GrantWrite::Insert(g)],
            ..Default::default()
        })
        .await?;
    let r = verify(&f).await;
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.entries, 7);
    Ok(())
}

/// Each kind of tampering, done behind the store's back as an attacker with
/// database access would, is detected and the first bad entry named.
async fn every_kind_of_tampering_is_detected(kind: Kind) {
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
        let f = Fixture::new(kind).await;
        seed(&f, 4).await; // 8 entries
        assert!(verify(&f).await.ok());
        f.tamper(sql).await;
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
async fn a_recomputed_chain_is_caught_by_the_checkpoint(kind: Kind) {
    let f = Fixture::new(kind).await;
    seed(&f, 3).await;
    f.tamper("UPDATE audit SET actor = 'forged' WHERE seq = 2")
        .await;
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
        f.tamper(&format!(
            "UPDATE audit SET prev_hash = '{prev}', hash = '{h}' WHERE seq = {}",
            e.seq
        ))
        .await;
        prev = h;
    }
    let r = verify(&f).await;
    assert_eq!(r.first_bad.map(|(s, _)| s), Some(6));
}

async fn a_locked_database_fails_closed(kind: Kind) {
    let f = Fixture::new(kind).await;
    seed(&f, 1).await;
    // Another session holds the write lock and does not let go.
    let lock = Lock::take(&f).await;
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
                grants: vec![GrantWrite::Insert(g)],
                ..Default::default()
            })
            .await,
        Err(StoreError::Unavailable(_))
    ));
    lock.release().await;
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

async fn an_active_grant_that_ends_goes_on_the_feed_once_with_its_commit(
    kind: Kind,
) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let (a, b) = (grant(1000), grant(1000));
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(a.clone()), GrantWrite::Insert(b.clone())],
            events: vec![event("grant.issued", &a), event("grant.issued", &b)],
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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

/// Two handles on one database (two replicas, or two processes on one file)
/// committing at once append to one chain and one gap-free feed.
async fn two_writers_share_one_chain_and_feed(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let other = f.open().await?;
    let stores = [f.store.clone(), other.clone()];
    let mut tasks = Vec::new();
    for i in 0..120 {
        let store = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let g = grant(1000);
            store
                .commit(WriteBatch {
                    events: vec![event("grant.issued", &g)],
                    grants: vec![GrantWrite::Insert(g.clone())],
                    ..Default::default()
                })
                .await?;
            let ended = g
                .clone()
                .revoke(Timestamp::from_unix_seconds(1001), "op", "r")
                .unwrap_or_else(|e| panic!("{e}"));
            store
                .commit(WriteBatch {
                    events: vec![event("grant.revoked", &g)],
                    grants: vec![GrantWrite::Update {
                        grant: ended,
                        expected_version: g.version,
                    }],
                    ..Default::default()
                })
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{e}"))?;
    }
    for s in &stores {
        let r = verify_store(s.as_ref(), &f.key).await;
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.entries, 240);
    }
    let feed = other.feed(0, 1000).await?;
    let seqs: Vec<u64> = feed.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=120).collect::<Vec<u64>>(), "gap-free, one order");
    assert_eq!(f.store.feed_head().await?, 120);
    Ok(())
}

/// A version check cannot race another writer: of two updates from the same
/// version, on different handles, exactly one lands.
async fn a_stale_update_loses_across_writers(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let other = f.open().await?;
    let g = grant(1000);
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(g.clone())],
            ..Default::default()
        })
        .await?;
    let a = g
        .clone()
        .revoke(Timestamp::from_unix_seconds(1001), "a", "a")
        .unwrap_or_else(|e| panic!("{e}"));
    let b = g
        .clone()
        .complete(Timestamp::from_unix_seconds(1001), "b", "b")
        .unwrap_or_else(|e| panic!("{e}"));
    let (ra, rb) = tokio::join!(
        f.store.commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: a,
                expected_version: g.version
            }],
            events: vec![event("grant.revoked", &g)],
            ..Default::default()
        }),
        other.commit(WriteBatch {
            grants: vec![GrantWrite::Update {
                grant: b,
                expected_version: g.version
            }],
            events: vec![event("grant.completed", &g)],
            ..Default::default()
        })
    );
    assert!(
        matches!(
            (&ra, &rb),
            (Ok(()), Err(StoreError::Conflict(_))) | (Err(StoreError::Conflict(_)), Ok(()))
        ),
        "{ra:?} {rb:?}"
    );
    assert_eq!(
        f.store.audit(0, 10).await?.len(),
        1,
        "the loser wrote no audit entry"
    );
    assert_eq!(f.store.feed_head().await?, 1);
    Ok(())
}

/// A spent nonce is refused on any handle, fails its whole batch, and is forgotten
/// only after it expires.
async fn a_nonce_is_spent_once(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let other = f.open().await?;
    let nonce = |v: &str, exp: i64| Nonce {
        value: v.into(),
        expires_at: exp,
    };
    let g = grant(1000);
    f.store
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(g.clone())],
            events: vec![event("grant.issued", &g)],
            nonces: vec![nonce("jti-1", 5_000)],
            ..Default::default()
        })
        .await?;
    let g2 = grant(1000);
    let replayed = other
        .commit(WriteBatch {
            grants: vec![GrantWrite::Insert(g2.clone())],
            events: vec![event("grant.issued", &g2)],
            nonces: vec![nonce("jti-1", 5_000)],
            ..Default::default()
        })
        .await;
    assert!(
        matches!(replayed, Err(StoreError::Replay(ref v)) if v == "jti-1"),
        "{replayed:?}"
    );
    assert_eq!(
        other.grant(g2.id).await?,
        None,
        "nothing of a replayed batch is written"
    );
    assert_eq!(other.audit(0, 10).await?.len(), 1);
    // The same value twice in one batch is a replay too.
    let twice = other
        .commit(WriteBatch {
            nonces: vec![nonce("jti-2", 5_000), nonce("jti-2", 5_000)],
            ..Default::default()
        })
        .await;
    assert!(matches!(twice, Err(StoreError::Replay(_))), "{twice:?}");
    // Spent values can be asked for beforehand, from any writer.
    let mut spent = other
        .spent_nonces(&["jti-2".into(), "jti-1".into(), "jti-9".into()])
        .await?;
    spent.sort();
    assert_eq!(
        spent,
        vec!["jti-1".to_owned()],
        "a failed batch spends nothing"
    );
    assert_eq!(f.store.spent_nonces(&[]).await?, Vec::<String>::new());
    assert_eq!(
        f.store.prune_nonces(Timestamp::from_millis(5_000)).await?,
        0,
        "not expired yet"
    );
    assert_eq!(
        f.store.prune_nonces(Timestamp::from_millis(5_001)).await?,
        1
    );
    other
        .commit(WriteBatch {
            nonces: vec![nonce("jti-1", 9_000)],
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Key records round-trip, and a later write changes only their schedule and seal.
async fn the_key_ring_is_stored(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let k = |kid: &str, created: i64| KeyRecord {
        kid: kid.into(),
        alg: "EdDSA".into(),
        public: vec![1, 2, 3],
        sealed: vec![9; 60],
        created_at: created,
        activates_at: created,
        retires_at: None,
    };
    f.store
        .commit(WriteBatch {
            keys_expected: Some(vec![]),
            keys: vec![k("a", 1), k("b", 2)],
            events: vec![AuditEvent {
                at: 1,
                kind: "key.added".into(),
                grant_id: None,
                actor: "t".into(),
                data: serde_json::json!({}),
            }],
            ..Default::default()
        })
        .await?;
    // A second seeding (another replica starting at the same time) is refused.
    let again = f
        .open()
        .await?
        .commit(WriteBatch {
            keys_expected: Some(vec![]),
            keys: vec![k("c", 3)],
            ..Default::default()
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    // A rotation that read an older ring is refused too.
    let stale = f
        .store
        .commit(WriteBatch {
            keys_expected: Some(vec!["a".into()]),
            keys: vec![k("d", 4)],
            ..Default::default()
        })
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    let retired = KeyRecord {
        retires_at: Some(50),
        sealed: vec![0],
        ..k("a", 1)
    };
    f.store
        .commit(WriteBatch {
            keys: vec![retired],
            ..Default::default()
        })
        .await?;
    let keys = f.open().await?.keys().await?;
    assert_eq!(
        keys,
        vec![
            KeyRecord {
                retires_at: Some(50),
                sealed: vec![0],
                ..k("a", 1)
            },
            k("b", 2)
        ],
        "a later write changes the schedule and the seal (which binds it), nothing else"
    );
    Ok(())
}

/// A case passes by returning, or by returning `Ok`.
trait Check {
    fn check(self);
}
impl Check for () {
    fn check(self) {}
}
impl Check for Result<(), StoreError> {
    fn check(self) {
        if let Err(e) = self {
            panic!("{e}");
        }
    }
}

/// Text neither backend can hold fails its own batch, and only its own: the
/// batches committed with it in the same group are written.
async fn a_nul_in_text_fails_only_its_batch(kind: Kind) -> Result<(), StoreError> {
    let f = Arc::new(Fixture::new(kind).await);
    let mut bad = grant(1000);
    bad.request.task.id = "T\0x".into();
    let good = grant(1000);
    let (a, b) = tokio::join!(
        f.store.commit(WriteBatch {
            events: vec![event("grant.issued", &bad)],
            grants: vec![GrantWrite::Insert(bad.clone())],
            ..Default::default()
        }),
        f.store.commit(WriteBatch {
            events: vec![event("grant.issued", &good)],
            grants: vec![GrantWrite::Insert(good.clone())],
            ..Default::default()
        })
    );
    assert!(matches!(a, Err(StoreError::Invalid(_))), "{a:?}");
    b?;
    assert_eq!(f.store.grant(bad.id).await?, None);
    assert_eq!(f.store.grant(good.id).await?, Some(good));
    let r = verify(&f).await;
    assert!(r.ok() && r.entries == 1, "{r:?}");
    Ok(())
}

/// An entry appended behind the store's back with a correct link and hash (what
/// anyone with write access to the database can compute) is reported as an
/// unsigned tail, and no writer — the running one or a restarted one — appends
/// after it, so it never gets signed into a checkpoint.
async fn a_forged_tail_is_reported_and_never_signed(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    seed(&f, 2).await;
    let entries = f.store.audit(0, 100).await?;
    let last = entries.last().cloned().unwrap_or_else(|| panic!("seeded"));
    let cp = f.store.checkpoint().await?;
    let (seq, at, data) = (last.seq + 1, last.at + 1, r#"{"reason":"done"}"#);
    let hash = audit::entry_hash(seq, at, "grant.completed", None, "forger", data, &last.hash);
    f.tamper(&format!(
        "INSERT INTO audit (seq, at, kind, grant_id, actor, data, prev_hash, hash) \
         VALUES ({seq}, {at}, 'grant.completed', NULL, 'forger', '{data}', '{}', '{hash}')",
        last.hash
    ))
    .await;
    let r = verify(&f).await;
    let (bad, why) = r.first_bad.clone().unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(bad, seq, "{why}");
    assert!(why.contains("follow the signed checkpoint"), "{why}");
    let refused = |r: Result<(), StoreError>| match r {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains("not written by Lapse"), "{m}");
        }
        other => panic!("appended after a forged tail: {other:?}"),
    };
    let (g, r) = fenced_write(f.store.as_ref(), None).await;
    refused(r);
    assert_eq!(f.store.grant(g.id).await?, None);
    let reopened = f.open().await?;
    let (_, r) = fenced_write(reopened.as_ref(), None).await;
    refused(r);
    assert_eq!(
        f.store.checkpoint().await?,
        cp,
        "the checkpoint was not re-signed"
    );
    // A checkpoint whose signature does not verify is not appended after either.
    f.tamper(&format!("DELETE FROM audit WHERE seq = {seq}"))
        .await;
    f.tamper(&format!(
        "UPDATE audit_checkpoint SET signature = '{}' WHERE id = 1",
        "00".repeat(64)
    ))
    .await;
    let r = reopened
        .commit(WriteBatch {
            events: vec![event("grant.issued", &grant(1000))],
            ..Default::default()
        })
        .await;
    match r {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("not signed by a key"), "{m}"),
        other => panic!("appended after a forged checkpoint: {other:?}"),
    }
    Ok(())
}

/// A quarantine is stored with its audit entry, seen by every handle on the store,
/// replaced by a newer one and gone once lifted.
async fn quarantines_are_stored_replaced_and_lifted(kind: Kind) -> Result<(), StoreError> {
    use lapse_store::{Quarantine, QuarantineChange};
    let f = Fixture::new(kind).await;
    let other = f.open().await?;
    let q = |reason: &str, audiences: &[&str]| Quarantine {
        workload: "spiffe://t/w".into(),
        audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        reason: reason.into(),
        by: "sensor".into(),
        since: 1000,
    };
    let g = grant(1000);
    let set = |q: Quarantine| WriteBatch {
        events: vec![event("workload.quarantined", &g)],
        quarantines: vec![QuarantineChange::Set(q)],
        ..Default::default()
    };
    assert_eq!(other.quarantine("spiffe://t/w").await?, None);
    f.store.commit(set(q("compromised", &[]))).await?;
    assert_eq!(
        other.quarantine("spiffe://t/w").await?,
        Some(q("compromised", &[]))
    );
    assert_eq!(other.quarantine("spiffe://t/other").await?, None);
    f.store.commit(set(q("still", &["orders-db"]))).await?;
    assert_eq!(other.quarantines().await?, vec![q("still", &["orders-db"])]);
    assert!(q("still", &["orders-db"]).covers("orders-db"));
    assert!(!q("still", &["orders-db"]).covers("mcp-tools"));
    assert!(q("all", &[]).covers("mcp-tools"));
    other
        .commit(WriteBatch {
            events: vec![event("workload.released", &g)],
            quarantines: vec![QuarantineChange::Lift("spiffe://t/w".into())],
            ..Default::default()
        })
        .await?;
    assert_eq!(f.store.quarantine("spiffe://t/w").await?, None);
    assert_eq!(f.store.quarantines().await?, vec![]);
    let r = verify(&f).await;
    assert!(r.ok() && r.entries == 3, "{r:?}");
    Ok(())
}

/// A leader-only write of `fence`'s term: one grant and its audit entry.
async fn fenced_write(store: &dyn Store, fence: Option<u64>) -> (Grant, Result<(), StoreError>) {
    let g = grant(1000);
    let r = store
        .commit(WriteBatch {
            events: vec![event("grant.issued", &g)],
            grants: vec![GrantWrite::Insert(g.clone())],
            fence,
            ..Default::default()
        })
        .await;
    (g, r)
}

/// One replica leads at a time; one that stops renewing (a frozen process) loses
/// the lease once it lapses, another takes a new, higher term, and a write the
/// old leader makes afterwards in its old term is refused with nothing written.
async fn a_lapsed_lease_passes_on_and_fences_the_old_term(kind: Kind) -> Result<(), StoreError> {
    let f = Fixture::new(kind).await;
    let lease = Duration::from_millis(800);
    let Some(first) = f.store.try_lead(lease).await? else {
        panic!("an unheld lease is taken");
    };
    let (_, r) = fenced_write(f.store.as_ref(), Some(first)).await;
    r?;
    if kind == Kind::Sqlite {
        // One process owns the file and leads in one term for good.
        assert_eq!(f.store.try_lead(lease).await?, Some(first));
        let (g, r) = fenced_write(f.store.as_ref(), Some(first + 1)).await;
        assert!(matches!(r, Err(StoreError::Fenced(_))), "{r:?}");
        assert_eq!(f.store.grant(g.id).await?, None);
        return Ok(());
    }
    let others = [f.open().await?, f.open().await?, f.open().await?];
    for o in &others {
        assert_eq!(o.try_lead(lease).await?, None, "held by another");
    }
    // Renewing keeps the term.
    assert_eq!(f.store.try_lead(lease).await?, Some(first));
    // The leader freezes: no renewal. Once its lease lapsed, exactly one of the
    // others, asking at once, takes a new term.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let asked = futures_util::future::join_all(others.iter().map(|o| o.try_lead(lease))).await;
    let terms: Vec<u64> = asked
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(terms.len(), 1, "one new leader: {terms:?}");
    let second = terms[0];
    assert!(second > first, "a new term: {first} -> {second}");
    // The old leader wakes: it cannot lead while the new one renews, and what it
    // writes in its old term is refused, alone and whole.
    assert_eq!(f.store.try_lead(lease).await?, None);
    let before = verify(&f).await.entries;
    let (late, r) = fenced_write(f.store.as_ref(), Some(first)).await;
    assert!(
        matches!(r, Err(StoreError::Fenced(t)) if t == first),
        "{r:?}"
    );
    assert_eq!(f.store.grant(late.id).await?, None);
    let after = verify(&f).await;
    assert!(after.ok() && after.entries == before, "{after:?}");
    // Writes that are not leader-only do not depend on the lease.
    let (_, r) = fenced_write(f.store.as_ref(), None).await;
    r?;
    Ok(())
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::Check::check(super::$name(super::Kind::Sqlite).await);
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::Check::check(super::$name(super::Kind::Postgres).await);
            })*
        }
    };
}

conformance!(
    grants_and_events_commit_together,
    due_lists_live_grants_past_expiry_only,
    concurrent_commits_form_one_chain,
    survives_reopen,
    every_kind_of_tampering_is_detected,
    a_recomputed_chain_is_caught_by_the_checkpoint,
    a_locked_database_fails_closed,
    an_active_grant_that_ends_goes_on_the_feed_once_with_its_commit,
    two_writers_share_one_chain_and_feed,
    a_stale_update_loses_across_writers,
    a_nonce_is_spent_once,
    the_key_ring_is_stored,
    a_nul_in_text_fails_only_its_batch,
    a_lapsed_lease_passes_on_and_fences_the_old_term,
    a_forged_tail_is_reported_and_never_signed,
    quarantines_are_stored_replaced_and_lifted,
);
