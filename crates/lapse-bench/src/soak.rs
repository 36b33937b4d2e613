//! `lapse-bench soak`: a real `lapse serve --dev` process held at a fixed rate of
//! token exchanges (each a new grant, each with a fresh DPoP proof made as it is
//! sent) for a long time. Reports the server's resident memory after warm-up and at
//! the end, every error, and latency per minute (from each request's scheduled time,
//! so a stall shows as latency, not as a lower rate).

use crate::emit;
use anyhow::{Context, bail};
use lapse_bench::http::{Conn, form_value, post_form};
use lapse_bench::stats;
use lapse_core::{Clock, SystemClock};
use lapse_token::DpopKey;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long the dev broker remembers a DPoP proof: `dpop_max_age` (60 s) plus the
/// 5 s allowed clock skew. Until a warm-up has outlasted it, the replay cache is
/// still filling.
const REPLAY_WINDOW_SECS: u64 = 65;

/// The server's resident set size in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Where the resident memory is (`smaps_rollup`): anonymous (heap, stacks) and
/// file-backed or shared (SQLite's `-shm` wal-index is a shared file mapping), in
/// KiB, with the sizes of the database files.
fn breakdown(pid: u32, data: &std::path::Path) -> String {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let (rss, anon) = (field("Rss:"), field("Anonymous:"));
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let size = |suffix: &str| {
        std::fs::metadata(data.join(format!("lapse.db{suffix}"))).map_or(0, |m| m.len() / 1024)
    };
    format!(
        "anonymous {anon} KiB, file/shared {} KiB, {threads} threads; lapse.db {} KiB, -wal {} KiB, -shm {} KiB",
        rss.saturating_sub(anon),
        size(""),
        size("-wal"),
        size("-shm")
    )
}

pub fn run(
    rate: f64,
    minutes: u64,
    warmup_secs: u64,
    grant_ttl: u64,
    json_out: bool,
) -> anyhow::Result<()> {
    if warmup_secs <= grant_ttl.max(REPLAY_WINDOW_SECS) {
        eprintln!(
            "warning: a {warmup_secs} s warm-up ends before the {grant_ttl} s grants (or the {REPLAY_WINDOW_SECS} s DPoP replay window) turn over: \
             the first minutes measure the broker filling up, not a steady state"
        );
    }
    let server = crate::devserver::DevServer::spawn()?;
    let (addr, data) = (server.addr, server.data.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        server.ready().await?;
        // After it listens: under a wrapper the server is a process of its own.
        let pid = server.pid();
        let now = SystemClock.now().unix_seconds();
        // 1,000 workloads, their identity tokens valid for the whole run.
        let key = lapse_token::SigningKey::load(&data.join(lapse_server::dev::DEV_ISSUER_KEY))?;
        let ttl = i64::try_from((minutes + 5) * 60).unwrap_or(3600);
        let identities: Arc<Vec<String>> = Arc::new(
            (0..1000)
                .map(|i| {
                    key.sign_jwt(
                        "JWT",
                        &json!({
                            "iss": lapse_server::dev::DEV_ISSUER, "sub": format!("spiffe://dev.lapse.local/ci/job-{i}"),
                            "aud": lapse_server::dev::DEV_AUDIENCE, "iat": now, "nbf": now, "exp": now + ttl,
                            "jti": format!("soak-{i}"),
                        }),
                    )
                })
                .collect::<Result<_, _>>()?,
        );
        let conns = 8usize;
        let expires_in: Arc<str> = format!("&expires_in={grant_ttl}").into();
        let total = (rate * (warmup_secs + minutes * 60) as f64) as usize;
        let errors = Arc::new(AtomicU64::new(0));
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        // Latency per minute (index 0: warm-up).
        let minute_of = move |due: tokio::time::Instant| -> usize {
            let s = due.saturating_duration_since(start).as_secs();
            if s < warmup_secs { 0 } else { 1 + ((s - warmup_secs) / 60) as usize }
        };
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (identities, errors, expires_in) =
                (identities.clone(), errors.clone(), expires_in.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::connect(addr).await?;
                let dpop = DpopKey::generate();
                let host = addr.to_string();
                let htu = format!("http://{host}/oauth/token");
                let mut hists: Vec<hdrhistogram::Histogram<u64>> = Vec::new();
                for i in (c..total).step_by(conns) {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    let now = SystemClock.now().unix_seconds();
                    let body = format!(
                        "grant_type={}&subject_token={}&subject_token_type={}&audience=orders-db&scope=read&task=soak-{i}&purpose=soak{expires_in}",
                        form_value("urn:ietf:params:oauth:grant-type:token-exchange"),
                        form_value(identities.get(i % identities.len()).map_or("", String::as_str)),
                        form_value("urn:ietf:params:oauth:token-type:jwt"),
                    );
                    let proof = dpop.proof("POST", &htu, None, now);
                    let req = post_form(&host, "/oauth/token", &[("DPoP", &proof)], &body);
                    let ok = match conn.send(&req).await {
                        Ok(r) => r.status == 200,
                        Err(_) => {
                            conn = Conn::connect(addr).await?;
                            false
                        }
                    };
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let m = minute_of(due);
                    while hists.len() <= m {
                        hists.push(stats::histogram()?);
                    }
                    if let Some(h) = hists.get_mut(m) {
                        stats::record(h, due.elapsed());
                    }
                }
                anyhow::Ok(hists)
            }));
        }
        // Memory: after warm-up, then every minute.
        tokio::time::sleep_until(start + Duration::from_secs(warmup_secs)).await;
        let rss_start = rss_kib(pid)?;
        let mem_start = breakdown(pid, &data);
        let mut samples = vec![rss_start];
        let mut where_ = vec![mem_start.clone()];
        for _ in 0..minutes {
            tokio::time::sleep(Duration::from_secs(60)).await;
            samples.push(rss_kib(pid)?);
            where_.push(breakdown(pid, &data));
        }
        let mut per_minute: Vec<hdrhistogram::Histogram<u64>> = Vec::new();
        for t in tasks {
            for (m, h) in t.await??.into_iter().enumerate() {
                while per_minute.len() <= m {
                    per_minute.push(stats::histogram()?);
                }
                if let Some(all) = per_minute.get_mut(m) {
                    all.add(&h)?;
                }
            }
        }
        let rss_end = rss_kib(pid)?;
        let mem_end = breakdown(pid, &data);
        emit(
            json_out,
            format!("memory after warm-up: {mem_start}\nmemory at the end: {mem_end}"),
            json!({ "bench": "soak.memory", "start": mem_start, "end": mem_end }),
        );
        let growth = (rss_end as f64 - rss_start as f64) / rss_start as f64 * 100.0;
        for (m, h) in per_minute.iter().enumerate().skip(1) {
            let s = stats::summary(h);
            emit(
                json_out,
                format!(
                    "minute {m}: {} (rss {} KiB: {})",
                    s.line(),
                    samples.get(m).copied().unwrap_or(rss_end),
                    where_.get(m).map_or("", String::as_str)
                ),
                json!({ "bench": "soak.minute", "minute": m, "latency": s.json(), "rss_kib": samples.get(m) }),
            );
        }
        let first = per_minute.get(1).map(stats::summary);
        let last = per_minute.last().map(stats::summary);
        let errs = errors.load(Ordering::Relaxed);
        emit(
            json_out,
            format!(
                "soak {rate}/s for {minutes} min ({total} requests incl. {warmup_secs}s warm-up): errors {errs}, rss {rss_start} KiB -> {rss_end} KiB ({growth:+.1}%), p50 {} -> {}, p99 {} -> {} (first -> last minute)",
                first.as_ref().map_or("-".into(), |s| stats::fmt_ns(s.median_ns)),
                last.as_ref().map_or("-".into(), |s| stats::fmt_ns(s.median_ns)),
                first.as_ref().map_or("-".into(), |s| stats::fmt_ns(s.p99_ns)),
                last.as_ref().map_or("-".into(), |s| stats::fmt_ns(s.p99_ns)),
            ),
            json!({ "bench": "soak", "rate": rate, "minutes": minutes, "errors": errs, "rss_start_kib": rss_start, "rss_end_kib": rss_end, "rss_growth_pct": growth }),
        );
        if errs > 0 {
            bail!("{errs} requests failed during the soak");
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}
