#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! `lapse gate` as a service, against a real broker over loopback: it starts with
//! its broker down (closed, 503) and opens when the broker comes; stops on SIGTERM
//! with its last use report (a real process); says whether it can decide
//! (`/readyz`, `/metrics`); how old a proof may be is configured; a refused path
//! says why; a request without credentials gets a bare challenge.

use lapse_core::{Clock, SystemClock};
use lapse_gate::config::GateConfig;
use lapse_testkit::process::free_port;
use lapse_token::DpopKey;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use common::{Broker, CI, broker, broker_on, operator};

/// The orders gate's config for `broker` on `port`, with `extra` lines before the
/// rules; the gate's token is `token-of-orders-gate` in `dir`.
fn config_text(dir: &Path, broker: &str, port: u16, extra: &str) -> String {
    let token = dir.join("gate.token");
    std::fs::write(&token, "token-of-orders-gate").unwrap();
    format!(
        "listen = \"127.0.0.1:{port}\"\nbroker = \"{broker}\"\naudience = \"orders-db\"\n\
         token = \"file:{}\"\nexternal_url = \"http://orders.test\"\nstaleness = \"2s\"\n{extra}\n\
         [[rule]]\nmethod = \"GET\"\npath = \"/orders/*\"\naction = \"read\"\n",
        token.display()
    )
}

/// A broker that knows the orders gate's operator account.
async fn orders_broker(listener: Option<tokio::net::TcpListener>) -> Broker {
    let adjust = |cfg: &mut lapse_broker::config::Config, _: &Path| {
        cfg.operators.push(operator(
            "orders-gate",
            lapse_broker::config::Role::Gate,
            &["orders-db"],
        ));
    };
    match listener {
        Some(l) => broker_on(l, adjust).await,
        None => broker(adjust).await,
    }
}

/// Starts a gate in process from `text`; answers its port.
async fn start(text: &str) -> u16 {
    let cfg = GateConfig::parse(text).unwrap();
    let port = cfg.listen.port();
    let gate = lapse_gate::Gate::new(cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(lapse_gate::serve(gate, listener, std::future::pending()));
    port
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

/// nginx's `auth_request` for `GET uri` with the token and a proof for
/// `http://orders.test{uri}` made `age` seconds ago.
async fn check(port: u16, uri: &str, holder: Option<(&DpopKey, &str)>, age: i64) -> Answer {
    let mut rb = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/check"))
        .header("X-Original-Method", "GET")
        .header("X-Original-URI", uri)
        .header("X-Real-IP", "127.0.0.1");
    if let Some((key, token)) = holder {
        let url = format!("http://orders.test{uri}");
        let iat = SystemClock.now().unix_seconds() - age;
        rb = rb
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", key.proof("GET", &url, Some(token), iat));
    }
    let r = rb.send().await.unwrap();
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.json().await.unwrap_or(Value::Null),
    }
}

async fn get(port: u16, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits until `/readyz` answers `want`.
async fn until_ready(port: u16, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (st, body) = get(port, "/readyz").await;
        if st == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {st} ({body}), wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metric's value in `/metrics` text: the line that starts with `series `.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_whose_broker_is_down_starts_closed_and_opens_when_it_comes() {
    let tmp = tempfile::tempdir().unwrap();
    let broker_port = free_port();
    let broker_url = format!("http://127.0.0.1:{broker_port}");
    // Nothing listens at the broker's address when the gate starts.
    let port = start(&config_text(tmp.path(), &broker_url, free_port(), "")).await;

    // Closed: every request is 503 with a Retry-After, with or without a token.
    let c = check(port, "/orders/7", None, 0).await;
    assert_eq!(c.status, 503, "{:?}", c.body);
    assert_eq!(c.header("retry-after"), "2");
    assert!(
        c.body["error_description"]
            .as_str()
            .unwrap()
            .contains("no signing keys from the broker yet"),
        "{:?}",
        c.body
    );
    let c = check(port, "/admin", None, 0).await;
    assert_eq!(c.status, 503, "{:?}", c.body);

    // The broker comes: the gate fetches its keys, policies and feed by itself.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", broker_port))
        .await
        .unwrap();
    let b = orders_broker(Some(listener)).await;
    let came = Instant::now();
    let key = DpopKey::generate();
    let (token, _) = b.token(&key, CI, "orders-db", "read", "T-late").await;
    loop {
        let c = check(port, "/orders/7", Some((&key, &token)), 0).await;
        if c.status == 200 {
            break;
        }
        assert_eq!(
            c.status, 503,
            "only closed until it can decide: {:?}",
            c.body
        );
        assert!(
            came.elapsed() < Duration::from_secs(20),
            "still closed {:?} after the broker came: {:?}",
            came.elapsed(),
            c.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("open {:?} after the broker came", came.elapsed());
    assert_eq!(check(port, "/orders/7", None, 0).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics_say_whether_the_gate_can_decide() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = orders_broker(None).await;
    let port = start(&config_text(tmp.path(), &b.url, free_port(), "")).await;
    until_ready(port, 200, Duration::from_secs(10)).await;
    let (_, body) = get(port, "/readyz").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            v["ready"].as_bool(),
            v["keys"].as_bool(),
            v["policy"].as_bool()
        ),
        (Some(true), Some(true), Some(true)),
        "{v}"
    );
    assert_eq!(v["feed"], "fresh", "{v}");

    let key = DpopKey::generate();
    let (token, _) = b.token(&key, CI, "orders-db", "read", "T-metrics").await;
    for _ in 0..3 {
        assert_eq!(
            check(port, "/orders/7", Some((&key, &token)), 0)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        check(port, "/orders/7", Some((&DpopKey::generate(), &token)), 0)
            .await
            .status,
        401
    );
    assert_eq!(check(port, "/orders/7", None, 0).await.status, 401);
    let (st, text) = get(port, "/metrics").await;
    assert_eq!(st, 200);
    let m = |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(
        m(r#"lapse_gate_decisions_total{outcome="allow",code="none"}"#),
        3.0
    );
    assert_eq!(
        m(r#"lapse_gate_decisions_total{outcome="deny",code="invalid_dpop_proof"}"#),
        1.0
    );
    assert_eq!(
        m(r#"lapse_gate_decisions_total{outcome="deny",code="no_credentials"}"#),
        1.0
    );
    assert_eq!(m("lapse_gate_decision_duration_seconds_count"), 5.0);
    assert_eq!(m("lapse_gate_ready"), 1.0);
    assert_eq!(m("lapse_gate_feed_fresh"), 1.0);
    let heard = m("lapse_gate_feed_last_heard_timestamp_seconds");
    let now = SystemClock.now().unix_seconds() as f64;
    assert!(heard > now - 3.0 && heard <= now + 1.0, "{heard} vs {now}");

    // The broker goes away: past the staleness bound the gate is alive, not ready,
    // and refuses with 503.
    let _ = b.stop.take().unwrap().send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut b.task).await;
    until_ready(port, 503, Duration::from_secs(5)).await;
    let (_, body) = get(port, "/readyz").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["ready"].as_bool(), v["feed"].as_str()),
        (Some(false), Some("stale"))
    );
    assert_eq!(get(port, "/healthz").await.0, 200, "liveness stays");
    let c = check(port, "/orders/7", Some((&key, &token)), 0).await;
    assert_eq!(
        (c.status, c.header("retry-after")),
        (503, "2"),
        "{:?}",
        c.body
    );
    let (_, text) = get(port, "/metrics").await;
    assert_eq!(metric(&text, "lapse_gate_ready"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "lapse_gate_feed_fresh"), Some(0.0), "{text}");
    assert_eq!(
        metric(
            &text,
            r#"lapse_gate_decisions_total{outcome="unavailable",code="temporarily_unavailable"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn how_old_a_dpop_proof_may_be_is_configured_within_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let b = orders_broker(None).await;
    // Out of bounds, not a duration, or misspelt: refused.
    for (extra, why) in [
        ("dpop_max_age = \"4s\"", "between 5s and 300s"),
        ("dpop_max_age = \"6m\"", "between 5s and 300s"),
        ("dpop_max_age = \"soon\"", "invalid duration"),
        ("dpop_max_age = 30", "invalid type"),
        ("dpop_maxage = \"30s\"", "unknown field"),
    ] {
        let e = GateConfig::parse(&config_text(tmp.path(), &b.url, 1, extra)).unwrap_err();
        assert!(e.contains(why), "{extra}: {e}");
    }
    let short = start(&config_text(
        tmp.path(),
        &b.url,
        free_port(),
        "dpop_max_age = \"10s\"",
    ))
    .await;
    let default = start(&config_text(tmp.path(), &b.url, free_port(), "")).await;
    until_ready(short, 200, Duration::from_secs(10)).await;
    until_ready(default, 200, Duration::from_secs(10)).await;
    let key = DpopKey::generate();
    let (token, _) = b.token(&key, CI, "orders-db", "read", "T-age").await;
    // A proof made 30 s ago: too old for the 10 s gate, fine for the default 60 s.
    let c = check(short, "/orders/7", Some((&key, &token)), 30).await;
    assert_eq!(c.status, 401, "{:?}", c.body);
    assert!(
        c.header("www-authenticate").contains("invalid_dpop_proof"),
        "{}",
        c.header("www-authenticate")
    );
    assert_eq!(
        check(default, "/orders/7", Some((&key, &token)), 30)
            .await
            .status,
        200
    );
    // A fresh one passes both; one 8 s old passes the 10 s gate.
    assert_eq!(
        check(short, "/orders/7", Some((&key, &token)), 8)
            .await
            .status,
        200
    );
    assert_eq!(
        check(default, "/orders/7", Some((&key, &token)), 0)
            .await
            .status,
        200
    );
    assert_eq!(
        check(default, "/orders/7", Some((&key, &token)), 70)
            .await
            .status,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_path_says_why_and_unreserved_escapes_decode_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let b = orders_broker(None).await;
    let plain = start(&config_text(tmp.path(), &b.url, free_port(), "")).await;
    let decoding = start(&config_text(
        tmp.path(),
        &b.url,
        free_port(),
        "decode_unreserved = true",
    ))
    .await;
    until_ready(plain, 200, Duration::from_secs(10)).await;
    until_ready(decoding, 200, Duration::from_secs(10)).await;
    let key = DpopKey::generate();
    let (token, _) = b.token(&key, CI, "orders-db", "read", "T-paths").await;
    let holder = Some((&key, token.as_str()));

    // By default any encoding is refused, saying so (not "no rule maps this").
    let c = check(plain, "/orders/%37", holder, 0).await;
    assert_eq!(c.status, 403, "{:?}", c.body);
    assert_eq!(c.body["error"], "invalid_request", "{:?}", c.body);
    let why = c.body["error_description"].as_str().unwrap().to_owned();
    assert!(
        why.contains("percent-encoded (`%37`)") && why.contains("decode_unreserved"),
        "{why}"
    );
    assert!(
        c.header("www-authenticate").contains("percent-encoded"),
        "{}",
        c.header("www-authenticate")
    );
    // A path no rule maps still says that.
    let c = check(plain, "/admin", holder, 0).await;
    assert_eq!(c.status, 403);
    assert!(
        c.body["error_description"]
            .as_str()
            .unwrap()
            .contains("no rule maps"),
        "{:?}",
        c.body
    );
    let c = check(plain, "/orders/a;b", holder, 0).await;
    assert!(
        c.body["error_description"]
            .as_str()
            .unwrap()
            .contains("`;`"),
        "{:?}",
        c.body
    );

    // Opted in: unreserved characters decode (`%37` is `7`, `%7E` is `~`), and the
    // proof is for the URL as the client wrote it.
    assert_eq!(check(decoding, "/orders/%37", holder, 0).await.status, 200);
    assert_eq!(
        check(decoding, "/orders/%7Ealice", holder, 0).await.status,
        200
    );
    // `%2F`, `%25` and any other encoding never decode; decoded dots are dot segments.
    for (uri, says) in [
        ("/orders%2F7", "`%2F`, an encoding the gate never decodes"),
        ("/orders/%252F", "`%25`, an encoding the gate never decodes"),
        ("/orders/%20x", "`%20`, an encoding the gate never decodes"),
        ("/orders/%2e%2e/admin", "dot segment"),
        ("/orders/%zz", "`%zz`, which is not a percent-encoding"),
    ] {
        let c = check(decoding, uri, holder, 0).await;
        assert_eq!(c.status, 403, "{uri}: {:?}", c.body);
        let why = c.body["error_description"].as_str().unwrap();
        assert!(why.contains(says), "{uri}: {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_credentials_gets_a_challenge_without_an_error_code() {
    let tmp = tempfile::tempdir().unwrap();
    let b = orders_broker(None).await;
    let port = start(&config_text(tmp.path(), &b.url, free_port(), "")).await;
    until_ready(port, 200, Duration::from_secs(10)).await;
    // RFC 6750 section 3.1: no authentication information, no error code.
    let c = check(port, "/orders/7", None, 0).await;
    assert_eq!(c.status, 401, "{:?}", c.body);
    assert_eq!(
        c.header("www-authenticate"),
        "DPoP algs=\"EdDSA ES256 RS256\""
    );
    assert!(c.body.get("error").is_none(), "{:?}", c.body);
    // Credentials that fail still get their error code.
    let key = DpopKey::generate();
    let (token, _) = b.token(&key, CI, "orders-db", "read", "T-www").await;
    let c = check(port, "/orders/7", Some((&key, &format!("{token}x"))), 0).await;
    assert_eq!(c.status, 401);
    assert!(
        c.header("www-authenticate")
            .starts_with("DPoP error=\"invalid_token\""),
        "{}",
        c.header("www-authenticate")
    );
    let c = check(port, "/orders/7", Some((&DpopKey::generate(), &token)), 0).await;
    assert!(
        c.header("www-authenticate")
            .starts_with("DPoP error=\"invalid_dpop_proof\""),
        "{}",
        c.header("www-authenticate")
    );
}

/// The config file the SIGTERM test's gate process reads.
const CHILD_CONFIG: &str = "LAPSE_GATE_TEST_CONFIG";

/// Not a test of its own: the gate process of
/// `sigterm_stops_the_gate_gracefully_with_its_last_use_report`, which runs this
/// test binary again for it. Serves as `lapse gate` does, until SIGTERM or SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the gate process of the SIGTERM test, which starts it"]
async fn gate_process() {
    let Some(path) = std::env::var_os(CHILD_CONFIG) else {
        return;
    };
    let cfg = GateConfig::load(Path::new(&path)).unwrap();
    let listen = cfg.listen;
    let gate = lapse_gate::Gate::new(cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    lapse_gate::serve(gate, listener, lapse_gate::stop_signal())
        .await
        .unwrap();
    eprintln!("gate process stopped");
}

/// Stops the gate process if the test fails before it does.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_gate_gracefully_with_its_last_use_report() {
    use std::os::unix::process::ExitStatusExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let b = orders_broker(None).await;
    // Uses are reported only hourly: the one report this test sees is the last.
    let port = free_port();
    let path: PathBuf = tmp.path().join("gate.toml");
    std::fs::write(
        &path,
        config_text(tmp.path(), &b.url, port, "use_report = \"1h\""),
    )
    .unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "gate_process", "--ignored", "--nocapture"])
        .env(CHILD_CONFIG, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut gate = Process(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the gate process did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_ready(port, 200, Duration::from_secs(10)).await;

    let key = DpopKey::generate();
    let (token, grant) = b.token(&key, CI, "orders-db", "read", "T-term").await;
    assert_eq!(
        check(port, "/orders/7", Some((&key, &token)), 0)
            .await
            .status,
        200
    );
    let (broker_ref, grant) = (&b, grant.as_str());
    let last_used = || async move {
        let v: Value = broker_ref
            .http
            .get(format!("{}/v1/grants/{grant}", broker_ref.url))
            .bearer_auth(&broker_ref.admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["last_used_at"].as_i64()
    };
    assert_eq!(last_used().await, None, "no report before the gate stops");

    let st = std::process::Command::new("kill")
        .args(["-TERM", &gate.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = gate.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the gate did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "the gate should stop gracefully, not die of the signal: {status:?} (signal {:?})",
        status.signal()
    );
    assert!(
        last_used().await.is_some(),
        "the last use report reached the broker"
    );
}

/// A revoke answers with the feed position of its ending; once a gate's `/readyz`
/// reports that position, the very next call with the grant's token is refused —
/// every time, not only usually (the answer alone comes before gates hear of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_gate_reports_the_revokes_feed_position_the_next_call_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = orders_broker(None).await;
    let port = start(&config_text(tmp.path(), &b.url, free_port(), "")).await;
    until_ready(port, 200, Duration::from_secs(10)).await;
    for round in 0..20 {
        let key = DpopKey::generate();
        let (token, id) = b
            .token(&key, CI, "orders-db", "read", &format!("T-pos-{round}"))
            .await;
        assert_eq!(
            check(port, "/orders/7", Some((&key, &token)), 0)
                .await
                .status,
            200
        );
        let v: Value = b
            .http
            .post(format!("{}/v1/grants/{id}/revoke", b.url))
            .bearer_auth(&b.admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["state"], "revoked", "{v}");
        let at = v["feed_position"].as_u64().unwrap_or_else(|| panic!("{v}"));
        assert!(at >= 1, "{v}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, body) = get(port, "/readyz").await;
            let r: Value = serde_json::from_str(&body).unwrap();
            if r["feed_position"].as_u64().unwrap_or(0) >= at {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reached {at}: {r}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let c = check(port, "/orders/7", Some((&key, &token)), 0).await;
        assert_eq!(c.status, 401, "round {round}: {:?}", c.body);
    }
}

/// With `dpop_nonce`, a gate takes only proofs carrying a nonce it issued: a client
/// without one is told `use_dpop_nonce` and given one, and a proof accepted by one
/// replica is refused by another (without nonces that replay passes once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dpop_nonces_a_proof_for_one_replica_is_refused_by_another() {
    let tmp = tempfile::tempdir().unwrap();
    let b = orders_broker(None).await;
    let with = |port| config_text(tmp.path(), &b.url, port, "dpop_nonce = true");
    let (a, c) = (
        start(&with(free_port())).await,
        start(&with(free_port())).await,
    );
    let plain = start(&config_text(tmp.path(), &b.url, free_port(), "")).await;
    for port in [a, c, plain] {
        until_ready(port, 200, Duration::from_secs(10)).await;
    }
    let key = DpopKey::generate();
    let (token, _) = b.token(&key, CI, "orders-db", "read", "T-nonce").await;
    let send = |port: u16, proof: String| {
        let token = token.clone();
        async move {
            let r = reqwest::Client::new()
                .get(format!("http://127.0.0.1:{port}/check"))
                .header("X-Original-Method", "GET")
                .header("X-Original-URI", "/orders/7")
                .header("X-Real-IP", "127.0.0.1")
                .header("Authorization", format!("DPoP {token}"))
                .header("DPoP", proof)
                .send()
                .await
                .unwrap();
            Answer {
                status: r.status().as_u16(),
                headers: r.headers().clone(),
                body: r.json().await.unwrap_or(Value::Null),
            }
        }
    };
    let url = "http://orders.test/orders/7";
    let now = || SystemClock.now().unix_seconds();

    // No nonce: refused, with one to use.
    let first = send(a, key.proof("GET", url, Some(&token), now())).await;
    assert_eq!(first.status, 401, "{:?}", first.body);
    assert!(
        first
            .header("www-authenticate")
            .contains("error=\"use_dpop_nonce\""),
        "{}",
        first.header("www-authenticate")
    );
    let nonce = first.header("dpop-nonce").to_owned();
    assert!(!nonce.is_empty(), "a nonce comes with the refusal");
    // With it: allowed, and the answer carries the next nonce.
    let proof = key.proof_with_nonce("GET", url, Some(&token), now(), Some(&nonce));
    let ok = send(a, proof.clone()).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert!(!ok.header("dpop-nonce").is_empty());
    // The same proof at the other replica: another gate's nonce, refused.
    let replayed = send(c, proof.clone()).await;
    assert_eq!(replayed.status, 401, "{:?}", replayed.body);
    assert_eq!(
        replayed.body["error"], "use_dpop_nonce",
        "{:?}",
        replayed.body
    );
    // ...and at the first again: spent.
    assert_eq!(send(a, proof).await.status, 401);
    // Without nonces, a proof accepted by one gate passes once at another: the
    // window `dpop_nonce` closes.
    let proof = key.proof("GET", url, Some(&token), now());
    assert_eq!(send(plain, proof.clone()).await.status, 200);
    let other = start(&config_text(tmp.path(), &b.url, free_port(), "")).await;
    until_ready(other, 200, Duration::from_secs(10)).await;
    assert_eq!(send(other, proof).await.status, 200);
}
