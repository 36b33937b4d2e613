#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The PostgreSQL provider on its own against the real PostgreSQL server on the
//! machine (`LAPSE_TEST_PG_URL`, default the local server as `postgres`): what a
//! generated role can do with the privileges its groups were given.
//!
//! Each test gets its own database, admin role (CREATEROLE, not superuser) and role
//! prefix. Generated roles join `lapse_test_login`, which `pg_hba.conf` asks for a
//! password (SCRAM), so logging in as a generated role really uses its password.

use lapse_core::{Clock, GrantId, SystemClock};
use lapse_providers::ProviderError;
use lapse_providers::postgres::{PostgresConfig, PostgresProvider, PrivilegeConfig};
use lapse_providers::{CredentialProvider, CredentialSpec, Handout, Secret, StrayKind};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

const LOGIN_GROUP: &str = "lapse_test_login";

fn pg_url() -> String {
    std::env::var("LAPSE_TEST_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is needed at `{url}` (set LAPSE_TEST_PG_URL): {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Makes sure members of `lapse_test_login` log in with their password (the same
/// rule the server's PostgreSQL tests add).
async fn ensure_password_auth(su: &tokio_postgres::Client) {
    let exists = su
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&LOGIN_GROUP])
        .await
        .unwrap()
        .is_some();
    if !exists {
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
        let tmp = format!("{path}.lapse-tmp");
        std::fs::write(&tmp, format!("{line}{old}"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| panic!("cannot add the password rule to {path}: {e}"));
    }
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}

static SETUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A database with schema `orders`, an admin role holding what the README asks
/// for, and an application role `owner` that creates tables later (with the
/// default privileges a DBA sets so the admin may pass them on).
struct Target {
    su: tokio_postgres::Client,
    /// Superuser connection to the test database.
    db_su: tokio_postgres::Client,
    db: String,
    admin: String,
    owner: String,
    prefix: String,
    url_file: std::path::PathBuf,
}

impl Target {
    async fn new() -> Self {
        let _one_at_a_time = SETUP.lock().await;
        let su = connect(&pg_url()).await;
        ensure_password_auth(&su).await;
        let sfx = format!("{:08x}", rand::random::<u32>());
        let db = format!("lapse_p_{sfx}");
        let admin = format!("lapse_padm_{sfx}");
        let owner = format!("lapse_pown_{sfx}");
        su.batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        su.batch_execute(&format!(
            "CREATE ROLE {admin} LOGIN CREATEROLE; GRANT pg_signal_backend TO {admin};
             GRANT SET ON PARAMETER log_statement TO {admin};
             CREATE ROLE {owner} NOLOGIN;"
        ))
        .await
        .unwrap();
        let in_db = format!("{} dbname={db}", pg_url().replace("dbname=postgres", ""));
        let db_su = connect(&in_db).await;
        db_su
            .batch_execute(&format!(
                "CREATE SCHEMA orders AUTHORIZATION {owner};
                 SET ROLE {owner};
                 CREATE TABLE orders.items (id int PRIMARY KEY, name text NOT NULL);
                 INSERT INTO orders.items VALUES (1, 'widget');
                 CREATE TABLE orders.events (id serial PRIMARY KEY, note text NOT NULL);
                 CREATE TABLE orders.notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text NOT NULL);
                 GRANT USAGE ON SCHEMA orders TO {admin} WITH GRANT OPTION;
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA orders TO {admin} WITH GRANT OPTION;
                 GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA orders TO {admin} WITH GRANT OPTION;
                 ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA orders
                   GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {admin} WITH GRANT OPTION;
                 ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA orders
                   GRANT USAGE, SELECT ON SEQUENCES TO {admin} WITH GRANT OPTION;
                 RESET ROLE;"
            ))
            .await
            .unwrap();
        let url_file = std::env::temp_dir().join(format!("lapse-provider-test-{sfx}.url"));
        std::fs::write(
            &url_file,
            format!("host=127.0.0.1 port=5432 user={admin} dbname={db}"),
        )
        .unwrap();
        Self {
            su,
            db_su,
            db,
            admin,
            owner,
            prefix: format!("lp{sfx}"),
            url_file,
        }
    }

    fn provider(&self) -> PostgresProvider {
        self.provider_with(|_| {})
    }

    /// The provider with the test's config changed by `change`.
    fn provider_with(&self, change: impl FnOnce(&mut PostgresConfig)) -> PostgresProvider {
        let mut cfg = PostgresConfig {
            idle_session_timeout: None,
            statement_timeout: None,
            creation: Vec::new(),
            revocation: Vec::new(),
            audience: "orders-db".into(),
            admin_url: format!("file:{}", self.url_file.display()),
            role_prefix: self.prefix.clone(),
            connection_limit: 2,
            login_group: Some(LOGIN_GROUP.into()),
            log_statement: "none".into(),
            public_host: None,
            public_port: None,
            pool_size: 2,
            scram_iterations: 1,
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
        };
        change(&mut cfg);
        PostgresProvider::new(cfg).unwrap()
    }

    /// Runs `sql` in the test database as the application owner.
    async fn as_owner(&self, sql: &str) {
        self.db_su
            .batch_execute(&format!("SET ROLE {}; {sql}; RESET ROLE;", self.owner))
            .await
            .unwrap();
    }

    async fn cleanup(self) {
        let roles: Vec<String> = self
            .su
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1 || '\\_%'",
                &[&self.prefix],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(self.db_su);
        let _ = self
            .su
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
            .await;
        for r in roles {
            let _ = self
                .su
                .batch_execute(&format!("DROP ROLE IF EXISTS \"{r}\""))
                .await;
        }
        for r in [&self.admin, &self.owner] {
            let _ = self
                .su
                .batch_execute(&format!("DROP ROLE IF EXISTS {r}"))
                .await;
        }
        let _ = std::fs::remove_file(&self.url_file);
    }
}

async fn issue(p: &PostgresProvider, actions: &[&str]) -> Handout {
    let grant = GrantId::generate();
    let spec = CredentialSpec {
        grant,
        name: p.name_for(grant),
        actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        valid_until: SystemClock.now().plus_secs(300),
    };
    p.create(&spec, &Secret::generate())
        .await
        .unwrap_or_else(|e| panic!("create {actions:?}: {e}"))
}

/// Logs in as the handed-out role, with its password.
async fn login(h: &Handout) -> tokio_postgres::Client {
    connect(&format!(
        "host={} port={} dbname={} user={} password={}",
        h.host, h.port, h.dbname, h.username, h.password
    ))
    .await
}

fn denied(r: Result<impl Sized, tokio_postgres::Error>) -> String {
    match r {
        Ok(_) => panic!("expected permission denied, it succeeded"),
        Err(e) => {
            let m = e.as_db_error().map(|d| d.message().to_owned());
            let m = m.unwrap_or_else(|| e.to_string());
            assert!(m.contains("permission denied"), "{m}");
            m
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_grants_insert_into_serial_and_identity_columns() {
    let t = Target::new().await;
    let p = t.provider();

    let w = issue(&p, &["write"]).await;
    let c = login(&w).await;
    let id: i32 = c
        .query_one(
            "INSERT INTO orders.events (note) VALUES ('serial') RETURNING id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("insert into a serial column: {e:?}"))
        .get(0);
    assert_eq!(id, 1);
    let id: i64 = c
        .query_one(
            "INSERT INTO orders.notes (note) VALUES ('identity') RETURNING id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("insert into an identity column: {e:?}"))
        .get(0);
    assert_eq!(id, 1);
    // UPDATE … SET id = DEFAULT also draws from the sequence.
    c.execute("UPDATE orders.events SET id = DEFAULT WHERE id = 1", &[])
        .await
        .unwrap_or_else(|e| panic!("update to a serial default: {e:?}"));
    // Sequence privileges follow the action, no further: setval is not part of
    // any table privilege.
    denied(
        c.query_one("SELECT setval('orders.events_id_seq', 100)", &[])
            .await,
    );

    // A read grant reads the sequence's state (as pg_dump does) but draws nothing.
    let r = issue(&p, &["read"]).await;
    let rc = login(&r).await;
    let last: i64 = rc
        .query_one("SELECT last_value FROM orders.events_id_seq", &[])
        .await
        .unwrap_or_else(|e| panic!("read a sequence: {e:?}"))
        .get(0);
    assert_eq!(last, 2);
    denied(
        rc.query_one("SELECT nextval('orders.events_id_seq')", &[])
            .await,
    );
    denied(
        rc.execute("INSERT INTO orders.events (note) VALUES ('no')", &[])
            .await,
    );

    drop((c, rc));
    for h in [&w, &r] {
        p.destroy(&h.username).await.unwrap();
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_after_the_first_issue_are_usable_by_the_next() {
    let t = Target::new().await;
    let p = t.provider();

    let first = issue(&p, &["read"]).await;
    let fc = login(&first).await;
    fc.query_one("SELECT count(*) FROM orders.items", &[])
        .await
        .unwrap();

    // After the provider prepared itself: the application adds a table (with a
    // serial column), and a superuser adds one the admin was given nothing on.
    t.as_owner("CREATE TABLE orders.late (id serial PRIMARY KEY, v text); INSERT INTO orders.late (v) VALUES ('late')")
        .await;
    t.db_su
        .batch_execute("CREATE TABLE orders.hidden (secret text)")
        .await
        .unwrap();

    // The same provider (no restart): the next grant reads the new table, and
    // the table the admin cannot pass on does not stop it from being issued.
    let next = issue(&p, &["read"]).await;
    let nc = login(&next).await;
    let v: String = nc
        .query_one("SELECT v FROM orders.late", &[])
        .await
        .unwrap_or_else(|e| panic!("read a table made after the first issue: {e:?}"))
        .get(0);
    assert_eq!(v, "late");
    denied(nc.query_one("SELECT * FROM orders.hidden", &[]).await);
    // Privileges are the group's: the first grant sees the new table too.
    fc.query_one("SELECT v FROM orders.late", &[])
        .await
        .unwrap_or_else(|e| panic!("the earlier grant, same group: {e:?}"));

    // A write grant inserts into it, drawing from its (new) sequence.
    let w = issue(&p, &["write"]).await;
    let wc = login(&w).await;
    let id: i32 = wc
        .query_one("INSERT INTO orders.late (v) VALUES ('w') RETURNING id", &[])
        .await
        .unwrap_or_else(|e| panic!("insert into a new serial table: {e:?}"))
        .get(0);
    assert_eq!(id, 2);

    drop((fc, nc, wc));
    for h in [&first, &next, &w] {
        p.destroy(&h.username).await.unwrap();
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alikes_and_hand_added_group_members_are_strays() {
    let t = Target::new().await;
    let p = t.provider();
    let ours = issue(&p, &["read"]).await;
    assert!(
        p.strays().await.unwrap().is_empty(),
        "Lapse's own credential and the admin are not strays"
    );

    let read = &p.groups()["read"];
    let write = &p.groups()["write"];
    let look_alike = format!("{}_gr_{}", t.prefix, "0123456789abcdef0123456789abcdef");
    let member = format!("{}_alice", t.prefix);
    t.su.batch_execute(&format!(
        "CREATE ROLE \"{look_alike}\" LOGIN PASSWORD 'x' IN ROLE \"{read}\", \"{write}\";
         CREATE ROLE \"{member}\" LOGIN;
         GRANT \"{write}\" TO \"{member}\";
         -- Named like a credential, joins nothing: still inside Lapse's namespace.
         CREATE ROLE \"{}_gr_{}\" NOLOGIN;",
        t.prefix, "fedcba9876543210fedcba9876543210"
    ))
    .await
    .unwrap();

    let strays = p.strays().await.unwrap();
    let found: Vec<(&str, StrayKind, Vec<&str>, bool)> = strays
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.kind,
                s.groups.iter().map(String::as_str).collect(),
                s.can_login,
            )
        })
        .collect();
    let idle = format!("{}_gr_fedcba9876543210fedcba9876543210", t.prefix);
    let mut groups = vec![read.as_str(), write.as_str()];
    groups.sort();
    assert_eq!(
        found,
        vec![
            (
                member.as_str(),
                StrayKind::GroupMember,
                vec![write.as_str()],
                true
            ),
            (look_alike.as_str(), StrayKind::LookAlike, groups, true),
            (idle.as_str(), StrayKind::LookAlike, vec![], false),
        ],
        "{strays:?}"
    );
    // Lapse's own credential is listed as its own, never as a stray.
    assert!(
        p.list()
            .await
            .unwrap()
            .iter()
            .any(|e| e.name == ours.username)
    );

    p.destroy(&ours.username).await.unwrap();
    t.cleanup().await;
}

/// The cost of keeping privileges current on every issue: the check alone (what
/// an issue pays when nothing is missing) with 3, 203 and 1,003 tables (each with a
/// sequence) in the schema, and whole issues for scale. Prints the figures:
/// `cargo test -p lapse-providers --test postgres privilege_sync_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn privilege_sync_cost() {
    let t = Target::new().await;
    let p = t.provider();
    let write = vec!["write".to_owned()];
    let mut names = Vec::new();
    let mut tables = 3;
    for add in [0, 200, 800] {
        let mut ddl = String::new();
        for i in tables..tables + add {
            ddl.push_str(&format!(
                "CREATE TABLE orders.t{i} (id serial PRIMARY KEY, v text);"
            ));
        }
        if add > 0 {
            t.as_owner(&ddl).await;
        }
        tables += add;
        // The first run after new tables grants them.
        let start = Instant::now();
        p.sync_privileges(&write).await.unwrap();
        let granting = start.elapsed();
        let n = 200;
        let start = Instant::now();
        for _ in 0..n {
            p.sync_privileges(&write).await.unwrap();
        }
        let check = start.elapsed() / n;
        let n = 20;
        let start = Instant::now();
        for _ in 0..n {
            names.push(issue(&p, &["write"]).await.username);
        }
        let whole = start.elapsed() / n;
        eprintln!(
            "{tables} tables: check {check:?} per issue (mean of 200), whole issue {whole:?} (mean of 20), granting {add} new tables once {granting:?}"
        );
    }
    for n in names {
        p.destroy(&n).await.unwrap();
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_that_cannot_end_sessions_is_found_at_prepare() {
    let t = Target::new().await;
    t.su.batch_execute(&format!("REVOKE pg_signal_backend FROM {}", t.admin))
        .await
        .unwrap();
    let err = t.provider().prepare().await.unwrap_err().to_string();
    assert!(err.contains("pg_signal_backend"), "{err}");
    assert!(!err.contains("CREATEROLE"), "{err}");
    t.su.batch_execute(&format!("ALTER ROLE {} NOCREATEROLE", t.admin))
        .await
        .unwrap();
    let err = t.provider().prepare().await.unwrap_err().to_string();
    assert!(err.contains("CREATEROLE"), "{err}");
    t.su.batch_execute(&format!(
        "ALTER ROLE {0} CREATEROLE; GRANT pg_signal_backend TO {0}",
        t.admin
    ))
    .await
    .unwrap();
    t.provider().prepare().await.unwrap();
    t.cleanup().await;
}

/// `tables` narrows an action to named tables (and the sequences they own),
/// `functions` with `EXECUTE` to named routines; the rest of the schema stays
/// out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_can_be_scoped_to_tables_and_routines() {
    let t = Target::new().await;
    t.as_owner(
        "CREATE FUNCTION orders.total() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM orders.items';
         CREATE FUNCTION orders.total(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
         CREATE FUNCTION orders.other() RETURNS int LANGUAGE sql AS 'SELECT 1';
         REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA orders FROM PUBLIC",
    )
    .await;
    t.as_owner(&format!(
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA orders TO {} WITH GRANT OPTION",
        t.admin
    ))
    .await;
    let p = t.provider_with(|c| {
        c.grants = vec![
            PrivilegeConfig {
                action: "read".into(),
                schema: "orders".into(),
                privileges: vec!["SELECT".into(), "EXECUTE".into()],
                tables: vec!["items".into(), "events".into()],
                functions: vec!["total".into()],
            },
            PrivilegeConfig {
                action: "write".into(),
                schema: "orders".into(),
                privileges: vec!["INSERT".into()],
                tables: vec!["events".into()],
                functions: Vec::new(),
            },
        ];
    });
    p.prepare().await.unwrap();
    let h = issue(&p, &["read", "write"]).await;
    let c = login(&h).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM orders.items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    denied(c.query_one("SELECT count(*) FROM orders.notes", &[]).await);
    let n: i64 = c
        .query_one("SELECT orders.total()", &[])
        .await
        .unwrap_or_else(|e| panic!("EXECUTE on a named routine: {e:?}"))
        .get(0);
    assert_eq!(n, 1);
    let n: i32 = c
        .query_one("SELECT orders.total(7)", &[])
        .await
        .unwrap_or_else(|e| panic!("every overload of the name: {e:?}"))
        .get(0);
    assert_eq!(n, 7);
    denied(c.query_one("SELECT orders.other()", &[]).await);
    // INSERT on `events` brings USAGE on the sequence it owns, and no other.
    c.execute("INSERT INTO orders.events (note) VALUES ('scoped')", &[])
        .await
        .unwrap_or_else(|e| panic!("insert into a scoped serial table: {e:?}"));
    denied(
        c.execute("INSERT INTO orders.items VALUES (5, 'x')", &[])
            .await,
    );
    drop(c);
    p.destroy(&h.username).await.unwrap();
    t.cleanup().await;
}

/// What the config names must exist and be the admin's to pass on; the
/// operator's statements must run. All of it is found by `prepare`, as
/// `ProviderError::Unfit` (the broker refuses to start on it), not at the first
/// grant, and the trial of the statements leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_finds_what_the_database_cannot_serve() {
    let t = Target::new().await;
    t.as_owner("CREATE TABLE orders.private (v text)").await;
    t.db_su
        .batch_execute(&format!("REVOKE ALL ON orders.private FROM {}", t.admin))
        .await
        .unwrap();
    let scoped = |tables: &[&str], privileges: &[&str], functions: &[&str]| PrivilegeConfig {
        action: "read".into(),
        schema: "orders".into(),
        privileges: privileges.iter().map(|p| (*p).to_owned()).collect(),
        tables: tables.iter().map(|p| (*p).to_owned()).collect(),
        functions: functions.iter().map(|p| (*p).to_owned()).collect(),
    };
    type Change<'a> = Box<dyn FnOnce(&mut PostgresConfig) + 'a>;
    let cases: Vec<(Change<'_>, &str)> = vec![
        (
            Box::new(move |c| c.grants = vec![scoped(&["nope"], &["SELECT"], &[])]),
            "table `orders.nope` does not exist",
        ),
        (
            Box::new(move |c| c.grants = vec![scoped(&["private"], &["SELECT"], &[])]),
            "lacks SELECT WITH GRANT OPTION on `orders.private`",
        ),
        (
            Box::new(move |c| c.grants = vec![scoped(&[], &["EXECUTE"], &["nope"])]),
            "routine `orders.nope` does not exist",
        ),
        (
            Box::new(|c| {
                let mut g = scoped(&[], &["SELECT"], &[]);
                g.schema = "elsewhere".into();
                c.grants = vec![g];
            }),
            "schema `elsewhere` does not exist",
        ),
        (
            Box::new(|c| c.creation = vec!["ALTER ROLE {{name}} SET serch_path = orders".into()]),
            "fail on a trial role",
        ),
        (
            Box::new(|c| c.revocation = vec!["DELETE FROM orders.nope WHERE g = {{grant}}".into()]),
            "fail on a trial role",
        ),
    ];
    for (change, want) in cases {
        let e = t.provider_with(change).prepare().await.unwrap_err();
        assert!(matches!(e, ProviderError::Unfit { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "`{want}` not in: {e}");
    }
    let left: i64 =
        t.su.query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '\\_probe\\_%'",
            &[&t.prefix],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the trial role was rolled back");
    t.cleanup().await;
}

/// `creation` statements run in the role's own transaction with typed
/// placeholders; `revocation` statements once its sessions are gone, before the
/// drop. Request text never reaches them: the values are the grant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_and_revocation_statements_run_with_typed_placeholders() {
    let t = Target::new().await;
    t.as_owner(&format!(
        "CREATE TABLE orders.access (grant_id text PRIMARY KEY, until timestamptz NOT NULL);
         GRANT SELECT, INSERT, DELETE ON orders.access TO {}",
        t.admin
    ))
    .await;
    let p = t.provider_with(|c| {
        c.creation = vec![
            "ALTER ROLE {{name}} SET search_path = orders".into(),
            "INSERT INTO orders.access VALUES ({{grant}}, {{valid_until}});".into(),
        ];
        c.revocation = vec!["DELETE FROM orders.access WHERE grant_id = {{grant}}".into()];
    });
    p.prepare().await.unwrap();
    let grant = GrantId::generate();
    let spec = CredentialSpec {
        grant,
        name: p.name_for(grant),
        actions: vec!["read".into()],
        valid_until: SystemClock.now().plus_secs(300),
    };
    let h = p.create(&spec, &Secret::generate()).await.unwrap();
    let rows = t
        .db_su
        .query(
            "SELECT grant_id, extract(epoch FROM until)::bigint FROM orders.access",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), grant.to_string());
    assert_eq!(
        rows[0].get::<_, i64>(1),
        spec.valid_until.unix_seconds(),
        "{{{{valid_until}}}} is the grant's expiry"
    );
    let c = login(&h).await;
    let path: String = c.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(path, "orders");
    let n: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 1,
        "the unqualified name resolves through the set search_path"
    );
    let d = p.destroy(&h.username).await.unwrap();
    assert_eq!(d.sessions_terminated, 1);
    let n: i64 = t
        .db_su
        .query_one("SELECT count(*) FROM orders.access", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the revocation statement ran");
    assert!(!p.destroy(&h.username).await.unwrap().existed);
    t.cleanup().await;
}

/// Per-role timeouts bound a session PostgreSQL would otherwise keep forever
/// once Lapse is gone (`VALID UNTIL` refuses new logins only): an idle session
/// is ended by the server after `idle_session_timeout`, a long statement after
/// `statement_timeout`. A session that keeps running short statements is bounded
/// by neither; only the broker (back up: its sweeper) ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_role_timeouts_end_idle_sessions_and_long_statements_without_lapse() {
    let t = Target::new().await;
    let p = t.provider_with(|c| {
        c.idle_session_timeout = Some(lapse_core::TtlDuration::from_secs(1));
        c.statement_timeout = Some(lapse_core::TtlDuration::from_secs(1));
    });
    p.prepare().await.unwrap();
    let h = issue(&p, &["read"]).await;

    let c = login(&h).await;
    let started = std::time::Instant::now();
    let e = c.batch_execute("SELECT pg_sleep(5)").await.unwrap_err();
    let took = started.elapsed();
    let m = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(m.contains("statement timeout"), "{e:?}");
    assert!(took < Duration::from_secs(3), "cancelled after {took:?}");

    // The idle session: its last statement, then nothing; the server ends it.
    c.batch_execute("SELECT 1").await.unwrap();
    let idle_from = std::time::Instant::now();
    let deadline = idle_from + Duration::from_secs(5);
    loop {
        let n: i64 =
            t.su.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&h.username],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle session outlived its timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = idle_from.elapsed();
    assert!(
        gone >= Duration::from_millis(900),
        "ended before its timeout: {gone:?}"
    );
    eprintln!("idle session ended by the server {gone:?} after its last statement (timeout 1 s)");
    assert!(
        c.batch_execute("SELECT 1").await.is_err(),
        "the client sees it closed"
    );
    p.destroy(&h.username).await.unwrap();
    t.cleanup().await;
}
