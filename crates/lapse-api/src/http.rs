//! The HTTP surface. Handlers parse, call the service, and shape the answer.

use crate::error::ApiError;
use crate::extract::{MAX_BODY, authorization, body, dpop_headers, form, json_body, optional_json};
use crate::openapi;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lapse_broker::BrokerError;
use lapse_broker::config::Role;
use lapse_broker::error::clip;
use lapse_broker::json::set_field;
use lapse_broker::metrics::{RouteLabels, RouteOnly};
use lapse_broker::{ExchangeInput, Issued, Lapse};
use lapse_core::{GrantId, GrantState, Task, TtlDuration};
use lapse_store::GrantFilter;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TT_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
const TT_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

type AppState = Arc<Lapse>;

/// The broker's HTTP API, with `pages` (the console's routes, which
/// `lapse-server` passes in) under the same limits, metrics and refusal records.
pub fn router(state: AppState, pages: Router<AppState>) -> Router {
    pages
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/oauth/token", post(token))
        .route("/oauth/introspect", post(introspect))
        .route("/oauth/revoke", post(revoke_token))
        .route("/v1/access-requests", post(access_request))
        .route("/v1/grants", get(list_grants))
        .route("/v1/grants/{id}", get(show_grant))
        .route("/v1/grants/{id}/complete", post(complete))
        .route("/v1/grants/{id}/revoke", post(revoke_grant))
        .route("/v1/grants/{id}/renew", post(renew))
        .route("/v1/grants/{id}/status", get(grant_status))
        .route("/v1/approvals", get(list_approvals))
        .route("/v1/approvals/{id}", get(show_approval))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
        .route("/v1/reviews", get(list_reviews))
        .route("/v1/reviews/{id}/close", post(close_review))
        .route("/v1/feed", get(crate::feed::feed))
        .route("/v1/signals", post(signal))
        .route("/v1/workloads/quarantined", get(quarantined))
        .route("/v1/workloads/release", post(release_workload))
        .route("/v1/usage", post(usage))
        .route("/v1/tool-calls", post(tool_calls))
        .route("/v1/policies", get(policies))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/reports/standing", get(standing_report))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::from(BrokerError::NotFound("no such endpoint".into())) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_headers,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_time,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_operator_refusals,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .latency
        .get_or_create(&RouteOnly {
            route: route.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    s.metrics
        .requests
        .get_or_create(&RouteLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// Records refused operator credentials (answers marked
/// [`lapse_broker::auth_failures::OperatorRefused`]) with the request's source. A request
/// that presented no credential at all is counted but not logged: it is a probe or
/// a misconfigured client, not a guess.
async fn record_operator_refusals(State(s): State<AppState>, req: Request, next: Next) -> Response {
    use lapse_broker::auth_failures::{AuthFailure, Credential, OperatorRefused};
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    let reason = match authorization(req.headers()) {
        None => "no_token",
        Some(a) if a.starts_with("Bearer ") => "unknown_token",
        Some(_) => "not_bearer",
    };
    let resp = next.run(req).await;
    if resp.extensions().get::<OperatorRefused>().is_some() {
        let f = AuthFailure::new(Credential::OperatorToken, reason);
        if reason == "no_token" {
            s.metrics
                .auth_failures
                .get_or_create(&lapse_broker::metrics::AuthFailureLabels {
                    credential: f.credential.as_str().to_owned(),
                    reason: reason.to_owned(),
                })
                .inc();
        } else {
            s.auth_failed(source, f).await;
        }
    }
    resp
}

/// The per-source bucket of the token endpoint and access requests: checked before
/// any signature is verified, so a flood costs a map lookup each.
fn limit_source(s: &Lapse, peer: std::net::IpAddr) -> Result<(), BrokerError> {
    s.limits
        .token_source
        .check(&peer.to_string())
        .map_err(|wait| {
            BrokerError::TooManyRequests(format!("too many requests from {peer}"), wait)
        })
}

/// Refuses requests with too many or too large headers (431) before any handler.
async fn limit_headers(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let bytes: usize = h
        .iter()
        .map(|(k, v)| k.as_str().len() + v.as_bytes().len())
        .sum();
    let cfg = &s.limits.cfg;
    if h.len() > cfg.max_headers || bytes > cfg.max_header_bytes {
        return ApiError::HeadersTooLarge(format!(
            "request headers exceed {} fields or {} bytes",
            cfg.max_headers, cfg.max_header_bytes
        ))
        .into_response();
    }
    next.run(req).await
}

/// Bounds a request's time to its answer: a client that trickles its body, or a
/// store that hangs, cannot hold a connection and a task forever. Handlers are
/// written to be dropped at any await (as when a client disconnects): a commit
/// under way still completes in the store's writer.
async fn limit_time(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let limit = std::time::Duration::from_secs(s.limits.cfg.request_timeout.secs().max(1));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::from(BrokerError::Unavailable(format!(
            "the request did not finish within {} s",
            limit.as_secs()
        )))
        .into_response(),
    }
}

fn no_store(v: Value, status: StatusCode) -> Response {
    let mut r = (status, Json(v)).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn parse_actions(scope: &str) -> Vec<String> {
    let mut a: Vec<String> = scope
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    a.sort();
    a.dedup();
    a
}

async fn metadata(State(s): State<AppState>) -> Json<Value> {
    let i = &s.issuer;
    Json(json!({
        "issuer": i,
        "token_endpoint": format!("{i}/oauth/token"),
        "introspection_endpoint": format!("{i}/oauth/introspect"),
        "revocation_endpoint": format!("{i}/oauth/revoke"),
        "jwks_uri": format!("{i}/.well-known/jwks.json"),
        "grant_types_supported": [TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "revocation_endpoint_auth_methods_supported": ["none", "bearer"],
        "dpop_signing_alg_values_supported": ["EdDSA", "ES256", "RS256"],
        "scopes_supported": s.policy.load().as_ref().map(|p| p.actions().to_vec()).unwrap_or_default(),
        "service_documentation": format!("{i}/openapi.json"),
    }))
}

async fn jwks(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "keys": s.keys.jwks() }))
}

async fn token(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<lapse_tls::ClientCert>>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    limit_source(&s, peer.ip())?;
    let b = body(b)?;
    let f = form(&headers, &b)?;
    let p = |k: &str| f.get(k).map(String::as_str).filter(|v| !v.is_empty());
    match p("grant_type") {
        Some(TOKEN_EXCHANGE) => {}
        Some(other) => {
            return Err(BrokerError::UnsupportedGrantType(format!(
                "grant type `{}` is not supported; use token exchange",
                clip(other)
            ))
            .into());
        }
        None => return Err(BrokerError::InvalidRequest("`grant_type` is required".into()).into()),
    }
    // A workload waiting for approval collects the outcome of its request.
    if let Some(rid) = p("request_id") {
        let id = rid.parse::<GrantId>().map_err(|_| {
            BrokerError::InvalidRequest(format!("`request_id` `{}` is not a request id", clip(rid)))
        })?;
        let proof = s.verify_dpop(&dpop_headers(&headers), "POST", "/oauth/token", None)?;
        let issued = s.collect(id, &proof).await?;
        return Ok(no_store(token_response(&issued), StatusCode::OK));
    }
    let client_cert = cert.map(|axum::Extension(c)| c);
    // With a client certificate (an X.509-SVID over mTLS) and no subject token, the
    // certificate is the subject.
    let subject_token = match (p("subject_token"), &client_cert) {
        (None, Some(_)) if p("subject_token_type").is_none() => "",
        (None, _) => {
            return Err(BrokerError::InvalidRequest(
                "`subject_token` is required (or a client certificate: an X.509-SVID)".into(),
            )
            .into());
        }
        (Some(t), _) => {
            match p("subject_token_type") {
                Some(TT_JWT | TT_ID_TOKEN) => {}
                Some(TT_ACCESS_TOKEN) => return delegate(&s, &f, peer, &headers).await,
                Some(other) => {
                    return Err(BrokerError::InvalidRequest(format!(
                        "unsupported `subject_token_type` `{}`",
                        clip(other)
                    ))
                    .into());
                }
                None => {
                    return Err(BrokerError::InvalidRequest(
                        "`subject_token_type` is required".into(),
                    )
                    .into());
                }
            }
            t
        }
    };
    if p("actor_token").is_some() {
        return Err(BrokerError::InvalidRequest("`actor_token` is not supported".into()).into());
    }
    let ttl_secs = expires_in(p("expires_in"))?;
    let audience = p("audience")
        .or(p("resource"))
        .ok_or_else(|| BrokerError::InvalidRequest("`audience` is required".into()))?;
    let proof = s.verify_dpop(&dpop_headers(&headers), "POST", "/oauth/token", None)?;
    let input = ExchangeInput {
        identity_token: subject_token.to_owned(),
        client_cert,
        audience: audience.to_owned(),
        actions: parse_actions(p("scope").unwrap_or("")),
        task: Task {
            id: p("task").unwrap_or("").to_owned(),
            purpose: p("purpose").unwrap_or("").to_owned(),
            ticket: p("ticket").unwrap_or("").to_owned(),
        },
        ttl_secs,
        environment: p("environment").unwrap_or("").to_owned(),
        break_glass: match p("break_glass") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(BrokerError::InvalidRequest(format!(
                    "`break_glass` must be `true` or `false`, not `{}`",
                    clip(other)
                ))
                .into());
            }
        },
        justification: p("justification").unwrap_or("").to_owned(),
        source: peer.ip(),
        tools: tools_param(p("tools"))?.unwrap_or_default(),
    };
    let issued = s.exchange(input, &proof).await?;
    Ok(no_store(token_response(&issued), StatusCode::OK))
}

/// `expires_in`: requested seconds.
fn expires_in(v: Option<&str>) -> Result<Option<u64>, BrokerError> {
    v.map(|v| {
        v.parse::<u64>().map_err(|_| {
            BrokerError::InvalidRequest("`expires_in` must be a whole number of seconds".into())
        })
    })
    .transpose()
}

/// `tools`: the task's declared tools, as JSON (`[{"name": …, "args": {…}}]`).
fn tools_param(v: Option<&str>) -> Result<Option<Vec<lapse_core::ToolDecl>>, BrokerError> {
    v.map(|t| lapse_core::tools::parse(t).map_err(|e| BrokerError::InvalidRequest(e.to_string())))
        .transpose()
}

/// A token exchange whose subject is a Lapse access token: a sub-agent's token.
async fn delegate(
    s: &AppState,
    f: &HashMap<String, String>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let p = |k: &str| f.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let actor_token = match (p("actor_token"), p("actor_token_type")) {
        (None, None) => None,
        (Some(t), Some(TT_JWT | TT_ID_TOKEN)) => Some(t.to_owned()),
        (Some(_), Some(other)) => {
            return Err(BrokerError::InvalidRequest(format!(
                "unsupported `actor_token_type` `{}`",
                clip(other)
            ))
            .into());
        }
        (Some(_), None) => {
            return Err(BrokerError::InvalidRequest(
                "`actor_token_type` is required with `actor_token`".into(),
            )
            .into());
        }
        (None, Some(_)) => {
            return Err(BrokerError::InvalidRequest(
                "`actor_token_type` without `actor_token`".into(),
            )
            .into());
        }
    };
    for k in ["task", "break_glass", "justification", "environment"] {
        if p(k).is_some() {
            return Err(BrokerError::InvalidRequest(format!(
                "`{k}` is the parent's for a sub-agent token and cannot be given"
            ))
            .into());
        }
    }
    let ttl_secs = expires_in(p("expires_in"))?;
    let proof = s.verify_dpop(&dpop_headers(headers), "POST", "/oauth/token", None)?;
    let input = lapse_broker::delegation::DelegationInput {
        subject_token: p("subject_token").unwrap_or("").to_owned(),
        actor_token,
        audience: p("audience").or(p("resource")).map(str::to_owned),
        actions: parse_actions(p("scope").unwrap_or("")),
        tools: tools_param(p("tools"))?,
        ttl_secs,
        purpose: p("purpose").unwrap_or("").to_owned(),
        dpop_jkt: p("dpop_jkt").map(str::to_owned),
        source: peer.ip(),
    };
    let (issued, capped) = s.delegate(input, &proof).await?;
    let mut v = token_response(&issued);
    if let Some(c) = capped {
        set_field(&mut v, "requested_expires_in", json!(c.requested_secs));
        set_field(&mut v, "ttl_capped_by", json!(c.by));
    }
    if let Some(act) = &issued.grant.act {
        set_field(&mut v, "act", act.clone());
    }
    if let Some(parent) = &issued.grant.parent {
        set_field(&mut v, "parent_grant_id", json!(parent.to_string()));
    }
    Ok(no_store(v, StatusCode::OK))
}

fn token_response(i: &Issued) -> Value {
    let mut v = json!({
        "access_token": i.access_token,
        "issued_token_type": TT_ACCESS_TOKEN,
        "token_type": "DPoP",
        "expires_in": i.expires_in,
        "scope": i.grant.actions.join(" "),
        "grant_id": i.grant.id.to_string(),
        "task": i.grant.request.task.id,
    });
    if !i.credentials.is_empty() {
        set_field(&mut v, "credentials", json!(i.credentials));
    }
    v
}

async fn introspect(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    s.operator(authorization(&headers))?
        .require(Role::Introspect)?;
    let b = body(b)?;
    let f = form(&headers, &b)?;
    let token = f
        .get("token")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| BrokerError::InvalidRequest("`token` is required".into()))?;
    match s.introspect(token).await {
        Ok(v) => Ok(no_store(v, StatusCode::OK)),
        Err(BrokerError::Unavailable(msg)) => Ok(no_store(
            json!({ "active": false, "error": "temporarily_unavailable", "error_description": msg }),
            StatusCode::SERVICE_UNAVAILABLE,
        )),
        Err(e) => Err(e.into()),
    }
}

/// RFC 7009. The token itself is enough to revoke it (revoking only takes access
/// away); operators may also call it. Unknown or invalid tokens answer 200.
async fn revoke_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let by = match authorization(&headers) {
        Some(a) if a.starts_with("Bearer ") => {
            let op = s.operator(Some(a))?;
            op.require(Role::Revoke)?;
            Some(op.name)
        }
        _ => None,
    };
    let b = body(b)?;
    let f = form(&headers, &b)?;
    let token = f
        .get("token")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| BrokerError::InvalidRequest("`token` is required".into()))?;
    if let Ok(claims) = s.verify_access_token(token)
        && let Ok(id) = claims.grant_id.parse::<GrantId>()
        && let Some(g) = s.store.grant(id).await?
        && !g.state.is_ended()
    {
        let by = by.unwrap_or_else(|| claims.sub.clone());
        match s.revoke(g, &by, "revoked through RFC 7009").await {
            Ok(_) | Err(BrokerError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(no_store(json!({}), StatusCode::OK))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessRequestBody {
    /// Absent when the client authenticates with an X.509-SVID (mTLS).
    #[serde(default)]
    identity_token: String,
    audience: String,
    actions: Vec<String>,
    task: TaskBody,
    ttl: Option<TtlDuration>,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    break_glass: bool,
    #[serde(default)]
    justification: String,
    /// The tools an agent's task declares, with argument constraints.
    #[serde(default)]
    tools: Vec<lapse_core::ToolDecl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskBody {
    id: String,
    purpose: String,
    #[serde(default)]
    ticket: String,
}

async fn access_request(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<lapse_tls::ClientCert>>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    limit_source(&s, peer.ip())?;
    let b = body(b)?;
    let r: AccessRequestBody = json_body(&headers, &b)?;
    let proof = s.verify_dpop(&dpop_headers(&headers), "POST", "/v1/access-requests", None)?;
    let mut actions = r.actions;
    actions.sort();
    actions.dedup();
    let input = ExchangeInput {
        identity_token: r.identity_token,
        client_cert: cert.map(|axum::Extension(c)| c),
        audience: r.audience,
        actions,
        task: Task {
            id: r.task.id,
            purpose: r.task.purpose,
            ticket: r.task.ticket,
        },
        ttl_secs: r.ttl.map(TtlDuration::secs),
        environment: r.environment,
        break_glass: r.break_glass,
        justification: r.justification,
        source: peer.ip(),
        tools: {
            lapse_core::tools::validate(&r.tools)
                .map_err(|e| BrokerError::InvalidRequest(e.to_string()))?;
            r.tools
        },
    };
    match s.exchange(input, &proof).await {
        Ok(i) => {
            let mut v = token_response(&i);
            set_field(&mut v, "grant", grant_view(&i.grant));
            set_field(&mut v, "status", json!("active"));
            Ok(no_store(v, StatusCode::CREATED))
        }
        Err(BrokerError::AuthorizationPending {
            request_id,
            approvals,
            approvers,
        }) => Ok(no_store(
            json!({ "status": "pending", "request_id": request_id, "approvals_required": approvals, "approvers": approvers }),
            StatusCode::ACCEPTED,
        )),
        Err(e) => Err(e.into()),
    }
}

pub fn grant_view(g: &lapse_core::Grant) -> Value {
    json!({
        "id": g.id.to_string(),
        "state": g.state,
        "workload": g.request.workload.id,
        "issuer": g.request.workload.issuer,
        "audience": g.request.audience,
        "actions": g.actions,
        "task": g.request.task,
        "environment": g.request.context.environment,
        "source": g.request.context.source,
        "break_glass": g.request.context.break_glass,
        "policies": g.policies,
        "approvals_required": g.approvals_required,
        "created_at": g.created_at,
        "expires_at": g.expires_at,
        "max_expires_at": g.max_expires_at,
        "ended_at": g.ended_at,
        "end": g.end,
        "jkt": g.jkt,
        "renewals": g.renewals,
        "credentials": g.credentials,
        "idle_secs": g.idle_secs,
        "last_used_at": g.last_used_at,
        "tools": g.request.tools,
        "depth": g.request.context.depth,
        "parent": g.parent.map(|p| p.to_string()),
        "act": g.act,
        "delegations": g.delegations,
    })
}

/// A pending request as an approver sees it.
pub fn request_view(g: &lapse_core::Grant, max_ttl_secs: u64) -> Value {
    let mut v = grant_view(g);
    set_field(&mut v, "approvals_required", json!(g.approvals_required));
    set_field(&mut v, "approvers", json!(g.approvers));
    set_field(&mut v, "approvals", json!(g.approvals));
    set_field(&mut v, "ttl", json!(g.effective_ttl_secs(max_ttl_secs)));
    set_field(&mut v, "context", json!(g.request.context));
    set_field(&mut v, "approvable_until", json!(g.expires_at.millis()));
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    workload: Option<String>,
    audience: Option<String>,
    task: Option<String>,
    limit: Option<usize>,
    /// Keyset paging: only grants older than this cursor (a page's `next`).
    before: Option<String>,
}

/// Most grants one page of `GET /v1/grants` holds.
const GRANTS_PAGE_MAX: usize = 1000;

async fn list_grants(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    s.operator(authorization(&headers))?.require(Role::Read)?;
    let Query(q) = q.map_err(|e| BrokerError::InvalidRequest(e.body_text()))?;
    let state =
        match q.state.as_deref() {
            Some(st) => Some(GrantState::parse(st).ok_or_else(|| {
                BrokerError::InvalidRequest(format!("unknown state `{}`", clip(st)))
            })?),
            None => None,
        };
    let before = match q.before.as_deref() {
        Some(c) => Some(
            c.parse::<lapse_store::GrantCursor>()
                .map_err(|e| BrokerError::InvalidRequest(e.to_string()))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(100).min(GRANTS_PAGE_MAX);
    // One more than the page, to know whether another page follows.
    let mut grants = s
        .store
        .grants(GrantFilter {
            state,
            workload: q.workload,
            task: q.task,
            audience: q.audience,
            before,
            limit: limit + 1,
        })
        .await?;
    let more = grants.len() > limit;
    grants.truncate(limit);
    // The cursor of the page's last grant when more follow: pass it as `before`.
    let next = more
        .then(|| {
            grants
                .last()
                .map(|g| lapse_store::GrantCursor::of(g).to_string())
        })
        .flatten();
    Ok(no_store(
        json!({ "grants": grants.iter().map(grant_view).collect::<Vec<_>>(), "next": next }),
        StatusCode::OK,
    ))
}

fn grant_id(raw: &str) -> Result<GrantId, BrokerError> {
    raw.parse()
        .map_err(|e: lapse_core::IdParseError| BrokerError::NotFound(e.to_string()))
}

async fn show_grant(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    s.operator(authorization(&headers))?.require(Role::Read)?;
    let id = grant_id(&id)?;
    let g = s.find(id, "grant").await?;
    let events = s.store.audit_for(id).await?;
    let mut v = grant_view(&g);
    set_field(&mut v, "audit", json!(events));
    Ok(no_store(v, StatusCode::OK))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    ttl: Option<TtlDuration>,
    /// On completion: how the task's process ended (`lapse run`), for the audit entry.
    #[serde(default)]
    exit_status: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
}

async fn complete(
    State(s): State<AppState>,
    cert: Option<axum::Extension<lapse_tls::ClientCert>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = grant_id(&id)?;
    let b = body(b)?;
    let r: ReasonBody = optional_json(&headers, &b)?;
    let path = format!("/v1/grants/{id}/complete");
    let (claims, g, _) = s
        .workload_grant(
            authorization(&headers),
            cert.as_ref().map(|axum::Extension(c)| c),
            &dpop_headers(&headers),
            "POST",
            &path,
            id,
        )
        .await?;
    let reason = r.reason.unwrap_or_else(|| "task completed".into());
    let mut data = json!({ "reason": clip(&reason) });
    if let Some(code) = r.exit_status {
        set_field(&mut data, "exit_status", json!(code));
    }
    if let Some(sig) = r.signal {
        set_field(&mut data, "signal", json!(sig));
    }
    let g = s.complete(g, &claims.sub, &clip(&reason), data).await?;
    Ok(no_store(grant_view(&g), StatusCode::OK))
}

#[derive(Deserialize)]
struct ApprovalsQuery {
    limit: Option<usize>,
}

async fn list_approvals(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<ApprovalsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    if op.require(Role::Approve).is_err() {
        op.require(Role::Read)?;
    }
    let Query(q) = q.map_err(|e| BrokerError::InvalidRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100).min(1000);
    let max_ttl = s.cfg.max_ttl.secs();
    let pending: Vec<Value> = s
        .pending_requests(limit)
        .await?
        .iter()
        .map(|g| request_view(g, max_ttl))
        .collect();
    Ok(no_store(json!({ "requests": pending }), StatusCode::OK))
}

async fn show_approval(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    if op.require(Role::Approve).is_err() {
        op.require(Role::Read)?;
    }
    let id = grant_id(&id)?;
    let g = s.find(id, "request").await?;
    let mut v = request_view(&g, s.cfg.max_ttl.secs());
    let audit = s.store.audit_for(id).await?;
    set_field(&mut v, "audit", json!(audit));
    let history: Vec<Value> = s
        .workload_history(&g.request.workload.id, 11)
        .await?
        .iter()
        .filter(|h| h.id != g.id)
        .take(10)
        .map(|h| json!({ "id": h.id.to_string(), "state": h.state, "audience": h.request.audience, "actions": h.actions, "task": h.request.task.id, "created_at": h.created_at.millis() }))
        .collect();
    set_field(&mut v, "history", json!(history));
    Ok(no_store(v, StatusCode::OK))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    reason: Option<String>,
    /// Approve only these of the requested actions.
    #[serde(default)]
    actions: Option<Vec<String>>,
    /// Approve a shorter lifetime.
    #[serde(default)]
    ttl: Option<TtlDuration>,
}

async fn approve(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    let id = grant_id(&id)?;
    let b = body(b)?;
    let d: DecisionBody = optional_json(&headers, &b)?;
    let narrowing = lapse_core::Narrowing {
        actions: d.actions.map(|a| parse_actions(&a.join(" "))),
        ttl_secs: d.ttl.map(TtlDuration::secs),
    };
    let g = s
        .approve(&op, id, &clip(d.reason.as_deref().unwrap_or("")), narrowing)
        .await?;
    Ok(no_store(
        request_view(&g, s.cfg.max_ttl.secs()),
        StatusCode::OK,
    ))
}

async fn deny(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    let id = grant_id(&id)?;
    let b = body(b)?;
    let d: DecisionBody = optional_json(&headers, &b)?;
    if d.actions.is_some() || d.ttl.is_some() {
        return Err(BrokerError::InvalidRequest("a denial takes only a `reason`".into()).into());
    }
    let g = s
        .deny_request(&op, id, &clip(d.reason.as_deref().unwrap_or("")))
        .await?;
    Ok(no_store(
        request_view(&g, s.cfg.max_ttl.secs()),
        StatusCode::OK,
    ))
}

#[derive(Deserialize)]
struct ReviewsQuery {
    /// `open` (default) or `all`.
    state: Option<String>,
}

fn review_view(g: &lapse_core::Grant) -> Value {
    let mut v = grant_view(g);
    set_field(&mut v, "review", json!(g.review));
    v
}

async fn list_reviews(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<ReviewsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    if op.require(Role::Approve).is_err() {
        op.require(Role::Read)?;
    }
    let Query(q) = q.map_err(|e| BrokerError::InvalidRequest(e.body_text()))?;
    let open_only = match q.state.as_deref() {
        None | Some("open") => true,
        Some("all") => false,
        Some(other) => {
            return Err(BrokerError::InvalidRequest(format!(
                "`state` must be `open` or `all`, not `{}`",
                clip(other)
            ))
            .into());
        }
    };
    let reviews: Vec<Value> = s
        .reviews(open_only)
        .await?
        .iter()
        .map(review_view)
        .collect();
    Ok(no_store(json!({ "reviews": reviews }), StatusCode::OK))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseReviewBody {
    verdict: String,
    #[serde(default)]
    note: String,
}

async fn close_review(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    let id = grant_id(&id)?;
    let b = body(b)?;
    let r: CloseReviewBody = json_body(&headers, &b)?;
    let verdict = lapse_core::Verdict::parse(&r.verdict).ok_or_else(|| {
        BrokerError::InvalidRequest(format!(
            "`verdict` must be `justified` or `unjustified`, not `{}`",
            clip(&r.verdict)
        ))
    })?;
    let g = s.close_review(&op, id, verdict, &clip(&r.note)).await?;
    Ok(no_store(review_view(&g), StatusCode::OK))
}

/// The workload asks whether its own grant still holds (what `lapse run` polls when
/// it cannot follow a revocation feed). Authenticated like complete and renew.
async fn grant_status(
    State(s): State<AppState>,
    cert: Option<axum::Extension<lapse_tls::ClientCert>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = grant_id(&id)?;
    let path = format!("/v1/grants/{id}/status");
    let (_, g, _) = s
        .workload_grant(
            authorization(&headers),
            cert.as_ref().map(|axum::Extension(c)| c),
            &dpop_headers(&headers),
            "GET",
            &path,
            id,
        )
        .await?;
    let now = s.now();
    Ok(no_store(
        json!({
            "id": g.id.to_string(),
            "state": g.state,
            "live": g.is_live(now),
            "expires_at": g.expires_at.millis(),
            "max_expires_at": g.max_expires_at.millis(),
            "expires_in": g.remaining_secs(now),
            "end": g.end,
        }),
        StatusCode::OK,
    ))
}

async fn revoke_grant(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    op.require(Role::Revoke)?;
    let id = grant_id(&id)?;
    let b = body(b)?;
    let r: ReasonBody = optional_json(&headers, &b)?;
    let g = s.find(id, "grant").await?;
    let reason = r.reason.unwrap_or_else(|| "revoked by operator".into());
    let g = s.revoke(g, &op.name, &clip(&reason)).await?;
    // Read after the ending committed, so at least its own entry's number: a gate
    // whose feed position (its `/readyz`) has reached it has applied the ending.
    let head = s.store.feed_head().await?;
    let mut v = grant_view(&g);
    set_field(&mut v, "feed_position", json!(head));
    Ok(no_store(v, StatusCode::OK))
}

async fn renew(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<lapse_tls::ClientCert>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = grant_id(&id)?;
    let b = body(b)?;
    let r: ReasonBody = optional_json(&headers, &b)?;
    let path = format!("/v1/grants/{id}/renew");
    let (_, g, proof) = s
        .workload_grant(
            authorization(&headers),
            cert.as_ref().map(|axum::Extension(c)| c),
            &dpop_headers(&headers),
            "POST",
            &path,
            id,
        )
        .await?;
    let issued = s
        .renew(g, r.ttl.map(TtlDuration::secs), peer.ip(), &proof)
        .await?;
    let mut v = token_response(&issued);
    set_field(&mut v, "grant", grant_view(&issued.grant));
    Ok(no_store(v, StatusCode::OK))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    s.operator(authorization(&headers))?.require(Role::Read)?;
    let Query(q) = q.map_err(|e| BrokerError::InvalidRequest(e.body_text()))?;
    let entries = s
        .store
        .audit(q.after.unwrap_or(0), q.limit.unwrap_or(1000).min(10_000))
        .await?;
    Ok(no_store(json!({ "entries": entries }), StatusCode::OK))
}

async fn audit_verify(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    s.operator(authorization(&headers))?.require(Role::Read)?;
    let report = lapse_broker::audit::verify_audit(s.store.as_ref(), &s.keys).await?;
    let status = if report.ok() {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    Ok(no_store(json!(report), status))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    /// Report window, e.g. `24h` (default).
    window: Option<String>,
}

async fn standing_report(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    s.operator(authorization(&headers))?.require(Role::Read)?;
    let Query(q) = q.map_err(|e| BrokerError::InvalidRequest(e.body_text()))?;
    let window = match q.window.as_deref() {
        None => 24 * 3600,
        Some(w) => w
            .parse::<lapse_core::TtlDuration>()
            .map_err(|e| BrokerError::InvalidRequest(format!("`window`: {e}")))?
            .secs(),
    };
    let report = s.standing_report(window).await?;
    Ok(no_store(report, StatusCode::OK))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageBody {
    uses: Vec<UseBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UseBody {
    grant: String,
    /// Unix ms of the latest use the gate saw.
    at: i64,
}

/// Uses in one report: what fits the 64 KiB body limit with room to spare.
const MAX_USES: usize = 1_000;

/// Gates report which grants were used (for `@idle`), in batches.
async fn usage(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    op.require(Role::Gate)?;
    let b = body(b)?;
    let u: UsageBody = json_body(&headers, &b)?;
    if u.uses.len() > MAX_USES {
        return Err(
            BrokerError::InvalidRequest(format!("at most {MAX_USES} uses per report")).into(),
        );
    }
    let mut uses = Vec::with_capacity(u.uses.len());
    for x in u.uses {
        let id: GrantId = x
            .grant
            .parse()
            .map_err(|e: lapse_core::IdParseError| BrokerError::InvalidRequest(e.to_string()))?;
        uses.push((id, x.at));
    }
    let recorded = s.record_uses(&op, &uses).await?;
    Ok(no_store(json!({ "recorded": recorded }), StatusCode::OK))
}

/// `POST /v1/tool-calls`: the MCP proxy's record of every tool call it decided,
/// allowed or refused, appended to the audit chain in one commit.
async fn tool_calls(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    op.require(Role::Gate)?;
    let b = body(b)?;
    let r: lapse_broker::tool_calls::Report = json_body(&headers, &b)?;
    let done = s.record_tool_calls(&op, r).await?;
    Ok(no_store(
        json!({ "recorded": done.recorded, "already_recorded": done.already_recorded }),
        StatusCode::OK,
    ))
}

async fn signal(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    let b = body(b)?;
    let sig: lapse_broker::signals::Signal = json_body(&headers, &b)?;
    let kind = sig.kind.clone();
    let ended = s.signal(&op, sig).await?;
    Ok(no_store(
        lapse_broker::signals::answer(&kind, &ended),
        StatusCode::OK,
    ))
}

async fn quarantined(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    let list = s.quarantines(&op).await?;
    Ok(no_store(json!({ "quarantined": list }), StatusCode::OK))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    workload: String,
    reason: String,
}

async fn release_workload(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    let b = body(b)?;
    let r: ReleaseBody = json_body(&headers, &b)?;
    let lifted = s.release(&op, &r.workload, &r.reason).await?;
    Ok(no_store(json!({ "released": lifted }), StatusCode::OK))
}

/// The loaded policy files, for gates to build the same bundle; `digest` changes
/// exactly when the files do.
async fn policies(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let op = s.operator(authorization(&headers))?;
    if op.require(Role::Gate).is_err() {
        op.require(Role::Read)?;
    }
    let bundle = s.policy()?;
    let files = bundle.sources();
    let digest = hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(files).unwrap_or_default(),
    ));
    Ok(no_store(
        json!({ "digest": digest, "files": files }),
        StatusCode::OK,
    ))
}

async fn readyz(State(s): State<AppState>) -> Response {
    let policy = s.policy.load().is_some();
    let store = s.store.ping().await;
    let ready = policy && store.is_ok();
    let body = json!({
        "ready": ready,
        "policy": if policy { "loaded" } else { "missing" },
        "store": match &store { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() },
        // Whether this replica runs the sweeper and reconciler (one does at a time).
        "leader": s.leading(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}
