#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The approver console in a real headless Chromium, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them). A
//! missing browser fails the test, it never skips it. Each page is saved as a
//! screenshot under `target/tmp/console-screenshots/<test>/`.
//!
//! `LAPSE_CHROMEDRIVER` and `LAPSE_CHROMIUM` override the binaries.

mod common;

use common::{ALICE_PASSWORD, CI, ONCALL, Server, start, token_of};
use fantoccini::{Client, ClientBuilder, Locator};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";

/// A chromedriver of our own on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn driver() -> Driver {
    let bin = std::env::var("LAPSE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start `{bin}` ({e}). The console tests need a real browser: \
                 `apt-get install chromium chromium-driver` (or set LAPSE_CHROMEDRIVER)"
            )
        });
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// A headless Chromium window of `width`×`height`.
async fn browser(d: &Driver, width: u32, height: u32) -> Client {
    let mut opts = json!({
        "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions",
            format!("--window-size={width},{height}"),
        ]
    });
    let binary = std::env::var("LAPSE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if std::path::Path::new(&binary).exists() {
        opts["binary"] = json!(binary);
    }
    let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "browserName": "chrome",
        "goog:chromeOptions": opts,
    }))
    .unwrap();
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&d.url)
        .await
        .unwrap_or_else(|e| panic!("chromium did not start through chromedriver: {e}"));
    c.set_window_size(width, height).await.unwrap();
    c
}

/// Screenshots of one test, numbered in the order taken.
struct Shots {
    dir: PathBuf,
    n: u32,
}

impl Shots {
    fn new(test: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("console-screenshots")
            .join(test);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir, n: 0 }
    }

    async fn take(&mut self, c: &Client, name: &str) {
        self.n += 1;
        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
        let path = self.dir.join(format!("{:02}-{name}.png", self.n));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

async fn text(c: &Client, css: &str) -> String {
    let found = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await;
    match found {
        Ok(e) => e.text().await.unwrap(),
        Err(e) => {
            let page = c.source().await.unwrap_or_default();
            let banner = page
                .split("id=\"banner\">")
                .nth(1)
                .and_then(|b| b.split('<').next())
                .unwrap_or("(no banner)");
            panic!(
                "no `{css}` on {}: {e}; the page says: {banner}",
                path(c).await
            )
        }
    }
}

async fn click(c: &Client, css: &str) {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no `{css}` to click: {e}"))
        .click()
        .await
        .unwrap();
}

async fn path(c: &Client) -> String {
    let u = c.current_url().await.unwrap();
    match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_owned(),
    }
}

/// Signs in with the keyboard only: name, Tab, secret, Enter.
async fn sign_in(c: &Client, s: &Server, name: &str, secret: &str) {
    c.goto(&format!("{}/ui/", s.url)).await.unwrap();
    assert!(
        path(c).await.starts_with("/ui/login"),
        "a signed-out visitor is sent to sign in"
    );
    let field = c.find(Locator::Id("name")).await.unwrap();
    field.click().await.unwrap();
    field.send_keys(&format!("{name}{TAB}")).await.unwrap();
    let focused = c.active_element().await.unwrap();
    assert_eq!(
        focused.attr("id").await.unwrap().as_deref(),
        Some("secret"),
        "Tab moves from the name to the secret"
    );
    focused
        .send_keys(&format!("{secret}{ENTER}"))
        .await
        .unwrap();
    assert_eq!(text(c, "#operator").await, name, "signed in");
}

/// Verifies an access token with real cryptography against the broker's JWKS.
async fn verified_claims(s: &Server, token: &str) -> Value {
    let jwks: jsonwebtoken::jwk::JwkSet = s
        .http
        .get(format!("{}/.well-known/jwks.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["orders-db"]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_sign_in_see_the_request_and_approve_and_the_workload_gets_its_token() {
    let s = start().await;
    let d = driver();
    let c = browser(&d, 1280, 1000).await;
    let mut shots = Shots::new("approve");

    // A CI job asks to administer the orders database: two of `dba` must approve.
    let key = DpopKey::generate();
    let id = s.ask(&key, "admin", "3600").await;

    c.goto(&format!("{}/ui/", s.url)).await.unwrap();
    shots.take(&c, "sign-in").await;
    sign_in(&c, &s, "alice", ALICE_PASSWORD).await;

    let row = format!("tr[data-request='{id}']");
    assert!(
        text(&c, &row).await.contains(CI),
        "the pending list names the workload"
    );
    assert!(text(&c, "#pending-count").await.parse::<u64>().unwrap() >= 1);
    shots.take(&c, "pending").await;

    click(&c, &format!("{row} a")).await;
    assert_eq!(text(&c, "#workload").await, CI);
    assert_eq!(text(&c, "#task").await, "T-dba");
    assert_eq!(text(&c, "#purpose").await, "rebuild an index");
    assert_eq!(
        text(&c, "#audience").await,
        "orders-db — the orders database"
    );
    assert_eq!(text(&c, "#actions").await.trim(), "admin");
    assert!(
        text(&c, "#policies")
            .await
            .contains("ci-admin-orders-needs-approval")
    );
    assert_eq!(text(&c, "#approvals").await, "0 of 2 given");
    shots.take(&c, "request").await;

    c.find(Locator::Id("approve-reason"))
        .await
        .unwrap()
        .send_keys("index rebuild is planned")
        .await
        .unwrap();
    click(&c, "#approve").await;
    assert!(
        text(&c, "#banner").await.contains("You approved request"),
        "{}",
        path(&c).await
    );
    shots.take(&c, "approved-once").await;

    // One approval of two: the workload still waits.
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("authorization_pending"))
    );
    assert_eq!(v["approvals_required"], 1, "{v}");

    // The second approver is bob, signing in with his API token.
    click(&c, "form.signout button").await;
    // A click returns before the navigation it starts; wait for the sign-in form.
    text(&c, "form[action='/ui/login']").await;
    assert!(path(&c).await.starts_with("/ui/login"));
    sign_in(&c, &s, "bob", &token_of("bob")).await;
    c.goto(&format!("{}/ui/requests/{id}", s.url))
        .await
        .unwrap();
    assert_eq!(text(&c, "#approvals").await, "1 of 2 given");
    // bob narrows the lifetime to ten minutes.
    let ttl = c.find(Locator::Id("approve-ttl")).await.unwrap();
    ttl.clear().await.unwrap();
    ttl.send_keys("10m").await.unwrap();
    shots.take(&c, "narrowing").await;
    click(&c, "#approve").await;
    assert!(text(&c, "#banner").await.contains("You approved request"));
    shots.take(&c, "approved").await;

    // The workload's next poll returns the token, bound to its key, narrowed.
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(st, 200, "{v}");
    let claims = verified_claims(&s, v["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["scope"], "admin");
    assert_eq!(claims["cnf"]["jkt"], key.jkt());
    let life = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(life, 600, "bob's narrowing holds: {claims}");
    let kinds = s.audit_kinds(&id).await;
    assert!(
        kinds.contains(&("approval.granted".into(), "alice".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("approval.granted".into(), "bob".into())),
        "{kinds:?}"
    );

    // The request left the pending list.
    c.goto(&format!("{}/ui/", s.url)).await.unwrap();
    assert!(c.find(Locator::Css(&row)).await.is_err());
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_revokes_a_grant_from_a_narrow_screen_and_introspection_says_inactive() {
    let s = start().await;
    let d = driver();
    // A phone-sized window.
    let c = browser(&d, 390, 844).await;
    let mut shots = Shots::new("revoke");

    let key = DpopKey::generate();
    let (st, v) = s.exchange(&key, "read", "600").await;
    assert_eq!(st, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_owned();
    let gid = v["grant_id"].as_str().unwrap().to_owned();
    assert!(s.active(&token).await);

    sign_in(&c, &s, "dev-admin", &s.admin).await;
    click(&c, "header nav a[href='/ui/grants']").await;
    let row = format!("tr[data-grant='{gid}']");
    let shown = text(&c, &row).await;
    assert!(shown.contains(CI) && shown.contains("read"), "{shown}");
    // On a narrow screen the table turns into stacked cards that fit the width.
    let layout = c
        .execute(
            "const td = document.querySelector('table.list td'); \
             return [getComputedStyle(td).display, document.documentElement.scrollWidth <= window.innerWidth];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        layout,
        json!(["grid", true]),
        "cards without sideways scrolling"
    );
    shots.take(&c, "grants-narrow").await;

    c.find(Locator::Id(&format!("reason-{gid}")))
        .await
        .unwrap()
        .send_keys("job finished early")
        .await
        .unwrap();
    click(&c, &format!("button[data-revoke='{gid}']")).await;
    assert!(text(&c, "#banner").await.contains("is revoked"));
    shots.take(&c, "revoked").await;

    assert!(!s.active(&token).await, "introspection says inactive");

    c.goto(&format!("{}/ui/grants/{gid}", s.url)).await.unwrap();
    assert_eq!(text(&c, "#state").await, "revoked");
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, json!(true), "the grant page fits a phone's width");
    let timeline = text(&c, "#audit").await;
    assert!(timeline.contains("grant.issued"), "{timeline}");
    assert!(
        timeline.contains("grant.revoked by dev-admin"),
        "{timeline}"
    );
    assert!(timeline.contains("job finished early"), "{timeline}");
    shots.take(&c, "timeline").await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_glass_review_is_closed_from_the_console() {
    let s = start().await;
    let (st, v) = s
        .break_glass(ONCALL, Some("orders API down, INC-77, restoring the index"))
        .await;
    assert_eq!(st, 200, "{v}");
    let d = driver();
    let c = browser(&d, 1280, 900).await;
    let mut shots = Shots::new("review");

    sign_in(&c, &s, "alice", ALICE_PASSWORD).await;
    click(&c, "header nav a[href='/ui/reviews']").await;
    let card = text(&c, "article.review").await;
    assert!(card.contains("INC-77") && card.contains(ONCALL), "{card}");
    shots.take(&c, "reviews").await;
    click(&c, "article.review input[value='justified']").await;
    c.find(Locator::Css("article.review input[name='note']"))
        .await
        .unwrap()
        .send_keys("real outage, access fitted it")
        .await
        .unwrap();
    click(&c, "article.review button[type='submit']").await;
    assert!(text(&c, "#banner").await.contains("review of grant"));
    assert_eq!(
        text(&c, "#no-reviews").await,
        "No break-glass review is open."
    );
    shots.take(&c, "closed").await;

    let open = s.admin_get("/v1/reviews").await;
    assert_eq!(open["reviews"], json!([]), "{open}");
    c.close().await.unwrap();
}

/// Issue 28, item 6, in a real browser: alice narrowed `admin read write` to
/// `read write`; bob's page offers those two, shows `admin` struck through as
/// removed by alice, and unticking `write` there issues `read` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_approver_sees_and_narrows_what_is_still_on_offer() {
    let s = start().await;
    let d = driver();
    let c = browser(&d, 1280, 1000).await;
    let key = DpopKey::generate();
    let url = format!("{}/oauth/token", s.url);
    let identity = lapse_server::dev::dev_token(&s.dir, CI, 3600, &[], s.now()).unwrap();
    let proof = key.proof("POST", &url, None, s.now());
    let (st, v) = s
        .send(s.http.post(&url).header("DPoP", proof).form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "admin read write"),
            ("task", "T-dba"),
            ("purpose", "rebuild an index"),
            ("ticket", "DBA-7"),
            ("environment", "prod"),
            ("expires_in", "600"),
        ]))
        .await;
    assert_eq!(st, 400, "{v}");
    let id = v["request_id"].as_str().unwrap().to_owned();
    let (st, v) = s
        .decide(
            "alice",
            &id,
            "approve",
            json!({ "actions": ["read", "write"] }),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    sign_in(&c, &s, "bob", &token_of("bob")).await;
    c.goto(&format!("{}/ui/requests/{id}", s.url))
        .await
        .unwrap();
    assert_eq!(text(&c, "#actions").await.trim(), "read write");
    let removed = text(&c, "#removed").await;
    assert!(
        removed.contains("admin") && removed.contains("removed by alice"),
        "{removed}"
    );
    let offered = c
        .execute(
            "return [...document.querySelectorAll('#approve-form input[name=actions]')]\
             .map(i => i.value + (i.checked ? '+' : '-'));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(offered, json!(["read+", "write+"]), "admin is not offered");
    click(&c, "#approve-form input[value='write']").await;
    click(&c, "#approve").await;
    assert!(
        text(&c, "#banner").await.contains("You approved request"),
        "{}",
        path(&c).await
    );
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(st, 200, "{v}");
    let claims = verified_claims(&s, v["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["scope"], "read", "{claims}");
    c.close().await.unwrap();
}
