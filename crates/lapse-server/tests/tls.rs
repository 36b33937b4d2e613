#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! TLS and mTLS with real certificates made here (rcgen): HTTPS handshakes, the
//! certificate reloaded when its files change, X.509-SVIDs as the identity of a
//! token exchange, RFC 8705 certificate-bound tokens, and refusals (untrusted
//! client certificate, a certificate that is not an SVID, a bound token without its
//! certificate).

use lapse_core::{Clock, SystemClock};
use lapse_server::dev;
use lapse_testkit::pki::{Ca, ca, client, leaf, server_leaf, svid_leaf};
use lapse_tls::TlsConfig;
use lapse_token::{DpopKey, Jwk, PublicKey};
use rcgen::{ExtendedKeyUsagePurpose, SanType};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SVID: &str = "spiffe://dev.lapse.local/ci/deploy";

struct Broker {
    url: String,
    dir: std::path::PathBuf,
    admin: String,
    tmp: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

async fn broker(server_ca: &Ca, bundle: &Ca, require_client_cert: bool) -> Broker {
    let tmp = tempfile::tempdir().unwrap();
    server_leaf(server_ca).write(tmp.path(), "server");
    std::fs::write(tmp.path().join("bundle.pem"), &bundle.pem).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tmp.path().join("data");
    let (mut cfg, _, admin) = dev::prepare(&dir, addr).unwrap();
    cfg.tls = Some(TlsConfig {
        cert: tmp.path().join("server.pem"),
        key: tmp.path().join("server.key"),
        client_ca: Some(tmp.path().join("bundle.pem")),
        require_client_cert,
    });
    assert_eq!(cfg.public_url(), format!("https://{addr}"));
    let lapse = lapse_server::build(cfg, Arc::new(SystemClock))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = lapse_server::serve(lapse, listener, std::future::pending()).await;
    });
    Broker {
        url: format!("https://{addr}"),
        dir,
        admin,
        tmp,
        _task: task,
    }
}

impl Broker {
    fn now(&self) -> i64 {
        SystemClock.now().unix_seconds()
    }

    /// A token exchange over `http`: with a dev identity token, or (`None`) with
    /// the connection's client certificate as the subject.
    async fn exchange(
        &self,
        http: &reqwest::Client,
        key: &DpopKey,
        identity: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}/oauth/token", self.url);
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("audience", "orders-db"),
            ("scope", "read"),
            ("task", "T-tls"),
            ("purpose", "tls test"),
        ];
        if let Some(t) = identity {
            form.push(("subject_token", t));
            form.push(("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"));
        }
        let r = http
            .post(&url)
            .header("DPoP", key.proof("POST", &url, None, self.now()))
            .form(&form)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn renew(
        &self,
        http: &reqwest::Client,
        key: &DpopKey,
        token: &str,
        id: &str,
    ) -> (u16, Value) {
        let url = format!("{}/v1/grants/{id}/renew", self.url);
        let r = http
            .post(&url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", key.proof("POST", &url, Some(token), self.now()))
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

fn verify(token: &str, jwks: &Value, issuer: &str) -> lapse_token::AccessClaims {
    let keys: Vec<Jwk> = serde_json::from_value(jwks["keys"].clone()).unwrap();
    let keys: Vec<(String, PublicKey)> = keys
        .iter()
        .map(|j| (j.kid.clone().unwrap(), PublicKey::from_jwk(j).unwrap()))
        .collect();
    lapse_token::access::verify(
        token,
        |k| keys.iter().find(|(kid, _)| kid == k).map(|(_, p)| p),
        issuer,
        SystemClock.now().unix_seconds(),
    )
    .unwrap()
}

#[tokio::test]
async fn https_serves_the_token_endpoint_and_plain_http_gets_nothing() {
    let (server_ca, bundle) = (ca("server ca"), ca("trust domain"));
    let b = broker(&server_ca, &bundle, false).await;
    let http = client(&server_ca, None);
    let identity = dev::dev_token(&b.dir, SVID, 600, &[], b.now()).unwrap();
    let (st, v) = b
        .exchange(&http, &DpopKey::generate(), Some(&identity))
        .await;
    assert_eq!(st, 200, "{v}");
    let jwks: Value = http
        .get(format!("{}/.well-known/jwks.json", b.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let claims = verify(v["access_token"].as_str().unwrap(), &jwks, &b.url);
    assert_eq!(claims.cnf.x5t_s256, None, "no client certificate, no x5t");
    // Plain HTTP on the TLS port is not answered as HTTP.
    let plain = lapse_identity::http_client()
        .get(format!("{}/healthz", b.url.replace("https://", "http://")))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // A client that does not trust the server's CA is refused by its own side.
    let other = client(&ca("someone else"), None);
    assert!(
        other
            .get(format!("{}/healthz", b.url))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_x509_svid_is_the_identity_and_tokens_are_bound_to_its_certificate() {
    let (server_ca, bundle) = (ca("server ca"), ca("trust domain"));
    let b = broker(&server_ca, &bundle, false).await;
    let svid = svid_leaf(&bundle, SVID);
    let mtls = client(&server_ca, Some(&svid));
    let key = DpopKey::generate();
    let (st, v) = b.exchange(&mtls, &key, None).await;
    assert_eq!(st, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_owned();
    let id = v["grant_id"].as_str().unwrap().to_owned();
    let jwks: Value = mtls
        .get(format!("{}/.well-known/jwks.json", b.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let claims = verify(&token, &jwks, &b.url);
    assert_eq!(claims.sub, SVID);
    assert_eq!(claims.cnf.jkt, key.jkt());
    assert_eq!(
        claims.cnf.x5t_s256.as_deref(),
        Some(svid.thumbprint().as_str())
    );
    // Introspection reports the binding.
    let intro: Value = mtls
        .post(format!("{}/oauth/introspect", b.url))
        .bearer_auth(&b.admin)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(intro["active"], true, "{intro}");
    assert_eq!(
        intro["cnf"]["x5t#S256"],
        svid.thumbprint().as_str(),
        "{intro}"
    );
    // The bound token with its key but without its certificate is refused ...
    let (st, v) = b.renew(&client(&server_ca, None), &key, &token, &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("invalid_token")),
        "{v}"
    );
    // ... and with another trusted certificate too.
    let other = svid_leaf(&bundle, SVID);
    let (st, _) = b
        .renew(&client(&server_ca, Some(&other)), &key, &token, &id)
        .await;
    assert_eq!(st, 401);
    // With its certificate it renews, and stays bound.
    let (st, v) = b.renew(&mtls, &key, &token, &id).await;
    assert_eq!(st, 200, "{v}");
    let renewed = verify(v["access_token"].as_str().unwrap(), &jwks, &b.url);
    assert_eq!(renewed.cnf.x5t_s256, claims.cnf.x5t_s256);
}

#[tokio::test]
async fn client_certificates_that_do_not_qualify_are_refused() {
    let (server_ca, bundle) = (ca("server ca"), ca("trust domain"));
    let b = broker(&server_ca, &bundle, false).await;
    let key = DpopKey::generate();
    // From a CA outside the trust bundle: the handshake fails.
    let stranger = svid_leaf(&ca("other domain"), SVID);
    assert!(
        client(&server_ca, Some(&stranger))
            .get(format!("{}/healthz", b.url))
            .send()
            .await
            .is_err()
    );
    // Trusted, but not an SVID (no SPIFFE URI): no identity.
    let not_svid = leaf(
        &bundle,
        vec![SanType::DnsName("ci.example".try_into().unwrap())],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (st, v) = b
        .exchange(&client(&server_ca, Some(&not_svid)), &key, None)
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
    assert!(
        v["error_description"].as_str().unwrap().contains("URI SAN"),
        "{v}"
    );
    let (st, v) = b
        .exchange(
            &client(
                &server_ca,
                Some(&svid_leaf(&bundle, "https://not-spiffe.example/x")),
            ),
            &key,
            None,
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
    // No certificate and no subject token.
    let (st, v) = b.exchange(&client(&server_ca, None), &key, None).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
}

#[tokio::test]
async fn required_client_certificates_are_enforced_at_the_handshake() {
    let (server_ca, bundle) = (ca("server ca"), ca("trust domain"));
    let b = broker(&server_ca, &bundle, true).await;
    assert!(
        client(&server_ca, None)
            .get(format!("{}/healthz", b.url))
            .send()
            .await
            .is_err()
    );
    let svid = svid_leaf(&bundle, SVID);
    let r = client(&server_ca, Some(&svid))
        .get(format!("{}/healthz", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let (server_ca, bundle) = (ca("server ca"), ca("trust domain"));
    let b = broker(&server_ca, &bundle, false).await;
    let next_ca = ca("next server ca");
    let healthz = format!("{}/healthz", b.url);
    assert!(client(&next_ca, None).get(&healthz).send().await.is_err());
    let next = server_leaf(&next_ca);
    write_atomically(&b.tmp.path().join("server.key"), &next.key);
    write_atomically(&b.tmp.path().join("server.pem"), &next.cert);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = client(&next_ca, None).get(&healthz).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Clients trusting only the old CA now fail: the old certificate is gone.
    assert!(client(&server_ca, None).get(&healthz).send().await.is_err());
    // A broken replacement is refused and the current certificate stays.
    std::fs::write(b.tmp.path().join("server.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = client(&next_ca, None).get(&healthz).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
