//! The proxy as a stdio MCP server: the agent starts `lapse mcp-proxy` as its
//! server and writes JSON-RPC messages to it, one per line. The agent's token comes
//! with the process (`LAPSE_ACCESS_TOKEN`, as `lapse run` sets it); it is checked
//! on every message, so a grant that ends mid-session refuses the very next call.

use crate::{Auth, Proxy};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest message the agent may send.
const MAX_LINE: usize = 4 << 20;

/// Serves `input` to `output` until `input` ends; then waits for calls in flight
/// and sends their audit records.
pub async fn serve(
    proxy: Arc<Proxy>,
    token: String,
    input: impl AsyncRead + Unpin,
    output: impl AsyncWrite + Unpin + Send + 'static,
) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let writer = tokio::spawn(async move {
        let mut out = output;
        while let Some(mut line) = rx.recv().await {
            line.push('\n');
            out.write_all(line.as_bytes()).await?;
            out.flush().await?;
        }
        std::io::Result::Ok(())
    });
    let token: Arc<str> = token.into();
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut inflight = tokio::task::JoinSet::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > MAX_LINE {
            let e = json!({ "jsonrpc": "2.0", "id": null, "error": { "code": -32600, "message": "message too long" } });
            let _ = tx.send(e.to_string()).await;
            continue;
        }
        let msg: Value = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(e) => {
                let e = json!({ "jsonrpc": "2.0", "id": null, "error": { "code": -32700, "message": format!("parse error: {e}") } });
                let _ = tx.send(e.to_string()).await;
                continue;
            }
        };
        // Calls run concurrently, as a client with several requests open expects;
        // each answer carries its id.
        let (p, t, tx) = (proxy.clone(), token.clone(), tx.clone());
        inflight.spawn(async move {
            if let Some(answer) = p.handle(&msg, &Auth::Held(&t)).await.message {
                let _ = tx.send(answer.to_string()).await;
            }
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    drop(tx);
    let written = writer.await.map_err(std::io::Error::other)?;
    if let Err(e) = proxy.report().await {
        tracing::error!(error = %e, unreported = proxy.unreported(), "could not send the last tool-call records");
    }
    written
}
