#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The `lapse` binary as a user runs it: a real `lapse serve --dev` process, real
//! requests through `lapse request`, and the exit codes scripts depend on.

use lapse_testkit::process::{Running, show};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");
const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

fn lapse(args: &[&str]) -> Output {
    Command::new(LAPSE)
        .args(args)
        .env_remove("LAPSE_URL")
        .env_remove("LAPSE_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("cannot run lapse: {e}"))
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Starts `lapse serve --dev` on a free port and waits until it answers. A port
/// another test took between choosing and binding makes the child exit; then it
/// tries another.
fn serve(data: &Path) -> (Running, String) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(LAPSE)
            .args(["serve", "--dev", "--data"])
            .arg(data)
            .args(["--listen", &listen])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start lapse serve: {e}"));
        let mut served = Running(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let up = loop {
            if !matches!(served.0.try_wait(), Ok(None)) {
                break false;
            }
            // The dev folder is written before the server listens.
            if data.join("admin.token").exists() && std::net::TcpStream::connect(&listen).is_ok() {
                // Still alive a moment later: the listener is ours.
                std::thread::sleep(Duration::from_millis(100));
                break matches!(served.0.try_wait(), Ok(None));
            }
            assert!(
                Instant::now() < deadline,
                "lapse serve --dev did not listen on {listen} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        if up {
            return (served, format!("http://{listen}"));
        }
    }
    panic!("lapse serve --dev could not start on any of 5 ports");
}

#[test]
fn a_user_session_from_dev_token_to_a_tampered_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();
    let (server, url) = serve(&data);
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let admin = admin.trim();

    let t = lapse(&["dev", "token", "--workload", CI, "--data", data_s]);
    assert_eq!(code(&t), 0, "{}", show(&t));
    let identity = String::from_utf8(t.stdout).unwrap().trim().to_owned();
    assert_eq!(identity.split('.').count(), 3, "a compact JWS: {identity}");

    let request = |scope: &str, extra: &[&str]| {
        let mut args = vec![
            "request",
            "--json",
            "--url",
            &url,
            "--identity-token",
            &identity,
            "--audience",
            "orders-db",
            "--scope",
            scope,
            "--task",
            "T-7",
            "--purpose",
            "cli test",
        ];
        args.extend_from_slice(extra);
        lapse(&args)
    };

    // Allowed: exit 0, a DPoP token, capped by the policy.
    let ok = request("read", &["--ttl", "1h"]);
    assert_eq!(code(&ok), 0, "{}", show(&ok));
    let v: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["token_type"], "DPoP");
    assert_eq!(v["expires_in"], 900);
    let grant = v["grant_id"].as_str().unwrap().to_owned();

    // Denied (a write needs a ticket): exit 3. Pending (admin needs two approvers): exit 4.
    let denied = request("write", &[]);
    assert_eq!(code(&denied), 3, "{}", show(&denied));
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("access_denied"),
        "{}",
        show(&denied)
    );
    let pending = request("admin", &[]);
    assert_eq!(code(&pending), 4, "{}", show(&pending));
    assert!(
        String::from_utf8_lossy(&pending.stderr).contains("request_id"),
        "{}",
        show(&pending)
    );

    // Usage errors are exit 2, not a request.
    let usage = lapse(&["request", "--url", &url, "--audience", "orders-db"]);
    assert_eq!(code(&usage), 2, "{}", show(&usage));

    // The operator sees and revokes the grant.
    let shown = lapse(&[
        "grants", "show", &grant, "--json", "--url", &url, "--token", admin,
    ]);
    assert_eq!(code(&shown), 0, "{}", show(&shown));
    let g: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(g["state"], "active", "{g}");
    let revoked = lapse(&[
        "grants", "revoke", &grant, "--json", "--url", &url, "--token", admin, "--reason",
        "cli test",
    ]);
    assert_eq!(code(&revoked), 0, "{}", show(&revoked));
    let report = lapse(&[
        "report", "standing", "--json", "--url", &url, "--token", admin,
    ]);
    assert_eq!(code(&report), 0, "{}", show(&report));
    let r: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["proof"]["issued_in_window"], 1, "{r}");
    assert_eq!(r["proof"]["ended"], 1, "the revoked grant has its end: {r}");
    // Listing pages: one grant a page, then every page with --all, the same
    // grants as one big page, in the same order.
    let list = |extra: &[&str]| {
        let mut args = vec!["grants", "list", "--url", &url, "--token", admin];
        args.extend_from_slice(extra);
        lapse(&args)
    };
    let ids = |o: &Output| -> Vec<String> {
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["grants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let whole = list(&["--json"]);
    assert_eq!(code(&whole), 0, "{}", show(&whole));
    let whole = ids(&whole);
    assert!(whole.len() >= 2, "{whole:?}");
    let first = list(&["--json", "--limit", "1"]);
    assert_eq!(ids(&first), whole[..1]);
    let v: Value = serde_json::from_slice(&first.stdout).unwrap();
    let next = v["next"].as_str().unwrap().to_owned();
    let second = list(&["--json", "--limit", "1", "--before", &next]);
    assert_eq!(ids(&second), whole[1..2]);
    let all = list(&["--json", "--limit", "1", "--all"]);
    assert_eq!(ids(&all), whole, "{}", show(&all));
    let human = list(&["--limit", "1"]);
    assert!(
        String::from_utf8_lossy(&human.stderr).contains(&format!("--before {next}")),
        "{}",
        show(&human)
    );
    // Quarantine from the command line: requests are refused (exit 3, naming the
    // quarantine) until the workload is released.
    let workloads = |extra: &[&str]| {
        let mut args = vec!["workloads"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--url", &url, "--token", admin]);
        lapse(&args)
    };
    let q = workloads(&["quarantine", CI, "--reason", "key leaked"]);
    assert_eq!(code(&q), 0, "{}", show(&q));
    let refused = request("read", &[]);
    assert_eq!(code(&refused), 3, "{}", show(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("quarantined"),
        "{}",
        show(&refused)
    );
    let listed = workloads(&["quarantined"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(CI),
        "{}",
        show(&listed)
    );
    let released = workloads(&["release", CI, "--reason", "key rotated"]);
    assert_eq!(code(&released), 0, "{}", show(&released));
    let again = request("read", &[]);
    assert_eq!(code(&again), 0, "{}", show(&again));
    let bad_token = lapse(&["grants", "list", "--url", &url, "--token", "lapse_op_wrong"]);
    assert_ne!(code(&bad_token), 0, "{}", show(&bad_token));
    drop(server);

    // With the server down: the chain verifies and exports.
    let verified = lapse(&["audit", "verify", "--json", "--data", data_s]);
    assert_eq!(code(&verified), 0, "{}", show(&verified));
    let r: Value = serde_json::from_slice(&verified.stdout).unwrap();
    let entries = r["entries"].as_u64().unwrap();
    assert!(
        entries >= 6,
        "request, decisions, issue, pending, revoke: {r}"
    );
    let export = tmp.path().join("audit.jsonl");
    let exported = lapse(&[
        "audit",
        "export",
        "--data",
        data_s,
        "--out",
        export.to_str().unwrap(),
    ]);
    assert_eq!(code(&exported), 0, "{}", show(&exported));
    let lines: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The entries, then the signed checkpoint they end at.
    assert_eq!(lines.len() as u64, entries + 1);
    assert_eq!(
        lines.last().unwrap()["checkpoint"]["seq"],
        entries,
        "{lines:?}"
    );
    let kinds: Vec<&str> = lines.iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in [
        "access.decided",
        "grant.issued",
        "grant.pending",
        "grant.revoked",
    ] {
        assert!(kinds.contains(&k), "`{k}` missing from {kinds:?}");
    }

    // The export verifies offline: against the store's key ring, or a JWKS.
    let export_s = export.to_str().unwrap();
    let offline = lapse(&["audit", "verify", "--data", data_s, "--file", export_s]);
    assert_eq!(code(&offline), 0, "{}", show(&offline));
    let key = lapse_token::SigningKey::load(&data.join("signing.pem")).unwrap();
    let jwks = tmp.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [key.jwk()] }).to_string(),
    )
    .unwrap();
    let jwks_s = jwks.to_str().unwrap();
    let offline = lapse(&["audit", "verify", "--file", export_s, "--jwks", jwks_s]);
    assert_eq!(code(&offline), 0, "{}", show(&offline));
    // An entry appended to the export with a correct link and hash is a tail the
    // checkpoint does not cover; an export cut before its checkpoint is refused.
    let text = std::fs::read_to_string(&export).unwrap();
    let (body, trailer) = text.trim_end().rsplit_once('\n').unwrap();
    let last: lapse_store::AuditEntry = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    let forged_hash = lapse_store::audit::entry_hash(
        last.seq + 1,
        last.at,
        "grant.completed",
        None,
        "forger",
        "{}",
        &last.hash,
    );
    let forged = lapse_store::AuditEntry {
        seq: last.seq + 1,
        kind: "grant.completed".into(),
        grant_id: None,
        actor: "forger".into(),
        data: "{}".into(),
        prev_hash: last.hash.clone(),
        hash: forged_hash,
        ..last
    };
    let tampered = tmp.path().join("tampered.jsonl");
    std::fs::write(
        &tampered,
        format!(
            "{body}\n{}\n{trailer}\n",
            serde_json::to_string(&forged).unwrap()
        ),
    )
    .unwrap();
    let t = lapse(&[
        "audit",
        "verify",
        "--file",
        tampered.to_str().unwrap(),
        "--jwks",
        jwks_s,
    ]);
    assert_eq!(code(&t), 5, "{}", show(&t));
    assert!(
        String::from_utf8_lossy(&t.stdout).contains("follow the signed checkpoint"),
        "{}",
        show(&t)
    );
    std::fs::write(&tampered, format!("{body}\n")).unwrap();
    let t = lapse(&[
        "audit",
        "verify",
        "--file",
        tampered.to_str().unwrap(),
        "--jwks",
        jwks_s,
    ]);
    assert_eq!(code(&t), 5, "{}", show(&t));
    // Keys other than the signer's do not vouch for it.
    let other = lapse_token::SigningKey::generate();
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [other.jwk()] }).to_string(),
    )
    .unwrap();
    let t = lapse(&["audit", "verify", "--file", export_s, "--jwks", jwks_s]);
    assert_eq!(code(&t), 5, "{}", show(&t));

    // Someone edits one entry in the database: exit 5, naming that entry.
    let victim = lines
        .iter()
        .find(|e| e["kind"] == "grant.issued")
        .and_then(|e| e["seq"].as_i64())
        .unwrap();
    let db = rusqlite::Connection::open(data.join("lapse.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE audit SET actor = 'someone-else' WHERE seq = ?1",
            [victim],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let broken = lapse(&["audit", "verify", "--data", data_s]);
    assert_eq!(code(&broken), 5, "{}", show(&broken));
    let out = String::from_utf8_lossy(&broken.stdout);
    assert!(
        out.contains(&format!("BROKEN at entry {victim}")),
        "{}",
        show(&broken)
    );
}

#[test]
fn policy_commands_exit_codes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies");
    let root_s = root.to_str().unwrap();
    let v = lapse(&["policy", "validate", "--policies", root_s]);
    assert_eq!(code(&v), 0, "{}", show(&v));
    let tests = root.join("policy-tests.toml");
    let t = lapse(&[
        "policy",
        "test",
        tests.to_str().unwrap(),
        "--policies",
        root_s,
    ]);
    assert_eq!(code(&t), 0, "{}", show(&t));

    // A case whose expectation is wrong fails with exit 6.
    let tmp = tempfile::tempdir().unwrap();
    let wrong = tmp.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        r#"
[defaults]
source = "10.0.0.1"
time = "2026-11-24T10:00:00Z"

[[case]]
name = "ci reads orders"
workload = "spiffe://dev.lapse.local/ci/deploy"
audience = "orders-db"
actions = ["read"]
expect = "deny"
"#,
    )
    .unwrap();
    let f = lapse(&[
        "policy",
        "test",
        wrong.to_str().unwrap(),
        "--policies",
        root_s,
    ]);
    assert_eq!(code(&f), 6, "{}", show(&f));

    // A broken policy folder names the file and line; exit 1.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(
        bad.join("actions.cedarschema"),
        std::fs::read_to_string(root.join("actions.cedarschema")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        bad.join("x.cedar"),
        "permit (principal, action, resource)\nwhen { nope };\n",
    )
    .unwrap();
    let b = lapse(&["policy", "validate", "--policies", bad.to_str().unwrap()]);
    assert_eq!(code(&b), 1, "{}", show(&b));
    assert!(
        String::from_utf8_lossy(&b.stderr).contains("x.cedar:2"),
        "{}",
        show(&b)
    );
}

#[test]
fn operator_credentials_are_shown_once_and_configured_as_hashes() {
    let o = lapse(&["operator", "token", "alice"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let token = String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.starts_with("lapse_op_"), "{token}");
    let snippet = String::from_utf8(o.stderr.clone()).unwrap();
    let hash = hex::encode(lapse_broker::broker::hash_secret(&token));
    assert!(
        snippet.contains(&format!("token_sha256 = \"{hash}\"")),
        "{snippet}"
    );
    assert!(
        !snippet.contains(&token),
        "the token is printed once, on stdout only"
    );

    let mut child = std::process::Command::new(LAPSE)
        .args(["operator", "password", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"a long enough console password\n",
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", show(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(out.contains("password_argon2 = \"$argon2id$"), "{out}");
    assert!(!out.contains("a long enough console password"));
    // What it prints is a config the broker accepts.
    let phc = out
        .lines()
        .find_map(|l| l.strip_prefix("password_argon2 = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    lapse_broker::password::check_password_hash(&phc).unwrap();

    let mut child = std::process::Command::new(LAPSE)
        .args(["operator", "password", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"short\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 2, "a short password is refused: {}", show(&o));
}

/// One HTTP/1.1 GET over a fresh connection; answers the status and the raw head.
fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

#[test]
fn lapse_gate_runs_from_its_config_file_and_refuses_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let (_broker, url) = serve(&data);
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let token_file = tmp.path().join("gate.token");
    std::fs::write(&token_file, admin.trim()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = include_str!("../../../examples/gate/gate.toml")
        .replace("127.0.0.1:7900", &format!("127.0.0.1:{port}"))
        .replace("http://127.0.0.1:7800", &url)
        .replace(
            "file:/etc/lapse/gate.token",
            &format!("file:{}", token_file.display()),
        );
    let path = tmp.path().join("gate.toml");
    std::fs::write(&path, &cfg).unwrap();

    // A config that would refuse everything, or holds the token itself, is refused.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        cfg.replace(&format!("file:{}", token_file.display()), "lapse_op_secret"),
    )
    .unwrap();
    let o = lapse(&["gate", "--config", bad.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(show(&o).contains("never the token itself"), "{}", show(&o));

    let child = Command::new(LAPSE)
        .args(["gate", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _gate = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "lapse gate did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(port, "/healthz", &[]).0, 200);
    // nginx's auth_request without a token: 401 with a bare DPoP challenge (no
    // error code: RFC 6750 section 3.1).
    let (st, head) = http_get(
        port,
        "/check",
        &[
            ("X-Original-Method", "GET"),
            ("X-Original-URI", "/orders/1"),
        ],
    );
    assert_eq!(st, 401, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: dpop algs=\"eddsa es256 rs256\""),
        "{head}"
    );
    // A path no rule maps is refused before anything else, as is a `..` path.
    for uri in ["/admin", "/orders/../admin"] {
        let (st, head) = http_get(
            port,
            "/check",
            &[("X-Original-Method", "GET"), ("X-Original-URI", uri)],
        );
        assert_eq!(st, 403, "{uri}: {head}");
    }

    // A revoke that waits for the gate answers once the gate has applied it; one
    // that waits for a gate that never confirms says which (exit 7).
    let grant = || {
        let t = lapse(&[
            "dev",
            "token",
            "--workload",
            CI,
            "--data",
            data.to_str().unwrap(),
        ]);
        let identity = String::from_utf8(t.stdout).unwrap().trim().to_owned();
        let o = lapse(&[
            "request",
            "--json",
            "--url",
            &url,
            "--identity-token",
            &identity,
            "--audience",
            "orders-db",
            "--scope",
            "read",
            "--task",
            "T-wait",
            "--purpose",
            "wait test",
        ]);
        assert_eq!(code(&o), 0, "{}", show(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["grant_id"].as_str().unwrap().to_owned()
    };
    let gate_url = format!("http://127.0.0.1:{port}");
    let id = grant();
    let o = lapse(&[
        "grants",
        "revoke",
        &id,
        "--json",
        "--url",
        &url,
        "--token",
        admin.trim(),
        "--wait-gate",
        &gate_url,
    ]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let at = v["feed_position"].as_u64().unwrap();
    let (_, body) = http_get(port, "/readyz", &[]);
    let seen: u64 = body
        .rsplit("\"feed_position\":")
        .next()
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{body}"));
    assert!(seen >= at, "{seen} < {at}: {body}");
    let id = grant();
    let o = lapse(&[
        "grants",
        "revoke",
        &id,
        "--url",
        &url,
        "--token",
        admin.trim(),
        "--wait-gate",
        "http://127.0.0.1:1",
        "--wait-timeout",
        "1s",
    ]);
    assert_eq!(code(&o), 7, "{}", show(&o));
    assert!(
        show(&o).contains("http://127.0.0.1:1 (unreachable"),
        "{}",
        show(&o)
    );
}
