//! `lapse-bench provider --target postgres|mysql|redis`: a credential provider end to
//! end through the real broker, the same three figures for every target:
//! grants/s at a concurrency, issue-to-usable (exchange → log in with the handed
//! out secret → first command) and revoke-to-sessions-gone with two sessions
//! open, one idle and one busy in a long command. "Gone" is the later of the
//! revoke's answer (which the broker gives only once the target shows no
//! session of the credential) and the busy command's failure; after each sample
//! the idle session must fail its next command, or the bench stops.

use crate::{Kind, Server, drive, emit, exchange_requests, identity_tokens};
use anyhow::{Context, bail};
use lapse_bench::http::{Conn, post_form};
use lapse_bench::stats;
use lapse_broker::config::Config;
use lapse_core::{Clock, SystemClock};
use lapse_token::DpopKey;
use mysql_async::prelude::Queryable;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Postgres,
    Mysql,
    Redis,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Redis => "redis",
        }
    }
}

/// What a run needs from its target: the admin side it sets up and tears down.
struct Setup {
    target: Target,
    sfx: String,
    prefix: String,
    url_file: std::path::PathBuf,
    scram_iterations: u32,
}

fn pg_url() -> String {
    std::env::var("LAPSE_BENCH_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

fn mysql_url() -> String {
    std::env::var("LAPSE_BENCH_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("PostgreSQL (LAPSE_BENCH_PG_URL)")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

fn redis_url() -> String {
    std::env::var("LAPSE_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection of its own that waits as long as a command takes (the busy XREAD).
async fn redis_connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(None);
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// The run's admin user, holding the provider's documented least privileges.
fn redis_admin(sfx: &str) -> String {
    format!("lapse_bench_admin_{sfx}")
}

fn redis_marker(sfx: &str) -> String {
    format!("lapse:bench{sfx}:marks")
}

async fn mysql_root() -> anyhow::Result<mysql_async::Conn> {
    let opts = mysql_async::Opts::from_url(&mysql_url())?;
    mysql_async::Conn::new(opts)
        .await
        .context("MariaDB/MySQL (LAPSE_BENCH_MYSQL_URL)")
}

impl Setup {
    async fn new(target: Target, scram_iterations: u32) -> anyhow::Result<Self> {
        let sfx = format!("{:08x}", rand::random::<u32>());
        let url_file = std::env::temp_dir().join(format!("lapse-bench-{sfx}.url"));
        match target {
            Target::Postgres => {
                pg_connect(&pg_url()).await?.batch_execute(
                    "CREATE SCHEMA IF NOT EXISTS lapse_bench; CREATE TABLE IF NOT EXISTS lapse_bench.items (id int PRIMARY KEY)",
                ).await?;
                std::fs::write(&url_file, pg_url())?;
            }
            Target::Mysql => {
                let db = format!("lapse_bench_{sfx}");
                mysql_root()
                    .await?
                    .query_drop(format!(
                        "CREATE DATABASE `{db}`; CREATE TABLE `{db}`.items (id INT PRIMARY KEY)"
                    ))
                    .await?;
                let mut url = url::Url::parse(&mysql_url())?;
                url.set_path(&format!("/{db}"));
                std::fs::write(&url_file, url.as_str())?;
            }
            Target::Redis => {
                let mut root = redis_connect(&redis_url()).await?;
                let admin = redis_admin(&sfx);
                let password = format!("{:032x}", rand::random::<u128>());
                redis::cmd("ACL")
                    .arg("SETUSER")
                    .arg(&admin)
                    .arg("reset")
                    .arg("on")
                    .arg(format!(">{password}"))
                    .arg(lapse_providers::redis::admin_rules(&redis_marker(&sfx)))
                    .query_async::<()>(&mut root)
                    .await?;
                redis::cmd("SET")
                    .arg(format!("bench{sfx}:items"))
                    .arg("1")
                    .query_async::<()>(&mut root)
                    .await?;
                let mut url = url::Url::parse(&redis_url())?;
                url.set_username(&admin)
                    .map_err(|()| anyhow::anyhow!("LAPSE_BENCH_REDIS_URL cannot hold a user"))?;
                url.set_password(Some(&password)).map_err(|()| {
                    anyhow::anyhow!("LAPSE_BENCH_REDIS_URL cannot hold a password")
                })?;
                std::fs::write(&url_file, url.as_str())?;
            }
        }
        Ok(Self {
            target,
            prefix: format!("lb{sfx}"),
            sfx,
            url_file,
            scram_iterations,
        })
    }

    fn configure(&self, cfg: &mut Config) {
        let admin_url = format!("file:{}", self.url_file.display());
        match self.target {
            Target::Postgres => {
                use lapse_providers::postgres::{PostgresConfig, PrivilegeConfig};
                cfg.postgres = vec![PostgresConfig {
                    audience: "orders-db".into(),
                    admin_url,
                    role_prefix: self.prefix.clone(),
                    connection_limit: 2,
                    login_group: None,
                    log_statement: "all".into(),
                    public_host: None,
                    public_port: None,
                    pool_size: 8,
                    scram_iterations: self.scram_iterations,
                    idle_session_timeout: None,
                    statement_timeout: None,
                    creation: Vec::new(),
                    revocation: Vec::new(),
                    grants: vec![PrivilegeConfig {
                        action: "read".into(),
                        schema: "lapse_bench".into(),
                        privileges: vec!["SELECT".into()],
                        tables: Vec::new(),
                        functions: Vec::new(),
                    }],
                }];
            }
            Target::Mysql => {
                use lapse_providers::mysql::{MysqlConfig, PrivilegeConfig};
                cfg.mysql = vec![MysqlConfig {
                    audience: "orders-db".into(),
                    admin_url,
                    user_prefix: self.prefix.clone(),
                    host: "%".into(),
                    max_user_connections: 2,
                    public_host: None,
                    public_port: None,
                    database: None,
                    marker_database: format!("lapse_benchm_{}", self.sfx),
                    pool_size: 8,
                    grants: vec![PrivilegeConfig {
                        action: "read".into(),
                        database: format!("lapse_bench_{}", self.sfx),
                        table: "items".into(),
                        privileges: vec!["SELECT".into()],
                    }],
                }];
            }
            Target::Redis => {
                use lapse_providers::redis::{PrivilegeConfig, RedisConfig};
                cfg.redis = vec![RedisConfig {
                    audience: "orders-db".into(),
                    admin_url,
                    user_prefix: self.prefix.clone(),
                    public_host: None,
                    public_port: None,
                    marker_key: redis_marker(&self.sfx),
                    allow_all_keys: false,
                    grants: vec![PrivilegeConfig {
                        action: "read".into(),
                        keys: vec![format!("bench{}:*", self.sfx)],
                        channels: Vec::new(),
                        commands: vec!["+get".into(), "+xread".into()],
                    }],
                }];
            }
        }
    }

    /// Drops every credential of the run (the throughput run's grants are still
    /// active when the broker stops) and what the setup made.
    async fn cleanup(&self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.url_file);
        match self.target {
            Target::Postgres => {
                let su = pg_connect(&pg_url()).await?;
                let rows = su
                    .query(
                        "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1 || '%'",
                        &[&self.prefix],
                    )
                    .await?;
                for row in rows {
                    let name: String = row.get(0);
                    let _ = su
                        .batch_execute(&format!("DROP ROLE IF EXISTS \"{name}\""))
                        .await;
                }
            }
            Target::Mysql => {
                let mut root = mysql_root().await?;
                let users: Vec<(String, String)> = root
                    .exec(
                        "SELECT User, Host FROM mysql.global_priv WHERE LEFT(User, CHAR_LENGTH(?)) = ?",
                        (&self.prefix, &self.prefix),
                    )
                    .await?;
                for (u, h) in users {
                    let _ = root
                        .query_drop(format!("DROP USER IF EXISTS `{u}`@`{h}`"))
                        .await;
                }
                for db in ["lapse_bench", "lapse_benchm"] {
                    let _ = root
                        .query_drop(format!("DROP DATABASE IF EXISTS `{db}_{}`", self.sfx))
                        .await;
                }
            }
            Target::Redis => {
                let mut root = redis_connect(&redis_url()).await?;
                let users: Vec<String> = redis::cmd("ACL")
                    .arg("USERS")
                    .query_async(&mut root)
                    .await?;
                let ours = format!("{}_", self.prefix);
                let mut gone: Vec<String> =
                    users.into_iter().filter(|u| u.starts_with(&ours)).collect();
                gone.push(redis_admin(&self.sfx));
                for chunk in gone.chunks(500) {
                    let _ = redis::cmd("ACL")
                        .arg("DELUSER")
                        .arg(chunk)
                        .query_async::<i64>(&mut root)
                        .await;
                }
                let _ = redis::cmd("DEL")
                    .arg(redis_marker(&self.sfx))
                    .arg(format!("bench{}:items", self.sfx))
                    .query_async::<i64>(&mut root)
                    .await;
            }
        }
        Ok(())
    }
}

/// One logged-in session of a handed-out credential.
enum Session {
    Pg(tokio_postgres::Client),
    My(mysql_async::Conn),
    Rd(redis::aio::MultiplexedConnection, String),
}

impl Session {
    async fn login(target: Target, sfx: &str, c: &Value) -> anyhow::Result<Self> {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        let port = c["port"].as_u64().unwrap_or_default();
        Ok(match target {
            Target::Postgres => {
                let url = format!(
                    "host={} port={port} dbname={} user={} password={}",
                    s("host"),
                    s("dbname"),
                    s("username"),
                    s("password")
                );
                Self::Pg(pg_connect(&url).await?)
            }
            Target::Mysql => {
                let opts = mysql_async::OptsBuilder::default()
                    .ip_or_hostname(s("host"))
                    .tcp_port(u16::try_from(port)?)
                    .user(Some(s("username")))
                    .pass(Some(s("password")))
                    .db_name(Some(s("dbname")))
                    .prefer_socket(false);
                Self::My(mysql_async::Conn::new(opts).await?)
            }
            Target::Redis => {
                let url = format!(
                    "redis://{}:{}@{}:{port}",
                    s("username"),
                    s("password"),
                    s("host")
                );
                Self::Rd(redis_connect(&url).await?, format!("bench{sfx}:items"))
            }
        })
    }

    /// The granted action: one read.
    async fn first(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Pg(c) => {
                c.query_one("SELECT count(*) FROM lapse_bench.items", &[])
                    .await?;
            }
            Self::My(c) => c.query_drop("SELECT COUNT(*) FROM items").await?,
            Self::Rd(c, key) => {
                redis::cmd("GET")
                    .arg(&*key)
                    .query_async::<Option<String>>(c)
                    .await?;
            }
        }
        Ok(())
    }

    /// A long command; answers when the target ends it (or it finishes).
    async fn busy(self) -> anyhow::Result<()> {
        match self {
            Self::Pg(c) => c.batch_execute("SELECT pg_sleep(30)").await?,
            Self::My(mut c) => c.query_drop("SELECT SLEEP(30)").await?,
            Self::Rd(mut c, key) => {
                // A stream key of the granted pattern; it need not exist.
                redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(30_000)
                    .arg("STREAMS")
                    .arg(format!("{key}:stream"))
                    .arg("$")
                    .query_async::<redis::Value>(&mut c)
                    .await?;
            }
        }
        Ok(())
    }
}

pub fn run(
    target: Target,
    samples: usize,
    requests: usize,
    concurrency: usize,
    scram_iterations: u32,
    json_out: bool,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let setup = rt.block_on(Setup::new(target, scram_iterations))?;
    let result = measure(&rt, &setup, samples, requests, concurrency, json_out);
    rt.block_on(setup.cleanup())?;
    result
}

fn measure(
    rt: &tokio::runtime::Runtime,
    setup: &Setup,
    samples: usize,
    requests: usize,
    concurrency: usize,
    json_out: bool,
) -> anyhow::Result<()> {
    let (target, name) = (setup.target, setup.target.name());
    let server = Server::start_with(None, |cfg, _: &Path| {
        setup.configure(cfg);
        Ok(())
    })?;
    let now = SystemClock.now().unix_seconds();
    let identities = identity_tokens(&server.dir, 1000, now)?;
    let keys: Vec<DpopKey> = (0..concurrency).map(|_| DpopKey::generate()).collect();

    // 1. Grants/s: decision, store commits, and the target's create per grant.
    let reqs = exchange_requests(&server, &keys, &identities, requests, now);
    let r = drive(server.addr, reqs, concurrency, Kind::Exchange, true)?;
    let s = stats::summary(&r.latency);
    let extra = if target == Target::Postgres {
        format!(" scram_iterations={}", setup.scram_iterations)
    } else {
        String::new()
    };
    emit(
        json_out,
        format!(
            "{name} grants c={concurrency}{extra}: {:.0}/s, {}",
            r.throughput,
            s.line()
        ),
        json!({ "bench": format!("{name}.grants"), "concurrency": concurrency, "per_sec": r.throughput, "latency": s.json() }),
    );

    // 2. Issue-to-usable and 3. revoke-to-sessions-gone, one grant at a time.
    let (issue, revoke) = rt.block_on(async {
        let mut issue = stats::histogram()?;
        let mut revoke = stats::histogram()?;
        let mut conn = Conn::connect(server.addr).await?;
        let host = server.addr.to_string();
        let auth = format!("Bearer {}", server.admin);
        for k in 0..samples {
            let now = SystemClock.now().unix_seconds();
            let id: Vec<String> = identities
                .get(k % identities.len().max(1))
                .cloned()
                .into_iter()
                .collect();
            let one = exchange_requests(&server, &keys, &id, 1, now);
            let t = Instant::now();
            let resp = conn
                .send(one.first().map_or(&[][..], Vec::as_slice))
                .await?;
            if resp.status != 200 {
                bail!(
                    "exchange: HTTP {}: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                );
            }
            let v: Value = serde_json::from_slice(&resp.body)?;
            let cred = v.pointer("/credentials/0").cloned().unwrap_or(Value::Null);
            let mut idle = Session::login(target, &setup.sfx, &cred).await?;
            idle.first().await?;
            stats::record(&mut issue, t.elapsed());

            let busy = Session::login(target, &setup.sfx, &cred).await?;
            let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
            let busy = tokio::spawn(async move {
                let _ = started_tx.send(());
                let r = busy.busy().await;
                (r, Instant::now())
            });
            let _ = started_rx.await;
            // The command must be running on the target before the revoke.
            tokio::time::sleep(Duration::from_millis(20)).await;

            let grant = v
                .get("grant_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let req = post_form(
                &host,
                &format!("/v1/grants/{grant}/revoke"),
                &[("Authorization", &auth)],
                "{\"reason\":\"bench\"}",
            );
            let req = String::from_utf8_lossy(&req)
                .replace("application/x-www-form-urlencoded", "application/json")
                .into_bytes();
            let t = Instant::now();
            let resp = conn.send(&req).await?;
            let answered = Instant::now();
            if resp.status != 200 {
                bail!(
                    "revoke: HTTP {}: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                );
            }
            let (ended, at) = tokio::time::timeout(Duration::from_secs(5), busy)
                .await
                .context("the busy session survived revocation for 5 s")??;
            if ended.is_ok() {
                bail!("the busy command finished instead of being cut");
            }
            stats::record(&mut revoke, at.max(answered).saturating_duration_since(t));
            if idle.first().await.is_ok() {
                bail!("the idle session still works after revocation");
            }
        }
        anyhow::Ok((issue, revoke))
    })?;
    let i = stats::summary(&issue);
    let r = stats::summary(&revoke);
    emit(
        json_out,
        format!(
            "{name} issue-to-usable (exchange + login + first command): {}",
            i.line()
        ),
        json!({ "bench": format!("{name}.issue_to_usable"), "latency": i.json() }),
    );
    emit(
        json_out,
        format!(
            "{name} revoke-to-sessions-gone (2 sessions, 1 busy): {}",
            r.line()
        ),
        json!({ "bench": format!("{name}.revoke_to_sessions_gone"), "latency": r.json() }),
    );
    server.stop();
    Ok(())
}
