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
use lapse_broker::config::{OperatorEntry, Role};
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
                token_sha256: Some(hex::encode(lapse_broker::broker::hash_secret(&token_of(
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

/// A quarantine outlives the grants it ends: the workload's next exchange is
/// refused, naming it, until an admin releases it with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_refuses_new_grants_until_an_admin_releases_it() {
    let s = server().await;
    let key = DpopKey::generate();
    let (st, v) = s.exchange(&key, "read", "300").await;
    assert_eq!(st, 200, "{v}");
    let first = v["grant_id"].as_str().unwrap().to_owned();
    let (st, v) = signal(&s, "db-sensor", json!({ "workload": CI })).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ended"], json!([first]), "{v}");

    let (st, v) = s.exchange(&key, "read", "300").await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"], "access_denied", "{v}");
    let why = v["error_description"].as_str().unwrap();
    assert!(
        why.contains("is quarantined")
            && why.contains("db-sensor")
            && why.contains("lapse workloads release"),
        "{why}"
    );
    let list = s.admin_get("/v1/workloads/quarantined").await;
    let q = &list["quarantined"][0];
    assert_eq!(q["workload"], CI, "{list}");
    assert_eq!(
        q["audiences"],
        json!(["orders-db"]),
        "bound to the sender's audiences: {list}"
    );
    let report = s.admin_get("/v1/reports/standing").await;
    assert_eq!(report["quarantined"][0]["workload"], CI, "{report}");

    let release = |who: String, body: Value| {
        let s = &s;
        async move {
            s.send(
                s.http
                    .post(format!("{}/v1/workloads/release", s.url))
                    .bearer_auth(who)
                    .json(&body),
            )
            .await
        }
    };
    // Lifting is for admins, with a reason.
    let (st, v) = release(
        token_of("db-sensor"),
        json!({ "workload": CI, "reason": "fixed" }),
    )
    .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = release(s.admin.clone(), json!({ "workload": CI, "reason": " " })).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = release(
        s.admin.clone(),
        json!({ "workload": "spiffe://nobody", "reason": "x" }),
    )
    .await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = s.exchange(&key, "read", "300").await;
    assert_eq!(st, 403, "still quarantined: {v}");
    let (st, v) = release(
        s.admin.clone(),
        json!({ "workload": CI, "reason": "key rotated, INC-9" }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["released"]["by"], "db-sensor", "{v}");
    let (st, v) = s.exchange(&key, "read", "300").await;
    assert_eq!(st, 200, "released: {v}");
    assert_eq!(
        s.admin_get("/v1/workloads/quarantined").await["quarantined"],
        json!([])
    );

    // Each step is on the record: set, the refusals, the release.
    let audit = s.admin_get("/v1/audit?limit=1000").await;
    let kinds: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "workload.quarantined")
            .count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "access.refused").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "workload.released").count(),
        1,
        "{kinds:?}"
    );
    let (st, v) = s
        .send(
            s.http
                .get(format!("{}/v1/audit/verify", s.url))
                .bearer_auth(&s.admin),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}
