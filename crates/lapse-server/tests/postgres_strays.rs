#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The standing-privilege report and what sits in Lapse's namespace on a real
//! PostgreSQL without being Lapse's: a hand-made role named like Lapse's
//! credentials, and a role added by hand to one of Lapse's group roles. Same
//! harness as `postgres.rs` (own database, least-privilege admin, own prefix).

use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_providers::postgres::{PostgresConfig, PrivilegeConfig};
use lapse_server::dev;
use lapse_server::service::Lapse;
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::NoTls;

const LOGIN_GROUP: &str = "lapse_test_login";
const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

fn pg_url() -> String {
    std::env::var("LAPSE_TEST_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

async fn connect(url: &str) -> tokio_postgres::Client {
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

fn rand_suffix() -> String {
    let b: [u8; 4] = rand::random();
    hex::encode(b)
}

/// A database with `orders.items`, an admin role with least privilege, and the
/// password rule in pg_hba.conf.
struct Target {
    su: tokio_postgres::Client,
    db: String,
    admin: String,
    prefix: String,
    admin_url: String,
}

async fn ensure_password_auth(su: &tokio_postgres::Client) {
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
static SETUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Target {
    async fn new() -> Self {
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

    fn provider_config(&self, dir: &std::path::Path) -> PostgresConfig {
        let file = dir.join("orders-admin.url");
        std::fs::write(&file, &self.admin_url).unwrap();
        PostgresConfig {
            audience: "orders-db".into(),
            admin_url: format!("file:{}", file.display()),
            role_prefix: self.prefix.clone(),
            connection_limit: 2,
            login_group: Some(LOGIN_GROUP.into()),
            log_statement: "all".into(),
            public_host: None,
            public_port: None,
            pool_size: 4,
            scram_iterations: lapse_providers::scram::DEFAULT_ITERATIONS,
            grants: vec![
                PrivilegeConfig {
                    action: "read".into(),
                    schema: "orders".into(),
                    privileges: vec!["SELECT".into()],
                },
                PrivilegeConfig {
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

    async fn roles(&self) -> Vec<String> {
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

    async fn cleanup(self) {
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

struct Server {
    url: String,
    dir: PathBuf,
    admin: String,
    lapse: Arc<Lapse>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

async fn start(dir: PathBuf, target: &Target, clock: Arc<dyn Clock>, quiet: bool) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (mut cfg, _, admin) = dev::prepare(&dir, addr).unwrap();
    cfg.postgres = vec![target.provider_config(&dir)];
    if quiet {
        // Nothing runs on its own: the test drives sweeps and reconciles.
        cfg.sweep_interval = Some(TtlDuration::from_secs(3600));
        cfg.reconcile_interval = TtlDuration::from_secs(3600);
    }
    let lapse = lapse_server::build(cfg, clock)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let l2 = lapse.clone();
    let task = tokio::spawn(async move {
        let _ = lapse_server::serve(l2, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    Server {
        url: format!("http://{addr}"),
        dir,
        admin,
        lapse,
        stop: Some(tx),
        task,
        http: lapse_identity::http_client(),
    }
}

impl Server {
    async fn stop(mut self) -> PathBuf {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
        self.dir.clone()
    }

    async fn exchange(&self, key: &DpopKey, scope: &str, ttl: u64) -> (u16, Value) {
        let now = self.lapse.now().unix_seconds();
        let identity = dev::dev_token(&self.dir, CI, 600, &[], now).unwrap();
        let url = format!("{}/oauth/token", self.url);
        let ttl = ttl.to_string();
        let form = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", scope),
            ("task", "T-db"),
            ("purpose", "postgres test"),
            ("ticket", "CHG-1"),
            ("environment", "staging"),
            ("expires_in", ttl.as_str()),
        ];
        let proof = key.proof("POST", &url, None, now);
        let r = self
            .http
            .post(&url)
            .header("DPoP", proof)
            .form(&form)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(json!(null)))
    }

    async fn op(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(json!(null)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_roles_and_hand_added_group_members_are_standing_findings() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let s = start(
        tmp.path().join("data"),
        &target,
        Arc::new(SystemClock),
        true,
    )
    .await;
    let key = DpopKey::generate();
    let report = async || {
        let (status, r) = s
            .op(
                reqwest::Method::GET,
                "/v1/reports/standing?window=1h",
                json!(null),
            )
            .await;
        assert_eq!(status, 200, "{r}");
        r
    };

    // A real grant: its role (Lapse's marker, Lapse's group) is no finding.
    let (status, v) = s.exchange(&key, "read", 600).await;
    assert_eq!(status, 200, "{v}");
    let r = report().await;
    assert_eq!(r["ok"], true, "{r}");

    // By hand: a login role named in Lapse's scheme, in Lapse's groups, without
    // the marker; and an ordinary role made a member of the write group.
    let read = format!("{}_orders_db_read", target.prefix);
    let write = format!("{}_orders_db_write", target.prefix);
    let look_alike = format!(
        "{}_gr_{}",
        target.prefix, "0123456789abcdef0123456789abcdef"
    );
    let member = format!("{}_mallory", target.prefix);
    target
        .su
        .batch_execute(&format!(
            "CREATE ROLE \"{look_alike}\" LOGIN PASSWORD 'hand-made' IN ROLE \"{read}\", \"{write}\";
             CREATE ROLE \"{member}\" LOGIN PASSWORD 'hand-made';
             GRANT \"{write}\" TO \"{member}\";"
        ))
        .await
        .unwrap();

    let r = report().await;
    assert_eq!(r["ok"], false, "{r}");
    let findings = r["findings"].as_array().unwrap();
    let finding = |kind: &str, name: &str| {
        findings
            .iter()
            .find(|f| f["kind"] == kind && f["credential"] == name)
            .unwrap_or_else(|| panic!("no `{kind}` finding for `{name}`: {r}"))
    };
    let f = finding("look_alike_role", &look_alike);
    assert_eq!(f["target"], "orders-db", "{f}");
    let detail = f["detail"].as_str().unwrap();
    assert!(
        detail.contains(&read) && detail.contains(&write),
        "{detail}"
    );
    let f = finding("unexpected_group_member", &member);
    assert!(f["detail"].as_str().unwrap().contains(&write), "{f}");
    // Lapse's own credential is not among them, and nothing else is.
    let ours = v["credentials"][0]["username"].as_str().unwrap();
    assert!(findings.iter().all(|f| f["credential"] != ours), "{r}");
    assert_eq!(findings.len(), 2, "{r}");
    // Reporting is all: Lapse does not remove what it did not make.
    s.lapse.reconcile().await.unwrap();
    assert!(target.roles().await.contains(&look_alike));

    s.stop().await;
    for r in [&look_alike, &member] {
        target
            .su
            .batch_execute(&format!("DROP ROLE IF EXISTS \"{r}\""))
            .await
            .unwrap();
    }
    target.cleanup().await;
}
