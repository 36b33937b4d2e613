#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The revocation feed against a real broker: a gate that stops and resumes
//! misses no ending, a gate that restarts from nothing catches up, and order holds.

use lapse_core::{Clock, SystemClock};
use lapse_server::dev;
use lapse_token::DpopKey;
use lapse_verifier::{OnStale, Verifier, VerifierConfig};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Broker {
    url: String,
    dir: std::path::PathBuf,
    admin: String,
    http: reqwest::Client,
    _tmp: tempfile::TempDir,
}

async fn broker() -> Broker {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tmp.path().join("broker");
    let (cfg, _, admin) = dev::prepare(&dir, addr).unwrap();
    let lapse = lapse_server::build(cfg, Arc::new(SystemClock))
        .await
        .unwrap();
    tokio::spawn(lapse_server::serve(lapse, listener, std::future::pending()));
    Broker {
        url: format!("http://{addr}"),
        dir: dir.canonicalize().unwrap(),
        admin,
        http: reqwest::Client::new(),
        _tmp: tmp,
    }
}

impl Broker {
    /// Issues a grant and revokes it; answers its id.
    async fn issue_and_revoke(&self, n: usize) -> String {
        let key = DpopKey::generate();
        let now = SystemClock.now().unix_seconds();
        let url = format!("{}/oauth/token", self.url);
        let identity = dev::dev_token(
            &self.dir,
            "spiffe://dev.lapse.local/ci/deploy",
            600,
            &[],
            now,
        )
        .unwrap();
        let v: Value = self
            .http
            .post(&url)
            .header("DPoP", key.proof("POST", &url, None, now))
            .form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", identity.as_str()),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("audience", "orders-db"),
                ("scope", "read"),
                ("task", &format!("T-{n}")),
                ("purpose", "feed test"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = v["grant_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_owned();
        let st = self
            .http
            .post(format!("{}/v1/grants/{id}/revoke", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, 200);
        id
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
    let b = broker().await;
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
