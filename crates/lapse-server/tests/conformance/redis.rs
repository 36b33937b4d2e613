//! Redis (a private `redis-server` per test, started by lapse-testkit): `read`
//! is `GET` on `orders:*`, `write` a `SET`; the busy session blocks in `XREAD
//! BLOCK`. The broker's admin is a user holding exactly the provider's
//! documented least privileges ([`admin_rules`]), never `default`.
//!
//! Redis ACL users have no expiry of their own: with the broker down a user
//! outlives its grant until the broker is back, when the sweeper and the
//! reconciler remove it (the suite checks that part), so `refuses_after_expiry`
//! is false.

use crate::Session;
use async_trait::async_trait;
use lapse_broker::config::Config;
use lapse_providers::redis::{PrivilegeConfig, RedisConfig, admin_rules};
use lapse_testkit::redis::RedisServer;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, cmd};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const MARKER: &str = "lapse:credentials";
const ADMIN: &str = "lapse_admin";
const ADMIN_PASSWORD: &str = "adm-conformance-pw";

/// A connection of its own (one TCP connection per session), waiting as long
/// as a command takes (the busy XREAD).
async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(None);
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

pub struct Target {
    server: RedisServer,
}

impl Target {
    pub async fn new() -> Self {
        let server = RedisServer::start();
        let t = Self { server };
        let mut root = t.root().await;
        cmd("SET")
            .arg("orders:items")
            .arg("widget")
            .query_async::<()>(&mut root)
            .await
            .unwrap();
        cmd("XADD")
            .arg("orders:stream")
            .arg("*")
            .arg("a")
            .arg("1")
            .query_async::<String>(&mut root)
            .await
            .unwrap();
        cmd("ACL")
            .arg("SETUSER")
            .arg(ADMIN)
            .arg("reset")
            .arg("on")
            .arg(format!(">{ADMIN_PASSWORD}"))
            .arg(admin_rules(MARKER))
            .query_async::<()>(&mut root)
            .await
            .unwrap();
        t
    }

    async fn root(&self) -> MultiplexedConnection {
        connect(&self.server.root_url())
            .await
            .unwrap_or_else(|e| panic!("the test's redis-server: {e}"))
    }
}

struct Rd(MultiplexedConnection);

#[async_trait]
impl Session for Rd {
    async fn read(&mut self) -> Result<(), String> {
        cmd("GET")
            .arg("orders:items")
            .query_async::<Option<String>>(&mut self.0)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    async fn write(&mut self) -> Result<(), String> {
        cmd("SET")
            .arg("orders:items")
            .arg("x")
            .query_async::<()>(&mut self.0)
            .await
            .map_err(|e| e.to_string())
    }

    async fn busy(mut self: Box<Self>) -> Result<(), String> {
        cmd("XREAD")
            .arg("BLOCK")
            .arg(30_000)
            .arg("STREAMS")
            .arg("orders:stream")
            .arg("$")
            .query_async::<redis::Value>(&mut self.0)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl crate::Target for Target {
    fn configure(&self, cfg: &mut Config, dir: &Path) {
        let file = dir.join("orders-admin.url");
        std::fs::write(&file, self.server.url_for(ADMIN, ADMIN_PASSWORD)).unwrap();
        let grant = |action: &str, commands: &[&str]| PrivilegeConfig {
            action: action.into(),
            keys: vec!["orders:*".into()],
            channels: vec![],
            commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        };
        cfg.redis = vec![RedisConfig {
            audience: "orders-db".into(),
            admin_url: format!("file:{}", file.display()),
            user_prefix: "lapse".into(),
            public_host: None,
            public_port: None,
            marker_key: MARKER.into(),
            allow_all_keys: false,
            grants: vec![
                grant("read", &["+get", "+xread"]),
                grant("write", &["+get", "+xread", "+@write"]),
            ],
        }];
    }

    async fn login(&self, c: &Value) -> Result<Box<dyn Session>, String> {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        let url = format!(
            "redis://{}:{}@{}:{}",
            s("username"),
            s("password"),
            s("host"),
            c["port"].as_u64().unwrap_or(6379)
        );
        let conn = connect(&url).await.map_err(|e| e.to_string())?;
        Ok(Box::new(Rd(conn)))
    }

    fn refuses_after_expiry(&self) -> bool {
        false
    }

    async fn cut_admin(&self) {
        let mut r = self.root().await;
        cmd("ACL")
            .arg("SETUSER")
            .arg(ADMIN)
            .arg("off")
            .query_async::<()>(&mut r)
            .await
            .unwrap();
        cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(ADMIN)
            .query_async::<i64>(&mut r)
            .await
            .unwrap();
    }

    async fn restore_admin(&self) {
        cmd("ACL")
            .arg("SETUSER")
            .arg(ADMIN)
            .arg("on")
            .query_async::<()>(&mut self.root().await)
            .await
            .unwrap();
    }

    /// The server dies with the target; nothing outlives the test.
    async fn cleanup(&self) {}
}
