#![allow(
    dead_code,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! A PostgreSQL target for the provider tests: its own database with
//! `orders.items`, a least-privilege admin role, a role prefix, and the
//! pg_hba.conf rule that makes generated roles log in with their password.

use lapse_providers::postgres::{PostgresConfig, PrivilegeConfig};
use std::time::Duration;
use tokio_postgres::NoTls;

pub const LOGIN_GROUP: &str = "lapse_test_login";

pub fn pg_url() -> String {
    std::env::var("LAPSE_TEST_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is needed at `{url}` (set LAPSE_TEST_PG_URL; .ci/run starts the local server): {e}"
        )
    });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

pub fn rand_suffix() -> String {
    let b: [u8; 4] = rand::random();
    hex::encode(b)
}

/// A database with `orders.items`, an admin role with least privilege, and the
/// password rule in pg_hba.conf.
pub struct Target {
    pub su: tokio_postgres::Client,
    pub db: String,
    pub admin: String,
    pub prefix: String,
    pub admin_url: String,
}

pub async fn ensure_password_auth(su: &tokio_postgres::Client) {
    let exists = su
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&LOGIN_GROUP])
        .await
        .unwrap()
        .is_some();
    if !exists {
        // Another test may create it at the same moment.
        let _ = su
            .batch_execute(&format!("CREATE ROLE {LOGIN_GROUP} NOLOGIN"))
            .await;
    }
    let rule = format!("+{LOGIN_GROUP}");
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_hba_file_rules WHERE $1 = ANY(user_name) AND auth_method = 'scram-sha-256'",
            &[&rule],
        )
        .await
        .unwrap()
        .get(0);
    if n > 0 {
        return;
    }
    let path: String = su.query_one("SHOW hba_file", &[]).await.unwrap().get(0);
    let old = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    if !old.contains(&rule) {
        let line = format!(
            "# Added by Lapse's tests: roles Lapse generates in tests must log in with their password.\nhost all {rule} 127.0.0.1/32 scram-sha-256\n"
        );
        // Whole-file replace by rename: a reader never sees a half-written file.
        let tmp = format!("{path}.lapse-tmp");
        std::fs::write(&tmp, format!("{line}{old}"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| panic!("cannot add the password rule to {path}: {e}"));
        eprintln!("note: added `host all {rule} 127.0.0.1/32 scram-sha-256` to {path}");
    }
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Setup touches cluster-wide things (pg_hba.conf, parameter ACLs): one test at a time.
pub static SETUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Target {
    pub async fn new() -> Self {
        let _one_at_a_time = SETUP.lock().await;
        let su = connect(&pg_url()).await;
        ensure_password_auth(&su).await;
        let sfx = rand_suffix();
        let db = format!("lapse_t_{sfx}");
        let admin = format!("lapse_adm_{sfx}");
        su.batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        su.batch_execute(&format!(
            "CREATE ROLE {admin} LOGIN CREATEROLE; GRANT pg_signal_backend TO {admin}; GRANT SET ON PARAMETER log_statement TO {admin};"
        ))
        .await
        .unwrap();
        let base = pg_url();
        let in_db = format!("{} dbname={db}", base.replace("dbname=postgres", ""));
        let dbc = connect(&in_db).await;
        dbc.batch_execute(&format!(
            "CREATE SCHEMA orders;
             CREATE TABLE orders.items (id int PRIMARY KEY, name text NOT NULL);
             INSERT INTO orders.items VALUES (1, 'widget'), (2, 'gadget');
             GRANT USAGE ON SCHEMA orders TO {admin} WITH GRANT OPTION;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA orders TO {admin} WITH GRANT OPTION;"
        ))
        .await
        .unwrap();
        let admin_url = format!("host=127.0.0.1 port=5432 user={admin} dbname={db}");
        Self {
            su,
            db,
            admin,
            prefix: format!("lt{sfx}"),
            admin_url,
        }
    }

    pub fn provider_config(&self, dir: &std::path::Path) -> PostgresConfig {
        let file = dir.join("orders-admin.url");
        std::fs::write(&file, &self.admin_url).unwrap();
        PostgresConfig {
            idle_session_timeout: None,
            statement_timeout: None,
            creation: Vec::new(),
            revocation: Vec::new(),
            audience: "orders-db".into(),
            admin_url: format!("file:{}", file.display()),
            role_prefix: self.prefix.clone(),
            connection_limit: 2,
            login_group: Some(LOGIN_GROUP.into()),
            log_statement: "all".into(),
            public_host: None,
            public_port: None,
            pool_size: 4,
            scram_iterations: lapse_providers::postgres::scram::DEFAULT_ITERATIONS,
            grants: vec![
                PrivilegeConfig {
                    tables: Vec::new(),
                    functions: Vec::new(),
                    action: "read".into(),
                    schema: "orders".into(),
                    privileges: vec!["SELECT".into()],
                },
                PrivilegeConfig {
                    tables: Vec::new(),
                    functions: Vec::new(),
                    action: "write".into(),
                    schema: "orders".into(),
                    privileges: vec![
                        "SELECT".into(),
                        "INSERT".into(),
                        "UPDATE".into(),
                        "DELETE".into(),
                    ],
                },
            ],
        }
    }

    pub async fn roles(&self) -> Vec<String> {
        self.su
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1 || '\\_gr\\_%'",
                &[&self.prefix],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn cleanup(&self) {
        for r in self.roles().await {
            let _ = self
                .su
                .batch_execute(&format!("DROP ROLE IF EXISTS \"{r}\""))
                .await;
        }
        let _ = self
            .su
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
            .await;
        for g in ["read", "write"] {
            let _ = self
                .su
                .batch_execute(&format!(
                    "DROP ROLE IF EXISTS {}_orders_db_{g}",
                    self.prefix
                ))
                .await;
        }
        let _ = self
            .su
            .batch_execute(&format!(
                "DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}",
                self.admin
            ))
            .await;
    }
}
