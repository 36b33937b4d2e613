#![allow(
    dead_code,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! A real broker for approval tests: the dev config and policies (two people of
//! the `dba` group approve `admin` on `orders-db`), operator accounts made here,
//! a fake clock, and a workload that asks and polls over real HTTP.

use lapse_broker::config::{OperatorEntry, OwnerEntry, Role};
use lapse_core::{Clock, FakeClock, SystemClock};
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::sync::Arc;

pub const ONCALL: &str = "spiffe://dev.lapse.local/oncall/alice-laptop";
pub const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

pub struct Server {
    pub url: String,
    pub dir: std::path::PathBuf,
    pub clock: FakeClock,
    pub admin: String,
    pub http: reqwest::Client,
    _tmp: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

/// Operators: alice and bob approve for `dba`; carol approves but is in no group;
/// dave is in `dba` but owns the CI workloads; erin only reads.
pub const PEOPLE: &[(&str, &[Role], &[&str])] = &[
    ("alice", &[Role::Approve], &["dba"]),
    ("bob", &[Role::Approve], &["dba"]),
    ("carol", &[Role::Approve], &[]),
    ("dave", &[Role::Approve], &["dba"]),
    ("erin", &[Role::Read], &["dba"]),
];

/// alice's console password (the others sign in with their API tokens).
pub const ALICE_PASSWORD: &str = "alice's long console password";

pub fn token_of(name: &str) -> String {
    format!("lapse_op_test_{name}")
}

pub async fn start() -> Server {
    start_with(|_| {}).await
}

/// [`start`], with `adjust` changing the config last.
pub async fn start_with(adjust: impl FnOnce(&mut lapse_broker::config::Config)) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tmp.path().join("data");
    let (mut cfg, _, admin) = dev::prepare(&dir, addr).unwrap();
    for (name, roles, groups) in PEOPLE {
        cfg.operators.push(OperatorEntry {
            name: (*name).into(),
            token_sha256: Some(hex::encode(lapse_broker::broker::hash_secret(&token_of(
                name,
            )))),
            roles: roles.to_vec(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            audiences: vec![],
            password_argon2: (*name == "alice")
                .then(|| lapse_broker::password::hash_password(ALICE_PASSWORD).unwrap()),
        });
    }
    cfg.owners.push(OwnerEntry {
        workload: "spiffe://dev.lapse.local/ci/*".into(),
        operators: vec!["dave".into()],
    });
    cfg.owners.push(OwnerEntry {
        workload: "spiffe://dev.lapse.local/oncall/*".into(),
        operators: vec!["bob".into()],
    });
    cfg.break_glass_max_ttl = lapse_core::TtlDuration::from_secs(300);
    adjust(&mut cfg);
    let clock = FakeClock::at(SystemClock.now());
    let lapse = lapse_server::build(cfg, Arc::new(clock.clone()))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = lapse_server::serve(lapse, listener, std::future::pending()).await;
    });
    Server {
        url: format!("http://{addr}"),
        dir: dir.canonicalize().unwrap(),
        clock,
        admin,
        http: lapse_identity::http_client(),
        _tmp: tmp,
        _task: task,
    }
}

impl Server {
    pub fn now(&self) -> i64 {
        self.clock.now().unix_seconds()
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(json!(null)))
    }

    /// The workload exchanges its identity token for `scope` on `orders-db`.
    pub async fn exchange(&self, key: &DpopKey, scope: &str, ttl: &str) -> (u16, Value) {
        let url = format!("{}/oauth/token", self.url);
        let identity = dev::dev_token(&self.dir, CI, 3600, &[], self.now()).unwrap();
        let form = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", scope),
            ("task", "T-dba"),
            ("purpose", "rebuild an index"),
            ("expires_in", ttl),
        ];
        let proof = key.proof("POST", &url, None, self.now());
        self.send(self.http.post(&url).header("DPoP", proof).form(&form))
            .await
    }

    /// The workload asks for `scope`; answers the request id of a pending request.
    pub async fn ask(&self, key: &DpopKey, scope: &str, ttl: &str) -> String {
        let (st, v) = self.exchange(key, scope, ttl).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"], "authorization_pending", "{v}");
        v["request_id"].as_str().unwrap().to_owned()
    }

    /// Introspection of `token` by the admin: whether it is active.
    pub async fn active(&self, token: &str) -> bool {
        let (st, v) = self
            .send(
                self.http
                    .post(format!("{}/oauth/introspect", self.url))
                    .bearer_auth(&self.admin)
                    .form(&[("token", token)]),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v["active"].as_bool().unwrap()
    }

    /// The workload polls with its request id.
    pub async fn poll(&self, key: &DpopKey, request_id: &str) -> (u16, Value) {
        let url = format!("{}/oauth/token", self.url);
        let proof = key.proof("POST", &url, None, self.now());
        self.send(self.http.post(&url).header("DPoP", proof).form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("request_id", request_id),
        ]))
        .await
    }

    pub async fn decide(&self, who: &str, id: &str, verb: &str, body: Value) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}/v1/approvals/{id}/{verb}", self.url))
                .bearer_auth(token_of(who))
                .json(&body),
        )
        .await
    }

    pub async fn audit_kinds(&self, id: &str) -> Vec<(String, String)> {
        let (st, g) = self
            .send(
                self.http
                    .get(format!("{}/v1/approvals/{id}", self.url))
                    .bearer_auth(&self.admin),
            )
            .await;
        assert_eq!(st, 200, "{g}");
        g["audit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_owned(),
                    e["actor"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub async fn break_glass(&self, workload: &str, justification: Option<&str>) -> (u16, Value) {
        let key = DpopKey::generate();
        let url = format!("{}/oauth/token", self.url);
        let identity = dev::dev_token(&self.dir, workload, 600, &[], self.now()).unwrap();
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "admin"),
            ("task", "INC-77"),
            ("purpose", "restore orders"),
            ("expires_in", "3600"),
            ("break_glass", "true"),
        ];
        if let Some(j) = justification {
            form.push(("justification", j));
        }
        let proof = key.proof("POST", &url, None, self.now());
        self.send(self.http.post(&url).header("DPoP", proof).form(&form))
            .await
    }

    pub async fn admin_get(&self, path: &str) -> Value {
        let (st, v) = self
            .send(
                self.http
                    .get(format!("{}{path}", self.url))
                    .bearer_auth(&self.admin),
            )
            .await;
        assert_eq!(st, 200, "{path}: {v}");
        v
    }
}
