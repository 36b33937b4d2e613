#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! `POST /v1/signals` from senders bound to audiences: a signal ends only the
//! grants on the sender's audiences, whatever else its subject matches.

mod common;

use common::{CI, Server, token_of};
use lapse_server::config::{OperatorEntry, Role};
use lapse_token::DpopKey;
use serde_json::{Value, json};

async fn server() -> Server {
    common::start_with(|cfg| {
        for (name, audiences) in [
            ("tools-sensor", vec!["mcp-tools"]),
            ("db-sensor", vec!["orders-db"]),
        ] {
            cfg.operators.push(OperatorEntry {
                name: name.into(),
                token_sha256: Some(hex::encode(lapse_server::service::hash_secret(&token_of(
                    name,
                )))),
                roles: vec![Role::Signal],
                groups: vec![],
                audiences: audiences.into_iter().map(str::to_owned).collect(),
                password_argon2: None,
            });
        }
    })
    .await
}

async fn signal(s: &Server, sender: &str, subject: Value) -> (u16, Value) {
    s.send(
        s.http
            .post(format!("{}/v1/signals", s.url))
            .bearer_auth(token_of(sender))
            .json(&json!({ "type": "workload-quarantined", "subject": subject, "reason": "test" })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_ends_only_grants_on_the_senders_audiences() {
    let s = server().await;
    let key = DpopKey::generate();
    let (st, v) = s.exchange(&key, "read", "300").await;
    assert_eq!(st, 200, "{v}");
    let id = v["grant_id"].as_str().unwrap().to_owned();

    // Bound to `mcp-tools`: the workload's grant on `orders-db` is not its to end.
    let (st, v) = signal(&s, "tools-sensor", json!({ "workload": CI })).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ended"], json!([]), "{v}");
    let g = s.admin_get(&format!("/v1/grants/{id}")).await;
    assert_eq!(g["state"], "active", "{g}");
    // Naming the grant itself is refused, and the refusal is on the record.
    let (st, v) = signal(&s, "tools-sensor", json!({ "grant": id })).await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(
        s.admin_get(&format!("/v1/grants/{id}")).await["state"],
        "active"
    );
    let audit = s.admin_get("/v1/audit?limit=1000").await;
    let entries = audit["entries"].as_array().unwrap();
    let received: Vec<Value> = entries
        .iter()
        .filter(|e| e["kind"] == "signal.received" && e["actor"] == "tools-sensor")
        .map(|e| serde_json::from_str(e["data"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(received.len(), 1, "{audit}");
    assert_eq!(received[0]["matched"], 0, "{received:?}");
    assert_eq!(received[0]["out_of_scope"], 1, "{received:?}");
    assert!(
        entries
            .iter()
            .any(|e| e["kind"] == "signal.refused" && e["actor"] == "tools-sensor"),
        "{audit}"
    );

    // Bound to `orders-db`: it ends it.
    let (st, v) = signal(&s, "db-sensor", json!({ "workload": CI })).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ended"], json!([id]), "{v}");
    assert_eq!(
        s.admin_get(&format!("/v1/grants/{id}")).await["state"],
        "revoked"
    );
}
