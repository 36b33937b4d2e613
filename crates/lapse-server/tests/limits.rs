#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Abuse limits over real HTTP: per-source and per-workload rates on the token
//! endpoint (429 `slow_down` with `Retry-After`), the cap on a workload's pending
//! requests, sign-in attempts per source, header limits (431), and slow clients.

mod common;

use common::{CI, ONCALL, start_with};
use lapse_broker::limits::Rate;
use lapse_token::DpopKey;
use serde_json::Value;

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers()))
}

/// An exchange for `workload` sent from `local` (a loopback address of its own).
async fn exchange_from(
    s: &common::Server,
    local: [u8; 4],
    workload: &str,
) -> (u16, Option<u64>, Value) {
    let http = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(local))
        .build()
        .unwrap();
    let url = format!("{}/oauth/token", s.url);
    let identity = lapse_server::dev::dev_token(&s.dir, workload, 600, &[], s.now()).unwrap();
    let key = DpopKey::generate();
    let r = http
        .post(&url)
        .header("DPoP", key.proof("POST", &url, None, s.now()))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "read"),
            ("task", "T-limits"),
            ("purpose", "limits test"),
        ])
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let wait = (st == 429).then(|| retry_after(&r));
    (st, wait, r.json().await.unwrap())
}

#[tokio::test]
async fn the_token_endpoint_limits_each_source_before_any_cryptography() {
    let s = start_with(|c| {
        c.limits.token_per_source = "3/m".parse().unwrap();
        c.limits.token_per_workload = Rate::off();
    })
    .await;
    for _ in 0..3 {
        let (st, _, v) = exchange_from(&s, [127, 0, 0, 1], CI).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, wait, v) = exchange_from(&s, [127, 0, 0, 1], CI).await;
    assert_eq!((st, v["error"].as_str()), (429, Some("slow_down")), "{v}");
    let wait = wait.unwrap();
    assert!(
        (1..=20).contains(&wait),
        "a token refills every 20 s: {wait}"
    );
    // Another source has its own bucket.
    let (st, _, v) = exchange_from(&s, [127, 0, 0, 2], CI).await;
    assert_eq!(st, 200, "{v}");
    // Refused before anything was decided or written.
    let audit = s.admin_get("/v1/audit?limit=1000").await;
    let decided = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "access.decided")
        .count();
    assert_eq!(decided, 4);
}

#[tokio::test]
async fn each_workload_has_its_own_rate() {
    let s = start_with(|c| {
        c.limits.token_per_source = Rate::off();
        c.limits.token_per_workload = "2/m".parse().unwrap();
    })
    .await;
    for _ in 0..2 {
        assert_eq!(exchange_from(&s, [127, 0, 0, 1], CI).await.0, 200);
    }
    let (st, wait, v) = exchange_from(&s, [127, 0, 0, 1], CI).await;
    assert_eq!((st, v["error"].as_str()), (429, Some("slow_down")), "{v}");
    assert!(v["error_description"].as_str().unwrap().contains(CI), "{v}");
    assert!(wait.unwrap() >= 1);
    // Another workload from the same address is not held back (the policy may say
    // no to it, but the limiter does not).
    let (st, _, v) = exchange_from(&s, [127, 0, 0, 1], ONCALL).await;
    assert_ne!(st, 429, "{v}");
}

#[tokio::test]
async fn a_workload_cannot_flood_the_approvers_queue() {
    let s = start_with(|c| c.limits.max_pending_per_workload = 2).await;
    let key = DpopKey::generate();
    s.ask(&key, "admin", "600").await;
    s.ask(&key, "admin", "600").await;
    let (st, v) = s.exchange(&key, "admin", "600").await;
    assert_eq!((st, v["error"].as_str()), (429, Some("slow_down")), "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("2 requests waiting for approval"),
        "{v}"
    );
    let pending = s.admin_get("/v1/approvals").await;
    assert_eq!(
        pending["requests"].as_array().map(Vec::len),
        Some(2),
        "{pending}"
    );
    // Requests that need no approval are not affected.
    assert_eq!(s.exchange(&key, "read", "60").await.0, 200);
}

#[tokio::test]
async fn console_sign_in_attempts_are_limited_per_source() {
    let s = start_with(|c| c.limits.login_per_source = "2/m".parse().unwrap()).await;
    let login = || {
        s.http
            .post(format!("{}/ui/login", s.url))
            .header("Origin", &s.url)
            .form(&[
                ("name", "alice"),
                ("password", "guess"),
                ("login_csrf", "x"),
            ])
            .send()
    };
    for _ in 0..2 {
        let r = login().await.unwrap();
        assert_eq!(
            r.status(),
            403,
            "refused for its missing sign-in nonce, not limited"
        );
    }
    let r = login().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r) >= 1);
    let page = r.text().await.unwrap();
    assert!(page.contains("Too many sign-in attempts"), "{page}");
}

#[tokio::test]
async fn too_many_or_too_large_headers_are_refused() {
    let s = start_with(|c| {
        c.limits.max_headers = 20;
        c.limits.max_header_bytes = 2048;
    })
    .await;
    let url = format!("{}/healthz", s.url);
    let mut many = s.http.get(&url);
    for i in 0..25 {
        many = many.header(format!("x-filler-{i}"), "1");
    }
    let r = many.send().await.unwrap();
    assert_eq!(r.status(), 431);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_request", "{v}");
    let r = s
        .http
        .get(&url)
        .header("x-big", "a".repeat(4096))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(s.http.get(&url).send().await.unwrap().status(), 200);
}

/// A client that sends its head and then trickles (or never sends) its body holds
/// a task for `request_timeout` at most; one that never finishes its head is cut
/// off at 10 s. Both over a raw socket, as such a client would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start_with(|c| c.limits.request_timeout = lapse_core::TtlDuration::from_secs(1)).await;
    let addr = s.url.trim_start_matches("http://").to_owned();

    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = std::time::Instant::now();
    slow_body
        .write_all(
            b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type=",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slow_body.read_to_end(&mut answer),
    )
    .await
    .expect("answered within the request timeout")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("did not finish within 1 s"), "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));

    let mut slow_head = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        slow_head.read_to_end(&mut rest),
    )
    .await
    .expect("the connection is closed, not held open");
    let waited = started.elapsed();
    // Closed (with a 408 or without a word), never served.
    let rest = String::from_utf8_lossy(&rest);
    assert!(read.is_err() || !rest.contains(" 200 "), "{rest}");
    assert!(
        waited >= std::time::Duration::from_secs(9) && waited < std::time::Duration::from_secs(15),
        "closed after {waited:?}"
    );
    // Meanwhile the broker serves everyone else.
    assert_eq!(
        s.http
            .get(format!("{}/healthz", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
