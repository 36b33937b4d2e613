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
//! when it cannot decide (no policy yet, feed stale): never allow by default.
//!
//! A token bound to a client certificate (RFC 8705 `cnf.x5t#S256`, issued to a
//! workload that authenticated with its X.509-SVID) passes only with that
//! certificate, which the proxy that terminated the client's TLS reports: nginx
//! `X-Client-Cert: $ssl_client_escaped_cert`, Traefik `passTLSClientCert`
//! (`X-Forwarded-Tls-Client-Cert`), Envoy `x-forwarded-client-cert` (`Hash=`).

pub mod config;
pub mod policy;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use config::{GateConfig, Proxy};
use lapse_core::{
    AccessRequest, DecisionOutcome, RequestContext, Task, Timestamp, WorkloadIdentity,
};
use lapse_token::AccessClaims;
use lapse_verifier::{Batcher, Denial, Request as Check, Verifier};
pub use policy::BrokerPolicy;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

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
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Verifier(#[from] lapse_verifier::VerifierError),
    #[error("{0}")]
    Config(String),
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Gate {
    /// Connects to the broker (keys, then policies) and is ready to decide.
    pub async fn new(cfg: GateConfig) -> Result<Arc<Self>, GateError> {
        let token = cfg.token()?;
        let (verifier, policy) = policy::connect(&policy::BrokerLink {
            broker: &cfg.broker,
            issuer: cfg.issuer.as_deref(),
            audience: &cfg.audience,
            token: &token,
            staleness: cfg.staleness,
            on_stale: cfg.on_stale,
        })
        .await?;
        let gate = Arc::new(Self {
            cfg,
            batcher: Arc::new(Batcher::new(Arc::clone(&verifier))),
            verifier,
            policy,
            http: lapse_identity::http_client(),
            uses: std::sync::Mutex::new(std::collections::HashMap::new()),
        });
        Ok(gate)
    }

    /// Sends the uses seen since the last report to the broker (for `@idle`), in
    /// reports of at most [`USES_PER_REPORT`]. A
    /// failed report is merged back and sent next time.
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
    ) -> Result<Allowed, Denial> {
        let path = uri.split(['?', '#']).next().unwrap_or_default();
        if !config::plain_path(path) {
            return Err(Denial::NoRule);
        }
        let action = self.action_for(method, path).ok_or(Denial::NoRule)?;
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
            .await?;
        let c = allowed.claims;
        let bundle = self
            .policy
            .current()
            .ok_or_else(|| Denial::Unavailable("no policy from the broker yet".into()))?;
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
            DecisionOutcome::Deny { reasons } => Err(Denial::PolicyDenied(reasons.join("; "))),
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
    let headers = req.headers().clone();
    let Some((method, uri)) = original(g.cfg.proxy, &headers, &req) else {
        // Not a forwarded request this gate understands: never allow.
        let d = Denial::NoRule;
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({ "error": d.code(), "error_description": "the request does not carry the original method and URI the configured proxy sends" })),
        )
            .into_response();
    };
    match g.decide(&headers, &method, &uri, peer.ip()).await {
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
        Err(d) => {
            tracing::info!(%method, uri = %uri.chars().take(200).collect::<String>(), denial = %d, "gate refused");
            let status = StatusCode::from_u16(d.status()).unwrap_or(StatusCode::FORBIDDEN);
            let mut r = (
                status,
                axum::Json(json!({ "error": d.code(), "error_description": d.to_string() })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&d.www_authenticate()) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            r
        }
    }
}

pub fn router(g: Arc<Gate>) -> Router {
    Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .fallback(check)
        .with_state(g)
}

/// Serves until `shutdown`, following the feed and the policies meanwhile.
pub async fn serve(
    gate: Arc<Gate>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let following = policy::follow(
        gate.verifier.clone(),
        gate.policy.clone(),
        Duration::from_secs(gate.cfg.policy_refresh.secs()),
    );
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
    let _ = last.report_uses().await;
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
