//! `lapse-bench gate`: the gate's numbers.
//!
//! - `decide`: `Gate::decide` in-process on one thread (token signature, DPoP proof
//!   with replay cache, audience, action, feed state, Cedar on the broker's current
//!   policies), warm caches, one token and a fresh proof per request (proofs are
//!   made before the clock starts).
//! - `propagation`: 10 verifiers follow the broker's feed; from sending a revoke to
//!   every one of them refusing the grant.
//! - `nginx`: a real nginx at a fixed 2,000 requests/s, once through `auth_request`
//!   to `lapse gate` and once straight to the same upstream; the difference of the
//!   p99s is what the gate adds.

use crate::{Server, emit, exchange_requests_for, identity_tokens};
use anyhow::{Context, bail};
use lapse_bench::http::{Conn, get};
use lapse_bench::stats;
use lapse_core::{Clock, SystemClock};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn gate_config(
    server: &Server,
    dir: &std::path::Path,
    listen: u16,
    web: u16,
) -> anyhow::Result<lapse_gate::config::GateConfig> {
    std::fs::write(dir.join("gate.token"), &server.admin)?;
    let text = include_str!("../../../examples/gate/gate.toml")
        .replace("127.0.0.1:7900", &format!("127.0.0.1:{listen}"))
        .replace("http://127.0.0.1:7800", &format!("http://{}", server.addr))
        .replace("http://127.0.0.1:8080", &format!("http://127.0.0.1:{web}"))
        .replace(
            "file:/etc/lapse/gate.token",
            &format!("file:{}", dir.join("gate.token").display()),
        );
    lapse_gate::config::GateConfig::parse(&text).map_err(anyhow::Error::msg)
}

/// One `read` token on `orders-db` and the key it is bound to.
async fn token(server: &Server) -> anyhow::Result<(DpopKey, String, String)> {
    issue_tokens(server, 1).await?.pop().context("no token")
}

/// `n` grants, each for its own workload (`ci/job-0` …) and DPoP key.
async fn issue_tokens(server: &Server, n: usize) -> anyhow::Result<Vec<(DpopKey, String, String)>> {
    let keys: Vec<DpopKey> = (0..n).map(|_| DpopKey::generate()).collect();
    let now = SystemClock.now().unix_seconds();
    let ids = identity_tokens(&server.dir, n, now)?;
    let reqs = exchange_requests_for(server, &keys, &ids, n, now, "read");
    let mut conn = Conn::connect(server.addr).await?;
    let mut out = Vec::with_capacity(n);
    for (key, req) in keys.into_iter().zip(&reqs) {
        let resp = conn.send(req).await?;
        let v: Value = serde_json::from_slice(&resp.body)?;
        let t = v
            .get("access_token")
            .and_then(Value::as_str)
            .with_context(|| format!("no token: {v}"))?;
        let g = v
            .get("grant_id")
            .and_then(Value::as_str)
            .context("no grant id")?;
        out.push((key, t.to_owned(), g.to_owned()));
    }
    Ok(out)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `tokens` grants (each its own workload, key and task) take turns, so with more
/// than one no request repeats the policy input of the one before it.
pub fn decide(
    requests: usize,
    runs: usize,
    tokens: usize,
    concurrency: usize,
    json_out: bool,
) -> anyhow::Result<()> {
    if tokens == 0 || concurrency == 0 {
        bail!("--tokens and --concurrency must be at least 1");
    }
    let server = Server::start(None)?;
    let tmp = tempfile::tempdir()?;
    // The gate's background work (feed, policy refresh) on its own thread, so the
    // measured thread does only decisions.
    let bg = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let web = 8080;
    let cfg = gate_config(&server, tmp.path(), 0, web)?;
    let (gate, holders) = bg.block_on(async {
        let gate = lapse_gate::Gate::new(cfg).await?;
        tokio::spawn(gate.verifier.clone().follow());
        let holders: Vec<(DpopKey, String)> = issue_tokens(&server, tokens)
            .await?
            .into_iter()
            .map(|(k, t, _)| (k, t))
            .collect();
        anyhow::Ok((gate, holders))
    })?;
    // Wait for the feed to be heard once.
    std::thread::sleep(Duration::from_millis(1500));
    let url = format!("http://127.0.0.1:{web}/orders/7");
    let one = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rates = Vec::new();
    let mut p99s = Vec::new();
    let mut batched = gate.batch_counts();
    for run in 0..runs {
        let now = SystemClock.now().unix_seconds();
        let headers: Vec<axum::http::HeaderMap> = (0..requests)
            .zip(holders.iter().cycle())
            .map(|(_, (key, token))| {
                let mut h = axum::http::HeaderMap::new();
                if let (Ok(a), Ok(p)) = (
                    format!("DPoP {token}").parse(),
                    key.proof("GET", &url, Some(token), now).parse(),
                ) {
                    h.insert("authorization", a);
                    h.insert("dpop", p);
                }
                h
            })
            .collect();
        let ip: std::net::IpAddr = [127, 0, 0, 1].into();
        let (elapsed, h) = one.block_on(async {
            let mut h = stats::histogram()?;
            let start = Instant::now();
            if concurrency == 1 {
                for hm in &headers {
                    let t = Instant::now();
                    let r = gate.decide(hm, "GET", "/orders/7", ip).await;
                    stats::record(&mut h, t.elapsed());
                    if let Err(d) = r {
                        bail!("refused: {d}");
                    }
                }
            } else {
                // Each decision's time runs from its start to its answer, so it
                // includes waiting for a batch.
                let mut inflight = tokio::task::JoinSet::new();
                let mut next = headers.into_iter();
                loop {
                    while inflight.len() < concurrency {
                        let Some(hm) = next.next() else { break };
                        let g = Arc::clone(&gate);
                        inflight.spawn(async move {
                            let t = Instant::now();
                            let r = g.decide(&hm, "GET", "/orders/7", ip).await;
                            (t.elapsed(), r.err())
                        });
                    }
                    let Some(done) = inflight.join_next().await else {
                        break;
                    };
                    let (took, refused) = done?;
                    stats::record(&mut h, took);
                    if let Some(d) = refused {
                        bail!("refused: {d}");
                    }
                }
            }
            anyhow::Ok((start.elapsed(), h))
        })?;
        let rate = requests as f64 / elapsed.as_secs_f64();
        let s = stats::summary(&h);
        let (b1, r1) = gate.batch_counts();
        let per_batch = (r1 - batched.1) as f64 / (b1 - batched.0).max(1) as f64;
        batched = (b1, r1);
        emit(
            json_out,
            format!(
                "gate decide (one thread, {tokens} token(s), {concurrency} in flight) run {run}: {rate:.0}/s, {per_batch:.1} requests per batch, {}",
                s.line()
            ),
            json!({ "bench": "gate.decide", "tokens": tokens, "concurrency": concurrency, "per_batch": per_batch, "run": run, "per_sec": rate, "latency": s.json() }),
        );
        rates.push(rate);
        p99s.push(s.p99_ns as f64);
    }
    // For scale: one Ed25519 verification alone, which every request's DPoP proof needs.
    let k = lapse_token::SigningKey::generate();
    let msg = b"eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJ4In0";
    let sig = k.sign(msg);
    let mut hv = stats::histogram()?;
    let t0 = Instant::now();
    for _ in 0..20_000 {
        let t = Instant::now();
        if k.public().verify(msg, &sig).is_err() {
            bail!("the signature does not verify");
        }
        stats::record(&mut hv, t.elapsed());
    }
    let per_sec = 20_000.0 / t0.elapsed().as_secs_f64();
    let sv = stats::summary(&hv);
    emit(
        json_out,
        format!(
            "one Ed25519 verification (ed25519-dalek), one thread: {per_sec:.0}/s, {}",
            sv.line()
        ),
        json!({ "bench": "gate.ed25519_verify", "per_sec": per_sec, "latency": sv.json() }),
    );
    // And the same verifications 16 at a time, as one batch (what the gate's
    // batcher does when requests queue).
    let jwts: Vec<String> = (0..lapse_verifier::MAX_BATCH)
        .map(|i| k.sign_jwt("dpop+jwt", &json!({ "jti": i })))
        .collect::<Result<_, _>>()?;
    let parsed: Vec<lapse_token::jws::Unverified<'_>> = jwts
        .iter()
        .map(|t| lapse_token::jws::Unverified::parse(t))
        .collect::<Result<_, _>>()?;
    let items: Vec<_> = parsed.iter().map(|u| (u, k.public())).collect();
    let rounds = 20_000 / items.len();
    let t0 = Instant::now();
    for _ in 0..rounds {
        if lapse_token::jws::verify_many(&items)
            .iter()
            .any(Result::is_err)
        {
            bail!("a batch does not verify");
        }
    }
    let batched = (rounds * items.len()) as f64 / t0.elapsed().as_secs_f64();
    emit(
        json_out,
        format!(
            "Ed25519 verifications in batches of {}, one thread: {batched:.0}/s ({:.2}x one at a time)",
            items.len(),
            batched / per_sec
        ),
        json!({ "bench": "gate.ed25519_verify_batch", "batch": items.len(), "per_sec": batched }),
    );
    let r = stats::median_f64(rates);
    let p = stats::median_f64(p99s);
    emit(
        json_out,
        format!(
            "gate decide ({tokens} token(s), {concurrency} in flight), median of {runs} runs: {r:.0}/s per core, p99 {}; {:.2} of the Ed25519 verification rate",
            stats::fmt_ns(p as u64),
            r / per_sec
        ),
        // The ratio is steadier than either rate on a machine whose speed drifts.
        json!({ "bench": "gate.decide.summary", "tokens": tokens, "concurrency": concurrency, "per_sec": r, "p99_ns": p, "of_verify_rate": r / per_sec }),
    );
    drop(bg);
    server.stop();
    Ok(())
}

pub fn propagation(
    gates: usize,
    samples: usize,
    across_replicas: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    let db = if across_replicas {
        Some(crate::pg::Database::create()?)
    } else {
        None
    };
    let mut servers = match &db {
        Some(db) => Server::start_replicas(None, 2, &db.url)?,
        None => vec![Server::start(None)?],
    };
    let server = servers.remove(0);
    // The replica the gates follow (the same one without replicas).
    let followed = servers.first().map_or(server.addr, |s| s.addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let h = rt.block_on(async {
        let mut verifiers = Vec::new();
        for _ in 0..gates {
            let v = Arc::new(
                lapse_verifier::Verifier::new(lapse_verifier::VerifierConfig {
                    broker: format!("http://{followed}"),
                    issuer: server.public.clone(),
                    audience: "orders-db".into(),
                    token: server.admin.clone(),
                    staleness: Duration::from_secs(5),
                    on_stale: lapse_verifier::OnStale::Deny,
                    dpop_max_age_secs: 60,
                })
                .await?,
            );
            tokio::spawn(v.clone().follow());
            verifiers.push(v);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut h = stats::histogram()?;
        let mut conn = Conn::connect(server.addr).await?;
        let host = server.addr.to_string();
        let auth = format!("Bearer {}", server.admin);
        for i in 0..samples + 10 {
            let (_, _, grant) = token(&server).await?;
            let revoke = lapse_bench::http::post_form(
                &host,
                &format!("/v1/grants/{grant}/revoke"),
                &[("Authorization", &auth)],
                "",
            );
            let t = Instant::now();
            let r = conn.send(&revoke).await?;
            if r.status != 200 {
                bail!("revoke: HTTP {}", r.status);
            }
            while !verifiers.iter().all(|v| v.ended(&grant).is_some()) {
                if t.elapsed() > Duration::from_secs(5) {
                    bail!("a gate never heard of the revoke");
                }
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            if i >= 10 {
                stats::record(&mut h, t.elapsed());
            }
        }
        anyhow::Ok(h)
    })?;
    let s = stats::summary(&h);
    let across = if across_replicas {
        ", revoked on replica A, gates following replica B (PostgreSQL)"
    } else {
        ""
    };
    emit(
        json_out,
        format!(
            "revocation propagation to {gates} gates{across} (revoke sent → every gate refuses): {}",
            s.line()
        ),
        json!({ "bench": "gate.propagation", "gates": gates, "across_replicas": across_replicas, "latency": s.json() }),
    );
    server.stop();
    for s in servers {
        s.stop();
    }
    drop(db);
    Ok(())
}

/// A real nginx with two servers: `gated` asks the gate, `plain` does not.
struct Nginx(std::process::Child);

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

fn nginx(
    dir: &std::path::Path,
    gated: u16,
    plain: u16,
    gate: u16,
    upstream: u16,
) -> anyhow::Result<Nginx> {
    let conf = include_str!("../../../examples/gate/nginx.conf")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{gated}"))
        .replace("127.0.0.1:7900", &format!("127.0.0.1:{gate}"))
        .replace("127.0.0.1:9000", &format!("127.0.0.1:{upstream}"));
    let d = dir.display();
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let text = format!(
        "{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\nhttp {{\n access_log off;\n keepalive_requests 1000000;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         upstream plain_up {{ server 127.0.0.1:{upstream}; keepalive 32; }}\n\
         server {{ listen 127.0.0.1:{plain}; location / {{ proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://plain_up; }} }}\n{conf}\n}}\n",
        user = if root { "user root;\n" } else { "" },
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, text)?;
    let child = std::process::Command::new("/usr/sbin/nginx")
        .args(["-p", &d.to_string(), "-c", &path.display().to_string()])
        .spawn()
        .context("starting /usr/sbin/nginx (apt-get install nginx)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", gated)).is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Nginx(child))
}

/// Sends `n` requests at `rate`/s over `conns` connections; latency is measured
/// from each request's scheduled time (no coordinated omission).
async fn fixed_rate(
    port: u16,
    requests: Vec<Vec<u8>>,
    rate: f64,
    conns: usize,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let requests = Arc::new(requests);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(([127, 0, 0, 1], port).into()).await?;
            let mut h = stats::histogram()?;
            for (i, r) in requests.iter().enumerate().skip(c).step_by(conns) {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due).await;
                let resp = conn.send(r).await?;
                if resp.status != 200 {
                    bail!(
                        "HTTP {}: {}",
                        resp.status,
                        String::from_utf8_lossy(&resp.body)
                    );
                }
                stats::record(&mut h, due.elapsed());
            }
            anyhow::Ok(h)
        }));
    }
    let mut h = stats::histogram()?;
    for t in tasks {
        h.add(t.await??)?;
    }
    Ok(h)
}

/// `runs` times: `seconds` of load on each of the two nginx servers, taken in
/// alternating slices (plain, gated, plain, …) so that a noisy moment on the
/// shared machine falls on both sides alike rather than on whichever ran then.
pub fn through_nginx(
    rate: f64,
    seconds: u64,
    runs: usize,
    slices: usize,
    json_out: bool,
) -> anyhow::Result<()> {
    if runs == 0 || slices == 0 {
        bail!("--runs and --slices must be at least 1");
    }
    let server = Server::start(None)?;
    let tmp = tempfile::tempdir()?;
    let (gate_port, gated, plain) = (free_port()?, free_port()?, free_port()?);
    let cfg = gate_config(&server, tmp.path(), gate_port, gated)?;
    // Gate and upstream on their own runtime (one worker each side of the load).
    let svc = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (upstream, key, token) = svc.block_on(async {
        let gate = lapse_gate::Gate::new(cfg).await?;
        let l = tokio::net::TcpListener::bind(("127.0.0.1", gate_port)).await?;
        tokio::spawn(lapse_gate::serve(gate, l, std::future::pending()));
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = up.local_addr()?.port();
        let app = axum::Router::new().fallback(|| async { "ok" });
        tokio::spawn(async move { axum::serve(up, app).await });
        let (key, token, _) = token(&server).await?;
        anyhow::Ok((port, key, token))
    })?;
    let _nginx = nginx(tmp.path(), gated, plain, gate_port, upstream)?;
    std::thread::sleep(Duration::from_millis(1000));
    let per_slice = ((rate * seconds as f64) as usize / slices).max(1);
    let path = "/orders/7";
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut added_p99s, mut added_medians) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let (mut hp, mut hg) = (stats::histogram()?, stats::histogram()?);
        for _ in 0..slices {
            for (port, h) in [(plain, &mut hp), (gated, &mut hg)] {
                let host = format!("127.0.0.1:{port}");
                let url = format!("http://{host}{path}");
                let now = SystemClock.now().unix_seconds();
                let auth = format!("DPoP {token}");
                let reqs: Vec<Vec<u8>> = (0..per_slice)
                    .map(|_| {
                        let proof = key.proof("GET", &url, Some(&token), now);
                        get(&host, path, &[("Authorization", &auth), ("DPoP", &proof)])
                    })
                    .collect();
                let slice = load.block_on(fixed_rate(port, reqs, rate, 16))?;
                h.add(&slice)?;
            }
        }
        let mut both = Vec::new();
        for (name, h) in [("plain", &hp), ("gated", &hg)] {
            let s = stats::summary(h);
            emit(
                json_out,
                format!(
                    "run {run}: nginx {name} at {rate:.0}/s, {seconds}s in {slices} slices: {}",
                    s.line()
                ),
                json!({ "bench": format!("gate.nginx.{name}"), "run": run, "rate": rate, "latency": s.json() }),
            );
            both.push(s);
        }
        if let [p, g] = both.as_slice() {
            let added = g.p99_ns.saturating_sub(p.p99_ns);
            let added_median = g.median_ns.saturating_sub(p.median_ns);
            emit(
                json_out,
                format!(
                    "run {run}: gate adds at {rate:.0}/s through nginx: median {}, p99 {}",
                    stats::fmt_ns(added_median),
                    stats::fmt_ns(added)
                ),
                json!({ "bench": "gate.nginx.added", "run": run, "median_ns": added_median, "p99_ns": added }),
            );
            added_p99s.push(added as f64);
            added_medians.push(added_median as f64);
        }
    }
    let (m, p) = (
        stats::median_f64(added_medians),
        stats::median_f64(added_p99s),
    );
    emit(
        json_out,
        format!(
            "gate adds at {rate:.0}/s through nginx, median of {runs} runs: median {}, p99 {}",
            stats::fmt_ns(m as u64),
            stats::fmt_ns(p as u64)
        ),
        json!({ "bench": "gate.nginx.added.summary", "runs": runs, "median_ns": m, "p99_ns": p }),
    );
    drop(svc);
    server.stop();
    Ok(())
}
