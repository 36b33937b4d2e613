//! `lapse run`: a task is a process.
//!
//! Obtains the workload's identity token, exchanges it (with a DPoP key that exists
//! only in this process's memory and the command's environment) for one grant, runs
//! the command with the grant's credentials in its environment, and ends the grant
//! the moment the command exits. If the grant ends first (revoked, expired, renewal
//! refused), the command is terminated: SIGTERM, then SIGKILL after `--grace`.
//! Whatever the command leaves running when it exits is ended the same way, so no
//! process outlives it holding the grant's credentials.
//!
//! Supervision never waits on the network: the broker is asked about the grant by a
//! task of its own, which reports to the supervision loop through a channel. The
//! loop only waits for the command, for signals, for those reports and for the
//! grant's expiry by the local clock, so a slow or frozen broker delays neither
//! forwarded signals nor the stop at expiry.
//!
//! With `--mcp-proxy CONFIG`, the agent's MCP proxy runs beside the command as
//! our child, holding the operator token the command never gets ([`mcp_proxy`]).
//!
//! Exit codes: the command's own; 128+N when a signal N ended it; 111 when the grant
//! ended first and the command was stopped; before the command starts, the CLI's
//! codes (1 failure, 2 usage, 3 denied, 4 approval needed, 7 unavailable); 126/127
//! when the command cannot be executed / is not found. With `--exit-code-base N`,
//! every code of Lapse's own (all but the command's) is N higher.

pub(crate) mod mcp_proxy;

use crate::exchange::{AccessArgs, exchange};
use crate::exit::{Fail, fail};
use crate::identity_source::{IdentityArgs, IdentitySource};
use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_token::DpopKey;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::str::FromStr;
use std::time::Duration;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The grant ended before the command did, and the command was stopped.
pub const EXIT_GRANT_ENDED: u8 = 111;

/// How long completing the grant may take once the command has exited; after
/// that, the grant ends at its expiry.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one status or renewal call may take (it runs in the poll task, never
/// in the supervision loop).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// How long the command (and what it left running) has between SIGTERM and
    /// SIGKILL: `250ms`, `10s`, `1m`.
    #[arg(long, default_value = "10s")]
    grace: Span,
    /// How often to ask the broker whether the grant still holds: `250ms`, `1s`.
    #[arg(long, default_value = "1s")]
    poll: Span,
    /// Rename a variable given to the command, e.g. `PGPASSWORD=DB_PASSWORD`; repeatable.
    #[arg(long = "env-name", value_name = "FROM=TO")]
    env_names: Vec<String>,
    /// Add N to every exit code of Lapse's own (not the command's): denied is N+3,
    /// approval needed N+4, broker unavailable N+7, grant ended N+111, … (0-128).
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=128))]
    exit_code_base: u8,
    /// Write how `lapse run` ended to this file as JSON:
    /// `{"phase": "before-command"|"command", "exit": CODE, "error": MESSAGE|null}`.
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// Start `lapse mcp-proxy --http` with this config beside the command, never
    /// under it: on a free loopback port, its operator token handed over a pipe;
    /// the command gets the proxy's URL in `LAPSE_MCP_URL` and no operator
    /// credential. The proxy ends after the command, once its last tool-call
    /// records are sent.
    #[arg(long, value_name = "CONFIG")]
    mcp_proxy: Option<PathBuf>,
    /// Print nothing of its own unless something goes wrong.
    #[arg(long, short)]
    quiet: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// A positive span of time with millisecond precision, written `250ms`, `10s`,
/// `2m` or `1h`. Local to `lapse run`: config files keep whole-second
/// [`TtlDuration`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(Duration);

impl FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            format!(
                "invalid duration `{s}`: expected a whole number followed by ms, s, m or h, e.g. `250ms`, `10s`"
            )
        };
        let t = s.trim();
        let at = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (digits, unit) = t.split_at(at);
        let n: u64 = digits.parse().map_err(|_| err())?;
        let ms_per = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(err()),
        };
        let ms = n.checked_mul(ms_per).ok_or_else(err)?;
        if ms == 0 {
            return Err(format!("invalid duration `{s}`: must be more than zero"));
        }
        Ok(Self(Duration::from_millis(ms)))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// The grant as `lapse run` holds it.
#[derive(Clone)]
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
        timeout: Duration,
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
            .timeout(timeout);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send().await
    }

    /// Takes in what the poll task reports: `Some(why)` when the grant has ended.
    fn update(&mut self, report: Report) -> Option<String> {
        match report {
            Report::Lease { token, expires_at } => {
                self.token = token;
                self.expires_at = expires_at;
                None
            }
            Report::Ended(why) => Some(why),
        }
    }
}

fn say(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("lapse run: {msg}");
    }
}

/// How a run that got as far as the command ended.
enum Done {
    /// The command exited with this code (128+N for a signal N).
    Exited(u8),
    /// The grant ended first and the command was stopped.
    Stopped(String),
    /// The command could not be waited for.
    Lost(Fail),
}

/// Where `--status-file` writes.
struct StatusFile(Option<PathBuf>);

impl StatusFile {
    /// Writes the record whole (a temporary file renamed over the path), so a
    /// reader never sees half of one.
    fn write(&self, phase: &str, exit: Option<u8>, error: Option<&str>) -> Result<(), String> {
        let Some(path) = &self.0 else {
            return Ok(());
        };
        let record = json!({ "phase": phase, "exit": exit, "error": error });
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, format!("{record}\n"))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("--status-file `{}`: {e}", path.display()))
    }
}

/// Runs the command; returns the exit code `lapse run` must exit with.
pub async fn run(a: RunArgs) -> Result<u8, Fail> {
    let base = a.exit_code_base;
    let status = StatusFile(a.status_file.clone());
    let ours = |code: u8| code.saturating_add(base);
    let (phase, failed) = match supervise(a, &status).await {
        Ok(Done::Exited(code)) => {
            if let Err(e) = status.write("command", Some(code), None) {
                eprintln!("lapse run: {e}");
            }
            return Ok(code);
        }
        Ok(Done::Stopped(why)) => (
            "command",
            Fail(
                ours(EXIT_GRANT_ENDED),
                format!("the grant ended before the command: {why}"),
            ),
        ),
        Ok(Done::Lost(Fail(code, msg))) => ("command", Fail(ours(code), msg)),
        Err(Fail(code, msg)) => ("before-command", Fail(ours(code), msg)),
    };
    if let Err(e) = status.write(phase, Some(failed.0), Some(&failed.1)) {
        eprintln!("lapse run: {e}");
    }
    Err(failed)
}

async fn supervise(a: RunArgs, status_file: &StatusFile) -> Result<Done, Fail> {
    // Our handlers go in first: a signal that arrives while the grant is being
    // obtained or the command started is held and passed on, never lost or fatal.
    let signals = catch_signals();

    // What the command must not get is in our environment from the start (identity
    // material, operator tokens) and soon in our memory: the command, a process of
    // the same user, must not read `/proc/PID/environ` or `mem` of ours.
    mcp_proxy::not_dumpable().map_err(|e| fail(1, e))?;
    // The MCP proxy's config and operator token, before anything is asked: a
    // mistake there is a usage error, and no grant is made for nothing.
    let plan = match &a.mcp_proxy {
        Some(path) => Some(mcp_proxy::Plan::read(path).map_err(|e| fail(2, e))?),
        None => None,
    };
    let env = |k: &str| std::env::var(k).ok();
    let source = IdentitySource::detect(&a.identity, &env)?;
    let http = lapse_identity::http_client();
    let identity = source
        .token(&http, &env, SystemClock.now().unix_seconds())
        .await?;
    let renames = parse_renames(&a.env_names)?;

    // 1. One grant for this task.
    let (issued, held) = obtain_grant(&a, &http, identity).await?;
    say(
        a.quiet,
        &format!(
            "grant {} for {}, expires in {}s (identity from {})",
            held.id,
            a.access.describe(),
            held.granted_secs,
            source.name()
        ),
    );

    // 2. The command, with the grant in its environment and no identity material.
    let started = start_command(
        &a,
        plan.as_ref(),
        &source,
        &issued,
        &held,
        &renames,
        status_file,
    )
    .await;
    let command = match started {
        Ok(c) => c,
        Err(Abort(f, reason)) => {
            complete(&http, &held, json!({ "reason": reason })).await;
            return Err(f);
        }
    };

    // 3. Watch both: the command ending, and the grant ending.
    let supervisor = Supervisor {
        http,
        held,
        command,
        signals,
        grace: a.grace,
        quiet: a.quiet,
    };
    Ok(supervisor.watch(a.poll.0).await)
}

/// The signals passed on to the command, as they arrive.
fn catch_signals() -> mpsc::UnboundedReceiver<Signal> {
    let (sig_tx, sig_rx) = mpsc::unbounded_channel::<Signal>();
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
    sig_rx
}

/// Exchanges the identity token for one grant, bound to a DPoP key that exists
/// only in this process's memory (and, later, the command's environment).
async fn obtain_grant(
    a: &RunArgs,
    http: &reqwest::Client,
    identity: String,
) -> Result<(Value, Held), Fail> {
    let base = a.url.trim_end_matches('/').to_owned();
    let key = DpopKey::generate();
    let issued = exchange(http, &base, &key, &a.access.exchange_form(identity), a.wait)
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
    let held = Held {
        base,
        id,
        token,
        key,
        expires_at: Instant::now() + Duration::from_secs(expires_in),
        ttl_secs: a.access.ttl.map_or(expires_in, TtlDuration::secs).max(1),
        granted_secs: expires_in,
        renewing: a.renew,
    };
    Ok((issued, held))
}

/// Why the command was never started: what `lapse run` fails with, and the
/// reason the grant (obtained for nothing) is completed with.
struct Abort(Fail, String);

/// The command as it runs, and the MCP proxy beside it.
struct Started {
    child: tokio::process::Child,
    target: Option<Target>,
    /// The command's own process group, when it has one.
    group: Option<Pid>,
    /// The command shares our terminal, so the terminal's SIGINT and SIGQUIT
    /// reach it without us.
    from_terminal: bool,
    proxy: Option<mcp_proxy::Supervised>,
    /// The proxy's process, which is none of the command's leftovers.
    spare: Option<Pid>,
}

/// Starts the MCP proxy (with `plan`), then the command.
async fn start_command(
    a: &RunArgs,
    plan: Option<&mcp_proxy::Plan>,
    source: &IdentitySource,
    issued: &Value,
    held: &Held,
    renames: &BTreeMap<String, String>,
    status_file: &StatusFile,
) -> Result<Started, Abort> {
    let Some((program, args)) = a.command.split_first() else {
        return Err(Abort(
            fail(2, "no command given after `--`"),
            "`lapse run`: no command".to_owned(),
        ));
    };
    let mut vars = child_env(issued, held, &held.base, renames).map_err(|e| {
        let reason = format!("`lapse run`: {}", e.1);
        Abort(e, reason)
    })?;
    if let Err(e) = status_file.write("command", None, None) {
        let reason = format!("`lapse run`: {e}");
        return Err(Abort(fail(1, e), reason));
    }
    // The proxy first, as our child: the command is never its parent, so never
    // holds what the proxy holds.
    let identity_vars = source.secret_vars(&a.identity);
    let mut proxy = match plan {
        Some(p) => match mcp_proxy::Supervised::start(p, &identity_vars).await {
            Ok(s) => {
                say(a.quiet, &format!("MCP proxy at {}", s.url));
                vars.push((renamed(renames, "LAPSE_MCP_URL"), s.url.clone()));
                Some(s)
            }
            Err(e) => {
                let reason = format!("`lapse run`: {e}");
                return Err(Abort(fail(7, e), reason));
            }
        },
        None => None,
    };
    let spare = proxy.as_ref().and_then(|p| p.pid);
    // No operator credential, ever: neither the CLI's nor the proxy's.
    let keep_out = match plan {
        Some(p) => p.command_keep_out(),
        None => mcp_proxy::OPERATOR_VARS
            .iter()
            .map(|v| (*v).to_owned())
            .collect(),
    };
    let from_terminal = std::io::stdin().is_terminal();
    let mut cmd = command(program, args, identity_vars.iter().chain(&keep_out), vars);
    // Signals for the command reach it through us. Without a terminal (CI), the
    // command gets a process group of its own, so that ending it ends everything
    // it started (a shell's children too). On a terminal it stays in ours so that
    // it can read the terminal and job control (Ctrl-Z, `fg`) works on the whole
    // job; SIGINT and SIGQUIT from the terminal then already reach it, and
    // forwarding them would deliver them twice.
    if !from_terminal {
        cmd.process_group(0);
    }
    // What the command leaves running when it exits is re-parented to us, not to
    // init, so that we find it and end it even when it is not in the command's
    // group (on a terminal, or after `setsid`).
    adopt_orphans();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            stop_proxy(&mut proxy).await;
            return Err(Abort(
                fail(code, format!("cannot run `{program}`: {e}")),
                format!("`lapse run`: the command could not start: {e}"),
            ));
        }
    };
    let target = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(|p| Target {
            pid: Pid::from_raw(p),
            group: !from_terminal,
        });
    let group = target.as_ref().filter(|t| t.group).map(|t| t.pid);
    Ok(Started {
        child,
        target,
        group,
        from_terminal,
        proxy,
        spare,
    })
}

/// The command to run: `vars` in its environment, `keep_out` not.
fn command<'k>(
    program: &str,
    args: &[String],
    keep_out: impl Iterator<Item = &'k String>,
    vars: Vec<(String, String)>,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for v in keep_out {
        cmd.env_remove(v);
    }
    cmd.envs(vars);
    cmd
}

/// What the supervision loop watches once the command runs.
struct Supervisor {
    http: reqwest::Client,
    held: Held,
    command: Started,
    signals: mpsc::UnboundedReceiver<Signal>,
    grace: Span,
    quiet: bool,
}

impl Supervisor {
    /// Waits for the command to end or the grant to end, whichever comes first.
    /// The broker is asked by a task of its own; this loop never waits on the
    /// network.
    async fn watch(mut self, poll: Duration) -> Done {
        let (poll_tx, mut poll_rx) = mpsc::unbounded_channel::<Report>();
        let poller = tokio::spawn(watch_grant(
            self.http.clone(),
            self.held.clone(),
            poll,
            poll_tx,
        ));
        let ended: String = loop {
            tokio::select! {
                status = self.command.child.wait() => {
                    poller.abort();
                    return self.command_exited(status).await;
                }
                status = proxy_exit(self.command.proxy.as_mut()) => {
                    say(false, &format!(
                        "the MCP proxy exited ({status}) before the command; its tool calls fail from now on"
                    ));
                }
                Some(sig) = self.signals.recv() => self.command.forward(sig),
                () = tokio::time::sleep_until(self.held.expires_at) => {
                    break "the grant expired".to_owned();
                }
                Some(report) = poll_rx.recv() => {
                    if let Some(why) = self.held.update(report) {
                        break why;
                    }
                }
            }
        };
        poller.abort();
        self.grant_ended(ended).await
    }

    /// The command ended first (or could not be waited for). The grant is
    /// completed (after the proxy's last records) while what the command left
    /// running is ended: neither waits for the other.
    async fn command_exited(self, status: std::io::Result<ExitStatus>) -> Done {
        let (done, mut body) = match status {
            Ok(s) => {
                let (code, body) = outcome(s);
                (Done::Exited(code), body)
            }
            Err(e) => (
                Done::Lost(fail(1, format!("waiting for the command: {e}"))),
                json!({ "reason": "`lapse run`: the command could not be waited for" }),
            ),
        };
        let Self {
            http,
            held,
            mut command,
            grace,
            ..
        } = self;
        proxy_note(&mut body, command.proxy.as_ref());
        let (group, spare) = (command.group, command.spare);
        tokio::join!(
            async {
                stop_proxy(&mut command.proxy).await;
                complete(&http, &held, body).await;
            },
            end_leftovers(group, grace.0, false, spare)
        );
        end_proxy_orphans(spare, grace.0).await;
        done
    }

    /// The grant ended first: stop the command, SIGTERM then SIGKILL once the
    /// grace period has passed.
    async fn grant_ended(self, ended: String) -> Done {
        let Self {
            mut command,
            grace,
            quiet,
            ..
        } = self;
        say(
            false,
            &format!("access ended: {ended}; stopping the command"),
        );
        if let Some(t) = &command.target {
            t.signal(Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace.0;
        let status = match tokio::time::timeout_at(deadline, command.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                say(
                    false,
                    &format!("the command did not exit within {grace} of SIGTERM; sending SIGKILL"),
                );
                match &command.target {
                    Some(t) => t.signal(Signal::SIGKILL),
                    None => {
                        let _ = command.child.start_kill();
                    }
                }
                command.child.wait().await.ok()
            }
        };
        if let Some(s) = status {
            say(quiet, &format!("the command ended ({})", describe(s)));
        }
        // The group (if any) has had its SIGTERM; what is left of it, and what was
        // left outside it, gets the rest of the grace period.
        let (group, spare) = (command.group, command.spare);
        tokio::join!(
            stop_proxy(&mut command.proxy),
            end_leftovers(
                group,
                deadline.saturating_duration_since(Instant::now()),
                true,
                spare,
            )
        );
        end_proxy_orphans(spare, grace.0).await;
        Done::Stopped(ended)
    }
}

impl Started {
    /// Passes a signal on, unless the terminal has delivered it already.
    fn forward(&self, sig: Signal) {
        let doubled = self.from_terminal && matches!(sig, Signal::SIGINT | Signal::SIGQUIT);
        if let (Some(t), false) = (&self.target, doubled) {
            t.signal(sig);
        }
    }
}

/// Resolves when the MCP proxy exits; never without one.
async fn proxy_exit(proxy: Option<&mut mcp_proxy::Supervised>) -> ExitStatus {
    match proxy {
        Some(p) => p.exited().await,
        None => std::future::pending().await,
    }
}

/// Stops the MCP proxy, if one runs: it sends its last records first.
async fn stop_proxy(proxy: &mut Option<mcp_proxy::Supervised>) {
    if let Some(p) = proxy {
        p.stop(COMPLETE_TIMEOUT).await;
    }
}

/// Ends what a stopped MCP proxy left behind (its stdio upstreams are re-parented
/// to us when it is killed).
async fn end_proxy_orphans(spare: Option<Pid>, grace: Duration) {
    if spare.is_some() {
        end_leftovers(None, grace, false, None).await;
    }
}

/// A proxy that ended before the command may have taken records with it: the
/// completion says so.
fn proxy_note(body: &mut Value, proxy: Option<&mcp_proxy::Supervised>) {
    let Some(status) = proxy.and_then(mcp_proxy::Supervised::ended_early) else {
        return;
    };
    if let Some(o) = body.as_object_mut() {
        let reason = o.get("reason").and_then(Value::as_str).unwrap_or_default();
        let reason = format!(
            "{reason}; the MCP proxy had exited before it ({status}): tool-call records may be missing"
        );
        o.insert("reason".into(), Value::String(reason));
    }
}

/// What the poll task tells the supervision loop.
enum Report {
    /// The grant holds, with this token (renewal changes it) until this instant.
    Lease { token: String, expires_at: Instant },
    /// The grant has ended.
    Ended(String),
}

/// Asks the broker about the grant every `poll`, renewing it when due, and reports
/// what changed. Runs until the grant ends or the loop stops listening.
async fn watch_grant(
    http: reqwest::Client,
    mut held: Held,
    poll: Duration,
    tx: mpsc::UnboundedSender<Report>,
) {
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let before = (held.token.clone(), held.expires_at);
        let ended = check(&http, &mut held).await;
        let report = match ended {
            Some(why) => Report::Ended(why),
            None if before != (held.token.clone(), held.expires_at) => Report::Lease {
                token: held.token.clone(),
                expires_at: held.expires_at,
            },
            None => continue,
        };
        let last = matches!(report, Report::Ended(_));
        if tx.send(report).is_err() || last {
            return;
        }
    }
}

/// Makes `lapse run` the reaper of its descendants' orphans (Linux), so that what
/// the command leaves behind can be found as our children.
fn adopt_orphans() {
    #[cfg(target_os = "linux")]
    {
        // Without it, the command's own process group is still ended.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
}

/// One process the command left running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Leftover {
    pid: Pid,
    /// Whether it is in the command's process group.
    in_group: bool,
}

/// What the command left running: members of its process group (when it has one)
/// and processes re-parented to us, not counting zombies (ours are reaped here)
/// nor `spare` (the MCP proxy, our own child, stopped on its own terms).
/// `None` when `/proc` cannot be read.
fn leftovers(group: Option<Pid>, spare: Option<Pid>) -> Option<Vec<Leftover>> {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let me = std::process::id().to_string();
    let group = group.map(|g| g.as_raw().to_string());
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if spare == Some(Pid::from_raw(pid)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let (Some(state), Some(ppid), Some(pgrp)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let ours = ppid == me;
        let in_group = group.as_deref() == Some(pgrp);
        if matches!(state, "Z" | "X") {
            if ours {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            }
            continue;
        }
        if ours || in_group {
            out.push(Leftover {
                pid: Pid::from_raw(pid),
                in_group,
            });
        }
    }
    Some(out)
}

/// Ends what the command left running: SIGTERM, then SIGKILL once `grace` has
/// passed. `group_termed`: the command's group has had its SIGTERM already.
/// `spare`: see [`leftovers`].
async fn end_leftovers(
    group: Option<Pid>,
    grace: Duration,
    group_termed: bool,
    spare: Option<Pid>,
) {
    const EVERY: Duration = Duration::from_millis(50);
    let deadline = Instant::now() + grace;
    let Some(mut left) = leftovers(group, spare) else {
        // No `/proc`: the group is all we know of.
        if let Some(g) = group
            && killpg(g, None::<Signal>).is_ok()
        {
            if !group_termed {
                let _ = killpg(g, Signal::SIGTERM);
            }
            while Instant::now() < deadline && killpg(g, None::<Signal>).is_ok() {
                tokio::time::sleep(EVERY).await;
            }
            let _ = killpg(g, Signal::SIGKILL);
        }
        return;
    };
    if left.is_empty() {
        return;
    }
    eprintln!(
        "lapse run: the command left {} process(es) running; ending them",
        left.len()
    );
    let mut termed: BTreeSet<Pid> = BTreeSet::new();
    loop {
        for l in &left {
            if !(group_termed && l.in_group) && termed.insert(l.pid) {
                let _ = kill(l.pid, Signal::SIGTERM);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
        left = leftovers(group, spare).unwrap_or_default();
        if left.is_empty() {
            return;
        }
    }
    eprintln!(
        "lapse run: {} process(es) left by the command did not exit after SIGTERM; sending SIGKILL",
        left.len()
    );
    // Until none is left: a process killed may have children of its own, which
    // are re-parented to us in turn.
    for _ in 0..20 {
        if let Some(g) = group {
            let _ = killpg(g, Signal::SIGKILL);
        }
        for l in &left {
            let _ = kill(l.pid, Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = leftovers(group, spare).unwrap_or_default();
        if left.is_empty() {
            return;
        }
    }
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
            .call(
                http,
                reqwest::Method::POST,
                "renew",
                Some(body),
                CALL_TIMEOUT,
            )
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
    match held
        .call(http, reqwest::Method::GET, "status", None, CALL_TIMEOUT)
        .await
    {
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
        .call(
            http,
            reqwest::Method::POST,
            "complete",
            Some(body),
            COMPLETE_TIMEOUT,
        )
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
    "LAPSE_MCP_URL",
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

/// The name `--env-name` gives a variable.
fn renamed(renames: &BTreeMap<String, String>, name: &str) -> String {
    renames
        .get(name)
        .cloned()
        .unwrap_or_else(|| name.to_owned())
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
        vars.extend(credential_vars(c));
    }
    Ok(vars
        .into_iter()
        .map(|(n, v)| (renames.get(n).cloned().unwrap_or_else(|| n.to_owned()), v))
        .collect())
}

/// The environment each client of a credential's kind reads by itself: libpq's
/// `PG*`, the MariaDB/MySQL client's `MYSQL_HOST`/`MYSQL_TCP_PORT`/`MYSQL_PWD`
/// (it takes the user only from `-u`, hence `MYSQL_USER` and `MYSQL_DATABASE`,
/// the names the official images use), `redis-cli`'s `REDISCLI_AUTH`, and a
/// URL (`MYSQL_URL`, `REDIS_URL`) for drivers that take one. The secrets are
/// base64url and the names `[a-z0-9_]`, so they need no escaping in a URL.
fn credential_vars(c: &Value) -> Vec<(&'static str, String)> {
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    let port = |default: u64| c["port"].as_u64().unwrap_or(default).to_string();
    let (host, user, password) = (s("host"), s("username"), s("password"));
    let url_host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    match c["type"].as_str() {
        Some("postgres") => vec![
            ("PGHOST", host),
            ("PGPORT", port(5432)),
            ("PGDATABASE", s("dbname")),
            ("PGUSER", user),
            ("PGPASSWORD", password),
        ],
        Some("mysql") => {
            let (port, db) = (port(3306), s("dbname"));
            vec![
                (
                    "MYSQL_URL",
                    format!("mysql://{user}:{password}@{url_host}:{port}/{db}"),
                ),
                ("MYSQL_HOST", host),
                ("MYSQL_TCP_PORT", port),
                ("MYSQL_DATABASE", db),
                ("MYSQL_USER", user),
                ("MYSQL_PWD", password),
            ]
        }
        Some("redis") => {
            let port = port(6379);
            vec![
                (
                    "REDIS_URL",
                    format!("redis://{user}:{password}@{url_host}:{port}"),
                ),
                ("REDIS_HOST", host),
                ("REDIS_PORT", port),
                ("REDIS_USERNAME", user),
                ("REDIS_PASSWORD", password.clone()),
                ("REDISCLI_AUTH", password),
            ]
        }
        _ => Vec::new(),
    }
}
