//! `lapse`: serve the broker, and talk to it.
//!
//! Exit codes: 0 success; 1 failure (the answer says why); 2 usage; 3 denied by
//! policy; 4 pending approval; 5 audit chain does not verify; 6 policy tests failed;
//! 7 unavailable (fail closed). `lapse run` passes its command's code through and
//! adds 111 (the grant ended first), 126/127 (the command cannot run); see `run`.

#![expect(
    clippy::indexing_slicing,
    reason = "the CLI reads serde_json::Value by key, which yields Null for anything missing and never panics"
)]

mod approvals;
mod identity_source;
mod keys;
mod memory;
mod operator;
mod run;
mod wait;
mod workloads;

use clap::{Parser, Subcommand};
use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_server::{config::Config, dev};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

pub(crate) const DEFAULT_DEV_DIR: &str = ".lapse-dev";

#[derive(Parser)]
#[command(
    name = "lapse",
    version,
    about = "Just-in-time access for non-human identities"
)]
struct Cli {
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// PEM file of CA certificates to trust beside the system's roots, for every
    /// HTTPS call this command makes (a broker or identity provider with a
    /// private CA).
    #[arg(long, global = true, env = "LAPSE_CA_FILE")]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve {
        #[arg(long, conflicts_with = "dev")]
        config: Option<PathBuf>,
        /// Embedded store, generated keys, a dev issuer and example policies in --data.
        #[arg(long)]
        dev: bool,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7800")]
        listen: std::net::SocketAddr,
    },
    /// Dev-mode helpers.
    Dev {
        #[command(subcommand)]
        cmd: DevCmd,
    },
    /// Exchange an identity token for a task-scoped, DPoP-bound access token.
    Request(Box<RequestArgs>),
    /// Run a command with one grant's credentials; the grant ends when it exits,
    /// and the command is stopped when the grant ends first.
    Run(Box<run::RunArgs>),
    /// Decide requests that wait for approval (operators with the `approve` role).
    Approvals {
        #[command(subcommand)]
        cmd: approvals::ApprovalsCmd,
    },
    /// The mandatory reviews of break-glass grants.
    Reviews {
        #[command(subcommand)]
        cmd: approvals::ReviewsCmd,
    },
    /// Inspect and end grants.
    Grants {
        #[command(subcommand)]
        cmd: GrantsCmd,
    },
    /// Quarantine workloads that can no longer be trusted, and release them.
    Workloads {
        #[command(subcommand)]
        cmd: workloads::WorkloadsCmd,
    },
    /// Validate and test policies.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Verify and export the audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Forward-auth for nginx `auth_request`, Envoy `ext_authz` and Traefik
    /// `forwardAuth`: verifies Lapse tokens and DPoP proofs in front of a service,
    /// follows the revocation feed, evaluates the broker's policies per request.
    Gate {
        #[arg(long)]
        config: PathBuf,
    },
    /// An MCP proxy between an agent and its tool servers: shows only the tools the
    /// agent's task declared and decides every tool call (grant, argument
    /// constraints, Cedar) before forwarding it. Stdio by default (the agent starts
    /// it as its MCP server, with its token in `LAPSE_ACCESS_TOKEN`); `--http`
    /// serves streamable HTTP with DPoP-bound tokens.
    #[command(name = "mcp-proxy")]
    McpProxy {
        #[arg(long)]
        config: PathBuf,
        /// Serve streamable HTTP on the config's `[http]` listener; the endpoint's
        /// URL is printed on standard output, one line, once it listens.
        #[arg(long)]
        http: bool,
        /// With `--http`: listen here instead of `[http] listen` (port 0: any free
        /// one); the endpoint is then this address with `[http] url`'s path
        /// (`/mcp` without `[http]`).
        #[arg(long, requires = "http")]
        listen: Option<std::net::SocketAddr>,
        /// With `--http`: the operator token is the first line of standard input
        /// (as `token = "stdin"`), not the config's `token`, and the proxy stops
        /// when standard input ends. For a supervisor: `lapse run --mcp-proxy`.
        #[arg(long, requires = "http")]
        token_stdin: bool,
        /// Stdio: the agent's Lapse access token.
        #[arg(long, env = "LAPSE_ACCESS_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// The signing key ring: list, rotate, make a key-encryption key.
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
    /// Credentials for operator accounts (API tokens, console passwords).
    Operator {
        #[command(subcommand)]
        cmd: operator::OperatorCmd,
    },
    /// Reports.
    Report {
        #[command(subcommand)]
        cmd: ReportCmd,
    },
}

#[derive(Subcommand)]
enum ReportCmd {
    /// Everything that looks like standing privilege; exits 8 when it finds any.
    Standing {
        #[command(flatten)]
        server: Server,
        /// Window the proof covers, e.g. `24h`.
        #[arg(long, default_value = "24h")]
        window: TtlDuration,
        /// Offline: build the report from the store this config names (as `lapse
        /// audit verify --config`), without a running broker. The targets are
        /// still asked directly; those that cannot be reached are findings.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Offline, with the config in this folder (`lapse.toml`).
        #[arg(long, conflicts_with = "config")]
        data: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Mint an identity token from the dev issuer.
    Token {
        #[arg(long)]
        workload: String,
        #[arg(long, default_value = "10m")]
        ttl: TtlDuration,
        /// Extra claim, `name=value`; repeatable.
        #[arg(long = "claim")]
        claims: Vec<String>,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
    },
}

#[derive(clap::Args)]
pub(crate) struct Server {
    /// Broker URL.
    #[arg(long, env = "LAPSE_URL", default_value = "http://127.0.0.1:7800")]
    pub(crate) url: String,
    /// Operator API token (defaults to the dev folder's admin token when present).
    #[arg(long, env = "LAPSE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

#[derive(clap::Args)]
struct RequestArgs {
    #[command(flatten)]
    server: Server,
    /// The identity token; or --identity-token-file; in dev, --dev-workload mints one.
    #[arg(long, env = "LAPSE_IDENTITY_TOKEN", hide_env_values = true)]
    identity_token: Option<String>,
    #[arg(long)]
    identity_token_file: Option<PathBuf>,
    /// Mint the identity token from the dev issuer for this workload.
    #[arg(long)]
    dev_workload: Option<String>,
    #[command(flatten)]
    access: AccessArgs,
    /// When the request needs approval, wait up to this long for people to decide
    /// (polling with the same DPoP key), showing who must approve.
    #[arg(long)]
    wait: Option<TtlDuration>,
    /// PEM file of the DPoP key: used if it exists, created (0600) if not. Without it
    /// a fresh key lives only in memory.
    #[arg(long)]
    dpop_key: Option<PathBuf>,
}

/// What is asked for: the same for `lapse request` and `lapse run`.
#[derive(clap::Args, Debug)]
pub(crate) struct AccessArgs {
    #[arg(long)]
    audience: String,
    /// Space-separated actions.
    #[arg(long)]
    scope: String,
    #[arg(long)]
    task: String,
    #[arg(long)]
    purpose: String,
    #[arg(long)]
    ticket: Option<String>,
    #[arg(long)]
    environment: Option<String>,
    #[arg(long)]
    pub(crate) ttl: Option<TtlDuration>,
    /// The tools an agent's task declares (JSON, as the `tools` of a token
    /// exchange): all an MCP proxy will let it call.
    #[arg(long, value_name = "JSON")]
    tools: Option<String>,
    /// Break glass: decided by `@break_glass` policies only, issued at once with a
    /// hard short lifetime, announced, and reviewed afterwards. Needs --justification.
    #[arg(long, requires = "justification")]
    break_glass: bool,
    /// Why, in words a reviewer will read (break-glass only).
    #[arg(long, requires = "break_glass")]
    justification: Option<String>,
}

impl AccessArgs {
    /// The RFC 8693 token-exchange form for `identity`.
    pub(crate) fn exchange_form(&self, identity: String) -> Vec<(&'static str, String)> {
        let mut form = vec![
            ("grant_type", lapse_server::http::TOKEN_EXCHANGE.to_owned()),
            ("subject_token", identity),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:jwt".to_owned(),
            ),
            ("audience", self.audience.clone()),
            ("scope", self.scope.clone()),
            ("task", self.task.clone()),
            ("purpose", self.purpose.clone()),
        ];
        if let Some(t) = &self.ticket {
            form.push(("ticket", t.clone()));
        }
        if let Some(e) = &self.environment {
            form.push(("environment", e.clone()));
        }
        if let Some(t) = self.ttl {
            form.push(("expires_in", t.secs().to_string()));
        }
        if let Some(t) = &self.tools {
            form.push(("tools", t.clone()));
        }
        if self.break_glass {
            form.push(("break_glass", "true".to_owned()));
            form.push((
                "justification",
                self.justification.clone().unwrap_or_default(),
            ));
        }
        form
    }

    pub(crate) fn describe(&self) -> String {
        format!("`{}` [{}]", self.audience, self.scope)
    }
}

#[derive(Subcommand)]
enum GrantsCmd {
    /// Newest first, one page at a time (`--before` the last page's cursor), or
    /// every page with `--all`.
    List {
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        audience: Option<String>,
        /// Grants per page (the server caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this cursor (a page's `next`).
        #[arg(long)]
        before: Option<String>,
        /// Follow the cursors to the last page.
        #[arg(long)]
        all: bool,
    },
    Show {
        id: String,
        #[command(flatten)]
        server: Server,
    },
    /// End your own grant (workload): needs its access token and DPoP key.
    Complete {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long, env = "LAPSE_ACCESS_TOKEN", hide_env_values = true)]
        access_token: String,
        #[arg(long)]
        dpop_key: PathBuf,
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a grant as an operator.
    Revoke {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        reason: Option<String>,
        /// A gate (its base URL, e.g. http://gate:7900) that must have applied the
        /// ending before this answers: its `/readyz` `feed_position` reaches the
        /// revoke's. Repeatable. Without it the answer may come before gates hear.
        #[arg(long = "wait-gate")]
        wait_gates: Vec<String>,
        /// How long to wait for the gates (`--wait-gate`); then exit 7 naming
        /// those that did not confirm.
        #[arg(long, default_value = "5s")]
        wait_timeout: TtlDuration,
    },
    /// Renew your own grant (workload): policy decides again.
    Renew {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long, env = "LAPSE_ACCESS_TOKEN", hide_env_values = true)]
        access_token: String,
        #[arg(long)]
        dpop_key: PathBuf,
        #[arg(long)]
        ttl: Option<TtlDuration>,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Load and validate a policy folder.
    Validate {
        #[arg(long, default_value = "examples/policies")]
        policies: PathBuf,
    },
    /// Run a policy test file against a policy folder.
    Test {
        file: PathBuf,
        #[arg(long, default_value = "examples/policies")]
        policies: PathBuf,
    },
    /// Print the base schema Lapse contributes.
    Schema,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the chain in the store named by the config (works with the server
    /// down), or an export (`--file`) offline.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
        /// An export (`lapse audit export`) to verify instead of the store.
        #[arg(long)]
        file: Option<PathBuf>,
        /// With `--file`: the signing keys as a JWKS document (saved from
        /// `/.well-known/jwks.json`), instead of the store's key ring.
        #[arg(long, requires = "file")]
        jwks: Option<PathBuf>,
    },
    /// Write the log as JSON Lines.
    Export {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug)]
pub(crate) struct Fail(pub(crate) u8, pub(crate) String);

type Out = Result<(), Fail>;

pub(crate) fn fail(code: u8, msg: impl Into<String>) -> Fail {
    Fail(code, msg.into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `LAPSE_LOG` first (it names this program), then the usual `RUST_LOG`.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAPSE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                if matches!(
                    cli.cmd,
                    Cmd::Serve { .. } | Cmd::Gate { .. } | Cmd::McpProxy { http: true, .. }
                ) {
                    "info"
                } else {
                    "warn"
                },
            )
        });
    // Colour codes only for a person at a terminal: a journal or a log file
    // would keep them as escape sequences.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(path) = &cli.ca_file
        && let Err(e) = lapse_identity::trust_ca_file(path)
    {
        eprintln!("lapse: --ca-file: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lapse: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            if !msg.is_empty() {
                eprintln!("lapse: {msg}");
            }
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Out {
    let json_out = cli.json;
    match cli.cmd {
        Cmd::Serve {
            config,
            dev,
            data,
            listen,
        } => serve(config, dev, &data, listen).await,
        Cmd::Dev {
            cmd:
                DevCmd::Token {
                    workload,
                    ttl,
                    claims,
                    data,
                },
        } => {
            let mut extra = Vec::new();
            for c in claims {
                let (k, v) = c
                    .split_once('=')
                    .ok_or_else(|| fail(2, format!("`--claim {c}`: expected name=value")))?;
                extra.push((k.to_owned(), v.to_owned()));
            }
            let t = dev::dev_token(
                &data,
                &workload,
                ttl.secs(),
                &extra,
                SystemClock.now().unix_seconds(),
            )
            .map_err(|e| fail(1, e))?;
            println!("{t}");
            Ok(())
        }
        Cmd::Request(args) => request(*args, json_out).await,
        // The command's own exit code passes through, without a message of ours.
        Cmd::Run(args) => match run::run(*args).await? {
            0 => Ok(()),
            code => Err(Fail(code, String::new())),
        },
        Cmd::Grants { cmd } => grants(cmd, json_out).await,
        Cmd::Workloads { cmd } => workloads::run(cmd, json_out).await,
        Cmd::Approvals { cmd } => approvals::run(cmd, json_out).await,
        Cmd::Reviews { cmd } => approvals::reviews(cmd, json_out).await,
        Cmd::Policy { cmd } => policy(cmd, json_out),
        Cmd::Audit { cmd } => audit(cmd, json_out).await,
        Cmd::Operator { cmd } => operator::run(cmd, json_out),
        Cmd::Keys { cmd } => keys::run(cmd, json_out).await,
        Cmd::Gate { config } => gate(&config).await,
        Cmd::McpProxy {
            config,
            http,
            listen,
            token_stdin,
            token,
        } => mcp_proxy(&config, http.then_some(listen), token_stdin, token).await,
        Cmd::Report {
            cmd:
                ReportCmd::Standing {
                    server,
                    window,
                    config,
                    data,
                },
        } => match (config, data) {
            (None, None) => standing(server, window, json_out).await,
            (config, data) => {
                let data = data.unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_DIR));
                standing_offline(config, &data, window, json_out).await
            }
        },
    }
}

async fn gate(config: &Path) -> Out {
    let cfg = lapse_gate::config::GateConfig::load(config).map_err(|e| fail(1, e.to_string()))?;
    let listen = cfg.listen;
    let gate = lapse_gate::Gate::new(cfg)
        .await
        .map_err(|e| fail(7, e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| fail(1, format!("cannot listen on {listen}: {e}")))?;
    let listen = listener.local_addr().unwrap_or(listen);
    tracing::info!(%listen, "lapse gate listening on {listen}");
    // SIGTERM too (what service managers send): a gate stops gracefully and sends
    // its last use report.
    lapse_gate::serve(gate, listener, lapse_gate::stop_signal())
        .await
        .map_err(|e| fail(1, e.to_string()))
}

async fn mcp_proxy(
    config: &Path,
    http: Option<Option<std::net::SocketAddr>>,
    token_stdin: bool,
    token: Option<String>,
) -> Out {
    // The operator token in its memory writes audit records: no other process of
    // this user (an agent) may read that memory or `/proc/PID/environ`.
    run::mcp_proxy::not_dumpable().map_err(|e| fail(1, e))?;
    let text = std::fs::read_to_string(config)
        .map_err(|e| fail(1, format!("cannot read `{}`: {e}", config.display())))?;
    let mut cfg = lapse_mcp::config::ProxyConfig::parse(&text)
        .map_err(|e| fail(2, format!("`{}`: {e}", config.display())))?;
    let token_stdin =
        token_stdin || cfg.token_source() == Ok(lapse_mcp::config::TokenSource::Stdin);
    let listen = match (http, &cfg.http) {
        (Some(Some(addr)), _) => Some(addr),
        (Some(None), Some(h)) => Some(h.listen),
        (Some(None), None) => {
            return Err(fail(
                2,
                "`--http` needs an `[http]` table in the config, or `--listen`",
            ));
        }
        (None, _) => None,
    };
    if token_stdin && listen.is_none() {
        return Err(fail(
            2,
            "the operator token from standard input needs `--http` (over stdio, standard input is the agent's)",
        ));
    }
    let token = match (listen, token) {
        (Some(_), _) => String::new(),
        (None, Some(t)) if !t.trim().is_empty() => t.trim().to_owned(),
        (None, _) => {
            return Err(fail(
                2,
                "over stdio the agent's token is needed: LAPSE_ACCESS_TOKEN or --token",
            ));
        }
    };
    // Bound before the proxy starts, so that its URL names the port really taken
    // (`--listen 127.0.0.1:0`); connections wait in the backlog meanwhile.
    let listener = match listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| fail(1, format!("cannot listen on {addr}: {e}")))?;
            if matches!(http, Some(Some(_))) {
                cfg.listen_at(l.local_addr().unwrap_or(addr));
            }
            Some(l)
        }
        None => None,
    };
    let (proxy, supervisor) = if token_stdin {
        let (operator, ended) = run::mcp_proxy::from_supervisor().map_err(|e| fail(2, e))?;
        (
            lapse_mcp::Proxy::with_token(cfg, operator).await,
            Some(ended),
        )
    } else {
        (lapse_mcp::Proxy::new(cfg).await, None)
    };
    let proxy = proxy.map_err(|e| fail(7, e.to_string()))?;
    let background = proxy.run_background();
    // Calls before the revocation feed is first heard would all be refused.
    let within = std::time::Duration::from_secs(proxy.config().staleness.secs().max(1));
    if !proxy.verifier.caught_up(within).await {
        tracing::warn!(
            "the broker's revocation feed has not answered; tool calls are refused until it does"
        );
    }
    let r = match listener {
        Some(listener) => {
            let url = proxy.config().http.as_ref().map(|h| h.url.clone());
            let url = url.unwrap_or_default();
            tracing::info!(%url, "lapse mcp-proxy listening");
            // The line a supervisor (or a script, with port 0) waits for; nobody
            // reading it is no reason to stop.
            let _ =
                std::io::Write::write_all(&mut std::io::stdout(), format!("{url}\n").as_bytes());
            lapse_mcp::http::serve(proxy, listener, async move {
                match supervisor {
                    // The supervisor is done (or gone): stop, after the last report.
                    Some(ended) => tokio::select! {
                        _ = ended => {}
                        () = lapse_gate::stop_signal() => {}
                    },
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            })
            .await
        }
        None => {
            lapse_mcp::stdio::serve(proxy, token, tokio::io::stdin(), tokio::io::stdout()).await
        }
    };
    for b in background {
        b.abort();
    }
    r.map_err(|e| fail(1, e.to_string()))
}

async fn serve(
    config: Option<PathBuf>,
    dev_mode: bool,
    data: &Path,
    listen: std::net::SocketAddr,
) -> Out {
    let (cfg, admin) = match (config, dev_mode) {
        (Some(path), false) => (
            Config::load(&path).map_err(|e| fail(1, e.to_string()))?,
            None,
        ),
        (None, true) => {
            let (cfg, path, token) =
                dev::prepare(data, listen).map_err(|e| fail(1, e.to_string()))?;
            (cfg, Some((path, token)))
        }
        _ => {
            return Err(fail(
                2,
                "use `lapse serve --dev` or `lapse serve --config lapse.toml`",
            ));
        }
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| fail(1, format!("cannot listen on {}: {e}", cfg.listen)))?;
    let url = cfg.public_url();
    let lapse = lapse_server::build(cfg, Arc::new(SystemClock))
        .await
        .map_err(|e| fail(1, e.to_string()))?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "listening on {addr}");
    }
    memory::give_back_freed_memory_every(memory::TRIM_PERIOD);
    if let Some((path, _)) = &admin {
        println!(
            "\nLapse is running at {url} (dev mode; config in {cfg})\n\n\
             Try it:\n\
             \x20 lapse request --dev-workload spiffe://dev.lapse.local/ci/deploy \\\n\
             \x20   --audience orders-db --scope read --task T-1 --purpose 'nightly export' --dpop-key .lapse-dev/ci.key\n\
             \x20 lapse grants list\n\
             \x20 lapse grants revoke <grant id> --reason 'done here'\n\
             \x20 lapse audit verify\n\n\
             The operator token is in {data}/admin.token; the CLI uses it by default.\n",
            cfg = path.display(),
            data = data.display()
        );
    }
    lapse_server::serve(lapse, listener, async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    })
    .await
    .map_err(|e| fail(1, format!("server failed: {e}")))
}

pub(crate) fn client() -> reqwest::Client {
    lapse_identity::http_client()
}

pub(crate) fn operator_token(s: &Server) -> Result<String, Fail> {
    if let Some(t) = &s.token {
        return Ok(t.clone());
    }
    std::fs::read_to_string(Path::new(DEFAULT_DEV_DIR).join(dev::ADMIN_TOKEN_FILE))
        .map(|t| t.trim().to_owned())
        .map_err(|_| fail(2, "an operator token is required: --token or LAPSE_TOKEN"))
}

/// Reads an answer; maps error codes to exit codes.
pub(crate) async fn answer(resp: Result<reqwest::Response, reqwest::Error>) -> Result<Value, Fail> {
    let resp = resp.map_err(|e| fail(7, format!("cannot reach Lapse: {e}")))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(json!({}));
    if status.is_success() {
        return Ok(body);
    }
    Err(error_fail(status.as_u16(), &body))
}

/// The token exchange, waiting for approval when `wait` is given. An error comes
/// with the answer's body, so callers can say more about a pending request.
pub(crate) async fn exchange(
    http: &reqwest::Client,
    base: &str,
    key: &DpopKey,
    form: &[(&'static str, String)],
    wait: Option<TtlDuration>,
) -> Result<Value, (Fail, Value)> {
    let url = format!("{base}/oauth/token");
    let proof = key.proof("POST", &url, None, SystemClock.now().unix_seconds());
    let resp = http
        .post(&url)
        .header("DPoP", proof)
        .form(form)
        .send()
        .await
        .map_err(|e| (fail(7, format!("cannot reach Lapse: {e}")), Value::Null))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(json!({}));
    match (status.is_success(), wait) {
        (true, _) => Ok(body),
        (false, Some(w)) if body["error"] == "authorization_pending" => wait::wait_for_approval(
            http,
            base,
            key,
            &body,
            std::time::Duration::from_secs(w.secs()),
        )
        .await
        .map_err(|f| (f, Value::Null)),
        (false, _) => Err((error_fail(status.as_u16(), &body), body)),
    }
}

/// An error answer as an exit code and a message.
pub(crate) fn error_fail(status: u16, body: &Value) -> Fail {
    let code = body["error"].as_str().unwrap_or("error");
    let desc = body["error_description"].as_str().unwrap_or("");
    let exit = match (status, code) {
        (_, "access_denied") => 3,
        (_, "authorization_pending") => 4,
        (503, _) => 7,
        _ => 1,
    };
    let mut msg = format!("{code}: {desc}");
    if let Some(r) = body["request_id"].as_str() {
        msg.push_str(&format!(" (request_id {r})"));
    }
    fail(exit, msg)
}

fn load_or_create_dpop(path: Option<&Path>) -> Result<DpopKey, Fail> {
    match path {
        None => Ok(DpopKey::generate()),
        Some(p) => {
            let (k, _) =
                lapse_token::SigningKey::load_or_generate(p).map_err(|e| fail(1, e.to_string()))?;
            Ok(DpopKey::from_signing(k))
        }
    }
}

async fn request(a: RequestArgs, json_out: bool) -> Out {
    let now = SystemClock.now().unix_seconds();
    let identity = match (&a.identity_token, &a.identity_token_file, &a.dev_workload) {
        (Some(t), None, None) => t.clone(),
        (None, Some(f), None) => std::fs::read_to_string(f)
            .map_err(|e| fail(1, format!("{}: {e}", f.display())))?
            .trim()
            .to_owned(),
        (None, None, Some(w)) => {
            dev::dev_token(Path::new(DEFAULT_DEV_DIR), w, 600, &[], now).map_err(|e| fail(1, e))?
        }
        _ => {
            return Err(fail(
                2,
                "give exactly one of --identity-token, --identity-token-file, --dev-workload",
            ));
        }
    };
    let key = load_or_create_dpop(a.dpop_key.as_deref())?;
    let http = client();
    let v = exchange(
        &http,
        a.server.url.trim_end_matches('/'),
        &key,
        &a.access.exchange_form(identity),
        a.wait,
    )
    .await
    .map_err(|(f, _)| f)?;
    if json_out {
        println!("{v}");
    } else {
        println!("grant    {}", v["grant_id"].as_str().unwrap_or(""));
        println!("scope    {}", v["scope"].as_str().unwrap_or(""));
        println!("expires  in {}s", v["expires_in"]);
        println!("dpop jkt {}", key.jkt());
        println!("token    {}", v["access_token"].as_str().unwrap_or(""));
    }
    Ok(())
}

fn print_grant(g: &Value) {
    println!(
        "{}  {:<9}  {}  {} [{}]  task {}  expires {}",
        g["id"].as_str().unwrap_or(""),
        g["state"].as_str().unwrap_or(""),
        g["workload"].as_str().unwrap_or(""),
        g["audience"].as_str().unwrap_or(""),
        g["actions"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
        g["task"]["id"].as_str().unwrap_or(""),
        g["expires_at"]
            .as_i64()
            .map(|ms| lapse_core::Timestamp::from_millis(ms).rfc3339())
            .unwrap_or_default(),
    );
}

async fn workload_call(
    server: &Server,
    id: &str,
    action: &str,
    token: &str,
    key_path: &Path,
    body: Value,
) -> Result<Value, Fail> {
    let key = lapse_token::SigningKey::load(key_path).map_err(|e| fail(1, e.to_string()))?;
    let key = DpopKey::from_signing(key);
    let url = format!(
        "{}/v1/grants/{id}/{action}",
        server.url.trim_end_matches('/')
    );
    let proof = key.proof("POST", &url, Some(token), SystemClock.now().unix_seconds());
    answer(
        client()
            .post(&url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", proof)
            .json(&body)
            .send()
            .await,
    )
    .await
}

async fn standing(server: Server, window: TtlDuration, json_out: bool) -> Out {
    let url = format!("{}/v1/reports/standing", server.url.trim_end_matches('/'));
    let v = answer(
        client()
            .get(&url)
            .bearer_auth(operator_token(&server)?)
            .query(&[("window", format!("{}s", window.secs()))])
            .send()
            .await,
    )
    .await?;
    show_standing(&v, json_out)
}

/// `lapse report standing --config`: the server's report code over the store the
/// config names, with no broker running. The targets are asked as the broker would
/// ask them; offline they are often out of reach, which the report then says
/// (`target_unreachable`) rather than reporting them clean.
async fn standing_offline(
    config: Option<PathBuf>,
    data: &Path,
    window: TtlDuration,
    json_out: bool,
) -> Out {
    let (store, keys, cfg) = open_store(config, data, false).await?;
    note_unauthenticated(&keys);
    let mut providers: HashMap<String, Arc<dyn lapse_providers::CredentialProvider>> =
        HashMap::new();
    let mut notes = Vec::new();
    for p in &cfg.postgres {
        match lapse_providers::postgres::PostgresProvider::new(p.clone()) {
            Ok(provider) => {
                providers.insert(p.audience.clone(), Arc::new(provider));
            }
            Err(e) => notes.push(format!("target `{}` not checked: {e}", p.audience)),
        }
    }
    let mut v = lapse_server::report::standing_report(
        lapse_server::report::Sources {
            store: store.as_ref(),
            keys: &keys,
            providers: &providers,
            cfg: &cfg,
            now: SystemClock.now(),
        },
        window.secs(),
    )
    .await
    .map_err(|e| fail(7, e.to_string()))?;
    lapse_server::set_field(&mut v, "offline", json!(true));
    lapse_server::set_field(&mut v, "notes", json!(notes));
    if !json_out {
        println!(
            "offline report from the store (no broker asked); {} target(s) asked directly",
            providers.len()
        );
        for n in &notes {
            println!("note: {n}");
        }
    }
    show_standing(&v, json_out)
}

fn show_standing(v: &Value, json_out: bool) -> Out {
    let findings = v["findings"].as_array().cloned().unwrap_or_default();
    if json_out {
        println!("{v}");
    } else {
        let p = &v["proof"];
        println!(
            "window {} .. {}: {} issued, {} ended, {} still within their lifetime, {} without an end; audit chain {}",
            v["window"]["from"],
            v["window"]["to"],
            p["issued_in_window"],
            p["ended"],
            p["still_active_within_lifetime"],
            p["unended"],
            if p["audit_chain_verified"] == true {
                "verified"
            } else {
                "BROKEN"
            }
        );
        if findings.is_empty() {
            println!("no standing privilege found");
        }
        for f in &findings {
            let what = ["grant_id", "credential", "workload", "target"]
                .iter()
                .filter_map(|k| f[*k].as_str().map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "{:28} {what}  {}",
                f["kind"].as_str().unwrap_or(""),
                f["detail"].as_str().unwrap_or("")
            );
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        Err(fail(8, format!("{} finding(s)", findings.len())))
    }
}

async fn grants(cmd: GrantsCmd, json_out: bool) -> Out {
    match cmd {
        GrantsCmd::List {
            server,
            state,
            workload,
            task,
            audience,
            limit,
            mut before,
            all,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            for (k, v) in [
                ("state", state),
                ("workload", workload),
                ("task", task),
                ("audience", audience),
            ] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            let url = format!("{}/v1/grants", server.url.trim_end_matches('/'));
            let token = operator_token(&server)?;
            let mut listed = Vec::new();
            let next = loop {
                let mut page = q.clone();
                if let Some(b) = &before {
                    page.push(("before", b.clone()));
                }
                let v = answer(
                    client()
                        .get(&url)
                        .bearer_auth(&token)
                        .query(&page)
                        .send()
                        .await,
                )
                .await?;
                listed.extend(v["grants"].as_array().into_iter().flatten().cloned());
                let next = v["next"].as_str().map(str::to_owned);
                match next {
                    Some(n) if all => before = Some(n),
                    other => break other,
                }
            };
            if json_out {
                println!("{}", json!({ "grants": listed, "next": next }));
            } else {
                for g in &listed {
                    print_grant(g);
                }
                if let Some(n) = next {
                    eprintln!("more grants: --before {n} (or --all)");
                }
            }
        }
        GrantsCmd::Show { id, server } => {
            let url = format!("{}/v1/grants/{id}", server.url.trim_end_matches('/'));
            let v = answer(
                client()
                    .get(&url)
                    .bearer_auth(operator_token(&server)?)
                    .send()
                    .await,
            )
            .await?;
            if json_out {
                println!("{v}");
            } else {
                print_grant(&v);
                for e in v["audit"].as_array().into_iter().flatten() {
                    println!(
                        "  #{:<6} {}  {:<18} {}",
                        e["seq"],
                        lapse_core::Timestamp::from_millis(e["at"].as_i64().unwrap_or(0)).rfc3339(),
                        e["kind"].as_str().unwrap_or(""),
                        e["actor"].as_str().unwrap_or("")
                    );
                }
            }
        }
        GrantsCmd::Revoke {
            id,
            server,
            reason,
            wait_gates,
            wait_timeout,
        } => {
            let url = format!("{}/v1/grants/{id}/revoke", server.url.trim_end_matches('/'));
            let v = answer(
                client()
                    .post(&url)
                    .bearer_auth(operator_token(&server)?)
                    .json(&json!({ "reason": reason }))
                    .send()
                    .await,
            )
            .await?;
            if !wait_gates.is_empty() {
                let at = v["feed_position"].as_u64().unwrap_or(0);
                let within = std::time::Duration::from_secs(wait_timeout.secs().max(1));
                let late = gates_behind(&wait_gates, at, within).await;
                if !late.is_empty() {
                    return Err(fail(
                        7,
                        format!(
                            "revoked, but these gates had not applied it (feed position {at}) within {}s: {}",
                            within.as_secs(),
                            late.join("; ")
                        ),
                    ));
                }
            }
            if json_out {
                println!("{v}")
            } else {
                print_grant(&v)
            }
        }
        GrantsCmd::Complete {
            id,
            server,
            access_token,
            dpop_key,
            reason,
        } => {
            let v = workload_call(
                &server,
                &id,
                "complete",
                &access_token,
                &dpop_key,
                json!({ "reason": reason }),
            )
            .await?;
            if json_out {
                println!("{v}")
            } else {
                print_grant(&v)
            }
        }
        GrantsCmd::Renew {
            id,
            server,
            access_token,
            dpop_key,
            ttl,
        } => {
            let body = match ttl {
                Some(t) => json!({ "ttl": t.to_string() }),
                None => json!({}),
            };
            let v = workload_call(&server, &id, "renew", &access_token, &dpop_key, body).await?;
            if json_out {
                println!("{v}");
            } else {
                println!("expires  in {}s", v["expires_in"]);
                println!("token    {}", v["access_token"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

fn policy(cmd: PolicyCmd, json_out: bool) -> Out {
    match cmd {
        PolicyCmd::Schema => {
            print!("{}", lapse_policy::schema::BASE_SCHEMA);
            Ok(())
        }
        PolicyCmd::Validate { policies } => {
            let b = lapse_policy::PolicyBundle::load_dir(&policies)
                .map_err(|e| fail(1, e.to_string()))?;
            if json_out {
                println!(
                    "{}",
                    json!({ "valid": true, "policies": b.policy_count, "actions": b.actions() })
                );
            } else {
                println!(
                    "{}: {} policies valid; actions: {}",
                    policies.display(),
                    b.policy_count,
                    b.actions().join(", ")
                );
            }
            Ok(())
        }
        PolicyCmd::Test { file, policies } => {
            let b = lapse_policy::PolicyBundle::load_dir(&policies)
                .map_err(|e| fail(1, e.to_string()))?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
            let cases = lapse_policy::cases::parse(&text).map_err(|e| fail(2, e.to_string()))?;
            let results =
                lapse_policy::cases::run(&b, &cases).map_err(|e| fail(2, e.to_string()))?;
            let failed = results.iter().filter(|r| !r.passed).count();
            if json_out {
                println!("{}", json!({ "results": results, "failed": failed }));
            } else {
                for r in &results {
                    if r.passed {
                        println!("ok    {}", r.name);
                    } else {
                        println!("FAIL  {}: {}", r.name, r.failures.join("; "));
                    }
                }
                println!("{} passed, {} failed", results.len() - failed, failed);
            }
            if failed > 0 {
                Err(fail(6, format!("{failed} policy test(s) failed")))
            } else {
                Ok(())
            }
        }
    }
}

/// The store a config names, and its key ring. `private`: the ring must be able
/// to sign (rotation); otherwise public keys suffice, so an auditor can verify the
/// log without the key-encryption key.
pub(crate) async fn open_store(
    config: Option<PathBuf>,
    data: &Path,
    private: bool,
) -> Result<
    (
        Arc<dyn lapse_store::Store>,
        Arc<lapse_server::keyring::KeyRing>,
        Config,
    ),
    Fail,
> {
    use lapse_server::keyring::KeyRing;
    let path = config.unwrap_or_else(|| data.join("lapse.toml"));
    let cfg = Config::load(&path).map_err(|e| fail(1, e.to_string()))?;
    let ring = match (&cfg.key_encryption_key, private) {
        (None, _) => {
            let path = cfg.signing_key.as_deref().ok_or_else(|| {
                fail(
                    1,
                    lapse_server::keyring::KeyRingError::NoKeyFile.to_string(),
                )
            })?;
            KeyRing::single(
                lapse_token::SigningKey::load(path).map_err(|e| fail(1, e.to_string()))?,
            )
        }
        (Some(_), true) => KeyRing::new(&cfg).map_err(|e| fail(1, e.to_string()))?,
        // The key-encryption key authenticates the keys when it is at hand.
        (Some(_), false) => KeyRing::new(&cfg).unwrap_or_else(|_| KeyRing::public_only()),
    };
    let ring = Arc::new(ring);
    let store = lapse_store::open(
        &cfg.store,
        ring.clone(),
        std::time::Duration::from_secs(cfg.store_timeout.secs().max(1)),
    )
    .await
    .map_err(|e| fail(7, e.to_string()))?;
    ring.reload(store.as_ref())
        .await
        .map_err(|e| fail(7, e.to_string()))?;
    Ok((store, ring, cfg))
}

fn note_unauthenticated(keys: &lapse_server::keyring::KeyRing) {
    if !keys.authenticated() {
        eprintln!(
            "note: the signing keys were read from the database without the key-encryption key; \
             someone with write access to the database could have replaced them. \
             Set the key-encryption key to verify against authenticated keys."
        );
    }
}

/// The keys of a JWKS document, by key id.
fn jwks_keys(path: &Path) -> Result<HashMap<String, lapse_token::PublicKey>, Fail> {
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(1, format!("{}: {e}", path.display())))?;
    let not_jwks = |e: String| fail(1, format!("{}: not a JWKS document: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).map_err(|e| not_jwks(e.to_string()))?;
    let jwks: Vec<lapse_token::Jwk> =
        serde_json::from_value(doc.get("keys").cloned().unwrap_or(Value::Null))
            .map_err(|e| not_jwks(format!("`keys`: {e}")))?;
    let mut keys = HashMap::new();
    for k in &jwks {
        let kid = k
            .kid
            .clone()
            .ok_or_else(|| fail(1, format!("{}: a key without `kid`", path.display())))?;
        let public = lapse_token::PublicKey::from_jwk(k)
            .map_err(|e| fail(1, format!("{}: key `{kid}`: {e}", path.display())))?;
        keys.insert(kid, public);
    }
    Ok(keys)
}

fn verify_export_file(
    file: &Path,
    key: impl Fn(&str) -> Option<lapse_token::PublicKey>,
) -> Result<lapse_store::VerifyReport, Fail> {
    let text =
        std::fs::read_to_string(file).map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
    lapse_store::audit::verify_export(&text, |kid, m, s| {
        key(kid).is_some_and(|p| p.verify(m, s).is_ok())
    })
    .map_err(|e| fail(5, format!("{}: {e}", file.display())))
}

/// The gates (of `gates`) whose `/readyz` `feed_position` did not reach `at`
/// within `within`, each with what it last said.
async fn gates_behind(gates: &[String], at: u64, within: std::time::Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let http = client();
    let mut waiting: Vec<(String, String)> = gates
        .iter()
        .map(|g| {
            (
                g.trim_end_matches('/').to_owned(),
                "not asked yet".to_owned(),
            )
        })
        .collect();
    loop {
        let mut still = Vec::new();
        for (gate, _) in waiting {
            let asked = http
                .get(format!("{gate}/readyz"))
                .timeout(std::time::Duration::from_secs(1))
                .send()
                .await;
            let said = match asked {
                Ok(r) => match r.json::<Value>().await {
                    Ok(v) if v["feed_position"].as_u64().is_some_and(|p| p >= at) => continue,
                    Ok(v) => format!("at feed position {}", v["feed_position"]),
                    Err(e) => format!("no readiness answer: {e}"),
                },
                Err(e) => format!("unreachable: {e}"),
            };
            still.push((gate, said));
        }
        waiting = still;
        if waiting.is_empty() || std::time::Instant::now() >= deadline {
            return waiting
                .into_iter()
                .map(|(g, why)| format!("{g} ({why})"))
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

async fn audit(cmd: AuditCmd, json_out: bool) -> Out {
    match cmd {
        AuditCmd::Verify {
            config,
            data,
            file,
            jwks,
        } => {
            let r = match (file, jwks) {
                (Some(file), Some(jwks)) => {
                    let keys = jwks_keys(&jwks)?;
                    verify_export_file(&file, |kid| keys.get(kid).cloned())?
                }
                (Some(file), None) => {
                    let (store, keys, _) = open_store(config, &data, false).await?;
                    note_unauthenticated(&keys);
                    keys.reload(store.as_ref())
                        .await
                        .map_err(|e| fail(7, e.to_string()))?;
                    verify_export_file(&file, |kid| keys.any(kid))?
                }
                (None, _) => {
                    let (store, keys, _) = open_store(config, &data, false).await?;
                    note_unauthenticated(&keys);
                    lapse_server::verify_audit(store.as_ref(), &keys)
                        .await
                        .map_err(|e| fail(7, e.to_string()))?
                }
            };
            if json_out {
                println!("{}", json!(r));
            } else if let Some((seq, why)) = &r.first_bad {
                println!("audit chain BROKEN at entry {seq}: {why}");
            } else {
                println!(
                    "audit chain verifies: {} entries, head {}",
                    r.entries,
                    r.head.as_deref().unwrap_or("(empty)")
                );
            }
            if r.ok() {
                Ok(())
            } else {
                Err(fail(5, "the audit chain does not verify"))
            }
        }
        AuditCmd::Export { config, data, out } => {
            use std::io::Write;
            let (store, _, _) = open_store(config, &data, false).await?;
            let mut w: Box<dyn Write> = match &out {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .map_err(|e| fail(1, format!("{}: {e}", p.display())))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            // Entries, then the checkpoint read after them, as its last line: an
            // export verifies offline (`lapse audit verify --file`).
            let mut written: Result<(), Fail> = Ok(());
            let checkpoint = lapse_server::read_audit(store.as_ref(), |e| {
                if written.is_ok() {
                    written = serde_json::to_string(e)
                        .map_err(|e| fail(1, e.to_string()))
                        .and_then(|line| writeln!(w, "{line}").map_err(|e| fail(1, e.to_string())));
                }
            })
            .await
            .map_err(|e| fail(7, e.to_string()))?;
            written?;
            let trailer = lapse_store::audit::ExportTrailer {
                checkpoint: checkpoint.clone(),
            };
            let line = serde_json::to_string(&trailer).map_err(|e| fail(1, e.to_string()))?;
            writeln!(w, "{line}").map_err(|e| fail(1, e.to_string()))?;
            w.flush().map_err(|e| fail(1, e.to_string()))?;
            if let Some(cp) = checkpoint
                && !json_out
                && out.is_some()
            {
                eprintln!(
                    "exported through entry {} (signed checkpoint {})",
                    cp.seq, cp.hash
                );
            }
            Ok(())
        }
    }
}
