#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The conformance suite every credential provider passes against its real
//! server, through the real broker: issue → log in → the granted action works and
//! another is refused → renewal → revoke with an idle and a busy session open →
//! both sessions dead, the credential gone, the audit entry counting them →
//! expiry by the sweeper → the broker down past the expiry (the target refuses by
//! itself where it can) → a restart removes what was left → orphans made behind
//! Lapse's back are reconciled → hostile request text never reaches the target →
//! a destroy that fails while the target is cut off is retried, and shows in the
//! standing report until it succeeds.
//!
//! A target is one module in `conformance/` implementing [`Target`] and one line
//! in the `conformance!` list at the bottom. Every target serves audience
//! `orders-db` with the dev policies' actions `read` (granted here) and `write`
//! (never granted here, so the target must refuse it).

use async_trait::async_trait;
use lapse_broker::Lapse;
use lapse_broker::config::Config;
use lapse_core::{Clock, GrantId, SystemClock, Timestamp};
use lapse_providers::{CredentialProvider, CredentialSpec, Secret};
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/pg.rs"]
mod pg;

/// The targets, one module each, in `conformance/`.
#[path = "conformance"]
mod targets {
    pub mod mysql;
    pub mod postgres;
    pub mod redis;
}

const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

/// A provider's real server, as the suite needs to see it.
#[async_trait]
pub trait Target: Send + Sync {
    /// Puts this target's provider table (audience `orders-db`, actions `read`
    /// and `write`) into the broker's config; secrets go in files under `dir`.
    fn configure(&self, cfg: &mut Config, dir: &Path);
    /// A session logged in with a handout (`credentials[0]` of a token response).
    async fn login(&self, handout: &Value) -> Result<Box<dyn Session>, String>;
    /// Whether the target itself refuses a credential after its expiry, with
    /// Lapse down. Where it cannot, the module says what bounds it instead.
    fn refuses_after_expiry(&self) -> bool;
    /// Cuts the broker's admin account off the target (an outage), and back.
    async fn cut_admin(&self);
    async fn restore_admin(&self);
    /// Removes everything the test made in the target.
    async fn cleanup(&self);
}

/// One logged-in session of a generated credential.
#[async_trait]
pub trait Session: Send {
    /// The `read` action: works on a `read` grant.
    async fn read(&mut self) -> Result<(), String>;
    /// The `write` action: refused on a `read` grant.
    async fn write(&mut self) -> Result<(), String>;
    /// Keeps the session busy in one long command; answers when the target ends
    /// it (an error, the session killed) or when the command finishes (`Ok`).
    async fn busy(self: Box<Self>) -> Result<(), String>;
}

struct Broker {
    url: String,
    dir: PathBuf,
    admin: String,
    lapse: Arc<Lapse>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

/// The dev broker in `dir` (made or reused) with `target`'s provider table.
/// `quiet`: no sweeper or reconciler passes of their own (the test drives them).
async fn start(dir: &Path, target: &dyn Target, quiet: bool) -> Broker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (mut cfg, _, admin) = dev::prepare(dir, addr).unwrap();
    target.configure(&mut cfg, dir);
    if quiet {
        cfg.sweep_interval = Some(lapse_core::TtlDuration::from_secs(3600));
        cfg.reconcile_interval = lapse_core::TtlDuration::from_secs(3600);
    }
    let lapse = lapse_server::build(cfg, Arc::new(SystemClock))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = lapse.clone();
    let task = tokio::spawn(async move {
        let _ = lapse_server::serve(served, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    Broker {
        url: format!("http://{addr}"),
        dir: dir.to_owned(),
        admin,
        lapse,
        stop: Some(tx),
        task,
        http: lapse_identity::http_client(),
    }
}

impl Broker {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }

    fn provider(&self) -> Arc<dyn CredentialProvider> {
        self.lapse.providers.get("orders-db").unwrap().clone()
    }

    fn now(&self) -> i64 {
        self.lapse.now().unix_seconds()
    }

    async fn answer(r: reqwest::RequestBuilder) -> (u16, Value) {
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(json!(null)))
    }

    /// A `read` grant for `ttl` seconds, with the task's words given as `task`.
    async fn issue(&self, key: &DpopKey, ttl: u64, task: &str) -> Value {
        let (status, v) = self.try_issue(key, ttl, task).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn try_issue(&self, key: &DpopKey, ttl: u64, task: &str) -> (u16, Value) {
        let url = format!("{}/oauth/token", self.url);
        let identity = dev::dev_token(&self.dir, CI, 600, &[], self.now()).unwrap();
        let ttl = ttl.to_string();
        let form = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "read"),
            ("task", task),
            ("purpose", task),
            ("ticket", task),
            ("environment", "staging"),
            ("expires_in", ttl.as_str()),
        ];
        let proof = key.proof("POST", &url, None, self.now());
        Self::answer(self.http.post(&url).header("DPoP", proof).form(&form)).await
    }

    async fn renew(&self, key: &DpopKey, issued: &Value, ttl: &str) -> (u16, Value) {
        let grant = issued["grant_id"].as_str().unwrap();
        let token = issued["access_token"].as_str().unwrap();
        let url = format!("{}/v1/grants/{grant}/renew", self.url);
        let proof = key.proof("POST", &url, Some(token), self.now());
        Self::answer(
            self.http
                .post(&url)
                .header("Authorization", format!("DPoP {token}"))
                .header("DPoP", proof)
                .json(&json!({ "ttl": ttl })),
        )
        .await
    }

    async fn op(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        Self::answer(
            self.http
                .request(method, format!("{}{path}", self.url))
                .bearer_auth(&self.admin)
                .json(&body),
        )
        .await
    }

    async fn grant(&self, id: &str) -> Value {
        let (status, g) = self
            .op(
                reqwest::Method::GET,
                &format!("/v1/grants/{id}"),
                json!(null),
            )
            .await;
        assert_eq!(status, 200, "{g}");
        g
    }

    async fn revoke(&self, id: &str) {
        let (status, r) = self
            .op(
                reqwest::Method::POST,
                &format!("/v1/grants/{id}/revoke"),
                json!({ "reason": "conformance" }),
            )
            .await;
        assert_eq!(status, 200, "{r}");
    }

    async fn audit(&self, grant: &str) -> Vec<Value> {
        let entries = self
            .lapse
            .store
            .audit_for(grant.parse().unwrap())
            .await
            .unwrap();
        entries
            .iter()
            .map(|e| json!({ "kind": e.kind, "data": serde_json::from_str::<Value>(&e.data).unwrap() }))
            .collect()
    }

    async fn standing_findings(&self) -> Vec<Value> {
        let (status, r) = self
            .op(reqwest::Method::GET, "/v1/reports/standing", json!(null))
            .await;
        assert_eq!(status, 200, "{r}");
        r["findings"].as_array().cloned().unwrap_or_default()
    }

    /// Whether the target still has a credential named `name` (its provider's view).
    async fn exists(&self, name: &str) -> bool {
        self.provider()
            .list()
            .await
            .unwrap()
            .iter()
            .any(|e| e.name == name)
    }
}

fn username(issued: &Value) -> String {
    issued["credentials"][0]["username"]
        .as_str()
        .unwrap_or_else(|| panic!("no credential handed out: {issued}"))
        .to_owned()
}

/// Polls `cond` every 100 ms until it holds, failing after `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue, use, renew and revoke with two sessions open.
async fn issue_use_renew_revoke(target: &dyn Target) {
    let tmp = tempfile::tempdir().unwrap();
    let b = start(&tmp.path().join("data"), target, false).await;
    let key = DpopKey::generate();
    let issued = b.issue(&key, 300, "T-conformance").await;
    let handout = issued["credentials"][0].clone();
    let name = username(&issued);
    let grant = issued["grant_id"].as_str().unwrap().to_owned();
    let password = handout["password"].as_str().unwrap().to_owned();
    assert!(password.len() >= 43, "a 256-bit secret: {}", password.len());
    assert!(b.exists(&name).await, "the provider lists what it made");

    let mut idle = target.login(&handout).await.unwrap();
    idle.read().await.expect("the granted action works");
    assert!(
        idle.write().await.is_err(),
        "an action the grant does not hold is refused by the target"
    );

    // Renewal moves the grant's end (and the target's, where it has one).
    let before = b.grant(&grant).await["expires_at"].as_i64().unwrap();
    let (status, renewed) = b.renew(&key, &issued, "10m").await;
    assert_eq!(status, 200, "{renewed}");
    let after = renewed["grant"]["expires_at"].as_i64().unwrap();
    assert!(
        after > before,
        "renewal moved the expiry: {before} → {after}"
    );
    if let Some(until) = b
        .provider()
        .list()
        .await
        .unwrap()
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.valid_until)
    {
        assert_eq!(until, after / 1000, "the target's own expiry follows");
    }
    idle.read().await.expect("still usable after renewal");

    // Two sessions: the idle one and one busy in a long command.
    let busy_session = target.login(&handout).await.unwrap();
    let busy = tokio::spawn(busy_session.busy());
    let provider = b.provider();
    eventually(5, "two sessions open", || {
        let (p, n) = (provider.clone(), name.clone());
        async move { p.sessions(&n).await.unwrap() >= 2 }
    })
    .await;

    let t = Instant::now();
    b.revoke(&grant).await;
    let revoked_in = t.elapsed();
    let ended = tokio::time::timeout(Duration::from_secs(5), busy)
        .await
        .expect("the busy session ends with the grant")
        .unwrap();
    assert!(ended.is_err(), "the busy command was cut, not finished");
    assert!(idle.read().await.is_err(), "the idle session is dead");
    assert!(
        target.login(&handout).await.is_err(),
        "a new login with the same secret is refused"
    );
    assert!(!b.exists(&name).await, "the credential is gone");
    assert_eq!(provider.sessions(&name).await.unwrap(), 0);
    assert!(
        revoked_in < Duration::from_secs(2),
        "revoke answered after {revoked_in:?}"
    );
    let audit = b.audit(&grant).await;
    let destroyed = audit
        .iter()
        .find(|e| e["kind"] == "credential.destroyed")
        .unwrap_or_else(|| panic!("{audit:?}"));
    assert_eq!(destroyed["data"]["sessions_terminated"], 2, "{destroyed}");
    assert_eq!(destroyed["data"]["sessions_left"], 0, "{destroyed}");
    assert!(
        !serde_json::to_string(&audit).unwrap().contains(&password),
        "the secret is not in the audit log"
    );
    b.stop().await;
    for f in ["lapse.db", "lapse.db-wal"] {
        if let Ok(bytes) = std::fs::read(tmp.path().join("data").join(f)) {
            assert!(
                !bytes
                    .windows(password.len())
                    .any(|w| w == password.as_bytes()),
                "the secret is in {f}"
            );
        }
    }
    target.cleanup().await;
}

/// The sweeper ends an expired grant and its credential; with the broker down
/// the target refuses it by itself where it can, and a restart removes it.
async fn expiry_with_and_without_the_broker(target: &dyn Target) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let b = start(&dir, target, false).await;
    let key = DpopKey::generate();

    let issued = b.issue(&key, 2, "T-expiry").await;
    let name = username(&issued);
    let handout = issued["credentials"][0].clone();
    target.login(&handout).await.unwrap().read().await.unwrap();
    eventually(10, "the sweeper destroys the expired credential", || {
        let b = &b;
        let n = name.clone();
        async move { !b.exists(&n).await }
    })
    .await;
    assert!(
        target.login(&handout).await.is_err(),
        "refused after expiry"
    );

    // The broker stops with a live credential and stays down past its expiry.
    let issued = b.issue(&key, 3, "T-broker-down").await;
    let name = username(&issued);
    let handout = issued["credentials"][0].clone();
    let expires = b.grant(issued["grant_id"].as_str().unwrap()).await["expires_at"]
        .as_i64()
        .unwrap();
    b.stop().await;
    let wait = expires - SystemClock.now().millis() + 1500;
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
    let login = target.login(&handout).await;
    if target.refuses_after_expiry() {
        assert!(
            login.is_err(),
            "the target refuses an expired credential by itself"
        );
    }
    drop(login);

    // Back up, the sweeper ends the grant and destroys what was left.
    let b = start(&dir, target, false).await;
    eventually(10, "the restarted broker destroys the leftover", || {
        let b = &b;
        let n = name.clone();
        async move { !b.exists(&n).await }
    })
    .await;
    assert!(target.login(&handout).await.is_err());
    b.stop().await;
    target.cleanup().await;
}

/// Credentials marked as Lapse's with no grant behind them (made by a crashed
/// issue or by hand) are removed by the reconciler at start; hostile request text
/// never reaches the target (names come from grant ids, never from input).
async fn orphans_and_hostile_input(target: &dyn Target) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let b = start(&dir, target, true).await;
    let provider = b.provider();
    let orphan = GrantId::generate();
    let spec = CredentialSpec {
        grant: orphan,
        name: provider.name_for(orphan),
        actions: vec!["read".into()],
        valid_until: Timestamp::from_millis(SystemClock.now().millis() + 600_000),
    };
    provider.create(&spec, &Secret::generate()).await.unwrap();
    assert!(b.exists(&spec.name).await);

    let hostile = format!(
        "x'; DROP TABLE items; -- \"`$(id)`\" ; FLUSHALL\r\nACL SETUSER evil on nopass ~* +@all {}",
        "y".repeat(1000)
    );
    let key = DpopKey::generate();
    let issued = b.issue(&key, 300, &hostile).await;
    let name = username(&issued);
    assert!(
        name.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'),
        "{name}"
    );
    let handout = issued["credentials"][0].clone();
    let mut s = target.login(&handout).await.unwrap();
    s.read().await.expect("a hostile task name changes nothing");
    drop(s);
    // NUL and 10 KB are refused before anything reaches the target.
    let before = provider.list().await.unwrap().len();
    for (task, why) in [
        ("T-\0-nul".to_owned(), "`task` contains a control character"),
        ("z".repeat(10_240), "`task` is longer than"),
    ] {
        let (status, v) = b.try_issue(&key, 300, &task).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"], "invalid_request", "{v}");
        assert!(
            v["error_description"]
                .as_str()
                .unwrap_or_default()
                .contains(why),
            "{v}"
        );
    }
    assert_eq!(
        provider.list().await.unwrap().len(),
        before,
        "nothing was created"
    );
    b.stop().await;

    // Restarted, the reconciler (at start) removes the orphan and keeps the grant's.
    let b = start(&dir, target, false).await;
    eventually(10, "the reconciler removes the orphan", || {
        let b = &b;
        let n = spec.name.clone();
        async move { !b.exists(&n).await }
    })
    .await;
    assert!(b.exists(&name).await, "the live grant's credential stays");
    b.revoke(issued["grant_id"].as_str().unwrap()).await;
    assert!(!b.exists(&name).await);
    b.stop().await;
    target.cleanup().await;
}

/// A destroy that fails (the target cut off) leaves the grant ended and the
/// credential owed: the standing report shows it, and the cleanup retries with
/// backoff until the target is back.
async fn failed_destroys_are_retried_and_reported(target: &dyn Target) {
    let tmp = tempfile::tempdir().unwrap();
    let b = start(&tmp.path().join("data"), target, false).await;
    let key = DpopKey::generate();
    let issued = b.issue(&key, 300, "T-outage").await;
    let grant = issued["grant_id"].as_str().unwrap().to_owned();
    let name = username(&issued);

    target.cut_admin().await;
    b.revoke(&grant).await;
    let g = b.grant(&grant).await;
    assert_eq!(g["state"], "revoked", "{g}");
    assert_eq!(g["credentials"][0]["state"], "destroying", "{g}");
    let findings = b.standing_findings().await;
    assert!(
        findings
            .iter()
            .any(|f| f["kind"] == "credential_not_yet_destroyed" && f["credential"] == name),
        "{findings:?}"
    );

    target.restore_admin().await;
    eventually(
        30,
        "the cleanup destroys it once the target is back",
        || {
            let b = &b;
            let n = name.clone();
            async move { !b.exists(&n).await }
        },
    )
    .await;
    eventually(5, "the grant records the destroy", || {
        let b = &b;
        let id = grant.clone();
        async move { b.grant(&id).await["credentials"][0]["state"] == "destroyed" }
    })
    .await;
    let findings = b.standing_findings().await;
    assert!(
        !findings
            .iter()
            .any(|f| f["kind"] == "credential_not_yet_destroyed"),
        "{findings:?}"
    );
    b.stop().await;
    target.cleanup().await;
}

/// One module of tests per target: every step of the suite, against it.
macro_rules! conformance {
    ($($target:ident),* $(,)?) => {$(
        mod $target {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn issue_use_renew_revoke() {
                super::issue_use_renew_revoke(&super::targets::$target::Target::new().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expiry_with_and_without_the_broker() {
                super::expiry_with_and_without_the_broker(&super::targets::$target::Target::new().await)
                    .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn orphans_and_hostile_input() {
                super::orphans_and_hostile_input(&super::targets::$target::Target::new().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failed_destroys_are_retried_and_reported() {
                super::failed_destroys_are_retried_and_reported(
                    &super::targets::$target::Target::new().await,
                )
                .await;
            }
        }
    )*};
}

conformance!(postgres, mysql, redis);
