#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Dynamic PostgreSQL users against the real PostgreSQL server on the machine
//! (`LAPSE_TEST_PG_URL`, default the local server as `postgres`).
//!
//! Each test gets its own database, admin role (CREATEROLE, not superuser) and role
//! prefix, so tests can run side by side. Generated roles join `lapse_test_login`,
//! and the harness makes sure `pg_hba.conf` asks those roles for their password
//! (SCRAM) — without it PostgreSQL's trust auth would let an expired role in and the
//! expiry test could not mean anything. If the server is missing, tests fail loudly.

use lapse_broker::Lapse;
use lapse_core::{Clock, FakeClock, SystemClock, TtlDuration};
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

#[path = "support/pg.rs"]
mod pg;
use pg::{Target, connect};

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
    let quiet_start = quiet.then(|| lapse.clone());
    let task = tokio::spawn(async move {
        let _ = lapse_server::serve(l2, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    if let Some(l) = quiet_start {
        // A replica runs the reconciler and the cleanup once as soon as it leads;
        // a quiet test starts after those first passes, so only it drives them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !l.leading() {
            assert!(Instant::now() < deadline, "never took the leader lease");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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

    async fn audit_kinds(&self, grant: &str) -> Vec<Value> {
        let entries = self
            .lapse
            .store
            .audit_for(grant.parse().unwrap())
            .await
            .unwrap();
        entries
            .iter()
            .map(|e| json!({ "kind": e.kind, "data": serde_json::from_str::<Value>(&e.data).unwrap() }))
            .collect()
    }
}

fn login_url(c: &Value) -> String {
    format!(
        "host={} port={} dbname={} user={} password={}",
        c["host"].as_str().unwrap(),
        c["port"],
        c["dbname"].as_str().unwrap(),
        c["username"].as_str().unwrap(),
        c["password"].as_str().unwrap()
    )
}

async fn try_login(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_a_real_database_user_until_it_ends() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let s = start(
        tmp.path().join("data"),
        &target,
        Arc::new(SystemClock),
        false,
    )
    .await;
    let key = DpopKey::generate();

    let (status, v) = s.exchange(&key, "read", 300).await;
    assert_eq!(status, 200, "{v}");
    let cred = &v["credentials"][0];
    assert_eq!(cred["type"], "postgres");
    let user = cred["username"].as_str().unwrap().to_owned();
    let password = cred["password"].as_str().unwrap().to_owned();
    assert!(user.starts_with(&target.prefix), "{user}");
    assert!(password.len() >= 43, "256-bit password");
    let grant = v["grant_id"].as_str().unwrap().to_owned();

    // The role as PostgreSQL sees it: login, expiry = grant expiry, limit, marker, logging.
    let row = target
        .su
        .query_one(
            "SELECT rolcanlogin, rolconnlimit, extract(epoch FROM rolvaliduntil)::float8,
                    shobj_description(oid, 'pg_authid'), rolpassword LIKE 'SCRAM-SHA-256$%'
             FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), 2);
    let until = row.get::<_, f64>(2) as i64;
    let (_, g) = s
        .op(
            reqwest::Method::GET,
            &format!("/v1/grants/{grant}"),
            json!(null),
        )
        .await;
    let expires = g["expires_at"].as_i64().unwrap() / 1000;
    assert!(
        (until - expires).abs() <= 1,
        "VALID UNTIL {until} vs grant expiry {expires}"
    );
    assert!(row.get::<_, String>(3).contains(&grant));
    assert!(
        row.get::<_, bool>(4),
        "the password is stored as a SCRAM verifier"
    );
    let settings: Vec<String> = target
        .su
        .query_one(
            "SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        settings.contains(&"log_statement=all".to_owned()),
        "{settings:?}"
    );
    assert_eq!(g["credentials"][0]["state"], "live", "{g}");
    assert!(
        !g.to_string().contains(&password),
        "the password is never shown again"
    );

    // Log in with the password and read; writing is refused.
    let session = try_login(&login_url(cred))
        .await
        .unwrap_or_else(|e| panic!("login: {e}"));
    let n: i64 = session
        .query_one("SELECT count(*) FROM orders.items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let denied = session
        .batch_execute("INSERT INTO orders.items VALUES (3, 'x')")
        .await
        .unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    // A wrong password is refused: PostgreSQL checks it.
    let wrong = login_url(cred).replace(&password, "not-the-password");
    assert!(try_login(&wrong).await.is_err());

    // Revoke with the session open: the session is gone within a second, and so is the role.
    let t = Instant::now();
    let (status, r) = s
        .op(
            reqwest::Method::POST,
            &format!("/v1/grants/{grant}/revoke"),
            json!({ "reason": "test over" }),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let gone = session.query_one("SELECT 1", &[]).await;
    assert!(gone.is_err(), "the open session must have been terminated");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert!(try_login(&login_url(cred)).await.is_err(), "no new login");
    assert!(target.roles().await.is_empty(), "role dropped");

    let kinds = s.audit_kinds(&grant).await;
    let destroyed = kinds
        .iter()
        .find(|e| e["kind"] == "credential.destroyed")
        .unwrap_or_else(|| panic!("{kinds:?}"));
    assert_eq!(destroyed["data"]["sessions_terminated"], 1, "{destroyed}");
    assert_eq!(destroyed["data"]["sessions_left"], 0);
    assert!(kinds.iter().any(|e| e["kind"] == "credential.created"));
    assert!(
        kinds
            .iter()
            .any(|e| e["kind"] == "grant.issued" && e["data"]["credential"]["state"] == "intended"),
        "intent is recorded with the issue: {kinds:?}"
    );

    // The secret is nowhere in the store, not even in the audit log.
    let dir = s.stop().await;
    for f in ["lapse.db", "lapse.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.join(f)) {
            assert!(
                !bytes
                    .windows(password.len())
                    .any(|w| w == password.as_bytes()),
                "password found in {f}"
            );
        }
    }
    target.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_an_expired_user_while_lapse_is_down_and_lapse_cleans_up_after() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let s = start(
        tmp.path().join("data"),
        &target,
        Arc::new(SystemClock),
        false,
    )
    .await;
    let key = DpopKey::generate();
    let (status, v) = s.exchange(&key, "read", 2).await;
    assert_eq!(status, 200, "{v}");
    let cred = v["credentials"][0].clone();
    let user = cred["username"].as_str().unwrap().to_owned();
    assert!(try_login(&login_url(&cred)).await.is_ok());
    let dir = s.stop().await;

    // Lapse is down. After VALID UNTIL, PostgreSQL itself refuses the password.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let refused = try_login(&login_url(&cred))
        .await
        .expect_err("expired login must fail");
    assert_eq!(
        refused.as_db_error().map(|d| d.code().clone()),
        Some(tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{refused}"
    );
    assert_eq!(
        target.roles().await,
        vec![user.clone()],
        "still there until Lapse is back"
    );

    // Back up: the sweeper expires the grant and the role is dropped.
    let s = start(dir, &target, Arc::new(SystemClock), false).await;
    // The role is dropped in PostgreSQL a moment before `credential.destroyed` is
    // committed: wait for both.
    let grant = v["grant_id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let kinds = loop {
        let kinds = s.audit_kinds(grant).await;
        let recorded = kinds.iter().any(|e| e["kind"] == "credential.destroyed");
        if recorded && target.roles().await.is_empty() {
            break kinds;
        }
        assert!(
            Instant::now() < deadline,
            "role not dropped and recorded after restart: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        kinds.iter().any(|e| e["kind"] == "grant.expired"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|e| e["kind"] == "credential.destroyed"),
        "{kinds:?}"
    );
    s.stop().await;
    target.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_and_standing_report_find_what_slipped() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(SystemClock.now());
    let s = start(
        tmp.path().join("data"),
        &target,
        Arc::new(clock.clone()),
        true,
    )
    .await;
    let key = DpopKey::generate();
    let provider = s.lapse.providers.get("orders-db").unwrap().clone();

    // A clean start reports nothing.
    let (status, r) = s
        .op(
            reqwest::Method::GET,
            "/v1/reports/standing?window=1h",
            json!(null),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["ok"], true, "{r}");

    // 1. An orphan: a role with Lapse's marker and no grant (say, from a crash).
    let orphan_grant = lapse_core::GrantId::generate();
    let orphan = provider.name_for(orphan_grant);
    provider
        .create(
            &lapse_providers::CredentialSpec {
                grant: orphan_grant,
                name: orphan.clone(),
                actions: vec!["read".into()],
                valid_until: clock.now().plus_secs(600),
            },
            &lapse_providers::Secret::generate(),
        )
        .await
        .unwrap();
    // 2. A grant that stayed active past its expiry (the sweeper is held off).
    let (status, v) = s.exchange(&key, "read", 60).await;
    assert_eq!(status, 200, "{v}");
    let stale = v["grant_id"].as_str().unwrap().to_owned();
    clock.advance_secs(120);
    // 3. An active grant whose role vanished behind Lapse's back.
    let (status, v2) = s.exchange(&key, "read", 600).await;
    assert_eq!(status, 200, "{v2}");
    let vanished = v2["grant_id"].as_str().unwrap().to_owned();
    let vanished_role = v2["credentials"][0]["username"]
        .as_str()
        .unwrap()
        .to_owned();
    target
        .su
        .batch_execute(&format!("DROP ROLE \"{vanished_role}\""))
        .await
        .unwrap();

    let (status, r) = s
        .op(
            reqwest::Method::GET,
            "/v1/reports/standing?window=1h",
            json!(null),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["ok"], false, "{r}");
    let findings = r["findings"].as_array().unwrap();
    let has = |kind: &str, key: &str, val: &str| {
        findings.iter().any(|f| f["kind"] == kind && f[key] == val)
    };
    assert!(has("orphan_credential", "credential", &orphan), "{r}");
    assert!(has("active_past_expiry", "grant_id", &stale), "{r}");
    assert_eq!(r["proof"]["audit_chain_verified"], true);

    // The reconciler removes the orphan and ends the grant whose role is gone.
    let acted = s.lapse.reconcile().await.unwrap();
    assert!(acted >= 2, "{acted}");
    assert!(!target.roles().await.contains(&orphan));
    let (_, g) = s
        .op(
            reqwest::Method::GET,
            &format!("/v1/grants/{vanished}"),
            json!(null),
        )
        .await;
    assert_eq!(g["state"], "revoked", "{g}");
    assert!(
        g["end"]["reason"].as_str().unwrap().contains("missing"),
        "{g}"
    );

    // The sweeper ends the stale grant; then the report is clean again.
    s.lapse.sweep().await.unwrap();
    let (_, r) = s
        .op(
            reqwest::Method::GET,
            "/v1/reports/standing?window=1h",
            json!(null),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["proof"]["issued_in_window"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["proof"]["unended"], 0, "{r}");
    s.stop().await;
    target.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_interrupted_between_intent_and_record_is_reconciled() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(SystemClock.now());
    let s = start(
        tmp.path().join("data"),
        &target,
        Arc::new(clock.clone()),
        true,
    )
    .await;
    let key = DpopKey::generate();
    let (status, v) = s.exchange(&key, "read", 600).await;
    assert_eq!(status, 200, "{v}");
    let id: lapse_core::GrantId = v["grant_id"].as_str().unwrap().parse().unwrap();
    let role = v["credentials"][0]["username"].as_str().unwrap().to_owned();

    // Put the grant back to the moment between the role's creation and its record,
    // as a crash there would have left it.
    let g = s.lapse.store.grant(id).await.unwrap().unwrap();
    let mut interrupted = g.clone();
    for c in &mut interrupted.credentials {
        c.state = lapse_core::CredentialState::Intended;
        c.created_at = None;
    }
    interrupted.version += 1;
    s.lapse
        .store
        .commit(lapse_store::WriteBatch {
            grants: vec![lapse_store::GrantWrite::Update {
                grant: interrupted,
                expected_version: g.version,
            }],
            events: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    // Within the grace period it is left alone (the issue may still be running).
    assert_eq!(s.lapse.reconcile().await.unwrap(), 0);
    clock.advance_secs(lapse_broker::credentials::INTENT_GRACE_SECS + 1);
    assert!(s.lapse.reconcile().await.unwrap() >= 1);
    let g = s.lapse.store.grant(id).await.unwrap().unwrap();
    assert_eq!(g.state, lapse_core::GrantState::Revoked);
    assert!(g.end.unwrap().reason.contains("never completed"));
    assert!(
        !target.roles().await.contains(&role),
        "its role is destroyed"
    );
    s.stop().await;
    target.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused_or_neutralised() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = target.provider_config(tmp.path());
    // A prefix that tries SQL is refused before anything connects.
    cfg.role_prefix = "x\"; DROP ROLE postgres; --".into();
    assert!(lapse_providers::postgres::PostgresProvider::new(cfg.clone()).is_err());
    cfg.role_prefix = target.prefix.clone();
    cfg.grants[0].privileges = vec!["SELECT; DROP TABLE orders.items".into()];
    assert!(lapse_providers::postgres::PostgresProvider::new(cfg.clone()).is_err());

    // A schema name that tries SQL is quoted: it names a schema that does not exist.
    let mut evil = target.provider_config(tmp.path());
    evil.grants[0].schema = "orders; DROP TABLE orders.items; --".into();
    let p = lapse_providers::postgres::PostgresProvider::new(evil).unwrap();
    let err = p.prepare().await.unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");

    // A role name full of quotes is created and destroyed as that literal name.
    use lapse_providers::CredentialProvider;
    let p = lapse_providers::postgres::PostgresProvider::new(target.provider_config(tmp.path()))
        .unwrap();
    let name = format!(
        "{}_gr_x\"; DROP ROLE {}; --'\\",
        target.prefix, target.admin
    );
    let h = p
        .create(
            &lapse_providers::CredentialSpec {
                grant: lapse_core::GrantId::generate(),
                name: name.clone(),
                actions: vec!["read".into()],
                valid_until: SystemClock.now().plus_secs(60),
            },
            &lapse_providers::Secret::generate(),
        )
        .await
        .unwrap();
    assert_eq!(h.username, name);
    assert!(target.roles().await.contains(&name));
    let d = p.destroy(&name).await.unwrap();
    assert!(d.existed);
    assert!(!target.roles().await.contains(&name));
    // Destroying again is success: it is already gone.
    assert!(!p.destroy(&name).await.unwrap().existed);

    // The table and the admin role survived all of it.
    let dbc = connect(&target.admin_url).await;
    let n: i64 = dbc
        .query_one("SELECT count(*) FROM orders.items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    drop(dbc);
    target.cleanup().await;
}

impl Server {
    /// The workload renews its own grant (token + DPoP proof), asking for `ttl`.
    async fn renew(&self, key: &DpopKey, token: &str, grant: &str, ttl: &str) -> (u16, Value) {
        let url = format!("{}/v1/grants/{grant}/renew", self.url);
        let proof = key.proof("POST", &url, Some(token), self.lapse.now().unix_seconds());
        let r = self
            .http
            .post(&url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", proof)
            .json(&json!({ "ttl": ttl }))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(json!(null)))
    }
}

impl Target {
    /// `VALID UNTIL` of `role` in unix seconds, `None` when the role is gone.
    async fn valid_until(&self, role: &str) -> Option<i64> {
        self.su
            .query_opt(
                "SELECT extract(epoch FROM rolvaliduntil)::float8 FROM pg_roles WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, f64>(0) as i64)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_moves_valid_until_only_within_the_maximum_lifetime() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(SystemClock.now());
    let s = start(
        tmp.path().join("data"),
        &target,
        Arc::new(clock.clone()),
        true,
    )
    .await;
    let key = DpopKey::generate();
    let start_at = clock.now().unix_seconds();
    let (status, v) = s.exchange(&key, "read", 900).await;
    assert_eq!(status, 200, "{v}");
    let cred = v["credentials"][0].clone();
    let user = cred["username"].as_str().unwrap().to_owned();
    let grant = v["grant_id"].as_str().unwrap().to_owned();
    let mut token = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(target.valid_until(&user).await, Some(start_at + 900));

    // Each renewal is a fresh decision (`@max_ttl("15m")`) and moves VALID UNTIL
    // with the grant; the dev config's maximum lifetime is 1 h from the start.
    let mut expected = Vec::new();
    for _ in 0..4 {
        clock.advance_secs(800);
        let (st, r) = s.renew(&key, &token, &grant, "1h").await;
        assert_eq!(st, 200, "{r}");
        token = r["access_token"].as_str().unwrap().to_owned();
        let until = target.valid_until(&user).await.unwrap();
        let grant_expiry = r["grant"]["expires_at"].as_i64().unwrap() / 1000;
        assert_eq!(until, grant_expiry, "VALID UNTIL follows the renewed grant");
        expected.push(until - start_at);
    }
    // 800+900, 1600+900, 2400+900, then the 1 h cap (3200+900 > 3600).
    assert_eq!(expected, vec![1700, 2500, 3300, 3600]);

    // At the cap, a renewal is refused and VALID UNTIL stays where it was.
    clock.advance_secs(350);
    let (st, r) = s.renew(&key, &token, &grant, "15m").await;
    assert_eq!(st, 409, "maximum lifetime reached: {r}");
    assert_eq!(target.valid_until(&user).await, Some(start_at + 3600));
    // The credential still works (real time is far from its end).
    let session = try_login(&login_url(&cred)).await.unwrap();
    session
        .query_one("SELECT count(*) FROM orders.items", &[])
        .await
        .unwrap();
    drop(session);

    // A renewal the policy refuses ends the grant, and with it the role.
    let (status, v) = s.exchange(&key, "read", 300).await;
    assert_eq!(status, 200, "{v}");
    let user2 = v["credentials"][0]["username"].as_str().unwrap().to_owned();
    let grant2 = v["grant_id"].as_str().unwrap().to_owned();
    let mut token2 = v["access_token"].as_str().unwrap().to_owned();
    let policies = s.dir.join("policies");
    std::fs::write(
        policies.join("zz-no-renewals.cedar"),
        "@id(\"orders-db-closed\")\nforbid (principal, action, resource == Resource::\"orders-db\");\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (st, r) = loop {
        let (st, r) = s.renew(&key, &token2, &grant2, "5m").await;
        if st != 200 {
            break (st, r);
        }
        // Renewed before the reload: the new token replaces the old.
        token2 = r["access_token"].as_str().unwrap().to_owned();
        assert!(Instant::now() < deadline, "policy change never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st, 403, "{r}");
    assert!(r.to_string().contains("orders-db-closed"), "{r}");
    assert_eq!(
        target.valid_until(&user2).await,
        None,
        "a refused renewal drops the role"
    );
    s.stop().await;
    target.cleanup().await;
}

/// PostgreSQL accepts verifiers with any iteration count, and checks the password
/// against them by real SCRAM authentication (the test login group requires it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifiers_with_a_lowered_iteration_count_authenticate() {
    use lapse_providers::CredentialProvider;
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    for iterations in [1, 64, 4096] {
        let mut cfg = target.provider_config(tmp.path());
        cfg.scram_iterations = iterations;
        let p = lapse_providers::postgres::PostgresProvider::new(cfg).unwrap();
        let grant = lapse_core::GrantId::generate();
        let name = p.name_for(grant);
        let secret = lapse_providers::Secret::generate();
        let h = p
            .create(
                &lapse_providers::CredentialSpec {
                    grant,
                    name: name.clone(),
                    actions: vec!["read".into()],
                    valid_until: SystemClock.now().plus_secs(60),
                },
                &secret,
            )
            .await
            .unwrap();
        let stored: String = target
            .su
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            stored.starts_with(&format!("SCRAM-SHA-256${iterations}:")),
            "{stored}"
        );
        let v = serde_json::to_value(&h).unwrap();
        let session = try_login(&login_url(&v)).await.unwrap();
        session
            .query_one("SELECT count(*) FROM orders.items", &[])
            .await
            .unwrap();
        drop(session);
        let mut wrong = v.clone();
        wrong["password"] = json!(lapse_providers::Secret::generate().expose());
        let err = try_login(&login_url(&wrong)).await.unwrap_err();
        assert_eq!(
            err.as_db_error().map(|d| d.code().clone()),
            Some(tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{err}"
        );
        p.destroy(&name).await.unwrap();
    }
    target.cleanup().await;
}

/// A request that waits for people gets its database user when it is collected,
/// once: the password is never kept to be handed out later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_request_gets_its_database_user_when_collected() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(SystemClock.now());
    let s = start(
        tmp.path().join("data"),
        &target,
        Arc::new(clock.clone()),
        true,
    )
    .await;
    let key = DpopKey::generate();
    // `admin` waits for two `dba` approvers; they narrow it to `read`.
    let (status, v) = s.exchange(&key, "admin read", 300).await;
    assert_eq!(status, 400, "{v}");
    let id = v["request_id"].as_str().unwrap().to_owned();
    assert!(
        target.roles().await.is_empty(),
        "nothing exists before approval"
    );
    let approver = std::fs::read_to_string(s.dir.join(dev::APPROVER_TOKEN_FILE)).unwrap();
    for token in [s.admin.clone(), approver.trim().to_owned()] {
        let r = s
            .http
            .post(format!("{}/v1/approvals/{id}/approve", s.url))
            .bearer_auth(token)
            .json(&json!({ "actions": ["read"] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    }
    assert!(
        target.roles().await.is_empty(),
        "created only when collected"
    );
    // The workload takes its time: the reconciler must not mistake an approved,
    // uncollected request for an interrupted issue.
    clock.advance_secs(60);
    s.lapse.reconcile().await.unwrap();
    let collect = || async {
        let url = format!("{}/oauth/token", s.url);
        let proof = key.proof("POST", &url, None, s.lapse.now().unix_seconds());
        let r = s
            .http
            .post(&url)
            .header("DPoP", proof)
            .form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("request_id", id.as_str()),
            ])
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (st, v) = collect().await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["scope"], "read");
    let cred = v["credentials"][0].clone();
    let session = try_login(&login_url(&cred)).await.unwrap();
    session
        .query_one("SELECT count(*) FROM orders.items", &[])
        .await
        .unwrap();
    drop(session);
    let (st, v) = collect().await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v.get("credentials").is_none(),
        "the password is handed out once"
    );
    s.stop().await;
    target.cleanup().await;
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

/// A provider table the database cannot serve (here: a table that does not
/// exist) stops the start with the table named; a database that is merely down
/// does not (it is retried before the first credential).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_database_cannot_serve_stops_the_start() {
    let target = Target::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (mut cfg, _, _) = dev::prepare(&dir, addr).unwrap();
    let mut table = target.provider_config(&dir);
    table.grants[0].tables = vec!["missing".into()];
    cfg.postgres = vec![table];
    let e = match lapse_server::build(cfg.clone(), Arc::new(SystemClock)).await {
        Ok(_) => panic!("started with a table the database cannot serve"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("orders-db") && e.contains("table `orders.missing` does not exist"),
        "{e}"
    );

    let mut down = target.provider_config(&dir);
    let file = dir.join("down.url");
    std::fs::write(&file, "host=127.0.0.1 port=1 user=nobody dbname=none").unwrap();
    down.admin_url = format!("file:{}", file.display());
    cfg.postgres = vec![down];
    assert!(
        lapse_server::build(cfg, Arc::new(SystemClock))
            .await
            .is_ok(),
        "an unreachable target does not stop the start"
    );
    target.cleanup().await;
}
