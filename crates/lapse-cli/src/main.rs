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
mod audit;
mod client;
mod exchange;
mod exit;
mod grants;
mod identity_source;
mod keys;
mod local;
mod memory;
mod operator;
mod policy;
mod report;
mod request;
mod run;
mod serve;
mod wait;
mod workloads;

use clap::{Parser, Subcommand};
use exit::{Fail, Out, fail};
use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_server::dev;
use local::DEFAULT_DEV_DIR;
use std::path::PathBuf;
use std::process::ExitCode;

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
    Request(Box<request::RequestArgs>),
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
        cmd: grants::GrantsCmd,
    },
    /// Quarantine workloads that can no longer be trusted, and release them.
    Workloads {
        #[command(subcommand)]
        cmd: workloads::WorkloadsCmd,
    },
    /// Validate and test policies.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Verify and export the audit log.
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
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
        cmd: report::ReportCmd,
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
        } => serve::broker(config, dev, &data, listen).await,
        Cmd::Dev { cmd } => dev_cmd(cmd),
        Cmd::Request(args) => request::run(*args, json_out).await,
        // The command's own exit code passes through, without a message of ours.
        Cmd::Run(args) => match run::run(*args).await? {
            0 => Ok(()),
            code => Err(Fail(code, String::new())),
        },
        Cmd::Grants { cmd } => grants::run(cmd, json_out).await,
        Cmd::Workloads { cmd } => workloads::run(cmd, json_out).await,
        Cmd::Approvals { cmd } => approvals::run(cmd, json_out).await,
        Cmd::Reviews { cmd } => approvals::reviews(cmd, json_out).await,
        Cmd::Policy { cmd } => policy::run(cmd, json_out),
        Cmd::Audit { cmd } => audit::run(cmd, json_out).await,
        Cmd::Operator { cmd } => operator::run(cmd, json_out),
        Cmd::Keys { cmd } => keys::run(cmd, json_out).await,
        Cmd::Gate { config } => serve::gate(&config).await,
        Cmd::McpProxy {
            config,
            http,
            listen,
            token_stdin,
            token,
        } => serve::mcp_proxy(&config, http.then_some(listen), token_stdin, token).await,
        Cmd::Report { cmd } => report::run(cmd, json_out).await,
    }
}

fn dev_cmd(cmd: DevCmd) -> Out {
    let DevCmd::Token {
        workload,
        ttl,
        claims,
        data,
    } = cmd;
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
