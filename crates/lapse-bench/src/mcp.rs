//! `lapse-bench mcp`: what `lapse mcp-proxy` adds to a tool call, and what a
//! sub-agent's token costs.
//!
//! Per-call overhead: the same open-loop stream of `tools/call`s (each sent at its
//! scheduled time whatever is outstanding, latency from its write) goes once
//! straight to an MCP server over stdio and once through `lapse mcp-proxy` over
//! stdio to that server; the server is this binary's `mcp-upstream`, which answers
//! at once, so the difference is the proxy (token and grant check, declared
//! intent, Cedar, the audit record queued, two more pipe hops). The proxy runs
//! against a real `lapse serve --dev` (feed, policies, audit reports).
//!
//! Sub-agent exchange: RFC 8693 exchanges of the agent's token for a narrower one,
//! one at a time over loopback HTTP, each with a fresh DPoP proof.

use crate::devserver::{DevServer, lapse_bin};
use crate::emit;
use anyhow::{Context, bail};
use lapse_bench::http::{Conn, form_value, post_form};
use lapse_bench::stats;
use lapse_core::{Clock, SystemClock};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Sub-agent exchanges per second (one workload: under its default rate limit).
const EXCHANGE_RATE: f64 = 150.0;

/// `lapse-bench mcp-upstream`: a stdio MCP server with one tool, `lookup`, that
/// answers every call at once (the fastest possible upstream).
pub fn upstream() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    for line in stdin.lock().lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(id) = msg.get("id").cloned() else {
            continue;
        };
        let result = match msg.get("method").and_then(Value::as_str) {
            Some("initialize") => json!({
                "protocolVersion": "2025-11-25",
                "capabilities": { "tools": {} },
                "serverInfo": { "name": "lapse-bench-upstream", "version": "0" },
            }),
            Some("tools/list") => json!({ "tools": [{
                "name": "lookup",
                "description": "answers at once",
                "inputSchema": { "type": "object", "properties": { "key": { "type": "string" } } },
            }] }),
            Some("tools/call") => {
                json!({ "content": [{ "type": "text", "text": "found" }], "isError": false })
            }
            _ => json!({}),
        };
        writeln!(
            out,
            "{}",
            json!({ "jsonrpc": "2.0", "id": id, "result": result })
        )?;
        out.flush()?;
    }
    Ok(())
}

/// A stdio MCP server process under test, driven open-loop.
struct Peer {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    pending: Arc<Mutex<HashMap<u64, tokio::time::Instant>>>,
    done: tokio::sync::mpsc::UnboundedReceiver<(Duration, bool)>,
}

impl Peer {
    async fn start(mut cmd: tokio::process::Command) -> anyhow::Result<Self> {
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let pending: Arc<Mutex<HashMap<u64, tokio::time::Instant>>> = Arc::default();
        let (tx, done) = tokio::sync::mpsc::unbounded_channel();
        let p = pending.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let due = p.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(due) = due {
                    let ok = msg
                        .get("result")
                        .is_some_and(|r| r.get("isError") != Some(&json!(true)));
                    let _ = tx.send((due.elapsed(), ok));
                }
            }
        });
        let mut peer = Self {
            child,
            stdin,
            pending,
            done,
        };
        peer.send(0, "initialize", json!({ "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": { "name": "lapse-bench", "version": "0" } }), tokio::time::Instant::now()).await?;
        let (_, ok) = tokio::time::timeout(Duration::from_secs(30), peer.done.recv())
            .await?
            .context("the server closed")?;
        if !ok {
            bail!("initialize failed");
        }
        peer.stdin
            .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n")
            .await?;
        Ok(peer)
    }

    async fn send(
        &mut self,
        id: u64,
        method: &str,
        params: Value,
        due: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, due);
        }
        let mut line =
            json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        Ok(())
    }

    /// `calls` tool calls at `rate` per second; latencies from each call's due time.
    async fn drive(
        &mut self,
        calls: usize,
        rate: f64,
    ) -> anyhow::Result<(hdrhistogram::Histogram<u64>, usize)> {
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut h = stats::histogram()?;
        let mut failed = 0;
        let mut received = 0;
        for i in 0..calls {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            // Collect answers while waiting for the next send time.
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => break,
                    Some((d, ok)) = self.done.recv() => {
                        received += 1;
                        if ok { stats::record(&mut h, d) } else { failed += 1 }
                    }
                }
            }
            let params = json!({ "name": "lookup", "arguments": { "key": format!("k-{i}") } });
            // Timed from the write, not the due time: the runtime's timer wakes up
            // to a millisecond late, which would drown what is measured. The writer
            // never waits for answers, so a slow peer still shows (pipe full).
            self.send(
                i as u64 + 1,
                "tools/call",
                params,
                tokio::time::Instant::now(),
            )
            .await?;
        }
        while received < calls {
            let Ok(Some((d, ok))) =
                tokio::time::timeout(Duration::from_secs(30), self.done.recv()).await
            else {
                bail!("{} calls never answered", calls - received);
            };
            received += 1;
            if ok {
                stats::record(&mut h, d);
            } else {
                failed += 1;
            }
        }
        Ok((h, failed))
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

async fn exchange(conn: &mut Conn, host: &str, key: &DpopKey, body: &str) -> anyhow::Result<Value> {
    let htu = format!("http://{host}/oauth/token");
    let proof = key.proof("POST", &htu, None, SystemClock.now().unix_seconds());
    let r = conn
        .send(&post_form(host, "/oauth/token", &[("DPoP", &proof)], body))
        .await?;
    let v: Value = serde_json::from_slice(&r.body)?;
    if r.status != 200 {
        bail!("exchange failed: {} {v}", r.status);
    }
    Ok(v)
}

pub fn run(rate: f64, seconds: u64, exchanges: usize, json_out: bool) -> anyhow::Result<()> {
    let server = DevServer::spawn()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        server.ready().await?;
        let host = server.addr.to_string();
        let now = SystemClock.now().unix_seconds();
        let issuer = lapse_token::SigningKey::load(&server.data.join(lapse_server::dev::DEV_ISSUER_KEY))?;
        let identity = issuer.sign_jwt(
            "JWT",
            &json!({
                "iss": lapse_server::dev::DEV_ISSUER, "sub": "spiffe://dev.lapse.local/agent/bench",
                "aud": lapse_server::dev::DEV_AUDIENCE, "iat": now, "nbf": now, "exp": now + 3600,
                "jti": "bench-agent",
            }),
        )?;
        let key = DpopKey::generate();
        let mut conn = Conn::connect(server.addr).await?;
        let tools = r#"[{"name":"lookup","args":{"key":{"pattern":"k-[0-9]+"}}}]"#;
        let parent = exchange(
            &mut conn,
            &host,
            &key,
            &format!(
                "grant_type={}&subject_token={}&subject_token_type={}&resource=mcp-tools&scope=call&task=bench&purpose=bench&expires_in=900&tools={}",
                form_value("urn:ietf:params:oauth:grant-type:token-exchange"),
                form_value(&identity),
                form_value("urn:ietf:params:oauth:token-type:jwt"),
                form_value(tools),
            ),
        )
        .await?;
        let token = parent
            .get("access_token")
            .and_then(Value::as_str)
            .context("no token")?
            .to_owned();

        // Sub-agent exchanges, one at a time.
        let mut h = stats::histogram()?;
        let child = DpopKey::generate();
        let body = format!(
            "grant_type={}&subject_token={}&subject_token_type={}&dpop_jkt={}&expires_in=60",
            form_value("urn:ietf:params:oauth:grant-type:token-exchange"),
            form_value(&token),
            form_value("urn:ietf:params:oauth:token-type:access_token"),
            child.jkt(),
        );
        // Paced under the broker's per-workload rate (200/s by default), latency
        // from each exchange's due time.
        let start = tokio::time::Instant::now();
        for i in 0..exchanges {
            let due = start + Duration::from_secs_f64(i as f64 / EXCHANGE_RATE);
            tokio::time::sleep_until(due).await;
            exchange(&mut conn, &host, &key, &body).await?;
            stats::record(&mut h, due.elapsed());
        }
        let s = stats::summary(&h);
        emit(
            json_out,
            format!(
                "sub-agent token exchange ({exchanges} at {EXCHANGE_RATE}/s): {}",
                s.line()
            ),
            json!({ "bench": "mcp.delegate", "latency": s.json() }),
        );

        // Per-call overhead over stdio.
        let calls = (rate * seconds as f64) as usize;
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("mcp-proxy.toml");
        let me = std::env::current_exe()?;
        std::fs::write(
            &cfg,
            format!(
                "broker = \"http://{host}\"\naudience = \"mcp-tools\"\ntoken = \"env:LAPSE_PROXY_TOKEN\"\n\n[[upstream]]\nname = \"bench\"\ncommand = [{:?}, \"mcp-upstream\"]\n",
                me.to_str().context("path")?
            ),
        )?;
        let admin = std::fs::read_to_string(server.data.join("admin.token"))?;
        let mut results = Vec::new();
        for (label, through_proxy) in [("direct", false), ("through lapse mcp-proxy", true)] {
            let mut cmd = if through_proxy {
                let mut c = tokio::process::Command::new(lapse_bin()?);
                c.args(["mcp-proxy", "--config"])
                    .arg(&cfg)
                    .env("LAPSE_ACCESS_TOKEN", &token)
                    .env("LAPSE_PROXY_TOKEN", admin.trim());
                c
            } else {
                let mut c = tokio::process::Command::new(&me);
                c.arg("mcp-upstream");
                c
            };
            cmd.env("LAPSE_LOG", "warn");
            let mut peer = Peer::start(cmd).await?;
            // Warm-up: caches, first Cedar evaluation, the upstream's first call.
            peer.drive((rate as usize).min(500), rate).await?;
            let (h, failed) = peer.drive(calls, rate).await?;
            peer.stop().await;
            if failed > 0 {
                bail!("{failed} calls failed {label}");
            }
            let s = stats::summary(&h);
            emit(
                json_out,
                format!("tools/call {label} at {rate}/s over stdio: {}", s.line()),
                json!({ "bench": "mcp.call", "path": label, "rate": rate, "latency": s.json() }),
            );
            results.push(s);
        }
        if let [direct, proxied] = results.as_slice() {
            let over = |a: u64, b: u64| stats::fmt_ns(b.saturating_sub(a));
            emit(
                json_out,
                format!(
                    "overhead the proxy adds per call: p50 {}, p99 {}",
                    over(direct.median_ns, proxied.median_ns),
                    over(direct.p99_ns, proxied.p99_ns)
                ),
                json!({ "bench": "mcp.overhead", "p50_ns": proxied.median_ns.saturating_sub(direct.median_ns), "p99_ns": proxied.p99_ns.saturating_sub(direct.p99_ns) }),
            );
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}
