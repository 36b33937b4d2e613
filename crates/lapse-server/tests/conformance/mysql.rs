//! MariaDB/MySQL (the machine's MariaDB, `LAPSE_TEST_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`): `read` is `SELECT` on `items`, `write`
//! an `INSERT`; the busy session sleeps in `SLEEP(30)`. Each test gets its own
//! databases and an admin account holding the least privileges the provider
//! documents, never root.
//!
//! MariaDB has no `VALID UNTIL`: with the broker down an account outlives its
//! grant until the broker is back, when the sweeper and the reconciler remove it
//! (the suite checks that part), so `refuses_after_expiry` is false.

use crate::Session;
use async_trait::async_trait;
use lapse_broker::config::Config;
use lapse_providers::mysql::{MysqlConfig, PrivilegeConfig};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn root_url() -> String {
    std::env::var("LAPSE_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

async fn root() -> Conn {
    let url = root_url();
    let opts = Opts::from_url(&url).unwrap();
    tokio::time::timeout(Duration::from_secs(10), Conn::new(opts))
        .await
        .unwrap_or_else(|_| panic!("MariaDB at `{url}` did not answer in 10 s (set LAPSE_TEST_MYSQL_URL)"))
        .unwrap_or_else(|e| {
            panic!("MariaDB is needed at `{url}` as a user that may create users and databases (set LAPSE_TEST_MYSQL_URL): {e}")
        })
}

pub struct Target {
    sfx: String,
    db: String,
    marker_db: String,
    admin: String,
    prefix: String,
}

impl Target {
    pub async fn new() -> Self {
        let sfx = format!("{:08x}", rand::random::<u32>());
        let t = Self {
            db: format!("lapse_c_{sfx}"),
            marker_db: format!("lapse_cm_{sfx}"),
            admin: format!("lapse_cadm_{sfx}"),
            prefix: format!("lc{sfx}"),
            sfx,
        };
        let (db, marker, admin) = (&t.db, &t.marker_db, &t.admin);
        // In database-level grants `_` is a wildcard: escaped, as the README says.
        let (edb, emarker) = (db.replace('_', "\\_"), marker.replace('_', "\\_"));
        root()
            .await
            .query_drop(format!(
                "CREATE DATABASE `{db}`;
                 CREATE TABLE `{db}`.items (id INT PRIMARY KEY, name TEXT NOT NULL);
                 INSERT INTO `{db}`.items VALUES (1, 'widget');
                 CREATE USER `{admin}`@`%` IDENTIFIED BY 'adm-{sfx}';
                 GRANT CREATE USER, PROCESS, CONNECTION ADMIN ON *.* TO `{admin}`@`%`;
                 GRANT SELECT ON mysql.global_priv TO `{admin}`@`%`;
                 GRANT CREATE, SELECT, INSERT, DELETE ON `{emarker}`.* TO `{admin}`@`%`;
                 GRANT SELECT, INSERT, UPDATE, DELETE ON `{edb}`.* TO `{admin}`@`%` WITH GRANT OPTION;",
                sfx = t.sfx
            ))
            .await
            .unwrap();
        t
    }
}

struct My(Conn);

#[async_trait]
impl Session for My {
    async fn read(&mut self) -> Result<(), String> {
        self.0
            .query_drop("SELECT COUNT(*) FROM items")
            .await
            .map_err(|e| e.to_string())
    }

    async fn write(&mut self) -> Result<(), String> {
        self.0
            .query_drop("INSERT INTO items VALUES (99, 'x')")
            .await
            .map_err(|e| e.to_string())
    }

    async fn busy(mut self: Box<Self>) -> Result<(), String> {
        self.0
            .query_drop("SELECT SLEEP(30)")
            .await
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl crate::Target for Target {
    fn configure(&self, cfg: &mut Config, dir: &Path) {
        let file = dir.join("orders-admin.url");
        std::fs::write(
            &file,
            format!(
                "mysql://{}:adm-{}@127.0.0.1:3306/{}",
                self.admin, self.sfx, self.db
            ),
        )
        .unwrap();
        let grant = |action: &str, privileges: &[&str]| PrivilegeConfig {
            action: action.into(),
            database: self.db.clone(),
            table: "items".into(),
            privileges: privileges.iter().map(|p| (*p).to_owned()).collect(),
        };
        cfg.mysql = vec![MysqlConfig {
            audience: "orders-db".into(),
            admin_url: format!("file:{}", file.display()),
            user_prefix: self.prefix.clone(),
            host: "%".into(),
            max_user_connections: 2,
            public_host: None,
            public_port: None,
            database: None,
            marker_database: self.marker_db.clone(),
            pool_size: 2,
            grants: vec![
                grant("read", &["SELECT"]),
                grant("write", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
            ],
        }];
    }

    async fn login(&self, c: &Value) -> Result<Box<dyn Session>, String> {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        let opts = OptsBuilder::default()
            .ip_or_hostname(s("host"))
            .tcp_port(u16::try_from(c["port"].as_u64().unwrap_or(3306)).unwrap_or(3306))
            .user(Some(s("username")))
            .pass(Some(s("password")))
            .db_name(Some(s("dbname")))
            .prefer_socket(false);
        let conn = Conn::new(opts).await.map_err(|e| e.to_string())?;
        Ok(Box::new(My(conn)))
    }

    fn refuses_after_expiry(&self) -> bool {
        false
    }

    async fn cut_admin(&self) {
        let mut r = root().await;
        r.query_drop(format!("ALTER USER `{}`@`%` ACCOUNT LOCK", self.admin))
            .await
            .unwrap();
        let ids: Vec<u64> = r
            .exec(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
                (&self.admin,),
            )
            .await
            .unwrap();
        for id in ids {
            let _ = r.query_drop(format!("KILL CONNECTION {id}")).await;
        }
    }

    async fn restore_admin(&self) {
        root()
            .await
            .query_drop(format!("ALTER USER `{}`@`%` ACCOUNT UNLOCK", self.admin))
            .await
            .unwrap();
    }

    async fn cleanup(&self) {
        let mut r = root().await;
        let users: Vec<(String, String)> = r
            .exec(
                "SELECT User, Host FROM mysql.global_priv WHERE LEFT(User, CHAR_LENGTH(?)) = ? OR User = ?",
                (&self.prefix, &self.prefix, &self.admin),
            )
            .await
            .unwrap();
        for (u, h) in users {
            let _ = r
                .query_drop(format!(
                    "DROP USER IF EXISTS `{}`@`{}`",
                    u.replace('`', "``"),
                    h.replace('`', "``")
                ))
                .await;
        }
        for d in [&self.db, &self.marker_db] {
            let _ = r.query_drop(format!("DROP DATABASE IF EXISTS `{d}`")).await;
        }
    }
}
