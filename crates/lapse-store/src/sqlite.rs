//! The embedded SQLite backend.
//!
//! One writer thread owns the write connection and applies commits in groups: it
//! takes every batch waiting, applies each inside its own savepoint (so one failed
//! batch does not sink the others), appends the audit entries with their chain
//! hashes, re-signs the checkpoint, and commits once — one `fsync` for the group.
//! WAL mode with `synchronous=FULL` makes each commit durable before any caller is
//! answered. Reads run on a fixed set of reader threads, each owning its own
//! connection, and never block writes. Fixed, not spawned per burst: threads and
//! connections made and dropped under load left the allocator holding their
//! memory, and a long soak's resident memory grew with every burst.

use crate::audit::{
    AuditEntry, AuditEvent, AuditSigner, Checkpoint, GENESIS, checkpoint_message, entry_hash,
};
use crate::batch::{GrantWrite, WriteBatch, validate};
use crate::error::StoreError;
use crate::feed::FeedEntry;
use crate::filter::GrantFilter;
use crate::keyring::{KeyRecord, same_kids};
use crate::quarantine::{Quarantine, QuarantineChange, quarantine_from_body};
use crate::store::Store;
use async_trait::async_trait;
use lapse_core::{Grant, GrantId, GrantState, Timestamp};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tokio::sync::oneshot;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../migrations/sqlite/0002_credential_cleanup.sql"),
    ),
    (
        3,
        include_str!("../migrations/sqlite/0003_grants_by_state.sql"),
    ),
    (4, include_str!("../migrations/sqlite/0004_feed.sql")),
    (5, include_str!("../migrations/sqlite/0005_idle.sql")),
    (6, include_str!("../migrations/sqlite/0006_nonces_keys.sql")),
    (7, include_str!("../migrations/sqlite/0007_quarantines.sql")),
];
const MAX_GROUP: usize = 512;
const READERS: usize = 4;
/// Page cache per reader connection, KiB.
const READER_CACHE_KIB: i64 = 512;
/// Page cache of the write connection, KiB.
const WRITER_CACHE_KIB: i64 = 1024;

type Reply = oneshot::Sender<Result<(), StoreError>>;

enum Job {
    Commit(WriteBatch, oneshot::Sender<Result<(), StoreError>>),
    Ping(oneshot::Sender<Result<(), StoreError>>),
    /// Forget nonces that expired before this time (ms).
    Prune(i64, oneshot::Sender<Result<u64, StoreError>>),
}

/// A read, run on whichever reader thread takes it first.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    /// Dropped with the store: the reader threads then end and close their
    /// connections.
    readers: mpsc::Sender<ReadJob>,
}

fn open_conn(
    path: &Path,
    busy_timeout: Duration,
    read_only: bool,
) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Unavailable(format!("cannot open `{}`: {e}", path.display())))?;
    conn.busy_timeout(busy_timeout)?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // The writer appends at the right edge of each table and index and
        // updates grants as they end; a bounded cache holds those pages, and
        // SQLite's default (2 MiB) only filled slowly, over many minutes, as the
        // database grew.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    } else {
        // Readers look rows up by key; the kernel's page cache serves the rest. A
        // small page cache per reader keeps the process's memory flat as the
        // database grows (at SQLite's default, 2 MiB each, the pool's caches
        // filled for many minutes of a soak).
        conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS lapse_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    let current: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM lapse_migrations",
        [],
        |r| r.get(0),
    )?;
    let newest = MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0);
    if current > newest {
        return Err(StoreError::Config(format!(
            "the database is at schema version {current}, newer than this build knows ({newest}); upgrade Lapse"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO lapse_migrations (version, applied_at) VALUES (?1, strftime('%s','now'))",
            params![version],
        )?;
        tx.commit()?;
        tracing::info!(version, "store migration applied");
    }
    Ok(())
}

impl SqliteStore {
    pub async fn open(
        path: &Path,
        signer: Arc<dyn AuditSigner>,
        busy_timeout: Duration,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create `{}`: {e}", dir.display()))
            })?;
        }
        let mut conn = open_conn(path, busy_timeout, false)?;
        migrate(&mut conn)?;
        let (read_tx, read_rx) = mpsc::channel::<ReadJob>();
        let read_rx = Arc::new(Mutex::new(read_rx));
        for i in 0..READERS {
            let reader = open_conn(path, busy_timeout, true)?;
            let jobs = read_rx.clone();
            std::thread::Builder::new()
                .name(format!("lapse-store-reader-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match jobs.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // A read that panics answers its caller with an error (its
                        // reply is dropped) and must not take the reader with it.
                        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(&reader);
                        }));
                        if ran.is_err() {
                            tracing::error!("a store read panicked");
                        }
                    }
                })
                .map_err(|e| StoreError::Unavailable(format!("cannot start a reader: {e}")))?;
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("lapse-store-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    signer,
                    known: None,
                }
                .run(rx)
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            writer: tx,
            readers: read_tx,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.readers
            .send(Box::new(move |conn: &Connection| {
                // The caller may have gone (its request timed out): nothing to tell.
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| StoreError::Unavailable("the readers have stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("a reader stopped during a read".into()))?
    }

    async fn send(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Job,
    ) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(job(tx))
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?
    }
}

fn read_checkpoint(c: &Connection) -> Result<Option<Checkpoint>, StoreError> {
    c.query_row(
        "SELECT seq, hash, kid, signature, at FROM audit_checkpoint WHERE id = 1",
        [],
        |r| {
            Ok(Checkpoint {
                seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                hash: r.get(1)?,
                kid: r.get(2)?,
                signature: r.get(3)?,
                at: r.get(4)?,
            })
        },
    )
    .optional()
    .map_err(StoreError::from)
}

/// The head to append after: the signed checkpoint, checked against the last
/// entry ([`crate::audit::trusted_head`]). `known` is the head this writer signed
/// last, whose signature needs no check.
fn read_head(
    conn: &Connection,
    signer: &dyn AuditSigner,
    known: Option<&(u64, String)>,
) -> Result<(u64, String), StoreError> {
    let last: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let checkpoint = read_checkpoint(conn)?;
    let last = last.map(|(s, h)| (u64::try_from(s).unwrap_or(0), h));
    crate::audit::trusted_head(
        checkpoint.as_ref(),
        last.as_ref().map(|(s, h)| (*s, h.as_str())),
        known,
        |k, m, sig| signer.verifies(k, m, sig),
    )
    .map_err(StoreError::Corrupt)
}

struct Writer {
    conn: Connection,
    signer: Arc<dyn AuditSigner>,
    /// The head this writer signed last.
    known: Option<(u64, String)>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let (prunes, jobs): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| matches!(j, Job::Prune(..)));
            for p in prunes {
                if let Job::Prune(before, reply) = p {
                    let n = self
                        .conn
                        .execute("DELETE FROM nonces WHERE expires_at < ?1", [before])
                        .map(|n| u64::try_from(n).unwrap_or(0))
                        .map_err(StoreError::from);
                    let _ = reply.send(n);
                }
            }
            if !jobs.is_empty() {
                self.group(jobs);
            }
        }
    }

    fn group(&mut self, jobs: Vec<Job>) {
        // Every job's reply is kept out here, so a failure before a job is reached
        // (the head refused, the database locked) still answers it.
        let mut replies: Vec<(Reply, Result<(), StoreError>)> = Vec::new();
        let mut batches = Vec::new();
        for job in jobs {
            match job {
                Job::Ping(reply) => replies.push((reply, Ok(()))),
                Job::Prune(..) => {}
                Job::Commit(batch, reply) => batches.push((batch, reply)),
            }
        }
        let mut head = (0, GENESIS.to_owned());
        let outcome = (|| -> Result<Vec<Result<(), StoreError>>, StoreError> {
            let mut tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Another process may share the file: the head is read under the write
            // lock, never trusted from memory, so two writers cannot fork the chain.
            head = read_head(&tx, self.signer.as_ref(), self.known.as_ref())?;
            let mut appended = false;
            let mut results = Vec::with_capacity(batches.len());
            for (batch, _) in &batches {
                let sp = tx.savepoint()?;
                let mut h = head.clone();
                match apply(&sp, batch, &mut h) {
                    Ok(()) => {
                        sp.commit()?;
                        appended |= !batch.events.is_empty();
                        head = h;
                        results.push(Ok(()));
                    }
                    Err(e) => {
                        drop(sp); // rolls the savepoint back
                        results.push(Err(e));
                    }
                }
            }
            if appended {
                let (kid, sig) = self.signer.sign(&checkpoint_message(head.0, &head.1));
                let seq = i64::try_from(head.0).unwrap_or(i64::MAX);
                tx.execute(
                    "INSERT INTO audit_checkpoint (id, seq, hash, kid, signature, at) VALUES (1, ?1, ?2, ?3, ?4, strftime('%s','now'))
                     ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, kid = excluded.kid,
                     signature = excluded.signature, at = excluded.at",
                    params![seq, head.1, kid, hex::encode(sig)],
                )?;
            }
            tx.commit()?;
            Ok(results)
        })();
        match outcome {
            Ok(results) => {
                self.known = Some(head);
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
                for ((_, reply), result) in batches.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; nothing in this group was written");
                let answers = replies
                    .into_iter()
                    .map(|(r, _)| r)
                    .chain(batches.into_iter().map(|(_, r)| r));
                for reply in answers {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

fn apply(
    conn: &Connection,
    batch: &WriteBatch,
    head: &mut (u64, String),
) -> Result<(), StoreError> {
    validate(batch)?;
    for w in &batch.grants {
        match w {
            GrantWrite::Insert(g) => {
                let body =
                    serde_json::to_string(g).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let r = conn.execute(
                    "INSERT INTO grants (id, state, workload, audience, task_id, created_at, expires_at, version, body, cleanup_at, idle_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        g.id.to_string(),
                        g.state.as_str(),
                        g.request.workload.id,
                        g.request.audience,
                        g.request.task.id,
                        g.created_at.millis(),
                        g.expires_at.millis(),
                        i64::try_from(g.version).unwrap_or(i64::MAX),
                        body,
                        g.cleanup_due_at().map(Timestamp::millis),
                        g.idle_deadline().map(Timestamp::millis)
                    ],
                );
                match r {
                    Ok(_) => {}
                    Err(rusqlite::Error::SqliteFailure(f, _))
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        return Err(StoreError::Duplicate(g.id.to_string()));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            GrantWrite::Update {
                grant: g,
                expected_version,
            } => {
                let body =
                    serde_json::to_string(g).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                // An active grant that ends goes on the revocation feed, in this
                // same transaction.
                let ends = g.state.is_ended()
                    && conn
                        .prepare_cached("SELECT state FROM grants WHERE id = ?1")?
                        .query_row([g.id.to_string()], |r| r.get::<_, String>(0))
                        .optional()?
                        .is_some_and(|old| old == "active");
                let n = conn.execute(
                    "UPDATE grants SET state = ?2, expires_at = ?3, version = ?4, body = ?5, cleanup_at = ?7, idle_at = ?8 WHERE id = ?1 AND version = ?6",
                    params![
                        g.id.to_string(),
                        g.state.as_str(),
                        g.expires_at.millis(),
                        i64::try_from(g.version).unwrap_or(i64::MAX),
                        body,
                        i64::try_from(*expected_version).unwrap_or(i64::MAX),
                        g.cleanup_due_at().map(Timestamp::millis),
                        g.idle_deadline().map(Timestamp::millis)
                    ],
                )?;
                if n != 1 {
                    return Err(StoreError::Conflict(g.id.to_string()));
                }
                if ends {
                    conn.prepare_cached(
                        "INSERT INTO feed (at, grant_id, state, audience, jti, exp, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )?
                    .execute(params![
                        g.ended_at.unwrap_or(g.expires_at).millis(),
                        g.id.to_string(),
                        g.state.as_str(),
                        g.request.audience,
                        g.token_jti,
                        // No token of the grant outlives its maximum lifetime; its
                        // current expiry may be earlier than an older token's.
                        g.max_expires_at.millis(),
                        g.end.as_ref().map_or("", |e| e.reason.as_str()),
                    ])?;
                }
            }
        }
    }
    for n in &batch.nonces {
        let r = conn
            .prepare_cached("INSERT INTO nonces (value, expires_at) VALUES (?1, ?2)")?
            .execute(params![n.value, n.expires_at]);
        match r {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Replay(n.value.clone()));
            }
            Err(e) => return Err(e.into()),
        }
    }
    // One process owns the file and leads for good, in the one term `try_lead`
    // answers (0): any other fence is not a term of this store's.
    if let Some(fence) = batch.fence
        && fence != 0
    {
        return Err(StoreError::Fenced(fence));
    }
    if let Some(expected) = &batch.keys_expected {
        let mut stmt = conn.prepare_cached("SELECT kid FROM signing_keys")?;
        let kids: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if !same_kids(&kids, expected) {
            return Err(StoreError::Conflict(
                "the signing key ring changed meanwhile".into(),
            ));
        }
    }
    for k in &batch.keys {
        conn.prepare_cached(
            "INSERT INTO signing_keys (kid, alg, public, sealed, created_at, activates_at, retires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (kid) DO UPDATE SET sealed = excluded.sealed, activates_at = excluded.activates_at, retires_at = excluded.retires_at",
        )?
        .execute(params![k.kid, k.alg, k.public, k.sealed, k.created_at, k.activates_at, k.retires_at])?;
    }
    for q in &batch.quarantines {
        match q {
            QuarantineChange::Set(q) => {
                let body =
                    serde_json::to_string(q).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                conn.prepare_cached(
                    "INSERT INTO quarantines (workload, body) VALUES (?1, ?2)
                     ON CONFLICT (workload) DO UPDATE SET body = excluded.body",
                )?
                .execute(params![q.workload, body])?;
            }
            QuarantineChange::Lift(w) => {
                conn.prepare_cached("DELETE FROM quarantines WHERE workload = ?1")?
                    .execute(params![w])?;
            }
        }
    }
    for ev in &batch.events {
        append(conn, ev, head)?;
    }
    Ok(())
}

fn append(conn: &Connection, ev: &AuditEvent, head: &mut (u64, String)) -> Result<(), StoreError> {
    let seq = head.0 + 1;
    let data = serde_json::to_string(&ev.data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let hash = entry_hash(
        seq,
        ev.at,
        &ev.kind,
        ev.grant_id.as_deref(),
        &ev.actor,
        &data,
        &head.1,
    );
    conn.prepare_cached(
        "INSERT INTO audit (seq, at, kind, grant_id, actor, data, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![i64::try_from(seq).unwrap_or(i64::MAX), ev.at, ev.kind, ev.grant_id, ev.actor, data, head.1, hash])?;
    *head = (seq, hash);
    Ok(())
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
        at: r.get(1)?,
        kind: r.get(2)?,
        grant_id: r.get(3)?,
        actor: r.get(4)?,
        data: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
    })
}

fn grant_from_body(body: &str) -> Result<Grant, StoreError> {
    serde_json::from_str(body)
        .map_err(|e| StoreError::Corrupt(format!("grant record does not parse: {e}")))
}

#[async_trait]
impl Store for SqliteStore {
    async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.send(|tx| Job::Commit(batch, tx)).await
    }

    async fn grant(&self, id: GrantId) -> Result<Option<Grant>, StoreError> {
        self.read(move |c| {
            let body: Option<String> = c
                .prepare_cached("SELECT body FROM grants WHERE id = ?1")?
                .query_row(params![id.to_string()], |r| r.get(0))
                .optional()?;
            body.map(|b| grant_from_body(&b)).transpose()
        })
        .await
    }

    async fn grants(&self, filter: GrantFilter) -> Result<Vec<Grant>, StoreError> {
        self.read(move |c| {
            let limit = if filter.limit == 0 {
                100
            } else {
                filter.limit.min(10_000)
            };
            // Only the conditions that apply, so SQLite can pick the index for them
            // (`?1 IS NULL OR state = ?1` defeats every index).
            let mut sql = String::from("SELECT body FROM grants WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let mut cond = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
                args.push(v);
                sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
            };
            if let Some(st) = filter.state {
                cond(&mut sql, " AND state = ?", st.as_str().to_owned().into());
            }
            if let Some(w) = filter.workload {
                cond(&mut sql, " AND workload = ?", w.into());
            }
            if let Some(t) = filter.task {
                cond(&mut sql, " AND task_id = ?", t.into());
            }
            if let Some(a) = filter.audience {
                cond(&mut sql, " AND audience = ?", a.into());
            }
            if let Some(b) = filter.before {
                cond(
                    &mut sql,
                    " AND (created_at < ?",
                    b.created_at.millis().into(),
                );
                cond(
                    &mut sql,
                    " OR (created_at = ?",
                    b.created_at.millis().into(),
                );
                cond(&mut sql, " AND id < ?))", b.id.to_string().into());
            }
            cond(
                &mut sql,
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                i64::try_from(limit).unwrap_or(100).into(),
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows =
                stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))?;
            rows.map(|b| grant_from_body(&b?)).collect()
        })
        .await
    }

    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<Grant>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT body FROM grants WHERE state IN ('active', 'pending') AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now.millis(), i64::try_from(limit).unwrap_or(100)], |r| r.get::<_, String>(0))?;
            rows.map(|b| grant_from_body(&b?)).collect()
        })
        .await
    }

    async fn cleanup_due(&self, now: Timestamp, limit: usize) -> Result<Vec<Grant>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT body FROM grants WHERE cleanup_at IS NOT NULL AND cleanup_at <= ?1 ORDER BY cleanup_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now.millis(), i64::try_from(limit).unwrap_or(100)], |r| r.get::<_, String>(0))?;
            rows.map(|b| grant_from_body(&b?)).collect()
        })
        .await
    }

    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, at, kind, grant_id, actor, data, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![i64::try_from(after).unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(1000)],
                entry_from_row,
            )?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
        })
        .await
    }

    async fn audit_for(&self, grant: GrantId) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, at, kind, grant_id, actor, data, prev_hash, hash FROM audit WHERE grant_id = ?1 ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![grant.to_string()], entry_from_row)?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
        })
        .await
    }

    async fn idle_due(&self, now: Timestamp, limit: usize) -> Result<Vec<Grant>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT body FROM grants WHERE idle_at IS NOT NULL AND idle_at <= ?1 AND state = 'active' ORDER BY idle_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now.millis(), i64::try_from(limit).unwrap_or(100)], |r| r.get::<_, String>(0))?;
            rows.map(|b| grant_from_body(&b?)).collect()
        })
        .await
    }

    async fn feed(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, at, grant_id, state, audience, jti, exp, reason FROM feed WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![
                    i64::try_from(after).unwrap_or(i64::MAX),
                    i64::try_from(limit.min(10_000)).unwrap_or(1000)
                ],
                |r| {
                    Ok(FeedEntry {
                        seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        at: r.get(1)?,
                        grant_id: r.get(2)?,
                        state: r.get(3)?,
                        audience: r.get(4)?,
                        jti: r.get(5)?,
                        exp: r.get(6)?,
                        reason: r.get(7)?,
                    })
                },
            )?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
        })
        .await
    }

    async fn feed_head(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let n: i64 = c.query_row("SELECT COALESCE(MAX(seq), 0) FROM feed", [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn count(&self, state: GrantState) -> Result<u64, StoreError> {
        self.read(move |c| {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM grants WHERE state = ?1",
                [state.as_str()],
                |r| r.get(0),
            )?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.read(read_checkpoint).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.send(Job::Ping).await
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT kid, alg, public, sealed, created_at, activates_at, retires_at FROM signing_keys ORDER BY created_at, kid",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(KeyRecord {
                    kid: r.get(0)?,
                    alg: r.get(1)?,
                    public: r.get(2)?,
                    sealed: r.get(3)?,
                    created_at: r.get(4)?,
                    activates_at: r.get(5)?,
                    retires_at: r.get(6)?,
                })
            })?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
        })
        .await
    }

    async fn quarantine(&self, workload: &str) -> Result<Option<Quarantine>, StoreError> {
        let w = workload.to_owned();
        self.read(move |c| {
            let body: Option<String> = c
                .prepare_cached("SELECT body FROM quarantines WHERE workload = ?1")?
                .query_row(params![w], |r| r.get(0))
                .optional()?;
            body.map(|b| quarantine_from_body(&b)).transpose()
        })
        .await
    }

    async fn quarantines(&self) -> Result<Vec<Quarantine>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT body FROM quarantines ORDER BY workload")?;
            let bodies: Vec<String> = stmt
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            bodies.iter().map(|b| quarantine_from_body(b)).collect()
        })
        .await
    }

    async fn spent_nonces(&self, values: &[String]) -> Result<Vec<String>, StoreError> {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let values = values.to_vec();
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT 1 FROM nonces WHERE value = ?1")?;
            let mut spent = Vec::new();
            for v in values {
                if stmt.exists(params![v])? {
                    spent.push(v);
                }
            }
            Ok(spent)
        })
        .await
    }

    async fn prune_nonces(&self, now: Timestamp) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job::Prune(now.millis(), tx))
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader tests never read a checkpoint's signature.
    struct Unsigned;
    impl AuditSigner for Unsigned {
        fn sign(&self, _: &[u8]) -> (String, Vec<u8>) {
            ("test".into(), vec![0; 64])
        }
        fn verifies(&self, _: &str, _: &[u8], _: &[u8]) -> bool {
            false
        }
    }

    async fn store(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(
            &dir.path().join("lapse.db"),
            Arc::new(Unsigned),
            Duration::from_millis(300),
        )
        .await
        .expect("store opens")
    }

    #[tokio::test]
    async fn a_panicking_read_answers_with_an_error_and_keeps_its_reader() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir).await;
        for _ in 0..READERS * 2 {
            let r: Result<(), _> = s.read(|_| panic!("a bug in a read")).await;
            assert!(
                matches!(r, Err(StoreError::Unavailable(ref m)) if m.contains("reader stopped")),
                "{r:?}"
            );
        }
        // Every reader survived: as many reads as there are readers, held open
        // together, all run.
        let barrier = Arc::new(std::sync::Barrier::new(READERS));
        let reads = (0..READERS).map(|_| {
            let b = barrier.clone();
            s.read(move |c| {
                b.wait();
                Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?)
            })
        });
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all(reads),
        )
        .await
        .expect("all readers alive");
        assert!(out.iter().all(|r| matches!(r, Ok(1))), "{out:?}");
    }

    #[tokio::test]
    async fn reads_beyond_the_readers_wait_their_turn_on_the_same_threads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir).await;
        let reads = (0..READERS * 25).map(|i| {
            s.read(move |c| {
                std::thread::sleep(Duration::from_millis(1));
                let n: i64 = c.query_row("SELECT COUNT(*) FROM grants", [], |r| r.get(0))?;
                Ok((i, n, std::thread::current().id()))
            })
        });
        let out = futures_util::future::join_all(reads).await;
        let mut threads = std::collections::HashSet::new();
        for (i, r) in out.into_iter().enumerate() {
            let (j, n, thread) = r.expect("read");
            assert_eq!((j, n), (i, 0));
            threads.insert(thread);
        }
        assert!(
            threads.len() <= READERS,
            "100 reads ran on {} threads, not on the store's {READERS} readers",
            threads.len()
        );
    }
}
