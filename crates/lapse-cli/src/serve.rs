//! The commands that serve until stopped: the broker, the gate, the MCP proxy.

use crate::exit::{Out, fail};
use crate::memory;
use lapse_broker::config::Config;
use lapse_core::SystemClock;
use lapse_server::dev;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) async fn gate(config: &Path) -> Out {
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

pub(crate) async fn mcp_proxy(
    config: &Path,
    http: Option<Option<std::net::SocketAddr>>,
    token_stdin: bool,
    token: Option<String>,
) -> Out {
    // The operator token in its memory writes audit records: no other process of
    // this user (an agent) may read that memory or `/proc/PID/environ`.
    crate::run::mcp_proxy::not_dumpable().map_err(|e| fail(1, e))?;
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
        let (operator, ended) = crate::run::mcp_proxy::from_supervisor().map_err(|e| fail(2, e))?;
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

pub(crate) async fn broker(
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
