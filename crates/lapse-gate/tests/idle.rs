#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! `@idle`: a grant the gates report no use of for its idle window is revoked;
//! a used one is not, and a grant without the annotation is left alone.

use lapse_core::{Clock, SystemClock};
mod common;

use common::{broker, operator};
use lapse_gate::config::GateConfig;
use lapse_token::DpopKey;
use serde_json::Value;
use std::time::{Duration, Instant};

const IDLE_POLICY: &str = r#"
// Report jobs lose access after two seconds without a request.
@id("reports-read-orders-idle")
@idle("2s")
permit (
  principal,
  action == Action::"read",
  resource == Resource::"orders-db"
)
when { principal.uri like "spiffe://dev.lapse.local/reports/*" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_grants_with_an_idle_window_are_revoked_and_used_ones_are_not() {
    let b = broker(|cfg, dir| {
        std::fs::write(dir.join("policies").join("idle.cedar"), IDLE_POLICY).unwrap();
        // A gate that guards another audience: its use reports do not count here.
        cfg.operators.push(operator(
            "tickets-gate",
            lapse_broker::config::Role::Gate,
            &["tickets-api"],
        ));
    })
    .await;
    let (url, admin) = (b.url.clone(), b.admin.clone());
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("gate.token"), &admin).unwrap();
    let cfg = GateConfig::parse(&format!(
        "listen = \"127.0.0.1:0\"\nbroker = \"{url}\"\naudience = \"orders-db\"\n\
         token = \"file:{}\"\nexternal_url = \"http://orders.test\"\n\
         [[rule]]\nmethod = \"GET\"\npath = \"/orders/*\"\naction = \"read\"\n",
        tmp.path().join("gate.token").display()
    ))
    .unwrap();
    let gate = lapse_gate::Gate::new(cfg).await.unwrap();
    let follow = tokio::spawn(gate.verifier.clone().follow());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let use_it = |token: String, key: &DpopKey| {
        let mut h = axum::http::HeaderMap::new();
        h.insert("authorization", format!("DPoP {token}").parse().unwrap());
        let proof = key.proof(
            "GET",
            "http://orders.test/orders/1",
            Some(&token),
            SystemClock.now().unix_seconds(),
        );
        h.insert("dpop", proof.parse().unwrap());
        h
    };
    let state = |id: String| {
        let (url, admin) = (url.clone(), admin.clone());
        async move {
            let v: Value = reqwest::Client::new()
                .get(format!("{url}/v1/grants/{id}"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (
                v["state"].as_str().unwrap().to_owned(),
                v["end"]["reason"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    let ip: std::net::IpAddr = [127, 0, 0, 1].into();

    let (k_used, k_idle, k_plain) = (
        DpopKey::generate(),
        DpopKey::generate(),
        DpopKey::generate(),
    );
    let (t_used, g_used) = b
        .token(
            &k_used,
            "spiffe://dev.lapse.local/reports/daily",
            "orders-db",
            "read",
            "T-idle",
        )
        .await;
    let (_t_idle, g_idle) = b
        .token(
            &k_idle,
            "spiffe://dev.lapse.local/reports/weekly",
            "orders-db",
            "read",
            "T-idle",
        )
        .await;
    let (_t_plain, g_plain) = b
        .token(
            &k_plain,
            "spiffe://dev.lapse.local/ci/deploy",
            "orders-db",
            "read",
            "T-idle",
        )
        .await;

    // Another audience's gate cannot keep an orders-db grant alive.
    let r: Value = reqwest::Client::new()
        .post(format!("{url}/v1/usage"))
        .bearer_auth("token-of-tickets-gate")
        .json(
            &serde_json::json!({ "uses": [{ "grant": g_idle, "at": SystemClock.now().millis() }] }),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["recorded"], 0, "{r}");

    // One grant is used every 500 ms for 3.5 s, with reports; the others never.
    let started = Instant::now();
    let started_ms = SystemClock.now().millis();
    while started.elapsed() < Duration::from_millis(3500) {
        let r = gate
            .decide(&use_it(t_used.clone(), &k_used), "GET", "/orders/1", ip)
            .await;
        assert!(r.is_ok(), "{r:?}");
        gate.report_uses().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (st, why) = state(g_idle.clone()).await;
    assert_eq!(
        st, "revoked",
        "the unused grant is revoked after its 2 s window"
    );
    assert!(why.contains("idle"), "{why}");
    assert_eq!(
        state(g_used.clone()).await.0,
        "active",
        "the used one lives on"
    );
    assert_eq!(
        state(g_plain.clone()).await.0,
        "active",
        "no @idle, no idle revocation"
    );
    // The gate heard of the idle revocation through the feed.
    assert_eq!(gate.verifier.ended(&g_idle).as_deref(), Some("revoked"));

    // Once its use stops, the used grant goes too.
    let stop = Instant::now();
    loop {
        if state(g_used.clone()).await.0 == "revoked" {
            break;
        }
        assert!(
            stop.elapsed() < Duration::from_secs(5),
            "not revoked after it went idle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Never before its window after the last use the broker recorded (uses are
    // recorded at most once a second per grant, so that can be a bit before the
    // last request).
    let v: Value = reqwest::Client::new()
        .get(format!("{url}/v1/grants/{g_used}"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["idle_secs"], 2);
    let (last, ended) = (
        v["last_used_at"].as_i64().unwrap(),
        v["ended_at"].as_i64().unwrap(),
    );
    assert!(
        ended >= last + 2000,
        "revoked {} ms after its last recorded use",
        ended - last
    );
    assert!(
        last >= started_ms + 1900,
        "uses late in the loop were recorded: {}",
        last - started_ms
    );
    follow.abort();
}
