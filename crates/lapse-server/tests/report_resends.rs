#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Reports from the edges resent after a lost answer (issue 28, item 2): the
//! store stalls (another session holds SQLite's write lock), the sender gives
//! up waiting, resends, and the broker commits the abandoned copy after all.
//! Tool calls (`POST /v1/tool-calls`, keyed by the MCP proxy) and gates' uses
//! (`POST /v1/usage`, named by grant and reported time) are recorded once.

mod common;

use common::start_with;
use lapse_broker::config::{OperatorEntry, Role};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::time::Duration;

const GATE_TOKEN: &str = "lapse_op_test_orders_gate";
const OTHER_GATE_TOKEN: &str = "lapse_op_test_orders_gate_2";

async fn server() -> common::Server {
    start_with(|cfg| {
        for (name, token) in [
            ("orders-gate", GATE_TOKEN),
            ("orders-gate-2", OTHER_GATE_TOKEN),
        ] {
            cfg.operators.push(OperatorEntry {
                name: name.into(),
                token_sha256: Some(hex::encode(lapse_broker::broker::hash_secret(token))),
                roles: vec![Role::Gate],
                groups: vec![],
                audiences: vec!["orders-db".into()],
                password_argon2: None,
            });
        }
        // The broker waits on the lock far longer than the sender waits for it.
        cfg.store_timeout = lapse_core::TtlDuration::from_secs(20);
    })
    .await
}

/// Another session holds the store's write lock until released.
struct Stall(rusqlite::Connection);

impl Stall {
    fn take(s: &common::Server) -> Self {
        let db = std::fs::read_to_string(s.dir.join("lapse.toml")).unwrap();
        let path = db
            .lines()
            .find_map(|l| l.strip_prefix("store = \"sqlite://"))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap()
            .to_owned();
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE; INSERT INTO lapse_migrations VALUES (999, 0);")
            .unwrap();
        Self(c)
    }

    fn release(self) {
        self.0.execute_batch("ROLLBACK").unwrap();
    }
}

fn call(grant: &str, n: u32, key: Option<&str>) -> Value {
    let mut c = json!({
        "grant": grant, "at": 1, "tool": format!("tool_{n}"), "args_sha256": "a".repeat(64),
        "decision": "allow", "policies": ["p"], "latency_us": 7,
    });
    if let Some(k) = key {
        c["key"] = json!(k);
    }
    c
}

async fn post(
    s: &common::Server,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> reqwest::Result<(u16, Value)> {
    post_as(s, GATE_TOKEN, path, body, timeout).await
}

async fn post_as(
    s: &common::Server,
    token: &str,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> reqwest::Result<(u16, Value)> {
    let r = s
        .http
        .post(format!("{}{path}", s.url))
        .bearer_auth(token)
        .json(body)
        .timeout(timeout)
        .send()
        .await?;
    let st = r.status().as_u16();
    Ok((st, r.json().await.unwrap_or(Value::Null)))
}

/// The `data` of the grant's audit entries of `kind`.
async fn records(s: &common::Server, grant: &str, kind: &str) -> Vec<Value> {
    let g = s.admin_get(&format!("/v1/grants/{grant}")).await;
    g["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| serde_json::from_str(e["data"].as_str().unwrap()).unwrap())
        .collect()
}

/// Waits until the grant has `n` records of `kind` (an abandoned request
/// commits once the lock goes).
async fn wait_records(s: &common::Server, grant: &str, kind: &str, n: usize) {
    for _ in 0..100 {
        if records(s, grant, kind).await.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_resent_across_a_store_stall_are_recorded_once() {
    let s = server().await;
    let (st, v) = s.exchange(&DpopKey::generate(), "read", "300").await;
    assert_eq!(st, 200, "{v}");
    let grant = v["grant_id"].as_str().unwrap().to_owned();
    let first: Vec<Value> = (1..=4)
        .map(|n| call(&grant, n, Some(&format!("k{n}"))))
        .collect();
    let report = json!({ "calls": first });

    // The report and its resend both time out on the stalled store and are
    // both committed by the broker once the lock goes.
    let stall = Stall::take(&s);
    for _ in 0..2 {
        let r = post(&s, "/v1/tool-calls", &report, Duration::from_millis(700)).await;
        assert!(r.as_ref().is_err_and(reqwest::Error::is_timeout), "{r:?}");
    }
    stall.release();
    wait_records(&s, &grant, "tool.called", 4).await;
    // A third copy, answered: nothing new.
    let (st, v) = post(&s, "/v1/tool-calls", &report, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({ "recorded": 0, "already_recorded": 4 }));

    // Two recorded calls with two new ones (and one of these twice): exactly
    // the new ones are recorded.
    let mixed = json!({ "calls": [
        call(&grant, 3, Some("k3")), call(&grant, 5, Some("k5")),
        call(&grant, 4, Some("k4")), call(&grant, 6, Some("k6")), call(&grant, 6, Some("k6")),
    ] });
    let (st, v) = post(&s, "/v1/tool-calls", &mixed, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({ "recorded": 2, "already_recorded": 3 }));

    // Calls without a key (an older proxy) are recorded as sent.
    let unkeyed = json!({ "calls": [call(&grant, 7, None)] });
    for _ in 0..2 {
        let (st, v) = post(&s, "/v1/tool-calls", &unkeyed, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!((st, &v["recorded"]), (200, &json!(1)), "{v}");
    }
    let tools: Vec<String> = records(&s, &grant, "tool.called")
        .await
        .iter()
        .map(|d| d["tool"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        tools,
        [
            "tool_1", "tool_2", "tool_3", "tool_4", "tool_5", "tool_6", "tool_7", "tool_7"
        ],
        "one record per keyed call"
    );

    // A key is namespaced per sender: another gate's `k1` is its own call.
    let theirs = json!({ "calls": [call(&grant, 9, Some("k1"))] });
    let (st, v) = post_as(
        &s,
        OTHER_GATE_TOKEN,
        "/v1/tool-calls",
        &theirs,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({ "recorded": 1, "already_recorded": 0 }));
    // A malformed key is refused with the reason.
    let bad = json!({ "calls": [call(&grant, 8, Some("not a key!"))] });
    let (st, v) = post(&s, "/v1/tool-calls", &bad, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error_description"].as_str().unwrap().contains("`key`"),
        "{v}"
    );
}

/// A gate whose clock runs two minutes ahead reports one use; the report is
/// lost on the stalled store and resent a minute later. The broker clamps each
/// copy's time to its own clock, so without a key the resend looked like a
/// newer use and was recorded again (keeping an `@idle` grant alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_use_report_resent_across_a_store_stall_is_recorded_once() {
    let s = server().await;
    let (st, v) = s.exchange(&DpopKey::generate(), "read", "300").await;
    assert_eq!(st, 200, "{v}");
    let grant = v["grant_id"].as_str().unwrap().to_owned();
    let ahead = (s.now() + 120) * 1000;
    let report = json!({ "uses": [{ "grant": grant, "at": ahead }] });

    let stall = Stall::take(&s);
    let r = post(&s, "/v1/usage", &report, Duration::from_millis(700)).await;
    assert!(r.as_ref().is_err_and(reqwest::Error::is_timeout), "{r:?}");
    stall.release();
    wait_records(&s, &grant, "grant.used", 1).await;
    s.clock.advance_secs(61);
    let (st, v) = post(&s, "/v1/usage", &report, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["recorded"], 0, "{v}");
    assert_eq!(records(&s, &grant, "grant.used").await.len(), 1);

    // A later use is a new one.
    let later = json!({ "uses": [{ "grant": grant, "at": ahead + 1 }] });
    let (st, v) = post(&s, "/v1/usage", &later, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((st, &v["recorded"]), (200, &json!(1)), "{v}");
    assert_eq!(records(&s, &grant, "grant.used").await.len(), 2);
}
