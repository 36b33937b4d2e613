//! `lapse-bench run`: what `lapse run` adds to a command's start-up.
//!
//! Runs `true` directly and through `lapse run` (identity from the environment,
//! token exchange with a fresh DPoP key, completion when `true` exits) against a
//! local broker, alternating the two so machine noise hits both alike. The added
//! latency of each `lapse run` sample is its wall-clock time minus the median of
//! the direct runs.

use crate::{Server, emit};
use anyhow::{Context, bail};
use lapse_bench::stats;
use lapse_core::{Clock, SystemClock};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `lapse` binary next to this one (`cargo build --release -p lapse-cli`).
fn lapse_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name("lapse");
    if !p.exists() {
        bail!(
            "`{}` not found: build it with `cargo build --release -p lapse-cli`",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(samples: usize, json_out: bool) -> anyhow::Result<()> {
    let lapse = lapse_binary()?;
    let server = Server::start(None)?;
    let url = format!("http://{}", server.addr);
    let now = SystemClock.now().unix_seconds();
    let identity = lapse_server::dev::dev_token(
        &server.dir,
        "spiffe://dev.lapse.local/ci/deploy",
        3600,
        &[],
        now,
    )
    .map_err(anyhow::Error::msg)?;
    let direct_cmd = || {
        let mut c = Command::new("true");
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let wrapped_cmd = || {
        let mut c = Command::new(&lapse);
        c.args([
            "run",
            "--quiet",
            "--audience",
            "orders-db",
            "--scope",
            "read",
            "--task",
            "bench",
            "--purpose",
            "start-up latency",
            "--",
            "true",
        ])
        .env("LAPSE_URL", &url)
        .env("LAPSE_IDENTITY_TOKEN", &identity)
        .env_remove("LAPSE_IDENTITY_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        c
    };
    let time = |mut c: Command| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let o = c.output().context("running a sample")?;
        let d = t.elapsed();
        if !o.status.success() {
            bail!(
                "sample failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(d)
    };
    // Warm up both paths (page cache, the broker's verified-token cache).
    for _ in 0..20 {
        time(direct_cmd())?;
        time(wrapped_cmd())?;
    }
    let mut direct = Vec::with_capacity(samples);
    let mut wrapped = Vec::with_capacity(samples);
    for _ in 0..samples {
        direct.push(time(direct_cmd())?);
        wrapped.push(time(wrapped_cmd())?);
    }
    direct.sort();
    let base = direct.get(direct.len() / 2).copied().unwrap_or_default();
    let mut d = stats::histogram()?;
    let mut w = stats::histogram()?;
    let mut added = stats::histogram()?;
    for x in &direct {
        stats::record(&mut d, *x);
    }
    for x in &wrapped {
        stats::record(&mut w, *x);
        stats::record(&mut added, x.saturating_sub(base));
    }
    let (d, w, a) = (
        stats::summary(&d),
        stats::summary(&w),
        stats::summary(&added),
    );
    emit(
        json_out,
        format!("run: `true` directly: {}", d.line()),
        json!({ "bench": "run.direct", "latency": d.json() }),
    );
    emit(
        json_out,
        format!("run: `lapse run -- true`: {}", w.line()),
        json!({ "bench": "run.wrapped", "latency": w.json() }),
    );
    emit(
        json_out,
        format!("run: added by `lapse run`: {}", a.line()),
        json!({ "bench": "run.added", "latency": a.json() }),
    );
    server.stop();
    Ok(())
}
