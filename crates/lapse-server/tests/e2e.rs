#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::type_complexity
)]
//! The real server over real HTTP, with real signed identity tokens and real DPoP
//! proofs. Access tokens are checked with an independent JWT library (jsonwebtoken).

use lapse_core::{Clock, FakeClock, SystemClock, TtlDuration};
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

struct Server {
    url: String,
    dir: PathBuf,
    admin: String,
    clock: FakeClock,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
    /// The service behind the listener, for races HTTP cannot time.
    lapse: Arc<lapse_broker::Lapse>,
}

async fn start_in(dir: PathBuf, clock: FakeClock, addr: &str) -> Server {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (mut cfg, _, admin) = dev::prepare(&dir, addr).unwrap_or_else(|e| panic!("{e}"));
    cfg.store_timeout = TtlDuration::from_secs(1);
    let lapse = lapse_server::build(cfg, Arc::new(clock.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let l2 = lapse.clone();
    let task = tokio::spawn(async move {
        let _ = lapse_server::serve(l2, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    Server {
        url: format!("http://{addr}"),
        dir,
        admin,
        clock,
        stop: Some(tx),
        task,
        http: lapse_identity::http_client(),
        lapse,
    }
}

async fn start() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = start_in(
        tmp.path().join("data"),
        FakeClock::at(SystemClock.now()),
        "127.0.0.1:0",
    )
    .await;
    (tmp, s)
}

impl Server {
    async fn stop(mut self) -> (PathBuf, FakeClock, String) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
        (
            self.dir.clone(),
            self.clock.clone(),
            self.url.trim_start_matches("http://").to_owned(),
        )
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_seconds()
    }

    fn identity(&self, workload: &str) -> String {
        dev::dev_token(&self.dir, workload, 600, &[], self.now()).unwrap_or_else(|e| panic!("{e}"))
    }

    async fn exchange(
        &self,
        key: &DpopKey,
        identity: &str,
        audience: &str,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("{}/oauth/token", self.url);
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", audience),
            ("scope", scope),
            ("task", "T-42"),
            ("purpose", "integration test"),
        ];
        form.extend_from_slice(extra);
        let proof = key.proof("POST", &url, None, self.now());
        self.send(self.http.post(&url).header("DPoP", proof).form(&form))
            .await
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb.send().await.unwrap_or_else(|e| panic!("{e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(json!(null)))
    }

    async fn introspect(&self, token: &str) -> Value {
        let (status, v) = self
            .send(
                self.http
                    .post(format!("{}/oauth/introspect", self.url))
                    .bearer_auth(&self.admin)
                    .form(&[("token", token)]),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn workload_call(
        &self,
        key: &DpopKey,
        token: &str,
        grant: &str,
        action: &str,
    ) -> (u16, Value) {
        let url = format!("{}/v1/grants/{grant}/{action}", self.url);
        let proof = key.proof("POST", &url, Some(token), self.now());
        self.send(
            self.http
                .post(&url)
                .header("Authorization", format!("DPoP {token}"))
                .header("DPoP", proof)
                .json(&json!({})),
        )
        .await
    }

    async fn audit_ok(&self) -> Value {
        let (status, v) = self
            .send(
                self.http
                    .get(format!("{}/v1/audit/verify", self.url))
                    .bearer_auth(&self.admin),
            )
            .await;
        assert_eq!(status, 200, "audit must verify: {v}");
        v
    }
}

const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_issues_a_capped_dpop_bound_token() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let (status, v) = s
        .exchange(
            &key,
            &s.identity(CI),
            "orders-db",
            "read",
            &[("expires_in", "3600")],
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["token_type"], "DPoP");
    assert_eq!(v["scope"], "read");
    assert_eq!(v["expires_in"], 900, "capped by @max_ttl(\"15m\")");
    let token = v["access_token"].as_str().unwrap_or_default();

    // Verify with an independent library against the published JWKS.
    let (_, jwks) = s
        .send(s.http.get(format!("{}/.well-known/jwks.json", s.url)))
        .await;
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(jwks["keys"][0].clone()).unwrap_or_else(|e| panic!("{e}"));
    let header = jsonwebtoken::decode_header(token).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["orders-db"]);
    validation.set_issuer(&[s.url.as_str()]);
    let data = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap_or_else(|e| panic!("{e}")),
        &validation,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let c = data.claims;
    assert_eq!(c["sub"], CI);
    assert_eq!(c["cnf"]["jkt"], key.jkt());
    assert_eq!(c["task"], "T-42");
    assert_eq!(c["grant_id"], v["grant_id"]);
    assert_eq!(
        c["exp"].as_i64().unwrap_or(0) - c["iat"].as_i64().unwrap_or(0),
        900
    );
    for claim in [
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "nbf",
        "jti",
        "scope",
        "cnf",
        "task",
        "grant_id",
        "client_id",
    ] {
        assert!(c.get(claim).is_some(), "claim {claim} missing");
    }

    let i = s.introspect(token).await;
    assert_eq!(i["active"], true);
    assert_eq!(i["scope"], "read");
    s.audit_ok().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_pending_and_bad_input_get_precise_errors() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let id = s.identity(CI);
    let cases: Vec<(&str, &str, &str, Vec<(&str, &str)>, u16, &str)> = vec![
        (
            "default deny",
            "orders-db",
            "write",
            vec![],
            403,
            "access_denied",
        ),
        (
            "approval",
            "orders-db",
            "admin",
            vec![],
            400,
            "authorization_pending",
        ),
        (
            "unknown audience",
            "payroll",
            "read",
            vec![],
            400,
            "invalid_target",
        ),
        (
            "unknown action",
            "orders-db",
            "delete",
            vec![],
            400,
            "invalid_scope",
        ),
        (
            "bad expires_in",
            "orders-db",
            "read",
            vec![("expires_in", "soon")],
            400,
            "invalid_request",
        ),
    ];
    for (name, aud, scope, extra, status, code) in cases {
        let (st, v) = s.exchange(&key, &id, aud, scope, &extra).await;
        assert_eq!(
            (st, v["error"].as_str().unwrap_or("")),
            (status, code),
            "{name}: {v}"
        );
        if code == "authorization_pending" {
            assert!(
                v["request_id"].as_str().unwrap_or("").starts_with("gr_"),
                "{v}"
            );
            assert_eq!(v["approvals_required"], 2);
        }
    }
    // A bad identity token.
    let (st, v) = s
        .exchange(&key, "not-a-jwt", "orders-db", "read", &[])
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
    // An identity token for a workload nobody permits is a deny, not an error.
    let (st, _) = s
        .exchange(
            &key,
            &s.identity("spiffe://elsewhere/x"),
            "orders-db",
            "read",
            &[],
        )
        .await;
    assert_eq!(st, 403);

    let url = format!("{}/oauth/token", s.url);
    // Unknown grant type.
    let (st, v) = s
        .send(
            s.http
                .post(&url)
                .header("DPoP", key.proof("POST", &url, None, s.now()))
                .form(&[("grant_type", "client_credentials")]),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    // Repeated parameter.
    let (st, v) = s
        .send(
            s.http
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=a&grant_type=b"),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    // Oversize body.
    let (st, v) = s
        .send(
            s.http
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(vec![b'a'; 100_000]),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (413, Some("invalid_request")),
        "{v}"
    );
    // Wrong content type.
    let (st, _) = s.send(s.http.post(&url).json(&json!({}))).await;
    assert_eq!(st, 415);
    // Malformed JSON on the native API.
    let (st, v) = s
        .send(
            s.http
                .post(format!("{}/v1/access-requests", s.url))
                .header("content-type", "application/json")
                .body("{\"identity_token\": 5"),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );

    // Denials are audited too; the chain still verifies.
    let (_, a) = s
        .send(
            s.http
                .get(format!("{}/v1/audit", s.url))
                .bearer_auth(&s.admin),
        )
        .await;
    let kinds: Vec<&str> = a["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"access.decided") && kinds.contains(&"grant.pending"),
        "{kinds:?}"
    );
    s.audit_ok().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_replay_mismatch_and_missing_proofs_are_refused() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let url = format!("{}/oauth/token", s.url);
    let id = s.identity(CI);
    let form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", id.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", "orders-db"),
        ("scope", "read"),
        ("task", "T"),
        ("purpose", "p"),
    ];
    let proof = key.proof("POST", &url, None, s.now());
    let (st, _) = s
        .send(s.http.post(&url).header("DPoP", &proof).form(&form))
        .await;
    assert_eq!(st, 200);
    let (st, v) = s
        .send(s.http.post(&url).header("DPoP", &proof).form(&form))
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "replay: {v}"
    );
    assert!(
        v["error_description"]
            .as_str()
            .unwrap_or("")
            .contains("already used")
    );
    for (name, p) in [
        ("wrong htm", key.proof("GET", &url, None, s.now())),
        (
            "wrong htu",
            key.proof(
                "POST",
                &format!("{}/v1/access-requests", s.url),
                None,
                s.now(),
            ),
        ),
        ("stale iat", key.proof("POST", &url, None, s.now() - 300)),
        ("garbage", "abc.def.ghi".to_owned()),
    ] {
        let (st, v) = s
            .send(s.http.post(&url).header("DPoP", p).form(&form))
            .await;
        assert_eq!(
            (st, v["error"].as_str()),
            (400, Some("invalid_dpop_proof")),
            "{name}: {v}"
        );
    }
    let (st, v) = s.send(s.http.post(&url).form(&form)).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "missing: {v}"
    );

    // Key mismatch: a token bound to one key, presented with another key's proof.
    let (_, v) = s.exchange(&key, &id, "orders-db", "read", &[]).await;
    let token = v["access_token"].as_str().unwrap_or_default();
    let grant = v["grant_id"].as_str().unwrap_or_default();
    let thief = DpopKey::generate();
    let (st, v2) = s.workload_call(&thief, token, grant, "complete").await;
    assert_eq!(
        (st, v2["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "{v2}"
    );
    assert_eq!(
        s.introspect(token).await["active"],
        true,
        "a refused call changes nothing"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ending_holds_when_a_use_was_reported_meanwhile() {
    // An operator's revoke or the workload's complete reads the grant, then
    // commits; a gate's use report landing in between moved the grant's version,
    // and the ending failed with 409 (seen in CI: an MCP proxy's use report beat
    // an operator's revoke).
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let gate = s
        .lapse
        .operator(Some(&format!("Bearer {}", s.admin)))
        .unwrap();
    for ending in ["revoked", "completed"] {
        let (st, v) = s
            .exchange(&key, &s.identity(CI), "orders-db", "read", &[])
            .await;
        assert_eq!(st, 200, "{v}");
        let id: lapse_core::GrantId = v["grant_id"].as_str().unwrap().parse().unwrap();
        let read = s.lapse.find(id, "grant").await.unwrap();
        let used = s
            .lapse
            .record_uses(&gate, &[(id, s.clock.now().millis())])
            .await
            .unwrap();
        assert_eq!(used, 1, "the use moved the grant on");
        let ended = match ending {
            "revoked" => s.lapse.revoke(read, "admin", "test").await,
            _ => {
                s.lapse
                    .complete(read, CI, "done", json!({ "reason": "done" }))
                    .await
            }
        }
        .unwrap_or_else(|e| panic!("{ending}: {e:?}"));
        assert_eq!(ended.state.as_str(), ending);
        assert!(ended.last_used_at.is_some(), "the reported use is kept");
    }
    s.audit_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_complete_revoke_renew_and_introspection() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let id = s.identity(CI);
    // Complete by the workload.
    let (_, v) = s.exchange(&key, &id, "orders-db", "read", &[]).await;
    let (t1, g1) = (
        v["access_token"].as_str().unwrap_or_default().to_owned(),
        v["grant_id"].as_str().unwrap_or_default().to_owned(),
    );
    let (st, c) = s.workload_call(&key, &t1, &g1, "complete").await;
    assert_eq!((st, c["state"].as_str()), (200, Some("completed")), "{c}");
    assert_eq!(s.introspect(&t1).await, json!({ "active": false }));
    let (st, _) = s.workload_call(&key, &t1, &g1, "complete").await;
    assert_eq!(st, 409, "an ended grant cannot be ended again");

    // Revoke by an operator.
    let (_, v) = s.exchange(&key, &id, "orders-db", "read", &[]).await;
    let (t2, g2) = (
        v["access_token"].as_str().unwrap_or_default().to_owned(),
        v["grant_id"].as_str().unwrap_or_default().to_owned(),
    );
    let (st, r) = s
        .send(
            s.http
                .post(format!("{}/v1/grants/{g2}/revoke", s.url))
                .bearer_auth(&s.admin)
                .json(&json!({"reason": "test"})),
        )
        .await;
    assert_eq!((st, r["state"].as_str()), (200, Some("revoked")), "{r}");
    assert_eq!(s.introspect(&t2).await["active"], false);
    // Operators need a token; unknown ones are refused.
    let (st, _) = s
        .send(
            s.http
                .post(format!("{}/v1/grants/{g2}/revoke", s.url))
                .bearer_auth("nope"),
        )
        .await;
    assert_eq!(st, 401);

    // RFC 7009 revocation with the token itself.
    let (_, v) = s.exchange(&key, &id, "orders-db", "read", &[]).await;
    let t3 = v["access_token"].as_str().unwrap_or_default().to_owned();
    let (st, _) = s
        .send(
            s.http
                .post(format!("{}/oauth/revoke", s.url))
                .form(&[("token", t3.as_str())]),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(s.introspect(&t3).await["active"], false);
    let (st, _) = s
        .send(
            s.http
                .post(format!("{}/oauth/revoke", s.url))
                .form(&[("token", "garbage")]),
        )
        .await;
    assert_eq!(st, 200, "RFC 7009: invalid tokens answer 200");

    // Renewal: re-decided, capped by the maximum lifetime (1h in dev config).
    let (_, v) = s
        .exchange(&key, &id, "orders-db", "read", &[("expires_in", "900")])
        .await;
    let (t4, g4) = (
        v["access_token"].as_str().unwrap_or_default().to_owned(),
        v["grant_id"].as_str().unwrap_or_default().to_owned(),
    );
    let mut token = t4;
    for _ in 0..4 {
        s.clock.advance_secs(800);
        let (st, r) = s.workload_call(&key, &token, &g4, "renew").await;
        assert_eq!(st, 200, "{r}");
        token = r["access_token"].as_str().unwrap_or_default().to_owned();
    }
    // 3200 s in: only 400 s of lifetime remain.
    let i = s.introspect(&token).await;
    assert_eq!(
        i["exp"].as_i64().unwrap_or(0) - i["iat"].as_i64().unwrap_or(0),
        400,
        "{i}"
    );
    s.clock.advance_secs(350);
    let (st, r) = s.workload_call(&key, &token, &g4, "renew").await;
    assert_eq!(st, 409, "maximum lifetime reached: {r}");
    s.audit_ok().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_expires_grants() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let (_, v) = s
        .exchange(
            &key,
            &s.identity(CI),
            "orders-db",
            "read",
            &[("expires_in", "60")],
        )
        .await;
    let token = v["access_token"].as_str().unwrap_or_default().to_owned();
    let grant = v["grant_id"].as_str().unwrap_or_default().to_owned();
    s.clock.advance_secs(61);
    let mut state = String::new();
    for _ in 0..40 {
        let (_, g) = s
            .send(
                s.http
                    .get(format!("{}/v1/grants/{grant}", s.url))
                    .bearer_auth(&s.admin),
            )
            .await;
        state = g["state"].as_str().unwrap_or("").to_owned();
        if state == "expired" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "expired");
    assert_eq!(s.introspect(&token).await["active"], false);
    let (_, g) = s
        .send(
            s.http
                .get(format!("{}/v1/grants/{grant}", s.url))
                .bearer_auth(&s.admin),
        )
        .await;
    let kinds: Vec<&str> = g["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        vec!["access.decided", "grant.issued", "grant.expired"]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_audit_survive_a_restart() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let (_, v) = s
        .exchange(&key, &s.identity(CI), "orders-db", "read", &[])
        .await;
    let token = v["access_token"].as_str().unwrap_or_default().to_owned();
    let before = s.audit_ok().await;
    // Same data folder, same address: the issuer URL (and so `iss`) is unchanged.
    let (dir, clock, addr) = s.stop().await;
    let s = start_in(dir, clock, &addr).await;
    assert_eq!(
        s.introspect(&token).await["active"],
        true,
        "same key, same grant after restart"
    );
    let after = s.audit_ok().await;
    assert_eq!(before["entries"], after["entries"]);
    let (st, _) = s
        .exchange(&key, &s.identity(CI), "orders-db", "read", &[])
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        s.audit_ok().await["entries"],
        before["entries"].as_u64().unwrap_or(0) + 2
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_store_fails_closed() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let id = s.identity(CI);
    let (st, _) = s.exchange(&key, &id, "orders-db", "read", &[]).await;
    assert_eq!(st, 200);
    // Another process takes the database's write lock and holds it.
    let db = s.dir.join("lapse.db");
    let c = rusqlite::Connection::open(&db).unwrap_or_else(|e| panic!("{e}"));
    c.execute_batch("BEGIN EXCLUSIVE; DELETE FROM lapse_migrations WHERE version < 0;")
        .unwrap_or_else(|e| panic!("{e}"));
    let (st, v) = s.exchange(&key, &id, "orders-db", "read", &[]).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (503, Some("temporarily_unavailable")),
        "{v}"
    );
    let (st, r) = s.send(s.http.get(format!("{}/readyz", s.url))).await;
    assert_eq!(st, 503, "{r}");
    c.execute_batch("ROLLBACK")
        .unwrap_or_else(|e| panic!("{e}"));
    drop(c);
    let (_, g) = s
        .send(
            s.http
                .get(format!("{}/v1/grants", s.url))
                .bearer_auth(&s.admin),
        )
        .await;
    assert_eq!(
        g["grants"].as_array().map(Vec::len),
        Some(1),
        "nothing half-written"
    );
    let (st, _) = s.send(s.http.get(format!("{}/readyz", s.url))).await;
    assert_eq!(st, 200);
    s.audit_ok().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_reload_and_bad_edits_keep_the_last_good_set() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let agent = "spiffe://dev.lapse.local/agent/support-bot";
    let (st, _) = s
        .exchange(&key, &s.identity(agent), "orders-db", "read", &[])
        .await;
    assert_eq!(st, 403);
    let pol = s.dir.join("policies");
    std::fs::write(
        pol.join("broken.cedar"),
        "permit (principal, action resource);",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (st, _) = s
        .exchange(&key, &s.identity(CI), "orders-db", "read", &[])
        .await;
    assert_eq!(st, 200, "the last good set still decides");
    std::fs::write(
        pol.join("broken.cedar"),
        "@id(\"agent-reads-orders\")\n@max_ttl(\"2m\")\npermit (principal == Workload::\"spiffe://dev.lapse.local/agent/support-bot\", action == Action::\"read\", resource == Resource::\"orders-db\");",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut st = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (code, v) = s
            .exchange(&key, &s.identity(agent), "orders-db", "read", &[])
            .await;
        st = code;
        if code == 200 {
            assert_eq!(v["expires_in"], 120);
            break;
        }
    }
    assert_eq!(st, 200, "a good edit takes effect without restart");
    let (_, m) = (
        0,
        reqwest::get(format!("{}/metrics", s.url))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .text()
            .await
            .unwrap_or_default(),
    );
    assert!(m.contains("lapse_policy_reload_failures_total 1"), "{m}");
    assert!(
        m.contains("lapse_decisions_total{outcome=\"allow\"}"),
        "{m}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_names_only_routed_paths() {
    let (_tmp, s) = start().await;
    let (_, doc) = s.send(s.http.get(format!("{}/openapi.json", s.url))).await;
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    assert!(paths.len() >= 15);
    for (path, ops) in paths {
        let concrete = path.replace("{id}", "gr_00000000000000000000000000000000");
        for method in ops
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let rb = match method.as_str() {
                "get" => s.http.get(format!("{}{concrete}", s.url)),
                _ => s.http.post(format!("{}{concrete}", s.url)),
            };
            let (st, v) = s.send(rb).await;
            assert!(
                st != 404 || v["error_description"] != "no such endpoint",
                "{method} {path} is documented but not routed"
            );
            assert!(st < 500 || path == "/readyz", "{method} {path}: {st}");
        }
    }
    let (_, meta) = s
        .send(
            s.http
                .get(format!("{}/.well-known/oauth-authorization-server", s.url)),
        )
        .await;
    assert_eq!(meta["issuer"], s.url);
    assert_eq!(meta["token_endpoint"], format!("{}/oauth/token", s.url));
    s.stop().await;
}

/// `GET /v1/grants` pages with a cursor: every grant once, newest first, the
/// last page says so, and a grant issued while paging does not shift the pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_listed_page_by_page_with_a_cursor() {
    let (_tmp, s) = start().await;
    let key = DpopKey::generate();
    let mut issued = Vec::new();
    for _ in 0..7 {
        let (st, v) = s
            .exchange(&key, &s.identity(CI), "orders-db", "read", &[])
            .await;
        assert_eq!(st, 200, "{v}");
        issued.push(v["grant_id"].as_str().unwrap().to_owned());
    }
    let get = |q: String| {
        let rb = s
            .http
            .get(format!("{}/v1/grants?{q}", s.url))
            .bearer_auth(&s.admin);
        s.send(rb)
    };
    let (st, all) = get("limit=100".into()).await;
    assert_eq!(st, 200, "{all}");
    assert_eq!(all["next"], Value::Null, "one page holds them: {all}");
    let newest_first: Vec<String> = all["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_owned())
        .collect();
    let mut expected = issued.clone();
    expected.reverse();
    assert_eq!(newest_first, expected);

    let mut paged = Vec::new();
    let mut pages = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let q = match &before {
            Some(c) => format!("limit=3&before={c}"),
            None => "limit=3".into(),
        };
        let (st, page) = get(q).await;
        assert_eq!(st, 200, "{page}");
        let ids: Vec<String> = page["grants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect();
        pages.push(ids.len());
        paged.extend(ids);
        if pages.len() == 1 {
            // Issued after the first page was read: newer than the cursor.
            let (st, v) = s
                .exchange(&key, &s.identity(CI), "orders-db", "read", &[])
                .await;
            assert_eq!(st, 200, "{v}");
        }
        match page["next"].as_str() {
            Some(c) => before = Some(c.to_owned()),
            None => break,
        }
        assert!(pages.len() < 10, "paging never ended: {pages:?}");
    }
    assert_eq!(pages, [3, 3, 1]);
    assert_eq!(paged, expected, "each grant once, in order");

    for bad in ["nonsense", "12.gr_zz", "1.2.3"] {
        let (st, v) = get(format!("before={bad}")).await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert_eq!(v["error"], "invalid_request", "{v}");
    }
}
