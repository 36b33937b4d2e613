//! `lapse run`: a task is a process.
//!
//! Obtains the workload's identity token, exchanges it (with a DPoP key that exists
//! only in this process's memory and the command's environment) for one grant, runs
//! the command with the grant's credentials in its environment, and ends the grant
//! the moment the command exits. If the grant ends first (revoked, expired, renewal
//! refused), the command is terminated: SIGTERM, then SIGKILL after `--grace`.
//!
//! Exit codes: the command's own; 128+N when a signal N ended it; 111 when the grant
//! ended first and the command was stopped; before the command starts, the CLI's
//! codes (1 failure, 2 usage, 3 denied, 4 approval needed, 7 unavailable); 126/127
//! when the command cannot be executed / is not found.

use crate::identity_source::{IdentityArgs, IdentitySource};
use crate::{AccessArgs, Fail, fail};
use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_token::DpopKey;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

/// The grant ended before the command did, and the command was stopped.
pub const EXIT_GRANT_ENDED: u8 = 111;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Broker URL.
    #[arg(long, env = "LAPSE_URL", default_value = "http://127.0.0.1:7800")]
    url: String,
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    access: AccessArgs,
    /// Renew the grant before it expires, for as long as the command runs; each
    /// renewal is a fresh policy decision, capped by the grant's maximum lifetime.
    #[arg(long)]
    renew: bool,
    /// When the request needs approval, wait up to this long for people to decide
    /// (a live line on a terminal, plain lines otherwise); without it, exit 4.
    #[arg(long)]
    wait: Option<TtlDuration>,
    /// How long the command has between SIGTERM and SIGKILL when its grant ends.
    #[arg(long, default_value = "10s")]
    grace: TtlDuration,
    /// How often to ask the broker whether the grant still holds.
    #[arg(long, default_value = "1s")]
    poll: TtlDuration,
    /// Rename a variable given to the command, e.g. `PGPASSWORD=DB_PASSWORD`; repeatable.
    #[arg(long = "env-name", value_name = "FROM=TO")]
    env_names: Vec<String>,
    /// Print nothing of its own unless something goes wrong.
    #[arg(long, short)]
    quiet: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// The grant as `lapse run` holds it.
struct Held {
    base: String,
    id: String,
    token: String,
    key: DpopKey,
    expires_at: Instant,
    /// Seconds each renewal asks for.
    ttl_secs: u64,
    /// Seconds the broker granted last time (issue or renewal): renewal is due when
    /// a third of them is left.
    granted_secs: u64,
    /// Whether to renew: `--renew`, until the grant's maximum lifetime is reached.
    renewing: bool,
}

impl Held {
    async fn call(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        action: &str,
        body: Option<Value>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let url = format!("{}/v1/grants/{}/{action}", self.base, self.id);
        let proof = self.key.proof(
            method.as_str(),
            &url,
            Some(&self.token),
            SystemClock.now().unix_seconds(),
        );
        let mut rb = http
            .request(method, &url)
            .header("Authorization", format!("DPoP {}", self.token))
            .header("DPoP", proof)
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send().await
    }
}

fn say(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("lapse run: {msg}");
    }
}

/// Runs the command; returns the exit code `lapse run` must exit with.
pub async fn run(a: RunArgs) -> Result<u8, Fail> {
    // Our handlers go in first: a signal that arrives while the grant is being
    // obtained or the command started is held and passed on, never lost or fatal.
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel::<Signal>();
    for (kind, sig) in [
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::quit(), Signal::SIGQUIT),
        (SignalKind::user_defined1(), Signal::SIGUSR1),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
    ] {
        let Ok(mut stream) = signal(kind) else {
            continue;
        };
        let tx = sig_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }

    let env = |k: &str| std::env::var(k).ok();
    let source = IdentitySource::detect(&a.identity, &env)?;
    let http = lapse_identity::http_client();
    let identity = source
        .token(&http, &env, SystemClock.now().unix_seconds())
        .await?;
    let renames = parse_renames(&a.env_names)?;
    let base = a.url.trim_end_matches('/').to_owned();
    let key = DpopKey::generate();

    // 1. One grant for this task.
    let issued = crate::exchange(
        &http,
        &base,
        &key,
        &a.access.exchange_form(identity),
        a.wait,
    )
    .await
    .map_err(|(f, body)| {
        if body["error"] == "authorization_pending" {
            fail(4, pending_message(&body))
        } else {
            f
        }
    })?;
    let token = issued["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let id = issued["grant_id"].as_str().unwrap_or_default().to_owned();
    let expires_in = issued["expires_in"].as_u64().unwrap_or(0);
    if token.is_empty() || id.is_empty() {
        return Err(fail(1, "the broker's answer has no access token"));
    }
    let mut held = Held {
        base: base.clone(),
        id,
        token,
        key,
        expires_at: Instant::now() + Duration::from_secs(expires_in),
        ttl_secs: a.access.ttl.map_or(expires_in, TtlDuration::secs).max(1),
        granted_secs: expires_in,
        renewing: a.renew,
    };
    say(
        a.quiet,
        &format!(
            "grant {} for {}, expires in {expires_in}s (identity from {})",
            held.id,
            a.access.describe(),
            source.name()
        ),
    );

    // 2. The command, with the grant in its environment and no identity material.
    let Some((program, args)) = a.command.split_first() else {
        complete(&http, &held, json!({ "reason": "`lapse run`: no command" })).await;
        return Err(fail(2, "no command given after `--`"));
    };
    let vars = match child_env(&issued, &held, &base, &renames) {
        Ok(v) => v,
        Err(e) => {
            complete(
                &http,
                &held,
                json!({ "reason": format!("`lapse run`: {}", e.1) }),
            )
            .await;
            return Err(e);
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    for v in source.secret_vars(&a.identity) {
        cmd.env_remove(v);
    }
    cmd.envs(vars);
    // Signals for the command reach it through us. Without a terminal (CI), the
    // command gets a process group of its own, so that ending it ends everything
    // it started (a shell's children too). On a terminal it stays in ours so that
    // it can read the terminal; SIGINT and SIGQUIT from the terminal then already
    // reach it, and forwarding them would deliver them twice.
    let from_terminal = std::io::stdin().is_terminal();
    if !from_terminal {
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            complete(
                &http,
                &held,
                json!({ "reason": format!("`lapse run`: the command could not start: {e}") }),
            )
            .await;
            return Err(fail(code, format!("cannot run `{program}`: {e}")));
        }
    };
    let target = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(|p| Target {
            pid: Pid::from_raw(p),
            group: !from_terminal,
        });
    // 3. Watch both: the command ending, and the grant ending.
    let poll = Duration::from_secs(a.poll.secs().max(1));
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended: String = loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| fail(1, format!("waiting for the command: {e}")))?;
                let (code, body) = outcome(status);
                complete(&http, &held, body).await;
                return Ok(code);
            }
            Some(sig) = sig_rx.recv() => {
                let doubled = from_terminal && matches!(sig, Signal::SIGINT | Signal::SIGQUIT);
                if let (Some(t), false) = (&target, doubled) {
                    t.signal(sig);
                }
            }
            _ = ticker.tick() => {
                if let Some(why) = check(&http, &mut held).await {
                    break why;
                }
            }
        }
    };

    // 4. The grant ended first: stop the command.
    say(
        false,
        &format!("access ended: {ended}; stopping the command"),
    );
    if let Some(t) = &target {
        t.signal(Signal::SIGTERM);
    }
    let grace = Duration::from_secs(a.grace.secs());
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            say(
                false,
                &format!(
                    "the command did not exit within {}s of SIGTERM; sending SIGKILL",
                    grace.as_secs()
                ),
            );
            match &target {
                Some(t) => t.signal(Signal::SIGKILL),
                None => {
                    let _ = child.start_kill();
                }
            }
            child.wait().await.ok()
        }
    };
    if let Some(s) = status {
        say(a.quiet, &format!("the command ended ({})", describe(s)));
    }
    Err(fail(
        EXIT_GRANT_ENDED,
        format!("the grant ended before the command: {ended}"),
    ))
}

/// Where signals for the command go: its process group when it has its own.
struct Target {
    pid: Pid,
    group: bool,
}

impl Target {
    fn signal(&self, sig: Signal) {
        // The process (or group) may be gone already; that is what we wanted.
        let _ = if self.group {
            killpg(self.pid, sig)
        } else {
            kill(self.pid, sig)
        };
    }
}

/// Who must approve, from an `authorization_pending` answer.
fn pending_message(body: &Value) -> String {
    let n = body["approvals_required"].as_u64().unwrap_or(1);
    let who = body["approvers"]
        .as_str()
        .map_or_else(|| "an approver".to_owned(), |g| format!("the `{g}` group"));
    format!(
        "the request needs {n} approval(s) from {who} (request_id {}); nothing was run (give --wait to wait for them)",
        body["request_id"].as_str().unwrap_or("?")
    )
}

/// Asks whether the grant still holds, renewing it when due. `Some(why)` when it
/// has ended.
async fn check(http: &reqwest::Client, held: &mut Held) -> Option<String> {
    let now = Instant::now();
    let remaining = held.expires_at.saturating_duration_since(now);
    // Renew once two thirds of what was granted is used (at least 5 s before the end).
    let due = remaining <= Duration::from_secs((held.granted_secs / 3).max(5));
    if held.renewing && due && remaining > Duration::ZERO {
        let body = json!({ "ttl": format!("{}s", held.ttl_secs) });
        match held
            .call(http, reqwest::Method::POST, "renew", Some(body))
            .await
        {
            Ok(r) if r.status().is_success() => {
                if let Ok(v) = r.json::<Value>().await
                    && let (Some(t), Some(exp)) =
                        (v["access_token"].as_str(), v["expires_in"].as_u64())
                {
                    held.token = t.to_owned();
                    held.expires_at = Instant::now() + Duration::from_secs(exp);
                    held.granted_secs = exp;
                    eprintln!("lapse run: renewed; expires in {exp}s");
                }
            }
            // At the maximum lifetime the grant cannot be renewed but still holds:
            // the command keeps it until its expiry.
            Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => {
                held.renewing = false;
                eprintln!(
                    "lapse run: the grant cannot be renewed further (maximum lifetime); it ends in {}s",
                    remaining.as_secs()
                );
            }
            Ok(r) => {
                let status = r.status();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                let why = v["error_description"]
                    .as_str()
                    .unwrap_or("renewal refused")
                    .to_owned();
                return Some(format!("renewal refused (HTTP {status}): {why}"));
            }
            // The broker is unreachable: try again next tick; the local expiry
            // below still stops the command on time.
            Err(_) => {}
        }
    }
    if Instant::now() >= held.expires_at {
        return Some("the grant expired".into());
    }
    match held.call(http, reqwest::Method::GET, "status", None).await {
        Ok(r) if r.status().is_success() => {
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if v["live"].as_bool() == Some(true) {
                if let Some(exp) = v["expires_in"].as_u64() {
                    held.expires_at = Instant::now() + Duration::from_secs(exp);
                }
                None
            } else {
                let state = v["state"].as_str().unwrap_or("ended");
                let reason = v["end"]["reason"].as_str().unwrap_or("");
                let by = v["end"]["by"].as_str().unwrap_or("");
                Some(if by.is_empty() {
                    format!("{state}: {reason}")
                } else {
                    format!("{state} by {by}: {reason}")
                })
            }
        }
        Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => {
            Some("the access token is no longer valid".into())
        }
        // Anything else is the broker's trouble, not an answer about the grant.
        _ => None,
    }
}

async fn complete(http: &reqwest::Client, held: &Held, body: Value) {
    match held
        .call(http, reqwest::Method::POST, "complete", Some(body))
        .await
    {
        Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT => {}
        Ok(r) => eprintln!(
            "lapse run: could not complete grant {} (HTTP {}); it ends at its expiry",
            held.id,
            r.status()
        ),
        Err(e) => eprintln!(
            "lapse run: could not complete grant {} ({e}); it ends at its expiry",
            held.id
        ),
    }
}

/// The exit code to pass on, and the completion record.
fn outcome(status: ExitStatus) -> (u8, Value) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (
            u8::try_from(code & 0xff).unwrap_or(1),
            json!({ "reason": format!("`lapse run`: the command exited with status {code}"), "exit_status": code }),
        ),
        (None, Some(sig)) => (
            u8::try_from((128 + sig) & 0xff).unwrap_or(1),
            json!({ "reason": format!("`lapse run`: the command was ended by signal {sig}"), "signal": sig }),
        ),
        (None, None) => (
            1,
            json!({ "reason": "`lapse run`: the command ended (unknown status)" }),
        ),
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Every variable `lapse run` may give the command (PostgreSQL's only with a
/// PostgreSQL credential).
const VARS: &[&str] = &[
    "LAPSE_ACCESS_TOKEN",
    "LAPSE_TOKEN_TYPE",
    "LAPSE_DPOP_KEY",
    "LAPSE_DPOP_JKT",
    "LAPSE_GRANT_ID",
    "LAPSE_URL",
    "LAPSE_EXPIRES_IN",
    "PGHOST",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
];

fn parse_renames(pairs: &[String]) -> Result<BTreeMap<String, String>, Fail> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (from, to) = p
            .split_once('=')
            .filter(|(f, t)| !f.is_empty() && !t.is_empty())
            .ok_or_else(|| fail(2, format!("`--env-name {p}`: expected FROM=TO")))?;
        let valid = |n: &str| {
            n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !n.starts_with(|c: char| c.is_ascii_digit())
        };
        if !VARS.contains(&from) {
            return Err(fail(
                2,
                format!(
                    "`--env-name {p}`: `{from}` is not one of {}",
                    VARS.join(", ")
                ),
            ));
        }
        if !valid(to) {
            return Err(fail(
                2,
                format!("`--env-name {p}`: `{to}` is not a variable name"),
            ));
        }
        out.insert(from.to_owned(), to.to_owned());
    }
    Ok(out)
}

/// The variables the command gets.
fn child_env(
    issued: &Value,
    held: &Held,
    base: &str,
    renames: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, Fail> {
    let key_pem = held
        .key
        .signing_key()
        .to_pkcs8_pem()
        .ok_or_else(|| fail(1, "cannot encode the DPoP key"))?;
    let mut vars: Vec<(&str, String)> = vec![
        ("LAPSE_ACCESS_TOKEN", held.token.clone()),
        ("LAPSE_TOKEN_TYPE", "DPoP".into()),
        ("LAPSE_DPOP_KEY", key_pem),
        ("LAPSE_DPOP_JKT", held.key.jkt().to_owned()),
        ("LAPSE_GRANT_ID", held.id.clone()),
        ("LAPSE_URL", base.to_owned()),
        (
            "LAPSE_EXPIRES_IN",
            issued["expires_in"].as_u64().unwrap_or(0).to_string(),
        ),
    ];
    for c in issued["credentials"].as_array().into_iter().flatten() {
        if c["type"] == "postgres" {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            vars.push(("PGHOST", s("host")));
            vars.push(("PGPORT", c["port"].as_u64().unwrap_or(5432).to_string()));
            vars.push(("PGDATABASE", s("dbname")));
            vars.push(("PGUSER", s("username")));
            vars.push(("PGPASSWORD", s("password")));
        }
    }
    Ok(vars
        .into_iter()
        .map(|(n, v)| (renames.get(n).cloned().unwrap_or_else(|| n.to_owned()), v))
        .collect())
}
