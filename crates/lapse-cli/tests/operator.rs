#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Issue 28 (25): `lapse operator token|password` ignored `--json` and printed
//! snippets that had to be edited. The snippet now carries the roles, groups and
//! audiences given, and is loaded as it is by the broker's own config loader.

use lapse_broker::config::{Config, Role};
use lapse_testkit::process::show;
use serde_json::Value;
use std::process::{Command, Output, Stdio};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");

fn lapse(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(LAPSE)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// The dev config with `snippet` appended, loaded by the broker's loader: the
/// operator entry it yields.
fn load_with(snippet: &str, name: &str) -> lapse_broker::config::OperatorEntry {
    let tmp = tempfile::tempdir().unwrap();
    let (_, path, _) =
        lapse_server::dev::prepare(tmp.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push('\n');
    text.push_str(snippet);
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{snippet}"));
    cfg.operators
        .into_iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| panic!("no `{name}` in\n{snippet}"))
}

#[test]
fn operator_token_takes_roles_groups_audiences_and_prints_a_working_entry() {
    let o = lapse(
        &[
            "operator",
            "token",
            "gate-eu",
            "--role",
            "gate",
            "--role",
            "read",
            "--audience",
            "orders-db",
            "--audience",
            "mcp-tools",
        ],
        None,
    );
    assert!(o.status.success(), "{}", show(&o));
    let token = String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_owned();
    let snippet = String::from_utf8(o.stderr.clone()).unwrap();
    let snippet = &snippet[snippet.find("[[operator]]").unwrap()..];
    let e = load_with(snippet, "gate-eu");
    assert_eq!(e.roles, [Role::Gate, Role::Read]);
    assert_eq!(e.audiences, ["orders-db", "mcp-tools"]);
    assert_eq!(
        e.token_sha256.unwrap(),
        hex::encode(lapse_broker::broker::hash_secret(&token))
    );

    // --json: one object on stdout, with the same snippet.
    let o = lapse(
        &[
            "--json", "operator", "token", "alice", "--role", "approve", "--group", "dba",
            "--group", "sre",
        ],
        None,
    );
    assert!(o.status.success(), "{}", show(&o));
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    assert_eq!(v["name"], "alice");
    let token = v["token"].as_str().unwrap();
    assert!(token.starts_with("lapse_op_"));
    let e = load_with(v["snippet"].as_str().unwrap(), "alice");
    assert_eq!(e.roles, [Role::Approve]);
    assert_eq!(e.groups, ["dba", "sre"]);
    assert_eq!(
        e.token_sha256.as_deref(),
        Some(hex::encode(lapse_broker::broker::hash_secret(token)).as_str())
    );
    assert_eq!(v["token_sha256"], e.token_sha256.unwrap().as_str());

    let bad = lapse(&["operator", "token", "x", "--role", "root"], None);
    assert_eq!(bad.status.code(), Some(2), "{}", show(&bad));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`root` is not a role"));
}

#[test]
fn operator_password_json_and_snippet_load_as_they_are() {
    let password = "a long enough console password\n";
    let o = lapse(
        &[
            "operator", "password", "bob", "--role", "approve", "--group", "dba",
        ],
        Some(password),
    );
    assert!(o.status.success(), "{}", show(&o));
    let snippet = String::from_utf8(o.stdout.clone()).unwrap();
    let e = load_with(&snippet, "bob");
    assert_eq!(e.roles, [Role::Approve]);
    assert_eq!(e.groups, ["dba"]);
    lapse_broker::password::check_password_hash(e.password_argon2.as_deref().unwrap()).unwrap();

    let o = lapse(&["--json", "operator", "password", "bob"], Some(password));
    assert!(o.status.success(), "{}", show(&o));
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    assert_eq!(v["name"], "bob");
    assert!(
        v["password_argon2_line"]
            .as_str()
            .unwrap()
            .starts_with("password_argon2 = \"$argon2id$")
    );
    assert!(!o.stdout.windows(20).any(|w| w == b"a long enough consol"));
    let e = load_with(v["snippet"].as_str().unwrap(), "bob");
    // The default roles of a console account, and a note that it is in no group.
    assert_eq!(e.roles, [Role::Approve, Role::Read]);
    assert_eq!(e.password_argon2.as_deref(), v["password_argon2"].as_str());
    assert!(String::from_utf8_lossy(&o.stderr).contains("approves nothing"));
}
