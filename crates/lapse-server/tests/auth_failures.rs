#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Issue 28 (6b): refused authentications left no trace. Over real HTTP against a
//! real broker: bad identity tokens at the token endpoint, unknown operator tokens
//! on the API and wrong console passwords each become `auth.failed` audit entries
//! (at most ten per source and minute, the rest counted in the next entry), never
//! holding the secret, and are all counted in `/metrics`.

mod common;

use common::{ALICE_PASSWORD, start};
use lapse_broker::auth_failures::PER_SOURCE_PER_MINUTE;
use lapse_token::DpopKey;
use serde_json::Value;
use std::net::IpAddr;

fn client_from(local: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(local))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn exchange(s: &common::Server, http: &reqwest::Client, identity: &str) -> u16 {
    let url = format!("{}/oauth/token", s.url);
    let key = DpopKey::generate();
    http.post(&url)
        .header("DPoP", key.proof("POST", &url, None, s.now()))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "read"),
            ("task", "T-auth"),
            ("purpose", "auth failure test"),
        ])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The `auth.failed` entries, their data parsed, and the raw text of all of them.
async fn failures(s: &common::Server) -> (Vec<Value>, String) {
    let log = s.admin_get("/v1/audit?limit=10000").await;
    let entries: Vec<&Value> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "auth.failed")
        .collect();
    let raw = entries
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let data = entries
        .iter()
        .map(|e| serde_json::from_str(e["data"].as_str().unwrap()).unwrap())
        .collect();
    (data, raw)
}

fn from<'a>(entries: &'a [Value], source: &str, credential: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|d| d["source"] == source && d["credential"] == credential)
        .collect()
}

async fn metric(s: &common::Server, line_start: &str) -> f64 {
    let text = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in\n{text}"))
}

#[tokio::test]
async fn refused_identity_and_operator_tokens_are_audited_rate_limited_and_counted() {
    let s = start().await;
    let n = usize::try_from(PER_SOURCE_PER_MINUTE).unwrap();

    // Identity tokens from 127.0.0.2: a dev token with its signature replaced.
    let good = lapse_server::dev::dev_token(&s.dir, common::CI, 600, &[], s.now()).unwrap();
    let (signed, _) = good.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", lapse_token::b64::encode([9u8; 64]));
    let kid = {
        let header = lapse_token::b64::decode(good.split('.').next().unwrap()).unwrap();
        serde_json::from_slice::<Value>(&header).unwrap()["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let workload = client_from([127, 0, 0, 2]);
    for _ in 0..n + 5 {
        assert_eq!(exchange(&s, &workload, &forged).await, 400);
    }

    // Operator tokens from 127.0.0.3, on the API.
    let guesser = client_from([127, 0, 0, 3]);
    let guess = "lapse_op_not-a-real-token-0123456789";
    for _ in 0..n + 3 {
        let st = guesser
            .get(format!("{}/v1/grants", s.url))
            .bearer_auth(guess)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, 401);
    }
    // No credential at all is counted, not recorded.
    let st = guesser
        .get(format!("{}/v1/grants", s.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 401);

    let (entries, raw) = failures(&s).await;
    let ids = from(&entries, "127.0.0.2", "identity_token");
    assert_eq!(ids.len(), n, "at most {n} a minute from one source: {raw}");
    for d in &ids {
        assert_eq!(d["reason"], "bad_signature", "{d}");
        assert_eq!(d["issuer"], lapse_server::dev::DEV_ISSUER, "{d}");
        assert_eq!(d["kid"], kid.as_str(), "{d}");
    }
    let ops = from(&entries, "127.0.0.3", "operator_token");
    assert_eq!(ops.len(), n, "{raw}");
    assert!(ops.iter().all(|d| d["reason"] == "unknown_token"), "{raw}");
    assert!(!raw.contains(guess), "the guessed token is never recorded");
    assert!(
        !raw.contains(signed),
        "the identity token is never recorded"
    );

    // A minute later the next failure carries the count of those suppressed.
    s.clock.advance_secs(61);
    let fresh = lapse_server::dev::dev_token(&s.dir, common::CI, 600, &[], s.now()).unwrap();
    let (signed, _) = fresh.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", lapse_token::b64::encode([9u8; 64]));
    assert_eq!(exchange(&s, &workload, &forged).await, 400);
    let (entries, _) = failures(&s).await;
    let ids = from(&entries, "127.0.0.2", "identity_token");
    assert_eq!(ids.len(), n + 1);
    assert_eq!(ids.last().unwrap()["suppressed"], 5);

    // Everything is counted, recorded or not.
    assert_eq!(
        metric(
            &s,
            "lapse_auth_failures_total{credential=\"identity_token\",reason=\"bad_signature\"}"
        )
        .await,
        (n + 6) as f64
    );
    assert_eq!(
        metric(
            &s,
            "lapse_auth_failures_total{credential=\"operator_token\",reason=\"unknown_token\"}"
        )
        .await,
        (n + 3) as f64
    );
    assert_eq!(
        metric(
            &s,
            "lapse_auth_failures_total{credential=\"operator_token\",reason=\"no_token\"}"
        )
        .await,
        1.0
    );
    // The chain still verifies with the new entries in it.
    assert_eq!(
        s.admin_get("/v1/audit/verify").await["first_bad"],
        Value::Null
    );
}

/// The value of hidden input `name` in a page.
fn hidden(body: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let at = body.find(&marker).unwrap() + marker.len();
    body[at..].split('"').next().unwrap().to_owned()
}

async fn console_sign_in(
    s: &common::Server,
    http: &reqwest::Client,
    name: &str,
    secret: &str,
) -> u16 {
    let form = http
        .get(format!("{}/ui/login", s.url))
        .send()
        .await
        .unwrap();
    let cookie = form
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("lapse_login="))
        .unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let body = form.text().await.unwrap();
    let nonce = hidden(&body, "login_csrf");
    http.post(format!("{}/ui/login", s.url))
        .header("cookie", cookie)
        .form(&[
            ("login_csrf", nonce.as_str()),
            ("next", "/ui/"),
            ("name", name),
            ("secret", secret),
        ])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn wrong_console_passwords_are_audited_without_the_password_or_a_typed_secret() {
    let s = start().await;
    let http = client_from([127, 0, 0, 5]);
    assert_eq!(
        console_sign_in(&s, &http, "alice", "not alice's password at all").await,
        401
    );
    // Someone types a password into the name field: the name is not recorded.
    let typed = "hunter2-typed-into-the-name-field";
    assert_eq!(console_sign_in(&s, &http, typed, "x").await, 401);
    assert_eq!(
        console_sign_in(&s, &http, "alice", ALICE_PASSWORD).await,
        303
    );

    let (entries, raw) = failures(&s).await;
    let console = from(&entries, "127.0.0.5", "console_password");
    assert_eq!(console.len(), 2, "{raw}");
    assert_eq!(console[0]["operator"], "alice");
    assert_eq!(console[0]["reason"], "wrong_secret");
    assert_eq!(console[1]["operator"], Value::Null);
    assert_eq!(console[1]["reason"], "unknown_operator");
    assert!(!raw.contains("not alice's password"), "{raw}");
    assert!(!raw.contains(typed), "{raw}");
}
