//! `lapse-bench console`: the approver console under a backlog.
//!
//! Seeds `pending` requests that wait for two approvers (the dev policy for
//! `admin` on `orders-db`), signs in through the real login form, then times
//! `GET /ui/` (the first page of the pending list) and a deep page, on one
//! keep-alive loopback connection: client-side time, so an upper bound of the
//! server's. Then, for each of `approvals` fresh requests, a workload polls the
//! token endpoint every 500 ms (as `lapse request --wait` does) from a random
//! phase, and the time from sending the final approval to the workload holding
//! its token is recorded.

use crate::{Server, emit, exchange_requests_for, identity_tokens};
use anyhow::{Context, bail};
use lapse_bench::http::{Conn, form_value, get, post_form};
use lapse_bench::stats;
use lapse_core::{Clock, SystemClock};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POLL_EVERY: Duration = Duration::from_millis(500);

pub fn run(pending: usize, samples: usize, approvals: usize, json_out: bool) -> anyhow::Result<()> {
    let server = Server::start(None)?;
    let approver =
        std::fs::read_to_string(server.dir.join(lapse_server::dev::APPROVER_TOKEN_FILE))?
            .trim()
            .to_owned();
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = client.block_on(async {
        let t = Instant::now();
        seed(&server, pending).await?;
        eprintln!(
            "seeded {pending} pending requests in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let cookie = sign_in(&server).await?;
        let first = page_times(&server, &cookie, "/ui/", samples).await?;
        // A page 100 pages deep (or the last full one), by its paging cursor.
        let deep_path = deep_page(&server, &cookie, 100.min(pending / crate_page()).max(1)).await?;
        let deep = page_times(&server, &cookie, &deep_path, samples).await?;
        let approval = approval_latency(&server, &approver, approvals).await?;
        anyhow::Ok((first, deep, approval))
    });
    server.stop();
    let (first, deep, approval) = result?;
    for (name, h) in [
        ("console pending list, first page", &first),
        ("console pending list, deep page", &deep),
        ("approval to polling workload", &approval),
    ] {
        let s = stats::summary(h);
        emit(
            json_out,
            format!("{name} ({pending} pending): {}", s.line()),
            json!({ "bench": name, "pending": pending, "latency": s.json() }),
        );
    }
    Ok(())
}

fn crate_page() -> usize {
    lapse_console::PAGE
}

/// `n` requests that wait for approval, from `n` distinct CI workloads.
async fn seed(server: &Server, n: usize) -> anyhow::Result<()> {
    let now = SystemClock.now().unix_seconds();
    let keys: Vec<DpopKey> = (0..8).map(|_| DpopKey::generate()).collect();
    let identities = identity_tokens(&server.dir, n, now)?;
    let reqs = Arc::new(exchange_requests_for(
        server,
        &keys,
        &identities,
        n,
        now,
        "admin",
    ));
    let mut tasks = Vec::new();
    for c in 0..keys.len() {
        let reqs = reqs.clone();
        let addr = server.addr;
        let step = keys.len();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            for r in reqs.iter().skip(c).step_by(step) {
                let resp = conn.send(r).await?;
                if resp.status != 400 || !contains(&resp.body, b"authorization_pending") {
                    bail!(
                        "expected a pending request, got HTTP {}: {}",
                        resp.status,
                        String::from_utf8_lossy(&resp.body)
                    );
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The value of hidden input `name` in a page.
fn hidden(body: &str, name: &str) -> anyhow::Result<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let at = body
        .find(&marker)
        .with_context(|| format!("no `{name}` in the page"))?
        + marker.len();
    Ok(body
        .get(at..)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned())
}

/// `name=value` of the first Set-Cookie for `name`.
fn set_cookie(resp: &lapse_bench::http::Response, name: &str) -> anyhow::Result<String> {
    resp.header_values("set-cookie")
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
        .with_context(|| format!("no `{name}` cookie"))
}

/// Signs in as the dev admin through the real form; answers the session cookie.
async fn sign_in(server: &Server) -> anyhow::Result<String> {
    let host = server.addr.to_string();
    let mut conn = Conn::connect(server.addr).await?;
    let form = conn.send(&get(&host, "/ui/login", &[])).await?;
    let nonce_cookie = set_cookie(&form, "lapse_login")?;
    let nonce = hidden(&String::from_utf8_lossy(&form.body), "login_csrf")?;
    let body = format!(
        "login_csrf={}&next=%2Fui%2F&name=dev-admin&secret={}",
        form_value(&nonce),
        form_value(&server.admin)
    );
    let resp = conn
        .send(&post_form(
            &host,
            "/ui/login",
            &[("Cookie", &nonce_cookie)],
            &body,
        ))
        .await?;
    if resp.status != 303 {
        bail!("sign-in answered HTTP {}", resp.status);
    }
    set_cookie(&resp, "lapse_session")
}

/// Times `samples` loads of `path`, each checked to be a full page of requests.
async fn page_times(
    server: &Server,
    cookie: &str,
    path: &str,
    samples: usize,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let host = server.addr.to_string();
    let req = get(&host, path, &[("Cookie", cookie)]);
    let mut conn = Conn::connect(server.addr).await?;
    let mut h = stats::histogram()?;
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        let resp = conn.send(&req).await?;
        let took = t.elapsed();
        let rows = String::from_utf8_lossy(&resp.body)
            .matches("data-request=")
            .count();
        if resp.status != 200 || rows != crate_page() {
            bail!("{path}: HTTP {} with {rows} rows", resp.status);
        }
        // The first tenth warms up.
        if i >= samples / 10 {
            stats::record(&mut h, took);
        }
    }
    Ok(h)
}

/// The path of the pending list `pages` pages deep, following the "older" links.
async fn deep_page(server: &Server, cookie: &str, pages: usize) -> anyhow::Result<String> {
    let host = server.addr.to_string();
    let mut conn = Conn::connect(server.addr).await?;
    let mut path = "/ui/".to_owned();
    for _ in 0..pages {
        let resp = conn.send(&get(&host, &path, &[("Cookie", cookie)])).await?;
        let body = String::from_utf8_lossy(&resp.body).into_owned();
        let Some(at) = body.find("id=\"older\" href=\"") else {
            break;
        };
        let href = body
            .get(at + 17..)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default();
        path = href.replace("&amp;", "&");
    }
    Ok(path)
}

/// Time from sending the final approval to the polling workload holding its token.
async fn approval_latency(
    server: &Server,
    approver: &str,
    n: usize,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let host = server.addr.to_string();
    let htu = format!("http://{host}/oauth/token");
    let mut h = stats::histogram()?;
    for i in 0..n {
        let key = DpopKey::generate();
        let now = SystemClock.now().unix_seconds();
        let identity = identity_tokens(&server.dir, 1, now)?;
        let ask = exchange_requests_for(
            server,
            std::slice::from_ref(&key),
            &identity,
            1,
            now,
            "admin",
        );
        let mut conn = Conn::connect(server.addr).await?;
        let first = conn.send(ask.first().context("no request")?).await?;
        let v: Value = serde_json::from_slice(&first.body)?;
        let id = v
            .get("request_id")
            .and_then(Value::as_str)
            .with_context(|| format!("not pending: {v}"))?
            .to_owned();
        let approve = |token: &str| {
            post_form(
                &host,
                &format!("/v1/approvals/{id}/approve"),
                &[("Authorization", &format!("Bearer {token}"))],
                "",
            )
        };
        let one = conn.send(&approve(&server.admin)).await?;
        if one.status != 200 {
            bail!("first approval: HTTP {}", one.status);
        }
        // The workload polls from now on, every 500 ms.
        let poll_key = key;
        let poll_id = id.clone();
        let addr = server.addr;
        let htu2 = htu.clone();
        let host2 = host.clone();
        let poller = tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            let mut tick = tokio::time::interval(POLL_EVERY);
            loop {
                tick.tick().await;
                let proof = poll_key.proof("POST", &htu2, None, SystemClock.now().unix_seconds());
                let body = format!(
                    "grant_type={}&request_id={}",
                    form_value("urn:ietf:params:oauth:grant-type:token-exchange"),
                    form_value(&poll_id)
                );
                let resp = conn
                    .send(&post_form(
                        &host2,
                        "/oauth/token",
                        &[("DPoP", &proof)],
                        &body,
                    ))
                    .await?;
                if resp.status == 200 {
                    return anyhow::Ok(Instant::now());
                }
                if !contains(&resp.body, b"authorization_pending") {
                    bail!("poll: HTTP {}", resp.status);
                }
            }
        });
        // A phase of the poll cycle that varies from sample to sample.
        let phase = Duration::from_millis(u64::try_from(i * 37 % 500).unwrap_or(0) + 20);
        tokio::time::sleep(phase).await;
        let sent = Instant::now();
        let two = conn.send(&approve(approver)).await?;
        if two.status != 200 {
            bail!("final approval: HTTP {}", two.status);
        }
        let got = tokio::time::timeout(Duration::from_secs(5), poller)
            .await
            .context("the workload never got its token")???;
        stats::record(&mut h, got.saturating_duration_since(sent));
    }
    Ok(h)
}
