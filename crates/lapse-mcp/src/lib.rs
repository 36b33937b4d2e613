//! `lapse mcp-proxy`: the gate in front of an agent's tools.
//!
//! An MCP client (the agent) talks to the proxy as to any MCP server, over stdio or
//! streamable HTTP; the proxy is itself the client of the real servers behind it
//! ([`upstream`]). For every message it knows which Lapse grant speaks: the token
//! the agent holds (stdio: handed to the proxy at start) or presents with a DPoP
//! proof on each HTTP request. `tools/list` shows only the tools the task declared;
//! every `tools/call` is decided before it is forwarded:
//!
//! 1. the token is valid for this proxy's audience and action, and its grant has
//!    not ended (the revocation feed; a stale feed fails closed);
//! 2. the tool is declared and its arguments satisfy the declared constraints
//!    (`lapse_core::tools`) — a call outside the declared intent is *drift*;
//! 3. the broker's current Cedar policies allow it, with `context.tool` holding the
//!    tool's name and typed arguments.
//!
//! Exactly one decision and one audit record per attempted call (sent to the broker
//! in batches; past `max_unreported` calls without their record, calls are
//! refused). The agent's token never goes upstream. Refusals are JSON-RPC errors
//! that say why: `-32602` for a call outside the declared intent (as MCP answers an
//! unknown tool), [`REFUSED`] for policy and grant state, [`UNAVAILABLE`] when the
//! proxy cannot decide.

pub mod config;
pub mod http;
pub mod stdio;
pub mod upstream;

use config::{OnDrift, ProxyConfig};
use lapse_core::{DecisionOutcome, ToolCall, ToolSet};
use lapse_gate::BrokerPolicy;
use lapse_token::AccessClaims;
use lapse_verifier::{Denial, Verifier};
use serde_json::{Map, Value, json};
use sha2::Digest;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use upstream::Upstream;

/// JSON-RPC invalid params: a tool outside the declared intent, or arguments
/// outside its constraints (MCP answers an unknown tool so).
pub const INVALID_PARAMS: i64 = -32602;
/// The token, the grant's state or policy refuses the call.
pub const REFUSED: i64 = -31003;
/// The proxy cannot decide now (no policy yet, audit backlog full): fails closed.
pub const UNAVAILABLE: i64 = -31503;

/// Protocol revisions the proxy answers `initialize` with (newest first).
const HANDSHAKE_VERSIONS: &[&str] = &[LATEST_HANDSHAKE, "2025-06-18", "2025-03-26"];
const LATEST_HANDSHAKE: &str = "2025-11-25";
/// The stateless revision (`server/discover`, `_meta` on every request).
pub const MODERN_VERSION: &str = "2026-07-28";
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// Most calls in one audit report (the broker takes 200), and most bytes of their
/// JSON (the broker takes 64 KiB bodies; a record with a long reason is ~1.3 KiB,
/// a short one with its key ~280 bytes, so 200 of those still fit).
const CALLS_PER_REPORT: usize = 200;
const REPORT_BYTES: usize = 56 * 1024;
const USES_PER_REPORT: usize = lapse_gate::USES_PER_REPORT;

/// How many of the queued records go in the next report: at most
/// [`CALLS_PER_REPORT`] and [`REPORT_BYTES`] of JSON, and always at least one.
fn batch_len(queue: &[Value]) -> usize {
    let mut bytes = 0;
    let n = queue
        .iter()
        .take(CALLS_PER_REPORT)
        .take_while(|c| {
            bytes += c.to_string().len() + 1;
            bytes <= REPORT_BYTES
        })
        .count();
    n.max(usize::from(!queue.is_empty()))
}
/// Audit records waiting for the broker. One flush at a time: the periodic
/// report and the last one at shutdown would otherwise both send the head of
/// the queue, and the broker would record those calls twice.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Vec<Value>>,
    flushing: tokio::sync::Mutex<()>,
}

impl Outbox {
    fn len(&self) -> usize {
        // A poisoned queue reads as full, so allowed calls stop (fail closed).
        self.queue.lock().map_or(usize::MAX, |q| q.len())
    }

    /// Queues a record unless `cap` are already waiting; false when dropped.
    fn push(&self, rec: Value, cap: usize) -> bool {
        match self.queue.lock() {
            Ok(mut q) if q.len() < cap => {
                q.push(rec);
                true
            }
            _ => false,
        }
    }

    /// Sends the queue, in order, in batches the broker takes. A batch leaves
    /// the queue only once the broker has taken it; a failed one stays first.
    /// "Failed" may be an answer lost after the broker committed: the resend
    /// (with new records behind it) is safe because each record carries its key.
    async fn flush<F, Fut>(&self, mut send: F) -> Result<usize, String>
    where
        F: FnMut(Vec<Value>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let _one_at_a_time = self.flushing.lock().await;
        let mut sent = 0;
        loop {
            let batch: Vec<Value> = match self.queue.lock() {
                Ok(q) => q.iter().take(batch_len(&q)).cloned().collect(),
                Err(_) => return Err("the audit queue is poisoned".into()),
            };
            if batch.is_empty() {
                return Ok(sent);
            }
            let n = batch.len();
            send(batch).await?;
            if let Ok(mut q) = self.queue.lock() {
                let n = n.min(q.len());
                q.drain(..n);
            }
            sent += n;
        }
    }
}

/// Most compiled tool declarations kept (one per token seen).
const TOOLSETS_CAP: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Verifier(#[from] lapse_verifier::VerifierError),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
}

/// How the agent's token reaches the proxy.
pub enum Auth<'a> {
    /// Stdio: the token the proxy was started with. No request exists to carry a
    /// proof of possession.
    Held(&'a str),
    /// HTTP: the request's `Authorization` and `DPoP` headers, checked against the
    /// proxy's URL.
    Request {
        authorization: Option<&'a str>,
        dpop: &'a [&'a str],
        source: IpAddr,
    },
    /// A request the transport already verified (a DPoP proof is good once).
    Verified {
        claims: Box<AccessClaims>,
        source: IpAddr,
    },
}

/// What a message gets: the answer (none for a notification) and, when the token
/// itself was refused, why (an HTTP transport answers 401 then).
pub struct Answer {
    pub message: Option<Value>,
    pub denial: Option<Denial>,
}

impl Answer {
    fn reply(message: Value) -> Self {
        Self {
            message: Some(message),
            denial: None,
        }
    }
}

pub struct Proxy {
    cfg: ProxyConfig,
    pub verifier: Arc<Verifier>,
    policy: Arc<BrokerPolicy>,
    upstreams: Vec<Upstream>,
    /// Tool name → index of the upstream offering it.
    routes: RwLock<HashMap<String, usize>>,
    toolsets: Mutex<HashMap<String, Arc<ToolSet>>>,
    /// Decided calls whose audit record the broker has not taken yet.
    unreported: Outbox,
    /// Grants used since the last report, with the latest use (unix ms).
    uses: Mutex<HashMap<String, i64>>,
    /// Tasks already reported for drift (once is enough).
    drifted: Mutex<std::collections::HashSet<String>>,
    http: reqwest::Client,
    token: String,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn error(id: &Value, code: i64, message: &str, data: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message, "data": data } })
}

fn result(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// Whether a request speaks the stateless revision (its `_meta` says so).
fn modern(params: &Value) -> bool {
    params
        .get("_meta")
        .and_then(|m| m.get(META_VERSION))
        .and_then(Value::as_str)
        == Some(MODERN_VERSION)
}

impl Proxy {
    /// Connects to the broker (keys, feed position, policies) and starts every
    /// upstream.
    pub async fn new(cfg: ProxyConfig) -> Result<Arc<Self>, ProxyError> {
        let token = cfg.operator_token().map_err(ProxyError::Config)?;
        Self::with_token(cfg, token).await
    }

    /// [`Proxy::new`] with the operator token already read (`token = "stdin"`:
    /// the caller read it from its supervisor's pipe).
    pub async fn with_token(cfg: ProxyConfig, token: String) -> Result<Arc<Self>, ProxyError> {
        let (verifier, policy) = lapse_gate::policy::connect(&lapse_gate::policy::BrokerLink {
            broker: &cfg.broker,
            issuer: cfg.issuer.as_deref(),
            audience: &cfg.audience,
            token: &token,
            staleness: cfg.staleness,
            on_stale: cfg.on_stale,
        })
        .await?;
        let mut upstreams = Vec::new();
        for u in &cfg.upstreams {
            upstreams.push(Upstream::start(u).await?);
        }
        let proxy = Arc::new(Self {
            policy,
            cfg,
            verifier,
            upstreams,
            routes: RwLock::new(HashMap::new()),
            toolsets: Mutex::new(HashMap::new()),
            unreported: Outbox::default(),
            uses: Mutex::new(HashMap::new()),
            drifted: Mutex::new(std::collections::HashSet::new()),
            http: lapse_identity::http_client(),
            token,
        });
        proxy.list_upstream_tools().await?;
        Ok(proxy)
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Starts following the feed and the policies, and reporting calls; the
    /// handles stop them.
    pub fn run_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = lapse_gate::policy::follow(
            self.verifier.clone(),
            self.policy.clone(),
            Duration::from_secs(self.cfg.policy_refresh.secs()),
        );
        let p = self.clone();
        let reports = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                if let Err(e) = p.report().await {
                    tracing::warn!(error = %e, "could not report tool calls; retrying");
                }
            }
        });
        tasks.push(reports);
        tasks
    }

    /// Every upstream's tools; routes each name to its server. A name two servers
    /// offer is refused on both: which one a call reaches must not be a guess.
    async fn list_upstream_tools(&self) -> Result<Vec<Value>, ProxyError> {
        let mut all = Vec::new();
        let mut routes: HashMap<String, usize> = HashMap::new();
        let mut clashes = Vec::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            for t in u.tools().await? {
                let Some(name) = t.get("name").and_then(Value::as_str) else {
                    continue;
                };
                if routes.insert(name.to_owned(), i).is_some() {
                    clashes.push(name.to_owned());
                }
                all.push(t);
            }
        }
        for c in &clashes {
            tracing::warn!(tool = %c, "two upstreams offer this tool; it is refused");
            routes.remove(c);
        }
        all.retain(|t| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| routes.contains_key(n))
        });
        if let Ok(mut r) = self.routes.write() {
            *r = routes;
        }
        Ok(all)
    }

    fn toolset(&self, claims: &AccessClaims) -> Result<Arc<ToolSet>, String> {
        if let Some(t) = self
            .toolsets
            .lock()
            .ok()
            .and_then(|m| m.get(&claims.jti).cloned())
        {
            return Ok(t);
        }
        let set = Arc::new(ToolSet::compile(&claims.tools).map_err(|e| e.to_string())?);
        if let Ok(mut m) = self.toolsets.lock() {
            if m.len() >= TOOLSETS_CAP {
                m.clear();
            }
            m.insert(claims.jti.clone(), set.clone());
        }
        Ok(set)
    }

    /// The token's claims if it is honoured now.
    pub async fn authenticate(&self, auth: &Auth<'_>) -> Result<AccessClaims, Denial> {
        let now = now_secs();
        let allowed = match auth {
            Auth::Verified { claims, .. } => return Ok((**claims).clone()),
            Auth::Held(token) => {
                self.verifier
                    .verify_held(token, &self.cfg.action, now)
                    .await?
            }
            Auth::Request {
                authorization,
                dpop,
                ..
            } => {
                let url = self.cfg.http.as_ref().map_or("", |h| h.url.as_str());
                self.verifier
                    .verify(&lapse_verifier::Request {
                        method: "POST",
                        url,
                        authorization: *authorization,
                        dpop,
                        action: &self.cfg.action,
                        client_cert: None,
                        now_secs: now,
                    })
                    .await?
            }
        };
        Ok(Arc::unwrap_or_clone(allowed.claims))
    }

    /// The grant a refused token names, when its signature holds (to attach the
    /// refusal's audit record to).
    fn grant_of(&self, auth: &Auth<'_>) -> Option<String> {
        let token = match auth {
            Auth::Held(t) => *t,
            Auth::Request { authorization, .. } => (*authorization)?.split_once(' ')?.1.trim(),
            Auth::Verified { claims, .. } => return Some(claims.grant_id.clone()),
        };
        self.verifier
            .token_claims(token, now_secs())
            .ok()
            .map(|c| c.grant_id.clone())
    }

    /// Answers one JSON-RPC message from the agent.
    pub async fn handle(&self, msg: &Value, auth: &Auth<'_>) -> Answer {
        let null = Value::Null;
        let id = msg.get("id").unwrap_or(&null);
        if msg.get("jsonrpc").and_then(Value::as_str) != Some("2.0") || !msg.is_object() {
            return Answer::reply(error(id, -32600, "not a JSON-RPC 2.0 message", json!({})));
        }
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            // A response to a request the proxy never sends.
            return Answer {
                message: None,
                denial: None,
            };
        };
        if msg.get("id").is_none() {
            // Notifications (initialized, cancelled, …) need no answer.
            return Answer {
                message: None,
                denial: None,
            };
        }
        let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
        let is_modern = modern(&params);
        let info = json!({ "name": "lapse-mcp-proxy", "version": env!("CARGO_PKG_VERSION") });
        let capabilities = json!({ "tools": { "listChanged": false } });
        match method {
            "initialize" => {
                let asked = params
                    .get("protocolVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let version = HANDSHAKE_VERSIONS
                    .iter()
                    .find(|v| **v == asked)
                    .copied()
                    .unwrap_or(LATEST_HANDSHAKE);
                Answer::reply(result(
                    id,
                    json!({
                        "protocolVersion": version,
                        "capabilities": capabilities,
                        "serverInfo": info,
                        "instructions": "Only the tools your Lapse task declared are here; every call is checked against the task.",
                    }),
                ))
            }
            "server/discover" => Answer::reply(result(
                id,
                json!({
                    "supportedVersions": [MODERN_VERSION],
                    "capabilities": capabilities,
                    "resultType": "complete",
                    "ttlMs": 0,
                    "cacheScope": "private",
                    "_meta": { "io.modelcontextprotocol/serverInfo": info },
                }),
            )),
            "ping" => Answer::reply(result(id, modern_fields(json!({}), is_modern))),
            "tools/list" => self.tools_list(id, auth, is_modern).await,
            "tools/call" => self.tools_call(id, &params, auth, is_modern).await,
            other => Answer::reply(error(
                id,
                -32601,
                &format!(
                    "method `{}` is not available through the Lapse MCP proxy",
                    clip(other)
                ),
                json!({}),
            )),
        }
    }

    async fn tools_list(&self, id: &Value, auth: &Auth<'_>, is_modern: bool) -> Answer {
        let claims = match self.authenticate(auth).await {
            Ok(c) => c,
            Err(d) => return refused_token(id, d),
        };
        let set = match self.toolset(&claims) {
            Ok(s) => s,
            Err(e) => return Answer::reply(error(id, UNAVAILABLE, &e, json!({}))),
        };
        let tools = match self.list_upstream_tools().await {
            Ok(t) => t,
            Err(e) => return Answer::reply(error(id, UNAVAILABLE, &e.to_string(), json!({}))),
        };
        let visible: Vec<Value> = tools
            .into_iter()
            .filter(|t| {
                t.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| set.declares(n))
            })
            .collect();
        let mut r = json!({ "tools": visible });
        if is_modern {
            // Filtered per grant: no cache may share it with another caller.
            r = modern_fields(r, true);
            set_field(&mut r, "ttlMs", json!(0));
            set_field(&mut r, "cacheScope", json!("private"));
        }
        Answer::reply(result(id, r))
    }

    async fn tools_call(
        &self,
        id: &Value,
        params: &Value,
        auth: &Auth<'_>,
        is_modern: bool,
    ) -> Answer {
        let started = Instant::now();
        let name = params.get("name").and_then(Value::as_str).unwrap_or("");
        let empty = Map::new();
        let (args, malformed) = match params.get("arguments") {
            None | Some(Value::Null) => (&empty, None),
            Some(Value::Object(m)) => (m, None),
            Some(_) => (&empty, Some("`arguments` must be an object")),
        };
        let malformed = malformed.or(name.is_empty().then_some("`name` is required"));
        let args_sha256 = match malformed {
            // A malformed call is recorded by what was sent.
            Some(_) => hex::encode(sha2::Sha256::digest(
                serde_json::to_vec(params.get("arguments").unwrap_or(&Value::Null))
                    .unwrap_or_default(),
            )),
            None => args_digest(args),
        };
        let claims = match self.authenticate(auth).await {
            Ok(c) => c,
            Err(d) => {
                if let Some(grant) = self.grant_of(auth) {
                    self.record(
                        &grant,
                        name,
                        &args_sha256,
                        Err((&d.to_string(), &[], false)),
                        started,
                    );
                }
                return refused_token(id, d);
            }
        };
        if let Some(why) = malformed {
            self.record(
                &claims.grant_id,
                name,
                &args_sha256,
                Err((why, &[], false)),
                started,
            );
            return Answer::reply(error(id, INVALID_PARAMS, why, json!({})));
        }
        let source = match auth {
            Auth::Request { source, .. } | Auth::Verified { source, .. } => *source,
            Auth::Held(_) => IpAddr::from([127, 0, 0, 1]),
        };
        let decided = match self.decide(&claims, name, args, source) {
            Ok(_) if self.backlog_full() => Err((
                UNAVAILABLE,
                "the proxy cannot record calls now (audit backlog full); failing closed".to_owned(),
                vec![],
                false,
            )),
            other => other,
        };
        match decided {
            Ok(policies) => {
                self.record(&claims.grant_id, name, &args_sha256, Ok(&policies), started);
            }
            Err((code, why, policies, drift)) => {
                self.record(
                    &claims.grant_id,
                    name,
                    &args_sha256,
                    Err((&why, &policies, drift)),
                    started,
                );
                if drift {
                    self.drifted(&claims, &why);
                }
                return Answer::reply(error(
                    id,
                    code,
                    &why,
                    json!({ "reason": why, "policies": policies, "drift": drift, "grant": claims.grant_id }),
                ));
            }
        }
        let route = self.routes.read().ok().and_then(|r| r.get(name).copied());
        let Some(up) = route.and_then(|i| self.upstreams.get(i)) else {
            return Answer::reply(error(
                id,
                UNAVAILABLE,
                "no upstream offers this tool now",
                json!({}),
            ));
        };
        let forwarded = up
            .request("tools/call", json!({ "name": name, "arguments": args }))
            .await;
        match forwarded {
            Ok(mut r) => {
                if let Some(obj) = r.as_object_mut() {
                    obj.insert("id".into(), id.clone());
                    if is_modern && let Some(res) = obj.get_mut("result") {
                        *res = modern_fields(res.take(), true);
                    }
                }
                Answer::reply(r)
            }
            Err(e) => Answer::reply(error(id, UNAVAILABLE, &e.to_string(), json!({}))),
        }
    }

    /// Decides one call: the declared intent, then Cedar. `Err`: the JSON-RPC
    /// code, why, the determining policies, and whether it was drift.
    fn decide(
        &self,
        claims: &AccessClaims,
        name: &str,
        args: &Map<String, Value>,
        source: IpAddr,
    ) -> Result<Vec<String>, (i64, String, Vec<String>, bool)> {
        let set = self
            .toolset(claims)
            .map_err(|e| (UNAVAILABLE, e, vec![], false))?;
        set.check(name, args)
            .map_err(|v| (INVALID_PARAMS, v.to_string(), vec![], true))?;
        let bundle = self.policy.current().ok_or_else(|| {
            (
                UNAVAILABLE,
                "no policy from the broker yet; failing closed".to_owned(),
                vec![],
                false,
            )
        })?;
        let mut request = lapse_gate::request_of(claims, &self.cfg.action, source, now_secs());
        request.context.tool = Some(ToolCall {
            name: name.to_owned(),
            args: args.clone(),
        });
        let decision = bundle.decide(&request);
        match decision.outcome {
            // Approval, if any, was given when the grant was issued.
            DecisionOutcome::Allow { .. } | DecisionOutcome::ApprovalRequired { .. } => {
                Ok(decision.policies)
            }
            DecisionOutcome::Deny { reasons } => {
                Err((REFUSED, reasons.join("; "), decision.policies, false))
            }
        }
    }

    fn backlog_full(&self) -> bool {
        self.unreported.len() >= self.cfg.max_unreported
    }

    /// Queues the audit record of one decided call.
    fn record(
        &self,
        grant: &str,
        tool: &str,
        args_sha256: &str,
        outcome: Result<&[String], (&str, &[String], bool)>,
        started: Instant,
    ) {
        let at = now_secs().saturating_mul(1000);
        let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // The record's idempotency key, sent with every copy of it: a report
        // resent after a lost answer (the broker committed it all the same) is
        // then recorded once.
        let key = hex::encode(rand::random::<[u8; 16]>());
        let rec = match outcome {
            Ok(policies) => {
                json!({ "grant": grant, "at": at, "tool": clip(tool), "args_sha256": args_sha256, "decision": "allow", "policies": policies, "latency_us": latency_us, "key": key })
            }
            Err((why, policies, drift)) => {
                json!({ "grant": grant, "at": at, "tool": clip(tool), "args_sha256": args_sha256, "decision": "deny", "reason": why.chars().take(1000).collect::<String>(), "policies": policies, "drift": drift, "latency_us": latency_us, "key": key })
            }
        };
        // Allowed calls stop at `max_unreported`; refusals may go on being
        // answered past it, and their records stop at twice that.
        if !self
            .unreported
            .push(rec, self.cfg.max_unreported.saturating_mul(2))
        {
            tracing::error!(
                grant,
                tool,
                "audit backlog full: a refused call's record was dropped"
            );
        }
        if let Ok(mut u) = self.uses.lock() {
            u.insert(grant.to_owned(), at);
        }
    }

    /// With `on_drift = "revoke"`, ends the whole task once: an `intent-drift`
    /// signal, which the broker carries to every gate through the feed.
    fn drifted(&self, claims: &AccessClaims, why: &str) {
        if self.cfg.on_drift != OnDrift::Revoke {
            return;
        }
        let key = format!("{}\n{}", claims.sub, claims.task);
        if !self.drifted.lock().is_ok_and(|mut d| d.insert(key)) {
            return;
        }
        let body = json!({
            "type": "intent-drift",
            "subject": { "workload": claims.sub, "task": claims.task },
            "reason": format!("a tool call outside the declared intent: {why}"),
            "event_timestamp": now_secs(),
        });
        let (http, url, token) = (
            self.http.clone(),
            format!("{}/v1/signals", self.cfg.broker.trim_end_matches('/')),
            self.token.clone(),
        );
        tokio::spawn(async move {
            let r = http
                .post(&url)
                .bearer_auth(token)
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            if let Err(e) = r {
                tracing::error!(error = %e, "could not signal intent drift to the broker");
            }
        });
    }

    /// Sends the queued audit records (and uses, for `@idle`) to the broker. A
    /// failed report is kept and sent next time, in order.
    pub async fn report(&self) -> Result<usize, String> {
        let url = format!("{}/v1/tool-calls", self.cfg.broker.trim_end_matches('/'));
        let sent = self
            .unreported
            .flush(|batch| {
                let req = self
                    .http
                    .post(&url)
                    .bearer_auth(&self.token)
                    .json(&json!({ "calls": batch }))
                    .timeout(Duration::from_secs(5));
                async move {
                    req.send()
                        .await
                        .and_then(reqwest::Response::error_for_status)
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            })
            .await?;
        let uses: Vec<(String, i64)> = match self.uses.lock() {
            Ok(mut u) => u.drain().collect(),
            Err(_) => vec![],
        };
        // In reports the broker takes (1,000 uses, 64 KiB); a failed one is only a
        // lost `@idle` refresh, the calls' own records are above.
        for chunk in uses.chunks(USES_PER_REPORT) {
            let body = json!({ "uses": chunk.iter().map(|(g, at)| json!({ "grant": g, "at": at })).collect::<Vec<_>>() });
            let r = self
                .http
                .post(format!(
                    "{}/v1/usage",
                    self.cfg.broker.trim_end_matches('/')
                ))
                .bearer_auth(&self.token)
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not report uses");
            }
        }
        Ok(sent)
    }

    /// Records a `tools/call` the transport refused before it reached
    /// [`Proxy::handle`] (its token was not honoured): it was attempted all the
    /// same. Nothing is recorded when the token names no grant that can be
    /// trusted (a forged token has no grant to attach a record to).
    pub fn refused_before_handling(&self, msg: &Value, auth: &Auth<'_>, why: &Denial) {
        if msg.get("method").and_then(Value::as_str) != Some("tools/call") {
            return;
        }
        let Some(grant) = self.grant_of(auth) else {
            return;
        };
        let params = msg.get("params");
        let name = params
            .and_then(|p| p.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let empty = Map::new();
        let args = params
            .and_then(|p| p.get("arguments"))
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        self.record(
            &grant,
            name,
            &args_digest(args),
            Err((&why.to_string(), &[], false)),
            Instant::now(),
        );
    }

    /// Calls decided but not yet recorded at the broker.
    pub fn unreported(&self) -> usize {
        self.unreported.len()
    }
}

/// SHA-256 of a call's arguments as JSON: the audit record names them without
/// holding them (they may be secrets).
fn args_digest(args: &Map<String, Value>) -> String {
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(args).unwrap_or_default(),
    ))
}

/// The JSON-RPC error code for a refused token, the same on every transport: a
/// client retries [`UNAVAILABLE`] later and gives up on [`REFUSED`].
pub(crate) fn denial_code(d: &Denial) -> i64 {
    if matches!(d, Denial::Unavailable(_) | Denial::FeedStale(_)) {
        UNAVAILABLE
    } else {
        REFUSED
    }
}

/// A refused token as a JSON-RPC error, with the denial for an HTTP transport.
fn refused_token(id: &Value, d: Denial) -> Answer {
    let code = denial_code(&d);
    Answer {
        message: Some(error(
            id,
            code,
            &d.to_string(),
            json!({ "reason": d.to_string(), "error": d.code() }),
        )),
        denial: Some(d),
    }
}

fn modern_fields(mut v: Value, is_modern: bool) -> Value {
    if is_modern {
        set_field(&mut v, "resultType", json!("complete"));
    }
    v
}

fn set_field(v: &mut Value, k: &str, x: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(k.to_owned(), x);
    }
}

fn clip(s: &str) -> String {
    s.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_fit_what_the_broker_takes() {
        let call = |reason: usize| json!({ "grant": "gr_0123456789abcdef0123456789abcdef", "at": 1, "tool": "read_file", "args_sha256": "0".repeat(64), "decision": "deny", "reason": "x".repeat(reason), "policies": ["p"], "drift": true, "latency_us": 10, "key": "0".repeat(32) });
        let short: Vec<Value> = (0..1000).map(|_| call(10)).collect();
        assert_eq!(batch_len(&short), CALLS_PER_REPORT);
        let long: Vec<Value> = (0..1000).map(|_| call(1000)).collect();
        let n = batch_len(&long);
        assert!(n > 0 && n < CALLS_PER_REPORT, "{n}");
        let body = json!({ "calls": &long[..n] }).to_string();
        assert!(body.len() < 64 * 1024, "{} bytes", body.len());
        assert_eq!(batch_len(&[]), 0);
        assert_eq!(
            batch_len(&[call(100_000)]),
            1,
            "an oversized record still goes, alone"
        );
    }

    /// The shutdown report may start while the periodic one waits for the
    /// broker: each record must still reach it once.
    #[tokio::test]
    async fn concurrent_flushes_send_each_record_once() {
        let outbox = Outbox::default();
        for i in 0..450 {
            assert!(outbox.push(json!({ "n": i }), 1000));
        }
        let received = Mutex::new(Vec::new());
        let send = |batch: Vec<Value>| {
            let received = &received;
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                received.lock().map_err(|e| e.to_string())?.extend(batch);
                Ok::<(), String>(())
            }
        };
        let (a, b) = tokio::join!(outbox.flush(send), outbox.flush(send));
        let total = a.unwrap() + b.unwrap();
        let got: Vec<i64> = received
            .into_inner()
            .unwrap()
            .iter()
            .filter_map(|v| v["n"].as_i64())
            .collect();
        assert_eq!(got, (0..450).collect::<Vec<_>>(), "in order, each once");
        assert_eq!(total, 450);
        assert_eq!(outbox.len(), 0);
    }

    #[tokio::test]
    async fn a_failed_batch_stays_first_and_nothing_after_it_goes() {
        let outbox = Outbox::default();
        for i in 0..3 {
            assert!(outbox.push(json!({ "n": i }), 3));
        }
        assert!(!outbox.push(json!({ "n": 3 }), 3), "cap reached");
        let err = outbox
            .flush(|_| async { Err::<(), String>("503".into()) })
            .await;
        assert_eq!(err, Err("503".into()));
        assert_eq!(outbox.len(), 3);
        let sent = outbox.flush(|_| async { Ok(()) }).await;
        assert_eq!(sent, Ok(3));
        assert_eq!(outbox.len(), 0);
    }
}
