#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! `lapse run --mcp-proxy`: the agent's MCP proxy runs beside the agent, as
//! `lapse run`'s child, with the operator token the agent never gets. Real
//! processes: a broker, `lapse run`, the proxy it starts, a stdio tool server built
//! with the Python MCP SDK, and a shell as the agent. The test plays the agent's
//! part with what the agent has: its environment, and what a process of the same
//! user can read of the other two processes.

use lapse_broker::config::{OperatorEntry, Role};
use lapse_token::{DpopKey, SigningKey};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");
const AGENT: &str = "spiffe://dev.lapse.local/agent/research";
const PROXY_TOKEN: &str = "lapse_op_test_mcp_run_proxy";
const TOOLS: &str = r#"[{"name":"read_file","args":{"path":{"prefix":"/data/"}}}]"#;

/// A tool server over stdio with one tool, `read_file`, in plain Python (the
/// standard library only, so that an unprivileged user can run it).
const TOOL_SERVER: &str = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    method, p = m.get("method"), m.get("params") or {}
    if method == "initialize":
        r = {"protocolVersion": p.get("protocolVersion"), "capabilities": {"tools": {}},
             "serverInfo": {"name": "tools", "version": "1"}}
    elif method == "tools/list":
        r = {"tools": [{"name": "read_file", "description": "Read a file.",
                        "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}}}]}
    elif method == "tools/call":
        r = {"content": [{"type": "text", "text": "contents of " + p["arguments"]["path"]}]}
    else:
        print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "error": {"code": -32601, "message": method}}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"#;

/// Who runs `lapse run` (and so the proxy and the agent) and plays the agent's
/// reads: the test's own user, or `nobody` when the test runs as root (root reads
/// any process's memory; the agent is an ordinary user).
fn agent_user() -> Option<(u32, u32)> {
    // `/proc/self` belongs to our effective user.
    let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    (me == 0).then_some((65534, 65534))
}

fn as_agent_user(c: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = agent_user() {
        c.uid(uid).gid(gid);
    }
    c
}

/// What a process of the agent's user gets reading `path`: its bytes, or why not.
fn read_as_agent_user(path: &str) -> Result<usize, String> {
    let out = as_agent_user(Command::new("cat").arg(path))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout.len())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

struct Broker {
    url: String,
    dir: PathBuf,
    admin: String,
    http: reqwest::Client,
    _tmp: tempfile::TempDir,
}

/// The dev broker with the proxy's operator (`gate` for `mcp-tools`).
async fn broker() -> Broker {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tmp.path().join("data");
    let (mut cfg, _, admin) = lapse_server::dev::prepare(&dir, addr).unwrap();
    cfg.operators.push(OperatorEntry {
        name: "mcp-proxy".into(),
        token_sha256: Some(hex::encode(lapse_broker::broker::hash_secret(PROXY_TOKEN))),
        roles: vec![Role::Gate],
        groups: vec![],
        audiences: vec!["mcp-tools".into()],
        password_argon2: None,
    });
    let lapse = lapse_server::build(cfg, Arc::new(lapse_core::SystemClock))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = lapse_server::serve(lapse, listener, std::future::pending()).await;
    });
    Broker {
        url: format!("http://{addr}"),
        dir: dir.canonicalize().unwrap(),
        admin,
        http: lapse_identity::http_client(),
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
    /// `POST /v1/tool-calls` with `token` as the bearer: a forged `allow` record
    /// for `grant`. The HTTP status.
    async fn forge(&self, token: &str, grant: &str) -> Option<u16> {
        let forged = json!({ "calls": [{
            "grant": grant, "at": now() * 1000, "tool": "read_file",
            "args_sha256": "0".repeat(64), "decision": "allow",
            "reason": "forged by the agent",
        }]});
        let rb = self
            .http
            .post(format!("{}/v1/tool-calls", self.url))
            .bearer_auth(token)
            .json(&forged)
            .build()
            .ok()?;
        Some(self.http.execute(rb).await.unwrap().status().as_u16())
    }

    /// The grant's audit entries, `data` parsed.
    async fn audit_for(&self, grant: &str) -> Vec<Value> {
        let r = self
            .http
            .get(format!("{}/v1/grants/{grant}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let g: Value = r.json().await.unwrap();
        g["audit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e["data"] = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
                e
            })
            .collect()
    }
}

/// `pid`'s parent and process group, from `/proc/PID/stat`.
fn parent_and_group(pid: u32) -> Option<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split(' ').collect();
    Some((f[1].parse().ok()?, f[2].parse().ok()?))
}

/// The `lapse mcp-proxy` that `parent` started.
fn proxy_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let is_proxy = String::from_utf8_lossy(&cmdline).contains("mcp-proxy");
        (is_proxy && parent_and_group(pid)?.0 == parent).then_some(pid)
    })
}

/// A JSON-RPC call to the proxy as the agent makes it: its token, a fresh DPoP
/// proof of its key for the proxy's URL.
async fn mcp_call(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    key: &DpopKey,
    id: u64,
    tool: &str,
    args: Value,
) -> Value {
    let r = http
        .post(url)
        .header("Authorization", format!("DPoP {token}"))
        .header("DPoP", key.proof("POST", url, Some(token), now()))
        .header("Accept", "application/json, text/event-stream")
        .json(&json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call",
                       "params": { "name": tool, "arguments": args } }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_never_holds_a_credential_that_writes_its_records() {
    let b = broker().await;
    let tmp = tempfile::tempdir().unwrap();
    // Readable by the agent's user; the agent writes its environment into it.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let server = tmp.path().join("tools.py");
    std::fs::write(&server, TOOL_SERVER).unwrap();
    let cfg = tmp.path().join("mcp-proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "broker = \"{}\"\naudience = \"mcp-tools\"\ntoken = \"env:LAPSE_PROXY_TOKEN\"\n\n\
             [[upstream]]\nname = \"tools\"\ncommand = [\"python3\", {:?}]\n",
            b.url,
            server.to_str().unwrap(),
        ),
    )
    .unwrap();
    let env_file = tmp.path().join("agent.env");
    let identity = lapse_server::dev::dev_token(&b.dir, AGENT, 600, &[], now()).unwrap();
    // The agent writes down its whole environment, then waits for the test.
    let script = format!("env -0 > '{}'; echo ready; read _", env_file.display());
    let mut run = Command::new(LAPSE);
    let mut run = as_agent_user(&mut run)
        .args([
            "run",
            "--url",
            &b.url,
            "--audience",
            "mcp-tools",
            "--scope",
            "call",
        ])
        .args([
            "--task",
            "research-run",
            "--purpose",
            "summarise",
            "--tools",
            TOOLS,
        ])
        .arg("--mcp-proxy")
        .arg(&cfg)
        .args(["--", "sh", "-c", &script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(tmp.path())
        .env("LAPSE_IDENTITY_TOKEN", &identity)
        // Operator credentials in `lapse run`'s environment: none may reach the agent.
        .env("LAPSE_PROXY_TOKEN", PROXY_TOKEN)
        .env("LAPSE_TOKEN", &b.admin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let run_pid = run.id();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let ready = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l
    })
    .await
    .unwrap();
    assert_eq!(ready.trim(), "ready", "the agent did not start");

    let env: Vec<(String, String)> = std::fs::read(&env_file)
        .unwrap()
        .split(|c| *c == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no `{k}` in the agent's environment"))
    };
    for gone in ["LAPSE_PROXY_TOKEN", "LAPSE_TOKEN", "LAPSE_IDENTITY_TOKEN"] {
        assert!(
            env.iter().all(|(n, _)| n != gone),
            "`{gone}` reached the agent"
        );
    }

    // The proxy is `lapse run`'s child, beside the agent (not in its process
    // group), and neither it nor `lapse run` lets a same-user process read its
    // environment or memory.
    let proxy = proxy_of(run_pid).expect("lapse run started a proxy");
    let agent = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| *p != proxy && parent_and_group(*p).is_some_and(|(pp, _)| pp == run_pid))
        .expect("the agent's shell");
    let (_, agent_group) = parent_and_group(agent).unwrap();
    let (_, proxy_group) = parent_and_group(proxy).unwrap();
    assert_ne!(
        proxy_group, agent_group,
        "the proxy is not in the agent's group"
    );
    for pid in [proxy, run_pid] {
        for what in ["environ", "mem"] {
            let read = read_as_agent_user(&format!("/proc/{pid}/{what}"));
            assert!(
                read.as_ref()
                    .is_err_and(|e| e.contains("Permission denied")),
                "/proc/{pid}/{what} is open to a process of the agent's user: {read:?}"
            );
        }
    }

    // The agent reaches its tools through the proxy with its own token and key.
    let url = var("LAPSE_MCP_URL");
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp"),
        "{url}"
    );
    let grant = var("LAPSE_GRANT_ID");
    let token = var("LAPSE_ACCESS_TOKEN");
    let key = DpopKey::from_signing(SigningKey::from_pkcs8_pem(&var("LAPSE_DPOP_KEY")).unwrap());
    let allowed = mcp_call(
        &b.http,
        &url,
        &token,
        &key,
        1,
        "read_file",
        json!({ "path": "/data/a.txt" }),
    )
    .await;
    assert_eq!(
        allowed["result"]["content"][0]["text"], "contents of /data/a.txt",
        "{allowed}"
    );
    let refused = mcp_call(
        &b.http,
        &url,
        &token,
        &key,
        2,
        "read_file",
        json!({ "path": "/etc/passwd" }),
    )
    .await;
    assert_eq!(refused["error"]["code"], -32602, "{refused}");

    // Nothing the agent holds writes records: every value in its environment, as
    // an operator token, is refused.
    let values: BTreeSet<&str> = env.iter().map(|(_, v)| v.as_str()).collect();
    let mut tried = 0;
    for v in &values {
        if let Some(status) = b.forge(v, &grant).await {
            tried += 1;
            assert!(
                matches!(status, 401 | 403),
                "the broker took a record written with a value of the agent's environment (HTTP {status})"
            );
        }
    }
    assert!(tried >= 5, "only {tried} values could be sent as a token");

    // The command ends; so does the proxy, after its last records.
    run.stdin.take().unwrap().write_all(b"\n").unwrap();
    let status = tokio::task::spawn_blocking(move || run.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        !Path::new(&format!("/proc/{proxy}")).exists(),
        "the proxy outlived the command"
    );

    // The broker has the proxy's records of both calls, before the completion.
    let deadline = Instant::now() + Duration::from_secs(10);
    let audit = loop {
        let audit = b.audit_for(&grant).await;
        if audit.iter().any(|e| e["kind"] == "grant.completed") || Instant::now() > deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let kinds: Vec<String> = audit
        .iter()
        .filter(|e| e["kind"] == "tool.called" || e["kind"] == "grant.completed")
        .map(|e| match e["data"]["decision"].as_str() {
            Some(d) => format!(
                "{} {d} by {}",
                e["kind"].as_str().unwrap(),
                e["actor"].as_str().unwrap()
            ),
            None => e["kind"].as_str().unwrap().to_owned(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "tool.called allow by mcp-proxy",
            "tool.called deny by mcp-proxy",
            "grant.completed"
        ],
        "{audit:#?}"
    );

    // The check above means something: the proxy's own token does write records.
    assert_eq!(b.forge(PROXY_TOKEN, &grant).await, Some(200));
}
