//! PostgreSQL: `read` is `SELECT` on `orders.items`, `write` an `INSERT`; the busy
//! session sleeps in `pg_sleep`. `VALID UNTIL` makes the server refuse an expired
//! role by itself (with password authentication, which the harness ensures).

use crate::{Session, pg};
use async_trait::async_trait;
use lapse_broker::config::Config;
use serde_json::Value;
use std::path::Path;
use tokio_postgres::NoTls;

pub struct Target(pg::Target);

impl Target {
    pub async fn new() -> Self {
        Self(pg::Target::new().await)
    }

    async fn admin(&self, sql: &str) {
        self.0.su.batch_execute(sql).await.unwrap();
    }
}

struct Pg(tokio_postgres::Client);

#[async_trait]
impl Session for Pg {
    async fn read(&mut self) -> Result<(), String> {
        self.0
            .query_one("SELECT count(*) FROM orders.items", &[])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn write(&mut self) -> Result<(), String> {
        self.0
            .batch_execute("INSERT INTO orders.items VALUES (99, 'x')")
            .await
            .map_err(|e| e.to_string())
    }

    async fn busy(self: Box<Self>) -> Result<(), String> {
        self.0
            .batch_execute("SELECT pg_sleep(30)")
            .await
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl crate::Target for Target {
    fn configure(&self, cfg: &mut Config, dir: &Path) {
        cfg.postgres = vec![self.0.provider_config(dir)];
    }

    async fn login(&self, c: &Value) -> Result<Box<dyn Session>, String> {
        let url = format!(
            "host={} port={} dbname={} user={} password={}",
            c["host"].as_str().unwrap_or_default(),
            c["port"],
            c["dbname"].as_str().unwrap_or_default(),
            c["username"].as_str().unwrap_or_default(),
            c["password"].as_str().unwrap_or_default()
        );
        let (client, conn) = tokio_postgres::connect(&url, NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Box::new(Pg(client)))
    }

    fn refuses_after_expiry(&self) -> bool {
        true
    }

    async fn cut_admin(&self) {
        let a = &self.0.admin;
        self.admin(&format!(
            "ALTER ROLE {a} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{a}';"
        ))
        .await;
    }

    async fn restore_admin(&self) {
        self.admin(&format!("ALTER ROLE {} LOGIN", self.0.admin))
            .await;
    }

    async fn cleanup(&self) {
        self.0.cleanup().await;
    }
}
