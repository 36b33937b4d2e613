#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! `lapse mcp-proxy` with the real Python MCP SDK (PyPI `mcp`) on both sides: a
//! real MCP server with several tools behind the proxy, a real MCP client (an
//! agent, `tests/../lapse-mcp/tests/py/agent.py`) calling through it, over stdio and
//! over streamable HTTP, against a real broker. The agent's script prints one line
//! per step; this test holds each to what the proxy must do, then reads the
//! broker's audit log: exactly one `tool.called` record per attempted call.

use lapse_broker::config::{OperatorEntry, Role};
use lapse_testkit::process::{Running, free_port};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");
const AGENT: &str = "spiffe://dev.lapse.local/agent/research";
const MCP_VERSION: &str = "2.3.0";
const PROXY_TOKEN: &str = "lapse_op_test_mcp_proxy";
const PARENT_TOOLS: &str = r#"[
  {"name":"read_file","args":{"path":{"prefix":"/data/"}}},
  {"name":"query","args":{"table":{"one_of":["orders","items"]},"limit":{"maximum":100}}},
  {"name":"transfer","args":{"amount":{"maximum":5000}}},
  {"name":"whoami"}
]"#;
const CHILD_TOOLS: &str = r#"[{"name":"read_file","args":{"path":{"prefix":"/data/reports/"}}}]"#;

fn py_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lapse-mcp/tests/py")
}

/// A Python with the MCP SDK: `$LAPSE_MCP_PYTHON`, or a virtualenv under
/// `target/` made on first use (`pip install mcp==2.3.0`). Fails loudly when
/// neither can be had.
fn python() -> PathBuf {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        if let Ok(p) = std::env::var("LAPSE_MCP_PYTHON")
            && !p.is_empty()
        {
            return PathBuf::from(p);
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../target/mcp-venv-{MCP_VERSION}"));
        let py = venv.join("bin/python");
        let ready = |py: &Path| {
            Command::new(py)
                .args(["-c", "import mcp, jwt, cryptography, httpx2"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ready(&py) {
            let made = Command::new("python3")
                .arg("-m")
                .arg("venv")
                .arg(&venv)
                .status();
            assert!(
                made.is_ok_and(|s| s.success()),
                "cannot make a virtualenv at {}: python3 -m venv failed",
                venv.display()
            );
            let pip = Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    &format!("mcp=={MCP_VERSION}"),
                    "pyjwt",
                    "cryptography",
                ])
                .status();
            assert!(
                pip.is_ok_and(|s| s.success()),
                "pip install mcp=={MCP_VERSION} failed (PyPI needed once; or set LAPSE_MCP_PYTHON)"
            );
            assert!(
                ready(&py),
                "the MCP SDK is not importable from {}",
                py.display()
            );
        }
        py
    })
    .clone()
}

struct Broker {
    url: String,
    dir: PathBuf,
    /// The store's SQLite file.
    db: PathBuf,
    admin: String,
    http: reqwest::Client,
    /// Stops the broker gracefully (its feed streams end).
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    _tmp: tempfile::TempDir,
}

impl Broker {
    fn stop(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}

async fn broker() -> Broker {
    broker_with(|_| {}).await
}

/// [`broker`], with `adjust` changing its config last.
async fn broker_with(adjust: impl FnOnce(&mut lapse_broker::config::Config)) -> Broker {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tmp.path().join("data");
    let (mut cfg, _, admin) = lapse_server::dev::prepare(&dir, addr).unwrap();
    cfg.operators.push(OperatorEntry {
        name: "mcp-proxy".into(),
        token_sha256: Some(hex::encode(lapse_broker::broker::hash_secret(PROXY_TOKEN))),
        roles: vec![Role::Gate, Role::Signal],
        groups: vec![],
        audiences: vec!["mcp-tools".into()],
        password_argon2: None,
    });
    adjust(&mut cfg);
    let db = PathBuf::from(cfg.store.strip_prefix("sqlite://").unwrap());
    let lapse = lapse_server::build(cfg, Arc::new(lapse_core::SystemClock))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = lapse_server::serve(lapse, listener, async {
            let _ = stopped.await;
        })
        .await;
    });
    Broker {
        url: format!("http://{addr}"),
        dir: dir.canonicalize().unwrap(),
        db,
        admin,
        http: lapse_identity::http_client(),
        stop: std::sync::Mutex::new(Some(stop)),
        _tmp: tmp,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Broker {
    async fn exchange(&self, key: &DpopKey, form: &[(&str, &str)]) -> Value {
        let url = format!("{}/oauth/token", self.url);
        let r = self
            .http
            .post(&url)
            .header("DPoP", key.proof("POST", &url, None, now()))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{v}");
        v
    }

    /// The agent's token for `mcp-tools` declaring the parent's tools, and a
    /// sub-agent's narrower one bound to `child`.
    async fn tokens(&self, parent: &DpopKey, child: &DpopKey) -> (Value, Value) {
        let identity = lapse_server::dev::dev_token(&self.dir, AGENT, 3600, &[], now()).unwrap();
        let p = self
            .exchange(
                parent,
                &[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", &identity),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("resource", "mcp-tools"),
                    ("scope", "call"),
                    ("task", "research-42"),
                    ("purpose", "summarise the quarter"),
                    ("tools", PARENT_TOOLS),
                ],
            )
            .await;
        let c = self
            .exchange(
                parent,
                &[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", p["access_token"].as_str().unwrap()),
                    (
                        "subject_token_type",
                        "urn:ietf:params:oauth:token-type:access_token",
                    ),
                    ("tools", CHILD_TOOLS),
                    ("dpop_jkt", child.jkt()),
                ],
            )
            .await;
        // Widening is refused: a tool the parent never declared, a looser bound.
        for wider in [
            r#"[{"name":"delete_all"}]"#,
            r#"[{"name":"transfer","args":{"amount":{"maximum":99999}}}]"#,
        ] {
            let url = format!("{}/oauth/token", self.url);
            let r = self
                .http
                .post(&url)
                .header("DPoP", parent.proof("POST", &url, None, now()))
                .form(&[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", p["access_token"].as_str().unwrap()),
                    (
                        "subject_token_type",
                        "urn:ietf:params:oauth:token-type:access_token",
                    ),
                    ("tools", wider),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{wider}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"], "invalid_scope", "{v}");
        }
        (p, c)
    }

    /// The grant as the broker shows it, with its own audit entries.
    async fn grant(&self, id: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/grants/{id}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    async fn audit_for(&self, grant: &str) -> Vec<Value> {
        self.grant(grant).await["audit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                // `data` is the JSON text exactly as hashed.
                let mut e = e.clone();
                e["data"] = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
                e
            })
            .collect()
    }
}

fn proxy_config(dir: &Path, broker: &str, upstream: &str, http: Option<(u16, u16)>) -> PathBuf {
    let py = python();
    let server = py_dir().join("tools_server.py");
    let mut cfg = format!(
        "broker = \"{broker}\"\naudience = \"mcp-tools\"\ntoken = \"env:LAPSE_PROXY_TOKEN\"\nstaleness = \"5s\"\n"
    );
    if let Some((port, _)) = http {
        cfg.push_str(&format!(
            "\n[http]\nlisten = \"127.0.0.1:{port}\"\nurl = \"http://127.0.0.1:{port}/mcp\"\n"
        ));
    }
    match (upstream, http) {
        ("stdio", _) => cfg.push_str(&format!(
            "\n[[upstream]]\nname = \"tools\"\ncommand = [{:?}, {:?}, \"stdio\"]\n",
            py.to_str().unwrap(),
            server.to_str().unwrap()
        )),
        (_, Some((_, up))) => cfg.push_str(&format!(
            "\n[[upstream]]\nname = \"tools\"\nurl = \"http://127.0.0.1:{up}/mcp\"\ncredential = \"env:UPSTREAM_CREDENTIAL\"\n"
        )),
        _ => unreachable!(),
    }
    let path = dir.join("mcp-proxy.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Runs the agent script; answers its steps by name.
fn agent(mode: &str, env: Vec<(String, String)>) -> std::collections::BTreeMap<String, Value> {
    let out = Command::new(python())
        .arg(py_dir().join("agent.py"))
        .arg(mode)
        .envs(env)
        .env("LAPSE_BIN", LAPSE)
        .env("LAPSE_PROXY_TOKEN", PROXY_TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "agent.py {mode} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .map(|v| (v["step"].as_str().unwrap().to_owned(), v))
        .collect()
}

/// Every step's outcome as the task's declaration, Cedar and the grant's state
/// require; `whoami` shows what reached the upstream.
fn check_steps(steps: &std::collections::BTreeMap<String, Value>) -> Value {
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("no step `{name}`: {steps:?}"))
    };
    let allowed = |name: &str| {
        let s = step(name);
        assert_eq!(s["ok"], true, "`{name}` should pass: {s}");
        s["text"].clone()
    };
    let refused = |name: &str, code: i64, says: &str| {
        let s = step(name);
        assert_eq!(s["ok"], false, "`{name}` should be refused: {s}");
        assert_eq!(s["code"], code, "`{name}`: {s}");
        assert!(
            s["text"].as_str().unwrap_or("").contains(says),
            "`{name}` should say `{says}`: {s}"
        );
    };
    assert_eq!(
        step("parent lists")["text"],
        json!(["query", "read_file", "transfer", "whoami"]),
        "the undeclared `delete_all` is hidden"
    );
    assert_eq!(allowed("declared call"), "contents of /data/a.txt");
    refused("undeclared tool", -32602, "not declared");
    refused("outside the prefix", -32602, "must start with `/data/`");
    refused("climbing out of the prefix", -32602, "`..`");
    refused("table not allowed", -32602, "must be one of");
    assert_eq!(
        allowed("within the declared maximum"),
        "sent 250.0 to acct-7"
    );
    refused("policy forbids", -31003, "agents-transfer-limit");
    assert_eq!(
        step("child lists")["text"],
        json!(["read_file"]),
        "the sub-agent sees less"
    );
    assert_eq!(
        allowed("child declared call"),
        "contents of /data/reports/q3.csv"
    );
    refused(
        "child outside its narrower prefix",
        -32602,
        "/data/reports/",
    );
    refused(
        "child calls a tool only its parent has",
        -32602,
        "not declared",
    );
    refused("parent after revoke", -31003, "revoked");
    refused("child after parent revoke", -31003, "revoked");
    serde_json::from_str(step("whoami")["text"].as_str().unwrap()).unwrap()
}

/// The broker's record: one `tool.called` per attempted call of `grant`, with the
/// decisions in order (the proxy reports at most 200 ms late, and on exit).
async fn check_audit(b: &Broker, grant: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let calls: Vec<Value> = b
            .audit_for(grant)
            .await
            .into_iter()
            .filter(|e| e["kind"] == "tool.called")
            .collect();
        let got: Vec<&str> = calls
            .iter()
            .map(|e| e["data"]["decision"].as_str().unwrap())
            .collect();
        if got.len() >= want.len() || Instant::now() > deadline {
            assert_eq!(got, want, "one record per attempted call: {calls:#?}");
            for c in &calls {
                assert_eq!(c["data"]["args_sha256"].as_str().unwrap().len(), 64, "{c}");
                assert!(c["data"]["latency_us"].as_u64().is_some(), "{c}");
                assert_eq!(c["actor"], "mcp-proxy");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const PARENT_DECISIONS: &[&str] = &[
    "allow", "deny", "deny", "deny", "deny", "allow", "deny", "allow", "deny",
];
const CHILD_DECISIONS: &[&str] = &["allow", "deny", "deny", "deny"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_stdio_gets_only_its_declared_intent() {
    let b = broker().await;
    let (pk, ck) = (DpopKey::generate(), DpopKey::generate());
    let (parent, child) = b.tokens(&pk, &ck).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = proxy_config(tmp.path(), &b.url, "stdio", None);
    let env = [
        ("PROXY_CONFIG", cfg.to_str().unwrap()),
        ("PARENT_TOKEN", parent["access_token"].as_str().unwrap()),
        ("CHILD_TOKEN", child["access_token"].as_str().unwrap()),
        ("PARENT_GRANT", parent["grant_id"].as_str().unwrap()),
        ("BROKER", &b.url),
        ("ADMIN_TOKEN", &b.admin),
    ];
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let steps = tokio::task::spawn_blocking(move || agent("stdio", env))
        .await
        .unwrap();
    let whoami = check_steps(&steps);
    assert_eq!(
        whoami["env_token"],
        Value::Null,
        "the tool server never sees the agent's token: {whoami}"
    );
    check_audit(&b, parent["grant_id"].as_str().unwrap(), PARENT_DECISIONS).await;
    check_audit(&b, child["grant_id"].as_str().unwrap(), CHILD_DECISIONS).await;
}

async fn over_http(modern: bool) {
    let b = broker().await;
    let (pk, ck) = (DpopKey::generate(), DpopKey::generate());
    let (parent, child) = b.tokens(&pk, &ck).await;
    let tmp = tempfile::tempdir().unwrap();
    let (port, up_port) = (free_port(), free_port());
    let _upstream = Running(
        Command::new(python())
            .arg(py_dir().join("tools_server.py"))
            .args(["http", &up_port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(up_port);
    let cfg = proxy_config(tmp.path(), &b.url, "http", Some((port, up_port)));
    let _proxy = Running(
        Command::new(LAPSE)
            .args(["mcp-proxy", "--http", "--config", cfg.to_str().unwrap()])
            .env("LAPSE_PROXY_TOKEN", PROXY_TOKEN)
            .env("UPSTREAM_CREDENTIAL", "the-proxy's-own-upstream-credential")
            .env_remove("LAPSE_ACCESS_TOKEN")
            .spawn()
            .unwrap(),
    );
    wait_for(port);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let (ppem, cpem) = (
        hex::encode(pk.signing_key().secret_bytes()),
        hex::encode(ck.signing_key().secret_bytes()),
    );
    let env: Vec<(String, String)> = vec![
        ("PROXY_URL".into(), url.clone()),
        (
            "PARENT_TOKEN".into(),
            parent["access_token"].as_str().unwrap().into(),
        ),
        (
            "CHILD_TOKEN".into(),
            child["access_token"].as_str().unwrap().into(),
        ),
        ("PARENT_KEY".into(), ppem),
        ("CHILD_KEY".into(), cpem),
        (
            "PARENT_GRANT".into(),
            parent["grant_id"].as_str().unwrap().into(),
        ),
        ("BROKER".into(), b.url.clone()),
        ("ADMIN_TOKEN".into(), b.admin.clone()),
    ];
    let mode = if modern { "http-modern" } else { "http" };
    let steps = tokio::task::spawn_blocking(move || agent(mode, env))
        .await
        .unwrap();
    let whoami = check_steps(&steps);
    let seen = &whoami["headers"];
    assert_eq!(
        seen["authorization"], "Bearer the-proxy's-own-upstream-credential",
        "exactly the proxy's own credential upstream: {seen}"
    );
    assert!(
        seen.get("dpop").is_none(),
        "no agent proof upstream: {seen}"
    );
    let token = parent["access_token"].as_str().unwrap();
    assert!(
        !whoami.to_string().contains(token),
        "the agent's token never reaches the upstream"
    );
    let prm = &steps["protected resource metadata"]["text"];
    assert_eq!(prm["resource"], url);
    assert_eq!(prm["authorization_servers"], json!([b.url]));
    if modern {
        assert_eq!(steps["protocol"]["text"], "2026-07-28");
    }
    // Without a token: 401, the challenge names the metadata, the body says why.
    let r = reqwest::Client::new()
        .post(&url)
        .header("Accept", "application/json, text/event-stream")
        .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains("resource_metadata=\"http://127.0.0.1:"),
        "{challenge}"
    );
    assert!(
        !challenge.contains("error="),
        "no credentials, no error code (RFC 6750 3.1): {challenge}"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], -31003, "{body}");
    // 2026-07-28 routing headers must say what the body says.
    let r = reqwest::Client::new()
        .post(&url)
        .header("Mcp-Method", "tools/call")
        .header("Mcp-Name", "read_file")
        .json(&json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": { "name": "delete_all" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32020, "{body}");
    // No server-initiated stream, no sessions.
    let r = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    check_audit(&b, parent["grant_id"].as_str().unwrap(), PARENT_DECISIONS).await;
    check_audit(&b, child["grant_id"].as_str().unwrap(), CHILD_DECISIONS).await;
    if modern {
        return;
    }
    // The broker goes away: once the feed is silent past `staleness` (5 s), a call
    // with a good token is answered "unavailable, retry" (-31503, as over stdio),
    // never "refused" (-31003).
    let fresh_key = DpopKey::generate();
    let (fresh, _) = b.tokens(&fresh_key, &DpopKey::generate()).await;
    let token = fresh["access_token"].as_str().unwrap();
    b.stop();
    let call = |n: i64| {
        let proof = fresh_key.proof("POST", &url, Some(token), now());
        reqwest::Client::new()
            .post(&url)
            .header("Accept", "application/json, text/event-stream")
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", proof)
            .json(&json!({ "jsonrpc": "2.0", "id": n, "method": "tools/call", "params": { "name": "read_file", "arguments": { "path": "/data/notes.txt" } } }))
            .send()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut n = 10;
    let body = loop {
        let r = call(n).await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(json!(null));
        if status == 503 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never unavailable: {status} {body}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(body["error"]["code"], -31503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_streamable_http_gets_only_its_declared_intent() {
    over_http(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2026_07_28_client_is_served_statelessly() {
    over_http(true).await;
}

fn wait_for(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The proxy over stdio, driven line by line: one request, its answer.
struct RawProxy {
    child: Running,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl RawProxy {
    fn start(cfg: &Path, token: &str) -> Self {
        let mut child = Command::new(LAPSE)
            .args(["mcp-proxy", "--config", cfg.to_str().unwrap()])
            .env("LAPSE_ACCESS_TOKEN", token)
            .env("LAPSE_PROXY_TOKEN", PROXY_TOKEN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Self {
            child: Running(child),
            stdin,
            stdout,
        }
    }

    fn line(&mut self, text: &str) -> Value {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{text}").unwrap();
        self.stdin.flush().unwrap();
        let mut out = String::new();
        self.stdout.read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }

    fn call(&mut self, id: u64, name: &str, args: Value) -> Value {
        self.line(&json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call", "params": { "name": name, "arguments": args } }).to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_precise_errors_and_drift_can_end_the_task() {
    let b = broker().await;
    let (pk, ck) = (DpopKey::generate(), DpopKey::generate());
    let (parent, child) = b.tokens(&pk, &ck).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = proxy_config(tmp.path(), &b.url, "stdio", None);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "staleness = \"5s\"",
            "staleness = \"5s\"\non_drift = \"revoke\"",
        ),
    )
    .unwrap();
    let token = parent["access_token"].as_str().unwrap().to_owned();
    let cfg2 = cfg.clone();
    let answers = tokio::task::spawn_blocking(move || {
        let mut p = RawProxy::start(&cfg2, &token);
        let mut a = vec![
            p.line(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#),
            p.line("{not json"),
            p.line(r#"{"jsonrpc":"1.0","id":2,"method":"ping"}"#),
            p.line(r#"{"jsonrpc":"2.0","id":3,"method":"resources/list"}"#),
            p.line(r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"read_file","arguments":["/data/a"]}}"#),
            p.line(r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"arguments":{}}}"#),
            p.line(r#"{"jsonrpc":"2.0","id":6,"method":"ping"}"#),
            p.call(7, "read_file", json!({ "path": "/data/ok.txt" })),
            // Drift: a declared tool outside its constraints. With `on_drift =
            // "revoke"` the whole task ends.
            p.call(8, "read_file", json!({ "path": "/home/secrets" })),
        ];
        std::thread::sleep(Duration::from_millis(800));
        a.push(p.call(9, "read_file", json!({ "path": "/data/ok.txt" })));
        drop(p.stdin);
        let _ = p.child.0.wait();
        a
    })
    .await
    .unwrap();
    assert_eq!(
        answers[0]["result"]["protocolVersion"], "2025-06-18",
        "a supported version is kept: {}",
        answers[0]
    );
    assert_eq!(
        answers[0]["result"]["capabilities"]["tools"]["listChanged"],
        false
    );
    assert_eq!(answers[1]["error"]["code"], -32700, "{}", answers[1]);
    assert_eq!(answers[2]["error"]["code"], -32600, "{}", answers[2]);
    assert_eq!(answers[3]["error"]["code"], -32601, "{}", answers[3]);
    assert_eq!(answers[4]["error"]["code"], -32602, "{}", answers[4]);
    assert_eq!(answers[5]["error"]["code"], -32602, "{}", answers[5]);
    assert_eq!(answers[6]["result"], json!({}), "{}", answers[6]);
    assert_eq!(answers[7]["result"]["isError"], false, "{}", answers[7]);
    assert_eq!(answers[8]["error"]["code"], -32602, "{}", answers[8]);
    assert_eq!(answers[8]["error"]["data"]["drift"], true, "{}", answers[8]);
    assert_eq!(
        answers[9]["error"]["code"], -31003,
        "the task was ended: {}",
        answers[9]
    );
    // The drift signal ended the task: the parent and its sub-agent, audited.
    for g in [&parent, &child] {
        let r = b.grant(g["grant_id"].as_str().unwrap()).await;
        assert_eq!(r["state"], "revoked", "{r}");
    }
    let kinds: Vec<String> = b
        .audit_for(parent["grant_id"].as_str().unwrap())
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(kinds.iter().any(|k| k == "grant.revoked"), "{kinds:?}");
    // Malformed calls are attempts too: five calls, five records.
    check_audit(
        &b,
        parent["grant_id"].as_str().unwrap(),
        &["deny", "deny", "allow", "deny", "deny"],
    )
    .await;
}

/// The broker's store stalls (another session holds SQLite's write lock) past the
/// proxy's 5 s report timeout. The proxy resends its report, with the calls
/// decided meanwhile behind it, and once the lock goes the broker commits both
/// the abandoned copy and the resend. Each call is still recorded exactly once:
/// the resend's calls already on record are left out (issue 28, item 2; before
/// the idempotency keys, 4 calls left 6 records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_resent_after_a_store_stall_records_each_call_once() {
    // The broker waits on the lock far longer than the proxy waits for it.
    let b = broker_with(|cfg| cfg.store_timeout = lapse_core::TtlDuration::from_secs(30)).await;
    let (pk, ck) = (DpopKey::generate(), DpopKey::generate());
    let (parent, _) = b.tokens(&pk, &ck).await;
    let grant = parent["grant_id"].as_str().unwrap().to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = proxy_config(tmp.path(), &b.url, "stdio", None);
    let text = std::fs::read_to_string(&cfg).unwrap();
    // The feed stays fresh through the stall (it only reads), but leave room.
    std::fs::write(
        &cfg,
        text.replace("staleness = \"5s\"", "staleness = \"60s\""),
    )
    .unwrap();
    let token = parent["access_token"].as_str().unwrap().to_owned();
    let db = b.db.clone();
    let (answers, stalled) = tokio::task::spawn_blocking(move || {
        let mut p = RawProxy::start(&cfg, &token);
        // The proxy is up (connected, upstream listed) before the stall.
        let mut a = vec![p.line(r#"{"jsonrpc":"2.0","id":0,"method":"ping"}"#)];
        let lock = rusqlite::Connection::open(&db).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE; INSERT INTO lapse_migrations VALUES (999, 0);")
            .unwrap();
        let stalled = Instant::now();
        for n in 1..=2 {
            a.push(p.call(n, "read_file", json!({ "path": format!("/data/{n}.txt") })));
        }
        // The report of calls 1 and 2 now waits on the store.
        std::thread::sleep(Duration::from_millis(1500));
        for n in 3..=4 {
            a.push(p.call(n, "read_file", json!({ "path": format!("/data/{n}.txt") })));
        }
        // Past the proxy's timeout: it resent 1 and 2 with 3 and 4.
        std::thread::sleep(Duration::from_millis(6500));
        lock.execute_batch("ROLLBACK").unwrap();
        let stalled = stalled.elapsed();
        // The proxy sends what is left and exits once the broker took it.
        drop(p.stdin);
        let _ = p.child.0.wait();
        (a, stalled)
    })
    .await
    .unwrap();
    assert!(stalled > Duration::from_secs(5), "{stalled:?}");
    assert_eq!(answers[0]["result"], json!({}), "{}", answers[0]);
    for a in &answers[1..] {
        assert_eq!(a["result"]["isError"], false, "{a}");
    }
    // The abandoned first report committed before the resend was answered (one
    // writer, in order), so nothing more can arrive now.
    let calls: Vec<Value> = b
        .audit_for(&grant)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "tool.called")
        .collect();
    assert_eq!(
        calls.len(),
        4,
        "one record per call, however often it was sent: {calls:#?}"
    );
    check_audit(&b, &grant, &["allow"; 4]).await;
}
