//! `lapse gate`: the place a Lapse token is accepted or refused in front of a
//! service.
//!
//! It speaks forward-auth: nginx `auth_request`, Envoy `ext_authz` (HTTP mode,
//! `path_prefix: /check`) and Traefik `forwardAuth`. For each request it reads the
//! original method and URI (`X-Original-Method`/`X-Original-URI`, or
//! `X-Forwarded-Method`/`X-Forwarded-Uri`, or the request itself under `/check`),
//! maps them to an action with the configured rules (first match; no match is a
//! refusal), verifies the token, its DPoP proof for the *original* URL, audience,
//! action and grant state ([`lapse_verifier`]), then evaluates the broker's current
//! Cedar policies for this request (pulled and swapped in as they change). It
//! answers 200 with `X-Lapse-Workload`, `X-Lapse-Task`, `X-Lapse-Grant` and
//! `X-Lapse-Action` for the upstream, or 401/403 with a `WWW-Authenticate`, or 503
//! with `Retry-After` when it cannot decide (no keys or policy from the broker yet,
//! feed stale): never allow by default. A gate whose broker is down when it starts
//! listens all the same, refusing with 503 until it has what it needs.
//!
//! `/healthz` is liveness (the process answers); `/readyz` says whether the gate
//! can decide (keys, policy, a fresh feed); `/metrics` is Prometheus text.
//!
//! A token bound to a client certificate (RFC 8705 `cnf.x5t#S256`, issued to a
//! workload that authenticated with its X.509-SVID) passes only with that
//! certificate, which the proxy that terminated the client's TLS reports: nginx
//! `X-Client-Cert: $ssl_client_escaped_cert`, Traefik `passTLSClientCert`
//! (`X-Forwarded-Tls-Client-Cert`), Envoy `x-forwarded-client-cert` (`Hash=`).

pub mod config;
mod error;
pub mod metrics;
pub mod policy;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use config::{GateConfig, PathFault, Proxy};
pub use error::GateError;
use lapse_core::{
    AccessRequest, DecisionOutcome, RequestContext, Task, Timestamp, WorkloadIdentity,
};
use lapse_token::AccessClaims;
use lapse_verifier::{Batcher, Denial, Request as Check, Verifier};
pub use policy::BrokerPolicy;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Seconds a client is told to wait (`Retry-After`) when the gate cannot decide.
pub const RETRY_AFTER_SECS: u64 = 2;

/// Uses per report to the broker (it takes at most 1,000 in one).
pub const USES_PER_REPORT: usize = 500;

pub struct Gate {
    cfg: GateConfig,
    pub verifier: Arc<Verifier>,
    /// Concurrent requests' DPoP signatures checked together.
    batcher: Arc<Batcher>,
    policy: Arc<BrokerPolicy>,
    http: reqwest::Client,
    /// Grants used since the last report, with the latest use (unix ms).
    uses: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// The broker's keys have been fetched once (they are only ever replaced by
    /// a non-empty set after).
    keys: AtomicBool,
    metrics: metrics::Metrics,
}

/// Why the gate refuses a request: the verifier's denials and the gate's own.
/// The one place a refusal becomes a status, an error code and a challenge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Denied(#[from] Denial),
    #[error("the gate does not judge this path: {0}")]
    Path(#[from] PathFault),
}

impl Refusal {
    /// 401, 403 or 503 ([`Denial::status`]); a path the gate will not judge is 403:
    /// forward-auth proxies pass only 401 and 403 on to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Denied(d) => StatusCode::from_u16(d.status()).unwrap_or(StatusCode::FORBIDDEN),
            Self::Path(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The RFC 6750 / RFC 9449 `error` code; none for a request without any
    /// credentials (RFC 6750 section 3.1: the client may not know it needs one).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::Denied(Denial::MissingToken) => None,
            Self::Denied(d) => Some(d.code()),
            Self::Path(_) => Some("invalid_request"),
        }
    }

    /// The `WWW-Authenticate` challenge: the scheme and algorithms alone for a
    /// request without credentials, with the error and its description otherwise.
    pub fn www_authenticate(&self) -> String {
        let Some(code) = self.code() else {
            return format!("DPoP algs=\"{ALGS}\"");
        };
        format!(
            "DPoP error=\"{code}\", error_description=\"{}\", algs=\"{ALGS}\"",
            header_text(&self.to_string())
        )
    }

    fn outcome(&self) -> &'static str {
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            "unavailable"
        } else {
            "deny"
        }
    }
}

/// The DPoP algorithms the gate accepts, as its challenges name them.
const ALGS: &str = "EdDSA ES256 RS256";

/// `s` as a quoted-string's content in a header: visible ASCII and spaces, no
/// quotes or backslashes (a claim or path quoted in a refusal could carry them).
fn header_text(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && *c != '\\')
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// What the gate needs to decide, and whether it has it (`/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The broker's signing keys.
    pub keys: bool,
    /// The broker's policies.
    pub policy: bool,
    /// The revocation feed was heard from within the staleness bound.
    pub feed_fresh: bool,
    /// A stale feed defers to introspection (`on_stale = "introspect"`).
    pub introspects: bool,
}

impl Readiness {
    /// The gate can decide: keys, policy, and a fresh feed (or introspection).
    pub fn ready(&self) -> bool {
        self.keys && self.policy && (self.feed_fresh || self.introspects)
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Gate {
    /// Asks the broker for its keys, then its policies, once. A broker that does
    /// not answer is no error: the gate then refuses every request (503) until
    /// [`serve`] has fetched what it needs. Fails only on the gate's own config
    /// (its token cannot be read).
    pub async fn new(cfg: GateConfig) -> Result<Arc<Self>, GateError> {
        let token = cfg.token()?;
        let (verifier, policy, keys) = policy::open(
            &policy::BrokerLink {
                broker: &cfg.broker,
                issuer: cfg.issuer.as_deref(),
                audience: &cfg.audience,
                token: &token,
                staleness: cfg.staleness,
                on_stale: cfg.on_stale,
            },
            i64::try_from(cfg.dpop_max_age.secs()).unwrap_or(policy::DPOP_MAX_AGE_SECS),
            cfg.dpop_nonce,
        )
        .await;
        let gate = Arc::new(Self {
            cfg,
            batcher: Arc::new(Batcher::new(Arc::clone(&verifier))),
            verifier,
            policy,
            http: lapse_identity::http_client(),
            uses: std::sync::Mutex::new(std::collections::HashMap::new()),
            keys: AtomicBool::new(keys),
            metrics: metrics::Metrics::new(),
        });
        Ok(gate)
    }

    /// Sends the uses seen since the last report to the broker (for `@idle`), in
    /// reports of at most [`USES_PER_REPORT`]. A
    /// failed report is merged back and sent next time. "Failed" may be an answer
    /// lost after the broker committed: it records a use once per gate by grant
    /// and the `at` sent here, so sending it again adds nothing.
    pub async fn report_uses(&self) -> Result<usize, String> {
        let batch: Vec<(String, i64)> = match self.uses.lock() {
            Ok(mut u) => u.drain().collect(),
            Err(_) => return Ok(0),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let url = format!("{}/v1/usage", self.cfg.broker.trim_end_matches('/'));
        // In reports the broker takes (it refuses more than 1,000 uses, or 64 KiB):
        // a busy interval must not become one report that can never be sent.
        let mut sent = 0;
        for (n, chunk) in batch.chunks(USES_PER_REPORT).enumerate() {
            let body = json!({ "uses": chunk.iter().map(|(g, at)| json!({ "grant": g, "at": at })).collect::<Vec<_>>() });
            let r = self
                .http
                .post(&url)
                .bearer_auth(&self.verifier.config().token)
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            if let Err(e) = r {
                if let Ok(mut u) = self.uses.lock() {
                    for (g, at) in batch.iter().skip(n * USES_PER_REPORT) {
                        let e = u.entry(g.clone()).or_insert(*at);
                        *e = (*e).max(*at);
                    }
                }
                return Err(e.to_string());
            }
            sent += chunk.len();
        }
        Ok(sent)
    }

    /// What the gate has of what it needs to decide.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            keys: self.keys.load(Ordering::Acquire),
            policy: self.policy.current().is_some(),
            // On the clock decisions use (whole seconds), so `/readyz` and the
            // answers agree.
            feed_fresh: self.verifier.fresh(now_secs().saturating_mul(1000)),
            introspects: self.cfg.on_stale == lapse_verifier::OnStale::Introspect,
        }
    }

    /// DPoP-checking batches so far and the requests in them ([`Batcher::counts`]).
    pub fn batch_counts(&self) -> (u64, u64) {
        self.batcher.counts()
    }

    /// The action `method path` needs, by the first matching rule.
    pub fn action_for(&self, method: &str, path: &str) -> Option<&str> {
        self.cfg
            .rules
            .iter()
            .find(|r| r.matches(method, path))
            .map(|r| r.action.as_str())
    }

    /// Decides one forwarded request.
    pub async fn decide(
        &self,
        headers: &HeaderMap,
        method: &str,
        uri: &str,
        peer: IpAddr,
    ) -> Result<Allowed, Refusal> {
        // Until the broker has answered, nothing can be decided: closed.
        if !self.keys.load(Ordering::Acquire) {
            return Err(Denial::Unavailable("no signing keys from the broker yet".into()).into());
        }
        let bundle = self
            .policy
            .current()
            .ok_or_else(|| Denial::Unavailable("no policy from the broker yet".into()))?;
        let path = uri.split(['?', '#']).next().unwrap_or_default();
        let matched = config::rule_path(path, self.cfg.decode_unreserved)?;
        let action = self.action_for(method, &matched).ok_or(Denial::NoRule)?;
        // The proof names the URL as the client addressed it, encoded or not.
        let url = format!("{}{path}", self.external_base());
        let dpop: Vec<&str> = headers
            .get_all("dpop")
            .iter()
            .map(|v| v.to_str().unwrap_or(""))
            .collect();
        let now = now_secs();
        let client_cert = client_cert(self.cfg.proxy, headers);
        let allowed = self
            .batcher
            .verify(&Check {
                method,
                url: &url,
                authorization: headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
                dpop: &dpop,
                action,
                client_cert: client_cert.as_deref(),
                now_secs: now,
            })
            .await
            .map_err(|d| match d {
                // Not stale: not heard from yet (the gate has just started).
                Denial::FeedStale(_) if self.verifier.heard_at_ms().is_none() => {
                    Denial::Unavailable("the revocation feed has not been heard from yet".into())
                }
                d => d,
            })?;
        let c = allowed.claims;
        let source = client_ip(self.cfg.proxy, headers).unwrap_or(peer);
        let request = request_of(&c, action, source, now);
        // Approval was given when the token was issued; what matters now is that
        // the current policies still permit the request.
        match bundle.decide(&request).outcome {
            DecisionOutcome::Allow { .. } | DecisionOutcome::ApprovalRequired { .. } => {
                if let Ok(mut u) = self.uses.lock() {
                    u.insert(c.grant_id.clone(), now.saturating_mul(1000));
                }
                Ok(Allowed {
                    workload: c.sub.clone(),
                    task: c.task.clone(),
                    grant: c.grant_id.clone(),
                    action: action.to_owned(),
                })
            }
            DecisionOutcome::Deny { reasons } => {
                Err(Denial::PolicyDenied(reasons.join("; ")).into())
            }
        }
    }

    /// The scheme and host clients use for the protected service (DPoP `htu`).
    fn external_base(&self) -> &str {
        self.cfg.external_url.trim_end_matches('/')
    }
}

/// The request a token stands for, as the broker decided it, for `action` now:
/// what a gate hands the current policies on every use.
pub fn request_of(c: &AccessClaims, action: &str, source: IpAddr, now: i64) -> AccessRequest {
    let ctx = c.ctx.clone().unwrap_or_default();
    AccessRequest {
        workload: WorkloadIdentity {
            id: c.sub.clone(),
            issuer: ctx.wl_iss,
            subject: ctx.wl_sub,
            claims: ctx.claims,
        },
        task: Task {
            id: c.task.clone(),
            purpose: ctx.purpose,
            ticket: ctx.ticket,
        },
        audience: c.aud.clone(),
        actions: vec![action.to_owned()],
        requested_ttl_secs: u64::try_from(c.exp.saturating_sub(now)).unwrap_or(0),
        context: RequestContext {
            environment: ctx.environment,
            source,
            time: Timestamp::from_unix_seconds(now),
            break_glass: c.break_glass,
            depth: c.depth(),
            tool: None,
        },
        tools: c.tools.clone(),
    }
}

/// What the upstream learns about an allowed request.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub workload: String,
    pub task: String,
    pub grant: String,
    pub action: String,
}

/// The client's address as the configured proxy reports it.
fn client_ip(proxy: Proxy, headers: &HeaderMap) -> Option<IpAddr> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    match proxy {
        // Set by the nginx config (`proxy_set_header X-Real-IP $remote_addr`),
        // replacing anything the client sent.
        Proxy::Nginx => h("x-real-ip"),
        // Both append the address they saw: the last hop is theirs.
        Proxy::Traefik | Proxy::Envoy => h("x-forwarded-for").and_then(|v| v.rsplit(',').next()),
    }
    .and_then(|v| v.trim().parse().ok())
}

/// The `x5t#S256` of the client certificate the configured proxy verified, from
/// that proxy's header only; `None` when there is none or it does not parse (a
/// certificate-bound token then fails, as it should).
fn client_cert(proxy: Proxy, headers: &HeaderMap) -> Option<String> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    match proxy {
        // `proxy_set_header X-Client-Cert $ssl_client_escaped_cert;`: the leaf's
        // PEM, URL-escaped; empty (so not sent) without a client certificate.
        Proxy::Nginx => {
            let pem = percent_encoding::percent_decode_str(h("x-client-cert")?)
                .decode_utf8()
                .ok()?;
            lapse_tls::thumbprint_of_pem(&pem)
        }
        // `passTLSClientCert: {pem: true}`: the chain's base64 DER bodies, leaf
        // first, URL-escaped and comma-separated.
        Proxy::Traefik => {
            let all = percent_encoding::percent_decode_str(h("x-forwarded-tls-client-cert")?)
                .decode_utf8()
                .ok()?;
            let leaf = all.split(',').next()?.trim();
            use base64::Engine as _;
            let der = base64::engine::general_purpose::STANDARD
                .decode(leaf)
                .ok()?;
            Some(lapse_tls::thumbprint(&der))
        }
        // `forward_client_cert_details: SANITIZE_SET` with `Hash`: the hex SHA-256
        // of the client's DER certificate; the last element is the hop Envoy saw.
        // Values may be quoted and hold `,` and `;` (a Subject DN), so the
        // separators count only outside quotes.
        Proxy::Envoy => {
            let elements = split_unquoted(h("x-forwarded-client-cert")?, ',');
            let last = elements.last()?;
            let hash = split_unquoted(last, ';')
                .into_iter()
                .find_map(|kv| kv.trim().strip_prefix("Hash="))?;
            let bytes = hex::decode(hash).ok().filter(|b| b.len() == 32)?;
            Some(lapse_token::b64::encode(bytes))
        }
    }
}

/// `s` split at `sep` where it is not inside a double-quoted part (`\"` escapes).
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(s.get(start..i).unwrap_or_default());
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(s.get(start..).unwrap_or_default());
    parts
}

/// The original method and URI of a forwarded request, from the configured
/// proxy's headers only.
fn original(proxy: Proxy, headers: &HeaderMap, req: &Request) -> Option<(String, String)> {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (method, uri) = match proxy {
        Proxy::Nginx => (h("x-original-method")?, h("x-original-uri")?),
        Proxy::Traefik => (h("x-forwarded-method")?, h("x-forwarded-uri")?),
        Proxy::Envoy => {
            // ext_authz (HTTP) sends the original method, and the original path
            // under the configured prefix.
            let p = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let rest = p.strip_prefix("/check")?;
            let rest = if rest.is_empty() { "/" } else { rest };
            (req.method().as_str().to_owned(), rest.to_owned())
        }
    };
    Some((method.to_ascii_uppercase(), uri))
}

async fn check(
    State(g): State<Arc<Gate>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let started = Instant::now();
    let headers = req.headers().clone();
    let Some((method, uri)) = original(g.cfg.proxy, &headers, &req) else {
        // Not a forwarded request this gate understands: never allow.
        let d = Denial::NoRule;
        g.metrics.decided(
            metrics::DecisionLabels {
                outcome: "deny",
                code: d.code(),
            },
            started.elapsed(),
        );
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({ "error": d.code(), "error_description": "the request does not carry the original method and URI the configured proxy sends" })),
        )
            .into_response();
    };
    let decided = g.decide(&headers, &method, &uri, peer.ip()).await;
    let labels = match &decided {
        Ok(_) => metrics::DecisionLabels {
            outcome: "allow",
            code: "none",
        },
        Err(r) => metrics::DecisionLabels {
            outcome: r.outcome(),
            code: r.code().unwrap_or("no_credentials"),
        },
    };
    g.metrics.decided(labels, started.elapsed());
    // With `dpop_nonce`, every answer carries this gate's current nonce (RFC 9449
    // section 8.2), so a client has one for its next proof before it needs it.
    let nonce = g
        .verifier
        .dpop_nonce(now_secs())
        .and_then(|n| HeaderValue::from_str(&n).ok());
    let mut r = answer(decided, &method, &uri);
    if let Some(n) = nonce {
        r.headers_mut().insert("dpop-nonce", n);
    }
    r
}

fn answer(decided: Result<Allowed, Refusal>, method: &str, uri: &str) -> Response {
    match decided {
        Ok(a) => {
            let mut r = StatusCode::OK.into_response();
            let h = r.headers_mut();
            for (k, v) in [
                ("x-lapse-workload", &a.workload),
                ("x-lapse-task", &a.task),
                ("x-lapse-grant", &a.grant),
                ("x-lapse-action", &a.action),
            ] {
                if let Ok(v) = HeaderValue::from_str(v) {
                    h.insert(k, v);
                }
            }
            r
        }
        Err(refusal) => {
            tracing::info!(%method, uri = %uri.chars().take(200).collect::<String>(), refusal = %refusal, "gate refused");
            refused(&refusal)
        }
    }
}

/// The answer to a refused request: status, challenge, `Retry-After` on a 503.
fn refused(refusal: &Refusal) -> Response {
    let status = refusal.status();
    let body = match refusal.code() {
        Some(code) => json!({ "error": code, "error_description": refusal.to_string() }),
        None => json!({ "error_description": refusal.to_string() }),
    };
    let mut r = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&refusal.www_authenticate()) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    r
}

/// `/readyz`: 200 when the gate can decide, 503 (with what it lacks) when not.
async fn readyz(State(g): State<Arc<Gate>>) -> Response {
    let r = g.readiness();
    let feed = match (r.feed_fresh, r.introspects) {
        (true, _) => "fresh",
        (false, true) => "stale (introspecting)",
        (false, false) => "stale",
    };
    let body = json!({
        "ready": r.ready(),
        "keys": r.keys,
        "policy": r.policy,
        "feed": feed,
        // The last revocation-feed entry applied: every ending up to it is
        // refused here (compare with a revoke's `feed_position`).
        "feed_position": g.verifier.seq(),
    });
    if r.ready() {
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

/// `/metrics`: the gauges read now, with the counters.
async fn metrics(State(g): State<Arc<Gate>>) -> Response {
    let r = g.readiness();
    let m = &g.metrics;
    m.ready.set(i64::from(r.ready()));
    m.feed_fresh.set(i64::from(r.feed_fresh));
    #[expect(
        clippy::cast_precision_loss,
        reason = "unix milliseconds fit an f64's 53 bits"
    )]
    let heard = g
        .verifier
        .heard_at_ms()
        .map_or(0.0, |ms| ms as f64 / 1000.0);
    m.feed_heard.set(heard);
    m.feed_seq
        .set(i64::try_from(g.verifier.seq()).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

pub fn router(g: Arc<Gate>) -> Router {
    Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .fallback(check)
        .with_state(g)
}

/// Resolves at the first SIGTERM or SIGINT: what `lapse gate` stops on, so
/// [`serve`] can stop gracefully and send its last use report.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Serves until `shutdown`, following the feed and the policies meanwhile.
pub async fn serve(
    gate: Arc<Gate>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut following = policy::follow(
        gate.verifier.clone(),
        gate.policy.clone(),
        Duration::from_secs(gate.cfg.policy_refresh.secs()),
    );
    if !gate.keys.load(Ordering::Acquire) {
        let g = gate.clone();
        following.push(tokio::spawn(async move {
            policy::fetch_keys(&g.verifier).await;
            g.keys.store(true, Ordering::Release);
            tracing::info!("gate has the broker's keys");
        }));
    }
    let g = gate.clone();
    let every = Duration::from_secs(gate.cfg.use_report.secs().max(1));
    let uses = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = g.report_uses().await {
                tracing::warn!(error = %e, "gate could not report uses; retrying with the next report");
            }
        }
    });
    let last = gate.clone();
    let tls = match &gate.cfg.tls {
        Some(cfg) => Some(Arc::new(
            lapse_tls::Tls::load(cfg).map_err(|e| std::io::Error::other(e.to_string()))?,
        )),
        None => None,
    };
    let r = lapse_tls::serve(tls, listener, router(gate), shutdown, || {}).await;
    for f in following {
        f.abort();
    }
    uses.abort();
    match last.report_uses().await {
        Ok(n) => tracing::info!(uses = n, "gate stopped; final use report sent"),
        Err(e) => tracing::warn!(error = %e, "gate stopped; the final use report failed"),
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn only_the_configured_proxys_headers_say_what_was_asked() {
        let spoofed = [
            ("x-original-method", "GET"),
            ("x-original-uri", "/orders/1"),
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/orders/2"),
            ("x-real-ip", "10.9.9.9"),
            ("x-forwarded-for", "10.9.9.9, 192.0.2.7"),
        ];
        let r = req("GET", "/check/orders/3", &spoofed);
        let h = r.headers().clone();
        assert_eq!(
            original(Proxy::Nginx, &h, &r),
            Some(("GET".into(), "/orders/1".into()))
        );
        assert_eq!(
            original(Proxy::Traefik, &h, &r),
            Some(("POST".into(), "/orders/2".into())),
            "traefik's own headers, never x-original-* a client sent through it"
        );
        assert_eq!(
            original(Proxy::Envoy, &h, &r),
            Some(("GET".into(), "/orders/3".into())),
            "envoy: the check request itself"
        );
        assert_eq!(client_ip(Proxy::Nginx, &h), Some([10, 9, 9, 9].into()));
        assert_eq!(
            client_ip(Proxy::Traefik, &h),
            Some([192, 0, 2, 7].into()),
            "the hop the proxy appended, not the first a client wrote"
        );
        // Missing headers: nothing to decide on.
        let bare = req("GET", "/check", &[]);
        let bh = bare.headers().clone();
        assert_eq!(original(Proxy::Nginx, &bh, &bare), None);
        assert_eq!(original(Proxy::Traefik, &bh, &bare), None);
        assert_eq!(
            original(Proxy::Envoy, &bh, &bare),
            Some(("GET".into(), "/".into()))
        );
        let elsewhere = req("GET", "/other", &[]);
        let eh = elsewhere.headers().clone();
        assert_eq!(original(Proxy::Envoy, &eh, &elsewhere), None);
    }

    #[test]
    fn each_proxy_reports_the_client_certificate_its_own_way() {
        use base64::Engine as _;
        use rustls::pki_types::pem::PemObject as _;
        let authority = lapse_testkit::pki::ca("workloads");
        let leaf = lapse_testkit::pki::svid_leaf(&authority, "spiffe://example.org/ci");
        let want = leaf.thumbprint();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap();
        let escaped =
            percent_encoding::utf8_percent_encode(&leaf.cert, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let traefik = format!(
            "{},{}",
            base64::engine::general_purpose::STANDARD.encode(der.as_ref()),
            base64::engine::general_purpose::STANDARD.encode(b"the issuer, ignored")
        );
        let envoy = format!(
            "By=spiffe://example.org/envoy;Hash=00ff;Subject=\"\",By=spiffe://example.org/envoy;Hash={};URI=spiffe://example.org/ci",
            hex::encode(sha2_256(der.as_ref()))
        );
        let headers = |pairs: &[(&str, &str)]| req("GET", "/", pairs).headers().clone();
        let all = headers(&[
            ("x-client-cert", &escaped),
            ("x-forwarded-tls-client-cert", &traefik),
            ("x-forwarded-client-cert", &envoy),
        ]);
        for proxy in [Proxy::Nginx, Proxy::Traefik, Proxy::Envoy] {
            assert_eq!(
                client_cert(proxy, &all).as_deref(),
                Some(want.as_str()),
                "{proxy:?}"
            );
        }
        // Only the configured proxy's header counts; garbage is no certificate.
        let nginx_only = headers(&[("x-client-cert", &escaped)]);
        assert_eq!(client_cert(Proxy::Traefik, &nginx_only), None);
        assert_eq!(client_cert(Proxy::Envoy, &nginx_only), None);
        // A quoted Subject that smuggles a `Hash=` after a comma is still the
        // Subject: the element's own Hash is the one read.
        let tricky = headers(&[(
            "x-forwarded-client-cert",
            &format!(
                "By=spiffe://example.org/envoy;Hash={};Subject=\"CN=x,Hash={}\"",
                hex::encode(sha2_256(der.as_ref())),
                hex::encode([7u8; 32])
            ),
        )]);
        assert_eq!(
            client_cert(Proxy::Envoy, &tricky).as_deref(),
            Some(want.as_str())
        );
        let junk = headers(&[
            ("x-client-cert", "not%20a%20certificate"),
            ("x-forwarded-tls-client-cert", "!!!"),
            ("x-forwarded-client-cert", "Hash=zz"),
        ]);
        for proxy in [Proxy::Nginx, Proxy::Traefik, Proxy::Envoy] {
            assert_eq!(client_cert(proxy, &junk), None, "{proxy:?}");
        }
    }

    fn sha2_256(b: &[u8]) -> Vec<u8> {
        use sha2::Digest as _;
        sha2::Sha256::digest(b).to_vec()
    }
}
