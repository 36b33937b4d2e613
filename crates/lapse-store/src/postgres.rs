//! The PostgreSQL backend: several broker replicas on one database.
//!
//! Every write is serialised on one row: a commit locks `audit_checkpoint`
//! (`SELECT … FOR UPDATE`), checks its grant versions and nonces against what is
//! committed, writes, appends its audit entries after the head it holds, re-signs
//! the head and commits. So all replicas append to one audit chain in one total
//! order, the revocation feed's sequence numbers are gap-free across replicas, and a
//! version check or a spent nonce cannot race another replica's write.
//!
//! The lock is held for a few round trips per *group*: like the SQLite writer, each
//! replica has one writer task that takes every batch waiting and commits them
//! together, with each batch checked on its own (one that conflicts fails alone).
//! The checks run in memory against the rows read under the lock, so a group costs
//! the same handful of statements (pipelined) whatever its size.
//!
//! A commit that adds feed entries sends `NOTIFY lapse_feed` in its transaction;
//! every replica listens and wakes its feed streams, so a grant ended on one
//! replica reaches gates following another within milliseconds.

use crate::audit::{
    AuditEntry, AuditEvent, AuditSigner, Checkpoint, checkpoint_message, entry_hash,
};
use crate::batch::{GrantWrite, Nonce, WriteBatch, validate};
use crate::error::StoreError;
use crate::feed::FeedEntry;
use crate::filter::GrantFilter;
use crate::keyring::{KeyRecord, same_kids};
use crate::quarantine::{Quarantine, QuarantineChange, quarantine_from_body};
use crate::redact::redact_url;
use crate::store::Store;
use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use lapse_core::{Grant, GrantId, GrantState, Timestamp};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::types::ToSql;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../migrations/postgres/0002_leader_lease.sql"),
    ),
    (
        3,
        include_str!("../migrations/postgres/0003_quarantines.sql"),
    ),
];
const MAX_GROUP: usize = 512;
const POOL_SIZE: usize = 16;
/// `pg_advisory_xact_lock` key that serialises migrations of replicas starting together.
const MIGRATION_LOCK: i64 = 0x6c61_7073_655f_6d67; // "lapse_mg"
const FEED_CHANNEL: &str = "lapse_feed";
/// How much longer the client waits than the server's own statement and lock
/// timeouts, so that the server's error (not a dropped future) ends a stuck commit.
const CLIENT_GRACE: Duration = Duration::from_secs(2);

type Reply = oneshot::Sender<Result<(), StoreError>>;

enum Job {
    Commit(WriteBatch, Reply),
    Ping(Reply),
}

pub struct PgStore {
    pool: Pool,
    writer: mpsc::UnboundedSender<Job>,
    timeout: Duration,
    feed: watch::Receiver<u64>,
    /// This process's name on the leader lease (random per open).
    holder: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // A database error (constraint, syntax) is a bug or tampering; anything else is
    // the database being unreachable. Both fail closed.
    match e.as_db_error() {
        Some(db) => {
            StoreError::Unavailable(format!("postgres: {}: {}", db.code().code(), db.message()))
        }
        None => {
            // tokio-postgres keeps the cause (a refused certificate, a reset
            // connection) in `source`: an operator needs it to act.
            let mut msg = format!("postgres: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            StoreError::Unavailable(msg)
        }
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Unavailable(format!("postgres: {other}")),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A name for this process on the leader lease: the pid for people reading the
/// row, a random part so two opens (or two hosts) never share one.
fn holder_id() -> String {
    format!("{}/{}", std::process::id(), uuid::Uuid::new_v4().simple())
}

impl PgStore {
    /// Connects, applies migrations (one replica at a time) and starts the writer
    /// and the feed listener. `timeout` bounds every wait for a connection or a
    /// commit; past it the operation fails closed.
    pub async fn open(
        url: &str,
        signer: Arc<dyn AuditSigner>,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let (mut config, tls) = lapse_pg::config(url)
            .map_err(|e| StoreError::Config(format!("store URL `{}`: {e}", redact_url(url))))?;
        // As libpq does: the password may come from the environment, so it need not
        // be written in the config file.
        if config.get_password().is_none()
            && let Ok(p) = std::env::var("PGPASSWORD")
        {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        config.application_name("lapse");
        // Plans are made for each execution's actual arguments: a generic plan made
        // while the tables were small turns `id = ANY($1)` and the `unnest` joins
        // into sequential scans that grow with the table.
        //
        // The server bounds every statement, every lock wait and every idle
        // transaction by the store timeout, and probes the connection every few
        // seconds: a replica that stalls or vanishes while it holds the chain head
        // (or the leader lock) loses it in seconds, not at TCP's two-hour timeout.
        // The client waits a little longer than the server, so the server's error
        // arrives and the session is discarded rather than reused mid-transaction.
        let ms = timeout.as_millis().max(100);
        config.options(format!(
            "-c plan_cache_mode=force_custom_plan -c statement_timeout={ms} -c lock_timeout={ms} \
             -c idle_in_transaction_session_timeout={} -c tcp_keepalives_idle=5 \
             -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3",
            ms.saturating_mul(2)
        ));
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| StoreError::Config(format!("postgres pool: {e}")))?;
        {
            let mut client = pool.get().await.map_err(pool_err)?;
            migrate(&mut client).await?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (feed_tx, feed_rx) = watch::channel(0);
        let writer = Writer {
            pool: pool.clone(),
            signer,
            timeout: timeout + CLIENT_GRACE,
            known: std::sync::Mutex::new(None),
        };
        let tasks = vec![
            tokio::spawn(writer.run(rx)),
            tokio::spawn(listen(config, tls, feed_tx)),
        ];
        Ok(Self {
            pool,
            writer: tx,
            timeout,
            feed: feed_rx,
            holder: holder_id(),
            tasks,
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn send(&self, job: impl FnOnce(Reply) -> Job) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(job(tx))
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?
    }

    async fn query(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let work = async {
            let c = self.client().await?;
            let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
            c.query(&stmt, args).await.map_err(pg_err)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Unavailable("postgres: timed out".into()))?
    }

    async fn grant_bodies(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Grant>, StoreError> {
        self.query(sql, args)
            .await?
            .iter()
            .map(|r| grant_from_body(r.try_get(0).map_err(pg_err)?))
            .collect()
    }
}

async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS lapse_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await
    .map_err(pg_err)?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM lapse_migrations",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(pg_err)?;
    let newest = MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0);
    if current > newest {
        return Err(StoreError::Config(format!(
            "the database is at schema version {current}, newer than this build knows ({newest}); upgrade Lapse"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO lapse_migrations (version, applied_at) VALUES ($1, EXTRACT(EPOCH FROM now())::BIGINT)",
            &[version],
        )
        .await
        .map_err(pg_err)?;
        tracing::info!(version, "store migration applied (postgres)");
    }
    tx.commit().await.map_err(pg_err)
}

/// Follows `NOTIFY lapse_feed` on its own session, reconnecting when it drops. A
/// reconnect also wakes the streams: notifications sent meanwhile are lost, the
/// entries are not.
async fn listen(config: tokio_postgres::Config, tls: lapse_pg::Tls, feed: watch::Sender<u64>) {
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (ntx, mut nrx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                                if ntx.send(()).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "feed listener: connection lost");
                                return;
                            }
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {FEED_CHANNEL}"))
                    .await
                    .is_ok()
                {
                    feed.send_modify(|n| *n = n.wrapping_add(1));
                    while nrx.recv().await.is_some() {
                        feed.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "feed listener: cannot connect; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

struct Writer {
    pool: Pool,
    signer: Arc<dyn AuditSigner>,
    timeout: Duration,
    /// The head this writer signed (or verified) last: its signature needs no
    /// second check while no other replica has appended since.
    known: std::sync::Mutex<Option<(u64, String)>>,
}

/// One grant row as written at the end of a group (the last write to it wins; the
/// checks already ran in order).
struct Row<'a> {
    grant: &'a Grant,
    exists: bool,
}

/// What a group writes once every batch has been checked.
#[derive(Default)]
struct Plan<'a> {
    rows: Vec<(String, Row<'a>)>,
    /// Where each grant's row is in `rows`.
    row_index: HashMap<String, usize>,
    feed: Vec<&'a Grant>,
    events: Vec<&'a AuditEvent>,
    nonces: Vec<&'a Nonce>,
    keys: Vec<&'a KeyRecord>,
    quarantines: Vec<&'a QuarantineChange>,
}

/// What is committed that the group's checks need, read under the lock every
/// writer takes first, and amended by each batch that passes.
struct Committed {
    /// id -> (state, version)
    view: HashMap<String, (String, u64)>,
    /// The grants stored before this group: their rows are updated, the others
    /// inserted.
    in_db: HashSet<String>,
    spent: HashSet<String>,
    /// The ring's key ids, read only when a batch has a precondition on them.
    kids: Vec<String>,
    /// The leader lease's generation, read only when a batch is fenced.
    term: Option<u64>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            self.group(jobs).await;
        }
    }

    async fn group(&self, jobs: Vec<Job>) {
        let mut batches = Vec::new();
        let mut replies = Vec::new();
        let mut pings = Vec::new();
        for job in jobs {
            match job {
                Job::Commit(b, r) => {
                    batches.push(b);
                    replies.push(r);
                }
                Job::Ping(r) => pings.push(r),
            }
        }
        let outcome = match tokio::time::timeout(self.timeout, self.apply(&batches)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(
                "postgres: commit timed out; nothing in this group was written".into(),
            )),
        };
        match outcome {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                for p in pings {
                    let _ = p.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; nothing in this group was written");
                for reply in replies.into_iter().chain(pings) {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }

    /// One transaction for the group. The outer error means nothing was written;
    /// inside, each batch has its own result.
    async fn apply(
        &self,
        batches: &[WriteBatch],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let result = self.apply_on(&mut client, batches).await;
        if result.is_err() {
            // The session may be mid-transaction or broken: never reuse it.
            drop(Object::take(client));
        }
        result
    }

    async fn apply_on(
        &self,
        client: &mut Object,
        batches: &[WriteBatch],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let tx = client.transaction().await.map_err(pg_err)?;
        let (mut seq, mut hash, mut feed_seq) = self.read_head(&tx).await?;
        let mut committed = Committed::read(&tx, batches).await?;
        let (plan, results) = Plan::of(batches, &mut committed);

        // Audit entries and feed entries numbered after the head this group holds.
        let audit_rows = AuditColumns::numbered(&plan.events, &mut seq, &mut hash)?;
        let feed_rows = FeedColumns::numbered(&plan.feed, &mut feed_seq);
        let (inserts, updates) = GrantColumns::split(&plan.rows)?;
        let head_moved = !audit_rows.seq.is_empty() || !feed_rows.seq.is_empty();

        // Pipelined on the one session: the round trips overlap.
        tokio::try_join!(
            insert_grants(&tx, &inserts),
            update_grants(&tx, &updates),
            write_audit(&tx, &audit_rows),
            write_feed(&tx, &feed_rows),
            write_nonces(&tx, &plan.nonces),
            write_keys(&tx, &plan.keys),
            write_quarantines(&tx, &plan.quarantines),
            self.write_head(&tx, head_moved, seq, &hash, feed_seq)
        )
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        *self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((seq, hash));
        Ok(results)
    }

    /// Re-signs the head at the group's last audit entry, when the group appended
    /// to the audit log or the feed.
    async fn write_head(
        &self,
        t: &Transaction<'_>,
        moved: bool,
        seq: u64,
        hash: &str,
        feed_seq: u64,
    ) -> Result<(), tokio_postgres::Error> {
        if moved {
            let (kid, sig) = self.signer.sign(&checkpoint_message(seq, hash));
            let stmt = t
                .prepare_cached(
                    "UPDATE audit_checkpoint SET seq = $1, hash = $2, kid = $3, signature = $4,
                     at = EXTRACT(EPOCH FROM now())::BIGINT, feed_seq = $5 WHERE id = 1",
                )
                .await?;
            t.execute(
                &stmt,
                &[
                    &to_i64(seq),
                    &hash,
                    &kid,
                    &hex::encode(sig),
                    &to_i64(feed_seq),
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Locks the head row (every writer of every replica queues here) and answers
    /// the head to append after — the signed checkpoint, checked against the last
    /// entry ([`crate::audit::trusted_head`]) — and the feed's head.
    async fn read_head(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(u64, String, u64), StoreError> {
        let row = tx
            .query_one(
                "SELECT seq, hash, feed_seq, kid, signature FROM audit_checkpoint WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg_err)?;
        // A statement of its own, after the lock: its snapshot sees what the
        // writer before committed (a subquery of the locking statement would not).
        let tail = tx
            .query_opt("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])
            .await
            .map_err(pg_err)?;
        let checkpoint = Checkpoint {
            seq: to_u64(row.try_get(0).map_err(pg_err)?),
            hash: row.try_get(1).map_err(pg_err)?,
            kid: row.try_get(3).map_err(pg_err)?,
            signature: row.try_get(4).map_err(pg_err)?,
            at: 0,
        };
        let feed_seq = to_u64(row.try_get(2).map_err(pg_err)?);
        let last = match tail {
            Some(r) => Some((
                to_u64(r.try_get(0).map_err(pg_err)?),
                r.try_get::<_, String>(1).map_err(pg_err)?,
            )),
            None => None,
        };
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (seq, hash) = crate::audit::trusted_head(
            Some(&checkpoint),
            last.as_ref().map(|(s, h)| (*s, h.as_str())),
            known.as_ref(),
            |k, m, s| self.signer.verifies(k, m, s),
        )
        .map_err(StoreError::Corrupt)?;
        Ok((seq, hash, feed_seq))
    }
}

impl Committed {
    async fn read(tx: &Transaction<'_>, batches: &[WriteBatch]) -> Result<Self, StoreError> {
        let ids: Vec<String> = batches
            .iter()
            .flat_map(|b| &b.grants)
            .map(|w| match w {
                GrantWrite::Insert(g) | GrantWrite::Update { grant: g, .. } => g.id.to_string(),
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let values: Vec<&str> = batches
            .iter()
            .flat_map(|b| &b.nonces)
            .map(|n| n.value.as_str())
            .collect();
        let kids: Vec<String> = if batches.iter().any(|b| b.keys_expected.is_some()) {
            tx.query("SELECT kid FROM signing_keys", &[])
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(pg_err)?
        } else {
            Vec::new()
        };
        let term = if batches.iter().any(|b| b.fence.is_some()) {
            Some(leader_term(tx).await?)
        } else {
            None
        };
        let (existing, spent) = tokio::try_join!(
            async {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let stmt = tx
                    .prepare_cached("SELECT id, state, version FROM grants WHERE id = ANY($1)")
                    .await?;
                tx.query(&stmt, &[&ids]).await
            },
            async {
                if values.is_empty() {
                    return Ok(Vec::new());
                }
                let stmt = tx
                    .prepare_cached("SELECT value FROM nonces WHERE value = ANY($1)")
                    .await?;
                tx.query(&stmt, &[&values]).await
            }
        )
        .map_err(pg_err)?;
        let mut view: HashMap<String, (String, u64)> = HashMap::new();
        for r in &existing {
            let id: String = r.try_get(0).map_err(pg_err)?;
            let state: String = r.try_get(1).map_err(pg_err)?;
            let version: i64 = r.try_get(2).map_err(pg_err)?;
            view.insert(id, (state, to_u64(version)));
        }
        let in_db: HashSet<String> = view.keys().cloned().collect();
        let spent: HashSet<String> = spent
            .iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<Result<_, _>>()
            .map_err(pg_err)?;
        Ok(Self {
            view,
            in_db,
            spent,
            kids,
            term,
        })
    }
}

impl<'a> Plan<'a> {
    /// Checks each batch in order, against what is committed as amended by the
    /// batches before it, and plans the writes of those that pass; answers each
    /// batch's result.
    fn of(
        batches: &'a [WriteBatch],
        committed: &mut Committed,
    ) -> (Self, Vec<Result<(), StoreError>>) {
        let mut plan = Self::default();
        let mut results = Vec::with_capacity(batches.len());
        for b in batches {
            let checked = match (&b.keys_expected, b.fence) {
                (_, Some(fence)) if committed.term != Some(fence) => Err(StoreError::Fenced(fence)),
                (Some(expected), _) if !same_kids(&committed.kids, expected) => Err(
                    StoreError::Conflict("the signing key ring changed meanwhile".into()),
                ),
                _ => check(b, &committed.view, &committed.spent),
            };
            match checked {
                Err(e) => results.push(Err(e)),
                Ok(ends) => {
                    plan.admit(b, ends, committed);
                    results.push(Ok(()));
                }
            }
        }
        (plan, results)
    }

    /// Adds a batch that passed its checks, and what it writes to what the next
    /// batches are checked against.
    fn admit(&mut self, b: &'a WriteBatch, ends: Vec<&'a Grant>, committed: &mut Committed) {
        for w in &b.grants {
            let g = match w {
                GrantWrite::Insert(g) | GrantWrite::Update { grant: g, .. } => g,
            };
            let id = g.id.to_string();
            committed
                .view
                .insert(id.clone(), (g.state.as_str().to_owned(), g.version));
            let row = Row {
                grant: g,
                exists: committed.in_db.contains(&id),
            };
            match self.row_index.get(&id) {
                Some(&i) => {
                    if let Some(slot) = self.rows.get_mut(i) {
                        slot.1 = row;
                    }
                }
                None => {
                    self.row_index.insert(id.clone(), self.rows.len());
                    self.rows.push((id, row));
                }
            }
        }
        self.feed.extend(ends);
        self.events.extend(&b.events);
        for n in &b.nonces {
            committed.spent.insert(n.value.clone());
            self.nonces.push(n);
        }
        self.keys.extend(&b.keys);
        self.quarantines.extend(&b.quarantines);
        for k in &b.keys {
            if !committed.kids.contains(&k.kid) {
                committed.kids.push(k.kid.clone());
            }
        }
    }
}

/// The leader lease's current generation, read `FOR SHARE` so a takeover (which
/// updates the row) waits until this transaction, and the fenced writes in it, end.
async fn leader_term(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, StoreError> {
    let row = tx
        .query_one(
            "SELECT generation FROM leader_lease WHERE id = 1 FOR SHARE",
            &[],
        )
        .await
        .map_err(pg_err)?;
    Ok(to_u64(row.try_get(0).map_err(pg_err)?))
}

/// Checks one batch against the committed state as amended by the batches before
/// it in the group; returns the grants whose ending goes on the feed.
fn check<'a>(
    b: &'a WriteBatch,
    view: &HashMap<String, (String, u64)>,
    spent: &HashSet<String>,
) -> Result<Vec<&'a Grant>, StoreError> {
    validate(b)?;
    // Writes within one batch see each other too.
    let mut local: HashMap<String, (String, u64)> = HashMap::new();
    let mut ends = Vec::new();
    for w in &b.grants {
        match w {
            GrantWrite::Insert(g) => {
                let id = g.id.to_string();
                if local.contains_key(&id) || view.contains_key(&id) {
                    return Err(StoreError::Duplicate(id));
                }
                local.insert(id, (g.state.as_str().to_owned(), g.version));
            }
            GrantWrite::Update {
                grant: g,
                expected_version,
            } => {
                let id = g.id.to_string();
                let current = local.get(&id).or_else(|| view.get(&id));
                match current {
                    Some((state, version)) if version == expected_version => {
                        if g.state.is_ended() && state == "active" {
                            ends.push(g);
                        }
                    }
                    _ => return Err(StoreError::Conflict(id)),
                }
                local.insert(id, (g.state.as_str().to_owned(), g.version));
            }
        }
    }
    let mut seen = HashSet::new();
    for n in &b.nonces {
        if spent.contains(&n.value) || !seen.insert(n.value.as_str()) {
            return Err(StoreError::Replay(n.value.clone()));
        }
    }
    Ok(ends)
}

#[derive(Default)]
struct GrantColumns {
    id: Vec<String>,
    state: Vec<&'static str>,
    workload: Vec<String>,
    audience: Vec<String>,
    task_id: Vec<String>,
    created_at: Vec<i64>,
    expires_at: Vec<i64>,
    version: Vec<i64>,
    body: Vec<String>,
    cleanup_at: Vec<Option<i64>>,
    idle_at: Vec<Option<i64>>,
}

impl GrantColumns {
    fn push(&mut self, g: &Grant) -> Result<(), StoreError> {
        self.body
            .push(serde_json::to_string(g).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        self.id.push(g.id.to_string());
        self.state.push(g.state.as_str());
        self.workload.push(g.request.workload.id.clone());
        self.audience.push(g.request.audience.clone());
        self.task_id.push(g.request.task.id.clone());
        self.created_at.push(g.created_at.millis());
        self.expires_at.push(g.expires_at.millis());
        self.version.push(to_i64(g.version));
        self.cleanup_at
            .push(g.cleanup_due_at().map(Timestamp::millis));
        self.idle_at.push(g.idle_deadline().map(Timestamp::millis));
        Ok(())
    }

    /// The group's grant rows: those to insert, and those to update.
    fn split(rows: &[(String, Row<'_>)]) -> Result<(Self, Self), StoreError> {
        let mut inserts = Self::default();
        let mut updates = Self::default();
        for (_, row) in rows {
            if row.exists {
                updates.push(row.grant)?;
            } else {
                inserts.push(row.grant)?;
            }
        }
        Ok((inserts, updates))
    }

    fn args(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.id,
            &self.state,
            &self.workload,
            &self.audience,
            &self.task_id,
            &self.created_at,
            &self.expires_at,
            &self.version,
            &self.body,
            &self.cleanup_at,
            &self.idle_at,
        ]
    }
}

#[derive(Default)]
struct AuditColumns {
    seq: Vec<i64>,
    at: Vec<i64>,
    kind: Vec<String>,
    grant_id: Vec<Option<String>>,
    actor: Vec<String>,
    data: Vec<String>,
    prev: Vec<String>,
    hash: Vec<String>,
}

impl AuditColumns {
    /// The group's audit entries, numbered and chained after the head at `seq`
    /// and `hash`, which move to the last entry.
    fn numbered(
        events: &[&AuditEvent],
        seq: &mut u64,
        hash: &mut String,
    ) -> Result<Self, StoreError> {
        let mut rows = Self::default();
        for ev in events {
            *seq += 1;
            let data =
                serde_json::to_string(&ev.data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let h = entry_hash(
                *seq,
                ev.at,
                &ev.kind,
                ev.grant_id.as_deref(),
                &ev.actor,
                &data,
                hash,
            );
            rows.push(*seq, ev, data, std::mem::replace(hash, h.clone()), h);
        }
        Ok(rows)
    }

    fn push(&mut self, seq: u64, ev: &AuditEvent, data: String, prev: String, hash: String) {
        self.seq.push(to_i64(seq));
        self.at.push(ev.at);
        self.kind.push(ev.kind.clone());
        self.grant_id.push(ev.grant_id.clone());
        self.actor.push(ev.actor.clone());
        self.data.push(data);
        self.prev.push(prev);
        self.hash.push(hash);
    }
}

#[derive(Default)]
struct FeedColumns {
    seq: Vec<i64>,
    at: Vec<i64>,
    grant_id: Vec<String>,
    state: Vec<&'static str>,
    audience: Vec<String>,
    jti: Vec<Option<String>>,
    exp: Vec<i64>,
    reason: Vec<String>,
}

impl FeedColumns {
    /// The group's feed entries, numbered after `feed_seq`, which moves to the last.
    fn numbered(grants: &[&Grant], feed_seq: &mut u64) -> Self {
        let mut rows = Self::default();
        for g in grants {
            *feed_seq += 1;
            rows.push(*feed_seq, g);
        }
        rows
    }

    fn push(&mut self, seq: u64, g: &Grant) {
        self.seq.push(to_i64(seq));
        self.at.push(g.ended_at.unwrap_or(g.expires_at).millis());
        self.grant_id.push(g.id.to_string());
        self.state.push(g.state.as_str());
        self.audience.push(g.request.audience.clone());
        self.jti.push(g.token_jti.clone());
        // No token of the grant outlives its maximum lifetime; its current expiry
        // may be earlier than an older token's.
        self.exp.push(g.max_expires_at.millis());
        self.reason
            .push(g.end.as_ref().map_or(String::new(), |e| e.reason.clone()));
    }
}

async fn insert_grants(
    t: &Transaction<'_>,
    inserts: &GrantColumns,
) -> Result<(), tokio_postgres::Error> {
    if !inserts.id.is_empty() {
        let stmt = t
            .prepare_cached(
                "INSERT INTO grants (id, state, workload, audience, task_id, created_at, expires_at, version, body, cleanup_at, idle_at)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[], $9::text[], $10::int8[], $11::int8[])",
            )
            .await?;
        t.execute(&stmt, &inserts.args()).await?;
    }
    Ok(())
}

async fn update_grants(
    t: &Transaction<'_>,
    updates: &GrantColumns,
) -> Result<(), tokio_postgres::Error> {
    if !updates.id.is_empty() {
        let stmt = t
            .prepare_cached(
                "UPDATE grants AS g SET state = u.state, expires_at = u.expires_at, version = u.version, body = u.body, cleanup_at = u.cleanup_at, idle_at = u.idle_at
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[], $9::text[], $10::int8[], $11::int8[])
                   AS u(id, state, workload, audience, task_id, created_at, expires_at, version, body, cleanup_at, idle_at)
                 WHERE g.id = u.id",
            )
            .await?;
        t.execute(&stmt, &updates.args()).await?;
    }
    Ok(())
}

async fn write_audit(t: &Transaction<'_>, a: &AuditColumns) -> Result<(), tokio_postgres::Error> {
    if !a.seq.is_empty() {
        let stmt = t
            .prepare_cached(
                "INSERT INTO audit (seq, at, kind, grant_id, actor, data, prev_hash, hash)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])",
            )
            .await?;
        t.execute(
            &stmt,
            &[
                &a.seq,
                &a.at,
                &a.kind,
                &a.grant_id,
                &a.actor,
                &a.data,
                &a.prev,
                &a.hash,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Appends the group's feed entries and wakes every replica's feed streams.
async fn write_feed(t: &Transaction<'_>, f: &FeedColumns) -> Result<(), tokio_postgres::Error> {
    if !f.seq.is_empty() {
        let stmt = t
            .prepare_cached(
                "INSERT INTO feed (seq, at, grant_id, state, audience, jti, exp, reason)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::text[])",
            )
            .await?;
        t.execute(
            &stmt,
            &[
                &f.seq,
                &f.at,
                &f.grant_id,
                &f.state,
                &f.audience,
                &f.jti,
                &f.exp,
                &f.reason,
            ],
        )
        .await?;
        t.execute(&format!("NOTIFY {FEED_CHANNEL}"), &[]).await?;
    }
    Ok(())
}

async fn write_nonces(t: &Transaction<'_>, nonces: &[&Nonce]) -> Result<(), tokio_postgres::Error> {
    if !nonces.is_empty() {
        let values: Vec<&str> = nonces.iter().map(|n| n.value.as_str()).collect();
        let exp: Vec<i64> = nonces.iter().map(|n| n.expires_at).collect();
        let stmt = t
            .prepare_cached(
                "INSERT INTO nonces (value, expires_at) SELECT * FROM unnest($1::text[], $2::int8[])",
            )
            .await?;
        t.execute(&stmt, &[&values, &exp]).await?;
    }
    Ok(())
}

async fn write_keys(t: &Transaction<'_>, keys: &[&KeyRecord]) -> Result<(), tokio_postgres::Error> {
    for k in keys {
        t.execute(
            "INSERT INTO signing_keys (kid, alg, public, sealed, created_at, activates_at, retires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (kid) DO UPDATE SET sealed = excluded.sealed, activates_at = excluded.activates_at, retires_at = excluded.retires_at",
            &[&k.kid, &k.alg, &k.public, &k.sealed, &k.created_at, &k.activates_at, &k.retires_at],
        )
        .await?;
    }
    Ok(())
}

async fn write_quarantines(
    t: &Transaction<'_>,
    changes: &[&QuarantineChange],
) -> Result<(), tokio_postgres::Error> {
    for q in changes {
        match q {
            QuarantineChange::Set(q) => {
                // Serialising a plain struct cannot fail.
                let body = serde_json::to_string(q).unwrap_or_default();
                t.execute(
                    "INSERT INTO quarantines (workload, body) VALUES ($1, $2)
                     ON CONFLICT (workload) DO UPDATE SET body = excluded.body",
                    &[&q.workload, &body],
                )
                .await?;
            }
            QuarantineChange::Lift(w) => {
                t.execute("DELETE FROM quarantines WHERE workload = $1", &[w])
                    .await?;
            }
        }
    }
    Ok(())
}

fn grant_from_body(body: &str) -> Result<Grant, StoreError> {
    serde_json::from_str(body)
        .map_err(|e| StoreError::Corrupt(format!("grant record does not parse: {e}")))
}

fn entry_from_row(r: &tokio_postgres::Row) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: to_u64(r.try_get(0).map_err(pg_err)?),
        at: r.try_get(1).map_err(pg_err)?,
        kind: r.try_get(2).map_err(pg_err)?,
        grant_id: r.try_get(3).map_err(pg_err)?,
        actor: r.try_get(4).map_err(pg_err)?,
        data: r.try_get(5).map_err(pg_err)?,
        prev_hash: r.try_get(6).map_err(pg_err)?,
        hash: r.try_get(7).map_err(pg_err)?,
    })
}

fn limit(n: usize, default: i64) -> i64 {
    if n == 0 {
        default
    } else {
        i64::try_from(n.min(10_000)).unwrap_or(default)
    }
}

#[async_trait]
impl Store for PgStore {
    async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.send(|tx| Job::Commit(batch, tx)).await
    }

    async fn grant(&self, id: GrantId) -> Result<Option<Grant>, StoreError> {
        let id = id.to_string();
        Ok(self
            .grant_bodies("SELECT body FROM grants WHERE id = $1", &[&id])
            .await?
            .pop())
    }

    async fn grants(&self, filter: GrantFilter) -> Result<Vec<Grant>, StoreError> {
        // Only the conditions that apply, so the planner can use their index.
        let mut sql = String::from("SELECT body FROM grants WHERE TRUE");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut cond = |sql: &mut String, clause: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("${}", args.len())));
        };
        if let Some(st) = filter.state {
            cond(&mut sql, " AND state = ?", Box::new(st.as_str()));
        }
        if let Some(w) = filter.workload {
            cond(&mut sql, " AND workload = ?", Box::new(w));
        }
        if let Some(t) = filter.task {
            cond(&mut sql, " AND task_id = ?", Box::new(t));
        }
        if let Some(a) = filter.audience {
            cond(&mut sql, " AND audience = ?", Box::new(a));
        }
        if let Some(b) = filter.before {
            cond(
                &mut sql,
                " AND (created_at, id) < (?",
                Box::new(b.created_at.millis()),
            );
            cond(&mut sql, ", ?)", Box::new(b.id.to_string()));
        }
        cond(
            &mut sql,
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            Box::new(limit(filter.limit, 100)),
        );
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.grant_bodies(&sql, &refs).await
    }

    async fn due(&self, now: Timestamp, n: usize) -> Result<Vec<Grant>, StoreError> {
        self.grant_bodies(
            "SELECT body FROM grants WHERE state IN ('active', 'pending') AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
            &[&now.millis(), &limit(n, 100)],
        )
        .await
    }

    async fn cleanup_due(&self, now: Timestamp, n: usize) -> Result<Vec<Grant>, StoreError> {
        self.grant_bodies(
            "SELECT body FROM grants WHERE cleanup_at IS NOT NULL AND cleanup_at <= $1 ORDER BY cleanup_at LIMIT $2",
            &[&now.millis(), &limit(n, 100)],
        )
        .await
    }

    async fn audit(&self, after: u64, n: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let n = if n == 0 {
            1000
        } else {
            i64::try_from(n).unwrap_or(1000)
        };
        self.query(
            "SELECT seq, at, kind, grant_id, actor, data, prev_hash, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&to_i64(after), &n],
        )
        .await?
        .iter()
        .map(entry_from_row)
        .collect()
    }

    async fn audit_for(&self, grant: GrantId) -> Result<Vec<AuditEntry>, StoreError> {
        let id = grant.to_string();
        self.query(
            "SELECT seq, at, kind, grant_id, actor, data, prev_hash, hash FROM audit WHERE grant_id = $1 ORDER BY seq",
            &[&id],
        )
        .await?
        .iter()
        .map(entry_from_row)
        .collect()
    }

    async fn idle_due(&self, now: Timestamp, n: usize) -> Result<Vec<Grant>, StoreError> {
        self.grant_bodies(
            "SELECT body FROM grants WHERE idle_at IS NOT NULL AND idle_at <= $1 AND state = 'active' ORDER BY idle_at LIMIT $2",
            &[&now.millis(), &limit(n, 100)],
        )
        .await
    }

    async fn feed(&self, after: u64, n: usize) -> Result<Vec<FeedEntry>, StoreError> {
        self.query(
            "SELECT seq, at, grant_id, state, audience, jti, exp, reason FROM feed WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&to_i64(after), &limit(n, 1000)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(FeedEntry {
                seq: to_u64(r.try_get(0).map_err(pg_err)?),
                at: r.try_get(1).map_err(pg_err)?,
                grant_id: r.try_get(2).map_err(pg_err)?,
                state: r.try_get(3).map_err(pg_err)?,
                audience: r.try_get(4).map_err(pg_err)?,
                jti: r.try_get(5).map_err(pg_err)?,
                exp: r.try_get(6).map_err(pg_err)?,
                reason: r.try_get(7).map_err(pg_err)?,
            })
        })
        .collect()
    }

    async fn feed_head(&self) -> Result<u64, StoreError> {
        let rows = self
            .query("SELECT COALESCE(MAX(seq), 0) FROM feed", &[])
            .await?;
        let n: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(pg_err)?
            .unwrap_or(0);
        Ok(to_u64(n))
    }

    async fn count(&self, state: GrantState) -> Result<u64, StoreError> {
        let rows = self
            .query(
                "SELECT COUNT(*) FROM grants WHERE state = $1",
                &[&state.as_str()],
            )
            .await?;
        let n: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(pg_err)?
            .unwrap_or(0);
        Ok(to_u64(n))
    }

    async fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let rows = self
            .query(
                "SELECT seq, hash, kid, signature, at FROM audit_checkpoint WHERE id = 1 AND seq > 0",
                &[],
            )
            .await?;
        rows.first()
            .map(|r| {
                Ok(Checkpoint {
                    seq: to_u64(r.try_get(0).map_err(pg_err)?),
                    hash: r.try_get(1).map_err(pg_err)?,
                    kid: r.try_get(2).map_err(pg_err)?,
                    signature: r.try_get(3).map_err(pg_err)?,
                    at: r.try_get(4).map_err(pg_err)?,
                })
            })
            .transpose()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.send(Job::Ping).await
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.query(
            "SELECT kid, alg, public, sealed, created_at, activates_at, retires_at FROM signing_keys ORDER BY created_at, kid",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(KeyRecord {
                kid: r.try_get(0).map_err(pg_err)?,
                alg: r.try_get(1).map_err(pg_err)?,
                public: r.try_get(2).map_err(pg_err)?,
                sealed: r.try_get(3).map_err(pg_err)?,
                created_at: r.try_get(4).map_err(pg_err)?,
                activates_at: r.try_get(5).map_err(pg_err)?,
                retires_at: r.try_get(6).map_err(pg_err)?,
            })
        })
        .collect()
    }

    async fn quarantine(&self, workload: &str) -> Result<Option<Quarantine>, StoreError> {
        let work = async {
            let c = self.client().await?;
            let stmt = c
                .prepare_cached("SELECT body FROM quarantines WHERE workload = $1")
                .await
                .map_err(pg_err)?;
            match c.query_opt(&stmt, &[&workload]).await.map_err(pg_err)? {
                Some(r) => Ok(Some(quarantine_from_body(
                    &r.try_get::<_, String>(0).map_err(pg_err)?,
                )?)),
                None => Ok(None),
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Unavailable("postgres: timed out".into()))?
    }

    async fn quarantines(&self) -> Result<Vec<Quarantine>, StoreError> {
        let work = async {
            let c = self.client().await?;
            let rows = c
                .query("SELECT body FROM quarantines ORDER BY workload", &[])
                .await
                .map_err(pg_err)?;
            rows.iter()
                .map(|r| quarantine_from_body(&r.try_get::<_, String>(0).map_err(pg_err)?))
                .collect()
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Unavailable("postgres: timed out".into()))?
    }

    async fn spent_nonces(&self, values: &[String]) -> Result<Vec<String>, StoreError> {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let work = async {
            let c = self.client().await?;
            let stmt = c
                .prepare_cached("SELECT value FROM nonces WHERE value = ANY($1)")
                .await
                .map_err(pg_err)?;
            let rows = c.query(&stmt, &[&values]).await.map_err(pg_err)?;
            rows.iter()
                .map(|r| r.try_get::<_, String>(0).map_err(pg_err))
                .collect()
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Unavailable("postgres: timed out".into()))?
    }

    async fn prune_nonces(&self, now: Timestamp) -> Result<u64, StoreError> {
        let work = async {
            let c = self.client().await?;
            c.execute("DELETE FROM nonces WHERE expires_at < $1", &[&now.millis()])
                .await
                .map_err(pg_err)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Unavailable("postgres: timed out".into()))?
    }

    async fn try_lead(&self, lease: Duration) -> Result<Option<u64>, StoreError> {
        // One statement: renew our own lease, or take one that lapsed (a new term,
        // a higher generation); no row when another holds an unexpired lease. The
        // row lock orders it after any leader-only write that checked the old
        // generation (they read it `FOR SHARE`), so no write of an old term can
        // land after the new one began.
        let ms = to_i64(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let work = async {
            let c = self.client().await?;
            let stmt = c
                .prepare_cached(
                    "UPDATE leader_lease SET \
                       generation = CASE WHEN holder = $1 AND expires_at > clock_timestamp() \
                                         THEN generation ELSE generation + 1 END, \
                       holder = $1, \
                       expires_at = clock_timestamp() + make_interval(secs => $2::bigint / 1000.0) \
                     WHERE id = 1 AND (holder = $1 OR expires_at <= clock_timestamp()) \
                     RETURNING generation",
                )
                .await
                .map_err(pg_err)?;
            let rows = c.query(&stmt, &[&self.holder, &ms]).await.map_err(pg_err)?;
            match rows.first() {
                Some(r) => Ok(Some(to_u64(r.try_get(0).map_err(pg_err)?))),
                None => Ok(None),
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Unavailable("postgres: timed out".into()))?
    }

    fn feed_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.feed.clone())
    }
}
