//! MariaDB/MySQL: one real, short-lived account per grant.
//!
//! Each grant gets `` `<prefix>_<grant id in base32>`@`<host>` `` (see [`names`]:
//! 32 characters with the default prefix, MySQL's limit; MariaDB 10.6+ allows 128,
//! and `prepare` checks the server's), a password Lapse generated, `WITH
//! MAX_USER_CONNECTIONS n`, and the privileges of its actions granted directly
//! (`GRANT … ON db.* | db.table TO account`). On MariaDB the first `GRANT`
//! creates the account (`IDENTIFIED BY PASSWORD …`), half the privilege-table
//! rebuilds of `CREATE USER` + `GRANT`; a name that exists already is refused
//! first, never changed.
//!
//! Direct grants, not roles. Measured on MariaDB 10.11 (the ignored test
//! `create_cost_direct_grants_vs_roles`): an account with three `GRANT`s in one
//! round trip takes about 1.2 ms, one with a prepared role (`GRANT role`, `SET
//! DEFAULT ROLE`) about 0.65 ms; the provider's whole create, marker row
//! included, about 2.5-3 ms. Roles would save half a millisecond and cost more
//! elsewhere: MariaDB activates a single default role per user, so a grant of
//! two actions needs a role per combination of actions; the role syntax differs
//! between MariaDB and MySQL (and MySQL 5.7 has none); and roles holding
//! privileges are standing objects that outlive every grant. With direct grants,
//! dropping the user drops its privileges and nothing else is left.
//!
//! ## The marker
//! MariaDB has no comment or attribute on accounts (`ALTER USER … COMMENT` is a
//! syntax error on 10.11; MySQL 8 has one, MariaDB not), so Lapse keeps its
//! mark in a table of its own, `` `<marker_database>`.`lapse_marker` `` (default
//! database `lapse`), made by `prepare`: one row per account Lapse created, with
//! its prefix, audience and grant. [`CredentialProvider::list`] reports marked
//! accounts only, so a reconciler never drops an account Lapse did not make;
//! accounts named like Lapse's without a row are [`CredentialProvider::strays`].
//! The row is written before the account, so a crash in between leaves a row
//! without an account (harmless: it grants nothing and `destroy` removes it),
//! never an account without a row. `destroy` works from the name alone (it is
//! the grant's, 128 bits only Lapse generates), on every host of that name, so
//! revocation works even after `host` or the marker changed.
//!
//! ## Passwords
//! No statement can bind the password (`IDENTIFIED BY ?` is a syntax error on
//! MariaDB 10.11), and MariaDB writes `IDENTIFIED BY '<password>'` to its general
//! log as sent. On MariaDB the account is therefore created `IDENTIFIED BY
//! PASSWORD '<verifier>'` with the `mysql_native_password` verifier computed here
//! ([`native`]): the password never reaches the server. On MySQL (which has no
//! `IDENTIFIED BY PASSWORD`) it is sent as a literal quoted by [`sql::literal`];
//! MySQL rewrites passwords out of its logs. Error messages of that step are
//! scrubbed of both.
//!
//! ## Expiry when Lapse is down: not enforced by the server
//! MariaDB and MySQL have no `VALID UNTIL`. `PASSWORD EXPIRE INTERVAL N DAY`
//! counts whole days (useless for a task of minutes), and an expired password
//! still logs in to change itself. So nothing in the server ends a credential at
//! its grant's expiry: while the broker is down an account stays usable until the
//! broker is back, when the reconciler (at start) and the sweeper destroy what
//! outlived its grant. [`CredentialProvider::extend`] only checks the account is
//! still there, and [`Existing::valid_until`] is always `None`. (The event
//! scheduler could drop accounts on time, but it is off by default and events
//! run as their definer: not relied on.)
//!
//! ## Destroy
//! Not one transaction (account statements commit on their own): `ACCOUNT LOCK`
//! first, so no new session can start; then `KILL CONNECTION` for each of the
//! user's threads in `information_schema.PROCESSLIST`, polled (bounded) until none
//! is left, killing any that slipped in; only then `DROP USER` (which by itself
//! would leave live sessions running) and the marker row. Gone already is success.
//!
//! ## Least privilege for the admin account (MariaDB 10.5+; documented in README)
//! ```sql
//! CREATE USER 'lapse_admin'@'%' IDENTIFIED BY '…';
//! GRANT CREATE USER, PROCESS, CONNECTION ADMIN ON *.* TO 'lapse_admin'@'%';
//! GRANT SELECT ON mysql.global_priv TO 'lapse_admin'@'%';
//! GRANT CREATE, SELECT, INSERT, DELETE ON lapse.* TO 'lapse_admin'@'%';
//! -- what [[mysql.grant]] hands out, with the grant option, e.g.:
//! GRANT SELECT, INSERT, UPDATE, DELETE ON app.* TO 'lapse_admin'@'%' WITH GRANT OPTION;
//! ```
//! `CREATE USER` creates, locks and drops the accounts; `PROCESS` shows other
//! users' threads (without it `PROCESSLIST` lists only the admin's own);
//! `CONNECTION ADMIN` kills them (`SUPER` is not needed, though it would do);
//! `SELECT` on `mysql.global_priv` lists accounts and whether they are locked; the
//! `lapse` database holds the marker. Privileges must be granted to the admin
//! account directly, not through a role (see [`admin`]). In database-level
//! grants `_` is a wildcard: write `app\_db`.* for `app_db`. On MySQL 8:
//! `CONNECTION_ADMIN` and `SELECT ON mysql.user` instead (untested here).

pub mod admin;
pub mod names;
pub mod native;
pub mod sql;

use crate::{
    CredentialProvider, CredentialSpec, Destroyed, Existing, Handout, ProviderError, Secret, Stray,
    StrayKind,
};
use admin::{Held, Need, On};
use async_trait::async_trait;
use lapse_core::{GrantId, Timestamp};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, PoolConstraints, PoolOpts};
use serde::Deserialize;
use sql::QuoteError;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Privileges an action may map to: reading and changing data, never anything
/// that creates objects outliving the account, administers the server or passes
/// privileges on (`ALL`, `GRANT OPTION`, `SUPER`, `FILE`, `PROCESS`, `CREATE
/// USER`, `CREATE`, `DROP`, `ALTER`, `TRIGGER`, `EVENT`, … are refused at load).
pub const DATA_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "SHOW VIEW",
    "EXECUTE",
    "LOCK TABLES",
    "CREATE TEMPORARY TABLES",
];

/// The ones that exist at the table level; the others need `table = "*"`.
const TABLE_PRIVILEGES: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE", "SHOW VIEW"];

/// Databases a grant may never name.
const SYSTEM_DATABASES: &[&str] = &["mysql", "information_schema", "performance_schema", "sys"];

const MARKER_TABLE: &str = "lapse_marker";

/// `ER_CANNOT_USER`: the account does not exist (or already does).
const ER_CANNOT_USER: u16 = 1396;
/// `ER_NO_SUCH_THREAD`: the thread ended before `KILL` reached it.
const ER_NO_SUCH_THREAD: u16 = 1094;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `destroy` waits for killed threads to leave the process list.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// `[[mysql]]` in `lapse.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// The audience whose grants get an account.
    pub audience: String,
    /// Where the admin URL (`mysql://user:pass@host:port/db`) is: `env:NAME` or
    /// `file:/path`. Never the URL itself, so config files can be shared and
    /// logged. TLS: `?require_ssl=true` (the server's certificate is always
    /// verified; `verify_ca=false` and `verify_identity=false` are refused), with
    /// `&sslrootcert=/path.pem` for a private CA.
    pub admin_url: String,
    /// Generated user names start with this and `_` (`[a-z][a-z0-9_]*`, at most
    /// 16 characters; at most 5 on MySQL, whose names are at most 32).
    #[serde(default = "default_prefix")]
    pub user_prefix: String,
    /// The host part of each account (`%`: any; or a name, address, `10.0.%`, …).
    #[serde(default = "default_host")]
    pub host: String,
    /// `MAX_USER_CONNECTIONS` of each account.
    #[serde(default = "default_max_user_connections")]
    pub max_user_connections: u32,
    /// Host and port handed to the requester; default: those of the admin URL.
    pub public_host: Option<String>,
    pub public_port: Option<u16>,
    /// The database handed to the requester; default: the admin URL's.
    pub database: Option<String>,
    /// Where the marker table lives (created by `prepare`). No grant may name it.
    #[serde(default = "default_marker_database")]
    pub marker_database: String,
    /// Admin connections kept open.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// What each action means in this server.
    #[serde(default, rename = "grant")]
    pub grants: Vec<PrivilegeConfig>,
}

/// `[[mysql.grant]]`: `action` means `privileges` on `database`.`table` (`*`:
/// every table of the database, including tables made later).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivilegeConfig {
    pub action: String,
    pub database: String,
    #[serde(default = "default_table")]
    pub table: String,
    pub privileges: Vec<String>,
}

fn default_prefix() -> String {
    "lapse".into()
}
fn default_host() -> String {
    "%".into()
}
fn default_max_user_connections() -> u32 {
    2
}
fn default_marker_database() -> String {
    "lapse".into()
}
fn default_pool() -> usize {
    4
}
fn default_table() -> String {
    "*".into()
}

impl MysqlConfig {
    /// Checks everything that can be checked without a server.
    pub fn validate(&self) -> Result<(), String> {
        if self.audience.is_empty() || self.audience.chars().count() > 255 {
            return Err("`audience` must be 1-255 characters".into());
        }
        let p = &self.user_prefix;
        let ok_prefix = !p.is_empty()
            && p.len() <= 16
            && p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_prefix {
            return Err(format!(
                "`user_prefix` `{}` must be 1-16 of [a-z0-9_], starting with a letter",
                shown(p)
            ));
        }
        let h = &self.host;
        let ok_host = !h.is_empty()
            && h.len() <= sql::MAX_HOST_CHARS
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".%_:/-".contains(c));
        if !ok_host {
            return Err(format!(
                "`host` `{}` must be 1-255 of [A-Za-z0-9.%_:/-] (a host name, an address, a pattern such as `10.0.%`, or `%`)",
                shown(h)
            ));
        }
        if !(1..=1000).contains(&self.max_user_connections) {
            return Err("`max_user_connections` must be 1..=1000".into());
        }
        if !(self.admin_url.starts_with("env:") || self.admin_url.starts_with("file:")) {
            return Err(
                "`admin_url` must say where the URL is (`env:NAME` or `file:/path`), not contain it"
                    .into(),
            );
        }
        if self.pool_size == 0 || self.pool_size > 64 {
            return Err("`pool_size` must be 1..=64".into());
        }
        if let Some(db) = &self.database {
            sql::ident(db).map_err(|e| format!("`database`: {e}"))?;
        }
        if let Some(h) = &self.public_host
            && (h.is_empty() || h.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            return Err(format!("`public_host` `{}` is not a host name", shown(h)));
        }
        let marker = &self.marker_database;
        sql::grant_database(marker).map_err(|e| format!("`marker_database`: {e}"))?;
        if SYSTEM_DATABASES.contains(&marker.to_ascii_lowercase().as_str()) {
            return Err(format!("`marker_database` cannot be `{marker}`"));
        }
        if self.grants.is_empty() {
            return Err(format!(
                "audience `{}`: at least one [[mysql.grant]] is needed",
                self.audience
            ));
        }
        for g in &self.grants {
            let a = shown(&g.action);
            if g.action.is_empty() {
                return Err("[[mysql.grant]] `action` is empty".into());
            }
            sql::grant_database(&g.database)
                .map_err(|e| format!("action `{a}`: `database`: {e}"))?;
            let db = g.database.to_ascii_lowercase();
            if SYSTEM_DATABASES.contains(&db.as_str()) || db == marker.to_ascii_lowercase() {
                return Err(format!(
                    "action `{a}`: `database` `{}` is the server's or Lapse's own",
                    g.database
                ));
            }
            if g.table != "*" {
                sql::ident(&g.table).map_err(|e| format!("action `{a}`: `table`: {e}"))?;
            }
            if g.privileges.is_empty() {
                return Err(format!("action `{a}`: `privileges` is empty"));
            }
            for p in &g.privileges {
                let up = p.trim().to_ascii_uppercase();
                if !DATA_PRIVILEGES.contains(&up.as_str()) {
                    return Err(format!(
                        "action `{a}`: `privileges` entry `{}` is not one of {}",
                        shown(p),
                        DATA_PRIVILEGES.join(", ")
                    ));
                }
                if g.table != "*" && !TABLE_PRIVILEGES.contains(&up.as_str()) {
                    return Err(format!(
                        "action `{a}`: `privileges` entry `{up}` applies to a whole database: set `table = \"*\"`"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads the admin URL from where `admin_url` points.
    fn admin_url(&self) -> Result<String, ProviderError> {
        crate::read_admin_secret(&self.admin_url, &self.audience)
    }
}

/// Error messages echo config values; keep what they echo short.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(32).collect();
    if s.chars().count() > 32 {
        out.push('…');
    }
    out.replace('\0', "\\0")
}

/// Parses the admin URL. Errors never quote it (it holds a password).
fn admin_opts(conn: &str) -> Result<OptsBuilder, String> {
    let mut url = url::Url::parse(conn).map_err(|_| "does not parse".to_owned())?;
    // mysql_async takes a private CA only programmatically: lift it out of the URL.
    let mut root_cert: Option<String> = None;
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter_map(|(k, v)| {
            if k == "sslrootcert" {
                root_cert = Some(v.into_owned());
                None
            } else {
                Some((k.into_owned(), v.into_owned()))
            }
        })
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    let opts = Opts::from_url(url.as_str()).map_err(|e| match e {
        mysql_async::UrlError::UnknownParameter { param } => {
            format!("has an unknown parameter `{param}`")
        }
        mysql_async::UrlError::UnsupportedScheme { scheme } => {
            format!("has scheme `{scheme}`, not `mysql`")
        }
        _ => "does not parse".to_owned(),
    })?;
    let ssl = match (opts.ssl_opts().cloned(), root_cert) {
        (Some(s), _) if s.accept_invalid_certs() || s.skip_domain_validation() => {
            // TLS that does not verify the server protects against nobody who can
            // see the traffic.
            return Err(
                "turns off server verification (`verify_ca=false` or `verify_identity=false`): remove it"
                    .into(),
            );
        }
        (Some(s), Some(path)) => {
            Some(s.with_root_certs(vec![std::path::PathBuf::from(path).into()]))
        }
        (None, Some(_)) => return Err("has `sslrootcert` without `require_ssl=true`".into()),
        (s, None) => s,
    };
    Ok(OptsBuilder::from_opts(opts).ssl_opts(ssl))
}

/// What `prepare` learnt about the server.
#[derive(Debug, Clone, Copy)]
struct Server {
    dialect: Dialect,
}

/// `ER_NO_SUCH_TABLE`: the marker table was never made (or was dropped).
const ER_NO_SUCH_TABLE: u16 = 1146;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    MariaDb,
    MySql,
}

impl Dialect {
    /// The table that lists accounts (and whether each is locked), in `mysql`.
    fn users_table(self) -> &'static str {
        match self {
            Self::MariaDb => "global_priv",
            Self::MySql => "user",
        }
    }

    /// `(User, Host, locked)` of the accounts whose name starts with the first
    /// parameter (its length is the second).
    fn users_query(self) -> &'static str {
        match self {
            // MariaDB 10.4+ keeps account attributes as JSON in global_priv.
            Self::MariaDb => {
                "SELECT User, Host,
                        IF(IFNULL(JSON_VALUE(Priv, '$.account_locked'), '0') IN ('1', 'true'), 1, 0)
                 FROM mysql.global_priv WHERE LEFT(User, ?) = ?"
            }
            Self::MySql => {
                "SELECT User, Host, IF(account_locked = 'Y', 1, 0)
                 FROM mysql.user WHERE LEFT(User, ?) = ?"
            }
        }
    }

    fn hosts_query(self) -> &'static str {
        match self {
            Self::MariaDb => "SELECT Host FROM mysql.global_priv WHERE User = ?",
            Self::MySql => "SELECT Host FROM mysql.user WHERE User = ?",
        }
    }

    /// Either of these lets the admin kill other users' threads.
    fn kill_privileges(self) -> Vec<&'static str> {
        match self {
            Self::MariaDb => vec!["CONNECTION ADMIN", "SUPER"],
            Self::MySql => vec!["CONNECTION_ADMIN", "SUPER"],
        }
    }
}

pub struct MysqlProvider {
    cfg: MysqlConfig,
    pool: mysql_async::Pool,
    /// action -> (database, table) -> privileges (upper case).
    grants: BTreeMap<String, BTreeMap<(String, String), BTreeSet<String>>>,
    /// `` `marker_database`.`lapse_marker` ``, quoted.
    marker: String,
    /// Set by the first successful `prepare`; `create` needs it.
    server: OnceCell<Server>,
    /// Known from the first connection. Destroying, listing and counting need
    /// only this, so they work even when `prepare` fails (a privilege to grant
    /// was revoked, the config changed): revocation never waits on setup.
    dialect: OnceCell<Dialect>,
    host: String,
    port: u16,
    dbname: String,
}

fn q(e: QuoteError) -> ProviderError {
    ProviderError::Config(e.to_string())
}

fn is_server_error(e: &mysql_async::Error, code: u16) -> bool {
    matches!(e, mysql_async::Error::Server(s) if s.code == code)
}

/// Reading the marks before any `prepare` made the table: there are none.
fn no_table_is_empty<T>(
    r: Result<Vec<T>, mysql_async::Error>,
) -> Result<Vec<T>, mysql_async::Error> {
    match r {
        Err(e) if is_server_error(&e, ER_NO_SUCH_TABLE) => Ok(Vec::new()),
        other => other,
    }
}

impl MysqlProvider {
    /// Builds the provider; connects lazily (the server may come up after Lapse).
    pub fn new(cfg: MysqlConfig) -> Result<Self, ProviderError> {
        cfg.validate().map_err(ProviderError::Config)?;
        let url = cfg.admin_url()?;
        let builder = admin_opts(&url).map_err(|why| {
            ProviderError::Config(format!(
                "audience `{}`: the URL in `{}` {why}",
                cfg.audience, cfg.admin_url
            ))
        })?;
        let constraints = PoolConstraints::new(0, cfg.pool_size).ok_or_else(|| {
            ProviderError::Config(format!("`pool_size` {} is out of range", cfg.pool_size))
        })?;
        // Every statement is bounded: an account that cannot be dropped because
        // something holds a lock fails (and is retried with backoff) rather than
        // hanging a grant's ending. `/*M! … */` runs on MariaDB only (MySQL has
        // no `max_statement_time`). No reset when a connection goes back to the
        // pool: the provider keeps no session state (no temporary tables, user
        // variables or open transactions), and the reset plus `setup` again cost
        // three round trips per use (grants/s at c=32: 327/s with, see
        // BENCHMARKS.md for without).
        let builder = builder
            .pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    .with_reset_connection(false),
            )
            .setup(vec![
                "SET SESSION lock_wait_timeout = 5",
                "/*M! SET SESSION max_statement_time = 10 */",
            ]);
        let opts = Opts::from(builder);
        let host = cfg
            .public_host
            .clone()
            .unwrap_or_else(|| opts.ip_or_hostname().to_owned());
        let port = cfg.public_port.unwrap_or_else(|| opts.tcp_port());
        let dbname = cfg
            .database
            .clone()
            .or_else(|| opts.db_name().map(str::to_owned))
            .unwrap_or_default();
        let mut grants: BTreeMap<String, BTreeMap<(String, String), BTreeSet<String>>> =
            BTreeMap::new();
        for g in &cfg.grants {
            grants
                .entry(g.action.clone())
                .or_default()
                .entry((g.database.clone(), g.table.clone()))
                .or_default()
                .extend(g.privileges.iter().map(|p| p.trim().to_ascii_uppercase()));
        }
        let marker = format!(
            "{}.{}",
            sql::ident(&cfg.marker_database).map_err(q)?,
            sql::ident(MARKER_TABLE).map_err(q)?
        );
        Ok(Self {
            pool: mysql_async::Pool::new(opts),
            grants,
            marker,
            server: OnceCell::new(),
            dialect: OnceCell::new(),
            host,
            port,
            dbname,
            cfg,
        })
    }

    fn step(&self, step: &'static str) -> impl Fn(mysql_async::Error) -> ProviderError + '_ {
        move |e| match e {
            mysql_async::Error::Server(s) => ProviderError::Step {
                target: self.cfg.audience.clone(),
                step,
                message: format!("{} (error {})", s.message, s.code),
            },
            other => ProviderError::Unavailable {
                target: self.cfg.audience.clone(),
                message: format!("{step}: {other}"),
            },
        }
    }

    async fn conn(&self) -> Result<Conn, ProviderError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.pool.get_conn())
            .await
            .map_err(|_| ProviderError::Unavailable {
                target: self.cfg.audience.clone(),
                message: format!(
                    "admin connection timed out after {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            })?
            .map_err(|e| ProviderError::Unavailable {
                target: self.cfg.audience.clone(),
                message: e.to_string(),
            })
    }

    async fn dialect(&self, c: &mut Conn) -> Result<Dialect, ProviderError> {
        self.dialect
            .get_or_try_init(|| async {
                let version: Option<String> = c
                    .query_first("SELECT VERSION()")
                    .await
                    .map_err(self.step("read the server version"))?;
                Ok(if version.unwrap_or_default().contains("MariaDB") {
                    Dialect::MariaDb
                } else {
                    Dialect::MySql
                })
            })
            .await
            .copied()
    }

    /// Runs [`Self::prepare_once`] until it succeeds once.
    async fn server(&self) -> Result<Server, ProviderError> {
        self.server
            .get_or_try_init(|| self.prepare_once())
            .await
            .copied()
    }

    /// What the admin must hold: see the module docs.
    fn needs(&self, dialect: Dialect) -> Vec<Need> {
        let mut needs = vec![
            Need::new(
                "CREATE USER",
                On::Global,
                "to create, lock and drop the accounts",
            ),
            Need::new(
                "PROCESS",
                On::Global,
                "to see the accounts' sessions in PROCESSLIST",
            ),
            Need {
                any_of: dialect.kill_privileges(),
                on: On::Global,
                grant_option: false,
                why: "to end the accounts' sessions",
            },
            Need::new(
                "SELECT",
                On::Table("mysql".into(), dialect.users_table().into()),
                "to list accounts",
            ),
        ];
        for p in ["CREATE", "SELECT", "INSERT", "DELETE"] {
            needs.push(Need::new(
                p,
                On::Table(self.cfg.marker_database.clone(), MARKER_TABLE.into()),
                "for Lapse's marker table",
            ));
        }
        let mut configured: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
        for objects in self.grants.values() {
            for ((db, table), privileges) in objects {
                for p in privileges {
                    configured.insert((db, table, p));
                }
            }
        }
        for (db, table, p) in configured {
            let Some(p) = DATA_PRIVILEGES.iter().find(|d| **d == p) else {
                continue;
            };
            needs.push(Need {
                any_of: vec![p],
                on: if table == "*" {
                    On::Database(db.to_owned())
                } else {
                    On::Table(db.to_owned(), table.to_owned())
                },
                grant_option: true,
                why: "to grant it as [[mysql.grant]] says",
            });
        }
        needs
    }

    /// Checks the admin's privileges and the configured tables, and makes the
    /// marker table. Idempotent.
    async fn prepare_once(&self) -> Result<Server, ProviderError> {
        let mut c = self.conn().await?;
        let dialect = self.dialect(&mut c).await?;
        let current: String = c
            .query_first("SELECT CURRENT_USER()")
            .await
            .map_err(self.step("read the admin's name"))?
            .unwrap_or_default();
        let (user, host) = current.rsplit_once('@').unwrap_or((&current, "%"));
        let grantee = format!("'{user}'@'{host}'");
        let held = Held {
            global: c
                .exec::<(String, String), _, _>(
                    "SELECT PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = ?",
                    (&grantee,),
                )
                .await
                .map_err(self.step("read the admin's privileges"))?
                .into_iter()
                .map(|(p, g)| (p, g == "YES"))
                .collect(),
            databases: c
                .exec::<(String, String, String), _, _>(
                    "SELECT TABLE_SCHEMA, PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = ?",
                    (&grantee,),
                )
                .await
                .map_err(self.step("read the admin's privileges"))?
                .into_iter()
                .map(|(d, p, g)| (d, p, g == "YES"))
                .collect(),
            tables: c
                .exec::<(String, String, String, String), _, _>(
                    "SELECT TABLE_SCHEMA, TABLE_NAME, PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.TABLE_PRIVILEGES WHERE GRANTEE = ?",
                    (&grantee,),
                )
                .await
                .map_err(self.step("read the admin's privileges"))?
                .into_iter()
                .map(|(d, t, p, g)| (d, t, p, g == "YES"))
                .collect(),
        };
        let needs = self.needs(dialect);
        let missing: Vec<String> = held.missing(&needs).iter().map(|n| n.to_string()).collect();
        if !missing.is_empty() {
            return Err(ProviderError::Unfit {
                target: self.cfg.audience.clone(),
                message: format!("`{current}` lacks {}", missing.join("; ")),
            });
        }

        // The server's limit on user names (MariaDB 10.6+: 128, MySQL: 32).
        let limit: Option<Option<u64>> = c
            .exec_first(
                "SELECT CHARACTER_MAXIMUM_LENGTH FROM information_schema.COLUMNS
                 WHERE TABLE_SCHEMA = 'mysql' AND TABLE_NAME = ? AND COLUMN_NAME = 'User'",
                (dialect.users_table(),),
            )
            .await
            .map_err(self.step("read the user name limit"))?;
        let limit = usize::try_from(limit.flatten().unwrap_or(32)).unwrap_or(32);
        let longest = self.cfg.user_prefix.len() + 1 + names::COMPACT_CHARS;
        if longest > limit {
            return Err(ProviderError::Config(format!(
                "audience `{}`: `user_prefix` `{}` makes user names of {longest} characters, and this server allows {limit}: use at most {} characters",
                self.cfg.audience,
                self.cfg.user_prefix,
                limit.saturating_sub(1 + names::COMPACT_CHARS)
            )));
        }

        // A table-level GRANT fails when its table does not exist: say so now.
        let mut tables: BTreeSet<(&str, &str)> = BTreeSet::new();
        for g in self.cfg.grants.iter().filter(|g| g.table != "*") {
            tables.insert((&g.database, &g.table));
        }
        for (db, table) in tables {
            let found: Option<i64> = c
                .exec_first(
                    "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                    (db, table),
                )
                .await
                .map_err(self.step("look up configured tables"))?;
            if found.unwrap_or(0) == 0 {
                return Err(ProviderError::Unfit {
                    target: self.cfg.audience.clone(),
                    message: format!("table `{db}`.`{table}` of a [[mysql.grant]] does not exist"),
                });
            }
        }

        c.query_drop(format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            sql::ident(&self.cfg.marker_database).map_err(q)?
        ))
        .await
        .map_err(self.step("create the marker database"))?;
        // Binary collations: user names are case-sensitive.
        c.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {} (
               `user` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
               `host` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
               `prefix` VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
               `target` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
               `grant_id` VARCHAR(64) CHARACTER SET ascii NOT NULL,
               `created_at` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
               PRIMARY KEY (`user`, `host`)
             ) ENGINE=InnoDB COMMENT='Accounts Lapse created. An account without a row here is not Lapse''s.'",
            self.marker
        ))
        .await
        .map_err(self.step("create the marker table"))?;
        Ok(Server { dialect })
    }

    /// `(user, host, locked)` of the accounts whose name starts with the prefix.
    async fn prefixed_accounts(
        &self,
        c: &mut Conn,
        dialect: Dialect,
    ) -> Result<Vec<(String, String, bool)>, ProviderError> {
        let start = format!("{}_", self.cfg.user_prefix);
        let rows: Vec<(String, String, i64)> = c
            .exec(dialect.users_query(), (start.chars().count(), &start))
            .await
            .map_err(self.step("list accounts"))?;
        // The comparison in SQL follows the column's collation; make it exact.
        Ok(rows
            .into_iter()
            .filter(|(u, _, _)| u.starts_with(&start))
            .map(|(u, h, l)| (u, h, l != 0))
            .collect())
    }

    /// Sessions per user name, for names starting with the prefix.
    async fn prefixed_sessions(&self, c: &mut Conn) -> Result<HashMap<String, i64>, ProviderError> {
        let start = format!("{}_", self.cfg.user_prefix);
        let rows: Vec<(String, i64)> = c
            .exec(
                "SELECT USER, COUNT(*) FROM information_schema.PROCESSLIST WHERE LEFT(USER, ?) = ? GROUP BY USER",
                (start.chars().count(), &start),
            )
            .await
            .map_err(self.step("count sessions"))?;
        Ok(rows.into_iter().collect())
    }

    async fn threads_of(&self, c: &mut Conn, name: &str) -> Result<Vec<u64>, ProviderError> {
        c.exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
            (name,),
        )
        .await
        .map_err(self.step("list sessions"))
    }

    /// Removes what a failed `create` left; best effort (the marker row lets the
    /// reconciler finish the job if this fails too).
    async fn undo_create(&self, c: &mut Conn, account: &str, name: &str) {
        let dropped = c.query_drop(format!("DROP USER IF EXISTS {account}")).await;
        let unmarked = c
            .exec_drop(
                format!("DELETE FROM {} WHERE `user` = ?", self.marker),
                (name,),
            )
            .await;
        if dropped.is_err() || unmarked.is_err() {
            tracing::warn!(
                target = %self.cfg.audience,
                user = %name,
                "could not undo a failed create; the reconciler will remove the account"
            );
        }
    }
}

#[async_trait]
impl CredentialProvider for MysqlProvider {
    fn kind(&self) -> &'static str {
        "mysql"
    }

    fn target(&self) -> &str {
        &self.cfg.audience
    }

    fn name_for(&self, grant: GrantId) -> String {
        format!("{}_{}", self.cfg.user_prefix, names::compact(grant))
    }

    async fn prepare(&self) -> Result<(), ProviderError> {
        self.server().await.map(|_| ())
    }

    fn unmapped(&self, actions: &[&str]) -> Vec<String> {
        actions
            .iter()
            .filter(|a| !self.grants.contains_key(**a))
            .map(|a| (*a).to_owned())
            .collect()
    }

    async fn sessions(&self, name: &str) -> Result<i64, ProviderError> {
        let mut c = self.conn().await?;
        let n: Option<i64> = c
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ?",
                (name,),
            )
            .await
            .map_err(self.step("count sessions"))?;
        Ok(n.unwrap_or(0))
    }

    async fn create(
        &self,
        spec: &CredentialSpec,
        secret: &Secret,
    ) -> Result<Handout, ProviderError> {
        let server = self.server().await?;
        let account = sql::account(&spec.name, &self.cfg.host).map_err(q)?;
        let password = match server.dialect {
            Dialect::MariaDb => format!(
                "PASSWORD {}",
                sql::literal(&native::verifier(secret.expose())).map_err(q)?
            ),
            Dialect::MySql => sql::literal(secret.expose()).map_err(q)?,
        };
        let limit = format!(
            "WITH MAX_USER_CONNECTIONS {}",
            self.cfg.max_user_connections
        );
        // One GRANT per object, with every privilege the grant's actions give there.
        let mut objects: BTreeMap<&(String, String), BTreeSet<&str>> = BTreeMap::new();
        for a in &spec.actions {
            for (object, privileges) in self.grants.get(a).into_iter().flatten() {
                objects
                    .entry(object)
                    .or_default()
                    .extend(privileges.iter().map(String::as_str));
            }
        }
        let mut grants = Vec::with_capacity(objects.len());
        for ((db, table), privileges) in objects {
            let on = if table == "*" {
                format!("{}.*", sql::grant_database(db).map_err(q)?)
            } else {
                format!(
                    "{}.{}",
                    sql::ident(db).map_err(q)?,
                    sql::ident(table).map_err(q)?
                )
            };
            let privileges: Vec<&str> = privileges.into_iter().collect();
            grants.push(format!(
                "GRANT {} ON {on} TO {account}",
                privileges.join(", ")
            ));
        }
        // Every account statement rebuilds MariaDB's in-memory privilege tables
        // under one global lock, at a cost that grows with the number of
        // accounts: MariaDB creates the account with its first GRANT
        // (`IDENTIFIED BY` makes it), one statement where `CREATE USER` + `GRANT`
        // are two (measured: 3,000 accounts in 2.3 s against 5.6 s). That GRANT
        // would as well change an account that exists already, so `exists`
        // below refuses one first. MySQL 8 has no `GRANT … IDENTIFIED BY`.
        let (first, rest) = match (server.dialect, grants.split_first()) {
            (Dialect::MariaDb, Some((first, rest))) => {
                (format!("{first} IDENTIFIED BY {password} {limit}"), rest)
            }
            _ => (
                format!("CREATE USER {account} IDENTIFIED BY {password} {limit}"),
                &grants[..],
            ),
        };
        let script = std::iter::once(first)
            .chain(rest.iter().cloned())
            .collect::<Vec<_>>()
            .join(";\n");

        let mut c = self.conn().await?;
        let hosts: Vec<String> = c
            .exec(server.dialect.hosts_query(), (&spec.name,))
            .await
            .map_err(self.step("look up the account"))?;
        // Host names compare without case in account names.
        if hosts.iter().any(|h| h.eq_ignore_ascii_case(&self.cfg.host)) {
            // Never undone: the account is not this create's to drop.
            return Err(ProviderError::Step {
                target: self.cfg.audience.clone(),
                step: "create the account",
                message: format!("account `{}` exists already", spec.name),
            });
        }
        // The mark first: a crash after it leaves a row without an account, never
        // an account Lapse would not recognise as its own.
        c.exec_drop(
            format!(
                "REPLACE INTO {} (`user`, `host`, `prefix`, `target`, `grant_id`) VALUES (?, ?, ?, ?, ?)",
                self.marker
            ),
            (
                &spec.name,
                &self.cfg.host,
                &self.cfg.user_prefix,
                &self.cfg.audience,
                spec.grant.to_string(),
            ),
        )
        .await
        .map_err(self.step("mark the account"))?;
        if let Err(e) = c.query_drop(&script).await {
            let e = self.step("create the account")(e);
            // The server may quote the statement back: never the password (or its
            // verifier) in an error.
            let e = match e {
                ProviderError::Step {
                    target,
                    step,
                    message,
                } => ProviderError::Step {
                    target,
                    step,
                    message: message
                        .replace(secret.expose(), "<redacted>")
                        .replace(&native::verifier(secret.expose()), "<redacted>"),
                },
                other => other,
            };
            self.undo_create(&mut c, &account, &spec.name).await;
            return Err(e);
        }
        Ok(Handout {
            kind: "mysql",
            audience: self.cfg.audience.clone(),
            host: self.host.clone(),
            port: self.port,
            dbname: self.dbname.clone(),
            username: spec.name.clone(),
            password: secret.expose().to_owned(),
            valid_until: spec.valid_until.rfc3339(),
        })
    }

    /// The server has no expiry to move (see the module docs): checks the account
    /// is still there, so a renewal of a credential that is gone fails.
    async fn extend(&self, name: &str, _valid_until: Timestamp) -> Result<(), ProviderError> {
        let mut c = self.conn().await?;
        let dialect = self.dialect(&mut c).await?;
        let hosts: Vec<String> = c
            .exec(dialect.hosts_query(), (name,))
            .await
            .map_err(self.step("look up the account"))?;
        if hosts.is_empty() {
            return Err(ProviderError::Step {
                target: self.cfg.audience.clone(),
                step: "extend",
                message: format!("account `{}` does not exist", shown(name)),
            });
        }
        Ok(())
    }

    async fn destroy(&self, name: &str) -> Result<Destroyed, ProviderError> {
        let mut c = self.conn().await?;
        let dialect = self.dialect(&mut c).await?;
        // Every host of the name: `host` may have changed since the account was made.
        let hosts: Vec<String> = c
            .exec(dialect.hosts_query(), (name,))
            .await
            .map_err(self.step("look up the account"))?;
        let existed = !hosts.is_empty();
        let mut accounts = Vec::with_capacity(hosts.len());
        for h in &hosts {
            accounts.push(sql::account(name, h).map_err(q)?);
        }

        // 1. No new sessions.
        for a in &accounts {
            match c.query_drop(format!("ALTER USER {a} ACCOUNT LOCK")).await {
                Ok(()) => {}
                // Dropped meanwhile (a concurrent destroy): nothing to lock.
                Err(e) if is_server_error(&e, ER_CANNOT_USER) => {}
                Err(e) => return Err(self.step("lock the account")(e)),
            }
        }

        // 2. End the live ones, also when the account is gone: DROP USER leaves
        // sessions running, so a half-done earlier attempt (or a hand-dropped
        // account) may have left some. KILL only marks a thread; it leaves the
        // process list a moment later, so poll, killing any that slipped in
        // before the lock.
        let mut killed: HashSet<u64> = HashSet::new();
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        let mut left = self.threads_of(&mut c, name).await?;
        while !left.is_empty() {
            for id in &left {
                if killed.contains(id) {
                    continue;
                }
                match c.query_drop(format!("KILL CONNECTION {id}")).await {
                    Ok(()) => {
                        killed.insert(*id);
                    }
                    // It ended by itself.
                    Err(e) if is_server_error(&e, ER_NO_SUCH_THREAD) => {}
                    Err(e) => return Err(self.step("kill sessions")(e)),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            left = self.threads_of(&mut c, name).await?;
        }
        if !left.is_empty() {
            return Err(ProviderError::SessionsLeft {
                target: self.cfg.audience.clone(),
                name: name.to_owned(),
                left: i64::try_from(left.len()).unwrap_or(i64::MAX),
            });
        }

        // 3. Privileges go with the account.
        for a in &accounts {
            c.query_drop(format!("DROP USER IF EXISTS {a}"))
                .await
                .map_err(self.step("drop the account"))?;
        }
        match c
            .exec_drop(
                format!("DELETE FROM {} WHERE `user` = ?", self.marker),
                (name,),
            )
            .await
        {
            // No marker table: no mark to remove.
            Ok(()) => {}
            Err(e) if is_server_error(&e, ER_NO_SUCH_TABLE) => {}
            Err(e) => return Err(self.step("remove the mark")(e)),
        }
        Ok(Destroyed {
            existed,
            sessions_terminated: i64::try_from(killed.len()).unwrap_or(i64::MAX),
            sessions_left: 0,
        })
    }

    async fn list(&self) -> Result<Vec<Existing>, ProviderError> {
        let mut c = self.conn().await?;
        let dialect = self.dialect(&mut c).await?;
        let marks: Vec<(String, String, String)> = no_table_is_empty(
            c.exec(
                format!(
                    "SELECT `user`, `host`, `grant_id` FROM {} WHERE `prefix` = ? AND `target` = ?",
                    self.marker
                ),
                (&self.cfg.user_prefix, &self.cfg.audience),
            )
            .await,
        )
        .map_err(self.step("read the marks"))?;
        let marks: HashMap<(String, String), String> =
            marks.into_iter().map(|(u, h, g)| ((u, h), g)).collect();
        let accounts = self.prefixed_accounts(&mut c, dialect).await?;
        let sessions = self.prefixed_sessions(&mut c).await?;
        Ok(accounts
            .into_iter()
            .filter_map(|(user, host, locked)| {
                let grant = marks.get(&(user.clone(), host))?;
                Some(Existing {
                    grant: grant.parse().ok(),
                    can_login: !locked,
                    valid_until: None,
                    sessions: sessions.get(&user).copied().unwrap_or(0),
                    name: user,
                })
            })
            .collect())
    }

    /// Accounts named like this provider's (`<prefix>_<26 base32>`) without the
    /// mark of a Lapse installation using this prefix. MariaDB accounts join no
    /// group of Lapse's, so there are no group members to report.
    async fn strays(&self) -> Result<Vec<Stray>, ProviderError> {
        let mut c = self.conn().await?;
        let dialect = self.dialect(&mut c).await?;
        let marked: Vec<(String, String)> = no_table_is_empty(
            c.exec(
                format!(
                    "SELECT `user`, `host` FROM {} WHERE `prefix` = ?",
                    self.marker
                ),
                (&self.cfg.user_prefix,),
            )
            .await,
        )
        .map_err(self.step("read the marks"))?;
        let marked: HashSet<(String, String)> = marked.into_iter().collect();
        let accounts = self.prefixed_accounts(&mut c, dialect).await?;
        let sessions = self.prefixed_sessions(&mut c).await?;
        let mut strays: Vec<Stray> = accounts
            .into_iter()
            .filter(|(u, h, _)| {
                names::is_generated(&self.cfg.user_prefix, u)
                    && !marked.contains(&(u.clone(), h.clone()))
            })
            .map(|(user, _, locked)| Stray {
                sessions: sessions.get(&user).copied().unwrap_or(0),
                name: user,
                kind: StrayKind::LookAlike,
                groups: Vec::new(),
                can_login: !locked,
            })
            .collect();
        strays.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(strays)
    }
}
