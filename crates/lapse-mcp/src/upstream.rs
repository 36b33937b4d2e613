//! The MCP servers behind the proxy. The proxy is their client: it opens its own
//! session with each (the 2025-11-25 handshake), lists their tools and forwards
//! the calls it allows. Nothing the agent sent is passed on but the tool's name
//! and arguments: no headers, and never the agent's token.

use crate::config::UpstreamConfig;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, oneshot};

/// The revision the proxy speaks to its upstreams.
pub const UPSTREAM_PROTOCOL: &str = "2025-11-25";
/// How long an upstream may take to answer one request.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Longest line an upstream may send over stdio.
const MAX_LINE: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream `{0}`: {1}")]
    Failed(String, String),
}

/// One upstream MCP server.
pub enum Upstream {
    Stdio(Arc<StdioUpstream>),
    Http(HttpUpstream),
}

impl Upstream {
    pub async fn start(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let up = match &cfg.url {
            Some(url) => {
                let credential = match &cfg.credential {
                    Some(spec) => Some(
                        lapse_gate::config::secret("credential", spec)
                            .map_err(|e| UpstreamError::Failed(cfg.name.clone(), e.to_string()))?,
                    ),
                    None => None,
                };
                Self::Http(HttpUpstream {
                    name: cfg.name.clone(),
                    url: url.clone(),
                    credential,
                    http: lapse_identity::http_client(),
                    session: std::sync::Mutex::new(None),
                    next: AtomicU64::new(1),
                })
            }
            None => Self::Stdio(StdioUpstream::spawn(cfg)?),
        };
        let init = up
            .request(
                "initialize",
                json!({
                    "protocolVersion": UPSTREAM_PROTOCOL,
                    "capabilities": {},
                    "clientInfo": { "name": "lapse-mcp-proxy", "version": env!("CARGO_PKG_VERSION") },
                }),
            )
            .await?;
        if init.get("result").is_none() {
            return Err(up.failed(format!("initialize was refused: {init}")));
        }
        up.notify("notifications/initialized").await?;
        Ok(up)
    }

    fn name(&self) -> &str {
        match self {
            Self::Stdio(s) => &s.name,
            Self::Http(h) => &h.name,
        }
    }

    fn failed(&self, why: String) -> UpstreamError {
        UpstreamError::Failed(self.name().to_owned(), why)
    }

    /// Sends one request; answers the whole JSON-RPC response (result or error).
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        match self {
            Self::Stdio(s) => s.request(method, params).await,
            Self::Http(h) => h.request(method, params).await,
        }
    }

    async fn notify(&self, method: &str) -> Result<(), UpstreamError> {
        let msg = json!({ "jsonrpc": "2.0", "method": method });
        match self {
            Self::Stdio(s) => s.write(&msg).await,
            Self::Http(h) => h.post(&msg).await.map(|_| ()),
        }
    }

    /// Every tool the server offers (all pages).
    pub async fn tools(&self) -> Result<Vec<Value>, UpstreamError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let r = self.request("tools/list", params).await?;
            let result = r
                .get("result")
                .ok_or_else(|| self.failed(format!("tools/list failed: {r}")))?;
            if let Some(tools) = result.get("tools").and_then(Value::as_array) {
                out.extend(tools.iter().cloned());
            }
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(out)
    }
}

pub struct StdioUpstream {
    name: String,
    stdin: Mutex<tokio::process::ChildStdin>,
    pending: std::sync::Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next: AtomicU64,
    _child: Mutex<tokio::process::Child>,
}

impl StdioUpstream {
    fn spawn(cfg: &UpstreamConfig) -> Result<Arc<Self>, UpstreamError> {
        let fail = |why: String| UpstreamError::Failed(cfg.name.clone(), why);
        let (program, args) = cfg
            .command
            .split_first()
            .ok_or_else(|| fail("no command".into()))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            // The agent's token is in the proxy's environment; a tool server gets
            // none of it.
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .envs(&cfg.env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start `{program}`: {e}")))?;
        let stdin = child.stdin.take().ok_or_else(|| fail("no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| fail("no stdout".into()))?;
        let up = Arc::new(Self {
            name: cfg.name.clone(),
            stdin: Mutex::new(stdin),
            pending: std::sync::Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            _child: Mutex::new(child),
        });
        tokio::spawn(read_loop(up.clone(), stdout));
        Ok(up)
    }

    async fn write(&self, msg: &Value) -> Result<(), UpstreamError> {
        let mut line = msg.to_string();
        line.push('\n');
        let mut w = self.stdin.lock().await;
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| UpstreamError::Failed(self.name.clone(), format!("write failed: {e}")))?;
        w.flush()
            .await
            .map_err(|e| UpstreamError::Failed(self.name.clone(), format!("write failed: {e}")))
    }

    async fn request(&self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let sent = self
            .write(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))
            .await;
        if let Err(e) = sent {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&id);
            }
            return Err(e);
        }
        match tokio::time::timeout(TIMEOUT, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(UpstreamError::Failed(
                self.name.clone(),
                "the server exited".into(),
            )),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                Err(UpstreamError::Failed(
                    self.name.clone(),
                    format!("no answer to `{method}` within {} s", TIMEOUT.as_secs()),
                ))
            }
        }
    }
}

/// Routes the server's answers to their requests. Requests the server makes of
/// its client (sampling, roots, elicitation) are refused: the proxy does not relay
/// them to the agent.
async fn read_loop(up: Arc<StdioUpstream>, stdout: tokio::process::ChildStdout) {
    let mut lines = BufReader::with_capacity(64 * 1024, stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.len() > MAX_LINE {
            tracing::warn!(upstream = %up.name, "upstream sent an over-long line; ignored");
            continue;
        }
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(upstream = %up.name, "upstream sent a line that is not JSON; ignored");
            continue;
        };
        let id = msg.get("id").cloned();
        if msg.get("method").is_some() {
            if let Some(id) = id {
                let refusal = json!({ "jsonrpc": "2.0", "id": id, "error": { "code": -32601, "message": "the Lapse MCP proxy does not relay server requests" } });
                let _ = up.write(&refusal).await;
            }
            continue;
        }
        if let Some(n) = id.as_ref().and_then(Value::as_u64)
            && let Some(tx) = up.pending.lock().ok().and_then(|mut p| p.remove(&n))
        {
            let _ = tx.send(msg);
        }
    }
    // The server is gone: every waiting request learns it now.
    if let Ok(mut p) = up.pending.lock() {
        p.clear();
    }
}

pub struct HttpUpstream {
    name: String,
    url: String,
    credential: Option<String>,
    http: reqwest::Client,
    session: std::sync::Mutex<Option<String>>,
    next: AtomicU64,
}

impl HttpUpstream {
    async fn request(&self, method: &str, params: Value) -> Result<Value, UpstreamError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let body = self
            .post(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))
            .await?;
        body.into_iter()
            .find(|m| m.get("id").and_then(Value::as_u64) == Some(id))
            .ok_or_else(|| {
                UpstreamError::Failed(self.name.clone(), format!("no answer to `{method}`"))
            })
    }

    /// POSTs one message; answers the JSON-RPC messages of the response (a JSON
    /// body or the events of an SSE stream).
    async fn post(&self, msg: &Value) -> Result<Vec<Value>, UpstreamError> {
        let fail = |why: String| UpstreamError::Failed(self.name.clone(), why);
        let mut rb = self
            .http
            .post(&self.url)
            .header("Accept", "application/json, text/event-stream")
            .header("Content-Type", "application/json")
            .timeout(TIMEOUT)
            .body(msg.to_string());
        let initializing = msg.get("method").and_then(Value::as_str) == Some("initialize");
        if !initializing {
            rb = rb.header("MCP-Protocol-Version", UPSTREAM_PROTOCOL);
        }
        if let Some(s) = self.session.lock().ok().and_then(|s| s.clone()) {
            rb = rb.header("Mcp-Session-Id", s);
        }
        // Exactly one credential per request: the proxy's own, or none.
        if let Some(c) = &self.credential {
            rb = rb.bearer_auth(c);
        }
        let r = rb.send().await.map_err(|e| fail(e.to_string()))?;
        if initializing
            && let Some(s) = r
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
            && let Ok(mut slot) = self.session.lock()
        {
            *slot = Some(s.to_owned());
        }
        let status = r.status();
        let sse = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let text = r.text().await.map_err(|e| fail(e.to_string()))?;
        if status.as_u16() == 202 {
            return Ok(vec![]);
        }
        let messages: Vec<Value> = if sse {
            text.split("\n\n")
                .filter_map(|event| {
                    let data: Vec<&str> = event
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect();
                    serde_json::from_str(&data.join("\n")).ok()
                })
                .collect()
        } else {
            serde_json::from_str::<Value>(&text).map_or_else(|_| vec![], |v| vec![v])
        };
        if messages.is_empty() && !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        Ok(messages)
    }
}
