//! PostgreSQL: one real, short-lived login role per grant.
//!
//! Privileges are not granted to each generated role. At first use the provider
//! makes one group role per configured action (`<prefix>_<audience>_<action>`,
//! `NOLOGIN`) holding that action's privileges; a grant's role only joins the groups
//! of its actions. Creating a credential is then one transaction of four statements
//! in one round trip, and revoking privileges is dropping the role.
//!
//! The groups' privileges follow the schemas as they are at each issue: before a
//! credential is created, one query looks for relations of its actions' schemas
//! that the groups lack privileges on (tables made after Lapse started, by any
//! owner, and the sequences behind `serial` columns), and only when it finds some
//! are they granted. `ALTER DEFAULT PRIVILEGES` would not do: it applies only to
//! objects created by the role it names, and the admin can name only roles it is
//! a member of. Relations the admin holds no grant option on are skipped (and
//! logged): the admin cannot pass on what it was not given.
//!
//! The password reaches PostgreSQL only as a SCRAM-SHA-256 verifier computed here,
//! so the server neither hashes nor logs it. `VALID UNTIL` is the grant's expiry,
//! so PostgreSQL refuses new logins after it even if Lapse is down.
//!
//! Destroying is deliberately not one transaction: `NOLOGIN` commits first so no new
//! session can start, then live sessions are terminated and counted until none is
//! left, and only then is the role dropped.
//!
//! Least privilege for the admin connection (documented in README):
//! `CREATEROLE`, membership in `pg_signal_backend`, the configured privileges on
//! the configured schemas' tables and USAGE, SELECT on their sequences, all
//! `WITH GRANT OPTION` (for tables made later: default privileges set by their
//! owner), and (PostgreSQL 15+)
//! `GRANT SET ON PARAMETER log_statement` when statement logging is on.

pub mod privileges;
pub mod scram;
pub mod sql;
pub mod statements;

pub use privileges::{PrivilegeConfig, TABLE_PRIVILEGES};

use crate::{
    CredentialProvider, CredentialSpec, Destroyed, Existing, Handout, ProviderError, Secret, Stray,
    StrayKind,
};
use async_trait::async_trait;
use lapse_core::{GrantId, Timestamp};
use serde::Deserialize;
use sql::QuoteError;
use statements::{Template, Values};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OnceCell, Semaphore};

const MARKER: &str = "lapse:";

/// `[[postgres]]` in `lapse.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The audience whose grants get a database role.
    pub audience: String,
    /// Where the admin connection string is: `env:NAME` or `file:/path`. Never the
    /// string itself, so config files can be shared and logged.
    pub admin_url: String,
    /// Generated role names start with this (`[a-z][a-z0-9_]*`, at most 16 bytes).
    #[serde(default = "default_prefix")]
    pub role_prefix: String,
    /// `CONNECTION LIMIT` of each generated role.
    #[serde(default = "default_connection_limit")]
    pub connection_limit: i32,
    /// An existing role every generated role also joins, so `pg_hba.conf` can
    /// require password authentication for them (`host all +GROUP … scram-sha-256`).
    pub login_group: Option<String>,
    /// `log_statement` for generated roles: `all` (default), `mod`, `ddl` or `none`
    /// (`none` leaves the server's setting alone).
    #[serde(default = "default_log_statement")]
    pub log_statement: String,
    /// Host and port handed to the requester; default: those of the admin URL.
    pub public_host: Option<String>,
    pub public_port: Option<u16>,
    /// Admin connections kept open.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// PBKDF2 iterations of the SCRAM-SHA-256 verifier (1..=1,000,000). See
    /// [`scram::DEFAULT_ITERATIONS`] for why the default is low for
    /// Lapse's 256-bit generated passwords.
    #[serde(default = "default_scram_iterations")]
    pub scram_iterations: u32,
    /// What each action means in this database.
    #[serde(default, rename = "grant")]
    pub grants: Vec<PrivilegeConfig>,
    /// `ALTER ROLE … SET idle_session_timeout` (PostgreSQL 14+): the server ends a
    /// session of the role idle this long, also while Lapse is down.
    #[serde(default)]
    pub idle_session_timeout: Option<lapse_core::TtlDuration>,
    /// `ALTER ROLE … SET statement_timeout`: no statement of the role runs longer.
    #[serde(default)]
    pub statement_timeout: Option<lapse_core::TtlDuration>,
    /// Statements run in the transaction that creates each role, after Lapse's
    /// own (see [`statements`] for the placeholders).
    #[serde(default)]
    pub creation: Vec<String>,
    /// Statements run once the role's sessions are gone, before it is dropped.
    #[serde(default)]
    pub revocation: Vec<String>,
}

/// The longest per-role timeout accepted: a day (they bound sessions of tasks).
const MAX_ROLE_TIMEOUT_SECS: u64 = 86_400;

fn default_prefix() -> String {
    "lapse".into()
}
fn default_connection_limit() -> i32 {
    2
}
fn default_log_statement() -> String {
    "all".into()
}
fn default_pool() -> usize {
    8
}
fn default_scram_iterations() -> u32 {
    scram::DEFAULT_ITERATIONS
}

impl PostgresConfig {
    /// Checks everything that can be checked without a database.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.role_prefix;
        let ok_prefix = !p.is_empty()
            && p.len() <= 16
            && p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_prefix {
            return Err(format!(
                "`role_prefix` `{p}` must be 1-16 of [a-z0-9_], starting with a letter"
            ));
        }
        if !(1..=1000).contains(&self.connection_limit) {
            return Err("`connection_limit` must be 1..=1000".into());
        }
        if !["all", "mod", "ddl", "none"].contains(&self.log_statement.as_str()) {
            return Err(format!(
                "`log_statement` `{}` must be all, mod, ddl or none",
                self.log_statement
            ));
        }
        if !(self.admin_url.starts_with("env:") || self.admin_url.starts_with("file:")) {
            return Err(
                "`admin_url` must say where the connection string is (`env:NAME` or `file:/path`), not contain it"
                    .into(),
            );
        }
        if !(1..=scram::MAX_ITERATIONS).contains(&self.scram_iterations) {
            return Err(format!(
                "`scram_iterations` must be 1..={}",
                scram::MAX_ITERATIONS
            ));
        }
        if self.pool_size == 0 || self.pool_size > 64 {
            return Err("`pool_size` must be 1..=64".into());
        }
        if self.grants.is_empty() {
            return Err(format!(
                "audience `{}`: at least one [[postgres.grant]] is needed",
                self.audience
            ));
        }
        for g in &self.grants {
            g.validate()?;
        }
        for (key, t) in [
            ("idle_session_timeout", self.idle_session_timeout),
            ("statement_timeout", self.statement_timeout),
        ] {
            if let Some(t) = t
                && !(1..=MAX_ROLE_TIMEOUT_SECS).contains(&t.secs())
            {
                return Err(format!("`{key}` must be between 1s and 24h"));
            }
        }
        self.templates()?;
        if let Some(g) = &self.login_group {
            sql::ident(g).map_err(|e| format!("`login_group`: {e}"))?;
        }
        Ok(())
    }

    /// The `creation` and `revocation` statements, parsed.
    fn templates(&self) -> Result<(Vec<Template>, Vec<Template>), String> {
        let parse = |key: &str, list: &[String]| {
            list.iter()
                .enumerate()
                .map(|(i, t)| Template::parse(t).map_err(|e| format!("`{key}[{i}]` {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok((
            parse("creation", &self.creation)?,
            parse("revocation", &self.revocation)?,
        ))
    }

    /// Reads the admin connection string from where `admin_url` points.
    fn admin_connection_string(&self) -> Result<String, ProviderError> {
        crate::read_admin_secret(&self.admin_url, &self.audience)
    }
}

/// A small pool of admin connections.
struct Pool {
    config: tokio_postgres::Config,
    tls: lapse_pg::Tls,
    idle: Mutex<Vec<tokio_postgres::Client>>,
    permits: Arc<Semaphore>,
    target: String,
}

struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<tokio_postgres::Client>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        // INVARIANT: `client` is Some from construction until drop.
        #[allow(clippy::unwrap_used)]
        self.client.as_ref().unwrap()
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take()
            && !c.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(c);
        }
    }
}

impl Pool {
    async fn get(&self) -> Result<Pooled<'_>, ProviderError> {
        let permit =
            self.permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ProviderError::Unavailable {
                    target: self.target.clone(),
                    message: "the provider is shutting down".into(),
                })?;
        let reused = self.idle.lock().ok().and_then(|mut v| {
            while let Some(c) = v.pop() {
                if !c.is_closed() {
                    return Some(c);
                }
            }
            None
        });
        let client = match reused {
            Some(c) => c,
            None => {
                let (client, conn) = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.config.connect(self.tls.clone()),
                )
                .await
                .map_err(|_| ProviderError::Unavailable {
                    target: self.target.clone(),
                    message: "admin connection timed out after 5 s".into(),
                })?
                .map_err(|e| ProviderError::Unavailable {
                    target: self.target.clone(),
                    message: e.to_string(),
                })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "admin connection closed");
                    }
                });
                client
            }
        };
        Ok(Pooled {
            pool: self,
            client: Some(client),
            _permit: permit,
        })
    }
}

pub struct PostgresProvider {
    cfg: PostgresConfig,
    pool: Pool,
    /// action -> group role name.
    groups: BTreeMap<String, String>,
    prepared: OnceCell<()>,
    host: String,
    port: u16,
    dbname: String,
    creation: Vec<Template>,
    revocation: Vec<Template>,
}

/// A LIKE pattern matching strings that start with `s`.
fn like_prefix(s: &str) -> String {
    format!(
        "{}%",
        s.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

fn q(e: QuoteError) -> ProviderError {
    ProviderError::Config(e.to_string())
}

impl PostgresProvider {
    /// Builds the provider; connects lazily (the database may come up after Lapse).
    pub fn new(cfg: PostgresConfig) -> Result<Self, ProviderError> {
        cfg.validate().map_err(ProviderError::Config)?;
        let url = cfg.admin_connection_string()?;
        // The parse error could quote the string (and its password): say where it
        // came from instead.
        let (mut pg, tls) = lapse_pg::config(&url).map_err(|e| {
            // The string itself is never quoted (it holds a password): where it
            // came from instead.
            let why = match e {
                lapse_pg::PgConfigError::Parse(_) => "does not parse".to_owned(),
                other => other.to_string(),
            };
            ProviderError::Config(format!(
                "audience `{}`: the connection string in `{}`: {why}",
                cfg.audience, cfg.admin_url
            ))
        })?;
        // Every statement on the target is bounded: a role that cannot be dropped
        // because something holds a lock fails (and is retried with backoff) rather
        // than hanging a grant's ending.
        let bounded = "-c statement_timeout=10000 -c lock_timeout=5000";
        let options = match pg.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {bounded}"),
            _ => bounded.to_owned(),
        };
        pg.options(&options);
        let host = cfg.public_host.clone().unwrap_or_else(|| {
            pg.get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    #[allow(unreachable_patterns)]
                    _ => "localhost".to_owned(),
                })
                .unwrap_or_else(|| "localhost".to_owned())
        });
        let port = cfg
            .public_port
            .unwrap_or_else(|| pg.get_ports().first().copied().unwrap_or(5432));
        let dbname = pg.get_dbname().unwrap_or("postgres").to_owned();
        let mut groups = BTreeMap::new();
        let audience = sql::slug(&cfg.audience, 24);
        for g in &cfg.grants {
            let name = format!(
                "{}_{}_{}",
                cfg.role_prefix,
                audience,
                sql::slug(&g.action, 16)
            );
            sql::ident(&name).map_err(q)?;
            groups.insert(g.action.clone(), name);
        }
        let (creation, revocation) = cfg.templates().map_err(ProviderError::Config)?;
        Ok(Self {
            creation,
            revocation,
            pool: Pool {
                config: pg,
                tls,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(cfg.pool_size)),
                target: cfg.audience.clone(),
            },
            groups,
            prepared: OnceCell::new(),
            host,
            port,
            dbname,
            cfg,
        })
    }

    /// The group role of each configured action.
    pub fn groups(&self) -> &BTreeMap<String, String> {
        &self.groups
    }

    fn step(&self, step: &'static str) -> impl Fn(tokio_postgres::Error) -> ProviderError + '_ {
        move |e| {
            let message = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            if e.as_db_error().is_none() {
                ProviderError::Unavailable {
                    target: self.cfg.audience.clone(),
                    message,
                }
            } else {
                ProviderError::Step {
                    target: self.cfg.audience.clone(),
                    step,
                    message,
                }
            }
        }
    }

    /// The comment that marks a role as this provider's. The prefix is part of it
    /// so two Lapse installations sharing a cluster (with different prefixes)
    /// never reconcile each other's roles.
    fn marker(&self, grant: GrantId) -> String {
        format!("{}{grant}", self.marker_base())
    }

    fn marker_base(&self) -> String {
        format!(
            "{MARKER}prefix={};target={};grant=",
            self.cfg.role_prefix, self.cfg.audience
        )
    }

    /// Makes (or brings up to date) the group roles and their USAGE on the schemas.
    /// Runs once per process before the first credential; idempotent. Privileges on
    /// the schemas' relations are kept current on every issue
    /// ([`Self::sync_privileges`]).
    async fn prepare_groups(&self) -> Result<(), ProviderError> {
        self.prepared
            .get_or_try_init(|| async {
                let c = self.pool.get().await?;
                self.check_admin(&c).await?;
                self.check_target(&c).await?;
                let mut by_action: BTreeMap<&str, Vec<&PrivilegeConfig>> = BTreeMap::new();
                for g in &self.cfg.grants {
                    by_action.entry(g.action.as_str()).or_default().push(g);
                }
                for (action, grants) in by_action {
                    let Some(group) = self.groups.get(action) else {
                        continue;
                    };
                    let exists = c
                        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[group])
                        .await
                        .map_err(self.step("look up group role"))?
                        .is_some();
                    let g = sql::ident(group).map_err(q)?;
                    let mut script = String::from("BEGIN;\n");
                    if !exists {
                        script.push_str(&format!("CREATE ROLE {g} NOLOGIN;\n"));
                    }
                    script.push_str(&format!(
                        "COMMENT ON ROLE {g} IS {};\n",
                        sql::literal(&format!(
                            "lapse group: audience {} action {action}",
                            self.cfg.audience
                        ))
                        .map_err(q)?
                    ));
                    let schemas: BTreeSet<&str> =
                        grants.iter().map(|p| p.schema.as_str()).collect();
                    for s in schemas {
                        script.push_str(&format!(
                            "GRANT USAGE ON SCHEMA {} TO {g};\n",
                            sql::ident(s).map_err(q)?
                        ));
                    }
                    script.push_str("COMMIT;");
                    if let Err(e) = c.batch_execute(&script).await {
                        let _ = c.batch_execute("ROLLBACK").await;
                        return Err(self.step("set up group role")(e));
                    }
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// The admin role must be able to do what a revoke needs, found now rather
    /// than at the first revoke: create and alter roles (`CREATEROLE`) and end
    /// other roles' sessions (`pg_signal_backend`).
    async fn check_admin(&self, c: &tokio_postgres::Client) -> Result<(), ProviderError> {
        let row = c
            .query_one(
                "SELECT rolsuper, rolcreaterole, pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(self.step("check the admin role"))?;
        let (superuser, createrole, signal): (bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        let mut missing = Vec::new();
        if !superuser && !createrole {
            missing.push("CREATEROLE");
        }
        if !superuser && !signal {
            missing.push("membership in pg_signal_backend (to end sessions)");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ProviderError::Unfit {
                target: self.cfg.audience.clone(),
                message: format!("the admin role lacks {}", missing.join(" and ")),
            })
        }
    }

    /// What the config names must exist in the database and be the admin's to
    /// pass on, and the operator's statements must run: all found at start.
    async fn check_target(&self, c: &tokio_postgres::Client) -> Result<(), ProviderError> {
        let unfit = |message: String| ProviderError::Unfit {
            target: self.cfg.audience.clone(),
            message,
        };
        if self.cfg.idle_session_timeout.is_some() {
            let v: i32 = c
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await
                .map_err(self.step("read the server version"))?
                .get(0);
            if v < 140_000 {
                return Err(unfit(format!(
                    "`idle_session_timeout` needs PostgreSQL 14 or later (this is {v})"
                )));
            }
        }
        for g in &self.cfg.grants {
            let (a, schema) = (&g.action, &g.schema);
            let row = c
                .query_opt(
                    "SELECT has_schema_privilege(oid, 'USAGE WITH GRANT OPTION') FROM pg_namespace WHERE nspname = $1",
                    &[schema],
                )
                .await
                .map_err(self.step("look up schemas"))?;
            match row.map(|r| r.get::<_, bool>(0)) {
                None => {
                    return Err(unfit(format!(
                        "action `{a}`: schema `{schema}` does not exist"
                    )));
                }
                Some(false) => {
                    return Err(unfit(format!(
                        "action `{a}`: the admin role lacks USAGE WITH GRANT OPTION on schema `{schema}`"
                    )));
                }
                Some(true) => {}
            }
            let table_privileges: Vec<String> = g
                .privileges
                .iter()
                .map(|p| p.to_ascii_uppercase())
                .filter(|p| p != privileges::EXECUTE)
                .collect();
            for t in &g.tables {
                let row = c
                    .query_opt(
                        "SELECT ARRAY(SELECT p FROM unnest($3::text[]) p
                                      WHERE NOT has_table_privilege(c.oid, p || ' WITH GRANT OPTION'))
                         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                        &[schema, t, &table_privileges],
                    )
                    .await
                    .map_err(self.step("look up tables"))?;
                match row.map(|r| r.get::<_, Vec<String>>(0)) {
                    None => {
                        return Err(unfit(format!(
                            "action `{a}`: table `{schema}.{t}` does not exist"
                        )));
                    }
                    Some(lacking) if !lacking.is_empty() => {
                        return Err(unfit(format!(
                            "action `{a}`: the admin role lacks {} WITH GRANT OPTION on `{schema}.{t}`",
                            lacking.join(", ")
                        )));
                    }
                    Some(_) => {}
                }
            }
            for f in &g.functions {
                let found: i64 = c
                    .query_one(
                        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                         WHERE n.nspname = $1 AND p.proname = $2",
                        &[schema, f],
                    )
                    .await
                    .map_err(self.step("look up routines"))?
                    .get(0);
                if found == 0 {
                    return Err(unfit(format!(
                        "action `{a}`: routine `{schema}.{f}` does not exist"
                    )));
                }
            }
        }
        self.probe_statements(c).await
    }

    /// Runs the `creation` and `revocation` statements for a throwaway role in a
    /// transaction that is rolled back, so a typo or a missing privilege shows
    /// now, not when the first grant is issued or ends.
    async fn probe_statements(&self, c: &tokio_postgres::Client) -> Result<(), ProviderError> {
        if self.creation.is_empty() && self.revocation.is_empty() {
            return Ok(());
        }
        let name = format!(
            "{}_probe_{:016x}",
            self.cfg.role_prefix,
            rand::random::<u64>()
        );
        let v = Values {
            name: &name,
            grant: "gr_00000000000000000000000000000000",
            audience: &self.cfg.audience,
            valid_until: &Timestamp::from_millis(0).rfc3339(),
        };
        let script = format!(
            "BEGIN;\nCREATE ROLE {} NOLOGIN;\n{}{}ROLLBACK;",
            sql::ident(&name).map_err(q)?,
            statements::script(&self.creation, &v).map_err(q)?,
            statements::script(&self.revocation, &v).map_err(q)?
        );
        let r = c.batch_execute(&script).await;
        let _ = c.batch_execute("ROLLBACK").await;
        r.map_err(|e| ProviderError::Unfit {
            target: self.cfg.audience.clone(),
            message: format!(
                "the `creation`/`revocation` statements fail on a trial role: {}",
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned())
            ),
        })
    }

    /// Grants the groups of `actions` what they lack on the relations of their
    /// schemas as they are now: the configured table privileges on tables, views,
    /// materialized views and foreign and partitioned tables, and what those need
    /// on sequences ([`privileges::sequence_privileges`]), scoped as configured. One query when nothing is missing
    /// (the usual case); one more transaction when something is. [`Self::create`]
    /// runs it first; exposed so an operator tool (or a test) can run it alone.
    pub async fn sync_privileges(&self, actions: &[String]) -> Result<(), ProviderError> {
        self.prepare_groups().await?;
        let c = self.pool.get().await?;
        self.grant_current(&c, actions).await
    }

    async fn grant_current(
        &self,
        c: &tokio_postgres::Client,
        actions: &[String],
    ) -> Result<(), ProviderError> {
        let wanted = privileges::wanted(&self.cfg.grants, &self.groups, actions);
        if wanted.is_empty() {
            return Ok(());
        }
        let [groups, schemas, kinds, privs, objects] = &privileges::columns(&wanted);
        let rows = c
            .query(
                privileges::MISSING,
                &[groups, schemas, kinds, privs, objects],
            )
            .await
            .map_err(self.step("look up missing privileges"))?;
        if rows.is_empty() {
            return Ok(());
        }
        let missing: Vec<privileges::Missing> = rows
            .iter()
            .map(|r| privileges::Missing {
                group: r.get(0),
                kind: r.get(1),
                privilege: r.get(2),
                target: r.get(3),
                grantable: r.get::<_, Option<bool>>(4) == Some(true),
            })
            .collect();
        let (script, cannot) = privileges::grant_script(&missing).map_err(q)?;
        if !cannot.is_empty() {
            tracing::warn!(
                target = %self.cfg.audience,
                missing = ?cannot,
                "the admin role holds no grant option on these, so grants cannot use them"
            );
        }
        let Some(script) = script else {
            return Ok(());
        };
        if let Err(e) = c.batch_execute(&script).await {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(self.step("grant privileges to group roles")(e));
        }
        tracing::info!(
            target = %self.cfg.audience,
            objects = missing.len() - cannot.len(),
            "granted the group roles privileges they lacked"
        );
        Ok(())
    }

    /// The operator's `revocation` statements, in one transaction. The marker
    /// (the role's comment) gives back the grant and expiry they may name.
    async fn run_revocation(
        &self,
        c: &tokio_postgres::Client,
        name: &str,
    ) -> Result<(), ProviderError> {
        let row = c
            .query_opt(
                "SELECT shobj_description(oid, 'pg_authid'), rolvaliduntil::text FROM pg_roles WHERE rolname = $1",
                &[&name],
            )
            .await
            .map_err(self.step("read the role for its revocation statements"))?;
        let (comment, until): (Option<String>, Option<String>) =
            row.map_or((None, None), |r| (r.get(0), r.get(1)));
        let grant = comment
            .as_deref()
            .and_then(|c| c.rsplit_once(";grant="))
            .map(|(_, g)| g.to_owned())
            .unwrap_or_default();
        let v = Values {
            name,
            grant: &grant,
            audience: &self.cfg.audience,
            valid_until: until.as_deref().unwrap_or("infinity"),
        };
        let script = format!(
            "BEGIN;\n{}COMMIT;",
            statements::script(&self.revocation, &v).map_err(q)?
        );
        if let Err(e) = c.batch_execute(&script).await {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(self.step("run the revocation statements")(e));
        }
        Ok(())
    }

    async fn sessions_on(
        &self,
        c: &tokio_postgres::Client,
        name: &str,
    ) -> Result<i64, ProviderError> {
        let row = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&name],
            )
            .await
            .map_err(self.step("count sessions"))?;
        Ok(row.get::<_, i64>(0))
    }
}

#[async_trait]
impl CredentialProvider for PostgresProvider {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn target(&self) -> &str {
        &self.cfg.audience
    }

    fn name_for(&self, grant: GrantId) -> String {
        // `GrantId` renders as `gr_` + 32 hex digits: safe and unique.
        format!("{}_{grant}", self.cfg.role_prefix)
    }

    async fn prepare(&self) -> Result<(), ProviderError> {
        self.prepare_groups().await
    }

    fn unmapped(&self, actions: &[&str]) -> Vec<String> {
        actions
            .iter()
            .filter(|a| !self.groups.contains_key(**a))
            .map(|a| (*a).to_owned())
            .collect()
    }

    async fn sessions(&self, name: &str) -> Result<i64, ProviderError> {
        let c = self.pool.get().await?;
        self.sessions_on(&c, name).await
    }

    async fn create(
        &self,
        spec: &CredentialSpec,
        secret: &Secret,
    ) -> Result<Handout, ProviderError> {
        self.prepare_groups().await?;
        let name = sql::ident(&spec.name).map_err(q)?;
        let mut groups: Vec<String> = Vec::new();
        for a in &spec.actions {
            if let Some(g) = self.groups.get(a) {
                groups.push(sql::ident(g).map_err(q)?);
            }
        }
        if let Some(g) = &self.cfg.login_group {
            groups.push(sql::ident(g).map_err(q)?);
        }
        let c = self.pool.get().await?;
        // Key stretching is CPU-bound: keep it off the async workers. Meanwhile the
        // admin connection brings the groups' privileges up to date.
        let password = secret.clone();
        let iterations = self.cfg.scram_iterations;
        let stretch =
            tokio::task::spawn_blocking(move || scram::verifier(password.expose(), iterations));
        let (verifier, granted) = tokio::join!(stretch, self.grant_current(&c, &spec.actions));
        granted?;
        let verifier = verifier.map_err(|e| ProviderError::Step {
            target: self.cfg.audience.clone(),
            step: "compute SCRAM verifier",
            message: e.to_string(),
        })?;
        let valid_until = spec.valid_until.rfc3339();
        let mut script = format!(
            "BEGIN;\nCREATE ROLE {name} LOGIN INHERIT PASSWORD {} VALID UNTIL {} CONNECTION LIMIT {}{};\n",
            sql::literal(&verifier).map_err(q)?,
            sql::literal(&valid_until).map_err(q)?,
            self.cfg.connection_limit,
            if groups.is_empty() {
                String::new()
            } else {
                format!(" IN ROLE {}", groups.join(", "))
            }
        );
        script.push_str(&format!(
            "COMMENT ON ROLE {name} IS {};\n",
            sql::literal(&self.marker(spec.grant)).map_err(q)?
        ));
        script.push_str(&format!(
            "ALTER ROLE {name} SET application_name = {};\n",
            sql::literal(&format!("lapse {}", spec.grant)).map_err(q)?
        ));
        if self.cfg.log_statement != "none" {
            script.push_str(&format!(
                "ALTER ROLE {name} SET log_statement = {};\n",
                sql::literal(&self.cfg.log_statement).map_err(q)?
            ));
        }
        for (key, t) in [
            ("idle_session_timeout", self.cfg.idle_session_timeout),
            ("statement_timeout", self.cfg.statement_timeout),
        ] {
            if let Some(t) = t {
                script.push_str(&format!(
                    "ALTER ROLE {name} SET {key} = {};\n",
                    t.secs().saturating_mul(1000)
                ));
            }
        }
        let grant = spec.grant.to_string();
        script.push_str(
            &statements::script(
                &self.creation,
                &Values {
                    name: &spec.name,
                    grant: &grant,
                    audience: &self.cfg.audience,
                    valid_until: &valid_until,
                },
            )
            .map_err(q)?,
        );
        script.push_str("COMMIT;");
        if let Err(e) = c.batch_execute(&script).await {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(self.step("create role")(e));
        }
        Ok(Handout {
            kind: "postgres",
            audience: self.cfg.audience.clone(),
            host: self.host.clone(),
            port: self.port,
            dbname: self.dbname.clone(),
            username: spec.name.clone(),
            password: secret.expose().to_owned(),
            valid_until,
        })
    }

    async fn extend(&self, name: &str, valid_until: Timestamp) -> Result<(), ProviderError> {
        let c = self.pool.get().await?;
        c.batch_execute(&format!(
            "ALTER ROLE {} VALID UNTIL {}",
            sql::ident(name).map_err(q)?,
            sql::literal(&valid_until.rfc3339()).map_err(q)?
        ))
        .await
        .map_err(self.step("extend VALID UNTIL"))
    }

    async fn destroy(&self, name: &str) -> Result<Destroyed, ProviderError> {
        let role = sql::ident(name).map_err(q)?;
        let c = self.pool.get().await?;
        // 1. No new sessions. Commits on its own, before anything else happens.
        let existed = match c.batch_execute(&format!("ALTER ROLE {role} NOLOGIN")).await {
            Ok(()) => true,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => false,
            Err(e) => return Err(self.step("forbid login")(e)),
        };
        // 2. End the live ones, then wait until PostgreSQL shows none (termination
        // is a signal; the backend exits a moment later).
        let terminated: i64 = c
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&name],
            )
            .await
            .map_err(self.step("terminate sessions"))?
            .iter()
            .filter(|r| r.get::<_, Option<bool>>(0) == Some(true))
            .count()
            .try_into()
            .unwrap_or(i64::MAX);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut left = self.sessions_on(&c, name).await?;
        while left > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            left = self.sessions_on(&c, name).await?;
        }
        if left > 0 {
            return Err(ProviderError::SessionsLeft {
                target: self.cfg.audience.clone(),
                name: name.to_owned(),
                left,
            });
        }
        // 3. Privileges go with the role (its memberships are dropped with it). A
        // role can only own something if privileges were widened by hand; then hand
        // it to the admin and drop it, rather than fail forever.
        if existed && !self.revocation.is_empty() {
            self.run_revocation(&c, name).await?;
        }
        if existed {
            match c
                .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
                .await
            {
                Ok(()) => {}
                Err(e)
                    if e.code()
                        == Some(
                            &tokio_postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
                        ) =>
                {
                    let script = format!(
                        "BEGIN;\nGRANT {role} TO CURRENT_USER;\nREASSIGN OWNED BY {role} TO CURRENT_USER;\nDROP OWNED BY {role};\nDROP ROLE {role};\nCOMMIT;"
                    );
                    if let Err(e) = c.batch_execute(&script).await {
                        let _ = c.batch_execute("ROLLBACK").await;
                        return Err(self.step("drop owned objects and role")(e));
                    }
                }
                Err(e) => return Err(self.step("drop role")(e)),
            }
        }
        Ok(Destroyed {
            existed,
            sessions_terminated: terminated,
            sessions_left: left,
        })
    }

    async fn list(&self) -> Result<Vec<Existing>, ProviderError> {
        let c = self.pool.get().await?;
        let like = like_prefix(&self.marker_base());
        let rows = c
            .query(
                "SELECT r.rolname::text, r.rolcanlogin,
                        extract(epoch FROM r.rolvaliduntil)::float8,
                        shobj_description(r.oid, 'pg_authid'),
                        (SELECT count(*) FROM pg_stat_activity a WHERE a.usename = r.rolname)
                 FROM pg_roles r
                 WHERE shobj_description(r.oid, 'pg_authid') LIKE $1",
                &[&like],
            )
            .await
            .map_err(self.step("list roles"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let comment: Option<String> = r.get(3);
                Existing {
                    name: r.get(0),
                    grant: comment
                        .as_deref()
                        .and_then(|c| c.rsplit_once(";grant="))
                        .and_then(|(_, g)| g.parse().ok()),
                    can_login: r.get(1),
                    valid_until: r
                        .get::<_, Option<f64>>(2)
                        .filter(|v| v.is_finite())
                        .map(|v| v as i64),
                    sessions: r.get(4),
                }
            })
            .collect())
    }

    /// Roles named like this provider's credentials (`<prefix>_gr_<32 hex>`)
    /// without the marker of a Lapse installation using this prefix, and members of
    /// this provider's group roles that are not credentials it made (the admin
    /// itself excepted: PostgreSQL 16 makes it a member of the roles it creates).
    async fn strays(&self) -> Result<Vec<Stray>, ProviderError> {
        let c = self.pool.get().await?;
        let name_pattern = format!("^{}_gr_[0-9a-f]{{32}}$", self.cfg.role_prefix);
        let installation = like_prefix(&format!("{MARKER}prefix={};", self.cfg.role_prefix));
        let ours = like_prefix(&self.marker_base());
        let groups: Vec<&str> = self.groups.values().map(String::as_str).collect();
        let rows = c
            .query(
                "SELECT * FROM (
                   SELECT r.rolname::text AS name, r.rolcanlogin,
                          (SELECT count(*) FROM pg_stat_activity a WHERE a.usename = r.rolname),
                          r.rolname ~ $1 AND r.rolname <> ALL($2)
                            AND coalesce(shobj_description(r.oid, 'pg_authid'), '') NOT LIKE $3
                            AS look_alike,
                          ARRAY(SELECT g.rolname::text FROM pg_auth_members m
                                JOIN pg_roles g ON g.oid = m.roleid
                                WHERE m.member = r.oid AND g.rolname = ANY($2)
                                ORDER BY 1) AS groups,
                          r.rolname <> current_user
                            AND coalesce(shobj_description(r.oid, 'pg_authid'), '') NOT LIKE $4
                            AS foreign_member
                   FROM pg_roles r
                 ) s
                 WHERE look_alike OR (foreign_member AND cardinality(groups) > 0)
                 ORDER BY name",
                &[&name_pattern, &groups, &installation, &ours],
            )
            .await
            .map_err(self.step("list look-alike roles and group members"))?;
        Ok(rows
            .iter()
            .map(|r| Stray {
                name: r.get(0),
                can_login: r.get(1),
                sessions: r.get(2),
                kind: if r.get::<_, bool>(3) {
                    StrayKind::LookAlike
                } else {
                    StrayKind::GroupMember
                },
                groups: r.get(4),
            })
            .collect())
    }
}
