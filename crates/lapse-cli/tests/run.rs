#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! `lapse run` as CI uses it: a real `lapse serve` process with the GitHub Actions,
//! GitLab CI and Kubernetes issuer configs from `examples/identity` (their keys made
//! here), real child processes, real signals, and the local PostgreSQL.

use lapse_testkit::process::show;
use lapse_token::SigningKey;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");
const CI: &str = "spiffe://dev.lapse.local/ci/deploy";
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
const EXIT_GRANT_ENDED: i32 = 111;

/// Identity issuers the test plays: name, the example folder, the issuer URL.
const ISSUERS: &[(&str, &str)] = &[
    (
        "github-actions",
        "https://token.actions.githubusercontent.com",
    ),
    ("gitlab-ci", "https://gitlab.com"),
    ("kubernetes", "https://kubernetes.default.svc.cluster.local"),
];

struct Broker {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    url: String,
    admin: String,
    keys: Vec<(String, SigningKey)>,
    child: Child,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

impl Broker {
    /// The dev configuration plus the three example CI issuers and their policies,
    /// and `extra` TOML appended to the config.
    fn start(extra: &str) -> Self {
        Self::start_edit(|toml| toml + extra)
    }

    /// Like `start`, with the final config text made by `edit`.
    fn start_edit(edit: impl FnOnce(String) -> String) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let addr = free_addr();
        let (_, cfg_path, admin) = lapse_server::dev::prepare(&dir, addr).unwrap();
        let dir = dir.canonicalize().unwrap();
        let mut toml = std::fs::read_to_string(&cfg_path).unwrap();
        let policies = dir.join("policies");
        let mut keys = Vec::new();
        for (name, _) in ISSUERS {
            let key = SigningKey::generate();
            let jwks = dir.join(format!("{name}.jwks.json"));
            std::fs::write(&jwks, json!({ "keys": [key.jwk()] }).to_string()).unwrap();
            let example = Path::new(EXAMPLES).join("identity").join(name);
            // The example issuer as published, pointed at this test's keys.
            let issuer: String = std::fs::read_to_string(example.join("issuer.toml"))
                .unwrap()
                .lines()
                .map(|l| {
                    if l.starts_with("jwks = ") {
                        format!("jwks = \"file://{}\"", jwks.display())
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            toml.push_str(&format!("\n{issuer}\n"));
            for f in std::fs::read_dir(&example).unwrap() {
                let p = f.unwrap().path();
                if p.extension().is_some_and(|e| e == "cedar") {
                    std::fs::copy(&p, policies.join(format!("{name}.cedar"))).unwrap();
                }
            }
            keys.push(((*name).to_owned(), key));
        }
        // The dev schema declares read/write/admin; the CI examples add `migrate`.
        std::fs::write(
            policies.join("migrate.cedarschema"),
            "action \"migrate\" appliesTo { principal: Workload, resource: Resource, context: RequestContext };\n",
        )
        .unwrap();
        std::fs::write(&cfg_path, edit(toml)).unwrap();
        let child = Command::new(LAPSE)
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut b = Self {
            _tmp: tmp,
            dir,
            url: format!("http://{addr}"),
            admin,
            keys,
            child,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: lapse_identity::http_client(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = b.child.try_wait() {
                let mut err = String::new();
                b.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("lapse serve exited ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "lapse serve did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Nobody reads the server's log: do not let a full pipe stall it.
        let mut stderr = b.child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        b
    }

    /// An identity token from one of the test's CI issuers.
    fn identity(&self, issuer: &str, sub: &str, claims: Value) -> String {
        let (name, iss) = ISSUERS.iter().find(|(n, _)| *n == issuer).unwrap();
        let key = &self.keys.iter().find(|(n, _)| n == name).unwrap().1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut c = json!({ "iss": iss, "aud": "lapse", "sub": sub, "iat": now, "nbf": now, "exp": now + 600 });
        for (k, v) in claims.as_object().unwrap() {
            c[k] = v.clone();
        }
        key.sign_jwt("JWT", &c).unwrap()
    }

    fn dev_identity(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        lapse_server::dev::dev_token(&self.dir, CI, 600, &[], now as i64).unwrap()
    }

    /// `lapse run` with only what the test gives it in its environment.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(LAPSE);
        c.arg("run")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LAPSE_URL", &self.url)
            .current_dir(self.dir.parent().unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn send(&self, rb: reqwest::RequestBuilder) -> Value {
        self.rt.block_on(async {
            rb.bearer_auth(&self.admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    }

    fn get(&self, path: &str) -> Value {
        self.send(self.http.get(format!("{}{path}", self.url)))
    }

    fn post(&self, path: &str, body: Value) -> Value {
        self.send(self.http.post(format!("{}{path}", self.url)).json(&body))
    }

    fn introspect(&self, token: &str) -> Value {
        self.send(
            self.http
                .post(format!("{}/oauth/introspect", self.url))
                .form(&[("token", token)]),
        )
    }

    fn grant(&self, id: &str) -> Value {
        self.get(&format!("/v1/grants/{id}"))
    }

    fn audit_data(&self, id: &str, kind: &str) -> Value {
        let g = self.grant(id);
        let e = g["audit"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no `{kind}` in {g}"))
            .clone();
        serde_json::from_str(e["data"].as_str().unwrap()).unwrap()
    }
}

/// The first `n` lines a running child prints (it keeps running).
fn first_lines(child: &mut Child, n: usize) -> Vec<String> {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    (0..n)
        .map(|_| {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            l.trim().to_owned()
        })
        .collect()
}

/// `KEY=value` lines a child printed with `env`.
fn env_of(stdout: &[u8]) -> std::collections::BTreeMap<String, String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

const READ: &[&str] = &[
    "--audience",
    "orders-db",
    "--scope",
    "read",
    "--task",
    "T-run",
    "--purpose",
    "lapse run test",
];

#[test]
fn the_command_gets_a_usable_token_and_its_exit_completes_the_grant() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    for code in [0, 7] {
        let script =
            format!("echo \"$LAPSE_ACCESS_TOKEN\"; echo \"$LAPSE_GRANT_ID\"; read _; exit {code}");
        let mut child = b
            .run(READ, &[("LAPSE_IDENTITY_TOKEN", &identity)])
            .args(["--", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = first_lines(&mut child, 2);
        let (token, grant) = (lines[0].clone(), lines[1].clone());
        // While the command runs, its token is live at the broker.
        let i = b.introspect(&token);
        assert_eq!(i["active"], true, "{i}");
        assert_eq!(i["grant_id"], grant.as_str());
        assert_eq!(b.grant(&grant)["state"], "active");
        // The command ends: its exit code passes through, the grant is completed.
        child.stdin.take().unwrap().write_all(b"\n").unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code));
        assert_eq!(b.introspect(&token)["active"], false);
        let g = b.grant(&grant);
        assert_eq!(g["state"], "completed", "{g}");
        let done = b.audit_data(&grant, "grant.completed");
        assert_eq!(done["exit_status"], code, "{done}");
    }
}

#[test]
fn revocation_stops_the_command_within_the_grace_period() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    // A command that ignores SIGTERM: SIGKILL after the 1 s grace must end it, and
    // what it started (a background `sleep`, whose pid the test watches).
    let mut child = b
        .run(
            &[READ, &["--grace", "1s", "--poll", "1s"]].concat(),
            &[("LAPSE_IDENTITY_TOKEN", &identity)],
        )
        .args([
            "--",
            "sh",
            "-c",
            "trap '' TERM; sleep 300 >/dev/null 2>&1 & echo $!; echo \"$LAPSE_GRANT_ID\"; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = first_lines(&mut child, 2);
    let (pid, grant) = (lines[0].clone(), lines[1].clone());
    let t = Instant::now();
    let r = b.post(
        &format!("/v1/grants/{grant}/revoke"),
        json!({ "reason": "incident 42" }),
    );
    assert_eq!(r["state"], "revoked", "{r}");
    let status = child.wait().unwrap();
    let took = t.elapsed();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(EXIT_GRANT_ENDED), "{err}");
    assert!(err.contains("incident 42"), "says why: {err}");
    assert!(err.contains("SIGKILL"), "{err}");
    // poll (1 s) + grace (1 s) + slack for a loaded machine.
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Gone, or a zombie waiting for init to reap it (it runs no more).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let running = state
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'));
    assert!(
        !running,
        "the command's child {pid} is still running: {state}"
    );
}

#[test]
fn renewal_keeps_a_long_command_going_and_a_refused_one_stops_it() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let env = [("LAPSE_IDENTITY_TOKEN", identity.as_str())];
    // 6 s grants, a 9 s command: it only finishes because it renews.
    let o = b
        .run(
            &[READ, &["--ttl", "6s", "--renew", "--poll", "1s"]].concat(),
            &env,
        )
        .args(["--", "sh", "-c", "echo $LAPSE_GRANT_ID; sleep 9"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let grant = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let g = b.grant(&grant);
    assert!(g["renewals"].as_u64().unwrap() >= 1, "{g}");
    assert_eq!(g["state"], "completed");

    // Without --renew the same command loses its grant at expiry and is stopped.
    let o = b
        .run(
            &[READ, &["--ttl", "6s", "--poll", "1s", "--grace", "1s"]].concat(),
            &env,
        )
        .args(["--", "sh", "-c", "echo $LAPSE_GRANT_ID; sleep 9"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(EXIT_GRANT_ENDED), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("expired"),
        "{}",
        show(&o)
    );

    // Renewal is a fresh decision: once policy forbids it, the command is stopped.
    let mut child = b
        .run(
            &[
                READ,
                &["--ttl", "8s", "--renew", "--poll", "1s", "--grace", "1s"],
            ]
            .concat(),
            &env,
        )
        .args(["--", "sh", "-c", "echo $LAPSE_GRANT_ID; sleep 20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_lines(&mut child, 1).remove(0);
    std::fs::write(
        b.dir.join("policies").join("zz-closed.cedar"),
        "@id(\"orders-db-closed\")\nforbid (principal, action, resource == Resource::\"orders-db\");\n",
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(EXIT_GRANT_ENDED), "{err}");
    assert!(err.contains("renewal refused"), "{err}");
    assert_eq!(b.grant(&line)["state"], "revoked");
}

#[test]
fn each_identity_source_gets_its_own_workload() {
    let b = Broker::start("");
    let migrate = [
        "--audience",
        "orders-db",
        "--scope",
        "migrate",
        "--task",
        "T-migrate",
        "--purpose",
        "schema migration",
    ];
    let print = ["--", "sh", "-c", "env; echo LAPSE_CMDLINE=$0"];

    // Kubernetes: a projected service-account token in a file.
    let k8s = b.identity(
        "kubernetes",
        "system:serviceaccount:payments:migrator",
        json!({ "kubernetes.io": { "namespace": "payments", "serviceaccount": { "name": "migrator", "uid": "u1" }, "pod": { "name": "migrate-1", "uid": "p1" } } }),
    );
    let file = b.dir.join("k8s-token");
    std::fs::write(&file, &k8s).unwrap();
    let o = b
        .run(&migrate, &[])
        .args(["--identity-file", file.to_str().unwrap()])
        .args(print)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let env = env_of(&o.stdout);
    let g = b.grant(&env["LAPSE_GRANT_ID"]);
    assert_eq!(g["workload"], "k8s://prod-eu/payments/migrator", "{g}");
    assert_eq!(g["policies"], json!(["k8s-payments-migrator"]));

    // A rotated file is read afresh: another service account, refused migration.
    let api = b.identity(
        "kubernetes",
        "system:serviceaccount:payments:api",
        json!({ "kubernetes.io": { "namespace": "payments", "serviceaccount": { "name": "api" }, "pod": { "name": "api-1" } } }),
    );
    std::fs::write(&file, &api).unwrap();
    let o = b
        .run(&migrate, &[("LAPSE_IDENTITY_FILE", file.to_str().unwrap())])
        .args(print)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "denied: {}", show(&o));

    // GitHub Actions: the runner's token service, played by a local stand-in.
    let gh = b.identity(
        "github-actions",
        "repo:acme/orders:environment:production",
        json!({ "repository": "acme/orders", "ref": "refs/heads/main", "environment": "production", "event_name": "push",
                "job_workflow_ref": "acme/platform/.github/workflows/deploy.yml@refs/heads/main" }),
    );
    let (stand_in, seen) = github_stand_in(gh, "request-secret");
    let o = b
        .run(
            &migrate,
            &[
                (
                    "ACTIONS_ID_TOKEN_REQUEST_URL",
                    &format!("{stand_in}?api-version=2.0"),
                ),
                ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-secret"),
            ],
        )
        .args(print)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let env = env_of(&o.stdout);
    let g = b.grant(&env["LAPSE_GRANT_ID"]);
    assert_eq!(g["workload"], "https://github.com/acme/orders", "{g}");
    assert_eq!(g["policies"], json!(["github-migrate-orders-from-main"]));
    let req = seen.recv_timeout(Duration::from_secs(1)).unwrap();
    assert!(req.contains("audience=lapse"), "{req}");
    assert!(req.contains("api-version=2.0"), "{req}");
    assert!(
        !env.contains_key("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
        "not inherited"
    );

    // GitLab CI: the job's id_tokens variable.
    let gl = b.identity(
        "gitlab-ci",
        "project_path:acme/orders:ref_type:branch:ref:main",
        json!({ "project_path": "acme/orders", "ref": "main", "ref_protected": "true", "environment": "production", "pipeline_source": "push" }),
    );
    let o = b
        .run(&migrate, &[("GITLAB_CI", "true"), ("LAPSE_ID_TOKEN", &gl)])
        .args(print)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let env = env_of(&o.stdout);
    let g = b.grant(&env["LAPSE_GRANT_ID"]);
    assert_eq!(g["workload"], "https://gitlab.com/acme/orders", "{g}");
    assert!(!env.contains_key("LAPSE_ID_TOKEN"), "not inherited");

    // An environment variable, and the dev issuer.
    let o = b
        .run(READ, &[("LAPSE_IDENTITY_TOKEN", &b.dev_identity())])
        .args(print)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let env = env_of(&o.stdout);
    assert_eq!(b.grant(&env["LAPSE_GRANT_ID"])["workload"], CI);
    assert!(!env.contains_key("LAPSE_IDENTITY_TOKEN"), "not inherited");
    assert_eq!(env["LAPSE_TOKEN_TYPE"], "DPoP");

    // Nothing at all: a usage error naming what was tried, and no grant.
    let o = b.run(READ, &[]).args(print).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no identity token found"));
}

/// A stand-in for GitHub Actions' token service: answers `{"value": token}` to a
/// request bearing `secret`, and reports each request line.
fn github_stand_in(
    token: String,
    secret: &'static str,
) -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
                head.push(l.trim_end().to_owned());
            }
            let authorized = head
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&format!("authorization: bearer {secret}")));
            let (status, body) = if authorized {
                ("200 OK", json!({ "value": token }).to_string())
            } else {
                ("401 Unauthorized", "{}".to_owned())
            };
            let _ = tx.send(head.first().cloned().unwrap_or_default());
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, rx)
}

#[test]
fn credentials_never_appear_on_a_command_line_or_on_disk() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let mut child = b
        .run(READ, &[("LAPSE_IDENTITY_TOKEN", &identity)])
        .args([
            "--",
            "sh",
            "-c",
            "echo \"$LAPSE_ACCESS_TOKEN\"; echo $$; read _",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = first_lines(&mut child, 2);
    let token = lines[0].clone();
    assert!(token.len() > 100);
    let ps = Command::new("ps")
        .args(["-eww", "-o", "args"])
        .output()
        .unwrap();
    assert!(ps.status.success());
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.contains("lapse run"), "ps shows the processes: {ps}");
    assert!(!ps.contains(&token), "the token is on a command line");
    assert!(
        !ps.contains(&identity),
        "the identity token is on a command line"
    );
    // Not in any file the broker or `lapse run` wrote (the store keeps its jti only).
    let root = b.dir.parent().unwrap().to_owned();
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(child.wait().unwrap().success());
    for f in walk(&root) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "the access token is in {}",
            f.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_postgres_grant_is_usable_by_psql_and_gone_after_the_command() {
    let pg = std::env::var("LAPSE_TEST_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into());
    let psql = |db: &str, sql: &str| -> Output {
        Command::new("psql")
            .arg(format!("{} dbname={db}", pg.replace("dbname=postgres", "")))
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .env_remove("PGPASSWORD")
            .output()
            .unwrap_or_else(|e| panic!("psql is needed for this test: {e}"))
    };
    let sfx = format!("{:08x}", rand::random::<u32>());
    let db = format!("lapse_run_{sfx}");
    let prefix = format!("lr{sfx}");
    let o = psql("postgres", &format!("CREATE DATABASE {db}"));
    assert!(
        o.status.success(),
        "PostgreSQL is needed (LAPSE_TEST_PG_URL): {}",
        show(&o)
    );
    let o = psql(
        &db,
        "CREATE SCHEMA orders; CREATE TABLE orders.items (id int); INSERT INTO orders.items VALUES (1), (2);",
    );
    assert!(o.status.success(), "{}", show(&o));
    let url_file = std::env::temp_dir().join(format!("lapse-run-{sfx}.url"));
    std::fs::write(
        &url_file,
        format!("{} dbname={db}", pg.replace("dbname=postgres", "")),
    )
    .unwrap();
    let b = Broker::start(&format!(
        r#"
[[postgres]]
audience = "orders-db"
admin_url = "file:{}"
role_prefix = "{prefix}"
scram_iterations = 64

[[postgres.grant]]
action = "read"
schema = "orders"
privileges = ["SELECT"]
"#,
        url_file.display()
    ));
    let identity = b.dev_identity();
    // psql reads PGHOST/PGPORT/PGDATABASE/PGUSER/PGPASSWORD from its environment.
    let o = b
        .run(READ, &[("LAPSE_IDENTITY_TOKEN", &identity)])
        .args([
            "--",
            "psql",
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            "SELECT current_user || ' ' || count(*) FROM orders.items",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let line = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let (user, n) = line.split_once(' ').unwrap();
    assert!(user.starts_with(&prefix), "{line}");
    assert_eq!(n, "2");
    // Writing is refused: psql's own exit code (1 for a failed statement) passes through.
    let o = b
        .run(READ, &[("LAPSE_IDENTITY_TOKEN", &identity)])
        .args([
            "--",
            "psql",
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            "INSERT INTO orders.items VALUES (3)",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission denied"));
    // The command is over: its role is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_roles WHERE rolname LIKE '{prefix}\\_gr\\_%'"),
        );
        if String::from_utf8_lossy(&o.stdout).trim() == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "roles left: {}", show(&o));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(b);
    let _ = std::fs::remove_file(&url_file);
    let _ = psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );
    let _ = psql(
        "postgres",
        &format!("DROP ROLE IF EXISTS {prefix}_orders_db_read"),
    );
}

/// The MariaDB client takes host, port and password from `lapse run`'s
/// environment by itself, the user and database from `MYSQL_USER` and
/// `MYSQL_DATABASE`; the account is gone once the command is over.
#[test]
fn a_mysql_grant_is_usable_by_the_mariadb_client_and_gone_after_the_command() {
    let root = std::env::var("LAPSE_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let url = url::Url::parse(&root).unwrap();
    let as_root = |sql: &str| -> Output {
        Command::new("mariadb")
            .args(["-h", url.host_str().unwrap_or("127.0.0.1")])
            .args(["-P", &url.port().unwrap_or(3306).to_string()])
            .args(["-u", url.username(), "-N", "-B", "-e", sql])
            .env("MYSQL_PWD", url.password().unwrap_or(""))
            .output()
            .unwrap_or_else(|e| panic!("the mariadb client is needed for this test: {e}"))
    };
    let sfx = format!("{:08x}", rand::random::<u32>());
    let (db, marker, prefix) = (
        format!("lapse_run_{sfx}"),
        format!("lapse_runm_{sfx}"),
        format!("lr{sfx}"),
    );
    let o = as_root(&format!(
        "CREATE DATABASE {db}; CREATE TABLE {db}.items (id INT); INSERT INTO {db}.items VALUES (1), (2);"
    ));
    assert!(
        o.status.success(),
        "MariaDB is needed (LAPSE_TEST_MYSQL_URL): {}",
        show(&o)
    );
    let mut admin = url.clone();
    admin.set_path(&format!("/{db}"));
    let url_file = std::env::temp_dir().join(format!("lapse-run-{sfx}.myurl"));
    std::fs::write(&url_file, admin.as_str()).unwrap();
    let b = Broker::start(&format!(
        r#"
[[mysql]]
audience = "orders-db"
admin_url = "file:{}"
user_prefix = "{prefix}"
marker_database = "{marker}"

[[mysql.grant]]
action = "read"
database = "{db}"
table = "items"
privileges = ["SELECT"]
"#,
        url_file.display()
    ));
    let identity = b.dev_identity();
    let client = |sql: &str| {
        b.run(READ, &[("LAPSE_IDENTITY_TOKEN", &identity)])
            .args([
                "--",
                "sh",
                "-c",
                &format!("exec mariadb -u \"$MYSQL_USER\" -N -B -e \"{sql}\" \"$MYSQL_DATABASE\""),
            ])
            .output()
            .unwrap()
    };
    let o = client("SELECT CURRENT_USER(), COUNT(*) FROM items");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let line = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let (user, n) = line.split_once('\t').unwrap();
    assert!(user.starts_with(&format!("{prefix}_")), "{line}");
    assert_eq!(n, "2");
    let o = client("INSERT INTO items VALUES (3)");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("command denied"),
        "{}",
        show(&o)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = as_root(&format!(
            "SELECT COUNT(*) FROM mysql.global_priv WHERE User LIKE '{prefix}\\_%'"
        ));
        if String::from_utf8_lossy(&o.stdout).trim() == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "accounts left: {}", show(&o));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(b);
    let _ = std::fs::remove_file(&url_file);
    let _ = as_root(&format!(
        "DROP DATABASE IF EXISTS {db}; DROP DATABASE IF EXISTS {marker}"
    ));
}

#[test]
fn the_ci_example_policies_pass_their_own_tests() {
    for (name, _) in ISSUERS {
        let dir = Path::new(EXAMPLES).join("identity").join(name);
        let o = Command::new(LAPSE)
            .args(["policy", "test"])
            .arg(dir.join("policy-tests.toml"))
            .arg("--policies")
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{name}: {}", show(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains(" 0 failed"));
    }
}

#[test]
fn signals_pass_through_to_the_command() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let start = |script: &str| {
        let mut child = b
            .run(READ, &[("LAPSE_IDENTITY_TOKEN", &identity)])
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let grant = first_lines(&mut child, 1).remove(0);
        (child, grant)
    };
    let signal = |child: &Child, sig: &str| {
        let s = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(s.success());
    };
    // A signal the command handles: its exit code comes back.
    let (mut child, grant) =
        start("trap 'exit 42' USR1; echo \"$LAPSE_GRANT_ID\"; while :; do sleep 0.1; done");
    signal(&child, "USR1");
    assert_eq!(child.wait().unwrap().code(), Some(42));
    assert_eq!(b.audit_data(&grant, "grant.completed")["exit_status"], 42);

    // SIGTERM (a cancelled CI job) ends a command that does not handle it: 128+15,
    // and the completion records the signal.
    let (mut child, grant) = start("echo \"$LAPSE_GRANT_ID\"; exec sleep 30");
    signal(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(143));
    let done = b.audit_data(&grant, "grant.completed");
    assert_eq!(done["signal"], 15, "{done}");
}

#[test]
fn refused_or_pending_requests_run_nothing() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let marker = b.dir.join("ran");
    let touch = ["--", "touch", marker.to_str().unwrap()];
    let args = |scope: &'static str| {
        [
            "--audience",
            "orders-db",
            "--scope",
            scope,
            "--task",
            "T-x",
            "--purpose",
            "refused",
        ]
    };
    // Approval required: says by whom, exits 4, runs nothing.
    let o = b
        .run(&args("admin"), &[("LAPSE_IDENTITY_TOKEN", &identity)])
        .args(touch)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("2 approval(s)") && err.contains("`dba`"),
        "{err}"
    );
    // Denied: exit 3 naming why.
    let o = b
        .run(&args("write"), &[("LAPSE_IDENTITY_TOKEN", &identity)])
        .args(touch)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("access_denied"));
    assert!(!marker.exists(), "the command must not have run");
    // A command that does not exist: 127, and its grant is completed, not left open.
    let o = b
        .run(&args("read"), &[("LAPSE_IDENTITY_TOKEN", &identity)])
        .args(["--", "/nonexistent/command"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(127), "{}", show(&o));
    let active = b.get("/v1/grants?state=active");
    assert_eq!(active["grants"], json!([]), "{active}");
}

#[test]
fn a_command_waits_for_two_approvers_then_runs() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let admin_scope = [
        "--audience",
        "orders-db",
        "--scope",
        "admin",
        "--task",
        "T-admin",
        "--purpose",
        "rebuild an index",
    ];
    // Nobody decides: the wait runs out with a clear message, nothing runs.
    let o = b
        .run(
            &[&admin_scope[..], &["--wait", "2s"]].concat(),
            &[("LAPSE_IDENTITY_TOKEN", &identity)],
        )
        .args(["--", "sh", "-c", "echo ran"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("waiting for 2 approval(s) from `dba`"),
        "{err}"
    );
    assert!(err.contains("no decision within 2s"), "{err}");
    assert!(o.stdout.is_empty());
    let abandoned = err
        .split("request ")
        .nth(1)
        .and_then(|r| r.get(..35))
        .unwrap()
        .to_owned();

    // Two approvers decide while it waits: the command runs with the token.
    let child = b
        .run(
            &[&admin_scope[..], &["--wait", "60s"]].concat(),
            &[("LAPSE_IDENTITY_TOKEN", &identity)],
        )
        .args(["--", "sh", "-c", "echo \"granted $LAPSE_GRANT_ID\""])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let approver = std::fs::read_to_string(b.dir.join(lapse_server::dev::APPROVER_TOKEN_FILE))
        .unwrap()
        .trim()
        .to_owned();
    let lapse = |args: &[&str], token: &str| {
        Command::new(LAPSE)
            .args(args)
            .env("LAPSE_URL", &b.url)
            .env("LAPSE_TOKEN", token)
            .output()
            .unwrap()
    };
    // The request shows up in `lapse approvals list` (as the approver sees it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let o = lapse(&["approvals", "list", "--json"], &approver);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let found = v["requests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["task"]["id"] == "T-admin" && r["id"] != abandoned.as_str())
            .map(|r| r["id"].as_str().unwrap().to_owned());
        if let Some(id) = found {
            break id;
        }
        assert!(Instant::now() < deadline, "the request never showed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = lapse(&["approvals", "show", &id], &approver);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ci-admin-orders-needs-approval"));
    let o = lapse(
        &["approvals", "approve", &id, "--reason", "CHG-9"],
        &approver,
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = lapse(&["approvals", "deny", &id, "--reason", ""], &b.admin);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a denial needs a reason: {}",
        show(&o)
    );
    let o = lapse(&["approvals", "approve", &id, "--ttl", "5m"], &b.admin);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("is active"));

    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("granted {id}")
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("approved after"));
    let g = b.grant(&id);
    assert_eq!(g["state"], "completed", "{g}");
}

#[test]
fn renewal_stops_at_the_maximum_lifetime_and_the_command_keeps_access_until_then() {
    let b = Broker::start_edit(|t| t.replace("max_lifetime = \"1h\"", "max_lifetime = \"8s\""));
    let identity = b.dev_identity();
    let t = Instant::now();
    let o = b
        .run(
            &[
                READ,
                &["--ttl", "6s", "--renew", "--poll", "1s", "--grace", "1s"],
            ]
            .concat(),
            &[("LAPSE_IDENTITY_TOKEN", &identity)],
        )
        .args(["--", "sleep", "30"])
        .output()
        .unwrap();
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(EXIT_GRANT_ENDED), "{}", show(&o));
    assert!(err.contains("renewed"), "{err}");
    assert!(err.contains("maximum lifetime"), "{err}");
    assert!(
        err.contains("expired"),
        "ended by expiry, not by the refused renewal: {err}"
    );
    // Access lasted the whole 8 s lifetime, not less, and ended soon after.
    assert!(took >= Duration::from_secs(7), "{took:?}");
    assert!(took < Duration::from_secs(14), "{took:?}");
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_default()
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// Sends `sig` to `pid` with kill(1).
fn send_signal(pid: u32, sig: &str) {
    let s = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success(), "kill -{sig} {pid}");
}

/// Reads one line of a running child's output, failing after `within`.
fn line_within(rx: &std::sync::mpsc::Receiver<String>, within: Duration) -> Option<String> {
    rx.recv_timeout(within).ok()
}

/// Every stdout line of `child`, as it comes, on a channel.
fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines() {
            let Ok(l) = l else { break };
            if tx.send(l.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn a_frozen_broker_delays_neither_forwarded_signals_nor_the_stop_at_expiry() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let env = [("LAPSE_IDENTITY_TOKEN", identity.as_str())];

    // The broker stops answering (SIGSTOP: connections are accepted by the kernel,
    // nothing replies) while `lapse run` polls it; SIGTERM still reaches the
    // command at once.
    let mut child = b
        .run(&[READ, &["--poll", "1s", "--grace", "1s"]].concat(), &env)
        .args([
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo \"$LAPSE_GRANT_ID\"; while :; do sleep 0.1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut child);
    line_within(&lines, Duration::from_secs(10)).expect("the command started");
    send_signal(b.child.id(), "STOP");
    // A status call is now in flight and unanswered.
    std::thread::sleep(Duration::from_millis(2500));
    let t = Instant::now();
    send_signal(child.id(), "TERM");
    let got = line_within(&lines, Duration::from_secs(15));
    let took = t.elapsed();
    assert_eq!(got.as_deref(), Some("got-term"));
    assert!(took < Duration::from_millis(1500), "SIGTERM took {took:?}");
    // Completing the grant cannot reach the broker; the command's code still
    // comes back once that gives up.
    assert_eq!(child.wait().unwrap().code(), Some(42));
    send_signal(b.child.id(), "CONT");

    // Frozen again: the grant's expiry (6 s) stops the command on time by the local
    // clock, however long the status call hangs.
    let mut child = b
        .run(
            &[READ, &["--ttl", "6s", "--poll", "1s", "--grace", "1s"]].concat(),
            &env,
        )
        .args(["--", "sh", "-c", "echo $$; exec sleep 60"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut child);
    let pid = line_within(&lines, Duration::from_secs(10)).expect("the command started");
    let issued = Instant::now();
    send_signal(b.child.id(), "STOP");
    while running(&pid) && issued.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped = issued.elapsed();
    send_signal(b.child.id(), "CONT");
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(EXIT_GRANT_ENDED), "{err}");
    assert!(err.contains("expired"), "{err}");
    assert!(
        stopped < Duration::from_millis(7500),
        "stopped {stopped:?} after the grant was issued (ttl 6s): {err}"
    );
}

#[test]
fn millisecond_poll_and_grace_stop_a_revoked_command_within_a_second() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let env = [("LAPSE_IDENTITY_TOKEN", identity.as_str())];
    // Zero, and what is not a duration, are usage errors; nothing runs.
    for bad in [
        ["--poll", "0"],
        ["--poll", "0ms"],
        ["--grace", "0s"],
        ["--poll", "1.5s"],
    ] {
        let o = b
            .run(&[READ, &bad].concat(), &env)
            .args(["--", "sh", "-c", "echo ran"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", show(&o));
        assert!(o.stdout.is_empty(), "{bad:?}: {}", show(&o));
    }
    // A command that ignores SIGTERM: a 250 ms poll and a 250 ms grace end it well
    // within a second of the revocation.
    let mut child = b
        .run(
            &[READ, &["--poll", "250ms", "--grace", "250ms"]].concat(),
            &env,
        )
        .args([
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo \"$LAPSE_GRANT_ID\"; while :; do sleep 0.05; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let grant = first_lines(&mut child, 1).remove(0);
    let t = Instant::now();
    let r = b.post(
        &format!("/v1/grants/{grant}/revoke"),
        json!({ "reason": "fast stop" }),
    );
    assert_eq!(r["state"], "revoked", "{r}");
    let status = child.wait().unwrap();
    let took = t.elapsed();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(EXIT_GRANT_ENDED), "{err}");
    assert!(err.contains("within 250ms of SIGTERM"), "{err}");
    // poll (250 ms) + grace (250 ms) + slack for a loaded machine; whole seconds
    // could not go below 2 s.
    assert!(took < Duration::from_millis(1500), "{took:?}: {err}");
}

#[test]
fn what_the_command_leaves_running_ends_with_it() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let env = [("LAPSE_IDENTITY_TOKEN", identity.as_str())];
    // Without a terminal: a background `sleep` that handles SIGTERM, and one that
    // ignores it (SIGKILL after the grace). The command's own code comes back.
    let t = Instant::now();
    let o = b
        .run(&[READ, &["--grace", "1s"]].concat(), &env)
        .args([
            "--",
            "sh",
            "-c",
            "sleep 300 >/dev/null 2>&1 & echo $!; \
             (trap '' TERM; exec sleep 300) >/dev/null 2>&1 & echo $!; exit 5",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(5), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let pids: Vec<&str> = out.lines().collect();
    assert_eq!(pids.len(), 2, "{}", show(&o));
    for pid in &pids {
        assert!(!running(pid), "{pid} outlived the command: {}", show(&o));
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("left 2 process(es)"), "{err}");
    assert!(err.contains("SIGKILL"), "{err}");
    assert!(took < Duration::from_secs(8), "{took:?}");

    // On a terminal (script(1) gives it one), where the command shares `lapse run`'s
    // process group: what it leaves is found all the same, and a process that left
    // the group with setsid too. (`nohup`: the terminal's hangup must not do it.)
    let cmdline = format!(
        "{LAPSE} run {} -- sh -c 'nohup sleep 300 >/dev/null 2>&1 & echo bg=$!; setsid sleep 300 >/dev/null 2>&1 & echo bg=$!; sleep 0.2'",
        READ.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let o = Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LAPSE_URL", &b.url)
        .env("LAPSE_IDENTITY_TOKEN", &identity)
        .current_dir(b.dir.parent().unwrap())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("script(1) is needed for this test: {e}"));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let pids: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("bg="))
        .collect();
    assert_eq!(pids.len(), 2, "{}", show(&o));
    for pid in &pids {
        assert!(!running(pid), "{pid} outlived the command: {}", show(&o));
    }
}

#[test]
fn the_command_cannot_get_a_grant_of_its_own_from_the_identity_file() {
    let b = Broker::start("");
    let file = b.dir.join("projected-token");
    std::fs::write(&file, b.dev_identity()).unwrap();
    // The command sees no LAPSE_IDENTITY_FILE, and a `lapse run` inside it finds no
    // identity (exit 2) instead of obtaining a second, independent grant.
    let nested = format!(
        "env | grep '^LAPSE_IDENTITY' ; {LAPSE} run {} -- true; echo nested=$?",
        READ.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let o = b
        .run(READ, &[("LAPSE_IDENTITY_FILE", file.to_str().unwrap())])
        .args(["--", "sh", "-c", &nested])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("LAPSE_IDENTITY_FILE"), "{}", show(&o));
    assert!(out.contains("nested=2"), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no identity token found"),
        "{}",
        show(&o)
    );
    let active = b.get("/v1/grants?state=active");
    assert_eq!(active["grants"], json!([]), "{active}");
}

#[test]
fn exit_code_base_and_status_file_tell_lapse_from_the_command() {
    let b = Broker::start("");
    let identity = b.dev_identity();
    let env = [("LAPSE_IDENTITY_TOKEN", identity.as_str())];
    let status_path = b.dir.join("status.json");
    let status_file = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(&status_path).unwrap()).unwrap()
    };
    let access = |scope: &'static str| {
        vec![
            "--audience",
            "orders-db",
            "--scope",
            scope,
            "--task",
            "T-codes",
            "--purpose",
            "exit codes",
            "--exit-code-base",
            "100",
            "--status-file",
            status_path.to_str().unwrap(),
        ]
    };
    // Denied: 100+3, before the command.
    let o = b
        .run(&access("write"), &env)
        .args(["--", "sh", "-c", "echo ran"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(103), "{}", show(&o));
    let s = status_file();
    assert_eq!(s["phase"], "before-command", "{s}");
    assert_eq!(s["exit"], 103, "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("access_denied"),
        "{s}"
    );
    // Approval needed: 100+4.
    let o = b
        .run(&access("admin"), &env)
        .args(["--", "sh", "-c", "echo ran"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(104), "{}", show(&o));
    assert_eq!(status_file()["exit"], 104);
    // The command's own 3 stays 3, and is recorded as the command's.
    let o = b
        .run(&access("read"), &env)
        .args(["--", "sh", "-c", "exit 3"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(
        status_file(),
        json!({ "phase": "command", "exit": 3, "error": null })
    );
    // A command that cannot be found: 100+127.
    let o = b
        .run(&access("read"), &env)
        .args(["--", "/nonexistent/command"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(227), "{}", show(&o));
    assert_eq!(status_file()["phase"], "before-command");
    // The grant ends first: 100+111, during the command.
    let mut child = b
        .run(&[&access("read")[..], &["--poll", "250ms"]].concat(), &env)
        .args(["--", "sh", "-c", "echo \"$LAPSE_GRANT_ID\"; exec sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let grant = first_lines(&mut child, 1).remove(0);
    let s = status_file();
    assert_eq!(
        s,
        json!({ "phase": "command", "exit": null, "error": null }),
        "while the command runs"
    );
    b.post(
        &format!("/v1/grants/{grant}/revoke"),
        json!({ "reason": "incident 7" }),
    );
    assert_eq!(child.wait().unwrap().code(), Some(211));
    let s = status_file();
    assert_eq!(s["phase"], "command", "{s}");
    assert_eq!(s["exit"], 211, "{s}");
    assert!(s["error"].as_str().unwrap().contains("incident 7"), "{s}");
    // A base that would push codes past 255 is refused.
    let o = b
        .run(&["--exit-code-base", "200"], &env)
        .args(READ)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}
