//! The proxy as a streamable HTTP MCP server (one POST per message, JSON answers,
//! no sessions: every request carries the agent's token and a fresh DPoP proof).
//!
//! - RFC 9728 metadata at `/.well-known/oauth-protected-resource[/<path>]` names
//!   the broker as the authorization server; a request without an acceptable token
//!   gets 401 with `WWW-Authenticate: DPoP … resource_metadata="…"` and a JSON-RPC
//!   error body saying why (MCP clients show it).
//! - `Mcp-Method` / `Mcp-Name` (2026-07-28), when sent, must match the body
//!   (400, `-32020`): an intermediary routing on headers must see what is decided.
//! - Every answer is `Cache-Control: no-store, private`: a filtered tool list is
//!   this caller's alone.

use crate::{Auth, Proxy};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;

/// Largest message body taken.
const MAX_BODY: usize = 4 << 20;
/// MCP's code for headers that disagree with the body.
const HEADER_MISMATCH: i64 = -32020;

pub fn router(proxy: Arc<Proxy>) -> Result<Router, String> {
    let url = proxy
        .config()
        .http
        .as_ref()
        .map(|h| h.url.clone())
        .ok_or("no `[http]` in the proxy's config")?;
    let path = url::Url::parse(&url)
        .map_err(|e| format!("`http.url`: {e}"))?
        .path()
        .to_owned();
    let metadata_path = format!(
        "/.well-known/oauth-protected-resource{}",
        if path == "/" { "" } else { path.as_str() }
    );
    Ok(Router::new()
        .route(
            &path,
            axum::routing::post(message).get(not_here).delete(not_here),
        )
        .route(&metadata_path, axum::routing::get(metadata))
        .route(
            "/.well-known/oauth-protected-resource",
            axum::routing::get(metadata),
        )
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(proxy))
}

/// No server-initiated stream and no sessions to end (every POST stands alone).
async fn not_here() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST")],
        "the Lapse MCP proxy takes one POST per message",
    )
        .into_response()
}

fn metadata_url(p: &Proxy) -> String {
    let url = p.config().http.as_ref().map_or("", |h| h.url.as_str());
    match url::Url::parse(url) {
        Ok(u) => {
            let path = u.path().trim_end_matches('/');
            format!(
                "{}/.well-known/oauth-protected-resource{path}",
                u.origin().ascii_serialization()
            )
        }
        Err(_) => String::new(),
    }
}

/// RFC 9728 protected resource metadata.
async fn metadata(State(p): State<Arc<Proxy>>) -> Response {
    let cfg = p.config();
    let issuer = cfg.issuer.clone().unwrap_or_else(|| cfg.broker.clone());
    let mut r = axum::Json(json!({
        "resource": cfg.http.as_ref().map(|h| h.url.clone()),
        "authorization_servers": [issuer],
        "bearer_methods_supported": ["header"],
        "scopes_supported": [cfg.action],
        "dpop_bound_access_tokens_required": true,
        "dpop_signing_alg_values_supported": ["EdDSA", "ES256"],
        "resource_name": "Lapse MCP proxy",
    }))
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_rpc(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, axum::Json(v.clone())).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, private"),
    );
    r
}

/// Header values as the 2026-07-28 revision encodes them (`=?base64?…?=` for
/// non-ASCII).
fn header_text(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    match s
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(s.to_owned()),
    }
}

async fn message(
    State(p): State<Arc<Proxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let null = Value::Null;
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return json_rpc(
                StatusCode::BAD_REQUEST,
                &json!({ "jsonrpc": "2.0", "id": null, "error": { "code": -32700, "message": format!("parse error: {e}") } }),
            );
        }
    };
    let id = msg.get("id").unwrap_or(&null).clone();
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let name = msg
        .get("params")
        .and_then(|p| p.get("name").or_else(|| p.get("uri")))
        .and_then(Value::as_str);
    let mismatch = |what: &str| {
        json_rpc(
            StatusCode::BAD_REQUEST,
            &json!({ "jsonrpc": "2.0", "id": id, "error": { "code": HEADER_MISMATCH, "message": format!("the `{what}` header does not match the body") } }),
        )
    };
    if let Some(h) = headers.get("mcp-method")
        && header_text(h).as_deref() != Some(method)
    {
        return mismatch("Mcp-Method");
    }
    if let Some(h) = headers.get("mcp-name")
        && header_text(h).as_deref() != name
    {
        return mismatch("Mcp-Name");
    }
    let dpop: Vec<&str> = headers
        .get_all("dpop")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    let auth = Auth::Request {
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        dpop: &dpop,
        source: peer.ip(),
    };
    // Every message needs an acceptable token, so an agent without one learns
    // where to get it before anything else.
    let claims = match p.authenticate(&auth).await {
        Ok(c) => c,
        Err(d) => {
            p.refused_before_handling(&msg, &auth, &d);
            let status = StatusCode::from_u16(d.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = json_rpc(
                status,
                &json!({ "jsonrpc": "2.0", "id": id, "error": { "code": crate::denial_code(&d), "message": d.to_string(), "data": { "error": d.code() } } }),
            );
            let challenge = format!(
                "{}, resource_metadata=\"{}\"",
                d.www_authenticate(),
                metadata_url(&p)
            );
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return r;
        }
    };
    let answer = p
        .handle(
            &msg,
            &Auth::Verified {
                claims: Box::new(claims),
                source: peer.ip(),
            },
        )
        .await;
    match answer.message {
        None => StatusCode::ACCEPTED.into_response(),
        Some(m) => json_rpc(StatusCode::OK, &m),
    }
}

/// Serves until `shutdown`, following the feed and the policies meanwhile.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = match proxy.config().http.as_ref().and_then(|h| h.tls.as_ref()) {
        Some(cfg) => Some(Arc::new(
            lapse_tls::Tls::load(cfg).map_err(|e| std::io::Error::other(e.to_string()))?,
        )),
        None => None,
    };
    let app = router(proxy.clone()).map_err(std::io::Error::other)?;
    let r = lapse_tls::serve(tls, listener, app, shutdown, || {}).await;
    if let Err(e) = proxy.report().await {
        tracing::error!(error = %e, "could not send the last tool-call records");
    }
    r
}
