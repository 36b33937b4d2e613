//! `lapse-bench postgres`: the PostgreSQL provider end to end.

use crate::{Kind, Server, drive, emit, exchange_requests, identity_tokens};
use anyhow::{Context, bail};
use lapse_bench::http::{Conn, post_form};
use lapse_bench::stats;
use lapse_core::{Clock, SystemClock};
use lapse_providers::postgres::{PostgresConfig, PrivilegeConfig};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

fn pg_url() -> String {
    std::env::var("LAPSE_BENCH_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| "PostgreSQL (LAPSE_BENCH_PG_URL)".to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// A fresh database for a broker store, dropped afterwards.
pub struct Database {
    pub url: String,
    name: String,
}

impl Database {
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("lapse_bench_{:08x}", rand::random::<u32>());
        block(async {
            connect(&pg_url())
                .await?
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            anyhow::Ok(())
        })?;
        let cfg: tokio_postgres::Config = pg_url().parse()?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres");
        Ok(Self {
            url: format!("postgres://{user}@{host}:{port}/{name}"),
            name,
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            block(async {
                connect(&pg_url())
                    .await?
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
    }
}

fn block<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn login_url(c: &Value) -> String {
    format!(
        "host={} port={} dbname={} user={} password={}",
        c["host"].as_str().unwrap_or_default(),
        c["port"],
        c["dbname"].as_str().unwrap_or_default(),
        c["username"].as_str().unwrap_or_default(),
        c["password"].as_str().unwrap_or_default()
    )
}

pub fn run(
    samples: usize,
    requests: usize,
    concurrency: usize,
    scram_iterations: u32,
    json_out: bool,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sfx = format!("{:08x}", rand::random::<u32>());
    let prefix = format!("lb{sfx}");
    rt.block_on(async {
        let su = connect(&pg_url()).await?;
        su.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS lapse_bench; CREATE TABLE IF NOT EXISTS lapse_bench.items (id int PRIMARY KEY)",
        )
        .await?;
        anyhow::Ok(())
    })?;
    let url_file = std::env::temp_dir().join(format!("lapse-bench-{sfx}.url"));
    std::fs::write(&url_file, pg_url())?;
    let server = Server::start_with(None, |cfg, _| {
        cfg.postgres = vec![PostgresConfig {
            idle_session_timeout: None,
            statement_timeout: None,
            creation: Vec::new(),
            revocation: Vec::new(),
            audience: "orders-db".into(),
            admin_url: format!("file:{}", url_file.display()),
            role_prefix: prefix.clone(),
            connection_limit: 2,
            login_group: None,
            log_statement: "all".into(),
            public_host: None,
            public_port: None,
            pool_size: 8,
            scram_iterations,
            grants: vec![PrivilegeConfig {
                tables: Vec::new(),
                functions: Vec::new(),
                action: "read".into(),
                schema: "lapse_bench".into(),
                privileges: vec!["SELECT".into()],
            }],
        }];
        Ok(())
    })?;
    let now = SystemClock.now().unix_seconds();
    let identities = identity_tokens(&server.dir, 1000, now)?;
    let keys: Vec<DpopKey> = (0..concurrency).map(|_| DpopKey::generate()).collect();

    // 1. Grants/s with the provider (each grant: decision, SQLite commits, one
    // PostgreSQL transaction creating the role).
    let reqs = exchange_requests(&server, &keys, &identities, requests, now);
    let r = drive(server.addr, reqs, concurrency, Kind::Exchange, true)?;
    let s = stats::summary(&r.latency);
    emit(
        json_out,
        format!(
            "postgres grants c={concurrency} scram_iterations={scram_iterations}: {:.0}/s, {}",
            r.throughput,
            s.line()
        ),
        json!({ "bench": "postgres.grants", "concurrency": concurrency, "scram_iterations": scram_iterations, "per_sec": r.throughput, "latency": s.json() }),
    );

    // 2. Issue-to-usable and 3. revoke-to-session-gone, one grant at a time.
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (issue, revoke) = client.block_on(async {
        let mut issue = stats::histogram()?;
        let mut revoke = stats::histogram()?;
        let mut conn = Conn::connect(server.addr).await?;
        let host = server.addr.to_string();
        let auth = format!("Bearer {}", server.admin);
        for k in 0..samples {
            let now = SystemClock.now().unix_seconds();
            let id = identities
                .get(k % identities.len().max(1))
                .cloned()
                .into_iter()
                .collect::<Vec<_>>();
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
            let (session, connection) = tokio_postgres::connect(&login_url(&cred), NoTls).await?;
            let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<Instant>();
            tokio::spawn(async move {
                let _ = connection.await;
                let _ = gone_tx.send(Instant::now());
            });
            session
                .query_one("SELECT count(*) FROM lapse_bench.items", &[])
                .await?;
            stats::record(&mut issue, t.elapsed());

            let grant = v
                .get("grant_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let body = "{\"reason\":\"bench\"}";
            let mut req = post_form(
                &host,
                &format!("/v1/grants/{grant}/revoke"),
                &[("Authorization", &auth)],
                body,
            );
            let text = String::from_utf8_lossy(&req)
                .replace("application/x-www-form-urlencoded", "application/json");
            req = text.into_bytes();
            let t = Instant::now();
            let resp = conn.send(&req).await?;
            if resp.status != 200 {
                bail!(
                    "revoke: HTTP {}: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                );
            }
            let gone = tokio::time::timeout(Duration::from_secs(5), gone_rx)
                .await
                .context("session survived revocation for 5 s")??;
            stats::record(&mut revoke, gone.saturating_duration_since(t));
        }
        anyhow::Ok((issue, revoke))
    })?;
    let i = stats::summary(&issue);
    let r = stats::summary(&revoke);
    emit(
        json_out,
        format!(
            "postgres issue-to-usable (exchange + login + first query): {}",
            i.line()
        ),
        json!({ "bench": "postgres.issue_to_usable", "latency": i.json() }),
    );
    emit(
        json_out,
        format!("postgres revoke-to-session-gone: {}", r.line()),
        json!({ "bench": "postgres.revoke_to_session_gone", "latency": r.json() }),
    );
    server.stop();
    let _ = std::fs::remove_file(&url_file);
    // Roles of the throughput run are still active grants: drop them.
    rt.block_on(async {
        let su = connect(&pg_url()).await?;
        let rows = su
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1 || '%'",
                &[&prefix],
            )
            .await?;
        for row in rows {
            let name: String = row.get(0);
            let _ = su
                .batch_execute(&format!("DROP ROLE IF EXISTS \"{name}\""))
                .await;
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
