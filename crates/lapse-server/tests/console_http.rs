#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The approver console over plain HTTP: sign-in, sessions, CSRF, and that every
//! refusal the API makes (separation of duties, widening, expiry, double
//! approval, missing roles) reaches the console with the same precision.

mod common;

use common::{ALICE_PASSWORD, CI, Server, start, start_with, token_of};
use lapse_core::Clock;
use lapse_token::DpopKey;
use serde_json::Value;

/// A browser without a cookie jar or redirects: every cookie is passed by hand.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

struct Page {
    status: u16,
    location: String,
    cookies: Vec<String>,
    body: String,
}

async fn fetch(rb: reqwest::RequestBuilder) -> Page {
    let r = rb.send().await.unwrap();
    Page {
        status: r.status().as_u16(),
        location: r
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        cookies: r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect(),
        body: r.text().await.unwrap(),
    }
}

/// The value of hidden input `name` in a page.
fn hidden(body: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let at = body
        .find(&marker)
        .unwrap_or_else(|| panic!("no `{name}` in {body}"))
        + marker.len();
    body[at..].split('"').next().unwrap().to_owned()
}

/// `name=value` of the Set-Cookie whose name is `name`.
fn cookie_pair(p: &Page, name: &str) -> Option<String> {
    p.cookies
        .iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap().to_owned())
}

struct Console<'a> {
    s: &'a Server,
    http: reqwest::Client,
    session: String,
}

/// Signs `name` in; answers the console with its session cookie.
async fn sign_in<'a>(s: &'a Server, name: &str, secret: &str) -> Console<'a> {
    let (st, session) = try_sign_in(s, name, secret).await;
    assert_eq!(st, 303, "sign-in of {name}");
    Console {
        s,
        http: raw_client(),
        session: session.unwrap(),
    }
}

async fn try_sign_in(s: &Server, name: &str, secret: &str) -> (u16, Option<String>) {
    let http = raw_client();
    let form = fetch(http.get(format!("{}/ui/login", s.url))).await;
    let nonce_cookie = cookie_pair(&form, "lapse_login").unwrap();
    let nonce = hidden(&form.body, "login_csrf");
    let p = fetch(
        http.post(format!("{}/ui/login", s.url))
            .header("cookie", nonce_cookie)
            .form(&[
                ("login_csrf", nonce.as_str()),
                ("next", "/ui/"),
                ("name", name),
                ("secret", secret),
            ]),
    )
    .await;
    (p.status, cookie_pair(&p, "lapse_session"))
}

impl Console<'_> {
    async fn get(&self, path: &str) -> Page {
        fetch(
            self.http
                .get(format!("{}{path}", self.s.url))
                .header("cookie", &self.session),
        )
        .await
    }

    /// Posts a console form the way a browser on this origin does.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Page {
        fetch(
            self.http
                .post(format!("{}{path}", self.s.url))
                .header("cookie", &self.session)
                .header("origin", &self.s.url)
                .form(form),
        )
        .await
    }

    async fn csrf(&self) -> String {
        hidden(&self.get("/ui/").await.body, "csrf")
    }

    /// Approves `id` through the console form with all asked actions.
    async fn approve(&self, id: &str, actions: &[&str], ttl: &str) -> Page {
        let csrf = self.csrf().await;
        let mut form = vec![("csrf", csrf.as_str()), ("ttl", ttl), ("reason", "ok")];
        for a in actions {
            form.push(("actions", a));
        }
        self.post(&format!("/ui/requests/{id}/approve"), &form)
            .await
    }
}

async fn approvals_given(s: &Server, id: &str) -> usize {
    s.admin_get(&format!("/v1/approvals/{id}")).await["approvals"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_and_forms_need_a_session() {
    let s = start().await;
    let key = DpopKey::generate();
    let id = s.ask(&key, "admin", "3600").await;
    let http = raw_client();
    for (path, next) in [("/ui/", "%2Fui%2F"), ("/ui/grants", "%2Fui%2Fgrants")] {
        let p = fetch(http.get(format!("{}{path}", s.url))).await;
        assert_eq!(p.status, 303, "{path}");
        assert_eq!(p.location, format!("/ui/login?next={next}"));
    }
    let p = fetch(
        http.post(format!("{}/ui/requests/{id}/approve", s.url))
            .form(&[("actions", "admin")]),
    )
    .await;
    assert_eq!(p.status, 303);
    assert!(p.location.starts_with("/ui/login"));
    assert_eq!(approvals_given(&s, &id).await, 0);

    // Neither a tampered session nor an access token signed by the same key passes.
    let (st, v) = s.exchange(&DpopKey::generate(), "read", "300").await;
    assert_eq!(st, 200, "{v}");
    let good = sign_in(&s, "alice", ALICE_PASSWORD).await.session;
    let mut tampered = good.clone();
    tampered.pop();
    tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
    for cookie in [
        tampered,
        format!("lapse_session={}", v["access_token"].as_str().unwrap()),
        "lapse_session=".to_owned(),
        "lapse_session=a.b.c".to_owned(),
    ] {
        let p = fetch(http.get(format!("{}/ui/", s.url)).header("cookie", &cookie)).await;
        assert_eq!(
            (p.status, p.location.as_str()),
            (303, "/ui/login?next=%2Fui%2F"),
            "{cookie}"
        );
    }
    let p = fetch(http.get(format!("{}/ui/", s.url)).header("cookie", &good)).await;
    assert_eq!(p.status, 200);

    // A session lasts `console_session` (8 hours by default), then sign in again.
    s.clock.advance_secs(8 * 3600 + 1);
    let p = fetch(http.get(format!("{}/ui/", s.url)).header("cookie", &good)).await;
    assert_eq!(p.status, 303, "an expired session is refused");
}

/// Guesses against one name from anywhere meet one bucket; other names, known or
/// not, have their own, so the limit does not reveal which names exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_attempts_are_limited_per_operator_name() {
    let s = start_with(|c| c.limits.login_per_operator = "3/m".parse().unwrap()).await;
    for _ in 0..3 {
        assert_eq!(try_sign_in(&s, "alice", "guess").await, (401, None));
    }
    // The right password does not get through either, until the bucket refills.
    assert_eq!(try_sign_in(&s, "alice", ALICE_PASSWORD).await, (429, None));
    assert_eq!(try_sign_in(&s, "bob", &token_of("bob")).await.0, 303);
    for _ in 0..3 {
        assert_eq!(try_sign_in(&s, "nobody", "guess").await, (401, None));
    }
    assert_eq!(try_sign_in(&s, "nobody", "guess").await, (429, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_takes_a_password_or_an_api_token_and_refuses_the_rest() {
    let s = start().await;
    assert_eq!(
        try_sign_in(&s, "alice", "wrong password").await,
        (401, None)
    );
    assert_eq!(try_sign_in(&s, "nobody", ALICE_PASSWORD).await, (401, None));
    assert_eq!(try_sign_in(&s, "bob", ALICE_PASSWORD).await, (401, None));
    // bob has no password, only an API token; alice has both.
    assert_eq!(try_sign_in(&s, "bob", &token_of("bob")).await.0, 303);
    assert_eq!(try_sign_in(&s, "alice", &token_of("alice")).await.0, 303);
    let alice = sign_in(&s, "alice", ALICE_PASSWORD).await;
    assert!(alice.session.starts_with("lapse_session=ey"));

    // The form's nonce must come with the nonce cookie (no login CSRF).
    let http = raw_client();
    let p = fetch(http.post(format!("{}/ui/login", s.url)).form(&[
        ("login_csrf", "guess"),
        ("name", "alice"),
        ("secret", ALICE_PASSWORD),
    ]))
    .await;
    assert_eq!(p.status, 403);
    assert!(cookie_pair(&p, "lapse_session").is_none());

    // The session cookie is for scripts of no one, and not for other sites.
    let form = fetch(http.get(format!("{}/ui/login", s.url))).await;
    let p = fetch(
        http.post(format!("{}/ui/login", s.url))
            .header("cookie", cookie_pair(&form, "lapse_login").unwrap())
            .form(&[
                ("login_csrf", hidden(&form.body, "login_csrf").as_str()),
                ("next", "https://evil.example/"),
                ("name", "alice"),
                ("secret", ALICE_PASSWORD),
            ]),
    )
    .await;
    assert_eq!(p.status, 303);
    assert_eq!(p.location, "/ui/", "no open redirect after sign-in");
    let set = p
        .cookies
        .iter()
        .find(|c| c.starts_with("lapse_session="))
        .unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(set.contains(attr), "{set}");
    }

    // Sign-ins are in the audit log with how they were made; secrets are not.
    let audit = s.admin_get("/v1/audit?limit=10000").await;
    let methods: Vec<(String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "operator.signed_in")
        .map(|e| {
            let d: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
            (
                e["actor"].as_str().unwrap().to_owned(),
                d["method"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        methods.contains(&("alice".into(), "password".into())),
        "{methods:?}"
    );
    assert!(
        methods.contains(&("bob".into(), "api_token".into())),
        "{methods:?}"
    );
    let text = audit.to_string();
    assert!(!text.contains(ALICE_PASSWORD) && !text.contains(&token_of("bob")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_the_session_csrf_value_or_from_another_site_are_refused() {
    let s = start().await;
    let key = DpopKey::generate();
    let id = s.ask(&key, "admin", "3600").await;
    let alice = sign_in(&s, "alice", ALICE_PASSWORD).await;
    let path = format!("/ui/requests/{id}/approve");
    let csrf = alice.csrf().await;

    let p = alice.post(&path, &[("actions", "admin")]).await;
    assert_eq!(p.status, 403);
    assert!(p.body.contains("CSRF check failed"), "{}", p.body);
    let p = alice
        .post(&path, &[("csrf", "not-the-value"), ("actions", "admin")])
        .await;
    assert_eq!(p.status, 403);
    // Another signed-in operator's value is not this session's.
    let bob_csrf = sign_in(&s, "bob", &token_of("bob")).await.csrf().await;
    assert_ne!(bob_csrf, csrf);
    let p = alice
        .post(&path, &[("csrf", bob_csrf.as_str()), ("actions", "admin")])
        .await;
    assert_eq!(p.status, 403);
    // The right value from another origin.
    for (h, v) in [
        ("origin", "https://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let p = fetch(
            alice
                .http
                .post(format!("{}{path}", s.url))
                .header("cookie", &alice.session)
                .header(h, v)
                .form(&[("csrf", csrf.as_str()), ("actions", "admin")]),
        )
        .await;
        assert_eq!(p.status, 403, "{h}: {v}");
    }
    assert_eq!(approvals_given(&s, &id).await, 0, "nothing was approved");

    let p = alice.approve(&id, &["admin"], "").await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(p.location, format!("/ui/?done=approved:{id}"));
    assert_eq!(approvals_given(&s, &id).await, 1);

    let p = alice.get(&p.location).await;
    assert!(
        p.body.contains(&format!("You approved request {id}.")),
        "{}",
        p.body
    );

    // Pages refuse to be framed and to be cached, and run only their own script.
    let r = alice
        .http
        .get(format!("{}/ui/", s.url))
        .header("cookie", &alice.session)
        .send()
        .await
        .unwrap();
    let h = r.headers();
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["cache-control"], "no-store");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_refuses_what_the_api_refuses_with_the_same_precision() {
    let s = start().await;
    let key = DpopKey::generate();
    let id = s.ask(&key, "admin", "3600").await;

    // carol approves but is in no group; dave owns the CI workloads; erin only reads.
    let carol = sign_in(&s, "carol", &token_of("carol")).await;
    let p = carol.approve(&id, &["admin"], "").await;
    assert_eq!(p.status, 403);
    assert!(
        p.body.contains("is not in the approver group"),
        "{}",
        p.body
    );
    let dave = sign_in(&s, "dave", &token_of("dave")).await;
    let p = dave.approve(&id, &["admin"], "").await;
    assert_eq!(p.status, 403);
    assert!(p.body.contains("separation of duties"), "{}", p.body);
    let erin = sign_in(&s, "erin", &token_of("erin")).await;
    let p = erin.approve(&id, &["admin"], "").await;
    assert_eq!(p.status, 403);
    let kinds = s.audit_kinds(&id).await;
    let refused: Vec<&str> = kinds
        .iter()
        .filter(|(k, _)| k == "approval.refused")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(
        refused,
        ["carol", "dave"],
        "refusals on duty grounds are audited"
    );

    let alice = sign_in(&s, "alice", ALICE_PASSWORD).await;
    // Widening: a longer lifetime than asked, or an action not asked.
    let p = alice.approve(&id, &["admin"], "2h").await;
    assert_eq!(p.status, 400, "{}", p.body);
    let p = alice.approve(&id, &["admin", "write"], "").await;
    assert_eq!(p.status, 400, "{}", p.body);
    let p = alice.approve(&id, &[], "").await;
    assert_eq!(p.status, 400);
    assert!(p.body.contains("tick at least one action"));
    // A denial needs a reason.
    let csrf = alice.csrf().await;
    let p = alice
        .post(
            &format!("/ui/requests/{id}/deny"),
            &[("csrf", &csrf), ("reason", " ")],
        )
        .await;
    assert_eq!(p.status, 400);
    assert_eq!(approvals_given(&s, &id).await, 0);

    // One approver counts once.
    assert_eq!(alice.approve(&id, &["admin"], "").await.status, 303);
    let p = alice.approve(&id, &["admin"], "").await;
    assert!(
        p.status == 409 || p.status == 400,
        "{}: {}",
        p.status,
        p.body
    );
    assert_eq!(approvals_given(&s, &id).await, 1);

    // A pending request expires (approval window 15 minutes) and is then shown
    // as no longer approvable; approving it is refused.
    s.clock.advance_secs(16 * 60);
    let page = alice.get(&format!("/ui/requests/{id}")).await;
    assert!(
        !page.body.contains("id=\"approve-form\""),
        "no form for an expired request"
    );
    let bob = sign_in(&s, "bob", &token_of("bob")).await;
    let p = bob.approve(&id, &["admin"], "").await;
    assert!(p.status >= 400 && p.status < 500, "{}", p.status);
    assert_eq!(approvals_given(&s, &id).await, 1);
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (403, Some("access_denied")),
        "{v}"
    );

    // erin may look at grants but not revoke them.
    let (st, v) = s.exchange(&DpopKey::generate(), "read", "300").await;
    assert_eq!(st, 200, "{v}");
    let gid = v["grant_id"].as_str().unwrap();
    let csrf = erin.csrf().await;
    let p = erin
        .post(&format!("/ui/grants/{gid}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(p.status, 403, "{}", p.body);
    assert!(s.active(v["access_token"].as_str().unwrap()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_data_is_shown_escaped_never_as_markup() {
    let s = start().await;
    let url = format!("{}/oauth/token", s.url);
    let identity = lapse_server::dev::dev_token(&s.dir, CI, 3600, &[], s.now()).unwrap();
    let key = DpopKey::generate();
    let proof = key.proof("POST", &url, None, s.clock.now().unix_seconds());
    let (st, v) = s
        .send(s.http.post(&url).header("DPoP", proof).form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "admin"),
            ("task", "<img src=x onerror=alert(1)>"),
            ("purpose", "<script>alert('purpose')</script>"),
        ]))
        .await;
    assert_eq!(v["error"], "authorization_pending", "{st} {v}");
    let id = v["request_id"].as_str().unwrap();
    let alice = sign_in(&s, "alice", ALICE_PASSWORD).await;
    for path in ["/ui/".to_owned(), format!("/ui/requests/{id}")] {
        let p = alice.get(&path).await;
        assert_eq!(p.status, 200);
        assert!(!p.body.contains("<script>alert"), "{path}");
        assert!(!p.body.contains("<img src=x"), "{path}");
        assert!(
            p.body
                .contains("&lt;script&gt;alert('purpose')&lt;/script&gt;"),
            "{path}"
        );
    }
}

/// The grants page lists the quarantines standing, with who set them and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grants_page_shows_quarantined_workloads() {
    let s = start().await;
    let c = sign_in(&s, "erin", &token_of("erin")).await;
    assert!(
        !c.get("/ui/grants")
            .await
            .body
            .contains("id=\"quarantined\"")
    );
    let (st, v) = s
        .send(
            s.http
                .post(format!("{}/v1/signals", s.url))
                .bearer_auth(&s.admin)
                .json(&serde_json::json!({
                    "type": "workload-quarantined",
                    "subject": { "workload": CI },
                    "reason": "token seen in a public log <b>",
                })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let page = c.get("/ui/grants").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"quarantined\""), "{}", page.body);
    assert!(
        page.body.contains(&format!("data-quarantined=\"{CI}\"")),
        "{}",
        page.body
    );
    assert!(page.body.contains("every audience"), "{}", page.body);
    assert!(
        page.body.contains("token seen in a public log &lt;b&gt;"),
        "the reason is shown escaped: {}",
        page.body
    );
}

/// The actions a request page ticks in its approve form (what a browser sends
/// when the approver changes nothing).
fn ticked(body: &str) -> Vec<String> {
    body.split("<input ")
        .skip(1)
        .filter(|i| i.starts_with(r#"type="checkbox" name="actions""#))
        .filter(|i| i.split('>').next().unwrap().contains(" checked"))
        .map(|i| {
            i.split("value=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// `admin read write` on `orders-db` (writes need a ticket and an environment),
/// pending two approvals; answers the request id.
async fn ask_all(s: &Server, key: &DpopKey) -> String {
    let url = format!("{}/oauth/token", s.url);
    let identity = lapse_server::dev::dev_token(&s.dir, CI, 3600, &[], s.now()).unwrap();
    let form = [
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
    ];
    let proof = key.proof("POST", &url, None, s.now());
    let (st, v) = s
        .send(s.http.post(&url).header("DPoP", proof).form(&form))
        .await;
    assert_eq!(
        (st, &v["error"]),
        (400, &"authorization_pending".into()),
        "{v}"
    );
    v["request_id"].as_str().unwrap().to_owned()
}

/// Issue 28, item 6: after alice narrowed `admin read write` to `read write`,
/// bob is offered `read write`, sees that alice removed `admin`, and what he
/// submits is compared with that: as shown it keeps `read write`, unticking
/// `write` leaves `read` (it used to be refused as asking for `admin`), and
/// asking `admin` back names who removed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_approver_is_offered_what_earlier_approvers_left() {
    let s = start().await;
    let alice = sign_in(&s, "alice", ALICE_PASSWORD).await;
    let bob = sign_in(&s, "bob", &token_of("bob")).await;
    let actions = |v: &Value| -> Vec<String> {
        let mut a: Vec<String> = v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        a.sort();
        a
    };
    for (unticked, kept) in [
        (None, &["read", "write"][..]),
        (Some("write"), &["read"][..]),
    ] {
        let key = DpopKey::generate();
        let id = ask_all(&s, &key).await;
        let page = alice.get(&format!("/ui/requests/{id}")).await;
        assert_eq!(ticked(&page.body), ["admin", "read", "write"]);
        let p = alice.approve(&id, &["read", "write"], "").await;
        assert_eq!(p.status, 303, "{}", p.body);

        let page = bob.get(&format!("/ui/requests/{id}")).await;
        assert_eq!(page.status, 200);
        assert_eq!(
            ticked(&page.body),
            ["read", "write"],
            "only what is still on offer is ticked"
        );
        let removed = page.body.split("id=\"removed\"").nth(1).unwrap_or_default();
        let removed = removed.split("</dd>").next().unwrap();
        assert!(
            removed.contains("<code class=\"action\">admin</code>")
                && removed.contains("removed by <strong>alice</strong>"),
            "{removed}"
        );
        assert!(
            page.body.contains("<input type=\"checkbox\" disabled>"),
            "the removed action is shown, not offered"
        );

        let mut send: Vec<String> = ticked(&page.body);
        send.retain(|a| Some(a.as_str()) != unticked);
        let send: Vec<&str> = send.iter().map(String::as_str).collect();
        let p = bob.approve(&id, &send, "").await;
        assert_eq!(p.status, 303, "{}", p.body);
        let g = s.admin_get(&format!("/v1/approvals/{id}")).await;
        assert_eq!(g["state"], "active", "{g}");
        assert_eq!(actions(&g), kept, "{g}");
        let who: Vec<(&str, &Value)> = g["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["by"].as_str().unwrap(), &a["removed"]))
            .collect();
        assert_eq!(who[0], ("alice", &serde_json::json!(["admin"])), "{g}");
        match unticked {
            None => assert_eq!(who[1], ("bob", &Value::Null), "{g}"),
            Some(_) => assert_eq!(who[1], ("bob", &serde_json::json!(["write"])), "{g}"),
        }
        let (st, v) = s.poll(&key, &id).await;
        assert_eq!(st, 200, "{v}");
    }

    // A page shown before alice narrowed still asks for `admin`: refused, saying who.
    let id = ask_all(&s, &DpopKey::generate()).await;
    assert_eq!(alice.approve(&id, &["read"], "").await.status, 303);
    let p = bob.approve(&id, &["admin", "read"], "").await;
    assert_eq!(p.status, 400, "{}", p.body);
    assert!(
        p.body
            .contains("<code>admin</code> is no longer on offer: <code>alice</code> removed it")
            || p.body
                .contains("`admin` is no longer on offer: `alice` removed it"),
        "{}",
        p.body
    );
}
