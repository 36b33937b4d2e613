#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The notification webhook against a real local HTTP receiver: signed events for
//! a pending request and its decision, retried with backoff, and a slow receiver
//! never slows a decision.

use hmac::{Hmac, Mac};
use lapse_broker::notify::WebhookConfig;
use lapse_core::{Clock, FakeClock, SystemClock, TtlDuration};
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "webhook-secret-0123456789";

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(String, String)>>>,
    /// Answer 500 to this many requests first.
    fail_first: Arc<Mutex<usize>>,
    /// Sleep this long before answering.
    delay: Duration,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::http::StatusCode {
    let sig = headers
        .get("lapse-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    r.got.lock().unwrap().push((sig, body));
    tokio::time::sleep(r.delay).await;
    let mut f = r.fail_first.lock().unwrap();
    if *f > 0 {
        *f -= 1;
        axum::http::StatusCode::INTERNAL_SERVER_ERROR
    } else {
        axum::http::StatusCode::NO_CONTENT
    }
}

async fn receiver(r: Receiver) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r);
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    url
}

/// Checks `t=…,v1=…` the way a receiver would.
fn verify(sig: &str, body: &str) -> bool {
    let Some((t, v1)) = sig.strip_prefix("t=").and_then(|r| r.split_once(",v1=")) else {
        return false;
    };
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    m.update(format!("{t}.{body}").as_bytes());
    m.verify_slice(&hex::decode(v1).unwrap_or_default()).is_ok()
}

struct Server {
    url: String,
    dir: std::path::PathBuf,
    admin: String,
    http: reqwest::Client,
    _tmp: tempfile::TempDir,
}

async fn start(hook: &str) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let secret_file = tmp.path().join("hook.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tmp.path().join("data");
    let (mut cfg, _, admin) = dev::prepare(&dir, addr).unwrap();
    cfg.webhook = Some(WebhookConfig {
        url: hook.to_owned(),
        secret: format!("file:{}", secret_file.display()),
        max_attempts: 4,
        timeout: TtlDuration::from_secs(1),
        queue: 100,
    });
    let lapse = lapse_server::build(cfg, Arc::new(FakeClock::at(SystemClock.now())))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = lapse_server::serve(lapse, listener, std::future::pending()).await;
    });
    Server {
        url: format!("http://{addr}"),
        dir: dir.canonicalize().unwrap(),
        admin,
        http: lapse_identity::http_client(),
        _tmp: tmp,
    }
}

impl Server {
    /// Asks for `admin` (two approvals); returns the request id and how long the
    /// answer took.
    async fn ask(&self) -> (String, Duration) {
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
        let t = Instant::now();
        let r = self
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
                ("scope", "admin"),
                ("task", "T-hook"),
                ("purpose", "webhook test"),
            ])
            .send()
            .await
            .unwrap();
        let took = t.elapsed();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "authorization_pending", "{v}");
        (v["request_id"].as_str().unwrap().to_owned(), took)
    }
}

async fn wait_for(r: &Receiver, n: usize, within: Duration) -> Vec<(String, String)> {
    let deadline = Instant::now() + within;
    loop {
        let got = r.got.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} deliveries: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_events_for_a_pending_request_and_its_denial_survive_a_failing_receiver() {
    let r = Receiver::default();
    *r.fail_first.lock().unwrap() = 2;
    let s = start(&receiver(r.clone()).await).await;
    let (id, _) = s.ask().await;
    let deny = s
        .http
        .post(format!("{}/v1/approvals/{id}/deny", s.url))
        .bearer_auth(&s.admin)
        .json(&json!({ "reason": "not today" }))
        .send()
        .await
        .unwrap();
    assert_eq!(deny.status().as_u16(), 200);
    // Two failures (500), then the pending event and the denial: 4 deliveries, the
    // first event retried with backoff (0.5 s, 1 s).
    let got = wait_for(&r, 4, Duration::from_secs(10)).await;
    for (sig, body) in &got {
        assert!(verify(sig, body), "bad signature {sig} on {body}");
        assert!(
            !verify(sig, &body.replace("orders-db", "orders-dc")),
            "a changed body fails"
        );
    }
    let events: Vec<Value> = got
        .iter()
        .map(|(_, b)| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(events[0]["id"], events[2]["id"], "the same event, retried");
    assert_eq!(events[2]["type"], "request.pending");
    assert_eq!(events[2]["data"]["request_id"], id.as_str());
    assert_eq!(events[2]["data"]["approvals_required"], 2);
    assert_eq!(events[2]["data"]["approvers"], "dba");
    assert_eq!(events[3]["type"], "request.denied");
    assert_eq!(events[3]["data"]["reason"], "not today");
    assert!(
        !got.iter().any(|(_, b)| b.contains("lapse_op_")),
        "no secrets"
    );

    // Break-glass use announces itself.
    let key = DpopKey::generate();
    let now = SystemClock.now().unix_seconds();
    let url = format!("{}/oauth/token", s.url);
    let identity = dev::dev_token(
        &s.dir,
        "spiffe://dev.lapse.local/oncall/alice-laptop",
        600,
        &[],
        now,
    )
    .unwrap();
    let resp = s
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
            ("scope", "admin"),
            ("task", "INC-9"),
            ("purpose", "restore"),
            ("break_glass", "true"),
            ("justification", "orders down, INC-9 on the pager"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let got = wait_for(&r, 5, Duration::from_secs(10)).await;
    let last: Value = serde_json::from_str(&got[4].1).unwrap();
    assert_eq!(last["type"], "break_glass.used");
    assert_eq!(
        last["data"]["justification"],
        "orders down, INC-9 on the pager"
    );
    assert!(verify(&got[4].0, &got[4].1));
    assert!(!got[4].1.contains("eyJ"), "no token in the event");
    // The outcomes are counted.
    let m = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("lapse_webhook_events_total{outcome=\"retried\"} 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_never_slows_a_decision() {
    let r = Receiver {
        delay: Duration::from_secs(3),
        ..Default::default()
    };
    let s = start(&receiver(r.clone()).await).await;
    for _ in 0..3 {
        let (_, took) = s.ask().await;
        assert!(
            took < Duration::from_millis(500),
            "the answer waited for the webhook: {took:?}"
        );
    }
    // The receiver still sees the events (each attempt times out after 1 s and is
    // retried until attempts run out).
    let got = wait_for(&r, 1, Duration::from_secs(10)).await;
    assert!(got.iter().all(|(s, b)| verify(s, b)));
}

#[test]
fn webhook_config_refuses_plain_http_and_inline_secrets() {
    let base = WebhookConfig {
        url: "http://hooks.example.com/x".into(),
        secret: "env:LAPSE_TEST_NO_SUCH_VAR".into(),
        max_attempts: 3,
        timeout: TtlDuration::from_secs(1),
        queue: 10,
    };
    assert!(base.secret_bytes().unwrap_err().contains("https"));
    let inline = WebhookConfig {
        url: "https://hooks.example.com/x".into(),
        secret: "hunter2hunter2hunter2".into(),
        ..base.clone()
    };
    assert!(
        inline
            .secret_bytes()
            .unwrap_err()
            .contains("not contain it")
    );
    let unset = WebhookConfig {
        url: "https://hooks.example.com/x".into(),
        ..base
    };
    assert!(unset.secret_bytes().unwrap_err().contains("is not set"));
}
