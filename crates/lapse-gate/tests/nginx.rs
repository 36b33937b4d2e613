#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! A real nginx (Debian's package; `.ci/run` installs it) in front of a small
//! upstream, asking `lapse gate` with `auth_request`, against a real broker.
//! A missing nginx fails the test; it is never skipped.

use lapse_core::{Clock, SystemClock};
use lapse_gate::config::GateConfig;
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{CI, broker};
use lapse_testkit::process::free_port;

/// The protected service: says who the gate let through.
async fn upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        axum::Json(json!({
            "workload": h("x-lapse-workload"),
            "task": h("x-lapse-task"),
            "action": h("x-lapse-action"),
            "authorization": h("authorization"),
        }))
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// Starts `lapse gate` in process from the example config, for the broker `b`,
/// clients addressing `external`; `adjust` edits the config text. Answers its port.
async fn start_gate(
    dir: &Path,
    b: &common::Broker,
    external: &str,
    adjust: impl FnOnce(String) -> String,
) -> u16 {
    let port = free_port();
    std::fs::write(dir.join("gate.token"), &b.admin).unwrap();
    let text = include_str!("../../../examples/gate/gate.toml")
        .replace("127.0.0.1:7900", &format!("127.0.0.1:{port}"))
        .replace("http://127.0.0.1:7800", &b.url)
        .replace("http://127.0.0.1:8080", external)
        .replace(
            "file:/etc/lapse/gate.token",
            &format!("file:{}", dir.join("gate.token").display()),
        );
    let gate = lapse_gate::Gate::new(GateConfig::parse(&adjust(text)).unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(lapse_gate::serve(gate, listener, std::future::pending()));
    port
}

struct Nginx(Child);

impl Drop for Nginx {
    /// SIGTERM to the master, which takes its workers down with it (SIGKILL would
    /// leave them running); SIGKILL only if it does not go.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS for nginx's client-facing listener: certificate, key, and the bundle client
/// certificates are verified against (`ssl_verify_client optional`).
struct NginxTls<'a> {
    cert: &'a Path,
    key: &'a Path,
    client_ca: &'a Path,
}

fn nginx(dir: &Path, port: u16, gate: u16, upstream: u16) -> Nginx {
    nginx_with(dir, port, gate, upstream, None)
}

fn nginx_with(dir: &Path, port: u16, gate: u16, upstream: u16, tls: Option<NginxTls<'_>>) -> Nginx {
    let bin = std::env::var("LAPSE_NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let template = include_str!("../../../examples/gate/nginx.conf");
    let conf = template
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:7900", &format!("127.0.0.1:{gate}"))
        .replace("127.0.0.1:9000", &format!("127.0.0.1:{upstream}"));
    let conf = match tls {
        None => conf,
        Some(t) => conf.replace(
            &format!("listen 127.0.0.1:{port};"),
            &format!(
                "listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    \
                 ssl_client_certificate {};\n    ssl_verify_client optional;",
                t.cert.display(),
                t.key.display(),
                t.client_ca.display()
            ),
        ),
    };
    let d = dir.display();
    let conf = format!(
        "{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{conf}\n}}\n",
        user = if root { "user root;\n" } else { "" },
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(&bin)
        .args(["-p", &d.to_string(), "-c", &path.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start `{bin}` ({e}); the gate tests need a real nginx: `apt-get install nginx`")
        });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not listen: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Nginx(child)
}

fn now() -> i64 {
    SystemClock.now().unix_seconds()
}

struct Call {
    status: u16,
    www: String,
    retry_after: String,
    body: Value,
}

/// `method url` through nginx with the token and a proof (or the proof given).
async fn call(method: &str, url: &str, token: &str, proof: Option<&str>) -> Call {
    let http = reqwest::Client::new();
    let mut rb = http
        .request(method.parse().unwrap(), url)
        .header("Authorization", format!("DPoP {token}"));
    if let Some(p) = proof {
        rb = rb.header("DPoP", p);
    }
    let r = rb.send().await.unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    Call {
        status: r.status().as_u16(),
        www: header("www-authenticate"),
        retry_after: header("retry-after"),
        body: r.json().await.unwrap_or(Value::Null),
    }
}

fn proof(key: &DpopKey, method: &str, url: &str, token: &str) -> String {
    key.proof(method, url, Some(token), now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_through_lapse_gate() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = broker(|_, _| {}).await;
    let up = upstream().await;
    let web = free_port();
    let gate_port = start_gate(tmp.path(), &b, &format!("http://127.0.0.1:{web}"), |t| {
        t.replace("staleness = \"5s\"", "staleness = \"2s\"")
    })
    .await;
    let _nginx = nginx(&tmp.path().join("nginx"), web, gate_port, up);
    let url = format!("http://127.0.0.1:{web}/orders/7");

    // A valid DPoP-bound token for `read` on orders-db passes, and the upstream
    // learns who came (but never sees the token).
    let key = DpopKey::generate();
    let (t, gid) = b.token(&key, CI, "orders-db", "read", "T-gate").await;
    let ok = call("GET", &url, &t, Some(&proof(&key, "GET", &url, &t))).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body["workload"], CI);
    assert_eq!(ok.body["task"], "T-gate");
    assert_eq!(ok.body["authorization"], "", "no token passthrough");
    assert_eq!(ok.body["action"], "read");

    // Headers a client sends cannot choose the action or speak for the gate.
    let http = reqwest::Client::new();
    let spoof = http
        .get(&url)
        .header("Authorization", format!("DPoP {t}"))
        .header("DPoP", proof(&key, "GET", &url, &t))
        .header("X-Lapse-Action", "write")
        .header("X-Lapse-Workload", "spiffe://evil")
        .send()
        .await
        .unwrap();
    let body: Value = spoof.json().await.unwrap();
    assert_eq!(
        (body["action"].as_str(), body["workload"].as_str()),
        (Some("read"), Some(CI))
    );
    let post = http
        .post(&url)
        .header("Authorization", format!("DPoP {t}"))
        .header("DPoP", proof(&key, "POST", &url, &t))
        .header("X-Original-Method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(
        post.status(),
        403,
        "a POST posing as a GET is still a POST (needs write)"
    );
    // A percent-encoded path the upstream would decode to another one.
    let encoded = format!("http://127.0.0.1:{web}/orders/%61dmin");
    assert_eq!(
        call("GET", &encoded, &t, Some(&proof(&key, "GET", &encoded, &t)))
            .await
            .status,
        403
    );

    // Without its proof; with a replayed proof; with a proof for another URL.
    let c = call("GET", &url, &t, None).await;
    assert_eq!(c.status, 401);
    assert!(c.www.contains("invalid_dpop_proof"), "{}", c.www);
    let p = proof(&key, "GET", &url, &t);
    assert_eq!(call("GET", &url, &t, Some(&p)).await.status, 200);
    let c = call("GET", &url, &t, Some(&p)).await;
    assert_eq!(c.status, 401, "a replayed proof");
    assert!(c.www.contains("already used"), "{}", c.www);
    let other = format!("http://127.0.0.1:{web}/orders/8");
    assert_eq!(
        call("GET", &url, &t, Some(&proof(&key, "GET", &other, &t)))
            .await
            .status,
        401
    );
    // A stolen token with the thief's own key.
    let thief = DpopKey::generate();
    assert_eq!(
        call("GET", &url, &t, Some(&proof(&thief, "GET", &url, &t)))
            .await
            .status,
        401
    );
    // An action the token does not carry (POST needs `write`).
    let c = call("POST", &url, &t, Some(&proof(&key, "POST", &url, &t))).await;
    assert_eq!(c.status, 403);
    assert!(c.www.contains("insufficient_scope"), "{}", c.www);
    // A path no rule maps.
    let admin = format!("http://127.0.0.1:{web}/admin");
    assert_eq!(
        call("GET", &admin, &t, Some(&proof(&key, "GET", &admin, &t)))
            .await
            .status,
        403
    );
    // A token for another audience.
    let agent_key = DpopKey::generate();
    let (other_aud, _) = b
        .token(
            &agent_key,
            "spiffe://dev.lapse.local/agent/support-bot",
            "tickets-api",
            "read",
            "T-9",
        )
        .await;
    let c = call(
        "GET",
        &url,
        &other_aud,
        Some(&proof(&agent_key, "GET", &url, &other_aud)),
    )
    .await;
    assert_eq!(c.status, 403, "another audience");

    // Revoked at the broker: refused on the next request, well within the bound.
    let revoked_at = Instant::now();
    let st = http
        .post(format!("{}/v1/grants/{gid}/revoke", b.url))
        .bearer_auth(&b.admin)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 200);
    loop {
        let c = call("GET", &url, &t, Some(&proof(&key, "GET", &url, &t))).await;
        if c.status == 401 {
            assert!(c.www.contains("grant has ended"), "{}", c.www);
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "still honoured after revoke"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("revoke → refused at the gate in {:?}", revoked_at.elapsed());

    // The feed is cut (the broker goes away): fail closed after the staleness bound.
    let key2 = DpopKey::generate();
    let (t2, _) = b.token(&key2, CI, "orders-db", "read", "T-gate").await;
    assert_eq!(
        call("GET", &url, &t2, Some(&proof(&key2, "GET", &url, &t2)))
            .await
            .status,
        200
    );
    let _ = b.stop.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(5), &mut b.task)
        .await
        .expect("the broker shuts down with feed streams open")
        .unwrap();
    let cut = Instant::now();
    loop {
        let c = call("GET", &url, &t2, Some(&proof(&key2, "GET", &url, &t2))).await;
        if c.status != 200 {
            // The gate's 503 reaches the client as a 503 with Retry-After (nginx's
            // auth_request alone would make it a 500).
            assert_eq!(c.status, 503, "{:?}", c.body);
            assert_eq!(c.retry_after, "2");
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(4),
            "still allowed with the feed cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cut.elapsed() >= Duration::from_millis(1500),
        "not before the bound: {:?}",
        cut.elapsed()
    );
}

/// RFC 8705 through nginx: a workload that authenticated to the broker with its
/// X.509-SVID gets a token bound to that certificate; nginx verifies the client
/// certificate and hands it to the gate, which lets the token through only with
/// that very certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_bound_token_passes_nginx_only_with_its_certificate() {
    use lapse_testkit::pki::{ca, client, server_leaf, svid_leaf};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (server_ca, workloads) = (ca("servers"), ca("dev trust domain"));
    std::fs::write(dir.join("servers.pem"), &server_ca.pem).unwrap();
    std::fs::write(dir.join("workloads.pem"), &workloads.pem).unwrap();
    let (bcert, bkey) = server_leaf(&server_ca).write(dir, "broker");
    let (ncert, nkey) = server_leaf(&server_ca).write(dir, "nginx");
    // The gate fetches the broker's keys and feed over HTTPS from the private CA.
    lapse_identity::trust_ca_file(&dir.join("servers.pem")).unwrap();
    let bundle = dir.join("workloads.pem");
    let b = broker(|cfg, _| {
        cfg.tls = Some(lapse_tls::TlsConfig {
            cert: bcert.clone(),
            key: bkey.clone(),
            client_ca: Some(bundle.clone()),
            require_client_cert: false,
        });
    })
    .await;
    assert!(b.url.starts_with("https://"), "{}", b.url);

    let up = upstream().await;
    let web = free_port();
    let gate_port = start_gate(dir, &b, &format!("https://127.0.0.1:{web}"), |t| t).await;
    let _nginx = nginx_with(
        &dir.join("nginx"),
        web,
        gate_port,
        up,
        Some(NginxTls {
            cert: &ncert,
            key: &nkey,
            client_ca: &bundle,
        }),
    );

    // The workload's SVID is its identity at the broker: no identity token.
    let svid = svid_leaf(&workloads, CI);
    let mtls = client(&server_ca, Some(&svid));
    let key = DpopKey::generate();
    let token_url = format!("{}/oauth/token", b.url);
    let v: Value = mtls
        .post(&token_url)
        .header("DPoP", key.proof("POST", &token_url, None, now()))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("audience", "orders-db"),
            ("scope", "read"),
            ("task", "T-mtls"),
            ("purpose", "certificate-bound through nginx"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = v["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned();

    let url = format!("https://127.0.0.1:{web}/orders/7");
    let send = |http: reqwest::Client, extra: Option<String>| {
        let (t, url, p) = (t.clone(), url.clone(), proof(&key, "GET", &url, &t));
        async move {
            let mut rb = http
                .get(&url)
                .header("Authorization", format!("DPoP {t}"))
                .header("DPoP", p);
            if let Some(pem) = extra {
                rb = rb.header("X-Client-Cert", pem);
            }
            let r = rb.send().await.unwrap();
            let www = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (r.status().as_u16(), www)
        }
    };
    // With its certificate: through.
    let (st, www) = send(mtls.clone(), None).await;
    assert_eq!(st, 200, "{www}");
    // Another certificate for the same SPIFFE ID (a clone of the workload): refused.
    let twin = client(&server_ca, Some(&svid_leaf(&workloads, CI)));
    let (st, www) = send(twin, None).await;
    assert_eq!(st, 401, "{www}");
    assert!(www.contains("another client certificate"), "{www}");
    // No certificate, even with the right one's PEM in a header of its own: nginx
    // overwrites the header, so the claim never reaches the gate.
    let escaped: String =
        percent_encoding::utf8_percent_encode(&svid.cert, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let (st, www) = send(client(&server_ca, None), Some(escaped)).await;
    assert_eq!(st, 401, "{www}");
    assert!(www.contains("came without one"), "{www}");
}
