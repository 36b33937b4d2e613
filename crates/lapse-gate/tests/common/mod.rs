#![allow(
    dead_code,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! A real broker for the gate tests (dev config, real clock, on loopback) and a
//! workload that exchanges dev identity tokens with it.

use lapse_broker::config::Config;
use lapse_core::{Clock, SystemClock};
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

pub struct Broker {
    pub url: String,
    /// The dev folder (keys, policies).
    pub dir: PathBuf,
    pub admin: String,
    pub http: reqwest::Client,
    /// Stops the server (its feed streams end with it).
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

/// Starts a broker in the dev configuration; `adjust` may change its config and
/// dev folder (policies) first.
pub async fn broker(adjust: impl FnOnce(&mut Config, &Path)) -> Broker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    broker_on(listener, adjust).await
}

/// As [`broker`], listening on `listener` (an address a gate was told of before).
pub async fn broker_on(
    listener: tokio::net::TcpListener,
    adjust: impl FnOnce(&mut Config, &Path),
) -> Broker {
    let tmp = tempfile::tempdir().unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tmp.path().join("broker");
    let (mut cfg, _, admin) = dev::prepare(&dir, addr).unwrap();
    adjust(&mut cfg, &dir);
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let lapse = lapse_server::build(cfg, Arc::new(SystemClock))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = lapse_server::serve(lapse, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    Broker {
        url: format!("{scheme}://{addr}"),
        dir: dir.canonicalize().unwrap(),
        admin,
        http: reqwest::Client::new(),
        stop: Some(tx),
        task,
        _tmp: tmp,
    }
}

/// An operator account with one role and the token `token-of-NAME`.
pub fn operator(
    name: &str,
    role: lapse_broker::config::Role,
    audiences: &[&str],
) -> lapse_broker::config::OperatorEntry {
    lapse_broker::config::OperatorEntry {
        name: name.into(),
        token_sha256: Some(hex::encode(lapse_broker::broker::hash_secret(&format!(
            "token-of-{name}"
        )))),
        password_argon2: None,
        roles: vec![role],
        groups: vec![],
        audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
    }
}

impl Broker {
    /// `workload` exchanges a fresh dev identity token for `scope` on `audience`,
    /// for `task`, with a proof from `key`; answers the token endpoint's JSON.
    pub async fn exchange(
        &self,
        key: &DpopKey,
        workload: &str,
        audience: &str,
        scope: &str,
        task: &str,
    ) -> Value {
        let now = SystemClock.now().unix_seconds();
        let url = format!("{}/oauth/token", self.url);
        let identity = dev::dev_token(&self.dir, workload, 600, &[], now).unwrap();
        self.http
            .post(&url)
            .header("DPoP", key.proof("POST", &url, None, now))
            .form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", identity.as_str()),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("audience", audience),
                ("scope", scope),
                ("task", task),
                ("purpose", "gate test"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// As [`Broker::exchange`], for an issued grant: its token and grant id.
    pub async fn token(
        &self,
        key: &DpopKey,
        workload: &str,
        audience: &str,
        scope: &str,
        task: &str,
    ) -> (String, String) {
        let v = self.exchange(key, workload, audience, scope, task).await;
        (
            v["access_token"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}"))
                .to_owned(),
            v["grant_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Revokes grant `id` as the admin.
    pub async fn revoke(&self, id: &str) {
        let st = self
            .http
            .post(format!("{}/v1/grants/{id}/revoke", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, 200);
    }
}
