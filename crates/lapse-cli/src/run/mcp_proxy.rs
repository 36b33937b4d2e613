//! `lapse run --mcp-proxy`: the agent's MCP proxy as a child of `lapse run`,
//! beside the agent and never under it.
//!
//! The proxy's operator token writes the audit records of the agent's tool calls
//! (`POST /v1/tool-calls`). An agent that starts the proxy itself (stdio) must give
//! it that token in its environment, and can then write records of its own. So
//! here `lapse run` starts `lapse mcp-proxy --http --listen 127.0.0.1:0
//! --token-stdin` before the command, and the command only gets the proxy's URL
//! (`LAPSE_MCP_URL`). Two pipes, both `lapse run`'s alone (close-on-exec, so the
//! command never inherits them):
//!
//! - the proxy's standard input: the operator token, one line; then nothing until
//!   `lapse run` closes it, which stops the proxy after its last report (and so
//!   does `lapse run` dying);
//! - its standard output: the endpoint's URL, one line, once it listens.
//!
//! INVARIANT: the command's environment holds no operator credential — not the
//! variable the config's `token = "env:NAME"` names, not an upstream's
//! `credential = "env:NAME"` (the agent would not need the proxy to reach that
//! upstream), and never `LAPSE_TOKEN` or `LAPSE_PROXY_TOKEN`. Both `lapse run`
//! (always) and the proxy are non-dumpable, so no other process of the user (the
//! agent) reads their memory or `/proc/PID/environ`, where the token still is.

use lapse_mcp::config::{ProxyConfig, TokenSource};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Removed from the command's environment whether or not a proxy is started:
/// the CLI's operator token and the proxy's usual one.
pub(crate) const OPERATOR_VARS: &[&str] = &["LAPSE_TOKEN", "LAPSE_PROXY_TOKEN"];

/// How long the proxy may take to listen (it connects to the broker, starts its
/// stdio upstreams and waits for the revocation feed first).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes this process non-dumpable (Linux): no core file, and no process of the
/// same user may attach to it or read its memory or `/proc/PID/environ`.
pub(crate) fn not_dumpable() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_dumpable(false)
            .map_err(|e| format!("prctl(PR_SET_DUMPABLE, 0): {e}"))?;
    }
    Ok(())
}

/// The proxy's side (`--token-stdin`): the operator token, the first line of
/// standard input, and what resolves once standard input ends (the supervisor is
/// done, or gone).
pub(crate) fn from_supervisor() -> Result<(String, tokio::sync::oneshot::Receiver<()>), String> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("the operator token from standard input: {e}"))?;
    let token = line.trim().to_owned();
    if token.is_empty() {
        return Err("no operator token on standard input".into());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own rather than the runtime's blocking pool: a blocking read
    // cannot be cancelled, and the runtime waits for its pool when it shuts down.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    Ok((token, rx))
}

/// What `lapse run` reads from the proxy's config before it asks for a grant.
pub(crate) struct Plan {
    config: PathBuf,
    token: String,
    /// The variable `token = "env:NAME"` names: kept from both processes (the
    /// proxy gets the token on its pipe).
    token_var: Option<String>,
    /// The variables upstreams' `credential = "env:NAME"` name: the proxy's.
    credential_vars: Vec<String>,
}

impl Plan {
    /// Reads the config and the operator token (`env:` from our environment, or
    /// `file:`). Errors are usage errors: nothing has been asked yet.
    pub(crate) fn read(config: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(config)
            .map_err(|e| format!("--mcp-proxy: cannot read `{}`: {e}", config.display()))?;
        let cfg = ProxyConfig::parse(&text)
            .map_err(|e| format!("--mcp-proxy `{}`: {e}", config.display()))?;
        let token_var = match cfg.token_source() {
            Ok(TokenSource::Env(name)) => Some(name.to_owned()),
            Ok(TokenSource::File(_)) => None,
            Ok(TokenSource::Stdin) | Err(_) => {
                return Err(format!(
                    "--mcp-proxy `{}`: `token` must be `env:` or `file:` (`lapse run` hands it to the proxy)",
                    config.display()
                ));
            }
        };
        let credential_vars = cfg
            .upstreams
            .iter()
            .filter_map(|u| u.credential.as_deref()?.strip_prefix("env:"))
            .map(str::to_owned)
            .collect();
        let token = cfg
            .operator_token()
            .map_err(|e| format!("--mcp-proxy `{}`: {e}", config.display()))?;
        if token.is_empty() || token.contains('\n') {
            return Err(format!(
                "--mcp-proxy `{}`: the operator token is empty or more than one line",
                config.display()
            ));
        }
        Ok(Self {
            config: config.to_owned(),
            token,
            token_var,
            credential_vars,
        })
    }

    /// What neither process gets of ours.
    fn operator_vars(&self) -> impl Iterator<Item = String> + '_ {
        OPERATOR_VARS
            .iter()
            .map(|v| (*v).to_owned())
            .chain(self.token_var.clone())
    }

    /// What the command does not get of ours, beyond its identity material: every
    /// credential of the proxy's.
    pub(crate) fn command_keep_out(&self) -> Vec<String> {
        self.operator_vars()
            .chain(self.credential_vars.iter().cloned())
            .collect()
    }
}

/// The running proxy.
pub(crate) struct Supervised {
    child: Child,
    /// Closing it stops the proxy.
    stdin: Option<ChildStdin>,
    _stdout: BufReader<ChildStdout>,
    pub(crate) pid: Option<Pid>,
    pub(crate) url: String,
    /// How it ended, once it has.
    exited: Option<ExitStatus>,
}

impl Supervised {
    /// Starts the proxy and waits until it listens. `identity_vars`: our identity
    /// material, which it does not get either (nor the operator token's variable:
    /// the token comes on the pipe).
    pub(crate) async fn start(plan: &Plan, identity_vars: &[String]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("the `lapse` binary: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "mcp-proxy",
            "--http",
            "--listen",
            "127.0.0.1:0",
            "--token-stdin",
            "--config",
        ])
        .arg(&plan.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // A group of its own: a terminal's Ctrl-C is for the command; the proxy
        // stops when we close its input.
        .process_group(0)
        .kill_on_drop(true);
        for v in identity_vars.iter().cloned().chain(plan.operator_vars()) {
            cmd.env_remove(v);
        }
        cmd.env_remove("LAPSE_ACCESS_TOKEN");
        if std::env::var_os("LAPSE_LOG").is_none() {
            cmd.env("LAPSE_LOG", "warn");
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the MCP proxy: {e}"))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the MCP proxy has no pipes".into());
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let started = async {
            stdin
                .write_all(format!("{}\n", plan.token).as_bytes())
                .await?;
            stdin.flush().await?;
            stdout.read_line(&mut line).await
        };
        let url = match tokio::time::timeout(START_TIMEOUT, started).await {
            Ok(Ok(n)) if n > 0 && line.starts_with("http") => line.trim().to_owned(),
            Ok(Ok(n)) if n > 0 => {
                let _ = child.start_kill();
                return Err(format!(
                    "the MCP proxy said `{}` instead of its URL",
                    line.trim()
                ));
            }
            Ok(_) => {
                let status = child.wait().await.ok();
                return Err(format!(
                    "the MCP proxy did not start ({})",
                    status.map_or_else(|| "no status".to_owned(), |s| s.to_string())
                ));
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(format!(
                    "the MCP proxy did not listen within {}s",
                    START_TIMEOUT.as_secs()
                ));
            }
        };
        Ok(Self {
            child,
            stdin: Some(stdin),
            _stdout: stdout,
            pid,
            url,
            exited: None,
        })
    }

    /// Resolves when the proxy exits (pending for ever once it has).
    pub(crate) async fn exited(&mut self) -> ExitStatus {
        if self.exited.is_some() {
            return std::future::pending().await;
        }
        match self.child.wait().await {
            Ok(s) => {
                self.exited = Some(s);
                s
            }
            Err(_) => std::future::pending().await,
        }
    }

    /// Whether it ended before it was told to.
    pub(crate) fn ended_early(&self) -> Option<ExitStatus> {
        self.exited
    }

    /// Closes its input, so that it sends its last records and exits; after
    /// `within`, kills it.
    pub(crate) async fn stop(&mut self, within: Duration) {
        drop(self.stdin.take());
        if self.exited.is_some() {
            return;
        }
        if tokio::time::timeout(within, self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "lapse run: the MCP proxy did not stop within {}s; killing it (its last tool-call records may be lost)",
                within.as_secs()
            );
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}
