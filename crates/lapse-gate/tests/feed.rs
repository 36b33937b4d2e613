#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The revocation feed against a real broker: a gate that stops and resumes
//! misses no ending, a gate that restarts from nothing catches up, and order holds.

use lapse_core::{Clock, SystemClock};
use lapse_token::DpopKey;
use lapse_verifier::{OnStale, Verifier, VerifierConfig};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{Broker, CI, broker, operator};

const OTHER: &str = "spiffe://dev.lapse.local/ci/backup";

async fn feed_broker() -> Broker {
    broker(|cfg, _| {
        cfg.operators.push(operator(
            "ci-system",
            lapse_broker::config::Role::Signal,
            &[],
        ));
        cfg.operators
            .push(operator("auditor", lapse_broker::config::Role::Read, &[]));
    })
    .await
}

impl Broker {
    /// Issues a grant and revokes it; answers its id.
    async fn issue_and_revoke(&self, n: usize) -> String {
        let id = self.issue(CI, &format!("T-{n}"), "read").await;
        self.revoke(&id).await;
        id
    }

    /// A grant (or a pending request) of `workload` for `task`; answers its id.
    async fn issue(&self, workload: &str, task: &str, scope: &str) -> String {
        let v = self
            .exchange(&DpopKey::generate(), workload, "orders-db", scope, task)
            .await;
        v["grant_id"]
            .as_str()
            .or_else(|| v["request_id"].as_str())
            .unwrap_or_else(|| panic!("{v}"))
            .to_owned()
    }

    async fn signal(&self, sender: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/signals", self.url))
            .bearer_auth(format!("token-of-{sender}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn state(&self, id: &str) -> String {
        let v: Value = self
            .http
            .get(format!("{}/v1/grants/{id}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["state"].as_str().unwrap().to_owned()
    }

    async fn verifier(&self) -> Arc<Verifier> {
        Arc::new(
            Verifier::new(VerifierConfig {
                broker: self.url.clone(),
                issuer: self.url.clone(),
                audience: "orders-db".into(),
                token: self.admin.clone(),
                staleness: Duration::from_secs(5),
                on_stale: OnStale::Deny,
                dpop_max_age_secs: 60,
            })
            .await
            .unwrap(),
        )
    }
}

async fn until_seq(v: &Verifier, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while v.seq() < seq {
        assert!(Instant::now() < deadline, "stuck at {} of {seq}", v.seq());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_stops_resumes_without_missing_an_ending_and_in_order() {
    let b = feed_broker().await;
    let mut ids = vec![b.issue_and_revoke(1).await, b.issue_and_revoke(2).await];
    let v = b.verifier().await;
    let follow = tokio::spawn(v.clone().follow());
    until_seq(&v, 2).await;
    follow.abort();

    // Endings while the gate is away.
    for n in 3..=5 {
        ids.push(b.issue_and_revoke(n).await);
    }
    assert_eq!(v.seq(), 2, "the stopped gate heard nothing");
    assert!(v.ended(&ids[2]).is_none());

    // It resumes after what it applied; a gap would have made it reconnect.
    let follow = tokio::spawn(v.clone().follow());
    until_seq(&v, 5).await;
    for id in &ids {
        assert_eq!(v.ended(id).as_deref(), Some("revoked"), "{id}");
    }
    follow.abort();

    // The raw stream resumed with Last-Event-ID: exactly 3, 4, 5, in order.
    let mut resp = b
        .http
        .get(format!("{}/v1/feed", b.url))
        .bearer_auth(&b.admin)
        .header("Last-Event-ID", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    while text.matches("event: grant.ended").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let seqs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(seqs, ["3", "4", "5"], "{text}");
    for (id, n) in ids[2..].iter().zip(["3", "4", "5"]) {
        let at = text.find(&format!("id: {n}\n")).unwrap();
        assert!(text[at..].contains(id.as_str()));
    }

    // A gate restarted from nothing catches up with the whole feed.
    let fresh = b.verifier().await;
    let follow = tokio::spawn(fresh.clone().follow());
    until_seq(&fresh, 5).await;
    assert!(ids.iter().all(|id| fresh.ended(id).is_some()));
    follow.abort();

    // The JSON form pages the same entries.
    let page: Value = b
        .http
        .get(format!("{}/v1/feed?after=3", b.url))
        .bearer_auth(&b.admin)
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["head"], 5);
    let got: Vec<u64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [4, 5]);

    // Without the gate role or an operator token, no feed.
    let st = b
        .http
        .get(format!("{}/v1/feed", b.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_end_the_grants_they_name_and_reach_gates_through_the_feed() {
    let b = feed_broker().await;
    let v = b.verifier().await;
    let follow = tokio::spawn(v.clone().follow());
    let a1 = b.issue(CI, "T-a", "read").await;
    let a2 = b.issue(CI, "T-a", "read").await;
    let other_task = b.issue(CI, "T-b", "read").await;
    let other_workload = b.issue(OTHER, "T-a", "read").await;

    // Refused: no token, the wrong role, an unknown type, an empty subject.
    let r = b
        .http
        .post(format!("{}/v1/signals", b.url))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let task_ended = serde_json::json!({ "type": "task-ended", "subject": { "workload": CI, "task": "T-a" }, "reason": "CI job 4411 finished" });
    assert_eq!(b.signal("auditor", task_ended.clone()).await.0, 403);
    let (st, e) = b
        .signal(
            "ci-system",
            serde_json::json!({ "type": "made-up", "subject": { "task": "T-a" } }),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(
        b.signal(
            "ci-system",
            serde_json::json!({ "type": "task-ended", "subject": {} })
        )
        .await
        .0,
        400
    );
    assert_eq!(b.state(&a1).await, "active");

    // "Task T-a of this workload is over": exactly its two grants end.
    let started = Instant::now();
    let (st, out) = b.signal("ci-system", task_ended).await;
    assert_eq!(st, 200, "{out}");
    let mut ended: Vec<String> = out["ended"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    ended.sort();
    let mut want = vec![a1.clone(), a2.clone()];
    want.sort();
    assert_eq!(ended, want);
    while v.ended(&a1).is_none() || v.ended(&a2).is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the gate did not hear of it"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(b.state(&other_task).await, "active");
    assert_eq!(b.state(&other_workload).await, "active");

    // A CAEP session-revoked for the workload ends all of its grants, and a
    // request of it that waits for approval is denied.
    let pending = b.issue(CI, "T-c", "admin").await;
    assert_eq!(b.state(&pending).await, "pending");
    let (st, out) = b
        .signal(
            "ci-system",
            serde_json::json!({
                "type": "https://schemas.openid.net/secevent/caep/event-type/session-revoked",
                "subject": { "workload": CI },
                "reason": "node compromised",
                "event_timestamp": 1_900_000_000
            }),
        )
        .await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["type"], "session-revoked");
    assert_eq!(out["ended"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(b.state(&other_task).await, "revoked");
    assert_eq!(b.state(&pending).await, "denied");
    assert_eq!(b.state(&other_workload).await, "active");

    // On the record: who sent what, and why each grant ended.
    let audit: Value = b
        .http
        .get(format!("{}/v1/grants/{other_task}", b.url))
        .bearer_auth(&b.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let revoked = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "grant.revoked")
        .unwrap();
    assert_eq!(revoked["actor"], "ci-system");
    assert!(
        revoked["data"]
            .as_str()
            .unwrap()
            .contains("signal `session-revoked` from `ci-system`: node compromised")
    );
    let log: Value = b
        .http
        .get(format!("{}/v1/audit?limit=10000", b.url))
        .bearer_auth(&b.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let signals = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "signal.received")
        .count();
    assert_eq!(signals, 2, "refused signals leave no signal.received");
    follow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_stale_feed_a_gate_fails_closed_or_asks_introspection_as_configured() {
    let b = feed_broker().await;
    let key = DpopKey::generate();
    let (token, grant) = b.token(&key, CI, "orders-db", "read", "T-stale").await;
    let auth = format!("DPoP {token}");
    let url = "http://orders.test/orders/1";
    let ask = |v: Arc<Verifier>, auth: String, proof: String| async move {
        let proofs = [proof.as_str()];
        v.verify(&lapse_verifier::Request {
            method: "GET",
            url,
            authorization: Some(&auth),
            dpop: &proofs,
            action: "read",
            client_cert: None,
            now_secs: SystemClock.now().unix_seconds(),
        })
        .await
        .map(|_| ())
    };
    let proof = || key.proof("GET", url, Some(&token), SystemClock.now().unix_seconds());

    // Never heard from the feed: the default refuses.
    let deny = b.verifier().await;
    assert!(matches!(
        ask(deny, auth.clone(), proof()).await,
        Err(lapse_verifier::Denial::FeedStale(_))
    ));

    // `on_stale = introspect` asks the broker instead, per request.
    let asks = Arc::new(
        Verifier::new(VerifierConfig {
            broker: b.url.clone(),
            issuer: b.url.clone(),
            audience: "orders-db".into(),
            token: b.admin.clone(),
            staleness: Duration::from_secs(5),
            on_stale: OnStale::Introspect,
            dpop_max_age_secs: 60,
        })
        .await
        .unwrap(),
    );
    assert_eq!(ask(asks.clone(), auth.clone(), proof()).await, Ok(()));
    b.revoke(&grant).await;
    assert_eq!(
        ask(asks, auth, proof()).await,
        Err(lapse_verifier::Denial::GrantEnded(
            "inactive at the broker".into()
        ))
    );
}
